//! A backend that fails: a test monitor wrapping the poll backend refuses waits or changes on
//! demand (issue 10, defects 3 and 5). A failing wait must be visible (`try_poll`, the
//! `wait_errors` counter) and must not turn `poll()` into a busy loop; a refused change must
//! come back as `Err`, with nothing user-owned dropped while the context's tables are borrowed.

use aio_core::{AioContext, Change, FdMonitor, OuterFd, ReadyList};
use fdmon_poll::PollMonitor;
use std::cell::Cell;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

/// What the test tells its monitor, and what the monitor saw.
#[derive(Debug, Default)]
struct Switches {
    /// Every `wait` fails with `EPERM` (as `io_uring_enter` under a seccomp filter).
    fail_waits: Cell<bool>,
    /// Every `Add` and `Replace` fails with `EPERM` (as `epoll_ctl` for a regular file).
    fail_changes: Cell<bool>,
    /// Calls of `wait`, failed ones included.
    waits: Cell<u64>,
}

/// The poll backend, with failures injected by [`Switches`].
#[derive(Debug)]
struct Flaky {
    inner: PollMonitor,
    switches: Rc<Switches>,
}

impl FdMonitor for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }

    unsafe fn update(&mut self, change: Change) -> io::Result<()> {
        if self.switches.fail_changes.get() && !matches!(change, Change::Remove { .. }) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        // SAFETY: [FD-1]: the caller's contract, passed on unchanged.
        unsafe { self.inner.update(change) }
    }

    fn wait(&mut self, ready: &mut ReadyList, timeout: Option<Duration>) -> io::Result<usize> {
        let s = &self.switches;
        s.waits.set(s.waits.get() + 1);
        if s.fail_waits.get() {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.inner.wait(ready, timeout)
    }

    fn must_wait(&self) -> Option<bool> {
        self.inner.must_wait()
    }

    fn outer_fds(&self, out: &mut Vec<OuterFd>) {
        self.inner.outer_fds(out)
    }
}

/// A context on a [`Flaky`] monitor, and the monitor's switches. `registered` reports how many
/// fds the wrapped poll backend watches (the context's own notifier included).
fn flaky_context() -> (AioContext, Rc<Switches>, impl Fn() -> usize) {
    let switches = Rc::new(Switches::default());
    let count = Rc::new(Cell::new(0usize));
    let monitor = Counting {
        flaky: Flaky {
            inner: PollMonitor::new().unwrap(),
            switches: switches.clone(),
        },
        count: count.clone(),
    };
    let ctx = AioContext::new(Box::new(monitor)).unwrap();
    (ctx, switches, move || count.get())
}

/// Keeps the wrapped poll backend's registration count where the test can read it.
#[derive(Debug)]
struct Counting {
    flaky: Flaky,
    count: Rc<Cell<usize>>,
}

impl FdMonitor for Counting {
    fn name(&self) -> &'static str {
        self.flaky.name()
    }
    unsafe fn update(&mut self, change: Change) -> io::Result<()> {
        // SAFETY: [FD-1]: the caller's contract, passed on unchanged.
        let r = unsafe { self.flaky.update(change) };
        self.count.set(self.flaky.inner.len());
        r
    }
    fn wait(&mut self, ready: &mut ReadyList, timeout: Option<Duration>) -> io::Result<usize> {
        self.flaky.wait(ready, timeout)
    }
    fn must_wait(&self) -> Option<bool> {
        self.flaky.must_wait()
    }
    fn outer_fds(&self, out: &mut Vec<OuterFd>) {
        self.flaky.outer_fds(out)
    }
}

fn socket_pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    (a, b)
}

/// Defect 3: with every wait failing, a loop of blocking polls must back off instead of
/// spinning. Counted, not timed: a spinning loop makes hundreds of thousands of waits in the
/// period, the back-off (1 ms doubling to 100 ms) about ten, a slow machine fewer.
#[test]
fn failing_waits_do_not_spin() {
    let (ctx, switches, _) = flaky_context();
    switches.fail_waits.set(true);
    let period = Duration::from_millis(300);
    let start = Instant::now();
    let mut polls = 0u64;
    while start.elapsed() < period {
        assert!(!ctx.poll(), "nothing is scheduled");
        polls += 1;
    }
    let waits = switches.waits.get();
    eprintln!("{waits} failing waits in {period:?}");
    assert_eq!(waits, polls, "each blocking poll waits once");
    assert!(
        waits <= 20,
        "{waits} failing waits in {period:?}: poll() spins on a failing backend"
    );
    assert_eq!(ctx.stats().waits, waits);
}

/// Defect 3: `try_poll` returns the wait's error, dispatches nothing, and `Stats` counts it;
/// `poll()` on the same failure still runs BHs; a working wait resets everything.
#[test]
fn try_poll_returns_the_wait_error_and_stats_count_it() {
    let (ctx, switches, _) = flaky_context();
    let (mut a, b) = socket_pair();
    // A handler without polling callbacks: non-blocking iterations must ask the backend too.
    let reads = Rc::new(Cell::new(0u32));
    let r = reads.clone();
    let _h = ctx
        .fd_handler(b)
        .on_read(move |_| r.set(r.get() + 1))
        .register()
        .unwrap();
    assert!(!ctx.poll_nonblocking());
    let before = ctx.stats();
    assert_eq!(before.wait_errors, 0);

    switches.fail_waits.set(true);
    let ran = Arc::new(AtomicU32::new(0));
    let r2 = ran.clone();
    ctx.schedule_oneshot(move || {
        r2.fetch_add(1, SeqCst);
    });
    a.write_all(b"x").unwrap();
    let err = ctx.try_poll().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    assert_eq!(ran.load(SeqCst), 0, "Err: nothing was dispatched");
    let err = ctx.try_poll_nonblocking().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    assert_eq!((ran.load(SeqCst), reads.get()), (0, 0));
    let stats = ctx.stats();
    assert_eq!(stats.waits, before.waits + 2);
    assert_eq!(stats.wait_errors, 2);

    // poll() logs the failure, counts it, and still runs the BH (the timeout is zero, so it
    // does not sleep); the fd cannot be seen while the backend fails.
    assert!(ctx.poll());
    assert_eq!((ran.load(SeqCst), reads.get()), (1, 0));
    assert_eq!(ctx.stats().wait_errors, 3);
    assert_eq!(ctx.stats().waits, before.waits + 3);

    // The backend recovers: the handler runs, and errors stop counting.
    switches.fail_waits.set(false);
    assert!(ctx.try_poll_nonblocking().unwrap());
    assert_eq!(reads.get(), 1);
    assert_eq!(ctx.stats().wait_errors, 3);
}

/// Defect 5: a registration the backend refuses returns `Err`, also when the refused handler's
/// closure owns another handler: dropping that closure unregisters the other handler, which
/// must not find the handler table still borrowed (it panicked with "already borrowed").
#[test]
fn refused_register_drops_the_closure_after_releasing_the_tables() {
    let (ctx, switches, registered) = flaky_context();
    let (_a, b) = socket_pair();
    let (_c, d) = socket_pair();
    // Each fd is registered twice, by number: the handlers share one `Rc` of it.
    let (b, d) = (Rc::new(b), Rc::new(d));
    let owned = ctx
        .fd_handler(b.clone())
        .on_read(|_| {})
        .register()
        .unwrap();
    assert_eq!(registered(), 2, "the notifier and b");
    switches.fail_changes.set(true);
    let err = ctx
        .fd_handler(d.clone())
        .on_read(move |_| {
            let _keep = &owned;
        })
        .register()
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    assert_eq!(
        registered(),
        1,
        "b went with the refused closure; d never came"
    );
    switches.fail_changes.set(false);
    // Both fds are free again, and the context works.
    let hits = Rc::new(Cell::new(0u32));
    let h = hits.clone();
    let _b = ctx
        .fd_handler(b)
        .on_read(move |_| h.set(h.get() + 1))
        .register()
        .unwrap();
    let _d = ctx.fd_handler(d).on_read(|_| {}).register().unwrap();
    (&_a).write_all(b"x").unwrap();
    assert!(ctx.poll_nonblocking());
    assert_eq!(hits.get(), 1);
}

/// Defect 5, `replace`: a refused replacement returns `Err` and leaves the old handler in
/// place; the new closure, which owns another handler, is dropped only after the tables are
/// released.
#[test]
fn refused_replace_keeps_the_old_handler_and_drops_the_closure_safely() {
    let (ctx, switches, registered) = flaky_context();
    let (mut a, b) = socket_pair();
    let (_c, d) = socket_pair();
    // The replacement names the same fd: both builders take a clone of one `Rc`.
    let b = Rc::new(b);
    let hits = Rc::new(Cell::new(0u32));
    let h = hits.clone();
    let mut handler = ctx
        .fd_handler(b.clone())
        .on_read(move |_| h.set(h.get() + 1))
        .register()
        .unwrap();
    let owned = ctx.fd_handler(d).on_read(|_| {}).register().unwrap();
    assert_eq!(registered(), 3);
    switches.fail_changes.set(true);
    let err = ctx
        .fd_handler(b)
        .on_read(move |_| {
            let _keep = &owned;
            panic!("the refused replacement must never run");
        })
        .replace(&mut handler)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    assert!(handler.is_registered(), "the old handler stays");
    assert_eq!(registered(), 2, "d went with the refused closure");
    a.write_all(b"x").unwrap();
    assert!(ctx.poll_nonblocking());
    assert_eq!(hits.get(), 1, "the old callback still runs");
}
