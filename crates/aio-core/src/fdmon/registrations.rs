//! The part of the backend contract that every [`FdMonitor`](crate::FdMonitor) shares: the
//! rules a [`Change`] must follow ([`validate`]), the errors that refuse one, and the
//! registration table ([`Registrations`]) of the backends whose kernel object is found by fd
//! number (epoll, `polling`), with its record of which key owns each number, and what those
//! backends do about *orphans* ([`Orphans`]).
//!
//! A backend crate keeps only what is specific to its system calls: the poll backend its
//! `pollfd` array (it validates against its own index), io_uring its in-flight polls (it
//! validates against its own slots), epoll and `polling` their kernel object plus this table.
//! Every backend therefore refuses the same bad changes with the same [`io::ErrorKind`]:
//!
//! | change | refused with |
//! |---|---|
//! | `Add` of a negative fd, or with an empty interest | `InvalidInput` |
//! | `Add` of a key that is already registered | `InvalidInput` |
//! | `Replace` or `Remove` of a key that is not registered | `NotFound` |
//! | `Replace` to a key that is already registered (other than the old key) | `InvalidInput` |
//! | `Replace` with an empty interest, or an fd other than the registered one | `InvalidInput` |
//!
//! Validation comes first and changes nothing, so a refused change leaves a monitor as it was.
//!
//! The maps here ([`KeyMap`], [`FdMap`]) hash with [`IntHasher`], a one-multiply hash for the
//! small integer keys that fds and handler keys are: the tables are sized by the number of
//! registrations, not by the highest fd number, and a lookup costs no SipHash round.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::fdmon::{Change, HandlerKey, Interest};
use crate::sync::{Ordering, SettingBool};

/// A hasher for integer keys (fd numbers, [`HandlerKey`]s): one rotate, xor and multiply per
/// word written (the `FxHash` step), which spreads consecutive integers over the whole `u64`.
///
/// It is not collision-resistant against chosen keys; fd numbers and handler keys are chosen by
/// the kernel and the context, not by a peer.
#[derive(Debug, Clone, Copy, Default)]
pub struct IntHasher(u64);

/// The odd multiplier of `FxHash` (rustc's hasher): the fractional part of the golden ratio.
const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl IntHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.add(u64::from(byte));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }
    fn write_i32(&mut self, n: i32) {
        // The bit pattern, zero-extended: a negative fd is never stored, but must still hash.
        self.add(u64::from(n as u32));
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

/// A map keyed by fd number, sized by its entries (not by the highest fd), hashed with
/// [`IntHasher`].
pub type FdMap<V> = HashMap<RawFd, V, BuildHasherDefault<IntHasher>>;

/// A map keyed by [`HandlerKey`], hashed with [`IntHasher`].
pub type KeyMap<V> = HashMap<HandlerKey, V, BuildHasherDefault<IntHasher>>;

/// An [`io::ErrorKind::InvalidInput`] error for a change that breaks the caller's contract.
pub fn invalid_input(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// An [`io::ErrorKind::NotFound`] error for a change that names a key nobody registered.
pub fn not_found(key: HandlerKey) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{key:?} is not registered"),
    )
}

/// Checks `change` against the contract, given `fd_of`, which tells the fd a key is registered
/// with (`None`: not registered). Changes nothing; see the [module docs](self) for the rules.
///
/// Backend-specific refusals (a key value the kernel interface reserves) come on top of these,
/// checked by the backend.
///
/// # Errors
///
/// The refusals of the table in the module docs, with their [`io::ErrorKind`]s.
///
/// # Examples
///
/// ```
/// use std::io::ErrorKind;
/// use aio_core::registrations::validate;
/// use aio_core::{Change, HandlerKey, Interest};
///
/// let (a, b) = (HandlerKey::new(0, 0), HandlerKey::new(1, 0));
/// let fd_of = |key| (key == a).then_some(5);
/// let add = Change::Add { key: b, fd: 6, interest: Interest::READ };
/// assert!(validate(add, fd_of).is_ok());
/// let again = Change::Add { key: a, fd: 6, interest: Interest::READ };
/// assert_eq!(validate(again, fd_of).unwrap_err().kind(), ErrorKind::InvalidInput);
/// let gone = Change::Remove { key: b, fd: 6 };
/// assert_eq!(validate(gone, fd_of).unwrap_err().kind(), ErrorKind::NotFound);
/// ```
pub fn validate(change: Change, fd_of: impl Fn(HandlerKey) -> Option<RawFd>) -> io::Result<()> {
    match change {
        Change::Add { key, fd, interest } => {
            // poll(2) silently ignores a negative fd, epoll and io_uring answer EBADF; an empty
            // interest would still be told about hang-ups. Either is a handler that never runs,
            // or runs when nobody asked, so every backend refuses both up front.
            if fd < 0 {
                return Err(invalid_input(format!("cannot watch negative fd {fd}")));
            }
            if interest.is_empty() {
                return Err(invalid_input(format!("empty interest for fd {fd}")));
            }
            if fd_of(key).is_some() {
                return Err(invalid_input(format!("{key:?} is already registered")));
            }
        }
        Change::Replace {
            old,
            new,
            fd,
            interest,
        } => {
            let Some(registered_fd) = fd_of(old) else {
                return Err(not_found(old));
            };
            if new != old && fd_of(new).is_some() {
                return Err(invalid_input(format!("{new:?} is already registered")));
            }
            if interest.is_empty() {
                return Err(invalid_input(format!("empty interest for fd {fd}")));
            }
            if fd != registered_fd {
                return Err(invalid_input(format!(
                    "{old:?} watches fd {registered_fd}, not fd {fd}; a modify cannot change the fd"
                )));
            }
        }
        // The fd of a removal is not checked: it may already be closed, or reused, and the key
        // alone names the registration.
        Change::Remove { key, fd: _ } => {
            if fd_of(key).is_none() {
                return Err(not_found(key));
            }
        }
    }
    Ok(())
}

/// A kernel watched set that finds its entries by fd number (epoll, kqueue, event ports): the
/// three calls a backend built on [`Registrations::update`] provides. Each reports the kernel's
/// error unchanged; [`Registrations::update`] decides which ones mean "already gone".
pub trait FdTable {
    /// Starts watching `fd` for `interest`, reported as `key` (`EPOLL_CTL_ADD`).
    ///
    /// # Errors
    ///
    /// The kernel's refusal (`EEXIST`, `EPERM`, `EBADF`, `ENOMEM`, ...).
    fn add(&mut self, fd: RawFd, key: HandlerKey, interest: Interest) -> io::Result<()>;

    /// Changes the entry that `fd` names to report `key` for `interest` (`EPOLL_CTL_MOD`).
    ///
    /// # Errors
    ///
    /// The kernel's refusal; `ENOENT` when the number names a file that is not watched.
    fn modify(&mut self, fd: RawFd, key: HandlerKey, interest: Interest) -> io::Result<()>;

    /// Stops watching the entry that `fd` names (`EPOLL_CTL_DEL`).
    ///
    /// # Errors
    ///
    /// The kernel's refusal; `EBADF`, `ENOENT` or `EPERM` when the file was closed.
    fn delete(&mut self, fd: RawFd) -> io::Result<()>;
}

/// The registrations of a backend whose kernel object finds an entry by fd number (epoll,
/// kqueue, event ports): each key's fd and interest, and for each fd number the key that
/// *owns* it.
///
/// # Owners, and stale keys
///
/// Such a kernel watches *(file, fd number)* pairs and drops an entry by itself when its file
/// is closed. If the number is then reused for another file and registered under a new key
/// while the old key is still registered, the old key's entry is gone (or tied to a file no
/// number names), and any change made through the number would reach the new key's entry. So
/// each fd number has one owner, the key most recently added or modified on it, and only the
/// owner's changes may reach the kernel; a registered key that does not own its fd is *stale*.
///
/// Invariant: every owner is registered, with that fd.
///
/// # Use
///
/// A backend whose kernel object is an [`FdTable`] hands each change to
/// [`update`](Self::update), which validates it, makes the system call and records it. The
/// pieces are public too: [`validate`](Self::validate) first; then the system call (asking
/// [`owns`](Self::owns) whether a modify may go through the number); then
/// [`insert`](Self::insert) or [`replace`](Self::replace) only if the kernel accepted it. A
/// removal is recorded first, with [`remove`](Self::remove), which says whether the kernel
/// entry is to be deleted.
#[derive(Default)]
pub struct Registrations {
    by_key: KeyMap<(RawFd, Interest)>,
    owners: FdMap<HandlerKey>,
}

impl Registrations {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks `change` against the contract and this table (see [`validate`]).
    ///
    /// # Errors
    ///
    /// As [`validate`].
    pub fn validate(&self, change: Change) -> io::Result<()> {
        validate(change, |key| self.get(key).map(|(fd, _)| fd))
    }

    /// Applies `change` to `kernel` and to this table: validation, then one system call (two
    /// when a modify finds its number reused), then the bookkeeping, so that a refused change
    /// leaves both as they were.
    ///
    /// * `Add`: `kernel.add`.
    /// * `Replace` of a key that owns its fd: `kernel.modify` with the new key, so that an event
    ///   already queued under the old key cannot pass for the new handler's. If the kernel
    ///   answers `ENOENT`, the old file was closed (and dropped) and its number reused: the
    ///   handler being replaced wants the number watched, so `kernel.add` watches the file it
    ///   names now. Of a stale key: `kernel.add`, since modifying through the number would change
    ///   the owner's entry.
    /// * `Remove` of a key that owns its fd: `kernel.delete`; `EBADF`, `ENOENT` and `EPERM` mean
    ///   the file was closed while registered and the kernel already dropped it (the number is
    ///   not open, or names another file), and count as success. Of a stale key: nothing. The
    ///   table forgets the key whatever the kernel says, as the context does.
    ///
    /// # Errors
    ///
    /// The refusals of [`validate`], and the kernel's other errors.
    pub fn update(&mut self, kernel: &mut impl FdTable, change: Change) -> io::Result<()> {
        self.validate(change)?;
        match change {
            Change::Add { key, fd, interest } => {
                kernel.add(fd, key, interest)?;
                self.insert(key, fd, interest);
            }
            Change::Replace {
                old,
                new,
                fd,
                interest,
            } => {
                if !self.owns(old) {
                    kernel.add(fd, new, interest)?;
                } else if let Err(err) = kernel.modify(fd, new, interest) {
                    if err.raw_os_error() != Some(libc::ENOENT) {
                        return Err(err);
                    }
                    tracing::debug!(
                        fd,
                        ?old,
                        ?new,
                        "fd was closed and its number reused while registered; adding it anew"
                    );
                    kernel.add(fd, new, interest)?;
                }
                self.replace(old, new, fd, interest);
            }
            Change::Remove { key, fd: _ } => {
                // The fd is taken from the table, not from the change: it is what was
                // registered.
                let Some(fd) = self.remove(key)? else {
                    return Ok(());
                };
                match kernel.delete(fd) {
                    Ok(()) => {}
                    Err(err)
                        if matches!(
                            err.raw_os_error(),
                            Some(libc::EBADF | libc::ENOENT | libc::EPERM)
                        ) =>
                    {
                        tracing::debug!(
                            fd,
                            ?key,
                            %err,
                            "fd was closed while registered; the kernel already dropped it"
                        );
                    }
                    Err(err) => return Err(err),
                }
            }
        }
        Ok(())
    }

    /// The fd and interest `key` is registered with.
    pub fn get(&self, key: HandlerKey) -> Option<(RawFd, Interest)> {
        self.by_key.get(&key).copied()
    }

    /// Whether `key` is registered and owns its fd number (is not stale), so that a change made
    /// through the number reaches its own kernel entry.
    pub fn owns(&self, key: HandlerKey) -> bool {
        self.get(key)
            .is_some_and(|(fd, _)| self.owners.get(&fd) == Some(&key))
    }

    /// Records an `Add` the kernel accepted. The key becomes its fd's owner; an older key that
    /// owned the number becomes stale (logged at debug level).
    pub fn insert(&mut self, key: HandlerKey, fd: RawFd, interest: Interest) {
        self.by_key.insert(key, (fd, interest));
        if let Some(stale) = self.owners.insert(fd, key) {
            // The kernel accepted the add although `stale` was registered on the same number,
            // so the number now names another file: `stale`'s file was closed while registered.
            tracing::debug!(
                fd,
                ?key,
                ?stale,
                "fd number reused while an older handler was still registered on it; the older \
                 one is stale and will not be touched in the kernel"
            );
        }
    }

    /// Records a `Replace` the kernel accepted: `old` is forgotten, `new` owns the fd.
    pub fn replace(&mut self, old: HandlerKey, new: HandlerKey, fd: RawFd, interest: Interest) {
        self.by_key.remove(&old);
        self.by_key.insert(new, (fd, interest));
        self.owners.insert(fd, new);
    }

    /// Forgets `key`. Returns its fd if the key owned it, so that its kernel entry is to be
    /// deleted, or `None` if the key was stale (logged at debug level): its entry is gone and
    /// the number belongs to another key.
    ///
    /// # Errors
    ///
    /// `NotFound` if `key` is not registered.
    pub fn remove(&mut self, key: HandlerKey) -> io::Result<Option<RawFd>> {
        let (fd, _) = self.by_key.remove(&key).ok_or_else(|| not_found(key))?;
        if self.owners.get(&fd) != Some(&key) {
            tracing::debug!(
                fd,
                ?key,
                "removing a stale handler whose fd number was reused; nothing to delete"
            );
            return Ok(None);
        }
        self.owners.remove(&fd);
        Ok(Some(fd))
    }

    /// Adds every registration that owns its fd number to `fresh`, a new, empty kernel object
    /// that is to replace the one this table has driven so far (how epoll-based backends drop
    /// *orphans*: entries of removed handlers that the kernel keeps because a duplicate holds
    /// the file open, and that no number can reach any more). Stale keys are left out: their
    /// files are gone. Each entry is added through its number, so a registration whose fd was
    /// closed while registered is left out if the number is not open (`EBADF`), names a file
    /// the kernel refuses (`EPERM`) or the new object itself or one of its own fds (`EINVAL`,
    /// `EEXIST`), and watches the number's new file if it was reused.
    ///
    /// Returns how many were left out that way (logged at debug level).
    ///
    /// # Errors
    ///
    /// Any other refusal (`ENOSPC`, `ENOMEM`): `fresh` is then incomplete and must not replace
    /// the kernel object in use.
    pub fn add_owned_to(&self, fresh: &mut impl FdTable) -> io::Result<usize> {
        let mut left_out = 0;
        for (key, fd, interest) in self.iter().filter(|&(key, _, _)| self.owns(key)) {
            match fresh.add(fd, key, interest) {
                Ok(()) => {}
                // The number no longer names the registered file. EEXIST and EINVAL: the new
                // kernel object's own fds took it (epoll refuses itself with EINVAL, and
                // `polling`'s notifier and timer fds are already in its set).
                Err(err)
                    if matches!(
                        err.raw_os_error(),
                        Some(libc::EBADF | libc::EPERM | libc::EEXIST | libc::EINVAL)
                    ) =>
                {
                    tracing::debug!(fd, ?key, %err, "a closed fd is not watched again");
                    left_out += 1;
                }
                Err(err) => return Err(err),
            }
        }
        Ok(left_out)
    }

    /// Every registration: key, fd and interest, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (HandlerKey, RawFd, Interest)> + '_ {
        self.by_key
            .iter()
            .map(|(&key, &(fd, interest))| (key, fd, interest))
    }

    /// How many keys are registered (stale ones included).
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether no key is registered.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

impl fmt::Debug for Registrations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// What a backend on an epoll instance (fdmon-epoll, and fdmon-polling on Linux) does about
/// *orphans*: reports under keys it no longer has, from entries of removed handlers whose fd
/// was closed first while a duplicate (`dup`, `try_clone`, `fork`) kept the file open. epoll
/// finds entries by number, which no longer names that file, so nothing can delete them, and a
/// file that stays ready would end every wait at once. The backend drops their reports, and the
/// first wait that only orphans ended asks [`replacement`](Self::replacement) for a new kernel
/// object holding the live registrations ([`Registrations::add_owned_to`]), which drops the
/// orphans with the old one.
///
/// The old object is kept, and the orphans only filtered out, logged once, when its fd was lent
/// ([`lend`](Self::lend): code that may keep the number, whereas an outer loop asks
/// `outer_fds` again before every sleep and so follows a replacement). When a replacement
/// fails (`EMFILE`, `ENOSPC` past `max_user_watches`, `ENOMEM`), the old object is kept too,
/// logged once, and another replacement is tried no sooner than [`RETRY`](Self::RETRY) later.
#[derive(Debug, Default)]
pub struct Orphans {
    /// Whether the kernel object's fd was lent through `AsFd`.
    lent: SettingBool,
    /// Set once the orphans were found with the fd lent: no replacement is tried again.
    kept: bool,
    /// When the last replacement failed, while no replacement has succeeded since.
    failed_at: Option<Instant>,
}

impl Orphans {
    /// How long after a failed replacement another is tried: until then the orphans' reports
    /// are only filtered out.
    pub const RETRY: Duration = Duration::from_secs(1);

    /// Records that the kernel object's fd was lent through `AsFd`: it is never replaced.
    pub fn lend(&self) {
        // Relaxed: a flag for this backend's own later waits, which run on the same thread
        // as every change to it (`&mut self`), or after a hand-over that synchronizes.
        self.lent.store(true, Ordering::Relaxed);
    }

    /// `orphans` events of the last wait of `backend` named no registered key. Returns the
    /// kernel object to replace the current one with, made by `fresh` (which returns it with
    /// the number of registrations it left out, from [`Registrations::add_owned_to`]), and logs
    /// the replacement; or `None` when the current one is to be kept (lent, failed before, or
    /// `fresh` fails now), logged once.
    pub fn replacement<T>(
        &mut self,
        backend: &str,
        orphans: usize,
        fresh: impl FnOnce() -> io::Result<(T, usize)>,
    ) -> Option<T> {
        if self.kept || self.failed_at.is_some_and(|at| at.elapsed() < Self::RETRY) {
            return None;
        }
        let made = if self.lent.load(Ordering::Relaxed) {
            self.kept = true;
            Err(io::Error::other("its fd was lent through AsFd"))
        } else {
            fresh()
        };
        match made {
            Ok((object, left_out)) => {
                self.failed_at = None;
                tracing::warn!(
                    orphans,
                    left_out,
                    "{backend}: fds were closed before their handlers were removed while a \
                     duplicate kept them open; replaced the kernel object to stop their reports \
                     (remove a handler before closing its fd)"
                );
                Some(object)
            }
            Err(why) => {
                if self.failed_at.replace(Instant::now()).is_none() {
                    tracing::warn!(
                        orphans,
                        "{backend}: reports of fds closed before their handlers were removed, \
                         kept open by a duplicate, cannot be dropped ({why}); the loop wakes for \
                         them until the duplicates are closed or a new kernel object can be made"
                    );
                }
                None
            }
        }
    }
}

/// The deadline of one [`FdMonitor::wait`](crate::FdMonitor::wait) that may have to wait again
/// after the kernel returned with nothing to report (orphans only, a signal): how long the
/// next try may sleep, so that the whole wait ends at the deadline taken at its start, neither
/// earlier nor later, and an infinite one stays infinite.
#[derive(Clone, Copy, Debug)]
pub struct WaitDeadline {
    timeout: Option<Duration>,
    at: Option<Instant>,
}

impl WaitDeadline {
    /// The deadline of a wait for `timeout` starting now. Only a finite, nonzero timeout reads
    /// the clock; one so large that the deadline cannot be represented counts as infinite.
    pub fn new(timeout: Option<Duration>) -> WaitDeadline {
        let at = match timeout {
            Some(t) if !t.is_zero() => Instant::now().checked_add(t),
            _ => None,
        };
        WaitDeadline { timeout, at }
    }

    /// When the wait ends, if it is finite and nonzero.
    pub fn at(&self) -> Option<Instant> {
        self.at
    }

    /// What to wait for next: `None` when a try is all the wait may do (a zero timeout), else
    /// the time left until the deadline (zero once it has passed), or the timeout as asked
    /// when there is no deadline (infinite, or too far off to represent).
    pub fn again(&self) -> Option<Option<Duration>> {
        match (self.timeout, self.at) {
            (Some(t), _) if t.is_zero() => None,
            (_, Some(at)) => Some(Some(at.saturating_duration_since(Instant::now()))),
            (timeout, None) => Some(timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: Interest = Interest::READ;

    fn key(i: u32) -> HandlerKey {
        HandlerKey::new(i, 0)
    }

    fn kind(r: io::Result<()>) -> io::ErrorKind {
        r.unwrap_err().kind()
    }

    #[test]
    fn validation_follows_the_table() {
        let mut regs = Registrations::new();
        let (a, b) = (key(1), key(2));
        assert!(
            regs.validate(Change::Add {
                key: a,
                fd: 3,
                interest: R
            })
            .is_ok()
        );
        regs.insert(a, 3, R);
        let bad = |regs: &Registrations, c| kind(regs.validate(c));
        use io::ErrorKind::{InvalidInput, NotFound};
        assert_eq!(
            bad(
                &regs,
                Change::Add {
                    key: b,
                    fd: -1,
                    interest: R
                }
            ),
            InvalidInput
        );
        let empty = Interest::empty();
        assert_eq!(
            bad(
                &regs,
                Change::Add {
                    key: b,
                    fd: 4,
                    interest: empty
                }
            ),
            InvalidInput
        );
        assert_eq!(
            bad(
                &regs,
                Change::Add {
                    key: a,
                    fd: 4,
                    interest: R
                }
            ),
            InvalidInput
        );
        let modify = |old, new, fd, interest| Change::Replace {
            old,
            new,
            fd,
            interest,
        };
        assert_eq!(bad(&regs, modify(b, a, 3, R)), NotFound);
        assert_eq!(bad(&regs, modify(a, a, 3, empty)), InvalidInput);
        assert_eq!(bad(&regs, modify(a, b, 4, R)), InvalidInput);
        assert_eq!(bad(&regs, Change::Remove { key: b, fd: 3 }), NotFound);
        assert!(regs.validate(modify(a, a, 3, Interest::WRITE)).is_ok());
        assert!(regs.validate(modify(a, b, 3, R)).is_ok());
        regs.insert(b, 4, R);
        assert_eq!(bad(&regs, modify(a, b, 3, R)), InvalidInput);
    }

    #[test]
    fn a_reused_number_makes_the_older_key_stale() {
        let mut regs = Registrations::new();
        let (a, b, c) = (key(1), key(2), key(3));
        regs.insert(a, 7, R);
        assert!(regs.owns(a));
        regs.insert(b, 7, R);
        assert!(!regs.owns(a) && regs.owns(b));
        assert_eq!(regs.remove(a).unwrap(), None, "stale: nothing to delete");
        regs.replace(b, c, 7, Interest::WRITE);
        assert!(regs.owns(c));
        assert_eq!(regs.get(b), None);
        assert_eq!(regs.remove(c).unwrap(), Some(7));
        assert!(regs.is_empty());
        assert_eq!(regs.remove(c).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    /// A kernel table that records its calls and fails the way it is told to.
    #[derive(Default)]
    struct FakeKernel {
        calls: Vec<(&'static str, RawFd, Option<HandlerKey>)>,
        fail_modify: Option<i32>,
        fail_delete: Option<i32>,
        /// Errors that adds of these numbers fail with.
        fail_add: Vec<(RawFd, i32)>,
    }

    impl FdTable for FakeKernel {
        fn add(&mut self, fd: RawFd, key: HandlerKey, _: Interest) -> io::Result<()> {
            self.calls.push(("add", fd, Some(key)));
            match self.fail_add.iter().find(|&&(n, _)| n == fd) {
                Some(&(_, e)) => Err(io::Error::from_raw_os_error(e)),
                None => Ok(()),
            }
        }
        fn modify(&mut self, fd: RawFd, key: HandlerKey, _: Interest) -> io::Result<()> {
            self.calls.push(("modify", fd, Some(key)));
            self.fail_modify
                .map_or(Ok(()), |e| Err(io::Error::from_raw_os_error(e)))
        }
        fn delete(&mut self, fd: RawFd) -> io::Result<()> {
            self.calls.push(("delete", fd, None));
            self.fail_delete
                .map_or(Ok(()), |e| Err(io::Error::from_raw_os_error(e)))
        }
    }

    #[test]
    fn a_failed_replacement_is_retried_later_and_a_lent_fd_never_replaced() {
        let mut orphans = Orphans::default();
        let tries = std::cell::Cell::new(0);
        let failing = || {
            tries.set(tries.get() + 1);
            Err::<((), usize), _>(io::Error::from_raw_os_error(libc::EMFILE))
        };
        assert!(orphans.replacement("test", 1, failing).is_none());
        assert!(orphans.replacement("test", 1, failing).is_none());
        assert_eq!(tries.get(), 1, "retried within Orphans::RETRY");
        // Once the period is over, it is tried again, and a success clears the failure.
        orphans.failed_at = Some(Instant::now() - Orphans::RETRY);
        assert_eq!(orphans.replacement("test", 1, || Ok((7, 0))), Some(7));
        assert_eq!(orphans.replacement("test", 1, || Ok((8, 0))), Some(8));
        orphans.lend();
        assert!(orphans.replacement("test", 1, failing).is_none());
        orphans.failed_at = None;
        assert!(
            orphans.replacement("test", 1, || Ok((9, 0))).is_none(),
            "lent: never"
        );
        assert_eq!(tries.get(), 1);
    }

    #[test]
    fn a_wait_deadline_says_what_is_left() {
        assert_eq!(WaitDeadline::new(Some(Duration::ZERO)).again(), None);
        assert_eq!(WaitDeadline::new(None).again(), Some(None));
        let huge = Some(Duration::MAX);
        assert_eq!(
            WaitDeadline::new(huge).again(),
            Some(huge),
            "as good as infinite"
        );
        let d = WaitDeadline::new(Some(Duration::from_secs(60)));
        let left = d.again().flatten().unwrap();
        assert!(left <= Duration::from_secs(60) && left > Duration::from_secs(50));
        let past = WaitDeadline::new(Some(Duration::from_nanos(1)));
        std::thread::sleep(Duration::from_millis(1));
        assert_eq!(past.again(), Some(Some(Duration::ZERO)));
    }

    #[test]
    fn a_fresh_table_gets_the_owners_and_leaves_out_closed_numbers() {
        let mut regs = Registrations::new();
        let (a, b, c, d) = (key(1), key(2), key(3), key(4));
        regs.insert(a, 3, R);
        regs.insert(b, 4, R);
        regs.insert(c, 4, Interest::WRITE); // `b` goes stale
        regs.insert(d, 5, R);
        let mut fresh = FakeKernel {
            // 5 is closed; 3 now names one of the new object's own fds.
            fail_add: vec![(5, libc::EBADF), (3, libc::EEXIST)],
            ..FakeKernel::default()
        };
        assert_eq!(regs.add_owned_to(&mut fresh).unwrap(), 2, "fds 3 and 5");
        fresh.calls.sort_by_key(|&(_, fd, _)| fd);
        assert_eq!(
            fresh.calls,
            [
                ("add", 3, Some(a)),
                ("add", 4, Some(c)),
                ("add", 5, Some(d))
            ]
        );
        let mut full = FakeKernel {
            fail_add: vec![(4, libc::ENOSPC)],
            ..FakeKernel::default()
        };
        let err = regs.add_owned_to(&mut full).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(regs.len(), 4, "the table itself is unchanged");
    }

    #[test]
    fn update_makes_the_calls_the_owners_allow() {
        let mut regs = Registrations::new();
        let mut kernel = FakeKernel::default();
        let (a, b, c) = (key(1), key(2), key(3));
        regs.update(
            &mut kernel,
            Change::Add {
                key: a,
                fd: 5,
                interest: R,
            },
        )
        .unwrap();
        // The number is reused for another file: `a` goes stale.
        regs.update(
            &mut kernel,
            Change::Add {
                key: b,
                fd: 5,
                interest: R,
            },
        )
        .unwrap();
        // Replacing the stale key adds afresh rather than modify b's entry.
        let modify = Change::Replace {
            old: a,
            new: c,
            fd: 5,
            interest: R,
        };
        regs.update(&mut kernel, modify).unwrap();
        assert_eq!(kernel.calls[2], ("add", 5, Some(c)));
        // Removing b, no longer the owner, touches nothing; removing c deletes.
        regs.update(&mut kernel, Change::Remove { key: b, fd: 5 })
            .unwrap();
        assert_eq!(kernel.calls.len(), 3);
        kernel.fail_delete = Some(libc::EBADF);
        regs.update(&mut kernel, Change::Remove { key: c, fd: 5 })
            .unwrap();
        assert_eq!(kernel.calls[3], ("delete", 5, None));
        assert!(regs.is_empty());

        // A modify that finds its number reused (ENOENT) adds; another error changes nothing.
        regs.update(
            &mut kernel,
            Change::Add {
                key: a,
                fd: 6,
                interest: R,
            },
        )
        .unwrap();
        kernel.fail_modify = Some(libc::ENOENT);
        let modify = Change::Replace {
            old: a,
            new: b,
            fd: 6,
            interest: R,
        };
        regs.update(&mut kernel, modify).unwrap();
        assert_eq!(
            &kernel.calls[5..],
            [("modify", 6, Some(b)), ("add", 6, Some(b))]
        );
        kernel.fail_modify = Some(libc::ENOMEM);
        let modify = Change::Replace {
            old: b,
            new: c,
            fd: 6,
            interest: R,
        };
        let err = regs.update(&mut kernel, modify).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOMEM));
        assert!(regs.owns(b) && regs.get(c).is_none());
        // A delete error other than "already gone" is returned, but the key is forgotten.
        kernel.fail_delete = Some(libc::ENOMEM);
        assert!(
            regs.update(&mut kernel, Change::Remove { key: b, fd: 6 })
                .is_err()
        );
        assert!(regs.is_empty());
    }

    #[test]
    fn the_hasher_spreads_consecutive_fds() {
        let hashes: std::collections::HashSet<u64> = (0..1000i32)
            .map(|fd| {
                let mut h = IntHasher::default();
                h.write_i32(fd);
                h.finish() >> 57
            })
            .collect();
        assert_eq!(
            hashes.len(),
            128,
            "the top 7 bits (hashbrown's tag) all occur"
        );
    }
}
