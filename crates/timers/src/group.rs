//! Timer-list groups: one timer list per clock for one event loop, the earliest deadline the
//! loop sleeps until, and the run of expired timers after each wait.
//!
//! C original: `QEMUTimerListGroup`, `timerlistgroup_init`, `timerlistgroup_deadline_ns`,
//! `timerlistgroup_run_timers` and `timerlistgroup_deinit` in `util/qemu-timer.c`; an
//! `AioContext` owns one group (`ctx->tlg`).

use std::fmt;
use std::time::Duration;

use crate::clock::{ClockType, Clocks, Source, VirtualClock};
use crate::list::{Notify, TimerList};
use crate::sync::{Arc, AtomicU32, Ordering};
use crate::timer::{Scale, Timer, TimerAttrs};

/// One timer list per [`ClockType`], owned by one event loop (QEMU `QEMUTimerListGroup`).
///
/// The loop that owns the group, each iteration:
///
/// 1. asks [`deadline`](Self::deadline) for the time until the earliest timer of an enabled
///    clock and caps its OS wait with it (nanosecond precision, no rounding);
/// 2. after dispatching I/O, calls [`run_expired`](Self::run_expired).
///
/// Meanwhile any thread may arm timers. Arming a timer so that it becomes the earliest of its
/// list calls the `notify` callback given at construction, which must wake the loop (QEMU
/// `aio_notify`); nothing else in the group calls it, except [`VirtualClock`] changes described
/// there. Cancelling never notifies.
///
/// # Dropping
///
/// Dropping the group drops every timer callback without running it, and every
/// [`Timer`] of the group becomes inert: arming it is a harmless no-op. Nothing leaks, including
/// callbacks that hold their own `Timer`.
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
/// let wakeups = Arc::new(AtomicU32::new(0));
/// let w = wakeups.clone();
/// let group = TimerListGroup::builder()
///     .virtual_clock(clock.clone())
///     .build(Arc::new(move || { w.fetch_add(1, Ordering::Relaxed); }));
///
/// let timer = group.timer(ClockType::Virtual, Scale::US, || println!("fired"));
/// timer.arm(500);
/// assert_eq!(wakeups.load(Ordering::Relaxed), 1); // it became the head
/// assert_eq!(group.deadline(), Some(Duration::from_micros(500)));
///
/// clock.advance(Duration::from_micros(500));
/// assert!(group.run_expired());
/// assert_eq!(group.deadline(), None);
/// ```
pub struct TimerListGroup {
    /// Indexed by [`ClockType::index`].
    lists: [Arc<TimerList>; 4],
    /// One bit per list, set while that list has something queued: a loop iteration with no
    /// timer armed anywhere (the common case) costs `run_expired` and `deadline_ns` one load.
    armed: Arc<AtomicU32>,
    /// Lists registered with virtual clocks, to unregister on drop.
    registrations: Vec<(VirtualClock, u64)>,
}

/// Chooses the clocks behind a [`TimerListGroup`]; made by [`TimerListGroup::builder`].
///
/// By default [`ClockType::Realtime`] is the monotonic clock, [`ClockType::Host`] the wall
/// clock, and [`ClockType::Virtual`] and [`ClockType::VirtualRt`] read
/// [`VirtualClock::global`]. Tests inject their own [`VirtualClock`] to drive time.
#[derive(Debug, Clone, Default)]
pub struct GroupBuilder {
    manual: [Option<VirtualClock>; 4],
    #[cfg(aio_loom)]
    variant: crate::list::LoomVariant,
}

impl GroupBuilder {
    /// A builder with the default clocks.
    pub fn new() -> Self {
        GroupBuilder::default()
    }

    /// Reads [`ClockType::Virtual`] and [`ClockType::VirtualRt`] from `clock`.
    pub fn virtual_clock(self, clock: VirtualClock) -> Self {
        self.manual_clock(ClockType::Virtual, clock.clone())
            .manual_clock(ClockType::VirtualRt, clock)
    }

    /// Reads the clock type `ty` from the program-driven `clock`, whatever `ty` is: for
    /// example, `manual_clock(ClockType::Realtime, clock)` runs code written for real time on
    /// time a test controls. Only a [`ClockType::Virtual`] list obeys the clock's enabled flag.
    pub fn manual_clock(mut self, ty: ClockType, clock: VirtualClock) -> Self {
        self.manual[ty.index()] = Some(clock);
        self
    }

    /// Loom only: the group's lists run `variant` of the arm protocol.
    #[cfg(aio_loom)]
    #[doc(hidden)]
    pub fn loom_variant(mut self, variant: crate::list::LoomVariant) -> Self {
        self.variant = variant;
        self
    }

    /// The clocks that groups built by this builder read, to read them before (or without)
    /// building a group: the same clocks [`TimerListGroup::clocks`] gives.
    pub fn clocks(&self) -> Clocks {
        Clocks::new(ClockType::ALL.map(|ty| self.source(ty)))
    }

    /// Where the lists of clock type `ty` read their time.
    fn source(&self, ty: ClockType) -> Source {
        match &self.manual[ty.index()] {
            Some(clock) => Source::Manual(clock.clone()),
            None => match ty {
                ClockType::Realtime => Source::Monotonic,
                ClockType::Host => Source::Wall,
                ClockType::Virtual | ClockType::VirtualRt => Source::Manual(VirtualClock::global()),
            },
        }
    }

    /// Builds the group. `notify` wakes the loop that owns it; see [`TimerListGroup`]. It may be
    /// called from any thread, must not block, and must not call back into the group.
    pub fn build(self, notify: Notify) -> TimerListGroup {
        let mut registrations = Vec::new();
        let armed = Arc::new(AtomicU32::new(0));
        let lists = ClockType::ALL.map(|ty| {
            let source = self.source(ty);
            let list = TimerList::new(ty, source, notify.clone(), armed.clone());
            #[cfg(aio_loom)]
            let list = list.with_loom_variant(self.variant);
            let list = Arc::new(list);
            if let Source::Manual(clock) = list.source() {
                registrations.push((clock.clone(), clock.register(&list)));
            }
            list
        });
        TimerListGroup {
            lists,
            registrations,
            armed,
        }
    }
}

impl TimerListGroup {
    /// A group on the default clocks (see [`GroupBuilder`]) that calls `notify` to wake its loop.
    pub fn new(notify: Notify) -> Self {
        GroupBuilder::new().build(notify)
    }

    /// A builder, to choose the clocks.
    pub fn builder() -> GroupBuilder {
        GroupBuilder::new()
    }

    /// Creates a disarmed timer on `clock` whose deadlines are in units of `scale`, running
    /// `callback` each time it fires (QEMU `aio_timer_new`, `timer_new_ns`/`_us`/`_ms`).
    ///
    /// The callback runs on the thread that calls [`run_expired`](Self::run_expired), with no
    /// lock held: it may arm, cancel or drop any timer, its own included, and create timers.
    pub fn timer(
        &self,
        clock: ClockType,
        scale: Scale,
        callback: impl FnMut() + Send + 'static,
    ) -> Timer {
        self.timer_with_attrs(clock, scale, TimerAttrs::empty(), callback)
    }

    /// [`timer`](Self::timer) with attributes (QEMU `aio_timer_new_with_attrs`).
    pub fn timer_with_attrs(
        &self,
        clock: ClockType,
        scale: Scale,
        attrs: TimerAttrs,
        callback: impl FnMut() + Send + 'static,
    ) -> Timer {
        new_timer(&self.lists, clock, scale, attrs, None, Box::new(callback))
    }

    /// A `Send + Sync` handle that creates timers on this group from any thread (QEMU's
    /// `timer_new` needs no lock on the loop). It does not keep the group alive: once the group
    /// is dropped, the timers it creates are inert (their callbacks are dropped at once, arming
    /// them does nothing).
    pub fn handle(&self) -> GroupHandle {
        GroupHandle {
            lists: self.lists.clone(),
        }
    }

    /// Time from now until the earliest deadline among the enabled clocks' timers
    /// (`Duration::ZERO` if one is already due), or `None` if no enabled clock has a timer that
    /// can ever fire: the loop may then sleep until notified (QEMU `timerlistgroup_deadline_ns`,
    /// with `None` for its -1).
    ///
    /// Allocation-free and without taking any timer-list lock: one atomic load per clock, plus a
    /// reading of each clock that has a timer armed (a [`VirtualClock`] reading takes that
    /// clock's own small lock).
    #[inline]
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline_ns().map(Duration::from_nanos)
    }

    /// [`deadline`](Self::deadline) in nanoseconds.
    #[inline]
    pub fn deadline_ns(&self) -> Option<u64> {
        // Acquire pairs with the lists' Release updates of the mask (`publish_head`).
        if self.armed.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.lists
            .iter()
            .filter_map(|list| list.deadline_ns())
            .min()
    }

    /// Runs the callbacks of every due timer of every enabled clock; returns whether any ran
    /// (QEMU `timerlistgroup_run_timers`).
    ///
    /// Clocks are visited in [`ClockType::ALL`] order. Each clock is read once, on entry to its
    /// list, and its timers due at that reading run in deadline order, equal deadlines in
    /// arming order. Each timer is disarmed just before its callback runs, and no lock is held
    /// during a callback. A timer due exactly at the reading runs. A timer armed, by a callback
    /// or by another thread, at or before the reading also runs in this call, after those
    /// already due ahead of it; one armed later waits for a later call.
    ///
    /// # Livelock
    ///
    /// A callback that re-arms its own timer at or before the clock reading (for example at
    /// `now()` on a stopped virtual clock, or at a fixed past deadline) runs again within the
    /// same call, as in QEMU, and does so for as long as it keeps re-arming that way: the call
    /// does not return. Periodic timers must re-arm at `now + period` with a non-zero period.
    ///
    /// # Re-entrancy and panics
    ///
    /// A callback may call `run_expired` again (a nested loop iteration); the nested call runs
    /// the other due timers, and a timer whose callback is still running further up the stack
    /// is run by the outer call once that callback returns. Only one thread may run a group at a
    /// time. If a callback panics, the panic propagates out of `run_expired` after the group is
    /// put back in order: the panicking timer stays usable, disarmed unless it re-armed itself.
    #[inline]
    pub fn run_expired(&self) -> bool {
        self.run_expired_count() > 0
    }

    /// [`run_expired`](Self::run_expired), returning how many timer callbacks ran.
    #[inline]
    pub fn run_expired_count(&self) -> u64 {
        // Acquire pairs with the lists' Release updates of the mask (`publish_head`).
        if self.armed.load(Ordering::Acquire) == 0 {
            return 0;
        }
        self.lists.iter().map(|list| list.run_expired()).sum()
    }

    /// Makes `scope` the innermost isolation scope of the loop that runs this group (for
    /// `aio_core::AioContext::isolated`; 0 is the root). A timer belongs to the scope that was
    /// innermost when this group created it (timers made through a [`GroupHandle`] belong to
    /// scope 0); while `scope` is innermost, armed timers of lower scopes are held: out of the
    /// deadline and never run, keeping their deadlines, until a later call lowers `scope`
    /// again. Call it on the thread that runs the group.
    pub fn set_scope(&self, scope: u64) {
        for list in &self.lists {
            list.set_scope(scope);
        }
    }

    /// The current reading of `clock` as this group sees it, in nanoseconds (QEMU
    /// `qemu_clock_get_ns`).
    pub fn now_ns(&self, clock: ClockType) -> u64 {
        self.lists[clock.index()].now_ns()
    }

    /// Whether timers on `clock` may run in this group: false only for
    /// [`ClockType::Virtual`] while its [`VirtualClock`] is disabled.
    pub fn is_enabled(&self, clock: ClockType) -> bool {
        self.lists[clock.index()].is_enabled()
    }

    /// The group's clocks, to read from any thread (see [`Clocks`]).
    pub fn clocks(&self) -> Clocks {
        clocks_of(&self.lists)
    }

    /// How many timers of this group exist (armed or not).
    pub fn timer_count(&self) -> usize {
        self.lists.iter().map(|l| l.counts().0).sum()
    }

    /// How many timers of this group are armed.
    pub fn armed_count(&self) -> usize {
        self.lists.iter().map(|l| l.counts().1).sum()
    }
}

impl Drop for TimerListGroup {
    fn drop(&mut self) {
        for (clock, id) in self.registrations.drain(..) {
            clock.unregister(id);
        }
        let mut armed = 0;
        for list in &self.lists {
            // Dropped here, outside the list's lock: a callback may own a `Timer` of this group.
            let (n, callbacks) = list.kill();
            armed += n;
            drop(callbacks);
        }
        if armed > 0 {
            tracing::debug!(
                armed,
                "timer list group dropped with armed timers; none will run"
            );
        }
    }
}

/// Creates timers on a [`TimerListGroup`] from any thread; made by
/// [`TimerListGroup::handle`]. Cloning it is cheap.
///
/// It holds the group's lists, not the group: after the group is dropped, [`timer`](Self::timer)
/// still returns a [`Timer`], but an inert one, and the callback is dropped before it returns.
/// [`is_alive`](Self::is_alive) tells, though a group may go away right after it answered.
#[derive(Clone)]
pub struct GroupHandle {
    lists: [Arc<TimerList>; 4],
}

impl GroupHandle {
    /// As [`TimerListGroup::timer`], from any thread.
    pub fn timer(
        &self,
        clock: ClockType,
        scale: Scale,
        callback: impl FnMut() + Send + 'static,
    ) -> Timer {
        self.timer_with_attrs(clock, scale, TimerAttrs::empty(), callback)
    }

    /// As [`TimerListGroup::timer_with_attrs`], from any thread.
    pub fn timer_with_attrs(
        &self,
        clock: ClockType,
        scale: Scale,
        attrs: TimerAttrs,
        callback: impl FnMut() + Send + 'static,
    ) -> Timer {
        // Other threads' timers belong to the root isolation scope.
        new_timer(
            &self.lists,
            clock,
            scale,
            attrs,
            Some(0),
            Box::new(callback),
        )
    }

    /// Whether the group still exists (its timers can fire).
    pub fn is_alive(&self) -> bool {
        self.lists[0].is_alive()
    }

    /// As [`TimerListGroup::now_ns`], from any thread; the clocks stay readable after the group
    /// is gone.
    pub fn now_ns(&self, clock: ClockType) -> u64 {
        self.lists[clock.index()].now_ns()
    }

    /// As [`TimerListGroup::clocks`], from any thread.
    pub fn clocks(&self) -> Clocks {
        clocks_of(&self.lists)
    }
}

/// The clocks that `lists` read.
fn clocks_of(lists: &[Arc<TimerList>; 4]) -> Clocks {
    Clocks::new(lists.each_ref().map(|list| list.source().clone()))
}

impl fmt::Debug for GroupHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupHandle")
            .field("alive", &self.is_alive())
            .finish()
    }
}

impl fmt::Debug for TimerListGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerListGroup")
            .field("timers", &self.timer_count())
            .field("armed", &self.armed_count())
            .field("deadline", &self.deadline())
            .finish()
    }
}

/// Creates a disarmed timer on `lists[clock]`, in isolation scope `scope` (`None`: the list's
/// current one): what [`TimerListGroup`] and [`GroupHandle`] both do.
fn new_timer(
    lists: &[Arc<TimerList>; 4],
    clock: ClockType,
    scale: Scale,
    attrs: TimerAttrs,
    scope: Option<u64>,
    callback: crate::list::Callback,
) -> Timer {
    let list = &lists[clock.index()];
    let key = list.insert(callback, scope);
    Timer::new(list.clone(), key, scale, attrs)
}
