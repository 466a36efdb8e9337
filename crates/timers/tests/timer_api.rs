//! The timer handle's operations one by one: is_pending, expire_time_ns, has_expired,
//! arm_if_earlier, cancel before and after expiry, scales and saturating deadline arithmetic.

mod util;

use std::num::NonZeroU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use timers::{ClockType, Scale, TimerAttrs};
use util::{Fixture, Log};

#[test]
fn pending_and_expire_time_follow_arm_cancel_and_fire() {
    let fx = Fixture::new();
    let (t, n) = fx.counting_timer();
    assert!(!t.is_pending());
    assert_eq!(t.expire_time_ns(), None);
    t.arm_ns(42);
    assert!(t.is_pending());
    assert_eq!(t.expire_time_ns(), Some(42));
    t.cancel();
    assert!(!t.is_pending());
    assert_eq!(t.expire_time_ns(), None);
    t.cancel(); // cancelling a disarmed timer is harmless
    t.arm_ns(42);
    fx.advance_ns(42);
    assert!(fx.group.run_expired());
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert!(!t.is_pending());
    assert_eq!(t.expire_time_ns(), None);
}

#[test]
fn cancel_before_expiry() {
    let fx = Fixture::new();
    let (t, n) = fx.counting_timer();
    t.arm_ns(100);
    t.cancel();
    fx.advance_ns(1_000);
    assert!(!fx.group.run_expired());
    assert_eq!(n.load(Ordering::SeqCst), 0);
}

/// Conformance case 28: deleted after its deadline passed but before the next run, it never
/// fires.
#[test]
fn cancel_after_deadline_before_run() {
    let fx = Fixture::new();
    let (t, n) = fx.counting_timer();
    t.arm_ns(100);
    fx.advance_ns(200);
    assert!(t.has_expired(fx.now()));
    t.cancel();
    assert!(!fx.group.run_expired());
    assert_eq!(n.load(Ordering::SeqCst), 0);
    assert_eq!(fx.group.deadline(), None);
}

#[test]
fn cancel_after_firing_is_a_no_op() {
    let fx = Fixture::new();
    let (t, n) = fx.counting_timer();
    t.arm_ns(0);
    assert!(fx.group.run_expired());
    t.cancel();
    assert!(!fx.group.run_expired());
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

#[test]
fn has_expired_compares_in_scale_units_like_qemu() {
    let fx = Fixture::new();
    let t = fx.group.timer(ClockType::Virtual, Scale::MS, || ());
    // Not armed: no deadline lies ahead, so it counts as expired (QEMU timer_expired).
    assert!(t.has_expired(0));
    t.arm(10);
    assert_eq!(t.expire_time_ns(), Some(10_000_000));
    assert!(!t.has_expired(9));
    assert!(t.has_expired(10));
    assert!(t.has_expired(11));
    assert!(!t.has_expired(t.now()));
    fx.clock.advance(Duration::from_millis(10));
    assert_eq!(t.now(), 10);
    assert!(t.has_expired(t.now()));
}

#[test]
fn arm_if_earlier_only_moves_earlier() {
    let fx = Fixture::new();
    let (t, _) = fx.counting_timer();
    t.arm_if_earlier_ns(100); // not armed: arms
    assert_eq!(t.expire_time_ns(), Some(100));
    t.arm_if_earlier_ns(200); // later: no change
    assert_eq!(t.expire_time_ns(), Some(100));
    t.arm_if_earlier_ns(50);
    assert_eq!(t.expire_time_ns(), Some(50));
    let ms = fx.group.timer(ClockType::Virtual, Scale::MS, || ());
    ms.arm_if_earlier(3);
    ms.arm_if_earlier(4);
    assert_eq!(ms.expire_time_ns(), Some(3_000_000));
}

#[test]
fn arm_if_earlier_at_the_same_deadline_keeps_the_place_in_line() {
    let fx = Fixture::new();
    let log = Log::default();
    let a = fx.logging_timer(&log, 0);
    let b = fx.logging_timer(&log, 1);
    a.arm_ns(10);
    b.arm_ns(10);
    a.arm_if_earlier_ns(10); // equal: nothing changes, a stays ahead of b
    fx.advance_ns(10);
    fx.group.run_expired();
    assert_eq!(log.take(), [0, 1]);
}

#[test]
fn scales_multiply_deadlines() {
    let fx = Fixture::new();
    let cases = [
        (Scale::NS, 7, 7),
        (Scale::US, 7, 7_000),
        (Scale::MS, 7, 7_000_000),
        (Scale::S, 7, 7_000_000_000),
        (Scale::custom(NonZeroU64::new(3).unwrap()), 7, 21),
    ];
    for (scale, units, ns) in cases {
        let t = fx.group.timer(ClockType::Virtual, scale, || ());
        assert_eq!(t.scale(), scale);
        t.arm(units);
        assert_eq!(t.expire_time_ns(), Some(ns), "{scale:?}");
    }
    fx.clock.advance(Duration::from_millis(2_500));
    let s = fx.group.timer(ClockType::Virtual, Scale::S, || ());
    assert_eq!(s.now(), 2, "now() rounds down");
    assert_eq!(s.now_ns(), 2_500_000_000);
}

#[test]
fn deadline_arithmetic_saturates_at_never() {
    let fx = Fixture::new();
    let (t, n) = fx.counting_timer();
    let s = fx.group.timer(ClockType::Virtual, Scale::S, || ());
    s.arm(u64::MAX / 1_000); // overflows when scaled
    assert_eq!(s.expire_time_ns(), Some(u64::MAX));
    fx.advance_ns(10);
    t.arm_after(Duration::MAX);
    assert_eq!(t.expire_time_ns(), Some(u64::MAX));
    // u64::MAX is "never": armed, but no deadline, and not even a saturated clock reaches it.
    assert!(t.is_pending());
    assert_eq!(fx.group.deadline(), None);
    fx.clock.advance(Duration::MAX);
    assert_eq!(fx.now(), u64::MAX - 1);
    assert!(!fx.group.run_expired());
    assert_eq!(n.load(Ordering::SeqCst), 0);
    // A deadline one short of never does come due on the saturated clock.
    t.arm_ns(u64::MAX - 1);
    assert_eq!(fx.group.deadline_ns(), Some(0));
    assert!(fx.group.run_expired());
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

#[test]
fn arm_after_is_relative_to_the_timers_clock() {
    let fx = Fixture::new();
    fx.advance_ns(1_000);
    let (t, _) = fx.counting_timer();
    t.arm_after(Duration::from_nanos(500));
    assert_eq!(t.expire_time_ns(), Some(1_500));
}

#[test]
fn handle_properties() {
    let fx = Fixture::new();
    let t = fx
        .group
        .timer_with_attrs(ClockType::VirtualRt, Scale::US, TimerAttrs::EXTERNAL, || ());
    assert_eq!(t.clock(), ClockType::VirtualRt);
    assert_eq!(t.attrs(), TimerAttrs::EXTERNAL);
    let r = t.handle();
    assert_eq!(
        (r.clock(), r.scale(), r.attrs()),
        (t.clock(), t.scale(), t.attrs())
    );
    r.arm(5);
    assert_eq!(t.expire_time_ns(), Some(5_000));
    let dbg = format!("{t:?} {r:?} {:?} {:?}", fx.group, fx.clock);
    assert!(dbg.contains("VirtualRt") && dbg.contains("5000"), "{dbg}");
}

#[test]
fn handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<timers::Timer>();
    send_sync::<timers::TimerRef>();
    send_sync::<timers::TimerListGroup>();
    send_sync::<timers::VirtualClock>();
}

/// The group's "anything armed?" shortcut follows every list going empty or non-empty: the
/// deadline and the runs stay right as timers of two clocks come and go.
#[test]
fn deadline_and_runs_follow_lists_emptying_and_filling() {
    let fx = Fixture::new();
    let (virt, n) = fx.counting_timer();
    let host = fx.group.timer(ClockType::Host, Scale::NS, || {});
    assert_eq!(fx.group.deadline_ns(), None);
    virt.arm_ns(fx.now() + 100);
    host.arm_after(Duration::from_secs(3600));
    assert_eq!(
        fx.group.deadline_ns(),
        Some(100),
        "the virtual timer is the earliest"
    );
    virt.cancel();
    let host_left = fx
        .group
        .deadline_ns()
        .expect("the host timer is still armed");
    assert!(host_left > 3_000_000_000_000, "{host_left}");
    host.cancel();
    assert_eq!(fx.group.deadline_ns(), None, "both lists are empty again");
    assert!(!fx.group.run_expired());
    virt.arm_ns(fx.now());
    assert_eq!(fx.group.deadline_ns(), Some(0));
    assert!(fx.group.run_expired(), "a list that filled again runs");
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert_eq!(
        fx.group.deadline_ns(),
        None,
        "and empties again once its timer fired"
    );
}
