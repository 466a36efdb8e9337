//! A yielding busy loop on a CPU that other work wants (`PollParams::yielding`): a yield that
//! gives the CPU away for a scheduler slice ends the polling phase, is counted in
//! `Stats::poll_contended`, and the context then waits in the backend without busy-polling
//! for a backoff, instead of giving a slice away at every iteration.
//!
//! Linux only (it pins threads with `sched_setaffinity`); skipped, with the reason printed,
//! where pinning is refused.
#![cfg(all(target_os = "linux", not(miri), not(aio_loom)))]

use aio_core::{EventNotifier, PollParams, PollPolicy};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::thread;
use std::time::{Duration, Instant};

#[path = "support/ctx.rs"]
mod support;
use support::ctx;

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> std::io::Result<()> {
    // `CPU_ZERO` initializes the set before `CPU_SET` and `sched_setaffinity` read it, the
    // latter the `size_of::<cpu_set_t>()` bytes passed.
    // SAFETY: `cpu_set_t` is plain data (all zeroes is a valid value), read within its size.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn a_yield_that_loses_the_cpu_stops_busy_polling_for_a_while() {
    // SAFETY: sched_getcpu takes no arguments.
    let cpu = unsafe { libc::sched_getcpu() };
    let Ok(cpu) = usize::try_from(cpu) else {
        println!("skipped: sched_getcpu failed");
        return;
    };
    if let Err(e) = pin_to(cpu) {
        println!("skipped: cannot pin a thread to CPU {cpu} ({e})");
        return;
    }
    let ctx = ctx();
    // Weighted: the window jumps to the first block time (tens of ms here), so that every
    // blocking iteration would poll, and yield, for the rest of the test.
    let params = PollParams::new(Duration::from_secs(1))
        .policy(PollPolicy::Weighted { weight: 2 })
        .yielding(true);
    ctx.set_poll_params(params).unwrap();
    let e = Arc::new(EventNotifier::new().unwrap());
    let seen = Arc::new(AtomicU32::new(0));
    let s = seen.clone();
    let _handler = ctx
        .set_event_notifier(&e, move |e| {
            if e.test_and_clear() {
                s.fetch_add(1, SeqCst);
            }
        })
        .unwrap();
    // The notifier joins the poll set, with a block time of about 20 ms as its window.
    let setter = e.clone();
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(20));
        setter.set().unwrap();
    });
    while seen.load(SeqCst) == 0 {
        ctx.poll();
    }
    t.join().unwrap();
    assert!(ctx.poll_window() > Duration::ZERO, "the notifier polls");

    // A thread that wants this CPU all the time, and events every 2 ms from another CPU.
    let stop = Arc::new(AtomicBool::new(false));
    let (hog_stop, setter_stop) = (stop.clone(), stop.clone());
    let hog = thread::spawn(move || {
        if pin_to(cpu).is_err() {
            return false;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !hog_stop.load(SeqCst) && Instant::now() < deadline {
            std::hint::spin_loop();
        }
        true
    });
    let setter = e.clone();
    let events = thread::spawn(move || {
        while !setter_stop.load(SeqCst) {
            thread::sleep(Duration::from_millis(2));
            setter.set().unwrap();
        }
    });
    let before = ctx.stats();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(400) {
        ctx.poll();
    }
    let after = ctx.stats();
    stop.store(true, SeqCst);
    events.join().unwrap();
    if !hog.join().unwrap() {
        println!("skipped: cannot pin the second thread to CPU {cpu}");
        return;
    }
    let contended = after.poll_contended - before.poll_contended;
    let phases = (after.poll_hits + after.poll_misses) - (before.poll_hits + before.poll_misses);
    let iterations = after.iterations - before.iterations;
    println!("{iterations} iterations, {phases} polling phases, {contended} contended yields");
    assert!(contended >= 1, "no yield was contended: {after:?}");
    // Backoffs of 10, 20, 40, 80 and 160 ms: a handful of phases in 400 ms, where every
    // iteration would poll (and give a slice away) without them.
    assert!(
        phases * 3 < iterations,
        "{phases} polling phases in {iterations} iterations"
    );
}
