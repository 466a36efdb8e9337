//! Loom models of the context-drop handshake (`Inner::drop` against `Shared::notify`): the home
//! thread drops the last `AioContext` while another thread schedules a BH, drops a
//! `BottomHalf`, or schedules a one-shot, on the real `AioContext` and BH code.
//!
//! What they check: whichever side comes second frees what the other left linked, so every
//! closure is dropped exactly once, and by then (a `ContextHandle` keeps the lists themselves
//! alive until after the checks, so a node merely left linked counts as not freed); loom's
//! `Arc` tracking also reports a leaked or doubly freed node; and no callback runs once the
//! context is gone.
#![cfg(aio_loom)]

use aio_core::AioContext;
use aio_core::fake::FakeMonitor;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::thread;

fn context() -> AioContext {
    AioContext::new(Box::new(FakeMonitor::new())).expect("fake context")
}

/// Counts drops of the value it is captured in.
struct DropCount(Arc<AtomicUsize>);
impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A closure's drop counter, and a flag that its body checks: it must not run once the context
/// is gone.
struct Probe {
    drops: Arc<AtomicUsize>,
    dead: Arc<AtomicBool>,
}

impl Probe {
    fn new() -> Probe {
        Probe {
            drops: Arc::new(AtomicUsize::new(0)),
            dead: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A callback body owning a drop counter.
    fn callback(&self) -> impl FnMut() + Send + 'static {
        let (guard, dead) = (DropCount(self.drops.clone()), self.dead.clone());
        move || {
            let _keep = &guard;
            assert!(
                !dead.load(Ordering::Relaxed),
                "a callback ran after the context was dropped"
            );
        }
    }

    /// Drops the context and records it (the home thread's program order).
    fn kill(&self, ctx: AioContext) {
        drop(ctx);
        self.dead.store(true, Ordering::Relaxed);
    }

    fn drops(&self) -> usize {
        self.drops.load(Ordering::Relaxed)
    }
}

/// Another thread schedules a BH and drops its handle while the home thread drops the context:
/// the node is freed exactly once, by `Inner::drop`'s drain or by the notify that sees the
/// context gone.
#[test]
fn remote_schedule_and_delete_race_the_context_drop() {
    loom::model(|| {
        let ctx = context();
        // Keeps the shared part (and its lists) alive past the checks, so that a node left
        // linked would be seen as not freed rather than freed when the lists go.
        let keep = ctx.handle();
        let probe = Probe::new();
        let bh = ctx.bh(probe.callback());
        let t = thread::spawn(move || {
            bh.schedule();
            drop(bh);
        });
        probe.kill(ctx);
        t.join().unwrap();
        assert_eq!(probe.drops(), 1);
        drop(keep);
    });
}

/// The handle outlives the context on another thread, which schedules through it while the
/// context is dropped: the schedule frees nothing (the handle still owns the node), and
/// dropping the handle afterwards frees the closure once.
#[test]
fn remote_schedule_races_the_context_drop_handle_survives() {
    loom::model(|| {
        let ctx = context();
        // Keeps the shared part (and its lists) alive past the checks, so that a node left
        // linked would be seen as not freed rather than freed when the lists go.
        let keep = ctx.handle();
        let probe = Probe::new();
        let bh = ctx.bh(probe.callback());
        let drops = probe.drops.clone();
        let t = thread::spawn(move || {
            bh.schedule();
            assert_eq!(
                drops.load(Ordering::Relaxed),
                0,
                "the handle still owns the node"
            );
            bh
        });
        probe.kill(ctx);
        let bh = t.join().unwrap();
        assert_eq!(probe.drops(), 0);
        drop(bh);
        assert_eq!(probe.drops(), 1);
        drop(keep);
    });
}

/// A BH scheduled by the home thread is deleted from another thread while the home thread runs
/// one pass and then drops the context: it runs at most once, before the drop, and is freed
/// once.
#[test]
fn remote_delete_races_a_pass_and_the_context_drop() {
    loom::model(|| {
        let ctx = context();
        // Keeps the shared part (and its lists) alive past the checks, so that a node left
        // linked would be seen as not freed rather than freed when the lists go.
        let keep = ctx.handle();
        let probe = Probe::new();
        let bh = ctx.bh(probe.callback());
        bh.schedule();
        let t = thread::spawn(move || drop(bh));
        ctx.poll_nonblocking();
        probe.kill(ctx);
        t.join().unwrap();
        assert_eq!(probe.drops(), 1);
        drop(keep);
    });
}

/// A one-shot scheduled from another thread while the home thread drops the context: never
/// runs, freed exactly once.
#[test]
fn remote_oneshot_races_the_context_drop() {
    loom::model(|| {
        let ctx = context();
        // Keeps the shared part (and its lists) alive past the checks, so that a node left
        // linked would be seen as not freed rather than freed when the lists go.
        let keep = ctx.handle();
        let probe = Probe::new();
        let handle = ctx.handle();
        let f = probe.callback();
        let t = thread::spawn(move || handle.schedule_oneshot(f));
        probe.kill(ctx);
        t.join().unwrap();
        assert_eq!(probe.drops(), 1);
        drop(keep);
    });
}
