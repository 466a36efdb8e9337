//! When the group calls its notify callback: exactly when an arm makes a timer the head of its
//! list (from any thread), never on cancel, never from `run_expired` itself.

mod util;

use std::sync::Arc;

use timers::{ClockType, Scale};
use util::Fixture;

#[test]
fn notifies_exactly_when_a_timer_becomes_the_head() {
    let fx = Fixture::new();
    let (t1, _) = fx.counting_timer();
    let (t2, _) = fx.counting_timer();
    let (t3, _) = fx.counting_timer();
    assert_eq!(fx.notified(), 0, "creating timers does not notify");

    t1.arm_ns(100); // first timer: head
    assert_eq!(fx.notified(), 1);
    t2.arm_ns(200); // behind the head
    assert_eq!(fx.notified(), 1);
    t3.arm_ns(50); // new head
    assert_eq!(fx.notified(), 2);
    t3.arm_ns(50); // re-armed, still the head: QEMU notifies again
    assert_eq!(fx.notified(), 3);
    t2.arm_ns(100); // ties with t1 but armed later: behind it
    assert_eq!(fx.notified(), 3);
    t1.arm_if_earlier_ns(300); // no change
    assert_eq!(fx.notified(), 3);
    t2.arm_if_earlier_ns(10); // moves to the head
    assert_eq!(fx.notified(), 4);
    t2.arm_ns(1_000); // the head moves back: t3 is the head now, not t2
    assert_eq!(fx.notified(), 4);
}

#[test]
fn cancel_never_notifies() {
    let fx = Fixture::new();
    let (t1, _) = fx.counting_timer();
    let (t2, _) = fx.counting_timer();
    t1.arm_ns(10);
    t2.arm_ns(20);
    assert_eq!(fx.notified(), 1);
    t1.cancel(); // the head goes; t2 becomes the head without a notify
    t2.cancel();
    t2.cancel();
    drop(t1); // dropping cancels, silently too
    assert_eq!(fx.notified(), 1);
}

#[test]
fn each_clock_has_its_own_head() {
    let fx = Fixture::new();
    let v = fx.group.timer(ClockType::Virtual, Scale::NS, || ());
    let rt = fx.group.timer(ClockType::VirtualRt, Scale::NS, || ());
    v.arm_ns(10);
    rt.arm_ns(1_000); // later than v, but the head of its own list
    assert_eq!(fx.notified(), 2);
}

#[test]
fn running_timers_does_not_notify() {
    let fx = Fixture::new();
    let (t, _) = fx.counting_timer();
    t.arm_ns(0);
    assert_eq!(fx.notified(), 1);
    assert!(fx.group.run_expired());
    assert!(!fx.group.run_expired());
    assert_eq!(fx.notified(), 1);
}

#[test]
fn arming_from_another_thread_notifies() {
    let fx = Fixture::new();
    let (t, n) = fx.counting_timer();
    let t = Arc::new(t);
    let remote = t.clone();
    std::thread::spawn(move || remote.arm_ns(5)).join().unwrap();
    assert_eq!(fx.notified(), 1);
    let r = t.handle();
    std::thread::spawn(move || r.arm_ns(3)).join().unwrap();
    assert_eq!(fx.notified(), 2);
    fx.advance_ns(5);
    assert!(fx.group.run_expired());
    assert_eq!(n.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Four threads arm and cancel their own timers concurrently while this thread runs the
/// group; every timer left armed fires exactly once.
#[test]
fn concurrent_arm_and_cancel_from_many_threads() {
    const THREADS: usize = 4;
    // Under Miri, fewer timers per thread: the arms still interleave, only the count shrinks.
    const PER_THREAD: usize = if cfg!(miri) { 50 } else { 2_000 };
    let fx = Arc::new(Fixture::new());
    let mut handles = Vec::new();
    let mut counters = Vec::new();
    for k in 0..THREADS {
        let timers: Vec<_> = (0..PER_THREAD).map(|_| fx.counting_timer()).collect();
        counters.extend(timers.iter().map(|(_, n)| n.clone()));
        handles.push(std::thread::spawn(move || {
            for (i, (t, _)) in timers.iter().enumerate() {
                t.arm_ns(1_000 + (i * THREADS + k) as u64);
                if i % 2 == 1 {
                    t.cancel();
                }
            }
            timers
        }));
    }
    let mut fired = 0;
    for _ in 0..100 {
        // Nothing is due yet: the loop just polls concurrently with the arms.
        assert!(!fx.group.run_expired());
    }
    let timers: Vec<_> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert_eq!(fx.group.armed_count(), THREADS * PER_THREAD / 2);
    fx.advance_ns(1_000_000);
    assert!(fx.group.run_expired());
    for n in &counters {
        fired += n.load(std::sync::atomic::Ordering::SeqCst);
    }
    assert_eq!(fired, THREADS * PER_THREAD / 2);
    assert_eq!(fx.group.armed_count(), 0);
    drop(timers);
    assert_eq!(fx.group.timer_count(), 0);
}
