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
pub use co_sync::{
    CoMutex, CoMutexGuard, CoQueue, CoRwLock, CoRwLockReadGuard, CoRwLockWriteGuard, Lock,
    QueueWait, ReadLock, WriteLock,
};

use crate::bh::{self, BottomHalf};
use crate::context::{AioContext, ContextHandle};
use crate::sync::{AtomicBool, AtomicU32, Mutex, Ordering, lock};
use std::any::Any;
use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::{Pin, pin};
use std::rc::Rc;
// std's `Arc` even under loom: `Waker::from` takes one. The header's lock is a loom `Mutex`.
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// Header flag: the task must be dropped instead of polled ([`JoinHandle::abort`]).
const ABORT: u32 = 1;
/// Header flag: the future is `Send` and may move to another context ([`reschedule`]).
const SENDABLE: u32 = 2;

/// What wakers and join handles share with a task: its flags and the BH that polls it on the
/// context where it lives (none while it moves between contexts, or once it is gone).
pub(crate) struct Header {
    flags: AtomicU32,
    sched: Mutex<Sched>,
}

#[derive(Default)]
struct Sched {
    /// The BH that polls the task on its current context.
    bh: Option<BottomHalf>,
    /// Set by [`reschedule`] while the task is being polled: where it goes when the poll
    /// returns `Pending`.
    move_to: Option<ContextHandle>,
}

impl Header {
    fn new(sendable: bool) -> Arc<Header> {
        Arc::new(Header {
            flags: AtomicU32::new(if sendable { SENDABLE } else { 0 }),
            sched: Mutex::new(Sched::default()),
        })
    }

    fn has(&self, flag: u32) -> bool {
        // Acquire pairs with the Release in `abort`: whoever sees ABORT sees what the aborting
        // thread did before.
        self.flags.load(Ordering::Acquire) & flag != 0
    }

    /// Takes the task's BH out (the task is finishing, moving or being dropped): later
    /// wake-ups do nothing until a new BH is installed.
    fn take_bh(&self) -> Option<BottomHalf> {
        lock(&self.sched).bh.take()
    }
}

impl Wake for Header {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // QEMU aio_co_wake: back onto the context where the task lives. The BH coalesces
        // wake-ups and never polls the task inline, whichever thread this is.
        if let Some(bh) = &lock(&self.sched).bh {
            bh.schedule();
        }
    }
}

/// A task's future, boxed; only `Send` ones can move to another context.
enum TaskFuture {
    Local(Pin<Box<dyn Future<Output = ()>>>),
    Send(Pin<Box<dyn Future<Output = ()> + Send>>),
}

impl TaskFuture {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            TaskFuture::Local(f) => f.as_mut().poll(cx),
            TaskFuture::Send(f) => f.as_mut().poll(cx),
        }
    }
}

/// A task as its context's table holds it.
struct LocalTask {
    header: Arc<Header>,
    /// The task's waker, made once.
    waker: Waker,
    /// The future; `None` once the task is finished or gone.
    future: RefCell<Option<TaskFuture>>,
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
    task: Option<Rc<LocalTask>>,
}

/// The context's tasks (home thread only): a table with generations and a free list.
#[derive(Default)]
pub(crate) struct Tasks {
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
}

impl Tasks {
    fn insert(&self, task: Rc<LocalTask>) -> TaskKey {
        let mut slots = self.slots.borrow_mut();
        let index = match self.free.borrow_mut().pop() {
            Some(i) => i,
            None => {
                slots.push(Slot::default());
                u32::try_from(slots.len() - 1).expect("fewer than 2^32 tasks")
            }
        };
        let slot = &mut slots[index as usize];
        slot.task = Some(task);
        TaskKey {
            index,
            generation: slot.generation,
        }
    }

    fn get(&self, key: TaskKey) -> Option<Rc<LocalTask>> {
        let slots = self.slots.borrow();
        let slot = slots.get(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        slot.task.clone()
    }

    fn remove(&self, key: TaskKey) -> Option<Rc<LocalTask>> {
        let mut slots = self.slots.borrow_mut();
        let slot = slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        let task = slot.task.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.borrow_mut().push(key.index);
        Some(task)
    }

    /// How many tasks the context holds.
    pub(crate) fn len(&self) -> usize {
        self.slots.borrow().len() - self.free.borrow().len()
    }

    /// Drops every task without polling it (the context is going away). A future's `Drop` may
    /// touch the table (abort or wake another task), so no borrow is held while one runs.
    pub(crate) fn drop_all(&self) {
        loop {
            let taken: Vec<Rc<LocalTask>> = {
                let mut slots = self.slots.borrow_mut();
                slots.iter_mut().filter_map(|s| s.task.take()).collect()
            };
            if taken.is_empty() {
                break;
            }
            for task in taken {
                drop(task.header.take_bh());
                let future = task.future.borrow_mut().take();
                drop(future);
            }
        }
        self.slots.borrow_mut().clear();
        self.free.borrow_mut().clear();
    }
}

thread_local! {
    /// The task this thread is polling (innermost), for [`reschedule`]. `block_on` hides it
    /// from the future it polls, which is not that task.
    static RUNNING: RefCell<Option<Arc<Header>>> = const { RefCell::new(None) };
}

/// Makes a task (or no task) the running one, restoring the previous one on drop.
struct RunningGuard(Option<Arc<Header>>);

impl RunningGuard {
    fn enter(header: Option<Arc<Header>>) -> RunningGuard {
        RunningGuard(RUNNING.with(|r| r.replace(header)))
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        let previous = self.0.take();
        RUNNING.with(|r| *r.borrow_mut() = previous);
    }
}

/// Puts `future` in `ctx`'s table with a BH that polls it; returns the key. The BH is installed
/// in the header but not scheduled.
fn install(ctx: &AioContext, header: Arc<Header>, future: TaskFuture) -> TaskKey {
    let task = Rc::new(LocalTask {
        waker: Waker::from(header.clone()),
        header: header.clone(),
        future: RefCell::new(Some(future)),
    });
    let key = ctx.inner.tasks.insert(task);
    let bh = BottomHalf::new(
        ctx.inner.shared.clone(),
        bh::plain_callback(move || {
            if let Some(ctx) = AioContext::current() {
                run(&ctx, key);
            }
        }),
    );
    let old = lock(&header.sched).bh.replace(bh);
    drop(old);
    key
}

/// Polls the task at `key` once, from its BH (or on arrival from another context).
fn run(ctx: &AioContext, key: TaskKey) {
    let Some(task) = ctx.inner.tasks.get(key) else {
        return;
    };
    let Ok(mut slot) = task.future.try_borrow_mut() else {
        // Being polled further up the stack; a BH is never re-entered, so this is only a
        // defence.
        return;
    };
    let Some(future) = slot.as_mut() else {
        return;
    };
    if task.header.has(ABORT) {
        let future = slot.take();
        drop(slot);
        finish(ctx, key, &task);
        drop(future);
        return;
    }
    let poll = {
        let _running = RunningGuard::enter(Some(task.header.clone()));
        future.poll(&mut Context::from_waker(&task.waker))
    };
    match poll {
        Poll::Ready(()) => {
            let future = slot.take();
            drop(slot);
            finish(ctx, key, &task);
            drop(future);
        }
        Poll::Pending => {
            let target = lock(&task.header.sched).move_to.take();
            if let Some(target) = target {
                let future = slot.take();
                drop(slot);
                finish(ctx, key, &task);
                match future {
                    Some(TaskFuture::Send(f)) => {
                        let header = task.header.clone();
                        target.schedule_oneshot(move || arrive(header, f));
                    }
                    // `reschedule` refuses to set a target for a local task.
                    other => drop(other),
                }
            }
        }
    }
}

/// Takes the task out of its context: its slot and its BH.
fn finish(ctx: &AioContext, key: TaskKey, task: &LocalTask) {
    drop(ctx.inner.tasks.remove(key));
    drop(task.header.take_bh());
}

/// A `Send` task arriving on the context this runs on (a [`ContextHandle::spawn`] or a
/// [`reschedule`]): install it and poll it at once.
fn arrive(header: Arc<Header>, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
    // A one-shot BH runs inside its context's poll, which makes the context current.
    let Some(ctx) = AioContext::current() else {
        return;
    };
    let key = install(&ctx, header, TaskFuture::Send(future));
    run(&ctx, key);
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

/// What a task and its [`JoinHandle`] share.
enum JoinState<T> {
    Running {
        waker: Option<Waker>,
        detached: bool,
    },
    Done(Result<T, JoinError>),
    Taken,
}

struct JoinCell<T> {
    state: Mutex<JoinState<T>>,
}

impl<T> JoinCell<T> {
    fn complete(&self, result: Result<T, JoinError>) {
        let mut state = lock(&self.state);
        let JoinState::Running { waker, detached } = &mut *state else {
            return;
        };
        if *detached {
            if let Err(JoinError { panic: Some(p) }) = &result {
                tracing::error!("a detached task panicked: {}", panic_message(p.as_ref()));
            }
            *state = JoinState::Taken;
            return;
        }
        let waker = waker.take();
        *state = JoinState::Done(result);
        drop(state);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Completes the join cell with "cancelled" if the task's future is dropped before it did.
struct CancelOnDrop<T>(Arc<JoinCell<T>>);

impl<T> Drop for CancelOnDrop<T> {
    fn drop(&mut self) {
        self.0.complete(Err(JoinError { panic: None }));
    }
}

/// Wraps a user future as a task body: runs it, catching a panic, and hands the result to the
/// join handle.
fn task_body<F: Future>(future: F, cell: Arc<JoinCell<F::Output>>) -> impl Future<Output = ()> {
    // Made outside the `async` block: a body dropped before its first poll (its context went
    // away) still drops the guard, and so still cancels the join handle.
    let guard = CancelOnDrop(cell);
    async move {
        let guard = guard;
        let mut future = pin!(future);
        let result = std::future::poll_fn(|cx| {
            match catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
                Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
                Ok(Poll::Pending) => Poll::Pending,
                Err(panic) => Poll::Ready(Err(JoinError { panic: Some(panic) })),
            }
        })
        .await;
        guard.0.complete(result);
    }
}

fn new_task<F: Future>(
    future: F,
    sendable: bool,
) -> (Arc<Header>, impl Future<Output = ()>, JoinHandle<F::Output>) {
    let header = Header::new(sendable);
    let cell = Arc::new(JoinCell {
        state: Mutex::new(JoinState::Running {
            waker: None,
            detached: false,
        }),
    });
    let join = JoinHandle {
        header: header.clone(),
        cell: cell.clone(),
    };
    (header, task_body(future, cell), join)
}

/// An owned permission to wait for a task, and to abort it (tokio's `JoinHandle`, QEMU has no
/// equivalent: a coroutine's caller waits on its own flag).
///
/// It is a future: `handle.await` gives `Ok(output)`, or an [`JoinError`] if the task panicked
/// or was cancelled. Dropping it *detaches* the task, which keeps running; a detached task's
/// panic is logged. It is `Send` when the output is.
pub struct JoinHandle<T> {
    header: Arc<Header>,
    cell: Arc<JoinCell<T>>,
}

impl<T> JoinHandle<T> {
    /// Aborts the task: it is dropped, on its context's thread, instead of being polled again
    /// (at once if it is idle, after its current poll if it is running), and this handle then
    /// gives a cancelled [`JoinError`]. Does nothing if the task has finished. Callable from
    /// any thread, and from inside the task itself.
    pub fn abort(&self) {
        // Release pairs with the Acquire in `Header::has`.
        self.header.flags.fetch_or(ABORT, Ordering::Release);
        self.header.wake_by_ref();
    }

    /// Whether the task has finished (returned, panicked or been cancelled).
    pub fn is_finished(&self) -> bool {
        !matches!(*lock(&self.cell.state), JoinState::Running { .. })
    }

    /// Lets the task run on without anyone waiting for it (the same as dropping the handle).
    pub fn detach(self) {}
}

impl<T> Drop for JoinHandle<T> {
    fn drop(&mut self) {
        let mut state = lock(&self.cell.state);
        match &mut *state {
            JoinState::Running { detached, waker } => {
                *detached = true;
                *waker = None;
            }
            JoinState::Done(_) => {
                // Drop the output outside the lock.
                let done = std::mem::replace(&mut *state, JoinState::Taken);
                drop(state);
                drop(done);
            }
            JoinState::Taken => {}
        }
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T, JoinError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = lock(&self.cell.state);
        match &mut *state {
            JoinState::Running { waker, .. } => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            JoinState::Done(_) => match std::mem::replace(&mut *state, JoinState::Taken) {
                JoinState::Done(result) => Poll::Ready(result),
                _ => unreachable!(),
            },
            JoinState::Taken => panic!("JoinHandle polled after it returned its result"),
        }
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
        let (header, body, join) = new_task(future, false);
        self.start(header, TaskFuture::Local(Box::pin(body)));
        join
    }

    /// Runs a `Send` future as a task on this context; unlike a [`spawn_local`](Self::spawn_local)
    /// task, it can move to another context with [`reschedule`].
    pub fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (header, body, join) = new_task(future, true);
        self.start(header, TaskFuture::Send(Box::pin(body)));
        join
    }

    fn start(&self, header: Arc<Header>, future: TaskFuture) {
        install(self, header.clone(), future);
        header.wake_by_ref();
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
            // Acquire pairs with the Release in `BlockOnSignal::wake_by_ref`.
            if signal.woken.swap(false, Ordering::Acquire) {
                let _not_a_task = RunningGuard::enter(None);
                if let Poll::Ready(v) = future.as_mut().poll(&mut cx) {
                    return v;
                }
                continue;
            }
            // A wake-up that lands after the check above notifies the context, so this
            // iteration does not sleep through it (the notify protocol).
            self.poll();
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
        let (header, body, join) = new_task(future, true);
        let body: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(body);
        self.schedule_oneshot(move || arrive(header, body));
        join
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
            self.ctx.notify();
        }
    }
}

/// The contexts inside [`AioContext::wait_while`] or [`AioContext::block_on`], for
/// [`wait_kick`] (QEMU `global_aio_wait`). A plain std lock even under loom: the kick is a
/// notify of each, which the notify protocol's models cover.
static WAITERS: std::sync::Mutex<Vec<(u64, ContextHandle)>> = std::sync::Mutex::new(Vec::new());
/// How many entries `WAITERS` has, so that a kick with no waiter takes no lock (QEMU
/// `num_waiters`).
static NUM_WAITERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static NEXT_WAITER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Registration of a waiting context for [`wait_kick`], removed on drop.
struct Waiting(u64);

impl Waiting {
    fn register(ctx: &AioContext) -> Waiting {
        // Relaxed: an id allocator.
        let id = NEXT_WAITER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut waiters = WAITERS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        waiters.push((id, ctx.handle()));
        // SeqCst, as QEMU's barrier between counting a waiter and evaluating the condition:
        // a kicker that changed the condition and then reads 0 here cannot have been missed
        // by a waiter that is about to evaluate it.
        NUM_WAITERS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Waiting(id)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut waiters = WAITERS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(i) = waiters.iter().position(|(id, _)| *id == self.0) {
            waiters.swap_remove(i);
            NUM_WAITERS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Wakes every context that is inside [`AioContext::wait_while`] or [`AioContext::block_on`],
/// so that it evaluates its condition again (QEMU `aio_wait_kick`). Call it from any thread
/// after changing something a waiter's condition reads. Costs one atomic load when nobody
/// waits.
pub fn wait_kick() {
    // SeqCst pairs with the registration's: see `Waiting::register`.
    if NUM_WAITERS.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        return;
    }
    let waiters = WAITERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (_, ctx) in waiters.iter() {
        ctx.notify();
    }
}

/// Gives other work on the context a turn: the calling task is woken at once and polled again
/// on the next loop iteration (a BH schedule; no system call). Outside a task (in
/// [`AioContext::block_on`]) it lets the loop run one iteration.
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
/// use std::sync::mpsc;
///
/// let (tx, rx) = mpsc::channel();
/// let worker = std::thread::spawn(move || {
///     let ctx = ctx();
///     tx.send(ctx.handle()).unwrap();
///     while ctx.handle().is_alive() && ctx.task_count() == 0 { ctx.poll(); }
///     while ctx.task_count() > 0 { ctx.poll(); }
/// });
/// let other = rx.recv().unwrap();
/// let ctx = ctx();
/// let task = ctx.spawn(async move {
///     let here = std::thread::current().id();
///     reschedule(&other).await.unwrap();
///     (here, std::thread::current().id())
/// });
/// let (before, after) = ctx.block_on(task).unwrap();
/// assert_ne!(before, after);
/// worker.join().unwrap();
/// ```
pub fn reschedule(target: &ContextHandle) -> Reschedule {
    Reschedule {
        target: Some(target.clone()),
    }
}

/// The future of [`reschedule`].
#[derive(Debug)]
#[must_use = "futures do nothing unless awaited"]
pub struct Reschedule {
    /// `None` once the move was requested.
    target: Option<ContextHandle>,
}

impl Future for Reschedule {
    type Output = Result<(), RescheduleError>;

    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(target) = self.target.take() else {
            // Polled again: on the target now.
            return Poll::Ready(Ok(()));
        };
        let Some(header) = RUNNING.with(|r| r.borrow().clone()) else {
            return Poll::Ready(Err(RescheduleError::NotInTask));
        };
        if !header.has(SENDABLE) {
            return Poll::Ready(Err(RescheduleError::NotSend));
        }
        if !target.is_alive() {
            return Poll::Ready(Err(RescheduleError::ContextGone));
        }
        if AioContext::current().is_some_and(|ctx| target.is_handle_of(&ctx)) {
            return Poll::Ready(Ok(()));
        }
        lock(&header.sched).move_to = Some(target);
        Poll::Pending
    }
}
