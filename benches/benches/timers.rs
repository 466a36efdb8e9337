//! B7 (docs/benchmarks.md): timers with N = 0, 1 000, 100 000 and 1 000 000 already pending. The
//! `timers` crate next to tokio's `sleep` (registered and dropped in a `current_thread` runtime)
//! and async-io's `Timer`, in the same criterion groups, so the report shows them side by side.
//! Workloads: `aio_benches::timer_load`.

use std::time::Duration;

use aio_benches::timer_load::{
    AsyncIoArm, FIRE_BATCH, OursArm, OursFire, PENDING, TokioArm, TokioFire,
};
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput, measurement::WallTime};

/// Short runs: the whole B7 must stay within about two minutes, and setting up a million
/// pending timers per implementation already takes seconds.
fn configure(g: &mut BenchmarkGroup<'_, WallTime>) {
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(800));
}

/// Arm, re-arm, cancel and next-deadline at each N. One group per N so that each pending set is
/// built once and every implementation is measured against the same N:
/// - `arm_cancel/aio`: arm an existing timer at a random deadline, then cancel it;
/// - `create_arm_drop/aio`: create a timer, arm it, drop it (the whole lifecycle);
/// - `register_drop/tokio`: `sleep(d)`, poll once (registers), drop (deregisters), on a
///   runtime with only the time driver and a no-op waker: tokio's floor;
/// - `register_drop/tokio_io_task`: the same inside `block_on` on an `enable_all` runtime, boxed,
///   with the task's waker: the shape of the 620–690 ns reference anchor, where each
///   registration also wakes tokio's I/O driver (an eventfd write);
/// - `register_drop/async_io`: `Timer::after(d)`, poll once, drop;
/// - `rearm/aio`, `reset/tokio`, `set_after/async_io`: move an armed timer to a new deadline;
/// - `next_deadline/aio`: `group.deadline()`, as the loop asks every iteration.
fn b7_arm(c: &mut Criterion) {
    for n in PENDING {
        let mut g = c.benchmark_group(format!("B7_timers_{n}_pending"));
        configure(&mut g);
        g.throughput(Throughput::Elements(1));
        let mut ours = OursArm::new(n);
        g.bench_function(BenchmarkId::new("arm_cancel", "aio"), |b| {
            b.iter_custom(|iters| ours.arm_cancel(iters))
        });
        g.bench_function(BenchmarkId::new("create_arm_drop", "aio"), |b| {
            b.iter_custom(|iters| ours.create_arm_drop(iters))
        });
        g.bench_function(BenchmarkId::new("rearm", "aio"), |b| {
            b.iter_custom(|iters| ours.rearm(iters))
        });
        g.bench_function(BenchmarkId::new("next_deadline", "aio"), |b| {
            b.iter_custom(|iters| ours.next_deadline(iters))
        });
        drop(ours);

        let mut tokio = TokioArm::new(n, false);
        g.bench_function(BenchmarkId::new("register_drop", "tokio"), |b| {
            b.iter_custom(|iters| tokio.register_drop(iters))
        });
        g.bench_function(BenchmarkId::new("reset", "tokio"), |b| {
            b.iter_custom(|iters| tokio.reset(iters))
        });
        drop(tokio);

        let mut tokio_io = TokioArm::new(n, true);
        g.bench_function(BenchmarkId::new("register_drop", "tokio_io_task"), |b| {
            b.iter_custom(|iters| tokio_io.register_drop_in_task(iters))
        });
        drop(tokio_io);

        let mut async_io = AsyncIoArm::new(n);
        g.bench_function(BenchmarkId::new("register_drop", "async_io"), |b| {
            b.iter_custom(|iters| async_io.register_drop(iters))
        });
        g.bench_function(BenchmarkId::new("set_after", "async_io"), |b| {
            b.iter_custom(|iters| async_io.set_after(iters))
        });
        drop(async_io);
        g.finish();
    }
}

/// Fire throughput at each N, per timer, in batches of [`FIRE_BATCH`]:
/// - `arm_fire/aio`: arm the batch due now on a stopped virtual clock, one `run_expired`;
/// - `advance_fire/tokio`: reset the batch 1 ms ahead, advance tokio's paused clock 1 ms, poll
///   each sleep to completion.
///
/// Runs after every other tokio benchmark: a paused tokio clock slows tokio's `Instant::now()`
/// for the rest of the process.
fn b7_fire(c: &mut Criterion) {
    for n in PENDING {
        let mut g = c.benchmark_group(format!("B7_timers_fire_{n}_pending"));
        configure(&mut g);
        g.throughput(Throughput::Elements(FIRE_BATCH as u64));
        let mut ours = OursFire::new(n);
        g.bench_function(BenchmarkId::new("arm_fire", "aio"), |b| {
            b.iter_custom(|iters| ours.arm_fire(iters))
        });
        drop(ours);
        let mut tokio = TokioFire::new(n);
        g.bench_function(BenchmarkId::new("advance_fire", "tokio"), |b| {
            b.iter_custom(|iters| tokio.advance_fire(iters))
        });
        drop(tokio);
        g.finish();
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    b7_arm(&mut c);
    b7_fire(&mut c);
    c.final_summary();
}
