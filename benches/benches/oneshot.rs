//! B2 (docs/benchmarks.md): one-shot bottom halves (allocate, run, free), aio next to tokio
//! `spawn` + await of an empty task in the same criterion group.

use std::time::Duration;

use aio_benches::{AioOneshot, TokioSpawnBatch};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// How many one-shots (or tasks) one iteration creates and finishes.
const N: u64 = 1000;

/// B2: `ctx.schedule_oneshot(..)` × 1000, then `poll_nonblocking` until all 1000 ran (checked
/// with a counter each iteration); per element. Peer: tokio `spawn(async {})` × 1000, then every
/// `JoinHandle` awaited.
fn b2_oneshot(c: &mut Criterion) {
    let mut g = c.benchmark_group("B2_oneshot_x1000");
    g.throughput(Throughput::Elements(N));
    let mut ours = AioOneshot::new(N);
    g.bench_function("aio/schedule_oneshot", |b| {
        b.iter_custom(|iters| ours.run(iters))
    });
    let mut peer = TokioSpawnBatch::new(N);
    g.bench_function("tokio/spawn_await", |b| {
        b.iter_custom(|iters| peer.run(iters))
    });
    g.finish();
    println!(
        "B2_oneshot_x1000: aio loop syscalls/one-shot = {:.6}",
        ours.syscalls_per_op()
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = b2_oneshot
}
criterion_main!(benches);
