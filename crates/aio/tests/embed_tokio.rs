//! Tests of `aio::tokio` (feature `tokio`): a context driven from a tokio current_thread
//! runtime, mixed with tokio's own sockets and tasks on one thread, on every backend: fd
//! handlers, BHs, timers and aio tasks; idleness without wake-ups; a cross-thread one-shot BH
//! waking the sleeping runtime; level-triggered handlers; nesting; detaching and dropping in
//! every order; calling into a tokio runtime on another thread from aio callbacks; and a read on
//! the context's own io_uring ring.
#![cfg(all(feature = "tokio", target_os = "linux"))]

use std::cell::Cell;
use std::future::Future;
use std::io::Write;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use aio::{AioContext, Backend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::LocalSet;

#[path = "support/embed.rs"]
mod embed;
use embed::{
    Flag, detached_then_own_loop, each_backend, every_order_leaks_nothing, flag_timer, poll_until,
    schedule_from_thread, serial, wait_nested_for_bh_and_timer, watched_pair,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `body` in a `LocalSet` on a fresh current_thread runtime, with `ctx` driven by a task
/// spawned first and aborted after `body`.
fn driven<T>(ctx: &AioContext, body: impl Future<Output = T>) -> T {
    let rt = runtime();
    let local = LocalSet::new();
    local.block_on(&rt, async {
        let driver = tokio::task::spawn_local(aio::tokio::drive(ctx.clone()));
        let out = body.await;
        driver.abort();
        out
    })
}

/// Sleeps `step` at a time until `done` or past `deadline`.
async fn sleep_until(deadline: Instant, step: Duration, done: impl Fn() -> bool) {
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(step).await;
    }
}

/// A one-shot BH scheduled through the context's handle runs under the driver by `deadline`.
async fn a_remote_oneshot_runs(ctx: &AioContext, backend: Backend, deadline: Instant) {
    let ran = Flag::new();
    ctx.handle().schedule_oneshot(ran.setter());
    sleep_until(deadline, Duration::from_millis(1), || ran.get()).await;
    assert!(ran.get(), "{backend:?}");
}

/// Five seconds from now: how long a test waits for what should take milliseconds.
fn in_5s() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

#[test]
fn tokio_sockets_and_aio_handlers_bhs_timers_tasks_share_one_thread() {
    each_backend(|backend, ctx| {
        driven(&ctx, async {
            let thread = std::thread::current().id();

            // tokio's own sockets: an echo task.
            let (mut a, mut b) = tokio::net::UnixStream::pair().unwrap();
            tokio::task::spawn_local(async move {
                let mut buf = [0u8; 64];
                let n = b.read(&mut buf).await.unwrap();
                b.write_all(&buf[..n]).await.unwrap();
            });

            // An aio fd handler on a std socket pair.
            let got = Rc::new(Cell::new(0usize));
            let (mut c, _watched) = watched_pair(&ctx, 64, &got, move || {
                assert_eq!(std::thread::current().id(), thread);
            });

            // A BH, a timer and a task that awaits a tokio timer.
            let bh_ran = Flag::new();
            ctx.schedule_oneshot(bh_ran.setter());
            let (fired, timer) = flag_timer(&ctx);
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

            sleep_until(in_5s(), Duration::from_millis(1), || {
                got.get() >= 5 && fired.get() && task.is_finished()
            })
            .await;
            assert_eq!(got.get(), 5, "{backend:?}: the aio handler read everything");
            assert!(bh_ran.get(), "{backend:?}: BH");
            assert!(fired.get(), "{backend:?}: timer");
            assert!(armed.elapsed() >= Duration::from_millis(5), "timer early");
            assert!(task.is_finished(), "{backend:?}: task");
            assert_eq!(ctx.block_on(task).unwrap(), 7);
        });
    });
}

#[test]
fn idle_driver_makes_no_wakeups() {
    each_backend(|backend, ctx| {
        driven(&ctx, async {
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
        });
    });
}

#[test]
fn remote_oneshot_wakes_the_sleeping_runtime() {
    each_backend(|backend, ctx| {
        driven(&ctx, async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let ran = Flag::new();
            let start = Instant::now();
            let t = schedule_from_thread(&ctx, Duration::from_millis(50), ran.setter());
            // tokio sleeps between looks at the flag; the BH itself runs only if the driver's
            // fd woke tokio (the next test has no tokio timer at all).
            let deadline = start + Duration::from_secs(5);
            sleep_until(deadline, Duration::from_millis(5), || ran.get()).await;
            t.join().unwrap();
            assert!(ran.get(), "{backend:?}: the BH never ran");
            assert!(start.elapsed() < Duration::from_secs(2), "{backend:?}");
        });
    });
}

#[test]
fn remote_oneshot_wakes_a_runtime_with_nothing_else_to_do() {
    each_backend(|backend, ctx| {
        let (tx, rx) = tokio::sync::oneshot::channel::<Instant>();
        let start = Instant::now();
        let t = schedule_from_thread(&ctx, Duration::from_millis(50), move || {
            tx.send(Instant::now()).unwrap()
        });
        // The runtime's only other work is awaiting the channel the BH feeds: it sleeps in
        // epoll until the driver's fd wakes it.
        let at = driven(&ctx, async move {
            tokio::time::timeout(Duration::from_secs(5), rx).await
        });
        t.join().unwrap();
        let at = at.expect("timed out").unwrap();
        assert!(at - start >= Duration::from_millis(50), "{backend:?}");
        assert!(at - start < Duration::from_secs(2), "{backend:?}");
    });
}

#[test]
fn a_handler_that_leaves_data_unread_is_called_again() {
    each_backend(|backend, ctx| {
        driven(&ctx, async {
            // One byte per call: level-triggered semantics must call it ten times.
            let got = Rc::new(Cell::new(0usize));
            let (mut c, _watched) = watched_pair(&ctx, 1, &got, || {});
            c.write_all(&[7u8; 10]).unwrap();
            sleep_until(in_5s(), Duration::from_millis(1), || got.get() >= 10).await;
            assert_eq!(got.get(), 10, "{backend:?}");
        });
    });
}

#[test]
fn handlers_registered_while_driven_are_watched() {
    each_backend(|backend, ctx| {
        driven(&ctx, async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            // Registered while the driver sleeps; written from another thread only.
            let hits = Rc::new(Cell::new(0usize));
            let (writers, handlers): (Vec<_>, Vec<_>) =
                (0..3).map(|_| watched_pair(&ctx, 8, &hits, || {})).unzip();
            let t = std::thread::spawn(move || {
                for mut w in writers {
                    std::thread::sleep(Duration::from_millis(20));
                    w.write_all(b"x").unwrap();
                }
            });
            let deadline = in_5s();
            // A long sleep: only fd wake-ups of the driver make progress meanwhile.
            sleep_until(deadline, Duration::from_millis(20), || hits.get() >= 3).await;
            t.join().unwrap();
            assert_eq!(hits.get(), 3, "{backend:?}");
            // Removing them all and closing the fds changes the set again.
            drop(handlers);
            a_remote_oneshot_runs(&ctx, backend, deadline).await;
        });
    });
}

#[test]
fn a_callback_may_poll_the_context_directly() {
    each_backend(|backend, ctx| {
        driven(&ctx, async {
            let (inner_ran, outer_done) = (Flag::new(), Flag::new());
            let (i, o) = (inner_ran.clone(), outer_done.setter());
            let inner = ctx.bh(move || i.setter()());
            // The outer BH waits, nested, for a BH it schedules and for an aio timer.
            ctx.schedule_oneshot(move || {
                let c2 = AioContext::current().expect("inside a callback");
                wait_nested_for_bh_and_timer(&c2, || inner.schedule(), || inner_ran.get());
                o();
            });
            let deadline = in_5s();
            sleep_until(deadline, Duration::from_millis(1), || outer_done.get()).await;
            assert!(outer_done.get(), "{backend:?}");
            // The driver still works after the nested loop.
            a_remote_oneshot_runs(&ctx, backend, deadline).await;
        });
    });
}

/// Detaching (dropping the driver), dropping the context's last other clone, and dropping the
/// runtime, in every order: no callback runs from a detached driver, the context keeps
/// working under its own loop, and no fd is left open.
#[test]
fn detach_and_drop_in_every_order_leak_nothing() {
    let _s = serial();
    every_order_leaks_nothing(3, |round, backend, ctx| {
        let rt = runtime();
        let local = LocalSet::new();
        let ran = Flag::new();
        match round {
            // Detach first, then the context runs its own loop, then drop it.
            0 => {
                local.block_on(&rt, async {
                    let driver = tokio::task::spawn_local(aio::tokio::drive(ctx.clone()));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    driver.abort();
                    let _ = driver.await;
                });
                // The detach closed the outer loop's window: with nobody waiting, a remote
                // schedule does not write the eventfd.
                detached_then_own_loop(&ctx, backend, "ran after detach", || {
                    local.block_on(&rt, async {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    });
                });
                drop(ctx);
            }
            // Drop our clone first: the driver keeps the context; then detach.
            1 => {
                let remote = ctx.handle();
                local.block_on(&rt, async {
                    let driver = tokio::task::spawn_local(aio::tokio::drive(ctx));
                    remote.schedule_oneshot(ran.setter());
                    while !ran.get() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    driver.abort();
                    let _ = driver.await;
                });
                // The context is gone with the driver: a late BH is dropped, not run.
                let late = Flag::new();
                remote.schedule_oneshot(late.setter());
                assert!(!late.get());
            }
            // Drop the runtime (and with it the spawned driver) while the driver sleeps.
            _ => {
                local.spawn_local(aio::tokio::drive(ctx.clone()));
                local.block_on(&rt, async {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                });
                drop(local);
                drop(rt);
                ctx.handle().schedule_oneshot(ran.setter());
                poll_until(&ctx, || ran.get());
                drop(ctx);
                return;
            }
        }
        drop(local);
        drop(rt);
    });
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
    driven(&ctx, async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(ctx.backend(), "poll");
        let hits = Rc::new(Cell::new(0usize));
        let (writers, _keep): (Vec<_>, Vec<_>) = (0..aio::EPOLL_UPGRADE_THRESHOLD + 2)
            .map(|_| watched_pair(&ctx, 8, &hits, || {}))
            .unzip();
        assert_eq!(ctx.backend(), "epoll", "the context moved to epoll");
        let n = writers.len();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            for mut w in writers {
                w.write_all(b"x").unwrap();
            }
        });
        sleep_until(in_5s(), Duration::from_millis(20), || hits.get() >= n).await;
        t.join().unwrap();
        assert_eq!(hits.get(), n);
    });
}

/// A read on the context's own ring (the io_uring backend's block I/O) completes under the
/// driver: the context's `check` reports the completion its wait reaped, although no fd is
/// ready, and the driver dispatches it. (Before, the driver spun without running it.)
#[test]
fn a_ring_request_completes_under_the_driver() {
    let _s = serial();
    let Some((ctx, got)) = embed::ring_read("tokio") else {
        return;
    };
    driven(&ctx, async {
        sleep_until(in_5s(), Duration::from_millis(1), || got.borrow().is_some()).await;
    });
    embed::assert_ring_read(&got);
}
