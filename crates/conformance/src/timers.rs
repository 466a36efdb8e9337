//! Timers in real time, each case waiting in the backend's own `wait`, listed in
//! [`timer_tests!`](crate::timer_tests).

use crate::support::*;

/// QEMU's 750 ms, scaled down so that the suite stays quick on every backend.
const TIMER_PERIOD: Duration = Duration::from_millis(150);

/// A REALTIME timer whose callback counts and re-arms itself `TIMER_PERIOD` later while the
/// count is below `max`. Returns the timer (keep it alive) and the counter.
fn periodic_timer(ctx: &AioContext, max: u32) -> (aio_core::Timer, Arc<AtomicU32>) {
    let n = Arc::new(AtomicU32::new(0));
    let me: Arc<std::sync::OnceLock<aio_core::TimerRef>> = Arc::default();
    let (count, this) = (n.clone(), me.clone());
    let timer = ctx.timer(
        aio_core::ClockType::Realtime,
        aio_core::Scale::NS,
        move || {
            if count.fetch_add(1, SeqCst) + 1 < max {
                this.get().expect("set below").arm_after(TIMER_PERIOD);
            }
        },
    );
    assert!(me.set(timer.handle()).is_ok(), "set once");
    (timer, n)
}

/// `/aio/timer/schedule` (§1.13, §13 case 25), with 750 ms scaled to 150 ms: timers run only
/// inside `poll`; a due timer runs on a non-blocking poll; a blocking poll sleeps until the
/// next deadline and returns true.
pub fn timer_schedule(make: MakeContext) {
    let ctx = new_ctx(make);
    let (timer, n) = periodic_timer(&ctx, 2);
    timer.arm_after(TIMER_PERIOD);
    drain(&ctx);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(n.load(SeqCst), 0);
    thread::sleep(TIMER_PERIOD + Duration::from_millis(100));
    assert_eq!(n.load(SeqCst), 0, "timers only run inside poll");
    assert!(ctx.poll_nonblocking());
    assert_eq!(n.load(SeqCst), 1);
    drain(&ctx);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(n.load(SeqCst), 1);
    let wd = Watchdog::new(ctx.handle());
    let t0 = Instant::now();
    assert!(
        ctx.poll(),
        "the blocking poll sleeps until the re-armed deadline, then runs it"
    );
    assert!(!wd.fired(), "the blocking poll hung");
    assert_eq!(n.load(SeqCst), 2);
    assert!(t0.elapsed() < TIMER_PERIOD + WAKE_BOUND);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(n.load(SeqCst), 2);
}

/// §13 case 26: with only a timer pending (no user fd), a blocking poll sleeps until the
/// deadline and no longer, and never returns before it.
pub fn timer_blocking_poll_sleeps_until_the_deadline(make: MakeContext) {
    let ctx = new_ctx(make);
    drain(&ctx);
    let (fired, timer) = flag_timer(&ctx);
    let wd = Watchdog::new(ctx.handle());
    let t0 = Instant::now();
    timer.arm_after(TIMER_PERIOD);
    let mut polls = 0;
    while !fired.load(SeqCst) {
        ctx.poll();
        polls += 1;
        assert!(polls < 10, "woke {polls} times without the timer firing");
    }
    let elapsed = t0.elapsed();
    assert!(!wd.fired());
    assert!(elapsed >= TIMER_PERIOD, "fired early, after {elapsed:?}");
    assert!(elapsed < TIMER_PERIOD + WAKE_BOUND, "slept {elapsed:?}");
}

/// §13 case 27: another thread moves a timer's deadline earlier while the loop sleeps; the
/// sleep ends and the timer fires near its new deadline, not the old one.
pub fn timer_moved_earlier_from_another_thread_wakes_poll(make: MakeContext) {
    let ctx = new_ctx(make);
    drain(&ctx);
    let (fired, timer) = flag_timer(&ctx);
    timer.arm_after(Duration::from_secs(60));
    let handle = timer.handle();
    // Before the spawn: the new deadline is at least 100 ms after this, however late the
    // thread starts (valgrind makes that tens of milliseconds).
    let t0 = Instant::now();
    let mover = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        handle.arm_after(Duration::from_millis(50));
    });
    let wd = Watchdog::new(ctx.handle());
    while !fired.load(SeqCst) {
        ctx.poll();
        assert!(!wd.fired(), "the moved timer never woke the loop");
    }
    mover.join().unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(100));
    assert!(t0.elapsed() < Duration::from_millis(100) + WAKE_BOUND);
}

/// §13 case 28: a cancelled (or dropped) timer never fires, even when cancelled after its
/// deadline passed but before the next poll.
pub fn timer_cancelled_after_its_deadline_never_fires(make: MakeContext) {
    let ctx = new_ctx(make);
    drain(&ctx);
    let n = Arc::new(AtomicU32::new(0));
    let (a, b) = (n.clone(), n.clone());
    let cancelled = ctx.timer(
        aio_core::ClockType::Realtime,
        aio_core::Scale::MS,
        move || {
            a.fetch_add(1, SeqCst);
        },
    );
    let dropped = ctx.timer(
        aio_core::ClockType::Realtime,
        aio_core::Scale::MS,
        move || {
            b.fetch_add(1, SeqCst);
        },
    );
    cancelled.arm_after(Duration::from_millis(10));
    dropped.arm_after(Duration::from_millis(10));
    thread::sleep(Duration::from_millis(40));
    cancelled.cancel();
    drop(dropped);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(n.load(SeqCst), 0);
    assert!(!cancelled.is_pending());
}

/// §13 case 29 (`/aio-gsource/timer/schedule`): a periodic re-arm never fires early: after the
/// second firing, the time is past the first deadline plus one period.
pub fn timer_periodic_rearm_never_fires_early(make: MakeContext) {
    let ctx = new_ctx(make);
    drain(&ctx);
    let (timer, n) = periodic_timer(&ctx, 2);
    let first_deadline = Instant::now() + TIMER_PERIOD;
    timer.arm_after(TIMER_PERIOD);
    let wd = Watchdog::new(ctx.handle());
    while n.load(SeqCst) < 2 {
        ctx.poll();
        assert!(!wd.fired());
    }
    assert!(
        Instant::now() >= first_deadline + TIMER_PERIOD,
        "the second firing was early"
    );
}

/// `poll_timeout`: with nothing to do, one blocking iteration that sleeps for its limit and no
/// less, then returns false; a timer due after the limit neither runs nor lengthens the wait;
/// one due before it runs, and the call returns then; a bottom half scheduled from another
/// thread ends a long wait; a zero limit does not sleep.
pub fn timer_poll_timeout_sleeps_at_most_its_limit(make: MakeContext) {
    let ctx = new_ctx(make);
    drain(&ctx);
    // (A limit that is not kept makes the first wait last until the watchdog's wake-up.)
    let wd = Watchdog::new(ctx.handle());
    let limit = Duration::from_millis(50);
    let t0 = Instant::now();
    assert!(!ctx.poll_timeout(limit), "nothing to do");
    let slept = t0.elapsed();
    assert!(slept >= limit, "returned after {slept:?}, before its limit");
    assert!(slept < limit + WAKE_BOUND, "slept {slept:?}");

    let (fired, timer) = flag_timer(&ctx);
    timer.arm_after(Duration::from_secs(60));
    let t0 = Instant::now();
    assert!(!ctx.poll_timeout(limit));
    assert!(
        t0.elapsed() < limit + WAKE_BOUND,
        "slept {:?}",
        t0.elapsed()
    );
    assert!(!fired.load(SeqCst), "a timer due after the limit ran");

    let t0 = Instant::now();
    timer.arm_after(Duration::from_millis(20));
    while !fired.load(SeqCst) {
        ctx.poll_timeout(Duration::from_secs(60));
        assert!(
            !wd.fired(),
            "the timer due before the limit never ended the wait"
        );
    }
    assert!(t0.elapsed() < Duration::from_millis(20) + WAKE_BOUND);

    let ran = counter();
    let (r, handle) = (ran.clone(), ctx.handle());
    let t0 = Instant::now();
    let scheduler = thread::spawn(move || {
        thread::sleep(Duration::from_millis(20));
        handle.schedule_oneshot(move || {
            r.fetch_add(1, SeqCst);
        });
    });
    while get(&ran) == 0 {
        ctx.poll_timeout(Duration::from_secs(60));
        assert!(!wd.fired(), "the remote BH never ended the wait");
    }
    scheduler.join().unwrap();
    assert!(t0.elapsed() < WAKE_BOUND, "{:?}", t0.elapsed());

    drain(&ctx);
    let t0 = Instant::now();
    assert!(!ctx.poll_timeout(Duration::ZERO));
    assert!(t0.elapsed() < WAKE_BOUND);
}
