//! What the context suites share: the imports every case module takes (`use
//! crate::support::*`), the context constructor type, the watchdog, QEMU's BH and notifier
//! records, and fd helpers.

pub(crate) use aio_core::{
    AioContext, BottomHalf, ContextHandle, EventNotifier, FdHandler, Interest, NotDisabledError,
    OuterFd,
};
pub(crate) use std::cell::{Cell, RefCell};
pub(crate) use std::io::{self, Read, Write};
pub(crate) use std::os::fd::{AsRawFd, RawFd};
pub(crate) use std::os::unix::net::UnixStream;
pub(crate) use std::panic::{AssertUnwindSafe, catch_unwind};
pub(crate) use std::rc::Rc;
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::SeqCst};
pub(crate) use std::sync::{Arc, Mutex, mpsc};
pub(crate) use std::thread;
pub(crate) use std::time::{Duration, Instant};

/// Makes a fresh context on the backend under test.
pub type MakeContext = fn() -> io::Result<AioContext>;

/// The most a cross-thread wake-up may take before a case fails. Deliberately loose: these
/// machines are noisy, and a lost wake-up shows up as a hang (caught by the watchdog), not as
/// a slow wake.
pub(crate) const WAKE_BOUND: Duration = Duration::from_secs(5);

/// When a [`Watchdog`] gives up and notifies the context.
pub(crate) const WATCHDOG_AFTER: Duration = Duration::from_secs(30);

pub(crate) fn new_ctx(make: MakeContext) -> AioContext {
    make().expect("creating a context")
}

/// Non-blocking polls until one returns false (QEMU's "drain"). Fails if the loop keeps
/// reporting progress, which would be a busy loop.
pub(crate) fn drain(ctx: &AioContext) {
    for _ in 0..1000 {
        if !ctx.poll_nonblocking() {
            return;
        }
    }
    panic!("the context still reports progress after 1000 non-blocking polls");
}

pub(crate) fn counter() -> Arc<AtomicU32> {
    Arc::new(AtomicU32::new(0))
}

pub(crate) fn get(c: &AtomicU32) -> u32 {
    c.load(SeqCst)
}

/// Counts its own drops: captured by a callback, it tells when the callback was freed.
pub(crate) struct DropCount(Arc<AtomicUsize>);

impl DropCount {
    pub(crate) fn new(count: &Arc<AtomicUsize>) -> DropCount {
        DropCount(count.clone())
    }

    /// Mentions the guard inside a closure so that the closure captures (and owns) it.
    pub(crate) fn keep(&self) {}
}

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, SeqCst);
    }
}

pub(crate) fn drops() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

/// A realtime timer (ns scale), not armed, whose callback sets the returned flag.
pub(crate) fn flag_timer(ctx: &AioContext) -> (Arc<AtomicBool>, aio_core::Timer) {
    let fired = Arc::new(AtomicBool::new(false));
    let f = fired.clone();
    let timer = ctx.timer(
        aio_core::ClockType::Realtime,
        aio_core::Scale::NS,
        move || f.store(true, SeqCst),
    );
    (fired, timer)
}

/// Notifies a context after [`WATCHDOG_AFTER`] unless dropped first, so that a blocking poll
/// that would hang because of a bug returns instead; the case then checks [`Watchdog::fired`].
pub(crate) struct Watchdog {
    pub(crate) stop: Option<mpsc::Sender<()>>,
    pub(crate) fired: Arc<AtomicBool>,
    pub(crate) thread: Option<thread::JoinHandle<()>>,
}

impl Watchdog {
    pub(crate) fn new(handle: ContextHandle) -> Watchdog {
        let (stop, rx) = mpsc::channel::<()>();
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let thread = thread::spawn(move || {
            if rx.recv_timeout(WATCHDOG_AFTER) == Err(mpsc::RecvTimeoutError::Timeout) {
                f.store(true, SeqCst);
                handle.notify();
            }
        });
        Watchdog {
            stop: Some(stop),
            fired,
            thread: Some(thread),
        }
    }

    pub(crate) fn fired(&self) -> bool {
        self.fired.load(SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// QEMU's BH record `{bh, n, max}`. The BH lives in a shared slot so that its own callback can
/// reschedule or delete it.
pub(crate) struct BhRecord {
    pub(crate) bh: Arc<Mutex<Option<BottomHalf>>>,
    pub(crate) n: Arc<AtomicU32>,
}

impl BhRecord {
    /// The counting callback: add 1 to `n`; while `n < max`, reschedule. With `max = 0` the BH
    /// runs once per schedule.
    pub(crate) fn counting(ctx: &AioContext, max: u32) -> BhRecord {
        Self::build(ctx, max, false)
    }

    /// The deleting callback: add 1 to `n`; while `n < max`, reschedule, otherwise delete the
    /// BH from inside its own callback.
    pub(crate) fn deleting(ctx: &AioContext, max: u32) -> BhRecord {
        Self::build(ctx, max, true)
    }

    pub(crate) fn build(ctx: &AioContext, max: u32, delete: bool) -> BhRecord {
        let slot: Arc<Mutex<Option<BottomHalf>>> = Arc::new(Mutex::new(None));
        let n = counter();
        let (s, c) = (slot.clone(), n.clone());
        let bh = ctx.bh(move || {
            let now = c.fetch_add(1, SeqCst) + 1;
            if now < max {
                s.lock().unwrap().as_ref().expect("BH deleted").schedule();
            } else if delete {
                let me = s.lock().unwrap().take();
                assert!(me.is_some(), "a deleted BH ran");
                drop(me);
            }
        });
        *slot.lock().unwrap() = Some(bh);
        BhRecord { bh: slot, n }
    }

    pub(crate) fn n(&self) -> u32 {
        get(&self.n)
    }

    pub(crate) fn schedule(&self) {
        self.bh
            .lock()
            .unwrap()
            .as_ref()
            .expect("BH deleted")
            .schedule();
    }

    pub(crate) fn cancel(&self) {
        self.bh
            .lock()
            .unwrap()
            .as_ref()
            .expect("BH deleted")
            .cancel();
    }

    pub(crate) fn is_scheduled(&self) -> bool {
        self.bh
            .lock()
            .unwrap()
            .as_ref()
            .expect("BH deleted")
            .is_scheduled()
    }

    pub(crate) fn is_deleted(&self) -> bool {
        self.bh.lock().unwrap().is_none()
    }

    /// Deletes the BH (QEMU `qemu_bh_delete`).
    pub(crate) fn delete(&self) {
        let bh = self.bh.lock().unwrap().take();
        drop(bh);
    }
}

impl Drop for BhRecord {
    fn drop(&mut self) {
        // The callback holds the slot, which holds the BH: break the cycle.
        self.delete();
    }
}

/// QEMU's notifier record `{notifier, n, active, auto_set}` and its registration.
pub(crate) struct Notifier {
    pub(crate) e: Arc<EventNotifier>,
    pub(crate) n: Rc<Cell<u32>>,
    pub(crate) active: Rc<Cell<u32>>,
    pub(crate) auto_set: bool,
    pub(crate) handler: Option<FdHandler>,
}

impl Notifier {
    pub(crate) fn new(active: u32, auto_set: bool) -> Notifier {
        Notifier {
            e: Arc::new(EventNotifier::new().expect("event notifier")),
            n: Rc::new(Cell::new(0)),
            active: Rc::new(Cell::new(active)),
            auto_set,
            handler: None,
        }
    }

    /// QEMU's ready callback: assert the notifier was set, count, decrement `active`, and set
    /// the notifier again while `auto_set` and `active > 0`.
    pub(crate) fn callback(&self) -> impl FnMut(&EventNotifier) + 'static {
        let (n, active, auto_set) = (self.n.clone(), self.active.clone(), self.auto_set);
        move |e: &EventNotifier| {
            assert!(
                e.test_and_clear(),
                "the handler was called while its notifier was clear"
            );
            n.set(n.get() + 1);
            if active.get() > 0 {
                active.set(active.get() - 1);
            }
            if auto_set && active.get() > 0 {
                e.set().expect("set");
            }
        }
    }

    /// Registers through [`AioContext::set_event_notifier`] (QEMU `aio_set_event_notifier`).
    pub(crate) fn register(&mut self, ctx: &AioContext) {
        let h = ctx
            .set_event_notifier(&self.e, self.callback())
            .expect("register notifier");
        self.handler = Some(h);
    }

    /// Registers as an external client (QEMU `is_external = true`).
    pub(crate) fn register_external(&mut self, ctx: &AioContext) {
        let mut cb = self.callback();
        let e = self.e.clone();
        let h = ctx
            .fd_handler(self.e.clone())
            .on_read(move |_| cb(&e))
            .external(true)
            .register()
            .expect("register external notifier");
        self.handler = Some(h);
    }

    pub(crate) fn unregister(&mut self) {
        assert!(self.handler.take().is_some(), "not registered");
    }

    pub(crate) fn set(&self) {
        self.e.set().expect("set notifier");
    }

    pub(crate) fn n(&self) -> u32 {
        self.n.get()
    }

    pub(crate) fn active(&self) -> u32 {
        self.active.get()
    }
}

/// QEMU's `wait_until_inactive`: blocking polls while `active > 0`.
pub(crate) fn wait_until_inactive(ctx: &AioContext, data: &Notifier) {
    while data.active() > 0 {
        ctx.poll();
    }
}

/// A connected, non-blocking socket pair.
pub(crate) fn socket_pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    a.set_nonblocking(true).expect("nonblocking");
    b.set_nonblocking(true).expect("nonblocking");
    (a, b)
}

/// Reads everything the non-blocking socket `s` has buffered; returns the byte count. `s` is
/// a `&mut UnixStream`, or a `&UnixStream` (one shared with a handler through an `Rc`).
pub(crate) fn read_all_available(mut s: impl Read) -> usize {
    let mut buf = [0u8; 4096];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return total,
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// A read callback for the socket `s` that reads all it has (failing the case on a read that
/// finds nothing) and counts its calls in the returned cell.
pub(crate) fn counting_reader(
    s: &UnixStream,
) -> (Rc<Cell<u32>>, impl FnMut(&AioContext) + 'static) {
    let count = Rc::new(Cell::new(0u32));
    let (c, mut reader) = (count.clone(), s.try_clone().expect("dup"));
    let read = move |_: &AioContext| {
        assert!(read_all_available(&mut reader) > 0, "spurious read");
        c.set(c.get() + 1);
    };
    (count, read)
}

/// A number that is certainly not an open fd of this process, and stays so.
///
/// It is made the way the brief of the case asks (a pipe's fd, closed), but first moved to a
/// high number with `F_DUPFD`: the kernel hands out the lowest free number, so a just-closed
/// low number would be reused at once by another test thread creating a socket or eventfd.
pub(crate) fn closed_fd_number() -> RawFd {
    let mut fds = [-1; 2];
    // SAFETY: [CONF-1] `fds` is a writable array of two c_ints, which pipe() fills in.
    let rc = unsafe { libc::pipe(fds.as_mut_ptr()) };
    assert_eq!(rc, 0, "pipe: {}", io::Error::last_os_error());
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: [CONF-1] `lim` is a valid, writable rlimit struct.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert_eq!(rc, 0, "getrlimit: {}", io::Error::last_os_error());
    let floor = i32::try_from(lim.rlim_cur.min(4096)).unwrap_or(4096) - 16;
    let floor = floor.max(fds[1] + 1);
    // SAFETY: [CONF-2] F_DUPFD_CLOEXEC duplicates our own pipe fd onto a free number >= `floor`.
    let high = unsafe { libc::fcntl(fds[0], libc::F_DUPFD_CLOEXEC, floor) };
    assert!(high >= 0, "F_DUPFD: {}", io::Error::last_os_error());
    for fd in [fds[0], fds[1], high] {
        // SAFETY: [CONF-2] each fd was created above and is owned by nobody else; closed once.
        unsafe { libc::close(fd) };
    }
    high
}

/// poll(2) on an outer loop's fds; returns how many are ready. `None` is capped at 10 s so a
/// bug fails the case instead of hanging it.
pub(crate) fn poll_outer_fds(fds: &[OuterFd], timeout: Option<Duration>) -> usize {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| {
            let mut events = 0;
            if f.interest.contains(Interest::READ) {
                events |= libc::POLLIN;
            }
            if f.interest.contains(Interest::WRITE) {
                events |= libc::POLLOUT;
            }
            libc::pollfd {
                fd: f.fd,
                events,
                revents: 0,
            }
        })
        .collect();
    let timeout = timeout.unwrap_or(Duration::from_secs(10));
    let mut ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    if ms == 0 && !timeout.is_zero() {
        ms = 1;
    }
    loop {
        // SAFETY: [CONF-1] `pfds` holds `pfds.len()` valid, writable pollfds, live across the call.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if rc >= 0 {
            return rc as usize;
        }
        let err = io::Error::last_os_error();
        assert_eq!(err.kind(), io::ErrorKind::Interrupted, "poll: {err}");
    }
}

/// One iteration of an outer loop (glib's `g_main_context_iteration`): prepare, wait on the
/// outer fds, check, dispatch. Returns whether it dispatched, as glib does.
pub(crate) fn outer_iteration(ctx: &AioContext, may_block: bool) -> bool {
    let timeout = ctx.prepare();
    let mut fds = Vec::new();
    ctx.outer_fds(&mut fds);
    poll_outer_fds(
        &fds,
        if may_block {
            timeout
        } else {
            Some(Duration::ZERO)
        },
    );
    if ctx.check() {
        ctx.dispatch();
        true
    } else {
        false
    }
}
