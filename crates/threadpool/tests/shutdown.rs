//! Shutdown: dropping the context (or a pool) with requests queued, running, and finished but
//! not delivered. Dropping never waits for a worker; queued work is dropped unrun; futures
//! resolve (queued: `Err(ShutDown)`, otherwise with their result, woken from the worker if
//! need be); callbacks are dropped unrun; every closure and result is dropped exactly once.

mod common;

use common::{block_on, block_on_parked, ctx, eventually, eventually_polling};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;
use threadpool::{Error, Status, ThreadPool};

/// How many closures and results ran and were dropped.
#[derive(Default)]
struct Counters {
    work_ran: AtomicUsize,
    work_dropped: AtomicUsize,
    callback_ran: AtomicUsize,
    callback_dropped: AtomicUsize,
    result_dropped: AtomicUsize,
}

fn count(c: &AtomicUsize) -> usize {
    c.load(Ordering::SeqCst)
}

/// Adds one to its counter when dropped.
struct DropCount(Arc<Counters>, fn(&Counters) -> &AtomicUsize);

impl Drop for DropCount {
    fn drop(&mut self) {
        (self.1)(&self.0).fetch_add(1, Ordering::SeqCst);
    }
}

/// A result value that counts its drop.
struct Output(#[allow(dead_code)] DropCount);

fn work(c: &Arc<Counters>) -> impl FnOnce() -> Output + Send + 'static {
    let guard = DropCount(c.clone(), |c| &c.work_dropped);
    let c = c.clone();
    move || {
        let _guard = guard;
        c.work_ran.fetch_add(1, Ordering::SeqCst);
        Output(DropCount(c, |c| &c.result_dropped))
    }
}

fn callback(c: &Arc<Counters>) -> impl FnOnce(Result<Output, Error>) + Send + 'static {
    let guard = DropCount(c.clone(), |c| &c.callback_dropped);
    let c = c.clone();
    move |_| {
        let _guard = guard;
        c.callback_ran.fetch_add(1, Ordering::SeqCst);
    }
}

/// A request that runs until released (or for 2 s at most) and records that it finished.
fn held(finished: &Arc<AtomicBool>) -> (mpsc::Sender<()>, impl FnOnce() -> u32 + Send + 'static) {
    let (tx, rx) = mpsc::channel::<()>();
    let f = finished.clone();
    let work = move || {
        let _ = rx.recv_timeout(Duration::from_secs(2));
        f.store(true, Ordering::SeqCst);
        7
    };
    (tx, work)
}

#[test]
fn dropping_the_context_with_queued_and_running_work() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    let handle = pool.handle();
    pool.set_limits(1, 1).unwrap();
    eventually_polling(&ctx, "the worker is idle", || pool.stats().idle == 1);

    let finished = Arc::new(AtomicBool::new(false));
    let (release, long) = held(&finished);
    let running = pool.submit(long);
    eventually("the long request runs", || {
        running.status() == Status::Running
    });

    let c = Arc::new(Counters::default());
    let queued_future = pool.submit(work(&c));
    let queued_callback = pool.submit_with(work(&c), callback(&c));
    let detached = pool.submit(work(&c)).ticket();
    let remote = handle.submit_with(work(&c), callback(&c)).unwrap();
    for t in [&queued_callback, &detached, &remote] {
        assert_eq!(t.status(), Status::Queued);
    }

    drop(pool);
    drop(ctx);
    assert!(
        !finished.load(Ordering::SeqCst),
        "dropping the context did not wait for the running request"
    );

    // Queued work was dropped unrun; callbacks were dropped unrun.
    assert_eq!(count(&c.work_ran), 0);
    assert_eq!(count(&c.work_dropped), 4);
    assert_eq!(count(&c.callback_ran), 0);
    assert_eq!(count(&c.callback_dropped), 2);
    assert_eq!(block_on_parked(queued_future).err(), Some(Error::ShutDown));
    for t in [&queued_callback, &detached, &remote] {
        assert_eq!(t.status(), Status::Abandoned);
        assert!(!t.cancel(), "nothing left to cancel");
    }

    // The pool takes nothing more.
    assert!(handle.is_closed());
    assert_eq!(handle.submit(work(&c)).err(), Some(Error::ShutDown));
    assert_eq!(
        handle.submit_with(work(&c), callback(&c)).err(),
        Some(Error::ShutDown)
    );
    assert_eq!(count(&c.work_dropped), 6);
    assert_eq!(count(&c.callback_dropped), 3);

    // The running request finishes on its worker, and its future gets the result from there.
    assert_eq!(running.status(), Status::Running);
    release.send(()).unwrap();
    assert_eq!(block_on_parked(running), Ok(7));
    eventually("the worker exits", || handle.stats().threads == 0);
    let s = handle.stats();
    assert_eq!((s.threads_created, s.threads_exited), (1, 1));

    assert_eq!(count(&c.work_ran), 0);
    assert_eq!(
        count(&c.result_dropped),
        0,
        "no queued work ran, so no result"
    );
    assert_eq!(Arc::strong_count(&c), 1, "every closure was freed");
}

#[test]
fn finished_but_undelivered_completions_at_shutdown() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    pool.set_limits(1, 1).unwrap();
    eventually_polling(&ctx, "the worker is idle", || pool.stats().idle == 1);

    let c = Arc::new(Counters::default());
    let fut = pool.submit(work(&c));
    let cb = pool.submit_with(work(&c), callback(&c));
    let detached = pool.submit(work(&c)).ticket();
    // No poll: the three finish but are not delivered.
    eventually("all finished", || {
        [fut.status(), cb.status(), detached.status()] == [Status::Finished; 3]
    });
    drop(ctx);
    drop(pool);

    assert_eq!(count(&c.work_ran), 3);
    assert_eq!(count(&c.callback_ran), 0, "the callback never runs");
    assert_eq!(count(&c.callback_dropped), 1);
    assert_eq!(count(&c.result_dropped), 2, "results nobody can take");
    assert_eq!(cb.status(), Status::Abandoned);
    assert_eq!(detached.status(), Status::Abandoned);
    assert_eq!(fut.status(), Status::Completed);
    let output = block_on_parked(fut).expect("the future keeps its result");
    drop(output);
    assert_eq!(count(&c.result_dropped), 3);
    assert_eq!(
        Arc::strong_count(&c),
        1,
        "every closure and result was freed"
    );
}

#[test]
fn dropping_a_private_pool_leaves_the_context_working() {
    let ctx = ctx();
    let pool = ThreadPool::new(&ctx);
    pool.set_limits(1, 1).unwrap();
    eventually_polling(&ctx, "the worker is idle", || pool.stats().idle == 1);
    let handle = pool.handle();

    let finished = Arc::new(AtomicBool::new(false));
    let (release, long) = held(&finished);
    let running = pool.submit_with(long, |_| panic!("a dropped pool runs no callback"));
    eventually("the long request runs", || {
        running.status() == Status::Running
    });
    let c = Arc::new(Counters::default());
    let queued = pool.submit_with(work(&c), callback(&c));

    drop(pool);
    assert!(!finished.load(Ordering::SeqCst), "the drop did not wait");
    assert!(handle.is_closed());
    assert_eq!(queued.status(), Status::Abandoned);
    assert_eq!(count(&c.work_dropped), 1);
    assert_eq!(count(&c.callback_dropped), 1);

    // The context and its own pool carry on, and nothing of the dropped pool runs there.
    assert_eq!(
        block_on(&ctx, ThreadPool::of(&ctx).submit(|| "still here")),
        Ok("still here")
    );
    release.send(()).unwrap();
    eventually("the worker exits", || handle.stats().threads == 0);
    while ctx.poll_nonblocking() {}
    assert_eq!(running.status(), Status::Abandoned);
    assert_eq!(count(&c.work_ran) + count(&c.callback_ran), 0);
    assert_eq!(Arc::strong_count(&c), 1);
}

#[test]
fn a_private_pool_that_outlives_its_context_is_shut_down() {
    let ctx = ctx();
    let pool = ThreadPool::new(&ctx);
    let c = Arc::new(Counters::default());
    drop(ctx);

    assert!(pool.handle().is_closed());
    let fut = pool.submit(work(&c));
    assert_eq!(fut.status(), Status::Completed);
    assert_eq!(block_on_parked(fut).err(), Some(Error::ShutDown));
    let cb = pool.submit_with(work(&c), callback(&c));
    assert_eq!(cb.status(), Status::Abandoned);
    assert_eq!(count(&c.work_ran) + count(&c.callback_ran), 0);
    assert_eq!(count(&c.work_dropped), 2);
    assert_eq!(count(&c.callback_dropped), 1);
    assert_eq!(pool.stats().threads, 0);
    drop(pool);
    assert_eq!(Arc::strong_count(&c), 1);
}
