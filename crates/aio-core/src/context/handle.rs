//! [`ContextHandle`], a context's thread-safe face: scheduling BHs, registering handlers and
//! timers, setting parameters and waking the loop from any thread, all through the
//! context's [`Shared`].

use super::handlers::{disable_external, enable_external};
use super::poll_mode::set_poll_params;
use super::{AioContext, NotDisabledError, Shared, set_max_batch};
use crate::RemoteFdHandler;
use crate::bh::{self, BottomHalf, RunningBh};
use crate::event_notifier::EventNotifier;
use crate::handler::RemoteHandlerBuilder;
use crate::polling::PollParams;
use crate::remote::ContextGone;
use crate::scope;
use crate::sync::{self, Arc, Ordering};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, RawFd};
use timers::{ClockType, Clocks, Scale, Timer, TimerAttrs};

/// A thread-safe handle to a context: schedules work on it and wakes it from any thread.
///
/// It keeps the shared part of the context (its BH list and wake-up state) alive but not the
/// loop itself: after the last [`AioContext`] is dropped, BHs scheduled through a handle never
/// run and are freed at once. See [`is_alive`](Self::is_alive).
#[derive(Clone)]
pub struct ContextHandle {
    pub(crate) shared: Arc<Shared>,
}

impl ContextHandle {
    /// Wakes the context (QEMU `aio_notify`): a sleeping `poll` returns (without progress),
    /// and a `poll` about to sleep does not. Costs no system call unless the loop is asleep or
    /// about to be.
    pub fn notify(&self) {
        self.shared.notify();
    }

    /// Wakes the loop after something it will look at changed, as a BH schedule does: no
    /// system call from the home thread outside its blocking window (see
    /// `Shared::wake_for_work`).
    pub(crate) fn wake_for_work(&self) {
        self.shared.wake_for_work();
    }

    /// Runs `f` once on the context's thread, on its next iteration, waking it if needed
    /// (QEMU `aio_bh_schedule_oneshot`).
    pub fn schedule_oneshot(&self, f: impl FnOnce() + Send + 'static) {
        bh::schedule_oneshot(&self.shared, bh::oneshot_callback(f), scope::ROOT);
    }

    /// Creates a bottom half on the context from any thread (QEMU `aio_bh_new`).
    pub fn bh(&self, f: impl FnMut() + Send + 'static) -> BottomHalf {
        BottomHalf::new(self.shared.clone(), bh::plain_callback(f), scope::ROOT)
    }

    /// As [`AioContext::bh_with_self`], from any thread.
    pub fn bh_with_self(&self, f: impl FnMut(&RunningBh<'_>) + Send + 'static) -> BottomHalf {
        BottomHalf::new(self.shared.clone(), Box::new(f), scope::ROOT)
    }

    /// As [`AioContext::bh_any_scope`], from any thread: a BH that runs in every isolation
    /// scope, for a dispatcher that filters its own work.
    pub fn bh_any_scope(&self, f: impl FnMut(&RunningBh<'_>) + Send + 'static) -> BottomHalf {
        BottomHalf::new(self.shared.clone(), Box::new(f), scope::ANY)
    }

    /// As [`AioContext::set_poll_params`], from any thread.
    ///
    /// # Errors
    ///
    /// As [`AioContext::set_poll_params`].
    pub fn set_poll_params(&self, params: PollParams) -> io::Result<()> {
        set_poll_params(&self.shared, params)
    }

    /// The adaptive-polling parameters last set.
    pub fn poll_params(&self) -> PollParams {
        self.shared.poll_params.get()
    }

    /// As [`AioContext::set_max_batch`], from any thread.
    ///
    /// # Errors
    ///
    /// As [`AioContext::set_max_batch`].
    pub fn set_max_batch(&self, max_batch: u32) -> io::Result<()> {
        set_max_batch(&self.shared, max_batch)
    }

    /// The `aio-max-batch` last set (0: each engine's default).
    pub fn max_batch(&self) -> u32 {
        // Relaxed: a setting with nothing else to publish.
        self.shared.max_batch.load(Ordering::Relaxed)
    }

    /// How many times `notify` has written the context's eventfd, from any thread: the only
    /// system call a remote wake-up can cost.
    pub fn event_writes(&self) -> u64 {
        self.shared.event_writes.load(Ordering::Relaxed)
    }

    /// Whether the context's loop still exists (some [`AioContext`] clone is alive). Once it
    /// is gone, scheduled BHs are freed without running.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Relaxed)
    }

    /// Starts registering a handler for `fd` from any thread, with `Send` callbacks. See
    /// [`RemoteHandlerBuilder`]; [`AioContext::fd_handler`] is the home thread's way.
    ///
    /// As there, the handler takes `fd` (so it must be `Send` to reach the home thread), and
    /// drops it on the home thread once it is removed and the backend no longer watches it.
    pub fn fd_handler(&self, fd: impl AsFd + Send + 'static) -> RemoteHandlerBuilder {
        RemoteHandlerBuilder::owning(self.clone(), fd)
    }

    /// [`fd_handler`](Self::fd_handler) for a raw fd number, from any thread: as
    /// [`AioContext::fd_handler_raw`]. A number that is not an open fd is refused with
    /// `EBADF` by [`register`](RemoteHandlerBuilder::register).
    ///
    /// # Safety
    ///
    /// `fd` must stay open, naming the same open file, from `register` until the home thread
    /// has applied the handler's removal (ARCHITECTURE.md, [FD-1] in "Raw fds"; see
    /// [`AioContext::fd_handler_raw`]), kept open by the caller itself, not by another handler
    /// that owns it. A removal from another thread ([`RemoteFdHandler`] dropped or
    /// [`remove`](RemoteFdHandler::remove)d) stops the callbacks at once, but the home thread
    /// takes the number out of the backend only at its next iteration (or when the context is
    /// dropped), and until then the backend, and an outer loop watching the backend's fds, may
    /// still use it: close the fd only after the home thread has iterated since. A caller that
    /// cannot tell should give the fd to [`fd_handler`](Self::fd_handler) instead, which
    /// closes it at exactly that point.
    pub unsafe fn fd_handler_raw(&self, fd: RawFd) -> RemoteHandlerBuilder {
        RemoteHandlerBuilder::new(self.clone(), fd)
    }

    /// As [`AioContext::set_event_notifier`], from any thread, with a `Send` callback (which
    /// runs on the home thread). Waits for the home thread as
    /// [`RemoteHandlerBuilder::register`] does.
    ///
    /// # Errors
    ///
    /// As [`AioContext::set_event_notifier`], plus [`ContextGone`] if the loop is gone.
    pub fn set_event_notifier(
        &self,
        notifier: &Arc<EventNotifier>,
        read: impl FnMut(&EventNotifier) + Send + 'static,
    ) -> io::Result<RemoteFdHandler> {
        crate::handler::register_remote_notifier(self, notifier, read)
    }

    /// Creates a timer on the context from any thread (QEMU `aio_timer_new`); see
    /// [`AioContext::timer`]. The callback runs on the home thread. [`Timer`] is
    /// `Send + Sync`: arm, cancel and drop it on any thread; arming it earlier than every
    /// other timer of its clock wakes the loop.
    ///
    /// # Errors
    ///
    /// [`ContextGone`] (kind `BrokenPipe`) if the loop is gone; the callback is dropped. A
    /// timer made just before the loop goes becomes inert with it, as every timer of the
    /// context does.
    pub fn timer(
        &self,
        clock: ClockType,
        scale: Scale,
        callback: impl FnMut() + Send + 'static,
    ) -> io::Result<Timer> {
        self.timer_with_attrs(clock, scale, TimerAttrs::empty(), callback)
    }

    /// As [`timer`](Self::timer), with attributes (QEMU `aio_timer_new_with_attrs`).
    ///
    /// # Errors
    ///
    /// As [`timer`](Self::timer).
    pub fn timer_with_attrs(
        &self,
        clock: ClockType,
        scale: Scale,
        attrs: TimerAttrs,
        callback: impl FnMut() + Send + 'static,
    ) -> io::Result<Timer> {
        // Clone the lists out so that the timer is created without holding the lock.
        let group = sync::lock(&self.shared.timers).clone();
        match group {
            Some(group) => Ok(group.timer_with_attrs(clock, scale, attrs, callback)),
            None => Err(ContextGone.into()),
        }
    }

    /// The current reading of `clock` as the context's timers see it, in nanoseconds, from any
    /// thread (QEMU `qemu_clock_get_ns`): what [`Timer::now_ns`] gives for a timer of the
    /// context on `clock`, so an absolute deadline for [`Timer::arm_ns`] can be computed
    /// without a timer. The virtual clocks are the context's own (the [`VirtualClock`] given to
    /// its builder, or [`VirtualClock::global`]). Works after the loop is gone.
    ///
    /// [`VirtualClock`]: timers::VirtualClock
    /// [`VirtualClock::global`]: timers::VirtualClock::global
    ///
    /// ```
    /// use aio_core::{AioContext, ClockType, Scale};
    ///
    /// let ctx = AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// let handle = ctx.handle();
    /// let (timer, deadline) = std::thread::spawn(move || {
    ///     // Due 1 ms from now on the context's realtime clock, computed on this thread.
    ///     let deadline = handle.now_ns(ClockType::Realtime) + 1_000_000;
    ///     let timer = handle.timer(ClockType::Realtime, Scale::NS, || ()).unwrap();
    ///     timer.arm_ns(deadline);
    ///     (timer, deadline)
    /// })
    /// .join()
    /// .unwrap();
    /// while timer.is_pending() {
    ///     ctx.poll(); // sleeps until the deadline
    /// }
    /// assert!(ctx.now_ns(ClockType::Realtime) >= deadline);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn now_ns(&self, clock: ClockType) -> u64 {
        self.shared.clocks.now_ns(clock)
    }

    /// The context's clocks, a `Clone + Send + Sync` value that reads them without a handle
    /// (see [`Clocks`]).
    pub fn clocks(&self) -> Clocks {
        self.shared.clocks.clone()
    }

    /// As [`AioContext::disable_external`], from any thread. Once it returns, no external
    /// handler's callback starts whose dispatch check comes after it (the home thread reads
    /// the count, an atomic, right before dispatching each external handler); one already
    /// running finishes. The fds leave the monitor at the loop's next iteration.
    pub fn disable_external(&self) {
        disable_external(&self.shared);
    }

    /// As [`AioContext::enable_external`], from any thread; the last one wakes the loop.
    ///
    /// # Errors
    ///
    /// [`NotDisabledError`] if external handlers are not disabled; nothing changes then.
    pub fn enable_external(&self) -> Result<(), NotDisabledError> {
        enable_external(&self.shared)
    }

    /// Whether external handlers are disabled.
    pub fn is_external_disabled(&self) -> bool {
        // Relaxed: a snapshot for the caller; other threads may change it at any time.
        self.shared.external_disabled.load(Ordering::Relaxed) > 0
    }

    /// Whether `other` refers to the same context.
    pub fn same_context(&self, other: &ContextHandle) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Whether this is the handle of `ctx`.
    pub fn is_handle_of(&self, ctx: &AioContext) -> bool {
        Arc::ptr_eq(&self.shared, &ctx.inner.shared)
    }
}

impl fmt::Debug for ContextHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContextHandle").finish_non_exhaustive()
    }
}
