//! fd readiness as futures: [`AsyncFd`], a non-blocking fd registered on a context, whose
//! `readable()`/`writable()` futures wait on the context's level-triggered fd handlers (QEMU
//! `qio_channel_yield` / `aio_co_wake` from an fd handler), and the read/write helpers on top.
//!
//! # Interest follows the waiters
//!
//! The handler of an `AsyncFd` watches a direction only while someone waits for it, so an fd
//! that stays readable while nobody awaits it cannot keep the loop busy. Awaiting readiness adds
//! the direction to the handler (registering or replacing it). When the loop reports the
//! direction ready, the handler records it and wakes every waiter of that direction; if there
//! was none, it drops the direction instead (unregistering the handler if nothing is left). So
//! after the last waiter goes, the handler fires at most once more; waiters that come and go
//! while the fd stays busy (a read loop) cost no re-registration.
//!
//! # Cached readiness
//!
//! A direction the loop reported stays *ready* until an operation on the fd says
//! `WouldBlock` and clears it ([`ReadyGuard::clear_ready`], [`ReadyGuard::try_io`]; the helpers
//! do it): an await of a ready direction completes at once, as an fd that is still readable
//! should. The helpers try the operation first and wait only on `WouldBlock` (QEMU's coroutine
//! channel I/O does the same), so a task that keeps finding data does not yield.

use crate::context::{AioContext, Inner};
use crate::fdmon::Interest;
use crate::handler::{FdHandler, HandlerBuilder};
use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};

/// The waiters of one direction: an id per waiting future, and its latest waker.
type Waiters = Vec<(u64, Waker)>;

/// What an [`AsyncFd`] shares with its handler's callbacks (home thread only).
struct State {
    /// The number the handler watches: `T`'s, read again before each wait registers
    /// ([`AsyncFd::get_mut`] may replace the fd, and removes the handler first).
    fd: Cell<RawFd>,
    ctx: Weak<Inner>,
    /// Directions the loop reported and no operation has found blocked since.
    ready: Cell<Interest>,
    /// Directions the handler watches (empty: no handler).
    registered: Cell<Interest>,
    handler: RefCell<Option<FdHandler>>,
    /// Whether the handler polls in the backend ([`AsyncFd::poll_in_backend`]).
    poll_in_backend: Cell<bool>,
    read_waiters: RefCell<Waiters>,
    write_waiters: RefCell<Waiters>,
    next_id: Cell<u64>,
}

impl State {
    fn waiters(&self, dir: Interest) -> &RefCell<Waiters> {
        if dir == Interest::READ {
            &self.read_waiters
        } else {
            &self.write_waiters
        }
    }

    fn ctx(&self) -> io::Result<AioContext> {
        self.ctx
            .upgrade()
            .map(|inner| AioContext { inner })
            .ok_or_else(|| io::Error::other("the AsyncFd's context no longer exists"))
    }

    fn clear(&self, dir: Interest) {
        self.ready.set(self.ready.get() - dir);
    }

    /// Makes the handler watch exactly `want`. On error the handler is unchanged.
    fn set_interest(self: &Rc<Self>, ctx: &AioContext, want: Interest) -> io::Result<()> {
        if want == self.registered.get() {
            return Ok(());
        }
        // Taken out so that no borrow is held while the context drops the old node (whose
        // callbacks hold only weak references to this state).
        let mut handler = self.handler.borrow_mut().take();
        let result = if want.is_empty() {
            drop(handler.take());
            Ok(())
        } else {
            let mut builder = HandlerBuilder::new(ctx, self.fd.get());
            if self.poll_in_backend.get() {
                builder = builder.poll_in_backend();
            }
            for dir in [Interest::READ, Interest::WRITE] {
                if !want.contains(dir) {
                    continue;
                }
                let state = Rc::downgrade(self);
                let callback = move |ctx: &AioContext| {
                    if let Some(state) = state.upgrade() {
                        state.dispatch(ctx, dir);
                    }
                };
                builder = if dir == Interest::READ {
                    builder.on_read(callback)
                } else {
                    builder.on_write(callback)
                };
            }
            match &mut handler {
                Some(h) => builder.replace(h),
                None => builder.register().map(|h| handler = Some(h)),
            }
        };
        if result.is_ok() {
            self.registered.set(want);
        }
        *self.handler.borrow_mut() = handler;
        result
    }

    /// The handler's callback for `dir`: the loop saw the fd ready that way.
    fn dispatch(self: &Rc<Self>, ctx: &AioContext, dir: Interest) {
        self.ready.set(self.ready.get() | dir);
        let woken = std::mem::take(&mut *self.waiters(dir).borrow_mut());
        if woken.is_empty() {
            // Nobody waits: stop watching this direction, so the fd cannot keep the loop busy.
            let want = self.registered.get() - dir;
            if let Err(e) = self.set_interest(ctx, want) {
                tracing::warn!(fd = self.fd.get(), "AsyncFd: dropping the handler: {e}");
                self.unregister();
            }
        }
        for (_, waker) in woken {
            waker.wake();
        }
    }

    /// Removes the handler whatever it watches; the waiters are woken to register again (and
    /// see any error then).
    fn unregister(&self) {
        let handler = self.handler.borrow_mut().take();
        self.registered.set(Interest::empty());
        drop(handler);
        for dir in [Interest::READ, Interest::WRITE] {
            let woken = std::mem::take(&mut *self.waiters(dir).borrow_mut());
            for (_, waker) in woken {
                waker.wake();
            }
        }
    }

    fn forget(&self, dir: Interest, id: Option<u64>) {
        if let Some(id) = id {
            self.waiters(dir).borrow_mut().retain(|(i, _)| *i != id);
        }
    }

    /// One poll of a wait for `dir`.
    fn poll_ready(
        self: &Rc<Self>,
        dir: Interest,
        id: &mut Option<u64>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        if self.ready.get().contains(dir) {
            self.forget(dir, id.take());
            return Poll::Ready(Ok(()));
        }
        let ctx = match self.ctx() {
            Ok(ctx) => ctx,
            Err(e) => return Poll::Ready(Err(e)),
        };
        {
            let mut waiters = self.waiters(dir).borrow_mut();
            match id.and_then(|i| waiters.iter_mut().find(|(k, _)| *k == i)) {
                Some((_, w)) => {
                    if !w.will_wake(cx.waker()) {
                        *w = cx.waker().clone();
                    }
                }
                None => {
                    let i = self.next_id.get();
                    self.next_id.set(i + 1);
                    waiters.push((i, cx.waker().clone()));
                    *id = Some(i);
                }
            }
        }
        if let Err(e) = self.set_interest(&ctx, self.registered.get() | dir) {
            self.forget(dir, id.take());
            return Poll::Ready(Err(e));
        }
        Poll::Pending
    }
}

/// A non-blocking fd registered on an [`AioContext`], for tasks of that context to await its
/// readiness and do I/O on it (tokio's `AsyncFd`). See the [module docs](self) for how interest
/// and readiness work.
///
/// It is `!Send`: it belongs to its context's thread. Several tasks may share it (`Rc`), one
/// reading while another writes. Dropping it (or [`into_inner`](Self::into_inner))
/// unregisters its handler before the fd is closed. An fd can have one `AsyncFd` (or handler)
/// per context.
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use aio_core::task::fd::AsyncFd;
/// use std::os::unix::net::UnixStream;
/// use std::rc::Rc;
///
/// let (a, b) = UnixStream::pair()?;
/// let (a, b) = (AsyncFd::with_context(&ctx, a)?, Rc::new(AsyncFd::with_context(&ctx, b)?));
/// let echo = {
///     let b = b.clone();
///     ctx.spawn_local(async move {
///         let mut buf = [0; 4];
///         b.read_exact(&mut buf).await?;
///         b.write_all(&buf).await
///     })
/// };
/// let reply = ctx.block_on(async {
///     a.write_all(b"ping").await?;
///     let mut buf = [0; 4];
///     a.read_exact(&mut buf).await.map(|()| buf)
/// })?;
/// assert_eq!(&reply, b"ping");
/// ctx.block_on(echo).unwrap()?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct AsyncFd<T: AsFd> {
    /// `None` only inside `into_inner`.
    inner: Option<T>,
    state: Rc<State>,
}

impl<T: AsFd> AsyncFd<T> {
    /// Registers `fd` on the context this thread is running (inside a task or callback).
    ///
    /// # Errors
    ///
    /// `NotFound` outside any context; otherwise as [`with_context`](Self::with_context).
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use aio_core::task::fd::AsyncFd;
    /// let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    /// let a = ctx.block_on(ctx.spawn_local(async move { AsyncFd::new(a).map(|_| ()) })).unwrap();
    /// assert!(a.is_ok());
    /// let (c, _d) = std::os::unix::net::UnixStream::pair()?;
    /// assert!(AsyncFd::new(c).is_err()); // no context runs here
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn new(fd: T) -> io::Result<Self>
    where
        T: 'static,
    {
        match AioContext::current() {
            Some(ctx) => Self::with_context(&ctx, fd),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "AsyncFd::new outside any AioContext; use AsyncFd::with_context",
            )),
        }
    }

    /// Registers `fd` on `ctx`, and puts it in non-blocking mode (`O_NONBLOCK`, which the
    /// open file description shares with every duplicate of the fd). Nothing is watched until
    /// someone awaits readiness.
    ///
    /// `T` is `'static` (an owned fd, or an `Rc`/`Arc` of one) for the reason
    /// [`AioContext::fd_handler`] takes its fd: were `AsyncFd<&File>` possible, forgetting it
    /// (`mem::forget`) would leave the number watched after the borrow ends.
    ///
    /// ```compile_fail,E0597
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    /// let _fd = aio_core::task::fd::AsyncFd::with_context(&ctx, &a)?; // a borrow: refused
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// `EBADF` if the fd is not open, `AlreadyExists` if it already has a handler in `ctx`, or
    /// the error of `fcntl(2)`.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use aio_core::Interest;
    /// use aio_core::task::fd::AsyncFd;
    /// let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    /// let a = AsyncFd::with_context(&ctx, a)?;
    /// assert_eq!(a.interest(), Interest::empty());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn with_context(ctx: &AioContext, fd: T) -> io::Result<Self>
    where
        T: 'static,
    {
        let raw = fd.as_fd().as_raw_fd();
        crate::sys::check_fd_open(raw)?;
        if ctx.inner.registry.borrow().key_of_fd(raw).is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("fd {raw} already has a handler in this context"),
            ));
        }
        crate::sys::set_nonblocking(raw)?;
        Ok(AsyncFd {
            inner: Some(fd),
            state: Rc::new(State {
                fd: Cell::new(raw),
                ctx: Rc::downgrade(&ctx.inner),
                ready: Cell::new(Interest::empty()),
                registered: Cell::new(Interest::empty()),
                handler: RefCell::new(None),
                poll_in_backend: Cell::new(false),
                read_waiters: RefCell::new(Vec::new()),
                write_waiters: RefCell::new(Vec::new()),
                next_id: Cell::new(0),
            }),
        })
    }

    /// The fd.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// # let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    /// let a = aio_core::task::fd::AsyncFd::with_context(&ctx, a)?;
    /// assert!(a.get_ref().peer_addr().is_ok());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn get_ref(&self) -> &T {
        self.inner
            .as_ref()
            .expect("AsyncFd holds its fd until into_inner")
    }

    /// The fd, mutably. The handler is removed first, and the readiness marks cleared, so the
    /// fd may even be replaced (the old one closed): the next wait registers whatever fd `T`
    /// then holds (make it non-blocking: only the first one was made so by
    /// [`with_context`](Self::with_context)). No wait can be pending meanwhile, as one
    /// borrows the `AsyncFd`. So each call costs a removal of the handler, if there is one,
    /// and a registration at the next wait; for shared access, [`get_ref`](Self::get_ref)
    /// costs nothing (`std`'s sockets and files do their I/O through `&T`).
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// # let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    /// let mut a = aio_core::task::fd::AsyncFd::with_context(&ctx, a)?;
    /// a.get_mut().set_nonblocking(true)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn get_mut(&mut self) -> &mut T {
        // Before `T` can be changed or closed: nothing may watch its number then.
        self.state.unregister();
        self.state.ready.set(Interest::empty());
        self.inner
            .as_mut()
            .expect("AsyncFd holds its fd until into_inner")
    }

    /// Unregisters the fd and gives it back (still non-blocking).
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// # let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    /// let a = aio_core::task::fd::AsyncFd::with_context(&ctx, a)?;
    /// let a = a.into_inner();
    /// let again = aio_core::task::fd::AsyncFd::with_context(&ctx, a)?; // free to register
    /// # drop(again);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn into_inner(mut self) -> T {
        self.state.unregister();
        self.inner
            .take()
            .expect("AsyncFd holds its fd until into_inner")
    }

    /// The directions the context watches for this fd right now: those someone awaited, until
    /// the loop reported them with nobody waiting (see the [module docs](self)).
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// # let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    /// use aio_core::Interest;
    /// let a = aio_core::task::fd::AsyncFd::with_context(&ctx, a)?;
    /// ctx.block_on(a.writable())?; // watched while awaited
    /// assert_eq!(a.interest(), Interest::WRITE);
    /// while ctx.poll_nonblocking() {} // reported again with nobody waiting: dropped
    /// assert_eq!(a.interest(), Interest::empty());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn interest(&self) -> Interest {
        self.state.registered.get()
    }

    /// Makes the fd's handler take part in adaptive polling through the backend, with no
    /// poll function ([`HandlerBuilder::poll_in_backend`]: on io_uring only): from the next
    /// time the handler is registered, which is the first await of readiness when this is
    /// called right after [`with_context`](Self::with_context).
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    /// let a = aio_core::task::fd::AsyncFd::with_context(&ctx, a)?.poll_in_backend();
    /// assert!(a.interest().is_empty(), "registered at the first await");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn poll_in_backend(self) -> Self {
        self.state.poll_in_backend.set(true);
        self
    }

    /// Waits until the loop reports the fd readable (or hung up, or in error), unless it is
    /// still marked readable from an earlier report. The guard clears the mark when an
    /// operation says `WouldBlock`.
    ///
    /// # Errors
    ///
    /// When the context is gone, or registering the handler fails.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use aio_core::task::fd::AsyncFd;
    /// use std::io::{Read, Write};
    /// let (a, mut b) = std::os::unix::net::UnixStream::pair()?;
    /// let a = AsyncFd::with_context(&ctx, a)?;
    /// b.write_all(b"x")?;
    /// let n = ctx.block_on(async {
    ///     let mut guard = a.readable().await?;
    ///     match guard.try_io(|s| (&*s).read(&mut [0; 8])) {
    ///         Ok(r) => r,
    ///         Err(_would_block) => Ok(0),
    ///     }
    /// })?;
    /// assert_eq!(n, 1);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn readable(&self) -> WaitReady<'_, T> {
        WaitReady {
            fd: self,
            dir: Interest::READ,
            id: None,
        }
    }

    /// As [`readable`](Self::readable), for writability.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    /// let a = aio_core::task::fd::AsyncFd::with_context(&ctx, a)?;
    /// let guard = ctx.block_on(a.writable())?;
    /// drop(guard);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn writable(&self) -> WaitReady<'_, T> {
        WaitReady {
            fd: self,
            dir: Interest::WRITE,
            id: None,
        }
    }

    /// Runs `op` on the fd until it gives something other than `WouldBlock` (or
    /// `Interrupted`), awaiting `dir` readiness after each `WouldBlock`. `op` is tried first.
    async fn io_with<R>(
        &self,
        dir: Interest,
        mut op: impl FnMut(&T) -> io::Result<R>,
    ) -> io::Result<R> {
        loop {
            match op(self.get_ref()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.state.clear(dir);
                    WaitReady {
                        fd: self,
                        dir,
                        id: None,
                    }
                    .await?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    /// Runs a read-side operation `op` (for example `recv_from` on a socket): tries it, and on
    /// `WouldBlock` waits for readability and tries again.
    ///
    /// # Errors
    ///
    /// The first error of `op` other than `WouldBlock` and `Interrupted`, or of waiting.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use std::os::unix::net::UnixDatagram;
    /// let (a, b) = UnixDatagram::pair()?;
    /// let a = aio_core::task::fd::AsyncFd::with_context(&ctx, a)?;
    /// b.send(b"dgram")?;
    /// let n = ctx.block_on(a.read_with(|s| s.recv(&mut [0; 16])))?;
    /// assert_eq!(n, 5);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub async fn read_with<R>(&self, op: impl FnMut(&T) -> io::Result<R>) -> io::Result<R> {
        self.io_with(Interest::READ, op).await
    }

    /// As [`read_with`](Self::read_with), for a write-side operation.
    ///
    /// # Errors
    ///
    /// As [`read_with`](Self::read_with).
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use std::os::unix::net::UnixDatagram;
    /// let (a, b) = UnixDatagram::pair()?;
    /// let a = aio_core::task::fd::AsyncFd::with_context(&ctx, a)?;
    /// assert_eq!(ctx.block_on(a.write_with(|s| s.send(b"hi")))?, 2);
    /// assert_eq!(b.recv(&mut [0; 4])?, 2);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub async fn write_with<R>(&self, op: impl FnMut(&T) -> io::Result<R>) -> io::Result<R> {
        self.io_with(Interest::WRITE, op).await
    }
}

impl<T: AsFd> AsyncFd<T>
where
    for<'a> &'a T: Read,
{
    /// Reads into `buf`, waiting for data: `Ok(0)` at end of file, and at once for an empty
    /// `buf` (as tokio's `AsyncRead` does), without a system call: a non-blocking socket
    /// answers an empty read with `EAGAIN` while no data is queued, which would wait.
    ///
    /// # Errors
    ///
    /// As [`read_with`](Self::read_with).
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// let (a, b) = std::os::unix::net::UnixStream::pair()?;
    /// let a = aio_core::task::fd::AsyncFd::with_context(&ctx, a)?;
    /// drop(b);
    /// assert_eq!(ctx.block_on(a.read(&mut [0; 8]))?, 0); // end of file
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.io_with(Interest::READ, |mut fd| fd.read(buf)).await
    }

    /// Fills `buf`, waiting for data as often as needed.
    ///
    /// # Errors
    ///
    /// `UnexpectedEof` if the file ends first (what was read is in `buf`); otherwise as
    /// [`read`](Self::read).
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use std::io::Write;
    /// let (a, mut b) = std::os::unix::net::UnixStream::pair()?;
    /// let a = aio_core::task::fd::AsyncFd::with_context(&ctx, a)?;
    /// b.write_all(b"12345")?;
    /// let mut buf = [0; 5];
    /// ctx.block_on(a.read_exact(&mut buf))?;
    /// assert_eq!(&buf, b"12345");
    /// drop(b);
    /// let e = ctx.block_on(a.read_exact(&mut buf)).unwrap_err();
    /// assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub async fn read_exact(&self, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read(buf).await? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => buf = &mut buf[n..],
            }
        }
        Ok(())
    }
}

impl<T: AsFd> AsyncFd<T>
where
    for<'a> &'a T: Write,
{
    /// Writes some of `buf`, waiting for room; returns how much.
    ///
    /// # Errors
    ///
    /// As [`read_with`](Self::read_with) (`EPIPE` once the peer is gone).
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    /// let a = aio_core::task::fd::AsyncFd::with_context(&ctx, a)?;
    /// assert_eq!(ctx.block_on(a.write(b"abc"))?, 3);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub async fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.io_with(Interest::WRITE, |mut fd| fd.write(buf)).await
    }

    /// Writes all of `buf`, waiting for room as often as needed.
    ///
    /// # Errors
    ///
    /// `WriteZero` if the fd accepts no byte; otherwise as [`write`](Self::write).
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    /// let a = aio_core::task::fd::AsyncFd::with_context(&ctx, a)?;
    /// ctx.block_on(a.write_all(b"all of it"))?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write(buf).await? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => buf = &buf[n..],
            }
        }
        Ok(())
    }
}

impl<T: AsFd> Drop for AsyncFd<T> {
    fn drop(&mut self) {
        // Before the fd itself is dropped (and maybe closed).
        self.state.unregister();
    }
}

impl<T: AsFd> AsFd for AsyncFd<T> {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.get_ref().as_fd()
    }
}

impl<T: AsFd> fmt::Debug for AsyncFd<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncFd")
            .field("fd", &self.state.fd.get())
            .field("ready", &self.state.ready.get())
            .field("interest", &self.state.registered.get())
            .finish()
    }
}

/// The future of [`AsyncFd::readable`] and [`AsyncFd::writable`]. Dropping it withdraws the
/// wait (the direction stays watched until the loop next reports it; see the
/// [module docs](self)).
#[must_use = "futures do nothing unless awaited"]
pub struct WaitReady<'a, T: AsFd> {
    fd: &'a AsyncFd<T>,
    dir: Interest,
    id: Option<u64>,
}

impl<'a, T: AsFd> Future for WaitReady<'a, T> {
    type Output = io::Result<ReadyGuard<'a, T>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let (fd, dir) = (this.fd, this.dir);
        // With no handler (as `get_mut` leaves it), the next registration is for the fd `T`
        // holds now; while one is registered, its number stays the one it watches.
        if fd.state.handler.borrow().is_none() {
            fd.state.fd.set(fd.get_ref().as_fd().as_raw_fd());
        }
        fd.state
            .poll_ready(dir, &mut this.id, cx)
            .map(|r| r.map(|()| ReadyGuard { fd, dir }))
    }
}

impl<T: AsFd> Drop for WaitReady<'_, T> {
    fn drop(&mut self) {
        self.fd.state.forget(self.dir, self.id.take());
    }
}

impl<T: AsFd> fmt::Debug for WaitReady<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WaitReady")
            .field("fd", &self.fd.state.fd.get())
            .field("dir", &self.dir)
            .finish()
    }
}

/// Proof that the loop reported an [`AsyncFd`] ready in one direction; made by
/// [`AsyncFd::readable`] and [`AsyncFd::writable`].
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// let (a, _b) = std::os::unix::net::UnixStream::pair()?;
/// let a = aio_core::task::fd::AsyncFd::with_context(&ctx, a)?;
/// let mut guard = ctx.block_on(a.writable())?;
/// assert!(guard.get_inner().peer_addr().is_ok());
/// guard.clear_ready(); // the next writable() waits for the loop again
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct ReadyGuard<'a, T: AsFd> {
    fd: &'a AsyncFd<T>,
    dir: Interest,
}

impl<T: AsFd> ReadyGuard<'_, T> {
    /// Marks the direction not ready: the next wait for it waits for the loop. Call it when an
    /// operation said `WouldBlock`.
    pub fn clear_ready(&mut self) {
        self.fd.state.clear(self.dir);
    }

    /// The fd.
    pub fn get_inner(&self) -> &T {
        self.fd.get_ref()
    }

    /// Runs `op` on the fd; if it says `WouldBlock`, clears the readiness and returns
    /// `Err(TryIoError)`, so that the caller waits again.
    ///
    /// # Errors
    ///
    /// [`TryIoError`] when `op` would block.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use std::io::Read;
    /// let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    /// let a = aio_core::task::fd::AsyncFd::with_context(&ctx, a)?;
    /// let mut guard = ctx.block_on(a.writable())?;
    /// // Nothing to read: would block.
    /// assert!(guard.try_io(|s| (&*s).read(&mut [0; 1])).is_err());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn try_io<R>(
        &mut self,
        op: impl FnOnce(&T) -> io::Result<R>,
    ) -> Result<io::Result<R>, TryIoError> {
        match op(self.fd.get_ref()) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.clear_ready();
                Err(TryIoError(()))
            }
            r => Ok(r),
        }
    }
}

impl<T: AsFd> fmt::Debug for ReadyGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadyGuard")
            .field("fd", &self.fd.state.fd.get())
            .field("dir", &self.dir)
            .finish()
    }
}

/// The operation of [`ReadyGuard::try_io`] would have blocked; wait for readiness again.
///
/// ```
/// let e = aio_core::task::fd::TryIoError::default();
/// assert_eq!(format!("{e:?}"), "TryIoError(())");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TryIoError(());
