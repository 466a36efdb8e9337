//! Tests of `aio::calloop` (feature `calloop`): a context as an event source of a real
//! `calloop::EventLoop`, on every backend, mixed with calloop's native sources (a ping, a
//! timer): aio fd handlers, BHs, timers and tasks; a cross-thread one-shot BH waking the
//! sleeping loop; level-triggered handlers; aio timers bounding a loop given no timeout;
//! nesting; idleness; removing the source and dropping in every order.
#![cfg(all(feature = "calloop", target_os = "linux"))]

use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use aio::calloop::AioSource;
use aio::{Backend, ClockType, Scale};
use calloop::EventLoop;
use calloop::timer::{TimeoutAction, Timer};

#[path = "support/embed.rs"]
mod embed;
use embed::{backends, open_fds, serial};

/// Counts of what ran, the loop's shared data.
#[derive(Default)]
struct Seen {
    dispatches: u32,
    pings: u32,
    calloop_timer: bool,
}

fn dispatch_until(
    el: &mut EventLoop<'_, Seen>,
    seen: &mut Seen,
    mut done: impl FnMut(&Seen) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done(seen) {
        assert!(Instant::now() < deadline, "timed out");
        el.dispatch(Some(Duration::from_secs(1)), seen).unwrap();
    }
}

#[test]
fn calloop_sources_and_aio_handlers_bhs_timers_tasks_share_one_loop() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let mut el: EventLoop<Seen> = EventLoop::try_new().unwrap();
        let h = el.handle();
        h.insert_source(
            AioSource::new(ctx.clone()).unwrap(),
            |_, _, s: &mut Seen| s.dispatches += 1,
        )
        .unwrap();
        let (ping, ping_src) = calloop::ping::make_ping().unwrap();
        h.insert_source(ping_src, |_, _, s: &mut Seen| s.pings += 1)
            .unwrap();
        h.insert_source(Timer::from_duration(Duration::from_millis(3)), |_, _, s| {
            s.calloop_timer = true;
            TimeoutAction::Drop
        })
        .unwrap();

        let (mut c, d) = UnixStream::pair().unwrap();
        d.set_nonblocking(true).unwrap();
        let got = Rc::new(Cell::new(0usize));
        let (g, mut sock) = (got.clone(), d.try_clone().unwrap());
        let _h = ctx
            .fd_handler(&d)
            .on_read(move |_| {
                let mut buf = [0u8; 64];
                if let Ok(n) = sock.read(&mut buf) {
                    g.set(g.get() + n);
                }
            })
            .register()
            .unwrap();
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
        let task = ctx.spawn_local(async { 5 });

        c.write_all(b"hello").unwrap();
        ping.ping();
        let mut seen = Seen::default();
        dispatch_until(&mut el, &mut seen, |s| {
            got.get() == 5
                && s.pings > 0
                && s.calloop_timer
                && fired.load(Ordering::SeqCst)
                && bh_ran.load(Ordering::SeqCst)
                && task.is_finished()
        });
        assert!(
            armed.elapsed() >= Duration::from_millis(5),
            "{backend:?}: timer early"
        );
        assert!(seen.dispatches > 0);
        assert_eq!(ctx.block_on(task).unwrap(), 5);
    }
}

#[test]
fn an_aio_timer_wakes_a_loop_dispatched_without_timeout() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let mut el: EventLoop<Seen> = EventLoop::try_new().unwrap();
        el.handle()
            .insert_source(AioSource::new(ctx.clone()).unwrap(), |_, _, _| {})
            .unwrap();
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let timer = ctx.timer(ClockType::Realtime, Scale::NS, move || {
            f.store(true, Ordering::SeqCst)
        });
        let start = Instant::now();
        timer.arm_after(Duration::from_micros(1500));
        let mut seen = Seen::default();
        while !fired.load(Ordering::SeqCst) {
            assert!(start.elapsed() < Duration::from_secs(5), "{backend:?}");
            el.dispatch(None, &mut seen).unwrap();
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_micros(1500), "{backend:?}: early");
        assert!(took < Duration::from_secs(1), "{backend:?}: {took:?}");
    }
}

#[test]
fn remote_oneshot_wakes_the_sleeping_loop_and_idle_is_quiet() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let mut el: EventLoop<Seen> = EventLoop::try_new().unwrap();
        el.handle()
            .insert_source(
                AioSource::new(ctx.clone()).unwrap(),
                |_, _, s: &mut Seen| s.dispatches += 1,
            )
            .unwrap();
        let mut seen = Seen::default();
        // Settle, then stay idle for 200 ms: no iteration of the context.
        for _ in 0..3 {
            el.dispatch(Some(Duration::from_millis(5)), &mut seen)
                .unwrap();
        }
        let before = ctx.stats();
        el.dispatch(Some(Duration::from_millis(200)), &mut seen)
            .unwrap();
        assert_eq!(
            ctx.stats().waits,
            before.waits,
            "{backend:?}: idle loop iterated"
        );

        let ran = Arc::new(AtomicBool::new(false));
        let (r, remote) = (ran.clone(), ctx.handle());
        let start = Instant::now();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            remote.schedule_oneshot(move || r.store(true, Ordering::SeqCst));
        });
        // One dispatch with no timeout: only the context's fd can end it.
        while !ran.load(Ordering::SeqCst) {
            assert!(start.elapsed() < Duration::from_secs(5));
            el.dispatch(None, &mut seen).unwrap();
        }
        t.join().unwrap();
        assert!(start.elapsed() >= Duration::from_millis(50), "{backend:?}");
    }
}

#[test]
fn a_handler_that_leaves_data_unread_is_called_again() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let mut el: EventLoop<Seen> = EventLoop::try_new().unwrap();
        el.handle()
            .insert_source(AioSource::new(ctx.clone()).unwrap(), |_, _, _| {})
            .unwrap();
        let (mut c, d) = UnixStream::pair().unwrap();
        d.set_nonblocking(true).unwrap();
        let got = Rc::new(Cell::new(0usize));
        let (g, mut sock) = (got.clone(), d.try_clone().unwrap());
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
        c.write_all(&[1u8; 10]).unwrap();
        let mut seen = Seen::default();
        dispatch_until(&mut el, &mut seen, |_| got.get() == 10);
        assert_eq!(got.get(), 10, "{backend:?}");
    }
}

#[test]
fn a_calloop_callback_may_poll_the_context_directly() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let mut el: EventLoop<Seen> = EventLoop::try_new().unwrap();
        let h = el.handle();
        h.insert_source(AioSource::new(ctx.clone()).unwrap(), |_, _, _| {})
            .unwrap();
        let (ping, ping_src) = calloop::ping::make_ping().unwrap();
        let inner_ran = Arc::new(AtomicU32::new(0));
        let (i, c2) = (inner_ran.clone(), ctx.clone());
        // The ping's callback waits, nested, for an aio BH and an aio timer.
        h.insert_source(ping_src, move |_, _, s: &mut Seen| {
            let i2 = i.clone();
            c2.schedule_oneshot(move || {
                i2.fetch_add(1, Ordering::SeqCst);
            });
            let fired = Arc::new(AtomicBool::new(false));
            let f = fired.clone();
            let t = c2.timer(ClockType::Realtime, Scale::NS, move || {
                f.store(true, Ordering::SeqCst)
            });
            t.arm_after(Duration::from_millis(2));
            c2.wait_while(|| i.load(Ordering::SeqCst) == 0 || !fired.load(Ordering::SeqCst));
            s.pings += 1;
        })
        .unwrap();
        ping.ping();
        let mut seen = Seen::default();
        dispatch_until(&mut el, &mut seen, |s| s.pings == 1);
        assert_eq!(inner_ran.load(Ordering::SeqCst), 1, "{backend:?}");
        // The source still works after the nested loop.
        let again = Arc::new(AtomicBool::new(false));
        let a = again.clone();
        ctx.handle()
            .schedule_oneshot(move || a.store(true, Ordering::SeqCst));
        dispatch_until(&mut el, &mut seen, |_| again.load(Ordering::SeqCst));
    }
}

/// Removing the source, dropping the loop and dropping the context's other clones, in every
/// order: no callback runs from a removed source, the context keeps working under its own
/// loop, and no fd is left open.
#[test]
fn remove_and_drop_in_every_order_leak_nothing() {
    let _s = serial();
    let base = open_fds();
    for round in 0..3 {
        for backend in [Backend::Poll, Backend::Epoll, Backend::IoUring] {
            let Ok(ctx) = aio::Builder::new().backend(backend).build() else {
                continue;
            };
            let mut el: EventLoop<Seen> = EventLoop::try_new().unwrap();
            let token = el
                .handle()
                .insert_source(
                    AioSource::new(ctx.clone()).unwrap(),
                    |_, _, s: &mut Seen| s.dispatches += 1,
                )
                .unwrap();
            let mut seen = Seen::default();
            el.dispatch(Some(Duration::from_millis(1)), &mut seen)
                .unwrap();
            let ran = Arc::new(AtomicBool::new(false));
            let r = ran.clone();
            match round {
                // Remove the source, then the context runs its own loop.
                0 => {
                    // Sleep once so that a window is open, then remove the source.
                    el.dispatch(Some(Duration::from_millis(1)), &mut seen)
                        .unwrap();
                    el.handle().remove(token);
                    // The removal closed the outer loop's window: with nobody waiting, a
                    // remote schedule does not write the eventfd.
                    let writes = ctx.stats().event_writes;
                    let remote = ctx.handle();
                    std::thread::spawn(move || {
                        remote.schedule_oneshot(move || r.store(true, Ordering::SeqCst))
                    })
                    .join()
                    .unwrap();
                    assert_eq!(ctx.stats().event_writes, writes, "{backend:?}");
                    el.dispatch(Some(Duration::from_millis(20)), &mut seen)
                        .unwrap();
                    assert!(!ran.load(Ordering::SeqCst), "ran after remove");
                    while !ran.load(Ordering::SeqCst) {
                        ctx.poll();
                    }
                    drop(el);
                    drop(ctx);
                }
                // Drop our clone: the source keeps the context; then drop the loop.
                1 => {
                    let remote = ctx.handle();
                    drop(ctx);
                    remote.schedule_oneshot(move || r.store(true, Ordering::SeqCst));
                    dispatch_until(&mut el, &mut seen, |_| ran.load(Ordering::SeqCst));
                    drop(el);
                    let late = Arc::new(AtomicBool::new(false));
                    let l = late.clone();
                    remote.schedule_oneshot(move || l.store(true, Ordering::SeqCst));
                    assert!(!late.load(Ordering::SeqCst));
                }
                // Drop the loop with the source inserted, then use the context alone.
                _ => {
                    drop(el);
                    ctx.handle()
                        .schedule_oneshot(move || r.store(true, Ordering::SeqCst));
                    while !ran.load(Ordering::SeqCst) {
                        ctx.poll();
                    }
                    drop(ctx);
                }
            }
        }
    }
    assert_eq!(open_fds(), base, "fds leaked");
}
