//! Nanosecond timers for the aio event loop, after QEMU's `util/qemu-timer.c`: clocks, timer
//! lists (one per clock) and timer-list groups (one per event loop).
//!
//! This crate knows nothing of the loop. The loop owns a [`TimerListGroup`] built with a
//! callback that wakes it; each iteration it sleeps at most [`TimerListGroup::deadline`] and
//! then calls [`TimerListGroup::run_expired`]. Timers are created from the group and armed
//! from any thread.
//!
//! # Clocks and resolution
//!
//! Four clocks, as in QEMU ([`ClockType`]): `Realtime` (monotonic), `Virtual` (a
//! [`VirtualClock`] the program stops, starts and advances; the basis of deterministic tests;
//! starts enabled and stopped, [`VirtualClock::new_disabled`] for a paused VM), `Host` (wall clock) and `VirtualRt` (virtual time, never disabled). Every
//! time in this crate is a `u64` count of **nanoseconds** on the timer's clock, with no rounding
//! anywhere: a deadline armed for 1 µs from now is reported as 1 µs away. A timer's [`Scale`]
//! (ns, µs, ms, s or custom) only sets the unit of [`Timer::arm`] and friends.
//!
//! # Ordering and firing guarantees
//!
//! - A timer fires when the clock reading taken by `run_expired` is **at or after** its
//!   deadline: a timer due exactly *now* fires, and one armed in the past fires on the next
//!   `run_expired`.
//! - Due timers fire in deadline order; **equal deadlines fire in arming order** (each arm,
//!   re-arms included, takes a fresh sequence number).
//! - Each arm fires once. Callbacks may arm, re-arm, cancel or drop any timer, themselves
//!   included; a timer cancelled before its turn, even by a callback of the same run, does not
//!   fire. A callback that re-arms its timer at or before the reading runs again in the same
//!   call (QEMU behaviour; see the livelock note on [`TimerListGroup::run_expired`]).
//! - Disabled clocks contribute no deadline and run no timers.
//!
//! # Saturation
//!
//! Deadline arithmetic never overflows: `deadline × scale` and `now + delay` saturate at
//! `u64::MAX` ns (about 584 years), which is the deadline that never comes. Clocks stop at
//! `u64::MAX - 1`, so a timer saturated to `u64::MAX` stays armed but never fires and contributes
//! no deadline. QEMU's signed deadlines clamp negative values to 0; unsigned ones cannot be
//! negative.
//!
//! # Threads
//!
//! [`Timer`], [`TimerRef`] and [`TimerListGroup`] are `Send + Sync`. Each timer list has one
//! mutex, held for the O(log n) heap update of an arm or cancel and never while user code runs.
//! Callbacks run on the thread that calls `run_expired` (the loop's home thread); only one
//! thread may run a group at a time. Arming a timer so that it becomes the earliest of its list
//! calls the group's notify callback after the lock is released; cancelling never notifies.
//!
//! # Cost
//!
//! Each list is an indexed 4-ary min-heap keyed by `(deadline, arming sequence)` over a slab of
//! timers, with a position table (see `heap.rs`): arm, re-arm and cancel are O(log n) and
//! allocation-free, the earliest deadline is O(1) and read without a lock. Benchmark B7
//! (`benches/benches/timers.rs`, criterion medians on the 2-vCPU dev VM, release build), with
//! N = 0 / 1 000 / 100 000 / 1 000 000 timers already pending:
//!
//! | operation | ns per operation |
//! |---|---|
//! | `arm_after` + `cancel` of an existing timer | 60 / 75 / 61 / 73 |
//! | create + `arm_after` + drop | 82 / 91 / 87 / 97 |
//! | re-arm an armed timer | 46 / 46 / 48 / 58 |
//! | [`TimerListGroup::deadline`] | 3 / 30 / 32 / 33 (a monotonic clock read is ~25) |
//! | arm + fire, per timer, batches of 1 000 | 46 / 49 / 61 / 70 |
//!
//! Side by side in the same process, tokio's `sleep` polled once and dropped costs 113–133 ns
//! (time driver only) and 420–525 ns on an `enable_all` runtime inside a task (the shape of the
//! project's 620–690 ns reference anchor; each registration then also writes tokio's eventfd);
//! async-io's `Timer` costs 116 ns at N = 0 and 1.06 µs at N = 1 000 000. The raw structure,
//! without lock or clock, measured at N = 1 000 000: 14 ns per insert + remove (`BTreeMap`:
//! 610 ns), 145 ns to move a random pending timer, 415 ns to pop the head and re-insert it a
//! minute later (the cache misses of a sift through a 24 MB heap; a binary heap is 25–30 %
//! slower; an 8-ary one was 10–20 % faster at 1 000 000 but 25 % slower to pop at 100 000).
//!
//! # QEMU names
//!
//! | QEMU | here |
//! |---|---|
//! | `QEMUClockType`, `QEMU_CLOCK_*` | [`ClockType`] |
//! | `qemu_clock_get_ns(type)` | [`TimerListGroup::now_ns`], [`Clocks::now_ns`] (any thread), [`Timer::now_ns`], [`VirtualClock::now_ns`] |
//! | `qemu_clock_enable(QEMU_CLOCK_VIRTUAL, on)` | [`VirtualClock::enable`] / [`VirtualClock::disable`] |
//! | `SCALE_NS`, `SCALE_US`, `SCALE_MS` | [`Scale::NS`], [`Scale::US`], [`Scale::MS`] (and [`Scale::S`]) |
//! | `QEMU_TIMER_ATTR_EXTERNAL` | [`TimerAttrs::EXTERNAL`] |
//! | `QEMUTimerListGroup`, `timerlistgroup_init` | [`TimerListGroup`], [`TimerListGroup::new`] |
//! | `aio_timer_new`, `timer_new_ns/_us/_ms` | [`TimerListGroup::timer`] |
//! | `aio_timer_new_with_attrs` | [`TimerListGroup::timer_with_attrs`] |
//! | `timer_mod`, `timer_mod_ns` | [`Timer::arm`], [`Timer::arm_ns`] (and [`Timer::arm_after`]) |
//! | `timer_mod_anticipate(_ns)` | [`Timer::arm_if_earlier`], [`Timer::arm_if_earlier_ns`] |
//! | `timer_del` | [`Timer::cancel`] |
//! | `timer_free`, `timer_deinit` | drop the [`Timer`] |
//! | `timer_pending` | [`Timer::is_pending`] |
//! | `timer_expired` | [`Timer::has_expired`] |
//! | `timer_expire_time_ns` | [`Timer::expire_time_ns`] |
//! | `timerlistgroup_deadline_ns` | [`TimerListGroup::deadline_ns`], [`TimerListGroup::deadline`] |
//! | `timerlistgroup_run_timers` | [`TimerListGroup::run_expired`] |
//! | `timerlistgroup_deinit`, `timerlist_free` | drop the [`TimerListGroup`] |
//! | `qtest_clock_step` / `qemu_clock_advance_virtual_time` | [`VirtualClock::advance`] then [`TimerListGroup::run_expired`] |
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::time::Duration;
//! use timers::{ClockType, Scale, TimerListGroup};
//!
//! let group = TimerListGroup::new(Arc::new(|| { /* wake the loop */ }));
//! let fired = Arc::new(AtomicU32::new(0));
//! let f = fired.clone();
//! let timer = group.timer(ClockType::Realtime, Scale::NS, move || {
//!     f.fetch_add(1, Ordering::Relaxed);
//! });
//!
//! timer.arm_ns(timer.now_ns()); // due exactly now
//! assert!(group.deadline().is_some_and(|d| d <= Duration::ZERO));
//! assert!(group.run_expired());
//! assert_eq!(fired.load(Ordering::Relaxed), 1);
//!
//! timer.arm_after(Duration::from_secs(60));
//! assert!(group.deadline().is_some_and(|d| d > Duration::from_secs(59)));
//! drop(timer); // cancels and frees it
//! assert_eq!(group.deadline(), None);
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![doc(test(attr(deny(warnings))))]

mod clock;
mod group;
mod heap;
mod list;
mod sync;
mod timer;

pub use clock::{ClockType, Clocks, VirtualClock, host_ns, realtime_ns};
pub use group::{GroupBuilder, GroupHandle, TimerListGroup};
#[cfg(aio_loom)]
#[doc(hidden)]
pub use list::LoomVariant;
pub use list::Notify;
pub use timer::{Scale, Timer, TimerAttrs, TimerRef};
