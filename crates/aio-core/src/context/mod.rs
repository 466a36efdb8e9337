//! [`AioContext`], the event loop, and [`ContextHandle`], its thread-safe face. This file owns
//! the context type, its construction, its settings and counters ([`Stats`]), and its timers,
//! BHs and per-context singletons; each other concept of the context has a file of its own:
//!
//! - `wake.rs`: [`Shared`], the part any thread may touch, and the `notify_me`/`notified`
//!   wake-up protocol that runs on it;
//! - `inner.rs`: [`Inner`], the part only the home thread touches, and the order its drop
//!   frees things in;
//! - `iteration.rs`: one loop iteration ([`AioContext::poll`] and its forms): the order of its
//!   phases, the timeout, the BH pass, the backend wait and its back-off, dispatch;
//! - `poll_mode.rs`: adaptive polling, home-thread side: the poll set, polling mode, busy
//!   polling and the window updates;
//! - `handlers.rs`: fd handlers as the monitor sees them: registration, replacement and
//!   removal, external disabling, and what other threads queued for the home thread;
//! - `current.rs`: the current-context thread-local ([`AioContext::current`]);
//! - `outer.rs`: driving the context from an outer loop (`prepare`, `outer_fds`, `check`,
//!   `dispatch`);
//! - `handle.rs`: [`ContextHandle`].
//!
//! C original: `util/async.c` (context lifetime, `aio_notify`, `aio_notify_accept`,
//! `aio_compute_timeout`, the `GSource` functions) and `util/aio-posix.c` (`aio_poll`,
//! `aio_dispatch_handler`).
//!
//! # Who touches what
//!
//! The state is split by thread. [`Shared`] holds what other threads may touch: the wake-up
//! protocol's two atomics, the event notifier and the list of pending bottom halves; it lives in
//! an `Arc` that [`ContextHandle`]s and [`BottomHalf`]s share. [`Inner`] holds everything else
//! (the monitor, the handler table, the BH slices) and lives in an `Rc` that only
//! [`AioContext`] clones share. `AioContext` is neither `Send` nor `Sync`, so only the thread
//! that created it (its *home thread*) can poll it or register handlers: a second concurrent
//! poller is impossible by construction.

mod current;
mod handle;
mod handlers;
mod inner;
mod iteration;
mod outer;
mod poll_mode;
mod wake;

pub(crate) use current::CurrentGuard;
pub use handle::ContextHandle;
pub use handlers::NotDisabledError;
pub(crate) use inner::Inner;
use poll_mode::{Polling, set_poll_params};
#[cfg(aio_loom)]
pub use wake::LoomVariant;
pub(crate) use wake::Shared;

use crate::bh::{self, BottomHalf, PendingBhs, RunningBh};
use crate::event_notifier::EventNotifier;
use crate::fdmon::{FdMonitor, HandlerKey, Interest, ReadyList};
use crate::handler::{NodeKind, NodeParts, PollCallbacks, Registry};
use crate::polling::{PollParams, SharedParams};
use crate::remote::{self, RemoteOps};
use crate::sync::{
    self, Arc, AtomicBool, AtomicU32, AtomicU64, HomeThread, Mutex, Ordering, global, thread_id,
    timer_notify,
};
#[cfg(doc)]
use crate::{FdHandler, HandlerBuilder, PollPolicy};
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::Duration;
use timers::{ClockType, Clocks, GroupBuilder, Scale, Timer, TimerAttrs, TimerListGroup};

/// A function that runs completions of work done by a backend; see
/// [`AioContext::add_completion_source`].
pub type CompletionSource = Rc<dyn Fn(&AioContext) -> bool>;

/// An event loop: QEMU's `AioContext`.
///
/// It runs bottom halves ([`bh`](Self::bh), [`schedule_oneshot`](Self::schedule_oneshot)),
/// level-triggered fd handlers ([`fd_handler`](Self::fd_handler),
/// [`set_event_notifier`](Self::set_event_notifier)) and, through an [`FdMonitor`], waits for
/// fds with poll, epoll or io_uring. Applications usually create one with the `aio` facade,
/// which picks the backend.
///
/// An `AioContext` is a cheap, reference-counted handle (`Clone` is an `Rc` clone) that stays on
/// the thread that created it, its *home thread*: only that thread can poll it or register
/// handlers, so only one thread can ever poll it. Other threads use a [`ContextHandle`] from
/// [`handle`](Self::handle) to schedule work and wake it. When the last `AioContext` clone is
/// dropped, pending BHs and registered handlers are freed without running any callback.
///
/// # Examples
///
/// ```
/// # fn ctx() -> std::io::Result<aio_core::AioContext> {
/// #     aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))
/// # }
/// use std::sync::mpsc;
///
/// let ctx = ctx()?;
/// let remote = ctx.handle();
/// let (tx, rx) = mpsc::channel();
/// std::thread::spawn(move || remote.schedule_oneshot(move || tx.send("hello").unwrap()));
/// let msg = loop {
///     ctx.poll(); // sleeps until the other thread's BH arrives
///     if let Ok(msg) = rx.try_recv() { break msg; }
/// };
/// assert_eq!(msg, "hello");
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
pub struct AioContext {
    pub(crate) inner: Rc<Inner>,
}

impl AioContext {
    /// Creates a context that waits for fds with `monitor` (QEMU `aio_context_new`).
    ///
    /// # Errors
    ///
    /// Creating the context's event notifier can fail (`EMFILE` when the process is out of
    /// fds), and so can registering it with the monitor.
    pub fn new(monitor: Box<dyn FdMonitor>) -> io::Result<AioContext> {
        Self::with_clocks(monitor, GroupBuilder::new())
    }

    /// Creates a context whose timers read the clocks chosen by `clocks` (for example a
    /// [`VirtualClock`](timers::VirtualClock) standing in for real time in deterministic
    /// tests).
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new).
    pub fn with_clocks(
        monitor: Box<dyn FdMonitor>,
        clocks: GroupBuilder,
    ) -> io::Result<AioContext> {
        Self::build(
            monitor,
            clocks,
            #[cfg(aio_loom)]
            LoomVariant::Correct,
        )
    }

    /// Loom only: a context running a deliberately broken variant of the wake-up protocol, for
    /// the models that must catch it.
    #[cfg(aio_loom)]
    #[doc(hidden)]
    pub fn new_loom_variant(
        monitor: Box<dyn FdMonitor>,
        variant: LoomVariant,
    ) -> io::Result<AioContext> {
        Self::build(monitor, GroupBuilder::new(), variant)
    }

    fn build(
        monitor: Box<dyn FdMonitor>,
        clocks: GroupBuilder,
        #[cfg(aio_loom)] variant: LoomVariant,
    ) -> io::Result<AioContext> {
        let event = EventNotifier::new()?;
        let fd = event.raw_fd();
        let clock_view = clocks.clocks();
        let shared = Arc::new(Shared {
            notify_me: AtomicU32::new(0),
            notified: AtomicBool::new(false),
            event,
            bhs: PendingBhs::new(thread_id()),
            home: HomeThread::new(thread_id()),
            window: AtomicBool::new(false),
            alive: AtomicBool::new(true),
            #[cfg(aio_loom)]
            variant,
            event_writes: AtomicU64::new(0),
            poll_params: SharedParams::new(),
            max_batch: AtomicU32::new(0),
            id: next_context_id(),
            remote: RemoteOps::new(),
            external_disabled: AtomicU32::new(0),
            timers: Mutex::new(None),
            clocks: clock_view,
        });
        // Arming a timer that becomes the earliest of its clock wakes the loop, like a BH
        // schedule (and, like it, for free on the home thread outside a blocking wait). No
        // cycle: the group belongs to `Inner`, not to `Shared`.
        let timers = {
            let shared = shared.clone();
            clocks.build(timer_notify(move || shared.wake_for_work()))
        };
        let ctx = AioContext {
            inner: Rc::new(Inner {
                shared,
                monitor: RefCell::new(monitor),
                registry: RefCell::new(Registry::default()),
                slices: RefCell::new(VecDeque::new()),
                spare_ready: RefCell::new(Vec::new()),
                epoch: Cell::new(0),
                external_unwatched: Cell::new(false),
                outer_ready: RefCell::new(ReadyList::new()),
                timers,
                locals: RefCell::new(Vec::new()),
                completion_sources: RefCell::new(Vec::new()),
                completion_pending: RefCell::new(Vec::new()),
                waits: Cell::new(0),
                iterations: Cell::new(0),
                bh_calls: Cell::new(0),
                handler_calls: Cell::new(0),
                timer_calls: Cell::new(0),
                task_polls: Cell::new(0),
                wait_errors: Cell::new(0),
                event_drains: Cell::new(0),
                failed_waits: Cell::new(0),
                polling: Polling::default(),
                depth: Cell::new(0),
                tasks: crate::task::Tasks::default(),
                scopes: Rc::default(),
                held_bhs: RefCell::new(bh::Held::default()),
                in_shared: Cell::new(false),
            }),
        };
        *sync::lock(&ctx.inner.shared.timers) = Some(ctx.inner.timers.handle());
        remote::register_home(ctx.inner.shared.id, &ctx.inner);
        // The context's own notifier is an ordinary handler whose read callback drains the
        // eventfd; its activity never counts as progress. Its "poll" is a read of `notified`,
        // which is why a context with only BHs never needs a system call to poll.
        let parts = NodeParts {
            fd,
            // `shared.notifier` owns it and outlives the node.
            owner: (),
            read: None,
            write: None,
            poll: PollCallbacks::default(),
            poll_in_backend: false,
            external: false,
            kind: NodeKind::Notifier,
            gate: None,
        };
        ctx.add_node(parts, Interest::READ, None)?;
        Ok(ctx)
    }

    /// Makes the calling thread this context's home thread: a `SharedContext`'s lock was just
    /// taken (outermost acquire) or its last owner is dropping it ([SHARED-1]). Quiet during
    /// thread exit, when the home table may be gone (handle operations then answer
    /// `ContextGone` on this thread). `shared` is the holder's `SharedContext` (`None` for the
    /// last owner's drop): the home table keeps it, so that operations applied in place hold
    /// the lock while they run (`remote::with_home_context`).
    pub(crate) fn enter_home(&self, shared: Option<crate::SharedContext>) {
        let me = thread_id();
        self.inner.shared.home.set(me);
        self.inner.shared.bhs.home.set(me);
        remote::try_register_home(self.inner.shared.id, &self.inner, shared);
    }

    /// Stops the calling thread being this context's home: the outermost release of a
    /// `SharedContext`'s lock, right before the unlock ([SHARED-1]).
    pub(crate) fn leave_home(&self) {
        remote::unregister_home(self.inner.shared.id);
        self.inner.shared.bhs.home.set(0);
        self.inner.shared.home.set(0);
    }

    /// A thread-safe handle for scheduling work on this context and waking it.
    pub fn handle(&self) -> ContextHandle {
        ContextHandle {
            shared: self.inner.shared.clone(),
        }
    }

    /// Counters of the system calls the loop itself makes, for benchmarks and tests that check
    /// "no system call" claims.
    pub fn stats(&self) -> Stats {
        let inner = &*self.inner;
        Stats {
            waits: inner.waits.get(),
            wait_errors: inner.wait_errors.get(),
            event_writes: inner.shared.event_writes.load(Ordering::Relaxed),
            event_drains: inner.event_drains.get(),
            poll_time: Duration::from_nanos(inner.polling.time_ns.get()),
            poll_hits: inner.polling.hits.get(),
            poll_misses: inner.polling.misses.get(),
            poll_backend_ends: inner.polling.backend_ends.get(),
            poll_contended: inner.polling.contended.get(),
            iterations: inner.iterations.get(),
            bh_calls: inner.bh_calls.get(),
            handler_calls: inner.handler_calls.get(),
            timer_calls: inner.timer_calls.get(),
            task_polls: inner.task_polls.get(),
            poll_set: inner
                .polling
                .set
                .borrow()
                .iter()
                .map(|n| PolledHandler {
                    key: n.key,
                    fd: if n.kind == NodeKind::Notifier {
                        -1
                    } else {
                        n.fd
                    },
                    window: Duration::from_nanos(n.window.get().ns),
                })
                .collect(),
        }
    }

    /// Sets the adaptive-polling parameters (QEMU `aio_context_set_poll_params`); the same as
    /// [`ContextHandle::set_poll_params`], which other threads use.
    ///
    /// Polling is off by default (a maximum of 0). With a maximum, each outermost blocking
    /// iteration first calls the poll functions of the handlers in the poll set, over and over,
    /// for up to the polling window, and sleeps in the backend only if they found nothing:
    ///
    /// * A handler joins the poll set the first time its fd is dispatched, if it has
    ///   [`on_poll`](HandlerBuilder::on_poll) and [`on_poll_ready`](HandlerBuilder::on_poll_ready);
    ///   so does the context's own notifier, whose poll function reads the notify flag: a BH
    ///   scheduled from another thread while the loop polls is seen without an eventfd write.
    ///   A handler that polling has not found ready for 7 s leaves the set.
    /// * Each member has its own window or block-time estimate, adapted after each iteration
    ///   from the iteration's block time ([`PollPolicy`]: weighted by default, or QEMU 10's);
    ///   the context polls for its window (weighted) or the largest member window (QEMU 10),
    ///   at most until its next timer or idle BH. A window that decayed to 0 means a plain
    ///   blocking wait, with no wake-up at all.
    /// * Polling stops at the first round that finds work, or when the backend says it must
    ///   wait ([`FdMonitor::must_wait`]: io_uring has completions). Handlers without a poll
    ///   function are never starved: after a polling phase that found nothing the loop waits
    ///   for every fd, and after one that found work it still checks every fd without blocking
    ///   unless polling covered every handler.
    /// * Before a wait that may sleep, the loop leaves polling mode: `on_poll_end` on each
    ///   member, then one more call of its poll function (work that arrived while kicks were
    ///   suppressed), whose finds are dispatched. This is the only time a nested iteration
    ///   calls a poll function; it never busy-polls, and a handler whose poll-ready callback
    ///   is running gets `on_poll_end` (begin and end always alternate) but is not polled.
    /// * [`poll_nonblocking`](Self::poll_nonblocking) never busy-polls.
    ///
    /// The change applies from the next iteration: every window restarts from 0, and the loop
    /// is notified, so a sleeping `poll` returns (without progress).
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use aio_core::{PollParams, PollPolicy};
    /// use std::time::Duration;
    ///
    /// // QEMU's IOThread defaults: up to 32 µs, the weighted policy (weight 2), grow ×2.
    /// ctx.set_poll_params(PollParams::new(Duration::from_nanos(32_768)))?;
    /// // The 2026 weighted policy, from another thread.
    /// let remote = ctx.handle();
    /// std::thread::spawn(move || {
    ///     let p = PollParams::new(Duration::from_micros(50))
    ///         .policy(PollPolicy::Weighted { weight: 2 });
    ///     remote.set_poll_params(p).unwrap();
    /// })
    /// .join()
    /// .unwrap();
    /// assert_eq!(ctx.poll_params().max(), Duration::from_micros(50));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// `InvalidInput` from [`PollParams::validate`]; nothing changes then.
    pub fn set_poll_params(&self, params: PollParams) -> io::Result<()> {
        set_poll_params(&self.inner.shared, params)
    }

    /// The adaptive-polling parameters last set.
    pub fn poll_params(&self) -> PollParams {
        self.inner.shared.poll_params.get()
    }

    /// Sets the most requests a block I/O engine on this context queues before it submits
    /// them to the kernel in one call (QEMU's `aio-max-batch`, `aio_context_set_aio_params`);
    /// the same as [`ContextHandle::set_max_batch`]. 0, the default, lets each engine use its
    /// own (QEMU's Linux AIO: 32). Engines read [`max_batch`](Self::max_batch) when they
    /// decide whether to submit; an engine's own, smaller limit (a device queue depth) still
    /// wins. The loop is notified, so a change made while it sleeps is seen at once.
    ///
    /// # Errors
    ///
    /// `InvalidInput` above [`MAX_BATCH_LIMIT`] (QEMU refuses values above `INT_MAX`); nothing
    /// changes then.
    pub fn set_max_batch(&self, max_batch: u32) -> io::Result<()> {
        set_max_batch(&self.inner.shared, max_batch)
    }

    /// The `aio-max-batch` last set (0: each engine's default).
    pub fn max_batch(&self) -> u32 {
        // Relaxed: a setting with nothing else to publish.
        self.inner.shared.max_batch.load(Ordering::Relaxed)
    }

    /// How long the next blocking iteration would poll before sleeping, before its timeout
    /// caps it: the largest window of the poll set (or the weighted window), zero when polling
    /// is disabled, the poll set is empty or the windows decayed. Parameters set since the last
    /// iteration apply only from the next one.
    pub fn poll_window(&self) -> Duration {
        let inner = &*self.inner;
        Duration::from_nanos(inner.poll_window_ns(&inner.polling.params.get()))
    }

    /// The context's single value of type `T`, created by `init` on first use: per-context
    /// state of crates built on the loop, as QEMU keeps the thread pool in `AioContext`
    /// (`aio_get_thread_pool`). Values are dropped with the context, after its BHs and handlers,
    /// in reverse order of creation.
    ///
    /// `init` runs on the home thread and may itself call `local` for other types; it must not
    /// ask for `T` again (that returns a second value).
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use std::cell::Cell;
    /// let hits = ctx.local(|_| Cell::new(0u32));
    /// hits.set(hits.get() + 1);
    /// assert_eq!(ctx.local(|_| Cell::new(100u32)).get(), 1); // the same value
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn local<T: Any>(&self, init: impl FnOnce(&AioContext) -> T) -> Rc<T> {
        if let Some(value) = self.try_local::<T>() {
            return value;
        }
        let value = Rc::new(init(self));
        self.inner.locals.borrow_mut().push(value.clone());
        value
    }

    /// The context-local value of type `T` if [`local`](Self::local) has made one, without
    /// making it: how a crate asks whether its state exists on this context (the block I/O
    /// engine checks that a request being cancelled is this context's).
    pub fn try_local<T: Any>(&self) -> Option<Rc<T>> {
        self.inner
            .locals
            .borrow()
            .iter()
            .find_map(|l| l.clone().downcast::<T>().ok())
    }

    /// Creates a timer on this context (QEMU `aio_timer_new`): `callback` runs on the home
    /// thread, from [`poll`](Self::poll), once the timer's deadline on `clock` has passed.
    /// Arm it with [`Timer::arm`] (in `scale` units), [`Timer::arm_ns`] or
    /// [`Timer::arm_after`], from any thread; arming it earlier than every other timer of its
    /// clock wakes a sleeping loop. Dropping the handle cancels the timer and frees `callback`.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use aio_core::{ClockType, Scale};
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use std::sync::Arc;
    /// use std::time::Duration;
    ///
    /// let fired = Arc::new(AtomicBool::new(false));
    /// let f = fired.clone();
    /// let timer = ctx.timer(ClockType::Realtime, Scale::NS, move || f.store(true, Ordering::SeqCst));
    /// timer.arm_after(Duration::from_millis(1));
    /// while !fired.load(Ordering::SeqCst) {
    ///     ctx.poll(); // sleeps until the deadline, to the nanosecond the backend allows
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn timer(
        &self,
        clock: ClockType,
        scale: Scale,
        callback: impl FnMut() + Send + 'static,
    ) -> Timer {
        self.inner.timers.timer(clock, scale, callback)
    }

    /// As [`timer`](Self::timer), with attributes (QEMU `aio_timer_new_with_attrs`).
    pub fn timer_with_attrs(
        &self,
        clock: ClockType,
        scale: Scale,
        attrs: TimerAttrs,
        callback: impl FnMut() + Send + 'static,
    ) -> Timer {
        self.inner
            .timers
            .timer_with_attrs(clock, scale, attrs, callback)
    }

    /// The context's timer lists (QEMU `ctx->tlg`): clocks, the earliest deadline, counts.
    pub fn timers(&self) -> &TimerListGroup {
        &self.inner.timers
    }

    /// The current reading of `clock` as this context's timers see it, in nanoseconds (QEMU
    /// `qemu_clock_get_ns`): the scale of [`Timer::arm_ns`] deadlines on that clock. The
    /// virtual clocks are the ones the context was built with
    /// ([`with_clocks`](Self::with_clocks)), [`VirtualClock::global`](timers::VirtualClock::global)
    /// by default. Other threads read them with [`ContextHandle::now_ns`].
    pub fn now_ns(&self, clock: ClockType) -> u64 {
        self.inner.shared.clocks.now_ns(clock)
    }

    /// The context's clocks, `Send + Sync`, to read from any thread (see
    /// [`ContextHandle::clocks`]).
    pub fn clocks(&self) -> Clocks {
        self.inner.shared.clocks.clone()
    }

    /// The name of the backend that watches fds (`"poll"`, `"epoll"`, `"io_uring"`).
    pub fn backend(&self) -> &'static str {
        self.inner.monitor.borrow().name()
    }

    /// Whether the context runs on an io_uring backend, whose ring can carry block I/O
    /// requests (QEMU 11's `aio_has_io_uring`). The block I/O engine uses the ring when this
    /// is true and the thread pool otherwise.
    pub fn has_io_uring(&self) -> bool {
        self.backend() == "io_uring"
    }

    /// Runs `f` with the backend as its concrete type, if it offers one
    /// ([`FdMonitor::as_any_mut`]): how a crate built on the loop uses a backend's own
    /// capabilities (the block I/O engine adds requests to the io_uring backend's ring and
    /// takes their completions). `f` must not touch the context: the backend is borrowed for
    /// the duration of the call, so a call back into the loop panics.
    ///
    /// # Safety
    ///
    /// `f` must not call the monitor's [`FdMonitor`] methods (the context owns the watched set
    /// and the waits), nor replace, swap or move out the monitor it is lent: the context's
    /// registrations would then sit in a monitor that never gets their `Remove`, and [FD-1]
    /// (ARCHITECTURE.md, "Raw fds") would no longer hold for it.
    pub unsafe fn with_backend<R>(&self, f: impl FnOnce(Option<&mut dyn Any>) -> R) -> R {
        let mut monitor = self.inner.monitor.borrow_mut();
        f(monitor.as_any_mut())
    }

    /// Adds a completion source: a function every iteration (nested ones and outer-loop
    /// dispatches included) calls after its BHs and before its fd handlers, on the home
    /// thread, with no borrow of the context held. It runs the callbacks of work that a
    /// backend completed during the wait (QEMU 11 runs the `cqe_handler_ready_list` there), and
    /// returns whether it ran any, which counts as progress. It may poll the context again;
    /// the nested iteration calls it again, so it must take one completion at a time. Sources
    /// live as long as the context.
    pub fn add_completion_source(&self, source: CompletionSource) {
        self.inner.completion_sources.borrow_mut().push(source);
    }

    /// Adds a function the context asks before every wait (nested iterations and an outer
    /// loop's `prepare` and `check` included): while it returns true, a completion source
    /// holds completions that only its next call runs, so the wait does not sleep. A source
    /// whose completions arrive through a backend (`FdMonitor::has_completions`) or an fd it
    /// watches needs none; one that takes several completions from the kernel at once and
    /// runs them one at a time does, since a callback that polls the context would otherwise
    /// sleep in the nested wait over the ones still held (the native AIO engine). It must be
    /// cheap, must not touch the context, and lives as long as the context.
    pub fn add_completion_pending(&self, pending: Rc<dyn Fn() -> bool>) {
        self.inner.completion_pending.borrow_mut().push(pending);
    }

    /// Wakes the loop if it is sleeping, or makes its next sleep return at once (QEMU
    /// `aio_notify`). Callable from any thread through [`ContextHandle::notify`].
    pub fn notify(&self) {
        self.inner.shared.notify();
    }

    /// Creates a bottom half running `f` (QEMU `aio_bh_new`). See [`BottomHalf`].
    pub fn bh(&self, f: impl FnMut() + Send + 'static) -> BottomHalf {
        BottomHalf::new(
            self.inner.shared.clone(),
            bh::plain_callback(f),
            self.inner.scopes.creation(),
        )
    }

    /// Creates a bottom half whose callback gets a [`RunningBh`], through which it can schedule
    /// or cancel itself (QEMU callbacks do that through the `QEMUBH *` they keep). Capturing
    /// the BH's own handle instead would be a reference cycle.
    pub fn bh_with_self(&self, f: impl FnMut(&RunningBh<'_>) + Send + 'static) -> BottomHalf {
        BottomHalf::new(
            self.inner.shared.clone(),
            Box::new(f),
            self.inner.scopes.creation(),
        )
    }

    /// Runs `f` once on the next iteration (QEMU `aio_bh_schedule_oneshot`).
    pub fn schedule_oneshot(&self, f: impl FnOnce() + Send + 'static) {
        bh::schedule_oneshot(
            &self.inner.shared,
            bh::oneshot_callback(f),
            self.inner.scopes.creation(),
        );
    }
}

impl fmt::Debug for AioContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AioContext")
            .field("backend", &self.backend())
            .field("external_disabled", &self.inner.external_disabled())
            .finish_non_exhaustive()
    }
}

/// Counters of a context's loop machinery, from [`AioContext::stats`]: the system calls it
/// made (user callbacks' own are not counted; [`ContextHandle::event_writes`] reads one from
/// any thread), adaptive polling's figures, and the iterations and callbacks it ran. The
/// benchmarks compute their per-operation figures from these, so a program can reproduce them.
///
/// For time spent per phase, subscribe to `tracing` at trace level: each iteration is a span
/// `aio_poll` (fields `blocking`, `nested`; `aio_outer_dispatch` when an outer loop drives the
/// context), with child spans `aio_busy_poll`, `aio_wait` (field `timeout_ns`, -1 for none),
/// `aio_bh_pass`, `aio_dispatch` (fd handlers) and `aio_timers`; a subscriber that times spans
/// (e.g. `tracing-subscriber`'s `FmtSpan::CLOSE`) gives their durations. With no subscriber
/// at trace level, each span costs a cached check.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Calls of the backend's `wait` (one `ppoll`/`epoll_wait`/`io_uring_enter` or so each),
    /// failed ones included.
    pub waits: u64,
    /// Calls of the backend's `wait` that failed. [`AioContext::poll`] backs off after them;
    /// [`AioContext::try_poll`] returns the error.
    pub wait_errors: u64,
    /// Writes of the context's eventfd by `notify`, from any thread.
    pub event_writes: u64,
    /// Drains (reads) of the context's eventfd.
    pub event_drains: u64,
    /// Time spent busy-polling (adaptive polling), in total.
    pub poll_time: Duration,
    /// Polling phases that found work (a poll function returned true, or a remote notify).
    pub poll_hits: u64,
    /// Polling phases that found no work, having run their whole window or been cut short by
    /// the backend (`must_wait`: io_uring completions); the iteration then waited in the
    /// backend.
    pub poll_misses: u64,
    /// Of [`poll_misses`](Self::poll_misses), the phases the backend cut short because it had
    /// something to reap or submit: an io_uring completion, among them the readiness of an fd whose
    /// handler polls in the backend ([`HandlerBuilder::poll_in_backend`](crate::HandlerBuilder::poll_in_backend)).
    pub poll_backend_ends: u64,
    /// Of [`poll_misses`](Self::poll_misses), the phases of a yielding busy loop
    /// ([`PollParams::yielding`](crate::PollParams::yielding)) that ended because one yield
    /// gave the CPU away for 200 µs or more: other threads want this CPU, and the context then
    /// waits in the backend without busy-polling for a while (10 ms, doubled by each such
    /// yield up to 160 ms until a yield returns sooner).
    pub poll_contended: u64,
    /// Loop iterations: `poll`s of every kind (nested ones included) and outer-loop
    /// `dispatch`es.
    pub iterations: u64,
    /// BH callbacks run (idle and one-shot BHs, and the BHs that run tasks, included).
    pub bh_calls: u64,
    /// fd handler callbacks run: read, write and poll-ready (from readiness or from polling).
    pub handler_calls: u64,
    /// Timer callbacks run.
    pub timer_calls: u64,
    /// Polls of tasks (each resumption of a task: QEMU's coroutine entries).
    pub task_polls: u64,
    /// The poll set: each member's handler and its current window (under
    /// [`PollPolicy::Weighted`], its weighted block-time estimate; the context's window is
    /// [`AioContext::poll_window`]). The context's own notifier is listed with fd -1.
    pub poll_set: Vec<PolledHandler>,
}

/// One member of a context's poll set, in [`Stats::poll_set`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PolledHandler {
    /// The handler's key, as [`FdHandler::key`] returns it.
    pub key: HandlerKey,
    /// Its fd; -1 for the context's own notifier.
    pub fd: RawFd,
    /// Its window (Qemu10) or estimate (Weighted).
    pub window: Duration,
}

/// A number never given to another context (see `Shared::id`).
fn next_context_id() -> u64 {
    // Relaxed: uniqueness needs only the atomicity of the add. std's atomic even under loom
    // (an id allocator, not a protocol), so that ids stay unique across a model's executions.
    static NEXT: global::AtomicU64 = global::AtomicU64::new(1);
    NEXT.fetch_add(1, global::Ordering::Relaxed)
}

/// The largest `aio-max-batch` accepted: `i32::MAX`, as QEMU.
pub const MAX_BATCH_LIMIT: u32 = i32::MAX as u32;

/// Validates and stores a new `aio-max-batch`, then wakes the loop.
fn set_max_batch(shared: &Shared, max_batch: u32) -> io::Result<()> {
    if max_batch > MAX_BATCH_LIMIT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("aio-max-batch {max_batch} is above {MAX_BATCH_LIMIT}"),
        ));
    }
    // Relaxed: a setting; the notify that follows orders it before the loop's next iteration.
    shared.max_batch.store(max_batch, Ordering::Relaxed);
    shared.wake_for_work();
    Ok(())
}
