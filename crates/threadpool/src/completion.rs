//! Delivering completions on the context's thread: the completion bottom halves, the pass that
//! drains the completion queue and runs callbacks one at a time, the table of callbacks kept on
//! the context's thread, and the registry by which a bottom half finds its pool.
//!
//! C original: `thread_pool_completion_bh` in `util/thread-pool.c`.
//!
//! # One wake per batch
//!
//! Workers append finished requests to the pool's completion queue; only the one that finds
//! it empty schedules a bottom half, so a batch of completions costs one schedule, and at most
//! one wake of a sleeping loop. The pass moves the whole queue to the context's side in one
//! swap under the lock, then delivers from there without the lock.
//!
//! # Nested polls
//!
//! A callback may poll the context to wait for another request (QEMU's `AIO_WAIT_WHILE`
//! pattern). QEMU reschedules its completion BH around each callback so that the nested poll
//! runs it again. An `aio-core` bottom half cannot be re-entered while its callback runs (a
//! Rust `FnMut` cannot call itself), so the pool has a small stack of completion BHs instead:
//! while a pass runs a callback, its BH is marked busy and the workers schedule the first BH
//! that is not (the *target*); the pass also schedules it before the callback if completions
//! are already waiting. A nested poll thus always finds a runnable completion BH, however deep
//! the nesting. The stack grows only when callbacks nest, and BHs are never removed.
//!
//! # Finding the pool
//!
//! A BH callback must be `Send`, and the pool's context side is not, so a completion BH holds
//! only its pool's identity and its index. When it runs, it asks `AioContext::current()` for
//! the context running it and looks the pool up in that context's [`Registry`] (a context-local
//! value). The registry also shuts down every pool of the context when the context is dropped.

use crate::pool::ThreadPool;
use crate::request::{Completion, Job};
use crate::sync::Arc;
use aio_core::{AioContext, BottomHalf, ContextHandle, RunningBh, ScopeId, ScopeView};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::rc::{Rc, Weak};

/// The pool's completion bottom halves (behind the pool lock).
pub(crate) struct CompletionBhs {
    ctx: ContextHandle,
    pool_id: u64,
    bhs: Vec<Arc<BottomHalf>>,
    /// `busy[i]`: BH `i` is running a callback further up the context's stack.
    busy: Vec<bool>,
    /// The first BH that is not busy: the one to schedule.
    target: usize,
}

impl CompletionBhs {
    pub(crate) fn new(ctx: &ContextHandle, pool_id: u64) -> Self {
        let mut bhs = CompletionBhs {
            ctx: ctx.clone(),
            pool_id,
            bhs: Vec::new(),
            busy: Vec::new(),
            target: 0,
        };
        bhs.grow();
        bhs
    }

    fn grow(&mut self) {
        let (pool_id, index) = (self.pool_id, self.bhs.len());
        let bh = self
            .ctx
            // Runs in every isolation scope: `drain` holds the callbacks of outer scopes.
            .bh_any_scope(move |this| deliver(pool_id, index, this));
        self.bhs.push(Arc::new(bh));
        self.busy.push(false);
    }

    /// The BH to schedule for new completions; `None` once the pool has shut down.
    pub(crate) fn target(&self) -> Option<Arc<BottomHalf>> {
        self.bhs.get(self.target).cloned()
    }

    /// BH `index` is about to run a callback.
    fn enter(&mut self, index: usize) {
        self.set_busy(index, true);
    }

    /// BH `index` has finished running a callback.
    fn leave(&mut self, index: usize) {
        self.set_busy(index, false);
    }

    fn set_busy(&mut self, index: usize, busy: bool) {
        // After shutdown the BHs are gone and nothing needs a target any more.
        if let Some(slot) = self.busy.get_mut(index) {
            *slot = busy;
            self.retarget();
        }
    }

    fn retarget(&mut self) {
        self.target = match self.busy.iter().position(|busy| !busy) {
            Some(free) => free,
            None => {
                self.grow();
                self.bhs.len() - 1
            }
        };
    }

    /// Takes the BHs away (at shutdown), to be dropped without the lock.
    pub(crate) fn take(&mut self) -> Vec<Arc<BottomHalf>> {
        self.busy.clear();
        std::mem::take(&mut self.bhs)
    }
}

/// The body of completion BH `index` of pool `pool_id`.
fn deliver(pool_id: u64, index: usize, this: &RunningBh<'_>) {
    let Some(ctx) = AioContext::current() else {
        return;
    };
    // Holding an `Rc` keeps the pool alive while callbacks run, even one that drops the last
    // other reference to it.
    if let Some(pool) = Registry::of(&ctx).find(pool_id) {
        pool.drain(index, this);
    }
}

/// A completed request whose callback belongs to an isolation scope outside the innermost one
/// (see `AioContext::isolated`): delivered, in order, once its scope may run again.
enum HeldCompletion {
    /// A home-thread callback, in its slot.
    Home(usize, ScopeId),
    /// Another thread's callback: the root scope's.
    Remote(Arc<dyn Job>),
}

impl HeldCompletion {
    fn scope(&self) -> ScopeId {
        match self {
            HeldCompletion::Home(_, scope) => *scope,
            HeldCompletion::Remote(_) => ScopeId::ROOT,
        }
    }
}

/// The context side of the pool's completion path.
pub(crate) struct Home {
    /// Completions moved out of the shared queue and not yet delivered.
    pending: RefCell<VecDeque<Arc<dyn Job>>>,
    /// Completions held by an isolation scope, oldest first.
    held: RefCell<VecDeque<HeldCompletion>>,
    /// The context's isolation scopes.
    pub(crate) scopes: ScopeView,
    /// Completion callbacks of requests submitted on the context's thread, which need not be
    /// `Send` and so cannot travel with the request.
    callbacks: RefCell<Callbacks>,
}

/// A completion callback of a request submitted on the context's thread.
type HomeCallback = Box<dyn FnOnce()>;

/// A slab of callbacks, each with the isolation scope it was submitted in: slots are reused
/// through a free list, so a request costs no search.
#[derive(Default)]
struct Callbacks {
    slots: Vec<Option<(HomeCallback, ScopeId)>>,
    free: Vec<usize>,
}

impl Home {
    pub(crate) fn new(scopes: ScopeView) -> Home {
        Home {
            pending: RefCell::default(),
            held: RefCell::default(),
            scopes,
            callbacks: RefCell::default(),
        }
    }

    /// Whether a held completion may be delivered now.
    pub(crate) fn held_ready(&self) -> bool {
        self.held
            .borrow()
            .iter()
            .any(|h| self.scopes.allows(h.scope()))
    }

    /// The oldest held completion that may be delivered now.
    fn take_held(&self) -> Option<HeldCompletion> {
        let mut held = self.held.borrow_mut();
        if held.is_empty() {
            return None;
        }
        let i = held.iter().position(|h| self.scopes.allows(h.scope()))?;
        held.remove(i)
    }

    pub(crate) fn reserve_callback(&self) -> usize {
        let mut cbs = self.callbacks.borrow_mut();
        match cbs.free.pop() {
            Some(index) => index,
            None => {
                cbs.slots.push(None);
                cbs.slots.len() - 1
            }
        }
    }

    pub(crate) fn set_callback(&self, index: usize, callback: Box<dyn FnOnce()>) {
        let scope = self.scopes.current();
        self.callbacks.borrow_mut().slots[index] = Some((callback, scope));
    }

    pub(crate) fn take_callback(&self, index: usize) -> Option<Box<dyn FnOnce()>> {
        let mut cbs = self.callbacks.borrow_mut();
        let callback = cbs.slots.get_mut(index)?.take();
        if callback.is_some() {
            cbs.free.push(index);
        }
        callback.map(|(callback, _)| callback)
    }

    /// The scope of the callback in slot `index`, if there is one.
    fn callback_scope(&self, index: usize) -> Option<ScopeId> {
        let cbs = self.callbacks.borrow();
        cbs.slots.get(index)?.as_ref().map(|(_, scope)| *scope)
    }

    /// All callbacks (at shutdown), to be dropped by the caller: not while borrowed.
    pub(crate) fn take_callbacks(&self) -> Vec<Box<dyn FnOnce()>> {
        let mut cbs = self.callbacks.borrow_mut();
        cbs.free.clear();
        std::mem::take(&mut cbs.slots)
            .into_iter()
            .flatten()
            .map(|(callback, _)| callback)
            .collect()
    }

    /// The completions not delivered yet (at shutdown), held ones included.
    pub(crate) fn take_pending(&self) -> VecDeque<Arc<dyn Job>> {
        let mut jobs = std::mem::take(&mut *self.pending.borrow_mut());
        for held in std::mem::take(&mut *self.held.borrow_mut()) {
            if let HeldCompletion::Remote(job) = held {
                jobs.push_back(job);
            }
        }
        jobs
    }
}

impl ThreadPool {
    /// One completion pass, run by completion BH `index`: delivers every finished request,
    /// including those that finish while it runs.
    fn drain(&self, index: usize, this: &RunningBh<'_>) {
        let _resume = ResumeOnPanic { pool: self };
        loop {
            // First what an isolation scope that ended held, in order (also when the scope
            // ended inside a callback of this pass).
            if let Some(held) = self.home.take_held() {
                match held {
                    HeldCompletion::Home(slot, _) => {
                        if let Some(callback) = self.home.take_callback(slot) {
                            self.run_callback(index, this, callback);
                        }
                    }
                    HeldCompletion::Remote(job) => {
                        self.run_callback(index, this, || job.call_remote());
                    }
                }
                continue;
            }
            let next = self.home.pending.borrow_mut().pop_front();
            let job = match next {
                Some(job) => job,
                None => {
                    let mut st = self.shared().state.lock();
                    if st.done.is_empty() {
                        return;
                    }
                    // The whole batch in O(1); the emptied queue keeps our old allocation.
                    std::mem::swap(&mut *self.home.pending.borrow_mut(), &mut st.done);
                    continue;
                }
            };
            // A future's completion only wakes its waker: the task it wakes is held by its own
            // scope if need be. Callbacks of outer scopes are held here.
            match job.complete() {
                Completion::Quiet => {}
                Completion::Home(slot) => match self.home.callback_scope(slot) {
                    Some(scope) if !self.home.scopes.allows(scope) => self
                        .home
                        .held
                        .borrow_mut()
                        .push_back(HeldCompletion::Home(slot, scope)),
                    _ => {
                        if let Some(callback) = self.home.take_callback(slot) {
                            self.run_callback(index, this, callback);
                        }
                    }
                },
                Completion::Remote if !self.home.scopes.allows(ScopeId::ROOT) => self
                    .home
                    .held
                    .borrow_mut()
                    .push_back(HeldCompletion::Remote(job)),
                Completion::Remote => self.run_callback(index, this, || job.call_remote()),
            }
        }
    }

    /// Runs one user callback so that a nested poll inside it can deliver other completions
    /// (see the module docs).
    fn run_callback(&self, index: usize, this: &RunningBh<'_>, callback: impl FnOnce()) {
        // A worker may have scheduled this BH meanwhile; this pass picks up whatever it was
        // scheduled for after the callback anyway (QEMU cancels for the same reason).
        this.cancel();
        let (bh, waiting) = {
            let mut st = self.shared().state.lock();
            st.completion.enter(index);
            (st.completion.target(), !st.done.is_empty())
        };
        if (waiting || !self.home.pending.borrow().is_empty())
            && let Some(bh) = &bh
        {
            bh.schedule();
        }
        let _leave = Leave {
            pool: self,
            index,
            nested: bh,
        };
        callback();
    }
}

/// If a callback (or a waker, or the drop of a result) panics, the panic leaves the pass, and
/// the rest of the batch waits for the next one: schedule it.
struct ResumeOnPanic<'a> {
    pool: &'a ThreadPool,
}

impl Drop for ResumeOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let bh = self.pool.shared().state.lock().completion.target();
            if let Some(bh) = bh {
                bh.schedule();
            }
        }
    }
}

/// Ends a callback's busy mark, also when the callback panics.
struct Leave<'a> {
    pool: &'a ThreadPool,
    index: usize,
    /// The BH that served nested polls during the callback.
    nested: Option<Arc<BottomHalf>>,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.pool.shared().state.lock().completion.leave(self.index);
        // When unwinding, `ResumeOnPanic` schedules the next pass. Otherwise: no nested poll ran
        // the nested BH (or it has run), and whatever it was scheduled for, this pass picks up
        // now, so spare the loop an empty pass. (Reliable: we are on the home thread, between
        // passes of that BH.)
        if !std::thread::panicking()
            && let Some(nested) = &self.nested
        {
            nested.cancel();
        }
    }
}

/// The pools of one context, by identity (a context-local value).
#[derive(Default)]
pub(crate) struct Registry {
    pools: RefCell<Vec<(u64, Weak<ThreadPool>)>>,
}

impl Registry {
    pub(crate) fn of(ctx: &AioContext) -> Rc<Registry> {
        ctx.local(|_| Registry::default())
    }

    pub(crate) fn register(&self, id: u64, pool: &Rc<ThreadPool>) {
        let mut pools = self.pools.borrow_mut();
        pools.retain(|(_, weak)| weak.strong_count() > 0);
        pools.push((id, Rc::downgrade(pool)));
    }

    fn find(&self, id: u64) -> Option<Rc<ThreadPool>> {
        let pools = self.pools.borrow();
        pools
            .iter()
            .find(|(pool_id, _)| *pool_id == id)
            .and_then(|(_, weak)| weak.upgrade())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // The context is going away: shut down its pools that something else still holds (the
        // context's own pool has been dropped just before, as a later context-local value).
        for (_, weak) in self.pools.get_mut().drain(..) {
            if let Some(pool) = weak.upgrade() {
                pool.shut_down();
            }
        }
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("pools", &self.pools.borrow().len())
            .finish()
    }
}

impl fmt::Debug for Home {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Home")
            .field("pending", &self.pending.borrow().len())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for CompletionBhs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionBhs")
            .field("bhs", &self.bhs.len())
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}
