//! Behaviour of [`PollingMonitor`] against real kernel objects, in both of its modes:
//! level-triggered registration (epoll, kqueue) and one-shot registration re-armed after each
//! report (event ports, forced here with `with_rearm(true)`). On Linux the monitor-level
//! conformance suite (`aio_conformance::monitor`, shared with every backend) runs in each
//! mode; the cases below are what is specific to `polling`: how each kernel answers a closed,
//! reused or doubly registered fd, a failed re-arm, and the kernel object as the outer fd.
//!
//! Every test takes the [`serial`] lock, because some close registered fds and expect the
//! kernel to see exactly that, and the timing tests stay honest on a busy machine. The cases
//! below use only `std`'s Unix sockets and portable libc calls, so that they also run on macOS
//! and the BSDs (the suite is Linux-only: it is written on eventfds and `pipe2`).
//!
//! `FdMonitor::update` is `unsafe`: each fd added must stay open until it is removed (rule
//! [FD-1] of ARCHITECTURE.md). The cases keep it, through [`add`] and [`update`], except four
//! that break it on purpose to check what the kernel and the monitor do when a caller does
//! (marked "breaks [FD-1] on purpose"): three close a watched fd, and the kernel drops its
//! entry, or keeps it while a duplicate holds the file, and the monitor reports or forgets;
//! one adds a number that is not open, which the kernel refuses (`EBADF`). No memory is
//! involved, and the serial lock keeps the other cases of this binary from taking a number
//! meanwhile.

#![cfg(unix)]

use std::collections::HashSet;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use aio_core::{Change, FdMonitor, HandlerKey, Interest, OuterFd, Readiness, ReadyList};
use fdmon_polling::PollingMonitor;

/// The suite in both modes, on Linux.
#[cfg(target_os = "linux")]
mod suite {
    use aio_conformance::monitor::{CountingAllocator, MonitorBackend, always_available};
    use fdmon_polling::PollingMonitor;

    #[global_allocator]
    static ALLOCATOR: CountingAllocator = CountingAllocator;

    /// Level-triggered registration, as on epoll and kqueue.
    const LEVEL: MonitorBackend<PollingMonitor> = MonitorBackend {
        name: "polling (level)",
        make: PollingMonitor::new,
        registrations: |m| m.registrations().collect(),
        unavailable: always_available,
        batches: Some([128, 256, 300]),
        one_key_per_number: true,
    };

    mod level {
        aio_conformance::monitor_conformance_tests!(super::LEVEL, by_number);

        /// The orphan cases that need a level-triggered monitor on epoll (the first one runs
        /// with the `by_number` cases): the outer loop follows the replaced poller, and a lent
        /// fd keeps it.
        mod orphans {
            use super::super::LEVEL;
            use aio_conformance::monitor;

            #[test]
            fn an_outer_loop_follows_the_instance_that_replaces_an_orphan() {
                monitor::an_outer_loop_follows_the_instance_that_replaces_an_orphan(&LEVEL);
            }

            #[test]
            fn an_orphan_is_only_dropped_once_the_fd_was_lent() {
                monitor::an_orphan_is_only_dropped_once_the_fd_was_lent(&LEVEL);
            }
        }
    }

    /// One-shot registration re-armed by the monitor, as on event ports.
    mod rearm {
        use super::*;

        const REARM: MonitorBackend<PollingMonitor> = MonitorBackend {
            name: "polling (rearm)",
            make: || PollingMonitor::with_rearm(true),
            ..LEVEL
        };

        aio_conformance::monitor_conformance_tests!(REARM, by_number);
    }
}

#[cfg(target_os = "linux")]
use aio_conformance::monitor::serial;

/// Runs tests one at a time (the suite's lock on Linux, where the suite runs in this binary).
#[cfg(not(target_os = "linux"))]
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    update(
        monitor,
        Change::Add {
            key,
            fd: fd.as_raw_fd(),
            interest,
        },
    )
    .expect("add");
}

/// `FdMonitor::update` for these cases, which keep [FD-1] but where they say otherwise.
fn update(monitor: &mut PollingMonitor, change: Change) -> io::Result<()> {
    // Every case keeps each fd it adds open until it removes it, except the four marked
    // "breaks [FD-1] on purpose" (see the module docs).
    // SAFETY: [FD-1], kept as just said.
    unsafe { monitor.update(change) }
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

/// Moves `socket` to the fd number `target`, which the caller has just closed (and which is
/// not `socket`'s).
fn move_to(socket: UnixStream, target: RawFd) -> UnixStream {
    // `socket` is open, and is closed on return; dup2 takes no pointers ([SYS-1]).
    // SAFETY: [SYS-3]: `target` is ours: we closed it just before, under the serial lock.
    let rc = unsafe { libc::dup2(socket.as_raw_fd(), target) };
    assert_eq!(rc, target, "dup2: {}", io::Error::last_os_error());
    // SAFETY: [SYS-3]: dup2 succeeded, so `target` is an open fd that nothing else owns.
    unsafe { UnixStream::from_raw_fd(target) }
}

// ---------------------------------------------------------------------------------------------
// polling specifics
// ---------------------------------------------------------------------------------------------

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
    let err = update(
        &mut monitor,
        Change::Add {
            key: key(2),
            fd: reader.as_raw_fd(),
            interest: Interest::READ,
        },
    )
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
    // Breaks [FD-1] on purpose: a number that is not open.
    let fd = {
        let (a, _b) = pair();
        a.as_raw_fd()
    };
    let err = update(
        &mut monitor,
        Change::Add {
            key: key(1),
            fd,
            interest: Interest::READ,
        },
    )
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
        // Breaks [FD-1] on purpose: the watched fd closes before its removal.
        drop(reader);
        assert_eq!(
            wait_for(&mut monitor, Some(Duration::from_millis(20))),
            [],
            "{mode}: the kernel forgot the closed file"
        );
        update(&mut monitor, Change::Remove { key: key(1), fd })
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
    // Breaks [FD-1] on purpose: the watched number closes before its removal.
    drop(reader);
    assert_eq!(
        wait_for(&mut monitor, Some(Duration::from_secs(5))),
        [(key(1), Readiness::READABLE)],
        "the file is still open through its duplicate"
    );
    // Not re-armed: the number it was registered under is closed.
    assert_eq!(wait_for(&mut monitor, Some(Duration::from_millis(20))), []);
    update(&mut monitor, Change::Remove { key: key(1), fd })
        .expect("removing a closed number succeeds");
    drop(duplicate);
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
        // Breaks [FD-1] on purpose: the watched number closes, and is reused, before its
        // removal.
        drop(old_reader);
        let reader = move_to(reader, fd);
        add(&mut monitor, key(2), &reader, Interest::READ);
        // Removing the stale key must leave the new file's registration alone.
        update(&mut monitor, Change::Remove { key: key(1), fd }).expect("removing a stale key");
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
fn outer_fds_is_the_kernel_object_and_debug_names_the_registrations() {
    let _serial = serial();
    let mut monitor = PollingMonitor::new().unwrap();
    assert_eq!(monitor.name(), "polling");
    assert_eq!(monitor.must_wait(), None, "cannot tell from userspace");
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

#[test]
fn the_key_polling_reserves_is_refused() {
    let _serial = serial();
    let mut monitor = PollingMonitor::new().unwrap();
    let (_writer, reader) = pair();
    let reserved = HandlerKey::from_u64(u64::MAX);
    let err = update(
        &mut monitor,
        Change::Add {
            key: reserved,
            fd: reader.as_raw_fd(),
            interest: Interest::READ,
        },
    )
    .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    assert!(monitor.is_empty());
    assert_eq!(wait_now(&mut monitor), []);
}
