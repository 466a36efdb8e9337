//! Pool requests awaited by tasks of the context's executor (`aio_core::task`): the task
//! resumes on its context's thread, whatever thread ran the work, including a task sent to the
//! context from another thread, and a request can be raced against a timer.

mod common;

use aio_core::AioContext;
use aio_core::task::time::timeout;
use common::ctx;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;
use threadpool::ThreadPool;

#[test]
fn a_task_awaits_a_pool_job_and_resumes_on_its_context_thread() {
    let ctx = ctx();
    let task = ctx.spawn_local(async {
        let before = thread::current().id();
        let pool = ThreadPool::of(&AioContext::current().unwrap());
        let worker = pool.submit(|| thread::current().id()).await.unwrap();
        (before, worker, thread::current().id())
    });
    let (before, worker, after) = ctx.block_on(task).unwrap();
    let home = thread::current().id();
    assert_eq!(before, home);
    assert_ne!(worker, home, "the work ran on a pool thread");
    assert_eq!(after, home, "the task resumed on the context's thread");
}

#[test]
#[cfg_attr(miri, ignore = "real threads and a timer wait: slow under Miri")]
fn a_task_sent_from_another_thread_awaits_its_context_pool() {
    let (tx, rx) = mpsc::channel();
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
        // The pool handle is an `Rc`: take the request out and drop the pool before awaiting,
        // so that the task stays `Send`.
        let req = ThreadPool::of(&AioContext::current().unwrap()).submit(|| {
            thread::sleep(Duration::from_millis(2));
            thread::current().id()
        });
        let worker = timeout(Duration::from_secs(30), req)
            .await
            .unwrap()
            .unwrap();
        (worker, thread::current().id())
    });
    let here = ctx();
    let (worker, resumed_on) = here.block_on(task).unwrap();
    stop.store(true, Ordering::SeqCst);
    remote.notify();
    let home = home.join().unwrap();
    assert_eq!(resumed_on, home);
    assert_ne!(worker, home);
    assert_ne!(worker, thread::current().id());
}
