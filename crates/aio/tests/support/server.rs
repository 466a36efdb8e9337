//! The server under test as a child process: finding (or building) the `nbd-server` example,
//! starting it with a command line, waiting for its `ready` line, signalling it, reading its fd
//! count and RSS from `/proc`, and killing it on drop so that a failing test leaves no process
//! behind; optionally started by `systemd-socket-activate` on its Unix socket. Also [`TempDir`], a per-test scratch directory removed on drop, and a way to start
//! `qemu-nbd` with the same settings so the client itself can be checked against a reference
//! server.

use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use super::nbd_client::{Client, Conn, Handshake};

/// How long a server may take to print `ready` (a debug build starting on a loaded CI machine).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// A scratch directory unique to one test in this process, removed with everything in it on
/// drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("aio-nbd-{}-{n}-{tag}", std::process::id()));
        // A leftover from an earlier process with the same pid would only confuse this test.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("creating the test's temp dir");
        TempDir { path }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Creates a sparse image file of `size` bytes (all zeros) and returns its path.
    pub fn image(&self, name: &str, size: u64) -> PathBuf {
        let path = self.join(name);
        let f = std::fs::File::create(&path).expect("creating an image");
        f.set_len(size).expect("sizing an image");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The `nbd-server` example binary, built if it is missing or older than its sources.
///
/// `cargo test`/`cargo nextest` build a package's examples only when they build all of its
/// targets; with `--test nbd` they do not, and the binary may be missing or stale. The test
/// binary lives in `target/<profile>/deps/`, the example in `target/<profile>/examples/`.
pub fn server_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary in target/<profile>/deps");
        let bin = profile_dir.join("examples").join("nbd-server");
        let why = match std::fs::metadata(&bin).and_then(|m| m.modified()) {
            Err(_) => Some("missing"),
            Ok(built) if newest_source() > built => Some("older than its sources"),
            Ok(_) => None,
        };
        if let Some(why) = why {
            build_server(profile_dir, why);
        }
        assert!(
            bin.exists(),
            "{} still missing after the build",
            bin.display()
        );
        bin
    })
}

/// The newest modification time among the sources the example is built from in this crate.
fn newest_source() -> SystemTime {
    fn walk(dir: &Path, newest: &mut SystemTime) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, newest);
            } else if let Ok(t) = entry.metadata().and_then(|m| m.modified()) {
                *newest = (*newest).max(t);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut newest = SystemTime::UNIX_EPOCH;
    walk(&root.join("examples").join("nbd-server"), &mut newest);
    walk(&root.join("src"), &mut newest);
    newest
}

fn build_server(profile_dir: &Path, why: &str) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("profile dir name");
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "-p", "aio", "--example", "nbd-server"]);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    if let Some(target_dir) = profile_dir.parent() {
        cmd.arg("--target-dir").arg(target_dir);
    }
    eprintln!("nbd tests: the nbd-server example is {why}; building it: {cmd:?}");
    let status = cmd.status().expect("running cargo build");
    assert!(
        status.success(),
        "building the nbd-server example failed: {status}"
    );
}

/// What to start the server with.
#[derive(Debug, Clone)]
pub struct Config {
    image: PathBuf,
    name: String,
    read_only: bool,
    contexts: Option<usize>,
    tcp: bool,
    /// What `--tcp` gets when `tcp` is set.
    tcp_addr: String,
    unix: Option<PathBuf>,
    verbose: bool,
    /// More options, put before the image.
    extra: Vec<String>,
    /// Started by `systemd-socket-activate`, which passes the Unix socket as fd 3.
    activated: bool,
    /// Environment variables set (`Some`) or removed (`None`) for the server.
    env: Vec<(String, Option<String>)>,
    /// `--persistent`: on unless a test asks for the server's default, exiting after the last
    /// client (most tests connect one client after another).
    persistent: bool,
    /// `--engine`: the [`engine`] of the thread that made the configuration (empty: no
    /// `--engine`, the server's default).
    engine: &'static str,
    /// `--aio`: the [`io_mode`] of the thread that made the configuration (empty: no `--aio`,
    /// the server's default).
    io: &'static str,
    /// `--cache`: the [`cache_mode`] of the thread that made the configuration (empty: the
    /// server's default).
    cache: &'static str,
}

thread_local! {
    static ENGINE: std::cell::Cell<&'static str> = const { std::cell::Cell::new("callbacks") };
    static IO: std::cell::Cell<&'static str> = const { std::cell::Cell::new("") };
    static CACHE: std::cell::Cell<&'static str> = const { std::cell::Cell::new("") };
}

/// The cache mode (`--cache`) of the servers this thread configures from now on: the
/// server's default unless [`with_io`] says otherwise.
pub fn cache_mode() -> &'static str {
    CACHE.with(|e| e.get())
}

/// The file I/O mode (`--aio`) of the servers this thread configures from now on: the
/// server's default unless [`with_io`] says otherwise.
pub fn io_mode() -> &'static str {
    IO.with(|e| e.get())
}

/// Runs `case` with servers started with `--aio io --cache cache`, naming them if it fails;
/// skips it, saying why, when this kernel refuses the mode (io_uring or Linux AIO disabled).
pub fn with_io(io: &'static str, cache: &'static str, case: fn()) {
    if let Err(why) = io_mode_works(io) {
        println!("skipped with --aio {io}: {why}");
        return;
    }
    let before = (IO.with(|e| e.replace(io)), CACHE.with(|e| e.replace(cache)));
    let outcome = std::panic::catch_unwind(case);
    IO.with(|e| e.set(before.0));
    CACHE.with(|e| e.set(before.1));
    if let Err(panic) = outcome {
        eprintln!("(the case above failed with --aio {io} --cache {cache})");
        std::panic::resume_unwind(panic);
    }
}

/// Whether this kernel serves `--aio io`: the same checks the server makes at start.
#[cfg(not(target_os = "linux"))]
pub fn io_mode_works(io: &str) -> Result<(), String> {
    match io {
        "" | "threads" => Ok(()),
        _ => Err(format!("--aio {io} is Linux-only")),
    }
}

/// Whether this kernel serves `--aio io`: the same checks the server makes at start.
#[cfg(target_os = "linux")]
pub fn io_mode_works(io: &str) -> Result<(), String> {
    let (backend, engine) = match io {
        "io_uring" => (aio::Backend::IoUring, aio::blockio::Engine::IoUring),
        "native" => (aio::Backend::Auto, aio::blockio::Engine::LinuxAio),
        _ => (aio::Backend::Auto, aio::blockio::Engine::Threads),
    };
    let ctx = aio::Builder::new()
        .backend(backend)
        .build()
        .map_err(|e| e.to_string())?;
    aio::BlockIo::with_engine(&ctx, engine)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The connection engine (`--engine`) of the servers this thread configures from now on:
/// `callbacks` unless [`with_engine`] says otherwise.
pub fn engine() -> &'static str {
    ENGINE.with(|e| e.get())
}

/// Runs `case` with servers on `engine`, naming the engine if it fails.
pub fn with_engine(engine: &'static str, case: fn()) {
    let before = ENGINE.with(|e| e.replace(engine));
    let outcome = std::panic::catch_unwind(case);
    ENGINE.with(|e| e.set(before));
    if let Err(panic) = outcome {
        eprintln!("(the case above failed with --engine {engine})");
        std::panic::resume_unwind(panic);
    }
}

impl Config {
    /// Serves `image` on a Unix socket `<image>.sock`, export name `""`.
    pub fn new(image: &Path) -> Config {
        Config {
            image: image.to_owned(),
            name: String::new(),
            read_only: false,
            contexts: None,
            tcp: false,
            tcp_addr: "127.0.0.1:0".to_owned(),
            unix: Some(image.with_extension("sock")),
            verbose: false,
            extra: Vec::new(),
            activated: false,
            env: Vec::new(),
            persistent: true,
            engine: engine(),
            io: io_mode(),
            cache: cache_mode(),
        }
    }

    /// Sets (`Some`) or removes (`None`) an environment variable of the server.
    pub fn env(mut self, key: &str, value: Option<&str>) -> Config {
        self.env.push((key.to_owned(), value.map(str::to_owned)));
        self
    }

    /// Adds options to the command line (before the image).
    pub fn args_extra(mut self, args: &[&str]) -> Config {
        self.extra.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Listens on TCP only, at `addr` as `--tcp` takes it.
    pub fn tcp_at(mut self, addr: &str) -> Config {
        self.tcp_addr = addr.to_owned();
        self.tcp_only()
    }

    /// The server is started by `systemd-socket-activate -l <socket>` (which must be
    /// installed: see [`have_socket_activate`]), without `--unix`.
    pub fn socket_activated(mut self) -> Config {
        assert!(
            self.unix.is_some() && !self.tcp,
            "socket activation on the Unix socket only"
        );
        self.activated = true;
        self
    }

    pub fn name(mut self, name: &str) -> Config {
        self.name = name.to_owned();
        self
    }

    pub fn read_only(mut self) -> Config {
        self.read_only = true;
        self
    }

    pub fn contexts(mut self, n: usize) -> Config {
        self.contexts = Some(n);
        self
    }

    /// Also listens on TCP, on a free port of 127.0.0.1.
    pub fn tcp(mut self) -> Config {
        self.tcp = true;
        self
    }

    /// Listens on TCP only.
    pub fn tcp_only(mut self) -> Config {
        self.tcp = true;
        self.unix = None;
        self
    }

    /// Starts the server without `--persistent`: it exits when the last client that completed
    /// its handshake leaves.
    pub fn exit_after_last_client(mut self) -> Config {
        self.persistent = false;
        self
    }

    /// Starts the server without `--engine`, on its default engine.
    pub fn default_engine(mut self) -> Config {
        self.engine = "";
        self
    }

    pub fn verbose(mut self) -> Config {
        self.verbose = true;
        self
    }

    /// The command line of our server.
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.tcp {
            args.extend(["--tcp".to_owned(), self.tcp_addr.clone()]);
        }
        if let Some(p) = self.unix.as_ref().filter(|_| !self.activated) {
            args.extend(["--unix".to_owned(), p.display().to_string()]);
        }
        args.extend(["--name".to_owned(), self.name.clone()]);
        if self.read_only {
            args.push("--read-only".to_owned());
        }
        if let Some(n) = self.contexts {
            args.extend(["--contexts".to_owned(), n.to_string()]);
        }
        if self.verbose {
            args.push("--verbose".to_owned());
        }
        if self.persistent {
            args.push("--persistent".to_owned());
        }
        if !self.engine.is_empty() {
            args.extend(["--engine".to_owned(), self.engine.to_owned()]);
        }
        if !self.io.is_empty() {
            args.extend(["--aio".to_owned(), self.io.to_owned()]);
        }
        if !self.cache.is_empty() {
            args.extend(["--cache".to_owned(), self.cache.to_owned()]);
        }
        args.extend(self.extra.iter().cloned());
        args.push(self.image.display().to_string());
        args
    }

    pub fn start(&self) -> Server {
        Server::start(self)
    }
}

/// Polls `f` until it returns true or `timeout` passes; returns the last answer.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `tool` can be run; prints the skip reason if not.
pub fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: {tool} not found");
    }
    ok
}

/// Whether `systemd-socket-activate` runs here; prints the skip reason if not.
pub fn have_socket_activate() -> bool {
    let ok = Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: systemd-socket-activate not found");
    }
    ok
}

/// Lines a child printed, collected by a reader thread; `ended` is set when the thread has
/// read to end of file (the child, and everything holding the pipe, has closed it).
#[derive(Debug, Default)]
struct Collected {
    lines: Mutex<(Vec<String>, bool)>,
    ended: std::sync::Condvar,
}

type Lines = Arc<Collected>;

impl Collected {
    fn snapshot(&self) -> Vec<String> {
        self.lines.lock().unwrap().0.clone()
    }

    /// Waits up to `timeout` for the reader to reach end of file, so that a child which has
    /// exited has all its output collected.
    fn wait_ended(&self, timeout: Duration) {
        let guard = self.lines.lock().unwrap();
        let _ = self
            .ended
            .wait_timeout_while(guard, timeout, |(_, ended)| !*ended)
            .unwrap();
    }
}

/// Collects `pipe`'s lines into the returned buffer and, if `tx` is given, forwards each.
fn collect_lines(pipe: impl Read + Send + 'static, tx: Option<mpsc::Sender<String>>) -> Lines {
    let lines: Lines = Arc::default();
    let sink = Arc::clone(&lines);
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            sink.lines.lock().unwrap().0.push(line.clone());
            if let Some(tx) = &tx {
                let _ = tx.send(line);
            }
        }
        sink.lines.lock().unwrap().1 = true;
        sink.ended.notify_all();
    });
    lines
}

/// A running server; killed (SIGKILL) on drop unless it has exited.
#[derive(Debug)]
pub struct Server {
    child: Child,
    /// The export name.
    pub name: String,
    pub tcp: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    stdout: Lines,
    stderr: Lines,
    exited: Option<ExitStatus>,
}

impl Server {
    /// Starts our server and waits for its `ready` line.
    pub fn start(config: &Config) -> Server {
        let mut cmd = if config.activated {
            // It binds the socket, waits for a first connection, then runs the server with the
            // socket as fd 3 and LISTEN_FDS/LISTEN_PID set.
            let mut cmd = Command::new("systemd-socket-activate");
            cmd.arg("-l").arg(config.unix.as_ref().unwrap());
            cmd.arg(server_binary());
            cmd
        } else {
            Command::new(server_binary())
        };
        for (key, value) in &config.env {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        let mut child = cmd
            .args(config.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning nbd-server");
        let (tx, rx) = mpsc::channel();
        let stdout = collect_lines(child.stdout.take().unwrap(), Some(tx));
        let stderr = collect_lines(child.stderr.take().unwrap(), None);
        let mut server = Server {
            child,
            name: config.name.clone(),
            tcp: None,
            unix: None,
            stdout,
            stderr,
            exited: None,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        if config.activated {
            // The connection that makes systemd-socket-activate start the server; the server
            // then finds it closed.
            let path = config.unix.as_ref().unwrap();
            while Conn::connect_unix(path).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "systemd-socket-activate did not listen on {}",
                    path.display()
                );
                thread::sleep(Duration::from_millis(10));
            }
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(e) => panic!(
                    "nbd-server {:?} did not print `nbd-server: ready` ({e:?}); stderr:\n{}",
                    config.args(),
                    server.stderr().join("\n")
                ),
            };
            if let Some(addr) = line.strip_prefix("nbd-server: listening on tcp ") {
                server.tcp = Some(
                    addr.trim()
                        .parse()
                        .expect("tcp address in the listening line"),
                );
            } else if let Some(path) = line.strip_prefix("nbd-server: listening on unix ") {
                server.unix = Some(PathBuf::from(path.trim()));
            } else if line.starts_with("nbd-server: ready") {
                if !config.engine.is_empty() {
                    let engine = format!(", engine {})", config.engine);
                    assert!(line.ends_with(&engine), "not {engine}: {line}");
                }
                if !config.io.is_empty() {
                    let io = format!(", aio {},", config.io);
                    assert!(line.contains(&io), "not {io}: {line}");
                }
                if !config.cache.is_empty() {
                    let cache = format!(", cache {},", config.cache);
                    assert!(line.contains(&cache), "not {cache}: {line}");
                }
                break;
            }
        }
        assert_eq!(server.tcp.is_some(), config.tcp, "tcp listening line");
        assert_eq!(server.unix, config.unix, "unix listening line");
        server
    }

    /// Starts `qemu-nbd` on the same image and socket (TCP on `port` if asked), as a reference
    /// server for the client; `None` if qemu-nbd is not installed.
    pub fn start_qemu_nbd(config: &Config) -> Option<Server> {
        assert!(
            !(config.tcp && config.unix.is_some()),
            "qemu-nbd listens on a Unix socket or on TCP, not both"
        );
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", "raw", "-t", "-e", "64", "-x", &config.name]);
        if let Some(p) = &config.unix {
            cmd.arg("-k").arg(p);
        }
        let tcp = config.tcp.then(|| {
            // qemu-nbd cannot report a port it picked, so pick one here; the tiny window in
            // which another process could take it is acceptable for a reference check.
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        });
        if let Some(addr) = tcp {
            cmd.args(["-b", "127.0.0.1", "-p", &addr.port().to_string()]);
        }
        if config.read_only {
            cmd.arg("-r");
        }
        cmd.arg(&config.image);
        let mut child = match cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => panic!("spawning qemu-nbd: {e}"),
        };
        let stdout = collect_lines(child.stdout.take().unwrap(), None);
        let stderr = collect_lines(child.stderr.take().unwrap(), None);
        let server = Server {
            child,
            name: config.name.clone(),
            tcp,
            unix: config.unix.clone(),
            stdout,
            stderr,
            exited: None,
        };
        // qemu-nbd prints nothing when ready: wait until it accepts a connection.
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while server.raw().is_err() {
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not start listening"
            );
            thread::sleep(Duration::from_millis(10));
        }
        Some(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn unix_path(&self) -> &Path {
        self.unix.as_deref().expect("server has no unix socket")
    }

    /// A raw connection: Unix socket if the server has one, TCP otherwise.
    pub fn raw(&self) -> io::Result<Conn> {
        match (&self.unix, self.tcp) {
            (Some(p), _) => Conn::connect_unix(p),
            (None, Some(a)) => Conn::connect_tcp(a),
            (None, None) => unreachable!("a server listens somewhere"),
        }
    }

    /// A raw connection that has read the greeting and sent the usual client flags.
    pub fn raw_in_options(&self) -> io::Result<Conn> {
        let mut conn = self.raw()?;
        conn.read_greeting()?;
        conn.send_client_flags(3)?;
        Ok(conn)
    }

    /// A client with the given handshake settings.
    pub fn handshake(&self, hs: Handshake) -> io::Result<Client> {
        hs.run(self.raw()?)
    }

    /// A client with the default handshake on the default export name.
    pub fn client(&self) -> Client {
        self.handshake(Handshake::new(&self.name))
            .expect("handshake with the server")
    }

    /// A client with structured replies negotiated.
    pub fn structured_client(&self) -> Client {
        self.handshake(Handshake::new(&self.name).structured_replies())
            .expect("handshake with structured replies")
    }

    /// Sends a signal (`TERM`, `INT`, `KILL`, ...) with kill(1), which keeps the tests free of
    /// unsafe code.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -s {sig} failed");
    }

    /// Whether the server has exited (without waiting).
    pub fn has_exited(&mut self) -> bool {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            self.exited = Some(status);
        }
        self.exited.is_some()
    }

    /// Waits up to `timeout` for the server to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(status);
                // The pipes close with the process, but the readers may not have taken the
                // last lines yet: wait for them, so stdout() after this sees everything.
                self.stdout.wait_ended(Duration::from_secs(5));
                self.stderr.wait_ended(Duration::from_secs(5));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "nbd-server still running {timeout:?} later; stdout:\n{}\nstderr:\n{}",
                self.stdout().join("\n"),
                self.stderr().join("\n")
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything printed on stdout so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.snapshot()
    }

    /// Everything printed on stderr so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.snapshot()
    }

    /// The server's open fds, each as `number -> what it points at` (`12 -> socket:[3006221]`),
    /// in fd order.
    pub fn fd_list(&self) -> Vec<String> {
        let dir = format!("/proc/{}/fd", self.pid());
        let mut fds: Vec<(u32, String)> = std::fs::read_dir(&dir)
            .expect("reading /proc/<pid>/fd")
            .filter_map(|e| {
                let e = e.expect("reading /proc/<pid>/fd");
                let n = e.file_name().to_str()?.parse().ok()?;
                let to = match std::fs::read_link(e.path()) {
                    Ok(to) => to,
                    // An fd closed since the listing has no link left to read.
                    Err(err) if err.kind() == io::ErrorKind::NotFound => return None,
                    Err(err) => panic!("reading {}: {err}", e.path().display()),
                };
                Some((n, to.display().to_string()))
            })
            .collect();
        fds.sort();
        fds.into_iter()
            .map(|(n, to)| format!("{n} -> {to}"))
            .collect()
    }

    /// The server's fds ([`Server::fd_list`]) once two listings 50 ms apart agree: the
    /// baseline a test compares with after its clients have gone, without an fd that was
    /// only passing through at the first look.
    pub fn settled_fds(&self) -> Vec<String> {
        let mut last = self.fd_list();
        for _ in 0..100 {
            thread::sleep(Duration::from_millis(50));
            let now = self.fd_list();
            if now == last {
                return now;
            }
            last = now;
        }
        panic!("the server's fds did not settle in 5 s: {last:?}");
    }

    /// Waits up to `timeout` for the server's fds to be `want` again (the same numbers on the
    /// same files and sockets), panicking with both listings and `what` otherwise.
    pub fn assert_fds_back_to(&self, want: &[String], timeout: Duration, what: &str) {
        if !eventually(timeout, || self.fd_list() == want) {
            panic!(
                "{what}: the server's fds are not back to {want:?} after {timeout:?}: {:?}; \
                 stderr: {:?}",
                self.fd_list(),
                self.stderr()
            );
        }
    }

    /// The resident set size of the server process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The peak resident set size of the server process so far (the kernel's high-water
    /// mark), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("reading /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/<pid>/status"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "--- nbd-server (pid {}) stdout:\n{}\n--- stderr:\n{}",
                self.child.id(),
                self.stdout().join("\n"),
                self.stderr().join("\n")
            );
        }
    }
}
