//! The ring: a thin wrapper over the `io-uring` crate that owns every `unsafe` of this crate, the
//! `io_uring_enter` calls, and the translation between aio-core's flag types and poll bits.
//!
//! The rest of the crate sees a [`Ring`] that can queue four kinds of submission (`POLL_ADD`,
//! `POLL_REMOVE`, `TIMEOUT`, `NOP`), submit them (optionally waiting for completions), and hand over
//! the completions as `(user_data, result)` pairs. What those mean is decided elsewhere
//! (`pending.rs`, `lib.rs`); this file only knows the kernel ABI.
//!
//! # Memory the kernel reads
//!
//! Pushing a submission is `unsafe` in the `io-uring` crate because an entry may point at
//! memory the kernel reads or writes later. The `SAFETY` comments here cite the rules
//! [URING-1]..[URING-4] of ARCHITECTURE.md ("The kernel boundary"): of our own opcodes only
//! `TIMEOUT` points at anything, the ring's one boxed [`Timespec`] ([URING-3]); `POLL_ADD`,
//! `POLL_REMOVE`, `ASYNC_CANCEL` and `NOP` carry only numbers ([URING-1]); a caller's request
//! brings its memory along ([URING-2]); a registered buffer table is kept alive by the ring
//! itself ([URING-5]).
//!
//! # Threads
//!
//! [`Ring`] is `Send` but not `Sync`: all of its methods that touch the queues take `&mut self`,
//! except the two read-only peeks behind `must_wait`, whose soundness relies on no other thread
//! holding a queue at the same time ([URING-4]). The `PhantomData<Cell<()>>` marker makes that a
//! compile-time fact.

use std::any::Any;
use std::cell::Cell;
use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use aio_core::{Interest, Readiness};
use io_uring::{IoUring, Probe, opcode, squeue, types};

/// A submission could not be queued because every slot of the submission queue is taken; the
/// caller submits what is queued and tries again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SqFull;

/// An io_uring instance set up for fd monitoring.
pub(crate) struct Ring {
    /// The kernel object and its two mapped queues. Declared first so that it is dropped
    /// before `timespec`: no entry can be left in the submission queue that outlives the
    /// memory it points at.
    ring: IoUring,
    /// The deadline of the latest `TIMEOUT` entry, read by the kernel when that entry is
    /// submitted. Every `TIMEOUT` entry in the submission queue points at this box ([URING-3]).
    timespec: Box<types::Timespec>,
    /// The owner of the memory registered as the ring's fixed-buffer table, if any. Declared
    /// after `ring`, so that it is dropped only once the ring is closed, when no request can
    /// name the table any more (the kernel may unpin the pages later, in its own teardown: the
    /// pins hold the pages themselves, not our allocation's use of them) ([URING-5]); never
    /// replaced while the ring lives.
    buffers: Option<Arc<dyn Any + Send + Sync>>,
    /// How many times `io_uring_enter` was called, for the tests that count system calls.
    enters: u64,
    /// Not `Sync`: see the module documentation.
    _not_sync: PhantomData<Cell<()>>,
}

impl Ring {
    /// Sets up a ring with `entries` submission slots (the completion queue gets twice as many)
    /// and checks that the kernel supports everything the monitor uses.
    ///
    /// No setup flags are used, deliberately. `COOP_TASKRUN` and `DEFER_TASKRUN` would save the
    /// kernel an interrupt per completion, but they leave completions unposted until our thread
    /// next enters the kernel, so the completion queue would no longer show readiness to a
    /// thread that polls it from userspace (`must_wait`). `SQPOLL` would burn a kernel thread
    /// per context. `SINGLE_ISSUER` would forbid moving the monitor to another thread.
    ///
    /// # Errors
    ///
    /// `io_uring_setup` failing: `ENOSYS` (no io_uring in this kernel), `EPERM` (disabled by
    /// the `kernel.io_uring_disabled` sysctl, or refused by a seccomp filter), `EMFILE`/`ENFILE`
    /// (out of fds), `ENOMEM`. [`io::ErrorKind::Unsupported`] if the kernel lacks
    /// `IORING_FEAT_NODROP` (Linux 5.5) or one of the opcodes `POLL_ADD`, `POLL_REMOVE`,
    /// `TIMEOUT`, or cannot say which opcodes it has (`IORING_REGISTER_PROBE`, Linux 5.6).
    pub(crate) fn new(entries: u32) -> io::Result<Ring> {
        let ring = IoUring::new(entries).map_err(|e| context(e, "io_uring_setup"))?;
        // Without NODROP a full completion queue drops completions, and a dropped POLL_ADD
        // completion is a handler that is never re-armed: never reported again, silently.
        if !ring.params().is_feature_nodrop() {
            return Err(unsupported(
                "the kernel may drop io_uring completions (no IORING_FEAT_NODROP, Linux < 5.5)",
            ));
        }
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| context(e, "IORING_REGISTER_PROBE (Linux 5.6)"))?;
        for (code, name) in [
            (opcode::PollAdd::CODE, "POLL_ADD"),
            (opcode::PollRemove::CODE, "POLL_REMOVE"),
            (opcode::Timeout::CODE, "TIMEOUT"),
        ] {
            if !probe.is_supported(code) {
                return Err(unsupported(&format!(
                    "the kernel's io_uring lacks IORING_OP_{name}"
                )));
            }
        }
        Ok(Ring {
            ring,
            timespec: Box::new(types::Timespec::new()),
            buffers: None,
            enters: 0,
            _not_sync: PhantomData,
        })
    }

    /// Submits one `NOP` and checks its completion: proof that `io_uring_enter` works too, since
    /// a seccomp filter may allow `io_uring_setup` and still refuse `io_uring_enter`.
    ///
    /// A `NOP` completes while it is submitted, so there is nothing to wait for, and an enter
    /// without a wait cannot be interrupted by a signal.
    pub(crate) fn round_trip(&mut self) -> io::Result<()> {
        let entry = opcode::Nop::new().build().user_data(0);
        // SAFETY: [URING-1]: a NOP points at no memory; pushing can only fail for lack of room.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            return Err(io::Error::other(
                "a fresh io_uring has no free submission slot",
            ));
        }
        self.submit_and_wait(0)
            .map_err(|e| context(e, "io_uring_enter"))?;
        match self.ring.completion().next().map(|cqe| cqe.result()) {
            Some(0) => Ok(()),
            Some(res) => Err(context(io::Error::from_raw_os_error(-res), "IORING_OP_NOP")),
            None => Err(io::Error::other(
                "io_uring_enter submitted a NOP but posted no completion",
            )),
        }
    }

    /// Whether every submission slot is taken.
    pub(crate) fn sq_is_full(&mut self) -> bool {
        self.ring.submission().is_full()
    }

    /// Queues a one-shot `POLL_ADD` of `fd` for the poll bits `events`, completing with
    /// `user_data`.
    pub(crate) fn push_poll_add(
        &mut self,
        fd: RawFd,
        events: u32,
        user_data: u64,
    ) -> Result<(), SqFull> {
        let entry = opcode::PollAdd::new(types::Fd(fd), events)
            .build()
            .user_data(user_data);
        // SAFETY: [URING-1]: a POLL_ADD holds an fd number, a poll mask and a user_data.
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| SqFull)
    }

    /// Queues a `POLL_REMOVE` of the poll whose `user_data` is `target`, completing with
    /// `user_data`.
    pub(crate) fn push_poll_remove(&mut self, target: u64, user_data: u64) -> Result<(), SqFull> {
        let entry = opcode::PollRemove::new(target).build().user_data(user_data);
        // The target's user_data travels in the entry's `addr` field, as a plain number.
        // SAFETY: [URING-1]: a POLL_REMOVE holds its target's user_data, never dereferenced.
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| SqFull)
    }

    /// Queues a `TIMEOUT` that expires at `deadline` on `CLOCK_MONOTONIC` (an absolute time,
    /// as returned by [`monotonic_now`]) or as soon as one other completion is posted after it,
    /// whichever comes first, completing with `user_data`.
    ///
    /// The completion's result is `-ETIME` if the deadline passed, `0` if another completion
    /// ended it first.
    ///
    /// `deadline` must be representable as a `timespec` ([`deadline_after`] guarantees it).
    pub(crate) fn push_timeout(
        &mut self,
        deadline: Duration,
        user_data: u64,
    ) -> Result<(), SqFull> {
        if self.sq_is_full() {
            return Err(SqFull);
        }
        *self.timespec = types::Timespec::from(deadline);
        let entry = opcode::Timeout::new(&*self.timespec)
            .count(1)
            .flags(types::TimeoutFlags::ABS)
            .build()
            .user_data(user_data);
        // SAFETY: [URING-3]: the entry points at `*self.timespec`, which outlives the ring's queue.
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| SqFull)
    }

    /// Queues a `NOP`, completing with `user_data` as soon as it is submitted.
    pub(crate) fn push_nop(&mut self, user_data: u64) -> Result<(), SqFull> {
        let entry = opcode::Nop::new().build().user_data(user_data);
        // SAFETY: [URING-1]: a NOP points at no memory, so nothing has to outlive it.
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| SqFull)
    }

    /// Queues an `ASYNC_CANCEL` of the request whose `user_data` is `target`, completing with
    /// `user_data`.
    pub(crate) fn push_cancel(&mut self, target: u64, user_data: u64) -> Result<(), SqFull> {
        let entry = opcode::AsyncCancel::new(target)
            .build()
            .user_data(user_data);
        // SAFETY: [URING-1]: an ASYNC_CANCEL holds its target's user_data, never dereferenced.
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| SqFull)
    }

    /// Queues a request prepared by a caller of `UringMonitor::add_sqe`.
    ///
    /// # Safety
    ///
    /// Every piece of memory `entry` points at must stay valid (and, for memory the kernel
    /// writes, not be accessed by anything else) until the entry's completion has been reaped
    /// or the ring is gone. `requests.rs` keeps that memory in the request's slot for exactly
    /// that long ([URING-2]).
    pub(crate) unsafe fn push_request(&mut self, entry: &squeue::Entry) -> Result<(), SqFull> {
        // SAFETY: [URING-2]: the caller's contract is the crate's part of the push's contract.
        unsafe { self.ring.submission().push(entry) }.map_err(|_| SqFull)
    }

    /// Registers `iovecs` as the ring's fixed-buffer table (`IORING_REGISTER_BUFFERS`) and keeps
    /// `keep`, their owner, until the ring is closed. A ring has at most one table, never
    /// unregistered.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::AlreadyExists`] if a table is registered already;
    /// [`io::ErrorKind::Unsupported`] on a kernel older than 5.13 (`IORING_FEAT_RSRC_TAGS`:
    /// before it, registering waits for every request in flight, and a poll may never end) or
    /// without `READ_FIXED`/`WRITE_FIXED`; the kernel's refusal otherwise (`ENOMEM` past
    /// `RLIMIT_MEMLOCK`, `EINVAL`, `EFAULT`, `EPERM` under seccomp), with the call named.
    ///
    /// # Safety
    ///
    /// Every iovec describes memory owned by `keep`, which stays allocated at the same address
    /// while any clone of `keep` lives ([URING-5]).
    pub(crate) unsafe fn register_buffers(
        &mut self,
        iovecs: &[libc::iovec],
        keep: Arc<dyn Any + Send + Sync>,
    ) -> io::Result<()> {
        if self.buffers.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "this io_uring has a registered buffer table already",
            ));
        }
        if !self.ring.params().is_feature_resource_tagging() {
            return Err(unsupported(
                "registering buffers on a ring with requests in flight needs Linux 5.13 \
                 (IORING_FEAT_RSRC_TAGS)",
            ));
        }
        let mut probe = Probe::new();
        self.ring
            .submitter()
            .register_probe(&mut probe)
            .map_err(|e| context(e, "IORING_REGISTER_PROBE"))?;
        if !probe.is_supported(opcode::ReadFixed::CODE)
            || !probe.is_supported(opcode::WriteFixed::CODE)
        {
            return Err(unsupported(
                "the kernel's io_uring lacks IORING_OP_READ_FIXED or IORING_OP_WRITE_FIXED",
            ));
        }
        // SAFETY: [URING-5]: the iovecs point into `keep`'s memory, kept below until the ring closes.
        unsafe { self.ring.submitter().register_buffers(iovecs) }
            .map_err(|e| context(e, "IORING_REGISTER_BUFFERS"))?;
        self.buffers = Some(keep);
        Ok(())
    }

    /// The owner of the registered buffer table, if one is registered.
    pub(crate) fn registered_buffers(&self) -> Option<&Arc<dyn Any + Send + Sync>> {
        self.buffers.as_ref()
    }

    /// Submits every queued entry and, if `want` is 1, sleeps until at least one completion is
    /// posted. One `io_uring_enter`, or none at all when there is nothing to submit, nothing to
    /// wait for and no overflowed completion that could be fetched (there is no room for one
    /// while the completion queue is full).
    ///
    /// Returns the kernel's error unchanged, `EINTR` included: the caller retries, in one place,
    /// because only it knows the deadline. An interrupted wait whose entries were submitted
    /// returns `Ok` (the kernel reports the entries it took), so "returned before the wanted
    /// completion arrived" also looks like success; the caller checks for completions either
    /// way.
    pub(crate) fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        let sq = self.ring.submission();
        let (nothing_to_submit, overflowed, taskrun) =
            (sq.is_empty(), sq.cq_overflow(), sq.taskrun());
        drop(sq);
        // Overflowed completions can only be fetched into free slots: with the queue still
        // full, an enter would fetch nothing, so it waits until the caller has reaped.
        let fetch = overflowed && !self.ring.completion().is_full();
        let idle = want == 0 && nothing_to_submit && !fetch && !taskrun;
        if idle {
            return Ok(());
        }
        self.enters += 1;
        // The crate adds IORING_ENTER_GETEVENTS itself when `want > 0` or when completions
        // overflowed, so that the kernel moves overflowed completions into the queue.
        self.ring.submit_and_wait(want).map(drop)
    }

    /// Moves every posted completion into `out` as `(user_data, result)`, in the order the
    /// kernel posted them, and frees their slots.
    pub(crate) fn drain(&mut self, out: &mut Vec<(u64, i32)>) {
        out.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
    }

    /// Whether the kernel holds completions that did not fit in the completion queue and must
    /// be fetched with an `io_uring_enter` (the next [`submit_and_wait`](Self::submit_and_wait)
    /// does that).
    pub(crate) fn cq_overflowed(&mut self) -> bool {
        self.ring.submission().cq_overflow()
    }

    /// How many completions the kernel dropped because the completion queue was full. With
    /// `IORING_FEAT_NODROP` (required by [`new`](Self::new)) this only grows if the kernel
    /// could not allocate memory for an overflowed completion.
    pub(crate) fn dropped_completions(&mut self) -> u32 {
        self.ring.completion().overflow()
    }

    /// Whether completions are waiting in the completion queue. Reads the shared ring, no
    /// system call.
    pub(crate) fn has_completions(&self) -> bool {
        // SAFETY: [URING-4]: no other view of the completion queue exists while `&self` lives.
        let cq = unsafe { self.ring.completion_shared() };
        !cq.is_empty()
    }

    /// Whether entries are queued in the submission queue but not yet submitted. Reads the
    /// shared ring, no system call.
    pub(crate) fn has_unsubmitted(&self) -> bool {
        // Dropping the view stores back the tail it read, which changes nothing.
        // SAFETY: [URING-4]: no other view of the submission queue exists while `&self` lives.
        let sq = unsafe { self.ring.submission_shared() };
        !sq.is_empty()
    }

    /// How many times `io_uring_enter` was called.
    pub(crate) fn enters(&self) -> u64 {
        self.enters
    }
}

impl AsFd for Ring {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("fd", &self.ring.as_fd())
            .field("sq_entries", &self.ring.params().sq_entries())
            .field("enters", &self.enters)
            .finish_non_exhaustive()
    }
}

/// The current time on `CLOCK_MONOTONIC`, the clock that absolute io_uring timeouts use.
///
/// `std::time::Instant` reads the same clock on Linux but does not expose the value, and an
/// absolute timeout needs it. Goes through the vDSO: no system call.
pub(crate) fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: [SYS-2]: `ts` is a live, exclusively borrowed timespec for clock_gettime to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    // CLOCK_MONOTONIC always exists on Linux and the pointer is valid, so this cannot fail.
    debug_assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    // The monotonic clock is never negative.
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// The absolute `CLOCK_MONOTONIC` deadline `timeout` from `now`, or `None` if it cannot be
/// written as a kernel timespec (more than `i64::MAX` seconds away, about 292 billion years),
/// which callers treat as "no deadline".
pub(crate) fn deadline_after(now: Duration, timeout: Duration) -> Option<Duration> {
    now.checked_add(timeout)
        .filter(|d| i64::try_from(d.as_secs()).is_ok())
}

/// The poll bits a `POLL_ADD` asks for: read interest is `POLLIN`, write interest `POLLOUT`.
///
/// Hang-up and error need no bit: io_uring, like poll(2), always reports them.
pub(crate) fn interest_to_poll(interest: Interest) -> u32 {
    let mut events = 0;
    if interest.contains(Interest::READ) {
        events |= libc::POLLIN as u32;
    }
    if interest.contains(Interest::WRITE) {
        events |= libc::POLLOUT as u32;
    }
    events
}

/// What a `POLL_ADD` completion's (non-negative) result, a poll mask, means to the context.
///
/// `POLLPRI` (urgent data) counts as readable, `POLLRDHUP` as hang-up, and `POLLNVAL` as an
/// error, exactly as in the poll backend.
pub(crate) fn poll_to_readiness(mask: u32) -> Readiness {
    let has = |bits: libc::c_short| mask & bits as u32 != 0;
    let mut readiness = Readiness::empty();
    if has(libc::POLLIN | libc::POLLPRI) {
        readiness |= Readiness::READABLE;
    }
    if has(libc::POLLOUT) {
        readiness |= Readiness::WRITABLE;
    }
    if has(libc::POLLHUP | libc::POLLRDHUP) {
        readiness |= Readiness::HANGUP;
    }
    if has(libc::POLLERR | libc::POLLNVAL) {
        readiness |= Readiness::ERROR;
    }
    readiness
}

/// Prefixes `err` with the operation that failed, keeping its kind, and explains the two
/// errnos that mean "io_uring is not available here".
fn context(err: io::Error, what: &str) -> io::Error {
    let hint = match err.raw_os_error() {
        Some(libc::ENOSYS) => " (this kernel has no io_uring)",
        Some(libc::EPERM) => {
            " (io_uring is disabled by the kernel.io_uring_disabled sysctl or refused by a \
             seccomp filter)"
        }
        _ => "",
    };
    io::Error::new(err.kind(), format!("{what}: {err}{hint}"))
}

/// An [`io::ErrorKind::Unsupported`] error.
fn unsupported(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interest_maps_to_pollin_and_pollout() {
        assert_eq!(interest_to_poll(Interest::READ), libc::POLLIN as u32);
        assert_eq!(interest_to_poll(Interest::WRITE), libc::POLLOUT as u32);
        assert_eq!(
            interest_to_poll(Interest::READ | Interest::WRITE),
            (libc::POLLIN | libc::POLLOUT) as u32
        );
        assert_eq!(interest_to_poll(Interest::empty()), 0);
    }

    #[test]
    fn masks_map_to_readiness() {
        let r = |bits: libc::c_short| poll_to_readiness(bits as u32);
        assert_eq!(poll_to_readiness(0), Readiness::empty());
        assert_eq!(r(libc::POLLIN), Readiness::READABLE);
        assert_eq!(r(libc::POLLPRI), Readiness::READABLE);
        assert_eq!(r(libc::POLLOUT), Readiness::WRITABLE);
        assert_eq!(r(libc::POLLHUP), Readiness::HANGUP);
        assert_eq!(r(libc::POLLRDHUP), Readiness::HANGUP);
        assert_eq!(r(libc::POLLERR), Readiness::ERROR);
        assert_eq!(r(libc::POLLNVAL), Readiness::ERROR);
        assert_eq!(
            r(libc::POLLIN | libc::POLLOUT | libc::POLLHUP),
            Readiness::READABLE | Readiness::WRITABLE | Readiness::HANGUP
        );
    }

    #[test]
    fn deadlines_are_exact_or_absent() {
        let now = Duration::new(100, 5);
        assert_eq!(
            deadline_after(now, Duration::from_micros(1500)),
            Some(Duration::new(100, 1_500_005))
        );
        assert_eq!(deadline_after(now, Duration::MAX), None);
        assert_eq!(
            deadline_after(now, Duration::from_secs(i64::MAX as u64)),
            None
        );
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_now();
        let b = monotonic_now();
        assert!(b >= a);
        assert!(a > Duration::ZERO);
    }
}
