//! Tests of `aio::calloop` (feature `calloop`): a context as an event source of a real
//! `calloop::EventLoop`, on every backend, mixed with calloop's native sources (a ping, a
//! timer): aio fd handlers, BHs, timers and tasks; a cross-thread one-shot BH waking the
//! sleeping loop; level-triggered handlers; aio timers bounding a loop given no timeout;
//! nesting; idleness; removing the source and dropping in every order; a read on the
//! context's own io_uring ring.
#![cfg(all(feature = "calloop", target_os = "linux"))]

use std::cell::Cell;
use std::io::Write;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use aio::AioContext;
use aio::calloop::AioSource;
use calloop::timer::{TimeoutAction, Timer};
use calloop::{EventLoop, RegistrationToken};

#[path = "support/embed.rs"]
mod embed;
use embed::{
    Flag, detached_then_own_loop, each_backend, every_order_leaks_nothing, flag_timer, poll_until,
    schedule_from_thread, serial, wait_nested_for_oneshot_and_timer, watched_pair,
};

/// Counts of what ran, the loop's shared data.
#[derive(Default)]
struct Seen {
    dispatches: u32,
    pings: u32,
    calloop_timer: bool,
}

/// A fresh loop with `ctx` inserted as a source that counts its dispatches in [`Seen`].
fn event_loop(ctx: &AioContext) -> (EventLoop<'static, Seen>, RegistrationToken) {
    let el: EventLoop<Seen> = EventLoop::try_new().unwrap();
    let token = el
        .handle()
        .insert_source(
            AioSource::new(ctx.clone()).unwrap(),
            |_, _, s: &mut Seen| s.dispatches += 1,
        )
        .unwrap();
    (el, token)
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
    each_backend(|backend, ctx| {
        let (mut el, _) = event_loop(&ctx);
        let h = el.handle();
        let (ping, ping_src) = calloop::ping::make_ping().unwrap();
        h.insert_source(ping_src, |_, _, s: &mut Seen| s.pings += 1)
            .unwrap();
        h.insert_source(Timer::from_duration(Duration::from_millis(3)), |_, _, s| {
            s.calloop_timer = true;
            TimeoutAction::Drop
        })
        .unwrap();

        let got = Rc::new(Cell::new(0usize));
        let (mut c, _watched) = watched_pair(&ctx, 64, &got, || {});
        let bh_ran = Flag::new();
        ctx.schedule_oneshot(bh_ran.setter());
        let (fired, timer) = flag_timer(&ctx);
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
                && fired.get()
                && bh_ran.get()
                && task.is_finished()
        });
        assert!(
            armed.elapsed() >= Duration::from_millis(5),
            "{backend:?}: timer early"
        );
        assert!(seen.dispatches > 0);
        assert_eq!(ctx.block_on(task).unwrap(), 5);
    });
}

#[test]
fn an_aio_timer_wakes_a_loop_dispatched_without_timeout() {
    each_backend(|backend, ctx| {
        let (mut el, _) = event_loop(&ctx);
        let (fired, timer) = flag_timer(&ctx);
        let start = Instant::now();
        timer.arm_after(Duration::from_micros(1500));
        let mut seen = Seen::default();
        while !fired.get() {
            assert!(start.elapsed() < Duration::from_secs(5), "{backend:?}");
            el.dispatch(None, &mut seen).unwrap();
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_micros(1500), "{backend:?}: early");
        assert!(took < Duration::from_secs(1), "{backend:?}: {took:?}");
    });
}

#[test]
fn remote_oneshot_wakes_the_sleeping_loop_and_idle_is_quiet() {
    each_backend(|backend, ctx| {
        let (mut el, _) = event_loop(&ctx);
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

        let ran = Flag::new();
        let start = Instant::now();
        let t = schedule_from_thread(&ctx, Duration::from_millis(50), ran.setter());
        // One dispatch with no timeout: only the context's fd can end it.
        while !ran.get() {
            assert!(start.elapsed() < Duration::from_secs(5));
            el.dispatch(None, &mut seen).unwrap();
        }
        t.join().unwrap();
        assert!(start.elapsed() >= Duration::from_millis(50), "{backend:?}");
    });
}

#[test]
fn a_handler_that_leaves_data_unread_is_called_again() {
    each_backend(|backend, ctx| {
        let (mut el, _) = event_loop(&ctx);
        let got = Rc::new(Cell::new(0usize));
        let (mut c, _watched) = watched_pair(&ctx, 1, &got, || {});
        c.write_all(&[1u8; 10]).unwrap();
        let mut seen = Seen::default();
        dispatch_until(&mut el, &mut seen, |_| got.get() == 10);
        assert_eq!(got.get(), 10, "{backend:?}");
    });
}

#[test]
fn a_calloop_callback_may_poll_the_context_directly() {
    each_backend(|backend, ctx| {
        let (mut el, _) = event_loop(&ctx);
        let (ping, ping_src) = calloop::ping::make_ping().unwrap();
        let inner_ran = Arc::new(AtomicU32::new(0));
        let (i, c2) = (inner_ran.clone(), ctx.clone());
        // The ping's callback waits, nested, for an aio BH and an aio timer.
        el.handle()
            .insert_source(ping_src, move |_, _, s: &mut Seen| {
                wait_nested_for_oneshot_and_timer(&c2, &i);
                s.pings += 1;
            })
            .unwrap();
        ping.ping();
        let mut seen = Seen::default();
        dispatch_until(&mut el, &mut seen, |s| s.pings == 1);
        assert_eq!(inner_ran.load(Ordering::SeqCst), 1, "{backend:?}");
        // The source still works after the nested loop.
        let again = Flag::new();
        ctx.handle().schedule_oneshot(again.setter());
        dispatch_until(&mut el, &mut seen, |_| again.get());
    });
}

/// Removing the source, dropping the loop and dropping the context's other clones, in every
/// order: no callback runs from a removed source, the context keeps working under its own
/// loop, and no fd is left open.
#[test]
fn remove_and_drop_in_every_order_leak_nothing() {
    let _s = serial();
    every_order_leaks_nothing(3, |round, backend, ctx| {
        let (mut el, token) = event_loop(&ctx);
        let mut seen = Seen::default();
        el.dispatch(Some(Duration::from_millis(1)), &mut seen)
            .unwrap();
        let ran = Flag::new();
        match round {
            // Remove the source, then the context runs its own loop.
            0 => {
                // Sleep once so that a window is open, then remove the source.
                el.dispatch(Some(Duration::from_millis(1)), &mut seen)
                    .unwrap();
                el.handle().remove(token);
                // The removal closed the outer loop's window: with nobody waiting, a
                // remote schedule does not write the eventfd.
                detached_then_own_loop(&ctx, backend, "ran after remove", || {
                    el.dispatch(Some(Duration::from_millis(20)), &mut seen)
                        .unwrap();
                });
                drop(el);
                drop(ctx);
            }
            // Drop our clone: the source keeps the context; then drop the loop.
            1 => {
                let remote = ctx.handle();
                drop(ctx);
                remote.schedule_oneshot(ran.setter());
                dispatch_until(&mut el, &mut seen, |_| ran.get());
                drop(el);
                let late = Flag::new();
                remote.schedule_oneshot(late.setter());
                assert!(!late.get());
            }
            // Drop the loop with the source inserted, then use the context alone.
            _ => {
                drop(el);
                ctx.handle().schedule_oneshot(ran.setter());
                poll_until(&ctx, || ran.get());
                drop(ctx);
            }
        }
    });
}

/// A read on the context's own ring (the io_uring backend's block I/O) completes under calloop:
/// the source's `check` reports the completion its wait reaped, although no fd is ready.
/// (Before, the event loop spun without running it.)
#[test]
fn a_ring_request_completes_under_calloop() {
    let _s = serial();
    let Some((ctx, got)) = embed::ring_read("calloop") else {
        return;
    };
    let (mut el, _token) = event_loop(&ctx);
    let mut seen = Seen::default();
    dispatch_until(&mut el, &mut seen, |_| got.borrow().is_some());
    embed::assert_ring_read(&got);
}
