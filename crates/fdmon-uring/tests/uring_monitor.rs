//! Behaviour of [`UringMonitor`] against real kernel objects: the monitor-level conformance
//! suite (`aio_conformance::monitor`, shared with every backend), and what is specific to
//! io_uring: one `POLL_ADD` in flight per key, stale completions, batched submissions and
//! `io_uring_enter` counts, closed fds, `must_wait` reading the rings, and the ring fd as the
//! outer fd.
//!
//! Every test starts with [`setup`] (the suite's cases with the same check), which takes the
//! suite's `serial` lock and then probes io_uring. Where io_uring is unavailable (an old kernel,
//! `kernel.io_uring_disabled`, a seccomp filter) the test prints `SKIP <test>: ...` and returns;
//! the line shows in the test output, so a skip is never mistaken for a pass. The lock exists
//! because some tests close a registered fd and expect its number to stay unused, some raise
//! `RLIMIT_NOFILE`, one installs a signal handler, and timing tests want a quiet machine.

#![cfg(target_os = "linux")]

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use aio_conformance::monitor::{
    CountLevel, CountingAllocator, MonitorBackend, add, churn_1000_fds, ensure_fd_limit, eventfd,
    key, pipe, read_bytes, readable_now, serial, signal_eventfd, update, wait_for, wait_now,
    write_bytes,
};
use aio_core::{Change, FdMonitor, HandlerKey, Interest, OuterFd, Readiness, ReadyList};
use fdmon_uring::UringMonitor;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Why io_uring cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    UringMonitor::probe()
        .err()
        .map(|e| format!("io_uring unavailable: {e}"))
}

/// The io_uring backend, as the monitor suite sees it.
const URING: MonitorBackend<UringMonitor> = MonitorBackend {
    name: "io_uring",
    make: UringMonitor::new,
    registrations: |m| m.registrations().collect(),
    unavailable,
    batches: None,
    one_key_per_number: false,
};

mod suite {
    aio_conformance::monitor_conformance_tests!(super::URING);
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// What most cases start from: the serial lock, a fresh monitor and a ready list; `None` (after
/// the skip line) where io_uring is unavailable.
fn start(test: &str) -> Option<(MutexGuard<'static, ()>, UringMonitor, ReadyList)> {
    let serial = setup(test)?;
    Some((serial, UringMonitor::new().unwrap(), ReadyList::new()))
}

/// Takes the serial lock and checks that io_uring works. Returns `None`, after printing the
/// skip line, when it does not.
fn setup(test: &str) -> Option<MutexGuard<'static, ()>> {
    let guard = serial();
    match unavailable() {
        None => Some(guard),
        Some(reason) => {
            eprintln!("SKIP {test}: {reason}");
            None
        }
    }
}

fn remove(monitor: &mut UringMonitor, key: HandlerKey, fd: RawFd) {
    update(monitor, Change::Remove { key, fd }).expect("remove");
}

fn modify(monitor: &mut UringMonitor, old: HandlerKey, new: HandlerKey, fd: RawFd, i: Interest) {
    update(
        monitor,
        Change::Replace {
            old,
            new,
            fd,
            interest: i,
        },
    )
    .expect("modify");
}

fn sorted_registrations(monitor: &UringMonitor) -> Vec<(u64, RawFd, Interest)> {
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

// ---------------------------------------------------------------------------------------------
// Replace, remove, and stale completions
// ---------------------------------------------------------------------------------------------

#[test]
fn modify_reports_under_the_new_key_only() {
    let Some((_serial, mut monitor, mut ready)) = start("modify_reports_under_the_new_key_only")
    else {
        return;
    };
    let (r, w) = pipe();
    let old = HandlerKey::new(4, 1);
    let new = HandlerKey::new(4, 2);
    add(&mut monitor, old, r.as_raw_fd(), Interest::READ);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    write_bytes(&w, b"x");

    // The old key's poll has completed by now (its completion is waiting in the queue), but
    // the handler was replaced before the context saw it: that completion is stale.
    modify(&mut monitor, old, new, r.as_raw_fd(), Interest::READ);
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(new, Readiness::READABLE)]
    );
    assert_eq!(
        monitor.registrations().collect::<Vec<_>>(),
        [(new, r.as_raw_fd(), Interest::READ)]
    );
    // The old key is gone from the table too, not just from the reports.
    let err = update(
        &mut monitor,
        Change::Remove {
            key: old,
            fd: r.as_raw_fd(),
        },
    )
    .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    assert_eq!(monitor.len(), 1);
    assert_eq!(monitor.stale_polls(), 0, "the old key's poll has ended");
}

#[test]
fn modify_can_change_interest_under_the_same_key() {
    let Some((_serial, mut monitor, mut ready)) =
        start("modify_can_change_interest_under_the_same_key")
    else {
        return;
    };
    let efd = eventfd();
    add(&mut monitor, key(1), efd.as_raw_fd(), Interest::READ);
    // Counter is 0: not readable, and write interest is not asked for yet.
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    assert_eq!(monitor.polls_in_flight(), 1);

    // The context never reuses a key, but the monitor copes: the new POLL_ADD waits until the
    // old one (same user_data) has ended, within the same wait, which costs a second
    // io_uring_enter.
    let before = monitor.enter_calls();
    modify(
        &mut monitor,
        key(1),
        key(1),
        efd.as_raw_fd(),
        Interest::WRITE,
    );
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::WRITABLE)]
    );
    assert_eq!(monitor.enter_calls() - before, 2);
    assert_eq!(
        monitor.registrations().collect::<Vec<_>>(),
        [(key(1), efd.as_raw_fd(), Interest::WRITE)]
    );
}

#[test]
fn remove_stops_reports_and_cancels_the_poll() {
    let Some((_serial, mut monitor, mut ready)) =
        start("remove_stops_reports_and_cancels_the_poll")
    else {
        return;
    };
    let (r, w) = pipe();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    assert_eq!(monitor.polls_in_flight(), 1);

    remove(&mut monitor, key(1), r.as_raw_fd());
    assert!(monitor.is_empty());
    assert_eq!(monitor.len(), 0);
    assert!(
        (monitor.must_wait() == Some(true)),
        "a POLL_REMOVE is waiting"
    );
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    assert_eq!(
        monitor.polls_in_flight(),
        0,
        "the POLL_REMOVE ended the poll"
    );
    assert!((monitor.must_wait() == Some(false)));

    write_bytes(&w, b"x");
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    assert!((monitor.must_wait() == Some(false)));
}

#[test]
fn add_then_remove_before_a_wait_costs_no_request() {
    let Some(_serial) = setup("add_then_remove_before_a_wait_costs_no_request") else {
        return;
    };
    let (r, w) = pipe();
    write_bytes(&w, b"x");
    let mut monitor = UringMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    remove(&mut monitor, key(1), r.as_raw_fd());
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    assert_eq!(
        monitor.enter_calls(),
        0,
        "nothing to submit: no system call"
    );
    assert_eq!(monitor.polls_in_flight(), 0);
}

#[test]
fn remove_and_readd_of_the_same_fd_in_one_iteration() {
    let Some((_serial, mut monitor, mut ready)) =
        start("remove_and_readd_of_the_same_fd_in_one_iteration")
    else {
        return;
    };
    let (r, w) = pipe();
    let (old, new) = (HandlerKey::new(1, 1), HandlerKey::new(1, 2));

    // Old poll in flight and idle: remove and re-add under a new key, then data arrives.
    add(&mut monitor, old, r.as_raw_fd(), Interest::READ);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    remove(&mut monitor, old, r.as_raw_fd());
    add(&mut monitor, new, r.as_raw_fd(), Interest::READ);
    write_bytes(&w, b"x");
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(new, Readiness::READABLE)]
    );
    assert_eq!(monitor.stale_polls(), 0);

    // Old poll already completed (its report waiting in the completion queue) when the
    // handler is removed and re-added: the old report is dropped, the new key reports.
    let newer = HandlerKey::new(1, 3);
    read_bytes(&r, 1);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    write_bytes(&w, b"y");
    assert!(
        (monitor.must_wait() == Some(true)),
        "the completion is visible from userspace"
    );
    remove(&mut monitor, new, r.as_raw_fd());
    add(&mut monitor, newer, r.as_raw_fd(), Interest::READ);
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(newer, Readiness::READABLE)]
    );
    assert_eq!(monitor.stale_polls(), 0);
}

#[test]
fn replace_while_a_poll_add_is_in_flight() {
    let Some((_serial, mut monitor, mut ready)) = start("replace_while_a_poll_add_is_in_flight")
    else {
        return;
    };
    let (r, w) = pipe();
    let keys: Vec<HandlerKey> = (1..=4).map(|g| HandlerKey::new(9, g)).collect();

    add(&mut monitor, keys[0], r.as_raw_fd(), Interest::READ);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    // keys[0]'s POLL_ADD is in the kernel. Replace it twice before the next wait: only the
    // last key gets a POLL_ADD; keys[1] never reaches the kernel.
    modify(
        &mut monitor,
        keys[0],
        keys[1],
        r.as_raw_fd(),
        Interest::READ,
    );
    modify(
        &mut monitor,
        keys[1],
        keys[2],
        r.as_raw_fd(),
        Interest::READ,
    );
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    assert_eq!(monitor.polls_in_flight(), 1);

    write_bytes(&w, b"x");
    assert_eq!(
        wait_for(&mut monitor, &mut ready, Some(Duration::from_secs(5))),
        [(keys[2], Readiness::READABLE)]
    );
    // Replaced while its completion (and re-arm) is pending: the next report is the new key's.
    modify(
        &mut monitor,
        keys[2],
        keys[3],
        r.as_raw_fd(),
        Interest::READ,
    );
    assert_eq!(
        wait_for(&mut monitor, &mut ready, None),
        [(keys[3], Readiness::READABLE)]
    );
    assert_eq!(monitor.stale_polls(), 0);
}

#[test]
fn same_key_readded_while_its_old_poll_is_in_flight() {
    let Some((_serial, mut monitor, mut ready)) =
        start("same_key_readded_while_its_old_poll_is_in_flight")
    else {
        return;
    };
    let (r, w) = pipe();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    // Not something the context does (it never reuses a key), but two polls must never share
    // a user_data: the new one goes out once the old one's end has been reaped.
    remove(&mut monitor, key(1), r.as_raw_fd());
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    write_bytes(&w, b"x");
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE)]
    );
    assert_eq!(monitor.stale_polls(), 0);
}

// ---------------------------------------------------------------------------------------------
// A registered fd that gets closed
// ---------------------------------------------------------------------------------------------

/// What io_uring does with an fd closed before its `POLL_ADD` reaches the kernel: the request
/// fails with `EBADF`, which is reported once as an error (and warned about once); the key stays
/// registered but is no longer watched, until it is removed or handed to a new key.
#[test]
fn fd_closed_before_its_poll_is_submitted_reports_error_once() {
    let Some(_serial) = setup("fd_closed_before_its_poll_is_submitted_reports_error_once") else {
        return;
    };
    let (subscriber, warnings) = CountLevel::new(tracing::Level::WARN);
    tracing::subscriber::with_default(subscriber, || {
        let (r, _w) = pipe();
        let fd = r.as_raw_fd();
        let mut monitor = UringMonitor::new().unwrap();
        let mut ready = ReadyList::new();
        add(&mut monitor, key(1), fd, Interest::READ);
        // Breaks [CONF-5] on purpose: closes the fd before the first wait submits its
        // POLL_ADD.
        drop(r);

        assert_eq!(
            wait_now(&mut monitor, &mut ready),
            [(key(1), Readiness::ERROR)]
        );
        assert_eq!(wait_now(&mut monitor, &mut ready), []);
        assert_eq!(warnings.load(Ordering::Relaxed), 1);
        assert_eq!(monitor.polls_in_flight(), 0);
        assert_eq!(monitor.len(), 1, "still registered until removed");
        assert!((monitor.must_wait() == Some(false)));

        // A new key for the same closed fd is a new handler: reported, and warned about, anew.
        modify(&mut monitor, key(1), key(2), fd, Interest::READ);
        assert_eq!(
            wait_now(&mut monitor, &mut ready),
            [(key(2), Readiness::ERROR)]
        );
        assert_eq!(wait_now(&mut monitor, &mut ready), []);
        assert_eq!(warnings.load(Ordering::Relaxed), 2);

        // Removing a handler whose fd is closed must succeed.
        remove(&mut monitor, key(2), fd);
        assert!(monitor.is_empty());
        assert_eq!(wait_now(&mut monitor, &mut ready), []);
        assert_eq!(warnings.load(Ordering::Relaxed), 2);
    });
}

/// What io_uring does with an fd closed while its `POLL_ADD` is in the kernel: the request holds
/// its own reference to the open file, so closing the fd number ends nothing. The pipe stays
/// open (its writer can still write), the poll completes when data arrives, and only the
/// re-arm, which names the fd by number, fails with `EBADF`: one more report, as an error.
#[test]
fn fd_closed_while_its_poll_is_in_flight_reports_once_more_then_error() {
    let Some(_serial) = setup("fd_closed_while_its_poll_is_in_flight_reports_once_more_then_error")
    else {
        return;
    };
    let (r, w) = pipe();
    let fd = r.as_raw_fd();
    let mut monitor = UringMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), fd, Interest::READ);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    // Breaks [CONF-5] on purpose: the fd closes while its poll is in flight.
    drop(r);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);

    // The read end is still open inside the kernel, held by the poll: no EPIPE.
    write_bytes(&w, b"x");
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE)]
    );
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::ERROR)]
    );
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    assert_eq!(monitor.polls_in_flight(), 0);
    remove(&mut monitor, key(1), fd);
    assert!(monitor.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Timeouts, wake-ups and signals
// ---------------------------------------------------------------------------------------------

#[test]
fn a_timeout_ended_early_by_a_report_leaves_nothing_behind() {
    let Some((_serial, mut monitor, mut ready)) =
        start("a_timeout_ended_early_by_a_report_leaves_nothing_behind")
    else {
        return;
    };
    let efd = Arc::new(eventfd());
    add(&mut monitor, key(1), efd.as_raw_fd(), Interest::READ);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    let writer = {
        let efd = Arc::clone(&efd);
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            signal_eventfd(&efd);
        })
    };
    // Blocked with a 10 s TIMEOUT in flight when the report arrives.
    let enters = monitor.enter_calls();
    assert_eq!(
        wait_for(&mut monitor, &mut ready, Some(Duration::from_secs(10))),
        [(key(1), Readiness::READABLE)]
    );
    assert_eq!(monitor.enter_calls() - enters, 1);
    writer.join().unwrap();
    read_bytes(&efd, 8);
    // The re-arm is pending; once it is submitted nothing else is: the TIMEOUT (count 1) ended
    // together with the report instead of lingering for 10 s.
    assert!((monitor.must_wait() == Some(true)));
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    assert!((monitor.must_wait() == Some(false)));
    // A later blocking wait is not woken by a leftover timeout: it sleeps its full time in one
    // io_uring_enter.
    let enters = monitor.enter_calls();
    let start = Instant::now();
    assert_eq!(
        wait_for(&mut monitor, &mut ready, Some(Duration::from_millis(30))),
        []
    );
    assert!(start.elapsed() >= Duration::from_millis(30));
    assert_eq!(monitor.enter_calls() - enters, 1);
}

#[test]
fn a_removal_during_a_blocking_wait_does_not_end_it_early() {
    let Some((_serial, mut monitor, mut ready)) =
        start("a_removal_during_a_blocking_wait_does_not_end_it_early")
    else {
        return;
    };
    let (r, _w) = pipe();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    remove(&mut monitor, key(1), r.as_raw_fd());
    // The POLL_REMOVE and the cancelled poll post two completions at once (which also end the
    // count-1 TIMEOUT); they are not reports, so the wait re-arms its TIMEOUT for the same
    // absolute deadline and goes back to sleep: two io_uring_enter calls in all.
    let enters = monitor.enter_calls();
    let start = Instant::now();
    assert_eq!(
        wait_for(&mut monitor, &mut ready, Some(Duration::from_millis(30))),
        []
    );
    assert!(start.elapsed() >= Duration::from_millis(30));
    assert_eq!(monitor.enter_calls() - enters, 2);
    assert_eq!(monitor.polls_in_flight(), 0);
}

// ---------------------------------------------------------------------------------------------
// Scale, churn and batching
// ---------------------------------------------------------------------------------------------

#[test]
fn ten_thousand_idle_fds_and_one_active() {
    let Some(_serial) = setup("ten_thousand_idle_fds_and_one_active") else {
        return;
    };
    const IDLE: u32 = 10_000;
    ensure_fd_limit(u64::from(IDLE) + 256);
    let idle: Vec<OwnedFd> = (0..IDLE).map(|_| eventfd()).collect();
    let active = eventfd();
    let active_key = HandlerKey::new(IDLE, 1);
    let mut monitor = UringMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    for (i, fd) in idle.iter().enumerate() {
        add(&mut monitor, key(i as u32), fd.as_raw_fd(), Interest::READ);
    }
    add(&mut monitor, active_key, active.as_raw_fd(), Interest::READ);
    assert_eq!(monitor.enter_calls(), 0, "update makes no system call");

    // 10 001 POLL_ADDs go out in full submission queues of 128: ceil(10001 / 128) = 79.
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    assert_eq!(monitor.enter_calls(), 79);
    assert_eq!(monitor.polls_in_flight(), 10_001);
    assert_eq!(monitor.len(), 10_001);

    // From then on a wait costs at most one io_uring_enter however many fds are idle. Here
    // the completion is already in the ring when the wait starts (the kernel posts it before
    // the eventfd write returns), so reaping it takes no system call at all; the next wait
    // submits the re-arm (and sleeps) in one.
    for round in 0..10 {
        let enters = monitor.enter_calls();
        signal_eventfd(&active);
        assert!((monitor.must_wait() == Some(true)), "round {round}");
        assert_eq!(
            wait_for(&mut monitor, &mut ready, None),
            [(active_key, Readiness::READABLE)],
            "round {round}"
        );
        read_bytes(&active, 8);
        assert_eq!(monitor.enter_calls() - enters, 0);
        assert_eq!(
            wait_for(&mut monitor, &mut ready, Some(Duration::from_micros(100))),
            []
        );
        assert_eq!(monitor.enter_calls() - enters, 1);
    }

    // Woken from another thread while blocked: one io_uring_enter per wait too.
    for round in 0..10 {
        let enters = monitor.enter_calls();
        let writer = {
            let fd = active.try_clone().unwrap();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(20));
                signal_eventfd(&fd);
            })
        };
        assert_eq!(
            wait_for(&mut monitor, &mut ready, None),
            [(active_key, Readiness::READABLE)],
            "round {round}"
        );
        writer.join().unwrap();
        read_bytes(&active, 8);
        assert_eq!(monitor.enter_calls() - enters, 1, "round {round}");
        // Submit the re-arm before the next round.
        assert_eq!(wait_now(&mut monitor, &mut ready), []);
    }
    assert_eq!(monitor.polls_in_flight(), 10_001);
}

/// The suite's churn (with waits between removals, so that they meet polls in every state:
/// queued re-arms, idle polls in the kernel, completions not yet reaped), then io_uring's own
/// bookkeeping: no stale poll left behind, one poll in flight per live key, none at the end.
#[test]
fn churn_of_1000_fds_leaves_no_stale_poll() {
    let Some(_serial) = setup("churn_of_1000_fds_leaves_no_stale_poll") else {
        return;
    };
    let mut monitor = UringMonitor::new().unwrap();
    churn_1000_fds(&URING, &mut monitor, |monitor| {
        assert_eq!(monitor.stale_polls(), 0, "no stale poll is left behind");
        // The 350 read ends are armed; the 350 write ends were just reported, their re-arms
        // queued.
        assert_eq!(monitor.polls_in_flight(), 350);
    });
    assert!(monitor.is_empty());
    assert_eq!(monitor.polls_in_flight(), 0);
    assert!((monitor.must_wait() == Some(false)));
}

#[test]
fn a_batch_of_300_adds_is_submitted_by_one_wait() {
    let Some((_serial, mut monitor, mut ready)) =
        start("a_batch_of_300_adds_is_submitted_by_one_wait")
    else {
        return;
    };
    let fds: Vec<OwnedFd> = (0..300).map(|_| eventfd()).collect();

    // Idle fds (read interest on a zero counter): update makes no system call, and one wait
    // submits everything in ceil(300 / 128) = 3 io_uring_enter calls.
    for (i, fd) in fds.iter().enumerate() {
        add(&mut monitor, key(i as u32), fd.as_raw_fd(), Interest::READ);
    }
    assert_eq!(monitor.enter_calls(), 0);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    assert_eq!(monitor.enter_calls(), 3);
    assert_eq!(monitor.polls_in_flight(), 300);

    // Ready fds (write interest, always writable): 300 completions, more than the 256-entry
    // completion queue holds, each reported once; reaping between the batches keeps the
    // queue from overflowing, so still 3 calls.
    let mut monitor = UringMonitor::new().unwrap();
    for (i, fd) in fds.iter().enumerate() {
        add(&mut monitor, key(i as u32), fd.as_raw_fd(), Interest::WRITE);
    }
    for round in 1..=3 {
        let reports = wait_now(&mut monitor, &mut ready);
        assert_eq!(reports.len(), 300, "round {round}");
        assert!(reports.iter().all(|&(_, r)| r == Readiness::WRITABLE));
        assert_eq!(monitor.enter_calls(), 3 * round);
    }
}

/// More removals than the submission queue holds, and re-adds under the removed keys while
/// their stale polls are in flight: the `POLL_REMOVE`s and held-back `POLL_ADD`s that do not
/// fit go back to the monitor's queue (`Polls::unpop`) and out with the next round, so no
/// stale poll is left and every re-added key is reported once.
#[test]
fn removes_and_readds_beyond_the_queue_size() {
    let Some((_serial, mut monitor, mut ready)) = start("removes_and_readds_beyond_the_queue_size")
    else {
        return;
    };
    let fd = eventfd();
    let n = 300u32;
    for i in 0..n {
        add(&mut monitor, key(i), fd.as_raw_fd(), Interest::READ);
    }
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    assert_eq!(monitor.polls_in_flight(), n as usize);
    for i in 0..n {
        remove(&mut monitor, key(i), fd.as_raw_fd());
    }
    for i in 0..n / 2 {
        add(&mut monitor, key(i), fd.as_raw_fd(), Interest::READ);
    }
    for _ in 0..10 {
        ready.clear();
        monitor
            .wait(&mut ready, Some(Duration::from_millis(5)))
            .unwrap();
        assert!(ready.is_empty());
    }
    assert_eq!(monitor.stale_polls(), 0);
    assert_eq!(monitor.polls_in_flight(), (n / 2) as usize);
    signal_eventfd(&fd);
    ready.clear();
    monitor
        .wait(&mut ready, Some(Duration::from_millis(100)))
        .unwrap();
    assert_eq!(ready.len(), (n / 2) as usize);
}

#[test]
fn completions_beyond_the_queue_size_are_all_reported() {
    let Some((_serial, mut monitor, mut ready)) =
        start("completions_beyond_the_queue_size_are_all_reported")
    else {
        return;
    };
    let fds: Vec<OwnedFd> = (0..300).map(|_| eventfd()).collect();
    for (i, fd) in fds.iter().enumerate() {
        add(&mut monitor, key(i as u32), fd.as_raw_fd(), Interest::READ);
    }
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    let enters = monitor.enter_calls();

    // 300 polls complete between two waits: 256 fill the completion queue, the kernel keeps
    // the other 44 aside (IORING_FEAT_NODROP). One wait reaps the 256, fetches the rest with
    // one io_uring_enter, and reports all 300, each once.
    for fd in &fds {
        signal_eventfd(fd);
    }
    let reports = wait_now(&mut monitor, &mut ready);
    assert_eq!(reports.len(), 300);
    assert!(reports.iter().all(|&(_, r)| r == Readiness::READABLE));
    assert_eq!(monitor.enter_calls() - enters, 1);

    // Level-triggered still: the re-arms report all 300 again.
    assert_eq!(wait_now(&mut monitor, &mut ready).len(), 300);
    for fd in &fds {
        read_bytes(fd, 8);
    }
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    assert_eq!(monitor.polls_in_flight(), 300);
}

#[test]
fn steady_state_is_one_io_uring_enter_per_wait() {
    let Some((_serial, mut monitor, mut ready)) =
        start("steady_state_is_one_io_uring_enter_per_wait")
    else {
        return;
    };
    let (r, w) = pipe();
    let efd = eventfd();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    add(&mut monitor, key(2), efd.as_raw_fd(), Interest::READ);
    write_bytes(&w, b"x");
    assert_eq!(wait_now(&mut monitor, &mut ready).len(), 1);

    let enters = monitor.enter_calls();
    for timeout in [None, Some(Duration::from_secs(5)), Some(Duration::ZERO)] {
        for _ in 0..100 {
            assert_eq!(
                wait_for(&mut monitor, &mut ready, timeout),
                [(key(1), Readiness::READABLE)]
            );
        }
    }
    assert_eq!(monitor.enter_calls() - enters, 300);
}

// ---------------------------------------------------------------------------------------------
// must_wait, outer loops, identity of the type
// ---------------------------------------------------------------------------------------------

#[test]
fn must_wait_reads_the_rings_and_always_knows() {
    let Some((_serial, mut monitor, mut ready)) =
        start("must_wait_reads_the_rings_and_always_knows")
    else {
        return;
    };
    let efd = eventfd();
    let both = |m: &UringMonitor| {
        let answer = m.must_wait();
        assert!(answer.is_some(), "io_uring always knows");
        answer == Some(true)
    };
    assert!(!both(&monitor), "nothing to submit or reap");

    add(&mut monitor, key(1), efd.as_raw_fd(), Interest::READ);
    assert!(both(&monitor), "a change waits to be submitted");
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    assert!(!both(&monitor), "the poll is in the kernel and idle");

    let enters = monitor.enter_calls();
    signal_eventfd(&efd);
    assert!(
        both(&monitor),
        "the completion is visible without a system call"
    );
    assert_eq!(monitor.enter_calls(), enters);
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE)]
    );
    assert_eq!(
        monitor.enter_calls(),
        enters,
        "reaping needs no system call"
    );
    assert!(both(&monitor), "the re-arm waits to be submitted");
    read_bytes(&efd, 8);
    assert_eq!(wait_now(&mut monitor, &mut ready), []);
    assert!(!both(&monitor));
}

#[test]
fn outer_fds_is_the_ring_fd_and_outer_loops_get_rearms_submitted() {
    let Some(_serial) = setup("outer_fds_is_the_ring_fd_and_outer_loops_get_rearms_submitted")
    else {
        return;
    };
    let efd = eventfd();
    signal_eventfd(&efd);
    let mut monitor = UringMonitor::new().unwrap();
    let mut ready = ReadyList::new();
    add(&mut monitor, key(1), efd.as_raw_fd(), Interest::READ);
    let ring_fd = monitor.as_fd().as_raw_fd();

    // Without an outer loop, a wait leaves its re-arms for the next wait: the ring fd stays
    // quiet although the fd is still readable.
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE)]
    );
    assert!(!readable_now(ring_fd));
    assert!((monitor.must_wait() == Some(true)));

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
                fd: ring_fd,
                interest: Interest::READ
            }
        ]
    );

    // With one, a wait that leaves re-arms queued posts a NOP before it returns, so that the
    // ring fd is readable and the outer loop comes back to submit them. They are submitted by
    // that next wait, after the handlers ran, not before: a re-arm submitted before the handler
    // reads would report readiness the handler is about to consume.
    let enters = monitor.enter_calls();
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE)]
    );
    assert_eq!(monitor.enter_calls() - enters, 2, "the re-arm and the NOP");
    assert!(readable_now(ring_fd));
    assert!((monitor.must_wait() == Some(true)));
    read_bytes(&efd, 8); // The handler consumes the event.
    assert_eq!(wait_now(&mut monitor, &mut ready), [], "no spurious report");
    // The re-arm went out and found nothing: no NOP, the ring fd is quiet, an outer loop sleeps
    // with the poll armed...
    assert!(!readable_now(ring_fd));
    assert!((monitor.must_wait() == Some(false)));
    // ...and wakes when the fd becomes ready again.
    signal_eventfd(&efd);
    assert!(readable_now(ring_fd));
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(1), Readiness::READABLE)]
    );
    assert!(readable_now(ring_fd));
}

#[test]
fn name_and_debug() {
    let Some(_serial) = setup("name_and_debug") else {
        return;
    };
    let mut monitor = UringMonitor::new().unwrap();
    assert_eq!(monitor.name(), "io_uring");
    add(&mut monitor, HandlerKey::new(1, 2), 7, Interest::READ);
    let debug = format!("{monitor:?}");
    assert!(
        debug.starts_with(
            "UringMonitor { registrations: [(HandlerKey(1v2), 7, Interest(READ))], in_flight: 0, \
             ring: Ring { fd: "
        ),
        "{debug}"
    );
}

/// `UringMonitor` may move to another thread but never be shared: the rings have one writer.
#[test]
fn send_but_not_sync() {
    fn assert_send<T: Send>() {}
    assert_send::<UringMonitor>();

    // Resolves only if exactly one impl applies, i.e. if `UringMonitor` is not `Sync`.
    trait AmbiguousIfSync<A> {
        fn check() {}
    }
    impl<T: ?Sized> AmbiguousIfSync<()> for T {}
    impl<T: ?Sized + Sync> AmbiguousIfSync<u8> for T {}
    <UringMonitor as AmbiguousIfSync<_>>::check();
}

#[test]
fn a_monitor_moved_to_another_thread_keeps_its_polls() {
    let Some((_serial, mut monitor, mut ready)) =
        start("a_monitor_moved_to_another_thread_keeps_its_polls")
    else {
        return;
    };
    let efd = Arc::new(eventfd());
    add(&mut monitor, key(1), efd.as_raw_fd(), Interest::READ);
    // Submitted from a thread that then exits. On Linux 6.18 the poll stays armed, but when it
    // fires its submitter is gone and it completes with ECANCELED instead of a poll mask (older
    // kernels cancel it when the thread exits). Either way the monitor re-arms a live poll it
    // finds cancelled, from the thread that now owns it, within the same wait.
    let mut monitor = thread::spawn(move || {
        let mut ready = ReadyList::new();
        assert_eq!(wait_now(&mut monitor, &mut ready), []);
        monitor
    })
    .join()
    .unwrap();
    let writer = {
        let efd = Arc::clone(&efd);
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            signal_eventfd(&efd);
        })
    };
    assert_eq!(
        wait_for(&mut monitor, &mut ready, Some(Duration::from_secs(10))),
        [(key(1), Readiness::READABLE)]
    );
    writer.join().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Allocation
// ---------------------------------------------------------------------------------------------

/// The refusals io_uring adds to the shared ones: slot index `u32::MAX` is reserved for the
/// monitor's own tags. A refused change reaches the kernel with nothing.
#[test]
fn the_reserved_slot_index_is_refused() {
    let Some((_serial, mut monitor, mut ready)) = start("the_reserved_slot_index_is_refused")
    else {
        return;
    };
    let (r, w) = pipe();
    add(&mut monitor, key(1), r.as_raw_fd(), Interest::READ);
    add(&mut monitor, key(2), w.as_raw_fd(), Interest::WRITE);
    let before = sorted_registrations(&monitor);
    let reserved = HandlerKey::new(u32::MAX, 0);
    let (fd, interest) = (r.as_raw_fd(), Interest::READ);
    let cases = [
        Change::Add {
            key: reserved,
            fd,
            interest,
        },
        Change::Replace {
            old: key(1),
            new: reserved,
            fd,
            interest,
        },
    ];
    for change in cases {
        let err = update(&mut monitor, change).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{change:?}");
    }
    assert_eq!(sorted_registrations(&monitor), before);
    // Only the two good adds reached the kernel: key 1 is armed, key 2 was reported.
    assert_eq!(
        wait_now(&mut monitor, &mut ready),
        [(key(2), Readiness::WRITABLE)]
    );
    assert_eq!(monitor.polls_in_flight(), 1);
    assert_eq!(monitor.stale_polls(), 0);
}
