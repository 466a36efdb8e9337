//! Helpers shared by the timers integration tests: a group on a test-owned virtual clock that
//! counts its notify calls, callback counters and logs, a drop counter, and a fixed-seed PRNG.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use timers::{ClockType, Scale, Timer, TimerListGroup, VirtualClock};

/// A group whose virtual clocks read `clock` (enabled, stopped at 0), counting notifies.
pub struct Fixture {
    pub clock: VirtualClock,
    pub group: TimerListGroup,
    notifies: Arc<AtomicUsize>,
}

impl Fixture {
    /// An enabled clock at 0 ns (a new clock's state), so the notify count starts at 0.
    pub fn new() -> Self {
        Fixture::with_clock(true)
    }

    /// A disabled clock at 0 ns (QEMU's virtual clock while the VM is paused).
    pub fn disabled() -> Self {
        Fixture::with_clock(false)
    }

    fn with_clock(enabled: bool) -> Self {
        let clock = if enabled {
            VirtualClock::new()
        } else {
            VirtualClock::new_disabled()
        };
        let (group, notifies) = group_on(&clock);
        Fixture {
            clock,
            group,
            notifies,
        }
    }

    /// How many times the group's notify callback has run.
    pub fn notified(&self) -> usize {
        self.notifies.load(Ordering::SeqCst)
    }

    pub fn advance_ns(&self, ns: u64) {
        self.clock.advance(Duration::from_nanos(ns));
    }

    pub fn now(&self) -> u64 {
        self.clock.now_ns()
    }

    /// A nanosecond-scale virtual timer whose callback increments the returned counter.
    pub fn counting_timer(&self) -> (Timer, Arc<AtomicUsize>) {
        let n = Arc::new(AtomicUsize::new(0));
        let c = n.clone();
        let t = self.group.timer(ClockType::Virtual, Scale::NS, move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        (t, n)
    }

    /// A nanosecond-scale virtual timer whose callback pushes `id` onto `log`.
    pub fn logging_timer(&self, log: &Log, id: usize) -> Timer {
        let log = log.clone();
        self.group
            .timer(ClockType::Virtual, Scale::NS, move || log.push(id))
    }
}

/// A group on `clock` (Virtual and VirtualRt) and its notify counter.
pub fn group_on(clock: &VirtualClock) -> (TimerListGroup, Arc<AtomicUsize>) {
    let notifies = Arc::new(AtomicUsize::new(0));
    let n = notifies.clone();
    let group = TimerListGroup::builder()
        .virtual_clock(clock.clone())
        .build(Arc::new(move || {
            n.fetch_add(1, Ordering::SeqCst);
        }));
    (group, notifies)
}

/// An ordered record of which callbacks ran.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<usize>>>);

impl Log {
    pub fn push(&self, id: usize) {
        self.0.lock().unwrap().push(id);
    }

    pub fn take(&self) -> Vec<usize> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Counts drops of the values it hands out, to prove callbacks are freed.
#[derive(Clone, Default)]
pub struct Drops(Arc<AtomicUsize>);

/// Increments its [`Drops`] when dropped.
pub struct DropToken(Arc<AtomicUsize>);

impl Drops {
    pub fn token(&self) -> DropToken {
        DropToken(self.0.clone())
    }

    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Drop for DropToken {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// xorshift64*: a small deterministic generator, so randomized tests are reproducible.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        XorShift(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}
