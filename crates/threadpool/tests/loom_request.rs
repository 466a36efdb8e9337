//! Loom models of one request's state machine (`src/request.rs`), on the real `Req` through
//! `threadpool::loom_api`: a cancel racing with a worker that takes the request (start, run,
//! publish) and with the completion, while a future polls for the result on a third thread.
//!
//! Whoever publishes the request also completes it here, standing in for the context's
//! completion pass (the pool's queue and lock are not modelled: in the pool, start and cancel
//! are also serialised by the pool lock, so this model allows more interleavings, not fewer).
//! The properties: exactly one of start and cancel wins; the work runs iff start won; the
//! result is `Ok` iff the work ran and `Err(Cancelled)` iff cancel won; the future gets it
//! exactly once; and a future that is pending is woken (a lost wake-up leaves it waiting with
//! every other thread finished, which loom reports as a deadlock).
//!
//! The last two models run deliberately broken variants and must fail: a cancel that checks
//! for Queued and cancels under two acquisitions of the lock, and a poll that stores its waker
//! without looking again for a completion that came while it held no lock.
#![cfg(aio_loom)]

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::sync::{Condvar, Mutex};
use loom::thread;
use std::sync::Arc;
use std::task::{Poll, Wake, Waker};
use threadpool::loom_api::LoomRequest;
use threadpool::{Error, LoomVariant, Status};

#[path = "../../../tests/support/loom_expect.rs"]
mod loom_expect;
use loom_expect::expect_loom_failure;

/// A waker that sets a flag under a loom mutex and signals a condition variable, on which the
/// future's thread sleeps until woken.
#[derive(Default)]
struct CondWaker {
    woken: Mutex<bool>,
    cond: Condvar,
}

impl Wake for CondWaker {
    fn wake(self: Arc<Self>) {
        *self.woken.lock().unwrap() = true;
        self.cond.notify_one();
    }
}

impl CondWaker {
    fn sleep(&self) {
        let mut woken = self.woken.lock().unwrap();
        while !*woken {
            woken = self.cond.wait(woken).unwrap();
        }
        *woken = false;
    }
}

/// Polls `req` until it is ready, sleeping until woken while it is pending.
fn block_on(req: &LoomRequest) -> Result<u32, Error> {
    let wake = Arc::new(CondWaker::default());
    let waker = Waker::from(wake.clone());
    loop {
        match req.poll(&waker) {
            Poll::Ready(result) => return result,
            Poll::Pending => wake.sleep(),
        }
    }
}

/// Cancel against a worker and a polling future, on a request running `variant`.
fn cancel_races_worker_and_completion(variant: LoomVariant) {
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let req = LoomRequest::new(
        move || {
            r.fetch_add(1, Ordering::Relaxed);
            7
        },
        variant,
    );
    let started = Arc::new(AtomicBool::new(false));
    let cancelled = Arc::new(AtomicBool::new(false));

    let (w, s) = (req.clone(), started.clone());
    let worker = thread::spawn(move || {
        if w.start() {
            s.store(true, Ordering::Relaxed);
            w.run();
            w.publish();
            w.complete();
        }
    });
    let (c, k) = (req.clone(), cancelled.clone());
    let canceller = thread::spawn(move || {
        if c.cancel() {
            k.store(true, Ordering::Relaxed);
            c.publish();
            c.complete();
        }
    });

    let result = block_on(&req);
    worker.join().unwrap();
    canceller.join().unwrap();

    // Joined: the flags are visible.
    let (started, cancelled) = (
        started.load(Ordering::Relaxed),
        cancelled.load(Ordering::Relaxed),
    );
    assert!(
        started != cancelled,
        "exactly one of start and cancel wins (started {started}, cancelled {cancelled})"
    );
    let ran = ran.load(Ordering::Relaxed);
    if started {
        assert_eq!((result, ran), (Ok(7), 1));
    } else {
        assert_eq!((result, ran), (Err(Error::Cancelled), 0));
    }
    assert_eq!(req.try_take(), None, "the result is given once");
    assert_eq!(req.status(), Status::Completed);
    assert!(!req.cancel(), "a completed request cannot be cancelled");
}

#[test]
fn cancel_races_a_worker_and_the_completion() {
    loom::model(|| cancel_races_worker_and_completion(LoomVariant::Correct));
}

/// A cancel that comes after the worker took the request loses, and the future gets the
/// work's result, however the completion and the poll interleave.
#[test]
fn a_late_cancel_loses_to_a_running_request() {
    loom::model(|| {
        let req = LoomRequest::new(|| 3, LoomVariant::Correct);
        assert!(req.start());
        let c = req.clone();
        let canceller = thread::spawn(move || assert!(!c.cancel(), "running: not cancellable"));
        let w = req.clone();
        let worker = thread::spawn(move || {
            w.run();
            w.publish();
            w.complete();
        });
        assert_eq!(block_on(&req), Ok(3));
        worker.join().unwrap();
        canceller.join().unwrap();
    });
}

/// A cancel that checks and acts in two critical sections: a worker starts the request in
/// between, and both win.
#[test]
fn check_then_act_cancel_is_caught() {
    expect_loom_failure(
        "check_then_act_cancel_is_caught",
        "exactly one of start and cancel wins",
        || cancel_races_worker_and_completion(LoomVariant::CancelCheckThenAct),
    );
}

/// A poll that stores its waker without looking again: a completion between its two critical
/// sections finds no waker, and the future waits forever.
#[test]
fn poll_without_recheck_loses_a_wakeup() {
    expect_loom_failure("poll_without_recheck_loses_a_wakeup", "deadlock", || {
        cancel_races_worker_and_completion(LoomVariant::PollWithoutRecheck)
    });
}
