//! Panics: work that panics completes with `Error::Panicked` and its worker goes on; a
//! completion callback that panics propagates out of `poll`, and the other completions of its
//! batch are delivered by the next poll, each exactly once.

mod common;

use common::{block_on, ctx, poll_until};
use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, catch_unwind, panic_any};
use std::rc::Rc;
use std::sync::mpsc;
use threadpool::{Error, Status, ThreadPool};

#[test]
fn work_that_panics_completes_with_an_error_and_the_worker_goes_on() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    pool.set_limits(0, 1).unwrap();
    let r = block_on(&ctx, pool.submit(|| -> u32 { panic!("boom") }));
    assert_eq!(r, Err(Error::Panicked("boom".into())));
    let r = block_on(&ctx, pool.submit(|| -> u32 { panic!("formatted {}", 7) }));
    assert_eq!(r, Err(Error::Panicked("formatted 7".into())));
    let r = block_on(&ctx, pool.submit(|| -> u32 { panic_any(42u64) }));
    assert_eq!(r, Err(Error::Panicked("non-string panic payload".into())));

    // The same single worker serves the rest.
    let sum: u32 = (1..=10)
        .map(|i| block_on(&ctx, pool.submit(move || i)).unwrap())
        .sum();
    assert_eq!(sum, 55);
    let s = pool.stats();
    assert_eq!((s.threads_created, s.threads_exited), (1, 0));
}

#[test]
fn a_panicking_callback_gets_the_error_too() {
    let ctx = ctx();
    let seen = Rc::new(RefCell::new(None));
    let s = seen.clone();
    ThreadPool::of(&ctx).submit_with(
        || -> () { panic!("in work") },
        move |r| {
            *s.borrow_mut() = Some(r);
        },
    );
    poll_until(&ctx, || seen.borrow().is_some());
    assert_eq!(
        seen.borrow_mut().take(),
        Some(Err(Error::Panicked("in work".into())))
    );
}

#[test]
fn a_callback_that_panics_leaves_the_rest_of_its_batch_for_the_next_poll() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    // One worker, created before the test proper so that no poll is needed to create it.
    pool.set_limits(1, 1).unwrap();
    common::eventually_polling(&ctx, "the worker is idle", || pool.stats().idle == 1);
    // Hold the worker so that the three requests finish together, as one batch.
    let (tx, rx) = mpsc::channel::<()>();
    let gate = pool.submit(move || rx.recv().unwrap());
    let calls = Rc::new(Cell::new(0));
    let tickets: Vec<_> = (0..3)
        .map(|i| {
            let c = calls.clone();
            pool.submit_with(
                move || i,
                move |r| {
                    c.set(c.get() + 1);
                    if r == Ok(0) {
                        panic!("callback 0 panics");
                    }
                },
            )
        })
        .collect();
    tx.send(()).unwrap();
    common::eventually("the batch has finished", || {
        tickets.iter().all(|t| t.status() == Status::Finished)
    });
    drop(gate);

    let panicked = catch_unwind(AssertUnwindSafe(|| {
        while calls.get() < 3 {
            ctx.poll();
        }
    }));
    assert!(panicked.is_err(), "the first callback panicked out of poll");
    assert_eq!(calls.get(), 1, "the pass stopped at the panic");
    poll_until(&ctx, || calls.get() == 3);
    while ctx.poll_nonblocking() {}
    assert_eq!(calls.get(), 3, "each callback ran once");
    assert!(tickets.iter().all(|t| t.status() == Status::Completed));
}

/// Wakes by panicking.
struct PanickingWaker;

impl std::task::Wake for PanickingWaker {
    fn wake(self: std::sync::Arc<Self>) {
        panic!("waker panics");
    }
}

#[test]
fn a_waker_that_panics_leaves_the_rest_of_its_batch_for_the_next_poll() {
    use std::future::Future;
    use std::task::{Context, Waker};

    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    pool.set_limits(1, 1).unwrap();
    common::eventually_polling(&ctx, "the worker is idle", || pool.stats().idle == 1);
    let (tx, rx) = mpsc::channel::<()>();
    let gate = pool.submit(move || rx.recv().unwrap());
    let mut first = std::pin::pin!(pool.submit(|| 1));
    let waker = Waker::from(std::sync::Arc::new(PanickingWaker));
    assert!(
        first
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending()
    );
    let second_done = Rc::new(Cell::new(false));
    let d = second_done.clone();
    let second = pool.submit_with(
        || 2,
        move |r| {
            assert_eq!(r, Ok(2));
            d.set(true);
        },
    );
    tx.send(()).unwrap();
    common::eventually("the batch has finished", || {
        first.status() == Status::Finished && second.status() == Status::Finished
    });
    drop(gate);

    let panicked = catch_unwind(AssertUnwindSafe(|| {
        while !second_done.get() {
            ctx.poll();
        }
    }));
    assert!(panicked.is_err(), "the waker panicked out of poll");
    assert!(!second_done.get());
    poll_until(&ctx, || second_done.get());
    assert_eq!(
        first.try_take(),
        Some(Ok(1)),
        "the result was delivered before the wake"
    );
}
