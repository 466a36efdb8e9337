//! Loom models of the cross-thread arm (`src/list.rs`): another thread arms a timer earlier
//! than the head while the loop reads the lock-free deadline (the head mirrors and the group's
//! mask). The notify must not be lost: the loop either reads the new deadline, or it is
//! notified, and then reads it.
//!
//! The notify callback stands in for the loop's wake-up protocol (aio-core's `notify`, which
//! loom checks in its own models): it sets a flag under a loom mutex and signals a condition
//! variable, on which the loop "sleeps" until the flag is set, then clears it. A lost notify
//! leaves the loop waiting with every other thread finished, which loom reports as a deadlock.
//!
//! The groups run on their own virtual clocks only: `VirtualClock::global` is a `static`, which
//! cannot hold loom objects across loom's executions. The last two models run deliberately
//! broken variants and must fail: a notify before the new head is published, and no notify.
#![cfg(aio_loom)]

use loom::sync::{Condvar, Mutex};
use loom::thread;
use std::sync::Arc;
use timers::{ClockType, LoomVariant, Scale, TimerListGroup, VirtualClock};

#[path = "../../../tests/support/loom_expect.rs"]
mod loom_expect;
use loom_expect::expect_loom_failure;

/// The loop's side of the wake-up: a flag and a notification.
#[derive(Default)]
struct Wakeup {
    notified: Mutex<bool>,
    cond: Condvar,
}

/// A group whose four clocks read `clock`, notifying `wakeup`, on `variant`.
fn group(clock: &VirtualClock, wakeup: &Arc<Wakeup>, variant: LoomVariant) -> TimerListGroup {
    let w = wakeup.clone();
    TimerListGroup::builder()
        .virtual_clock(clock.clone())
        .manual_clock(ClockType::Realtime, clock.clone())
        .manual_clock(ClockType::Host, clock.clone())
        .loom_variant(variant)
        .build(Arc::new(move || {
            *w.notified.lock().unwrap() = true;
            w.cond.notify_one();
        }))
}

/// The loop accepts any pending notification without sleeping (that of its own arms, before
/// the race starts).
fn accept_pending(wakeup: &Wakeup) {
    *wakeup.notified.lock().unwrap() = false;
}

/// The loop sleeps until notified, and accepts the notification.
fn sleep_until_notified(wakeup: &Wakeup) {
    let mut notified = wakeup.notified.lock().unwrap();
    while !*notified {
        notified = wakeup.cond.wait(notified).unwrap();
    }
    *notified = false;
}

/// One loop iteration that finds `stale` (or the new deadline, `fresh`): if stale, it sleeps
/// until notified and reads again, and must then find `fresh`.
fn loop_sees_or_is_notified(
    group: &TimerListGroup,
    wakeup: &Wakeup,
    stale: Option<u64>,
    fresh: Option<u64>,
) {
    let seen = group.deadline_ns();
    if seen == fresh {
        return;
    }
    assert_eq!(
        seen, stale,
        "the loop reads the old deadline or the new one"
    );
    sleep_until_notified(wakeup);
    assert_eq!(
        group.deadline_ns(),
        fresh,
        "notified, the loop reads the new deadline"
    );
}

/// Another thread arms a timer earlier than the head.
fn arm_earlier_than_the_head(variant: LoomVariant) {
    let clock = VirtualClock::new();
    let wakeup = Arc::new(Wakeup::default());
    let group = group(&clock, &wakeup, variant);
    let late = group.timer(ClockType::Realtime, Scale::NS, || ());
    late.arm(1000);
    accept_pending(&wakeup);
    let early = group.timer(ClockType::Realtime, Scale::NS, || ());
    let armer = thread::spawn(move || {
        early.arm(10);
        early
    });
    loop_sees_or_is_notified(&group, &wakeup, Some(1000), Some(10));
    drop(armer.join().unwrap());
}

#[test]
fn an_earlier_arm_is_seen_or_notified() {
    loom::model(|| arm_earlier_than_the_head(LoomVariant::Correct));
}

/// The loop's run empties the list (the group's mask bit goes off) while another thread arms
/// a timer in the future: the loop sees it or is notified, mask and head alike.
#[test]
fn an_arm_racing_the_run_that_empties_the_list_is_seen_or_notified() {
    loom::model(|| {
        let clock = VirtualClock::new();
        let wakeup = Arc::new(Wakeup::default());
        let group = group(&clock, &wakeup, LoomVariant::Correct);
        let due = group.timer(ClockType::Realtime, Scale::NS, || ());
        due.arm(0);
        accept_pending(&wakeup);
        let next = group.timer(ClockType::Realtime, Scale::NS, || ());
        let armer = thread::spawn(move || {
            next.arm(50);
            next
        });
        assert!(group.run_expired(), "the due timer fires");
        // Either the arm came first (the list still has `next`) or the run emptied it and the
        // arm made a new head, and notified.
        loop_sees_or_is_notified(&group, &wakeup, None, Some(50));
        drop(armer.join().unwrap());
        drop(due);
    });
}

/// Notifying before publishing: the loop wakes, reads the old head, and would sleep on it.
#[test]
fn notify_before_publish_is_caught() {
    expect_loom_failure(
        "notify_before_publish_is_caught",
        "notified, the loop reads the new deadline",
        || arm_earlier_than_the_head(LoomVariant::NotifyBeforePublish),
    );
}

/// No notify for a new head: a loop that read the old one sleeps forever.
#[test]
fn a_skipped_notify_is_caught() {
    expect_loom_failure("a_skipped_notify_is_caught", "deadlock", || {
        arm_earlier_than_the_head(LoomVariant::SkipNotify)
    });
}
