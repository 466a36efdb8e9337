//! What the adapter tests (`embed_tokio.rs`, `embed_calloop.rs`, `embed_glib.rs`) share:
//! serialization (their fd-leak checks count the process's open fds), the loop over a context
//! on each backend the kernel accepts, the every-order drop loop with its fd-leak check,
//! one-shot flags, an aio timer that sets one, a socket pair with a counting read handler,
//! scheduling from another thread, the check after a detach (no eventfd write, no run through
//! the outer loop, a run under the context's own loop), the nested wait for a BH and a timer
//! from inside a callback, running the context's own loop until a condition holds, and a read
//! submitted on an io_uring context's own ring.
// Each test binary uses its own part of this file.
#![allow(dead_code)]

use std::cell::Cell;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use aio::{AioContext, Backend, ClockType, FdHandler, Scale, Timer};

/// The backends every test tries, in order.
pub const BACKENDS: [Backend; 3] = [Backend::Poll, Backend::Epoll, Backend::IoUring];

/// Serializes the tests: the fd-leak checks count the process's open fds.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A context on each backend that builds here (the others are skipped with the reason).
pub fn backends() -> Vec<(Backend, AioContext)> {
    let mut out = Vec::new();
    for b in BACKENDS {
        match aio::Builder::new().backend(b).build() {
            Ok(ctx) => out.push((b, ctx)),
            Err(e) => println!("skipping {b:?}: {e}"),
        }
    }
    out
}

/// Runs `test` once per backend that builds here, serialized with the other tests.
pub fn each_backend(mut test: impl FnMut(Backend, AioContext)) {
    let _s = serial();
    for (backend, ctx) in backends() {
        test(backend, ctx);
    }
}

/// How many fds the process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The drop-order check: `round(r, backend, ctx)` for each `r` in `0..rounds` on a fresh
/// context of each backend that builds, then no more fds open than before the first round.
/// The caller holds [`serial`] (and warms up whatever opens fds of its own on first use).
pub fn every_order_leaks_nothing(rounds: u32, mut round: impl FnMut(u32, Backend, AioContext)) {
    let base = open_fds();
    for r in 0..rounds {
        for backend in BACKENDS {
            let Ok(ctx) = aio::Builder::new().backend(backend).build() else {
                continue;
            };
            round(r, backend, ctx);
        }
    }
    assert_eq!(open_fds(), base, "fds leaked");
}

/// A flag that a callback on any thread sets once.
#[derive(Clone, Default)]
pub struct Flag(Arc<AtomicBool>);

impl Flag {
    pub fn new() -> Flag {
        Flag::default()
    }

    /// A callback that sets the flag.
    pub fn setter(&self) -> impl FnOnce() + Send + 'static {
        let f = self.0.clone();
        move || f.store(true, Ordering::SeqCst)
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A REALTIME nanosecond timer on `ctx`, not armed, that sets the returned flag when it fires.
pub fn flag_timer(ctx: &AioContext) -> (Flag, Timer) {
    let fired = Flag::new();
    let f = fired.clone();
    let timer = ctx.timer(ClockType::Realtime, Scale::NS, move || {
        f.0.store(true, Ordering::SeqCst)
    });
    (fired, timer)
}

/// A socket pair whose read end (non-blocking) is watched by an aio read handler on `ctx`,
/// which reads up to `chunk` bytes a call, adds what it read to `got`, and first calls `check`.
/// Returns the write end and the handler, which owns the read end (dropping it closes the
/// read end).
pub fn watched_pair(
    ctx: &AioContext,
    chunk: usize,
    got: &Rc<Cell<usize>>,
    check: impl Fn() + 'static,
) -> (UnixStream, FdHandler) {
    let (c, d) = UnixStream::pair().unwrap();
    d.set_nonblocking(true).unwrap();
    let d = Rc::new(d);
    let (g, sock) = (got.clone(), d.clone());
    let h = ctx
        .fd_handler(d)
        .on_read(move |_| {
            check();
            let mut buf = [0u8; 64];
            if let Ok(n) = (&*sock).read(&mut buf[..chunk]) {
                g.set(g.get() + n);
            }
        })
        .register()
        .unwrap();
    (c, h)
}

/// Schedules `f` as a one-shot BH on `ctx` from another thread, after `delay`.
pub fn schedule_from_thread(
    ctx: &AioContext,
    delay: Duration,
    f: impl FnOnce() + Send + 'static,
) -> thread::JoinHandle<()> {
    let remote = ctx.handle();
    thread::spawn(move || {
        thread::sleep(delay);
        remote.schedule_oneshot(f);
    })
}

/// After the outer loop let go of `ctx` (its window closed, nobody waiting): a one-shot BH
/// scheduled from another thread does not write the context's eventfd, `outer_turn` (a turn of
/// the outer loop) does not run it (else the test fails saying `ran`), and the context's own
/// loop does.
pub fn detached_then_own_loop(
    ctx: &AioContext,
    backend: Backend,
    ran: &str,
    outer_turn: impl FnOnce(),
) {
    let flag = Flag::new();
    let writes = ctx.stats().event_writes;
    schedule_from_thread(ctx, Duration::ZERO, flag.setter())
        .join()
        .unwrap();
    assert_eq!(ctx.stats().event_writes, writes, "{backend:?}");
    outer_turn();
    assert!(!flag.get(), "{ran}");
    poll_until(ctx, || flag.get());
}

/// From inside a callback: `start()` (which makes `ran` true from a BH), arms a 2 ms aio timer,
/// and waits, nested in the context's own loop, for both.
pub fn wait_nested_for_bh_and_timer(
    ctx: &AioContext,
    start: impl FnOnce(),
    ran: impl Fn() -> bool,
) {
    start();
    let (fired, t) = flag_timer(ctx);
    t.arm_after(Duration::from_millis(2));
    ctx.wait_while(|| !ran() || !fired.get());
}

/// From inside a callback: schedules a one-shot BH that adds one to `count`, arms a 2 ms aio
/// timer, and waits, nested in the context's own loop, for both.
pub fn wait_nested_for_oneshot_and_timer(ctx: &AioContext, count: &Arc<AtomicU32>) {
    let c = count.clone();
    wait_nested_for_bh_and_timer(
        ctx,
        || {
            ctx.schedule_oneshot(move || {
                c.fetch_add(1, Ordering::SeqCst);
            })
        },
        || count.load(Ordering::SeqCst) != 0,
    );
}

/// Runs the context's own loop until `done`.
pub fn poll_until(ctx: &AioContext, done: impl Fn() -> bool) {
    while !done() {
        ctx.poll();
    }
}

/// Where a read's callback puts its result and buffer.
pub type ReadSlot = Rc<std::cell::RefCell<Option<(std::io::Result<usize>, Vec<u8>)>>>;

/// A context on the io_uring backend with a read of the 3 bytes of a file holding `xyz`
/// submitted on its own ring (`BlockIo`), and where the read's callback puts its result;
/// `None`, printed, where io_uring is unavailable.
pub fn ring_read(tag: &str) -> Option<(AioContext, ReadSlot)> {
    let ctx = match aio::Builder::new()
        .backend(Backend::IoUring)
        .ignore_env()
        .build()
    {
        Ok(ctx) => ctx,
        Err(e) => {
            println!("skipped: no io_uring context here: {e}");
            return None;
        }
    };
    let path = std::env::temp_dir().join(format!("aio-{tag}-ring-{}", std::process::id()));
    std::fs::write(&path, b"xyz").unwrap();
    let file = Arc::new(std::fs::File::open(&path).unwrap());
    std::fs::remove_file(&path).unwrap();
    let got: ReadSlot = Rc::default();
    let g = got.clone();
    aio::BlockIo::of(&ctx).read_at(&ctx, &file, vec![0; 3], 0, move |r, buf| {
        *g.borrow_mut() = Some((r, buf))
    });
    Some((ctx, got))
}

/// Checks that the read of [`ring_read`] completed with its 3 bytes.
pub fn assert_ring_read(got: &ReadSlot) {
    let (r, buf) = got.borrow_mut().take().expect("the read never completed");
    assert_eq!(r.unwrap(), 3);
    assert_eq!(buf, b"xyz");
}
