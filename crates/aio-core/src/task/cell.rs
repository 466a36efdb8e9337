//! One task, one allocation: the task cell (its header, its join state, its reference count
//! and its future in one `Box`), the waker made from it, and the counted handles on it (the
//! owner tokens, the join side, header references). This is the only file of the executor
//! with `unsafe`; the rules it keeps are [TASK-1]..[TASK-5] in ARCHITECTURE.md ("Tasks"), and
//! each `SAFETY` comment here cites the one it relies on.
//!
//! Why `unsafe`: a task's future may be `!Send` (`spawn_local`) while its wakers must be
//! `Send + Sync`, and its join handle `Send` when the output is. Safe Rust can only express
//! that with the future in an allocation of its own, the header (what wakers touch) in a second
//! and the join state in a third; one allocation instead of three, no reference count touched
//! per poll, and the count in the join state's word (so that a spawn counts its join handle
//! for free and dropping a joined handle is one atomic operation) is what the spawn benchmark
//! (B12) asks for.

use super::{JoinError, panic_message};
use crate::bh::BottomHalf;
use crate::context::ContextHandle;
use crate::sync::{AtomicU32, AtomicU64, Mutex, Ordering, StdArc as Arc, UnsafeCell, fence, lock};
use std::future::Future;
use std::mem::ManuallyDrop;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

/// Header flag: the task must be dropped instead of polled ([`JoinHandle::abort`]).
///
/// [`JoinHandle::abort`]: super::JoinHandle::abort
pub(super) const ABORT: u32 = 1;
/// Header flag: the future is `Send` and may move to another context (`reschedule`).
pub(super) const SENDABLE: u32 = 2;
/// Header flag: `reschedule` stored a target in `Sched::move_to` during the current poll
/// (set by the task's own poll, cleared by `run` or by a withdrawn `Reschedule`; it saves a
/// lock per poll).
pub(super) const MOVING: u32 = 4;

/// What wakers and join handles touch of a task: its flags and the BH that polls it on the
/// context where it lives. `Send + Sync` on its own.
pub(super) struct Header {
    pub(super) flags: AtomicU32,
    pub(super) sched: Mutex<Sched>,
}

#[derive(Default)]
pub(super) struct Sched {
    /// The BH that polls the task on its current context (its slot's); none while the task
    /// moves between contexts or once its context dropped it. A finished task keeps its
    /// slot's BH: a late wake-up then polls the slot's next task spuriously, which futures
    /// allow, and costs nothing on the common path.
    pub(super) bh: Option<Arc<BottomHalf>>,
    /// Set by `reschedule` while the task is being polled: where it goes when the poll
    /// returns `Pending`, and the id of that request (so that a `Reschedule` dropped later
    /// withdraws only its own request).
    pub(super) move_to: Option<(u64, ContextHandle)>,
    /// The id of the next move request.
    pub(super) next_move: u64,
}

impl Header {
    pub(super) fn has(&self, flag: u32) -> bool {
        // Acquire pairs with the Release in `abort`: whoever sees ABORT sees what the aborting
        // thread did before.
        self.flags.load(Ordering::Acquire) & flag != 0
    }

    /// Takes the task's BH out (the task moves, or its context drops it): later wake-ups do
    /// nothing until a new BH is installed.
    pub(super) fn take_bh(&self) -> Option<Arc<BottomHalf>> {
        lock(&self.sched).bh.take()
    }

    /// QEMU `aio_co_wake`: back onto the context where the task lives. The BH coalesces
    /// wake-ups and never polls the task inline, whichever thread this is.
    pub(super) fn wake(&self) {
        if let Some(bh) = &lock(&self.sched).bh {
            bh.schedule();
        }
    }
}

/// Join state bit: the task has finished and its result is in `Join::output` (set once, by
/// the task's thread).
const COMPLETE: u64 = 1;
/// Join state bit: the join handle exists (cleared once, when it is dropped).
const JOIN_INTEREST: u64 = 2;
/// Join state bit: `Join::waker` holds the waker of the task awaiting the handle.
const JOIN_WAKER: u64 = 4;
/// One reference to the cell, in the state word above the three bits ([TASK-2]).
const REF_ONE: u64 = 8;
/// A count no program reaches (2^56 references); past it, abort, as `Arc` does, rather than
/// wrap around to a use-after-free.
const MAX_REFS: u64 = 1 << 59;

/// What a task and its [`JoinHandle`](super::JoinHandle) share: a state word (three bits, and
/// the cell's reference count above them) and two cells whose access the bits arbitrate
/// ([TASK-5]). The task's thread is the *producer* (it writes the result once); the handle is
/// the *consumer*.
pub(super) struct Join<T> {
    state: AtomicU64,
    /// [TASK-5]: written by the producer before it sets COMPLETE; after that, taken by the
    /// consumer, or by the producer if its COMPLETE transition found JOIN_INTEREST clear.
    output: UnsafeCell<Option<Result<T, JoinError>>>,
    /// [TASK-5]: written by the consumer only while JOIN_WAKER and COMPLETE are both clear;
    /// leased to the producer if its COMPLETE transition found JOIN_WAKER set (it reads it,
    /// then clears the bit, and drops it if the handle is gone); after that, the consumer's.
    waker: UnsafeCell<Option<Waker>>,
}

/// Runs `f` (user code: a `Drop` or a waker), catching and logging a panic: the executor's
/// own bookkeeping around it must happen whatever the user code does.
fn catch_and_log(what: &str, f: impl FnOnce()) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(f)) {
        tracing::error!("{what} panicked: {}", panic_message(panic.as_ref()));
    }
}

impl<T> Join<T> {
    fn new() -> Self {
        Join {
            // Two references: the owner token's and the join handle's.
            state: AtomicU64::new(JOIN_INTEREST | (2 * REF_ONE)),
            output: UnsafeCell::new(None),
            waker: UnsafeCell::new(None),
        }
    }

    /// Producer: hands the task's result to its join handle, or drops it (on this thread)
    /// if the handle is gone, and wakes the handle's waker. Called at most once per task. A
    /// panic in the output's `Drop` or in the waker is caught and logged: the completion
    /// happens whatever user code does.
    fn complete(&self, result: Result<T, JoinError>) {
        // COMPLETE is clear (only this call sets it, once): the consumer does not look yet.
        // SAFETY: [TASK-5]: so this write of the output is the only access.
        self.output.with_mut(|p| unsafe { *p = Some(result) });
        // AcqRel: Release publishes the output to the consumer's Acquire; Acquire orders our
        // read of the waker after the consumer's write of it.
        let old = self.state.fetch_or(COMPLETE, Ordering::AcqRel);
        debug_assert_eq!(old & COMPLETE, 0, "a task completes once");
        if old & JOIN_INTEREST == 0 {
            // Detached: the result is ours again (and the handle took its waker with it).
            // The handle is gone, and it looked at the output only if it had seen COMPLETE.
            // SAFETY: [TASK-5]: so the output is ours again.
            let result = self.output.with_mut(|p| unsafe { (*p).take() });
            if let Some(Err(JoinError { panic: Some(p) })) = &result {
                tracing::error!("a detached task panicked: {}", panic_message(p.as_ref()));
            }
            catch_and_log("the output of a detached task", || drop(result));
            return;
        }
        if old & JOIN_WAKER == 0 {
            return;
        }
        catch_and_log("a join handle's waker", || {
            self.waker.with(|w| {
                // JOIN_WAKER was set when COMPLETE went up: the waker is leased to us until
                // we clear the bit, and the consumer only reads it meanwhile.
                // SAFETY: [TASK-5]: so this shared read races no write.
                if let Some(w) = unsafe { &*w } {
                    w.wake_by_ref();
                }
            });
        });
        // End the lease. AcqRel: Release orders our read before the consumer's drop of the
        // waker; Acquire, if the handle is gone, orders its last accesses before ours.
        let old = self.state.fetch_and(!JOIN_WAKER, Ordering::AcqRel);
        if old & JOIN_INTEREST == 0 {
            // The handle went while we held the lease, so the waker is ours to drop (a waker
            // that holds this very task would otherwise keep the cell alive for good).
            // SAFETY: [TASK-5]: the handle is gone and the lease was ours.
            let waker = self.waker.with_mut(|w| unsafe { (*w).take() });
            catch_and_log("a join handle's waker", || drop(waker));
        }
    }

    /// Consumer: the result, or `Pending` with `cx`'s waker registered. With the result, also
    /// whether the consumer dropped its waker (it had it back from the producer).
    pub(super) fn poll(&self, cx: &Context<'_>) -> Poll<(Result<T, JoinError>, bool)> {
        // Acquire pairs with the producer's AcqRel: seeing COMPLETE, we see the output.
        let mut state = self.state.load(Ordering::Acquire);
        if state & COMPLETE != 0 {
            return Poll::Ready(self.finish_poll(state));
        }
        if state & JOIN_WAKER != 0 {
            let same = self.waker.with(|w| {
                // SAFETY: [TASK-5]: while JOIN_WAKER is set, producer and consumer only read.
                let waker = unsafe { &*w };
                waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
            });
            if same {
                return Poll::Pending;
            }
            // Take the waker back before replacing it, unless the task completed meanwhile:
            // then the waker is leased to the producer, and JOIN_WAKER is its to clear.
            loop {
                if state & COMPLETE != 0 {
                    return Poll::Ready(self.finish_poll(state));
                }
                // AcqRel: Acquire, if COMPLETE is set, shows us the output.
                match self.state.compare_exchange_weak(
                    state,
                    state & !JOIN_WAKER,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => break,
                    Err(now) => state = now,
                }
            }
        }
        let waker = cx.waker().clone();
        // JOIN_WAKER and COMPLETE were both clear when we last looked, and only we set
        // JOIN_WAKER: a producer completing meanwhile saw it clear and leaves the waker alone.
        // SAFETY: [TASK-5]: so this write is the only access to the waker.
        let old_waker = self.waker.with_mut(|w| unsafe { (*w).replace(waker) });
        drop(old_waker);
        // AcqRel: Release publishes the waker to the producer's Acquire; Acquire, if the task
        // completed meanwhile, shows us the output.
        let old = self.state.fetch_or(JOIN_WAKER, Ordering::AcqRel);
        if old & COMPLETE != 0 {
            // It completed before the waker was up, so nobody wakes us and the producer never
            // leased the waker: clear the bit we just set, and the result is here.
            let now = self.state.fetch_and(!JOIN_WAKER, Ordering::AcqRel);
            return Poll::Ready(self.finish_poll(now & !JOIN_WAKER));
        }
        Poll::Pending
    }

    /// Consumer, having seen COMPLETE in `state`: takes the result, and drops the waker if the
    /// producer no longer leases it (JOIN_WAKER clear after COMPLETE stays clear). Returns
    /// whether it did.
    fn finish_poll(&self, state: u64) -> (Result<T, JoinError>, bool) {
        let result = self.take_output();
        if state & JOIN_WAKER != 0 {
            return (result, false);
        }
        // COMPLETE with JOIN_WAKER clear: the producer never had the lease, or ended it.
        // SAFETY: [TASK-5]: so the waker is ours alone.
        let waker = self.waker.with_mut(|w| unsafe { (*w).take() });
        drop(waker);
        (result, true)
    }

    /// Consumer: the result, after COMPLETE was seen.
    fn take_output(&self) -> Result<T, JoinError> {
        // COMPLETE was seen with Acquire: the producer is done with the output, and our
        // JOIN_INTEREST keeps it from taking it back.
        // SAFETY: [TASK-5]: so the output is ours alone.
        match self.output.with_mut(|p| unsafe { (*p).take() }) {
            Some(result) => result,
            None => panic!("JoinHandle polled after it returned its result"),
        }
    }

    /// Consumer: the handle is dropped; `done`: it returned the result and dropped its waker
    /// ([`Join::poll`] said so). Drops the result if it is still there (on this thread), and
    /// the waker if it is the consumer's, then gives up the handle's reference. Returns whether
    /// that was the last one: the caller then frees the cell.
    #[must_use]
    fn drop_handle(&self, done: bool) -> bool {
        if done {
            // Nothing left to take (the output and the waker are gone, and JOIN_WAKER stays
            // clear): one RMW clears the interest and gives up the reference. AcqRel: as in
            // `release`.
            let old = self
                .state
                .fetch_sub(JOIN_INTEREST + REF_ONE, Ordering::AcqRel);
            debug_assert!(old & JOIN_INTEREST != 0 && old & COMPLETE != 0);
            return old & !(REF_ONE - 1) == REF_ONE;
        }
        // Clear the interest, and JOIN_WAKER too unless the task completed (after COMPLETE it
        // marks the producer's lease, which only the producer ends).
        let mut state = self.state.load(Ordering::Relaxed);
        loop {
            let new = if state & COMPLETE != 0 {
                state & !JOIN_INTEREST
            } else {
                state & !(JOIN_INTEREST | JOIN_WAKER)
            };
            // AcqRel: Acquire, if COMPLETE is set, shows us the output; Release orders our
            // accesses before the producer's, which may now drop the output or the waker.
            match self
                .state
                .compare_exchange_weak(state, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => state = now,
            }
        }
        if state & COMPLETE != 0 {
            // SAFETY: [TASK-5]: completed while we were interested: the output is ours.
            let result = self.output.with_mut(|p| unsafe { (*p).take() });
            drop(result);
        }
        if state & COMPLETE == 0 || state & JOIN_WAKER == 0 {
            // [TASK-5]: not completed (we cleared JOIN_WAKER, so the producer will
            // never lease the waker), or completed with the lease over: the waker is ours.
            // SAFETY: [TASK-5] no lease is out, so the waker is ours to take.
            let waker = self.waker.with_mut(|w| unsafe { (*w).take() });
            drop(waker);
        }
        // Otherwise the producer holds the lease, and drops the waker when it ends it.
        self.release()
    }

    /// Takes one more reference to the cell ([TASK-2]).
    fn acquire(&self) {
        // Relaxed, as `Arc::clone`: a new reference is made from an existing one, which keeps
        // the cell alive meanwhile.
        let old = self.state.fetch_add(REF_ONE, Ordering::Relaxed);
        if old >= MAX_REFS {
            std::process::abort();
        }
    }

    /// Gives up one reference; returns whether it was the last, in which case the caller frees
    /// the cell ([TASK-2]).
    #[must_use]
    fn release(&self) -> bool {
        // Release, then Acquire on the last one, as `Arc::drop`: every use of the cell through
        // another reference happens before the free.
        let old = self.state.fetch_sub(REF_ONE, Ordering::Release);
        if old & !(REF_ONE - 1) != REF_ONE {
            return false;
        }
        fence(Ordering::Acquire);
        true
    }

    /// Whether the task has finished.
    pub(super) fn is_complete(&self) -> bool {
        self.state.load(Ordering::Acquire) & COMPLETE != 0
    }
}

/// The task: header, join state (with the reference count) and future in one `Box`
/// allocation, reached only through counted raw pointers ([TASK-2]).
struct Cell<F: Future> {
    header: Header,
    join: Join<F::Output>,
    /// [TASK-1]: touched only through the task's owner token, by the thread that holds it.
    /// [TASK-3]: pinned: never moved, dropped in place (set to `None`).
    future: std::cell::UnsafeCell<Option<F>>,
}

/// What the context's table sees of a task, whatever its future.
pub(super) trait Task {
    fn header(&self) -> &Header;

    /// Polls the future once, in place. On `Ready` (or a panic) the future has been dropped
    /// and the result handed to the join handle; a later call returns `Ready` at once.
    ///
    /// # Safety
    ///
    /// [TASK-1]: the caller holds the task's owner token (in its context's table slot), on
    /// that token's thread, and no other call of `poll` or `cancel` on this task is running.
    /// [TASK-2]: `this` is this task's address as the owner token holds it
    /// ([`Owned::as_ptr`]): the `Box`'s own pointer, which the wakers made from it free with
    /// `Box::from_raw` when they drop the last reference.
    unsafe fn poll(&self, this: *const ()) -> Poll<()>;

    /// Drops the future, if it is still there, and reports "cancelled" to the join handle.
    /// A panic in the future's `Drop` is caught and logged.
    ///
    /// # Safety
    ///
    /// As [`Task::poll`].
    unsafe fn cancel(&self);

    /// Takes one more reference ([TASK-2]).
    fn acquire(&self);

    /// Gives up a reference the caller owns; `true` if it was the last: the caller must then
    /// free the cell ([TASK-2]).
    #[must_use]
    fn release(&self) -> bool;
}

/// What a [`JoinHandle`](super::JoinHandle) sees of its task.
pub(super) trait JoinPart<T> {
    fn header(&self) -> &Header;
    fn join(&self) -> &Join<T>;
}

impl<F: Future + 'static> Cell<F> {
    /// The waker of a task: the cell's pointer and one reference; waking schedules the task's
    /// BH.
    const VTABLE: RawWakerVTable = RawWakerVTable::new(
        Self::clone_waker,
        Self::wake_waker,
        Self::wake_by_ref_waker,
        Self::drop_waker,
    );

    /// A new cell, as a raw pointer that owns its two first references (see `Join::new`).
    fn new(future: F, flags: u32, bh: Option<Arc<BottomHalf>>) -> NonNull<Self> {
        NonNull::from(Box::leak(Box::new(Cell {
            header: Header {
                flags: AtomicU32::new(flags),
                sched: Mutex::new(Sched {
                    bh,
                    move_to: None,
                    next_move: 0,
                }),
            },
            join: Join::new(),
            future: std::cell::UnsafeCell::new(Some(future)),
        })))
    }

    unsafe fn clone_waker(ptr: *const ()) -> RawWaker {
        // [TASK-2]: `ptr` is the cell's pointer, kept alive by this waker's reference
        // (or the owner's, while it polls).
        // SAFETY: [TASK-2] this waker's reference keeps the cell alive.
        let cell = unsafe { &*ptr.cast::<Self>() };
        cell.join.acquire();
        RawWaker::new(ptr, &Self::VTABLE)
    }

    unsafe fn wake_waker(ptr: *const ()) {
        // SAFETY: [TASK-2], as in `clone_waker`; this waker's reference is given up after.
        unsafe {
            Self::wake_by_ref_waker(ptr);
            Self::drop_waker(ptr);
        }
    }

    unsafe fn wake_by_ref_waker(ptr: *const ()) {
        // [TASK-2]: the waker's reference keeps the cell alive; only the header (which
        // is `Sync`) is touched, from whatever thread this is ([TASK-4]).
        // SAFETY: [TASK-2] the waker's reference keeps the cell alive; the header is `Sync`.
        let cell = unsafe { &*ptr.cast::<Self>() };
        cell.header.wake();
    }

    unsafe fn drop_waker(ptr: *const ()) {
        // SAFETY: [TASK-2]: the waker's reference keeps the cell alive until it is given up.
        let last = unsafe { &*ptr.cast::<Self>() }.join.release();
        if last {
            // [TASK-2]: that was the last reference, and `ptr` is the `Box`'s pointer;
            // the cell is freed on this thread: [TASK-4] says its future and output are gone.
            // SAFETY: [TASK-2] that was the last reference, and `ptr` is the `Box`'s pointer.
            drop(unsafe { Box::from_raw(ptr.cast::<Self>().cast_mut()) });
        }
    }
}

impl<F: Future + 'static> Task for Cell<F> {
    fn header(&self) -> &Header {
        &self.header
    }

    unsafe fn poll(&self, this: *const ()) -> Poll<()> {
        // [TASK-1]: the caller holds the owner token and no other access to the future
        // runs, so this is the only reference to it.
        // SAFETY: [TASK-1] the owner token's holder alone touches the future.
        let slot = unsafe { &mut *self.future.get() };
        let Some(future) = slot.as_mut() else {
            return Poll::Ready(());
        };
        // [TASK-3]: the future is never moved out of the cell, which never moves
        // (it is an `Arc`'s allocation); it is dropped in place below or by `cancel`.
        // SAFETY: [TASK-3] the future never moves out of the cell, which never moves.
        let future = unsafe { Pin::new_unchecked(future) };
        // A waker by reference, borrowing the owner's reference: nothing counted unless the future
        // clones it.
        debug_assert_eq!(this, std::ptr::from_ref(self).cast::<()>());
        let raw = RawWaker::new(this, &Self::VTABLE);
        // [TASK-2]: `this` is the cell's `Box` pointer, kept alive by the owner token's
        // reference for the whole poll; `ManuallyDrop` keeps this borrowed waker from giving up
        // a reference.
        // SAFETY: [TASK-2] the owner token keeps the cell alive.
        let waker = ManuallyDrop::new(unsafe { Waker::from_raw(raw) });
        let result = match catch_unwind(AssertUnwindSafe(|| {
            future.poll(&mut Context::from_waker(&waker))
        })) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(v)) => Ok(v),
            Err(panic) => Err(JoinError { panic: Some(panic) }),
        };
        // The future is dropped before the result is published, so whoever joins sees what
        // it owned released. A panic in its `Drop` is the task's panic too. (If the drop
        // unwinds, the assignment still stores `None`: the old value counts as dropped.)
        let dropped = catch_unwind(AssertUnwindSafe(|| *slot = None));
        let result = match (result, dropped) {
            (result, Ok(())) => result,
            (Ok(output), Err(panic)) => {
                // The output is not returned: drop it here, where a panic in its `Drop` must
                // not skip the completion.
                catch_and_log("the output of a task whose future's drop panicked", || {
                    drop(output);
                });
                Err(JoinError { panic: Some(panic) })
            }
            (Err(first), Err(second)) => {
                catch_and_log("the payload of a second panic", || drop(second));
                Err(first)
            }
        };
        self.join.complete(result);
        Poll::Ready(())
    }

    unsafe fn cancel(&self) {
        // SAFETY: [TASK-1], as in `poll`.
        let slot = unsafe { &mut *self.future.get() };
        if slot.is_none() {
            return;
        }
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| *slot = None)) {
            tracing::error!(
                "a task's future panicked while being dropped: {}",
                panic_message(panic.as_ref())
            );
        }
        self.join.complete(Err(JoinError { panic: None }));
    }

    fn acquire(&self) {
        self.join.acquire();
    }

    fn release(&self) -> bool {
        self.join.release()
    }
}

impl<F: Future + 'static> JoinPart<F::Output> for Cell<F> {
    fn header(&self) -> &Header {
        &self.header
    }

    fn join(&self) -> &Join<F::Output> {
        &self.join
    }
}

/// Frees a cell whose last reference the caller just gave up.
///
/// # Safety
///
/// [TASK-2]: `ptr` is a cell's `Box` pointer (as made by `new_local`/`new_send` and coerced),
/// and the reference the caller gave up was the last one.
unsafe fn free<T: ?Sized>(ptr: NonNull<T>) {
    // SAFETY: as the function's contract says.
    drop(unsafe { Box::from_raw(ptr.as_ptr()) });
}

/// The token that owns a task's future ([TASK-1]), and one reference to its cell: held by the
/// task's table slot, or by a one-shot BH carrying the task to another context
/// ([`SendOwned`]). Exactly one exists per task. Dropping it drops the future first, on the
/// dropping thread, and only then gives up its reference ([TASK-4]).
pub(super) struct Owned(NonNull<dyn Task>);

impl Owned {
    pub(super) fn task(&self) -> &dyn Task {
        // SAFETY: [TASK-2]: the token's reference keeps the cell alive.
        unsafe { self.0.as_ref() }
    }

    /// A counted handle on the task's header, for a `reschedule` request.
    pub(super) fn header_ref(&self) -> HeaderRef {
        self.task().acquire();
        HeaderRef(self.0)
    }

    /// The task's address, for a poll that must not hold the table's borrow (see `run`): the
    /// cell's `Box` pointer ([TASK-2]).
    pub(super) fn as_ptr(&self) -> *const dyn Task {
        self.0.as_ptr()
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        // [TASK-1]: this is the owner token, on its thread (`Owned` is not `Send`; a
        // `SendOwned` may be dropped anywhere, but its future is `Send`), and nothing polls
        // the task while its token is being dropped (a running slot is never freed, see
        // [TASK-1]'s transitions).
        // SAFETY: [TASK-1] the owner token, on its own thread, may cancel.
        unsafe { self.task().cancel() };
        if self.task().release() {
            // [TASK-2]: the token's reference was the last, and its pointer is the
            // cell's `Box` pointer.
            // SAFETY: [TASK-2] the token's reference was the last; its pointer is the `Box`'s.
            unsafe { free(self.0) };
        }
    }
}

/// The owner token of a task whose future and output are `Send`, so that it can move to
/// another context's thread (`ContextHandle::spawn`, `reschedule`).
pub(super) struct SendOwned(Owned);

// [TASK-1]: made only by `new_send`, whose bounds make the future and its output
// `Send`: everything the token gives access to may move to another thread.
// SAFETY: [TASK-1] `new_send` made the future and its output `Send`.
unsafe impl Send for SendOwned {}

impl SendOwned {
    pub(super) fn owned(&self) -> &Owned {
        &self.0
    }
}

/// A counted handle that touches only a task's header (`Send + Sync`), for a `reschedule`
/// request kept in a `Send` future.
pub(super) struct HeaderRef(NonNull<dyn Task>);

// [TASK-4]: a `HeaderRef` only reads the header, which is `Sync`, and dropping the last
// reference anywhere is allowed because the future and the output are gone by then.
// SAFETY: [TASK-4] only the `Sync` header is read; the future and output are gone.
unsafe impl Send for HeaderRef {}
// SAFETY: as for `Send`.
unsafe impl Sync for HeaderRef {}

impl HeaderRef {
    pub(super) fn header(&self) -> &Header {
        // SAFETY: [TASK-2]: this handle's reference keeps the cell alive.
        unsafe { self.0.as_ref() }.header()
    }
}

impl Drop for HeaderRef {
    fn drop(&mut self) {
        // SAFETY: [TASK-2]: this handle's reference keeps the cell alive until given up.
        if unsafe { self.0.as_ref() }.release() {
            // SAFETY: [TASK-2]: that was the last reference, and the pointer is the cell's.
            unsafe { free(self.0) };
        }
    }
}

/// The join side of a task: its handle's view, and one reference to the cell.
pub(super) struct JoinRef<T> {
    cell: NonNull<dyn JoinPart<T>>,
    /// The handle returned the result and dropped its waker ([`Join::poll`]).
    done: bool,
}

// The join side touches the header (`Sync`) and the join state, whose cells hold the output
// (which may cross threads when it is `Send`) and a waker (`Send`); the last reference dropped
// here frees a cell whose future is gone.
// SAFETY: [TASK-4]: everything the join side reaches may cross threads when `T: Send`.
unsafe impl<T: Send> Send for JoinRef<T> {}
// SAFETY: as for `Send`; through `&JoinRef` only the header and the state word are read.
unsafe impl<T: Send> Sync for JoinRef<T> {}

impl<T> JoinRef<T> {
    fn part(&self) -> &dyn JoinPart<T> {
        // SAFETY: [TASK-2]: the handle's reference keeps the cell alive.
        unsafe { self.cell.as_ref() }
    }

    pub(super) fn header(&self) -> &Header {
        self.part().header()
    }

    /// Whether the task has finished.
    pub(super) fn is_complete(&self) -> bool {
        self.part().join().is_complete()
    }

    /// The task's result, or `Pending` with `cx`'s waker registered.
    pub(super) fn poll(&mut self, cx: &Context<'_>) -> Poll<Result<T, JoinError>> {
        let (result, done) = std::task::ready!(self.part().join().poll(cx));
        self.done = done;
        Poll::Ready(result)
    }
}

impl<T> Drop for JoinRef<T> {
    fn drop(&mut self) {
        if self.part().join().drop_handle(self.done) {
            // The handle's reference was the last one.
            // SAFETY: [TASK-2]: last reference gone; the pointer is the cell's `Box` pointer.
            unsafe { free(self.cell) };
        }
    }
}

/// Makes a task for a future that stays on its context: its owner token (for the table) and
/// its join side. `bh`: the BH of the slot it will go to, if known.
pub(super) fn new_local<F>(future: F, bh: Option<Arc<BottomHalf>>) -> (Owned, JoinRef<F::Output>)
where
    F: Future + 'static,
    F::Output: 'static,
{
    let cell = Cell::new(future, 0, bh);
    // The cell starts with two references: one for each of these.
    let join: NonNull<dyn JoinPart<F::Output>> = cell;
    let owned: NonNull<dyn Task> = cell;
    (
        Owned(owned),
        JoinRef {
            cell: join,
            done: false,
        },
    )
}

/// Makes a task for a `Send` future, which may move between contexts.
pub(super) fn new_send<F>(future: F, bh: Option<Arc<BottomHalf>>) -> (SendOwned, JoinRef<F::Output>)
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let cell = Cell::new(future, SENDABLE, bh);
    // The cell starts with two references: one for each of these.
    let join: NonNull<dyn JoinPart<F::Output>> = cell;
    let owned: NonNull<dyn Task> = cell;
    (
        SendOwned(Owned(owned)),
        JoinRef {
            cell: join,
            done: false,
        },
    )
}
