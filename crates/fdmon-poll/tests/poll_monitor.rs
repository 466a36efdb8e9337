//! Behaviour of [`PollMonitor`] against real kernel objects: pipes and eventfds created here.
//!
//! Every test takes the [`serial`] lock, because one of them closes a registered fd and expects
//! the kernel to report its number as not open; a test running in parallel could otherwise
//! receive that number for a new fd. Serial tests also keep the timing tests honest on a busy
//! machine.
//!
//! Linux only: the cases are written on eventfds and `pipe2`. The backend itself builds for
//! macOS and the BSDs (`cargo xtask ci`'s `cross` step checks it), where the context conformance
//! suite is what would run on it.

#![cfg(target_os = "linux")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use aio_core::{Change, FdMonitor, HandlerKey, Interest, OuterFd, Readiness, ReadyList};
use fdmon_poll::PollMonitor;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs tests one at a time; a failed test must not fail every later one, hence the poison
/// recovery.
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A non-blocking pipe: (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [-1; 2];
    // SAFETY: `fds` is a writable array of two c_ints, which is what pipe2 fills in.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: pipe2 succeeded, so both numbers are open fds that nothing else owns yet.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A non-blocking eventfd with counter 0 (writable, not readable).
fn eventfd() -> OwnedFd {
    // SAFETY: eventfd takes no pointers; any flags are safe to pass.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
    // SAFETY: eventfd succeeded, so `fd` is an open fd that nothing else owns yet.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn write_bytes(fd: &OwnedFd, bytes: &[u8]) {
    // SAFETY: `bytes` is a live slice, readable for `bytes.len()` bytes during the call.
    let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    assert_eq!(
        n,
        bytes.len() as isize,
        "write: {}",
        io::Error::last_os_error()
    );
}

fn read_bytes(fd: &OwnedFd, expected: usize) {
    let mut buf = [0u8; 64];
    // SAFETY: `buf` is a live, exclusively borrowed array, writable for `buf.len()` bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(n, expected as isize, "read: {}", io::Error::last_os_error());
}

fn key(index: u32) -> HandlerKey {
    HandlerKey::new(index, 1)
}

fn add(monitor: &mut PollMonitor, key: HandlerKey, fd: RawFd, interest: Interest) {
    monitor
        .update(Change::Add { key, fd, interest })
        .expect("add");
}

/// One `wait` with the given timeout; checks that the returned count matches the list.
fn wait_for(
    monitor: &mut PollMonitor,
    ready: &mut ReadyList,
    timeout: Option<Duration>,
) -> Vec<(HandlerKey, Readiness)> {
    ready.clear();
    let n = monitor.wait(ready, timeout).expect("wait");
    let reports: Vec<_> = ready.iter().collect();
    assert_eq!(
        n,
        reports.len(),
        "wait's return value must equal the reports pushed"
    );
    reports
}

/// A non-blocking `wait`.
fn wait_now(monitor: &mut PollMonitor, ready: &mut ReadyList) -> Vec<(HandlerKey, Readiness)> {
    wait_for(monitor, ready, Some(Duration::ZERO))
}

fn sorted_registrations(monitor: &PollMonitor) -> Vec<(u64, RawFd, Interest)> {
    let mut regs: Vec<_> = monitor
        .registrations()
        .map(|(k, fd, interest)| (k.as_u64(), fd, interest))
        .collect();
    regs.sort_by_key(|&(k, _, _)| k);
    regs
}

// ---------------------------------------------------------------------------------------------
// Readiness
// ---------------------------------------------------------------------------------------------

#[test]
fn readable_pipe_is_reported_once_per_wait_and_level_triggered() {
    let _serial = serial();
    let (r, w) = pipe();
    let mut monitor = PollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);

    assert_eq!(wait_now(&mut monitor, &mut ready), []);

    write_bytes(&w, b"x");
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE)]
    );
    // The byte is still unread, so the fd is still ready and must be reported again.
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE)]
    );

    read_bytes(&r, 1);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
}

#[test]
fn modify_reports_under_the_new_key_only() {
    let _serial = serial();
    let (r, w) = pipe();
    let mut monitor = PollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    let old = HandlerKey::new(4, 1);
    let new = HandlerKey::new(4, 2);
    add(&mut monitor, old, r.as_raw_fd(), Interest::READ);
    write_bytes(&w, b"x");

    monitor
        .update(Change::Modify {
            old,
            new,
            fd: r.as_raw_fd(),
            interest: Interest::READ,
        })
        .unwrap();
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(new, Readiness::READABLE)]
    );
    assert_eq!(
        monitor.registrations().collect::<Vec<_>>(),
        [(new, r.as_raw_fd(), Interest::READ)]
    );
    // The old key is gone from the index too, not just from the reports.
    let err = monitor
        .update(Change::Remove {
            key: old,
            fd: r.as_raw_fd(),
        })
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    assert_eq!(monitor.len(), 1);
}

#[test]
fn modify_can_change_interest_in_place() {
    let _serial = serial();
    let efd = eventfd();
    let mut monitor = PollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), efd.as_raw_fd(), Interest::READ);
    // Counter is 0: not readable, and write interest is not asked for yet.
    assert_eq!(wait_now(&mut monitor, &mut ready), []);

    monitor
        .update(Change::Modify {
            old: key(1),
            new: key(1),
            fd: efd.as_raw_fd(),
            interest: Interest::WRITE,
        })
        .unwrap();
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::WRITABLE)]
    );
    assert_eq!(
        monitor.registrations().collect::<Vec<_>>(),
        [(key(1), efd.as_raw_fd(), Interest::WRITE)]
    );
}

#[test]
fn remove_stops_reports() {
    let _serial = serial();
    let (r, w) = pipe();
    let mut monitor = PollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    write_bytes(&w, b"x");
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE)]
    );

    monitor
        .update(Change::Remove {
            key: key(1),
            fd: r.as_raw_fd(),
        })
        .unwrap();
    assert!(monitor.is_empty());
    assert_eq!(monitor.len(), 0);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
}

#[test]
fn write_interest_reports_writable() {
    let _serial = serial();
    let (_r, w) = pipe();
    let mut monitor = PollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(2), w.as_raw_fd(), Interest::WRITE);
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(2), Readiness::WRITABLE)]
    );
}

#[test]
fn read_and_write_interest_is_one_report_with_both_bits() {
    let _serial = serial();
    let efd = eventfd();
    let mut monitor = PollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(
        &mut monitor,
        key(1),
        efd.as_raw_fd(),
        Interest::READ | Interest::WRITE,
    );
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::WRITABLE)]
    );

    write_bytes(&efd, &1u64.to_ne_bytes());
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE | Readiness::WRITABLE)]
    );
}

#[test]
fn closing_the_peer_reports_hangup() {
    let _serial = serial();
    let mut monitor = PollMonitor::new().unwrap();
    let mut ready = ReadyList::new();

    // Empty pipe: hang-up alone.
    let (r1, w1) = pipe();
    add(&mut monitor, key(1), r1.as_raw_fd(), Interest::READ);
    drop(w1);
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::HANGUP)]
    );

    // Data left in the pipe: readable and hung up in the same report.
    let (r2, w2) = pipe();
    add(&mut monitor, key(2), r2.as_raw_fd(), Interest::READ);
    write_bytes(&w2, b"x");
    drop(w2);
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [
            (key(1), Readiness::HANGUP),
            (key(2), Readiness::READABLE | Readiness::HANGUP)
        ]
    );
}

#[test]
fn two_keys_may_watch_the_same_fd() {
    let _serial = serial();
    let (r, w) = pipe();
    let mut monitor = PollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    add(&mut monitor, key(2), r.as_raw_fd(), Interest::READ);
    write_bytes(&w, b"x");
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE), (key(2), Readiness::READABLE)]
    );
}

// ---------------------------------------------------------------------------------------------
// A registered fd that gets closed
// ---------------------------------------------------------------------------------------------

/// A subscriber that counts `WARN` events, to check that a closed fd is warned about once.
struct CountWarnings(Arc<AtomicUsize>);

impl tracing::Subscriber for CountWarnings {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() == tracing::Level::WARN {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn closed_registered_fd_reports_error_and_warns_once_per_key() {
    let _serial = serial();
    let warnings = Arc::new(AtomicUsize::new(0));
    let subscriber = CountWarnings(Arc::clone(&warnings));
    tracing::subscriber::with_default(subscriber, || {
        let (r, _w) = pipe();
        let fd = r.as_raw_fd();
        let mut monitor = PollMonitor::new().unwrap();
        let mut ready = ReadyList::new();
        add(&mut monitor, key(1), fd, Interest::READ);
        drop(r); // Closes the fd while it is still registered.

        assert_eq!(
            wait_now(&mut monitor, &mut ready),
            [(key(1), Readiness::ERROR)]
        );
        assert_eq!(
            wait_now(&mut monitor, &mut ready),
            [(key(1), Readiness::ERROR)]
        );
        assert_eq!(warnings.load(Ordering::Relaxed), 1);

        // A new key for the same closed fd is a new handler: reported, and warned about, anew.
        monitor
            .update(Change::Modify {
                old: key(1),
                new: key(2),
                fd,
                interest: Interest::READ,
            })
            .unwrap();
        assert_eq!(
            wait_now(&mut monitor, &mut ready),
            [(key(2), Readiness::ERROR)]
        );
        assert_eq!(
            wait_now(&mut monitor, &mut ready),
            [(key(2), Readiness::ERROR)]
        );
        assert_eq!(warnings.load(Ordering::Relaxed), 2);

        // Modify and Remove forget that a key was warned about, so the set of warned keys
        // does not grow forever. Reusing a key (which the context never does) makes that
        // visible: it is warned about again.
        monitor
            .update(Change::Modify {
                old: key(2),
                new: key(1),
                fd,
                interest: Interest::READ,
            })
            .unwrap();
        assert_eq!(
            wait_now(&mut monitor, &mut ready),
            [(key(1), Readiness::ERROR)]
        );
        assert_eq!(warnings.load(Ordering::Relaxed), 3);

        // Removing a handler whose fd is closed must succeed.
        monitor.update(Change::Remove { key: key(1), fd }).unwrap();
        assert_eq!(wait_now(&mut monitor, &mut ready), []);
        add(&mut monitor, key(1), fd, Interest::READ);
        assert_eq!(
            wait_now(&mut monitor, &mut ready),
            [(key(1), Readiness::ERROR)]
        );
        assert_eq!(warnings.load(Ordering::Relaxed), 4);

        monitor.update(Change::Remove { key: key(1), fd }).unwrap();
        assert!(monitor.is_empty());
        assert_eq!(wait_now(&mut monitor, &mut ready), []);
        assert_eq!(warnings.load(Ordering::Relaxed), 4);
    });
}

// ---------------------------------------------------------------------------------------------
// Timeouts, wake-ups and signals
// ---------------------------------------------------------------------------------------------

#[test]
fn timeout_is_honoured_without_rounding_down() {
    let _serial = serial();
    let (r, _w) = pipe();
    let mut monitor = PollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);

    for timeout in [Duration::from_millis(2), Duration::from_micros(1500)] {
        let start = Instant::now();
        assert_eq!(wait_for(&mut monitor, &mut ready, Some(timeout)), []);
        let elapsed = start.elapsed();
        assert!(
            elapsed >= timeout,
            "returned after {elapsed:?}, timeout {timeout:?}"
        );
    }
}

#[test]
fn empty_set_still_sleeps_for_the_timeout() {
    let _serial = serial();
    let mut monitor = PollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    let start = Instant::now();
    assert_eq!(
        monitor
            .wait(&mut ready, Some(Duration::from_millis(2)))
            .unwrap(),
        0
    );
    assert!(start.elapsed() >= Duration::from_millis(2));
    assert!(ready.is_empty());
}

#[test]
fn huge_timeout_is_clamped_not_rejected() {
    let _serial = serial();
    let (_r, w) = pipe();
    let mut monitor = PollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    // The fd is ready, so this returns at once; what matters is that a timeout far beyond
    // time_t reaches the kernel as a valid timespec instead of an EINVAL.
    add(&mut monitor, key(1), w.as_raw_fd(), Interest::WRITE);
    assert_eq!(
        wait_for(&mut monitor, &mut ready, Some(Duration::MAX)),
        [(key(1), Readiness::WRITABLE)]
    );
}

#[test]
fn infinite_wait_is_woken_by_a_write_from_another_thread() {
    let _serial = serial();
    let (r, w) = pipe();
    let mut monitor = PollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);

    let start = Instant::now();
    let writer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(20));
        write_bytes(&w, b"x");
        w
    });
    assert_eq!(
        wait_for(&mut monitor, &mut ready, None),
        [(key(1), Readiness::READABLE)]
    );
    assert!(start.elapsed() >= Duration::from_millis(20));
    let _w = writer.join().unwrap();
}

static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn count_signal(_: libc::c_int) {
    // An atomic add is async-signal-safe; nothing else happens here.
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// Installs `count_signal` for SIGUSR1 without `SA_RESTART`, so a blocked `ppoll` fails with
/// `EINTR` (it would anyway: poll-family calls are never restarted).
fn install_sigusr1_handler() {
    // `sigaction` is a plain C struct; all zeroes is a valid value (no flags, no handler)
    // that is filled in below before use.
    // SAFETY: justified in the comment just above.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = count_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    action.sa_flags = 0;
    // SAFETY: `action.sa_mask` is a valid, exclusively borrowed sigset_t.
    let rc = unsafe { libc::sigemptyset(&mut action.sa_mask) };
    assert_eq!(rc, 0);
    // `action` is fully initialised, its handler is an `extern "C" fn(c_int)` that only
    // does async-signal-safe work, and a null old-action pointer is allowed.
    // SAFETY: justified in the comment just above.
    let rc = unsafe { libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "sigaction: {}", io::Error::last_os_error());
}

#[test]
fn signals_neither_fail_nor_extend_a_wait() {
    let _serial = serial();
    install_sigusr1_handler();
    SIGNALS.store(0, Ordering::SeqCst);
    let timeout = Duration::from_millis(300);

    let waiter = thread::spawn(move || {
        let (r, _w) = pipe();
        let mut monitor = PollMonitor::new().unwrap();
        let mut ready = ReadyList::new();
        add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
        let start = Instant::now();
        let result = monitor.wait(&mut ready, Some(timeout));
        (result.map_err(|e| e.kind()), start.elapsed(), ready.len())
    });

    for delay in [50, 150] {
        thread::sleep(Duration::from_millis(delay));
        // The waiter has not been joined, so its pthread_t still names a live (or
        // finished but unjoined) thread, and SIGUSR1 has a handler installed above.
        // SAFETY: justified in the comment just above.
        let rc = unsafe { libc::pthread_kill(waiter.as_pthread_t(), libc::SIGUSR1) };
        assert_eq!(rc, 0);
    }

    let (result, elapsed, reports) = waiter.join().unwrap();
    assert_eq!(result, Ok(0));
    assert_eq!(reports, 0);
    assert_eq!(SIGNALS.load(Ordering::SeqCst), 2);
    assert!(elapsed >= timeout, "returned early, after {elapsed:?}");
    // Restarting with the full timeout after the second signal (at ~200 ms) would take at
    // least 500 ms; recomputing from the deadline takes 300 ms plus scheduling noise.
    assert!(
        elapsed < Duration::from_millis(480),
        "signals extended the wait to {elapsed:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Bookkeeping
// ---------------------------------------------------------------------------------------------

/// Makes sure this process may open `needed` fds, raising the soft limit if it is lower.
fn ensure_fd_limit(needed: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, exclusively borrowed rlimit for getrlimit to fill in.
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
    // `limit` is a valid rlimit read above, with the soft limit raised within the hard
    // limit.
    // SAFETY: justified in the comment just above.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(rc, 0, "setrlimit: {}", io::Error::last_os_error());
}

#[test]
fn churn_of_1000_fds_keeps_the_index_consistent() {
    let _serial = serial();
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

    let mut monitor = PollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    let mut expected: HashMap<u32, (HandlerKey, RawFd, Interest)> = HashMap::new();
    let check = |monitor: &PollMonitor, expected: &HashMap<u32, (HandlerKey, RawFd, Interest)>| {
        let mut want: Vec<_> = expected
            .values()
            .map(|&(k, fd, interest)| (k.as_u64(), fd, interest))
            .collect();
        want.sort_by_key(|&(k, _, _)| k);
        assert_eq!(sorted_registrations(monitor), want);
        assert_eq!(monitor.len(), expected.len());
    };

    for slot in 0..FDS {
        let k = HandlerKey::new(slot, 1);
        add(&mut monitor, k, fd_of(slot), interest_of(slot));
        expected.insert(slot, (k, fd_of(slot), interest_of(slot)));
    }
    check(&monitor, &expected);

    // Remove 600 slots in a scrambled order (7919 is prime, so slot * 7919 mod 1000 visits
    // every slot once), so that swap_remove moves entries from everywhere in the array.
    let order: Vec<u32> = (0..FDS).map(|i| (i * 7919) % FDS).collect();
    for (n, &slot) in order[..600].iter().enumerate() {
        let (k, fd, _) = expected.remove(&slot).unwrap();
        monitor.update(Change::Remove { key: k, fd }).unwrap();
        if n % 50 == 0 {
            check(&monitor, &expected);
        }
    }
    check(&monitor, &expected);

    // Re-add half of the removed slots under a new generation, and hand 100 live slots over
    // to new keys.
    for &slot in &order[..300] {
        let k = HandlerKey::new(slot, 2);
        add(&mut monitor, k, fd_of(slot), interest_of(slot));
        expected.insert(slot, (k, fd_of(slot), interest_of(slot)));
    }
    for &slot in &order[600..700] {
        let (old, fd, interest) = expected[&slot];
        let new = HandlerKey::new(slot, 3);
        monitor
            .update(Change::Modify {
                old,
                new,
                fd,
                interest,
            })
            .unwrap();
        expected.insert(slot, (new, fd, interest));
    }
    check(&monitor, &expected);

    // The kernel agrees: exactly the registered write ends are writable, and nothing else is
    // ready, each reported once under its current key.
    let mut reported: Vec<u64> = wait_now(&mut monitor, &mut ready)
        .into_iter()
        .map(|(k, readiness)| {
            assert_eq!(readiness, Readiness::WRITABLE);
            k.as_u64()
        })
        .collect();
    reported.sort_unstable();
    let mut writable: Vec<u64> = expected
        .values()
        .filter(|&&(_, _, interest)| interest == Interest::WRITE)
        .map(|&(k, _, _)| k.as_u64())
        .collect();
    writable.sort_unstable();
    assert_eq!(reported.len(), 350);
    assert_eq!(reported, writable);

    for (_, (k, fd, _)) in expected.drain() {
        monitor.update(Change::Remove { key: k, fd }).unwrap();
    }
    assert!(monitor.is_empty());
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
}

#[test]
fn bad_changes_are_errors_and_leave_the_monitor_unchanged() {
    let _serial = serial();
    let (r, w) = pipe();
    let mut monitor = PollMonitor::new().unwrap();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    add(&mut monitor, key(2), w.as_raw_fd(), Interest::WRITE);
    let before = sorted_registrations(&monitor);

    let kind = |result: io::Result<()>| result.unwrap_err().kind();
    let unknown = HandlerKey::new(99, 1);
    assert_eq!(
        kind(monitor.update(Change::Remove {
            key: unknown,
            fd: r.as_raw_fd()
        })),
        io::ErrorKind::NotFound
    );
    assert_eq!(
        kind(monitor.update(Change::Modify {
            old: unknown,
            new: key(3),
            fd: r.as_raw_fd(),
            interest: Interest::READ,
        })),
        io::ErrorKind::NotFound
    );
    assert_eq!(
        kind(monitor.update(Change::Add {
            key: key(1),
            fd: w.as_raw_fd(),
            interest: Interest::WRITE
        })),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(monitor.update(Change::Modify {
            old: key(1),
            new: key(2),
            fd: r.as_raw_fd(),
            interest: Interest::READ,
        })),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(monitor.update(Change::Modify {
            old: key(1),
            new: key(3),
            fd: w.as_raw_fd(),
            interest: Interest::READ,
        })),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(monitor.update(Change::Modify {
            old: key(1),
            new: key(3),
            fd: r.as_raw_fd(),
            interest: Interest::empty(),
        })),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(monitor.update(Change::Add {
            key: key(3),
            fd: r.as_raw_fd(),
            interest: Interest::empty()
        })),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(monitor.update(Change::Add {
            key: key(3),
            fd: -1,
            interest: Interest::READ
        })),
        io::ErrorKind::InvalidInput
    );

    assert_eq!(sorted_registrations(&monitor), before);
    assert_eq!(monitor.len(), 2);
}

#[test]
fn outer_fds_appends_every_registration() {
    let _serial = serial();
    let (r, w) = pipe();
    let mut monitor = PollMonitor::new().unwrap();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    add(&mut monitor, key(2), w.as_raw_fd(), Interest::WRITE);

    let existing = OuterFd {
        fd: 0,
        interest: Interest::READ,
    };
    let mut out = vec![existing];
    monitor.outer_fds(&mut out);
    assert_eq!(
        out,
        [
            existing,
            OuterFd {
                fd: r.as_raw_fd(),
                interest: Interest::READ
            },
            OuterFd {
                fd: w.as_raw_fd(),
                interest: Interest::WRITE
            },
        ]
    );
}

#[test]
fn name_need_wait_and_debug() {
    let _serial = serial();
    let mut monitor = PollMonitor::new().unwrap();
    assert_eq!(monitor.name(), "poll");
    assert!(!monitor.need_wait(false));
    assert!(monitor.need_wait(true));
    add(&mut monitor, HandlerKey::new(1, 2), 7, Interest::READ);
    assert_eq!(
        format!("{monitor:?}"),
        "PollMonitor { registrations: [(HandlerKey(1v2), 7, Interest(READ))], .. }"
    );
}

// ---------------------------------------------------------------------------------------------
// Allocation
// ---------------------------------------------------------------------------------------------

/// Counts allocations made by the current thread, so that tests running in other threads do
/// not disturb the count.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count_allocation() {
    // try_with: the allocator can run while this thread's locals are being torn down.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: every method forwards to the system allocator with the caller's arguments unchanged,
// so it upholds GlobalAlloc's contract exactly as `System` does; counting touches only a
// const-initialised thread-local Cell, which never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: forwarded unchanged; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_allocation();
        // Forwarded unchanged; `ptr` was allocated by `System` through this allocator
        // with `layout`, as the caller guarantees.
        // SAFETY: justified in the comment just above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Forwarded unchanged; `ptr` was allocated by `System` through this allocator
        // with `layout`, as the caller guarantees.
        // SAFETY: justified in the comment just above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

#[test]
fn steady_state_wait_allocates_nothing() {
    let _serial = serial();
    let (r, w) = pipe();
    let efd = eventfd();
    let mut monitor = PollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    add(
        &mut monitor,
        key(2),
        efd.as_raw_fd(),
        Interest::READ | Interest::WRITE,
    );
    write_bytes(&w, b"x");
    // Warm-up: the ready list grows to hold two reports.
    assert_eq!(monitor.wait(&mut ready, Some(Duration::ZERO)).unwrap(), 2);

    let before = allocations();
    for _ in 0..1000 {
        ready.clear();
        assert_eq!(monitor.wait(&mut ready, Some(Duration::ZERO)).unwrap(), 2);
        ready.clear();
        assert_eq!(
            monitor
                .wait(&mut ready, Some(Duration::from_nanos(1)))
                .unwrap(),
            2
        );
    }
    assert_eq!(allocations() - before, 0);
}
