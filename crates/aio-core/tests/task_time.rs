//! Timers as futures (`aio_core::task::time`): sleeps on the real and virtual clocks, deadlines
//! already passed, timeouts, cancellation by drop, ordering, wakers that change, and sleeps in
//! tasks sent from another thread.

use aio_core::task::time::{Elapsed, now_ns, sleep, sleep_on, sleep_until, timeout, timeout_on};
use aio_core::{AioContext, ClockType, ContextHandle, GroupBuilder, VirtualClock};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

#[cfg(miri)]
#[path = "support/miri_monitor.rs"]
mod miri_monitor;

fn monitor() -> Box<dyn aio_core::FdMonitor> {
    #[cfg(miri)]
    return Box::new(miri_monitor::MiriMonitor::new().unwrap());
    #[cfg(not(miri))]
    Box::new(fdmon_poll::PollMonitor::new().unwrap())
}

fn ctx() -> AioContext {
    AioContext::new(monitor()).unwrap()
}

/// A context whose virtual clock (enabled, stopped at 0) is `clock`.
fn virtual_ctx() -> (AioContext, VirtualClock) {
    let clock = VirtualClock::new();
    let ctx = AioContext::with_clocks(monitor(), GroupBuilder::new().virtual_clock(clock.clone()))
        .unwrap();
    (ctx, clock)
}

/// Runs the loop without blocking until an iteration makes no progress.
fn settle(ctx: &AioContext) {
    for _ in 0..1000 {
        if !ctx.poll_nonblocking() {
            return;
        }
    }
    panic!("the loop kept making progress");
}

#[derive(Default)]
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Flag {
    fn take(&self) -> bool {
        self.0.swap(false, Ordering::SeqCst)
    }
}

const MS: u64 = 1_000_000;

#[test]
fn realtime_sleep_lasts_at_least_its_delay() {
    let ctx = ctx();
    let task = ctx.spawn(async {
        let start = Instant::now();
        sleep(Duration::from_millis(20)).await;
        start.elapsed()
    });
    assert!(ctx.block_on(task).unwrap() >= Duration::from_millis(20));
    let start = Instant::now();
    ctx.block_on(ctx.sleep(Duration::from_millis(10)));
    assert!(start.elapsed() >= Duration::from_millis(10));
    assert_eq!(
        ctx.timers().timer_count(),
        0,
        "a completed sleep frees its timer"
    );
}

#[test]
fn virtual_sleep_completes_exactly_when_the_clock_reaches_its_deadline() {
    let (ctx, clock) = virtual_ctx();
    let done = Rc::new(Cell::new(false));
    let d = done.clone();
    let _task = ctx.spawn_local(async move {
        sleep_on(ClockType::Virtual, Duration::from_millis(10)).await;
        d.set(true);
    });
    settle(&ctx);
    assert_eq!(ctx.timers().armed_count(), 1);
    assert!(!done.get());
    clock.advance_ns(10 * MS - 1);
    settle(&ctx);
    assert!(!done.get(), "1 ns before the deadline");
    clock.advance_ns(1);
    // The advance notified the loop: a blocking iteration returns at once and fires the timer.
    assert!(ctx.poll());
    settle(&ctx);
    assert!(done.get(), "at the deadline");
    assert_eq!(ctx.timers().timer_count(), 0);
}

#[test]
fn a_disabled_virtual_clock_holds_a_sleep_until_it_is_enabled() {
    let (ctx, clock) = virtual_ctx();
    clock.disable();
    let s = ctx.sleep_until(ClockType::Virtual, 0);
    assert!(!s.is_elapsed(), "timers of a disabled clock do not run");
    let mut s = pin!(s);
    let flag = Arc::new(Flag::default());
    let waker = Waker::from(flag.clone());
    assert!(
        s.as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending()
    );
    settle(&ctx);
    assert!(!flag.take());
    clock.enable();
    settle(&ctx);
    assert!(flag.take());
    assert!(s.poll(&mut Context::from_waker(&waker)).is_ready());
}

#[test]
fn a_deadline_already_passed_is_ready_at_once() {
    let (ctx, clock) = virtual_ctx();
    clock.advance_ns(5 * MS);
    for deadline in [0, 5 * MS] {
        let s = ctx.sleep_until(ClockType::Virtual, deadline);
        assert!(s.is_elapsed());
        let mut s = pin!(s);
        assert!(
            s.as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
                .is_ready()
        );
    }
    assert_eq!(ctx.timers().timer_count(), 0, "no timer was armed");
    // The free function in a task: ready on its first poll, no loop iteration needed.
    let polls = Rc::new(Cell::new(0));
    let p = polls.clone();
    let task = ctx.spawn_local(async move {
        let now = now_ns(ClockType::Virtual).unwrap();
        sleep_until(ClockType::Virtual, now).await;
        p.set(p.get() + 1);
        sleep_until(ClockType::Realtime, 0).await;
        now
    });
    assert!(ctx.poll_nonblocking());
    assert!(task.is_finished());
    assert_eq!(polls.get(), 1);
    assert_eq!(ctx.block_on(task).unwrap(), 5 * MS);
}

#[test]
fn timeout_elapses_or_not() {
    let (ctx, clock) = virtual_ctx();
    let slow = ctx.spawn_local(async {
        timeout_on(
            ClockType::Virtual,
            Duration::from_millis(5),
            std::future::pending::<()>(),
        )
        .await
    });
    let fast = ctx.spawn_local(async {
        timeout_on(
            ClockType::Virtual,
            Duration::from_millis(5),
            sleep_on(ClockType::Virtual, Duration::from_millis(4)),
        )
        .await
    });
    settle(&ctx);
    clock.advance_ns(4 * MS);
    settle(&ctx);
    assert!(fast.is_finished() && !slow.is_finished());
    clock.advance_ns(MS - 1);
    settle(&ctx);
    assert!(!slow.is_finished(), "1 ns before the limit");
    clock.advance_ns(1);
    settle(&ctx);
    assert_eq!(ctx.block_on(slow).unwrap(), Err(Elapsed::default()));
    assert_eq!(ctx.block_on(fast).unwrap(), Ok(()));
    // The timeout's timer went with it.
    assert_eq!(ctx.timers().timer_count(), 0);

    // On the realtime clock, through the context's own constructor and the free function.
    let real = self::ctx();
    let r = real.block_on(real.timeout(Duration::from_millis(5), std::future::pending::<()>()));
    assert!(r.is_err());
    let t = real.spawn(async { timeout(Duration::from_secs(60), async { 3 }).await });
    assert_eq!(real.block_on(t).unwrap(), Ok(3));
    assert_eq!(real.timers().timer_count(), 0);
}

#[test]
fn dropping_a_sleep_cancels_its_timer() {
    let (ctx, clock) = virtual_ctx();
    let flag = Arc::new(Flag::default());
    let waker = Waker::from(flag.clone());
    let mut s = Box::pin(ctx.sleep_on(ClockType::Virtual, Duration::from_millis(1)));
    assert!(
        s.as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending()
    );
    assert_eq!(ctx.timers().armed_count(), 1);
    drop(s);
    assert_eq!(ctx.timers().timer_count(), 0);
    clock.advance(Duration::from_millis(10));
    assert!(!ctx.poll_nonblocking(), "no timer ran: no progress");
    assert!(!flag.take(), "no wake-up");

    // A task that drops its sleep after a timeout of the other branch: nothing fires later.
    let task = ctx.spawn_local(async {
        timeout_on(
            ClockType::Virtual,
            Duration::from_millis(1),
            sleep_on(ClockType::Virtual, Duration::from_millis(50)),
        )
        .await
    });
    settle(&ctx);
    assert_eq!(ctx.timers().armed_count(), 2);
    clock.advance(Duration::from_millis(1));
    settle(&ctx);
    assert!(ctx.block_on(task).unwrap().is_err());
    assert_eq!(ctx.timers().timer_count(), 0);
    clock.advance(Duration::from_millis(100));
    assert!(!ctx.poll_nonblocking());
}

#[test]
fn sleeps_complete_in_deadline_order() {
    let (ctx, clock) = virtual_ctx();
    let order = Rc::new(RefCell::new(Vec::new()));
    let deadlines: [u64; 8] = [7, 3, 9, 1, 5, 3, 8, 2];
    for (i, ms) in deadlines.iter().copied().enumerate() {
        let o = order.clone();
        ctx.spawn_local(async move {
            sleep_until(ClockType::Virtual, ms * MS).await;
            o.borrow_mut().push((ms, i));
        })
        .detach();
    }
    settle(&ctx);
    assert_eq!(ctx.timers().armed_count(), deadlines.len());
    // All due at once: the loop runs them in deadline order (equal deadlines in arming order),
    // and their tasks in the order they were woken.
    clock.advance_ns(10 * MS);
    settle(&ctx);
    let mut expected: Vec<(u64, usize)> = deadlines.iter().copied().zip(0..).collect();
    expected.sort();
    assert_eq!(*order.borrow(), expected);

    // Step by step: exactly the sleeps whose deadline is passed complete at each step.
    let order = Rc::new(RefCell::new(Vec::new()));
    for ms in [4u64, 2, 3, 1] {
        let o = order.clone();
        ctx.spawn_local(async move {
            sleep_on(ClockType::Virtual, Duration::from_millis(ms)).await;
            o.borrow_mut().push(ms);
        })
        .detach();
    }
    settle(&ctx);
    for step in 1..=4u64 {
        clock.advance_ns(MS);
        settle(&ctx);
        assert_eq!(*order.borrow(), (1..=step).collect::<Vec<_>>());
    }
}

#[test]
fn the_latest_waker_is_woken() {
    let (ctx, clock) = virtual_ctx();
    let (first, second) = (Arc::new(Flag::default()), Arc::new(Flag::default()));
    let (w1, w2) = (Waker::from(first.clone()), Waker::from(second.clone()));
    let mut s = pin!(ctx.sleep_on(ClockType::Virtual, Duration::from_millis(1)));
    assert!(s.as_mut().poll(&mut Context::from_waker(&w1)).is_pending());
    assert!(s.as_mut().poll(&mut Context::from_waker(&w2)).is_pending());
    clock.advance(Duration::from_millis(1));
    assert!(ctx.poll_nonblocking(), "the timer ran");
    assert!(second.take());
    assert!(!first.take());
    assert_eq!(s.poll(&mut Context::from_waker(&w2)), Poll::Ready(()));
}

#[test]
fn sleep_in_a_task_sent_from_another_thread() {
    let (tx, rx) = std::sync::mpsc::channel::<ContextHandle>();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let home = thread::spawn(move || {
        let ctx = ctx();
        tx.send(ctx.handle()).unwrap();
        while !s.load(Ordering::SeqCst) {
            ctx.poll();
        }
        thread::current().id()
    });
    let remote = rx.recv().unwrap();
    let task = remote.spawn(async {
        let start = Instant::now();
        sleep(Duration::from_millis(15)).await;
        (thread::current().id(), start.elapsed())
    });
    let here = ctx();
    let (ran_on, slept) = here.block_on(task).unwrap();
    stop.store(true, Ordering::SeqCst);
    remote.notify();
    assert_eq!(ran_on, home.join().unwrap());
    assert!(slept >= Duration::from_millis(15));
}

#[test]
fn a_sleep_made_and_polled_outside_any_context_panics_clearly() {
    let ctx = ctx();
    let mut lazy = pin!(sleep(Duration::from_millis(1)));
    assert_eq!(lazy.deadline_ns(), None);
    // Polled by something that is not an aio loop.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        lazy.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }));
    let msg = r.unwrap_err();
    let msg = msg.downcast_ref::<&str>().copied().unwrap_or_default();
    assert!(msg.contains("AioContext::sleep"), "{msg}");
    // A free sleep made outside but first polled inside a context binds there, in a task or
    // in a block_on.
    let lazy = sleep_on(ClockType::Realtime, Duration::from_millis(1));
    ctx.block_on(ctx.spawn(lazy)).unwrap();
    ctx.block_on(sleep(Duration::from_millis(1)));
}

#[test]
fn a_sleeping_task_moved_to_another_context_rearms_there() {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel::<ContextHandle>();
    let s = stop.clone();
    let worker = thread::spawn(move || {
        let ctx = ctx();
        tx.send(ctx.handle()).unwrap();
        while !s.load(Ordering::SeqCst) {
            ctx.poll();
        }
    });
    let other = rx.recv().unwrap();
    let wake_worker = other.clone();
    let ctx = ctx();
    let task = ctx.spawn(async move {
        let mut nap = pin!(sleep(Duration::from_millis(30)));
        // The first poll arms a timer on this context; then the task moves.
        let first = std::future::poll_fn(|cx| Poll::Ready(nap.as_mut().poll(cx))).await;
        assert!(first.is_pending());
        aio_core::task::reschedule(&other).await.unwrap();
        nap.await;
        thread::current().id()
    });
    assert_eq!(ctx.block_on(task).unwrap(), worker.thread().id());
    stop.store(true, Ordering::SeqCst);
    wake_worker.notify();
    worker.join().unwrap();
}

#[test]
fn a_sleep_awaited_by_block_on_at_top_level_finds_its_context() {
    let ctx = ctx();
    let start = Instant::now();
    ctx.block_on(sleep(Duration::from_millis(2)));
    assert!(start.elapsed() >= Duration::from_millis(2));
}
