//! Workloads of the fd-backend benchmarks, B5 (readiness dispatch with N idle fds) and B6
//! (handler churn) of docs/benchmarks.md: aio on each of its backends, the peers (mio, polling) and
//! the raw system-call floors (epoll, poll, io_uring), all driven the same way, so that
//! `benches/fd.rs` (criterion and its report) and `examples/fd_syscalls.rs` (strace counts) run
//! exactly the same code.
//!
//! Each workload is built once for its row and then timed with [`Workload::run`], which takes
//! an iteration count and returns the time of exactly that many iterations; every iteration
//! finishes its own work (the byte written is read, the churned handlers are gone) before the
//! next one starts, and `run` asserts it.
//!
//! * **B5**: `n` idle eventfds plus one active Unix socketpair are registered. One iteration
//!   writes one byte to the socketpair on this thread, runs one loop iteration (a blocking wait,
//!   which returns at once because the byte is there) and the active fd's handler reads the
//!   byte. aio, polling and the raw floors are level-triggered and read once; mio is
//!   edge-triggered, so its handler reads until `WouldBlock` (two reads).
//! * **B6**: `k` churn operations, then one non-blocking loop iteration (`poll_nonblocking`,
//!   mio `poll(0)`, polling `wait(0)`), so that a backend that defers its changes to the next
//!   wait (io_uring) pays for them inside the timed iteration. See [`ChurnOp`] for the three
//!   operations.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::time::{Duration, Instant};

use aio::{AioContext, Backend, FdHandler};

use crate::{bump, ran};

/// The largest N of B5.
pub const MAX_IDLE: usize = 10_000;
/// B5's numbers of idle fds.
pub const IDLE_COUNTS: [usize; 3] = [1, 100, MAX_IDLE];
/// B6's numbers of churn operations per loop iteration.
pub const CHURN_BATCHES: [usize; 2] = [1, 64];

/// The key (token, user data) of B5's active fd in the peers and floors; idle fds use their
/// index.
const ACTIVE: usize = usize::MAX - 1;

/// One of aio's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AioBackend {
    /// `ppoll(2)` only: no move to epoll, whatever the number of fds.
    Poll,
    /// epoll, level-triggered.
    Epoll,
    /// io_uring one-shot `POLL_ADD`s, re-armed after each completion.
    IoUring,
}

impl AioBackend {
    /// Every backend, in the order of the report.
    pub const ALL: [AioBackend; 3] = [AioBackend::Poll, AioBackend::Epoll, AioBackend::IoUring];

    /// The backend's name as `AioContext::backend` reports it.
    pub fn name(self) -> &'static str {
        match self {
            AioBackend::Poll => "poll",
            AioBackend::Epoll => "epoll",
            AioBackend::IoUring => "io_uring",
        }
    }

    /// A context on exactly this backend (`AIO_BACKEND` is ignored).
    ///
    /// # Errors
    ///
    /// As `aio::Builder::build`: the backend is refused by the kernel, or out of fds.
    pub fn context(self) -> io::Result<AioContext> {
        let backend = match self {
            AioBackend::Poll => Backend::Poll,
            AioBackend::Epoll => Backend::Epoll,
            AioBackend::IoUring => Backend::IoUring,
        };
        let ctx = aio::Builder::new().backend(backend).ignore_env().build()?;
        assert_eq!(ctx.backend(), self.name(), "aio picked another backend");
        Ok(ctx)
    }
}

/// Why io_uring rows cannot run here, or `None` if io_uring works (`UringMonitor::probe`).
pub fn io_uring_unavailable() -> Option<String> {
    aio::UringMonitor::probe().err().map(|e| e.to_string())
}

/// Makes sure the soft `RLIMIT_NOFILE` allows at least `want` fds, raising it (up to the hard
/// limit) if needed. Returns a sentence saying what it found and did.
///
/// # Errors
///
/// A sentence saying why `want` fds cannot be had (hard limit too low, or `setrlimit` refused).
pub fn raise_nofile(want: u64) -> Result<String, String> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid, writable `rlimit` that outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(format!(
            "getrlimit(RLIMIT_NOFILE) failed: {}",
            io::Error::last_os_error()
        ));
    }
    let (soft, hard) = (rl.rlim_cur, rl.rlim_max);
    if soft >= want {
        return Ok(format!(
            "RLIMIT_NOFILE soft limit {soft} (hard {hard}) already allows the {want} fds needed; \
             unchanged"
        ));
    }
    if hard < want {
        return Err(format!(
            "RLIMIT_NOFILE hard limit {hard} is below the {want} fds needed"
        ));
    }
    let raised = libc::rlimit {
        rlim_cur: want,
        rlim_max: hard,
    };
    // SAFETY: `raised` is a valid `rlimit` that outlives the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(format!(
            "setrlimit(RLIMIT_NOFILE, {want}) failed: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(format!(
        "raised the RLIMIT_NOFILE soft limit from {soft} to {want} (hard limit {hard})"
    ))
}

/// A new non-blocking, close-on-exec eventfd with a zero count (never readable unless written).
///
/// # Errors
///
/// `eventfd(2)`'s error (`EMFILE` when out of fds).
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; it returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by eventfd, is open, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `n` idle eventfds, each in an `Rc`: an aio handler owns a clone of the fd it watches (an
/// `Rc` clone, not a `dup`), the row keeps the original.
///
/// # Errors
///
/// As [`eventfd`].
pub fn eventfds(n: usize) -> io::Result<Vec<Rc<OwnedFd>>> {
    (0..n).map(|_| eventfd().map(Rc::new)).collect()
}

/// B5's active fd: a non-blocking Unix socketpair. [`poke`](Self::poke) writes one byte to one
/// end; the handlers read it from the other ([`rx`](Self::rx)).
#[derive(Debug)]
struct ActivePair {
    tx: UnixStream,
    rx: Rc<UnixStream>,
}

impl ActivePair {
    fn new() -> io::Result<ActivePair> {
        let (tx, rx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        Ok(ActivePair {
            tx,
            rx: Rc::new(rx),
        })
    }

    /// Writes one byte (one `write` system call).
    #[inline]
    fn poke(&self) {
        let n = (&self.tx)
            .write(&[1])
            .expect("cannot write the active socket");
        assert_eq!(n, 1);
    }

    fn raw_rx(&self) -> RawFd {
        self.rx.as_raw_fd()
    }
}

/// Reads what is there (one `read` system call, up to 64 bytes).
#[inline]
fn read_some(rx: &UnixStream) -> io::Result<usize> {
    let mut buf = [0u8; 64];
    (&*rx).read(&mut buf)
}

/// A benchmark row, built once and then timed.
pub trait Workload {
    /// Runs `iters` iterations and returns their time.
    fn run(&mut self, iters: u64) -> Duration;

    /// aio rows: the loop's backend waits (`AioContext::stats().waits`) per operation over every
    /// `run` so far. `None` for peers and floors.
    fn waits_per_op(&self) -> Option<f64> {
        None
    }
}

/// Who runs a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    /// aio on one backend.
    Aio(AioBackend),
    /// mio 1: `Poll` + `Registry`, edge-triggered (its only mode on Linux).
    Mio,
    /// polling 3: `Poller` in `PollMode::Level`.
    Polling,
    /// `epoll_wait` / `epoll_ctl` called directly.
    RawEpoll,
    /// `poll(2)` called directly.
    RawPoll,
    /// io_uring `POLL_ADD` through the io-uring crate, no loop around it.
    RawIoUring,
}

impl Impl {
    /// Every B5 row kind, in the order of the report.
    pub const B5: [Impl; 8] = [
        Impl::Aio(AioBackend::Poll),
        Impl::Aio(AioBackend::Epoll),
        Impl::Aio(AioBackend::IoUring),
        Impl::Mio,
        Impl::Polling,
        Impl::RawEpoll,
        Impl::RawPoll,
        Impl::RawIoUring,
    ];

    /// Every B6 row kind, in the order of the report.
    pub const B6: [Impl; 5] = [
        Impl::Aio(AioBackend::Poll),
        Impl::Aio(AioBackend::Epoll),
        Impl::Aio(AioBackend::IoUring),
        Impl::Mio,
        Impl::Polling,
    ];

    /// The row's name: the criterion function id.
    pub fn name(self) -> &'static str {
        match self {
            Impl::Aio(AioBackend::Poll) => "aio_poll",
            Impl::Aio(AioBackend::Epoll) => "aio_epoll",
            Impl::Aio(AioBackend::IoUring) => "aio_io_uring",
            Impl::Mio => "mio",
            Impl::Polling => "polling",
            Impl::RawEpoll => "raw_epoll",
            Impl::RawPoll => "raw_poll",
            Impl::RawIoUring => "raw_io_uring",
        }
    }

    /// Parses [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<Impl> {
        Impl::B5.into_iter().find(|i| i.name() == name)
    }

    /// Whether the row needs io_uring.
    pub fn needs_io_uring(self) -> bool {
        matches!(self, Impl::Aio(AioBackend::IoUring) | Impl::RawIoUring)
    }

    /// The B5 row: `idle` registered as idle fds, plus a fresh active socketpair.
    ///
    /// # Errors
    ///
    /// Setting up the backend or registering an fd failed.
    pub fn dispatch<'a>(self, idle: &'a [Rc<OwnedFd>]) -> io::Result<Box<dyn Workload + 'a>> {
        Ok(match self {
            Impl::Aio(backend) => Box::new(AioDispatch::new(backend, idle)?),
            Impl::Mio => Box::new(MioDispatch::new(idle)?),
            Impl::Polling => Box::new(PollingDispatch::new(idle)?),
            Impl::RawEpoll => Box::new(RawEpollDispatch::new(idle)?),
            Impl::RawPoll => Box::new(RawPollDispatch::new(idle)?),
            Impl::RawIoUring => Box::new(RawUringDispatch::new(idle)?),
        })
    }

    /// The B6 row for `op` with `k` operations per loop iteration.
    ///
    /// # Errors
    ///
    /// Setting up the backend or the eventfds failed, or this is a floor (no B6 row).
    pub fn churn(self, op: ChurnOp, k: usize) -> io::Result<Box<dyn Workload>> {
        Ok(match self {
            Impl::Aio(backend) => Box::new(AioChurn::new(backend, op, k)?),
            Impl::Mio => Box::new(MioChurn::new(op, k)?),
            Impl::Polling => Box::new(PollingChurn::new(op, k)?),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("{} has no B6 row", self.name()),
                ));
            }
        })
    }
}

/// Asserts that exactly `want` callbacks [`bump`]ed since `before`.
fn check_ran(before: u64, want: u64, what: &str) {
    assert_eq!(ran() - before, want, "{what}: a dispatch is missing");
}

fn per_op(count: u64, ops: u64) -> f64 {
    if ops == 0 {
        0.0
    } else {
        count as f64 / ops as f64
    }
}

/// The read callback of handlers whose eventfd is never written.
fn never_ready(_: &AioContext) {
    panic!("an idle eventfd became readable");
}

// ---------------------------------------------------------------------------------------------
// B5: readiness dispatch
// ---------------------------------------------------------------------------------------------

/// B5 on aio: `n` idle handlers and one active one; `ctx.poll()` per byte.
struct AioDispatch<'a> {
    ctx: AioContext,
    pair: ActivePair,
    // Dropped (unregistered) before `ctx`'s last clone, though either order is fine.
    _handlers: Vec<FdHandler>,
    _idle: &'a [Rc<OwnedFd>],
    ops: u64,
    waits: u64,
}

impl<'a> AioDispatch<'a> {
    fn new(backend: AioBackend, idle: &'a [Rc<OwnedFd>]) -> io::Result<Self> {
        let ctx = backend.context()?;
        let mut handlers = Vec::with_capacity(idle.len() + 1);
        for fd in idle {
            handlers.push(ctx.fd_handler(fd.clone()).on_read(never_ready).register()?);
        }
        let pair = ActivePair::new()?;
        let rx = pair.rx.clone();
        handlers.push(
            ctx.fd_handler(pair.rx.clone())
                .on_read(move |_| {
                    if read_some(&rx).expect("cannot read the active socket") == 1 {
                        bump();
                    }
                })
                .register()?,
        );
        // Let io_uring submit its N + 2 POLL_ADDs before the first timed iteration.
        ctx.poll_nonblocking();
        Ok(AioDispatch {
            ctx,
            pair,
            _handlers: handlers,
            _idle: idle,
            ops: 0,
            waits: 0,
        })
    }
}

impl Workload for AioDispatch<'_> {
    fn run(&mut self, iters: u64) -> Duration {
        let before = ran();
        let waits = self.ctx.stats().waits;
        let start = Instant::now();
        for i in 1..=iters {
            self.pair.poke();
            // One iteration is enough; the loop only guards against a wake-up without the
            // byte (none is expected, and the waits per op would show it).
            while ran() - before < i {
                self.ctx.poll();
            }
        }
        let elapsed = start.elapsed();
        check_ran(before, iters, "aio");
        self.ops += iters;
        self.waits += self.ctx.stats().waits - waits;
        elapsed
    }

    fn waits_per_op(&self) -> Option<f64> {
        Some(per_op(self.waits, self.ops))
    }
}

/// B5 on mio (edge-triggered): the active handler reads until `WouldBlock`.
struct MioDispatch<'a> {
    poll: mio::Poll,
    events: mio::Events,
    pair: ActivePair,
    _idle: &'a [Rc<OwnedFd>],
}

impl<'a> MioDispatch<'a> {
    fn new(idle: &'a [Rc<OwnedFd>]) -> io::Result<Self> {
        let poll = mio::Poll::new()?;
        for (i, fd) in idle.iter().enumerate() {
            let raw = fd.as_raw_fd();
            poll.registry().register(
                &mut mio::unix::SourceFd(&raw),
                mio::Token(i),
                mio::Interest::READABLE,
            )?;
        }
        let pair = ActivePair::new()?;
        poll.registry().register(
            &mut mio::unix::SourceFd(&pair.raw_rx()),
            mio::Token(ACTIVE),
            mio::Interest::READABLE,
        )?;
        Ok(MioDispatch {
            poll,
            events: mio::Events::with_capacity(64),
            pair,
            _idle: idle,
        })
    }
}

impl Workload for MioDispatch<'_> {
    fn run(&mut self, iters: u64) -> Duration {
        let before = ran();
        let start = Instant::now();
        for i in 1..=iters {
            self.pair.poke();
            while ran() - before < i {
                self.poll
                    .poll(&mut self.events, None)
                    .expect("mio poll failed");
                for ev in &self.events {
                    if ev.token() != mio::Token(ACTIVE) {
                        panic!("an idle eventfd became readable");
                    }
                    // Edge-triggered: drain, or the next byte brings no new event.
                    loop {
                        match read_some(&self.pair.rx) {
                            Ok(0) => panic!("the active socket was closed"),
                            Ok(_) => bump(),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => panic!("cannot read the active socket: {e}"),
                        }
                    }
                }
            }
        }
        let elapsed = start.elapsed();
        check_ran(before, iters, "mio");
        elapsed
    }
}

/// B5 on polling, level-triggered: one read per event.
struct PollingDispatch<'a> {
    poller: polling::Poller,
    events: polling::Events,
    pair: ActivePair,
    idle: &'a [Rc<OwnedFd>],
}

impl<'a> PollingDispatch<'a> {
    fn new(idle: &'a [Rc<OwnedFd>]) -> io::Result<Self> {
        let this = PollingDispatch {
            poller: polling::Poller::new()?,
            events: polling::Events::new(),
            pair: ActivePair::new()?,
            idle: &[],
        };
        // Registered one by one into `this`, whose `Drop` deletes whatever got registered
        // should a later add fail.
        let mut this = this;
        for (i, fd) in idle.iter().enumerate() {
            // polling requires the source to be deleted before it is closed. `Drop` deletes
            // every fd of `self.idle`, which outlive `self` (borrowed for 'a).
            // SAFETY: `Drop` deletes each idle fd from the poller before it is closed.
            unsafe {
                this.poller.add_with_mode(
                    fd,
                    polling::Event::readable(i),
                    polling::PollMode::Level,
                )?;
            }
            this.idle = &idle[..=i];
        }
        // As above; `Drop` deletes the active fd too, before the `pair` field (which owns it) is
        // dropped.
        // SAFETY: `Drop` deletes the active fd from the poller before it is closed.
        unsafe {
            this.poller.add_with_mode(
                &*this.pair.rx,
                polling::Event::readable(ACTIVE),
                polling::PollMode::Level,
            )?;
        }
        Ok(this)
    }
}

impl Drop for PollingDispatch<'_> {
    fn drop(&mut self) {
        for fd in self.idle {
            let _ = self.poller.delete(fd);
        }
        let _ = self.poller.delete(&*self.pair.rx);
    }
}

impl Workload for PollingDispatch<'_> {
    fn run(&mut self, iters: u64) -> Duration {
        let before = ran();
        let start = Instant::now();
        for i in 1..=iters {
            self.pair.poke();
            while ran() - before < i {
                self.events.clear();
                self.poller
                    .wait(&mut self.events, None)
                    .expect("polling wait failed");
                for ev in self.events.iter() {
                    if ev.key != ACTIVE {
                        panic!("an idle eventfd became readable");
                    }
                    if read_some(&self.pair.rx).expect("cannot read the active socket") == 1 {
                        bump();
                    }
                }
            }
        }
        let elapsed = start.elapsed();
        check_ran(before, iters, "polling");
        elapsed
    }
}

/// An epoll fd with level-triggered registrations, through libc.
struct RawEpoll {
    ep: OwnedFd,
}

impl RawEpoll {
    fn new() -> io::Result<RawEpoll> {
        // SAFETY: epoll_create1 takes no pointers; it returns a new fd or -1.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `ep` was just returned by epoll_create1, is open, and nothing else owns it.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        Ok(RawEpoll { ep })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, data: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: data,
        };
        // SAFETY: `ev` is a valid `epoll_event` that outlives the call (ignored for DEL).
        if unsafe { libc::epoll_ctl(self.ep.as_raw_fd(), op, fd, &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `epoll_wait` into `buf`; returns the events' data words through `f`.
    fn wait(&self, buf: &mut [libc::epoll_event], timeout_ms: i32, mut f: impl FnMut(u64)) {
        let len = i32::try_from(buf.len()).unwrap_or(i32::MAX);
        // SAFETY: `buf` is valid for writes of `len` events for the duration of the call.
        let n = unsafe { libc::epoll_wait(self.ep.as_raw_fd(), buf.as_mut_ptr(), len, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            assert_eq!(
                e.kind(),
                io::ErrorKind::Interrupted,
                "epoll_wait failed: {e}"
            );
            return;
        }
        for ev in &buf[..n as usize] {
            // A copy: `epoll_event` is packed on x86-64, so no reference to its field.
            let data = ev.u64;
            f(data);
        }
    }
}

fn epoll_buffer() -> Vec<libc::epoll_event> {
    vec![libc::epoll_event { events: 0, u64: 0 }; 64]
}

/// B5's epoll floor: `epoll_wait(-1)` and one read.
struct RawEpollDispatch<'a> {
    epoll: RawEpoll,
    buf: Vec<libc::epoll_event>,
    pair: ActivePair,
    _idle: &'a [Rc<OwnedFd>],
}

impl<'a> RawEpollDispatch<'a> {
    fn new(idle: &'a [Rc<OwnedFd>]) -> io::Result<Self> {
        let epoll = RawEpoll::new()?;
        for (i, fd) in idle.iter().enumerate() {
            epoll.ctl(libc::EPOLL_CTL_ADD, fd.as_raw_fd(), i as u64)?;
        }
        let pair = ActivePair::new()?;
        epoll.ctl(libc::EPOLL_CTL_ADD, pair.raw_rx(), ACTIVE as u64)?;
        Ok(RawEpollDispatch {
            epoll,
            buf: epoll_buffer(),
            pair,
            _idle: idle,
        })
    }
}

impl Workload for RawEpollDispatch<'_> {
    fn run(&mut self, iters: u64) -> Duration {
        let before = ran();
        let start = Instant::now();
        for i in 1..=iters {
            self.pair.poke();
            while ran() - before < i {
                let rx = &self.pair.rx;
                self.epoll.wait(&mut self.buf, -1, |data| {
                    assert_eq!(data, ACTIVE as u64, "an idle eventfd became readable");
                    if read_some(rx).expect("cannot read the active socket") == 1 {
                        bump();
                    }
                });
            }
        }
        let elapsed = start.elapsed();
        check_ran(before, iters, "raw epoll");
        elapsed
    }
}

/// B5's poll floor: `poll(-1)` over all N + 1 fds, a scan for the ready ones, one read.
struct RawPollDispatch<'a> {
    pollfds: Vec<libc::pollfd>,
    pair: ActivePair,
    _idle: &'a [Rc<OwnedFd>],
}

impl<'a> RawPollDispatch<'a> {
    fn new(idle: &'a [Rc<OwnedFd>]) -> io::Result<Self> {
        let pair = ActivePair::new()?;
        let pollfds = idle
            .iter()
            .map(|fd| fd.as_raw_fd())
            .chain([pair.raw_rx()])
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        Ok(RawPollDispatch {
            pollfds,
            pair,
            _idle: idle,
        })
    }
}

impl Workload for RawPollDispatch<'_> {
    fn run(&mut self, iters: u64) -> Duration {
        let before = ran();
        let active = self.pollfds.len() - 1;
        let nfds = self.pollfds.len() as libc::nfds_t;
        let start = Instant::now();
        for i in 1..=iters {
            self.pair.poke();
            while ran() - before < i {
                // The pointer and count describe `self.pollfds`, valid for reads and writes for the
                // duration of the call.
                // SAFETY: `self.pollfds` is valid for reads and writes during the call.
                let n = unsafe { libc::poll(self.pollfds.as_mut_ptr(), nfds, -1) };
                let mut pending = n.max(0);
                for (j, p) in self.pollfds.iter().enumerate() {
                    if pending == 0 {
                        break;
                    }
                    if p.revents == 0 {
                        continue;
                    }
                    pending -= 1;
                    assert_eq!(j, active, "an idle eventfd became readable");
                    if read_some(&self.pair.rx).expect("cannot read the active socket") == 1 {
                        bump();
                    }
                }
            }
        }
        let elapsed = start.elapsed();
        check_ran(before, iters, "raw poll");
        elapsed
    }
}

/// B5's io_uring floor: the N idle fds have a `POLL_ADD` in flight each; one iteration writes,
/// queues the active fd's one-shot `POLL_ADD`, submits it and waits in one `io_uring_enter`
/// (it completes during the submission, the byte being there), reaps and reads.
struct RawUringDispatch<'a> {
    ring: io_uring::IoUring,
    pair: ActivePair,
    _idle: &'a [Rc<OwnedFd>],
}

impl<'a> RawUringDispatch<'a> {
    fn new(idle: &'a [Rc<OwnedFd>]) -> io::Result<Self> {
        // The size of aio's ring.
        let mut ring = io_uring::IoUring::new(128)?;
        for (i, fd) in idle.iter().enumerate() {
            let sqe = poll_add(fd.as_raw_fd(), i as u64);
            if ring.submission().is_full() {
                ring.submit()?;
            }
            // A POLL_ADD points at no memory of ours; the fd stays open for the ring's life (`idle`
            // is borrowed for 'a), and closing it early would only fail the request.
            // SAFETY: a POLL_ADD points at no memory of ours, and its fd outlives the ring.
            unsafe { ring.submission().push(&sqe) }.expect("the SQ was just checked");
        }
        ring.submit()?;
        Ok(RawUringDispatch {
            ring,
            pair: ActivePair::new()?,
            _idle: idle,
        })
    }
}

fn poll_add(fd: RawFd, user_data: u64) -> io_uring::squeue::Entry {
    io_uring::opcode::PollAdd::new(io_uring::types::Fd(fd), libc::POLLIN as u32)
        .build()
        .user_data(user_data)
}

impl Workload for RawUringDispatch<'_> {
    fn run(&mut self, iters: u64) -> Duration {
        let before = ran();
        let start = Instant::now();
        for i in 1..=iters {
            self.pair.poke();
            let sqe = poll_add(self.pair.raw_rx(), ACTIVE as u64);
            // As in `new`; the socket outlives the ring (same struct, dropped after the ring, and a
            // poll on a closed socket only fails).
            // SAFETY: a POLL_ADD points at no memory of ours, and the socket outlives the ring.
            unsafe { self.ring.submission().push(&sqe) }.expect("the SQ is empty here");
            while ran() - before < i {
                match self.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => panic!("io_uring_enter failed: {e}"),
                }
                for cqe in self.ring.completion() {
                    assert_eq!(
                        cqe.user_data(),
                        ACTIVE as u64,
                        "an idle eventfd became readable"
                    );
                    assert!(cqe.result() > 0, "POLL_ADD failed: {}", cqe.result());
                    if read_some(&self.pair.rx).expect("cannot read the active socket") == 1 {
                        bump();
                    }
                }
            }
        }
        let elapsed = start.elapsed();
        check_ran(before, iters, "raw io_uring");
        elapsed
    }
}

// ---------------------------------------------------------------------------------------------
// B6: handler churn
// ---------------------------------------------------------------------------------------------

/// The churn operation of a B6 row. In each, one iteration does `k` operations and one
/// non-blocking loop iteration; times are reported per operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChurnOp {
    /// `k` × (add a handler for one eventfd, remove it), then one poll. One operation = one
    /// add + remove pair. io_uring folds each pair away before it reaches the kernel.
    AddRemove,
    /// One handler registered; `k` × replace it (aio `HandlerBuilder::replace`, mio
    /// `reregister`, polling `modify`, each with a new key/token), then one poll. One
    /// operation = one replace.
    Replace,
    /// `k` eventfds: add a handler for each, one poll, remove them all, one poll. One
    /// operation = one add + remove pair, every change reaching the kernel.
    Toggle,
}

impl ChurnOp {
    /// Every operation, in the order of the report.
    pub const ALL: [ChurnOp; 3] = [ChurnOp::AddRemove, ChurnOp::Replace, ChurnOp::Toggle];

    /// The name used in criterion group names.
    pub fn name(self) -> &'static str {
        match self {
            ChurnOp::AddRemove => "add_remove",
            ChurnOp::Replace => "replace",
            ChurnOp::Toggle => "toggle",
        }
    }

    /// Parses [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<ChurnOp> {
        ChurnOp::ALL.into_iter().find(|o| o.name() == name)
    }

    /// The eventfds a row of this operation needs.
    fn fds(self, k: usize) -> usize {
        match self {
            ChurnOp::Toggle => k,
            _ => 1,
        }
    }
}

/// B6 on aio.
struct AioChurn {
    ctx: AioContext,
    op: ChurnOp,
    k: usize,
    /// The handlers alive between iterations (Replace: the one being replaced).
    handlers: Vec<FdHandler>,
    fds: Vec<Rc<OwnedFd>>,
    ops: u64,
    waits: u64,
}

impl AioChurn {
    fn new(backend: AioBackend, op: ChurnOp, k: usize) -> io::Result<Self> {
        assert!(k > 0);
        let ctx = backend.context()?;
        let fds = eventfds(op.fds(k))?;
        let mut handlers = Vec::with_capacity(k);
        if op == ChurnOp::Replace {
            handlers.push(
                ctx.fd_handler(fds[0].clone())
                    .on_read(never_ready)
                    .register()?,
            );
        }
        // Submit the notifier's (and the replaced handler's) poll before timing.
        ctx.poll_nonblocking();
        Ok(AioChurn {
            ctx,
            op,
            k,
            handlers,
            fds,
            ops: 0,
            waits: 0,
        })
    }
}

impl Workload for AioChurn {
    fn run(&mut self, iters: u64) -> Duration {
        let waits = self.ctx.stats().waits;
        let ctx = &self.ctx;
        let start = Instant::now();
        match self.op {
            ChurnOp::AddRemove => {
                let fd = &self.fds[0];
                for _ in 0..iters {
                    for _ in 0..self.k {
                        let h = ctx
                            .fd_handler(fd.clone())
                            .on_read(never_ready)
                            .register()
                            .expect("register failed");
                        drop(h);
                    }
                    ctx.poll_nonblocking();
                }
            }
            ChurnOp::Replace => {
                let (fd, handler) = (&self.fds[0], &mut self.handlers[0]);
                for _ in 0..iters {
                    for _ in 0..self.k {
                        ctx.fd_handler(fd.clone())
                            .on_read(never_ready)
                            .replace(handler)
                            .expect("replace failed");
                    }
                    ctx.poll_nonblocking();
                }
            }
            ChurnOp::Toggle => {
                for _ in 0..iters {
                    for fd in &self.fds {
                        let h = ctx
                            .fd_handler(fd.clone())
                            .on_read(never_ready)
                            .register()
                            .expect("register failed");
                        self.handlers.push(h);
                    }
                    ctx.poll_nonblocking();
                    self.handlers.clear();
                    ctx.poll_nonblocking();
                }
            }
        }
        let elapsed = start.elapsed();
        self.ops += iters * self.k as u64;
        self.waits += self.ctx.stats().waits - waits;
        elapsed
    }

    fn waits_per_op(&self) -> Option<f64> {
        Some(per_op(self.waits, self.ops))
    }
}

/// B6 on mio.
struct MioChurn {
    poll: mio::Poll,
    events: mio::Events,
    op: ChurnOp,
    k: usize,
    /// Declared after `poll`, so closed after the epoll fd.
    fds: Vec<RawFdOwner>,
}

/// An eventfd kept with its raw number, which mio's `SourceFd` borrows.
struct RawFdOwner {
    raw: RawFd,
    _fd: OwnedFd,
}

impl RawFdOwner {
    fn new() -> io::Result<RawFdOwner> {
        let fd = eventfd()?;
        Ok(RawFdOwner {
            raw: fd.as_raw_fd(),
            _fd: fd,
        })
    }
}

impl MioChurn {
    fn new(op: ChurnOp, k: usize) -> io::Result<Self> {
        assert!(k > 0);
        let poll = mio::Poll::new()?;
        let fds = (0..op.fds(k))
            .map(|_| RawFdOwner::new())
            .collect::<io::Result<Vec<_>>>()?;
        if op == ChurnOp::Replace {
            poll.registry().register(
                &mut mio::unix::SourceFd(&fds[0].raw),
                mio::Token(0),
                mio::Interest::READABLE,
            )?;
        }
        Ok(MioChurn {
            poll,
            events: mio::Events::with_capacity(64),
            op,
            k,
            fds,
        })
    }

    fn poll0(&mut self) {
        self.poll
            .poll(&mut self.events, Some(Duration::ZERO))
            .expect("mio poll failed");
        assert!(self.events.is_empty(), "an idle eventfd became readable");
    }
}

impl Workload for MioChurn {
    fn run(&mut self, iters: u64) -> Duration {
        let start = Instant::now();
        match self.op {
            ChurnOp::AddRemove => {
                for _ in 0..iters {
                    let registry = self.poll.registry();
                    let mut src = mio::unix::SourceFd(&self.fds[0].raw);
                    for _ in 0..self.k {
                        registry
                            .register(&mut src, mio::Token(0), mio::Interest::READABLE)
                            .expect("register failed");
                        registry.deregister(&mut src).expect("deregister failed");
                    }
                    self.poll0();
                }
            }
            ChurnOp::Replace => {
                let mut token = 0;
                for _ in 0..iters {
                    let registry = self.poll.registry();
                    let mut src = mio::unix::SourceFd(&self.fds[0].raw);
                    for _ in 0..self.k {
                        token ^= 1;
                        registry
                            .reregister(&mut src, mio::Token(token), mio::Interest::READABLE)
                            .expect("reregister failed");
                    }
                    self.poll0();
                }
            }
            ChurnOp::Toggle => {
                for _ in 0..iters {
                    for (i, fd) in self.fds.iter().enumerate() {
                        self.poll
                            .registry()
                            .register(
                                &mut mio::unix::SourceFd(&fd.raw),
                                mio::Token(i),
                                mio::Interest::READABLE,
                            )
                            .expect("register failed");
                    }
                    self.poll0();
                    for fd in &self.fds {
                        self.poll
                            .registry()
                            .deregister(&mut mio::unix::SourceFd(&fd.raw))
                            .expect("deregister failed");
                    }
                    self.poll0();
                }
            }
        }
        start.elapsed()
    }
}

/// B6 on polling, level-triggered.
struct PollingChurn {
    poller: polling::Poller,
    events: polling::Events,
    op: ChurnOp,
    k: usize,
    /// Declared after `poller`, so closed after it; `Drop` deletes what is registered first.
    fds: Vec<Rc<OwnedFd>>,
}

impl PollingChurn {
    fn new(op: ChurnOp, k: usize) -> io::Result<Self> {
        assert!(k > 0);
        let this = PollingChurn {
            poller: polling::Poller::new()?,
            events: polling::Events::new(),
            op,
            k,
            fds: eventfds(op.fds(k))?,
        };
        if op == ChurnOp::Replace {
            // polling requires the source to be deleted before it is closed: `Drop` deletes it, and
            // the fd is owned by `this.fds`, dropped after `Drop` runs.
            // SAFETY: `Drop` deletes the fd from the poller before `this.fds` closes it.
            unsafe { this.add(0, 0)? };
        }
        Ok(this)
    }

    /// Adds `self.fds[i]`, level-triggered, under `key`.
    ///
    /// # Safety
    ///
    /// The fd must be deleted from the poller before it is closed (polling's contract).
    unsafe fn add(&self, i: usize, key: usize) -> io::Result<()> {
        // SAFETY: the caller promises the deletion.
        unsafe {
            self.poller.add_with_mode(
                &self.fds[i],
                polling::Event::readable(key),
                polling::PollMode::Level,
            )
        }
    }

    fn wait0(&mut self) {
        self.events.clear();
        self.poller
            .wait(&mut self.events, Some(Duration::ZERO))
            .expect("polling wait failed");
        assert!(self.events.is_empty(), "an idle eventfd became readable");
    }
}

impl Drop for PollingChurn {
    fn drop(&mut self) {
        if self.op == ChurnOp::Replace {
            let _ = self.poller.delete(&self.fds[0]);
        }
    }
}

impl Workload for PollingChurn {
    fn run(&mut self, iters: u64) -> Duration {
        let start = Instant::now();
        match self.op {
            ChurnOp::AddRemove => {
                for _ in 0..iters {
                    for _ in 0..self.k {
                        // SAFETY: deleted on the next line, before anything can close it.
                        unsafe { self.add(0, 0) }.expect("add failed");
                        self.poller.delete(&self.fds[0]).expect("delete failed");
                    }
                    self.wait0();
                }
            }
            ChurnOp::Replace => {
                let mut key = 0;
                for _ in 0..iters {
                    for _ in 0..self.k {
                        key ^= 1;
                        self.poller
                            .modify_with_mode(
                                self.fds[0].as_fd(),
                                polling::Event::readable(key),
                                polling::PollMode::Level,
                            )
                            .expect("modify failed");
                    }
                    self.wait0();
                }
            }
            ChurnOp::Toggle => {
                for _ in 0..iters {
                    for i in 0..self.fds.len() {
                        // SAFETY: every fd is deleted below in the same iteration.
                        unsafe { self.add(i, i) }.expect("add failed");
                    }
                    self.wait0();
                    for fd in &self.fds {
                        self.poller.delete(fd).expect("delete failed");
                    }
                    self.wait0();
                }
            }
        }
        start.elapsed()
    }
}
