//! An aio context inside a `glib::MainLoop` (feature `glib`): a glib timeout and idle source
//! next to an aio fd handler, a sub-millisecond aio timer and an aio task, and another thread
//! waking the sleeping loop with a one-shot BH.
//!
//! Run it with `cargo run -p aio --features glib --example embed_glib` (needs the system GLib:
//! `apt-get install libglib2.0-dev`). It exits 0 once every part has run, or non-zero with a
//! message.

// The glib adapter is Linux-only, like the other adapters; elsewhere this example only says so,
// so that `cargo check --all-targets --all-features` builds on every Unix.
#![cfg_attr(not(target_os = "linux"), allow(unused_imports))]

use std::error::Error;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// What the loop's callbacks saw, from either side.
#[cfg(target_os = "linux")]
#[derive(Debug, Default)]
struct Seen {
    glib_timeout: AtomicBool,
    glib_idle: AtomicBool,
    aio_timer: AtomicBool,
    aio_task: AtomicBool,
    aio_read: AtomicUsize,
    remote_bh: AtomicBool,
}

#[cfg(target_os = "linux")]
impl Seen {
    fn all(&self) -> bool {
        self.glib_timeout.load(Ordering::SeqCst)
            && self.glib_idle.load(Ordering::SeqCst)
            && self.aio_timer.load(Ordering::SeqCst)
            && self.aio_task.load(Ordering::SeqCst)
            && self.aio_read.load(Ordering::SeqCst) == 10
            && self.remote_bh.load(Ordering::SeqCst)
    }
}

#[cfg(not(target_os = "linux"))]
fn main() -> Result<(), Box<dyn Error>> {
    Err("the glib adapter (`aio::glib`) exists on Linux only".into())
}

#[cfg(target_os = "linux")]
fn main() -> Result<(), Box<dyn Error>> {
    let main_context = glib::MainContext::default();
    let main_loop = glib::MainLoop::new(Some(&main_context), false);
    let ctx = aio::Builder::new().build()?;
    println!("aio backend: {}", ctx.backend());
    let source = aio::glib::AioSource::attach(ctx.clone(), &main_context)?;

    let seen = Arc::new(Seen::default());
    // Every callback ends the loop once everything has run.
    let done = {
        let (seen, main_loop) = (seen.clone(), main_loop.clone());
        move || {
            if seen.all() {
                main_loop.quit();
            }
        }
    };

    // glib's native sources.
    let (s, d) = (seen.clone(), done.clone());
    glib::timeout_add_local_once(Duration::from_millis(3), move || {
        s.glib_timeout.store(true, Ordering::SeqCst);
        d();
    });
    let (s, d) = (seen.clone(), done.clone());
    glib::idle_add_local_once(move || {
        s.glib_idle.store(true, Ordering::SeqCst);
        d();
    });

    // aio's: an fd handler, a 700 µs timer, a task, and a BH from another thread.
    let (mut tx, rx) = UnixStream::pair()?;
    rx.set_nonblocking(true)?;
    // The handler owns the socket; the callback reads through a second `Rc`.
    let rx = Rc::new(rx);
    let sock = rx.clone();
    let (s, d) = (seen.clone(), done.clone());
    let _handler = ctx
        .fd_handler(rx)
        .on_read(move |_| {
            let mut buf = [0u8; 64];
            if let Ok(n) = (&*sock).read(&mut buf) {
                s.aio_read.fetch_add(n, Ordering::SeqCst);
                d();
            }
        })
        .register()?;
    let (s, d) = (seen.clone(), done.clone());
    let armed = Instant::now();
    let timer = ctx.timer(aio::ClockType::Realtime, aio::Scale::NS, move || {
        println!("aio timer of 700 µs fired after {:?}", armed.elapsed());
        s.aio_timer.store(true, Ordering::SeqCst);
        d();
    });
    timer.arm_after(Duration::from_micros(700));
    let (s, d) = (seen.clone(), done.clone());
    let _task = ctx.spawn_local(async move {
        s.aio_task.store(true, Ordering::SeqCst);
        d();
    });
    tx.write_all(b"hello glib")?;
    let (s, d, remote) = (seen.clone(), done.clone(), ctx.handle());
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        remote.schedule_oneshot(move || {
            s.remote_bh.store(true, Ordering::SeqCst);
            d();
        });
    });

    // A bound, in case something never runs.
    let (timed_out, quit) = (Arc::new(AtomicBool::new(false)), main_loop.clone());
    let t = timed_out.clone();
    glib::timeout_add_local_once(Duration::from_secs(5), move || {
        t.store(true, Ordering::SeqCst);
        quit.quit();
    });

    let start = Instant::now();
    // glib sleeps until one of its sources, aio's fds or aio's timerfd wakes it.
    main_loop.run();
    if timed_out.load(Ordering::SeqCst) && !seen.all() {
        return Err(format!("timed out: {seen:?}").into());
    }
    println!("all ran after {:?}: {seen:?}", start.elapsed());
    source.detach();
    Ok(())
}
