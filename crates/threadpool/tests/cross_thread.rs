//! Submissions from other threads: 4 threads submit 100 000 requests in total to one context;
//! every completion runs exactly once, on the context's thread.

mod common;

use common::ctx;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::thread;
use threadpool::{Error, ThreadPool};

const SUBMITTERS: usize = 4;
// Under Miri, fewer requests: the four submitters still race, only the count shrinks.
const PER_SUBMITTER: usize = if cfg!(miri) { 40 } else { 25_000 };
const TOTAL: usize = SUBMITTERS * PER_SUBMITTER;

#[test]
fn four_threads_submit_100_000_requests_each_completes_once_in_the_context() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    let home = thread::current().id();
    let ran = Arc::new((0..TOTAL).map(|_| AtomicU8::new(0)).collect::<Vec<_>>());
    let completed = Arc::new((0..TOTAL).map(|_| AtomicU8::new(0)).collect::<Vec<_>>());
    let total = Arc::new(AtomicUsize::new(0));
    let wrong_thread = Arc::new(AtomicBool::new(false));

    let submitters: Vec<_> = (0..SUBMITTERS)
        .map(|s| {
            let handle = pool.handle();
            let (ran, completed) = (ran.clone(), completed.clone());
            let (total, wrong_thread) = (total.clone(), wrong_thread.clone());
            thread::spawn(move || {
                for i in s * PER_SUBMITTER..(s + 1) * PER_SUBMITTER {
                    let ran = ran.clone();
                    let (completed, total) = (completed.clone(), total.clone());
                    let wrong_thread = wrong_thread.clone();
                    handle
                        .submit_with(
                            move || {
                                ran[i].fetch_add(1, Ordering::Relaxed);
                                i
                            },
                            move |r: Result<usize, Error>| {
                                if thread::current().id() != home {
                                    wrong_thread.store(true, Ordering::Relaxed);
                                }
                                completed[r.unwrap()].fetch_add(1, Ordering::Relaxed);
                                total.fetch_add(1, Ordering::Relaxed);
                            },
                        )
                        .unwrap();
                }
            })
        })
        .collect();

    while total.load(Ordering::Relaxed) < TOTAL {
        ctx.poll();
    }
    for s in submitters {
        s.join().unwrap();
    }
    // Nothing more arrives: every request had exactly one completion.
    while ctx.poll_nonblocking() {}
    assert_eq!(total.load(Ordering::Relaxed), TOTAL);
    assert!(
        !wrong_thread.load(Ordering::Relaxed),
        "a completion ran elsewhere"
    );
    for i in 0..TOTAL {
        assert_eq!(ran[i].load(Ordering::Relaxed), 1, "work {i}");
        assert_eq!(completed[i].load(Ordering::Relaxed), 1, "completion {i}");
    }
    let stats = pool.stats();
    assert!(stats.threads <= 64);
    assert_eq!(stats.queued, 0);
}

#[test]
fn futures_from_other_threads_resolve_through_the_context() {
    // Requests per submitter; fewer under Miri, where the submitters race all the same.
    const PER: usize = if cfg!(miri) { 20 } else { 1000 };
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    let finished = Arc::new(AtomicUsize::new(0));
    let submitters: Vec<_> = (0..SUBMITTERS)
        .map(|s| {
            let handle = pool.handle();
            let wake_home = ctx.handle();
            let finished = finished.clone();
            thread::spawn(move || {
                let reqs: Vec<_> = (0..PER)
                    .map(|i| handle.submit(move || s * PER + i).unwrap())
                    .collect();
                let sum = reqs
                    .into_iter()
                    .map(|r| common::block_on_parked(r).unwrap())
                    .sum::<usize>();
                // Tell the context's thread, which may be asleep in `poll`, that we are done.
                finished.fetch_add(1, Ordering::SeqCst);
                wake_home.notify();
                sum
            })
        })
        .collect();
    while finished.load(Ordering::SeqCst) < SUBMITTERS {
        ctx.poll();
    }
    let sums: Vec<usize> = submitters.into_iter().map(|s| s.join().unwrap()).collect();
    assert_eq!(
        sums.iter().sum::<usize>(),
        (0..SUBMITTERS * PER).sum::<usize>()
    );
}
