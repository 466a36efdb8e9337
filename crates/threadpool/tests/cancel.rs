//! Cancelling a queued request: it leaves the queue at once (`stats().queued`, and the count
//! that decides whether to create a thread), no thread is created for it, and its completion
//! (`Err(Cancelled)`) is delivered exactly once.

mod common;

use common::{block_on, ctx, eventually_polling};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::mpsc;
use threadpool::{Error, Status, ThreadPool};

#[test]
fn a_cancelled_request_leaves_the_queue_and_gets_no_thread() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    let (release, gate) = mpsc::channel::<()>();
    let (started, has_started) = mpsc::channel();
    let busy = pool.submit(move || {
        started.send(()).unwrap();
        gate.recv().unwrap();
    });
    eventually_polling(&ctx, "the first request runs", || {
        has_started.try_recv().is_ok()
    });
    let s = pool.stats();
    assert_eq!(
        (s.threads, s.idle, s.queued, s.threads_created),
        (1, 0, 0, 1)
    );

    // No worker is idle: the second request asks the context for a thread, which the context
    // would create on its next poll.
    let results = Rc::new(RefCell::new(Vec::new()));
    let r = results.clone();
    let ticket = pool.submit_with(|| 7, move |result| r.borrow_mut().push(result));
    let s = pool.stats();
    assert_eq!((s.threads, s.queued), (2, 1), "one thread on its way");

    assert!(ticket.cancel());
    let s = pool.stats();
    assert_eq!(s.queued, 0, "a cancelled request leaves the queue at once");
    assert_eq!(s.threads, 1, "the thread asked for it alone is withdrawn");
    assert_eq!(ticket.status(), Status::Finished);
    assert!(!ticket.cancel(), "cancelled once");

    // The context's next iterations deliver the completion, once, and create no thread.
    eventually_polling(&ctx, "the completion is delivered", || {
        ticket.status() == Status::Completed
    });
    for _ in 0..3 {
        ctx.poll_nonblocking();
    }
    assert_eq!(*results.borrow(), [Err(Error::Cancelled)]);
    let s = pool.stats();
    assert_eq!((s.threads, s.queued, s.threads_created), (1, 0, 1));

    // A request submitted now counts only itself: it gets a thread of its own.
    let next = pool.submit(|| 8);
    assert_eq!(pool.stats().queued, 1);
    assert_eq!(block_on(&ctx, next), Ok(8));
    assert_eq!(pool.stats().threads_created, 2);
    release.send(()).unwrap();
    assert_eq!(block_on(&ctx, busy), Ok(()));
}

#[test]
fn cancelling_keeps_the_thread_that_other_requests_need() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    pool.set_limits(0, 2).unwrap();
    let (release, gate) = mpsc::channel::<()>();
    let (started, has_started) = mpsc::channel();
    let busy = pool.submit(move || {
        started.send(()).unwrap();
        gate.recv().unwrap();
    });
    eventually_polling(&ctx, "the first request runs", || {
        has_started.try_recv().is_ok()
    });
    // Two more requests, one thread allowed for them (the maximum is 2).
    let a = pool.submit(|| 1);
    let b = pool.submit(|| 2);
    assert_eq!((pool.stats().threads, pool.stats().queued), (2, 2));
    assert!(a.cancel());
    assert_eq!(
        (pool.stats().threads, pool.stats().queued),
        (2, 1),
        "the thread still has a request to run"
    );
    assert_eq!(block_on(&ctx, b), Ok(2));
    assert_eq!(block_on(&ctx, a), Err(Error::Cancelled));
    assert_eq!(pool.stats().threads_created, 2);
    release.send(()).unwrap();
    assert_eq!(block_on(&ctx, busy), Ok(()));
}

#[test]
fn cancelling_keeps_the_threads_of_the_minimum() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    pool.set_limits(2, 4).unwrap();
    let req = pool.submit(|| 1);
    assert_eq!((pool.stats().threads, pool.stats().queued), (2, 1));
    assert!(req.cancel());
    assert_eq!((pool.stats().threads, pool.stats().queued), (2, 0));
    assert_eq!(block_on(&ctx, req), Err(Error::Cancelled));
    eventually_polling(&ctx, "the minimum is reached", || pool.stats().idle == 2);
    assert_eq!(pool.stats().threads_created, 2);
}
