//! The `ppoll(2)` system call and the translation between aio-core's flag types and poll bits.
//!
//! macOS has no `ppoll`; there the same function calls `poll(2)` with the timeout rounded *up*
//! to whole milliseconds, so a wait is never shorter than asked but may be up to 1 ms longer.
//!
//! This is the only file of the crate that contains `unsafe`: one call into the kernel, whose
//! `SAFETY` comment cites [SYS-2] of ARCHITECTURE.md ("The kernel boundary"). Keeping
//! the bit translation next to it means that everything that knows the numeric values of
//! `POLLIN`, `POLLHUP` and friends lives in one place.

use std::io;
#[cfg(not(target_vendor = "apple"))]
use std::ptr;
use std::time::Duration;

use aio_core::{Interest, Readiness};

/// `POLLRDHUP` where the platform has it. We never ask for it, so the kernel never reports it
/// today, but mapping it keeps [`poll_to_readiness`] correct if a caller ever does.
#[cfg(any(target_os = "linux", target_os = "android"))]
const POLLRDHUP: libc::c_short = libc::POLLRDHUP;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const POLLRDHUP: libc::c_short = 0;

/// Waits with `ppoll(2)` until an entry of `fds` is ready or `timeout` passes, and returns how
/// many entries have nonzero `revents` (the kernel rewrites `revents` of every entry).
///
/// `None` waits without limit. `Some(d)` is passed to the kernel with full nanosecond precision,
/// which is why this is `ppoll` and not `poll`, whose millisecond timeout would have to be
/// rounded. Seconds beyond what `time_t` can hold are clamped to its maximum, which the kernel
/// accepts and treats as "practically forever". An empty `fds` is valid and simply sleeps.
///
/// The signal mask is left alone (a null `sigmask`), so this behaves like `poll` with a better
/// timeout. `EINTR` is returned to the caller as an error of kind
/// [`io::ErrorKind::Interrupted`]; retrying is the caller's job because only it knows the
/// deadline.
#[cfg(not(target_vendor = "apple"))]
pub(crate) fn ppoll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    // A slice never holds more than isize::MAX bytes, so its length always fits in nfds_t on the
    // platforms we build for; the check only turns a theoretical truncation into an error.
    let nfds = libc::nfds_t::try_from(fds.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many fds for ppoll"))?;
    let timespec = timeout.map(duration_to_timespec);
    let timespec_ptr = timespec
        .as_ref()
        .map_or(ptr::null(), |ts| ts as *const libc::timespec);
    // `timespec_ptr` is null (no limit) or points at `timespec`, a local that outlives the call.
    // SAFETY: [SYS-2]: `fds` is borrowed, `nfds` long; `timespec` is valid; null sigmask.
    let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), nfds, timespec_ptr, ptr::null()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        // ppoll returns at most nfds, which came from a usize, so this cannot fail.
        Ok(usize::try_from(rc).unwrap_or(0))
    }
}

/// `ppoll` for macOS, which lacks it: `poll(2)` with the timeout rounded up to milliseconds
/// (never early, at most 1 ms late; beyond `c_int::MAX` ms, about 24 days, it is infinite).
/// Otherwise as the `ppoll` of the other platforms.
#[cfg(target_vendor = "apple")]
pub(crate) fn ppoll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let nfds = libc::nfds_t::try_from(fds.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many fds for poll"))?;
    let millis = match timeout {
        None => -1,
        Some(t) => {
            let ms = t.as_nanos().div_ceil(1_000_000);
            libc::c_int::try_from(ms).unwrap_or(-1)
        }
    };
    // SAFETY: [SYS-2]: `fds` is an exclusively borrowed slice of exactly `nfds` pollfds.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, millis) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(usize::try_from(rc).unwrap_or(0))
    }
}

/// Converts a timeout to a `timespec` without losing nanoseconds and without overflowing.
#[cfg(not(target_vendor = "apple"))]
fn duration_to_timespec(timeout: Duration) -> libc::timespec {
    libc::timespec {
        // A Duration can hold up to u64::MAX seconds and time_t is signed (and 32 bits on some
        // targets), so clamp instead of wrapping into a negative, invalid timeout.
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        // subsec_nanos() is below 1_000_000_000, which fits in every platform's tv_nsec type.
        tv_nsec: timeout.subsec_nanos() as _,
    }
}

/// The poll `events` bits for a handler's interest: read interest is `POLLIN`, write interest
/// is `POLLOUT`.
///
/// Hang-up and error conditions need no bit of their own because poll(2) always reports them.
pub(crate) fn interest_to_poll(interest: Interest) -> libc::c_short {
    let mut events = 0;
    if interest.contains(Interest::READ) {
        events |= libc::POLLIN;
    }
    if interest.contains(Interest::WRITE) {
        events |= libc::POLLOUT;
    }
    events
}

/// The interest that [`interest_to_poll`] turned into `events`; the inverse mapping, used to
/// describe registrations without storing the interest a second time.
pub(crate) fn poll_to_interest(events: libc::c_short) -> Interest {
    let mut interest = Interest::empty();
    if events & libc::POLLIN != 0 {
        interest |= Interest::READ;
    }
    if events & libc::POLLOUT != 0 {
        interest |= Interest::WRITE;
    }
    interest
}

/// What the poll `revents` bits mean to the context.
///
/// `POLLPRI` (urgent data) counts as readable, as it does for QEMU's handlers. `POLLNVAL` (the
/// fd is not open) counts as an error, so that the handler's callbacks run and can notice that
/// their fd was closed, rather than the fd being silently ignored forever.
pub(crate) fn poll_to_readiness(revents: libc::c_short) -> Readiness {
    let mut readiness = Readiness::empty();
    if revents & (libc::POLLIN | libc::POLLPRI) != 0 {
        readiness |= Readiness::READABLE;
    }
    if revents & libc::POLLOUT != 0 {
        readiness |= Readiness::WRITABLE;
    }
    if revents & (libc::POLLHUP | POLLRDHUP) != 0 {
        readiness |= Readiness::HANGUP;
    }
    if revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
        readiness |= Readiness::ERROR;
    }
    readiness
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interest_maps_to_pollin_and_pollout() {
        assert_eq!(interest_to_poll(Interest::READ), libc::POLLIN);
        assert_eq!(interest_to_poll(Interest::WRITE), libc::POLLOUT);
        assert_eq!(
            interest_to_poll(Interest::READ | Interest::WRITE),
            libc::POLLIN | libc::POLLOUT
        );
        assert_eq!(interest_to_poll(Interest::empty()), 0);
    }

    #[test]
    fn events_map_back_to_interest() {
        for interest in [
            Interest::READ,
            Interest::WRITE,
            Interest::READ | Interest::WRITE,
        ] {
            assert_eq!(poll_to_interest(interest_to_poll(interest)), interest);
        }
    }

    #[test]
    fn revents_map_to_readiness() {
        assert_eq!(poll_to_readiness(0), Readiness::empty());
        assert_eq!(poll_to_readiness(libc::POLLIN), Readiness::READABLE);
        assert_eq!(poll_to_readiness(libc::POLLPRI), Readiness::READABLE);
        assert_eq!(poll_to_readiness(libc::POLLOUT), Readiness::WRITABLE);
        assert_eq!(poll_to_readiness(libc::POLLHUP), Readiness::HANGUP);
        #[cfg(any(target_os = "linux", target_os = "android"))]
        assert_eq!(poll_to_readiness(libc::POLLRDHUP), Readiness::HANGUP);
        assert_eq!(poll_to_readiness(libc::POLLERR), Readiness::ERROR);
        assert_eq!(poll_to_readiness(libc::POLLNVAL), Readiness::ERROR);
        assert_eq!(
            poll_to_readiness(libc::POLLIN | libc::POLLHUP),
            Readiness::READABLE | Readiness::HANGUP
        );
    }

    #[test]
    #[cfg(not(target_vendor = "apple"))]
    fn timespec_keeps_nanoseconds_and_clamps_seconds() {
        let ts = duration_to_timespec(Duration::new(3, 123_456_789));
        assert_eq!((ts.tv_sec, ts.tv_nsec), (3, 123_456_789));
        let ts = duration_to_timespec(Duration::from_nanos(1));
        assert_eq!((ts.tv_sec, ts.tv_nsec), (0, 1));
        let ts = duration_to_timespec(Duration::MAX);
        assert_eq!((ts.tv_sec, ts.tv_nsec), (libc::time_t::MAX, 999_999_999));
    }

    #[test]
    fn empty_set_with_zero_timeout_returns_zero() {
        assert_eq!(ppoll(&mut [], Some(Duration::ZERO)).unwrap(), 0);
    }
}
