//! B8 (DESIGN.md §8): thread pool submit → completion delivered on the submitting context, aio
//! next to tokio `spawn_blocking` on a `current_thread` runtime, in one process.
//!
//! * latency: one request in flight, submit → completion callback (aio) or `JoinHandle` ready
//!   (tokio) on the submitting thread;
//! * throughput: batches of 1 000 requests, by one submitter, and by two (the context's thread
//!   plus another thread submitting through a `PoolHandle`, whose completions also run on the
//!   context's thread; for tokio, two threads each `block_on` their own batch);
//! * jobs: a no-op, and 10 µs of spinning (sleeping would measure timer slack instead).
//!
//! Criterion measures all of it; then a plain-`Instant` summary prints p50/p99 latency, ns per
//! job in batches, the aio/tokio ratios, and how many threads each pool created during the
//! measured runs, after a warm-up that lasts until neither pool creates threads any more (aio:
//! `PoolStats::threads_created`; tokio: its `on_thread_start` hook, which blocking-pool threads
//! also call). The aio pool runs with `min = max = 64` (QEMU's `thread-pool-min`, the way to
//! keep thread creation off the hot path); tokio keeps its defaults (up to 512 threads, 10 s
//! keep-alive). The totals printed at the end count every thread created over the whole run. It also prints what creating
//! (and joining) one thread costs here. Nothing is pinned: workers inherit their creator's
//! affinity (aio creates them from the context's thread, as QEMU does).
//!
//! Without `--bench` (as under `cargo test --benches`), everything runs once, briefly.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use aio::{AioContext, ContextHandle};
use aio_benches::new_context;
use criterion::{BenchmarkId, Criterion, Throughput};
use threadpool::{DEFAULT_MAX_THREADS, PoolHandle, ThreadPool};

/// Requests per batch in the throughput runs.
const BATCH: usize = 1000;

#[derive(Clone, Copy, Debug)]
enum Job {
    Noop,
    Spin10us,
}

impl Job {
    const ALL: [Job; 2] = [Job::Noop, Job::Spin10us];

    fn name(self) -> &'static str {
        match self {
            Job::Noop => "noop",
            Job::Spin10us => "10us",
        }
    }

    fn run(self) {
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
struct Aio {
    ctx: AioContext,
    pool: Rc<ThreadPool>,
    helper: Helper,
}

impl Aio {
    fn new() -> Aio {
        let ctx = new_context();
        let pool = ThreadPool::of(&ctx);
        // QEMU's answer to thread creation on the hot path (thread-pool-min): keep the threads.
        // With the default minimum of 0, threads idle for 10 s exit and are created again by a
        // later burst (see "threads created in total" at the end of a run without this line).
        pool.set_limits(DEFAULT_MAX_THREADS, DEFAULT_MAX_THREADS)
            .expect("B8: valid limits");
        let helper = Helper::aio(pool.handle(), ctx.handle());
        Aio { ctx, pool, helper }
    }

    fn round_trip(&self, job: Job) {
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

    fn batch(&self, job: Job) {
        let left = Rc::new(Cell::new(0));
        self.submit_batch(job, &left);
        while left.get() > 0 {
            self.ctx.poll();
        }
    }

    fn batch2(&self, job: Job) {
        self.helper.start(job);
        let left = Rc::new(Cell::new(0));
        self.submit_batch(job, &left);
        while left.get() > 0 || !self.helper.is_done() {
            self.ctx.poll();
        }
    }

    fn threads_created(&self) -> u64 {
        self.pool.stats().threads_created
    }
}

/// tokio's side: a `current_thread` runtime (its blocking pool runs `spawn_blocking`) and a
/// second submitter thread.
struct Tokio {
    rt: tokio::runtime::Runtime,
    started: Arc<AtomicU64>,
    helper: Helper,
}

impl Tokio {
    fn new() -> Tokio {
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

    fn round_trip(&self, job: Job) {
        self.rt
            .block_on(async { tokio::task::spawn_blocking(move || job.run()).await })
            .unwrap();
    }

    fn batch(&self, job: Job) {
        self.rt.block_on(tokio_batch(job));
    }

    fn batch2(&self, job: Job) {
        self.helper.start(job);
        self.rt.block_on(tokio_batch(job));
        self.helper.wait_done();
    }

    fn threads_created(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
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

fn time(iters: u64, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    start.elapsed()
}

fn criterion_benches(c: &mut Criterion, aio: &Aio, tokio: &Tokio) {
    let mut g = c.benchmark_group("B8_threadpool_latency");
    g.throughput(Throughput::Elements(1));
    for job in Job::ALL {
        g.bench_function(BenchmarkId::new("aio/submit_with", job.name()), |b| {
            b.iter_custom(|iters| time(iters, || aio.round_trip(job)))
        });
        g.bench_function(BenchmarkId::new("tokio/spawn_blocking", job.name()), |b| {
            b.iter_custom(|iters| time(iters, || tokio.round_trip(job)))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("B8_threadpool_batch1000_1_submitter");
    g.throughput(Throughput::Elements(BATCH as u64));
    for job in Job::ALL {
        g.bench_function(BenchmarkId::new("aio/submit_with", job.name()), |b| {
            b.iter_custom(|iters| time(iters, || aio.batch(job)))
        });
        g.bench_function(BenchmarkId::new("tokio/spawn_blocking", job.name()), |b| {
            b.iter_custom(|iters| time(iters, || tokio.batch(job)))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("B8_threadpool_batch1000_2_submitters");
    g.throughput(Throughput::Elements(2 * BATCH as u64));
    for job in Job::ALL {
        g.bench_function(BenchmarkId::new("aio/submit_with", job.name()), |b| {
            b.iter_custom(|iters| time(iters, || aio.batch2(job)))
        });
        g.bench_function(BenchmarkId::new("tokio/spawn_blocking", job.name()), |b| {
            b.iter_custom(|iters| time(iters, || tokio.batch2(job)))
        });
    }
    g.finish();
}

/// Sizes of the plain-`Instant` summary.
struct Plan {
    latency_samples: usize,
    /// Most warm-up batches per throughput row.
    warm_up_max: usize,
    batches: usize,
    rounds: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn latency(mut f: impl FnMut(), n: usize) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect()
}

fn summary(aio: &Aio, tokio: &Tokio, plan: &Plan) {
    println!("\n## B8 summary (aio thread pool vs tokio spawn_blocking, same process)\n");
    let cost: Vec<Duration> = latency(
        || thread::spawn(|| ()).join().unwrap(),
        plan.latency_samples.min(200),
    );
    let mut cost = cost;
    cost.sort();
    println!(
        "thread create + join: p50 {:.1} µs\n",
        percentile(&cost, 0.5).as_nanos() as f64 / 1e3
    );

    println!(
        "| latency, 1 in flight | aio p50 | aio p99 | tokio p50 | tokio p99 | p50 tokio/aio |"
    );
    println!("|---|---|---|---|---|---|");
    for job in Job::ALL {
        // Interleave in rounds so that both see the same machine weather.
        let (mut ours, mut peer) = (Vec::new(), Vec::new());
        for _ in 0..plan.rounds {
            ours.extend(latency(|| aio.round_trip(job), plan.latency_samples));
            peer.extend(latency(|| tokio.round_trip(job), plan.latency_samples));
        }
        ours.sort();
        peer.sort();
        let us = |d: Duration| d.as_nanos() as f64 / 1e3;
        println!(
            "| {} | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs | {:.2}× |",
            job.name(),
            us(percentile(&ours, 0.5)),
            us(percentile(&ours, 0.99)),
            us(percentile(&peer, 0.5)),
            us(percentile(&peer, 0.99)),
            us(percentile(&peer, 0.5)) / us(percentile(&ours, 0.5)),
        );
    }

    println!(
        "\n| throughput, batches of {BATCH} | aio ns/job | tokio ns/job | tokio/aio | \
         aio threads created | tokio threads created |"
    );
    println!("|---|---|---|---|---|---|");
    for submitters in [1, 2] {
        for job in Job::ALL {
            let jobs = (submitters * BATCH * plan.batches) as f64;
            let run_aio = || {
                if submitters == 1 {
                    aio.batch(job)
                } else {
                    aio.batch2(job)
                }
            };
            let run_tokio = || {
                if submitters == 1 {
                    tokio.batch(job)
                } else {
                    tokio.batch2(job)
                }
            };
            // Warm up until neither pool has created a thread for three batches in a row (a
            // pool creates threads one after the other, which can outlast a batch, and idle
            // ones exit after 10 s), then count the threads created during the measured runs.
            let mut quiet = 0;
            for _ in 0..plan.warm_up_max {
                let (a, t) = (aio.threads_created(), tokio.threads_created());
                run_aio();
                run_tokio();
                let unchanged = (a, t) == (aio.threads_created(), tokio.threads_created());
                quiet = if unchanged { quiet + 1 } else { 0 };
                if quiet == 3 {
                    break;
                }
            }
            let (a0, t0) = (aio.threads_created(), tokio.threads_created());
            let (mut ours, mut peer) = (Vec::new(), Vec::new());
            for _ in 0..plan.rounds {
                ours.push(time(plan.batches as u64, run_aio).as_nanos() as f64 / jobs);
                peer.push(time(plan.batches as u64, run_tokio).as_nanos() as f64 / jobs);
            }
            ours.sort_by(f64::total_cmp);
            peer.sort_by(f64::total_cmp);
            let (o, p) = (ours[ours.len() / 2], peer[peer.len() / 2]);
            println!(
                "| {} submitter(s), {} | {:.0} | {:.0} | {:.2}× | {} | {} |",
                submitters,
                job.name(),
                o,
                p,
                p / o,
                aio.threads_created() - a0,
                tokio.threads_created() - t0,
            );
        }
    }
    println!(
        "\nthreads created in total: aio {}, tokio {}",
        aio.threads_created(),
        tokio.threads_created()
    );
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let aio = Aio::new();
    let tokio = Tokio::new();
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        .configure_from_args();
    criterion_benches(&mut c, &aio, &tokio);
    c.final_summary();
    let plan = if bench {
        Plan {
            latency_samples: 500,
            warm_up_max: 50,
            batches: 10,
            rounds: 5,
        }
    } else {
        Plan {
            latency_samples: 5,
            warm_up_max: 1,
            batches: 1,
            rounds: 1,
        }
    };
    summary(&aio, &tokio, &plan);
}
