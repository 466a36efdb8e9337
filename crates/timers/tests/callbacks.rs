//! What callbacks may do during `run_expired`: re-arm themselves (to the future: once per run;
//! to the past: again in the same run), cancel or arm other timers, drop their own timer, run a
//! nested `run_expired`, and panic.

mod util;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use timers::{ClockType, Scale, Timer, TimerListGroup, TimerRef};
use util::{Drops, Fixture, Log};

/// A timer whose callback gets its own `TimerRef` and the number of its call (1, 2, ...).
fn self_aware_timer(
    group: &TimerListGroup,
    mut f: impl FnMut(&TimerRef, usize) + Send + 'static,
) -> (Timer, Arc<AtomicUsize>) {
    let me: Arc<OnceLock<TimerRef>> = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let (m, c) = (me.clone(), calls.clone());
    let t = group.timer(ClockType::Virtual, Scale::NS, move || {
        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
        f(m.get().expect("handle set before arming"), n);
    });
    me.set(t.handle()).unwrap();
    (t, calls)
}

#[test]
fn rearm_to_the_future_runs_once_per_call() {
    let fx = Fixture::new();
    let (t, calls) = self_aware_timer(&fx.group, |me, _| me.arm_ns(me.now_ns() + 10));
    t.arm_ns(10);
    fx.advance_ns(10);
    assert!(fx.group.run_expired());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(t.expire_time_ns(), Some(20));
    assert!(!fx.group.run_expired());
    // Far past several periods: still once per call, re-armed relative to the reading.
    fx.advance_ns(1_000);
    assert!(fx.group.run_expired());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(t.expire_time_ns(), Some(1_020));
}

#[test]
fn rearm_to_the_past_runs_again_in_the_same_call() {
    let fx = Fixture::new();
    // Re-arms at the reading itself (a stopped clock) for its first four calls: QEMU runs such
    // a timer again within the same call, and so do we. The bound keeps the test finite.
    let (t, calls) = self_aware_timer(&fx.group, |me, n| {
        if n < 5 {
            me.arm_ns(me.now_ns());
        }
    });
    t.arm_ns(0);
    assert!(fx.group.run_expired());
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    assert!(!t.is_pending());
    assert!(!fx.group.run_expired());
}

#[test]
fn own_timer_is_disarmed_while_its_callback_runs() {
    let fx = Fixture::new();
    let seen = Arc::new(Mutex::new(None));
    let s = seen.clone();
    let (t, _) = self_aware_timer(&fx.group, move |me, _| {
        *s.lock().unwrap() = Some((me.is_pending(), me.expire_time_ns()));
    });
    t.arm_ns(0);
    fx.group.run_expired();
    assert_eq!(*seen.lock().unwrap(), Some((false, None)));
}

#[test]
fn callback_cancels_another_due_timer() {
    let fx = Fixture::new();
    let log = Log::default();
    let b = Arc::new(fx.logging_timer(&log, 1));
    let b2 = b.clone();
    let l = log.clone();
    let a = fx.group.timer(ClockType::Virtual, Scale::NS, move || {
        l.push(0);
        b2.cancel();
    });
    a.arm_ns(10);
    b.arm_ns(10); // due together with a, behind it
    fx.advance_ns(10);
    assert!(fx.group.run_expired());
    assert_eq!(log.take(), [0]);
    assert!(!b.is_pending());
    assert!(!fx.group.run_expired());
}

#[test]
fn callback_arms_others_due_now_and_later() {
    let fx = Fixture::new();
    let log = Log::default();
    let now_t = Arc::new(fx.logging_timer(&log, 1));
    let later_t = Arc::new(fx.logging_timer(&log, 2));
    let (n, l2) = (now_t.clone(), later_t.clone());
    let l = log.clone();
    let a = fx.group.timer(ClockType::Virtual, Scale::NS, move || {
        l.push(0);
        n.arm_ns(n.now_ns()); // due at the reading: runs in this call
        l2.arm_ns(l2.now_ns() + 1); // not yet
    });
    a.arm_ns(100);
    fx.advance_ns(100);
    assert!(fx.group.run_expired());
    assert_eq!(log.take(), [0, 1]);
    assert!(later_t.is_pending());
    fx.advance_ns(1);
    assert!(fx.group.run_expired());
    assert_eq!(log.take(), [2]);
}

#[test]
fn callback_drops_its_own_timer() {
    let fx = Fixture::new();
    let drops = Drops::default();
    let slot: Arc<Mutex<Option<Timer>>> = Arc::default();
    let s = slot.clone();
    let token = drops.token();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let t = fx.group.timer(ClockType::Virtual, Scale::NS, move || {
        let _keep = &token;
        c.fetch_add(1, Ordering::SeqCst);
        // Dropping the owning handle from inside: the callback itself is freed after it returns.
        drop(s.lock().unwrap().take());
    });
    t.arm_ns(0);
    *slot.lock().unwrap() = Some(t);
    assert!(fx.group.run_expired());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(drops.count(), 1);
    assert_eq!(fx.group.timer_count(), 0);
    // The freed slot is reusable.
    let (t2, n2) = fx.counting_timer();
    t2.arm_ns(0);
    assert!(fx.group.run_expired());
    assert_eq!(n2.load(Ordering::SeqCst), 1);
}

#[test]
fn callback_creates_and_arms_a_new_timer() {
    let fx = Arc::new(Fixture::new());
    let log = Log::default();
    let created: Arc<Mutex<Vec<Timer>>> = Arc::default();
    let (l, c) = (log.clone(), created.clone());
    let weak = Arc::downgrade(&fx);
    let a = fx.group.timer(ClockType::Virtual, Scale::NS, move || {
        let fx = weak.upgrade().unwrap();
        let t = fx.logging_timer(&l, 7);
        t.arm_ns(fx.now());
        c.lock().unwrap().push(t);
    });
    a.arm_ns(0);
    assert!(fx.group.run_expired());
    assert_eq!(log.take(), [7]);
}

/// A callback that re-arms itself into the past and then runs a nested iteration: the nested
/// run fires the other due timer, and the outer run fires the re-armed one after the callback
/// returns (it cannot enter a callback that is still running).
#[test]
fn nested_run_from_a_callback() {
    let fx = Arc::new(Fixture::new());
    let log = Log::default();
    let weak = Arc::downgrade(&fx);
    let l = log.clone();
    let nested_result = Arc::new(Mutex::new(None));
    let r = nested_result.clone();
    let (a, calls) = self_aware_timer(&fx.group, move |me, n| {
        l.push(0);
        if n == 1 {
            me.arm_ns(0);
            let fx = weak.upgrade().unwrap();
            *r.lock().unwrap() = Some(fx.group.run_expired());
            // Still armed: the nested run set it aside and put it back.
            assert_eq!(me.expire_time_ns(), Some(0));
        }
    });
    let b = fx.logging_timer(&log, 1);
    a.arm_ns(0);
    b.arm_ns(0);
    assert!(fx.group.run_expired());
    assert_eq!(*nested_result.lock().unwrap(), Some(true));
    assert_eq!(log.take(), [0, 1, 0]);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(fx.group.armed_count(), 0);
}

#[test]
fn panicking_callback_leaves_the_group_usable() {
    let fx = Fixture::new();
    let log = Log::default();
    let (a, calls) = self_aware_timer(&fx.group, |_, n| {
        if n == 1 {
            panic!("first call panics (expected by the test)");
        }
    });
    let b = fx.logging_timer(&log, 1);
    a.arm_ns(0);
    b.arm_ns(0);
    let result = catch_unwind(AssertUnwindSafe(|| fx.group.run_expired()));
    assert!(result.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(!a.is_pending());
    // b was behind a: still armed, and runs next time.
    assert!(b.is_pending());
    assert!(fx.group.run_expired());
    assert_eq!(log.take(), [1]);
    // a's callback survived the panic.
    a.arm_ns(0);
    assert!(fx.group.run_expired());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
