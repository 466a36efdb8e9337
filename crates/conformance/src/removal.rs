//! Removing handlers while dispatching, listed in [`removal_tests!`](crate::removal_tests).

use crate::support::*;

/// §13 case 24 (derived: deferred-free rules): a handler unregisters itself from its read
/// callback. It never runs again (not even its write callback in the same dispatch), and its
/// closures are freed.
pub fn handler_removes_itself(make: MakeContext) {
    let ctx = new_ctx(make);
    let e = Arc::new(EventNotifier::new().unwrap());
    let slot: Rc<RefCell<Option<FdHandler>>> = Rc::new(RefCell::new(None));
    let calls = Rc::new(Cell::new(0u32));
    let freed = drops();
    let (s, c, g) = (slot.clone(), calls.clone(), DropCount::new(&freed));
    let h = ctx
        .set_event_notifier(&e, move |e| {
            g.keep();
            assert!(e.test_and_clear());
            c.set(c.get() + 1);
            let me = s.borrow_mut().take();
            assert!(me.is_some());
            drop(me);
        })
        .unwrap();
    *slot.borrow_mut() = Some(h);
    drain(&ctx);
    e.set().unwrap();
    assert!(ctx.poll_nonblocking());
    assert_eq!(calls.get(), 1);
    assert!(slot.borrow().is_none());
    assert_eq!(
        freed.load(SeqCst),
        1,
        "the removed handler's closure was freed"
    );
    e.set().unwrap();
    assert!(!ctx.poll_nonblocking());
    assert_eq!(calls.get(), 1);
    assert!(e.test_and_clear());

    // Read and write both ready; the read callback removes the handler, so the write callback
    // of the same dispatch must not run.
    let (mut a, b) = socket_pair();
    a.write_all(b"x").unwrap();
    let slot: Rc<RefCell<Option<FdHandler>>> = Rc::new(RefCell::new(None));
    let (reads, writes) = (Rc::new(Cell::new(0u32)), Rc::new(Cell::new(0u32)));
    let (read_freed, write_freed) = (drops(), drops());
    let (s, r, rg) = (slot.clone(), reads.clone(), DropCount::new(&read_freed));
    let (w, wg) = (writes.clone(), DropCount::new(&write_freed));
    let h = ctx
        .fd_handler(b)
        .on_read(move |_| {
            rg.keep();
            r.set(r.get() + 1);
            drop(s.borrow_mut().take());
        })
        .on_write(move |_| {
            wg.keep();
            w.set(w.get() + 1);
        })
        .register()
        .unwrap();
    *slot.borrow_mut() = Some(h);
    assert!(ctx.poll_nonblocking());
    assert_eq!((reads.get(), writes.get()), (1, 0));
    assert_eq!(read_freed.load(SeqCst), 1);
    assert_eq!(write_freed.load(SeqCst), 1);
    assert!(!ctx.poll_nonblocking());
    assert_eq!((reads.get(), writes.get()), (1, 0));
}

/// §13 case 24 (derived): two ready handlers each unregister the other. Dispatch order is not
/// promised, but exactly one runs: the removed one never runs later in that poll (or after),
/// and its closure is freed.
pub fn handlers_remove_each_other(make: MakeContext) {
    let ctx = new_ctx(make);
    let es = [
        Arc::new(EventNotifier::new().unwrap()),
        Arc::new(EventNotifier::new().unwrap()),
    ];
    let slots: [Rc<RefCell<Option<FdHandler>>>; 2] = Default::default();
    let ran = [Rc::new(Cell::new(0u32)), Rc::new(Cell::new(0u32))];
    let freed = [drops(), drops()];
    for i in 0..2 {
        let other = slots[1 - i].clone();
        let (r, g) = (ran[i].clone(), DropCount::new(&freed[i]));
        let h = ctx
            .set_event_notifier(&es[i], move |e| {
                g.keep();
                assert!(e.test_and_clear());
                r.set(r.get() + 1);
                let victim = other.borrow_mut().take();
                drop(victim);
            })
            .unwrap();
        *slots[i].borrow_mut() = Some(h);
    }
    drain(&ctx);
    es[0].set().unwrap();
    es[1].set().unwrap();
    assert!(ctx.poll_nonblocking());
    assert_eq!(ran[0].get() + ran[1].get(), 1, "exactly one of the two ran");
    let survivor = if ran[0].get() == 1 { 0 } else { 1 };
    let removed = 1 - survivor;
    assert!(slots[removed].borrow().is_none());
    assert_eq!(
        freed[removed].load(SeqCst),
        1,
        "the removed closure was freed"
    );
    assert_eq!(freed[survivor].load(SeqCst), 0);
    assert!(
        slots[survivor]
            .borrow()
            .as_ref()
            .is_some_and(FdHandler::is_registered)
    );
    // The removed handler's notifier is still set, but nothing listens to it any more.
    assert!(!ctx.poll_nonblocking());
    assert_eq!(ran[removed].get(), 0);
    es[survivor].set().unwrap();
    assert!(ctx.poll_nonblocking());
    assert_eq!((ran[survivor].get(), ran[removed].get()), (2, 0));
    drop(slots[survivor].borrow_mut().take());
    assert_eq!(freed[survivor].load(SeqCst), 1);
    assert!(!ctx.poll_nonblocking());
}

/// Spec §4.4 (a nested poll steals ready handlers from its parent): two handlers are ready; the
/// first to run polls again, which dispatches the other; the outer iteration then does not
/// dispatch it a second time with its stale report (each handler asserts its notifier was
/// set, so a second call would fail).
pub fn handler_nested_poll_steals_ready_handler(make: MakeContext) {
    let ctx = new_ctx(make);
    let es = [
        Arc::new(EventNotifier::new().unwrap()),
        Arc::new(EventNotifier::new().unwrap()),
    ];
    let ran = [Rc::new(Cell::new(0u32)), Rc::new(Cell::new(0u32))];
    let nested = Rc::new(Cell::new(None::<bool>));
    let mut handlers = Vec::new();
    for i in 0..2 {
        let (e, ran, nested) = (es[i].clone(), ran.clone(), nested.clone());
        let h = ctx
            .fd_handler(es[i].clone())
            .on_read(move |ctx| {
                assert!(e.test_and_clear(), "handler {i} called with a stale report");
                ran[i].set(ran[i].get() + 1);
                if nested.get().is_none() {
                    nested.set(Some(false));
                    let progress = ctx.poll_nonblocking();
                    nested.set(Some(progress));
                    assert_eq!(ran[1 - i].get(), 1, "the nested poll ran the other handler");
                }
            })
            .register()
            .unwrap();
        handlers.push(h);
    }
    drain(&ctx);
    es[0].set().unwrap();
    es[1].set().unwrap();
    assert!(ctx.poll_nonblocking());
    assert_eq!(nested.get(), Some(true));
    assert_eq!((ran[0].get(), ran[1].get()), (1, 1));
    assert!(!ctx.poll_nonblocking());
    assert_eq!((ran[0].get(), ran[1].get()), (1, 1));
}

/// DESIGN §3 (handler keys carry a generation): a callback removes another ready handler and
/// registers a new one for the same fd. The removed handler's readiness report, still in
/// flight, is not delivered to the new handler; the new one runs on the next iteration.
pub fn handler_reregistered_in_callback_gets_no_stale_report(make: MakeContext) {
    let ctx = new_ctx(make);
    let es = [
        Arc::new(EventNotifier::new().unwrap()),
        Arc::new(EventNotifier::new().unwrap()),
    ];
    let slots: [Rc<RefCell<Option<FdHandler>>>; 2] = Default::default();
    let ran = [Rc::new(Cell::new(0u32)), Rc::new(Cell::new(0u32))];
    let replacement_ran = Rc::new(Cell::new(0u32));
    let replacement: Rc<RefCell<Option<FdHandler>>> = Rc::new(RefCell::new(None));
    for i in 0..2 {
        let (e, other_e) = (es[i].clone(), es[1 - i].clone());
        let (other, r) = (slots[1 - i].clone(), ran[i].clone());
        let (rep, rep_ran) = (replacement.clone(), replacement_ran.clone());
        let h = ctx
            .fd_handler(es[i].clone())
            .on_read(move |ctx| {
                assert!(e.test_and_clear());
                r.set(r.get() + 1);
                let victim = other.borrow_mut().take();
                if victim.is_none() {
                    return;
                }
                drop(victim);
                let (e2, rr) = (other_e.clone(), rep_ran.clone());
                let h = ctx
                    .fd_handler(other_e.clone())
                    .on_read(move |_| {
                        assert!(e2.test_and_clear(), "the new handler got a stale report");
                        rr.set(rr.get() + 1);
                    })
                    .register()
                    .expect("the fd is free again once its handler is removed");
                *rep.borrow_mut() = Some(h);
            })
            .register()
            .unwrap();
        *slots[i].borrow_mut() = Some(h);
    }
    drain(&ctx);
    es[0].set().unwrap();
    es[1].set().unwrap();
    assert!(ctx.poll_nonblocking());
    assert_eq!(ran[0].get() + ran[1].get(), 1);
    assert_eq!(
        replacement_ran.get(),
        0,
        "not dispatched with the removed handler's report"
    );
    assert!(
        ctx.poll_nonblocking(),
        "the new handler sees its fd ready on the next iteration"
    );
    assert_eq!(replacement_ran.get(), 1);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(ran[0].get() + ran[1].get(), 1);
    drop(replacement.borrow_mut().take());
    for slot in &slots {
        drop(slot.borrow_mut().take());
    }
}

/// Derived (docs/qemu-semantics.md §3.3 "each BH runs at most once per scheduling even under nesting"): a BH
/// reschedules itself and then polls again; the nested poll cannot re-enter the running
/// callback, and the schedule is not lost: it runs in the next outer poll.
pub fn bh_nested_poll_defers_running_bh(make: MakeContext) {
    let ctx = new_ctx(make);
    let n = counter();
    let nested_progress = Arc::new(AtomicBool::new(true));
    let (c, np) = (n.clone(), nested_progress.clone());
    let bh = ctx.bh_with_self(move |this| {
        if c.fetch_add(1, SeqCst) == 0 {
            this.schedule();
            let cur = AioContext::current().unwrap();
            np.store(cur.poll_nonblocking(), SeqCst);
            assert_eq!(
                get(&c),
                1,
                "the nested poll did not re-enter the running callback"
            );
        }
    });
    bh.schedule();
    assert!(ctx.poll_nonblocking());
    assert_eq!(get(&n), 1);
    assert!(!nested_progress.load(SeqCst), "the nested poll ran nothing");
    assert!(
        bh.is_scheduled(),
        "the schedule made during the callback is kept"
    );
    assert!(ctx.poll_nonblocking());
    assert_eq!(get(&n), 2);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(get(&n), 2);
}

/// Derived (R4): a handler registered from inside a callback is dispatched from the next
/// iteration on, not in the one that registered it.
pub fn handler_registered_in_callback_runs_next_iteration(make: MakeContext) {
    let ctx = new_ctx(make);
    let (ea, eb) = (
        Arc::new(EventNotifier::new().unwrap()),
        Arc::new(EventNotifier::new().unwrap()),
    );
    let b_ran = Rc::new(Cell::new(0u32));
    let b_slot: Rc<RefCell<Option<FdHandler>>> = Rc::new(RefCell::new(None));
    let (ea2, eb2, br, slot) = (ea.clone(), eb.clone(), b_ran.clone(), b_slot.clone());
    let a = ctx
        .fd_handler(ea.clone())
        .on_read(move |ctx| {
            assert!(ea2.test_and_clear());
            let (e, r) = (eb2.clone(), br.clone());
            let h = ctx
                .set_event_notifier(&eb2, move |_| {
                    assert!(e.test_and_clear());
                    r.set(r.get() + 1);
                })
                .unwrap();
            *slot.borrow_mut() = Some(h);
        })
        .register()
        .unwrap();
    drain(&ctx);
    eb.set().unwrap();
    ea.set().unwrap();
    assert!(ctx.poll_nonblocking());
    assert!(b_slot.borrow().is_some());
    assert_eq!(b_ran.get(), 0);
    assert!(ctx.poll_nonblocking());
    assert_eq!(b_ran.get(), 1);
    assert!(!ctx.poll_nonblocking());
    drop(a);
    drop(b_slot.borrow_mut().take());
}
