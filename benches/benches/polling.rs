//! Adaptive polling (issue 11) side by side, in one process, plain `Instant` timing (no
//! criterion):
//!
//! * **B3** (`aio_benches::ping_pong`): cross-thread ping-pong between two loops pinned to cpu0 and
//!   cpu1, p50/p99/p99.9 round trip: aio through event notifiers and through BHs, polling off
//!   and on (`Qemu10` and `Weighted { weight: 2 }`, max 32 768 ns and 100 µs), tokio (two
//!   `current_thread` runtimes, mpsc), and the raw eventfd floor. Contenders are interleaved:
//!   each of 20 rounds runs each once (200 warm-up and 1 000 recorded round trips), in the same
//!   order, so that every contender sees the same machine weather.
//! * **B8 with polling** (`aio_benches::pool_jobs`): the latency of a 10 µs pool job, one in flight,
//!   with the context's polling off and on, next to tokio `spawn_blocking`. One context whose
//!   parameters change between rows (`set_poll_params`, which resets the windows), rounds
//!   interleaved with tokio.
//! * **B9** (`aio_benches::idle`): the CPU time per second and the wake-ups per second of idle
//!   loops that were active before: aio with polling off, and on (max 32 768 ns, both policies),
//!   and tokio's `current_thread` runtime.
//!
//! `cargo bench -p aio-benches --bench polling [-- FILTER]`: a FILTER runs the parts whose key
//! (`B3_ping_pong`, `B8_polling_latency`, `B9_idle`) contains it; `polling` runs them all.
//! Without `--bench` (as under `cargo test --benches`) every part runs once, briefly.

use std::time::Duration;

use aio::{PollParams, PollPolicy};
use aio_benches::idle::{self, Idle, IdleReport};
use aio_benches::ping_pong::{self, Mechanism, PingPong};
use aio_benches::pool_jobs::{Aio, Job, Tokio, latency};
use aio_benches::{machine, percentile, today, verdict};

/// How much to measure.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// B3: rounds; each runs every contender once.
    b3_rounds: usize,
    /// B3: unrecorded round trips at the start of each run.
    b3_warm_up: u64,
    /// B3: recorded round trips per run.
    b3_measured: u64,
    /// B8: rounds; each measures every row once.
    b8_rounds: usize,
    /// B8: unrecorded jobs after each parameter change.
    b8_warm_up: usize,
    /// B8: recorded jobs per row per round.
    b8_samples: usize,
    /// B9: notifier sets and remote BH schedules before going idle.
    b9_activity: u64,
    /// B9: idle time before the measurement.
    b9_settle: Duration,
    /// B9: the measurement.
    b9_measure: Duration,
}

const FULL: Plan = Plan {
    b3_rounds: 20,
    b3_warm_up: 200,
    b3_measured: 1000,
    b8_rounds: 5,
    b8_warm_up: 100,
    b8_samples: 500,
    b9_activity: 2000,
    b9_settle: Duration::from_secs(3),
    b9_measure: Duration::from_secs(3),
};

const SMOKE: Plan = Plan {
    b3_rounds: 1,
    b3_warm_up: 5,
    b3_measured: 20,
    b8_rounds: 1,
    b8_warm_up: 2,
    b8_samples: 5,
    b9_activity: 20,
    b9_settle: Duration::from_millis(20),
    b9_measure: Duration::from_millis(100),
};

/// QEMU's IOThread default `poll-max-ns`.
const QEMU_MAX: Duration = Duration::from_nanos(32_768);
const MAX_100US: Duration = Duration::from_micros(100);
const WEIGHTED: PollPolicy = PollPolicy::Weighted { weight: 2 };

/// The aio polling configurations of B3, in table order.
fn b3_configs() -> Vec<PollParams> {
    vec![
        PollParams::disabled(),
        PollParams::new(QEMU_MAX).policy(PollPolicy::Qemu10),
        PollParams::new(MAX_100US).policy(PollPolicy::Qemu10),
        PollParams::new(QEMU_MAX).policy(WEIGHTED),
        PollParams::new(MAX_100US).policy(WEIGHTED),
    ]
}

/// "off", or the policy and maximum.
fn label(p: PollParams) -> String {
    if p.is_disabled() {
        return "polling off".into();
    }
    let max = p.max().as_nanos();
    let max = if max.is_multiple_of(1000) {
        format!("{} µs", max / 1000)
    } else {
        format!("{max} ns")
    };
    match p.get_policy() {
        PollPolicy::Qemu10 => format!("Qemu10, max {max}"),
        PollPolicy::Weighted { weight } => format!("Weighted {{ weight: {weight} }}, max {max}"),
        other => format!("{other:?}, max {max}"),
    }
}

fn mechanism_label(m: Mechanism) -> String {
    match m {
        Mechanism::Floor => "floor: eventfd, blocking read/write".into(),
        Mechanism::Tokio => "tokio: 2 current_thread runtimes, mpsc".into(),
        Mechanism::AioNotifier(p) => format!("aio EventNotifier, {}", label(p)),
        Mechanism::AioBh(p) => format!("aio BH, {}", label(p)),
    }
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.decimals$}"))
}

fn b3(plan: Plan) {
    let mut contenders = vec![Mechanism::Floor, Mechanism::Tokio];
    contenders.extend(b3_configs().into_iter().map(Mechanism::AioNotifier));
    contenders.extend(b3_configs().into_iter().map(Mechanism::AioBh));
    let mut results: Vec<PingPong> = vec![PingPong::default(); contenders.len()];
    for _ in 0..plan.b3_rounds {
        for (m, r) in contenders.iter().zip(&mut results) {
            r.extend(ping_pong::run(*m, plan.b3_warm_up, plan.b3_measured));
        }
    }
    for r in &mut results {
        r.samples.sort_unstable();
    }
    let p50 = |r: &PingPong| percentile(&r.samples, 0.5) as f64;
    let floor = p50(&results[0]);
    let tokio = p50(&results[1]);

    println!(
        "\n## B3: cross-thread ping-pong, round trip (sides pinned to cpu{} and cpu{})\n",
        ping_pong::SIDE_A_CPU,
        ping_pong::SIDE_B_CPU
    );
    println!(
        "{} rounds × ({} warm-up + {} recorded) round trips per contender, interleaved; counters \
         per round trip over both contexts, warm-up included.\n",
        plan.b3_rounds, plan.b3_warm_up, plan.b3_measured
    );
    println!(
        "| contender | p50 ns | p99 ns | p99.9 ns | eventfd writes/RT | ppoll/RT | poll hits/RT \
         | poll misses/RT | polling µs/RT | window A/B at end | tokio p50 / p50 | p50 / floor p50 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|");
    for (m, r) in contenders.iter().zip(&results) {
        let window = match (&r.a, &r.b) {
            (Some(a), Some(b)) => format!("{} / {} ns", a.window_ns, b.window_ns),
            _ => "–".into(),
        };
        println!(
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2}× | {:.2}× |",
            mechanism_label(*m),
            p50(r),
            percentile(&r.samples, 0.99),
            percentile(&r.samples, 0.999),
            opt(r.writes_per_round_trip(), 2),
            opt(r.per_round_trip(|c| c.waits), 2),
            opt(r.per_round_trip(|c| c.poll_hits), 2),
            opt(r.per_round_trip(|c| c.poll_misses), 2),
            opt(r.per_round_trip(|c| c.poll_ns).map(|ns| ns / 1e3), 2),
            window,
            tokio / p50(r),
            p50(r) / floor,
        );
    }

    println!("\n| B3 target (docs/benchmarks.md) | contender | ratio | verdict |");
    println!("|---|---|---:|---|");
    for (m, r) in contenders.iter().zip(&results) {
        match m {
            Mechanism::AioNotifier(p) | Mechanism::AioBh(p) if p.is_disabled() => {
                let ratio = p50(r) / floor;
                println!(
                    "| polling off: p50 ≤ 1.1× the eventfd floor | {} | {ratio:.2}× | {} |",
                    mechanism_label(*m),
                    verdict(ratio <= 1.1)
                );
            }
            Mechanism::AioNotifier(_) | Mechanism::AioBh(_) => {
                let ratio = tokio / p50(r);
                println!(
                    "| polling on: p50 ≥ 5× lower than tokio | {} | {ratio:.2}× | {} |",
                    mechanism_label(*m),
                    verdict(ratio >= 5.0)
                );
            }
            Mechanism::Floor | Mechanism::Tokio => {}
        }
    }
    let tokio_vs_floor = tokio / floor;
    println!("\n(tokio p50 / floor p50: {tokio_vs_floor:.2}×)");
}

fn b8(plan: Plan) {
    let job = Job::Spin10us;
    let configs = [
        PollParams::disabled(),
        PollParams::new(QEMU_MAX).policy(PollPolicy::Qemu10),
        PollParams::new(MAX_100US).policy(PollPolicy::Qemu10),
        PollParams::new(QEMU_MAX).policy(WEIGHTED),
    ];
    let aio = Aio::new(PollParams::disabled());
    let tokio = Tokio::new();
    let mut ours: Vec<Vec<Duration>> = vec![Vec::new(); configs.len()];
    let mut hits = vec![0u64; configs.len()];
    let mut peer = Vec::new();
    for _ in 0..plan.b8_rounds {
        for (i, p) in configs.iter().enumerate() {
            aio.context()
                .set_poll_params(*p)
                .expect("B8: polling parameters refused");
            latency(|| aio.round_trip(job), plan.b8_warm_up);
            let before = aio.context().stats().poll_hits;
            ours[i].extend(latency(|| aio.round_trip(job), plan.b8_samples));
            hits[i] += aio.context().stats().poll_hits - before;
        }
        latency(|| tokio.round_trip(job), plan.b8_warm_up);
        peer.extend(latency(|| tokio.round_trip(job), plan.b8_samples));
    }
    peer.sort_unstable();
    let us = |d: Duration| d.as_nanos() as f64 / 1e3;
    let tokio_p50 = us(percentile(&peer, 0.5));

    println!("\n## B8 with polling: 10 µs pool job, 1 in flight (not pinned)\n");
    println!(
        "{} rounds × {} jobs per row after {} warm-up jobs (after each parameter change); \
         pool min = max = 64.\n",
        plan.b8_rounds, plan.b8_samples, plan.b8_warm_up
    );
    println!("| contender | p50 µs | p99 µs | poll hits/job | tokio p50 / p50 |");
    println!("|---|---:|---:|---:|---:|");
    for ((p, samples), h) in configs.iter().zip(&mut ours).zip(&hits) {
        samples.sort_unstable();
        let p50 = us(percentile(samples, 0.5));
        println!(
            "| aio pool, {} | {p50:.1} | {:.1} | {:.2} | {:.2}× |",
            label(*p),
            us(percentile(samples, 0.99)),
            *h as f64 / samples.len() as f64,
            tokio_p50 / p50,
        );
    }
    println!(
        "| tokio spawn_blocking | {tokio_p50:.1} | {:.1} | – | 1.00× |",
        us(percentile(&peer, 0.99))
    );
}

fn b9(plan: Plan) {
    let subjects = [
        Idle::Aio(PollParams::disabled()),
        Idle::Aio(PollParams::new(QEMU_MAX).policy(PollPolicy::Qemu10)),
        Idle::Aio(PollParams::new(QEMU_MAX).policy(WEIGHTED)),
        Idle::Tokio,
    ];
    let reports = idle::run(&subjects, plan.b9_activity, plan.b9_settle, plan.b9_measure);
    println!("\n## B9: idle loops after activity\n");
    println!(
        "All subjects idle together: after {} event-notifier sets and {} remote BH schedules \
         (tokio: {} mpsc messages), {:.1} s of settling, measured over {:.1} s.\n",
        plan.b9_activity,
        plan.b9_activity,
        2 * plan.b9_activity,
        plan.b9_settle.as_secs_f64(),
        plan.b9_measure.as_secs_f64(),
    );
    println!(
        "| idle loop | CPU µs/s | wake-ups/s (voluntary switches) | preemptions/s | loop \
         iterations/s | window after activity | window after the stopping wake-up | \
         ≤ 1 ms/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for r in &reports {
        let name = match r.subject {
            Idle::Aio(p) => format!("aio, {}", label(p)),
            Idle::Tokio => "tokio current_thread, block_on(mpsc recv)".into(),
        };
        let ns = |v: Option<u64>| v.map_or_else(|| "–".into(), |v| format!("{v} ns"));
        println!(
            "| {name} | {:.1} | {:.2} | {:.2} | {} | {} | {} | {} |",
            r.cpu_us_per_s(),
            r.per_s(r.voluntary_switches),
            r.per_s(r.involuntary_switches),
            opt(r.iterations.map(|i| IdleReport::per_s(r, i)), 2),
            ns(r.window_after_activity_ns),
            ns(r.window_at_end_ns),
            verdict(r.cpu_us_per_s() <= 1000.0),
        );
    }
}

fn main() {
    let args = aio_benches::BenchArgs::parse();
    let plan = if args.bench { FULL } else { SMOKE };
    println!("# Adaptive polling: B3, B8, B9 ({})\n", today());
    println!("Machine: {}", machine());
    if !args.bench {
        println!("(smoke run: no --bench flag, tiny sizes; the figures mean nothing)");
    }
    if args.wants("polling", "B3_ping_pong") {
        b3(plan);
    }
    if args.wants("polling", "B8_polling_latency") {
        b8(plan);
    }
    if args.wants("polling", "B9_idle") {
        b9(plan);
    }
}
