//! `RFifoLock`, QEMU's recursive FIFO lock: the two cases of QEMU's `tests/test-rfifolock.c`
//! (conformance case 47: `/nesting` and `/callback`), FIFO order against
//! the order of arrival (also against a releasing thread that locks again at once), deep
//! recursion, `try_lock` from another thread, exactly when the contention callback runs, a
//! thread that panics holding the lock and a contention callback that panics. Runs under Miri
//! too, with fewer threads and rounds.

use aio_core::RFifoLock;
use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// Spins (yielding) until `cond` holds; panics after 20 s rather than hanging the suite.
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::yield_now();
    }
}

/// A lock whose contention callback counts its calls.
fn counted<T>(value: T) -> (Arc<RFifoLock<T>>, Arc<AtomicU32>) {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let lock = RFifoLock::with_contention(value, move || {
        c.fetch_add(1, Ordering::SeqCst);
    });
    (Arc::new(lock), calls)
}

/// QEMU `/rfifolock/nesting`: lock three times and unlock three times on one thread, without
/// deadlock; the lock is held until the last unlock and free after it.
#[test]
fn nesting() {
    let lock = Arc::new(RFifoLock::new(()));
    let a = lock.lock();
    let b = lock.lock();
    let c = lock.lock();
    for guard in [c, b] {
        drop(guard);
        assert!(
            lock.is_owned_by_current_thread(),
            "an inner unlock released"
        );
        let l = lock.clone();
        assert!(
            thread::spawn(move || l.try_lock().is_none())
                .join()
                .unwrap(),
            "another thread got the lock while a guard remained"
        );
    }
    drop(a);
    assert!(!lock.is_locked());
    assert!(!lock.is_owned_by_current_thread());
    let l = lock.clone();
    thread::spawn(move || drop(l.lock())).join().unwrap();
}

/// QEMU `/rfifolock/callback`: the callback writes a byte to a pipe; the main thread holds the
/// lock while a second thread locks, and a blocking read of that byte returns only because
/// the second thread had to wait and called the callback.
#[test]
fn callback() {
    let (mut reader, writer) = std::io::pipe().unwrap();
    let lock = Arc::new(RFifoLock::with_contention((), move || {
        (&writer).write_all(&[1]).unwrap();
    }));
    let held = lock.lock();
    let l = lock.clone();
    let t = thread::spawn(move || drop(l.lock()));
    let mut byte = [0u8];
    reader.read_exact(&mut byte).unwrap();
    assert_eq!(byte, [1]);
    drop(held);
    t.join().unwrap();
    assert!(!lock.is_locked());
}

thread_local! {
    /// The fairness test's index of the calling thread, for the contention callback.
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// A small deterministic generator for the arrival permutations (xorshift64).
fn shuffle(v: &mut [usize], state: &mut u64) {
    for i in (1..v.len()).rev() {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        v.swap(i, (*state % (i as u64 + 1)) as usize);
    }
}

/// Marks the main thread's own acquisitions in the fairness log.
const MAIN: usize = usize::MAX;

/// N threads × M rounds: in each round the main thread holds the lock while the threads
/// arrive one at a time in a fresh random order (each seen waiting, through the contention
/// callback, before the next is let go); then main releases and at once locks again. The
/// acquisitions must follow the arrivals exactly, with main last: a lock that woke waiters in
/// any other order, or let the releasing thread barge back in ahead of them (as
/// `parking_lot`'s and std's locks do), fails. The log lives inside the lock, in a `RefCell`:
/// two holders at once would also show up as a failed borrow (and as a race under Miri).
#[test]
fn fifo_order_equals_arrival_order() {
    let (n, rounds) = if cfg!(miri) { (3, 3) } else { (6, 100) };
    let waiting: Arc<Vec<AtomicBool>> = Arc::new((0..n).map(|_| AtomicBool::new(false)).collect());
    let w = waiting.clone();
    let lock = Arc::new(RFifoLock::with_contention(
        RefCell::new(Vec::new()),
        move || {
            if let Some(i) = INDEX.get() {
                w[i].store(true, Ordering::SeqCst);
            }
        },
    ));
    let mut go = Vec::new();
    let mut threads = Vec::new();
    for i in 0..n {
        let (tx, rx) = mpsc::channel::<()>();
        go.push(tx);
        let lock = lock.clone();
        threads.push(thread::spawn(move || {
            INDEX.set(Some(i));
            while rx.recv().is_ok() {
                let guard = lock.lock();
                guard.borrow_mut().push(i);
            }
        }));
    }

    let mut seed = 0x9E37_79B9_7F4A_7C15;
    let mut expected = Vec::new();
    let mut held = lock.lock();
    for _ in 0..rounds {
        let mut order: Vec<usize> = (0..n).collect();
        shuffle(&mut order, &mut seed);
        for &i in &order {
            waiting[i].store(false, Ordering::SeqCst);
            go[i].send(()).unwrap();
            wait_until("a thread to queue", || waiting[i].load(Ordering::SeqCst));
        }
        drop(held);
        held = lock.lock();
        held.borrow_mut().push(MAIN);
        expected.extend(order);
        expected.push(MAIN);
    }
    drop(held);
    drop(go);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(*lock.lock().borrow(), expected);
}

/// Many nested guards: every inner drop keeps the lock, only the last releases it, and the
/// thread waiting meanwhile gets it then (and not before).
#[test]
fn recursion_depth() {
    let depth = if cfg!(miri) { 100 } else { 10_000 };
    let (lock, calls) = counted(AtomicUsize::new(0));
    let mut guards: Vec<_> = (0..depth).map(|_| lock.lock()).collect();
    guards[depth - 1].fetch_add(1, Ordering::SeqCst);
    assert_eq!(calls.load(Ordering::SeqCst), 0, "nesting never waits");

    let l = lock.clone();
    let waiter = thread::spawn(move || l.lock().load(Ordering::SeqCst));
    wait_until("the waiter to queue", || calls.load(Ordering::SeqCst) == 1);
    while guards.len() > 1 {
        // Drop from the outermost: the order of the guards does not matter.
        drop(guards.remove(0));
        assert!(lock.is_owned_by_current_thread());
    }
    assert!(!waiter.is_finished());
    // The waiter reads what the owner wrote last, right before the release.
    guards[0].store(depth, Ordering::Relaxed);
    drop(guards);
    assert_eq!(waiter.join().unwrap(), depth);
    assert!(!lock.is_locked());
}

/// `try_lock` from another thread fails while the lock is held, without queueing (the holder's
/// release finds nobody to hand over to, and a later lock does not wait) or calling the
/// contention callback; it succeeds once the lock is free.
#[test]
fn try_lock_from_another_thread_while_held() {
    let (lock, calls) = counted(5);
    let held = lock.lock();
    let l = lock.clone();
    thread::spawn(move || {
        for _ in 0..3 {
            assert!(l.try_lock().is_none());
        }
    })
    .join()
    .unwrap();
    assert!(lock.is_owned_by_current_thread());
    drop(held);
    assert!(!lock.is_locked(), "a failed try_lock left a ticket behind");
    let l = lock.clone();
    let got = thread::spawn(move || l.try_lock().map(|g| *g))
        .join()
        .unwrap();
    assert_eq!(got, Some(5));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// The contention callback runs exactly when a thread has to wait: never for uncontended,
/// nested or `try_lock` acquisitions; once for a single waiter; and for the second of two
/// waiters once more after the hand-off to the first (as QEMU's, which every unlock's
/// broadcast made re-check and call it again).
#[test]
fn callback_runs_only_when_a_thread_must_wait() {
    let (lock, calls) = counted(());
    let calls_now = || calls.load(Ordering::SeqCst);

    // Uncontended, nested, try_lock (also failing, from another thread): no call.
    drop(lock.lock());
    {
        let _a = lock.lock();
        let _b = lock.lock();
        let _c = lock.try_lock().unwrap();
        let l = lock.clone();
        thread::spawn(move || assert!(l.try_lock().is_none()))
            .join()
            .unwrap();
    }
    let l = lock.clone();
    thread::spawn(move || drop(l.lock())).join().unwrap();
    assert_eq!(calls_now(), 0);

    // One waiter: one call.
    let held = lock.lock();
    let l = lock.clone();
    let t = thread::spawn(move || drop(l.lock()));
    wait_until("the waiter's call", || calls_now() == 1);
    drop(held);
    t.join().unwrap();
    assert_eq!(calls_now(), 1);

    // Two waiters: one call each on arrival, and the second's again after the hand-off to
    // the first, which holds the lock until it sees that call.
    calls.store(0, Ordering::SeqCst);
    let held = lock.lock();
    let (l, c) = (lock.clone(), calls.clone());
    let first = thread::spawn(move || {
        let _g = l.lock();
        wait_until("the second waiter's call after the hand-off", || {
            c.load(Ordering::SeqCst) == 3
        });
    });
    wait_until("the first waiter's call", || calls_now() == 1);
    let l = lock.clone();
    let second = thread::spawn(move || drop(l.lock()));
    wait_until("the second waiter's call", || calls_now() == 2);
    drop(held);
    first.join().unwrap();
    second.join().unwrap();
    assert_eq!(calls_now(), 3);
}

/// A thread that panics while holding the lock (nested, even) releases it during unwinding:
/// the thread waiting behind it gets the lock, and the data is not poisoned.
#[test]
fn a_panicking_holder_passes_the_lock_on() {
    let (lock, calls) = counted(AtomicU32::new(0));
    let (tx, rx) = mpsc::channel();
    let l = lock.clone();
    let c = calls.clone();
    let holder = thread::spawn(move || {
        let outer = l.lock();
        let _inner = l.lock();
        outer.store(7, Ordering::Relaxed);
        tx.send(()).unwrap();
        wait_until("the waiter to queue", || c.load(Ordering::SeqCst) == 1);
        panic!("holder panics with two guards");
    });
    rx.recv().unwrap();
    // Queues behind the holder, then gets the lock when the holder's guards unwind.
    let guard = lock.lock();
    assert_eq!(guard.load(Ordering::Relaxed), 7);
    assert!(holder.join().is_err());
    drop(guard);
    assert!(!lock.is_locked());
    assert_eq!(lock.try_lock().unwrap().load(Ordering::Relaxed), 7);
}

/// A thread that exits while holding the lock keeps it held for good. Only a leaked guard can
/// outlive its thread (unwinding drops guards, as above), and nothing can release it after:
/// no other thread can take the lock, not even one started later (owner ids are never reused,
/// so a new thread cannot pass for the dead owner and "nest"), and `lock` waits for ever,
/// which this test shows with a bounded wait.
#[test]
#[cfg_attr(miri, ignore = "leaves a thread blocked in lock for good")]
fn a_thread_that_exits_holding_a_leaked_guard_keeps_the_lock_held() {
    let lock = Arc::new(RFifoLock::new(0u32));
    let l = lock.clone();
    thread::spawn(move || std::mem::forget(l.lock()))
        .join()
        .unwrap();
    assert!(lock.is_locked());
    assert!(!lock.is_owned_by_current_thread());
    assert!(lock.try_lock().is_none());
    for _ in 0..8 {
        let l = lock.clone();
        let refused =
            thread::spawn(move || l.try_lock().is_none() && !l.is_owned_by_current_thread());
        assert!(
            refused.join().unwrap(),
            "a later thread passed for the dead owner"
        );
    }
    let (tx, rx) = mpsc::channel();
    let l = lock.clone();
    // This thread stays blocked until the process exits.
    thread::spawn(move || {
        let _guard = l.lock();
        tx.send(()).ok();
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "lock returned although the dead owner never released"
    );
}

/// A contention callback that panics takes its thread out of the queue, and the panic leaves
/// `lock`: both when the thread's ticket is still behind others (it is skipped at the next
/// hand-off, so the thread queued after it gets the lock) and when the ticket was served
/// while the callback ran (the lock is passed on at once).
#[test]
fn a_panicking_callback_leaves_the_queue() {
    thread_local! {
        static PANIC_IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
    }
    let in_callback = Arc::new(AtomicBool::new(false));
    let release_callback = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU32::new(0));
    let (i, r, c) = (in_callback.clone(), release_callback.clone(), calls.clone());
    let lock = Arc::new(RFifoLock::with_contention(
        RefCell::new(Vec::new()),
        move || {
            c.fetch_add(1, Ordering::SeqCst);
            if PANIC_IN_CALLBACK.get() {
                i.store(true, Ordering::SeqCst);
                wait_until("the test to let the callback panic", || {
                    r.load(Ordering::SeqCst)
                });
                panic!("contention callback panics");
            }
        },
    ));
    let panicking_locker = |lock: Arc<RFifoLock<RefCell<Vec<&'static str>>>>| {
        thread::spawn(move || {
            PANIC_IN_CALLBACK.set(true);
            let r = catch_unwind(AssertUnwindSafe(|| drop(lock.lock())));
            assert!(r.is_err(), "the callback's panic must leave lock()");
        })
    };

    // Skipped: B leaves while main holds the lock; C, behind B, gets it at main's release.
    let held = lock.lock();
    release_callback.store(true, Ordering::SeqCst);
    panicking_locker(lock.clone()).join().unwrap();
    let l = lock.clone();
    let c = thread::spawn(move || l.lock().borrow_mut().push("C"));
    wait_until("C to queue", || calls.load(Ordering::SeqCst) == 2);
    held.borrow_mut().push("main");
    drop(held);
    c.join().unwrap();
    assert!(!lock.is_locked(), "an abandoned ticket is still queued");

    // Served during the callback: B's ticket comes up while its callback runs; B passes the
    // lock on as it unwinds.
    let held = lock.lock();
    in_callback.store(false, Ordering::SeqCst);
    release_callback.store(false, Ordering::SeqCst);
    let b = panicking_locker(lock.clone());
    wait_until("B's callback", || in_callback.load(Ordering::SeqCst));
    drop(held);
    release_callback.store(true, Ordering::SeqCst);
    b.join().unwrap();
    assert!(!lock.is_locked(), "B's served ticket was not passed on");
    lock.lock().borrow_mut().push("main again");
    assert_eq!(*lock.lock().borrow(), ["main", "C", "main again"]);
}

/// Mutual exclusion under contention: threads add to a plain `Cell` counter, with a nested
/// lock inside; no increment is lost (and Miri sees no race).
#[test]
fn contended_increments_are_not_lost() {
    let (threads, per_thread) = if cfg!(miri) { (3, 20) } else { (4, 5_000) };
    let lock = Arc::new(RFifoLock::new(Cell::new(0u64)));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let lock = lock.clone();
            thread::spawn(move || {
                for _ in 0..per_thread {
                    let outer = lock.lock();
                    let inner = lock.lock();
                    let v = outer.get();
                    thread::yield_now();
                    inner.set(v + 1);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(lock.lock().get(), threads * per_thread);
}

/// The plain accessors: `into_inner`, `get_mut`, `Default`, `From`, and `Debug` (which shows
/// the data only when it can lock without waiting).
#[test]
fn accessors_and_debug() {
    let mut lock = RFifoLock::from(vec![1]);
    lock.get_mut().push(2);
    assert_eq!(
        format!("{lock:?}"),
        "RFifoLock { data: [1, 2], contention: false, .. }"
    );
    let held = lock.lock();
    assert!(
        format!("{lock:?}").contains("[1, 2]"),
        "nested: its owner may look"
    );
    thread::scope(|s| {
        s.spawn(|| assert!(format!("{lock:?}").contains("<locked>")));
    });
    assert_eq!(format!("{held:?}"), "[1, 2]");
    drop(held);
    assert_eq!(lock.into_inner(), [1, 2]);
    assert_eq!(*RFifoLock::<u8>::default().lock(), 0);
}
