//! The epoll system calls, and the translation between aio-core's flag types and epoll bits.
//!
//! This is the only file of the crate that contains `unsafe`: [`Epoll`] owns the epoll fd and
//! wraps `epoll_create1`, `epoll_ctl`, `epoll_wait`, `epoll_pwait2` and a `ppoll` on the epoll
//! fd itself; [`Events`] is the buffer the kernel writes ready events into. Each wrapper is a
//! thin, policy-free call: which one to use for which timeout, and how to retry `EINTR`, is
//! decided once in the crate root. Keeping [`interest_to_epoll`] and [`epoll_to_readiness`] here
//! means that everything that knows the numeric values of `EPOLLIN` and friends lives in one
//! place. The `SAFETY` comments cite the rules [SYS-1]..[SYS-3] of ARCHITECTURE.md ("The kernel
//! boundary").

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::time::Duration;

use aio_core::{Interest, Readiness};

// libc spells the epoll bits as `c_int` constants; `epoll_event.events` is a `u32`. The casts
// only reinterpret the bit patterns (EPOLLET is bit 31, which is why they are not `as u32` at
// every use).
const EPOLLIN: u32 = libc::EPOLLIN as u32;
const EPOLLPRI: u32 = libc::EPOLLPRI as u32;
const EPOLLOUT: u32 = libc::EPOLLOUT as u32;
const EPOLLERR: u32 = libc::EPOLLERR as u32;
const EPOLLHUP: u32 = libc::EPOLLHUP as u32;
const EPOLLRDHUP: u32 = libc::EPOLLRDHUP as u32;

/// An epoll instance: the kernel object that holds the watched set and the ready list.
///
/// # Invariant
///
/// `fd` is an epoll fd created by `epoll_create1` and owned by this value alone.
#[derive(Debug)]
pub(crate) struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    /// Creates an epoll instance with `EPOLL_CLOEXEC`, so that the fd does not leak into
    /// programs the process executes.
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: [SYS-1]: epoll_create1 takes no pointers; any flags value is safe to pass.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: [SYS-3]: epoll_create1 just returned `fd`; nothing else owns it yet.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll { fd })
    }

    /// `EPOLL_CTL_ADD`: starts watching `fd` for `events`, reported with `data`.
    pub(crate) fn add(&self, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, data)
    }

    /// `EPOLL_CTL_MOD`: replaces the events and the data of the entry for `fd`.
    pub(crate) fn modify(&self, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, data)
    }

    /// `EPOLL_CTL_DEL`: stops watching `fd`.
    pub(crate) fn delete(&self, fd: RawFd) -> io::Result<()> {
        // The event is ignored for a delete, but kernels before 2.6.9 required a non-null
        // pointer, and passing one costs nothing.
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: data };
        // SAFETY: [SYS-2]: `event` is a live epoll_event, read during the call only.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut event) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// `epoll_wait` with timeout −1: blocks until at least one event is ready, then fills
    /// `events` with up to its capacity of them.
    pub(crate) fn wait_indefinitely(&self, events: &mut Events) -> io::Result<usize> {
        self.epoll_wait(events, -1)
    }

    /// `epoll_wait` with timeout 0: fills `events` with the events ready now, without blocking.
    pub(crate) fn wait_nonblocking(&self, events: &mut Events) -> io::Result<usize> {
        self.epoll_wait(events, 0)
    }

    /// Fills `events`, waiting for at most `timeout_ms` milliseconds (−1: no limit). Only −1 and
    /// 0 are used: a positive timeout goes through [`wait_timeout`](Self::wait_timeout) or
    /// [`poll_readable`](Self::poll_readable), which keep nanoseconds.
    fn epoll_wait(&self, events: &mut Events, timeout_ms: libc::c_int) -> io::Result<usize> {
        events.filled = 0;
        let max = events.max_events();
        // SAFETY: [SYS-2]: `events.buf` is exclusively borrowed and holds `max` entries or more.
        let rc = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.buf.as_mut_ptr(),
                max,
                timeout_ms,
            )
        };
        events.set_filled(rc.into())
    }

    /// `epoll_pwait2`: like `epoll_wait`, but with a nanosecond timeout (Linux 5.11).
    ///
    /// Fails with `ENOSYS` on older kernels, and with `ENOSYS` or `EPERM` where a seccomp filter
    /// forbids the call; [`supports_pwait2`](Self::supports_pwait2) finds that out once.
    pub(crate) fn wait_timeout(&self, events: &mut Events, timeout: Duration) -> io::Result<usize> {
        events.filled = 0;
        let timespec = duration_to_kernel_timespec(timeout);
        // The raw system call takes `long` arguments. Widening the `int`s here, rather than
        // passing them through C varargs as `int`, guarantees that no garbage upper bits reach
        // the kernel.
        let epfd = libc::c_long::from(self.fd.as_raw_fd());
        let max = libc::c_long::from(events.max_events());
        // `timespec` is a `struct __kernel_timespec` (64-bit fields on every architecture, which
        // is what this call takes, unlike `libc::timespec` on 32-bit targets). With a null
        // sigmask the kernel ignores the size argument.
        // SAFETY: [SYS-2]: `events.buf` holds `max` entries or more; `timespec` is live and valid.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait2,
                epfd,
                events.buf.as_mut_ptr(),
                max,
                &timespec as *const KernelTimespec,
                ptr::null::<libc::sigset_t>(),
                0 as libc::size_t,
            )
        };
        events.set_filled(rc)
    }

    /// Whether `epoll_pwait2` can be used: one non-blocking call, retried on `EINTR`.
    ///
    /// `Err` carries what the kernel answered (`ENOSYS` without the call, `EPERM` or `ENOSYS`
    /// under a seccomp filter).
    pub(crate) fn supports_pwait2(&self) -> io::Result<()> {
        let mut events = Events::with_capacity(1);
        loop {
            match self.wait_timeout(&mut events, Duration::ZERO) {
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                result => return result.map(drop),
            }
        }
    }

    /// Waits with `ppoll` until the epoll fd itself is readable (some watched fd is ready) or
    /// `timeout` passes, with full nanosecond precision. Returns whether it became readable.
    ///
    /// This is QEMU's way to give `epoll_wait` a sub-millisecond timeout on kernels without
    /// `epoll_pwait2`: the caller then collects the events with
    /// [`wait_nonblocking`](Self::wait_nonblocking).
    pub(crate) fn poll_readable(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let timespec = duration_to_timespec(timeout);
        // SAFETY: [SYS-2]: one borrowed `pfd` for nfds = 1; `timespec` is live and valid.
        let rc = unsafe { libc::ppoll(&mut pfd, 1, &timespec, ptr::null()) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc > 0)
        }
    }
}

impl AsFd for Epoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The buffer that `epoll_wait` writes ready events into, reused from one wait to the next.
///
/// # Invariant
///
/// Every entry of `buf` is initialised (zeroed when the buffer grows), so the kernel can write
/// into any prefix of it and reading an entry is always defined; `filled <= buf.len()` entries
/// hold the result of the last successful wait.
pub(crate) struct Events {
    buf: Vec<libc::epoll_event>,
    filled: usize,
}

impl Events {
    /// A buffer with room for `capacity` events (at least one: the kernel rejects zero).
    pub(crate) fn with_capacity(capacity: usize) -> Events {
        let mut events = Events {
            buf: Vec::new(),
            filled: 0,
        };
        events.grow_to(capacity.max(1));
        events
    }

    /// How many events one wait can return.
    pub(crate) fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Makes room for `capacity` events, if there is less. The new entries are zeroed, which
    /// keeps the invariant; this is the only place the buffer allocates.
    pub(crate) fn grow_to(&mut self, capacity: usize) {
        if capacity > self.buf.len() {
            self.buf
                .resize(capacity, libc::epoll_event { events: 0, u64: 0 });
        }
    }

    /// Forgets the result of the last wait.
    pub(crate) fn clear(&mut self) {
        self.filled = 0;
    }

    /// The `(data, events)` pairs the last wait filled in, in the kernel's order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.buf[..self.filled].iter().map(|event| {
            // epoll_event is packed on x86-64, so its fields are copied out, never borrowed.
            let event = *event;
            (event.u64, event.events)
        })
    }

    /// `maxevents` for the kernel: the buffer's length, clamped to what a `c_int` can say
    /// (asking for fewer than the buffer holds is always safe).
    fn max_events(&self) -> libc::c_int {
        libc::c_int::try_from(self.buf.len()).unwrap_or(libc::c_int::MAX)
    }

    /// Records the return value of a wait call: the number of entries written, or −1.
    fn set_filled(&mut self, rc: libc::c_long) -> io::Result<usize> {
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // The kernel writes at most `max_events()` entries, so `rc` fits and is in bounds; the
        // `min` only keeps the invariant against a kernel that broke its own contract.
        let n = usize::try_from(rc).unwrap_or(0).min(self.buf.len());
        self.filled = n;
        Ok(n)
    }
}

/// The kernel's `struct __kernel_timespec`, which `epoll_pwait2` takes: 64-bit seconds and
/// nanoseconds on every architecture (y2038-safe), unlike `libc::timespec` on 32-bit targets.
#[repr(C)]
struct KernelTimespec {
    tv_sec: i64,
    tv_nsec: i64,
}

/// Converts a timeout for `epoll_pwait2` without losing nanoseconds and without overflowing.
fn duration_to_kernel_timespec(timeout: Duration) -> KernelTimespec {
    KernelTimespec {
        // A Duration holds up to u64::MAX seconds; clamp instead of wrapping into a negative,
        // invalid timeout. The kernel adds it to the current time with saturation.
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(timeout.subsec_nanos()),
    }
}

/// Converts a timeout for `ppoll` without losing nanoseconds and without overflowing.
fn duration_to_timespec(timeout: Duration) -> libc::timespec {
    libc::timespec {
        // time_t is signed (and 32 bits on some targets), so clamp rather than wrap.
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        // subsec_nanos() is below 1_000_000_000, which fits in every platform's tv_nsec type.
        tv_nsec: timeout.subsec_nanos() as _,
    }
}

/// The epoll `events` bits for a handler's interest: read interest is `EPOLLIN | EPOLLRDHUP`,
/// write interest is `EPOLLOUT`.
///
/// `EPOLLRDHUP` makes a socket whose peer shut down its writing side report hang-up, as QEMU's
/// `G_IO_HUP` does; `EPOLLHUP` and `EPOLLERR` need no bit because epoll always reports them.
/// Never `EPOLLET` or `EPOLLONESHOT`: the contract is level-triggered, which plain epoll gives
/// for free (see the crate docs).
pub(crate) fn interest_to_epoll(interest: Interest) -> u32 {
    let mut events = 0;
    if interest.contains(Interest::READ) {
        events |= EPOLLIN | EPOLLRDHUP;
    }
    if interest.contains(Interest::WRITE) {
        events |= EPOLLOUT;
    }
    events
}

/// What the epoll `events` bits of a ready entry mean to the context.
///
/// `EPOLLPRI` (urgent data) counts as readable, as it does for QEMU's handlers; `EPOLLRDHUP`
/// (the peer shut down writing) counts as hang-up, like `EPOLLHUP`.
pub(crate) fn epoll_to_readiness(events: u32) -> Readiness {
    let mut readiness = Readiness::empty();
    if events & (EPOLLIN | EPOLLPRI) != 0 {
        readiness |= Readiness::READABLE;
    }
    if events & EPOLLOUT != 0 {
        readiness |= Readiness::WRITABLE;
    }
    if events & (EPOLLHUP | EPOLLRDHUP) != 0 {
        readiness |= Readiness::HANGUP;
    }
    if events & EPOLLERR != 0 {
        readiness |= Readiness::ERROR;
    }
    readiness
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interest_maps_to_level_triggered_bits() {
        assert_eq!(interest_to_epoll(Interest::READ), EPOLLIN | EPOLLRDHUP);
        assert_eq!(interest_to_epoll(Interest::WRITE), EPOLLOUT);
        assert_eq!(
            interest_to_epoll(Interest::READ | Interest::WRITE),
            EPOLLIN | EPOLLRDHUP | EPOLLOUT
        );
        assert_eq!(interest_to_epoll(Interest::empty()), 0);
        for interest in [Interest::READ, Interest::WRITE, Interest::all()] {
            let bits = interest_to_epoll(interest);
            assert_eq!(bits & (libc::EPOLLET as u32), 0);
            assert_eq!(bits & (libc::EPOLLONESHOT as u32), 0);
        }
    }

    #[test]
    fn events_map_to_readiness() {
        assert_eq!(epoll_to_readiness(0), Readiness::empty());
        assert_eq!(epoll_to_readiness(EPOLLIN), Readiness::READABLE);
        assert_eq!(epoll_to_readiness(EPOLLPRI), Readiness::READABLE);
        assert_eq!(epoll_to_readiness(EPOLLOUT), Readiness::WRITABLE);
        assert_eq!(epoll_to_readiness(EPOLLHUP), Readiness::HANGUP);
        assert_eq!(epoll_to_readiness(EPOLLRDHUP), Readiness::HANGUP);
        assert_eq!(epoll_to_readiness(EPOLLERR), Readiness::ERROR);
        assert_eq!(
            epoll_to_readiness(EPOLLIN | EPOLLRDHUP | EPOLLHUP),
            Readiness::READABLE | Readiness::HANGUP
        );
        assert_eq!(
            epoll_to_readiness(EPOLLOUT | EPOLLERR),
            Readiness::WRITABLE | Readiness::ERROR
        );
    }

    #[test]
    fn timespecs_keep_nanoseconds_and_clamp_seconds() {
        let ts = duration_to_kernel_timespec(Duration::new(3, 123_456_789));
        assert_eq!((ts.tv_sec, ts.tv_nsec), (3, 123_456_789));
        let ts = duration_to_kernel_timespec(Duration::MAX);
        assert_eq!((ts.tv_sec, ts.tv_nsec), (i64::MAX, 999_999_999));
        let ts = duration_to_timespec(Duration::from_nanos(1));
        assert_eq!((ts.tv_sec, ts.tv_nsec), (0, 1));
        let ts = duration_to_timespec(Duration::MAX);
        assert_eq!((ts.tv_sec, ts.tv_nsec), (libc::time_t::MAX, 999_999_999));
    }

    #[test]
    fn events_buffer_grows_and_never_shrinks() {
        let mut events = Events::with_capacity(0);
        assert_eq!(events.capacity(), 1);
        events.grow_to(128);
        assert_eq!(events.capacity(), 128);
        events.grow_to(64);
        assert_eq!(events.capacity(), 128);
        assert_eq!(events.iter().count(), 0);
    }

    #[test]
    fn empty_instance_has_nothing_ready() {
        let epoll = Epoll::new().unwrap();
        let mut events = Events::with_capacity(4);
        assert_eq!(epoll.wait_nonblocking(&mut events).unwrap(), 0);
        assert!(!epoll.poll_readable(Duration::from_nanos(1)).unwrap());
        match epoll.supports_pwait2() {
            Ok(()) => assert_eq!(
                epoll
                    .wait_timeout(&mut events, Duration::from_nanos(1))
                    .unwrap(),
                0
            ),
            Err(err) => eprintln!("epoll_pwait2 unavailable ({err}); not tested here"),
        }
    }
}
