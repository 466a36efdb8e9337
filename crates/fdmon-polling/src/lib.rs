//! The portable backend of aio: [`PollingMonitor`], an [`FdMonitor`] on the
//! [`polling`](https://docs.rs/polling) crate, which wraps each Unix's scalable readiness
//! interface.
//!
//! This crate owns one `polling::Poller` per context (the kernel object that holds the watched
//! set: a kqueue, an event port or an epoll instance), the buffer that ready events are read
//! into, and the bookkeeping that turns `polling`'s events into aio's level-triggered reports.
//! QEMU has no counterpart: it only has `util/fdmon-{poll,epoll,io_uring}.c`, and on macOS and
//! the BSDs it falls back to poll(2) (via glib), which costs O(watched fds) per wait.
//!
//! | platform | kernel interface | level-triggered by | timeout precision |
//! |---|---|---|---|
//! | macOS, iOS, FreeBSD, NetBSD, OpenBSD, DragonFly | kqueue | `PollMode::Level` (no `EV_CLEAR`/`EV_ONESHOT`) | `kevent` takes a `timespec` (ns); the kernel may coalesce the wake-up (macOS timer leeway, FreeBSD's `kern.timecounter.alloweddeviation`), so it can be late by up to a few percent of the timeout |
//! | illumos, Solaris | event ports | one-shot association, re-armed by the monitor after each report | `port_getn` takes a `timespec` (ns); rounded up to the kernel's clock resolution |
//! | Linux, Android | epoll | `PollMode::Level` | `polling` arms a `timerfd` with the full `timespec` (ns) and then blocks in `epoll_wait`; hrtimer precision plus the thread's timer slack (50 µs by default) |
//!
//! Whatever the platform, [`wait`](FdMonitor::wait) never returns *early*: `polling` may return
//! with no events before the deadline (a spurious wake-up, its internal timer), and the monitor
//! then waits again for the time that is left, measured on [`Instant`]. So "nanosecond or best"
//! means: asked for in nanoseconds, late by at most what the kernel adds, never early.
//!
//! # Not chosen by `Auto` on Linux
//!
//! On Linux `polling` is epoll underneath, but it pays for its portability on every wait: a
//! finite wait is `timerfd_settime` + `epoll_ctl` (re-arming the timer fd) + `epoll_wait` +
//! `epoll_ctl` (re-arming its own notifier), four system calls where `fdmon-epoll` makes one
//! (`epoll_pwait2`). The `aio` facade's `Auto` therefore picks it on Linux only when no other
//! backend is compiled in; it is there to be asked for (`Backend::Polling`,
//! `AIO_BACKEND=polling`), and so that the conformance suite runs on the same code that macOS
//! and the BSDs use.
//!
//! # Level-triggered, once per key
//!
//! Every fd is registered in level mode where `polling` offers it (`Poller::supports_level`:
//! epoll and kqueue). Event ports only have one-shot associations, so there the monitor
//! registers one-shot and re-associates every fd it reported before `wait` returns: the kernel
//! checks the fd again at the next `port_getn`, and reports it again if it is still ready,
//! which is level-triggered as seen from the loop. The same emulation can be forced on any
//! platform ([`PollingMonitor::with_rearm`]), which is how it is tested on Linux.
//!
//! kqueue reports the read and the write side of an fd as two events; a wait merges them, so
//! each ready key is reported once, with both bits.
//!
//! # A registered fd that gets closed
//!
//! All three kernels drop a watched file by themselves when its last fd is closed, so such a
//! handler is silently never reported again (as with `fdmon-epoll`), and a later
//! [`Change::Remove`] still succeeds: `EBADF` or `ENOENT` from the kernel mean "already gone"
//! and are logged at debug level. A number that is reused for a new file while the old handler
//! is still registered is tracked as in `fdmon-epoll`: the old key becomes stale and its removal
//! never touches the new file's registration. **Remove a handler before closing its fd.**
//!
//! On Linux, epoll keeps the entry of a closed number while a duplicate (`dup`, `try_clone`,
//! `fork`) holds its file open, and once the handler is removed nothing can reach the entry:
//! `epoll_ctl` finds entries by number. A file that stays ready would then end every wait at
//! once. The monitor handles such an *orphan* (a report under a key it no longer has) as
//! `fdmon-epoll` does: its reports are dropped, and the first wait that only orphans ended
//! replaces the `Poller` with a new one holding the live registrations (logged as a warning),
//! then waits out the rest of its timeout. An outer loop asks
//! [`outer_fds`](FdMonitor::outer_fds) again before it sleeps, and follows. When the old
//! `Poller` is kept instead (its fd lent through `as_fd`; a failed replacement, tried again a
//! second later) is `aio_core::registrations::Orphans`' call, as for `fdmon-epoll`. One-shot
//! registrations (event ports, [`PollingMonitor::with_rearm`]) report an orphan once at most,
//! since only the monitor re-arms them, so there it is only dropped, and the wait goes on. kqueue and event ports
//! drop a closed number's entries themselves, duplicates or not.
//!
//! # Keys
//!
//! `polling` identifies a source by a `usize` key, and this crate stores the [`HandlerKey`]'s
//! `u64` there, so it needs a 64-bit target (a compile error says so elsewhere). The value
//! `usize::MAX` is reserved by `polling`; a key with that value is refused with `InvalidInput`.

#![deny(missing_docs)]
#![doc(test(attr(deny(warnings))))]

#[cfg(not(target_pointer_width = "64"))]
compile_error!(
    "fdmon-polling stores a 64-bit HandlerKey in polling's usize key: 64-bit targets only"
);

mod poller;

use std::fmt;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use aio_core::registrations::{FdTable, Orphans, Registrations, WaitDeadline};
use aio_core::{Change, FdMonitor, HandlerKey, Interest, OuterFd, Readiness, ReadyList};
use polling::{Events, PollMode, Poller};

use crate::poller::{event_to_readiness, interest_to_event, key_from_polling};

/// How many events one wait reads at first (as `fdmon-epoll`, and QEMU's epoll backend).
const INITIAL_EVENTS: usize = 128;

/// The most events one wait reads, however often the buffer fills.
const MAX_EVENTS: usize = 4096;

/// An [`FdMonitor`] on the `polling` crate: kqueue on macOS and the BSDs, event ports on
/// illumos, epoll on Linux. Changes and waits cost O(1) in the number of watched fds.
///
/// Readiness is level-triggered on every platform, each ready key is reported once per
/// [`wait`](FdMonitor::wait), and timeouts are asked for in nanoseconds and never end early;
/// see the [crate docs](crate) for what each kernel rounds to.
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
/// use fdmon_polling::PollingMonitor;
///
/// let (mut writer, reader) = UnixStream::pair()?;
/// let mut monitor = PollingMonitor::new()?;
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
pub struct PollingMonitor {
    /// The kernel's watched set.
    poller: Poller,
    /// How fds are registered: `Level`, or `Oneshot` re-armed after each report.
    mode: PollMode,
    /// Where waits read events into; grows from [`INITIAL_EVENTS`] to [`MAX_EVENTS`].
    events: Events,
    /// One wait's reports before merging (kqueue reports the two directions of an fd apart).
    scratch: Vec<(HandlerKey, Readiness)>,
    /// Every registered handler's fd and interest, and which key owns each fd number: only the
    /// owner's changes reach the kernel (see [`Registrations`] on stale keys).
    regs: Registrations,
    /// What to do about orphans: whether the poller's fd was lent through
    /// [`as_fd`](AsFd::as_fd), and whether a replacement failed
    /// ([`forget_orphans`](Self::forget_orphans)).
    orphans: Orphans,
}

impl PollingMonitor {
    /// Creates a monitor with its own `polling::Poller`, watching nothing yet, in level mode
    /// where the platform has it and one-shot re-armed by the monitor elsewhere (event ports).
    ///
    /// # Errors
    ///
    /// Whatever creating the kernel object fails with: `EMFILE`/`ENFILE` when out of fds,
    /// `ENOMEM`.
    ///
    /// # Examples
    ///
    /// ```
    /// use aio_core::FdMonitor;
    /// use fdmon_polling::PollingMonitor;
    ///
    /// let monitor = PollingMonitor::new()?;
    /// assert_eq!(monitor.name(), "polling");
    /// assert!(monitor.is_empty());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn new() -> io::Result<Self> {
        Self::with_rearm(false)
    }

    /// Test hook: with `rearm == true` every fd is registered one-shot and re-armed by the
    /// monitor after each report, as on event ports, whatever the platform; with `false` it is
    /// [`new`](Self::new).
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new).
    #[doc(hidden)]
    pub fn with_rearm(rearm: bool) -> io::Result<Self> {
        let poller = Poller::new()?;
        let mode = if rearm || !poller.supports_level() {
            PollMode::Oneshot
        } else {
            PollMode::Level
        };
        Ok(PollingMonitor {
            poller,
            mode,
            events: Events::with_capacity(nonzero(INITIAL_EVENTS)),
            scratch: Vec::new(),
            regs: Registrations::new(),
            orphans: Orphans::default(),
        })
    }

    /// Whether fds are re-armed by the monitor after each report (event ports, or
    /// [`with_rearm`](Self::with_rearm)) rather than registered level-triggered.
    pub fn rearms(&self) -> bool {
        self.mode == PollMode::Oneshot
    }

    /// Every registered handler: its key, its fd and what it is watched for, in no particular
    /// order.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::os::fd::AsRawFd;
    /// use std::os::unix::net::UnixStream;
    ///
    /// use aio_core::{Change, FdMonitor, HandlerKey, Interest};
    /// use fdmon_polling::PollingMonitor;
    ///
    /// let (socket, _peer) = UnixStream::pair()?;
    /// let fd = socket.as_raw_fd();
    /// let mut monitor = PollingMonitor::new()?;
    /// let key = HandlerKey::new(3, 0);
    /// // SAFETY: [FD-1]: the fd stays open until the monitor is dropped.
    /// unsafe { monitor.update(Change::Add { key, fd, interest: Interest::READ }) }?;
    /// assert_eq!(monitor.registrations().collect::<Vec<_>>(), [(key, fd, Interest::READ)]);
    /// assert_eq!(monitor.len(), 1);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn registrations(&self) -> impl Iterator<Item = (HandlerKey, RawFd, Interest)> + '_ {
        self.regs.iter()
    }

    /// How many handlers are registered.
    pub fn len(&self) -> usize {
        self.regs.len()
    }

    /// Whether no handler is registered.
    pub fn is_empty(&self) -> bool {
        self.regs.is_empty()
    }

    /// `orphans` events of the last wait named no registered key: entries of handlers already
    /// removed whose fd had been closed first while a duplicate kept the file open (see "A
    /// registered fd that gets closed"). Nothing can delete them, and a file that stays ready
    /// would end every wait at once, so the poller is replaced by a new one holding every
    /// registration that owns its fd number ([`Registrations::add_owned_to`]), which drops the
    /// orphans with the old one. When to keep the old poller instead (a lent fd, a failed
    /// replacement) is [`Orphans`]' call. Returns whether the poller was replaced.
    fn forget_orphans(&mut self, orphans: usize) -> bool {
        let (regs, mode) = (&self.regs, self.mode);
        let fresh = self.orphans.replacement("polling", orphans, || {
            let fresh = Poller::new()?;
            let left_out = regs.add_owned_to(&mut ByNumber {
                poller: &fresh,
                mode,
            })?;
            Ok((fresh, left_out))
        });
        fresh
            .map(|fresh| drop(std::mem::replace(&mut self.poller, fresh)))
            .is_some()
    }

    /// Reads the events of the last wait into `scratch`, one entry per registered key that is
    /// ready, and returns how many events named no registered key (orphans, dropped). Grows the
    /// event buffer when the wait filled it.
    fn collect(&mut self) -> usize {
        self.scratch.clear();
        let (mut raw, mut orphans) = (0, 0);
        for event in self.events.iter() {
            raw += 1;
            let key = key_from_polling(event.key);
            if self.regs.get(key).is_none() {
                orphans += 1;
                continue;
            }
            let readiness = event_to_readiness(&event);
            if !readiness.is_empty() {
                self.scratch.push((key, readiness));
            }
        }
        if self.scratch.len() > 1 {
            // kqueue reports the read and the write filter of one fd as two events.
            self.scratch.sort_unstable_by_key(|&(key, _)| key.as_u64());
            self.scratch.dedup_by(|later, earlier| {
                let same = later.0 == earlier.0;
                if same {
                    earlier.1 |= later.1;
                }
                same
            });
        }
        let capacity = self.events.capacity().get();
        if raw == capacity && capacity < MAX_EVENTS {
            // More may be ready than one batch holds; read bigger batches from now on.
            self.events = Events::with_capacity(nonzero((capacity * 2).min(MAX_EVENTS)));
        }
        orphans
    }

    /// Waits until `polling` reports an event of ours or `timeout` passes.
    ///
    /// `polling` retries `EINTR` itself, with the same deadline, but may return with no events
    /// before the deadline (its own notifier or timer fd woke it); this is the one place where
    /// such a return is turned into another wait for the time that is left, so a wait is never
    /// shorter than asked and an infinite one stays infinite.
    fn wait_events(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let deadline = match timeout {
            Some(t) if t.is_zero() => {
                self.poller.wait(&mut self.events, Some(Duration::ZERO))?;
                return Ok(());
            }
            // Too far away to represent: as good as infinite.
            Some(t) => Instant::now().checked_add(t),
            None => None,
        };
        loop {
            match deadline {
                Some(deadline) => self.poller.wait_deadline(&mut self.events, deadline)?,
                None => self.poller.wait(&mut self.events, None)?,
            };
            if self.events.iter().next().is_some() {
                return Ok(());
            }
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return Ok(());
            }
            self.events.clear();
        }
    }
}

impl FdMonitor for PollingMonitor {
    fn name(&self) -> &'static str {
        "polling"
    }

    /// Applies `change` with one call into `polling` (`add`, `modify` with the new key,
    /// `delete`), plus O(1) bookkeeping.
    ///
    /// # Errors
    ///
    /// * [`io::ErrorKind::InvalidInput`] for an `Add` of a key that is already registered, a
    ///   `Replace` to a key that is already registered (other than the old key), an empty
    ///   interest, a negative fd, a `Replace` whose fd differs from the registered one, or the
    ///   key `polling` reserves (`usize::MAX`).
    /// * [`io::ErrorKind::NotFound`] for a `Replace` or `Remove` of a key that is not
    ///   registered.
    /// * The kernel's refusal of an `Add` or `Replace`: on Linux `EPERM` for a regular file and
    ///   `EEXIST` for an fd already registered under another key; `EBADF` for an fd that is not
    ///   open; `ENOMEM`.
    ///
    /// On error the monitor is unchanged. A `Remove` of an fd that was closed while registered
    /// succeeds.
    unsafe fn update(&mut self, change: Change) -> io::Result<()> {
        let mut kernel = ByNumber {
            poller: &self.poller,
            mode: self.mode,
        };
        self.regs.update(&mut kernel, change)
    }

    /// Waits for ready fds and pushes one report per ready key.
    ///
    /// At most as many events as the buffer holds are read per call (128 at first, doubling
    /// each time a wait fills it, up to 4096); the rest stay ready in the kernel for the next
    /// call. With nothing registered this still sleeps for `timeout`. Reports of entries no
    /// registration has (orphans: see "A registered fd that gets closed") are dropped; a wait
    /// that only they ended replaces the poller and waits out the rest of its timeout.
    ///
    /// # Errors
    ///
    /// Whatever the kernel fails with other than `EINTR` (retried by `polling`). On event
    /// ports, a reported fd that cannot be re-armed (closed while registered) is logged and
    /// not reported again; the wait still succeeds.
    fn wait(&mut self, ready: &mut ReadyList, timeout: Option<Duration>) -> io::Result<usize> {
        let deadline = WaitDeadline::new(timeout);
        let mut remaining = timeout;
        loop {
            self.events.clear();
            self.wait_events(remaining)?;
            let orphans = self.collect();
            if orphans == 0 || !self.scratch.is_empty() {
                break;
            }
            // One-shot entries are re-armed by this monitor only, so an orphan's report comes
            // once and its entry is spent: nothing to replace. A level-triggered orphan would
            // come again; if the poller cannot be replaced, its wake-ups go on (logged).
            if self.mode == PollMode::Level && !self.forget_orphans(orphans) {
                break;
            }
            // Woken by orphans alone, now gone: wait out the rest of the timeout.
            match deadline.again() {
                None => break,
                Some(rest) => remaining = rest,
            }
        }
        if self.mode == PollMode::Oneshot {
            for &(key, _) in &self.scratch {
                // Only a key that still owns its fd has a registration to re-arm.
                let Some((fd, interest)) = self.regs.get(key).filter(|_| self.regs.owns(key))
                else {
                    continue;
                };
                let event = interest_to_event(key, interest);
                if let Err(err) = poller::modify(&self.poller, fd, event, self.mode) {
                    // The report stands (the fd was ready); only later ones are lost. A closed
                    // fd (EBADF, ENOENT) is forgotten, as every kernel here forgets it; the
                    // wait does not fail, so the other fds' re-arms and reports go through.
                    if matches!(err.raw_os_error(), Some(libc::EBADF | libc::ENOENT)) {
                        tracing::debug!(fd, ?key, %err, "fd closed while registered; not re-armed");
                    } else {
                        tracing::warn!(fd, ?key, %err, "re-arming a reported fd failed");
                    }
                }
            }
        }
        for &(key, readiness) in &self.scratch {
            ready.push(key, readiness);
        }
        Ok(self.scratch.len())
    }

    /// Appends the kernel object's fd (epoll fd, kqueue, event port), for reading: it is
    /// readable while any watched fd is ready.
    fn outer_fds(&self, out: &mut Vec<OuterFd>) {
        out.push(OuterFd {
            fd: self.poller.as_fd().as_raw_fd(),
            interest: Interest::READ,
        });
    }
}

impl AsFd for PollingMonitor {
    /// The kernel object's fd (epoll fd, kqueue, event port). Once lent, the poller is never
    /// replaced, so orphans are then only filtered out (see "A registered fd that gets closed").
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.orphans.lend();
        self.poller.as_fd()
    }
}

impl fmt::Debug for PollingMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PollingMonitor")
            .field("fd", &self.poller.as_fd().as_raw_fd())
            .field("rearms", &self.rearms())
            .field("registrations", &self.regs)
            .finish_non_exhaustive()
    }
}

/// `n` as a `NonZeroUsize`; only called with the positive constants above.
fn nonzero(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN)
}

/// The poller in the monitor's mode, as the table of fd numbers that
/// [`Registrations::update`] drives.
struct ByNumber<'a> {
    poller: &'a Poller,
    mode: PollMode,
}

impl FdTable for ByNumber<'_> {
    fn add(&mut self, fd: RawFd, key: HandlerKey, interest: Interest) -> io::Result<()> {
        poller::add(self.poller, fd, interest_to_event(key, interest), self.mode)
    }
    fn modify(&mut self, fd: RawFd, key: HandlerKey, interest: Interest) -> io::Result<()> {
        poller::modify(self.poller, fd, interest_to_event(key, interest), self.mode)
    }
    fn delete(&mut self, fd: RawFd) -> io::Result<()> {
        poller::delete(self.poller, fd)
    }
}
