//! `cargo xtask bench [filter]`: runs the `aio-benches` benchmarks and points at the report they
//! write under `target/bench-report/`.
//!
//! The bench crate owns the measurements and the reports (Markdown tables plus SVG charts, see
//! docs/conventions.md 3: `report.md` from `report.rs`, `fd-report.md` from `fd.rs`, `tasks.md` from
//! `tasks.rs`); xtask only chooses where they go, through `AIO_BENCH_REPORT_DIR`, turns on the
//! bench crate's `glib` feature when the system GLib is there (B13's glib rows), and forwards
//! the filter to the harness (criterion-style: benchmarks whose name contains it). The filter
//! `nbd` never gets here: `main.rs` sends `cargo xtask bench nbd` to `nbd/bench.rs`, which
//! compares two NBD servers rather than running the harness.

use std::process::ExitCode;

use crate::cmd::{Cmd, Context, Result, project_root};

/// The environment variable the bench crate reads to find its report directory.
const REPORT_DIR_ENV: &str = "AIO_BENCH_REPORT_DIR";

pub fn run(filter: Option<&str>) -> Result<ExitCode> {
    let report_dir = project_root().join("target").join("bench-report");
    std::fs::create_dir_all(&report_dir)
        .with_context(|| format!("creating {}", report_dir.display()))?;

    let mut cmd = Cmd::cargo()
        .env(REPORT_DIR_ENV, report_dir.display().to_string())
        .args(["bench", "-p", "aio-benches"]);
    // B13's glib rows link the system GLib (installed with apt-get when missing); without it
    // they are left out and the rest runs.
    match crate::cmd::ensure_glib() {
        Ok(()) => cmd = cmd.args(["--features", "glib"]),
        Err(reason) => eprintln!("bench: the glib rows of B13 are left out: {reason}"),
    }
    if let Some(filter) = filter {
        cmd = cmd.arg("--").arg(filter);
    }
    cmd.run()?;

    let report = report_dir.join("report.md");
    if report.is_file() {
        eprintln!("bench: report at {}", report.display());
    } else {
        eprintln!(
            "bench: no report written ({} does not exist)",
            report.display()
        );
    }
    // The fd benches (B5, B6) write their own report next to it.
    let fd_report = report_dir.join("fd-report.md");
    if fd_report.is_file() {
        eprintln!("bench: fd backends report at {}", fd_report.display());
    }
    // So does the task executor bench (B12).
    let tasks_report = report_dir.join("tasks.md");
    if tasks_report.is_file() {
        eprintln!("bench: tasks (B12) report at {}", tasks_report.display());
    }
    // And the outer-loop adapters bench (B13).
    let embed_report = report_dir.join("embed.md");
    if embed_report.is_file() {
        eprintln!("bench: adapters (B13) report at {}", embed_report.display());
    }
    Ok(ExitCode::SUCCESS)
}
