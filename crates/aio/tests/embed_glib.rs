//! Tests of `aio::glib` (feature `glib`): a context attached as a `GSource` to a real
//! `glib::MainContext`, on every backend. First QEMU's 13 `/aio-gsource/*` tests (test-aio.c,
//! with `g_main_context_iteration` as the iteration), then what an embedder relies on: glib's
//! own sources next to aio's handlers, BHs, timers and tasks; a cross-thread one-shot BH waking
//! a sleeping `MainLoop`; a sub-millisecond timer on time; no wake-up when idle; level-triggered
//! handlers; nesting; detaching and dropping in every order; a foreign thread; a panic.
#![cfg(all(feature = "glib", target_os = "linux"))]

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use aio::glib::AioSource;
use aio::{AioContext, Backend, BottomHalf, ClockType, EventNotifier, FdHandler, Scale, TimerRef};
use glib::thread_guard::ThreadGuard;
use glib::{ControlFlow, MainContext, MainLoop, Priority};

#[path = "support/embed.rs"]
mod embed;
use embed::{backends, open_fds, serial};

/// A fresh `MainContext` with `ctx` attached, drained of whatever attaching left pending.
fn attach(ctx: &AioContext) -> (MainContext, AioSource) {
    let main = MainContext::new();
    let source = AioSource::attach(ctx.clone(), &main).unwrap();
    while main.iteration(false) {}
    (main, source)
}

/// Wakes `main` after 5 s unless dropped first, so that a blocking iteration that would hang
/// because of a bug returns instead and the test fails on [`Watchdog::fired`].
struct Watchdog {
    stop: Option<mpsc::Sender<()>>,
    fired: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Watchdog {
    fn new(main: &MainContext) -> Watchdog {
        let (stop, rx) = mpsc::channel::<()>();
        let fired = Arc::new(AtomicBool::new(false));
        let (f, main) = (fired.clone(), main.clone());
        let thread = thread::spawn(move || {
            if rx.recv_timeout(Duration::from_secs(5)) == Err(mpsc::RecvTimeoutError::Timeout) {
                f.store(true, Ordering::SeqCst);
                main.wakeup();
            }
        });
        Watchdog {
            stop: Some(stop),
            fired,
            thread: Some(thread),
        }
    }

    fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A blocking iteration, under a watchdog.
fn iterate_blocking(main: &MainContext) -> bool {
    let wd = Watchdog::new(main);
    let r = main.iteration(true);
    assert!(!wd.fired(), "a blocking iteration hung");
    r
}

/// QEMU's BH record `{bh, n, max}`: the callback counts, reschedules itself while `n < max`,
/// and (the deleting variant) deletes itself when done.
struct BhRecord {
    bh: Arc<Mutex<Option<BottomHalf>>>,
    n: Arc<AtomicU32>,
}

impl BhRecord {
    fn counting(ctx: &AioContext, max: u32) -> BhRecord {
        Self::build(ctx, max, false)
    }

    fn deleting(ctx: &AioContext, max: u32) -> BhRecord {
        Self::build(ctx, max, true)
    }

    fn build(ctx: &AioContext, max: u32, delete: bool) -> BhRecord {
        let slot: Arc<Mutex<Option<BottomHalf>>> = Arc::default();
        let n = Arc::new(AtomicU32::new(0));
        let (s, c) = (slot.clone(), n.clone());
        let bh = ctx.bh(move || {
            let now = c.fetch_add(1, Ordering::SeqCst) + 1;
            if now < max {
                s.lock().unwrap().as_ref().expect("BH deleted").schedule();
            } else if delete {
                let me = s.lock().unwrap().take();
                assert!(me.is_some(), "a deleted BH ran");
            }
        });
        *slot.lock().unwrap() = Some(bh);
        BhRecord { bh: slot, n }
    }

    fn n(&self) -> u32 {
        self.n.load(Ordering::SeqCst)
    }

    fn with(&self, f: impl FnOnce(&BottomHalf)) {
        f(self.bh.lock().unwrap().as_ref().expect("BH deleted"));
    }

    fn is_deleted(&self) -> bool {
        self.bh.lock().unwrap().is_none()
    }

    fn delete(&self) {
        let bh = self.bh.lock().unwrap().take();
        drop(bh);
    }
}

impl Drop for BhRecord {
    fn drop(&mut self) {
        // The callback holds the slot, which holds the BH: break the cycle.
        self.delete();
    }
}

/// QEMU's notifier record `{e, n, active, auto_set}` and its registration.
struct Notifier {
    e: Arc<EventNotifier>,
    n: Rc<Cell<u32>>,
    active: Rc<Cell<u32>>,
    auto_set: bool,
    handler: Option<FdHandler>,
}

impl Notifier {
    fn new(active: u32, auto_set: bool) -> Notifier {
        Notifier {
            e: Arc::new(EventNotifier::new().unwrap()),
            n: Rc::default(),
            active: Rc::new(Cell::new(active)),
            auto_set,
            handler: None,
        }
    }

    /// Registers QEMU's `event_ready_cb`: count, decrement `active`, set again while
    /// `auto_set` and `active > 0`.
    fn register(&mut self, ctx: &AioContext) {
        let (n, active, auto_set) = (self.n.clone(), self.active.clone(), self.auto_set);
        let h = ctx
            .set_event_notifier(&self.e, move |e: &EventNotifier| {
                assert!(e.test_and_clear(), "called while clear");
                n.set(n.get() + 1);
                if active.get() > 0 {
                    active.set(active.get() - 1);
                }
                if auto_set && active.get() > 0 {
                    e.set().unwrap();
                }
            })
            .unwrap();
        self.handler = Some(h);
    }

    fn unregister(&mut self) {
        drop(self.handler.take());
    }

    fn set(&self) {
        self.e.set().unwrap();
    }

    fn n(&self) -> u32 {
        self.n.get()
    }

    fn active(&self) -> u32 {
        self.active.get()
    }
}

// ---------------------------------------------------------------------------------------------
// QEMU's /aio-gsource/* tests
// ---------------------------------------------------------------------------------------------

/// `/aio-gsource/flush`: a notify is no work; after draining, an iteration dispatches nothing.
#[test]
fn gsource_flush() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let (main, _src) = attach(&ctx);
        assert!(!main.iteration(false), "{backend:?}");
        ctx.notify();
        while main.iteration(false) {}
        assert!(!main.iteration(false), "{backend:?}");
    }
}

/// `/aio-gsource/bh/schedule` (case 30): a scheduled BH runs in one blocking iteration, then
/// the next non-blocking one dispatches nothing.
#[test]
fn gsource_bh_schedule() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let (main, _src) = attach(&ctx);
        let data = BhRecord::counting(&ctx, 0);
        data.with(BottomHalf::schedule);
        assert_eq!(data.n(), 0);
        assert!(iterate_blocking(&main), "{backend:?}");
        assert_eq!(data.n(), 1);
        assert!(!main.iteration(false), "{backend:?}");
        assert_eq!(data.n(), 1);
    }
}

/// `/aio-gsource/bh/schedule10`: a self-rescheduling BH runs once per iteration, and a
/// blocking iteration does not sleep while it is pending.
#[test]
fn gsource_bh_schedule10() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let (main, _src) = attach(&ctx);
        let data = BhRecord::counting(&ctx, 10);
        data.with(BottomHalf::schedule);
        assert_eq!(data.n(), 0);
        assert!(main.iteration(false), "{backend:?}");
        assert_eq!(data.n(), 1);
        assert!(iterate_blocking(&main), "{backend:?}");
        assert_eq!(data.n(), 2);
        while main.iteration(false) {}
        assert_eq!(data.n(), 10, "{backend:?}");
        assert!(!main.iteration(false), "{backend:?}");
        assert_eq!(data.n(), 10);
    }
}

/// `/aio-gsource/bh/cancel`: a cancelled BH never runs.
#[test]
fn gsource_bh_cancel() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let (main, _src) = attach(&ctx);
        let data = BhRecord::counting(&ctx, 0);
        data.with(BottomHalf::schedule);
        assert_eq!(data.n(), 0);
        data.with(BottomHalf::cancel);
        assert_eq!(data.n(), 0);
        while main.iteration(false) {}
        assert_eq!(data.n(), 0, "{backend:?}");
    }
}

/// `/aio-gsource/bh/delete`: a BH deleted while scheduled never runs.
#[test]
fn gsource_bh_delete() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let (main, _src) = attach(&ctx);
        let data = BhRecord::counting(&ctx, 0);
        data.with(BottomHalf::schedule);
        assert_eq!(data.n(), 0);
        data.delete();
        assert_eq!(data.n(), 0);
        while main.iteration(false) {}
        assert_eq!(data.n(), 0, "{backend:?}");
    }
}

/// `/aio-gsource/bh/callback-delete/one` (case 31): after a BH deletes itself, at most one
/// more iteration dispatches (QEMU 2025), then none.
#[test]
fn gsource_bh_callback_delete_one() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let (main, _src) = attach(&ctx);
        let data = BhRecord::deleting(&ctx, 1);
        data.with(BottomHalf::schedule);
        assert_eq!(data.n(), 0);
        iterate_blocking(&main);
        assert_eq!(data.n(), 1, "{backend:?}");
        assert!(data.is_deleted());
        let mut extra = 0;
        while main.iteration(false) {
            extra += 1;
            assert!(extra <= 1, "{backend:?}: more than one extra dispatch");
        }
        assert_eq!(data.n(), 1);
    }
}

/// `/aio-gsource/bh/callback-delete/many`: four self-deleting BHs (max 1, 3, 2, 4) all run in
/// the first iteration, then each reaches its max and deletes itself.
#[test]
fn gsource_bh_callback_delete_many() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let (main, _src) = attach(&ctx);
        let maxes = [1, 3, 2, 4];
        let data: Vec<BhRecord> = maxes.iter().map(|&m| BhRecord::deleting(&ctx, m)).collect();
        for d in &data {
            d.with(BottomHalf::schedule);
        }
        assert!(data.iter().all(|d| d.n() == 0));
        assert!(main.iteration(false), "{backend:?}");
        assert!(data.iter().all(|d| d.n() == 1), "{backend:?}");
        assert!(data[0].is_deleted());
        while main.iteration(false) {}
        for (d, m) in data.iter().zip(maxes) {
            assert_eq!(d.n(), m, "{backend:?}");
            assert!(d.is_deleted());
        }
    }
}

/// `/aio-gsource/bh/flush`: as `bh/schedule`.
#[test]
fn gsource_bh_flush() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let (main, _src) = attach(&ctx);
        let data = BhRecord::counting(&ctx, 0);
        data.with(BottomHalf::schedule);
        assert_eq!(data.n(), 0);
        assert!(iterate_blocking(&main), "{backend:?}");
        assert_eq!(data.n(), 1);
        assert!(!main.iteration(false), "{backend:?}");
        assert_eq!(data.n(), 1);
    }
}

/// `/aio-gsource/event/add-remove`: registering and unregistering a notifier calls nothing.
#[test]
fn gsource_event_add_remove() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let (main, _src) = attach(&ctx);
        let mut data = Notifier::new(0, false);
        data.register(&ctx);
        while main.iteration(false) {}
        assert_eq!(data.n(), 0, "{backend:?}");
        data.unregister();
        while main.iteration(false) {}
        assert_eq!(data.n(), 0, "{backend:?}");
    }
}

/// `/aio-gsource/event/wait`: a set notifier dispatches in the next iteration, once.
#[test]
fn gsource_event_wait() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let (main, _src) = attach(&ctx);
        let mut data = Notifier::new(1, false);
        data.register(&ctx);
        while main.iteration(false) {}
        assert_eq!((data.n(), data.active()), (0, 1), "{backend:?}");
        data.set();
        assert!(main.iteration(false), "{backend:?}");
        assert_eq!((data.n(), data.active()), (1, 0), "{backend:?}");
        while main.iteration(false) {}
        assert_eq!((data.n(), data.active()), (1, 0), "{backend:?}");
        data.unregister();
        while main.iteration(false) {}
        assert_eq!(data.n(), 1, "{backend:?}");
    }
}

/// `/aio-gsource/event/wait/no-flush-cb`: with two notifiers registered, only the one set
/// dispatches, once per set, and the iteration after it dispatches nothing.
#[test]
fn gsource_event_wait_no_flush_cb() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let (main, _src) = attach(&ctx);
        let mut data = Notifier::new(0, false);
        data.register(&ctx);
        while main.iteration(false) {}
        assert_eq!(data.n(), 0);

        // Whether this runs the handler is not asserted; it must not block.
        data.set();
        iterate_blocking(&main);
        data.n.set(0);

        let mut dummy = Notifier::new(1, false);
        dummy.register(&ctx);

        data.set();
        assert!(main.iteration(false), "{backend:?}");
        assert_eq!(data.n(), 1, "{backend:?}");
        assert!(!main.iteration(false), "{backend:?}");
        assert_eq!(data.n(), 1);

        data.set();
        assert!(main.iteration(false), "{backend:?}");
        assert_eq!(data.n(), 2, "{backend:?}");
        assert!(!main.iteration(false), "{backend:?}");
        assert_eq!(data.n(), 2);

        dummy.set();
        while main.iteration(false) {}
        assert_eq!(data.n(), 2, "{backend:?}");
        assert_eq!((dummy.n(), dummy.active()), (1, 0), "{backend:?}");

        dummy.unregister();
        data.unregister();
        while main.iteration(false) {}
        assert_eq!(data.n(), 2, "{backend:?}");
    }
}

/// `/aio-gsource/event/flush`: a handler that sets its notifier again (10 times) runs once per
/// iteration, exactly 10 times.
#[test]
fn gsource_event_flush() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let (main, _src) = attach(&ctx);
        let mut data = Notifier::new(10, true);
        data.register(&ctx);
        while main.iteration(false) {}
        assert_eq!((data.n(), data.active()), (0, 10), "{backend:?}");

        data.set();
        assert!(main.iteration(false), "{backend:?}");
        assert_eq!((data.n(), data.active()), (1, 9), "{backend:?}");
        assert!(main.iteration(false), "{backend:?}");

        while main.iteration(false) {}
        assert_eq!((data.n(), data.active()), (10, 0), "{backend:?}");
        assert!(!main.iteration(false), "{backend:?}");

        data.unregister();
        while main.iteration(false) {}
        assert_eq!(data.n(), 10);
    }
}

/// `/aio-gsource/timer/schedule`, with 750 ms scaled to 150 ms as in the conformance suite: a
/// REALTIME timer that re-arms itself once runs only inside an iteration, a due one in the
/// next blocking iteration, and the re-armed one never early.
#[test]
fn gsource_timer_schedule() {
    let _s = serial();
    const PERIOD: Duration = Duration::from_millis(150);
    for (backend, ctx) in backends() {
        let (main, _src) = attach(&ctx);
        // QEMU's dummy notifier (a leftover of when aio_poll needed an fd to sleep on).
        let dummy = Arc::new(EventNotifier::new().unwrap());
        let _dummy = ctx.set_event_notifier(&dummy, |_| {}).unwrap();
        while main.iteration(false) {}

        let n = Arc::new(AtomicU32::new(0));
        let me: Arc<OnceLock<TimerRef>> = Arc::default();
        let (count, this) = (n.clone(), me.clone());
        let timer = ctx.timer(ClockType::Realtime, Scale::NS, move || {
            if count.fetch_add(1, Ordering::SeqCst) + 1 < 2 {
                this.get().unwrap().arm_after(PERIOD);
            }
        });
        assert!(me.set(timer.handle()).is_ok());
        let mut expiry = timer.now_ns() + PERIOD.as_nanos() as u64;
        timer.arm_ns(expiry);
        assert_eq!(n.load(Ordering::SeqCst), 0);

        thread::sleep(PERIOD + Duration::from_millis(100));
        assert_eq!(
            n.load(Ordering::SeqCst),
            0,
            "{backend:?}: timers run only inside an iteration"
        );

        assert!(iterate_blocking(&main), "{backend:?}");
        assert_eq!(n.load(Ordering::SeqCst), 1, "{backend:?}");
        expiry += PERIOD.as_nanos() as u64;

        let deadline = Instant::now() + Duration::from_secs(5);
        while n.load(Ordering::SeqCst) < 2 {
            assert!(
                Instant::now() < deadline,
                "{backend:?}: the re-armed timer never fired"
            );
            main.iteration(true);
        }
        assert_eq!(n.load(Ordering::SeqCst), 2);
        assert!(
            timer.now_ns() > expiry,
            "{backend:?}: the second firing was early"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Embedding: what a glib program relies on
// ---------------------------------------------------------------------------------------------

/// glib's timeout and idle sources and aio's fd handler, BH, timer and task, in one
/// `MainContext`.
#[test]
fn glib_sources_and_aio_handlers_bhs_timers_tasks_share_one_loop() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let (main, _src) = attach(&ctx);
        let glib_timeout = Arc::new(AtomicBool::new(false));
        let glib_idle = Arc::new(AtomicBool::new(false));
        let t = glib_timeout.clone();
        glib::timeout_source_new(
            Duration::from_millis(3),
            None,
            Priority::DEFAULT,
            move || {
                t.store(true, Ordering::SeqCst);
                ControlFlow::Break
            },
        )
        .attach(Some(&main));
        let i = glib_idle.clone();
        glib::idle_source_new(None, Priority::DEFAULT_IDLE, move || {
            i.store(true, Ordering::SeqCst);
            ControlFlow::Break
        })
        .attach(Some(&main));

        let (mut c, d) = UnixStream::pair().unwrap();
        d.set_nonblocking(true).unwrap();
        let got = Rc::new(Cell::new(0usize));
        let (g, mut sock) = (got.clone(), d.try_clone().unwrap());
        let _h = ctx
            .fd_handler(&d)
            .on_read(move |_| {
                let mut buf = [0u8; 64];
                if let Ok(n) = sock.read(&mut buf) {
                    g.set(g.get() + n);
                }
            })
            .register()
            .unwrap();
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let timer = ctx.timer(ClockType::Realtime, Scale::NS, move || {
            f.store(true, Ordering::SeqCst)
        });
        let armed = Instant::now();
        timer.arm_after(Duration::from_millis(5));
        let task = ctx.spawn_local(async { 5 });
        c.write_all(b"hello").unwrap();

        let mut iterations = 0;
        while !(got.get() == 5
            && fired.load(Ordering::SeqCst)
            && glib_timeout.load(Ordering::SeqCst)
            && glib_idle.load(Ordering::SeqCst)
            && task.is_finished())
        {
            iterate_blocking(&main);
            iterations += 1;
            assert!(iterations < 100, "{backend:?}");
        }
        assert!(
            got.get() == 5 && fired.load(Ordering::SeqCst),
            "{backend:?}"
        );
        assert!(glib_timeout.load(Ordering::SeqCst) && glib_idle.load(Ordering::SeqCst));
        assert!(armed.elapsed() >= Duration::from_millis(5), "{backend:?}");
        assert_eq!(ctx.block_on(task).unwrap(), 5);
    }
}

/// A one-shot BH scheduled from another thread wakes a `MainLoop` sleeping with nothing else
/// to do (no timeout anywhere), and a single blocking iteration returns with it run; so does a
/// bare `notify`.
#[test]
fn remote_oneshot_wakes_a_sleeping_main_loop() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let (main, _src) = attach(&ctx);
        let main_loop = MainLoop::new(Some(&main), false);
        let (remote, ml) = (ctx.handle(), main_loop.clone());
        let start = Instant::now();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            remote.schedule_oneshot(move || ml.quit());
        });
        let wd = Watchdog::new(&main);
        main_loop.run();
        assert!(
            !wd.fired(),
            "{backend:?}: the remote BH did not wake the loop"
        );
        drop(wd);
        t.join().unwrap();
        assert!(start.elapsed() >= Duration::from_millis(50), "{backend:?}");

        // The same with one blocking iteration.
        let ran = Arc::new(AtomicBool::new(false));
        let (r, remote) = (ran.clone(), ctx.handle());
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            remote.schedule_oneshot(move || r.store(true, Ordering::SeqCst));
        });
        while !ran.load(Ordering::SeqCst) {
            iterate_blocking(&main);
        }
        t.join().unwrap();
        // The wake-up was the eventfd (the only way to reach a sleeping glib).
        assert!(ctx.stats().event_writes > 0, "{backend:?}");

        // A bare notify from another thread ends a blocking iteration too (the context's
        // notifier fd is among the source's fds, directly or behind the backend's fd).
        while main.iteration(false) {}
        let remote = ctx.handle();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            remote.notify();
        });
        let start = Instant::now();
        iterate_blocking(&main);
        assert!(start.elapsed() >= Duration::from_millis(20), "{backend:?}");
        t.join().unwrap();
    }
}

/// A 300 µs aio timer under glib fires after its deadline and well before glib's millisecond
/// would: the timerfd wakes glib's poll, so the deadline is not rounded to 1 ms. Up to 20 tries
/// are made until one is on time, so preempted tries on a busy machine do not fail the test;
/// with the deadline rounded up to glib's millisecond, none ever is.
#[test]
fn a_sub_millisecond_timer_fires_on_time() {
    let _s = serial();
    const DELAY: Duration = Duration::from_micros(300);
    const ON_TIME: Duration = Duration::from_micros(950);
    for (backend, ctx) in backends() {
        let (main, _src) = attach(&ctx);
        let mut best = Duration::MAX;
        for _ in 0..20 {
            if best < ON_TIME {
                break;
            }
            let fired = Arc::new(AtomicBool::new(false));
            let f = fired.clone();
            let timer = ctx.timer(ClockType::Realtime, Scale::NS, move || {
                f.store(true, Ordering::SeqCst)
            });
            let start = Instant::now();
            timer.arm_after(DELAY);
            let mut iterations = 0;
            while !fired.load(Ordering::SeqCst) {
                iterate_blocking(&main);
                iterations += 1;
                assert!(
                    iterations < 10,
                    "{backend:?}: {iterations} wake-ups for one timer"
                );
            }
            let took = start.elapsed();
            assert!(took >= DELAY, "{backend:?}: fired early, after {took:?}");
            best = best.min(took);
        }
        assert!(
            best < ON_TIME,
            "{backend:?}: best of 20 was {best:?}: rounded up to glib's millisecond?"
        );
    }
}

/// With nothing scheduled, no fd ready and a timer armed far ahead, a `MainContext` with the
/// source attached sleeps: over 200 ms (ended by a glib timeout), one iteration, no dispatch.
#[test]
fn an_idle_context_adds_no_wake_ups() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let (main, src) = attach(&ctx);
        let far = ctx.timer(ClockType::Realtime, Scale::NS, || {});
        far.arm_after(Duration::from_secs(60));
        while main.iteration(false) {}
        let ended = Arc::new(AtomicBool::new(false));
        let e = ended.clone();
        glib::timeout_source_new(
            Duration::from_millis(200),
            None,
            Priority::DEFAULT,
            move || {
                e.store(true, Ordering::SeqCst);
                ControlFlow::Break
            },
        )
        .attach(Some(&main));
        let before = ctx.stats();
        let start = Instant::now();
        let mut iterations = 0;
        while !ended.load(Ordering::SeqCst) {
            iterate_blocking(&main);
            iterations += 1;
        }
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert_eq!(
            iterations, 1,
            "{backend:?}: woke {iterations} times in 200 ms"
        );
        let after = ctx.stats();
        assert_eq!(
            after.iterations, before.iterations,
            "{backend:?}: dispatched"
        );
        // glib's `check` after its one wake-up looks at the backend once, without blocking.
        assert!(after.waits - before.waits <= 1, "{backend:?}");
        assert!(src.is_attached());
    }
}

/// A handler that reads one byte per call is called again while data remains, as under aio's
/// own loop (glib polls level-triggered).
#[test]
fn a_handler_that_leaves_data_unread_is_called_again() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let (main, _src) = attach(&ctx);
        let (mut c, d) = UnixStream::pair().unwrap();
        d.set_nonblocking(true).unwrap();
        let got = Rc::new(Cell::new(0usize));
        let (g, mut sock) = (got.clone(), d.try_clone().unwrap());
        let _h = ctx
            .fd_handler(&d)
            .on_read(move |_| {
                let mut buf = [0u8; 1];
                if let Ok(1) = sock.read(&mut buf) {
                    g.set(g.get() + 1);
                }
            })
            .register()
            .unwrap();
        c.write_all(&[1u8; 10]).unwrap();
        let mut iterations = 0;
        while got.get() < 10 {
            iterate_blocking(&main);
            iterations += 1;
            assert!(iterations < 100, "{backend:?}");
        }
        assert_eq!(got.get(), 10, "{backend:?}");
    }
}

/// While attached, a glib callback and an aio callback dispatched through glib may each poll
/// the context directly (nested), for a BH, a timer and a remote BH; the source keeps working
/// afterwards.
#[test]
fn callbacks_may_poll_the_attached_context_directly() {
    let _s = serial();
    for (backend, ctx) in backends() {
        let (main, src) = attach(&ctx);
        // A glib idle callback waits, nested, for an aio BH and an aio timer.
        let inner = Arc::new(AtomicU32::new(0));
        let glib_done = Rc::new(Cell::new(false));
        let (i, c2, gd) = (inner.clone(), ctx.clone(), glib_done.clone());
        let nested = ThreadGuard::new(move || {
            let i2 = i.clone();
            c2.schedule_oneshot(move || {
                i2.fetch_add(1, Ordering::SeqCst);
            });
            let fired = Arc::new(AtomicBool::new(false));
            let f = fired.clone();
            let t = c2.timer(ClockType::Realtime, Scale::NS, move || {
                f.store(true, Ordering::SeqCst)
            });
            t.arm_after(Duration::from_millis(2));
            c2.wait_while(|| i.load(Ordering::SeqCst) == 0 || !fired.load(Ordering::SeqCst));
            gd.set(true);
            ControlFlow::Break
        });
        glib::idle_source_new(None, Priority::DEFAULT, move || (nested.get_ref())())
            .attach(Some(&main));
        while !glib_done.get() {
            iterate_blocking(&main);
        }
        assert_eq!(inner.load(Ordering::SeqCst), 1, "{backend:?}");

        // An aio BH, dispatched by glib, waits nested for a BH from another thread.
        let remote_ran = Arc::new(AtomicBool::new(false));
        let aio_done = Arc::new(AtomicBool::new(false));
        let (r, done, remote) = (remote_ran.clone(), aio_done.clone(), ctx.handle());
        ctx.schedule_oneshot(move || {
            let ctx = AioContext::current().unwrap();
            let r2 = r.clone();
            let remote = remote.clone();
            let t = thread::spawn(move || {
                thread::sleep(Duration::from_millis(10));
                remote.schedule_oneshot(move || r2.store(true, Ordering::SeqCst));
            });
            ctx.wait_while(|| !r.load(Ordering::SeqCst));
            t.join().unwrap();
            done.store(true, Ordering::SeqCst);
        });
        while !aio_done.load(Ordering::SeqCst) {
            iterate_blocking(&main);
        }
        assert!(remote_ran.load(Ordering::SeqCst));

        // Still attached and working.
        assert!(src.is_attached());
        let again = Arc::new(AtomicBool::new(false));
        let (a, remote) = (again.clone(), ctx.handle());
        thread::spawn(move || remote.schedule_oneshot(move || a.store(true, Ordering::SeqCst)))
            .join()
            .unwrap();
        while !again.load(Ordering::SeqCst) {
            iterate_blocking(&main);
        }
        while main.iteration(false) {}
        assert!(!main.iteration(false), "{backend:?}");
    }
}

/// Detaching and dropping in every order: the `AioSource` dropped while its `prepare` is not
/// yet closed by a `check` (from a glib callback of higher priority), from one of its own aio
/// callbacks, after the `MainContext`, or after every other clone of the context. No aio
/// callback runs through glib after the detach, the context keeps working under its own loop,
/// and no fd is left open.
#[test]
fn detach_and_drop_in_every_order_leak_nothing() {
    let _s = serial();
    // glib opens fds of its own on first use (its worker's wake-up); count after a warm-up.
    {
        let ctx = aio::Builder::new().build().unwrap();
        let (main, src) = attach(&ctx);
        main.iteration(false);
        drop(src);
    }
    let base = open_fds();
    for round in 0..4 {
        for backend in [Backend::Poll, Backend::Epoll, Backend::IoUring] {
            let Ok(ctx) = aio::Builder::new().backend(backend).build() else {
                continue;
            };
            let main = MainContext::new();
            let src = Rc::new(RefCell::new(Some(
                AioSource::attach(ctx.clone(), &main).unwrap(),
            )));
            while main.iteration(false) {}
            let ran = Arc::new(AtomicBool::new(false));
            let r = ran.clone();
            match round {
                // A higher-priority glib timeout becomes ready while the source is prepared:
                // glib skips the source's check and dispatches the timeout, which detaches it.
                0 => {
                    let s = src.clone();
                    let dropped = Rc::new(Cell::new(false));
                    let d = dropped.clone();
                    let detach = ThreadGuard::new(move || {
                        s.borrow_mut().take();
                        d.set(true);
                    });
                    glib::timeout_source_new(
                        Duration::from_millis(5),
                        None,
                        Priority::HIGH,
                        move || {
                            (detach.get_ref())();
                            ControlFlow::Break
                        },
                    )
                    .attach(Some(&main));
                    while !dropped.get() {
                        iterate_blocking(&main);
                    }
                    // The window is closed: with nobody waiting, a remote schedule does not
                    // write the eventfd.
                    let writes = ctx.stats().event_writes;
                    let remote = ctx.handle();
                    thread::spawn(move || {
                        remote.schedule_oneshot(move || r.store(true, Ordering::SeqCst))
                    })
                    .join()
                    .unwrap();
                    assert_eq!(ctx.stats().event_writes, writes, "{backend:?}");
                    while main.iteration(false) {}
                    assert!(!ran.load(Ordering::SeqCst), "ran through glib after detach");
                    while !ran.load(Ordering::SeqCst) {
                        ctx.poll();
                    }
                    drop(main);
                    drop(ctx);
                }
                // The source dropped from one of its own aio callbacks.
                1 => {
                    let s = src.clone();
                    let late = Arc::new(AtomicBool::new(false));
                    let l = late.clone();
                    let c2 = ctx.clone();
                    let task = ctx.spawn_local(async move {
                        s.borrow_mut().take();
                        c2.schedule_oneshot(move || l.store(true, Ordering::SeqCst));
                        r.store(true, Ordering::SeqCst);
                    });
                    while !ran.load(Ordering::SeqCst) {
                        iterate_blocking(&main);
                    }
                    assert!(src.borrow().is_none());
                    while main.iteration(false) {}
                    assert!(
                        !late.load(Ordering::SeqCst),
                        "ran through glib after detach"
                    );
                    while !late.load(Ordering::SeqCst) {
                        ctx.poll();
                    }
                    assert!(task.is_finished());
                    drop(ctx);
                    drop(main);
                }
                // The MainContext dropped first: glib destroys the source; the context then
                // runs its own loop, and the `AioSource` only gives back its reference.
                2 => {
                    drop(main);
                    assert!(!src.borrow().as_ref().unwrap().is_attached());
                    ctx.handle()
                        .schedule_oneshot(move || r.store(true, Ordering::SeqCst));
                    while !ran.load(Ordering::SeqCst) {
                        ctx.poll();
                    }
                    src.borrow_mut().take();
                    drop(ctx);
                }
                // Every other clone of the context dropped first: the source keeps it, and a
                // remote BH still runs through glib; then the source and the MainContext go.
                _ => {
                    let remote = ctx.handle();
                    drop(ctx);
                    remote.schedule_oneshot(move || r.store(true, Ordering::SeqCst));
                    while !ran.load(Ordering::SeqCst) {
                        iterate_blocking(&main);
                    }
                    src.borrow_mut().take();
                    let late = Arc::new(AtomicBool::new(false));
                    let l = late.clone();
                    remote.schedule_oneshot(move || l.store(true, Ordering::SeqCst));
                    while main.iteration(false) {}
                    assert!(!late.load(Ordering::SeqCst));
                    drop(main);
                }
            }
        }
    }
    assert_eq!(open_fds(), base, "fds leaked");
}

/// The `MainContext` must run on the context's thread: attaching to one that another thread
/// owns is refused, and a source iterated by another thread later detaches itself there
/// without running any aio callback, which the home thread's own loop then runs.
#[test]
fn a_foreign_thread_is_refused_and_never_runs_callbacks() {
    let _s = serial();
    let ctx = aio::Builder::new().build().unwrap();

    // Owned by a thread running a loop on it.
    let busy = MainContext::new();
    let busy_loop = MainLoop::new(Some(&busy), false);
    let bl = busy_loop.clone();
    let (started_tx, started_rx) = mpsc::channel();
    let runner = thread::spawn(move || {
        let b = bl.context();
        b.invoke(move || started_tx.send(()).unwrap());
        bl.run();
    });
    started_rx.recv().unwrap();
    let err = AioSource::attach(ctx.clone(), &busy).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    busy_loop.quit();
    runner.join().unwrap();

    // Attached here, then iterated elsewhere.
    let main = MainContext::new();
    let src = AioSource::attach(ctx.clone(), &main).unwrap();
    let ran_on = Arc::new(Mutex::new(None));
    let r = ran_on.clone();
    ctx.schedule_oneshot(move || *r.lock().unwrap() = Some(thread::current().id()));
    let m = main.clone();
    thread::spawn(move || while m.iteration(false) {})
        .join()
        .unwrap();
    assert!(!src.is_attached(), "the source detached itself");
    assert!(
        ran_on.lock().unwrap().is_none(),
        "ran on the foreign thread"
    );
    while ran_on.lock().unwrap().is_none() {
        ctx.poll();
    }
    assert_eq!(*ran_on.lock().unwrap(), Some(thread::current().id()));
}

/// A panicking aio callback does not unwind into glib (which would abort): the source
/// detaches itself and hands the payload over; the context still works.
#[test]
fn a_panic_in_a_callback_detaches_the_source() {
    let _s = serial();
    let ctx = aio::Builder::new().build().unwrap();
    let (main, src) = attach(&ctx);
    ctx.schedule_oneshot(|| panic!("boom"));
    iterate_blocking(&main);
    assert!(!src.is_attached());
    let payload = src.take_panic().expect("the payload");
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom"));
    assert!(src.take_panic().is_none());
    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    ctx.schedule_oneshot(move || r.store(true, Ordering::SeqCst));
    while !ran.load(Ordering::SeqCst) {
        ctx.poll();
    }
}
