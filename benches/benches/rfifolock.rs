//! B10 (docs/benchmarks.md), the lock part: `aio_core::RFifoLock` side by side with
//! `parking_lot::ReentrantMutex`, in one process, plain `Instant` timing (no criterion). This
//! program owns the workloads, the plan and the tables.
//!
//! * `B10_uncontended`: one thread locks and unlocks, and locks and unlocks nested inside a
//!   held guard: the bare `RFifoLock`, and a whole `SharedContext` acquire/release (the lock,
//!   plus making the thread the context's home and back). Target: within 1.2× of
//!   `ReentrantMutex` (median ns per pair).
//! * `B10_handoff`: two threads lock, update the data and unlock in a loop, as fast as they
//!   can. A FIFO lock alternates them, so every acquisition is a hand-off to a sleeping
//!   thread: the time per acquisition is the hand-off latency. Next to it,
//!   `ReentrantMutex` with `unlock_fair` (parking_lot's FIFO hand-off) and with its plain,
//!   unfair unlock (the releasing thread mostly takes the lock straight back). The table gives
//!   the share of acquisitions that changed thread, which is what FIFO buys (on a loaded
//!   machine a woken waiter often preempts the releasing thread before it locks again, and
//!   the run degenerates into one thread at a time, whatever the lock).
//! * `B10_latency`: one hand-off to a waiter asleep in `lock`, from just before the release
//!   to the waiter's return: the wake-up the FIFO hand-off costs (QEMU's case: an iothread
//!   releasing the context to a thread that waits for it). Percentiles over all rounds.
//!
//! Every row runs `rounds` rounds, each running every contender once, in the same order, so
//! that they all see the same machine weather; tables give the median, mean and minimum of
//! the per-round figures.
//!
//! `cargo bench -p aio-benches --bench rfifolock [-- FILTER] [--quick]`: a FILTER runs the
//! parts whose key contains it (`rfifolock` runs them all); `--quick` runs smaller sizes.
//! Without `--bench` (as under `cargo test --benches`) every part runs once, briefly. With
//! `AIO_BENCH_REPORT_DIR` set, the tables are also written to `rfifolock.md` there.

use std::cell::Cell;
use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use aio_benches::{Sizes, percentile, summary, verdict};
use aio_core::RFifoLock;
use parking_lot::ReentrantMutex;

/// How much to measure.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Uncontended rows: rounds, and lock/unlock pairs per contender per round.
    rounds: usize,
    pairs: u64,
    /// Hand-off rows: rounds, and acquisitions per thread per round.
    handoff_rounds: usize,
    acquisitions: u64,
}

const FULL: Plan = Plan {
    rounds: 15,
    pairs: 5_000_000,
    handoff_rounds: 5,
    acquisitions: 50_000,
};

const QUICK: Plan = Plan {
    rounds: 5,
    pairs: 1_000_000,
    handoff_rounds: 3,
    acquisitions: 5_000,
};

const SMOKE: Plan = Plan {
    rounds: 1,
    pairs: 1_000,
    handoff_rounds: 1,
    acquisitions: 100,
};

/// How long the hand-off rows give both threads to queue on the held lock before the run.
const QUEUE_TIME: Duration = Duration::from_millis(20);

/// How long the latency rows give the waiter to fall asleep in `lock` before the release.
const PARK_TIME: Duration = Duration::from_micros(200);

/// The uncontended target: RFifoLock's time at most this multiple of ReentrantMutex's.
const TARGET: f64 = 1.2;

/// Times `pairs` lock/unlock pairs of a fresh `$lock` (a constructor taking the value), inside
/// a guard held for the whole run when `nested`; the same code for both contenders, which share
/// no trait.
macro_rules! time_pairs {
    ($lock:path, $pairs:expr, $nested:expr) => {{
        let pairs: u64 = $pairs;
        let lock = $lock(Cell::new(0u64));
        let _outer = $nested.then(|| lock.lock());
        let start = Instant::now();
        for _ in 0..pairs {
            let g = black_box(&lock).lock();
            g.set(g.get() + 1);
        }
        let ns = start.elapsed().as_nanos() as f64 / pairs as f64;
        black_box(lock.lock().get());
        ns
    }};
}

/// The contenders, as ns per lock/unlock pair over `pairs` pairs (`nested`: inside a guard
/// held for the whole run).
fn rfifo_pairs(pairs: u64, nested: bool) -> f64 {
    time_pairs!(RFifoLock::new, pairs, nested)
}

fn parking_lot_pairs(pairs: u64, nested: bool) -> f64 {
    time_pairs!(ReentrantMutex::new, pairs, nested)
}

/// `SharedContext::acquire` + release (QEMU's `aio_context_acquire`/`release`): the
/// RFifoLock plus what taking a context adds (the outermost acquire makes the thread the
/// context's home and registers it in the thread's table; the release undoes both), on a
/// context of the default backend.
fn shared_context_pairs(pairs: u64, nested: bool) -> f64 {
    let ctx = aio::Builder::new()
        .ignore_env()
        .build_shared()
        .expect("a shared context");
    let _outer = nested.then(|| ctx.acquire());
    let start = Instant::now();
    for _ in 0..pairs {
        let g = black_box(&ctx).acquire();
        black_box(&g);
    }
    start.elapsed().as_nanos() as f64 / pairs as f64
}

fn uncontended(out: &mut String, plan: Plan) {
    writeln!(
        out,
        "\n### B10 uncontended lock + unlock\n\n{} rounds × {} pairs; each pair also \
         increments a `Cell` in the lock. \"nested\": inside a guard the thread already holds.\n",
        plan.rounds, plan.pairs
    )
    .unwrap();
    writeln!(
        out,
        "| row | contender | median ns/pair | mean | min | this / ReentrantMutex | target ≤ {TARGET}× |"
    )
    .unwrap();
    writeln!(out, "|---|---|---:|---:|---:|---:|---|").unwrap();
    for nested in [false, true] {
        // Warm-up, then interleaved rounds.
        rfifo_pairs(plan.pairs / 10 + 1, nested);
        parking_lot_pairs(plan.pairs / 10 + 1, nested);
        shared_context_pairs(plan.pairs / 10 + 1, nested);
        let (mut ours, mut peer, mut shared) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..plan.rounds {
            ours.push(rfifo_pairs(plan.pairs, nested));
            peer.push(parking_lot_pairs(plan.pairs, nested));
            shared.push(shared_context_pairs(plan.pairs, nested));
        }
        let (om, omean, omin) = summary(ours);
        let (pm, pmean, pmin) = summary(peer);
        let (sm, smean, smin) = summary(shared);
        let row = if nested { "nested" } else { "outermost" };
        writeln!(
            out,
            "| {row} | `aio_core::RFifoLock` | {om:.2} | {omean:.2} | {omin:.2} | {:.2}× | {} |",
            om / pm,
            verdict(om <= pm * TARGET)
        )
        .unwrap();
        writeln!(
            out,
            "| {row} | `aio::SharedContext::acquire` + release | {sm:.2} | {smean:.2} | {smin:.2} | {:.2}× | {} |",
            sm / pm,
            verdict(sm <= pm * TARGET)
        )
        .unwrap();
        writeln!(
            out,
            "| {row} | `parking_lot::ReentrantMutex` | {pm:.2} | {pmean:.2} | {pmin:.2} | 1.00× | – |"
        )
        .unwrap();
    }
}

/// The hand-off contenders.
#[derive(Debug, Clone, Copy)]
enum Handoff {
    RFifo,
    ParkingLotFair,
    ParkingLotUnfair,
}

impl Handoff {
    fn label(self) -> &'static str {
        match self {
            Handoff::RFifo => "`aio_core::RFifoLock` (FIFO)",
            Handoff::ParkingLotFair => "`parking_lot::ReentrantMutex`, `unlock_fair` (FIFO)",
            Handoff::ParkingLotUnfair => "`parking_lot::ReentrantMutex`, plain unlock (unfair)",
        }
    }
}

/// One acquisition: the data is (acquisitions so far, last holder); returns whether the lock
/// changed thread.
fn step(data: &Cell<(u64, usize)>, me: usize) -> bool {
    let (n, last) = data.get();
    data.set((n + 1, me));
    last != me
}

/// Two threads × `acquisitions` each; returns (ns per acquisition, share of acquisitions that
/// changed thread). The main thread holds the lock while both threads start and queue (it
/// gives them [`QUEUE_TIME`]), so that the run starts contended; the clock starts at its
/// release.
fn handoff_run(kind: Handoff, acquisitions: u64) -> (f64, f64) {
    let rfifo = Arc::new(RFifoLock::new(Cell::new((0u64, usize::MAX))));
    let pl = Arc::new(ReentrantMutex::new(Cell::new((0u64, usize::MAX))));
    let start_line = Arc::new(Barrier::new(3));
    let (held_rfifo, held_pl) = (rfifo.lock(), pl.lock());
    let threads: Vec<_> = (0..2)
        .map(|me| {
            let (rfifo, pl, start_line) = (rfifo.clone(), pl.clone(), start_line.clone());
            thread::spawn(move || {
                let mut changes = 0u64;
                start_line.wait();
                for _ in 0..acquisitions {
                    changes += u64::from(match kind {
                        Handoff::RFifo => step(&rfifo.lock(), me),
                        Handoff::ParkingLotFair => {
                            let g = pl.lock();
                            let changed = step(&g, me);
                            parking_lot::ReentrantMutexGuard::unlock_fair(g);
                            changed
                        }
                        Handoff::ParkingLotUnfair => step(&pl.lock(), me),
                    });
                }
                changes
            })
        })
        .collect();
    start_line.wait();
    thread::sleep(QUEUE_TIME);
    let start = Instant::now();
    drop((held_rfifo, held_pl));
    let changes: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let elapsed = start.elapsed();
    let total = 2 * acquisitions;
    // The first acquisition always "changes thread" (from main's marker).
    (
        elapsed.as_nanos() as f64 / total as f64,
        (changes - 1) as f64 / (total - 1) as f64,
    )
}

fn handoff(out: &mut String, plan: Plan) {
    writeln!(
        out,
        "\n### B10 contended hand-off, 2 threads\n\n{} rounds × 2 threads × {} acquisitions; \
         both threads queue on the held lock first; ns per acquisition from its release to both \
         threads' end. \"changed thread\": the share of acquisitions that went to the other thread than the previous one (1.0: \
         strict alternation, every acquisition a hand-off).\n",
        plan.handoff_rounds, plan.acquisitions
    )
    .unwrap();
    writeln!(
        out,
        "| contender | median ns/acquisition | mean | min | changed thread (median) |"
    )
    .unwrap();
    writeln!(out, "|---|---:|---:|---:|---:|").unwrap();
    let kinds = [
        Handoff::RFifo,
        Handoff::ParkingLotFair,
        Handoff::ParkingLotUnfair,
    ];
    let mut results = vec![(Vec::new(), Vec::new()); kinds.len()];
    for _ in 0..plan.handoff_rounds {
        for (i, kind) in kinds.iter().enumerate() {
            let (ns, changed) = handoff_run(*kind, plan.acquisitions);
            results[i].0.push(ns);
            results[i].1.push(changed);
        }
    }
    for (kind, (ns, changed)) in kinds.iter().zip(results) {
        let (m, mean, min) = summary(ns);
        let (changed, _, _) = summary(changed);
        writeln!(
            out,
            "| {} | {m:.0} | {mean:.0} | {min:.0} | {changed:.3} |",
            kind.label()
        )
        .unwrap();
    }
}

/// One hand-off to a sleeping waiter, `rounds` times: the main thread holds the lock, the
/// worker calls `lock` and is given [`PARK_TIME`] to go to sleep in it, then main releases;
/// the latency runs from just before the release to the worker's return from `lock`. Returns
/// the sorted latencies in ns.
fn latency_run(kind: Handoff, rounds: u64) -> Vec<u64> {
    let base = Instant::now();
    let rfifo = Arc::new(RFifoLock::new(()));
    let pl = Arc::new(ReentrantMutex::new(()));
    let released_at = Arc::new(AtomicU64::new(0));
    // Round number the worker may start; the worker sets `calling` just before it locks and
    // `done` once it has unlocked (else an unfair lock would let main barge back in first).
    let go = Arc::new(AtomicU64::new(0));
    let calling = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let worker = {
        let (rfifo, pl, released_at, go, calling, done) = (
            rfifo.clone(),
            pl.clone(),
            released_at.clone(),
            go.clone(),
            calling.clone(),
            done.clone(),
        );
        thread::spawn(move || {
            let mut lat = Vec::with_capacity(rounds as usize);
            for round in 1..=rounds {
                while go.load(Ordering::Acquire) != round {
                    thread::yield_now();
                }
                calling.store(round, Ordering::Release);
                let acquired = match kind {
                    Handoff::RFifo => {
                        let _g = rfifo.lock();
                        base.elapsed().as_nanos() as u64
                    }
                    Handoff::ParkingLotFair | Handoff::ParkingLotUnfair => {
                        let _g = pl.lock();
                        base.elapsed().as_nanos() as u64
                    }
                };
                // Relaxed: the lock's hand-off orders the store before this load.
                lat.push(acquired.saturating_sub(released_at.load(Ordering::Relaxed)));
                done.store(round, Ordering::Release);
            }
            lat
        })
    };
    for round in 1..=rounds {
        let (g1, g2) = (rfifo.lock(), pl.lock());
        go.store(round, Ordering::Release);
        while calling.load(Ordering::Acquire) != round {
            thread::yield_now();
        }
        thread::sleep(PARK_TIME);
        released_at.store(base.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match kind {
            Handoff::RFifo => drop(g1),
            Handoff::ParkingLotFair => parking_lot::ReentrantMutexGuard::unlock_fair(g2),
            Handoff::ParkingLotUnfair => drop(g2),
        }
        while done.load(Ordering::Acquire) != round {
            thread::yield_now();
        }
    }
    let mut lat = worker.join().unwrap();
    lat.sort_unstable();
    lat
}

fn latency(out: &mut String, plan: Plan) {
    let rounds = plan.acquisitions / 20 + 5;
    writeln!(
        out,
        "\n### B10 hand-off latency to a sleeping waiter\n\n{} rounds per contender: main \
         holds the lock, the waiter calls `lock` and gets {} µs to fall asleep, main releases; \
         from just before the release to the waiter's return from `lock`.\n",
        rounds,
        PARK_TIME.as_micros()
    )
    .unwrap();
    writeln!(out, "| contender | p50 ns | p90 ns | p99 ns |").unwrap();
    writeln!(out, "|---|---:|---:|---:|").unwrap();
    for kind in [
        Handoff::RFifo,
        Handoff::ParkingLotFair,
        Handoff::ParkingLotUnfair,
    ] {
        let lat = latency_run(kind, rounds);
        writeln!(
            out,
            "| {} | {} | {} | {} |",
            kind.label(),
            percentile(&lat, 0.5),
            percentile(&lat, 0.9),
            percentile(&lat, 0.99)
        )
        .unwrap();
    }
}

fn main() {
    aio_benches::run_parts(
        "rfifolock",
        "B10: RFifoLock vs parking_lot::ReentrantMutex",
        "rfifolock.md",
        |sizes| match sizes {
            Sizes::Smoke => SMOKE,
            Sizes::Quick => QUICK,
            Sizes::Full => FULL,
        },
        &[
            ("B10_uncontended", uncontended),
            ("B10_handoff", handoff),
            ("B10_latency", latency),
        ],
    );
}
