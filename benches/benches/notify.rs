//! B4 (DESIGN.md §8): `notify` from another thread while the target loop is busy, aio next to
//! tokio's remote `Handle::spawn` onto a busy `current_thread` runtime, in one criterion group.

use std::time::Duration;

use aio_benches::{AioBusyLoop, TokioBusyLoop, pin_current_thread};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// B4: a loop thread (cpu0) spins `poll_nonblocking` and never blocks; this thread (cpu1) calls
/// `handle.notify()` `iters` times. Prints the eventfd writes per notify (expected 0) and the
/// busy loop's backend waits per iteration. Peer: `Handle::spawn(async {})` from this thread
/// onto a runtime busy in `block_on` of a `yield_now` loop, ns per remote spawn call.
fn b4_notify_busy(c: &mut Criterion) {
    let mut g = c.benchmark_group("B4_notify_busy_loop");
    g.throughput(Throughput::Elements(1));
    let pin = pin_current_thread(1);

    let mut ours = AioBusyLoop::start(Some(0));
    g.bench_function("aio/notify", |b| b.iter_custom(|iters| ours.notify(iters)));
    let r = ours.stop();
    println!(
        "B4_notify_busy_loop/aio: {} notifies, eventfd writes/notify = {:.6}, \
         loop syscalls/notify = {:.6}, busy-loop waits/iteration = {:.6} ({} iterations)",
        r.ops,
        r.event_writes_per_op(),
        r.syscalls_per_op(),
        r.waits_per_loop_iteration(),
        r.loop_iterations
    );

    let mut peer = TokioBusyLoop::start(Some(0));
    g.bench_function("tokio/remote_spawn", |b| {
        b.iter_custom(|iters| peer.spawn(iters))
    });
    let r = peer.stop();
    println!(
        "B4_notify_busy_loop/tokio: {} remote spawns, {} busy-loop yields",
        r.ops, r.loop_iterations
    );

    drop(pin);
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = b4_notify_busy
}
criterion_main!(benches);
