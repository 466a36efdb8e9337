//! `Request` as a future: it needs only a waker, becomes ready when the context delivers the
//! completion (never before), can be awaited on another thread, and gives its result once.

mod common;

use common::{Flag, block_on, block_on_parked, ctx, eventually, poll_until};
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::Duration;
use threadpool::{Error, Status, ThreadPool, Ticket};

#[test]
fn block_on_polls_the_context_until_the_future_is_ready() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    assert_eq!(block_on(&ctx, pool.submit(|| 6 * 7)), Ok(42));
    let words = block_on(&ctx, async {
        let a = pool.submit(|| "blocking").await.unwrap();
        let b = pool.submit(|| "work").await.unwrap();
        format!("{a} {b}")
    });
    assert_eq!(words, "blocking work");
}

#[test]
fn not_ready_before_the_context_delivers_the_completion() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    let req = pool.submit(|| 1);
    let flag = Arc::new(Flag::default());
    let waker = Waker::from(flag.clone());
    let mut cx = Context::from_waker(&waker);
    let mut req = pin!(req);
    assert!(req.as_mut().poll(&mut cx).is_pending());
    // Let the worker finish; only the thread creation needs the context.
    eventually("the work has finished", || {
        ctx.poll_nonblocking();
        req.status() == Status::Finished || req.status() == Status::Completed
    });
    if req.status() == Status::Finished {
        assert!(
            req.as_mut().poll(&mut cx).is_pending(),
            "finished is not ready"
        );
        assert!(!flag.take());
        poll_until(&ctx, || req.status() == Status::Completed);
    }
    assert!(flag.take(), "the completion woke the waker");
    assert_eq!(req.as_mut().poll(&mut cx), Poll::Ready(Ok(1)));
}

#[test]
fn the_latest_waker_is_woken() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    pool.set_limits(0, 1).unwrap();
    let (tx, rx) = mpsc::channel::<()>();
    let mut req = pin!(pool.submit(move || rx.recv().unwrap()));
    let (first, second) = (Arc::new(Flag::default()), Arc::new(Flag::default()));
    let w1 = Waker::from(first.clone());
    let w2 = Waker::from(second.clone());
    assert!(
        req.as_mut()
            .poll(&mut Context::from_waker(&w1))
            .is_pending()
    );
    assert!(
        req.as_mut()
            .poll(&mut Context::from_waker(&w2))
            .is_pending()
    );
    tx.send(()).unwrap();
    poll_until(&ctx, || req.status() == Status::Completed);
    assert!(!first.take());
    assert!(second.take());
    assert_eq!(
        req.as_mut().poll(&mut Context::from_waker(&w2)),
        Poll::Ready(Ok(()))
    );
}

#[test]
fn try_take_gives_the_result_once() {
    let ctx = ctx();
    let req = ThreadPool::of(&ctx).submit(|| String::from("once"));
    assert_eq!(req.try_take(), None);
    poll_until(&ctx, || req.status() == Status::Completed);
    assert_eq!(req.try_take(), Some(Ok("once".to_owned())));
    assert_eq!(req.try_take(), None);
}

#[test]
#[should_panic(expected = "polled after it returned its result")]
fn polling_after_ready_panics() {
    let ctx = ctx();
    let mut req = pin!(ThreadPool::of(&ctx).submit(|| ()));
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if req.as_mut().poll(&mut cx).is_ready() {
            break;
        }
        ctx.poll();
    }
    let _ = req.as_mut().poll(&mut cx);
}

#[test]
fn a_request_submitted_elsewhere_is_awaited_there() {
    let ctx = ctx();
    let handle = ThreadPool::of(&ctx).handle();
    let home = thread::current().id();
    let wake_home = ctx.handle();
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let remote = thread::spawn(move || {
        let req = handle.submit(move || thread::current().id()).unwrap();
        // Futures are `Send`: this one could as well move to a third thread.
        let ran_on = block_on_parked(req).unwrap();
        assert_ne!(ran_on, home, "the work ran on a worker");
        // Tell the context's thread, which may be asleep in `poll`, that we are done.
        d.store(true, Ordering::SeqCst);
        wake_home.notify();
    });
    poll_until(&ctx, || done.load(Ordering::SeqCst));
    remote.join().unwrap();
}

#[test]
fn cancelling_a_queued_request_resolves_it_to_cancelled() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    pool.set_limits(0, 1).unwrap();
    let (tx, rx) = mpsc::channel::<()>();
    let busy = pool.submit(move || rx.recv().unwrap());
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let queued = pool.submit(move || {
        r.fetch_add(1, Ordering::SeqCst);
    });
    let ticket = queued.ticket();
    assert!(ticket.cancel());
    assert!(!queued.cancel(), "already cancelled");
    assert_eq!(
        queued.status(),
        Status::Finished,
        "waits for the completion pass"
    );
    assert_eq!(block_on(&ctx, queued), Err(Error::Cancelled));
    assert_eq!(ticket.status(), Status::Completed);
    tx.send(()).unwrap();
    assert_eq!(block_on(&ctx, busy), Ok(()));
    assert_eq!(ran.load(Ordering::SeqCst), 0, "cancelled work never runs");
}

/// Counts its drops.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn a_dropped_request_still_runs_and_its_result_is_dropped() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    let drops = Arc::new(AtomicUsize::new(0));
    let d = drops.clone();
    let req = pool.submit(move || Counted(d));
    let ticket = req.ticket();
    drop(req);
    poll_until(&ctx, || ticket.status() == Status::Completed);
    assert_eq!(
        drops.load(Ordering::SeqCst),
        1,
        "the result was dropped once"
    );
}

/// A waker whose drop asks its request for its status, which takes the request's lock.
struct StatusOnDrop {
    ticket: Ticket,
    seen: mpsc::Sender<Status>,
}

impl Wake for StatusOnDrop {
    fn wake(self: Arc<Self>) {}
}

impl Drop for StatusOnDrop {
    fn drop(&mut self) {
        let _ = self.seen.send(self.ticket.status());
    }
}

#[test]
fn a_replaced_waker_is_dropped_outside_the_request_lock() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    let (release, gate) = mpsc::channel::<()>();
    let req = pool.submit(move || gate.recv().unwrap());
    let (seen, status_seen) = mpsc::channel();
    let first = Waker::from(Arc::new(StatusOnDrop {
        ticket: req.ticket(),
        seen,
    }));
    // Polled on another thread, so that a deadlock in the waker's drop fails the test instead
    // of hanging it.
    let poller = thread::spawn(move || {
        let mut req = Box::pin(req);
        assert!(
            req.as_mut()
                .poll(&mut Context::from_waker(&first))
                .is_pending()
        );
        drop(first); // the request holds the last reference
        // Another waker replaces it, and the request drops the first one.
        assert!(
            req.as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
                .is_pending()
        );
        req
    });
    let Ok(status) = status_seen.recv_timeout(Duration::from_secs(20)) else {
        // The poller holds the request's lock forever: tearing down the pool would block on it.
        std::mem::forget(pool);
        std::mem::forget(ctx);
        panic!("the replaced waker's drop ran under the request's lock (deadlock)");
    };
    assert_eq!(status, Status::Queued, "the context has not polled yet");
    let req = poller.join().unwrap();
    release.send(()).unwrap();
    assert_eq!(block_on(&ctx, req), Ok(()));
}
