//! fd handlers on sockets and pipes, listed in [`fd_handler_tests!`](crate::fd_handler_tests).

use crate::support::*;

/// Spec §4.4: a handler with read and write callbacks; each is called for its own readiness.
pub fn fd_read_and_write_callbacks(make: MakeContext) {
    let ctx = new_ctx(make);
    let (mut a, b) = socket_pair();
    let mut reader = b.try_clone().unwrap();
    let got = Rc::new(RefCell::new(Vec::new()));
    let (reads, writes) = (Rc::new(Cell::new(0u32)), Rc::new(Cell::new(0u32)));
    let (g, r, w) = (got.clone(), reads.clone(), writes.clone());
    let h = ctx
        .fd_handler(b)
        .on_read(move |_| {
            r.set(r.get() + 1);
            let mut buf = [0u8; 64];
            let n = reader.read(&mut buf).expect("readable");
            g.borrow_mut().extend_from_slice(&buf[..n]);
        })
        .on_write(move |_| w.set(w.get() + 1))
        .register()
        .unwrap();
    assert!(ctx.poll_nonblocking(), "a socket with room is writable");
    assert_eq!((reads.get(), writes.get()), (0, 1));
    a.write_all(b"hello").unwrap();
    assert!(ctx.poll_nonblocking());
    assert_eq!((reads.get(), writes.get()), (1, 2));
    assert_eq!(&got.borrow()[..], b"hello");
    drop(h);
    assert!(!ctx.poll_nonblocking());
    assert_eq!((reads.get(), writes.get()), (1, 2));
}

/// Spec §6 / DESIGN §3 (level triggering): a read callback that leaves data unread is called
/// again on every poll.
pub fn fd_level_triggered_unread_data(make: MakeContext) {
    let ctx = new_ctx(make);
    let (mut a, b) = socket_pair();
    let b = Rc::new(b);
    let calls = Rc::new(Cell::new(0u32));
    let c = calls.clone();
    let h = ctx
        .fd_handler(b.clone())
        .on_read(move |_| c.set(c.get() + 1))
        .register()
        .unwrap();
    drain(&ctx);
    a.write_all(b"unread").unwrap();
    for i in 1..=3 {
        assert!(ctx.poll_nonblocking());
        assert_eq!(calls.get(), i);
    }
    assert_eq!(read_all_available(&*b), 6);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(calls.get(), 3);
    drop(h);
}

/// Issue 10, defect 4: with adaptive polling off (the default), the userspace-polling callbacks
/// (`on_poll` and `on_poll_ready`, with begin/end) are never called and do not change dispatch:
/// a handler that has them is still dispatched by a non-blocking poll and by a blocking poll
/// whose timeout is zero (a BH is pending). They used to count as "serviceable by polling",
/// which let zero-timeout iterations skip the wait on poll and epoll and starve the handler.
pub fn fd_handler_with_poll_callbacks_is_dispatched(make: MakeContext) {
    let ctx = new_ctx(make);
    let (mut a, b) = socket_pair();
    let reads = Rc::new(Cell::new(0u32));
    let polls = Rc::new(Cell::new(0u32));
    let (r, p, pr) = (reads.clone(), polls.clone(), polls.clone());
    let mut reader = b.try_clone().unwrap();
    let h = ctx
        .fd_handler(b)
        .on_read(move |_| {
            assert!(
                read_all_available(&mut reader) > 0,
                "spurious read callback"
            );
            r.set(r.get() + 1);
        })
        .on_poll(move || {
            p.set(p.get() + 1);
            false
        })
        .on_poll_ready(move |_| pr.set(pr.get() + 100))
        .on_poll_begin(|| panic!("on_poll_begin runs only while polling is enabled"))
        .on_poll_end(|| panic!("on_poll_end runs only while polling is enabled"))
        .register()
        .unwrap();
    drain(&ctx);
    assert_eq!(reads.get(), 0);
    a.write_all(b"x").unwrap();
    assert!(ctx.poll_nonblocking(), "a readable fd is dispatched");
    assert_eq!(reads.get(), 1);
    assert!(!ctx.poll_nonblocking());
    a.write_all(b"y").unwrap();
    let ran = counter();
    let r2 = ran.clone();
    ctx.schedule_oneshot(move || {
        r2.fetch_add(1, SeqCst);
    });
    assert!(ctx.poll(), "BH and handler both run");
    assert_eq!((get(&ran), reads.get()), (1, 2));
    assert!(!ctx.poll_nonblocking());
    assert_eq!(reads.get(), 2);
    assert_eq!(
        polls.get(),
        0,
        "polling is off: the poll function is never called"
    );
    drop(h);
}

/// Spec §4.4: a write callback runs only while the fd is writable: not while the socket's
/// buffer is full, and again once the peer drained it.
pub fn fd_write_readiness(make: MakeContext) {
    let ctx = new_ctx(make);
    let (mut a, mut b) = socket_pair();
    let chunk = [0u8; 4096];
    loop {
        match a.write(&chunk) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    let writes = Rc::new(Cell::new(0u32));
    let w = writes.clone();
    let h = ctx
        .fd_handler(a)
        .on_write(move |_| w.set(w.get() + 1))
        .register()
        .unwrap();
    assert!(!ctx.poll_nonblocking(), "a full socket is not writable");
    assert_eq!(writes.get(), 0);
    assert!(read_all_available(&mut b) > 0);
    let wd = Watchdog::new(ctx.handle());
    assert!(ctx.poll(), "writable again once the peer drained it");
    assert!(!wd.fired());
    assert_eq!(writes.get(), 1);
    assert!(ctx.poll_nonblocking(), "level-triggered: still writable");
    assert_eq!(writes.get(), 2);
    drop(h);
}

/// Spec §4.4 (`G_IO_HUP` reaches `io_read`): closing the peer calls the read callback, whose
/// read returns 0.
pub fn fd_hangup_calls_read(make: MakeContext) {
    let ctx = new_ctx(make);
    let (a, b) = socket_pair();
    let mut reader = b.try_clone().unwrap();
    let results = Rc::new(RefCell::new(Vec::new()));
    let r = results.clone();
    let h = ctx
        .fd_handler(b)
        .on_read(move |_| {
            let mut buf = [0u8; 16];
            r.borrow_mut()
                .push(reader.read(&mut buf).map_err(|e| e.kind()));
        })
        .register()
        .unwrap();
    drain(&ctx);
    assert!(results.borrow().is_empty());
    drop(a);
    let wd = Watchdog::new(ctx.handle());
    assert!(ctx.poll(), "a hang-up dispatches the read callback");
    assert!(!wd.fired());
    assert_eq!(*results.borrow(), [Ok(0)]);
    drop(h);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(results.borrow().len(), 1);
}

/// Dropping a handler drops the socket it owns, and the peer sees it closed: at once on poll,
/// epoll and `polling`; on io_uring, whose poll request holds a reference to the file until
/// its cancellation is submitted, once the next iteration has run (documented on `FdHandler`).
pub fn fd_dropping_a_handler_closes_its_socket(make: MakeContext) {
    let ctx = new_ctx(make);
    let (mut peer, ours) = socket_pair();
    peer.set_nonblocking(true).unwrap();
    let h = ctx.fd_handler(ours).on_read(|_| ()).register().unwrap();
    // The handler's poll is in the kernel now (io_uring submits it in the wait).
    drain(&ctx);
    drop(h);
    if ctx.backend().contains("uring") {
        assert!(!ctx.poll_nonblocking(), "the removal is no progress");
    }
    let mut buf = [0u8; 1];
    assert_eq!(
        peer.read(&mut buf).map_err(|e| e.kind()),
        Ok(0),
        "{}: the peer does not see the socket closed",
        ctx.backend()
    );
}

/// A pipe as two non-blocking `OwnedFd`s (read end, write end).
fn nonblocking_pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // pipe and fcntl rather than pipe2, which macOS lacks.
    // SAFETY: [CONF-1] `fds` is a valid array of two ints for pipe to fill.
    let rc = unsafe { libc::pipe(fds.as_mut_ptr()) };
    assert_eq!(rc, 0, "pipe: {}", io::Error::last_os_error());
    for fd in fds {
        // SAFETY: [CONF-2] F_GETFL reads the flags of our new pipe fd.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        assert!(flags >= 0, "F_GETFL: {}", io::Error::last_os_error());
        // SAFETY: [CONF-2] F_SETFL sets the flags of our new pipe fd.
        let rc = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
        assert_eq!(rc, 0, "F_SETFL: {}", io::Error::last_os_error());
    }
    // SAFETY: [CONF-3] pipe succeeded: both fds are new and owned by no one else.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    }
}

/// Issue 3 (error readiness reaches the handler): a full pipe's write end is not writable, so
/// its write callback stays quiet; once the read end is closed the kernel reports an error
/// (`POLLERR`/`EPOLLERR`), which must reach the write callback.
pub fn fd_error_readiness_reaches_the_write_callback(make: MakeContext) {
    let ctx = new_ctx(make);
    let (read_end, write_end) = nonblocking_pipe();
    let mut w = std::fs::File::from(write_end.try_clone().unwrap());
    let chunk = [0u8; 4096];
    while w.write(&chunk).is_ok() {}
    let calls = Rc::new(Cell::new(0u32));
    let c = calls.clone();
    let handler = ctx
        .fd_handler(write_end)
        .on_write(move |_| c.set(c.get() + 1))
        .register()
        .unwrap();
    drain(&ctx);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(calls.get(), 0, "a full pipe is not writable");
    drop(read_end);
    let wd = Watchdog::new(ctx.handle());
    assert!(
        ctx.poll(),
        "the error wakes the loop and reaches the write callback"
    );
    assert!(!wd.fired());
    assert_eq!(calls.get(), 1);
    drop(handler);
}

/// Issue 3: removing a handler and registering a new one for the same fd within one
/// iteration (from a callback) works: the new handler gets the fd's next events, the removed one
/// never runs again.
pub fn fd_removed_and_readded_in_one_iteration(make: MakeContext) {
    let ctx = new_ctx(make);
    let notifier = Arc::new(EventNotifier::new().unwrap());
    let old_runs = Rc::new(Cell::new(0u32));
    let new_runs = Rc::new(Cell::new(0u32));
    let slot: Rc<RefCell<Option<FdHandler>>> = Rc::default();
    let (o, n, sl, e) = (
        old_runs.clone(),
        new_runs.clone(),
        slot.clone(),
        notifier.clone(),
    );
    let first = ctx
        .set_event_notifier(&notifier, move |_| {
            o.set(o.get() + 1);
            // Swap ourselves for a new handler of the same fd, without clearing it: the new one
            // must see the still-pending event on the next iteration.
            drop(sl.borrow_mut().take());
            let ctx = AioContext::current().expect("inside poll");
            let n = n.clone();
            let replacement = ctx
                .set_event_notifier(&e, move |e| {
                    assert!(e.test_and_clear());
                    n.set(n.get() + 1);
                })
                .expect("the fd is free again");
            *sl.borrow_mut() = Some(replacement);
        })
        .unwrap();
    *slot.borrow_mut() = Some(first);
    drain(&ctx);
    notifier.set().unwrap();
    assert!(ctx.poll_nonblocking());
    assert_eq!((old_runs.get(), new_runs.get()), (1, 0));
    assert!(ctx.poll_nonblocking());
    assert_eq!((old_runs.get(), new_runs.get()), (1, 1));
    assert!(!ctx.poll_nonblocking());
    notifier.set().unwrap();
    assert!(ctx.poll_nonblocking());
    assert_eq!((old_runs.get(), new_runs.get()), (1, 2));
}

/// Issue 3: 10 000 registered fds with one active: only that one dispatches, once per event.
pub fn fd_ten_thousand_idle_one_active(make: MakeContext) {
    raise_nofile_limit(10_100);
    let ctx = new_ctx(make);
    let hits = Rc::new(Cell::new(0u32));
    let idle: Vec<(Arc<EventNotifier>, FdHandler)> = (0..10_000)
        .map(|_| {
            let e = Arc::new(EventNotifier::new().expect("raise RLIMIT_NOFILE to 10 100"));
            let h = ctx
                .set_event_notifier(&e, |_| panic!("an idle handler ran"))
                .unwrap();
            (e, h)
        })
        .collect();
    let active = Arc::new(EventNotifier::new().unwrap());
    let h = hits.clone();
    let _active = ctx
        .set_event_notifier(&active, move |e| {
            assert!(e.test_and_clear());
            h.set(h.get() + 1);
        })
        .unwrap();
    drain(&ctx);
    for round in 1..=3 {
        active.set().unwrap();
        assert!(ctx.poll());
        assert_eq!(hits.get(), round);
        assert!(!ctx.poll_nonblocking());
    }
    drop(idle);
}

/// Raises the soft RLIMIT_NOFILE to at least `want` (up to the hard limit).
fn raise_nofile_limit(want: u64) {
    // rlim_t is u64 on Linux and macOS, i64 on FreeBSD.
    let want = libc::rlim_t::try_from(want).unwrap_or(libc::rlim_t::MAX);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: [CONF-1] getrlimit fills the valid `lim` we pass.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    if lim.rlim_cur < want {
        lim.rlim_cur = want.min(lim.rlim_max);
        // Raising the soft limit up to the hard limit is always allowed and harmless to the other
        // tests of this process.
        // SAFETY: [CONF-1] setrlimit reads the valid `lim` we pass.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    }
}

/// Spec §6 (re-registering replaces): `replace` installs new callbacks under a new key; the
/// old ones never run again and are freed.
pub fn fd_replace_handler(make: MakeContext) {
    let ctx = new_ctx(make);
    let (mut a, b) = socket_pair();
    // One socket for both builders: `replace` needs the same fd number.
    let b = Rc::new(b);
    let (old_calls, new_calls) = (Rc::new(Cell::new(0u32)), Rc::new(Cell::new(0u32)));
    let old_freed = drops();
    let (o, g) = (old_calls.clone(), DropCount::new(&old_freed));
    let mut h = ctx
        .fd_handler(b.clone())
        .on_read(move |_| {
            g.keep();
            o.set(o.get() + 1);
        })
        .register()
        .unwrap();
    drain(&ctx);
    a.write_all(b"ab").unwrap();
    assert!(ctx.poll_nonblocking());
    assert_eq!(old_calls.get(), 1, "the old handler left the data unread");

    let old_key = h.key();
    let (n, mut reader) = (new_calls.clone(), b.try_clone().unwrap());
    ctx.fd_handler(b.clone())
        .on_read(move |_| {
            n.set(n.get() + 1);
            read_all_available(&mut reader);
        })
        .replace(&mut h)
        .unwrap();
    assert_ne!(
        h.key(),
        old_key,
        "a replacement is a new node with a new key"
    );
    assert!(h.is_registered());
    assert_eq!(old_freed.load(SeqCst), 1, "the old callbacks were freed");
    assert!(ctx.poll_nonblocking());
    assert_eq!((old_calls.get(), new_calls.get()), (1, 1));
    assert!(!ctx.poll_nonblocking());
    a.write_all(b"c").unwrap();
    assert!(ctx.poll_nonblocking());
    assert_eq!((old_calls.get(), new_calls.get()), (1, 2));
    drop(h);
    assert!(!ctx.poll_nonblocking());
}

/// Derived (`replace` errors): replacing with a builder for another fd fails with
/// `InvalidInput` and leaves the old handler in place.
pub fn fd_replace_wrong_fd_rejected(make: MakeContext) {
    let ctx = new_ctx(make);
    let (a, b) = socket_pair();
    // Shared, not duplicated: the second replace below must be for `h`'s own fd number, and
    // `a` is written to after the first one.
    let (a, b) = (Rc::new(a), Rc::new(b));
    let calls = Rc::new(Cell::new(0u32));
    let (c, mut reader) = (calls.clone(), b.try_clone().unwrap());
    let mut h = ctx
        .fd_handler(b.clone())
        .on_read(move |_| {
            c.set(c.get() + 1);
            read_all_available(&mut reader);
        })
        .register()
        .unwrap();
    let key = h.key();
    let err = ctx
        .fd_handler(a.clone())
        .on_read(|_| panic!("must never run"))
        .replace(&mut h)
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(h.key(), key);
    let err = ctx.fd_handler(b.clone()).replace(&mut h).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "no callbacks");
    assert_eq!(h.key(), key);
    drain(&ctx);
    (&*a).write_all(b"x").unwrap();
    assert!(ctx.poll_nonblocking());
    assert_eq!(calls.get(), 1);
    drop(h);
}

/// Derived (DESIGN §6, one handler per fd): registering an fd twice fails with
/// `AlreadyExists`; the first handler keeps working.
pub fn fd_register_twice_already_exists(make: MakeContext) {
    let ctx = new_ctx(make);
    let (mut a, b) = socket_pair();
    // One socket for both registrations: the second must be of the same fd number.
    let b = Rc::new(b);
    let calls = Rc::new(Cell::new(0u32));
    let (c, mut reader) = (calls.clone(), b.try_clone().unwrap());
    let h = ctx
        .fd_handler(b.clone())
        .on_read(move |_| {
            c.set(c.get() + 1);
            read_all_available(&mut reader);
        })
        .register()
        .unwrap();
    let second_freed = drops();
    let g = DropCount::new(&second_freed);
    let err = ctx
        .fd_handler(b.clone())
        .on_read(move |_| {
            g.keep();
            panic!("the rejected handler must never run");
        })
        .register()
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    assert_eq!(second_freed.load(SeqCst), 1);
    assert!(h.is_registered());
    drain(&ctx);
    a.write_all(b"x").unwrap();
    assert!(ctx.poll_nonblocking());
    assert_eq!(calls.get(), 1);
    assert!(!ctx.poll_nonblocking());
    drop(h);
}

/// DESIGN §6 (bad input): registering a closed fd fails with `EBADF`, registers nothing, and
/// leaves the context usable.
pub fn fd_register_closed_fd_ebadf(make: MakeContext) {
    let ctx = new_ctx(make);
    let fd = closed_fd_number();
    // A number that is not open has no owner to hand `fd_handler`: it goes through the raw
    // entry point, which refuses it at `register` (the point of the case).
    // The raw-fd contract binds only from a successful `register` until removal, and
    // `register` must fail here with `EBADF`, so no handler ever watches `fd`.
    // `closed_fd_number` keeps it above the numbers the kernel hands out, so no other test's
    // fd takes it meanwhile.
    // SAFETY: raw-fd contract ([FD-1] in ARCHITECTURE.md), never in force here.
    let err = unsafe { ctx.fd_handler_raw(fd) }
        .on_read(|_| panic!("must never run"))
        .register()
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
    assert!(!ctx.poll_nonblocking());
    let mut data = Notifier::new(0, false);
    data.register(&ctx);
    data.set();
    assert!(ctx.poll_nonblocking());
    assert_eq!(data.n(), 1);
}

/// Derived (`register` errors): a handler with neither a read nor a write callback is
/// rejected with `InvalidInput`.
pub fn fd_register_without_callbacks_invalid_input(make: MakeContext) {
    let ctx = new_ctx(make);
    let (_a, b) = socket_pair();
    let b = Rc::new(b);
    let err = ctx.fd_handler(b.clone()).register().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    // A poll callback alone does not make a handler either.
    let err = ctx
        .fd_handler(b)
        .on_poll(|| false)
        .on_poll_ready(|_| ())
        .register()
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(!ctx.poll_nonblocking());
}
/// DESIGN §2 / docs/qemu-semantics.md §10.3 (`AIO_WAIT_WHILE`): a read callback runs a nested blocking poll
/// until a BH scheduled by another thread has run.
pub fn fd_nested_blocking_poll_waits_for_remote_bh(make: MakeContext) {
    let ctx = new_ctx(make);
    let e = Arc::new(EventNotifier::new().unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let (outer_calls, nested_polls) = (Rc::new(Cell::new(0u32)), Rc::new(Cell::new(0u32)));
    let (handle, d, e2) = (ctx.handle(), done.clone(), e.clone());
    let (oc, np) = (outer_calls.clone(), nested_polls.clone());
    let h = ctx
        .fd_handler(e.clone())
        .on_read(move |ctx| {
            assert!(e2.test_and_clear());
            oc.set(oc.get() + 1);
            let (handle, flag) = (handle.clone(), d.clone());
            let remote = thread::spawn(move || {
                thread::sleep(Duration::from_millis(20));
                handle.schedule_oneshot(move || flag.store(true, SeqCst));
            });
            while !d.load(SeqCst) {
                ctx.poll();
                np.set(np.get() + 1);
            }
            remote.join().unwrap();
        })
        .register()
        .unwrap();
    drain(&ctx);
    e.set().unwrap();
    let wd = Watchdog::new(ctx.handle());
    assert!(ctx.poll());
    assert!(!wd.fired());
    assert_eq!(outer_calls.get(), 1);
    assert!(done.load(SeqCst));
    assert!(nested_polls.get() >= 1);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(outer_calls.get(), 1);
    drop(h);
}
