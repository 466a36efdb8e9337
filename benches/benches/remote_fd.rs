//! B10, the remote-registration part (issue 13): registering and removing an fd handler from
//! another thread through `ContextHandle::fd_handler` (which waits for the loop's answer), next
//! to the workaround it replaces, a one-shot BH that registers on the loop's thread and sends
//! the result back. Plain `Instant` timing (no criterion); this program owns the workloads.
//!
//! * `B10_remote_fd`: the loop runs `poll()` on its own thread; the measuring thread, per
//!   operation, registers a read handler for an eventfd, waits for the answer, and drops the
//!   registration (queued, not awaited). Rows: the handle's `register` + drop of the
//!   `RemoteFdHandler`; a one-shot BH that registers (keeping the `FdHandler` on the loop's
//!   side) and answers through a channel, + a one-shot BH that drops it. Both pay one wake-up
//!   of a sleeping loop per registration; the figure is the round trip per register + remove.
//!
//! `cargo bench -p aio-benches --bench remote_fd [-- FILTER] [--quick]`. Without `--bench` (as
//! under `cargo test --benches`) every part runs once, briefly. With `AIO_BENCH_REPORT_DIR`
//! set, the table is also written to `remote_fd.md` there.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Instant;

use aio_benches::{Sizes, summary};
use aio_core::{AioContext, ContextHandle, EventNotifier, FdHandler};

/// How much to measure: rounds, and register + remove pairs per contender per round.
#[derive(Debug, Clone, Copy)]
struct Plan {
    rounds: usize,
    ops: u32,
}

const FULL: Plan = Plan {
    rounds: 9,
    ops: 20_000,
};
const QUICK: Plan = Plan {
    rounds: 3,
    ops: 2_000,
};
const SMOKE: Plan = Plan { rounds: 1, ops: 50 };

/// A loop on its own thread, polling until stopped.
struct Loop {
    handle: ContextHandle,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Loop {
    fn start() -> Loop {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let s = stop.clone();
        let thread = thread::spawn(move || {
            let ctx = aio::Builder::new()
                .backend(aio::Backend::Poll)
                .ignore_env()
                .build()
                .unwrap();
            tx.send(ctx.handle()).unwrap();
            while !s.load(Ordering::Acquire) {
                ctx.poll();
            }
        });
        Loop {
            handle: rx.recv().unwrap(),
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.handle.notify();
        self.thread.take().unwrap().join().unwrap();
    }
}

/// ns per register + remove through the handle.
fn remote(handle: &ContextHandle, fd: &Arc<EventNotifier>, ops: u32) -> f64 {
    let start = Instant::now();
    for _ in 0..ops {
        let h = handle
            .fd_handler(fd.clone())
            .on_read(|_| ())
            .register()
            .unwrap();
        drop(h);
    }
    start.elapsed().as_nanos() as f64 / f64::from(ops)
}

thread_local! {
    /// The workaround's registration, kept on the loop's thread (an `FdHandler` is `!Send`).
    static KEPT: RefCell<Option<FdHandler>> = const { RefCell::new(None) };
}

/// ns per register + remove through one-shot BHs that do it on the loop's thread.
fn oneshot(handle: &ContextHandle, fd: &Arc<EventNotifier>, ops: u32) -> f64 {
    let (tx, rx) = mpsc::channel::<std::io::Result<()>>();
    let start = Instant::now();
    for _ in 0..ops {
        let (tx, fd) = (tx.clone(), fd.clone());
        handle.schedule_oneshot(move || {
            let ctx = AioContext::current().unwrap();
            let r = ctx.fd_handler(fd).on_read(|_| ()).register();
            let r = r.map(|h| KEPT.with(|k| *k.borrow_mut() = Some(h)));
            tx.send(r).unwrap();
        });
        rx.recv().unwrap().unwrap();
        handle.schedule_oneshot(|| KEPT.with(|k| drop(k.borrow_mut().take())));
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(ops);
    // The last removal done before the next row registers the fd by the other route (queued
    // handle operations run before BHs in an iteration, so they could overtake it).
    handle.schedule_oneshot(move || tx.send(Ok(())).unwrap());
    rx.recv().unwrap().unwrap();
    ns
}

fn remote_fd(out: &mut String, plan: Plan) {
    writeln!(
        out,
        "\n### B10 remote fd registration\n\n{} rounds × {} register + remove pairs from another \
         thread, the loop on its own thread (poll backend), each registration waiting for the \
         loop's answer.\n",
        plan.rounds, plan.ops
    )
    .unwrap();
    writeln!(
        out,
        "| contender | median ns/pair | mean | min | this / one-shot BH |"
    )
    .unwrap();
    writeln!(out, "|---|---|---|---|---|").unwrap();
    let lp = Loop::start();
    let fd = Arc::new(EventNotifier::new().unwrap());
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for _ in 0..plan.rounds {
        ours.push(remote(&lp.handle, &fd, plan.ops));
        peer.push(oneshot(&lp.handle, &fd, plan.ops));
    }
    drop(lp);
    let (om, oa, on) = summary(ours);
    let (pm, pa, pn) = summary(peer);
    writeln!(
        out,
        "| `ContextHandle::fd_handler(..).register()` + drop | {om:.0} | {oa:.0} | {on:.0} | {:.2}× |",
        om / pm
    )
    .unwrap();
    writeln!(
        out,
        "| one-shot BH registering on the loop + one-shot BH dropping | {pm:.0} | {pa:.0} | {pn:.0} | 1.00× |"
    )
    .unwrap();
}

fn main() {
    aio_benches::run_parts(
        "remote_fd",
        "B10: remote fd registration vs a one-shot BH",
        "remote_fd.md",
        |sizes| match sizes {
            Sizes::Smoke => SMOKE,
            Sizes::Quick => QUICK,
            Sizes::Full => FULL,
        },
        &[("B10_remote_fd", remote_fd)],
    );
}
