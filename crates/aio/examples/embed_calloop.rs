//! An aio context inside a calloop event loop (feature `calloop`): a calloop ping and timer
//! next to an aio fd handler, timer and BH, and another thread waking the sleeping loop.
//!
//! Run it with `cargo run -p aio --features calloop --example embed_calloop`. It exits 0 once
//! every part has run, or non-zero with a message.

// The calloop adapter is Linux-only (its outer fd is an epoll set); elsewhere this example only
// says so, so that `cargo check --all-targets --all-features` builds on every Unix.
#![cfg_attr(not(target_os = "linux"), allow(unused_imports))]

use std::error::Error;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[cfg(target_os = "linux")]
use aio::calloop::AioSource;
use aio::{ClockType, Scale};
use calloop::EventLoop;
use calloop::timer::{TimeoutAction, Timer};

/// What the loop's callbacks saw: calloop's shared data.
#[cfg(target_os = "linux")]
#[derive(Debug, Default)]
struct State {
    pings: u32,
    calloop_timer: bool,
    aio_dispatches: u32,
    aio_read: usize,
}

#[cfg(not(target_os = "linux"))]
fn main() -> Result<(), Box<dyn Error>> {
    Err("the calloop adapter (`aio::calloop`) exists on Linux only".into())
}

#[cfg(target_os = "linux")]
fn main() -> Result<(), Box<dyn Error>> {
    let mut event_loop: EventLoop<State> = EventLoop::try_new()?;
    let handle = event_loop.handle();
    let ctx = aio::Builder::new().build()?;
    println!("aio backend: {}", ctx.backend());
    handle.insert_source(AioSource::new(ctx.clone())?, |progress, _ctx, state| {
        state.aio_dispatches += u32::from(progress);
    })?;

    // calloop's native sources.
    let (ping, ping_source) = calloop::ping::make_ping()?;
    handle.insert_source(ping_source, |_, _, state| state.pings += 1)?;
    handle.insert_source(
        Timer::from_duration(Duration::from_millis(5)),
        |_, _, state| {
            state.calloop_timer = true;
            TimeoutAction::Drop
        },
    )?;

    // aio's: an fd handler, a timer, and a BH from another thread, which also pings.
    let (mut tx, rx) = UnixStream::pair()?;
    rx.set_nonblocking(true)?;
    // The handler owns the socket; the callback reads through a second `Rc`.
    let rx = Rc::new(rx);
    let sock = rx.clone();
    let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let r = read.clone();
    let _handler = ctx
        .fd_handler(rx)
        .on_read(move |_| {
            let mut buf = [0u8; 64];
            if let Ok(n) = (&*sock).read(&mut buf) {
                r.fetch_add(n, Ordering::SeqCst);
            }
        })
        .register()?;
    let fired = Arc::new(AtomicBool::new(false));
    let f = fired.clone();
    let timer = ctx.timer(ClockType::Realtime, Scale::NS, move || {
        f.store(true, Ordering::SeqCst)
    });
    timer.arm_after(Duration::from_micros(2500));
    tx.write_all(b"hello calloop")?;
    let woke = Arc::new(AtomicBool::new(false));
    let (w, remote) = (woke.clone(), ctx.handle());
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        ping.ping();
        remote.schedule_oneshot(move || w.store(true, Ordering::SeqCst));
    });

    let mut state = State::default();
    let start = Instant::now();
    while !(state.pings > 0
        && state.calloop_timer
        && fired.load(Ordering::SeqCst)
        && woke.load(Ordering::SeqCst)
        && read.load(Ordering::SeqCst) == 13)
    {
        if start.elapsed() > Duration::from_secs(5) {
            return Err(format!("timed out: {state:?}").into());
        }
        // No timeout: calloop sleeps until a source, aio's timerfd or aio's fds wake it.
        event_loop.dispatch(None, &mut state)?;
    }
    state.aio_read = read.load(Ordering::SeqCst);
    println!("all ran after {:?}: {state:?}", start.elapsed());
    Ok(())
}
