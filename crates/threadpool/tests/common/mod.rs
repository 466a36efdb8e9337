//! Helpers shared by the pool's integration tests: a context, two minimal executors (one that
//! polls the context, one that parks the thread), and waiting with a deadline.

// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

use aio_core::AioContext;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

// Under Miri, which has no ppoll, contexts run on the core's test-only `MiriMonitor`.
#[cfg(miri)]
#[path = "../../../aio-core/tests/support/miri_monitor.rs"]
mod miri_monitor;

/// A context on the poll backend (on `MiriMonitor` under Miri).
pub fn ctx() -> AioContext {
    #[cfg(miri)]
    return AioContext::new(Box::new(miri_monitor::MiriMonitor::new().unwrap())).unwrap();
    #[cfg(not(miri))]
    AioContext::new(Box::new(fdmon_poll::PollMonitor::new().unwrap())).unwrap()
}

/// A waker that records that it was woken.
#[derive(Default)]
pub struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Flag {
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::SeqCst)
    }
}

/// Runs `fut` to completion on the context's thread: polls it, and while it is pending runs
/// the context (blocking) until its waker fires. The executor a later crate will provide,
/// reduced to what the tests need.
pub fn block_on<F: Future>(ctx: &AioContext, fut: F) -> F::Output {
    let flag = Arc::new(Flag::default());
    let waker = Waker::from(flag.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        while !flag.take() {
            ctx.poll();
        }
    }
}

/// A waker that unparks a thread.
struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `fut` to completion on a thread that has no context, parking between polls.
pub fn block_on_parked<F: Future>(fut: F) -> F::Output {
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        thread::park();
    }
}

/// Polls the context (blocking) until `cond` holds.
pub fn poll_until(ctx: &AioContext, mut cond: impl FnMut() -> bool) {
    while !cond() {
        ctx.poll();
    }
}

/// Waits until `cond` holds, checking every millisecond; panics with `what` after 20 s. The
/// deadline only turns a hang into a failure: no test depends on how fast this is.
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

/// As [`eventually`], running the context without blocking while it waits (for conditions
/// that need a thread the context creates).
pub fn eventually_polling(ctx: &AioContext, what: &str, mut cond: impl FnMut() -> bool) {
    eventually(what, || {
        ctx.poll_nonblocking();
        cond()
    });
}
