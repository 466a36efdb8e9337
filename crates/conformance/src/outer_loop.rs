//! Driving the context from an outer loop (QEMU's GSource), listed in
//! [`outer_loop_tests!`](crate::outer_loop_tests).

use crate::support::*;

/// §13 case 30 (QEMU `/aio-gsource/bh/schedule`), on the hooks and through a glib-like
/// iteration: a scheduled BH makes `prepare` return zero, `check` true and `dispatch` run it;
/// afterwards the context has nothing to do.
pub fn outer_loop_bh_schedule(make: MakeContext) {
    let ctx = new_ctx(make);
    drain(&ctx);
    let data = BhRecord::counting(&ctx, 0);
    data.schedule();
    assert_eq!(ctx.prepare(), Some(Duration::ZERO));
    assert!(ctx.check());
    assert!(ctx.dispatch(), "a BH ran: progress");
    assert_eq!(data.n(), 1);
    let t = ctx.prepare();
    assert!(
        t.is_none_or(|t| t > Duration::ZERO),
        "idle, yet prepare said {t:?}"
    );
    assert!(!ctx.check());
    assert_eq!(data.n(), 1);

    data.schedule();
    assert!(outer_iteration(&ctx, true));
    assert_eq!(data.n(), 2);
    assert!(!outer_iteration(&ctx, false));
    assert_eq!(data.n(), 2);
}

/// §13 case 31 (QEMU `/aio-gsource/bh/callback-delete/one`, 2025): after a BH deletes itself,
/// at most one extra outer iteration reports a dispatch, then none.
pub fn outer_loop_bh_delete_self(make: MakeContext) {
    let ctx = new_ctx(make);
    drain(&ctx);
    let data = BhRecord::deleting(&ctx, 1);
    data.schedule();
    assert!(outer_iteration(&ctx, true));
    assert_eq!(data.n(), 1);
    assert!(data.is_deleted());
    let mut extra = 0;
    while outer_iteration(&ctx, false) {
        extra += 1;
        assert!(
            extra <= 1,
            "more than one extra dispatch after the BH deleted itself"
        );
    }
    assert_eq!(data.n(), 1);
}

/// `/aio-gsource/notify` (§1.17, adapted) and docs/qemu-semantics.md §4.6: a notify between `prepare` and
/// `check` makes one of the outer fds (the context's eventfd) readable, and is not progress.
pub fn outer_loop_notify_wakes_outer_fds(make: MakeContext) {
    let ctx = new_ctx(make);
    drain(&ctx);
    let t = ctx.prepare();
    assert!(
        t.is_none_or(|t| t > Duration::ZERO),
        "idle, yet prepare said {t:?}"
    );
    let mut fds = Vec::new();
    ctx.outer_fds(&mut fds);
    assert!(!fds.is_empty(), "the context's eventfd is an outer fd");
    ctx.notify();
    assert!(
        poll_outer_fds(&fds, Some(Duration::from_secs(1))) >= 1,
        "the notify made an outer fd readable"
    );
    let progress = ctx.check() && ctx.dispatch();
    assert!(!progress, "a notify is not progress");
}

/// Outer loop (derived, found on io_uring): a handler registered by a callback that an outer
/// loop dispatched must be watched by the outer loop's next wait, so that its fd, set from
/// another thread, wakes the outer loop instead of leaving it asleep until its timeout.
pub fn outer_loop_watches_handlers_registered_in_dispatch(make: MakeContext) {
    let ctx = new_ctx(make);
    drain(&ctx);
    let notifier = Arc::new(EventNotifier::new().expect("notifier"));
    let slot: Rc<RefCell<Option<FdHandler>>> = Rc::default();
    let hits = Rc::new(Cell::new(0u32));
    // A BH registers the handler from inside the outer loop's dispatch.
    let (tx, rx) = mpsc::channel::<()>();
    let bh = ctx.bh(move || tx.send(()).unwrap());
    bh.schedule();
    assert_eq!(
        ctx.prepare(),
        Some(Duration::ZERO),
        "a scheduled BH means no sleep"
    );
    assert!(ctx.check());
    assert!(ctx.dispatch());
    rx.try_recv().expect("the BH ran");
    {
        let (n, h) = (notifier.clone(), hits.clone());
        let handler = ctx
            .set_event_notifier(&notifier, move |e| {
                assert!(e.test_and_clear());
                h.set(h.get() + 1);
                let _ = &n;
            })
            .expect("register");
        *slot.borrow_mut() = Some(handler);
    }
    // Now the outer loop goes to sleep for as long as `prepare` allows, and another thread
    // sets the notifier. The wait must wake for it.
    let remote = notifier.clone();
    let setter = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        remote.set().unwrap();
    });
    let start = Instant::now();
    let deadline = start + Duration::from_secs(5);
    while hits.get() == 0 && Instant::now() < deadline {
        let timeout = ctx.prepare();
        let mut fds = Vec::new();
        ctx.outer_fds(&mut fds);
        let cap = deadline.saturating_duration_since(Instant::now());
        poll_outer_fds(&fds, Some(timeout.map_or(cap, |t| t.min(cap))));
        if ctx.check() {
            ctx.dispatch();
        }
    }
    setter.join().unwrap();
    assert_eq!(
        hits.get(),
        1,
        "the outer loop never dispatched the new handler"
    );
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "the outer loop slept through the fd"
    );
}

/// Spec §2.4 / §4.6 ("at most one extra iteration"): once an outer loop has run the iteration
/// a notify woke, plus at most one more, the wake-up is consumed: the outer fds are quiet
/// again, so an idle outer loop sleeps instead of spinning.
pub fn outer_loop_notify_is_consumed(make: MakeContext) {
    let ctx = new_ctx(make);
    drain(&ctx);
    ctx.prepare();
    let mut fds = Vec::new();
    ctx.outer_fds(&mut fds);
    ctx.notify();
    assert!(poll_outer_fds(&fds, Some(Duration::from_secs(1))) >= 1);
    if ctx.check() {
        assert!(!ctx.dispatch());
    }
    outer_iteration(&ctx, false);
    outer_iteration(&ctx, false);
    ctx.prepare();
    let ready = poll_outer_fds(&fds, Some(Duration::ZERO));
    ctx.check();
    assert_eq!(
        ready, 0,
        "the eventfd is still readable after the notify was handled: an outer loop would spin"
    );
}
