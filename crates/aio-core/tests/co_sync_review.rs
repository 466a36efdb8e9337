//! Adversarial review of `task::co_sync` (`CoMutex`, `CoQueue`, `CoRwLock`) through the public
//! API: seeded randomized stress from several contexts on threads with tasks aborted from
//! another thread (exact counters, "never two holders"), hand-offs raced against a waiter
//! dropped on another thread, guards dropped on another thread, `try_lock` racing hand-offs,
//! FIFO order, `CoQueue::wait` cancelled between its wake-up and its re-lock, `CoRwLock`
//! upgrade/downgrade with waiters, and the `Send`/`Sync` bounds of every public type.

use aio_core::ContextHandle;
use aio_core::task::{
    CoMutex, CoMutexGuard, CoQueue, CoRwLock, CoRwLockReadGuard, CoRwLockWriteGuard, yield_now,
};
use std::cell::Cell;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;

#[path = "support/ctx.rs"]
mod support;
use support::ctx;

/// Contexts running on their own threads until [`Threads::stop`].
struct Threads {
    handles: Vec<ContextHandle>,
    threads: Vec<thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Threads {
    fn start(n: usize) -> Threads {
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..n {
            let (tx, rx) = mpsc::channel();
            let stop = stop.clone();
            threads.push(thread::spawn(move || {
                let ctx = ctx();
                tx.send(ctx.handle()).unwrap();
                while !stop.load(Ordering::SeqCst) {
                    ctx.poll();
                }
                while ctx.poll_nonblocking() {}
            }));
            handles.push(rx.recv().unwrap());
        }
        Threads {
            handles,
            threads,
            stop,
        }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in &self.handles {
            h.notify();
        }
        for t in self.threads {
            t.join().unwrap();
        }
    }
}

/// A deterministic xorshift generator (the stress tests are seeded).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A waker that counts its wake-ups.
#[derive(Default)]
struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn counting() -> (Arc<CountingWaker>, Waker) {
    let c = Arc::new(CountingWaker::default());
    (c.clone(), Waker::from(c))
}

fn woken(c: &CountingWaker) -> usize {
    c.0.load(Ordering::SeqCst)
}

fn poll_once<F: Future + ?Sized>(f: Pin<&mut F>, waker: &Waker) -> Poll<F::Output> {
    f.poll(&mut Context::from_waker(waker))
}

/// Counts a holder in `holders` for as long as it lives (also when the task holding it is
/// aborted in the middle of its critical section); records a violation if it was not alone.
struct Holder<'a> {
    holders: &'a AtomicUsize,
}

impl<'a> Holder<'a> {
    fn enter(holders: &'a AtomicUsize, limit: usize, violation: &AtomicBool) -> Holder<'a> {
        if holders.fetch_add(1, Ordering::SeqCst) >= limit {
            violation.store(true, Ordering::SeqCst);
        }
        Holder { holders }
    }
}

impl Drop for Holder<'_> {
    fn drop(&mut self) {
        self.holders.fetch_sub(1, Ordering::SeqCst);
    }
}

struct MutexShared {
    mutex: CoMutex<u64>,
    /// Increments done inside the critical section, next to `*guard += 1`.
    done: AtomicU64,
    holders: AtomicUsize,
    violation: AtomicBool,
}

/// Seeded stress of `CoMutex`: tasks on several contexts lock (or `try_lock`) and sometimes
/// hold the lock across `yield_now`; the main thread aborts some of them at random moments.
/// Every completed critical section bumps the protected counter and an atomic one together;
/// a second holder ever seen, a lost lock (the final `lock` would hang: bounded by
/// `block_on` of the tasks) or a counter mismatch fails.
fn mutex_stress(seed: u64, contexts: usize, tasks: usize, iters: usize) {
    let threads = Threads::start(contexts);
    let main = ctx();
    let shared = Arc::new(MutexShared {
        mutex: CoMutex::new(0),
        done: AtomicU64::new(0),
        holders: AtomicUsize::new(0),
        violation: AtomicBool::new(false),
    });
    let mut rng = Rng::new(seed);
    let handles: Vec<_> = (0..tasks)
        .map(|i| {
            let s = shared.clone();
            let task_seed = rng.next();
            threads.handles[i % contexts].spawn(async move {
                let mut r = Rng::new(task_seed);
                for _ in 0..iters {
                    let mut g = if r.below(4) == 0 {
                        match s.mutex.try_lock() {
                            Some(g) => g,
                            None => s.mutex.lock().await,
                        }
                    } else {
                        s.mutex.lock().await
                    };
                    let h = Holder::enter(&s.holders, 1, &s.violation);
                    if r.below(3) == 0 {
                        yield_now().await;
                    }
                    *g += 1;
                    s.done.fetch_add(1, Ordering::SeqCst);
                    if r.below(4) == 0 {
                        yield_now().await;
                    }
                    drop(h);
                    drop(g);
                    if r.below(2) == 0 {
                        yield_now().await;
                    }
                }
            })
        })
        .collect();
    // Abort about a quarter of the tasks, at random moments, from this thread.
    for h in &handles {
        if rng.below(4) == 0 {
            for _ in 0..rng.below(200) {
                std::hint::spin_loop();
            }
            if rng.below(2) == 0 {
                thread::yield_now();
            }
            h.abort();
        }
    }
    let mut finished = 0;
    for h in handles {
        match main.block_on(h) {
            Ok(()) => finished += 1,
            Err(e) => assert!(e.is_cancelled(), "a task panicked: {e:?}"),
        }
    }
    threads.stop();
    assert!(
        !shared.violation.load(Ordering::SeqCst),
        "two holders at once"
    );
    let total = *shared
        .mutex
        .try_lock()
        .expect("the lock is free at the end");
    assert_eq!(total, shared.done.load(Ordering::SeqCst));
    assert!(total >= (finished * iters) as u64);
    assert!(!shared.mutex.is_locked());
}

#[test]
fn mutex_seeded_stress_with_aborts() {
    let (seeds, contexts, tasks, iters) = if cfg!(miri) {
        (1, 2, 3, 2)
    } else {
        (6, 4, 24, 300)
    };
    for seed in 0..seeds {
        mutex_stress(seed, contexts, tasks, iters);
    }
}

/// A lock future queued on one thread is dropped while another thread unlocks (which may hand
/// it the lock at that very moment). Whatever the interleaving, the waiter queued behind it
/// must end up owning the lock, woken exactly once, and nothing else may hold it.
#[test]
fn handoff_races_a_waiter_dropped_on_another_thread() {
    let rounds = if cfg!(miri) { 3 } else { 3000 };
    let m = CoMutex::new(0u32);
    for _ in 0..rounds {
        let g = m.try_lock().unwrap();
        let (c1, w1) = counting();
        let (c2, w2) = counting();
        let mut l1 = Box::pin(m.lock());
        assert!(poll_once(l1.as_mut(), &w1).is_pending());
        let mut l2 = Box::pin(m.lock());
        assert!(poll_once(l2.as_mut(), &w2).is_pending());
        let barrier = Barrier::new(2);
        thread::scope(|s| {
            s.spawn(|| {
                barrier.wait();
                drop(l1);
            });
            barrier.wait();
            drop(g); // hand-off to l1, or to l2 if l1 already left
        });
        // l1 was handed the lock (woken once) or left first (never woken); l2 is next.
        assert!(woken(&c1) <= 1);
        assert_eq!(
            woken(&c2),
            1,
            "the waiter behind a dropped one was not woken"
        );
        assert!(m.try_lock().is_none(), "l2 owns the lock");
        let Poll::Ready(mut g2) = poll_once(l2.as_mut(), &w2) else {
            panic!("woken but not handed the lock");
        };
        *g2 += 1;
        drop(g2);
        drop(l2);
    }
    assert_eq!(m.into_inner(), rounds);
}

/// The same race with tasks: a task waiting on a context thread is aborted by the main thread
/// while a second thread drops the guard. The task behind it must still get the lock.
#[test]
fn handoff_races_an_abort_from_another_thread() {
    let rounds = if cfg!(miri) { 2 } else { 300 };
    let threads = Threads::start(2);
    let main = ctx();
    let m = Arc::new(CoMutex::new(0u32));
    for _ in 0..rounds {
        let g = m.try_lock().unwrap();
        let queued = Arc::new(AtomicUsize::new(0));
        let spawn_waiter = |h: &ContextHandle| {
            let (m, q) = (m.clone(), queued.clone());
            h.spawn(async move {
                // Polled once before the lock future: counted, then queued on that poll.
                q.fetch_add(1, Ordering::SeqCst);
                *m.lock().await += 1;
            })
        };
        let first = spawn_waiter(&threads.handles[0]);
        while queued.load(Ordering::SeqCst) < 1 {
            thread::yield_now();
        }
        let second = spawn_waiter(&threads.handles[1]);
        while queued.load(Ordering::SeqCst) < 2 {
            thread::yield_now();
        }
        // Both have run up to `lock()`; give their first lock polls a moment.
        for _ in 0..3 {
            thread::yield_now();
        }
        let barrier = Barrier::new(2);
        thread::scope(|s| {
            s.spawn(|| {
                barrier.wait();
                drop(g);
            });
            barrier.wait();
            first.abort();
        });
        let r = main.block_on(first);
        assert!(r.is_ok() || r.unwrap_err().is_cancelled());
        main.block_on(second).unwrap();
        assert!(!m.is_locked(), "the lock was lost or kept");
    }
    threads.stop();
}

/// A guard taken on one thread and dropped on another while a waiter is queued: the waiter
/// is handed the lock and sees the writes made through the guard.
#[test]
fn guard_dropped_on_another_thread_hands_off() {
    let rounds = if cfg!(miri) { 2 } else { 500 };
    let m = CoMutex::new(0u32);
    for i in 0..rounds {
        let mut g = m.try_lock().unwrap();
        let (c, w) = counting();
        let mut l = Box::pin(m.lock());
        assert!(poll_once(l.as_mut(), &w).is_pending());
        thread::scope(|s| {
            s.spawn(move || {
                *g += 1;
                drop(g);
            });
        });
        assert_eq!(woken(&c), 1);
        let Poll::Ready(g) = poll_once(l.as_mut(), &w) else {
            panic!("not handed the lock");
        };
        assert_eq!(*g, i + 1);
    }
}

/// Waiters get the lock in the order of their first poll; each unlock wakes exactly the next.
#[test]
fn mutex_fifo_exact() {
    let n = if cfg!(miri) { 4 } else { 32 };
    let m = CoMutex::new(Vec::new());
    let g = m.try_lock().unwrap();
    let mut futs: Vec<_> = (0..n).map(|_| Box::pin(m.lock())).collect();
    let wakers: Vec<_> = (0..n).map(|_| counting()).collect();
    // First polls in reverse creation order: the order of first poll is what counts.
    for i in (0..n).rev() {
        assert!(poll_once(futs[i].as_mut(), &wakers[i].1).is_pending());
    }
    drop(g);
    for step in 0..n {
        let expect = n - 1 - step;
        for (i, (c, _)) in wakers.iter().enumerate() {
            let should = usize::from(i >= expect);
            assert_eq!(woken(c), should, "step {step}: waiter {i}");
        }
        // Nobody else can take it meanwhile.
        assert!(m.try_lock().is_none());
        for (i, f) in futs.iter_mut().enumerate() {
            if i < expect {
                assert!(poll_once(f.as_mut(), &wakers[i].1).is_pending());
            }
        }
        let Poll::Ready(mut g) = poll_once(futs[expect].as_mut(), &wakers[expect].1) else {
            panic!("step {step}: not granted");
        };
        g.push(expect);
    }
    let order = m.try_lock().unwrap().clone();
    assert_eq!(order, (0..n).rev().collect::<Vec<_>>());
}

/// A lock future handed the lock and then dropped (never polled again) passes it on, and a
/// pending grant keeps `try_lock` out.
#[test]
fn dropped_grantee_passes_on_and_try_lock_never_jumps_in() {
    let m = CoMutex::new(0);
    let g = m.try_lock().unwrap();
    let (c1, w1) = counting();
    let (c2, w2) = counting();
    let (c3, w3) = counting();
    let mut l1 = Box::pin(m.lock());
    let mut l2 = Box::pin(m.lock());
    let mut l3 = Box::pin(m.lock());
    assert!(poll_once(l1.as_mut(), &w1).is_pending());
    assert!(poll_once(l2.as_mut(), &w2).is_pending());
    assert!(poll_once(l3.as_mut(), &w3).is_pending());
    drop(g);
    assert_eq!((woken(&c1), woken(&c2), woken(&c3)), (1, 0, 0));
    assert!(
        m.try_lock().is_none(),
        "a grant not yet seen is still a holder"
    );
    drop(l1);
    assert_eq!((woken(&c1), woken(&c2), woken(&c3)), (1, 1, 0));
    assert!(m.try_lock().is_none());
    drop(l2);
    assert_eq!((woken(&c1), woken(&c2), woken(&c3)), (1, 1, 1));
    assert!(m.try_lock().is_none());
    let Poll::Ready(g3) = poll_once(l3.as_mut(), &w3) else {
        panic!("l3 was not granted");
    };
    drop(g3);
    assert!(m.try_lock().is_some());
}

/// `try_lock` spinning on one thread against lock/unlock on others (hand-offs between the
/// waiters): never two holders, and every success is counted.
#[test]
fn try_lock_races_handoffs() {
    let per = if cfg!(miri) { 3 } else { 3000 };
    let m = CoMutex::new(0u64);
    let holders = AtomicUsize::new(0);
    let violation = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let (c, w) = counting();
                for _ in 0..per {
                    let mut f = Box::pin(m.lock());
                    let before = woken(&c);
                    let mut g = match poll_once(f.as_mut(), &w) {
                        Poll::Ready(g) => g,
                        Poll::Pending => {
                            while woken(&c) == before {
                                thread::yield_now();
                            }
                            match poll_once(f.as_mut(), &w) {
                                Poll::Ready(g) => g,
                                Poll::Pending => panic!("woken but not granted"),
                            }
                        }
                    };
                    let h = Holder::enter(&holders, 1, &violation);
                    *g += 1;
                    done.fetch_add(1, Ordering::SeqCst);
                    drop(h);
                }
            });
        }
        s.spawn(|| {
            let mut got = 0;
            while got < per {
                if let Some(mut g) = m.try_lock() {
                    let h = Holder::enter(&holders, 1, &violation);
                    *g += 1;
                    done.fetch_add(1, Ordering::SeqCst);
                    drop(h);
                    got += 1;
                } else {
                    thread::yield_now();
                }
            }
        });
    });
    assert!(!violation.load(Ordering::SeqCst), "two holders at once");
    assert_eq!(m.into_inner(), done.load(Ordering::SeqCst));
    assert_eq!(done.load(Ordering::SeqCst), 3 * per as u64);
}

/// `CoQueue::wait` dropped before it was woken leaves the queue and the mutex free; dropped
/// after it was woken but before it re-polled passes the wake-up on.
#[test]
fn queue_wait_cancelled_before_its_wakeup_is_seen_passes_it_on() {
    let (m, q) = (CoMutex::new(()), CoQueue::new());
    let (c1, w1) = counting();
    let (c2, w2) = counting();
    let mut f1 = Box::pin(q.wait(m.try_lock().unwrap()));
    assert!(poll_once(f1.as_mut(), &w1).is_pending());
    assert!(!m.is_locked(), "wait released the mutex");
    let mut f2 = Box::pin(q.wait(m.try_lock().unwrap()));
    assert!(poll_once(f2.as_mut(), &w2).is_pending());
    assert!(q.next());
    assert_eq!((woken(&c1), woken(&c2)), (1, 0));
    drop(f1);
    assert_eq!(woken(&c2), 1, "the wake-up was passed on");
    assert!(q.is_empty());
    let Poll::Ready(g) = poll_once(f2.as_mut(), &w2) else {
        panic!("f2 did not re-lock a free mutex");
    };
    drop(g);
    assert!(!m.is_locked());
}

/// `CoQueue::wait` woken by `next()`, polled once (it saw the wake-up and now waits for the
/// mutex), then cancelled: the single `next()` is gone, and the other waiter sleeps on although
/// a wake-up was issued while it was queued. A condition-variable user who cancels a waiter
/// (a `timeout` around `wait`, an aborted task) loses the signal.
#[test]
fn queue_wait_cancelled_while_relocking_loses_the_wakeup() {
    let (m, q) = (CoMutex::new(()), CoQueue::new());
    let (_c1, w1) = counting();
    let (c2, w2) = counting();
    let mut f1 = Box::pin(q.wait(m.try_lock().unwrap()));
    assert!(poll_once(f1.as_mut(), &w1).is_pending());
    let mut f2 = Box::pin(q.wait(m.try_lock().unwrap()));
    assert!(poll_once(f2.as_mut(), &w2).is_pending());
    let held = m.try_lock().unwrap();
    assert!(q.next()); // picks f1
    // f1 sees the wake-up and queues on the (held) mutex.
    assert!(poll_once(f1.as_mut(), &w1).is_pending());
    drop(f1); // cancelled before it got the mutex back
    drop(held);
    assert_eq!(
        woken(&c2),
        1,
        "the consumed wake-up was lost with the cancelled waiter"
    );
    assert!(poll_once(f2.as_mut(), &w2).is_ready());
}

/// CoQueue under threads: a producer bumps a count under the mutex and calls `next()`; two
/// consumers on other contexts wait for a non-zero count and take one. Every item is taken
/// exactly once and the count ends at zero (a lost wake-up would leave items untaken and hang
/// the wait below).
#[test]
fn queue_producers_consumers_exact() {
    let items = if cfg!(miri) { 3 } else { 400 };
    let threads = Threads::start(3);
    let main = ctx();
    let shared = Arc::new((CoMutex::new(0u64), CoQueue::new(), AtomicU64::new(0)));
    let consumers: Vec<_> = (0..2)
        .map(|i| {
            let s = shared.clone();
            threads.handles[i].spawn(async move {
                let (m, q, taken) = &*s;
                loop {
                    let mut g = m.lock().await;
                    while *g == 0 {
                        g = q.wait(g).await;
                    }
                    *g -= 1;
                    if taken.fetch_add(1, Ordering::SeqCst) + 1 == items {
                        q.restart_all();
                        return;
                    }
                    if taken.load(Ordering::SeqCst) >= items {
                        return;
                    }
                }
            })
        })
        .collect();
    let s = shared.clone();
    let producer = threads.handles[2].spawn(async move {
        let (m, q, _) = &*s;
        for k in 0..items {
            *m.lock().await += 1;
            q.next();
            if k % 3 == 0 {
                yield_now().await;
            }
        }
    });
    main.block_on(producer).unwrap();
    // Consumers finish once every item is taken; the one still waiting then is woken by
    // `restart_all` only if it was queued: give it an explicit wake.
    while shared.2.load(Ordering::SeqCst) < items {
        thread::yield_now();
    }
    shared.1.restart_all();
    for c in consumers {
        // A consumer parked with count 0 loops on `wait`: abort what did not finish.
        if !c.is_finished() {
            c.abort();
        }
        let r = main.block_on(c);
        assert!(r.is_ok() || r.unwrap_err().is_cancelled());
    }
    threads.stop();
    assert_eq!(*shared.0.try_lock().unwrap(), 0);
    assert_eq!(shared.2.load(Ordering::SeqCst), items);
}

struct RwShared {
    lock: CoRwLock<u64>,
    done: AtomicU64,
    readers: AtomicUsize,
    writers: AtomicUsize,
    violation: AtomicBool,
}

impl RwShared {
    fn enter_write(&self) -> Holder<'_> {
        if self.readers.load(Ordering::SeqCst) != 0 {
            self.violation.store(true, Ordering::SeqCst);
        }
        let h = Holder::enter(&self.writers, 1, &self.violation);
        if self.readers.load(Ordering::SeqCst) != 0 {
            self.violation.store(true, Ordering::SeqCst);
        }
        h
    }

    fn enter_read(&self) -> Holder<'_> {
        let h = Holder::enter(&self.readers, usize::MAX, &self.violation);
        if self.writers.load(Ordering::SeqCst) != 0 {
            self.violation.store(true, Ordering::SeqCst);
        }
        h
    }
}

/// Seeded stress of `CoRwLock`: readers, writers, upgrades and downgrades from several
/// contexts, some tasks aborted. A writer never overlaps anyone; the value equals the number
/// of completed writes.
fn rwlock_stress(seed: u64, contexts: usize, tasks: usize, iters: usize) {
    let threads = Threads::start(contexts);
    let main = ctx();
    let shared = Arc::new(RwShared {
        lock: CoRwLock::new(0),
        done: AtomicU64::new(0),
        readers: AtomicUsize::new(0),
        writers: AtomicUsize::new(0),
        violation: AtomicBool::new(false),
    });
    let mut rng = Rng::new(seed);
    let handles: Vec<_> = (0..tasks)
        .map(|i| {
            let s = shared.clone();
            let task_seed = rng.next();
            threads.handles[i % contexts].spawn(async move {
                let mut r = Rng::new(task_seed);
                for _ in 0..iters {
                    match r.below(5) {
                        0 | 1 => {
                            // The unused `try_read` guard must be dropped before `read()`
                            // waits: a match scrutinee lives to the end of the statement, and
                            // waiting for a read while holding one deadlocks behind a writer
                            // queued in between (the lock is fair).
                            let g = match s.lock.try_read() {
                                Some(g) if r.below(2) == 0 => g,
                                other => {
                                    drop(other);
                                    s.lock.read().await
                                }
                            };
                            let h = s.enter_read();
                            let seen = *g;
                            if r.below(3) == 0 {
                                yield_now().await;
                            }
                            assert_eq!(*g, seen, "changed under a read guard");
                            drop(h);
                        }
                        2 => {
                            let mut g = s.lock.write().await;
                            let h = s.enter_write();
                            if r.below(3) == 0 {
                                yield_now().await;
                            }
                            *g += 1;
                            s.done.fetch_add(1, Ordering::SeqCst);
                            drop(h);
                            drop(g);
                        }
                        3 => {
                            let g = s.lock.read().await;
                            let h = s.enter_read();
                            if r.below(2) == 0 {
                                yield_now().await;
                            }
                            drop(h);
                            let mut w = CoRwLockReadGuard::upgrade(g).await;
                            let h = s.enter_write();
                            *w += 1;
                            s.done.fetch_add(1, Ordering::SeqCst);
                            drop(h);
                        }
                        _ => {
                            let mut w = s.lock.write().await;
                            let h = s.enter_write();
                            *w += 1;
                            s.done.fetch_add(1, Ordering::SeqCst);
                            let seen = *w;
                            drop(h);
                            let g = CoRwLockWriteGuard::downgrade(w);
                            let h = s.enter_read();
                            if r.below(2) == 0 {
                                yield_now().await;
                            }
                            assert_eq!(*g, seen, "a writer got in after a downgrade");
                            drop(h);
                        }
                    }
                    if r.below(2) == 0 {
                        yield_now().await;
                    }
                }
            })
        })
        .collect();
    for h in &handles {
        if rng.below(4) == 0 {
            for _ in 0..rng.below(200) {
                std::hint::spin_loop();
            }
            h.abort();
        }
    }
    for h in handles {
        match main.block_on(h) {
            Ok(()) => {}
            Err(e) => assert!(e.is_cancelled(), "a task panicked: {e:?}"),
        }
    }
    threads.stop();
    assert!(
        !shared.violation.load(Ordering::SeqCst),
        "overlapping holders"
    );
    let v = *shared.lock.try_write().expect("free at the end");
    assert_eq!(v, shared.done.load(Ordering::SeqCst));
}

#[test]
fn rwlock_seeded_stress_with_aborts() {
    let (seeds, contexts, tasks, iters) = if cfg!(miri) {
        (1, 2, 3, 2)
    } else {
        (6, 4, 24, 200)
    };
    for seed in 0..seeds {
        rwlock_stress(seed, contexts, tasks, iters);
    }
}

/// Two readers both upgrade while a writer waits: all three get exclusive access in turn,
/// in queue order (the writer first), and nobody deadlocks.
#[test]
fn rwlock_double_upgrade_with_a_waiting_writer() {
    let l = CoRwLock::new(Vec::new());
    let r1 = l.try_read().unwrap();
    let r2 = l.try_read().unwrap();
    let (cw, ww) = counting();
    let (c1, w1) = counting();
    let (c2, w2) = counting();
    let mut w = Box::pin(l.write());
    assert!(poll_once(w.as_mut(), &ww).is_pending());
    let mut u1 = Box::pin(CoRwLockReadGuard::upgrade(r1));
    assert!(poll_once(u1.as_mut(), &w1).is_pending());
    assert!(
        l.try_read().is_none(),
        "queued writers keep new readers out"
    );
    let mut u2 = Box::pin(CoRwLockReadGuard::upgrade(r2));
    // r2's read hold is gone: the writer at the head is granted.
    assert_eq!((woken(&cw), woken(&c1)), (1, 0));
    assert!(poll_once(u2.as_mut(), &w2).is_pending());
    let Poll::Ready(mut g) = poll_once(w.as_mut(), &ww) else {
        panic!("writer not granted");
    };
    g.push('w');
    drop(g);
    assert_eq!((woken(&c1), woken(&c2)), (1, 0));
    let Poll::Ready(mut g) = poll_once(u1.as_mut(), &w1) else {
        panic!("u1 not granted");
    };
    g.push('1');
    drop(g);
    assert_eq!(woken(&c2), 1);
    let Poll::Ready(mut g) = poll_once(u2.as_mut(), &w2) else {
        panic!("u2 not granted");
    };
    g.push('2');
    drop(g);
    assert_eq!(*l.try_read().unwrap(), ['w', '1', '2']);
}

/// An upgrade future dropped unpolled (while queued, and after being granted) releases
/// correctly; a downgrade lets exactly the head run of readers in, not the readers behind a
/// queued writer.
#[test]
fn rwlock_upgrade_dropped_and_downgrade_with_waiters() {
    let l = CoRwLock::new(0);
    // Upgrade queued behind a writer, dropped before its first poll.
    let r1 = l.try_read().unwrap();
    let r2 = l.try_read().unwrap();
    let (cw, ww) = counting();
    let mut w = Box::pin(l.write());
    assert!(poll_once(w.as_mut(), &ww).is_pending());
    let u = CoRwLockReadGuard::upgrade(r1);
    drop(u);
    assert_eq!(woken(&cw), 0);
    drop(r2);
    assert_eq!(woken(&cw), 1);
    let Poll::Ready(g) = poll_once(w.as_mut(), &ww) else {
        panic!("writer not granted");
    };
    // Downgrade with [R, R, W, R] queued: the two head readers join, the writer and the
    // reader behind it wait.
    let mut fs: Vec<Pin<Box<dyn Future<Output = ()> + '_>>> = Vec::new();
    let cs: Vec<_> = (0..4).map(|_| counting()).collect();
    fs.push(Box::pin(async { drop(l.read().await) }));
    fs.push(Box::pin(async { drop(l.read().await) }));
    fs.push(Box::pin(async { drop(l.write().await) }));
    fs.push(Box::pin(async { drop(l.read().await) }));
    for (f, (_, w)) in fs.iter_mut().zip(&cs) {
        assert!(poll_once(f.as_mut(), w).is_pending());
    }
    let r = CoRwLockWriteGuard::downgrade(g);
    let wakes: Vec<_> = cs.iter().map(|(c, _)| woken(c)).collect();
    assert_eq!(wakes, [1, 1, 0, 0]);
    assert!(l.try_read().is_none(), "a writer is queued");
    assert!(poll_once(fs[0].as_mut(), &cs[0].1).is_ready());
    assert!(poll_once(fs[1].as_mut(), &cs[1].1).is_ready());
    assert_eq!(
        woken(&cs[2].0),
        0,
        "the writer waits for the downgraded reader"
    );
    drop(r);
    assert_eq!(woken(&cs[2].0), 1);
    assert!(poll_once(fs[2].as_mut(), &cs[2].1).is_ready());
    assert_eq!(woken(&cs[3].0), 1);
    assert!(poll_once(fs[3].as_mut(), &cs[3].1).is_ready());
    drop(fs);
    assert!(l.try_write().is_some());
}

/// A queued writer dropped on another thread while the last reader leaves (which may grant
/// it at that moment): the readers queued behind it get in, and the lock is free afterwards.
#[test]
fn rwlock_grant_races_a_writer_dropped_on_another_thread() {
    let rounds = if cfg!(miri) { 3 } else { 2000 };
    let l = CoRwLock::new(0u32);
    for _ in 0..rounds {
        let r = l.try_read().unwrap();
        let (_cw, ww) = counting();
        let (cr, wr) = counting();
        let mut w = Box::pin(l.write());
        assert!(poll_once(w.as_mut(), &ww).is_pending());
        let mut rd = Box::pin(l.read());
        assert!(poll_once(rd.as_mut(), &wr).is_pending());
        let barrier = Barrier::new(2);
        thread::scope(|s| {
            s.spawn(|| {
                barrier.wait();
                drop(w);
            });
            barrier.wait();
            drop(r);
        });
        assert_eq!(
            woken(&cr),
            1,
            "the reader behind the dropped writer was not let in"
        );
        assert!(poll_once(rd.as_mut(), &wr).is_ready());
        drop(rd);
        assert!(l.try_write().is_some(), "the lock was lost");
    }
}

/// Which auto traits a type has, for concrete types (inherent methods win over the trait's
/// fallback only when the bound holds).
struct Probe<T: ?Sized>(PhantomData<T>);

trait NotSend {
    fn is_send(&self) -> bool {
        false
    }
}
trait NotSync {
    fn is_sync(&self) -> bool {
        false
    }
}
impl<T: ?Sized> NotSend for Probe<T> {}
impl<T: ?Sized> NotSync for Probe<T> {}
impl<T: ?Sized + Send> Probe<T> {
    fn is_send(&self) -> bool {
        true
    }
}
impl<T: ?Sized + Sync> Probe<T> {
    fn is_sync(&self) -> bool {
        true
    }
}

macro_rules! traits {
    ($t:ty) => {
        (
            Probe::<$t>(PhantomData).is_send(),
            Probe::<$t>(PhantomData).is_sync(),
        )
    };
}

/// Send/Sync of every type, with data that is Send+Sync, Send only (`Cell`), Sync only
/// (`std::sync::MutexGuard`) and neither (`Rc`). Compared with `tokio::sync`: `Mutex<T>` is
/// Sync iff `T: Send`; `MutexGuard` Send iff `T: Send` (auto), Sync iff `T: Send + Sync`;
/// `RwLock<T>` Sync iff `T: Send + Sync`; guards Send/Sync iff `T: Send + Sync` (write) /
/// `T: Sync` (read; ours asks `T: Send + Sync`, stricter, sound).
#[test]
fn send_sync_bounds() {
    type SyncOnly = std::sync::MutexGuard<'static, u8>;
    // CoMutex
    assert_eq!(traits!(CoMutex<u8>), (true, true));
    assert_eq!(traits!(CoMutex<Cell<u8>>), (true, true));
    assert_eq!(traits!(CoMutex<SyncOnly>), (false, false));
    assert_eq!(traits!(CoMutex<Rc<u8>>), (false, false));
    assert_eq!(traits!(CoMutexGuard<'static, u8>), (true, true));
    assert_eq!(traits!(CoMutexGuard<'static, Cell<u8>>), (true, false));
    assert_eq!(traits!(CoMutexGuard<'static, SyncOnly>), (false, false));
    assert_eq!(
        traits!(aio_core::task::Lock<'static, Cell<u8>>),
        (true, true)
    );
    assert_eq!(
        traits!(aio_core::task::Lock<'static, Rc<u8>>),
        (false, false)
    );
    // CoQueue
    assert_eq!(traits!(CoQueue), (true, true));
    assert_eq!(traits!(aio_core::task::QueueWait<'static>), (true, true));
    // CoRwLock
    assert_eq!(traits!(CoRwLock<u8>), (true, true));
    assert_eq!(traits!(CoRwLock<Cell<u8>>), (true, false));
    assert_eq!(traits!(CoRwLock<SyncOnly>), (false, false));
    assert_eq!(traits!(CoRwLockReadGuard<'static, u8>), (true, true));
    assert_eq!(
        traits!(CoRwLockReadGuard<'static, Cell<u8>>),
        (false, false)
    );
    assert_eq!(
        traits!(CoRwLockWriteGuard<'static, Cell<u8>>),
        (false, false)
    );
    assert_eq!(
        traits!(CoRwLockReadGuard<'static, SyncOnly>),
        (false, false)
    );
    assert_eq!(
        traits!(aio_core::task::ReadLock<'static, Cell<u8>>),
        (false, false)
    );
}

/// A waker that owns a lock future: dropping its last reference drops that future.
struct OwningWaker {
    _owned: std::sync::Mutex<Pin<Box<aio_core::task::Lock<'static, u32>>>>,
}

impl Wake for OwningWaker {
    fn wake(self: Arc<Self>) {}
}

/// A waiter's old waker is dropped while the mutex's queue lock is held (`update_waker`
/// replacing it; the same holds for `WaitList::remove` and `CoRwLock`'s tickets). When that
/// was the waker's last reference and dropping it drops another waiting lock future of the
/// same mutex (a task whose only owner is its waker, with a lock future inside), that
/// future's `Drop` takes the queue lock again on the same thread: a self-deadlock.
#[test]
fn dropping_an_old_waker_under_the_queue_lock_does_not_reenter() {
    // A static, not `Box::leak`: LeakSanitizer reports leaked boxes that nothing points to.
    static M: std::sync::LazyLock<CoMutex<u32>> = std::sync::LazyLock::new(|| CoMutex::new(0));
    let m: &'static CoMutex<u32> = &M;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _g = m.try_lock().unwrap();
        let (_c, w) = counting();
        let mut inner = Box::pin(m.lock());
        assert!(poll_once(inner.as_mut(), &w).is_pending());
        let owning = Waker::from(Arc::new(OwningWaker {
            _owned: std::sync::Mutex::new(inner),
        }));
        let mut l = Box::pin(m.lock());
        assert!(poll_once(l.as_mut(), &owning).is_pending());
        drop(owning); // the queue entry holds the last reference
        let (_c2, w2) = counting();
        // Replaces (drops) the owning waker under the queue lock.
        assert!(poll_once(l.as_mut(), &w2).is_pending());
        tx.send(()).unwrap();
    });
    assert!(
        rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok(),
        "re-entered the queue lock from a waker's drop"
    );
}
