//! The backend contract: [`FdMonitor`], and the plain data it is given and fills in.
//!
//! C original: `FDMonOps` in QEMU's `include/block/aio.h`, with its implementations in
//! `util/fdmon-{poll,epoll,io_uring}.c`. A backend watches file descriptors for the context and
//! reports which are ready; it never sees a callback, a handler node or the context itself, only
//! [`HandlerKey`]s, raw fd numbers, [`Interest`] and [`Readiness`]. QEMU's nullable
//! `update(old, new)` pointer pair becomes the [`Change`] enum, and its `int64_t` timeout (−1
//! infinite, 0 non-blocking) becomes `Option<Duration>` (`None` blocks without limit,
//! `Some(Duration::ZERO)` does not block).
//!
//! A monitor belongs to one context and is only ever touched by that context's home thread
//! (the thread that owns the [`AioContext`](crate::AioContext)), so every method takes `&mut self`
//! or `&self` and no method needs to be thread-safe.

pub mod registrations;

use std::any::Any;
use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

bitflags::bitflags! {
    /// What a handler wants to be told about: the fd being readable, writable, or both.
    ///
    /// A read interest also reports hang-up and error conditions (QEMU's `G_IO_IN | G_IO_HUP |
    /// G_IO_ERR`); a write interest also reports errors (`G_IO_OUT | G_IO_ERR`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Interest: u8 {
        /// The fd has data to read, or was hung up.
        const READ = 1 << 0;
        /// The fd can be written without blocking.
        const WRITE = 1 << 1;
    }
}

bitflags::bitflags! {
    /// What a backend saw happen to an fd.
    ///
    /// The context calls the read callback for `READABLE`, `HANGUP` or `ERROR`, and the write
    /// callback for `WRITABLE` or `ERROR`, as QEMU does; an error therefore reaches both.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Readiness: u8 {
        /// Data can be read (`POLLIN`, `EPOLLIN`).
        const READABLE = 1 << 0;
        /// Data can be written (`POLLOUT`, `EPOLLOUT`).
        const WRITABLE = 1 << 1;
        /// The peer hung up (`POLLHUP`, `EPOLLHUP`, `EPOLLRDHUP`).
        const HANGUP = 1 << 2;
        /// An error condition, or an fd the kernel no longer knows (`POLLERR`, `POLLNVAL`).
        const ERROR = 1 << 3;
    }
}

impl Readiness {
    /// The readiness bits that a handler with `interest` is told about.
    ///
    /// Backends may report more than was asked for (poll(2) always reports hang-up and error);
    /// the context masks them with this before it dispatches.
    pub fn mask_for(interest: Interest) -> Readiness {
        let mut mask = Readiness::empty();
        if interest.contains(Interest::READ) {
            mask |= Readiness::READABLE | Readiness::HANGUP | Readiness::ERROR;
        }
        if interest.contains(Interest::WRITE) {
            mask |= Readiness::WRITABLE | Readiness::ERROR;
        }
        mask
    }
}

/// The identity of one registered handler, as a backend stores it in the kernel.
///
/// It is a slot index and a generation packed into a `u64`, the size of an `epoll_event`'s
/// data and of an io_uring `user_data`. The context gives every new handler node a new key,
/// replacement included, so a readiness report that arrives for a key that has since been
/// removed or replaced has a stale generation and is dropped by the context. It is never a
/// pointer, so a stale key can do no harm.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HandlerKey(u64);

impl HandlerKey {
    /// Packs a slot index and a generation.
    pub const fn new(index: u32, generation: u32) -> Self {
        HandlerKey(((generation as u64) << 32) | index as u64)
    }

    /// Rebuilds a key from the value a backend stored in the kernel.
    pub const fn from_u64(raw: u64) -> Self {
        HandlerKey(raw)
    }

    /// The value to store in the kernel (epoll data, io_uring `user_data`).
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// The slot index in the context's handler table.
    pub const fn index(self) -> u32 {
        self.0 as u32
    }

    /// The generation of the slot when this key was handed out.
    pub const fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

impl fmt::Debug for HandlerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HandlerKey({}v{})", self.index(), self.generation())
    }
}

/// A change to the set of watched fds, passed to [`FdMonitor::update`].
///
/// Replacing a handler always produces [`Change::Replace`] with a new key, never an in-place
/// change of the old key's callbacks, so that a readiness report in flight for the old key can
/// be recognised as stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Start watching `fd` for `interest`; report it as `key`.
    Add {
        /// The key to report readiness under.
        key: HandlerKey,
        /// The fd to watch. The context checked that it was open when it was registered.
        fd: RawFd,
        /// What to watch for; never empty.
        interest: Interest,
    },
    /// `fd` is still watched but now belongs to a new handler node: report it as `new` from
    /// now on, for `interest`.
    Replace {
        /// The key the fd was reported under until now.
        old: HandlerKey,
        /// The key to report it under from now on.
        new: HandlerKey,
        /// The fd, unchanged.
        fd: RawFd,
        /// What to watch for now; never empty.
        interest: Interest,
    },
    /// Stop watching `fd`, which was reported as `key`.
    Remove {
        /// The key it was reported under.
        key: HandlerKey,
        /// The fd. It may already be closed; a backend must not fail because of that.
        fd: RawFd,
    },
}

/// The readiness reports of one [`FdMonitor::wait`], owned by the caller and reused.
///
/// The context keeps a few of these and hands one to each `wait`, cleared, so steady-state
/// waits allocate nothing once the buffer has grown to the number of ready fds.
#[derive(Debug, Default)]
pub struct ReadyList {
    entries: Vec<(HandlerKey, Readiness)>,
}

impl ReadyList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that the handler `key` is ready with `readiness`.
    pub fn push(&mut self, key: HandlerKey, readiness: Readiness) {
        self.entries.push((key, readiness));
    }

    /// How many reports the list holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the list holds no reports.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets every report, keeping the capacity.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The reports in the order they were pushed.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (HandlerKey, Readiness)> + '_ {
        self.entries.iter().copied()
    }
}

/// One fd that an outer event loop must watch on the context's behalf, as produced by
/// [`FdMonitor::outer_fds`] (QEMU: the `GPollFD`s a context adds to its `GSource`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OuterFd {
    /// The fd to watch.
    pub fd: RawFd,
    /// What to watch it for.
    pub interest: Interest,
}

/// A backend that watches file descriptors for one context: QEMU's `FDMonOps`.
///
/// # The loop's side of the contract
///
/// * All methods are called on the context's home thread only, never concurrently, and never
///   from inside another method of the same monitor. No context lock is held: the context's
///   state is owned by its thread and borrowed around each call.
/// * [`update`](Self::update) is called once per change, in order, when a handler is added,
///   replaced or removed (including a removal from inside a callback), and when external
///   handlers are disabled or enabled. The fd of an `Add` or `Replace` is open, and stays
///   open naming the same file until its `Remove` has been applied or the monitor dropped
///   (the safety contract of [`update`](Self::update)).
/// * [`wait`](Self::wait) is called at most once per loop iteration, with a cleared
///   [`ReadyList`], and may be called from a nested iteration (a callback that polls the
///   context again) while the outer iteration still holds its own ready list.
/// * Keys are unique among live handlers; the context drops reports for keys that are no longer
///   live, so a backend may report a key after it was removed (io_uring does, until the kernel
///   acknowledges the removal).
///
/// # The monitor's side of the contract
///
/// * Readiness is **level-triggered**: as long as an fd stays ready, every `wait` reports it
///   again. A handler that leaves data unread is called again on the next iteration, on every
///   backend. An edge-triggered kernel interface must be re-armed or re-checked to honour this.
/// * `wait` never reports a key that was not added, and reports each ready key at most once
///   per call.
/// * `wait` retries `EINTR` itself (in exactly one place) and returns early, with what it has,
///   when the timeout expires. A signal must not turn an infinite wait into an error.
/// * `must_wait` never blocks and never makes a system call that can block.
/// * A monitor never calls back into the context and never panics on a closed fd: an fd that
///   was closed while registered is reported as [`Readiness::ERROR`] (poll(2) reports
///   `POLLNVAL`) or silently forgotten (epoll drops closed files), as the backend documents.
///
/// # Implementing
///
/// Write `update` so that it costs O(1) per change and `wait` so that it allocates nothing in
/// steady state; keep per-wait scratch space (a `pollfd` array, an `epoll_event` buffer) in
/// the monitor. Then run the shared conformance suites (crate `aio-conformance` in
/// `crates/conformance`: `monitor_conformance_tests!` and `conformance_tests!`) against it.
pub trait FdMonitor: fmt::Debug {
    /// A short name for logs and for [`AioContext::backend`](crate::AioContext::backend):
    /// `"poll"`, `"epoll"`, `"io_uring"`.
    fn name(&self) -> &'static str;

    /// Applies one change to the watched set (QEMU: `update(ctx, old_node, new_node)`).
    ///
    /// # Errors
    ///
    /// A kernel refusal (`epoll_ctl` failing with `EPERM` for a regular file, `ENOMEM`, …). The
    /// context returns the error to the caller that registered the handler and leaves the
    /// handler unregistered, so nothing is lost silently. `Remove` should not fail; if it does,
    /// the context logs the error and forgets the handler anyway.
    ///
    /// # Safety
    ///
    /// **[FD-1]**: the fd of a [`Change::Add`] or [`Change::Replace`] must be open, and stay
    /// open naming the same open file, from this call until a [`Change::Remove`] of it has been
    /// applied or the monitor is dropped (ARCHITECTURE.md, "Raw fds"). Not every backend checks
    /// (poll and io_uring make no system call in `update`): one that is not open is kept, and
    /// its number used later. A backend gives the kernel the number at any time
    /// until then (`epoll_ctl`, an io_uring `POLL_ADD`, `polling`'s `add`, whose own contract
    /// this is), and may rely on it. The context keeps it: a handler owns its fd, or was
    /// registered through an `unsafe` raw-fd constructor that promised it.
    unsafe fn update(&mut self, change: Change) -> io::Result<()>;

    /// Waits until a watched fd is ready or `timeout` passes, and pushes one report per ready
    /// fd into `ready`. Returns the number of reports pushed.
    ///
    /// `timeout` is `None` to wait without limit, `Some(Duration::ZERO)` to check without
    /// blocking, and otherwise a deadline that should be honoured to the nanosecond where the
    /// kernel allows it (no rounding to milliseconds).
    ///
    /// # Errors
    ///
    /// Only errors that are not `EINTR`. The context counts them (`Stats::wait_errors`) and logs
    /// them; [`AioContext::try_poll`](crate::AioContext::try_poll) returns them, while
    /// [`AioContext::poll`](crate::AioContext::poll) treats the iteration as one in which
    /// nothing was ready and backs off (a growing sleep, capped at 100 ms) so that a wait that
    /// keeps failing is not a busy loop.
    fn wait(&mut self, ready: &mut ReadyList, timeout: Option<Duration>) -> io::Result<usize>;

    /// What the backend knows, without a system call, about whether only [`wait`] can make
    /// progress: `Some(true)` when it has something that only a wait delivers (completions to
    /// reap, submissions to make), `Some(false)` when it has nothing, `None` (the default)
    /// when it cannot tell from userspace (poll, epoll: fd readiness lives in the kernel).
    ///
    /// The context asks before and during busy polling, and stops polling on `Some(true)`
    /// (QEMU's `need_wait`, whose poll and epoll forms answer "whether polling is disabled":
    /// here that is the context's part, the `None` case). Before a zero-timeout iteration it
    /// skips the backend's wait only when this is not `Some(true)` and polling covered every
    /// registered handler (a handler without a poll function, or not in the poll set, depends
    /// on the backend alone); such an iteration makes no system call at all. io_uring, whose
    /// completion ring is readable from userspace, answers `Some`.
    ///
    /// [`wait`]: Self::wait
    fn must_wait(&self) -> Option<bool> {
        None
    }

    /// Called before busy polling when [`must_wait`](Self::must_wait) is `Some(true)`: a
    /// backend that wants a wait only to hand queued work to the kernel (io_uring's re-armed
    /// polls after a dispatch) submits it now, without waiting, so that the loop can poll
    /// instead of going to sleep. The context asks `must_wait` again afterwards. It must not
    /// block and must not report anything (completions stay for the next `wait`). The default
    /// does nothing.
    ///
    /// # Errors
    ///
    /// A submission error; the context then skips polling for this iteration and leaves the
    /// error to `wait`.
    fn prepare_polling(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// The fds that an outer event loop (glib, tokio, another context) must watch for this
    /// monitor to have work, appended to `out`.
    ///
    /// A backend with one kernel object (an epoll fd, a ring fd) reports only that; the poll
    /// backend reports every watched fd.
    fn outer_fds(&self, out: &mut Vec<OuterFd>);

    /// Whether requests the backend carries itself (io_uring's `add_sqe`) have completed and
    /// wait, reaped by an earlier [`wait`](Self::wait), for the context's completion sources
    /// ([`AioContext::add_completion_source`](crate::AioContext::add_completion_source)): work
    /// that an outer loop's `check` must report even when no fd was ready. The default,
    /// `false`, is for backends that carry no requests.
    fn has_completions(&self) -> bool {
        false
    }

    /// The monitor as its concrete type, for crates that use a backend's own capabilities
    /// through [`AioContext::with_backend`](crate::AioContext::with_backend) (the block I/O
    /// engine submits requests on the io_uring backend's ring this way), without core knowing
    /// the backend's types. The default, `None`, offers nothing.
    fn as_any_mut(&mut self) -> Option<&mut dyn Any> {
        None
    }
}

/// A monitor that watches nothing and never sleeps: what stands in for a context's monitor
/// while the rest of the context is dropped, and a backend for tests that never wait.
#[derive(Debug)]
pub(crate) struct NoFds;

impl FdMonitor for NoFds {
    fn name(&self) -> &'static str {
        "none"
    }

    unsafe fn update(&mut self, _change: Change) -> io::Result<()> {
        Ok(())
    }

    fn wait(&mut self, _ready: &mut ReadyList, _timeout: Option<Duration>) -> io::Result<usize> {
        Ok(0)
    }

    fn outer_fds(&self, _out: &mut Vec<OuterFd>) {}
}

impl FdMonitor for Box<dyn FdMonitor> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    unsafe fn update(&mut self, change: Change) -> io::Result<()> {
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { (**self).update(change) }
    }
    fn wait(&mut self, ready: &mut ReadyList, timeout: Option<Duration>) -> io::Result<usize> {
        (**self).wait(ready, timeout)
    }
    fn must_wait(&self) -> Option<bool> {
        (**self).must_wait()
    }
    fn prepare_polling(&mut self) -> io::Result<()> {
        (**self).prepare_polling()
    }
    fn outer_fds(&self, out: &mut Vec<OuterFd>) {
        (**self).outer_fds(out)
    }
    fn has_completions(&self) -> bool {
        (**self).has_completions()
    }
    fn as_any_mut(&mut self) -> Option<&mut dyn Any> {
        (**self).as_any_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trips() {
        let k = HandlerKey::new(7, 0xdead_beef);
        assert_eq!(k.index(), 7);
        assert_eq!(k.generation(), 0xdead_beef);
        assert_eq!(HandlerKey::from_u64(k.as_u64()), k);
    }

    #[test]
    fn masks_follow_qemu() {
        assert_eq!(
            Readiness::mask_for(Interest::READ),
            Readiness::READABLE | Readiness::HANGUP | Readiness::ERROR
        );
        assert_eq!(
            Readiness::mask_for(Interest::WRITE),
            Readiness::WRITABLE | Readiness::ERROR
        );
    }
}
