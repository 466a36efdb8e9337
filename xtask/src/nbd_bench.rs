//! `cargo xtask bench nbd`: our NBD server (`crates/aio/examples/nbd-server`) against `qemu-nbd`,
//! both serving the same raw image over a Unix socket, measured by `qemu-img bench`; owns the
//! cases, the alternating runs and the report (`target/bench-report/nbd.md`).
//!
//! Our server runs three ways ([`SERVERS`]): adaptive polling off (`--poll-max-ns 0`, its
//! default), on with QEMU 10's policy (`--poll-max-ns 32768`, QEMU's IOThread default), and on
//! with the weighted policy (`--poll-weight 2`, QEMU's default weight); each on the default
//! backend and again with `AIO_BACKEND=epoll`, because on io_uring the re-arm of every fired
//! poll request makes `need_wait` true, which skips polling in most iterations (QEMU's rule).
//! qemu-nbd has no polling option, and its row is the reference. `AIO_POLL_MAX_NS` is removed
//! from our server's environment so that it cannot change the rows.
//!
//! The race of our two connection engines: every row above runs `--engine callbacks` (an fd
//! handler and a state machine per connection); on the default backend, with polling off and
//! with the weighted policy, `--engine tasks` (a task per connection and per request, QEMU's
//! coroutine model) runs too, in the same rounds, and its row's "tasks / callbacks" column is
//! its median over that of its callback twin. The task engine becomes the default only if it
//! is not slower.
//!
//! Every run starts a fresh server process, lets `qemu-img bench` send its requests, and stops
//! the server with SIGTERM; the runs of the servers alternate (each server once per round) so
//! that slow drifts of the machine (page-cache writeback, frequency changes, neighbours) fall on
//! all alike. The time is the one `qemu-img bench` prints ("Run completed in X seconds"), which
//! covers the requests only: not the connection setup, nor the flush when the client closes.
//!
//! The two servers are configured alike: ours does `pread`/`pwrite` through the page cache, on
//! a pool of worker threads, and `fdatasync` on flush, which is `qemu-nbd --cache=writeback
//! --aio=threads`; both run a single event loop (ours `--contexts 1`, the default). The client
//! side is identical for both.
//!
//! Environment knobs: `AIO_NBD_BENCH_COUNT` (requests per run, default 50 000) and
//! `AIO_NBD_BENCH_ROUNDS` (runs per server and case, default 3). A ratio below 1.0 is a result,
//! not a failure: the command fails only when a server or the client does.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::cmd::{Cmd, Context, Error, Result, project_root};
use crate::nbd::{self, Deadline, Readiness, Scratch, Server};

/// Size of the benchmark image. Large enough that 50 000 sequential 4 KiB requests (195 MiB) do
/// not wrap around, small enough to create in a second and to stay in the page cache.
const IMAGE_SIZE: u64 = 256 << 20;

/// Seed of the image contents, fixed so that every run serves the same bytes.
const IMAGE_SEED: u64 = 0x6e62_6462_656e_6368;

/// Request size of every case.
const REQUEST_SIZE: u32 = 4096;

/// The byte `qemu-img bench -w` writes. Not zero, so that neither side can turn the writes into
/// zero-writes or holes.
const WRITE_PATTERN: &str = "0x5a";

/// `--poll-max-ns` of the polling rows: QEMU's IOThread default.
const POLL_MAX_NS: u64 = 32_768;

/// `--poll-weight` of the weighted row: QEMU's default weight (aio's `DEFAULT_WEIGHT`).
const POLL_WEIGHT: u8 = 2;

const DEFAULT_COUNT: u64 = 50_000;
const DEFAULT_ROUNDS: usize = 3;

/// How long a server may take to start listening.
const START_LIMIT: Duration = Duration::from_secs(10);

/// How long a server may take to exit after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// One measured workload.
#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    write: bool,
    depth: u32,
}

const CASES: &[Case] = &[
    Case {
        name: "4 KiB read, QD 1",
        write: false,
        depth: 1,
    },
    Case {
        name: "4 KiB read, QD 32",
        write: false,
        depth: 32,
    },
    Case {
        name: "4 KiB write, QD 1",
        write: true,
        depth: 1,
    },
    Case {
        name: "4 KiB write, QD 32",
        write: true,
        depth: 32,
    },
];

/// The servers compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Ours(Backend, Polling, Engine),
    QemuNbd,
}

/// Our server's connection engine (`--engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    /// `--engine callbacks`: an fd handler and a state machine per connection.
    Callbacks,
    /// `--engine tasks`: a task per connection and per request.
    Tasks,
}

impl Engine {
    fn arg(self) -> &'static str {
        match self {
            Engine::Callbacks => "callbacks",
            Engine::Tasks => "tasks",
        }
    }
}

/// The backend of our server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// The aio default (`AIO_BACKEND` as the caller's environment has it): io_uring where the
    /// kernel allows it. The ready line names it.
    Default,
    /// `AIO_BACKEND=epoll`.
    Epoll,
}

/// How our server polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Polling {
    /// `--poll-max-ns 0`: sleeps in the backend at once (the default).
    Off,
    /// `--poll-max-ns` [`POLL_MAX_NS`] `--poll-policy qemu10`: QEMU 10's per-handler windows.
    Qemu10,
    /// As `Qemu10`, with `--poll-weight` [`POLL_WEIGHT`].
    Weighted,
}

/// Every server, in the order of a round and of the table's rows (a task-engine row right
/// after its callback twin). The last is the reference of the "vs qemu-nbd" column;
/// `Polling::Off` on the same backend and engine that of "vs polling off"; the callback twin
/// that of "tasks / callbacks".
const SERVERS: [Which; 9] = [
    Which::Ours(Backend::Default, Polling::Off, Engine::Callbacks),
    Which::Ours(Backend::Default, Polling::Off, Engine::Tasks),
    Which::Ours(Backend::Default, Polling::Qemu10, Engine::Callbacks),
    Which::Ours(Backend::Default, Polling::Weighted, Engine::Callbacks),
    Which::Ours(Backend::Default, Polling::Weighted, Engine::Tasks),
    Which::Ours(Backend::Epoll, Polling::Off, Engine::Callbacks),
    Which::Ours(Backend::Epoll, Polling::Qemu10, Engine::Callbacks),
    Which::Ours(Backend::Epoll, Polling::Weighted, Engine::Callbacks),
    Which::QemuNbd,
];
const QEMU_NBD: usize = SERVERS.len() - 1;

/// The index in [`SERVERS`] of the polling-off twin of `which` (same backend and engine), if it
/// has one.
fn polling_off_of(which: Which) -> Option<usize> {
    let Which::Ours(backend, _, engine) = which else {
        return None;
    };
    SERVERS
        .iter()
        .position(|&w| w == Which::Ours(backend, Polling::Off, engine))
}

/// The index in [`SERVERS`] of the callback-engine twin of a task-engine row.
fn callbacks_of(which: Which) -> Option<usize> {
    let Which::Ours(backend, polling, Engine::Tasks) = which else {
        return None;
    };
    SERVERS
        .iter()
        .position(|&w| w == Which::Ours(backend, polling, Engine::Callbacks))
}

/// Everything needed to start either server on the benchmark image.
#[derive(Debug)]
struct Servers {
    ours: PathBuf,
    image: PathBuf,
    socket: PathBuf,
    pid_file: PathBuf,
}

impl Servers {
    fn command(&self, which: Which) -> Cmd {
        match which {
            Which::Ours(backend, polling, engine) => {
                let cmd = Cmd::new(&self.ours.display().to_string()).env_remove("AIO_POLL_MAX_NS");
                let cmd = match backend {
                    Backend::Default => cmd,
                    Backend::Epoll => cmd.env("AIO_BACKEND", "epoll"),
                };
                // --persistent, as -t for qemu-nbd below: one server serves every client.
                cmd.args(["--unix", &self.socket.display().to_string(), "--persistent"])
                    .args(["--engine", engine.arg()])
                    .args(poll_args(polling))
                    .arg(self.image.display().to_string())
            }
            // `-t` keeps it serving after the client leaves, as `--persistent` does ours, so
            // both are stopped the same way (SIGTERM); `--pid-file` is how we learn that it
            // listens.
            Which::QemuNbd => Cmd::new("qemu-nbd")
                .args(["-f", "raw", "--cache=writeback", "--aio=threads", "-t"])
                .args(["-k", &self.socket.display().to_string()])
                .arg(format!("--pid-file={}", self.pid_file.display()))
                .arg(self.image.display().to_string()),
        }
    }

    fn readiness(&self, which: Which) -> Readiness {
        match which {
            Which::Ours(..) => Readiness::ReadyLine,
            Which::QemuNbd => Readiness::PidFile(self.pid_file.clone()),
        }
    }

    fn name(which: Which) -> &'static str {
        match which {
            Which::Ours(..) => "nbd-server",
            Which::QemuNbd => "qemu-nbd",
        }
    }

    /// The server's name, engine (when not the callbacks) and polling options, as the table's
    /// rows show it.
    fn label(which: Which) -> String {
        match which {
            Which::Ours(backend, polling, engine) => {
                let env = match backend {
                    Backend::Default => "",
                    Backend::Epoll => "AIO_BACKEND=epoll ",
                };
                let server = match engine {
                    Engine::Callbacks => "nbd-server".to_owned(),
                    Engine::Tasks => format!("nbd-server --engine {}", engine.arg()),
                };
                match polling {
                    Polling::Off => format!("{env}{server} (polling off)"),
                    _ => format!("{env}{server} {}", poll_args(polling).join(" ")),
                }
            }
            Which::QemuNbd => "qemu-nbd".to_owned(),
        }
    }
}

/// Our server's polling options for `polling`.
fn poll_args(polling: Polling) -> Vec<String> {
    let max = POLL_MAX_NS.to_string();
    match polling {
        Polling::Off => vec!["--poll-max-ns".into(), "0".into()],
        Polling::Qemu10 => vec![
            "--poll-max-ns".into(),
            max,
            "--poll-policy".into(),
            "qemu10".into(),
        ],
        Polling::Weighted => vec![
            "--poll-max-ns".into(),
            max,
            "--poll-weight".into(),
            POLL_WEIGHT.to_string(),
        ],
    }
}

/// The client command of one run.
fn client_command(case: Case, count: u64, socket: &Path) -> Cmd {
    let mut cmd = Cmd::new("qemu-img")
        .args(["bench", "-f", "raw", "-t", "writeback"])
        .args(["-c", &count.to_string()])
        .args(["-d", &case.depth.to_string()])
        .args(["-s", &REQUEST_SIZE.to_string()]);
    if case.write {
        cmd = cmd.args(["-w", "--pattern", WRITE_PATTERN]);
    }
    cmd.arg(nbd::unix_url(socket))
}

pub fn run() -> Result<ExitCode> {
    let count = env_number("AIO_NBD_BENCH_COUNT", DEFAULT_COUNT)?;
    let rounds = env_number("AIO_NBD_BENCH_ROUNDS", DEFAULT_ROUNDS as u64)?;
    let rounds = usize::try_from(rounds).context_msg("AIO_NBD_BENCH_ROUNDS is too large")?;

    nbd::ensure_qemu_utils()?;
    let ours = nbd::build_server()?;

    let mut scratch = Scratch::create("nbd-bench")?;
    let image = scratch.path().join("image.raw");
    eprintln!(
        "bench nbd: writing a {} MiB image at {}",
        IMAGE_SIZE >> 20,
        image.display()
    );
    nbd::write_random_file(&image, IMAGE_SIZE, IMAGE_SEED)?;
    let servers = Servers {
        ours,
        socket: scratch.socket_path("nbd.sock"),
        pid_file: scratch.path().join("qemu-nbd.pid"),
        image,
    };

    // A run takes about count / IOPS; allow for a slow machine (1 000 IOPS) plus slack before
    // declaring a hang.
    let run_limit = Duration::from_secs(30) + Duration::from_millis(count);
    let started = std::time::Instant::now();
    let mut results = Vec::new();
    let mut ready_lines: [Option<String>; SERVERS.len()] = Default::default();
    for &case in CASES {
        let mut result = CaseResult {
            case,
            runs: SERVERS.map(|_| Vec::new()),
        };
        for round in 1..=rounds {
            for (i, &which) in SERVERS.iter().enumerate() {
                eprintln!(
                    "bench nbd: {} round {round}/{rounds}: {}",
                    case.name,
                    Servers::label(which)
                );
                let run = run_once(&servers, which, case, count, run_limit)?;
                if let Some(line) = &run.ready {
                    ready_lines[i].get_or_insert_with(|| line.clone());
                }
                result.runs[i].push(run);
            }
        }
        results.push(result);
    }

    let setup = Setup {
        count,
        rounds,
        ready_lines: SERVERS
            .iter()
            .zip(ready_lines)
            .filter_map(|(&which, line)| Some((Servers::label(which), line?)))
            .collect(),
        ours_cmd: servers
            .command(Which::Ours(
                Backend::Epoll,
                Polling::Weighted,
                Engine::Callbacks,
            ))
            .to_string(),
        qemu_cmd: servers.command(Which::QemuNbd).to_string(),
        client_cmd: client_command(CASES[3], count, &servers.socket).to_string(),
        elapsed: started.elapsed(),
    };
    println!("{}", text_table(&results));
    let report_dir = project_root().join("target").join("bench-report");
    std::fs::create_dir_all(&report_dir)
        .with_context(|| format!("creating {}", report_dir.display()))?;
    let report = report_dir.join("nbd.md");
    std::fs::write(&report, markdown(&setup, &results))
        .with_context(|| format!("writing {}", report.display()))?;
    eprintln!("bench nbd: report at {}", report.display());
    drop(scratch);
    Ok(ExitCode::SUCCESS)
}

/// One run of one server.
#[derive(Debug)]
struct Run {
    iops: f64,
    /// Our server's ready line (it names the backend and the polling parameters).
    ready: Option<String>,
    /// What our server's stopped line says polling did (`12 hits, 3 misses, 40 ms`), when it
    /// polled.
    polling: Option<String>,
}

/// Starts one server, runs the client against it and stops the server.
fn run_once(
    servers: &Servers,
    which: Which,
    case: Case,
    count: u64,
    run_limit: Duration,
) -> Result<Run> {
    let name = Servers::name(which);
    // A socket or pid file left by a killed server would confuse the next start.
    for stale in [&servers.socket, &servers.pid_file] {
        if stale.exists() {
            std::fs::remove_file(stale).with_context(|| format!("removing {}", stale.display()))?;
        }
    }
    let server = Server::start(
        name,
        &servers.command(which),
        &servers.readiness(which),
        Deadline::after(START_LIMIT),
    )?;
    let ready = server.ready_line().map(str::to_owned);

    let output = client_command(case, count, &servers.socket).output_within(run_limit)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(Error::new(format!(
            "qemu-img bench against {name} failed ({}):\n{stdout}{stderr}",
            output.status
        )));
    }
    let elapsed = nbd::parse_bench_elapsed(&stdout).ok_or_else(|| {
        Error::new(format!(
            "no \"Run completed in X seconds\" in qemu-img's output:\n{stdout}{stderr}"
        ))
    })?;

    let stopped = server.stop(Deadline::after(STOP_LIMIT))?;
    // Both exit 0 on SIGTERM; ours must also say `stopped` (its shutdown contract).
    let clean = stopped.status.success()
        && (which == Which::QemuNbd || nbd::printed_stopped(&stopped.stdout));
    if !clean {
        return Err(Error::new(format!(
            "{name} did not stop cleanly on SIGTERM ({}); its stdout: {:?}",
            stopped.status, stopped.stdout
        )));
    }
    let iops = count as f64 / elapsed;
    let polling = stopped
        .stdout
        .iter()
        .find_map(|l| l.split_once("; polling: "))
        .map(|(_, counters)| counters.to_owned());
    eprintln!(
        "    {name}: {elapsed:.3} s, {iops:.0} IOPS{}",
        polling
            .as_deref()
            .map(|p| format!(" (polling: {p})"))
            .unwrap_or_default()
    );
    Ok(Run {
        iops,
        ready,
        polling,
    })
}

/// A positive integer from the environment, or `default` when unset.
fn env_number(key: &str, default: u64) -> Result<u64> {
    match std::env::var(key) {
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(err) => Err(Error::new(format!("{key}: {err}"))),
        Ok(value) => match value.trim().replace('_', "").parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(Error::new(format!(
                "{key}={value:?}: expected a positive integer"
            ))),
        },
    }
}

/// `Context` for conversions whose error type says nothing useful.
trait ContextMsg<T> {
    fn context_msg(self, msg: &str) -> Result<T>;
}

impl<T, E> ContextMsg<T> for std::result::Result<T, E> {
    fn context_msg(self, msg: &str) -> Result<T> {
        self.map_err(|_| Error::new(msg))
    }
}

/// Every run of one case, per server (in [`SERVERS`] order).
#[derive(Debug)]
struct CaseResult {
    case: Case,
    runs: [Vec<Run>; SERVERS.len()],
}

impl CaseResult {
    fn iops(&self, server: usize) -> Vec<f64> {
        self.runs[server].iter().map(|r| r.iops).collect()
    }
}

/// Median, minimum and maximum of a non-empty sample.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Summary {
    median: f64,
    min: f64,
    max: f64,
}

fn summarize(values: &[f64]) -> Summary {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    assert!(n > 0, "every case has at least one round");
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    Summary {
        median,
        min: sorted[0],
        max: sorted[n - 1],
    }
}

/// `12345.6` as `12 346`: IOPS read better with thousands separated and no decimals.
fn group(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(digit);
    }
    out
}

fn cell(summary: Summary) -> String {
    format!(
        "{} ({}–{})",
        group(summary.median),
        group(summary.min),
        group(summary.max)
    )
}

/// The rows shared by the terminal table and the Markdown one: one per case and server.
fn rows(results: &[CaseResult]) -> Vec<[String; 6]> {
    let mut rows = Vec::new();
    for r in results {
        let medians: Vec<f64> = (0..SERVERS.len())
            .map(|i| summarize(&r.iops(i)).median)
            .collect();
        for (i, &which) in SERVERS.iter().enumerate() {
            let ratio = |reference: usize| {
                if i == reference {
                    "—".to_owned()
                } else {
                    format!("{:.2}", medians[i] / medians[reference])
                }
            };
            rows.push([
                r.case.name.to_owned(),
                Servers::label(which),
                cell(summarize(&r.iops(i))),
                ratio(QEMU_NBD),
                polling_off_of(which).map_or_else(|| "—".to_owned(), ratio),
                callbacks_of(which).map_or_else(|| "—".to_owned(), ratio),
            ]);
        }
    }
    rows
}

const HEADER: [&str; 6] = [
    "case",
    "server",
    "IOPS: median (min–max)",
    "vs qemu-nbd",
    "vs polling off",
    "tasks / callbacks",
];

fn text_table(results: &[CaseResult]) -> String {
    let rows = rows(results);
    let width = |col: usize| {
        rows.iter()
            .map(|row| row[col].chars().count())
            .chain([HEADER[col].chars().count()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..HEADER.len()).map(width).collect();
    let mut out = String::new();
    let line = |out: &mut String, cells: [&str; 6]| {
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i] - cell.chars().count();
            // Names read best left-aligned, numbers right-aligned.
            if i < 2 {
                let _ = write!(out, "{cell}{}  ", " ".repeat(pad));
            } else {
                let _ = write!(out, "{}{cell}  ", " ".repeat(pad));
            }
        }
        let trimmed = out.trim_end().len();
        out.truncate(trimmed);
        out.push('\n');
    };
    line(&mut out, HEADER);
    for row in &rows {
        line(&mut out, row.each_ref().map(String::as_str));
    }
    out
}

/// How the numbers were obtained, for the report.
#[derive(Debug)]
struct Setup {
    count: u64,
    rounds: usize,
    /// Our server's ready line, per polling setting.
    ready_lines: Vec<(String, String)>,
    ours_cmd: String,
    qemu_cmd: String,
    client_cmd: String,
    elapsed: Duration,
}

fn markdown(setup: &Setup, results: &[CaseResult]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# NBD server: nbd-server (aio) vs qemu-nbd\n");
    let _ = writeln!(
        md,
        "Generated by `cargo xtask bench nbd` in {:.0} s. {} requests of {} bytes per run, {} runs \
         per server and case, the servers alternating within each round (a fresh server process \
         per run); a {} MiB raw image of non-zero data, the same file for every server. IOPS = \
         requests / the time `qemu-img bench` reports.\n",
        setup.elapsed.as_secs_f64(),
        setup.count,
        REQUEST_SIZE,
        setup.rounds,
        IMAGE_SIZE >> 20
    );
    let _ = writeln!(md, "| {} |", HEADER.join(" | "));
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|");
    for row in rows(results) {
        let _ = writeln!(md, "| {} |", row.join(" | "));
    }
    let _ = writeln!(
        md,
        "\nRatios are of medians; > 1 means faster than qemu-nbd, than nbd-server with polling \
         off (on the same backend and engine), or, for `--engine tasks`, than the callback \
         engine with the same options.\n"
    );
    let _ = writeln!(md, "## Every run (IOPS, in run order)\n");
    let _ = writeln!(
        md,
        "| case | server | IOPS | polling (nbd-server's stopped line) |"
    );
    let _ = writeln!(md, "|---|---|---|---|");
    for r in results {
        for (i, &which) in SERVERS.iter().enumerate() {
            let runs = &r.runs[i];
            let iops = runs.iter().map(|x| group(x.iops)).collect::<Vec<_>>();
            let polling = runs
                .iter()
                .filter_map(|x| x.polling.as_deref())
                .collect::<Vec<_>>();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                r.case.name,
                Servers::label(which),
                iops.join(", "),
                if polling.is_empty() {
                    "—".to_owned()
                } else {
                    polling.join("; ")
                }
            );
        }
    }
    let _ = writeln!(md, "\n## Setup\n");
    let _ = writeln!(
        md,
        "- nbd-server: `{}` (one event loop: `--contexts` 1, the default; `--engine`, the polling \
         options and `AIO_BACKEND` vary by row, `AIO_POLL_MAX_NS` removed from its environment)",
        setup.ours_cmd
    );
    for (label, line) in &setup.ready_lines {
        let _ = writeln!(md, "  - {label} printed `{line}`");
    }
    let _ = writeln!(
        md,
        "- qemu-nbd: `{}` (one event loop; page cache, worker threads, fdatasync on flush: what nbd-server does)",
        setup.qemu_cmd
    );
    let _ = writeln!(
        md,
        "- client, per run (reads without `-w --pattern {WRITE_PATTERN}`, depth 1 or 32): `{}`",
        setup.client_cmd
    );
    let _ = writeln!(
        md,
        "- {}; {}",
        nbd::tool_version("qemu-img"),
        nbd::tool_version("qemu-nbd")
    );
    let _ = writeln!(
        md,
        "- machine: {} CPUs, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned())
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_use_the_median() {
        let s = summarize(&[3.0, 1.0, 2.0]);
        assert_eq!(
            s,
            Summary {
                median: 2.0,
                min: 1.0,
                max: 3.0
            }
        );
        assert_eq!(summarize(&[1.0, 2.0, 4.0, 3.0]).median, 2.5);
    }

    fn run(iops: f64) -> Run {
        Run {
            iops,
            ready: None,
            polling: None,
        }
    }

    /// One case whose servers (in [`SERVERS`] order) ran at these IOPS.
    fn result(runs: [Vec<f64>; SERVERS.len()]) -> CaseResult {
        CaseResult {
            case: CASES[0],
            runs: runs.map(|r| r.into_iter().map(run).collect()),
        }
    }

    #[test]
    fn rows_compare_each_server_with_qemu_nbd_and_with_polling_off_on_its_backend() {
        let result = result([
            vec![100.0, 300.0, 200.0],
            vec![100.0],
            vec![300.0],
            vec![150.0],
            vec![150.0],
            vec![500.0],
            vec![250.0],
            vec![1000.0],
            vec![400.0, 100.0],
        ]);
        let rows = rows(&[result]);
        let cells = |i: usize| rows[i][1..].to_vec();
        assert_eq!(rows.len(), 9);
        assert!(rows.iter().all(|r| r[0] == "4 KiB read, QD 1"));
        assert_eq!(
            cells(0),
            [
                "nbd-server (polling off)",
                "200 (100–300)",
                "0.80",
                "—",
                "—"
            ]
        );
        assert_eq!(
            cells(2),
            [
                "nbd-server --poll-max-ns 32768 --poll-policy qemu10",
                "300 (300–300)",
                "1.20",
                "1.50",
                "—"
            ]
        );
        assert_eq!(
            cells(3),
            [
                "nbd-server --poll-max-ns 32768 --poll-weight 2",
                "150 (150–150)",
                "0.60",
                "0.75",
                "—"
            ]
        );
        assert_eq!(
            cells(5),
            [
                "AIO_BACKEND=epoll nbd-server (polling off)",
                "500 (500–500)",
                "2.00",
                "—",
                "—"
            ]
        );
        assert_eq!(
            cells(6),
            [
                "AIO_BACKEND=epoll nbd-server --poll-max-ns 32768 --poll-policy qemu10",
                "250 (250–250)",
                "1.00",
                "0.50",
                "—"
            ]
        );
        assert_eq!(
            cells(7),
            [
                "AIO_BACKEND=epoll nbd-server --poll-max-ns 32768 --poll-weight 2",
                "1 000 (1 000–1 000)",
                "4.00",
                "2.00",
                "—"
            ]
        );
        assert_eq!(cells(8), ["qemu-nbd", "250 (100–400)", "—", "—", "—"]);
    }

    #[test]
    fn task_engine_rows_race_their_callback_twins() {
        let result = result([
            vec![200.0],
            vec![300.0, 100.0, 250.0],
            vec![400.0],
            vec![500.0],
            vec![450.0],
            vec![1.0],
            vec![1.0],
            vec![1.0],
            vec![250.0],
        ]);
        let rows = rows(&[result]);
        let cells = |i: usize| rows[i][1..].to_vec();
        // Polling off: 250 / 200; vs polling off compares within the task engine (none).
        assert_eq!(
            cells(1),
            [
                "nbd-server --engine tasks (polling off)",
                "250 (100–300)",
                "1.00",
                "—",
                "1.25"
            ]
        );
        // Weighted: 450 / 500; its polling-off twin is the task engine's (450 / 250).
        assert_eq!(
            cells(4),
            [
                "nbd-server --engine tasks --poll-max-ns 32768 --poll-weight 2",
                "450 (450–450)",
                "1.80",
                "1.80",
                "0.90"
            ]
        );
        // Every server runs with an explicit engine; only the task rows name it.
        let servers = Servers {
            ours: PathBuf::from("nbd-server"),
            image: PathBuf::from("image.raw"),
            socket: PathBuf::from("nbd.sock"),
            pid_file: PathBuf::from("qemu-nbd.pid"),
        };
        for (i, &which) in SERVERS.iter().enumerate() {
            let cmd = servers.command(which).to_string();
            let label = Servers::label(which);
            match which {
                Which::Ours(_, _, Engine::Tasks) => {
                    assert!(cmd.contains("--engine tasks"), "{cmd}");
                    assert!(label.contains("--engine tasks"), "{label}");
                    assert_ne!(rows[i][5], "—", "{label}");
                }
                Which::Ours(_, _, Engine::Callbacks) => {
                    assert!(cmd.contains("--engine callbacks"), "{cmd}");
                    assert!(!label.contains("--engine"), "{label}");
                    assert_eq!(rows[i][5], "—", "{label}");
                }
                Which::QemuNbd => assert!(!cmd.contains("--engine"), "{cmd}"),
            }
        }
        let tasks = SERVERS
            .iter()
            .filter(|w| matches!(w, Which::Ours(Backend::Default, _, Engine::Tasks)))
            .count();
        assert_eq!(tasks, 2, "polling off and weighted, on the default backend");
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(group(12345.6), "12 346");
        assert_eq!(group(999.0), "999");
        assert_eq!(group(1_000_000.0), "1 000 000");
    }
}
