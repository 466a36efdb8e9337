//! Soundness review of the task cell (`task/cell.rs`, rules [TASK-1]..[TASK-5] in
//! ARCHITECTURE.md), written against the public API only. Two kinds of tests live here:
//!
//! * reproductions of defects found in the review, fixed since, so regression tests now (each
//!   says what it shows): a panic that
//!   escapes a task's completion (a detached output or panic payload whose `Drop` panics, a
//!   join waker that panics) leaves the task's slot marked running; a join waker kept until the
//!   cell's last count goes leaks a task whose join waker holds the task itself; the `Drop` of
//!   an earlier `Reschedule` withdraws a later one's move; a task spawned from the `Drop` of an
//!   aborted task reuses its slot, whose BH is running, so a nested loop there cannot run it;
//! * regression tests of paths the `SAFETY` comments rely on that the other task suites do not
//!   take: the last count of a `spawn_local` cell dropped by its handle on another thread after
//!   completion, a join waker that polls and drops the handle from inside the completion, a
//!   re-registered join waker, a `Reschedule` (so a `HeaderRef`) freed on another thread, a task
//!   that owns its own join handle.

use aio_core::AioContext;
use aio_core::task::{JoinHandle, reschedule};
use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, ThreadId};

#[path = "support/ctx.rs"]
mod support;
use support::{ctx, worker};

/// A `!Send` marker.
type NotSend = PhantomData<Rc<()>>;

/// A value whose `Drop` panics.
struct PanicOnDrop;

impl Drop for PanicOnDrop {
    fn drop(&mut self) {
        panic!("PanicOnDrop dropped");
    }
}

/// Counts drops and records the thread of the last one.
#[derive(Clone, Default)]
struct Dropped(Arc<(AtomicUsize, Mutex<Option<ThreadId>>)>);

impl Dropped {
    fn count(&self) -> usize {
        self.0.0.load(SeqCst)
    }

    fn thread(&self) -> Option<ThreadId> {
        *self.0.1.lock().unwrap()
    }
}

/// A value that reports its drop to a [`Dropped`].
struct Probe(Dropped);

impl Drop for Probe {
    fn drop(&mut self) {
        *self.0.0.1.lock().unwrap() = Some(thread::current().id());
        self.0.0.0.fetch_add(1, SeqCst);
    }
}

/// A waker that counts its wake-ups, forwards them to `inner` if set, and reports its drop.
struct CountingWake {
    wakes: AtomicUsize,
    inner: Option<Waker>,
    _probe: Probe,
}

impl Wake for CountingWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wakes.fetch_add(1, SeqCst);
        if let Some(w) = &self.inner {
            w.wake_by_ref();
        }
    }
}

fn counting_waker(inner: Option<Waker>) -> (Arc<CountingWake>, Waker, Dropped) {
    let dropped = Dropped::default();
    let w = Arc::new(CountingWake {
        wakes: AtomicUsize::new(0),
        inner,
        _probe: Probe(dropped.clone()),
    });
    (w.clone(), Waker::from(w), dropped)
}

/// Polls `handle` once with `waker`; `true` if it is still pending.
fn pending<T>(handle: &mut JoinHandle<T>, waker: &Waker) -> bool {
    Pin::new(handle)
        .poll(&mut Context::from_waker(waker))
        .is_pending()
}

/// Polls `ctx` (non-blocking) until `done`, at most `max` iterations; returns `done()`.
fn poll_until(ctx: &AioContext, max: usize, mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..max {
        if done() {
            return true;
        }
        ctx.poll_nonblocking();
    }
    done()
}

/// Drops `ctx`, catching a panic of its drop (which would otherwise abort a failing test that
/// is already unwinding); `true` if the drop panicked.
fn drop_panics(ctx: AioContext) -> bool {
    catch_unwind(AssertUnwindSafe(move || drop(ctx))).is_err()
}

// ---------------------------------------------------------------------------------------------
// Finding 1: a panic escaping a task's completion leaves its slot marked running.
//
// `Cell::poll` catches the future's panics, but `Join::complete`, which it calls after,
// drops a detached task's result (user `Drop`: the output, or a panic payload) and wakes the
// join waker (user code) outside any `catch_unwind`. A panic there unwinds through `run` after
// `start_run` marked the slot running and before `finish` frees it: the slot stays `running`
// with its (finished) task forever. The context then counts the task forever, a wake-up of
// the task makes `start_run` re-schedule the slot's BH from inside that BH, every pass (the
// loop never sleeps again), and the context's drop trips `drop_all`'s
// `debug_assert!(!running)` (a panic in `Drop`).
// ---------------------------------------------------------------------------------------------

#[test]
fn a_detached_output_whose_drop_panics_frees_its_slot() {
    let ctx = ctx();
    ctx.spawn_local(async { PanicOnDrop }).detach();
    // The output's panic may propagate out of the iteration, as a callback's does.
    let _ = catch_unwind(AssertUnwindSafe(|| ctx.poll_nonblocking()));
    ctx.poll_nonblocking();
    let count = ctx.task_count();
    let drop_panicked = drop_panics(ctx);
    assert_eq!(count, 0, "the finished task still holds its slot");
    assert!(!drop_panicked, "dropping the context panicked");
}

#[test]
fn a_detached_panic_payload_whose_drop_panics_frees_its_slot() {
    let ctx = ctx();
    ctx.spawn_local(async { std::panic::panic_any(PanicOnDrop) })
        .detach();
    let _ = catch_unwind(AssertUnwindSafe(|| ctx.poll_nonblocking()));
    ctx.poll_nonblocking();
    let count = ctx.task_count();
    let drop_panicked = drop_panics(ctx);
    assert_eq!(count, 0, "the finished task still holds its slot");
    assert!(!drop_panicked, "dropping the context panicked");
}

/// A join waker that panics when woken.
struct PanickingWake;

impl Wake for PanickingWake {
    fn wake(self: Arc<Self>) {
        panic!("join waker panicked");
    }
}

#[test]
fn a_join_waker_that_panics_does_not_leave_the_slot_running() {
    let ctx = ctx();
    let mut handle = ctx.spawn_local(async { 7 });
    assert!(pending(&mut handle, &Waker::from(Arc::new(PanickingWake))));
    let _ = catch_unwind(AssertUnwindSafe(|| ctx.poll_nonblocking()));
    ctx.poll_nonblocking();
    let count = ctx.task_count();
    let finished = handle.is_finished();
    drop(handle);
    let drop_panicked = drop_panics(ctx);
    assert!(finished);
    assert_eq!(count, 0, "the finished task still holds its slot");
    assert!(!drop_panicked, "dropping the context panicked");
}

/// `Cell::poll` drops the output of a task whose future's `Drop` panicked (the task's result is
/// then that panic) outside any `catch_unwind`, before `complete`: if the output's `Drop`
/// panics too, the unwind skips the completion, so besides the stuck slot the join handle is
/// never completed nor woken (a lost wake-up: whoever awaits it hangs).
#[test]
fn a_task_whose_future_and_output_drops_both_panic_still_completes_its_handle() {
    let ctx = ctx();
    let bomb = PanicOnDrop;
    let mut handle = ctx.spawn_local(poll_fn(move |_| {
        let _ = &bomb;
        Poll::Ready(PanicOnDrop)
    }));
    let (joiner, waker, _) = counting_waker(None);
    assert!(pending(&mut handle, &waker));
    for _ in 0..3 {
        let _ = catch_unwind(AssertUnwindSafe(|| ctx.poll_nonblocking()));
    }
    let (finished, woken, count) = (
        handle.is_finished(),
        joiner.wakes.load(SeqCst),
        ctx.task_count(),
    );
    drop(handle);
    let _ = drop_panics(ctx);
    assert!(
        finished && woken == 1,
        "the handle never completes: finished {finished}, woken {woken} times"
    );
    assert_eq!(count, 0, "the finished task still holds its slot");
}

/// The same panic from the context's drop (`drop_all` cancels the task, whose completion wakes
/// the join waker): it unwinds out of `Inner::drop` before the context is marked dead, so its
/// handles keep reporting it alive and a task spawned on it afterwards is neither run nor
/// cancelled (its handle never resolves).
#[test]
fn a_join_waker_that_panics_during_the_context_drop_still_kills_the_context() {
    let ctx = ctx();
    let remote = ctx.handle();
    let mut handle = ctx.spawn_local(std::future::pending::<()>());
    assert!(pending(&mut handle, &Waker::from(Arc::new(PanickingWake))));
    let _ = drop_panics(ctx);
    let late = remote.spawn(async {});
    let (alive, late_finished) = (remote.is_alive(), late.is_finished());
    assert!(
        !alive && late_finished,
        "the dropped context's handle says alive: {alive}; a task spawned on it is cancelled: \
         {late_finished}"
    );
}

#[test]
fn a_wake_up_of_a_task_whose_completion_panicked_does_not_keep_the_loop_busy() {
    let ctx = ctx();
    let (tx, rx) = mpsc::channel();
    ctx.spawn_local(poll_fn(move |cx| {
        tx.send(cx.waker().clone()).unwrap();
        Poll::Ready(PanicOnDrop)
    }))
    .detach();
    let _ = catch_unwind(AssertUnwindSafe(|| ctx.poll_nonblocking()));
    let waker = rx.recv().unwrap();
    // A late wake-up of a finished task: one spurious pass, then nothing to do.
    waker.wake();
    ctx.poll_nonblocking();
    let busy = (0..20).filter(|_| ctx.poll_nonblocking()).count();
    let drop_panicked = drop_panics(ctx);
    assert_eq!(
        busy, 0,
        "an idle context ran a callback in every pass: the stuck slot's BH re-schedules itself"
    );
    assert!(!drop_panicked, "dropping the context panicked");
}

// ---------------------------------------------------------------------------------------------
// Finding 4: a task spawned from the drop of an aborted task cannot run in a nested loop there.
//
// `finish` frees the slot (`Tasks::remove` pushes it on the free list) and only then drops the
// owner, so an aborted task's future is dropped inside its slot's BH callback with its slot
// already free. A task spawned from that `Drop` pops the same slot (the free list is LIFO)
// and gets the same BH, which is running: a nested loop parks it, so the new task is not
// polled until the callback returns, and a `block_on` of it in the `Drop` (QEMU-style
// `AIO_WAIT_WHILE` cleanup) never returns. A task that finishes is dropped before its slot is
// freed, so the same `Drop` works there; the control case below shows it.
// ---------------------------------------------------------------------------------------------

/// A future that never completes and, when dropped, spawns a task and runs the loop (a bounded
/// `block_on`) until it finishes; records whether it did.
struct CleanupOnDrop {
    finished_in_drop: Rc<std::cell::Cell<Option<bool>>>,
    ready: bool,
}

impl Future for CleanupOnDrop {
    type Output = ();
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        if self.ready {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for CleanupOnDrop {
    fn drop(&mut self) {
        let ctx = AioContext::current().expect("dropped inside an iteration");
        let cleanup = ctx.spawn_local(async {});
        let finished = poll_until(&ctx, 20, || cleanup.is_finished());
        self.finished_in_drop.set(Some(finished));
    }
}

fn cleanup_runs_in_drop(abort: bool) -> Option<bool> {
    let ctx = ctx();
    let finished_in_drop = Rc::new(std::cell::Cell::new(None));
    let task = ctx.spawn_local(CleanupOnDrop {
        finished_in_drop: finished_in_drop.clone(),
        ready: !abort,
    });
    if abort {
        ctx.poll_nonblocking();
        task.abort();
    }
    assert!(poll_until(&ctx, 20, || finished_in_drop.get().is_some()));
    finished_in_drop.get()
}

#[test]
fn control_a_task_spawned_from_the_drop_of_a_finished_task_runs_in_a_nested_loop() {
    assert_eq!(cleanup_runs_in_drop(false), Some(true));
}

#[test]
fn a_task_spawned_from_the_drop_of_an_aborted_task_runs_in_a_nested_loop() {
    assert_eq!(
        cleanup_runs_in_drop(true),
        Some(true),
        "the cleanup task took the aborted task's slot, whose BH is running, so it was parked"
    );
}

// ---------------------------------------------------------------------------------------------
// Finding 2: the join waker is kept until the cell's last count goes.
//
// After completion the registered join waker is neither taken by the completion nor by the
// handle's drop ("left to the cell's drop"). A join waker that holds a count of the same cell
// (the task polled its own handle, here through a waker that wraps its own) then keeps the
// cell alive forever: a reference cycle, so a leak of the cell, its BH and the context's shared
// part. tokio had the same cycle (tokio-rs/tokio#4724, #6505) and fixed it by dropping the join
// waker once the task completed and the handle is gone (tokio-rs/tokio#6986).
// ---------------------------------------------------------------------------------------------

#[test]
fn a_join_waker_holding_its_own_task_is_freed_once_task_and_handle_are_gone() {
    let ctx = ctx();
    let shared: Rc<RefCell<Option<JoinHandle<()>>>> = Rc::default();
    let s = shared.clone();
    let (dropped_tx, dropped_rx) = mpsc::channel();
    let task = ctx.spawn_local(poll_fn(move |cx| {
        // Register, as the join waker of our own handle, a waker holding our own waker.
        let (_, waker, dropped) = counting_waker(Some(cx.waker().clone()));
        let mut handle = s.borrow_mut();
        assert!(pending(handle.as_mut().unwrap(), &waker));
        dropped_tx.send(dropped).unwrap();
        Poll::Ready(())
    }));
    *shared.borrow_mut() = Some(task);
    assert!(poll_until(&ctx, 10, || shared
        .borrow()
        .as_ref()
        .unwrap()
        .is_finished()));
    let dropped = dropped_rx.recv().unwrap();
    // The handle goes after completion, then the context.
    drop(shared.borrow_mut().take());
    drop(shared);
    drop(ctx);
    assert_eq!(
        dropped.count(),
        1,
        "the join waker (and so the task cell, which it keeps alive) leaked"
    );
}

// ---------------------------------------------------------------------------------------------
// Finding 3 (behaviour, not memory): dropping a `Reschedule` whose move already happened
// withdraws the move that a later `Reschedule` of the same task requested in the current poll,
// and that later `Reschedule` then reports success on the wrong context.
//
// `Reschedule::drop` clears `move_to` and `MOVING` whenever its `requested` is set, and
// `requested` stays set after the move until the future is polled again.
// ---------------------------------------------------------------------------------------------

#[test]
#[cfg_attr(
    miri,
    ignore = "behaviour, not memory; two polling threads are slow under Miri"
)]
fn dropping_a_stale_reschedule_does_not_withdraw_a_later_move() {
    let (w1, w2) = (worker(), worker());
    let ctx = ctx();
    let (t1, t2) = (w1.handle.clone(), w2.handle.clone());
    let task = ctx.spawn(async move {
        let mut first = Some(reschedule(&t1));
        let mut second = reschedule(&t2);
        let mut step = 0;
        poll_fn(move |cx| {
            step += 1;
            match step {
                // Ask for the first move; it happens when this poll returns.
                1 => {
                    assert!(Pin::new(first.as_mut().unwrap()).poll(cx).is_pending());
                    Poll::Pending
                }
                // On t1: ask for the second move, then drop the first (finished) request.
                2 => {
                    assert!(Pin::new(&mut second).poll(cx).is_pending());
                    drop(first.take());
                    Poll::Pending
                }
                _ => {
                    let result = Pin::new(&mut second).poll(cx);
                    Poll::Ready((result.is_ready(), thread::current().id()))
                }
            }
        })
        .await
    });
    let (ready, on) = ctx.block_on(task).unwrap();
    assert!(ready);
    assert_ne!(
        on, w1.id,
        "the second reschedule reported success on t1's thread"
    );
    assert_eq!(on, w2.id);
}

// ---------------------------------------------------------------------------------------------
// Regression tests of paths the SAFETY comments rely on (they pass).
// ---------------------------------------------------------------------------------------------

/// [TASK-4]: a `spawn_local` task (`!Send` future) with a `Send` output: its handle, sent to
/// another thread after completion, drops the output there and the cell's last count with it
/// (the cell is freed on that thread, its future long gone on the home thread).
#[test]
fn a_local_tasks_send_output_is_dropped_with_the_cell_by_its_handle_on_another_thread() {
    let home = thread::current().id();
    let ctx = ctx();
    let (future_dropped, output_dropped) = (Dropped::default(), Dropped::default());
    let (f, o) = (Probe(future_dropped.clone()), output_dropped.clone());
    let handle = ctx.spawn_local(async move {
        let _keep = (f, NotSend::default());
        Probe(o)
    });
    assert!(poll_until(&ctx, 10, || handle.is_finished()));
    assert_eq!(future_dropped.count(), 1);
    assert_eq!(future_dropped.thread(), Some(home));
    let other = thread::spawn(move || {
        drop(handle);
        thread::current().id()
    })
    .join()
    .unwrap();
    assert_eq!(output_dropped.count(), 1);
    assert_eq!(output_dropped.thread(), Some(other));
    drop(ctx);
    assert_eq!(future_dropped.count(), 1);
}

/// [TASK-5]: the completion reads the join waker (`waker.with`) while that waker polls the
/// handle (taking the output) and drops it, re-entrantly on the task's thread: the consumer
/// must touch neither the waker nor the output's borrow the producer holds.
#[test]
fn a_join_waker_that_takes_and_drops_the_handle_inside_the_completion() {
    /// Polls and drops the handle it finds when woken.
    struct Joiner {
        handle: Mutex<Option<JoinHandle<Probe>>>,
        got: AtomicBool,
    }
    impl Wake for Joiner {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            let mut handle = self.handle.lock().unwrap().take().unwrap();
            let (_, noop, _) = counting_waker(None);
            match Pin::new(&mut handle).poll(&mut Context::from_waker(&noop)) {
                Poll::Ready(Ok(output)) => {
                    drop(output);
                    self.got.store(true, SeqCst);
                }
                other => panic!("the handle was not ready: {:?}", other.is_pending()),
            }
            drop(handle);
        }
    }
    let ctx = ctx();
    let dropped = Dropped::default();
    let d = dropped.clone();
    let mut handle = ctx.spawn_local(async move { Probe(d) });
    let joiner = Arc::new(Joiner {
        handle: Mutex::new(None),
        got: AtomicBool::new(false),
    });
    let waker = Waker::from(joiner.clone());
    assert!(pending(&mut handle, &waker));
    drop(waker);
    *joiner.handle.lock().unwrap() = Some(handle);
    assert!(poll_until(&ctx, 10, || joiner.got.load(SeqCst)));
    assert_eq!(dropped.count(), 1);
    drop(ctx);
    assert_eq!(dropped.count(), 1);
}

/// [TASK-5]: a handle polled with one waker, then with another: the first is dropped when it
/// is replaced, only the second is woken, and it is freed with the handle.
#[test]
fn a_replaced_join_waker_is_dropped_at_once_and_only_the_last_is_woken() {
    let ctx = ctx();
    let mut handle = ctx.spawn_local(async { 1 });
    let (first, w1, _) = counting_waker(None);
    let (second, w2, d2) = counting_waker(None);
    assert!(pending(&mut handle, &w1));
    assert!(pending(&mut handle, &w1), "the same waker again");
    drop(w1);
    assert!(pending(&mut handle, &w2));
    drop(w2);
    assert_eq!(Arc::strong_count(&first), 1, "the replaced waker was kept");
    assert_eq!(
        Arc::strong_count(&second),
        2,
        "the registered waker is kept"
    );
    assert!(poll_until(&ctx, 10, || handle.is_finished()));
    assert_eq!(first.wakes.load(SeqCst), 0);
    assert_eq!(second.wakes.load(SeqCst), 1);
    drop(second);
    drop(first);
    assert!(matches!(
        Pin::new(&mut handle).poll(&mut Context::from_waker(&counting_waker(None).1)),
        Poll::Ready(Ok(1))
    ));
    drop(handle);
    drop(ctx);
    assert_eq!(d2.count(), 1);
}

/// [TASK-4], `HeaderRef`'s `Send`/`Sync`: a `Reschedule` that requested a move is sent to
/// another thread by its task, which then finishes (detached): that thread's drop of the
/// `Reschedule` withdraws nothing that matters and frees the cell there.
#[test]
fn a_reschedule_sent_away_by_its_task_frees_the_cell_on_another_thread() {
    let other = worker();
    let ctx = ctx();
    let (tx, rx) = mpsc::channel();
    let target = other.handle.clone();
    let output = Dropped::default();
    let o = output.clone();
    ctx.spawn(async move {
        let mut r = reschedule(&target);
        poll_fn(|cx| {
            assert!(Pin::new(&mut r).poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        tx.send(r).unwrap();
        Probe(o)
    })
    .detach();
    assert!(poll_until(&ctx, 10, || output.count() == 1));
    assert_eq!(ctx.task_count(), 0, "a finished task does not move");
    let r = rx.recv().unwrap();
    thread::spawn(move || drop(r)).join().unwrap();
    drop(ctx);
}

/// [TASK-1]/[TASK-4]: a task whose future owns its own join handle (aborting itself through
/// it, or finishing): the handle's drop runs inside the future's drop, in `cancel` or after
/// `Ready`, before the completion; the output is dropped once, on the home thread.
#[test]
fn a_task_owning_its_own_join_handle_finishes_or_aborts_cleanly() {
    let home = thread::current().id();
    for abort in [false, true] {
        let ctx = ctx();
        let shared: Rc<RefCell<Option<JoinHandle<Probe>>>> = Rc::default();
        let output = Dropped::default();
        let (s, o) = (shared.clone(), output.clone());
        let mut kept = None;
        let handle = ctx.spawn_local(poll_fn(move |cx| {
            if abort {
                // Abort ourselves and keep the handle in the future until it is dropped.
                if kept.is_none() {
                    kept = s.borrow_mut().take();
                }
                kept.as_ref().unwrap().abort();
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                drop(s.borrow_mut().take());
                Poll::Ready(Probe(o.clone()))
            }
        }));
        *shared.borrow_mut() = Some(handle);
        assert!(poll_until(&ctx, 10, || ctx.task_count() == 0));
        if abort {
            assert_eq!(output.count(), 0);
        } else {
            assert_eq!(output.count(), 1);
            assert_eq!(output.thread(), Some(home));
        }
        drop(shared);
        drop(ctx);
    }
}
