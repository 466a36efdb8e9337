//! Port of QEMU's `/aio/timer/schedule` (tests/unit/test-aio.c; conformance case 25) at the
//! crate level, on a virtual clock instead of sleeping: a timer at +750 ms that re-arms itself
//! once, observed through `run_expired` and `deadline` where QEMU polls the context. Plus case 29:
//! a periodic re-arm never fires early.

mod util;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use timers::{ClockType, Scale, TimerRef};
use util::Fixture;

const PERIOD_NS: u64 = 750_000_000;

#[test]
fn timer_schedule() {
    let fx = Fixture::new();
    // QEMU's TimerTestData: n counts calls; the callback re-arms at now + 750 ms while n < max.
    let n = Arc::new(AtomicUsize::new(0));
    let max = 2;
    let me: Arc<OnceLock<TimerRef>> = Arc::default();
    let (c, m) = (n.clone(), me.clone());
    let timer = fx.group.timer(ClockType::Virtual, Scale::NS, move || {
        let count = c.fetch_add(1, Ordering::SeqCst) + 1;
        if count < max {
            let me = m.get().unwrap();
            me.arm_ns(me.now_ns() + PERIOD_NS);
        }
    });
    me.set(timer.handle()).unwrap();

    // 1. Arm at now + 750 ms: n == 0.
    timer.arm_ns(fx.now() + PERIOD_NS);
    assert_eq!(n.load(Ordering::SeqCst), 0);
    assert_eq!(fx.notified(), 1);

    // 2. A non-blocking iteration makes no progress.
    assert!(!fx.group.run_expired());
    assert_eq!(n.load(Ordering::SeqCst), 0);

    // 3. "Sleep" 1 s without running: nothing happens outside run_expired.
    fx.clock.advance(Duration::from_secs(1));
    assert_eq!(n.load(Ordering::SeqCst), 0);

    // 4. The next iteration runs it; the callback re-arms at now + 750 ms.
    assert!(fx.group.run_expired());
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert_eq!(timer.expire_time_ns(), Some(1_000_000_000 + PERIOD_NS));

    // 5. Drained: no progress.
    assert!(!fx.group.run_expired());
    assert_eq!(n.load(Ordering::SeqCst), 1);

    // 6. A blocking iteration would sleep exactly 750 ms, then run it.
    assert_eq!(fx.group.deadline(), Some(Duration::from_nanos(PERIOD_NS)));
    fx.clock.advance(fx.group.deadline().unwrap());
    assert!(fx.group.run_expired());
    assert_eq!(n.load(Ordering::SeqCst), 2);

    // 7. max reached: no re-arm, no progress, nothing to wait for.
    assert!(!fx.group.run_expired());
    assert_eq!(n.load(Ordering::SeqCst), 2);
    assert!(!timer.is_pending());
    assert_eq!(fx.group.deadline(), None);
}

/// Conformance case 29: after the second firing of a timer re-armed at `now + period`, the
/// clock is past the first deadline plus the period.
#[test]
fn periodic_rearm_never_fires_early() {
    let fx = Fixture::new();
    let me: Arc<OnceLock<TimerRef>> = Arc::default();
    let fired_at: Arc<Vec<AtomicU64>> = Arc::new((0..2).map(|_| AtomicU64::new(0)).collect());
    let calls = Arc::new(AtomicUsize::new(0));
    let (m, f, c) = (me.clone(), fired_at.clone(), calls.clone());
    let timer = fx.group.timer(ClockType::Virtual, Scale::MS, move || {
        let i = c.fetch_add(1, Ordering::SeqCst);
        let me = m.get().unwrap();
        f[i.min(1)].store(me.now_ns(), Ordering::SeqCst);
        if i == 0 {
            me.arm(me.now() + 750);
        }
    });
    me.set(timer.handle()).unwrap();
    timer.arm(750);
    let first_deadline = timer.expire_time_ns().unwrap();
    // Step the clock in uneven 100 ms slices, running after each, as a loop would.
    while calls.load(Ordering::SeqCst) < 2 {
        fx.clock.advance(Duration::from_millis(100));
        fx.group.run_expired();
    }
    let second = fired_at[1].load(Ordering::SeqCst);
    assert!(second >= first_deadline + PERIOD_NS, "{second}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
