//! Counts the system calls per operation of every fd-bench row (B5, B6 of docs/benchmarks.md) under
//! `strace -f -c`, running exactly the workloads `benches/fd.rs` times (`aio_benches::fd`).
//!
//! `cargo run --release -p aio-benches --example fd_syscalls [FILTER]` runs each row whose name
//! (`B5_fd_dispatch/aio_epoll/100`, `B6_churn_replace/mio/64`, ...) contains FILTER twice under
//! strace, with a low and a high iteration count after the same setup, and divides the
//! difference of each system call's count by the difference in operations, so that setup and
//! teardown cancel out. It prints a Markdown table: the total per operation, the `epoll_ctl`,
//! `io_uring_enter` and `fcntl` columns, `io_uring_enter` per loop iteration (the B6 batching
//! target), and every call with at least 0.005 per operation. strace must be installed
//! (`apt-get install strace`); it is a measuring tool, not a dependency of the code.
//!
//! `fd_syscalls --run ROW ITERS` runs one row for ITERS iterations after its setup and prints
//! nothing: the driver runs that under strace.

use std::collections::BTreeMap;
use std::process::{Command, ExitCode};

use aio_benches::fd::{
    CHURN_BATCHES, ChurnOp, IDLE_COUNTS, Impl, MAX_IDLE, eventfds, io_uring_unavailable,
    raise_nofile,
};

/// A row of the fd bench, by its criterion name.
#[derive(Debug, Clone, Copy)]
enum Row {
    Dispatch(Impl, usize),
    Churn(ChurnOp, Impl, usize),
}

impl Row {
    fn all() -> Vec<Row> {
        let mut rows = Vec::new();
        for n in IDLE_COUNTS {
            rows.extend(Impl::B5.into_iter().map(|imp| Row::Dispatch(imp, n)));
        }
        for op in ChurnOp::ALL {
            for k in CHURN_BATCHES {
                rows.extend(Impl::B6.into_iter().map(|imp| Row::Churn(op, imp, k)));
            }
        }
        rows
    }

    fn name(self) -> String {
        match self {
            Row::Dispatch(imp, n) => format!("B5_fd_dispatch/{}/{n}", imp.name()),
            Row::Churn(op, imp, k) => format!("B6_churn_{}/{}/{k}", op.name(), imp.name()),
        }
    }

    fn parse(name: &str) -> Option<Row> {
        Row::all().into_iter().find(|r| r.name() == name)
    }

    fn imp(self) -> Impl {
        match self {
            Row::Dispatch(imp, _) | Row::Churn(_, imp, _) => imp,
        }
    }

    /// Operations per iteration.
    fn ops(self) -> u64 {
        match self {
            Row::Dispatch(..) => 1,
            Row::Churn(_, _, k) => k as u64,
        }
    }

    /// Loop iterations (waits asked for) per iteration.
    fn polls(self) -> u64 {
        match self {
            Row::Churn(ChurnOp::Toggle, ..) => 2,
            _ => 1,
        }
    }

    /// The low and high iteration counts: enough for stable counts, short under strace.
    fn iters(self) -> (u64, u64) {
        match self {
            Row::Dispatch(..) => (500, 2500),
            Row::Churn(_, _, k) if k > 1 => (50, 250),
            Row::Churn(..) => (500, 2500),
        }
    }

    /// Sets the row up and runs `iters` iterations.
    fn run(self, iters: u64) {
        match self {
            Row::Dispatch(imp, n) => {
                if n >= MAX_IDLE {
                    raise_nofile(MAX_IDLE as u64 + 256).expect("not enough fds");
                }
                let idle = eventfds(n).expect("cannot create the idle eventfds");
                let mut w = imp.dispatch(&idle).expect("cannot set the row up");
                w.run(iters);
            }
            Row::Churn(op, imp, k) => {
                let mut w = imp.churn(op, k).expect("cannot set the row up");
                w.run(iters);
            }
        }
    }
}

/// Runs `row` for `iters` iterations under `strace -f -c` and returns the calls per syscall.
fn strace(row: Row, iters: u64) -> Result<BTreeMap<String, u64>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = std::env::temp_dir().join(format!("fd_syscalls.{}.txt", std::process::id()));
    let status = Command::new("strace")
        .arg("-f")
        .arg("-c")
        .arg("-o")
        .arg(&out)
        .arg(&exe)
        .args(["--run", &row.name(), &iters.to_string()])
        .status()
        .map_err(|e| format!("cannot run strace ({e}); install it with apt-get install strace"))?;
    if !status.success() {
        return Err(format!("{}: strace run failed ({status})", row.name()));
    }
    let text = std::fs::read_to_string(&out).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&out);
    Ok(parse_summary(&text))
}

/// Parses strace's `-c` table: `% time  seconds  usecs/call  calls  [errors]  syscall`.
fn parse_summary(text: &str) -> BTreeMap<String, u64> {
    let mut calls = BTreeMap::new();
    for line in text.lines() {
        let t: Vec<_> = line.split_whitespace().collect();
        if t.len() < 5 || t[0].parse::<f64>().is_err() {
            continue;
        }
        let name = t[t.len() - 1];
        if name == "total" {
            continue;
        }
        if let Ok(n) = t[3].parse::<u64>() {
            calls.insert(name.to_owned(), n);
        }
    }
    calls
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, row, iters] = args.as_slice()
        && flag == "--run"
    {
        let (Some(row), Ok(iters)) = (Row::parse(row), iters.parse()) else {
            eprintln!("usage: fd_syscalls --run ROW ITERS");
            return ExitCode::from(2);
        };
        row.run(iters);
        return ExitCode::SUCCESS;
    }
    let filter = args.first().cloned().unwrap_or_default();
    let no_uring = io_uring_unavailable();
    if let Some(why) = &no_uring {
        println!("io_uring unavailable ({why}): io_uring rows skipped");
    }
    println!(
        "| row | syscalls/op | epoll_ctl/op | io_uring_enter/op | io_uring_enter/loop iteration \
         | fcntl/op | all calls/op (≥ 0.005) |\n|---|---:|---:|---:|---:|---:|---|"
    );
    for row in Row::all() {
        if !row.name().contains(&filter) || (no_uring.is_some() && row.imp().needs_io_uring()) {
            continue;
        }
        let (lo, hi) = row.iters();
        let (a, b) = match (strace(row, lo), strace(row, hi)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let ops = ((hi - lo) * row.ops()) as f64;
        let mut per_op: Vec<(String, f64)> = b
            .iter()
            .map(|(name, &n)| {
                let before = a.get(name).copied().unwrap_or(0);
                (name.clone(), (n as f64 - before as f64) / ops)
            })
            .filter(|(_, x)| *x >= 0.005)
            .collect();
        per_op.sort_by(|x, y| y.1.total_cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
        let get = |name: &str| {
            per_op
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0.0, |(_, x)| *x)
        };
        let total: f64 = per_op.iter().map(|(_, x)| x).sum();
        let enters_per_poll = get("io_uring_enter") * row.ops() as f64 / row.polls() as f64;
        let all = per_op
            .iter()
            .map(|(n, x)| format!("{n} {x:.3}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "| {} | {total:.3} | {:.3} | {:.3} | {enters_per_poll:.3} | {:.3} | {all} |",
            row.name(),
            get("epoll_ctl"),
            get("io_uring_enter"),
            get("fcntl"),
        );
    }
    ExitCode::SUCCESS
}
