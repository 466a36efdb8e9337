//! B12 (docs/benchmarks.md): the task executor side by side with tokio, in one process, plain
//! `Instant` timing (no criterion). The workloads are in `aio_benches::task_load`; this program owns
//! the plan, the interleaving and the tables.
//!
//! * `B12_spawn`: spawn + await of an empty task inside one `block_on`, one at a time and in
//!   batches of 1 000 (aio `spawn_local` and `spawn`; tokio `spawn` and `LocalSet` +
//!   `spawn_local`, `current_thread`). Target: ≥ 3× tokio.
//! * `B12_yield`: `yield_now` in a loop inside one task. Target: ≥ 3× tokio.
//! * `B12_remote_wake`: a task parked on a waker, woken by another thread into a busy loop (a
//!   second task yields for ever), round trip until the task has answered through an atomic;
//!   aio vs tokio `current_thread` and `multi_thread` (one worker). Target: ≥ 2× tokio (p50).
//! * `B12_ping_pong`: two tasks on two threads, each on its own context or runtime (and tokio's
//!   `multi_thread` with two workers hosting both), hand a counter back and forth; the loops
//!   sleep when idle. No §8 target: it shows what a wake-up of a sleeping loop costs each.
//!   tokio's `multi_thread` runtime tends to run both tasks on one worker (a task woken from a
//!   worker goes to its LIFO slot), so an aio row with both tasks on one context sits next to
//!   it, and the table says how often tokio's two tasks shared a worker.
//! * `B12_comutex`: QEMU's test-aio-multithread `/aio/multi/mutex/contended` (5 threads) and
//!   `/aio/multi/mutex/handoff` (2 threads) as a benchmark: one task per thread, each on its own
//!   context or runtime, locks, increments a shared counter, unlocks, until stopped; iterations
//!   per second for `aio_core::task::CoMutex` on aio contexts, `tokio::sync::Mutex` on
//!   `current_thread` runtimes and a `parking_lot::Mutex` baseline (tasks on aio contexts; it
//!   blocks the thread, as QEMU's pthread baseline). Target: CoMutex ≥ tokio::sync::Mutex.
//!
//! Throughput rows run `rounds` rounds, each running every contender once, in the same order,
//! so that they all see the same machine weather; the table gives the median, mean and minimum
//! of the per-round ns/op. Round-trip rows do the same with fresh threads and loops per round,
//! and pool every recorded round trip for the percentiles.
//!
//! `cargo bench -p aio-benches --bench tasks [-- FILTER] [--quick]`: a FILTER runs the parts
//! whose key contains it (`tasks` runs them all); `--quick` runs smaller sizes. Without
//! `--bench` (as under `cargo test --benches`) every part runs once, briefly. With
//! `AIO_BENCH_REPORT_DIR` set, the tables are also written to `tasks.md` there.

use std::fmt::Write as _;
use std::time::Duration;

use aio_benches::task_load::{self, Host, LockKind, RoundTrips, Spawn, Spawner};
use aio_benches::{Sizes, new_context, percentile, summary, tokio_runtime, verdict};

/// How much to measure.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Throughput rows: rounds; each runs every contender once.
    rounds: usize,
    /// Spawn + await, one at a time: tasks per run.
    spawn_ops: u64,
    /// Spawn + await in batches: tasks per run.
    batch_ops: u64,
    /// Yields per run.
    yield_ops: u64,
    /// Round-trip rows: rounds; each runs every contender once, on fresh threads.
    rt_rounds: usize,
    /// Remote wake: unrecorded round trips per run.
    wake_warm_up: u64,
    /// Remote wake: recorded round trips per run.
    wake_measured: u64,
    /// Ping-pong: unrecorded round trips per run.
    pp_warm_up: u64,
    /// Ping-pong: recorded round trips per run.
    pp_measured: u64,
    /// CoMutex: rounds; each runs every lock once.
    mutex_rounds: usize,
    /// CoMutex, contended (5 threads): the length of a run (QEMU: 1 s).
    mutex_contended: Duration,
    /// CoMutex, handoff (2 threads): the length of a run (QEMU: 3 s).
    mutex_handoff: Duration,
}

const FULL: Plan = Plan {
    rounds: 15,
    spawn_ops: 100_000,
    batch_ops: 100_000,
    yield_ops: 200_000,
    rt_rounds: 10,
    wake_warm_up: 500,
    wake_measured: 5000,
    pp_warm_up: 100,
    pp_measured: 1000,
    mutex_rounds: 3,
    mutex_contended: Duration::from_secs(1),
    mutex_handoff: Duration::from_secs(3),
};

const QUICK: Plan = Plan {
    rounds: 5,
    spawn_ops: 20_000,
    batch_ops: 20_000,
    yield_ops: 50_000,
    rt_rounds: 3,
    wake_warm_up: 200,
    wake_measured: 2000,
    pp_warm_up: 50,
    pp_measured: 300,
    mutex_rounds: 1,
    mutex_contended: Duration::from_millis(300),
    mutex_handoff: Duration::from_millis(500),
};

const SMOKE: Plan = Plan {
    rounds: 1,
    spawn_ops: 100,
    batch_ops: 2000,
    yield_ops: 100,
    rt_rounds: 1,
    wake_warm_up: 5,
    wake_measured: 20,
    pp_warm_up: 5,
    pp_measured: 20,
    mutex_rounds: 1,
    mutex_contended: Duration::from_millis(20),
    mutex_handoff: Duration::from_millis(20),
};

/// Tasks spawned before the first is awaited, in the batch rows (tokio's `spawn_many_local`).
const BATCH: usize = 1000;

fn spawn_label(s: Spawner) -> &'static str {
    match s {
        Spawner::AioLocal => "aio `ctx.spawn_local(async {})`",
        Spawner::AioSend => "aio `ctx.spawn(async {})` (Send)",
        Spawner::Tokio => "tokio ct `tokio::spawn(async {})`",
        Spawner::TokioLocal => "tokio ct `LocalSet` + `spawn_local(async {})`",
    }
}

fn host_label(h: Host, part: &str) -> String {
    match (h, part) {
        (Host::Aio, _) => "aio contexts (poll backend), `spawn_local` tasks".into(),
        (Host::TokioCurrentThread, _) => "tokio current_thread, `tokio::spawn` tasks".into(),
        (Host::TokioMultiThread, "wake") => "tokio multi_thread, 1 worker (pinned)".into(),
        (Host::TokioMultiThread, _) => "tokio multi_thread, 2 workers, both tasks".into(),
        (Host::AioOneContext, _) => "aio, both tasks on one context (one thread)".into(),
    }
}

fn spawn(out: &mut String, plan: Plan) {
    let spawners = [
        Spawner::AioLocal,
        Spawner::AioSend,
        Spawner::Tokio,
        Spawner::TokioLocal,
    ];
    for (batch, ops, title) in [
        (
            1,
            plan.spawn_ops,
            "one at a time (spawn, await, spawn, ...)",
        ),
        (
            BATCH,
            plan.batch_ops,
            "batches of 1 000 (spawn 1 000, then await each)",
        ),
    ] {
        let mut rows: Vec<Spawn> = spawners.iter().map(|&s| Spawn::new(s, batch)).collect();
        // Warm-up: allocator, table and queue capacities.
        for r in &mut rows {
            r.run(ops / 10 + 1);
        }
        let mut ns: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
        for _ in 0..plan.rounds {
            for (r, v) in rows.iter_mut().zip(&mut ns) {
                v.push(r.run(ops));
            }
        }
        let stats: Vec<(f64, f64, f64)> = ns.into_iter().map(summary).collect();
        let tokio = stats[2].0;
        let tokio_local = stats[3].0;
        writeln!(
            out,
            "\n### B12 spawn + await of an empty task, {title}\n\n{} rounds × {ops} tasks, inside \
             one `block_on`.\n",
            plan.rounds
        )
        .unwrap();
        writeln!(
            out,
            "| contender | median ns/task | mean | min | tokio spawn / this | tokio LocalSet / \
             this | loop syscalls/task |"
        )
        .unwrap();
        writeln!(out, "|---|---:|---:|---:|---:|---:|---:|").unwrap();
        for ((s, r), (med, mean, min)) in spawners.iter().zip(&rows).zip(&stats) {
            writeln!(
                out,
                "| {} | {med:.1} | {mean:.1} | {min:.1} | {:.2}× | {:.2}× | {} |",
                spawn_label(*s),
                tokio / med,
                tokio_local / med,
                r.syscalls_per_op()
                    .map_or_else(|| "–".into(), |v| format!("{v:.4}")),
            )
            .unwrap();
        }
        let best_tokio = tokio.min(tokio_local);
        for (i, s) in spawners.iter().enumerate().take(2) {
            let ratio = best_tokio / stats[i].0;
            writeln!(
                out,
                "\nTarget ≥ 3× the faster tokio row: {} {ratio:.2}× — {}",
                spawn_label(*s),
                verdict(ratio >= 3.0)
            )
            .unwrap();
        }
    }
}

fn yields(out: &mut String, plan: Plan) {
    let ctx = new_context();
    let rt = tokio_runtime();
    task_load::aio_yield(&ctx, plan.yield_ops / 10 + 1);
    task_load::tokio_yield_in_task(&rt, plan.yield_ops / 10 + 1);
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    let mut syscalls = 0;
    for _ in 0..plan.rounds {
        let (ns, s) = task_load::aio_yield(&ctx, plan.yield_ops);
        ours.push(ns);
        syscalls += s;
        peer.push(task_load::tokio_yield_in_task(&rt, plan.yield_ops));
    }
    let (om, omean, omin) = summary(ours);
    let (pm, pmean, pmin) = summary(peer);
    writeln!(
        out,
        "\n### B12 `yield_now` in a loop inside one task\n\n{} rounds × {} yields, timed inside \
         the task.\n",
        plan.rounds, plan.yield_ops
    )
    .unwrap();
    writeln!(
        out,
        "| contender | median ns/yield | mean | min | tokio / this | loop syscalls/yield |"
    )
    .unwrap();
    writeln!(out, "|---|---:|---:|---:|---:|---:|").unwrap();
    writeln!(
        out,
        "| aio `aio_core::task::yield_now()` | {om:.1} | {omean:.1} | {omin:.1} | {:.2}× | {:.4} |",
        pm / om,
        syscalls as f64 / (plan.rounds as u64 * plan.yield_ops) as f64
    )
    .unwrap();
    writeln!(
        out,
        "| tokio ct `tokio::task::yield_now()` | {pm:.1} | {pmean:.1} | {pmin:.1} | 1.00× | – |"
    )
    .unwrap();
    let ratio = pm / om;
    writeln!(
        out,
        "\nTarget ≥ 3× tokio: {ratio:.2}× — {}",
        verdict(ratio >= 3.0)
    )
    .unwrap();
    writeln!(
        out,
        "\n(tokio's `yield_now` defers the task's wake-up until the scheduler has polled its \
         drivers, an `epoll_wait` with a zero timeout when the I/O driver is enabled; aio's \
         re-schedules the task's BH, no system call.)"
    )
    .unwrap();
}

/// Runs `run` for each of `hosts` (aio first), `rounds` times interleaved, and prints the
/// round-trip table.
fn round_trips(
    out: &mut String,
    part: &str,
    hosts: &[Host],
    rounds: usize,
    run: impl Fn(Host) -> RoundTrips,
) -> Vec<(Host, RoundTrips)> {
    let mut results: Vec<(Host, RoundTrips)> =
        hosts.iter().map(|&h| (h, RoundTrips::default())).collect();
    for _ in 0..rounds {
        for (h, r) in &mut results {
            r.extend(run(*h));
        }
    }
    for (_, r) in &mut results {
        r.samples.sort_unstable();
    }
    let aio_p50 = percentile(&results[0].1.samples, 0.5) as f64;
    writeln!(
        out,
        "| contender | p50 ns | mean ns | p99 ns | p99.9 ns | this p50 / aio p50 | aio loop \
         syscalls/round trip |"
    )
    .unwrap();
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|").unwrap();
    for (h, r) in &results {
        let p50 = percentile(&r.samples, 0.5);
        writeln!(
            out,
            "| {} | {p50} | {:.0} | {} | {} | {:.2}× | {} |",
            host_label(*h, part),
            r.mean(),
            percentile(&r.samples, 0.99),
            percentile(&r.samples, 0.999),
            p50 as f64 / aio_p50,
            r.syscalls_per_round_trip()
                .map_or_else(|| "–".into(), |v| format!("{v:.3}")),
        )
        .unwrap();
    }
    for (h, r) in &results {
        if let Some((same, runs)) = r.same_worker {
            writeln!(
                out,
                "\n{}: both tasks finished on the same worker thread in {same} of {runs} runs.",
                host_label(*h, part)
            )
            .unwrap();
        }
    }
    results
}

fn remote_wake(out: &mut String, plan: Plan) {
    writeln!(
        out,
        "\n### B12 remote wake of a task into a busy loop\n\nA task parked on a waker; another \
         thread (cpu{}) stores a value and wakes it, then spins until the task has stored the \
         value back in an atomic. The loop thread (cpu{}) also runs a task that yields for ever, \
         so it never sleeps. {} rounds × ({} warm-up + {} recorded) round trips per contender, \
         fresh threads each round, interleaved.\n",
        task_load::OTHER_CPU,
        task_load::LOOP_CPU,
        plan.rt_rounds,
        plan.wake_warm_up,
        plan.wake_measured
    )
    .unwrap();
    let hosts = [Host::Aio, Host::TokioCurrentThread, Host::TokioMultiThread];
    let results = round_trips(out, "wake", &hosts, plan.rt_rounds, |h| {
        task_load::remote_wake(h, plan.wake_warm_up, plan.wake_measured)
    });
    let aio = percentile(&results[0].1.samples, 0.5) as f64;
    for (h, r) in &results[1..] {
        let ratio = percentile(&r.samples, 0.5) as f64 / aio;
        writeln!(
            out,
            "\nTarget ≥ 2× tokio (p50): vs {} {ratio:.2}× — {}",
            host_label(*h, "wake"),
            verdict(ratio >= 2.0)
        )
        .unwrap();
    }
}

fn ping_pong(out: &mut String, plan: Plan) {
    writeln!(
        out,
        "\n### B12 cross-context ping-pong of two tasks on two threads\n\nEach thread runs its \
         own context or runtime (cpu{} and cpu{}; the multi_thread row is not pinned and tokio \
         may run both tasks on one worker), the loops sleep when idle; a round trip is two \
         cross-thread wake-ups. {} rounds × ({} warm-up + {} recorded) round trips per \
         contender, fresh threads each round, interleaved. No §8 target.\n",
        task_load::LOOP_CPU,
        task_load::OTHER_CPU,
        plan.rt_rounds,
        plan.pp_warm_up,
        plan.pp_measured
    )
    .unwrap();
    let hosts = [
        Host::Aio,
        Host::TokioCurrentThread,
        Host::TokioMultiThread,
        Host::AioOneContext,
    ];
    let results = round_trips(out, "ping-pong", &hosts, plan.rt_rounds, |h| {
        task_load::ping_pong(h, plan.pp_warm_up, plan.pp_measured)
    });
    let p50 = |i: usize| percentile(&results[i].1.samples, 0.5) as f64;
    writeln!(
        out,
        "\nAcross threads: tokio current_thread p50 / aio p50 = {:.2}×. On one thread (what \
         tokio multi_thread does when its LIFO slot keeps both tasks on one worker): tokio \
         multi_thread p50 / aio one-context p50 = {:.2}×.",
        p50(1) / p50(0),
        p50(2) / p50(3)
    )
    .unwrap();
}

fn comutex(out: &mut String, plan: Plan) {
    let kinds = [LockKind::CoMutex, LockKind::Tokio, LockKind::ParkingLot];
    writeln!(
        out,
        "\n### B12 CoMutex: QEMU test-aio-multithread's mutex tests\n\nOne task per thread, each \
         thread with its own context or runtime: lock, increment the counter inside, unlock, \
         increment an atomic counter, until stopped (the two counters must agree). {} rounds, \
         each running every lock once; iterations per second, median of the rounds.\n",
        plan.mutex_rounds
    )
    .unwrap();
    writeln!(
        out,
        "| test | lock | threads | run | median iterations/s | min | max | CoMutex / this |"
    )
    .unwrap();
    writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|").unwrap();
    let mut verdicts = Vec::new();
    for (test, threads, run) in [
        ("contended", 5, plan.mutex_contended),
        ("handoff", 2, plan.mutex_handoff),
    ] {
        let mut per_s: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
        for _ in 0..plan.mutex_rounds {
            for (k, v) in kinds.iter().zip(&mut per_s) {
                v.push(task_load::mutex_run(*k, threads, run).per_second());
            }
        }
        let stats: Vec<(f64, f64, f64)> = per_s
            .into_iter()
            .map(|mut v| {
                v.sort_by(f64::total_cmp);
                (percentile(&v, 0.5), v[0], v[v.len() - 1])
            })
            .collect();
        let ours = stats[0].0;
        for (k, (med, min, max)) in kinds.iter().zip(&stats) {
            let lock = match k {
                LockKind::CoMutex => "aio `CoMutex` (aio contexts)",
                LockKind::Tokio => "`tokio::sync::Mutex` (current_thread runtimes)",
                LockKind::ParkingLot => "`parking_lot::Mutex` (aio contexts, blocks the thread)",
            };
            writeln!(
                out,
                "| {test} | {lock} | {threads} | {:.1} s | {med:.0} | {min:.0} | {max:.0} | {:.3}× |",
                run.as_secs_f64(),
                ours / med
            )
            .unwrap();
        }
        let ratio = ours / stats[1].0;
        verdicts.push(format!(
            "Target CoMutex ≥ tokio::sync::Mutex, {test} ({threads} threads): {ratio:.2}× — {}",
            verdict(ratio >= 1.0)
        ));
    }
    for v in verdicts {
        writeln!(out, "\n{v}").unwrap();
    }
}

fn main() {
    aio_benches::run_parts(
        "tasks",
        "B12: tasks, aio vs tokio",
        "tasks.md",
        |sizes| match sizes {
            Sizes::Smoke => SMOKE,
            Sizes::Quick => QUICK,
            Sizes::Full => FULL,
        },
        &[
            ("B12_spawn", spawn),
            ("B12_yield", yields),
            ("B12_remote_wake", remote_wake),
            ("B12_ping_pong", ping_pong),
            ("B12_comutex", comutex),
        ],
    );
}
