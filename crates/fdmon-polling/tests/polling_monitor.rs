//! Behaviour of [`PollingMonitor`] against real kernel objects (Unix sockets, a regular file),
//! in both of its modes: level-triggered registration (epoll, kqueue) and one-shot registration
//! re-armed after each report (event ports, forced here with `with_rearm(true)`).
//!
//! Every test takes the [`serial`] lock, because some close registered fds and expect the
//! kernel to see exactly that, and the timing tests stay honest on a busy machine. The tests use
//! only `std`'s Unix sockets and portable libc calls, so that they also run on macOS and the
//! BSDs.

#![cfg(unix)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use aio_core::{Change, FdMonitor, HandlerKey, Interest, OuterFd, Readiness, ReadyList};
use fdmon_polling::PollingMonitor;

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs tests one at a time; a failed test must not fail every later one.
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A connected pair of non-blocking Unix stream sockets.
fn pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    (a, b)
}

fn key(index: u32) -> HandlerKey {
    HandlerKey::new(index, 1)
}

fn add(monitor: &mut PollingMonitor, key: HandlerKey, fd: &impl AsRawFd, interest: Interest) {
    monitor
        .update(Change::Add {
            key,
            fd: fd.as_raw_fd(),
            interest,
        })
        .expect("add");
}

/// One `wait`; checks that the returned count matches the list and that no key repeats.
fn wait_for(
    monitor: &mut PollingMonitor,
    timeout: Option<Duration>,
) -> Vec<(HandlerKey, Readiness)> {
    let mut ready = ReadyList::new();
    let n = monitor.wait(&mut ready, timeout).expect("wait");
    let mut reports: Vec<_> = ready.iter().collect();
    assert_eq!(n, reports.len(), "wait's return value = reports pushed");
    let keys: HashSet<_> = reports.iter().map(|&(k, _)| k).collect();
    assert_eq!(keys.len(), reports.len(), "a key was reported twice");
    reports.sort_by_key(|&(k, _)| k.as_u64());
    reports
}

fn wait_now(monitor: &mut PollingMonitor) -> Vec<(HandlerKey, Readiness)> {
    wait_for(monitor, Some(Duration::ZERO))
}

/// The two modes, each with a name for messages.
fn both_modes() -> Vec<(&'static str, PollingMonitor)> {
    let level = PollingMonitor::new().unwrap();
    let rearm = PollingMonitor::with_rearm(true).unwrap();
    assert!(rearm.rearms());
    vec![
        (
            if level.rearms() {
                "rearm (native)"
            } else {
                "level"
            },
            level,
        ),
        ("rearm", rearm),
    ]
}

fn drain(socket: &mut UnixStream) {
    let mut buf = [0u8; 256];
    loop {
        match socket.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => panic!("read: {e}"),
        }
    }
}

#[test]
fn readable_socket_is_reported_once_per_wait_and_level_triggered() {
    let _serial = serial();
    for (mode, mut monitor) in both_modes() {
        let (mut writer, mut reader) = pair();
        add(&mut monitor, key(1), &reader, Interest::READ);
        assert_eq!(wait_now(&mut monitor), [], "{mode}: nothing written yet");
        writer.write_all(b"xy").unwrap();
        for round in 0..3 {
            assert_eq!(
                wait_for(&mut monitor, Some(Duration::from_secs(5))),
                [(key(1), Readiness::READABLE)],
                "{mode}: round {round}: unread data is reported on every wait"
            );
        }
        drain(&mut reader);
        assert_eq!(wait_now(&mut monitor), [], "{mode}: drained");
        writer.write_all(b"z").unwrap();
        assert_eq!(
            wait_for(&mut monitor, None),
            [(key(1), Readiness::READABLE)],
            "{mode}: new data after a drain"
        );
    }
}

#[test]
fn modify_reports_under_the_new_key_only_and_can_change_interest() {
    let _serial = serial();
    for (mode, mut monitor) in both_modes() {
        let (mut writer, reader) = pair();
        add(&mut monitor, key(1), &reader, Interest::READ);
        writer.write_all(b"x").unwrap();
        monitor
            .update(Change::Modify {
                old: key(1),
                new: key(2),
                fd: reader.as_raw_fd(),
                interest: Interest::READ,
            })
            .unwrap();
        assert_eq!(
            wait_now(&mut monitor),
            [(key(2), Readiness::READABLE)],
            "{mode}"
        );
        monitor
            .update(Change::Modify {
                old: key(2),
                new: key(3),
                fd: reader.as_raw_fd(),
                interest: Interest::WRITE,
            })
            .unwrap();
        assert_eq!(
            wait_now(&mut monitor),
            [(key(3), Readiness::WRITABLE)],
            "{mode}: now only writability"
        );
        let regs: Vec<_> = monitor.registrations().collect();
        assert_eq!(regs, [(key(3), reader.as_raw_fd(), Interest::WRITE)]);
    }
}

#[test]
fn remove_stops_reports() {
    let _serial = serial();
    for (mode, mut monitor) in both_modes() {
        let (mut writer, reader) = pair();
        add(&mut monitor, key(1), &reader, Interest::READ);
        writer.write_all(b"x").unwrap();
        assert_eq!(wait_now(&mut monitor).len(), 1, "{mode}");
        monitor
            .update(Change::Remove {
                key: key(1),
                fd: reader.as_raw_fd(),
            })
            .unwrap();
        assert!(monitor.is_empty());
        assert_eq!(wait_now(&mut monitor), [], "{mode}: removed");
    }
}

#[test]
fn read_and_write_interest_is_one_report_with_both_bits() {
    let _serial = serial();
    for (mode, mut monitor) in both_modes() {
        let (mut writer, reader) = pair();
        add(
            &mut monitor,
            key(1),
            &reader,
            Interest::READ | Interest::WRITE,
        );
        assert_eq!(
            wait_now(&mut monitor),
            [(key(1), Readiness::WRITABLE)],
            "{mode}: an empty socket is writable only"
        );
        writer.write_all(b"x").unwrap();
        let reports = wait_now(&mut monitor);
        assert_eq!(reports.len(), 1, "{mode}: one report per key: {reports:?}");
        assert!(
            reports[0]
                .1
                .contains(Readiness::READABLE | Readiness::WRITABLE),
            "{mode}: {reports:?}"
        );
    }
}

#[test]
fn closing_the_peer_is_reported_to_the_read_callback() {
    let _serial = serial();
    for (mode, mut monitor) in both_modes() {
        let (writer, reader) = pair();
        add(&mut monitor, key(1), &reader, Interest::READ);
        writer.shutdown(Shutdown::Both).unwrap();
        drop(writer);
        let reports = wait_for(&mut monitor, Some(Duration::from_secs(5)));
        assert_eq!(reports.len(), 1, "{mode}: {reports:?}");
        // kqueue says readable (EV_EOF); epoll and event ports add a hang-up. Either way the
        // context calls the read callback.
        assert!(
            reports[0].1.intersects(Readiness::mask_for(Interest::READ)),
            "{mode}: {reports:?}"
        );
        // Level-triggered: still reported until removed.
        assert_eq!(wait_now(&mut monitor).len(), 1, "{mode}: hang-up persists");
    }
}

#[test]
fn the_same_fd_twice_is_refused_and_leaves_the_monitor_unchanged() {
    let _serial = serial();
    let mut monitor = PollingMonitor::new().unwrap();
    let (_writer, reader) = pair();
    add(&mut monitor, key(1), &reader, Interest::READ);
    let err = monitor
        .update(Change::Add {
            key: key(2),
            fd: reader.as_raw_fd(),
            interest: Interest::READ,
        })
        .unwrap_err();
    // epoll says EEXIST; kqueue simply updates its filter, so only Linux is checked strictly.
    if cfg!(target_os = "linux") {
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST), "{err}");
    }
    assert_eq!(monitor.len(), 1);
}

#[test]
fn an_fd_that_is_not_open_is_an_error_and_leaves_the_monitor_unchanged() {
    let _serial = serial();
    let mut monitor = PollingMonitor::new().unwrap();
    let fd = {
        let (a, _b) = pair();
        a.as_raw_fd()
    };
    let err = monitor
        .update(Change::Add {
            key: key(1),
            fd,
            interest: Interest::READ,
        })
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
    assert!(monitor.is_empty());
}

#[test]
fn closed_fd_is_dropped_silently_and_remove_still_succeeds() {
    let _serial = serial();
    for (mode, mut monitor) in both_modes() {
        let (mut writer, reader) = pair();
        let fd = reader.as_raw_fd();
        add(&mut monitor, key(1), &reader, Interest::READ);
        writer.write_all(b"x").unwrap();
        drop(reader);
        assert_eq!(
            wait_for(&mut monitor, Some(Duration::from_millis(20))),
            [],
            "{mode}: the kernel forgot the closed file"
        );
        monitor
            .update(Change::Remove { key: key(1), fd })
            .expect("removing a closed fd succeeds");
        assert!(monitor.is_empty());
    }
}

/// Linux only: epoll keeps watching a file whose registered number was closed while a
/// duplicate keeps it open, so the report still comes, and in the re-armed mode the re-arm
/// through the closed number fails (EBADF). That must not fail the wait or lose the report.
#[test]
#[cfg(target_os = "linux")]
fn a_failed_re_arm_neither_fails_the_wait_nor_loses_its_report() {
    let _serial = serial();
    let mut monitor = PollingMonitor::with_rearm(true).unwrap();
    let (mut writer, reader) = pair();
    let fd = reader.as_raw_fd();
    let duplicate = reader.try_clone().unwrap();
    add(&mut monitor, key(1), &reader, Interest::READ);
    writer.write_all(b"x").unwrap();
    drop(reader);
    assert_eq!(
        wait_for(&mut monitor, Some(Duration::from_secs(5))),
        [(key(1), Readiness::READABLE)],
        "the file is still open through its duplicate"
    );
    // Not re-armed: the number it was registered under is closed.
    assert_eq!(wait_for(&mut monitor, Some(Duration::from_millis(20))), []);
    monitor
        .update(Change::Remove { key: key(1), fd })
        .expect("removing a closed number succeeds");
    drop(duplicate);
}

/// Moves `socket` to the fd number `target`, which the caller has just closed (and which is
/// not `socket`'s).
fn move_to(socket: UnixStream, target: RawFd) -> UnixStream {
    // dup2 takes no pointers; `socket` is open, and `target` is a number this test owns (it
    // was closed just before, under the serial lock). `socket` is closed on return.
    // SAFETY: justified in the comment just above.
    let rc = unsafe { libc::dup2(socket.as_raw_fd(), target) };
    assert_eq!(rc, target, "dup2: {}", io::Error::last_os_error());
    // SAFETY: dup2 succeeded, so `target` is an open fd that nothing else owns.
    unsafe { UnixStream::from_raw_fd(target) }
}

#[test]
fn a_reused_fd_number_is_a_new_registration_that_the_stale_key_never_touches() {
    let _serial = serial();
    for (mode, mut monitor) in both_modes() {
        let (_old_writer, old_reader) = pair();
        let fd = old_reader.as_raw_fd();
        add(&mut monitor, key(1), &old_reader, Interest::READ);
        // The new pair first, so that neither of its fds takes the number about to be freed.
        let (mut writer, reader) = pair();
        drop(old_reader);
        let reader = move_to(reader, fd);
        add(&mut monitor, key(2), &reader, Interest::READ);
        // Removing the stale key must leave the new file's registration alone.
        monitor
            .update(Change::Remove { key: key(1), fd })
            .expect("removing a stale key");
        writer.write_all(b"x").unwrap();
        assert_eq!(
            wait_for(&mut monitor, Some(Duration::from_secs(5))),
            [(key(2), Readiness::READABLE)],
            "{mode}"
        );
        assert_eq!(
            monitor.registrations().collect::<Vec<_>>(),
            [(key(2), fd, Interest::READ)],
            "{mode}"
        );
    }
}

#[test]
fn bad_changes_are_errors_and_leave_the_monitor_unchanged() {
    let _serial = serial();
    let mut monitor = PollingMonitor::new().unwrap();
    let (_writer, reader) = pair();
    let fd = reader.as_raw_fd();
    add(&mut monitor, key(1), &reader, Interest::READ);
    let kind = |monitor: &mut PollingMonitor, change| monitor.update(change).unwrap_err().kind();
    use io::ErrorKind::{InvalidInput, NotFound};
    let cases = [
        (
            Change::Add {
                key: key(1),
                fd,
                interest: Interest::READ,
            },
            InvalidInput,
        ),
        (
            Change::Add {
                key: key(2),
                fd: -1,
                interest: Interest::READ,
            },
            InvalidInput,
        ),
        (
            Change::Add {
                key: key(2),
                fd,
                interest: Interest::empty(),
            },
            InvalidInput,
        ),
        (
            Change::Add {
                key: HandlerKey::from_u64(u64::MAX),
                fd,
                interest: Interest::READ,
            },
            InvalidInput,
        ),
        (
            Change::Modify {
                old: key(9),
                new: key(10),
                fd,
                interest: Interest::READ,
            },
            NotFound,
        ),
        (
            Change::Modify {
                old: key(1),
                new: key(2),
                fd: fd + 1000,
                interest: Interest::READ,
            },
            InvalidInput,
        ),
        (
            Change::Modify {
                old: key(1),
                new: key(2),
                fd,
                interest: Interest::empty(),
            },
            InvalidInput,
        ),
        (Change::Remove { key: key(9), fd }, NotFound),
    ];
    for (change, expected) in cases {
        assert_eq!(kind(&mut monitor, change), expected, "{change:?}");
        assert_eq!(
            monitor.registrations().collect::<Vec<_>>(),
            [(key(1), fd, Interest::READ)],
            "unchanged after {change:?}"
        );
    }
}

#[test]
fn timeout_is_never_early_even_below_a_millisecond() {
    let _serial = serial();
    for (mode, mut monitor) in both_modes() {
        let (_writer, reader) = pair();
        add(&mut monitor, key(1), &reader, Interest::READ);
        for timeout in [
            Duration::from_micros(300),
            Duration::from_micros(1_500),
            Duration::from_millis(20),
        ] {
            let start = Instant::now();
            assert_eq!(wait_for(&mut monitor, Some(timeout)), [], "{mode}");
            let took = start.elapsed();
            assert!(took >= timeout, "{mode}: {timeout:?} ended early: {took:?}");
        }
        // How late a sub-millisecond wait is depends on the kernel and the load, and no test
        // asserts speed; the best of several is printed, for a reader checking the crate docs'
        // claim that nothing rounds to milliseconds.
        let best = (0..20)
            .map(|_| {
                let start = Instant::now();
                wait_for(&mut monitor, Some(Duration::from_micros(100)));
                start.elapsed()
            })
            .min()
            .unwrap();
        eprintln!("{mode}: best of 20 waits of 100 µs: {best:?}");
    }
}

#[test]
fn empty_set_still_sleeps_and_huge_timeouts_are_accepted() {
    let _serial = serial();
    let mut monitor = PollingMonitor::new().unwrap();
    let start = Instant::now();
    assert_eq!(wait_for(&mut monitor, Some(Duration::from_millis(10))), []);
    assert!(start.elapsed() >= Duration::from_millis(10));

    // A timeout too large for any deadline is infinite; a ready fd still ends it.
    let (mut writer, reader) = pair();
    add(&mut monitor, key(1), &reader, Interest::READ);
    writer.write_all(b"x").unwrap();
    assert_eq!(
        wait_for(&mut monitor, Some(Duration::MAX)),
        [(key(1), Readiness::READABLE)]
    );
}

#[test]
fn infinite_wait_is_woken_by_a_write_from_another_thread() {
    let _serial = serial();
    for (mode, mut monitor) in both_modes() {
        let (mut writer, reader) = pair();
        add(&mut monitor, key(1), &reader, Interest::READ);
        let start = Instant::now();
        let thread = thread::spawn(move || {
            thread::sleep(Duration::from_millis(30));
            writer.write_all(b"x").unwrap();
            writer
        });
        assert_eq!(
            wait_for(&mut monitor, None),
            [(key(1), Readiness::READABLE)],
            "{mode}"
        );
        assert!(start.elapsed() >= Duration::from_millis(30), "{mode}");
        thread.join().unwrap();
    }
}

static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn count_signal(_: libc::c_int) {
    // An atomic add is async-signal-safe; nothing else happens here.
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// Installs `count_signal` for SIGUSR1 without `SA_RESTART`, so a blocked wait is interrupted
/// with `EINTR`.
fn install_sigusr1_handler() {
    // `sigaction` is a plain C struct; all zeroes is a valid value (no flags, no handler) that
    // is filled in below before use.
    // SAFETY: justified in the comment just above.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = count_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    action.sa_flags = 0;
    // SAFETY: `action.sa_mask` is a valid, exclusively borrowed sigset_t.
    let rc = unsafe { libc::sigemptyset(&mut action.sa_mask) };
    assert_eq!(rc, 0);
    // `action` is fully initialised, its handler is an `extern "C" fn(c_int)` that only does
    // async-signal-safe work, and a null old-action pointer is allowed.
    // SAFETY: justified in the comment just above.
    let rc = unsafe { libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "sigaction: {}", io::Error::last_os_error());
}

/// Sends SIGUSR1 to `thread` after each of `delays` (cumulative, in ms).
fn signal_after<T>(thread: &thread::JoinHandle<T>, delays: &[u64]) {
    for &delay in delays {
        thread::sleep(Duration::from_millis(delay));
        // The thread has not been joined, so its pthread_t still names a live (or finished
        // but unjoined) thread, and SIGUSR1 has a handler installed.
        // SAFETY: justified in the comment just above.
        let rc = unsafe { libc::pthread_kill(thread.as_pthread_t(), libc::SIGUSR1) };
        assert_eq!(rc, 0);
    }
}

#[test]
fn signals_neither_fail_nor_extend_a_finite_wait() {
    let _serial = serial();
    install_sigusr1_handler();
    let timeout = Duration::from_millis(300);
    for rearm in [false, true] {
        SIGNALS.store(0, Ordering::SeqCst);
        let waiter = thread::spawn(move || {
            let (_writer, reader) = pair();
            let mut monitor = PollingMonitor::with_rearm(rearm).unwrap();
            add(&mut monitor, key(1), &reader, Interest::READ);
            let mut ready = ReadyList::new();
            let start = Instant::now();
            let result = monitor.wait(&mut ready, Some(timeout));
            (result.map_err(|e| e.kind()), start.elapsed(), ready.len())
        });
        signal_after(&waiter, &[50, 150]);
        let (result, elapsed, reports) = waiter.join().unwrap();
        eprintln!("rearm {rearm}: 300 ms wait with two signals returned after {elapsed:?}");
        assert_eq!(result, Ok(0), "rearm {rearm}");
        assert_eq!(reports, 0, "rearm {rearm}");
        assert_eq!(SIGNALS.load(Ordering::SeqCst), 2, "rearm {rearm}");
        assert!(
            elapsed >= timeout,
            "rearm {rearm}: early, after {elapsed:?}"
        );
        // Restarting with the full timeout after the second signal (at ~200 ms) would take at
        // least 500 ms; waiting for the same deadline takes 300 ms plus scheduling noise.
        assert!(
            elapsed < Duration::from_millis(480),
            "rearm {rearm}: signals extended the wait to {elapsed:?}"
        );
    }
}

#[test]
fn signals_do_not_end_an_infinite_wait() {
    let _serial = serial();
    install_sigusr1_handler();
    SIGNALS.store(0, Ordering::SeqCst);
    let (mut writer, reader) = pair();
    let start = Instant::now();
    let waiter = thread::spawn(move || {
        let mut monitor = PollingMonitor::new().unwrap();
        add(&mut monitor, key(1), &reader, Interest::READ);
        let reports = wait_for(&mut monitor, None);
        (reports, start.elapsed())
    });
    signal_after(&waiter, &[50, 50]);
    thread::sleep(Duration::from_millis(50));
    assert_eq!(SIGNALS.load(Ordering::SeqCst), 2);
    writer.write_all(b"x").unwrap();
    let (reports, elapsed) = waiter.join().unwrap();
    assert_eq!(reports, [(key(1), Readiness::READABLE)]);
    assert!(elapsed >= Duration::from_millis(150), "{elapsed:?}");
}

#[test]
fn many_ready_fds_grow_the_buffer_and_every_fd_is_reported() {
    let _serial = serial();
    const READY: u32 = 300;
    for (mode, mut monitor) in both_modes() {
        let pairs: Vec<_> = (0..READY).map(|_| pair()).collect();
        for (i, (writer, reader)) in (0..).zip(&pairs) {
            add(&mut monitor, key(i), reader, Interest::READ);
            (&*writer).write_all(b"x").unwrap();
        }
        let all: HashSet<HandlerKey> = (0..READY).map(key).collect();
        let mut seen = HashSet::new();
        let mut counts = Vec::new();
        for _ in 0..3 {
            let reports = wait_now(&mut monitor);
            assert!(reports.iter().all(|&(_, r)| r == Readiness::READABLE));
            counts.push(reports.len());
            seen.extend(reports.into_iter().map(|(k, _)| k));
        }
        // 128 events, then 256, then all 300 fit.
        assert_eq!(counts, [128, 256, 300], "{mode}");
        assert_eq!(seen, all, "{mode}");
    }
}

#[test]
fn outer_fds_is_the_kernel_object_and_debug_names_the_registrations() {
    let _serial = serial();
    let mut monitor = PollingMonitor::new().unwrap();
    assert_eq!(monitor.name(), "polling");
    assert!(!monitor.need_wait(false));
    assert!(monitor.need_wait(true));
    let (_writer, reader) = pair();
    add(&mut monitor, key(7), &reader, Interest::READ);
    let mut out = Vec::new();
    monitor.outer_fds(&mut out);
    assert_eq!(
        out,
        [OuterFd {
            fd: monitor.as_fd().as_raw_fd(),
            interest: Interest::READ
        }]
    );
    assert_ne!(out[0].fd, reader.as_raw_fd());
    let debug = format!("{monitor:?}");
    assert!(debug.contains("PollingMonitor"), "{debug}");
    assert!(debug.contains("HandlerKey(7v1)"), "{debug}");
}

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
        // Forwarded unchanged; `ptr` was allocated by `System` through this allocator with
        // `layout`, as the caller guarantees.
        // SAFETY: justified in the comment just above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Forwarded unchanged; `ptr` was allocated by `System` through this allocator with
        // `layout`, as the caller guarantees.
        // SAFETY: justified in the comment just above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

#[test]
fn steady_state_wait_allocates_nothing_in_both_modes() {
    let _serial = serial();
    for (mode, mut monitor) in both_modes() {
        let (mut writer, reader) = pair();
        let (_other_writer, other) = pair();
        writer.write_all(b"x").unwrap();
        add(&mut monitor, key(1), &reader, Interest::READ);
        add(
            &mut monitor,
            key(2),
            &other,
            Interest::READ | Interest::WRITE,
        );
        let mut ready = ReadyList::new();
        // Warm-up: the ready list and the merge buffer grow to hold two reports.
        assert_eq!(monitor.wait(&mut ready, Some(Duration::ZERO)).unwrap(), 2);

        let before = allocations();
        for _ in 0..1000 {
            // Non-blocking, positive and infinite waits; both fds are ready, so none blocks.
            for timeout in [Some(Duration::ZERO), Some(Duration::from_nanos(1)), None] {
                ready.clear();
                assert_eq!(monitor.wait(&mut ready, timeout).unwrap(), 2, "{mode}");
            }
        }
        assert_eq!(allocations() - before, 0, "{mode}");
    }
}
