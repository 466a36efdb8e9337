//! Behaviour of [`PollMonitor`] against real kernel objects: the monitor-level conformance
//! suite (`aio_conformance::monitor`, shared with every backend), and what is specific to
//! poll(2): the same fd number may be watched twice, a closed fd is reported as an error (and
//! warned about once per key), and an outer loop must watch every registered fd.
//!
//! Every test takes the suite's `serial` lock, because one of them closes a registered fd and
//! expects the kernel to report its number as not open; a test running in parallel could
//! otherwise receive that number for a new fd. Serial tests also keep the timing tests honest
//! on a busy machine.
//!
//! Linux only: the cases are written on eventfds and `pipe2`. The backend itself builds for
//! macOS and the BSDs (`cargo xtask ci`'s `cross` step checks it), where the context conformance
//! suite is what would run on it.

#![cfg(target_os = "linux")]

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use aio_conformance::monitor::{
    CountLevel, CountingAllocator, MonitorBackend, add, always_available, pipe, serial, update,
    wait_now,
};
use aio_core::{Change, FdMonitor, HandlerKey, Interest, OuterFd, Readiness, ReadyList};
use fdmon_poll::PollMonitor;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The poll backend, as the monitor suite sees it.
const POLL: MonitorBackend<PollMonitor> = MonitorBackend {
    name: "poll",
    make: PollMonitor::new,
    registrations: |m| m.registrations().collect(),
    unavailable: always_available,
    batches: None,
    one_key_per_number: false,
};

aio_conformance::monitor_conformance_tests!(POLL);

fn key(index: u32) -> HandlerKey {
    aio_conformance::monitor::key(index)
}

// ---------------------------------------------------------------------------------------------
// poll(2) specifics
// ---------------------------------------------------------------------------------------------

#[test]
fn closed_registered_fd_reports_error_and_warns_once_per_key() {
    let _serial = serial();
    let (subscriber, warnings) = CountLevel::new(tracing::Level::WARN);
    tracing::subscriber::with_default(subscriber, || {
        let (r, _w) = pipe();
        let fd = r.as_raw_fd();
        let mut monitor = PollMonitor::new().unwrap();
        let mut ready = ReadyList::new();
        add(&mut monitor, key(1), fd, Interest::READ);
        // Breaks [CONF-5] on purpose: closes the fd while it is still registered.
        drop(r);

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
        update(
            &mut monitor,
            Change::Replace {
                old: key(1),
                new: key(2),
                fd,
                interest: Interest::READ,
            },
        )
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

        // Replace and Remove forget that a key was warned about, so the set of warned keys
        // does not grow forever. Reusing a key (which the context never does) makes that
        // visible: it is warned about again.
        update(
            &mut monitor,
            Change::Replace {
                old: key(2),
                new: key(1),
                fd,
                interest: Interest::READ,
            },
        )
        .unwrap();
        assert_eq!(
            wait_now(&mut monitor, &mut ready),
            [(key(1), Readiness::ERROR)]
        );
        assert_eq!(warnings.load(Ordering::Relaxed), 3);

        // Removing a handler whose fd is closed must succeed. Adding the closed number again
        // breaks [CONF-5] on purpose, as the first close did.
        update(&mut monitor, Change::Remove { key: key(1), fd }).unwrap();
        assert_eq!(wait_now(&mut monitor, &mut ready), []);
        add(&mut monitor, key(1), fd, Interest::READ);
        assert_eq!(
            wait_now(&mut monitor, &mut ready),
            [(key(1), Readiness::ERROR)]
        );
        assert_eq!(warnings.load(Ordering::Relaxed), 4);

        update(&mut monitor, Change::Remove { key: key(1), fd }).unwrap();
        assert!(monitor.is_empty());
        assert_eq!(wait_now(&mut monitor, &mut ready), []);
        assert_eq!(warnings.load(Ordering::Relaxed), 4);
    });
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
fn name_must_wait_and_debug() {
    let _serial = serial();
    let mut monitor = PollMonitor::new().unwrap();
    assert_eq!(monitor.name(), "poll");
    assert_eq!(monitor.must_wait(), None, "cannot tell from userspace");
    assert!(monitor.is_empty());
    add(&mut monitor, HandlerKey::new(1, 2), 7, Interest::READ);
    assert_eq!((monitor.len(), monitor.is_empty()), (1, false));
    assert_eq!(
        format!("{monitor:?}"),
        "PollMonitor { registrations: [(HandlerKey(1v2), 7, Interest(READ))], .. }"
    );
}
