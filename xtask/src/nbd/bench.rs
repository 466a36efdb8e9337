//! `cargo xtask bench nbd`: the three-way NBD race. Our server (`crates/aio/examples/nbd-server`)
//! against `qemu-nbd` and nbdkit's file plugin, all serving the same raw images over a Unix
//! socket to the same clients (`qemu-img bench`, fio's nbd engine, nbdcopy); owns the servers'
//! and clients' command lines, the alternating runs, the peak-RSS sampling and the report (one
//! table on stdout and in `target/bench-report/nbd.md`).
//!
//! **Servers** ([`Which`]). Ours in each `--aio` mode (`threads`, its default, `io_uring`,
//! `native`); `qemu-nbd --cache=writeback` with the same `--aio` (it refuses `native` on the
//! page cache, and the table says so), plus `qemu-nbd --aio=native --cache=none` so that the
//! native mode has a peer, raced by ours with `--aio native --cache none` (O_DIRECT against
//! O_DIRECT); nbdkit's file plugin with its defaults (16 threads, page cache).
//! `AIO_NBD_BENCH_VARIANTS=1` adds our earlier variants on `--aio threads`: the task engine,
//! adaptive polling off (`--poll-max-ns 0`; the default polls up to 32 µs), and the epoll
//! backend. A server that refuses to
//! start (a mode the kernel or the program refuses) is probed once for its message, and its rows
//! say `refused: …`. Ours runs one context and qemu-nbd one event loop, nbdkit its 16 threads;
//! all take as many clients as come (`qemu-nbd -e`) and advertise multi-conn, and stay up between
//! clients (`--persistent`, `-t`, nbdkit's default) until SIGTERM.
//!
//! **Clients** ([`Workload`]): `qemu-img bench` (4 KiB reads and writes at QD 1 and 32, a fixed
//! number of requests, IOPS from the time it prints); fio's nbd engine (4 KiB randread and
//! randwrite at QD 1 and 32, time-based, IOPS and p99 completion latency from its JSON report);
//! nbdcopy, timed from outside: the 1 GiB image to `null:` and a 1 GiB file to the export, with
//! 1 and 4 connections and 16 and 64 requests of 256 KiB (MiB/s), and a 4 GiB sparse image that
//! holds 8 MiB of data, to `null:` and to a file (seconds per copy: what skipping holes saves;
//! the median of [`SPARSE_COPIES`] copies from one server, since one copy is a few
//! milliseconds and nbdcopy's own start is half of them). A client that is missing is installed
//! with apt-get; one that cannot be makes its rows say `skipped: …`.
//!
//! **Runs.** Every run starts, after a `sync` (so that no run pays for the write-back of the
//! previous one's writes) and with the image's page cache in the case's state (all of it for
//! the read cases, none of it for the write cases: [`ImageCache`]), a fresh server process,
//! runs one client (the sparse copies: [`SPARSE_COPIES`] in a row), reads the server's peak
//! RSS (`VmHWM`) and stops it with SIGTERM; within a round every server runs each case once, in
//! turn, so that slow drifts of the machine fall on all alike, and each round starts with the
//! next server ([`round_order`]), so that none always runs first after the case before. A
//! failed run is reported in its row and makes the command exit 1 after the report is written;
//! a ratio below 1.0 is a result, not a failure.
//!
//! **Ratios** are of medians, like for like: each of our rows over nbdkit's row and over the
//! `qemu-nbd --cache=writeback` row with the same `--aio` (for `native`, over qemu-nbd's
//! `--cache=none` row, marked so); > 1 means ours is faster (for times: takes less).
//!
//! **Knobs** (environment): `AIO_NBD_BENCH_QUICK=1` (1 round, 2-second fio runs, 10 000 qemu-img
//! requests), `AIO_NBD_BENCH_ROUNDS` (default 3), `AIO_NBD_BENCH_COUNT` (qemu-img requests per
//! run, default 50 000), `AIO_NBD_BENCH_RUNTIME` (fio seconds per run, default 10), and
//! comma-separated filters: `AIO_NBD_BENCH_CLIENTS` (`qemu-img,fio,nbdcopy`),
//! `AIO_NBD_BENCH_SERVERS` (`aio,qemu-nbd,nbdkit`), `AIO_NBD_BENCH_MODES`
//! (`threads,io_uring,native`); `AIO_NBD_BENCH_VARIANTS=1` as above.
//!
//! **TLS** (`AIO_NBD_BENCH_TLS=1`): the same race with every server requiring TLS and every
//! client using it, all with one X.509 certificate for `localhost` (P-256, signed by a
//! throwaway authority that `openssl` makes in the scratch directory): ours with
//! `--tls-creds`, qemu-nbd with a `tls-creds-x509` object, nbdkit with `--tls=require
//! --tls-certificates`; fio and nbdcopy with `nbds+unix://` URIs, finding the authority where
//! libnbd looks by default (`$HOME/.pki/libnbd`, `HOME` set to the scratch directory's).
//! `qemu-img bench` takes no `--object`, so no credentials: its rows are skipped.
//! `AIO_NBD_BENCH_TLS=psk`: the same with pre-shared keys instead, one random 256-bit key for
//! the user `bench` in a `keys.psk` of the scratch directory: ours with `--tls-psk`, qemu-nbd
//! with a `tls-creds-psk` object, nbdkit with `--tls=require --tls-psk`; nbdcopy with the
//! URI's user and `tls-psk-file`. fio's rows are skipped too: its nbd engine refuses a URI's
//! local file, and libnbd has no default keys file to fall back on.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::json;
use crate::cmd::{
    Cmd, Context, Error, Result, ensure_apt_package, ensure_apt_package_for, project_root,
};
use crate::nbd::{self, Deadline, Readiness, Scratch, Server};

/// Size of the dense benchmark image: 50 000 sequential 4 KiB requests (195 MiB) do not wrap
/// around, and a bulk copy lasts long enough to time from outside; it stays in the page cache.
const IMAGE_SIZE: u64 = 1 << 30;

/// Seed of the image contents, fixed so that every run serves the same bytes.
const IMAGE_SEED: u64 = 0x6e62_6462_656e_6368;

/// Seed of the file that nbdcopy uploads.
const UPLOAD_SEED: u64 = 0x7570_6c6f_6164_2121;

/// Virtual size of the sparse image.
const SPARSE_SIZE: u64 = 4 << 30;

/// The sparse image's data: this many extents of [`SPARSE_EXTENT`] bytes, spread evenly.
const SPARSE_EXTENTS: u64 = 8;
const SPARSE_EXTENT: u64 = 1 << 20;

/// Copies of the sparse image per server run ([`Workload::copies`]).
const SPARSE_COPIES: usize = 11;

/// Request size of the 4 KiB cases.
const REQUEST_SIZE: u32 = 4096;

/// nbdcopy's `--request-size` in the bulk cases.
const COPY_REQUEST_SIZE: u32 = 256 << 10;

/// The byte `qemu-img bench -w` writes. Not zero, so that no server can turn the writes into
/// zero-writes or holes.
const WRITE_PATTERN: &str = "0x5a";

/// qemu-nbd's `-e`: enough clients for nbdcopy's connections (its default, 1, would leave the
/// second connection waiting), and with more than one it advertises multi-conn, as the others.
const QEMU_NBD_SHARED: u32 = 16;

const DEFAULT_COUNT: u64 = 50_000;
const DEFAULT_ROUNDS: u64 = 3;
const DEFAULT_RUNTIME: u64 = 10;
const QUICK_COUNT: u64 = 10_000;
const QUICK_RUNTIME: u64 = 2;

/// How long a server may take to start listening.
const START_LIMIT: Duration = Duration::from_secs(10);

/// How long a server may take to exit after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// How long a refused server's second start (for its message) may take.
const PROBE_LIMIT: Duration = Duration::from_secs(3);

/// qemu-nbd's and our `--aio`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aio {
    Threads,
    IoUring,
    Native,
}

impl Aio {
    const ALL: [Aio; 3] = [Aio::Threads, Aio::IoUring, Aio::Native];

    fn arg(self) -> &'static str {
        match self {
            Aio::Threads => "threads",
            Aio::IoUring => "io_uring",
            Aio::Native => "native",
        }
    }
}

/// Our server's variants beyond `--aio` (only with `AIO_NBD_BENCH_VARIANTS=1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// The defaults: callback engine, adaptive polling up to 32 µs, the default backend.
    Plain,
    /// `--engine tasks`.
    Tasks,
    /// `--poll-max-ns 0`: no polling.
    NoPolling,
    /// `AIO_BACKEND=epoll`.
    Epoll,
    /// `--cache none` (O_DIRECT): raced against `qemu-nbd --cache=none` with the same `--aio`
    /// (with native AIO, always: it is qemu-nbd's only native mode).
    CacheNone,
}

/// qemu-nbd's `--cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cache {
    Writeback,
    /// O_DIRECT: what qemu-nbd requires for `--aio=native`.
    None,
}

/// One server configuration: a row of the table for every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Ours(Aio, Variant),
    QemuNbd(Aio, Cache),
    Nbdkit,
}

impl Which {
    fn is_ours(self) -> bool {
        matches!(self, Which::Ours(..))
    }

    /// The program, for messages.
    fn name(self) -> &'static str {
        match self {
            Which::Ours(..) => "nbd-server",
            Which::QemuNbd(..) => "qemu-nbd",
            Which::Nbdkit => "nbdkit",
        }
    }

    /// The row's label: the program and what sets it apart.
    fn label(self) -> String {
        match self {
            Which::Ours(aio, variant) => {
                let base = format!("aio --aio {}", aio.arg());
                match variant {
                    Variant::Plain => base,
                    Variant::Tasks => format!("{base} --engine tasks"),
                    Variant::NoPolling => format!("{base} --poll-max-ns 0"),
                    Variant::Epoll => format!("AIO_BACKEND=epoll {base}"),
                    Variant::CacheNone => format!("{base} --cache none"),
                }
            }
            Which::QemuNbd(aio, Cache::Writeback) => format!("qemu-nbd --aio={}", aio.arg()),
            Which::QemuNbd(aio, Cache::None) => {
                format!("qemu-nbd --aio={} --cache=none", aio.arg())
            }
            Which::Nbdkit => "nbdkit file".to_owned(),
        }
    }
}

/// Which servers, clients and modes race (the filter knobs).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Selection {
    clients: Vec<Client>,
    servers: Vec<&'static str>,
    modes: Vec<Aio>,
    variants: bool,
}

/// The rows of the table, in the order of a round: ours, then qemu-nbd, then nbdkit.
fn server_list(sel: &Selection) -> Vec<Which> {
    let mut list = Vec::new();
    if sel.servers.contains(&"aio") {
        list.extend(
            sel.modes
                .iter()
                .map(|&aio| Which::Ours(aio, Variant::Plain)),
        );
        if sel.modes.contains(&Aio::Native) {
            list.push(Which::Ours(Aio::Native, Variant::CacheNone));
        }
        if sel.variants {
            list.extend(
                [Variant::Tasks, Variant::NoPolling, Variant::Epoll]
                    .map(|v| Which::Ours(Aio::Threads, v)),
            );
        }
    }
    if sel.servers.contains(&"qemu-nbd") {
        list.extend(
            sel.modes
                .iter()
                .map(|&aio| Which::QemuNbd(aio, Cache::Writeback)),
        );
        if sel.modes.contains(&Aio::Native) {
            list.push(Which::QemuNbd(Aio::Native, Cache::None));
        }
    }
    if sel.servers.contains(&"nbdkit") {
        list.push(Which::Nbdkit);
    }
    list
}

/// The client programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    QemuImg,
    Fio,
    Nbdcopy,
}

impl Client {
    const ALL: [Client; 3] = [Client::QemuImg, Client::Fio, Client::Nbdcopy];

    fn name(self) -> &'static str {
        match self {
            Client::QemuImg => "qemu-img",
            Client::Fio => "fio",
            Client::Nbdcopy => "nbdcopy",
        }
    }
}

/// What a case's figure is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Iops,
    MibPerSec,
    /// Lower is better.
    Seconds,
}

impl Unit {
    /// What a server's CPU time is counted per in a case of this unit: per request for IOPS,
    /// per GiB copied for throughput, for the whole run for a timed copy.
    fn cpu_unit(self) -> &'static str {
        match self {
            Unit::Iops => "µs/req",
            Unit::MibPerSec => "ms/GiB",
            Unit::Seconds => "ms",
        }
    }

    /// `used` CPU time over `done` units of work (requests, GiB, runs), in [`cpu_unit`](Self::cpu_unit).
    fn cpu_per(self, used: Duration, done: f64) -> f64 {
        let scale = match self {
            Unit::Iops => 1e6,
            Unit::MibPerSec | Unit::Seconds => 1e3,
        };
        used.as_secs_f64() * scale / done
    }
}

/// One measured workload: a client and what it is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// `qemu-img bench`, [`REQUEST_SIZE`] requests.
    QemuImg { write: bool, depth: u32 },
    /// fio's nbd engine, random [`REQUEST_SIZE`] requests.
    Fio { write: bool, depth: u32 },
    /// nbdcopy from the dense image to `null:`.
    CopyOut { connections: u32, requests: u32 },
    /// nbdcopy from a local file to the export.
    CopyIn { connections: u32, requests: u32 },
    /// nbdcopy (its defaults) from the sparse image to `null:` or to a file.
    Sparse { to_file: bool },
}

impl Workload {
    fn client(self) -> Client {
        match self {
            Workload::QemuImg { .. } => Client::QemuImg,
            Workload::Fio { .. } => Client::Fio,
            _ => Client::Nbdcopy,
        }
    }

    fn unit(self) -> Unit {
        match self {
            Workload::QemuImg { .. } | Workload::Fio { .. } => Unit::Iops,
            Workload::CopyOut { .. } | Workload::CopyIn { .. } => Unit::MibPerSec,
            Workload::Sparse { .. } => Unit::Seconds,
        }
    }

    fn sparse(self) -> bool {
        matches!(self, Workload::Sparse { .. })
    }

    /// How many times one server's run starts the client: [`SPARSE_COPIES`] for the sparse
    /// copies (their figure is the median copy's time, their CPU per copy), once otherwise.
    fn copies(self) -> usize {
        if self.sparse() { SPARSE_COPIES } else { 1 }
    }

    /// The dense image's page-cache state every server's run of this case starts from.
    fn image_cache(self) -> ImageCache {
        match self {
            Workload::QemuImg { write: false, .. }
            | Workload::Fio { write: false, .. }
            | Workload::CopyOut { .. } => ImageCache::Whole,
            Workload::QemuImg { write: true, .. }
            | Workload::Fio { write: true, .. }
            | Workload::CopyIn { .. } => ImageCache::Empty,
            Workload::Sparse { .. } => ImageCache::AsLeft,
        }
    }

    fn name(self) -> String {
        let rw = |write| if write { "write" } else { "read" };
        match self {
            Workload::QemuImg { write, depth } => {
                format!("qemu-img bench 4k {} QD{depth}, IOPS", rw(write))
            }
            Workload::Fio { write, depth } => {
                format!("fio rand{} 4k QD{depth}, IOPS", rw(write))
            }
            Workload::CopyOut {
                connections,
                requests,
            } => format!("nbdcopy nbd → null: -C {connections} -R {requests}, MiB/s"),
            Workload::CopyIn {
                connections,
                requests,
            } => format!("nbdcopy file → nbd -C {connections} -R {requests}, MiB/s"),
            Workload::Sparse { to_file } => format!(
                "nbdcopy sparse nbd → {}, s",
                if to_file { "file" } else { "null:" }
            ),
        }
    }
}

/// The page-cache state of the dense image at the start of a run ([`Workload::image_cache`]).
///
/// Without it a run's figure depends on what the runs before it left in the page cache, and
/// on Linux 6.18 that decides a 4 KiB write's cost more than the server does: a file cached in
/// large folios (written with big writes, or read ahead) takes 8–18 k such writes per second
/// through any server, and the same file out of the cache, where each page is written into a
/// small folio of its own, 110–140 k (BENCHMARKS.md, 2026-12-06 22:20 UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageCache {
    /// Read cases: all of the image in the page cache, so that no server reads the disk.
    Whole,
    /// Write cases: none of it, so that every server's writes cost the kernel alike.
    Empty,
    /// The sparse copies, which do not serve the dense image.
    AsLeft,
}

/// Every case of the enabled clients, in run order.
fn workloads(clients: &[Client]) -> Vec<Workload> {
    let mut list = Vec::new();
    for &client in clients {
        match client {
            Client::QemuImg | Client::Fio => {
                for write in [false, true] {
                    for depth in [1, 32] {
                        list.push(if client == Client::QemuImg {
                            Workload::QemuImg { write, depth }
                        } else {
                            Workload::Fio { write, depth }
                        });
                    }
                }
            }
            Client::Nbdcopy => {
                for copy_in in [false, true] {
                    for connections in [1, 4] {
                        for requests in [16, 64] {
                            list.push(if copy_in {
                                Workload::CopyIn {
                                    connections,
                                    requests,
                                }
                            } else {
                                Workload::CopyOut {
                                    connections,
                                    requests,
                                }
                            });
                        }
                    }
                }
                list.extend([false, true].map(|to_file| Workload::Sparse { to_file }));
            }
        }
    }
    list
}

/// The files and paths every run uses.
#[derive(Debug)]
struct Files {
    ours: PathBuf,
    /// The dense image every server serves.
    image: PathBuf,
    /// The sparse image.
    sparse: PathBuf,
    /// What nbdcopy uploads.
    upload: PathBuf,
    /// Where nbdcopy writes the sparse image in the `to_file` case.
    download: PathBuf,
    socket: PathBuf,
    pid_file: PathBuf,
    /// The credentials every server and client is given (`AIO_NBD_BENCH_TLS`).
    tls: TlsFiles,
}

/// The race's TLS credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TlsFiles {
    Off,
    /// `AIO_NBD_BENCH_TLS=1`: the `HOME` of the libnbd clients, whose `.pki/libnbd` holds the
    /// authority and the server's certificate ([`Files::pki`]).
    X509 {
        home: PathBuf,
    },
    /// `AIO_NBD_BENCH_TLS=psk`: the keys file (the user [`PSK_USER`]), in a directory of its
    /// own, as qemu's `tls-creds-psk` wants it.
    Psk {
        keys: PathBuf,
    },
}

/// The user of the pre-shared key under `AIO_NBD_BENCH_TLS=psk`.
const PSK_USER: &str = "bench";

impl Files {
    /// Under TLS, the directory of `ca-cert.pem`, `server-cert.pem` and `server-key.pem`
    /// ([`nbd::make_pki`](super::make_pki)): where libnbd looks by default, `$HOME/.pki/libnbd`.
    fn pki(&self) -> Option<PathBuf> {
        match &self.tls {
            TlsFiles::X509 { home } => Some(home.join(".pki").join("libnbd")),
            _ => None,
        }
    }

    /// Under `AIO_NBD_BENCH_TLS=psk`, the keys file.
    fn psk(&self) -> Option<&Path> {
        match &self.tls {
            TlsFiles::Psk { keys } => Some(keys),
            _ => None,
        }
    }

    fn server_command(&self, which: Which, image: &Path) -> Cmd {
        let socket = self.socket.display().to_string();
        let image = image.display().to_string();
        match which {
            Which::Ours(aio, variant) => {
                let cmd = Cmd::new(&self.ours.display().to_string()).env_remove("AIO_POLL_MAX_NS");
                let cmd = match variant {
                    Variant::Epoll => cmd.env("AIO_BACKEND", "epoll"),
                    _ => cmd,
                };
                let cmd = cmd
                    .args(["--unix", &socket, "--persistent"])
                    .args(["--aio", aio.arg()]);
                let cmd = match variant {
                    Variant::Tasks => cmd.args(["--engine", "tasks"]),
                    Variant::NoPolling => cmd.args(["--poll-max-ns", "0"]),
                    Variant::CacheNone => cmd.args(["--cache", "none"]),
                    Variant::Plain | Variant::Epoll => cmd,
                };
                let cmd = match (self.pki(), self.psk()) {
                    (Some(pki), _) => cmd.args(["--tls-creds", &pki.display().to_string()]),
                    (None, Some(keys)) => cmd.args(["--tls-psk", &keys.display().to_string()]),
                    (None, None) => cmd,
                };
                cmd.arg(image)
            }
            // `-t` keeps it serving after a client leaves, as `--persistent` does ours;
            // `--pid-file` is how we learn that it listens.
            Which::QemuNbd(aio, cache) => {
                let cmd = Cmd::new("qemu-nbd")
                    .args(["-f", "raw", "-t"])
                    .arg(format!("--cache={}", cache_arg(cache)))
                    .arg(format!("--aio={}", aio.arg()))
                    .arg(format!("--shared={QEMU_NBD_SHARED}"))
                    .args(["-k", &socket])
                    .arg(format!("--pid-file={}", self.pid_file.display()));
                let object = match (self.pki(), self.psk()) {
                    // No client certificates, as the others.
                    (Some(pki), _) => Some(format!(
                        "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=off",
                        pki.display()
                    )),
                    (None, Some(keys)) => Some(format!(
                        "tls-creds-psk,id=tls0,endpoint=server,dir={}",
                        keys.parent().unwrap_or(Path::new(".")).display()
                    )),
                    (None, None) => None,
                };
                let cmd = match object {
                    Some(object) => cmd
                        .arg("--object")
                        .arg(object)
                        .args(["--tls-creds", "tls0"]),
                    None => cmd,
                };
                cmd.arg(image)
            }
            // nbdkit writes its pid file once it listens, as qemu-nbd does.
            Which::Nbdkit => {
                let cmd = Cmd::new("nbdkit")
                    .args(["--foreground", "--unix", &socket])
                    .args(["--pidfile", &self.pid_file.display().to_string()]);
                let cmd = match (self.pki(), self.psk()) {
                    (Some(pki), _) => cmd
                        .arg("--tls=require")
                        .arg(format!("--tls-certificates={}", pki.display())),
                    (None, Some(keys)) => cmd
                        .arg("--tls=require")
                        .arg(format!("--tls-psk={}", keys.display())),
                    (None, None) => cmd,
                };
                cmd.args(["file", &image])
            }
        }
    }

    fn copy_command(&self, connections: u32, requests: u32) -> Cmd {
        self.libnbd_client("nbdcopy")
            .arg(format!("--connections={connections}"))
            .arg(format!("--requests={requests}"))
            .arg(format!("--request-size={COPY_REQUEST_SIZE}"))
    }

    /// The clients' URI of the export: `nbds+unix://` under TLS, with the user and the keys
    /// file under pre-shared keys.
    fn url(&self) -> String {
        let url = nbd::unix_url(&self.socket);
        match &self.tls {
            TlsFiles::Off => url,
            TlsFiles::X509 { .. } => url.replacen("nbd+unix:", "nbds+unix:", 1),
            TlsFiles::Psk { keys } => format!(
                "{}&tls-psk-file={}",
                url.replacen("nbd+unix:///", &format!("nbds+unix://{PSK_USER}@/"), 1),
                keys.display()
            ),
        }
    }

    /// A libnbd client (fio, nbdcopy): under TLS, with `HOME` where libnbd looks for the
    /// authority by default (`$HOME/.pki/libnbd`, which [`make_pki`](super::make_pki) filled), since fio's nbd
    /// engine refuses a URI's `tls-certificates` (libnbd's local-file rule).
    fn libnbd_client(&self, program: &str) -> Cmd {
        let cmd = Cmd::new(program);
        match &self.tls {
            TlsFiles::X509 { home } => cmd.env("HOME", home.display().to_string()),
            _ => cmd,
        }
    }

    fn readiness(&self, which: Which) -> Readiness {
        match which {
            Which::Ours(..) => Readiness::ReadyLine,
            Which::QemuNbd(..) | Which::Nbdkit => Readiness::PidFile(self.pid_file.clone()),
        }
    }

    /// The client command of one run of `work`.
    fn client_command(&self, work: Workload, knobs: &Knobs) -> Cmd {
        let url = self.url();
        match work {
            Workload::QemuImg { write, depth } => {
                let cmd = Cmd::new("qemu-img")
                    .args(["bench", "-f", "raw", "-t", "writeback"])
                    .args(["-c", &knobs.count.to_string()])
                    .args(["-d", &depth.to_string()])
                    .args(["-s", &REQUEST_SIZE.to_string()]);
                let cmd = if write {
                    cmd.args(["-w", "--pattern", WRITE_PATTERN])
                } else {
                    cmd
                };
                // Not under TLS (`run` skips it): it takes no `--object` for the credentials.
                cmd.arg(url)
            }
            Workload::Fio { write, depth } => self
                .libnbd_client("fio")
                .args(["--name=race", "--ioengine=nbd"])
                .arg(format!("--uri={url}"))
                .arg(format!(
                    "--rw={}",
                    if write { "randwrite" } else { "randread" }
                ))
                .arg(format!("--bs={REQUEST_SIZE}"))
                .arg(format!("--iodepth={depth}"))
                .args(["--time_based", "--norandommap", "--randrepeat=0"])
                .arg(format!("--runtime={}", knobs.runtime))
                .arg("--output-format=json"),
            Workload::CopyOut {
                connections,
                requests,
            } => self
                .copy_command(connections, requests)
                .args([url.as_str(), "null:"]),
            Workload::CopyIn {
                connections,
                requests,
            } => self
                .copy_command(connections, requests)
                .arg(self.upload.display().to_string())
                .arg(url),
            Workload::Sparse { to_file } => {
                let cmd = self.libnbd_client("nbdcopy").arg(url);
                if to_file {
                    cmd.arg(self.download.display().to_string())
                } else {
                    cmd.arg("null:")
                }
            }
        }
    }
}

fn cache_arg(cache: Cache) -> &'static str {
    match cache {
        Cache::Writeback => "writeback",
        Cache::None => "none",
    }
}

/// The numeric knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Knobs {
    rounds: usize,
    /// qemu-img requests per run.
    count: u64,
    /// fio seconds per run.
    runtime: u64,
    quick: bool,
    /// `AIO_NBD_BENCH_TLS`: every server requires TLS and every client uses it.
    tls: TlsMode,
}

/// `AIO_NBD_BENCH_TLS`: off (unset or `0`), X.509 (`1` or `x509`), pre-shared keys (`psk`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsMode {
    Off,
    X509,
    Psk,
}

impl TlsMode {
    fn from_var(var: &dyn Fn(&str) -> Option<String>) -> Result<TlsMode> {
        const KEY: &str = "AIO_NBD_BENCH_TLS";
        match var(KEY).as_deref().map(str::trim) {
            None | Some("" | "0") => Ok(TlsMode::Off),
            Some("1" | "x509") => Ok(TlsMode::X509),
            Some("psk") => Ok(TlsMode::Psk),
            Some(other) => Err(Error::new(format!(
                "{KEY}={other:?}: expected 0, 1 (or x509) or psk"
            ))),
        }
    }
}

/// Reads the knobs through `var` (the environment, or a table in the tests).
fn knobs(var: &dyn Fn(&str) -> Option<String>) -> Result<(Knobs, Selection)> {
    let quick = flag(var, "AIO_NBD_BENCH_QUICK")?;
    let rounds = number(
        var,
        "AIO_NBD_BENCH_ROUNDS",
        if quick { 1 } else { DEFAULT_ROUNDS },
    )?;
    let knobs = Knobs {
        rounds: usize::try_from(rounds)
            .map_err(|_| Error::new("AIO_NBD_BENCH_ROUNDS is too large"))?,
        count: number(
            var,
            "AIO_NBD_BENCH_COUNT",
            if quick { QUICK_COUNT } else { DEFAULT_COUNT },
        )?,
        runtime: number(
            var,
            "AIO_NBD_BENCH_RUNTIME",
            if quick {
                QUICK_RUNTIME
            } else {
                DEFAULT_RUNTIME
            },
        )?,
        quick,
        tls: TlsMode::from_var(var)?,
    };
    let clients = list(
        var,
        "AIO_NBD_BENCH_CLIENTS",
        &Client::ALL.map(|c| (c.name(), c)),
    )?;
    let servers = list(
        var,
        "AIO_NBD_BENCH_SERVERS",
        &[
            ("aio", "aio"),
            ("qemu-nbd", "qemu-nbd"),
            ("nbdkit", "nbdkit"),
        ],
    )?;
    let modes = list(var, "AIO_NBD_BENCH_MODES", &Aio::ALL.map(|a| (a.arg(), a)))?;
    let selection = Selection {
        clients,
        servers,
        modes,
        variants: flag(var, "AIO_NBD_BENCH_VARIANTS")?,
    };
    Ok((knobs, selection))
}

/// `1` or `0` (unset: `false`).
/// Writes `keys` (psktool's format) with a random 256-bit key for [`PSK_USER`], in a
/// directory of its own.
fn make_psk(keys: &Path) -> Result<()> {
    let mut key = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
        .with_context(|| "reading /dev/urandom".to_owned())?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(dir) = keys.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(keys, format!("{PSK_USER}:{hex}\n"))
        .with_context(|| format!("writing {}", keys.display()))
}

fn flag(var: &dyn Fn(&str) -> Option<String>, key: &str) -> Result<bool> {
    match var(key).as_deref().map(str::trim) {
        None | Some("" | "0") => Ok(false),
        Some("1") => Ok(true),
        Some(other) => Err(Error::new(format!("{key}={other:?}: expected 1 or 0"))),
    }
}

/// A positive integer, or `default` when unset.
fn number(var: &dyn Fn(&str) -> Option<String>, key: &str, default: u64) -> Result<u64> {
    let Some(value) = var(key) else {
        return Ok(default);
    };
    match value.trim().replace('_', "").parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Error::new(format!(
            "{key}={value:?}: expected a positive integer"
        ))),
    }
}

/// A comma-separated subset of `known` (by name), in `known`'s order; every name when unset.
fn list<T: Copy>(
    var: &dyn Fn(&str) -> Option<String>,
    key: &str,
    known: &[(&str, T)],
) -> Result<Vec<T>> {
    let Some(value) = var(key) else {
        return Ok(known.iter().map(|&(_, t)| t).collect());
    };
    let names: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(bad) = names
        .iter()
        .find(|name| !known.iter().any(|(k, _)| k == *name))
    {
        let choices: Vec<&str> = known.iter().map(|&(k, _)| k).collect();
        return Err(Error::new(format!(
            "{key}: unknown name {bad:?} (choose among {})",
            choices.join(", ")
        )));
    }
    if names.is_empty() {
        return Err(Error::new(format!("{key} is empty")));
    }
    Ok(known
        .iter()
        .filter(|(k, _)| names.contains(k))
        .map(|&(_, t)| t)
        .collect())
}

/// One run of one server under one client.
#[derive(Debug, Clone, PartialEq)]
struct Run {
    /// In the case's [`Unit`].
    value: f64,
    /// p99 completion latency in microseconds, when the client reports it (fio).
    p99_us: Option<f64>,
    /// The server's peak RSS over the run, in KiB.
    peak_rss_kib: Option<u64>,
    /// The CPU time the server used during the client's run (all its threads, user and
    /// system), per unit of work: see [`Unit::cpu_unit`].
    cpu: Option<f64>,
}

/// What became of one server in one case.
#[derive(Debug, Clone, PartialEq, Default)]
struct Outcome {
    runs: Vec<Run>,
    /// Why there are no (or not all) runs: `refused: …`, `skipped: …` or `failed: …`.
    note: Option<String>,
}

/// Every server's outcome in one case, in the order of the server list.
#[derive(Debug, Clone)]
struct CaseResult {
    work: Workload,
    outcomes: Vec<Outcome>,
}

/// IOPS and p99 (µs) of the one job of a fio JSON report, from its read or write side. fio
/// prints lines of its own before the document (`fio: connected to NBD server`).
fn parse_fio(output: &str, write: bool) -> Result<FioResult> {
    let start = output
        .find('{')
        .ok_or_else(|| Error::new("no JSON document in fio's output"))?;
    let doc = json::parse(&output[start..]).map_err(|e| Error::new(format!("fio: {e}")))?;
    let job = doc
        .at(&["jobs", "0"])
        .ok_or_else(|| Error::new("fio's report has no job"))?;
    match job.get("error").and_then(json::Value::as_f64) {
        Some(code) if code != 0.0 => {
            return Err(Error::new(format!("fio's job failed with error {code}")));
        }
        _ => {}
    }
    let side = job
        .get(if write { "write" } else { "read" })
        .ok_or_else(|| Error::new("fio's job has no read/write section"))?;
    let iops = side
        .get("iops")
        .and_then(json::Value::as_f64)
        .filter(|&iops| iops > 0.0)
        .ok_or_else(|| Error::new("fio's job did no I/O (iops missing or 0)"))?;
    let p99_us = side
        .at(&["clat_ns", "percentile", "99.000000"])
        .and_then(json::Value::as_f64)
        .map(|ns| ns / 1000.0);
    let requests = side
        .get("total_ios")
        .and_then(json::Value::as_f64)
        .filter(|&n| n > 0.0);
    Ok(FioResult {
        iops,
        p99_us,
        requests,
    })
}

/// What the race takes from a fio report.
#[derive(Debug, PartialEq)]
struct FioResult {
    iops: f64,
    /// Completion latency's 99th percentile, in microseconds.
    p99_us: Option<f64>,
    /// How many requests the job completed (`total_ios`).
    requests: Option<f64>,
}

/// MiB/s for `bytes` in `elapsed` (nbdcopy prints no timing: it is timed from outside, the
/// process's start and exit included).
fn mib_per_sec(bytes: u64, elapsed: Duration) -> Option<f64> {
    let secs = elapsed.as_secs_f64();
    (secs > 0.0).then(|| bytes as f64 / (1 << 20) as f64 / secs)
}

pub fn run() -> Result<ExitCode> {
    let (knobs, selection) = knobs(&|key| std::env::var(key).ok())?;

    // Tools: a missing client or peer is installed, or its rows are skipped with the reason.
    let mut missing: Vec<(&str, String)> = Vec::new();
    let mut need = |name: &'static str, package: &str, tools: &[&str]| {
        if let Err(err) = ensure_apt_package(package, tools) {
            missing.push((name, err.to_string()));
        }
    };
    if selection.clients.contains(&Client::QemuImg) || selection.servers.contains(&"qemu-nbd") {
        need("qemu-utils", "qemu-utils", &["qemu-img", "qemu-nbd"]);
    }
    if selection.clients.contains(&Client::Fio) {
        need("fio", "fio", &["fio"]);
    }
    if selection.clients.contains(&Client::Nbdcopy) {
        need("nbdcopy", "libnbd-bin", &["nbdcopy"]);
    }
    if selection.servers.contains(&"nbdkit") {
        need("nbdkit", "nbdkit", &["nbdkit"]);
    }
    let unavailable = |name: &str| {
        missing
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, why)| format!("skipped: {why}"))
    };
    let mut client_skip: Vec<(Client, String)> = Vec::new();
    for &client in &selection.clients {
        let why = match client {
            Client::QemuImg if knobs.tls != TlsMode::Off => {
                Some("skipped: qemu-img bench takes no --object, so no TLS credentials".to_owned())
            }
            Client::Fio if knobs.tls == TlsMode::Psk => Some(
                "skipped: fio's nbd engine refuses the URI's tls-psk-file (libnbd's local-file \
                 rule), and libnbd has no default keys file"
                    .to_owned(),
            ),
            Client::QemuImg => unavailable("qemu-utils"),
            Client::Fio => unavailable("fio").or_else(|| {
                (!fio_has_nbd()).then(|| "skipped: this fio has no nbd engine".to_owned())
            }),
            Client::Nbdcopy => unavailable("nbdcopy"),
        };
        if let Some(why) = why {
            client_skip.push((client, why));
        }
    }

    let servers = server_list(&selection);
    if servers.is_empty() {
        return Err(Error::new("no server selected"));
    }
    // `refused[i]`: why server i cannot run at all (a peer not installed, or refusing to start).
    let mut refused: Vec<Option<String>> = servers
        .iter()
        .map(|which| match which {
            Which::QemuNbd(..) => unavailable("qemu-utils"),
            Which::Nbdkit => unavailable("nbdkit"),
            Which::Ours(..) => None,
        })
        .collect();

    if knobs.tls == TlsMode::X509 {
        // `openssl version`: it has no `--version`.
        let missing = || {
            if Cmd::new("openssl").arg("version").probe() {
                String::new()
            } else {
                "openssl".to_owned()
            }
        };
        ensure_apt_package_for("openssl", &missing)?;
    }
    let ours = nbd::build_server()?;
    let mut scratch = Scratch::create("nbd-bench")?;
    let dir = scratch.path().to_path_buf();
    let tls = match knobs.tls {
        TlsMode::Off => TlsFiles::Off,
        TlsMode::X509 => TlsFiles::X509 {
            home: dir.join("home"),
        },
        TlsMode::Psk => TlsFiles::Psk {
            keys: dir.join("psk").join("keys.psk"),
        },
    };
    let files = Files {
        ours,
        image: dir.join("image.raw"),
        sparse: dir.join("sparse.raw"),
        upload: dir.join("upload.raw"),
        download: dir.join("sparse-copy.raw"),
        socket: scratch.socket_path("nbd.sock"),
        pid_file: dir.join("server.pid"),
        tls,
    };
    if let Some(pki) = files.pki() {
        super::make_pki(&pki)?;
    }
    if let Some(keys) = files.psk() {
        make_psk(keys)?;
    }
    eprintln!(
        "bench nbd: writing a {} MiB image, a {} MiB upload file and a {} GiB sparse image under {}",
        IMAGE_SIZE >> 20,
        IMAGE_SIZE >> 20,
        SPARSE_SIZE >> 30,
        dir.display()
    );
    nbd::write_random_file(&files.image, IMAGE_SIZE, IMAGE_SEED)?;
    if selection.clients.contains(&Client::Nbdcopy) {
        nbd::write_random_file(&files.upload, IMAGE_SIZE, UPLOAD_SEED)?;
        write_sparse_file(&files.sparse)?;
    }

    let started = Instant::now();
    let mut results = Vec::new();
    let mut ready_lines: Vec<(String, String)> = Vec::new();
    let mut failures = 0usize;
    for work in workloads(&selection.clients) {
        let mut result = CaseResult {
            work,
            outcomes: vec![Outcome::default(); servers.len()],
        };
        let skip = client_skip
            .iter()
            .find(|(c, _)| *c == work.client())
            .map(|(_, why)| why.clone());
        for round in 1..=knobs.rounds {
            // Each round starts with the next server, so that no server always runs first
            // (and pays for a state the case before left: the first bulk copy into an image
            // just written with 4 KiB random writes costs the kernel several times more,
            // whoever serves it; BENCHMARKS.md, 2026-12-07).
            for i in round_order(servers.len(), round) {
                let which = servers[i];
                let outcome = &mut result.outcomes[i];
                if let Some(why) = skip.clone().or_else(|| refused[i].clone()) {
                    outcome.note = Some(why);
                    continue;
                }
                if outcome.note.is_some() {
                    // This server failed this case in an earlier round: do not repeat it.
                    continue;
                }
                eprintln!(
                    "bench nbd: {} round {round}/{}: {}",
                    work.name(),
                    knobs.rounds,
                    which.label()
                );
                match run_once(&files, which, work, &knobs) {
                    Ok((run, ready)) => {
                        if let Some(line) = ready
                            && !ready_lines.iter().any(|(l, _)| *l == which.label())
                        {
                            ready_lines.push((which.label(), line));
                        }
                        outcome.runs.push(run);
                    }
                    Err(RunError::Refused(why)) => {
                        eprintln!("    {} refused: {why}", which.label());
                        refused[i] = Some(format!("refused: {why}"));
                        outcome.note = refused[i].clone();
                    }
                    Err(RunError::Failed(err)) => {
                        eprintln!("    {} failed: {err}", which.label());
                        failures += 1;
                        outcome.note = Some(format!("failed: {}", first_line(&err.to_string())));
                    }
                }
            }
        }
        results.push(result);
    }

    let table = Table::new(&servers, &results);
    println!("{}", table.text());
    let setup = Setup {
        knobs,
        ready_lines,
        server_cmds: servers
            .iter()
            .map(|&w| (w.label(), files.server_command(w, &files.image).to_string()))
            .collect(),
        client_cmds: workloads(&selection.clients)
            .into_iter()
            .map(|w| (w.name(), files.client_command(w, &knobs).to_string()))
            .collect(),
        elapsed: started.elapsed(),
    };
    let report_dir = project_root().join("target").join("bench-report");
    std::fs::create_dir_all(&report_dir)
        .with_context(|| format!("creating {}", report_dir.display()))?;
    let report = report_dir.join("nbd.md");
    std::fs::write(&report, markdown(&setup, &servers, &results, &table))
        .with_context(|| format!("writing {}", report.display()))?;
    eprintln!("bench nbd: report at {}", report.display());
    drop(scratch);
    if failures > 0 {
        eprintln!("bench nbd: {failures} run(s) failed; see the rows marked failed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// Whether fio was built with its nbd engine (libnbd).
fn fio_has_nbd() -> bool {
    std::process::Command::new("fio")
        .arg("--enghelp")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .is_some_and(|text| text.split_whitespace().any(|word| word == "nbd"))
}

/// A [`SPARSE_SIZE`] file whose data is [`SPARSE_EXTENTS`] extents of random bytes spread over
/// it, the rest holes.
fn write_sparse_file(path: &Path) -> Result<()> {
    let what = || format!("writing {}", path.display());
    let mut file = File::create(path).with_context(what)?;
    file.set_len(SPARSE_SIZE).with_context(what)?;
    let mut bytes = nbd::Bytes::new(IMAGE_SEED ^ SPARSE_SIZE);
    let mut buf = vec![0u8; SPARSE_EXTENT as usize];
    for i in 0..SPARSE_EXTENTS {
        bytes.fill(&mut buf);
        file.seek(SeekFrom::Start(i * (SPARSE_SIZE / SPARSE_EXTENTS)))
            .with_context(what)?;
        file.write_all(&buf).with_context(what)?;
    }
    file.sync_all().with_context(what)
}

/// Why a run produced no figure.
#[derive(Debug)]
enum RunError {
    /// The server would not start with these options (its message).
    Refused(String),
    /// The server or the client failed.
    Failed(Error),
}

impl From<Error> for RunError {
    fn from(err: Error) -> Self {
        RunError::Failed(err)
    }
}

/// Starts one server, runs one client against it, reads its peak RSS and stops it. Returns the
/// run and our server's ready line.
fn run_once(
    files: &Files,
    which: Which,
    work: Workload,
    knobs: &Knobs,
) -> std::result::Result<(Run, Option<String>), RunError> {
    let name = which.name();
    // A socket or pid file left by a killed server would confuse the next start.
    for stale in [&files.socket, &files.pid_file, &files.download] {
        remove_stale(stale)?;
    }
    let image = if work.sparse() {
        &files.sparse
    } else {
        &files.image
    };
    // Every run starts with nothing dirty: without this, the pages a write run left in the
    // page cache are written back during the next server's run, which then competes with
    // the write-back for the disk (seen: `--cache none` 4 KiB writes at QD 32 at 0.52× of
    // qemu-nbd right after a page-cache write run, 1.0× on their own).
    flush_dirty_pages();
    set_image_cache(&files.image, work.image_cache());
    let server_cmd = files.server_command(which, image);
    let server = match Server::start(
        name,
        &server_cmd,
        &files.readiness(which),
        Deadline::after(START_LIMIT),
    ) {
        Ok(server) => server,
        Err(err) => return Err(RunError::Refused(refusal(&server_cmd, &err, files))),
    };
    let ready = server.ready_line().map(str::to_owned);

    let client = files.client_command(work, knobs);
    let cpu_before = nbd::cpu_time(server.pid());
    // Generous: a slow machine (1 000 IOPS, 20 MiB/s) plus slack, before declaring a hang.
    let limit = Duration::from_secs(60 + knobs.runtime * 3)
        + Duration::from_millis(knobs.count)
        + Duration::from_secs(IMAGE_SIZE >> 20 >> 4);
    // Each copy of a sparse case is one connection to the same server, as a client that
    // copies again would make. One copy takes a few milliseconds, half of them nbdcopy's own
    // start, so one run per server would measure mostly that start's spread.
    let mut times = Vec::with_capacity(work.copies());
    let output = loop {
        let began = Instant::now();
        let output = client.output_within(limit)?;
        times.push(began.elapsed());
        if !output.status.success() || times.len() == work.copies() {
            break output;
        }
        // The next copy writes its file afresh, as the first did.
        remove_stale(&files.download)?;
    };
    let elapsed = times[0];
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(RunError::Failed(Error::new(format!(
            "{} against {name} failed ({}): {}{}",
            work.client().name(),
            output.status,
            stdout.trim(),
            stderr.trim()
        ))));
    }
    let peak_rss_kib = nbd::peak_rss_kib(server.pid());
    let cpu_used = cpu_before
        .zip(nbd::cpu_time(server.pid()))
        .map(|(before, after)| after.saturating_sub(before));

    // The figure, and how much work the server did for it (in the unit its CPU is counted
    // per: requests, GiB, or the run).
    let (value, p99_us, work_done) = match work {
        Workload::QemuImg { .. } => {
            let secs = nbd::parse_bench_elapsed(&stdout).ok_or_else(|| {
                Error::new(format!(
                    "no \"Run completed in X seconds\" in qemu-img's output:\n{stdout}{stderr}"
                ))
            })?;
            (knobs.count as f64 / secs, None, Some(knobs.count as f64))
        }
        Workload::Fio { write, .. } => {
            let fio = parse_fio(&stdout, write)?;
            (fio.iops, fio.p99_us, fio.requests)
        }
        Workload::CopyOut { .. } | Workload::CopyIn { .. } => (
            mib_per_sec(IMAGE_SIZE, elapsed).ok_or_else(|| Error::new("nbdcopy took no time"))?,
            None,
            Some(IMAGE_SIZE as f64 / (1u64 << 30) as f64),
        ),
        Workload::Sparse { .. } => {
            times.sort_unstable();
            let median = times[times.len() / 2];
            (median.as_secs_f64(), None, Some(times.len() as f64))
        }
    };
    let cpu = cpu_used
        .zip(work_done)
        .map(|(used, done)| work.unit().cpu_per(used, done));

    let stopped = server.stop(Deadline::after(STOP_LIMIT))?;
    // All exit 0 on SIGTERM; ours must also say `stopped` (its shutdown contract).
    let clean =
        stopped.status.success() && (!which.is_ours() || nbd::printed_stopped(&stopped.stdout));
    if !clean {
        return Err(RunError::Failed(Error::new(format!(
            "{name} did not stop cleanly on SIGTERM ({}); its stdout: {:?}",
            stopped.status, stopped.stdout
        ))));
    }
    eprintln!(
        "    {name}: {}{}, peak RSS {}, CPU {}",
        value_cell(value, work.unit()),
        p99_us
            .map(|p| format!(", p99 {p:.0} µs"))
            .unwrap_or_default(),
        peak_rss_kib.map_or_else(|| "?".to_owned(), mib_cell),
        cpu.map_or_else(|| "?".to_owned(), |c| cpu_cell(c, work.unit()))
    );
    Ok((
        Run {
            value,
            p99_us,
            peak_rss_kib,
            cpu,
        },
        ready,
    ))
}

/// Removes `path` if it exists.
fn remove_stale(path: &Path) -> Result<()> {
    if path.exists() {
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    Ok(())
}

/// The order in which the servers (by index) run in round `round` (from 1): every one once,
/// starting with server `(round - 1) % n`.
fn round_order(n: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (k + round.saturating_sub(1)) % n)
}

/// `sync(1)`: writes every dirty page back, so that a run does not pay for the previous one's
/// writes. A failure only costs accuracy, so it is reported and ignored.
fn flush_dirty_pages() {
    match std::process::Command::new("sync").status() {
        Ok(status) if status.success() => {}
        other => eprintln!("bench nbd: sync before the run failed ({other:?}); going on"),
    }
}

/// Puts the (clean: [`flush_dirty_pages`] ran) image into the page-cache state `want` with
/// `dd`: read through to `/dev/null` for [`ImageCache::Whole`], dropped with `iflag=nocache
/// count=0` (coreutils' `posix_fadvise(DONTNEED)` over the whole file; xtask links no libc)
/// for [`ImageCache::Empty`]. A failure only costs accuracy, so it is reported and ignored.
fn set_image_cache(image: &Path, want: ImageCache) {
    let how: &[&str] = match want {
        ImageCache::AsLeft => return,
        ImageCache::Whole => &["of=/dev/null", "bs=1M"],
        ImageCache::Empty => &["iflag=nocache", "count=0"],
    };
    let status = std::process::Command::new("dd")
        .arg(format!("if={}", image.display()))
        .args(how)
        .arg("status=none")
        .status();
    if !matches!(&status, Ok(s) if s.success()) {
        eprintln!(
            "bench nbd: putting {} in the page-cache state {want:?} failed ({status:?}); going on",
            image.display()
        );
    }
}

/// Why a server did not start: its own words (stderr of a second, short start), or the error.
fn refusal(cmd: &Cmd, err: &Error, files: &Files) -> String {
    let _ = std::fs::remove_file(&files.pid_file);
    let _ = std::fs::remove_file(&files.socket);
    let said = cmd.output_within(PROBE_LIMIT).ok().and_then(|out| {
        let text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        (!out.status.success() && !text.is_empty()).then_some(text)
    });
    let _ = std::fs::remove_file(&files.pid_file);
    let _ = std::fs::remove_file(&files.socket);
    said.unwrap_or_else(|| err.to_string())
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Median, minimum and maximum of a non-empty sample.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Summary {
    median: f64,
    min: f64,
    max: f64,
}

fn summarize(values: &[f64]) -> Option<Summary> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    Some(Summary {
        median,
        min: sorted[0],
        max: sorted[n - 1],
    })
}

/// `12345.6` as `12 346`: large figures read better with thousands separated and no decimals.
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

fn value_cell(value: f64, unit: Unit) -> String {
    match unit {
        Unit::Iops | Unit::MibPerSec => group(value),
        Unit::Seconds => format!("{value:.4}"),
    }
}

fn mib_cell(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// A server CPU figure with its unit: one decimal below 100, none above.
fn cpu_cell(cpu: f64, unit: Unit) -> String {
    format!("{} {}", cpu_number(cpu), unit.cpu_unit())
}

fn cpu_number(cpu: f64) -> String {
    if cpu < 100.0 {
        format!("{cpu:.1}")
    } else {
        group(cpu)
    }
}

/// The longest note a table cell shows; the report's list of every run has the whole note.
const NOTE_WIDTH: usize = 60;

/// A note for a table cell: its kind (`refused`, `failed`, `skipped`) and the last clause of the
/// message (tools put the reason last: `prog: doing X: reason`), cut to [`NOTE_WIDTH`].
fn short_note(note: &str) -> String {
    let (kind, message) = note.split_once(": ").unwrap_or(("", note));
    let reason = message.rsplit(": ").next().unwrap_or(message).trim();
    let mut cell = if kind.is_empty() {
        reason.to_owned()
    } else {
        format!("{kind}: {reason}")
    };
    if cell.chars().count() > NOTE_WIDTH {
        cell = cell.chars().take(NOTE_WIDTH - 1).collect::<String>() + "…";
    }
    cell
}

/// How much faster `ours` is than `theirs` (> 1: ours is better), for medians in `unit`.
fn ratio(ours: f64, theirs: f64, unit: Unit) -> f64 {
    match unit {
        Unit::Iops | Unit::MibPerSec => ours / theirs,
        Unit::Seconds => theirs / ours,
    }
}

/// The index of the qemu-nbd row that `which` (ours) is compared with, and whether it is the
/// `--cache=none` stand-in because qemu-nbd refused the page cache in that mode.
fn qemu_twin(
    servers: &[Which],
    usable: &dyn Fn(usize) -> bool,
    which: Which,
) -> Option<(usize, bool)> {
    let Which::Ours(aio, variant) = which else {
        return None;
    };
    let find = |cache| {
        servers
            .iter()
            .position(|&w| w == Which::QemuNbd(aio, cache))
            .filter(|&i| usable(i))
    };
    if variant == Variant::CacheNone {
        // O_DIRECT against O_DIRECT: like for like, no footnote.
        return find(Cache::None).map(|i| (i, false));
    }
    find(Cache::Writeback)
        .map(|i| (i, false))
        .or_else(|| find(Cache::None).map(|i| (i, true)))
}

const HEADER: [&str; 8] = [
    "case",
    "server",
    "median (min–max)",
    "p99 µs",
    "peak RSS",
    "server CPU",
    "ours/nbdkit",
    "ours/qemu-nbd",
];

/// The race's table, shared by stdout and the report.
#[derive(Debug)]
struct Table {
    rows: Vec<[String; 8]>,
    /// Whether a ratio against qemu-nbd's `--cache=none` row was used (a footnote).
    used_cache_none: bool,
}

impl Table {
    fn new(servers: &[Which], results: &[CaseResult]) -> Table {
        let mut rows = Vec::new();
        let mut used_cache_none = false;
        for r in results {
            let unit = r.work.unit();
            let medians: Vec<Option<f64>> = r
                .outcomes
                .iter()
                .map(|o| summarize(&o.runs.iter().map(|x| x.value).collect::<Vec<_>>()))
                .map(|s| s.map(|s| s.median))
                .collect();
            let usable = |i: usize| medians[i].is_some();
            let nbdkit = servers.iter().position(|&w| w == Which::Nbdkit);
            for (i, &which) in servers.iter().enumerate() {
                let o = &r.outcomes[i];
                let values: Vec<f64> = o.runs.iter().map(|x| x.value).collect();
                let value = match (summarize(&values), &o.note) {
                    (Some(s), None) => format!(
                        "{} ({}–{})",
                        value_cell(s.median, unit),
                        value_cell(s.min, unit),
                        value_cell(s.max, unit)
                    ),
                    (Some(s), Some(note)) => {
                        format!("{} ({})", value_cell(s.median, unit), short_note(note))
                    }
                    (None, Some(note)) => short_note(note),
                    (None, None) => "—".to_owned(),
                };
                let p99s: Vec<f64> = o.runs.iter().filter_map(|x| x.p99_us).collect();
                let p99 = summarize(&p99s).map_or_else(|| "—".to_owned(), |s| group(s.median));
                let rss = o
                    .runs
                    .iter()
                    .filter_map(|x| x.peak_rss_kib)
                    .max()
                    .map_or_else(|| "—".to_owned(), mib_cell);
                let cpus: Vec<f64> = o.runs.iter().filter_map(|x| x.cpu).collect();
                let cpu =
                    summarize(&cpus).map_or_else(|| "—".to_owned(), |s| cpu_cell(s.median, unit));
                let versus = |reference: Option<usize>| -> String {
                    match (medians[i], reference.and_then(|j| medians[j])) {
                        (Some(ours), Some(theirs)) if which.is_ours() => {
                            format!("{:.2}", ratio(ours, theirs, unit))
                        }
                        _ => "—".to_owned(),
                    }
                };
                let vs_nbdkit = versus(nbdkit.filter(|&j| usable(j)));
                let vs_qemu = match qemu_twin(servers, &usable, which) {
                    Some((j, stand_in)) => {
                        let cell = versus(Some(j));
                        if stand_in && cell != "—" {
                            used_cache_none = true;
                            format!("{cell} (cache=none)")
                        } else {
                            cell
                        }
                    }
                    None => "—".to_owned(),
                };
                rows.push([
                    r.work.name(),
                    which.label(),
                    value,
                    p99,
                    rss,
                    cpu,
                    vs_nbdkit,
                    vs_qemu,
                ]);
            }
        }
        Table {
            rows,
            used_cache_none,
        }
    }

    fn text(&self) -> String {
        let width = |col: usize| {
            self.rows
                .iter()
                .map(|row| row[col].chars().count())
                .chain([HEADER[col].chars().count()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..HEADER.len()).map(width).collect();
        let mut out = String::new();
        let line = |out: &mut String, cells: [&str; 8]| {
            for (i, cell) in cells.iter().enumerate() {
                let pad = " ".repeat(widths[i] - cell.chars().count());
                // Names read best left-aligned, numbers right-aligned.
                if i < 2 {
                    let _ = write!(out, "{cell}{pad}  ");
                } else {
                    let _ = write!(out, "{pad}{cell}  ");
                }
            }
            let trimmed = out.trim_end().len();
            out.truncate(trimmed);
            out.push('\n');
        };
        line(&mut out, HEADER);
        for row in &self.rows {
            line(&mut out, row.each_ref().map(String::as_str));
        }
        out
    }

    fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "| {} |", HEADER.join(" | "));
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
        for row in &self.rows {
            let _ = writeln!(md, "| {} |", row.join(" | "));
        }
        md
    }
}

/// How the numbers were obtained, for the report.
#[derive(Debug)]
struct Setup {
    knobs: Knobs,
    /// Our server's ready line, per row.
    ready_lines: Vec<(String, String)>,
    server_cmds: Vec<(String, String)>,
    client_cmds: Vec<(String, String)>,
    elapsed: Duration,
}

fn markdown(setup: &Setup, servers: &[Which], results: &[CaseResult], table: &Table) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# NBD race: aio's nbd-server vs qemu-nbd vs nbdkit\n");
    let _ = writeln!(
        md,
        "Generated by `cargo xtask bench nbd`{} in {:.0} s: {} round(s), every server once per \
         case and round, a fresh server process per run; a {} MiB raw image of non-zero data \
         (and a {} GiB one holding {} MiB of data for the sparse cases), the same files for every \
         server. qemu-img: {} requests per run, IOPS from the time it reports; fio: {} s per run; \
         nbdcopy timed from outside (process start to exit).\n",
        if setup.knobs.quick {
            " (AIO_NBD_BENCH_QUICK=1)"
        } else {
            ""
        },
        setup.elapsed.as_secs_f64(),
        setup.knobs.rounds,
        IMAGE_SIZE >> 20,
        SPARSE_SIZE >> 30,
        (SPARSE_EXTENTS * SPARSE_EXTENT) >> 20,
        setup.knobs.count,
        setup.knobs.runtime,
    );
    match setup.knobs.tls {
        TlsMode::Off => {}
        TlsMode::X509 => {
            let _ = writeln!(
                md,
                "**Under TLS** (`AIO_NBD_BENCH_TLS=1`): every server requires it and every \
                 client uses it, with one X.509 certificate (P-256) for all; the commands below \
                 say how.\n"
            );
        }
        TlsMode::Psk => {
            let _ = writeln!(
                md,
                "**Under TLS with pre-shared keys** (`AIO_NBD_BENCH_TLS=psk`): every server \
                 requires it and every client uses it, with one random 256-bit key for the user \
                 `{PSK_USER}`; the commands below say how.\n"
            );
        }
    }
    md.push_str(&table.markdown());
    let _ = writeln!(
        md,
        "\nRatios are of medians, ours over the peer with the same client (and, for qemu-nbd, \
         the same `--aio` and `--cache=writeback`); > 1 means ours is faster, for the sparse \
         cases (seconds) that it takes less time. Peak RSS is the largest `VmHWM` of the \
         server's runs, read just before it was stopped; p99 is fio's completion latency \
         (median over runs). Server CPU is the user and system time of the server process, \
         all its threads, from the client's start to its exit (`utime` + `stime` of \
         `/proc/PID/stat`, in ticks of 1/{} s), per request, per GiB copied, or per sparse \
         copy (the run's {} copies together, divided; median over runs): what the figure \
         cost, since a server that polls or spins trades CPU for latency.",
        nbd::clock_ticks_per_sec(),
        SPARSE_COPIES
    );
    if table.used_cache_none {
        let _ = writeln!(
            md,
            "`(cache=none)`: qemu-nbd refuses `--aio=native` with `--cache=writeback`, so the \
             ratio is against `qemu-nbd --aio=native --cache=none` (O_DIRECT), while ours reads \
             through the page cache: not like for like."
        );
    }
    let _ = writeln!(md, "\n## Every run (in run order)\n");
    let _ = writeln!(md, "| case | server | runs | peak RSS (MiB) | server CPU |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    for r in results {
        for (i, &which) in servers.iter().enumerate() {
            let o = &r.outcomes[i];
            let values: Vec<String> = o
                .runs
                .iter()
                .map(|x| {
                    let p99 = x
                        .p99_us
                        .map(|p| format!(" (p99 {p:.0} µs)"))
                        .unwrap_or_default();
                    format!("{}{p99}", value_cell(x.value, r.work.unit()))
                })
                .collect();
            let rss: Vec<String> = o
                .runs
                .iter()
                .map(|x| {
                    x.peak_rss_kib
                        .map_or_else(|| "?".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0))
                })
                .collect();
            let cpus: Vec<String> = o
                .runs
                .iter()
                .map(|x| x.cpu.map_or_else(|| "?".to_owned(), cpu_number))
                .collect();
            let mut runs = values.join(", ");
            if let Some(note) = &o.note {
                if !runs.is_empty() {
                    runs.push_str("; ");
                }
                runs.push_str(note);
            }
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} {} |",
                r.work.name(),
                which.label(),
                runs,
                rss.join(", "),
                cpus.join(", "),
                r.work.unit().cpu_unit()
            );
        }
    }
    let _ = writeln!(md, "\n## Setup\n");
    let _ = writeln!(
        md,
        "Servers (the sparse cases serve the sparse image instead):\n"
    );
    for (label, cmd) in &setup.server_cmds {
        let _ = writeln!(md, "- {label}: `{cmd}`");
    }
    if !setup.ready_lines.is_empty() {
        let _ = writeln!(md, "\nOur server's ready lines:\n");
    }
    for (label, line) in &setup.ready_lines {
        let _ = writeln!(md, "- {label}: `{line}`");
    }
    let _ = writeln!(
        md,
        "\nOurs runs its default of one context per CPU (at most 8; the ready lines say how \
         many) and qemu-nbd one event loop; \
         nbdkit's file plugin with its defaults (16 worker threads, `cache=default`: the page \
         cache); qemu-nbd's `--shared={QEMU_NBD_SHARED}` lets nbdcopy open its connections and \
         makes it advertise multi-conn, as the others do."
    );
    let _ = writeln!(md, "\nClients, per case:\n");
    for (name, cmd) in &setup.client_cmds {
        let _ = writeln!(md, "- {name}: `{cmd}`");
    }
    let _ = writeln!(md, "\nVersions and machine:\n");
    for tool in ["qemu-nbd", "qemu-img", "nbdkit", "fio", "nbdcopy"] {
        let _ = writeln!(md, "- {}", nbd::tool_version(tool));
    }
    let _ = writeln!(
        md,
        "- {} CPUs, kernel {}",
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

    /// A realistic fio 3.33 report of a randwrite job (trimmed), with the line fio's nbd engine
    /// prints first.
    const FIO_WRITE: &str = r#"fio: connected to NBD server
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "race",
      "error" : 0,
      "read" : {
        "io_bytes" : 0,
        "iops" : 0.000000,
        "clat_ns" : { "min" : 0, "max" : 0, "mean" : 0.000000 }
      },
      "write" : {
        "io_bytes" : 490213376,
        "bw" : 239361,
        "total_ios" : 119678,
        "iops" : 59839.160839,
        "iops_min" : 58000,
        "clat_ns" : {
          "min" : 81234,
          "mean" : 530000.5,
          "percentile" : {
            "1.000000" : 200704,
            "99.000000" : 3063808,
            "99.900000" : 5079040
          }
        }
      }
    }
  ]
}
"#;

    #[test]
    fn fio_json_gives_iops_and_p99_of_the_side_that_ran() {
        let fio = parse_fio(FIO_WRITE, true).unwrap();
        assert!((fio.iops - 59839.160839).abs() < 1e-6);
        assert_eq!(fio.p99_us, Some(3063.808));
        assert_eq!(fio.requests, Some(119678.0));
        // The read side did nothing: that is an error, not 0 IOPS.
        let err = parse_fio(FIO_WRITE, false).unwrap_err();
        assert!(err.to_string().contains("no I/O"), "{err}");
    }

    #[test]
    fn fio_failures_are_errors() {
        let failed = FIO_WRITE.replace("\"error\" : 0", "\"error\" : 5");
        assert!(
            parse_fio(&failed, true)
                .unwrap_err()
                .to_string()
                .contains("error 5")
        );
        assert!(parse_fio("fio: nbd: connection refused\n", false).is_err());
        assert!(
            parse_fio("{\"jobs\" : []}", false)
                .unwrap_err()
                .to_string()
                .contains("no job")
        );
        assert!(parse_fio("{\"jobs\" : [", false).is_err());
    }

    #[test]
    fn nbdcopy_throughput_is_bytes_over_wall_time() {
        assert_eq!(
            mib_per_sec(1 << 30, Duration::from_millis(500)),
            Some(2048.0)
        );
        assert_eq!(mib_per_sec(1 << 30, Duration::ZERO), None);
    }

    fn run(value: f64) -> Run {
        Run {
            value,
            p99_us: None,
            peak_rss_kib: Some(10 * 1024),
            cpu: Some(20.0),
        }
    }

    fn outcome(values: &[f64]) -> Outcome {
        Outcome {
            runs: values.iter().map(|&v| run(v)).collect(),
            note: None,
        }
    }

    fn every(clients: &[Client]) -> Selection {
        Selection {
            clients: clients.to_vec(),
            servers: vec!["aio", "qemu-nbd", "nbdkit"],
            modes: Aio::ALL.to_vec(),
            variants: false,
        }
    }

    #[test]
    fn the_default_race_has_every_mode_of_both_and_nbdkit() {
        let servers = server_list(&every(&Client::ALL));
        let labels: Vec<String> = servers.iter().map(|w| w.label()).collect();
        assert_eq!(
            labels,
            [
                "aio --aio threads",
                "aio --aio io_uring",
                "aio --aio native",
                "aio --aio native --cache none",
                "qemu-nbd --aio=threads",
                "qemu-nbd --aio=io_uring",
                "qemu-nbd --aio=native",
                "qemu-nbd --aio=native --cache=none",
                "nbdkit file",
            ]
        );
        let mut sel = every(&[Client::Fio]);
        sel.modes = vec![Aio::IoUring];
        sel.servers = vec!["aio", "qemu-nbd"];
        sel.variants = true;
        assert_eq!(
            server_list(&sel),
            [
                Which::Ours(Aio::IoUring, Variant::Plain),
                Which::Ours(Aio::Threads, Variant::Tasks),
                Which::Ours(Aio::Threads, Variant::NoPolling),
                Which::Ours(Aio::Threads, Variant::Epoll),
                Which::QemuNbd(Aio::IoUring, Cache::Writeback),
            ]
        );
    }

    /// The files of a run under `/s` (ours in `/t`), with `tls`.
    fn test_files(tls: TlsFiles) -> Files {
        Files {
            ours: PathBuf::from("/t/nbd-server"),
            image: PathBuf::from("/s/image.raw"),
            sparse: PathBuf::from("/s/sparse.raw"),
            upload: PathBuf::from("/s/upload.raw"),
            download: PathBuf::from("/s/out.raw"),
            socket: PathBuf::from("/s/nbd.sock"),
            pid_file: PathBuf::from("/s/server.pid"),
            tls,
        }
    }

    #[test]
    fn commands_configure_each_server_and_client() {
        let files = test_files(TlsFiles::Off);
        let image = files.image.clone();
        let cmd = |w| files.server_command(w, &image).to_string();
        assert_eq!(
            cmd(Which::Ours(Aio::Native, Variant::Plain)),
            "env -u AIO_POLL_MAX_NS /t/nbd-server --unix /s/nbd.sock --persistent --aio native /s/image.raw"
        );
        assert_eq!(
            cmd(Which::QemuNbd(Aio::Native, Cache::None)),
            "qemu-nbd -f raw -t --cache=none --aio=native --shared=16 -k /s/nbd.sock \
             --pid-file=/s/server.pid /s/image.raw"
        );
        assert_eq!(
            cmd(Which::Nbdkit),
            "nbdkit --foreground --unix /s/nbd.sock --pidfile /s/server.pid file /s/image.raw"
        );
        assert!(cmd(Which::Ours(Aio::Threads, Variant::Epoll)).contains("AIO_BACKEND=epoll "));
        assert!(cmd(Which::Ours(Aio::Threads, Variant::Tasks)).contains("--engine tasks"));
        let (knobs, _) = knobs(&|k| (k == "AIO_NBD_BENCH_QUICK").then(|| "1".to_owned())).unwrap();
        let client = |w| files.client_command(w, &knobs).to_string();
        assert_eq!(
            client(Workload::Fio {
                write: false,
                depth: 32
            }),
            "fio --name=race --ioengine=nbd '--uri=nbd+unix:///?socket=/s/nbd.sock' --rw=randread \
             --bs=4096 --iodepth=32 --time_based --norandommap --randrepeat=0 --runtime=2 \
             --output-format=json"
        );
        assert_eq!(
            client(Workload::CopyIn {
                connections: 4,
                requests: 64
            }),
            "nbdcopy --connections=4 --requests=64 --request-size=262144 /s/upload.raw \
             'nbd+unix:///?socket=/s/nbd.sock'"
        );
        assert_eq!(
            client(Workload::Sparse { to_file: true }),
            "nbdcopy 'nbd+unix:///?socket=/s/nbd.sock' /s/out.raw"
        );
        assert!(
            client(Workload::QemuImg {
                write: true,
                depth: 1
            })
            .contains("-c 10000 -d 1 -s 4096 -w --pattern 0x5a")
        );
    }

    #[test]
    fn under_tls_every_server_requires_it_and_every_client_uses_it() {
        let files = test_files(TlsFiles::X509 {
            home: PathBuf::from("/s/home"),
        });
        let image = files.image.clone();
        let cmd = |w| files.server_command(w, &image).to_string();
        assert!(
            cmd(Which::Ours(Aio::Threads, Variant::Plain))
                .ends_with("--aio threads --tls-creds /s/home/.pki/libnbd /s/image.raw")
        );
        assert!(
            cmd(Which::QemuNbd(Aio::IoUring, Cache::Writeback)).ends_with(
                "--object tls-creds-x509,id=tls0,endpoint=server,dir=/s/home/.pki/libnbd,\
             verify-peer=off --tls-creds tls0 /s/image.raw"
            )
        );
        assert!(
            cmd(Which::Nbdkit).ends_with(
                "--tls=require --tls-certificates=/s/home/.pki/libnbd file /s/image.raw"
            )
        );
        let (knobs, _) = knobs(&|k| (k == "AIO_NBD_BENCH_TLS").then(|| "1".to_owned())).unwrap();
        assert_eq!(knobs.tls, TlsMode::X509);
        let client = |w| files.client_command(w, &knobs).to_string();
        let fio = client(Workload::Fio {
            write: true,
            depth: 1,
        });
        assert!(
            fio.starts_with("HOME=/s/home fio ")
                && fio.contains("'--uri=nbds+unix:///?socket=/s/nbd.sock'"),
            "{fio}"
        );
        let copy = client(Workload::CopyOut {
            connections: 1,
            requests: 16,
        });
        assert!(
            copy.starts_with("HOME=/s/home nbdcopy ")
                && copy.ends_with("'nbds+unix:///?socket=/s/nbd.sock' null:"),
            "{copy}"
        );
    }

    #[test]
    fn with_pre_shared_keys_every_server_and_nbdcopy_use_the_keys_file() {
        let files = test_files(TlsFiles::Psk {
            keys: PathBuf::from("/s/psk/keys.psk"),
        });
        let image = files.image.clone();
        let cmd = |w| files.server_command(w, &image).to_string();
        assert!(
            cmd(Which::Ours(Aio::Threads, Variant::Plain))
                .ends_with("--aio threads --tls-psk /s/psk/keys.psk /s/image.raw")
        );
        assert!(
            cmd(Which::QemuNbd(Aio::Threads, Cache::Writeback)).ends_with(
                "--object tls-creds-psk,id=tls0,endpoint=server,dir=/s/psk --tls-creds tls0 \
                 /s/image.raw"
            )
        );
        assert!(
            cmd(Which::Nbdkit)
                .ends_with("--tls=require --tls-psk=/s/psk/keys.psk file /s/image.raw")
        );
        let (knobs, _) = knobs(&|k| (k == "AIO_NBD_BENCH_TLS").then(|| "psk".to_owned())).unwrap();
        assert_eq!(knobs.tls, TlsMode::Psk);
        let copy = files
            .client_command(
                Workload::CopyOut {
                    connections: 1,
                    requests: 16,
                },
                &knobs,
            )
            .to_string();
        assert!(
            copy.starts_with("nbdcopy ")
                && copy.ends_with(
                    "'nbds+unix://bench@/?socket=/s/nbd.sock&tls-psk-file=/s/psk/keys.psk' null:"
                ),
            "{copy}"
        );
        let bad = super::knobs(&|k| (k == "AIO_NBD_BENCH_TLS").then(|| "yes".to_owned()));
        assert!(bad.is_err());
    }

    /// The resident bytes of `path` as util-linux's `fincore` counts them, or `None` without it.
    fn resident_bytes(path: &Path) -> Option<u64> {
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--output", "RES"])
            .arg(path)
            .output()
            .ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    }

    #[test]
    fn the_image_is_cached_whole_for_reads_and_dropped_for_writes() {
        let scratch = Scratch::create("nbd-bench-cache").unwrap();
        let image = scratch.path().join("image.raw");
        let size = 8 << 20;
        nbd::write_random_file(&image, size, 7).unwrap();
        flush_dirty_pages();
        if resident_bytes(&image).is_none() {
            eprintln!("skipped: no fincore (util-linux) to count the image's cached pages");
            return;
        }
        let read = Workload::Fio {
            write: false,
            depth: 32,
        };
        let write = Workload::QemuImg {
            write: true,
            depth: 1,
        };
        set_image_cache(&image, write.image_cache());
        assert_eq!(
            resident_bytes(&image),
            Some(0),
            "a write case starts uncached"
        );
        set_image_cache(&image, read.image_cache());
        assert_eq!(
            resident_bytes(&image),
            Some(size),
            "a read case starts cached"
        );
        let copy_in = Workload::CopyIn {
            connections: 1,
            requests: 16,
        };
        set_image_cache(&image, copy_in.image_cache());
        assert_eq!(
            resident_bytes(&image),
            Some(0),
            "a copy into the export too"
        );
        let sparse = Workload::Sparse { to_file: false };
        set_image_cache(&image, sparse.image_cache());
        assert_eq!(
            resident_bytes(&image),
            Some(0),
            "the sparse cases leave it alone"
        );
    }

    #[test]
    fn every_client_contributes_its_cases() {
        let all = workloads(&Client::ALL);
        let count = |c| all.iter().filter(|w| w.client() == c).count();
        assert_eq!(count(Client::QemuImg), 4);
        assert_eq!(count(Client::Fio), 4);
        // 2 directions × 2 connection counts × 2 request counts, + 2 sparse.
        assert_eq!(count(Client::Nbdcopy), 10);
        assert_eq!(workloads(&[Client::Fio]).len(), 4);
        let names: Vec<String> = all.iter().map(|w| w.name()).collect();
        assert!(names.contains(&"fio randwrite 4k QD32, IOPS".to_owned()));
        assert!(names.contains(&"nbdcopy nbd → null: -C 4 -R 16, MiB/s".to_owned()));
        assert!(names.contains(&"nbdcopy sparse nbd → file, s".to_owned()));
    }

    #[test]
    fn knobs_read_quick_and_filters_and_refuse_nonsense() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |key: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let (k, sel) = knobs(&env(&[])).unwrap();
        assert_eq!(
            k,
            Knobs {
                rounds: 3,
                count: 50_000,
                runtime: 10,
                quick: false,
                tls: TlsMode::Off,
            }
        );
        assert_eq!(sel, every(&Client::ALL));
        let (k, sel) = knobs(&env(&[
            ("AIO_NBD_BENCH_QUICK", "1"),
            ("AIO_NBD_BENCH_RUNTIME", "5"),
            ("AIO_NBD_BENCH_CLIENTS", "nbdcopy, fio"),
            ("AIO_NBD_BENCH_MODES", "io_uring"),
        ]))
        .unwrap();
        assert_eq!((k.rounds, k.count, k.runtime), (1, 10_000, 5));
        // In the known order, whatever order they were named in.
        assert_eq!(sel.clients, [Client::Fio, Client::Nbdcopy]);
        assert_eq!(sel.modes, [Aio::IoUring]);
        for bad in [
            &[("AIO_NBD_BENCH_CLIENTS", "fio,iperf")][..],
            &[("AIO_NBD_BENCH_SERVERS", ",")],
            &[("AIO_NBD_BENCH_ROUNDS", "0")],
            &[("AIO_NBD_BENCH_QUICK", "yes")],
        ] {
            let bad: &'static [(&str, &str)] = bad;
            assert!(knobs(&env(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn each_round_runs_every_server_once_starting_with_the_next() {
        let rounds: Vec<Vec<usize>> = (1..=4).map(|r| round_order(3, r).collect()).collect();
        assert_eq!(rounds, [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]);
        assert_eq!(round_order(1, 5).collect::<Vec<_>>(), [0]);
        assert_eq!(round_order(0, 2).count(), 0);
    }

    #[test]
    fn ratios_are_like_for_like_and_point_the_same_way_for_times() {
        let servers = server_list(&every(&[Client::Fio]));
        // aio threads, io_uring, native, native cache none; qemu-nbd threads, io_uring, native
        // (refused), native cache=none; nbdkit.
        let mut outcomes = vec![
            outcome(&[100.0, 300.0, 200.0]),
            outcome(&[300.0]),
            outcome(&[90.0]),
            outcome(&[60.0]),
            outcome(&[400.0, 100.0]),
            outcome(&[150.0]),
            Outcome {
                runs: Vec::new(),
                note: Some(
                    "refused: qemu-nbd: open 'x': aio=native needs cache.direct=on".to_owned(),
                ),
            },
            outcome(&[45.0]),
            outcome(&[50.0]),
        ];
        outcomes[0].runs[0].p99_us = Some(70.0);
        outcomes[0].runs[1].p99_us = Some(90.0);
        outcomes[0].runs[1].peak_rss_kib = Some(30 * 1024);
        // The median of 20, 30 and 25 (and not their mean, nor the first run's).
        outcomes[0].runs[1].cpu = Some(30.0);
        outcomes[0].runs[2].cpu = Some(25.0);
        let fio = CaseResult {
            work: Workload::Fio {
                write: false,
                depth: 32,
            },
            outcomes,
        };
        let table = Table::new(&servers, &[fio]);
        let cells = |i: usize| table.rows[i][1..].to_vec();
        assert_eq!(
            cells(0),
            [
                "aio --aio threads",
                "200 (100–300)",
                "80",
                "30.0 MiB",
                "25.0 µs/req",
                "4.00",
                "0.80"
            ]
        );
        assert_eq!(cells(1)[5..], ["6.00", "2.00"]);
        // native: qemu-nbd refused the page cache, so its cache=none row stands in, marked.
        assert_eq!(cells(2)[5..], ["1.80", "2.00 (cache=none)"]);
        assert!(table.used_cache_none);
        // Ours with --cache none against qemu-nbd's cache=none: like for like, unmarked.
        assert_eq!(cells(3)[5..], ["1.20", "1.33"]);
        assert_eq!(
            cells(6),
            [
                "qemu-nbd --aio=native",
                "refused: aio=native needs cache.direct=on",
                "—",
                "—",
                "—",
                "—",
                "—"
            ]
        );
        // Peers get no ratios, but their CPU.
        assert_eq!(cells(8)[4..], ["20.0 µs/req", "—", "—"]);

        // Times: lower is better, so the ratio is theirs over ours.
        let mut outcomes = vec![outcome(&[2.0]); servers.len()];
        outcomes[8] = outcome(&[0.5]);
        outcomes[4] = Outcome {
            runs: Vec::new(),
            note: Some("skipped: no qemu-nbd".to_owned()),
        };
        let sparse = CaseResult {
            work: Workload::Sparse { to_file: false },
            outcomes,
        };
        let table = Table::new(&servers, &[sparse]);
        assert_eq!(table.rows[0][2], "2.0000 (2.0000–2.0000)");
        assert_eq!(table.rows[0][5], "20.0 ms");
        assert_eq!(table.rows[0][6], "0.25");
        // Its qemu-nbd twin has no figure and threads has no cache=none stand-in: no ratio.
        assert_eq!(table.rows[0][7], "—");
        assert_eq!(table.rows[1][7], "1.00");
        assert!(!table.used_cache_none);
        let text = table.text();
        assert!(text.lines().next().unwrap().starts_with("case"), "{text}");
        assert_eq!(text.lines().count(), 1 + servers.len());
        let md = table.markdown();
        assert!(
            md.contains("| nbdcopy sparse nbd → null:, s | nbdkit file | 0.5000 (0.5000–0.5000) |"),
            "{md}"
        );
    }

    #[test]
    fn the_report_has_the_table_every_run_and_the_setup() {
        let servers = [Which::Ours(Aio::Native, Variant::Plain), Which::Nbdkit];
        let mut fio = outcome(&[120.0, 100.0]);
        fio.runs[0].p99_us = Some(55.0);
        fio.runs[1].cpu = Some(150.0);
        let results = [CaseResult {
            work: Workload::Fio {
                write: true,
                depth: 1,
            },
            outcomes: vec![
                fio,
                Outcome {
                    runs: vec![run(50.0)],
                    note: Some("failed: nbdkit: it broke: badly".to_owned()),
                },
            ],
        }];
        let table = Table::new(&servers, &results);
        let setup = Setup {
            knobs: Knobs {
                rounds: 2,
                count: 10,
                runtime: 2,
                quick: true,
                tls: TlsMode::X509,
            },
            ready_lines: vec![(
                "aio --aio native".to_owned(),
                "nbd-server: ready".to_owned(),
            )],
            server_cmds: vec![("nbdkit file".to_owned(), "nbdkit file x".to_owned())],
            client_cmds: vec![("fio".to_owned(), "fio --x".to_owned())],
            elapsed: Duration::from_secs(3),
        };
        let md = markdown(&setup, &servers, &results, &table);
        assert!(md.contains("(AIO_NBD_BENCH_QUICK=1)"), "{md}");
        assert!(md.contains("**Under TLS**"), "{md}");
        // A run that failed after others succeeded keeps its figures and says why.
        assert!(
            md.contains("| fio randwrite 4k QD1, IOPS | nbdkit file | 50 (failed: badly) |"),
            "{md}"
        );
        assert!(
            md.contains("| fio randwrite 4k QD1, IOPS | aio --aio native | 120 (p99 55 µs), 100 | 10.0, 10.0 | 20.0, 150 µs/req |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| aio --aio native | 110 (100–120) | 55 | 10.0 MiB | 85.0 µs/req | 2.20 | — |"
            ),
            "{md}"
        );
        assert!(
            md.contains("- aio --aio native: `nbd-server: ready`"),
            "{md}"
        );
        assert!(!md.contains("(cache=none)"), "{md}");
    }

    #[test]
    fn notes_are_cut_to_their_reason_in_the_table() {
        assert_eq!(
            short_note(
                "refused: qemu-nbd: Failed to blk_new_open '/x/image.raw': aio=native was \
                 specified, but it requires cache.direct=on, which was not specified."
            ),
            "refused: aio=native was specified, but it requires cache.di…"
        );
        assert_eq!(short_note("skipped: no fio"), "skipped: no fio");
        assert_eq!(short_note("plain"), "plain");
        assert_eq!(short_note(&"x".repeat(100)).chars().count(), NOTE_WIDTH);
    }

    #[test]
    fn summaries_use_the_median() {
        let s = summarize(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!(
            s,
            Summary {
                median: 2.0,
                min: 1.0,
                max: 3.0
            }
        );
        assert_eq!(summarize(&[1.0, 2.0, 4.0, 3.0]).unwrap().median, 2.5);
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(group(12345.6), "12 346");
        assert_eq!(group(999.0), "999");
        assert_eq!(group(1_000_000.0), "1 000 000");
    }
}
