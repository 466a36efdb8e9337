//! Panics in callbacks, listed in [`panic_tests!`](crate::panic_tests).

use crate::support::*;

/// DESIGN §6 (a callback that panics): the panic propagates out of `poll`; a BH scheduled in the
/// same pass still runs on the next poll; the panicking BH can be scheduled again; no context
/// stays current.
pub fn panic_in_bh_keeps_context_usable(make: MakeContext) {
    let ctx = new_ctx(make);
    let (p_runs, q_runs) = (counter(), counter());
    let (p, q) = (p_runs.clone(), q_runs.clone());
    let panicky = ctx.bh(move || {
        if p.fetch_add(1, SeqCst) == 0 {
            panic!("deliberate panic in a BH (conformance test)");
        }
    });
    let quiet = ctx.bh(move || {
        q.fetch_add(1, SeqCst);
    });
    panicky.schedule();
    quiet.schedule();
    let result = catch_unwind(AssertUnwindSafe(|| ctx.poll()));
    assert!(result.is_err(), "the panic propagates out of poll");
    assert_eq!(get(&p_runs), 1);
    assert!(
        AioContext::current().is_none(),
        "the current context was restored"
    );
    let quiet_before = get(&q_runs);
    let progress = ctx.poll_nonblocking();
    assert_eq!(get(&q_runs), 1, "the other BH of the pass still ran, once");
    if quiet_before == 0 {
        assert!(progress);
    }
    assert!(!ctx.poll_nonblocking());
    panicky.schedule();
    assert!(ctx.poll());
    assert_eq!((get(&p_runs), get(&q_runs)), (2, 1));
    assert!(!ctx.poll_nonblocking());
}

/// DESIGN §6 (a callback that panics): a read callback that panics leaves its handler
/// registered and working, and the context usable.
pub fn panic_in_fd_handler_keeps_context_usable(make: MakeContext) {
    let ctx = new_ctx(make);
    let e = Arc::new(EventNotifier::new().unwrap());
    let calls = Rc::new(Cell::new(0u32));
    let c = calls.clone();
    let h = ctx
        .set_event_notifier(&e, move |e| {
            assert!(e.test_and_clear());
            c.set(c.get() + 1);
            if c.get() == 1 {
                panic!("deliberate panic in a handler (conformance test)");
            }
        })
        .unwrap();
    drain(&ctx);
    e.set().unwrap();
    let result = catch_unwind(AssertUnwindSafe(|| ctx.poll_nonblocking()));
    assert!(result.is_err());
    assert_eq!(calls.get(), 1);
    assert!(AioContext::current().is_none());
    assert!(h.is_registered());
    assert!(!ctx.poll_nonblocking());
    e.set().unwrap();
    assert!(ctx.poll());
    assert_eq!(calls.get(), 2);
    assert!(!ctx.poll_nonblocking());
    drop(h);
}
