//! One loop iteration: [`AioContext::poll`] and its forms, and the order of the phases of
//! `run_iteration` (timeout, busy polling, the blocking window, the backend wait and its
//! back-off, accept, BH pass, completion sources, fd and poll-hit dispatch, timers). Also the
//! pieces those phases are made of on [`Inner`] (`compute_timeout`, `bh_poll`, `wait`,
//! `back_off`), the iteration depth and the trace spans of the phases.

#[cfg(doc)]
use super::Stats;
use super::wake::NOTIFY_ME_POLL;
use super::{AioContext, CurrentGuard, Inner};
use crate::bh::{self, BhTimeout, IDLE_BH_TIMEOUT};
use crate::fdmon::{Readiness, ReadyList};
use crate::handler::{HandlerNode, NodeKind};
use crate::sync::Ordering;
use crate::sys;
use std::cell::Cell;
use std::io;
use std::mem::ManuallyDrop;
use std::rc::Rc;
use std::time::Duration;

/// The back-off after the first of a run of failed backend waits; it doubles with each
/// consecutive failure, up to [`BACKOFF_MAX`]. See [`AioContext::poll`].
const BACKOFF_FIRST: Duration = Duration::from_millis(1);
/// The longest back-off: a backend whose wait keeps failing costs about ten wake-ups a second.
const BACKOFF_MAX: Duration = Duration::from_millis(100);

/// What an iteration does when the backend's wait fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnWaitError {
    /// Count and log it, back off (blocking iterations), and go on as if nothing were ready:
    /// [`AioContext::poll`].
    BackOff,
    /// Count and log it, and return it before dispatching anything: [`AioContext::try_poll`].
    Return,
}

/// Enters the span `make` builds, for a phase of an iteration, if trace level is on at all:
/// one load of `tracing`'s global level filter instead of a span per phase, which B1 measured
/// at 4 ns an iteration for three disabled spans.
#[inline]
pub(super) fn phase_span(make: impl FnOnce() -> tracing::Span) -> PhaseSpan {
    PhaseSpan(ManuallyDrop::new(
        tracing::level_enabled!(tracing::Level::TRACE).then(|| make().entered()),
    ))
}

/// A phase's span, if tracing was on when the phase began. Its drop is one test when there is
/// none: an `Option<EnteredSpan>`'s own drop glue is an out-of-line call, paid by every phase
/// of every iteration (B1 measured 30 instructions an iteration for it under callgrind).
pub(super) struct PhaseSpan(ManuallyDrop<Option<tracing::span::EnteredSpan>>);

impl Drop for PhaseSpan {
    #[inline]
    fn drop(&mut self) {
        if self.0.is_some() {
            exit_span(&mut self.0);
        }
    }
}

/// Exits and drops a phase's span, leaving `None` (which `ManuallyDrop` never drops, and which
/// holds nothing).
#[cold]
#[inline(never)]
fn exit_span(span: &mut Option<tracing::span::EnteredSpan>) {
    drop(span.take());
}

/// Decrements the iteration depth when an iteration ends, unwinding included.
pub(super) struct DepthGuard<'a>(&'a Cell<u32>);

impl<'a> DepthGuard<'a> {
    /// Enters an iteration; returns the guard and whether the iteration is nested.
    pub(super) fn enter(depth: &'a Cell<u32>) -> (DepthGuard<'a>, bool) {
        let d = depth.get();
        depth.set(d + 1);
        (DepthGuard(depth), d > 0)
    }
}

impl Drop for DepthGuard<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

impl Inner {
    fn next_ready_list(&self) -> ReadyList {
        self.spare_ready.borrow_mut().pop().unwrap_or_default()
    }

    fn recycle_ready_list(&self, mut list: ReadyList) {
        list.clear();
        self.spare_ready.borrow_mut().push(list);
    }

    /// Whether a completion source holds completions its next call runs
    /// ([`AioContext::add_completion_pending`]).
    fn completions_held(&self) -> bool {
        self.completion_pending.borrow().iter().any(|p| p())
    }

    /// The timeout the BHs, held completions and the timers allow (QEMU
    /// `aio_compute_timeout`).
    pub(super) fn compute_timeout(&self) -> Option<Duration> {
        // Held BHs count only once their scope may run (after it ended): until then they do
        // not shorten the wait.
        if self.held_bhs_ready() || self.completions_held() {
            return Some(Duration::ZERO);
        }
        let mut t = self.shared.bhs.timeout();
        if t != BhTimeout::Now {
            for slice in self.slices.borrow().iter() {
                t = match (t, slice.timeout()) {
                    (_, BhTimeout::Now) => BhTimeout::Now,
                    (BhTimeout::None, other) => other,
                    (keep, _) => keep,
                };
                if t == BhTimeout::Now {
                    break;
                }
            }
        }
        let bhs = match t {
            BhTimeout::Now => return Some(Duration::ZERO),
            BhTimeout::Idle => Some(IDLE_BH_TIMEOUT),
            BhTimeout::None => None,
        };
        // The earliest deadline of the enabled clocks, in nanoseconds: passed to the backend
        // unrounded (QEMU rounds up to milliseconds only for epoll_wait and glib).
        match (bhs, self.timers.deadline()) {
            (None, timer) => timer,
            (bhs, None) => bhs,
            (Some(a), Some(b)) => Some(a.min(b)),
        }
    }

    /// Runs one BH popped from a slice or the held queue, counting it for [`Stats`].
    fn dispatch_bh(&self, node: bh::NodePtr) -> bool {
        match bh::dispatch(node, &self.shared) {
            Some(progress) => {
                self.bh_calls.set(self.bh_calls.get() + 1);
                progress
            }
            None => false,
        }
    }

    /// Runs the timers that are due, counting them for [`Stats`].
    pub(super) fn run_timers(&self) -> bool {
        let _span = phase_span(|| tracing::trace_span!("aio_timers"));
        let ran = self.timers.run_expired_count();
        self.timer_calls.set(self.timer_calls.get() + ran);
        ran > 0
    }

    /// Runs the pending BHs (QEMU `aio_bh_poll`), draining outer slices first.
    pub(crate) fn bh_poll(&self) -> bool {
        let (remote, local) = self.shared.bhs.take();
        let held = self.held_bhs_ready();
        if remote.is_empty() && local.is_empty() && self.slices.borrow().is_empty() && !held {
            return false;
        }
        let _span = phase_span(|| tracing::trace_span!("aio_bh_pass"));
        let mut progress = false;
        {
            let mut slices = self.slices.borrow_mut();
            for slice in [remote, local] {
                if !slice.is_empty() {
                    slices.push_back(slice);
                }
            }
        }
        loop {
            // What a scope that ended held comes first, in its order, also when the scope
            // ended inside a callback of this pass. One at a time, so that a nested pass (or
            // the next one, after a panic) finds the rest still held.
            let held = self
                .held_bhs
                .borrow_mut()
                .take_first(|s| self.scopes.allows(s));
            if let Some(node) = held {
                progress |= self.dispatch_bh(node);
                continue;
            }
            // Hold the queue's borrow only while unlinking one node: its callback may poll
            // again, and the nested pass must see (and drain) what is left of ours.
            let node = {
                let mut slices = self.slices.borrow_mut();
                loop {
                    let Some(front) = slices.front_mut() else {
                        break None;
                    };
                    match front.pop() {
                        Some(node) => break Some(node),
                        None => drop(slices.pop_front()),
                    }
                }
            };
            let Some((node, scope)) = node else { break };
            if self.scopes.allows(scope) {
                progress |= self.dispatch_bh(node);
            } else {
                // An outer scope's BH: keep it pending, in order, until its scope may run.
                self.held_bhs.borrow_mut().push(node, scope);
            }
        }
        progress
    }

    /// Whether a held BH may run now.
    fn held_bhs_ready(&self) -> bool {
        self.held_bhs.borrow().any(|s| self.scopes.allows(s))
    }

    /// Runs the monitor's wait, counting it for [`Stats`]. A failure (the backend contract
    /// allows only non-`EINTR` errors here: `ENOMEM`, or `EPERM` from a seccomp filter) is
    /// counted, logged (the first of a run, then at each power of two) and returned with
    /// `ready` cleared; the caller decides between backing off and returning it.
    pub(super) fn wait(&self, ready: &mut ReadyList, timeout: Option<Duration>) -> io::Result<()> {
        self.waits.set(self.waits.get() + 1);
        // End the mutable borrow before logging, which borrows the monitor again for its name.
        let result = self.monitor.borrow_mut().wait(ready, timeout);
        let in_a_row = self.failed_waits.get();
        match result {
            Ok(_) => {
                if in_a_row > 0 {
                    self.failed_waits.set(0);
                    let backend = self.monitor.borrow().name();
                    tracing::info!(
                        "aio: {backend} backend wait works again after {in_a_row} failures"
                    );
                }
                Ok(())
            }
            Err(e) => {
                ready.clear();
                let in_a_row = in_a_row.saturating_add(1);
                self.failed_waits.set(in_a_row);
                self.wait_errors.set(self.wait_errors.get() + 1);
                if in_a_row.is_power_of_two() {
                    let backend = self.monitor.borrow().name();
                    tracing::warn!("aio: {backend} backend wait failed ({in_a_row} in a row): {e}");
                }
                Err(e)
            }
        }
    }

    /// After a failed wait, sleeps in place of the wait that did not happen, so that a backend
    /// whose wait keeps failing does not turn `poll` into a busy loop: [`BACKOFF_FIRST`],
    /// doubling with each consecutive failure up to [`BACKOFF_MAX`], never past `timeout` (a
    /// BH or timer that is due is not delayed). The sleep is a wait on the context's own
    /// eventfd, so a [`notify`](AioContext::notify) (a remote BH, a timer armed from another
    /// thread) still ends it. Called inside the blocking window, with `notify_me` raised.
    fn back_off(&self, timeout: Option<Duration>) {
        let in_a_row = self.failed_waits.get();
        if in_a_row == 0 {
            return;
        }
        let step = BACKOFF_FIRST
            .saturating_mul(1 << (in_a_row - 1).min(16))
            .min(BACKOFF_MAX);
        let sleep = timeout.map_or(step, |t| t.min(step));
        if sleep.is_zero() {
            return;
        }
        let shared = &*self.shared;
        // The failing backend never reports the eventfd, so nobody drains it: drain it here,
        // or a stale wake-up would end every back-off at once.
        if shared.event.test_and_clear() {
            self.event_drains.set(self.event_drains.get() + 1);
        }
        // A notify whose eventfd write we just drained set `notified` before writing. Relaxed:
        // this only decides whether to sleep; a `true` seen late costs one back-off step at
        // most, never a wake-up, because the iteration accepts and runs BHs after sleeping.
        if shared.notified.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = sys::wait_readable(shared.event.raw_fd(), sleep) {
            tracing::debug!("aio: back-off wait on the eventfd failed ({e}); sleeping instead");
            std::thread::sleep(sleep);
        }
    }
}

impl AioContext {
    /// Runs one loop iteration, sleeping until there is something to do (QEMU
    /// `aio_poll(ctx, true)`). Returns whether progress was made: whether a user callback ran.
    ///
    /// It sleeps until an fd handler is ready, a BH is scheduled or [`notify`](Self::notify)
    /// is called, and does not sleep at all if a BH is already scheduled. Being woken by a bare
    /// notify is not progress, so this returns false then. It may be called from inside any
    /// callback (a nested iteration), as QEMU's `AIO_WAIT_WHILE` does.
    ///
    /// # Backend failures
    ///
    /// A backend wait that fails (an error other than `EINTR`: `ENOMEM`, or `io_uring_enter`
    /// refused by a seccomp filter) is counted in [`Stats::wait_errors`], logged, and treated as
    /// a wait in which no fd was ready: BHs and timers still run. The iteration then backs off
    /// before dispatching: it sleeps 1 ms after the first failure of a run, doubling with each
    /// consecutive failure up to 100 ms, never past its own timeout, and a
    /// [`notify`](Self::notify) ends the sleep early. So a backend that keeps failing costs
    /// about ten wake-ups a second, not a core. Use [`try_poll`](Self::try_poll) to get the
    /// error instead.
    ///
    /// # Panics
    ///
    /// A panic in a callback propagates out of `poll`. The loop's state stays consistent: BHs
    /// that had not run yet in that pass stay scheduled and run in the next pass, the panicking
    /// callback stays registered, and the context can be polled again.
    pub fn poll(&self) -> bool {
        // `BackOff` never returns an error.
        self.run_iteration::<true>(OnWaitError::BackOff, None)
            .unwrap_or(false)
    }

    /// As [`poll`](Self::poll), but sleeping for at most `max`: one iteration that returns
    /// once a callback ran, once woken, or after `max` with nothing done (false), as calloop's
    /// `dispatch(Some(timeout))`. For a loop that must also do something on its own schedule,
    /// or give up waiting, without arming a timer or asking another thread for a wake-up.
    /// A zero `max` is [`poll_nonblocking`](Self::poll_nonblocking).
    pub fn poll_timeout(&self, max: Duration) -> bool {
        if max.is_zero() {
            return self.poll_nonblocking();
        }
        // `BackOff` never returns an error.
        self.run_iteration::<true>(OnWaitError::BackOff, Some(max))
            .unwrap_or(false)
    }

    /// As [`poll`](Self::poll), but a failing backend wait is returned, not logged away: the
    /// caller learns that the backend is broken and decides what to do.
    ///
    /// # Errors
    ///
    /// The error of the backend's wait. The iteration then stops right after the wait:
    /// nothing is dispatched (no BH, handler or timer runs; they run in a later iteration,
    /// which does not block if one is due), and there is no back-off. The failure is counted
    /// in [`Stats::wait_errors`] and logged, as for `poll`.
    pub fn try_poll(&self) -> io::Result<bool> {
        self.run_iteration::<true>(OnWaitError::Return, None)
    }

    /// As [`poll_nonblocking`](Self::poll_nonblocking), but a failing backend wait is returned
    /// as in [`try_poll`](Self::try_poll). An iteration that makes no wait (nothing for the
    /// backend to look at) cannot fail.
    ///
    /// # Errors
    ///
    /// As [`try_poll`](Self::try_poll).
    pub fn try_poll_nonblocking(&self) -> io::Result<bool> {
        self.run_iteration::<false>(OnWaitError::Return, None)
    }

    /// Runs one loop iteration without sleeping (QEMU `aio_poll(ctx, false)`). Returns whether
    /// a user callback ran.
    ///
    /// A context with no fd handler (only BHs and timers) makes no system call here at all.
    /// A non-blocking iteration never busy-polls, so with fd handlers it checks them with a
    /// zero-timeout backend wait.
    ///
    /// A failed backend wait is handled as in [`poll`](Self::poll), except that a non-blocking
    /// iteration never sleeps.
    pub fn poll_nonblocking(&self) -> bool {
        // `BackOff` never returns an error.
        self.run_iteration::<false>(OnWaitError::BackOff, None)
            .unwrap_or(false)
    }

    /// Runs one iteration, blocking or not: QEMU's `aio_poll` signature, for ports.
    pub fn aio_poll(&self, blocking: bool) -> bool {
        if blocking {
            self.poll()
        } else {
            self.poll_nonblocking()
        }
    }

    /// Calls every completion source once; whether any ran a callback.
    #[inline]
    pub(super) fn run_completion_sources(&self) -> bool {
        // Most contexts have none (blockio adds one): one test, no loop.
        if self.inner.completion_sources.borrow().is_empty() {
            return false;
        }
        self.run_completion_sources_now()
    }

    #[inline(never)]
    fn run_completion_sources_now(&self) -> bool {
        let mut progress = false;
        let mut i = 0;
        loop {
            // Cloned out of the list so that no borrow is held while it runs.
            let Some(source) = self.inner.completion_sources.borrow().get(i).cloned() else {
                break;
            };
            progress |= source(self);
            i += 1;
        }
        progress
    }

    /// One iteration; a blocking one sleeps for at most `cap` when given.
    fn run_iteration<const BLOCKING: bool>(
        &self,
        on_error: OnWaitError,
        cap: Option<Duration>,
    ) -> io::Result<bool> {
        let inner = &*self.inner;
        let _current = CurrentGuard::enter(Rc::as_ptr(&self.inner));
        let (_depth, nested) = DepthGuard::enter(&inner.depth);
        let shared = &*inner.shared;
        let params = inner.refresh_poll_params();
        // The block time that adapts the polling windows runs from here to the end of the
        // wait, polling included (QEMU measures it only while polling is enabled).
        let start = (!params.is_disabled()).then(|| inner.clock_ns());
        let epoch = inner.epoch.get() + 1;
        inner.epoch.set(epoch);
        inner.iterations.set(inner.iterations.get() + 1);
        let _span = phase_span(|| tracing::trace_span!("aio_poll", blocking = BLOCKING, nested));
        // What other threads asked for before this iteration, so that its wait already watches
        // a handler registered or an external fd re-enabled meanwhile (the queue is run again
        // after the wait, for what arrived during it).
        inner.apply_remote(self);

        if BLOCKING {
            shared.set_window(true);
        }
        let mut timeout = if BLOCKING {
            match (inner.compute_timeout(), cap) {
                (Some(t), Some(cap)) => Some(t.min(cap)),
                (t, None) => t,
                (None, cap) => cap,
            }
        } else {
            Some(Duration::ZERO)
        };
        // Busy-poll before sleeping, in outermost blocking iterations only: a non-blocking
        // iteration never polls (its timeout is zero), and a nested one never does either, so
        // that a poll-ready callback that polls the context again cannot recurse (QEMU's
        // test-nested-aio-poll).
        // The hit list is taken only by an iteration that polls, so that the non-blocking path
        // (B1) pays nothing for polling.
        let mut hits = None;
        let mut polled = 0;
        if !nested && timeout != Some(Duration::ZERO) && !params.is_disabled() {
            let _span = phase_span(|| tracing::trace_span!("aio_busy_poll"));
            let hits = hits.insert(inner.take_hits());
            polled = inner.try_poll_mode(&params, &mut timeout, hits);
        }
        let use_notify_me = timeout != Some(Duration::ZERO);
        if use_notify_me && shared.begin_blocking(NOTIFY_ME_POLL) {
            timeout = Some(Duration::ZERO);
        }
        // A ready list only for an iteration that waits. A zero-timeout iteration skips the
        // wait only if polling covered every user handler in this iteration (none of them
        // depends on the backend alone) and the backend has nothing of its own to reap: so a
        // handler without a poll function, or one not in the poll set, is never starved.
        let will_wait = timeout != Some(Duration::ZERO) || {
            let polling_disabled = polled != inner.registry.borrow().users();
            (inner.monitor.borrow().must_wait()).unwrap_or(polling_disabled)
        };
        // About to wait in the backend, or an iteration that did not poll (non-blocking,
        // nested): leave polling mode first, so that producers kick again, and look once more
        // for work that arrived meanwhile (QEMU `poll_set_started(false)`), whatever the
        // timeout: a member's work must reach either its poll function or its fd. Only an
        // iteration that polling served whole (it polled, and needs no wait) stays in
        // polling mode.
        if (will_wait || polled == 0)
            && inner.polling.started.get()
            && inner.leave_poll_mode(hits.get_or_insert_with(|| inner.take_hits()))
        {
            timeout = Some(Duration::ZERO);
        }
        let mut failed = None;
        let waited = if will_wait {
            let _span = phase_span(|| {
                tracing::trace_span!(
                    "aio_wait",
                    timeout_ns =
                        timeout.map_or(-1, |t| i64::try_from(t.as_nanos()).unwrap_or(i64::MAX))
                )
            });
            let mut ready = inner.next_ready_list();
            match inner.wait(&mut ready, timeout) {
                Ok(()) => Some(ready),
                Err(e) => {
                    inner.recycle_ready_list(ready);
                    match on_error {
                        // Inside the window, so that a notify ends the back-off.
                        OnWaitError::BackOff => inner.back_off(timeout),
                        OnWaitError::Return => failed = Some(e),
                    }
                    None
                }
            }
        } else {
            None
        };
        if use_notify_me {
            shared.end_blocking(NOTIFY_ME_POLL);
        }
        if BLOCKING {
            shared.set_window(false);
        }
        if let Some(e) = failed {
            if let Some(hits) = hits {
                inner.recycle_hits(hits);
            }
            // Before `accept`: a pending notification stays pending, so the next iteration
            // does not block while a BH it did not run here is due.
            return Err(e);
        }
        shared.accept();
        inner.apply_remote(self);
        let block_ns = start.map(|s| inner.clock_ns().saturating_sub(s));

        let mut progress = inner.bh_poll();
        progress |= self.run_completion_sources();
        if waited.is_some() || hits.is_some() {
            let _span = phase_span(|| tracing::trace_span!("aio_dispatch"));
            if let Some(ready) = waited {
                progress |= self.dispatch_ready(&ready, epoch, block_ns);
                inner.recycle_ready_list(ready);
            }
            if let Some(hits) = hits {
                progress |= self.dispatch_poll_hits(&hits, epoch, block_ns);
                inner.recycle_hits(hits);
            }
        }
        if block_ns.is_some() {
            inner.adjust_weighted(block_ns);
        }
        // Timers last, as QEMU's `aio_poll` runs them after the handlers.
        progress |= inner.run_timers();
        Ok(progress)
    }

    /// Dispatches the handlers in `ready` (QEMU `aio_dispatch_ready_handlers`).
    pub(super) fn dispatch_ready(
        &self,
        ready: &ReadyList,
        epoch: u64,
        block_ns: Option<u64>,
    ) -> bool {
        let mut progress = false;
        for (key, readiness) in ready.iter() {
            // Clone the node and release the table before calling anything: callbacks may add
            // or remove handlers. A stale key (removed or replaced since the wait) finds nothing.
            let node = match self.inner.registry.borrow().get(key) {
                Some(node) => node.clone(),
                None => continue,
            };
            // A report that a nested iteration made stale adjusts nothing: that iteration
            // dispatched the handler and adjusted its window.
            let stale = node.epoch.get() > epoch;
            progress |= self.dispatch_handler(&node, readiness, epoch);
            if !stale {
                self.inner.note_dispatched(&node, block_ns);
            }
        }
        progress
    }

    /// Dispatches what polling found (QEMU: nodes with `poll_ready`): the poll-ready callback,
    /// unless the fd was reported ready in this iteration too (fd readiness wins) or a nested
    /// iteration dispatched the handler since.
    pub(super) fn dispatch_poll_hits(
        &self,
        hits: &[Rc<HandlerNode>],
        epoch: u64,
        block_ns: Option<u64>,
    ) -> bool {
        let inner = &*self.inner;
        let mut progress = false;
        for node in hits {
            if node.epoch.get() >= epoch || node.deleted.get() {
                continue;
            }
            node.epoch.set(epoch);
            if node.kind == NodeKind::User && inner.may_dispatch(node) && node.call_poll_ready(self)
            {
                inner.handler_calls.set(inner.handler_calls.get() + 1);
                progress = true;
            }
            inner.note_dispatched(node, block_ns);
        }
        progress
    }

    fn dispatch_handler(&self, node: &Rc<HandlerNode>, readiness: Readiness, epoch: u64) -> bool {
        if node.epoch.get() > epoch {
            // A nested iteration dispatched this handler after our wait reported it; what we
            // saw is stale.
            return false;
        }
        node.epoch.set(epoch);
        let revents = readiness & Readiness::mask_for(node.interest);
        if node.kind == NodeKind::Notifier {
            if !revents.is_empty() {
                let inner = &*self.inner;
                inner.event_drains.set(inner.event_drains.get() + 1);
                inner.shared.event.test_and_clear();
                inner.join_poll_set(node);
            }
            return false;
        }
        if !self.inner.may_dispatch(node) {
            return false;
        }
        if node.remotely_removed() {
            // Removed from another thread, and the removal not applied yet: do it now rather
            // than keep reporting a level-triggered fd nobody will serve.
            self.inner.remove_node(node.key);
            return false;
        }
        if !revents.is_empty() {
            self.inner.join_poll_set(node);
        }
        let mut calls = 0;
        if !node.deleted.get()
            && revents.intersects(Readiness::READABLE | Readiness::HANGUP | Readiness::ERROR)
            && node.call_read(self)
        {
            calls += 1;
        }
        // Re-check: the read callback may have removed this handler.
        if !node.deleted.get()
            && revents.intersects(Readiness::WRITABLE | Readiness::ERROR)
            && node.call_write(self)
        {
            calls += 1;
        }
        let inner = &*self.inner;
        inner.handler_calls.set(inner.handler_calls.get() + calls);
        calls > 0
    }
}
