//! Poll results and bottom halves, listed in [`bottom_half_tests!`](crate::bottom_half_tests).

use crate::support::*;

/// §13 case 1 (derived): a fresh context's non-blocking poll runs nothing and returns false.
pub fn poll_fresh_context_is_idle(make: MakeContext) {
    let ctx = new_ctx(make);
    assert!(!ctx.poll_nonblocking());
    assert!(!ctx.poll_nonblocking());
    assert!(AioContext::current().is_none());
}

/// `/aio/bh/schedule`: one scheduled BH runs exactly once, then the loop is idle.
pub fn bh_schedule(make: MakeContext) {
    let ctx = new_ctx(make);
    let data = BhRecord::counting(&ctx, 0);
    data.schedule();
    assert_eq!(data.n(), 0, "scheduling never runs anything synchronously");
    assert!(ctx.poll());
    assert_eq!(data.n(), 1);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(data.n(), 1);
    data.delete();
}

/// `/aio/bh/schedule10` (§13 cases 5 and 8): a self-rescheduling BH runs at most once per
/// poll, and a blocking poll does not sleep while a BH is pending.
pub fn bh_schedule10(make: MakeContext) {
    let ctx = new_ctx(make);
    let data = BhRecord::counting(&ctx, 10);
    data.schedule();
    assert_eq!(data.n(), 0);
    assert!(ctx.poll_nonblocking());
    assert_eq!(
        data.n(),
        1,
        "a BH rescheduled by itself waits for the next pass"
    );
    let wd = Watchdog::new(ctx.handle());
    assert!(
        ctx.poll(),
        "a blocking poll with a BH pending returns at once"
    );
    assert!(!wd.fired());
    assert_eq!(data.n(), 2);
    while data.n() < 10 {
        ctx.poll();
    }
    assert_eq!(data.n(), 10);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(data.n(), 10);
    data.delete();
}

/// `/aio/bh/cancel`: a cancelled BH does not run and does not count as progress.
pub fn bh_cancel(make: MakeContext) {
    let ctx = new_ctx(make);
    let data = BhRecord::counting(&ctx, 0);
    data.schedule();
    assert!(data.is_scheduled());
    data.cancel();
    assert!(!data.is_scheduled());
    assert_eq!(data.n(), 0);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(data.n(), 0);
    data.delete();
}

/// §13 case 9 (`/aio/bh/cancel` plus derived): after a cancel, the same handle can be
/// scheduled again and runs once.
pub fn bh_cancel_then_reschedule(make: MakeContext) {
    let ctx = new_ctx(make);
    let data = BhRecord::counting(&ctx, 0);
    data.schedule();
    data.cancel();
    assert!(!ctx.poll_nonblocking());
    assert_eq!(data.n(), 0);
    data.schedule();
    assert!(data.is_scheduled());
    assert!(ctx.poll_nonblocking());
    assert_eq!(data.n(), 1);
    assert!(!data.is_scheduled());
    assert!(!ctx.poll_nonblocking());
    assert_eq!(data.n(), 1);
}

/// `/aio/bh/delete` (§13 case 10): deleting a scheduled BH before polling prevents it from
/// ever running; the deferred reclamation is not progress, and frees the callback.
pub fn bh_delete(make: MakeContext) {
    let ctx = new_ctx(make);
    let runs = counter();
    let freed = drops();
    let (r, g) = (runs.clone(), DropCount::new(&freed));
    let bh = ctx.bh(move || {
        g.keep();
        r.fetch_add(1, SeqCst);
    });
    bh.schedule();
    drop(bh);
    assert_eq!(get(&runs), 0);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(get(&runs), 0);
    assert_eq!(
        freed.load(SeqCst),
        1,
        "the deleted BH's callback is freed by the loop"
    );
    assert!(!ctx.poll_nonblocking());
    assert_eq!(get(&runs), 0);
}

/// `/aio/bh/callback-delete/one` (§13 case 11): a BH deletes itself from its own callback.
pub fn bh_callback_delete_one(make: MakeContext) {
    let ctx = new_ctx(make);
    let data = BhRecord::deleting(&ctx, 1);
    data.schedule();
    while data.n() < 1 {
        ctx.poll();
    }
    assert_eq!(data.n(), 1);
    assert!(data.is_deleted(), "the BH deleted itself");
    assert!(!ctx.poll_nonblocking());
    assert_eq!(data.n(), 1);
}

/// `/aio/bh/callback-delete/many` (§13 case 12): four self-deleting BHs with max 1, 3, 2, 4.
pub fn bh_callback_delete_many(make: MakeContext) {
    let ctx = new_ctx(make);
    let maxes = [1, 3, 2, 4];
    let data: Vec<BhRecord> = maxes.iter().map(|&m| BhRecord::deleting(&ctx, m)).collect();
    for d in &data {
        d.schedule();
    }
    assert!(data.iter().all(|d| d.n() == 0));
    assert!(ctx.poll_nonblocking());
    for d in &data {
        assert_eq!(
            d.n(),
            1,
            "every BH scheduled before the poll ran once in it"
        );
    }
    assert!(data[0].is_deleted());
    assert!(data[1..].iter().all(|d| !d.is_deleted()));
    while data.iter().zip(maxes).any(|(d, m)| d.n() < m) {
        ctx.poll();
    }
    for (d, m) in data.iter().zip(maxes) {
        assert_eq!(d.n(), m);
        assert!(d.is_deleted());
    }
    assert!(!ctx.poll_nonblocking());
}

/// `/aio/bh/flush`: as `/aio/bh/schedule`, through `aio_poll`.
pub fn bh_flush(make: MakeContext) {
    let ctx = new_ctx(make);
    let data = BhRecord::counting(&ctx, 0);
    data.schedule();
    assert!(ctx.aio_poll(true));
    assert_eq!(data.n(), 1);
    assert!(!ctx.aio_poll(false));
    assert_eq!(data.n(), 1);
}

/// §13 case 7 (derived): scheduling the same BH twice before polling runs it once.
pub fn bh_double_schedule_runs_once(make: MakeContext) {
    let ctx = new_ctx(make);
    let data = BhRecord::counting(&ctx, 0);
    data.schedule();
    data.schedule();
    assert!(ctx.poll_nonblocking());
    assert_eq!(data.n(), 1);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(data.n(), 1);
}

/// §13 case 13 (derived, R3): a BH scheduled from another BH's callback runs in the next pass.
pub fn bh_scheduled_from_bh_runs_next_pass(make: MakeContext) {
    let ctx = new_ctx(make);
    let (a_runs, b_runs) = (counter(), counter());
    let b_r = b_runs.clone();
    let b = Arc::new(ctx.bh(move || {
        b_r.fetch_add(1, SeqCst);
    }));
    let (a_r, b2) = (a_runs.clone(), b.clone());
    let a = ctx.bh(move || {
        a_r.fetch_add(1, SeqCst);
        b2.schedule();
    });
    a.schedule();
    assert!(ctx.poll_nonblocking());
    assert_eq!((get(&a_runs), get(&b_runs)), (1, 0));
    assert!(ctx.poll_nonblocking());
    assert_eq!((get(&a_runs), get(&b_runs)), (1, 1));
    assert!(!ctx.poll_nonblocking());
    drop(a);
    drop(b);
}

/// §13 case 14 (derived, R3 / slices): a BH callback's nested non-blocking poll runs the BHs
/// the outer pass has not reached yet, and the outer pass does not run them again.
///
/// BH order within a pass is not promised, so whichever of the three BHs runs first does the
/// nested poll and the other two play QEMU's C and D.
pub fn bh_nested_poll_runs_outer_pass(make: MakeContext) {
    let ctx = new_ctx(make);
    let counts: Arc<[AtomicU32; 3]> = Arc::new(Default::default());
    let nested_done = Arc::new(AtomicBool::new(false));
    let nested_progress = Arc::new(AtomicU32::new(0));
    let bhs: Vec<BottomHalf> = (0..3)
        .map(|i| {
            let (counts, done, prog) =
                (counts.clone(), nested_done.clone(), nested_progress.clone());
            ctx.bh(move || {
                counts[i].fetch_add(1, SeqCst);
                if !done.swap(true, SeqCst) {
                    let others_before: u32 =
                        (0..3).filter(|&j| j != i).map(|j| get(&counts[j])).sum();
                    assert_eq!(others_before, 0, "the nesting BH runs first");
                    let cur = AioContext::current().expect("a BH runs inside poll");
                    if cur.poll_nonblocking() {
                        prog.fetch_add(1, SeqCst);
                    }
                    for (j, c) in counts.iter().enumerate() {
                        assert_eq!(
                            get(c),
                            1,
                            "BH {j} ran exactly once by the end of the nested poll"
                        );
                    }
                }
            })
        })
        .collect();
    for bh in &bhs {
        bh.schedule();
    }
    assert!(ctx.poll_nonblocking());
    assert_eq!(
        get(&nested_progress),
        1,
        "the nested poll ran C and D: progress"
    );
    for c in counts.iter() {
        assert_eq!(get(c), 1, "the outer pass did not run C or D again");
    }
    assert!(!ctx.poll_nonblocking());
    for c in counts.iter() {
        assert_eq!(get(c), 1);
    }
}

/// §13 case 15 (QEMU: the iothread join and `ctx_run` patterns): a one-shot BH scheduled from
/// another thread wakes a blocked poll, which returns true, and runs exactly once on the
/// context's thread.
pub fn bh_oneshot_from_other_thread_wakes_poll(make: MakeContext) {
    let ctx = new_ctx(make);
    drain(&ctx);
    let home = thread::current().id();
    let runs = counter();
    let ran_on = Arc::new(Mutex::new(None));
    let handle = ctx.handle();
    let (r, on) = (runs.clone(), ran_on.clone());
    let remote = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        handle.schedule_oneshot(move || {
            r.fetch_add(1, SeqCst);
            *on.lock().unwrap() = Some(thread::current().id());
        });
    });
    let wd = Watchdog::new(ctx.handle());
    let t0 = Instant::now();
    assert!(ctx.poll(), "the one-shot BH woke the poll and ran");
    assert!(t0.elapsed() < WAKE_BOUND);
    assert!(!wd.fired());
    assert_eq!(get(&runs), 1);
    assert_eq!(*ran_on.lock().unwrap(), Some(home));
    remote.join().unwrap();
    assert!(!ctx.poll_nonblocking());
    assert_eq!(get(&runs), 1);
}

/// Spec §3.4 (idle BHs): a BH scheduled idle runs in a non-blocking poll but is not progress.
pub fn bh_idle_runs_but_is_not_progress(make: MakeContext) {
    let ctx = new_ctx(make);
    drain(&ctx);
    let data = BhRecord::counting(&ctx, 0);
    let bh = data.bh.clone();
    bh.lock().unwrap().as_ref().unwrap().schedule_idle();
    assert!(data.is_scheduled());
    assert!(!ctx.poll_nonblocking(), "an idle BH is not progress");
    assert_eq!(data.n(), 1);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(data.n(), 1);
}

/// Spec §3.4 (idle BHs): a blocking poll with only an idle BH pending does not sleep for good
/// (at most ~10 ms), runs it, and returns false.
pub fn bh_idle_blocking_poll_returns(make: MakeContext) {
    let ctx = new_ctx(make);
    drain(&ctx);
    let data = BhRecord::counting(&ctx, 0);
    data.bh.lock().unwrap().as_ref().unwrap().schedule_idle();
    let wd = Watchdog::new(ctx.handle());
    let t0 = Instant::now();
    let progress = ctx.poll();
    let elapsed = t0.elapsed();
    assert!(!wd.fired(), "the blocking poll with an idle BH hung");
    assert!(!progress, "an idle BH is not progress");
    assert_eq!(data.n(), 1);
    assert!(elapsed < WAKE_BOUND, "took {elapsed:?}");
    assert!(!ctx.poll_nonblocking());
    assert_eq!(data.n(), 1);
}
