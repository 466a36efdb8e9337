//! B4 (docs/benchmarks.md): another thread reaches a loop that is busy (it never blocks), aio next to
//! tokio `current_thread`, one criterion group per comparison. The loop thread is pinned to cpu0
//! and this (remote) thread to cpu1.
//!
//! - `B4_notify_busy_loop`: aio `notify` (queues no work) against tokio's remote `Handle::spawn`
//!   (allocates and queues a task): the historical row, not like for like.
//! - `B4_like_oneshot_x1000`: queued work that allocates, both sides. aio
//!   `ContextHandle::schedule_oneshot` against tokio `Handle::spawn`, in batches of 1 000 that
//!   this thread waits for; the time runs until the last callback or task has run.
//! - `B4_like_bh_round_trip`: queued work that reuses an existing object. aio
//!   `BottomHalf::schedule` of one BH, then a wait until its callback ran, against tokio
//!   `Handle::spawn` + wait (allocating) and `Notify::notify_one` to a parked task + wait
//!   (reusing the task, as the BH is reused).
//! - `B4_like_notify`: a bare wake-up. aio `notify` against `Notify::notify_one` to a task
//!   parked in the busy runtime, tokio's cheapest way to make the busy runtime run something
//!   for another thread.
//!
//! Every queued callback and task counts its run on the loop's thread (`remote_bump`); the
//! workloads assert the exact count, and each line printed after a group gives the runs per
//! operation.

use std::time::Duration;

use aio_benches::{AioBusyLoop, BusyReport, TokioBusyLoop, pin_current_thread};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// Prints what an aio busy loop did under one criterion function.
fn print_aio(id: &str, r: &BusyReport) {
    println!(
        "{id}: {} ops, remote runs/op = {:.6}, loop iterations = {}, eventfd writes/op = {:.6}, \
         loop syscalls/op = {:.6}",
        r.ops,
        r.remote_runs_per_op(),
        r.loop_iterations,
        r.event_writes_per_op(),
        r.syscalls_per_op()
    );
}

/// Prints what a tokio busy runtime did under one criterion function (its system calls are not
/// counted).
fn print_tokio(id: &str, r: &BusyReport) {
    println!(
        "{id}: {} ops, remote runs/op = {:.6}, busy-loop yields = {}",
        r.ops,
        r.remote_runs_per_op(),
        r.loop_iterations
    );
}

/// B4: a loop thread (cpu0) spins `poll_nonblocking` and never blocks; this thread (cpu1) calls
/// `handle.notify()` `iters` times. Prints the eventfd writes per notify (expected 0) and the
/// busy loop's backend waits per iteration. Peer: `Handle::spawn(async {})` from this thread
/// onto a runtime busy in `block_on` of a `yield_now` loop, ns per remote spawn call (the tasks
/// are drained, untimed, after the calls).
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

/// B4 like for like, allocating queued work: ns per one-shot BH (aio
/// `ContextHandle::schedule_oneshot`) or per task (tokio `Handle::spawn`) queued from this
/// thread into the busy loop, batches of 1 000, each batch waited for, so the time includes
/// running every callback or task once (counted and asserted).
fn b4_like_oneshot(c: &mut Criterion) {
    let mut g = c.benchmark_group("B4_like_oneshot_x1000");
    g.throughput(Throughput::Elements(1));
    let pin = pin_current_thread(1);

    let mut ours = AioBusyLoop::start(Some(0));
    g.bench_function("aio/schedule_oneshot", |b| {
        b.iter_custom(|iters| ours.remote_oneshot(iters))
    });
    print_aio("B4_like_oneshot_x1000/aio", &ours.stop());

    let mut peer = TokioBusyLoop::start(Some(0));
    g.bench_function("tokio/remote_spawn", |b| {
        b.iter_custom(|iters| peer.spawn_batches(iters))
    });
    print_tokio("B4_like_oneshot_x1000/tokio", &peer.stop());

    drop(pin);
    g.finish();
}

/// B4 like for like, reused queued work: ns per round trip (queue from this thread, spin until
/// it has run once, counted and asserted). aio: `BottomHalf::schedule` of one existing BH.
/// tokio: `Handle::spawn` of a new task, and `Notify::notify_one` to one existing parked task.
fn b4_like_bh_round_trip(c: &mut Criterion) {
    let mut g = c.benchmark_group("B4_like_bh_round_trip");
    g.throughput(Throughput::Elements(1));
    let pin = pin_current_thread(1);

    let mut ours = AioBusyLoop::start(Some(0));
    g.bench_function("aio/bh_schedule", |b| {
        b.iter_custom(|iters| ours.bh_round_trip(iters))
    });
    print_aio("B4_like_bh_round_trip/aio", &ours.stop());

    let mut peer = TokioBusyLoop::start(Some(0));
    g.bench_function("tokio/remote_spawn", |b| {
        b.iter_custom(|iters| peer.spawn_round_trip(iters))
    });
    print_tokio("B4_like_bh_round_trip/tokio_spawn", &peer.stop());

    let mut peer = TokioBusyLoop::with_parked_task(Some(0));
    g.bench_function("tokio/notify_one_parked_task", |b| {
        b.iter_custom(|iters| peer.notify_round_trip(iters))
    });
    print_tokio("B4_like_bh_round_trip/tokio_notify", &peer.stop());

    drop(pin);
    g.finish();
}

/// B4 like for like, a bare wake-up: ns per call from this thread. aio `notify` (the loop only
/// clears `notified`) against `Notify::notify_one` to a task parked in the busy runtime (the
/// task wakes and counts; wakes coalesce while one is pending, so runs/op is below 1).
fn b4_like_notify(c: &mut Criterion) {
    let mut g = c.benchmark_group("B4_like_notify");
    g.throughput(Throughput::Elements(1));
    let pin = pin_current_thread(1);

    let mut ours = AioBusyLoop::start(Some(0));
    g.bench_function("aio/notify", |b| b.iter_custom(|iters| ours.notify(iters)));
    print_aio("B4_like_notify/aio", &ours.stop());

    let mut peer = TokioBusyLoop::with_parked_task(Some(0));
    g.bench_function("tokio/notify_one_parked_task", |b| {
        b.iter_custom(|iters| peer.notify_one(iters))
    });
    print_tokio("B4_like_notify/tokio", &peer.stop());

    drop(pin);
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = b4_notify_busy, b4_like_oneshot, b4_like_bh_round_trip, b4_like_notify
}
criterion_main!(benches);
