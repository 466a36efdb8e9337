//! Timers in the loop, deterministically: a context whose timers read a private
//! [`VirtualClock`], so that deadlines are reached by advancing the clock, not by sleeping.
//! Also the dispatch order within one iteration (BHs, then fd handlers, then timers), the
//! system-call cost of an armed timer, and the timer-slack option.

use aio::{AioContext, Builder, ClockType, GroupBuilder, Scale, VirtualClock};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::Duration;

/// A context on the default backend whose Virtual clock is `clock`.
fn virtual_context(clock: &VirtualClock) -> AioContext {
    Builder::new()
        .ignore_env()
        .clocks(GroupBuilder::new().virtual_clock(clock.clone()))
        .build()
        .unwrap()
}

fn counter() -> (Arc<AtomicU32>, impl FnMut() + Send + 'static) {
    let n = Arc::new(AtomicU32::new(0));
    let c = n.clone();
    (n, move || {
        c.fetch_add(1, SeqCst);
    })
}

#[test]
fn a_virtual_timer_fires_exactly_at_its_deadline() {
    let clock = VirtualClock::new();
    let ctx = virtual_context(&clock);
    let (n, cb) = counter();
    let timer = ctx.timer(ClockType::Virtual, Scale::MS, cb);
    timer.arm(clock.now_ns() / 1_000_000 + 1_000); // 1 s of virtual time from now
    while ctx.poll_nonblocking() {}
    clock.advance(Duration::from_millis(999));
    assert!(!ctx.poll_nonblocking());
    assert_eq!(n.load(SeqCst), 0);
    clock.advance(Duration::from_nanos(999_999));
    assert!(!ctx.poll_nonblocking(), "1 ns early");
    clock.advance(Duration::from_nanos(1));
    assert!(ctx.poll_nonblocking(), "due exactly now fires");
    assert_eq!(n.load(SeqCst), 1);
    assert!(!ctx.poll_nonblocking());
    assert!(!timer.is_pending());
}

#[test]
fn a_new_virtual_clock_needs_no_enable() {
    // What a new user writes: a fresh clock, a timer, an advance. No `enable()` anywhere.
    let clock = VirtualClock::new();
    assert!(clock.is_enabled());
    let ctx = Builder::new()
        .clocks(GroupBuilder::new().virtual_clock(clock.clone()))
        .build()
        .unwrap();
    let (n, cb) = counter();
    let timer = ctx.timer(ClockType::Virtual, Scale::US, cb);
    timer.arm(5);
    assert_eq!(ctx.timers().deadline(), Some(Duration::from_micros(5)));
    clock.advance(Duration::from_micros(5));
    assert!(ctx.poll_nonblocking());
    assert_eq!(n.load(SeqCst), 1);
}

#[test]
fn a_clock_created_disabled_holds_its_timers_until_enabled() {
    let clock = VirtualClock::new_disabled();
    let ctx = virtual_context(&clock);
    assert!(!ctx.timers().is_enabled(ClockType::Virtual));
    let (n, cb) = counter();
    let (rt_n, rt_cb) = counter();
    let timer = ctx.timer(ClockType::Virtual, Scale::NS, cb);
    let rt = ctx.timer(ClockType::VirtualRt, Scale::NS, rt_cb);
    timer.arm_ns(10);
    rt.arm_ns(10);
    clock.advance(Duration::from_nanos(10));
    assert!(ctx.poll_nonblocking(), "VirtualRt ignores the flag");
    assert_eq!((n.load(SeqCst), rt_n.load(SeqCst)), (0, 1));
    assert_eq!(ctx.timers().deadline(), None);
    clock.enable();
    assert!(ctx.poll_nonblocking());
    assert_eq!(n.load(SeqCst), 1);
}

#[test]
fn a_disabled_clock_runs_nothing_and_adds_no_deadline() {
    let clock = VirtualClock::new();
    let ctx = virtual_context(&clock);
    let (n, cb) = counter();
    let timer = ctx.timer(ClockType::Virtual, Scale::NS, cb);
    timer.arm_ns(clock.now_ns() + 10);
    clock.disable();
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        ctx.timers().deadline(),
        None,
        "a disabled clock has no deadline"
    );
    assert!(!ctx.poll_nonblocking());
    assert_eq!(n.load(SeqCst), 0);
    clock.enable();
    assert!(ctx.poll_nonblocking());
    assert_eq!(n.load(SeqCst), 1);
}

#[test]
fn advancing_the_clock_from_another_thread_wakes_a_blocked_poll() {
    let clock = VirtualClock::new();
    let ctx = virtual_context(&clock);
    let (n, cb) = counter();
    let timer = ctx.timer(ClockType::Virtual, Scale::NS, cb);
    timer.arm_ns(clock.now_ns() + 1_000_000_000);
    while ctx.poll_nonblocking() {}
    let remote = clock.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        remote.advance(Duration::from_secs(1));
    });
    // Virtual time does not pass by itself: only the advance can end this sleep.
    while n.load(SeqCst) == 0 {
        ctx.poll();
    }
    t.join().unwrap();
    assert_eq!(n.load(SeqCst), 1);
}

#[test]
fn one_iteration_runs_bhs_then_handlers_then_timers() {
    let clock = VirtualClock::new();
    let ctx = virtual_context(&clock);
    let order: Arc<std::sync::Mutex<Vec<&'static str>>> = Arc::default();
    let o = order.clone();
    let timer = ctx.timer(ClockType::Virtual, Scale::NS, move || {
        o.lock().unwrap().push("timer")
    });
    timer.arm_ns(clock.now_ns());
    let notifier = Arc::new(aio::EventNotifier::new().unwrap());
    let o = order.clone();
    let _h = ctx
        .set_event_notifier(&notifier, move |e| {
            e.test_and_clear();
            o.lock().unwrap().push("fd");
        })
        .unwrap();
    let o = order.clone();
    ctx.schedule_oneshot(move || o.lock().unwrap().push("bh"));
    notifier.set().unwrap();
    assert!(ctx.poll_nonblocking());
    assert_eq!(*order.lock().unwrap(), ["bh", "fd", "timer"]);
}

#[test]
fn an_armed_timer_costs_a_nonblocking_poll_no_system_call() {
    let clock = VirtualClock::new();
    let ctx = virtual_context(&clock);
    let (_n, cb) = counter();
    let timer = ctx.timer(ClockType::Virtual, Scale::NS, cb);
    timer.arm_ns(clock.now_ns() + 1_000_000_000);
    while ctx.poll_nonblocking() {}
    let before = ctx.stats();
    for _ in 0..1000 {
        assert!(!ctx.poll_nonblocking());
    }
    let after = ctx.stats();
    assert_eq!(
        (after.waits, after.event_writes, after.event_drains),
        (before.waits, before.event_writes, before.event_drains),
        "no system call"
    );
    assert_eq!(after.iterations, before.iterations + 1000);
    assert_eq!(after.timer_calls, before.timer_calls, "nothing due");
}

#[test]
fn dropping_the_context_with_armed_timers_runs_nothing() {
    let clock = VirtualClock::new();
    let ctx = virtual_context(&clock);
    let (n, cb) = counter();
    let timer = ctx.timer(ClockType::Virtual, Scale::NS, cb);
    timer.arm_ns(clock.now_ns());
    drop(ctx);
    clock.advance(Duration::from_secs(1));
    timer.arm_ns(0); // arming after the context is gone is a no-op
    assert_eq!(n.load(SeqCst), 0);
    assert!(!timer.is_pending());
}

#[cfg(target_os = "linux")]
#[test]
fn the_builder_sets_the_home_thread_timer_slack() {
    std::thread::spawn(|| {
        let _ctx = Builder::new()
            .timer_slack(Duration::from_nanos(1))
            .build()
            .unwrap();
        // SAFETY: PR_GET_TIMERSLACK takes no pointer and returns the slack in ns.
        let slack = unsafe { libc::prctl(libc::PR_GET_TIMERSLACK, 0, 0, 0, 0) };
        assert_eq!(slack, 1);
    })
    .join()
    .unwrap();
}
