//! B7 workloads (docs/benchmarks.md): timer arm, re-arm, cancel and fire with N timers already
//! pending, for the `timers` crate and its peers, tokio's timer wheel (`tokio::time::sleep`
//! registered and dropped inside a `current_thread` runtime) and async-io's `Timer` (a global
//! `BTreeMap` behind a mutex, driven by its own "async-io" thread).
//!
//! Every pending set holds N timers at random deadlines between 1 ms and 60 s from its creation,
//! and every measured arm picks a deadline in the same range from a fixed-seed table, so all
//! three implementations see the same shape of work. Each workload returns the time of exactly
//! `iters` operations, for criterion's `iter_custom` and the quick report alike.
//!
//! Caveats, all in the peers' favour or neutral:
//! - tokio never fires a pending timer here (its runtime is not driven during the arm benches);
//!   ours neither (`run_expired` is not called). async-io's own thread fires pending timers as
//!   their deadlines pass, so its N shrinks by about 1/60 000 per millisecond of benchmark.
//! - The fire benchmark uses tokio's paused clock (`test-util`), advanced 2 ms per batch, since
//!   its wheel has 1 ms slots; the pending timers it passes fire along the way (≈ N/30 000 per
//!   batch of 1 000). Pausing a tokio clock makes every later tokio `Instant::now()` in the process take a
//!   slower path, so the fire benchmarks must run after every other tokio benchmark.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use timers::{ClockType, Scale, Timer, TimerListGroup, VirtualClock};

use crate::{bump, ran};

/// The N of B7: timers already pending while the measured operation runs.
pub const PENDING: [usize; 4] = [0, 1_000, 100_000, 1_000_000];

/// Timers per batch in the fire benchmarks.
pub const FIRE_BATCH: usize = 1_000;

/// Random delays between 1 ms and 60 s, cycled through by the measured operations. A power of
/// two so that the index wraps with a mask.
const DELAYS: usize = 4_096;

/// xorshift64*, fixed seed: every run arms the same deadlines.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator with the benchmark's fixed seed.
    pub fn new() -> Self {
        Rng(0x0b7b_7b7b_7b7b_7b7b)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A delay in [1 ms, 60 s).
    pub fn delay(&mut self) -> Duration {
        const MIN: u64 = 1_000_000;
        const MAX: u64 = 60_000_000_000;
        Duration::from_nanos(MIN + self.next_u64() % (MAX - MIN))
    }
}

impl Default for Rng {
    fn default() -> Self {
        Rng::new()
    }
}

/// The table of delays the measured operations cycle through.
#[derive(Clone)]
struct Delays(Vec<Duration>);

impl Delays {
    fn new() -> Self {
        let mut rng = Rng::new();
        // Skip the values the pending sets use first, so the two are not correlated.
        for _ in 0..1_000 {
            rng.delay();
        }
        Delays((0..DELAYS).map(|_| rng.delay()).collect())
    }

    #[inline]
    fn get(&self, i: u64) -> Duration {
        self.0[i as usize & (DELAYS - 1)]
    }
}

impl fmt::Debug for Delays {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Delays({})", self.0.len())
    }
}

fn noop_context() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

/// Ours on the real monotonic clock: a group with N pending `Realtime` timers and one probe
/// timer that the measured operations arm, re-arm and cancel.
#[derive(Debug)]
pub struct OursArm {
    group: TimerListGroup,
    pending: Vec<Timer>,
    probe: Timer,
    delays: Delays,
}

impl OursArm {
    /// A group with `n` pending timers.
    pub fn new(n: usize) -> Self {
        let group = TimerListGroup::new(Arc::new(|| ()));
        let mut rng = Rng::new();
        let pending = (0..n)
            .map(|_| {
                let t = group.timer(ClockType::Realtime, Scale::NS, bump);
                t.arm_after(rng.delay());
                t
            })
            .collect();
        let probe = group.timer(ClockType::Realtime, Scale::NS, bump);
        OursArm {
            group,
            pending,
            probe,
            delays: Delays::new(),
        }
    }

    /// How many timers are pending besides the probe.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// `iters` × (`arm_after(random delay)` + `cancel`) of an existing timer.
    pub fn arm_cancel(&mut self, iters: u64) -> Duration {
        let start = Instant::now();
        for i in 0..iters {
            self.probe.arm_after(self.delays.get(i));
            self.probe.cancel();
        }
        start.elapsed()
    }

    /// `iters` × (create a timer, `arm_after(random delay)`, drop it): the whole lifecycle,
    /// as tokio's `sleep` + drop and async-io's `Timer::after` + drop do.
    pub fn create_arm_drop(&mut self, iters: u64) -> Duration {
        let start = Instant::now();
        for i in 0..iters {
            let t = self.group.timer(ClockType::Realtime, Scale::NS, bump);
            t.arm_after(self.delays.get(i));
            drop(t);
        }
        start.elapsed()
    }

    /// `iters` × re-arm of an armed timer to a new random deadline.
    pub fn rearm(&mut self, iters: u64) -> Duration {
        self.probe.arm_after(self.delays.get(u64::MAX));
        let start = Instant::now();
        for i in 0..iters {
            self.probe.arm_after(self.delays.get(i));
        }
        let elapsed = start.elapsed();
        self.probe.cancel();
        elapsed
    }

    /// `iters` × `group.deadline()`: what the loop asks every iteration (one atomic load per
    /// clock, one monotonic clock read for the clock with timers).
    pub fn next_deadline(&mut self, iters: u64) -> Duration {
        let start = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(self.group.deadline());
        }
        start.elapsed()
    }
}

/// Ours firing: a group on a stopped, enabled virtual clock with N pending timers that never
/// come due, and [`FIRE_BATCH`] timers that each batch arms at the current time and runs.
#[derive(Debug)]
pub struct OursFire {
    clock: VirtualClock,
    group: TimerListGroup,
    pending: Vec<Timer>,
    batch: Vec<Timer>,
}

impl OursFire {
    /// A group with `n` pending timers.
    pub fn new(n: usize) -> Self {
        let clock = VirtualClock::new(); // enabled, stopped
        let group = TimerListGroup::builder()
            .virtual_clock(clock.clone())
            .build(Arc::new(|| ()));
        let mut rng = Rng::new();
        let pending = (0..n)
            .map(|_| {
                let t = group.timer(ClockType::Virtual, Scale::NS, bump);
                t.arm_after(rng.delay());
                t
            })
            .collect();
        let batch = (0..FIRE_BATCH)
            .map(|_| group.timer(ClockType::Virtual, Scale::NS, bump))
            .collect();
        OursFire {
            clock,
            group,
            pending,
            batch,
        }
    }

    /// How many timers are pending besides the batch.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// `iters` batches: arm [`FIRE_BATCH`] timers due now, then one `run_expired` fires them.
    ///
    /// # Panics
    ///
    /// If a timer of a batch did not fire.
    pub fn arm_fire(&mut self, iters: u64) -> Duration {
        let now = self.clock.now_ns();
        let before = ran();
        let start = Instant::now();
        for _ in 0..iters {
            for t in &self.batch {
                t.arm_ns(now);
            }
            self.group.run_expired();
        }
        let elapsed = start.elapsed();
        assert_eq!(
            ran() - before,
            iters * FIRE_BATCH as u64,
            "a timer did not fire"
        );
        elapsed
    }
}

/// The tokio peer for arming: a `current_thread` runtime with time enabled, N registered
/// `sleep`s at random deadlines, and the measured sleeps created and polled inside it.
#[derive(Debug)]
pub struct TokioArm {
    rt: tokio::runtime::Runtime,
    pending: Vec<Pin<Box<tokio::time::Sleep>>>,
    delays: Delays,
}

impl TokioArm {
    /// A runtime with `n` registered sleeps.
    ///
    /// # Panics
    ///
    /// If the runtime cannot be built.
    pub fn new(n: usize, io: bool) -> Self {
        let rt = if io {
            crate::tokio_runtime()
        } else {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("aio-benches: cannot build a tokio runtime")
        };
        let mut rng = Rng::new();
        let pending = {
            let _enter = rt.enter();
            let mut cx = noop_context();
            (0..n)
                .map(|_| {
                    let mut s = Box::pin(tokio::time::sleep(rng.delay()));
                    // The first poll registers the sleep with the timer wheel.
                    assert!(s.as_mut().poll(&mut cx).is_pending());
                    s
                })
                .collect()
        };
        TokioArm {
            rt,
            pending,
            delays: Delays::new(),
        }
    }

    /// `iters` × (`sleep(random delay)`, poll once to register, drop to deregister).
    pub fn register_drop(&mut self, iters: u64) -> Duration {
        let _enter = self.rt.enter();
        let mut cx = noop_context();
        let start = Instant::now();
        for i in 0..iters {
            let s = std::pin::pin!(tokio::time::sleep(self.delays.get(i)));
            let _ = std::hint::black_box(s.poll(&mut cx));
        }
        start.elapsed()
    }

    /// The shape of the reference anchor (shared/reference/anchors): inside `block_on`, `iters` ×
    /// (`Box::pin(sleep(random delay))`, poll once with the task's own waker, drop). What a task
    /// that races a sleep against something else pays.
    pub fn register_drop_in_task(&mut self, iters: u64) -> Duration {
        let delays = &self.delays;
        self.rt.block_on(async move {
            let start = Instant::now();
            for i in 0..iters {
                let mut s = Box::pin(tokio::time::sleep(delays.get(i)));
                let ready = std::future::poll_fn(|cx| Poll::Ready(s.as_mut().poll(cx).is_ready()));
                std::hint::black_box(ready.await);
            }
            start.elapsed()
        })
    }

    /// `iters` × `Sleep::reset(now + random delay)` of a registered sleep.
    pub fn reset(&mut self, iters: u64) -> Duration {
        let _enter = self.rt.enter();
        let mut cx = noop_context();
        let mut s = Box::pin(tokio::time::sleep(self.delays.get(u64::MAX)));
        let _ = s.as_mut().poll(&mut cx);
        let start = Instant::now();
        for i in 0..iters {
            s.as_mut()
                .reset(tokio::time::Instant::now() + self.delays.get(i));
        }
        start.elapsed()
    }

    /// How many sleeps are pending.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// The tokio peer for firing: a paused-clock runtime with N registered sleeps and
/// [`FIRE_BATCH`] sleeps that each batch resets 1 ms ahead, advances the clock 2 ms, and polls
/// to completion.
#[derive(Debug)]
pub struct TokioFire {
    rt: tokio::runtime::Runtime,
    pending: Vec<Pin<Box<tokio::time::Sleep>>>,
    batch: Vec<Pin<Box<tokio::time::Sleep>>>,
}

impl TokioFire {
    /// A paused runtime with `n` registered sleeps. Pausing is process-wide in effect; see the
    /// module docs.
    ///
    /// # Panics
    ///
    /// If the runtime cannot be built.
    pub fn new(n: usize) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("aio-benches: cannot build a tokio runtime");
        let mut rng = Rng::new();
        let (pending, batch) = {
            let _enter = rt.enter();
            let mut cx = noop_context();
            let pending = (0..n)
                .map(|_| {
                    let mut s = Box::pin(tokio::time::sleep(rng.delay()));
                    let _ = s.as_mut().poll(&mut cx);
                    s
                })
                .collect();
            let batch = (0..FIRE_BATCH)
                .map(|_| Box::pin(tokio::time::sleep(Duration::from_secs(3_600))))
                .collect();
            (pending, batch)
        };
        TokioFire { rt, pending, batch }
    }

    /// How many sleeps are pending besides the batch.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// `iters` batches of [`FIRE_BATCH`] sleeps: reset 1 ms ahead (registers), advance the
    /// paused clock 2 ms (the driver fires them), poll each to `Ready`.
    ///
    /// # Panics
    ///
    /// If a sleep did not complete.
    pub fn advance_fire(&mut self, iters: u64) -> Duration {
        let batch = &mut self.batch;
        let mut done = vec![false; batch.len()];
        self.rt.block_on(async move {
            let start = Instant::now();
            for _ in 0..iters {
                let deadline = tokio::time::Instant::now() + Duration::from_millis(1);
                for s in batch.iter_mut() {
                    s.as_mut().reset(deadline);
                }
                done.fill(false);
                // tokio rounds a deadline up to its next 1 ms tick, and the paused clock need
                // not sit on a tick boundary: 2 ms always reaches the rounded deadline.
                tokio::time::advance(Duration::from_millis(2)).await;
                // The driver fires a bounded number of timers per turn; keep yielding to it
                // until every sleep of the batch has completed.
                let mut left = batch.len();
                while left > 0 {
                    std::future::poll_fn(|cx| {
                        for (s, done) in batch.iter_mut().zip(done.iter_mut()) {
                            if !*done && s.as_mut().poll(cx).is_ready() {
                                *done = true;
                                left -= 1;
                                bump();
                            }
                        }
                        Poll::Ready(())
                    })
                    .await;
                    if left > 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }
            start.elapsed()
        })
    }
}

/// The async-io peer: N registered `Timer`s in async-io's global reactor.
#[derive(Debug)]
pub struct AsyncIoArm {
    pending: Vec<async_io::Timer>,
    delays: Delays,
}

impl AsyncIoArm {
    /// `n` registered timers. async-io's reactor is global: drop the previous set first.
    pub fn new(n: usize) -> Self {
        let mut rng = Rng::new();
        let mut cx = noop_context();
        let pending = (0..n)
            .map(|_| {
                let mut t = async_io::Timer::after(rng.delay());
                // As in async-io's own bench: the first poll registers the timer.
                assert!(Pin::new(&mut t).poll(&mut cx).is_pending());
                t
            })
            .collect();
        AsyncIoArm {
            pending,
            delays: Delays::new(),
        }
    }

    /// How many timers were registered (some may have fired since; see the module docs).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// `iters` × (`Timer::after(random delay)`, poll once to register, drop to deregister).
    pub fn register_drop(&mut self, iters: u64) -> Duration {
        let mut cx = noop_context();
        let start = Instant::now();
        for i in 0..iters {
            let mut t = async_io::Timer::after(self.delays.get(i));
            let _ = std::hint::black_box(Pin::new(&mut t).poll(&mut cx));
        }
        start.elapsed()
    }

    /// `iters` × `Timer::set_after(random delay)` of a registered timer.
    pub fn set_after(&mut self, iters: u64) -> Duration {
        let mut cx = noop_context();
        let mut t = async_io::Timer::after(self.delays.get(u64::MAX));
        let _ = Pin::new(&mut t).poll(&mut cx);
        let start = Instant::now();
        for i in 0..iters {
            t.set_after(self.delays.get(i));
        }
        start.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_run() {
        let mut ours = OursArm::new(10);
        assert_eq!(ours.pending(), 10);
        ours.arm_cancel(10);
        ours.create_arm_drop(10);
        ours.rearm(10);
        ours.next_deadline(10);
        let mut fire = OursFire::new(10);
        fire.arm_fire(2);
        for io in [false, true] {
            let mut tokio = TokioArm::new(10, io);
            tokio.register_drop(10);
            tokio.register_drop_in_task(10);
            tokio.reset(10);
        }
        let mut aio = AsyncIoArm::new(10);
        aio.register_drop(10);
        aio.set_after(10);
        let mut tfire = TokioFire::new(10);
        tfire.advance_fire(2);
    }

    #[test]
    fn delays_are_in_range() {
        let d = Delays::new();
        for i in 0..DELAYS as u64 {
            let v = d.get(i);
            assert!(v >= Duration::from_millis(1) && v < Duration::from_secs(60));
        }
    }
}
