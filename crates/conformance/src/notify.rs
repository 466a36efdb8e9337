//! `notify`, listed in [`notify_tests!`](crate::notify_tests).

use crate::support::*;

/// `/aio/notify` (§1.17) and §13 case 3 (R1): a notify is never progress. With no thread
/// asleep, it writes no eventfd, and a later blocking poll returns false at once because the
/// `notified` flag is set.
pub fn notify_is_not_progress(make: MakeContext) {
    let ctx = new_ctx(make);
    assert!(!ctx.poll_nonblocking());
    let before = ctx.stats();
    ctx.notify();
    assert!(!ctx.poll_nonblocking());
    ctx.notify();
    ctx.handle().notify();
    let wd = Watchdog::new(ctx.handle());
    assert!(!ctx.poll(), "woken by a notify: not progress");
    assert!(!wd.fired(), "a blocking poll after a notify must not sleep");
    drop(wd);
    assert!(!ctx.poll_nonblocking());
    let after = ctx.stats();
    assert_eq!(
        after.event_writes, before.event_writes,
        "a notify with nobody asleep costs no eventfd write"
    );
}

/// §13 case 4 (QEMU: old `/aio/notify` and `/aio/acquire`, 2014): another thread's notify
/// wakes a blocked poll, which returns false.
pub fn notify_wakes_blocked_poll(make: MakeContext) {
    let ctx = new_ctx(make);
    drain(&ctx);
    let sent = Arc::new(AtomicBool::new(false));
    let (handle, s) = (ctx.handle(), sent.clone());
    let remote = thread::spawn(move || {
        thread::sleep(Duration::from_millis(100));
        s.store(true, SeqCst);
        handle.notify();
    });
    let t0 = Instant::now();
    let progress = ctx.poll();
    let elapsed = t0.elapsed();
    assert!(!progress, "a bare notify is not progress");
    assert!(sent.load(SeqCst), "the poll slept until the notify");
    assert!(elapsed < WAKE_BOUND, "took {elapsed:?}");
    remote.join().unwrap();
    assert!(
        ctx.handle().event_writes() >= 1,
        "waking a sleeper writes the eventfd"
    );
}
