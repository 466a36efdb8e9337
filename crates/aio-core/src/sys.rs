//! The system-call helpers that core needs outside the event notifier: error conversion, the
//! "is this fd open?" check done when a handler is registered, `O_NONBLOCK` for `AsyncFd`, and
//! the back-off sleep after a failed backend wait.
//!
//! Backends have their own system-call files; core's only other system calls are in
//! `event_notifier.rs`. The `SAFETY` comments cite the rules [SYS-1] and [SYS-2] of
//! ARCHITECTURE.md ("The kernel boundary").

use std::io;
use std::os::fd::RawFd;

#[cfg(not(aio_loom))]
/// Turns a libc return value of `-1` into the thread's `errno` as an `io::Error`.
pub(crate) fn cvt<T: PartialEq + From<i8>>(ret: T) -> io::Result<T> {
    if ret == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Checks that `fd` names an open file description, so that registering a closed or invalid
/// fd fails at once with `EBADF` instead of surfacing later as a `POLLNVAL` storm.
#[cfg(not(aio_loom))]
pub(crate) fn check_fd_open(fd: RawFd) -> io::Result<()> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // An invalid `fd` makes F_GETFD fail with EBADF, which is exactly what we want to learn.
    // SAFETY: [SYS-1]: F_GETFD reads the flags of `fd`, no memory of ours.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) }).map(drop)
}

/// Puts `fd` in non-blocking mode (`O_NONBLOCK`), for [`AsyncFd`](crate::task::fd::AsyncFd):
/// a read or write on the home thread must never block the loop.
#[cfg(not(aio_loom))]
pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: [SYS-1]: F_GETFL reads the status flags of `fd`, no memory of ours.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: [SYS-1]: F_SETFL sets the status flags of `fd`, no memory of ours.
        cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    }
    Ok(())
}

/// Under loom there are no real fds to change.
#[cfg(aio_loom)]
pub(crate) fn set_nonblocking(_fd: RawFd) -> io::Result<()> {
    Ok(())
}

/// Under loom, fds are fake numbers handed out by the fake event notifier; nothing to check.
#[cfg(aio_loom)]
pub(crate) fn check_fd_open(_fd: RawFd) -> io::Result<()> {
    Ok(())
}

/// Sleeps until `fd` is readable or `timeout` has passed (rounded up to whole milliseconds):
/// the loop's back-off after a failed backend wait, which a notify (a write of the context's
/// eventfd) ends early. A signal ends it early too, which is not an error.
///
/// # Errors
///
/// The error of `poll(2)` other than `EINTR`.
#[cfg(not(aio_loom))]
pub(crate) fn wait_readable(fd: RawFd, timeout: std::time::Duration) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
    // SAFETY: [SYS-2]: `pfd` is one live, exclusively borrowed pollfd, and the count is 1.
    match cvt(unsafe { libc::poll(&mut pfd, 1, ms) }) {
        Err(e) if e.kind() != io::ErrorKind::Interrupted => Err(e),
        _ => Ok(()),
    }
}

/// Under loom there is nothing to sleep on, and a model must not sleep: return at once.
#[cfg(aio_loom)]
pub(crate) fn wait_readable(_fd: RawFd, _timeout: std::time::Duration) -> io::Result<()> {
    Ok(())
}

/// Sets the calling thread's timer slack (Linux `PR_SET_TIMERSLACK`): how late the kernel may
/// wake it from a timed wait to batch wake-ups. The default is 50 µs for ordinary threads; QEMU
/// sets 1 ns on its loop threads so that nanosecond deadlines are met, at the cost of more
/// timer interrupts and wake-ups (more CPU and power when many timers are close together).
/// Call it on the loop's home thread; `Duration::ZERO` restores the thread's default.
///
/// # Errors
///
/// `Unsupported` where the operating system has no per-thread timer slack; the error of
/// `prctl(2)` otherwise.
pub fn set_timer_slack(slack: std::time::Duration) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let ns = libc::c_ulong::try_from(slack.as_nanos()).unwrap_or(libc::c_ulong::MAX);
        // SAFETY: [SYS-1]: PR_SET_TIMERSLACK takes an integer and touches no memory of ours.
        let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns, 0, 0, 0) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = slack;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no per-thread timer slack here",
        ))
    }
}
