//! [`TimerFd`]: the nanosecond timer that the calloop and glib adapters arm to the timeout of
//! `AioContext::prepare`, so that an aio timer wakes the outer loop on time.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

/// A monotonic timerfd, non-blocking: the context's next deadline for an outer loop whose own
/// timers are coarser (glib's are whole milliseconds) or cannot be re-armed from a hook
/// (calloop's). Nanosecond resolution.
#[derive(Debug)]
#[cfg_attr(not(any(feature = "calloop", feature = "glib")), allow(dead_code))]
pub(crate) struct TimerFd(OwnedFd);

#[cfg_attr(not(any(feature = "calloop", feature = "glib")), allow(dead_code))]
impl TimerFd {
    /// A disarmed timer on `CLOCK_MONOTONIC`.
    pub(crate) fn new() -> io::Result<Self> {
        use rustix::time::{TimerfdClockId, TimerfdFlags, timerfd_create};
        Ok(Self(timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?))
    }

    /// Sets the timer to expire after `timeout` (`None`: disarmed). A zero timeout disarms it
    /// too: the caller does not sleep then.
    pub(crate) fn arm(&self, timeout: Option<Duration>) -> io::Result<()> {
        use rustix::time::{Itimerspec, TimerfdTimerFlags, Timespec, timerfd_settime};
        let value = match timeout {
            Some(t) if !t.is_zero() => Timespec {
                tv_sec: t.as_secs().min(i64::MAX as u64) as i64,
                tv_nsec: i64::from(t.subsec_nanos()),
            },
            _ => Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        timerfd_settime(&self.0, TimerfdTimerFlags::empty(), &spec)?;
        Ok(())
    }

    /// Reads the timer's expirations, if any, so it stops being readable.
    pub(crate) fn drain(&self) {
        let mut buf = [0u8; 8];
        // EAGAIN when it has not expired: nothing to drain.
        let _ = rustix::io::read(&self.0, &mut buf);
    }
}

#[cfg_attr(not(any(feature = "calloop", feature = "glib")), allow(dead_code))]
impl AsFd for TimerFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
