//! B3 (docs/benchmarks.md): cross-thread ping-pong between two loops on two threads, the libuv
//! `async1` shape. Side A (the measuring side, on cpu0) sends a ping and waits for the reply;
//! side B (on cpu1) answers each ping; one sample is the time from A's send to A's loop running
//! the reply. Contenders ([`Mechanism`]):
//!
//! * two aio contexts, each thread in `ctx.poll()` (blocking), the real loop, either through
//!   [`EventNotifier`]s (each side registers its own with `set_event_notifier` and `set()`s the
//!   other's) or through bottom halves (each side schedules a BH that lives on the other's
//!   context), with the contexts' adaptive polling off or on;
//! * tokio: two `current_thread` runtimes, each in `block_on`, ping and reply through two
//!   `tokio::sync::mpsc` unbounded channels;
//! * the floor: two threads in blocking `read(2)` / `write(2)` on two eventfds.
//!
//! Each run creates its own threads, loops and channels; the first `warm_up` round trips are not
//! recorded (they let the polling windows adapt). The sides are pinned to cpu0 and cpu1 as
//! `benches/report.rs` pins its two threads, the same way for every contender (no pinning on a
//! machine with fewer than 2 CPUs).

use std::cell::RefCell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::thread;
use std::time::Instant;

use aio::{AioContext, BottomHalf, EventNotifier, PollParams, Stats};

use crate::{new_polling_context, pin_current_thread, tokio_runtime};

/// The CPU of the measuring side.
pub const SIDE_A_CPU: usize = 0;
/// The CPU of the answering side.
pub const SIDE_B_CPU: usize = 1;

/// What carries the ping and the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// Two threads, blocking `read`/`write` on two eventfds (no loop at all).
    Floor,
    /// Two tokio `current_thread` runtimes and two unbounded mpsc channels.
    Tokio,
    /// Two aio contexts with these polling parameters; an [`EventNotifier`] per side,
    /// registered with `set_event_notifier`, `set()` by the other side.
    AioNotifier(PollParams),
    /// Two aio contexts with these polling parameters; a [`BottomHalf`] per side, created on
    /// its context and scheduled by the other side's thread.
    AioBh(PollParams),
}

/// The loop counters of one aio context over a run (warm-up included).
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    /// Backend waits (`ppoll` calls).
    pub waits: u64,
    /// eventfd writes by the context's `notify` (remote BH schedules).
    pub event_writes: u64,
    /// Polling phases that found work.
    pub poll_hits: u64,
    /// Polling phases that ran out their window and slept.
    pub poll_misses: u64,
    /// Time spent busy-polling, in ns.
    pub poll_ns: u64,
    /// The context's polling window at the end of the run, in ns.
    pub window_ns: u64,
}

impl Counters {
    fn between(before: &Stats, after: &Stats, ctx: &AioContext) -> Counters {
        Counters {
            waits: after.waits - before.waits,
            event_writes: after.event_writes - before.event_writes,
            poll_hits: after.poll_hits - before.poll_hits,
            poll_misses: after.poll_misses - before.poll_misses,
            poll_ns: (after.poll_time - before.poll_time).as_nanos() as u64,
            window_ns: ctx.poll_window().as_nanos() as u64,
        }
    }

    fn add(&mut self, other: &Counters) {
        self.waits += other.waits;
        self.event_writes += other.event_writes;
        self.poll_hits += other.poll_hits;
        self.poll_misses += other.poll_misses;
        self.poll_ns += other.poll_ns;
        self.window_ns = other.window_ns;
    }
}

/// What runs of one contender measured, accumulated.
#[derive(Debug, Default, Clone)]
pub struct PingPong {
    /// Round-trip times in ns, warm-up excluded, in the order they were measured.
    pub samples: Vec<u64>,
    /// Round trips made, warm-up included: the denominator of the counters.
    pub round_trips: u64,
    /// eventfd writes made by the contender itself: the floor's writes, the `EventNotifier::set`
    /// calls of the notifier rows (one per side per round trip, by construction); 0 for BHs,
    /// whose writes are the contexts' (`a.event_writes + b.event_writes`); unknown for tokio.
    pub own_writes: u64,
    /// aio only: side A's context.
    pub a: Option<Counters>,
    /// aio only: side B's context.
    pub b: Option<Counters>,
}

impl PingPong {
    /// Adds the results of another run of the same contender.
    pub fn extend(&mut self, run: PingPong) {
        self.samples.extend(run.samples);
        self.round_trips += run.round_trips;
        self.own_writes += run.own_writes;
        for (mine, theirs) in [(&mut self.a, run.a), (&mut self.b, run.b)] {
            if let Some(t) = theirs {
                mine.get_or_insert_with(Counters::default).add(&t);
            }
        }
    }

    /// All eventfd writes per round trip, where known (not for tokio).
    pub fn writes_per_round_trip(&self) -> Option<f64> {
        let ctx = match (&self.a, &self.b) {
            (Some(a), Some(b)) => a.event_writes + b.event_writes,
            _ if self.own_writes > 0 => 0,
            _ => return None,
        };
        Some((ctx + self.own_writes) as f64 / self.round_trips.max(1) as f64)
    }

    /// `f` of both contexts' counters, per round trip (aio only).
    pub fn per_round_trip(&self, f: impl Fn(&Counters) -> u64) -> Option<f64> {
        let (a, b) = (self.a.as_ref()?, self.b.as_ref()?);
        Some((f(a) + f(b)) as f64 / self.round_trips.max(1) as f64)
    }
}

/// Side A's clock: starts at each ping, records each reply after the warm-up.
#[derive(Debug)]
struct Recorder {
    warm_up: u64,
    total: u64,
    replies: u64,
    start: Instant,
    samples: Vec<u64>,
}

impl Recorder {
    fn new(warm_up: u64, measured: u64) -> Recorder {
        Recorder {
            warm_up,
            total: warm_up + measured,
            replies: 0,
            start: Instant::now(),
            samples: Vec::with_capacity(measured as usize),
        }
    }

    /// Call right before the first ping.
    fn begin(&mut self) {
        self.start = Instant::now();
    }

    /// A reply arrived: records its round trip. Returns whether to send the next ping, and if
    /// so restarts the clock.
    fn reply(&mut self) -> bool {
        let ns = self.start.elapsed().as_nanos() as u64;
        if self.replies >= self.warm_up {
            self.samples.push(ns);
        }
        self.replies += 1;
        if self.replies < self.total {
            self.start = Instant::now();
            true
        } else {
            false
        }
    }

    fn finished(&self) -> bool {
        self.replies >= self.total
    }

    /// Moves the results out, leaving an empty recorder.
    fn take(&mut self) -> PingPong {
        std::mem::replace(self, Recorder::new(0, 0)).into_result()
    }

    fn into_result(self) -> PingPong {
        PingPong {
            samples: self.samples,
            round_trips: self.replies,
            ..PingPong::default()
        }
    }
}

/// One run: `warm_up` unrecorded round trips, then `measured` recorded ones.
///
/// # Panics
///
/// If a thread, context, runtime or eventfd cannot be created, or a side panicked.
pub fn run(mechanism: Mechanism, warm_up: u64, measured: u64) -> PingPong {
    assert!(measured > 0);
    match mechanism {
        Mechanism::Floor => floor(warm_up, measured),
        Mechanism::Tokio => tokio_pair(warm_up, measured),
        Mechanism::AioNotifier(p) => aio_notifiers(p, warm_up, measured),
        Mechanism::AioBh(p) => aio_bhs(p, warm_up, measured),
    }
}

/// Runs `a` and `b` on two new threads pinned to [`SIDE_A_CPU`] and [`SIDE_B_CPU`], and
/// returns what they returned.
fn two_sides<A: Send + 'static, B: Send + 'static>(
    a: impl FnOnce() -> A + Send + 'static,
    b: impl FnOnce() -> B + Send + 'static,
) -> (A, B) {
    let side_b = thread::Builder::new()
        .name("b3-side-b".into())
        .spawn(move || {
            let _pin = pin_current_thread(SIDE_B_CPU);
            b()
        })
        .expect("B3: cannot spawn side B");
    let side_a = thread::Builder::new()
        .name("b3-side-a".into())
        .spawn(move || {
            let _pin = pin_current_thread(SIDE_A_CPU);
            a()
        })
        .expect("B3: cannot spawn side A");
    let a = side_a.join().expect("B3: side A panicked");
    let b = side_b.join().expect("B3: side B panicked");
    (a, b)
}

/// A blocking eventfd (reads sleep until the counter is non-zero).
fn blocking_eventfd() -> OwnedFd {
    // SAFETY: eventfd takes plain integer arguments and returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(
        fd >= 0,
        "B3: eventfd failed: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` was just returned by eventfd and is owned by no one else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn eventfd_write(fd: &OwnedFd) {
    let one: u64 = 1;
    // `fd` is an open eventfd.
    // SAFETY: the pointer and length describe `one`, 8 readable bytes that outlive the call.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&raw const one).cast(), 8) };
    assert_eq!(
        n,
        8,
        "B3: eventfd write: {}",
        std::io::Error::last_os_error()
    );
}

fn eventfd_read(fd: &OwnedFd) {
    let mut value: u64 = 0;
    loop {
        // `fd` is an open eventfd.
        // SAFETY: the pointer and length describe `value`, 8 writable bytes outliving the call.
        let n = unsafe { libc::read(fd.as_raw_fd(), (&raw mut value).cast(), 8) };
        if n == 8 {
            return;
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::Interrupted,
            "B3: eventfd read: {e}"
        );
    }
}

fn floor(warm_up: u64, measured: u64) -> PingPong {
    let ping = Arc::new(blocking_eventfd());
    let pong = Arc::new(blocking_eventfd());
    let stop = Arc::new(AtomicBool::new(false));
    let (ping_b, pong_b, stop_b) = (ping.clone(), pong.clone(), stop.clone());
    let (mut result, ()) = two_sides(
        move || {
            let mut rec = Recorder::new(warm_up, measured);
            rec.begin();
            eventfd_write(&ping);
            loop {
                eventfd_read(&pong);
                if !rec.reply() {
                    break;
                }
                eventfd_write(&ping);
            }
            // Release: side B's Acquire load after its read sees it.
            stop.store(true, Ordering::Release);
            eventfd_write(&ping);
            rec.into_result()
        },
        move || {
            loop {
                eventfd_read(&ping_b);
                // Acquire: pairs with side A's Release store before its last write.
                if stop_b.load(Ordering::Acquire) {
                    break;
                }
                eventfd_write(&pong_b);
            }
        },
    );
    result.own_writes = 2 * result.round_trips;
    result
}

fn tokio_pair(warm_up: u64, measured: u64) -> PingPong {
    let (ping, mut ping_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (pong, mut pong_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (result, ()) = two_sides(
        move || {
            let rt = tokio_runtime();
            rt.block_on(async move {
                let mut rec = Recorder::new(warm_up, measured);
                rec.begin();
                ping.send(()).expect("B3: tokio side B gone");
                loop {
                    pong_rx.recv().await.expect("B3: tokio side B gone");
                    if !rec.reply() {
                        break;
                    }
                    ping.send(()).expect("B3: tokio side B gone");
                }
                // Dropping `ping` ends side B's loop.
                rec.into_result()
            })
        },
        move || {
            let rt = tokio_runtime();
            rt.block_on(async move {
                while ping_rx.recv().await.is_some() {
                    if pong.send(()).is_err() {
                        break;
                    }
                }
            });
        },
    );
    result
}

fn aio_notifiers(params: PollParams, warm_up: u64, measured: u64) -> PingPong {
    let new = || Arc::new(EventNotifier::new().expect("B3: cannot create an EventNotifier"));
    let (to_a, to_b) = (new(), new());
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready) = mpsc::channel::<()>();
    let (to_a_b, to_b_b, stop_b) = (to_a.clone(), to_b.clone(), stop.clone());
    let ((mut result, a), b) = two_sides(
        move || {
            let ctx = new_polling_context(params);
            let rec = Rc::new(RefCell::new(Recorder::new(warm_up, measured)));
            let (r, ping) = (rec.clone(), to_b.clone());
            let _handler = ctx
                .set_event_notifier(&to_a, move |e| {
                    if e.test_and_clear() && r.borrow_mut().reply() {
                        ping.set().expect("B3: EventNotifier::set failed");
                    }
                })
                .expect("B3: set_event_notifier failed");
            ready.recv().expect("B3: side B died");
            let before = ctx.stats();
            rec.borrow_mut().begin();
            to_b.set().expect("B3: EventNotifier::set failed");
            while !rec.borrow().finished() {
                ctx.poll();
            }
            let counters = Counters::between(&before, &ctx.stats(), &ctx);
            // Release: side B's Acquire load after its wake-up sees it.
            stop.store(true, Ordering::Release);
            to_b.set().expect("B3: EventNotifier::set failed");
            let result = rec.borrow_mut().take();
            (result, counters)
        },
        move || {
            let ctx = new_polling_context(params);
            let pong = to_a_b;
            let _handler = ctx
                .set_event_notifier(&to_b_b, move |e| {
                    if e.test_and_clear() {
                        pong.set().expect("B3: EventNotifier::set failed");
                    }
                })
                .expect("B3: set_event_notifier failed");
            let before = ctx.stats();
            ready_tx.send(()).expect("B3: side A died");
            // Acquire: pairs with side A's Release store before its last set.
            while !stop_b.load(Ordering::Acquire) {
                ctx.poll();
            }
            Counters::between(&before, &ctx.stats(), &ctx)
        },
    );
    result.own_writes = 2 * result.round_trips;
    result.a = Some(a);
    result.b = Some(b);
    result
}

thread_local! {
    /// The BH on the other side's context that this thread schedules to answer (or ping).
    static PEER_BH: RefCell<Option<BottomHalf>> = const { RefCell::new(None) };
    /// Side A's clock, read by its BH callback.
    static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
}

/// Schedules this thread's [`PEER_BH`].
fn schedule_peer() {
    PEER_BH.with(|p| {
        p.borrow()
            .as_ref()
            .expect("B3: no peer BH on this thread")
            .schedule();
    });
}

/// Side A's BH callback: a reply arrived.
fn on_reply() {
    let again = RECORDER.with(|r| {
        r.borrow_mut()
            .as_mut()
            .expect("B3: no recorder on this thread")
            .reply()
    });
    if again {
        schedule_peer();
    }
}

fn recorder_finished() -> bool {
    RECORDER.with(|r| r.borrow().as_ref().is_none_or(Recorder::finished))
}

fn aio_bhs(params: PollParams, warm_up: u64, measured: u64) -> PingPong {
    // The BHs cross the threads: each side creates the BH of its own context (its callback
    // runs there) and sends it to the other side, which keeps it in `PEER_BH`. No callback
    // owns a BH, so there is no reference cycle.
    let (a_bh_tx, a_bh) = mpsc::channel::<BottomHalf>();
    let (b_bh_tx, b_bh) = mpsc::channel::<(BottomHalf, aio::ContextHandle)>();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_b = stop.clone();
    // The threads drop their peer BHs between these two waits, before either context goes.
    let barrier = Arc::new(Barrier::new(2));
    let barrier_b = barrier.clone();
    let ((mut result, a), b) = two_sides(
        move || {
            let ctx = new_polling_context(params);
            a_bh_tx.send(ctx.bh(on_reply)).expect("B3: side B died");
            let (peer, peer_ctx) = b_bh.recv().expect("B3: side B died");
            PEER_BH.with(|p| *p.borrow_mut() = Some(peer));
            RECORDER.with(|r| *r.borrow_mut() = Some(Recorder::new(warm_up, measured)));
            let before = ctx.stats();
            RECORDER.with(|r| r.borrow_mut().as_mut().map(Recorder::begin));
            schedule_peer();
            while !recorder_finished() {
                ctx.poll();
            }
            let counters = Counters::between(&before, &ctx.stats(), &ctx);
            // Release: side B's Acquire load after its wake-up sees it.
            stop.store(true, Ordering::Release);
            peer_ctx.notify();
            barrier.wait();
            PEER_BH.with(|p| p.borrow_mut().take());
            barrier.wait();
            let result = RECORDER
                .with(|r| r.borrow_mut().take())
                .map(Recorder::into_result)
                .unwrap_or_default();
            (result, counters)
        },
        move || {
            let ctx = new_polling_context(params);
            b_bh_tx
                .send((ctx.bh(schedule_peer), ctx.handle()))
                .expect("B3: side A died");
            let peer = a_bh.recv().expect("B3: side A died");
            PEER_BH.with(|p| *p.borrow_mut() = Some(peer));
            let before = ctx.stats();
            // Acquire: pairs with side A's Release store before its notify.
            while !stop_b.load(Ordering::Acquire) {
                ctx.poll();
            }
            let counters = Counters::between(&before, &ctx.stats(), &ctx);
            barrier_b.wait();
            PEER_BH.with(|p| p.borrow_mut().take());
            barrier_b.wait();
            counters
        },
    );
    result.a = Some(a);
    result.b = Some(b);
    result
}
