//! QEMU's coroutine locks (`util/qemu-coroutine-lock.c`) as async primitives for tasks on any
//! context: [`CoMutex`] (a fair mutex that hands the lock straight to its first waiter),
//! [`CoQueue`] (a queue of waiting tasks, QEMU's condition variable for coroutines) and
//! [`CoRwLock`] (a fair reader-writer lock). This file owns their state words, waiter queues,
//! futures and guards.
//!
//! Every type is `Send + Sync` (when the protected data allows it), so tasks on different
//! contexts, on different threads, can share one lock. A waiting task is woken through its
//! [`Waker`], which schedules it on the context where it lives (QEMU `aio_co_wake`): the task
//! that releases a lock never runs the next owner on its own stack.
//!
//! QEMU mapping: `qemu_co_mutex_lock`/`unlock` → [`CoMutex::lock`] / dropping the
//! [`CoMutexGuard`]; `qemu_co_queue_wait` → [`CoQueue::wait`]; `qemu_co_queue_next` →
//! [`CoQueue::next`]; `qemu_co_queue_restart_all` → [`CoQueue::restart_all`];
//! `qemu_co_queue_empty` → [`CoQueue::is_empty`]; `qemu_co_rwlock_rdlock`/`wrlock`/`unlock`/
//! `upgrade`/`downgrade` → [`CoRwLock::read`], [`CoRwLock::write`], dropping a guard,
//! [`CoRwLockReadGuard::upgrade`], [`CoRwLockWriteGuard::downgrade`].
//!
//! QEMU's `CoMutex` pushes waiters onto a lock-free list, which forces its "responsibility
//! hand-off" dance between an unlock that finds no waiter yet and a lock that has not finished
//! queueing. Here the waiter queue is behind a short `sync::Mutex`, taken only on the
//! contended path; the uncontended lock and unlock are one compare-and-swap each. The outcome
//! is QEMU's: an unlock with waiters hands ownership directly to the first one, which does not
//! compete for it again.

use crate::sync::{AtomicU32, Mutex, Ordering, UnsafeCell, lock};
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// [`CoMutex`] state bit: someone owns the lock (a guard exists, or it was handed to a waiter
/// that has not yet seen it).
const LOCKED: u32 = 1;
/// [`CoMutex`] state bit: the waiter queue is not empty. Changed only with the queue's lock
/// held, so it is set exactly when the queue has entries; never set without `LOCKED`.
const WAITERS: u32 = 2;

/// One task waiting in a queue. Ids grow with each push, so a queue is sorted by id and an
/// entry is found by binary search.
struct Entry {
    id: u64,
    /// `None` until the waiting future is first polled (a waiter can be queued at creation).
    waker: Option<Waker>,
}

/// A FIFO of waiting tasks.
#[derive(Default)]
struct WaitList {
    entries: VecDeque<Entry>,
    next_id: u64,
}

impl WaitList {
    fn push(&mut self, waker: Option<Waker>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.entries.push_back(Entry { id, waker });
        id
    }

    fn find(&self, id: u64) -> Option<usize> {
        self.entries.binary_search_by_key(&id, |e| e.id).ok()
    }

    /// Stores `waker` in the entry `id`: `Err(())` if the entry is no longer queued, else the
    /// waker it replaced, which the caller drops *after* releasing the lock (dropping a waker
    /// can drop a task, whose futures may take this lock again).
    fn update_waker(&mut self, id: u64, waker: &Waker) -> Result<Option<Waker>, ()> {
        let Some(i) = self.find(id) else {
            return Err(());
        };
        let entry = &mut self.entries[i];
        Ok(match &entry.waker {
            Some(w) if w.will_wake(waker) => None,
            _ => entry.waker.replace(waker.clone()),
        })
    }

    /// Takes the entry `id` out, for the caller to drop after releasing the lock (see
    /// `update_waker`); `None` if it was no longer queued.
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let i = self.find(id)?;
        self.entries.remove(i)
    }
}

/// Wakes a waiter's task, if it has a waker yet (one that has not been polled will see its
/// state on its first poll).
fn wake(waker: Option<Waker>) {
    if let Some(w) = waker {
        w.wake();
    }
}

// ---------------------------------------------------------------------------------------------
// CoMutex
// ---------------------------------------------------------------------------------------------

/// The contended side of a [`CoMutex`]: waiters in arrival order, and the one waiter that was
/// handed the lock but has not yet been polled to see it.
#[derive(Default)]
struct MutexWaiters {
    list: WaitList,
    /// At most one at a time: it owns the lock, so nobody else can be handed it until it
    /// unlocks (or, dropped unpolled, passes it on).
    granted: Option<u64>,
}

/// A mutual-exclusion lock for tasks, which owns the data it protects (QEMU `CoMutex`; like
/// `tokio::sync::Mutex`).
///
/// [`lock`](Self::lock) waits without blocking the thread: the context keeps running other
/// tasks and callbacks. The lock is fair: waiters get it in the order they asked, and an
/// unlock with waiters hands it directly to the first one (QEMU's hand-off), which is woken on
/// its own context. Uncontended, locking and unlocking are one atomic compare-and-swap each.
///
/// Tasks on any context and any thread may share it (it is `Send + Sync` when `T: Send`), and
/// a guard may be held across `.await`.
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use aio_core::task::CoMutex;
/// use std::sync::Arc;
///
/// let total = Arc::new(CoMutex::new(0));
/// let tasks: Vec<_> = (0..4)
///     .map(|i| {
///         let total = total.clone();
///         ctx.spawn(async move {
///             let mut t = total.lock().await;
///             aio_core::task::yield_now().await; // still held across the await
///             *t += i;
///         })
///     })
///     .collect();
/// for t in tasks {
///     ctx.block_on(t).unwrap();
/// }
/// assert_eq!(*total.try_lock().unwrap(), 6);
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct CoMutex<T: ?Sized> {
    /// `LOCKED | WAITERS`.
    state: AtomicU32,
    waiters: Mutex<MutexWaiters>,
    data: UnsafeCell<T>,
}

// The data is reached only through a guard, and a guard exists only while the lock is held
// ([CoMutex-1] in ARCHITECTURE.md), so one thread at a time touches it: `T: Send` is all that
// sharing the mutex needs, as for `std::sync::Mutex`.
// SAFETY: [CoMutex-1]: one thread at a time touches the data, so `T: Send` suffices.
unsafe impl<T: ?Sized + Send> Sync for CoMutex<T> {}

impl<T> CoMutex<T> {
    /// A new, unlocked mutex holding `value`.
    ///
    /// ```
    /// let m = aio_core::task::CoMutex::new(vec![1, 2]);
    /// assert_eq!(m.into_inner(), [1, 2]);
    /// ```
    pub fn new(value: T) -> CoMutex<T> {
        CoMutex {
            state: AtomicU32::new(0),
            waiters: Mutex::new(MutexWaiters::default()),
            data: UnsafeCell::new(value),
        }
    }

    /// The protected value, taking the mutex apart.
    ///
    /// ```
    /// let m = aio_core::task::CoMutex::new(3);
    /// assert_eq!(m.into_inner(), 3);
    /// ```
    pub fn into_inner(self) -> T {
        self.data.into_inner()
    }
}

impl<T: ?Sized> CoMutex<T> {
    /// Waits for the lock and returns a guard that releases it when dropped (QEMU
    /// `qemu_co_mutex_lock`). Waiters are served in the order of their first poll.
    ///
    /// Cancel-safe: dropping the future while it waits takes it out of the queue, and dropping
    /// it after the lock was handed to it (before it was polled again) hands the lock on to
    /// the next waiter, so no lock is lost.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// let m = aio_core::task::CoMutex::new(String::new());
    /// ctx.block_on(async {
    ///     m.lock().await.push_str("hi");
    /// });
    /// assert_eq!(m.into_inner(), "hi");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn lock(&self) -> Lock<'_, T> {
        Lock {
            mutex: self,
            state: LockState::Start,
        }
    }

    /// Takes the lock if nobody holds it or waits for it; never waits. A waiting task counts
    /// as a holder-to-be, so this does not jump the queue.
    ///
    /// ```
    /// let m = aio_core::task::CoMutex::new(1);
    /// let g = m.try_lock().unwrap();
    /// assert!(m.try_lock().is_none());
    /// drop(g);
    /// assert_eq!(*m.try_lock().unwrap(), 1);
    /// ```
    pub fn try_lock(&self) -> Option<CoMutexGuard<'_, T>> {
        // Acquire pairs with the Release of the unlock that made the state 0: this holder
        // sees the previous holder's writes to the data.
        self.state
            .compare_exchange(0, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| CoMutexGuard::new(self))
    }

    /// Whether the lock is held (or handed to a waiter). A snapshot: by the time it returns,
    /// another thread may have changed it.
    ///
    /// ```
    /// let m = aio_core::task::CoMutex::new(());
    /// let g = m.try_lock().unwrap();
    /// assert!(m.is_locked());
    /// drop(g);
    /// assert!(!m.is_locked());
    /// ```
    pub fn is_locked(&self) -> bool {
        // Relaxed: a snapshot that orders nothing.
        self.state.load(Ordering::Relaxed) & LOCKED != 0
    }

    /// The protected value, through `&mut`: no other reference exists, so no lock is needed.
    ///
    /// ```
    /// let mut m = aio_core::task::CoMutex::new(1);
    /// *m.get_mut() += 1;
    /// assert_eq!(m.into_inner(), 2);
    /// ```
    pub fn get_mut(&mut self) -> &mut T {
        // SAFETY: `&mut self` proves no guard and no other reference exists ([CoMutex-1]).
        self.data.with_mut(|p| unsafe { &mut *p })
    }

    /// The contended path of a first poll: takes the lock if it was freed meanwhile, or
    /// queues the caller. `Ok(())` means the caller now owns the lock.
    fn lock_slow(&self, waker: &Waker) -> Result<(), u64> {
        let mut waiters = lock(&self.waiters);
        // Relaxed: the loop's compare-and-swaps carry the ordering.
        let mut state = self.state.load(Ordering::Relaxed);
        loop {
            let (new, ordering) = if state & LOCKED == 0 {
                // Unlocked, so no waiters either: take it. Acquire as in `try_lock`.
                (LOCKED, Ordering::Acquire)
            } else if state & WAITERS == 0 {
                // Announce a waiter, so that the holder's unlock takes the slow path and sees
                // the entry pushed below (we keep the queue's lock until then). Relaxed: the
                // queue's lock orders the entry.
                (state | WAITERS, Ordering::Relaxed)
            } else {
                break;
            };
            match self
                .state
                .compare_exchange(state, new, ordering, Ordering::Relaxed)
            {
                Ok(_) if new == LOCKED => return Ok(()),
                Ok(_) => break,
                Err(now) => state = now,
            }
        }
        Err(waiters.list.push(Some(waker.clone())))
    }

    /// Releases the lock (QEMU `qemu_co_mutex_unlock`).
    fn unlock(&self) {
        // Release pairs with the Acquire of the next lock: it sees this holder's writes.
        // Fails when the queue has waiters.
        if self
            .state
            .compare_exchange(LOCKED, 0, Ordering::Release, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
        let waiters = lock(&self.waiters);
        self.unlock_contended(waiters);
    }

    /// Releases the lock with the queue's lock held: hands it to the first waiter, or frees it
    /// if the queue emptied meanwhile (waiters cancelled).
    fn unlock_contended(&self, mut waiters: crate::sync::MutexGuard<'_, MutexWaiters>) {
        match waiters.list.entries.pop_front() {
            Some(first) => {
                // Hand-off: `LOCKED` stays set, so nobody can take the lock in between. The
                // queue's lock orders this holder's writes before the new owner's reads (it
                // takes the same lock to see `granted`).
                waiters.granted = Some(first.id);
                if waiters.list.entries.is_empty() {
                    // Relaxed: the state's other bit is ours (`LOCKED`, held), and waiters
                    // change `WAITERS` only under the queue's lock, which we hold.
                    self.state.fetch_and(!WAITERS, Ordering::Relaxed);
                }
                drop(waiters);
                wake(first.waker);
            }
            None => {
                // `WAITERS` is clear (it follows the queue), so the state is `LOCKED` and
                // nobody else may change it: lockers wait for the queue's lock. Release as in
                // `unlock`.
                self.state.store(0, Ordering::Release);
            }
        }
    }
}

impl<T: Default> Default for CoMutex<T> {
    fn default() -> Self {
        CoMutex::new(T::default())
    }
}

impl<T> From<T> for CoMutex<T> {
    fn from(value: T) -> Self {
        CoMutex::new(value)
    }
}

impl<T: ?Sized> fmt::Debug for CoMutex<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoMutex")
            .field("locked", &self.is_locked())
            .finish_non_exhaustive()
    }
}

enum LockState {
    /// Not polled yet.
    Start,
    /// Queued under this id.
    Waiting(u64),
    /// Returned its guard.
    Done,
}

/// The future of [`CoMutex::lock`].
#[must_use = "futures do nothing unless awaited"]
pub struct Lock<'a, T: ?Sized> {
    mutex: &'a CoMutex<T>,
    state: LockState,
}

impl<'a, T: ?Sized> Future for Lock<'a, T> {
    type Output = CoMutexGuard<'a, T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mutex = self.mutex;
        match self.state {
            LockState::Start => {
                // The fast path, as `try_lock`.
                if let Some(guard) = mutex.try_lock() {
                    self.state = LockState::Done;
                    return Poll::Ready(guard);
                }
                match mutex.lock_slow(cx.waker()) {
                    Ok(()) => {
                        self.state = LockState::Done;
                        Poll::Ready(CoMutexGuard::new(mutex))
                    }
                    Err(id) => {
                        self.state = LockState::Waiting(id);
                        Poll::Pending
                    }
                }
            }
            LockState::Waiting(id) => {
                let mut waiters = lock(&mutex.waiters);
                if waiters.granted == Some(id) {
                    waiters.granted = None;
                    drop(waiters);
                    self.state = LockState::Done;
                    return Poll::Ready(CoMutexGuard::new(mutex));
                }
                let old = waiters.list.update_waker(id, cx.waker());
                drop(waiters);
                drop(old);
                Poll::Pending
            }
            LockState::Done => panic!("CoMutex lock future polled after it returned its guard"),
        }
    }
}

impl<T: ?Sized> Drop for Lock<'_, T> {
    fn drop(&mut self) {
        let LockState::Waiting(id) = self.state else {
            return;
        };
        let mut waiters = lock(&self.mutex.waiters);
        if waiters.granted == Some(id) {
            // Handed the lock, never saw it: pass it on.
            waiters.granted = None;
            self.mutex.unlock_contended(waiters);
        } else {
            let removed = waiters.list.remove(id);
            if removed.is_some() && waiters.list.entries.is_empty() {
                // Relaxed: as in `unlock_contended`, `WAITERS` changes only under the queue's
                // lock.
                self.mutex.state.fetch_and(!WAITERS, Ordering::Relaxed);
            }
            // The entry's waker is dropped after the lock (see `WaitList::update_waker`).
            drop(waiters);
            drop(removed);
        }
    }
}

impl<T: ?Sized> fmt::Debug for Lock<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("waiting", &matches!(self.state, LockState::Waiting(_)))
            .finish_non_exhaustive()
    }
}

/// Proof that the [`CoMutex`] is held, giving access to its data; dropping it unlocks (and
/// hands the lock to the first waiter, if any). `Send` when `T: Send`, so a task that holds it
/// across `.await` can still be spawned with [`AioContext::spawn`](crate::AioContext::spawn).
///
/// ```
/// let m = aio_core::task::CoMutex::new(vec![1]);
/// let mut g = m.try_lock().unwrap();
/// g.push(2);
/// assert_eq!(*g, [1, 2]);
/// ```
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct CoMutexGuard<'a, T: ?Sized> {
    mutex: &'a CoMutex<T>,
    /// `Sync` only when `T: Sync` (a shared guard gives `&T`), `Send` when `T: Send`.
    _data: PhantomData<&'a mut T>,
}

impl<'a, T: ?Sized> CoMutexGuard<'a, T> {
    /// Made by whoever just took the lock.
    fn new(mutex: &'a CoMutex<T>) -> Self {
        CoMutexGuard {
            mutex,
            _data: PhantomData,
        }
    }

    /// The mutex this guard holds (for [`CoQueue::wait`]-style helpers that unlock and lock
    /// again).
    ///
    /// ```
    /// let m = aio_core::task::CoMutex::new(0);
    /// let g = m.try_lock().unwrap();
    /// assert!(std::ptr::eq(aio_core::task::CoMutexGuard::mutex(&g), &m));
    /// ```
    pub fn mutex(this: &Self) -> &'a CoMutex<T> {
        this.mutex
    }
}

impl<T: ?Sized> Deref for CoMutexGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: this guard holds the lock, so no other guard exists ([CoMutex-1]).
        self.mutex.data.with(|p| unsafe { &*p })
    }
}

impl<T: ?Sized> DerefMut for CoMutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` is the only reference via the guard ([CoMutex-1]).
        self.mutex.data.with_mut(|p| unsafe { &mut *p })
    }
}

impl<T: ?Sized> Drop for CoMutexGuard<'_, T> {
    fn drop(&mut self) {
        self.mutex.unlock();
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for CoMutexGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

// ---------------------------------------------------------------------------------------------
// CoQueue
// ---------------------------------------------------------------------------------------------

/// A queue of waiting tasks (QEMU `CoQueue`): a condition variable for tasks, usually paired
/// with a [`CoMutex`].
///
/// [`wait`](Self::wait) releases a mutex guard and queues the task in one step, then takes the
/// mutex again once woken; [`next`](Self::next) wakes the first waiter and
/// [`restart_all`](Self::restart_all) every one. Waiters are woken in FIFO order, each on its
/// own context. As with any condition variable, re-check the condition in a loop after
/// waking.
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use aio_core::task::{CoMutex, CoQueue};
/// use std::sync::Arc;
///
/// let state = Arc::new((CoMutex::new(false), CoQueue::new()));
/// let s = state.clone();
/// let waiter = ctx.spawn(async move {
///     let (ready, queue) = &*s;
///     let mut g = ready.lock().await;
///     while !*g {
///         g = queue.wait(g).await;
///     }
///     "saw it"
/// });
/// let s = state.clone();
/// ctx.spawn(async move {
///     let (ready, queue) = &*s;
///     *ready.lock().await = true;
///     queue.restart_all();
/// });
/// assert_eq!(ctx.block_on(waiter).unwrap(), "saw it");
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Default)]
pub struct CoQueue {
    waiters: Mutex<WaitList>,
}

impl CoQueue {
    /// An empty queue.
    ///
    /// ```
    /// assert!(aio_core::task::CoQueue::new().is_empty());
    /// ```
    pub fn new() -> CoQueue {
        CoQueue::default()
    }

    /// Unlocks `guard`'s mutex and waits until [`next`](Self::next) or
    /// [`restart_all`](Self::restart_all) picks this task, then locks the mutex again and
    /// returns the new guard (QEMU `qemu_co_queue_wait`). On its first poll the future queues
    /// the task and only then releases the mutex, so a wake-up issued by whoever takes the
    /// mutex next is never missed. (Until that poll the guard is held inside the future.)
    ///
    /// Dropping the future while it waits leaves the queue; dropping it after it was woken
    /// and before it has the mutex back passes the wake-up on to the next waiter (at worst a
    /// spurious wake-up after `restart_all`). Like QEMU, the waiter
    /// competes for the mutex again in FIFO order after waking.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use aio_core::task::{CoMutex, CoQueue};
    /// let (m, q) = (CoMutex::new(0), CoQueue::new());
    /// ctx.block_on(async {
    ///     let g = m.lock().await;
    ///     let wait = q.wait(g);
    ///     let wake = async {
    ///         *m.lock().await = 5; // the waiter released the mutex
    ///         assert!(q.next());
    ///     };
    ///     let (g, ()) = join(wait, wake).await;
    ///     assert_eq!(*g, 5);
    /// });
    /// # async fn join<A: std::future::Future, B: std::future::Future>(a: A, b: B) -> (A::Output, B::Output) {
    /// #     let (mut a, mut b) = (Box::pin(a), Box::pin(b));
    /// #     let (mut ra, mut rb) = (None, None);
    /// #     std::future::poll_fn(|cx| {
    /// #         if ra.is_none() { if let std::task::Poll::Ready(v) = a.as_mut().poll(cx) { ra = Some(v); } }
    /// #         if rb.is_none() { if let std::task::Poll::Ready(v) = b.as_mut().poll(cx) { rb = Some(v); } }
    /// #         if ra.is_some() && rb.is_some() { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    /// #     }).await;
    /// #     (ra.unwrap(), rb.unwrap())
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub async fn wait<'a, T: ?Sized>(&self, guard: CoMutexGuard<'a, T>) -> CoMutexGuard<'a, T> {
        let mutex = guard.mutex;
        let waiting = self.wait_unlocked();
        drop(guard);
        waiting.await;
        // Woken: if this future is dropped before it has the mutex back, the wake-up passes
        // to the next waiter (as a `QueueWait` dropped before it saw its wake-up does), so a
        // `next()` is not lost to a cancelled waiter. At worst a spurious wake-up.
        let mut pass_on = PassOn(Some(self));
        let guard = mutex.lock().await;
        pass_on.0 = None;
        guard
    }

    /// Queues the caller now and returns a future that completes once
    /// [`next`](Self::next) or [`restart_all`](Self::restart_all) picks it (QEMU
    /// `qemu_co_queue_wait` with no lock). Being queued from the call on, not from the first
    /// poll, it sees a wake-up issued between the call and the `.await`. Dropping it leaves
    /// the queue (or, if it was already woken, passes the wake-up on).
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// let q = aio_core::task::CoQueue::new();
    /// let w = q.wait_unlocked();
    /// assert!(!q.is_empty());
    /// assert!(q.next()); // before the first poll: still seen
    /// ctx.block_on(w);
    /// assert!(q.is_empty());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn wait_unlocked(&self) -> QueueWait<'_> {
        let id = lock(&self.waiters).push(None);
        QueueWait {
            queue: self,
            id,
            done: false,
        }
    }

    /// Wakes the first waiter; false if there was none (QEMU `qemu_co_queue_next`). The
    /// woken task runs later, on its own context.
    ///
    /// ```
    /// let q = aio_core::task::CoQueue::new();
    /// assert!(!q.next());
    /// let _w = q.wait_unlocked();
    /// assert!(q.next());
    /// assert!(q.is_empty());
    /// ```
    pub fn next(&self) -> bool {
        let first = lock(&self.waiters).entries.pop_front();
        match first {
            Some(entry) => {
                wake(entry.waker);
                true
            }
            None => false,
        }
    }

    /// The same as [`next`](Self::next).
    ///
    /// ```
    /// let q = aio_core::task::CoQueue::new();
    /// assert!(!q.restart_one());
    /// ```
    pub fn restart_one(&self) -> bool {
        self.next()
    }

    /// Wakes every waiter, in FIFO order; returns how many (QEMU
    /// `qemu_co_queue_restart_all`). Tasks that queue after this call are not woken.
    ///
    /// ```
    /// let q = aio_core::task::CoQueue::new();
    /// let (_a, _b) = (q.wait_unlocked(), q.wait_unlocked());
    /// assert_eq!(q.restart_all(), 2);
    /// assert!(q.is_empty());
    /// ```
    pub fn restart_all(&self) -> usize {
        let all = std::mem::take(&mut lock(&self.waiters).entries);
        let n = all.len();
        for entry in all {
            wake(entry.waker);
        }
        n
    }

    /// Whether no task waits (QEMU `qemu_co_queue_empty`). A snapshot when other threads use
    /// the queue.
    ///
    /// ```
    /// let q = aio_core::task::CoQueue::new();
    /// assert!(q.is_empty());
    /// let w = q.wait_unlocked();
    /// assert!(!q.is_empty());
    /// drop(w);
    /// assert!(q.is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        lock(&self.waiters).entries.is_empty()
    }
}

impl fmt::Debug for CoQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoQueue")
            .field("waiters", &lock(&self.waiters).entries.len())
            .finish()
    }
}

/// The future of [`CoQueue::wait_unlocked`]: queued from its creation; ready once woken.
#[must_use = "futures do nothing unless awaited"]
pub struct QueueWait<'a> {
    queue: &'a CoQueue,
    id: u64,
    /// It returned `Ready`.
    done: bool,
}

impl Future for QueueWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.done {
            return Poll::Ready(());
        }
        // Woken means taken out of the queue by `next` or `restart_all`.
        let updated = lock(&self.queue.waiters).update_waker(self.id, cx.waker());
        if updated.is_ok() {
            // The old waker (if any) is dropped here, after the lock.
            return Poll::Pending;
        }
        self.done = true;
        Poll::Ready(())
    }
}

/// Passes a wake-up on to the next waiter of a queue when dropped (see `CoQueue::wait`).
struct PassOn<'a>(Option<&'a CoQueue>);

impl Drop for PassOn<'_> {
    fn drop(&mut self) {
        if let Some(queue) = self.0.take() {
            queue.next();
        }
    }
}

impl Drop for QueueWait<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let removed = lock(&self.queue.waiters).remove(self.id);
        let still_queued = removed.is_some();
        drop(removed);
        if !still_queued {
            // Woken but never saw it: hand the wake-up to the next waiter, so that a `next()`
            // is not lost (after `restart_all` this is at worst a spurious wake-up).
            self.queue.next();
        }
    }
}

impl fmt::Debug for QueueWait<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueWait")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// CoRwLock
// ---------------------------------------------------------------------------------------------

/// A ticket in the reader-writer lock's queue.
struct Ticket {
    entry: Entry,
    read: bool,
}

/// The reader-writer lock's state, behind a short `sync::Mutex` (QEMU keeps it behind the
/// lock's internal `CoMutex`).
#[derive(Default)]
struct RwState {
    /// -1: a writer holds the lock; n ≥ 0: n readers do.
    owners: i64,
    /// Waiting tasks in arrival order; ids grow.
    tickets: VecDeque<Ticket>,
    next_id: u64,
}

impl RwState {
    fn push(&mut self, read: bool, waker: Option<Waker>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.tickets.push_back(Ticket {
            entry: Entry { id, waker },
            read,
        });
        id
    }

    fn find(&self, id: u64) -> Option<usize> {
        self.tickets.binary_search_by_key(&id, |t| t.entry.id).ok()
    }

    /// Grants the lock to the tickets at the head of the queue that can have it now: a run of
    /// readers while no writer holds it, or one writer when nobody holds it (QEMU
    /// `qemu_co_rwlock_maybe_wake_one`, which makes each woken reader wake the next; here
    /// the whole run is granted at once). Returns the wakers to call once the state's lock
    /// is released.
    fn grant(&mut self) -> Vec<Waker> {
        let mut wake = Vec::new();
        while let Some(first) = self.tickets.front() {
            if first.read && self.owners >= 0 {
                self.owners += 1;
            } else if !first.read && self.owners == 0 {
                self.owners = -1;
            } else {
                break;
            }
            let Some(t) = self.tickets.pop_front() else {
                break;
            };
            wake.extend(t.entry.waker);
            if !t.read {
                break;
            }
        }
        wake
    }

    /// Gives up one hold of the kind `read`, and grants whoever can go next.
    fn release(&mut self, read: bool) -> Vec<Waker> {
        if read {
            debug_assert!(self.owners > 0);
            self.owners -= 1;
        } else {
            debug_assert_eq!(self.owners, -1);
            self.owners = 0;
        }
        self.grant()
    }
}

fn wake_all(wakers: Vec<Waker>) {
    for w in wakers {
        w.wake();
    }
}

/// A reader-writer lock for tasks, which owns the data it protects (QEMU `CoRwlock`; like
/// `tokio::sync::RwLock`).
///
/// Many readers or one writer hold it at a time. It is fair: tasks get it in arrival order,
/// so a waiting writer makes later readers wait (no writer starvation), and a run of readers
/// queued together is let in together. Usable from tasks on any context (`Send + Sync` when
/// `T: Send + Sync`).
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use aio_core::task::CoRwLock;
/// let lock = CoRwLock::new(1);
/// ctx.block_on(async {
///     {
///         let (a, b) = (lock.read().await, lock.read().await); // readers share it
///         assert_eq!(*a + *b, 2);
///     }
///     *lock.write().await += 1;
/// });
/// assert_eq!(lock.into_inner(), 2);
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct CoRwLock<T: ?Sized> {
    state: Mutex<RwState>,
    data: UnsafeCell<T>,
}

// The data is reached only through guards, which exist only as the state's `owners` count
// allows ([CoRwLock-1] in ARCHITECTURE.md): readers share `&T` across threads (`T: Sync`), a
// writer's `&mut T` may be on any thread (`T: Send`), as for `std::sync::RwLock`.
// SAFETY: [CoRwLock-1]: guards exist only as `owners` allows, so `T: Send + Sync` suffices.
unsafe impl<T: ?Sized + Send + Sync> Sync for CoRwLock<T> {}

impl<T> CoRwLock<T> {
    /// A new, unlocked reader-writer lock holding `value`.
    ///
    /// ```
    /// let l = aio_core::task::CoRwLock::new(5);
    /// assert_eq!(*l.try_read().unwrap(), 5);
    /// ```
    pub fn new(value: T) -> CoRwLock<T> {
        CoRwLock {
            state: Mutex::new(RwState::default()),
            data: UnsafeCell::new(value),
        }
    }

    /// The protected value, taking the lock apart.
    ///
    /// ```
    /// assert_eq!(aio_core::task::CoRwLock::new('x').into_inner(), 'x');
    /// ```
    pub fn into_inner(self) -> T {
        self.data.into_inner()
    }
}

impl<T: ?Sized> CoRwLock<T> {
    /// Waits for shared access (QEMU `qemu_co_rwlock_rdlock`): at once if readers (or nobody)
    /// hold the lock and nobody waits; otherwise behind every earlier waiter, writers
    /// included. Cancel-safe, as [`CoMutex::lock`].
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// let l = aio_core::task::CoRwLock::new(vec![1, 2, 3]);
    /// let n = ctx.block_on(async { l.read().await.len() });
    /// assert_eq!(n, 3);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn read(&self) -> ReadLock<'_, T> {
        ReadLock(Acquire::new(self, true, AcquireState::Start))
    }

    /// Waits for exclusive access (QEMU `qemu_co_rwlock_wrlock`): at once if nobody holds or
    /// waits for the lock; otherwise behind every earlier waiter. While it waits, new readers
    /// queue behind it. Cancel-safe, as [`CoMutex::lock`].
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// let l = aio_core::task::CoRwLock::new(0);
    /// ctx.block_on(async { *l.write().await = 9 });
    /// assert_eq!(l.into_inner(), 9);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn write(&self) -> WriteLock<'_, T> {
        WriteLock(Acquire::new(self, false, AcquireState::Start))
    }

    /// Shared access if it is free now (same rule as [`read`](Self::read)); never waits.
    ///
    /// ```
    /// let l = aio_core::task::CoRwLock::new(0);
    /// let w = l.try_write().unwrap();
    /// assert!(l.try_read().is_none());
    /// drop(w);
    /// let _r = l.try_read().unwrap();
    /// ```
    pub fn try_read(&self) -> Option<CoRwLockReadGuard<'_, T>> {
        let mut state = lock(&self.state);
        (state.owners >= 0 && state.tickets.is_empty()).then(|| {
            state.owners += 1;
            CoRwLockReadGuard::new(self)
        })
    }

    /// Exclusive access if it is free now; never waits.
    ///
    /// ```
    /// let l = aio_core::task::CoRwLock::new(0);
    /// let r = l.try_read().unwrap();
    /// assert!(l.try_write().is_none());
    /// drop(r);
    /// assert!(l.try_write().is_some());
    /// ```
    pub fn try_write(&self) -> Option<CoRwLockWriteGuard<'_, T>> {
        let mut state = lock(&self.state);
        (state.owners == 0 && state.tickets.is_empty()).then(|| {
            state.owners = -1;
            CoRwLockWriteGuard::new(self)
        })
    }

    /// The protected value, through `&mut`: no other reference exists, so no lock is needed.
    ///
    /// ```
    /// let mut l = aio_core::task::CoRwLock::new(1);
    /// *l.get_mut() = 2;
    /// assert_eq!(*l.try_read().unwrap(), 2);
    /// ```
    pub fn get_mut(&mut self) -> &mut T {
        // SAFETY: `&mut self` proves no guard and no other reference exists ([CoRwLock-1]).
        self.data.with_mut(|p| unsafe { &mut *p })
    }

    fn release(&self, read: bool) {
        let wakers = lock(&self.state).release(read);
        wake_all(wakers);
    }
}

impl<T: Default> Default for CoRwLock<T> {
    fn default() -> Self {
        CoRwLock::new(T::default())
    }
}

impl<T: ?Sized> fmt::Debug for CoRwLock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("CoRwLock")
            .field("owners", &state.owners)
            .field("waiters", &state.tickets.len())
            .finish_non_exhaustive()
    }
}

/// Where a [`CoRwLock`] acquisition stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcquireState {
    /// Not polled yet.
    Start,
    /// Queued under this ticket id.
    Waiting(u64),
    /// Holds the lock, not yet returned as a guard (an upgrade that succeeded at once).
    Held,
    /// Returned its guard.
    Done,
}

/// What [`ReadLock`] and [`WriteLock`] share: one acquisition of either kind.
struct Acquire<'a, T: ?Sized> {
    lock: &'a CoRwLock<T>,
    read: bool,
    state: AcquireState,
}

impl<'a, T: ?Sized> Acquire<'a, T> {
    fn new(lock: &'a CoRwLock<T>, read: bool, state: AcquireState) -> Self {
        Acquire { lock, read, state }
    }

    /// Polls for access of this kind; `Ready(())` means it is held (and now belongs to the
    /// guard the caller makes).
    fn poll_acquire(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.state {
            AcquireState::Start => {
                let mut state = lock(&self.lock.state);
                let free = state.tickets.is_empty()
                    && if self.read {
                        state.owners >= 0
                    } else {
                        state.owners == 0
                    };
                if free {
                    state.owners = if self.read { state.owners + 1 } else { -1 };
                    self.state = AcquireState::Done;
                    return Poll::Ready(());
                }
                let id = state.push(self.read, Some(cx.waker().clone()));
                self.state = AcquireState::Waiting(id);
                Poll::Pending
            }
            AcquireState::Waiting(id) => {
                let mut state = lock(&self.lock.state);
                // Granted means taken out of the queue by `RwState::grant`.
                let Some(i) = state.find(id) else {
                    self.state = AcquireState::Done;
                    return Poll::Ready(());
                };
                let entry = &mut state.tickets[i].entry;
                let old = match &entry.waker {
                    Some(w) if w.will_wake(cx.waker()) => None,
                    _ => entry.waker.replace(cx.waker().clone()),
                };
                // Dropped after the lock (see `WaitList::update_waker`).
                drop(state);
                drop(old);
                Poll::Pending
            }
            AcquireState::Held => {
                self.state = AcquireState::Done;
                Poll::Ready(())
            }
            AcquireState::Done => panic!("CoRwLock future polled after it returned its guard"),
        }
    }
}

impl<T: ?Sized> Drop for Acquire<'_, T> {
    fn drop(&mut self) {
        let mut removed = None;
        let wakers = match self.state {
            AcquireState::Start | AcquireState::Done => return,
            AcquireState::Held => lock(&self.lock.state).release(self.read),
            AcquireState::Waiting(id) => {
                let mut state = lock(&self.lock.state);
                match state.find(id) {
                    Some(i) => {
                        // Leaving the queue may let the tickets behind it in (readers behind
                        // a cancelled writer). The ticket (and its waker) is dropped after the
                        // lock (see `WaitList::update_waker`).
                        removed = state.tickets.remove(i);
                        state.grant()
                    }
                    // Granted, never seen: give it back, which grants the next in line.
                    None => state.release(self.read),
                }
            }
        };
        drop(removed);
        wake_all(wakers);
    }
}

impl<T: ?Sized> fmt::Debug for Acquire<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acquire")
            .field("read", &self.read)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// The future of [`CoRwLock::read`].
#[must_use = "futures do nothing unless awaited"]
#[derive(Debug)]
pub struct ReadLock<'a, T: ?Sized>(Acquire<'a, T>);

impl<'a, T: ?Sized> Future for ReadLock<'a, T> {
    type Output = CoRwLockReadGuard<'a, T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let lock = self.0.lock;
        self.0
            .poll_acquire(cx)
            .map(|()| CoRwLockReadGuard::new(lock))
    }
}

/// The future of [`CoRwLock::write`] and [`CoRwLockReadGuard::upgrade`].
#[must_use = "futures do nothing unless awaited"]
#[derive(Debug)]
pub struct WriteLock<'a, T: ?Sized>(Acquire<'a, T>);

impl<'a, T: ?Sized> Future for WriteLock<'a, T> {
    type Output = CoRwLockWriteGuard<'a, T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let lock = self.0.lock;
        self.0
            .poll_acquire(cx)
            .map(|()| CoRwLockWriteGuard::new(lock))
    }
}

/// Shared access to a [`CoRwLock`]'s data; dropping it releases that access (QEMU
/// `qemu_co_rwlock_unlock` after `rdlock`).
///
/// ```
/// let l = aio_core::task::CoRwLock::new(3);
/// let (a, b) = (l.try_read().unwrap(), l.try_read().unwrap());
/// assert_eq!(*a * *b, 9);
/// ```
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct CoRwLockReadGuard<'a, T: ?Sized> {
    lock: &'a CoRwLock<T>,
    /// `Send` and `Sync` only when `T: Sync`: the guard hands out `&T`.
    _data: PhantomData<&'a T>,
}

impl<'a, T: ?Sized> CoRwLockReadGuard<'a, T> {
    fn new(lock: &'a CoRwLock<T>) -> Self {
        CoRwLockReadGuard {
            lock,
            _data: PhantomData,
        }
    }

    /// Trades this shared access for exclusive access (QEMU `qemu_co_rwlock_upgrade`). If
    /// this is the only reader and nobody waits, the switch is immediate and atomic.
    /// Otherwise the read access is given up at once and the returned future queues for
    /// write access behind every earlier waiter, so others (writers included) may run in
    /// between: read the data again after upgrading.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// let l = aio_core::task::CoRwLock::new(1);
    /// ctx.block_on(async {
    ///     let r = l.read().await;
    ///     let mut w = aio_core::task::CoRwLockReadGuard::upgrade(r).await;
    ///     *w += 1;
    /// });
    /// assert_eq!(l.into_inner(), 2);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn upgrade(this: Self) -> WriteLock<'a, T> {
        let rw = this.lock;
        // The read hold passes to the code below (no release on drop).
        std::mem::forget(this);
        let mut state = lock(&rw.state);
        if state.owners == 1 && state.tickets.is_empty() {
            state.owners = -1;
            return WriteLock(Acquire::new(rw, false, AcquireState::Held));
        }
        state.owners -= 1;
        let id = state.push(false, None);
        let wakers = state.grant();
        drop(state);
        wake_all(wakers);
        WriteLock(Acquire::new(rw, false, AcquireState::Waiting(id)))
    }
}

impl<T: ?Sized> Deref for CoRwLockReadGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // Only shared references are made through read guards.
        // SAFETY: this guard counts in `owners` > 0, so no writer guard exists ([CoRwLock-1]).
        self.lock.data.with(|p| unsafe { &*p })
    }
}

impl<T: ?Sized> Drop for CoRwLockReadGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.release(true);
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for CoRwLockReadGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// Exclusive access to a [`CoRwLock`]'s data; dropping it releases the lock (QEMU
/// `qemu_co_rwlock_unlock` after `wrlock`).
///
/// ```
/// let l = aio_core::task::CoRwLock::new(String::new());
/// l.try_write().unwrap().push('a');
/// assert_eq!(*l.try_read().unwrap(), "a");
/// ```
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct CoRwLockWriteGuard<'a, T: ?Sized> {
    lock: &'a CoRwLock<T>,
    /// `Send` when `T: Send`, `Sync` when `T: Sync`.
    _data: PhantomData<&'a mut T>,
}

impl<'a, T: ?Sized> CoRwLockWriteGuard<'a, T> {
    fn new(lock: &'a CoRwLock<T>) -> Self {
        CoRwLockWriteGuard {
            lock,
            _data: PhantomData,
        }
    }

    /// Trades exclusive access for shared access without letting a writer in between (QEMU
    /// `qemu_co_rwlock_downgrade`); readers queued at the head are let in with it.
    ///
    /// ```
    /// let l = aio_core::task::CoRwLock::new(0);
    /// let mut w = l.try_write().unwrap();
    /// *w = 4;
    /// let r = aio_core::task::CoRwLockWriteGuard::downgrade(w);
    /// assert_eq!(*r, 4);
    /// assert!(l.try_read().is_some() && l.try_write().is_none());
    /// ```
    pub fn downgrade(this: Self) -> CoRwLockReadGuard<'a, T> {
        let rw = this.lock;
        // The write hold becomes a read hold below (no release on drop).
        std::mem::forget(this);
        let wakers = {
            let mut state = lock(&rw.state);
            debug_assert_eq!(state.owners, -1);
            state.owners = 1;
            state.grant()
        };
        wake_all(wakers);
        CoRwLockReadGuard::new(rw)
    }
}

impl<T: ?Sized> Deref for CoRwLockWriteGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: this guard set `owners` to -1, so no other guard exists ([CoRwLock-1]).
        self.lock.data.with(|p| unsafe { &*p })
    }
}

impl<T: ?Sized> DerefMut for CoRwLockWriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` is the only reference via the guard ([CoRwLock-1]).
        self.lock.data.with_mut(|p| unsafe { &mut *p })
    }
}

impl<T: ?Sized> Drop for CoRwLockWriteGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.release(false);
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for CoRwLockWriteGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}
