//! Adaptive polling on a manual clock: the window arithmetic of both policies (grow, cover,
//! cap, shrink, reset, weight, decay) and the 7 s idle rule, driven through a real context
//! whose realtime clock is a [`VirtualClock`] that only the test moves.
//!
//! A scripted monitor wraps the poll backend (io_uring for a member that polls in the
//! backend) and advances the clock by a chosen "block time" in each wait, so that every
//! iteration's block time (docs/qemu-semantics.md §4.3: from the start of the iteration to the
//! end of its wait) is exact, and the windows that follow are exact too.
//! The busy loop itself still runs in real time (it is bounded in real time), but with poll
//! functions that never find work it changes nothing that is checked here.

use aio::{
    AioContext, ClockType, FdMonitor, GroupBuilder, HandlerKey, OuterFd, PollMonitor, PollParams,
    PollPolicy, ReadyList, VirtualClock,
};
use aio_conformance::Polled;
use std::cell::Cell;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A backend (poll, or io_uring for the members that poll in it), with a clock advanced by
/// `block` ns at each wait.
#[derive(Debug)]
struct Scripted<M = PollMonitor> {
    inner: M,
    clock: VirtualClock,
    block: Arc<AtomicU64>,
}

impl<M: FdMonitor> FdMonitor for Scripted<M> {
    fn name(&self) -> &'static str {
        "scripted-poll"
    }
    unsafe fn update(&mut self, change: aio::Change) -> io::Result<()> {
        // SAFETY: [FD-1]: the caller's contract, passed on unchanged.
        unsafe { self.inner.update(change) }
    }
    fn wait(&mut self, ready: &mut ReadyList, timeout: Option<Duration>) -> io::Result<usize> {
        self.clock.advance_ns(self.block.load(Ordering::Relaxed));
        self.inner.wait(ready, timeout)
    }
    fn must_wait(&self) -> Option<bool> {
        self.inner.must_wait()
    }
    fn prepare_polling(&mut self) -> io::Result<()> {
        self.inner.prepare_polling()
    }
    fn outer_fds(&self, out: &mut Vec<OuterFd>) {
        self.inner.outer_fds(out)
    }
}

/// An fd-only handler (which owns the read end of its socket) and the write end.
struct Plain {
    writer: UnixStream,
    _handler: aio::FdHandler,
    reads: Rc<Cell<u32>>,
}

struct Rig {
    ctx: AioContext,
    block: Arc<AtomicU64>,
}

impl Rig {
    fn new(params: PollParams) -> Rig {
        let clock = VirtualClock::new();
        let block = Arc::new(AtomicU64::new(0));
        let monitor = Scripted {
            inner: PollMonitor::new().unwrap(),
            clock: clock.clone(),
            block: block.clone(),
        };
        let clocks = GroupBuilder::new().manual_clock(ClockType::Realtime, clock);
        let ctx = AioContext::with_clocks(Box::new(monitor), clocks).unwrap();
        ctx.set_poll_params(params).unwrap();
        Rig { ctx, block }
    }

    /// Sets `e`, runs one blocking iteration whose block time is `block_us`, and checks that
    /// it dispatched `e` through its fd (its poll function never finds work).
    fn iterate(&self, e: &Polled, block_us: u64) {
        e.e.set().unwrap();
        self.block.store(block_us * 1_000, Ordering::Relaxed);
        let before = e.reads.get();
        assert!(self.ctx.poll());
        assert_eq!(e.reads.get(), before + 1, "dispatched by its fd");
    }

    /// Registers an fd-only handler (no poll function, so never in the poll set) whose
    /// readiness ends a blocking poll: see [`wake`](Self::wake).
    fn plain(&self) -> Plain {
        let (writer, s) = UnixStream::pair().unwrap();
        s.set_nonblocking(true).unwrap();
        let reads = Rc::new(Cell::new(0u32));
        let (r, mut reader) = (reads.clone(), s.try_clone().unwrap());
        let handler = self
            .ctx
            .fd_handler(s)
            .on_read(move |_| {
                let mut buf = [0u8; 16];
                assert!(std::io::Read::read(&mut reader, &mut buf).unwrap() > 0);
                r.set(r.get() + 1);
            })
            .register()
            .unwrap();
        Plain {
            writer,
            _handler: handler,
            reads,
        }
    }

    /// Makes `p` readable and runs one blocking iteration whose block time is `block`, which
    /// dispatches `p` (and no poll-set member).
    fn wake(&self, p: &mut Plain, block: Duration) {
        p.writer.write_all(b"x").unwrap();
        self.block.store(block.as_nanos() as u64, Ordering::Relaxed);
        let before = p.reads.get();
        assert!(self.ctx.poll());
        assert_eq!(p.reads.get(), before + 1);
    }

    fn window_of(&self, h: &Polled) -> Option<Duration> {
        let key: HandlerKey = h.handler.key();
        self.ctx
            .stats()
            .poll_set
            .iter()
            .find(|p| p.key == key)
            .map(|p| p.window)
    }
}

/// A polled notifier whose poll function never finds work (so every dispatch is by its fd,
/// and the windows move only with the scripted block times).
fn notifier(ctx: &AioContext) -> Polled {
    Polled::register(ctx, false)
}

const fn us(n: u64) -> Duration {
    Duration::from_micros(n)
}

/// QEMU 10 (docs/qemu-semantics.md §4.3, conformance case 46): 0 → 4 µs on the first block time under the
/// maximum, ×grow while the block time exceeds the window, unchanged while the window covers
/// it, capped at the maximum, reset (shrink 0) or divided (shrink 2) when the block time
/// exceeds the maximum, and back to 0 when the parameters change.
#[test]
fn qemu10_window_grows_covers_caps_shrinks_and_resets() {
    let rig = Rig::new(PollParams::new(us(100)).policy(PollPolicy::Qemu10));
    let h = notifier(&rig.ctx);
    assert_eq!(
        rig.window_of(&h),
        None,
        "not in the poll set before a dispatch"
    );
    let steps: &[(u64, u64)] = &[
        (10, 4),   // joins with 0, grows to the first window
        (10, 8),   // 10 > 4: ×2
        (10, 16),  // 10 > 8: ×2
        (10, 16),  // covered
        (90, 32),  // ×2
        (90, 64),  // ×2
        (90, 100), // 128 capped at the maximum
        (90, 100), // covered
        (100, 100),
        (101, 0), // above the maximum, shrink 0: reset
        (50, 4),  // starts over
    ];
    for (i, &(block, window)) in steps.iter().enumerate() {
        rig.iterate(&h, block);
        assert_eq!(
            rig.window_of(&h),
            Some(us(window)),
            "step {i}: block {block} µs"
        );
        assert_eq!(
            rig.ctx.poll_window(),
            us(window),
            "the context polls for it"
        );
    }
    assert!(h.polls.get() > 0, "the non-zero windows were polled");
    assert_eq!(h.readies.get(), 0, "polling never found work");
    assert_eq!(
        h.begins.get(),
        h.ends.get(),
        "polling mode left before each sleep"
    );

    // Shrink 2 divides instead; new parameters reset every window first.
    rig.ctx
        .set_poll_params(
            PollParams::new(us(100))
                .policy(PollPolicy::Qemu10)
                .shrink(2),
        )
        .unwrap();
    assert_eq!(
        rig.ctx.poll_window(),
        us(4),
        "parameters apply from the next iteration"
    );
    let steps: &[(u64, u64)] = &[(10, 4), (60, 8), (60, 16), (60, 32), (60, 64), (200, 32)];
    for (i, &(block, window)) in steps.iter().enumerate() {
        rig.iterate(&h, block);
        assert_eq!(rig.window_of(&h), Some(us(window)), "shrink 2, step {i}");
    }
    // Grow 4.
    rig.ctx
        .set_poll_params(PollParams::new(us(100)).policy(PollPolicy::Qemu10).grow(4))
        .unwrap();
    for (i, &(block, window)) in [(10, 4), (10, 16), (50, 64), (90, 100)].iter().enumerate() {
        rig.iterate(&h, block);
        assert_eq!(rig.window_of(&h), Some(us(window)), "grow 4, step {i}");
    }
}

/// A slow handler's block times reset its own window only: the context keeps polling for the
/// fast handler's.
#[test]
fn qemu10_a_slow_handler_leaves_a_fast_ones_window_alone() {
    let rig = Rig::new(PollParams::new(us(100)).policy(PollPolicy::Qemu10));
    let fast = notifier(&rig.ctx);
    let slow = notifier(&rig.ctx);
    for _ in 0..3 {
        rig.iterate(&fast, 10);
    }
    assert_eq!(rig.window_of(&fast), Some(us(16)));
    for _ in 0..3 {
        rig.iterate(&slow, 500);
    }
    assert_eq!(rig.window_of(&slow), Some(us(0)));
    assert_eq!(rig.window_of(&fast), Some(us(16)));
    assert_eq!(
        rig.ctx.poll_window(),
        us(16),
        "the largest window of the poll set"
    );
}

/// The 2026 weighted policy (`poll-weight`): the first event sets a member's estimate to the
/// block time, later ones move it by 1/2^weight of the difference; the context's window jumps
/// to an estimate more than `grow` times above it, else grows ×grow (capped), and halves when
/// the estimate falls under half of it; a member without events accumulates block time and
/// decays to 0 past the maximum.
#[test]
fn weighted_window_follows_the_estimate_and_idle_members_decay() {
    let rig = Rig::new(PollParams::new(us(100)).policy(PollPolicy::Weighted { weight: 2 }));
    let a = notifier(&rig.ctx);
    let b = notifier(&rig.ctx);
    // a: estimate 10; window 0 → 10 (jump to the estimate).
    rig.iterate(&a, 10);
    assert_eq!(rig.window_of(&a), Some(us(10)));
    assert_eq!(rig.ctx.poll_window(), us(10));
    // a: 10 - 10/4 + 30/4 = 15 > 10 but not above 2 × 10: window ×2 = 20.
    rig.iterate(&a, 30);
    assert_eq!(rig.window_of(&a), Some(Duration::from_nanos(15_000)));
    assert_eq!(rig.ctx.poll_window(), us(20));
    // a: 15 - 3.75 + 0.5 = 11.75, not under 20 / 2: the window stays.
    rig.iterate(&a, 2);
    assert_eq!(rig.window_of(&a), Some(Duration::from_nanos(11_750)));
    assert_eq!(rig.ctx.poll_window(), us(20));
    // a: 11.75 - 2.9375 + 0.25 = 9.0625 < 10: the window halves.
    rig.iterate(&a, 1);
    assert_eq!(rig.window_of(&a), Some(Duration::from_nanos(9_063)));
    assert_eq!(rig.ctx.poll_window(), us(10));
    // b joins with estimate 40 (> 2 × 10: the window jumps to it); a, idle in that iteration,
    // accumulates the block time: 9.063 + 40.
    rig.iterate(&b, 40);
    assert_eq!(rig.window_of(&b), Some(us(40)));
    assert_eq!(rig.window_of(&a), Some(Duration::from_nanos(49_063)));
    assert_eq!(rig.ctx.poll_window(), us(40));
    // b again (40 - 10 + 10 = 40): a decays past the maximum to 0.
    rig.iterate(&b, 40);
    assert_eq!(rig.window_of(&a), Some(Duration::from_nanos(89_063)));
    rig.iterate(&b, 40);
    assert_eq!(rig.window_of(&a), Some(us(0)), "idle past the maximum: 0");
    assert_eq!(rig.window_of(&b), Some(us(40)));
    // An estimate that reaches the maximum resets to 0; the window shrinks as the estimate
    // stays under half of it.
    rig.iterate(&b, 400);
    assert_eq!(rig.window_of(&b), Some(us(0)));
    assert_eq!(rig.ctx.poll_window(), us(20));
    // Iterations in which no member has an event (here an fd-only handler's) halve the
    // window: a loop woken only by such things decays to a plain blocking wait.
    let mut plain = rig.plain();
    for window in [10, 5] {
        rig.wake(&mut plain, us(1));
        assert_eq!(rig.ctx.poll_window(), us(window));
    }
    // Without members, the window is 0 at once.
    drop((a, b));
    assert_eq!(rig.ctx.poll_window(), Duration::ZERO);
}

/// QEMU `POLL_IDLE_INTERVAL_NS`: a member that polling has not found ready for 7 s of the
/// context's clock leaves the poll set (with `on_poll_end` when in polling mode) and joins
/// again on its next fd dispatch, with a fresh window.
#[test]
fn an_idle_member_leaves_the_poll_set_after_7_s_and_rejoins_on_its_next_dispatch() {
    let rig = Rig::new(PollParams::new(Duration::from_secs(60)).policy(PollPolicy::Qemu10));
    let h = notifier(&rig.ctx);
    // An fd-only handler whose readiness ends each blocking poll below.
    let mut plain = rig.plain();
    let mut wake = |block: Duration| rig.wake(&mut plain, block);

    rig.iterate(&h, 1);
    assert_eq!(rig.window_of(&h), Some(us(4)), "joined on its fd dispatch");
    // The first polling phase starts its idle clock; it finds nothing, and polling mode is
    // left before the sleep.
    wake(Duration::from_millis(6_999));
    assert!(h.polls.get() >= 1);
    assert_eq!((h.begins.get(), h.ends.get()), (1, 1));
    // The next phase comes 6.999 s after the one that started the idle clock: it stays.
    wake(Duration::from_millis(1));
    assert!(
        rig.window_of(&h).is_some(),
        "idle for 6.999 s: still in the set"
    );
    assert_eq!((h.begins.get(), h.ends.get()), (2, 2));
    // The next one, 7 s after: it leaves, with on_poll_end.
    wake(Duration::from_millis(1));
    assert_eq!(rig.window_of(&h), None, "left the poll set");
    assert_eq!((h.begins.get(), h.ends.get()), (3, 3));
    assert_eq!(
        rig.ctx.poll_window(),
        Duration::ZERO,
        "the poll set is empty"
    );
    let polls = h.polls.get();
    wake(Duration::from_millis(1));
    assert_eq!(h.polls.get(), polls, "no longer polled");
    // Its next fd dispatch brings it back, with a fresh window.
    rig.iterate(&h, 1);
    assert_eq!(rig.window_of(&h), Some(us(4)));
}

/// A member that polls in the backend (`poll_in_backend`, io_uring) is never found ready by a
/// poll function, so its fd dispatches are what keep it in the poll set: each one restarts its
/// 7 s, and it leaves 7 s after the first polling phase that follows its last dispatch.
#[cfg(target_os = "linux")]
#[test]
fn a_member_polling_in_the_backend_stays_while_dispatched_and_leaves_7_s_after() {
    let inner = match fdmon_uring::UringMonitor::new() {
        Ok(m) => m,
        Err(e) => {
            println!("skipped: no io_uring here ({e})");
            return;
        }
    };
    let clock = VirtualClock::new();
    let block = Arc::new(AtomicU64::new(0));
    let monitor = Scripted {
        inner,
        clock: clock.clone(),
        block: block.clone(),
    };
    let clocks = GroupBuilder::new().manual_clock(ClockType::Realtime, clock);
    let ctx = AioContext::with_clocks(Box::new(monitor), clocks).unwrap();
    ctx.set_poll_params(PollParams::new(Duration::from_secs(60)).policy(PollPolicy::Qemu10))
        .unwrap();
    // Two sockets: `member` polls in the backend, `plain` is fd-only.
    let socket = |backend: bool| {
        let (writer, s) = UnixStream::pair().unwrap();
        s.set_nonblocking(true).unwrap();
        let reads = Rc::new(Cell::new(0u32));
        let (r, mut reader) = (reads.clone(), s.try_clone().unwrap());
        let mut b = ctx.fd_handler(s).on_read(move |_| {
            let mut buf = [0u8; 16];
            assert!(std::io::Read::read(&mut reader, &mut buf).unwrap() > 0);
            r.set(r.get() + 1);
        });
        if backend {
            b = b.poll_in_backend();
        }
        (writer, b.register().unwrap(), reads)
    };
    let (mut member_w, member, member_reads) = socket(true);
    let (plain_w, _plain, plain_reads) = socket(false);
    let in_set = || ctx.stats().poll_set.iter().any(|p| p.key == member.key());
    // One blocking poll that `w` ends with a byte written 20 ms in (so that a polling phase
    // runs first, with nothing in the ring), its wait advancing the clock by `block_time`.
    let wake = |w: &UnixStream, reads: &Rc<Cell<u32>>, block_time: Duration| {
        let mut writer = w.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            writer.write_all(b"x").unwrap();
        });
        // The clock moves in the first wait only, should the byte take more than one poll.
        block.store(block_time.as_nanos() as u64, Ordering::Relaxed);
        let before = reads.get();
        ctx.poll();
        block.store(0, Ordering::Relaxed);
        while reads.get() == before {
            ctx.poll();
        }
        t.join().unwrap();
    };
    let ms = Duration::from_millis;
    member_w.write_all(b"x").unwrap();
    block.store(1_000, Ordering::Relaxed);
    assert!(ctx.poll());
    assert_eq!(member_reads.get(), 1);
    assert!(in_set(), "joined on its fd dispatch");
    // The first phase starts its idle clock.
    wake(&plain_w, &plain_reads, ms(6_999));
    let phases = ctx.stats().poll_misses;
    assert!(phases >= 1, "a polling phase ran");
    // Dispatched again, 7 s after its idle clock started: the dispatch restarts it.
    wake(&member_w, &member_reads, ms(1));
    assert!(in_set(), "a dispatch keeps it");
    wake(&plain_w, &plain_reads, ms(6_999));
    wake(&plain_w, &plain_reads, ms(1));
    assert!(
        in_set(),
        "6.999 s after the phase that restarted its clock: still in"
    );
    wake(&plain_w, &plain_reads, ms(1));
    assert!(!in_set(), "7 s without a dispatch: left the poll set");
    assert_eq!(ctx.poll_window(), Duration::ZERO, "the poll set is empty");
    // Its next dispatch brings it back.
    wake(&member_w, &member_reads, ms(1));
    assert!(in_set(), "rejoined on its next dispatch");
    drop(member_w);
}
