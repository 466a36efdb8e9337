//! Bottom halves: callbacks that any thread can schedule, wait-free, to run once on the
//! context's next loop iteration. This file owns the BH node, its flag word and the transitions
//! on it, the two pending lists, what one pass does with one node, and who frees a node.
//!
//! C original: `util/async.c` (`aio_bh_enqueue`, `aio_bh_dequeue`, `aio_bh_poll`,
//! `aio_compute_bh_timeout`). Only scheduled or deleted BHs are linked anywhere, so an iteration
//! costs time in proportion to the BHs that were scheduled, never to the BHs that exist.
//!
//! # The state machine
//!
//! Each node has an atomic flag word ([`Flags`]: `PENDING`, `SCHEDULED`, `DELETED`, `ONESHOT`,
//! `IDLE`) and a home-thread state ([`Local`]: the callback is idle in the node, or out of it
//! and running further up the stack). Every change of the flag word is a method of
//! [`AtomicFlags`] that returns a `#[must_use]` value saying what the caller must do next:
//! link the node ([`Link::New`]), run it, or free it (a [`LinkRef`], the one strong reference a
//! link can own, whose `Drop` frees). So who links and who frees is decided in one place and
//! handed to the caller as a value, not recomputed from bits at each call site.
//!
//! ARCHITECTURE.md, "The BH state machine", has the full table: every state, who holds each
//! reference, and every transition. The SAFETY comments below cite its rows as `[BH-n]`.
//!
//! # Slices and nested polls
//!
//! Each BH pass pushes its slice at the back of the context's slice queue and always works on
//! the front one. A callback that polls the context again therefore first finishes the outer
//! pass's remaining BHs, then its own; when it returns, every slice is drained and the outer
//! pass ends. BHs scheduled during a pass go to the pending lists and run in the next pass.
//!
//! A nested pass that meets a node whose callback is running (it was scheduled again while it
//! runs) does not re-enter it and does not re-link it either: it *parks* it (`SCHEDULED`
//! without `PENDING`), and the running frame links it again when the callback returns. The
//! callback then runs once more, in a later pass. A nested blocking wait therefore sleeps
//! instead of spinning on a BH that cannot run until it returns.
//!
//! # Memory: who owns a node
//!
//! Nodes are `Arc` allocations, but the hot path touches no reference count:
//!
//! * A [`BottomHalf`] handle owns one reference while it lives. Scheduling through it links the
//!   node *without* a reference: the handle keeps it alive.
//! * Deleting (dropping the handle) *transfers* the handle's reference to the node's link, and
//!   a one-shot is created with its only reference owned by its link: a link carries a
//!   reference exactly when the node is `DELETED` or `ONESHOT`. A node with either flag is
//!   never linked again by anything but that transfer ([`AtomicFlags::reschedule`] refuses).
//! * The home thread takes a link's reference back as a [`LinkRef`] when it unlinks the node
//!   ([`AtomicFlags::take`]) and drops it, which frees the node, unless the node's callback is
//!   running further up the stack: then the reference goes into the running state
//!   ([`Local::Running`]) and the frame that runs the callback frees the node when it returns.
//!   While a callback runs, nothing else frees its node.
//! * Once the loop is gone, a thread that transferred a reference to a link (a delete or a
//!   one-shot) frees whatever is linked (see `Shared::wake_for_work`). A plain schedule never
//!   frees anything, which keeps it async-signal-safe.
//!
//! Pointers to nodes keep the provenance of the whole `Arc` allocation ([`NodePtr`], made by
//! `Arc::into_raw`), never that of a `&BhNode`: a reference would not cover the reference
//! counts that freeing writes. No `&BhNode` is ever held by a thread other than the home thread
//! across a point where the home thread may free the node.

use crate::context::Shared;
use crate::sync::{Arc, AtomicBool, AtomicPtr, AtomicU32, Ordering, UnsafeCell, signal_fence};
use std::fmt;
use std::ptr::{self, NonNull};
use std::time::Duration;

/// How long an idle BH may wait for the loop to wake up (QEMU: 10 ms).
pub(crate) const IDLE_BH_TIMEOUT: Duration = Duration::from_millis(10);

pub(crate) type Callback = Box<dyn FnMut(&RunningBh<'_>) + Send>;

/// A value of a node's flag word.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Flags(u32);

impl Flags {
    /// Linked on a list or slice, waiting for the home thread.
    const PENDING: Flags = Flags(1 << 0);
    /// The callback should run.
    pub(crate) const SCHEDULED: Flags = Flags(1 << 1);
    /// Free the node without running it; wins over `SCHEDULED`. The link owns a reference.
    const DELETED: Flags = Flags(1 << 2);
    /// Free the node after running it once. The link owns the only reference.
    const ONESHOT: Flags = Flags(1 << 3);
    /// Scheduled as idle: does not force a zero timeout and does not count as progress.
    pub(crate) const IDLE: Flags = Flags(1 << 4);

    const fn union(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }

    const fn has(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    const fn has_any(self, other: Flags) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether a link of a node with these flags owns a reference ([BH-3], [BH-4]).
    const fn link_owns_ref(self) -> bool {
        self.has_any(Flags::DELETED.union(Flags::ONESHOT))
    }

    /// Whether the callback should run: scheduled and not deleted.
    const fn runnable(self) -> bool {
        self.has(Flags::SCHEDULED) && !self.has(Flags::DELETED)
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, other: Flags) -> Flags {
        self.union(other)
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Flags::PENDING, "PENDING"),
            (Flags::SCHEDULED, "SCHEDULED"),
            (Flags::DELETED, "DELETED"),
            (Flags::ONESHOT, "ONESHOT"),
            (Flags::IDLE, "IDLE"),
        ];
        let mut list = f.debug_set();
        for (flag, name) in names {
            if self.has(flag) {
                list.entry(&format_args!("{name}"));
            }
        }
        list.finish()
    }
}

/// What a transition that may turn `PENDING` on asks of its caller.
#[must_use = "a node whose PENDING flag this call turned on must be linked"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// This call turned `PENDING` on: link the node now (and nobody else will).
    New,
    /// The node was already linked; the existing link covers this call.
    Joined,
}

/// What unlinking a node on the home thread found, and so what the caller must do.
#[must_use = "a taken node must be run, parked or freed"]
enum Taken {
    /// `DELETED`: never run it; the link's reference is now the caller's.
    Delete(LinkRef),
    /// Scheduled and not deleted: run the callback, then drop `oneshot` (a one-shot's only
    /// reference, which frees it).
    Run {
        idle: bool,
        oneshot: Option<LinkRef>,
    },
    /// Not scheduled (cancelled after it was linked): nothing to run. A one-shot cannot be
    /// cancelled, so there is no reference to drop.
    Cancelled,
    /// Scheduled while its callback is running further up the stack: left `SCHEDULED` without
    /// `PENDING`, for that frame to link again when the callback returns ([BH-6]).
    Parked,
}

/// A node's atomic flag word, and every transition of it.
struct AtomicFlags(AtomicU32);

impl AtomicFlags {
    fn new(flags: Flags) -> AtomicFlags {
        AtomicFlags(AtomicU32::new(flags.0))
    }

    fn load(&self, order: Ordering) -> Flags {
        Flags(self.0.load(order))
    }

    /// Sets `PENDING | add` ([BH-2] schedule, [BH-3] delete).
    ///
    /// AcqRel, both ways with the `fetch_and` of [`take`](Self::take): if we see `PENDING`
    /// clear, the home thread has finished reading `next`, so the caller may overwrite it; and
    /// our flags, with the writes before them, are visible to the pass that clears them.
    fn set_pending(&self, add: Flags) -> Link {
        let old = Flags(self.0.fetch_or((Flags::PENDING | add).0, Ordering::AcqRel));
        if old.has(Flags::PENDING) {
            Link::Joined
        } else {
            Link::New
        }
    }

    /// Sets `PENDING | add` unless the node is `DELETED` or `ONESHOT`, whose links must own a
    /// reference that the caller does not have to give ([BH-6]). `None`: refused, nothing
    /// changed. Orderings as in [`set_pending`](Self::set_pending).
    fn reschedule(&self, add: Flags) -> Option<Link> {
        let mut old = self.load(Ordering::Relaxed);
        loop {
            if old.link_owns_ref() {
                return None;
            }
            match self.0.compare_exchange_weak(
                old.0,
                (old | Flags::PENDING | add).0,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) if old.has(Flags::PENDING) => return Some(Link::Joined),
                Ok(_) => return Some(Link::New),
                Err(now) => old = Flags(now),
            }
        }
    }

    /// Links a parked node again ([BH-6]): if it is still `SCHEDULED` (nobody cancelled it),
    /// not linked, and not deleted. `None`: nothing to do. Orderings as in
    /// [`set_pending`](Self::set_pending).
    fn unpark(&self) -> Option<Link> {
        let mut old = self.load(Ordering::Relaxed);
        loop {
            if !old.has(Flags::SCHEDULED) || old.has_any(Flags::PENDING) || old.link_owns_ref() {
                return None;
            }
            match self.0.compare_exchange_weak(
                old.0,
                (old | Flags::PENDING).0,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(Link::New),
                Err(now) => old = Flags(now),
            }
        }
    }

    /// Clears `SCHEDULED` ([BH-2] cancel). Release pairs with the AcqRel `fetch_and` of the
    /// next [`take`](Self::take), which then sees the cancel.
    fn cancel(&self) {
        self.0.fetch_and(!Flags::SCHEDULED.0, Ordering::Release);
    }

    /// Clears the pending state of a node that the caller has just unlinked, and says what to
    /// do with it ([BH-5]). `running`: its callback is running further up the stack.
    ///
    /// Synchronizes with [`set_pending`](Self::set_pending) (see there). Clearing `PENDING`
    /// only after the unlink lets a concurrent schedule link the node again.
    ///
    /// # Safety
    ///
    /// `node` is the node these flags belong to, the caller has unlinked it from a list it owns
    /// (so a reference its link owned is now the caller's), and the node is alive.
    unsafe fn take(&self, node: NodePtr, running: bool) -> Taken {
        if running {
            // Keep SCHEDULED and IDLE: the running frame links the node again (`unpark`).
            let old = Flags(self.0.fetch_and(!Flags::PENDING.0, Ordering::AcqRel));
            debug_assert!(!old.has(Flags::ONESHOT), "a one-shot is never linked again");
            return if old.has(Flags::DELETED) {
                // [BH-5]: the link of a DELETED node owned a reference, and the caller
                // unlinked it.
                // SAFETY: so that reference is ours to adopt.
                Taken::Delete(unsafe { LinkRef::adopt(node) })
            } else {
                Taken::Parked
            };
        }
        let cleared = Flags::PENDING | Flags::SCHEDULED | Flags::IDLE;
        let old = Flags(self.0.fetch_and(!cleared.0, Ordering::AcqRel));
        if old.has(Flags::DELETED) {
            // SAFETY: as above.
            return Taken::Delete(unsafe { LinkRef::adopt(node) });
        }
        let oneshot = old.has(Flags::ONESHOT).then(|| {
            // SAFETY: [BH-4]: a one-shot's link owned its only reference; it is ours now.
            unsafe { LinkRef::adopt(node) }
        });
        if old.has(Flags::SCHEDULED) {
            Taken::Run {
                idle: old.has(Flags::IDLE),
                oneshot,
            }
        } else {
            debug_assert!(oneshot.is_none(), "a one-shot cannot be cancelled");
            drop(oneshot);
            Taken::Cancelled
        }
    }
}

/// A pointer to a node with the provenance of its whole `Arc` allocation: it comes from
/// `Arc::into_raw`, never from a `&BhNode`, so that a reference count can be given back through
/// it. It says nothing about who owns a reference; see the state table.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct NodePtr(NonNull<BhNode>);

impl NodePtr {
    /// Allocates a node. The returned pointer carries the allocation's one strong reference,
    /// which the caller places: in a handle ([BH-1]) or in a one-shot's link ([BH-4]).
    fn alloc(callback: Callback, flags: Flags, scope: u64) -> NodePtr {
        let arc = Arc::new(BhNode {
            flags: AtomicFlags::new(flags),
            scope,
            next: AtomicPtr::new(ptr::null_mut()),
            local: UnsafeCell::new(Local::Idle(callback)),
        });
        NodePtr(NonNull::new(Arc::into_raw(arc).cast_mut()).expect("Arc::into_raw is never null"))
    }

    /// The node, for one short access.
    ///
    /// # Safety
    ///
    /// The node must stay alive while the returned reference is used, and that use must not
    /// span a point where another thread may free it (the reference would be left dangling
    /// while still live, which Miri rightly rejects). Keep each use to one expression.
    unsafe fn get<'a>(self) -> &'a BhNode {
        // SAFETY: the caller keeps the node alive for 'a (above).
        unsafe { self.0.as_ref() }
    }

    fn as_raw(self) -> *mut BhNode {
        self.0.as_ptr()
    }

    fn from_raw(raw: *mut BhNode) -> Option<NodePtr> {
        NonNull::new(raw).map(NodePtr)
    }
}

/// One bottom half. Shared between its handle, the list that links it, and the home thread.
pub(crate) struct BhNode {
    flags: AtomicFlags,
    /// The isolation scope the BH belongs to (see `scope.rs`); set at creation, never changed.
    scope: u64,
    /// The next node on whatever list links this one. Written only by the thread that turned
    /// `PENDING` on (before it publishes the node) and read only by the home thread while the
    /// node is pending, so `Relaxed` suffices: the list head's release/acquire orders it.
    next: AtomicPtr<BhNode>,
    /// State only the home thread touches.
    ///
    /// # Invariant
    ///
    /// Only the home thread of the node's context accesses it, one access at a time (no
    /// reference to it is held across a callback or a drop of user state), except when the
    /// node is dropped, which is exclusive anyway.
    local: UnsafeCell<Local>,
}

/// The home thread's part of a node.
enum Local {
    /// The callback is in the node: the node may run.
    Idle(Callback),
    /// The callback is out of the node, running further up the home thread's stack, so a
    /// nested pass can neither run nor free the node.
    Running {
        /// The reference a nested pass took back from the link of this deleted node: the
        /// running frame drops it when the callback returns, which frees the node ([BH-7]).
        free_on_return: Option<LinkRef>,
    },
}

// `flags` and `next` are atomics. `local` holds a `Send` closure and, by its invariant, is
// only touched by the home thread of the node's context (or by `Drop`, exclusively), so
// sharing `&BhNode` between threads never lets two of them touch it.
// SAFETY: `&BhNode` reaches only atomics, and `local` only on the home thread.
unsafe impl Sync for BhNode {}
// As for `Sync`; the `LinkRef` that `Local::Running` may hold points to this very node and
// only the home thread touches it.
// SAFETY: as for `Sync`: only the home thread touches `local`, its `LinkRef` included.
unsafe impl Send for BhNode {}

impl BhNode {
    /// Runs `f` on the home-thread state. `f` must not run user code or drop user state (it
    /// returns whatever must be dropped), and must not call `with_local` again.
    fn with_local<R>(&self, f: impl FnOnce(&mut Local) -> R) -> R {
        // By the invariant of `local`, only the home thread calls this, and each call's `&mut`
        // ends before the next one starts: none is held across a callback or a drop.
        // SAFETY: so this `&mut` is the only live access to `local`.
        self.local.with_mut(|local| f(unsafe { &mut *local }))
    }

    fn is_running(&self) -> bool {
        self.with_local(|l| matches!(l, Local::Running { .. }))
    }
}

impl Drop for BhNode {
    fn drop(&mut self) {
        // A node is freed only when its callback is not running ([BH-7]): the running frame
        // takes `free_on_return` out before dropping it.
        debug_assert!(
            self.with_local(|l| matches!(l, Local::Idle(_))),
            "a BH node freed while its callback runs"
        );
    }
}

impl fmt::Debug for BhNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BhNode")
            .field("flags", &self.flags.load(Ordering::Relaxed))
            .finish()
    }
}

/// The one strong reference that a node's link owns while the node is `DELETED` or `ONESHOT`,
/// once taken back by the thread that unlinked it. Dropping it frees the node (and its
/// callback), so hold it only where nothing else uses the node.
pub(crate) struct LinkRef(NodePtr);

impl LinkRef {
    /// Takes ownership of a reference that a link owned.
    ///
    /// # Safety
    ///
    /// The caller must own that reference: it unlinked the node, and the node's flags said
    /// `DELETED` or `ONESHOT` when it cleared `PENDING` ([BH-5]).
    unsafe fn adopt(node: NodePtr) -> LinkRef {
        LinkRef(node)
    }
}

impl Drop for LinkRef {
    fn drop(&mut self) {
        // [BH-5]/[BH-7]: we own this reference (`adopt`), which came from `Arc::into_raw`
        // (`NodePtr::alloc`) with the allocation's provenance, and whoever drops us does not
        // use the node afterwards.
        // SAFETY: so giving the reference back to `Arc` and dropping it is the last use.
        drop(unsafe { Arc::from_raw(self.0.as_raw().cast_const()) });
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
    fn merge(self, flags: Flags) -> BhTimeout {
        if !flags.runnable() {
            self
        } else if flags.has(Flags::IDLE) {
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
    /// The successful CAS is the last access to the node: from then on the home thread may
    /// free it.
    fn push(&self, node: NodePtr) {
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            // [BH-2]/[BH-3]/[BH-4]: until the CAS below publishes it, the node is kept alive
            // by the caller (its handle, the reference it is transferring, or the running
            // frame), and only we write its `next`.
            // SAFETY: so it is alive for this one store.
            unsafe { node.get() }.next.store(head, Ordering::Relaxed);
            // Release publishes `next` and the flags to the home thread's `swap` in `take`.
            match self.head.compare_exchange_weak(
                head,
                node.as_raw(),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(current) => head = current,
            }
        }
    }

    /// Unlinks every pending node at once and returns them in scheduling order. The home thread
    /// calls it each pass; other threads only once the loop is gone (see `Shared`). Taking the
    /// whole list with one `swap` keeps concurrent takers disjoint.
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
        // Acquire pairs with the Release CAS in `push`, so the walk sees each node's `next`.
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
    /// whose dead-context path frees them.
    open: AtomicBool,
}

// `head` is only ever accessed by the home thread of the context that owns the list
// (invariant above), so sharing or sending the list between threads never lets two threads
// touch it; the nodes it links are themselves `Send + Sync`. Everything else is atomic.
// SAFETY: only the home thread touches `head`; the nodes are `Send + Sync`, the rest atomic.
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
    /// The home thread (see `Shared::home`; the two always name the same thread).
    pub(crate) home: crate::sync::HomeThread,
}

impl PendingBhs {
    pub(crate) fn new(home: u64) -> Self {
        PendingBhs {
            remote: BhList::new(),
            local: LocalList {
                head: UnsafeCell::new(ptr::null_mut()),
                busy: AtomicBool::new(false),
                open: AtomicBool::new(true),
            },
            home: crate::sync::HomeThread::new(home),
        }
    }

    /// Links a node whose PENDING flag the caller has just turned on ([`Link::New`]). Once
    /// linked, the node may be freed by the home thread at any time unless the caller keeps it
    /// alive otherwise: the caller must not touch it afterwards unless it does.
    fn link(&self, node: NodePtr) {
        if self.home.is_current() && self.local.open.load(Ordering::Relaxed) {
            let linked = self.local.with_head(|head| {
                // [BH-2]..[BH-4]: the caller keeps the node alive until it is linked, and on
                // the home thread nothing frees it before this function returns.
                // SAFETY: so it is alive for this one store.
                unsafe { node.get() }.next.store(*head, Ordering::Relaxed);
                *head = node.as_raw();
            });
            if linked.is_some() {
                return;
            }
        }
        self.remote.push(node);
    }

    /// Acts on what a transition asked: links the node if it turned `PENDING` on.
    fn apply(&self, node: NodePtr, link: Link) {
        match link {
            Link::New => self.link(node),
            Link::Joined => {}
        }
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
    while let Some(n) = NodePtr::from_raw(node) {
        // Only the home thread calls this, and while it exists only it unlinks nodes (other
        // threads take the list only once the loop is gone). [BH-2]..[BH-4]: a linked node is
        // alive (a handle or its link holds it) and stays linked for the whole walk. Pushers
        // only change the head, never a linked node's `next`.
        // SAFETY: so `n` is alive for these two loads.
        let n = unsafe { n.get() };
        timeout = timeout.merge(n.flags.load(Ordering::Relaxed));
        if timeout == BhTimeout::Now {
            break;
        }
        node = n.next.load(Ordering::Relaxed);
    }
    timeout
}

/// A private FIFO of BHs taken off a pending list by one BH pass (QEMU `BHListSlice`).
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
        while let Some(node) = NodePtr::from_raw(lifo) {
            // [BH-2]..[BH-4]: linked nodes are alive, and the caller unlinked the chain, so
            // this thread is the only one that reads or writes their `next` until PENDING is
            // cleared.
            // SAFETY: so `node` is alive and its `next` ours, for these two accesses.
            let n = unsafe { node.get() };
            let next = n.next.load(Ordering::Relaxed);
            n.next.store(fifo, Ordering::Relaxed);
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

    /// Unlinks the first node; returns it with its isolation scope.
    pub(crate) fn pop(&mut self) -> Option<(NodePtr, u64)> {
        let node = NodePtr::from_raw(self.head)?;
        // By the invariant the node is alive and owned by this slice; we read its `next` before
        // clearing PENDING, so no pusher can be writing it.
        // SAFETY: so the node is live and its `next` ours to read.
        let n = unsafe { node.get() };
        self.head = n.next.load(Ordering::Relaxed);
        Some((node, n.scope))
    }
}

/// Handles a node just popped from a slice on the home thread: clears its pending state, then
/// runs it, parks it, frees it, or both, as [`AtomicFlags::take`] says. Returns `None` if no
/// callback ran, else whether it counts as progress (a non-idle BH).
pub(crate) fn dispatch(node: NodePtr, shared: &Shared) -> Option<bool> {
    // [BH-5]: popped nodes are alive (slice invariant) and stay alive until a `LinkRef` we own
    // is dropped, which is the last thing done with the node in each arm below.
    // SAFETY: so the node is alive for this access, made on the home thread.
    let running = unsafe { node.get() }.is_running();
    // SAFETY: `node` came off a slice of ours (unlinked, alive), and these are its flags.
    let taken = unsafe { node.get().flags.take(node, running) };
    match taken {
        Taken::Delete(link_ref) => {
            if running {
                // The callback is on the stack above us (its handle was dropped while it ran,
                // then it polled): its frame frees the node when it returns ([BH-7]).
                // SAFETY: alive (we hold its last-but-one or last reference in `link_ref`).
                unsafe { node.get() }.with_local(|l| match l {
                    Local::Running { free_on_return } => {
                        debug_assert!(free_on_return.is_none(), "a node is deleted once");
                        *free_on_return = Some(link_ref);
                    }
                    Local::Idle(_) => unreachable!("`running` was read just above"),
                });
            } else {
                drop(link_ref); // [BH-5]: frees the node and its callback.
            }
            None
        }
        Taken::Cancelled | Taken::Parked => None,
        Taken::Run { idle, oneshot } => {
            invoke(node, shared);
            // [BH-4]: a one-shot's only reference; freeing it is the last use of the node.
            drop(oneshot);
            Some(!idle)
        }
    }
}

/// Runs a node's callback on the home thread, taking it out of the node while it runs
/// ([BH-7]). The node must not be running already (`dispatch` checked).
///
/// A panic in the callback unwinds through here; the callback is put back first, so the BH
/// stays usable (unless it was deleted meanwhile).
fn invoke(node: NodePtr, shared: &Shared) {
    /// The running frame: when the callback returns or unwinds, puts it back, links the node
    /// again if it was parked, and frees the node if a nested pass deleted it meanwhile.
    struct Frame<'a> {
        node: NodePtr,
        callback: Option<Callback>,
        shared: &'a Shared,
    }
    impl Drop for Frame<'_> {
        fn drop(&mut self) {
            let callback = self.callback.take().expect("the frame owns the callback");
            // [BH-7]: nothing frees a running node but this frame, so it is alive here.
            // SAFETY: so this access is to a live node, on the home thread.
            let node = unsafe { self.node.get() };
            let free = node.with_local(|l| match std::mem::replace(l, Local::Idle(callback)) {
                Local::Running { free_on_return } => free_on_return,
                Local::Idle(_) => unreachable!("the frame's node is running"),
            });
            match free {
                // Deleted while running: dropping the link's reference frees the node and its
                // callback; nothing touches the node after.
                Some(link_ref) => drop(link_ref),
                None => {
                    // [BH-6]: a nested pass parked it; `unpark` refuses if it was cancelled,
                    // deleted or linked again meanwhile.
                    if let Some(link) = node.flags.unpark() {
                        self.shared.bhs.apply(self.node, link);
                        self.shared.wake_for_work();
                    }
                }
            }
        }
    }
    // SAFETY: [BH-5]: alive (the dispatch frame keeps it), home thread.
    let callback = unsafe { node.get() }.with_local(|l| {
        match std::mem::replace(
            l,
            Local::Running {
                free_on_return: None,
            },
        ) {
            Local::Idle(callback) => callback,
            Local::Running { .. } => unreachable!("`dispatch` never invokes a running node"),
        }
    });
    let mut frame = Frame {
        node,
        callback: Some(callback),
        shared,
    };
    let running = RunningBh { node, shared };
    (frame.callback.as_mut().expect("just set"))(&running);
}

impl Drop for Slice {
    /// Releases the remaining nodes without running any callback (the context is going away;
    /// a pass abandoned by a panic does not come here: its slice stays queued in the context
    /// and the next pass finishes it).
    fn drop(&mut self) {
        while let Some((node, _)) = self.pop() {
            // Popped nodes are alive and ours (slice invariant); no callback runs any more (the
            // loop is gone, or this is another thread's dead-context drain).
            // SAFETY: so `take`'s contract holds, with `running` false.
            let taken = unsafe { node.get().flags.take(node, false) };
            // Dropped at once: a `LinkRef` frees its node, a node to run stops being pending.
            drop(taken);
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

/// The BHs that BH passes unlinked but could not run because they belong to a scope outside
/// the innermost isolation scope (see "Isolation scopes" in `ARCHITECTURE.md`), oldest first,
/// each with its scope.
///
/// # Invariant
///
/// As for [`Slice`]: every node on it is pending (its `PENDING` flag is still set, so a
/// schedule joins this "link" and a delete hands its reference to it), alive, and owned by the
/// home thread. Holding a node is holding a link: [`dispatch`] takes it when it leaves.
///
/// `allows` is monotonic (a scope `s` allowed means every scope above `s` is), so the highest
/// scope held (`max`, an upper bound refreshed by a scan that finds nothing) answers "is any
/// node allowed?" without a scan while a scope holds many nodes.
#[derive(Default)]
pub(crate) struct Held {
    nodes: std::collections::VecDeque<(NodePtr, u64)>,
    max: u64,
}

impl Held {
    /// Keeps a node just popped from a slice (so pending, alive and ours).
    pub(crate) fn push(&mut self, node: NodePtr, scope: u64) {
        self.max = if self.nodes.is_empty() {
            scope
        } else {
            self.max.max(scope)
        };
        self.nodes.push_back((node, scope));
    }

    /// Whether a node that `allows` lets run may be held (exact unless a `take_first` has
    /// removed the highest one since the last refresh: then it may say true wrongly, once).
    #[inline]
    pub(crate) fn any(&self, allows: impl Fn(u64) -> bool) -> bool {
        !self.nodes.is_empty() && allows(self.max)
    }

    /// Unlinks the oldest node that `allows` lets run, for [`dispatch`]; the others keep their
    /// order. Inline down to the emptiness check: every BH pass asks, and almost always
    /// nothing is held (B1 measured 38 instructions an iteration for the call).
    #[inline]
    pub(crate) fn take_first(&mut self, allows: impl Fn(u64) -> bool) -> Option<NodePtr> {
        if !self.any(&allows) {
            return None;
        }
        self.take_first_allowed(allows)
    }

    #[inline(never)]
    fn take_first_allowed(&mut self, allows: impl Fn(u64) -> bool) -> Option<NodePtr> {
        match self.nodes.iter().position(|&(_, scope)| allows(scope)) {
            Some(i) => self.nodes.remove(i).map(|(node, _)| node),
            None => {
                self.max = self.nodes.iter().map(|&(_, s)| s).max().unwrap_or(0);
                None
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }
}

impl Drop for Held {
    /// As [`Slice`]'s drop: the context is going away, nothing runs.
    fn drop(&mut self) {
        while let Some((node, _)) = self.nodes.pop_front() {
            // [BH-10]: held nodes are pending, alive and ours (the invariant above, as a
            // slice's), and no callback runs any more (the context is going away).
            // SAFETY: so `take`'s contract holds, with `running` false.
            let taken = unsafe { node.get().flags.take(node, false) };
            drop(taken);
        }
    }
}

impl fmt::Debug for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Held").field("len", &self.len()).finish()
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
/// own callback, or from another thread while the callback runs, is fine: the callback is freed
/// when it returns.
///
/// [`schedule`](Self::schedule) and [`schedule_idle`](Self::schedule_idle) are
/// async-signal-safe: they never allocate or free. Dropping the handle is not (once the
/// context is gone it frees the callback), nor is creating a BH or a one-shot.
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
    /// The node; the handle owns one strong reference to it ([BH-1]), which it gives to the
    /// node's link when it is dropped ([BH-3]).
    node: NodePtr,
    shared: Arc<Shared>,
}

// The handle owns a reference to a `Send + Sync` node (the `NodePtr` is what keeps the type
// from being `Send`/`Sync` automatically) and an `Arc<Shared>`; every operation through it
// is an atomic transition or a lock-free list push.
// SAFETY: the handle owns a `Send + Sync` node and an `Arc<Shared>`, and only acts atomically.
unsafe impl Send for BottomHalf {}
// As for `Send`: `&BottomHalf` allows only `schedule`, `schedule_idle`, `cancel` and
// `is_scheduled`, all atomic.
// SAFETY: as for `Send`: every operation `&BottomHalf` allows is atomic.
unsafe impl Sync for BottomHalf {}

impl BottomHalf {
    pub(crate) fn new(shared: Arc<Shared>, callback: Callback, scope: u64) -> BottomHalf {
        BottomHalf {
            node: NodePtr::alloc(callback, Flags(0), scope),
            shared,
        }
    }

    fn flags(&self) -> &AtomicFlags {
        // SAFETY: [BH-1]: the handle's reference keeps the node alive while `self` lives.
        &unsafe { self.node.get() }.flags
    }

    fn schedule_with(&self, add: Flags) {
        // [BH-2]: the handle's reference keeps the node alive, so the link needs none.
        let link = self.flags().set_pending(add);
        self.shared.bhs.apply(self.node, link);
        self.shared.wake_for_work();
    }

    /// Schedules the callback to run on the next loop iteration (QEMU `qemu_bh_schedule`).
    /// Callable from any thread, and from a signal handler; wakes the loop if it is asleep.
    pub fn schedule(&self) {
        self.schedule_with(Flags::SCHEDULED);
    }

    /// Schedules the callback as idle (QEMU `qemu_bh_schedule_idle`): it runs on the next
    /// iteration that happens anyway, and at the latest 10 ms from now; it does not count as
    /// progress.
    pub fn schedule_idle(&self) {
        self.schedule_with(Flags::SCHEDULED | Flags::IDLE);
    }

    /// Unschedules the callback (QEMU `qemu_bh_cancel`). The handle stays usable.
    ///
    /// Reliable only on the home thread (or otherwise serialized with the loop): from another
    /// thread it can lose the race with a pass that is already about to run the callback.
    pub fn cancel(&self) {
        self.flags().cancel();
    }

    /// Whether the callback is scheduled and has not run yet.
    pub fn is_scheduled(&self) -> bool {
        self.flags().load(Ordering::Acquire).runnable()
    }
}

impl Drop for BottomHalf {
    fn drop(&mut self) {
        // QEMU qemu_bh_delete: enqueue with DELETED and notify, so the loop frees the node and
        // its callback. [BH-3]: our reference goes to the node's link, whether this call links
        // it or it was linked already; after `set_pending` we touch the node only to link it,
        // which the transferred reference keeps alive until the link is published.
        let link = self.flags().set_pending(Flags::DELETED);
        self.shared.bhs.apply(self.node, link);
        self.shared.notify_transferred();
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
/// Made by [`AioContext::bh_with_self`](crate::AioContext::bh_with_self). It lives on the home
/// thread only (it is neither `Send` nor `Sync`).
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
    /// [BH-7]: alive while the callback that sees this runs.
    node: NodePtr,
    shared: &'a Shared,
}

impl RunningBh<'_> {
    /// Schedules this BH again; it runs in the next pass, not this one (if the callback polls
    /// the context before returning, after it returns). Does nothing for a one-shot BH, which
    /// runs once by definition, or for a BH whose handle was dropped.
    pub fn schedule(&self) {
        self.schedule_with(Flags::SCHEDULED);
    }

    /// Schedules this BH again as idle (see [`BottomHalf::schedule_idle`]).
    pub fn schedule_idle(&self) {
        self.schedule_with(Flags::SCHEDULED | Flags::IDLE);
    }

    fn schedule_with(&self, add: Flags) {
        // [BH-6]: without a handle we have no reference to give a link, so a deleted node or a
        // one-shot (whose links must own one) is never linked from here.
        // SAFETY: [BH-7]: alive while its callback runs.
        if let Some(link) = unsafe { self.node.get() }.flags.reschedule(add) {
            self.shared.bhs.apply(self.node, link);
            self.shared.wake_for_work();
        }
    }

    /// Unschedules this BH if something scheduled it again meanwhile.
    pub fn cancel(&self) {
        // SAFETY: [BH-7]: alive while its callback runs.
        unsafe { self.node.get() }.flags.cancel();
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
pub(crate) fn schedule_oneshot(shared: &Shared, callback: Callback, scope: u64) {
    // [BH-4]: born pending, its only reference going to the link made here (nobody else can
    // see the node yet, so there is no flag race to settle with a `fetch_or`).
    let node = NodePtr::alloc(
        callback,
        Flags::PENDING | Flags::SCHEDULED | Flags::ONESHOT,
        scope,
    );
    shared.bhs.link(node);
    shared.notify_transferred();
}

#[cfg(all(test, not(aio_loom)))]
mod tests {
    //! The flag-word transitions alone, on real nodes that no context owns.
    use super::*;

    fn node(flags: Flags) -> NodePtr {
        NodePtr::alloc(Box::new(|_| {}), flags, 0)
    }

    fn flags(node: NodePtr) -> &'static AtomicFlags {
        // SAFETY: test nodes are freed only by the `LinkRef` or `Arc` the test drops last.
        &unsafe { node.get() }.flags
    }

    /// Plays the home thread that has just unlinked `node`.
    fn take(node: NodePtr, running: bool) -> Taken {
        // Each test links a node only as its flags say and takes it once per link; a
        // `LinkRef` it gets back owns the allocation's reference and frees the node when the
        // test drops it, after its last use.
        // SAFETY: so `take`'s contract holds.
        unsafe { flags(node).take(node, running) }
    }

    /// Frees a test node through the reference `alloc` made.
    fn free(node: NodePtr) {
        // SAFETY: the test owns the allocation's reference and does not use the node after.
        drop(unsafe { LinkRef::adopt(node) });
    }

    #[test]
    fn only_the_first_schedule_links() {
        let n = node(Flags(0));
        assert_eq!(flags(n).set_pending(Flags::SCHEDULED), Link::New);
        assert_eq!(flags(n).set_pending(Flags::SCHEDULED), Link::Joined);
        assert_eq!(flags(n).set_pending(Flags::DELETED), Link::Joined);
        free(n);
    }

    #[test]
    fn a_deleted_node_or_a_oneshot_is_never_rescheduled() {
        for born in [Flags::DELETED, Flags::ONESHOT] {
            let n = node(born);
            assert_eq!(flags(n).reschedule(Flags::SCHEDULED), None);
            assert_eq!(flags(n).load(Ordering::Relaxed), born, "refused: unchanged");
            free(n);
        }
        let n = node(Flags(0));
        assert_eq!(flags(n).reschedule(Flags::SCHEDULED), Some(Link::New));
        assert_eq!(flags(n).reschedule(Flags::SCHEDULED), Some(Link::Joined));
        free(n);
    }

    #[test]
    fn take_says_who_frees() {
        // A deleted node: the link's reference comes back.
        let n = node(Flags::PENDING | Flags::SCHEDULED | Flags::DELETED);
        let taken = take(n, false);
        assert!(matches!(taken, Taken::Delete(_)));
        drop(taken);

        // A one-shot: run it, then free it.
        let n = node(Flags::PENDING | Flags::SCHEDULED | Flags::ONESHOT);
        let taken = take(n, false);
        assert!(matches!(
            taken,
            Taken::Run {
                idle: false,
                oneshot: Some(_)
            }
        ));
        drop(taken);

        // A live handle's node: run, nothing to free; idle is reported.
        let n = node(Flags::PENDING | Flags::SCHEDULED | Flags::IDLE);
        let taken = take(n, false);
        assert!(matches!(
            taken,
            Taken::Run {
                idle: true,
                oneshot: None
            }
        ));
        assert_eq!(flags(n).load(Ordering::Relaxed), Flags(0));

        // Cancelled after linking.
        assert_eq!(flags(n).set_pending(Flags::SCHEDULED), Link::New);
        flags(n).cancel();
        assert!(matches!(take(n, false), Taken::Cancelled));
        free(n);
    }

    #[test]
    fn a_running_node_is_parked_then_unparked_once() {
        let n = node(Flags(0));
        assert_eq!(
            flags(n).set_pending(Flags::SCHEDULED | Flags::IDLE),
            Link::New
        );
        assert!(matches!(take(n, true), Taken::Parked));
        assert_eq!(
            flags(n).load(Ordering::Relaxed),
            Flags::SCHEDULED | Flags::IDLE,
            "parked: scheduled, not pending"
        );
        assert_eq!(flags(n).unpark(), Some(Link::New));
        assert_eq!(flags(n).unpark(), None, "already linked");
        assert!(matches!(take(n, false), Taken::Run { .. }));

        // Cancelled while parked: stays unlinked.
        assert_eq!(flags(n).set_pending(Flags::SCHEDULED), Link::New);
        assert!(matches!(take(n, true), Taken::Parked));
        flags(n).cancel();
        assert_eq!(flags(n).unpark(), None);

        // Deleted while parked: stays unlinked (the delete links it, with its reference).
        assert_eq!(flags(n).set_pending(Flags::SCHEDULED), Link::New);
        assert!(matches!(take(n, true), Taken::Parked));
        assert_eq!(flags(n).set_pending(Flags::DELETED), Link::New);
        assert_eq!(flags(n).unpark(), None);
        let taken = take(n, true);
        assert!(matches!(taken, Taken::Delete(_)));
        drop(taken);
    }

    /// After the context is gone, only a thread that transferred a reference to a link (a
    /// delete, a one-shot) frees what is linked; a plain schedule, which may come from a signal
    /// handler, never frees anything ([BH-8]).
    #[test]
    fn after_the_context_is_gone_only_a_transfer_frees() {
        struct Drops(Arc<AtomicU32>);
        impl Drop for Drops {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let ctx = crate::AioContext::new(Box::new(crate::fdmon::NoFds)).unwrap();
        let drops = Arc::new(AtomicU32::new(0));
        let guard = Drops(drops.clone());
        // A node whose handle was just dropped, as a raw allocation: its one reference is the
        // one a delete transfers to the link.
        let deleted = NodePtr::alloc(
            Box::new(move |_| {
                let _keep = &guard;
            }),
            Flags(0),
            0,
        );
        let plain = ctx.bh(|| {});
        let shared = ctx.inner.shared.clone();
        drop(ctx);
        // Link it as a delete would, but without the delete's own drain: the state a delete
        // racing with the context's drop can leave.
        let link = flags(deleted).set_pending(Flags::DELETED);
        shared.bhs.apply(deleted, link);
        plain.schedule(); // what a signal handler may do: frees nothing
        shared.wake_for_work();
        assert_eq!(
            drops.load(Ordering::SeqCst),
            0,
            "a plain schedule freed memory"
        );
        shared.notify_transferred();
        assert_eq!(
            drops.load(Ordering::SeqCst),
            1,
            "a transfer drains the dead list"
        );
    }

    #[test]
    fn flags_debug_names_each_bit() {
        let f = Flags::PENDING | Flags::DELETED;
        assert_eq!(format!("{f:?}"), "{PENDING, DELETED}");
    }
}
