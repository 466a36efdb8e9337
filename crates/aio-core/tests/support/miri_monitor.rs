//! `MiriMonitor`: a test-only fd monitor made of the few system calls that Miri emulates, so that
//! the tests of the context, the bottom halves and the thread pool can run under Miri.
//!
//! Miri has no `poll`/`ppoll` (so no `PollMonitor`) and supports only edge-triggered epoll and
//! no `epoll_pwait2` (so no `EpollMonitor`, which is level-triggered like QEMU's). This monitor
//! registers every fd with `EPOLLET` and re-arms each one with `EPOLL_CTL_MOD` before every wait:
//! re-arming makes epoll look at the fd's current state again, which turns edge-triggered
//! reports back into level-triggered ones, at O(fds) per wait. Timeouts are whole milliseconds,
//! rounded up so that a wait never ends before its deadline. The same code runs natively, where
//! `aio-tests`' `conformance_miri` proves it against the conformance suite.
//!
//! Included by path (`#[path = ".../support/miri_monitor.rs"] mod miri_monitor;`) from the
//! test helpers that build a context; nothing outside tests uses it.

// Each including test uses what it needs; the conformance run uses everything.
#![allow(dead_code)]

use aio_core::{Change, FdMonitor, HandlerKey, Interest, OuterFd, Readiness, ReadyList};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

const EPOLLIN: u32 = libc::EPOLLIN as u32;
const EPOLLPRI: u32 = libc::EPOLLPRI as u32;
const EPOLLOUT: u32 = libc::EPOLLOUT as u32;
const EPOLLERR: u32 = libc::EPOLLERR as u32;
const EPOLLHUP: u32 = libc::EPOLLHUP as u32;
const EPOLLRDHUP: u32 = libc::EPOLLRDHUP as u32;
const EPOLLET: u32 = libc::EPOLLET as u32;

/// An edge-triggered epoll set re-armed before every wait (see the module doc).
#[derive(Debug)]
pub struct MiriMonitor {
    epoll: OwnedFd,
    /// Every registered fd with its key and interest, re-armed before each wait.
    watched: Vec<(RawFd, HandlerKey, Interest)>,
    /// Reused buffer for `epoll_wait`.
    events: Vec<libc::epoll_event>,
}

impl MiriMonitor {
    /// A monitor with nothing registered.
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers; EPOLL_CLOEXEC is a valid flag.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(MiriMonitor {
            // SAFETY: epoll_create1 succeeded, so `fd` is an open fd that nothing else owns.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            watched: Vec::new(),
            events: Vec::new(),
        })
    }

    /// One `epoll_ctl` call; `ev` is ignored by `EPOLL_CTL_DEL`.
    fn ctl(
        &self,
        op: libc::c_int,
        fd: RawFd,
        key: HandlerKey,
        interest: Interest,
    ) -> io::Result<()> {
        let mut events = EPOLLET;
        if interest.contains(Interest::READ) {
            events |= EPOLLIN | EPOLLRDHUP;
        }
        if interest.contains(Interest::WRITE) {
            events |= EPOLLOUT;
        }
        let mut ev = libc::epoll_event {
            events,
            u64: key.as_u64(),
        };
        // The epoll fd is open (owned by `self`); a bad `fd` is an error, not UB.
        // SAFETY: `ev` is a live epoll_event that the call only reads.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl FdMonitor for MiriMonitor {
    fn name(&self) -> &'static str {
        "miri"
    }

    unsafe fn update(&mut self, change: Change) -> io::Result<()> {
        match change {
            Change::Add { key, fd, interest } => {
                self.ctl(libc::EPOLL_CTL_ADD, fd, key, interest)?;
                self.watched.push((fd, key, interest));
            }
            Change::Replace {
                old,
                new,
                fd,
                interest,
            } => {
                self.ctl(libc::EPOLL_CTL_MOD, fd, new, interest)?;
                let entry = self
                    .watched
                    .iter_mut()
                    .find(|(f, k, _)| *f == fd && *k == old)
                    .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
                *entry = (fd, new, interest);
            }
            Change::Remove { key, fd } => {
                // The fd may already be closed, which removed it from the set: not an error.
                let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, key, Interest::empty());
                self.watched.retain(|&(f, k, _)| !(f == fd && k == key));
            }
        }
        Ok(())
    }

    fn wait(&mut self, ready: &mut ReadyList, timeout: Option<Duration>) -> io::Result<usize> {
        // Re-arm: epoll then reports every fd that is ready now, as a level-triggered set would.
        // An fd closed behind our back fails here; it simply cannot be reported.
        for &(fd, key, interest) in &self.watched {
            let _ = self.ctl(libc::EPOLL_CTL_MOD, fd, key, interest);
        }
        let timeout_ms = match timeout {
            None => -1,
            Some(t) => {
                let ms = t.as_nanos().div_ceil(1_000_000);
                libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
            }
        };
        let max = self.watched.len().max(1);
        self.events.clear();
        self.events
            .resize(max, libc::epoll_event { events: 0, u64: 0 });
        let max = libc::c_int::try_from(max).unwrap_or(libc::c_int::MAX);
        // the epoll fd is open; `events` is an initialised buffer of at least `max`
        // entries that nothing else borrows during the call, and the kernel (or Miri) writes at
        // most `max` of them.
        // SAFETY: the conditions just stated hold for this call.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                self.events.as_mut_ptr(),
                max,
                timeout_ms,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            // A signal is not a failure: the caller sees an empty wait and iterates again.
            return if err.kind() == io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(err)
            };
        }
        let n = usize::try_from(n).unwrap_or(0);
        for ev in &self.events[..n] {
            let bits = ev.events;
            let mut readiness = Readiness::empty();
            if bits & (EPOLLIN | EPOLLPRI) != 0 {
                readiness |= Readiness::READABLE;
            }
            if bits & EPOLLOUT != 0 {
                readiness |= Readiness::WRITABLE;
            }
            if bits & (EPOLLHUP | EPOLLRDHUP) != 0 {
                readiness |= Readiness::HANGUP;
            }
            if bits & EPOLLERR != 0 {
                readiness |= Readiness::ERROR;
            }
            ready.push(HandlerKey::from_u64(ev.u64), readiness);
        }
        Ok(n)
    }

    fn outer_fds(&self, out: &mut Vec<OuterFd>) {
        out.push(OuterFd {
            fd: self.epoll.as_raw_fd(),
            interest: Interest::READ,
        });
    }
}
