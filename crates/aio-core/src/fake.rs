//! Loom-only stand-ins for the kernel: a table of fake fds (flags) and [`FakeMonitor`], which
//! waits on them with loom's condition variable.
//!
//! Only compiled under `--cfg aio_loom`. The loom models in `tests/loom_*.rs` build a real
//! [`AioContext`](crate::AioContext) on a `FakeMonitor`, so that they exercise the real notify
//! protocol, BH list and dispatch code, with only the system calls replaced. A blocked
//! `FakeMonitor::wait` that nobody wakes is reported by loom as a deadlock, which is how the
//! models detect a lost wake-up.

use crate::fdmon::{Change, FdMonitor, HandlerKey, Interest, OuterFd, Readiness, ReadyList};
use loom::sync::{Condvar, Mutex};
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// Fake fd numbers start here so that they are never mistaken for small real fds in logs.
const FAKE_FD_BASE: RawFd = 1000;

/// The table of fake fds: one "readable" flag each.
#[derive(Debug)]
pub(crate) struct FakeFds {
    flags: Mutex<Vec<bool>>,
    cond: Condvar,
}

loom::lazy_static! {
    /// Reset by loom for every execution of a model.
    pub(crate) static ref FAKE_FDS: FakeFds = FakeFds { flags: Mutex::new(Vec::new()), cond: Condvar::new() };
}

impl FakeFds {
    pub(crate) fn alloc(&self) -> RawFd {
        let mut flags = self.flags.lock().unwrap();
        flags.push(false);
        FAKE_FD_BASE + (flags.len() as RawFd - 1)
    }

    pub(crate) fn set(&self, fd: RawFd) {
        let mut flags = self.flags.lock().unwrap();
        flags[(fd - FAKE_FD_BASE) as usize] = true;
        self.cond.notify_all();
    }

    pub(crate) fn is_set(&self, fd: RawFd) -> bool {
        self.flags.lock().unwrap()[(fd - FAKE_FD_BASE) as usize]
    }

    pub(crate) fn test_and_clear(&self, fd: RawFd) -> bool {
        let mut flags = self.flags.lock().unwrap();
        std::mem::replace(&mut flags[(fd - FAKE_FD_BASE) as usize], false)
    }
}

/// A monitor over fake fds, for loom models. Read interest only.
#[derive(Debug, Default)]
pub struct FakeMonitor {
    watched: Vec<(HandlerKey, RawFd)>,
}

impl FakeMonitor {
    /// An empty monitor.
    pub fn new() -> Self {
        Self::default()
    }
}

impl FdMonitor for FakeMonitor {
    fn name(&self) -> &'static str {
        "fake"
    }

    unsafe fn update(&mut self, change: Change) -> io::Result<()> {
        match change {
            Change::Add { key, fd, .. } => self.watched.push((key, fd)),
            Change::Replace { old, new, .. } => {
                for w in &mut self.watched {
                    if w.0 == old {
                        w.0 = new;
                    }
                }
            }
            Change::Remove { key, .. } => self.watched.retain(|w| w.0 != key),
        }
        Ok(())
    }

    /// Blocks on loom's condition variable until a watched flag is set. A finite timeout is
    /// treated as already expired, so models should block without limit or not at all.
    fn wait(&mut self, ready: &mut ReadyList, timeout: Option<Duration>) -> io::Result<usize> {
        let mut flags = FAKE_FDS.flags.lock().unwrap();
        loop {
            for &(key, fd) in &self.watched {
                if flags[(fd - FAKE_FD_BASE) as usize] {
                    ready.push(key, Readiness::READABLE);
                }
            }
            if !ready.is_empty() || timeout.is_some() {
                return Ok(ready.len());
            }
            flags = FAKE_FDS.cond.wait(flags).unwrap();
        }
    }

    fn outer_fds(&self, out: &mut Vec<OuterFd>) {
        out.extend(self.watched.iter().map(|&(_, fd)| OuterFd {
            fd,
            interest: Interest::READ,
        }));
    }
}
