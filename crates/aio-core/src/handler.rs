//! fd handlers: the callbacks registered for a file descriptor, the table that maps
//! [`HandlerKey`]s to them, the registration builder and the RAII [`FdHandler`] handle.
//!
//! C original: `AioHandler`, `aio_set_fd_handler` and `aio_remove_fd_handler` in
//! `util/aio-posix.c`, and the deletion rules that `QemuLockCnt` enforces there (spec §6–§7).
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

use crate::AioContext;
use crate::fdmon::{HandlerKey, Interest};
use crate::polling::Window;
use std::cell::Cell;
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
pub(crate) struct HandlerNode {
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
    /// Whether the monitor currently watches this node's fd under its key.
    pub(crate) in_monitor: Cell<bool>,
    /// The id of the last iteration that dispatched this node (for an fd report or a poll
    /// hit); a parent iteration skips a report or hit that a nested iteration has dispatched
    /// since (QEMU steals the node from the parent's ready list), and a poll hit is skipped
    /// when the fd path dispatched the node in the same iteration.
    pub(crate) epoch: Cell<u64>,
}

impl HandlerNode {
    /// Runs the read callback if there is one and it is not already running. Returns whether it
    /// ran.
    pub(crate) fn call_read(&self, ctx: &AioContext) -> bool {
        call(&self.read, &self.deleted, ctx)
    }

    /// Runs the write callback if there is one and it is not already running.
    pub(crate) fn call_write(&self, ctx: &AioContext) -> bool {
        call(&self.write, &self.deleted, ctx)
    }

    /// Whether the handler can join the poll set: the context's own notifier (its poll is a
    /// read of `notified`), or a user handler with both `on_poll` and `on_poll_ready`. Whether
    /// a zero-timeout iteration may skip the backend's wait is decided per iteration by the
    /// context (every user handler must be in the poll set and have been polled), so a
    /// handler that is not polled is always waited for.
    pub(crate) fn can_poll(&self) -> bool {
        self.pollable
    }

    /// Runs the poll function (`None` if there is none or it is already running).
    pub(crate) fn call_poll(&self) -> Option<bool> {
        call_with(&self.poll.poll, &self.deleted, |f| f())
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
        call_with(&self.poll.ready, &self.deleted, |f| f(ctx)).is_some()
    }

    /// Puts the handler in polling mode: `on_poll_begin`, unless it is in it already.
    pub(crate) fn begin_poll_mode(&self) {
        if !self.begun.replace(true) {
            call_with(&self.poll.begin, &self.deleted, |f| f());
        }
    }

    /// Takes the handler out of polling mode: `on_poll_end`, only if `on_poll_begin` ran
    /// (so the two alternate whatever callbacks do meanwhile, removals and panics included).
    pub(crate) fn end_poll_mode(&self) {
        if self.begun.replace(false) {
            call_with(&self.poll.end, &self.deleted, |f| f());
        }
    }
}

fn call(slot: &Cell<Option<IoCallback>>, deleted: &Cell<bool>, ctx: &AioContext) -> bool {
    call_with(slot, deleted, |f| f(ctx)).is_some()
}

/// Takes the callback out of `slot`, runs `run` on it and puts it back, unless the handler was
/// deleted meanwhile. Returns `None` if the slot was empty (no callback, or it is running).
fn call_with<F: ?Sized, R>(
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
    /// The live handler of each fd, indexed by fd number: fds are small, dense integers, so a
    /// vector beats hashing on every registration and removal.
    by_fd: Vec<Option<HandlerKey>>,
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
        let fd = usize::try_from(node.fd).expect("registered fds are open, so non-negative");
        if self.by_fd.len() <= fd {
            self.by_fd.resize(fd + 1, None);
        }
        self.by_fd[fd] = Some(key);
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
        let fd = usize::try_from(fd).ok()?;
        self.by_fd.get(fd).copied().flatten()
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
        let entry = usize::try_from(node.fd)
            .ok()
            .and_then(|fd| self.by_fd.get_mut(fd));
        if let Some(entry) = entry.filter(|e| **e == Some(key)) {
            *entry = None;
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
/// let (sink, mut reader) = (got.clone(), b.try_clone()?);
/// let _handler = ctx
///     .fd_handler(&b)
///     .on_read(move |_ctx| {
///         let mut buf = [0; 64];
///         let n = reader.read(&mut buf).unwrap();
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
pub struct HandlerBuilder<'c> {
    ctx: &'c AioContext,
    fd: RawFd,
    read: Option<IoCallback>,
    write: Option<IoCallback>,
    poll: PollCallbacks,
    external: bool,
}

impl<'c> HandlerBuilder<'c> {
    pub(crate) fn new(ctx: &'c AioContext, fd: RawFd) -> Self {
        HandlerBuilder {
            ctx,
            fd,
            read: None,
            write: None,
            poll: PollCallbacks::default(),
            external: false,
        }
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
    ///     .fd_handler(&*kick)
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
    ///   file). In every error case nothing was registered.
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

    fn into_parts(self) -> io::Result<(Interest, NodeParts)> {
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
                read: self.read,
                write: self.write,
                poll: self.poll,
                external: self.external,
                kind: NodeKind::User,
            },
        ))
    }
}

impl fmt::Debug for HandlerBuilder<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerBuilder")
            .field("fd", &self.fd)
            .field("read", &self.read.is_some())
            .field("write", &self.write.is_some())
            .field("external", &self.external)
            .finish()
    }
}

/// Everything needed to build a node except its key and interest.
pub(crate) struct NodeParts {
    pub(crate) fd: RawFd,
    pub(crate) read: Option<IoCallback>,
    pub(crate) write: Option<IoCallback>,
    pub(crate) poll: PollCallbacks,
    pub(crate) external: bool,
    pub(crate) kind: NodeKind,
}

impl NodeParts {
    pub(crate) fn build(self, key: HandlerKey, interest: Interest) -> HandlerNode {
        let pollable = self.kind == NodeKind::Notifier || self.poll.usable();
        HandlerNode {
            key,
            fd: self.fd,
            interest,
            kind: self.kind,
            external: self.external,
            read: Cell::new(self.read),
            write: Cell::new(self.write),
            poll: self.poll,
            pollable,
            window: Cell::new(Window::default()),
            in_poll_set: Cell::new(false),
            idle_deadline: Cell::new(None),
            poll_paused: Cell::new(false),
            begun: Cell::new(false),
            deleted: Cell::new(false),
            in_monitor: Cell::new(false),
            epoch: Cell::new(0),
        }
    }
}

/// A registered fd handler. Dropping it unregisters the handler (QEMU: `aio_set_fd_handler`
/// with null callbacks); dropping it from inside one of its own callbacks is fine.
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

/// The raw fd of anything that has one, for registration.
pub(crate) fn raw_fd_of(fd: &impl AsFd) -> RawFd {
    fd.as_fd().as_raw_fd()
}
