//! Isolation scopes (seed 003, the 2009 `AsyncContext` stack): [`AioContext::isolated`] and
//! the per-context scope state that BH passes, fd dispatch, tasks and crates built on the loop
//! (the thread pool, timers) consult to hold back work of outer scopes.
//!
//! # The id rule
//!
//! Each scope gets an id from a per-context counter that only increases; the root scope (no
//! `isolated` call active) is 0. Every item (BH, fd handler, task, pool request, timer) records
//! the id of the innermost scope active when it was created. While scope `S` is innermost, an
//! item may run iff `item.scope >= S.id`:
//!
//! - Scopes are strictly nested (a closure cannot outlive its caller), so when `S` is innermost
//!   every scope still active is `S` or an ancestor of `S`, and all ancestors were entered
//!   before `S`, so have smaller ids.
//! - An id `>= S.id` was handed out while `S` was active (ids increase and `S` took the counter
//!   to `S.id`): it is `S` itself, or a scope entered later, which is nested in `S` and, not
//!   being active, has ended. Work created in an ended scope belongs to the scope that
//!   enclosed it, and that is `S` or one of `S`'s (ended) descendants, whose work belongs to
//!   `S` too, recursively. So it may run.
//! - An id `< S.id` is an ancestor of `S` or a scope that ended before `S` began, whose work
//!   belongs to the ancestor that enclosed it: outer work, held.
//!
//! No bookkeeping per ended scope is needed, and a scope that ends makes its work its parent's
//! simply by lowering the innermost id.

use crate::AioContext;
use crate::context::CurrentGuard;
use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::Rc;

/// The root scope's id: work created outside any [`AioContext::isolated`] call, or through a
/// [`ContextHandle`](crate::ContextHandle) (other threads know nothing of the home thread's
/// scopes).
pub(crate) const ROOT: u64 = 0;

/// The id of machinery that runs in every scope and filters its own work (a task slot's BH,
/// the thread pool's completion BH, the context's notifier).
pub(crate) const ANY: u64 = u64::MAX;

/// Identifies an isolation scope of one context (see [`AioContext::isolated`]). Ids only
/// increase; [`ScopeId::ROOT`] is the scope outside every `isolated` call.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ScopeId(pub(crate) u64);

impl ScopeId {
    /// The root scope.
    pub const ROOT: ScopeId = ScopeId(ROOT);
}

/// The home thread's scope state of a context.
#[derive(Default)]
pub(crate) struct Scopes {
    /// The innermost active scope's id.
    current: Cell<u64>,
    /// The last id handed out.
    last: Cell<u64>,
    /// Above 0 while the home thread applies other threads' operations: what they create
    /// belongs to the root scope, not to whatever scope the loop happens to be in.
    remote: Cell<u32>,
    /// Slots of tasks whose BH ran while their scope was held (see `task::run`).
    pub(crate) held_tasks: RefCell<Vec<u32>>,
    /// Called after each scope ends (the thread pool re-delivers completions it held); one
    /// that returns false is dropped.
    exit_hooks: RefCell<Vec<Rc<dyn Fn() -> bool>>>,
}

impl Scopes {
    /// Whether an item of scope `id` may run now.
    pub(crate) fn allows(&self, id: u64) -> bool {
        id >= self.current.get()
    }

    /// Whether an isolation scope is active (then some items may be held).
    pub(crate) fn any_active(&self) -> bool {
        self.current.get() != ROOT
    }

    /// The scope that an item created now belongs to.
    pub(crate) fn creation(&self) -> u64 {
        if self.remote.get() > 0 {
            ROOT
        } else {
            self.current.get()
        }
    }

    /// Makes what the caller creates until the guard drops belong to the root scope.
    pub(crate) fn enter_remote(&self) -> RemoteGuard<'_> {
        self.remote.set(self.remote.get() + 1);
        RemoteGuard(self)
    }
}

/// See [`Scopes::enter_remote`].
pub(crate) struct RemoteGuard<'a>(&'a Scopes);

impl Drop for RemoteGuard<'_> {
    fn drop(&mut self) {
        self.0.remote.set(self.0.remote.get() - 1);
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scopes")
            .field("current", &self.current.get())
            .field("last", &self.last.get())
            .finish()
    }
}

/// The scope state of one context, home thread only (see [`AioContext::scope_view`]).
#[derive(Clone)]
pub struct ScopeView(Rc<Scopes>);

impl ScopeView {
    /// The scope that work created now belongs to (as [`AioContext::scope_id`]).
    pub fn current(&self) -> ScopeId {
        ScopeId(self.0.creation())
    }

    /// Whether work of `scope` may run now (as [`AioContext::scope_allows`]).
    pub fn allows(&self, scope: ScopeId) -> bool {
        self.0.allows(scope.0)
    }
}

impl fmt::Debug for ScopeView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An active isolation scope, lent to the closure of [`AioContext::isolated`].
pub struct Scope<'a> {
    ctx: &'a AioContext,
    id: u64,
}

impl Scope<'_> {
    /// This scope's id.
    pub fn id(&self) -> ScopeId {
        ScopeId(self.id)
    }

    /// The context the scope isolates.
    pub fn context(&self) -> &AioContext {
        self.ctx
    }
}

impl fmt::Debug for Scope<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scope").field("id", &self.id).finish()
    }
}

/// Leaves a scope when dropped, unwinding included: restores the parent as innermost, puts
/// the handlers the parent allows back in the monitor, and wakes what the scope held.
struct Leave<'a> {
    ctx: &'a AioContext,
    parent: u64,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let inner = &*self.ctx.inner;
        inner.scopes.current.set(self.parent);
        inner.timers.set_scope(self.parent);
        inner.sync_watched();
        // Held tasks the parent allows get their BH scheduled again (a spurious poll of a
        // slot's later task is harmless); held BHs need nothing: the next BH pass takes them
        // first, and `compute_timeout` counts them.
        let held: Vec<u32> = {
            let mut held = inner.scopes.held_tasks.borrow_mut();
            let (now, later) = held.drain(..).partition(|&index| {
                inner
                    .tasks
                    .held_scope(index)
                    .is_none_or(|s| inner.scopes.allows(s))
            });
            *held = later;
            now
        };
        for index in held {
            inner.tasks.wake_slot(index);
        }
        let hooks: Vec<Rc<dyn Fn() -> bool>> = inner.scopes.exit_hooks.borrow().clone();
        for hook in hooks {
            if !hook() {
                inner
                    .scopes
                    .exit_hooks
                    .borrow_mut()
                    .retain(|h| !Rc::ptr_eq(h, &hook));
            }
        }
    }
}

impl AioContext {
    /// Runs `f` in a new isolation scope (the 2009 `AsyncContext` stack, seed 003): while it
    /// runs, iterations of this context (`poll`, `poll_nonblocking`, `block_on`, ... nested
    /// in `f`) run only the work created inside the scope: bottom halves, fd handlers, tasks,
    /// and, with the crates that support it, thread-pool completions and timers. Work that
    /// belongs to outer scopes is *held*: it is not lost, keeps its order, and does not make
    /// the loop spin (its fds are out of the monitor and its BHs do not shorten the wait).
    ///
    /// When `f` returns, the scope's own pending BHs are flushed (BH passes until one makes no
    /// progress, QEMU's `while (qemu_bh_poll());`), then the scope ends: what it held runs in
    /// the enclosing scope's next iterations, and what was created in it belongs to the
    /// enclosing scope from then on. Scopes nest. If `f` panics, the scope ends during the
    /// unwinding without the flush (its BHs then run later, in the enclosing scope).
    ///
    /// Work created through a [`ContextHandle`](crate::ContextHandle) (from any thread)
    /// belongs to the root scope. A BH that reschedules itself forever keeps the flush going
    /// forever, as in QEMU.
    ///
    /// What the scope waits for must be created inside it: waiting in the scope for outer
    /// work (a BH, an fd handler or an `AsyncFd` registered before the scope, an outer task's
    /// `JoinHandle`, another thread's one-shot) waits until the scope ends, that is, forever,
    /// as the seed's nested wait would have.
    ///
    /// Use it where a callback must wait synchronously for its own I/O without other requests'
    /// callbacks changing state under it; code written as tasks with
    /// [`CoMutex`](crate::task::CoMutex) usually needs no scope (QEMU replaced the stack with
    /// coroutines and `CoMutex`).
    ///
    /// # Example
    ///
    /// ```
    /// use aio_core::AioContext;
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU32, Ordering};
    ///
    /// let ctx = AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    /// let o = order.clone();
    /// let unrelated = ctx.bh(move || o.lock().unwrap().push("unrelated"));
    /// unrelated.schedule();
    ///
    /// ctx.isolated(|scope| {
    ///     // A "synchronous read" done with the loop: only this scope's BH runs.
    ///     let done = Arc::new(AtomicU32::new(0));
    ///     let d = done.clone();
    ///     let o = order.clone();
    ///     scope.context().schedule_oneshot(move || {
    ///         o.lock().unwrap().push("mine");
    ///         d.store(1, Ordering::Relaxed);
    ///     });
    ///     while done.load(Ordering::Relaxed) == 0 {
    ///         scope.context().poll();
    ///     }
    /// });
    /// ctx.poll_nonblocking();
    /// assert_eq!(*order.lock().unwrap(), ["mine", "unrelated"]);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn isolated<R>(&self, f: impl FnOnce(&Scope<'_>) -> R) -> R {
        let inner = &*self.inner;
        let id = inner.scopes.last.get() + 1;
        // 2^64 - 1 scopes would take centuries; `ANY` must never be a scope's id.
        assert!(id < ANY, "isolation scope ids exhausted");
        inner.scopes.last.set(id);
        let parent = inner.scopes.current.replace(id);
        let leave = Leave { ctx: self, parent };
        inner.timers.set_scope(id);
        inner.sync_watched();
        let result = f(&Scope { ctx: self, id });
        // The seed's `async_context_pop`: flush the scope's BHs before leaving it.
        {
            let _current = CurrentGuard::enter(Rc::as_ptr(&self.inner));
            while inner.bh_poll() {}
        }
        drop(leave);
        result
    }

    /// The innermost isolation scope now active ([`ScopeId::ROOT`] outside every
    /// [`isolated`](Self::isolated) call). For crates built on the loop that tag their own
    /// work (the thread pool tags requests with it).
    pub fn scope_id(&self) -> ScopeId {
        ScopeId(self.inner.scopes.creation())
    }

    /// Whether work tagged with `scope` may run now (see [`isolated`](Self::isolated)): `scope`
    /// is the innermost scope or one that has ended inside it.
    pub fn scope_allows(&self, scope: ScopeId) -> bool {
        self.inner.scopes.allows(scope.0)
    }

    /// Creates a BH that runs in every isolation scope, for a dispatcher that filters its own
    /// work with [`scope_allows`](Self::scope_allows) (the thread pool's completion BH).
    pub fn bh_any_scope(
        &self,
        f: impl FnMut(&crate::RunningBh<'_>) + Send + 'static,
    ) -> crate::BottomHalf {
        crate::BottomHalf::new(self.inner.shared.clone(), Box::new(f), ANY)
    }

    /// Calls `hook` on the home thread each time an isolation scope of this context ends,
    /// after the enclosing scope became innermost again: for a dispatcher that held work to
    /// schedule itself again. The hook is dropped the first time it returns false (or with
    /// the context).
    pub fn on_scope_exit(&self, hook: impl Fn() -> bool + 'static) {
        self.inner
            .scopes
            .exit_hooks
            .borrow_mut()
            .push(Rc::new(hook));
    }

    /// A view of this context's scope state that does not keep the context alive: for
    /// context-local values (a thread pool) that tag their own work with the scope it was
    /// created in.
    pub fn scope_view(&self) -> ScopeView {
        ScopeView(self.inner.scopes.clone())
    }
}
