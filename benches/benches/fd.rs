//! B5 and B6 (docs/benchmarks.md): aio's fd backends (poll, epoll, io_uring) next to mio, polling and
//! the raw system-call floors, every implementation of a row in the same criterion group; then a
//! report of its own, built from the very samples criterion measured.
//!
//! * `B5_fd_dispatch/<impl>/<N>`: readiness dispatch with N = 1, 100, 10 000 idle eventfds
//!   registered besides one active socketpair; ns per dispatch (write 1 byte, one loop
//!   iteration, the handler reads it). See `aio_benches::fd` for the exact workloads.
//! * `B6_churn_<op>/<impl>/<K>`: handler add + remove, replace, or add-all / remove-all of K
//!   eventfds, with one non-blocking loop iteration per K operations; ns per operation.
//!
//! Rows that need io_uring are skipped, with the reason printed, where
//! `aio::UringMonitor::probe` fails. The soft `RLIMIT_NOFILE` is raised as far as N = 10 000
//! needs (printed); if the hard limit is too low, the N = 10 000 rows are skipped.
//!
//! The report: with `--bench` (as `cargo bench` passes) it prints Markdown tables (B5 scaling in
//! N per implementation, aio against each peer and floor with ratios, B6 per operation, and the
//! verdicts against §8), and with `AIO_BENCH_REPORT_DIR` set it also writes `fd-report.md` and
//! `fd-report.svg` (ns per dispatch against N, log-log) there, next to `report.rs`'s report.
//!
//! The report's figures come from a second, interleaved pass over the same workloads, kept alive
//! after criterion has timed them: over all rows of B5, then of B6, it runs every row for ~10 ms
//! in turn, [`ROUNDS`] times after a warm-up round, and takes each one's median. On these VMs the cost of the same system calls drifts by 20 % or
//! more over the minutes a criterion run takes (the host moves the vCPUs), so only numbers
//! taken side by side make trustworthy ratios; `report.rs` interleaves for the same reason.
//! Criterion's own medians (of its samples' time per operation) are listed in an appendix.
//! Under `cargo test --benches` (criterion's test mode) every row runs once, there is no second
//! pass, and nothing is written. System calls per operation are counted separately, under
//! strace, by `examples/fd_syscalls.rs`.

use std::fmt::Write as _;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use aio_benches::fd::{
    AioBackend, CHURN_BATCHES, ChurnOp, IDLE_COUNTS, Impl, MAX_IDLE, Workload, eventfds,
    io_uring_unavailable, raise_nofile,
};
use aio_benches::{machine, today, verdict};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput};

/// Samples per row: criterion's minimum, so that ~50 rows fit in about three minutes.
const SAMPLE_SIZE: usize = 10;
/// fds the run may hold at once besides the idle ones: every row's workload is kept for the
/// interleaved pass (contexts, rings, socketpairs, B6's eventfds), plus the process's own.
const FD_MARGIN: u64 = 1024;
/// Measured rounds of the interleaved pass, after one warm-up round.
const ROUNDS: usize = 11;
/// Time one implementation runs per round of the interleaved pass.
const ROUND_RUN: Duration = Duration::from_millis(10);

/// One measured row.
#[derive(Debug, Clone)]
struct Row {
    /// The criterion group: `B5_fd_dispatch` or `B6_churn_<op>`.
    group: String,
    imp: Impl,
    /// N for B5, K for B6.
    param: usize,
    /// Median ns per operation (dispatch, add + remove pair, or replace) of the interleaved
    /// pass (criterion's, when there is none).
    ns: f64,
    /// Criterion's median ns per operation.
    crit_ns: f64,
    /// aio rows: backend waits per operation.
    waits: Option<f64>,
}

/// What the command line asked for.
#[derive(Debug)]
struct Args {
    /// `--bench`: a real measurement (else criterion's test mode, or a listing).
    bench: bool,
    /// `--sample-size`, to know which of the routine's calls are the measurement samples.
    sample_size: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        bench: false,
        sample_size: SAMPLE_SIZE,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bench" => args.bench = true,
            "--sample-size" => {
                if let Some(n) = it.next().and_then(|v| v.parse().ok()) {
                    args.sample_size = n;
                }
            }
            _ => {}
        }
    }
    args
}

/// What the rows share: the idle fds and what the machine allows.
struct Setup {
    idle: Vec<Rc<OwnedFd>>,
    /// The B5 N values this process can hold.
    counts: Vec<usize>,
    /// Why io_uring rows are skipped, if they are.
    no_uring: Option<String>,
    /// Lines for the report header: the fd limit and io_uring.
    notes: Vec<String>,
}

impl Setup {
    fn new() -> Setup {
        let mut notes = Vec::new();
        let mut counts = IDLE_COUNTS.to_vec();
        match raise_nofile(MAX_IDLE as u64 + FD_MARGIN) {
            Ok(line) => notes.push(line),
            Err(why) => {
                counts.retain(|&n| n < MAX_IDLE);
                notes.push(format!("{why}: the N = {MAX_IDLE} rows are skipped"));
            }
        }
        let no_uring = io_uring_unavailable();
        notes.push(match &no_uring {
            None => "io_uring available (UringMonitor::probe succeeded)".to_owned(),
            Some(why) => format!("io_uring unavailable ({why}): io_uring rows skipped"),
        });
        for line in &notes {
            println!("fd bench: {line}");
        }
        let max = counts.iter().copied().max().unwrap_or(0);
        let idle = eventfds(max).expect("fd bench: cannot create the idle eventfds");
        Setup {
            idle,
            counts,
            no_uring,
            notes,
        }
    }

    fn runs(&self, imp: Impl) -> bool {
        self.no_uring.is_none() || !imp.needs_io_uring()
    }
}

/// Benches one row, building its workload only if criterion runs it (not filtered out), and
/// returns the median ns per operation over the measurement samples with the workload, kept
/// for the interleaved pass; `None` if the row did not run.
fn bench_row<'a>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    args: &Args,
    imp: Impl,
    param: usize,
    ops_per_iter: u64,
    make: impl FnOnce() -> std::io::Result<Box<dyn Workload + 'a>>,
) -> Option<(f64, Box<dyn Workload + 'a>)> {
    let name = format!("{}/{param}", imp.name());
    let id = BenchmarkId::new(imp.name(), param);
    let mut make = Some(make);
    let mut workload: Option<Box<dyn Workload + 'a>> = None;
    let mut samples: Vec<(u64, Duration)> = Vec::new();
    g.bench_function(id, |b| {
        let w = workload.get_or_insert_with(|| {
            let make = make.take().expect("built twice");
            make().unwrap_or_else(|e| panic!("fd bench: cannot set up {name}: {e}"))
        });
        b.iter_custom(|iters| {
            let d = w.run(iters);
            samples.push((iters, d));
            d
        });
    });
    let w = workload?;
    // Criterion warms up first (doubling iteration counts), then takes exactly `sample_size`
    // samples: the last calls are the measurement.
    let keep = if args.bench { args.sample_size } else { 1 };
    let per_op: Vec<f64> = samples[samples.len().saturating_sub(keep)..]
        .iter()
        .map(|&(iters, d)| d.as_nanos() as f64 / (iters * ops_per_iter) as f64)
        .collect();
    Some((median(per_op), w))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A row measured by criterion, waiting for the interleaved pass.
struct Pending<'a> {
    row: Row,
    ops_per_iter: u64,
    workload: Box<dyn Workload + 'a>,
}

/// The interleaved pass over the rows of one benchmark (all of B5, or all of B6, so that ratios
/// across N and K are taken side by side too): sets each row's `ns` and `waits`. Odd rounds go
/// through the rows backwards, so that no row always follows the same one.
fn interleave(group: &mut [Pending<'_>], bench: bool) -> Vec<Row> {
    if bench && group.len() > 1 {
        let iters: Vec<u64> = group
            .iter()
            .map(|p| {
                let per_iter = p.row.crit_ns * p.ops_per_iter as f64;
                ((ROUND_RUN.as_nanos() as f64 / per_iter) as u64).clamp(3, 10_000_000)
            })
            .collect();
        let mut samples = vec![Vec::with_capacity(ROUNDS); group.len()];
        for round in 0..=ROUNDS {
            for j in 0..group.len() {
                let i = if round % 2 == 0 {
                    j
                } else {
                    group.len() - 1 - j
                };
                let p = &mut group[i];
                let d = p.workload.run(iters[i]);
                if round > 0 {
                    samples[i].push(d.as_nanos() as f64 / (iters[i] * p.ops_per_iter) as f64);
                }
            }
        }
        for (p, s) in group.iter_mut().zip(samples) {
            p.row.ns = median(s);
        }
    }
    group
        .iter()
        .map(|p| Row {
            waits: p.workload.waits_per_op(),
            ..p.row.clone()
        })
        .collect()
}

/// B5: readiness dispatch, ns per dispatch, for each N and implementation.
fn b5(c: &mut Criterion, setup: &Setup, args: &Args, rows: &mut Vec<Row>) {
    const GROUP: &str = "B5_fd_dispatch";
    let mut g = c.benchmark_group(GROUP);
    g.throughput(Throughput::Elements(1));
    let mut pending = Vec::new();
    for &n in &setup.counts {
        let idle = &setup.idle[..n];
        for imp in Impl::B5 {
            if !setup.runs(imp) {
                continue;
            }
            if let Some((ns, w)) = bench_row(&mut g, args, imp, n, 1, || imp.dispatch(idle)) {
                if let Some(waits) = w.waits_per_op() {
                    println!(
                        "{GROUP}/{}/{n}: aio loop waits/dispatch = {waits:.6}",
                        imp.name()
                    );
                }
                pending.push(Pending {
                    row: Row {
                        group: GROUP.into(),
                        imp,
                        param: n,
                        ns,
                        crit_ns: ns,
                        waits: None,
                    },
                    ops_per_iter: 1,
                    workload: w,
                });
            }
        }
    }
    g.finish();
    let start = Instant::now();
    rows.extend(interleave(&mut pending, args.bench));
    if args.bench {
        println!(
            "B5 interleaved pass: {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
}

/// B6: handler churn, ns per operation, for each operation, K and implementation.
fn b6(c: &mut Criterion, setup: &Setup, args: &Args, rows: &mut Vec<Row>) {
    let mut pending = Vec::new();
    for op in ChurnOp::ALL {
        let group = format!("B6_churn_{}", op.name());
        let mut g = c.benchmark_group(&group);
        for k in CHURN_BATCHES {
            g.throughput(Throughput::Elements(k as u64));
            for imp in Impl::B6 {
                if !setup.runs(imp) {
                    continue;
                }
                let Some((ns, w)) = bench_row(&mut g, args, imp, k, k as u64, || imp.churn(op, k))
                else {
                    continue;
                };
                if let Some(waits) = w.waits_per_op() {
                    println!("{group}/{}/{k}: aio loop waits/op = {waits:.6}", imp.name());
                }
                pending.push(Pending {
                    row: Row {
                        group: group.clone(),
                        imp,
                        param: k,
                        ns,
                        crit_ns: ns,
                        waits: None,
                    },
                    ops_per_iter: k as u64,
                    workload: w,
                });
            }
        }
        g.finish();
    }
    let start = Instant::now();
    rows.extend(interleave(&mut pending, args.bench));
    if args.bench {
        println!(
            "B6 interleaved pass: {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

fn find<'r>(rows: &'r [Row], group: &str, imp: Impl, param: usize) -> Option<&'r Row> {
    rows.iter()
        .find(|r| r.group == group && r.imp == imp && r.param == param)
}

fn fmt_ns(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} µs", v / 1000.0)
    } else {
        format!("{v:.0} ns")
    }
}

/// An axis label for a power of ten of nanoseconds: `100 ns`, `10 µs`, `1 ms`.
fn decade_label(v: f64) -> String {
    if v >= 1e6 {
        format!("{} ms", v / 1e6)
    } else if v >= 1e3 {
        format!("{} µs", v / 1e3)
    } else {
        format!("{v} ns")
    }
}

fn cell(r: Option<&Row>) -> String {
    r.map_or_else(|| "–".into(), |r| fmt_ns(r.ns))
}

fn ratio(a: Option<&Row>, b: Option<&Row>) -> Option<f64> {
    Some(a?.ns / b?.ns)
}

fn fmt_ratio(x: Option<f64>) -> String {
    x.map_or_else(|| "–".into(), |x| format!("{x:.2}×"))
}

/// The floor each aio backend is held to.
fn floor_of(b: AioBackend) -> Impl {
    match b {
        AioBackend::Poll => Impl::RawPoll,
        AioBackend::Epoll => Impl::RawEpoll,
        AioBackend::IoUring => Impl::RawIoUring,
    }
}

fn b5_tables(rows: &[Row], counts: &[usize]) -> String {
    const G: &str = "B5_fd_dispatch";
    let mut s = String::new();
    if !rows.iter().any(|r| r.group == G) {
        return s;
    }
    s.push_str(
        "## B5: fd readiness dispatch (ns per dispatch)\n\n\
         One dispatch: write 1 byte to a socketpair, one loop iteration (a blocking wait, which \
         returns at once), the handler reads the byte; N idle eventfds are registered besides. \
         The last column is the scaling in N: 1.00× is flat.\n\n| implementation |",
    );
    for n in counts {
        let _ = write!(s, " N = {n} |");
    }
    let (first, last) = (counts[0], counts[counts.len() - 1]);
    let _ = writeln!(s, " N = {last} / N = {first} | aio waits/dispatch |");
    s.push_str("|---|");
    for _ in counts {
        s.push_str("---:|");
    }
    s.push_str("---:|---:|\n");
    for imp in Impl::B5 {
        let cells: Vec<_> = counts.iter().map(|&n| find(rows, G, imp, n)).collect();
        if cells.iter().all(Option::is_none) {
            continue;
        }
        let _ = write!(s, "| {} |", imp.name());
        for c in &cells {
            let _ = write!(s, " {} |", cell(*c));
        }
        let waits = cells
            .iter()
            .flatten()
            .filter_map(|r| r.waits)
            .map(|w| format!("{w:.2}"))
            .collect::<Vec<_>>();
        let _ = writeln!(
            s,
            " {} | {} |",
            fmt_ratio(ratio(cells[cells.len() - 1], cells[0])),
            if waits.is_empty() {
                "–".into()
            } else {
                waits.join(" / ")
            }
        );
    }
    s.push_str(
        "\n### aio against its floor and the peers, same N\n\n\
         Ratios are aio / other: below 1.00× aio is faster. Each backend's floor is the same \
         mechanism called directly: `poll(2)`, `epoll_wait`, or an io_uring `POLL_ADD` \
         submitted and waited for in one `io_uring_enter`.\n\n\
         | aio backend | N | aio | floor | aio / floor | mio | aio / mio | polling | aio / polling |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for b in AioBackend::ALL {
        for &n in counts {
            let ours = find(rows, G, Impl::Aio(b), n);
            if ours.is_none() {
                continue;
            }
            let floor = find(rows, G, floor_of(b), n);
            let mio = find(rows, G, Impl::Mio, n);
            let polling = find(rows, G, Impl::Polling, n);
            let _ = writeln!(
                s,
                "| {} | {n} | {} | {} {} | {} | {} | {} | {} | {} |",
                b.name(),
                cell(ours),
                floor_of(b).name(),
                cell(floor),
                fmt_ratio(ratio(ours, floor)),
                cell(mio),
                fmt_ratio(ratio(ours, mio)),
                cell(polling),
                fmt_ratio(ratio(ours, polling)),
            );
        }
    }
    s.push('\n');
    s
}

fn b6_tables(rows: &[Row]) -> String {
    let mut s = String::new();
    if !rows.iter().any(|r| r.group.starts_with("B6")) {
        return s;
    }
    s.push_str(
        "## B6: handler churn (ns per operation)\n\n\
         K operations, then one non-blocking loop iteration (aio `poll_nonblocking`, mio \
         `poll(0)`, polling `wait(0)`), whose cost is shared by the K. `add_remove`: register \
         a handler for one eventfd and drop it (one operation = the pair); `replace`: \
         `HandlerBuilder::replace` of one handler (mio `reregister`, polling `modify`, with a \
         new token); `toggle`: register K eventfds, poll, remove them all, poll (one operation \
         = one add + remove pair, each change reaching the kernel). Ratios are aio / mio.\n\n\
         | operation | K | aio poll | aio epoll | aio io_uring | mio | polling | poll / mio | \
         epoll / mio | io_uring / mio | aio waits/op (poll, epoll, io_uring) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for op in ChurnOp::ALL {
        let g = format!("B6_churn_{}", op.name());
        for k in CHURN_BATCHES {
            let get = |imp| find(rows, &g, imp, k);
            let aio: Vec<_> = AioBackend::ALL.iter().map(|&b| get(Impl::Aio(b))).collect();
            let (mio, polling) = (get(Impl::Mio), get(Impl::Polling));
            if aio.iter().all(Option::is_none) && mio.is_none() && polling.is_none() {
                continue;
            }
            let waits = aio
                .iter()
                .map(|r| {
                    r.and_then(|r| r.waits)
                        .map_or("–".into(), |w| format!("{w:.3}"))
                })
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                s,
                "| {} | {k} | {} | {} | {} | {} | {} | {} | {} | {} | {waits} |",
                op.name(),
                cell(aio[0]),
                cell(aio[1]),
                cell(aio[2]),
                cell(mio),
                cell(polling),
                fmt_ratio(ratio(aio[0], mio)),
                fmt_ratio(ratio(aio[1], mio)),
                fmt_ratio(ratio(aio[2], mio)),
            );
        }
    }
    s.push('\n');
    s
}

/// The §8 targets the rows measured, with verdicts.
fn targets(rows: &[Row], counts: &[usize]) -> String {
    const G: &str = "B5_fd_dispatch";
    let mut s = String::new();
    let (first, last) = (counts[0], counts[counts.len() - 1]);
    for b in [AioBackend::Epoll, AioBackend::IoUring] {
        let imp = Impl::Aio(b);
        if let Some(x) = ratio(find(rows, G, imp, last), find(rows, G, imp, first)) {
            let _ = writeln!(
                s,
                "- B5 {} flat in N (N = {last} within 1.2× of N = {first}): {} ({x:.2}×)",
                b.name(),
                verdict(x <= 1.2)
            );
        }
        let floor: Vec<_> = counts
            .iter()
            .filter_map(|&n| ratio(find(rows, G, imp, n), find(rows, G, floor_of(b), n)))
            .collect();
        if !floor.is_empty() {
            let _ = writeln!(
                s,
                "- B5 {} within 1.2× of the raw floor ({}): {} ({})",
                b.name(),
                floor_of(b).name(),
                verdict(floor.iter().all(|&x| x <= 1.2)),
                floor
                    .iter()
                    .map(|x| format!("{x:.2}×"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let mio: Vec<_> = counts
            .iter()
            .filter_map(|&n| ratio(find(rows, G, imp, n), find(rows, G, Impl::Mio, n)))
            .collect();
        if !mio.is_empty() {
            let _ = writeln!(
                s,
                "- B5 {} ≤ mio: {} (aio / mio {})",
                b.name(),
                verdict(mio.iter().all(|&x| x <= 1.0)),
                mio.iter()
                    .map(|x| format!("{x:.2}×"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    for b in AioBackend::ALL {
        let mut parts = Vec::new();
        let mut all = true;
        for op in ChurnOp::ALL {
            let g = format!("B6_churn_{}", op.name());
            for k in CHURN_BATCHES {
                if let Some(x) = ratio(
                    find(rows, &g, Impl::Aio(b), k),
                    find(rows, &g, Impl::Mio, k),
                ) {
                    all &= x <= 1.0;
                    parts.push(format!("{} K={k} {x:.2}×", op.name()));
                }
            }
        }
        if !parts.is_empty() {
            let _ = writeln!(
                s,
                "- B6 {} ≤ mio register/deregister: {} ({})",
                b.name(),
                verdict(all),
                parts.join(", ")
            );
        }
    }
    if rows.iter().any(|r| r.group.starts_with("B6")) {
        s.push_str(
            "- B6 io_uring batches changes into one submit per iteration: counted under strace, \
             not here (`cargo run --release -p aio-benches --example fd_syscalls`)\n",
        );
    }
    s
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| {
            let v: Vec<_> = s.split_whitespace().take(3).collect();
            (v.len() == 3).then(|| v.join(" "))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Criterion's medians next to the interleaved ones, row by row.
fn appendix(rows: &[Row]) -> String {
    let mut s = String::from(
        "## Appendix: criterion medians\n\n\
         Criterion timed each row alone, one after the other; the tables above come from the \
         interleaved pass. A large gap between the two columns is drift of the machine between \
         rows, not a property of the row.\n\n\
         | row | criterion ns/op | interleaved ns/op |\n|---|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {}/{}/{} | {:.0} | {:.0} |",
            r.group,
            r.imp.name(),
            r.param,
            r.crit_ns,
            r.ns
        );
    }
    s
}

fn markdown(rows: &[Row], setup: &Setup, args: &Args, load: &str) -> String {
    format!(
        "# aio fd backends: B5 and B6 side by side\n\n\
         Generated {} on {} by `benches/benches/fd.rs`. Each row was timed by criterion ({} \
         samples after a 1 s warm-up, 2 s of measurement); the figures below are from the \
         interleaved pass that follows: every row of B5 (then of B6) runs ~{} ms in turn, \
         {ROUNDS} rounds after a warm-up round, and each figure is its median ns per \
         operation. Load average (1, 5, 15 min) when the run started: {load}. {}.\n\n{}{}\
         ## Targets (docs/benchmarks.md)\n\n{}\n{}",
        today(),
        machine(),
        args.sample_size,
        ROUND_RUN.as_millis(),
        setup.notes.join("; "),
        b5_tables(rows, &setup.counts),
        b6_tables(rows),
        targets(rows, &setup.counts),
        appendix(rows)
    )
}

/// ns per dispatch against N for every B5 implementation, both axes logarithmic.
fn svg(rows: &[Row], counts: &[usize]) -> String {
    const G: &str = "B5_fd_dispatch";
    const LEFT: f64 = 80.0;
    const TOP: f64 = 50.0;
    const W: f64 = 520.0;
    const H: f64 = 360.0;
    const COLORS: [&str; 8] = [
        "#1f77b4", "#2ca02c", "#d62728", "#ff7f0e", "#9467bd", "#7f7f7f", "#8c564b", "#e377c2",
    ];
    let b5: Vec<_> = rows.iter().filter(|r| r.group == G).collect();
    let mut s = String::new();
    let width = LEFT + W + 200.0;
    let height = TOP + H + 50.0;
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">B5 fd readiness \
         dispatch: ns per dispatch vs idle fds N (log-log, lower is better)</text>"
    );
    if b5.is_empty() || counts.len() < 2 {
        s.push_str("</svg>\n");
        return s;
    }
    let min = b5.iter().map(|r| r.ns).fold(f64::INFINITY, f64::min);
    let max = b5.iter().map(|r| r.ns).fold(0.0, f64::max);
    let (lo, hi) = (
        min.log10().floor(),
        max.log10().ceil().max(min.log10().floor() + 1.0),
    );
    let (nlo, nhi) = (
        (counts[0] as f64).log10(),
        (counts[counts.len() - 1] as f64).log10(),
    );
    let x = |n: usize| LEFT + ((n as f64).log10() - nlo) / (nhi - nlo) * W;
    let y = |v: f64| TOP + H - (v.log10() - lo) / (hi - lo) * H;
    let _ = writeln!(
        s,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{W}\" height=\"{H}\" fill=\"none\" \
         stroke=\"#999\"/>"
    );
    let mut d = lo;
    while d <= hi {
        let v = 10f64.powf(d);
        let gy = y(v);
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" y1=\"{gy:.1}\" x2=\"{:.1}\" y2=\"{gy:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + W,
            LEFT - 6.0,
            gy + 4.0,
            decade_label(v)
        );
        d += 1.0;
    }
    for &n in counts {
        let gx = x(n);
        let _ = writeln!(
            s,
            "<line x1=\"{gx:.1}\" y1=\"{TOP}\" x2=\"{gx:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{gx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">N = {n}</text>",
            TOP + H,
            TOP + H + 18.0
        );
    }
    for (i, imp) in Impl::B5.into_iter().enumerate() {
        let pts: Vec<_> = counts
            .iter()
            .filter_map(|&n| find(rows, G, imp, n).map(|r| (x(n), y(r.ns))))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let color = COLORS[i % COLORS.len()];
        // Peers and floors dashed, aio solid.
        let dash = if matches!(imp, Impl::Aio(_)) {
            ""
        } else {
            " stroke-dasharray=\"6 4\""
        };
        let path = pts
            .iter()
            .map(|(px, py)| format!("{px:.1},{py:.1}"))
            .collect::<Vec<_>>()
            .join(" ");
        let _ = writeln!(
            s,
            "<polyline points=\"{path}\" fill=\"none\" stroke=\"{color}\" \
             stroke-width=\"2\"{dash}/>"
        );
        for (px, py) in &pts {
            let _ = writeln!(
                s,
                "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"3\" fill=\"{color}\"/>"
            );
        }
        let ly = TOP + 10.0 + 20.0 * i as f64;
        let lx = LEFT + W + 20.0;
        let _ = writeln!(
            s,
            "<line x1=\"{lx}\" y1=\"{ly}\" x2=\"{:.1}\" y2=\"{ly}\" stroke=\"{color}\" \
             stroke-width=\"2\"{dash}/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            lx + 30.0,
            lx + 36.0,
            ly + 4.0,
            imp.name()
        );
    }
    s.push_str("</svg>\n");
    s
}

fn write_report(dir: &Path, md: &str, svg: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("fd-report.md"), md)?;
    std::fs::write(dir.join("fd-report.svg"), svg)?;
    Ok(())
}

fn main() {
    let args = parse_args();
    let load = loadavg();
    let mut c = Criterion::default()
        .sample_size(SAMPLE_SIZE)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .nresamples(5_000)
        .configure_from_args();
    let setup = Setup::new();
    let mut rows = Vec::new();
    b5(&mut c, &setup, &args, &mut rows);
    b6(&mut c, &setup, &args, &mut rows);
    c.final_summary();
    if rows.is_empty() {
        return;
    }
    let md = markdown(&rows, &setup, &args, &load);
    println!("\n{md}");
    if !args.bench {
        println!("(smoke run: no --bench flag, nothing written)");
        return;
    }
    if let Some(dir) = std::env::var_os("AIO_BENCH_REPORT_DIR") {
        let dir = Path::new(&dir);
        match write_report(dir, &md, &svg(&rows, &setup.counts)) {
            Ok(()) => println!(
                "fd report written to {}",
                dir.join("fd-report.md").display()
            ),
            Err(e) => {
                eprintln!("fd report: cannot write to {}: {e}", dir.display());
                std::process::exit(1);
            }
        }
    }
}
