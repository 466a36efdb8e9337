//! An NBD server on aio: serves a raw image file to NBD clients (QEMU's `qemu-img`, `qemu-io`,
//! the kernel's `nbd-client`, ...) over TCP and Unix sockets.
//!
//! ```text
//! cargo run --release -p aio --example nbd-server -- --unix /tmp/nbd.sock disk.raw
//! qemu-io -f raw -c 'read -v 0 512' 'nbd+unix:///?socket=/tmp/nbd.sock'
//! ```
//!
//! This file owns the process: the command line, the contexts and their threads, the
//! listeners, and shutdown on SIGINT/SIGTERM. The protocol is in `protocol.rs`, a client's
//! life in `connection.rs`, the image file in `export.rs`.
//!
//! * **Threads.** `--contexts N` runs N contexts: this thread's, which also owns the
//!   listeners and the signals, and N-1 I/O threads, each polling its own context. Accepted
//!   connections are dealt round-robin over all N; a connection lives on one context for its
//!   whole life. Each context has its own thread pool, which runs the file I/O.
//! * **Shutdown.** SIGINT and SIGTERM are blocked in every thread and read from a signalfd that
//!   is an fd handler of this thread's context, so a signal is an ordinary event of the loop.
//!   The listeners close at once; each context then stops reading requests, serves those it
//!   has read, lets the requests in flight complete and their replies go out, and closes its
//!   connections, or closes them anyway after [`GRACE`]. The process exits 0. A second signal
//!   exits at once, with status 1.
//! * **Limits.** See `connection.rs`: at most 32 MiB per request; per connection, 128 requests
//!   and 64 MiB in flight and 16 MiB of unsent replies before its socket stops being read; 10 s
//!   for the handshake.

mod connection;
mod export;
mod protocol;

use std::cell::{Cell, RefCell};
use std::ffi::OsString;
use std::io::{self, Write};
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use aio::{AioContext, ClockType, ContextHandle, FdHandler, Scale};

use connection::{Shard, Socket};
use export::Export;

/// How long shutdown waits for connections to finish their requests before closing them.
const GRACE: Duration = Duration::from_secs(5);
/// How long accepting pauses when the process is out of fds (or memory), instead of spinning
/// on a listener that stays readable.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const USAGE: &str = "\
usage: nbd-server [OPTIONS] IMAGE
  --tcp ADDR       listen on TCP (host:port; port 0 picks a free one)
  --unix PATH      listen on a Unix socket (the socket file is removed at exit)
  --name NAME      export name (default: the empty name)
  --read-only      refuse writes
  --contexts N     number of I/O contexts, one thread each (default 1)
  --verbose        log each connection on stderr
At least one of --tcp and --unix. The backend is the aio default (AIO_BACKEND overrides it).";

#[derive(Debug)]
struct Config {
    image: PathBuf,
    tcp: Option<String>,
    unix: Option<PathBuf>,
    name: String,
    read_only: bool,
    contexts: usize,
    verbose: bool,
}

fn parse_args(mut args: impl Iterator<Item = OsString>) -> Result<Config, String> {
    let mut cfg = Config {
        image: PathBuf::new(),
        tcp: None,
        unix: None,
        name: String::new(),
        read_only: false,
        contexts: 1,
        verbose: false,
    };
    let mut image = None;
    while let Some(arg) = args.next() {
        let arg = arg.into_string().map_err(|a| format!("not UTF-8: {a:?}"))?;
        let mut value = |what: &str| {
            args.next()
                .ok_or_else(|| format!("{arg} needs {what}"))
                .and_then(|v| v.into_string().map_err(|v| format!("not UTF-8: {v:?}")))
        };
        match arg.as_str() {
            "--tcp" => cfg.tcp = Some(value("an address")?),
            "--unix" => cfg.unix = Some(value("a path")?.into()),
            "--name" => cfg.name = value("a name")?,
            "--read-only" => cfg.read_only = true,
            "--contexts" => {
                let n = value("a number")?;
                cfg.contexts = match n.parse() {
                    Ok(n @ 1..=1024) => n,
                    _ => return Err(format!("--contexts takes 1 to 1024, not {n:?}")),
                };
            }
            "--verbose" => cfg.verbose = true,
            "-h" | "--help" => return Err(String::new()),
            a if a.starts_with('-') => return Err(format!("unknown option {a}")),
            _ if image.is_some() => return Err(format!("one image only (got {arg:?} too)")),
            _ => image = Some(PathBuf::from(arg)),
        }
    }
    cfg.image = image.ok_or("no image file given")?;
    if cfg.tcp.is_none() && cfg.unix.is_none() {
        return Err("give --tcp ADDR, --unix PATH or both".into());
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let cfg = match parse_args(std::env::args_os().skip(1)) {
        Ok(cfg) => cfg,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("nbd-server: {msg}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbd-server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cfg: &Config) -> io::Result<()> {
    // First, before any thread exists, so that every thread (I/O threads, pool workers)
    // inherits the blocked mask and the signals reach only the signalfd.
    let signals = Signals::new()?;
    let export = Export::open(&cfg.image, cfg.name.clone(), cfg.read_only)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", cfg.image.display())))?;
    let export = Arc::new(export);
    let ctx = aio::Builder::new().build()?;
    let iothreads = (1..cfg.contexts)
        .map(IoThread::spawn)
        .collect::<io::Result<Vec<_>>>()?;

    let mut listeners = Vec::new();
    if let Some(addr) = &cfg.tcp {
        let l = TcpListener::bind(addr).map_err(|e| with_what(e, addr))?;
        l.set_nonblocking(true)?;
        println!("nbd-server: listening on tcp {}", l.local_addr()?);
        listeners.push(Listener::Tcp(l));
    }
    if let Some(path) = &cfg.unix {
        remove_stale_socket(path)?;
        let l = UnixListener::bind(path).map_err(|e| with_what(e, &path.display()))?;
        l.set_nonblocking(true)?;
        println!("nbd-server: listening on unix {}", path.display());
        listeners.push(Listener::Unix(l));
    }

    let mut targets = vec![None];
    targets.extend(iothreads.iter().map(|t| Some(t.handle.clone())));
    let acceptor = Rc::new(Acceptor {
        listeners: RefCell::new(listeners),
        handlers: RefCell::new(Vec::new()),
        targets,
        next: Cell::new(0),
        export,
        verbose: cfg.verbose,
        unix_path: cfg.unix.clone(),
        resume: Arc::new(AtomicBool::new(false)),
        backoff: RefCell::new(None),
    });
    acceptor.watch(&ctx)?;

    let stopping = Rc::new(Cell::new(None::<&'static str>));
    let (stop, acc) = (stopping.clone(), acceptor.clone());
    let signal_fd = signals.fd.try_clone()?;
    let _signals = ctx
        .fd_handler(&signals.fd)
        .on_read(move |ctx| {
            let Some(name) = Signals::read(&signal_fd) else {
                return;
            };
            if let Some(first) = stop.get() {
                // A request stuck in the kernel (a hung disk) would hold the graceful
                // shutdown for its whole grace period; a second signal is the way out.
                println!("nbd-server: {name} after {first}, exiting at once");
                let _ = io::stdout().flush();
                std::process::exit(1);
            }
            println!("nbd-server: {name}, shutting down");
            stop.set(Some(name));
            acc.close();
            for target in acc.targets.iter().flatten() {
                target.schedule_oneshot(|| {
                    if let Some(ctx) = AioContext::current() {
                        Shard::drain(&ctx, GRACE);
                    }
                });
            }
            Shard::drain(ctx, GRACE);
        })
        .register()?;

    println!(
        "nbd-server: ready (backend {}, {} context{}, export {:?}, {} bytes{})",
        ctx.backend(),
        cfg.contexts,
        if cfg.contexts == 1 { "" } else { "s" },
        cfg.name,
        acceptor.export.size,
        if cfg.read_only { ", read-only" } else { "" }
    );
    io::stdout().flush()?;

    let shard = Shard::of(&ctx);
    while !(stopping.get().is_some() && shard.finished()) {
        ctx.poll();
        if acceptor.resume.swap(false, Ordering::Relaxed) && stopping.get().is_none() {
            acceptor.watch(&ctx)?;
        }
    }
    let (mut accepted, mut requests) = (shard.accepted.get(), shard.requests.get());
    for t in iothreads {
        let (a, r) = t.join()?;
        accepted += a;
        requests += r;
    }
    println!(
        "nbd-server: stopped ({}): {accepted} connections, {requests} requests",
        stopping.get().unwrap_or("?")
    );
    io::stdout().flush()
}

fn with_what(e: io::Error, what: &dyn std::fmt::Display) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// A socket file left by a server that did not exit cleanly would make bind fail; anything
/// else at that path is not ours to remove.
fn remove_stale_socket(path: &std::path::Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        _ => Ok(()),
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Socket> {
        Ok(match self {
            Listener::Tcp(l) => Socket::Tcp(l.accept()?.0),
            Listener::Unix(l) => Socket::Unix(l.accept()?.0),
        })
    }
}

/// Makes an accepted socket ready for its fd handler.
fn prepare(sock: &Socket) -> io::Result<()> {
    match sock {
        Socket::Tcp(s) => {
            s.set_nonblocking(true)?;
            // Replies are complete messages: waiting for more to fill a segment only adds
            // latency (Nagle's delayed ACK interplay would cost 40 ms per small reply).
            s.set_nodelay(true)
        }
        Socket::Unix(s) => s.set_nonblocking(true),
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
    listeners: RefCell<Vec<Listener>>,
    handlers: RefCell<Vec<FdHandler>>,
    /// The contexts connections are dealt to: `None` is this thread's, the others are I/O
    /// threads, reached through their handles.
    targets: Vec<Option<ContextHandle>>,
    next: Cell<usize>,
    export: Arc<Export>,
    verbose: bool,
    unix_path: Option<PathBuf>,
    /// Set by the backoff timer (whose callback must be `Send`); the main loop then watches
    /// the listeners again.
    resume: Arc<AtomicBool>,
    backoff: RefCell<Option<aio::Timer>>,
}

impl Acceptor {
    /// Registers an accept handler for every listener.
    fn watch(self: &Rc<Self>, ctx: &AioContext) -> io::Result<()> {
        let mut handlers = self.handlers.borrow_mut();
        handlers.clear();
        for (i, l) in self.listeners.borrow().iter().enumerate() {
            let me = Rc::downgrade(self);
            let h = ctx.fd_handler(l).on_read(move |ctx| {
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
                    eprintln!(
                        "nbd-server: accept: {e}; pausing for {} ms",
                        ACCEPT_BACKOFF.as_millis()
                    );
                    self.pause(ctx);
                    return;
                }
            };
            if let Err(e) = prepare(&sock) {
                // This one socket is unusable; the listener is fine.
                eprintln!("nbd-server: dropping an accepted connection: {e}");
                continue;
            }
            let n = self.next.get();
            self.next.set((n + 1) % self.targets.len());
            let (export, verbose) = (self.export.clone(), self.verbose);
            match &self.targets[n] {
                None => Shard::start(ctx, sock, export, verbose),
                Some(handle) => handle.schedule_oneshot(move || {
                    if let Some(ctx) = AioContext::current() {
                        Shard::start(&ctx, sock, export, verbose);
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

/// An I/O thread: its own context, polled until shutdown has drained it.
struct IoThread {
    handle: ContextHandle,
    join: JoinHandle<io::Result<(u64, u64)>>,
}

impl IoThread {
    fn spawn(index: usize) -> io::Result<IoThread> {
        let (tx, rx) = mpsc::channel();
        let join = thread::Builder::new()
            .name(format!("nbd-io{index}"))
            .spawn(move || {
                // AioContext is !Send: the thread that polls a context creates it.
                let ctx = match aio::Builder::new().build() {
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
                Ok((shard.accepted.get(), shard.requests.get()))
            })?;
        let handle = rx
            .recv()
            .map_err(|_| io::Error::other("an I/O thread exited before starting"))??;
        Ok(IoThread { handle, join })
    }

    fn join(self) -> io::Result<(u64, u64)> {
        self.join
            .join()
            .map_err(|_| io::Error::other("an I/O thread panicked"))?
    }
}

/// SIGINT and SIGTERM, blocked and read from a signalfd.
struct Signals {
    fd: OwnedFd,
}

impl Signals {
    fn new() -> io::Result<Signals> {
        // sigset_t is plain data that sigemptyset initializes before use.
        // SAFETY: every pointer passed points to a live local for the duration of its call.
        let fd = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if r != 0 {
                return Err(io::Error::from_raw_os_error(r));
            }
            libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Signals { fd })
    }

    /// The name of a pending signal, if one is pending.
    fn read(fd: &OwnedFd) -> Option<&'static str> {
        // SAFETY: signalfd_siginfo is plain data; all zeros is a valid value.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` is a live, writable buffer of `size` bytes; the fd is open.
        let n = unsafe { libc::read(fd.as_raw_fd(), (&raw mut info).cast(), size) };
        if n != size as isize {
            return None;
        }
        Some(match info.ssi_signo as i32 {
            libc::SIGINT => "SIGINT",
            libc::SIGTERM => "SIGTERM",
            _ => "a signal",
        })
    }
}
