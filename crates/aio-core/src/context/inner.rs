//! [`Inner`], the part of a context that only its home thread touches (the monitor, the
//! handler table, the BH slices, timers, tasks, scopes, counters), and its drop: the order in
//! which a context that goes away frees what it holds without running a callback.

use super::{CompletionSource, Polling, Shared};
use crate::bh::{self, Slice};
use crate::fdmon::{FdMonitor, NoFds, ReadyList};
use crate::handler::Registry;
use crate::remote;
use crate::scope::Scopes;
use crate::sync::{self, Arc, Ordering, fence};
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::rc::Rc;
use timers::TimerListGroup;

/// The part of a context that only its home thread touches.
pub(crate) struct Inner {
    pub(crate) shared: Arc<Shared>,
    pub(crate) monitor: RefCell<Box<dyn FdMonitor>>,
    pub(crate) registry: RefCell<Registry>,
    /// Active BH slices, front first (one per BH pass on the stack).
    pub(super) slices: RefCell<VecDeque<Slice>>,
    /// Spare ready lists, so that polls (nested ones too) allocate nothing in steady state.
    pub(super) spare_ready: RefCell<Vec<ReadyList>>,
    /// Id of the latest iteration (or outer-loop dispatch); see `HandlerNode::epoch`.
    pub(super) epoch: Cell<u64>,
    /// Whether external handlers are out of the monitor: follows
    /// `Shared::external_disabled > 0` (see `sync_external`).
    pub(super) external_unwatched: Cell<bool>,
    /// Readiness collected by `check` for `dispatch` when an outer loop drives the context.
    pub(super) outer_ready: RefCell<ReadyList>,
    /// The context's timers, one list per clock (QEMU `ctx->tlg`).
    pub(crate) timers: TimerListGroup,
    /// Per-context singletons of crates built on the loop (QEMU keeps such things, like the
    /// thread pool, as fields of `AioContext`; core cannot name their types). See
    /// [`AioContext::local`].
    pub(super) locals: RefCell<Vec<Rc<dyn Any>>>,
    /// Completion sources run after the BHs of every iteration (see
    /// [`AioContext::add_completion_source`]).
    pub(super) completion_sources: RefCell<Vec<CompletionSource>>,
    /// Whether a completion source holds completions it has not run yet (see
    /// [`AioContext::add_completion_pending`]); asked before every wait.
    pub(super) completion_pending: RefCell<Vec<Rc<dyn Fn() -> bool>>>,
    /// Home-thread counters for [`Stats`].
    pub(super) waits: Cell<u64>,
    /// Loop iterations (outer-loop dispatches included), BH, fd-handler and timer callbacks
    /// run, and task polls, for [`Stats`].
    pub(super) iterations: Cell<u64>,
    pub(super) bh_calls: Cell<u64>,
    pub(super) handler_calls: Cell<u64>,
    pub(super) timer_calls: Cell<u64>,
    pub(crate) task_polls: Cell<u64>,
    pub(super) wait_errors: Cell<u64>,
    pub(super) event_drains: Cell<u64>,
    /// How many backend waits in a row have failed (0 after a successful one): sets the
    /// back-off and keeps the log quiet.
    pub(super) failed_waits: Cell<u32>,
    /// Adaptive polling, home-thread side.
    pub(super) polling: Polling,
    /// How many iterations of this context are on the stack (1 in an outermost one).
    pub(super) depth: Cell<u32>,
    /// The context's tasks (see `task.rs`).
    pub(crate) tasks: crate::task::Tasks,
    /// Isolation scopes (see `scope.rs`).
    pub(crate) scopes: Rc<Scopes>,
    /// BHs unlinked by a pass while their scope was held, oldest first.
    pub(super) held_bhs: RefCell<bh::Held>,
    /// Whether a [`SharedContext`](crate::SharedContext) owns this context: then
    /// [`AioContext::current`] never hands it out ([SHARED-1]).
    pub(crate) in_shared: Cell<bool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The monitor first, while every registered fd is still open ([FD-1]): what follows
        // closes fds (the registry's owners, an `AsyncFd` inside a task), and a backend must
        // see them go first (`polling` requires a delete before the close, which dropping its
        // poller amounts to; io_uring's drop submits what it still has queued while it reaps
        // its requests). Nothing below uses it: no `AioContext` can exist any more.
        drop(std::mem::replace(self.monitor.get_mut(), Box::new(NoFds)));
        // Tasks next, without polling them: their futures may own BHs, timers and handler
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
