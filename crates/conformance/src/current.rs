//! The current context, listed in [`current_context_tests!`](crate::current_context_tests).

use crate::support::*;

/// QEMU `qemu_get_current_aio_context`: no context is current outside a poll; inside a BH or
/// handler callback (and an outer loop's `dispatch`) the polling context is.
pub fn current_context_in_callbacks(make: MakeContext) {
    let ctx = new_ctx(make);
    assert!(AioContext::current().is_none());
    let in_bh = counter();
    let (h, s) = (ctx.handle(), in_bh.clone());
    let bh = ctx.bh(move || {
        let cur = AioContext::current().expect("a BH runs with its context current");
        assert!(h.is_handle_of(&cur));
        s.fetch_add(1, SeqCst);
    });
    bh.schedule();
    assert!(ctx.poll_nonblocking());
    assert_eq!(get(&in_bh), 1);
    assert!(AioContext::current().is_none());

    let e = Arc::new(EventNotifier::new().unwrap());
    let in_handler = Rc::new(Cell::new(0u32));
    let (e2, c) = (e.clone(), in_handler.clone());
    let handler = ctx
        .fd_handler(e.clone())
        .on_read(move |ctx| {
            assert!(e2.test_and_clear());
            let cur = AioContext::current().expect("a handler runs with its context current");
            assert!(ctx.handle().is_handle_of(&cur));
            c.set(c.get() + 1);
        })
        .register()
        .unwrap();
    e.set().unwrap();
    assert!(ctx.poll_nonblocking());
    assert_eq!(in_handler.get(), 1);
    assert!(AioContext::current().is_none());

    bh.schedule();
    ctx.prepare();
    assert!(ctx.check());
    assert!(ctx.dispatch());
    assert_eq!(get(&in_bh), 2);
    assert!(AioContext::current().is_none());
    drop(handler);
}

/// QEMU nested contexts (a callback of one context polls another): the inner context is
/// current during its poll, and the outer one is current again afterwards.
pub fn current_context_nested(make: MakeContext) {
    let ctx1 = new_ctx(make);
    let ctx2 = new_ctx(make);
    let in_ctx2 = counter();
    let (h2, s) = (ctx2.handle(), in_ctx2.clone());
    let bh2 = ctx2.bh(move || {
        let cur = AioContext::current().expect("current inside ctx2's BH");
        assert!(h2.is_handle_of(&cur));
        s.fetch_add(1, SeqCst);
    });
    let e = Arc::new(EventNotifier::new().unwrap());
    let calls = Rc::new(Cell::new(0u32));
    let (e2, c, inner) = (e.clone(), calls.clone(), ctx2.clone());
    let handler = ctx1
        .fd_handler(e.clone())
        .on_read(move |ctx| {
            assert!(e2.test_and_clear());
            let cur = AioContext::current().unwrap();
            assert!(ctx.handle().is_handle_of(&cur));
            bh2.schedule();
            assert!(inner.poll_nonblocking());
            let cur = AioContext::current().expect("ctx1 is current again");
            assert!(ctx.handle().is_handle_of(&cur), "ctx1 is current again");
            assert!(!inner.handle().is_handle_of(&cur));
            c.set(c.get() + 1);
        })
        .register()
        .unwrap();
    drain(&ctx1);
    e.set().unwrap();
    assert!(ctx1.poll_nonblocking());
    assert_eq!(calls.get(), 1);
    assert_eq!(get(&in_ctx2), 1);
    assert!(AioContext::current().is_none());
    drop(handler);
}
