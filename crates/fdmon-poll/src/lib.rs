//! The `poll(2)` backend of aio: [`PollMonitor`], an [`FdMonitor`] built on `ppoll`.
//!
//! This crate owns one thing: the `pollfd` array that describes which fds a context watches,
//! and the call that hands it to the kernel. Its QEMU counterpart is `util/fdmon-poll.c`.
//!
//! # How it differs from QEMU
//!
//! QEMU rebuilds its `pollfd` array on every `wait`, in `__thread` scratch arrays, because its
//! `wait` runs without the handler-list lock and the array must therefore not live in the
//! context, where another thread could be changing handlers. In aio the monitor belongs to one
//! context and is only touched by that context's home thread, through `&mut self`, so the
//! array can live in the monitor itself. That makes it possible to keep it up to date
//! incrementally: [`update`](FdMonitor::update) adds, changes or removes one entry in O(1), and
//! [`wait`](FdMonitor::wait) hands the array to the kernel as it is, without copying the handler
//! list first. Once the array has grown, `wait` allocates nothing.
//!
//! # Cost
//!
//! `ppoll` itself is O(N) in the number of watched fds on every call, ready or not: the kernel
//! walks the whole array, and so does `wait` when it collects the results. That is fine for
//! the handful of fds most contexts have, and it is the only mechanism that works everywhere,
//! but it does not scale. The `aio` facade therefore migrates a context to epoll once it
//! watches 64 fds (QEMU's `EPOLL_ENABLE_THRESHOLD`), using [`PollMonitor::registrations`] to
//! learn what to register there. That policy lives in the facade, not here, because a backend
//! never knows about another backend.
//!
//! # Platforms
//!
//! `ppoll` is needed for nanosecond timeouts; it exists on Linux, Android and the BSDs, but not
//! on macOS, where the monitor waits with `poll(2)` and a timeout rounded up to whole
//! milliseconds (never early, up to 1 ms late). On macOS prefer the `polling` backend
//! (`fdmon-polling`, kqueue), which keeps nanoseconds and costs O(ready fds) per wait.

#![deny(missing_docs)]

mod ppoll;

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use aio_core::registrations::{KeyMap, not_found, validate};
use aio_core::{Change, FdMonitor, HandlerKey, Interest, OuterFd, ReadyList};

use crate::ppoll::{interest_to_poll, poll_to_interest, poll_to_readiness};

/// How many entries the arrays have room for before the first reallocation. A context always
/// watches its own notifier, and most watch a few more fds; QEMU starts its scratch arrays at 8
/// too.
const INITIAL_CAPACITY: usize = 8;

/// An [`FdMonitor`] that waits with `ppoll(2)` on an array of every watched fd.
///
/// Readiness is level-triggered, as poll(2) is by nature: an fd that stays ready is reported
/// by every [`wait`](FdMonitor::wait). An fd that is closed while it is still registered is
/// reported as [`Readiness::ERROR`](aio_core::Readiness::ERROR) (the kernel answers `POLLNVAL`)
/// on every `wait` until it is removed, and a warning is logged once for it.
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
/// use fdmon_poll::PollMonitor;
///
/// let (mut writer, reader) = UnixStream::pair()?;
/// let mut monitor = PollMonitor::new()?;
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
pub struct PollMonitor {
    /// The array handed to the kernel, one entry per registered handler, in no particular order.
    pollfds: Vec<libc::pollfd>,
    /// `keys[i]` is the handler that `pollfds[i]` belongs to. A parallel vector rather than a
    /// vector of pairs, because the kernel needs the `pollfd`s contiguous.
    keys: Vec<HandlerKey>,
    /// Where each key's entry is, so that `update` finds it in O(1) instead of scanning.
    index: KeyMap<usize>,
    /// Keys whose fd the kernel reported as not open, so that the warning is logged once per
    /// key rather than on every iteration of a loop that keeps reporting it.
    warned_closed: HashSet<HandlerKey>,
}

impl PollMonitor {
    /// Creates a monitor that watches nothing yet.
    ///
    /// # Errors
    ///
    /// None today: the poll backend needs no kernel object. The `Result` keeps the constructor
    /// interchangeable with those of the other backends, which create an epoll fd or a ring.
    ///
    /// # Examples
    ///
    /// ```
    /// use aio_core::FdMonitor;
    /// use fdmon_poll::PollMonitor;
    ///
    /// let monitor = PollMonitor::new()?;
    /// assert_eq!(monitor.name(), "poll");
    /// assert!(monitor.is_empty());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn new() -> io::Result<Self> {
        Ok(PollMonitor {
            pollfds: Vec::with_capacity(INITIAL_CAPACITY),
            keys: Vec::with_capacity(INITIAL_CAPACITY),
            index: KeyMap::with_capacity_and_hasher(INITIAL_CAPACITY, Default::default()),
            warned_closed: HashSet::new(),
        })
    }

    /// Every registered handler: its key, its fd and what it is watched for, in no particular
    /// order.
    ///
    /// The facade uses this to move a context's handlers to another backend (epoll, once a
    /// context watches 64 fds).
    ///
    /// # Examples
    ///
    /// ```
    /// use aio_core::{Change, FdMonitor, HandlerKey, Interest};
    /// use fdmon_poll::PollMonitor;
    ///
    /// let mut monitor = PollMonitor::new()?;
    /// let key = HandlerKey::new(3, 0);
    /// // SAFETY: [FD-1]: fd 0 (stdin) stays open for the life of the process.
    /// unsafe { monitor.update(Change::Add { key, fd: 0, interest: Interest::READ }) }?;
    /// assert_eq!(monitor.registrations().collect::<Vec<_>>(), [(key, 0, Interest::READ)]);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn registrations(&self) -> impl Iterator<Item = (HandlerKey, RawFd, Interest)> + '_ {
        self.keys
            .iter()
            .zip(&self.pollfds)
            .map(|(&key, pfd)| (key, pfd.fd, poll_to_interest(pfd.events)))
    }

    /// How many handlers are registered.
    ///
    /// # Examples
    ///
    /// ```
    /// use aio_core::{Change, FdMonitor, HandlerKey, Interest};
    /// use fdmon_poll::PollMonitor;
    ///
    /// let mut monitor = PollMonitor::new()?;
    /// // SAFETY: [FD-1]: fd 0 (stdin) stays open for the life of the process.
    /// unsafe { monitor.update(Change::Add { key: HandlerKey::new(0, 0), fd: 0, interest: Interest::READ }) }?;
    /// assert_eq!(monitor.len(), 1);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.pollfds.len()
    }

    /// Whether no handler is registered.
    ///
    /// # Examples
    ///
    /// ```
    /// use fdmon_poll::PollMonitor;
    ///
    /// assert!(PollMonitor::new()?.is_empty());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.pollfds.is_empty()
    }

    /// Starts watching `fd` for `interest`, reported as `key` (validated by the caller).
    fn add(&mut self, key: HandlerKey, fd: RawFd, interest: Interest) {
        self.index.insert(key, self.pollfds.len());
        self.pollfds.push(libc::pollfd {
            fd,
            events: interest_to_poll(interest),
            revents: 0,
        });
        self.keys.push(key);
    }

    /// Hands the entry of `old` over to `new`, watching for `interest` from now on (validated
    /// by the caller, so that an error leaves the monitor as it was).
    fn modify(&mut self, old: HandlerKey, new: HandlerKey, interest: Interest) {
        let Some(i) = self.index.remove(&old) else {
            return;
        };
        self.index.insert(new, i);
        self.keys[i] = new;
        let pfd = &mut self.pollfds[i];
        pfd.events = interest_to_poll(interest);
        pfd.revents = 0;
        // The new key has not been warned about; if the fd is still closed, say so again under
        // the name the context now knows it by.
        self.warned_closed.remove(&old);
    }

    /// Stops watching the entry of `key`.
    fn remove(&mut self, key: HandlerKey) -> io::Result<()> {
        // The fd is deliberately not consulted: it may already be closed, or even reused for
        // another file, and the key alone identifies the entry.
        let i = self.index.remove(&key).ok_or_else(|| not_found(key))?;
        // swap_remove keeps removal O(1); the order of the array means nothing. The entry that
        // was last now sits at `i`, so its index must follow it.
        self.pollfds.swap_remove(i);
        self.keys.swap_remove(i);
        if let Some(&moved) = self.keys.get(i) {
            self.index.insert(moved, i);
        }
        self.warned_closed.remove(&key);
        Ok(())
    }

    /// Calls `ppoll` until it returns something other than `EINTR`.
    ///
    /// This is the one place where `EINTR` is retried. The remaining time is recomputed from a
    /// deadline taken before the first call, so a signal neither extends the wait (as
    /// restarting with the full timeout would) nor ends it early, and an infinite wait stays
    /// infinite.
    fn ppoll_uninterrupted(&mut self, timeout: Option<Duration>) -> io::Result<usize> {
        // Only a real, finite, nonzero wait can be shortened by elapsed time, and only then is
        // reading the clock worth it. A timeout so large that the deadline is not representable
        // is, for every practical purpose, infinite, and is simply passed again on a retry.
        let deadline = match timeout {
            Some(t) if !t.is_zero() => Instant::now().checked_add(t),
            _ => None,
        };
        let mut remaining = timeout;
        loop {
            match ppoll::ppoll(&mut self.pollfds, remaining) {
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {
                    if let Some(deadline) = deadline {
                        remaining = Some(deadline.saturating_duration_since(Instant::now()));
                    }
                }
                result => return result,
            }
        }
    }
}

impl FdMonitor for PollMonitor {
    fn name(&self) -> &'static str {
        "poll"
    }

    /// Applies `change` to the `pollfd` array in O(1), amortized: the arrays and the index
    /// grow by doubling and keep their capacity when entries are removed.
    ///
    /// # Errors
    ///
    /// * [`io::ErrorKind::InvalidInput`] for an `Add` of a key that is already registered, a
    ///   `Replace` to a key that is already registered (other than the old key), an empty
    ///   interest, a negative fd, or a `Replace` whose fd differs from the registered one.
    /// * [`io::ErrorKind::NotFound`] for a `Replace` or `Remove` of a key that is not
    ///   registered.
    ///
    /// On error the monitor is unchanged. Two keys may watch the same fd; keeping one handler
    /// per fd is the context's job.
    unsafe fn update(&mut self, change: Change) -> io::Result<()> {
        validate(change, |key| {
            self.index.get(&key).map(|&i| self.pollfds[i].fd)
        })?;
        match change {
            Change::Add { key, fd, interest } => self.add(key, fd, interest),
            Change::Replace {
                old, new, interest, ..
            } => self.modify(old, new, interest),
            Change::Remove { key, fd: _ } => return self.remove(key),
        }
        Ok(())
    }

    /// Waits with `ppoll` on every registered fd and reports each one with nonzero `revents`.
    ///
    /// With nothing registered this still sleeps for `timeout`, and with `None` it blocks for
    /// good: `ppoll` with no fds is valid, and `EINTR` is retried rather than returned. A
    /// context always watches its own notifier, so in practice something can always wake it.
    ///
    /// # Errors
    ///
    /// Whatever `ppoll` fails with other than `EINTR` (`ENOMEM`, `EINVAL` if the number of fds
    /// exceeds `RLIMIT_NOFILE`).
    fn wait(&mut self, ready: &mut ReadyList, timeout: Option<Duration>) -> io::Result<usize> {
        let mut pending = self.ppoll_uninterrupted(timeout)?;
        let mut pushed = 0;
        for (pfd, &key) in self.pollfds.iter().zip(&self.keys) {
            // ppoll counted the entries with nonzero revents, so stop as soon as all are found
            // instead of always walking the whole array.
            if pending == 0 {
                break;
            }
            if pfd.revents == 0 {
                continue;
            }
            pending -= 1;
            if pfd.revents & libc::POLLNVAL != 0 && self.warned_closed.insert(key) {
                tracing::warn!(
                    fd = pfd.fd,
                    ?key,
                    "fd was closed while still registered; reporting it as an error until its \
                     handler is removed"
                );
            }
            ready.push(key, poll_to_readiness(pfd.revents));
            pushed += 1;
        }
        Ok(pushed)
    }

    fn outer_fds(&self, out: &mut Vec<OuterFd>) {
        out.extend(
            self.registrations()
                .map(|(_, fd, interest)| OuterFd { fd, interest }),
        );
    }
}

impl fmt::Debug for PollMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The raw pollfds are noise (revents is stale outside of `wait`); what a reader wants is
        // which handler watches which fd for what.
        f.debug_struct("PollMonitor")
            .field("registrations", &DebugRegistrations(self))
            .finish_non_exhaustive()
    }
}

/// Formats [`PollMonitor::registrations`] as a list without collecting it.
struct DebugRegistrations<'a>(&'a PollMonitor);

impl fmt::Debug for DebugRegistrations<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.registrations()).finish()
    }
}
