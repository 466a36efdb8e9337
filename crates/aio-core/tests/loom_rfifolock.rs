//! Loom models of `RFifoLock`'s ticket hand-off on the real code: the ticket word against
//! arrivals, the waiters' mutex and condition variable against a release, recursion on one
//! thread, `try_lock` against a release, and FIFO order.
//!
//! What they check: the data (a loom `UnsafeCell` inside the lock) is never touched by two
//! holders without a happens-before edge between them (mutual exclusion and the release →
//! acquire hand-off, [RFifoLock-1]); a waiter whose ticket comes up is always woken (a lost
//! wake-up leaves it blocked on the condition variable, which loom reports as a deadlock);
//! threads that arrived one after the other get the lock in that order; an inner unlock of a
//! nested lock releases nothing.
#![cfg(aio_loom)]

use aio_core::RFifoLock;
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;

type Log = RFifoLock<UnsafeCell<Vec<usize>>>;

/// Appends `id` to the log under the lock, locking twice (nested) on the way.
fn lock_and_push(lock: &Log, id: usize) {
    let outer = lock.lock();
    let inner = lock.lock();
    // Loom checks exactly that the previous holder's accesses happen before this one.
    // SAFETY: this thread holds the lock; guards exist on one thread at a time ([RFifoLock-1]).
    inner.with_mut(|v| unsafe { (*v).push(id) });
    drop(inner);
    assert!(
        lock.is_owned_by_current_thread(),
        "an inner unlock released"
    );
    drop(outer);
}

fn log_of(lock: &Log) -> Vec<usize> {
    let guard = lock.try_lock().expect("free at the end");
    // SAFETY: as in `lock_and_push`.
    guard.with(|v| unsafe { (*v).clone() })
}

/// Two threads lock (nested) and write concurrently: mutual exclusion, no lost wake-up, and
/// the lock free at the end.
#[test]
fn two_lockers_exclude_each_other() {
    loom::model(|| {
        let lock = Arc::new(Log::new(UnsafeCell::new(Vec::new())));
        let l = lock.clone();
        let t = thread::spawn(move || lock_and_push(&l, 1));
        lock_and_push(&lock, 0);
        t.join().unwrap();
        assert!(!lock.is_locked());
        let mut log = log_of(&lock);
        log.sort_unstable();
        assert_eq!(log, [0, 1]);
    });
}

/// A release races an arrival that has to wait (its ticket is behind the holder's): the
/// waiter is always woken, and sees the holder's write.
#[test]
fn a_release_racing_an_arrival_hands_off() {
    loom::model(|| {
        let lock = Arc::new(Log::new(UnsafeCell::new(Vec::new())));
        let held = lock.lock();
        let l = lock.clone();
        let t = thread::spawn(move || lock_and_push(&l, 1));
        // SAFETY: this thread holds the lock ([RFifoLock-1]).
        held.with_mut(|v| unsafe { (*v).push(0) });
        drop(held);
        t.join().unwrap();
        assert_eq!(log_of(&lock), [0, 1]);
    });
}

/// `try_lock` races the holder's release: it either gets the lock after the holder (and sees
/// its write) or fails without leaving anything queued.
#[test]
fn try_lock_racing_a_release() {
    loom::model(|| {
        let lock = Arc::new(Log::new(UnsafeCell::new(Vec::new())));
        let held = lock.lock();
        let l = lock.clone();
        let t = thread::spawn(move || {
            if let Some(g) = l.try_lock() {
                // SAFETY: this thread holds the lock ([RFifoLock-1]).
                g.with_mut(|v| unsafe { (*v).push(1) });
            }
        });
        // SAFETY: this thread holds the lock ([RFifoLock-1]).
        held.with_mut(|v| unsafe { (*v).push(0) });
        drop(held);
        t.join().unwrap();
        assert!(!lock.is_locked(), "a failed try_lock left a ticket");
        let log = log_of(&lock);
        assert!(log == [0] || log == [0, 1], "{log:?}");
    });
}

/// FIFO: the main thread holds the lock, nested; A arrives and is seen waiting (through the
/// contention callback), then B does. Main drops its inner guard (nothing happens) and then
/// its outer one: A gets the lock, then B, whatever the interleaving of the hand-offs.
#[test]
fn waiters_get_the_lock_in_arrival_order() {
    loom::model(|| {
        let queued = Arc::new(AtomicUsize::new(0));
        let q = queued.clone();
        let lock = Arc::new(Log::with_contention(
            UnsafeCell::new(Vec::new()),
            move || {
                q.fetch_add(1, Ordering::SeqCst);
            },
        ));
        let outer = lock.lock();
        let inner = lock.lock();
        let spawn = |id| {
            let l = lock.clone();
            thread::spawn(move || lock_and_push(&l, id))
        };
        let a = spawn(1);
        while queued.load(Ordering::SeqCst) < 1 {
            thread::yield_now();
        }
        let b = spawn(2);
        while queued.load(Ordering::SeqCst) < 2 {
            thread::yield_now();
        }
        drop(inner);
        assert!(lock.is_owned_by_current_thread());
        drop(outer);
        a.join().unwrap();
        b.join().unwrap();
        assert_eq!(log_of(&lock), [1, 2]);
    });
}
