//! Loom models of the bottom-half list (docs/qemu-semantics.md §3): schedules from other threads against a
//! polling home thread and against deletion, on the real `AioContext` and BH code.
//!
//! What they check: a schedule is never lost (every schedule is followed by a run that sees
//! it), two schedules before a pass run the callback once, a deleted BH never runs after its
//! handle is gone and its closure is freed exactly once, and the node memory is handled without
//! races (loom tracks the `Arc`s and the callback cell).
#![cfg(aio_loom)]

use aio_core::AioContext;
use aio_core::fake::FakeMonitor;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;

fn context() -> AioContext {
    AioContext::new(Box::new(FakeMonitor::new())).expect("fake context")
}

/// Two threads schedule the same BH while the home thread polls: every schedule is covered by
/// a run that comes after it.
#[test]
fn concurrent_schedules_are_never_lost() {
    loom::model(|| {
        let ctx = context();
        let scheduled = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(AtomicUsize::new(0));
        let runs = Arc::new(AtomicUsize::new(0));
        let bh = {
            let (scheduled, seen, runs) = (scheduled.clone(), seen.clone(), runs.clone());
            Arc::new(ctx.bh(move || {
                runs.fetch_add(1, Ordering::Relaxed);
                // Acquire pairs with the AcqRel increment below: the run sees the schedules
                // that came before the SCHEDULED flag it consumed.
                seen.store(scheduled.load(Ordering::Acquire), Ordering::Relaxed);
            }))
        };
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (bh, scheduled) = (bh.clone(), scheduled.clone());
                thread::spawn(move || {
                    scheduled.fetch_add(1, Ordering::AcqRel);
                    bh.schedule();
                })
            })
            .collect();
        // Block until a run has seen both schedules: a lost schedule would leave the loop
        // asleep forever, which loom reports.
        while seen.load(Ordering::Relaxed) < 2 {
            ctx.poll();
        }
        for t in threads {
            t.join().unwrap();
        }
        while ctx.poll_nonblocking() {}
        let runs = runs.load(Ordering::Relaxed);
        assert!(
            (1..=2).contains(&runs),
            "two schedules run the callback once or twice, got {runs}"
        );
    });
}

/// Counts drops of the value it is captured in.
struct DropCount(Arc<AtomicUsize>);
impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// One thread schedules a BH and then deletes it (drops the handle) while the home thread
/// polls: the callback runs at most once, never after the delete is processed, and the closure
/// is freed exactly once.
#[test]
fn schedule_then_delete_from_another_thread() {
    loom::model(|| {
        let ctx = context();
        let runs = Arc::new(AtomicUsize::new(0));
        let drops = Arc::new(AtomicUsize::new(0));
        let bh = {
            let (runs, guard) = (runs.clone(), DropCount(drops.clone()));
            ctx.bh(move || {
                let _keep = &guard;
                runs.fetch_add(1, Ordering::Relaxed);
            })
        };
        let t = thread::spawn(move || {
            bh.schedule();
            drop(bh);
        });
        // The delete notifies too, so blocking polls end once the closure is freed.
        while drops.load(Ordering::Relaxed) == 0 {
            ctx.poll();
        }
        t.join().unwrap();
        while ctx.poll_nonblocking() {}
        assert!(runs.load(Ordering::Relaxed) <= 1);
        assert_eq!(drops.load(Ordering::Relaxed), 1);
    });
}

/// A one-shot scheduled from another thread while the home thread is already running a pass
/// (a local BH is pending): it runs exactly once, in this pass or the next.
#[test]
fn oneshot_during_a_pass_runs_exactly_once() {
    loom::model(|| {
        let ctx = context();
        let local = Arc::new(AtomicUsize::new(0));
        let remote = Arc::new(AtomicUsize::new(0));
        let l = local.clone();
        let bh = ctx.bh(move || {
            l.fetch_add(1, Ordering::Relaxed);
        });
        bh.schedule();
        let (handle, r) = (ctx.handle(), remote.clone());
        let t = thread::spawn(move || {
            handle.schedule_oneshot(move || {
                r.fetch_add(1, Ordering::Relaxed);
            })
        });
        while remote.load(Ordering::Relaxed) == 0 {
            ctx.poll();
        }
        t.join().unwrap();
        while ctx.poll_nonblocking() {}
        assert_eq!(local.load(Ordering::Relaxed), 1);
        assert_eq!(remote.load(Ordering::Relaxed), 1);
    });
}
