//! Operations on a context from any thread (the lockcnt-era rule "AioContext functions can
//! always be called safely"): the queue that carries them to the home thread, the reply a
//! waiting caller sleeps on, the gate that stops a remotely removed handler from starting a
//! callback, the home thread's table for running them in place, and [`ContextGone`].
//!
//! C original: QEMU makes `aio_set_fd_handler` thread-safe with `ctx->list_lock` (a
//! `QemuLockCnt`, docs/qemu-semantics.md §7) around the handler list. Here the handler table stays home-thread
//! only (`Rc`/`RefCell`, see "Handler deletion" in ARCHITECTURE.md); other threads *marshal*
//! the change to the home thread instead of locking the list:
//!
//! * a registration or replacement is a closure pushed on [`RemoteOps`], followed by a
//!   notify; the home thread runs the queue after it accepts the notification, before it
//!   dispatches, and the caller sleeps on a [`Reply`] until then. On the home thread itself the
//!   closure runs at once ([`with_home_context`]), so there is nothing to wait for there;
//! * a removal closes the handler's [`Gate`] first, which takes effect at once on the
//!   dispatching side, and then queues the unregistration without waiting for it.

use crate::context::Inner;
use crate::sync::{
    AtomicBool, AtomicU32, Condvar, Mutex, Ordering, lock, thread_local, wait, wait_timeout,
};
use crate::{Acquired, AioContext, SharedContext};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::rc::{Rc, Weak};

/// The error of an operation through a [`ContextHandle`](crate::ContextHandle) whose context's
/// loop is gone: its last [`AioContext`] was dropped before the operation was applied, or while
/// it was waiting to be. Nothing was registered; the callbacks were dropped.
///
/// Inside an [`io::Error`] it has the kind [`io::ErrorKind::BrokenPipe`] (the other end, the
/// loop, hung up); [`ContextGone::is`] recognises it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextGone;

impl ContextGone {
    /// Whether `e` is a [`ContextGone`] wrapped in an [`io::Error`].
    pub fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<ContextGone>())
    }
}

impl fmt::Display for ContextGone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the context's loop is gone (its last AioContext was dropped)")
    }
}

impl std::error::Error for ContextGone {}

impl From<ContextGone> for io::Error {
    fn from(e: ContextGone) -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, e)
    }
}

/// A closure to run on the home thread, with the context.
pub(crate) type HomeOp = Box<dyn FnOnce(&AioContext) + Send>;

/// The operations other threads queued for the home thread. Lock order: this queue's mutex is
/// a leaf (nothing else is locked while it is held, and no user code runs under it).
pub(crate) struct RemoteOps {
    state: Mutex<OpsState>,
    /// True while `state.ops` is not empty: the home thread looks at the queue only when it is
    /// set, so an iteration with nothing queued costs one load.
    pending: AtomicBool,
}

struct OpsState {
    ops: Vec<HomeOp>,
    /// The loop is gone: nothing will run the queue again, so pushing fails.
    closed: bool,
}

impl RemoteOps {
    pub(crate) fn new() -> Self {
        RemoteOps {
            state: Mutex::new(OpsState {
                ops: Vec::new(),
                closed: false,
            }),
            pending: AtomicBool::new(false),
        }
    }

    /// Queues `op`; the caller then notifies the loop. Fails (dropping `op`, after unlocking)
    /// once the loop is gone.
    pub(crate) fn push(&self, op: HomeOp) -> Result<(), ContextGone> {
        let mut st = lock(&self.state);
        if st.closed {
            drop(st);
            drop(op);
            return Err(ContextGone);
        }
        st.ops.push(op);
        // Relaxed: written under the mutex; the home thread's Acquire load of it is ordered
        // after this by the notify that follows (the accept's acquire swap synchronizes with
        // the notifier's release swap), or by the mutex when it takes the queue.
        self.pending.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Whether something is queued (home thread; a hint, exact once a notify was accepted).
    #[inline]
    pub(crate) fn is_pending(&self) -> bool {
        // Acquire: pairs with nothing in particular (the mutex orders the queue itself); it
        // keeps the cheap check from being satisfied by a value older than the accept's view.
        self.pending.load(Ordering::Acquire)
    }

    /// Takes everything queued (home thread). The caller runs it with no lock held.
    pub(crate) fn take(&self) -> Vec<HomeOp> {
        if !self.is_pending() {
            return Vec::new();
        }
        let mut st = lock(&self.state);
        self.pending.store(false, Ordering::Relaxed);
        std::mem::take(&mut st.ops)
    }

    /// Puts back, in front, operations taken but not run (one before them panicked), so that
    /// they run at the next iteration; dropped (answering their callers) if the loop is gone.
    pub(crate) fn requeue_front(&self, rest: VecDeque<HomeOp>) {
        let mut st = lock(&self.state);
        if st.closed {
            drop(st);
            drop(rest);
            return;
        }
        let later = std::mem::take(&mut st.ops);
        st.ops.extend(rest);
        st.ops.extend(later);
        self.pending.store(true, Ordering::Relaxed);
    }

    /// The loop is going away: refuse further pushes and return what is queued, for the caller
    /// to drop (which wakes their waiters with [`ContextGone`]) with no lock held.
    pub(crate) fn close(&self) -> Vec<HomeOp> {
        let mut st = lock(&self.state);
        st.closed = true;
        self.pending.store(false, Ordering::Relaxed);
        std::mem::take(&mut st.ops)
    }
}

/// Where a caller waiting for a queued operation finds its result.
pub(crate) struct Reply<R> {
    state: Mutex<ReplyState<R>>,
    cond: Condvar,
}

enum ReplyState<R> {
    Waiting,
    Done(R),
    /// The operation was dropped without running: the context is gone.
    Dropped,
    /// The operation was dropped while the loop's thread was panicking: it panicked (a
    /// refused callback's drop, say), or the loop was dropped by the unwinding.
    Panicked,
}

/// The error of a queued operation that the loop's thread dropped while panicking (see
/// [`Reply::wait`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Panicked;

impl fmt::Display for Panicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the loop's thread panicked before this operation could answer")
    }
}

impl std::error::Error for Panicked {}

/// Why a queued operation did not answer.
#[derive(Debug, Clone, Copy)]
pub(crate) enum NoAnswer {
    /// The loop is gone: [`ContextGone`].
    Gone,
    /// The loop's thread panicked while running or dropping it.
    Panicked,
}

impl From<NoAnswer> for io::Error {
    fn from(e: NoAnswer) -> io::Error {
        match e {
            NoAnswer::Gone => ContextGone.into(),
            NoAnswer::Panicked => io::Error::other(Panicked),
        }
    }
}

impl From<ContextGone> for NoAnswer {
    fn from(_: ContextGone) -> NoAnswer {
        NoAnswer::Gone
    }
}

impl<R> Reply<R> {
    /// A reply and the sender that the queued operation carries.
    pub(crate) fn new() -> (crate::sync::Arc<Reply<R>>, ReplySender<R>) {
        let reply = crate::sync::Arc::new(Reply {
            state: Mutex::new(ReplyState::Waiting),
            cond: Condvar::new(),
        });
        let sender = ReplySender(Some(reply.clone()));
        (reply, sender)
    }

    /// Sleeps until the operation answered or was dropped.
    ///
    /// On a thread that is itself the home of contexts, it does not only sleep: every
    /// [`SERVE_INTERVAL`] it runs those contexts' queued operations ([`serve_own`]). Otherwise
    /// two loops registering on each other from their home threads at the same moment would
    /// each wait for the other forever.
    pub(crate) fn wait(&self) -> Result<R, NoAnswer> {
        let serving = is_home_of_any();
        let mut st = lock(&self.state);
        loop {
            match std::mem::replace(&mut *st, ReplyState::Waiting) {
                ReplyState::Waiting if serving => {
                    st = wait_timeout(&self.cond, st, SERVE_INTERVAL);
                    if matches!(*st, ReplyState::Waiting) {
                        drop(st);
                        serve_own();
                        st = lock(&self.state);
                    }
                }
                ReplyState::Waiting => st = wait(&self.cond, st),
                ReplyState::Done(r) => return Ok(r),
                ReplyState::Dropped => return Err(NoAnswer::Gone),
                ReplyState::Panicked => return Err(NoAnswer::Panicked),
            }
        }
    }

    fn complete(&self, state: ReplyState<R>) {
        *lock(&self.state) = state;
        self.cond.notify_all();
    }
}

/// The answering end of a [`Reply`]. Dropping it unanswered wakes the waiter with
/// [`ContextGone`], so an operation dropped with the queue never leaves its caller asleep.
pub(crate) struct ReplySender<R>(Option<crate::sync::Arc<Reply<R>>>);

impl<R> ReplySender<R> {
    pub(crate) fn send(mut self, value: R) {
        if let Some(reply) = self.0.take() {
            reply.complete(ReplyState::Done(value));
        }
    }
}

impl<R> Drop for ReplySender<R> {
    fn drop(&mut self) {
        if let Some(reply) = self.0.take() {
            let state = if std::thread::panicking() {
                ReplyState::Panicked
            } else {
                ReplyState::Dropped
            };
            reply.complete(state);
        }
    }
}

/// `Gate` word: the handler was removed; no callback of it may start.
const CLOSED: u32 = 1;
/// `Gate` word: one callback of the handler running (the count is in the bits above).
const RUNNING: u32 = 2;

/// What a handler registered through a [`ContextHandle`](crate::ContextHandle) shares between
/// its remote handle and its node on the home thread: one atomic word, [`CLOSED`] plus a count
/// of the callbacks running. QEMU's `node->deleted` read under the list's lockcnt, made exact
/// for a remover on another thread.
///
/// **[Gate-1]** An invocation of any of the handler's callbacks *starts* at the home thread's
/// [`enter`](Self::enter), an RMW of the word; a removal is [`close`](Self::close), an RMW of
/// the same word. The two are totally ordered (the word's modification order): an `enter`
/// after the `close` reads `CLOSED` and does not run the callback; an `enter` before it is
/// counted in the value `close` reads, so the remover learns that a callback was running (it
/// may still be running when `close` returns, and finishes). In particular, any `enter` that
/// happens after `close` returned (the home thread heard of the removal by any synchronizing
/// means) is ordered after it, by coherence.
#[derive(Debug)]
pub(crate) struct Gate {
    word: AtomicU32,
    /// Loom only: the gate is ignored (the naive design: removal only by the queued
    /// unregistration), for the model that must catch it. Not itself modelled.
    #[cfg(aio_loom)]
    broken: crate::sync::global::AtomicBool,
}

impl Gate {
    pub(crate) fn new() -> Self {
        Gate {
            word: AtomicU32::new(0),
            #[cfg(aio_loom)]
            broken: crate::sync::global::AtomicBool::new(false),
        }
    }

    /// Loom only: makes this gate admit every invocation and never report a removal.
    #[cfg(aio_loom)]
    pub(crate) fn break_for_loom(&self) {
        self.broken
            .store(true, crate::sync::global::Ordering::Relaxed);
    }

    #[cfg(aio_loom)]
    fn is_broken(&self) -> bool {
        self.broken.load(crate::sync::global::Ordering::Relaxed)
    }

    #[cfg(not(aio_loom))]
    #[inline(always)]
    fn is_broken(&self) -> bool {
        false
    }

    /// Starts a callback invocation (home thread): `None` if the handler was removed.
    pub(crate) fn enter(&self) -> Option<GateGuard<'_>> {
        // Acquire: pairs with the Release of `close`, so that a callback skipped because of a
        // removal also sees what the remover wrote before removing (nothing depends on that
        // today; it keeps "removed" meaning what the remover thinks it means).
        let old = self.word.fetch_add(RUNNING, Ordering::Acquire);
        if old & CLOSED != 0 && !self.is_broken() {
            self.word.fetch_sub(RUNNING, Ordering::Relaxed);
            return None;
        }
        Some(GateGuard(self))
    }

    /// Removes the handler (any thread): no callback starts after this. Returns whether a
    /// callback was running (started before this and not finished), which may still be.
    pub(crate) fn close(&self) -> bool {
        // AcqRel: Release pairs with `enter`'s Acquire; Acquire pairs with `GateGuard::drop`'s
        // Release, so that a callback that finished before the close is seen finished (its
        // effects visible to the remover) when this returns false.
        let old = self.word.fetch_or(CLOSED, Ordering::AcqRel);
        old >= RUNNING
    }

    /// Whether the handler was removed.
    pub(crate) fn is_closed(&self) -> bool {
        // Acquire: as in `enter`.
        self.word.load(Ordering::Acquire) & CLOSED != 0 && !self.is_broken()
    }
}

/// A callback invocation admitted by [`Gate::enter`]; dropping it (the callback returned or
/// unwound) ends the invocation.
pub(crate) struct GateGuard<'a>(&'a Gate);

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        // Release: pairs with `close`'s Acquire (see there).
        self.0.word.fetch_sub(RUNNING, Ordering::Release);
    }
}

thread_local! {
    /// The contexts whose home thread this is, by [`Shared`](crate::context::Shared) id: lets a
    /// [`ContextHandle`](crate::ContextHandle) used on its home thread run an operation in
    /// place, where waiting for the loop would wait for itself. Entries are removed when the
    /// context's loop is dropped, or, for a [`SharedContext`], by the holder's release; a
    /// shared context's entry also keeps the `SharedContext`, which an in-place operation
    /// acquires (nested) for as long as it runs ([SHARED-1]). (Not a `const` initializer:
    /// loom's `thread_local!` does not accept one.)
    #[allow(clippy::missing_const_for_thread_local)]
    static HOMES: RefCell<Vec<Home>> = RefCell::new(Vec::new());
}

/// An entry of `HOMES`: the context's id, its loop, and the shared context that owns it, if
/// any.
type Home = (u64, Weak<Inner>, Option<SharedContext>);

/// How often a home thread waiting for another loop runs its own contexts' queued operations
/// (see [`Reply::wait`]). Only such a waiter pays for it; it is a bound on how long a loop
/// registering on this one, at the same time, waits for its answer.
const SERVE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(1);

/// Whether this thread is the home of some live context.
fn is_home_of_any() -> bool {
    HOMES
        .try_with(|homes| !homes.borrow().is_empty())
        .unwrap_or(false)
}

/// Runs the queued operations of every context whose home is this thread (a home thread that
/// waits for another loop; see [`Reply::wait`]). The caller is in user code that called a
/// registration, where the home thread may register, replace or remove handlers anyway.
fn serve_own() {
    let homes: Vec<(AioContext, Option<SharedContext>)> = HOMES
        .try_with(|homes| {
            homes
                .borrow()
                .iter()
                .filter_map(|(_, weak, shared)| Some((weak.upgrade()?, shared.clone())))
                .map(|(inner, shared)| (AioContext { inner }, shared))
                .collect()
        })
        .unwrap_or_default();
    // The shared ones stay held by this thread until every operation has run, whatever
    // those operations' drops release ([SHARED-1]); their clones are dropped first (declared
    // last), in unwinding too.
    let shared: Vec<SharedContext> = homes.iter().filter_map(|(_, s)| s.clone()).collect();
    let _pins: Vec<Acquired<'_>> = shared.iter().map(SharedContext::acquire).collect();
    let own: Vec<AioContext> = homes.into_iter().map(|(ctx, _)| ctx).collect();
    for ctx in &own {
        ctx.inner.apply_remote(ctx);
    }
}

/// Records that this thread is the home of the context `id` (at creation).
pub(crate) fn register_home(id: u64, inner: &Rc<Inner>) {
    HOMES.with(|homes| homes.borrow_mut().push((id, Rc::downgrade(inner), None)));
}

/// As [`register_home`], but quiet during thread exit, when the table may already be gone (a
/// `SharedContext` acquired or dropped by a thread-local's destructor); `shared` is the shared
/// context that owns the loop, when its holder (not its last owner's drop) registers.
pub(crate) fn try_register_home(id: u64, inner: &Rc<Inner>, shared: Option<SharedContext>) {
    let _ = HOMES.try_with(|homes| homes.borrow_mut().push((id, Rc::downgrade(inner), shared)));
}

/// Forgets the context `id` (its loop is being dropped, or a `SharedContext`'s holder releases
/// it). Quiet during thread exit, when the table may already be gone. (A shared context's
/// entry is removed by a release, whose guard borrows another clone: never the last one.)
pub(crate) fn unregister_home(id: u64) {
    let _ = HOMES.try_with(|homes| homes.borrow_mut().retain(|(other, ..)| *other != id));
}

/// Runs `f` with the context `id` if this is its home thread and its loop still exists (an
/// operation applied in place); `None` otherwise. For a shared context, `f` runs under a
/// nested acquisition, released only after `f`'s clone of the loop is dropped: a drop inside
/// `f` that releases the caller's own guard (kept in a thread-local, say) then cannot hand the
/// loop to another thread while this thread still uses it ([SHARED-1]).
pub(crate) fn with_home_context<R>(id: u64, f: impl FnOnce(&AioContext) -> R) -> Option<R> {
    let (inner, shared) = HOMES
        .try_with(|homes| {
            homes
                .borrow()
                .iter()
                .find(|(other, ..)| *other == id)
                .and_then(|(_, weak, shared)| Some((weak.upgrade()?, shared.clone())))
        })
        .ok()
        .flatten()?;
    // Dropped in reverse order: the loop's clone, then the nested guard, then the clone of
    // the shared context it borrows.
    let _pin = shared.as_ref().map(SharedContext::acquire);
    let ctx = AioContext { inner };
    Some(f(&ctx))
}
