//! Clock behaviour seen through a group: a disabled virtual clock gives no deadline and runs
//! nothing, enabling and advancing notify, VirtualRt ignores the enabled flag, disabling from a
//! callback stops the run, disabling waits for a run on another thread, the real clocks, and
//! the clocks read from other threads (`Clocks`, `GroupHandle::now_ns`).

mod util;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use timers::{ClockType, Scale, TimerListGroup, VirtualClock};
use util::{Fixture, Log, group_on};

#[test]
fn disabled_clock_has_no_deadline_and_runs_nothing() {
    let fx = Fixture::disabled();
    assert!(!fx.group.is_enabled(ClockType::Virtual));
    let (t, n) = fx.counting_timer();
    t.arm_ns(10);
    assert_eq!(
        fx.notified(),
        1,
        "arming notifies even on a disabled clock, as in QEMU"
    );
    assert_eq!(fx.group.deadline(), None);
    fx.advance_ns(100);
    assert!(!fx.group.run_expired());
    assert_eq!(n.load(Ordering::SeqCst), 0);
    assert!(t.is_pending());

    fx.clock.enable();
    assert_eq!(fx.notified(), 2, "enabling notifies");
    assert_eq!(fx.group.deadline(), Some(Duration::ZERO));
    assert!(fx.group.run_expired());
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

#[test]
fn enabling_notifies_every_group_on_the_clock_once() {
    let clock = VirtualClock::new_disabled();
    let (g1, n1) = group_on(&clock);
    let (g2, n2) = group_on(&clock);
    let (other, n3) = group_on(&VirtualClock::new_disabled());
    clock.enable();
    assert_eq!(n1.load(Ordering::SeqCst), 1);
    assert_eq!(n2.load(Ordering::SeqCst), 1);
    assert_eq!(n3.load(Ordering::SeqCst), 0);
    clock.enable(); // already enabled: nothing
    assert_eq!(n1.load(Ordering::SeqCst), 1);
    drop(g2); // a dropped group is forgotten by the clock
    clock.disable();
    clock.enable();
    assert_eq!(n1.load(Ordering::SeqCst), 2);
    assert_eq!(n2.load(Ordering::SeqCst), 1);
    drop((g1, other));
}

#[test]
fn advance_notifies_groups_with_armed_timers() {
    let fx = Fixture::new();
    fx.advance_ns(10);
    assert_eq!(fx.notified(), 0, "nothing armed: nothing to wake for");
    let (t, _) = fx.counting_timer();
    t.arm_ns(1_000);
    assert_eq!(fx.notified(), 1);
    fx.advance_ns(10);
    assert_eq!(fx.notified(), 2);
    fx.clock.disable();
    fx.advance_ns(10);
    assert_eq!(fx.notified(), 2, "a disabled Virtual list is not woken");
}

#[test]
fn virtual_rt_ignores_the_enabled_flag() {
    let fx = Fixture::disabled();
    let log = Log::default();
    let l = log.clone();
    let rt = fx
        .group
        .timer(ClockType::VirtualRt, Scale::NS, move || l.push(1));
    rt.arm_ns(10);
    assert_eq!(fx.group.deadline_ns(), Some(10));
    fx.advance_ns(10);
    assert!(fx.group.run_expired());
    assert_eq!(log.take(), [1]);
    assert!(fx.group.is_enabled(ClockType::VirtualRt));
}

#[test]
fn disabling_from_a_callback_stops_the_run() {
    let fx = Fixture::new();
    let log = Log::default();
    let clock = fx.clock.clone();
    let l = log.clone();
    let a = fx.group.timer(ClockType::Virtual, Scale::NS, move || {
        l.push(0);
        clock.disable(); // must not wait for the run it is called from
    });
    let b = fx.logging_timer(&log, 1);
    a.arm_ns(0);
    b.arm_ns(0);
    assert!(fx.group.run_expired());
    assert_eq!(log.take(), [0]);
    assert!(b.is_pending());
    fx.clock.enable();
    assert!(fx.group.run_expired());
    assert_eq!(log.take(), [1]);
}

#[test]
fn disable_waits_for_a_run_on_another_thread() {
    let clock = VirtualClock::new();
    let (group, _) = group_on(&clock);
    let group = Arc::new(group);
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let callback_done = Arc::new(AtomicBool::new(false));
    let done = callback_done.clone();
    let t = group.timer(ClockType::Virtual, Scale::NS, move || {
        started_tx.send(()).unwrap();
        release_rx.recv().unwrap();
        done.store(true, Ordering::SeqCst);
    });
    t.arm_ns(0);
    let g = group.clone();
    let runner = std::thread::spawn(move || g.run_expired());
    started_rx.recv().unwrap();

    let c = clock.clone();
    let d = callback_done.clone();
    let disabler = std::thread::spawn(move || {
        c.disable();
        // disable() returns only after the callback on the other thread finished.
        d.load(Ordering::SeqCst)
    });
    // Give the disabler time to block in disable(); the check above holds either way, the
    // pause only makes it meaningful.
    std::thread::sleep(Duration::from_millis(50));
    release_tx.send(()).unwrap();
    assert!(disabler.join().unwrap());
    assert!(runner.join().unwrap());
    assert!(!group.is_enabled(ClockType::Virtual));
}

#[test]
fn manual_clock_can_stand_in_for_realtime() {
    let clock = VirtualClock::new_disabled(); // Realtime does not care
    let group = TimerListGroup::builder()
        .manual_clock(ClockType::Realtime, clock.clone())
        .build(Arc::new(|| ()));
    let log = Log::default();
    let l = log.clone();
    let t = group.timer(ClockType::Realtime, Scale::MS, move || l.push(0));
    t.arm(750);
    assert_eq!(group.deadline(), Some(Duration::from_millis(750)));
    clock.advance(Duration::from_millis(750));
    assert!(group.run_expired());
    assert_eq!(log.take(), [0]);
}

#[test]
fn default_clocks_read_real_time() {
    let group = TimerListGroup::new(Arc::new(|| ()));
    let before = timers::realtime_ns();
    let now = group.now_ns(ClockType::Realtime);
    assert!(now >= before && now <= timers::realtime_ns());
    let host = group.now_ns(ClockType::Host);
    assert!(host.abs_diff(timers::host_ns()) < 60_000_000_000);
    assert_eq!(
        group.now_ns(ClockType::Virtual),
        VirtualClock::global().now_ns()
    );
    // A Realtime timer due now fires; one an hour out does not.
    let log = Log::default();
    let (l1, l2) = (log.clone(), log.clone());
    let due = group.timer(ClockType::Realtime, Scale::NS, move || l1.push(1));
    let later = group.timer(ClockType::Host, Scale::S, move || l2.push(2));
    due.arm_ns(due.now_ns());
    later.arm(later.now() + 3_600);
    assert!(group.run_expired());
    assert_eq!(log.take(), [1]);
    assert!(later.is_pending());
}

#[test]
fn clocks_read_from_another_thread_match_the_group_and_outlive_it() {
    let clock = VirtualClock::new();
    let group = TimerListGroup::builder()
        .virtual_clock(clock.clone())
        .build(Arc::new(|| ()));
    let (clocks, handle) = (group.clocks(), group.handle());
    clock.advance_ns(1_234);
    let (virt, virt_rt, real, host, enabled) = std::thread::spawn(move || {
        assert_eq!(handle.now_ns(ClockType::Virtual), 1_234);
        (
            clocks.now_ns(ClockType::Virtual),
            clocks.now_ns(ClockType::VirtualRt),
            clocks.now_ns(ClockType::Realtime),
            clocks.now_ns(ClockType::Host),
            clocks.is_enabled(ClockType::Virtual),
        )
    })
    .join()
    .unwrap();
    assert_eq!((virt, virt_rt), (1_234, 1_234));
    assert!(real <= group.now_ns(ClockType::Realtime));
    assert!(host.abs_diff(group.now_ns(ClockType::Host)) < 60_000_000_000);
    assert_eq!(enabled, group.is_enabled(ClockType::Virtual));

    // A deadline computed from another thread's reading is on the timer's own scale.
    let log = Log::default();
    let l = log.clone();
    let t = group.timer(ClockType::Virtual, Scale::NS, move || l.push(7));
    let clocks = group.clocks();
    let deadline = std::thread::spawn(move || clocks.now_ns(ClockType::Virtual) + 10)
        .join()
        .unwrap();
    t.arm_ns(deadline);
    clock.advance_ns(9);
    assert!(!group.run_expired());
    clock.advance_ns(1);
    assert!(group.run_expired());
    assert_eq!(log.take(), [7]);

    // Which clock is program-driven, and the readings after the group is gone.
    let (clocks, handle) = (group.clocks(), group.handle());
    assert!(clocks.virtual_clock(ClockType::Realtime).is_none());
    let vc = clocks.virtual_clock(ClockType::VirtualRt).unwrap();
    assert_eq!(vc.now_ns(), clock.now_ns());
    drop((t, group));
    clock.advance_ns(5);
    assert!(!handle.is_alive());
    assert_eq!(handle.now_ns(ClockType::Virtual), 1_234 + 10 + 5);
    assert_eq!(clocks.now_ns(ClockType::Virtual), 1_234 + 10 + 5);
}

#[test]
fn a_builder_tells_its_clocks_before_the_group_exists() {
    let clock = VirtualClock::new();
    clock.advance_ns(42);
    let builder = TimerListGroup::builder().manual_clock(ClockType::Host, clock.clone());
    let clocks = builder.clocks();
    assert_eq!(clocks.now_ns(ClockType::Host), 42);
    assert_eq!(
        clocks.now_ns(ClockType::Virtual),
        VirtualClock::global().now_ns()
    );
    let group = builder.build(Arc::new(|| ()));
    clock.advance_ns(1);
    assert_eq!(
        clocks.now_ns(ClockType::Host),
        group.now_ns(ClockType::Host)
    );
    assert!(format!("{clocks:?}").contains("host_ns: 43"));
}
