//! Timers as futures: [`Sleep`] (QEMU `qemu_co_sleep_ns`), [`timeout`] and the clock reading of
//! the current context, on the context's own timer lists (one [`Timer`] per pending sleep).
//!
//! A sleep has a clock ([`ClockType`]) and a nanosecond deadline on it. It is *bound* to a
//! context when its deadline is resolved: at creation by the `AioContext` methods
//! ([`AioContext::sleep`] and friends) and by the free functions called inside a context (in a
//! task or callback), otherwise at its first poll. Binding arms one timer of that context whose
//! callback wakes the last waker the sleep was polled with; dropping the sleep drops the timer,
//! which cancels it (no wake-up, no progress). A sleep made by the free functions follows its
//! task: polled on another context (after [`reschedule`](super::reschedule)), it re-arms there
//! at the same deadline.
//!
//! A sleep completes when its timer fires, that is when the loop's reading of the clock reaches
//! the deadline (a deadline already passed when the sleep is bound completes at once). On a
//! [`VirtualClock`](crate::VirtualClock) this is exact and deterministic: the sleep completes in
//! the first iteration after the clock is advanced to the deadline, and never before.

use crate::context::{AioContext, ContextHandle};
use crate::sync::{Arc, AtomicBool, Mutex, Ordering, lock};
use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use timers::{ClockType, Scale, Timer};

/// What a sleep shares with its timer's callback.
struct Fired {
    fired: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Fired {
    fn new() -> Arc<Fired> {
        Arc::new(Fired {
            fired: AtomicBool::new(false),
            waker: Mutex::new(None),
        })
    }

    fn fire(&self) {
        // Release pairs with the Acquire in `Sleep::poll`: the sleep that sees the flag sees
        // the timer's run.
        self.fired.store(true, Ordering::Release);
        let waker = lock(&self.waker).take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn has_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }
}

/// When a sleep ends, before and after it is bound.
#[derive(Debug, Clone, Copy)]
enum When {
    /// This long after the clock's reading at binding time.
    After(Duration),
    /// At this reading of the clock, in nanoseconds.
    At(u64),
}

/// The context a sleep's timer lives on.
struct Bound {
    ctx: ContextHandle,
    /// Armed at the deadline; dropping it cancels it.
    _timer: Timer,
}

/// A future that completes once a clock reaches a deadline; made by [`sleep`], [`sleep_on`],
/// [`sleep_until`], [`AioContext::sleep`], [`AioContext::sleep_on`] and
/// [`AioContext::sleep_until`].
///
/// It is `Send` and `Unpin`; it may be polled from any task or from [`AioContext::block_on`].
/// Dropping it cancels its timer. Polled again after it completed, it is ready again.
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use std::time::{Duration, Instant};
/// let start = Instant::now();
/// ctx.block_on(ctx.sleep(Duration::from_millis(2)));
/// assert!(start.elapsed() >= Duration::from_millis(2));
/// # Ok::<(), std::io::Error>(())
/// ```
#[must_use = "futures do nothing unless awaited"]
pub struct Sleep {
    clock: ClockType,
    when: When,
    /// Whether to bind to the context polling it (the free functions).
    follow_current: bool,
    bound: Option<Bound>,
    shared: Arc<Fired>,
    done: bool,
}

impl Sleep {
    fn unbound(clock: ClockType, when: When) -> Sleep {
        let mut sleep = Sleep {
            clock,
            when,
            follow_current: true,
            bound: None,
            shared: Fired::new(),
            done: false,
        };
        if let Some(ctx) = AioContext::current() {
            sleep.bind(&ctx);
        }
        sleep
    }

    fn bound_to(ctx: &AioContext, clock: ClockType, when: When) -> Sleep {
        let mut sleep = Sleep {
            clock,
            when,
            follow_current: false,
            bound: None,
            shared: Fired::new(),
            done: false,
        };
        sleep.bind(ctx);
        sleep
    }

    /// Resolves the deadline on `ctx`'s clock and arms a timer there (replacing any timer on
    /// another context), or completes the sleep if the deadline has passed.
    fn bind(&mut self, ctx: &AioContext) {
        let timers = ctx.timers();
        let now = timers.now_ns(self.clock);
        let deadline = match self.when {
            When::At(ns) => ns,
            When::After(d) => now.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        };
        self.when = When::At(deadline);
        if deadline <= now && timers.is_enabled(self.clock) {
            self.done = true;
            self.bound = None;
            return;
        }
        let shared = self.shared.clone();
        let timer = ctx.timer(self.clock, Scale::NS, move || shared.fire());
        timer.arm_ns(deadline);
        // The old timer, if any, is cancelled by this drop.
        self.bound = Some(Bound {
            ctx: ctx.handle(),
            _timer: timer,
        });
    }

    /// The clock the sleep measures.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use aio_core::ClockType;
    /// let s = ctx.sleep_on(ClockType::Host, std::time::Duration::from_secs(1));
    /// assert_eq!(s.clock(), ClockType::Host);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn clock(&self) -> ClockType {
        self.clock
    }

    /// The deadline in nanoseconds on [`clock`](Self::clock), once known: `None` for a sleep
    /// made by [`sleep`] or [`sleep_on`] outside any context and not polled yet.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use aio_core::ClockType;
    /// let s = ctx.sleep_until(ClockType::Realtime, 123);
    /// assert_eq!(s.deadline_ns(), Some(123));
    /// let lazy = aio_core::task::time::sleep(std::time::Duration::from_secs(1));
    /// assert_eq!(lazy.deadline_ns(), None); // no context is running here
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn deadline_ns(&self) -> Option<u64> {
        match self.when {
            When::At(ns) => Some(ns),
            When::After(_) => None,
        }
    }

    /// Whether the sleep has completed (its timer fired, or its deadline had passed when it
    /// was bound).
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use aio_core::ClockType;
    /// assert!(ctx.sleep_until(ClockType::Realtime, 0).is_elapsed());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn is_elapsed(&self) -> bool {
        self.done || self.shared.has_fired()
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if this.is_elapsed() {
            this.done = true;
            this.bound = None;
            return Poll::Ready(());
        }
        if this.follow_current {
            let current = AioContext::current();
            match (&this.bound, current) {
                (Some(b), Some(ctx)) if !b.ctx.is_handle_of(&ctx) => this.bind(&ctx),
                (None, Some(ctx)) => this.bind(&ctx),
                (None, None) => panic!(
                    "aio_core::task::time: a sleep made outside any AioContext was polled \
                     outside one too; use AioContext::sleep (or sleep_on, sleep_until) instead"
                ),
                _ => {}
            }
            if this.done {
                this.bound = None;
                return Poll::Ready(());
            }
        }
        {
            let mut slot = lock(&this.shared.waker);
            match &*slot {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *slot = Some(cx.waker().clone()),
            }
        }
        // Checked after the waker is stored: a timer that fires in between finds it.
        if this.shared.has_fired() {
            this.done = true;
            this.bound = None;
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl fmt::Debug for Sleep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sleep")
            .field("clock", &self.clock)
            .field("deadline_ns", &self.deadline_ns())
            .field("elapsed", &self.is_elapsed())
            .finish()
    }
}

/// Sleeps for `delay` on the realtime clock of the context that runs the caller (QEMU
/// `qemu_co_sleep_ns(QEMU_CLOCK_REALTIME, ns)`). The delay counts from this call when it is
/// made inside a context (in a task or callback), otherwise from the first poll.
///
/// # Panics
///
/// The returned [`Sleep`] panics if it is made *and* first polled outside any context (by an
/// executor that is not an aio loop): there is no timer list to arm. Use [`AioContext::sleep`]
/// there. (A task and [`AioContext::block_on`] both poll inside their context.)
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use aio_core::task::time::sleep;
/// use std::time::{Duration, Instant};
/// let task = ctx.spawn(async {
///     let start = Instant::now();
///     sleep(Duration::from_millis(1)).await;
///     start.elapsed()
/// });
/// assert!(ctx.block_on(task).unwrap() >= Duration::from_millis(1));
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn sleep(delay: Duration) -> Sleep {
    Sleep::unbound(ClockType::Realtime, When::After(delay))
}

/// Sleeps for `delay` on `clock` of the context that runs the caller; as [`sleep`] otherwise.
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use aio_core::ClockType;
/// use aio_core::task::time::sleep_on;
/// use std::time::Duration;
/// let task = ctx.spawn(async { sleep_on(ClockType::Host, Duration::from_micros(100)).await });
/// ctx.block_on(task).unwrap();
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn sleep_on(clock: ClockType, delay: Duration) -> Sleep {
    Sleep::unbound(clock, When::After(delay))
}

/// Sleeps until `clock` reads `deadline_ns` (nanoseconds) on the context that runs the caller;
/// a deadline already passed completes at once. Panics as [`sleep`] does.
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use aio_core::ClockType;
/// use aio_core::task::time::{now_ns, sleep_until};
/// let task = ctx.spawn(async {
///     let t = now_ns(ClockType::Realtime).unwrap() + 50_000;
///     sleep_until(ClockType::Realtime, t).await;
///     now_ns(ClockType::Realtime).unwrap() >= t
/// });
/// assert!(ctx.block_on(task).unwrap());
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn sleep_until(clock: ClockType, deadline_ns: u64) -> Sleep {
    Sleep::unbound(clock, When::At(deadline_ns))
}

/// The reading of `clock`, in nanoseconds, of the context this thread is running (QEMU
/// `qemu_clock_get_ns`), or `None` outside any context; outside, use
/// [`AioContext::now_ns`], or [`ContextHandle::now_ns`](crate::ContextHandle::now_ns) from
/// another thread.
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use aio_core::ClockType;
/// use aio_core::task::time::now_ns;
/// assert_eq!(now_ns(ClockType::Realtime), None);
/// let inside = ctx.block_on(ctx.spawn(async { now_ns(ClockType::Realtime) }));
/// assert!(inside.unwrap().is_some());
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn now_ns(clock: ClockType) -> Option<u64> {
    AioContext::current().map(|ctx| ctx.timers().now_ns(clock))
}

/// The error of a [`timeout`] whose deadline came first.
///
/// ```
/// let e = aio_core::task::time::Elapsed::default();
/// assert_eq!(e.to_string(), "deadline has elapsed");
/// assert_eq!(std::io::Error::from(e).kind(), std::io::ErrorKind::TimedOut);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Elapsed(());

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("deadline has elapsed")
    }
}

impl std::error::Error for Elapsed {}

impl From<Elapsed> for std::io::Error {
    fn from(e: Elapsed) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::TimedOut, e)
    }
}

/// Runs `future` until it completes or `sleep` does: `Err(Elapsed)` in the second case, and
/// `future` is dropped. The future is polled first, so one that is ready when the deadline
/// has also passed gives its output.
async fn race<F: Future>(future: F, mut sleep: Sleep) -> Result<F::Output, Elapsed> {
    let mut future = pin!(future);
    poll_fn(|cx| {
        if let Poll::Ready(v) = future.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        match Pin::new(&mut sleep).poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed(()))),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Runs `future` for at most `limit` on the realtime clock: its output, or [`Elapsed`] (and
/// `future` is dropped, which cancels it). The limit is measured as [`sleep`]'s delay is, and
/// it panics as [`sleep`] does. The result is `Send` when `future` is.
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use aio_core::task::time::{sleep, timeout};
/// use std::time::Duration;
/// let task = ctx.spawn(async {
///     let slow = timeout(Duration::from_millis(1), sleep(Duration::from_secs(60))).await;
///     let fast = timeout(Duration::from_secs(60), async { 5 }).await;
///     (slow.is_err(), fast)
/// });
/// assert_eq!(ctx.block_on(task).unwrap(), (true, Ok(5)));
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn timeout<F: Future>(
    limit: Duration,
    future: F,
) -> impl Future<Output = Result<F::Output, Elapsed>> {
    race(future, sleep(limit))
}

/// [`timeout`] on `clock`.
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use aio_core::ClockType;
/// use aio_core::task::time::timeout_on;
/// use std::time::Duration;
/// let task = ctx.spawn(async {
///     timeout_on(ClockType::Host, Duration::from_millis(1), std::future::pending::<()>()).await
/// });
/// assert!(ctx.block_on(task).unwrap().is_err());
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn timeout_on<F: Future>(
    clock: ClockType,
    limit: Duration,
    future: F,
) -> impl Future<Output = Result<F::Output, Elapsed>> {
    race(future, sleep_on(clock, limit))
}

impl AioContext {
    /// A [`Sleep`] of `delay` on this context's realtime clock, counted from now. It never
    /// panics, wherever it is polled; its timer runs on this context.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// ctx.block_on(ctx.sleep(std::time::Duration::from_micros(10)));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn sleep(&self, delay: Duration) -> Sleep {
        Sleep::bound_to(self, ClockType::Realtime, When::After(delay))
    }

    /// A [`Sleep`] of `delay` on this context's `clock`, counted from now.
    ///
    /// ```
    /// # use aio_core::{AioContext, ClockType, GroupBuilder, VirtualClock};
    /// use std::time::Duration;
    /// let clock = VirtualClock::new();
    /// let monitor = Box::new(fdmon_poll::PollMonitor::new()?);
    /// let ctx = AioContext::with_clocks(monitor, GroupBuilder::new().virtual_clock(clock.clone()))?;
    /// let s = ctx.sleep_on(ClockType::Virtual, Duration::from_secs(3600));
    /// assert!(!s.is_elapsed());
    /// clock.advance(Duration::from_secs(3600)); // an hour, at once
    /// ctx.block_on(s);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn sleep_on(&self, clock: ClockType, delay: Duration) -> Sleep {
        Sleep::bound_to(self, clock, When::After(delay))
    }

    /// A [`Sleep`] until this context's `clock` reads `deadline_ns`; complete at once if it
    /// already does.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use aio_core::ClockType;
    /// let now = ctx.timers().now_ns(ClockType::Realtime);
    /// ctx.block_on(ctx.sleep_until(ClockType::Realtime, now + 1_000));
    /// assert!(ctx.timers().now_ns(ClockType::Realtime) >= now + 1_000);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn sleep_until(&self, clock: ClockType, deadline_ns: u64) -> Sleep {
        Sleep::bound_to(self, clock, When::At(deadline_ns))
    }

    /// [`timeout`] with its timer on this context's realtime clock; never panics.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use std::time::Duration;
    /// let r = ctx.block_on(ctx.timeout(Duration::from_millis(1), std::future::pending::<()>()));
    /// assert!(r.is_err());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn timeout<F: Future>(
        &self,
        limit: Duration,
        future: F,
    ) -> impl Future<Output = Result<F::Output, Elapsed>> + use<F> {
        race(future, self.sleep(limit))
    }

    /// [`timeout`] with its timer on this context's `clock`.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use aio_core::ClockType;
    /// use std::time::Duration;
    /// let r = ctx.block_on(ctx.timeout_on(ClockType::Realtime, Duration::from_secs(9), async { 1 }));
    /// assert_eq!(r, Ok(1));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn timeout_on<F: Future>(
        &self,
        clock: ClockType,
        limit: Duration,
        future: F,
    ) -> impl Future<Output = Result<F::Output, Elapsed>> + use<F> {
        race(future, self.sleep_on(clock, limit))
    }
}
