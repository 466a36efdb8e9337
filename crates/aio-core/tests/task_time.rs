//! Timers as futures: `sleep`, `sleep_until` and `timeout` on the realtime and virtual clocks,
//! cancellation by drop, ordering, and sleeps in tasks that came from another thread.

use aio_core::task::{Elapsed, sleep, sleep_on, sleep_until, timeout, timeout_on};
use aio_core::{AioContext, ClockType, GroupBuilder, VirtualClock};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
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

/// A context whose virtual clock the test drives (enabled, at 0).
fn virtual_ctx() -> (AioContext, VirtualClock) {
    let clock = VirtualClock::new();
    clock.enable();
    let ctx = AioContext::with_clocks(monitor(), GroupBuilder::new().virtual_clock(clock.clone()))
        .unwrap();
    (ctx, clock)
}

#[test]
fn sleep_on_realtime_lasts_at_least_its_duration() {
    let ctx = ctx();
    let start = Instant::now();
    ctx.block_on(sleep(Duration::from_millis(20)));
    assert!(start.elapsed() >= Duration::from_millis(20));
}

#[test]
fn a_virtual_sleep_completes_exactly_when_the_clock_passes_its_deadline() {
    let (ctx, clock) = virtual_ctx();
    let task = ctx.spawn_local(sleep_on(ClockType::Virtual, Duration::from_nanos(1_000)));
    while ctx.poll_nonblocking() {}
    clock.advance_ns(999);
    while ctx.poll_nonblocking() {}
    assert!(!task.is_finished(), "1 ns early");
    clock.advance_ns(1);
    assert!(ctx.poll(), "the timer and then the task run");
    while ctx.poll_nonblocking() {}
    assert!(task.is_finished());
    assert_eq!(
        aio_core::task::now_ns(ClockType::Virtual),
        None,
        "outside the loop"
    );
}

#[test]
fn sleep_until_a_past_deadline_is_ready_at_once() {
    let (ctx, clock) = virtual_ctx();
    clock.advance_ns(5_000);
    let task = ctx.spawn_local(sleep_until(ClockType::Virtual, 4_000));
    assert!(ctx.poll_nonblocking());
    assert!(task.is_finished());
}

#[test]
fn virtual_sleeps_complete_in_deadline_order() {
    let (ctx, clock) = virtual_ctx();
    let order = Rc::new(RefCell::new(Vec::new()));
    for (i, ns) in [(0, 300u64), (1, 100), (2, 200), (3, 100)] {
        let order = order.clone();
        ctx.spawn_local(async move {
            sleep_until(ClockType::Virtual, ns).await;
            order.borrow_mut().push(i);
        })
        .detach();
    }
    while ctx.poll_nonblocking() {}
    for _ in 0..3 {
        clock.advance_ns(100);
        while ctx.poll_nonblocking() {}
    }
    // Equal deadlines keep their arming order.
    assert_eq!(*order.borrow(), [1, 3, 2, 0]);
}

#[test]
fn timeout_elapses_or_not() {
    let (ctx, clock) = virtual_ctx();
    let slow = ctx.spawn_local(timeout_on(
        ClockType::Virtual,
        Duration::from_nanos(50),
        sleep_until(ClockType::Virtual, 100),
    ));
    let fast = ctx.spawn_local(timeout_on(
        ClockType::Virtual,
        Duration::from_nanos(500),
        async {
            sleep_until(ClockType::Virtual, 100).await;
            7
        },
    ));
    while ctx.poll_nonblocking() {}
    clock.advance_ns(50);
    while ctx.poll_nonblocking() {}
    assert!(slow.is_finished() && !fast.is_finished());
    clock.advance_ns(50);
    while ctx.poll_nonblocking() {}
    assert_eq!(ctx.block_on(slow).unwrap(), Err(Elapsed));
    assert_eq!(ctx.block_on(fast).unwrap(), Ok(7));
    // On the realtime clock too.
    assert_eq!(
        ctx.block_on(timeout(
            Duration::from_millis(1),
            std::future::pending::<()>()
        )),
        Err(Elapsed)
    );
}

#[test]
fn dropping_a_sleep_cancels_its_timer() {
    let (ctx, clock) = virtual_ctx();
    let task = ctx.spawn_local(sleep_until(ClockType::Virtual, 100));
    while ctx.poll_nonblocking() {}
    assert_eq!(ctx.timers().timer_count(), 1);
    task.abort();
    while ctx.poll_nonblocking() {}
    assert_eq!(
        ctx.timers().timer_count(),
        0,
        "the timer went with the sleep"
    );
    clock.advance_ns(200);
    assert!(!ctx.poll_nonblocking(), "no timer fires, nothing runs");
}

#[test]
fn a_sleep_in_a_task_spawned_from_another_thread_wakes_it() {
    let ctx = ctx();
    let (tx, rx) = mpsc::channel();
    let handle = ctx.handle();
    thread::spawn(move || {
        tx.send(handle.spawn(async {
            let start = Instant::now();
            sleep(Duration::from_millis(5)).await;
            start.elapsed()
        }))
        .unwrap();
    })
    .join()
    .unwrap();
    let task = rx.recv().unwrap();
    assert!(ctx.block_on(task).unwrap() >= Duration::from_millis(5));
}

#[test]
fn a_sleeping_task_moved_to_another_context_rearms_there() {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
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
        let mut nap = std::pin::pin!(sleep(Duration::from_millis(30)));
        // Armed here, then moved: the first poll arms a timer on this context.
        assert!(futures_poll_once(nap.as_mut()).await.is_pending());
        aio_core::task::reschedule(&other).await.unwrap();
        nap.await;
        thread::current().id()
    });
    let id = ctx.block_on(task).unwrap();
    assert_eq!(id, worker.thread().id());
    stop.store(true, Ordering::SeqCst);
    wake_worker.notify();
    worker.join().unwrap();
}

/// Polls `f` once and returns what it gave.
async fn futures_poll_once<F: std::future::Future + Unpin>(mut f: F) -> std::task::Poll<F::Output> {
    std::future::poll_fn(|cx| std::task::Poll::Ready(std::pin::Pin::new(&mut f).poll(cx))).await
}
