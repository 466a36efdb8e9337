//! Timer handles: [`Timer`] (owning, RAII) and [`TimerRef`] (non-owning, for callbacks that
//! re-arm their own timer), with the scale and attribute types they carry.
//!
//! C original: `QEMUTimer` and `timer_mod`, `timer_mod_ns`, `timer_mod_anticipate`,
//! `timer_del`, `timer_pending`, `timer_expired`, `timer_expire_time_ns` in
//! `include/qemu/timer.h`.
//!
//! Both handles are `Send + Sync`: any thread may arm or cancel. Every operation takes the
//! timer list's lock once; none allocates.

use std::fmt;
use std::num::NonZeroU64;
use std::time::Duration;

use bitflags::bitflags;

use crate::clock::{ClockType, duration_to_ns};
use crate::list::{ArmMode, Key, TimerList};
use crate::sync::Arc;

/// The unit of a timer's deadlines: how many nanoseconds one unit is (QEMU `SCALE_*`).
///
/// [`arm`](Timer::arm) multiplies by the scale with saturation: a product past `u64::MAX`
/// becomes `u64::MAX`, the deadline that never comes.
///
/// # Examples
///
/// ```
/// use std::num::NonZeroU64;
/// use timers::Scale;
///
/// assert_eq!(Scale::MS.nanos(), 1_000_000);
/// assert_eq!(Scale::US.to_ns(3), 3_000);
/// assert_eq!(Scale::S.to_ns(u64::MAX), u64::MAX); // saturates
/// let ticks = Scale::custom(NonZeroU64::new(250).unwrap());
/// assert_eq!(ticks.to_ns(4), 1_000);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scale(NonZeroU64);

impl Scale {
    /// Nanoseconds (QEMU `SCALE_NS`).
    pub const NS: Scale = Scale(NonZeroU64::MIN);
    /// Microseconds (QEMU `SCALE_US`).
    pub const US: Scale = Scale(NonZeroU64::new(1_000).unwrap());
    /// Milliseconds (QEMU `SCALE_MS`).
    pub const MS: Scale = Scale(NonZeroU64::new(1_000_000).unwrap());
    /// Seconds (QEMU `NANOSECONDS_PER_SECOND`).
    pub const S: Scale = Scale(NonZeroU64::new(1_000_000_000).unwrap());

    /// A unit of `ns_per_unit` nanoseconds (QEMU lets a timer have any integer scale).
    pub const fn custom(ns_per_unit: NonZeroU64) -> Scale {
        Scale(ns_per_unit)
    }

    /// Nanoseconds per unit.
    pub const fn nanos(self) -> u64 {
        self.0.get()
    }

    /// `units` in nanoseconds, saturating at `u64::MAX`.
    pub const fn to_ns(self, units: u64) -> u64 {
        units.saturating_mul(self.0.get())
    }

    /// Whole units in `ns` nanoseconds (rounded down).
    pub const fn from_ns(self, ns: u64) -> u64 {
        ns / self.0.get()
    }
}

bitflags! {
    /// Attributes of a timer (QEMU `QEMU_TIMER_ATTR_*`). They are recorded for the users of
    /// the loop; the list orders and runs every timer the same way whatever its attributes.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct TimerAttrs: u32 {
        /// The timer drives something outside the guest state (I/O throttling, a network
        /// backend), so record/replay need not checkpoint it (QEMU `QEMU_TIMER_ATTR_EXTERNAL`).
        const EXTERNAL = 1 << 0;
    }
}

/// What both handles hold: the list, the timer's key in it, and its fixed properties.
#[derive(Clone)]
struct Handle {
    list: Arc<TimerList>,
    key: Key,
    scale: Scale,
    attrs: TimerAttrs,
}

impl Handle {
    #[inline]
    fn arm_ns(&self, deadline_ns: u64, mode: ArmMode) {
        self.list.arm(self.key, deadline_ns, mode);
    }

    #[inline]
    fn after_ns(&self, delay: Duration) -> u64 {
        self.list.now_ns().saturating_add(duration_to_ns(delay))
    }

    fn debug(&self, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(name)
            .field("clock", &self.list.clock())
            .field("scale", &self.scale)
            .field("attrs", &self.attrs)
            .field("expire_time_ns", &self.list.expire_time_ns(self.key))
            .finish()
    }
}

/// The operations [`Timer`] and [`TimerRef`] share, documented once for both.
macro_rules! timer_ops {
    ($ty:ident) => {
        impl $ty {
            /// Arms the timer at the absolute time `deadline`, in units of its [`Scale`] on its
            /// clock, replacing any earlier deadline (QEMU `timer_mod`). The product with the
            /// scale saturates at `u64::MAX`, which never comes. A deadline at or before the
            /// clock's current reading fires on the next [`run_expired`]; a timer due exactly
            /// *now* fires.
            ///
            /// If the timer becomes the earliest of its list, the group's notify callback is
            /// called (after the list's lock is released), so that a loop sleeping on a later
            /// deadline wakes up. Re-arming counts as arming anew: among equal deadlines the
            /// timer goes behind those armed before it.
            ///
            /// A no-op once the group is gone (or, for a [`TimerRef`], once the timer is).
            ///
            /// [`run_expired`]: crate::TimerListGroup::run_expired
            #[inline]
            pub fn arm(&self, deadline: u64) {
                let h = &self.handle;
                h.arm_ns(h.scale.to_ns(deadline), ArmMode::Always);
            }

            /// [`arm`](Self::arm) with a deadline in nanoseconds, whatever the scale (QEMU
            /// `timer_mod_ns`).
            #[inline]
            pub fn arm_ns(&self, deadline_ns: u64) {
                self.handle.arm_ns(deadline_ns, ArmMode::Always);
            }

            /// [`arm`](Self::arm) at `delay` from the clock's current reading (saturating).
            #[inline]
            pub fn arm_after(&self, delay: Duration) {
                let h = &self.handle;
                h.arm_ns(h.after_ns(delay), ArmMode::Always);
            }

            /// Arms the timer at `deadline` (in scale units) unless it is already armed at or
            /// before it: a deadline only ever moves earlier (QEMU `timer_mod_anticipate`).
            /// Notifies exactly as [`arm`](Self::arm) does when it changes anything.
            #[inline]
            pub fn arm_if_earlier(&self, deadline: u64) {
                let h = &self.handle;
                h.arm_ns(h.scale.to_ns(deadline), ArmMode::IfEarlier);
            }

            /// [`arm_if_earlier`](Self::arm_if_earlier) in nanoseconds (QEMU
            /// `timer_mod_anticipate_ns`).
            #[inline]
            pub fn arm_if_earlier_ns(&self, deadline_ns: u64) {
                self.handle.arm_ns(deadline_ns, ArmMode::IfEarlier);
            }

            /// Disarms the timer; it will not fire until armed again, even if it is already
            /// due (QEMU `timer_del`). Never notifies: at worst the loop wakes once for
            /// nothing. Cancelling a timer that is not armed does nothing.
            #[inline]
            pub fn cancel(&self) {
                self.handle.list.cancel(self.handle.key);
            }

            /// Whether the timer is armed (QEMU `timer_pending`). A timer stops being armed
            /// just before its callback runs, so a callback sees its own timer disarmed unless
            /// it re-arms it.
            #[inline]
            pub fn is_pending(&self) -> bool {
                self.expire_time_ns().is_some()
            }

            /// The deadline the timer is armed at, in nanoseconds, or `None` if it is not armed
            /// (QEMU `timer_expire_time_ns`, which returns -1 for "not armed").
            #[inline]
            pub fn expire_time_ns(&self) -> Option<u64> {
                self.handle.list.expire_time_ns(self.handle.key)
            }

            /// Whether the timer's deadline is at or before `now` (in scale units, saturating
            /// like [`arm`](Self::arm)): QEMU `timer_expired`. As in QEMU, a timer that is not
            /// armed counts as expired, since no deadline of it lies ahead.
            #[inline]
            pub fn has_expired(&self, now: u64) -> bool {
                let now_ns = self.handle.scale.to_ns(now);
                self.expire_time_ns().is_none_or(|t| t <= now_ns)
            }

            /// The timer's clock reading, in units of its scale (rounded down).
            #[inline]
            pub fn now(&self) -> u64 {
                self.handle.scale.from_ns(self.handle.list.now_ns())
            }

            /// The timer's clock reading in nanoseconds (QEMU `qemu_clock_get_ns`).
            #[inline]
            pub fn now_ns(&self) -> u64 {
                self.handle.list.now_ns()
            }

            /// The clock the timer runs on.
            pub fn clock(&self) -> ClockType {
                self.handle.list.clock()
            }

            /// The unit of [`arm`](Self::arm), [`arm_if_earlier`](Self::arm_if_earlier),
            /// [`has_expired`](Self::has_expired) and [`now`](Self::now).
            pub fn scale(&self) -> Scale {
                self.handle.scale
            }

            /// The attributes the timer was created with.
            pub fn attrs(&self) -> TimerAttrs {
                self.handle.attrs
            }
        }
    };
}

/// A timer: a callback that a [`TimerListGroup`](crate::TimerListGroup) runs once its deadline
/// on the timer's clock has come (QEMU `QEMUTimer`).
///
/// Created disarmed by [`TimerListGroup::timer`](crate::TimerListGroup::timer). Each
/// [`arm`](Self::arm) makes it fire once; to repeat, the callback re-arms it, usually through a
/// [`TimerRef`] from [`handle`](Self::handle).
///
/// Dropping the `Timer` cancels it and frees its callback (after the callback returns, if it is
/// running). Once its group has been dropped, every operation is a no-op and
/// [`is_pending`](Self::is_pending) is `false`: the group dropped the callback already.
///
/// `Send + Sync`: arm and cancel from any thread; the callback itself always runs on the thread
/// that calls [`run_expired`](crate::TimerListGroup::run_expired).
///
/// # Examples
///
/// A periodic timer on a deterministic clock:
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::time::Duration;
/// use timers::{ClockType, Scale, TimerListGroup, TimerRef, VirtualClock};
///
/// let clock = VirtualClock::new();
/// let group = TimerListGroup::builder().virtual_clock(clock.clone()).build(Arc::new(|| ()));
///
/// let ticks = Arc::new(AtomicU32::new(0));
/// let me: Arc<std::sync::OnceLock<TimerRef>> = Arc::default();
/// let (t, m) = (ticks.clone(), me.clone());
/// let timer = group.timer(ClockType::Virtual, Scale::MS, move || {
///     t.fetch_add(1, Ordering::Relaxed);
///     let me = m.get().unwrap();
///     me.arm(me.now() + 10); // every 10 ms
/// });
/// me.set(timer.handle()).unwrap();
/// timer.arm(10);
///
/// for _ in 0..3 {
///     clock.advance(Duration::from_millis(10));
///     group.run_expired();
/// }
/// assert_eq!(ticks.load(Ordering::Relaxed), 3);
/// assert_eq!(timer.expire_time_ns(), Some(40_000_000));
/// ```
pub struct Timer {
    handle: Handle,
}

/// A non-owning handle to a [`Timer`], for the timer's own callback (or anyone else) to arm
/// and cancel it without keeping it alive. Clone it freely.
///
/// While the `Timer` lives, a `TimerRef` does everything the `Timer` does. Once the `Timer` is
/// dropped (or its group is), every operation is a no-op and it reports the timer disarmed; a
/// `TimerRef` never reaches a newer timer that happens to reuse the storage.
///
/// Capturing the owning `Timer` in its own callback would also work, but the callback would then
/// keep its timer alive until the group is dropped; a `TimerRef` breaks that cycle.
#[derive(Clone)]
pub struct TimerRef {
    handle: Handle,
}

timer_ops!(Timer);
timer_ops!(TimerRef);

impl Timer {
    pub(crate) fn new(list: Arc<TimerList>, key: Key, scale: Scale, attrs: TimerAttrs) -> Self {
        Timer {
            handle: Handle {
                list,
                key,
                scale,
                attrs,
            },
        }
    }

    /// A non-owning handle to this timer, e.g. for its callback to re-arm it.
    pub fn handle(&self) -> TimerRef {
        TimerRef {
            handle: self.handle.clone(),
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.handle.list.remove(self.handle.key);
    }
}

impl fmt::Debug for Timer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.handle.debug("Timer", f)
    }
}

impl fmt::Debug for TimerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.handle.debug("TimerRef", f)
    }
}
