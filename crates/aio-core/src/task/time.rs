//! Timers as futures: [`sleep`], [`sleep_until`] and [`timeout`] (and their `_on` forms for
//! any of the context's four clocks), built on the context's own timer lists (QEMU
//! `qemu_co_sleep_ns` / `co_sleep_ns_wakeable` on an `aio_timer_new` timer).
//!
//! A sleep arms one context timer when it is first polled and cancels it when dropped; the
//! timer's callback wakes the task, which is then polled again on the same iteration's BH pass
//! or the next. Deadlines are nanoseconds on the chosen clock, so a sleep on
//! [`ClockType::Virtual`] completes exactly when the test advances the virtual clock past it.

use crate::context::{AioContext, ContextHandle};
use crate::sync::{Mutex, StdArc as Arc, lock};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use timers::{ClockType, Scale, Timer};

/// The current context, for a timer future; panics with a clear message outside one.
fn current(what: &str) -> AioContext {
    AioContext::current().unwrap_or_else(|| {
        panic!("{what} polled outside an aio context (poll it from a task or a block_on)")
    })
}

/// Now on `clock` of the context this thread is running, in nanoseconds (QEMU
/// `qemu_clock_get_ns`); `None` outside a context.
pub fn now_ns(clock: ClockType) -> Option<u64> {
    AioContext::current().map(|ctx| ctx.timers().now_ns(clock))
}

/// Waits for `duration` on the realtime clock (QEMU `qemu_co_sleep_ns(QEMU_CLOCK_REALTIME)`).
///
/// The delay counts from the call if it is made on a context's thread inside its loop (a task,
/// a callback, a `block_on`), otherwise from the first poll.
///
/// # Panics
///
/// When polled outside an aio context's loop (by another executor).
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use std::time::{Duration, Instant};
/// let start = Instant::now();
/// ctx.block_on(aio_core::task::sleep(Duration::from_millis(5)));
/// assert!(start.elapsed() >= Duration::from_millis(5));
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn sleep(duration: Duration) -> Sleep {
    sleep_on(ClockType::Realtime, duration)
}

/// Waits for `duration` on `clock`.
pub fn sleep_on(clock: ClockType, duration: Duration) -> Sleep {
    let delay = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
    Sleep {
        clock,
        deadline: match now_ns(clock) {
            Some(now) => Deadline::At(now.saturating_add(delay)),
            None => Deadline::After(delay),
        },
        armed: None,
    }
}

/// Waits until `clock` reads `deadline_ns` or later; ready at once if it already does.
///
/// ```
/// # use aio_core::{AioContext, ClockType, GroupBuilder, VirtualClock};
/// # let vclock = VirtualClock::new();
/// # let ctx = AioContext::with_clocks(
/// #     Box::new(fdmon_poll::PollMonitor::new()?),
/// #     GroupBuilder::new().virtual_clock(vclock.clone()),
/// # )?;
/// use aio_core::task::sleep_until;
/// vclock.enable();
/// let t = ctx.spawn_local(sleep_until(ClockType::Virtual, 1_000));
/// ctx.poll_nonblocking();
/// assert!(!t.is_finished());
/// vclock.advance_ns(1_000);
/// while !t.is_finished() { ctx.poll_nonblocking(); }
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn sleep_until(clock: ClockType, deadline_ns: u64) -> Sleep {
    Sleep {
        clock,
        deadline: Deadline::At(deadline_ns),
        armed: None,
    }
}

#[derive(Clone, Copy, Debug)]
enum Deadline {
    At(u64),
    /// A delay whose start is the first poll.
    After(u64),
}

/// The timer a sleep armed, on the context it was armed on.
struct Armed {
    /// Held for its `Drop`, which cancels the timer.
    _timer: Timer,
    ctx: ContextHandle,
    waker: Arc<Mutex<Option<Waker>>>,
}

/// The future of [`sleep`], [`sleep_on`] and [`sleep_until`]. Dropping it cancels its timer.
#[must_use = "futures do nothing unless awaited"]
pub struct Sleep {
    clock: ClockType,
    deadline: Deadline,
    armed: Option<Armed>,
}

impl Sleep {
    /// The deadline in nanoseconds on the sleep's clock, once known (at creation inside a
    /// context, else at the first poll).
    pub fn deadline_ns(&self) -> Option<u64> {
        match self.deadline {
            Deadline::At(d) => Some(d),
            Deadline::After(_) => None,
        }
    }

    /// The clock the sleep counts on.
    pub fn clock(&self) -> ClockType {
        self.clock
    }
}

impl fmt::Debug for Sleep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sleep")
            .field("clock", &self.clock)
            .field("deadline", &self.deadline)
            .field("armed", &self.armed.is_some())
            .finish()
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let ctx = current("a sleep");
        let now = ctx.timers().now_ns(self.clock);
        let deadline = match self.deadline {
            Deadline::At(d) => d,
            Deadline::After(delay) => {
                let d = now.saturating_add(delay);
                self.deadline = Deadline::At(d);
                d
            }
        };
        if now >= deadline {
            self.armed = None;
            return Poll::Ready(());
        }
        // A task that moved to another context re-arms there.
        if self
            .armed
            .as_ref()
            .is_some_and(|a| !a.ctx.is_handle_of(&ctx))
        {
            self.armed = None;
        }
        match &self.armed {
            Some(armed) => {
                let mut w = lock(&armed.waker);
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
            }
            None => {
                let waker = Arc::new(Mutex::new(Some(cx.waker().clone())));
                let w = waker.clone();
                let timer = ctx.timer(self.clock, Scale::NS, move || {
                    let waker = lock(&w).take();
                    if let Some(waker) = waker {
                        waker.wake();
                    }
                });
                timer.arm_ns(deadline);
                self.armed = Some(Armed {
                    _timer: timer,
                    ctx: ctx.handle(),
                    waker,
                });
            }
        }
        Poll::Pending
    }
}

/// The error of a [`timeout`] whose time ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("deadline elapsed")
    }
}

impl std::error::Error for Elapsed {}

/// Runs `future` for at most `duration` on the realtime clock: `Ok(output)`, or
/// `Err(Elapsed)` (and `future` dropped) when the time runs out first.
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use aio_core::task::{timeout, Elapsed};
/// use std::time::Duration;
/// let never = std::future::pending::<()>();
/// assert_eq!(ctx.block_on(timeout(Duration::from_millis(1), never)), Err(Elapsed));
/// assert_eq!(ctx.block_on(timeout(Duration::from_secs(9), async { 3 })), Ok(3));
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn timeout<F: Future>(duration: Duration, future: F) -> Timeout<F> {
    timeout_on(ClockType::Realtime, duration, future)
}

/// As [`timeout`], on `clock`.
pub fn timeout_on<F: Future>(clock: ClockType, duration: Duration, future: F) -> Timeout<F> {
    Timeout {
        future,
        sleep: sleep_on(clock, duration),
    }
}

pin_project_lite::pin_project! {
    /// The future of [`timeout`] and [`timeout_on`].
    #[must_use = "futures do nothing unless awaited"]
    #[derive(Debug)]
    pub struct Timeout<F> {
        #[pin]
        future: F,
        sleep: Sleep,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.future.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        Pin::new(this.sleep).poll(cx).map(|()| Err(Elapsed))
    }
}
