//! fd handlers: the callbacks registered for a file descriptor, the table that maps
//! [`HandlerKey`]s to them, the registration builder and the RAII [`FdHandler`] handle.
//!
//! C original: `AioHandler`, `aio_set_fd_handler` and `aio_remove_fd_handler` in
//! `util/aio-posix.c`, and the deletion rules that `QemuLockCnt` enforces there (docs/qemu-semantics.md §6–§7).
//!
//! # Deletion while dispatching
//!
//! A handler may be removed at any time on the home thread, including from inside its own
//! callback or another callback of the same iteration. Removal marks the node deleted, takes it
//! out of the table (bumping the slot's generation, so any readiness report still in flight for
//! its key is recognised as stale) and tells the monitor. The node itself is reference-counted:
//! a dispatch that is walking a ready list holds its own reference, so the node, and the
//! closures it owns, are freed only when the last walker lets go (QEMU frees deleted nodes "in
//! the outermost visitor"). Every dispatch step re-checks the deleted mark, between the read and
//! the write callback too, so a removed handler never runs again.
//!
//! # Re-entrancy
//!
//! A callback is taken out of its node while it runs and put back afterwards. A nested poll
//! started from inside that callback therefore cannot call it again: it skips the handler, which
//! stays ready (level-triggered) and is dispatched by a later iteration once the outer callback
//! has returned. QEMU would call it recursively; Rust's `FnMut` cannot be re-entered.

use crate::fdmon::registrations::FdMap;
use crate::fdmon::{HandlerKey, Interest};
use crate::polling::Window;
use crate::remote::Gate;
use crate::sync::Arc;
use crate::{AioContext, ContextHandle, EventNotifier};
use std::any::Any;
use std::cell::{Cell, OnceCell};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::rc::{Rc, Weak};

/// A read or write callback. It gets the context, so that it can poll it again (a nested
/// iteration) or register handlers without capturing a clone of it, which would be a reference
/// cycle.
pub(crate) type IoCallback = Box<dyn FnMut(&AioContext)>;
/// A userspace polling callback: "is there work?" (QEMU `io_poll`).
pub(crate) type PollCallback = Box<dyn FnMut() -> bool>;
/// A polling-mode notification (QEMU `io_poll_begin` / `io_poll_end`).
pub(crate) type PollModeCallback = Box<dyn FnMut()>;

/// What a node is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeKind {
    /// A handler registered by the user.
    User,
    /// The context's own wake-up notifier; its activity never counts as progress.
    Notifier,
}

/// The userspace-polling callbacks of a handler (QEMU `io_poll`, `io_poll_ready`,
/// `io_poll_begin`, `io_poll_end`). Each is taken out of its cell while it runs, like the read
/// and write callbacks, so none can be re-entered by a nested poll.
#[derive(Default)]
pub(crate) struct PollCallbacks {
    pub(crate) poll: Cell<Option<PollCallback>>,
    pub(crate) ready: Cell<Option<IoCallback>>,
    pub(crate) begin: Cell<Option<PollModeCallback>>,
    pub(crate) end: Cell<Option<PollModeCallback>>,
}

impl PollCallbacks {
    /// Whether the handler can be served by polling: it needs both a poll function and a
    /// poll-ready callback (QEMU ignores an `io_poll` without `io_poll_ready`).
    fn usable(&self) -> bool {
        let poll = self.poll.take();
        let ready = self.ready.take();
        let usable = poll.is_some() && ready.is_some();
        self.poll.set(poll);
        self.ready.set(ready);
        usable
    }
}

/// One registered handler (QEMU `AioHandler`). Never changed after registration apart from its
/// dispatch bookkeeping: replacing a handler creates a new node.
///
/// `O` is the fd's owner, in the node's own allocation: a node is built as
/// `Rc<HandlerNode<F>>` and used as `Rc<HandlerNode>` (`O = dyn Any`), so owning an fd costs
/// no allocation of its own.
pub(crate) struct HandlerNode<O: ?Sized = dyn Any> {
    pub(crate) key: HandlerKey,
    pub(crate) fd: RawFd,
    pub(crate) interest: Interest,
    pub(crate) kind: NodeKind,
    /// Excluded from monitoring and dispatch while external handlers are disabled.
    pub(crate) external: bool,
    read: Cell<Option<IoCallback>>,
    write: Cell<Option<IoCallback>>,
    pub(crate) poll: PollCallbacks,
    /// Whether the handler can be served by userspace polling (see [`Self::can_poll`]).
    pollable: bool,
    /// Whether it takes part in polling through the backend, without a poll function
    /// ([`HandlerBuilder::poll_in_backend`]).
    backend_polled: bool,
    /// Its polling window or estimate (QEMU `AioPolledEvent`).
    pub(crate) window: Cell<Window>,
    /// Whether it is in the context's poll set (QEMU `node_poll` inserted).
    pub(crate) in_poll_set: Cell<bool>,
    /// When (in ns of the context's realtime clock) it leaves the poll set unless polling
    /// finds it ready before (QEMU `poll_idle_timeout`; `None` until the first polling phase
    /// that sees it).
    pub(crate) idle_deadline: Cell<Option<u64>>,
    /// Set while its poll-ready callback runs: polling skips it, so a nested poll cannot find
    /// the same condition again and recurse (QEMU removes it from the poll list meanwhile).
    pub(crate) poll_paused: Cell<bool>,
    /// Whether `on_poll_begin` ran and `on_poll_end` has not run since.
    begun: Cell<bool>,
    /// Set once, when the handler is removed or replaced.
    pub(crate) deleted: Cell<bool>,
    /// The isolation scope it belongs to (see `scope.rs`): held, out of the monitor, while
    /// an inner scope is active.
    pub(crate) scope: u64,
    /// Whether the monitor currently watches this node's fd under its key.
    pub(crate) in_monitor: Cell<bool>,
    /// The id of the last iteration that dispatched this node (for an fd report or a poll
    /// hit); a parent iteration skips a report or hit that a nested iteration has dispatched
    /// since (QEMU steals the node from the parent's ready list), and a poll hit is skipped
    /// when the fd path dispatched the node in the same iteration.
    pub(crate) epoch: Cell<u64>,
    /// Shared with the [`RemoteFdHandler`] of a handler registered through a
    /// [`ContextHandle`]: checked (entered) before each callback starts, so that a removal
    /// from another thread takes effect at once ([Gate-1]). Unset for home-thread handlers
    /// until [`FdHandler::into_remote`] sets it.
    gate: OnceCell<Arc<Gate>>,
    /// The fd's owner, given to the safe `fd_handler` (`()` for a raw fd): it keeps the
    /// number open, naming the same file, for as long as the node exists, which outlasts its
    /// registration in the monitor ("Raw fds" in ARCHITECTURE.md). Only ever dropped. Last,
    /// as an unsized field must be, and so dropped after the callbacks.
    _owner: O,
}

impl HandlerNode {
    /// Runs the read callback if there is one and it is not already running. Returns whether it
    /// ran.
    pub(crate) fn call_read(&self, ctx: &AioContext) -> bool {
        self.call_with(&self.read, |f| f(ctx)).is_some()
    }

    /// Runs the write callback if there is one and it is not already running.
    pub(crate) fn call_write(&self, ctx: &AioContext) -> bool {
        self.call_with(&self.write, |f| f(ctx)).is_some()
    }

    /// Whether the handler was removed through its remote handle
    /// ([`RemoteFdHandler::remove`]) but is still in the table: the home thread then removes it
    /// instead of dispatching it.
    pub(crate) fn remotely_removed(&self) -> bool {
        self.gate.get().is_some_and(|g| g.is_closed())
    }

    /// Takes the callback out of `slot`, runs `run` on it and puts it back (see
    /// [`take_and_call`]), if the handler's gate (remote handlers only) admits a new
    /// invocation ([Gate-1]).
    fn call_with<F: ?Sized, R>(
        &self,
        slot: &Cell<Option<Box<F>>>,
        run: impl FnOnce(&mut Box<F>) -> R,
    ) -> Option<R> {
        let _entered = match self.gate.get() {
            Some(gate) => Some(gate.enter()?),
            None => None,
        };
        take_and_call(slot, &self.deleted, run)
    }

    /// Whether the handler can join the poll set: the context's own notifier (its poll is a
    /// read of `notified`), or a user handler with both `on_poll` and `on_poll_ready`. Whether
    /// a zero-timeout iteration may skip the backend's wait is decided per iteration by the
    /// context (every user handler must be in the poll set and have been polled), so a
    /// handler that is not polled is always waited for.
    pub(crate) fn can_poll(&self) -> bool {
        self.pollable
    }

    /// Whether the handler joins the poll set with no poll function of its own, its readiness
    /// seen by a backend that shows it in userspace ([`HandlerBuilder::poll_in_backend`]).
    /// Polling never calls or counts it: a zero-timeout iteration that polled skips the
    /// backend's wait only if the backend says it has nothing (`must_wait`).
    pub(crate) fn polls_in_backend(&self) -> bool {
        self.backend_polled && !self.pollable
    }

    /// Runs the poll function (`None` if there is none or it is already running).
    pub(crate) fn call_poll(&self) -> Option<bool> {
        self.call_with(&self.poll.poll, |f| f())
    }

    /// Runs the poll-ready callback, with polling of this handler paused meanwhile. Returns
    /// whether it ran.
    pub(crate) fn call_poll_ready(&self, ctx: &AioContext) -> bool {
        self.poll_paused.set(true);
        struct Unpause<'a>(&'a Cell<bool>);
        impl Drop for Unpause<'_> {
            fn drop(&mut self) {
                self.0.set(false);
            }
        }
        let _unpause = Unpause(&self.poll_paused);
        self.call_with(&self.poll.ready, |f| f(ctx)).is_some()
    }

    /// Puts the handler in polling mode: `on_poll_begin`, unless it is in it already.
    pub(crate) fn begin_poll_mode(&self) {
        if !self.begun.replace(true) {
            self.call_with(&self.poll.begin, |f| f());
        }
    }

    /// Takes the handler out of polling mode: `on_poll_end`, only if `on_poll_begin` ran
    /// (so the two alternate whatever callbacks do meanwhile, removals and panics included).
    pub(crate) fn end_poll_mode(&self) {
        if self.begun.replace(false) {
            self.call_with(&self.poll.end, |f| f());
        }
    }
}

/// Takes the callback out of `slot`, runs `run` on it and puts it back, unless the handler was
/// deleted meanwhile. Returns `None` if the slot was empty (no callback, or it is running).
fn take_and_call<F: ?Sized, R>(
    slot: &Cell<Option<Box<F>>>,
    deleted: &Cell<bool>,
    run: impl FnOnce(&mut Box<F>) -> R,
) -> Option<R> {
    let cb = slot.take()?;
    struct PutBack<'a, F: ?Sized> {
        slot: &'a Cell<Option<Box<F>>>,
        deleted: &'a Cell<bool>,
        cb: Option<Box<F>>,
    }
    impl<F: ?Sized> Drop for PutBack<'_, F> {
        fn drop(&mut self) {
            // A handler removed from inside its own callback is done: free the closure now
            // rather than keep it until the node goes. Otherwise put it back, also when
            // unwinding from a panic, so the handler keeps working.
            if !self.deleted.get() {
                self.slot.set(self.cb.take());
            }
        }
    }
    let mut guard = PutBack {
        slot,
        deleted,
        cb: Some(cb),
    };
    guard.cb.as_mut().map(run)
}

impl fmt::Debug for HandlerNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerNode")
            .field("key", &self.key)
            .field("fd", &self.fd)
            .field("interest", &self.interest)
            .field("kind", &self.kind)
            .field("external", &self.external)
            .field("deleted", &self.deleted.get())
            .finish()
    }
}

/// The live handlers of one context, by key and by fd.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// The live handler of each fd. A map sized by the registrations, not a vector indexed by
    /// fd number: with 10 000 fds open in the process, such a vector cost 160 KiB in every
    /// context that watched one high fd (issue 17). [`IntHasher`] keeps a lookup one multiply.
    ///
    /// [`IntHasher`]: crate::registrations::IntHasher
    by_fd: FdMap<HandlerKey>,
    /// How many live user handlers there are (the context's notifier excluded): a zero-timeout
    /// iteration skips the backend's wait only if polling covered that many.
    users: usize,
}

#[derive(Debug, Default)]
struct Slot {
    generation: u32,
    node: Option<Rc<HandlerNode>>,
}

impl Registry {
    /// Reserves a key for a node that is about to be inserted.
    pub(crate) fn next_key(&mut self) -> HandlerKey {
        match self.free.last() {
            Some(&index) => HandlerKey::new(index, self.slots[index as usize].generation),
            None => {
                let index = u32::try_from(self.slots.len()).expect("more than 2^32 handlers");
                self.slots.push(Slot::default());
                self.free.push(index);
                HandlerKey::new(index, 0)
            }
        }
    }

    pub(crate) fn insert(&mut self, node: Rc<HandlerNode>) {
        let key = node.key;
        // Claim the index `next_key` reserved. It is normally the last free one, but look it up
        // by value so that no order of insert and remove can hand one index out twice.
        let at = self.free.iter().rposition(|&i| i == key.index());
        let claimed = at.map(|at| self.free.swap_remove(at));
        debug_assert_eq!(claimed, Some(key.index()), "insert must follow next_key");
        let slot = &mut self.slots[key.index() as usize];
        debug_assert_eq!(slot.generation, key.generation());
        if node.kind == NodeKind::User {
            self.users += 1;
        }
        self.by_fd.insert(node.fd, key);
        slot.node = Some(node);
    }

    pub(crate) fn get(&self, key: HandlerKey) -> Option<&Rc<HandlerNode>> {
        let slot = self.slots.get(key.index() as usize)?;
        if slot.generation != key.generation() {
            return None;
        }
        slot.node.as_ref()
    }

    /// The live handler of `fd`, if any.
    pub(crate) fn key_of_fd(&self, fd: RawFd) -> Option<HandlerKey> {
        self.by_fd.get(&fd).copied()
    }

    /// Takes the node out of the table and marks it deleted. Its key goes stale at once.
    pub(crate) fn remove(&mut self, key: HandlerKey) -> Option<Rc<HandlerNode>> {
        let slot = self.slots.get_mut(key.index() as usize)?;
        if slot.generation != key.generation() {
            return None;
        }
        let node = slot.node.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(key.index());
        if self.by_fd.get(&node.fd) == Some(&key) {
            self.by_fd.remove(&node.fd);
        }
        if node.kind == NodeKind::User {
            self.users -= 1;
        }
        node.deleted.set(true);
        Some(node)
    }

    /// How many live user handlers there are.
    pub(crate) fn users(&self) -> usize {
        self.users
    }

    /// Every live node, for operations that touch them all (external disable/enable).
    pub(crate) fn nodes(&self) -> impl Iterator<Item = &Rc<HandlerNode>> {
        self.slots.iter().filter_map(|s| s.node.as_ref())
    }

    /// Drops every node (the context is going away).
    pub(crate) fn clear(&mut self) {
        for slot in &mut self.slots {
            if let Some(node) = slot.node.take() {
                node.deleted.set(true);
            }
        }
        self.by_fd.clear();
        self.users = 0;
    }
}

/// Builds an fd handler; made by [`AioContext::fd_handler`] (QEMU `aio_set_fd_handler`).
///
/// A handler needs a read callback, a write callback, or both. Callbacks run on the home
/// thread, receive the context, and are level-triggered: as long as the fd is readable (or
/// writable), the callback is called on every iteration. They need not be `Send`.
///
/// `Fd` is the type of the fd the handler will own ([`AioContext::fd_handler`]); it is `()`
/// for [`AioContext::fd_handler_raw`], which owns nothing.
///
/// # Examples
///
/// ```
/// # fn ctx() -> aio_core::AioContext {
/// #     aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new().unwrap())).unwrap()
/// # }
/// use std::io::{Read, Write};
/// use std::os::unix::net::UnixStream;
/// use std::rc::Rc;
/// use std::cell::RefCell;
///
/// let ctx = ctx();
/// let (mut a, b) = UnixStream::pair()?;
/// b.set_nonblocking(true)?;
/// let got = Rc::new(RefCell::new(Vec::new()));
/// // The handler takes the fd; share it to read it in the callback.
/// let b = Rc::new(b);
/// let (sink, reader) = (got.clone(), b.clone());
/// let _handler = ctx
///     .fd_handler(b)
///     .on_read(move |_ctx| {
///         let mut buf = [0; 64];
///         let n = (&*reader).read(&mut buf).unwrap();
///         sink.borrow_mut().extend_from_slice(&buf[..n]);
///     })
///     .register()?;
/// a.write_all(b"ping")?;
/// while got.borrow().len() < 4 {
///     ctx.poll();
/// }
/// assert_eq!(&got.borrow()[..], b"ping");
/// # Ok::<(), std::io::Error>(())
/// ```
#[must_use = "a handler builder does nothing until `register` is called"]
pub struct HandlerBuilder<'c, Fd = ()> {
    ctx: &'c AioContext,
    fd: RawFd,
    owner: Fd,
    read: Option<IoCallback>,
    write: Option<IoCallback>,
    poll: PollCallbacks,
    poll_in_backend: bool,
    external: bool,
    gate: Option<Arc<Gate>>,
}

impl<'c> HandlerBuilder<'c> {
    pub(crate) fn new(ctx: &'c AioContext, fd: RawFd) -> Self {
        HandlerBuilder::with_owner(ctx, fd, ())
    }
}

impl<'c, F: AsFd + 'static> HandlerBuilder<'c, F> {
    /// A builder that owns `fd` and hands it to the node, which drops it when it goes.
    pub(crate) fn owning(ctx: &'c AioContext, fd: F) -> Self {
        let raw = fd.as_fd().as_raw_fd();
        HandlerBuilder::with_owner(ctx, raw, fd)
    }
}

impl<'c, Fd: Any> HandlerBuilder<'c, Fd> {
    /// A builder for the number `fd`, whose node will own `owner`.
    pub(crate) fn with_owner(ctx: &'c AioContext, fd: RawFd, owner: Fd) -> Self {
        HandlerBuilder {
            ctx,
            fd,
            owner,
            read: None,
            write: None,
            poll: PollCallbacks::default(),
            poll_in_backend: false,
            external: false,
            gate: None,
        }
    }

    /// Makes the node check `gate` before each callback (a handler registered through a
    /// [`ContextHandle`]).
    pub(crate) fn with_gate(mut self, gate: Arc<Gate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// [`register`](Self::register) without the home-thread handle: the key of the new node.
    pub(crate) fn register_key(self) -> io::Result<HandlerKey> {
        let ctx = self.ctx;
        let (interest, node_parts) = self.into_parts()?;
        ctx.add_node(node_parts, interest, None)
    }

    /// [`replace`](Self::replace) of the node `old` (same fd, this context): the new key.
    pub(crate) fn replace_key(self, old: HandlerKey) -> io::Result<HandlerKey> {
        let ctx = self.ctx;
        let (interest, node_parts) = self.into_parts()?;
        ctx.add_node(node_parts, interest, Some(old))
    }

    /// Calls `f` when the fd is readable, hung up, or in error (QEMU `io_read`).
    pub fn on_read(mut self, f: impl FnMut(&AioContext) + 'static) -> Self {
        self.read = Some(Box::new(f));
        self
    }

    /// Calls `f` when the fd is writable or in error (QEMU `io_write`).
    pub fn on_write(mut self, f: impl FnMut(&AioContext) + 'static) -> Self {
        self.write = Some(Box::new(f));
        self
    }

    /// A userspace polling function: returns true when there is work (QEMU `io_poll`). It must
    /// be cheap and make no system call (read a ring index, a flag, a counter).
    ///
    /// It is used only together with [`on_poll_ready`](Self::on_poll_ready), and only while
    /// adaptive polling is enabled ([`AioContext::set_poll_params`]): a handler joins the
    /// context's poll set the first time its fd is dispatched, and then, in each blocking
    /// iteration, the loop calls this repeatedly for up to the polling window before it
    /// sleeps. It is never called by a non-blocking or a nested iteration's polling (see
    /// [`AioContext::set_poll_params`] for the one call made when a nested iteration leaves
    /// polling mode). The handler is still watched by the backend, so fd readiness keeps
    /// working whatever this returns.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use aio_core::{EventNotifier, PollParams};
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use std::time::Duration;
    ///
    /// ctx.set_poll_params(PollParams::new(Duration::from_micros(32)))?;
    /// let kick = Arc::new(EventNotifier::new()?);
    /// let work = Arc::new(AtomicBool::new(false)); // set by a producer thread
    /// let (k, w1, w2) = (kick.clone(), work.clone(), work.clone());
    /// let _h = ctx
    ///     .fd_handler(kick.clone())
    ///     .on_read(move |_| { k.test_and_clear(); w1.store(false, Ordering::Relaxed); })
    ///     .on_poll(move || w2.load(Ordering::Relaxed))
    ///     .on_poll_ready(move |_| work.store(false, Ordering::Relaxed))
    ///     .register()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn on_poll(self, f: impl FnMut() -> bool + 'static) -> Self {
        self.poll.poll.set(Some(Box::new(f)));
        self
    }

    /// Called when polling found work (QEMU `io_poll_ready`), in place of the read callback.
    /// If the fd is also reported ready in the same iteration, only the read (and write)
    /// callbacks run: fd readiness wins, as in QEMU. While it runs, polling skips this handler,
    /// so a nested poll cannot find the same condition and recurse.
    pub fn on_poll_ready(self, f: impl FnMut(&AioContext) + 'static) -> Self {
        self.poll.ready.set(Some(Box::new(f)));
        self
    }

    /// Called when the loop enters polling mode, or when the handler joins the poll set while
    /// the loop is in it (QEMU `io_poll_begin`): for example, suppress the producer's kicks.
    pub fn on_poll_begin(self, f: impl FnMut() + 'static) -> Self {
        self.poll.begin.set(Some(Box::new(f)));
        self
    }

    /// Called when the loop leaves polling mode before it waits in the backend, or when the
    /// handler leaves the poll set while the loop is in it: idle for 7 s, removed or replaced
    /// (QEMU `io_poll_end`): re-enable the producer's kicks. The loop then calls the poll
    /// function once more (unless the handler is gone), so work that arrived while kicks were
    /// off is not slept through. Calls alternate with `on_poll_begin`, starting with
    /// `on_poll_begin`.
    pub fn on_poll_end(self, f: impl FnMut() + 'static) -> Self {
        self.poll.end.set(Some(Box::new(f)));
        self
    }

    /// Lets the handler take part in adaptive polling with no poll function, on a backend
    /// that shows fd readiness in userspace (io_uring, whose completion ring the polling loop
    /// reads: [`FdMonitor::must_wait`](crate::FdMonitor::must_wait) answers `Some`). Not a
    /// QEMU feature: QEMU polls only handlers with an `io_poll`.
    ///
    /// Such a handler joins the poll set when its fd is dispatched, as a handler with a poll
    /// function does, so its activity opens and sizes the polling window; while the loop
    /// busy-polls, its fd becoming ready ends the phase as soon as the kernel posts it, and
    /// its read or write callback then runs as after any wait (there is no poll-ready
    /// callback). It leaves the set after 7 s without being dispatched. A socket served
    /// request by request (a storage protocol at queue depth 1) is the use: the loop catches
    /// the next request in the ring instead of going to sleep and being woken for it.
    ///
    /// On poll and epoll, which cannot show readiness without a system call, it has no
    /// effect: polling could only spin past the fd, so the handler never joins. A handler
    /// that has [`on_poll`](Self::on_poll) and [`on_poll_ready`](Self::on_poll_ready) is
    /// polled through them, and this changes nothing.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// let (sock, _peer) = std::os::unix::net::UnixStream::pair()?;
    /// let _h = ctx
    ///     .fd_handler(sock)
    ///     .on_read(|_| { /* read a request */ })
    ///     .poll_in_backend()
    ///     .register()?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn poll_in_backend(mut self) -> Self {
        self.poll_in_backend = true;
        self
    }

    /// Marks the handler as serving an external client (QEMU `is_external`): it is neither
    /// watched nor dispatched while [`AioContext::disable_external`] is in force.
    pub fn external(mut self, external: bool) -> Self {
        self.external = external;
        self
    }

    /// Registers the handler and returns the handle that unregisters it when dropped.
    ///
    /// # Errors
    ///
    /// * `InvalidInput` if neither a read nor a write callback was given;
    /// * `EBADF` (`io::Error::raw_os_error`) if the fd is not open;
    /// * `AlreadyExists` if the fd already has a handler in this context (use
    ///   [`replace`](Self::replace) to change it);
    /// * whatever the backend's `update` returns (for example `EPERM` from epoll for a regular
    ///   file). In every error case nothing was registered, and the fd the builder owned (from
    ///   [`AioContext::fd_handler`]) was dropped with it: register an `Rc`/`Arc` clone to
    ///   keep the fd through a refusal.
    pub fn register(self) -> io::Result<FdHandler> {
        let (ctx, fd) = (self.ctx, self.fd);
        let (interest, node_parts) = self.into_parts()?;
        let key = ctx.add_node(node_parts, interest, None)?;
        Ok(FdHandler {
            ctx: Rc::downgrade(&ctx.inner),
            key,
            fd,
        })
    }

    /// Replaces the callbacks of an existing handler for the same fd, atomically with respect
    /// to dispatch (QEMU: calling `aio_set_fd_handler` again). A new node is created and the
    /// old one is deleted, never changed in place, so a report in flight for the old one is
    /// dropped and the old callbacks never run again.
    ///
    /// The builder must be for the same fd: with [`AioContext::fd_handler`], another clone of
    /// the `Rc` or `Arc` the handler was registered with. The new node owns that clone, and
    /// the old node's owner is dropped with the old node.
    ///
    /// # Errors
    ///
    /// `InvalidInput` if `handler` belongs to another context or another fd, `NotFound` if it
    /// was already removed, plus the errors of [`register`](Self::register) except
    /// `AlreadyExists`. On error the old handler stays in place.
    pub fn replace(self, handler: &mut FdHandler) -> io::Result<()> {
        let ctx = self.ctx;
        let same_ctx = handler
            .ctx
            .upgrade()
            .is_some_and(|c| Rc::ptr_eq(&c, &ctx.inner));
        if !same_ctx || handler.fd != self.fd {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "replace: the handler belongs to another context or fd",
            ));
        }
        let old = handler.key;
        let (interest, node_parts) = self.into_parts()?;
        handler.key = ctx.add_node(node_parts, interest, Some(old))?;
        Ok(())
    }

    fn into_parts(self) -> io::Result<(Interest, NodeParts<Fd>)> {
        let mut interest = Interest::empty();
        if self.read.is_some() {
            interest |= Interest::READ;
        }
        if self.write.is_some() {
            interest |= Interest::WRITE;
        }
        if interest.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a handler needs a read or a write callback",
            ));
        }
        Ok((
            interest,
            NodeParts {
                fd: self.fd,
                owner: self.owner,
                read: self.read,
                write: self.write,
                poll: self.poll,
                poll_in_backend: self.poll_in_backend,
                external: self.external,
                kind: NodeKind::User,
                gate: self.gate,
            },
        ))
    }
}

impl<Fd> fmt::Debug for HandlerBuilder<'_, Fd> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerBuilder")
            .field("fd", &self.fd)
            .field("read", &self.read.is_some())
            .field("write", &self.write.is_some())
            .field("poll_in_backend", &self.poll_in_backend)
            .field("external", &self.external)
            .finish()
    }
}

/// Everything needed to build a node except its key and interest.
pub(crate) struct NodeParts<O = ()> {
    pub(crate) fd: RawFd,
    pub(crate) owner: O,
    pub(crate) read: Option<IoCallback>,
    pub(crate) write: Option<IoCallback>,
    pub(crate) poll: PollCallbacks,
    pub(crate) poll_in_backend: bool,
    pub(crate) external: bool,
    pub(crate) kind: NodeKind,
    pub(crate) gate: Option<Arc<Gate>>,
}

impl<O: Any> NodeParts<O> {
    pub(crate) fn build(self, key: HandlerKey, interest: Interest, scope: u64) -> Rc<HandlerNode> {
        let pollable = self.kind == NodeKind::Notifier || self.poll.usable();
        Rc::new(HandlerNode {
            key,
            fd: self.fd,
            interest,
            kind: self.kind,
            external: self.external,
            read: Cell::new(self.read),
            write: Cell::new(self.write),
            poll: self.poll,
            pollable,
            backend_polled: self.poll_in_backend,
            window: Cell::new(Window::default()),
            in_poll_set: Cell::new(false),
            idle_deadline: Cell::new(None),
            poll_paused: Cell::new(false),
            begun: Cell::new(false),
            deleted: Cell::new(false),
            in_monitor: Cell::new(false),
            scope,
            epoch: Cell::new(0),
            gate: self.gate.map_or_else(OnceCell::new, OnceCell::from),
            _owner: self.owner,
        })
    }
}

/// A registered fd handler. Dropping it unregisters the handler (QEMU: `aio_set_fd_handler`
/// with null callbacks) and then drops the fd the handler owns, if it was registered through
/// [`AioContext::fd_handler`]; dropping it from inside one of its own callbacks is fine.
///
/// On the poll, epoll and `polling` backends the file is closed then (if that fd was its
/// last). On io_uring the kernel's poll request for the handler holds a reference to the file
/// until its cancellation (`POLL_REMOVE`) is submitted, which the context's next iteration
/// does, batched with the iteration's other changes: until then a socket's peer does not see
/// it closed. A context that is not polled again keeps the file open until it is dropped, so
/// call [`poll_nonblocking`](AioContext::poll_nonblocking) once after dropping handlers if
/// that matters.
///
/// It holds only a weak reference to the context, so storing it inside a callback's state makes
/// no reference cycle, and dropping it after the context is gone does nothing.
pub struct FdHandler {
    ctx: Weak<crate::context::Inner>,
    key: HandlerKey,
    fd: RawFd,
}

impl FdHandler {
    /// The handler's current key (it changes when the handler is replaced).
    pub fn key(&self) -> HandlerKey {
        self.key
    }

    /// The fd the handler watches.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Whether the handler is still registered (false once the context is gone).
    pub fn is_registered(&self) -> bool {
        self.ctx
            .upgrade()
            .is_some_and(|inner| inner.registry.borrow().get(self.key).is_some())
    }

    /// Unregisters the handler now; the same as dropping it.
    pub fn remove(self) {}

    /// Turns this handle into a [`RemoteFdHandler`], which any thread may keep, drop or
    /// [`remove`](RemoteFdHandler::remove) with the meaning documented there, and which
    /// [`RemoteHandlerBuilder::replace`] accepts. The callbacks stay where they are, on the
    /// home thread, so they need not be `Send`.
    ///
    /// # Errors
    ///
    /// [`ContextGone`](crate::ContextGone) if the context's loop is gone, `NotFound` if the
    /// handler is no longer registered.
    pub fn into_remote(mut self) -> io::Result<RemoteFdHandler> {
        // Disarm our drop: the remote handle takes over the unregistration.
        let ctx = std::mem::take(&mut self.ctx);
        let inner = ctx.upgrade().ok_or(crate::ContextGone)?;
        let gate = {
            let registry = inner.registry.borrow();
            let node = registry.get(self.key).ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "the handler was already removed")
            })?;
            node.gate.get_or_init(|| Arc::new(Gate::new())).clone()
        };
        Ok(RemoteFdHandler {
            handle: ContextHandle {
                shared: inner.shared.clone(),
            },
            gate,
            key: self.key,
            fd: self.fd,
            removed: false,
        })
    }
}

impl Drop for FdHandler {
    fn drop(&mut self) {
        if let Some(inner) = self.ctx.upgrade() {
            inner.remove_node(self.key);
        }
    }
}

impl fmt::Debug for FdHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FdHandler")
            .field("fd", &self.fd)
            .field("key", &self.key)
            .finish()
    }
}

/// A read, write or poll-ready callback given from another thread.
type SendIoCallback = Box<dyn FnMut(&AioContext) + Send>;

/// Builds an fd handler from any thread; made by [`ContextHandle::fd_handler`] (QEMU: calling
/// `aio_set_fd_handler` from a thread that is not the context's, which its lockcnt allows).
///
/// The same as [`HandlerBuilder`], except that the callbacks must be `Send` (they are carried
/// to the home thread; they run there, and are dropped there, as with a home-thread handler),
/// and that it returns a [`RemoteFdHandler`], which any thread may keep and drop.
///
/// # Examples
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use std::io::{Read, Write};
/// use std::os::unix::net::UnixStream;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::Arc;
///
/// let (mut a, b) = UnixStream::pair()?;
/// b.set_nonblocking(true)?;
/// let got = Arc::new(AtomicUsize::new(0));
/// let remote = ctx.handle();
/// // The handler takes the fd; an `Arc` shares it with the callback.
/// let b = Arc::new(b);
/// let (sink, reader) = (got.clone(), b.clone());
/// // Another thread registers the handler; it returns once the loop has applied it.
/// let registering = std::thread::spawn(move || {
///     remote
///         .fd_handler(b)
///         .on_read(move |_ctx| {
///             let mut buf = [0; 64];
///             let n = (&*reader).read(&mut buf).unwrap_or(0);
///             sink.fetch_add(n, Ordering::SeqCst);
///         })
///         .register()
/// });
/// while !registering.is_finished() {
///     ctx.poll_nonblocking(); // applies the registration
/// }
/// let handler = registering.join().unwrap()?;
/// a.write_all(b"ping")?;
/// while got.load(Ordering::SeqCst) < 4 {
///     ctx.poll();
/// }
/// drop(handler); // on any thread: unregisters it
/// # Ok::<(), std::io::Error>(())
/// ```
#[must_use = "a handler builder does nothing until `register` is called"]
pub struct RemoteHandlerBuilder {
    handle: ContextHandle,
    fd: RawFd,
    parts: RemoteParts,
}

/// A registered fd's owner on its way to the home thread.
type SendFdOwner = Box<dyn Any + Send>;

/// The callbacks of a [`RemoteHandlerBuilder`], on their way to the home thread.
#[derive(Default)]
struct RemoteParts {
    owner: Option<SendFdOwner>,
    read: Option<SendIoCallback>,
    write: Option<SendIoCallback>,
    poll: Option<Box<dyn FnMut() -> bool + Send>>,
    poll_ready: Option<SendIoCallback>,
    poll_begin: Option<Box<dyn FnMut() + Send>>,
    poll_end: Option<Box<dyn FnMut() + Send>>,
    poll_in_backend: bool,
    external: bool,
}

impl RemoteParts {
    /// The home-thread builder for these callbacks (home thread).
    fn into_builder(
        self,
        ctx: &AioContext,
        fd: RawFd,
        gate: Arc<Gate>,
    ) -> HandlerBuilder<'_, Option<SendFdOwner>> {
        let mut b = HandlerBuilder::with_owner(ctx, fd, self.owner).with_gate(gate);
        // `Box<dyn FnMut + Send>` coerces to the home side's `Box<dyn FnMut>`.
        b.read = self.read.map(|f| f as IoCallback);
        b.write = self.write.map(|f| f as IoCallback);
        b.poll.poll.set(self.poll.map(|f| f as PollCallback));
        b.poll.ready.set(self.poll_ready.map(|f| f as IoCallback));
        b.poll
            .begin
            .set(self.poll_begin.map(|f| f as PollModeCallback));
        b.poll.end.set(self.poll_end.map(|f| f as PollModeCallback));
        b.poll_in_backend = self.poll_in_backend;
        b.external = self.external;
        b
    }
}

impl RemoteHandlerBuilder {
    pub(crate) fn new(handle: ContextHandle, fd: RawFd) -> Self {
        RemoteHandlerBuilder {
            handle,
            fd,
            parts: RemoteParts::default(),
        }
    }

    /// A builder that owns `fd`; the home thread's node drops it when it goes.
    pub(crate) fn owning<F: AsFd + Send + 'static>(handle: ContextHandle, fd: F) -> Self {
        let mut b = Self::new(handle, fd.as_fd().as_raw_fd());
        b.parts.owner = Some(Box::new(fd));
        b
    }

    /// As [`HandlerBuilder::on_read`], with a `Send` callback.
    pub fn on_read(mut self, f: impl FnMut(&AioContext) + Send + 'static) -> Self {
        self.parts.read = Some(Box::new(f));
        self
    }

    /// As [`HandlerBuilder::on_write`], with a `Send` callback.
    pub fn on_write(mut self, f: impl FnMut(&AioContext) + Send + 'static) -> Self {
        self.parts.write = Some(Box::new(f));
        self
    }

    /// As [`HandlerBuilder::on_poll`], with a `Send` callback.
    pub fn on_poll(mut self, f: impl FnMut() -> bool + Send + 'static) -> Self {
        self.parts.poll = Some(Box::new(f));
        self
    }

    /// As [`HandlerBuilder::on_poll_ready`], with a `Send` callback.
    pub fn on_poll_ready(mut self, f: impl FnMut(&AioContext) + Send + 'static) -> Self {
        self.parts.poll_ready = Some(Box::new(f));
        self
    }

    /// As [`HandlerBuilder::on_poll_begin`], with a `Send` callback.
    pub fn on_poll_begin(mut self, f: impl FnMut() + Send + 'static) -> Self {
        self.parts.poll_begin = Some(Box::new(f));
        self
    }

    /// As [`HandlerBuilder::on_poll_end`], with a `Send` callback. A handler removed through
    /// [`RemoteFdHandler::remove`] gets no `on_poll_end`: no callback of it starts after the
    /// removal.
    pub fn on_poll_end(mut self, f: impl FnMut() + Send + 'static) -> Self {
        self.parts.poll_end = Some(Box::new(f));
        self
    }

    /// As [`HandlerBuilder::poll_in_backend`].
    pub fn poll_in_backend(mut self) -> Self {
        self.parts.poll_in_backend = true;
        self
    }

    /// As [`HandlerBuilder::external`].
    pub fn external(mut self, external: bool) -> Self {
        self.parts.external = external;
        self
    }

    /// Registers the handler on the context's home thread and returns the handle that
    /// unregisters it when dropped, on any thread.
    ///
    /// From another thread this queues the registration, wakes the loop and sleeps until the
    /// loop has applied it (at its next iteration, after its wait, before it dispatches), so
    /// that it can return the backend's answer. On the home thread it registers at once.
    /// Do not call it from another thread while the home thread waits for this one (joins it,
    /// or blocks on a lock it holds) without polling: the registration would wait for a loop
    /// that waits for it. A one-shot BH ([`ContextHandle::schedule_oneshot`]) that registers on
    /// the home thread never waits. A caller that is itself the home thread of contexts runs
    /// their queued operations while it waits (every millisecond), so two loops that register
    /// on each other at the same moment from their home threads both get their answer.
    ///
    /// # Errors
    ///
    /// Those of [`HandlerBuilder::register`], plus [`ContextGone`](crate::ContextGone) (kind `BrokenPipe`) if the
    /// context's loop was dropped before the registration was applied. In every error case
    /// nothing was registered and the callbacks were dropped (on the home thread if it got
    /// them), and so was the fd the builder owned: register an `Arc` clone to keep it.
    pub fn register(self) -> io::Result<RemoteFdHandler> {
        self.check()?;
        let RemoteHandlerBuilder { handle, fd, parts } = self;
        let gate = Arc::new(Gate::new());
        let g = gate.clone();
        let key = handle
            .shared
            .run_on_home(move |ctx| parts.into_builder(ctx, fd, g).register_key())??;
        Ok(RemoteFdHandler {
            handle,
            gate,
            key,
            fd,
            removed: false,
        })
    }

    /// Replaces the callbacks of `handler` (same context, same fd), atomically with respect to
    /// dispatch, as [`HandlerBuilder::replace`]: once this returns `Ok`, the old callbacks never
    /// start again. Waits for the home thread as [`register`](Self::register) does.
    ///
    /// # Errors
    ///
    /// `InvalidInput` if `handler` belongs to another context or fd, `NotFound` if it was
    /// removed, [`ContextGone`](crate::ContextGone) if the loop is gone, and the errors of
    /// [`HandlerBuilder::replace`]. On error the old handler stays in place.
    pub fn replace(self, handler: &mut RemoteFdHandler) -> io::Result<()> {
        self.check()?;
        if !self.handle.same_context(&handler.handle) || handler.fd != self.fd {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "replace: the handler belongs to another context or fd",
            ));
        }
        if handler.gate.is_closed() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the handler was already removed",
            ));
        }
        let RemoteHandlerBuilder { handle, fd, parts } = self;
        let (gate, old) = (handler.gate.clone(), handler.key);
        handler.key = handle
            .shared
            .run_on_home(move |ctx| parts.into_builder(ctx, fd, gate).replace_key(old))??;
        Ok(())
    }

    /// The errors found without the home thread's help: no read or write callback.
    fn check(&self) -> io::Result<()> {
        if self.parts.read.is_none() && self.parts.write.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a handler needs a read or a write callback",
            ));
        }
        Ok(())
    }
}

impl fmt::Debug for RemoteHandlerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteHandlerBuilder")
            .field("fd", &self.fd)
            .field("read", &self.parts.read.is_some())
            .field("write", &self.parts.write.is_some())
            .field("external", &self.parts.external)
            .finish()
    }
}

/// An fd handler or event notifier registered through a [`ContextHandle`]: `Send + Sync`, and
/// dropping it on any thread unregisters the handler (QEMU: `aio_set_fd_handler` with null
/// callbacks, from any thread).
///
/// # What "removed" means
///
/// [`remove`](Self::remove) (or the drop) takes effect at once on the dispatching side, without
/// waiting for the home thread: each callback invocation of the handler (read, write, poll,
/// poll-ready, poll-begin, poll-end) *starts* with an atomic check-in on a word it shares with
/// this handle, and the removal is an atomic operation on the same word. An invocation that
/// checks in after the removal does not run; one that checked in before it may still be
/// running when `remove` returns, and `remove` says so by returning `true`. So once `remove`
/// has returned, no invocation starts whose start is ordered after the return (the home thread
/// learned of it through a channel, a lock, an atomic, or a BH); one already running
/// finishes. That is what QEMU's `QemuLockCnt` gives a remover too: a callback already
/// dispatched runs to its end. The node itself is unregistered, and its callbacks freed, by
/// the home thread at its next iteration (never under a walker that still holds it); so is
/// the fd the handler owns (given to [`ContextHandle::fd_handler`]): it is closed there, after
/// the backend forgot it, not when `remove` returns (for a [`SharedContext`](crate::SharedContext),
/// at the next holder's iteration). Keep an `Arc` clone to know when the last owner goes.
pub struct RemoteFdHandler {
    handle: ContextHandle,
    gate: Arc<Gate>,
    key: HandlerKey,
    fd: RawFd,
    removed: bool,
}

impl RemoteFdHandler {
    /// The handler's current key (it changes when the handler is replaced).
    pub fn key(&self) -> HandlerKey {
        self.key
    }

    /// The fd the handler watches.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// The handle of the handler's context.
    pub fn context(&self) -> &ContextHandle {
        &self.handle
    }

    /// Whether the handler may still be dispatched: false once it was removed through this
    /// handle, or once the context's loop is gone.
    pub fn is_registered(&self) -> bool {
        !self.gate.is_closed() && self.handle.is_alive()
    }

    /// Loom only: turns this handler's gate off (removal then relies on the queued
    /// unregistration alone), for the model that must catch it.
    #[cfg(aio_loom)]
    #[doc(hidden)]
    pub fn loom_break_gate(&self) {
        self.gate.break_for_loom();
    }

    /// Unregisters the handler; the same as dropping it, but returns whether one of its
    /// callbacks was running on the home thread at the moment of removal (it may still be
    /// running; it finishes, and no invocation starts after this call). See the type's docs.
    pub fn remove(mut self) -> bool {
        self.unregister()
    }

    fn unregister(&mut self) -> bool {
        if std::mem::replace(&mut self.removed, true) {
            return false;
        }
        let running = self.gate.close();
        let key = self.key;
        // Not waited for: the gate already stops dispatch. If the loop is gone, so is the node.
        self.handle
            .shared
            .post(move |ctx| ctx.inner.remove_node(key));
        running
    }
}

impl Drop for RemoteFdHandler {
    fn drop(&mut self) {
        self.unregister();
    }
}

impl fmt::Debug for RemoteFdHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteFdHandler")
            .field("fd", &self.fd)
            .field("key", &self.key)
            .field("removed", &self.gate.is_closed())
            .finish()
    }
}

/// The builder of an event notifier's handler: `read` behind both the fd path and the poll
/// hit, with [`EventNotifier::is_set`] as the poll function (see
/// [`AioContext::set_event_notifier`]).
pub(crate) fn event_notifier_builder<'c>(
    ctx: &'c AioContext,
    notifier: &Arc<EventNotifier>,
    read: impl FnMut(&EventNotifier) + 'static,
) -> HandlerBuilder<'c> {
    // One callback behind two entry points (fd readiness and a poll hit). The node never runs
    // a callback of its own re-entrantly, but these are two callbacks: a nested iteration
    // inside one may dispatch the other, which then finds the callback busy and leaves the
    // notifier set for a later iteration.
    let read = Rc::new(std::cell::RefCell::new(read));
    let (on_fd, on_hit) = (read.clone(), read);
    let (e_fd, e_hit, e_poll) = (notifier.clone(), notifier.clone(), notifier.clone());
    HandlerBuilder::new(ctx, notifier.raw_fd())
        .on_read(move |_| {
            if let Ok(mut read) = on_fd.try_borrow_mut() {
                read(&e_fd);
            }
        })
        .on_poll(move || e_poll.is_set())
        .on_poll_ready(move |_| {
            if let Ok(mut read) = on_hit.try_borrow_mut() {
                read(&e_hit);
            }
        })
}

/// Registers an event notifier's handler from any thread (see
/// [`ContextHandle::set_event_notifier`]).
pub(crate) fn register_remote_notifier(
    handle: &ContextHandle,
    notifier: &Arc<EventNotifier>,
    read: impl FnMut(&EventNotifier) + Send + 'static,
) -> io::Result<RemoteFdHandler> {
    let gate = Arc::new(Gate::new());
    let (g, n) = (gate.clone(), notifier.clone());
    let key = handle.shared.run_on_home(move |ctx| {
        event_notifier_builder(ctx, &n, read)
            .with_gate(g)
            .register_key()
    })??;
    Ok(RemoteFdHandler {
        handle: handle.clone(),
        gate,
        key,
        fd: notifier.raw_fd(),
        removed: false,
    })
}
