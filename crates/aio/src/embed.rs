//! The fd an outer event loop (tokio, calloop) watches for a context: [`OuterSet`], a private
//! epoll that holds the context's outer fds (and, for loops whose timers cannot be re-armed
//! from a hook, a [`TimerFd`]), so the outer loop registers one fd that this crate owns.
//!
//! Why not register each outer fd with tokio or calloop directly: the poll backend's outer fds are
//! the user's fds, which a callback may close at any time. Unregistering such a number later
//! (tokio and calloop both do it by number) could remove another source's registration if the
//! number was reused meanwhile. Here, a change of the outer fd set builds a fresh inner epoll
//! from the fds just reported (all open at that moment, see [OUTER-FD] in ARCHITECTURE.md) and
//! closes the old one, so nothing is ever unregistered by number. (glib keeps no kernel
//! registration, only numbers it polls, so the glib adapter hands it the outer fds themselves.)

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use aio_core::{AioContext, Interest, OuterFd};
use rustix::event::epoll;

use crate::timerfd::TimerFd;

/// The one fd an outer loop watches (readable, level-triggered inside; tokio sees it
/// edge-triggered) and what stands behind it.
#[derive(Debug)]
pub(crate) struct OuterSet {
    /// Epoll A: constant for the set's life; holds `inner` and `timer`.
    outer: OwnedFd,
    /// Epoll B: the context's outer fds; rebuilt whenever they change.
    inner: RefCell<OwnedFd>,
    /// A timerfd for the context's next deadline, when the outer loop needs one.
    #[cfg_attr(not(feature = "calloop"), allow(dead_code))]
    timer: Option<TimerFd>,
    /// The outer fds in `inner`, sorted by fd, one entry per fd.
    fds: RefCell<Vec<OuterFd>>,
    /// Scratch for the next `outer_fds`.
    scratch: RefCell<Vec<OuterFd>>,
}

const INNER: u64 = 1;
const TIMER: u64 = 2;

impl OuterSet {
    /// An empty set; `with_timer` adds a timerfd that [`arm`](Self::arm) sets.
    pub(crate) fn new(with_timer: bool) -> io::Result<Self> {
        let outer = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let inner = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        epoll::add(
            &outer,
            &inner,
            epoll::EventData::new_u64(INNER),
            epoll::EventFlags::IN,
        )?;
        let timer = if with_timer {
            let t = TimerFd::new()?;
            epoll::add(
                &outer,
                &t,
                epoll::EventData::new_u64(TIMER),
                epoll::EventFlags::IN,
            )?;
            Some(t)
        } else {
            None
        };
        Ok(Self {
            outer,
            inner: RefCell::new(inner),
            timer,
            fds: RefCell::default(),
            scratch: RefCell::default(),
        })
    }

    /// Reads the context's outer fds and, if they changed since the last call, puts them in a
    /// fresh inner epoll. Call it after [`AioContext::prepare`], every iteration (the io_uring
    /// backend wants `outer_fds` called before the outer loop sleeps). Through `&self`: the
    /// outer loops hand out only shared references to the registered object, whose fd (epoll
    /// A) this never changes.
    pub(crate) fn sync(&self, ctx: &AioContext) -> io::Result<()> {
        let mut next = self.scratch.take();
        next.clear();
        ctx.outer_fds(&mut next);
        next.sort_by_key(|f| f.fd);
        next.dedup_by(|later, kept| {
            if later.fd == kept.fd {
                kept.interest |= later.interest;
                true
            } else {
                false
            }
        });
        if next == *self.fds.borrow() {
            *self.scratch.borrow_mut() = next;
            return Ok(());
        }
        let inner = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        for f in &next {
            let mut flags = epoll::EventFlags::empty();
            if f.interest.contains(Interest::READ) {
                flags |= epoll::EventFlags::IN;
            }
            if f.interest.contains(Interest::WRITE) {
                flags |= epoll::EventFlags::OUT;
            }
            // `f.fd` was reported by `outer_fds` just above, on this thread, with no callback run
            // since, so it is open; it is borrowed only for this `epoll_ctl`.
            // SAFETY: [OUTER-FD]: `f.fd` is open, and borrowed only for this `epoll_ctl`.
            let fd = unsafe { BorrowedFd::borrow_raw(f.fd) };
            epoll::add(&inner, fd, epoll::EventData::new_u64(f.fd as u64), flags)?;
        }
        epoll::add(
            &self.outer,
            &inner,
            epoll::EventData::new_u64(INNER),
            epoll::EventFlags::IN,
        )?;
        // The old inner epoll is ours and open: removing it by its own fd is exact. Dropping
        // it closes it, and with it every registration of a number that may be stale.
        let old = self.inner.replace(inner);
        epoll::delete(&self.outer, &old)?;
        drop(old);
        *self.scratch.borrow_mut() = self.fds.replace(next);
        Ok(())
    }

    /// Sets the timerfd to expire after `timeout`; see [`TimerFd::arm`].
    #[cfg_attr(not(feature = "calloop"), allow(dead_code))]
    pub(crate) fn arm(&self, timeout: Option<Duration>) -> io::Result<()> {
        match &self.timer {
            Some(timer) => timer.arm(timeout),
            None => Ok(()),
        }
    }

    /// Reads the timerfd's expirations, if any, so it stops being readable.
    #[cfg_attr(not(feature = "calloop"), allow(dead_code))]
    pub(crate) fn drain_timer(&self) {
        if let Some(timer) = &self.timer {
            timer.drain();
        }
    }
}

impl AsFd for OuterSet {
    /// Epoll A, the fd the outer loop watches for reading.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.outer.as_fd()
    }
}

impl AsRawFd for OuterSet {
    fn as_raw_fd(&self) -> RawFd {
        self.outer.as_raw_fd()
    }
}
