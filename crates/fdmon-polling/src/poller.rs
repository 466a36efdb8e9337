//! The calls into the `polling` crate that take a raw fd, and the translation between
//! aio-core's flag types and `polling`'s events.
//!
//! This is the only file of the crate that contains `unsafe`. `polling` asks for an fd it can
//! borrow (`AsFd`) or, to add one, an `unsafe` promise that the fd is deleted before it is
//! closed. The context hands a backend bare fd numbers, so each wrapper here borrows the number
//! for the length of one call, under [FD-1], the safety contract of the `unsafe`
//! `FdMonitor::update` through which every number arrives ("Raw fds" in ARCHITECTURE.md: the
//! fd stays open, naming the same file, from its `Add` until its `Remove` is applied).
//! Breaking that contract corrupts no memory: `polling` only passes the number on to
//! `epoll_ctl`, `kevent` or `port_associate`, which answer `EBADF` or `ENOENT`.

use std::io;
use std::os::fd::{BorrowedFd, RawFd};

use aio_core::{HandlerKey, Interest, Readiness};
use polling::{Event, PollMode, Poller};

/// The `polling` key of a handler: its [`HandlerKey`], whose `u64` fits a 64-bit `usize`.
pub(crate) fn key_to_polling(key: HandlerKey) -> usize {
    key.as_u64() as usize
}

/// The handler key that a `polling` key was made from by [`key_to_polling`].
pub(crate) fn key_from_polling(key: usize) -> HandlerKey {
    HandlerKey::from_u64(key as u64)
}

/// The `polling` event that asks for `interest`, reported under `key`.
pub(crate) fn interest_to_event(key: HandlerKey, interest: Interest) -> Event {
    let key = key_to_polling(key);
    match (
        interest.contains(Interest::READ),
        interest.contains(Interest::WRITE),
    ) {
        (true, true) => Event::all(key),
        (true, false) => Event::readable(key),
        (false, true) => Event::writable(key),
        (false, false) => Event::none(key),
    }
}

/// What `event` says happened, in aio-core's terms.
///
/// `polling` reports readability and writability everywhere; hang-up (`is_interrupt`) and
/// error (`is_err`) only where the kernel says so separately (epoll, event ports). kqueue folds
/// both into its read and write filters (`EV_EOF` on a readable event), so there a hang-up is
/// reported as readable, which calls the same read callback.
pub(crate) fn event_to_readiness(event: &Event) -> Readiness {
    let mut readiness = Readiness::empty();
    if event.readable {
        readiness |= Readiness::READABLE;
    }
    if event.writable {
        readiness |= Readiness::WRITABLE;
    }
    if event.is_interrupt() {
        readiness |= Readiness::HANGUP;
    }
    if event.is_err() == Some(true) {
        readiness |= Readiness::ERROR;
    }
    readiness
}

/// Starts watching `fd` (`polling::Poller::add_with_mode`).
pub(crate) fn add(poller: &Poller, fd: RawFd, event: Event, mode: PollMode) -> io::Result<()> {
    // `polling` requires the fd to be deleted before it is closed. That is [FD-1], the contract
    // of `FdMonitor::update` through which `fd` came: it stays open from its `Add` until its
    // `Remove`, and every `Remove` reaches `delete` below. A breach only makes the kernel
    // forget the fd (epoll, kqueue, event ports all drop closed files).
    // SAFETY: [FD-1]: `fd` is deleted from the poller before it is closed.
    unsafe { poller.add_with_mode(fd, event, mode) }
}

/// Changes what `fd` is watched for and the key it is reported under.
pub(crate) fn modify(poller: &Poller, fd: RawFd, event: Event, mode: PollMode) -> io::Result<()> {
    poller.modify_with_mode(borrow(fd)?, event, mode)
}

/// Stops watching `fd`.
pub(crate) fn delete(poller: &Poller, fd: RawFd) -> io::Result<()> {
    poller.delete(borrow(fd)?)
}

/// Borrows a registered fd number for one call into `polling`.
fn borrow<'a>(fd: RawFd) -> io::Result<BorrowedFd<'a>> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // `fd` is not -1 (checked above), and it came through `FdMonitor::update`, whose contract
    // [FD-1] keeps it open until its `Remove` is applied, which is at the earliest the call
    // this borrow is made for. The borrow does not outlive that call.
    // SAFETY: [FD-1]: `fd` is not -1 and open for the whole borrow.
    Ok(unsafe { BorrowedFd::borrow_raw(fd) })
}
