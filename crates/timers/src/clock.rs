//! Clocks: the four QEMU clock types, how each one is read in nanoseconds, and
//! [`VirtualClock`], the clock that the program stops, starts and advances.
//!
//! C original: `QEMUClockType`, `qemu_clock_get_ns`, `qemu_clock_enable` and the `QEMUClock`
//! registry of timer lists in `util/qemu-timer.c`.
//!
//! Every reading is a `u64` count of nanoseconds since the clock's own epoch:
//!
//! - [`ClockType::Realtime`]: the monotonic clock ([`Instant`]), counted from an epoch fixed the
//!   first time any timer code reads it in this process;
//! - [`ClockType::Host`]: the wall clock ([`SystemTime`]) since the Unix epoch; it follows
//!   changes of the system time, so a step forward fires timers early and a step back delays them;
//! - [`ClockType::Virtual`] and [`ClockType::VirtualRt`]: a [`VirtualClock`] (by default the
//!   process-wide [`VirtualClock::global`]).
//!
//! A virtual clock also carries QEMU's *enabled* flag, which only [`ClockType::Virtual`] lists
//! obey: while it is off their timers neither contribute a deadline nor run. It starts on, as
//! QEMU's clocks do (`qemu_clock_init`); QEMU turns it off while the VM is paused
//! (`pause_all_vcpus`), which [`VirtualClock::new_disabled`] and [`VirtualClock::disable`] model. QEMU's
//! `VIRTUAL_RT` is never disabled and equals `VIRTUAL` outside icount, so a `VirtualRt` list
//! reads the same time but ignores the flag.

use std::fmt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::list::TimerList;
use crate::sync::{Arc, AtomicBool, AtomicU64, Mutex, OnceLock, Ordering, Weak, process_global};

/// Which clock a timer list measures time with (QEMU `QEMUClockType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClockType {
    /// Host monotonic time; runs whatever the program does (QEMU `QEMU_CLOCK_REALTIME`).
    Realtime,
    /// Program-controlled time that can be stopped, started, advanced, and disabled (QEMU
    /// `QEMU_CLOCK_VIRTUAL`). A [`VirtualClock`] starts enabled and stopped: its timers fire as
    /// soon as [`VirtualClock::advance`] reaches them.
    Virtual,
    /// Host wall-clock time, following system time changes (QEMU `QEMU_CLOCK_HOST`).
    Host,
    /// The same time as [`ClockType::Virtual`], but never disabled (QEMU
    /// `QEMU_CLOCK_VIRTUAL_RT` outside icount).
    VirtualRt,
}

impl ClockType {
    /// Every clock type, in the order QEMU runs their timer lists
    /// (`timerlistgroup_run_timers`).
    pub const ALL: [ClockType; 4] = [
        ClockType::Realtime,
        ClockType::Virtual,
        ClockType::Host,
        ClockType::VirtualRt,
    ];

    /// Index into per-clock arrays; the QEMU enum value.
    #[inline]
    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

/// Converts a [`Duration`] to nanoseconds, saturating at `u64::MAX` (about 584 years).
#[inline]
pub(crate) fn duration_to_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The largest reading any clock returns. `u64::MAX` itself is kept for "never": a timer
/// whose deadline saturated there is pending but can never come due, and an empty list can
/// advertise its head as `u64::MAX` without being mistaken for a due timer.
pub(crate) const MAX_READING: u64 = u64::MAX - 1;

/// Nanoseconds of the monotonic clock since this process's timer epoch.
///
/// The epoch is fixed the first time any timer code reads the clock, so readings start near
/// zero and `u64` nanoseconds last about 584 years.
pub fn realtime_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    duration_to_ns(Instant::now().saturating_duration_since(epoch)).min(MAX_READING)
}

/// Nanoseconds of the wall clock since the Unix epoch; 0 if the system time is set before it.
pub fn host_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, duration_to_ns)
        .min(MAX_READING)
}

/// Where a timer list reads its time from.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// [`realtime_ns`].
    Monotonic,
    /// [`host_ns`].
    Wall,
    /// A program-driven clock.
    Manual(VirtualClock),
}

impl Source {
    /// The current reading in nanoseconds.
    #[inline]
    pub(crate) fn now_ns(&self) -> u64 {
        match self {
            Source::Monotonic => realtime_ns(),
            Source::Wall => host_ns(),
            Source::Manual(vc) => vc.now_ns(),
        }
    }

    /// Whether timers of clock type `ty` reading this source may run: only a
    /// [`ClockType::Virtual`] list on a disabled [`VirtualClock`] may not.
    #[inline]
    pub(crate) fn is_enabled_for(&self, ty: ClockType) -> bool {
        match (self, ty) {
            (Source::Manual(vc), ClockType::Virtual) => vc.is_enabled(),
            _ => true,
        }
    }
}

/// The four clocks of one timer-list group (one event loop), readable from any thread: what
/// [`Timer::now_ns`](crate::Timer::now_ns) and the group's deadlines read, without a timer.
///
/// Made by [`TimerListGroup::clocks`](crate::TimerListGroup::clocks),
/// [`GroupHandle::clocks`](crate::GroupHandle::clocks) or
/// [`GroupBuilder::clocks`](crate::GroupBuilder::clocks). It holds the clocks themselves, not
/// the group: it stays readable after the group is gone. `Clone + Send + Sync`; clones read the
/// same clocks.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use timers::{ClockType, TimerListGroup, VirtualClock};
///
/// let clock = VirtualClock::new();
/// let group = TimerListGroup::builder().virtual_clock(clock.clone()).build(Arc::new(|| ()));
/// let clocks = group.clocks();
/// clock.advance(Duration::from_micros(3));
/// let seen = std::thread::spawn(move || clocks.now_ns(ClockType::Virtual)).join().unwrap();
/// assert_eq!(seen, 3_000);
/// ```
#[derive(Clone)]
pub struct Clocks {
    /// Indexed by [`ClockType::index`].
    sources: [Source; 4],
}

impl Clocks {
    pub(crate) fn new(sources: [Source; 4]) -> Self {
        Clocks { sources }
    }

    /// The current reading of `clock` in nanoseconds (QEMU `qemu_clock_get_ns`), on the same
    /// scale as [`Timer::arm_ns`](crate::Timer::arm_ns)'s deadlines for a timer on `clock`.
    #[inline]
    pub fn now_ns(&self, clock: ClockType) -> u64 {
        self.sources[clock.index()].now_ns()
    }

    /// Whether timers on `clock` may run: false only for [`ClockType::Virtual`] while its
    /// [`VirtualClock`] is disabled.
    pub fn is_enabled(&self, clock: ClockType) -> bool {
        self.sources[clock.index()].is_enabled_for(clock)
    }

    /// The program-driven clock behind `clock`, if it has one: always for
    /// [`ClockType::Virtual`] and [`ClockType::VirtualRt`] (by default
    /// [`VirtualClock::global`]), and for any clock type replaced with
    /// [`GroupBuilder::manual_clock`](crate::GroupBuilder::manual_clock).
    pub fn virtual_clock(&self, clock: ClockType) -> Option<&VirtualClock> {
        match &self.sources[clock.index()] {
            Source::Manual(vc) => Some(vc),
            Source::Monotonic | Source::Wall => None,
        }
    }
}

impl fmt::Debug for Clocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Clocks");
        for ty in ClockType::ALL {
            let name = match ty {
                ClockType::Realtime => "realtime_ns",
                ClockType::Virtual => "virtual_ns",
                ClockType::Host => "host_ns",
                ClockType::VirtualRt => "virtual_rt_ns",
            };
            d.field(name, &self.now_ns(ty));
        }
        d.finish()
    }
}

/// A program-driven clock in nanoseconds: QEMU's virtual clock.
///
/// It can be *stopped* (its reading stays put), *started* (it advances with the monotonic clock
/// from where it stood) and *advanced* by any amount, so that tests run timers deterministically
/// without sleeping. Separately, it is *enabled* or *disabled*: while disabled, the
/// [`ClockType::Virtual`] lists that read it report no deadline and run no timers (QEMU
/// `qemu_clock_enable`).
///
/// A new clock reads 0, is stopped and is **enabled**: a timer armed on it fires once
/// [`advance`](Self::advance) (or [`start`](Self::start)) brings the clock to its deadline, with
/// nothing else to switch on. That is QEMU's initial state too (its clocks are created enabled,
/// and the guest's time does not move until the VM runs). A program that models a VM which is
/// not running yet (QEMU disables the virtual clock while the vCPUs are paused) creates it with
/// [`new_disabled`](Self::new_disabled) and calls [`enable`](Self::enable) when the VM starts.
///
/// Clones share one clock. Every timer-list group that reads it is told about changes that
/// can make its timers due: [`enable`](Self::enable) calls the notify callback of every group
/// with a [`ClockType::Virtual`] list on it, and [`advance`](Self::advance) that of every group
/// with an armed timer on it.
///
/// Readings saturate at `u64::MAX - 1` nanoseconds; `u64::MAX` is the "never" deadline.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::time::Duration;
/// use timers::{ClockType, Scale, TimerListGroup, VirtualClock};
///
/// let clock = VirtualClock::new();
/// let group = TimerListGroup::builder().virtual_clock(clock.clone()).build(Arc::new(|| ()));
/// let fired = Arc::new(AtomicU32::new(0));
/// let f = fired.clone();
/// let timer = group.timer(ClockType::Virtual, Scale::MS, move || {
///     f.fetch_add(1, Ordering::Relaxed);
/// });
/// timer.arm(10); // at 10 ms of virtual time
///
/// clock.advance(Duration::from_millis(9));
/// assert!(!group.run_expired());
/// clock.advance(Duration::from_millis(1));
/// assert!(group.run_expired());
/// assert_eq!(fired.load(Ordering::Relaxed), 1);
/// ```
#[derive(Clone)]
pub struct VirtualClock {
    inner: Arc<VirtualInner>,
}

struct VirtualInner {
    time: Mutex<VirtualTime>,
    enabled: AtomicBool,
    /// Timer lists reading this clock, so that enabling and advancing can notify them and
    /// disabling can wait for their runs. Lists are registered and removed by their group.
    lists: Mutex<Vec<Registration>>,
    next_registration: AtomicU64,
}

/// The reading is `base_ns`, plus the monotonic time since `running_since` while running.
#[derive(Debug)]
struct VirtualTime {
    base_ns: u64,
    running_since: Option<Instant>,
}

struct Registration {
    id: u64,
    list: Weak<TimerList>,
}

impl VirtualClock {
    /// A new clock: reads 0, stopped, enabled (its timers run once the clock reaches them).
    pub fn new() -> Self {
        Self::with_enabled(true)
    }

    /// A new clock that reads 0, stopped and **disabled**: its [`ClockType::Virtual`] timers
    /// neither run nor contribute a deadline until [`enable`](Self::enable), as the guest clock
    /// of a VM that is not running (QEMU `qemu_clock_enable(QEMU_CLOCK_VIRTUAL, false)`).
    /// [`ClockType::VirtualRt`] timers on it still run.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use timers::{ClockType, Scale, TimerListGroup, VirtualClock};
    ///
    /// let clock = VirtualClock::new_disabled();
    /// let group = TimerListGroup::builder().virtual_clock(clock.clone()).build(Arc::new(|| ()));
    /// let timer = group.timer(ClockType::Virtual, Scale::NS, || ());
    /// timer.arm(5);
    /// clock.advance(Duration::from_nanos(5));
    /// assert!(!group.run_expired(), "the VM is paused");
    /// clock.enable();
    /// assert!(group.run_expired());
    /// ```
    pub fn new_disabled() -> Self {
        Self::with_enabled(false)
    }

    fn with_enabled(enabled: bool) -> Self {
        VirtualClock {
            inner: Arc::new(VirtualInner {
                time: Mutex::new(VirtualTime {
                    base_ns: 0,
                    running_since: None,
                }),
                enabled: AtomicBool::new(enabled),
                lists: Mutex::new(Vec::new()),
                next_registration: AtomicU64::new(0),
            }),
        }
    }

    /// The process-wide default clock behind [`ClockType::Virtual`] and [`ClockType::VirtualRt`]
    /// of groups built without [`GroupBuilder::virtual_clock`](crate::GroupBuilder::virtual_clock).
    /// Created on first use (at 0, stopped and enabled, like [`VirtualClock::new`]): its time
    /// moves only when the program advances or starts it. Every call returns a handle to the
    /// same clock.
    pub fn global() -> VirtualClock {
        global_clock()
    }

    /// The current reading in nanoseconds.
    pub fn now_ns(&self) -> u64 {
        let t = self.inner.time.lock();
        let running = t
            .running_since
            .map_or(0, |since| duration_to_ns(since.elapsed()));
        t.base_ns.saturating_add(running).min(MAX_READING)
    }

    /// Moves the clock forward by `by` (saturating), running or not, then calls the notify
    /// callback of every group with an armed timer on this clock whose list is enabled, so that
    /// a loop blocked on the old deadline wakes up and runs what became due.
    pub fn advance(&self, by: Duration) {
        self.advance_ns(duration_to_ns(by));
    }

    /// [`advance`](Self::advance) by a number of nanoseconds.
    pub fn advance_ns(&self, ns: u64) {
        {
            let mut t = self.inner.time.lock();
            t.base_ns = t.base_ns.saturating_add(ns).min(MAX_READING);
        }
        for list in self.lists() {
            if list.is_enabled() && list.has_armed() {
                list.notify();
            }
        }
    }

    /// Starts the clock: from now on it advances with the monotonic clock. No effect if running.
    pub fn start(&self) {
        let mut t = self.inner.time.lock();
        if t.running_since.is_none() {
            t.running_since = Some(Instant::now());
        }
    }

    /// Stops the clock at its current reading. No effect if stopped.
    pub fn stop(&self) {
        let mut t = self.inner.time.lock();
        if let Some(since) = t.running_since.take() {
            t.base_ns = t
                .base_ns
                .saturating_add(duration_to_ns(since.elapsed()))
                .min(MAX_READING);
        }
    }

    /// Whether the clock is advancing with the monotonic clock.
    pub fn is_running(&self) -> bool {
        self.inner.time.lock().running_since.is_some()
    }

    /// Whether [`ClockType::Virtual`] timers on this clock may run.
    pub fn is_enabled(&self) -> bool {
        // Pairs with the stores in `enable`/`disable`; the list mutex orders it against runs
        // (see `disable`), so nothing stronger is needed here.
        self.inner.enabled.load(Ordering::Acquire)
    }

    /// Enables the clock for [`ClockType::Virtual`] lists and, if it was disabled, calls the
    /// notify callback of every group with such a list on it, so that their loops recompute
    /// their deadlines (QEMU `qemu_clock_enable(..., true)`).
    pub fn enable(&self) {
        if !self.inner.enabled.swap(true, Ordering::AcqRel) {
            for list in self.lists() {
                if list.clock() == ClockType::Virtual {
                    list.notify();
                }
            }
        }
    }

    /// Disables the clock for [`ClockType::Virtual`] lists: from now on they report no deadline
    /// and start no timer callback. Before returning, waits until no such callback is running on
    /// another thread (QEMU `qemu_clock_enable(..., false)` waits the same way).
    ///
    /// Unlike QEMU, calling it from a callback of this clock does not deadlock: a run on the
    /// calling thread itself is not waited for, and that run stops before its next timer.
    pub fn disable(&self) {
        if self.inner.enabled.swap(false, Ordering::AcqRel) {
            for list in self.lists() {
                if list.clock() == ClockType::Virtual {
                    list.wait_until_idle();
                }
            }
        }
    }

    /// Registers `list` to hear about this clock's changes; returns the key for
    /// [`unregister`](Self::unregister).
    pub(crate) fn register(&self, list: &Arc<TimerList>) -> u64 {
        let id = self.inner.next_registration.fetch_add(1, Ordering::Relaxed);
        self.inner.lists.lock().push(Registration {
            id,
            list: Arc::downgrade(list),
        });
        id
    }

    /// Forgets the registration `id` (the group is going away).
    pub(crate) fn unregister(&self, id: u64) {
        self.inner.lists.lock().retain(|r| r.id != id);
    }

    /// The registered lists that still exist. Collected first so that no user callback (notify)
    /// and no wait runs under the registry lock: a notify callback may well build a new group
    /// on this clock.
    fn lists(&self) -> Vec<Arc<TimerList>> {
        self.inner
            .lists
            .lock()
            .iter()
            .filter_map(|r| r.list.upgrade())
            .collect()
    }
}

process_global!(fn global_clock() -> VirtualClock = VirtualClock::new());

impl Default for VirtualClock {
    fn default() -> Self {
        VirtualClock::new()
    }
}

impl fmt::Debug for VirtualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtualClock")
            .field("now_ns", &self.now_ns())
            .field("running", &self.is_running())
            .field("enabled", &self.is_enabled())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_clock_starts_stopped_enabled_at_zero() {
        let c = VirtualClock::new();
        assert_eq!(c.now_ns(), 0);
        assert!(!c.is_running());
        assert!(c.is_enabled());
        assert!(VirtualClock::default().is_enabled());
        let d = VirtualClock::new_disabled();
        assert_eq!(d.now_ns(), 0);
        assert!(!d.is_running());
        assert!(!d.is_enabled());
    }

    #[test]
    fn advance_saturates_below_never() {
        let c = VirtualClock::new();
        c.advance_ns(u64::MAX - 10);
        c.advance(Duration::MAX);
        assert_eq!(c.now_ns(), MAX_READING);
    }

    #[test]
    fn stopped_clock_keeps_its_reading_and_started_one_moves() {
        let c = VirtualClock::new();
        c.advance_ns(5);
        c.start();
        c.start();
        let t0 = c.now_ns();
        assert!(t0 >= 5);
        // The monotonic clock moves within nanoseconds; spin rather than sleep.
        while c.now_ns() == t0 {
            std::hint::spin_loop();
        }
        c.stop();
        let frozen = c.now_ns();
        assert!(frozen > t0);
        assert_eq!(c.now_ns(), frozen);
    }

    #[test]
    fn clones_share_the_clock_and_global_is_one_clock() {
        let a = VirtualClock::new();
        let b = a.clone();
        a.advance_ns(7);
        assert_eq!(b.now_ns(), 7);
        assert!(Arc::ptr_eq(
            &VirtualClock::global().inner,
            &VirtualClock::global().inner
        ));
    }

    #[test]
    fn duration_conversion_saturates() {
        assert_eq!(duration_to_ns(Duration::from_nanos(3)), 3);
        assert_eq!(duration_to_ns(Duration::MAX), u64::MAX);
    }

    #[test]
    fn realtime_is_monotonic() {
        let a = realtime_ns();
        let b = realtime_ns();
        assert!(b >= a);
        assert!(host_ns() > 1_500_000_000 * 1_000_000_000);
    }
}
