//! Futures as QEMU's coroutines: the task executor inside the context. This file owns a task's
//! shared header (its waker), the context's table of tasks, running one task, moving a task to
//! another context, [`JoinHandle`], [`AioContext::block_on`] and [`AioContext::wait_while`]
//! (QEMU `AIO_WAIT_WHILE`), [`wait_kick`], [`yield_now`] and [`reschedule`].
//!
//! A task is a future plus a bottom half, not a second scheduler. The future lives in the
//! context's task table (home thread only); its BH, owned by the task's header, polls it.
//! Waking the task schedules that BH, from any thread: a wake-up costs what a BH schedule
//! costs (an atomic flag and a list push; an eventfd write only if the loop sleeps), and two
//! wake-ups before the task runs coalesce. Because a BH never re-enters a running callback, a
//! task is never polled re-entrantly, and a wake-up from inside another task of the same
//! context runs the woken task in the next BH pass rather than on top of the waker's stack
//! (QEMU's coroutine queue "chaining").
//!
//! QEMU mapping: `aio_co_enter`/`aio_co_wake` → [`Waker::wake`] (the task resumes on the
//! context it last ran on); `aio_co_schedule` → [`ContextHandle::spawn`]; `aio_co_reschedule_self`
//! → [`reschedule`]; `AIO_WAIT_WHILE` → [`AioContext::wait_while`] / [`AioContext::block_on`];
//! `aio_wait_kick` → [`wait_kick`].

mod co_sync;
pub mod fd;
pub mod time;

pub use co_sync::{
    CoMutex, CoMutexGuard, CoQueue, CoRwLock, CoRwLockReadGuard, CoRwLockWriteGuard, Lock,
    QueueWait, ReadLock, WriteLock,
};
pub use fd::AsyncFd;
pub use time::{Elapsed, Sleep, now_ns, sleep, sleep_on, sleep_until, timeout, timeout_on};

mod cell;

use crate::bh::{self, BottomHalf};
use crate::context::{AioContext, ContextHandle};
use crate::sync::global::{self, AtomicU64, AtomicUsize};
use crate::sync::{AtomicBool, Ordering, StdArc as Arc, lock};
use cell::{ABORT, HeaderRef, JoinRef, MOVING, Owned, SENDABLE, SendOwned};
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Wake, Waker};

/// A task's owner token as its slot holds it: whether the future may move to another context
/// is a property of its type, kept here.
enum Owner {
    Local(Owned),
    Send(SendOwned),
}

impl Owner {
    fn owned(&self) -> &Owned {
        match self {
            Owner::Local(o) => o,
            Owner::Send(s) => s.owned(),
        }
    }
}

/// Where a task sits in its context's table; a freed slot's generation changes, so a stale
/// key finds nothing.
#[derive(Clone, Copy, Debug)]
struct TaskKey {
    index: u32,
    generation: u32,
}

#[derive(Default)]
struct Slot {
    generation: u32,
    task: Option<Owner>,
    /// `run` is polling the task ([TASK-1]): the slot is freed by no one but that `run`.
    running: bool,
    /// The slot's BH, made for its first task and reused by every later one: it polls
    /// whichever task holds the slot when it runs. Saves a BH (two allocations and a delete
    /// pass) per task.
    bh: Option<Arc<BottomHalf>>,
    /// The isolation scope of the task in the slot (see `scope.rs`): the slot's BH runs in
    /// every scope, and `run` holds the task while its scope may not run. Per task, not per
    /// BH, since the BH is reused.
    scope: u64,
}

/// The context's tasks (home thread only): a table with generations and a free list. No
/// borrow of the table is held while a future is polled or dropped: a future may spawn,
/// abort or wake tasks of the same context.
#[derive(Default)]
pub(crate) struct Tasks {
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
}

impl Tasks {
    /// Puts the task that `make` builds (given its slot's BH) in a free slot and schedules
    /// that BH (made on the slot's first use; it polls whichever task holds the slot): the
    /// task is first polled on the context's next BH pass. `make` runs under the table's
    /// borrow: it must only build the task.
    fn insert_and_schedule(&self, ctx: &AioContext, make: impl FnOnce(Arc<BottomHalf>) -> Owner) {
        let mut slots = self.slots.borrow_mut();
        let index = match self.free.borrow_mut().pop() {
            Some(i) => i,
            None => {
                slots.push(Slot::default());
                u32::try_from(slots.len() - 1).expect("fewer than 2^32 tasks")
            }
        };
        let slot = &mut slots[index as usize];
        debug_assert!(slot.task.is_none() && !slot.running);
        let bh = slot
            .bh
            .get_or_insert_with(|| {
                Arc::new(BottomHalf::new(
                    ctx.inner.shared.clone(),
                    bh::plain_callback(move || {
                        if let Some(ctx) = AioContext::current() {
                            run(&ctx, index);
                        }
                    }),
                    crate::scope::ANY,
                ))
            })
            .clone();
        slot.task = Some(make(bh));
        slot.scope = ctx.inner.scopes.creation();
        // Scheduling runs nothing (and, on the home thread, needs no system call), so it may
        // happen under the borrow.
        if let Some(bh) = &slot.bh {
            bh.schedule();
        }
    }

    /// Marks the task in slot `index` as being polled and returns its key and address; `None`
    /// if the slot is free.
    fn start_run(&self, index: u32) -> Option<(TaskKey, *const dyn cell::Task)> {
        let mut slots = self.slots.borrow_mut();
        let slot = slots.get_mut(index as usize)?;
        let task = slot.task.as_ref()?;
        if slot.running {
            // Being polled further up the stack. Only the task's BH polls it, and a BH is
            // never re-entered, so this cannot happen; should it, the wake-up is kept.
            task.owned().task().header().wake();
            return None;
        }
        slot.running = true;
        Some((
            TaskKey {
                index,
                generation: slot.generation,
            },
            task.owned().as_ptr(),
        ))
    }

    /// The scope of the task in slot `index`, if the slot holds one.
    pub(crate) fn held_scope(&self, index: u32) -> Option<u64> {
        let slots = self.slots.borrow();
        let slot = slots.get(index as usize)?;
        slot.task.as_ref().map(|_| slot.scope)
    }

    /// Schedules the BH of slot `index` (a task held by a scope that ended).
    pub(crate) fn wake_slot(&self, index: u32) {
        let bh = self
            .slots
            .borrow()
            .get(index as usize)
            .and_then(|s| s.bh.clone());
        if let Some(bh) = bh {
            bh.schedule();
        }
    }

    /// Ends a poll that left the task pending.
    fn end_run(&self, index: u32) {
        self.slots.borrow_mut()[index as usize].running = false;
    }

    /// A counted handle on the header of the task in slot `index`, if the slot holds one.
    fn header(&self, index: u32) -> Option<HeaderRef> {
        let slots = self.slots.borrow();
        Some(
            slots
                .get(index as usize)?
                .task
                .as_ref()?
                .owned()
                .header_ref(),
        )
    }

    /// Empties the slot of `key` (its generation changes, so stale keys find nothing) and
    /// returns its task, for the caller to drop or move outside the borrow. The slot stays
    /// marked running and out of the free list until [`Tasks::free_slot`]: a task spawned
    /// while the old one's future is dropped (its `Drop` may spawn and run a nested loop) must
    /// not get this slot, whose BH is the one running.
    fn take(&self, key: TaskKey) -> Option<Owner> {
        let mut slots = self.slots.borrow_mut();
        let slot = slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        let task = slot.task.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        Some(task)
    }

    /// Puts a slot emptied by [`Tasks::take`] back in the free list.
    fn free_slot(&self, index: u32) {
        self.slots.borrow_mut()[index as usize].running = false;
        self.free.borrow_mut().push(index);
    }

    /// How many tasks the context holds.
    pub(crate) fn len(&self) -> usize {
        self.slots.borrow().len() - self.free.borrow().len()
    }

    /// Drops every task without polling it (the context is going away). A future's `Drop` may
    /// touch the table (abort or wake another task), so no borrow is held while one runs.
    pub(crate) fn drop_all(&self) {
        loop {
            let taken: Vec<Owner> = {
                let mut slots = self.slots.borrow_mut();
                debug_assert!(slots.iter().all(|s| !s.running));
                slots.iter_mut().filter_map(|s| s.task.take()).collect()
            };
            if taken.is_empty() {
                break;
            }
            for task in taken {
                drop(task.owned().task().header().take_bh());
                // Dropping the owner drops the future; user code there is caught and logged,
                // and this catches whatever else might unwind (a waker's `Drop` freed with the
                // cell), so that the context's drop goes on.
                if let Err(panic) = catch_unwind(AssertUnwindSafe(move || drop(task))) {
                    tracing::error!(
                        "dropping a task with its context panicked: {}",
                        panic_message(panic.as_ref())
                    );
                }
            }
        }
        self.slots.borrow_mut().clear();
        self.free.borrow_mut().clear();
    }
}

thread_local! {
    /// The slot of the task this thread is polling (innermost), on the current context, for
    /// [`reschedule`]. `block_on` and nested iterations hide it from what they poll, which is
    /// not that task.
    static RUNNING: Cell<Option<u32>> = const { Cell::new(None) };
}

/// Makes a task (or no task) the running one, restoring the previous one on drop.
pub(crate) struct RunningGuard(Option<u32>);

/// Hides the running task, if there is one, until the guard is dropped: for a loop iteration
/// nested in a task's poll (see `CurrentGuard`).
pub(crate) fn hide_running() -> Option<RunningGuard> {
    RUNNING.with(|r| r.take().map(|index| RunningGuard(Some(index))))
}

impl RunningGuard {
    fn enter(task: Option<u32>) -> RunningGuard {
        RunningGuard(RUNNING.with(|r| r.replace(task)))
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        RUNNING.with(|r| r.set(self.0));
    }
}

/// Puts a task that arrives from elsewhere (a [`ContextHandle::spawn`] or a [`reschedule`])
/// in `ctx`'s table with its slot's BH, installs that BH in its header and schedules it.
fn install_and_schedule(ctx: &AioContext, task: SendOwned) {
    let mut old = None;
    ctx.inner.tasks.insert_and_schedule(ctx, |bh| {
        old = lock(&task.owned().task().header().sched).bh.replace(bh);
        Owner::Send(task)
    });
    drop(old);
}

/// Polls the task in slot `index` once, from the slot's BH.
fn run(ctx: &AioContext, index: u32) {
    let tasks = &ctx.inner.tasks;
    let scopes = &ctx.inner.scopes;
    if scopes.any_active() && tasks.held_scope(index).is_some_and(|s| !scopes.allows(s)) {
        // An outer scope's task: remember the wake-up (once per slot); the scope's end
        // schedules the BH again.
        let mut held = scopes.held_tasks.borrow_mut();
        if !held.contains(&index) {
            held.push(index);
        }
        return;
    }
    let Some((key, task)) = tasks.start_run(index) else {
        return;
    };
    let this = task.cast::<()>();
    // The slot is marked running, so nobody but this function frees it, and the owner token
    // it holds keeps the task alive until then.
    // SAFETY: [TASK-1]: a running slot's task is alive and freed only by this function.
    let task = unsafe { &*task };
    let header = task.header();
    if header.has(ABORT) {
        finish(ctx, key);
        return;
    }
    ctx.inner.task_polls.set(ctx.inner.task_polls.get() + 1);
    let poll = {
        let _running = RunningGuard::enter(Some(index));
        // The slot holds the task's owner token, this is its home thread, and the running
        // mark keeps any other poll or drop of the task out until it returns.
        // SAFETY: [TASK-1]: owner token held, home thread, no other poll or drop meanwhile.
        unsafe { task.poll(this) }
    };
    if poll.is_ready() {
        finish(ctx, key);
        return;
    }
    // Relaxed: MOVING is set and cleared on this thread only.
    if header.flags.load(Ordering::Relaxed) & MOVING == 0 {
        tasks.end_run(index);
        return;
    }
    // The poll asked to move the task (rare).
    header.flags.fetch_and(!MOVING, Ordering::Relaxed);
    let target = lock(&header.sched).move_to.take();
    let Some((_, target)) = target else {
        tasks.end_run(index);
        return;
    };
    drop(header.take_bh());
    let Some(task) = tasks.take(key) else {
        return;
    };
    let _free = FreeSlot(tasks, index);
    match task {
        // If the target is gone, the one-shot, and the future with it, is dropped right here.
        Owner::Send(task) => target.schedule_oneshot(move || arrive(task)),
        // `reschedule` refuses to set a target for a local task.
        Owner::Local(task) => drop(task),
    }
}

/// Puts a slot back in the free list when dropped (after the task taken out of it is gone).
struct FreeSlot<'a>(&'a Tasks, u32);

impl Drop for FreeSlot<'_> {
    fn drop(&mut self) {
        self.0.free_slot(self.1);
    }
}

/// Takes the task out of its context (its slot) and drops it: the future, if still there,
/// then the owner's count.
fn finish(ctx: &AioContext, key: TaskKey) {
    // The slot of a task being run is freed only here, by its own run, and the owner dropped
    // outside the table's borrow, before the slot goes back to the free list.
    let tasks = &ctx.inner.tasks;
    if let Some(task) = tasks.take(key) {
        let _free = FreeSlot(tasks, key.index);
        drop(task);
    }
}

/// A `Send` task arriving on the context this runs on (a [`ContextHandle::spawn`] or a
/// [`reschedule`]): install it and schedule its BH. It is polled by that BH, never from here:
/// only a poll from the task's own BH is protected against re-entry (a nested loop inside it
/// parks the BH instead of running it, so a wake-up from inside the poll is kept).
fn arrive(task: SendOwned) {
    // A one-shot BH runs inside its context's poll, which makes the context current.
    let Some(ctx) = AioContext::current() else {
        return;
    };
    install_and_schedule(&ctx, task);
}

/// Why a task produced no value.
pub struct JoinError {
    panic: Option<Box<dyn Any + Send>>,
}

impl JoinError {
    /// Whether the task was aborted, or dropped with its context, before it finished.
    pub fn is_cancelled(&self) -> bool {
        self.panic.is_none()
    }

    /// Whether the task panicked.
    pub fn is_panic(&self) -> bool {
        self.panic.is_some()
    }

    /// The panic's payload, to resume it with [`std::panic::resume_unwind`]; `Err(self)` if
    /// the task was cancelled.
    ///
    /// # Errors
    ///
    /// Returns the error itself when it is not a panic.
    pub fn try_into_panic(self) -> Result<Box<dyn Any + Send>, JoinError> {
        match self.panic {
            Some(p) => Ok(p),
            None => Err(self),
        }
    }
}

/// The text of a panic payload, when it is a string.
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(not a string)"
    }
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.panic {
            None => f.write_str("task cancelled"),
            Some(p) => write!(f, "task panicked: {}", panic_message(p.as_ref())),
        }
    }
}

impl fmt::Debug for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for JoinError {}

/// An owned permission to wait for a task, and to abort it (tokio's `JoinHandle`, QEMU has no
/// equivalent: a coroutine's caller waits on its own flag).
///
/// It is a future: `handle.await` gives `Ok(output)`, or an [`JoinError`] if the task panicked
/// or was cancelled. Dropping it *detaches* the task, which keeps running; a detached task's
/// panic is logged. It is `Send` when the output is. Like any future, it must not be polled
/// again after it returned its result (that panics).
pub struct JoinHandle<T> {
    task: JoinRef<T>,
}

impl<T> JoinHandle<T> {
    /// Aborts the task: it is dropped, on its context's thread, instead of being polled again
    /// (on the context's next iteration if it is idle, after its current poll if it is
    /// running), and this handle then
    /// gives a cancelled [`JoinError`]. Does nothing if the task has finished. Callable from
    /// any thread, and from inside the task itself.
    pub fn abort(&self) {
        // Release pairs with the Acquire in `Header::has`.
        self.task.header().flags.fetch_or(ABORT, Ordering::Release);
        self.task.header().wake();
    }

    /// Whether the task has finished (returned, panicked or been cancelled).
    pub fn is_finished(&self) -> bool {
        self.task.is_complete()
    }

    /// Lets the task run on without anyone waiting for it (the same as dropping the handle).
    pub fn detach(self) {}
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.task.poll(cx)
    }
}

impl<T> fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinHandle")
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl AioContext {
    /// Runs `future` as a task on this context (home thread only, so it need not be `Send`).
    /// It is first polled on the next iteration, and again on the iteration after each
    /// wake-up. Like tokio's `spawn_local`; QEMU creates a coroutine and `aio_co_enter`s it.
    ///
    /// A task that keeps an `AioContext` clone keeps the context alive as long as it is not
    /// finished; inside a task, [`AioContext::current`] gives the context without that cycle.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use std::rc::Rc;
    /// let shared = Rc::new(41); // not Send
    /// let s = shared.clone();
    /// let task = ctx.spawn_local(async move { *s + 1 });
    /// assert_eq!(ctx.block_on(task).unwrap(), 42);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn spawn_local<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        let mut join = None;
        self.inner.tasks.insert_and_schedule(self, |bh| {
            let (task, j) = cell::new_local(future, Some(bh));
            join = Some(j);
            Owner::Local(task)
        });
        JoinHandle {
            task: join.expect("made by insert"),
        }
    }

    /// Runs a `Send` future as a task on this context; unlike a [`spawn_local`](Self::spawn_local)
    /// task, it can move to another context with [`reschedule`].
    pub fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let mut join = None;
        self.inner.tasks.insert_and_schedule(self, |bh| {
            let (task, j) = cell::new_send(future, Some(bh));
            join = Some(j);
            Owner::Send(task)
        });
        JoinHandle {
            task: join.expect("made by insert"),
        }
    }

    /// How many tasks this context holds (spawned and not finished, aborted or moved away).
    pub fn task_count(&self) -> usize {
        self.inner.tasks.len()
    }

    /// Runs the loop on this thread until `future` completes, and returns its output (QEMU
    /// `AIO_WAIT_WHILE` with a future as the condition).
    ///
    /// Unlike tokio's `block_on`, it works from anywhere on the home thread: from a BH, an fd
    /// handler, a timer callback or a task, nested to any depth. While it waits, the context
    /// runs everything else (other tasks, BHs, handlers, timers); the task that called it, if
    /// any, is not polled again until it returns. `future` itself need not be `Send` or
    /// `'static`, and it is polled on this thread only.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        let mut future = pin!(future);
        let signal = Arc::new(BlockOnSignal {
            woken: AtomicBool::new(true),
            ctx: self.handle(),
        });
        let waker = Waker::from(signal.clone());
        let mut cx = Context::from_waker(&waker);
        let _waiting = Waiting::register(self);
        loop {
            // Consumed before the poll: a wake-up during it is seen below. Relaxed: the
            // Acquire loads below order what matters.
            signal.woken.store(false, Ordering::Relaxed);
            {
                // Current, as inside an iteration (timer futures find their context), and
                // hiding the enclosing task, if any: the future polled here is not that task.
                let _current = self.enter_current();
                if let Poll::Ready(v) = future.as_mut().poll(&mut cx) {
                    return v;
                }
            }
            // Let the loop run at least once between two polls, without sleeping if the
            // future woke itself (a `yield_now` lets the context's other work run).
            // Acquire pairs with the Release in `BlockOnSignal::wake_by_ref`.
            if signal.woken.load(Ordering::Acquire) {
                self.poll_nonblocking();
            }
            // A wake-up that lands after this check notifies the context, so `poll` does not
            // sleep through it (the notify protocol).
            while !signal.woken.load(Ordering::Acquire) {
                self.poll();
            }
        }
    }

    /// Runs the loop on this thread while `condition` holds (QEMU `AIO_WAIT_WHILE` on the
    /// home context). Works from any callback or task, nested. A condition that another
    /// thread changes should be followed by [`wait_kick`] (or any wake-up of this context),
    /// or the wait may sleep until the context's next event.
    pub fn wait_while(&self, mut condition: impl FnMut() -> bool) {
        let _waiting = Waiting::register(self);
        let _not_a_task = RunningGuard::enter(None);
        while condition() {
            self.poll();
        }
    }
}

impl ContextHandle {
    /// Runs a `Send` future as a task on this handle's context, from any thread (QEMU
    /// `aio_co_schedule`). The task is polled on the context's next iteration. If the context
    /// is gone, or goes before that, the task is dropped and its handle gives a cancelled
    /// [`JoinError`].
    pub fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (task, join) = cell::new_send(future, None);
        self.schedule_oneshot(move || arrive(task));
        JoinHandle { task: join }
    }
}

/// The waker of a [`AioContext::block_on`]: a flag, and a notify of the waiting context.
struct BlockOnSignal {
    woken: AtomicBool,
    ctx: ContextHandle,
}

impl Wake for BlockOnSignal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Release pairs with the Acquire in `block_on`: the waiter sees what the waker did.
        if !self.woken.swap(true, Ordering::Release) {
            // Like a BH schedule: no notify from the home thread outside its blocking window
            // (a callback of this very loop; `block_on` checks the flag when it returns).
            self.ctx.wake_for_work();
        }
    }
}

/// The contexts inside [`AioContext::wait_while`] or [`AioContext::block_on`], for
/// [`wait_kick`] (QEMU `global_aio_wait`). A plain std lock even under loom: the kick is a
/// notify of each, which the notify protocol's models cover.
static WAITERS: global::Mutex<Vec<(u64, ContextHandle)>> = global::Mutex::new(Vec::new());
/// How many entries `WAITERS` has, so that a kick with no waiter takes no lock (QEMU
/// `num_waiters`).
static NUM_WAITERS: AtomicUsize = AtomicUsize::new(0);
static NEXT_WAITER: AtomicU64 = AtomicU64::new(0);

/// Locks the registry of waiters.
fn waiters() -> global::MutexGuard<'static, Vec<(u64, ContextHandle)>> {
    WAITERS
        .lock()
        .unwrap_or_else(global::PoisonError::into_inner)
}

/// Registration of a waiting context for [`wait_kick`], removed on drop.
struct Waiting(u64);

impl Waiting {
    fn register(ctx: &AioContext) -> Waiting {
        // Relaxed: an id allocator.
        let id = NEXT_WAITER.fetch_add(1, global::Ordering::Relaxed);
        let mut waiters = waiters();
        waiters.push((id, ctx.handle()));
        // SeqCst, as QEMU's barrier between counting a waiter and evaluating the condition:
        // a kicker that changed the condition and then reads 0 here cannot have been missed
        // by a waiter that is about to evaluate it.
        NUM_WAITERS.fetch_add(1, global::Ordering::SeqCst);
        Waiting(id)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut waiters = waiters();
        if let Some(i) = waiters.iter().position(|(id, _)| *id == self.0) {
            waiters.swap_remove(i);
            NUM_WAITERS.fetch_sub(1, global::Ordering::SeqCst);
        }
    }
}

/// Wakes every context that is inside [`AioContext::wait_while`] or [`AioContext::block_on`],
/// so that it evaluates its condition again (QEMU `aio_wait_kick`). Call it from any thread
/// after changing something a waiter's condition reads. Costs one atomic load when nobody
/// waits.
pub fn wait_kick() {
    // SeqCst pairs with the registration's: see `Waiting::register`.
    if NUM_WAITERS.load(global::Ordering::SeqCst) == 0 {
        return;
    }
    let waiters = waiters();
    for (_, ctx) in waiters.iter() {
        ctx.notify();
    }
}

/// Gives other work on the context a turn: the calling task is woken at once and polled again
/// on the next loop iteration (a BH schedule; no system call). In
/// [`AioContext::block_on`] it lets the loop run one iteration (without sleeping).
pub fn yield_now() -> YieldNow {
    YieldNow { yielded: false }
}

/// The future of [`yield_now`].
#[derive(Debug)]
#[must_use = "futures do nothing unless awaited"]
pub struct YieldNow {
    yielded: bool,
}

impl Future for YieldNow {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Why [`reschedule`] could not move the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RescheduleError {
    /// It was not awaited directly by a task (for example inside [`AioContext::block_on`]).
    NotInTask,
    /// The task was spawned with [`AioContext::spawn_local`]: its future is not `Send`.
    NotSend,
    /// The target context no longer exists.
    ContextGone,
}

impl fmt::Display for RescheduleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RescheduleError::NotInTask => "reschedule awaited outside a task",
            RescheduleError::NotSend => "a spawn_local task cannot move to another context",
            RescheduleError::ContextGone => "the target context no longer exists",
        })
    }
}

impl std::error::Error for RescheduleError {}

/// Moves the calling task to `target`'s context: the task resumes there, on that context's
/// thread, and stays there (QEMU `aio_co_reschedule_self`). Completes at once when the task
/// already runs on `target`.
///
/// Only a task spawned with [`AioContext::spawn`] or [`ContextHandle::spawn`] can move. If
/// `target` goes away while the task is on its way, the task is dropped, as with the rest of
/// that context's tasks.
///
/// ```
/// # fn ctx() -> aio_core::AioContext {
/// #     aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new().unwrap())).unwrap()
/// # }
/// use aio_core::task::reschedule;
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::{mpsc, Arc};
///
/// // Another context, on its own thread, polling until told to stop.
/// let (tx, rx) = mpsc::channel();
/// let stop = Arc::new(AtomicBool::new(false));
/// let s = stop.clone();
/// let worker = std::thread::spawn(move || {
///     let ctx = ctx();
///     tx.send(ctx.handle()).unwrap();
///     while !s.load(Ordering::SeqCst) { ctx.poll(); }
/// });
/// let other = rx.recv().unwrap();
///
/// let ctx = ctx();
/// let target = other.clone();
/// let task = ctx.spawn(async move {
///     let here = std::thread::current().id();
///     reschedule(&target).await.unwrap();
///     (here, std::thread::current().id())
/// });
/// let (before, after) = ctx.block_on(task).unwrap();
/// assert_ne!(before, after);
/// stop.store(true, Ordering::SeqCst);
/// other.notify();
/// worker.join().unwrap();
/// ```
pub fn reschedule(target: &ContextHandle) -> Reschedule {
    Reschedule {
        target: Some(target.clone()),
        requested: None,
    }
}

/// The future of [`reschedule`]. Dropped after it returned `Pending` and before the task's
/// poll ended (a `select` took another branch), it withdraws the move.
#[must_use = "futures do nothing unless awaited"]
pub struct Reschedule {
    /// `None` once the move was requested.
    target: Option<ContextHandle>,
    /// The task whose move this future requested, and the request's id, until it completes.
    requested: Option<(HeaderRef, u64)>,
}

impl fmt::Debug for Reschedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reschedule")
            .field("requested", &self.requested.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for Reschedule {
    fn drop(&mut self) {
        if let Some((task, id)) = self.requested.take() {
            // Withdraw this future's move if the task has not made it yet (after the move,
            // `move_to` is empty or holds a later request, which is not ours to withdraw).
            let header = task.header();
            let mut sched = lock(&header.sched);
            if sched.move_to.as_ref().is_some_and(|(m, _)| *m == id) {
                sched.move_to = None;
                header.flags.fetch_and(!MOVING, Ordering::Relaxed);
            }
        }
    }
}

impl Future for Reschedule {
    type Output = Result<(), RescheduleError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(target) = self.target.take() else {
            // Polled again: on the target now (the task moves right after the poll that
            // requested it, and its next poll is there).
            self.requested = None;
            return Poll::Ready(Ok(()));
        };
        let running = RUNNING
            .with(Cell::get)
            .and_then(|index| AioContext::current().and_then(|ctx| ctx.inner.tasks.header(index)));
        let Some(task) = running else {
            return Poll::Ready(Err(RescheduleError::NotInTask));
        };
        let header = task.header();
        if !header.has(SENDABLE) {
            return Poll::Ready(Err(RescheduleError::NotSend));
        }
        // Relaxed: MOVING is this thread's. Another reschedule already asked for a move in
        // this poll (two joined): this one asks on the next poll, from wherever the first one
        // took the task, so that each completes on its own target.
        if header.flags.load(Ordering::Relaxed) & MOVING != 0 {
            self.target = Some(target);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if !target.is_alive() {
            return Poll::Ready(Err(RescheduleError::ContextGone));
        }
        if AioContext::current().is_some_and(|ctx| target.is_handle_of(&ctx)) {
            return Poll::Ready(Ok(()));
        }
        let id = {
            let mut sched = lock(&header.sched);
            let id = sched.next_move;
            sched.next_move += 1;
            sched.move_to = Some((id, target));
            id
        };
        header.flags.fetch_or(MOVING, Ordering::Relaxed);
        self.requested = Some((task, id));
        // Wake our own waker: the task's BH is cancelled by the move and the arrival polls
        // the task anyway, but a combinator with per-branch wakers polls this branch again
        // only if its waker was woken.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
