//! The ownership paths of bottom-half nodes (see `src/bh.rs`, "Memory: who owns a node"), one
//! test each, written to be run under valgrind or a sanitizer as well as normally: a handle
//! deleted from inside its callback and then a nested poll, a delete from another thread while
//! the callback runs, a one-shot that tries to reschedule itself, and contexts dropped with
//! deleted, one-shot and scheduled nodes still linked. Each checks that every closure is dropped
//! exactly once and that no callback runs after its BH is deleted.

use aio_core::{AioContext, BottomHalf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};

// Under Miri, which has no ppoll, contexts run on the test-only `MiriMonitor`.
#[path = "support/ctx.rs"]
mod support;
use support::ctx;

/// Counts how many times the value it lives in is dropped.
struct Drops(Arc<AtomicUsize>);
impl Drop for Drops {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Schedules a BH whose callback counts its run in `runs`, drops its own handle, polls (the
/// nested pass meets the deleted node while the callback still runs, and must leave the free
/// to this frame), checks that it was not freed meanwhile, then runs `rest`. Its closure's drop
/// is counted in `drops`.
fn self_deleting_bh(
    ctx: &AioContext,
    runs: &Arc<AtomicUsize>,
    drops: &Arc<AtomicUsize>,
    rest: impl Fn() + Send + 'static,
) {
    let slot: Arc<Mutex<Option<BottomHalf>>> = Arc::default();
    let bh = {
        let (runs, guard, slot) = (runs.clone(), Drops(drops.clone()), slot.clone());
        ctx.bh(move || {
            let _keep = &guard;
            runs.fetch_add(1, Ordering::SeqCst);
            drop(slot.lock().unwrap().take());
            let current = AioContext::current().unwrap();
            while current.poll_nonblocking() {}
            assert_eq!(
                guard.0.load(Ordering::SeqCst),
                0,
                "freed while still running"
            );
            rest();
        })
    };
    bh.schedule();
    *slot.lock().unwrap() = Some(bh);
}

#[test]
fn delete_own_handle_then_nested_poll_frees_once_after_the_callback() {
    let ctx = ctx();
    let (runs, drops) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    self_deleting_bh(&ctx, &runs, &drops, || {});
    assert!(ctx.poll());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        drops.load(Ordering::SeqCst),
        1,
        "freed when the callback returned"
    );
    assert!(!ctx.poll_nonblocking());
}

#[test]
fn delete_from_another_thread_while_the_callback_runs() {
    let ctx = ctx();
    let (runs, drops) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let barrier = Arc::new(Barrier::new(2));
    let bh = {
        let (runs, guard, barrier) = (runs.clone(), Drops(drops.clone()), barrier.clone());
        ctx.bh_with_self(move |this| {
            let _keep = &guard;
            runs.fetch_add(1, Ordering::SeqCst);
            barrier.wait(); // the other thread may now drop the handle...
            barrier.wait(); // ...and has done so
            this.schedule(); // rescheduling a BH whose handle is gone is harmless
        })
    };
    bh.schedule();
    let t = {
        let barrier = barrier.clone();
        std::thread::spawn(move || {
            barrier.wait();
            drop(bh);
            barrier.wait();
        })
    };
    assert!(ctx.poll());
    t.join().unwrap();
    while ctx.poll_nonblocking() {}
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "never runs after its delete"
    );
    assert_eq!(drops.load(Ordering::SeqCst), 1);
}

/// A one-shot's only reference belongs to its link: it runs once and is freed right after.
#[test]
fn oneshot_runs_once_and_is_freed_after_running() {
    let ctx = ctx();
    let (runs, drops) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let r = runs.clone();
    let g = Drops(drops.clone());
    ctx.schedule_oneshot(move || {
        let _keep = &g;
        r.fetch_add(1, Ordering::SeqCst);
    });
    assert!(ctx.poll());
    assert!(!ctx.poll_nonblocking());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
}

#[test]
fn nested_pass_meets_a_running_bh_and_requeues_it() {
    let ctx = ctx();
    let runs = Arc::new(AtomicUsize::new(0));
    let bh = {
        let runs = runs.clone();
        ctx.bh_with_self(move |this| {
            let n = runs.fetch_add(1, Ordering::SeqCst);
            if n == 0 {
                this.schedule();
                // The nested pass finds us running: it must requeue, not re-enter or free.
                let current = AioContext::current().unwrap();
                current.poll_nonblocking();
            }
        })
    };
    bh.schedule();
    assert!(ctx.poll_nonblocking());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(ctx.poll_nonblocking());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert!(!ctx.poll_nonblocking());
}

#[test]
fn dropping_the_context_frees_every_linked_node_without_running_it() {
    let drops = Arc::new(AtomicUsize::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let make = |ctx: &AioContext| {
        let (g, r) = (Drops(drops.clone()), runs.clone());
        ctx.bh(move || {
            let _keep = &g;
            r.fetch_add(1, Ordering::SeqCst);
        })
    };
    let ctx = ctx();
    let scheduled = make(&ctx);
    scheduled.schedule();
    let deleted = make(&ctx);
    deleted.schedule();
    drop(deleted); // linked, DELETED: the link owns it
    let (g, r) = (Drops(drops.clone()), runs.clone());
    ctx.schedule_oneshot(move || {
        let _keep = &g;
        r.fetch_add(1, Ordering::SeqCst);
    });
    let handle = ctx.handle();
    drop(ctx);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(
        drops.load(Ordering::SeqCst),
        2,
        "the deleted BH and the one-shot are freed"
    );
    // The live handle still owns its node; scheduling on a dead context frees nothing of it.
    scheduled.schedule();
    assert_eq!(drops.load(Ordering::SeqCst), 2);
    drop(scheduled);
    assert_eq!(drops.load(Ordering::SeqCst), 3);
    // One-shots scheduled after the loop is gone are freed at once, never run.
    let g = Drops(drops.clone());
    handle.schedule_oneshot(move || drop(g));
    assert_eq!(drops.load(Ordering::SeqCst), 4);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[test]
fn delete_while_pending_from_many_threads() {
    let ctx = ctx();
    let drops = Arc::new(AtomicUsize::new(0));
    let handles: Vec<BottomHalf> = (0..64)
        .map(|_| {
            let g = Drops(drops.clone());
            ctx.bh(move || {
                let _keep = &g;
            })
        })
        .collect();
    let threads: Vec<_> = handles
        .into_iter()
        .map(|bh| {
            std::thread::spawn(move || {
                for _ in 0..100 {
                    bh.schedule();
                }
                drop(bh);
            })
        })
        .collect();
    while drops.load(Ordering::SeqCst) < 64 {
        ctx.poll();
    }
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(drops.load(Ordering::SeqCst), 64);
}

/// Issue 10, defect 1: a callback reschedules itself and waits in a nested poll loop (the
/// `AIO_WAIT_WHILE` pattern) while another thread drops its handle. The nested passes meet the
/// node first scheduled (it must stay marked running), then deleted: its memory belongs to the
/// running frame until the callback returns.
#[test]
fn rescheduled_then_deleted_by_another_thread_during_a_nested_wait() {
    let ctx = ctx();
    let (runs, drops) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let bh = {
        let (runs, guard) = (runs.clone(), Drops(drops.clone()));
        ctx.bh_with_self(move |this| {
            let _keep = &guard;
            runs.fetch_add(1, Ordering::SeqCst);
            this.schedule();
            let current = AioContext::current().unwrap();
            // The nested pass meets us scheduled while we run.
            current.poll_nonblocking();
            go_tx.send(()).unwrap();
            done_rx.recv().unwrap();
            // The nested passes meet us deleted while we run.
            while current.poll_nonblocking() {}
            current.poll_nonblocking();
            assert_eq!(
                guard.0.load(Ordering::SeqCst),
                0,
                "freed while still running"
            );
        })
    };
    bh.schedule();
    let t = std::thread::spawn(move || {
        go_rx.recv().unwrap();
        drop(bh);
        done_tx.send(()).unwrap();
    });
    assert!(ctx.poll());
    t.join().unwrap();
    while ctx.poll_nonblocking() {}
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "never runs after its delete"
    );
    assert_eq!(drops.load(Ordering::SeqCst), 1, "freed exactly once");
}

/// Issue 10, defect 2: the callback drops its own handle, polls (the nested pass hands the
/// free to this frame), then reschedules itself through `RunningBh`. A deleted node must never
/// be linked again: the frame frees it when the callback returns.
#[test]
fn deleted_by_its_callback_then_rescheduled_after_a_nested_poll() {
    let ctx = ctx();
    let (runs, drops) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let slot: Arc<Mutex<Option<BottomHalf>>> = Arc::default();
    let bh = {
        let (runs, guard, slot) = (runs.clone(), Drops(drops.clone()), slot.clone());
        ctx.bh_with_self(move |this| {
            let _keep = &guard;
            runs.fetch_add(1, Ordering::SeqCst);
            drop(slot.lock().unwrap().take());
            let current = AioContext::current().unwrap();
            while current.poll_nonblocking() {}
            this.schedule();
            this.schedule_idle();
        })
    };
    bh.schedule();
    *slot.lock().unwrap() = Some(bh);
    assert!(ctx.poll());
    // Allocate BHs of the same size so that a node freed while still linked would be reused.
    let others: Vec<BottomHalf> = (0..8).map(|_| ctx.bh(|| {})).collect();
    for _ in 0..4 {
        ctx.poll_nonblocking();
    }
    drop(others);
    while ctx.poll_nonblocking() {}
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
}

/// The `AIO_WAIT_WHILE` pattern from inside a callback: blocking polls of the current context
/// until `done`, counting them in `iterations`. A spinning wait makes thousands of iterations
/// in the tests' 50 ms; it is stopped after 1000.
fn wait_nested(done: &std::sync::atomic::AtomicBool, iterations: &AtomicUsize) {
    let current = AioContext::current().unwrap();
    while !done.load(Ordering::SeqCst) {
        current.poll();
        if iterations.fetch_add(1, Ordering::SeqCst) > 1000 {
            break;
        }
    }
}

/// Issue 10, defect 6: a callback that is rescheduled (by itself or by another thread) and
/// then waits in a nested *blocking* poll loop must sleep, not spin: the nested passes cannot
/// run it, so they must not count it as pending work. It runs again after it returns.
#[test]
fn a_nested_blocking_wait_sleeps_while_its_own_bh_is_rescheduled() {
    let ctx = ctx();
    let runs = Arc::new(AtomicUsize::new(0));
    let nested_iterations = Arc::new(AtomicUsize::new(0));
    let remote = ctx.handle();
    let bh = {
        let (runs, nested_iterations) = (runs.clone(), nested_iterations.clone());
        ctx.bh_with_self(move |this| {
            if runs.fetch_add(1, Ordering::SeqCst) > 0 {
                return;
            }
            this.schedule();
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (d, remote) = (done.clone(), remote.clone());
            let sender = std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                remote.schedule_oneshot(move || d.store(true, Ordering::SeqCst));
            });
            wait_nested(&done, &nested_iterations);
            sender.join().unwrap();
        })
    };
    bh.schedule();
    assert!(ctx.poll());
    let n = nested_iterations.load(Ordering::SeqCst);
    assert!(n <= 3, "the nested wait spun: {n} iterations");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(
        ctx.poll_nonblocking(),
        "the reschedule runs after the callback returns"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert!(!ctx.poll_nonblocking());
}

/// Defect 6 again, with the schedules coming from another thread: each one wakes the nested
/// wait at most once, and the BH runs once more after the callback returns.
#[test]
fn remote_schedules_during_a_nested_wait_wake_it_once_each() {
    let ctx = ctx();
    let runs = Arc::new(AtomicUsize::new(0));
    let slot: Arc<Mutex<Option<Arc<BottomHalf>>>> = Arc::default();
    let nested_iterations = Arc::new(AtomicUsize::new(0));
    let bh = {
        let (runs, slot, nested_iterations) =
            (runs.clone(), slot.clone(), nested_iterations.clone());
        let remote = ctx.handle();
        Arc::new(ctx.bh(move || {
            if runs.fetch_add(1, Ordering::SeqCst) > 0 {
                return;
            }
            let me = slot.lock().unwrap().clone().unwrap();
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (d, remote) = (done.clone(), remote.clone());
            let scheduler = std::thread::spawn(move || {
                for _ in 0..5 {
                    me.schedule();
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                remote.schedule_oneshot(move || d.store(true, Ordering::SeqCst));
            });
            wait_nested(&done, &nested_iterations);
            scheduler.join().unwrap();
        }))
    };
    *slot.lock().unwrap() = Some(bh.clone());
    bh.schedule();
    assert!(ctx.poll());
    let n = nested_iterations.load(Ordering::SeqCst);
    assert!(
        n <= 12,
        "the nested wait spun: {n} iterations for 6 wake-ups"
    );
    assert!(
        ctx.poll_nonblocking(),
        "the reschedules run after the callback returns"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "coalesced into one more run"
    );
    slot.lock().unwrap().take();
}

/// A callback that deletes its own BH, runs a nested pass (which hands the free to the running
/// frame), then panics: the frame's unwinding frees the node exactly once, the panic reaches
/// the caller of `poll`, and the context keeps working, its other BHs included.
#[test]
fn deleted_by_its_callback_which_then_panics_is_freed_once_on_unwind() {
    let ctx = ctx();
    let (runs, drops) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    self_deleting_bh(&ctx, &runs, &drops, || {
        panic!("callback panics after deleting its own BH")
    });
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.poll()));
    assert!(panicked.is_err(), "the panic reaches the caller of poll");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        drops.load(Ordering::SeqCst),
        1,
        "freed once, by the unwinding frame"
    );
    // Same-sized allocations would reuse a node freed too early; the context still runs BHs.
    let ran = Arc::new(AtomicUsize::new(0));
    let others: Vec<BottomHalf> = (0..8)
        .map(|_| {
            let ran = ran.clone();
            let bh = ctx.bh(move || {
                ran.fetch_add(1, Ordering::SeqCst);
            });
            bh.schedule();
            bh
        })
        .collect();
    while ctx.poll_nonblocking() {}
    assert_eq!(ran.load(Ordering::SeqCst), 8);
    drop(others);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
}
