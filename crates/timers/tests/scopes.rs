//! Isolation scopes (`TimerListGroup::set_scope`, for `aio_core::AioContext::isolated`): while
//! a scope is innermost, armed timers of lower scopes are held (out of the deadline, never
//! run), keep their deadlines and order, and fire once the scope ends; timers of the scope, and
//! of scopes that ended inside it, run. On a stopped virtual clock: no sleeps.

mod util;

use util::{Fixture, Log};

#[test]
fn outer_timers_are_held_and_fire_in_order_after_the_scope() {
    let fx = Fixture::new();
    let log = Log::default();
    let outer: Vec<_> = (0..3).map(|i| fx.logging_timer(&log, i)).collect();
    outer[0].arm_ns(30);
    outer[1].arm_ns(10);
    fx.group.set_scope(5);
    // Armed while held: held too.
    outer[2].arm_ns(20);
    let inner = fx.logging_timer(&log, 9);
    inner.arm_ns(50);
    assert!(outer[1].is_pending(), "held timers stay armed");
    assert_eq!(outer[1].expire_time_ns(), Some(10));
    // Only the scope's own timer counts for the deadline.
    assert_eq!(fx.group.deadline_ns(), Some(50));
    fx.advance_ns(60);
    assert!(fx.group.run_expired());
    assert_eq!(log.take(), [9]);
    assert_eq!(
        fx.group.deadline_ns(),
        None,
        "held timers never shorten the wait"
    );
    assert!(!fx.group.run_expired());
    fx.group.set_scope(0);
    assert_eq!(fx.group.deadline_ns(), Some(0));
    assert!(fx.group.run_expired());
    assert_eq!(log.take(), [1, 2, 0]);
}

#[test]
fn nested_scopes_and_ended_scopes() {
    let fx = Fixture::new();
    let log = Log::default();
    let root = fx.logging_timer(&log, 0);
    fx.group.set_scope(1);
    let one = fx.logging_timer(&log, 1);
    fx.group.set_scope(2);
    let two = fx.logging_timer(&log, 2);
    fx.group.set_scope(3);
    // Scope 3 ends at once: what it created belongs to scope 2.
    let three = fx.logging_timer(&log, 3);
    fx.group.set_scope(2);
    for t in [&root, &one, &two, &three] {
        t.arm_ns(10);
    }
    fx.advance_ns(10);
    fx.group.run_expired();
    assert_eq!(log.take(), [2, 3]);
    fx.group.set_scope(1);
    fx.group.run_expired();
    assert_eq!(log.take(), [1]);
    fx.group.set_scope(0);
    fx.group.run_expired();
    assert_eq!(log.take(), [0]);
}

#[test]
fn held_timers_can_be_cancelled_rearmed_and_dropped() {
    let fx = Fixture::new();
    let log = Log::default();
    let a = fx.logging_timer(&log, 0);
    let b = fx.logging_timer(&log, 1);
    let c = fx.logging_timer(&log, 2);
    a.arm_ns(10);
    b.arm_ns(10);
    c.arm_ns(10);
    fx.group.set_scope(1);
    a.cancel();
    assert!(!a.is_pending());
    b.arm_ns(5);
    drop(c);
    assert_eq!(fx.group.armed_count(), 1);
    fx.advance_ns(20);
    assert!(!fx.group.run_expired());
    fx.group.set_scope(0);
    assert!(fx.group.run_expired());
    assert_eq!(log.take(), [1]);
}
