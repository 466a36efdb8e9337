//! Loom models of a task's join protocol ([TASK-5] in ARCHITECTURE.md) on the real executor:
//! the task completes on its context's thread while its `JoinHandle`, on another thread, is
//! polled, re-registers its waker, or is dropped.
//!
//! What they check: the output reaches the handle exactly once or is dropped exactly once
//! (loom's `UnsafeCell` tracking catches a read of the output or the waker that races its
//! write), a handle that returned `Pending` is always woken (no lost wake-up), and the waker
//! the handle registered last is the one woken.
#![cfg(aio_loom)]

use aio_core::AioContext;
use aio_core::fake::FakeMonitor;
use aio_core::task::JoinHandle;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::thread;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Wake, Waker};

fn context() -> AioContext {
    AioContext::new(Box::new(FakeMonitor::new())).expect("fake context")
}

/// A task output that counts its drops.
struct Payload(u32, Arc<AtomicUsize>);

impl Drop for Payload {
    fn drop(&mut self) {
        self.1.fetch_add(1, Ordering::SeqCst);
    }
}

/// A waker that raises a flag.
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: std::sync::Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
}

fn flag() -> (std::sync::Arc<Flag>, Waker) {
    let f = std::sync::Arc::new(Flag(AtomicBool::new(false)));
    let w = Waker::from(f.clone());
    (f, w)
}

/// Polls `handle` once with `waker`.
fn poll_once<T>(handle: &mut JoinHandle<T>, waker: &Waker) -> Poll<T> {
    match Pin::new(handle).poll(&mut Context::from_waker(waker)) {
        Poll::Ready(r) => Poll::Ready(r.expect("the task completed")),
        Poll::Pending => Poll::Pending,
    }
}

/// Spawns a task returning a counted payload; returns its handle and the drop counter.
fn spawn_payload(ctx: &AioContext) -> (JoinHandle<Payload>, Arc<AtomicUsize>) {
    let drops = Arc::new(AtomicUsize::new(0));
    let d = drops.clone();
    (ctx.spawn(async move { Payload(7, d) }), drops)
}

#[test]
fn join_from_another_thread_races_completion() {
    loom::model(|| {
        let ctx = context();
        let (mut handle, drops) = spawn_payload(&ctx);
        let joiner = thread::spawn(move || {
            let (flag, waker) = flag();
            let value = match poll_once(&mut handle, &waker) {
                Poll::Ready(p) => p,
                Poll::Pending => {
                    // Pending means a wake-up is owed.
                    while !flag.0.load(Ordering::Acquire) {
                        thread::yield_now();
                    }
                    match poll_once(&mut handle, &waker) {
                        Poll::Ready(p) => p,
                        Poll::Pending => panic!("woken but not complete"),
                    }
                }
            };
            assert_eq!(value.0, 7);
        });
        ctx.poll_nonblocking();
        joiner.join().unwrap();
        assert_eq!(
            drops.load(Ordering::SeqCst),
            1,
            "the output dropped exactly once"
        );
        assert_eq!(ctx.task_count(), 0);
    });
}

#[test]
fn handle_dropped_while_the_task_completes() {
    loom::model(|| {
        let ctx = context();
        let (mut handle, drops) = spawn_payload(&ctx);
        let dropper = thread::spawn(move || {
            let (_flag, waker) = flag();
            // Register a waker first, so that the drop also has one to take back.
            let r = poll_once(&mut handle, &waker);
            drop(r);
            drop(handle);
        });
        ctx.poll_nonblocking();
        dropper.join().unwrap();
        assert_eq!(
            drops.load(Ordering::SeqCst),
            1,
            "the output dropped exactly once"
        );
    });
}

#[test]
fn the_last_registered_waker_is_woken() {
    loom::model(|| {
        let ctx = context();
        let (mut handle, drops) = spawn_payload(&ctx);
        let joiner = thread::spawn(move || {
            let (_first, w1) = flag();
            let (second, w2) = flag();
            if let Poll::Ready(p) = poll_once(&mut handle, &w1) {
                assert_eq!(p.0, 7);
                return;
            }
            // Re-register with another waker (the task moved between executors, say).
            let p = match poll_once(&mut handle, &w2) {
                Poll::Ready(p) => p,
                Poll::Pending => {
                    while !second.0.load(Ordering::Acquire) {
                        thread::yield_now();
                    }
                    match poll_once(&mut handle, &w2) {
                        Poll::Ready(p) => p,
                        Poll::Pending => panic!("woken but not complete"),
                    }
                }
            };
            assert_eq!(p.0, 7);
        });
        ctx.poll_nonblocking();
        joiner.join().unwrap();
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    });
}

/// The handle registers a waker and is dropped (on another thread) while the task
/// completes: whichever side ends up owning the waker (the handle, if it cleared its
/// registration first; the producer, if it had leased the waker to wake it) drops it exactly
/// once, and nothing keeps it after the task and the handle are gone (a waker left in the cell
/// for good leaks a task that it holds).
#[test]
fn a_registered_waker_is_dropped_once_whoever_owns_it() {
    loom::model(|| {
        let ctx = context();
        let (mut handle, drops) = spawn_payload(&ctx);
        let (flag, waker) = flag();
        assert!(poll_once(&mut handle, &waker).is_pending());
        drop(waker);
        let dropper = thread::spawn(move || drop(handle));
        ctx.poll_nonblocking();
        dropper.join().unwrap();
        assert_eq!(
            drops.load(Ordering::SeqCst),
            1,
            "the output dropped exactly once"
        );
        assert_eq!(ctx.task_count(), 0);
        assert_eq!(
            std::sync::Arc::strong_count(&flag),
            1,
            "the registered waker was not dropped"
        );
    });
}
