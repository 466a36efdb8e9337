//! Backend choice and the policy that spans backends: [`AutoMonitor`], the monitor every context
//! built by the facade uses.
//!
//! It owns what QEMU spreads over `aio_context_setup`, `fdmon_epoll_try_upgrade` and
//! `fdmon_epoll_disable`, in one place above the backends, which never know about each other:
//!
//! * **Choice at creation** ([`Backend`]): io_uring if compiled in and the kernel accepts a
//!   ring and a round trip through it (`UringMonitor::new_checked`: some seccomp profiles
//!   allow `io_uring_setup` but refuse `io_uring_enter`, which would make every wait fail),
//!   otherwise (not on Linux) the `polling` crate's kqueue or event ports if compiled in,
//!   otherwise poll with the epoll upgrade, otherwise plain poll, otherwise epoll, otherwise
//!   (on Linux, with nothing else compiled in) `polling`. Every fallback is logged
//!   with its reason. The `AIO_BACKEND` environment variable (`poll`, `poll+epoll`, `epoll`,
//!   `io_uring`, `polling`, `auto`) replaces `Auto` when the builder was left on it.
//! * **Upgrade** from poll to epoll once [`EPOLL_UPGRADE_THRESHOLD`] fds are registered (QEMU's
//!   `EPOLL_ENABLE_THRESHOLD`), when the context was built with the upgrade allowed. Never back
//!   down by count, as QEMU.
//! * **Fallback** from epoll to poll when `epoll_ctl` refuses a change (a regular file gives
//!   `EPERM`): every registration moves over, the refused change is applied to poll, and epoll is
//!   never tried again for this context. No handler is lost.
//!
//! Handler keys belong to the context, not to a backend, so a switch in the middle of a loop
//! iteration is invisible to dispatch: reports that the old backend produced still name live or
//! stale keys, which the context sorts out as always.

use aio_core::{Change, FdMonitor, OuterFd, ReadyList};
use std::fmt;
use std::io;
use std::time::Duration;

#[cfg(all(feature = "epoll", target_os = "linux"))]
use fdmon_epoll::EpollMonitor;
#[cfg(feature = "poll")]
use fdmon_poll::PollMonitor;
#[cfg(feature = "polling")]
use fdmon_polling::PollingMonitor;
#[cfg(all(feature = "io-uring", target_os = "linux"))]
use fdmon_uring::UringMonitor;

/// From this many registered fds on, a poll-based context moves to epoll: poll(2) costs about
/// 40 ns per fd per wait on these machines while epoll_wait is flat (QEMU uses 64 too).
pub const EPOLL_UPGRADE_THRESHOLD: usize = 64;

/// Which backend watches a context's fds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Backend {
    /// The best available: io_uring, else (outside Linux, feature `polling`) kqueue or event
    /// ports through [`Polling`](Backend::Polling), else poll that upgrades itself to epoll at
    /// [`EPOLL_UPGRADE_THRESHOLD`] fds, else poll, else epoll. On Linux `Polling` only when it
    /// is the one backend compiled in. Falls back, with a logged reason, when the
    /// kernel refuses one; io_uring counts as refused unless a no-op request makes the round
    /// trip through the new ring (so a seccomp filter that allows `io_uring_setup` but not
    /// `io_uring_enter` gets poll/epoll, not a ring whose every wait fails).
    #[default]
    Auto,
    /// `ppoll(2)` only (feature `poll`): no upgrade.
    Poll,
    /// poll, moving to epoll at [`EPOLL_UPGRADE_THRESHOLD`] fds (features `poll` and `epoll`):
    /// what [`Auto`](Backend::Auto) falls back to where io_uring is unavailable, and QEMU's
    /// choice when it has no io_uring.
    PollThenEpoll,
    /// epoll from the start (feature `epoll`, Linux). With the `poll` feature built in, a
    /// change epoll refuses for a reason of its own (a regular file's `EPERM`, `ENOMEM`, …;
    /// not a caller's error) still moves every handler to poll, logged, for good, as after an
    /// upgrade: the registration succeeds rather than fail on a backend detail
    /// ([`AioContext::backend`](aio_core::AioContext::backend) then says `"poll"`). Without
    /// it, the refusal is returned. [`Poll`](Backend::Poll) never changes backend.
    Epoll,
    /// io_uring (feature `io-uring`, Linux); an error if the kernel refuses it, setting up the
    /// ring or the round trip through it.
    IoUring,
    /// The `polling` crate (feature `polling`): kqueue on macOS and the BSDs, event ports on
    /// illumos, epoll on Linux. [`Auto`](Backend::Auto) picks it where neither io_uring nor
    /// epoll exists, and on Linux only when no other backend is compiled in (its waits cost
    /// more system calls than epoll's; see `fdmon_polling`'s crate docs).
    Polling,
}

impl Backend {
    /// Parses `AIO_BACKEND`'s values: `auto`, `poll`, `poll+epoll`, `epoll`, `io_uring` (or
    /// `io-uring`, `uring`), `polling`, case-insensitive.
    pub fn from_name(name: &str) -> Option<Backend> {
        match name.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(Backend::Auto),
            "poll" => Some(Backend::Poll),
            "poll+epoll" | "poll-then-epoll" => Some(Backend::PollThenEpoll),
            "epoll" => Some(Backend::Epoll),
            "io_uring" | "io-uring" | "uring" | "iouring" => Some(Backend::IoUring),
            "polling" => Some(Backend::Polling),
            _ => None,
        }
    }
}

/// The backend in use.
enum Active {
    #[cfg(feature = "poll")]
    Poll(PollMonitor),
    #[cfg(all(feature = "epoll", target_os = "linux"))]
    Epoll(EpollMonitor),
    /// Boxed: a ring's state is far larger than the other backends'.
    #[cfg(all(feature = "io-uring", target_os = "linux"))]
    Uring(Box<UringMonitor>),
    #[cfg(feature = "polling")]
    Polling(PollingMonitor),
    /// With no backend compiled in, no `AutoMonitor` can be built; this uninhabited variant
    /// keeps the type (and every `match`) well-formed.
    #[cfg(not(any(
        feature = "poll",
        feature = "polling",
        all(feature = "epoll", target_os = "linux"),
        all(feature = "io-uring", target_os = "linux")
    )))]
    #[allow(dead_code)]
    Unavailable(std::convert::Infallible),
}

/// Runs `$body` with `$m` bound to the active backend, whichever it is.
macro_rules! each {
    ($active:expr, $m:ident => $body:expr) => {
        match $active {
            #[cfg(feature = "poll")]
            Active::Poll($m) => $body,
            #[cfg(all(feature = "epoll", target_os = "linux"))]
            Active::Epoll($m) => $body,
            #[cfg(all(feature = "io-uring", target_os = "linux"))]
            Active::Uring($m) => $body,
            #[cfg(feature = "polling")]
            Active::Polling($m) => $body,
            #[cfg(not(any(
                feature = "poll",
                feature = "polling",
                all(feature = "epoll", target_os = "linux"),
                all(feature = "io-uring", target_os = "linux")
            )))]
            Active::Unavailable(never) => match *never {},
        }
    };
}

/// The monitor of every context the facade builds: one of the compiled-in backends, plus the
/// upgrade and fallback policy between them.
pub struct AutoMonitor {
    active: Active,
    /// Poll may move to epoll at the threshold (built with [`Backend::Auto`], epoll compiled in,
    /// and not yet refused by the kernel).
    upgrade: bool,
}

impl AutoMonitor {
    /// Creates the monitor for `backend`.
    ///
    /// # Errors
    ///
    /// `Unsupported` if the backend is not compiled in (for `Auto`: if none is); the kernel's
    /// error if an explicitly requested backend is refused (io_uring disabled, say). `Auto`
    /// never fails for a refused backend: it falls back and logs why.
    pub fn new(backend: Backend) -> io::Result<AutoMonitor> {
        match backend {
            Backend::Poll => Self::poll(false),
            Backend::PollThenEpoll => Self::poll(true),
            Backend::Epoll => Self::epoll(),
            Backend::IoUring => Self::uring(),
            Backend::Polling => Self::polling(),
            Backend::Auto => {
                match Self::uring() {
                    Ok(m) => return Ok(m),
                    Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
                    Err(e) => tracing::info!("aio: io_uring unavailable ({e}); using poll/epoll"),
                }
                // Without epoll (macOS, the BSDs, illumos), kqueue or event ports beat poll(2),
                // which walks every fd on every wait. On Linux epoll is cheaper per wait than
                // `polling`'s epoll, so `polling` comes last there (below).
                if !cfg!(target_os = "linux") {
                    match Self::polling() {
                        Ok(m) => return Ok(m),
                        Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
                        Err(e) => tracing::info!("aio: polling unavailable ({e}); using poll"),
                    }
                }
                match Self::poll(true) {
                    Ok(m) => Ok(m),
                    Err(e) if e.kind() == io::ErrorKind::Unsupported => match Self::epoll() {
                        // On Linux, `polling` only when it is all that was compiled in.
                        Err(e) if e.kind() == io::ErrorKind::Unsupported => Self::polling(),
                        other => other,
                    },
                    Err(e) => Err(e),
                }
            }
        }
    }

    #[cfg(feature = "poll")]
    fn poll(upgrade: bool) -> io::Result<AutoMonitor> {
        Ok(AutoMonitor {
            active: Active::Poll(PollMonitor::new()?),
            upgrade: upgrade && cfg!(all(feature = "epoll", target_os = "linux")),
        })
    }

    #[cfg(not(feature = "poll"))]
    fn poll(_upgrade: bool) -> io::Result<AutoMonitor> {
        Err(not_compiled("poll"))
    }

    #[cfg(all(feature = "epoll", target_os = "linux"))]
    fn epoll() -> io::Result<AutoMonitor> {
        Ok(AutoMonitor {
            active: Active::Epoll(EpollMonitor::new()?),
            upgrade: false,
        })
    }

    #[cfg(not(all(feature = "epoll", target_os = "linux")))]
    fn epoll() -> io::Result<AutoMonitor> {
        Err(not_compiled("epoll"))
    }

    #[cfg(all(feature = "io-uring", target_os = "linux"))]
    fn uring() -> io::Result<AutoMonitor> {
        Ok(AutoMonitor {
            // Checked with a round trip: a ring whose `io_uring_enter` is refused would fail
            // every wait.
            active: Active::Uring(Box::new(UringMonitor::new_checked()?)),
            upgrade: false,
        })
    }

    #[cfg(not(all(feature = "io-uring", target_os = "linux")))]
    fn uring() -> io::Result<AutoMonitor> {
        Err(not_compiled("io-uring"))
    }

    #[cfg(feature = "polling")]
    fn polling() -> io::Result<AutoMonitor> {
        Ok(AutoMonitor {
            active: Active::Polling(PollingMonitor::new()?),
            upgrade: false,
        })
    }

    #[cfg(not(feature = "polling"))]
    fn polling() -> io::Result<AutoMonitor> {
        Err(not_compiled("polling"))
    }

    /// Every registration of the active backend.
    #[cfg(all(feature = "poll", feature = "epoll", target_os = "linux"))]
    fn registrations(&self) -> Vec<(aio_core::HandlerKey, std::os::fd::RawFd, aio_core::Interest)> {
        each!(&self.active, m => m.registrations().collect())
    }

    /// Moves from poll to epoll when the threshold is reached. On any refusal, stays on poll for
    /// good (QEMU's `fdmon_epoll_disable`), having lost nothing: poll still has everything.
    #[cfg(all(feature = "poll", feature = "epoll", target_os = "linux"))]
    fn maybe_upgrade(&mut self) {
        let Active::Poll(poll) = &self.active else {
            return;
        };
        if !self.upgrade || poll.len() < EPOLL_UPGRADE_THRESHOLD {
            return;
        }
        let moved = EpollMonitor::new().and_then(|mut epoll| {
            for (key, fd, interest) in poll.registrations() {
                // Each registration came through `update`, whose contract keeps its fd open
                // until it is removed; moving it to epoll changes nothing.
                // SAFETY: [FD-1], kept by the caller of the `update` that added it.
                unsafe { epoll.update(Change::Add { key, fd, interest }) }?;
            }
            Ok(epoll)
        });
        match moved {
            Ok(epoll) => {
                tracing::debug!(
                    "aio: {} fds registered: moving from poll to epoll",
                    poll.len()
                );
                self.active = Active::Epoll(epoll);
            }
            Err(e) => tracing::warn!("aio: cannot move to epoll ({e}); staying on poll"),
        }
        // Either way this is the one upgrade attempt: epoll is never tried again by count.
        self.upgrade = false;
    }

    #[cfg(all(feature = "poll", not(all(feature = "epoll", target_os = "linux"))))]
    fn maybe_upgrade(&mut self) {}

    /// epoll refused `change`: move everything to poll and apply the change there.
    #[cfg(all(feature = "poll", feature = "epoll", target_os = "linux"))]
    fn fall_back_to_poll(&mut self, change: Change, why: io::Error) -> io::Result<()> {
        let mut poll = PollMonitor::new()?;
        for (key, fd, interest) in self.registrations() {
            // Each registration came through `update`, whose contract keeps its fd open
            // until it is removed; moving it to poll changes nothing.
            // SAFETY: [FD-1], kept by the caller of the `update` that added it.
            unsafe { poll.update(Change::Add { key, fd, interest }) }?;
        }
        // SAFETY: [FD-1]: `change` comes from this monitor's `update`, under its contract.
        unsafe { poll.update(change) }?;
        tracing::warn!(
            "aio: epoll refused a change ({why}); moved {} fds to poll for good",
            poll.len()
        );
        self.active = Active::Poll(poll);
        self.upgrade = false;
        Ok(())
    }
}

#[cfg(all(not(feature = "poll"), feature = "epoll", target_os = "linux"))]
impl AutoMonitor {
    fn fall_back_to_poll(&mut self, _change: Change, why: io::Error) -> io::Result<()> {
        Err(why)
    }
}

// With no backend compiled in, every method body is an empty match and ignores its arguments.
#[cfg_attr(
    not(any(
        feature = "poll",
        feature = "polling",
        all(feature = "epoll", target_os = "linux"),
        all(feature = "io-uring", target_os = "linux")
    )),
    allow(unused_variables)
)]
impl FdMonitor for AutoMonitor {
    fn name(&self) -> &'static str {
        each!(&self.active, m => m.name())
    }

    unsafe fn update(&mut self, change: Change) -> io::Result<()> {
        match &mut self.active {
            #[cfg(feature = "poll")]
            Active::Poll(m) => {
                // SAFETY: [FD-1]: the caller's contract, passed on to the active backend.
                unsafe { m.update(change) }?;
                self.maybe_upgrade();
                Ok(())
            }
            #[cfg(all(feature = "epoll", target_os = "linux"))]
            Active::Epoll(m) => {
                // SAFETY: [FD-1]: the caller's contract, passed on to the active backend.
                let result = unsafe { m.update(change) };
                match result {
                    Ok(()) => Ok(()),
                    // A change that poll would refuse too is the caller's error, not epoll's.
                    Err(e)
                        if e.kind() == io::ErrorKind::InvalidInput
                            || e.kind() == io::ErrorKind::NotFound =>
                    {
                        Err(e)
                    }
                    Err(e) => self.fall_back_to_poll(change, e),
                }
            }
            #[cfg(all(feature = "io-uring", target_os = "linux"))]
            // SAFETY: [FD-1]: the caller's contract, passed on to the active backend.
            Active::Uring(m) => unsafe { m.update(change) },
            #[cfg(feature = "polling")]
            // SAFETY: [FD-1]: the caller's contract, passed on to the active backend.
            Active::Polling(m) => unsafe { m.update(change) },
            #[cfg(not(any(
                feature = "poll",
                feature = "polling",
                all(feature = "epoll", target_os = "linux"),
                all(feature = "io-uring", target_os = "linux")
            )))]
            Active::Unavailable(never) => match *never {},
        }
    }

    fn wait(&mut self, ready: &mut ReadyList, timeout: Option<Duration>) -> io::Result<usize> {
        each!(&mut self.active, m => m.wait(ready, timeout))
    }

    fn must_wait(&self) -> Option<bool> {
        each!(&self.active, m => m.must_wait())
    }

    fn prepare_polling(&mut self) -> io::Result<()> {
        each!(&mut self.active, m => m.prepare_polling())
    }

    fn outer_fds(&self, out: &mut Vec<OuterFd>) {
        each!(&self.active, m => m.outer_fds(out))
    }

    fn has_completions(&self) -> bool {
        each!(&self.active, m => m.has_completions())
    }

    /// The active backend's own type (the io_uring monitor's ring carries block I/O).
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        each!(&mut self.active, m => m.as_any_mut())
    }
}

impl fmt::Debug for AutoMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AutoMonitor")
            .field("backend", &self.name())
            .field("upgrade", &self.upgrade)
            .finish()
    }
}

#[allow(dead_code)]
fn not_compiled(feature: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("aio was built without the `{feature}` feature"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend left out of the build is `Unsupported`, never silently replaced. Run by
    /// `xtask ci` once per feature set, so each absence is checked in some build.
    #[test]
    fn backends_not_compiled_in_are_unsupported() {
        let linux = cfg!(target_os = "linux");
        for (backend, compiled) in [
            (Backend::Poll, cfg!(feature = "poll")),
            (Backend::PollThenEpoll, cfg!(feature = "poll")),
            (Backend::Epoll, cfg!(feature = "epoll") && linux),
            (Backend::IoUring, cfg!(feature = "io-uring") && linux),
            (Backend::Polling, cfg!(feature = "polling")),
        ] {
            if !compiled {
                let err = AutoMonitor::new(backend).unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::Unsupported, "{backend:?}");
            }
        }
    }

    /// `Auto` picks `polling` outside Linux whenever it is compiled in, and on Linux only when
    /// no other backend is (`--no-default-features --features polling`).
    #[test]
    fn auto_picks_polling_only_where_it_should() {
        let linux = cfg!(target_os = "linux");
        let others = cfg!(feature = "poll")
            || (linux && (cfg!(feature = "epoll") || cfg!(feature = "io-uring")));
        let name = AutoMonitor::new(Backend::Auto).map(|m| m.name());
        if cfg!(feature = "polling") && (!linux || !others) {
            assert_eq!(name.unwrap(), "polling");
        } else if others {
            assert_ne!(name.unwrap(), "polling");
        } else {
            assert_eq!(name.unwrap_err().kind(), io::ErrorKind::Unsupported);
        }
    }
}
