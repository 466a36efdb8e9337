//! [`AioContext`], the event loop, and [`ContextHandle`], its thread-safe face. This file owns
//! the order of one loop iteration and the `notify_me`/`notified` wake-up protocol.
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
//!
//! # The wake-up protocol (docs/qemu-semantics.md §2)
//!
//! `notify` (any thread): store `notified = true`, full fence, and write the eventfd only if
//! `notify_me` is non-zero. A blocking iteration: compute its timeout, add 2 to `notify_me`,
//! full fence, and re-read `notified`, using a zero timeout if it is set; after the wait, lower
//! `notify_me` with release ordering and *accept* (clear `notified` with an acquire RMW, no
//! fence: see `Shared::accept`) before dispatching anything. The two full fences (the
//! notifier's and the sleeper's) make a store-buffering (Dekker) pair: either the
//! notifier sees `notify_me != 0` and writes the eventfd, or the loop sees `notified` and does
//! not block. A notify to a loop that is not about to sleep therefore costs no system call.
//! The eventfd write is never conditioned on `notified` (QEMU's BUG2, modelled in
//! `tests/loom_notify.rs`).
//!
//! Both writes of `notified` are read-modify-writes (QEMU uses plain stores). Under the C++/Rust
//! memory model, which is weaker than the Linux kernel's that QEMU reasons in, a plain-store
//! accept can erase a notification without synchronizing with its notifier; the RMWs make the
//! accept synchronize with every notification it consumes. See `Shared::notify`.
//!
//! # Adaptive polling (docs/qemu-semantics.md §4.3)
//!
//! Home-thread state in `Polling`: the poll set (handlers that joined when dispatched by fd
//! readiness), whether the loop is in polling mode, the parameters in force. Other threads set
//! parameters through `Shared::poll_params` (one packed word and a generation) and notify; the
//! next iteration applies them. Busy polling happens before `notify_me` is raised, so a notify
//! during it costs no eventfd write: the polling loop reads `notified` as the context
//! notifier's poll function. The window arithmetic lives in `polling.rs`.

use crate::bh::{self, BhTimeout, BottomHalf, IDLE_BH_TIMEOUT, PendingBhs, RunningBh, Slice};
use crate::event_notifier::EventNotifier;
use crate::fdmon::{Change, FdMonitor, HandlerKey, Interest, OuterFd, Readiness, ReadyList};
use crate::handler::{
    HandlerBuilder, HandlerNode, NodeKind, NodeParts, PollCallbacks, Registry,
    RemoteHandlerBuilder, raw_fd_of,
};
use crate::polling::{self, IDLE_INTERVAL_NS, PollParams, PollPolicy, SharedParams, Window};
use crate::remote::{self, ContextGone, NoAnswer, RemoteOps, Reply};
use crate::scope::{self, Scopes};
use crate::sync::{
    self, Arc, AtomicBool, AtomicU32, AtomicU64, HomeThread, Mutex, Ordering, fence, global,
    signal_fence, thread_id, thread_local, timer_notify,
};
use crate::{FdHandler, RemoteFdHandler, sys};
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};
use timers::{
    ClockType, Clocks, GroupBuilder, GroupHandle, Scale, Timer, TimerAttrs, TimerListGroup,
};

/// `notify_me` bit 0: an outer loop is between [`AioContext::prepare`] and
/// [`AioContext::check`] (QEMU's GSource bit).
const NOTIFY_ME_OUTER: u32 = 1;
/// `notify_me` step for each `poll` in its wait phase.
const NOTIFY_ME_POLL: u32 = 2;

/// The back-off after the first of a run of failed backend waits; it doubles with each
/// consecutive failure, up to [`BACKOFF_MAX`]. See [`AioContext::poll`].
const BACKOFF_FIRST: Duration = Duration::from_millis(1);
/// The longest back-off: a backend whose wait keeps failing costs about ten wake-ups a second.
const BACKOFF_MAX: Duration = Duration::from_millis(100);

/// What an iteration does when the backend's wait fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnWaitError {
    /// Count and log it, back off (blocking iterations), and go on as if nothing were ready:
    /// [`AioContext::poll`].
    BackOff,
    /// Count and log it, and return it before dispatching anything: [`AioContext::try_poll`].
    Return,
}

/// Enters the span `make` builds, for a phase of an iteration, if trace level is on at all:
/// one load of `tracing`'s global level filter instead of a span per phase, which B1 measured
/// at 4 ns an iteration for three disabled spans.
#[inline]
fn phase_span(make: impl FnOnce() -> tracing::Span) -> Option<tracing::span::EnteredSpan> {
    tracing::level_enabled!(tracing::Level::TRACE).then(|| make().entered())
}

/// The part of a context that any thread may touch.
pub(crate) struct Shared {
    /// Non-zero while the home thread may be blocked (or is about to block) without
    /// re-checking for work: bit 0 for an outer loop, +2 per blocking `poll`. Written only by
    /// the home thread (plain load + store), read by `notify` on any thread.
    notify_me: AtomicU32,
    /// Set by every `notify`, cleared by the home thread before it dispatches.
    notified: AtomicBool,
    /// The fd a sleeping loop is woken through.
    event: EventNotifier,
    /// Pending bottom halves.
    pub(crate) bhs: PendingBhs,
    /// The home thread: fixed for an ordinary context, the lock holder for a shared one.
    pub(crate) home: HomeThread,
    /// True from the moment a blocking iteration starts computing its timeout until its wait
    /// is over (and between an outer loop's `prepare` and `check`). Written and read only by
    /// the home thread, signal handlers included; see `wake_for_work`.
    window: AtomicBool,
    /// False once the loop side ([`Inner`]) is gone: nothing will ever run BHs again, so
    /// whoever schedules one frees it at once. Paired with the fence in `notify` (see there).
    alive: AtomicBool,
    /// Which protocol to run: the real one, or a deliberately broken one for a loom model.
    #[cfg(aio_loom)]
    variant: LoomVariant,
    /// How many times `notify` wrote the eventfd (a system call). Only counted on the write
    /// path, which already costs a system call, so counting is free where it matters.
    event_writes: AtomicU64,
    /// The adaptive-polling parameters, settable from any thread.
    poll_params: SharedParams,
    /// QEMU's `aio-max-batch` (0: each request engine's own default), settable from any thread.
    max_batch: AtomicU32,
    /// A number no other context has: names this context in its home thread's table
    /// (`remote::with_home_context`).
    id: u64,
    /// Operations other threads queued for the home thread (handler registrations, replacements
    /// and removals made through a [`ContextHandle`]).
    pub(crate) remote: RemoteOps,
    /// How many `disable_external` calls are in force, from any thread (QEMU
    /// `external_disable_cnt`, an atomic there too). The home thread reads it before
    /// dispatching an external handler and makes the monitor follow it (`Inner::sync_external`).
    external_disabled: AtomicU32,
    /// Creates timers on the context's group from any thread. Taken out when the loop is
    /// dropped: the group's notify callback holds this `Shared`, so keeping the lists here
    /// would be a cycle.
    timers: Mutex<Option<GroupHandle>>,
    /// The clocks the context's timers read, for reading them from any thread. No cycle: the
    /// clocks hold no timer list (a virtual clock knows its lists only weakly).
    clocks: Clocks,
}

impl Shared {
    /// Runs `f` on the home thread with the context and returns its result: at once on the
    /// home thread itself, otherwise by queueing it, waking the loop and sleeping until the
    /// loop has run it (after its next wait, before it dispatches).
    ///
    /// # Errors
    ///
    /// [`NoAnswer::Gone`] if the loop is gone, or goes before running `f` (which is then
    /// dropped without running, on the thread that drops the loop); [`NoAnswer::Panicked`] if
    /// the loop's thread dropped `f` while panicking (a panic in `f` itself, or an unwinding
    /// that dropped the loop).
    pub(crate) fn run_on_home<R: Send + 'static>(
        &self,
        f: impl FnOnce(&AioContext) -> R + Send + 'static,
    ) -> Result<R, NoAnswer> {
        if self.home.is_current() {
            return remote::with_home_context(self.id, |ctx| {
                // What a handle creates belongs to the root scope, wherever it is used.
                let _root = ctx.inner.scopes.enter_remote();
                f(ctx)
            })
            .ok_or(NoAnswer::Gone);
        }
        let (reply, sender) = Reply::new();
        self.remote
            .push(Box::new(move |ctx: &AioContext| sender.send(f(ctx))))?;
        self.notify();
        reply.wait()
    }

    /// Runs `f` on the home thread with the context, without waiting for it: at once on the
    /// home thread, otherwise at the loop's next iteration. Dropped without running if the
    /// loop is gone.
    pub(crate) fn post(&self, f: impl FnOnce(&AioContext) + Send + 'static) {
        if self.home.is_current() {
            remote::with_home_context(self.id, |ctx| {
                let _root = ctx.inner.scopes.enter_remote();
                f(ctx);
            });
            return;
        }
        if self.remote.push(Box::new(f)).is_ok() {
            self.notify();
        }
    }

    /// Wakes the loop if it sleeps or is about to (QEMU `aio_notify`). Any thread.
    pub(crate) fn notify(&self) {
        #[cfg(aio_loom)]
        if self.variant == LoomVariant::ReturnEarlyIfNotified
            && self.notified.load(Ordering::Relaxed)
        {
            // Deliberately broken (loom only): QEMU's BUG2, "already notified, skip it".
            return;
        }
        // An RMW, not a plain store, so that every write of `notified` is part of one release
        // sequence: the home thread's acquire `swap` in `accept` then synchronizes with every
        // notify whose `true` it consumes, making that notifier's earlier writes (a BH push, a
        // request flag) visible to the dispatch that follows. With QEMU's plain store, the
        // accept's `false` could be ordered after our `true` without synchronizing with it,
        // erasing the notification while our push stayed invisible: the loom model
        // `plain_store_accept_loses_a_wakeup` shows that lost wake-up.
        let checked = self.loom_bug2_check();
        let already = self.notified.swap(true, Ordering::Release);
        // Full fence: orders the write above before the load of `notify_me` below. It pairs
        // with the fence in `begin_blocking` (raise notify_me; fence; load notified); SeqCst
        // fences are what forbid both sides reading the other's old value.
        fence(Ordering::SeqCst);
        if self.notify_me.load(Ordering::Relaxed) != 0 && !self.loom_bug2_skip(checked, already) {
            self.write_event();
        }
    }

    /// Loom only: `SkipEventWriteIfReadTrue` reads `notified` before setting it (false otherwise).
    #[cfg(aio_loom)]
    fn loom_bug2_check(&self) -> bool {
        self.variant == LoomVariant::SkipEventWriteIfReadTrue
            && self.notified.load(Ordering::Relaxed)
    }

    /// Loom only: whether a deliberately broken variant skips this eventfd write, given what
    /// `loom_bug2_check` read and what the `swap` of `notified` returned.
    #[cfg(aio_loom)]
    fn loom_bug2_skip(&self, checked: bool, already: bool) -> bool {
        match self.variant {
            LoomVariant::SkipEventWriteIfReadTrue => checked,
            LoomVariant::SkipEventWriteIfSwapTrue => already,
            _ => false,
        }
    }

    #[cfg(not(aio_loom))]
    #[inline(always)]
    fn loom_bug2_check(&self) -> bool {
        false
    }

    #[cfg(not(aio_loom))]
    #[inline(always)]
    fn loom_bug2_skip(&self, _checked: bool, _already: bool) -> bool {
        false
    }

    /// Notify after scheduling work (a BH, a handler change): as [`notify`](Self::notify), but
    /// free when called on the home thread outside a blocking window.
    ///
    /// There the loop is not asleep (we are running on its thread) and has not yet computed
    /// the timeout of its next wait, which it does after this call in program order, so it
    /// will see the work and not sleep: the notification would only make one later blocking
    /// iteration return early for nothing. Inside the window (a signal handler interrupting
    /// the home thread between computing the timeout and the fenced re-check, or in the wait)
    /// it is needed, and done. This is tokio's "no self-wake" (tokio#7570); QEMU always
    /// notifies. An explicit `notify()` keeps QEMU's semantics.
    ///
    /// Never frees anything, so a plain schedule stays async-signal-safe.
    pub(crate) fn wake_for_work(&self) {
        self.wake_after_link();
    }

    /// Notify after linking a BH whose link owns a reference (a delete, a one-shot): as
    /// [`wake_for_work`](Self::wake_for_work), and if the loop is gone, free what is
    /// linked. Otherwise nobody would: a deleted BH whose closure holds a `BottomHalf` of its
    /// own context would be a reference cycle through this `Shared`.
    pub(crate) fn notify_transferred(&self) {
        if !self.wake_after_link() {
            drop(self.bhs.take_remote());
        }
    }

    /// Wakes the loop after a BH was linked, if needed, and returns whether the loop still
    /// exists, as seen after the link.
    ///
    /// `notify`'s full fence orders the caller's push before the load of `alive` below;
    /// `Inner::drop` stores `alive = false` and fences before it drains the lists. So either
    /// that drain sees the push, or this load sees `false` and the caller drains. On the home
    /// thread no fence is needed: `alive` changes only there (`Inner::drop`), in program order.
    fn wake_after_link(&self) -> bool {
        if self.home.is_current() {
            if !self.alive.load(Ordering::Relaxed) {
                return false;
            }
            if !self.window.load(Ordering::Relaxed) {
                return true;
            }
        }
        self.notify();
        self.alive.load(Ordering::Relaxed)
    }

    /// Opens or closes the blocking window (home thread only).
    fn set_window(&self, open: bool) {
        // Relaxed: only this thread (and its signal handlers) read it; the signal fence keeps
        // the compiler from moving it across the timeout computation or the wait.
        signal_fence();
        self.window.store(open, Ordering::Relaxed);
        signal_fence();
    }

    fn write_event(&self) {
        // Relaxed: a statistic; nothing is ordered by it.
        self.event_writes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.event.set() {
            // Only EBADF-like failures reach here (EAGAIN means "already set"); the loop would
            // then not wake, so say so loudly.
            tracing::error!("aio: cannot write the context's event notifier: {e}");
        }
    }

    /// Raises `notify_me` before a blocking wait and reports whether a notify has already
    /// arrived, in which case the wait must not block. Home thread only.
    fn begin_blocking(&self, step: u32) -> bool {
        // Single writer (the home thread), so a load and a store stand in for an RMW.
        let old = self.notify_me.load(Ordering::Relaxed);
        self.notify_me.store(old + step, Ordering::Relaxed);
        // Full fence: pairs with the one in `notify` (see there).
        fence(Ordering::SeqCst);
        self.notified.load(Ordering::Relaxed)
    }

    /// Lowers `notify_me` after the wait. Home thread only.
    fn end_blocking(&self, step: u32) {
        let old = self.notify_me.load(Ordering::Relaxed);
        // Release: the wait is finished before a notifier can see `notify_me == 0` and skip the
        // eventfd write (QEMU: "finish the poll before clearing").
        self.notify_me.store(old - step, Ordering::Release);
    }

    /// Consumes the pending notification before dispatching (QEMU `aio_notify_accept`). Home
    /// thread only.
    fn accept(&self) {
        #[cfg(aio_loom)]
        if self.variant == LoomVariant::PlainStoreAccept {
            // Deliberately broken (loom only): QEMU's literal `notified = false`.
            self.notified.store(false, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            return;
        }
        // QEMU follows its clear with a full barrier; the C11 argument here needs none:
        //
        // * The clear is an acquire RMW, so it reads the latest `true` in modification order
        //   and, through the release sequence of RMWs (see `notify`), synchronizes with every
        //   notifier whose `true` it consumes: their BHs and flags are visible to the dispatch
        //   that follows.
        // * A notifier whose `true` comes later is not consumed: `notified` stays set, and the
        //   next blocking iteration's fenced re-check (`begin_blocking`) sees it and does not
        //   sleep.
        //
        // For the same reason a `false` read by the relaxed load lets us skip the RMW: a `true`
        // we miss is simply handled by the next iteration. Together this saves a locked
        // instruction and an `mfence` per iteration. The loom models check the argument (and
        // `plain_store_accept_loses_a_wakeup` shows what happens without the RMW).
        if self.notified.load(Ordering::Relaxed) {
            self.notified.swap(false, Ordering::Acquire);
        }
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("notify_me", &self.notify_me.load(Ordering::Relaxed))
            .field("notified", &self.notified.load(Ordering::Relaxed))
            .field("event", &self.event)
            .finish()
    }
}

/// A function that runs completions of work done by a backend; see
/// [`AioContext::add_completion_source`].
pub type CompletionSource = Rc<dyn Fn(&AioContext) -> bool>;

/// The part of a context that only its home thread touches.
pub(crate) struct Inner {
    pub(crate) shared: Arc<Shared>,
    pub(crate) monitor: RefCell<Box<dyn FdMonitor>>,
    pub(crate) registry: RefCell<Registry>,
    /// Active BH slices, front first (one per BH pass on the stack).
    slices: RefCell<VecDeque<Slice>>,
    /// Spare ready lists, so that polls (nested ones too) allocate nothing in steady state.
    spare_ready: RefCell<Vec<ReadyList>>,
    /// Id of the latest iteration (or outer-loop dispatch); see `HandlerNode::epoch`.
    epoch: Cell<u64>,
    /// Whether external handlers are out of the monitor: follows
    /// `Shared::external_disabled > 0` (see `sync_external`).
    external_unwatched: Cell<bool>,
    /// Readiness collected by `check` for `dispatch` when an outer loop drives the context.
    outer_ready: RefCell<ReadyList>,
    /// The context's timers, one list per clock (QEMU `ctx->tlg`).
    pub(crate) timers: TimerListGroup,
    /// Per-context singletons of crates built on the loop (QEMU keeps such things, like the
    /// thread pool, as fields of `AioContext`; core cannot name their types). See
    /// [`AioContext::local`].
    locals: RefCell<Vec<Rc<dyn Any>>>,
    /// Completion sources run after the BHs of every iteration (see
    /// [`AioContext::add_completion_source`]).
    completion_sources: RefCell<Vec<CompletionSource>>,
    /// Home-thread counters for [`Stats`].
    waits: Cell<u64>,
    /// Loop iterations (outer-loop dispatches included), BH, fd-handler and timer callbacks
    /// run, and task polls, for [`Stats`].
    iterations: Cell<u64>,
    bh_calls: Cell<u64>,
    handler_calls: Cell<u64>,
    timer_calls: Cell<u64>,
    pub(crate) task_polls: Cell<u64>,
    wait_errors: Cell<u64>,
    event_drains: Cell<u64>,
    /// How many backend waits in a row have failed (0 after a successful one): sets the
    /// back-off and keeps the log quiet.
    failed_waits: Cell<u32>,
    /// Adaptive polling, home-thread side.
    polling: Polling,
    /// How many iterations of this context are on the stack (1 in an outermost one).
    depth: Cell<u32>,
    /// The context's tasks (see `task.rs`).
    pub(crate) tasks: crate::task::Tasks,
    /// Isolation scopes (see `scope.rs`).
    pub(crate) scopes: Rc<Scopes>,
    /// BHs unlinked by a pass while their scope was held, oldest first.
    held_bhs: RefCell<bh::Held>,
    /// Whether a [`SharedContext`](crate::SharedContext) owns this context: then
    /// [`AioContext::current`] never hands it out ([SHARED-1]).
    pub(crate) in_shared: Cell<bool>,
}

/// The home thread's adaptive-polling state (docs/qemu-semantics.md §4.3).
#[derive(Default)]
struct Polling {
    /// The parameters in force, and the generation of `Shared::poll_params` they came from.
    params: Cell<PollParams>,
    generation: Cell<u64>,
    /// The handlers that polling looks at (QEMU `poll_aio_handlers`): each joined when it was
    /// dispatched by fd readiness; removed ones are taken out at once.
    set: RefCell<Vec<Rc<HandlerNode>>>,
    /// Whether the loop is in polling mode: `on_poll_begin` was called on the members and
    /// `on_poll_end` not yet (QEMU `poll_started`).
    started: Cell<bool>,
    /// The context's window under [`PollPolicy::Weighted`], in ns.
    weighted_ns: Cell<u64>,
    /// Poll hits found while an outer loop's `prepare` left polling mode, for its `dispatch`.
    outer_hits: RefCell<Vec<Rc<HandlerNode>>>,
    /// Spare hit lists, so that iterations allocate nothing in steady state.
    spare_hits: RefCell<Vec<Vec<Rc<HandlerNode>>>>,
    /// A spare list for [`Inner::members`].
    spare_members: RefCell<Vec<Rc<HandlerNode>>>,
    /// Scratch for the weighted adjustment.
    scratch: RefCell<Vec<Window>>,
    /// Statistics.
    time_ns: Cell<u64>,
    hits: Cell<u64>,
    misses: Cell<u64>,
}

/// Decrements the iteration depth when an iteration ends, unwinding included.
struct DepthGuard<'a>(&'a Cell<u32>);

impl<'a> DepthGuard<'a> {
    /// Enters an iteration; returns the guard and whether the iteration is nested.
    fn enter(depth: &'a Cell<u32>) -> (DepthGuard<'a>, bool) {
        let d = depth.get();
        depth.set(d + 1);
        (DepthGuard(depth), d > 0)
    }
}

impl Drop for DepthGuard<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

impl Inner {
    fn next_ready_list(&self) -> ReadyList {
        self.spare_ready.borrow_mut().pop().unwrap_or_default()
    }

    fn recycle_ready_list(&self, mut list: ReadyList) {
        list.clear();
        self.spare_ready.borrow_mut().push(list);
    }

    /// The timeout the BHs and the timers allow (QEMU `aio_compute_timeout`).
    fn compute_timeout(&self) -> Option<Duration> {
        // Held BHs count only once their scope may run (after it ended): until then they do
        // not shorten the wait.
        if self.held_bhs_ready() {
            return Some(Duration::ZERO);
        }
        let mut t = self.shared.bhs.timeout();
        if t != BhTimeout::Now {
            for slice in self.slices.borrow().iter() {
                t = match (t, slice.timeout()) {
                    (_, BhTimeout::Now) => BhTimeout::Now,
                    (BhTimeout::None, other) => other,
                    (keep, _) => keep,
                };
                if t == BhTimeout::Now {
                    break;
                }
            }
        }
        let bhs = match t {
            BhTimeout::Now => return Some(Duration::ZERO),
            BhTimeout::Idle => Some(IDLE_BH_TIMEOUT),
            BhTimeout::None => None,
        };
        // The earliest deadline of the enabled clocks, in nanoseconds: passed to the backend
        // unrounded (QEMU rounds up to milliseconds only for epoll_wait and glib).
        match (bhs, self.timers.deadline()) {
            (None, timer) => timer,
            (bhs, None) => bhs,
            (Some(a), Some(b)) => Some(a.min(b)),
        }
    }

    /// Runs the pending BHs (QEMU `aio_bh_poll`), draining outer slices first.
    /// Runs one BH popped from a slice or the held queue, counting it for [`Stats`].
    fn dispatch_bh(&self, node: bh::NodePtr) -> bool {
        match bh::dispatch(node, &self.shared) {
            Some(progress) => {
                self.bh_calls.set(self.bh_calls.get() + 1);
                progress
            }
            None => false,
        }
    }

    /// Runs the timers that are due, counting them for [`Stats`].
    fn run_timers(&self) -> bool {
        let _span = phase_span(|| tracing::trace_span!("aio_timers"));
        let ran = self.timers.run_expired_count();
        self.timer_calls.set(self.timer_calls.get() + ran);
        ran > 0
    }

    pub(crate) fn bh_poll(&self) -> bool {
        let (remote, local) = self.shared.bhs.take();
        let held = self.held_bhs_ready();
        if remote.is_empty() && local.is_empty() && self.slices.borrow().is_empty() && !held {
            return false;
        }
        let _span = phase_span(|| tracing::trace_span!("aio_bh_pass"));
        let mut progress = false;
        {
            let mut slices = self.slices.borrow_mut();
            for slice in [remote, local] {
                if !slice.is_empty() {
                    slices.push_back(slice);
                }
            }
        }
        loop {
            // What a scope that ended held comes first, in its order, also when the scope
            // ended inside a callback of this pass. One at a time, so that a nested pass (or
            // the next one, after a panic) finds the rest still held.
            let held = self
                .held_bhs
                .borrow_mut()
                .take_first(|s| self.scopes.allows(s));
            if let Some(node) = held {
                progress |= self.dispatch_bh(node);
                continue;
            }
            // Hold the queue's borrow only while unlinking one node: its callback may poll
            // again, and the nested pass must see (and drain) what is left of ours.
            let node = {
                let mut slices = self.slices.borrow_mut();
                loop {
                    let Some(front) = slices.front_mut() else {
                        break None;
                    };
                    match front.pop() {
                        Some(node) => break Some(node),
                        None => drop(slices.pop_front()),
                    }
                }
            };
            let Some((node, scope)) = node else { break };
            if self.scopes.allows(scope) {
                progress |= self.dispatch_bh(node);
            } else {
                // An outer scope's BH: keep it pending, in order, until its scope may run.
                self.held_bhs.borrow_mut().push(node, scope);
            }
        }
        progress
    }

    /// Whether a held BH may run now.
    fn held_bhs_ready(&self) -> bool {
        self.held_bhs.borrow().any(|s| self.scopes.allows(s))
    }

    /// Marks `node` deleted, forgets its key and tells the monitor.
    pub(crate) fn remove_node(&self, key: HandlerKey) {
        let removed = self.registry.borrow_mut().remove(key);
        let Some(node) = removed else {
            return;
        };
        if node.in_monitor.replace(false) {
            let change = Change::Remove { key, fd: node.fd };
            let result = self.monitor.borrow_mut().update(change);
            if let Err(e) = result {
                tracing::warn!("aio: backend failed to forget fd {}: {e}", node.fd);
            }
        }
        self.shared.wake_for_work();
        // Out of the poll set, with `on_poll_end` if it is in polling mode: its producer's
        // kicks come back. No borrow is held; `node` keeps the last reference until the end.
        self.leave_poll_set(&node);
        // Last, with no borrow held: its callbacks may own other handlers, whose drop comes
        // back here (QEMU frees the node outside the list lock for the same reason).
        drop(node);
    }

    /// Runs the monitor's wait, counting it for [`Stats`]. A failure (the backend contract
    /// allows only non-`EINTR` errors here: `ENOMEM`, or `EPERM` from a seccomp filter) is
    /// counted, logged (the first of a run, then at each power of two) and returned with
    /// `ready` cleared; the caller decides between backing off and returning it.
    fn wait(&self, ready: &mut ReadyList, timeout: Option<Duration>) -> io::Result<()> {
        self.waits.set(self.waits.get() + 1);
        // End the mutable borrow before logging, which borrows the monitor again for its name.
        let result = self.monitor.borrow_mut().wait(ready, timeout);
        let in_a_row = self.failed_waits.get();
        match result {
            Ok(_) => {
                if in_a_row > 0 {
                    self.failed_waits.set(0);
                    let backend = self.monitor.borrow().name();
                    tracing::info!(
                        "aio: {backend} backend wait works again after {in_a_row} failures"
                    );
                }
                Ok(())
            }
            Err(e) => {
                ready.clear();
                let in_a_row = in_a_row.saturating_add(1);
                self.failed_waits.set(in_a_row);
                self.wait_errors.set(self.wait_errors.get() + 1);
                if in_a_row.is_power_of_two() {
                    let backend = self.monitor.borrow().name();
                    tracing::warn!("aio: {backend} backend wait failed ({in_a_row} in a row): {e}");
                }
                Err(e)
            }
        }
    }

    /// After a failed wait, sleeps in place of the wait that did not happen, so that a backend
    /// whose wait keeps failing does not turn `poll` into a busy loop: [`BACKOFF_FIRST`],
    /// doubling with each consecutive failure up to [`BACKOFF_MAX`], never past `timeout` (a
    /// BH or timer that is due is not delayed). The sleep is a wait on the context's own
    /// eventfd, so a [`notify`](AioContext::notify) (a remote BH, a timer armed from another
    /// thread) still ends it. Called inside the blocking window, with `notify_me` raised.
    fn back_off(&self, timeout: Option<Duration>) {
        let in_a_row = self.failed_waits.get();
        if in_a_row == 0 {
            return;
        }
        let step = BACKOFF_FIRST
            .saturating_mul(1 << (in_a_row - 1).min(16))
            .min(BACKOFF_MAX);
        let sleep = timeout.map_or(step, |t| t.min(step));
        if sleep.is_zero() {
            return;
        }
        let shared = &*self.shared;
        // The failing backend never reports the eventfd, so nobody drains it: drain it here,
        // or a stale wake-up would end every back-off at once.
        if shared.event.test_and_clear() {
            self.event_drains.set(self.event_drains.get() + 1);
        }
        // A notify whose eventfd write we just drained set `notified` before writing. Relaxed:
        // this only decides whether to sleep; a `true` seen late costs one back-off step at
        // most, never a wake-up, because the iteration accepts and runs BHs after sleeping.
        if shared.notified.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = sys::wait_readable(shared.event.raw_fd(), sleep) {
            tracing::debug!("aio: back-off wait on the eventfd failed ({e}); sleeping instead");
            std::thread::sleep(sleep);
        }
    }

    fn external_disabled(&self) -> bool {
        // Acquire: pairs with the Release of `disable_external` on another thread, so that a
        // handler skipped because of a disable sees what the disabler wrote before it.
        self.shared.external_disabled.load(Ordering::Acquire) > 0
    }

    /// Makes the monitor follow the external-disable count, which any thread may change:
    /// takes external handlers out of it while disabled (a level-triggered fd left armed but
    /// not dispatched would end every wait at once) and puts them back after. Home thread.
    fn sync_external(&self) {
        let disabled = self.external_disabled();
        if self.external_unwatched.get() != disabled {
            self.external_unwatched.set(disabled);
            self.sync_watched();
        }
    }

    /// Whether the monitor should watch `node` now: not if it is external while external
    /// handlers are out of the monitor, nor if it belongs to a scope held by the innermost
    /// isolation scope.
    fn should_watch(&self, node: &HandlerNode) -> bool {
        !(node.external && self.external_unwatched.get()) && self.scopes.allows(node.scope)
    }

    /// Whether `node` may be dispatched now (external and scope rules).
    fn may_dispatch(&self, node: &HandlerNode) -> bool {
        !(node.external && self.external_disabled()) && self.scopes.allows(node.scope)
    }

    /// Whether the monitor does not follow the external-disable count yet (for `check`).
    fn sync_external_pending(&self) -> bool {
        self.external_unwatched.get() != self.external_disabled()
    }

    /// Applies what other threads asked for since the last time: queued handler operations,
    /// and the external-disable count. Home thread: before the wait and after `accept` (before
    /// dispatching) in every iteration, in an outer loop's `dispatch`, and while the home
    /// thread itself waits for another loop (`remote::serve_own`).
    pub(crate) fn apply_remote(&self, ctx: &AioContext) {
        self.sync_external();
        if !self.shared.remote.is_pending() {
            return;
        }
        // Run with no lock held: an operation may queue another (a dropped callback owning a
        // `RemoteFdHandler`), which then runs at the next iteration. If one panics (a refused
        // callback's drop), the panic propagates out of `poll` and the rest go back in front of
        // the queue for the next iteration, rather than being dropped unanswered.
        struct Rest<'a>(&'a RemoteOps, VecDeque<remote::HomeOp>);
        impl Drop for Rest<'_> {
            fn drop(&mut self) {
                if !self.1.is_empty() {
                    self.0.requeue_front(std::mem::take(&mut self.1));
                }
            }
        }
        let mut rest = Rest(&self.shared.remote, self.shared.remote.take().into());
        // What other threads create belongs to the root scope.
        let _root = self.scopes.enter_remote();
        while let Some(op) = rest.1.pop_front() {
            op(ctx);
        }
    }

    /// Takes out of the monitor the handlers that must not be dispatched now (external ones
    /// while disabled, those of scopes held by the innermost isolation scope), or puts them
    /// back. Backends cannot filter fds by themselves (epoll and io_uring report whatever is
    /// armed), and leaving a level-triggered fd armed but undispatched would make every wait
    /// return at once.
    pub(crate) fn sync_watched(&self) {
        let registry = self.registry.borrow();
        let mut monitor = self.monitor.borrow_mut();
        for (node, watched) in registry
            .nodes()
            .map(|n| (n, self.should_watch(n)))
            .filter(|(n, watched)| n.in_monitor.get() != *watched)
        {
            let change = if watched {
                Change::Add {
                    key: node.key,
                    fd: node.fd,
                    interest: node.interest,
                }
            } else {
                Change::Remove {
                    key: node.key,
                    fd: node.fd,
                }
            };
            match monitor.update(change) {
                Ok(()) => node.in_monitor.set(watched),
                Err(e) => tracing::warn!("aio: cannot re-arm fd {}: {e}", node.fd),
            }
        }
    }

    /// Applies parameters set since the last iteration: every window goes back to 0 (QEMU
    /// `aio_context_set_poll_params`).
    fn refresh_poll_params(&self) -> PollParams {
        let polling = &self.polling;
        let generation = self.shared.poll_params.generation();
        if generation != polling.generation.get() {
            polling.generation.set(generation);
            let params = self.shared.poll_params.get();
            polling.params.set(params);
            polling.weighted_ns.set(0);
            for node in polling.set.borrow().iter() {
                node.window.set(Window::default());
            }
            tracing::debug!(?params, "aio: polling parameters changed; windows reset");
        }
        polling.params.get()
    }

    /// How long the next blocking iteration may poll: the largest window of the poll set
    /// (Qemu10) or the context's window (Weighted); 0 when polling is disabled.
    fn poll_window_ns(&self, params: &PollParams) -> u64 {
        if params.is_disabled() {
            return 0;
        }
        match params.get_policy() {
            PollPolicy::Weighted { .. } => self.polling.weighted_ns.get(),
            _ => self
                .polling
                .set
                .borrow()
                .iter()
                .map(|n| n.window.get().ns)
                .max()
                .unwrap_or(0),
        }
    }

    /// Calls `node`'s poll function, or for the context's notifier reads `notified`. `None`
    /// when the node is not polled now (removed, paused, external and disabled, or its poll
    /// function is already running).
    fn poll_node(&self, node: &HandlerNode) -> Option<bool> {
        if node.deleted.get() || node.poll_paused.get() {
            return None;
        }
        match node.kind {
            // Relaxed: a hint; `accept` (an acquire RMW) synchronizes before BHs run.
            NodeKind::Notifier => Some(self.shared.notified.load(Ordering::Relaxed)),
            NodeKind::User if !self.may_dispatch(node) => None,
            NodeKind::User => node.call_poll(),
        }
    }

    /// The time that adaptive polling measures block times and idle members on, in ns: the
    /// context's [`ClockType::Realtime`] (QEMU `QEMU_CLOCK_REALTIME`). A test that gives the
    /// context a manual realtime clock makes the adaptation deterministic.
    fn clock_ns(&self) -> u64 {
        self.timers.now_ns(ClockType::Realtime)
    }

    /// One pass over the poll set (QEMU `run_poll_handlers_once`). Pushes the members that
    /// have work to `hits`; returns how many user members were polled.
    /// `members` is the set as the polling phase began ([`members`](Self::members)); one that
    /// left it since (removed by a callback) is skipped.
    fn poll_round(&self, members: &[Rc<HandlerNode>], hits: &mut Vec<Rc<HandlerNode>>) -> usize {
        let mut polled = 0;
        for node in members {
            if !node.in_poll_set.get() {
                continue;
            }
            let Some(found) = self.poll_node(node) else {
                continue;
            };
            if node.kind == NodeKind::User {
                polled += 1;
            }
            if found {
                node.idle_deadline
                    .set(Some(self.clock_ns().saturating_add(IDLE_INTERVAL_NS)));
                if !hits.iter().any(|h| Rc::ptr_eq(h, node)) {
                    hits.push(node.clone());
                }
            }
        }
        polled
    }

    /// The poll set as it is now, cloned, so that callbacks run over it may add or remove
    /// members (a removal shifts the set) without one being skipped. Hand it back with
    /// [`recycle_members`](Self::recycle_members).
    fn members(&self) -> Vec<Rc<HandlerNode>> {
        let mut v = std::mem::take(&mut *self.polling.spare_members.borrow_mut());
        v.extend(self.polling.set.borrow().iter().cloned());
        v
    }

    fn recycle_members(&self, mut v: Vec<Rc<HandlerNode>>) {
        // Clear with no borrow held: this may drop the last reference to a removed node.
        v.clear();
        *self.polling.spare_members.borrow_mut() = v;
    }

    /// Enters polling mode: `on_poll_begin` on every member (QEMU `poll_set_started(true)`).
    fn enter_poll_mode(&self) {
        if self.polling.started.replace(true) {
            return;
        }
        let members = self.members();
        for node in &members {
            // A member removed by an earlier `on_poll_begin` has left the set.
            if node.in_poll_set.get() && !node.deleted.get() {
                node.begin_poll_mode();
            }
        }
        self.recycle_members(members);
    }

    /// Leaves polling mode before a backend wait: `on_poll_end` on every member, then one more
    /// poll of each, so that work which arrived while kicks were suppressed is not slept
    /// through (QEMU `poll_set_started(false)`). The member whose poll-ready callback is
    /// running (this is then a nested iteration) gets `on_poll_end` too but is not polled
    /// (`poll_node` skips it). Pushes what it finds to `hits` and returns whether it found
    /// anything.
    fn leave_poll_mode(&self, hits: &mut Vec<Rc<HandlerNode>>) -> bool {
        if !self.polling.started.replace(false) {
            return false;
        }
        let mut found = false;
        let members = self.members();
        for node in &members {
            node.end_poll_mode();
            if node.in_poll_set.get() && self.poll_node(node) == Some(true) {
                found = true;
                if !hits.iter().any(|h| Rc::ptr_eq(h, node)) {
                    hits.push(node.clone());
                }
            }
        }
        self.recycle_members(members);
        found
    }

    /// Takes `node` out of the poll set (removed, replaced): with `on_poll_end` if it is in
    /// polling mode. Call with no borrow held.
    fn leave_poll_set(&self, node: &Rc<HandlerNode>) {
        if node.in_poll_set.replace(false) {
            // Drops a clone only: the caller keeps a reference.
            self.polling
                .set
                .borrow_mut()
                .retain(|n| !Rc::ptr_eq(n, node));
            if self.polling.set.borrow().is_empty() {
                self.polling.weighted_ns.set(0);
            }
        }
        node.end_poll_mode();
    }

    /// Busy-polls for up to the polling window, before a blocking wait (QEMU `try_poll_mode`
    /// and `run_poll_handlers`). Leaves early when a member has work or the backend has
    /// something to reap (`must_wait`). On a hit the timeout becomes zero; otherwise the time
    /// spent is taken off it, keeping the same deadline. Returns how many user members the last
    /// round polled.
    fn try_poll_mode(
        &self,
        params: &PollParams,
        timeout: &mut Option<Duration>,
        hits: &mut Vec<Rc<HandlerNode>>,
    ) -> usize {
        let window = Duration::from_nanos(self.poll_window_ns(params));
        let window = timeout.map_or(window, |t| t.min(window));
        if window.is_zero() || !self.ready_to_poll() {
            return 0;
        }
        self.enter_poll_mode();
        // The busy loop is bounded in real time, whatever clock the context reads: a stopped
        // manual clock cannot make it spin.
        let start = Instant::now();
        // One snapshot for the whole phase: no borrow or clone per member per round.
        let members = self.members();
        let (polled, elapsed) = loop {
            let polled = self.poll_round(&members, hits);
            let elapsed = start.elapsed();
            if !hits.is_empty() || elapsed >= window || self.backend_must_wait() {
                break (polled, elapsed);
            }
        };
        self.recycle_members(members);
        self.remove_idle_members(self.clock_ns(), hits);
        let polling = &self.polling;
        polling
            .time_ns
            .set(polling.time_ns.get() + elapsed.as_nanos() as u64);
        if hits.is_empty() {
            polling.misses.set(polling.misses.get() + 1);
            *timeout = timeout.map(|t| t.saturating_sub(elapsed));
        } else {
            polling.hits.set(polling.hits.get() + 1);
            *timeout = Some(Duration::ZERO);
        }
        polled
    }

    /// Whether the backend knows it has something only its wait delivers (`must_wait` is
    /// `Some(true)`); a backend that cannot tell leaves the loop free to poll.
    fn backend_must_wait(&self) -> bool {
        self.monitor.borrow().must_wait() == Some(true)
    }

    /// Whether the backend lets the loop busy-poll now: it has nothing only its wait delivers,
    /// at once or after it submitted what it had queued (io_uring's re-arms after a dispatch).
    fn ready_to_poll(&self) -> bool {
        if !self.backend_must_wait() {
            return true;
        }
        let prepared = self.monitor.borrow_mut().prepare_polling();
        if let Err(e) = prepared {
            tracing::debug!("aio: the backend could not prepare for polling ({e}); waiting");
            return false;
        }
        !self.backend_must_wait()
    }

    /// Takes out of the poll set the members that polling has not found ready for
    /// [`IDLE_INTERVAL_NS`] (QEMU `remove_idle_poll_handlers`). Such a handler is still watched
    /// by the backend, and every zero-timeout iteration then waits for it, so leaving is safe
    /// on every backend. In polling mode it gets `on_poll_end` and one last poll.
    fn remove_idle_members(&self, now: u64, hits: &mut Vec<Rc<HandlerNode>>) {
        let mut idle = Vec::new();
        for node in self.polling.set.borrow().iter() {
            match node.idle_deadline.get() {
                None => node
                    .idle_deadline
                    .set(Some(now.saturating_add(IDLE_INTERVAL_NS))),
                Some(deadline) if now >= deadline && !node.poll_paused.get() => {
                    idle.push(node.clone());
                }
                Some(_) => {}
            }
        }
        if idle.is_empty() {
            return;
        }
        self.polling
            .set
            .borrow_mut()
            .retain(|n| !idle.iter().any(|i| Rc::ptr_eq(i, n)));
        for node in idle {
            node.in_poll_set.set(false);
            node.idle_deadline.set(None);
            node.window.set(Window::default());
            tracing::debug!(
                fd = node.fd,
                "aio: handler idle for 7 s leaves the poll set"
            );
            if self.polling.started.get() && !node.deleted.get() {
                node.end_poll_mode();
                if self.poll_node(&node) == Some(true) && !hits.iter().any(|h| Rc::ptr_eq(h, &node))
                {
                    hits.push(node);
                }
            }
        }
    }

    /// A handler dispatched because its fd was ready joins the poll set, if it can be polled
    /// ("activity is likely to continue").
    fn join_poll_set(&self, node: &Rc<HandlerNode>) {
        if node.deleted.get() || node.in_poll_set.get() || !node.can_poll() {
            return;
        }
        node.in_poll_set.set(true);
        node.idle_deadline.set(None);
        self.polling.set.borrow_mut().push(node.clone());
        tracing::debug!(fd = node.fd, "aio: handler joins the poll set");
        if self.polling.started.get() {
            node.begin_poll_mode();
        }
    }

    /// After dispatching a member: adjusts its window from the iteration's block time
    /// (Qemu10), or marks that it had an event (Weighted).
    fn note_dispatched(&self, node: &HandlerNode, block_ns: Option<u64>) {
        let Some(block_ns) = block_ns else { return };
        if !node.in_poll_set.get() {
            return;
        }
        let params = self.polling.params.get();
        let mut w = node.window.get();
        match params.get_policy() {
            PollPolicy::Weighted { .. } => w.has_event = true,
            _ => {
                if let Some((old, new)) = polling::adjust_qemu10(&params, &mut w.ns, block_ns) {
                    tracing::debug!(
                        fd = node.fd,
                        old,
                        new,
                        block_ns,
                        "aio: poll window adjusted"
                    );
                }
            }
        }
        node.window.set(w);
    }

    /// Weighted: updates every member's estimate and the context window once per iteration.
    fn adjust_weighted(&self, block_ns: Option<u64>) {
        let Some(block_ns) = block_ns else { return };
        let params = self.polling.params.get();
        if !matches!(params.get_policy(), PollPolicy::Weighted { .. }) {
            return;
        }
        let set = self.polling.set.borrow();
        let mut scratch = self.polling.scratch.borrow_mut();
        scratch.clear();
        scratch.extend(set.iter().map(|n| n.window.get()));
        let mut ctx_ns = self.polling.weighted_ns.get();
        if let Some((old, new)) =
            polling::adjust_weighted(&params, &mut ctx_ns, scratch.iter_mut(), block_ns)
        {
            tracing::debug!(old, new, block_ns, "aio: weighted poll window adjusted");
        }
        self.polling.weighted_ns.set(ctx_ns);
        for (node, w) in set.iter().zip(scratch.iter()) {
            node.window.set(*w);
        }
    }

    fn take_hits(&self) -> Vec<Rc<HandlerNode>> {
        self.polling
            .spare_hits
            .borrow_mut()
            .pop()
            .unwrap_or_default()
    }

    fn recycle_hits(&self, mut hits: Vec<Rc<HandlerNode>>) {
        // Clear with no borrow held: this may drop the last reference to a removed node.
        hits.clear();
        self.polling.spare_hits.borrow_mut().push(hits);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Tasks first, without polling them: their futures may own BHs, timers and handler
        // registrations of this context, whose drops are cheaper while it is still whole.
        self.tasks.drop_all();
        // Other threads' operations: none will run. Dropping them wakes their callers with
        // `ContextGone` and frees their callbacks here; a callback that owns a
        // `RemoteFdHandler` of this context finds the queue closed and leaves it alone.
        remote::unregister_home(self.shared.id);
        drop(self.shared.remote.close());
        drop(sync::lock(&self.shared.timers).take());
        // Runs no callback: drop the BHs still queued (one-shots and deleted ones are freed,
        // scheduled ones simply stop being pending), then every handler. From here on,
        // schedulers free what they queue (see `Shared::notify`); the fence pairs with theirs.
        self.shared.alive.store(false, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.slices.get_mut().clear();
        drop(std::mem::take(self.held_bhs.get_mut()));
        drop(self.shared.bhs.close_local());
        drop(self.shared.bhs.take_remote());
        self.registry.get_mut().clear();
        self.polling.set.get_mut().clear();
        self.polling.outer_hits.get_mut().clear();
        // Last, in reverse order of creation: a later singleton may depend on an earlier one.
        while let Some(local) = self.locals.get_mut().pop() {
            drop(local);
        }
    }
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner")
            .field("shared", &self.shared)
            .field("monitor", &self.monitor)
            .field("external_disabled", &self.external_disabled())
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// The context this thread is polling, innermost first (QEMU
    /// `qemu_get_current_aio_context`). Null when none. (Not a `const` initializer: loom's
    /// `thread_local!` does not accept one.)
    #[allow(clippy::missing_const_for_thread_local)]
    static CURRENT: Cell<*const Inner> = Cell::new(std::ptr::null());
}

/// Makes a context current for the duration of a poll, restoring the previous one after. It
/// also hides the task being polled, if any (an iteration nested in a task's poll runs other
/// callbacks, which are not that task), until the iteration ends.
pub(crate) struct CurrentGuard {
    previous: *const Inner,
    _task: Option<crate::task::RunningGuard>,
}

impl CurrentGuard {
    pub(crate) fn enter(inner: *const Inner) -> CurrentGuard {
        CurrentGuard {
            previous: CURRENT.with(|c| c.replace(inner)),
            _task: crate::task::hide_running(),
        }
    }
}

impl Drop for CurrentGuard {
    fn drop(&mut self) {
        let previous = self.previous;
        CURRENT.with(|c| c.set(previous));
    }
}

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
            read: None,
            write: None,
            poll: PollCallbacks::default(),
            external: false,
            kind: NodeKind::Notifier,
            gate: None,
        };
        ctx.add_node(parts, Interest::READ, None)?;
        Ok(ctx)
    }

    /// Makes this context the current one (and hides the running task) until the guard drops:
    /// for `block_on`'s polls of its future, which run outside any iteration.
    pub(crate) fn enter_current(&self) -> CurrentGuard {
        CurrentGuard::enter(Rc::as_ptr(&self.inner))
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

    /// The context this thread is polling right now, if any (QEMU
    /// `qemu_get_current_aio_context`). Inside a callback, this is the context running it.
    ///
    /// `None` while the innermost context polled on this thread belongs to a
    /// [`SharedContext`](crate::SharedContext): a shared context is never reachable as an
    /// `AioContext` (that would let an `Rc` of it stay on a thread that no longer holds it).
    /// Use [`SharedContext::current`](crate::SharedContext::current) there, which names the
    /// shared context the calling thread holds.
    pub fn current() -> Option<AioContext> {
        let ptr = CURRENT.with(|c| c.get());
        if ptr.is_null() {
            return None;
        }
        // `ptr` was set by `CurrentGuard::enter` from `Rc::as_ptr` of a context whose
        // iteration (`poll`, `dispatch`) or `block_on` frame is still on this thread's stack
        // (the guard lives in that frame and restores the previous value when it ends,
        // unwinding included), and that frame borrows an `AioContext`, so the `Rc` has a
        // strong count of at least one and we may add one.
        // SAFETY: justified in the comment just above.
        let ctx = unsafe {
            Rc::increment_strong_count(ptr);
            AioContext {
                inner: Rc::from_raw(ptr),
            }
        };
        // A shared context's clone is dropped here, on the thread that polls it (so holds
        // it), and never reaches the caller ([SHARED-1]).
        (!ctx.inner.in_shared.get()).then_some(ctx)
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
        let found = self
            .inner
            .locals
            .borrow()
            .iter()
            .find_map(|l| l.clone().downcast::<T>().ok());
        if let Some(value) = found {
            return value;
        }
        let value = Rc::new(init(self));
        self.inner.locals.borrow_mut().push(value.clone());
        value
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
    /// takes their completions). `f` must not call the monitor's [`FdMonitor`] methods (the
    /// context owns the watched set and the waits), and must not touch the context: the
    /// backend is borrowed for the duration of the call, so a call back into the loop panics.
    pub fn with_backend<R>(&self, f: impl FnOnce(Option<&mut dyn Any>) -> R) -> R {
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

    /// Runs one loop iteration, sleeping until there is something to do (QEMU
    /// `aio_poll(ctx, true)`). Returns whether progress was made: whether a user callback ran.
    ///
    /// It sleeps until an fd handler is ready, a BH is scheduled or [`notify`](Self::notify)
    /// is called, and does not sleep at all if a BH is already scheduled. Being woken by a bare
    /// notify is not progress, so this returns false then. It may be called from inside any
    /// callback (a nested iteration), as QEMU's `AIO_WAIT_WHILE` does.
    ///
    /// # Backend failures
    ///
    /// A backend wait that fails (an error other than `EINTR`: `ENOMEM`, or `io_uring_enter`
    /// refused by a seccomp filter) is counted in [`Stats::wait_errors`], logged, and treated as
    /// a wait in which no fd was ready: BHs and timers still run. The iteration then backs off
    /// before dispatching: it sleeps 1 ms after the first failure of a run, doubling with each
    /// consecutive failure up to 100 ms, never past its own timeout, and a
    /// [`notify`](Self::notify) ends the sleep early. So a backend that keeps failing costs
    /// about ten wake-ups a second, not a core. Use [`try_poll`](Self::try_poll) to get the
    /// error instead.
    ///
    /// # Panics
    ///
    /// A panic in a callback propagates out of `poll`. The loop's state stays consistent: BHs
    /// that had not run yet in that pass stay scheduled and run in the next pass, the panicking
    /// callback stays registered, and the context can be polled again.
    pub fn poll(&self) -> bool {
        // `BackOff` never returns an error.
        self.run_iteration::<true>(OnWaitError::BackOff)
            .unwrap_or(false)
    }

    /// As [`poll`](Self::poll), but a failing backend wait is returned, not logged away: the
    /// caller learns that the backend is broken and decides what to do.
    ///
    /// # Errors
    ///
    /// The error of the backend's wait. The iteration then stops right after the wait:
    /// nothing is dispatched (no BH, handler or timer runs; they run in a later iteration,
    /// which does not block if one is due), and there is no back-off. The failure is counted
    /// in [`Stats::wait_errors`] and logged, as for `poll`.
    pub fn try_poll(&self) -> io::Result<bool> {
        self.run_iteration::<true>(OnWaitError::Return)
    }

    /// As [`poll_nonblocking`](Self::poll_nonblocking), but a failing backend wait is returned
    /// as in [`try_poll`](Self::try_poll). An iteration that makes no wait (nothing for the
    /// backend to look at) cannot fail.
    ///
    /// # Errors
    ///
    /// As [`try_poll`](Self::try_poll).
    pub fn try_poll_nonblocking(&self) -> io::Result<bool> {
        self.run_iteration::<false>(OnWaitError::Return)
    }

    /// Runs one loop iteration without sleeping (QEMU `aio_poll(ctx, false)`). Returns whether
    /// a user callback ran.
    ///
    /// A context with no fd handler (only BHs and timers) makes no system call here at all.
    /// A non-blocking iteration never busy-polls, so with fd handlers it checks them with a
    /// zero-timeout backend wait.
    ///
    /// A failed backend wait is handled as in [`poll`](Self::poll), except that a non-blocking
    /// iteration never sleeps.
    pub fn poll_nonblocking(&self) -> bool {
        // `BackOff` never returns an error.
        self.run_iteration::<false>(OnWaitError::BackOff)
            .unwrap_or(false)
    }

    /// Runs one iteration, blocking or not: QEMU's `aio_poll` signature, for ports.
    pub fn aio_poll(&self, blocking: bool) -> bool {
        if blocking {
            self.poll()
        } else {
            self.poll_nonblocking()
        }
    }

    /// Calls every completion source once; whether any ran a callback.
    fn run_completion_sources(&self) -> bool {
        let mut progress = false;
        let mut i = 0;
        loop {
            // Cloned out of the list so that no borrow is held while it runs.
            let Some(source) = self.inner.completion_sources.borrow().get(i).cloned() else {
                break;
            };
            progress |= source(self);
            i += 1;
        }
        progress
    }

    fn run_iteration<const BLOCKING: bool>(&self, on_error: OnWaitError) -> io::Result<bool> {
        let inner = &*self.inner;
        let _current = CurrentGuard::enter(Rc::as_ptr(&self.inner));
        let (_depth, nested) = DepthGuard::enter(&inner.depth);
        let shared = &*inner.shared;
        let params = inner.refresh_poll_params();
        // The block time that adapts the polling windows runs from here to the end of the
        // wait, polling included (QEMU measures it only while polling is enabled).
        let start = (!params.is_disabled()).then(|| inner.clock_ns());
        let epoch = inner.epoch.get() + 1;
        inner.epoch.set(epoch);
        inner.iterations.set(inner.iterations.get() + 1);
        let _span = phase_span(|| tracing::trace_span!("aio_poll", blocking = BLOCKING, nested));
        // What other threads asked for before this iteration, so that its wait already watches
        // a handler registered or an external fd re-enabled meanwhile (the queue is run again
        // after the wait, for what arrived during it).
        inner.apply_remote(self);

        if BLOCKING {
            shared.set_window(true);
        }
        let mut timeout = if BLOCKING {
            inner.compute_timeout()
        } else {
            Some(Duration::ZERO)
        };
        // Busy-poll before sleeping, in outermost blocking iterations only: a non-blocking
        // iteration never polls (its timeout is zero), and a nested one never does either, so
        // that a poll-ready callback that polls the context again cannot recurse (QEMU's
        // test-nested-aio-poll).
        // The hit list is taken only by an iteration that polls, so that the non-blocking path
        // (B1) pays nothing for polling.
        let mut hits = None;
        let mut polled = 0;
        if !nested && timeout != Some(Duration::ZERO) && !params.is_disabled() {
            let _span = phase_span(|| tracing::trace_span!("aio_busy_poll"));
            let hits = hits.insert(inner.take_hits());
            polled = inner.try_poll_mode(&params, &mut timeout, hits);
        }
        let use_notify_me = timeout != Some(Duration::ZERO);
        if use_notify_me && shared.begin_blocking(NOTIFY_ME_POLL) {
            timeout = Some(Duration::ZERO);
        }
        // A ready list only for an iteration that waits. A zero-timeout iteration skips the
        // wait only if polling covered every user handler in this iteration (none of them
        // depends on the backend alone) and the backend has nothing of its own to reap: so a
        // handler without a poll function, or one not in the poll set, is never starved.
        let will_wait = timeout != Some(Duration::ZERO) || {
            let polling_disabled = polled != inner.registry.borrow().users();
            (inner.monitor.borrow().must_wait()).unwrap_or(polling_disabled)
        };
        // About to wait in the backend, or an iteration that did not poll (non-blocking,
        // nested): leave polling mode first, so that producers kick again, and look once more
        // for work that arrived meanwhile (QEMU `poll_set_started(false)`), whatever the
        // timeout: a member's work must reach either its poll function or its fd. Only an
        // iteration that polling served whole (it polled, and needs no wait) stays in
        // polling mode.
        if (will_wait || polled == 0)
            && inner.polling.started.get()
            && inner.leave_poll_mode(hits.get_or_insert_with(|| inner.take_hits()))
        {
            timeout = Some(Duration::ZERO);
        }
        let mut failed = None;
        let waited = if will_wait {
            let _span = phase_span(|| {
                tracing::trace_span!(
                    "aio_wait",
                    timeout_ns =
                        timeout.map_or(-1, |t| i64::try_from(t.as_nanos()).unwrap_or(i64::MAX))
                )
            });
            let mut ready = inner.next_ready_list();
            match inner.wait(&mut ready, timeout) {
                Ok(()) => Some(ready),
                Err(e) => {
                    inner.recycle_ready_list(ready);
                    match on_error {
                        // Inside the window, so that a notify ends the back-off.
                        OnWaitError::BackOff => inner.back_off(timeout),
                        OnWaitError::Return => failed = Some(e),
                    }
                    None
                }
            }
        } else {
            None
        };
        if use_notify_me {
            shared.end_blocking(NOTIFY_ME_POLL);
        }
        if BLOCKING {
            shared.set_window(false);
        }
        if let Some(e) = failed {
            if let Some(hits) = hits {
                inner.recycle_hits(hits);
            }
            // Before `accept`: a pending notification stays pending, so the next iteration
            // does not block while a BH it did not run here is due.
            return Err(e);
        }
        shared.accept();
        inner.apply_remote(self);
        let block_ns = start.map(|s| inner.clock_ns().saturating_sub(s));

        let mut progress = inner.bh_poll();
        progress |= self.run_completion_sources();
        if waited.is_some() || hits.is_some() {
            let _span = phase_span(|| tracing::trace_span!("aio_dispatch"));
            if let Some(ready) = waited {
                progress |= self.dispatch_ready(&ready, epoch, block_ns);
                inner.recycle_ready_list(ready);
            }
            if let Some(hits) = hits {
                progress |= self.dispatch_poll_hits(&hits, epoch, block_ns);
                inner.recycle_hits(hits);
            }
        }
        if block_ns.is_some() {
            inner.adjust_weighted(block_ns);
        }
        // Timers last, as QEMU's `aio_poll` runs them after the handlers.
        progress |= inner.run_timers();
        Ok(progress)
    }

    /// Dispatches the handlers in `ready` (QEMU `aio_dispatch_ready_handlers`).
    fn dispatch_ready(&self, ready: &ReadyList, epoch: u64, block_ns: Option<u64>) -> bool {
        let mut progress = false;
        for (key, readiness) in ready.iter() {
            // Clone the node and release the table before calling anything: callbacks may add
            // or remove handlers. A stale key (removed or replaced since the wait) finds nothing.
            let node = match self.inner.registry.borrow().get(key) {
                Some(node) => node.clone(),
                None => continue,
            };
            // A report that a nested iteration made stale adjusts nothing: that iteration
            // dispatched the handler and adjusted its window.
            let stale = node.epoch.get() > epoch;
            progress |= self.dispatch_handler(&node, readiness, epoch);
            if !stale {
                self.inner.note_dispatched(&node, block_ns);
            }
        }
        progress
    }

    /// Dispatches what polling found (QEMU: nodes with `poll_ready`): the poll-ready callback,
    /// unless the fd was reported ready in this iteration too (fd readiness wins) or a nested
    /// iteration dispatched the handler since.
    fn dispatch_poll_hits(
        &self,
        hits: &[Rc<HandlerNode>],
        epoch: u64,
        block_ns: Option<u64>,
    ) -> bool {
        let inner = &*self.inner;
        let mut progress = false;
        for node in hits {
            if node.epoch.get() >= epoch || node.deleted.get() {
                continue;
            }
            node.epoch.set(epoch);
            if node.kind == NodeKind::User && inner.may_dispatch(node) && node.call_poll_ready(self)
            {
                inner.handler_calls.set(inner.handler_calls.get() + 1);
                progress = true;
            }
            inner.note_dispatched(node, block_ns);
        }
        progress
    }

    fn dispatch_handler(&self, node: &Rc<HandlerNode>, readiness: Readiness, epoch: u64) -> bool {
        if node.epoch.get() > epoch {
            // A nested iteration dispatched this handler after our wait reported it; what we
            // saw is stale.
            return false;
        }
        node.epoch.set(epoch);
        let revents = readiness & Readiness::mask_for(node.interest);
        if node.kind == NodeKind::Notifier {
            if !revents.is_empty() {
                let inner = &*self.inner;
                inner.event_drains.set(inner.event_drains.get() + 1);
                inner.shared.event.test_and_clear();
                inner.join_poll_set(node);
            }
            return false;
        }
        if !self.inner.may_dispatch(node) {
            return false;
        }
        if node.remotely_removed() {
            // Removed from another thread, and the removal not applied yet: do it now rather
            // than keep reporting a level-triggered fd nobody will serve.
            self.inner.remove_node(node.key);
            return false;
        }
        if !revents.is_empty() {
            self.inner.join_poll_set(node);
        }
        let mut calls = 0;
        if !node.deleted.get()
            && revents.intersects(Readiness::READABLE | Readiness::HANGUP | Readiness::ERROR)
            && node.call_read(self)
        {
            calls += 1;
        }
        // Re-check: the read callback may have removed this handler.
        if !node.deleted.get()
            && revents.intersects(Readiness::WRITABLE | Readiness::ERROR)
            && node.call_write(self)
        {
            calls += 1;
        }
        let inner = &*self.inner;
        inner.handler_calls.set(inner.handler_calls.get() + calls);
        calls > 0
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

    /// Starts registering a handler for `fd`. See [`HandlerBuilder`].
    ///
    /// The context stores the fd's number, not the fd: keep the fd open while the handler is
    /// registered (an fd closed while registered is reported as an error by the poll backend
    /// and dropped by epoll; either way the handler should remove itself).
    pub fn fd_handler(&self, fd: &impl AsFd) -> HandlerBuilder<'_> {
        HandlerBuilder::new(self, raw_fd_of(fd))
    }

    /// [`fd_handler`](Self::fd_handler) for a raw fd number, for code that holds fds as plain
    /// integers (a port from C, an fd received over FFI) and cannot lend an [`AsFd`].
    ///
    /// The handler works exactly as one registered through `fd_handler`. A number that is not
    /// an open fd (a negative one included) is refused by
    /// [`register`](HandlerBuilder::register) with `EBADF`, as there.
    ///
    /// # Safety
    ///
    /// `fd` must stay open, naming the same open file, from `register` until the handler is
    /// removed: its [`FdHandler`] dropped or [`remove`](FdHandler::remove)d (or the
    /// [`RemoteFdHandler`] that [`FdHandler::into_remote`] made from it), or the context
    /// dropped. This is the I/O-safety contract of [`BorrowedFd::borrow_raw`] stretched over
    /// the registration (ARCHITECTURE.md, "Raw fds"): meanwhile the backend watches `fd`
    /// (`poll`, `epoll_ctl`, an io_uring `POLL_ADD`), and were the number closed and reused,
    /// it would watch, and the callbacks would be told about, a file that other code owns.
    ///
    /// [`BorrowedFd::borrow_raw`]: std::os::fd::BorrowedFd::borrow_raw
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use std::cell::Cell;
    /// use std::rc::Rc;
    ///
    /// // Fds as C code holds them: a pipe made with pipe(2).
    /// let mut fds = [0; 2];
    /// // SAFETY: `fds` is a writable array of two ints for pipe(2) to fill.
    /// assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    /// let [rd, wr] = fds;
    ///
    /// let got = Rc::new(Cell::new(0u8));
    /// let seen = got.clone();
    /// // `rd` is closed below, after the handler is removed.
    /// // SAFETY: raw-fd contract (ARCHITECTURE.md, "Raw fds"), kept as just said.
    /// let handler = unsafe { ctx.fd_handler_raw(rd) }
    ///     .on_read(move |_| {
    ///         let mut byte = 0u8;
    ///         // SAFETY: one writable byte; `rd` is open while the handler is registered.
    ///         let n = unsafe { libc::read(rd, (&raw mut byte).cast(), 1) };
    ///         assert_eq!(n, 1);
    ///         seen.set(byte);
    ///     })
    ///     .register()?;
    /// // SAFETY: one readable byte; `wr` is open.
    /// assert_eq!(unsafe { libc::write(wr, b"x".as_ptr().cast(), 1) }, 1);
    /// while got.get() == 0 {
    ///     ctx.poll();
    /// }
    /// assert_eq!(got.get(), b'x');
    ///
    /// handler.remove();
    /// // SAFETY: both fds came from pipe(2) above, and nothing watches `rd` any more.
    /// unsafe {
    ///     libc::close(rd);
    ///     libc::close(wr);
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub unsafe fn fd_handler_raw(&self, fd: RawFd) -> HandlerBuilder<'_> {
        HandlerBuilder::new(self, fd)
    }

    /// Registers `read` for an [`EventNotifier`] (QEMU `aio_set_event_notifier`). The callback
    /// gets the notifier and should call [`EventNotifier::test_and_clear`].
    ///
    /// The handler comes with a built-in poll function, [`EventNotifier::is_set`]: with
    /// adaptive polling on ([`set_poll_params`](Self::set_poll_params)), once the notifier has
    /// been dispatched it joins the poll set, and a `set` from another thread while the loop
    /// busy-polls is seen with one load and handled by `read` at once, without the loop going
    /// to sleep and being woken through the fd. For other poll functions (a virtqueue, a
    /// completion ring) and `on_poll_begin` / `on_poll_end` (QEMU
    /// `aio_set_event_notifier_poll`), register the notifier's fd with
    /// [`fd_handler`](Self::fd_handler) instead.
    ///
    /// # Errors
    ///
    /// As [`HandlerBuilder::register`]; `AlreadyExists` if the notifier is already registered.
    pub fn set_event_notifier(
        &self,
        notifier: &Arc<EventNotifier>,
        read: impl FnMut(&EventNotifier) + 'static,
    ) -> io::Result<FdHandler> {
        crate::handler::event_notifier_builder(self, notifier, read).register()
    }

    /// Registers a node built from `parts`, replacing `old` if given. Returns the new key.
    ///
    /// Nothing user-owned is dropped while a table is borrowed: a callback may own another
    /// [`FdHandler`], whose drop unregisters it and so borrows the registry and the monitor
    /// again. The new node is therefore built before any borrow, and both it (when the change
    /// is refused) and the replaced node are dropped here, after every borrow is released.
    pub(crate) fn add_node(
        &self,
        parts: NodeParts,
        interest: Interest,
        old: Option<HandlerKey>,
    ) -> io::Result<HandlerKey> {
        let inner = &*self.inner;
        sys::check_fd_open(parts.fd)?;
        if old.is_none() {
            // A handler of this fd removed from another thread counts as removed already, even
            // if the home thread has not applied that removal yet: a registration that follows
            // it by another route (a BH, this thread) must not find it in the way.
            let stale = {
                let registry = inner.registry.borrow();
                registry
                    .key_of_fd(parts.fd)
                    .filter(|&k| registry.get(k).is_some_and(|n| n.remotely_removed()))
            };
            if let Some(stale) = stale {
                inner.remove_node(stale);
            }
        }
        // `next_key` only reserves the index; nothing runs between here and `link_node`.
        let key = inner.registry.borrow_mut().next_key();
        let scope = if parts.kind == NodeKind::Notifier {
            scope::ANY
        } else {
            inner.scopes.creation()
        };
        let node = Rc::new(parts.build(key, interest, scope));
        let linked = self.link_node(&node, old);
        // On success the registry holds the node too; on error this was the only reference and
        // the refused callbacks are dropped now, with no borrow held.
        drop(node);
        let replaced = linked?;
        // QEMU notifies after every change so that a sleeping loop re-evaluates its fd set; a
        // registration from inside a callback makes the next blocking iteration not block once.
        // Here the change is made on the home thread itself, so that is only needed inside a
        // blocking window (see `wake_for_work`).
        inner.shared.wake_for_work();
        // The replaced node leaves the poll set (the new one joins on its first fd dispatch,
        // which `on_poll_end` makes possible by turning kicks back on). Then its callbacks go
        // too (unless a dispatch still holds it), likewise with no borrow held.
        if let Some(replaced) = &replaced {
            inner.leave_poll_set(replaced);
        }
        drop(replaced);
        Ok(key)
    }

    /// Tells the monitor about `node` and puts it in the registry in place of `old`. Returns
    /// the replaced node, for the caller to drop once no table is borrowed.
    fn link_node(
        &self,
        node: &Rc<HandlerNode>,
        old: Option<HandlerKey>,
    ) -> io::Result<Option<Rc<HandlerNode>>> {
        let inner = &*self.inner;
        let (key, fd, interest) = (node.key, node.fd, node.interest);
        let mut registry = inner.registry.borrow_mut();
        // Whether the old node is watched; read without cloning it, so that no reference to a
        // user-owned node is dropped on the error paths below while the registry is borrowed.
        let old_watched = match old {
            Some(old) => Some(
                registry
                    .get(old)
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::NotFound, "the handler was already removed")
                    })?
                    .in_monitor
                    .get(),
            ),
            None => {
                if registry.key_of_fd(fd).is_some() {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("fd {fd} already has a handler in this context"),
                    ));
                }
                None
            }
        };
        // The monitor follows `external_unwatched` (what `sync_external` last applied), not the
        // count itself, which other threads change: otherwise a disable and an enable between
        // two iterations would leave a node registered in between out of the monitor for good.
        let watch = inner.should_watch(node);
        let change = match (old, old_watched) {
            (Some(old), Some(true)) if watch => Some(Change::Replace {
                old,
                new: key,
                fd,
                interest,
            }),
            (Some(old), Some(true)) => Some(Change::Remove { key: old, fd }),
            _ if watch => Some(Change::Add { key, fd, interest }),
            _ => None,
        };
        if let Some(change) = change {
            inner.monitor.borrow_mut().update(change)?;
        }
        // Insert before removing the old node: `insert` claims the index `next_key` reserved,
        // and `remove` frees the old one (and leaves `by_fd`, now the new key's, alone).
        node.in_monitor.set(watch);
        registry.insert(node.clone());
        let replaced = old.and_then(|old| registry.remove(old));
        debug_assert_eq!(replaced.is_some(), old.is_some());
        if let Some(replaced) = &replaced {
            replaced.in_monitor.set(false);
        }
        Ok(replaced)
    }

    /// Stops watching and dispatching handlers registered as external (QEMU
    /// `aio_disable_external`). Calls nest: each needs a matching
    /// [`enable_external`](Self::enable_external).
    pub fn disable_external(&self) {
        disable_external(&self.inner.shared);
        self.inner.sync_external();
    }

    /// Undoes one [`disable_external`](Self::disable_external); the last one resumes external
    /// handlers and wakes the loop (QEMU `aio_enable_external`).
    ///
    /// # Errors
    ///
    /// [`NotDisabledError`] if external handlers are not disabled; nothing changes then.
    pub fn enable_external(&self) -> Result<(), NotDisabledError> {
        enable_external(&self.inner.shared)?;
        self.inner.sync_external();
        Ok(())
    }

    /// Whether external handlers are disabled.
    pub fn is_external_disabled(&self) -> bool {
        self.inner.external_disabled()
    }

    /// First step of driving the context from an outer loop (QEMU's GSource `prepare`).
    ///
    /// Returns how long the outer loop may sleep (`None`: until an fd is ready). The outer loop
    /// then waits for the fds from [`outer_fds`](Self::outer_fds), calls
    /// [`check`](Self::check), and calls [`dispatch`](Self::dispatch) if `check` said so.
    /// Between `prepare` and `check`, a [`notify`](Self::notify) writes the eventfd, which is
    /// among the outer fds, so the outer loop wakes.
    pub fn prepare(&self) -> Option<Duration> {
        let inner = &*self.inner;
        inner.shared.set_window(true);
        let old = inner.shared.notify_me.load(Ordering::Relaxed);
        // Bit, not count: an outer loop need not pair every prepare with a check. Single
        // writer, so load + store; the fence pairs with `notify`'s as in `begin_blocking`.
        inner
            .shared
            .notify_me
            .store(old | NOTIFY_ME_OUTER, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if inner.shared.notified.load(Ordering::Relaxed) {
            return Some(Duration::ZERO);
        }
        // The outer loop may sleep: leave polling mode (an earlier `poll` may have entered it)
        // and keep what the last look finds for `dispatch`. An outer loop never busy-polls.
        // The callbacks this runs (`on_poll_end`, poll functions) see a nested context.
        {
            let _depth = DepthGuard::enter(&inner.depth);
            let mut hits = std::mem::take(&mut *inner.polling.outer_hits.borrow_mut());
            let found = inner.leave_poll_mode(&mut hits);
            *inner.polling.outer_hits.borrow_mut() = hits;
            if found {
                return Some(Duration::ZERO);
            }
        }
        // A backend with work of its own that only its `wait` does (io_uring: changes made by
        // the callbacks just dispatched are queued, not yet submitted to the kernel) would
        // leave the outer loop asleep on fds the kernel does not watch yet. Ask it, as QEMU's
        // 2025 GSource `prepare` hook does, and let `check` run that wait.
        if inner.monitor.borrow().must_wait() == Some(true) {
            return Some(Duration::ZERO);
        }
        inner.compute_timeout()
    }

    /// The fds an outer loop must watch for this context (QEMU: the GSource's poll fds).
    pub fn outer_fds(&self, out: &mut Vec<OuterFd>) {
        self.inner.monitor.borrow().outer_fds(out);
    }

    /// Second step of driving the context from an outer loop (QEMU's GSource `check`): returns
    /// whether [`dispatch`](Self::dispatch) has work to do.
    pub fn check(&self) -> bool {
        let inner = &*self.inner;
        let shared = &*inner.shared;
        let old = shared.notify_me.load(Ordering::Relaxed);
        // Release: as in `end_blocking`.
        shared
            .notify_me
            .store(old & !NOTIFY_ME_OUTER, Ordering::Release);
        shared.set_window(false);
        shared.accept();
        let mut ready = std::mem::take(&mut *inner.outer_ready.borrow_mut());
        ready.clear();
        // A failure is counted and logged there; the outer loop sleeps on its own fds, so there
        // is nothing to back off from here, and `check` has no error to return.
        let _ = inner.wait(&mut ready, Some(Duration::ZERO));
        let mut fd_pending = false;
        for (key, _) in ready.iter() {
            let kind = inner.registry.borrow().get(key).map(|n| n.kind);
            match kind {
                Some(NodeKind::User) => fd_pending = true,
                Some(NodeKind::Notifier) => {
                    // Drain our own eventfd here: it is not work for `dispatch`, and an outer
                    // loop told "nothing pending" would otherwise find it readable forever and
                    // spin. Draining after `accept` loses nothing: a notify that lands in
                    // between leaves `notified` set, so the next `prepare` returns zero.
                    inner.event_drains.set(inner.event_drains.get() + 1);
                    shared.event.test_and_clear();
                }
                None => {}
            }
        }
        *inner.outer_ready.borrow_mut() = ready;
        fd_pending
            || shared.remote.is_pending()
            || inner.sync_external_pending()
            || !inner.polling.outer_hits.borrow().is_empty()
            || inner.compute_timeout() == Some(Duration::ZERO)
    }

    /// Last step of driving the context from an outer loop (QEMU `aio_dispatch`): runs BHs and
    /// the handlers `check` found ready. Returns whether a user callback ran.
    pub fn dispatch(&self) -> bool {
        let inner = &*self.inner;
        let _current = CurrentGuard::enter(Rc::as_ptr(&self.inner));
        // An iteration of its own: a `poll` from one of its callbacks is nested, and so never
        // busy-polls, as in `poll`.
        let _depth = DepthGuard::enter(&inner.depth);
        inner.apply_remote(self);
        let ready = std::mem::take(&mut *inner.outer_ready.borrow_mut());
        let epoch = inner.epoch.get() + 1;
        inner.epoch.set(epoch);
        inner.iterations.set(inner.iterations.get() + 1);
        let _span = phase_span(|| tracing::trace_span!("aio_outer_dispatch"));
        let mut progress = inner.bh_poll();
        progress |= self.run_completion_sources();
        progress |= self.dispatch_ready(&ready, epoch, None);
        let hits = std::mem::take(&mut *inner.polling.outer_hits.borrow_mut());
        progress |= self.dispatch_poll_hits(&hits, epoch, None);
        inner.recycle_hits(hits);
        {
            let mut slot = inner.outer_ready.borrow_mut();
            if slot.is_empty() {
                *slot = ready;
                slot.clear();
            }
        }
        progress |= inner.run_timers();
        progress
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

/// One more `disable_external` (any thread; QEMU `aio_disable_external`). No wake-up: the
/// home thread checks the count before dispatching each external handler, and takes their fds
/// out of the monitor at its next iteration.
fn disable_external(shared: &Shared) {
    // Release: pairs with the dispatcher's Acquire load (`Inner::external_disabled`).
    shared.external_disabled.fetch_add(1, Ordering::Release);
}

/// One less `disable_external` (any thread; QEMU `aio_enable_external`); the last one wakes
/// the loop, which puts the external fds back in the monitor before it sleeps again.
fn enable_external(shared: &Shared) -> Result<(), NotDisabledError> {
    // Release as in `disable_external`; a CAS loop so that an unmatched enable changes nothing.
    let old = shared
        .external_disabled
        .fetch_update(Ordering::Release, Ordering::Relaxed, |n| n.checked_sub(1))
        .map_err(|_| NotDisabledError)?;
    if old == 1 {
        shared.wake_for_work();
    }
    Ok(())
}

/// A number never given to another context (see `Shared::id`).
fn next_context_id() -> u64 {
    // Relaxed: uniqueness needs only the atomicity of the add. std's atomic even under loom
    // (an id allocator, not a protocol), so that ids stay unique across a model's executions.
    static NEXT: global::AtomicU64 = global::AtomicU64::new(1);
    NEXT.fetch_add(1, global::Ordering::Relaxed)
}

/// Validates and stores new polling parameters, then wakes the loop so that it applies them.
fn set_poll_params(shared: &Shared, params: PollParams) -> io::Result<()> {
    params.validate()?;
    shared.poll_params.set(params);
    shared.wake_for_work();
    Ok(())
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

/// Loom only: which variant of the wake-up protocol a context runs.
#[cfg(aio_loom)]
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoomVariant {
    /// The real protocol.
    Correct,
    /// QEMU's BUG2 against today's protocol: `notify` returns early when `notified` already
    /// reads true, skipping its RMW and the eventfd write.
    ReturnEarlyIfNotified,
    /// QEMU's accept written literally in C11 terms: a plain store of `false` and a fence.
    PlainStoreAccept,
    /// QEMU's BUG2 as its Promela model (`docs/spin/aio_notify_accept.promela`) defines it:
    /// `notify` reads `notified` first and, if it was already true, still sets it (our `swap`)
    /// but skips the eventfd write. Loses wake-ups: the read can be stale.
    SkipEventWriteIfReadTrue,
    /// The same optimisation decided by the `swap`'s result instead of a separate read: the
    /// eventfd write is skipped when the `swap` returned true. Harmless in this protocol (the
    /// notifier whose `true` came first does the write or is seen by the loop's re-check).
    SkipEventWriteIfSwapTrue,
}

/// The error of [`AioContext::enable_external`] when external handlers were not disabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotDisabledError;

impl fmt::Display for NotDisabledError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("enable_external called more times than disable_external")
    }
}

impl std::error::Error for NotDisabledError {}

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
    pub fn fd_handler(&self, fd: &impl AsFd) -> RemoteHandlerBuilder {
        RemoteHandlerBuilder::new(self.clone(), raw_fd_of(fd))
    }

    /// [`fd_handler`](Self::fd_handler) for a raw fd number, from any thread: as
    /// [`AioContext::fd_handler_raw`]. A number that is not an open fd is refused with
    /// `EBADF` by [`register`](RemoteHandlerBuilder::register).
    ///
    /// # Safety
    ///
    /// `fd` must stay open, naming the same open file, from `register` until the handler is
    /// removed: its [`RemoteFdHandler`] dropped or [`remove`](RemoteFdHandler::remove)d, or
    /// the context dropped (ARCHITECTURE.md, "Raw fds"; see [`AioContext::fd_handler_raw`]).
    /// A removal from another thread stops the callbacks at once, but the home thread takes
    /// the number out of the backend at its next iteration: if it is closed and reused
    /// before that, the backend may watch the new file until then, and reports for it go to
    /// no callback.
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
