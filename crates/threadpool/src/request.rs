//! One request: its state machine (Queued → Running → Finished → Completed), the cancellation
//! rules, where its result goes, and the handles users hold ([`Request`], [`Ticket`]).
//!
//! C original: `ThreadPoolElement` and `thread_pool_cancel` in `util/thread-pool.c`.
//!
//! # States
//!
//! ```text
//!   Queued ──start (worker, under the pool lock)──▶ Running ──work returns or panics──▶ Returned
//!     │                                                                                   │
//!     └──cancel (any thread) ──▶ Returned(Err(Cancelled)) ──────────────────────────────▶ │
//!                                                                                         │
//!                  publish: queued for the completion BH, under the pool lock ──▶ Finished
//!                                                                                         │
//!                               completion BH, in the context's thread ──────────▶ Completed
//!
//!   shutdown: Queued → result Err(ShutDown); Finished → result kept; Running → when it finishes.
//!   A future gets that result (Completed); a callback is dropped unrun (Abandoned).
//! ```
//!
//! Every transition happens under the request's own mutex, so each one happens once: a queued
//! request is either started by a worker or cancelled, never both, and only the thread that
//! moved it to Returned hands it to the completion queue, which delivers it once. Leaving
//! Queued happens under the pool lock, by a worker's start or by a cancel (as in QEMU), so the
//! queue holds exactly the Queued requests, a request a worker has popped is already Running,
//! and shutdown never misses it. Returned becomes Finished in the same critical section that
//! queues the request for delivery, so "Finished" always means "the next completion pass
//! delivers it" (Returned is reported as Running).
//!
//! User code (the work, the callback, the waker, and the drop of any of them or of a result)
//! never runs while this mutex or the pool's is held: everything is moved out first. A poll
//! takes the stored waker out, compares, clones or drops it unlocked, and stores the new one in
//! a second critical section that first looks for a completion that came in between.
//!
//! `tests/loom_request.rs` runs this state machine under loom (cancel against a worker's start
//! and run, against the completion, and against a polling future).

use crate::error::Error;
use crate::pool::PoolShared;
use crate::sync::{Arc, Mutex};
use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Where a request is in its life, as [`Request::status`] and [`Ticket::status`] report it.
///
/// # Examples
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use threadpool::{Status, ThreadPool};
///
/// let req = ThreadPool::of(&ctx).submit(|| 6 * 7);
/// assert!(matches!(req.status(), Status::Queued | Status::Running | Status::Finished));
/// while req.status() != Status::Completed {
///     ctx.poll();
/// }
/// assert_eq!(req.try_take(), Some(Ok(42)));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// Waiting for a worker; can still be cancelled.
    Queued,
    /// A worker is running the work; it will run to the end.
    Running,
    /// The work returned (or was cancelled); the completion has not been delivered yet because
    /// the context has not run its completion bottom half since.
    Finished,
    /// The completion was delivered: the callback ran or the future has (or had) its result.
    Completed,
    /// The pool shut down before the completion could be delivered, and nothing was waiting
    /// for it but a callback or nobody: the callback was dropped without running.
    Abandoned,
}

/// Where the result goes once the request completes.
pub(crate) enum Sink<T> {
    /// Kept for the [`Request`] future (or [`Request::try_take`]).
    Future,
    /// Nobody wants it: the `Request` was dropped.
    Detached,
    /// A callback kept on the context's thread in the pool's callback table, at this index.
    Home(usize),
    /// A callback submitted from another thread ([`PoolHandle`](crate::PoolHandle)); it runs
    /// on the context's thread.
    Remote(Box<dyn FnOnce(Result<T, Error>) + Send>),
}

enum Phase<F, T> {
    Queued(F),
    /// The work moves out of the option when the worker calls it.
    Running(Option<F>),
    /// The work returned (or was cancelled); not yet queued for delivery.
    Returned(Result<T, Error>),
    Finished(Result<T, Error>),
    /// Delivered; the result waits here until its consumer takes it.
    Completed(Option<Result<T, Error>>),
    Abandoned,
}

struct ReqInner<F, T> {
    phase: Phase<F, T>,
    sink: Sink<T>,
    waker: Option<Waker>,
}

/// A request: the work and its state, shared by the queue, the worker, the completion queue and
/// the user's handle.
pub(crate) struct Req<F, T> {
    inner: Mutex<ReqInner<F, T>>,
    #[cfg(aio_loom)]
    variant: LoomVariant,
}

/// Loom only: which variant of the request protocol a request runs.
#[cfg(aio_loom)]
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoomVariant {
    /// The real protocol.
    Correct,
    /// `cancel` checks for Queued under the lock, releases it, and cancels under a second
    /// acquisition: a worker can start the request in between.
    CancelCheckThenAct,
    /// `poll_result` stores its waker in the second critical section without looking for a
    /// completion that came after the first.
    PollWithoutRecheck,
}

/// What the completion bottom half must still do after [`Job::complete`].
pub(crate) enum Completion {
    /// Nothing: a future was woken, or nobody wanted the result.
    Quiet,
    /// Run the callback at this index of the pool's callback table.
    Home(usize),
    /// Run the request's own callback ([`Job::call_remote`]).
    Remote,
}

/// A request as the pool sees it, whatever its work and result types.
pub(crate) trait Job: Send + Sync {
    /// Queued → Running, by a worker that has just popped it (pool lock held). False if the
    /// request is not queued (which a request in the queue always is: cancelling one takes it
    /// out of the queue under the pool lock).
    fn start(&self) -> bool;
    /// Runs the work of a started request, catching a panic, and stores the result (Returned).
    fn run(&self);
    /// Queued → Returned(Err(Cancelled)), under the pool lock. Returns the work, which the
    /// caller drops unrun once it holds no lock (it is user code); `None` if not queued.
    fn cancel(&self) -> Option<Box<dyn Send>>;
    /// Returned → Finished, as the request is queued for delivery (pool lock held).
    fn publish(&self);
    /// Finished → Completed, on the context's thread: hands the result to a waiting future, or
    /// says which callback to run.
    fn complete(&self) -> Completion;
    /// Runs the request's `Send` callback with the result (after `complete` said `Remote`).
    fn call_remote(&self);
    /// The pool is shutting down and will never deliver this request: give a future its result
    /// (`Err(ShutDown)` if the work never ran), drop a callback. No-op while the work runs; the
    /// worker calls it again when the work returns.
    fn abandon(&self);
    fn status(&self) -> Status;
}

/// A request whose result type is known: what a [`Request`] needs.
pub(crate) trait Slot<T>: Job {
    fn poll_result(&self, waker: &Waker) -> Poll<Result<T, Error>>;
    fn try_take(&self) -> Option<Result<T, Error>>;
    fn detach(&self);
}

impl<F, T> Req<F, T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    pub(crate) fn new(work: F, sink: Sink<T>) -> Arc<Self> {
        Arc::new(Req {
            inner: Mutex::new(ReqInner {
                phase: Phase::Queued(work),
                sink,
                waker: None,
            }),
            #[cfg(aio_loom)]
            variant: LoomVariant::Correct,
        })
    }

    /// Loom only: a request whose result goes to a future, running `variant`.
    #[cfg(aio_loom)]
    pub(crate) fn new_loom_variant(work: F, variant: LoomVariant) -> Arc<Self> {
        Arc::new(Req {
            inner: Mutex::new(ReqInner {
                phase: Phase::Queued(work),
                sink: Sink::Future,
                waker: None,
            }),
            variant,
        })
    }

    /// Takes the delivered result, for a callback kept on the context's thread.
    pub(crate) fn take_completed(&self) -> Option<Result<T, Error>> {
        match &mut self.inner.lock().phase {
            Phase::Completed(result) => result.take(),
            _ => None,
        }
    }
}

impl<F, T> Job for Req<F, T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    fn start(&self) -> bool {
        let mut g = self.inner.lock();
        match std::mem::replace(&mut g.phase, Phase::Running(None)) {
            Phase::Queued(work) => {
                g.phase = Phase::Running(Some(work));
                true
            }
            other => {
                g.phase = other;
                false
            }
        }
    }

    fn run(&self) {
        let work = match &mut self.inner.lock().phase {
            Phase::Running(work) => work.take(),
            _ => None,
        };
        let Some(work) = work else { return };
        let result = match catch_unwind(AssertUnwindSafe(work)) {
            Ok(value) => Ok(value),
            Err(payload) => {
                let msg = panic_message(&*payload);
                tracing::warn!("threadpool: work panicked: {msg}");
                Err(Error::Panicked(msg))
            }
        };
        self.inner.lock().phase = Phase::Returned(result);
    }

    fn cancel(&self) -> Option<Box<dyn Send>> {
        #[cfg(aio_loom)]
        if self.variant == LoomVariant::CancelCheckThenAct {
            // Deliberately broken (loom only): checks and acts under two critical sections.
            if !matches!(self.inner.lock().phase, Phase::Queued(_)) {
                return None;
            }
            let mut g = self.inner.lock();
            let old = std::mem::replace(&mut g.phase, Phase::Returned(Err(Error::Cancelled)));
            drop(g);
            return Some(Box::new(old));
        }
        let mut g = self.inner.lock();
        match std::mem::replace(&mut g.phase, Phase::Returned(Err(Error::Cancelled))) {
            Phase::Queued(work) => Some(Box::new(work)),
            other => {
                g.phase = other;
                None
            }
        }
    }

    fn publish(&self) {
        let mut g = self.inner.lock();
        match std::mem::replace(&mut g.phase, Phase::Abandoned) {
            Phase::Returned(result) => g.phase = Phase::Finished(result),
            other => g.phase = other,
        }
    }

    fn complete(&self) -> Completion {
        let mut g = self.inner.lock();
        let result = match std::mem::replace(&mut g.phase, Phase::Completed(None)) {
            Phase::Finished(result) => result,
            other => {
                // Not ours to deliver (cannot happen: only Finished requests are queued for
                // completion, once); leave it as it was.
                g.phase = other;
                return Completion::Quiet;
            }
        };
        match &g.sink {
            Sink::Future => {
                g.phase = Phase::Completed(Some(result));
                let waker = g.waker.take();
                drop(g);
                if let Some(waker) = waker {
                    waker.wake();
                }
                Completion::Quiet
            }
            Sink::Detached => {
                drop(g);
                drop(result);
                Completion::Quiet
            }
            Sink::Home(index) => {
                let index = *index;
                g.phase = Phase::Completed(Some(result));
                Completion::Home(index)
            }
            Sink::Remote(_) => {
                g.phase = Phase::Completed(Some(result));
                Completion::Remote
            }
        }
    }

    fn call_remote(&self) {
        let (callback, result) = {
            let mut g = self.inner.lock();
            let Sink::Remote(callback) = std::mem::replace(&mut g.sink, Sink::Detached) else {
                return;
            };
            let result = match &mut g.phase {
                Phase::Completed(result) => result.take(),
                _ => None,
            };
            (callback, result)
        };
        if let Some(result) = result {
            callback(result);
        }
    }

    fn abandon(&self) {
        let mut g = self.inner.lock();
        let (result, work) = match std::mem::replace(&mut g.phase, Phase::Abandoned) {
            Phase::Queued(work) => (Err(Error::ShutDown), Some(work)),
            Phase::Finished(result) => (result, None),
            // Running or Returned: whoever finishes it abandons it once it is published.
            other @ (Phase::Running(_)
            | Phase::Returned(_)
            | Phase::Completed(_)
            | Phase::Abandoned) => {
                g.phase = other;
                return;
            }
        };
        let (waker, callback, dropped) = match std::mem::replace(&mut g.sink, Sink::Detached) {
            Sink::Future => {
                g.sink = Sink::Future;
                g.phase = Phase::Completed(Some(result));
                (g.waker.take(), None, None)
            }
            Sink::Remote(callback) => (None, Some(callback), Some(result)),
            sink @ (Sink::Detached | Sink::Home(_)) => {
                // A home callback lives in the pool's table, which the shutdown clears on the
                // context's thread.
                g.sink = sink;
                (None, None, Some(result))
            }
        };
        drop(g);
        drop(work);
        drop(callback);
        drop(dropped);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn status(&self) -> Status {
        match &self.inner.lock().phase {
            Phase::Queued(_) => Status::Queued,
            Phase::Running(_) | Phase::Returned(_) => Status::Running,
            Phase::Finished(_) => Status::Finished,
            Phase::Completed(_) => Status::Completed,
            Phase::Abandoned => Status::Abandoned,
        }
    }
}

impl<F, T> Slot<T> for Req<F, T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    fn poll_result(&self, waker: &Waker) -> Poll<Result<T, Error>> {
        // Waker clones, comparisons and drops are user code: they happen between two critical
        // sections. The first takes the stored waker out; the second stores the new one unless
        // the request completed in between. A completion that falls between the two finds no
        // waker to wake, so the second must look again: whoever stores a waker under the lock
        // sees Completed under that same lock, or is there before `complete` takes it.
        let old = {
            let mut g = self.inner.lock();
            if let Some(ready) = take_ready(&mut g.phase) {
                drop(g);
                return Poll::Ready(ready);
            }
            g.waker.take()
        };
        let new = match old {
            Some(old) if old.will_wake(waker) => old,
            old => {
                drop(old);
                waker.clone()
            }
        };
        let mut g = self.inner.lock();
        #[cfg(aio_loom)]
        let recheck = self.variant != LoomVariant::PollWithoutRecheck;
        #[cfg(not(aio_loom))]
        let recheck = true;
        if recheck && let Some(ready) = take_ready(&mut g.phase) {
            drop(g);
            drop(new);
            return Poll::Ready(ready);
        }
        // Only a poll stores a waker, and polls take `&mut` of the one `Request`: the slot is
        // still empty, but whatever it held is dropped unlocked all the same.
        let displaced = g.waker.replace(new);
        drop(g);
        drop(displaced);
        Poll::Pending
    }

    fn try_take(&self) -> Option<Result<T, Error>> {
        match &mut self.inner.lock().phase {
            Phase::Completed(result) => result.take(),
            _ => None,
        }
    }

    fn detach(&self) {
        let (result, waker) = {
            let mut g = self.inner.lock();
            if matches!(g.sink, Sink::Future) {
                g.sink = Sink::Detached;
            }
            let result = match &mut g.phase {
                Phase::Completed(result) => result.take(),
                _ => None,
            };
            (result, g.waker.take())
        };
        drop(result);
        drop(waker);
    }
}

/// The result of a completed request, taken for the future that polls it.
///
/// # Panics
///
/// If the result was already taken: the future was polled after it returned `Ready`.
fn take_ready<F, T>(phase: &mut Phase<F, T>) -> Option<Result<T, Error>> {
    match phase {
        Phase::Completed(result) => match result.take() {
            Some(result) => Some(result),
            None => panic!("threadpool::Request polled after it returned its result"),
        },
        _ => None,
    }
}

/// The text of a panic payload (`panic!` gives a `&str` or a `String`).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Cancels `job` if it is still queued, and queues its completion (QEMU `thread_pool_cancel`).
pub(crate) fn cancel(pool: &PoolShared, job: &Arc<dyn Job>) -> bool {
    pool.cancel(job)
}

/// Cancels `job` if it is still queued; otherwise waits until its work is no longer running.
pub(crate) fn cancel_sync(pool: &PoolShared, job: &Arc<dyn Job>) -> bool {
    if cancel(pool, job) {
        return true;
    }
    pool.wait_not_running(&**job);
    false
}

/// A submitted request whose result is wanted: a [`Future`] of `Result<T, Error>`, and the
/// handle that can cancel it (QEMU `thread_pool_submit_co`, and the `BlockAIOCB` of
/// `thread_pool_submit_aio`).
///
/// The result becomes available when the context that owns the pool runs its completion bottom
/// half, so the context must be polled (by whatever thread owns it) for the future to become
/// ready; the future itself only needs a waker, which the completion wakes from the context's
/// thread. [`try_take`](Self::try_take) gets the result without a waker.
///
/// Dropping a `Request` detaches it, like dropping a tokio `JoinHandle`: the work still runs
/// (unless cancelled) and its result is dropped when it completes. Cancel explicitly with
/// [`cancel`](Self::cancel).
///
/// `Request<T>` is `Send` (when `T` is), so a request submitted through a
/// [`PoolHandle`](crate::PoolHandle) can be awaited on another thread.
///
/// # Panics
///
/// Polling the future again after it returned `Ready` panics.
///
/// # Examples
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use std::future::Future;
/// use std::pin::pin;
/// use std::task::{Context, Poll, Waker};
///
/// let pool = threadpool::ThreadPool::of(&ctx);
/// let mut req = pin!(pool.submit(|| "blocking result"));
/// let mut cx = Context::from_waker(Waker::noop());
/// let result = loop {
///     if let Poll::Ready(r) = req.as_mut().poll(&mut cx) { break r; }
///     ctx.poll(); // runs the completion bottom half, which wakes the future
/// };
/// assert_eq!(result, Ok("blocking result"));
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Request<T> {
    slot: Arc<dyn Slot<T>>,
    pool: Arc<PoolShared>,
}

impl<T: Send + 'static> Request<T> {
    pub(crate) fn new(slot: Arc<dyn Slot<T>>, pool: Arc<PoolShared>) -> Self {
        Request { slot, pool }
    }

    /// Cancels the request if it is still queued (QEMU `bdrv_aio_cancel_async`): its work will
    /// never run, and it completes with `Err(Error::Cancelled)` through the normal completion
    /// path (the future resolves on the context's next completion pass). Returns whether it
    /// was cancelled; a request that is running, or done, is not affected and completes
    /// normally.
    pub fn cancel(&self) -> bool {
        cancel(&self.pool, &self.job())
    }

    /// Cancels the request if it is still queued, and otherwise blocks the calling thread until
    /// its work is no longer running. Returns whether it was cancelled (the work never ran);
    /// `false` means the work has finished (or had already).
    ///
    /// Either way the completion itself is delivered as usual, by the context's next
    /// completion pass, not by this call: on the context's thread, poll the context afterwards
    /// to see it. (QEMU's synchronous cancel polled the context itself until the completion
    /// had run; it was removed from QEMU in favour of the asynchronous one.)
    ///
    /// Blocking is the point, so never call it from inside the request's own work (it would
    /// wait for itself), nor on a thread the work is waiting for.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use std::sync::mpsc;
    /// use threadpool::Status;
    ///
    /// let pool = threadpool::ThreadPool::of(&ctx);
    /// let (started, is_started) = mpsc::channel();
    /// let req = pool.submit(move || {
    ///     started.send(()).unwrap();
    ///     std::thread::sleep(std::time::Duration::from_millis(20));
    ///     "done"
    /// });
    /// while is_started.try_recv().is_err() {
    ///     ctx.poll_nonblocking(); // lets the context create the worker
    /// }
    /// assert!(!req.cancel_sync(), "it was running: we waited for it instead");
    /// assert_eq!(req.status(), Status::Finished);
    /// while req.status() != Status::Completed {
    ///     ctx.poll();
    /// }
    /// assert_eq!(req.try_take(), Some(Ok("done")));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn cancel_sync(&self) -> bool {
        cancel_sync(&self.pool, &self.job())
    }

    /// Where the request is now.
    pub fn status(&self) -> Status {
        self.slot.status()
    }

    /// The result, if the completion has been delivered and the result not yet taken (by this
    /// or by the future). For users without an executor.
    pub fn try_take(&self) -> Option<Result<T, Error>> {
        self.slot.try_take()
    }

    /// A cancellation handle for this request that can be kept (or sent) elsewhere while the
    /// request itself is awaited.
    pub fn ticket(&self) -> Ticket {
        Ticket {
            job: self.job(),
            pool: self.pool.clone(),
        }
    }

    fn job(&self) -> Arc<dyn Job> {
        self.slot.clone()
    }
}

impl<T> Future for Request<T> {
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.slot.poll_result(cx.waker())
    }
}

impl<T> Drop for Request<T> {
    fn drop(&mut self) {
        self.slot.detach();
    }
}

impl<T> fmt::Debug for Request<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("status", &self.slot.status())
            .finish_non_exhaustive()
    }
}

/// The handle of a request whose result goes to a callback (QEMU's `BlockAIOCB`): it can cancel
/// the request and report where it is. Dropping it changes nothing. Cheap to clone; `Send`.
///
/// # Examples
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use std::cell::Cell;
/// use std::rc::Rc;
/// use threadpool::{Error, Status, ThreadPool};
///
/// let pool = ThreadPool::of(&ctx);
/// pool.set_limits(0, 1).unwrap();
/// let gate = std::sync::Arc::new(std::sync::Barrier::new(2));
/// let g = gate.clone();
/// let _busy = pool.submit(move || { g.wait(); }); // holds the only worker
/// let seen = Rc::new(Cell::new(None));
/// let s = seen.clone();
/// let ticket = pool.submit_with(|| 1, move |r: Result<i32, Error>| s.set(Some(r)));
/// assert!(ticket.cancel(), "still queued behind the busy worker");
/// while ticket.status() != Status::Completed {
///     ctx.poll();
/// }
/// assert_eq!(seen.take(), Some(Err(Error::Cancelled)));
/// gate.wait();
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
pub struct Ticket {
    job: Arc<dyn Job>,
    pool: Arc<PoolShared>,
}

impl Ticket {
    pub(crate) fn new(job: Arc<dyn Job>, pool: Arc<PoolShared>) -> Self {
        Ticket { job, pool }
    }

    /// Whether this is a request of the pool whose shared state is `pool`.
    pub(crate) fn is_of(&self, pool: &Arc<PoolShared>) -> bool {
        Arc::ptr_eq(&self.pool, pool)
    }

    /// As [`Request::cancel`]: cancels a queued request, whose callback then runs with
    /// `Err(Error::Cancelled)`. Returns whether it was cancelled.
    pub fn cancel(&self) -> bool {
        cancel(&self.pool, &self.job)
    }

    /// As [`Request::cancel_sync`]: cancels a queued request, or waits until the running work
    /// has returned. The callback runs later, on the context's next completion pass.
    pub fn cancel_sync(&self) -> bool {
        cancel_sync(&self.pool, &self.job)
    }

    /// Where the request is now.
    pub fn status(&self) -> Status {
        self.job.status()
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("status", &self.job.status())
            .finish_non_exhaustive()
    }
}
