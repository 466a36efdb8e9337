//! Driving a context from an outer loop (QEMU's `GSource` functions): [`AioContext::prepare`],
//! [`AioContext::outer_fds`], [`AioContext::check`] and [`AioContext::dispatch`], which use bit
//! 0 of `notify_me` instead of a blocking iteration's step.

use super::iteration::{DepthGuard, phase_span};
use super::wake::NOTIFY_ME_OUTER;
use super::{AioContext, CurrentGuard};
use crate::fdmon::OuterFd;
use crate::handler::NodeKind;
use crate::sync::{Ordering, fence};
use std::rc::Rc;
use std::time::Duration;

impl AioContext {
    /// First step of driving the context from an outer loop (QEMU's GSource `prepare`).
    ///
    /// Returns how long the outer loop may sleep (`None`: until an fd is ready). The outer loop
    /// then waits for the fds from [`outer_fds`](Self::outer_fds), calls
    /// [`check`](Self::check), and calls [`dispatch`](Self::dispatch) if `check` said so.
    /// Between `prepare` and `check`, a [`notify`](Self::notify) writes the eventfd, which is
    /// among the outer fds, so the outer loop wakes.
    pub fn prepare(&self) -> Option<Duration> {
        let inner = &*self.inner;
        inner.shared.set_window(true);
        let old = inner.shared.notify_me.load(Ordering::Relaxed);
        // Bit, not count: an outer loop need not pair every prepare with a check. Single
        // writer, so load + store; the fence pairs with `notify`'s as in `begin_blocking`.
        inner
            .shared
            .notify_me
            .store(old | NOTIFY_ME_OUTER, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if inner.shared.notified.load(Ordering::Relaxed) {
            return Some(Duration::ZERO);
        }
        // The outer loop may sleep: leave polling mode (an earlier `poll` may have entered it)
        // and keep what the last look finds for `dispatch`. An outer loop never busy-polls.
        // The callbacks this runs (`on_poll_end`, poll functions) see a nested context.
        {
            let _depth = DepthGuard::enter(&inner.depth);
            let mut hits = std::mem::take(&mut *inner.polling.outer_hits.borrow_mut());
            let found = inner.leave_poll_mode(&mut hits);
            // A handler removed by those callbacks is not kept for `dispatch` (`remove_node`
            // could not see this list, taken out). No borrow is held: this may drop the last
            // reference to a removed node.
            hits.retain(|n| !n.deleted.get());
            *inner.polling.outer_hits.borrow_mut() = hits;
            if found {
                return Some(Duration::ZERO);
            }
        }
        // A backend with work of its own that only its `wait` does (io_uring: changes made by
        // the callbacks just dispatched are queued, not yet submitted to the kernel) would
        // leave the outer loop asleep on fds the kernel does not watch yet. Ask it, as QEMU's
        // 2025 GSource `prepare` hook does, and let `check` run that wait.
        if inner.monitor.borrow().must_wait() == Some(true) {
            return Some(Duration::ZERO);
        }
        inner.compute_timeout()
    }

    /// The fds an outer loop must watch for this context (QEMU: the GSource's poll fds).
    pub fn outer_fds(&self, out: &mut Vec<OuterFd>) {
        self.inner.monitor.borrow().outer_fds(out);
    }

    /// Second step of driving the context from an outer loop (QEMU's GSource `check`): returns
    /// whether [`dispatch`](Self::dispatch) has work to do.
    pub fn check(&self) -> bool {
        let inner = &*self.inner;
        let shared = &*inner.shared;
        let old = shared.notify_me.load(Ordering::Relaxed);
        // Release: as in `end_blocking`.
        shared
            .notify_me
            .store(old & !NOTIFY_ME_OUTER, Ordering::Release);
        shared.set_window(false);
        shared.accept();
        let mut ready = std::mem::take(&mut *inner.outer_ready.borrow_mut());
        ready.clear();
        // A failure is counted and logged there; the outer loop sleeps on its own fds, so there
        // is nothing to back off from here, and `check` has no error to return.
        let _ = inner.wait(&mut ready, Some(Duration::ZERO));
        let mut fd_pending = false;
        for (key, _) in ready.iter() {
            let kind = inner.registry.borrow().get(key).map(|n| n.kind);
            match kind {
                Some(NodeKind::User) => fd_pending = true,
                Some(NodeKind::Notifier) => {
                    // Drain our own eventfd here: it is not work for `dispatch`, and an outer
                    // loop told "nothing pending" would otherwise find it readable forever and
                    // spin. Draining after `accept` loses nothing: a notify that lands in
                    // between leaves `notified` set, so the next `prepare` returns zero.
                    inner.event_drains.set(inner.event_drains.get() + 1);
                    shared.event.test_and_clear();
                }
                None => {}
            }
        }
        *inner.outer_ready.borrow_mut() = ready;
        fd_pending
            // Request completions the wait reaped (or an earlier one left): only `dispatch`
            // runs the completion sources, and `prepare` would not let the loop sleep meanwhile.
            || inner.monitor.borrow().has_completions()
            || shared.remote.is_pending()
            || inner.sync_external_pending()
            || !inner.polling.outer_hits.borrow().is_empty()
            || inner.compute_timeout() == Some(Duration::ZERO)
    }

    /// Last step of driving the context from an outer loop (QEMU `aio_dispatch`): runs BHs and
    /// the handlers `check` found ready. Returns whether a user callback ran.
    pub fn dispatch(&self) -> bool {
        let inner = &*self.inner;
        let _current = CurrentGuard::enter(Rc::as_ptr(&self.inner));
        // An iteration of its own: a `poll` from one of its callbacks is nested, and so never
        // busy-polls, as in `poll`.
        let _depth = DepthGuard::enter(&inner.depth);
        inner.apply_remote(self);
        let ready = std::mem::take(&mut *inner.outer_ready.borrow_mut());
        let epoch = inner.epoch.get() + 1;
        inner.epoch.set(epoch);
        inner.iterations.set(inner.iterations.get() + 1);
        let _span = phase_span(|| tracing::trace_span!("aio_outer_dispatch"));
        let mut progress = inner.bh_poll();
        progress |= self.run_completion_sources();
        progress |= self.dispatch_ready(&ready, epoch, None);
        let hits = std::mem::take(&mut *inner.polling.outer_hits.borrow_mut());
        progress |= self.dispatch_poll_hits(&hits, epoch, None);
        inner.recycle_hits(hits);
        {
            let mut slot = inner.outer_ready.borrow_mut();
            if slot.is_empty() {
                *slot = ready;
                slot.clear();
            }
        }
        progress |= inner.run_timers();
        progress
    }
}
