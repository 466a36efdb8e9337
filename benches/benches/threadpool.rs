//! B8 (docs/benchmarks.md): thread pool submit → completion delivered on the submitting context, aio
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
//! The workloads live in `aio_benches::pool_jobs`, shared with the polling bench (`benches/polling.rs`).
//!
//! Without `--bench` (as under `cargo test --benches`), everything runs once, briefly.

use std::thread;
use std::time::Duration;

use aio::PollParams;
use aio_benches::percentile;
use aio_benches::pool_jobs::{Aio, BATCH, Job, Tokio, latency, time};
use criterion::{BenchmarkId, Criterion, Throughput};

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
    let aio = Aio::new(PollParams::disabled());
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
