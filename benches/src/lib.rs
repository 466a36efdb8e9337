//! Workloads shared by the side-by-side benchmarks: aio and its peer (tokio `current_thread`)
//! for B1, B2 and B4 of docs/benchmarks.md here, aio's fd backends next to mio, polling and the raw
//! system-call floors for B5 and B6 in [`fd`], in [`timer_load`] the timers of B7 (with async-io as
//! a second peer), in [`pool_jobs`] the thread pool of B8, and for adaptive polling (issue 11) the
//! cross-thread ping-pong of B3 in [`ping_pong`] and the idle loop of B9 in [`idle`]; the task executor
//! of B12 (spawn, yield, remote wake, cross-context ping-pong) in [`task_load`].
//!
//! Each workload takes an iteration count and returns the time of exactly that many iterations,
//! so the criterion benches (`iter_custom`) and the quick report (`benches/report.rs`, median of
//! runs) measure the same code. Every iteration finishes its own work before the next one
//! starts (tokio#3904: spawned tasks that are never awaited leak work into later iterations).
//!
//! The aio workloads also count the loop's own system calls ([`loop_syscalls`]) so that the
//! "0 syscalls" targets are checked, not assumed.
//!
//! B4 has like-for-like rows next to its `notify` vs remote `Handle::spawn` row: work queued from
//! another thread into a busy loop (a one-shot BH or an existing BH against a tokio task), each
//! run counted on the loop's thread ([`remote_bump`]), and `notify` against tokio's cheapest
//! remote wake-up, `Notify::notify_one` to a task parked in the busy runtime.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aio::{AioContext, BottomHalf, ContextHandle, PollParams};

pub mod fd;
pub mod file_io;
pub mod idle;
pub mod ping_pong;
pub mod pool_jobs;
pub mod task_load;
pub mod timer_load;

thread_local! {
    static RAN: Cell<u64> = const { Cell::new(0) };
}

/// Counts one callback run on this thread. A thread-local add, not an atomic read-modify-write,
/// so that the check "every callback ran" puts no locked instruction on the measured path.
#[inline]
pub fn bump() {
    RAN.with(|c| c.set(c.get() + 1));
}

/// How many callbacks have [`bump`]ed on this thread so far.
pub fn ran() -> u64 {
    RAN.with(Cell::get)
}

/// Runs of work queued from another thread into a busy loop (B4 like-for-like rows): bumped by
/// the loop's thread, read by the remote thread that waits for its work to have run.
static REMOTE_RAN: AtomicU64 = AtomicU64::new(0);

/// Whether a busy loop (aio or tokio) exists: [`REMOTE_RAN`] has one writer, the thread of the
/// one busy loop alive.
static BUSY_LOOP_ALIVE: AtomicBool = AtomicBool::new(false);

/// Counts one run of remotely queued work (a one-shot BH, a BH, a tokio task or a `Notify` wake)
/// on a busy loop's thread. A load and a store, not a read-modify-write: that thread is the
/// only writer while it lives (one busy loop at a time, which [`AioBusyLoop::start`] and
/// [`TokioBusyLoop::start`] enforce), so the count costs both runtimes the same two plain
/// instructions.
#[inline]
pub fn remote_bump() {
    // Relaxed: a count, it publishes no other data. The single writer makes load + store exact.
    REMOTE_RAN.store(REMOTE_RAN.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// How many [`remote_bump`]s have happened so far, in any busy loop.
pub fn remote_ran() -> u64 {
    // Relaxed: the waiter only compares counts; no data rides on them.
    REMOTE_RAN.load(Ordering::Relaxed)
}

/// Spins until [`remote_ran`] reaches `target`.
///
/// # Panics
///
/// If the busy loop's thread ends first (it panicked), instead of spinning for ever.
fn wait_remote_ran<T>(target: u64, thread: &thread::JoinHandle<T>) {
    while remote_ran() < target {
        if thread.is_finished() {
            panic!("the busy loop thread ended before its queued work ran");
        }
        std::hint::spin_loop();
    }
}

/// Times `ops` calls of `queue` (each queues one piece of work that runs [`remote_bump`] on the
/// busy loop's `thread`), in batches of [`REMOTE_BATCH`]: after each batch, spins until the loop
/// has run all of it. Returns the time from the first call until the last piece has run.
///
/// # Panics
///
/// If the loop's thread died, or the work did not run exactly `ops` times (`what` says which).
fn timed_batches<T>(
    ops: u64,
    thread: &thread::JoinHandle<T>,
    what: &str,
    mut queue: impl FnMut(),
) -> Duration {
    let before = remote_ran();
    let start = Instant::now();
    let mut queued = 0;
    while queued < ops {
        let batch = REMOTE_BATCH.min(ops - queued);
        for _ in 0..batch {
            queue();
        }
        queued += batch;
        wait_remote_ran(before + queued, thread);
    }
    let elapsed = start.elapsed();
    assert_eq!(remote_ran() - before, ops, "{what} ran twice");
    elapsed
}

/// Times `ops` round trips: one call of `queue` (which makes the busy loop on `thread` run
/// [`remote_bump`] once), then a spin until it has run. Returns the time of all round trips.
///
/// # Panics
///
/// As [`timed_batches`].
fn timed_round_trips<T>(
    ops: u64,
    thread: &thread::JoinHandle<T>,
    what: &str,
    mut queue: impl FnMut(),
) -> Duration {
    let before = remote_ran();
    let start = Instant::now();
    for i in 1..=ops {
        queue();
        wait_remote_ran(before + i, thread);
    }
    let elapsed = start.elapsed();
    assert_eq!(remote_ran() - before, ops, "{what} ran twice");
    elapsed
}

/// Held by a busy loop for its whole life, so that two never coexist (the single-writer rule of
/// [`remote_bump`]). Released after the loop's thread is joined.
#[derive(Debug)]
struct BusyLoopClaim(());

impl BusyLoopClaim {
    fn take() -> Self {
        // AcqRel: acquires the previous loop's release below (after its thread was joined), so
        // its last store to REMOTE_RAN happens before the next loop thread's first load.
        let taken = BUSY_LOOP_ALIVE.swap(true, Ordering::AcqRel);
        assert!(
            !taken,
            "aio-benches: only one busy loop may exist at a time"
        );
        BusyLoopClaim(())
    }
}

impl Drop for BusyLoopClaim {
    fn drop(&mut self) {
        // Release: pairs with the AcqRel swap in `take`.
        BUSY_LOOP_ALIVE.store(false, Ordering::Release);
    }
}

/// How many one-shot BHs or tokio tasks [`AioBusyLoop::remote_oneshot`] and
/// [`TokioBusyLoop::spawn_batches`] queue before they wait for all of them to have run (B2's
/// batch size; it also bounds the memory the queue can hold).
pub const REMOTE_BATCH: u64 = 1000;

/// The system calls `ctx`'s loop machinery has made so far: backend waits, eventfd writes by
/// `notify` and eventfd drains (`AioContext::stats`).
pub fn loop_syscalls(ctx: &AioContext) -> u64 {
    let s = ctx.stats();
    s.waits + s.event_writes + s.event_drains
}

/// A context for the B1/B2/B4 workloads: on the poll backend, which is what `Backend::Auto` gave
/// when this crate compiled in only aio's `poll` feature, so that those figures stay comparable
/// now that the fd benches compile in every backend. `AIO_BACKEND`, when set, still picks the
/// backend instead (see [`default_backend`]).
///
/// # Panics
///
/// If the context cannot be created (out of fds, or a backend forced by `AIO_BACKEND` refused).
pub fn new_context() -> AioContext {
    aio::Builder::new()
        .backend(default_backend())
        .build()
        .expect("aio-benches: cannot create an AioContext")
}

/// The backend of [`new_context`]: poll, unless `AIO_BACKEND` is set, in which case
/// `Backend::Auto`, which the builder lets the variable steer (an explicit backend would win
/// over it).
pub fn default_backend() -> aio::Backend {
    if std::env::var_os(aio::BACKEND_ENV).is_some() {
        aio::Backend::Auto
    } else {
        aio::Backend::Poll
    }
}

/// As [`new_context`] (the poll backend unless `AIO_BACKEND` is set), with exactly the adaptive
/// polling parameters `params`: the builder's `poll_params`, and, if `AIO_POLL_MAX_NS` replaced
/// the maximum, `params` set again, so that a row says what it measured.
///
/// # Panics
///
/// As [`new_context`], or if `params` is refused ([`PollParams::validate`]).
pub fn new_polling_context(params: PollParams) -> AioContext {
    let ctx = aio::Builder::new()
        .backend(default_backend())
        .poll_params(params)
        .build()
        .expect("aio-benches: cannot create an AioContext");
    if ctx.poll_params() != params {
        ctx.set_poll_params(params)
            .expect("aio-benches: polling parameters refused");
    }
    ctx
}

/// The element at quantile `p` (0 ..= 1) of `sorted`, by rank (no interpolation).
///
/// # Panics
///
/// If `sorted` is empty.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// The peer: a tokio `current_thread` runtime with every driver this crate's tokio features
/// provide (the timer; no I/O driver, so tokio's idle ticks make no `epoll_wait`).
///
/// # Panics
///
/// If the runtime cannot be built.
pub fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("aio-benches: cannot build a tokio runtime")
}

/// B1 (and its batch variant): `k` bottom halves created once on one context. One iteration
/// schedules each of them once and runs one `poll_nonblocking`, which dispatches all `k`.
#[derive(Debug)]
pub struct AioBhBatch {
    ctx: AioContext,
    bhs: Vec<BottomHalf>,
    ops: u64,
    syscalls: u64,
}

impl AioBhBatch {
    /// `k` BHs whose callbacks only [`bump`].
    pub fn new(k: usize) -> Self {
        assert!(k > 0);
        let ctx = new_context();
        let bhs = (0..k).map(|_| ctx.bh(bump)).collect();
        AioBhBatch {
            ctx,
            bhs,
            ops: 0,
            syscalls: 0,
        }
    }

    /// How many BHs one iteration dispatches.
    pub fn k(&self) -> u64 {
        self.bhs.len() as u64
    }

    /// Runs `iters` iterations (`iters * k` BH runs) and returns their time.
    ///
    /// # Panics
    ///
    /// If some BH run is missing after the last iteration.
    pub fn run(&mut self, iters: u64) -> Duration {
        let ran_before = ran();
        let sys_before = loop_syscalls(&self.ctx);
        let start = Instant::now();
        if let [bh] = self.bhs.as_slice() {
            for _ in 0..iters {
                bh.schedule();
                self.ctx.poll_nonblocking();
            }
        } else {
            for _ in 0..iters {
                for bh in &self.bhs {
                    bh.schedule();
                }
                self.ctx.poll_nonblocking();
            }
        }
        let elapsed = start.elapsed();
        assert_eq!(ran() - ran_before, iters * self.k(), "a BH run is missing");
        self.ops += iters * self.k();
        self.syscalls += loop_syscalls(&self.ctx) - sys_before;
        elapsed
    }

    /// Loop system calls per BH run over every `run` so far.
    pub fn syscalls_per_op(&self) -> f64 {
        per_op(self.syscalls, self.ops)
    }
}

/// B2: one-shot BHs. One iteration schedules `n` of them with `schedule_oneshot` and polls
/// (non-blocking) until all `n` have run.
#[derive(Debug)]
pub struct AioOneshot {
    ctx: AioContext,
    n: u64,
    ops: u64,
    syscalls: u64,
}

impl AioOneshot {
    /// `n` one-shot BHs per iteration.
    pub fn new(n: u64) -> Self {
        AioOneshot {
            ctx: new_context(),
            n,
            ops: 0,
            syscalls: 0,
        }
    }

    /// How many one-shot BHs one iteration runs.
    pub fn n(&self) -> u64 {
        self.n
    }

    /// Runs `iters` iterations (`iters * n` one-shot BHs) and returns their time.
    pub fn run(&mut self, iters: u64) -> Duration {
        let sys_before = loop_syscalls(&self.ctx);
        let start = Instant::now();
        for _ in 0..iters {
            let target = ran() + self.n;
            for _ in 0..self.n {
                self.ctx.schedule_oneshot(bump);
            }
            // Every iteration finishes its own work: all `n` callbacks have run.
            while ran() < target {
                self.ctx.poll_nonblocking();
            }
        }
        let elapsed = start.elapsed();
        self.ops += iters * self.n;
        self.syscalls += loop_syscalls(&self.ctx) - sys_before;
        elapsed
    }

    /// Loop system calls per one-shot BH over every `run` so far.
    pub fn syscalls_per_op(&self) -> f64 {
        per_op(self.syscalls, self.ops)
    }
}

/// B1 peer: `iters` × `tokio::task::yield_now().await` inside one `block_on` (self-wake and
/// re-poll of the running task), timed inside the `block_on`.
pub fn tokio_yield(rt: &tokio::runtime::Runtime, iters: u64) -> Duration {
    rt.block_on(async move {
        let start = Instant::now();
        for _ in 0..iters {
            tokio::task::yield_now().await;
        }
        start.elapsed()
    })
}

/// B1-batch and B2 peer: one iteration spawns `k` tasks that only [`bump`] on a tokio
/// `current_thread` runtime and awaits every `JoinHandle`.
#[derive(Debug)]
pub struct TokioSpawnBatch {
    rt: tokio::runtime::Runtime,
    handles: Vec<tokio::task::JoinHandle<()>>,
    k: u64,
}

impl TokioSpawnBatch {
    /// `k` tasks per iteration.
    pub fn new(k: u64) -> Self {
        TokioSpawnBatch {
            rt: tokio_runtime(),
            handles: Vec::with_capacity(k as usize),
            k,
        }
    }

    /// Runs `iters` iterations (`iters * k` tasks) and returns their time.
    ///
    /// # Panics
    ///
    /// If a task panicked or some task run is missing.
    pub fn run(&mut self, iters: u64) -> Duration {
        let k = self.k;
        let handles = &mut self.handles;
        let ran_before = ran();
        let elapsed = self.rt.block_on(async {
            let start = Instant::now();
            for _ in 0..iters {
                for _ in 0..k {
                    handles.push(tokio::spawn(async { bump() }));
                }
                for h in handles.drain(..) {
                    h.await.expect("an empty task panicked");
                }
            }
            start.elapsed()
        });
        assert_eq!(ran() - ran_before, iters * k, "a task run is missing");
        elapsed
    }
}

/// What a busy loop did while it ran (B4), for the system-call count per notify.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BusyReport {
    /// Iterations of the busy loop (`poll_nonblocking` calls, or `yield_now`s for tokio).
    pub loop_iterations: u64,
    /// Backend waits the busy loop made.
    pub waits: u64,
    /// Eventfd writes made by `notify` while the loop ran.
    pub event_writes: u64,
    /// Eventfd drains the busy loop made.
    pub event_drains: u64,
    /// Operations (notifies, remote schedules, spawns or `notify_one`s) timed against this loop.
    pub ops: u64,
    /// Runs of remotely queued work ([`remote_bump`]s) on the loop's thread: one-shot BHs, BH
    /// callbacks, tokio tasks, or wakes of the task parked on `Notify`.
    pub remote_runs: u64,
}

impl BusyReport {
    /// Adds another run's counts to these.
    pub fn add(&mut self, other: &BusyReport) {
        self.loop_iterations += other.loop_iterations;
        self.waits += other.waits;
        self.event_writes += other.event_writes;
        self.event_drains += other.event_drains;
        self.ops += other.ops;
        self.remote_runs += other.remote_runs;
    }

    /// Loop system calls (waits + eventfd writes + eventfd drains) per timed operation.
    pub fn syscalls_per_op(&self) -> f64 {
        per_op(self.waits + self.event_writes + self.event_drains, self.ops)
    }

    /// Eventfd writes per timed operation (the only syscall `notify` itself can make).
    pub fn event_writes_per_op(&self) -> f64 {
        per_op(self.event_writes, self.ops)
    }

    /// Backend waits per busy-loop iteration.
    pub fn waits_per_loop_iteration(&self) -> f64 {
        per_op(self.waits, self.loop_iterations)
    }

    /// Remote runs ([`remote_bump`]s) per timed operation: 1 when every operation queued work
    /// that ran once; below 1 when wake-ups coalesced.
    pub fn remote_runs_per_op(&self) -> f64 {
        per_op(self.remote_runs, self.ops)
    }
}

/// B4: a context whose home thread spins `poll_nonblocking` (busy, never blocks) until stopped;
/// the caller's thread notifies it, or queues work into it.
#[derive(Debug)]
pub struct AioBusyLoop {
    handle: ContextHandle,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<BusyReport>>,
    writes_before: u64,
    ops: u64,
    /// The BH of [`bh_round_trip`](Self::bh_round_trip), created on its first call (so that the
    /// other rows run on a loop with no BH).
    bh: Option<BottomHalf>,
    /// Dropped after `thread` is joined.
    _claim: BusyLoopClaim,
}

impl AioBusyLoop {
    /// Starts the loop thread, pinned to `cpu` if given (and if the machine has it).
    ///
    /// # Panics
    ///
    /// If the thread cannot be spawned or the context cannot be created, or if another busy
    /// loop ([`AioBusyLoop`] or [`TokioBusyLoop`]) is alive.
    pub fn start(cpu: Option<usize>) -> Self {
        let claim = BusyLoopClaim::take();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let stop_flag = stop.clone();
        let thread = thread::Builder::new()
            .name("aio-busy-loop".into())
            .spawn(move || {
                let _pin = cpu.and_then(pin_current_thread);
                let ctx = new_context();
                let before = ctx.stats();
                let ran_before = remote_ran();
                // The loop is running before `start` returns: its first iteration comes first.
                ctx.poll_nonblocking();
                tx.send(ctx.handle()).expect("bench thread gone");
                let mut loop_iterations = 1u64;
                while !stop_flag.load(Ordering::Relaxed) {
                    ctx.poll_nonblocking();
                    loop_iterations += 1;
                }
                let after = ctx.stats();
                BusyReport {
                    loop_iterations,
                    waits: after.waits - before.waits,
                    event_writes: 0,
                    event_drains: after.event_drains - before.event_drains,
                    ops: 0,
                    remote_runs: remote_ran() - ran_before,
                }
            })
            .expect("cannot spawn the busy loop thread");
        let handle = rx.recv().expect("the busy loop thread died");
        let writes_before = handle.event_writes();
        AioBusyLoop {
            handle,
            stop,
            thread: Some(thread),
            writes_before,
            ops: 0,
            bh: None,
            _claim: claim,
        }
    }

    /// Calls `notify` `iters` times from this thread and returns the time. Queues no work:
    /// the loop only finds `notified` set (and clears it) on its next iteration.
    pub fn notify(&mut self, iters: u64) -> Duration {
        let handle = &self.handle;
        let start = Instant::now();
        for _ in 0..iters {
            handle.notify();
        }
        let elapsed = start.elapsed();
        self.ops += iters;
        elapsed
    }

    /// B4 like-for-like, queued work: `ops` × `ContextHandle::schedule_oneshot(remote_bump)`
    /// from this thread (each allocates its node and boxed callback, as a tokio spawn allocates
    /// its task), in batches of [`REMOTE_BATCH`]: after each batch this thread spins until the
    /// busy loop has run all of it. Returns the time from the first schedule until the last
    /// callback has run, so it covers the loop's dispatch and free as well as the calls.
    ///
    /// # Panics
    ///
    /// If the loop thread died, or if the callbacks did not run exactly `ops` times.
    pub fn remote_oneshot(&mut self, ops: u64) -> Duration {
        let handle = &self.handle;
        let thread = self.thread.as_ref().expect("stopped");
        let elapsed = timed_batches(ops, thread, "a one-shot BH", || {
            handle.schedule_oneshot(remote_bump);
        });
        self.ops += ops;
        elapsed
    }

    /// B4 like-for-like, queued work: `ops` round trips of `BottomHalf::schedule` on one BH
    /// created once (its callback is [`remote_bump`]), each followed by a spin of this thread
    /// until the callback has run. Waiting is what makes every schedule run the callback once:
    /// without it, schedules of a BH that is already queued coalesce. Returns the time of all
    /// round trips: the schedule, the loop noticing it, the callback, and this thread seeing the
    /// count.
    ///
    /// # Panics
    ///
    /// If the loop thread died, or if the callback did not run exactly `ops` times.
    pub fn bh_round_trip(&mut self, ops: u64) -> Duration {
        let thread = self.thread.as_ref().expect("stopped");
        let bh = self.bh.get_or_insert_with(|| self.handle.bh(remote_bump));
        let elapsed = timed_round_trips(ops, thread, "a BH schedule", || bh.schedule());
        self.ops += ops;
        elapsed
    }

    /// Stops the loop and returns what it did.
    ///
    /// # Panics
    ///
    /// If the loop thread panicked.
    pub fn stop(mut self) -> BusyReport {
        // Deleted by the loop if it is still running, else by the context's drop.
        drop(self.bh.take());
        self.stop.store(true, Ordering::Relaxed);
        let mut report = self
            .thread
            .take()
            .expect("stopped twice")
            .join()
            .expect("the busy loop thread panicked");
        report.event_writes = self.handle.event_writes() - self.writes_before;
        report.ops = self.ops;
        report
    }
}

impl Drop for AioBusyLoop {
    fn drop(&mut self) {
        drop(self.bh.take());
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// B4 peer: a tokio `current_thread` runtime whose thread is busy in `block_on` of a
/// `yield_now` loop; the caller's thread spawns tasks onto it through its `Handle`, or (with
/// [`with_parked_task`](Self::with_parked_task)) wakes a task parked on a `tokio::sync::Notify`.
#[derive(Debug)]
pub struct TokioBusyLoop {
    handle: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<(u64, u64)>>,
    ops: u64,
    /// The `Notify` the parked task waits on, if it was started.
    notify: Option<Arc<tokio::sync::Notify>>,
    /// Dropped after `thread` is joined.
    _claim: BusyLoopClaim,
}

impl TokioBusyLoop {
    /// Starts the runtime thread, pinned to `cpu` if given (and if the machine has it).
    ///
    /// # Panics
    ///
    /// If the thread cannot be spawned or the runtime cannot be built, or if another busy loop
    /// ([`AioBusyLoop`] or [`TokioBusyLoop`]) is alive.
    pub fn start(cpu: Option<usize>) -> Self {
        Self::start_inner(cpu, None)
    }

    /// As [`start`](Self::start), plus one task spawned on the runtime before its busy loop
    /// starts, which loops on `notify.notified().await` and counts each wake with
    /// [`remote_bump`]. It is parked (not scheduled) until [`notify_one`](Self::notify_one) or
    /// [`notify_round_trip`](Self::notify_round_trip) wakes it.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub fn with_parked_task(cpu: Option<usize>) -> Self {
        Self::start_inner(cpu, Some(Arc::new(tokio::sync::Notify::new())))
    }

    fn start_inner(cpu: Option<usize>, notify: Option<Arc<tokio::sync::Notify>>) -> Self {
        let claim = BusyLoopClaim::take();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let stop_flag = stop.clone();
        let parked = notify.clone();
        let thread = thread::Builder::new()
            .name("tokio-busy-loop".into())
            .spawn(move || {
                let _pin = cpu.and_then(pin_current_thread);
                let rt = tokio_runtime();
                let ran_before = remote_ran();
                let yields = rt.block_on(async move {
                    if let Some(n) = parked {
                        // Dropped, still parked, with the runtime.
                        drop(tokio::spawn(async move {
                            loop {
                                n.notified().await;
                                remote_bump();
                            }
                        }));
                    }
                    // The loop is running before `start` returns: its first yield comes first
                    // (and lets the parked task run up to its first `notified().await`).
                    tokio::task::yield_now().await;
                    tx.send(tokio::runtime::Handle::current())
                        .expect("bench thread gone");
                    let mut yields = 1u64;
                    while !stop_flag.load(Ordering::Relaxed) {
                        tokio::task::yield_now().await;
                        yields += 1;
                    }
                    yields
                });
                (yields, remote_ran() - ran_before)
            })
            .expect("cannot spawn the tokio busy loop thread");
        let handle = rx.recv().expect("the tokio busy loop thread died");
        TokioBusyLoop {
            handle,
            stop,
            thread: Some(thread),
            ops: 0,
            notify,
            _claim: claim,
        }
    }

    /// Spawns `iters` empty tasks onto the busy runtime from this thread (dropping each
    /// `JoinHandle`) and returns the time of the spawns. Then, untimed, waits until the runtime
    /// has run them all, so that no work leaks into the next iteration.
    ///
    /// # Panics
    ///
    /// If the runtime thread died.
    pub fn spawn(&mut self, iters: u64) -> Duration {
        let handle = &self.handle;
        let start = Instant::now();
        for _ in 0..iters {
            drop(handle.spawn(async {}));
        }
        let elapsed = start.elapsed();
        // Remote spawns go through one FIFO injection queue: once this marker has run, so have
        // all the tasks above.
        let (tx, rx) = mpsc::sync_channel(1);
        drop(handle.spawn(async move {
            let _ = tx.send(());
        }));
        rx.recv().expect("the tokio busy loop thread died");
        self.ops += iters;
        elapsed
    }

    /// Peer of [`AioBusyLoop::remote_oneshot`]: `ops` × `Handle::spawn(async { remote_bump() })`
    /// from this thread (each `JoinHandle` dropped), in batches of [`REMOTE_BATCH`], each
    /// followed by a spin of this thread until the runtime has run all of it. Returns the time
    /// from the first spawn until the last task has run.
    ///
    /// # Panics
    ///
    /// If the runtime thread died, or if the tasks did not run exactly `ops` times.
    pub fn spawn_batches(&mut self, ops: u64) -> Duration {
        let handle = &self.handle;
        let thread = self.thread.as_ref().expect("stopped");
        let elapsed = timed_batches(ops, thread, "a task", || {
            drop(handle.spawn(async { remote_bump() }));
        });
        self.ops += ops;
        elapsed
    }

    /// Peer of [`AioBusyLoop::bh_round_trip`] that allocates: `ops` round trips of
    /// `Handle::spawn(async { remote_bump() })`, each followed by a spin of this thread until
    /// the task has run.
    ///
    /// # Panics
    ///
    /// If the runtime thread died, or if the tasks did not run exactly `ops` times.
    pub fn spawn_round_trip(&mut self, ops: u64) -> Duration {
        let handle = &self.handle;
        let thread = self.thread.as_ref().expect("stopped");
        let elapsed = timed_round_trips(ops, thread, "a task", || {
            drop(handle.spawn(async { remote_bump() }));
        });
        self.ops += ops;
        elapsed
    }

    /// Peer of [`AioBusyLoop::bh_round_trip`] that reuses an existing task, as a BH is reused:
    /// `ops` round trips of `Notify::notify_one` to the parked task, each followed by a spin of
    /// this thread until the task has woken and counted. If the task has not parked again yet,
    /// `notify_one` leaves a permit that its next `notified()` takes at once, so every round
    /// trip still runs the task exactly once.
    ///
    /// # Panics
    ///
    /// If the runtime was started without [`with_parked_task`](Self::with_parked_task), its
    /// thread died, or the task did not wake exactly `ops` times.
    pub fn notify_round_trip(&mut self, ops: u64) -> Duration {
        let notify = self.notify.as_deref().expect("no parked task");
        let thread = self.thread.as_ref().expect("stopped");
        let elapsed = timed_round_trips(ops, thread, "the task woken by one notify_one", || {
            notify.notify_one();
        });
        self.ops += ops;
        elapsed
    }

    /// Peer of [`AioBusyLoop::notify`], tokio's cheapest remote wake-up: `iters` ×
    /// `Notify::notify_one` from this thread to the task parked in the busy runtime, and the
    /// time of those calls. Like aio's notifies they coalesce: while the task is woken but has
    /// not run yet, `notify_one` only stores a permit. Then, untimed, one more `notify_one` and a
    /// spin until the task has woken after it, which proves the wake-ups reach it; at most one
    /// stored permit (one wake) can be left for the next call.
    ///
    /// # Panics
    ///
    /// If the runtime was started without [`with_parked_task`](Self::with_parked_task) or its
    /// thread died.
    pub fn notify_one(&mut self, iters: u64) -> Duration {
        let notify = self.notify.as_deref().expect("no parked task");
        let thread = self.thread.as_ref().expect("stopped");
        let start = Instant::now();
        for _ in 0..iters {
            notify.notify_one();
        }
        let elapsed = start.elapsed();
        let seen = remote_ran();
        notify.notify_one();
        wait_remote_ran(seen + 1, thread);
        self.ops += iters;
        elapsed
    }

    /// Stops the runtime thread; returns its busy-loop iterations, the operations timed and the
    /// remote runs (tasks or wakes) it counted.
    ///
    /// # Panics
    ///
    /// If the runtime thread panicked.
    pub fn stop(mut self) -> BusyReport {
        self.stop.store(true, Ordering::Relaxed);
        let (yields, remote_runs) = self
            .thread
            .take()
            .expect("stopped twice")
            .join()
            .expect("the tokio busy loop thread panicked");
        BusyReport {
            loop_iterations: yields,
            ops: self.ops,
            remote_runs,
            ..BusyReport::default()
        }
    }
}

impl Drop for TokioBusyLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The calling thread's CPU affinity before [`pin_current_thread`]; restored when dropped.
pub struct Pinned {
    previous: libc::cpu_set_t,
}

impl fmt::Debug for Pinned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pinned").finish_non_exhaustive()
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // pid 0 is the calling thread; the pointer and size describe `self.previous`,
        // a valid `cpu_set_t` that outlives the call.
        // SAFETY: the conditions just stated hold for this call.
        unsafe {
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &self.previous);
        }
    }
}

/// The CPUs the process may use, as the first [`pin_current_thread`] found them (read from the
/// calling thread before it pinned anything). A thread spawned by a pinned thread inherits its
/// one-CPU mask, so its own mask cannot say whether another CPU is allowed: B4's loop threads
/// are spawned by the remote thread after it pinned itself to cpu1.
static ALLOWED_CPUS: OnceLock<Option<libc::cpu_set_t>> = OnceLock::new();

/// The calling thread's CPU affinity mask.
fn current_affinity() -> Option<libc::cpu_set_t> {
    // SAFETY: `cpu_set_t` is a plain bit array, for which all zeroes is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // pid 0 is the calling thread; the pointer and size describe `set`, which outlives
    // the call.
    // SAFETY: the conditions just stated hold for this call.
    if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return None;
    }
    Some(set)
}

/// Pins the calling thread to `cpu` (B4: loop thread on cpu0, remote thread on cpu1). Returns
/// `None`, leaving the thread as it was, when the process may run on fewer than 2 CPUs or not on
/// `cpu` (its mask at the first call, see `ALLOWED_CPUS`), or the kernel refuses.
pub fn pin_current_thread(cpu: usize) -> Option<Pinned> {
    let size = size_of::<libc::cpu_set_t>();
    if cpu >= 8 * size {
        return None;
    }
    // Not `available_parallelism`: it reads the calling thread's mask, which is one CPU in a
    // thread spawned by a pinned one.
    let allowed = ALLOWED_CPUS.get_or_init(current_affinity).as_ref()?;
    // SAFETY: `allowed` is an initialized `cpu_set_t`.
    let allowed_count = unsafe { libc::CPU_COUNT(allowed) };
    // SAFETY: `allowed` is an initialized `cpu_set_t` and `cpu` is below its bit count.
    if allowed_count < 2 || !unsafe { libc::CPU_ISSET(cpu, allowed) } {
        return None;
    }
    let previous = current_affinity()?;
    // SAFETY: `cpu_set_t` is a plain bit array, for which all zeroes is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is an initialized `cpu_set_t` and `cpu` is below its bit count.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; the pointer and size describe `set`.
    if unsafe { libc::sched_setaffinity(0, size, &set) } != 0 {
        return None;
    }
    Some(Pinned { previous })
}

/// The machine, for report headers: CPU model name, CPU count and kernel release.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!("{cpu}, {cpus} CPUs, Linux {kernel}")
}

/// Today's UTC date as `YYYY-MM-DD` (civil-from-days, H. Hinnant's algorithm).
pub fn today() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn per_op(count: u64, ops: u64) -> f64 {
    if ops == 0 {
        0.0
    } else {
        count as f64 / ops as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPUs in the calling thread's mask.
    fn cpus_of_this_thread() -> Vec<usize> {
        let set = current_affinity().expect("sched_getaffinity failed");
        (0..8 * size_of::<libc::cpu_set_t>())
            // SAFETY: `set` is an initialized `cpu_set_t` and every `c` is below its bit count.
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect()
    }

    /// The B4 layout: a thread pinned to cpu1 spawns the loop thread, which pins itself to cpu0
    /// (its inherited mask is {1}); dropping the pins restores each thread's mask.
    #[test]
    fn a_thread_spawned_by_a_pinned_thread_pins_to_another_cpu() {
        let before = cpus_of_this_thread();
        if !(before.contains(&0) && before.contains(&1)) {
            println!("skipped: this process may not run on both cpu0 and cpu1 ({before:?})");
            return;
        }
        let remote = pin_current_thread(1).expect("pinning to cpu1 failed");
        assert_eq!(cpus_of_this_thread(), [1]);
        let in_loop_thread = thread::spawn(|| {
            let inherited = cpus_of_this_thread();
            let pin = pin_current_thread(0);
            let pinned = cpus_of_this_thread();
            drop(pin);
            (inherited, pinned, cpus_of_this_thread())
        })
        .join()
        .expect("the spawned thread panicked");
        assert_eq!(in_loop_thread, (vec![1], vec![0], vec![1]));
        drop(remote);
        assert_eq!(cpus_of_this_thread(), before);
    }
}

/// Criterion options that take a value, so that the value is not taken for a filter.
const OPTIONS_WITH_VALUE: &[&str] = &[
    "--save-baseline",
    "--baseline",
    "--baseline-lenient",
    "--load-baseline",
    "--sample-size",
    "--warm-up-time",
    "--measurement-time",
    "--nresamples",
    "--noise-threshold",
    "--confidence-level",
    "--significance-level",
    "--profile-time",
    "--output-format",
    "--color",
    "--plotting-backend",
    "--format",
    "--logfile",
];

/// The command line of a plain-`Instant` bench target (`report`, `polling`): bench mode or smoke
/// run (`cargo test --benches` passes no `--bench`), `--list`, and the first free argument as a
/// filter. Criterion's own options are skipped, with their values.
#[derive(Debug)]
pub struct BenchArgs {
    /// `--bench` was given: full sizes.
    pub bench: bool,
    /// `--list` was given.
    pub list: bool,
    /// The filter, if any.
    pub filter: Option<String>,
}

impl BenchArgs {
    /// Parses `std::env::args()`.
    pub fn parse() -> BenchArgs {
        let mut args = BenchArgs {
            bench: false,
            list: false,
            filter: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            match a.as_str() {
                "--bench" => args.bench = true,
                "--list" => args.list = true,
                s if OPTIONS_WITH_VALUE.contains(&s) => {
                    it.next();
                }
                s if s.starts_with('-') => {}
                s => {
                    if args.filter.is_none() {
                        args.filter = Some(s.to_owned());
                    }
                }
            }
        }
        args
    }

    /// Whether the row `key` of the target `target` runs: no filter, the target's own name,
    /// or a substring of the key.
    pub fn wants(&self, target: &str, key: &str) -> bool {
        match self.filter.as_deref() {
            None => true,
            Some(f) => f == target || key.contains(f),
        }
    }
}

/// The sizes a plain-timing bench program runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sizes {
    /// No `--bench` (`cargo test --benches`): tiny sizes, to prove the program runs.
    Smoke,
    /// `--bench --quick`: reduced sizes.
    Quick,
    /// `--bench`: the sizes BENCHMARKS.md records.
    Full,
}

/// One part of a [`run_parts`] program, with its filter key: appends its section to the
/// report, measuring with the plan `P`.
pub type Part<P> = (&'static str, fn(&mut String, P));

/// A plain-timing bench program made of parts, each of which appends its section to the report
/// (`tasks`, `rfifolock`): parses the command line, prints a header (`title`, the date, the
/// machine and the sizes), runs the parts whose key the filter wants with the plan `plans`
/// picks for the sizes, prints the report and, in bench mode with `AIO_BENCH_REPORT_DIR` set,
/// also writes it to `file` in that directory. `target` is the bench target's name (a filter
/// equal to it runs every part).
pub fn run_parts<P: Copy>(
    target: &str,
    title: &str,
    file: &str,
    plans: impl Fn(Sizes) -> P,
    parts: &[Part<P>],
) {
    use std::fmt::Write as _;
    let args = BenchArgs::parse();
    if args.list {
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes = match (args.bench, quick) {
        (false, _) => Sizes::Smoke,
        (true, true) => Sizes::Quick,
        (true, false) => Sizes::Full,
    };
    let plan = plans(sizes);
    let mut out = String::new();
    writeln!(out, "# {title} ({})\n", today()).unwrap();
    writeln!(out, "Machine: {}", machine()).unwrap();
    match sizes {
        Sizes::Smoke => writeln!(
            out,
            "(smoke run: no --bench flag, tiny sizes; the figures mean nothing)"
        )
        .unwrap(),
        Sizes::Quick => writeln!(out, "(--quick: reduced sizes)").unwrap(),
        Sizes::Full => {}
    }
    for (key, part) in parts {
        if args.wants(target, key) {
            part(&mut out, plan);
        }
    }
    print!("{out}");
    if sizes == Sizes::Smoke {
        return;
    }
    if let Some(dir) = std::env::var_os("AIO_BENCH_REPORT_DIR") {
        let path = std::path::Path::new(&dir).join(file);
        std::fs::create_dir_all(&dir).ok();
        std::fs::write(&path, &out).unwrap_or_else(|e| panic!("write {file}: {e}"));
        println!("written to {}", path.display());
    }
}

/// How a report marks a target: "met", or "**missed**" in bold.
pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

/// Median, mean and minimum of per-round figures (empty: panics).
pub fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    (percentile(&v, 0.5), mean, v[0])
}
