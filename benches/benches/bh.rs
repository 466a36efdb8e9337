//! B1 (docs/benchmarks.md): bottom-half schedule + dispatch on the home thread, aio next to tokio
//! `current_thread` in the same criterion group, so the report shows them side by side.

use std::time::Duration;

use aio_benches::{AioBhBatch, TokioSpawnBatch, tokio_runtime, tokio_yield};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// B1: one BH, created once; each iteration is `bh.schedule(); ctx.poll_nonblocking();`. Peer:
/// tokio `yield_now().await` (self-wake + re-poll), `iters` of them in one `block_on`.
fn b1_schedule_dispatch(c: &mut Criterion) {
    let mut g = c.benchmark_group("B1_bh_schedule_dispatch");
    g.throughput(Throughput::Elements(1));
    let mut ours = AioBhBatch::new(1);
    g.bench_function("aio/schedule+poll_nonblocking", |b| {
        b.iter_custom(|iters| ours.run(iters))
    });
    let rt = tokio_runtime();
    g.bench_function("tokio/yield_now", |b| {
        b.iter_custom(|iters| tokio_yield(&rt, iters))
    });
    g.finish();
    println!(
        "B1_bh_schedule_dispatch: aio loop syscalls/op = {:.6}",
        ours.syscalls_per_op()
    );
}

/// B1 batch: K = 1, 16, 256 distinct BHs scheduled, then one `poll_nonblocking` runs them all;
/// time per BH through `Throughput::Elements(K)`. Peer: K × tokio `spawn(async {})`, then every
/// `JoinHandle` awaited.
fn b1_batch(c: &mut Criterion) {
    let mut g = c.benchmark_group("B1_bh_batch");
    for k in [1u64, 16, 256] {
        g.throughput(Throughput::Elements(k));
        let mut ours = AioBhBatch::new(k as usize);
        g.bench_function(BenchmarkId::new("aio", k), |b| {
            b.iter_custom(|iters| ours.run(iters))
        });
        let mut peer = TokioSpawnBatch::new(k);
        g.bench_function(BenchmarkId::new("tokio_spawn_await", k), |b| {
            b.iter_custom(|iters| peer.run(iters))
        });
        println!(
            "B1_bh_batch/{k}: aio loop syscalls/BH = {:.6}",
            ours.syscalls_per_op()
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = b1_schedule_dispatch, b1_batch
}
criterion_main!(benches);
