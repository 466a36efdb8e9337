//! An adversarial review of `SharedContext` ([SHARED-1]) from safe code: each test is one
//! attempt to reach the loop of a shared context from a thread that does not hold it, or to
//! leave the thread-local state (`AioContext::current`, `SharedContext::current`, the home
//! words and home table) wrong after nesting, out-of-order releases, panics, leaked guards and
//! thread exit. Run under Miri (its data-race detector sees a loop touched by two threads)
//! as well as natively.

#[path = "support/ctx.rs"]
mod support;

use aio_core::{Acquired, AioContext, ClockType, EventNotifier, Scale, SharedContext};
use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

fn shared() -> SharedContext {
    SharedContext::new(support::send_monitor()).unwrap()
}

/// How long a wait may take before the test calls it a hang (Miri is slow).
const PATIENCE: Duration = Duration::from_secs(if cfg!(miri) { 120 } else { 10 });

/// Polls `held` until `done` is true, failing the test after [`PATIENCE`].
fn poll_until(held: &Acquired<'_>, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < PATIENCE, "hang");
        held.poll();
    }
}

/// Counts drops of what a closure captured.
struct DropFlag(Arc<AtomicUsize>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, SeqCst);
    }
}

/// A thread running `loop { acquire; poll; release }` on a shared context until dropped.
struct Looper {
    stop: Arc<AtomicBool>,
    ctx: SharedContext,
    thread: Option<thread::JoinHandle<()>>,
}

impl Looper {
    fn start(ctx: &SharedContext) -> Looper {
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (ctx.clone(), stop.clone());
        let (tx, rx) = mpsc::channel();
        let thread = thread::spawn(move || {
            let mut first = Some(tx);
            while !s.load(SeqCst) {
                let held = c.acquire();
                if let Some(tx) = first.take() {
                    tx.send(()).unwrap();
                }
                held.poll();
            }
        });
        rx.recv().unwrap();
        Looper {
            stop,
            ctx: ctx.clone(),
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

/// What a shared callback sees of the thread-local state.
fn check_inside(ctx: &SharedContext, what: &str, seen: &Mutex<Vec<String>>) {
    let mut s = seen.lock().unwrap();
    if AioContext::current().is_some() {
        s.push(format!("{what}: AioContext::current() is Some"));
    }
    match SharedContext::current() {
        Some(c) if c.same_context(ctx) => {}
        Some(_) => s.push(format!("{what}: SharedContext::current() names another")),
        None => s.push(format!("{what}: SharedContext::current() is None")),
    }
    if !ctx.is_held_by_current_thread() {
        s.push(format!(
            "{what}: runs on a thread that does not hold the context"
        ));
    }
    s.push(format!("{what}: ran"));
}

/// Attempt: get an `AioContext` (an `Rc` of the loop) out of any kind of shared callback
/// through `AioContext::current()`. Holds: it is `None` in each, and `SharedContext::current()`
/// names the context.
#[test]
fn current_is_none_in_every_kind_of_shared_callback() {
    let ctx = shared();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let held = ctx.acquire();
    let n = Arc::new(EventNotifier::new().unwrap());
    let fd_n = Arc::new(EventNotifier::new().unwrap());
    let (c1, s1) = (ctx.clone(), seen.clone());
    let bh = held.bh(move || check_inside(&c1, "bh", &s1));
    let (c2, s2) = (ctx.clone(), seen.clone());
    let bh_self = held.bh_with_self(move |_this| check_inside(&c2, "bh_with_self", &s2));
    let (c3, s3) = (ctx.clone(), seen.clone());
    held.schedule_oneshot(move || check_inside(&c3, "oneshot", &s3));
    let (c4, s4, f4) = (ctx.clone(), seen.clone(), fd_n.clone());
    let h = held
        .fd_handler(fd_n.clone())
        .on_read(move || {
            if f4.test_and_clear() {
                check_inside(&c4, "fd_handler", &s4);
            }
        })
        .register()
        .unwrap();
    let (c5, s5) = (ctx.clone(), seen.clone());
    let en = held
        .set_event_notifier(&n, move |e| {
            if e.test_and_clear() {
                check_inside(&c5, "event_notifier", &s5);
            }
        })
        .unwrap();
    let (c6, s6) = (ctx.clone(), seen.clone());
    let timer = held
        .timer(ClockType::Realtime, Scale::US, move || {
            check_inside(&c6, "timer", &s6)
        })
        .unwrap();
    bh.schedule();
    bh_self.schedule();
    n.set().unwrap();
    fd_n.set().unwrap();
    timer.arm_after(Duration::from_micros(10));
    let ran = |what: &str| {
        seen.lock()
            .unwrap()
            .iter()
            .any(|s| s == &format!("{what}: ran"))
    };
    poll_until(&held, || {
        [
            "bh",
            "bh_with_self",
            "oneshot",
            "fd_handler",
            "event_notifier",
            "timer",
        ]
        .iter()
        .all(|w| ran(w))
    });
    let problems: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| !s.ends_with(": ran"))
        .cloned()
        .collect();
    assert!(problems.is_empty(), "{problems:?}");
    drop((h, en, timer, bh, bh_self));
}

/// Attempt: confuse innermost and outer contexts. A plain context polled inside a shared
/// callback, and the shared context re-acquired and polled inside that plain context's
/// callback: each callback must see the context that runs it. Holds.
#[test]
fn plain_inside_shared_inside_plain_each_sees_its_own_current() {
    let s = shared();
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let held = s.acquire();
    let done = Arc::new(AtomicBool::new(false));
    let (s2, log2, d2) = (s.clone(), log.clone(), done.clone());
    held.schedule_oneshot(move || {
        assert!(AioContext::current().is_none());
        // A plain context, made and polled inside the shared callback.
        let p = support::ctx();
        let ph = p.handle();
        let (s3, log3, ph3) = (s2.clone(), log2.clone(), ph.clone());
        let p_done = Arc::new(AtomicBool::new(false));
        let pd = p_done.clone();
        p.schedule_oneshot(move || {
            let cur = AioContext::current().expect("the plain context is current");
            log3.lock().unwrap().push(format!(
                "plain: current is p: {}",
                cur.handle().same_context(&ph3)
            ));
            log3.lock().unwrap().push(format!(
                "plain: shared current is s: {}",
                SharedContext::current().is_some_and(|c| c.same_context(&s3))
            ));
            // The shared context again, nested, from inside the plain callback.
            let nested = s3.acquire();
            let inner_ran = Arc::new(AtomicBool::new(false));
            let (ir, log4) = (inner_ran.clone(), log3.clone());
            nested.schedule_oneshot(move || {
                log4.lock().unwrap().push(format!(
                    "shared in plain: AioContext::current() is none: {}",
                    AioContext::current().is_none()
                ));
                ir.store(true, SeqCst);
            });
            poll_until(&nested, || inner_ran.load(SeqCst));
            drop(nested);
            let cur = AioContext::current().expect("the plain context again");
            log3.lock().unwrap().push(format!(
                "plain after nested shared: current is p: {}",
                cur.handle().same_context(&ph3)
            ));
            pd.store(true, SeqCst);
        });
        while !p_done.load(SeqCst) {
            p.poll();
        }
        log2.lock().unwrap().push(format!(
            "shared after plain: AioContext::current() is none: {}",
            AioContext::current().is_none()
        ));
        drop(p);
        d2.store(true, SeqCst);
    });
    poll_until(&held, || done.load(SeqCst));
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 5, "{log:?}");
    assert!(log.iter().all(|l| l.ends_with(": true")), "{log:?}");
}

/// Attempt: a shared context acquired and polled inside a plain context's callback; the
/// shared callbacks must not see the plain context's `Rc` nor their own, and the plain one must
/// be current again after. Holds.
#[test]
fn shared_polled_inside_a_plain_callback() {
    let p = support::ctx();
    let s = shared();
    let ph = p.handle();
    let ok = Arc::new(AtomicBool::new(false));
    let (ok2, s2, ph2) = (ok.clone(), s.clone(), ph.clone());
    p.schedule_oneshot(move || {
        assert!(AioContext::current().unwrap().handle().same_context(&ph2));
        {
            let held = s2.acquire();
            let ran = Arc::new(AtomicBool::new(false));
            let r = ran.clone();
            held.schedule_oneshot(move || {
                assert!(AioContext::current().is_none());
                r.store(true, SeqCst);
            });
            poll_until(&held, || ran.load(SeqCst));
        }
        assert!(AioContext::current().unwrap().handle().same_context(&ph2));
        assert!(SharedContext::current().is_none());
        assert!(!s2.is_held_by_current_thread());
        ok2.store(true, SeqCst);
    });
    while !ok.load(SeqCst) {
        p.poll();
    }
}

/// Attempt: `SharedContext::current` after guards of two contexts are released out of order
/// (its doc: "outside a poll, the most recently acquired one still held").
#[test]
fn current_after_an_out_of_order_release_names_the_most_recent_still_held() {
    let (s1, s2) = (shared(), shared());
    let x = s1.acquire();
    let y = s2.acquire();
    let z = s1.acquire(); // nested, the most recent
    assert!(SharedContext::current().unwrap().same_context(&s1));
    drop(x); // s1 is still held through z, acquired after y
    assert!(
        SharedContext::current().unwrap().same_context(&s1),
        "z (s1) is the most recently acquired guard still held"
    );
    drop(z);
    assert!(SharedContext::current().unwrap().same_context(&s2));
    drop(y);
    assert!(SharedContext::current().is_none());
}

/// Attempt: inside a shared callback, release an older guard of the same context (kept in a
/// thread-local) that was acquired before another context: the callback's `current()` must
/// still name the context running it (its doc: "inside a shared context's callbacks, the
/// context running them").
#[test]
fn current_inside_a_callback_survives_the_release_of_an_older_guard() {
    static S1: OnceLock<SharedContext> = OnceLock::new();
    static S2: OnceLock<SharedContext> = OnceLock::new();
    thread_local! {
        static OLD: RefCell<Option<Acquired<'static>>> = const { RefCell::new(None) };
    }
    let s1 = S1.get_or_init(shared);
    let s2 = S2.get_or_init(shared);
    // On a thread of its own: the statics outlive it, and the guards stay on it.
    thread::spawn(move || {
        OLD.with(|o| *o.borrow_mut() = Some(s1.acquire()));
        let a = s1.acquire();
        let b = s2.acquire();
        let seen = Arc::new(Mutex::new(None));
        let sn = seen.clone();
        a.schedule_oneshot(move || {
            OLD.with(|o| drop(o.borrow_mut().take()));
            *sn.lock().unwrap() =
                Some(SharedContext::current().is_some_and(|c| c.same_context(s1)));
        });
        poll_until(&a, || seen.lock().unwrap().is_some());
        let named_s1 = seen.lock().unwrap().unwrap();
        drop(b);
        drop(a);
        assert!(named_s1, "current() named s2 inside s1's callback");
    })
    .join()
    .unwrap();
}

/// Attempt: a former holder whose handle, BHs and handlers keep working after it released
/// while another thread polls: each must take the remote path (a local-list link or an
/// in-place registration by a non-holder would be a data race with the poller, which Miri
/// reports). Holds.
#[test]
fn a_former_holder_takes_the_remote_paths_while_another_thread_polls() {
    let ctx = shared();
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let n = Arc::new(EventNotifier::new().unwrap());
    let reads = Arc::new(AtomicUsize::new(0));
    let (bh, handler) = {
        let held = ctx.acquire();
        let bh = held.bh(move || {
            r.fetch_add(1, SeqCst);
        });
        bh.schedule(); // linked locally: the holder is the home thread
        let (rd, n2) = (reads.clone(), n.clone());
        let handler = held
            .fd_handler(n.clone())
            .on_read(move || {
                if n2.test_and_clear() {
                    rd.fetch_add(1, SeqCst);
                }
            })
            .register()
            .unwrap();
        (bh, handler)
    };
    let looper = Looper::start(&ctx);
    let start = Instant::now();
    let wait = |what: &AtomicUsize, at_least: usize| {
        while what.load(SeqCst) < at_least {
            assert!(start.elapsed() < PATIENCE, "hang");
            thread::yield_now();
        }
    };
    wait(&runs, 1);
    for i in 2..5 {
        bh.schedule(); // from a non-holder
        wait(&runs, i);
    }
    n.set().unwrap();
    wait(&reads, 1);
    drop(handler); // a non-holder's removal
    let handle = ctx.handle();
    let reads2 = Arc::new(AtomicUsize::new(0));
    let (rd, n2) = (reads2.clone(), n.clone());
    let h2 = handle
        .fd_handler(n.clone())
        .on_read(move || {
            if n2.test_and_clear() {
                rd.fetch_add(1, SeqCst);
            }
        })
        .register()
        .unwrap(); // applied by the looper's poll
    n.set().unwrap();
    wait(&reads2, 1);
    assert_eq!(reads.load(SeqCst), 1);
    drop(h2);
    drop(looper);
    drop(bh);
}

/// Attempt: a callback panics during a shared poll, caught inside the guard and outside it.
/// The lock must be released, `CURRENT`, `HELD`, the home words and the home table restored,
/// so that another thread can poll and this one takes the remote paths afterwards. Holds.
#[test]
fn a_panicking_callback_leaves_nothing_behind() {
    let ctx = shared();
    // Caught inside the guard: still held, still home.
    {
        let held = ctx.acquire();
        held.schedule_oneshot(|| panic!("callback panics (caught inside the guard)"));
        assert!(catch_unwind(AssertUnwindSafe(|| held.poll())).is_err());
        assert!(AioContext::current().is_none());
        assert!(SharedContext::current().unwrap().same_context(&ctx));
        assert!(ctx.is_held_by_current_thread());
        // Still the home thread: a registration applies at once (nobody else polls).
        let n = EventNotifier::new().unwrap();
        let h = held.fd_handler(n).on_read(|| {}).register().unwrap();
        drop(h);
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        held.schedule_oneshot(move || r.store(true, SeqCst));
        poll_until(&held, || ran.load(SeqCst));
    }
    // Unwinding through the guard.
    let c = ctx.clone();
    let r = catch_unwind(AssertUnwindSafe(move || {
        let held = c.acquire();
        held.schedule_oneshot(|| panic!("callback panics (unwinds through the guard)"));
        held.poll();
    }));
    assert!(r.is_err());
    assert!(AioContext::current().is_none());
    assert!(SharedContext::current().is_none());
    assert!(!ctx.is_held_by_current_thread());
    // Another thread polls; this one is no longer home: its registration is queued for that
    // thread's poll (an in-place registration here would race with it).
    let looper = Looper::start(&ctx);
    let n = Arc::new(EventNotifier::new().unwrap());
    let (tx, rx) = mpsc::channel();
    let n2 = n.clone();
    let h = ctx
        .handle()
        .fd_handler(n.clone())
        .on_read(move || {
            if n2.test_and_clear() {
                let _ = tx.send(());
            }
        })
        .register()
        .unwrap();
    n.set().unwrap();
    rx.recv_timeout(PATIENCE).unwrap();
    drop(h);
    drop(looper);
    // And this thread can take it again.
    let held = ctx.try_acquire().expect("released by the unwinding");
    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    held.schedule_oneshot(move || r.store(true, SeqCst));
    poll_until(&held, || ran.load(SeqCst));
}

/// Attempt: leak a guard, drop every other clone, and let the thread exit: the thread-local
/// `HELD` stack then holds the last clone, whose drop runs during thread exit on the (still)
/// holding thread. Holds: the loop is dropped there, with its callbacks.
#[test]
fn a_forgotten_guard_and_the_last_clone_dropped_at_thread_exit() {
    let drops = Arc::new(AtomicUsize::new(0));
    let d = drops.clone();
    thread::spawn(move || {
        let s = shared();
        let held = s.acquire();
        let f = DropFlag(d);
        let bh = held.bh(move || {
            let _ = &f;
        });
        bh.schedule();
        drop(bh); // the loop owns the callback now
        std::mem::forget(held);
        drop(s);
        assert_eq!(SharedContext::current().map(|_| ()), Some(()));
    })
    .join()
    .unwrap();
    assert_eq!(drops.load(SeqCst), 1, "the loop was dropped at thread exit");
}

/// Attempt: the last clone kept only by a thread-local (stashed from inside a shared
/// callback), dropped during thread exit after the thread released. Holds: the loop is
/// dropped on the exiting thread, which is then its (last) home.
#[test]
fn the_last_clone_stashed_in_a_thread_local_from_a_callback() {
    thread_local! {
        static STASH: RefCell<Vec<SharedContext>> = const { RefCell::new(Vec::new()) };
        static TIMER: RefCell<Option<aio_core::Timer>> = const { RefCell::new(None) };
    }
    let drops = Arc::new(AtomicUsize::new(0));
    let d = drops.clone();
    thread::spawn(move || {
        let s = shared();
        {
            let held = s.acquire();
            let f = DropFlag(d);
            let timer = held
                .timer(ClockType::Realtime, Scale::MS, move || {
                    let _ = &f;
                })
                .unwrap();
            timer.arm_after(Duration::from_secs(3600));
            let done = Arc::new(AtomicBool::new(false));
            let dn = done.clone();
            held.schedule_oneshot(move || {
                STASH.with(|s| s.borrow_mut().push(SharedContext::current().unwrap()));
                dn.store(true, SeqCst);
            });
            poll_until(&held, || done.load(SeqCst));
            // Armed, with its callback in the loop's timer list, until thread exit.
            TIMER.with(|t| *t.borrow_mut() = Some(timer));
        }
        drop(s); // the stash has the last clone
    })
    .join()
    .unwrap();
    assert_eq!(drops.load(SeqCst), 1);
}

/// Attempt: the last clone dropped while a thread that has its own clone waits in `acquire`
/// (it cannot be the last: the waiter borrows one), and the loop then dropped on the waiter's
/// thread after it polled. Holds.
#[test]
fn dropped_while_another_thread_waits_in_acquire() {
    let s = shared();
    let drops = Arc::new(AtomicUsize::new(0));
    let ran = Arc::new(AtomicBool::new(false));
    let held = s.acquire();
    let (f, r) = (DropFlag(drops.clone()), ran.clone());
    held.schedule_oneshot(move || {
        let _ = &f;
        r.store(true, SeqCst);
    });
    let c = s.clone();
    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        tx.send(()).unwrap();
        let h = c.acquire();
        let start = Instant::now();
        while !ran.load(SeqCst) {
            assert!(start.elapsed() < PATIENCE);
            h.poll();
        }
        drop(h);
        drop(c); // the last clone: the loop is dropped here
    });
    rx.recv().unwrap();
    thread::sleep(Duration::from_millis(20));
    drop(held);
    drop(s);
    waiter.join().unwrap();
    assert_eq!(drops.load(SeqCst), 1);
}

/// Attempt: guards of two contexts released out of order; each context's home must follow
/// its own lock. After releasing `s1` while holding `s2`, this thread's use of `s1`'s handle
/// must be queued for `s1`'s poller (an in-place registration would race with it), and its use
/// of `s2`'s handle applied at once (nobody else could apply it). Holds.
#[test]
fn out_of_order_releases_move_each_home_separately() {
    let (s1, s2) = (shared(), shared());
    let x = s1.acquire();
    let y = s2.acquire();
    drop(x);
    let looper = Looper::start(&s1);
    let n = Arc::new(EventNotifier::new().unwrap());
    let (tx, rx) = mpsc::channel();
    let n2 = n.clone();
    let h1 = s1
        .handle()
        .fd_handler(n.clone())
        .on_read(move || {
            if n2.test_and_clear() {
                let _ = tx.send(());
            }
        })
        .register()
        .unwrap();
    n.set().unwrap();
    rx.recv_timeout(PATIENCE).unwrap();
    // s2: still held here, so in place.
    let m = EventNotifier::new().unwrap();
    let h2 = s2.handle().fd_handler(m).on_read(|| {}).register().unwrap();
    drop(h2);
    drop(h1);
    drop(looper);
    drop(y);
}

/// Attempt: re-entrancy from callbacks. `acquire`/`try_acquire` of the same context in its own
/// callback (recursive), of another context that another thread holds (`try_acquire` refuses),
/// and of a free one (polled, then released inside the callback, after which this thread is no
/// longer its home). Holds.
#[test]
fn reentrant_acquires_from_callbacks() {
    let (s1, s2, s3) = (shared(), shared(), shared());
    // s2 held by another thread for the duration.
    let (held_tx, held_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let c2 = s2.clone();
    let holder = thread::spawn(move || {
        let _h = c2.acquire();
        held_tx.send(()).unwrap();
        stop_rx.recv().unwrap();
    });
    held_rx.recv().unwrap();
    let held = s1.acquire();
    let out = Arc::new(Mutex::new(Vec::<(&str, bool)>::new()));
    let (o, c1, c2, c3) = (out.clone(), s1.clone(), s2.clone(), s3.clone());
    held.schedule_oneshot(move || {
        let again = c1.try_acquire();
        o.lock().unwrap().push(("try_acquire own", again.is_some()));
        let again = again.unwrap();
        let inner = Arc::new(AtomicBool::new(false));
        let i2 = inner.clone();
        again.schedule_oneshot(move || i2.store(true, SeqCst));
        poll_until(&again, || inner.load(SeqCst));
        drop(again);
        o.lock()
            .unwrap()
            .push(("still held", c1.is_held_by_current_thread()));
        o.lock()
            .unwrap()
            .push(("try_acquire held elsewhere", c2.try_acquire().is_none()));
        let third = c3.try_acquire().expect("free");
        let r3 = Arc::new(AtomicBool::new(false));
        let r = r3.clone();
        third.schedule_oneshot(move || {
            r.store(
                AioContext::current().is_none()
                    && SharedContext::current().is_some_and(|c| c.same_context(&c3_probe())),
                SeqCst,
            )
        });
        poll_until(&third, || r3.load(SeqCst));
        drop(third);
        o.lock()
            .unwrap()
            .push(("third released", !c3.is_held_by_current_thread()));
        o.lock().unwrap().push((
            "current is s1 again",
            SharedContext::current().is_some_and(|c| c.same_context(&c1)),
        ));
    });
    C3.set(s3.clone()).ok();
    poll_until(&held, || out.lock().unwrap().len() == 5);
    let out = out.lock().unwrap().clone();
    assert!(out.iter().all(|(_, ok)| *ok), "{out:?}");
    stop_tx.send(()).unwrap();
    holder.join().unwrap();
    // s3's home left this thread: another thread polls it, and this thread's handle use is
    // queued for it.
    let looper = Looper::start(&s3);
    let (tx, rx) = mpsc::channel();
    s3.handle()
        .schedule_oneshot(move || tx.send(thread::current().id()).unwrap());
    let on = rx.recv_timeout(PATIENCE).unwrap();
    assert_ne!(on, thread::current().id());
    drop(looper);
}

static C3: OnceLock<SharedContext> = OnceLock::new();
fn c3_probe() -> SharedContext {
    C3.get().unwrap().clone()
}

/// Attempt: keep using the handles of a context whose loop was dropped on this thread (its
/// drop made this thread the home, and nothing resets it): BHs, one-shots, registrations and
/// timers must find the loop gone, free what they are given, and never touch the local list.
/// Then the same from another thread. Holds.
#[test]
fn handles_used_on_the_thread_that_dropped_the_loop() {
    let s = shared();
    let handle = s.handle();
    let drops = Arc::new(AtomicUsize::new(0));
    let f = DropFlag(drops.clone());
    let bh = handle.bh(move || {
        let _ = &f;
    });
    drop(s); // this thread dropped the loop
    assert!(!handle.is_alive());
    bh.schedule();
    let f = DropFlag(drops.clone());
    handle.schedule_oneshot(move || {
        let _ = &f;
    });
    let n = EventNotifier::new().unwrap();
    let f = DropFlag(drops.clone());
    let err = handle
        .fd_handler(n)
        .on_read(move || {
            let _ = &f;
        })
        .register()
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    let f = DropFlag(drops.clone());
    let b2 = handle.bh(move || {
        let _ = &f;
    });
    b2.schedule();
    drop(b2);
    drop(bh);
    assert_eq!(drops.load(SeqCst), 4);
    let h = handle.clone();
    let d = drops.clone();
    thread::spawn(move || {
        let f = DropFlag(d);
        let b = h.bh(move || {
            let _ = &f;
        });
        b.schedule();
    })
    .join()
    .unwrap();
    assert_eq!(drops.load(SeqCst), 5);
}

/// Attempt: the `Debug` impls of the shared types, used by a thread that does not hold the
/// context while the holder polls (they must not read the loop). Holds.
#[test]
fn debug_from_a_non_holder_while_another_thread_polls() {
    let s = shared();
    let looper = Looper::start(&s);
    let n = EventNotifier::new().unwrap();
    let h = s.handle().fd_handler(n).on_read(|| {}).register().unwrap();
    let text = format!("{s:?} {:?} {h:?}", s.handle());
    assert!(text.contains("SharedContext"));
    drop(h);
    drop(looper);
    let held = s.acquire();
    assert!(format!("{held:?}").contains("depth: 1"));
}

/// Attempt: the holder runs its release during thread exit, after the thread's home table
/// (`HOMES`) and `HELD` stack were destroyed (a per-thread session kept in a thread-local
/// first used before the acquire, so destroyed after them), and removes a handler first: the
/// holder's in-place removal then finds no home-table entry and is dropped. The removal must
/// still take effect: the handler must never run, and its node must leave the loop, or its
/// fd, which stays readable, keeps every later blocking poll from sleeping. Holds: the closed
/// gate stops it, and the next poll removes a node whose gate is closed.
#[test]
fn a_holder_removing_a_handler_during_thread_exit() {
    struct Session {
        handler: Option<aio_core::SharedFdHandler>,
        guard: Option<Acquired<'static>>,
    }
    impl Drop for Session {
        fn drop(&mut self) {
            drop(self.handler.take()); // still holding
            drop(self.guard.take());
        }
    }
    thread_local! {
        static SESSION: RefCell<Option<Session>> = const { RefCell::new(None) };
    }
    static S: OnceLock<SharedContext> = OnceLock::new();
    let s = S.get_or_init(shared);
    let n = Arc::new(EventNotifier::new().unwrap());
    let reads = Arc::new(AtomicUsize::new(0));
    let (n2, r2) = (n.clone(), reads.clone());
    thread::spawn(move || {
        // First use: its destructor runs after those of the tables the acquire creates.
        SESSION.with(|_| ());
        let guard = s.acquire();
        let handler = guard
            .fd_handler(n2.clone())
            .on_read(move || {
                r2.fetch_add(1, SeqCst);
            })
            .register()
            .unwrap();
        SESSION.with(|x| {
            *x.borrow_mut() = Some(Session {
                handler: Some(handler),
                guard: Some(guard),
            })
        });
    })
    .join()
    .unwrap();
    let held = s.try_acquire().expect("released at thread exit");
    n.set().unwrap(); // readable for good: nobody clears it
    let fired = Arc::new(AtomicBool::new(false));
    let f = fired.clone();
    let timer = held
        .timer(ClockType::Realtime, Scale::MS, move || {
            f.store(true, SeqCst)
        })
        .unwrap();
    timer.arm_after(Duration::from_millis(if cfg!(miri) { 500 } else { 100 }));
    let polls = Cell::new(0);
    poll_until(&held, || {
        polls.set(polls.get() + 1);
        fired.load(SeqCst)
    });
    let polls = polls.get();
    assert_eq!(reads.load(SeqCst), 0, "a removed handler ran");
    assert!(
        polls < 20,
        "{polls} blocking polls in the timer's 100 ms: the removed handler's readable fd is \
         still watched"
    );
}

/// Attempt: release the lock from inside the holder's own in-place handle operation. The
/// holder keeps its only guard in a thread-local and removes a handler through the handle
/// (applied in place: the holder is the home thread); the removal frees the handler's callback,
/// whose captured value's `Drop` takes the guard out of the thread-local and drops it.
///
/// Was a defect (UB from safe code): the lock was released there, and a waiting thread took
/// the loop, while this thread was still inside `Shared::post` with an `AioContext` clone of
/// the loop and a scope guard, which it then dropped: Miri reported a data race on the loop's
/// `Rc` count between that drop and the next holder's in-place registration. Fixed: the
/// in-place operation runs under a nested acquisition, so the thread-local guard's drop only
/// lowers the depth, and the release happens when the operation is over.
#[test]
fn a_release_from_a_drop_inside_an_in_place_handle_operation() {
    static S: OnceLock<SharedContext> = OnceLock::new();
    thread_local! {
        static GUARD: RefCell<Option<Acquired<'static>>> = const { RefCell::new(None) };
    }
    /// Releases this thread's guard when dropped; `Send`, so a shared callback may own it.
    struct ReleaseOnDrop(Arc<Mutex<Option<bool>>>);
    impl Drop for ReleaseOnDrop {
        fn drop(&mut self) {
            GUARD.with(|g| drop(g.borrow_mut().take()));
            // The in-place removal that dropped us is still running on the loop.
            *self.0.lock().unwrap() = Some(S.get().unwrap().is_held_by_current_thread());
        }
    }
    let s = S.get_or_init(shared);
    let held_during = Arc::new(Mutex::new(None));
    let hd = held_during.clone();
    thread::spawn(move || {
        GUARD.with(|g| *g.borrow_mut() = Some(s.acquire()));
        let n = EventNotifier::new().unwrap();
        let hook = ReleaseOnDrop(hd);
        let h = s
            .handle()
            .fd_handler(n)
            .on_read(move || {
                let _ = &hook;
            })
            .register()
            .unwrap(); // in place: this thread holds
        // Another thread waits for the lock, then uses the loop as soon as it gets it.
        let (tx, rx) = mpsc::channel();
        let waiter = thread::spawn(move || {
            tx.send(()).unwrap();
            let held = s.acquire();
            let m = EventNotifier::new().unwrap();
            let h2 = held.fd_handler(m).on_read(|| {}).register().unwrap();
            let ran = Arc::new(AtomicBool::new(false));
            let r = ran.clone();
            held.schedule_oneshot(move || {
                drop(AioContext::current());
                r.store(true, SeqCst);
            });
            poll_until(&held, || ran.load(SeqCst));
            drop(h2);
        });
        rx.recv().unwrap();
        thread::sleep(Duration::from_millis(20));
        drop(h); // in place; its callback's drop releases the lock
        waiter.join().unwrap();
    })
    .join()
    .unwrap();
    assert_eq!(
        *held_during.lock().unwrap(),
        Some(true),
        "the lock was released while this thread was still running a handle operation on the \
         loop"
    );
}

/// Attempt: replace a shared handler with a builder of another shared context, and from a
/// non-holder while another thread polls. Holds: the first is refused (`InvalidInput`), the
/// second is applied by the poller and the old callback never runs again.
#[test]
fn replace_across_contexts_and_from_a_non_holder() {
    let (s1, s2) = (shared(), shared());
    let n = Arc::new(EventNotifier::new().unwrap());
    let mut h = {
        let held = s1.acquire();
        held.fd_handler(n.clone())
            .on_read(|| {})
            .register()
            .unwrap()
    };
    let err = s2
        .handle()
        .fd_handler(n.clone())
        .on_read(|| {})
        .replace(&mut h)
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    let looper = Looper::start(&s1);
    let (tx, rx) = mpsc::channel();
    let n2 = n.clone();
    s1.handle()
        .fd_handler(n.clone())
        .on_read(move || {
            if n2.test_and_clear() {
                let _ = tx.send(());
            }
        })
        .replace(&mut h)
        .unwrap();
    n.set().unwrap();
    rx.recv_timeout(PATIENCE).unwrap();
    drop(h);
    drop(looper);
}
