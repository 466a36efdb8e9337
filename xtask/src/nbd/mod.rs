//! Plumbing shared by the NBD commands (`bench nbd` and `demo`): building the example server,
//! scratch directories and image files under `target/`, the qemu tools, and NBD servers run as
//! guarded child processes that never outlive xtask.
//!
//! Both commands drive `crates/aio/examples/nbd-server` from the outside, exactly as a user
//! would: through its command line, its stdout lines and signals. Nothing here links against the
//! server, so what is measured and shown is the real program. Its submodules: `bench` (the race),
//! `demo` (the tour) and `json` (fio's reports).

pub mod bench;
pub mod demo;
mod json;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use crate::cmd::{
    Cmd, Context, Error, Result, Target, artifact_executable, ensure_apt_package, project_root,
    secs,
};

/// The example's name, as in `cargo build -p aio --example nbd-server`.
const SERVER_EXAMPLE: &str = "nbd-server";

/// The prefix of the line our server prints once it accepts connections.
const READY_PREFIX: &str = "nbd-server: ready";

/// The prefix of the line our server prints after a clean shutdown.
const STOPPED_PREFIX: &str = "nbd-server: stopped";

/// Socket paths must fit in `sockaddr_un.sun_path` (108 bytes on Linux, with the NUL); longer
/// scratch paths put the socket in the system temporary directory instead.
const MAX_SOCKET_PATH: usize = 100;

/// Builds the server in release mode and returns the path of its executable.
///
/// The path comes from cargo's own artifact messages rather than a guess at `target/release`, so
/// `CARGO_TARGET_DIR` and build configuration are honoured.
pub fn build_server() -> Result<PathBuf> {
    build_server_quietly(false)
}

/// [`build_server`], with `--quiet` given to cargo when `quiet` (no progress, warnings or
/// `Compiling` lines; errors still show).
pub fn build_server_quietly(quiet: bool) -> Result<PathBuf> {
    let cmd = Cmd::cargo().args([
        "build",
        "--release",
        "-p",
        "aio",
        "--example",
        SERVER_EXAMPLE,
    ]);
    let cmd = if quiet { cmd.arg("--quiet") } else { cmd };
    let messages = cmd
        // Diagnostics still reach the terminal, rendered; only artifact records go to stdout.
        .args(["--message-format", "json-render-diagnostics"])
        .stdout()?;
    artifact_executable(&messages, Target::Example, SERVER_EXAMPLE)
        .map(PathBuf::from)
        .ok_or_else(|| {
            Error::new(format!(
                "cargo built no executable for `-p aio --example {SERVER_EXAMPLE}`"
            ))
        })
}

/// Installs Debian's `qemu-utils` (qemu-img, qemu-io, qemu-nbd) with apt-get when one of them
/// is missing, so that `cargo xtask bench nbd` and `cargo xtask ci` alone set up a fresh machine.
pub fn ensure_qemu_utils() -> Result<()> {
    ensure_apt_package("qemu-utils", &["qemu-img", "qemu-io", "qemu-nbd"])
}

/// The first line of `<tool> --version`, for reports; `unknown` if the tool does not answer.
pub fn tool_version(tool: &str) -> String {
    std::process::Command::new(tool)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Writes into `dir` a throwaway certificate authority and a server certificate for
/// `localhost` it signed (P-256 keys, valid 2 days), with `openssl`, under the names all three
/// servers read: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`.
pub fn make_pki(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = |name: &str| dir.join(name).display().to_string();
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    Cmd::new("openssl")
        .args([
            "req",
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=aio throwaway CA",
        ])
        .args(key)
        .args(["-keyout", &path("ca-key.pem"), "-out", &path("ca-cert.pem")])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .run()?;
    Cmd::new("openssl")
        .args(["req", "-subj", "/CN=localhost"])
        .args(key)
        .args([
            "-keyout",
            &path("server-key.pem"),
            "-out",
            &path("server.csr"),
        ])
        .run()?;
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\n",
    )
    .with_context(|| format!("writing {}", ext.display()))?;
    Cmd::new("openssl")
        .args(["x509", "-req", "-days", "2", "-in", &path("server.csr")])
        .args(["-CA", &path("ca-cert.pem"), "-CAkey", &path("ca-key.pem")])
        .args(["-CAcreateserial", "-out", &path("server-cert.pem")])
        .args(["-extfile", &ext.display().to_string()])
        .run()
}

/// The NBD URI of the default (empty-named) export on a Unix socket, as qemu's tools spell it.
pub fn unix_url(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

/// The seconds in `qemu-img bench`'s "Run completed in 0.846 seconds." line.
pub fn parse_bench_elapsed(output: &str) -> Option<f64> {
    output.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("Run completed in ")?;
        let secs: f64 = rest.strip_suffix(" seconds.")?.trim().parse().ok()?;
        (secs > 0.0).then_some(secs)
    })
}

/// A directory under `target/` for one command's files, removed with everything in it on drop.
#[derive(Debug)]
pub struct Scratch {
    dir: PathBuf,
    /// Files placed outside `dir` (a socket whose path would be too long there).
    outside: Vec<PathBuf>,
}

impl Scratch {
    /// Creates `target/<label>-<pid>`, emptying it first if a crashed run left it behind.
    pub fn create(label: &str) -> Result<Self> {
        let dir = project_root()
            .join("target")
            .join(format!("{label}-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch {
            dir,
            outside: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A path for a Unix socket: in the scratch directory when it fits in `sun_path`, otherwise
    /// in the system temporary directory (and then removed on drop too).
    pub fn socket_path(&mut self, name: &str) -> PathBuf {
        let inside = self.dir.join(name);
        if inside.as_os_str().len() <= MAX_SOCKET_PATH {
            return inside;
        }
        let outside = std::env::temp_dir().join(format!("aio-xtask-{}-{name}", std::process::id()));
        self.outside.push(outside.clone());
        outside
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Best effort: a leftover directory under target/ is harmless and `cargo clean` removes
        // it, so a failure here must not hide the error that may be unwinding through us.
        let _ = std::fs::remove_dir_all(&self.dir);
        for file in &self.outside {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// A small deterministic generator (xorshift64*) for image contents: the data only has to be
/// non-zero and differ from page to page, and the same seed must give the same bytes.
#[derive(Debug, Clone)]
pub struct Bytes {
    state: u64,
}

impl Bytes {
    pub fn new(seed: u64) -> Self {
        // xorshift has one fixed point, zero; any other state works.
        Bytes { state: seed | 1 }
    }

    /// Fills `buf` with the next bytes of the sequence (8 at a time; `buf.len()` must be a
    /// multiple of 8, as every buffer here is a power-of-two size).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_exact_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let value = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d);
            word.copy_from_slice(&value.to_le_bytes());
        }
    }
}

/// Writes `size` bytes of the generator's data to a new file at `path` (a raw image).
pub fn write_random_file(path: &Path, size: u64, seed: u64) -> Result<()> {
    const CHUNK: usize = 1 << 20;
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut bytes = Bytes::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left.min(CHUNK as u64)).expect("at most CHUNK");
        bytes.fill(&mut buf[..n]);
        file.write_all(&buf[..n])
            .with_context(|| format!("writing {}", path.display()))?;
        left -= n as u64;
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

/// A point in time after which a command gives up instead of hanging.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    limit: Duration,
}

impl Deadline {
    pub fn after(limit: Duration) -> Self {
        Deadline {
            at: Instant::now() + limit,
            limit,
        }
    }

    /// Time left, zero once the deadline has passed.
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// The whole allowance, for messages.
    pub fn limit(&self) -> Duration {
        self.limit
    }
}

/// How to tell that a freshly started server accepts connections.
#[derive(Debug, Clone)]
pub enum Readiness {
    /// Our server: it prints a line starting with `nbd-server: ready`.
    ReadyLine,
    /// `qemu-nbd --pid-file PATH`: the pid file appears only once the socket listens (qemu-nbd
    /// writes it after setting up the listener, on purpose, so scripts can wait for it).
    PidFile(PathBuf),
}

/// What a server left behind after a clean stop.
#[derive(Debug)]
pub struct Stopped {
    pub status: ExitStatus,
    /// Every line the server printed on stdout, from the start.
    pub stdout: Vec<String>,
}

/// A server running as a child process, killed and reaped when dropped, so that no failure path
/// (an error, a panic, a watchdog) leaves it running.
#[derive(Debug)]
pub struct Server {
    name: String,
    child: Arc<Mutex<Child>>,
    pid: u32,
    lines: mpsc::Receiver<String>,
    stdout: Vec<String>,
    stopped: bool,
}

impl Server {
    /// Starts `cmd` and waits (at most until `deadline`) until it is ready. `name` is used in
    /// messages (`nbd-server`, `qemu-nbd`).
    pub fn start(name: &str, cmd: &Cmd, ready: &Readiness, deadline: Deadline) -> Result<Self> {
        let mut child = cmd.spawn_piped()?;
        let pid = child.id();
        let stdout = child.stdout.take().expect("spawn_piped pipes stdout");
        // Lines are forwarded as they come, so we can wait for one with a timeout; the thread
        // ends when the server closes its stdout (normally: when it exits).
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Server {
            name: name.to_owned(),
            child: Arc::new(Mutex::new(child)),
            pid,
            lines,
            stdout: Vec::new(),
            stopped: false,
        };
        server.wait_ready(ready, deadline)?;
        Ok(server)
    }

    /// The ready line our server printed (it names the backend), if any.
    pub fn ready_line(&self) -> Option<&str> {
        self.stdout
            .iter()
            .map(String::as_str)
            .find(|line| line.starts_with(READY_PREFIX))
    }

    /// The server's process id (its `/proc/PID`), valid until it is stopped or dropped.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The lines printed on stdout so far.
    pub fn stdout(&self) -> &[String] {
        &self.stdout
    }

    /// A handle that can kill the server from another thread (a watchdog).
    pub fn killer(&self) -> Killer {
        Killer {
            child: Arc::clone(&self.child),
        }
    }

    fn wait_ready(&mut self, ready: &Readiness, deadline: Deadline) -> Result<()> {
        loop {
            match ready {
                Readiness::ReadyLine => {
                    match self
                        .lines
                        .recv_timeout(deadline.remaining().min(Duration::from_millis(20)))
                    {
                        Ok(line) => {
                            let is_ready = line.starts_with(READY_PREFIX);
                            self.stdout.push(line);
                            if is_ready {
                                return Ok(());
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        // Stdout closed: the server is exiting; try_wait below says how.
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                    }
                }
                Readiness::PidFile(path) => {
                    let written = std::fs::read_to_string(path)
                        .is_ok_and(|text| text.trim().parse::<u32>().is_ok());
                    if written {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            if let Some(status) = self.lock().try_wait().ok().flatten() {
                return Err(Error::new(format!(
                    "{} exited ({status}) before it was ready; its stdout: {:?}",
                    self.name, self.stdout
                )));
            }
            if deadline.remaining().is_zero() {
                return Err(Error::new(format!(
                    "{} was not ready within {}; its stdout so far: {:?}",
                    self.name,
                    secs(deadline.limit()),
                    self.stdout
                )));
            }
        }
    }

    /// Stops the server with SIGTERM and waits (at most until `deadline`) for it to exit; it is
    /// killed if it does not. Returns its exit status and stdout: judging them is the caller's.
    pub fn stop(mut self, deadline: Deadline) -> Result<Stopped> {
        // std can only send SIGKILL; the shell's `kill` builtin sends SIGTERM without `unsafe`
        // and without depending on procps.
        Cmd::new("sh")
            .arg("-c")
            .arg(format!("kill -TERM {}", self.pid))
            .output_within(deadline.remaining())?;
        let status = loop {
            if let Some(status) = self
                .lock()
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name))?
            {
                break status;
            }
            if deadline.remaining().is_zero() {
                return Err(Error::new(format!(
                    "{} did not exit within {} of SIGTERM; killed it",
                    self.name,
                    secs(deadline.limit())
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        self.stopped = true;
        // The process is gone, so its stdout is closed or about to be: collect the last lines.
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.remaining().max(Duration::from_millis(100)))
        {
            self.stdout.push(line);
        }
        Ok(Stopped {
            status,
            stdout: std::mem::take(&mut self.stdout),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Child> {
        // A poisoned lock only means a watchdog panicked while holding it; the child is fine.
        self.child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.stopped {
            let mut child = self.lock();
            // Either may fail because the process already exited; then there is nothing to do.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Kills a [`Server`] from another thread. Going through the shared `Child` (not the pid) means
/// a server that has already been reaped is never confused with a new process given its pid.
#[derive(Debug, Clone)]
pub struct Killer {
    child: Arc<Mutex<Child>>,
}

impl Killer {
    pub fn kill(&self) {
        let mut child = self
            .child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = child.kill();
    }
}

/// The peak resident set size of process `pid` so far, in KiB (`VmHWM` in `/proc/PID/status`);
/// `None` if the process is gone or the kernel does not say.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_hwm(&status)
}

/// The `VmHWM:  1234 kB` line of a `/proc/PID/status` text, in KiB.
pub fn parse_vm_hwm(status: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix("VmHWM:")?.trim();
        rest.strip_suffix("kB")?.trim().parse().ok()
    })
}

/// The CPU time process `pid` has used so far, user and system, all its threads together
/// (exited ones included): `utime` + `stime` of `/proc/PID/stat`, in clock ticks of
/// [`clock_ticks_per_sec`]. `None` if the process is gone.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_stat_cpu_ticks(&stat)?;
    Some(Duration::from_secs_f64(
        ticks as f64 / clock_ticks_per_sec() as f64,
    ))
}

/// `utime` + `stime` (fields 14 and 15) of a `/proc/PID/stat` line, in clock ticks. Fields are
/// counted from the last `)`: the command name before it may hold spaces and parentheses.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Field 3 (the state) comes first, so `utime` is the 12th of what follows.
    let mut fields = after_name.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The kernel's clock ticks per second for `/proc` times (`getconf CLK_TCK`), 100 (what Linux
/// uses on every architecture it runs this on) if `getconf` cannot say.
pub fn clock_ticks_per_sec() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// Whether stdout holds our server's `stopped` line.
pub fn printed_stopped(stdout: &[String]) -> bool {
    stdout.iter().any(|line| line.starts_with(STOPPED_PREFIX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_example_executable() {
        let messages = concat!(
            r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"aio"},"executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"kind":["example"],"crate_types":["bin"],"name":"nbd-server"},"executable":"/t/release/examples/nbd-server"}"#,
            "\n",
        );
        assert_eq!(
            artifact_executable(messages, Target::Example, "nbd-server").as_deref(),
            Some("/t/release/examples/nbd-server")
        );
        assert_eq!(artifact_executable(messages, Target::Example, "demo"), None);
    }

    #[test]
    fn generator_is_deterministic_and_not_zero() {
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        Bytes::new(7).fill(&mut a);
        Bytes::new(7).fill(&mut b);
        assert_eq!(a, b);
        assert!(a.iter().filter(|&&byte| byte == 0).count() < 64);
    }

    #[test]
    fn parses_qemu_img_bench_output() {
        let out = "Sending 50000 read requests, 4096 bytes each, 1 in parallel (starting at \
                   offset 0, step size 4096)\nRun completed in 3.968 seconds.\n";
        assert_eq!(parse_bench_elapsed(out), Some(3.968));
        assert_eq!(
            parse_bench_elapsed("Run completed in 0.000 seconds.\n"),
            None
        );
        assert_eq!(parse_bench_elapsed("nothing\n"), None);
    }

    #[test]
    fn reads_cpu_ticks_from_proc_stat_whatever_the_command_name() {
        // Fields 14 and 15 (`utime` 120, `stime` 35) of a line whose command name holds a
        // space and a `)`.
        let line = "4242 (nbd) server) S 1 4242 4242 0 -1 4194560 900 0 0 0 120 35 0 0 20 0 \
                    3 0 1234 100000 500 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(line), Some(155));
        assert_eq!(parse_stat_cpu_ticks("4242 (x) S 1 2 3"), None);
        assert_eq!(parse_stat_cpu_ticks("no name here"), None);
        // Spinning moves this process's reading within a few ticks (5 s allows a loaded machine).
        let before = cpu_time(std::process::id()).unwrap();
        let spin = Instant::now();
        let mut after = before;
        while after <= before && spin.elapsed() < Duration::from_secs(5) {
            std::hint::black_box(spin.elapsed());
            after = cpu_time(std::process::id()).unwrap();
        }
        assert!(after > before, "{before:?} still after 5 s of spinning");
        assert!(clock_ticks_per_sec() > 0);
    }

    #[test]
    fn reads_the_peak_rss_from_proc_status() {
        let status =
            "Name:\tqemu-nbd\nVmPeak:\t  812340 kB\nVmHWM:\t    8140 kB\nVmRSS:\t 8000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(8140));
        assert_eq!(parse_vm_hwm("Name:\tx\nVmRSS:\t1 kB\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\tlots kB\n"), None);
        // This process has a peak RSS, and it is not zero.
        assert!(peak_rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
    }

    #[test]
    fn url_names_the_socket() {
        assert_eq!(
            unix_url(Path::new("/tmp/x.sock")),
            "nbd+unix:///?socket=/tmp/x.sock"
        );
    }
}
