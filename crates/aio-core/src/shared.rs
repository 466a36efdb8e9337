//! [`SharedContext`]: a context that several threads take turns running, through an
//! [`RFifoLock`] (QEMU's `aio_context_acquire`/`aio_context_release` of 2013–2023, seed 002;
//! docs/qemu-semantics.md §10). It owns the lock, the guard [`Acquired`], the thread-local
//! stack of held shared contexts ([`SharedContext::current`]), the restricted any-thread
//! handle [`SharedHandle`] and its handler builder [`SharedHandlerBuilder`].
//!
//! # Why a separate type
//!
//! An [`AioContext`] is `!Send`: its loop state is an `Rc` whose handlers may hold `!Send`
//! callbacks that receive `&AioContext`. A `SharedContext` owns its `AioContext` privately and
//! never lends it out: every callback it accepts is `Send` and receives nothing of the
//! context, [`AioContext::current`] is `None` inside its callbacks, and its handle cannot
//! register callbacks that take `&AioContext`. So no `Rc` of the loop, and no `!Send` value,
//! can be kept by user code on one thread while another thread holds the lock: the rule
//! [SHARED-1] in ARCHITECTURE.md, which the one `unsafe impl Send` below cites.
//!
//! # Home thread
//!
//! The holder is the context's home thread: the outermost acquire stores its id in the
//! context's home words (`HomeThread`) and adds the context to the thread's home table
//! (`remote.rs`), and the outermost release undoes both before it unlocks. A handle used by
//! the holder therefore applies operations in place, and one used by any other thread queues
//! them for whoever polls next.

use crate::context::{AioContext, ContextHandle, Stats};
use crate::event_notifier::EventNotifier;
use crate::fdmon::FdMonitor;
use crate::handler::{RemoteFdHandler, RemoteHandlerBuilder};
use crate::polling::PollParams;
use crate::rfifolock::{RFifoLock, RFifoLockGuard};
use crate::sync::{Arc, thread_local};
use crate::{BottomHalf, NotDisabledError, RunningBh};
use std::cell::{Cell, RefCell};
use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::os::fd::AsFd;
use timers::{ClockType, Clocks, GroupBuilder, Scale, Timer, TimerAttrs};

/// The context inside the lock, with the holder's nesting depth.
struct Slot {
    /// `Some` until the last [`SharedContext`] is dropped.
    ctx: Option<AioContext>,
    /// Acquisitions on the stack of the holder (0 when nobody holds the lock); only the
    /// holder touches it.
    depth: Cell<u32>,
}

// The `AioContext` is `!Send` because of the `Rc`s, `RefCell`s and `Cell`s of its loop state and
// the `!Send` values those could hold. [SHARED-1]: it is touched only by the thread holding the
// lock (or by the last owner, exclusively, at drop), each hand-off is ordered by the lock's
// release/acquire, no clone of its `Rc` (nor any `Rc`, `Weak` or `RefCell` inside it) is ever
// left outside it when the lock is released, and every callback it can hold is `Send` (the
// only way in is `SharedHandle`/`Acquired`, whose methods require `Send`).
// SAFETY: [SHARED-1], as listed in ARCHITECTURE.md ("SharedContext").
unsafe impl Send for Slot {}

/// What the clones of a [`SharedContext`] share.
struct Core {
    lock: RFifoLock<Slot>,
    /// The context's thread-safe side: notify, and the handle's operations.
    handle: ContextHandle,
}

impl Drop for Core {
    fn drop(&mut self) {
        // A guard that was leaked (`mem::forget`) on another thread keeps the lock for good.
        // That thread's `HELD` and `HOMES` entries keep clones, so this can only be reached
        // once they are gone (it exited, or is exiting and may still drop its home table's
        // `Weak` of the loop): dropping the loop here could touch its counts from two threads.
        // Leak the loop instead ([SHARED-1]).
        let held_elsewhere = self.lock.is_locked() && !self.lock.is_owned_by_current_thread();
        let slot = self.lock.get_mut();
        let Some(ctx) = slot.ctx.take() else {
            return;
        };
        if held_elsewhere {
            std::mem::forget(ctx);
            return;
        }
        if slot.depth.get() == 0 {
            // Exclusive now: this thread becomes the home for the drop, so that what the
            // callbacks' drops do (schedule a BH, drop a handler) takes the home thread's paths.
            ctx.enter_home(None);
        }
        drop(ctx);
    }
}

thread_local! {
    /// The shared contexts this thread holds, innermost last: an entry per acquire (removed by
    /// that guard's release) and per poll (removed when the poll returns); see
    /// [`SharedContext::current`]. (Not a `const` initializer: loom's `thread_local!` does not
    /// accept one.)
    #[allow(clippy::missing_const_for_thread_local)]
    static HELD: RefCell<Held> = RefCell::new(Held {
        next: 0,
        entries: Vec::new(),
    });
}

/// This thread's stack of held shared contexts. Each entry carries a token naming the guard
/// or poll that pushed it, so that a release removes its own entry even when guards are
/// released out of order (removing "the innermost entry of that context" would remove a
/// later guard's, or a running poll's, and `current` would then name the wrong context).
struct Held {
    /// The last token given (tokens start at 1; 0 means "not pushed").
    next: u64,
    entries: Vec<(u64, SharedContext)>,
}

/// An entry of this thread's `HELD` stack, removed when dropped (unwinding included).
struct HeldEntry(u64);

impl HeldEntry {
    fn push(shared: &SharedContext) -> HeldEntry {
        HeldEntry(Self::push_for_good(shared))
    }

    /// Pushes without a guard (an acquire, whose release pops): returns the entry's token, 0
    /// if nothing was pushed (during thread exit: `current` is then `None`).
    fn push_for_good(shared: &SharedContext) -> u64 {
        HELD.try_with(|h| {
            let mut h = h.borrow_mut();
            h.next += 1;
            let token = h.next;
            h.entries.push((token, shared.clone()));
            token
        })
        .unwrap_or(0)
    }

    /// Removes the entry `token` pushed.
    fn pop(token: u64) {
        if token == 0 {
            return;
        }
        let _ = HELD.try_with(|h| {
            let mut h = h.borrow_mut();
            if let Some(i) = h.entries.iter().rposition(|(t, _)| *t == token) {
                // Dropped under the borrow: never the last clone (the pusher borrows one).
                drop(h.entries.remove(i));
            }
        });
    }
}

impl Drop for HeldEntry {
    fn drop(&mut self) {
        Self::pop(self.0);
    }
}

/// An event loop that any thread may run, one thread at a time: QEMU's `AioContext` with
/// `aio_context_acquire`/`aio_context_release` (docs/qemu-semantics.md §10).
///
/// `Send + Sync + Clone` (an `Arc`). [`acquire`](Self::acquire) takes the context's
/// [`RFifoLock`]: recursive for the holder, FIFO for everyone else, and a thread that must wait
/// first notifies the context, so a holder asleep in [`Acquired::poll`] returns (without
/// progress) and can release. The guard, [`Acquired`], is the only way to poll; it is `!Send`,
/// so the release happens on the thread that acquired.
///
/// Every callback a shared context runs is `Send` and receives nothing of the context: BHs,
/// fd handlers ([`SharedHandlerBuilder`]), event notifiers and timers. That is what lets the
/// loop move between threads, and the compiler checks it: there is no way to get an
/// [`AioContext`] of a shared context (and [`AioContext::current`] is `None` in its callbacks;
/// [`SharedContext::current`] names it instead). What needs an `&AioContext`
/// (`AioContext::fd_handler` with `!Send` callbacks, tasks, `ThreadPool::of`, block I/O,
/// isolation scopes, context-locals) is therefore not available on a shared context.
///
/// When to prefer an ordinary context and a [`ContextHandle`] (a BH, a remote registration):
/// almost always. The lock makes every operation wait for the holder's poll to return, and QEMU
/// itself removed it in 2023. Use it when threads really take turns driving one loop, as in
/// the seed's pattern:
///
/// ```
/// # fn monitor() -> std::io::Result<Box<dyn aio_core::FdMonitor + Send>> {
/// #     Ok(Box::new(fdmon_poll::PollMonitor::new()?))
/// # }
/// use aio_core::SharedContext;
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
///
/// let ctx = SharedContext::new(monitor()?)?;
/// let stop = Arc::new(AtomicBool::new(false));
/// // The event-loop thread: acquire, poll (blocking), release.
/// let looper = {
///     let (ctx, stop) = (ctx.clone(), stop.clone());
///     std::thread::spawn(move || {
///         while !stop.load(Ordering::Relaxed) {
///             let held = ctx.acquire();
///             held.poll();
///         }
///     })
/// };
/// // Another thread: acquire (kicking the loop out of its poll), do its I/O, release.
/// let done = Arc::new(AtomicBool::new(false));
/// {
///     let held = ctx.acquire();
///     let d = done.clone();
///     held.schedule_oneshot(move || d.store(true, Ordering::Relaxed));
///     while !done.load(Ordering::Relaxed) {
///         held.poll();
///     }
/// }
/// stop.store(true, Ordering::Relaxed);
/// ctx.notify();
/// looper.join().unwrap();
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// Dropping the last clone drops the loop on that thread (pending BHs, handlers and timers are
/// freed without running). If a guard was leaked with `mem::forget` on another thread, the lock
/// stays held for good and the loop is leaked rather than dropped.
#[derive(Clone)]
pub struct SharedContext {
    core: Arc<Core>,
}

impl SharedContext {
    /// Creates a shared context that waits for fds with `monitor`, which must be `Send` (the
    /// loop moves between threads with the lock). Nobody holds it yet.
    ///
    /// # Errors
    ///
    /// As [`AioContext::new`].
    pub fn new(monitor: Box<dyn FdMonitor + Send>) -> io::Result<SharedContext> {
        Self::with_clocks(monitor, GroupBuilder::new())
    }

    /// As [`new`](Self::new), with the clocks chosen by `clocks` (as
    /// [`AioContext::with_clocks`]).
    ///
    /// # Errors
    ///
    /// As [`AioContext::new`].
    pub fn with_clocks(
        monitor: Box<dyn FdMonitor + Send>,
        clocks: GroupBuilder,
    ) -> io::Result<SharedContext> {
        let ctx = AioContext::with_clocks(monitor, clocks)?;
        ctx.inner.in_shared.set(true);
        // Created on this thread, which is its home until now: nobody holds it from here on.
        ctx.leave_home();
        let handle = ctx.handle();
        let kick = handle.clone();
        let slot = Slot {
            ctx: Some(ctx),
            depth: Cell::new(0),
        };
        Ok(SharedContext {
            core: Arc::new(Core {
                // A waiting acquirer notifies the context, so that a holder blocked in `poll`
                // returns and releases (QEMU's contention callback, `aio_rfifolock_cb`).
                lock: RFifoLock::with_contention(slot, move || kick.notify()),
                handle,
            }),
        })
    }

    /// Takes the context for this thread (QEMU `aio_context_acquire`), waiting in FIFO order
    /// behind the threads that asked before; nested calls by the holder return at once.
    /// While waiting it notifies the context (once, and again each time the lock passes to
    /// another waiter), so a holder blocked in [`Acquired::poll`] returns. Dropping the guard
    /// releases (QEMU `aio_context_release`).
    ///
    /// Acquiring two shared contexts in opposite orders on two threads deadlocks, as two
    /// mutexes would.
    pub fn acquire(&self) -> Acquired<'_> {
        Acquired::enter(self, self.core.lock.lock())
    }

    /// As [`acquire`](Self::acquire), without waiting: `None` if another thread holds the
    /// context or waits for it.
    pub fn try_acquire(&self) -> Option<Acquired<'_>> {
        Some(Acquired::enter(self, self.core.lock.try_lock()?))
    }

    /// Whether the calling thread holds this context.
    pub fn is_held_by_current_thread(&self) -> bool {
        self.core.lock.is_owned_by_current_thread()
    }

    /// The shared context the calling thread holds, if any: inside a shared context's
    /// callbacks, the context running them (the one being polled); outside a poll, the most
    /// recently acquired one still held, from `acquire` to its release. This is what [`AioContext::current`]
    /// is for ordinary contexts (which is `None` for shared ones).
    pub fn current() -> Option<SharedContext> {
        HELD.try_with(|held| held.borrow().entries.last().map(|(_, c)| c.clone()))
            .ok()
            .flatten()
    }

    /// The context's thread-safe handle. Operations through it from a thread that does not
    /// hold the context are queued for the next holder's poll.
    pub fn handle(&self) -> SharedHandle {
        SharedHandle {
            handle: self.core.handle.clone(),
        }
    }

    /// Wakes the context if a holder sleeps in its poll (QEMU `aio_notify`). Any thread.
    pub fn notify(&self) {
        self.core.handle.notify();
    }

    /// Whether `self` and `other` are clones of one shared context.
    pub fn same_context(&self, other: &SharedContext) -> bool {
        Arc::ptr_eq(&self.core, &other.core)
    }
}

impl fmt::Debug for SharedContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedContext")
            .field("locked", &self.core.lock.is_locked())
            .finish_non_exhaustive()
    }
}

/// A held [`SharedContext`]: the RAII guard of [`SharedContext::acquire`]. Dropping it releases
/// (QEMU `aio_context_release`); the outermost release lets the next waiter in.
///
/// Neither `Send` nor `Sync`, so it is released, and the context polled, only on the thread
/// that acquired:
///
/// ```compile_fail
/// # fn f(ctx: aio_core::SharedContext) {
/// let held = ctx.acquire();
/// std::thread::scope(|s| {
///     s.spawn(move || drop(held)); // error: `Acquired` cannot be sent between threads
/// });
/// # }
/// ```
///
/// ```compile_fail
/// # fn f(ctx: aio_core::SharedContext) {
/// let held = ctx.acquire();
/// std::thread::scope(|s| {
///     s.spawn(|| held.poll()); // error: `Acquired` cannot be shared between threads
/// });
/// # }
/// ```
///
/// Its callbacks must be `Send`: a closure holding an `Rc` is refused,
///
/// ```compile_fail
/// # fn f(ctx: aio_core::SharedContext) {
/// let counter = std::rc::Rc::new(std::cell::Cell::new(0));
/// let held = ctx.acquire();
/// held.schedule_oneshot(move || counter.set(1)); // error: `Rc` is not `Send`
/// # }
/// ```
///
/// ```compile_fail
/// # fn f(ctx: aio_core::SharedContext, fd: std::os::fd::OwnedFd) {
/// let counter = std::rc::Rc::new(std::cell::Cell::new(0));
/// let held = ctx.acquire();
/// let _h = held.fd_handler(fd).on_read(move || counter.set(1)).register(); // not `Send`
/// # }
/// ```
///
/// and they receive no `&AioContext`; there is no way to get one:
///
/// ```compile_fail
/// # fn f(ctx: aio_core::SharedContext, fd: std::os::fd::OwnedFd) {
/// let held = ctx.acquire();
/// let _h = held
///     .fd_handler(fd)
///     .on_read(|ctx: &aio_core::AioContext| drop(ctx.clone())) // takes no argument
///     .register();
/// # }
/// ```
///
/// ```compile_fail
/// # fn f(ctx: aio_core::SharedContext) {
/// let held = ctx.acquire();
/// let inner: &aio_core::AioContext = &*held; // no `Deref` to the context
/// # }
/// ```
pub struct Acquired<'a> {
    guard: RFifoLockGuard<'a, Slot>,
    shared: &'a SharedContext,
    /// The token of this guard's entry in the thread's `HELD` stack (0: none).
    held: u64,
    /// `!Send` and `!Sync`: the lock's owner and the context's home are this thread.
    _not_send: PhantomData<*const ()>,
}

impl<'a> Acquired<'a> {
    fn enter(shared: &'a SharedContext, guard: RFifoLockGuard<'a, Slot>) -> Acquired<'a> {
        let depth = guard.depth.get();
        let mut held = Acquired {
            guard,
            shared,
            held: 0,
            _not_send: PhantomData,
        };
        if depth == 0 {
            held.ctx().enter_home(Some(shared.clone()));
        }
        held.guard.depth.set(depth + 1);
        held.held = HeldEntry::push_for_good(shared);
        held
    }

    fn ctx(&self) -> &AioContext {
        match &self.guard.ctx {
            Some(ctx) => ctx,
            // The slot is emptied only by the last `SharedContext`'s drop, and this guard
            // borrows one.
            None => unreachable!("a held shared context has its loop"),
        }
    }

    fn ctx_handle(&self) -> &ContextHandle {
        &self.shared.core.handle
    }

    /// Runs one poll of the context with it as the innermost held one, so that
    /// [`SharedContext::current`] names it in its callbacks even if this thread acquired
    /// another shared context since.
    fn polling<R>(&self, poll: impl FnOnce(&AioContext) -> R) -> R {
        let _current = HeldEntry::push(self.shared);
        poll(self.ctx())
    }

    /// The shared context this guard holds.
    pub fn context(&self) -> &SharedContext {
        self.shared
    }

    /// Runs one loop iteration, sleeping until something happens (QEMU `aio_poll(ctx, true)`):
    /// see [`AioContext::poll`]. Another thread's acquire wakes it, and it then returns
    /// (possibly `false`, no progress), so that the caller can release. Callable from inside
    /// the context's callbacks (a nested poll) through a nested acquire.
    pub fn poll(&self) -> bool {
        self.polling(|ctx| ctx.poll())
    }

    /// Runs one iteration without sleeping (QEMU `aio_poll(ctx, false)`); see
    /// [`AioContext::poll_nonblocking`].
    pub fn poll_nonblocking(&self) -> bool {
        self.polling(|ctx| ctx.poll_nonblocking())
    }

    /// As [`poll`](Self::poll), returning a failed backend wait; see [`AioContext::try_poll`].
    ///
    /// # Errors
    ///
    /// As [`AioContext::try_poll`].
    pub fn try_poll(&self) -> io::Result<bool> {
        self.polling(|ctx| ctx.try_poll())
    }

    /// As [`poll_nonblocking`](Self::poll_nonblocking), returning a failed backend wait.
    ///
    /// # Errors
    ///
    /// As [`AioContext::try_poll`].
    pub fn try_poll_nonblocking(&self) -> io::Result<bool> {
        self.polling(|ctx| ctx.try_poll_nonblocking())
    }

    /// The loop's counters (see [`AioContext::stats`]).
    pub fn stats(&self) -> Stats {
        self.ctx().stats()
    }

    /// Wakes the context (QEMU `aio_notify`).
    pub fn notify(&self) {
        self.ctx_handle().notify();
    }

    /// The context's thread-safe handle (see [`SharedContext::handle`]).
    pub fn handle(&self) -> SharedHandle {
        self.shared.handle()
    }

    /// A bottom half; see [`SharedHandle::bh`].
    pub fn bh(&self, f: impl FnMut() + Send + 'static) -> BottomHalf {
        self.ctx_handle().bh(f)
    }

    /// A bottom half that can reschedule itself; see [`SharedHandle::bh_with_self`].
    pub fn bh_with_self(&self, f: impl FnMut(&RunningBh<'_>) + Send + 'static) -> BottomHalf {
        self.ctx_handle().bh_with_self(f)
    }

    /// Schedules `f` to run once in the next iteration (QEMU `aio_bh_schedule_oneshot`).
    pub fn schedule_oneshot(&self, f: impl FnOnce() + Send + 'static) {
        self.ctx_handle().schedule_oneshot(f);
    }

    /// Starts registering an fd handler, applied at once (the holder is the home thread);
    /// see [`SharedHandlerBuilder`]. The handler takes `fd`, as
    /// [`AioContext::fd_handler`](crate::AioContext::fd_handler) does.
    pub fn fd_handler(&self, fd: impl AsFd + Send + 'static) -> SharedHandlerBuilder {
        SharedHandlerBuilder {
            inner: self.ctx_handle().fd_handler(fd),
        }
    }

    /// Registers an event notifier's handler; see [`SharedHandle::set_event_notifier`].
    ///
    /// # Errors
    ///
    /// As [`ContextHandle::set_event_notifier`].
    pub fn set_event_notifier(
        &self,
        notifier: &Arc<EventNotifier>,
        read: impl FnMut(&EventNotifier) + Send + 'static,
    ) -> io::Result<SharedFdHandler> {
        self.handle().set_event_notifier(notifier, read)
    }

    /// Creates a timer on the context; see [`ContextHandle::timer`].
    ///
    /// # Errors
    ///
    /// As [`ContextHandle::timer`].
    pub fn timer(
        &self,
        clock: ClockType,
        scale: Scale,
        callback: impl FnMut() + Send + 'static,
    ) -> io::Result<Timer> {
        self.ctx_handle().timer(clock, scale, callback)
    }

    /// Disables external handlers (QEMU `aio_disable_external`).
    pub fn disable_external(&self) {
        self.ctx_handle().disable_external();
    }

    /// Undoes one [`disable_external`](Self::disable_external).
    ///
    /// # Errors
    ///
    /// [`NotDisabledError`] if external handlers are not disabled.
    pub fn enable_external(&self) -> Result<(), NotDisabledError> {
        self.ctx_handle().enable_external()
    }
}

impl Drop for Acquired<'_> {
    fn drop(&mut self) {
        // Before the guard's own drop unlocks (fields drop after this).
        HeldEntry::pop(self.held);
        let depth = self.guard.depth.get() - 1;
        self.guard.depth.set(depth);
        if depth == 0 {
            self.ctx().leave_home();
        }
    }
}

impl fmt::Debug for Acquired<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acquired")
            .field("depth", &self.guard.depth.get())
            .finish_non_exhaustive()
    }
}

/// A [`SharedContext`]'s thread-safe handle: [`ContextHandle`]'s operations whose callbacks
/// receive nothing of the context. `Send + Sync + Clone`. Used by the holder, an operation
/// applies at once; used by any other thread, it is queued for the next holder's poll (a
/// registration then waits for it: acquire first if nobody else polls).
#[derive(Clone)]
pub struct SharedHandle {
    handle: ContextHandle,
}

impl SharedHandle {
    /// Wakes the context (QEMU `aio_notify`).
    pub fn notify(&self) {
        self.handle.notify();
    }

    /// Schedules `f` to run once in the next iteration (QEMU `aio_bh_schedule_oneshot`).
    pub fn schedule_oneshot(&self, f: impl FnOnce() + Send + 'static) {
        self.handle.schedule_oneshot(f);
    }

    /// A bottom half (QEMU `aio_bh_new`); see [`ContextHandle::bh`].
    pub fn bh(&self, f: impl FnMut() + Send + 'static) -> BottomHalf {
        self.handle.bh(f)
    }

    /// A bottom half whose callback can reschedule or cancel itself; see
    /// [`ContextHandle::bh_with_self`].
    pub fn bh_with_self(&self, f: impl FnMut(&RunningBh<'_>) + Send + 'static) -> BottomHalf {
        self.handle.bh_with_self(f)
    }

    /// Starts registering an fd handler with `Send` callbacks that take no argument; see
    /// [`SharedHandlerBuilder`]. The handler takes `fd`, as
    /// [`AioContext::fd_handler`](crate::AioContext::fd_handler) does.
    pub fn fd_handler(&self, fd: impl AsFd + Send + 'static) -> SharedHandlerBuilder {
        SharedHandlerBuilder {
            inner: self.handle.fd_handler(fd),
        }
    }

    /// Registers an event notifier's handler (QEMU `aio_set_event_notifier`); see
    /// [`ContextHandle::set_event_notifier`].
    ///
    /// # Errors
    ///
    /// As [`ContextHandle::set_event_notifier`].
    pub fn set_event_notifier(
        &self,
        notifier: &Arc<EventNotifier>,
        read: impl FnMut(&EventNotifier) + Send + 'static,
    ) -> io::Result<SharedFdHandler> {
        let inner = self.handle.set_event_notifier(notifier, read)?;
        Ok(SharedFdHandler { inner })
    }

    /// Creates a timer on the context (QEMU `aio_timer_new`); see [`ContextHandle::timer`].
    ///
    /// # Errors
    ///
    /// As [`ContextHandle::timer`].
    pub fn timer(
        &self,
        clock: ClockType,
        scale: Scale,
        callback: impl FnMut() + Send + 'static,
    ) -> io::Result<Timer> {
        self.handle.timer(clock, scale, callback)
    }

    /// As [`timer`](Self::timer), with attributes.
    ///
    /// # Errors
    ///
    /// As [`ContextHandle::timer`].
    pub fn timer_with_attrs(
        &self,
        clock: ClockType,
        scale: Scale,
        attrs: TimerAttrs,
        callback: impl FnMut() + Send + 'static,
    ) -> io::Result<Timer> {
        self.handle.timer_with_attrs(clock, scale, attrs, callback)
    }

    /// The reading of `clock` as the context's timers see it, in ns.
    pub fn now_ns(&self, clock: ClockType) -> u64 {
        self.handle.now_ns(clock)
    }

    /// The context's clocks.
    pub fn clocks(&self) -> Clocks {
        self.handle.clocks()
    }

    /// Disables external handlers (QEMU `aio_disable_external`); see
    /// [`ContextHandle::disable_external`].
    pub fn disable_external(&self) {
        self.handle.disable_external();
    }

    /// Undoes one [`disable_external`](Self::disable_external).
    ///
    /// # Errors
    ///
    /// [`NotDisabledError`] if external handlers are not disabled.
    pub fn enable_external(&self) -> Result<(), NotDisabledError> {
        self.handle.enable_external()
    }

    /// Whether external handlers are disabled.
    pub fn is_external_disabled(&self) -> bool {
        self.handle.is_external_disabled()
    }

    /// Sets the adaptive-polling parameters; see [`ContextHandle::set_poll_params`].
    ///
    /// # Errors
    ///
    /// As [`ContextHandle::set_poll_params`].
    pub fn set_poll_params(&self, params: PollParams) -> io::Result<()> {
        self.handle.set_poll_params(params)
    }

    /// Sets QEMU's `aio-max-batch`; see [`ContextHandle::set_max_batch`].
    ///
    /// # Errors
    ///
    /// As [`ContextHandle::set_max_batch`].
    pub fn set_max_batch(&self, max_batch: u32) -> io::Result<()> {
        self.handle.set_max_batch(max_batch)
    }

    /// Whether the context's loop still exists.
    pub fn is_alive(&self) -> bool {
        self.handle.is_alive()
    }

    /// Whether both handles name one context.
    pub fn same_context(&self, other: &SharedHandle) -> bool {
        self.handle.same_context(&other.handle)
    }
}

impl fmt::Debug for SharedHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedHandle").finish_non_exhaustive()
    }
}

/// Registers an fd handler on a [`SharedContext`]: [`RemoteHandlerBuilder`] with callbacks that
/// take no argument (they would otherwise receive the `&AioContext` a shared context never
/// lends). Registration returns the `Send + Sync` [`SharedFdHandler`]: dropping it on any
/// thread unregisters the handler, and no callback starts after its `remove` returns.
pub struct SharedHandlerBuilder {
    inner: RemoteHandlerBuilder,
}

impl SharedHandlerBuilder {
    /// The read callback (QEMU `io_read`).
    pub fn on_read(self, mut f: impl FnMut() + Send + 'static) -> Self {
        SharedHandlerBuilder {
            inner: self.inner.on_read(move |_| f()),
        }
    }

    /// The write callback (QEMU `io_write`).
    pub fn on_write(self, mut f: impl FnMut() + Send + 'static) -> Self {
        SharedHandlerBuilder {
            inner: self.inner.on_write(move |_| f()),
        }
    }

    /// The poll function (QEMU `io_poll`); see [`HandlerBuilder::on_poll`](crate::HandlerBuilder::on_poll).
    pub fn on_poll(self, f: impl FnMut() -> bool + Send + 'static) -> Self {
        SharedHandlerBuilder {
            inner: self.inner.on_poll(f),
        }
    }

    /// What a poll hit runs (QEMU `io_poll_ready`).
    pub fn on_poll_ready(self, mut f: impl FnMut() + Send + 'static) -> Self {
        SharedHandlerBuilder {
            inner: self.inner.on_poll_ready(move |_| f()),
        }
    }

    /// Called when the loop starts polling (QEMU `io_poll_begin`).
    pub fn on_poll_begin(self, f: impl FnMut() + Send + 'static) -> Self {
        SharedHandlerBuilder {
            inner: self.inner.on_poll_begin(f),
        }
    }

    /// Called when the loop stops polling (QEMU `io_poll_end`).
    pub fn on_poll_end(self, f: impl FnMut() + Send + 'static) -> Self {
        SharedHandlerBuilder {
            inner: self.inner.on_poll_end(f),
        }
    }

    /// Marks the handler external (see [`SharedHandle::disable_external`]).
    pub fn external(self, external: bool) -> Self {
        SharedHandlerBuilder {
            inner: self.inner.external(external),
        }
    }

    /// Registers the handler: at once for the holder, otherwise at the next holder's poll,
    /// which this waits for.
    ///
    /// # Errors
    ///
    /// As [`RemoteHandlerBuilder::register`].
    pub fn register(self) -> io::Result<SharedFdHandler> {
        let inner = self.inner.register()?;
        Ok(SharedFdHandler { inner })
    }

    /// Replaces the callbacks of `handler`; see [`RemoteHandlerBuilder::replace`].
    ///
    /// # Errors
    ///
    /// As [`RemoteHandlerBuilder::replace`].
    pub fn replace(self, handler: &mut SharedFdHandler) -> io::Result<()> {
        self.inner.replace(&mut handler.inner)
    }
}

impl fmt::Debug for SharedHandlerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedHandlerBuilder")
            .finish_non_exhaustive()
    }
}

/// An fd handler or event notifier registered on a [`SharedContext`]: [`RemoteFdHandler`]
/// without its [`context`](RemoteFdHandler::context) (a [`ContextHandle`] would register
/// callbacks that take `&AioContext`). `Send + Sync`; dropping it on any thread unregisters the
/// handler. "After `remove` returns" means what it means for [`RemoteFdHandler`]: no callback
/// invocation starts whose start is ordered after the return; one already running finishes.
///
/// It does not give the context's [`ContextHandle`]:
///
/// ```compile_fail
/// # fn f(h: aio_core::SharedFdHandler) {
/// let handle: &aio_core::ContextHandle = h.context(); // no such method
/// # }
/// ```
pub struct SharedFdHandler {
    inner: RemoteFdHandler,
}

impl SharedFdHandler {
    /// The handler's current key (it changes when the handler is replaced).
    pub fn key(&self) -> crate::HandlerKey {
        self.inner.key()
    }

    /// The fd the handler watches.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.inner.fd()
    }

    /// Whether the handler may still be dispatched.
    pub fn is_registered(&self) -> bool {
        self.inner.is_registered()
    }

    /// Unregisters the handler, as dropping it does; returns whether one of its callbacks was
    /// running at that moment (see [`RemoteFdHandler::remove`]).
    pub fn remove(self) -> bool {
        self.inner.remove()
    }
}

impl fmt::Debug for SharedFdHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedFdHandler")
            .field("fd", &self.inner.fd())
            .field("key", &self.inner.key())
            .finish()
    }
}
