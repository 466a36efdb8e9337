//! A tour of aio on the default backend: a cross-thread ping-pong between two iothreads, an
//! echo over a socketpair driven by fd handlers, and what `poll()` returns and costs.
//!
//! Run it with `cargo run --release -p aio --example demo` (`cargo xtask demo` is now the tour of
//! the NBD server example). It exits 0 after a few seconds, or non-zero with a message.

use std::cell::{Cell, RefCell};
use std::error::Error;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use aio::{AioContext, BottomHalf, ContextHandle};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const ROUND_TRIPS: u32 = 10_000;
const ECHOES: usize = 1_000;
const SELF_SCHEDULES: u32 = 1_000;

/// Fails the demo with `msg` unless `cond` holds.
fn ensure(cond: bool, msg: impl Into<String>) -> Result<()> {
    if cond { Ok(()) } else { Err(msg.into().into()) }
}

fn main() -> Result<()> {
    // A demo that hangs is worse than one that fails: give up loudly if something is stuck.
    thread::spawn(|| {
        thread::sleep(Duration::from_secs(60));
        eprintln!("demo: FAILED: still running after 60 s");
        std::process::exit(2);
    });
    let ctx = aio::Builder::new().build()?;
    println!("aio demo, backend {}", ctx.backend());
    let pingpong = ping_pong()?;
    let echoes = echo(&ctx)?;
    bottom_halves(&ctx)?;
    println!(
        "demo: ok (backend {}, {ROUND_TRIPS} ping-pongs in {:.2} s, {echoes} echoes verified)",
        ctx.backend(),
        pingpong.as_secs_f64()
    );
    Ok(())
}

/// Starts an event-loop thread, as QEMU's `IOThread`: it owns its context and polls until
/// stopped. Returns the context's handle and the function that stops and joins the thread.
fn iothread(name: &'static str) -> Result<(ContextHandle, impl FnOnce() -> Result<()>)> {
    let (tx, rx) = mpsc::channel();
    let running = Arc::new(AtomicBool::new(true));
    let flag = running.clone();
    let join = thread::Builder::new().name(name.into()).spawn(move || {
        // AioContext is !Send: the thread that polls a context must create it, and only its
        // thread-safe handle travels back to the spawner.
        let ctx = aio::Builder::new().build()?;
        let _ = tx.send(ctx.handle());
        // Relaxed: the flag is cleared by a BH, which runs on this very thread.
        while flag.load(Ordering::Relaxed) {
            ctx.poll();
        }
        let s = ctx.stats();
        let (waits, writes, drains) = (s.waits, s.event_writes, s.event_drains);
        println!("  {name}: {waits} waits, {writes} eventfd writes received, {drains} drains");
        io::Result::Ok(())
    })?;
    // recv fails only if the thread exited before sending, i.e. could not build a context.
    let handle = rx.recv().map_err(|_| "an iothread failed to start")?;
    let remote = handle.clone();
    // QEMU's iothread_stop: a one-shot BH clears the flag on the loop's own thread, so the loop
    // leaves after the iteration that ran it, never in the middle of a callback.
    let stop = move || {
        remote.schedule_oneshot(move || running.store(false, Ordering::Relaxed));
        Ok(join.join().map_err(|_| "an iothread panicked")??)
    };
    Ok((handle, stop))
}

/// One hop of the ping-pong: run `remaining` more hops, alternating between the two contexts.
fn hop(remaining: u32, here: ContextHandle, there: ContextHandle, done: mpsc::Sender<()>) {
    if remaining == 0 {
        let _ = done.send(());
        return;
    }
    let next = there.clone();
    there.schedule_oneshot(move || hop(remaining - 1, next, here, done));
}

/// (a) Two contexts on two threads bounce a one-shot BH back and forth.
fn ping_pong() -> Result<Duration> {
    println!("[1/3] ping-pong: one-shot BHs between two iothreads");
    let ((ping, stop_ping), (pong, stop_pong)) = (iothread("ping")?, iothread("pong")?);
    let writes = || ping.event_writes() + pong.event_writes();
    let (done, finished) = mpsc::channel();
    let (writes_before, start) = (writes(), Instant::now());
    // Main serves the first ball to pong; every hop then runs on the thread it lands on.
    hop(2 * ROUND_TRIPS, ping.clone(), pong.clone(), done);
    let timeout = finished.recv_timeout(Duration::from_secs(30));
    timeout.map_err(|_| "the ping-pong did not finish")?;
    let took = start.elapsed();
    let per_trip = (writes() - writes_before) as f64 / f64::from(ROUND_TRIPS);
    println!(
        "  {ROUND_TRIPS} round trips in {:.2} s: {:.0} round trips/s, {:.1} µs each",
        took.as_secs_f64(),
        f64::from(ROUND_TRIPS) / took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / f64::from(ROUND_TRIPS)
    );
    // A hop writes the peer's eventfd only if the peer sleeps in ppoll (or is about to). A peer
    // still finishing its last iteration sees `notified` instead, at no cost: so at most 2
    // writes per round trip, fewer when the two threads overlap.
    println!("  eventfd writes: {per_trip:.2} per round trip (at most 2: one per sleeping peer)");
    stop_ping()?;
    stop_pong()?;
    Ok(took)
}

/// The bytes of echo message `i`: lengths 1..=512 and contents that differ from one to the next.
fn message(i: usize) -> Vec<u8> {
    (0..1 + i * 7 % 512).map(|j| (i * 31 + j) as u8).collect()
}

/// (b) An echo server and its client as two non-blocking fd handlers on one context.
fn echo(ctx: &AioContext) -> Result<usize> {
    println!("[2/3] echo: {ECHOES} messages over a socketpair, fd handlers on one context");
    let (server, client) = UnixStream::pair()?;
    server.set_nonblocking(true)?;
    client.set_nonblocking(true)?;
    // Each handler owns its socket; the callback reads and writes through a second `Rc`.
    let (server, client) = (Rc::new(server), Rc::new(client));
    let failure = Rc::default();
    let verified = Rc::new(Cell::new(0));

    // Level-triggered: whatever this leaves unread makes it run again on the next iteration.
    let _server = ctx
        .fd_handler(server.clone())
        .on_read(or_park(&failure, move || {
            let mut buf = [0u8; 4096];
            let n = read_some(&server, &mut buf)?;
            (&*server).write_all(&buf[..n])
        }))
        .register()?;

    // The client keeps one message in flight, so a write never meets a full socket buffer.
    (&*client).write_all(&message(0))?;
    let (done, mut reply) = (verified.clone(), Vec::new());
    let _client = ctx
        .fd_handler(client.clone())
        .on_read(or_park(&failure, move || {
            let mut buf = [0u8; 4096];
            let n = read_some(&client, &mut buf)?;
            reply.extend_from_slice(&buf[..n]);
            let i = done.get();
            if reply.len() < message(i).len() {
                return Ok(()); // a stream may split a message: wait for the rest
            }
            if reply != message(i) {
                return Err(io::Error::other(format!("echo {i} came back wrong")));
            }
            reply.clear();
            done.set(i + 1);
            if i + 1 < ECHOES {
                (&*client).write_all(&message(i + 1))?;
            }
            Ok(())
        }))
        .register()?;

    let (start, waits) = (Instant::now(), ctx.stats().waits);
    while verified.get() < ECHOES {
        ctx.poll();
        if let Some(e) = failure.borrow_mut().take() {
            return Err(format!("echo failed: {e}").into());
        }
    }
    let bytes: usize = (0..ECHOES).map(|i| message(i).len()).sum();
    println!(
        "  {ECHOES} echoes ({bytes} bytes) verified byte for byte in {:.1} ms, {} waits",
        start.elapsed().as_secs_f64() * 1e3,
        ctx.stats().waits - waits
    );
    // Dropping the two FdHandlers here unregisters them, so part (c) runs on a bare context.
    Ok(ECHOES)
}

/// Reads what is there; `WouldBlock` (nothing after all) reads as zero bytes.
fn read_some(mut sock: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    match sock.read(buf) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        res => res,
    }
}

/// Handler callbacks return nothing, so this one parks its first error for the loop to return.
fn or_park(
    slot: &Rc<RefCell<Option<io::Error>>>,
    mut f: impl FnMut() -> io::Result<()> + 'static,
) -> impl FnMut(&AioContext) + 'static {
    let slot = slot.clone();
    move |_ctx| {
        if let Err(e) = f() {
            slot.borrow_mut().get_or_insert(e);
        }
    }
}

/// (c) What a blocking `poll()` returns (whether a callback ran) and which system calls it makes.
fn bottom_halves(ctx: &AioContext) -> Result<()> {
    println!("[3/3] bottom halves, progress and notify");
    // A BH that reschedules itself needs its own handle. It drops it on its last run: that
    // deletes the BH and breaks the cycle between the callback and the handle it holds.
    let runs = Arc::new(AtomicU32::new(0));
    let me: Arc<Mutex<Option<BottomHalf>>> = Arc::default();
    let (r, slot) = (runs.clone(), me.clone());
    let bh = ctx.bh(move || {
        let n = r.fetch_add(1, Ordering::Relaxed) + 1;
        if let Ok(mut me) = slot.lock() {
            match me.as_ref() {
                Some(bh) if n < SELF_SCHEDULES => bh.schedule(),
                _ => *me = None,
            }
        }
    });
    bh.schedule();
    *me.lock().map_err(|_| "poisoned")? = Some(bh);
    let (before, mut progress) = (ctx.stats(), 0);
    while runs.load(Ordering::Relaxed) < SELF_SCHEDULES {
        progress += u32::from(ctx.poll());
    }
    let after = ctx.stats();
    ensure(progress == SELF_SCHEDULES, "a BH run is progress")?;
    // Rescheduled from its own callback, the BH runs in the next pass: one run per poll. And
    // a scheduled BH means "do not sleep": no ppoll, no eventfd write, no system call at all.
    let syscalls = (after.waits - before.waits) + (after.event_writes - before.event_writes);
    println!("  self-scheduling BH: {SELF_SCHEDULES} polls returned true, {syscalls} system calls");
    ensure(!ctx.poll_nonblocking(), "freeing a BH is not progress")?;

    // A one-shot from another thread wakes the sleeping loop; running it is progress.
    let ran = Arc::new(AtomicBool::new(false));
    let (remote, flag) = (ctx.handle(), ran.clone());
    let sender = thread::spawn(move || {
        thread::sleep(Duration::from_millis(10));
        remote.schedule_oneshot(move || flag.store(true, Ordering::Relaxed));
    });
    // A late eventfd write may cost one empty iteration (QEMU allows it too): repeat until the
    // BH has run, and insist that exactly the poll that ran it returned true.
    while !ran.load(Ordering::Relaxed) {
        let p = ctx.poll();
        ensure(
            p == ran.load(Ordering::Relaxed),
            "progress means a callback ran",
        )?;
    }
    sender.join().map_err(|_| "the sender thread panicked")?;
    println!("  one-shot BH from another thread: woke poll(), which ran it and returned true");

    // A bare notify wakes the loop but runs no callback, so it is not progress.
    let remote = ctx.handle();
    let notifier = thread::spawn(move || {
        thread::sleep(Duration::from_millis(20));
        remote.notify();
    });
    let (start, p) = (Instant::now(), ctx.poll());
    notifier
        .join()
        .map_err(|_| "the notifier thread panicked")?;
    ensure(!p, "a bare notify is not progress")?;
    let waited = start.elapsed().as_secs_f64() * 1e3;
    println!("  bare notify from another thread: poll() woke after {waited:.1} ms, returned {p}");

    // While the loop is not waiting, notify is a store and a fence: no eventfd write.
    let handle = ctx.handle();
    let writes = handle.event_writes();
    (0..1000).for_each(|_| handle.notify());
    let extra = handle.event_writes() - writes;
    ensure(extra == 0, "notify wrote to a busy loop")?;
    println!("  1000 notifies while the loop is not waiting: {extra} eventfd writes");
    ensure(!ctx.poll_nonblocking(), "a notify is not progress")
}
