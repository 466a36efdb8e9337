//! Thread limits and idle exit: defaults (0, 64), validation, changes while requests run
//! (threads up to a new minimum, no more running requests than the maximum, surplus threads
//! exit), idle threads above the minimum exit after the idle timeout, and a warm pool creates
//! no threads.

mod common;

use aio_core::AioContext;
use common::{ctx, eventually, eventually_polling, poll_until};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use threadpool::{DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_THREADS, LimitsError, ThreadPool, Ticket};

#[test]
fn defaults_and_validation() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    assert_eq!(pool.limits(), (0, DEFAULT_MAX_THREADS));
    assert_eq!(DEFAULT_MAX_THREADS, 64);
    assert_eq!(DEFAULT_IDLE_TIMEOUT, Duration::from_secs(10));
    assert_eq!(
        pool.set_limits(3, 2),
        Err(LimitsError { min: 3, max: 2 }),
        "min > max"
    );
    assert_eq!(
        pool.set_limits(0, 0),
        Err(LimitsError { min: 0, max: 0 }),
        "max == 0"
    );
    assert_eq!(pool.limits(), (0, 64), "refused limits change nothing");
    assert_eq!(pool.set_limits(5, 5), Ok(()));
    assert_eq!(pool.handle().limits(), (5, 5));
    assert_eq!(pool.handle().set_limits(0, 1), Ok(()));
    assert_eq!(pool.limits(), (0, 1));
    assert_eq!(pool.stats().threads_created, 0, "nothing ran yet");
}

#[test]
fn a_minimum_creates_idle_threads() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    pool.set_limits(4, 8).unwrap();
    eventually_polling(&ctx, "4 idle threads", || pool.stats().idle == 4);
    let s = pool.stats();
    assert_eq!((s.threads, s.threads_created), (4, 4));
}

/// Requests that wait at a gate, counting how many run at once.
struct Gate {
    open: Mutex<bool>,
    cond: Condvar,
    /// How many run now, and the most that ran at once. One lock for both: with two atomics, a
    /// reader could see the eighth request counted as running before it raised the peak (this
    /// made `limits_change_while_busy` read a peak of 7 under Miri).
    counts: Mutex<Counts>,
    finished: AtomicUsize,
}

#[derive(Default)]
struct Counts {
    running: usize,
    peak: usize,
}

impl Gate {
    fn new() -> Arc<Gate> {
        Arc::new(Gate {
            open: Mutex::new(false),
            cond: Condvar::new(),
            counts: Mutex::default(),
            finished: AtomicUsize::new(0),
        })
    }

    fn submit(self: &Arc<Self>, pool: &ThreadPool, n: usize) -> Vec<Ticket> {
        (0..n)
            .map(|_| {
                let g = self.clone();
                pool.submit_with(move || g.pass(), |r| r.unwrap())
            })
            .collect()
    }

    fn pass(&self) {
        {
            let mut c = self.counts.lock().unwrap();
            c.running += 1;
            c.peak = c.peak.max(c.running);
        }
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cond.wait(open).unwrap();
        }
        drop(open);
        self.counts.lock().unwrap().running -= 1;
        self.finished.fetch_add(1, Ordering::SeqCst);
    }

    fn set(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.cond.notify_all();
    }

    fn running(&self) -> usize {
        self.counts.lock().unwrap().running
    }

    fn peak(&self) -> usize {
        self.counts.lock().unwrap().peak
    }

    fn reset_peak(&self) {
        let mut c = self.counts.lock().unwrap();
        c.peak = c.running;
    }
}

fn all_completed(ctx: &AioContext, tickets: &[Ticket]) {
    poll_until(ctx, || {
        tickets
            .iter()
            .all(|t| t.status() == threadpool::Status::Completed)
    });
}

#[test]
fn limits_change_while_busy() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    pool.set_limits(0, 2).unwrap();
    let gate = Gate::new();
    let tickets = gate.submit(&pool, 20);

    // At most 2 run.
    eventually_polling(&ctx, "2 requests running", || gate.running() == 2);
    std::thread::sleep(Duration::from_millis(50));
    ctx.poll_nonblocking();
    assert_eq!(gate.running(), 2);
    assert_eq!(pool.stats().threads, 2);

    // A higher maximum while they wait: more threads for the queued requests.
    pool.set_limits(0, 8).unwrap();
    eventually_polling(&ctx, "8 requests running", || gate.running() == 8);
    assert_eq!(pool.stats().threads, 8);
    assert_eq!(gate.peak(), 8);

    // A lower maximum while 8 run: they finish, and no more than 3 threads remain.
    pool.set_limits(1, 3).unwrap();
    gate.set(true);
    all_completed(&ctx, &tickets);
    assert_eq!(gate.finished.load(Ordering::SeqCst), 20);
    eventually("the pool shrinks to 3 threads", || {
        pool.stats().threads == 3
    });
    eventually("5 threads exited", || pool.stats().threads_exited == 5);

    // From now on at most 3 requests run at once.
    gate.set(false);
    gate.reset_peak();
    let tickets = gate.submit(&pool, 10);
    eventually_polling(&ctx, "3 requests running", || gate.running() == 3);
    std::thread::sleep(Duration::from_millis(50));
    ctx.poll_nonblocking();
    assert_eq!(gate.peak(), 3);
    gate.set(true);
    all_completed(&ctx, &tickets);
    assert_eq!(pool.stats().threads, 3);
}

#[test]
fn idle_threads_above_the_minimum_exit_after_the_idle_timeout() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    pool.set_idle_timeout(Duration::from_millis(100));
    pool.set_limits(2, 64).unwrap();
    let gate = Gate::new();
    let tickets = gate.submit(&pool, 8);
    eventually_polling(&ctx, "8 requests running", || gate.running() == 8);
    assert_eq!(pool.stats().threads, 8);
    gate.set(true);
    all_completed(&ctx, &tickets);

    eventually("6 idle threads exit", || pool.stats().threads_exited == 6);
    let s = pool.stats();
    assert_eq!((s.threads, s.idle), (2, 2), "the minimum stays");
    // The minimum stays for good: several more timeouts pass.
    std::thread::sleep(Duration::from_millis(350));
    let s = pool.stats();
    assert_eq!((s.threads, s.threads_exited), (2, 6));

    // And the survivors still work.
    let done = Rc::new(AtomicBool::new(false));
    let d = done.clone();
    pool.submit_with(|| (), move |_| d.store(true, Ordering::SeqCst));
    poll_until(&ctx, || done.load(Ordering::SeqCst));
    assert_eq!(pool.stats().threads_created, 8);
}

#[test]
#[cfg_attr(
    miri,
    ignore = "64 threads and 20 000 requests take too long under Miri; the other tests reuse threads"
)]
fn a_warm_pool_creates_no_threads() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    let batch = |n: usize| {
        let left = Rc::new(AtomicUsize::new(n));
        for _ in 0..n {
            let l = left.clone();
            pool.submit_with(
                || (),
                move |_| {
                    l.fetch_sub(1, Ordering::SeqCst);
                },
            );
        }
        poll_until(&ctx, || left.load(Ordering::SeqCst) == 0);
    };
    // A burst with no thread yet asks for one thread per queued request, up to the maximum.
    // They are created one after the other (each new thread creates the next), which may go
    // on after the burst is served.
    batch(200);
    assert_eq!(pool.stats().threads, 64);
    eventually("64 threads exist", || pool.stats().threads_created == 64);
    let warm = pool.stats().threads_created;
    for _ in 0..20 {
        batch(1000);
    }
    assert_eq!(
        pool.stats().threads_created,
        warm,
        "no thread after warm-up"
    );
}

/// One request at a time, each after the previous completion: the worker that served the last
/// one is always there for the next (watching the queue, or asleep on the idle list), so the
/// pool never needs a second thread; also with the idle spin turned off.
#[test]
fn sequential_requests_need_one_thread() {
    for spin in [threadpool::DEFAULT_IDLE_SPIN, Duration::ZERO] {
        let ctx = ctx();
        let pool = ThreadPool::of(&ctx);
        pool.set_idle_spin(spin);
        // Fewer under Miri: each round trip is the same, only the count shrinks.
        for i in 0..if cfg!(miri) { 20 } else { 200u32 } {
            assert_eq!(common::block_on(&ctx, pool.submit(move || i)), Ok(i));
        }
        assert_eq!(pool.stats().threads_created, 1, "spin {spin:?}");
    }
}
