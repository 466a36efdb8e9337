//! Loom models of the wake-up protocol (docs/qemu-semantics.md §2): `notify` against a blocking `poll`, on the
//! real `AioContext` with only the kernel faked (`aio_core::fake::FakeMonitor`).
//!
//! The models are the Rust counterparts of QEMU's `docs/spin/aio_notify_accept.promela`: a
//! notifier posts a request (a relaxed flag, like the model's `req`) and notifies; the loop polls,
//! blocking, until it has seen every request. A lost wake-up leaves the loop blocked on the fake
//! eventfd with every other thread finished, which loom reports as a deadlock. Three models run
//! deliberately broken variants of the protocol and must fail: a notify skipped whole because
//! `notified` already reads true, QEMU's BUG2 as its Promela model has it (only the eventfd
//! write is skipped, decided by a separate read of `notified`), and QEMU's accept transcribed
//! literally into C11 atomics (a plain store of `false`), which is why ours is an RMW. One more
//! shows that the BUG2 skip decided by the `swap`'s own result loses nothing.
#![cfg(aio_loom)]

use aio_core::fake::FakeMonitor;
use aio_core::{AioContext, LoomVariant};
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::thread;

#[path = "../../../tests/support/loom_expect.rs"]
mod loom_expect;
use loom_expect::expect_loom_failure;

fn context() -> AioContext {
    AioContext::new(Box::new(FakeMonitor::new())).expect("fake context")
}

/// Runs the two-notifier model on a context running `variant`.
///
/// The race starts with a notification already pending (as after any earlier `notify`), so
/// that the loop's first iteration does not sleep and its accept races with the notifiers.
fn two_notifiers(variant: LoomVariant) {
    let ctx = AioContext::new_loom_variant(Box::new(FakeMonitor::new()), variant).unwrap();
    ctx.notify();
    let reqs = [
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    ];
    let threads: Vec<_> = reqs
        .iter()
        .map(|req| {
            let (handle, r) = (ctx.handle(), req.clone());
            thread::spawn(move || {
                r.store(true, Ordering::Relaxed);
                handle.notify();
            })
        })
        .collect();
    poll_until_all(&ctx, &reqs);
    for t in threads {
        t.join().unwrap();
    }
}

/// Polls, blocking, until every flag is set.
fn poll_until_all(ctx: &AioContext, reqs: &[Arc<AtomicBool>]) {
    // Relaxed on purpose: the protocol itself (not the flag) must make the request visible.
    while !reqs.iter().all(|r| r.load(Ordering::Relaxed)) {
        ctx.poll();
    }
}

/// One notifier against a blocking poll: the request is never missed.
#[test]
fn notify_wakes_a_blocking_poll() {
    loom::model(|| {
        let ctx = context();
        let req = Arc::new(AtomicBool::new(false));
        let (handle, r) = (ctx.handle(), req.clone());
        let notifier = thread::spawn(move || {
            r.store(true, Ordering::Relaxed);
            handle.notify();
        });
        poll_until_all(&ctx, &[req]);
        notifier.join().unwrap();
    });
}

/// Two notifiers racing with the loop's accept: still no lost wake-up.
#[test]
fn two_notifiers_never_lose_a_wakeup() {
    loom::model(|| two_notifiers(LoomVariant::Correct));
}

/// A BH scheduled from another thread always runs: the schedule's notify wakes the loop.
#[test]
fn remote_oneshot_wakes_a_blocking_poll() {
    loom::model(|| {
        let ctx = context();
        let ran = Arc::new(AtomicBool::new(false));
        let (handle, r) = (ctx.handle(), ran.clone());
        let t = thread::spawn(move || {
            handle.schedule_oneshot(move || r.store(true, Ordering::Relaxed))
        });
        let mut progress = false;
        while !ran.load(Ordering::Relaxed) {
            progress |= ctx.poll();
        }
        assert!(progress, "the iteration that ran the BH reports progress");
        t.join().unwrap();
    });
}

/// QEMU's BUG2 against today's protocol: the second notifier sees `notified` already set and
/// skips its notification. It then neither writes the eventfd nor synchronizes with the loop's
/// accept, so its request need not be visible when the loop re-checks before sleeping, and
/// nobody wakes the loop. Loom must find that execution.
#[test]
fn bug2_variant_loses_a_wakeup() {
    expect_loom_failure("bug2_variant_loses_a_wakeup", "deadlock", || {
        two_notifiers(LoomVariant::ReturnEarlyIfNotified)
    });
}

/// QEMU's accept written literally (`notified = false; smp_mb()` as a relaxed store and a SeqCst
/// fence): under the C11 model the `false` can be ordered after a notifier's `true` without
/// synchronizing with it, so the notification is erased while the request stays invisible.
/// This is why `accept` is a `swap`.
#[test]
fn plain_store_accept_loses_a_wakeup() {
    expect_loom_failure("plain_store_accept_loses_a_wakeup", "deadlock", || {
        two_notifiers(LoomVariant::PlainStoreAccept)
    });
}

/// QEMU's BUG2 as its Promela model defines it: the notifier reads `notified` and, finding it
/// true, skips the eventfd write (it still sets `notified`, with the usual `swap`, and fences).
/// The read can return a `true` that the loop's accept has already consumed: the loop then
/// re-checks `notified` before sleeping, may still see its own `false`, and sleeps while the
/// notifier, which saw the loop's raised `notify_me` too late to matter, writes nothing. Loom
/// must find that execution.
#[test]
fn bug2_skipped_event_write_loses_a_wakeup() {
    expect_loom_failure(
        "bug2_skipped_event_write_loses_a_wakeup",
        "deadlock",
        || two_notifiers(LoomVariant::SkipEventWriteIfReadTrue),
    );
}

/// The same optimisation decided by the `swap`'s own result is harmless in this protocol: a
/// `swap` that returns true follows another notifier's `true` with no accept in between, and
/// that notifier either writes the eventfd or is seen by the loop's fenced re-check; the
/// accept's acquire `swap` then reads the latest `true` and synchronizes with both. (So the
/// RMW, not the unconditional write, is what rules BUG2 out here; the write stays
/// unconditional because the separate-read form above is the one that is easy to write.)
#[test]
fn bug2_skip_decided_by_the_swap_keeps_every_wakeup() {
    loom::model(|| two_notifiers(LoomVariant::SkipEventWriteIfSwapTrue));
}
