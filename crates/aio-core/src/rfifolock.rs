//! [`RFifoLock`], QEMU's recursive FIFO lock (`util/rfifolock.c`, 2013–2017), the lock that
//! `aio_context_acquire`/`aio_context_release` were first built on. This file owns the lock's
//! ticket word, its owner and nesting count, the waiters' condition variable and the contention
//! callback, and the RAII guard.
//!
//! Three properties, all from QEMU:
//!
//! * **Recursive.** The owning thread may lock again; a nested lock takes no ticket, and only
//!   the outermost unlock releases.
//! * **FIFO.** Every other thread takes a ticket when it arrives and gets the lock when the
//!   ticket comes up: the order of acquisition is the order of arrival, so a thread that
//!   releases and immediately locks again goes behind every thread already waiting.
//! * **Contention callback.** An optional closure, run by a thread that has to wait: once when
//!   it starts waiting, and once more after each hand-off that leaves it still waiting (QEMU
//!   calls it before every `qemu_cond_wait`, and every unlock broadcasts). QEMU's context used
//!   it to `aio_notify` itself, kicking the owner out of a blocking `aio_poll` so that the owner
//!   would release the lock.
//!
//! How: a ticket lock in one `AtomicU64` (the next ticket in the high half, the ticket being
//! served in the low half), so an uncontended lock is one `fetch_add` and an unlock one
//! compare-and-swap, with no system call. A waiter runs the callback, polls its ticket a
//! little, then sleeps on a condition variable behind a `sync::Mutex`; an unlock takes that
//! mutex only when a ticket is outstanding behind its own, and signals only when a waiter
//! sleeps. The callback runs without any internal lock held (QEMU held its mutex around it,
//! which forbade it to touch the lock). The invariants the code relies on are
//! [RFifoLock-1] to [RFifoLock-3] in ARCHITECTURE.md ("RFifoLock").
//!
//! Not yet used by the context: an `aio_context_acquire`/`release` on [`AioContext`] is a later
//! step (QEMU ≥ 9.0 has no context lock at all; docs/qemu-semantics.md §10).
//!
//! [`AioContext`]: crate::AioContext

use crate::sync::{AtomicU32, AtomicU64, Condvar, Mutex, Ordering, lock, thread_id, wait};
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;

/// The low half of the ticket word: the ticket now being served (QEMU `head`).
const HEAD_MASK: u64 = 0xFFFF_FFFF;
/// One ticket in the high half of the ticket word (QEMU `tail`, the next ticket to give out).
const ONE_TICKET: u64 = 1 << 32;

#[inline]
fn head(word: u64) -> u32 {
    word as u32
}

#[inline]
fn tail(word: u64) -> u32 {
    (word >> 32) as u32
}

/// `word` with the head moved to the next ticket. Wraps within the low half: a plain add would
/// carry into the tail after 2³² acquisitions.
#[inline]
fn next_head(word: u64) -> u64 {
    (word & !HEAD_MASK) | u64::from(head(word).wrapping_add(1))
}

/// How many times a waiter polls its ticket before sleeping, after each kick (a few
/// microseconds; a hand-off between two running threads then needs no wake-up). One under loom,
/// where each poll is a branch of the model, and few under Miri, where each is slow.
const SPINS: u32 = if cfg!(aio_loom) {
    1
} else if cfg!(miri) {
    4
} else {
    100
};

/// The contention callback's type.
type Contention = Box<dyn Fn() + Send + Sync>;

/// What waiters share, behind `RFifoLock::waiters`.
#[derive(Debug, Default)]
struct Waiters {
    /// How many hand-offs with waiters behind them there have been (each one broadcasts). A
    /// waiter runs the contention callback again only when this moved: a spurious wake-up is
    /// not a new contention.
    handoffs: u64,
    /// Waiters inside `Condvar::wait`, which only a notification gets out.
    sleepers: u32,
    /// Tickets whose thread left the queue (its contention callback panicked). The thread that
    /// moves the head onto one of them skips it at once ([RFifoLock-2]).
    abandoned: Vec<u32>,
}

/// A recursive lock with FIFO hand-off and an optional contention callback: QEMU's `RFifoLock`.
///
/// Like [`parking_lot::ReentrantMutex`](https://docs.rs/lock_api/latest/lock_api/struct.ReentrantMutex.html),
/// it owns its data and hands out only `&T` (a thread may hold several guards at once), so
/// mutation goes through a `Cell`, `RefCell` or similar inside. Unlike it, threads get the lock
/// in the order they asked for it, and a thread that must wait first runs the contention
/// callback ([`with_contention`](Self::with_contention)).
///
/// The guard is released when dropped, also during unwinding: a thread that panics while
/// holding the lock passes it to the next waiter, and there is no poisoning (as with
/// `parking_lot`). A guard that is leaked (`mem::forget`) keeps the lock held for good. A
/// guard cannot be sent to another thread, so the thread that locked is always the one that
/// unlocks.
///
/// Costs: an uncontended lock or unlock is one atomic read-modify-write and a thread-local
/// read; a nested lock or unlock is a thread-local read and plain loads and stores. A release
/// with waiters takes an internal mutex and wakes every sleeping waiter, which each re-check
/// their ticket (QEMU's broadcast), so it is made for a few threads, as QEMU's was.
///
/// # Example
///
/// ```
/// use aio_core::RFifoLock;
/// use std::cell::RefCell;
/// use std::sync::Arc;
///
/// let lock = Arc::new(RFifoLock::new(RefCell::new(Vec::new())));
/// let outer = lock.lock();
/// outer.borrow_mut().push("outer");
/// {
///     let inner = lock.lock(); // the same thread: nested, never blocks
///     inner.borrow_mut().push("inner");
/// }
/// assert!(lock.is_owned_by_current_thread());
///
/// // Another thread must wait until the outermost guard is dropped.
/// let other = lock.clone();
/// let t = std::thread::spawn(move || other.lock().borrow_mut().push("other"));
/// drop(outer);
/// t.join().unwrap();
/// assert_eq!(*lock.lock().borrow(), ["outer", "inner", "other"]);
/// ```
///
/// A guard cannot leave its thread:
///
/// ```compile_fail,E0277
/// let lock = aio_core::RFifoLock::new(0);
/// let guard = lock.lock();
/// std::thread::scope(|s| {
///     s.spawn(move || drop(guard)); // `RFifoLockGuard` is not `Send`
/// });
/// ```
pub struct RFifoLock<T: ?Sized> {
    /// Next ticket (high half) and ticket being served (low half). The holder of the ticket
    /// being served owns the lock ([RFifoLock-1]).
    ticket: AtomicU64,
    /// `thread_id()` of the owner while it holds the lock; 0 otherwise. Written only by the
    /// owner, so a thread reads its own id here exactly when it owns the lock.
    owner: AtomicU64,
    /// How many guards the owner holds; touched only by the owner.
    nesting: AtomicU32,
    waiters: Mutex<Waiters>,
    wake: Condvar,
    contention: Option<Contention>,
    data: T,
}

// `&RFifoLock<T>` hands out `&T` only through a guard, and guards exist on one thread at a
// time ([RFifoLock-1]): the owner's. Each hand-off is a release on the ticket word that the
// next owner acquires, so the threads that use `&T` do so one after the other, ordered by
// happens-before, which is what `T: Send` allows (as for `Mutex<T>`). Everything else in the
// lock is `Sync` on its own.
// SAFETY: [RFifoLock-1]: threads use `&T` one at a time, in happens-before order; `T: Send`.
unsafe impl<T: ?Sized + Send> Sync for RFifoLock<T> {}

impl<T> RFifoLock<T> {
    /// An unlocked lock owning `value`, without a contention callback.
    ///
    /// ```
    /// let lock = aio_core::RFifoLock::new(5);
    /// assert_eq!(*lock.lock(), 5);
    /// ```
    pub fn new(value: T) -> Self {
        Self::build(value, None)
    }

    /// An unlocked lock owning `value`, whose waiters call `contention` (QEMU
    /// `rfifolock_init(r, cb, opaque)`).
    ///
    /// A thread that has to wait calls `contention` on its own stack as soon as it finds the
    /// lock taken, and again after each hand-off to another thread while it is still waiting
    /// (the new owner may need the same nudge as the old one). A spurious wake-up does not call
    /// it. Uncontended, nested and [`try_lock`](Self::try_lock) acquisitions never call it.
    /// No internal lock is held during the call.
    ///
    /// The callback must not [`lock`](Self::lock) this lock: the waiting thread is not the
    /// owner, so it would queue behind its own ticket and call the callback again, without end.
    /// If it panics, the waiting thread leaves the queue (its ticket is skipped) and the panic
    /// propagates out of `lock`; the lock stays usable.
    ///
    /// ```
    /// use aio_core::RFifoLock;
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU32, Ordering};
    ///
    /// let kicks = Arc::new(AtomicU32::new(0));
    /// let k = kicks.clone();
    /// let lock = Arc::new(RFifoLock::with_contention((), move || {
    ///     k.fetch_add(1, Ordering::SeqCst); // QEMU: aio_notify(ctx)
    /// }));
    ///
    /// drop(lock.lock()); // uncontended: no callback
    /// assert_eq!(kicks.load(Ordering::SeqCst), 0);
    ///
    /// let held = lock.lock();
    /// let other = lock.clone();
    /// let t = std::thread::spawn(move || drop(other.lock()));
    /// while kicks.load(Ordering::SeqCst) == 0 {
    ///     std::thread::yield_now(); // the other thread is about to wait
    /// }
    /// drop(held);
    /// t.join().unwrap();
    /// assert_eq!(kicks.load(Ordering::SeqCst), 1);
    /// ```
    pub fn with_contention(value: T, contention: impl Fn() + Send + Sync + 'static) -> Self {
        Self::build(value, Some(Box::new(contention)))
    }

    fn build(value: T, contention: Option<Contention>) -> Self {
        Self {
            ticket: AtomicU64::new(0),
            owner: AtomicU64::new(0),
            nesting: AtomicU32::new(0),
            waiters: Mutex::new(Waiters::default()),
            wake: Condvar::new(),
            contention,
            data: value,
        }
    }

    /// The data, taking the lock apart (no guard can exist: it would borrow the lock).
    ///
    /// ```
    /// let lock = aio_core::RFifoLock::new(String::from("x"));
    /// assert_eq!(lock.into_inner(), "x");
    /// ```
    pub fn into_inner(self) -> T {
        self.data
    }
}

impl<T: ?Sized> RFifoLock<T> {
    /// Locks, waiting in FIFO order behind the threads that asked first; returns at once if
    /// this thread already holds the lock (QEMU `rfifolock_lock`). The lock is released when
    /// the last guard of this thread is dropped.
    ///
    /// # Panics
    ///
    /// If this thread already holds `u32::MAX` nested guards (the lock stays held by those), or
    /// if the contention callback panics (the lock stays usable; see
    /// [`with_contention`](RFifoLock::with_contention)).
    #[inline]
    pub fn lock(&self) -> RFifoLockGuard<'_, T> {
        let me = thread_id();
        if let Some(guard) = self.lock_nested(me) {
            return guard;
        }
        // Acquire: pairs with the release of the previous owner's unlock (or of a skip, which
        // continues that unlock's release sequence), so its writes to the data happen before
        // ours. An uncontended lock stops here.
        let word = self.ticket.fetch_add(ONE_TICKET, Ordering::Acquire);
        let ticket = tail(word);
        if head(word) != ticket {
            self.wait_for(ticket);
        }
        self.take_ownership(me)
    }

    /// Locks if that needs no waiting: when this thread already holds the lock (a nested
    /// guard) or nobody holds it and nobody waits for it. Never takes a ticket when it fails,
    /// so it never jumps the queue, and never calls the contention callback.
    ///
    /// ```
    /// use aio_core::RFifoLock;
    /// let lock = RFifoLock::new(0);
    /// let a = lock.try_lock().expect("free");
    /// let b = lock.try_lock().expect("nested on the same thread");
    /// std::thread::scope(|s| {
    ///     s.spawn(|| assert!(lock.try_lock().is_none(), "held by the other thread"));
    /// });
    /// drop((a, b));
    /// ```
    ///
    /// # Panics
    ///
    /// If this thread already holds `u32::MAX` nested guards.
    #[inline]
    pub fn try_lock(&self) -> Option<RFifoLockGuard<'_, T>> {
        let me = thread_id();
        if let Some(guard) = self.lock_nested(me) {
            return Some(guard);
        }
        // Relaxed: only a guess; the compare-and-swap below decides.
        let word = self.ticket.load(Ordering::Relaxed);
        if head(word) != tail(word) {
            return None;
        }
        // Acquire on success: as in `lock`.
        self.ticket
            .compare_exchange(
                word,
                word.wrapping_add(ONE_TICKET),
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .ok()?;
        Some(self.take_ownership(me))
    }

    /// Whether some thread holds the lock or waits for it. A snapshot: another thread may
    /// change it at once.
    ///
    /// ```
    /// let lock = aio_core::RFifoLock::new(());
    /// let guard = lock.lock();
    /// assert!(lock.is_locked());
    /// drop(guard);
    /// assert!(!lock.is_locked());
    /// ```
    #[inline]
    pub fn is_locked(&self) -> bool {
        // Relaxed: a snapshot that orders nothing.
        let word = self.ticket.load(Ordering::Relaxed);
        head(word) != tail(word)
    }

    /// Whether this thread holds the lock (so [`lock`](Self::lock) would nest and not wait).
    /// Exact, unlike [`is_locked`](Self::is_locked): only this thread can change the answer.
    #[inline]
    pub fn is_owned_by_current_thread(&self) -> bool {
        // Relaxed: see `lock_nested`.
        self.owner.load(Ordering::Relaxed) == thread_id()
    }

    /// The data, through `&mut self`: no guard can exist, so no locking is needed.
    ///
    /// ```
    /// let mut lock = aio_core::RFifoLock::new(1);
    /// *lock.get_mut() += 1;
    /// assert_eq!(*lock.lock(), 2);
    /// ```
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.data
    }

    /// A nested guard when `me` already owns the lock.
    #[inline]
    fn lock_nested(&self, me: u64) -> Option<RFifoLockGuard<'_, T>> {
        // Relaxed: only the owner stores its own id here (in `take_ownership`) and it clears
        // it before releasing, so a thread reads its own id exactly when it owns the lock:
        // coherence makes its own latest store the one it sees. Any other value means "not
        // me", whatever its staleness.
        if self.owner.load(Ordering::Relaxed) != me {
            return None;
        }
        // Relaxed: owner-only data ([RFifoLock-1]).
        let depth = self.nesting.load(Ordering::Relaxed);
        let depth = depth
            .checked_add(1)
            .expect("RFifoLock: locked recursively more than u32::MAX times on one thread");
        self.nesting.store(depth, Ordering::Relaxed);
        Some(self.guard())
    }

    /// Records the calling thread, which has just been served its ticket, as the owner.
    #[inline]
    fn take_ownership(&self, me: u64) -> RFifoLockGuard<'_, T> {
        // Relaxed: owner-only data, published to the next owner by the release of our unlock.
        self.owner.store(me, Ordering::Relaxed);
        self.nesting.store(1, Ordering::Relaxed);
        self.guard()
    }

    #[inline]
    fn guard(&self) -> RFifoLockGuard<'_, T> {
        RFifoLockGuard {
            lock: self,
            _not_send: PhantomData,
        }
    }

    /// The guard's drop: one nesting level; the outermost releases.
    #[inline]
    fn unlock(&self) {
        // Relaxed: owner-only data; the guard proves we are the owner.
        let depth = self.nesting.load(Ordering::Relaxed);
        debug_assert!(depth > 0, "RFifoLock: a guard without a nesting level");
        self.nesting.store(depth - 1, Ordering::Relaxed);
        if depth > 1 {
            return;
        }
        // Relaxed: cleared before the release below, so the next owner's store comes later in
        // this variable's order than ours (it acquires the ticket word after our release).
        self.owner.store(0, Ordering::Relaxed);
        self.advance_head();
    }

    /// Serves the next ticket (QEMU `head++`), waking the waiters if there are any. Called by
    /// the owner, or on its behalf ([RFifoLock-2]).
    #[inline]
    fn advance_head(&self) {
        let word = self.bump_head();
        if head(word) != tail(word) {
            self.hand_off();
        }
    }

    /// `head += 1`, returning the new word.
    #[inline]
    fn bump_head(&self) -> u64 {
        // Relaxed load: the compare-and-swap checks it; only arrivals (tail) race with us.
        let mut word = self.ticket.load(Ordering::Relaxed);
        loop {
            let new = next_head(word);
            // Release: publishes the owner's writes to the data to the next owner, which
            // acquires this word (`lock`, `try_lock`, `wait_for`).
            match self
                .ticket
                .compare_exchange_weak(word, new, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return new,
                Err(seen) => word = seen,
            }
        }
    }

    /// Tickets are outstanding behind the one just released: skip the abandoned ones at the
    /// head, then wake everyone to re-check. Under the waiters' mutex, so that a waiter that
    /// checked the head and is about to sleep is not missed: it checked under the mutex.
    #[cold]
    #[inline(never)]
    fn hand_off(&self) {
        let mut waiters = lock(&self.waiters);
        loop {
            // Relaxed: we act for the owner of the current head, which only we may move.
            let word = self.ticket.load(Ordering::Relaxed);
            if head(word) == tail(word) {
                break;
            }
            let Some(i) = waiters.abandoned.iter().position(|&t| t == head(word)) else {
                break;
            };
            // [RFifoLock-2]: its thread left; pass the lock on as it would have.
            waiters.abandoned.swap_remove(i);
            self.bump_head();
        }
        waiters.handoffs = waiters.handoffs.wrapping_add(1);
        // [RFifoLock-3]: a waiter not counted in `sleepers` checks the head and the count
        // under the mutex before it sleeps, so it sees this hand-off without a wake-up.
        let sleepers = waiters.sleepers;
        drop(waiters);
        if sleepers > 0 {
            self.wake.notify_all();
        }
    }

    /// Whether `ticket` is being served. Acquire, as the fast path in `lock`.
    fn served(&self, ticket: u32) -> bool {
        head(self.ticket.load(Ordering::Acquire)) == ticket
    }

    /// The slow path of `lock`: sleep until `ticket` is served, calling the contention
    /// callback when the wait starts and after each hand-off that did not serve us.
    #[cold]
    #[inline(never)]
    fn wait_for(&self, ticket: u32) {
        let leave = LeaveOnUnwind { lock: self, ticket };
        let mut waiters = lock(&self.waiters);
        // The hand-off count when the callback last ran; `None`: not yet in this wait.
        let mut kicked_at = None;
        loop {
            if self.served(ticket) {
                break;
            }
            if kicked_at != Some(waiters.handoffs) {
                // A new wait, or a hand-off that was not for us: kick, then spin a little
                // before sleeping, outside the mutex.
                kicked_at = Some(waiters.handoffs);
                drop(waiters);
                if let Some(contention) = &self.contention {
                    contention();
                }
                self.spin(ticket);
                waiters = lock(&self.waiters);
                // Re-check before sleeping: a hand-off may have happened meanwhile (then the
                // count moved, and the callback runs again if we are still waiting).
                continue;
            }
            // [RFifoLock-3]: counted in the same critical section as the check above.
            waiters.sleepers += 1;
            waiters = wait(&self.wake, waiters);
            waiters.sleepers -= 1;
        }
        drop(waiters);
        std::mem::forget(leave);
    }

    /// Polls for `ticket` for a short while ([`SPINS`] rounds): a hand-off to a thread that
    /// has not gone to sleep yet costs no system call on either side.
    fn spin(&self, ticket: u32) {
        for _ in 0..SPINS {
            if self.served(ticket) {
                return;
            }
            std::hint::spin_loop();
        }
    }
}

/// Leaves the queue if the contention callback panics, so that the ticket does not block
/// everyone behind it for good.
struct LeaveOnUnwind<'a, T: ?Sized> {
    lock: &'a RFifoLock<T>,
    ticket: u32,
}

impl<T: ?Sized> Drop for LeaveOnUnwind<'_, T> {
    fn drop(&mut self) {
        let lock = self.lock;
        let mut waiters = crate::sync::lock(&lock.waiters);
        // [RFifoLock-2]: decided under the waiters' mutex, which the thread that moves the
        // head onto our ticket takes afterwards to look for abandoned tickets.
        if lock.served(self.ticket) {
            drop(waiters);
            lock.advance_head();
        } else {
            waiters.abandoned.push(self.ticket);
        }
    }
}

impl<T: Default> Default for RFifoLock<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T> From<T> for RFifoLock<T> {
    fn from(value: T) -> Self {
        Self::new(value)
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for RFifoLock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("RFifoLock");
        match self.try_lock() {
            Some(guard) => d.field("data", &&*guard),
            None => d.field("data", &format_args!("<locked>")),
        };
        d.field("contention", &self.contention.is_some())
            .finish_non_exhaustive()
    }
}

/// A hold on an [`RFifoLock`]: derefs to the data, releases one nesting level when dropped
/// (QEMU `rfifolock_unlock`). Neither `Send` nor `Sync`: it stays on the thread that locked.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct RFifoLockGuard<'a, T: ?Sized> {
    lock: &'a RFifoLock<T>,
    /// `!Send` (and `!Sync`): the owner's id is the locking thread's.
    _not_send: PhantomData<*const ()>,
}

impl<T: ?Sized> Deref for RFifoLockGuard<'_, T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.lock.data
    }
}

impl<T: ?Sized> Drop for RFifoLockGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.lock.unlock();
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for RFifoLockGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

#[cfg(all(test, not(aio_loom)))]
mod tests {
    use super::*;

    #[test]
    fn head_wraps_without_touching_the_tail() {
        let word = (5u64 << 32) | u64::from(u32::MAX);
        assert_eq!(head(next_head(word)), 0);
        assert_eq!(tail(next_head(word)), 5);
    }

    #[test]
    fn tickets_wrap_around() {
        // Start both halves just below the wrap: lock and unlock still pair up.
        let lock = RFifoLock::new(());
        let near = (u64::from(u32::MAX) << 32) | u64::from(u32::MAX);
        lock.ticket.store(near, Ordering::Relaxed);
        for _ in 0..3 {
            drop(lock.lock());
            assert!(!lock.is_locked());
            drop(lock.try_lock().expect("free"));
        }
        assert_eq!(lock.ticket.load(Ordering::Relaxed), (5u64 << 32) | 5);
    }

    #[test]
    fn nesting_overflow_panics_and_keeps_the_lock_held() {
        let lock = RFifoLock::new(());
        let outer = lock.lock();
        lock.nesting.store(u32::MAX, Ordering::Relaxed);
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lock.lock()))
            .expect_err("nesting past u32::MAX must panic");
        let msg = err
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| err.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        assert!(msg.contains("more than u32::MAX times"), "{msg}");
        assert!(lock.is_owned_by_current_thread());
        assert_eq!(lock.nesting.load(Ordering::Relaxed), u32::MAX);
        // Unwind the fake levels by hand, down to the real one.
        lock.nesting.store(1, Ordering::Relaxed);
        drop(outer);
        assert!(!lock.is_locked());
    }
}
