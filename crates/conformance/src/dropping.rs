//! Dropping the context with work pending, listed in [`drop_tests!`](crate::drop_tests).

use crate::support::*;

/// DESIGN §6 (a context dropped with pending work): dropping the context runs nothing; it
/// frees the pending one-shot and the handler's closure, and a BH's closure goes with its
/// handle. Handles outliving the context are harmless.
pub fn drop_context_frees_pending_work(make: MakeContext) {
    let ctx = new_ctx(make);
    let runs = counter();
    let (bh_freed, oneshot_freed, handler_freed) = (drops(), drops(), drops());
    let (r, g) = (runs.clone(), DropCount::new(&bh_freed));
    let bh = ctx.bh(move || {
        g.keep();
        r.fetch_add(1, SeqCst);
    });
    bh.schedule();
    let (r, g) = (runs.clone(), DropCount::new(&oneshot_freed));
    ctx.schedule_oneshot(move || {
        g.keep();
        r.fetch_add(1, SeqCst);
    });
    let e = Arc::new(EventNotifier::new().unwrap());
    e.set().unwrap();
    let (r, g) = (runs.clone(), DropCount::new(&handler_freed));
    let h = ctx
        .set_event_notifier(&e, move |_| {
            g.keep();
            r.fetch_add(1, SeqCst);
        })
        .unwrap();
    drop(ctx);
    assert_eq!(get(&runs), 0, "dropping a context runs no callback");
    assert_eq!(
        oneshot_freed.load(SeqCst),
        1,
        "the pending one-shot was freed"
    );
    assert_eq!(
        handler_freed.load(SeqCst),
        1,
        "the handler's closure was freed"
    );
    assert_eq!(
        bh_freed.load(SeqCst),
        0,
        "the BH's closure lives as long as its handle"
    );
    assert!(!h.is_registered());
    drop(h);
    // Scheduling a BH of a dead context is harmless (it is freed, never run).
    bh.schedule();
    bh.cancel();
    bh.schedule_idle();
    drop(bh);
    assert_eq!(
        bh_freed.load(SeqCst),
        1,
        "dropping the handle freed the BH's closure"
    );
    assert_eq!(get(&runs), 0);
}

/// DESIGN §6 (a context dropped with pending work): a `ContextHandle` that outlives the
/// context can still schedule and notify without panicking; what it schedules never runs and
/// is freed when the last handle goes.
pub fn drop_context_with_live_handle(make: MakeContext) {
    let ctx = new_ctx(make);
    let handle = ctx.handle();
    let runs = counter();
    let (bh_freed, oneshot_freed, late_freed, late_bh_freed) = (drops(), drops(), drops(), drops());
    let (r, g) = (runs.clone(), DropCount::new(&bh_freed));
    let bh = ctx.bh(move || {
        g.keep();
        r.fetch_add(1, SeqCst);
    });
    bh.schedule();
    let (r, g) = (runs.clone(), DropCount::new(&oneshot_freed));
    handle.schedule_oneshot(move || {
        g.keep();
        r.fetch_add(1, SeqCst);
    });
    assert!(handle.is_alive());
    drop(ctx);
    assert!(!handle.is_alive());
    assert_eq!(get(&runs), 0);
    assert_eq!(oneshot_freed.load(SeqCst), 1);
    assert!(!handle.is_handle_of(&new_ctx(make)));

    let (r, g) = (runs.clone(), DropCount::new(&late_freed));
    handle.schedule_oneshot(move || {
        g.keep();
        r.fetch_add(1, SeqCst);
    });
    handle.notify();
    let (r, g) = (runs.clone(), DropCount::new(&late_bh_freed));
    let late_bh = handle.bh(move || {
        g.keep();
        r.fetch_add(1, SeqCst);
    });
    late_bh.schedule();
    let other = handle.clone();
    assert!(other.same_context(&handle));
    drop(late_bh);
    drop(bh);
    drop(handle);
    drop(other);
    assert_eq!(late_freed.load(SeqCst), 1, "freed with the last handle");
    assert_eq!(late_bh_freed.load(SeqCst), 1);
    assert_eq!(bh_freed.load(SeqCst), 1);
    assert_eq!(get(&runs), 0, "nothing ever ran");
}
