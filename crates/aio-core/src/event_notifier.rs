//! [`EventNotifier`]: a level-triggered, cross-thread wake-up flag backed by an eventfd, or by a
//! non-blocking pipe where eventfd does not exist.
//!
//! C original: `util/event_notifier-posix.c`. `set` may be called from any thread and never
//! blocks (a saturated counter or a full pipe already means "set"); `test_and_clear` drains the
//! fd completely, so a pipe that was set many times reads as one event. The read side is what
//! gets registered with a context.
//!
//! Beside the fd, a notifier keeps a flag that `set` raises before it writes the fd, so that a
//! context busy-polling (adaptive polling, docs/qemu-semantics.md §4.3) sees a set notifier with one load, without
//! reading the fd: [`EventNotifier::is_set`] is the built-in poll function of handlers
//! registered through `AioContext::set_event_notifier`.
//!
//! Under `--cfg aio_loom` the notifier is a fake whose "fd" is an index into a table of flags
//! that the fake monitor (`crate::fake`) waits on, so that the loom models run the real notify
//! protocol without system calls.

#[cfg(not(aio_loom))]
pub use real::EventNotifier;

#[cfg(aio_loom)]
pub use fake::EventNotifier;

#[cfg(not(aio_loom))]
mod real {
    use crate::sync::{AtomicBool, Ordering};
    use crate::sys::cvt;
    use std::fmt;
    use std::io;
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

    /// A cross-thread wake-up flag that a context can wait on (QEMU `EventNotifier`).
    ///
    /// It is `Send + Sync`: share it with an `Arc`, [`set`](Self::set) it from any thread, and
    /// register it with a context through
    /// [`AioContext::set_event_notifier`](crate::AioContext::set_event_notifier), whose
    /// callback should call [`test_and_clear`](Self::test_and_clear) (handlers are
    /// level-triggered: a notifier that stays set calls its handler on every iteration).
    ///
    /// # Examples
    ///
    /// ```
    /// use aio_core::EventNotifier;
    ///
    /// let e = EventNotifier::new()?;
    /// assert!(!e.test_and_clear());
    /// e.set()?;
    /// e.set()?;
    /// assert!(e.test_and_clear()); // two sets read as one event
    /// assert!(!e.test_and_clear());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub struct EventNotifier {
        /// The fd to wait on and to drain.
        read: OwnedFd,
        /// The pipe's write end; `None` for an eventfd, which is written through `read`.
        write: Option<OwnedFd>,
        /// Raised by `set` before it writes the fd, lowered by `test_and_clear` before it
        /// drains it: what a busy-polling context reads instead of the fd.
        flag: AtomicBool,
    }

    impl EventNotifier {
        /// Creates a notifier that is not set: an eventfd, or a pipe where the kernel has no
        /// eventfd (`ENOSYS`).
        ///
        /// # Errors
        ///
        /// `EMFILE`/`ENFILE` when the process or system is out of fds, and any other error of
        /// `eventfd(2)` or `pipe2(2)`.
        pub fn new() -> io::Result<Self> {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            {
                // SAFETY: eventfd takes plain integer arguments and returns a new fd or -1.
                match cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) }) {
                    Ok(fd) => {
                        // SAFETY: `fd` was just returned by eventfd and is owned by no one else.
                        let read = unsafe { OwnedFd::from_raw_fd(fd) };
                        return Ok(EventNotifier {
                            read,
                            write: None,
                            flag: AtomicBool::new(false),
                        });
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                        tracing::debug!("eventfd unavailable (ENOSYS); using a pipe");
                    }
                    Err(e) => return Err(e),
                }
            }
            Self::with_pipe()
        }

        /// Creates a notifier backed by a non-blocking pipe even where eventfd exists, so the
        /// fallback can be tested and used on any Unix.
        ///
        /// # Errors
        ///
        /// Any error of `pipe(2)` or `fcntl(2)`, `EMFILE` among them.
        pub fn with_pipe() -> io::Result<Self> {
            let mut fds = [0; 2];
            // SAFETY: `fds` is a valid array of two ints for pipe() to fill.
            cvt(unsafe { libc::pipe(fds.as_mut_ptr()) })?;
            // SAFETY: pipe() succeeded, so the read end is a new fd owned by no one else.
            let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
            // SAFETY: likewise for the write end.
            let write = unsafe { OwnedFd::from_raw_fd(fds[1]) };
            for fd in [read.as_raw_fd(), write.as_raw_fd()] {
                set_nonblocking_cloexec(fd)?;
            }
            Ok(EventNotifier {
                read,
                write: Some(write),
                flag: AtomicBool::new(false),
            })
        }

        /// Sets the notifier. Never blocks; may be called from any thread.
        ///
        /// A full pipe or a saturated eventfd counter (`EAGAIN`) counts as success: the fd is
        /// readable already, which is all a waiter needs. `EINTR` is retried.
        ///
        /// # Errors
        ///
        /// Only unexpected write errors (such as `EBADF` if the fd was closed behind our back).
        pub fn set(&self) -> io::Result<()> {
            // Release: a poller whose acquire load in `is_set` sees the flag sees everything
            // the setter wrote before `set`.
            self.flag.store(true, Ordering::Release);
            let fd = self.write.as_ref().unwrap_or(&self.read).as_raw_fd();
            let value: u64 = 1;
            loop {
                // SAFETY: `value` is 8 readable bytes that live across the call.
                let ret = unsafe { libc::write(fd, (&raw const value).cast(), 8) };
                match cvt(ret) {
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }

        /// Clears the notifier and returns whether it was set.
        ///
        /// Reads until the fd is empty: an eventfd reads once, a pipe may need several reads of
        /// the 512-byte buffer. A `set` racing with this call is never lost: either this call
        /// returns true, or the notifier stays set; at worst it reads as set once more, which a
        /// level-triggered handler tolerates.
        pub fn test_and_clear(&self) -> bool {
            // Acquire: pairs with the release store in `set` (the setter's writes are visible
            // to the caller when this returns true). Lowered before the drain, so that a `set`
            // between the two leaves the fd readable or is drained here, never neither.
            let mut any = self.flag.swap(false, Ordering::AcqRel);
            let fd = self.read.as_raw_fd();
            let mut buf = [0u8; 512];
            loop {
                // SAFETY: `buf` is a writable buffer of `buf.len()` bytes that lives across the call.
                let ret = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                match cvt(ret) {
                    Ok(n) if n > 0 => {
                        any = true;
                        // Only a pipe can fill the buffer; keep draining it.
                        if n as usize == buf.len() {
                            continue;
                        }
                        return any;
                    }
                    Ok(_) => return any,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return any,
                }
            }
        }

        /// Whether the notifier is set, without a system call: `set` was called since the
        /// last [`test_and_clear`](Self::test_and_clear). This is the poll function a context
        /// uses for a notifier it busy-polls; it does not clear anything.
        ///
        /// ```
        /// let e = aio_core::EventNotifier::new()?;
        /// assert!(!e.is_set());
        /// e.set()?;
        /// assert!(e.is_set());
        /// assert!(e.test_and_clear());
        /// assert!(!e.is_set());
        /// # Ok::<(), std::io::Error>(())
        /// ```
        pub fn is_set(&self) -> bool {
            // Acquire: pairs with the release store in `set`.
            self.flag.load(Ordering::Acquire)
        }

        /// The fd that becomes readable when the notifier is set.
        pub fn raw_fd(&self) -> RawFd {
            self.read.as_raw_fd()
        }
    }

    impl AsFd for EventNotifier {
        fn as_fd(&self) -> BorrowedFd<'_> {
            self.read.as_fd()
        }
    }

    impl fmt::Debug for EventNotifier {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("EventNotifier")
                .field("fd", &self.read.as_raw_fd())
                .field(
                    "kind",
                    &if self.write.is_some() {
                        "pipe"
                    } else {
                        "eventfd"
                    },
                )
                .finish()
        }
    }

    fn set_nonblocking_cloexec(fd: RawFd) -> io::Result<()> {
        // SAFETY: F_GETFL/F_SETFL/F_SETFD only change flags of `fd`, which we own.
        unsafe {
            let flags = cvt(libc::fcntl(fd, libc::F_GETFL))?;
            cvt(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK))?;
            cvt(libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC))?;
        }
        Ok(())
    }
}

#[cfg(aio_loom)]
mod fake {
    use crate::fake::FAKE_FDS;
    use std::io;
    use std::os::fd::RawFd;

    /// Loom stand-in for the eventfd notifier: a flag in the fake fd table.
    #[derive(Debug)]
    pub struct EventNotifier {
        fd: RawFd,
    }

    impl EventNotifier {
        /// Allocates a flag in the fake fd table.
        pub fn new() -> io::Result<Self> {
            Ok(EventNotifier {
                fd: FAKE_FDS.alloc(),
            })
        }

        /// Sets the flag and wakes fake waiters.
        pub fn set(&self) -> io::Result<()> {
            FAKE_FDS.set(self.fd);
            Ok(())
        }

        /// Clears the flag, returning whether it was set.
        pub fn test_and_clear(&self) -> bool {
            FAKE_FDS.test_and_clear(self.fd)
        }

        /// Whether the flag is set, without clearing it.
        pub fn is_set(&self) -> bool {
            FAKE_FDS.is_set(self.fd)
        }

        /// The fake fd number.
        pub fn raw_fd(&self) -> RawFd {
            self.fd
        }
    }
}
