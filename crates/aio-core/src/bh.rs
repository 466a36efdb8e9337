//! Bottom halves: callbacks that any thread can schedule, wait-free, to run once on the
//! context's next loop iteration.
//!
//! C original: `util/async.c` (`aio_bh_enqueue`, `aio_bh_dequeue`, `aio_bh_poll`,
//! `aio_compute_bh_timeout`). Only scheduled or deleted BHs are linked anywhere, so an iteration
//! costs time in proportion to the BHs that were scheduled, never to the BHs that exist.
//!
//! # The state machine
//!
//! Each BH node has an atomic flag word ([`PENDING`], [`SCHEDULED`], [`DELETED`], [`ONESHOT`],
//! [`IDLE`]). Scheduling sets `PENDING | SCHEDULED` with one `fetch_or`; only the caller that
//! turned `PENDING` on links the node, so a node is on at most one list at a time and two
//! schedules before a poll run the callback once. The home thread takes the whole shared list
//! with one `swap` into a private *slice*, unlinks each node, and only then clears `PENDING`
//! with a `fetch_and` whose result says what to do: run the callback (`SCHEDULED` without
//! `DELETED`), free it (`DELETED` or `ONESHOT`), or both.
//!
//! # Slices and nested polls
//!
//! Each BH pass pushes its slice at the back of the context's slice queue and always works on
//! the front one. A callback that polls the context again therefore first finishes the outer
//! pass's remaining BHs, then its own; when it returns, every slice is drained and the outer
//! pass ends. BHs scheduled during a pass go to the shared list and run in the next pass.
//!
//! # Memory
//!
//! Nodes are reference-counted. The user's [`BottomHalf`] handle holds one reference, and the
//! list (or slice) that links a node holds another, taken when `PENDING` goes on and released
//! when the home thread has dealt with the node. Only the home thread ever unlinks nodes, and it
//! unlinks whole lists at once, so the Treiber-stack ABA problem cannot arise.

use crate::context::Shared;
use crate::sync::{Arc, AtomicPtr, AtomicU32, Ordering, UnsafeCell};
use std::fmt;
use std::ptr;
use std::time::Duration;

/// Linked on a list or slice, waiting for the home thread.
pub(crate) const PENDING: u32 = 1 << 0;
/// The callback should run.
pub(crate) const SCHEDULED: u32 = 1 << 1;
/// Free the node without running it; wins over `SCHEDULED`.
pub(crate) const DELETED: u32 = 1 << 2;
/// Free the node after running it once.
pub(crate) const ONESHOT: u32 = 1 << 3;
/// Scheduled as idle: does not force a zero timeout and does not count as progress.
pub(crate) const IDLE: u32 = 1 << 4;

/// How long an idle BH may wait for the loop to wake up (QEMU: 10 ms).
pub(crate) const IDLE_BH_TIMEOUT: Duration = Duration::from_millis(10);

pub(crate) type Callback = Box<dyn FnMut(&RunningBh<'_>) + Send>;

/// One bottom half. Shared between its handle, the list that links it, and the home thread.
pub(crate) struct BhNode {
    /// `PENDING | SCHEDULED | DELETED | ONESHOT | IDLE`.
    flags: AtomicU32,
    /// The next node on whatever list links this one. Written only by the thread that turned
    /// `PENDING` on (before it publishes the node) and read only by the home thread while the
    /// node is pending, so `Relaxed` suffices: the list head's release/acquire orders it.
    next: AtomicPtr<BhNode>,
    /// The user's callback. `None` while it runs (so that a nested pass cannot re-enter it) and
    /// once the BH has been deleted or has run as a one-shot.
    ///
    /// # Invariant
    ///
    /// Only the context's home thread accesses it, one access at a time, except in `Drop`,
    /// which has exclusive access anyway.
    callback: UnsafeCell<Option<Callback>>,
}

// SAFETY: every field but `callback` is an atomic. `callback` holds a `Send` closure and, by its
// invariant, is only touched by the home thread of the context the node belongs to (or by
// `Drop`, exclusively), so sharing `&BhNode` between threads never lets two of them touch it.
unsafe impl Sync for BhNode {}

impl BhNode {
    pub(crate) fn new(callback: Callback, flags: u32) -> Arc<BhNode> {
        Arc::new(BhNode {
            flags: AtomicU32::new(flags),
            next: AtomicPtr::new(ptr::null_mut()),
            callback: UnsafeCell::new(Some(callback)),
        })
    }

    /// Runs the callback on the home thread. Returns false when the callback is not there: it
    /// is running further up the stack (a nested pass met it again) or was freed.
    ///
    /// A panic in the callback unwinds through here; the callback is put back first, so the
    /// BH stays usable.
    fn invoke(node: &Arc<BhNode>, shared: &Shared) -> bool {
        // SAFETY: home thread only (invariant of `callback`); the access ends before the call.
        let taken = node.callback.with_mut(|cb| unsafe { (*cb).take() });
        let Some(callback) = taken else { return false };
        struct PutBack<'a>(&'a BhNode, Option<Callback>);
        impl Drop for PutBack<'_> {
            fn drop(&mut self) {
                let cb = self.1.take();
                // SAFETY: home thread only; no other access is live (the callback returned).
                self.0.callback.with_mut(|slot| unsafe { *slot = cb });
            }
        }
        let mut guard = PutBack(node, Some(callback));
        if let Some(cb) = guard.1.as_mut() {
            cb(&RunningBh { node, shared });
        }
        true
    }

    /// Drops the callback (and what it captured) now, on the home thread.
    fn drop_callback(&self) {
        // SAFETY: home thread only; the callback is not running (it would have been taken out,
        // in which case this finds `None` and the running frame puts it back, to be freed with
        // the node).
        let cb = self.callback.with_mut(|slot| unsafe { (*slot).take() });
        drop(cb);
    }
}

impl fmt::Debug for BhNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BhNode")
            .field("flags", &self.flags.load(Ordering::Relaxed))
            .finish()
    }
}

/// What the scheduled BHs ask of the next wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BhTimeout {
    /// Nothing scheduled: no limit from BHs.
    None,
    /// Only idle BHs: wake within [`IDLE_BH_TIMEOUT`].
    Idle,
    /// A BH is scheduled: do not block.
    Now,
}

impl BhTimeout {
    fn merge(self, flags: u32) -> BhTimeout {
        if flags & (SCHEDULED | DELETED) != SCHEDULED {
            self
        } else if flags & IDLE != 0 {
            BhTimeout::Idle.max(self)
        } else {
            BhTimeout::Now
        }
    }

    fn max(self, other: BhTimeout) -> BhTimeout {
        match (self, other) {
            (BhTimeout::Now, _) | (_, BhTimeout::Now) => BhTimeout::Now,
            (BhTimeout::Idle, _) | (_, BhTimeout::Idle) => BhTimeout::Idle,
            _ => BhTimeout::None,
        }
    }
}

/// The shared, lock-free LIFO of pending BHs (QEMU `ctx->bh_list`).
pub(crate) struct BhList {
    /// Head of a singly linked list of nodes, each owning one `Arc` reference.
    head: AtomicPtr<BhNode>,
}

impl BhList {
    pub(crate) fn new() -> Self {
        BhList {
            head: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Sets `new_flags | PENDING` on `node` and links it if it was not pending. Returns
    /// nothing: the caller notifies the loop. Wait-free apart from the push's CAS loop.
    pub(crate) fn enqueue(&self, node: &Arc<BhNode>, new_flags: u32) {
        // Synchronizes with the `fetch_and` in `Slice::run_next` (AcqRel both ways): if we see
        // PENDING clear, the home thread has finished reading `next`, so we may overwrite it;
        // and our SCHEDULED, with the writes before it, is visible to the pass that clears it.
        let old = node.flags.fetch_or(PENDING | new_flags, Ordering::AcqRel);
        if old & PENDING != 0 {
            return;
        }
        let raw = Arc::into_raw(node.clone()).cast_mut();
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            node.next.store(head, Ordering::Relaxed);
            // Release publishes `next` and the flags to the home thread's `swap` in `take`.
            match self
                .head
                .compare_exchange_weak(head, raw, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(current) => head = current,
            }
        }
    }

    /// Unlinks every pending node at once and returns them in scheduling order. The home thread
    /// calls it each pass; other threads only once the loop is gone (see `Shared::notify`).
    /// Taking the whole list with one `swap` keeps concurrent takers disjoint.
    pub(crate) fn take(&self) -> Slice {
        if self.head.load(Ordering::Relaxed).is_null() {
            return Slice::empty();
        }
        // Acquire synchronizes with the Release CAS of every push, making each node's `next`
        // and flags visible.
        let mut lifo = self.head.swap(ptr::null_mut(), Ordering::Acquire);
        // Reverse in place so that BHs run in the order they were first scheduled, which is what
        // users expect; QEMU runs them newest first and promises nothing.
        let mut fifo = ptr::null_mut();
        while !lifo.is_null() {
            // SAFETY: `lifo` was linked by `enqueue`, which gave the list an `Arc` reference; the
            // `swap` above made this thread the list's owner, so the node is alive and no other
            // thread reads or writes its `next` until PENDING is cleared.
            let node = unsafe { &*lifo };
            let next = node.next.load(Ordering::Relaxed);
            node.next.store(fifo, Ordering::Relaxed);
            fifo = lifo;
            lifo = next;
        }
        Slice { head: fifo }
    }

    /// The timeout contribution of the BHs pending on the shared list. Home thread only.
    pub(crate) fn timeout(&self) -> BhTimeout {
        // Acquire pairs with the Release CAS in `enqueue`, so the walk sees each node's `next`.
        walk_timeout(self.head.load(Ordering::Acquire))
    }
}

impl Drop for BhList {
    fn drop(&mut self) {
        // Nobody can push any more (we have `&mut self`): release every linked node without
        // running it.
        drop(self.take());
    }
}

impl fmt::Debug for BhList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BhList").finish_non_exhaustive()
    }
}

fn walk_timeout(mut node: *mut BhNode) -> BhTimeout {
    let mut timeout = BhTimeout::None;
    while !node.is_null() {
        // SAFETY: only the home thread calls this, and while it exists only it unlinks nodes
        // (other threads take the list only once the loop is gone), so every node reachable
        // from a list head it can see stays linked, with its `Arc` reference alive, for the
        // whole walk. Pushers only change the head, never a linked node's `next`.
        let n = unsafe { &*node };
        timeout = timeout.merge(n.flags.load(Ordering::Relaxed));
        if timeout == BhTimeout::Now {
            break;
        }
        node = n.next.load(Ordering::Relaxed);
    }
    timeout
}

/// A private FIFO of BHs taken off the shared list by one BH pass (QEMU `BHListSlice`).
///
/// # Invariant
///
/// Every node on it is pending, owned by the home thread, and carries one `Arc` reference that
/// the slice owns.
pub(crate) struct Slice {
    head: *mut BhNode,
}

impl Slice {
    pub(crate) fn empty() -> Slice {
        Slice {
            head: ptr::null_mut(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.head.is_null()
    }

    pub(crate) fn timeout(&self) -> BhTimeout {
        walk_timeout(self.head)
    }

    /// Unlinks the first node, taking over the slice's reference to it.
    pub(crate) fn pop(&mut self) -> Option<Arc<BhNode>> {
        if self.head.is_null() {
            return None;
        }
        let raw = self.head;
        // SAFETY: by the invariant the node is alive and owned by this slice; we read its
        // `next` before clearing PENDING, so no pusher can be writing it.
        self.head = unsafe { &*raw }.next.load(Ordering::Relaxed);
        // SAFETY: `raw` came from `Arc::into_raw` in `enqueue`; the slice owned that reference
        // and gives it to the caller.
        Some(unsafe { Arc::from_raw(raw) })
    }
}

/// Clears the node's pending state and runs or frees it as its flags say.
pub(crate) fn dispatch(node: &Arc<BhNode>, shared: &Shared) -> bool {
    // Synchronizes with the `fetch_or` in `enqueue` (see there). Clearing PENDING only after
    // the node was unlinked lets a concurrent schedule re-link it onto the shared list.
    let flags = node
        .flags
        .fetch_and(!(PENDING | SCHEDULED | IDLE), Ordering::AcqRel);
    let mut progress = false;
    if flags & (SCHEDULED | DELETED) == SCHEDULED {
        if BhNode::invoke(node, shared) {
            progress = flags & IDLE == 0;
        } else if flags & ONESHOT == 0 {
            // The callback is running further up this thread's stack (a nested poll met its BH
            // again). Rust cannot re-enter an `FnMut`, so keep the schedule for the next pass
            // instead of losing it; QEMU would call it recursively.
            shared.bh_list.enqueue(node, SCHEDULED | (flags & IDLE));
        }
    }
    if flags & (DELETED | ONESHOT) != 0 {
        node.drop_callback();
    }
    progress
}

impl Drop for Slice {
    /// Releases the remaining nodes without running any callback (the context is going away, or
    /// a pass is being abandoned while unwinding from a panic is *not* a case: unwinding leaves
    /// the slice queued in the context, to be finished by the next pass).
    fn drop(&mut self) {
        while let Some(node) = self.pop() {
            let flags = node
                .flags
                .fetch_and(!(PENDING | SCHEDULED | IDLE), Ordering::AcqRel);
            if flags & (DELETED | ONESHOT) != 0 {
                node.drop_callback();
            }
        }
    }
}

impl fmt::Debug for Slice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slice")
            .field("empty", &self.is_empty())
            .finish()
    }
}

/// A bottom half: a callback that runs once on its context's home thread each time it is
/// scheduled (QEMU `QEMUBH`).
///
/// [`schedule`](Self::schedule) may be called from any thread; it is wait-free apart from a CAS
/// loop, makes no system call unless the loop is asleep (then exactly one eventfd write), and
/// coalesces: scheduling twice before the loop gets to it runs the callback once. The callback
/// runs in the next BH pass of [`AioContext::poll`](crate::AioContext::poll); one scheduled from
/// inside a pass (including by itself) runs in the pass after.
///
/// Dropping the handle deletes the BH (QEMU `qemu_bh_delete`): a scheduled run that has not
/// happened yet never happens, and the callback is freed by the loop. Dropping it from inside its
/// own callback is fine.
///
/// # Examples
///
/// ```
/// # fn ctx() -> aio_core::AioContext {
/// #     aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new().unwrap())).unwrap()
/// # }
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
///
/// let ctx = ctx();
/// let runs = Arc::new(AtomicUsize::new(0));
/// let r = runs.clone();
/// let bh = ctx.bh(move || { r.fetch_add(1, Ordering::Relaxed); });
/// bh.schedule();
/// bh.schedule(); // coalesced with the first
/// assert!(ctx.poll());
/// assert_eq!(runs.load(Ordering::Relaxed), 1);
/// assert!(!ctx.poll_nonblocking());
/// ```
pub struct BottomHalf {
    node: Arc<BhNode>,
    shared: Arc<Shared>,
}

impl BottomHalf {
    pub(crate) fn new(shared: Arc<Shared>, callback: Callback) -> BottomHalf {
        BottomHalf {
            node: BhNode::new(callback, 0),
            shared,
        }
    }

    /// Schedules the callback to run on the next loop iteration (QEMU `qemu_bh_schedule`).
    /// Callable from any thread; wakes the loop if it is asleep.
    pub fn schedule(&self) {
        self.shared.bh_list.enqueue(&self.node, SCHEDULED);
        self.shared.notify_scheduled();
    }

    /// Schedules the callback as idle (QEMU `qemu_bh_schedule_idle`): it runs on the next
    /// iteration that happens anyway, and at the latest 10 ms from now; it does not count as
    /// progress.
    pub fn schedule_idle(&self) {
        self.shared.bh_list.enqueue(&self.node, SCHEDULED | IDLE);
        self.shared.notify_scheduled();
    }

    /// Unschedules the callback (QEMU `qemu_bh_cancel`). The handle stays usable.
    ///
    /// Reliable only on the home thread (or otherwise serialized with the loop): from another
    /// thread it can lose the race with a pass that is already about to run the callback.
    pub fn cancel(&self) {
        // Release pairs with the AcqRel `fetch_and` in the pass, which then sees the cancel.
        self.node.flags.fetch_and(!SCHEDULED, Ordering::Release);
    }

    /// Whether the callback is scheduled and has not run yet.
    pub fn is_scheduled(&self) -> bool {
        self.node.flags.load(Ordering::Acquire) & (SCHEDULED | DELETED) == SCHEDULED
    }
}

impl Drop for BottomHalf {
    fn drop(&mut self) {
        // QEMU qemu_bh_delete: enqueue with DELETED and notify, so the loop frees the callback.
        self.shared.bh_list.enqueue(&self.node, DELETED);
        self.shared.notify_scheduled();
    }
}

impl fmt::Debug for BottomHalf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BottomHalf")
            .field("scheduled", &self.is_scheduled())
            .finish()
    }
}

/// The bottom half whose callback is running, as that callback sees it: it can schedule or
/// cancel itself without owning its [`BottomHalf`] (which would be a reference cycle).
///
/// Made by [`AioContext::bh_with_self`](crate::AioContext::bh_with_self).
///
/// # Examples
///
/// ```
/// # fn ctx() -> aio_core::AioContext {
/// #     aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new().unwrap())).unwrap()
/// # }
/// let ctx = ctx();
/// let mut left = 3;
/// // Runs once per iteration until it has run three times.
/// let bh = ctx.bh_with_self(move |this| {
///     left -= 1;
///     if left > 0 {
///         this.schedule();
///     }
/// });
/// bh.schedule();
/// let mut runs = 0;
/// while ctx.poll_nonblocking() {
///     runs += 1;
/// }
/// assert_eq!(runs, 3);
/// ```
pub struct RunningBh<'a> {
    node: &'a Arc<BhNode>,
    shared: &'a Shared,
}

impl RunningBh<'_> {
    /// Schedules this BH again; it runs in the next pass, not this one.
    pub fn schedule(&self) {
        self.shared.bh_list.enqueue(self.node, SCHEDULED);
        self.shared.notify_scheduled();
    }

    /// Schedules this BH again as idle (see [`BottomHalf::schedule_idle`]).
    pub fn schedule_idle(&self) {
        self.shared.bh_list.enqueue(self.node, SCHEDULED | IDLE);
        self.shared.notify_scheduled();
    }

    /// Unschedules this BH if something scheduled it again meanwhile.
    pub fn cancel(&self) {
        // Release pairs with the AcqRel `fetch_and` of the next pass.
        self.node.flags.fetch_and(!SCHEDULED, Ordering::Release);
    }
}

impl fmt::Debug for RunningBh<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningBh").finish_non_exhaustive()
    }
}

/// Wraps a plain closure as a BH callback.
pub(crate) fn plain_callback(mut f: impl FnMut() + Send + 'static) -> Callback {
    Box::new(move |_| f())
}

/// Wraps a one-shot closure as a BH callback that runs it once.
pub(crate) fn oneshot_callback(f: impl FnOnce() + Send + 'static) -> Callback {
    let mut f = Some(f);
    Box::new(move |_| {
        if let Some(f) = f.take() {
            f();
        }
    })
}

/// Creates and schedules a one-shot BH on `shared` (QEMU `aio_bh_schedule_oneshot`).
pub(crate) fn schedule_oneshot(shared: &Shared, callback: Callback) {
    let node = BhNode::new(callback, 0);
    shared.bh_list.enqueue(&node, SCHEDULED | ONESHOT);
    shared.notify_scheduled();
}
