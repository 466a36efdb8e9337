//! The `epoll(7)` backend of aio: [`EpollMonitor`], an [`FdMonitor`] built on one epoll
//! instance per context.
//!
//! This crate owns the context's epoll fd: the kernel object that holds the set of watched fds
//! and the list of ready ones, the buffer that ready events are read into, and the choice of
//! system call for each kind of timeout. Its QEMU counterpart is `util/fdmon-epoll.c`.
//!
//! The whole crate is Linux-only: the crate root says `#![cfg(target_os = "linux")]` once, so on
//! other platforms it compiles to nothing and the `aio` facade simply does not offer it.
//!
//! # Cost: O(1) in the number of watched fds
//!
//! The watched set lives in the kernel and is changed incrementally: each
//! [`update`](FdMonitor::update) is one `epoll_ctl` plus O(1) bookkeeping. A wait costs in
//! proportion to the fds that are *ready*, not to those that are watched, so a context with
//! 10 000 idle fds and one active one pays for one. That is what poll(2) cannot do (it walks
//! every fd on every call), and why the `aio` facade moves a context from poll to epoll once it
//! watches 64 fds (QEMU's `EPOLL_ENABLE_THRESHOLD`), using [`EpollMonitor::registrations`] and
//! its poll counterpart to migrate the handlers. That policy lives in the facade, not here,
//! because a backend never knows about another backend.
//!
//! # Level-triggered on purpose
//!
//! Every fd is registered level-triggered: never `EPOLLET`, never `EPOLLONESHOT`. The contract
//! of [`FdMonitor`] is level-triggered (a handler that leaves data unread is called again on the
//! next iteration, as in QEMU), and plain epoll gives exactly that at no cost: after reporting
//! an entry, the kernel puts it back on the ready list and checks it again on the next wait.
//! Edge-triggered mode would report an fd only when it *becomes* ready, so a handler that reads
//! half of its data would never be called again; one-shot mode would need an `epoll_ctl` to
//! re-arm every fd after every report, the cost that io_uring's one-shot `POLL_ADD` forces on
//! the io_uring backend.
//!
//! # Reading ready events in batches
//!
//! A wait reads events into a buffer the monitor keeps, so that steady-state waits allocate
//! nothing. It starts with room for 128 events, as QEMU's does. When more fds are ready than
//! the buffer holds, the kernel hands out the first batch and keeps the rest; because
//! reported entries go to the back of its ready list, the next wait starts with those that were
//! left out (epoll's documented round robin), so no fd is starved. A wait that fills the buffer
//! doubles it, up to 4096 events (48 KiB), so that a burst of 10 000 ready fds is drained over a
//! handful of iterations instead of eighty. The buffer never shrinks.
//!
//! # Nanosecond timeouts
//!
//! `epoll_wait` takes its timeout in milliseconds, but the context's timeouts (timers, idle
//! bottom halves) are nanoseconds, and rounding 1.5 ms up to 2 ms or down to 1 ms is either late
//! or a busy loop. A monitor therefore uses, for a positive timeout:
//!
//! * `epoll_pwait2` (Linux 5.11), which takes a `timespec`. Whether the kernel has it is probed
//!   once per process, with a non-blocking call; `ENOSYS` (an older kernel) or `EPERM` (a
//!   seccomp filter that does not know the call) is remembered and selects the fallback.
//! * Otherwise QEMU's fallback: `ppoll` on the epoll fd itself with the nanosecond timeout (an
//!   epoll fd is readable while any of its fds is ready), and if it became readable,
//!   `epoll_wait` with timeout 0 to collect the events. That is a second system call, but only
//!   when something became ready before the deadline.
//!
//! An infinite wait is `epoll_wait(-1)` and a non-blocking one `epoll_wait(0)`, on both paths.
//! A signal interrupts any of these calls with `EINTR` (epoll calls are never restarted);
//! [`wait`](FdMonitor::wait) retries in exactly one place with the time that is left until a
//! deadline taken at the start, so a signal neither turns an infinite wait into an error nor
//! extends a finite one.
//!
//! # A registered fd that gets closed
//!
//! epoll watches *(file, fd number)* pairs, and the kernel removes an entry by itself when the
//! last fd that refers to its file is closed. So, unlike poll, which reports a closed fd as
//! [`Readiness::ERROR`](aio_core::Readiness::ERROR) until its handler is removed:
//!
//! * **Closed, no other fd refers to the file** (the common case): the entry silently
//!   disappears. The handler is not reported again, not even with an error (unless an
//!   orphan, below, makes the monitor add every registration anew while the number names
//!   another file). A later
//!   [`Change::Remove`] still succeeds: `EPOLL_CTL_DEL` answers `EBADF` (the number is not
//!   open) or `ENOENT` (the number now names another file that is not registered), which both
//!   mean "already gone" and are logged at debug level.
//! * **Closed, but a duplicate survives** (`dup`, `try_clone`, `fork`, a file passed over a
//!   socket): the entry stays, tied to the old file, and is still reported under the old key
//!   while that file is ready. `epoll_ctl` finds entries by fd number, which no longer names
//!   that file, so once the handler is removed the entry cannot be reached any more: it lives
//!   in the kernel until every duplicate is closed. A file that stays ready would then make
//!   every wait return at once, so the first wait that meets such an *orphan* (a report under
//!   a key the monitor no longer has) drops it and replaces the epoll instance with a new one
//!   holding the live registrations, logged as a warning; an outer loop asks `outer_fds`
//!   again before it sleeps, and follows. Not after the epoll fd was lent through `as_fd` (its
//!   number must stay): then the orphan's reports are dropped, logged once, and its wake-ups go
//!   on until the duplicates are closed; a replacement that fails (`EMFILE`, `ENOSPC`,
//!   `ENOMEM`) is tried again a second later (`aio_core::registrations::Orphans`). Registrations are added to the new instance through
//!   their numbers, so a handler whose fd was itself closed while registered is left out if
//!   the number is not open, and watches the number's new file if it was reused (as poll
//!   would). **Remove a handler before closing its fd.**
//! * **The number is reused** for a new file: the new file can be added (under a new key) even
//!   though the old key was never removed, because it is a different pair. The monitor then
//!   treats the old key as stale: removing or replacing it never touches the new file's entry,
//!   which `epoll_ctl` would otherwise hit, since it only sees the number.
//!
//! # How it differs from QEMU
//!
//! QEMU keeps its epoll fd in the `AioContext`, switches `ctx->fdmon_ops` between poll and
//! epoll from inside the backends, and stores `AioHandler` pointers in `epoll_event.data`.
//! Here the monitor owns its epoll fd and is only touched by its context's home thread, through
//! `&mut self`; switching backends is the facade's job; and `data` holds a [`HandlerKey`] (slot
//! index and generation), so a stale event names a key the context no longer knows, never freed
//! memory. QEMU permanently falls back to poll when any `epoll_ctl` fails; here the error is
//! returned to whoever registered the handler, and the monitor stays usable.

#![cfg(target_os = "linux")]
#![deny(missing_docs)]
#![doc(test(attr(deny(warnings))))]

mod epoll;

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aio_core::registrations::{FdTable, Orphans, Registrations, WaitDeadline};
use aio_core::{Change, FdMonitor, HandlerKey, Interest, OuterFd, ReadyList};

use crate::epoll::{Epoll, Events, epoll_to_readiness, interest_to_epoll};

/// How many events one wait reads at first: QEMU's fixed `epoll_event events[128]`. Enough for
/// any ordinary iteration, and only 1.5 KiB.
const INITIAL_EVENTS: usize = 128;

/// The most events one wait reads, however often the buffer fills. Doubling from 128 reaches it
/// in five steps; beyond it, a bigger batch saves little (the handlers' own work dominates) and
/// the buffer (48 KiB here) would only cost cache.
const MAX_EVENTS: usize = 4096;

/// Whether this kernel (and any seccomp filter in force) lets the process call `epoll_pwait2`.
/// Probed once per process by the first monitor created, because the answer cannot change.
static PWAIT2_AVAILABLE: OnceLock<bool> = OnceLock::new();

/// An [`FdMonitor`] that waits with `epoll(7)`: the watched set lives in the kernel, so both
/// changes and waits cost O(1) in the number of watched fds.
///
/// Readiness is level-triggered: an fd that stays ready is reported by every
/// [`wait`](FdMonitor::wait), once per call. Timeouts keep their nanoseconds. An fd that is
/// closed while registered is silently forgotten by the kernel and never reported again; see
/// the [crate docs](crate#a-registered-fd-that-gets-closed) for the details, including the trap
/// of a duplicate that keeps the file open.
///
/// [`AsFd`] gives the epoll fd, which is readable while any watched fd is ready; that is what an
/// outer event loop watches on the context's behalf ([`outer_fds`](FdMonitor::outer_fds)).
///
/// # Examples
///
/// ```
/// use std::io::Write;
/// use std::os::fd::AsRawFd;
/// use std::os::unix::net::UnixStream;
/// use std::time::Duration;
///
/// use aio_core::{Change, FdMonitor, HandlerKey, Interest, Readiness, ReadyList};
/// use fdmon_epoll::EpollMonitor;
///
/// let (mut writer, reader) = UnixStream::pair()?;
/// let mut monitor = EpollMonitor::new()?;
/// let key = HandlerKey::new(0, 1);
/// // SAFETY: [FD-1]: the fd stays open until the monitor is dropped.
/// unsafe { monitor.update(Change::Add { key, fd: reader.as_raw_fd(), interest: Interest::READ }) }?;
///
/// let mut ready = ReadyList::new();
/// assert_eq!(monitor.wait(&mut ready, Some(Duration::ZERO))?, 0);
///
/// writer.write_all(b"x")?;
/// assert_eq!(monitor.wait(&mut ready, None)?, 1);
/// assert_eq!(ready.iter().collect::<Vec<_>>(), [(key, Readiness::READABLE)]);
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct EpollMonitor {
    /// The kernel's watched set and ready list.
    epoll: Epoll,
    /// Where waits read ready events into; grows from [`INITIAL_EVENTS`] to [`MAX_EVENTS`].
    events: Events,
    /// Every registered handler's fd and interest, for [`registrations`](Self::registrations)
    /// and for validating changes (the kernel holds the same set, but cannot be asked for it),
    /// and which key owns each fd number: `epoll_ctl` finds entries by number, so only the
    /// owner's changes reach the kernel (see [`Registrations`] on stale keys).
    regs: Registrations,
    /// Whether positive timeouts use `epoll_pwait2` (else `ppoll` on the epoll fd, then a
    /// non-blocking `epoll_wait`).
    pwait2: bool,
    /// What to do about orphans: whether the epoll fd was lent through
    /// [`as_fd`](AsFd::as_fd), and whether a replacement failed
    /// ([`forget_orphans`](Self::forget_orphans)).
    orphans: Orphans,
}

/// What one attempt at waiting produced.
enum Waited {
    /// The kernel filled `self.events` with this many events (zero: the timeout expired).
    Events(usize),
    /// The `ppoll` fallback saw the epoll fd readable, but the event was gone when
    /// `epoll_wait` looked (another process drained the fd in between). Nothing to report,
    /// and time may remain: wait again.
    Vanished,
}

impl EpollMonitor {
    /// Creates a monitor with its own epoll fd (`epoll_create1(EPOLL_CLOEXEC)`), watching
    /// nothing yet.
    ///
    /// The first monitor of the process also probes whether `epoll_pwait2` is available (one
    /// non-blocking call) and remembers the answer for every later one.
    ///
    /// # Errors
    ///
    /// Whatever `epoll_create1` fails with: `EMFILE`/`ENFILE` when out of fds, `ENOMEM`.
    ///
    /// # Examples
    ///
    /// ```
    /// use aio_core::FdMonitor;
    /// use fdmon_epoll::EpollMonitor;
    ///
    /// let monitor = EpollMonitor::new()?;
    /// assert_eq!(monitor.name(), "epoll");
    /// assert!(monitor.is_empty());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn new() -> io::Result<Self> {
        Self::with_pwait2(true)
    }

    /// Test hook: like [`new`](Self::new), but with `use_pwait2 == false` positive timeouts
    /// always take the `ppoll` fallback, as on a kernel without `epoll_pwait2`. With `true` it
    /// is `new`: `epoll_pwait2` is used where the kernel has it.
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new).
    #[doc(hidden)]
    pub fn with_pwait2(use_pwait2: bool) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let pwait2 = use_pwait2 && *PWAIT2_AVAILABLE.get_or_init(|| probe_pwait2(&epoll));
        Ok(EpollMonitor {
            epoll,
            events: Events::with_capacity(INITIAL_EVENTS),
            regs: Registrations::new(),
            pwait2,
            orphans: Orphans::default(),
        })
    }

    /// Test hook: whether positive timeouts use `epoll_pwait2` (`false`: the `ppoll` fallback).
    #[doc(hidden)]
    pub fn uses_pwait2(&self) -> bool {
        self.pwait2
    }

    /// Every registered handler: its key, its fd and what it is watched for, in no particular
    /// order.
    ///
    /// The facade uses this to move a context's handlers to another backend. It lists what the
    /// context registered, including a handler whose fd was closed and dropped by the kernel
    /// and which the context has not removed yet.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::os::fd::AsRawFd;
    /// use std::os::unix::net::UnixStream;
    ///
    /// use aio_core::{Change, FdMonitor, HandlerKey, Interest};
    /// use fdmon_epoll::EpollMonitor;
    ///
    /// let (socket, _peer) = UnixStream::pair()?;
    /// let fd = socket.as_raw_fd();
    /// let mut monitor = EpollMonitor::new()?;
    /// let key = HandlerKey::new(3, 0);
    /// // SAFETY: [FD-1]: the fd stays open until the monitor is dropped.
    /// unsafe { monitor.update(Change::Add { key, fd, interest: Interest::READ }) }?;
    /// assert_eq!(monitor.registrations().collect::<Vec<_>>(), [(key, fd, Interest::READ)]);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn registrations(&self) -> impl Iterator<Item = (HandlerKey, RawFd, Interest)> + '_ {
        self.regs.iter()
    }

    /// How many handlers are registered.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::os::fd::AsRawFd;
    /// use std::os::unix::net::UnixStream;
    ///
    /// use aio_core::{Change, FdMonitor, HandlerKey, Interest};
    /// use fdmon_epoll::EpollMonitor;
    ///
    /// let (socket, _peer) = UnixStream::pair()?;
    /// let mut monitor = EpollMonitor::new()?;
    /// let (key, fd) = (HandlerKey::new(0, 0), socket.as_raw_fd());
    /// // SAFETY: [FD-1]: the fd stays open until the monitor is dropped.
    /// unsafe { monitor.update(Change::Add { key, fd, interest: Interest::READ }) }?;
    /// assert_eq!(monitor.len(), 1);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.regs.len()
    }

    /// Whether no handler is registered.
    ///
    /// # Examples
    ///
    /// ```
    /// use fdmon_epoll::EpollMonitor;
    ///
    /// assert!(EpollMonitor::new()?.is_empty());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.regs.is_empty()
    }

    /// `orphans` events of the last wait named no registered key: entries of handlers already
    /// removed whose fd had been closed first while a duplicate of it kept the file open (see
    /// "A registered fd that gets closed"). Nothing can delete them (`epoll_ctl` reaches an
    /// entry only through the number, which no longer names its file), and a file that stays
    /// ready would make every wait return at once. So the epoll instance is replaced by a new
    /// one holding every registration that owns its fd number, which drops the orphans with
    /// the old one. Each is added again through its number: a registration whose fd is no
    /// longer open (`EBADF`), or names a file epoll refuses (`EPERM`), is left out, and one whose
    /// number was closed and reused while registered now watches the file the number names.
    /// Both concern only handlers whose fd was closed before they were removed. When to keep
    /// the old instance instead (a lent fd, a failed replacement) is [`Orphans`]' call. Returns
    /// whether the instance was replaced.
    fn forget_orphans(&mut self, orphans: usize) -> bool {
        let regs = &self.regs;
        let fresh = self.orphans.replacement("epoll", orphans, || {
            let mut fresh = Epoll::new()?;
            let left_out = regs.add_owned_to(&mut fresh)?;
            Ok((fresh, left_out))
        });
        fresh
            .map(|fresh| drop(std::mem::replace(&mut self.epoll, fresh)))
            .is_some()
    }

    /// Waits until an event is ready or `timeout` passes, retrying `EINTR`; `deadline` is when
    /// the whole wait ends (`None` for none, a zero timeout, or one too far off).
    ///
    /// This is the one place where `EINTR` is retried. The remaining time is recomputed from the
    /// deadline, taken before the first call, so a signal neither extends the wait (as
    /// restarting with the full timeout would) nor ends it early, and an infinite wait stays
    /// infinite.
    fn wait_uninterrupted(
        &mut self,
        timeout: Option<Duration>,
        deadline: Option<Instant>,
    ) -> io::Result<usize> {
        let mut remaining = timeout;
        loop {
            match self.wait_once(remaining) {
                Ok(Waited::Events(n)) => return Ok(n),
                Ok(Waited::Vanished) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
            if let Some(deadline) = deadline {
                remaining = Some(deadline.saturating_duration_since(Instant::now()));
            }
        }
    }

    /// One attempt at waiting, with the system call that suits `timeout` (see the crate docs).
    fn wait_once(&mut self, timeout: Option<Duration>) -> io::Result<Waited> {
        let events = &mut self.events;
        let n = match timeout {
            None => self.epoll.wait_indefinitely(events)?,
            Some(t) if t.is_zero() => self.epoll.wait_nonblocking(events)?,
            Some(t) if self.pwait2 => self.epoll.wait_timeout(events, t)?,
            Some(t) => {
                if !self.epoll.poll_readable(t)? {
                    return Ok(Waited::Events(0));
                }
                match self.epoll.wait_nonblocking(events)? {
                    0 => return Ok(Waited::Vanished),
                    n => n,
                }
            }
        };
        Ok(Waited::Events(n))
    }
}

/// Asks the kernel once whether `epoll_pwait2` may be called, and logs the answer.
fn probe_pwait2(epoll: &Epoll) -> bool {
    match epoll.supports_pwait2() {
        Ok(()) => {
            tracing::debug!("epoll_pwait2 is available; positive timeouts use it");
            true
        }
        Err(err) => {
            // ENOSYS: a kernel before 5.11, or a seccomp filter that does not know the call;
            // EPERM: a filter that forbids it. Anything else is unexpected, but the fallback
            // works on every kernel, so it is taken in every case.
            tracing::debug!(
                %err,
                "epoll_pwait2 is not available; positive timeouts use ppoll on the epoll fd"
            );
            false
        }
    }
}

impl FdMonitor for EpollMonitor {
    fn name(&self) -> &'static str {
        "epoll"
    }

    /// Applies `change` with one `epoll_ctl` (`Add` → `EPOLL_CTL_ADD`, `Replace` →
    /// `EPOLL_CTL_MOD` with the new key as data, `Remove` → `EPOLL_CTL_DEL`), plus O(1)
    /// bookkeeping.
    ///
    /// # Errors
    ///
    /// * [`io::ErrorKind::InvalidInput`] for an `Add` of a key that is already registered, a
    ///   `Replace` to a key that is already registered (other than the old key), an empty
    ///   interest, a negative fd, or a `Replace` whose fd differs from the registered one.
    /// * [`io::ErrorKind::NotFound`] for a `Replace` or `Remove` of a key that is not
    ///   registered.
    /// * The kernel's refusal of an `Add` or `Replace`, with its error code: `EPERM` for a file
    ///   that epoll cannot watch (a regular file, a directory), `EEXIST` when the same fd is
    ///   already registered under another key (epoll watches each (file, fd) pair once; a
    ///   `dup` of the fd can be registered), `EBADF` for an fd that is not open, `ENOMEM` or
    ///   `ENOSPC` (`max_user_watches`) when the kernel is out of room.
    ///
    /// On error the monitor is unchanged. A `Remove` of an fd that was closed while registered
    /// succeeds (the kernel already dropped it); a `Remove` the kernel fails otherwise is still
    /// forgotten by the monitor, as it is by the context, and the error returned for logging.
    unsafe fn update(&mut self, change: Change) -> io::Result<()> {
        self.regs.update(&mut self.epoll, change)
    }

    /// Waits for ready events and pushes one report per ready key, each key at most once (the
    /// kernel reports each entry once per call).
    ///
    /// At most as many events as the buffer holds are read per call (128 at first, doubling
    /// each time a wait fills it, up to 4096); the rest stay ready in the kernel and are
    /// reported by the next call. With nothing registered this still sleeps for `timeout`,
    /// and with `None` it blocks until a watched fd becomes ready, however many signals
    /// arrive; a context always watches its own notifier, so something can always wake it.
    /// Reports of entries no registration has (orphans: see "A registered fd that gets
    /// closed") are dropped; a wait that only they ended replaces the epoll instance and
    /// waits out the rest of its timeout.
    ///
    /// # Errors
    ///
    /// Whatever the kernel fails with other than `EINTR`, which is retried (`EFAULT` and
    /// `EINVAL` cannot happen with the arguments built here).
    fn wait(&mut self, ready: &mut ReadyList, timeout: Option<Duration>) -> io::Result<usize> {
        // Only a real, finite, nonzero wait can be shortened by elapsed time (a signal, or
        // orphans below), and only then is the clock read.
        let deadline = WaitDeadline::new(timeout);
        let mut remaining = timeout;
        loop {
            self.events.clear();
            let n = self.wait_uninterrupted(remaining, deadline.at())?;
            let mut orphans = 0;
            for (data, events) in self.events.iter() {
                let key = HandlerKey::from_u64(data);
                if self.regs.get(key).is_none() {
                    orphans += 1;
                    continue;
                }
                ready.push(key, epoll_to_readiness(events));
            }
            let capacity = self.events.capacity();
            if n == capacity && capacity < MAX_EVENTS {
                // More may be ready than one batch holds; read bigger batches from now on.
                self.events.grow_to((capacity * 2).min(MAX_EVENTS));
            }
            let reported = n - orphans;
            if orphans == 0 || reported > 0 || !self.forget_orphans(orphans) {
                return Ok(reported);
            }
            // Woken by orphans alone, now gone: wait out the rest of the timeout.
            match deadline.again() {
                None => return Ok(0),
                Some(rest) => remaining = rest,
            }
        }
    }

    /// Appends the epoll fd, for reading: it is readable while any watched fd is ready.
    fn outer_fds(&self, out: &mut Vec<OuterFd>) {
        out.push(OuterFd {
            fd: self.epoll.as_fd().as_raw_fd(),
            interest: Interest::READ,
        });
    }
}

impl AsFd for EpollMonitor {
    /// The epoll fd. It is readable while any watched fd is ready, so an outer loop can wait for
    /// it and then call `wait` with a zero timeout.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.orphans.lend();
        self.epoll.as_fd()
    }
}

impl fmt::Debug for EpollMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The event buffer is noise outside of `wait`; what a reader wants is which epoll fd
        // this is, how it waits, and which handler watches which fd for what.
        f.debug_struct("EpollMonitor")
            .field("epoll_fd", &self.epoll.as_fd().as_raw_fd())
            .field("pwait2", &self.pwait2)
            .field("registrations", &self.regs)
            .finish_non_exhaustive()
    }
}

/// `epoll_ctl` as the table of fd numbers that [`Registrations::update`] drives: the key goes
/// into the event's data, so that a stale event names a key the context no longer knows.
impl FdTable for Epoll {
    fn add(&mut self, fd: RawFd, key: HandlerKey, interest: Interest) -> io::Result<()> {
        Epoll::add(self, fd, interest_to_epoll(interest), key.as_u64())
    }
    fn modify(&mut self, fd: RawFd, key: HandlerKey, interest: Interest) -> io::Result<()> {
        Epoll::modify(self, fd, interest_to_epoll(interest), key.as_u64())
    }
    fn delete(&mut self, fd: RawFd) -> io::Result<()> {
        Epoll::delete(self, fd)
    }
}
