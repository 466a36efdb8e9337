//! Quick side-by-side report of B1, B2 and B4 (docs/benchmarks.md), without criterion: plain
//! `Instant` timing, the median of 11 runs of 10⁶ operations after a warm-up, aio and tokio
//! interleaved run by run. Prints a Markdown table; with `AIO_BENCH_REPORT_DIR` set it also
//! writes `report.md` and a bar chart `report.svg` there (`cargo xtask bench` sets it).
//!
//! B4 has like-for-like rows (keys `B4_like_*`) next to its historical `notify` vs remote
//! `Handle::spawn` row: remote one-shot BHs against remote spawns (both allocate), round trips of
//! an existing BH against remote spawn and against `Notify::notify_one` to a parked task, and
//! `notify` against that `notify_one`. The notes under the table say what each B4 row measures
//! and what its workloads counted.
//!
//! B7 (timers, key `B7_timers`) gets its own table in the same report: each operation at
//! N = 0, 1 000, 100 000 and 1 000 000 pending timers, the median of 5 runs of 10⁵ operations,
//! against tokio's `sleep` (twice: time driver only, and `enable_all` inside a task, the shape
//! of the reference anchor) and async-io's `Timer`. It runs last, because its tokio fire
//! benchmark pauses a tokio clock (see `aio_benches::timer_load`).
//!
//! It is a `harness = false` bench target, so `cargo bench -p aio-benches [-- FILTER]` runs it
//! after the criterion benches; a FILTER runs the rows whose key contains it (the keys are the
//! criterion group names), and `report` runs them all. Without `--bench` (as under
//! `cargo test --benches`) it does a short smoke run and writes nothing.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use aio_benches::timer_load::{
    AsyncIoArm, FIRE_BATCH, OursArm, OursFire, PENDING, TokioArm, TokioFire,
};
use aio_benches::{
    AioBhBatch, AioBusyLoop, AioOneshot, BusyReport, REMOTE_BATCH, TokioBusyLoop, TokioSpawnBatch,
    machine, pin_current_thread, today, tokio_runtime, tokio_yield, verdict,
};

/// How much to measure.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Measured runs per side; the median is reported.
    runs: usize,
    /// Operations per run.
    ops: u64,
}

/// One line of the table.
#[derive(Debug)]
struct Row {
    /// Matched against the filter; the criterion group name (and K for batches).
    key: String,
    /// What the line compares.
    bench: String,
    /// Median ns per operation, aio.
    aio_ns: f64,
    /// Median ns per operation, tokio.
    tokio_ns: f64,
    /// aio loop system calls per operation.
    syscalls: f64,
    /// What the row's workloads counted (runs per operation), for the notes under the table.
    counts: Option<String>,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.tokio_ns / self.aio_ns
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ns_per_op(d: Duration, ops: u64) -> f64 {
    d.as_nanos() as f64 / ops as f64
}

/// Runs `aio` and `tokio` alternately, `plan.runs` times each after one warm-up run each, every
/// run covering about `plan.ops` operations in iterations of `per_iter` operations. Returns the
/// median ns per operation of each side.
fn measure_pair(
    plan: Plan,
    per_iter: u64,
    mut aio: impl FnMut(u64) -> Duration,
    mut tokio: impl FnMut(u64) -> Duration,
) -> (f64, f64) {
    let iters = (plan.ops / per_iter).max(1);
    let ops = iters * per_iter;
    let warm = (iters / 4).max(1);
    aio(warm);
    tokio(warm);
    let (mut a, mut t) = (Vec::with_capacity(plan.runs), Vec::with_capacity(plan.runs));
    for _ in 0..plan.runs {
        a.push(ns_per_op(aio(iters), ops));
        t.push(ns_per_op(tokio(iters), ops));
    }
    (median(a), median(t))
}

fn b1_single(plan: Plan) -> Row {
    let mut ours = AioBhBatch::new(1);
    let rt = tokio_runtime();
    let (aio_ns, tokio_ns) = measure_pair(plan, 1, |n| ours.run(n), |n| tokio_yield(&rt, n));
    Row {
        key: "B1_bh_schedule_dispatch".into(),
        bench: "B1 BH schedule + poll_nonblocking (1 BH) vs tokio `yield_now`".into(),
        aio_ns,
        tokio_ns,
        syscalls: ours.syscalls_per_op(),
        counts: None,
    }
}

fn b1_batch(plan: Plan, k: u64) -> Row {
    let mut ours = AioBhBatch::new(k as usize);
    let mut peer = TokioSpawnBatch::new(k);
    let (aio_ns, tokio_ns) = measure_pair(plan, k, |n| ours.run(n), |n| peer.run(n));
    Row {
        key: format!("B1_bh_batch/{k}"),
        bench: format!(
            "B1 batch: {k} BH{} + 1 poll, per BH, vs tokio spawn+await ×{k}",
            if k == 1 { "" } else { "s" }
        ),
        aio_ns,
        tokio_ns,
        syscalls: ours.syscalls_per_op(),
        counts: None,
    }
}

fn b2(plan: Plan) -> Row {
    let mut ours = AioOneshot::new(1000);
    let mut peer = TokioSpawnBatch::new(1000);
    let (aio_ns, tokio_ns) = measure_pair(plan, 1000, |n| ours.run(n), |n| peer.run(n));
    Row {
        key: "B2_oneshot_x1000".into(),
        bench: "B2 one-shot BH ×1000 + poll vs tokio spawn+await ×1000".into(),
        aio_ns,
        tokio_ns,
        syscalls: ours.syscalls_per_op(),
        counts: None,
    }
}

/// One timed run on a fresh busy loop, the same for every B4 workload: start the loop (its
/// thread on cpu0), `warm` untimed operations, then `n` timed ones; the loop's counters go
/// into `report`.
fn busy_run<L: BusyLoop>(
    start: fn(Option<usize>) -> L,
    op: fn(&mut L, u64) -> Duration,
    warm: u64,
    n: u64,
    report: &mut BusyReport,
) -> Duration {
    let mut l = start(Some(0));
    op(&mut l, warm);
    let d = op(&mut l, n);
    report.add(&l.stop());
    d
}

/// The busy loops of both sides, for [`busy_run`].
trait BusyLoop {
    fn stop(self) -> BusyReport;
}

impl BusyLoop for AioBusyLoop {
    fn stop(self) -> BusyReport {
        AioBusyLoop::stop(self)
    }
}

impl BusyLoop for TokioBusyLoop {
    fn stop(self) -> BusyReport {
        TokioBusyLoop::stop(self)
    }
}

fn b4(plan: Plan) -> Row {
    // This thread is the remote one (cpu1); each run starts a fresh busy loop on cpu0, warms it
    // up, measures, and stops it, so that only two threads are ever busy.
    let pin = pin_current_thread(1);
    let warm = (plan.ops / 10).max(1);
    let mut ours = BusyReport::default();
    let (aio_ns, tokio_ns) = measure_pair(
        plan,
        1,
        |n| busy_run(AioBusyLoop::start, AioBusyLoop::notify, warm, n, &mut ours),
        |n| {
            let mut l = TokioBusyLoop::start(Some(0));
            l.spawn(warm);
            let d = l.spawn(n);
            l.stop();
            d
        },
    );
    drop(pin);
    println!(
        "B4 aio: {} notifies, eventfd writes/notify = {:.6}, loop syscalls/notify = {:.6}, \
         busy-loop waits/iteration = {:.6} over {} iterations",
        ours.ops,
        ours.event_writes_per_op(),
        ours.syscalls_per_op(),
        ours.waits_per_loop_iteration(),
        ours.loop_iterations
    );
    Row {
        key: "B4_notify_busy_loop".into(),
        bench: "B4 `notify` to a busy loop vs tokio remote `Handle::spawn` to a busy rt".into(),
        aio_ns,
        tokio_ns,
        syscalls: ours.syscalls_per_op(),
        counts: None,
    }
}

/// Counts for the notes: remote runs per operation of each side.
fn runs_per_op(aio: &BusyReport, tokio: &[(&str, &BusyReport)]) -> String {
    let mut s = format!(
        "aio {:.6} runs/op over {} ops ({} loop iterations)",
        aio.remote_runs_per_op(),
        aio.ops,
        aio.loop_iterations
    );
    for (name, r) in tokio {
        let _ = write!(
            s,
            "; tokio {name} {:.6} runs/op over {} ops ({} busy-loop yields)",
            r.remote_runs_per_op(),
            r.ops,
            r.loop_iterations
        );
    }
    s
}

/// B4 like for like, allocating queued work: remote `schedule_oneshot` vs remote
/// `Handle::spawn`, batches of [`REMOTE_BATCH`] waited for, timed until all have run.
fn b4_like_oneshot(plan: Plan) -> Row {
    let pin = pin_current_thread(1);
    let warm = (plan.ops / 10).max(1);
    let (mut ours, mut theirs) = (BusyReport::default(), BusyReport::default());
    let (aio_ns, tokio_ns) = measure_pair(
        plan,
        1,
        |n| {
            busy_run(
                AioBusyLoop::start,
                AioBusyLoop::remote_oneshot,
                warm,
                n,
                &mut ours,
            )
        },
        |n| {
            busy_run(
                TokioBusyLoop::start,
                TokioBusyLoop::spawn_batches,
                warm,
                n,
                &mut theirs,
            )
        },
    );
    drop(pin);
    let counts = runs_per_op(&ours, &[("spawn", &theirs)]);
    println!("B4_like_oneshot_x1000: {counts}");
    Row {
        key: "B4_like_oneshot_x1000".into(),
        bench: format!(
            "B4 like: remote `schedule_oneshot` ×{REMOTE_BATCH} + wait vs tokio remote `spawn` \
             ×{REMOTE_BATCH} + wait"
        ),
        aio_ns,
        tokio_ns,
        syscalls: ours.syscalls_per_op(),
        counts: Some(counts),
    }
}

/// B4 like for like, reused queued work: round trips (queue, spin until it ran) of one existing
/// BH's `schedule`, against tokio remote `Handle::spawn` and `Notify::notify_one` to one parked
/// task, all three interleaved. A tenth of the other rows' operations: a round trip costs
/// about a cross-CPU wake-up.
fn b4_like_bh_round_trip(plan: Plan) -> Vec<Row> {
    let pin = pin_current_thread(1);
    let ops = (plan.ops / 10).max(1);
    let warm = (ops / 10).max(1);
    let mut ours = BusyReport::default();
    let mut spawn = BusyReport::default();
    let mut notify = BusyReport::default();
    let m = measure_all(
        plan.runs,
        ops,
        1,
        &mut [
            &mut |n| {
                busy_run(
                    AioBusyLoop::start,
                    AioBusyLoop::bh_round_trip,
                    warm,
                    n,
                    &mut ours,
                )
            },
            &mut |n| {
                busy_run(
                    TokioBusyLoop::start,
                    TokioBusyLoop::spawn_round_trip,
                    warm,
                    n,
                    &mut spawn,
                )
            },
            &mut |n| {
                busy_run(
                    TokioBusyLoop::with_parked_task,
                    TokioBusyLoop::notify_round_trip,
                    warm,
                    n,
                    &mut notify,
                )
            },
        ],
    );
    drop(pin);
    let counts = runs_per_op(&ours, &[("spawn", &spawn), ("notify_one", &notify)]);
    println!("B4_like_bh_round_trip: {counts}");
    vec![
        Row {
            key: "B4_like_bh_round_trip/spawn".into(),
            bench: "B4 like: remote BH `schedule` + wait vs tokio remote `spawn` + wait".into(),
            aio_ns: m[0],
            tokio_ns: m[1],
            syscalls: ours.syscalls_per_op(),
            counts: Some(counts.clone()),
        },
        Row {
            key: "B4_like_bh_round_trip/notify".into(),
            bench: "B4 like: remote BH `schedule` + wait vs tokio `notify_one` to a parked task \
                    + wait"
                .into(),
            aio_ns: m[0],
            tokio_ns: m[2],
            syscalls: ours.syscalls_per_op(),
            counts: Some(counts),
        },
    ]
}

/// B4 like for like, a bare wake-up: `notify` vs `Notify::notify_one` to a task parked in the
/// busy runtime; only the calls are timed, as in the B4 row.
fn b4_like_notify(plan: Plan) -> Row {
    let pin = pin_current_thread(1);
    let warm = (plan.ops / 10).max(1);
    let (mut ours, mut theirs) = (BusyReport::default(), BusyReport::default());
    let (aio_ns, tokio_ns) = measure_pair(
        plan,
        1,
        |n| busy_run(AioBusyLoop::start, AioBusyLoop::notify, warm, n, &mut ours),
        |n| {
            busy_run(
                TokioBusyLoop::with_parked_task,
                TokioBusyLoop::notify_one,
                warm,
                n,
                &mut theirs,
            )
        },
    );
    drop(pin);
    let counts = format!(
        "aio {} notifies, {} loop iterations (no work queued), eventfd writes/notify = {:.6}; \
         tokio {} notify_one calls, task wakes/call = {:.6} (coalesced; includes the untimed \
         check wake of each run), {} busy-loop yields",
        ours.ops,
        ours.loop_iterations,
        ours.event_writes_per_op(),
        theirs.ops,
        theirs.remote_runs_per_op(),
        theirs.loop_iterations
    );
    println!("B4_like_notify: {counts}");
    Row {
        key: "B4_like_notify".into(),
        bench: "B4 like: `notify` vs tokio `Notify::notify_one` to a task parked in a busy rt"
            .into(),
        aio_ns,
        tokio_ns,
        syscalls: ours.syscalls_per_op(),
        counts: Some(counts),
    }
}

/// What each B4 row measures, for the notes under the table (only for the rows present).
fn b4_notes(rows: &[Row]) -> String {
    const NOTES: &[(&str, &str)] = &[
        (
            "B4_notify_busy_loop",
            "aio `ContextHandle::notify` (queues no work; the loop only clears `notified`) \
             against tokio `Handle::spawn(async {})` (allocates and queues a task): not like for \
             like, kept as the docs/benchmarks.md row. Only the calls on the remote thread are timed; \
             tokio's tasks are drained untimed.",
        ),
        (
            "B4_like_oneshot_x1000",
            "both queue work that allocates: aio `ContextHandle::schedule_oneshot` (node + boxed \
             callback) against tokio `Handle::spawn` (task). Batches of 1 000 from the remote \
             thread, which then spins until the busy loop has run the whole batch; the time runs \
             from the first call until the last run, so it includes the loop's dispatch and free. \
             Each callback or task counts its run on the loop's thread; exactly one run per \
             operation is asserted.",
        ),
        (
            "B4_like_bh_round_trip",
            "round trips: the remote thread queues one unit of work and spins until it has run \
             (counted, exactly once per operation, asserted) before the next. aio: \
             `BottomHalf::schedule` of one BH created once (waiting is what stops schedules \
             coalescing). tokio: `Handle::spawn` of a new task (`/spawn`), and \
             `Notify::notify_one` to one task parked on `notified()` (`/notify`: an existing task, \
             as the BH is existing). The aio figure is shared by both lines. 10× fewer \
             operations per run than the other rows.",
        ),
        (
            "B4_like_notify",
            "a bare wake-up from another thread: aio `notify` against tokio \
             `Notify::notify_one` to a task parked in the busy runtime, tokio's cheapest way to \
             make it run something for another thread (it needs a task to wake). Only the calls \
             are timed. Both coalesce: aio's loop clears one `notified` flag per iteration, \
             tokio's task takes one wake or stored permit per run.",
        ),
    ];
    let mut s = String::new();
    for (key, note) in NOTES {
        if let Some(r) = rows.iter().find(|r| r.key.starts_with(key)) {
            let _ = writeln!(s, "- `{key}`: {note}");
            if let Some(c) = &r.counts {
                let _ = writeln!(s, "  Counted: {c}.");
            }
        }
    }
    s
}

/// One B7 line: an operation at one N, ours and each peer's equivalent (ns per operation).
#[derive(Debug)]
struct B7Row {
    op: &'static str,
    n: usize,
    aio: f64,
    tokio: Option<f64>,
    tokio_io: Option<f64>,
    async_io: Option<f64>,
}

/// Runs every closure alternately, `runs` times each after one warm-up run each, every run
/// covering about `ops` operations in iterations of `per_iter` operations. Returns the median
/// ns per operation of each.
fn measure_all(
    runs: usize,
    ops: u64,
    per_iter: u64,
    sides: &mut [&mut dyn FnMut(u64) -> Duration],
) -> Vec<f64> {
    let iters = (ops / per_iter).max(1);
    let total = iters * per_iter;
    for side in sides.iter_mut() {
        side((iters / 4).max(1));
    }
    let mut samples = vec![Vec::with_capacity(runs); sides.len()];
    for _ in 0..runs {
        for (side, v) in sides.iter_mut().zip(&mut samples) {
            v.push(ns_per_op(side(iters), total));
        }
    }
    samples.into_iter().map(median).collect()
}

/// B7 at every N: arm+cancel, create+arm+drop, re-arm and next-deadline, then (after all of
/// them, as a paused tokio clock slows tokio down for the rest of the process) fire.
fn b7(plan: Plan) -> Vec<B7Row> {
    // A tenth of the other rows' operations: a million pending async-io timers cost ~1.5 µs per
    // operation, and four pending sets of up to a million timers have to be built.
    let (runs, ops) = (plan.runs.min(5), (plan.ops / 10).max(1024));
    let pending: &[usize] = if plan.ops >= 1_000_000 {
        &PENDING
    } else {
        &PENDING[..2]
    };
    let mut rows = Vec::new();
    for &n in pending {
        // Two closures use `ours`; each workload times itself, so the RefCell is not measured.
        let ours = std::cell::RefCell::new(OursArm::new(n));
        let mut tokio = TokioArm::new(n, false);
        let mut tokio_io = TokioArm::new(n, true);
        let mut async_io = AsyncIoArm::new(n);
        let m = measure_all(
            runs,
            ops,
            1,
            &mut [
                &mut |i| ours.borrow_mut().arm_cancel(i),
                &mut |i| ours.borrow_mut().create_arm_drop(i),
                &mut |i| tokio.register_drop(i),
                &mut |i| tokio_io.register_drop_in_task(i),
                &mut |i| async_io.register_drop(i),
            ],
        );
        let (tokio_reg, tokio_io_reg, async_io_reg) = (Some(m[2]), Some(m[3]), Some(m[4]));
        rows.push(B7Row {
            op: "arm+cancel (aio: existing timer; peers: create, register, drop)",
            n,
            aio: m[0],
            tokio: tokio_reg,
            tokio_io: tokio_io_reg,
            async_io: async_io_reg,
        });
        rows.push(B7Row {
            op: "create+arm+drop (aio) vs the same peer numbers",
            n,
            aio: m[1],
            tokio: tokio_reg,
            tokio_io: tokio_io_reg,
            async_io: async_io_reg,
        });
        let m = measure_all(
            runs,
            ops,
            1,
            &mut [
                &mut |i| ours.borrow_mut().rearm(i),
                &mut |i| tokio.reset(i),
                &mut |i| tokio_io.reset(i),
                &mut |i| async_io.set_after(i),
            ],
        );
        rows.push(B7Row {
            op: "re-arm an armed timer (tokio `reset`, async-io `set_after`)",
            n,
            aio: m[0],
            tokio: Some(m[1]),
            tokio_io: Some(m[2]),
            async_io: Some(m[3]),
        });
        let m = measure_all(
            runs,
            ops,
            1,
            &mut [&mut |i| ours.borrow_mut().next_deadline(i)],
        );
        rows.push(B7Row {
            op: "next deadline (`group.deadline()`; no peer API)",
            n,
            aio: m[0],
            tokio: None,
            tokio_io: None,
            async_io: None,
        });
    }
    for &n in pending {
        let mut ours = OursFire::new(n);
        let mut tokio = TokioFire::new(n);
        let batch = FIRE_BATCH as u64;
        let m = measure_all(
            runs,
            ops,
            batch,
            &mut [&mut |i| ours.arm_fire(i), &mut |i| tokio.advance_fire(i)],
        );
        rows.push(B7Row {
            op: "arm+fire, per timer, batches of 1 000 (tokio: paused clock)",
            n,
            aio: m[0],
            tokio: Some(m[1]),
            tokio_io: None,
            async_io: None,
        });
    }
    rows
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{v:.1}"))
}

fn b7_table(rows: &[B7Row]) -> String {
    let mut s = String::new();
    s.push_str(
        "| B7 operation | N pending | aio ns/op | tokio ns/op (time driver) | tokio ns/op \
         (enable_all, in task) | async-io ns/op | tokio/aio | tokio (enable_all)/aio |\n",
    );
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let ratio = |p: Option<f64>| p.map_or_else(|| "—".into(), |p| format!("{:.1}×", p / r.aio));
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {} | {} | {} | {} | {} |",
            r.op,
            r.n,
            r.aio,
            fmt_opt(r.tokio),
            fmt_opt(r.tokio_io),
            fmt_opt(r.async_io),
            ratio(r.tokio),
            ratio(r.tokio_io)
        );
    }
    s
}

/// The B7 target line: ≥ 5× faster than tokio sleep register+cancel at every N.
fn b7_targets(rows: &[B7Row]) -> String {
    let arm: Vec<&B7Row> = rows
        .iter()
        .filter(|r| r.op.starts_with("arm+cancel"))
        .collect();
    if arm.is_empty() {
        return String::new();
    }
    let min = |f: &dyn Fn(&B7Row) -> Option<f64>| {
        arm.iter()
            .filter_map(|r| f(r).map(|p| p / r.aio))
            .fold(f64::INFINITY, f64::min)
    };
    let floor = min(&|r| r.tokio);
    let anchor = min(&|r| r.tokio_io);
    let worst = arm.iter().map(|r| r.aio).fold(0.0, f64::max);
    format!(
        "- B7 ≥ 5× tokio sleep register+cancel at every N: vs tokio with the I/O driver, as the \
         620–690 ns anchor was measured: {} (min {:.1}×); vs tokio's time driver alone: {} \
         (min {:.1}×); aio arm+cancel ≲ 125 ns at every N: {} (max {:.1} ns)\n",
        verdict(anchor >= 5.0),
        anchor,
        verdict(floor >= 5.0),
        floor,
        verdict(worst <= 125.0),
        worst
    )
}

fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("| bench | aio ns/op | tokio ns/op | ratio (tokio/aio) | aio syscalls/op |\n");
    s.push_str("|---|---:|---:|---:|---:|\n");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.1} | {:.1}× | {} |",
            r.bench,
            r.aio_ns,
            r.tokio_ns,
            r.ratio(),
            fmt_syscalls(r.syscalls)
        );
    }
    s
}

fn fmt_syscalls(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else {
        format!("{x:.6}")
    }
}

/// The docs/benchmarks.md targets that the rows measured, each with its verdict.
fn targets(rows: &[Row]) -> String {
    let mut s = String::new();
    let find = |key: &str| rows.iter().find(|r| r.key == key);
    if let Some(r) = find("B1_bh_schedule_dispatch") {
        let _ = writeln!(
            s,
            "- B1 ≤ 30 ns/op: {} ({:.1} ns); 0 syscalls: {} ({}); ≥ 10× tokio `yield_now`: {} \
             ({:.1}×)",
            verdict(r.aio_ns <= 30.0),
            r.aio_ns,
            verdict(r.syscalls == 0.0),
            fmt_syscalls(r.syscalls),
            verdict(r.ratio() >= 10.0),
            r.ratio()
        );
    }
    if let Some(r) = find("B2_oneshot_x1000") {
        let _ = writeln!(
            s,
            "- B2 ≥ 3× tokio spawn + await: {} ({:.1}×)",
            verdict(r.ratio() >= 3.0),
            r.ratio()
        );
    }
    if let Some(r) = find("B4_notify_busy_loop") {
        let _ = writeln!(
            s,
            "- B4 0 syscalls: {} ({}); ≤ 20 ns: {} ({:.1} ns)",
            verdict(r.syscalls == 0.0),
            fmt_syscalls(r.syscalls),
            verdict(r.aio_ns <= 20.0),
            r.aio_ns
        );
    }
    s
}

fn markdown(rows: &[Row], b7: &[B7Row], plan: Plan) -> String {
    let mut s = format!(
        "# aio side-by-side benchmark report\n\n\
         Generated {} on {} by `benches/report.rs` (median of {} runs of ~{} ops each, after a \
         warm-up; aio and tokio interleaved in the same process).\n\n",
        today(),
        machine(),
        plan.runs,
        plan.ops,
    );
    if !rows.is_empty() {
        let _ = write!(
            s,
            "{}\nTargets (docs/benchmarks.md):\n\n{}",
            table(rows),
            targets(rows)
        );
        let notes = b4_notes(rows);
        if !notes.is_empty() {
            let _ = write!(
                s,
                "\nB4 rows (a remote thread on cpu1, the busy loop on cpu0):\n\n{notes}"
            );
        }
    }
    if !b7.is_empty() {
        let _ = write!(
            s,
            "\n## B7 timers\n\n\
             Median of {} interleaved runs of ~{} ops; N timers pending at random deadlines \
             1 ms–60 s. aio: `timers` crate (indexed 4-ary heap). Peers: tokio `sleep` polled \
             once and dropped (time driver only, no-op waker), the same inside `block_on` on an \
             `enable_all` runtime (the anchor's shape; each registration also writes tokio's \
             eventfd), async-io `Timer`.\n\n{}\n{}",
            plan.runs.min(5),
            (plan.ops / 10).max(1024),
            b7_table(b7),
            b7_targets(b7)
        );
    }
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('`', "")
}

fn fmt_ns(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2} µs", v / 1000.0)
    } else {
        format!("{v:.1} ns")
    }
}

/// A horizontal grouped bar chart (aio vs tokio per row) on a log-scale ns axis.
fn svg(rows: &[Row]) -> String {
    const LABEL_W: f64 = 470.0;
    const PLOT_W: f64 = 440.0;
    const ROW_H: f64 = 46.0;
    const TOP: f64 = 56.0;
    let width = LABEL_W + PLOT_W + 90.0;
    let height = TOP + ROW_H * rows.len() as f64 + 40.0;
    let values = rows.iter().flat_map(|r| [r.aio_ns, r.tokio_ns]);
    let min = values.clone().fold(f64::INFINITY, f64::min).max(0.1);
    let max = values.fold(0.0, f64::max).max(min * 10.0);
    let lo = min.log10().floor();
    let hi = max.log10().ceil();
    let x = |v: f64| LABEL_W + (v.max(0.1).log10() - lo) / (hi - lo) * PLOT_W;

    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(
        s,
        "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"15\" font-weight=\"bold\">aio vs tokio current_thread: \
         ns per operation (log scale, shorter is better)</text>\n\
         <rect x=\"10\" y=\"32\" width=\"12\" height=\"12\" fill=\"#1f77b4\"/>\
         <text x=\"27\" y=\"43\">aio</text>\n\
         <rect x=\"70\" y=\"32\" width=\"12\" height=\"12\" fill=\"#ff7f0e\"/>\
         <text x=\"87\" y=\"43\">tokio</text>"
    );
    let bottom = TOP + ROW_H * rows.len() as f64;
    let mut decade = lo;
    while decade <= hi {
        let v = 10f64.powf(decade);
        let gx = x(v);
        let _ = writeln!(
            s,
            "<line x1=\"{gx:.1}\" y1=\"{TOP}\" x2=\"{gx:.1}\" y2=\"{bottom}\" stroke=\"#ccc\"/>\
             <text x=\"{gx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            bottom + 16.0,
            fmt_ns(v).replace(".0 ", " ").replace(".00 ", " ")
        );
        decade += 1.0;
    }
    for (i, r) in rows.iter().enumerate() {
        let y = TOP + ROW_H * i as f64;
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#555\">tokio/aio = {:.1}×, \
             aio syscalls/op = {}</text>",
            LABEL_W - 8.0,
            y + 20.0,
            xml_escape(&r.bench),
            LABEL_W - 8.0,
            y + 35.0,
            r.ratio(),
            fmt_syscalls(r.syscalls)
        );
        for (j, (v, color)) in [(r.aio_ns, "#1f77b4"), (r.tokio_ns, "#ff7f0e")]
            .into_iter()
            .enumerate()
        {
            let by = y + 8.0 + 16.0 * j as f64;
            let w = (x(v) - LABEL_W).max(1.0);
            let _ = writeln!(
                s,
                "<rect x=\"{LABEL_W}\" y=\"{by:.1}\" width=\"{w:.1}\" height=\"14\" \
                 fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                LABEL_W + w + 4.0,
                by + 11.0,
                fmt_ns(v)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

fn write_report(dir: &Path, rows: &[Row], b7: &[B7Row], plan: Plan) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("report.md"), markdown(rows, b7, plan))?;
    if !rows.is_empty() {
        std::fs::write(dir.join("report.svg"), svg(rows))?;
    }
    Ok(())
}

fn main() {
    let args = aio_benches::BenchArgs::parse();
    if args.list {
        return;
    }
    let plan = if args.bench {
        Plan {
            runs: 11,
            ops: 1_000_000,
        }
    } else {
        Plan { runs: 1, ops: 4096 }
    };
    let mut rows = Vec::new();
    if args.wants("report", "B1_bh_schedule_dispatch") {
        rows.push(b1_single(plan));
    }
    for k in [1, 16, 256] {
        if args.wants("report", &format!("B1_bh_batch/{k}")) {
            rows.push(b1_batch(plan, k));
        }
    }
    if args.wants("report", "B2_oneshot_x1000") {
        rows.push(b2(plan));
    }
    if args.wants("report", "B4_notify_busy_loop") {
        rows.push(b4(plan));
    }
    if args.wants("report", "B4_like_oneshot_x1000") {
        rows.push(b4_like_oneshot(plan));
    }
    if args.wants("report", "B4_like_bh_round_trip") {
        rows.extend(b4_like_bh_round_trip(plan));
    }
    if args.wants("report", "B4_like_notify") {
        rows.push(b4_like_notify(plan));
    }
    // Last: its fire benchmark pauses a tokio clock, which slows tokio for the rest of the run.
    let b7_rows = if args.wants("report", "B7_timers") {
        b7(plan)
    } else {
        Vec::new()
    };
    if rows.is_empty() && b7_rows.is_empty() {
        return;
    }
    println!("\n{}", markdown(&rows, &b7_rows, plan));
    if !args.bench {
        println!("(smoke run: no --bench flag, nothing written)");
        return;
    }
    if let Some(dir) = std::env::var_os("AIO_BENCH_REPORT_DIR") {
        let dir = Path::new(&dir);
        match write_report(dir, &rows, &b7_rows, plan) {
            Ok(()) => println!("report written to {}", dir.join("report.md").display()),
            Err(e) => {
                eprintln!("report: cannot write to {}: {e}", dir.display());
                std::process::exit(1);
            }
        }
    }
}
