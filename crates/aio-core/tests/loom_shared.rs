//! Loom models of `SharedContext` (acquire/release, seed 002) on the real context, lock and BH
//! code: the home thread moves with the lock (`HomeThread`, [SHARED-1]).
//!
//! What they check: a BH scheduled by one holder on its local list runs under the next holder
//! (no race on the list, whose cell loom tracks); a BH scheduled by a thread that does not
//! hold reaches a holder asleep in `poll` (the remote path and the notify protocol, with the
//! home word pointing at whoever holds); and a contending acquirer always kicks the holder out
//! of a blocking poll (a lost kick is a loom deadlock). Checked by hand: a contention callback
//! that does not notify deadlocks the third model, and a release that leaves the BH list's
//! home word set makes loom report the first one's race on the local list.
#![cfg(aio_loom)]

use aio_core::SharedContext;
use aio_core::fake::FakeMonitor;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::thread;

fn shared() -> SharedContext {
    SharedContext::new(Box::new(FakeMonitor::new())).expect("fake context")
}

/// One holder schedules on the local list (it is the home thread), releases, and schedules
/// again as a non-holder; the holders run each BH exactly once.
#[test]
fn a_bh_scheduled_by_one_holder_runs_under_the_next() {
    loom::model(|| {
        let ctx = shared();
        let runs = Arc::new(AtomicUsize::new(0));
        let t = {
            let (ctx, runs) = (ctx.clone(), runs.clone());
            thread::spawn(move || {
                let held = ctx.acquire();
                let r = runs.clone();
                held.schedule_oneshot(move || {
                    r.fetch_add(1, Ordering::Relaxed);
                });
                drop(held);
                // No longer the home thread: this one takes the remote path, even while the
                // other thread polls (a stale home word would race on the local list).
                ctx.handle().schedule_oneshot(move || {
                    runs.fetch_add(1, Ordering::Relaxed);
                });
            })
        };
        {
            let held = ctx.acquire();
            held.poll_nonblocking();
        }
        t.join().unwrap();
        let held = ctx.acquire();
        held.poll_nonblocking();
        assert_eq!(runs.load(Ordering::Relaxed), 2);
    });
}

/// A thread that does not hold the context schedules a BH while the holder sleeps in `poll`:
/// the schedule takes the remote path and wakes it.
#[test]
fn a_non_holder_schedule_wakes_the_holder() {
    loom::model(|| {
        let ctx = shared();
        let ran = Arc::new(AtomicBool::new(false));
        let t = {
            let (handle, ran) = (ctx.handle(), ran.clone());
            thread::spawn(move || {
                handle.schedule_oneshot(move || ran.store(true, Ordering::Relaxed));
            })
        };
        let held = ctx.acquire();
        while !ran.load(Ordering::Relaxed) {
            held.poll();
        }
        drop(held);
        t.join().unwrap();
    });
}

/// The seed's kick: the holder polls (blocking, nothing else to wake it) only while the
/// contender has not had its turn; the contender's acquire must wake that poll.
#[test]
fn a_contending_acquire_kicks_a_blocking_poll() {
    loom::model(|| {
        let ctx = shared();
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (ctx, done) = (ctx.clone(), done.clone());
            thread::spawn(move || {
                let _held = ctx.acquire();
                done.store(true, Ordering::Relaxed);
            })
        };
        {
            let held = ctx.acquire();
            // Under the lock: the contender either finished (its store is ordered before our
            // acquire) or has not got the lock, and then it notifies when it has to wait.
            if !done.load(Ordering::Relaxed) {
                assert!(!held.poll(), "a kick is not progress");
            }
        }
        t.join().unwrap();
        assert!(done.load(Ordering::Relaxed));
    });
}
