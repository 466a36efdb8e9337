//! Workers started up front (`ThreadPool::prestart`, `PoolHandle::prestart`): without them a
//! fresh pool runs nothing until the context polls (QEMU's behaviour, kept); with them, work
//! submitted from the context's thread or another one runs while nobody polls, and a thread
//! that submits and then blocks on the work's effect gets it. Also the limits it sets, the
//! backlog of threads waiting for the loop, and its errors.

mod common;

use common::{ctx, eventually, poll_until};
use std::io;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;
use threadpool::{Error, LimitsError, ThreadPool};

/// Long enough for a worker that exists to run a trivial closure; only used to show that
/// something does *not* happen, so it never makes a passing test flaky.
const NOT_YET: Duration = Duration::from_millis(50);

/// Long enough to count as a hang.
const HANG: Duration = Duration::from_secs(20);

#[test]
fn a_fresh_pool_runs_nothing_until_the_context_polls() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    let (tx, rx) = mpsc::channel();
    let req = pool.submit(move || tx.send(7).unwrap());
    assert_eq!(
        rx.recv_timeout(NOT_YET),
        Err(mpsc::RecvTimeoutError::Timeout),
        "no worker exists until the loop creates one"
    );
    assert_eq!(pool.stats().threads_created, 0);
    ctx.poll_nonblocking(); // the spawn bottom half creates the worker
    assert_eq!(rx.recv_timeout(HANG), Ok(7));
    poll_until(&ctx, || req.try_take().is_some());
}

#[test]
fn after_prestart_a_submit_then_a_blocking_wait_completes_without_polling() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    assert_eq!(pool.prestart(2).unwrap(), 2);
    assert_eq!(pool.stats().threads, 2);

    // On the context's thread: submit, then block without polling.
    let (tx, rx) = mpsc::channel();
    let t = tx.clone();
    let req = pool.submit(move || {
        t.send("home").unwrap();
        6 * 7
    });
    assert_eq!(rx.recv_timeout(HANG), Ok("home"));

    // On another thread: submit through the handle, then block on the work's effect, while
    // the context's thread blocks in `join`.
    let handle = pool.handle();
    let remote = thread::spawn(move || {
        let (tx2, rx2) = mpsc::channel();
        let req = handle.submit(move || tx2.send("remote").unwrap()).unwrap();
        (rx2.recv_timeout(HANG), req)
    });
    let (got, remote_req) = remote.join().unwrap();
    assert_eq!(got, Ok("remote"));
    drop(tx);

    // The completions themselves are delivered by the loop.
    assert_eq!(
        req.try_take(),
        None,
        "not delivered before the context polls"
    );
    poll_until(&ctx, || {
        req.status() == threadpool::Status::Completed
            && remote_req.status() == threadpool::Status::Completed
    });
    assert_eq!(req.try_take(), Some(Ok(42)));
    assert_eq!(remote_req.try_take(), Some(Ok(())));
    assert_eq!(
        pool.stats().threads_created,
        2,
        "no thread beyond the prestarted ones"
    );
}

#[test]
fn prestarted_threads_are_kept_as_the_minimum() {
    let ctx = ctx();
    let pool = ThreadPool::new(&ctx);
    pool.set_idle_timeout(Duration::from_millis(1));
    assert_eq!(pool.prestart(3).unwrap(), 3);
    assert_eq!(pool.limits(), (3, 64));
    eventually("3 idle workers", || pool.stats().idle == 3);
    thread::sleep(Duration::from_millis(20)); // many idle timeouts
    let s = pool.stats();
    assert_eq!(
        (s.threads, s.threads_exited),
        (3, 0),
        "the minimum keeps them"
    );
    // Asking for fewer, or as many, creates nothing and keeps the larger minimum.
    assert_eq!(pool.prestart(2).unwrap(), 0);
    assert_eq!(pool.handle().prestart(3).unwrap(), 0);
    assert_eq!(pool.limits(), (3, 64));
    // From another thread, through the handle.
    let handle = pool.handle();
    let created = thread::spawn(move || handle.prestart(4).unwrap())
        .join()
        .unwrap();
    assert_eq!(created, 1);
    assert_eq!(pool.stats().threads, 4);
    eventually("4 idle workers", || pool.stats().idle == 4);
}

#[test]
fn prestart_creates_the_threads_queued_requests_wait_for() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    let (tx, rx) = mpsc::channel();
    let tickets: Vec<_> = (0..3)
        .map(|i| {
            let tx = tx.clone();
            pool.submit_with(move || tx.send(i).unwrap(), |r| r.unwrap())
        })
        .collect();
    // Three requests asked for three threads, which wait for the loop's spawn bottom half.
    assert_eq!(pool.stats().threads, 3);
    assert_eq!(pool.stats().threads_created, 0);
    // prestart(1) finds more than one thread counted, but starts the backlog now: it creates
    // the first thread, and the rest are created by it or by the threads it created (each new
    // worker continues the chain), without the loop.
    let created = pool.prestart(1).unwrap();
    assert!((1..=3).contains(&created), "created {created}");
    let mut got: Vec<i32> = (0..3).map(|_| rx.recv_timeout(HANG).unwrap()).collect();
    got.sort_unstable();
    assert_eq!(got, [0, 1, 2]);
    eventually("the backlog created without polling", || {
        pool.stats().threads_created == 3
    });
    // The spawn bottom half, when the loop runs it, finds nothing left to create.
    poll_until(&ctx, || {
        tickets
            .iter()
            .all(|t| t.status() == threadpool::Status::Completed)
    });
    assert_eq!(pool.stats().threads_created, 3);
}

#[test]
fn prestart_errors() {
    let ctx = ctx();
    let pool = ThreadPool::new(&ctx);
    pool.set_limits(0, 2).unwrap();
    let err = pool.prestart(3).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    let inner = err.get_ref().unwrap().downcast_ref::<LimitsError>();
    assert_eq!(inner, Some(&LimitsError { min: 3, max: 2 }));
    assert_eq!(pool.limits(), (0, 2), "a refused prestart changes nothing");
    assert_eq!(pool.stats().threads, 0);

    // After the pool shut down (its context dropped), through a handle that outlived it.
    let handle = pool.handle();
    drop(ctx);
    assert!(handle.is_closed());
    let err = handle.prestart(1).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    let inner = err.get_ref().unwrap().downcast_ref::<Error>();
    assert_eq!(inner, Some(&Error::ShutDown));
    assert_eq!(handle.stats().threads_created, 0);
}
