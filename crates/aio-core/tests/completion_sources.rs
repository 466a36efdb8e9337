//! `AioContext::add_completion_source` and `add_completion_pending`: a source runs in every
//! iteration, nested ones included, and while a pending check says the source holds
//! completions, no wait sleeps (a blocking poll, and an outer loop's `prepare`).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[path = "support/ctx.rs"]
mod support;
use support::ctx;

/// A source holding completions (here: numbers) it runs one per call; a blocking poll with
/// nothing else to do runs the next one at once instead of sleeping, and once none is held,
/// a blocking poll sleeps until its timer.
#[test]
fn a_blocking_poll_does_not_sleep_while_a_source_holds_completions() {
    let ctx = ctx();
    let held: Rc<RefCell<VecDeque<u32>>> = Rc::new(RefCell::new((0..5).collect()));
    let ran = Rc::new(RefCell::new(Vec::new()));
    let (h, r) = (held.clone(), ran.clone());
    ctx.add_completion_source(Rc::new(move |_ctx: &aio_core::AioContext| {
        let next = h.borrow_mut().pop_front();
        next.map(|n| r.borrow_mut().push(n)).is_some()
    }));
    let h = held.clone();
    ctx.add_completion_pending(Rc::new(move || !h.borrow().is_empty()));
    let start = Instant::now();
    for _ in 0..5 {
        assert!(ctx.poll(), "a held completion ran: progress");
    }
    assert_eq!(*ran.borrow(), vec![0, 1, 2, 3, 4]);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    // Nothing held: the next blocking poll sleeps until the timer.
    let fired = Arc::new(AtomicBool::new(false));
    let f = fired.clone();
    let timer = ctx.timer(
        aio_core::ClockType::Realtime,
        aio_core::Scale::MS,
        move || f.store(true, Ordering::SeqCst),
    );
    timer.arm_after(Duration::from_millis(50));
    let start = Instant::now();
    while !fired.load(Ordering::SeqCst) {
        ctx.poll();
    }
    assert!(
        start.elapsed() >= Duration::from_millis(45),
        "{:?}",
        start.elapsed()
    );
}

/// A callback run by the source polls the context (nested) and waits for the next held
/// completion: the nested iteration's wait does not sleep, and its source runs it.
#[test]
fn a_nested_poll_reaches_the_next_held_completion() {
    let ctx = ctx();
    type Job = Box<dyn FnOnce()>;
    let held: Rc<RefCell<VecDeque<Job>>> = Rc::default();
    let h = held.clone();
    ctx.add_completion_source(Rc::new(move |_ctx: &aio_core::AioContext| {
        let next = h.borrow_mut().pop_front();
        next.map(|job| job()).is_some()
    }));
    let h = held.clone();
    ctx.add_completion_pending(Rc::new(move || !h.borrow().is_empty()));
    let second = Rc::new(Cell::new(false));
    let first_done = Rc::new(Cell::new(false));
    let (s, d) = (second.clone(), first_done.clone());
    held.borrow_mut().push_back(Box::new(move || {
        let ctx = aio_core::AioContext::current().unwrap();
        let start = Instant::now();
        while !s.get() {
            ctx.poll();
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the nested wait slept"
            );
        }
        d.set(true);
    }));
    let s = second.clone();
    held.borrow_mut().push_back(Box::new(move || s.set(true)));
    ctx.poll();
    assert!(first_done.get() && second.get());
}
