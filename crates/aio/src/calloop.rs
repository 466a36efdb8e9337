//! A context as a calloop event source (feature `calloop`): [`AioSource`], which maps the
//! context's outer-loop hooks (QEMU's GSource prepare / check / dispatch) onto calloop's
//! `before_sleep` and `process_events`, so aio's BHs, fd handlers, timers and tasks run inside a
//! [`calloop::EventLoop`] next to its native sources.
//!
//! * **prepare** runs in [`before_sleep`](EventSource::before_sleep), every time the loop is
//!   about to wait. A zero timeout (a BH scheduled, a timer due) becomes a synthetic event, so
//!   calloop does not sleep; any other timeout arms a timerfd, so an aio timer wakes the loop
//!   even when the caller of `dispatch` passed no timeout. The timerfd has nanosecond
//!   resolution: aio timers keep their precision under calloop.
//! * **check** and **dispatch** run in [`process_events`](EventSource::process_events), once
//!   per loop iteration, when the source's fd is readable or the synthetic event fires; the
//!   callback given to `insert_source` is then called with whether dispatch ran a user
//!   callback, and the context.
//! * **Fds.** The loop watches one fd, level-triggered: a private epoll holding the context's
//!   outer fds and the timerfd; a change of the outer fds (a handler added on the poll backend,
//!   a move from poll to epoll) rebuilds the part behind it, so calloop's registration never
//!   changes. Linux only (epoll).
//! * **Remote wake-ups.** A [`ContextHandle`](crate::ContextHandle) `schedule_oneshot` (or any
//!   notify) from another thread writes the context's eventfd, which is among the outer fds,
//!   so it wakes the sleeping loop.
//! * **Nesting.** A calloop callback may poll the context directly ([`AioContext::poll`],
//!   [`AioContext::block_on`]), as a QEMU callback may call `aio_poll` on a context attached
//!   to the main loop.
//! * **Detaching.** Removing the source (`LoopHandle::remove`) or dropping the loop unregisters
//!   the fd; no callback runs from the source afterwards, and an outer-loop window left open
//!   by `before_sleep` is closed with a `check` whose findings are left to the next loop. The
//!   source owns a clone of the context; [`AioSource::context`] gives it.
//!
//! ```
//! use std::sync::atomic::{AtomicBool, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut event_loop: calloop::EventLoop<u32> = calloop::EventLoop::try_new()?;
//! let ctx = aio::Builder::new().build()?;
//! event_loop
//!     .handle()
//!     .insert_source(aio::calloop::AioSource::new(ctx.clone())?, |_progress, _ctx, _data| {})?;
//!
//! // A calloop ping and an aio BH scheduled from another thread.
//! let (ping, ping_source) = calloop::ping::make_ping()?;
//! event_loop.handle().insert_source(ping_source, |_, _, pings| *pings += 1)?;
//! let ran = Arc::new(AtomicBool::new(false));
//! let (r, remote) = (ran.clone(), ctx.handle());
//! std::thread::spawn(move || {
//!     ping.ping();
//!     remote.schedule_oneshot(move || r.store(true, Ordering::SeqCst));
//! });
//! let mut pings = 0;
//! while pings == 0 || !ran.load(Ordering::SeqCst) {
//!     event_loop.dispatch(Duration::from_secs(5), &mut pings)?;
//! }
//! # Ok(()) }
//! ```

use std::io;
use std::time::Duration;

use calloop::generic::Generic;
use calloop::{EventSource, Interest, Mode, Poll, PostAction, Readiness, Token, TokenFactory};

use crate::AioContext;
use crate::embed::OuterSet;

/// A context as a calloop [`EventSource`]; see the [module documentation](self).
///
/// Its callback gets `(progress, &mut AioContext, &mut Data)`, after each dispatch, where
/// `progress` says whether a user callback (BH, handler, timer) ran.
#[derive(Debug)]
pub struct AioSource {
    /// Epoll A (with the context's outer fds and the timerfd behind it), registered
    /// level-triggered for reading.
    fd: Generic<OuterSet>,
    /// A token of this source for the synthetic event of a zero timeout.
    token: Option<Token>,
    /// Whether `prepare` ran since the last `check`: one check/dispatch per loop iteration.
    prepared: bool,
    ctx: AioContext,
}

impl AioSource {
    /// A source driving `ctx`; insert it with `LoopHandle::insert_source`, on the context's
    /// home thread.
    ///
    /// # Errors
    ///
    /// Creating the private epoll or the timerfd (out of fds).
    pub fn new(ctx: AioContext) -> io::Result<Self> {
        let set = OuterSet::new(true)?;
        Ok(Self {
            fd: Generic::new(set, Interest::READ, Mode::Level),
            token: None,
            prepared: false,
            ctx,
        })
    }

    /// The context this source drives.
    pub fn context(&self) -> &AioContext {
        &self.ctx
    }

    /// Ends an outer-loop window that `before_sleep` opened and no `process_events` closed (the
    /// source removed or dropped in between): a `check` whose findings are dropped, not
    /// dispatched, so that bit 0 of `notify_me` does not stay set and make every later notify
    /// write the eventfd for nobody. No callback runs; what `check` saw is found again by
    /// whichever loop drives the context next.
    fn close_window(&mut self) {
        // Not while unwinding from a callback's panic: the context is left as the panic left
        // it, and a second panic here would abort.
        if std::mem::take(&mut self.prepared) && !std::thread::panicking() {
            self.ctx.check();
        }
    }
}

impl Drop for AioSource {
    fn drop(&mut self) {
        self.close_window();
    }
}

impl EventSource for AioSource {
    type Event = bool;
    type Metadata = AioContext;
    type Ret = ();
    type Error = io::Error;

    const NEEDS_EXTRA_LIFECYCLE_EVENTS: bool = true;

    fn process_events<F>(
        &mut self,
        _readiness: Readiness,
        _token: Token,
        mut callback: F,
    ) -> Result<PostAction, Self::Error>
    where
        F: FnMut(Self::Event, &mut Self::Metadata) -> Self::Ret,
    {
        // The fd's readiness and the synthetic event come to the same thing: the context
        // may have work. Once per iteration: `check` consumes what `prepare` armed.
        if !std::mem::take(&mut self.prepared) {
            return Ok(PostAction::Continue);
        }
        self.fd.get_ref().drain_timer();
        if self.ctx.check() {
            let progress = self.ctx.dispatch();
            callback(progress, &mut self.ctx);
        }
        Ok(PostAction::Continue)
    }

    fn register(&mut self, poll: &mut Poll, factory: &mut TokenFactory) -> calloop::Result<()> {
        self.token = Some(factory.token());
        self.fd.register(poll, factory)
    }

    fn reregister(&mut self, poll: &mut Poll, factory: &mut TokenFactory) -> calloop::Result<()> {
        self.token = Some(factory.token());
        self.fd.reregister(poll, factory)
    }

    fn unregister(&mut self, poll: &mut Poll) -> calloop::Result<()> {
        self.token = None;
        self.close_window();
        self.fd.unregister(poll)
    }

    fn before_sleep(&mut self) -> calloop::Result<Option<(Readiness, Token)>> {
        let timeout = self.ctx.prepare();
        self.prepared = true;
        let set = self.fd.get_ref();
        set.sync(&self.ctx)?;
        if timeout == Some(Duration::ZERO) {
            set.arm(None)?;
            return Ok(self.token.map(|t| (Readiness::EMPTY, t)));
        }
        set.arm(timeout)?;
        Ok(None)
    }
}
