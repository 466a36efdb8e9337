//! The monitor-level conformance suite: the behaviour every
//! [`FdMonitor`] must show against real kernel objects (pipes, eventfds), whatever its system
//! calls, as plain functions over a [`MonitorBackend`], and the
//! [`monitor_conformance_tests!`](crate::monitor_conformance_tests) macro that turns them into
//! `#[test]`s. It is to a backend what [`conformance_tests!`](crate::conformance_tests) is to a
//! context: each backend's `tests/*_monitor.rs` makes one macro call (one per way of waiting,
//! where a backend has two) and keeps only the cases that are specific to its kernel interface
//! (what happens to a closed fd, which kernel errors it returns, its outer fd, its `Debug`).
//!
//! The scaffolding the backends' test files share lives here too: the [`serial`] lock, fd
//! helpers ([`pipe`], [`eventfd`], [`write_bytes`]), the wait helpers that check each wait's
//! count ([`wait_for`], [`wait_now`]), the SIGUSR1 helpers ([`install_sigusr1_handler`],
//! [`signal_after`]) and the [`CountingAllocator`] that a test binary installs as its global
//! allocator for [`steady_state_wait_allocates_nothing`].
//!
//! Linux only: the cases are written on eventfds and `pipe2`.
//!
//! Every case takes the [`serial`] lock: several cases (in the backends' files) close a
//! registered fd or put a file on a known fd number, and expect the kernel to see exactly that;
//! a case running in parallel could be handed such a number. It also keeps the timing cases
//! honest on a busy machine. No case asserts a wall-clock upper bound tighter than 480 ms over a
//! 300 ms wait.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use aio_core::{Change, FdMonitor, HandlerKey, Interest, Readiness, ReadyList};

/// A registration as a backend lists it: key, fd, interest.
pub type Registration = (HandlerKey, RawFd, Interest);

/// The backend under test, as the suite sees it.
///
/// The fields are plain function pointers so that a backend's test file can describe its
/// monitor in a `const` (the suite's trait bounds are only [`FdMonitor`]; the orphan rule keeps
/// a test crate from implementing a trait of this crate for a backend's type).
#[derive(Debug)]
pub struct MonitorBackend<M> {
    /// A name for messages (`"epoll (ppoll fallback)"`).
    pub name: &'static str,
    /// Makes a fresh monitor that watches nothing.
    pub make: fn() -> io::Result<M>,
    /// Every registration the monitor holds, in any order (the backends' inherent
    /// `registrations()`).
    pub registrations: fn(&M) -> Vec<Registration>,
    /// Why the backend cannot run here (io_uring refused by the kernel), or `None`. A case
    /// then prints `SKIP <case>: <reason>` and passes.
    pub unavailable: fn() -> Option<String>,
    /// How many of 300 ready fds the first three non-blocking waits report, for a backend that
    /// reads events into a growing buffer (128, 256, 300 for epoll); `None` when every wait
    /// reports all of them.
    pub batches: Option<[usize; 3]>,
    /// Whether the kernel watches each (file, fd number) pair once, so that a second key on
    /// the same number is refused with `EEXIST` (epoll, and `polling` on Linux); otherwise both
    /// keys are watched (poll, io_uring).
    pub one_key_per_number: bool,
}

/// Nothing is unavailable: the [`MonitorBackend::unavailable`] of backends that always work.
pub fn always_available() -> Option<String> {
    None
}

impl<M: FdMonitor> MonitorBackend<M> {
    /// Takes the [`serial`] lock and makes a monitor, or prints the skip line and returns `None`
    /// when the backend is unavailable.
    ///
    /// # Panics
    ///
    /// If the backend is available but its monitor cannot be made.
    pub fn start(&self, case: &str) -> Option<(MutexGuard<'static, ()>, M)> {
        let guard = serial();
        if let Some(reason) = (self.unavailable)() {
            eprintln!("SKIP {case} on {}: {reason}", self.name);
            return None;
        }
        let monitor =
            (self.make)().unwrap_or_else(|e| panic!("{}: making a monitor failed: {e}", self.name));
        Some((guard, monitor))
    }

    /// The monitor's registrations, sorted by key.
    pub fn sorted_registrations(&self, monitor: &M) -> Vec<Registration> {
        let mut regs = (self.registrations)(monitor);
        regs.sort_by_key(|&(k, _, _)| k.as_u64());
        regs
    }
}

// ---------------------------------------------------------------------------------------------
// Scaffolding shared with the backends' own cases
// ---------------------------------------------------------------------------------------------

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs cases one at a time; a failed case must not fail every later one, hence the poison
/// recovery.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A non-blocking pipe: (read end, write end).
///
/// # Panics
///
/// If `pipe2` fails.
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [-1; 2];
    // SAFETY: [CONF-1] `fds` is a writable array of two c_ints, which is what pipe2 fills in.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: [CONF-3] pipe2 succeeded, so both numbers are open fds that nothing else owns yet.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A non-blocking eventfd with counter 0 (writable, not readable).
///
/// # Panics
///
/// If `eventfd` fails.
pub fn eventfd() -> OwnedFd {
    // SAFETY: [CONF-2] eventfd takes no pointers; any flags are safe to pass.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
    // SAFETY: [CONF-3] eventfd succeeded, so `fd` is an open fd that nothing else owns yet.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Moves `fd` to the number `target`, which the caller has just closed (the kernel may already
/// have given that number to `fd`, as it hands out the lowest free one): how a case makes an fd
/// number be reused for another file while a handler is still registered on it.
///
/// # Panics
///
/// If `dup3` fails.
pub fn move_to(fd: OwnedFd, target: RawFd) -> OwnedFd {
    if fd.as_raw_fd() == target {
        return fd;
    }
    // `target` is a number the caller chose and owns (it closed it just before, under the serial
    // lock). `fd` is closed on return.
    // SAFETY: [CONF-2] dup3 takes no pointers; `fd` is open and the caller owns `target`.
    let rc = unsafe { libc::dup3(fd.as_raw_fd(), target, libc::O_CLOEXEC) };
    assert_eq!(rc, target, "dup3: {}", io::Error::last_os_error());
    // SAFETY: [CONF-3] dup3 succeeded, so `target` is an open fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(target) }
}

/// Whether `fd` is readable right now, by `poll(2)` with a zero timeout: what an outer loop
/// sees of a monitor's fd.
///
/// # Panics
///
/// If `poll` fails.
pub fn readable_now(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: [CONF-1] `pfd` is one live, exclusively borrowed pollfd, matching nfds = 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    assert!(rc >= 0, "poll: {}", io::Error::last_os_error());
    rc == 1
}

/// Writes all of `bytes` to `fd` in one `write`.
///
/// # Panics
///
/// If the write fails or is short.
pub fn write_bytes(fd: &impl AsRawFd, bytes: &[u8]) {
    // SAFETY: [CONF-1] `bytes` is a live slice, readable for `bytes.len()` bytes during the call.
    let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    assert_eq!(
        n,
        bytes.len() as isize,
        "write: {}",
        io::Error::last_os_error()
    );
}

/// Makes an eventfd readable (adds 1 to its counter).
pub fn signal_eventfd(fd: &impl AsRawFd) {
    write_bytes(fd, &1u64.to_ne_bytes());
}

/// Reads from `fd` once and checks that `expected` bytes came.
///
/// # Panics
///
/// If the read fails or returns another count.
pub fn read_bytes(fd: &impl AsRawFd, expected: usize) {
    let mut buf = [0u8; 64];
    // SAFETY: [CONF-1] `buf` is a live, exclusively borrowed array, writable for `buf.len()` bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(n, expected as isize, "read: {}", io::Error::last_os_error());
}

/// The key of slot `index`, generation 1.
pub fn key(index: u32) -> HandlerKey {
    HandlerKey::new(index, 1)
}

/// Applies `Change::Add`, which must succeed. For the suites only: `fd` must be one the
/// case owns and keeps open until it removes it or drops the monitor ([CONF-5]).
///
/// # Panics
///
/// If the monitor refuses it.
pub fn add(monitor: &mut impl FdMonitor, key: HandlerKey, fd: RawFd, interest: Interest) {
    // SAFETY: [CONF-5]: the cases keep each fd they add open until they remove it.
    unsafe { monitor.update(Change::Add { key, fd, interest }) }.expect("add");
}

/// `FdMonitor::update` for the suites, which keep [CONF-5] (a case that closes a watched fd
/// on purpose says so at the close).
pub fn update(monitor: &mut impl FdMonitor, change: Change) -> io::Result<()> {
    // SAFETY: [CONF-5]: the cases keep each fd they add open until they remove it.
    unsafe { monitor.update(change) }
}

/// One `wait` with the given timeout. Checks that the returned count matches the list and that
/// no key is reported twice, and returns the reports sorted by key (backends report in kernel
/// order, which is not registration order).
///
/// # Panics
///
/// If the wait fails or breaks one of those rules.
pub fn wait_for(
    monitor: &mut impl FdMonitor,
    ready: &mut ReadyList,
    timeout: Option<Duration>,
) -> Vec<(HandlerKey, Readiness)> {
    ready.clear();
    let n = monitor.wait(ready, timeout).expect("wait");
    let mut reports: Vec<_> = ready.iter().collect();
    assert_eq!(
        n,
        reports.len(),
        "wait's return value must equal the reports pushed"
    );
    reports.sort_by_key(|&(k, _)| k.as_u64());
    let before = reports.len();
    reports.dedup_by_key(|&mut (k, _)| k);
    assert_eq!(
        reports.len(),
        before,
        "a key was reported twice by one wait"
    );
    reports
}

/// A non-blocking [`wait_for`].
pub fn wait_now(
    monitor: &mut impl FdMonitor,
    ready: &mut ReadyList,
) -> Vec<(HandlerKey, Readiness)> {
    wait_for(monitor, ready, Some(Duration::ZERO))
}

/// Makes sure this process may open `needed` fds, raising the soft limit if it is lower.
///
/// # Panics
///
/// If the hard limit is lower, or the limit cannot be read or set.
pub fn ensure_fd_limit(needed: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: [CONF-1] `limit` is a valid, exclusively borrowed rlimit for getrlimit to fill in.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(rc, 0, "getrlimit: {}", io::Error::last_os_error());
    if limit.rlim_cur >= needed {
        return;
    }
    assert!(
        limit.rlim_max >= needed,
        "RLIMIT_NOFILE hard limit {} is below the {needed} fds this test needs",
        limit.rlim_max
    );
    limit.rlim_cur = needed;
    // `limit` was read above; its soft limit was raised only within the hard one.
    // SAFETY: [CONF-1] `limit` is a valid rlimit.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(rc, 0, "setrlimit: {}", io::Error::last_os_error());
}

/// How many SIGUSR1s [`install_sigusr1_handler`]'s handler has counted.
pub static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn count_signal(_: libc::c_int) {
    // An atomic add is async-signal-safe; nothing else happens here.
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// Installs a handler that counts SIGUSR1 in [`SIGNALS`], without `SA_RESTART`, so that a
/// blocked wait fails with `EINTR` and the monitor must retry it.
///
/// # Panics
///
/// If `sigaction` fails.
pub fn install_sigusr1_handler() {
    // `sigaction` is a plain C struct; all zeroes is a valid value (no flags, no handler) that
    // is filled in below before use.
    // SAFETY: [CONF-4] all zeroes is a valid `sigaction` (no flags, no handler).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = count_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    action.sa_flags = 0;
    // SAFETY: [CONF-1] `action.sa_mask` is a valid, exclusively borrowed sigset_t.
    let rc = unsafe { libc::sigemptyset(&mut action.sa_mask) };
    assert_eq!(rc, 0);
    // `action`'s handler only does async-signal-safe work, and a null old-action pointer is
    // allowed.
    // SAFETY: [CONF-4] `action` is initialised and its handler async-signal-safe.
    let rc = unsafe { libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "sigaction: {}", io::Error::last_os_error());
}

/// Sends SIGUSR1 to `thread` after each of `delays` milliseconds (cumulative).
///
/// # Panics
///
/// If `pthread_kill` fails.
pub fn signal_after<T>(thread: &thread::JoinHandle<T>, delays: &[u64]) {
    for &delay in delays {
        thread::sleep(Duration::from_millis(delay));
        // The thread has not been joined, so its pthread_t still names a live (or finished but
        // unjoined) thread, and SIGUSR1 has a handler installed.
        // SAFETY: [CONF-2] the thread is unjoined, so its pthread_t is valid; SIGUSR1 is handled.
        let rc = unsafe { libc::pthread_kill(thread.as_pthread_t(), libc::SIGUSR1) };
        assert_eq!(rc, 0);
    }
}

/// A `tracing` subscriber that counts the events at one level, to check what a monitor logs
/// (a closed fd warned about once, not on every wait).
#[derive(Debug)]
pub struct CountLevel {
    level: tracing::Level,
    count: Arc<AtomicUsize>,
}

impl CountLevel {
    /// A subscriber counting the events at `level`, and the count it adds to.
    pub fn new(level: tracing::Level) -> (CountLevel, Arc<AtomicUsize>) {
        let count = Arc::new(AtomicUsize::new(0));
        let subscriber = CountLevel {
            level,
            count: Arc::clone(&count),
        };
        (subscriber, count)
    }
}

impl tracing::Subscriber for CountLevel {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() == self.level {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A global allocator that counts the allocations of the current thread, so that cases running
/// in other threads do not disturb the count. A test binary that runs the suite installs it:
///
/// ```ignore
/// #[global_allocator]
/// static ALLOCATOR: aio_conformance::monitor::CountingAllocator =
///     aio_conformance::monitor::CountingAllocator;
/// ```
#[derive(Debug)]
pub struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count_allocation() {
    // try_with: the allocator can run while this thread's locals are being torn down.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

/// How many allocations this thread has made through [`CountingAllocator`].
pub fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

// Every method forwards to the system allocator with the caller's arguments unchanged, so it
// upholds GlobalAlloc's contract exactly as `System` does; counting touches only a
// const-initialised thread-local Cell, which never allocates.
// SAFETY: [CONF-4] every method forwards unchanged to `System`, so upholds its contract.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: [CONF-4] forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: [CONF-4] forwarded unchanged; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_allocation();
        // As the caller guarantees, `ptr` was allocated by `System` through this allocator, with
        // `layout`.
        // SAFETY: [CONF-4] forwarded unchanged; `ptr` was allocated by `System` with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // As the caller guarantees, `ptr` was allocated by `System` through this allocator, with
        // `layout`.
        // SAFETY: [CONF-4] forwarded unchanged; `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

// ---------------------------------------------------------------------------------------------
// Readiness
// ---------------------------------------------------------------------------------------------

/// Start of every case: the monitor, or return (skipped).
macro_rules! start {
    ($b:expr, $case:literal) => {
        match $b.start($case) {
            Some(started) => started,
            None => return,
        }
    };
}

/// A readable pipe is reported once per wait, and again on every wait while the byte stays
/// unread (level-triggered), through non-blocking, infinite and finite waits alike.
pub fn readable_pipe_is_reported_once_per_wait_and_level_triggered<M: FdMonitor>(
    b: &MonitorBackend<M>,
) {
    let (_serial, mut monitor) = start!(b, "readable_pipe_is_reported_once_per_wait");
    let (r, w) = pipe();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);

    write_bytes(&w, b"x");
    let readable = [(key(1), Readiness::READABLE)];
    for _ in 0..3 {
        assert_eq!(wait_now(&mut monitor, &mut ready), readable);
    }
    assert_eq!(wait_for(&mut monitor, &mut ready, None), readable);
    let long = Some(Duration::from_secs(5));
    assert_eq!(wait_for(&mut monitor, &mut ready, long), readable);

    read_bytes(&r, 1);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
}

/// A write interest on a pipe's write end is reported writable, on every wait.
pub fn write_interest_reports_writable<M: FdMonitor>(b: &MonitorBackend<M>) {
    let (_serial, mut monitor) = start!(b, "write_interest_reports_writable");
    let (_r, w) = pipe();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(2), w.as_raw_fd(), Interest::WRITE);
    for _ in 0..3 {
        assert_eq!(
            wait_now(&mut monitor, &mut ready),
            [(key(2), Readiness::WRITABLE)]
        );
    }
}

/// Read and write interest on one fd give one report per wait, with both bits when both hold.
pub fn read_and_write_interest_is_one_report_with_both_bits<M: FdMonitor>(b: &MonitorBackend<M>) {
    let (_serial, mut monitor) = start!(b, "read_and_write_interest_is_one_report");
    let efd = eventfd();
    let mut ready = ReadyList::new();
    let both = Interest::READ | Interest::WRITE;
    add(&mut monitor, key(1), efd.as_raw_fd(), both);
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::WRITABLE)]
    );
    signal_eventfd(&efd);
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE | Readiness::WRITABLE)]
    );
}

/// Closing a pipe's write end reports hang-up to a read interest: on an empty pipe, with
/// readable when data is left, and again on the next wait (level-triggered). A backend may add
/// bits the read callback is called for anyway (`polling` says readable too on an empty pipe),
/// never one outside [`Readiness::mask_for`]`(READ)` other than writable.
pub fn closing_the_peer_reports_hangup<M: FdMonitor>(b: &MonitorBackend<M>) {
    let (_serial, mut monitor) = start!(b, "closing_the_peer_reports_hangup");
    let mut ready = ReadyList::new();
    let read_mask = Readiness::mask_for(Interest::READ);
    let check = |reports: Vec<(HandlerKey, Readiness)>, want: &[(HandlerKey, Readiness)]| {
        let keys: Vec<_> = reports.iter().map(|&(k, _)| k).collect();
        let want_keys: Vec<_> = want.iter().map(|&(k, _)| k).collect();
        assert_eq!(keys, want_keys, "{}: {reports:?}", b.name);
        for (&(k, got), &(_, needed)) in reports.iter().zip(want) {
            assert!(
                got.contains(needed),
                "{}: {k:?} {got:?}, {needed:?}",
                b.name
            );
            let extra = got - read_mask - Readiness::WRITABLE;
            assert!(extra.is_empty(), "{}: {k:?} {got:?}", b.name);
        }
    };
    let (r1, w1) = pipe();
    add(&mut monitor, key(1), r1.as_raw_fd(), Interest::READ);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    drop(w1);
    for _ in 0..2 {
        check(
            wait_now(&mut monitor, &mut ready),
            &[(key(1), Readiness::HANGUP)],
        );
    }

    let (r2, w2) = pipe();
    add(&mut monitor, key(2), r2.as_raw_fd(), Interest::READ);
    write_bytes(&w2, b"x");
    drop(w2);
    let both = Readiness::READABLE | Readiness::HANGUP;
    check(
        wait_now(&mut monitor, &mut ready),
        &[(key(1), Readiness::HANGUP), (key(2), both)],
    );
}

/// A `Replace` to a new key reports the fd under the new key only, and forgets the old one.
pub fn modify_reports_under_the_new_key_only<M: FdMonitor>(b: &MonitorBackend<M>) {
    let (_serial, mut monitor) = start!(b, "modify_reports_under_the_new_key_only");
    let (r, w) = pipe();
    let fd = r.as_raw_fd();
    let mut ready = ReadyList::new();
    let (old, new) = (HandlerKey::new(4, 1), HandlerKey::new(4, 2));
    add(&mut monitor, old, fd, Interest::READ);
    write_bytes(&w, b"x");
    // One report under the old key first, so a backend with a request in flight must retire it.
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(old, Readiness::READABLE)]
    );

    let interest = Interest::READ;
    let modify = Change::Replace {
        old,
        new,
        fd,
        interest,
    };
    update(&mut monitor, modify).unwrap();
    for _ in 0..2 {
        assert_eq!(
            wait_now(&mut monitor, &mut ready),
            [(new, Readiness::READABLE)]
        );
    }
    assert_eq!(b.sorted_registrations(&monitor), [(new, fd, interest)]);
    let err = update(&mut monitor, Change::Remove { key: old, fd }).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    assert_eq!((b.registrations)(&monitor).len(), 1);
}

/// A `Replace` under the same key changes what is watched for.
pub fn modify_can_change_interest_in_place<M: FdMonitor>(b: &MonitorBackend<M>) {
    let (_serial, mut monitor) = start!(b, "modify_can_change_interest_in_place");
    let efd = eventfd();
    let fd = efd.as_raw_fd();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), fd, Interest::READ);
    // Counter 0: not readable, and write interest is not asked for yet.
    assert_eq!(wait_now(&mut monitor, &mut ready), []);

    let interest = Interest::WRITE;
    let (old, new) = (key(1), key(1));
    let modify = Change::Replace {
        old,
        new,
        fd,
        interest,
    };
    update(&mut monitor, modify).unwrap();
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::WRITABLE)]
    );
    assert_eq!(b.sorted_registrations(&monitor), [(key(1), fd, interest)]);
}

/// A removed handler is never reported again, and the monitor is empty.
pub fn remove_stops_reports<M: FdMonitor>(b: &MonitorBackend<M>) {
    let (_serial, mut monitor) = start!(b, "remove_stops_reports");
    let (r, w) = pipe();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    write_bytes(&w, b"x");
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE)]
    );
    let fd = r.as_raw_fd();
    update(&mut monitor, Change::Remove { key: key(1), fd }).unwrap();
    assert_eq!((b.registrations)(&monitor), []);
    for _ in 0..2 {
        assert_eq!(wait_now(&mut monitor, &mut ready), []);
    }
    let short = Some(Duration::from_millis(5));
    assert_eq!(wait_for(&mut monitor, &mut ready, short), []);
}

/// Two keys may watch the same fd (the context keeps one handler per fd; a backend does not
/// have to): both are reported.
pub fn two_keys_may_watch_duplicates_of_one_file<M: FdMonitor>(b: &MonitorBackend<M>) {
    let (_serial, mut monitor) = start!(b, "two_keys_may_watch_duplicates_of_one_file");
    let (r, w) = pipe();
    // A duplicate: epoll watches (file, fd) pairs once, so the same number twice is its own
    // backend-specific case.
    let dup = r.try_clone().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    add(&mut monitor, key(2), dup.as_raw_fd(), Interest::READ);
    write_bytes(&w, b"x");
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE), (key(2), Readiness::READABLE)]
    );
}

/// The same fd number under a second key: watched under both (poll, io_uring), or refused with
/// `AlreadyExists` leaving the monitor as it was (a kernel that watches each (file, number)
/// pair once), as [`MonitorBackend::one_key_per_number`] says.
pub fn the_same_fd_number_under_two_keys<M: FdMonitor>(b: &MonitorBackend<M>) {
    let (_serial, mut monitor) = start!(b, "the_same_fd_number_under_two_keys");
    let (r, w) = pipe();
    let fd = r.as_raw_fd();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), fd, Interest::READ);
    let before = b.sorted_registrations(&monitor);
    let second = update(
        &mut monitor,
        Change::Add {
            key: key(2),
            fd,
            interest: Interest::READ,
        },
    );
    write_bytes(&w, b"x");
    let reports = wait_now(&mut monitor, &mut ready);
    if b.one_key_per_number {
        let err = second.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST), "{}: {err}", b.name);
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(b.sorted_registrations(&monitor), before);
        assert_eq!(reports, [(key(1), Readiness::READABLE)], "{}", b.name);
    } else {
        second.unwrap();
        let both = [(key(1), Readiness::READABLE), (key(2), Readiness::READABLE)];
        assert_eq!(reports, both, "{}", b.name);
    }
}

// ---------------------------------------------------------------------------------------------
// Timeouts, wake-ups and signals
// ---------------------------------------------------------------------------------------------

/// A finite wait never returns before its timeout, also below a millisecond (no rounding down).
pub fn timeout_is_never_early<M: FdMonitor>(b: &MonitorBackend<M>) {
    let (_serial, mut monitor) = start!(b, "timeout_is_never_early");
    let (r, _w) = pipe();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    for micros in [2000, 1500, 300] {
        let timeout = Duration::from_micros(micros);
        let start = Instant::now();
        assert_eq!(wait_for(&mut monitor, &mut ready, Some(timeout)), []);
        let elapsed = start.elapsed();
        assert!(
            elapsed >= timeout,
            "{}: returned after {elapsed:?}, timeout {timeout:?}",
            b.name
        );
    }
}

/// With nothing registered, a finite wait still sleeps for its timeout.
pub fn empty_set_still_sleeps_for_the_timeout<M: FdMonitor>(b: &MonitorBackend<M>) {
    let (_serial, mut monitor) = start!(b, "empty_set_still_sleeps_for_the_timeout");
    let mut ready = ReadyList::new();
    let timeout = Duration::from_millis(2);
    let start = Instant::now();
    assert_eq!(monitor.wait(&mut ready, Some(timeout)).unwrap(), 0);
    assert!(start.elapsed() >= timeout, "{}", b.name);
    assert!(ready.is_empty());
}

/// A timeout far beyond what the kernel's time types hold is accepted (clamped, or treated as
/// infinite), not refused: with a ready fd the wait returns it at once.
pub fn huge_timeout_is_accepted<M: FdMonitor>(b: &MonitorBackend<M>) {
    let (_serial, mut monitor) = start!(b, "huge_timeout_is_accepted");
    let (_r, w) = pipe();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), w.as_raw_fd(), Interest::WRITE);
    assert_eq!(
        wait_for(&mut monitor, &mut ready, Some(Duration::MAX)),
        [(key(1), Readiness::WRITABLE)]
    );
}

/// A write from another thread wakes an infinite wait, and a finite one before its timeout.
pub fn waits_are_woken_by_a_write_from_another_thread<M: FdMonitor>(b: &MonitorBackend<M>) {
    let (_serial, mut monitor) = start!(b, "waits_are_woken_by_a_write_from_another_thread");
    let (r, w) = pipe();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    for timeout in [None, Some(Duration::from_secs(10))] {
        let start = Instant::now();
        let writer = thread::scope(|s| {
            s.spawn(|| {
                thread::sleep(Duration::from_millis(20));
                write_bytes(&w, b"x");
            });
            wait_for(&mut monitor, &mut ready, timeout)
        });
        assert_eq!(writer, [(key(1), Readiness::READABLE)], "{timeout:?}");
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(20), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        read_bytes(&r, 1);
    }
}

/// Signals during a finite wait neither fail it nor extend it: the monitor retries `EINTR`
/// with the time that is left.
pub fn signals_neither_fail_nor_extend_a_wait<M: FdMonitor + 'static>(b: &MonitorBackend<M>) {
    let Some((_serial, monitor)) = b.start("signals_neither_fail_nor_extend_a_wait") else {
        return;
    };
    drop(monitor);
    install_sigusr1_handler();
    SIGNALS.store(0, Ordering::SeqCst);
    let timeout = Duration::from_millis(300);
    let make = b.make;
    let waiter = thread::spawn(move || {
        let (r, _w) = pipe();
        let mut monitor = make().unwrap();
        let mut ready = ReadyList::new();
        add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
        let start = Instant::now();
        let result = monitor.wait(&mut ready, Some(timeout));
        (result.map_err(|e| e.kind()), start.elapsed(), ready.len())
    });
    signal_after(&waiter, &[50, 150]);

    let (result, elapsed, reports) = waiter.join().unwrap();
    let name = b.name;
    eprintln!("{name}: 300 ms wait with two signals returned after {elapsed:?}");
    assert_eq!(result, Ok(0), "{name}");
    assert_eq!(reports, 0, "{name}");
    assert_eq!(SIGNALS.load(Ordering::SeqCst), 2, "{name}");
    assert!(
        elapsed >= timeout,
        "{name}: returned early, after {elapsed:?}"
    );
    // Restarting with the full timeout after the second signal (at ~200 ms) would take at
    // least 500 ms; recomputing from the deadline takes 300 ms plus scheduling noise.
    assert!(
        elapsed < Duration::from_millis(480),
        "{name}: signals extended the wait to {elapsed:?}"
    );
}

/// Signals during an infinite wait do not end it: it returns only when the fd is ready.
pub fn signals_do_not_end_an_infinite_wait<M: FdMonitor + 'static>(b: &MonitorBackend<M>) {
    let Some((_serial, monitor)) = b.start("signals_do_not_end_an_infinite_wait") else {
        return;
    };
    drop(monitor);
    install_sigusr1_handler();
    SIGNALS.store(0, Ordering::SeqCst);
    let (r, w) = pipe();
    // Before the spawn: the write below comes at least 150 ms after this.
    let start = Instant::now();
    let make = b.make;
    let waiter = thread::spawn(move || {
        let mut monitor = make().unwrap();
        let mut ready = ReadyList::new();
        add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
        let reports = wait_for(&mut monitor, &mut ready, None);
        (reports, start.elapsed())
    });
    signal_after(&waiter, &[50, 50]);
    // Both signals have been delivered (the handler counts them) before the write wakes it.
    thread::sleep(Duration::from_millis(50));
    assert_eq!(SIGNALS.load(Ordering::SeqCst), 2, "{}", b.name);
    write_bytes(&w, b"x");

    let (reports, elapsed) = waiter.join().unwrap();
    assert_eq!(reports, [(key(1), Readiness::READABLE)], "{}", b.name);
    assert!(elapsed >= Duration::from_millis(150), "{elapsed:?}");
}

// ---------------------------------------------------------------------------------------------
// Many fds, bookkeeping, bad changes, allocation
// ---------------------------------------------------------------------------------------------

/// With 10 000 idle fds registered, a wait reports exactly the one that became ready.
pub fn ten_thousand_idle_fds_and_one_active<M: FdMonitor>(b: &MonitorBackend<M>) {
    let (_serial, mut monitor) = start!(b, "ten_thousand_idle_fds_and_one_active");
    const FDS: u32 = 10_000;
    ensure_fd_limit(u64::from(FDS) + 256);
    let fds: Vec<OwnedFd> = (0..FDS).map(|_| eventfd()).collect();
    let mut ready = ReadyList::new();
    for (i, fd) in (0..).zip(&fds) {
        add(&mut monitor, key(i), fd.as_raw_fd(), Interest::READ);
    }
    assert_eq!((b.registrations)(&monitor).len(), FDS as usize);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);

    signal_eventfd(&fds[4321]);
    let active = [(key(4321), Readiness::READABLE)];
    assert_eq!(wait_now(&mut monitor, &mut ready), active);
    let short = Some(Duration::from_millis(1));
    assert_eq!(wait_for(&mut monitor, &mut ready, short), active);
    read_bytes(&fds[4321], 8);
    assert_eq!(wait_for(&mut monitor, &mut ready, short), []);
}

/// 300 ready fds are all reported within three waits, none twice in one wait (a backend with a
/// growing event buffer reports its [`MonitorBackend::batches`]).
pub fn many_ready_fds_are_all_reported<M: FdMonitor>(b: &MonitorBackend<M>) {
    let (_serial, mut monitor) = start!(b, "many_ready_fds_are_all_reported");
    const READY: u32 = 300;
    let fds: Vec<OwnedFd> = (0..READY).map(|_| eventfd()).collect();
    let mut ready = ReadyList::new();
    for (i, fd) in (0..).zip(&fds) {
        add(&mut monitor, key(i), fd.as_raw_fd(), Interest::READ);
        signal_eventfd(fd);
    }
    let all: HashSet<HandlerKey> = (0..READY).map(key).collect();
    let mut seen = HashSet::new();
    let mut counts = [0; 3];
    for count in &mut counts {
        let reports = wait_now(&mut monitor, &mut ready);
        assert!(reports.iter().all(|&(_, r)| r == Readiness::READABLE));
        *count = reports.len();
        seen.extend(reports.into_iter().map(|(k, _)| k));
    }
    assert_eq!(seen, all, "{}", b.name);
    let expected = b.batches.unwrap_or([READY as usize; 3]);
    assert_eq!(counts, expected, "{}", b.name);
}

/// 1 000 registrations added, removed in a scrambled order, re-added under new generations and
/// handed over to new keys: the registrations always match a model, and the kernel agrees
/// (exactly the registered write ends are reported, each once, under its current key).
pub fn churn_of_1000_fds_keeps_the_registrations_consistent<M: FdMonitor>(b: &MonitorBackend<M>) {
    let (_serial, mut monitor) = start!(b, "churn_of_1000_fds");
    churn_1000_fds(b, &mut monitor, |_| {});
}

/// The body of [`churn_of_1000_fds_keeps_the_registrations_consistent`] on a monitor the caller
/// made (under the [`serial`] lock), for a backend's own case that checks its own bookkeeping
/// too: `settled` is called once the kernel has reported exactly the 350 registered write ends,
/// before everything is removed. The monitor is left empty.
///
/// # Panics
///
/// If the monitor breaks one of the rules checked.
pub fn churn_1000_fds<M: FdMonitor>(
    b: &MonitorBackend<M>,
    monitor: &mut M,
    settled: impl FnOnce(&mut M),
) {
    ensure_fd_limit(2048);
    const PIPES: u32 = 500;
    const FDS: u32 = 2 * PIPES;

    let pipes: Vec<(OwnedFd, OwnedFd)> = (0..PIPES).map(|_| pipe()).collect();
    // Slot i is the read end of pipe i/2 for even i, its write end for odd i.
    let fd_of = |slot: u32| {
        let (r, w) = &pipes[(slot / 2) as usize];
        if slot.is_multiple_of(2) {
            r.as_raw_fd()
        } else {
            w.as_raw_fd()
        }
    };
    let interest_of = |slot: u32| {
        if slot.is_multiple_of(2) {
            Interest::READ
        } else {
            Interest::WRITE
        }
    };
    let mut ready = ReadyList::new();
    let mut expected: HashMap<u32, Registration> = HashMap::new();
    let check = |monitor: &M, expected: &HashMap<u32, Registration>| {
        let mut want: Vec<_> = expected.values().copied().collect();
        want.sort_by_key(|&(k, _, _)| k.as_u64());
        assert_eq!(b.sorted_registrations(monitor), want, "{}", b.name);
    };
    // What a wait may report: the registered write ends (writable), under their current keys.
    // Returns the keys reported.
    let check_reports = |reports: Vec<(HandlerKey, Readiness)>,
                         expected: &HashMap<u32, Registration>| {
        let writable: HashSet<HandlerKey> = expected
            .values()
            .filter(|&&(_, _, interest)| interest == Interest::WRITE)
            .map(|&(k, _, _)| k)
            .collect();
        for &(k, readiness) in &reports {
            assert_eq!(readiness, Readiness::WRITABLE, "{}: {k:?}", b.name);
            assert!(
                writable.contains(&k),
                "{}: {k:?} is not a live write end",
                b.name
            );
        }
        reports.into_iter().map(|(k, _)| k).collect::<HashSet<_>>()
    };

    for slot in 0..FDS {
        let k = HandlerKey::new(slot, 1);
        add(monitor, k, fd_of(slot), interest_of(slot));
        expected.insert(slot, (k, fd_of(slot), interest_of(slot)));
    }
    check(monitor, &expected);
    check_reports(wait_now(monitor, &mut ready), &expected);

    // Remove 600 slots in a scrambled order (7919 is prime, so slot * 7919 mod 1000 visits
    // every slot once), so that entries move from everywhere in any array, with waits in
    // between so that removals meet kernel state of every age.
    let order: Vec<u32> = (0..FDS).map(|i| (i * 7919) % FDS).collect();
    for (n, &slot) in order[..600].iter().enumerate() {
        let (k, fd, _) = expected.remove(&slot).unwrap();
        update(monitor, Change::Remove { key: k, fd }).unwrap();
        if n % 50 == 0 {
            check(monitor, &expected);
            check_reports(wait_now(monitor, &mut ready), &expected);
        }
    }
    check(monitor, &expected);

    // Re-add half of the removed slots under a new generation, and hand 100 live slots over
    // to new keys.
    for &slot in &order[..300] {
        let k = HandlerKey::new(slot, 2);
        add(monitor, k, fd_of(slot), interest_of(slot));
        expected.insert(slot, (k, fd_of(slot), interest_of(slot)));
    }
    for &slot in &order[600..700] {
        let (old, fd, interest) = expected[&slot];
        let new = HandlerKey::new(slot, 3);
        let modify = Change::Replace {
            old,
            new,
            fd,
            interest,
        };
        update(monitor, modify).unwrap();
        expected.insert(slot, (new, fd, interest));
    }
    check(monitor, &expected);

    // The kernel agrees: exactly the registered write ends are writable, each reported under
    // its current key. A backend that reads events into a growing buffer (128 at first) may
    // need three waits to report all 350; the last of three reports them all.
    let writable = expected
        .values()
        .filter(|&&(_, _, interest)| interest == Interest::WRITE)
        .count();
    assert_eq!(writable, 350);
    let mut last = HashSet::new();
    for _ in 0..3 {
        last = check_reports(wait_now(monitor, &mut ready), &expected);
    }
    assert_eq!(last.len(), writable, "{}", b.name);
    settled(monitor);

    for (_, (k, fd, _)) in expected.drain() {
        update(monitor, Change::Remove { key: k, fd }).unwrap();
    }
    assert_eq!((b.registrations)(monitor), []);
    assert_eq!(wait_now(monitor, &mut ready), []);
    let short = Some(Duration::from_millis(5));
    assert_eq!(wait_for(monitor, &mut ready, short), []);
}

/// Every change that breaks the contract (see
/// [`registrations`](aio_core::registrations)) is refused with its error kind, and leaves the
/// monitor as it was.
pub fn bad_changes_are_errors_and_leave_the_monitor_unchanged<M: FdMonitor>(b: &MonitorBackend<M>) {
    let (_serial, mut monitor) = start!(b, "bad_changes_are_errors");
    let (r, w) = pipe();
    let (rfd, wfd) = (r.as_raw_fd(), w.as_raw_fd());
    add(&mut monitor, key(1), rfd, Interest::READ);
    add(&mut monitor, key(2), wfd, Interest::WRITE);
    let before = b.sorted_registrations(&monitor);

    use io::ErrorKind::{InvalidInput, NotFound};
    let (read, write, none) = (Interest::READ, Interest::WRITE, Interest::empty());
    let unknown = HandlerKey::new(99, 1);
    let modify = |old, new, fd, interest| Change::Replace {
        old,
        new,
        fd,
        interest,
    };
    let cases = [
        (
            Change::Remove {
                key: unknown,
                fd: rfd,
            },
            NotFound,
        ),
        (modify(unknown, key(3), rfd, read), NotFound),
        (
            Change::Add {
                key: key(1),
                fd: wfd,
                interest: write,
            },
            InvalidInput,
        ),
        (modify(key(1), key(2), rfd, read), InvalidInput),
        (modify(key(1), key(3), wfd, read), InvalidInput),
        (modify(key(1), key(3), rfd, none), InvalidInput),
        (
            Change::Add {
                key: key(3),
                fd: rfd,
                interest: none,
            },
            InvalidInput,
        ),
        (
            Change::Add {
                key: key(3),
                fd: -1,
                interest: read,
            },
            InvalidInput,
        ),
    ];
    for (change, kind) in cases {
        let err = update(&mut monitor, change).unwrap_err();
        assert_eq!(err.kind(), kind, "{}: {change:?}", b.name);
        assert_eq!(b.sorted_registrations(&monitor), before, "{change:?}");
    }

    // Still fully working.
    let mut ready = ReadyList::new();
    write_bytes(&w, b"x");
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE), (key(2), Readiness::WRITABLE)]
    );
}

/// Once the ready list and the backend's buffers have grown, waits allocate nothing, with a
/// zero and with a positive timeout. The test binary must install [`CountingAllocator`].
pub fn steady_state_wait_allocates_nothing<M: FdMonitor>(b: &MonitorBackend<M>) {
    let (_serial, mut monitor) = start!(b, "steady_state_wait_allocates_nothing");
    let before = allocations();
    drop(std::hint::black_box(Box::new(1u64)));
    assert!(
        allocations() > before,
        "this test binary must install aio_conformance::monitor::CountingAllocator as its \
         #[global_allocator]"
    );
    let (r, w) = pipe();
    let efd = eventfd();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    let both = Interest::READ | Interest::WRITE;
    add(&mut monitor, key(2), efd.as_raw_fd(), both);
    write_bytes(&w, b"x");
    // Warm-up: the ready list and the backend's buffers grow to what two reports need.
    for _ in 0..3 {
        ready.clear();
        assert_eq!(monitor.wait(&mut ready, Some(Duration::ZERO)).unwrap(), 2);
    }

    let before = allocations();
    for _ in 0..1000 {
        ready.clear();
        assert_eq!(monitor.wait(&mut ready, Some(Duration::ZERO)).unwrap(), 2);
        ready.clear();
        let short = Some(Duration::from_nanos(1));
        assert_eq!(monitor.wait(&mut ready, short).unwrap(), 2);
    }
    assert_eq!(allocations() - before, 0, "{}", b.name);
}

// ---------------------------------------------------------------------------------------------
// Kernels that find entries by fd number (epoll, kqueue, event ports): closed and reused numbers
// ---------------------------------------------------------------------------------------------

/// A kernel that finds entries by number drops a watched file when its last fd is closed: no
/// report at all (poll would say `POLLNVAL`), the registration stays listed until the context
/// removes it, and that removal succeeds ("already gone", logged at debug level).
pub fn closed_fd_is_dropped_silently_and_remove_still_succeeds<M: FdMonitor>(
    b: &MonitorBackend<M>,
) {
    let (_serial, mut monitor) =
        start!(b, "closed_fd_is_dropped_silently_and_remove_still_succeeds");
    let (subscriber, debug_events) = CountLevel::new(tracing::Level::DEBUG);
    tracing::subscriber::with_default(subscriber, || {
        let (r, w) = pipe();
        let fd = r.as_raw_fd();
        let mut ready = ReadyList::new();
        add(&mut monitor, key(1), fd, Interest::READ);
        // Data is waiting, so the fd would be reported if it were still watched.
        write_bytes(&w, b"x");
        assert_eq!(
            wait_now(&mut monitor, &mut ready),
            [(key(1), Readiness::READABLE)]
        );

        // Closing the only fd of the file drops the kernel's entry: no report at
        // all, not even an error (poll would say POLLNVAL here). Breaks [CONF-5] on purpose.
        drop(r);
        assert_eq!(wait_now(&mut monitor, &mut ready), []);
        assert_eq!(
            wait_for(&mut monitor, &mut ready, Some(Duration::from_millis(5))),
            []
        );
        // The monitor still lists the handler: only the context can decide to remove it.
        assert_eq!(
            b.sorted_registrations(&monitor),
            [(key(1), fd, Interest::READ)]
        );

        // The delete answers EBADF for the closed number, which means "already gone": the
        // removal succeeds, and is logged at debug level.
        let before = debug_events.load(Ordering::Relaxed);
        update(&mut monitor, Change::Remove { key: key(1), fd }).unwrap();
        assert_eq!((b.registrations)(&monitor), []);
        assert_eq!(debug_events.load(Ordering::Relaxed), before + 1);
        assert_eq!(wait_now(&mut monitor, &mut ready), []);
    });
}

/// A number closed while registered and reused for a new file under a new key: the old key is
/// stale, and neither replacing nor removing it touches the new file's entry.
pub fn a_reused_fd_number_is_a_new_entry_that_the_stale_key_never_touches<M: FdMonitor>(
    b: &MonitorBackend<M>,
) {
    let (_serial, mut monitor) = start!(
        b,
        "a_reused_fd_number_is_a_new_entry_that_the_stale_key_never_touches"
    );
    let (r1, _w1) = pipe();
    let number = r1.as_raw_fd();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), number, Interest::READ);

    // The first file is closed while registered (the kernel drops its entry) and its number
    // is given to a second pipe's read end, which is registered under a new key. Breaks
    // [CONF-5] on purpose.
    drop(r1);
    let (r2, w2) = pipe();
    let r2 = move_to(r2, number);
    add(&mut monitor, key(2), number, Interest::READ);
    write_bytes(&w2, b"x");
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(2), Readiness::READABLE)]
    );
    assert_eq!(
        b.sorted_registrations(&monitor),
        [
            (key(1), number, Interest::READ),
            (key(2), number, Interest::READ)
        ]
    );

    // Replacing the stale key cannot take over the number: the new file is watched by key 2,
    // and epoll watches each (file, fd) pair once. Nothing changes.
    let err = update(
        &mut monitor,
        Change::Replace {
            old: key(1),
            new: key(3),
            fd: number,
            interest: Interest::READ,
        },
    )
    .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    assert_eq!((b.registrations)(&monitor).len(), 2);

    // Removing the stale key makes no system call (an EPOLL_CTL_DEL on the number would delete
    // key 2's entry): key 2 is still reported.
    update(
        &mut monitor,
        Change::Remove {
            key: key(1),
            fd: number,
        },
    )
    .unwrap();
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(2), Readiness::READABLE)]
    );
    assert_eq!(
        b.sorted_registrations(&monitor),
        [(key(2), number, Interest::READ)]
    );

    update(
        &mut monitor,
        Change::Remove {
            key: key(2),
            fd: number,
        },
    )
    .unwrap();
    assert_eq!((b.registrations)(&monitor), []);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    drop(r2);
}

/// A handler replaced after its fd was closed and the number reused: the modify finds no
/// entry (`ENOENT`), so the new key watches the file the number names now.
pub fn replacing_a_handler_whose_fd_number_was_reused_watches_the_new_file<M: FdMonitor>(
    b: &MonitorBackend<M>,
) {
    let (_serial, mut monitor) = start!(
        b,
        "replacing_a_handler_whose_fd_number_was_reused_watches_the_new_file"
    );
    let (r1, _w1) = pipe();
    let number = r1.as_raw_fd();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), number, Interest::READ);

    // What a context does when a handler is replaced after its fd was closed and the number
    // reused: a Replace on the same number. EPOLL_CTL_MOD answers ENOENT (the new file is not
    // registered), so the monitor adds it under the new key. Breaks [CONF-5] on purpose.
    drop(r1);
    let (r2, w2) = pipe();
    let _r2 = move_to(r2, number);
    update(
        &mut monitor,
        Change::Replace {
            old: key(1),
            new: key(2),
            fd: number,
            interest: Interest::READ,
        },
    )
    .unwrap();
    write_bytes(&w2, b"x");
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(2), Readiness::READABLE)]
    );
    assert_eq!(
        b.sorted_registrations(&monitor),
        [(key(2), number, Interest::READ)]
    );
    update(
        &mut monitor,
        Change::Remove {
            key: key(2),
            fd: number,
        },
    )
    .unwrap();
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
}

/// A closed fd whose file a duplicate keeps open is still reported under its key (on epoll,
/// which watches the file), and once its handler is removed its entry, if the kernel keeps it,
/// cannot be deleted: `epoll_ctl` reaches entries only through the number. The monitor drops
/// the reports of such an orphan, and a wait sleeps its timeout again, instead of waking at once
/// for as long as the duplicate lives (found by a new-user trial: 100 % CPU after the handler was
/// dropped). The live registration is still watched afterwards.
pub fn a_closed_fd_kept_open_by_a_duplicate_stops_waking_the_monitor_once_removed<M: FdMonitor>(
    b: &MonitorBackend<M>,
) {
    let (_serial, mut monitor) = start!(b, "a_closed_fd_kept_open_by_a_duplicate_stops_waking");
    let (r, w) = pipe();
    let (other_r, other_w) = pipe();
    let fd = r.as_raw_fd();
    let dup = r.try_clone().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), fd, Interest::READ);
    add(&mut monitor, key(2), other_r.as_raw_fd(), Interest::READ);
    write_bytes(&w, b"x");

    // The file stays open through `dup`, so its entry (file, fd) stays in the kernel and is
    // still reported under the key, although `fd` itself is closed. Breaks [CONF-5] on
    // purpose.
    drop(r);
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE)],
        "{}",
        b.name
    );

    // Removing it succeeds ("already gone" for the closed number) but cannot reach the entry.
    // Its next report names no registration: dropped.
    update(&mut monitor, Change::Remove { key: key(1), fd }).unwrap();
    assert_eq!((b.registrations)(&monitor).len(), 1);
    assert_eq!(wait_now(&mut monitor, &mut ready), [], "{}", b.name);
    // Gone for good, the duplicate still open: a wait sleeps its timeout.
    sleeps_50_ms(&mut monitor, &mut ready);
    // The live registration is still watched.
    write_bytes(&other_w, b"y");
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(2), Readiness::READABLE)],
        "{}",
        b.name
    );
    read_bytes(&other_r, 1);
    drop(dup);
    // A handler removed while its entry was armed, never reported (a one-shot entry that is
    // spent by its report above is no orphan): its first report comes after the removal, and
    // the wait it ends still sleeps its timeout.
    let kept = orphan(&mut monitor);
    sleeps_50_ms(&mut monitor, &mut ready);
    drop(kept);
}

/// Checks that a 50 ms wait of `monitor` reports nothing and is not ended early (by an orphan:
/// see [`a_closed_fd_kept_open_by_a_duplicate_stops_waking_the_monitor_once_removed`]).
///
/// # Panics
///
/// If the wait reports something or returns early.
pub fn sleeps_50_ms(monitor: &mut impl FdMonitor, ready: &mut ReadyList) {
    let t0 = Instant::now();
    assert_eq!(
        wait_for(monitor, ready, Some(Duration::from_millis(50))),
        []
    );
    let slept = t0.elapsed();
    assert!(slept >= Duration::from_millis(50), "woke after {slept:?}");
}

/// Leaves an orphan in `monitor`'s kernel set: a readable pipe registered under `key(1)`, its
/// fd closed while a duplicate (returned, with the write end) keeps the file open, then its
/// handler removed. Breaks [CONF-5] on purpose, as the orphan cases say.
pub fn orphan(monitor: &mut impl FdMonitor) -> (OwnedFd, OwnedFd) {
    let (r, w) = pipe();
    let fd = r.as_raw_fd();
    let dup = r.try_clone().unwrap();
    add(monitor, key(1), fd, Interest::READ);
    write_bytes(&w, b"x");
    drop(r);
    update(monitor, Change::Remove { key: key(1), fd }).unwrap();
    (dup, w)
}

/// For a level-triggered monitor on epoll: an outer loop takes the monitor's fd from
/// `outer_fds` before each sleep, and so follows the kernel object that replaces one holding
/// an orphan. After the orphan's wait that fd is a new one, not readable while nothing live is
/// ready, and a wait that only the orphan woke waits out its timeout.
pub fn an_outer_loop_follows_the_instance_that_replaces_an_orphan<M: FdMonitor>(
    b: &MonitorBackend<M>,
) {
    let (_serial, mut monitor) = start!(b, "an_outer_loop_follows_the_instance");
    let mut ready = ReadyList::new();
    let outer = |m: &M| {
        let mut out = Vec::new();
        m.outer_fds(&mut out);
        out[0].fd
    };
    let before = outer(&monitor);
    let kept = orphan(&mut monitor);
    assert!(readable_now(before), "{}: no orphan was left", b.name);
    sleeps_50_ms(&mut monitor, &mut ready);
    let after = outer(&monitor);
    assert_ne!(after, before, "{}: the instance was not replaced", b.name);
    assert!(!readable_now(after), "{}: the new fd is readable", b.name);
    drop(kept);
}

/// For a level-triggered monitor on epoll: after its fd was lent through `as_fd` (to code that
/// may keep the number), the kernel object is kept. The orphan's reports are dropped, logged
/// once (not on every wait), and its wake-ups go on until the duplicate is closed and the
/// kernel drops the entry.
pub fn an_orphan_is_only_dropped_once_the_fd_was_lent<M: FdMonitor + AsFd>(b: &MonitorBackend<M>) {
    let (_serial, mut monitor) = start!(b, "an_orphan_is_only_dropped_once_the_fd_was_lent");
    let (subscriber, warnings) = CountLevel::new(tracing::Level::WARN);
    tracing::subscriber::with_default(subscriber, || {
        let mut ready = ReadyList::new();
        let lent = monitor.as_fd().as_raw_fd();
        let (dup, _w) = orphan(&mut monitor);
        for _ in 0..3 {
            assert_eq!(wait_now(&mut monitor, &mut ready), [], "{}", b.name);
        }
        assert_eq!(warnings.load(Ordering::Relaxed), 1, "{}", b.name);
        assert_eq!(monitor.as_fd().as_raw_fd(), lent, "{}", b.name);
        assert!(
            readable_now(lent),
            "{}: the orphan's entry is still in the kernel",
            b.name
        );
        // Closing the last duplicate releases the file, and the kernel drops the entry.
        drop(dup);
        assert!(!readable_now(lent), "{}", b.name);
    });
}

/// Expands to one `#[test]` per case of the monitor suite, for the backend described by
/// `$backend` (a [`MonitorBackend`] constant). Call it once per way of waiting a backend has
/// (in a module of its own), and install [`CountingAllocator`] once in the test binary. With
/// `, by_number` it adds the cases of a kernel that finds its entries by fd number and drops a
/// closed file by itself (epoll, and `polling` on it): closed and reused numbers, and orphans, as
/// [`Registrations::update`](aio_core::registrations::Registrations::update) handles them.
///
/// ```ignore
/// const POLL: MonitorBackend<PollMonitor> = MonitorBackend {
///     name: "poll",
///     make: PollMonitor::new,
///     registrations: |m| m.registrations().collect(),
///     unavailable: always_available,
///     batches: None,
///     one_key_per_number: false,
/// };
/// aio_conformance::monitor_conformance_tests!(POLL);
/// ```
#[macro_export]
macro_rules! monitor_conformance_tests {
    ($backend:expr $(,)?) => {
        $crate::monitor_conformance_tests!(@cases $backend;
            readable_pipe_is_reported_once_per_wait_and_level_triggered,
            write_interest_reports_writable,
            read_and_write_interest_is_one_report_with_both_bits,
            closing_the_peer_reports_hangup,
            modify_reports_under_the_new_key_only,
            modify_can_change_interest_in_place,
            remove_stops_reports,
            two_keys_may_watch_duplicates_of_one_file,
            the_same_fd_number_under_two_keys,
            timeout_is_never_early,
            empty_set_still_sleeps_for_the_timeout,
            huge_timeout_is_accepted,
            waits_are_woken_by_a_write_from_another_thread,
            signals_neither_fail_nor_extend_a_wait,
            signals_do_not_end_an_infinite_wait,
            ten_thousand_idle_fds_and_one_active,
            many_ready_fds_are_all_reported,
            churn_of_1000_fds_keeps_the_registrations_consistent,
            bad_changes_are_errors_and_leave_the_monitor_unchanged,
            steady_state_wait_allocates_nothing,
        );
    };
    ($backend:expr, by_number $(,)?) => {
        $crate::monitor_conformance_tests!($backend);
        $crate::monitor_conformance_tests!(@cases $backend;
            closed_fd_is_dropped_silently_and_remove_still_succeeds,
            a_reused_fd_number_is_a_new_entry_that_the_stale_key_never_touches,
            replacing_a_handler_whose_fd_number_was_reused_watches_the_new_file,
            a_closed_fd_kept_open_by_a_duplicate_stops_waking_the_monitor_once_removed,
        );
    };
    (@cases $backend:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::monitor::$case(&$backend)
            }
        )*
    };
}
