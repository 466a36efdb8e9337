//! Bad input and resource exhaustion that do not depend on the backend: creating a context
//! when the process is out of fds, and the pipe fallback of `EventNotifier`.

use std::fs::File;
use std::io;

use aio::EventNotifier;

/// The child's side: with every fd number below a small `RLIMIT_NOFILE` in use, creating a
/// context (its eventfd) fails with `EMFILE` instead of aborting.
fn out_of_fds_child() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit struct.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert_eq!(rc, 0);
    let original = lim;
    lim.rlim_cur = lim.rlim_cur.min(16);
    // SAFETY: `lim` is a valid rlimit struct; lowering the soft limit is always allowed.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    assert_eq!(rc, 0);

    // Fill every free number below the limit, so the next fd anyone asks for fails.
    let mut hoard = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(f) => hoard.push(f),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
            Err(e) => panic!("unexpected error while exhausting fds: {e}"),
        }
        assert!(hoard.len() <= 64, "the fd limit did not take effect");
    }

    let err = aio::Builder::new()
        .build()
        .expect_err("a context needs an fd for its event notifier");
    assert_eq!(err.raw_os_error(), Some(libc::EMFILE), "{err}");
    let err = aio::Builder::new()
        .backend(aio::Backend::Poll)
        .build()
        .expect_err("the poll backend too");
    assert_eq!(err.raw_os_error(), Some(libc::EMFILE), "{err}");
    let err = EventNotifier::with_pipe().expect_err("a pipe needs two fds");
    assert_eq!(err.raw_os_error(), Some(libc::EMFILE), "{err}");

    // Once fds are available again, creating a context works.
    drop(hoard);
    // SAFETY: `original` is the valid rlimit read above.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &original) };
    assert_eq!(rc, 0);
    let ctx = aio::Builder::new()
        .build()
        .expect("fds are available again");
    assert!(!ctx.poll_nonblocking());
}

/// DESIGN §6 (exceeding the fd limit): context creation fails with `EMFILE`. The limit is
/// process-wide, so the test runs in a child process whose limit can be lowered without
/// disturbing the tests running in parallel here.
#[test]
fn context_creation_out_of_fds_fails_with_emfile() {
    aio_tests::in_child(
        "context_creation_out_of_fds_fails_with_emfile",
        &[],
        out_of_fds_child,
    );
}

/// `EventNotifier::with_pipe` behaves like the eventfd one: two sets read as one event.
#[test]
fn pipe_notifier_set_twice_reads_once() -> io::Result<()> {
    let e = EventNotifier::with_pipe()?;
    assert!(!e.test_and_clear());
    e.set()?;
    e.set()?;
    assert!(e.test_and_clear());
    assert!(!e.test_and_clear());
    Ok(())
}

/// A pipe notifier set 100 000 times without draining never fails (a full pipe, `EAGAIN`,
/// already means "set"), and one `test_and_clear` drains it completely.
#[test]
fn pipe_notifier_full_pipe_is_still_set() -> io::Result<()> {
    let e = EventNotifier::with_pipe()?;
    for _ in 0..100_000 {
        e.set()?;
    }
    assert!(e.test_and_clear());
    assert!(
        !e.test_and_clear(),
        "one test_and_clear drained the whole pipe"
    );
    e.set()?;
    assert!(e.test_and_clear());
    Ok(())
}

/// A pipe notifier registered with a context dispatches like an eventfd one.
#[test]
fn pipe_notifier_dispatches_in_a_context() -> io::Result<()> {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::sync::Arc;

    let ctx = aio_tests::poll_context()?;
    let e = Arc::new(EventNotifier::with_pipe()?);
    let calls = Rc::new(Cell::new(0u32));
    let c = calls.clone();
    let h = ctx.set_event_notifier(&e, move |e| {
        assert!(e.test_and_clear());
        c.set(c.get() + 1);
    })?;
    while ctx.poll_nonblocking() {}
    for _ in 0..10_000 {
        e.set()?;
    }
    assert!(ctx.poll());
    assert_eq!(calls.get(), 1);
    assert!(!ctx.poll_nonblocking());
    drop(h);
    Ok(())
}
