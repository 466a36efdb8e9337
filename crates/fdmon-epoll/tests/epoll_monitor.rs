//! Behaviour of [`EpollMonitor`] against real kernel objects: pipes, sockets, eventfds and a
//! regular file created here.
//!
//! Every test takes the [`serial`] lock, because several close registered fds or put a new
//! file on a known fd number, and expect the kernel to see exactly that; a test running in
//! parallel could otherwise be handed one of those numbers for a new fd. Serial tests also keep
//! the timing tests honest on a busy machine. Tests of timeouts and signals run on both ways of
//! waiting with a positive timeout (`epoll_pwait2`, and the `ppoll` fallback); the first is
//! skipped, with a printed notice, on a kernel that lacks it.

#![cfg(target_os = "linux")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use aio_core::{Change, FdMonitor, HandlerKey, Interest, OuterFd, Readiness, ReadyList};
use fdmon_epoll::EpollMonitor;

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

/// Moves `fd` to the number `target`, which the caller has just closed (the kernel may already
/// have given that number to `fd`, as it hands out the lowest free one).
fn move_to(fd: OwnedFd, target: RawFd) -> OwnedFd {
    if fd.as_raw_fd() == target {
        return fd;
    }
    // Dup3 takes no pointers; `fd` is open, and `target` is a number this test chose
    // and owns (it was closed just before, under the serial lock). `fd` is closed on return.
    // SAFETY: justified in the comment just above.
    let rc = unsafe { libc::dup3(fd.as_raw_fd(), target, libc::O_CLOEXEC) };
    assert_eq!(rc, target, "dup3: {}", io::Error::last_os_error());
    // SAFETY: dup3 succeeded, so `target` is an open fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(target) }
}

fn write_bytes(fd: &impl AsRawFd, bytes: &[u8]) {
    // SAFETY: `bytes` is a live slice, readable for `bytes.len()` bytes during the call.
    let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    assert_eq!(
        n,
        bytes.len() as isize,
        "write: {}",
        io::Error::last_os_error()
    );
}

fn read_bytes(fd: &impl AsRawFd, expected: usize) {
    let mut buf = [0u8; 64];
    // SAFETY: `buf` is a live, exclusively borrowed array, writable for `buf.len()` bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(n, expected as isize, "read: {}", io::Error::last_os_error());
}

fn key(index: u32) -> HandlerKey {
    HandlerKey::new(index, 1)
}

fn add(monitor: &mut EpollMonitor, key: HandlerKey, fd: RawFd, interest: Interest) {
    monitor
        .update(Change::Add { key, fd, interest })
        .expect("add");
}

/// One `wait` with the given timeout; checks that the returned count matches the list.
fn wait_for(
    monitor: &mut EpollMonitor,
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
fn wait_now(monitor: &mut EpollMonitor, ready: &mut ReadyList) -> Vec<(HandlerKey, Readiness)> {
    wait_for(monitor, ready, Some(Duration::ZERO))
}

/// The reports of one wait, sorted by key, for tests where the kernel's order is not the point.
fn sorted(mut reports: Vec<(HandlerKey, Readiness)>) -> Vec<(HandlerKey, Readiness)> {
    reports.sort_by_key(|&(k, _)| k.as_u64());
    reports
}

fn sorted_registrations(monitor: &EpollMonitor) -> Vec<(u64, RawFd, Interest)> {
    let mut regs: Vec<_> = monitor
        .registrations()
        .map(|(k, fd, interest)| (k.as_u64(), fd, interest))
        .collect();
    regs.sort_by_key(|&(k, _, _)| k);
    regs
}

/// The two ways a monitor waits with a positive timeout, each with a name for messages:
/// `epoll_pwait2` (when the kernel has it; otherwise a notice is printed and it is left out)
/// and the `ppoll` fallback.
fn both_paths() -> Vec<(&'static str, EpollMonitor)> {
    let mut monitors = Vec::new();
    let pwait2 = EpollMonitor::with_pwait2(true).unwrap();
    if pwait2.uses_pwait2() {
        monitors.push(("epoll_pwait2", pwait2));
    } else {
        eprintln!("SKIPPED the epoll_pwait2 path: this kernel does not offer epoll_pwait2");
    }
    let fallback = EpollMonitor::with_pwait2(false).unwrap();
    assert!(!fallback.uses_pwait2());
    monitors.push(("ppoll fallback", fallback));
    monitors
}

/// A subscriber that counts events at one level, to check what the monitor logs.
struct CountLevel(tracing::Level, Arc<AtomicUsize>);

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
        if *event.metadata().level() == self.0 {
            self.1.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

// ---------------------------------------------------------------------------------------------
// Readiness
// ---------------------------------------------------------------------------------------------

#[test]
fn readable_pipe_is_reported_once_per_wait_and_level_triggered() {
    let _serial = serial();
    let (r, w) = pipe();
    let mut monitor = EpollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);

    assert_eq!(wait_now(&mut monitor, &mut ready), []);

    write_bytes(&w, b"xy");
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE)]
    );
    // The bytes are still unread, so the fd is still ready and must be reported again: the
    // registration is level-triggered, not edge-triggered.
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE)]
    );
    assert_eq!(
        wait_for(&mut monitor, &mut ready, None),
        [(key(1), Readiness::READABLE)]
    );

    read_bytes(&r, 2);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
}

#[test]
fn modify_reports_under_the_new_key_only() {
    let _serial = serial();
    let (r, w) = pipe();
    let mut monitor = EpollMonitor::new().unwrap();
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
    // The old key is gone from the bookkeeping too, not just from the reports.
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
    let mut monitor = EpollMonitor::new().unwrap();
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
    let mut monitor = EpollMonitor::new().unwrap();
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

    // The kernel forgot the fd as well: it can be added again, and is reported again.
    add(&mut monitor, key(2), r.as_raw_fd(), Interest::READ);
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(2), Readiness::READABLE)]
    );
}

#[test]
fn write_interest_reports_writable() {
    let _serial = serial();
    let (_r, w) = pipe();
    let mut monitor = EpollMonitor::new().unwrap();
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
    let mut monitor = EpollMonitor::new().unwrap();
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
    let mut monitor = EpollMonitor::new().unwrap();
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
        sorted(wait_now(&mut monitor, &mut ready)),
        [
            (key(1), Readiness::HANGUP),
            (key(2), Readiness::READABLE | Readiness::HANGUP)
        ]
    );
}

#[test]
fn socket_peer_shutting_down_writes_reports_hangup_through_rdhup() {
    let _serial = serial();
    let mut monitor = EpollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    let (ours, peer) = UnixStream::pair().unwrap();
    add(&mut monitor, key(1), ours.as_raw_fd(), Interest::READ);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);

    // Only the peer's writing side is shut: the kernel says EPOLLIN | EPOLLRDHUP, not EPOLLHUP,
    // so the hang-up is seen only because read interest asks for EPOLLRDHUP.
    peer.shutdown(Shutdown::Write).unwrap();
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE | Readiness::HANGUP)]
    );
}

#[test]
fn two_keys_may_watch_duplicates_of_one_fd() {
    let _serial = serial();
    let (r, w) = pipe();
    let r2 = r.try_clone().unwrap();
    let mut monitor = EpollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    // epoll registers (file, fd number) pairs, so a dup of the fd is a separate entry.
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    add(&mut monitor, key(2), r2.as_raw_fd(), Interest::READ);
    write_bytes(&w, b"x");
    assert_eq!(
        sorted(wait_now(&mut monitor, &mut ready)),
        [(key(1), Readiness::READABLE), (key(2), Readiness::READABLE)]
    );
}

#[test]
fn the_same_fd_twice_is_eexist_and_leaves_the_monitor_unchanged() {
    let _serial = serial();
    let (r, w) = pipe();
    let mut monitor = EpollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    let before = sorted_registrations(&monitor);

    let err = monitor
        .update(Change::Add {
            key: key(2),
            fd: r.as_raw_fd(),
            interest: Interest::READ,
        })
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    assert_eq!(sorted_registrations(&monitor), before);
    assert_eq!(monitor.len(), 1);

    write_bytes(&w, b"x");
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE)]
    );
}

#[test]
fn a_regular_file_is_eperm_and_leaves_the_monitor_unchanged() {
    let _serial = serial();
    let path = std::env::temp_dir().join(format!("fdmon-epoll-test-{}.tmp", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let (r, w) = pipe();
    let mut monitor = EpollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    let before = sorted_registrations(&monitor);

    // A regular file is always ready, so epoll refuses to watch it.
    for interest in [Interest::READ, Interest::WRITE] {
        let err = monitor
            .update(Change::Add {
                key: key(2),
                fd: file.as_raw_fd(),
                interest,
            })
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }
    assert_eq!(sorted_registrations(&monitor), before);
    assert_eq!(monitor.len(), 1);

    // The refused key was not remembered: it can be added for another fd.
    write_bytes(&w, b"x");
    add(&mut monitor, key(2), w.as_raw_fd(), Interest::WRITE);
    assert_eq!(
        sorted(wait_now(&mut monitor, &mut ready)),
        [(key(1), Readiness::READABLE), (key(2), Readiness::WRITABLE)]
    );
}

#[test]
fn an_fd_that_is_not_open_is_ebadf_and_leaves_the_monitor_unchanged() {
    let _serial = serial();
    // The monitor is created first, so that its epoll fd cannot take the closed number.
    let mut monitor = EpollMonitor::new().unwrap();
    let (r, _w) = pipe();
    let number = r.as_raw_fd();
    drop(r);
    let err = monitor
        .update(Change::Add {
            key: key(1),
            fd: number,
            interest: Interest::READ,
        })
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    assert!(monitor.is_empty());
}

// ---------------------------------------------------------------------------------------------
// A registered fd that gets closed
// ---------------------------------------------------------------------------------------------

#[test]
fn closed_fd_is_dropped_silently_and_remove_still_succeeds() {
    let _serial = serial();
    let debug_events = Arc::new(AtomicUsize::new(0));
    let subscriber = CountLevel(tracing::Level::DEBUG, Arc::clone(&debug_events));
    tracing::subscriber::with_default(subscriber, || {
        let (r, w) = pipe();
        let fd = r.as_raw_fd();
        let mut monitor = EpollMonitor::new().unwrap();
        let mut ready = ReadyList::new();
        add(&mut monitor, key(1), fd, Interest::READ);
        // Data is waiting, so the fd would be reported if it were still watched.
        write_bytes(&w, b"x");
        assert_eq!(
            wait_now(&mut monitor, &mut ready),
            [(key(1), Readiness::READABLE)]
        );

        // Closing the only fd of the file drops the epoll entry in the kernel: no report at
        // all, not even an error (poll would say POLLNVAL here).
        drop(r);
        assert_eq!(wait_now(&mut monitor, &mut ready), []);
        assert_eq!(
            wait_for(&mut monitor, &mut ready, Some(Duration::from_millis(5))),
            []
        );
        // The monitor still lists the handler: only the context can decide to remove it.
        assert_eq!(
            monitor.registrations().collect::<Vec<_>>(),
            [(key(1), fd, Interest::READ)]
        );

        // EPOLL_CTL_DEL answers EBADF for the closed number, which means "already gone": the
        // removal succeeds, and is logged at debug level.
        let before = debug_events.load(Ordering::Relaxed);
        monitor.update(Change::Remove { key: key(1), fd }).unwrap();
        assert!(monitor.is_empty());
        assert_eq!(debug_events.load(Ordering::Relaxed), before + 1);
        assert_eq!(wait_now(&mut monitor, &mut ready), []);
    });
}

#[test]
fn closed_fd_with_a_surviving_duplicate_is_reported_until_every_duplicate_is_closed() {
    let _serial = serial();
    let (r, w) = pipe();
    let fd = r.as_raw_fd();
    let dup = r.try_clone().unwrap();
    let mut monitor = EpollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), fd, Interest::READ);
    write_bytes(&w, b"x");

    // The file stays open through `dup`, so its entry (file, fd) stays in the kernel and is
    // still reported under the key, although `fd` itself is closed.
    drop(r);
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE)]
    );

    // Removing it succeeds (EPOLL_CTL_DEL says EBADF for the closed number), but cannot reach
    // the entry: the kernel keeps reporting the removed key, which a context drops as stale.
    monitor.update(Change::Remove { key: key(1), fd }).unwrap();
    assert!(monitor.is_empty());
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE)]
    );

    // Closing the last duplicate releases the file, and the kernel drops the entry.
    drop(dup);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
}

#[test]
fn a_reused_fd_number_is_a_new_entry_that_the_stale_key_never_touches() {
    let _serial = serial();
    let (r1, _w1) = pipe();
    let number = r1.as_raw_fd();
    let mut monitor = EpollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), number, Interest::READ);

    // The first file is closed while registered (the kernel drops its entry) and its number
    // is given to a second pipe's read end, which is registered under a new key.
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
        sorted_registrations(&monitor),
        [
            (key(1).as_u64(), number, Interest::READ),
            (key(2).as_u64(), number, Interest::READ)
        ]
    );

    // Replacing the stale key cannot take over the number: the new file is watched by key 2,
    // and epoll watches each (file, fd) pair once. Nothing changes.
    let err = monitor
        .update(Change::Modify {
            old: key(1),
            new: key(3),
            fd: number,
            interest: Interest::READ,
        })
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    assert_eq!(monitor.len(), 2);

    // Removing the stale key makes no system call (an EPOLL_CTL_DEL on the number would delete
    // key 2's entry): key 2 is still reported.
    monitor
        .update(Change::Remove {
            key: key(1),
            fd: number,
        })
        .unwrap();
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(2), Readiness::READABLE)]
    );
    assert_eq!(
        monitor.registrations().collect::<Vec<_>>(),
        [(key(2), number, Interest::READ)]
    );

    monitor
        .update(Change::Remove {
            key: key(2),
            fd: number,
        })
        .unwrap();
    assert!(monitor.is_empty());
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    drop(r2);
}

#[test]
fn replacing_a_handler_whose_fd_number_was_reused_watches_the_new_file() {
    let _serial = serial();
    let (r1, _w1) = pipe();
    let number = r1.as_raw_fd();
    let mut monitor = EpollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), number, Interest::READ);

    // What a context does when a handler is replaced after its fd was closed and the number
    // reused: a Modify on the same number. EPOLL_CTL_MOD answers ENOENT (the new file is not
    // registered), so the monitor adds it under the new key.
    drop(r1);
    let (r2, w2) = pipe();
    let _r2 = move_to(r2, number);
    monitor
        .update(Change::Modify {
            old: key(1),
            new: key(2),
            fd: number,
            interest: Interest::READ,
        })
        .unwrap();
    write_bytes(&w2, b"x");
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(2), Readiness::READABLE)]
    );
    assert_eq!(
        monitor.registrations().collect::<Vec<_>>(),
        [(key(2), number, Interest::READ)]
    );
    monitor
        .update(Change::Remove {
            key: key(2),
            fd: number,
        })
        .unwrap();
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
}

// ---------------------------------------------------------------------------------------------
// Timeouts, wake-ups and signals
// ---------------------------------------------------------------------------------------------

#[test]
fn timeout_is_honoured_to_the_nanosecond_on_both_paths() {
    let _serial = serial();
    let (r, _w) = pipe();
    for (path, mut monitor) in both_paths() {
        let mut ready = ReadyList::new();
        add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
        // 1.5 ms is where millisecond rounding shows: down would return after 1 ms, and up
        // would wait 2 ms.
        for timeout in [Duration::from_micros(1500), Duration::from_millis(2)] {
            let start = Instant::now();
            assert_eq!(wait_for(&mut monitor, &mut ready, Some(timeout)), []);
            let elapsed = start.elapsed();
            eprintln!("{path}: wait({timeout:?}) returned after {elapsed:?}");
            assert!(
                elapsed >= timeout,
                "{path}: returned after {elapsed:?}, timeout {timeout:?}"
            );
        }
    }
}

#[test]
fn empty_set_still_sleeps_for_the_timeout_on_both_paths() {
    let _serial = serial();
    for (path, mut monitor) in both_paths() {
        let mut ready = ReadyList::new();
        let start = Instant::now();
        assert_eq!(
            monitor
                .wait(&mut ready, Some(Duration::from_millis(2)))
                .unwrap(),
            0
        );
        assert!(start.elapsed() >= Duration::from_millis(2), "{path}");
        assert!(ready.is_empty());
    }
}

#[test]
fn huge_timeout_is_clamped_not_rejected_on_both_paths() {
    let _serial = serial();
    let (_r, w) = pipe();
    for (_path, mut monitor) in both_paths() {
        let mut ready = ReadyList::new();
        // The fd is ready, so this returns at once; what matters is that a timeout far beyond
        // time_t reaches the kernel as a valid timespec instead of an EINVAL.
        add(&mut monitor, key(1), w.as_raw_fd(), Interest::WRITE);
        assert_eq!(
            wait_for(&mut monitor, &mut ready, Some(Duration::MAX)),
            [(key(1), Readiness::WRITABLE)]
        );
    }
}

#[test]
fn finite_wait_is_woken_by_a_write_on_both_paths() {
    let _serial = serial();
    for (path, mut monitor) in both_paths() {
        let (r, w) = pipe();
        let mut ready = ReadyList::new();
        add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
        let timeout = Duration::from_secs(20);
        let start = Instant::now();
        let writer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            write_bytes(&w, b"x");
            w
        });
        assert_eq!(
            wait_for(&mut monitor, &mut ready, Some(timeout)),
            [(key(1), Readiness::READABLE)],
            "{path}"
        );
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(20), "{path}: {elapsed:?}");
        assert!(elapsed < timeout, "{path}: woken only by the timeout");
        let _w = writer.join().unwrap();
    }
}

#[test]
fn infinite_wait_is_woken_by_a_write_from_another_thread() {
    let _serial = serial();
    let (r, w) = pipe();
    let mut monitor = EpollMonitor::new().unwrap();
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

/// Installs `count_signal` for SIGUSR1 without `SA_RESTART`, so a blocked wait fails with
/// `EINTR` (it would anyway: epoll and poll calls are never restarted).
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

/// Sends SIGUSR1 to `thread` after each of `delays` (cumulative).
fn signal_after<T>(thread: &thread::JoinHandle<T>, delays: &[u64]) {
    for &delay in delays {
        thread::sleep(Duration::from_millis(delay));
        // The thread has not been joined, so its pthread_t still names a live (or
        // finished but unjoined) thread, and SIGUSR1 has a handler installed.
        // SAFETY: justified in the comment just above.
        let rc = unsafe { libc::pthread_kill(thread.as_pthread_t(), libc::SIGUSR1) };
        assert_eq!(rc, 0);
    }
}

#[test]
fn signals_neither_fail_nor_extend_a_wait_on_both_paths() {
    let _serial = serial();
    install_sigusr1_handler();
    let timeout = Duration::from_millis(300);
    for use_pwait2 in [true, false] {
        SIGNALS.store(0, Ordering::SeqCst);
        let waiter = thread::spawn(move || {
            let (r, _w) = pipe();
            let mut monitor = EpollMonitor::with_pwait2(use_pwait2).unwrap();
            let mut ready = ReadyList::new();
            add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
            let start = Instant::now();
            let result = monitor.wait(&mut ready, Some(timeout));
            let path = if monitor.uses_pwait2() {
                "epoll_pwait2"
            } else {
                "ppoll fallback"
            };
            (
                path,
                result.map_err(|e| e.kind()),
                start.elapsed(),
                ready.len(),
            )
        });
        signal_after(&waiter, &[50, 150]);

        let (path, result, elapsed, reports) = waiter.join().unwrap();
        eprintln!("{path}: 300 ms wait with two signals returned after {elapsed:?}");
        assert_eq!(result, Ok(0), "{path}");
        assert_eq!(reports, 0, "{path}");
        assert_eq!(SIGNALS.load(Ordering::SeqCst), 2, "{path}");
        assert!(
            elapsed >= timeout,
            "{path}: returned early, after {elapsed:?}"
        );
        // Restarting with the full timeout after the second signal (at ~200 ms) would take at
        // least 500 ms; recomputing from the deadline takes 300 ms plus scheduling noise.
        assert!(
            elapsed < Duration::from_millis(480),
            "{path}: signals extended the wait to {elapsed:?}"
        );
    }
}

#[test]
fn signals_do_not_end_an_infinite_wait() {
    let _serial = serial();
    install_sigusr1_handler();
    SIGNALS.store(0, Ordering::SeqCst);
    let (r, w) = pipe();
    // Before the spawn: the write below comes at least 150 ms after this (the waiter's own
    // set-up time must not count against the bound).
    let start = Instant::now();
    let waiter = thread::spawn(move || {
        let mut monitor = EpollMonitor::new().unwrap();
        let mut ready = ReadyList::new();
        add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
        let reports = wait_for(&mut monitor, &mut ready, None);
        (reports, start.elapsed())
    });
    signal_after(&waiter, &[50, 50]);
    // Both signals have been delivered (the handler counts them) before the write wakes it.
    thread::sleep(Duration::from_millis(50));
    assert_eq!(SIGNALS.load(Ordering::SeqCst), 2);
    write_bytes(&w, b"x");

    let (reports, elapsed) = waiter.join().unwrap();
    assert_eq!(reports, [(key(1), Readiness::READABLE)]);
    assert!(elapsed >= Duration::from_millis(150), "{elapsed:?}");
}

// ---------------------------------------------------------------------------------------------
// Many fds
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
fn ten_thousand_idle_fds_and_one_active_report_exactly_the_active_one() {
    let _serial = serial();
    const FDS: u32 = 10_000;
    ensure_fd_limit(u64::from(FDS) + 256);
    let fds: Vec<OwnedFd> = (0..FDS).map(|_| eventfd()).collect();
    let mut monitor = EpollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    for (i, fd) in (0..).zip(&fds) {
        add(&mut monitor, key(i), fd.as_raw_fd(), Interest::READ);
    }
    assert_eq!(monitor.len(), FDS as usize);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);

    write_bytes(&fds[4321], &1u64.to_ne_bytes());
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(4321), Readiness::READABLE)]
    );
    assert_eq!(
        wait_for(&mut monitor, &mut ready, Some(Duration::from_millis(1))),
        [(key(4321), Readiness::READABLE)]
    );
    read_bytes(&fds[4321], 8);
    assert_eq!(
        wait_for(&mut monitor, &mut ready, Some(Duration::from_millis(1))),
        []
    );
}

#[test]
fn a_wait_that_fills_the_buffer_grows_it_and_every_fd_is_reported() {
    let _serial = serial();
    const READY: u32 = 300;
    let fds: Vec<OwnedFd> = (0..READY).map(|_| eventfd()).collect();
    let mut monitor = EpollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    for (i, fd) in (0..).zip(&fds) {
        add(&mut monitor, key(i), fd.as_raw_fd(), Interest::READ);
        write_bytes(fd, &1u64.to_ne_bytes());
    }
    let all: HashSet<u64> = (0..READY).map(|i| key(i).as_u64()).collect();

    // The buffer starts at 128 events and doubles whenever a wait fills it: 128, 256, then
    // all 300 fit. No key is reported twice by one wait.
    let mut seen = HashSet::new();
    let mut counts = Vec::new();
    for _ in 0..3 {
        let reports = wait_now(&mut monitor, &mut ready);
        let keys: HashSet<u64> = reports.iter().map(|&(k, _)| k.as_u64()).collect();
        assert_eq!(keys.len(), reports.len(), "a key was reported twice");
        assert!(reports.iter().all(|&(_, r)| r == Readiness::READABLE));
        assert!(keys.is_subset(&all));
        counts.push(reports.len());
        seen.extend(keys);
    }
    assert_eq!(counts, [128, 256, 300]);
    assert_eq!(seen, all);
}

#[test]
fn churn_of_1000_fds_keeps_the_bookkeeping_consistent() {
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

    let mut monitor = EpollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    let mut expected: HashMap<u32, (HandlerKey, RawFd, Interest)> = HashMap::new();
    let check = |monitor: &EpollMonitor, expected: &HashMap<u32, (HandlerKey, RawFd, Interest)>| {
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
    // every slot once).
    let order: Vec<u32> = (0..FDS).map(|i| (i * 7919) % FDS).collect();
    for (n, &slot) in order[..600].iter().enumerate() {
        let (k, fd, _) = expected.remove(&slot).unwrap();
        monitor.update(Change::Remove { key: k, fd }).unwrap();
        if n % 50 == 0 {
            check(&monitor, &expected);
        }
    }
    check(&monitor, &expected);

    // Re-add half of the removed slots under a new generation (the kernel must have forgotten
    // them, or EPOLL_CTL_ADD would say EEXIST), and hand 100 live slots over to new keys.
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
    // ready, each reported under its current key. 350 are ready, more than the initial batch
    // of 128, so the buffer grows over two waits and the third reports them all.
    let mut writable: Vec<u64> = expected
        .values()
        .filter(|&&(_, _, interest)| interest == Interest::WRITE)
        .map(|&(k, _, _)| k.as_u64())
        .collect();
    writable.sort_unstable();
    assert_eq!(writable.len(), 350);
    let mut counts = Vec::new();
    let mut reported = Vec::new();
    for _ in 0..3 {
        reported = wait_now(&mut monitor, &mut ready)
            .into_iter()
            .map(|(k, readiness)| {
                assert_eq!(readiness, Readiness::WRITABLE);
                k.as_u64()
            })
            .collect();
        counts.push(reported.len());
    }
    assert_eq!(counts, [128, 256, 350]);
    reported.sort_unstable();
    assert_eq!(reported, writable);

    for (_, (k, fd, _)) in expected.drain() {
        monitor.update(Change::Remove { key: k, fd }).unwrap();
    }
    assert!(monitor.is_empty());
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
}

// ---------------------------------------------------------------------------------------------
// Bookkeeping and the rest of the trait
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_changes_are_errors_and_leave_the_monitor_unchanged() {
    let _serial = serial();
    let (r, w) = pipe();
    let mut monitor = EpollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
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
    // The kernel's set is unchanged too: the write end is still reported under key 2, and
    // nothing under key 3.
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(2), Readiness::WRITABLE)]
    );
}

#[test]
fn outer_fds_is_the_epoll_fd_which_is_readable_while_a_watched_fd_is_ready() {
    let _serial = serial();
    let (r, w) = pipe();
    let mut monitor = EpollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);

    let existing = OuterFd {
        fd: 0,
        interest: Interest::READ,
    };
    let mut out = vec![existing];
    monitor.outer_fds(&mut out);
    let epoll_fd = monitor.as_fd().as_raw_fd();
    assert_eq!(
        out,
        [
            existing,
            OuterFd {
                fd: epoll_fd,
                interest: Interest::READ
            }
        ]
    );

    // What an outer loop does: poll the epoll fd, then collect with a zero-timeout wait.
    let readable = |fd: RawFd| {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one live, exclusively borrowed pollfd, matching nfds = 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        assert!(rc >= 0, "poll: {}", io::Error::last_os_error());
        rc == 1
    };
    assert!(!readable(epoll_fd));
    write_bytes(&w, b"x");
    assert!(readable(epoll_fd));
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE)]
    );
}

#[test]
fn name_need_wait_and_debug() {
    let _serial = serial();
    let (r, _w) = pipe();
    let mut monitor = EpollMonitor::with_pwait2(false).unwrap();
    assert_eq!(monitor.name(), "epoll");
    assert!(!monitor.need_wait(false));
    assert!(monitor.need_wait(true));
    add(
        &mut monitor,
        HandlerKey::new(1, 2),
        r.as_raw_fd(),
        Interest::READ,
    );
    assert_eq!(
        format!("{monitor:?}"),
        format!(
            "EpollMonitor {{ epoll_fd: {}, pwait2: false, registrations: \
             [(HandlerKey(1v2), {}, Interest(READ))], .. }}",
            monitor.as_fd().as_raw_fd(),
            r.as_raw_fd()
        )
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
fn steady_state_wait_allocates_nothing_on_both_paths() {
    let _serial = serial();
    let (r, w) = pipe();
    let efd = eventfd();
    write_bytes(&w, b"x");
    for (path, mut monitor) in both_paths() {
        let mut ready = ReadyList::new();
        add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
        add(
            &mut monitor,
            key(2),
            efd.as_raw_fd(),
            Interest::READ | Interest::WRITE,
        );
        // Warm-up: the ready list grows to hold two reports.
        assert_eq!(monitor.wait(&mut ready, Some(Duration::ZERO)).unwrap(), 2);

        let before = allocations();
        for _ in 0..1000 {
            // Non-blocking, positive (epoll_pwait2 or ppoll + epoll_wait) and infinite waits;
            // the fds are ready, so none of them blocks.
            for timeout in [Some(Duration::ZERO), Some(Duration::from_nanos(1)), None] {
                ready.clear();
                assert_eq!(monitor.wait(&mut ready, timeout).unwrap(), 2, "{path}");
            }
        }
        assert_eq!(allocations() - before, 0, "{path}");
    }
}
