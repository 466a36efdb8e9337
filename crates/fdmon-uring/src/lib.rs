//! The io_uring backend of aio: [`UringMonitor`], an [`FdMonitor`] that watches fds with
//! one-shot `IORING_OP_POLL_ADD` requests on a Linux io_uring.
//!
//! C original: `util/fdmon-io_uring.c` in QEMU. This crate owns the ring, the state of every
//! poll request it has in the kernel, and the one `wait` loop that submits and reaps them.
//!
//! # Why io_uring
//!
//! io_uring is a pair of queues shared between the kernel and the process: the process writes
//! requests into the submission queue and the kernel posts their results into the completion
//! queue. For an event loop that brings four things that neither poll(2) nor epoll has:
//!
//! 1. **Batching.** Every change an iteration makes to the watched set (handlers added,
//!    replaced, removed) and the wait itself go to the kernel in *one* `io_uring_enter`. epoll
//!    needs one `epoll_ctl` per change plus the `epoll_wait`.
//! 2. **Completions are readable from userspace.** The completion queue is mapped memory, so
//!    [`must_wait`](FdMonitor::must_wait) can tell whether an fd became ready by reading it,
//!    without a system call. A loop that busy-polls in userspace (adaptive polling) can
//!    therefore watch fds too, and only enters the kernel when something is there to reap.
//! 3. **Nanosecond timeouts.** A `TIMEOUT` request takes a `timespec`, so a wait ends at the
//!    deadline rather than at the next millisecond (epoll) and no second call is needed to get
//!    sub-millisecond precision.
//! 4. **O(1) per ready fd.** Like epoll, and unlike poll(2), the cost of a wait does not grow
//!    with the number of idle fds: an idle fd's poll request simply sits in the kernel.
//!
//! # Opcodes
//!
//! * `IORING_OP_POLL_ADD`: watch one fd. Each registered handler has exactly one in flight,
//!   with `user_data` = its [`HandlerKey`]. It is one-shot: it completes once, with the poll
//!   mask that was ready, and is then re-armed.
//! * `IORING_OP_POLL_REMOVE`: cancel the poll of a handler that was removed or replaced, found by
//!   its `user_data`. Its own completion carries a reserved tag and is ignored.
//! * `IORING_OP_TIMEOUT`: added to a blocking wait that has a finite, nonzero timeout, as an
//!   absolute `CLOCK_MONOTONIC` deadline with a completion count of 1: it completes at the
//!   deadline, or as soon as any other completion is posted, so it rarely outlives its wait.
//!   The absolute deadline lets a wait that must sleep again (after a signal, or after a
//!   completion that was not a report) keep the same request and the same deadline.
//! * `IORING_OP_NOP`: only for outer loops, to make the ring fd readable (see "Outer loops").
//! * `IORING_OP_ASYNC_CANCEL`: cancel a caller's request (see "Requests").
//!
//! # Requests
//!
//! Besides its polls, the ring carries requests prepared by crates built on the loop (QEMU 11's
//! `aio_add_sqe`; `blockio` submits file I/O this way): [`add_sqe`](UringMonitor::add_sqe) queues
//! an SQE together with the memory it points at, the next wait submits it with the iteration's
//! polls, and its completion goes on a ready list that
//! [`pop_completion`](UringMonitor::pop_completion) takes from, handing the memory back. Waits
//! return as soon as a request completes and do not sleep while completions wait on the ready
//! list. Dropping the monitor cancels and reaps every request still in the kernel before its
//! memory is freed.
//!
//! A ring may also carry one registered buffer table
//! ([`register_buffers`](UringMonitor::register_buffers), `IORING_REGISTER_BUFFERS`) that
//! `READ_FIXED`/`WRITE_FIXED` requests name by index; the monitor keeps the table's memory
//! until the ring is closed (ARCHITECTURE.md, rule [URING-5]). `blockio`'s `FixedBufPool`
//! is its user.
//!
//! # Glossary
//!
//! * **SQ / SQE**: the submission queue (ring) and one entry in it, a request.
//! * **CQ / CQE**: the completion queue (ring) and one entry in it, a request's result: the
//!   request's `user_data` and a result (`res`), here a poll mask or a negative errno.
//! * **Submit**: tell the kernel about the SQEs written so far (`io_uring_enter`), optionally
//!   waiting for CQEs in the same call.
//! * **Reap**: read the posted CQEs and free their slots (no system call).
//! * **Re-arm**: submit a new `POLL_ADD` for a handler whose previous one completed.
//! * **Stale**: a poll request whose handler was removed or replaced since it was submitted.
//!
//! # Single writer
//!
//! The queues are only touched by methods that take `&mut self`: [`update`](FdMonitor::update)
//! only records the change (no system call, no queue access), and [`wait`](FdMonitor::wait)
//! turns recorded changes into SQEs, submits, and reaps; [`prepare_polling`](FdMonitor::prepare_polling)
//! does the submission part early, before the context busy-polls. [`must_wait`](FdMonitor::must_wait) and
//! [`outer_fds`](FdMonitor::outer_fds) only read the rings. `UringMonitor` is `Send` but not `Sync`, so
//! the compiler enforces what QEMU states as a rule ("sq/cq rings are only modified within
//! `fdmon_io_uring_wait()`"). It needs no lock-free list either, because every change comes
//! from the context's home thread.
//!
//! # Level-triggered on a one-shot kernel interface
//!
//! The context's handlers are level-triggered: a handler that leaves data unread is called
//! again on the next iteration. A `POLL_ADD` is one-shot, so the monitor re-arms it right after
//! reaping its completion; the re-arm is queued and goes out with the next `wait`'s
//! submission, and if the fd is still ready the kernel completes the new poll during that very
//! submission (it checks readiness before it starts waiting). The next wait therefore reports
//! the fd again, just as poll(2) would, and a wait never reports a key twice, because a re-arm
//! queued by a wait is only submitted by the next one.
//!
//! Multishot polls (`IORING_POLL_ADD_MULTI`) were considered and rejected: a multishot poll
//! posts a completion when the fd's wait queue is woken, which is edge-triggered. An fd whose
//! data is left unread is not woken again, so level-triggering would need a re-check of every
//! reported fd on every iteration, and the saving (one SQE per ready fd, inside a submission
//! that happens anyway) is small. QEMU makes the same choice.
//!
//! # Identity
//!
//! A completion names its request only by `user_data`, and that is the handler's
//! [`HandlerKey`]: a slot index and a generation, never a pointer. Nothing is allocated per
//! request and nothing has to stay alive until a completion arrives, so no completion can refer
//! to freed memory, however late it comes; QEMU's deferred freeing of handler nodes "once their
//! POLL_ADD completes" has no counterpart here.
//!
//! The monitor keeps one more invariant: **at most one `POLL_ADD` in flight per key** (see
//! `pending.rs`). A removal turns the key's poll "stale" and queues a `POLL_REMOVE`; whatever
//! the stale poll's completion says (cancelled, or readiness that raced with the removal), it
//! is recognised and dropped. A replacement ([`Change::Replace`]) is a removal of the old key
//! plus an add under the new key, so a completion still in flight for the old key can never be
//! reported under the new one; QEMU does the same. A `POLL_REMOVE` with the update flags
//! (Linux 5.13) could retarget the in-flight poll to the new key and mask in one request, but
//! when the old poll has already completed the update fails, and the new `POLL_ADD` could only
//! go out after that failure is seen: a second round trip, and a second code path, to save one
//! SQE on replacements, which are rare. The context never reuses a key, but if a caller does (removes a key and adds it
//! again while the old poll is still in flight), the new `POLL_ADD` is held back until the old
//! one's completion has been reaped, so even then two requests never share a `user_data`.
//!
//! The monitor's own requests use reserved `user_data` tags whose slot index is `u32::MAX`;
//! `user_data.rs` explains why the context can never hand out such a key, and `update`
//! refuses one anyway.
//!
//! # Timeouts and signals
//!
//! `wait(None)` waits for at least one completion; `wait(Some(ZERO))` submits without waiting
//! and reaps what is there; any other timeout adds a `TIMEOUT` request for the absolute
//! deadline. A completion that is not a report (a stale poll's end, a `POLL_REMOVE`'s result, an
//! older timeout) wakes the kernel wait but not the caller: the loop in `wait` goes back to
//! sleep until a report arrives or the deadline passes. The same loop is the one place where
//! an interrupted `io_uring_enter` (`EINTR`, or a return before the wanted completion arrived)
//! is retried; because the deadline is absolute, a retry neither extends nor shortens the
//! wait, and the timeout request already in flight is reused.
//!
//! # Outer loops
//!
//! An outer event loop (glib, or another context) watches the ring fd
//! ([`outer_fds`](FdMonitor::outer_fds)), which is readable while completions are waiting, and
//! calls `wait` with a zero timeout when it is. A poll the kernel has not been given cannot make
//! the ring fd readable, yet the re-arms a wait queues are only submitted by the next wait. A
//! context that runs its own loop always comes back to `wait`; an outer loop comes back only
//! when the ring fd is readable or its own timeout expires. So once `outer_fds` has been
//! called, a wait that leaves submissions queued ends by submitting a `NOP`: its completion
//! makes the ring fd readable at once, the outer loop runs one more iteration, and that
//! iteration's `wait` submits the re-arms. They are deliberately not submitted at the end of
//! the reporting wait itself: the handlers have not run yet at that point, and a re-arm would
//! capture readiness that the handler is about to consume, to be reported again as a spurious
//! event. The price is one extra iteration (and `io_uring_enter`) per reporting iteration of an
//! outer loop; QEMU pays it in its GSource `prepare`, which submits after dispatch.
//!
//! Changes made by the callbacks of an outer-loop iteration whose `wait` reported nothing (a
//! bottom half that registers a handler, say) are not covered: no monitor method runs between
//! them and the outer loop's sleep, so the new poll reaches the kernel only when the outer loop
//! wakes for another reason. Only the context can close that gap, by asking
//! [`must_wait`](FdMonitor::must_wait) before it lets an outer loop sleep (QEMU's GSource
//! `prepare` submits at that point).
//!
//! # Platforms
//!
//! Linux 5.6 or later (`IORING_REGISTER_PROBE`, `IORING_FEAT_NODROP`), with io_uring not
//! disabled by `kernel.io_uring_disabled` or a seccomp filter. [`UringMonitor::probe`] says
//! whether that holds, and [`UringMonitor::new_checked`] creates a monitor only if it does;
//! falling back to epoll or poll when it does not is the facade's job, not
//! this crate's.

#![cfg(target_os = "linux")]
#![deny(missing_docs)]

mod pending;
mod requests;
mod ring;
mod user_data;

pub use io_uring::squeue::Entry as Sqe;
pub use requests::{Completion, KeepAlive, RequestId};

use std::any::Any;
use std::cell::Cell;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use aio_core::{Change, FdMonitor, HandlerKey, Interest, OuterFd, ReadyList};

use crate::pending::{Outcome, Polls, Submission};
use crate::requests::{Requests, Submit};
use crate::ring::{Ring, SqFull, deadline_after, monotonic_now};
use crate::user_data::{CANCEL_TAG, REMOVE_TAG, Tag, WAKE_TAG, next_timeout_seq, timeout_tag};

/// Submission queue size: QEMU's `FDMON_IO_URING_ENTRIES`. It bounds how many requests one
/// `io_uring_enter` hands over, not how many fds can be watched: when a batch of changes
/// fills the queue, `wait` submits what is there and goes on filling. The completion queue
/// is twice as large, and completions that still do not fit are kept by the kernel
/// (`IORING_FEAT_NODROP`) and fetched by the next submission.
const ENTRIES: u32 = 128;

/// An [`FdMonitor`] that watches fds with one-shot io_uring `POLL_ADD` requests.
///
/// See the [crate documentation](crate) for the design. In short: [`update`](FdMonitor::update)
/// records a change in O(1) without a system call; [`wait`](FdMonitor::wait) submits every
/// recorded change, the re-arms of the previous wait and, for a finite timeout, a `TIMEOUT`,
/// all in one `io_uring_enter` that also waits; [`must_wait`](FdMonitor::must_wait) reads the
/// shared rings.
///
/// Readiness is level-triggered. An fd that is closed while registered is reported as
/// [`Readiness::ERROR`](aio_core::Readiness::ERROR) once, when the kernel fails its next
/// `POLL_ADD` with `EBADF`, and is then no longer watched (a warning is logged); note that a
/// poll already in flight holds its own reference to the open file, so closing the fd does not
/// end that poll: it completes if the file becomes ready, and the re-arm then fails.
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
/// use fdmon_uring::UringMonitor;
///
/// if let Err(e) = UringMonitor::probe() {
///     eprintln!("io_uring unavailable: {e}");
///     return Ok(());
/// }
/// let (mut writer, reader) = UnixStream::pair()?;
/// let mut monitor = UringMonitor::new()?;
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
pub struct UringMonitor {
    /// The kernel object. Only `wait` submits to it or reaps from it.
    ring: Ring,
    /// Registrations, the state of their polls, and the submissions waiting for `wait`.
    polls: Polls,
    /// Completions reaped by the current wait, as `(user_data, res)`; kept to reuse its
    /// capacity.
    cqes: Vec<(u64, i32)>,
    /// The most recent `TIMEOUT` that is still in flight, if any.
    timeout: Option<ArmedTimeout>,
    /// The sequence number for the next `TIMEOUT`.
    next_timeout: u32,
    /// Whether an outer loop may be sleeping on the ring fd: set by `outer_fds`, which takes
    /// `&self`, hence the `Cell` (which also keeps the type `!Sync`).
    outer_loop: Cell<bool>,
    /// The kernel's count of dropped completions when it was last checked.
    dropped_seen: u32,
    /// Requests added with [`add_sqe`](Self::add_sqe), the memory they keep alive, and their
    /// completions waiting to be taken.
    requests: Requests,
}

/// A `TIMEOUT` request in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ArmedTimeout {
    /// Its sequence number (see `user_data.rs`).
    seq: u32,
    /// The absolute `CLOCK_MONOTONIC` time at which it expires.
    deadline: Duration,
}

/// When a wait must return if nothing is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deadline {
    /// Right away: submit, reap, return.
    Now,
    /// At this absolute `CLOCK_MONOTONIC` time.
    At(Duration),
    /// Never: only a report ends the wait.
    Never,
}

impl UringMonitor {
    /// Creates a monitor with a fresh ring of 128 submission entries, watching nothing yet.
    ///
    /// # Errors
    ///
    /// Everything that makes io_uring unusable here: `ENOSYS` (kernel without io_uring),
    /// `EPERM` (`kernel.io_uring_disabled` set, or a seccomp filter), `EMFILE`/`ENFILE`,
    /// `ENOMEM`, or [`io::ErrorKind::Unsupported`] for a kernel older than 5.6 or one that lacks
    /// an opcode the monitor needs. The message says which.
    ///
    /// # Examples
    ///
    /// ```
    /// use aio_core::FdMonitor;
    /// use fdmon_uring::UringMonitor;
    ///
    /// match UringMonitor::new() {
    ///     Ok(monitor) => {
    ///         assert_eq!(monitor.name(), "io_uring");
    ///         assert!(monitor.is_empty());
    ///     }
    ///     Err(e) => eprintln!("io_uring unavailable: {e}"),
    /// }
    /// ```
    pub fn new() -> io::Result<Self> {
        Ok(UringMonitor {
            ring: Ring::new(ENTRIES)?,
            polls: Polls::default(),
            cqes: Vec::new(),
            timeout: None,
            next_timeout: 0,
            outer_loop: Cell::new(false),
            dropped_seen: 0,
            requests: Requests::default(),
        })
    }

    /// Tells whether io_uring works in this process: sets up a ring exactly as
    /// [`new`](Self::new) does, submits one no-op request through it and checks its
    /// completion, then closes it.
    ///
    /// The round trip matters: some seccomp profiles allow `io_uring_setup` but refuse
    /// `io_uring_enter`. A backend chooser calls this once and falls back to epoll or poll on
    /// `Err`; a test calls it to skip, with the error as the printed reason.
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new), plus a failing `io_uring_enter`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fdmon_uring::UringMonitor;
    ///
    /// match UringMonitor::probe() {
    ///     Ok(()) => println!("io_uring available"),
    ///     Err(e) => println!("io_uring unavailable: {e}"),
    /// }
    /// ```
    pub fn probe() -> io::Result<()> {
        Self::new_checked().map(drop)
    }

    /// As [`new`](Self::new), and then the [`probe`](Self::probe)'s round trip through the new
    /// ring itself: a monitor whose `io_uring_enter` would be refused (so that every wait
    /// fails) is never handed out. What a backend chooser uses; it costs one `io_uring_enter`
    /// more than `new` and no second ring.
    ///
    /// # Errors
    ///
    /// As [`probe`](Self::probe).
    ///
    /// # Examples
    ///
    /// ```
    /// use aio_core::FdMonitor;
    /// use fdmon_uring::UringMonitor;
    ///
    /// match UringMonitor::new_checked() {
    ///     Ok(monitor) => assert_eq!(monitor.name(), "io_uring"),
    ///     Err(e) => eprintln!("io_uring unusable here: {e}"),
    /// }
    /// ```
    pub fn new_checked() -> io::Result<Self> {
        let mut monitor = Self::new()?;
        // A fresh ring: nothing is queued yet, and the NOP's completion is reaped by the round
        // trip, so the monitor's own bookkeeping never sees it.
        monitor.ring.round_trip()?;
        Ok(monitor)
    }

    /// Every registered handler: its key, its fd and what it is watched for, in no particular
    /// order.
    ///
    /// The facade uses this to move a context's handlers to another backend.
    ///
    /// # Examples
    ///
    /// ```
    /// use aio_core::{Change, FdMonitor, HandlerKey, Interest};
    /// use fdmon_uring::UringMonitor;
    ///
    /// # let Ok(mut monitor) = UringMonitor::new() else { return Ok(()) };
    /// let key = HandlerKey::new(3, 0);
    /// // SAFETY: [FD-1]: fd 0 (stdin) stays open for the life of the process.
    /// unsafe { monitor.update(Change::Add { key, fd: 0, interest: Interest::READ }) }?;
    /// assert_eq!(monitor.registrations().collect::<Vec<_>>(), [(key, 0, Interest::READ)]);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn registrations(&self) -> impl Iterator<Item = (HandlerKey, RawFd, Interest)> + '_ {
        self.polls.registrations()
    }

    /// How many handlers are registered.
    ///
    /// # Examples
    ///
    /// ```
    /// use aio_core::{Change, FdMonitor, HandlerKey, Interest};
    /// use fdmon_uring::UringMonitor;
    ///
    /// # let Ok(mut monitor) = UringMonitor::new() else { return Ok(()) };
    /// // SAFETY: [FD-1]: fd 0 (stdin) stays open for the life of the process.
    /// unsafe { monitor.update(Change::Add { key: HandlerKey::new(0, 0), fd: 0, interest: Interest::READ }) }?;
    /// assert_eq!(monitor.len(), 1);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.polls.len()
    }

    /// Whether no handler is registered.
    ///
    /// # Examples
    ///
    /// ```
    /// use fdmon_uring::UringMonitor;
    ///
    /// # let Ok(monitor) = UringMonitor::new() else { return };
    /// assert!(monitor.is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.polls.len() == 0
    }

    /// How many times this monitor has called `io_uring_enter`. For tests and benchmarks that
    /// count system calls; not part of the stable API.
    #[doc(hidden)]
    pub fn enter_calls(&self) -> u64 {
        self.ring.enters()
    }

    /// Adds a prepared request to the ring (QEMU 11's `aio_add_sqe`): it goes to the kernel
    /// with the next [`wait`](FdMonitor::wait) (or [`prepare_polling`](FdMonitor::prepare_polling)),
    /// in the same `io_uring_enter` as every other request and poll of that iteration. Its
    /// `user_data` is replaced by the monitor's own tag. When its completion is reaped, it goes
    /// on the monitor's ready list, to be taken with [`pop_completion`](Self::pop_completion)
    /// together with `keep`; a wait that reaps one returns even if no fd was ready, and a wait
    /// that starts while completions are waiting there does not sleep.
    ///
    /// A full submission queue is no error: requests wait in the monitor until there is room,
    /// and a submission refused for lack of kernel resources (`EAGAIN`, `EBUSY`) is retried by
    /// the next wait.
    ///
    /// # Errors
    ///
    /// Gives `entry` and `keep` back if 2³¹ − 3 requests are already live.
    ///
    /// # Safety
    ///
    /// Every piece of memory `entry` points at (buffers, iovec arrays, paths, timespecs) must
    /// be owned by `keep` (heap memory that does not move when the box does) or be `'static`,
    /// and must not be used by anything else until the completion hands `keep` back. The
    /// monitor keeps `keep` alive until then, and when it is dropped it cancels and reaps every
    /// request still in the kernel before it frees their memory (ARCHITECTURE.md, rule
    /// [URING-2]).
    pub unsafe fn add_sqe(
        &mut self,
        entry: Sqe,
        keep: KeepAlive,
    ) -> Result<RequestId, (Sqe, KeepAlive)> {
        // Queued, not pushed into the submission queue yet: until the next wait submits it,
        // a cancel takes it back before the kernel sees it.
        self.requests.add(entry, keep)
    }

    /// Registers a fixed-buffer table with the ring (`IORING_REGISTER_BUFFERS`): buffer `i` is
    /// `iovecs[i]`, and `IORING_OP_READ_FIXED`/`WRITE_FIXED` requests added with
    /// [`add_sqe`](Self::add_sqe) may then name it by index, which spares the kernel pinning
    /// and unpinning the pages on every request. The monitor keeps `keep`, the owner of the
    /// memory, until the ring is closed (after every request has been reaped), so the memory
    /// outlives the registration whatever the caller drops. A ring has at most one table; it
    /// is never unregistered.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::AlreadyExists`] if a table is registered already,
    /// [`io::ErrorKind::Unsupported`] on a kernel older than 5.13 or without the fixed
    /// opcodes, or the kernel's refusal (`ENOMEM` past `RLIMIT_MEMLOCK`, `EPERM` under a
    /// seccomp filter, `EINVAL` for more than 16 384 buffers or one over 1 GiB). The caller
    /// then uses plain `READ`/`WRITE` requests.
    ///
    /// # Safety
    ///
    /// Every iovec describes memory owned by `keep` (heap memory that stays allocated at the
    /// same address while any clone of `keep` lives); and every fixed request added later
    /// that names buffer `i` owns, through its keep-alive, the exclusive use of buffer `i`
    /// until its completion (ARCHITECTURE.md, rule [URING-5]).
    pub unsafe fn register_buffers(
        &mut self,
        iovecs: &[libc::iovec],
        keep: Arc<dyn Any + Send + Sync>,
    ) -> io::Result<()> {
        // SAFETY: [URING-5]: the caller's contract is the ring's.
        unsafe { self.ring.register_buffers(iovecs, keep) }
    }

    /// The owner of the ring's registered buffer table (the `keep` given to
    /// [`register_buffers`](Self::register_buffers)), if one is registered: a caller compares
    /// it with its own (`Arc::as_ptr`) to know whether its buffers are this ring's.
    pub fn registered_buffers(&self) -> Option<&Arc<dyn Any + Send + Sync>> {
        self.ring.registered_buffers()
    }

    /// Cancels a request added with [`add_sqe`](Self::add_sqe). Returns false if it has
    /// completed already (its completion may still be waiting to be taken). Otherwise it
    /// completes later, through the ready list as usual: with `-ECANCELED` if it had not
    /// reached the kernel yet or the kernel stopped it (`IORING_OP_ASYNC_CANCEL`, sent with
    /// the next submission), or with its own result if it was too late to stop.
    pub fn cancel_request(&mut self, id: RequestId) -> bool {
        self.requests.cancel(id)
    }

    /// Takes the oldest completed request off the ready list (QEMU's
    /// `cqe_handler_ready_list`), with the memory it kept alive.
    ///
    /// The ready list has one consumer: whoever added the requests (the block I/O engine,
    /// through its completion source). Anyone else who takes a completion here takes it from
    /// that consumer, whose callback for it then never runs, and whose table slot a later
    /// request reuses.
    pub fn pop_completion(&mut self) -> Option<Completion> {
        self.requests.pop_done()
    }

    /// How many completed requests wait on the ready list for [`pop_completion`](Self::pop_completion).
    pub fn completions_waiting(&self) -> usize {
        self.requests.done_len()
    }

    /// How many requests added with [`add_sqe`](Self::add_sqe) have not completed yet
    /// (queued or in the kernel).
    pub fn requests_in_flight(&self) -> usize {
        self.requests.live()
    }

    /// How many `POLL_ADD` requests are queued or in the kernel, including stale ones whose
    /// completion has not been reaped yet. A handler whose poll completed and whose re-arm
    /// waits for the next `wait` is not counted. For tests; not part of the stable API.
    #[doc(hidden)]
    pub fn polls_in_flight(&self) -> usize {
        self.polls.in_flight()
    }

    /// How many `POLL_ADD` requests of removed or replaced handlers are queued or in the kernel.
    /// For tests; not part of the stable API.
    #[doc(hidden)]
    pub fn stale_polls(&self) -> usize {
        self.polls.stale()
    }

    /// Turns queued submissions into SQEs until the queue is empty or the SQ is full. Returns
    /// whether it stopped because the SQ is full, in which case the caller submits and calls
    /// again.
    fn fill(&mut self) -> bool {
        loop {
            let Some(sub) = self.polls.pop() else {
                return self.fill_requests();
            };
            let pushed = match sub {
                Submission::PollAdd {
                    user_data,
                    fd,
                    events,
                } => self.ring.push_poll_add(fd, events, user_data),
                Submission::PollRemove { target } => self.ring.push_poll_remove(target, REMOVE_TAG),
            };
            if pushed == Err(SqFull) {
                // Kept for the next round rather than lost.
                self.polls.unpop(sub);
                return true;
            }
        }
    }

    /// Puts queued cancels and requests into the SQ, after the polls. Returns whether it
    /// stopped because the SQ is full.
    fn fill_requests(&mut self) -> bool {
        let ring = &mut self.ring;
        self.requests.submit_with(|sub| {
            match sub {
                Submit::Cancel(target) => ring.push_cancel(target, CANCEL_TAG),
                // SAFETY: [URING-2]: the keep-alive stays in its slot of `requests` until reaped.
                Submit::Request(entry) => unsafe { ring.push_request(entry) },
            }
            .is_ok()
        })
    }

    /// Makes sure a `TIMEOUT` expiring at `deadline` is in flight or queued. Returns false if
    /// the SQ has no room for it (the caller submits first and tries again).
    fn arm_timeout(&mut self, deadline: Duration) -> bool {
        // After an interrupted or spurious wake-up, the timeout submitted earlier in this wait
        // is still in flight for the same absolute deadline: reuse it.
        if self.timeout.is_some_and(|t| t.deadline == deadline) {
            return true;
        }
        let seq = self.next_timeout;
        if self.ring.push_timeout(deadline, timeout_tag(seq)).is_err() {
            return false;
        }
        self.next_timeout = next_timeout_seq(seq);
        // An older timeout still in flight (its wait ended early for another reason) is
        // forgotten: it completes with the next completion posted, or at its own deadline,
        // and its tag then no longer matches.
        self.timeout = Some(ArmedTimeout { seq, deadline });
        true
    }

    /// Reaps every posted completion: pushes reports into `ready`, re-queues polls, moves
    /// request completions to the ready list, and notes whether this wait's timeout expired.
    /// Returns the number of reports pushed plus the number of requests completed.
    fn reap(&mut self, ready: &mut ReadyList, expired: &mut bool) -> usize {
        self.cqes.clear();
        self.ring.drain(&mut self.cqes);
        let mut reported = 0;
        for &(user_data, res) in &self.cqes {
            match Tag::decode(user_data) {
                Tag::Handler(_) => {
                    if let Outcome::Report(key, readiness) = self.polls.complete(user_data, res) {
                        ready.push(key, readiness);
                        reported += 1;
                    }
                }
                Tag::Timeout(seq) => {
                    if self.timeout.is_some_and(|t| t.seq == seq) {
                        self.timeout = None;
                        // -ETIME: the deadline passed. 0: another completion ended it, and the
                        // wait decides whether to go on sleeping.
                        *expired |= res == -libc::ETIME;
                    }
                }
                // Only there to make the ring fd readable; its job is done.
                Tag::Wake => {}
                Tag::Request(slot) => {
                    if self.requests.finish(slot, res) {
                        reported += 1;
                    } else {
                        tracing::warn!(slot, res, "io_uring: completion of an unknown request");
                    }
                }
                Tag::Cancel => {
                    // 0: cancelled; ENOENT: it had completed; EALREADY: it is running and
                    // will complete by itself. Its own completion follows (or came) anyway.
                    if res < 0 && res != -libc::ENOENT && res != -libc::EALREADY {
                        tracing::debug!(res, "io_uring: ASYNC_CANCEL failed");
                    }
                }
                Tag::Remove => {
                    // 0: cancelled; ENOENT: its poll had completed already; EALREADY: it is
                    // completing. In every case the poll's own completion follows (or came).
                    if res < 0 && res != -libc::ENOENT && res != -libc::EALREADY {
                        tracing::debug!(res, "io_uring: POLL_REMOVE failed");
                    }
                }
            }
        }
        let dropped = self.ring.dropped_completions();
        if dropped != self.dropped_seen {
            // Only possible if the kernel could not allocate an overflowed completion: some
            // poll's completion is lost and its handler will not be reported again.
            tracing::error!(
                dropped = dropped.wrapping_sub(self.dropped_seen),
                "io_uring: the kernel dropped completions; some fds may no longer be watched"
            );
            self.dropped_seen = dropped;
        }
        reported
    }
}

impl FdMonitor for UringMonitor {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    /// Records `change` in O(1), amortized; makes no system call and touches neither ring.
    /// The `POLL_ADD` and `POLL_REMOVE` requests go out with the next
    /// [`wait`](FdMonitor::wait). A change undone before then (an add followed by a remove)
    /// costs no request at all.
    ///
    /// `Replace` removes the old key's poll and adds one under the new key, with the new
    /// interest; a completion still in flight for the old key is dropped when it arrives.
    ///
    /// # Errors
    ///
    /// * [`io::ErrorKind::InvalidInput`] for an `Add` of a key that is already registered, a
    ///   `Replace` to a key that is already registered (other than the old key), an empty
    ///   interest, a negative fd, a `Replace` whose fd differs from the registered one, or a
    ///   key whose slot index is `u32::MAX` (reserved for the monitor's own requests).
    /// * [`io::ErrorKind::NotFound`] for a `Replace` or `Remove` of a key that is not
    ///   registered.
    ///
    /// On error the monitor is unchanged. Two keys may watch the same fd.
    unsafe fn update(&mut self, change: Change) -> io::Result<()> {
        match change {
            Change::Add { key, fd, interest } => self.polls.add(key, fd, interest),
            Change::Replace {
                old,
                new,
                fd,
                interest,
            } => self.polls.modify(old, new, fd, interest),
            Change::Remove { key, fd: _ } => self.polls.remove(key),
        }
    }

    /// Submits every recorded change, the re-arms queued by the previous wait and, for a
    /// finite nonzero timeout, a `TIMEOUT`, then sleeps until a report or the deadline, then
    /// reaps.
    ///
    /// In steady state that is one `io_uring_enter`. More happen only when a batch does not fit
    /// in the 128-entry submission queue (one per full queue), when the kernel overflowed the
    /// completion queue, or when a completion that is not a report (a stale poll's end, the
    /// result of a `POLL_REMOVE`) ends the kernel's wait early: the wait then goes back to
    /// sleep, so that it returns only with a report or at the deadline. `Some(ZERO)` never
    /// sleeps, and makes no system call at all when there is nothing to submit. With nothing
    /// registered, `None` blocks for good, as poll(2) with no fds would.
    ///
    /// # Errors
    ///
    /// Whatever `io_uring_enter` fails with other than `EINTR` (which is retried with the
    /// remaining time): `EBUSY`/`EAGAIN` when the kernel is out of resources for new requests,
    /// `ENOMEM`. Requests that were not submitted stay queued and go out with the next wait.
    fn wait(&mut self, ready: &mut ReadyList, timeout: Option<Duration>) -> io::Result<usize> {
        let deadline = match timeout {
            Some(t) if t.is_zero() => Deadline::Now,
            Some(t) => deadline_after(monotonic_now(), t).map_or(Deadline::Never, Deadline::At),
            None => Deadline::Never,
        };
        self.polls.begin_wait();
        // Completions of requests that a nested wait reaped and nobody has taken yet are work
        // for this iteration: the wait must not sleep over them.
        let mut reported = self.requests.done_len();
        // Whether this wait's own TIMEOUT reported that the deadline passed.
        let mut expired = false;
        // Set for the last round of an outer loop's wait: submit the wake-up NOP, reap nothing.
        let mut waking = false;
        loop {
            let sq_full = self.fill();
            // Sleep only when everything is submitted, nothing has been reported yet, and no
            // completion is already waiting to be reaped.
            let mut want = 0;
            if !sq_full && !waking && reported == 0 && !self.ring.has_completions() {
                match deadline {
                    Deadline::Now => {}
                    Deadline::Never => want = 1,
                    Deadline::At(at) if !expired => {
                        if self.arm_timeout(at) {
                            want = 1;
                        }
                    }
                    Deadline::At(_) => {}
                }
            }
            match self.ring.submit_and_wait(want) {
                Ok(()) => {}
                // The one place where an interrupted wait is retried. A signal either fails
                // the call before anything was submitted (EINTR) or, after submitting, returns
                // the number submitted before the wanted completion arrived; both end up here
                // and fall through to reap, and the loop sleeps again with the same absolute
                // deadline and the same TIMEOUT request, so a signal neither ends nor extends
                // the wait.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Drain the completion queue before giving up: older kernels refuse new
                    // submissions (EBUSY) until overflowed completions fit in the queue again.
                    // The context drops the reports of a failed wait, but every reported key's
                    // re-arm is queued, so a still-ready fd is reported again next time.
                    self.reap(ready, &mut expired);
                    return Err(e);
                }
            }
            if waking {
                break;
            }
            reported += self.reap(ready, &mut expired);
            if sq_full || self.ring.cq_overflowed() || self.polls.has_urgent() {
                // More to submit, completions the kernel kept aside, or polls that reaping
                // released for this very wait (a registration re-added under the key of a
                // stale poll that just ended, or a live poll the kernel cancelled): another
                // round. None of those keys was reported by this wait, so submitting them now
                // cannot report a key twice.
                continue;
            }
            let done = reported > 0
                || match deadline {
                    Deadline::Now => true,
                    Deadline::Never => false,
                    Deadline::At(at) => expired || monotonic_now() >= at,
                };
            if !done {
                continue;
            }
            if self.outer_loop.get() && self.polls.has_work() {
                // An outer loop sleeps on the ring fd, outside `wait`, and the re-arms this
                // wait queued are not in the kernel yet: post a NOP so that the ring fd is
                // readable and the outer loop comes back to submit them (see "Outer loops").
                // The SQ is empty here, everything having just been submitted.
                if self.ring.push_nop(WAKE_TAG).is_ok() {
                    waking = true;
                    continue;
                }
            }
            break;
        }
        Ok(ready.len())
    }

    /// QEMU's rule for io_uring: `Some(true)` if completions are waiting in the completion
    /// ring, SQEs are queued but not submitted, or changes and re-arms are waiting for a
    /// `wait`, all three read from memory, without a system call; `Some(false)` otherwise.
    ///
    /// Never `None`: this backend sees every fd's readiness in the completion ring as soon as
    /// the kernel posts it, so a busy-polling loop that asks this question starves no handler.
    fn must_wait(&self) -> Option<bool> {
        Some(
            self.ring.has_completions()
                || self.ring.has_unsubmitted()
                || self.polls.has_work()
                || self.requests.has_work(),
        )
    }

    /// Submits the re-arms and changes queued since the last wait, without waiting, so that a
    /// context can busy-poll right after a dispatch instead of going to sleep to submit them
    /// (QEMU's `need_wait` says "wait" as long as SQEs are pending). Completions are left in
    /// the ring for the next wait, which reports them: a key reported by the last wait can
    /// only be reported again by the next one, as when that wait submits the re-arm itself.
    /// Does nothing while completions are waiting (polling yields to them anyway).
    fn prepare_polling(&mut self) -> io::Result<()> {
        if self.ring.has_completions() {
            return Ok(());
        }
        // The start of the next wait's submission, done early.
        self.polls.begin_wait();
        self.fill();
        match self.ring.submit_and_wait(0) {
            Err(e) if e.kind() != io::ErrorKind::Interrupted => Err(e),
            _ => Ok(()),
        }
    }

    /// Appends the ring fd, for read interest: it is readable while completions are waiting.
    ///
    /// Calling this tells the monitor that an outer loop may sleep on the ring fd, so from then
    /// on a [`wait`](FdMonitor::wait) that leaves re-arms queued makes the ring fd readable
    /// before it returns, so that the outer loop comes back to submit them (see the crate
    /// documentation, "Outer loops").
    /// Whether completed requests wait on the ready list ([`pop_completion`](Self::pop_completion)).
    fn has_completions(&self) -> bool {
        self.requests.done_len() > 0
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn Any> {
        Some(self)
    }

    fn outer_fds(&self, out: &mut Vec<OuterFd>) {
        self.outer_loop.set(true);
        out.push(OuterFd {
            fd: self.ring.as_fd().as_raw_fd(),
            interest: Interest::READ,
        });
    }
}

impl Drop for UringMonitor {
    /// Requests the kernel never saw are freed; every request in the kernel is cancelled and
    /// its completion reaped before its memory is freed, so that the kernel never writes to
    /// freed memory ([URING-2]). If the ring fails for another reason than a
    /// signal, the memory of the requests still in the kernel is leaked instead, on purpose,
    /// and an error is logged.
    fn drop(&mut self) {
        self.requests.cancel_all();
        let mut cqes = Vec::new();
        while self.requests.in_kernel() > 0 {
            self.fill_requests();
            let want = usize::from(!self.ring.has_completions());
            match self.ring.submit_and_wait(want) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::error!(
                        requests = self.requests.in_kernel(),
                        "io_uring: cannot reap the requests in flight at drop ({e}); \
                         leaking their buffers"
                    );
                    self.requests.leak_in_kernel();
                    return;
                }
            }
            cqes.clear();
            self.ring.drain(&mut cqes);
            for &(user_data, res) in &cqes {
                if let Tag::Request(slot) = Tag::decode(user_data) {
                    self.requests.finish(slot, res);
                }
            }
            // Their memory is freed here, the kernel being done with it.
            while self.requests.pop_done().is_some() {}
        }
    }
}

impl AsFd for UringMonitor {
    /// The ring fd.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl fmt::Debug for UringMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringMonitor")
            .field("registrations", &DebugRegistrations(self))
            .field("in_flight", &self.polls.in_flight())
            .field("ring", &self.ring)
            .finish_non_exhaustive()
    }
}

/// Formats [`UringMonitor::registrations`] as a list without collecting it.
struct DebugRegistrations<'a>(&'a UringMonitor);

impl fmt::Debug for DebugRegistrations<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.registrations()).finish()
    }
}
