//! B13 (issue 15): what the outer-loop adapters cost, next to the context's own loop and to each
//! outer loop's native equivalent. Plain `Instant` timing (no criterion); this program owns the
//! workloads.
//!
//! * `B13_iteration`: ns per loop iteration that runs one BH: a BH that reschedules itself N
//!   times, run by `AioContext::poll()`, by `glib::MainContext::iteration(false)` with an
//!   `aio::glib::AioSource` attached, by `aio::tokio::drive` on a `current_thread` runtime (a
//!   `LocalSet`), and by `calloop::EventLoop::dispatch(0)` with an `aio::calloop::AioSource`.
//! * `B13_remote_wake`: ns per round trip from another thread: it hands the loop a job that
//!   answers through a channel, then waits for the answer, N times; the loop thread sleeps in
//!   between. The job goes as a one-shot BH (`ContextHandle::schedule_oneshot`) into the
//!   context's own `poll()` and into each adapter, and as each outer loop's native equivalent:
//!   `glib::MainContext::invoke` (an idle source and a wake-up of the `MainContext`), a send on
//!   a tokio unbounded channel whose receiving task runs it (a task wake), and a calloop ping
//!   whose callback runs it. Every row pays the same answer (an `mpsc` channel).
//!
//! The glib rows need the `glib` feature of this crate (the system GLib): `cargo bench -p
//! aio-benches --features glib --bench embed [-- FILTER] [--quick]` (`cargo xtask bench` adds
//! it when GLib is there). Without `--bench` (as under `cargo test --benches`) every part runs
//! once, briefly. With `AIO_BENCH_REPORT_DIR` set, the table is also written to `embed.md`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use aio::{AioContext, ContextHandle};
use aio_benches::{Sizes, summary};

/// How much to measure: rounds, BH iterations per round, round trips per round.
#[derive(Debug, Clone, Copy)]
struct Plan {
    rounds: usize,
    iterations: u32,
    trips: u32,
}

const FULL: Plan = Plan {
    rounds: 7,
    iterations: 200_000,
    trips: 10_000,
};
const QUICK: Plan = Plan {
    rounds: 3,
    iterations: 20_000,
    trips: 1_000,
};
const SMOKE: Plan = Plan {
    rounds: 1,
    iterations: 100,
    trips: 20,
};

/// A context on the poll backend, as the other BH benches use (the adapters watch its fds).
fn context() -> AioContext {
    aio::Builder::new()
        .backend(aio::Backend::Poll)
        .ignore_env()
        .build()
        .unwrap()
}

/// A BH that runs `n` times, rescheduling itself, then calls `done`; and its run count.
fn self_rescheduling(
    ctx: &AioContext,
    n: u32,
    done: impl Fn() + Send + 'static,
) -> (aio::BottomHalf, Arc<AtomicU32>) {
    let count = Arc::new(AtomicU32::new(0));
    let c = count.clone();
    let bh = ctx.bh_with_self(move |me| {
        if c.fetch_add(1, Ordering::Relaxed) + 1 < n {
            me.schedule();
        } else {
            done();
        }
    });
    (bh, count)
}

// ---------------------------------------------------------------------------------------------
// B13_iteration
// ---------------------------------------------------------------------------------------------

/// A row of `B13_iteration`: its name and the workload (ns per iteration for `n`).
type Row = (&'static str, fn(u32) -> f64);

fn iter_poll(n: u32) -> f64 {
    let ctx = context();
    let (bh, count) = self_rescheduling(&ctx, n, || ());
    let start = Instant::now();
    bh.schedule();
    while count.load(Ordering::Relaxed) < n {
        ctx.poll();
    }
    start.elapsed().as_nanos() as f64 / f64::from(n)
}

#[cfg(feature = "glib")]
fn iter_glib(n: u32) -> f64 {
    let ctx = context();
    let main = glib::MainContext::new();
    let _source = aio::glib::AioSource::attach(ctx.clone(), &main).unwrap();
    while main.iteration(false) {}
    let (bh, count) = self_rescheduling(&ctx, n, || ());
    let start = Instant::now();
    bh.schedule();
    while count.load(Ordering::Relaxed) < n {
        main.iteration(false);
    }
    start.elapsed().as_nanos() as f64 / f64::from(n)
}

fn iter_tokio(n: u32) -> f64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let ctx = context();
    let done = Arc::new(tokio::sync::Notify::new());
    let d = done.clone();
    let (bh, _count) = self_rescheduling(&ctx, n, move || d.notify_one());
    local.block_on(&rt, async move {
        let driver = tokio::task::spawn_local(aio::tokio::drive(ctx.clone()));
        tokio::task::yield_now().await;
        let start = Instant::now();
        bh.schedule();
        done.notified().await;
        let ns = start.elapsed().as_nanos() as f64 / f64::from(n);
        driver.abort();
        ns
    })
}

fn iter_calloop(n: u32) -> f64 {
    let ctx = context();
    let mut el: calloop::EventLoop<()> = calloop::EventLoop::try_new().unwrap();
    el.handle()
        .insert_source(
            aio::calloop::AioSource::new(ctx.clone()).unwrap(),
            |_, _, _| {},
        )
        .unwrap();
    el.dispatch(Some(Duration::ZERO), &mut ()).unwrap();
    let (bh, count) = self_rescheduling(&ctx, n, || ());
    let start = Instant::now();
    bh.schedule();
    while count.load(Ordering::Relaxed) < n {
        el.dispatch(Some(Duration::ZERO), &mut ()).unwrap();
    }
    start.elapsed().as_nanos() as f64 / f64::from(n)
}

fn iteration(out: &mut String, plan: Plan) {
    writeln!(
        out,
        "\n### B13 one BH per iteration, through each adapter\n\n{} rounds × {} iterations of a \
         self-rescheduling BH (poll backend), ns per iteration; the ratio is to the context's \
         own `poll()`.\n",
        plan.rounds, plan.iterations
    )
    .unwrap();
    let mut rows: Vec<Row> = vec![("`AioContext::poll()` (own loop)", iter_poll)];
    #[cfg(feature = "glib")]
    rows.push(("glib: `MainContext::iteration(false)`", iter_glib));
    rows.push(("tokio: `aio::tokio::drive` (current_thread)", iter_tokio));
    rows.push(("calloop: `EventLoop::dispatch(0)`", iter_calloop));
    table(out, &rows, plan.rounds, plan.iterations, "ns/iteration");
    #[cfg(not(feature = "glib"))]
    writeln!(
        out,
        "\n(glib rows left out: built without the `glib` feature)"
    )
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// B13_remote_wake
// ---------------------------------------------------------------------------------------------

type Job = Box<dyn FnOnce() + Send>;

/// A row of `B13_remote_wake`: the loop's name, how to start it, its native way in.
type LoopRow = (&'static str, fn() -> Remote, &'static str);

/// An outer loop on its own thread, with the two ways in: a one-shot BH on the context, and
/// the loop's native way (none for the context's own loop).
struct Remote {
    aio: ContextHandle,
    native: Option<Box<dyn Fn(Job) + Send + Sync>>,
    stop: Option<Box<dyn FnOnce() + Send>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for Remote {
    fn drop(&mut self) {
        (self.stop.take().unwrap())();
        self.thread.take().unwrap().join().unwrap();
    }
}

/// Starts `run` on a new thread; it sends back the handle and the native way in, then loops
/// until the returned stop is called.
fn start(
    run: impl FnOnce(mpsc::Sender<(ContextHandle, Option<Box<dyn Fn(Job) + Send + Sync>>)>)
    + Send
    + 'static,
    stop: impl FnOnce(&ContextHandle) -> Box<dyn FnOnce() + Send>,
) -> Remote {
    let (tx, rx) = mpsc::channel();
    let thread = thread::spawn(move || run(tx));
    let (aio, native) = rx.recv().unwrap();
    let stop = stop(&aio);
    Remote {
        aio,
        native,
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// Stopping by a flag that the loop checks after each wake-up, set from a one-shot BH.
fn flag_stop(flag: &Arc<AtomicBool>) -> impl FnOnce(&ContextHandle) -> Box<dyn FnOnce() + Send> {
    let flag = flag.clone();
    move |h| {
        let h = h.clone();
        Box::new(move || h.schedule_oneshot(move || flag.store(true, Ordering::SeqCst)))
    }
}

fn remote_poll() -> Remote {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    start(
        move |tx| {
            let ctx = context();
            tx.send((ctx.handle(), None)).unwrap();
            while !s.load(Ordering::SeqCst) {
                ctx.poll();
            }
        },
        flag_stop(&stop),
    )
}

#[cfg(feature = "glib")]
fn remote_glib() -> Remote {
    let slot: Arc<Mutex<Option<glib::MainLoop>>> = Arc::default();
    let s = slot.clone();
    start(
        move |tx| {
            let ctx = context();
            let main = glib::MainContext::new();
            let main_loop = glib::MainLoop::new(Some(&main), false);
            let _source = aio::glib::AioSource::attach(ctx.clone(), &main).unwrap();
            let m = main.clone();
            let invoke: Box<dyn Fn(Job) + Send + Sync> = Box::new(move |job| m.invoke(job));
            *s.lock().unwrap() = Some(main_loop.clone());
            tx.send((ctx.handle(), Some(invoke))).unwrap();
            main_loop.run();
        },
        move |_| Box::new(move || slot.lock().unwrap().take().unwrap().quit()),
    )
}

fn remote_tokio() -> Remote {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop_tx = Mutex::new(Some(stop_tx));
    start(
        move |tx| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let local = tokio::task::LocalSet::new();
            let ctx = context();
            let (jtx, mut jrx) = tokio::sync::mpsc::unbounded_channel::<Job>();
            let send: Box<dyn Fn(Job) + Send + Sync> = Box::new(move |job| {
                let _ = jtx.send(job);
            });
            tx.send((ctx.handle(), Some(send))).unwrap();
            local.block_on(&rt, async move {
                let driver = tokio::task::spawn_local(aio::tokio::drive(ctx));
                tokio::task::spawn_local(async move {
                    while let Some(job) = jrx.recv().await {
                        job();
                    }
                });
                let _ = stop_rx.await;
                driver.abort();
            });
        },
        move |_| {
            Box::new(move || {
                let _ = stop_tx.lock().unwrap().take().unwrap().send(());
            })
        },
    )
}

fn remote_calloop() -> Remote {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    start(
        move |tx| {
            let ctx = context();
            let mut el: calloop::EventLoop<()> = calloop::EventLoop::try_new().unwrap();
            el.handle()
                .insert_source(
                    aio::calloop::AioSource::new(ctx.clone()).unwrap(),
                    |_, _, _| {},
                )
                .unwrap();
            let (ping, ping_source) = calloop::ping::make_ping().unwrap();
            let queue: Arc<Mutex<Vec<Job>>> = Arc::default();
            let q = queue.clone();
            el.handle()
                .insert_source(ping_source, move |_, _, _| {
                    let jobs = std::mem::take(&mut *q.lock().unwrap());
                    for job in jobs {
                        job();
                    }
                })
                .unwrap();
            let send: Box<dyn Fn(Job) + Send + Sync> = Box::new(move |job| {
                queue.lock().unwrap().push(job);
                ping.ping();
            });
            tx.send((ctx.handle(), Some(send))).unwrap();
            while !s.load(Ordering::SeqCst) {
                el.dispatch(None, &mut ()).unwrap();
            }
        },
        flag_stop(&stop),
    )
}

/// ns per round trip: hand the loop a job that answers, wait for the answer.
fn trips(send: &dyn Fn(Job), n: u32) -> f64 {
    let (tx, rx) = mpsc::channel::<()>();
    let start = Instant::now();
    for _ in 0..n {
        let tx = tx.clone();
        send(Box::new(move || tx.send(()).unwrap()));
        rx.recv().unwrap();
    }
    start.elapsed().as_nanos() as f64 / f64::from(n)
}

fn remote_wake(out: &mut String, plan: Plan) {
    writeln!(
        out,
        "\n### B13 remote wake-up, through each adapter and natively\n\n{} rounds × {} round \
         trips from another thread to a sleeping loop (poll backend), ns per round trip; the \
         ratio is to the context's own `poll()`.\n",
        plan.rounds, plan.trips
    )
    .unwrap();
    let mut loops: Vec<LoopRow> = vec![("own loop `poll()`", remote_poll, "")];
    #[cfg(feature = "glib")]
    loops.push(("glib `MainLoop`", remote_glib, "`MainContext::invoke`"));
    loops.push((
        "tokio `drive`",
        remote_tokio,
        "unbounded channel → task wake",
    ));
    loops.push(("calloop `EventLoop`", remote_calloop, "ping"));
    writeln!(
        out,
        "| outer loop | way in | median ns/trip | mean | min | this / own loop |"
    )
    .unwrap();
    writeln!(out, "|---|---|---|---|---|---|").unwrap();
    let mut base = None;
    for (name, make, native) in loops {
        let remote = make();
        // Warm-up: the loop thread's start and first iterations are not a wake-up's cost.
        let h = remote.aio.clone();
        trips(&move |job: Job| h.schedule_oneshot(job), 50);
        if let Some(send) = &remote.native {
            trips(&**send, 50);
        }
        let (mut aio, mut nat) = (Vec::new(), Vec::new());
        for _ in 0..plan.rounds {
            let h = remote.aio.clone();
            aio.push(trips(&move |job: Job| h.schedule_oneshot(job), plan.trips));
            if let Some(send) = &remote.native {
                nat.push(trips(&**send, plan.trips));
            }
        }
        drop(remote);
        let (m, a, n) = summary(aio);
        let b = *base.get_or_insert(m);
        writeln!(
            out,
            "| {name} | one-shot BH | {m:.0} | {a:.0} | {n:.0} | {:.2}× |",
            m / b
        )
        .unwrap();
        if !nat.is_empty() {
            let (m, a, n) = summary(nat);
            writeln!(
                out,
                "| {name} | native: {native} | {m:.0} | {a:.0} | {n:.0} | {:.2}× |",
                m / b
            )
            .unwrap();
        }
    }
    #[cfg(not(feature = "glib"))]
    writeln!(
        out,
        "\n(glib rows left out: built without the `glib` feature)"
    )
    .unwrap();
}

/// Rows measured round-robin, one call per row per round; the ratio is to the first row.
fn table(out: &mut String, rows: &[Row], rounds: usize, n: u32, unit: &str) {
    writeln!(
        out,
        "| contender | median {unit} | mean | min | this / first |"
    )
    .unwrap();
    writeln!(out, "|---|---|---|---|---|").unwrap();
    let mut samples = vec![Vec::new(); rows.len()];
    for _ in 0..rounds {
        for (i, (_, f)) in rows.iter().enumerate() {
            samples[i].push(f(n));
        }
    }
    let mut base = None;
    for ((name, _), s) in rows.iter().zip(samples) {
        let (m, a, mn) = summary(s);
        let b = *base.get_or_insert(m);
        writeln!(
            out,
            "| {name} | {m:.1} | {a:.1} | {mn:.1} | {:.2}× |",
            m / b
        )
        .unwrap();
    }
}

fn main() {
    aio_benches::run_parts(
        "embed",
        "B13: the outer-loop adapters (glib, tokio, calloop)",
        "embed.md",
        |sizes| match sizes {
            Sizes::Smoke => SMOKE,
            Sizes::Quick => QUICK,
            Sizes::Full => FULL,
        },
        &[
            ("B13_iteration", iteration),
            ("B13_remote_wake", remote_wake),
        ],
    );
}
