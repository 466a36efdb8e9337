//! Lifetimes: dropping a timer cancels and frees it, dropping the group runs nothing and frees
//! every callback (even ones that own their timer), handles outliving their timer or group are
//! harmless no-ops, and a stale `TimerRef` never reaches a newer timer in the same slot.

mod util;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use timers::{ClockType, Scale, Timer};
use util::{Drops, Fixture};

#[test]
fn dropping_the_handle_cancels_and_frees() {
    let fx = Fixture::new();
    let drops = Drops::default();
    let ran = Arc::new(AtomicUsize::new(0));
    let (token, r) = (drops.token(), ran.clone());
    let t = fx.group.timer(ClockType::Virtual, Scale::NS, move || {
        let _keep = &token;
        r.fetch_add(1, Ordering::SeqCst);
    });
    t.arm_ns(10);
    assert_eq!((fx.group.timer_count(), fx.group.armed_count()), (1, 1));
    drop(t);
    assert_eq!(drops.count(), 1);
    assert_eq!((fx.group.timer_count(), fx.group.armed_count()), (0, 0));
    assert_eq!(fx.group.deadline(), None);
    fx.advance_ns(10);
    assert!(!fx.group.run_expired());
    assert_eq!(ran.load(Ordering::SeqCst), 0);
}

#[test]
fn dropping_the_group_runs_nothing_and_frees_every_callback() {
    let fx = Fixture::new();
    let drops = Drops::default();
    let ran = Arc::new(AtomicUsize::new(0));
    let mut timers = Vec::new();
    for (i, clock) in ClockType::ALL.into_iter().cycle().take(8).enumerate() {
        let (token, r) = (drops.token(), ran.clone());
        let t = fx.group.timer(clock, Scale::NS, move || {
            let _keep = &token;
            r.fetch_add(1, Ordering::SeqCst);
        });
        if i % 4 != 3 {
            t.arm_ns(0); // due, even
        }
        timers.push(t);
    }
    assert_eq!(fx.group.armed_count(), 6);
    let Fixture { clock, group, .. } = fx;
    drop(group);
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    assert_eq!(drops.count(), 8);

    // The handles outlive the group: every operation is a harmless no-op.
    for t in &timers {
        t.arm_ns(5);
        t.arm_if_earlier_ns(1);
        t.arm_after(std::time::Duration::from_secs(1));
        assert!(!t.is_pending());
        assert_eq!(t.expire_time_ns(), None);
        t.handle().arm_ns(3);
        t.cancel();
    }
    clock.advance(std::time::Duration::from_secs(10));
    drop(timers);
    assert_eq!(drops.count(), 8, "no callback is dropped twice");
    assert_eq!(ran.load(Ordering::SeqCst), 0);
}

#[test]
fn group_drop_frees_callbacks_that_own_their_timer() {
    let fx = Fixture::new();
    let drops = Drops::default();
    let cell: Arc<Mutex<Option<Timer>>> = Arc::default();
    let weak = Arc::downgrade(&cell);
    let (c, token) = (cell.clone(), drops.token());
    let t = fx.group.timer(ClockType::Virtual, Scale::NS, move || {
        let _keep = (&c, &token);
    });
    t.arm_ns(100);
    *cell.lock().unwrap() = Some(t);
    drop(cell); // now only the callback keeps its own timer: a cycle
    assert_eq!(drops.count(), 0);
    drop(fx);
    assert_eq!(drops.count(), 1);
    assert!(weak.upgrade().is_none(), "the cycle was broken");
}

#[test]
fn stale_timer_ref_does_not_touch_a_newer_timer() {
    let fx = Fixture::new();
    let (t1, _) = fx.counting_timer();
    let r1 = t1.handle();
    r1.arm_ns(10);
    assert!(t1.is_pending());
    drop(t1);
    assert!(!r1.is_pending());
    let (t2, n2) = fx.counting_timer(); // reuses the freed slot
    r1.arm_ns(0);
    r1.arm_if_earlier_ns(0);
    assert!(!t2.is_pending());
    t2.arm_ns(50);
    r1.cancel();
    assert_eq!(t2.expire_time_ns(), Some(50));
    assert_eq!(r1.expire_time_ns(), None);
    fx.advance_ns(50);
    assert!(fx.group.run_expired());
    assert_eq!(n2.load(Ordering::SeqCst), 1);
}

#[test]
fn timer_ref_works_while_the_timer_lives() {
    let fx = Fixture::new();
    let (t, n) = fx.counting_timer();
    let r = t.handle();
    let r2 = r.clone();
    r.arm_ns(5);
    assert_eq!(t.expire_time_ns(), Some(5));
    r2.cancel();
    assert!(!t.is_pending());
    r2.arm_if_earlier_ns(7);
    fx.advance_ns(7);
    assert!(fx.group.run_expired());
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

#[test]
fn timers_on_a_dropped_group_do_not_notify() {
    let clock = timers::VirtualClock::new();
    let (group, notifies) = util::group_on(&clock);
    let t = group.timer(ClockType::Virtual, Scale::NS, || ());
    drop(group);
    t.arm_ns(0); // would be the head of an empty list, but the list is gone
    clock.advance(std::time::Duration::from_secs(1));
    assert_eq!(notifies.load(Ordering::SeqCst), 0);
}

#[test]
fn a_group_handle_creates_timers_from_another_thread_and_inert_ones_after_the_group() {
    let fx = Fixture::new();
    let handle = fx.group.handle();
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    // Created and armed on another thread, run by the group's owner.
    let t = {
        let handle = handle.clone();
        std::thread::spawn(move || {
            let t = handle.timer(ClockType::Virtual, Scale::NS, move || {
                r.fetch_add(1, Ordering::SeqCst);
            });
            t.arm_ns(5);
            t
        })
        .join()
        .unwrap()
    };
    assert_eq!(fx.notified(), 1, "it became the head of its list");
    assert_eq!(fx.group.armed_count(), 1);
    fx.advance_ns(5);
    assert!(fx.group.run_expired());
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    assert!(handle.is_alive());
    drop(t);

    // After the group: the callback is dropped at once and the timer does nothing.
    let Fixture { clock, group, .. } = fx;
    drop(group);
    assert!(!handle.is_alive());
    let drops = Drops::default();
    let token = drops.token();
    let inert = handle.timer(ClockType::Virtual, Scale::NS, move || {
        let _keep = &token;
    });
    assert_eq!(
        drops.count(),
        1,
        "the callback of a timer on a dead group is dropped at once"
    );
    inert.arm_ns(1);
    assert!(!inert.is_pending());
    clock.advance(std::time::Duration::from_nanos(10));
    drop(inert);
}
