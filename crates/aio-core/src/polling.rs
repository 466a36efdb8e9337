//! Adaptive userspace polling: the parameters ([`PollParams`], [`PollPolicy`]), their
//! cross-thread storage, and the window arithmetic of both policies, as pure functions of the
//! measured block time so that they can be tested without a clock.
//!
//! C original: `aio_context_set_poll_params`, `adjust_polling_time` (QEMU 10.0, one window per
//! handler, docs/qemu-semantics.md §4.3) and `adjust_block_ns` / `grow_polling_time` / `shrink_polling_time`
//! (the 2026 weighted refinement) in `util/aio-posix.c`. The loop that calls them (when to
//! poll, for how long, what a hit does) is in `context/poll_mode.rs`.
//!
//! # The two policies
//!
//! * [`PollPolicy::Qemu10`]: each handler in the poll set has its own window. After an
//!   iteration that dispatched it, with `block` the time from the start of the iteration to the
//!   end of its wait: if `block <= window`, nothing changes; if `block > max`, the window is
//!   divided by `shrink` (0 means reset to 0); otherwise, if the window is below `max`, it
//!   grows: 0 becomes 4 µs, anything else is multiplied by `grow` (0 means 2), capped at
//!   `max`. The context polls for the largest window of its poll set.
//! * [`PollPolicy::Weighted`]: each handler keeps an exponentially weighted estimate of the
//!   block time (`est += (block - est) / 2^weight`, the first event sets it to `block`); an
//!   estimate that reaches `max` resets to 0, and a handler with no event accumulates the
//!   block time until it passes `max` and drops to 0 (it decays). The context keeps one window:
//!   when the largest estimate of the handlers that had an event exceeds it, the window grows
//!   (to that estimate if it is more than `grow` times the window, else times `grow`, capped at
//!   `max`); otherwise it is divided by `shrink` (0 means 2) if the estimate is below
//!   `window / shrink`. An iteration in which no member had an event divides the window by
//!   `shrink` (so a loop woken only by timers or BHs decays to a plain blocking wait), and an
//!   empty poll set has a window of 0.

use crate::sync::{Ordering, SettingU64 as AtomicU64};
use std::fmt;
use std::io;
use std::time::Duration;

/// The first window of a handler that starts polling (QEMU: 4 µs).
pub(crate) const FIRST_WINDOW_NS: u64 = 4_000;
/// A handler that has not been found ready by polling for this long leaves the poll set (QEMU
/// `POLL_IDLE_INTERVAL_NS`).
pub(crate) const IDLE_INTERVAL_NS: u64 = 7_000_000_000;
/// QEMU's default weight (`POLL_WEIGHT_SHIFT`): the newest block time counts for 1/4.
pub const DEFAULT_WEIGHT: u8 = 2;
/// The largest `max` that [`PollParams`] accepts: 2^40 ns, about 18 minutes.
pub const MAX_POLL_NS: u64 = (1 << 40) - 1;
/// The largest weight (a shift) that [`PollPolicy::Weighted`] accepts.
pub const MAX_WEIGHT: u8 = 30;

/// How the polling windows adapt to the measured block time; see [`PollParams`].
///
/// The default is `Weighted { weight: DEFAULT_WEIGHT }`, as in QEMU since 2026: in B3 and B8
/// (BENCHMARKS.md, "Adaptive polling") both policies give the same median latency, and the
/// weighted one the shorter tails at QEMU's 32 µs maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PollPolicy {
    /// QEMU 10.0: one window per handler, grown and shrunk from the block time; the context
    /// polls for the largest (docs/qemu-semantics.md §4.3).
    Qemu10,
    /// QEMU 2026 (`poll-weight`), the default: an exponentially weighted block time per
    /// handler, idle handlers decaying to 0 past `max`, and one context window steered by the
    /// largest estimate. `weight` is the shift of the average (0 means [`DEFAULT_WEIGHT`]).
    Weighted {
        /// The newest block time counts for `1 / 2^weight` of the estimate.
        weight: u8,
    },
}

impl Default for PollPolicy {
    fn default() -> Self {
        PollPolicy::Weighted {
            weight: DEFAULT_WEIGHT,
        }
    }
}

/// The adaptive-polling parameters of a context (QEMU `aio_context_set_poll_params`, the
/// IOThread properties `poll-max-ns`, `poll-grow`, `poll-shrink`, `poll-weight`).
///
/// The default, [`PollParams::disabled`], never polls: a context sleeps in its backend at once,
/// as QEMU's plain contexts do. QEMU's IOThreads use a 32 µs maximum.
///
/// ```
/// use aio_core::{PollParams, PollPolicy};
/// use std::time::Duration;
///
/// let p = PollParams::new(Duration::from_micros(32)).grow(4).shrink(2);
/// assert_eq!(p.max(), Duration::from_micros(32));
/// let w = p.policy(PollPolicy::Weighted { weight: 3 });
/// assert_eq!(w.get_policy(), PollPolicy::Weighted { weight: 3 });
/// assert!(PollParams::disabled().is_disabled());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct PollParams {
    max_ns: u64,
    grow: u8,
    shrink: u8,
    policy: PollPolicy,
    yields: bool,
}

impl PollParams {
    /// No polling (a maximum of 0): the default.
    pub const fn disabled() -> Self {
        PollParams {
            max_ns: 0,
            grow: 0,
            shrink: 0,
            policy: PollPolicy::Qemu10,
            yields: false,
        }
    }

    /// Polls for at most `max` per iteration, with QEMU's defaults for the rest (grow 2, the
    /// policy's default shrink, [`PollPolicy::default`], the weighted one). A `max` of zero
    /// disables polling; one above [`MAX_POLL_NS`] is refused when the parameters are set.
    pub fn new(max: Duration) -> Self {
        PollParams {
            max_ns: u64::try_from(max.as_nanos()).unwrap_or(u64::MAX),
            policy: PollPolicy::Weighted {
                weight: DEFAULT_WEIGHT,
            },
            ..Self::disabled()
        }
    }

    /// The same parameters with another maximum (an operator's override of `poll-max-ns`).
    pub const fn with_max(mut self, max_ns: u64) -> Self {
        self.max_ns = max_ns;
        self
    }

    /// The growth factor of a window (0, the default, means 2).
    pub const fn grow(mut self, grow: u8) -> Self {
        self.grow = grow;
        self
    }

    /// The shrink divisor of a window (0, the default, means "reset to 0" for
    /// [`PollPolicy::Qemu10`] and 2 for [`PollPolicy::Weighted`]).
    pub const fn shrink(mut self, shrink: u8) -> Self {
        self.shrink = shrink;
        self
    }

    /// The adaptation policy.
    pub const fn policy(mut self, policy: PollPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Whether the busy loop gives up the CPU (`sched_yield`) after each round that found
    /// nothing (default: no, as QEMU, whose loop spins). A yielding loop lets the threads that
    /// share its CPU run while it polls (its own thread pool's workers, a client on a machine
    /// with few CPUs), at the price of a system call per round, which returns at once when
    /// nothing else wants the CPU. The window and its adaptation are the same. A yield that
    /// gives the CPU away for 200 µs or more (a scheduler slice: the machine is busy with other
    /// work) ends the phase, and the context then waits without busy-polling for 10 ms (doubled
    /// by each such yield, up to 160 ms, until a yield returns sooner), since
    /// an event that arrives while its thread waits for a CPU waits with it, where a thread
    /// blocked in the backend is woken for it ([`Stats::poll_contended`](crate::Stats) counts
    /// these).
    pub const fn yielding(mut self, yields: bool) -> Self {
        self.yields = yields;
        self
    }

    /// The longest polling window.
    pub const fn max(&self) -> Duration {
        Duration::from_nanos(self.max_ns)
    }

    /// The growth factor as given (0 means 2).
    pub const fn get_grow(&self) -> u8 {
        self.grow
    }

    /// The shrink divisor as given (0 means the policy's default).
    pub const fn get_shrink(&self) -> u8 {
        self.shrink
    }

    /// The adaptation policy.
    pub const fn get_policy(&self) -> PollPolicy {
        self.policy
    }

    /// Whether the busy loop yields the CPU between rounds ([`yielding`](Self::yielding)).
    pub const fn is_yielding(&self) -> bool {
        self.yields
    }

    /// Whether polling is off (a maximum of 0).
    pub const fn is_disabled(&self) -> bool {
        self.max_ns == 0
    }

    /// Checks the parameters.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a maximum above [`MAX_POLL_NS`] or a weight above [`MAX_WEIGHT`].
    pub fn validate(&self) -> io::Result<()> {
        if self.max_ns > MAX_POLL_NS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("poll max {} ns is above {MAX_POLL_NS} ns", self.max_ns),
            ));
        }
        if let PollPolicy::Weighted { weight } = self.policy
            && weight > MAX_WEIGHT
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("poll weight {weight} is above {MAX_WEIGHT}"),
            ));
        }
        Ok(())
    }

    /// Packs valid parameters into one word: max (40 bits), grow, shrink (8 each), the policy
    /// tag (1), weight (6) and whether the loop yields (1).
    fn pack(&self) -> u64 {
        let (tag, weight) = match self.policy {
            PollPolicy::Qemu10 => (0u64, 0u64),
            PollPolicy::Weighted { weight } => (1, u64::from(weight)),
        };
        self.max_ns
            | (u64::from(self.grow) << 40)
            | (u64::from(self.shrink) << 48)
            | (tag << 56)
            | (weight << 57)
            | (u64::from(self.yields) << 63)
    }

    fn unpack(word: u64) -> Self {
        let policy = if (word >> 56) & 1 == 0 {
            PollPolicy::Qemu10
        } else {
            PollPolicy::Weighted {
                weight: ((word >> 57) & 0x3f) as u8,
            }
        };
        PollParams {
            max_ns: word & MAX_POLL_NS,
            grow: (word >> 40) as u8,
            shrink: (word >> 48) as u8,
            policy,
            yields: word >> 63 == 1,
        }
    }

    fn grow_factor(&self) -> u64 {
        if self.grow == 0 {
            2
        } else {
            u64::from(self.grow)
        }
    }

    fn weight_shift(&self) -> u32 {
        match self.policy {
            PollPolicy::Weighted { weight: 0 } | PollPolicy::Qemu10 => u32::from(DEFAULT_WEIGHT),
            PollPolicy::Weighted { weight } => u32::from(weight),
        }
    }
}

impl fmt::Debug for PollParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PollParams")
            .field("max", &self.max())
            .field("grow", &self.grow)
            .field("shrink", &self.shrink)
            .field("policy", &self.policy)
            .field("yields", &self.yields)
            .finish()
    }
}

/// The parameters as other threads set them: one packed word and a generation that the home
/// thread compares with the last one it applied.
#[derive(Debug)]
pub(crate) struct SharedParams {
    word: AtomicU64,
    generation: AtomicU64,
}

impl SharedParams {
    pub(crate) fn new() -> Self {
        SharedParams {
            word: AtomicU64::new(PollParams::disabled().pack()),
            generation: AtomicU64::new(0),
        }
    }

    /// Stores valid parameters (any thread). The caller notifies the loop afterwards.
    pub(crate) fn set(&self, params: PollParams) {
        // Release: pairs with the acquire load in `load`; one word, so never torn.
        self.word.store(params.pack(), Ordering::Release);
        // Release: a home thread that sees the new generation also sees the word above.
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub(crate) fn get(&self) -> PollParams {
        // Acquire: pairs with the release store in `set`.
        PollParams::unpack(self.word.load(Ordering::Acquire))
    }

    /// The current generation (home thread, once per iteration).
    pub(crate) fn generation(&self) -> u64 {
        // Acquire: pairs with the release increment in `set`, so `get` afterwards reads that
        // setter's word or a later one.
        self.generation.load(Ordering::Acquire)
    }
}

/// The polling state of one handler (QEMU `AioPolledEvent`): its window (Qemu10) or its
/// estimated block time (Weighted), and whether it had an event in this iteration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) ns: u64,
    pub(crate) has_event: bool,
}

/// [`PollPolicy::Qemu10`]: adjusts one dispatched handler's window from the iteration's block
/// time (QEMU `adjust_polling_time`). Returns the old and new window when it changed.
pub(crate) fn adjust_qemu10(p: &PollParams, ns: &mut u64, block_ns: u64) -> Option<(u64, u64)> {
    let old = *ns;
    let max = p.max_ns;
    if block_ns <= old {
        // The window covers the block time: leave it.
    } else if block_ns > max {
        *ns = match p.shrink {
            0 => 0,
            s => old / u64::from(s),
        };
    } else if old < max && block_ns < max {
        let grown = if old == 0 {
            FIRST_WINDOW_NS
        } else {
            old.saturating_mul(p.grow_factor())
        };
        *ns = grown.min(max);
    }
    (old != *ns).then_some((old, *ns))
}

/// [`PollPolicy::Weighted`]: updates every member's estimate after an iteration and steers the
/// context window `ctx_ns` (QEMU `adjust_block_ns`). Returns the old and new context window
/// when it changed.
pub(crate) fn adjust_weighted<'a>(
    p: &PollParams,
    ctx_ns: &mut u64,
    members: impl Iterator<Item = &'a mut Window>,
    block_ns: u64,
) -> Option<(u64, u64)> {
    let max = p.max_ns;
    let shift = p.weight_shift();
    let mut largest: Option<u64> = None;
    let mut any = false;
    for w in members {
        any = true;
        if w.has_event {
            w.ns = if w.ns == 0 {
                block_ns
            } else {
                w.ns - (w.ns >> shift) + (block_ns >> shift)
            };
            if w.ns >= max {
                w.ns = 0;
            }
            largest = Some(largest.map_or(w.ns, |l| l.max(w.ns)));
            w.has_event = false;
        } else if w.ns != 0 {
            // Idle since its last event: the time keeps adding up until it passes `max`.
            w.ns = w.ns.saturating_add(block_ns);
            if w.ns >= max {
                w.ns = 0;
            }
        }
    }
    let old = *ctx_ns;
    let shrink = if p.shrink == 0 {
        2
    } else {
        u64::from(p.shrink)
    };
    let Some(est) = largest else {
        // No member had an event (a timer, a BH, a handler outside the set): the window
        // decays, so that a loop woken only by such things stops polling; an empty set has
        // nothing to poll at all.
        *ctx_ns = if any { old / shrink } else { 0 };
        return (old != *ctx_ns).then_some((old, *ctx_ns));
    };
    if est > old {
        let grow = p.grow_factor();
        *ctx_ns = if est > old.saturating_mul(grow) {
            est
        } else {
            old.saturating_mul(grow)
        }
        .min(max);
    } else if est < old / shrink {
        *ctx_ns = old / shrink;
    }
    (old != *ctx_ns).then_some((old, *ctx_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu10(max: u64, grow: u8, shrink: u8) -> PollParams {
        PollParams::new(Duration::from_nanos(max))
            .grow(grow)
            .shrink(shrink)
    }

    #[test]
    fn params_round_trip_through_the_packed_word() {
        for p in [
            PollParams::disabled(),
            qemu10(32_768, 0, 0),
            qemu10(MAX_POLL_NS, 255, 255),
            qemu10(1_000_000, 2, 2).policy(PollPolicy::Weighted { weight: 0 }),
            qemu10(7, 3, 4).policy(PollPolicy::Weighted { weight: MAX_WEIGHT }),
            qemu10(MAX_POLL_NS, 255, 255)
                .policy(PollPolicy::Weighted { weight: MAX_WEIGHT })
                .yielding(true),
            qemu10(32_768, 0, 0).yielding(true),
        ] {
            p.validate().unwrap();
            assert_eq!(PollParams::unpack(p.pack()), p);
            let q = p.with_max(5_000);
            assert_eq!(q.max(), Duration::from_nanos(5_000));
            assert_eq!(q.with_max(p.max().as_nanos() as u64), p);
        }
    }

    #[test]
    fn bad_params_are_refused() {
        let too_long = PollParams::new(Duration::from_nanos(MAX_POLL_NS + 1));
        assert_eq!(
            too_long.validate().unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let heavy = qemu10(1000, 0, 0).policy(PollPolicy::Weighted {
            weight: MAX_WEIGHT + 1,
        });
        assert_eq!(
            heavy.validate().unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(PollParams::new(Duration::MAX).max_ns, u64::MAX);
        assert!(PollParams::new(Duration::MAX).validate().is_err());
    }

    #[test]
    fn qemu10_grows_from_4us_by_the_factor_up_to_the_cap() {
        let p = qemu10(100_000, 0, 0);
        let mut ns = 0;
        let mut seen = vec![];
        for _ in 0..8 {
            adjust_qemu10(&p, &mut ns, 99_999);
            seen.push(ns);
        }
        assert_eq!(
            seen,
            [
                4_000, 8_000, 16_000, 32_000, 64_000, 100_000, 100_000, 100_000
            ]
        );
        let p3 = qemu10(1_000_000, 3, 0);
        let mut ns = 0;
        adjust_qemu10(&p3, &mut ns, 500_000);
        adjust_qemu10(&p3, &mut ns, 500_000);
        assert_eq!(ns, 12_000);
    }

    #[test]
    fn qemu10_keeps_a_window_that_covers_the_block_time() {
        let p = qemu10(100_000, 2, 2);
        let mut ns = 16_000;
        assert_eq!(adjust_qemu10(&p, &mut ns, 16_000), None);
        assert_eq!(adjust_qemu10(&p, &mut ns, 3), None);
        assert_eq!(ns, 16_000);
        // A block time of exactly max grows neither (QEMU: "< max" to grow, "> max" to shrink).
        assert_eq!(adjust_qemu10(&p, &mut ns, 100_000), None);
    }

    #[test]
    fn qemu10_shrinks_by_the_divisor_or_resets() {
        let halve = qemu10(100_000, 2, 2);
        let mut ns = 64_000;
        assert_eq!(
            adjust_qemu10(&halve, &mut ns, 100_001),
            Some((64_000, 32_000))
        );
        for _ in 0..20 {
            adjust_qemu10(&halve, &mut ns, 5_000_000);
        }
        assert_eq!(ns, 0, "repeated halving decays to 0: plain blocking");
        let reset = qemu10(100_000, 2, 0);
        let mut ns = 64_000;
        assert_eq!(adjust_qemu10(&reset, &mut ns, 100_001), Some((64_000, 0)));
    }

    #[test]
    fn qemu10_at_the_cap_does_not_grow_past_it() {
        let p = qemu10(10_000, 4, 2);
        let mut ns = 8_000;
        assert_eq!(adjust_qemu10(&p, &mut ns, 9_000), Some((8_000, 10_000)));
        assert_eq!(adjust_qemu10(&p, &mut ns, 9_999), None);
    }

    fn weighted(max: u64, weight: u8) -> PollParams {
        qemu10(max, 0, 0).policy(PollPolicy::Weighted { weight })
    }

    #[test]
    fn weighted_first_event_sets_the_estimate_and_the_window() {
        let p = weighted(1_000_000, 2);
        let mut ctx = 0;
        let mut w = [Window {
            ns: 0,
            has_event: true,
        }];
        assert_eq!(
            adjust_weighted(&p, &mut ctx, w.iter_mut(), 40_000),
            Some((0, 40_000))
        );
        assert_eq!(
            w[0],
            Window {
                ns: 40_000,
                has_event: false
            }
        );
    }

    #[test]
    fn weighted_average_uses_the_shift() {
        let p = weighted(1_000_000, 2);
        let mut ctx = 40_000;
        let mut w = [Window {
            ns: 40_000,
            has_event: true,
        }];
        // 40000 - 10000 + 80000 / 4 = 50000; 50000 <= 2 * 40000, so the window doubles.
        adjust_weighted(&p, &mut ctx, w.iter_mut(), 80_000);
        assert_eq!((w[0].ns, ctx), (50_000, 80_000));
        // A shift of 1 weighs the newest block time by half: 50000 - 25000 + 10000 = 35000;
        // 35000 is below 80000 / 2 (the default shrink), so the window halves.
        let p1 = weighted(1_000_000, 1);
        w[0].has_event = true;
        adjust_weighted(&p1, &mut ctx, w.iter_mut(), 20_000);
        assert_eq!((w[0].ns, ctx), (35_000, 40_000));
        // 35000 - 17500 + 20000 = 37500: not below 40000 / 2, so the window stays.
        w[0].has_event = true;
        assert_eq!(adjust_weighted(&p1, &mut ctx, w.iter_mut(), 40_000), None);
        assert_eq!((w[0].ns, ctx), (37_500, 40_000));
        // Weight 0 means the default shift of 2.
        let p0 = weighted(1_000_000, 0);
        let mut ctx0 = 0;
        let mut w0 = [Window {
            ns: 400,
            has_event: true,
        }];
        adjust_weighted(&p0, &mut ctx0, w0.iter_mut(), 800);
        assert_eq!(w0[0].ns, 500);
    }

    #[test]
    fn weighted_shrinks_when_the_estimate_falls_below_window_over_shrink() {
        let p = weighted(1_000_000, 2).shrink(4);
        let mut ctx = 400_000;
        let mut w = [Window {
            ns: 80_000,
            has_event: true,
        }];
        // 80000 - 20000 + 0 = 60000 < 400000 / 4: divided by 4.
        assert_eq!(
            adjust_weighted(&p, &mut ctx, w.iter_mut(), 0),
            Some((400_000, 100_000))
        );
    }

    #[test]
    fn weighted_idle_handlers_decay_to_zero_past_max() {
        let p = weighted(100_000, 2);
        let mut ctx = 50_000;
        let mut w = [
            Window {
                ns: 30_000,
                has_event: false,
            },
            Window {
                ns: 0,
                has_event: false,
            },
        ];
        assert_eq!(
            adjust_weighted(&p, &mut ctx, w.iter_mut(), 60_000),
            Some((50_000, 25_000)),
            "no event: the context window decays"
        );
        assert_eq!((w[0].ns, w[1].ns), (90_000, 0), "idle time accumulates");
        adjust_weighted(&p, &mut ctx, w.iter_mut(), 10_000);
        assert_eq!(w[0].ns, 0, "past max: reset");
        assert_eq!(ctx, 12_500);
    }

    #[test]
    fn weighted_window_decays_without_events_and_is_0_without_members() {
        let p = PollParams::new(Duration::from_nanos(100_000))
            .policy(PollPolicy::Weighted { weight: 2 });
        let mut ctx = 20_000;
        let mut members = [Window {
            ns: 1_000,
            has_event: false,
        }];
        let mut seen = Vec::new();
        while ctx != 0 {
            assert_eq!(
                adjust_weighted(&p, &mut ctx, members.iter_mut(), 10).map(|(_, n)| n),
                Some(ctx)
            );
            seen.push(ctx);
            assert!(seen.len() < 20, "decays in a few iterations: {seen:?}");
        }
        assert_eq!(&seen[..3], &[10_000, 5_000, 2_500]);
        // The idle member accumulated the block times meanwhile.
        assert_eq!(members[0].ns, 1_000 + 10 * seen.len() as u64);
        let mut ctx = 20_000;
        assert_eq!(
            adjust_weighted(&p, &mut ctx, [].iter_mut(), 10),
            Some((20_000, 0))
        );
    }

    #[test]
    fn weighted_estimate_at_max_resets_and_caps_the_window() {
        let p = weighted(100_000, 2);
        let mut ctx = 0;
        let mut w = [Window {
            ns: 0,
            has_event: true,
        }];
        adjust_weighted(&p, &mut ctx, w.iter_mut(), 100_000);
        assert_eq!((w[0].ns, ctx), (0, 0));
        w[0] = Window {
            ns: 99_000,
            has_event: true,
        };
        ctx = 10_000;
        // 99000 - 24750 + 24750 = 99000 > 2 * 10000: the window jumps to it, under the cap.
        adjust_weighted(&p, &mut ctx, w.iter_mut(), 99_000);
        assert_eq!(ctx, 99_000);
    }
}
