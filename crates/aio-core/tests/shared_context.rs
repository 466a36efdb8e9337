//! `SharedContext`: acquire/release of a context by several threads (seed 002, QEMU's
//! `aio_context_acquire`/`release`): the seed's two patterns, the contention kick, FIFO turns,
//! ports of the removed `/aio/acquire` tests, nesting, `current`, drops on other threads and a
//! thread leaking its guard, and seeded random programs checked against a model.

#[path = "support/ctx.rs"]
mod support;

use aio_core::{AioContext, ClockType, EventNotifier, Scale, SharedContext};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

fn shared() -> SharedContext {
    SharedContext::new(support::send_monitor()).unwrap()
}

/// How long a wait may take before the test calls it a hang (Miri is slow).
const PATIENCE: Duration = Duration::from_secs(if cfg!(miri) { 120 } else { 10 });

/// An event-loop thread running the seed's `loop { acquire; poll(blocking); release }` until
/// stopped; returns how many iterations it made.
struct Looper {
    stop: Arc<AtomicBool>,
    ctx: SharedContext,
    iterations: Arc<AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Looper {
    fn start(ctx: &SharedContext) -> Looper {
        let stop = Arc::new(AtomicBool::new(false));
        let iterations = Arc::new(AtomicUsize::new(0));
        let (c, s, i) = (ctx.clone(), stop.clone(), iterations.clone());
        let (tx, rx) = mpsc::channel();
        let thread = thread::spawn(move || {
            let mut first = Some(tx);
            while !s.load(SeqCst) {
                let held = c.acquire();
                if let Some(tx) = first.take() {
                    tx.send(()).unwrap();
                }
                held.poll(); // no timer, no handler: sleeps until notified
                i.fetch_add(1, SeqCst);
            }
        });
        rx.recv().unwrap();
        Looper {
            stop,
            ctx: ctx.clone(),
            iterations,
            thread: Some(thread),
        }
    }
}

impl Drop for Looper {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        self.ctx.notify();
        if let Some(t) = self.thread.take() {
            let r = t.join();
            if !thread::panicking() {
                r.unwrap();
            }
        }
    }
}

#[test]
fn seed_patterns_event_loop_thread_and_io_thread() {
    let ctx = shared();
    let looper = Looper::start(&ctx);
    // The loop thread holds the context and sleeps in a poll with no timeout: only the
    // contention kick gets us in.
    let ctx2 = ctx.clone();
    let io = thread::spawn(move || {
        let t0 = Instant::now();
        let held = ctx2.acquire();
        let waited = t0.elapsed();
        // "I/O": an fd handler on an eventfd, a timer and a BH, polled until all three ran.
        let n = Arc::new(EventNotifier::new().unwrap());
        let got = Arc::new(AtomicUsize::new(0));
        let (g, n2) = (got.clone(), n.clone());
        let handler = held
            .fd_handler(n.clone())
            .on_read(move || {
                if n2.test_and_clear() {
                    g.fetch_add(1, SeqCst);
                }
            })
            .register()
            .unwrap();
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let timer = held
            .timer(ClockType::Realtime, Scale::MS, move || {
                f.store(true, SeqCst)
            })
            .unwrap();
        timer.arm_after(Duration::from_millis(1));
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        held.schedule_oneshot(move || r.store(true, SeqCst));
        n.set().unwrap();
        let deadline = Instant::now() + PATIENCE;
        while got.load(SeqCst) < 1 || !fired.load(SeqCst) || !ran.load(SeqCst) {
            assert!(Instant::now() < deadline, "the I/O never completed");
            held.poll();
        }
        assert!(!handler.remove(), "nothing was running");
        drop(held);
        waited
    });
    let waited = io.join().unwrap();
    assert!(
        waited < PATIENCE,
        "the acquire was not kicked in: {waited:?}"
    );
    // The loop thread goes on: it runs a BH scheduled from here.
    let (tx, rx) = mpsc::channel();
    ctx.handle().schedule_oneshot(move || tx.send(()).unwrap());
    rx.recv_timeout(PATIENCE)
        .expect("the loop thread runs again");
    assert!(looper.iterations.load(SeqCst) >= 1);
}

#[test]
fn contenders_get_the_context_in_arrival_order_and_the_loop_cannot_starve_them() {
    let n = if cfg!(miri) { 3 } else { 6 };
    let ctx = shared();
    let order = Arc::new(Mutex::new(Vec::new()));
    let held = ctx.acquire();
    let mut threads = Vec::new();
    for i in 0..n {
        let (c, o) = (ctx.clone(), order.clone());
        threads.push(thread::spawn(move || {
            let h = c.acquire();
            o.lock().unwrap().push(i);
            h.poll_nonblocking();
        }));
        // The contender's ticket is taken before its contention notify, which is the only
        // thing that wakes this blocking poll (no handler, no timer): so it has arrived.
        assert!(!held.poll(), "a contention kick is not progress");
    }
    // The loop pattern: release and at once acquire again. FIFO puts this thread behind all.
    drop(held);
    let again = ctx.acquire();
    order.lock().unwrap().push(usize::MAX);
    drop(again);
    for t in threads {
        t.join().unwrap();
    }
    let mut expected: Vec<usize> = (0..n).collect();
    expected.push(usize::MAX);
    assert_eq!(*order.lock().unwrap(), expected);
}

#[test]
fn acquire_2014_contention_kicks_a_blocking_poll() {
    // QEMU's /aio/acquire before 2017: the contention callback's notify wakes the holder's
    // blocking poll, which returns false; the waiter gets the lock once it is released.
    let ctx = shared();
    let notifier = Arc::new(EventNotifier::new().unwrap());
    let held = ctx.acquire();
    let _dummy = held
        .set_event_notifier(&notifier, |_| panic!("the dummy notifier must never fire"))
        .unwrap();
    assert!(!held.poll_nonblocking());
    let acquired = Arc::new(AtomicBool::new(false));
    let (c, a) = (ctx.clone(), acquired.clone());
    let t = thread::spawn(move || {
        let _h = c.acquire();
        a.store(true, SeqCst);
    });
    assert!(!held.poll());
    assert!(!acquired.load(SeqCst), "the holder still holds it");
    drop(held);
    t.join().unwrap();
    assert!(acquired.load(SeqCst));
}

#[test]
fn acquire_2021_poll_does_not_drop_the_callers_lock() {
    // The 2021-2023 form: the other thread sets the notifier, then acquires and releases.
    // The holder's blocking poll runs the notifier (true) and keeps the lock meanwhile.
    let ctx = shared();
    let notifier = Arc::new(EventNotifier::new().unwrap());
    let held = ctx.acquire();
    let _h = held
        .set_event_notifier(&notifier, |n| {
            n.test_and_clear();
        })
        .unwrap();
    let acquired = Arc::new(AtomicBool::new(false));
    let (c, a, n) = (ctx.clone(), acquired.clone(), notifier.clone());
    let t = thread::spawn(move || {
        n.set().unwrap();
        drop(c.acquire());
        a.store(true, SeqCst);
    });
    while !held.poll() {}
    assert!(
        !acquired.load(SeqCst),
        "poll must not release the caller's lock"
    );
    drop(held);
    t.join().unwrap();
    assert!(acquired.load(SeqCst));
}

#[test]
fn nested_acquire_and_poll_from_a_callback_and_current() {
    let ctx = shared();
    assert!(SharedContext::current().is_none());
    let held = ctx.acquire();
    assert!(SharedContext::current().unwrap().same_context(&ctx));
    let inner_ran = Arc::new(AtomicBool::new(false));
    let outer_done = Arc::new(AtomicBool::new(false));
    let (ir, od) = (inner_ran.clone(), outer_done.clone());
    held.schedule_oneshot(move || {
        assert!(
            AioContext::current().is_none(),
            "a shared context is never an AioContext"
        );
        let me = SharedContext::current().expect("the held context");
        let nested = me.acquire(); // recursive: the holder
        let ir2 = ir.clone();
        nested.schedule_oneshot(move || ir2.store(true, SeqCst));
        while !ir.load(SeqCst) {
            nested.poll();
        }
        drop(nested);
        assert!(SharedContext::current().unwrap().same_context(&me));
        od.store(true, SeqCst);
    });
    while !outer_done.load(SeqCst) {
        held.poll();
    }
    assert!(inner_ran.load(SeqCst));
    // Nested release did not release: another thread cannot get in.
    let c = ctx.clone();
    assert!(
        thread::spawn(move || c.try_acquire().is_none())
            .join()
            .unwrap()
    );
    drop(held);
    assert!(SharedContext::current().is_none());
    let c = ctx.clone();
    assert!(
        thread::spawn(move || c.try_acquire().is_some())
            .join()
            .unwrap()
    );
}

#[test]
fn a_handle_used_by_a_non_holder_queues_for_the_next_holder() {
    let ctx = shared();
    let looper = Looper::start(&ctx);
    // Registered from this thread, which does not hold: applied by the loop thread's poll.
    let n = Arc::new(EventNotifier::new().unwrap());
    let (tx, rx) = mpsc::channel();
    let n2 = n.clone();
    let h = ctx
        .handle()
        .fd_handler(n.clone())
        .on_read(move || {
            if n2.test_and_clear() {
                tx.send(()).unwrap();
            }
        })
        .register()
        .unwrap();
    n.set().unwrap();
    rx.recv_timeout(PATIENCE).unwrap();
    assert!(h.is_registered());
    drop(h); // from a non-holder: the gate stops it at once
    n.set().unwrap();
    // A later BH runs, the handler does not.
    let (btx, brx) = mpsc::channel();
    ctx.handle().schedule_oneshot(move || btx.send(()).unwrap());
    brx.recv_timeout(PATIENCE).unwrap();
    assert!(rx.try_recv().is_err());
    drop(looper);
}

/// Counts drops of what a closure captured.
struct DropFlag(Arc<AtomicUsize>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, SeqCst);
    }
}

#[test]
fn dropped_on_another_thread_with_handlers_bhs_and_timers() {
    let ctx = shared();
    let drops = Arc::new(AtomicUsize::new(0));
    let ran = Arc::new(AtomicUsize::new(0));
    let n = EventNotifier::new().unwrap();
    let (handler, timer, bh) = {
        let held = ctx.acquire();
        let (f1, r1) = (DropFlag(drops.clone()), ran.clone());
        let handler = held
            .fd_handler(n)
            .on_read(move || {
                let _ = &f1;
                r1.fetch_add(1, SeqCst);
            })
            .register()
            .unwrap();
        let (f2, r2) = (DropFlag(drops.clone()), ran.clone());
        let timer = held
            .timer(ClockType::Realtime, Scale::MS, move || {
                let _ = &f2;
                r2.fetch_add(1, SeqCst);
            })
            .unwrap();
        timer.arm_after(Duration::from_secs(3600));
        let (f3, r3) = (DropFlag(drops.clone()), ran.clone());
        let bh = held.bh(move || {
            let _ = &f3;
            r3.fetch_add(1, SeqCst);
        });
        bh.schedule();
        let (f4, r4) = (DropFlag(drops.clone()), ran.clone());
        held.schedule_oneshot(move || {
            let _ = &f4;
            r4.fetch_add(1, SeqCst);
        });
        (handler, timer, bh)
    };
    // The creator keeps only the handles; the last clone dies on another thread.
    thread::spawn(move || drop(ctx)).join().unwrap();
    assert_eq!(ran.load(SeqCst), 0, "dropping runs no callback");
    // Handler node and one-shot freed with the loop; the BH's and timer's closures with their
    // handles (the loop is gone, the handles become inert).
    assert!(!handler.is_registered());
    drop(handler);
    drop(bh);
    drop(timer);
    assert_eq!(drops.load(SeqCst), 4);
}

#[test]
#[cfg_attr(miri, ignore = "leaks the loop on purpose, which Miri reports")]
fn a_thread_that_exits_holding_keeps_the_lock_and_the_loop_is_leaked() {
    // The guard cannot be sent away; the only way to exit holding is to leak it. The lock then
    // stays held (RFifoLock's behaviour): other threads are refused (`try_acquire`) or wait
    // for good, and dropping the last clone leaks the loop rather than drop it under a
    // thread that may still have its home-table entry.
    let ctx = shared();
    let c = ctx.clone();
    thread::spawn(move || std::mem::forget(c.acquire()))
        .join()
        .unwrap();
    assert!(ctx.try_acquire().is_none());
    let (tx, rx) = mpsc::channel();
    let c = ctx.clone();
    let waiter = thread::spawn(move || {
        let _h = c.acquire();
        tx.send(()).unwrap();
    });
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    drop(waiter); // detached: it waits for good; the process ends it
    drop(ctx);
}

/// xorshift64*: the model test's generator (no dependency).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What must have run: for each scheduled BH or armed timer, how many times it ran.
#[derive(Default)]
struct Model {
    oneshots: Vec<Arc<AtomicUsize>>,
    timers: Vec<Arc<AtomicUsize>>,
}

#[test]
fn random_programs_against_a_model() {
    let (k, steps, seeds) = if cfg!(miri) { (2, 12, 1) } else { (3, 120, 6) };
    for seed in 1..=seeds {
        let ctx = shared();
        let model = Arc::new(Mutex::new(Model::default()));
        let barrier = Arc::new(Barrier::new(k));
        let keep = Arc::new(Mutex::new(Vec::new())); // timers kept alive until the end
        let threads: Vec<_> = (0..k)
            .map(|t| {
                let (ctx, model, barrier, keep) =
                    (ctx.clone(), model.clone(), barrier.clone(), keep.clone());
                thread::spawn(move || {
                    let mut rng = Rng(seed * 7919 + t as u64 * 104_729 + 1);
                    // Shared with each registration of case 2, which takes a clone.
                    let b = Arc::new(EventNotifier::new().unwrap());
                    b.set().unwrap(); // never cleared: always readable, level-triggered
                    barrier.wait();
                    for _ in 0..steps {
                        let held = ctx.acquire();
                        for _ in 0..=rng.below(4) {
                            match rng.below(5) {
                                0 => {
                                    let c = Arc::new(AtomicUsize::new(0));
                                    let c2 = c.clone();
                                    held.schedule_oneshot(move || {
                                        c2.fetch_add(1, SeqCst);
                                    });
                                    model.lock().unwrap().oneshots.push(c);
                                }
                                1 => {
                                    let c = Arc::new(AtomicUsize::new(0));
                                    let c2 = c.clone();
                                    let timer = held
                                        .timer(ClockType::Realtime, Scale::NS, move || {
                                            c2.fetch_add(1, SeqCst);
                                        })
                                        .unwrap();
                                    timer.arm_after(Duration::from_micros(rng.below(200)));
                                    keep.lock().unwrap().push(timer);
                                    model.lock().unwrap().timers.push(c);
                                }
                                2 => {
                                    // A handler that runs while registered and never after
                                    // its removal returned.
                                    let c = Arc::new(AtomicUsize::new(0));
                                    let c2 = c.clone();
                                    let h = held
                                        .fd_handler(b.clone())
                                        .on_read(move || {
                                            c2.fetch_add(1, SeqCst);
                                        })
                                        .register()
                                        .unwrap();
                                    held.poll_nonblocking();
                                    let release_first = rng.below(2) == 0;
                                    let running = if release_first {
                                        // Removed by a non-holder (another thread may be
                                        // dispatching it right now).
                                        let s = thread::spawn(move || h.remove());
                                        s.join().unwrap()
                                    } else {
                                        h.remove()
                                    };
                                    let at = c.load(SeqCst);
                                    held.poll_nonblocking();
                                    held.poll_nonblocking();
                                    assert!(c.load(SeqCst) <= at + usize::from(running));
                                }
                                3 => {
                                    held.poll_nonblocking();
                                }
                                _ => {
                                    // Nested acquire through `current`, polled inside.
                                    let me = SharedContext::current().unwrap();
                                    let nested = me.acquire();
                                    nested.poll_nonblocking();
                                }
                            }
                        }
                        drop(held);
                        if rng.below(3) == 0 {
                            thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Drain: every one-shot and timer runs exactly once.
        let held = ctx.acquire();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let m = model.lock().unwrap();
            let pending = m
                .oneshots
                .iter()
                .chain(m.timers.iter())
                .any(|c| c.load(SeqCst) == 0);
            for c in m.oneshots.iter().chain(m.timers.iter()) {
                assert!(c.load(SeqCst) <= 1, "seed {seed}: something ran twice");
            }
            drop(m);
            if !pending {
                break;
            }
            assert!(Instant::now() < deadline, "seed {seed}: work never ran");
            held.poll_nonblocking();
            thread::yield_now();
        }
        drop(held);
        drop(keep);
    }
}

#[test]
fn current_is_the_polled_context_even_with_another_acquired_since() {
    let (a, b) = (shared(), shared());
    let held_a = a.acquire();
    let held_b = b.acquire();
    assert!(SharedContext::current().unwrap().same_context(&b));
    let (tx, rx) = mpsc::channel();
    held_a.schedule_oneshot(move || tx.send(SharedContext::current().unwrap()).unwrap());
    while rx.try_recv().map(|c| assert!(c.same_context(&a))).is_err() {
        held_a.poll();
    }
    assert!(SharedContext::current().unwrap().same_context(&b));
    drop(held_a); // out of order: b is still held and current
    assert!(SharedContext::current().unwrap().same_context(&b));
    drop(held_b);
    assert!(SharedContext::current().is_none());
}

#[test]
fn a_guard_kept_in_a_thread_local_is_released_when_its_thread_exits() {
    use std::cell::RefCell;
    use std::sync::OnceLock;
    static CTX: OnceLock<SharedContext> = OnceLock::new();
    thread_local! {
        static KEPT: RefCell<Option<aio_core::Acquired<'static>>> = const { RefCell::new(None) };
    }
    let ctx = CTX.get_or_init(shared);
    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    thread::spawn(move || {
        let held = ctx.acquire();
        held.schedule_oneshot(move || r.store(true, SeqCst));
        KEPT.with(|k| *k.borrow_mut() = Some(held));
        // Exits holding: the thread-local's destructor releases, on this thread.
    })
    .join()
    .unwrap();
    let held = ctx.try_acquire().expect("released at thread exit");
    while !ran.load(SeqCst) {
        held.poll();
    }
}
