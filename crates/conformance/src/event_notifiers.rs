//! Event notifiers, listed in [`event_notifier_tests!`](crate::event_notifier_tests).

use crate::support::*;

/// `/aio/event/add-remove` (§13 case 2): registering and unregistering is not progress and
/// does not call the handler.
pub fn event_add_remove(make: MakeContext) {
    let ctx = new_ctx(make);
    let mut data = Notifier::new(0, false);
    data.register(&ctx);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(data.n(), 0);
    data.unregister();
    assert!(!ctx.poll_nonblocking());
    assert_eq!(data.n(), 0);
}

/// `/aio/event/wait` (§13 case 16).
pub fn event_wait(make: MakeContext) {
    let ctx = new_ctx(make);
    let mut data = Notifier::new(1, false);
    data.register(&ctx);
    drain(&ctx);
    assert_eq!((data.n(), data.active()), (0, 1));
    data.set();
    assert!(ctx.poll_nonblocking());
    assert_eq!((data.n(), data.active()), (1, 0));
    assert!(!ctx.poll_nonblocking());
    assert_eq!((data.n(), data.active()), (1, 0));
    data.unregister();
    assert!(!ctx.poll_nonblocking());
    assert_eq!(data.n(), 1);
}

/// `/aio/event/wait/no-flush-cb` (§13 cases 18, 19, 20): with two notifiers registered, only
/// the one that is set dispatches, once per set; a set notifier makes a blocking poll return
/// true without sleeping.
pub fn event_wait_no_flush_cb(make: MakeContext) {
    let ctx = new_ctx(make);
    let mut data = Notifier::new(0, false);
    data.register(&ctx);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(data.n(), 0);

    data.set();
    let wd = Watchdog::new(ctx.handle());
    assert!(
        ctx.poll(),
        "a set notifier makes a blocking poll return true at once"
    );
    assert!(!wd.fired());
    drop(wd);
    data.n.set(0);

    let mut dummy = Notifier::new(1, false);
    dummy.register(&ctx);

    data.set();
    assert!(ctx.poll_nonblocking());
    assert_eq!(data.n(), 1);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(data.n(), 1);

    data.set();
    assert!(ctx.poll_nonblocking());
    assert_eq!(data.n(), 2);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(data.n(), 2);

    dummy.set();
    wait_until_inactive(&ctx, &dummy);
    assert_eq!(data.n(), 2);
    assert_eq!((dummy.n(), dummy.active()), (1, 0));

    dummy.unregister();
    data.unregister();
    assert!(!ctx.poll_nonblocking());
    assert_eq!(data.n(), 2);
}

/// `/aio/event/flush` (§13 case 17): a handler that re-sets its notifier (`auto_set`,
/// `active = 10`) runs once per poll, exactly 10 times.
pub fn event_flush(make: MakeContext) {
    let ctx = new_ctx(make);
    let mut data = Notifier::new(10, true);
    data.register(&ctx);
    drain(&ctx);
    assert_eq!((data.n(), data.active()), (0, 10));
    data.set();
    assert!(ctx.poll_nonblocking());
    assert_eq!((data.n(), data.active()), (1, 9));
    assert!(ctx.poll_nonblocking());
    wait_until_inactive(&ctx, &data);
    assert_eq!((data.n(), data.active()), (10, 0));
    assert!(!ctx.poll_nonblocking());
    data.unregister();
    assert!(!ctx.poll_nonblocking());
    assert_eq!(data.n(), 10);
}

/// §13 case 21 (derived, R5): a handler that does not clear its notifier is called again on
/// every poll.
pub fn event_level_triggered_uncleared(make: MakeContext) {
    let ctx = new_ctx(make);
    let e = Arc::new(EventNotifier::new().unwrap());
    let calls = Rc::new(Cell::new(0u32));
    let c = calls.clone();
    let h = ctx
        .set_event_notifier(&e, move |_| c.set(c.get() + 1))
        .unwrap();
    drain(&ctx);
    e.set().unwrap();
    for i in 1..=3 {
        assert!(ctx.poll_nonblocking());
        assert_eq!(calls.get(), i);
    }
    assert!(e.test_and_clear(), "the handler never cleared it");
    assert!(!ctx.poll_nonblocking());
    assert_eq!(calls.get(), 3);
    drop(h);
}

/// §13 case 22 (derived): setting a notifier that is not (or no longer) registered is not
/// progress and calls nothing.
pub fn event_unregistered_set_is_not_progress(make: MakeContext) {
    let ctx = new_ctx(make);
    let stranger = EventNotifier::new().unwrap();
    stranger.set().unwrap();
    assert!(!ctx.poll_nonblocking());
    let mut data = Notifier::new(0, false);
    data.register(&ctx);
    drain(&ctx);
    data.unregister();
    data.set();
    assert!(!ctx.poll_nonblocking());
    assert_eq!(data.n(), 0);
    assert!(data.e.test_and_clear(), "nobody consumed the set");
}

/// Derived (one handler per fd): registering the same notifier twice fails with
/// `AlreadyExists` and leaves the first registration working.
pub fn event_register_twice_already_exists(make: MakeContext) {
    let ctx = new_ctx(make);
    let mut data = Notifier::new(0, false);
    data.register(&ctx);
    let err = ctx
        .set_event_notifier(&data.e, |_| panic!("the second handler must never run"))
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    drain(&ctx);
    data.set();
    assert!(ctx.poll_nonblocking());
    assert_eq!(data.n(), 1);
    data.unregister();
    // Once unregistered, it can be registered again.
    data.register(&ctx);
    data.set();
    assert!(ctx.poll_nonblocking());
    assert_eq!(data.n(), 2);
}

/// §13 case 23 (QEMU: `/aio/acquire`, 2021–2023 variant): another thread sets a registered
/// notifier while this one is blocked in `poll`, which returns true.
pub fn event_set_from_other_thread_wakes_poll(make: MakeContext) {
    let ctx = new_ctx(make);
    let mut data = Notifier::new(1, false);
    data.register(&ctx);
    drain(&ctx);
    let e = data.e.clone();
    let remote = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        e.set().unwrap();
    });
    let wd = Watchdog::new(ctx.handle());
    let t0 = Instant::now();
    assert!(ctx.poll(), "woken by the notifier's handler: progress");
    assert!(t0.elapsed() < WAKE_BOUND);
    assert!(!wd.fired());
    assert_eq!((data.n(), data.active()), (1, 0));
    remote.join().unwrap();
    assert!(!ctx.poll_nonblocking());
}
