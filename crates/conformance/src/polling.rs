//! Adaptive polling (docs/qemu-semantics.md §4.3; QEMU's test-nested-aio-poll; conformance
//! cases 45 and 46) and isolation scopes, listed in [`polling_tests!`](crate::polling_tests).

use crate::support::*;

/// A context polling for up to 1 s (the default policy), and its watchdog.
fn polling_ctx(make: MakeContext) -> (AioContext, Watchdog) {
    let ctx = new_ctx(make);
    let wd = Watchdog::new(ctx.handle());
    ctx.set_poll_params(aio_core::PollParams::new(Duration::from_secs(1)))
        .unwrap();
    (ctx, wd)
}

/// What the callbacks of a [`Polled`] handler have seen, and what its poll function answers.
#[derive(Debug, Clone, Default)]
pub struct PolledCounts {
    /// Read callbacks run (dispatches by the fd).
    pub reads: Rc<Cell<u32>>,
    /// Poll function calls.
    pub polls: Rc<Cell<u32>>,
    /// Poll-ready callbacks run (dispatches by polling).
    pub readies: Rc<Cell<u32>>,
    /// `on_poll_begin` calls.
    pub begins: Rc<Cell<u32>>,
    /// `on_poll_end` calls.
    pub ends: Rc<Cell<u32>>,
    /// What the poll function answers.
    pub work: Rc<Cell<bool>>,
}

/// An event notifier registered with every polling callback, and what they have seen (its
/// [`PolledCounts`], reached through `Deref`): the conformance suite's polled handler, shared
/// with the other polling tests.
#[derive(Debug)]
pub struct Polled {
    /// The notifier; its fd is the handler's.
    pub e: Arc<EventNotifier>,
    /// The registration.
    pub handler: FdHandler,
    /// What its callbacks have seen.
    pub counts: PolledCounts,
}

impl std::ops::Deref for Polled {
    type Target = PolledCounts;
    fn deref(&self) -> &PolledCounts {
        &self.counts
    }
}

impl Polled {
    /// Registers a notifier (set at once if `set`) whose read callback clears it (and fails the
    /// case if it was not set), whose poll function counts and answers `work`, whose poll-ready
    /// callback counts, and whose begin/end callbacks check that they alternate.
    ///
    /// # Panics
    ///
    /// If the notifier or the registration fails, and (in the callbacks) on a spurious read
    /// or begin/end callbacks out of order.
    pub fn register(ctx: &AioContext, set: bool) -> Polled {
        Self::register_with(ctx, set, |_, _| {})
    }

    /// As [`register`](Self::register), with `ready` run by the poll-ready callback after it
    /// counted, given the context and the counts.
    ///
    /// # Panics
    ///
    /// As [`register`](Self::register).
    pub fn register_with(
        ctx: &AioContext,
        set: bool,
        mut ready: impl FnMut(&AioContext, &PolledCounts) + 'static,
    ) -> Polled {
        let e = Arc::new(EventNotifier::new().expect("event notifier"));
        if set {
            e.set().unwrap();
        }
        let counts = PolledCounts::default();
        let (c1, c2, c3, c4, c5) = (
            counts.clone(),
            counts.clone(),
            counts.clone(),
            counts.clone(),
            counts.clone(),
        );
        let notifier = e.clone();
        let handler = ctx
            .fd_handler(e.clone())
            .on_read(move |_| {
                assert!(notifier.test_and_clear(), "spurious read callback");
                c1.reads.set(c1.reads.get() + 1);
            })
            .on_poll(move || {
                c2.polls.set(c2.polls.get() + 1);
                c2.work.get()
            })
            .on_poll_ready(move |ctx| {
                c3.readies.set(c3.readies.get() + 1);
                ready(ctx, &c3);
            })
            .on_poll_begin(move || {
                assert_eq!(
                    c4.begins.get(),
                    c4.ends.get(),
                    "on_poll_begin twice in a row"
                );
                c4.begins.set(c4.begins.get() + 1);
            })
            .on_poll_end(move || {
                assert_eq!(
                    c5.begins.get(),
                    c5.ends.get() + 1,
                    "on_poll_end without on_poll_begin"
                );
                c5.ends.set(c5.ends.get() + 1);
            })
            .register()
            .expect("register");
        Polled { e, handler, counts }
    }
}

/// A notifier registered with `set_event_notifier` whose callback clears it (failing the
/// case if it was not set) and counts in `hits`: a handler without poll callbacks of its own.
#[derive(Debug)]
pub struct Counted {
    /// The notifier.
    pub notifier: Arc<EventNotifier>,
    /// The registration.
    pub handler: FdHandler,
    /// Read callbacks run.
    pub hits: Rc<Cell<u32>>,
}

impl Counted {
    /// Registers one.
    ///
    /// # Panics
    ///
    /// If the notifier or the registration fails, and (in the callback) on a spurious read.
    pub fn register(ctx: &AioContext) -> Counted {
        let notifier = Arc::new(EventNotifier::new().expect("event notifier"));
        let hits = Rc::new(Cell::new(0));
        let h = hits.clone();
        let handler = ctx
            .set_event_notifier(&notifier, move |e| {
                assert!(e.test_and_clear(), "spurious read callback");
                h.set(h.get() + 1);
            })
            .expect("register");
        Counted {
            notifier,
            handler,
            hits,
        }
    }
}

/// A non-blocking poll that finds nothing: it submits what the backend queued (io_uring's
/// re-arms) in a wait, so that the next blocking poll starts from a quiet backend. (QEMU skips
/// test-nested-aio-poll on io_uring because its `must_wait` stops polling while re-arms are
/// queued; here `prepare_polling` submits them, see `poll_right_after_an_fd_dispatch`.)
fn flush(ctx: &AioContext) {
    assert!(!ctx.poll_nonblocking(), "nothing to do");
}

/// QEMU's test-nested-aio-poll (§5, conformance case 45): a handler found ready by polling
/// whose poll-ready callback polls the context again (blocking) must not be polled again in the
/// nested call (it would find the same condition and recurse forever); the nested call
/// dispatches another handler's fd instead. With grow 2 and shrink 2, polling is effective the
/// first time around after a handler's first dispatch (QEMU 10, "adjust polling time also for
/// new handlers"). The maximum is 1 s, not QEMU's 1 ms, so that a slow machine's first block time
/// stays under it.
pub fn poll_nested_poll_does_not_poll(make: MakeContext) {
    let ctx = new_ctx(make);
    let wd = Watchdog::new(ctx.handle());
    let params = aio_core::PollParams::new(Duration::from_secs(1))
        .policy(aio_core::PollPolicy::Qemu10)
        .grow(2)
        .shrink(2);
    ctx.set_poll_params(params).unwrap();
    let nested = Rc::new(Cell::new(false));
    let pn_reads = Rc::new(Cell::new(0u32));
    let pn_readies = Rc::new(Cell::new(0u32));
    let polls_in_nested = Rc::new(Cell::new(0u32));
    let dummy_reads = Rc::new(Cell::new(0u32));
    let pn = Arc::new(EventNotifier::new().unwrap());
    let dummy = Arc::new(EventNotifier::new().unwrap());
    pn.set().unwrap();

    let (e, r) = (pn.clone(), pn_reads.clone());
    let (n1, n2, pin) = (nested.clone(), nested.clone(), polls_in_nested.clone());
    let (d, rr) = (dummy.clone(), pn_readies.clone());
    let _pn = ctx
        .fd_handler(pn.clone())
        .on_read(move |_| {
            assert!(e.test_and_clear(), "spurious read");
            r.set(r.get() + 1);
        })
        .on_poll(move || {
            if n1.get() {
                pin.set(pin.get() + 1);
            }
            true
        })
        .on_poll_ready(move |ctx| {
            assert!(!n2.get(), "poll-ready re-entered");
            n2.set(true);
            d.set().unwrap();
            assert!(ctx.poll(), "the nested poll dispatches the dummy's fd");
            n2.set(false);
            rr.set(rr.get() + 1);
        })
        .register()
        .unwrap();
    let (de, dr, n3, pin2) = (
        dummy.clone(),
        dummy_reads.clone(),
        nested.clone(),
        polls_in_nested.clone(),
    );
    let _dummy = ctx
        .fd_handler(dummy.clone())
        .on_read(move |_| {
            assert!(de.test_and_clear(), "spurious read");
            dr.set(dr.get() + 1);
        })
        .on_poll(move || {
            if n3.get() {
                pin2.set(pin2.get() + 1);
            }
            false
        })
        .on_poll_ready(|_| panic!("the dummy's poll-ready callback must never run"))
        .register()
        .unwrap();

    // 1. Nothing to do without blocking (the notifier is readable, but a non-blocking poll of a
    //    fresh context dispatches it: QEMU's first call returns false only because its
    //    registration notified; ours does not, so dispatch it here).
    assert!(
        ctx.poll_nonblocking(),
        "the set notifier's read callback runs"
    );
    assert_eq!((pn_reads.get(), pn_readies.get()), (1, 0));
    // 2. Dispatched by readiness, it joined the poll set with a first window of 4 µs.
    assert_eq!(ctx.poll_window(), Duration::from_micros(4));
    // 3. Polling finds it; its poll-ready callback runs a nested poll.
    flush(&ctx);
    assert!(ctx.poll(), "the poll-ready path runs");
    assert_eq!(
        (pn_reads.get(), pn_readies.get(), dummy_reads.get()),
        (1, 1, 1)
    );
    assert_eq!(
        polls_in_nested.get(),
        0,
        "no poll function ran in the nested poll"
    );
    // 4. And again.
    flush(&ctx);
    assert!(ctx.poll());
    assert_eq!(
        (pn_reads.get(), pn_readies.get(), dummy_reads.get()),
        (1, 2, 2)
    );
    assert!(!wd.fired(), "a blocking poll hung");
}

/// A nested blocking poll inside a poll-ready callback leaves polling mode before it sleeps,
/// and the handler whose callback is running gets its `on_poll_end` too (every member got
/// `on_poll_begin`), though it is not polled: begin and end keep alternating for it.
pub fn poll_nested_poll_ends_polling_mode_for_the_running_handler(make: MakeContext) {
    let (ctx, wd) = polling_ctx(make);
    let dummy = Counted::register(&ctx);
    let ends_in_nested = Rc::new(Cell::new(None));
    let (d, ein) = (dummy.notifier.clone(), ends_in_nested.clone());
    let h = Polled::register_with(&ctx, true, move |ctx, counts| {
        counts.work.set(false);
        let before = counts.ends.get();
        // The nested poll sleeps until the dummy is set: it must leave polling mode first.
        d.set().unwrap();
        assert!(ctx.poll(), "the nested poll dispatches the dummy");
        ein.set(Some(counts.ends.get() - before));
    });
    // Both join the poll set, so that polling covers every handler and the outer iteration
    // that finds `h` needs no wait: it is still in polling mode when the callback runs.
    dummy.notifier.set().unwrap();
    assert!(
        ctx.poll_nonblocking(),
        "dispatched by their fds: both join the poll set"
    );
    assert_eq!(dummy.hits.get(), 1);
    flush(&ctx);
    for round in 1..=2 {
        h.work.set(true);
        assert!(ctx.poll(), "round {round}: found by polling");
        assert_eq!(h.readies.get(), round);
        assert_eq!(dummy.hits.get(), round + 1);
        assert_eq!(
            ends_in_nested.get(),
            Some(1),
            "round {round}: on_poll_end ran in the nested poll, for the running handler"
        );
        assert_eq!((h.begins.get(), h.ends.get()), (round, round));
        flush(&ctx);
    }
    assert!(!wd.fired(), "a blocking poll hung");
}

/// Polling runs in the iteration right after a dispatch by fd readiness, on every backend:
/// io_uring, whose `must_wait` asks for a wait while the dispatched handler's re-arm is queued,
/// submits it in `prepare_polling` and polls. Here only polling can see the work (the fd is
/// not readable), so a backend that slept instead would hang until the watchdog.
pub fn poll_right_after_an_fd_dispatch(make: MakeContext) {
    let (ctx, wd) = polling_ctx(make);
    let h = Polled::register(&ctx, true);
    for round in 1..=3 {
        h.e.set().unwrap();
        assert!(ctx.poll(), "round {round}: dispatched by its fd");
        assert_eq!(h.reads.get(), round);
        h.work.set(true);
        assert!(ctx.poll(), "round {round}: found by polling");
        assert_eq!(h.readies.get(), round, "round {round}: poll-ready ran");
        h.work.set(false);
    }
    assert!(!wd.fired(), "a blocking poll hung");
}

/// Members that leave the poll set while the loop is in polling mode get `on_poll_end`, so that
/// their producers kick again: one replaced, one removed, and one removed by its own
/// `on_poll_end` while polling mode is being left (the members after it in the set still get
/// theirs). And a non-blocking poll, which never polls, leaves polling mode.
pub fn poll_members_that_leave_get_on_poll_end(make: MakeContext) {
    let (ctx, wd) = polling_ctx(make);
    let into_polling_mode = |h: &Polled| {
        assert!(
            ctx.poll_nonblocking(),
            "dispatched by its fd: joins the poll set"
        );
        flush(&ctx);
        h.work.set(true);
        assert!(ctx.poll(), "found by polling");
        h.work.set(false);
        assert_eq!((h.begins.get(), h.ends.get()), (1, 0), "in polling mode");
    };

    // Replaced.
    let mut a = Polled::register(&ctx, true);
    into_polling_mode(&a);
    let replacement_reads = Rc::new(Cell::new(0u32));
    let (e, rr) = (a.e.clone(), replacement_reads.clone());
    ctx.fd_handler(a.e.clone())
        .on_read(move |_| {
            assert!(e.test_and_clear(), "spurious read");
            rr.set(rr.get() + 1);
        })
        .replace(&mut a.handler)
        .unwrap();
    assert_eq!(
        (a.begins.get(), a.ends.get()),
        (1, 1),
        "replaced: on_poll_end"
    );
    a.e.set().unwrap();
    assert!(ctx.poll());
    assert_eq!(replacement_reads.get(), 1, "the replacement runs");
    drop(a);

    // Removed.
    let b = Polled::register(&ctx, true);
    into_polling_mode(&b);
    let Polled {
        handler, counts, ..
    } = b;
    drop(handler);
    assert_eq!(
        (counts.begins.get(), counts.ends.get()),
        (1, 1),
        "removed: on_poll_end"
    );

    // Removed by its own on_poll_end, ahead of another member in the set.
    let d_e = Arc::new(EventNotifier::new().unwrap());
    d_e.set().unwrap();
    let slot: Rc<RefCell<Option<FdHandler>>> = Rc::default();
    let (d_begins, d_ends) = (Rc::new(Cell::new(0u32)), Rc::new(Cell::new(0u32)));
    let (n, db, de, sl) = (d_e.clone(), d_begins.clone(), d_ends.clone(), slot.clone());
    let d = ctx
        .fd_handler(d_e.clone())
        .on_read(move |_| assert!(n.test_and_clear(), "spurious read"))
        .on_poll(|| false)
        .on_poll_ready(|_| panic!("never found by polling"))
        .on_poll_begin(move || db.set(db.get() + 1))
        .on_poll_end(move || {
            de.set(de.get() + 1);
            drop(sl.borrow_mut().take());
        })
        .register()
        .unwrap();
    *slot.borrow_mut() = Some(d);
    assert!(ctx.poll_nonblocking(), "d joins the poll set first");
    let c = Polled::register(&ctx, true);
    into_polling_mode(&c);
    assert_eq!(d_begins.get(), 1);
    // A non-blocking poll does not poll, so it leaves polling mode (before its backend wait,
    // if any): d removes itself, and c, after it, still gets its end.
    assert!(!ctx.poll_nonblocking());
    assert_eq!(d_ends.get(), 1);
    assert!(slot.borrow().is_none(), "d removed itself");
    assert_eq!((c.begins.get(), c.ends.get()), (1, 1), "c was not skipped");
    assert!(!wd.fired(), "a blocking poll hung");
}

/// A blocking `poll` from a callback that an outer loop's `dispatch` runs is nested: it never
/// busy-polls (QEMU's test-nested-aio-poll rule, for contexts driven by glib or tokio).
pub fn poll_outer_dispatch_callback_polls_nested(make: MakeContext) {
    let (ctx, wd) = polling_ctx(make);
    let h = Polled::register(&ctx, true);
    assert!(
        ctx.poll_nonblocking(),
        "dispatched by its fd: joins the poll set"
    );
    flush(&ctx);
    assert!(ctx.poll_window() > Duration::ZERO);
    let dummy = Counted::register(&ctx);
    let (mut a, b) = socket_pair();
    let polls_in_nested = Rc::new(Cell::new(None));
    let (pin, polls, d, mut reader) = (
        polls_in_nested.clone(),
        h.polls.clone(),
        dummy.notifier.clone(),
        b.try_clone().unwrap(),
    );
    let _plain = ctx
        .fd_handler(b)
        .on_read(move |ctx| {
            read_all_available(&mut reader);
            let before = polls.get();
            d.set().unwrap();
            assert!(ctx.poll(), "the nested poll dispatches the dummy");
            pin.set(Some(polls.get() - before));
        })
        .register()
        .unwrap();
    a.write_all(b"x").unwrap();
    ctx.prepare();
    assert!(ctx.check());
    assert!(ctx.dispatch());
    assert_eq!(
        polls_in_nested.get(),
        Some(0),
        "no poll function ran in the nested poll"
    );
    assert_eq!(h.begins.get(), 0, "no polling mode");
    assert!(!wd.fired(), "a blocking poll hung");
}

/// Conformance case 46, on a real context: with a maximum of 0 no poll function is called;
/// a handler's first dispatch by readiness gives it a 4 µs window; a window of 0 means no
/// polling; a non-blocking poll never busy-polls; and a slow handler (its block time above the
/// maximum) does not switch polling off for a fast one (QEMU 10's per-handler windows).
pub fn poll_windows_are_per_handler(make: MakeContext) {
    let ctx = new_ctx(make);
    let wd = Watchdog::new(ctx.handle());
    let fast = Polled::register(&ctx, false);
    fast.work.set(true);
    fast.e.set().unwrap();
    assert!(ctx.poll());
    let stats = ctx.stats();
    assert_eq!(fast.reads.get(), 1);
    assert_eq!(fast.polls.get(), 0, "polling is off by default");
    assert_eq!((stats.poll_hits, stats.poll_misses), (0, 0));
    assert_eq!(ctx.poll_window(), Duration::ZERO);

    // 100 ms: the fast handler's block times stay far below it, the slow one's go above.
    let max = Duration::from_millis(100);
    ctx.set_poll_params(
        aio_core::PollParams::new(max)
            .policy(aio_core::PollPolicy::Qemu10)
            .shrink(2),
    )
    .unwrap();
    fast.e.set().unwrap();
    assert!(ctx.poll());
    assert_eq!(fast.reads.get(), 2);
    assert_eq!(ctx.poll_window(), Duration::from_micros(4), "first window");
    assert_eq!(
        fast.polls.get(),
        0,
        "the window was 0 when this iteration began"
    );

    // A non-blocking poll never busy-polls, even with work to find.
    flush(&ctx);
    assert_eq!(fast.polls.get(), 0);
    assert_eq!(fast.begins.get(), 0);

    // A blocking poll polls, finds work, and runs the poll-ready callback, not the read one.
    assert!(ctx.poll());
    assert_eq!((fast.reads.get(), fast.readies.get()), (2, 1));
    assert!(fast.polls.get() >= 1);
    assert_eq!(fast.begins.get(), 1, "polling mode entered once");
    let stats = ctx.stats();
    assert_eq!((stats.poll_hits, stats.poll_misses), (1, 0));
    let fast_window = ctx.poll_window();
    assert!(fast_window >= Duration::from_micros(4));
    fast.work.set(false);

    // A slow handler: another thread makes it readable 300 ms into a blocking poll. Its socket
    // is shared, so that its number can be checked against the poll set below.
    let (mut a, b) = socket_pair();
    let b = Rc::new(b);
    let (slow_reads, read) = counting_reader(&b);
    let _slow = ctx
        .fd_handler(b.clone())
        .on_read(read)
        .on_poll(|| false)
        .on_poll_ready(|_| panic!("the slow handler's poll never finds work"))
        .register()
        .unwrap();
    let writer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        a.write_all(b"x").unwrap();
        a
    });
    while slow_reads.get() == 0 {
        ctx.poll();
    }
    let _a = writer.join().unwrap();
    assert_eq!(fast.readies.get(), 1);
    assert_eq!(
        ctx.poll_window(),
        fast_window,
        "the slow handler's long block time left the fast handler's window alone"
    );
    // Both are in the poll set, each with its own window, as `Stats` lists them.
    let set = ctx.stats().poll_set;
    let entry = |h: &FdHandler| set.iter().find(|p| p.key == h.key()).copied();
    let fast_entry = entry(&fast.handler).expect("the fast handler is in the poll set");
    assert_eq!(
        (fast_entry.fd, fast_entry.window),
        (fast.e.raw_fd(), fast_window)
    );
    let slow_entry = entry(&_slow).expect("the slow handler joined on its fd dispatch");
    assert_eq!(
        (slow_entry.fd, slow_entry.window),
        (b.as_raw_fd(), Duration::ZERO)
    );
    // Its polling mode was left before each sleep.
    assert_eq!(fast.begins.get(), fast.ends.get());
    assert!(!wd.fired(), "a blocking poll hung");
}

/// Rule: polling never starves a handler that has no poll function. A polled handler always
/// has work, so every blocking poll finds it by polling; an fd-only handler next to it is still
/// dispatched in the iteration after its fd becomes readable, on every backend.
pub fn poll_fd_only_handler_next_to_polled_one_runs(make: MakeContext) {
    let (ctx, wd) = polling_ctx(make);
    let busy = Polled::register(&ctx, true);
    busy.work.set(true);
    assert!(ctx.poll_nonblocking());
    assert_eq!(
        busy.reads.get(),
        1,
        "dispatched by readiness: joins the poll set"
    );
    let (mut a, b) = socket_pair();
    let (reads, read) = counting_reader(&b);
    let _plain = ctx.fd_handler(b).on_read(read).register().unwrap();
    // A non-blocking poll does not poll, so it finds nothing even though the busy handler
    // always has work.
    flush(&ctx);
    // Polling finds the busy handler in every iteration.
    for _ in 0..3 {
        assert!(ctx.poll());
    }
    assert!(busy.readies.get() >= 1, "polling found the busy handler");
    for round in 1..=5 {
        a.write_all(b"x").unwrap();
        assert!(ctx.poll());
        assert_eq!(
            reads.get(),
            round,
            "the fd-only handler ran in the same iteration"
        );
    }
    assert!(!wd.fired(), "a blocking poll hung");
}

/// `poll_in_backend`: a handler with no poll function joins the poll set on a backend that
/// shows fd readiness in userspace (io_uring), and a polling phase then ends as soon as its fd
/// is ready (`poll_backend_ends`), its read callback running in the same `poll`; on the other
/// backends it never joins and the loop never polls for it.
pub fn poll_in_backend_joins_only_where_readiness_shows(make: MakeContext) {
    let ctx = new_ctx(make);
    let wd = Watchdog::new(ctx.handle());
    // QEMU 10's rule, growing 255-fold: a handful of 5 ms block times open a window of
    // hundreds of ms, under the 1 s maximum.
    ctx.set_poll_params(
        aio_core::PollParams::new(Duration::from_secs(1))
            .policy(aio_core::PollPolicy::Qemu10)
            .grow(255),
    )
    .unwrap();
    let shows_readiness = ctx.backend() == "io_uring";
    let (a, b) = socket_pair();
    let (reads, read) = counting_reader(&b);
    let handler = ctx
        .fd_handler(b)
        .on_read(read)
        .poll_in_backend()
        .register()
        .unwrap();
    let in_set = |ctx: &AioContext| ctx.stats().poll_set.iter().any(|p| p.key == handler.key());
    // A byte `ms` into a blocking poll, from another thread.
    let mut a = Some(a);
    let mut delayed_byte = |ctx: &AioContext, ms: u64| {
        let mut w = a.take().unwrap();
        let writer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(ms));
            w.write_all(b"x").unwrap();
            w
        });
        let before = reads.get();
        while reads.get() == before {
            ctx.poll();
        }
        a = Some(writer.join().unwrap());
    };
    delayed_byte(&ctx, 5);
    assert_eq!(in_set(&ctx), shows_readiness, "{}", ctx.backend());
    for _ in 0..4 {
        delayed_byte(&ctx, 5);
    }
    let stats = ctx.stats();
    if shows_readiness {
        assert!(
            ctx.poll_window() >= Duration::from_millis(100),
            "{:?}",
            ctx.poll_window()
        );
        // The window is far longer than a 20 ms wait: the next byte ends a polling phase.
        flush(&ctx);
        let ends = stats.poll_backend_ends;
        delayed_byte(&ctx, 20);
        let after = ctx.stats();
        assert_eq!(
            after.poll_backend_ends,
            ends + 1,
            "the byte ended the phase"
        );
        assert_eq!(
            after.poll_hits, stats.poll_hits,
            "no poll function found it"
        );
        assert!(after.poll_time > stats.poll_time);
        assert!(
            after.poll_time - stats.poll_time < Duration::from_millis(500),
            "polled {:?}, not the whole window",
            after.poll_time - stats.poll_time
        );

        // A timer 20 ms away caps the window: that phase ends by the clock, not the backend.
        let (fired, timer) = flag_timer(&ctx);
        flush(&ctx);
        let before = ctx.stats();
        timer.arm_after(Duration::from_millis(20));
        while !fired.load(SeqCst) {
            ctx.poll();
        }
        let after = ctx.stats();
        assert_eq!(
            after.poll_backend_ends, before.poll_backend_ends,
            "ended by the clock"
        );
        assert!(after.poll_misses > before.poll_misses);

        // A BH scheduled from another thread during a phase (a notify that writes no eventfd,
        // the notifier not being in the poll set) ends the phase at once, not after the
        // window (about 261 ms here).
        let window = ctx.poll_window();
        assert!(window >= Duration::from_millis(200), "{window:?}");
        flush(&ctx);
        let ran = Arc::new(AtomicBool::new(false));
        let (r, handle) = (ran.clone(), ctx.handle());
        let scheduler = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            handle.schedule_oneshot(move || r.store(true, SeqCst));
        });
        let start = Instant::now();
        while !ran.load(SeqCst) {
            ctx.poll();
        }
        let took = start.elapsed();
        scheduler.join().unwrap();
        assert!(
            took < window - Duration::from_millis(50),
            "the BH ran after {took:?}, the window being {window:?}"
        );
    } else {
        assert_eq!(
            (
                stats.poll_time,
                stats.poll_hits,
                stats.poll_misses,
                stats.poll_backend_ends
            ),
            (Duration::ZERO, 0, 0, 0),
            "nothing to poll on {}",
            ctx.backend()
        );
    }
    assert_eq!(reads.get(), if shows_readiness { 6 } else { 5 });

    // The same through a `ContextHandle` (registered at once on the home thread).
    let (mut c, d) = socket_pair();
    let remote_reads = Arc::new(AtomicU32::new(0));
    let (rr, mut reader) = (remote_reads.clone(), d.try_clone().unwrap());
    let remote = ctx
        .handle()
        .fd_handler(d)
        .on_read(move |_| {
            assert!(read_all_available(&mut reader) > 0, "spurious read");
            rr.fetch_add(1, SeqCst);
        })
        .poll_in_backend()
        .register()
        .unwrap();
    c.write_all(b"x").unwrap();
    while remote_reads.load(SeqCst) == 0 {
        ctx.poll();
    }
    let remote_in_set = ctx.stats().poll_set.iter().any(|p| p.key == remote.key());
    assert_eq!(remote_in_set, shows_readiness, "{}", ctx.backend());
    assert!(!wd.fired(), "a blocking poll hung");
}

/// A poll-ready callback and a poll function that remove their own handler: neither runs
/// again, and the handler's closures are freed.
pub fn poll_callback_removes_its_own_handler(make: MakeContext) {
    for remove_in_poll in [false, true] {
        let ctx = new_ctx(make);
        let wd = Watchdog::new(ctx.handle());
        ctx.set_poll_params(aio_core::PollParams::new(Duration::from_secs(1)))
            .unwrap();
        let freed = drops();
        let guard = DropCount::new(&freed);
        let e = Arc::new(EventNotifier::new().unwrap());
        e.set().unwrap();
        let slot: Rc<RefCell<Option<FdHandler>>> = Rc::new(RefCell::new(None));
        let (polls, readies) = (Rc::new(Cell::new(0u32)), Rc::new(Cell::new(0u32)));
        let (p, s1) = (polls.clone(), slot.clone());
        let (rd, s2) = (readies.clone(), slot.clone());
        let e2 = e.clone();
        let h = ctx
            .fd_handler(e.clone())
            .on_read(move |_| {
                guard.keep();
                assert!(e2.test_and_clear(), "spurious read");
            })
            .on_poll(move || {
                p.set(p.get() + 1);
                if remove_in_poll {
                    drop(s1.borrow_mut().take());
                }
                true
            })
            .on_poll_ready(move |_| {
                rd.set(rd.get() + 1);
                drop(s2.borrow_mut().take());
            })
            .register()
            .unwrap();
        *slot.borrow_mut() = Some(h);
        assert!(
            ctx.poll_nonblocking(),
            "dispatched by readiness: joins the poll set"
        );
        flush(&ctx);
        // The next blocking poll polls it; a watchdog guards a poll that would wait forever
        // once the handler is gone.
        ctx.poll();
        assert_eq!(polls.get(), 1, "polled once, then gone");
        assert_eq!(readies.get(), u32::from(!remove_in_poll));
        assert!(slot.borrow().is_none());
        assert_eq!(freed.load(SeqCst), 1, "the handler's closures were freed");
        flush(&ctx);
        assert_eq!(polls.get(), 1);
        assert!(!wd.fired(), "a blocking poll hung");
    }
}

/// Parameters changed from another thread: the loop is woken, the windows restart from 0, and
/// a maximum of 0 switches polling off.
pub fn poll_params_from_another_thread_take_effect(make: MakeContext) {
    let ctx = new_ctx(make);
    let wd = Watchdog::new(ctx.handle());
    let on = aio_core::PollParams::new(Duration::from_secs(1)).policy(aio_core::PollPolicy::Qemu10);
    ctx.set_poll_params(on).unwrap();
    let h = Polled::register(&ctx, true);
    assert!(ctx.poll());
    assert_eq!(ctx.poll_window(), Duration::from_micros(4));

    let remote = ctx.handle();
    thread::spawn(move || {
        remote
            .set_poll_params(aio_core::PollParams::disabled())
            .unwrap()
    })
    .join()
    .unwrap();
    assert!(ctx.poll_params().is_disabled());
    assert!(!ctx.poll(), "woken by the change: no progress, no polling");
    assert_eq!(ctx.poll_window(), Duration::ZERO);
    h.work.set(true);
    h.e.set().unwrap();
    let polls = h.polls.get();
    assert!(ctx.poll());
    assert_eq!(h.reads.get(), 2);
    assert_eq!(
        h.polls.get(),
        polls,
        "no poll function runs with a maximum of 0"
    );
    assert_eq!(ctx.poll_window(), Duration::ZERO);

    let remote = ctx.handle();
    let bad = aio_core::PollParams::new(Duration::from_secs(u64::MAX / 2_000_000_000));
    let refused = thread::spawn(move || {
        let refused = remote.set_poll_params(bad).unwrap_err().kind();
        remote.set_poll_params(on).unwrap();
        refused
    })
    .join()
    .unwrap();
    assert_eq!(refused, io::ErrorKind::InvalidInput);
    assert_eq!(ctx.poll_params(), on);
    h.e.set().unwrap();
    assert!(ctx.poll());
    assert_eq!(h.reads.get(), 3);
    assert_eq!(
        ctx.poll_window(),
        Duration::from_micros(4),
        "restarted from 0"
    );
    assert!(!wd.fired(), "a blocking poll hung");
}

/// The context's notify flag is a built-in poller: once its own notifier has been dispatched
/// (a remote wake-up), a BH scheduled from another thread while the loop busy-polls is seen
/// without an eventfd write. (Whether the schedule lands while the loop polls is up to the
/// scheduler: it may land before the poll starts, and then nothing is polled; or after the
/// window, and then the write is allowed. Only a polling phase that found it is checked.)
pub fn poll_remote_schedule_seen_while_polling(make: MakeContext) {
    let ctx = new_ctx(make);
    let wd = Watchdog::new(ctx.handle());
    // Weighted: the window jumps to the first block time (about 50 ms here), not 4 µs.
    let params = aio_core::PollParams::new(Duration::from_secs(600))
        .policy(aio_core::PollPolicy::Weighted { weight: 2 });
    ctx.set_poll_params(params).unwrap();
    let ran = counter();
    let (remote, r) = (ctx.handle(), ran.clone());
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        remote.schedule_oneshot(move || {
            r.fetch_add(1, SeqCst);
        });
    });
    while get(&ran) == 0 {
        ctx.poll();
    }
    t.join().unwrap();
    assert!(
        ctx.poll_window() > Duration::ZERO,
        "the notifier joined the poll set with the block time as its window"
    );
    flush(&ctx);
    let before = ctx.stats();
    let (remote, r) = (ctx.handle(), ran.clone());
    let t = thread::spawn(move || {
        remote.schedule_oneshot(move || {
            r.fetch_add(1, SeqCst);
        })
    });
    while get(&ran) == 1 {
        ctx.poll();
    }
    t.join().unwrap();
    let after = ctx.stats();
    if after.poll_hits > before.poll_hits && after.poll_misses == before.poll_misses {
        assert_eq!(
            after.event_writes, before.event_writes,
            "seen by polling: no eventfd write"
        );
    }
    assert!(!wd.fired(), "a blocking poll hung");
}

/// An event notifier registered with `set_event_notifier` has a built-in poll function, its
/// flag: once dispatched by its fd it joins the poll set, and a later `set` is found by the
/// first round of the next polling phase and handled through the poll-ready path, with the
/// same callback (which drains the fd, so the backend does not report it again). On io_uring,
/// the completion ring already holds the fd's poll completion, and polling yields to it.
pub fn poll_event_notifier_polled_through_its_flag(make: MakeContext) {
    let (ctx, wd) = polling_ctx(make);
    let e = Arc::new(EventNotifier::new().expect("event notifier"));
    let reads = Rc::new(Cell::new(0u32));
    let r = reads.clone();
    let _h = ctx
        .set_event_notifier(&e, move |e| {
            assert!(e.test_and_clear(), "spurious read callback");
            r.set(r.get() + 1);
        })
        .unwrap();
    e.set().unwrap();
    assert!(ctx.poll(), "dispatched by its fd");
    assert_eq!(reads.get(), 1);
    assert!(!e.is_set(), "the callback cleared the flag");
    assert!(
        ctx.poll_window() > Duration::ZERO,
        "dispatched by its fd, the notifier joined the poll set and its window grew"
    );
    flush(&ctx);
    let before = ctx.stats();
    e.set().unwrap();
    assert!(ctx.poll(), "found by polling");
    assert_eq!(reads.get(), 2);
    let after = ctx.stats();
    if ctx.backend().contains("uring") {
        // On io_uring the kernel posts the fd's poll completion as `set` writes it; the ring
        // is then the poller (`must_wait`), and busy polling yields to it without a round.
        assert_eq!(after.poll_hits, before.poll_hits, "io_uring: the ring wins");
    } else {
        assert_eq!(after.poll_hits, before.poll_hits + 1, "a polling hit");
    }
    assert_eq!(after.poll_misses, before.poll_misses);
    // The read callback drained the fd: nothing left for the backend to report.
    flush(&ctx);
    assert_eq!(reads.get(), 2);
    assert!(!wd.fired(), "a blocking poll hung");
}

/// A polling context, and a [`Polled`] handler that joined its poll set, then had work found by
/// polling, which leaves the context in polling mode.
fn left_in_polling_mode_with_work(make: MakeContext) -> (AioContext, Watchdog, Polled) {
    let (ctx, wd) = polling_ctx(make);
    let h = Polled::register(&ctx, true);
    assert!(ctx.poll_nonblocking());
    flush(&ctx);
    h.work.set(true);
    assert!(ctx.poll(), "found by polling");
    (ctx, wd, h)
}

/// An outer loop driving a context that an earlier `poll` left in polling mode: `prepare`
/// leaves it (`on_poll_end`, then one more poll) before the outer loop may sleep, and what
/// that poll finds is dispatched by `dispatch` through the poll-ready callback.
pub fn poll_outer_loop_leaves_polling_mode(make: MakeContext) {
    let (ctx, wd, h) = left_in_polling_mode_with_work(make);
    assert_eq!((h.readies.get(), h.begins.get(), h.ends.get()), (1, 1, 0));
    assert_eq!(
        ctx.prepare(),
        Some(Duration::ZERO),
        "the last poll found work"
    );
    assert_eq!((h.begins.get(), h.ends.get()), (1, 1));
    assert!(ctx.check());
    assert!(ctx.dispatch());
    assert_eq!((h.reads.get(), h.readies.get()), (1, 2));
    h.work.set(false);
    ctx.prepare();
    assert!(!ctx.check(), "nothing left");
    assert!(!ctx.dispatch());
    assert_eq!(
        (h.begins.get(), h.ends.get()),
        (1, 1),
        "an outer loop never busy-polls"
    );
    assert!(!wd.fired(), "a blocking poll hung");
}

/// A handler that `prepare` found work for (leaving polling mode), removed before the outer
/// loop's `dispatch`: it is freed at once, with its callbacks and the fd it owns, not kept
/// until a `dispatch` that may never come (the outer loop may stop driving the context), and
/// `dispatch` does not run it.
pub fn poll_outer_loop_frees_a_hit_removed_before_dispatch(make: MakeContext) {
    let (ctx, wd, h) = left_in_polling_mode_with_work(make);
    assert_eq!(
        ctx.prepare(),
        Some(Duration::ZERO),
        "the last poll found work"
    );
    let Polled { e, handler, counts } = h;
    let held = Rc::strong_count(&counts.readies);
    drop(handler);
    freed_and_never_dispatched(&ctx, &e, &counts, held);
    assert!(!wd.fired(), "a blocking poll hung");
}

/// As [`poll_outer_loop_frees_a_hit_removed_before_dispatch`], with the removal made by another
/// member's `on_poll_end` while `prepare` leaves polling mode, after the removed handler's poll
/// found work: it is not kept for `dispatch` either.
pub fn poll_outer_loop_frees_a_hit_removed_while_leaving_polling_mode(make: MakeContext) {
    let (ctx, wd) = polling_ctx(make);
    let a = Polled::register(&ctx, true);
    assert!(ctx.poll_nonblocking(), "a joins the poll set first");
    let Polled { e, handler, counts } = a;
    let victim = Rc::new(RefCell::new(Some(handler)));
    let b = Arc::new(EventNotifier::new().expect("event notifier"));
    b.set().unwrap();
    let (notifier, v) = (b.clone(), victim.clone());
    let _b = ctx
        .fd_handler(b.clone())
        .on_read(move |_| assert!(notifier.test_and_clear(), "spurious read callback"))
        .on_poll(|| false)
        .on_poll_ready(|_| panic!("b never has work"))
        .on_poll_end(move || drop(v.borrow_mut().take()))
        .register()
        .expect("register");
    assert!(ctx.poll(), "b joins the poll set");
    flush(&ctx);
    counts.work.set(true);
    assert!(ctx.poll(), "a found by polling");
    assert!(victim.borrow().is_some(), "on_poll_end ran too early");
    let held = Rc::strong_count(&counts.readies);
    ctx.prepare();
    assert!(victim.borrow().is_none(), "b's on_poll_end did not run");
    freed_and_never_dispatched(&ctx, &e, &counts, held);
    assert!(!wd.fired(), "a blocking poll hung");
}

/// Checks that the handler of `e` and `counts`, removed while an outer loop's `prepare` had
/// found it ready, is gone (its callbacks held `held` references to the counts, its node a
/// reference to `e`), and that the outer loop's `check` and `dispatch` do not run it.
fn freed_and_never_dispatched(
    ctx: &AioContext,
    e: &Arc<EventNotifier>,
    counts: &PolledCounts,
    held: usize,
) {
    assert!(
        Rc::strong_count(&counts.readies) < held,
        "the removed handler's callbacks are still alive"
    );
    assert_eq!(
        Arc::strong_count(e),
        1,
        "the removed handler's fd is still held"
    );
    ctx.check();
    ctx.dispatch();
    assert_eq!(
        counts.readies.get(),
        1,
        "the removed handler was dispatched"
    );
}

/// Isolation scopes (seed 003, `AioContext::isolated`): a readable fd of an outer scope is
/// taken out of the backend while a scope waits for its own notifier, so the scope's blocking
/// waits sleep (a handful of them, not a spin); the outer handler runs once the scope ends.
pub fn isolation_scope_holds_a_readable_outer_fd(make: MakeContext) {
    let ctx = make().unwrap();
    let outer = Arc::new(EventNotifier::new().unwrap());
    outer.set().unwrap();
    let outer_runs = Rc::new(Cell::new(0));
    let o = outer_runs.clone();
    // Never cleared while the test runs: level-triggered, it stays readable.
    let outer_handler = ctx
        .set_event_notifier(&outer, move |_| o.set(o.get() + 1))
        .unwrap();
    let waits_before = ctx.stats().waits;
    ctx.isolated(|_| {
        let own = Arc::new(EventNotifier::new().unwrap());
        let done = Rc::new(Cell::new(false));
        let d = done.clone();
        let _own = ctx
            .set_event_notifier(&own, move |n| {
                n.test_and_clear();
                d.set(true);
            })
            .unwrap();
        let setter = own.clone();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            setter.set().unwrap();
        });
        while !done.get() {
            ctx.poll();
        }
        t.join().unwrap();
    });
    let waits = ctx.stats().waits - waits_before;
    assert!(waits < 10, "{waits} waits: the held fd made the loop spin");
    assert_eq!(
        outer_runs.get(),
        0,
        "the outer handler ran inside the scope"
    );
    ctx.poll_nonblocking();
    assert!(
        outer_runs.get() >= 1,
        "the outer fd is watched again after the scope"
    );
    drop(outer_handler);
    outer.test_and_clear();
}
