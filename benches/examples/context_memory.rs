//! Measures what a context costs in memory when the process has many fds open (issue 17): the
//! resident-set growth over creating 1 000 contexts, each with one fd handler registered on a
//! high fd, with 0, 10 000, 16 000 and 100 000 other fds open in the process (16 000 is what
//! fits under a hard limit of 20 000, which only a process with `CAP_SYS_RESOURCE` can raise).
//!
//! `cargo run --release -p aio-benches --example context_memory [BACKEND...]` (backends `poll`,
//! `epoll`, `io_uring`; default `poll epoll`) prints a Markdown table of bytes per context. The
//! fds are duplicates of `/dev/null`; the open-file limit is raised to fit them (as root the
//! hard limit too, else the rows that do not fit are skipped with the reason). Each context's
//! notifier gets the lowest free fd number, which is above every fd opened before, so each
//! context's own tables see fd numbers as high as the process has: a table indexed by fd number
//! costs in proportion to that, one sized by the registrations does not.
//!
//! Every row runs in a child process of its own (the program re-runs itself with `--row`), so
//! that the memory one row freed cannot make the next one look cheaper.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, ExitCode};
use std::rc::Rc;

use aio::AioContext;
use aio_benches::fd::AioBackend;

/// How many contexts each row creates; the figure is the RSS growth divided by this.
const CONTEXTS: usize = 1_000;

/// The numbers of other open fds the rows are run with.
const OPEN_FDS: [usize; 4] = [0, 10_000, 16_000, 100_000];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--row") {
        return match run_row(&args[1], args[2].parse().unwrap_or(0)) {
            Ok(bytes) => {
                println!("{bytes}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                println!("skipped: {err}");
                ExitCode::SUCCESS
            }
        };
    }
    let backends = if args.is_empty() {
        vec!["poll".to_owned(), "epoll".to_owned()]
    } else {
        args
    };
    let Ok(me) = std::env::current_exe() else {
        eprintln!("cannot find this program's own path");
        return ExitCode::FAILURE;
    };
    println!(
        "| backend | {} |",
        OPEN_FDS.map(|n| format!("{n} fds open")).join(" | ")
    );
    println!("|---|{}", "---:|".repeat(OPEN_FDS.len()));
    for backend in &backends {
        let mut cells = Vec::new();
        for n in OPEN_FDS {
            let out = Command::new(&me)
                .args(["--row", backend, &n.to_string()])
                .output();
            let cell = match out {
                Ok(out) => {
                    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                    match text.parse::<usize>() {
                        Ok(bytes) => format!("{} B/context", bytes),
                        Err(_) => text,
                    }
                }
                Err(err) => format!("could not run: {err}"),
            };
            cells.push(cell);
        }
        println!("| {backend} | {} |", cells.join(" | "));
    }
    ExitCode::SUCCESS
}

/// One row: opens `n` fds, then creates [`CONTEXTS`] contexts on `backend` with one handler
/// each, and returns the RSS growth per context in bytes.
fn run_row(backend: &str, n: usize) -> io::Result<usize> {
    let backend = match backend {
        "poll" => AioBackend::Poll,
        "epoll" => AioBackend::Epoll,
        "io_uring" => AioBackend::IoUring,
        other => return Err(io::Error::other(format!("unknown backend {other}"))),
    };
    // The other fds, each context's notifier and its backend's object, and some slack.
    raise_limit((n + 3 * CONTEXTS + 64) as u64)?;
    let null = File::open("/dev/null")?;
    let fds: Vec<OwnedFd> = (0..n)
        .map(|_| null.as_fd().try_clone_to_owned())
        .collect::<io::Result<_>>()?;
    // The handler watches the highest fd the process has open before the contexts exist.
    // Shared: each context's handler owns an `Rc` clone of it.
    let watched = Rc::new(match fds.last() {
        Some(fd) => fd.try_clone()?,
        None => null.as_fd().try_clone_to_owned()?,
    });
    // One context before measuring, so that one-time allocations (the tracing callsites, the
    // epoll_pwait2 probe, the thread's current-context slot) are not counted.
    let warm = keep(backend, &watched)?;
    let before = rss_bytes()?;
    let mut kept = Vec::with_capacity(CONTEXTS);
    for _ in 0..CONTEXTS {
        kept.push(keep(backend, &watched)?);
    }
    let after = rss_bytes()?;
    drop((kept, warm, fds));
    Ok(after.saturating_sub(before) / CONTEXTS)
}

/// A context on `backend` with one read handler on `fd`, kept together.
fn keep(backend: AioBackend, fd: &Rc<OwnedFd>) -> io::Result<(AioContext, aio::FdHandler)> {
    let ctx = backend.context()?;
    let handler = ctx.fd_handler(fd.clone()).on_read(|_| {}).register()?;
    Ok((ctx, handler))
}

/// The process's resident set, from `/proc/self/statm`.
fn rss_bytes() -> io::Result<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| io::Error::other("unreadable /proc/self/statm"))?;
    // SAFETY: sysconf takes no pointers and only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Ok(pages * usize::try_from(page).unwrap_or(4096))
}

/// Raises `RLIMIT_NOFILE` to at least `want`: the soft limit, and the hard one where the process
/// may (root).
fn raise_limit(want: u64) -> io::Result<()> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid, writable `rlimit` that outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if rl.rlim_cur >= want {
        return Ok(());
    }
    let raised = libc::rlimit {
        rlim_cur: want,
        rlim_max: rl.rlim_max.max(want),
    };
    // SAFETY: `raised` is a valid `rlimit` that outlives the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::other(format!(
            "RLIMIT_NOFILE cannot be raised to {want} (hard limit {}): {err}",
            rl.rlim_max
        )));
    }
    Ok(())
}
