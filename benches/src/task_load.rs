//! B12 (docs/benchmarks.md): the task executor (`aio_core::task`) next to tokio, in one process. This
//! file owns the workloads; `benches/tasks.rs` runs them, interleaved, and prints the tables.
//!
//! * **Spawn + await** of an empty task: aio `spawn_local` / `spawn` against tokio `spawn` (and
//!   `LocalSet` + `spawn_local`) on a `current_thread` runtime, the awaiting done by the future
//!   of one `block_on`; one at a time ([`Spawn::run`] with `batch == 1`) and in batches of
//!   1 000 spawned before any is awaited.
//! * **Yield**: one task awaits `yield_now()` in a loop (aio `aio_core::task::yield_now`,
//!   `tokio::task::yield_now`), timed inside the task.
//! * **Remote wake into a busy loop** ([`remote_wake`]): a task parked on a [`Signal`] is woken
//!   by another thread, which spins until the task has acknowledged; the loop is kept busy by a
//!   second task that yields for ever, so it never sleeps. One sample per round trip.
//! * **Cross-context ping-pong** ([`ping_pong`]): two tasks on two threads, each on its own
//!   context (or runtime), hand a counter back and forth through two [`Signal`]s; the loops
//!   sleep when they have nothing to do. One sample per round trip, taken by the first task.
//! * **CoMutex** ([`mutex_run`]): QEMU's test-aio-multithread mutex tests as a benchmark, one
//!   task per thread incrementing a counter under the lock, iterations per second, with
//!   `aio_core::task::CoMutex` against `tokio::sync::Mutex` and a `parking_lot::Mutex` baseline.
//!
//! Both runtimes use the same wake-up mechanism, [`Signal`]: an atomic value and one stored
//! `Waker`, so the rows differ only in what the runtimes do with a wake-up. The tokio runtimes
//! have every driver this crate's features enable (`enable_all`: the I/O driver too), as aio's
//! context always has its notifier registered.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread;
use std::time::{Duration, Instant};

use aio::AioContext;

use crate::{loop_syscalls, new_context, pin_current_thread, tokio_runtime};

/// The value [`Signal::set`] stores to tell a waiting task to finish.
pub const STOP: u64 = u64::MAX;

/// A runtime-neutral wake-up: a value that only grows, and the waker of the one task waiting
/// for it to change. [`set`](Signal::set) stores a value and wakes that task (from any thread);
/// [`changed`](Signal::changed) is the future the task awaits. The waker stays registered
/// between waits (re-cloned only if the task's waker changes), so a round trip costs each
/// runtime one uncontended lock, one `wake_by_ref` and one poll.
#[derive(Debug, Default)]
pub struct Signal {
    value: AtomicU64,
    waker: Mutex<Option<Waker>>,
}

impl Signal {
    /// A signal holding 0, with no waiter.
    pub fn new() -> Arc<Signal> {
        Arc::new(Signal::default())
    }

    /// Stores `value` and wakes the waiting task, if one is registered.
    pub fn set(&self, value: u64) {
        // Release: the waiter that sees `value` sees what this thread did before.
        self.value.store(value, Ordering::Release);
        let waker = self.waker.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = waker.as_ref() {
            w.wake_by_ref();
        }
    }

    /// A future that completes with the signal's value once it differs from `seen`.
    pub fn changed(&self, seen: u64) -> Changed<'_> {
        Changed { signal: self, seen }
    }

    fn get(&self) -> u64 {
        // Acquire pairs with the Release in `set`.
        self.value.load(Ordering::Acquire)
    }
}

/// The future of [`Signal::changed`].
#[derive(Debug)]
#[must_use = "futures do nothing unless awaited"]
pub struct Changed<'a> {
    signal: &'a Signal,
    seen: u64,
}

impl Future for Changed<'_> {
    type Output = u64;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u64> {
        let v = self.signal.get();
        if v != self.seen {
            return Poll::Ready(v);
        }
        let mut waker = self
            .signal
            .waker
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match waker.as_ref() {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => *waker = Some(cx.waker().clone()),
        }
        // Checked again under the lock: a `set` that stored before this load is seen here; one
        // that stores after it takes the lock after this poll released it, and finds the waker.
        let v = self.signal.get();
        if v != self.seen {
            Poll::Ready(v)
        } else {
            Poll::Pending
        }
    }
}

/// The answering task of [`remote_wake`] and [`ping_pong`]: waits for `ping` to change, answers
/// each new value on `pong`, and returns how many it answered once `ping` holds [`STOP`].
pub async fn answer(ping: Arc<Signal>, pong: impl Fn(u64)) -> u64 {
    let mut seen = 0;
    let mut answered = 0;
    loop {
        let v = ping.changed(seen).await;
        if v == STOP {
            return answered;
        }
        pong(v);
        answered += 1;
        seen = v;
    }
}

// ---------------------------------------------------------------------------------------------
// Spawn + await, yield
// ---------------------------------------------------------------------------------------------

/// How a spawn row spawns its empty tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spawner {
    /// `ctx.spawn_local(async {})`.
    AioLocal,
    /// `ctx.spawn(async {})` (a `Send` task, which could move to another context).
    AioSend,
    /// `tokio::spawn(async {})` inside `Runtime::block_on`, `current_thread`.
    Tokio,
    /// `tokio::task::spawn_local(async {})` inside `LocalSet::block_on`, `current_thread`.
    TokioLocal,
}

/// Spawn + await of empty tasks on one context or `current_thread` runtime, made once and reused
/// by every run.
#[derive(Debug)]
pub struct Spawn {
    spawner: Spawner,
    batch: usize,
    ctx: Option<AioContext>,
    rt: Option<tokio::runtime::Runtime>,
    ops: u64,
    syscalls: u64,
}

impl Spawn {
    /// `batch` tasks spawned before the first of them is awaited (1: spawn, await, spawn, ...).
    ///
    /// # Panics
    ///
    /// If `batch` is 0, or the context or runtime cannot be built.
    pub fn new(spawner: Spawner, batch: usize) -> Spawn {
        assert!(batch > 0);
        let aio = matches!(spawner, Spawner::AioLocal | Spawner::AioSend);
        Spawn {
            spawner,
            batch,
            ctx: aio.then(new_context),
            rt: (!aio).then(tokio_runtime),
            ops: 0,
            syscalls: 0,
        }
    }

    /// Spawns and awaits `ops` empty tasks (rounded up to whole batches) inside one `block_on`,
    /// and returns the ns per task.
    ///
    /// # Panics
    ///
    /// If a task did not finish with `Ok(())`.
    pub fn run(&mut self, ops: u64) -> f64 {
        let batches = ops.div_ceil(self.batch as u64);
        let n = self.batch;
        let elapsed = match (self.spawner, &self.ctx, &self.rt) {
            (Spawner::AioLocal, Some(ctx), _) => {
                let before = loop_syscalls(ctx);
                let t = ctx.block_on(async {
                    let start = Instant::now();
                    if n == 1 {
                        for _ in 0..batches {
                            ctx.spawn_local(async {}).await.expect("empty task failed");
                        }
                    } else {
                        let mut handles = Vec::with_capacity(n);
                        for _ in 0..batches {
                            handles.extend((0..n).map(|_| ctx.spawn_local(async {})));
                            for h in handles.drain(..) {
                                h.await.expect("empty task failed");
                            }
                        }
                    }
                    start.elapsed()
                });
                self.syscalls += loop_syscalls(ctx) - before;
                t
            }
            (Spawner::AioSend, Some(ctx), _) => {
                let before = loop_syscalls(ctx);
                let t = ctx.block_on(async {
                    let start = Instant::now();
                    if n == 1 {
                        for _ in 0..batches {
                            ctx.spawn(async {}).await.expect("empty task failed");
                        }
                    } else {
                        let mut handles = Vec::with_capacity(n);
                        for _ in 0..batches {
                            handles.extend((0..n).map(|_| ctx.spawn(async {})));
                            for h in handles.drain(..) {
                                h.await.expect("empty task failed");
                            }
                        }
                    }
                    start.elapsed()
                });
                self.syscalls += loop_syscalls(ctx) - before;
                t
            }
            (Spawner::Tokio, _, Some(rt)) => rt.block_on(async {
                let start = Instant::now();
                if n == 1 {
                    for _ in 0..batches {
                        tokio::spawn(async {}).await.expect("empty task failed");
                    }
                } else {
                    let mut handles = Vec::with_capacity(n);
                    for _ in 0..batches {
                        handles.extend((0..n).map(|_| tokio::spawn(async {})));
                        for h in handles.drain(..) {
                            h.await.expect("empty task failed");
                        }
                    }
                }
                start.elapsed()
            }),
            (Spawner::TokioLocal, _, Some(rt)) => {
                let local = tokio::task::LocalSet::new();
                local.block_on(rt, async {
                    let start = Instant::now();
                    if n == 1 {
                        for _ in 0..batches {
                            tokio::task::spawn_local(async {})
                                .await
                                .expect("empty task failed");
                        }
                    } else {
                        let mut handles = Vec::with_capacity(n);
                        for _ in 0..batches {
                            handles.extend((0..n).map(|_| tokio::task::spawn_local(async {})));
                            for h in handles.drain(..) {
                                h.await.expect("empty task failed");
                            }
                        }
                    }
                    start.elapsed()
                })
            }
            _ => unreachable!("Spawn::new builds what its spawner needs"),
        };
        let done = batches * n as u64;
        self.ops += done;
        ns_per(elapsed, done)
    }

    /// aio only: the loop's system calls per task over every run so far.
    pub fn syscalls_per_op(&self) -> Option<f64> {
        self.ctx
            .as_ref()
            .map(|_| self.syscalls as f64 / self.ops.max(1) as f64)
    }
}

/// One task awaiting `yield_now()` `ops` times on an aio context, timed inside the task. Returns
/// the ns per yield and the loop's system calls over the run.
///
/// # Panics
///
/// If the task fails.
pub fn aio_yield(ctx: &AioContext, ops: u64) -> (f64, u64) {
    let before = loop_syscalls(ctx);
    let task = ctx.spawn_local(async move {
        let start = Instant::now();
        for _ in 0..ops {
            aio_core::task::yield_now().await;
        }
        start.elapsed()
    });
    let elapsed = ctx.block_on(task).expect("the yielding task failed");
    (ns_per(elapsed, ops), loop_syscalls(ctx) - before)
}

/// Peer of [`aio_yield`]: one task spawned on a `current_thread` runtime awaits
/// `tokio::task::yield_now()` `ops` times, timed inside the task; the ns per yield.
///
/// # Panics
///
/// If the task fails.
pub fn tokio_yield_in_task(rt: &tokio::runtime::Runtime, ops: u64) -> f64 {
    let elapsed = rt
        .block_on(rt.spawn(async move {
            let start = Instant::now();
            for _ in 0..ops {
                tokio::task::yield_now().await;
            }
            start.elapsed()
        }))
        .expect("the yielding task failed");
    ns_per(elapsed, ops)
}

/// `elapsed` in ns per one of `ops` operations.
fn ns_per(elapsed: Duration, ops: u64) -> f64 {
    elapsed.as_nanos() as f64 / ops.max(1) as f64
}

// ---------------------------------------------------------------------------------------------
// Remote wake into a busy loop, cross-context ping-pong
// ---------------------------------------------------------------------------------------------

/// Which runtime hosts the tasks of [`remote_wake`] or [`ping_pong`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// aio contexts (the poll backend, as B1/B2/B4), one per thread, tasks from `spawn_local`.
    Aio,
    /// tokio `current_thread` runtimes, one per thread, tasks from `tokio::spawn`.
    TokioCurrentThread,
    /// One tokio `multi_thread` runtime hosting every task: one worker in [`remote_wake`] (the
    /// busy loop's thread), two in [`ping_pong`].
    TokioMultiThread,
    /// [`ping_pong`] only: both tasks on one aio context, on one thread, the like-for-like of
    /// what tokio's `multi_thread` runtime does when it runs both tasks on one worker (a task
    /// woken from a worker goes to that worker's LIFO slot). [`remote_wake`] treats it as
    /// [`Host::Aio`].
    AioOneContext,
}

/// The CPU of the loop (remote wake) or of the first side (ping-pong).
pub const LOOP_CPU: usize = 0;
/// The CPU of the waking thread (remote wake) or of the answering side (ping-pong).
pub const OTHER_CPU: usize = 1;

/// What one run of [`remote_wake`] or [`ping_pong`] measured.
#[derive(Debug, Default, Clone)]
pub struct RoundTrips {
    /// Round-trip times in ns, warm-up excluded.
    pub samples: Vec<u64>,
    /// Round trips made, warm-up included.
    pub round_trips: u64,
    /// aio only: the loops' system calls (backend waits, eventfd writes and drains) over the
    /// run, warm-up included.
    pub syscalls: Option<u64>,
    /// [`ping_pong`] on tokio's `multi_thread` runtime: the runs whose two tasks finished on the
    /// same worker thread, and all its runs.
    pub same_worker: Option<(u64, u64)>,
}

impl RoundTrips {
    /// Adds another run of the same contender.
    pub fn extend(&mut self, run: RoundTrips) {
        self.samples.extend(run.samples);
        self.round_trips += run.round_trips;
        if let Some(s) = run.syscalls {
            *self.syscalls.get_or_insert(0) += s;
        }
        if let Some((same, runs)) = run.same_worker {
            let mine = self.same_worker.get_or_insert((0, 0));
            mine.0 += same;
            mine.1 += runs;
        }
    }

    /// aio only: the loops' system calls per round trip.
    pub fn syscalls_per_round_trip(&self) -> Option<f64> {
        self.syscalls
            .map(|s| s as f64 / self.round_trips.max(1) as f64)
    }

    /// The mean round trip in ns.
    pub fn mean(&self) -> f64 {
        self.samples.iter().sum::<u64>() as f64 / self.samples.len().max(1) as f64
    }
}

/// The tokio `multi_thread` runtime of a [`Host::TokioMultiThread`] row: `workers` workers, all
/// drivers, each worker pinned to `cpu` when given.
fn tokio_multi_thread(workers: usize, cpu: Option<usize>) -> tokio::runtime::Runtime {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(workers).enable_all();
    if let Some(cpu) = cpu {
        // Kept for the thread's life: the guard would restore the old mask.
        b.on_thread_start(move || std::mem::forget(pin_current_thread(cpu)));
    }
    b.build()
        .expect("aio-benches: cannot build a tokio multi_thread runtime")
}

/// Spins until `ack` reaches `target`.
///
/// # Panics
///
/// If `loop_thread` ends first (it panicked), instead of spinning for ever.
fn wait_ack<T>(ack: &AtomicU64, target: u64, loop_thread: &thread::JoinHandle<T>) {
    // Acquire pairs with the answering task's Release.
    while ack.load(Ordering::Acquire) < target {
        if loop_thread.is_finished() {
            panic!("B12: the loop thread ended before it answered");
        }
        std::hint::spin_loop();
    }
}

/// Remote wake into a busy loop: a loop thread (on [`LOOP_CPU`]) runs two tasks, one that
/// yields until told to stop (the loop never sleeps) and one parked on a [`Signal`]; this
/// thread (moved to [`OTHER_CPU`] for the run) `set`s the signal, which wakes the parked task,
/// and spins until the task has stored the value in an atomic. One sample is that round trip;
/// `warm_up` round trips come first, unrecorded, then `measured` recorded ones.
///
/// # Panics
///
/// If a thread or task panics, or the task did not answer each value exactly once.
pub fn remote_wake(host: Host, warm_up: u64, measured: u64) -> RoundTrips {
    let _pin = pin_current_thread(OTHER_CPU);
    let ping = Signal::new();
    let ack = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let task = {
        let (ping, ack) = (ping.clone(), ack.clone());
        async move {
            // Release: the remote thread's Acquire in `wait_ack` sees the answer.
            answer(ping, move |v| ack.store(v, Ordering::Release)).await
        }
    };
    let stop_flag = stop.clone();
    let loop_thread = thread::Builder::new()
        .name("b12-busy-loop".into())
        .spawn(move || -> (u64, Option<u64>) {
            let _pin = (host != Host::TokioMultiThread)
                .then(|| pin_current_thread(LOOP_CPU))
                .flatten();
            match host {
                Host::Aio | Host::AioOneContext => {
                    let ctx = new_context();
                    let before = loop_syscalls(&ctx);
                    let answerer = ctx.spawn_local(task);
                    let busy = ctx.spawn_local(async move {
                        // Relaxed: a stop flag; the answers travel through `ack`.
                        while !stop_flag.load(Ordering::Relaxed) {
                            aio_core::task::yield_now().await;
                        }
                    });
                    let answered = ctx.block_on(async {
                        busy.await.expect("the busy task failed");
                        answerer.await.expect("the answering task failed")
                    });
                    (answered, Some(loop_syscalls(&ctx) - before))
                }
                Host::TokioCurrentThread => {
                    let rt = tokio_runtime();
                    (rt.block_on(busy_tokio(task, stop_flag)), None)
                }
                Host::TokioMultiThread => {
                    let rt = tokio_multi_thread(1, Some(LOOP_CPU));
                    (rt.block_on(busy_tokio(task, stop_flag)), None)
                }
            }
        })
        .expect("B12: cannot spawn the loop thread");

    let mut samples = Vec::with_capacity(measured as usize);
    for i in 1..=warm_up + measured {
        let start = Instant::now();
        ping.set(i);
        wait_ack(&ack, i, &loop_thread);
        let ns = start.elapsed().as_nanos() as u64;
        if i > warm_up {
            samples.push(ns);
        }
    }
    ping.set(STOP);
    // Relaxed: see the busy task.
    stop.store(true, Ordering::Relaxed);
    let (answered, syscalls) = loop_thread.join().expect("the loop thread panicked");
    assert_eq!(
        answered,
        warm_up + measured,
        "a wake-up was lost or doubled"
    );
    RoundTrips {
        samples,
        round_trips: warm_up + measured,
        syscalls,
        same_worker: None,
    }
}

/// The tokio side of [`remote_wake`]: `answerer` and a task that yields until `stop`, both
/// spawned on the current runtime; returns the answerer's count.
async fn busy_tokio(
    answerer: impl Future<Output = u64> + Send + 'static,
    stop: Arc<AtomicBool>,
) -> u64 {
    let answerer = tokio::spawn(answerer);
    let busy = tokio::spawn(async move {
        // Relaxed: a stop flag; the answers travel through `ack`.
        while !stop.load(Ordering::Relaxed) {
            tokio::task::yield_now().await;
        }
    });
    busy.await.expect("the busy task failed");
    answerer.await.expect("the answering task failed")
}

/// The first side's task in [`ping_pong`]: `set`s `ping` to 1, 2, ... and waits each time for
/// `pong` to carry the same value back; returns the recorded round-trip times.
async fn serve(ping: Arc<Signal>, pong: Arc<Signal>, warm_up: u64, measured: u64) -> Vec<u64> {
    let mut samples = Vec::with_capacity(measured as usize);
    for i in 1..=warm_up + measured {
        let start = Instant::now();
        ping.set(i);
        let back = pong.changed(i - 1).await;
        let ns = start.elapsed().as_nanos() as u64;
        assert_eq!(back, i, "the answer is not the value sent");
        if i > warm_up {
            samples.push(ns);
        }
    }
    ping.set(STOP);
    samples
}

/// Cross-context ping-pong: two tasks on two threads hand a counter back and forth through two
/// [`Signal`]s (`ping` from the first to the second, `pong` back). With aio, each thread runs
/// its own context (first side on [`LOOP_CPU`], second on [`OTHER_CPU`]), in `block_on` of its
/// task; with [`Host::TokioCurrentThread`], its own `current_thread` runtime; with
/// [`Host::TokioMultiThread`], both tasks run on one two-worker runtime (not pinned: tokio
/// places the tasks, and may run both on one worker). The loops sleep when idle, so every wake
/// is a cross-thread wake-up of a sleeping loop.
///
/// # Panics
///
/// If a thread or task panics, or a value was lost or answered twice.
pub fn ping_pong(host: Host, warm_up: u64, measured: u64) -> RoundTrips {
    let ping = Signal::new();
    let pong = Signal::new();
    let first = serve(ping.clone(), pong.clone(), warm_up, measured);
    let second = {
        let pong = pong.clone();
        answer(ping, move |v| pong.set(v))
    };
    let (samples, answered, syscalls, same_worker) = match host {
        Host::TokioMultiThread => {
            let rt = tokio_multi_thread(2, None);
            let a = rt.spawn(async move { (first.await, thread::current().id()) });
            let b = rt.spawn(async move { (second.await, thread::current().id()) });
            rt.block_on(async {
                let (samples, a_thread) = a.await.expect("the first task failed");
                let (answered, b_thread) = b.await.expect("the second task failed");
                (
                    samples,
                    answered,
                    None,
                    Some((u64::from(a_thread == b_thread), 1)),
                )
            })
        }
        Host::AioOneContext => {
            let _pin = pin_current_thread(LOOP_CPU);
            let ctx = new_context();
            let before = loop_syscalls(&ctx);
            let b = ctx.spawn_local(second);
            let a = ctx.spawn_local(first);
            let (samples, answered) = ctx.block_on(async {
                let samples = a.await.expect("the first task failed");
                (samples, b.await.expect("the second task failed"))
            });
            (samples, answered, Some(loop_syscalls(&ctx) - before), None)
        }
        Host::Aio | Host::TokioCurrentThread => {
            let other = thread::Builder::new()
                .name("b12-ping-pong".into())
                .spawn(move || -> (u64, Option<u64>) {
                    let _pin = pin_current_thread(OTHER_CPU);
                    on_own_loop(host, second)
                })
                .expect("B12: cannot spawn the second side's thread");
            let _pin = pin_current_thread(LOOP_CPU);
            let (samples, syscalls_a) = on_own_loop(host, first);
            let (answered, syscalls_b) = other.join().expect("the second side panicked");
            let syscalls = syscalls_a.zip(syscalls_b).map(|(a, b)| a + b);
            (samples, answered, syscalls, None)
        }
    };
    assert_eq!(answered, warm_up + measured, "a value was lost or doubled");
    RoundTrips {
        samples,
        round_trips: warm_up + measured,
        syscalls,
        same_worker,
    }
}

/// Runs `task` as a task on a new aio context or `current_thread` runtime on this thread, and
/// returns its output and (aio) the loop's system calls.
fn on_own_loop<T: Send + 'static>(
    host: Host,
    task: impl Future<Output = T> + Send + 'static,
) -> (T, Option<u64>) {
    match host {
        Host::Aio => {
            let ctx = new_context();
            let before = loop_syscalls(&ctx);
            let out = ctx
                .block_on(ctx.spawn_local(task))
                .expect("a ping-pong task failed");
            (out, Some(loop_syscalls(&ctx) - before))
        }
        Host::TokioCurrentThread => {
            let rt = tokio_runtime();
            let out = rt
                .block_on(rt.spawn(task))
                .expect("a ping-pong task failed");
            (out, None)
        }
        Host::TokioMultiThread | Host::AioOneContext => {
            unreachable!("one runtime or context hosts both sides")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CoMutex: QEMU's test-aio-multithread mutex tests as a benchmark
// ---------------------------------------------------------------------------------------------

/// The lock of a [`mutex_run`], each on its own hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// `aio_core::task::CoMutex`, taken by tasks on aio contexts, one context per thread.
    CoMutex,
    /// `tokio::sync::Mutex`, taken by tasks on tokio `current_thread` runtimes, one per thread.
    Tokio,
    /// `parking_lot::Mutex`, taken by tasks on aio contexts: it blocks the whole thread, as
    /// QEMU's pthread baseline does (`/aio/multi/mutex/pthread`).
    ParkingLot,
}

/// What one [`mutex_run`] counted.
#[derive(Debug, Clone, Copy)]
pub struct MutexRun {
    /// Increments of the counter inside the lock, by all tasks.
    pub iterations: u64,
    /// From the start signal until every thread had finished.
    pub elapsed: Duration,
}

impl MutexRun {
    /// Lock-protected increments per second (QEMU prints "%d iterations/second").
    pub fn per_second(&self) -> f64 {
        self.iterations as f64 / self.elapsed.as_secs_f64()
    }
}

/// QEMU's `test_multi_co_mutex` shape (`/aio/multi/mutex/contended` with 5 threads, `handoff`
/// with 2): `threads` threads, each with its own context (or runtime) running one task that,
/// until told to stop, locks the shared mutex, adds 1 to the counter inside it, unlocks, and
/// then adds 1 to an atomic counter (after unlocking, as QEMU does). Runs for `duration`.
///
/// # Panics
///
/// If an increment inside the lock was lost (the counter differs from the atomic one), or a
/// thread or task panics.
pub fn mutex_run(kind: LockKind, threads: usize, duration: Duration) -> MutexRun {
    let stop = Arc::new(AtomicBool::new(false));
    let outside = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(threads + 1));
    let co = Arc::new(aio_core::task::CoMutex::new(0u64));
    let tk = Arc::new(tokio::sync::Mutex::new(0u64));
    let pl = Arc::new(parking_lot::Mutex::new(0u64));
    let workers: Vec<thread::JoinHandle<()>> = (0..threads)
        .map(|i| {
            let (stop, outside, start) = (stop.clone(), outside.clone(), start.clone());
            let (co, tk, pl) = (co.clone(), tk.clone(), pl.clone());
            thread::Builder::new()
                .name(format!("b12-mutex-{i}"))
                .spawn(move || {
                    // Relaxed: the stop flag orders nothing; the counters are checked after
                    // the threads are joined.
                    let running = move || !stop.load(Ordering::Relaxed);
                    let count = move || outside.fetch_add(1, Ordering::Relaxed);
                    match kind {
                        LockKind::CoMutex | LockKind::ParkingLot => {
                            let ctx = new_context();
                            let task = if kind == LockKind::CoMutex {
                                ctx.spawn_local(async move {
                                    while running() {
                                        *co.lock().await += 1;
                                        count();
                                    }
                                })
                            } else {
                                ctx.spawn_local(async move {
                                    while running() {
                                        *pl.lock() += 1;
                                        count();
                                    }
                                })
                            };
                            start.wait();
                            ctx.block_on(task).expect("a mutex task failed");
                        }
                        LockKind::Tokio => {
                            let rt = tokio_runtime();
                            let task = rt.spawn(async move {
                                while running() {
                                    *tk.lock().await += 1;
                                    count();
                                }
                            });
                            start.wait();
                            rt.block_on(task).expect("a mutex task failed");
                        }
                    }
                })
                .expect("B12: cannot spawn a mutex thread")
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("a mutex thread panicked");
    }
    let elapsed = t0.elapsed();
    let iterations = match kind {
        LockKind::CoMutex => *co.try_lock().expect("the CoMutex is still locked"),
        LockKind::Tokio => *tk.try_lock().expect("the tokio Mutex is still locked"),
        LockKind::ParkingLot => *pl.lock(),
    };
    assert_eq!(
        iterations,
        outside.load(Ordering::Relaxed),
        "{kind:?}: an increment inside the lock was lost"
    );
    MutexRun {
        iterations,
        elapsed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `set` before the first poll completes the wait at once; one after it wakes the task.
    #[test]
    fn signal_wakes_its_waiter_on_both_runtimes() {
        let ctx = new_context();
        let s = Signal::new();
        s.set(3);
        assert_eq!(ctx.block_on(s.changed(0)), 3);
        let s2 = s.clone();
        let setter = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            s2.set(4);
        });
        assert_eq!(ctx.block_on(s.changed(3)), 4);
        setter.join().unwrap();

        let rt = tokio_runtime();
        let s2 = s.clone();
        let setter = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            s2.set(5);
        });
        assert_eq!(rt.block_on(s.changed(4)), 5);
        setter.join().unwrap();
    }

    #[test]
    fn every_contender_answers_every_value() {
        for host in [
            Host::Aio,
            Host::TokioCurrentThread,
            Host::TokioMultiThread,
            Host::AioOneContext,
        ] {
            let r = remote_wake(host, 3, 20);
            assert_eq!((r.samples.len(), r.round_trips), (20, 23), "{host:?}");
            let r = ping_pong(host, 3, 20);
            assert_eq!((r.samples.len(), r.round_trips), (20, 23), "{host:?}");
            let aio = matches!(host, Host::Aio | Host::AioOneContext);
            assert_eq!(r.syscalls.is_some(), aio, "{host:?}");
            assert_eq!(
                r.same_worker.map(|(_, runs)| runs),
                (host == Host::TokioMultiThread).then_some(1)
            );
        }
    }

    #[test]
    fn every_lock_counts_every_iteration() {
        for kind in [LockKind::CoMutex, LockKind::Tokio, LockKind::ParkingLot] {
            for threads in [2, 5] {
                let r = mutex_run(kind, threads, Duration::from_millis(20));
                assert!(
                    r.iterations > 0,
                    "{kind:?} on {threads} threads made no progress"
                );
            }
        }
    }

    #[test]
    fn yield_rows_yield() {
        let ctx = new_context();
        let (ns, _) = aio_yield(&ctx, 10);
        assert!(ns > 0.0);
        assert!(tokio_yield_in_task(&tokio_runtime(), 10) > 0.0);
    }

    #[test]
    fn spawn_rows_run_whole_batches() {
        for spawner in [
            Spawner::AioLocal,
            Spawner::AioSend,
            Spawner::Tokio,
            Spawner::TokioLocal,
        ] {
            let mut s = Spawn::new(spawner, 7);
            s.run(10);
            assert_eq!(s.ops, 14, "{spawner:?}");
        }
    }
}
