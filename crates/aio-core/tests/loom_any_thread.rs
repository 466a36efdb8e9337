//! Loom models of handler operations from another thread (seed 004; docs/qemu-semantics.md §7) on the real
//! context: a remote removal racing the dispatch of the same handler ([Gate-1]: no invocation
//! starts after `remove` returned, the closure is freed only by the home thread and never
//! under the walker), a remote registration against a loop that sleeps (the queued operation
//! and its notify lose no wake-up: a lost one is a loom deadlock), and a context dropped while
//! a remote registration waits (the waiter is always answered).
#![cfg(aio_loom)]

use aio_core::fake::FakeMonitor;
use aio_core::{AioContext, ContextGone, EventNotifier};
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::thread;

#[path = "../../../tests/support/loom_expect.rs"]
mod loom_expect;
use loom_expect::expect_loom_failure;

fn ctx() -> AioContext {
    AioContext::new(Box::new(FakeMonitor::new())).unwrap()
}

/// Counts drops of the closure that owns it.
struct Token(Arc<AtomicUsize>);

impl Drop for Token {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Another thread removes a handler while the home thread dispatches it (its notifier is set
/// and never cleared, so every iteration dispatches it). The callback's first action reads a
/// flag the remover raises right after `remove` returns: reading it raised is allowed only for
/// the one invocation `remove` reported running. The closure is freed on the home thread,
/// after the removal, and the handler never runs once the removal is applied.
#[test]
fn remote_remove_racing_dispatch() {
    loom::model(|| remove_racing_dispatch(false));
}

/// The naive design, removal by the queued unregistration alone (the gate turned off), lets a
/// call start after `remove` returned: the model must catch it.
#[test]
fn remote_remove_without_the_gate_is_caught() {
    expect_loom_failure(
        "remote_remove_without_the_gate_is_caught",
        "started after remove returned",
        || remove_racing_dispatch(true),
    );
}

fn remove_racing_dispatch(broken: bool) {
    {
        let ctx = ctx();
        let n = Arc::new(EventNotifier::new().unwrap());
        n.set().unwrap();
        let returned = Arc::new(AtomicBool::new(false));
        let late = Arc::new(AtomicUsize::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let drops = Arc::new(AtomicUsize::new(0));
        let (ret, lt, c, token) = (
            returned.clone(),
            late.clone(),
            calls.clone(),
            Token(drops.clone()),
        );
        // Registered through the handle on the home thread: applied in place.
        let h = ctx
            .handle()
            .set_event_notifier(&n, move |_| {
                let _keep = &token;
                if ret.load(Ordering::SeqCst) {
                    lt.fetch_add(1, Ordering::SeqCst);
                }
                c.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        if broken {
            h.loom_break_gate();
        }
        let ret = returned.clone();
        let remover = thread::spawn(move || {
            let running = h.remove();
            ret.store(true, Ordering::SeqCst);
            running
        });
        ctx.poll_nonblocking();
        let running = remover.join().unwrap();
        let late = late.load(Ordering::SeqCst);
        assert!(
            late == 0 || (running && late == 1),
            "{late} call(s) started after remove returned (running: {running})"
        );
        // The removal is queued (or was applied by the dispatch that found it closed); the next
        // iteration applies it and frees the closure, here on the home thread.
        ctx.poll_nonblocking();
        assert_eq!(drops.load(Ordering::SeqCst), 1, "the closure was freed");
        let after = calls.load(Ordering::SeqCst);
        ctx.poll_nonblocking();
        assert_eq!(calls.load(Ordering::SeqCst), after, "never runs again");
    }
}

/// Another thread registers a handler while the home thread sleeps in a blocking `poll`, then
/// makes it ready. The registration's notify must wake the loop (or keep it from sleeping), the
/// loop must apply it and answer, and the callback must run: a lost wake-up anywhere is a
/// deadlock, which loom reports.
#[test]
fn remote_register_wakes_a_sleeping_loop() {
    loom::model(|| {
        let ctx = ctx();
        let n = Arc::new(EventNotifier::new().unwrap());
        let ran = Arc::new(AtomicBool::new(false));
        let (handle, n2, r) = (ctx.handle(), n.clone(), ran.clone());
        let registrar = thread::spawn(move || {
            let h = handle
                .set_event_notifier(&n2, move |e| {
                    e.test_and_clear();
                    r.store(true, Ordering::SeqCst);
                })
                .unwrap();
            n2.set().unwrap();
            h
        });
        while !ran.load(Ordering::SeqCst) {
            ctx.poll();
        }
        let h = registrar.join().unwrap();
        assert!(h.is_registered());
    });
}

/// The loop is dropped while another thread's registration may be queued: the registrar is
/// always answered (applied before the drop, or `ContextGone`), never left asleep, and the
/// callback is freed exactly once either way.
#[test]
fn context_dropped_while_a_remote_registration_waits() {
    loom::model(|| {
        let ctx = ctx();
        let n = Arc::new(EventNotifier::new().unwrap());
        let drops = Arc::new(AtomicUsize::new(0));
        let (handle, n2, token) = (ctx.handle(), n.clone(), Token(drops.clone()));
        let registrar = thread::spawn(move || {
            handle.set_event_notifier(&n2, move |_| {
                let _keep = &token;
            })
        });
        ctx.poll_nonblocking();
        drop(ctx);
        match registrar.join().unwrap() {
            Ok(h) => {
                // Applied before the drop, which freed it; removing it now does nothing.
                assert!(!h.is_registered());
                assert!(!h.remove());
            }
            Err(e) => assert!(ContextGone::is(&e), "{e}"),
        }
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    });
}
