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
//! `DELETED`), free the node (`DELETED` or `ONESHOT`), or both.
//!
//! # Slices and nested polls
//!
//! Each BH pass pushes its slice at the back of the context's slice queue and always works on
//! the front one. A callback that polls the context again therefore first finishes the outer
//! pass's remaining BHs, then its own; when it returns, every slice is drained and the outer
//! pass ends. BHs scheduled during a pass go to the shared list and run in the next pass.
//!
//! # Memory: who owns a node
//!
//! Nodes are allocated as `Arc`s, but the hot path touches no reference count:
//!
//! * A [`BottomHalf`] handle owns one reference while it lives. Scheduling through it links the
//!   node *without* a reference: the handle keeps it alive.
//! * Deleting (dropping the handle) *transfers* the handle's reference to the link, and a
//!   one-shot BH is created with its only reference owned by its link. The flag word records it:
//!   a link carries a reference exactly when the node is `DELETED` or `ONESHOT`.
//! * Only the home thread frees nodes (or, once the loop is gone, whoever takes the list): after
//!   unlinking a node whose `fetch_and` shows `DELETED` or `ONESHOT`, it takes the reference
//!   back and drops it. A node whose callback is still running further up the stack (a nested
//!   pass met it again) is left to that running frame, which frees it when the callback returns.
//!
//! So a linked node is always alive (a handle holds it, or its link does), and a node being
//! dispatched stays alive until its dispatch ends. Only the home thread unlinks nodes while the
//! loop exists, and it unlinks whole lists at once, so the Treiber-stack ABA problem cannot arise.

use crate::context::Shared;
use crate::sync::{
    Arc, AtomicBool, AtomicPtr, AtomicU32, Ordering, UnsafeCell, signal_fence, thread_marker,
};
use std::fmt;
use std::mem::ManuallyDrop;
use std::ptr::{self, NonNull};
use std::time::Duration;

/// Linked on a list or slice, waiting for the home thread.
pub(crate) const PENDING: u32 = 1 << 0;
/// The callback should run.
pub(crate) const SCHEDULED: u32 = 1 << 1;
/// Free the node without running it; wins over `SCHEDULED`. The link owns a reference.
pub(crate) const DELETED: u32 = 1 << 2;
/// Free the node after running it once. The link owns the only reference.
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
    /// State only the home thread touches.
    ///
    /// # Invariant
    ///
    /// Only the home thread of the node's context accesses it, one access at a time (no
    /// reference to it is held across a callback), except when the node is dropped, which is
    /// exclusive anyway.
    local: UnsafeCell<Local>,
}

/// The home thread's part of a node.
struct Local {
    /// The user's callback. `None` while it runs, so that a nested pass cannot re-enter it.
    callback: Option<Callback>,
    /// The callback is running further up the home thread's stack.
    running: bool,
    /// A nested pass unlinked this node as deleted while its callback was running, and handed
    /// the link's reference to the running frame, which frees the node when the callback returns.
    free_after_run: bool,
}

// SAFETY: `flags` and `next` are atomics. `local` holds a `Send` closure and two flags and, by
// its invariant, is only touched by the home thread of the node's context (or by `Drop`,
// exclusively), so sharing `&BhNode` between threads never lets two of them touch it.
unsafe impl Sync for BhNode {}

/// What became of a request to run a node's callback.
enum Invoked {
    /// The callback ran (or started running and panicked).
    Ran,
    /// The callback is already running further up the stack.
    AlreadyRunning,
}

impl BhNode {
    fn new(callback: Callback, flags: u32) -> Arc<BhNode> {
        Arc::new(BhNode {
            flags: AtomicU32::new(flags),
            next: AtomicPtr::new(ptr::null_mut()),
            local: UnsafeCell::new(Local {
                callback: Some(callback),
                running: false,
                free_after_run: false,
            }),
        })
    }

    /// Runs `f` on the home-thread state. Never call it while another such access is live.
    fn with_local<R>(&self, f: impl FnOnce(&mut Local) -> R) -> R {
        // By the invariant of `local`, only the home thread calls this, and each call's `&mut`
        // ends before the next one starts: none is held across a callback.
        // SAFETY: so this `&mut` is the only live access to `local`.
        self.local.with_mut(|local| f(unsafe { &mut *local }))
    }

    /// Runs the callback on the home thread, taking it out of the node while it runs.
    ///
    /// A panic in the callback unwinds through here; the callback is put back first, so the BH
    /// stays usable (unless it was deleted meanwhile).
    fn invoke(&self, shared: &Shared) -> Invoked {
        let Some(callback) = self.with_local(|l| {
            let cb = l.callback.take();
            l.running = cb.is_some();
            cb
        }) else {
            return Invoked::AlreadyRunning;
        };
        struct PutBack<'a>(&'a BhNode, Option<Callback>);
        impl Drop for PutBack<'_> {
            fn drop(&mut self) {
                let cb = self.1.take();
                self.0.with_local(|l| {
                    l.running = false;
                    // A node that is about to be freed keeps no callback: drop it below, after
                    // the access ends, since dropping user state may do anything.
                    if !l.free_after_run {
                        l.callback = cb;
                        None
                    } else {
                        cb
                    }
                });
            }
        }
        let mut guard = PutBack(self, Some(callback));
        if let Some(cb) = guard.1.as_mut() {
            cb(&RunningBh { node: self, shared });
        }
        Invoked::Ran
    }
}

impl fmt::Debug for BhNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BhNode")
            .field("flags", &self.flags.load(Ordering::Relaxed))
            .finish()
    }
}

/// Drops a node's reference that the caller owns (one a delete or a one-shot's creation put on
/// its link).
///
/// # Safety
///
/// `node` must come from `Arc::into_raw` (directly or through `Arc::as_ptr` of a handle whose
/// reference was then transferred), the caller must own that reference, and nobody may use the
/// node through this reference afterwards.
unsafe fn release(node: NonNull<BhNode>) {
    // SAFETY: the caller owns one reference made by `Arc::into_raw`; we give it back to `Arc`.
    drop(unsafe { Arc::from_raw(node.as_ptr().cast_const()) });
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
    /// Head of a singly linked list of pending nodes (see the module docs for who owns them).
    head: AtomicPtr<BhNode>,
}

impl BhList {
    pub(crate) fn new() -> Self {
        BhList {
            head: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Links `node`, whose PENDING flag the caller has just turned on. Lock-free (a CAS loop).
    fn push(&self, node: &BhNode) {
        let raw = ptr::from_ref(node).cast_mut();
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
    fn take(&self) -> Slice {
        if self.head.load(Ordering::Relaxed).is_null() {
            return Slice::empty();
        }
        // Acquire synchronizes with the Release CAS of every push, making each node's `next`
        // and flags visible.
        Slice::from_lifo(self.head.swap(ptr::null_mut(), Ordering::Acquire))
    }

    /// The timeout contribution of the BHs pending on the shared list. Home thread only.
    fn timeout(&self) -> BhTimeout {
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

/// The home thread's own list of pending BHs: schedules made on the home thread are linked here
/// with plain loads and stores instead of the shared list's CAS, and taken without its `swap`.
///
/// # Invariant
///
/// `head` is touched only by the home thread, including signal handlers that interrupt it, and
/// only between raising and lowering `busy`. A signal handler that finds `busy` raised has
/// interrupted a list operation and uses the shared list instead, which is what makes
/// scheduling async-signal-safe, as QEMU's is.
struct LocalList {
    head: UnsafeCell<*mut BhNode>,
    /// A home-thread operation on `head` is in progress. Relaxed: only the home thread and its
    /// signal handlers read it; signal fences order it against `head`.
    busy: AtomicBool,
    /// False once the loop is gone (`close`): later home-thread schedules use the shared list,
    /// whose dead-context path frees them at once.
    open: AtomicBool,
}

// SAFETY: `head` is only ever accessed by the home thread of the context that owns the list
// (invariant above), so sharing or sending the list between threads never lets two threads touch
// it; the nodes it links are themselves `Send + Sync`. Everything else is atomic.
unsafe impl Send for LocalList {}
// SAFETY: as for `Send`.
unsafe impl Sync for LocalList {}

impl LocalList {
    /// Runs `f` on the head if no other home-thread operation is in progress.
    fn with_head<R>(&self, f: impl FnOnce(&mut *mut BhNode) -> R) -> Option<R> {
        if self.busy.load(Ordering::Relaxed) {
            return None;
        }
        self.busy.store(true, Ordering::Relaxed);
        signal_fence();
        // Only the home thread gets here (invariant), and `busy` was clear: no other access is
        // in progress, not even in the code a signal handler interrupted.
        // SAFETY: so this `&mut` is the only live access to `head`.
        let result = self.head.with_mut(|head| f(unsafe { &mut *head }));
        signal_fence();
        self.busy.store(false, Ordering::Relaxed);
        Some(result)
    }
}

/// Every pending BH of a context: a shared lock-free list for schedules made on other threads,
/// and a plain one for schedules made on the home thread (QEMU has only the shared one).
pub(crate) struct PendingBhs {
    remote: BhList,
    local: LocalList,
    /// `thread_marker()` of the home thread.
    home: usize,
}

impl PendingBhs {
    pub(crate) fn new(home: usize) -> Self {
        PendingBhs {
            remote: BhList::new(),
            local: LocalList {
                head: UnsafeCell::new(ptr::null_mut()),
                busy: AtomicBool::new(false),
                open: AtomicBool::new(true),
            },
            home,
        }
    }

    /// Sets `new_flags | PENDING` on `node` and links it if it was not pending. The caller
    /// notifies the loop. Wait-free apart from the shared list's CAS loop.
    ///
    /// With `DELETED` or `ONESHOT` in `new_flags`, the caller transfers one reference to the
    /// node's link (whether this call links it or it was linked already) and must not touch the
    /// node afterwards: the home thread may free it at once.
    pub(crate) fn enqueue(&self, node: &BhNode, new_flags: u32) {
        // Synchronizes with the `fetch_and` in `dispatch` (AcqRel both ways): if we see PENDING
        // clear, the home thread has finished reading `next`, so we may overwrite it; and our
        // flags, with the writes before them, are visible to the pass that clears them.
        let old = node.flags.fetch_or(PENDING | new_flags, Ordering::AcqRel);
        if old & PENDING == 0 {
            self.link(node);
        }
    }

    /// Links a node whose PENDING flag the caller has just set (or created it with).
    fn link(&self, node: &BhNode) {
        if thread_marker() == self.home && self.local.open.load(Ordering::Relaxed) {
            let raw = ptr::from_ref(node).cast_mut();
            let linked = self.local.with_head(|head| {
                node.next.store(*head, Ordering::Relaxed);
                *head = raw;
            });
            if linked.is_some() {
                return;
            }
        }
        self.remote.push(node);
    }

    /// Takes both lists, each in scheduling order: other threads' BHs first. Home thread only.
    pub(crate) fn take(&self) -> (Slice, Slice) {
        let local = self
            .local
            .with_head(|head| std::mem::replace(head, ptr::null_mut()));
        (
            self.remote.take(),
            Slice::from_lifo(local.unwrap_or(ptr::null_mut())),
        )
    }

    /// Takes the shared list only: for threads other than the home thread, once the loop is gone.
    pub(crate) fn take_remote(&self) -> Slice {
        self.remote.take()
    }

    /// Stops linking home-thread schedules locally and takes what is there (the loop is going
    /// away). Home thread only.
    pub(crate) fn close_local(&self) -> Slice {
        self.local.open.store(false, Ordering::Relaxed);
        let local = self
            .local
            .with_head(|head| std::mem::replace(head, ptr::null_mut()));
        Slice::from_lifo(local.unwrap_or(ptr::null_mut()))
    }

    /// The timeout contribution of the BHs pending on both lists. Home thread only.
    pub(crate) fn timeout(&self) -> BhTimeout {
        let remote = self.remote.timeout();
        if remote == BhTimeout::Now {
            return remote;
        }
        // If a signal handler holds the local list (it cannot: it would have to interrupt this
        // very function), count it as "now" rather than guess.
        let local = self
            .local
            .with_head(|head| walk_timeout(*head))
            .unwrap_or(BhTimeout::Now);
        remote.max(local)
    }
}

impl Drop for PendingBhs {
    fn drop(&mut self) {
        // Exclusive access: release whatever is still linked locally (the shared list releases
        // its own nodes when it drops).
        drop(self.close_local());
    }
}

impl fmt::Debug for PendingBhs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingBhs").finish_non_exhaustive()
    }
}

fn walk_timeout(mut node: *mut BhNode) -> BhTimeout {
    let mut timeout = BhTimeout::None;
    while !node.is_null() {
        // Only the home thread calls this, and while it exists only it unlinks nodes (other
        // threads take the list only once the loop is gone). A linked node is alive (a handle
        // or its link holds it) and stays linked for the whole walk. Pushers only change the
        // head, never a linked node's `next`.
        // SAFETY: so `node` points to a live node for as long as we read it.
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
/// Every node on it is pending, alive, and owned by the thread that took it.
pub(crate) struct Slice {
    head: *mut BhNode,
}

impl Slice {
    pub(crate) fn empty() -> Slice {
        Slice {
            head: ptr::null_mut(),
        }
    }

    /// Turns a just-unlinked LIFO chain into a slice in scheduling order. Reversing makes BHs
    /// run in the order they were first scheduled, which is what users expect; QEMU runs them
    /// newest first and promises nothing.
    fn from_lifo(mut lifo: *mut BhNode) -> Slice {
        let mut fifo = ptr::null_mut();
        while !lifo.is_null() {
            // Linked nodes are alive (module docs: a handle or the link holds them), and the
            // caller unlinked the chain, so this thread is the only one that reads or writes
            // their `next` until PENDING is cleared.
            // SAFETY: so `lifo` points to a live node that only we touch.
            let node = unsafe { &*lifo };
            let next = node.next.load(Ordering::Relaxed);
            node.next.store(fifo, Ordering::Relaxed);
            fifo = lifo;
            lifo = next;
        }
        Slice { head: fifo }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.head.is_null()
    }

    pub(crate) fn timeout(&self) -> BhTimeout {
        walk_timeout(self.head)
    }

    /// Unlinks the first node.
    pub(crate) fn pop(&mut self) -> Option<NonNull<BhNode>> {
        let node = NonNull::new(self.head)?;
        // By the invariant the node is alive and owned by this slice; we read its `next` before
        // clearing PENDING, so no pusher can be writing it.
        // SAFETY: so the node is live and its `next` ours to read.
        self.head = unsafe { node.as_ref() }.next.load(Ordering::Relaxed);
        Some(node)
    }
}

/// Handles a node just popped from a slice on the home thread: clears its pending state, then
/// runs it, frees it, or both, as its flags say. Returns whether a callback ran that counts as
/// progress (a non-idle, non-deleted BH).
pub(crate) fn dispatch(ptr: NonNull<BhNode>, shared: &Shared) -> bool {
    // Popped nodes are alive (slice invariant), and stay alive until this function releases a
    // reference it owns, which it does last.
    // SAFETY: so `ptr` points to a live node for the whole function.
    let node = unsafe { ptr.as_ref() };
    // Synchronizes with the `fetch_or` in `enqueue` (see there). Clearing PENDING only after
    // the node was unlinked lets a concurrent schedule re-link it onto the shared list.
    let flags = node
        .flags
        .fetch_and(!(PENDING | SCHEDULED | IDLE), Ordering::AcqRel);

    /// Releases the node's link reference, if the dispatch owns it, when the dispatch ends,
    /// unwinding from a panicking callback included.
    struct Release<'a> {
        ptr: NonNull<BhNode>,
        node: &'a BhNode,
        owned: bool,
    }
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            let deferred = self
                .node
                .with_local(|l| std::mem::take(&mut l.free_after_run));
            if self.owned || deferred {
                // We own the link's reference (the flags said DELETED or ONESHOT, or a nested
                // pass handed it to us through `free_after_run`), and nothing uses the node after
                // this.
                // SAFETY: so this is the release of a reference we own, the last use.
                unsafe { release(self.ptr) };
            }
        }
    }

    if flags & DELETED != 0 {
        let running = node.with_local(|l| l.running);
        if running {
            // The callback is on the stack above us (it dropped its own handle, then polled):
            // its frame frees the node when it returns.
            node.with_local(|l| l.free_after_run = true);
            return false;
        }
        let _release = Release {
            ptr,
            node,
            owned: true,
        };
        return false;
    }
    let _release = Release {
        ptr,
        node,
        owned: flags & ONESHOT != 0,
    };
    if flags & SCHEDULED == 0 {
        return false; // cancelled
    }
    match node.invoke(shared) {
        Invoked::Ran => flags & IDLE == 0,
        Invoked::AlreadyRunning => {
            // A nested poll met the BH whose callback is running up the stack. Rust cannot
            // re-enter an `FnMut`, so keep the schedule for the next pass instead of losing it;
            // QEMU would call it recursively. (One-shots cannot be re-linked, see `RunningBh`.)
            shared.bhs.enqueue(node, SCHEDULED | (flags & IDLE));
            false
        }
    }
}

impl Drop for Slice {
    /// Releases the remaining nodes without running any callback (the context is going away;
    /// a pass abandoned by a panic does not come here: its slice stays queued in the context
    /// and the next pass finishes it).
    fn drop(&mut self) {
        while let Some(ptr) = self.pop() {
            // SAFETY: popped nodes are alive (slice invariant).
            let node = unsafe { ptr.as_ref() };
            let flags = node
                .flags
                .fetch_and(!(PENDING | SCHEDULED | IDLE), Ordering::AcqRel);
            if flags & (DELETED | ONESHOT) != 0 {
                // The link owned a reference (DELETED or ONESHOT), now ours; no callback is
                // running (the loop is gone), and nothing uses the node after this.
                // SAFETY: so this is the release of a reference we own, the last use.
                unsafe { release(ptr) };
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
    /// The handle's reference; given to the node's link when the handle is dropped.
    node: ManuallyDrop<Arc<BhNode>>,
    shared: Arc<Shared>,
}

impl BottomHalf {
    pub(crate) fn new(shared: Arc<Shared>, callback: Callback) -> BottomHalf {
        BottomHalf {
            node: ManuallyDrop::new(BhNode::new(callback, 0)),
            shared,
        }
    }

    /// Schedules the callback to run on the next loop iteration (QEMU `qemu_bh_schedule`).
    /// Callable from any thread; wakes the loop if it is asleep.
    pub fn schedule(&self) {
        self.shared.bhs.enqueue(&self.node, SCHEDULED);
        self.shared.notify_scheduled();
    }

    /// Schedules the callback as idle (QEMU `qemu_bh_schedule_idle`): it runs on the next
    /// iteration that happens anyway, and at the latest 10 ms from now; it does not count as
    /// progress.
    pub fn schedule_idle(&self) {
        self.shared.bhs.enqueue(&self.node, SCHEDULED | IDLE);
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
        // QEMU qemu_bh_delete: enqueue with DELETED and notify, so the loop frees the node and
        // its callback. Our reference goes to the node's link.
        // SAFETY: `self.node` is not used again: this is the handle's drop.
        let node = unsafe { ManuallyDrop::take(&mut self.node) };
        let raw = Arc::into_raw(node);
        // `raw` is alive: we hold its reference until `enqueue` hands it to the link,
        // and we do not touch the node after `enqueue` returns.
        // SAFETY: justified in the comment just above.
        self.shared.bhs.enqueue(unsafe { &*raw }, DELETED);
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
    node: &'a BhNode,
    shared: &'a Shared,
}

impl RunningBh<'_> {
    /// Schedules this BH again; it runs in the next pass, not this one. Does nothing for a
    /// one-shot BH, which runs once by definition.
    pub fn schedule(&self) {
        self.schedule_with(SCHEDULED);
    }

    /// Schedules this BH again as idle (see [`BottomHalf::schedule_idle`]).
    pub fn schedule_idle(&self) {
        self.schedule_with(SCHEDULED | IDLE);
    }

    fn schedule_with(&self, flags: u32) {
        // A one-shot's only reference belongs to the dispatch running it, which frees it when
        // the callback returns: it must never be linked again. ONESHOT never changes, so a
        // relaxed load is exact.
        if self.node.flags.load(Ordering::Relaxed) & ONESHOT != 0 {
            return;
        }
        // The node is alive while its callback runs (the dispatch holds it), and a concurrent
        // delete of its handle transfers the handle's reference to whichever link exists.
        self.shared.bhs.enqueue(self.node, flags);
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
    // Born pending: nobody else can see the node yet, so there is no flag race to settle with a
    // `fetch_or`; linking publishes it.
    let raw = Arc::into_raw(BhNode::new(callback, PENDING | SCHEDULED | ONESHOT));
    // `raw` is alive: its only reference goes to the link made below, and we do not
    // touch the node afterwards.
    // SAFETY: justified in the comment just above.
    let node = unsafe { &*raw };
    shared.bhs.link(node);
    shared.notify_scheduled();
}
