//! Firing order and firing time: deadline order, arming order among equal deadlines, a timer due
//! exactly now fires, a past deadline fires on the next run, and 10 000 random deadlines fire in
//! the order of a sorted reference. All on a stopped virtual clock: no sleeps.

mod util;

use util::{Fixture, Log, XorShift};

#[test]
fn equal_deadlines_fire_in_arming_order() {
    let fx = Fixture::new();
    let log = Log::default();
    let timers: Vec<_> = (0..5).map(|i| fx.logging_timer(&log, i)).collect();
    // Armed in the order 3, 1, 4, 0, 2, all at the same deadline.
    for i in [3, 1, 4, 0, 2] {
        timers[i].arm_ns(100);
    }
    fx.advance_ns(100);
    assert!(fx.group.run_expired());
    assert_eq!(log.take(), [3, 1, 4, 0, 2]);
}

#[test]
fn deadline_order_beats_arming_order() {
    let fx = Fixture::new();
    let log = Log::default();
    let timers: Vec<_> = (0..4).map(|i| fx.logging_timer(&log, i)).collect();
    timers[0].arm_ns(40);
    timers[1].arm_ns(10);
    timers[2].arm_ns(30);
    timers[3].arm_ns(20);
    fx.advance_ns(40);
    assert!(fx.group.run_expired());
    assert_eq!(log.take(), [1, 3, 2, 0]);
}

#[test]
fn rearming_to_the_same_deadline_moves_behind() {
    let fx = Fixture::new();
    let log = Log::default();
    let a = fx.logging_timer(&log, 0);
    let b = fx.logging_timer(&log, 1);
    a.arm_ns(50);
    b.arm_ns(50);
    a.arm_ns(50); // a fresh arm: behind b now
    fx.advance_ns(50);
    fx.group.run_expired();
    assert_eq!(log.take(), [1, 0]);
}

#[test]
fn timer_due_exactly_now_fires() {
    let fx = Fixture::new();
    fx.advance_ns(1_000);
    let (t, n) = fx.counting_timer();
    t.arm_ns(1_000);
    assert_eq!(fx.group.deadline_ns(), Some(0));
    assert!(fx.group.run_expired());
    assert_eq!(n.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(!t.is_pending());
}

#[test]
fn timer_one_ns_in_the_future_does_not_fire() {
    let fx = Fixture::new();
    let (t, n) = fx.counting_timer();
    t.arm_ns(1);
    assert_eq!(fx.group.deadline_ns(), Some(1));
    assert!(!fx.group.run_expired());
    assert_eq!(n.load(std::sync::atomic::Ordering::SeqCst), 0);
    fx.advance_ns(1);
    assert!(fx.group.run_expired());
    assert_eq!(n.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn past_deadline_fires_on_the_next_run() {
    let fx = Fixture::new();
    fx.advance_ns(5_000_000);
    let (t, n) = fx.counting_timer();
    t.arm_ns(10); // long gone
    assert!(t.is_pending());
    assert_eq!(fx.group.deadline(), Some(std::time::Duration::ZERO));
    assert!(fx.group.run_expired());
    assert_eq!(n.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(!fx.group.run_expired());
    assert_eq!(n.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn only_timers_due_at_the_reading_run() {
    let fx = Fixture::new();
    let log = Log::default();
    let timers: Vec<_> = (0..4).map(|i| fx.logging_timer(&log, i)).collect();
    for (i, t) in timers.iter().enumerate() {
        t.arm_ns(10 * (i as u64 + 1)); // 10, 20, 30, 40
    }
    fx.advance_ns(25);
    assert!(fx.group.run_expired());
    assert_eq!(log.take(), [0, 1]);
    assert_eq!(fx.group.deadline_ns(), Some(5));
    assert_eq!(fx.group.armed_count(), 2);
}

#[test]
fn deadline_is_exact_in_nanoseconds() {
    let fx = Fixture::new();
    let (t, _n) = fx.counting_timer();
    assert_eq!(fx.group.deadline(), None);
    t.arm_ns(1_234);
    assert_eq!(fx.group.deadline_ns(), Some(1_234));
    fx.advance_ns(1_000);
    assert_eq!(
        fx.group.deadline(),
        Some(std::time::Duration::from_nanos(234))
    );
    fx.advance_ns(1_000);
    assert_eq!(fx.group.deadline(), Some(std::time::Duration::ZERO));
}

#[test]
fn deadline_is_the_minimum_over_clocks() {
    use timers::{ClockType, Scale};
    let fx = Fixture::new();
    let v = fx.group.timer(ClockType::Virtual, Scale::MS, || ());
    let rt = fx.group.timer(ClockType::VirtualRt, Scale::MS, || ());
    v.arm(2_000);
    rt.arm(1_000);
    assert_eq!(fx.group.deadline_ns(), Some(1_000_000_000));
    rt.cancel();
    assert_eq!(fx.group.deadline_ns(), Some(2_000_000_000));
    // A real-time timer an hour out does not beat the virtual one two seconds out...
    let real = fx.group.timer(ClockType::Realtime, Scale::S, || ());
    real.arm_after(std::time::Duration::from_secs(3_600));
    assert_eq!(fx.group.deadline_ns(), Some(2_000_000_000));
    // ...but once the virtual one is gone it sets the deadline.
    v.cancel();
    let d = fx.group.deadline().unwrap();
    assert!(
        d > std::time::Duration::from_secs(3_599) && d <= std::time::Duration::from_secs(3_600)
    );
}

/// 10 000 timers at random deadlines with many ties, a fifth of them re-armed, fire in the
/// order of a reference sorted by (deadline, last arming).
#[test]
fn random_deadlines_fire_in_sorted_order() {
    // Under Miri, fewer timers: the ties and re-arms are the same, only the count shrinks.
    const N: usize = if cfg!(miri) { 200 } else { 10_000 };
    let fx = Fixture::new();
    let log = Log::default();
    let mut rng = XorShift::new(0x5eed_1234);
    let timers: Vec<_> = (0..N).map(|i| fx.logging_timer(&log, i)).collect();
    // (deadline, arming sequence) per timer, as the reference order.
    let mut key = vec![(0u64, 0usize); N];
    let mut seq = 0;
    for (i, t) in timers.iter().enumerate() {
        let d = rng.below(5_000); // ~2 timers per distinct deadline
        t.arm_ns(d);
        key[i] = (d, seq);
        seq += 1;
    }
    for _ in 0..N / 5 {
        let i = rng.below(N as u64) as usize;
        let d = rng.below(5_000);
        timers[i].arm_ns(d);
        key[i] = (d, seq);
        seq += 1;
    }
    let mut expected: Vec<usize> = (0..N).collect();
    expected.sort_by_key(|&i| key[i]);

    fx.advance_ns(5_000);
    assert!(fx.group.run_expired());
    assert_eq!(log.take(), expected);
    assert_eq!(fx.group.armed_count(), 0);
}
