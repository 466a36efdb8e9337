//! Tests of `aio::tokio` (feature `tokio`): a context driven from a tokio current_thread
//! runtime, mixed with tokio's own sockets and tasks on one thread, on every backend: fd
//! handlers, BHs, timers and aio tasks; idleness without wake-ups; a cross-thread one-shot BH
//! waking the sleeping runtime; level-triggered handlers; nesting; detaching and dropping in
//! every order; and calling into a tokio runtime on another thread from aio callbacks.
#![cfg(all(feature = "tokio", target_os = "linux"))]

use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aio::{AioContext, Backend, ClockType, Scale};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::LocalSet;

#[path = "support/embed.rs"]
mod embed;
use embed::{backends, open_fds, serial};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn tokio_sockets_and_aio_handlers_bhs_timers_tasks_share_one_thread() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let rt = runtime();
        let local = LocalSet::new();
        local.block_on(&rt, async {
            let driver = tokio::task::spawn_local(aio::tokio::drive(ctx.clone()));
            let thread = std::thread::current().id();

            // tokio's own sockets: an echo task.
            let (mut a, mut b) = tokio::net::UnixStream::pair().unwrap();
            tokio::task::spawn_local(async move {
                let mut buf = [0u8; 64];
                let n = b.read(&mut buf).await.unwrap();
                b.write_all(&buf[..n]).await.unwrap();
            });

            // An aio fd handler on a std socket pair.
            let (mut c, d) = StdUnixStream::pair().unwrap();
            d.set_nonblocking(true).unwrap();
            let got = Rc::new(Cell::new(0usize));
            let (g, mut sock) = (got.clone(), d.try_clone().unwrap());
            let _h = ctx
                .fd_handler(&d)
                .on_read(move |_| {
                    assert_eq!(std::thread::current().id(), thread);
                    let mut buf = [0u8; 64];
                    if let Ok(n) = sock.read(&mut buf) {
                        g.set(g.get() + n);
                    }
                })
                .register()
                .unwrap();

            // A BH, a timer and a task that awaits a tokio timer.
            let bh_ran = Arc::new(AtomicBool::new(false));
            let r = bh_ran.clone();
            ctx.schedule_oneshot(move || r.store(true, Ordering::SeqCst));
            let fired = Arc::new(AtomicBool::new(false));
            let f = fired.clone();
            let timer = ctx.timer(ClockType::Realtime, Scale::NS, move || {
                f.store(true, Ordering::SeqCst)
            });
            let armed = Instant::now();
            timer.arm_after(Duration::from_millis(5));
            let task = ctx.spawn_local(async {
                tokio::time::sleep(Duration::from_millis(2)).await;
                7
            });

            c.write_all(b"hello").unwrap();
            a.write_all(b"ping").await.unwrap();
            let mut echo = [0u8; 4];
            a.read_exact(&mut echo).await.unwrap();
            assert_eq!(&echo, b"ping");

            let deadline = Instant::now() + Duration::from_secs(5);
            while (got.get() < 5 || !fired.load(Ordering::SeqCst) || !task.is_finished())
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert_eq!(got.get(), 5, "{backend:?}: the aio handler read everything");
            assert!(bh_ran.load(Ordering::SeqCst), "{backend:?}: BH");
            assert!(fired.load(Ordering::SeqCst), "{backend:?}: timer");
            assert!(armed.elapsed() >= Duration::from_millis(5), "timer early");
            assert!(task.is_finished(), "{backend:?}: task");
            assert_eq!(ctx.block_on(task).unwrap(), 7);
            driver.abort();
        });
    }
}

#[test]
fn idle_driver_makes_no_wakeups() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let rt = runtime();
        let local = LocalSet::new();
        local.block_on(&rt, async {
            let driver = tokio::task::spawn_local(aio::tokio::drive(ctx.clone()));
            // Let it settle (first iterations, io_uring's outer-loop NOP).
            tokio::time::sleep(Duration::from_millis(30)).await;
            let before = ctx.stats();
            tokio::time::sleep(Duration::from_millis(200)).await;
            let after = ctx.stats();
            assert_eq!(
                after.waits - before.waits,
                0,
                "{backend:?}: the idle driver iterated"
            );
            assert_eq!(after.event_drains, before.event_drains, "{backend:?}");
            driver.abort();
        });
    }
}

#[test]
fn remote_oneshot_wakes_the_sleeping_runtime() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let rt = runtime();
        let local = LocalSet::new();
        local.block_on(&rt, async {
            let driver = tokio::task::spawn_local(aio::tokio::drive(ctx.clone()));
            tokio::time::sleep(Duration::from_millis(10)).await;
            let remote = ctx.handle();
            let ran = Arc::new(AtomicBool::new(false));
            let r = ran.clone();
            let start = Instant::now();
            let t = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                remote.schedule_oneshot(move || r.store(true, Ordering::SeqCst));
            });
            // tokio sleeps between looks at the flag; the BH itself runs only if the driver's
            // fd woke tokio (the next test has no tokio timer at all).
            let deadline = start + Duration::from_secs(5);
            while !ran.load(Ordering::SeqCst) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            t.join().unwrap();
            assert!(ran.load(Ordering::SeqCst), "{backend:?}: the BH never ran");
            assert!(start.elapsed() < Duration::from_secs(2), "{backend:?}");
            driver.abort();
        });
    }
}

#[test]
fn remote_oneshot_wakes_a_runtime_with_nothing_else_to_do() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let rt = runtime();
        let local = LocalSet::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<Instant>();
        let remote = ctx.handle();
        let start = Instant::now();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            remote.schedule_oneshot(move || tx.send(Instant::now()).unwrap());
        });
        // The runtime's only other work is awaiting the channel the BH feeds: it sleeps in
        // epoll until the driver's fd wakes it.
        let at = local.block_on(&rt, async {
            let driver = tokio::task::spawn_local(aio::tokio::drive(ctx.clone()));
            let at = tokio::time::timeout(Duration::from_secs(5), rx).await;
            driver.abort();
            at
        });
        t.join().unwrap();
        let at = at.expect("timed out").unwrap();
        assert!(at - start >= Duration::from_millis(50), "{backend:?}");
        assert!(at - start < Duration::from_secs(2), "{backend:?}");
    }
}

#[test]
fn a_handler_that_leaves_data_unread_is_called_again() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let rt = runtime();
        let local = LocalSet::new();
        local.block_on(&rt, async {
            let driver = tokio::task::spawn_local(aio::tokio::drive(ctx.clone()));
            let (mut c, d) = StdUnixStream::pair().unwrap();
            d.set_nonblocking(true).unwrap();
            let got = Rc::new(Cell::new(0usize));
            let (g, mut sock) = (got.clone(), d.try_clone().unwrap());
            // One byte per call: level-triggered semantics must call it ten times.
            let _h = ctx
                .fd_handler(&d)
                .on_read(move |_| {
                    let mut buf = [0u8; 1];
                    if let Ok(1) = sock.read(&mut buf) {
                        g.set(g.get() + 1);
                    }
                })
                .register()
                .unwrap();
            c.write_all(&[7u8; 10]).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while got.get() < 10 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert_eq!(got.get(), 10, "{backend:?}");
            driver.abort();
        });
    }
}

#[test]
fn handlers_registered_while_driven_are_watched() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let rt = runtime();
        let local = LocalSet::new();
        local.block_on(&rt, async {
            let driver = tokio::task::spawn_local(aio::tokio::drive(ctx.clone()));
            tokio::time::sleep(Duration::from_millis(10)).await;
            // Registered while the driver sleeps; written from another thread only.
            let mut handlers = Vec::new();
            let mut writers = Vec::new();
            let hits = Rc::new(Cell::new(0usize));
            for _ in 0..3 {
                let (c, d) = StdUnixStream::pair().unwrap();
                d.set_nonblocking(true).unwrap();
                let (h, mut sock) = (hits.clone(), d.try_clone().unwrap());
                handlers.push((
                    ctx.fd_handler(&d)
                        .on_read(move |_| {
                            let mut buf = [0u8; 8];
                            if let Ok(n) = sock.read(&mut buf) {
                                h.set(h.get() + n);
                            }
                        })
                        .register()
                        .unwrap(),
                    d,
                ));
                writers.push(c);
            }
            let t = std::thread::spawn(move || {
                for mut w in writers {
                    std::thread::sleep(Duration::from_millis(20));
                    w.write_all(b"x").unwrap();
                }
            });
            let deadline = Instant::now() + Duration::from_secs(5);
            while hits.get() < 3 && Instant::now() < deadline {
                // A long sleep: only fd wake-ups of the driver make progress meanwhile.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            t.join().unwrap();
            assert_eq!(hits.get(), 3, "{backend:?}");
            // Removing them all and closing the fds changes the set again.
            drop(handlers);
            let bh_ran = Arc::new(AtomicBool::new(false));
            let r = bh_ran.clone();
            ctx.handle()
                .schedule_oneshot(move || r.store(true, Ordering::SeqCst));
            while !bh_ran.load(Ordering::SeqCst) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert!(bh_ran.load(Ordering::SeqCst), "{backend:?}");
            driver.abort();
        });
    }
}

#[test]
fn a_callback_may_poll_the_context_directly() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let rt = runtime();
        let local = LocalSet::new();
        local.block_on(&rt, async {
            let driver = tokio::task::spawn_local(aio::tokio::drive(ctx.clone()));
            let inner_ran = Arc::new(AtomicBool::new(false));
            let outer_done = Arc::new(AtomicBool::new(false));
            let (i, o) = (inner_ran.clone(), outer_done.clone());
            let inner = ctx.bh(move || i.store(true, Ordering::SeqCst));
            // The outer BH waits, nested, for a BH it schedules and for an aio timer.
            ctx.schedule_oneshot(move || {
                let c2 = AioContext::current().expect("inside a callback");
                inner.schedule();
                let fired = Arc::new(AtomicBool::new(false));
                let f = fired.clone();
                let t = c2.timer(ClockType::Realtime, Scale::NS, move || {
                    f.store(true, Ordering::SeqCst)
                });
                t.arm_after(Duration::from_millis(2));
                let i = inner_ran.clone();
                c2.wait_while(|| !i.load(Ordering::SeqCst) || !fired.load(Ordering::SeqCst));
                o.store(true, Ordering::SeqCst);
            });
            let deadline = Instant::now() + Duration::from_secs(5);
            while !outer_done.load(Ordering::SeqCst) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert!(outer_done.load(Ordering::SeqCst), "{backend:?}");
            // The driver still works after the nested loop.
            let again = Arc::new(AtomicBool::new(false));
            let a = again.clone();
            ctx.handle()
                .schedule_oneshot(move || a.store(true, Ordering::SeqCst));
            while !again.load(Ordering::SeqCst) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert!(again.load(Ordering::SeqCst), "{backend:?}");
            driver.abort();
        });
    }
}

/// Detaching (dropping the driver), dropping the context's last other clone, and dropping the
/// runtime, in every order: no callback runs from a detached driver, the context keeps
/// working under its own loop, and no fd is left open.
#[test]
fn detach_and_drop_in_every_order_leak_nothing() {
    let _s = serial();
    let base = open_fds();
    for round in 0..3 {
        for backend in [Backend::Poll, Backend::Epoll, Backend::IoUring] {
            let Ok(ctx) = aio::Builder::new().backend(backend).build() else {
                continue;
            };
            let rt = runtime();
            let local = LocalSet::new();
            let ran = Arc::new(AtomicBool::new(false));
            match round {
                // Detach first, then the context runs its own loop, then drop it.
                0 => {
                    local.block_on(&rt, async {
                        let driver = tokio::task::spawn_local(aio::tokio::drive(ctx.clone()));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        driver.abort();
                        let _ = driver.await;
                        // The detach closed the outer loop's window: with nobody waiting, a
                        // remote schedule does not write the eventfd.
                        let writes = ctx.stats().event_writes;
                        let (r, remote) = (ran.clone(), ctx.handle());
                        std::thread::spawn(move || {
                            remote.schedule_oneshot(move || r.store(true, Ordering::SeqCst))
                        })
                        .join()
                        .unwrap();
                        assert_eq!(ctx.stats().event_writes, writes, "{backend:?}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        assert!(!ran.load(Ordering::SeqCst), "ran after detach");
                    });
                    while !ran.load(Ordering::SeqCst) {
                        ctx.poll();
                    }
                    drop(ctx);
                }
                // Drop our clone first: the driver keeps the context; then detach.
                1 => {
                    let remote = ctx.handle();
                    local.block_on(&rt, async {
                        let driver = tokio::task::spawn_local(aio::tokio::drive(ctx));
                        let r = ran.clone();
                        remote.schedule_oneshot(move || r.store(true, Ordering::SeqCst));
                        while !ran.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        driver.abort();
                        let _ = driver.await;
                    });
                    // The context is gone with the driver: a late BH is dropped, not run.
                    let late = Arc::new(AtomicBool::new(false));
                    let l = late.clone();
                    remote.schedule_oneshot(move || l.store(true, Ordering::SeqCst));
                    assert!(!late.load(Ordering::SeqCst));
                }
                // Drop the runtime (and with it the spawned driver) while the driver sleeps.
                _ => {
                    local.spawn_local(aio::tokio::drive(ctx.clone()));
                    local.block_on(&rt, async {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    });
                    drop(local);
                    drop(rt);
                    let r = ran.clone();
                    ctx.handle()
                        .schedule_oneshot(move || r.store(true, Ordering::SeqCst));
                    while !ran.load(Ordering::SeqCst) {
                        ctx.poll();
                    }
                    drop(ctx);
                    continue;
                }
            }
            drop(local);
            drop(rt);
        }
    }
    assert_eq!(open_fds(), base, "fds leaked");
}

/// The other direction: a context running its own loop calls into a tokio runtime on another
/// thread, from a BH (waiting with `block_on`) and from an aio task (awaiting).
#[test]
fn aio_callbacks_use_a_tokio_runtime_on_another_thread() {
    let _s = serial();
    let rt = runtime();
    let handle = rt.handle().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let tokio_thread = std::thread::spawn(move || {
        rt.block_on(async {
            let _ = stop_rx.await;
        })
    });
    let ctx = aio::new_context().unwrap();
    let got = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (g, h) = (got.clone(), handle.clone());
    let bh = ctx.bh(move || {
        let c2 = AioContext::current().expect("inside a callback");
        let v = c2
            .block_on(aio::tokio::spawn_on(&h, async {
                tokio::time::sleep(Duration::from_millis(2)).await;
                40
            }))
            .unwrap();
        g.fetch_add(v, Ordering::SeqCst);
    });
    bh.schedule();
    let task = ctx.spawn_local(async move {
        let (mut a, mut b) =
            aio::tokio::spawn_on(&handle, async { tokio::net::UnixStream::pair() })
                .await
                .unwrap()
                .unwrap();
        aio::tokio::spawn_on(&handle, async move {
            a.write_all(b"ok").await.unwrap();
            let mut buf = [0u8; 2];
            b.read_exact(&mut buf).await.unwrap();
            buf
        })
        .await
        .unwrap()
    });
    assert_eq!(&ctx.block_on(task).unwrap(), b"ok");
    while got.load(Ordering::SeqCst) == 0 {
        ctx.poll();
    }
    assert_eq!(got.load(Ordering::SeqCst), 40);
    stop_tx.send(()).unwrap();
    tokio_thread.join().unwrap();
}

/// A poll context that moves to epoll (at `EPOLL_UPGRADE_THRESHOLD` fds) while driven: the outer
/// fds change from every watched fd to the epoll fd, and the driver follows.
#[test]
#[cfg(feature = "epoll")] // without it, poll+epoll is plain poll and never moves
fn the_driver_follows_a_move_from_poll_to_epoll() {
    let _s = serial();
    let Ok(ctx) = aio::Builder::new().backend(Backend::PollThenEpoll).build() else {
        println!("skipping: no poll+epoll");
        return;
    };
    let rt = runtime();
    let local = LocalSet::new();
    local.block_on(&rt, async {
        let driver = tokio::task::spawn_local(aio::tokio::drive(ctx.clone()));
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(ctx.backend(), "poll");
        let hits = Rc::new(Cell::new(0usize));
        let mut keep = Vec::new();
        let mut writers = Vec::new();
        for _ in 0..aio::EPOLL_UPGRADE_THRESHOLD + 2 {
            let (c, d) = StdUnixStream::pair().unwrap();
            d.set_nonblocking(true).unwrap();
            let (h, mut sock) = (hits.clone(), d.try_clone().unwrap());
            let handler = ctx
                .fd_handler(&d)
                .on_read(move |_| {
                    let mut buf = [0u8; 8];
                    if let Ok(n) = sock.read(&mut buf) {
                        h.set(h.get() + n);
                    }
                })
                .register()
                .unwrap();
            keep.push((handler, d));
            writers.push(c);
        }
        assert_eq!(ctx.backend(), "epoll", "the context moved to epoll");
        let n = writers.len();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            for mut w in writers {
                w.write_all(b"x").unwrap();
            }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while hits.get() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        t.join().unwrap();
        assert_eq!(hits.get(), n);
        driver.abort();
    });
}
