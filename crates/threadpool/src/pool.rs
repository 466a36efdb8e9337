//! The pool: [`ThreadPool`] (the context's side, `!Send`), [`PoolHandle`] (the `Send + Sync`
//! side for other threads), and the state they share with the workers: the request queue, the
//! completion queue, the thread counts and limits, and the rules that decide when to wake an
//! idle worker or start a new one.
//!
//! C original: `ThreadPool`, `thread_pool_submit_aio`, `spawn_thread`,
//! `thread_pool_update_params` and `thread_pool_free` in `util/thread-pool.c`.
//!
//! # Waking workers
//!
//! QEMU signals its one condition variable on every submission, and starts a thread whenever
//! none is idle (up to `max`). Signalling on every submission wakes a sleeping thread per
//! request in a burst, each a futex system call on the submitter's path, and (on a small
//! machine) more runnable threads than CPUs. Here an idle worker is woken only when no other
//! woken worker is still on its way to the queue (`searching == 0`); a worker that takes a
//! request and sees more queued wakes the next one. A burst thus costs the submitter at most
//! one wake, and the workers fan out one after the other (tokio's blocking pool and its
//! "searching" workers use the same idea). New threads are still started as in QEMU: when no
//! worker is idle and more requests are queued than workers on their way, up to `max`.
//!
//! Idle workers wait on their own condition variable, last-idle-first-woken, so the workers
//! that keep being needed stay warm and the others stay idle long enough to time out (above
//! `min`, after the idle timeout, 10 s by default as in QEMU).
//!
//! Before it sleeps, a worker that ran out of requests watches the queue for a short while
//! (50 µs by default; at most one worker at a time, calling `sched_yield` in the loop so that
//! it never keeps a runnable thread off its CPU), counted as on its way meanwhile. A
//! submitter that sends one request at a time, each after the previous completion, then never
//! pays for waking a sleeping thread, which on a virtual machine costs tens of microseconds
//! (QEMU does not do this; rayon's and Go's schedulers do).

use crate::completion::{CompletionBhs, Home, Registry};
use crate::error::{Error, LimitsError};
use crate::request::{Job, Req, Request, Sink, Status, Ticket};
use crate::sync::{
    Arc, AtomicU64, AtomicUsize, Condvar, IdCounter, MutexGuard, Ordering, PoolMutex,
};
use crate::worker::{self, Parker};
use aio_core::{AioContext, BottomHalf};
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::rc::Rc;
use std::time::Duration;

/// Default maximum number of worker threads per pool (QEMU `THREAD_POOL_MAX_THREADS_DEFAULT`).
pub const DEFAULT_MAX_THREADS: usize = 64;

/// Default time an idle worker above the minimum waits for work before it exits (QEMU: 10 s).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default time a worker that ran out of requests keeps watching the queue before it sleeps
/// (see [`ThreadPool::set_idle_spin`]).
pub const DEFAULT_IDLE_SPIN: Duration = Duration::from_micros(50);

/// The longest a worker's watch grows to (see [`ThreadPool::set_idle_spin`]).
pub const MAX_IDLE_SPIN: Duration = Duration::from_millis(1);

/// Source of pool identities, by which a completion bottom half finds its pool.
static NEXT_POOL_ID: IdCounter = IdCounter::new(1);

/// What the context's side, the handles and the workers share.
pub(crate) struct PoolShared {
    pub(crate) state: PoolMutex<State>,
    /// Signalled when a worker finishes a request while someone waits in `cancel_sync`.
    finished: Condvar,
    pub(crate) id: u64,
    /// Statistics only (Relaxed): threads created and exited so far.
    pub(crate) created: AtomicU64,
    pub(crate) exited: AtomicU64,
    /// The queue's length as of the last change, for the spinning worker, which watches it
    /// without the lock (Relaxed: only a hint; the queue itself is read under the lock).
    pub(crate) queued: AtomicUsize,
}

/// Everything behind the pool lock.
pub(crate) struct State {
    /// Submitted requests, oldest first, all of them Queued: a worker pops one and starts it,
    /// and a cancel takes one out, both under this lock.
    pub(crate) queue: VecDeque<Arc<dyn Job>>,
    /// Finished requests waiting for the completion bottom half, in finishing order.
    pub(crate) done: VecDeque<Arc<dyn Job>>,
    /// Set once, by the shutdown: nothing is queued, started or delivered after it.
    pub(crate) closed: bool,
    /// Workers that exist or are being created (QEMU `cur_threads`).
    pub(crate) cur: usize,
    /// Idle workers, most recently idle last.
    pub(crate) idle: Vec<Arc<Parker>>,
    /// Workers that will look at the queue without needing a wake: woken from idle and not
    /// there yet, or between two requests (scheduling a completion BH outside the lock).
    pub(crate) searching: usize,
    /// Threads still to create (QEMU `new_threads`), and created but not yet running
    /// (`pending_threads`). Creation is chained: the context's spawn BH creates one, and each
    /// new thread creates the next before it looks for work.
    pub(crate) new_threads: usize,
    pub(crate) pending_threads: usize,
    pub(crate) min: usize,
    pub(crate) max: usize,
    pub(crate) idle_timeout: Duration,
    /// How long a worker that ran out of requests watches the queue before it sleeps, at
    /// least (the setting; zero: never).
    pub(crate) idle_spin: Duration,
    /// How long it watches now: from `idle_spin` up to [`MAX_IDLE_SPIN`], doubled each time a
    /// worker that watched and then slept was wanted again soon, halved each time one slept
    /// long (`worker.rs`).
    pub(crate) spin_now: Duration,
    /// A worker is watching the queue (at most one does).
    pub(crate) spinning: bool,
    /// Threads blocked in `cancel_sync`; workers signal `finished` only when there are some.
    sync_waiters: usize,
    /// Creates threads on the context's thread (QEMU `new_thread_bh`). `None` once closed.
    spawn_bh: Option<Arc<BottomHalf>>,
    /// The completion bottom halves and which of them to schedule.
    pub(crate) completion: CompletionBhs,
}

/// What to do once the pool lock is released: wake a worker, or ask the context for a thread.
#[must_use]
pub(crate) enum Kick {
    None,
    Wake(Arc<Parker>),
    Spawn(Arc<BottomHalf>),
}

impl Kick {
    pub(crate) fn perform(self) {
        match self {
            Kick::None => {}
            Kick::Wake(parker) => parker.wake(),
            Kick::Spawn(bh) => bh.schedule(),
        }
    }
}

impl State {
    /// Decides how the queue gets served after a request was queued, or taken while more
    /// remain (see the module docs).
    pub(crate) fn kick(&mut self) -> Kick {
        if self.closed || self.queue.is_empty() {
            return Kick::None;
        }
        if !self.idle.is_empty() {
            if self.searching == 0
                && let Some(parker) = self.wake_idle()
            {
                return Kick::Wake(parker);
            }
            return Kick::None;
        }
        if self.needs_thread() {
            return match self.request_spawn() {
                Some(bh) => Kick::Spawn(bh),
                None => Kick::None,
            };
        }
        Kick::None
    }

    /// Whether a new thread should be started for the queue: none is idle, more requests wait
    /// than workers are on their way, and the maximum allows it.
    fn needs_thread(&self) -> bool {
        let coming = self.searching + self.new_threads + self.pending_threads;
        !self.closed && self.idle.is_empty() && self.cur < self.max && self.queue.len() > coming
    }

    /// Marks the most recently idle worker woken; the caller notifies it after unlocking.
    pub(crate) fn wake_idle(&mut self) -> Option<Arc<Parker>> {
        let parker = self.idle.pop()?;
        parker.set_woken();
        self.searching += 1;
        Some(parker)
    }

    /// Counts one more thread to create (QEMU `spawn_thread`). If no thread is being created,
    /// returns the context's spawn BH, which the caller schedules to start the chain.
    fn request_spawn(&mut self) -> Option<Arc<BottomHalf>> {
        self.cur += 1;
        self.new_threads += 1;
        if self.pending_threads == 0 {
            self.spawn_bh.clone()
        } else {
            None
        }
    }

    /// Takes one thread to create off the backlog (QEMU `do_spawn_thread`); the caller creates
    /// it after unlocking.
    pub(crate) fn take_spawn(&mut self) -> bool {
        if self.new_threads == 0 || self.closed {
            return false;
        }
        self.new_threads -= 1;
        self.pending_threads += 1;
        true
    }

    /// Pops the oldest request and starts it.
    pub(crate) fn pop_started(&mut self) -> Option<Arc<dyn Job>> {
        while let Some(job) = self.queue.pop_front() {
            if job.start() {
                return Some(job);
            }
            debug_assert!(false, "a request in the queue is Queued");
        }
        None
    }

    /// Takes a cancelled request out of the queue, and withdraws a thread still to be created
    /// if the requests left no longer need it (it was asked for the cancelled one), unless it
    /// is one of the minimum. A thread already being created is not stopped.
    fn unqueue(&mut self, job: &Arc<dyn Job>) {
        // A search, from the newest end: cancels are rare, and usually of recent requests.
        if let Some(at) = self.queue.iter().rposition(|q| Arc::ptr_eq(q, job)) {
            self.queue.remove(at);
        }
        let coming = self.searching + self.new_threads + self.pending_threads;
        if self.new_threads > 0 && self.cur > self.min && self.queue.len() < coming {
            self.new_threads -= 1;
            self.cur -= 1;
        }
    }

    /// Queues a finished request for delivery. Returns the bottom half to schedule if the queue
    /// was empty: a non-empty queue already has one scheduled, so a batch of completions costs
    /// one schedule and at most one wake of the loop.
    pub(crate) fn push_done(&mut self, job: Arc<dyn Job>) -> Option<Arc<BottomHalf>> {
        let was_empty = self.done.is_empty();
        self.done.push_back(job);
        if was_empty {
            self.completion.target()
        } else {
            None
        }
    }

    /// Whether this worker should leave: the pool is closing or has too many threads.
    pub(crate) fn must_exit(&self) -> bool {
        self.closed || self.cur > self.max
    }
}

impl PoolShared {
    /// Queues a request. Gives it back if the pool is closed.
    pub(crate) fn enqueue(&self, job: Arc<dyn Job>) -> Result<(), Arc<dyn Job>> {
        let kick = {
            let mut st = self.state.lock();
            if st.closed {
                return Err(job);
            }
            st.queue.push_back(job);
            self.queued.store(st.queue.len(), Ordering::Relaxed);
            st.kick()
        };
        kick.perform();
        Ok(())
    }

    /// Cancels `job` if it is still queued (QEMU `thread_pool_cancel`): it leaves the queue at
    /// once, and its completion (`Err(Cancelled)`) is queued for delivery. Returns whether it
    /// was cancelled.
    ///
    /// The transition happens under the pool lock, as a worker's start does, so a request is
    /// in the queue exactly while it is Queued.
    pub(crate) fn cancel(&self, job: &Arc<dyn Job>) -> bool {
        let (work, bh) = {
            let mut st = self.state.lock();
            let Some(work) = job.cancel() else {
                return false;
            };
            st.unqueue(job);
            self.queued.store(st.queue.len(), Ordering::Relaxed);
            let bh = self.finish_locked(&mut st, job.clone());
            (work, bh)
        };
        // The work is user code: dropped unrun, with no lock held.
        drop(work);
        if let Some(bh) = bh {
            bh.schedule();
        }
        true
    }

    /// Hands a finished request to the completion queue (from a worker, or from `cancel`), or,
    /// once the pool is closed, straight to [`Job::abandon`]. Called with the pool lock held;
    /// the caller schedules the returned BH after unlocking. Also wakes `cancel_sync` waiters,
    /// whose request may be this one.
    pub(crate) fn finish_locked(
        &self,
        st: &mut MutexGuard<'_, State>,
        job: Arc<dyn Job>,
    ) -> Option<Arc<BottomHalf>> {
        job.publish();
        if st.sync_waiters > 0 {
            self.finished.notify_all();
        }
        if st.closed {
            // Abandoning runs user drops and wakers: not under the lock.
            MutexGuard::unlocked(st, || job.abandon());
            return None;
        }
        st.push_done(job)
    }

    /// Blocks until `job` is not running (for `cancel_sync`).
    pub(crate) fn wait_not_running(&self, job: &dyn Job) {
        let mut st = self.state.lock();
        st.sync_waiters += 1;
        // The worker stores the result before it takes the pool lock to signal us, and we
        // check under that lock, so the signal cannot fall between our check and our wait.
        while job.status() == Status::Running {
            self.finished.wait(&mut st);
        }
        st.sync_waiters -= 1;
    }

    /// Creates one thread of the backlog, from the context's spawn BH.
    fn spawn_from_bh(self: &Arc<Self>) {
        let go = self.state.lock().take_spawn();
        if go {
            worker::spawn(self);
        }
    }

    fn set_limits(&self, min: usize, max: usize) -> Result<(), LimitsError> {
        if min > max || max == 0 {
            return Err(LimitsError { min, max });
        }
        let mut wake = Vec::new();
        let mut spawn = None;
        {
            let mut st = self.state.lock();
            st.min = min;
            st.max = max;
            // Up to the new minimum, then (if the maximum grew) for requests that waited for a
            // thread, then a wake if idle workers can serve the queue.
            while !st.closed && st.cur < st.min {
                spawn = st.request_spawn().or(spawn);
            }
            while st.needs_thread() {
                spawn = st.request_spawn().or(spawn);
            }
            match st.kick() {
                Kick::Wake(parker) => wake.push(parker),
                Kick::Spawn(bh) => spawn = Some(bh),
                Kick::None => {}
            }
            // Above the new maximum: wake idle workers so that they see it and exit; busy ones
            // exit after their request.
            let surplus = st.cur.saturating_sub(st.max);
            for _ in 0..surplus {
                match st.wake_idle() {
                    Some(parker) => wake.push(parker),
                    None => break,
                }
            }
        }
        for parker in wake {
            parker.wake();
        }
        if let Some(bh) = spawn {
            bh.schedule();
        }
        Ok(())
    }

    /// Creates threads now, on the calling thread, until at least `n` exist, after raising
    /// the minimum to `n`; also creates at once the threads that requests asked for and that
    /// still wait for the context's spawn BH. Returns how many it created.
    fn prestart(self: &Arc<Self>, n: usize) -> io::Result<usize> {
        let mut created = 0;
        loop {
            {
                let mut st = self.state.lock();
                if st.closed {
                    return Err(io::Error::new(io::ErrorKind::BrokenPipe, Error::ShutDown));
                }
                if n > st.max {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        LimitsError {
                            min: n,
                            max: st.max,
                        },
                    ));
                }
                st.min = st.min.max(n);
                // The backlog first (threads counted in `cur` that only the spawn BH or the
                // creation chain would create), then new ones up to `n`.
                if !st.take_spawn() {
                    if st.cur >= n {
                        return Ok(created);
                    }
                    st.cur += 1;
                    st.pending_threads += 1;
                }
            }
            if let Err(e) = worker::start(self) {
                let mut st = self.state.lock();
                st.pending_threads -= 1;
                st.cur -= 1;
                drop(st);
                tracing::warn!("threadpool: cannot create a worker thread: {e}");
                return Err(e);
            }
            created += 1;
        }
    }

    fn limits(&self) -> (usize, usize) {
        let st = self.state.lock();
        (st.min, st.max)
    }

    fn set_idle_timeout(&self, timeout: Duration) {
        let idle = {
            let mut st = self.state.lock();
            st.idle_timeout = timeout;
            // Idle workers wait with the old timeout; wake them to start over with the new one.
            let mut idle = Vec::new();
            while let Some(parker) = st.wake_idle() {
                idle.push(parker);
            }
            idle
        };
        for parker in idle {
            parker.wake();
        }
    }

    fn stats(&self) -> PoolStats {
        let st = self.state.lock();
        PoolStats {
            threads: st.cur,
            idle: st.idle.len(),
            queued: st.queue.len(),
            threads_created: self.created.load(Ordering::Relaxed),
            threads_exited: self.exited.load(Ordering::Relaxed),
        }
    }

    fn is_closed(&self) -> bool {
        self.state.lock().closed
    }

    /// Closes the pool: nothing new is queued or started; queued requests and finished ones
    /// not yet delivered are abandoned (see [`Job::abandon`]); idle workers are told to exit
    /// and busy ones exit after their request. Returns the requests still waiting for delivery
    /// so that the caller abandons them too. Never waits for a worker.
    fn close(&self) -> Vec<Arc<dyn Job>> {
        let (queued, done, idle, bhs, spawn_bh) = {
            let mut st = self.state.lock();
            if st.closed {
                return Vec::new();
            }
            st.closed = true;
            // Threads not yet created never will be.
            st.cur -= st.new_threads;
            st.new_threads = 0;
            let mut idle = Vec::new();
            while let Some(parker) = st.wake_idle() {
                idle.push(parker);
            }
            (
                std::mem::take(&mut st.queue),
                std::mem::take(&mut st.done),
                idle,
                st.completion.take(),
                st.spawn_bh.take(),
            )
        };
        for parker in idle {
            parker.wake();
        }
        drop(bhs);
        drop(spawn_bh);
        let n = queued.len() + done.len();
        if n > 0 {
            tracing::debug!("threadpool: shutting down with {n} requests queued or undelivered");
        }
        queued.into_iter().chain(done).collect()
    }
}

impl fmt::Debug for PoolShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolShared")
            .field("id", &self.id)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Counters and gauges of a pool, for tests, benchmarks and monitoring.
///
/// # Examples
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// let pool = threadpool::ThreadPool::of(&ctx);
/// let req = pool.submit(|| ());
/// while req.try_take().is_none() {
///     ctx.poll();
/// }
/// let stats = pool.stats();
/// assert!(stats.threads_created >= 1, "the first request needed a thread");
/// assert_eq!(stats.queued, 0);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct PoolStats {
    /// Worker threads that exist or are being created.
    pub threads: usize,
    /// Of those, how many wait for work.
    pub idle: usize,
    /// Requests waiting for a worker (a cancelled request leaves the queue at once).
    pub queued: usize,
    /// Threads created since the pool was made.
    pub threads_created: u64,
    /// Threads that have exited (idle timeout, lower maximum, shutdown).
    pub threads_exited: u64,
}

/// A pool of worker threads bound to an [`AioContext`] (QEMU `ThreadPool`): runs blocking work
/// on its workers and delivers each completion on the context's thread, through a bottom half.
///
/// Each context has one, created on first use by [`ThreadPool::of`] (QEMU
/// `aio_get_thread_pool`); [`ThreadPool::new`] makes a private one. It starts with no thread
/// and at most 64 ([`set_limits`](Self::set_limits)); threads are created when requests need
/// them, from the context's thread (QEMU does so for CPU affinity; it also keeps thread
/// creation off the submitter's path), and idle ones above the minimum exit after 10 s.
///
/// The `ThreadPool` itself lives on the context's thread (it is `!Send`); other threads submit
/// through a [`PoolHandle`].
///
/// # Shutdown
///
/// The pool shuts down when it is dropped; the context's pool ([`of`](Self::of)) is dropped
/// with the context, and any private pool shuts down when its context is dropped, even if
/// something still holds it. Shutting down never waits for a worker. Then, per request:
///
/// * queued (never started): its work is dropped without running. A future resolves to
///   `Err(Error::ShutDown)`;
/// * running: it runs to the end on its worker, which then exits. A future resolves to its
///   result, woken from the worker thread, as there is no context to deliver it any more;
/// * finished but not yet delivered: a future resolves to its result;
/// * in all three cases a completion callback is dropped without running (there is no
///   context thread left to run it on) and the request's status becomes
///   [`Status::Abandoned`].
///
/// Nothing runs on the context afterwards, and nothing is leaked: each work closure, result
/// and callback is dropped exactly once.
///
/// # Examples
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use std::cell::Cell;
/// use std::rc::Rc;
/// use threadpool::ThreadPool;
///
/// let pool = ThreadPool::of(&ctx);
/// let sum = Rc::new(Cell::new(0));
/// for i in 1..=10u64 {
///     let s = sum.clone();
///     // The work runs on a worker; the callback on this thread, when the context polls.
///     pool.submit_with(move || i * i, move |r| s.set(s.get() + r.unwrap()));
/// }
/// assert_eq!(sum.get(), 0, "completions run only when the context polls");
/// while sum.get() < 385 {
///     ctx.poll();
/// }
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct ThreadPool {
    shared: Arc<PoolShared>,
    pub(crate) home: Home,
}

/// The context-local slot of the context's default pool.
struct DefaultPool(Rc<ThreadPool>);

impl ThreadPool {
    /// The context's pool, created on first use (QEMU `aio_get_thread_pool`). It lives as long
    /// as the context.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use std::rc::Rc;
    /// use threadpool::ThreadPool;
    /// assert!(Rc::ptr_eq(&ThreadPool::of(&ctx), &ThreadPool::of(&ctx)));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn of(ctx: &AioContext) -> Rc<ThreadPool> {
        ctx.local(|ctx| DefaultPool(ThreadPool::new(ctx))).0.clone()
    }

    /// The context's pool if [`of`](Self::of) has made it, without making it.
    pub fn existing(ctx: &AioContext) -> Option<Rc<ThreadPool>> {
        ctx.try_local::<DefaultPool>().map(|p| p.0.clone())
    }

    /// Whether `ticket` is a request of this pool.
    pub fn owns(&self, ticket: &crate::Ticket) -> bool {
        ticket.is_of(&self.shared)
    }

    /// A private pool on `ctx`, with its own threads and limits, separate from the context's
    /// pool. It shuts down when the last `Rc` is dropped or when the context is, whichever
    /// comes first.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use threadpool::ThreadPool;
    /// let io = ThreadPool::new(&ctx);
    /// io.set_limits(1, 4).unwrap();
    /// assert_eq!(ThreadPool::of(&ctx).limits(), (0, 64), "the context's pool is another one");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn new(ctx: &AioContext) -> Rc<ThreadPool> {
        let id = NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed);
        let completion = CompletionBhs::new(&ctx.handle(), id);
        let shared = Arc::new(PoolShared {
            state: PoolMutex::new(State {
                queue: VecDeque::new(),
                done: VecDeque::new(),
                closed: false,
                cur: 0,
                idle: Vec::new(),
                searching: 0,
                new_threads: 0,
                pending_threads: 0,
                min: 0,
                max: DEFAULT_MAX_THREADS,
                idle_timeout: DEFAULT_IDLE_TIMEOUT,
                idle_spin: DEFAULT_IDLE_SPIN,
                spin_now: DEFAULT_IDLE_SPIN,
                spinning: false,
                sync_waiters: 0,
                spawn_bh: None,
                completion,
            }),
            finished: Condvar::new(),
            id,
            created: AtomicU64::new(0),
            exited: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
        });
        // A weak reference: the BH belongs to the shared state, which must not keep itself
        // alive through it.
        let weak = Arc::downgrade(&shared);
        // In every isolation scope: a request submitted inside one needs its thread there.
        let spawn_bh = ctx.bh_any_scope(move |_| {
            if let Some(shared) = weak.upgrade() {
                shared.spawn_from_bh();
            }
        });
        shared.state.lock().spawn_bh = Some(Arc::new(spawn_bh));
        let pool = Rc::new(ThreadPool {
            shared,
            home: Home::new(ctx.scope_view()),
        });
        Registry::of(ctx).register(id, &pool);
        // When an isolation scope ends, deliver the completions it held (the seed's
        // `async_context_pop` schedules a BH for its queued AIO completions).
        let weak = Rc::downgrade(&pool);
        ctx.on_scope_exit(move || {
            let Some(pool) = weak.upgrade() else {
                return false;
            };
            if pool.home.held_ready() {
                let bh = pool.shared.state.lock().completion.target();
                if let Some(bh) = bh {
                    bh.schedule();
                }
            }
            true
        });
        pool
    }

    /// Submits `work` to run on a worker thread and returns its [`Request`], a future of the
    /// result (QEMU `thread_pool_submit_co`). Never blocks: a thread the request needs is
    /// created from the context's thread on its next iteration.
    ///
    /// Dropping the `Request` detaches it: the work still runs, and its result is dropped
    /// (QEMU `thread_pool_submit`, a submission without completion).
    ///
    /// # Nothing runs until the context polls
    ///
    /// A fresh pool has no thread, and threads are created by the context's loop: `work`
    /// submitted to it does not start until the context has polled once (QEMU creates its
    /// threads from a bottom half too). Code that submits and then blocks the context's thread
    /// (on a channel the work sends to, a lock it releases) waits forever. Call
    /// [`prestart`](Self::prestart) first: with idle workers, a submission wakes one directly
    /// and the work runs whether or not the loop turns. The *completion* (this `Request`
    /// becoming ready, a [`submit_with`](Self::submit_with) callback) is always delivered by
    /// the loop.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use std::sync::mpsc;
    /// use std::time::Duration;
    ///
    /// let pool = threadpool::ThreadPool::of(&ctx);
    /// let (tx, rx) = mpsc::channel();
    /// let t = tx.clone();
    /// let _req = pool.submit(move || t.send("ran").unwrap());
    /// // No worker yet, and the loop is not turning: the work has not started.
    /// assert!(rx.recv_timeout(Duration::from_millis(20)).is_err());
    /// ctx.poll_nonblocking(); // the loop creates the worker
    /// assert_eq!(rx.recv(), Ok("ran"));
    ///
    /// // With a worker started up front, blocking right after a submit is fine.
    /// let pool = threadpool::ThreadPool::new(&ctx);
    /// pool.prestart(1)?;
    /// let _req = pool.submit(move || tx.send("ran at once").unwrap());
    /// assert_eq!(rx.recv(), Ok("ran at once"));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// let req = threadpool::ThreadPool::of(&ctx).submit(|| std::fs::metadata("/").is_ok());
    /// let ok = loop {
    ///     ctx.poll();
    ///     if let Some(r) = req.try_take() { break r; }
    /// };
    /// assert_eq!(ok, Ok(true));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn submit<T, F>(&self, work: F) -> Request<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let req = Req::new(work, Sink::Future);
        if let Err(job) = self.shared.enqueue(req.clone()) {
            job.abandon();
        }
        Request::new(req, self.shared.clone())
    }

    /// Submits `work` with a completion callback (QEMU `thread_pool_submit_aio`). The callback
    /// runs on the context's thread, in a bottom half, with the work's result; never before the
    /// context polls, and exactly once: with `Ok(value)`, `Err(Error::Cancelled)` if the
    /// request was cancelled while queued, or `Err(Error::Panicked(_))`. (If the pool shuts
    /// down first, it is dropped without running; see [Shutdown](Self#shutdown).)
    ///
    /// Callbacks run one at a time; one may poll the context (a nested loop) and wait there
    /// for another request's completion.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use std::cell::Cell;
    /// use std::rc::Rc;
    ///
    /// let done = Rc::new(Cell::new(false));
    /// let d = done.clone();
    /// threadpool::ThreadPool::of(&ctx).submit_with(|| 2 + 2, move |r| {
    ///     assert_eq!(r, Ok(4));
    ///     d.set(true);
    /// });
    /// while !done.get() {
    ///     ctx.poll();
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn submit_with<T, F, C>(&self, work: F, done: C) -> Ticket
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
        C: FnOnce(Result<T, Error>) + 'static,
    {
        let index = self.home.reserve_callback();
        let req = Req::new(work, Sink::Home(index));
        let r = req.clone();
        self.home.set_callback(
            index,
            Box::new(move || {
                if let Some(result) = r.take_completed() {
                    done(result);
                }
            }),
        );
        if let Err(job) = self.shared.enqueue(req.clone()) {
            job.abandon();
            drop(self.home.take_callback(index));
        }
        Ticket::new(req, self.shared.clone())
    }

    /// A `Send + Sync` handle for submitting from other threads and for configuring the pool.
    pub fn handle(&self) -> PoolHandle {
        PoolHandle {
            shared: self.shared.clone(),
        }
    }

    /// Sets the minimum and maximum number of worker threads (QEMU
    /// `aio_context_set_thread_pool_params`), effective at once: threads are created up to the
    /// new minimum, and threads above the new maximum exit (idle ones now, busy ones after
    /// their request). Requires `min <= max` and `max > 0`; defaults are 0 and 64.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// let pool = threadpool::ThreadPool::of(&ctx);
    /// pool.set_limits(2, 8).unwrap(); // keep two threads warm, never more than eight
    /// while pool.stats().idle < 2 {
    ///     ctx.poll_nonblocking(); // the context's thread starts creating them
    ///     std::thread::yield_now();
    /// }
    /// assert_eq!(pool.stats().threads, 2);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn set_limits(&self, min: usize, max: usize) -> Result<(), LimitsError> {
        self.shared.set_limits(min, max)
    }

    /// Starts `n` worker threads now, on the calling thread, instead of from the context's
    /// loop, and keeps them: the minimum becomes at least `n` (see
    /// [`set_limits`](Self::set_limits)), so they do not time out when idle. Threads that
    /// requests already asked for and that wait for the loop are created now too. Returns how
    /// many threads it created (0 if `n` already existed).
    ///
    /// Afterwards work submitted from any thread starts at once on an idle worker, without
    /// the loop (see [`submit`](Self::submit)); its completion is still delivered by the loop.
    /// QEMU has no equivalent: its pool creates every thread from the loop.
    ///
    /// # Errors
    ///
    /// `InvalidInput` (with a [`LimitsError`]) if `n` is above the maximum; `BrokenPipe` (with
    /// [`Error::ShutDown`]) if the pool has shut down; the OS's error if a thread cannot be
    /// created (the threads created before it stay, and the minimum stays raised).
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// let pool = threadpool::ThreadPool::of(&ctx);
    /// assert_eq!(pool.prestart(2)?, 2);
    /// assert_eq!(pool.stats().threads, 2);
    /// assert_eq!(pool.limits(), (2, 64));
    /// assert_eq!(pool.prestart(1)?, 0, "already there");
    /// assert!(pool.prestart(65).is_err());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn prestart(&self, n: usize) -> io::Result<usize> {
        self.shared.prestart(n)
    }

    /// The current `(min, max)` thread limits.
    pub fn limits(&self) -> (usize, usize) {
        self.shared.limits()
    }

    /// Sets how long an idle worker above the minimum waits for work before exiting (default
    /// 10 s, as in QEMU). Applies to idle workers at once.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use std::time::Duration;
    /// let pool = threadpool::ThreadPool::of(&ctx);
    /// pool.set_idle_timeout(Duration::from_millis(10));
    /// let req = pool.submit(|| ());
    /// while req.try_take().is_none() {
    ///     ctx.poll();
    /// }
    /// while pool.stats().threads > 0 {
    ///     std::thread::sleep(Duration::from_millis(1)); // the idle worker times out and exits
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn set_idle_timeout(&self, timeout: Duration) {
        self.shared.set_idle_timeout(timeout);
    }

    /// Sets how long a worker that ran out of requests keeps watching the queue before it
    /// sleeps (default 50 µs; zero disables it). At most one worker spins at a time. Spinning
    /// saves a thread wake-up (tens of microseconds on a virtual machine) when requests come
    /// one after the other, at the price of that much CPU time each time the queue empties.
    ///
    /// The watch adapts, between `spin` and [`MAX_IDLE_SPIN`] (or `spin`, if longer): it
    /// doubles each time a worker that watched and then slept is wanted again within four
    /// watches' time, and halves each time one sleeps longer than `MAX_IDLE_SPIN`. Requests
    /// that come one at a time a little further apart than the watch would otherwise make the
    /// worker sleep after each, and each then pays the wake-up, which pushes the next one
    /// further still: `qemu-img bench` at queue depth 1 through an NBD server ran either at
    /// 0.55–0.76 s or at 1.2–1.6 s for 30 000 reads, from run to run, with a fixed 50 µs, and at
    /// 0.54–0.63 s in every run with the adaptive watch (BENCHMARKS.md).
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// // Never burn CPU waiting for work (QEMU's behaviour).
    /// threadpool::ThreadPool::of(&ctx).set_idle_spin(std::time::Duration::ZERO);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn set_idle_spin(&self, spin: Duration) {
        let mut st = self.shared.state.lock();
        st.idle_spin = spin;
        st.spin_now = spin;
    }

    /// Thread counts and queue length.
    pub fn stats(&self) -> PoolStats {
        self.shared.stats()
    }

    pub(crate) fn shared(&self) -> &Arc<PoolShared> {
        &self.shared
    }

    /// Closes the pool (see [Shutdown](Self#shutdown)). Runs on the context's thread, from
    /// `Drop` or from the context's own teardown. Idempotent.
    pub(crate) fn shut_down(&self) {
        let mut undelivered = self.shared.close();
        undelivered.extend(self.home.take_pending());
        for job in undelivered {
            job.abandon();
        }
        // Callbacks kept here are dropped unrun; their requests are abandoned above, or will
        // be by their worker.
        drop(self.home.take_callbacks());
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shut_down();
    }
}

impl fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadPool")
            .field("id", &self.shared.id)
            .field("stats", &self.shared.stats())
            .finish_non_exhaustive()
    }
}

/// The thread-safe side of a [`ThreadPool`]: submits work from any thread (completions still
/// run on the pool's context thread) and configures the pool. Cheap to clone.
///
/// It does not keep the pool running: once the pool has shut down, submissions fail with
/// [`Error::ShutDown`].
///
/// # Examples
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::sync::Arc;
///
/// let handle = threadpool::ThreadPool::of(&ctx).handle();
/// let home = std::thread::current().id();
/// let done = Arc::new(AtomicU32::new(0));
/// let d = done.clone();
/// std::thread::spawn(move || {
///     handle.submit_with(|| 7, move |r| {
///         assert_eq!(r, Ok(7));
///         assert_eq!(std::thread::current().id(), home, "callbacks run in the context");
///         d.fetch_add(1, Ordering::Relaxed);
///     }).unwrap();
/// });
/// while done.load(Ordering::Relaxed) == 0 {
///     ctx.poll();
/// }
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
pub struct PoolHandle {
    shared: Arc<PoolShared>,
}

impl PoolHandle {
    /// As [`ThreadPool::submit`], from any thread. The [`Request`] is `Send`; it becomes ready
    /// when the pool's context delivers the completion.
    ///
    /// # Errors
    ///
    /// [`Error::ShutDown`] if the pool has shut down; `work` is dropped unrun.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// let handle = threadpool::ThreadPool::of(&ctx).handle();
    /// let req = std::thread::spawn(move || handle.submit(|| 40 + 2).unwrap()).join().unwrap();
    /// while req.status() != threadpool::Status::Completed {
    ///     ctx.poll(); // the context delivers the completion
    /// }
    /// assert_eq!(req.try_take(), Some(Ok(42)));
    /// drop(ctx);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn submit<T, F>(&self, work: F) -> Result<Request<T>, Error>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let req = Req::new(work, Sink::Future);
        match self.shared.enqueue(req.clone()) {
            Ok(()) => Ok(Request::new(req, self.shared.clone())),
            Err(_) => Err(Error::ShutDown),
        }
    }

    /// As [`ThreadPool::submit_with`], from any thread; the callback must be `Send` as it
    /// travels to the context's thread, where it runs.
    ///
    /// # Errors
    ///
    /// [`Error::ShutDown`] if the pool has shut down; `work` and `done` are dropped unrun.
    pub fn submit_with<T, F, C>(&self, work: F, done: C) -> Result<Ticket, Error>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
        C: FnOnce(Result<T, Error>) + Send + 'static,
    {
        let req = Req::new(work, Sink::Remote(Box::new(done)));
        match self.shared.enqueue(req.clone()) {
            Ok(()) => Ok(Ticket::new(req, self.shared.clone())),
            Err(_) => Err(Error::ShutDown),
        }
    }

    /// As [`ThreadPool::set_limits`].
    pub fn set_limits(&self, min: usize, max: usize) -> Result<(), LimitsError> {
        self.shared.set_limits(min, max)
    }

    /// As [`ThreadPool::prestart`], from any thread.
    ///
    /// # Errors
    ///
    /// As [`ThreadPool::prestart`].
    pub fn prestart(&self, n: usize) -> io::Result<usize> {
        self.shared.prestart(n)
    }

    /// As [`ThreadPool::limits`].
    pub fn limits(&self) -> (usize, usize) {
        self.shared.limits()
    }

    /// As [`ThreadPool::stats`].
    pub fn stats(&self) -> PoolStats {
        self.shared.stats()
    }

    /// Whether the pool has shut down.
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }
}

impl fmt::Debug for PoolHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolHandle")
            .field("id", &self.shared.id)
            .finish_non_exhaustive()
    }
}
