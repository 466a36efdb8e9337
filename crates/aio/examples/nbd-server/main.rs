//! An NBD server on aio: serves a raw image file or a block device to NBD clients (QEMU's `qemu-img`, `qemu-io`,
//! the kernel's `nbd-client`, ...) over TCP and Unix sockets.
//!
//! ```text
//! cargo run --release -p aio --example nbd-server -- --unix /tmp/nbd.sock disk.raw
//! qemu-io -f raw -c 'read -v 0 512' 'nbd+unix:///?socket=/tmp/nbd.sock'
//! ```
//!
//! This file owns the process: the command line, the contexts and their threads, the
//! listeners (bound here or passed by systemd), the count of clients, the pid file, and
//! shutdown on SIGINT/SIGTERM or when the last client leaves. The protocol is in `protocol.rs`, a client's
//! life in `connection.rs` (the callback engine, and each context's table of connections) or
//! `conn_task.rs` (the task engine), what both engines decide alike in `session.rs`, the image
//! (a file or a block device) in `export.rs`, where file I/O runs in `file_io.rs`, the request
//! buffers in `buffers.rs`.
//!
//! * **Threads.** `--contexts N` (default: one per CPU, at most 8) runs N contexts: this thread's, which also owns the
//!   listeners and the signals, and N-1 I/O threads, each polling its own context. Accepted
//!   connections are dealt round-robin over all N; a connection lives on one context for its
//!   whole life. Each context has its own thread pool.
//! * **File I/O** (`--aio`, as qemu-nbd's). `threads`: each request is blocking work on its
//!   context's pool. `io_uring`: the contexts run on the io_uring backend and READ, WRITE and
//!   FLUSH are requests on each context's own ring; `native`: they are Linux AIO requests
//!   (`io_submit`) whose completions an eventfd handler reaps. Either way their completions
//!   run on the context's thread, no worker involved; the other commands stay on the pool,
//!   and a lone small request on the page cache takes the pool's path as under `threads`
//!   (`file_io.rs`). A mode the kernel refuses is an error at start.
//! * **Polling.** `--poll-max-ns` and its companions set the adaptive-polling parameters of
//!   every context (QEMU's IOThread `poll-max-ns`, `poll-grow`, `poll-shrink`, `poll-weight`;
//!   up to 32 µs by default, as QEMU's IOThreads (`DEFAULT_POLL_MAX_NS`: measured faster at
//!   queue depth 1, level elsewhere; BENCHMARKS.md), `--poll-max-ns 0` for none. Unlike
//!   QEMU's, the busy loop gives up the CPU between rounds by default
//!   ([`PollParams::yielding`]; `--no-poll-yield` spins as QEMU does): a server shares the
//!   machine with its clients, and on 2 vCPUs the spinning loop took the CPU that the client
//!   and the pool's workers needed (`qemu-img bench` 4 KiB writes at queue depth 32, 3 rounds:
//!   84–103 k IOPS spinning, 113–124 k yielding; fio reads at queue depth 1 under `--aio
//!   io_uring`: 32–57 k against 72–82 k; BENCHMARKS.md, "Session of 2026-12-06, 05:39
//!   UTC"). The ready line says what each context got, the stopped line what polling did. Client sockets poll in the
//!   backend (`poll_in_backend`): under `--aio io_uring` a polling loop sees the next request
//!   in its completion ring.
//! * **Clients.** Every connection holds a [`ClientSlot`] until it is closed and its last
//!   request has completed, and a TLS client's until its relay has ended too (the relay may
//!   still hold replies for it, up to its linger). While N are held, `--shared N` stops
//!   accepting (as qemu-nbd -e): more clients wait in the listen queue until a slot is given
//!   back. As qemu-nbd without `-t`, the server shuts down, as a signal does, when a client
//!   that completed its handshake leaves and the count falls to 0
//!   ([`ClientSlot::negotiated`]); `--persistent` (`-t`) serves until a signal instead.
//! * **Shutdown.** SIGINT and SIGTERM are blocked in every thread and read from a signalfd that
//!   is an fd handler of this thread's context, so a signal is an ordinary event of the loop.
//!   The listeners close at once; each context then stops reading requests, serves those it
//!   has read, lets the requests in flight complete and their replies go out, and closes its
//!   connections, or closes them anyway after [`GRACE`]. The process exits 0. A second signal
//!   exits at once, with status 1, unless it came within [`SIGNAL_ECHO`] of the first (the
//!   same request delivered twice, as `timeout` does).
//! * **Engines.** `--engine callbacks` (the default) serves a connection from a level-triggered
//!   fd handler with a state machine, and takes completions as callbacks; `--engine tasks`
//!   runs each connection as a task that reads requests and spawns a task per request, which
//!   awaits the pool and writes its reply under a send lock (QEMU's coroutines). Both behave
//!   the same on the wire.
//! * **Limits.** See `session.rs` and `connection.rs`: at most 32 MiB per request; per
//!   connection, 128 requests or 16 MiB of payload in flight and replies unsent before its
//!   socket stops being read; 10 s for the handshake; `--idle-timeout` after it. The
//!   contexts' pools run at most [`POOL_MAX_THREADS`] threads together (at least 2 each), and
//!   request buffers come from each context's pool (`buffers.rs`), whose idle buffers are
//!   capped over all contexts, so memory follows what is in flight.
//! * **Socket activation.** When `LISTEN_PID` is this process and `LISTEN_FDS` is N, fds 3 to
//!   N+2 are listening sockets (TCP or Unix) to serve instead of `--tcp`/`--unix`, as systemd
//!   passes them.
//! * **TLS.** `--tls-creds DIR` requires TLS, as qemu-nbd's `--tls-creds`: each client is
//!   met by a thread of its own that answers every option before `NBD_OPT_STARTTLS` with
//!   `NBD_REP_ERR_TLS_REQD`, runs the TLS handshake (rustls, X.509: `DIR/server-cert.pem`,
//!   `DIR/server-key.pem`; `--tls-verify-peer` also wants a client certificate issued by
//!   `DIR/ca-cert.pem`), and hands the session to a context, which serves one end of a Unix
//!   socket pair like any connection and relays between the other end and the client
//!   (`tls.rs`). Pre-shared keys instead of certificates (OpenSSL, `tls_psk.rs`), as qemu's
//!   `tls-creds-psk` and nbdkit's `--tls-psk`: `--tls-psk FILE`, or `DIR/keys.psk` in a
//!   `--tls-creds` directory without a certificate; the file holds `username:hexkey` lines.
//!   Without either, `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_POLICY`.

mod buffers;
mod conn_task;
mod connection;
mod export;
mod file_io;
mod protocol;
mod session;
mod tls;
mod tls_psk;
mod write_stream;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use aio::blockio::Engine as IoEngine;
use aio::{
    AioContext, BlockIo, ClockType, ContextHandle, FdHandler, PollParams, PollPolicy, Scale,
    ThreadPool,
};

use connection::{Engine, Settings, Shard, Socket};
use export::{Cache, Export};

/// The most threads the contexts' pools run the file I/O on, together (the pool's default is
/// QEMU's 64, per context): as many as nbdkit serves with, enough to keep a disk's queue busy; on the page cache
/// (2 vCPUs) 2 to 64 copied a GiB in the same time, within noise, and more threads only meant
/// more stacks and malloc arenas.
const POOL_MAX_THREADS: usize = 16;
/// How long shutdown waits for connections to finish their requests before closing them.
const GRACE: Duration = Duration::from_secs(5);
/// A second SIGINT or SIGTERM within this time of the first is the same request delivered
/// twice (coreutils' `timeout` signals the server, then its process group), not a second one;
/// a person pressing Ctrl-C again is slower.
const SIGNAL_ECHO: Duration = Duration::from_millis(250);
/// How long accepting pauses when the process is out of fds (or memory), instead of spinning
/// on a listener that stays readable.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// TLS handshakes under way at most (each on a thread of its own, `tls.rs`), so that
/// connections that never finish their handshake (each may hold a thread for the 10 s limit)
/// cost a bounded number of threads. A client beyond them closes the oldest one under way
/// rather than being refused: a real handshake takes milliseconds, so the oldest is one that
/// stalls, and a flood of idle connections cannot lock TLS clients out.
const MAX_TLS_HANDSHAKES: usize = 64;

/// How often at most a [`Throttled`] line is printed.
const THROTTLE_PERIOD: Duration = Duration::from_secs(10);

/// A log line about something clients can cause as often as they connect (a TLS handshake
/// that fails or stalls, the cap of handshakes under way), so that the log grows with time
/// rather than with an attacker's connection rate: printed the first time, then at most once
/// per [`THROTTLE_PERIOD`], saying how many like it were left out since the last one printed. (The lines of plain
/// connections are printed only with `--verbose`; so are these, unthrottled, with it.)
#[derive(Debug)]
pub(crate) struct Throttled {
    /// When a line was last printed, and how many were left out since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttled {
    pub(crate) const fn new() -> Throttled {
        Throttled {
            state: Mutex::new((None, 0)),
        }
    }

    /// Prints `line()` if none was printed within the period (always with `verbose`);
    /// otherwise counts it.
    pub(crate) fn log(&self, verbose: bool, line: impl FnOnce() -> String) {
        let left_out = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if !verbose && state.0.is_some_and(|at| now - at < THROTTLE_PERIOD) {
                state.1 += 1;
                return;
            }
            state.0 = Some(now);
            std::mem::take(&mut state.1)
        };
        if left_out > 0 {
            eprintln!(
                "{} ({left_out} more like it since the last one printed)",
                line()
            );
        } else {
            eprintln!("{}", line());
        }
    }
}

/// Lines about TLS clients whose handshake failed or stalled, in `tls.rs` and here.
pub(crate) static TLS_CLIENT_ERRORS: Throttled = Throttled::new();
/// Lines about what the server itself lacked for a TLS client (fds, a thread), which
/// clients' own failures must not hide.
pub(crate) static TLS_SERVER_ERRORS: Throttled = Throttled::new();

/// The most contexts the server makes unless `--contexts` asks for more.
const MAX_DEFAULT_CONTEXTS: usize = 8;

/// `--poll-max-ns` unless given: QEMU's IOThread default. With it, `cargo xtask bench nbd`
/// (`AIO_NBD_BENCH_VARIANTS=1`) measured three of the four queue-depth-1 rows 1.4-1.8 times
/// as fast as without (the fourth 1.06) on this repository's 2-vCPU machine, queue depth 32
/// and copies level
/// (BENCHMARKS.md, "polling client sockets in the ring").
const DEFAULT_POLL_MAX_NS: u64 = 32_768;

/// `--contexts`' default: one per CPU this process may run on, at most
/// [`MAX_DEFAULT_CONTEXTS`]. Connections are dealt round-robin, so a multi-conn client (nbdcopy
/// opens 4) has its connections served by as many threads as there are CPUs: on 2 vCPUs,
/// `nbdcopy -C 4 -R 64` out of the server ran about 3× faster with 2 contexts than with 1
/// (BENCHMARKS.md, "NBD: --contexts").
fn default_contexts() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_DEFAULT_CONTEXTS))
}

/// The longest export name, in bytes: the NBD protocol's limit on a string (qemu-nbd
/// refuses longer ones; a client refuses to send or list one).
const MAX_NAME: usize = 4096;

/// The NBD port (IANA), for `--tcp HOST`.
const NBD_PORT: u16 = 10809;

const USAGE: &str = "\
usage: nbd-server [OPTIONS] IMAGE
  --tcp ADDR            listen on TCP: HOST:PORT, HOST (port 10809) or :PORT (all IPv4
                        addresses); port 0 picks a free one; IPv6 as [::1]:PORT
  --unix PATH           listen on a Unix socket (the socket file is removed at exit)
  --name NAME           export name, at most 4096 bytes (default: the empty name)
  --read-only           refuse writes
  --contexts N          number of I/O contexts, one thread each (default: one per CPU,
                        at most 8); a client's connections are dealt over them
  --shared N            serve at most N clients at once; more wait to be accepted until
                        one leaves, as with qemu-nbd -e (default: no limit)
  -t, --persistent      serve until SIGINT/SIGTERM, however clients come and go; without
                        it the server exits, as qemu-nbd does, when the last client leaves
                        (a client that completed its handshake, leaving none connected)
  --idle-timeout SECS   close a client that sends and takes nothing for SECS seconds after
                        its handshake (default, and 0: never)
  --pid-file PATH       write the process id to PATH once listening; removed at exit
  --poll-max-ns N       busy-poll for up to N ns before sleeping, adapting the window to the
                        load, on every context (QEMU's poll-max-ns; default 32768, as
                        QEMU's IOThreads; 0: off); at most 1099511627775;
                        AIO_POLL_MAX_NS overrides it
  --poll-policy P       weighted (QEMU 2026, the default) or qemu10 (QEMU 10's per-handler
                        windows)
  --poll-weight W       the weighted policy's weight (QEMU's poll-weight): the newest wait
                        counts for 1/2^W of the estimate, W from 0 (the default weight, 2)
                        to 30
  --poll-grow G         a growing window is multiplied by G, 0 to 255 (default 0: 2)
  --poll-shrink S       a shrinking window is divided by S, 0 to 255 (default 0: halved, or
                        reset to 0 with qemu10)
  --no-poll-yield       spin between polling rounds, as QEMU does; by default the busy
                        loop gives up the CPU (sched_yield) between rounds, so that the
                        pool's workers and clients sharing the CPU run meanwhile
                        (--poll-yield, the default, is accepted)
  --aio MODE            how file I/O is done, as qemu-nbd's --aio: threads (the default:
                        blocking calls on each context's thread pool), io_uring (requests
                        on each context's own ring; the contexts run on the io_uring
                        backend) or native (Linux AIO, io_submit); TRIM, WRITE_ZEROES,
                        CACHE, BLOCK_STATUS and reads that look for holes use the pool in
                        every mode, and so do lone small requests on the page cache
                        (a worker keeps a CPU awake between them) and, under the
                        callbacks engine, WRITEs of more than 64 KiB without FUA on the
                        page cache to a connection with nothing in flight and nothing to
                        send (a worker receives, writes and answers them, and the ones
                        right behind them)
  --cache MODE          writeback (the default: through the page cache) or none
                        (O_DIRECT for every READ and WRITE whose offset and length meet
                        the file's direct I/O alignment, probed with statx, into buffers
                        aligned for it; others go through the cache), as qemu-nbd's
                        --cache; FLUSH syncs either way
  --engine E            how connections are served: callbacks (the default: an fd handler
                        and a state machine per connection) or tasks (a task per connection
                        and per request, as QEMU's nbd/server.c coroutines)
  --tls-creds DIR       require TLS, as qemu-nbd --tls-creds: every option before
                        NBD_OPT_STARTTLS gets NBD_REP_ERR_TLS_REQD; the certificate chain
                        and key are DIR/server-cert.pem and DIR/server-key.pem (PEM, the
                        names qemu and nbdkit use); TLS 1.3 and 1.2, X.509; a DIR
                        holding keys.psk and no certificate means pre-shared keys, as
                        qemu's tls-creds-psk
  --tls-psk FILE        require TLS with pre-shared keys, as nbdkit --tls-psk: FILE holds
                        username:hexkey lines (psktool's format); a client must name a
                        user of the file and hold its key
  --tls-verify-peer     with --tls-creds: require a client certificate issued by
                        DIR/ca-cert.pem
  --verbose             log each connection on stderr
  -h, --help            print this and exit
  -V, --version         print the version and exit
IMAGE is a raw image file or a block device. At least one of --tcp and --unix, unless
systemd passes the listening sockets (LISTEN_FDS, LISTEN_PID). The backend is the aio default
(AIO_BACKEND overrides it).";

#[derive(Debug)]
struct Config {
    image: PathBuf,
    /// Host and port.
    tcp: Option<(String, u16)>,
    unix: Option<PathBuf>,
    name: String,
    read_only: bool,
    contexts: usize,
    /// At most this many clients at once.
    shared: Option<usize>,
    /// Serve until a signal; without it, exit when the last negotiated client leaves.
    persistent: bool,
    idle_timeout: Option<Duration>,
    pid_file: Option<PathBuf>,
    /// The adaptive-polling parameters of every context.
    poll: PollParams,
    verbose: bool,
    /// How connections are served.
    engine: Engine,
    /// How file I/O is done (`--aio`).
    io: IoEngine,
    /// Whether the image's data goes through the page cache (`--cache`).
    cache: Cache,
    /// `--tls-creds`: TLS is required, with the certificate and key in this directory.
    tls_creds: Option<PathBuf>,
    /// `--tls-verify-peer`: clients must show a certificate issued by the directory's CA.
    tls_verify_peer: bool,
    /// `--tls-psk`: TLS is required, with the pre-shared keys of this file.
    tls_psk: Option<PathBuf>,
}

/// What the command line asks for.
#[derive(Debug)]
enum Command {
    Serve(Box<Config>),
    Help,
    Version,
}

/// `--tcp`'s argument as a host and a port: `HOST:PORT`, `HOST` alone (port [`NBD_PORT`]),
/// `:PORT` (every IPv4 address); an IPv6 host is bracketed when a port follows.
fn tcp_address(s: &str) -> Result<(String, u16), String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok((a.ip().to_string(), a.port()));
    }
    let bare = s.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
    if let Ok(ip) = bare.unwrap_or(s).parse::<IpAddr>() {
        return Ok((ip.to_string(), NBD_PORT));
    }
    let bad = || format!("--tcp takes HOST:PORT, HOST or :PORT, not {s:?}");
    match s.rsplit_once(':') {
        Some(("", port)) => Ok(("0.0.0.0".to_owned(), port.parse().map_err(|_| bad())?)),
        Some((host, port)) if !host.contains(':') => {
            Ok((host.to_owned(), port.parse().map_err(|_| bad())?))
        }
        Some(_) => Err(bad()),
        None if s.is_empty() => Err(bad()),
        None => Ok((s.to_owned(), NBD_PORT)),
    }
}

fn parse_args(mut args: impl Iterator<Item = OsString>) -> Result<Command, String> {
    let mut cfg = Config {
        image: PathBuf::new(),
        tcp: None,
        unix: None,
        name: String::new(),
        read_only: false,
        contexts: default_contexts(),
        shared: None,
        persistent: false,
        idle_timeout: None,
        pid_file: None,
        poll: PollParams::disabled(),
        verbose: false,
        engine: Engine::default(),
        io: IoEngine::Threads,
        cache: Cache::Writeback,
        tls_creds: None,
        tls_verify_peer: false,
        tls_psk: None,
    };
    let mut image = None;
    let (mut poll_max_ns, mut poll_weight, mut poll_grow, mut poll_shrink) =
        (DEFAULT_POLL_MAX_NS, None, 0, 0);
    let mut poll_yield = true;
    let mut poll_qemu10 = false;
    // Whether --name came already (for --tcp and --unix, their values say; the name's
    // default, "", does not).
    let mut named = false;
    while let Some(arg) = args.next() {
        let arg = arg.into_string().map_err(|a| format!("not UTF-8: {a:?}"))?;
        let mut value = |what: &str| {
            args.next()
                .ok_or_else(|| format!("{arg} needs {what}"))
                .and_then(|v| v.into_string().map_err(|v| format!("not UTF-8: {v:?}")))
                // `--tcp --unix S`: the value left out, not a value that looks like an option.
                .and_then(|v| match v.starts_with("--") {
                    true => Err(format!("{arg} needs {what}, not the option {v}")),
                    false => Ok(v),
                })
        };
        match arg.as_str() {
            // One listener of each kind and one export: a second of these is refused
            // rather than silently replacing the first.
            "--tcp" | "--unix" | "--name"
                if match arg.as_str() {
                    "--tcp" => cfg.tcp.is_some(),
                    "--unix" => cfg.unix.is_some(),
                    _ => named,
                } =>
            {
                return Err(format!("{arg} is given twice (one per server)"));
            }
            "--tcp" => cfg.tcp = Some(tcp_address(&value("an address")?)?),
            "--unix" => cfg.unix = Some(value("a path")?.into()),
            "--name" => {
                named = true;
                cfg.name = value("a name")?;
                if cfg.name.len() > MAX_NAME {
                    return Err(format!(
                        "--name: an export name is at most {MAX_NAME} bytes (the NBD protocol's \
                         limit), not {}",
                        cfg.name.len()
                    ));
                }
            }
            "--read-only" => cfg.read_only = true,
            "--contexts" => {
                let n = value("a number")?;
                cfg.contexts = match n.parse() {
                    Ok(n @ 1..=1024) => n,
                    _ => return Err(format!("--contexts takes 1 to 1024, not {n:?}")),
                };
            }
            "--shared" => {
                let n = value("a number")?;
                cfg.shared = match n.parse() {
                    Ok(n @ 1..) => Some(n),
                    _ => return Err(format!("--shared takes a number from 1, not {n:?}")),
                };
            }
            "-t" | "--persistent" => cfg.persistent = true,
            "--idle-timeout" => {
                let n = value("a number of seconds")?;
                cfg.idle_timeout = match n.parse::<u64>() {
                    Ok(0) => None,
                    Ok(secs @ 1..=86_400_000) => Some(Duration::from_secs(secs)),
                    _ => {
                        return Err(format!(
                            "--idle-timeout takes seconds (0: never), not {n:?}"
                        ));
                    }
                };
            }
            "--pid-file" => cfg.pid_file = Some(value("a path")?.into()),
            "--poll-max-ns" => {
                let n = value("a number of nanoseconds")?;
                poll_max_ns = at_most(&n, aio::MAX_POLL_NS).ok_or_else(|| {
                    format!(
                        "--poll-max-ns takes nanoseconds from 0 (off) to {}, not {n:?}",
                        aio::MAX_POLL_NS
                    )
                })?;
            }
            "--poll-weight" => {
                let n = value("a number")?;
                let max = aio::MAX_WEIGHT;
                let w = at_most(&n, max.into())
                    .ok_or_else(|| format!("--poll-weight takes 0 to {max}, not {n:?}"))?;
                poll_weight = Some(w as u8);
            }
            "--poll-policy" => {
                let p = value("weighted or qemu10")?;
                poll_qemu10 = match p.as_str() {
                    "weighted" => false,
                    "qemu10" => true,
                    _ => {
                        return Err(format!("--poll-policy takes weighted or qemu10, not {p:?}"));
                    }
                };
            }
            "--poll-grow" | "--poll-shrink" => {
                let n = value("a number")?;
                let factor = at_most(&n, u8::MAX.into())
                    .ok_or_else(|| format!("{arg} takes 0 to 255, not {n:?}"))?
                    as u8;
                if arg == "--poll-grow" {
                    poll_grow = factor;
                } else {
                    poll_shrink = factor;
                }
            }
            "--poll-yield" => poll_yield = true,
            "--no-poll-yield" => poll_yield = false,
            "--verbose" => cfg.verbose = true,
            "--tls-creds" => cfg.tls_creds = Some(value("a directory")?.into()),
            "--tls-verify-peer" => cfg.tls_verify_peer = true,
            "--tls-psk" => cfg.tls_psk = Some(value("a file")?.into()),
            "--engine" => {
                let e = value("callbacks or tasks")?;
                cfg.engine = match e.as_str() {
                    "callbacks" => Engine::Callbacks,
                    "tasks" => Engine::Tasks,
                    _ => return Err(format!("--engine takes callbacks or tasks, not {e:?}")),
                };
            }
            "--aio" => {
                let m = value("threads, io_uring or native")?;
                cfg.io = match m.as_str() {
                    "threads" => IoEngine::Threads,
                    "io_uring" => IoEngine::IoUring,
                    "native" => IoEngine::LinuxAio,
                    _ => {
                        return Err(format!(
                            "--aio takes threads, io_uring or native, not {m:?}"
                        ));
                    }
                };
            }
            "--cache" => {
                let m = value("writeback or none")?;
                cfg.cache = match m.as_str() {
                    "writeback" => Cache::Writeback,
                    "none" => Cache::None,
                    _ => return Err(format!("--cache takes writeback or none, not {m:?}")),
                };
            }
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            a if a.starts_with('-') => return Err(format!("unknown option {a}")),
            _ if image.is_some() => return Err(format!("one image only (got {arg:?} too)")),
            _ => image = Some(PathBuf::from(arg)),
        }
    }
    cfg.image = image.ok_or("no image file given")?;
    if cfg.tls_verify_peer && cfg.tls_creds.is_none() {
        return Err("--tls-verify-peer needs --tls-creds".into());
    }
    if cfg.tls_psk.is_some() && cfg.tls_creds.is_some() {
        return Err("--tls-psk and --tls-creds: one or the other".into());
    }
    let policy = match (poll_qemu10, poll_weight) {
        (true, Some(_)) => {
            return Err("--poll-weight is for the weighted policy, not qemu10".into());
        }
        (true, None) => PollPolicy::Qemu10,
        (false, Some(weight)) => PollPolicy::Weighted { weight },
        (false, None) => PollPolicy::default(),
    };
    cfg.poll = PollParams::new(Duration::from_nanos(poll_max_ns))
        .grow(poll_grow)
        .shrink(poll_shrink)
        .policy(policy)
        .yielding(poll_yield);
    // Every value was range-checked above; this is the library's own word on them.
    cfg.poll.validate().map_err(|e| e.to_string())?;
    Ok(Command::Serve(Box::new(cfg)))
}

fn main() -> ExitCode {
    let usage_error = |msg: &str| {
        eprintln!("nbd-server: {msg}");
        eprintln!("{}", USAGE.lines().next().unwrap_or_default());
        eprintln!("Try 'nbd-server --help' for more information.");
        ExitCode::from(2)
    };
    warn_about_environment();
    let cfg = match parse_args(std::env::args_os().skip(1)) {
        Ok(Command::Serve(cfg)) => cfg,
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("nbd-server {} (aio)", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(msg) => return usage_error(&msg),
    };
    let activated = match activated_listeners() {
        Ok(listeners) => listeners,
        Err(e) => {
            eprintln!("nbd-server: socket activation: {e}");
            return ExitCode::FAILURE;
        }
    };
    match (&activated, cfg.tcp.is_some() || cfg.unix.is_some()) {
        (None, false) => return usage_error("give --tcp ADDR, --unix PATH or both"),
        (Some(_), true) => {
            return usage_error(
                "systemd passed listening sockets (LISTEN_FDS): no --tcp or --unix",
            );
        }
        _ => {}
    }
    match run(&cfg, activated) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbd-server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cfg: &Config, activated: Option<Vec<Listener>>) -> io::Result<()> {
    // First, before any thread exists, so that every thread (I/O threads, pool workers)
    // inherits the blocked mask and the signals reach only the signalfd.
    let signals = Signals::new()?;
    buffers::release_freed_memory();
    let export = Export::open(&cfg.image, cfg.name.clone(), cfg.read_only, cfg.cache)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", cfg.image.display())))?;
    let export = Arc::new(export);
    let tls = match (&cfg.tls_creds, &cfg.tls_psk) {
        (Some(dir), _) => Some(tls::load(dir, cfg.tls_verify_peer)?),
        (None, Some(file)) => Some(tls::Creds::Psk(tls_psk::load(file)?)),
        (None, None) => None,
    };
    let pool_max = pool_threads_per_context(cfg.contexts);
    let ctx = new_context(cfg.poll, cfg.io, pool_max)?;
    let iothreads = (1..cfg.contexts)
        .map(|i| IoThread::spawn(i, cfg.poll, cfg.io, pool_max))
        .collect::<io::Result<Vec<_>>>()?;

    let mut listeners = Vec::new();
    if let Some((host, port)) = &cfg.tcp {
        let l = TcpListener::bind((host.as_str(), *port))
            .map_err(|e| with_what(e, &format!("{host} port {port}")))?;
        listeners.push(Listener::Tcp(l));
    }
    let mut bound = BoundSocket(None);
    if let Some(path) = &cfg.unix {
        remove_stale_socket(path)?;
        let l = UnixListener::bind(path).map_err(|e| with_what(e, &path.display()))?;
        bound.0 = Some(path.clone());
        listeners.push(Listener::Unix(l));
    }
    if let Some(passed) = activated {
        println!(
            "nbd-server: {} listening socket(s) from systemd (LISTEN_FDS)",
            passed.len()
        );
        listeners.extend(passed);
    }
    let mut addresses = Vec::new();
    for l in &listeners {
        l.set_nonblocking()?;
        addresses.push(l.describe()?);
    }
    // Before the listening lines: a start that fails here has announced nothing.
    if let Some(path) = &cfg.pid_file {
        let text = format!("{}\n", std::process::id());
        // Written whole under another name, then renamed: a reader never sees half a pid.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| with_what(e, &path.display()))?;
    }
    let pid_file = PidFile(cfg.pid_file.clone());
    for addr in &addresses {
        println!("nbd-server: listening on {addr}");
    }

    let resume = Arc::new(AtomicBool::new(false));
    let clients = Arc::new(Clients {
        count: AtomicUsize::new(0),
        last_left: AtomicBool::new(false),
        main: ctx.handle(),
        persistent: cfg.persistent,
        shared: cfg.shared,
        resume: resume.clone(),
    });
    let mut targets = vec![None];
    targets.extend(iothreads.iter().map(|t| Some(t.handle.clone())));
    let acceptor = Rc::new(Acceptor {
        listeners: RefCell::new(listeners.into_iter().map(Rc::new).collect()),
        handlers: RefCell::new(Vec::new()),
        targets,
        next: Cell::new(0),
        export,
        settings: Settings {
            verbose: cfg.verbose,
            idle_timeout: cfg.idle_timeout,
            engine: cfg.engine,
            io: cfg.io,
        },
        clients: clients.clone(),
        tls,
        unix_path: cfg.unix.clone(),
        resume,
        backoff: RefCell::new(None),
        failed_accepts: Cell::new(0),
    });
    acceptor.watch(&ctx)?;

    let stopping = Rc::new(Cell::new(None::<(&'static str, Instant)>));
    let (stop, acc) = (stopping.clone(), acceptor.clone());
    // The handler owns the signal fd; its callback reads through a second `Rc`.
    let signal_fd = Rc::new(signals.fd);
    let pid_path = cfg.pid_file.clone();
    let _signals = ctx
        .fd_handler(signal_fd.clone())
        .on_read(move |ctx| {
            let Some(name) = Signals::read(&signal_fd) else {
                return;
            };
            if let Some((first, at)) = stop.get() {
                if at.elapsed() < SIGNAL_ECHO {
                    // The same request twice: coreutils' `timeout` signals the server and
                    // then its process group, and both can arrive one after the other.
                    return;
                }
                // A request stuck in the kernel (a hung disk) would hold the graceful
                // shutdown for its whole grace period; a second signal is the way out.
                println!("nbd-server: {name} after {first}, exiting at once");
                let _ = io::stdout().flush();
                if let Some(path) = &pid_path {
                    let _ = std::fs::remove_file(path);
                }
                std::process::exit(1);
            }
            println!("nbd-server: {name}, shutting down");
            stop.set(Some((name, Instant::now())));
            acc.shut_down(ctx);
        })
        .register()?;

    // Read back from every context: what the loops really run with, after AIO_POLL_MAX_NS.
    let mut polling: Vec<String> = Vec::new();
    for p in std::iter::once(ctx.poll_params())
        .chain(iothreads.iter().map(|t| t.handle.poll_params()))
        .map(describe_polling)
    {
        if !polling.contains(&p) {
            polling.push(p);
        }
    }
    println!(
        "nbd-server: ready on {} (backend {}, {} context{}, {}, export {:?}, {} bytes{}, \
         aio {}, cache {}, sendfile {}, tls {}, engine {})",
        addresses.join(", "),
        ctx.backend(),
        cfg.contexts,
        if cfg.contexts == 1 { "" } else { "s" },
        polling.join(" / "),
        cfg.name,
        acceptor.export.size,
        if cfg.read_only { ", read-only" } else { "" },
        io_name(cfg.io),
        match cfg.cache {
            Cache::Writeback => "writeback",
            Cache::None => "none",
        },
        // Big READs from the page cache (`file_io::read_by_sendfile`), in every `--aio` mode:
        // an image the probe at open found can be sent from (not `--cache none`).
        if acceptor.export.sendfile {
            "on"
        } else {
            "off"
        },
        match (&acceptor.tls, cfg.tls_verify_peer) {
            (None, _) => "off",
            (Some(tls::Creds::Psk(_)), _) => "required with pre-shared keys",
            (Some(_), false) => "required",
            (Some(_), true) => "required with client certificates",
        },
        match cfg.engine {
            Engine::Callbacks => "callbacks",
            Engine::Tasks => "tasks",
        }
    );
    io::stdout().flush()?;

    let shard = Shard::of(&ctx);
    // From here the acceptor removes the socket, when it stops listening.
    bound.0 = None;
    while !(stopping.get().is_some() && shard.finished()) {
        ctx.poll();
        if acceptor.resume.swap(false, Ordering::Relaxed) && stopping.get().is_none() {
            acceptor.watch(&ctx)?;
        }
        // Relaxed: the flag and the count are read on this thread, the only one that adds
        // clients; nothing else is published through them.
        if clients.last_left.swap(false, Ordering::Relaxed)
            && clients.count.load(Ordering::Relaxed) == 0
            && stopping.get().is_none()
        {
            let why = "the last client disconnected, no --persistent";
            println!("nbd-server: {why}, shutting down");
            stopping.set(Some((why, Instant::now())));
            acceptor.shut_down(&ctx);
        }
    }
    let mut total = Tally::of(&shard, &ctx);
    for t in iothreads {
        total.add(&t.join()?);
    }
    drop(pid_file);
    // Every context has the same parameters; with polling off the counters stay 0.
    let polled = if ctx.poll_params().is_disabled() {
        String::new()
    } else {
        format!(
            "; polling: {} hits, {} misses ({} ended by the ring, {} by a contended yield), {} ms",
            total.poll_hits,
            total.poll_misses,
            total.poll_ring_ends,
            total.poll_contended,
            total.poll_time.as_millis()
        )
    };
    println!(
        "nbd-server: stopped ({}): {} connections, {} requests ({} reads and {} writes served \
         at once on the page cache, {} reads sent from it with sendfile, {} early sends of \
         replies served at once, {} block status replies built at once, {} writes streamed by \
         a worker in {} streams, {} of them ended with a reply unsent){polled}",
        stopping.get().map_or("?", |(why, _)| why),
        total.accepted,
        total.requests,
        total.cached_reads,
        total.writes_at_once,
        total.sendfile_reads,
        total.early_sends,
        total.block_status_at_once,
        total.streamed_writes,
        total.streams,
        total.streams_full,
    );
    io::stdout().flush()
}

/// How many threads each of `contexts` contexts' pools may run: [`POOL_MAX_THREADS`] over all
/// of them, at least 2 each.
fn pool_threads_per_context(contexts: usize) -> usize {
    (POOL_MAX_THREADS / contexts.max(1)).max(2)
}

/// A context with the server's polling parameters (the `AIO_POLL_MAX_NS` override applies), on
/// the default backend (`AIO_BACKEND` applies), or on io_uring for `--aio io_uring`, whose
/// requests go on the context's own ring; checked to carry file I/O with `io`.
fn new_context(poll: PollParams, io: IoEngine, pool_max: usize) -> io::Result<AioContext> {
    let mut builder = aio::Builder::new().poll_params(poll);
    if io == IoEngine::IoUring {
        builder = builder.backend(aio::Backend::IoUring);
    }
    let ctx = builder.build().map_err(|e| {
        if io == IoEngine::IoUring {
            io::Error::new(e.kind(), format!("--aio io_uring: {e}"))
        } else {
            e
        }
    })?;
    BlockIo::with_engine(&ctx, io)
        .map_err(|e| io::Error::new(e.kind(), format!("--aio {}: {e}", io_name(io))))?;
    ThreadPool::of(&ctx)
        .set_limits(0, pool_max)
        .map_err(|e| io::Error::other(e.to_string()))?;
    Ok(ctx)
}

/// `--aio`'s word for an engine.
fn io_name(io: IoEngine) -> &'static str {
    match io {
        IoEngine::Threads => "threads",
        IoEngine::IoUring => "io_uring",
        IoEngine::LinuxAio => "native",
    }
}

/// `n` as a number from 0 to `max`, or `None`.
fn at_most(n: &str, max: u64) -> Option<u64> {
    n.parse::<u64>().ok().filter(|v| *v <= max)
}

/// `polling off`, `polling up to 32768 ns (qemu10)`, `polling up to 32768 ns (weighted 2,
/// grow 4)`: the ready line's words for a context's parameters.
fn describe_polling(p: PollParams) -> String {
    if p.is_disabled() {
        return "polling off".to_owned();
    }
    let mut how = match p.get_policy() {
        PollPolicy::Weighted { weight } => format!("weighted {weight}"),
        _ => "qemu10".to_owned(),
    };
    for (name, value) in [("grow", p.get_grow()), ("shrink", p.get_shrink())] {
        if value != 0 {
            how.push_str(&format!(", {name} {value}"));
        }
    }
    if p.is_yielding() {
        how.push_str(", yielding");
    }
    format!("polling up to {} ns ({how})", p.max().as_nanos())
}

/// What one context did, for the stopped line.
#[derive(Debug, Default)]
struct Tally {
    accepted: u64,
    requests: u64,
    /// READs served at once from the page cache (`file_io::read_cached_now`).
    cached_reads: u64,
    /// WRITEs done at once on the context's thread (`file_io::may_write_at_once`).
    writes_at_once: u64,
    /// READ replies whose data went from the page cache with `sendfile`.
    sendfile_reads: u64,
    /// Sends of replies served at once made before the read's last request was handled.
    early_sends: u64,
    /// BLOCK_STATUS replies built at once on the context's thread.
    block_status_at_once: u64,
    /// WRITEs streamed by a worker (`write_stream.rs`), the streams, and those of them that
    /// ended with a reply the socket did not take (full, or failed).
    streamed_writes: u64,
    streams: u64,
    streams_full: u64,
    poll_hits: u64,
    poll_misses: u64,
    /// Of the misses, the polling phases that ended on a completion or a socket's readiness
    /// in the ring (io_uring).
    poll_ring_ends: u64,
    /// Of the misses, the phases that a yield which gave the CPU away for long ended (the
    /// context then waits without polling for a while: `Stats::poll_contended`).
    poll_contended: u64,
    poll_time: Duration,
}

impl Tally {
    fn of(shard: &Shard, ctx: &AioContext) -> Tally {
        let stats = ctx.stats();
        Tally {
            accepted: shard.accepted.get(),
            requests: shard.requests.get(),
            cached_reads: shard.cached_reads.get(),
            writes_at_once: shard.writes_at_once.get(),
            sendfile_reads: shard.sendfile_reads.get(),
            early_sends: shard.early_sends.get(),
            block_status_at_once: shard.block_status_at_once.get(),
            streamed_writes: shard.streamed_writes.get(),
            streams: shard.streams.get(),
            streams_full: shard.streams_full.get(),
            poll_hits: stats.poll_hits,
            poll_misses: stats.poll_misses,
            poll_ring_ends: stats.poll_backend_ends,
            poll_contended: stats.poll_contended,
            poll_time: stats.poll_time,
        }
    }

    fn add(&mut self, other: &Tally) {
        self.accepted += other.accepted;
        self.requests += other.requests;
        self.cached_reads += other.cached_reads;
        self.writes_at_once += other.writes_at_once;
        self.sendfile_reads += other.sendfile_reads;
        self.early_sends += other.early_sends;
        self.block_status_at_once += other.block_status_at_once;
        self.streamed_writes += other.streamed_writes;
        self.streams += other.streams;
        self.streams_full += other.streams_full;
        self.poll_hits += other.poll_hits;
        self.poll_misses += other.poll_misses;
        self.poll_ring_ends += other.poll_ring_ends;
        self.poll_contended += other.poll_contended;
        self.poll_time += other.poll_time;
    }
}

/// The pid file, removed when the server stops.
struct PidFile(Option<PathBuf>);

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The clients connected now, over all contexts: what `--shared` and the exit after the last
/// client look at.
struct Clients {
    count: AtomicUsize,
    /// Set (without `--persistent`) when a negotiated client's leaving brought the count to 0;
    /// read by the main loop.
    last_left: AtomicBool,
    /// The main context, woken when the count falls to 0.
    main: ContextHandle,
    persistent: bool,
    /// `--shared`: at most this many clients at once.
    shared: Option<usize>,
    /// Set when the listeners are to be watched again ([`Acceptor::resume`]): by a slot given
    /// back while the count was at the `--shared` limit.
    resume: Arc<AtomicBool>,
}

/// One client's place in [`Clients`]: taken when its connection is accepted, given back when
/// the connection is dropped (closed, and its last request completed) and, for a TLS client,
/// its relay too (`tls.rs`; both hold an `Rc` of it), on whichever context served it.
/// `negotiated` says whether the client reached the transmission phase: only such a client's
/// leaving can end the server (qemu-nbd's rule), so that a port scan, a refused handshake or
/// an export listing (`NBD_OPT_LIST` then `NBD_OPT_ABORT`, as `nbdinfo --list` does) does not
/// stop it.
pub struct ClientSlot {
    clients: Arc<Clients>,
    negotiated: Cell<bool>,
}

impl std::fmt::Debug for ClientSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Relaxed: a snapshot for a log line.
        let clients = self.clients.count.load(Ordering::Relaxed);
        write!(
            f,
            "ClientSlot({clients} clients, negotiated: {})",
            self.negotiated.get()
        )
    }
}

impl ClientSlot {
    fn take(clients: &Arc<Clients>) -> ClientSlot {
        // Relaxed: a plain count, with nothing published through it.
        clients.count.fetch_add(1, Ordering::Relaxed);
        ClientSlot {
            clients: clients.clone(),
            negotiated: Cell::new(false),
        }
    }

    /// The client has completed its handshake (entered the transmission phase).
    pub fn negotiated(&self) {
        self.negotiated.set(true);
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        // Relaxed: as in `take`; the main loop re-reads the count on its own thread.
        let before = self.clients.count.fetch_sub(1, Ordering::Relaxed);
        if self.clients.shared == Some(before) {
            // The acceptor stopped watching at the limit: room for one more now.
            let resume = self.clients.resume.clone();
            // Relaxed: as `last_left` below.
            self.clients
                .main
                .schedule_oneshot(move || resume.store(true, Ordering::Relaxed));
        }
        let last = before == 1;
        if last && self.negotiated.get() && !self.clients.persistent {
            let clients = self.clients.clone();
            // Relaxed: the main loop reads the flag after running this, on its own thread.
            self.clients
                .main
                .schedule_oneshot(move || clients.last_left.store(true, Ordering::Relaxed));
        }
    }
}

/// The listening sockets systemd passes, read as `sd_listen_fds` reads them: `None` unless
/// `LISTEN_PID` names this process and `LISTEN_FDS` is set and not 0; a `LISTEN_FDS` that is
/// not a number (or over 1024) is an error. Each fd must be a listening TCP or Unix stream
/// socket (systemd's `Accept=no`). The variables are left set: the server starts no process
/// that could inherit them.
fn activated_listeners() -> io::Result<Option<Vec<Listener>>> {
    let Ok(pid) = std::env::var("LISTEN_PID") else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        // Meant for another process (a parent that did not clear it).
        return Ok(None);
    }
    let Ok(fds) = std::env::var("LISTEN_FDS") else {
        return Ok(None);
    };
    let n: RawFd = match fds.trim().parse() {
        Ok(0) => return Ok(None),
        Ok(n @ 1..=1024) => n,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("LISTEN_FDS={fds:?} is not a number of sockets from 0 to 1024"),
            ));
        }
    };
    (3..3 + n)
        .map(passed_listener)
        .collect::<io::Result<_>>()
        .map(Some)
}

/// Takes ownership of fd `fd`, passed by systemd, as a listener.
fn passed_listener(fd: RawFd) -> io::Result<Listener> {
    let fail = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("fd {fd}: {what}"));
    // SAFETY: fcntl with F_GETFD/F_SETFD reads and sets the fd's flags and touches no memory.
    let ok = unsafe {
        libc::fcntl(fd, libc::F_GETFD) >= 0 && libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) == 0
    };
    if !ok {
        return Err(fail(&io::Error::last_os_error().to_string()));
    }
    let (mut listening, mut kind): (libc::c_int, libc::c_int) = (0, 0);
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: sockaddr_storage is plain data; all zeros is a valid value.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut addr_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // every pointer points to a live local of the size passed with it, for the
    // duration of the calls; the fd is open (checked above).
    // SAFETY: the conditions just stated hold for this call.
    let ok = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut listening).cast(),
            &mut len,
        ) == 0
            && libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&raw mut kind).cast(),
                &mut len,
            ) == 0
            && libc::getsockname(fd, (&raw mut addr).cast(), &mut addr_len) == 0
    };
    if !ok {
        return Err(fail("not a socket"));
    }
    if kind != libc::SOCK_STREAM || listening == 0 {
        return Err(fail(
            "not a listening stream socket (systemd's Accept=yes is not supported)",
        ));
    }
    // LISTEN_FDS hands fds 3 and up to this process, and nothing else in it owns them:
    // this is the only place that takes them, once each.
    // SAFETY: the conditions just stated hold for this call.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    match libc::c_int::from(addr.ss_family) {
        libc::AF_INET | libc::AF_INET6 => Ok(Listener::Tcp(TcpListener::from(owned))),
        libc::AF_UNIX => Ok(Listener::Unix(UnixListener::from(owned))),
        family => Err(fail(&format!(
            "address family {family} is neither TCP nor Unix"
        ))),
    }
}

fn with_what(e: io::Error, what: &dyn std::fmt::Display) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// A socket file left by a server that did not exit cleanly would make bind fail; anything
/// else at that path is not ours to remove.
fn remove_stale_socket(path: &std::path::Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // A socket that takes connections is another server's, live: not stale.
            if takes_connections(path) {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: a server is listening on this socket", path.display()),
                ));
            }
            std::fs::remove_file(path)
        }
        _ => Ok(()),
    }
}

/// Whether a server listens on the Unix socket at `path`: it accepts a connection, or (on
/// Linux) has no room for one yet, its backlog full (a busy server, live all the same). The
/// connect does not block, so a full backlog cannot hang the start either.
fn takes_connections(path: &std::path::Path) -> bool {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};
    let probe = || -> io::Result<bool> {
        let fd = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None)?;
        rustix::io::ioctl_fionbio(&fd, true)?;
        let addr = SocketAddrUnix::new(path)?;
        Ok(match rustix::net::connect(&fd, &addr) {
            Ok(()) => true,
            Err(e) => e == rustix::io::Errno::AGAIN,
        })
    };
    probe().unwrap_or(false)
}

/// Says on stderr when `AIO_BACKEND` or `AIO_POLL_MAX_NS` is set to something the library
/// will ignore (it logs that through `tracing`, which this program does not print).
fn warn_about_environment() {
    if let Ok(v) = std::env::var(aio::BACKEND_ENV)
        && aio::Backend::from_name(&v).is_none()
    {
        eprintln!(
            "nbd-server: ignoring {}={v:?}: expected poll, poll+epoll, epoll, io_uring, polling or auto",
            aio::BACKEND_ENV
        );
    }
    if let Ok(v) = std::env::var(aio::POLL_MAX_NS_ENV)
        && !v
            .trim()
            .parse::<u64>()
            .is_ok_and(|ns| ns <= aio::MAX_POLL_NS)
    {
        eprintln!(
            "nbd-server: ignoring {}={v:?}: expected nanoseconds, at most {}",
            aio::POLL_MAX_NS_ENV,
            aio::MAX_POLL_NS
        );
    }
}

/// Removes the Unix socket this process bound when dropped, on the way out of a start that
/// failed after the bind (the listener's own removal at shutdown does it otherwise).
struct BoundSocket(Option<PathBuf>);

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l) => l.set_nonblocking(true),
        }
    }

    /// `tcp ADDR:PORT` or `unix PATH`, with the port the kernel picked for port 0.
    fn describe(&self) -> io::Result<String> {
        Ok(match self {
            Listener::Tcp(l) => format!("tcp {}", l.local_addr()?),
            Listener::Unix(l) => match l.local_addr()?.as_pathname() {
                Some(path) => format!("unix {}", path.display()),
                None => "unix (unnamed)".to_owned(),
            },
        })
    }

    fn accept(&self) -> io::Result<Socket> {
        Ok(match self {
            Listener::Tcp(l) => Socket::Tcp(l.accept()?.0),
            Listener::Unix(l) => Socket::Unix(l.accept()?.0),
        })
    }
}

/// The send buffer a Unix client socket asks for (`SO_SNDBUF`; the kernel caps it at
/// `net.core.wmem_max`, 208 KiB unless raised, and doubles it for its bookkeeping). The default
/// (`wmem_default`, 208 KiB) holds less than one 256 KiB READ reply, so a copy at queue depth 16
/// went back and forth between a full socket and the client's next read; with 4 MiB allowed,
/// nbdcopy from one connection ran at 3.2–3.6 GiB/s against 1.7–1.9 (with the replies' data sent
/// from the page cache; copying it, the bigger buffer changed nothing: BENCHMARKS.md, "big
/// READs from the page cache"). TCP keeps the kernel's autotuning, which setting a size would
/// turn off. `AIO_NBD_UNIX_SNDBUF=BYTES` in the environment asks for another size instead (the
/// tests use a small one to fill a socket with replies quickly).
const UNIX_SEND_BUFFER: usize = 4 << 20;

/// [`UNIX_SEND_BUFFER`], or the size `AIO_NBD_UNIX_SNDBUF` asks for; read once.
fn unix_send_buffer() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        let Some(v) = std::env::var_os("AIO_NBD_UNIX_SNDBUF") else {
            return UNIX_SEND_BUFFER;
        };
        match v.to_str().and_then(|v| v.parse().ok()) {
            Some(size) => size,
            None => {
                eprintln!(
                    "nbd-server: AIO_NBD_UNIX_SNDBUF={v:?} is not a size in bytes: asking for \
                     {UNIX_SEND_BUFFER}"
                );
                UNIX_SEND_BUFFER
            }
        }
    })
}

/// Makes an accepted socket ready for its fd handler.
pub(crate) fn prepare(sock: &Socket) -> io::Result<()> {
    match sock {
        Socket::Tcp(s) => {
            s.set_nonblocking(true)?;
            // Replies are complete messages: waiting for more to fill a segment only adds
            // latency (Nagle's delayed ACK interplay would cost 40 ms per small reply).
            s.set_nodelay(true)
        }
        Socket::Unix(s) => {
            // Only a hint: a kernel that refuses it serves with the default buffer.
            #[cfg(target_os = "linux")]
            if let Err(e) = rustix::net::sockopt::set_socket_send_buffer_size(s, unix_send_buffer())
            {
                eprintln!("nbd-server: cannot set a client socket's send buffer: {e}");
            }
            s.set_nonblocking(true)
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l) => l.as_fd(),
        }
    }
}

/// The listeners and where accepted connections go.
struct Acceptor {
    /// Each shared with its accept handler while it has one (`close` drops both).
    listeners: RefCell<Vec<Rc<Listener>>>,
    handlers: RefCell<Vec<FdHandler>>,
    /// The contexts connections are dealt to: `None` is this thread's, the others are I/O
    /// threads, reached through their handles.
    targets: Vec<Option<ContextHandle>>,
    next: Cell<usize>,
    export: Arc<Export>,
    settings: Settings,
    clients: Arc<Clients>,
    /// `--tls-creds` or `--tls-psk`: each client is met by a thread of its own (`tls.rs`),
    /// which hands the session to the context it was dealt to once TLS is on.
    tls: Option<tls::Creds>,
    /// The socket file to remove at exit (`--unix`; not a socket systemd made).
    unix_path: Option<PathBuf>,
    /// Set by the backoff timer (whose callback must be `Send`) and by a client slot given
    /// back at the `--shared` limit; the main loop then watches the listeners again.
    resume: Arc<AtomicBool>,
    backoff: RefCell<Option<aio::Timer>>,
    /// Backoffs since accepting last worked: an accept that keeps failing (out of fds) is
    /// logged when it starts and when it ends, not ten times a second.
    failed_accepts: Cell<u64>,
}

impl Acceptor {
    /// Registers an accept handler for every listener.
    fn watch(self: &Rc<Self>, ctx: &AioContext) -> io::Result<()> {
        let mut handlers = self.handlers.borrow_mut();
        handlers.clear();
        for (i, l) in self.listeners.borrow().iter().enumerate() {
            let me = Rc::downgrade(self);
            let h = ctx.fd_handler(l.clone()).on_read(move |ctx| {
                if let Some(me) = me.upgrade() {
                    me.accept(ctx, i);
                }
            });
            handlers.push(h.register()?);
        }
        Ok(())
    }

    /// Accepts every pending connection on listener `i` and deals them out.
    fn accept(self: &Rc<Self>, ctx: &AioContext, i: usize) {
        loop {
            // Relaxed: this thread is the only one that adds clients, so the count cannot
            // grow under us; a slot given back meanwhile sets `resume`, which re-watches.
            let connected = self.clients.count.load(Ordering::Relaxed);
            if self.clients.shared.is_some_and(|limit| connected >= limit) {
                // As qemu-nbd -e: stop accepting; clients wait in the listen queue until a
                // slot is given back (then `resume` is set and the main loop watches again).
                if self.settings.verbose {
                    eprintln!("nbd-server: {connected} clients (--shared): not accepting");
                }
                self.handlers.borrow_mut().clear();
                return;
            }
            let accepted = match self.listeners.borrow().get(i) {
                Some(l) => l.accept(),
                None => return,
            };
            let sock = match accepted {
                Ok(sock) => sock,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // The client gave up between connecting and our accept: nothing to serve.
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE, ENFILE, ENOMEM...: the connection stays queued in the kernel.
                    // Stop watching the listeners for a while rather than spin on them.
                    let failed = self.failed_accepts.get();
                    if failed == 0 {
                        eprintln!(
                            "nbd-server: accept: {e}; trying again every {} ms",
                            ACCEPT_BACKOFF.as_millis()
                        );
                    }
                    self.failed_accepts.set(failed + 1);
                    self.pause(ctx);
                    return;
                }
            };
            let failed = self.failed_accepts.replace(0);
            if failed > 0 {
                eprintln!("nbd-server: accept works again, after {failed} failed tries");
            }
            if let Err(e) = prepare(&sock) {
                // This one socket is unusable; the listener is fine.
                eprintln!("nbd-server: dropping an accepted connection: {e}");
                continue;
            }
            let n = self.next.get();
            self.next.set((n + 1) % self.targets.len());
            let (export, settings) = (self.export.clone(), self.settings);
            let slot = ClientSlot::take(&self.clients);
            if let Some(tls) = &self.tls {
                let target = self.targets[n].clone().unwrap_or_else(|| ctx.handle());
                meet_over_tls(sock, tls.clone(), target, export, settings, slot);
                continue;
            }
            match &self.targets[n] {
                None => {
                    Shard::start(ctx, sock, export, settings, Rc::new(slot), None);
                }
                Some(handle) => handle.schedule_oneshot(move || {
                    if let Some(ctx) = AioContext::current() {
                        Shard::start(&ctx, sock, export, settings, Rc::new(slot), None);
                    }
                }),
            }
        }
    }

    fn pause(&self, ctx: &AioContext) {
        self.handlers.borrow_mut().clear();
        let resume = self.resume.clone();
        let timer = ctx.timer(ClockType::Realtime, Scale::NS, move || {
            resume.store(true, Ordering::Relaxed)
        });
        timer.arm_after(ACCEPT_BACKOFF);
        *self.backoff.borrow_mut() = Some(timer);
    }

    /// Shutdown: stops listening and drains every context (see the module docs).
    fn shut_down(&self, ctx: &AioContext) {
        self.close();
        for target in self.targets.iter().flatten() {
            target.schedule_oneshot(|| {
                if let Some(ctx) = AioContext::current() {
                    Shard::drain(&ctx, GRACE);
                }
            });
        }
        Shard::drain(ctx, GRACE);
    }

    /// Stops listening for good: handlers, sockets and the Unix socket's file.
    fn close(&self) {
        self.handlers.borrow_mut().clear();
        self.listeners.borrow_mut().clear();
        self.backoff.borrow_mut().take();
        if let Some(path) = &self.unix_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Starts the thread that meets a client of a TLS server (`tls.rs`); once TLS is on, the
/// session is served on `target`'s context, holding `slot`.
fn meet_over_tls(
    sock: Socket,
    creds: tls::Creds,
    target: ContextHandle,
    export: Arc<Export>,
    settings: Settings,
    slot: ClientSlot,
) {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    /// The handshakes under way, oldest first: each one's number, start and a second handle
    /// on its socket, by which a newcomer beyond [`MAX_TLS_HANDSHAKES`] ends the oldest.
    static MEETING: Mutex<VecDeque<(usize, Instant, Socket)>> = Mutex::new(VecDeque::new());
    /// A place among the handshakes under way, given back when dropped: when the thread's
    /// handshake is over, or with the thread's closure if it panics or never starts.
    struct Meeting(usize);
    impl Drop for Meeting {
        fn drop(&mut self) {
            let mut meeting = MEETING.lock().unwrap_or_else(|p| p.into_inner());
            meeting.retain(|(n, _, _)| *n != self.0);
        }
    }
    // Relaxed: a number for the logs and the registry, unique per client.
    let number = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("TLS client {number}");
    let handle = match sock.try_clone() {
        Ok(h) => h,
        Err(e) => {
            TLS_SERVER_ERRORS.log(settings.verbose, || {
                format!("nbd-server: {name}: {e}, closing")
            });
            return;
        }
    };
    let oldest = {
        let mut meeting = MEETING.lock().unwrap_or_else(|p| p.into_inner());
        let oldest = if meeting.len() >= MAX_TLS_HANDSHAKES {
            meeting.pop_front()
        } else {
            None
        };
        meeting.push_back((number, Instant::now(), handle));
        oldest
    };
    if let Some((old, since, sock)) = oldest {
        // Its thread's blocking read or write returns at once; the thread then ends.
        sock.shutdown();
        let ms = since.elapsed().as_millis();
        static AT_CAP: Throttled = Throttled::new();
        AT_CAP.log(settings.verbose, || {
            format!(
                "nbd-server: {name}: {MAX_TLS_HANDSHAKES} TLS handshakes under way, \
                 closing the oldest, TLS client {old} ({ms} ms)"
            )
        });
    }
    let meeting = Meeting(number);
    let spawned = thread::Builder::new()
        .name("nbd-tls".to_owned())
        .spawn(move || {
            let met = tls::meet(sock, creds, name, settings.verbose);
            drop(meeting);
            if let Some(session) = met {
                target.schedule_oneshot(move || {
                    if let Some(ctx) = AioContext::current() {
                        session.serve(&ctx, export, settings, slot);
                    }
                });
            }
        });
    if let Err(e) = spawned {
        // The socket and the place went with the closure: the client sees it closed.
        TLS_SERVER_ERRORS.log(settings.verbose, || {
            format!("nbd-server: cannot start a thread for a TLS client: {e}")
        });
    }
}

/// An I/O thread: its own context, polled until shutdown has drained it.
struct IoThread {
    handle: ContextHandle,
    join: JoinHandle<io::Result<Tally>>,
}

impl IoThread {
    fn spawn(
        index: usize,
        poll: PollParams,
        io: IoEngine,
        pool_max: usize,
    ) -> io::Result<IoThread> {
        let (tx, rx) = mpsc::channel();
        let join = thread::Builder::new()
            .name(format!("nbd-io{index}"))
            .spawn(move || {
                // AioContext is !Send: the thread that polls a context creates it.
                let ctx = match new_context(poll, io, pool_max) {
                    Ok(ctx) => ctx,
                    Err(e) => {
                        let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                        return Err(e);
                    }
                };
                let _ = tx.send(Ok(ctx.handle()));
                let shard = Shard::of(&ctx);
                while !shard.finished() {
                    ctx.poll();
                }
                Ok(Tally::of(&shard, &ctx))
            })?;
        let handle = rx
            .recv()
            .map_err(|_| io::Error::other("an I/O thread exited before starting"))??;
        Ok(IoThread { handle, join })
    }

    fn join(self) -> io::Result<Tally> {
        self.join
            .join()
            .map_err(|_| io::Error::other("an I/O thread panicked"))?
    }
}

/// SIGINT and SIGTERM, blocked in every thread and read from `fd`: a signalfd on Linux;
/// elsewhere the read end of a socket pair that a thread blocked in `sigwait` writes each
/// signal's number to (the portable fallback: no signal handler, and the loop sees a signal as
/// an ordinary readable fd either way).
struct Signals {
    fd: OwnedFd,
}

impl Signals {
    /// Blocks SIGINT and SIGTERM in this thread (and so in every thread it starts from now on)
    /// and returns the set.
    fn block() -> io::Result<libc::sigset_t> {
        // sigset_t is plain data that sigemptyset initializes before use.
        // SAFETY: every pointer passed points to a live local for the duration of its call.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if r != 0 {
                return Err(io::Error::from_raw_os_error(r));
            }
            Ok(set)
        }
    }

    #[cfg(target_os = "linux")]
    fn new() -> io::Result<Signals> {
        let set = Self::block()?;
        // SAFETY: `set` is a live, initialized sigset_t for the duration of the call.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Signals { fd })
    }

    #[cfg(not(target_os = "linux"))]
    fn new() -> io::Result<Signals> {
        let set = Self::block()?;
        let (read, mut write) = std::os::unix::net::UnixStream::pair()?;
        read.set_nonblocking(true)?;
        thread::Builder::new()
            .name("nbd-signals".into())
            .spawn(move || {
                loop {
                    let mut signo: libc::c_int = 0;
                    // The signals in `set` are blocked in this thread, as sigwait requires.
                    // SAFETY: `set` and `signo` are live locals for the duration of the call.
                    let r = unsafe { libc::sigwait(&set, &mut signo) };
                    if r != 0 || write.write_all(&signo.to_ne_bytes()).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Signals {
            fd: OwnedFd::from(read),
        })
    }

    /// The name of a pending signal, if one is pending.
    fn read(fd: &OwnedFd) -> Option<&'static str> {
        let signo = Self::read_signo(fd)?;
        Some(match signo {
            libc::SIGINT => "SIGINT",
            libc::SIGTERM => "SIGTERM",
            _ => "a signal",
        })
    }

    #[cfg(target_os = "linux")]
    fn read_signo(fd: &OwnedFd) -> Option<libc::c_int> {
        // SAFETY: signalfd_siginfo is plain data; all zeros is a valid value.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` is a live, writable buffer of `size` bytes; the fd is open.
        let n = unsafe {
            libc::read(
                std::os::fd::AsRawFd::as_raw_fd(fd),
                (&raw mut info).cast(),
                size,
            )
        };
        if n != size as isize {
            return None;
        }
        libc::c_int::try_from(info.ssi_signo).ok()
    }

    #[cfg(not(target_os = "linux"))]
    fn read_signo(fd: &OwnedFd) -> Option<libc::c_int> {
        use std::io::Read;
        let mut buf = [0u8; std::mem::size_of::<libc::c_int>()];
        // The sigwait thread writes whole numbers of 4 bytes, far below a socket's atomic size.
        std::fs::File::from(fd.try_clone().ok()?)
            .read_exact(&mut buf)
            .ok()?;
        Some(libc::c_int::from_ne_bytes(buf))
    }
}
