//! [`Shared`], the part of a context that any thread may touch, and the `notify_me`/`notified`
//! wake-up protocol that runs on it: `notify`, the home thread's blocking window, and
//! accepting a notification before dispatching.
//!
//! # The wake-up protocol (docs/qemu-semantics.md §2)
//!
//! `notify` (any thread): store `notified = true`, full fence, and write the eventfd only if
//! `notify_me` is non-zero. A blocking iteration: compute its timeout, add 2 to `notify_me`,
//! full fence, and re-read `notified`, using a zero timeout if it is set; after the wait, lower
//! `notify_me` with release ordering and *accept* (clear `notified` with an acquire RMW, no
//! fence: see `Shared::accept`) before dispatching anything. The two full fences (the
//! notifier's and the sleeper's) make a store-buffering (Dekker) pair: either the
//! notifier sees `notify_me != 0` and writes the eventfd, or the loop sees `notified` and does
//! not block. A notify to a loop that is not about to sleep therefore costs no system call.
//! The eventfd write is never conditioned on `notified` (QEMU's BUG2, modelled in
//! `tests/loom_notify.rs`).
//!
//! Both writes of `notified` are read-modify-writes (QEMU uses plain stores). Under the C++/Rust
//! memory model, which is weaker than the Linux kernel's that QEMU reasons in, a plain-store
//! accept can erase a notification without synchronizing with its notifier; the RMWs make the
//! accept synchronize with every notification it consumes. See `Shared::notify`.

use super::AioContext;
#[cfg(doc)]
use super::{ContextHandle, Inner};
use crate::bh::PendingBhs;
use crate::event_notifier::EventNotifier;
use crate::polling::SharedParams;
use crate::remote::{self, NoAnswer, RemoteOps, Reply};
use crate::sync::{
    AtomicBool, AtomicU32, AtomicU64, HomeThread, Mutex, Ordering, fence, signal_fence,
};
use std::fmt;
use timers::{Clocks, GroupHandle};

/// `notify_me` bit 0: an outer loop is between [`AioContext::prepare`] and
/// [`AioContext::check`] (QEMU's GSource bit).
pub(super) const NOTIFY_ME_OUTER: u32 = 1;
/// `notify_me` step for each `poll` in its wait phase.
pub(super) const NOTIFY_ME_POLL: u32 = 2;

/// The part of a context that any thread may touch.
pub(crate) struct Shared {
    /// Non-zero while the home thread may be blocked (or is about to block) without
    /// re-checking for work: bit 0 for an outer loop, +2 per blocking `poll`. Written only by
    /// the home thread (plain load + store), read by `notify` on any thread.
    pub(super) notify_me: AtomicU32,
    /// Set by every `notify`, cleared by the home thread before it dispatches.
    pub(super) notified: AtomicBool,
    /// The fd a sleeping loop is woken through.
    pub(super) event: EventNotifier,
    /// Pending bottom halves.
    pub(crate) bhs: PendingBhs,
    /// The home thread: fixed for an ordinary context, the lock holder for a shared one.
    pub(crate) home: HomeThread,
    /// True from the moment a blocking iteration starts computing its timeout until its wait
    /// is over (and between an outer loop's `prepare` and `check`). Written and read only by
    /// the home thread, signal handlers included; see `wake_for_work`.
    pub(super) window: AtomicBool,
    /// False once the loop side ([`Inner`]) is gone: nothing will ever run BHs again, so
    /// whoever schedules one frees it at once. Paired with the fence in `notify` (see there).
    pub(super) alive: AtomicBool,
    /// Which protocol to run: the real one, or a deliberately broken one for a loom model.
    #[cfg(aio_loom)]
    pub(super) variant: LoomVariant,
    /// How many times `notify` wrote the eventfd (a system call). Only counted on the write
    /// path, which already costs a system call, so counting is free where it matters.
    pub(super) event_writes: AtomicU64,
    /// The adaptive-polling parameters, settable from any thread.
    pub(super) poll_params: SharedParams,
    /// QEMU's `aio-max-batch` (0: each request engine's own default), settable from any thread.
    pub(super) max_batch: AtomicU32,
    /// A number no other context has: names this context in its home thread's table
    /// (`remote::with_home_context`).
    pub(super) id: u64,
    /// Operations other threads queued for the home thread (handler registrations, replacements
    /// and removals made through a [`ContextHandle`]).
    pub(crate) remote: RemoteOps,
    /// How many `disable_external` calls are in force, from any thread (QEMU
    /// `external_disable_cnt`, an atomic there too). The home thread reads it before
    /// dispatching an external handler and makes the monitor follow it (`Inner::sync_external`).
    pub(super) external_disabled: AtomicU32,
    /// Creates timers on the context's group from any thread. Taken out when the loop is
    /// dropped: the group's notify callback holds this `Shared`, so keeping the lists here
    /// would be a cycle.
    pub(super) timers: Mutex<Option<GroupHandle>>,
    /// The clocks the context's timers read, for reading them from any thread. No cycle: the
    /// clocks hold no timer list (a virtual clock knows its lists only weakly).
    pub(super) clocks: Clocks,
}

impl Shared {
    /// Runs `f` on the home thread with the context and returns its result: at once on the
    /// home thread itself, otherwise by queueing it, waking the loop and sleeping until the
    /// loop has run it (after its next wait, before it dispatches).
    ///
    /// # Errors
    ///
    /// [`NoAnswer::Gone`] if the loop is gone, or goes before running `f` (which is then
    /// dropped without running, on the thread that drops the loop); [`NoAnswer::Panicked`] if
    /// the loop's thread dropped `f` while panicking (a panic in `f` itself, or an unwinding
    /// that dropped the loop).
    pub(crate) fn run_on_home<R: Send + 'static>(
        &self,
        f: impl FnOnce(&AioContext) -> R + Send + 'static,
    ) -> Result<R, NoAnswer> {
        if self.home.is_current() {
            return remote::with_home_context(self.id, |ctx| {
                // What a handle creates belongs to the root scope, wherever it is used.
                let _root = ctx.inner.scopes.enter_remote();
                f(ctx)
            })
            .ok_or(NoAnswer::Gone);
        }
        let (reply, sender) = Reply::new();
        self.remote
            .push(Box::new(move |ctx: &AioContext| sender.send(f(ctx))))?;
        self.notify();
        reply.wait()
    }

    /// Runs `f` on the home thread with the context, without waiting for it: at once on the
    /// home thread, otherwise at the loop's next iteration. Dropped without running if the
    /// loop is gone.
    pub(crate) fn post(&self, f: impl FnOnce(&AioContext) + Send + 'static) {
        if self.home.is_current() {
            remote::with_home_context(self.id, |ctx| {
                let _root = ctx.inner.scopes.enter_remote();
                f(ctx);
            });
            return;
        }
        if self.remote.push(Box::new(f)).is_ok() {
            self.notify();
        }
    }

    /// Wakes the loop if it sleeps or is about to (QEMU `aio_notify`). Any thread.
    pub(crate) fn notify(&self) {
        #[cfg(aio_loom)]
        if self.variant == LoomVariant::ReturnEarlyIfNotified
            && self.notified.load(Ordering::Relaxed)
        {
            // Deliberately broken (loom only): QEMU's BUG2, "already notified, skip it".
            return;
        }
        // An RMW, not a plain store, so that every write of `notified` is part of one release
        // sequence: the home thread's acquire `swap` in `accept` then synchronizes with every
        // notify whose `true` it consumes, making that notifier's earlier writes (a BH push, a
        // request flag) visible to the dispatch that follows. With QEMU's plain store, the
        // accept's `false` could be ordered after our `true` without synchronizing with it,
        // erasing the notification while our push stayed invisible: the loom model
        // `plain_store_accept_loses_a_wakeup` shows that lost wake-up.
        let checked = self.loom_bug2_check();
        let already = self.notified.swap(true, Ordering::Release);
        // Full fence: orders the write above before the load of `notify_me` below. It pairs
        // with the fence in `begin_blocking` (raise notify_me; fence; load notified); SeqCst
        // fences are what forbid both sides reading the other's old value.
        fence(Ordering::SeqCst);
        if self.notify_me.load(Ordering::Relaxed) != 0 && !self.loom_bug2_skip(checked, already) {
            self.write_event();
        }
    }

    /// Loom only: `SkipEventWriteIfReadTrue` reads `notified` before setting it (false otherwise).
    #[cfg(aio_loom)]
    fn loom_bug2_check(&self) -> bool {
        self.variant == LoomVariant::SkipEventWriteIfReadTrue
            && self.notified.load(Ordering::Relaxed)
    }

    /// Loom only: whether a deliberately broken variant skips this eventfd write, given what
    /// `loom_bug2_check` read and what the `swap` of `notified` returned.
    #[cfg(aio_loom)]
    fn loom_bug2_skip(&self, checked: bool, already: bool) -> bool {
        match self.variant {
            LoomVariant::SkipEventWriteIfReadTrue => checked,
            LoomVariant::SkipEventWriteIfSwapTrue => already,
            _ => false,
        }
    }

    #[cfg(not(aio_loom))]
    #[inline(always)]
    fn loom_bug2_check(&self) -> bool {
        false
    }

    #[cfg(not(aio_loom))]
    #[inline(always)]
    fn loom_bug2_skip(&self, _checked: bool, _already: bool) -> bool {
        false
    }

    /// Notify after scheduling work (a BH, a handler change): as [`notify`](Self::notify), but
    /// free when called on the home thread outside a blocking window.
    ///
    /// There the loop is not asleep (we are running on its thread) and has not yet computed
    /// the timeout of its next wait, which it does after this call in program order, so it
    /// will see the work and not sleep: the notification would only make one later blocking
    /// iteration return early for nothing. Inside the window (a signal handler interrupting
    /// the home thread between computing the timeout and the fenced re-check, or in the wait)
    /// it is needed, and done. This is tokio's "no self-wake" (tokio#7570); QEMU always
    /// notifies. An explicit `notify()` keeps QEMU's semantics.
    ///
    /// Never frees anything, so a plain schedule stays async-signal-safe.
    pub(crate) fn wake_for_work(&self) {
        self.wake_after_link();
    }

    /// Notify after linking a BH whose link owns a reference (a delete, a one-shot): as
    /// [`wake_for_work`](Self::wake_for_work), and if the loop is gone, free what is
    /// linked. Otherwise nobody would: a deleted BH whose closure holds a `BottomHalf` of its
    /// own context would be a reference cycle through this `Shared`.
    pub(crate) fn notify_transferred(&self) {
        if !self.wake_after_link() {
            drop(self.bhs.take_remote());
        }
    }

    /// Wakes the loop after a BH was linked, if needed, and returns whether the loop still
    /// exists, as seen after the link.
    ///
    /// `notify`'s full fence orders the caller's push before the load of `alive` below;
    /// `Inner::drop` stores `alive = false` and fences before it drains the lists. So either
    /// that drain sees the push, or this load sees `false` and the caller drains. On the home
    /// thread no fence is needed: `alive` changes only there (`Inner::drop`), in program order.
    fn wake_after_link(&self) -> bool {
        if self.home.is_current() {
            if !self.alive.load(Ordering::Relaxed) {
                return false;
            }
            if !self.window.load(Ordering::Relaxed) {
                return true;
            }
        }
        self.notify();
        self.alive.load(Ordering::Relaxed)
    }

    /// Opens or closes the blocking window (home thread only).
    pub(super) fn set_window(&self, open: bool) {
        // Relaxed: only this thread (and its signal handlers) read it; the signal fence keeps
        // the compiler from moving it across the timeout computation or the wait.
        signal_fence();
        self.window.store(open, Ordering::Relaxed);
        signal_fence();
    }

    fn write_event(&self) {
        // Relaxed: a statistic; nothing is ordered by it.
        self.event_writes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.event.set() {
            // Only EBADF-like failures reach here (EAGAIN means "already set"); the loop would
            // then not wake, so say so loudly.
            tracing::error!("aio: cannot write the context's event notifier: {e}");
        }
    }

    /// Raises `notify_me` before a blocking wait and reports whether a notify has already
    /// arrived, in which case the wait must not block. Home thread only.
    pub(super) fn begin_blocking(&self, step: u32) -> bool {
        // Single writer (the home thread), so a load and a store stand in for an RMW.
        let old = self.notify_me.load(Ordering::Relaxed);
        self.notify_me.store(old + step, Ordering::Relaxed);
        // Full fence: pairs with the one in `notify` (see there).
        fence(Ordering::SeqCst);
        self.notified.load(Ordering::Relaxed)
    }

    /// Lowers `notify_me` after the wait. Home thread only.
    pub(super) fn end_blocking(&self, step: u32) {
        let old = self.notify_me.load(Ordering::Relaxed);
        // Release: the wait is finished before a notifier can see `notify_me == 0` and skip the
        // eventfd write (QEMU: "finish the poll before clearing").
        self.notify_me.store(old - step, Ordering::Release);
    }

    /// Consumes the pending notification before dispatching (QEMU `aio_notify_accept`). Home
    /// thread only.
    pub(super) fn accept(&self) {
        #[cfg(aio_loom)]
        if self.variant == LoomVariant::PlainStoreAccept {
            // Deliberately broken (loom only): QEMU's literal `notified = false`.
            self.notified.store(false, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            return;
        }
        // QEMU follows its clear with a full barrier; the C11 argument here needs none:
        //
        // * The clear is an acquire RMW, so it reads the latest `true` in modification order
        //   and, through the release sequence of RMWs (see `notify`), synchronizes with every
        //   notifier whose `true` it consumes: their BHs and flags are visible to the dispatch
        //   that follows.
        // * A notifier whose `true` comes later is not consumed: `notified` stays set, and the
        //   next blocking iteration's fenced re-check (`begin_blocking`) sees it and does not
        //   sleep.
        //
        // For the same reason a `false` read by the relaxed load lets us skip the RMW: a `true`
        // we miss is simply handled by the next iteration. Together this saves a locked
        // instruction and an `mfence` per iteration. The loom models check the argument (and
        // `plain_store_accept_loses_a_wakeup` shows what happens without the RMW).
        if self.notified.load(Ordering::Relaxed) {
            self.notified.swap(false, Ordering::Acquire);
        }
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("notify_me", &self.notify_me.load(Ordering::Relaxed))
            .field("notified", &self.notified.load(Ordering::Relaxed))
            .field("event", &self.event)
            .finish()
    }
}

/// Loom only: which variant of the wake-up protocol a context runs.
#[cfg(aio_loom)]
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoomVariant {
    /// The real protocol.
    Correct,
    /// QEMU's BUG2 against today's protocol: `notify` returns early when `notified` already
    /// reads true, skipping its RMW and the eventfd write.
    ReturnEarlyIfNotified,
    /// QEMU's accept written literally in C11 terms: a plain store of `false` and a fence.
    PlainStoreAccept,
    /// QEMU's BUG2 as its Promela model (`docs/spin/aio_notify_accept.promela`) defines it:
    /// `notify` reads `notified` first and, if it was already true, still sets it (our `swap`)
    /// but skips the eventfd write. Loses wake-ups: the read can be stale.
    SkipEventWriteIfReadTrue,
    /// The same optimisation decided by the `swap`'s result instead of a separate read: the
    /// eventfd write is skipped when the `swap` returned true. Harmless in this protocol (the
    /// notifier whose `true` came first does the write or is seen by the loop's re-check).
    SkipEventWriteIfSwapTrue,
}
