//! The context (and the monitor) the test files of this crate build: on `MiriMonitor` under
//! Miri, which emulates neither `ppoll` nor level-triggered epoll, on poll otherwise. A test
//! file includes it with `#[path = "support/ctx.rs"] mod support;`.

#![allow(dead_code)]

#[cfg(miri)]
#[path = "miri_monitor.rs"]
mod miri_monitor;

use aio_core::{AioContext, ContextHandle, FdMonitor};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::mpsc;
use std::thread::{self, ThreadId};

/// The monitor for a test context.
pub fn monitor() -> Box<dyn FdMonitor> {
    #[cfg(miri)]
    return Box::new(miri_monitor::MiriMonitor::new().unwrap());
    #[cfg(not(miri))]
    Box::new(fdmon_poll::PollMonitor::new().unwrap())
}

/// The monitor for a test `SharedContext` (the same backends, which are `Send`).
pub fn send_monitor() -> Box<dyn FdMonitor + Send> {
    #[cfg(miri)]
    return Box::new(miri_monitor::MiriMonitor::new().unwrap());
    #[cfg(not(miri))]
    Box::new(fdmon_poll::PollMonitor::new().unwrap())
}

/// A context on [`monitor`].
pub fn ctx() -> AioContext {
    AioContext::new(monitor()).unwrap()
}

/// A context polled on its own thread until stopped; dropping the `Worker` stops it, and the
/// context (with whatever tasks it still holds) is dropped on that thread.
pub struct Worker {
    pub handle: ContextHandle,
    pub id: ThreadId,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

pub fn worker() -> Worker {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let (tx, rx) = mpsc::channel();
    let thread = thread::spawn(move || {
        let ctx = ctx();
        tx.send((ctx.handle(), thread::current().id())).unwrap();
        while !s.load(SeqCst) {
            ctx.poll();
        }
    });
    let (handle, id) = rx.recv().unwrap();
    Worker {
        handle,
        id,
        stop,
        thread: Some(thread),
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        self.handle.notify();
        if let Some(t) = self.thread.take() {
            // Do not double-panic if the test already failed.
            let r = t.join();
            if !thread::panicking() {
                r.unwrap();
            }
        }
    }
}
