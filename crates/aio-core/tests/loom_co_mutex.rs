//! Loom models of `CoMutex` on the real code: the uncontended fast path against the queue,
//! the hand-off from an unlock to a waiter that is queueing at the same moment, and a waiter
//! cancelled while the lock is being handed to it.
//!
//! What they check: the data is never touched by two holders without a happens-before edge
//! (loom's `UnsafeCell` tracking), a queued waiter is always woken and then owns the lock (no
//! lost wake-up, no lost lock), and a cancelled waiter leaves the lock free.
#![cfg(aio_loom)]

use aio_core::task::CoMutex;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::thread;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Wake, Waker};

/// A waker that raises a flag.
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
}

/// Locks `m` the way a task would: poll; if queued, wait for the wake-up (the only way out of
/// the queue is a hand-off, which wakes), then poll again, which must succeed.
fn lock_and_add(m: &CoMutex<usize>) {
    let flag = std::sync::Arc::new(Flag(AtomicBool::new(false)));
    let waker = Waker::from(flag.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = Box::pin(m.lock());
    let mut guard = match Pin::as_mut(&mut fut).poll(&mut cx) {
        Poll::Ready(g) => g,
        Poll::Pending => {
            while !flag.0.load(Ordering::Acquire) {
                thread::yield_now();
            }
            match Pin::as_mut(&mut fut).poll(&mut cx) {
                Poll::Ready(g) => g,
                Poll::Pending => panic!("woken but not handed the lock"),
            }
        }
    };
    *guard += 1;
}

#[test]
fn two_lockers_exclude_each_other() {
    loom::model(|| {
        let m = Arc::new(CoMutex::new(0usize));
        let m2 = m.clone();
        let t = thread::spawn(move || lock_and_add(&m2));
        lock_and_add(&m);
        t.join().unwrap();
        assert_eq!(*m.try_lock().expect("free at the end"), 2);
    });
}

#[test]
fn unlock_hands_off_to_a_waiter_queueing_concurrently() {
    loom::model(|| {
        let m = Arc::new(CoMutex::new(0usize));
        let mut g = m.try_lock().unwrap();
        let m2 = m.clone();
        let t = thread::spawn(move || lock_and_add(&m2));
        *g += 1;
        drop(g);
        t.join().unwrap();
        assert_eq!(*m.try_lock().expect("free at the end"), 2);
    });
}

#[test]
fn a_waiter_cancelled_during_the_hand_off_does_not_keep_the_lock() {
    loom::model(|| {
        let m = Arc::new(CoMutex::new(0usize));
        let g = m.try_lock().unwrap();
        let m2 = m.clone();
        let t = thread::spawn(move || {
            let waker = Waker::from(std::sync::Arc::new(Flag(AtomicBool::new(false))));
            let mut fut = Box::pin(m2.lock());
            // Queued (or, if the unlock came first, holding it): drop either way.
            let polled = Pin::as_mut(&mut fut).poll(&mut Context::from_waker(&waker));
            drop(polled);
            drop(fut);
        });
        drop(g);
        t.join().unwrap();
        assert!(m.try_lock().is_some(), "the lock was lost");
    });
}
