//! Behaviour of [`EpollMonitor`] against real kernel objects: the monitor-level conformance
//! suite (`aio_conformance::monitor`, shared with every backend) on both ways of waiting with
//! a positive timeout (`epoll_pwait2`, skipped with a printed notice on a kernel that lacks it,
//! and the `ppoll` fallback; its `by_number` cases, closed and reused fd numbers, on the
//! fallback), and what is specific to epoll: the kernel's refusals (`EPERM`, `EBADF`),
//! `EPOLLRDHUP`, a closed fd whose duplicate keeps the file open, and the epoll fd as the outer
//! fd.
//!
//! Every test takes the suite's `serial` lock, because several close registered fds or put a
//! new file on a known fd number, and expect the kernel to see exactly that; a test running in
//! parallel could otherwise be handed one of those numbers for a new fd.

#![cfg(target_os = "linux")]

use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;

use aio_conformance::monitor::{
    CountingAllocator, MonitorBackend, add, always_available, key, pipe, readable_now, serial,
    update, wait_now, write_bytes,
};
use aio_core::{Change, FdMonitor, HandlerKey, Interest, OuterFd, Readiness, ReadyList};
use fdmon_epoll::EpollMonitor;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The epoll backend as `new` makes it: `epoll_pwait2` for positive timeouts where the kernel
/// has it.
const EPOLL: MonitorBackend<EpollMonitor> = MonitorBackend {
    name: "epoll",
    make: EpollMonitor::new,
    registrations: |m| m.registrations().collect(),
    unavailable: always_available,
    batches: Some([128, 256, 300]),
    one_key_per_number: true,
};

/// The suite on `epoll_pwait2` (skipped where the kernel lacks it).
mod pwait2 {
    use super::*;

    const PWAIT2: MonitorBackend<EpollMonitor> = MonitorBackend {
        name: "epoll (epoll_pwait2)",
        make: || EpollMonitor::with_pwait2(true),
        unavailable: || {
            let uses = EpollMonitor::with_pwait2(true).is_ok_and(|m| m.uses_pwait2());
            (!uses).then(|| "this kernel does not offer epoll_pwait2".to_owned())
        },
        ..EPOLL
    };

    aio_conformance::monitor_conformance_tests!(PWAIT2);
}

/// The suite on the `ppoll` fallback for positive timeouts.
mod ppoll_fallback {
    use super::*;

    const FALLBACK: MonitorBackend<EpollMonitor> = MonitorBackend {
        name: "epoll (ppoll fallback)",
        make: || EpollMonitor::with_pwait2(false),
        ..EPOLL
    };

    aio_conformance::monitor_conformance_tests!(FALLBACK, by_number);
}

// ---------------------------------------------------------------------------------------------
// epoll specifics
// ---------------------------------------------------------------------------------------------

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
fn a_regular_file_is_eperm_and_leaves_the_monitor_unchanged() {
    let _serial = serial();
    let path = std::env::temp_dir().join(format!("fdmon-epoll-test-{}.tmp", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let (r, w) = pipe();
    let mut monitor = EpollMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    let before = EPOLL.sorted_registrations(&monitor);

    // A regular file is always ready, so epoll refuses to watch it.
    for interest in [Interest::READ, Interest::WRITE] {
        let err = update(
            &mut monitor,
            Change::Add {
                key: key(2),
                fd: file.as_raw_fd(),
                interest,
            },
        )
        .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }
    assert_eq!(EPOLL.sorted_registrations(&monitor), before);
    assert_eq!(monitor.len(), 1);

    // The refused key was not remembered: it can be added for another fd.
    write_bytes(&w, b"x");
    add(&mut monitor, key(2), w.as_raw_fd(), Interest::WRITE);
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE), (key(2), Readiness::WRITABLE)]
    );
}

#[test]
fn an_fd_that_is_not_open_is_ebadf_and_leaves_the_monitor_unchanged() {
    let _serial = serial();
    // The monitor is created first, so that its epoll fd cannot take the closed number.
    // Breaks [CONF-5] (and [FD-1], which asks for an open fd) on purpose: epoll refuses it.
    let mut monitor = EpollMonitor::new().unwrap();
    let (r, _w) = pipe();
    let number = r.as_raw_fd();
    drop(r);
    let err = update(
        &mut monitor,
        Change::Add {
            key: key(1),
            fd: number,
            interest: Interest::READ,
        },
    )
    .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    assert!(monitor.is_empty());
}

/// The orphan cases that need a level-triggered monitor on epoll (the first one runs with the
/// suite's `by_number` cases above): the outer loop follows the replacement, and a lent epoll
/// fd keeps the instance.
mod orphans {
    use super::EPOLL;

    #[test]
    fn an_outer_loop_follows_the_instance_that_replaces_an_orphan() {
        aio_conformance::monitor::an_outer_loop_follows_the_instance_that_replaces_an_orphan(
            &EPOLL,
        );
    }

    #[test]
    fn an_orphan_is_only_dropped_once_the_fd_was_lent() {
        aio_conformance::monitor::an_orphan_is_only_dropped_once_the_fd_was_lent(&EPOLL);
    }
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
    assert!(!readable_now(epoll_fd));
    write_bytes(&w, b"x");
    assert!(readable_now(epoll_fd));
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE)]
    );
}

#[test]
fn name_must_wait_and_debug() {
    let _serial = serial();
    let (r, _w) = pipe();
    let mut monitor = EpollMonitor::with_pwait2(false).unwrap();
    assert_eq!(monitor.name(), "epoll");
    assert_eq!(monitor.must_wait(), None, "cannot tell from userspace");
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
