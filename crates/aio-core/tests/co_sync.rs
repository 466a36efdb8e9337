//! QEMU's coroutine locks as task primitives: `CoMutex` under contention from several contexts
//! on their own threads (QEMU's `tests/unit/test-aio-multithread.c`: `mutex/contended`, `mutex/handoff`), its
//! FIFO hand-off, `try_lock` and cancellation; `CoQueue` wait/next/restart_all; `CoRwLock`
//! sharing, exclusion, writer preference, upgrade and downgrade.

use aio_core::ContextHandle;
use aio_core::task::{
    CoMutex, CoMutexGuard, CoQueue, CoRwLock, CoRwLockReadGuard, CoRwLockWriteGuard, yield_now,
};
use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

#[path = "support/ctx.rs"]
mod support;
use support::ctx;

/// A context running on its own thread until [`Threads::stop`].
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

/// Polls `f` once with `waker`.
fn poll_once<F: Future + ?Sized>(f: Pin<&mut F>, waker: &Waker) -> Poll<F::Output> {
    f.poll(&mut Context::from_waker(waker))
}

/// Awaits `fut`, reporting whether its first poll was `Pending` (for a lock: whether the lock
/// was handed over by an unlocker rather than taken free).
async fn waited<F: Future>(fut: F) -> (F::Output, bool) {
    let mut fut = std::pin::pin!(fut);
    let mut first = true;
    let mut was_pending = false;
    let out = poll_fn(|cx| {
        let p = fut.as_mut().poll(cx);
        if first && p.is_pending() {
            was_pending = true;
        }
        first = false;
        p
    })
    .await;
    (out, was_pending)
}

// ---- CoMutex ----------------------------------------------------------------------------

/// QEMU's `/aio/multi/mutex/contended`: 5 contexts, each on its own thread, several tasks each, all
/// incrementing one counter under the `CoMutex`; a second, atomic counter is bumped after each
/// unlock. No update is lost, and every task finishes (no lost wake-up).
#[test]
fn mutex_contended() {
    const CONTEXTS: usize = 5;
    const TASKS: usize = 3;
    let iterations = if cfg!(miri) { 4 } else { 2000 };
    let threads = Threads::start(CONTEXTS);
    let mutex = Arc::new(CoMutex::new(0usize));
    let atomic_counter = Arc::new(AtomicUsize::new(0));
    let handoffs = Arc::new(AtomicUsize::new(0));
    let mut joins = Vec::new();
    for h in &threads.handles {
        for t in 0..TASKS {
            let (mutex, atomic_counter, handoffs) =
                (mutex.clone(), atomic_counter.clone(), handoffs.clone());
            joins.push(h.spawn(async move {
                for i in 0..iterations {
                    {
                        let (mut g, was_pending) = waited(mutex.lock()).await;
                        *g += 1;
                        if was_pending {
                            handoffs.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    atomic_counter.fetch_add(1, Ordering::SeqCst);
                    if (i + t) % 7 == 0 {
                        yield_now().await;
                    }
                }
            }));
        }
    }
    let main = ctx();
    for j in joins {
        main.block_on(j).unwrap();
    }
    threads.stop();
    let total = CONTEXTS * TASKS * iterations;
    assert_eq!(atomic_counter.load(Ordering::SeqCst), total);
    let counter = *mutex.try_lock().expect("free at the end");
    assert_eq!(counter, total, "counter == atomic_counter");
    assert!(!mutex.is_locked());
    println!(
        "contended: {total} locks, {} handed over",
        handoffs.load(Ordering::Relaxed)
    );
}

/// QEMU's `/aio/multi/mutex/handoff`: 2 contexts on 2 threads, one task each. Each lock taken after waiting
/// was handed over by the other thread's unlock (the only other task), so every hand-off is
/// also a change of holder thread. The run goes on until 200 hand-offs happened (QEMU runs
/// for 3 s and only prints), and the counter is exact.
#[test]
fn mutex_handoff() {
    let target = if cfg!(miri) { 2 } else { 200 };
    // Not a speed bound: only a guard against looping forever if hand-offs never happened.
    let give_up = Instant::now() + Duration::from_secs(120);
    let threads = Threads::start(2);

    struct Data {
        counter: usize,
        last: Option<thread::ThreadId>,
        switches: usize,
    }
    let mutex = Arc::new(CoMutex::new(Data {
        counter: 0,
        last: None,
        switches: 0,
    }));
    let atomic_counter = Arc::new(AtomicUsize::new(0));
    let handoffs = Arc::new(AtomicUsize::new(0));
    let mut joins = Vec::new();
    for h in &threads.handles {
        let (mutex, atomic_counter, handoffs) =
            (mutex.clone(), atomic_counter.clone(), handoffs.clone());
        joins.push(h.spawn(async move {
            let mut mine = 0;
            while handoffs.load(Ordering::SeqCst) < target && Instant::now() < give_up {
                let (mut g, was_pending) = waited(mutex.lock()).await;
                let me = thread::current().id();
                if g.last.is_some_and(|t| t != me) {
                    g.switches += 1;
                }
                g.last = Some(me);
                g.counter += 1;
                if was_pending {
                    handoffs.fetch_add(1, Ordering::SeqCst);
                }
                // Hold it across a turn of the loop, so that the other thread queues.
                yield_now().await;
                drop(g);
                atomic_counter.fetch_add(1, Ordering::SeqCst);
                mine += 1;
            }
            mine
        }));
    }
    let main = ctx();
    let per_task: Vec<usize> = joins
        .into_iter()
        .map(|j| main.block_on(j).unwrap())
        .collect();
    threads.stop();
    let data = mutex.try_lock().unwrap();
    let handoffs = handoffs.load(Ordering::SeqCst);
    assert_eq!(data.counter, atomic_counter.load(Ordering::SeqCst));
    assert_eq!(data.counter, per_task.iter().sum::<usize>());
    assert!(handoffs >= target, "only {handoffs} hand-offs");
    assert!(
        data.switches >= handoffs,
        "each hand-off moves the lock to the other thread: {} switches, {handoffs} hand-offs",
        data.switches
    );
    println!(
        "handoff: {} locks, {handoffs} handed over, {} thread switches",
        data.counter, data.switches
    );
}

/// Waiters on one context get the lock in the order they asked.
#[test]
fn mutex_is_fifo() {
    let ctx = ctx();
    let m = Rc::new(CoMutex::new(()));
    let order = Rc::new(RefCell::new(Vec::new()));
    let guard = m.try_lock().unwrap();
    let tasks: Vec<_> = (0..5)
        .map(|i| {
            let (m, order) = (m.clone(), order.clone());
            ctx.spawn_local(async move {
                let _g = m.lock().await;
                order.borrow_mut().push(i);
                yield_now().await; // hold it a while: the others stay queued
            })
        })
        .collect();
    ctx.poll_nonblocking(); // every task queues
    assert!(order.borrow().is_empty());
    drop(guard);
    for t in tasks {
        ctx.block_on(t).unwrap();
    }
    assert_eq!(*order.borrow(), [0, 1, 2, 3, 4]);
    assert!(!m.is_locked());
}

/// An unlock with a waiter hands the lock over at once: before the waiter runs, the lock is
/// already its own, so nobody can take it in between.
#[test]
fn mutex_unlock_hands_the_lock_to_the_first_waiter() {
    let m = CoMutex::new(0);
    let guard = m.try_lock().unwrap();
    let (wc, waker) = counting();
    let mut lock = Box::pin(m.lock());
    assert!(poll_once(lock.as_mut(), &waker).is_pending());
    assert!(m.try_lock().is_none());
    drop(guard);
    assert_eq!(woken(&wc), 1, "the waiter is woken");
    assert!(m.is_locked(), "handed over, not released");
    assert!(m.try_lock().is_none(), "no barging past the waiter");
    let Poll::Ready(mut g) = poll_once(lock.as_mut(), &waker) else {
        panic!("the woken waiter owns the lock");
    };
    *g += 1;
    drop(g);
    assert_eq!(*m.try_lock().unwrap(), 1);
}

#[test]
fn try_lock_fails_while_held_or_awaited() {
    let m = CoMutex::new(5);
    let g = m.try_lock().unwrap();
    assert!(m.try_lock().is_none());
    assert!(format!("{m:?}").contains("locked: true"));
    drop(g);
    assert!(!m.is_locked());
    let mut g = m.try_lock().unwrap();
    *g = 6;
    drop(g);
    assert_eq!(m.into_inner(), 6);
}

/// Dropping a queued lock future takes it out of the queue: the next unlock hands the lock to
/// the waiter behind it, and the dropped one is never woken.
#[test]
fn dropping_a_waiting_lock_leaves_the_queue() {
    let m = CoMutex::new(());
    let guard = m.try_lock().unwrap();
    let (ac, aw) = counting();
    let (bc, bw) = counting();
    let mut a = Box::pin(m.lock());
    let mut b = Box::pin(m.lock());
    assert!(poll_once(a.as_mut(), &aw).is_pending());
    assert!(poll_once(b.as_mut(), &bw).is_pending());
    drop(a);
    drop(guard);
    assert_eq!(woken(&ac), 0);
    assert_eq!(woken(&bc), 1);
    let Poll::Ready(g) = poll_once(b.as_mut(), &bw) else {
        panic!("b owns the lock");
    };
    drop(g);
    assert!(!m.is_locked());

    // The last waiter leaving: the holder's unlock frees the lock.
    let guard = m.try_lock().unwrap();
    let mut c = Box::pin(m.lock());
    assert!(poll_once(c.as_mut(), &aw).is_pending());
    drop(c);
    drop(guard);
    assert!(!m.is_locked());
    assert!(m.try_lock().is_some());
}

/// Dropping a lock future after the lock was handed to it, before it saw it, passes the lock
/// on: to the next waiter, or back to free.
#[test]
fn dropping_a_lock_future_that_was_handed_the_lock_passes_it_on() {
    let m = CoMutex::new(());
    let guard = m.try_lock().unwrap();
    let (ac, aw) = counting();
    let (bc, bw) = counting();
    let mut a = Box::pin(m.lock());
    let mut b = Box::pin(m.lock());
    assert!(poll_once(a.as_mut(), &aw).is_pending());
    assert!(poll_once(b.as_mut(), &bw).is_pending());
    drop(guard);
    assert_eq!((woken(&ac), woken(&bc)), (1, 0), "a is handed the lock");
    drop(a);
    assert_eq!(woken(&bc), 1, "a's drop handed it to b");
    assert!(m.is_locked());
    let Poll::Ready(g) = poll_once(b.as_mut(), &bw) else {
        panic!("b owns the lock");
    };
    drop(g);
    assert!(!m.is_locked());

    let guard = m.try_lock().unwrap();
    let mut c = Box::pin(m.lock());
    assert!(poll_once(c.as_mut(), &aw).is_pending());
    drop(guard);
    drop(c);
    assert!(!m.is_locked(), "no waiter left: the lock is free");
}

/// The same with tasks: aborting a task that waits for the lock, on another context, while
/// the holder keeps it; the next waiter gets the lock.
#[test]
fn aborting_a_waiting_task_does_not_lose_the_lock() {
    let threads = Threads::start(1);
    let m = Arc::new(CoMutex::new(Vec::new()));
    let main = ctx();
    let guard = m.try_lock().unwrap();
    let m1 = m.clone();
    let first = threads.handles[0].spawn(async move { m1.lock().await.push(1) });
    // Wait until it is queued (it cannot get the lock: we hold it).
    let queued = Arc::new(AtomicBool::new(false));
    let (m2, q) = (m.clone(), queued.clone());
    let second = threads.handles[0].spawn(async move {
        q.store(true, Ordering::SeqCst);
        m2.lock().await.push(2);
    });
    main.block_on(async {
        while !queued.load(Ordering::SeqCst) {
            yield_now().await;
        }
    });
    first.abort();
    main.block_on(async {
        while !first.is_finished() {
            yield_now().await;
        }
    });
    drop(guard);
    main.block_on(second).unwrap();
    threads.stop();
    assert_eq!(*m.try_lock().unwrap(), [2]);
}

// ---- CoQueue ----------------------------------------------------------------------------

/// `next` wakes exactly the first waiter, `restart_all` the rest; each waiter re-takes the
/// mutex it released while waiting.
#[test]
fn queue_next_and_restart_all() {
    let ctx = ctx();
    let state = Rc::new((CoMutex::new(0usize), CoQueue::new()));
    let order = Rc::new(RefCell::new(Vec::new()));
    let tasks: Vec<_> = (0..3)
        .map(|i| {
            let (state, order) = (state.clone(), order.clone());
            ctx.spawn_local(async move {
                let (m, q) = &*state;
                let mut g = m.lock().await;
                let before = *g;
                g = q.wait(g).await;
                // Re-locked: the count of wake-ups seen is consistent.
                *g += 1;
                order.borrow_mut().push((i, before));
            })
        })
        .collect();
    ctx.poll_nonblocking();
    let (m, q) = &*state;
    assert!(!q.is_empty());
    assert!(!m.is_locked(), "waiting released the mutex");
    assert!(q.next());
    while ctx.poll_nonblocking() {}
    assert_eq!(*order.borrow(), [(0, 0)], "only the first waiter ran");
    assert!(!q.is_empty());
    assert_eq!(q.restart_all(), 2);
    assert!(q.is_empty());
    for t in tasks {
        ctx.block_on(t).unwrap();
    }
    assert_eq!(*order.borrow(), [(0, 0), (1, 0), (2, 0)]);
    assert_eq!(*m.try_lock().unwrap(), 3);
    assert!(!q.next(), "nobody left");
    assert_eq!(q.restart_all(), 0);
}

/// A waiter on one thread, woken by a task on another under the same mutex: the condition it
/// waits for is set while it waits (which needs the mutex it released).
#[test]
fn queue_wait_across_threads() {
    let threads = Threads::start(2);
    let state = Arc::new((CoMutex::new(0usize), CoQueue::new()));
    let rounds = if cfg!(miri) { 3 } else { 200 };
    let s = state.clone();
    // Consumer: waits for each value in turn.
    let consumer = threads.handles[0].spawn(async move {
        let (m, q) = &*s;
        let mut seen = 0;
        let mut g = m.lock().await;
        while seen < rounds {
            while *g == seen {
                g = q.wait(g).await;
            }
            seen = *g;
        }
        seen
    });
    let s = state.clone();
    let producer = threads.handles[1].spawn(async move {
        let (m, q) = &*s;
        for _ in 0..rounds {
            *m.lock().await += 1;
            q.next();
            yield_now().await;
        }
    });
    let main = ctx();
    main.block_on(producer).unwrap();
    // The last `next` may have found nobody queued yet; the consumer then sees the value
    // without waiting.
    assert_eq!(main.block_on(consumer).unwrap(), rounds);
    threads.stop();
    assert!(state.1.is_empty());
}

/// A woken waiter dropped before it saw the wake-up passes it to the next waiter; a waiter
/// dropped while queued just leaves.
#[test]
fn queue_wait_cancellation() {
    let q = CoQueue::new();
    let (ac, aw) = counting();
    let (bc, bw) = counting();
    let mut a = Box::pin(q.wait_unlocked());
    let mut b = Box::pin(q.wait_unlocked());
    let c = q.wait_unlocked();
    assert!(poll_once(a.as_mut(), &aw).is_pending());
    assert!(poll_once(b.as_mut(), &bw).is_pending());
    drop(c); // never polled, still queued: leaves quietly
    assert!(q.next());
    assert_eq!((woken(&ac), woken(&bc)), (1, 0));
    drop(a);
    assert_eq!(woken(&bc), 1, "a's wake-up went to b");
    assert!(q.is_empty());
    assert!(poll_once(b.as_mut(), &bw).is_ready());
    assert!(!q.next());
}

// ---- CoRwLock ---------------------------------------------------------------------------

/// Readers hold the lock together: three tasks each keep a read guard across a yield, and all
/// three are inside at once.
#[test]
fn rwlock_readers_share() {
    let ctx = ctx();
    let lock = Rc::new(CoRwLock::new(7));
    let inside = Rc::new(std::cell::Cell::new(0));
    let max = Rc::new(std::cell::Cell::new(0));
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let (lock, inside, max) = (lock.clone(), inside.clone(), max.clone());
            ctx.spawn_local(async move {
                let r = lock.read().await;
                inside.set(inside.get() + 1);
                max.set(max.get().max(inside.get()));
                for _ in 0..3 {
                    yield_now().await;
                }
                inside.set(inside.get() - 1);
                *r
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(ctx.block_on(t).unwrap(), 7);
    }
    assert_eq!(max.get(), 3);
}

/// Writers exclude everyone, across threads: a writer leaves the pair unequal across an await
/// and restores it; no reader ever sees it unequal, and no write is lost.
#[test]
fn rwlock_writer_is_exclusive_across_threads() {
    let threads = Threads::start(3);
    let lock = Arc::new(CoRwLock::new((0usize, 0usize)));
    let rounds = if cfg!(miri) { 3 } else { 300 };
    let mut joins = Vec::new();
    for h in &threads.handles {
        for kind in 0..2 {
            let lock = lock.clone();
            joins.push(h.spawn(async move {
                for _ in 0..rounds {
                    if kind == 0 {
                        let mut w = lock.write().await;
                        w.0 += 1;
                        yield_now().await;
                        w.1 += 1;
                    } else {
                        let r = lock.read().await;
                        assert_eq!(r.0, r.1, "a reader saw a write half done");
                        yield_now().await;
                        assert_eq!(r.0, r.1, "a write happened under a reader");
                    }
                }
            }));
        }
    }
    let main = ctx();
    for j in joins {
        main.block_on(j).unwrap();
    }
    threads.stop();
    assert_eq!(*lock.try_read().unwrap(), (3 * rounds, 3 * rounds));
}

/// A waiting writer blocks readers that come after it (QEMU's fairness), and gets the lock
/// when the earlier readers leave; the later readers come in after it, together.
#[test]
fn rwlock_waiting_writer_blocks_new_readers() {
    let lock = CoRwLock::new(0);
    let r1 = lock.try_read().unwrap();
    let (wc, ww) = counting();
    let mut w = Box::pin(lock.write());
    assert!(poll_once(w.as_mut(), &ww).is_pending());
    assert!(lock.try_read().is_none(), "a writer waits");
    let (r2c, r2w) = counting();
    let (r3c, r3w) = counting();
    let mut r2 = Box::pin(lock.read());
    let mut r3 = Box::pin(lock.read());
    assert!(poll_once(r2.as_mut(), &r2w).is_pending());
    assert!(poll_once(r3.as_mut(), &r3w).is_pending());
    drop(r1);
    assert_eq!((woken(&wc), woken(&r2c), woken(&r3c)), (1, 0, 0));
    let Poll::Ready(mut g) = poll_once(w.as_mut(), &ww) else {
        panic!("the writer owns the lock");
    };
    *g = 1;
    assert!(poll_once(r2.as_mut(), &r2w).is_pending());
    drop(g);
    assert_eq!((woken(&r2c), woken(&r3c)), (1, 1), "both readers let in");
    let Poll::Ready(a) = poll_once(r2.as_mut(), &r2w) else {
        panic!("r2 reads");
    };
    let Poll::Ready(b) = poll_once(r3.as_mut(), &r3w) else {
        panic!("r3 reads");
    };
    assert_eq!((*a, *b), (1, 1));
    drop((a, b));
    assert!(lock.try_write().is_some());
}

/// A cancelled waiting writer lets the readers queued behind it in; a writer dropped after it
/// was granted the lock passes it on.
#[test]
fn rwlock_cancellation() {
    let lock = CoRwLock::new(());
    let r1 = lock.try_read().unwrap();
    let (_, ww) = counting();
    let (rc, rw) = counting();
    let mut w = Box::pin(lock.write());
    let mut r = Box::pin(lock.read());
    assert!(poll_once(w.as_mut(), &ww).is_pending());
    assert!(poll_once(r.as_mut(), &rw).is_pending());
    drop(w);
    assert_eq!(
        woken(&rc),
        1,
        "the reader behind the cancelled writer is let in"
    );
    let Poll::Ready(r2) = poll_once(r.as_mut(), &rw) else {
        panic!("reads beside r1");
    };
    drop((r1, r2));

    let r1 = lock.try_read().unwrap();
    let (wc, ww) = counting();
    let (rc, rw) = counting();
    let mut w = Box::pin(lock.write());
    let mut r = Box::pin(lock.read());
    assert!(poll_once(w.as_mut(), &ww).is_pending());
    assert!(poll_once(r.as_mut(), &rw).is_pending());
    drop(r1);
    assert_eq!((woken(&wc), woken(&rc)), (1, 0), "the writer is granted");
    drop(w);
    assert_eq!(
        woken(&rc),
        1,
        "the dropped writer's grant went to the reader"
    );
    assert!(poll_once(r.as_mut(), &rw).is_ready());
    drop(r);
    assert!(lock.try_write().is_some(), "everything released");
}

/// `downgrade` keeps the lock (no writer in between) and lets queued readers in; `upgrade` is
/// immediate for a lone reader, and otherwise queues behind earlier waiters.
#[test]
fn rwlock_upgrade_and_downgrade() {
    let lock = CoRwLock::new(0);
    let w = lock.try_write().unwrap();
    let (rc, rw) = counting();
    let (wc, ww) = counting();
    let mut rf = Box::pin(lock.read());
    let mut w2 = Box::pin(lock.write());
    assert!(poll_once(rf.as_mut(), &rw).is_pending());
    assert!(poll_once(w2.as_mut(), &ww).is_pending());
    let d = CoRwLockWriteGuard::downgrade(w);
    assert_eq!(
        (woken(&rc), woken(&wc)),
        (1, 0),
        "the reader joins, the writer waits"
    );
    let Poll::Ready(r) = poll_once(rf.as_mut(), &rw) else {
        panic!("reads beside the downgraded guard");
    };
    // Upgrading with another reader inside and a writer waiting: queue behind the writer.
    let (uc, uw) = counting();
    let mut up = Box::pin(CoRwLockReadGuard::upgrade(d));
    assert!(poll_once(up.as_mut(), &uw).is_pending());
    drop(r);
    assert_eq!(
        (woken(&wc), woken(&uc)),
        (1, 0),
        "the earlier writer goes first"
    );
    let Poll::Ready(mut g) = poll_once(w2.as_mut(), &ww) else {
        panic!("writer");
    };
    *g = 1;
    drop(g);
    assert_eq!(woken(&uc), 1);
    let Poll::Ready(mut g) = poll_once(up.as_mut(), &uw) else {
        panic!("upgraded");
    };
    *g += 1;
    drop(g);
    drop((rf, w2, up));

    // A lone reader upgrades at once.
    let ctx = ctx();
    ctx.block_on(async {
        let r = lock.read().await;
        assert_eq!(*r, 2);
        let mut w = CoRwLockReadGuard::upgrade(r).await;
        *w = 3;
        assert!(lock.try_read().is_none());
    });
    assert_eq!(lock.into_inner(), 3);
}

/// The guards and futures are `Send` (and the locks `Sync`), so tasks on any context can hold
/// them across awaits.
#[test]
fn types_are_send_and_sync() {
    fn send<T: Send>() {}
    fn sync<T: Sync>() {}
    send::<CoMutex<Vec<u8>>>();
    sync::<CoMutex<Vec<u8>>>();
    sync::<CoMutex<std::cell::Cell<u8>>>(); // `T: Send` is enough, as for std's Mutex
    send::<CoMutexGuard<'static, Vec<u8>>>();
    send::<aio_core::task::Lock<'static, Vec<u8>>>();
    send::<CoQueue>();
    sync::<CoQueue>();
    send::<aio_core::task::QueueWait<'static>>();
    send::<CoRwLock<Vec<u8>>>();
    sync::<CoRwLock<Vec<u8>>>();
    send::<CoRwLockReadGuard<'static, Vec<u8>>>();
    send::<CoRwLockWriteGuard<'static, Vec<u8>>>();
    send::<aio_core::task::ReadLock<'static, Vec<u8>>>();
    send::<aio_core::task::WriteLock<'static, Vec<u8>>>();
    // `CoQueue::wait` holds only Send things across its awaits.
    fn wait_is_send(q: &'static CoQueue, g: CoMutexGuard<'static, u8>) -> impl Send {
        q.wait(g)
    }
    let _ = wait_is_send;
}
