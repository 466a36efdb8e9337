//! fd handlers as the monitor sees them: adding, replacing and removing a handler's node
//! (registry and monitor kept in step), which handlers the monitor watches now (external
//! disabling and isolation scopes), and applying what other threads queued for the home
//! thread. Also the public registration entry points of [`AioContext`] and the
//! external-disable count.

use super::{AioContext, Inner, Shared};
#[cfg(doc)]
use crate::RemoteFdHandler;
use crate::event_notifier::EventNotifier;
use crate::fdmon::{Change, HandlerKey, Interest};
use crate::handler::{HandlerBuilder, HandlerNode, NodeKind, NodeParts};
use crate::remote::{self, RemoteOps};
use crate::scope;
use crate::sync::{Arc, Ordering};
use crate::{FdHandler, sys};
use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, RawFd};
use std::rc::Rc;

impl Inner {
    /// Marks `node` deleted, forgets its key and tells the monitor.
    pub(crate) fn remove_node(&self, key: HandlerKey) {
        let removed = self.registry.borrow_mut().remove(key);
        let Some(node) = removed else {
            return;
        };
        if node.in_monitor.replace(false) {
            let change = Change::Remove { key, fd: node.fd };
            // A `Remove` asks the backend to forget the number while it is still open:
            // `node`, with its fd's owner, is dropped only below.
            // SAFETY: [FD-1], kept as just said.
            let result = unsafe { self.monitor.borrow_mut().update(change) };
            if let Err(e) = result {
                tracing::warn!("aio: backend failed to forget fd {}: {e}", node.fd);
            }
        }
        self.shared.wake_for_work();
        // Out of the poll set, with `on_poll_end` if it is in polling mode: its producer's
        // kicks come back. No borrow is held; `node` keeps the last reference until the end.
        self.leave_poll_set(&node);
        // Last, with no borrow held: its callbacks may own other handlers, whose drop comes
        // back here (QEMU frees the node outside the list lock for the same reason).
        drop(node);
    }

    pub(super) fn external_disabled(&self) -> bool {
        // Acquire: pairs with the Release of `disable_external` on another thread, so that a
        // handler skipped because of a disable sees what the disabler wrote before it.
        self.shared.external_disabled.load(Ordering::Acquire) > 0
    }

    /// Makes the monitor follow the external-disable count, which any thread may change:
    /// takes external handlers out of it while disabled (a level-triggered fd left armed but
    /// not dispatched would end every wait at once) and puts them back after. Home thread.
    fn sync_external(&self) {
        let disabled = self.external_disabled();
        if self.external_unwatched.get() != disabled {
            self.external_unwatched.set(disabled);
            self.sync_watched();
        }
    }

    /// Whether the monitor should watch `node` now: not if it is external while external
    /// handlers are out of the monitor, nor if it belongs to a scope held by the innermost
    /// isolation scope.
    fn should_watch(&self, node: &HandlerNode) -> bool {
        !(node.external && self.external_unwatched.get()) && self.scopes.allows(node.scope)
    }

    /// Whether `node` may be dispatched now (external and scope rules).
    pub(super) fn may_dispatch(&self, node: &HandlerNode) -> bool {
        !(node.external && self.external_disabled()) && self.scopes.allows(node.scope)
    }

    /// Whether the monitor does not follow the external-disable count yet (for `check`).
    pub(super) fn sync_external_pending(&self) -> bool {
        self.external_unwatched.get() != self.external_disabled()
    }

    /// Applies what other threads asked for since the last time: queued handler operations,
    /// and the external-disable count. Home thread: before the wait and after `accept` (before
    /// dispatching) in every iteration, in an outer loop's `dispatch`, and while the home
    /// thread itself waits for another loop (`remote::serve_own`).
    ///
    /// Inline down to its two checks (nothing changed, nothing queued), the case of almost
    /// every iteration: B1 measured 54 instructions an iteration for the two calls.
    #[inline]
    pub(crate) fn apply_remote(&self, ctx: &AioContext) {
        if self.sync_external_pending() || self.shared.remote.is_pending() {
            self.apply_remote_now(ctx);
        }
    }

    #[inline(never)]
    fn apply_remote_now(&self, ctx: &AioContext) {
        self.sync_external();
        if !self.shared.remote.is_pending() {
            return;
        }
        // Run with no lock held: an operation may queue another (a dropped callback owning a
        // `RemoteFdHandler`), which then runs at the next iteration. If one panics (a refused
        // callback's drop), the panic propagates out of `poll` and the rest go back in front of
        // the queue for the next iteration, rather than being dropped unanswered.
        struct Rest<'a>(&'a RemoteOps, VecDeque<remote::HomeOp>);
        impl Drop for Rest<'_> {
            fn drop(&mut self) {
                if !self.1.is_empty() {
                    self.0.requeue_front(std::mem::take(&mut self.1));
                }
            }
        }
        let mut rest = Rest(&self.shared.remote, self.shared.remote.take().into());
        // What other threads create belongs to the root scope.
        let _root = self.scopes.enter_remote();
        while let Some(op) = rest.1.pop_front() {
            op(ctx);
        }
    }

    /// Takes out of the monitor the handlers that must not be dispatched now (external ones
    /// while disabled, those of scopes held by the innermost isolation scope), or puts them
    /// back. Backends cannot filter fds by themselves (epoll and io_uring report whatever is
    /// armed), and leaving a level-triggered fd armed but undispatched would make every wait
    /// return at once.
    pub(crate) fn sync_watched(&self) {
        let registry = self.registry.borrow();
        let mut monitor = self.monitor.borrow_mut();
        for (node, watched) in registry
            .nodes()
            .map(|n| (n, self.should_watch(n)))
            .filter(|(n, watched)| n.in_monitor.get() != *watched)
        {
            let change = if watched {
                Change::Add {
                    key: node.key,
                    fd: node.fd,
                    interest: node.interest,
                }
            } else {
                Change::Remove {
                    key: node.key,
                    fd: node.fd,
                }
            };
            // `node` is live in the registry, so its fd is open, owned by the node or
            // promised by a raw registration, until `remove_node` has taken it out of the
            // monitor.
            // SAFETY: [FD-1], kept as just said.
            match unsafe { monitor.update(change) } {
                Ok(()) => node.in_monitor.set(watched),
                Err(e) => tracing::warn!("aio: cannot re-arm fd {}: {e}", node.fd),
            }
        }
    }
}

impl AioContext {
    /// Starts registering a handler for `fd`, which the handler takes. See [`HandlerBuilder`].
    ///
    /// The handler owns `fd` until it is removed (its [`FdHandler`] dropped or
    /// [`remove`](FdHandler::remove)d, or the context dropped), and drops it then, after the
    /// backend has stopped watching it. So the number the backend watches cannot be closed,
    /// or reused for another file, while it is registered: Rust's I/O safety, kept by the
    /// type system. To go on using the fd, in the callbacks or elsewhere, share it: pass an
    /// `Rc<T>` or `Arc<T>` clone (both are [`AsFd`]) and keep another. A `&'static` fd or a
    /// [`BorrowedFd<'static>`](std::os::fd::BorrowedFd) works too; a borrow of a local does
    /// not compile. [`replace`](HandlerBuilder::replace) takes a builder for the same fd,
    /// that is, another clone of the same `Rc` or `Arc`.
    ///
    /// ```compile_fail,E0597
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    /// // `a` could be closed while the handler watches its number: refused.
    /// let _h = ctx.fd_handler(&a).on_read(|_| {}).register()?;
    /// drop(a);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// For a bare number, see [`fd_handler_raw`](Self::fd_handler_raw).
    pub fn fd_handler<F: AsFd + 'static>(&self, fd: F) -> HandlerBuilder<'_, F> {
        HandlerBuilder::owning(self, fd)
    }

    /// [`fd_handler`](Self::fd_handler) for a raw fd number, for code that holds fds as plain
    /// integers (a port from C, an fd received over FFI) and cannot hand over an [`AsFd`].
    ///
    /// The handler works exactly as one registered through `fd_handler`, except that it owns
    /// nothing: the caller keeps the fd open and closes it. A number that is not an open fd (a
    /// negative one included) is refused by [`register`](HandlerBuilder::register) with
    /// `EBADF`.
    ///
    /// # Safety
    ///
    /// `fd` must stay open, naming the same open file, from `register` until the handler is
    /// removed: its [`FdHandler`] dropped or [`remove`](FdHandler::remove)d (or the
    /// [`RemoteFdHandler`] that [`FdHandler::into_remote`] made from it), or the context
    /// dropped. This is the I/O-safety contract of [`BorrowedFd::borrow_raw`] stretched over
    /// the registration (ARCHITECTURE.md, "Raw fds"): meanwhile the backend watches `fd`
    /// (`poll`, `epoll_ctl`, an io_uring `POLL_ADD`), and were the number closed and reused,
    /// it would watch, and the callbacks would be told about, a file that other code owns.
    /// The caller must keep `fd` open itself: a number that another handler owns (registered
    /// with [`fd_handler`](Self::fd_handler)) does not count, since that handler's removal,
    /// or a [`replace`](HandlerBuilder::replace) of it by this builder, closes it.
    ///
    /// [`BorrowedFd::borrow_raw`]: std::os::fd::BorrowedFd::borrow_raw
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use std::cell::Cell;
    /// use std::rc::Rc;
    ///
    /// // Fds as C code holds them: a pipe made with pipe(2).
    /// let mut fds = [0; 2];
    /// // SAFETY: `fds` is a writable array of two ints for pipe(2) to fill.
    /// assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    /// let [rd, wr] = fds;
    ///
    /// let got = Rc::new(Cell::new(0u8));
    /// let seen = got.clone();
    /// // `rd` is closed below, after the handler is removed.
    /// // SAFETY: raw-fd contract (ARCHITECTURE.md, "Raw fds"), kept as just said.
    /// let handler = unsafe { ctx.fd_handler_raw(rd) }
    ///     .on_read(move |_| {
    ///         let mut byte = 0u8;
    ///         // SAFETY: one writable byte; `rd` is open while the handler is registered.
    ///         let n = unsafe { libc::read(rd, (&raw mut byte).cast(), 1) };
    ///         assert_eq!(n, 1);
    ///         seen.set(byte);
    ///     })
    ///     .register()?;
    /// // SAFETY: one readable byte; `wr` is open.
    /// assert_eq!(unsafe { libc::write(wr, b"x".as_ptr().cast(), 1) }, 1);
    /// while got.get() == 0 {
    ///     ctx.poll();
    /// }
    /// assert_eq!(got.get(), b'x');
    ///
    /// handler.remove();
    /// // SAFETY: both fds came from pipe(2) above, and nothing watches `rd` any more.
    /// unsafe {
    ///     libc::close(rd);
    ///     libc::close(wr);
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub unsafe fn fd_handler_raw(&self, fd: RawFd) -> HandlerBuilder<'_> {
        HandlerBuilder::new(self, fd)
    }

    /// Registers `read` for an [`EventNotifier`] (QEMU `aio_set_event_notifier`). The callback
    /// gets the notifier and should call [`EventNotifier::test_and_clear`].
    ///
    /// The handler comes with a built-in poll function, [`EventNotifier::is_set`]: with
    /// adaptive polling on ([`set_poll_params`](Self::set_poll_params)), once the notifier has
    /// been dispatched it joins the poll set, and a `set` from another thread while the loop
    /// busy-polls is seen with one load and handled by `read` at once, without the loop going
    /// to sleep and being woken through the fd. For other poll functions (a virtqueue, a
    /// completion ring) and `on_poll_begin` / `on_poll_end` (QEMU
    /// `aio_set_event_notifier_poll`), register the notifier's fd with
    /// [`fd_handler`](Self::fd_handler) instead.
    ///
    /// # Errors
    ///
    /// As [`HandlerBuilder::register`]; `AlreadyExists` if the notifier is already registered.
    pub fn set_event_notifier(
        &self,
        notifier: &Arc<EventNotifier>,
        read: impl FnMut(&EventNotifier) + 'static,
    ) -> io::Result<FdHandler> {
        crate::handler::event_notifier_builder(self, notifier, read).register()
    }

    /// Registers a node built from `parts`, replacing `old` if given. Returns the new key.
    ///
    /// Nothing user-owned is dropped while a table is borrowed: a callback may own another
    /// [`FdHandler`], whose drop unregisters it and so borrows the registry and the monitor
    /// again. The new node is therefore built before any borrow, and both it (when the change
    /// is refused) and the replaced node are dropped here, after every borrow is released.
    pub(crate) fn add_node<O: Any>(
        &self,
        parts: NodeParts<O>,
        interest: Interest,
        old: Option<HandlerKey>,
    ) -> io::Result<HandlerKey> {
        let (key, scope) = self.reserve_node(parts.fd, parts.kind, old)?;
        // The owner goes into the node's own allocation (an unsized last field), not a box.
        self.insert_node(parts.build(key, interest, scope), old)
    }

    /// The checks of [`add_node`](Self::add_node) that need no owner type, and the key and
    /// isolation scope of the node about to be built.
    fn reserve_node(
        &self,
        fd: RawFd,
        kind: NodeKind,
        old: Option<HandlerKey>,
    ) -> io::Result<(HandlerKey, u64)> {
        let inner = &*self.inner;
        if old.is_none() {
            // A handler of this fd removed from another thread counts as removed already, even
            // if the home thread has not applied that removal yet: a registration that follows
            // it by another route (a BH, this thread) must not find it in the way.
            let stale = {
                let registry = inner.registry.borrow();
                registry
                    .key_of_fd(fd)
                    .filter(|&k| registry.get(k).is_some_and(|n| n.remotely_removed()))
            };
            if let Some(stale) = stale {
                inner.remove_node(stale);
            }
        }
        // After the stale node went: its owner may have been the one keeping `fd` open.
        sys::check_fd_open(fd)?;
        // `next_key` only reserves the index; nothing runs between here and `link_node`.
        let key = inner.registry.borrow_mut().next_key();
        let scope = if kind == NodeKind::Notifier {
            scope::ANY
        } else {
            inner.scopes.creation()
        };
        Ok((key, scope))
    }

    /// The rest of [`add_node`](Self::add_node), once the node is built.
    fn insert_node(
        &self,
        node: Rc<HandlerNode>,
        old: Option<HandlerKey>,
    ) -> io::Result<HandlerKey> {
        let inner = &*self.inner;
        let key = node.key;
        let linked = self.link_node(&node, old);
        // On success the registry holds the node too; on error this was the only reference and
        // the refused callbacks are dropped now, with no borrow held.
        drop(node);
        let replaced = linked?;
        // QEMU notifies after every change so that a sleeping loop re-evaluates its fd set; a
        // registration from inside a callback makes the next blocking iteration not block once.
        // Here the change is made on the home thread itself, so that is only needed inside a
        // blocking window (see `wake_for_work`).
        inner.shared.wake_for_work();
        // The replaced node leaves the poll set (the new one joins on its first fd dispatch,
        // which `on_poll_end` makes possible by turning kicks back on). Then its callbacks go
        // too (unless a dispatch still holds it), likewise with no borrow held.
        if let Some(replaced) = &replaced {
            inner.leave_poll_set(replaced);
        }
        drop(replaced);
        Ok(key)
    }

    /// Tells the monitor about `node` and puts it in the registry in place of `old`. Returns
    /// the replaced node, for the caller to drop once no table is borrowed.
    fn link_node(
        &self,
        node: &Rc<HandlerNode>,
        old: Option<HandlerKey>,
    ) -> io::Result<Option<Rc<HandlerNode>>> {
        let inner = &*self.inner;
        let (key, fd, interest) = (node.key, node.fd, node.interest);
        let mut registry = inner.registry.borrow_mut();
        // Whether the old node is watched; read without cloning it, so that no reference to a
        // user-owned node is dropped on the error paths below while the registry is borrowed.
        let old_watched = match old {
            Some(old) => Some(
                registry
                    .get(old)
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::NotFound, "the handler was already removed")
                    })?
                    .in_monitor
                    .get(),
            ),
            None => {
                if registry.key_of_fd(fd).is_some() {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("fd {fd} already has a handler in this context"),
                    ));
                }
                None
            }
        };
        // The monitor follows `external_unwatched` (what `sync_external` last applied), not the
        // count itself, which other threads change: otherwise a disable and an enable between
        // two iterations would leave a node registered in between out of the monitor for good.
        let watch = inner.should_watch(node);
        let change = match (old, old_watched) {
            (Some(old), Some(true)) if watch => Some(Change::Replace {
                old,
                new: key,
                fd,
                interest,
            }),
            (Some(old), Some(true)) => Some(Change::Remove { key: old, fd }),
            _ if watch => Some(Change::Add { key, fd, interest }),
            _ => None,
        };
        if let Some(change) = change {
            // `node` owns its fd (or carries a raw registration's promise), was checked open
            // by `reserve_node`, and from here lives in the registry until `remove_node` takes
            // it out of the monitor; the old node (same number) likewise.
            // SAFETY: [FD-1], kept as just said.
            unsafe { inner.monitor.borrow_mut().update(change) }?;
        }
        // Insert before removing the old node: `insert` claims the index `next_key` reserved,
        // and `remove` frees the old one (and leaves `by_fd`, now the new key's, alone).
        node.in_monitor.set(watch);
        registry.insert(node.clone());
        let replaced = old.and_then(|old| registry.remove(old));
        debug_assert_eq!(replaced.is_some(), old.is_some());
        if let Some(replaced) = &replaced {
            replaced.in_monitor.set(false);
        }
        Ok(replaced)
    }

    /// Stops watching and dispatching handlers registered as external (QEMU
    /// `aio_disable_external`). Calls nest: each needs a matching
    /// [`enable_external`](Self::enable_external).
    pub fn disable_external(&self) {
        disable_external(&self.inner.shared);
        self.inner.sync_external();
    }

    /// Undoes one [`disable_external`](Self::disable_external); the last one resumes external
    /// handlers and wakes the loop (QEMU `aio_enable_external`).
    ///
    /// # Errors
    ///
    /// [`NotDisabledError`] if external handlers are not disabled; nothing changes then.
    pub fn enable_external(&self) -> Result<(), NotDisabledError> {
        enable_external(&self.inner.shared)?;
        self.inner.sync_external();
        Ok(())
    }

    /// Whether external handlers are disabled.
    pub fn is_external_disabled(&self) -> bool {
        self.inner.external_disabled()
    }
}

/// One more `disable_external` (any thread; QEMU `aio_disable_external`). No wake-up: the
/// home thread checks the count before dispatching each external handler, and takes their fds
/// out of the monitor at its next iteration.
pub(super) fn disable_external(shared: &Shared) {
    // Release: pairs with the dispatcher's Acquire load (`Inner::external_disabled`).
    shared.external_disabled.fetch_add(1, Ordering::Release);
}

/// One less `disable_external` (any thread; QEMU `aio_enable_external`); the last one wakes
/// the loop, which puts the external fds back in the monitor before it sleeps again.
pub(super) fn enable_external(shared: &Shared) -> Result<(), NotDisabledError> {
    // Release as in `disable_external`; a CAS loop so that an unmatched enable changes nothing.
    let old = shared
        .external_disabled
        .fetch_update(Ordering::Release, Ordering::Relaxed, |n| n.checked_sub(1))
        .map_err(|_| NotDisabledError)?;
    if old == 1 {
        shared.wake_for_work();
    }
    Ok(())
}

/// The error of [`AioContext::enable_external`] when external handlers were not disabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotDisabledError;

impl fmt::Display for NotDisabledError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("enable_external called more times than disable_external")
    }
}

impl std::error::Error for NotDisabledError {}
