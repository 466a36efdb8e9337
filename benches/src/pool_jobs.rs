//! B8 (docs/benchmarks.md) workloads: the thread pool's submit → completion in the submitting context,
//! aio's `ThreadPool` next to tokio's `spawn_blocking` on a `current_thread` runtime. Shared by
//! the criterion bench and its summary (`benches/threadpool.rs`) and by the polling bench
//! (`benches/polling.rs`), which measures the same latency with the context's adaptive polling
//! on.
//!
//! * [`Aio`]: a context on the calling thread, its pool (`min = max = 64`, QEMU's
//!   `thread-pool-min`, so that no thread is created on the hot path), and a second submitter
//!   thread whose completions also run on the context's thread;
//! * [`Tokio`]: a `current_thread` runtime (its blocking pool runs `spawn_blocking`, with
//!   tokio's defaults: up to 512 threads, 10 s keep-alive) and a second submitter thread;
//! * [`Job`]: a no-op, or 10 µs of spinning (sleeping would measure timer slack instead).

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use aio::{AioContext, ContextHandle, PollParams};
use threadpool::{DEFAULT_MAX_THREADS, PoolHandle, ThreadPool};

use crate::new_polling_context;

/// Requests per batch in the throughput runs.
pub const BATCH: usize = 1000;

/// What a pool job does.
#[derive(Clone, Copy, Debug)]
pub enum Job {
    /// Nothing.
    Noop,
    /// Spins on `Instant` for 10 µs.
    Spin10us,
}

impl Job {
    /// Every job, in table order.
    pub const ALL: [Job; 2] = [Job::Noop, Job::Spin10us];

    /// The job's name in benchmark ids and tables.
    pub fn name(self) -> &'static str {
        match self {
            Job::Noop => "noop",
            Job::Spin10us => "10us",
        }
    }

    /// Runs the job (on a pool thread).
    pub fn run(self) {
        match self {
            Job::Noop => {}
            Job::Spin10us => {
                let start = Instant::now();
                while start.elapsed() < Duration::from_micros(10) {
                    std::hint::spin_loop();
                }
            }
        }
    }
}

/// Our side: a context on this thread, its pool, and a second submitter thread.
#[derive(Debug)]
pub struct Aio {
    ctx: AioContext,
    pool: Rc<ThreadPool>,
    helper: Helper,
}

impl Aio {
    /// A context on the poll backend with the polling parameters `poll`
    /// ([`PollParams::disabled`] for the plain B8 rows), its pool with 64 threads kept, and the
    /// second submitter.
    ///
    /// # Panics
    ///
    /// If the context cannot be created.
    pub fn new(poll: PollParams) -> Aio {
        let ctx = new_polling_context(poll);
        let pool = ThreadPool::of(&ctx);
        // QEMU's answer to thread creation on the hot path (thread-pool-min): keep the threads.
        // With the default minimum of 0, threads idle for 10 s exit and are created again by a
        // later burst (see "threads created in total" at the end of a run without this line).
        pool.set_limits(DEFAULT_MAX_THREADS, DEFAULT_MAX_THREADS)
            .expect("B8: valid limits");
        let helper = Helper::aio(pool.handle(), ctx.handle());
        Aio { ctx, pool, helper }
    }

    /// The context whose thread submits and runs the completions.
    pub fn context(&self) -> &AioContext {
        &self.ctx
    }

    /// One request in flight: submits `job` and polls (blocking) until its completion ran.
    pub fn round_trip(&self, job: Job) {
        let done = Rc::new(Cell::new(false));
        let d = done.clone();
        self.pool
            .submit_with(move || job.run(), move |_| d.set(true));
        while !done.get() {
            self.ctx.poll();
        }
    }

    fn submit_batch(&self, job: Job, left: &Rc<Cell<usize>>) {
        left.set(left.get() + BATCH);
        for _ in 0..BATCH {
            let l = left.clone();
            self.pool
                .submit_with(move || job.run(), move |_| l.set(l.get() - 1));
        }
    }

    /// [`BATCH`] requests from this thread; polls until all completions ran.
    pub fn batch(&self, job: Job) {
        let left = Rc::new(Cell::new(0));
        self.submit_batch(job, &left);
        while left.get() > 0 {
            self.ctx.poll();
        }
    }

    /// [`BATCH`] requests from this thread and as many from the helper thread; polls until all
    /// completions ran.
    pub fn batch2(&self, job: Job) {
        self.helper.start(job);
        let left = Rc::new(Cell::new(0));
        self.submit_batch(job, &left);
        while left.get() > 0 || !self.helper.is_done() {
            self.ctx.poll();
        }
    }

    /// Threads the pool has created so far.
    pub fn threads_created(&self) -> u64 {
        self.pool.stats().threads_created
    }
}

/// tokio's side: a `current_thread` runtime (its blocking pool runs `spawn_blocking`) and a
/// second submitter thread.
#[derive(Debug)]
pub struct Tokio {
    rt: tokio::runtime::Runtime,
    started: Arc<AtomicU64>,
    helper: Helper,
}

impl Tokio {
    /// The runtime (`enable_all`), counting the threads it starts, and the second submitter.
    ///
    /// # Panics
    ///
    /// If the runtime cannot be built.
    pub fn new() -> Tokio {
        let started = Arc::new(AtomicU64::new(0));
        let s = started.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_start(move || {
                s.fetch_add(1, Ordering::Relaxed);
            })
            .build()
            .expect("B8: cannot build a tokio runtime");
        let helper = Helper::tokio(rt.handle().clone());
        Tokio {
            rt,
            started,
            helper,
        }
    }

    /// One request in flight: `block_on` of one `spawn_blocking(job)`.
    pub fn round_trip(&self, job: Job) {
        self.rt
            .block_on(async { tokio::task::spawn_blocking(move || job.run()).await })
            .unwrap();
    }

    /// [`BATCH`] requests from this thread.
    pub fn batch(&self, job: Job) {
        self.rt.block_on(tokio_batch(job));
    }

    /// [`BATCH`] requests from this thread and as many from the helper thread.
    pub fn batch2(&self, job: Job) {
        self.helper.start(job);
        self.rt.block_on(tokio_batch(job));
        self.helper.wait_done();
    }

    /// Threads the runtime has started so far (its blocking pool's included).
    pub fn threads_created(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }
}

impl Default for Tokio {
    fn default() -> Self {
        Self::new()
    }
}

async fn tokio_batch(job: Job) {
    let handles: Vec<_> = (0..BATCH)
        .map(|_| tokio::task::spawn_blocking(move || job.run()))
        .collect();
    for h in handles {
        h.await.unwrap();
    }
}

/// The second submitter: a thread that submits one batch per `start` and reports when done.
#[derive(Debug)]
struct Helper {
    go: mpsc::Sender<Job>,
    done: Arc<AtomicBool>,
    finished: mpsc::Receiver<()>,
}

impl Helper {
    /// Submits through `handle`; the completions run on the context's thread, and the last one
    /// wakes it (`done` is read there).
    fn aio(handle: PoolHandle, ctx: ContextHandle) -> Helper {
        let (go, jobs) = mpsc::channel::<Job>();
        let (_finished_tx, finished) = mpsc::channel();
        let done = Arc::new(AtomicBool::new(true));
        let d = done.clone();
        thread::spawn(move || {
            for job in jobs {
                let left = Arc::new(AtomicU64::new(BATCH as u64));
                for _ in 0..BATCH {
                    let (l, d, ctx) = (left.clone(), d.clone(), ctx.clone());
                    let _ = handle.submit_with(
                        move || job.run(),
                        move |_| {
                            if l.fetch_sub(1, Ordering::Relaxed) == 1 {
                                d.store(true, Ordering::Release);
                                ctx.notify();
                            }
                        },
                    );
                }
            }
        });
        Helper { go, done, finished }
    }

    /// Runs its batch in `Handle::block_on` and reports on `finished`.
    fn tokio(rt: tokio::runtime::Handle) -> Helper {
        let (go, jobs) = mpsc::channel::<Job>();
        let (finished_tx, finished) = mpsc::channel();
        thread::spawn(move || {
            for job in jobs {
                rt.block_on(tokio_batch(job));
                if finished_tx.send(()).is_err() {
                    break;
                }
            }
        });
        Helper {
            go,
            done: Arc::new(AtomicBool::new(true)),
            finished,
        }
    }

    fn start(&self, job: Job) {
        self.done.store(false, Ordering::Relaxed);
        self.go.send(job).expect("B8: helper thread gone");
    }

    fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    fn wait_done(&self) {
        self.finished.recv().expect("B8: helper thread gone");
    }
}

/// Runs `f` `iters` times and returns the total time.
pub fn time(iters: u64, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    start.elapsed()
}

/// The time of each of `n` calls of `f`.
pub fn latency(mut f: impl FnMut(), n: usize) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect()
}
