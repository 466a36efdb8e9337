//! Adaptive polling, home-thread side: the [`Polling`] state, the poll set (who joins and
//! leaves it), polling mode (`on_poll_begin`/`on_poll_end`), the busy-polling phase of an
//! iteration and the window updates after it.
//!
//! # Adaptive polling (docs/qemu-semantics.md §4.3)
//!
//! Home-thread state in `Polling`: the poll set (handlers that joined when dispatched by fd
//! readiness), whether the loop is in polling mode, the parameters in force. Other threads set
//! parameters through `Shared::poll_params` (one packed word and a generation) and notify; the
//! next iteration applies them. Busy polling happens before `notify_me` is raised, so a notify
//! during it costs no eventfd write: the polling loop reads `notified` as the context
//! notifier's poll function, and in every round whether or not the notifier is in the poll
//! set (a notify that wrote no eventfd cannot bring it in), so a remote BH or task wake-up
//! ends the phase at once. The window arithmetic lives in `polling.rs`.

use super::{Inner, Shared};
use crate::handler::{HandlerNode, NodeKind};
use crate::polling::{self, IDLE_INTERVAL_NS, PollParams, PollPolicy, Window};
use crate::sync::Ordering;
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};
use timers::ClockType;

/// Why a busy-polling phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PhaseEnd {
    /// A member's poll found work.
    Found,
    /// `notified` was set (a notify during the phase, which writes no eventfd).
    Notified,
    /// The window ran out.
    Window,
    /// The backend has something only its wait delivers (`must_wait`).
    Backend,
    /// A yield gave the CPU away for [`CONTENDED_YIELD`] or more.
    Contended,
}

/// A yield of a yielding busy loop ([`PollParams::yielding`]) that gives the CPU away for this
/// long or more tells that other threads want this CPU: it is a scheduler slice, not a client's
/// short turn. An event that arrives meanwhile waits for the slice to end, where a thread
/// blocked in the backend would have been woken for it at once. So the phase ends, and the
/// context stops busy-polling for a backoff: [`YIELD_BACKOFF_MIN`], doubled by each contended
/// yield up to [`YIELD_BACKOFF_MAX`], and back to the least as soon as a yield returns in less
/// (the CPU is free again; phases that find work before their first yield change nothing).
pub(crate) const CONTENDED_YIELD: Duration = Duration::from_micros(200);

/// The first backoff after a contended yield ([`CONTENDED_YIELD`]): short, since a lone one
/// may be a passing kernel thread.
pub(crate) const YIELD_BACKOFF_MIN: Duration = Duration::from_millis(10);

/// The longest backoff: while other work keeps the CPU busy, a contended yield (a slice, a few
/// ms) every 160 ms at most.
pub(crate) const YIELD_BACKOFF_MAX: Duration = Duration::from_millis(160);

/// The home thread's adaptive-polling state (docs/qemu-semantics.md §4.3).
#[derive(Default)]
pub(super) struct Polling {
    /// The parameters in force, and the generation of `Shared::poll_params` they came from.
    pub(super) params: Cell<PollParams>,
    pub(super) generation: Cell<u64>,
    /// The handlers that polling looks at (QEMU `poll_aio_handlers`): each joined when it was
    /// dispatched by fd readiness; removed ones are taken out at once.
    pub(super) set: RefCell<Vec<Rc<HandlerNode>>>,
    /// Whether the loop is in polling mode: `on_poll_begin` was called on the members and
    /// `on_poll_end` not yet (QEMU `poll_started`).
    pub(super) started: Cell<bool>,
    /// The context's window under [`PollPolicy::Weighted`], in ns.
    pub(super) weighted_ns: Cell<u64>,
    /// Poll hits found while an outer loop's `prepare` left polling mode, for its `dispatch`.
    pub(super) outer_hits: RefCell<Vec<Rc<HandlerNode>>>,
    /// Spare hit lists, so that iterations allocate nothing in steady state.
    pub(super) spare_hits: RefCell<Vec<Vec<Rc<HandlerNode>>>>,
    /// A spare list for [`Inner::members`].
    pub(super) spare_members: RefCell<Vec<Rc<HandlerNode>>>,
    /// Scratch for the weighted adjustment.
    pub(super) scratch: RefCell<Vec<Window>>,
    /// Statistics.
    pub(super) time_ns: Cell<u64>,
    pub(super) hits: Cell<u64>,
    pub(super) misses: Cell<u64>,
    /// Of the misses, the phases that the backend cut short (`must_wait`).
    pub(super) backend_ends: Cell<u64>,
    /// Of the misses, the phases that a contended yield ended ([`CONTENDED_YIELD`]).
    pub(super) contended: Cell<u64>,
    /// Until when a yielding context does not busy-poll, after a contended yield.
    pub(super) backoff_until: Cell<Option<Instant>>,
    /// The next backoff's length (0 meaning [`YIELD_BACKOFF_MIN`]).
    pub(super) backoff: Cell<Duration>,
}

impl Inner {
    /// Applies parameters set since the last iteration: every window goes back to 0 (QEMU
    /// `aio_context_set_poll_params`).
    pub(super) fn refresh_poll_params(&self) -> PollParams {
        let polling = &self.polling;
        let generation = self.shared.poll_params.generation();
        if generation != polling.generation.get() {
            polling.generation.set(generation);
            let params = self.shared.poll_params.get();
            polling.params.set(params);
            polling.weighted_ns.set(0);
            for node in polling.set.borrow().iter() {
                node.window.set(Window::default());
            }
            tracing::debug!(?params, "aio: polling parameters changed; windows reset");
        }
        polling.params.get()
    }

    /// How long the next blocking iteration may poll: the largest window of the poll set
    /// (Qemu10) or the context's window (Weighted); 0 when polling is disabled.
    pub(super) fn poll_window_ns(&self, params: &PollParams) -> u64 {
        if params.is_disabled() {
            return 0;
        }
        match params.get_policy() {
            PollPolicy::Weighted { .. } => self.polling.weighted_ns.get(),
            _ => self
                .polling
                .set
                .borrow()
                .iter()
                .map(|n| n.window.get().ns)
                .max()
                .unwrap_or(0),
        }
    }

    /// Calls `node`'s poll function, or for the context's notifier reads `notified`. `None`
    /// when the node is not polled now (removed, paused, external and disabled, or its poll
    /// function is already running) or has no poll function (it polls in the backend).
    fn poll_node(&self, node: &HandlerNode) -> Option<bool> {
        if node.deleted.get() || node.poll_paused.get() || node.polls_in_backend() {
            return None;
        }
        match node.kind {
            // Relaxed: a hint; `accept` (an acquire RMW) synchronizes before BHs run.
            NodeKind::Notifier => Some(self.shared.notified.load(Ordering::Relaxed)),
            NodeKind::User if !self.may_dispatch(node) => None,
            NodeKind::User => node.call_poll(),
        }
    }

    /// The time that adaptive polling measures block times and idle members on, in ns: the
    /// context's [`ClockType::Realtime`] (QEMU `QEMU_CLOCK_REALTIME`). A test that gives the
    /// context a manual realtime clock makes the adaptation deterministic.
    pub(super) fn clock_ns(&self) -> u64 {
        self.timers.now_ns(ClockType::Realtime)
    }

    /// One pass over the poll set (QEMU `run_poll_handlers_once`). Pushes the members that
    /// have work to `hits`; returns how many user members were polled.
    /// `members` is the set as the polling phase began ([`members`](Self::members)); one that
    /// left it since (removed by a callback) is skipped.
    fn poll_round(&self, members: &[Rc<HandlerNode>], hits: &mut Vec<Rc<HandlerNode>>) -> usize {
        let mut polled = 0;
        for node in members {
            if !node.in_poll_set.get() {
                continue;
            }
            let Some(found) = self.poll_node(node) else {
                continue;
            };
            if node.kind == NodeKind::User {
                polled += 1;
            }
            if found {
                node.idle_deadline
                    .set(Some(self.clock_ns().saturating_add(IDLE_INTERVAL_NS)));
                if !hits.iter().any(|h| Rc::ptr_eq(h, node)) {
                    hits.push(node.clone());
                }
            }
        }
        polled
    }

    /// The poll set as it is now, cloned, so that callbacks run over it may add or remove
    /// members (a removal shifts the set) without one being skipped. Hand it back with
    /// [`recycle_members`](Self::recycle_members).
    fn members(&self) -> Vec<Rc<HandlerNode>> {
        let mut v = std::mem::take(&mut *self.polling.spare_members.borrow_mut());
        v.extend(self.polling.set.borrow().iter().cloned());
        v
    }

    fn recycle_members(&self, mut v: Vec<Rc<HandlerNode>>) {
        // Clear with no borrow held: this may drop the last reference to a removed node.
        v.clear();
        *self.polling.spare_members.borrow_mut() = v;
    }

    /// Enters polling mode: `on_poll_begin` on every member (QEMU `poll_set_started(true)`).
    fn enter_poll_mode(&self) {
        if self.polling.started.replace(true) {
            return;
        }
        let members = self.members();
        for node in &members {
            // A member removed by an earlier `on_poll_begin` has left the set.
            if node.in_poll_set.get() && !node.deleted.get() {
                node.begin_poll_mode();
            }
        }
        self.recycle_members(members);
    }

    /// Leaves polling mode before a backend wait: `on_poll_end` on every member, then one more
    /// poll of each, so that work which arrived while kicks were suppressed is not slept
    /// through (QEMU `poll_set_started(false)`). The member whose poll-ready callback is
    /// running (this is then a nested iteration) gets `on_poll_end` too but is not polled
    /// (`poll_node` skips it). Pushes what it finds to `hits` and returns whether it found
    /// anything.
    pub(super) fn leave_poll_mode(&self, hits: &mut Vec<Rc<HandlerNode>>) -> bool {
        if !self.polling.started.replace(false) {
            return false;
        }
        let mut found = false;
        let members = self.members();
        for node in &members {
            node.end_poll_mode();
            if node.in_poll_set.get() && self.poll_node(node) == Some(true) {
                found = true;
                if !hits.iter().any(|h| Rc::ptr_eq(h, node)) {
                    hits.push(node.clone());
                }
            }
        }
        self.recycle_members(members);
        found
    }

    /// Takes `node` out of the poll set (removed, replaced): with `on_poll_end` if it is in
    /// polling mode; and out of the hits an outer loop's `prepare` keeps for its `dispatch`.
    /// Call with no borrow held.
    pub(super) fn leave_poll_set(&self, node: &Rc<HandlerNode>) {
        if node.in_poll_set.replace(false) {
            // Drops a clone only: the caller keeps a reference.
            self.polling
                .set
                .borrow_mut()
                .retain(|n| !Rc::ptr_eq(n, node));
            if self.polling.set.borrow().is_empty() {
                self.polling.weighted_ns.set(0);
            }
        }
        node.end_poll_mode();
        // Nor kept for an outer loop's `dispatch`, which may never come: the handler, its
        // callbacks and its fd go with the caller's reference. (A hit list taken out for a
        // callback run is filtered when it is put back; see `prepare`.) Drops a clone only.
        self.polling
            .outer_hits
            .borrow_mut()
            .retain(|n| !Rc::ptr_eq(n, node));
    }

    /// Busy-polls for up to the polling window, before a blocking wait (QEMU `try_poll_mode`
    /// and `run_poll_handlers`). Leaves early when a member has work or the backend has
    /// something to reap (`must_wait`). On a hit the timeout becomes zero; otherwise the time
    /// spent is taken off it, keeping the same deadline. Returns how many user members the last
    /// round polled.
    pub(super) fn try_poll_mode(
        &self,
        params: &PollParams,
        timeout: &mut Option<Duration>,
        hits: &mut Vec<Rc<HandlerNode>>,
    ) -> usize {
        let window = Duration::from_nanos(self.poll_window_ns(params));
        let window = timeout.map_or(window, |t| t.min(window));
        if window.is_zero() || self.backing_off(params) || !self.ready_to_poll() {
            return 0;
        }
        self.enter_poll_mode();
        // The busy loop is bounded in real time, whatever clock the context reads: a stopped
        // manual clock cannot make it spin.
        let start = Instant::now();
        // One snapshot for the whole phase: no borrow or clone per member per round.
        let members = self.members();
        let (polled, elapsed, end) = loop {
            let polled = self.poll_round(&members, hits);
            let elapsed = start.elapsed();
            if !hits.is_empty() {
                break (polled, elapsed, PhaseEnd::Found);
            }
            // Relaxed: a hint, as the notifier's own poll; the iteration's `begin_blocking`
            // reads it again with the fence that orders it.
            if self.shared.notified.load(Ordering::Relaxed) {
                break (polled, elapsed, PhaseEnd::Notified);
            }
            if elapsed >= window {
                break (polled, elapsed, PhaseEnd::Window);
            }
            if self.backend_must_wait() {
                break (polled, elapsed, PhaseEnd::Backend);
            }
            if params.is_yielding() {
                // `elapsed` was read just before: the yield starts at `start + elapsed`.
                std::thread::yield_now();
                let after = Instant::now();
                let backoff = &self.polling.backoff;
                if after.duration_since(start).saturating_sub(elapsed) >= CONTENDED_YIELD {
                    let length = backoff.get().max(YIELD_BACKOFF_MIN);
                    self.polling.backoff_until.set(Some(after + length));
                    backoff.set((length * 2).min(YIELD_BACKOFF_MAX));
                    break (polled, after.duration_since(start), PhaseEnd::Contended);
                }
                backoff.set(Duration::ZERO);
            }
        };
        self.recycle_members(members);
        self.remove_idle_members(self.clock_ns(), hits);
        let polling = &self.polling;
        polling
            .time_ns
            .set(polling.time_ns.get() + elapsed.as_nanos() as u64);
        if end == PhaseEnd::Notified {
            // Work for this iteration's BH pass (a remote schedule): no sleep.
            polling.hits.set(polling.hits.get() + 1);
            *timeout = Some(Duration::ZERO);
        } else if hits.is_empty() {
            polling.misses.set(polling.misses.get() + 1);
            if end == PhaseEnd::Backend {
                polling.backend_ends.set(polling.backend_ends.get() + 1);
            }
            if end == PhaseEnd::Contended {
                polling.contended.set(polling.contended.get() + 1);
            }
            *timeout = timeout.map(|t| t.saturating_sub(elapsed));
        } else {
            polling.hits.set(polling.hits.get() + 1);
            *timeout = Some(Duration::ZERO);
        }
        polled
    }

    /// Whether a yielding context is in the backoff that a contended yield started
    /// ([`CONTENDED_YIELD`]); the backoff ends once its time is up, or when the loop stops
    /// yielding.
    fn backing_off(&self, params: &PollParams) -> bool {
        let Some(until) = self.polling.backoff_until.get() else {
            return false;
        };
        if params.is_yielding() && Instant::now() < until {
            return true;
        }
        self.polling.backoff_until.set(None);
        false
    }

    /// Whether the backend shows fd readiness in userspace (`must_wait` is `Some`), so that a
    /// member without a poll function ([`HandlerNode::polls_in_backend`]) ends a polling phase
    /// when its fd is ready. False should the monitor be borrowed (no caller does that).
    fn backend_shows_readiness(&self) -> bool {
        self.monitor
            .try_borrow()
            .is_ok_and(|m| m.must_wait().is_some())
    }

    /// Whether the backend knows it has something only its wait delivers (`must_wait` is
    /// `Some(true)`); a backend that cannot tell leaves the loop free to poll.
    fn backend_must_wait(&self) -> bool {
        self.monitor.borrow().must_wait() == Some(true)
    }

    /// Whether the backend lets the loop busy-poll now: it has nothing only its wait delivers,
    /// at once or after it submitted what it had queued (io_uring's re-arms after a dispatch).
    fn ready_to_poll(&self) -> bool {
        if !self.backend_must_wait() {
            return true;
        }
        let prepared = self.monitor.borrow_mut().prepare_polling();
        if let Err(e) = prepared {
            tracing::debug!("aio: the backend could not prepare for polling ({e}); waiting");
            return false;
        }
        !self.backend_must_wait()
    }

    /// Takes out of the poll set the members that polling has not found ready for
    /// [`IDLE_INTERVAL_NS`] (QEMU `remove_idle_poll_handlers`). Such a handler is still watched
    /// by the backend, and every zero-timeout iteration then waits for it, so leaving is safe
    /// on every backend. In polling mode it gets `on_poll_end` and one last poll.
    fn remove_idle_members(&self, now: u64, hits: &mut Vec<Rc<HandlerNode>>) {
        let mut idle = Vec::new();
        for node in self.polling.set.borrow().iter() {
            match node.idle_deadline.get() {
                None => node
                    .idle_deadline
                    .set(Some(now.saturating_add(IDLE_INTERVAL_NS))),
                Some(deadline) if now >= deadline && !node.poll_paused.get() => {
                    idle.push(node.clone());
                }
                Some(_) => {}
            }
        }
        if idle.is_empty() {
            return;
        }
        self.polling
            .set
            .borrow_mut()
            .retain(|n| !idle.iter().any(|i| Rc::ptr_eq(i, n)));
        for node in idle {
            node.in_poll_set.set(false);
            node.idle_deadline.set(None);
            node.window.set(Window::default());
            tracing::debug!(
                fd = node.fd,
                "aio: handler idle for 7 s leaves the poll set"
            );
            if self.polling.started.get() && !node.deleted.get() {
                node.end_poll_mode();
                if self.poll_node(&node) == Some(true) && !hits.iter().any(|h| Rc::ptr_eq(h, &node))
                {
                    hits.push(node);
                }
            }
        }
    }

    /// A handler dispatched because its fd was ready joins the poll set, if it can be polled
    /// ("activity is likely to continue").
    pub(super) fn join_poll_set(&self, node: &Rc<HandlerNode>) {
        if node.deleted.get() {
            return;
        }
        if node.in_poll_set.get() {
            if node.polls_in_backend() {
                // Dispatched from readiness: the member is active, as a poll hit says for a
                // member with a poll function; the next polling phase restarts its 7 s.
                node.idle_deadline.set(None);
            }
            return;
        }
        let joins = node.can_poll() || (node.polls_in_backend() && self.backend_shows_readiness());
        if !joins {
            return;
        }
        node.in_poll_set.set(true);
        node.idle_deadline.set(None);
        self.polling.set.borrow_mut().push(node.clone());
        tracing::debug!(fd = node.fd, "aio: handler joins the poll set");
        if self.polling.started.get() {
            node.begin_poll_mode();
        }
    }

    /// After dispatching a member: adjusts its window from the iteration's block time
    /// (Qemu10), or marks that it had an event (Weighted).
    pub(super) fn note_dispatched(&self, node: &HandlerNode, block_ns: Option<u64>) {
        let Some(block_ns) = block_ns else { return };
        if !node.in_poll_set.get() {
            return;
        }
        let params = self.polling.params.get();
        let mut w = node.window.get();
        match params.get_policy() {
            PollPolicy::Weighted { .. } => w.has_event = true,
            _ => {
                if let Some((old, new)) = polling::adjust_qemu10(&params, &mut w.ns, block_ns) {
                    tracing::debug!(
                        fd = node.fd,
                        old,
                        new,
                        block_ns,
                        "aio: poll window adjusted"
                    );
                }
            }
        }
        node.window.set(w);
    }

    /// Weighted: updates every member's estimate and the context window once per iteration.
    pub(super) fn adjust_weighted(&self, block_ns: Option<u64>) {
        let Some(block_ns) = block_ns else { return };
        let params = self.polling.params.get();
        if !matches!(params.get_policy(), PollPolicy::Weighted { .. }) {
            return;
        }
        let set = self.polling.set.borrow();
        let mut scratch = self.polling.scratch.borrow_mut();
        scratch.clear();
        scratch.extend(set.iter().map(|n| n.window.get()));
        let mut ctx_ns = self.polling.weighted_ns.get();
        if let Some((old, new)) =
            polling::adjust_weighted(&params, &mut ctx_ns, scratch.iter_mut(), block_ns)
        {
            tracing::debug!(old, new, block_ns, "aio: weighted poll window adjusted");
        }
        self.polling.weighted_ns.set(ctx_ns);
        for (node, w) in set.iter().zip(scratch.iter()) {
            node.window.set(*w);
        }
    }

    pub(super) fn take_hits(&self) -> Vec<Rc<HandlerNode>> {
        self.polling
            .spare_hits
            .borrow_mut()
            .pop()
            .unwrap_or_default()
    }

    pub(super) fn recycle_hits(&self, mut hits: Vec<Rc<HandlerNode>>) {
        // Clear with no borrow held: this may drop the last reference to a removed node.
        hits.clear();
        self.polling.spare_hits.borrow_mut().push(hits);
    }
}

/// Validates and stores new polling parameters, then wakes the loop so that it applies them.
pub(super) fn set_poll_params(shared: &Shared, params: PollParams) -> io::Result<()> {
    params.validate()?;
    shared.poll_params.set(params);
    shared.wake_for_work();
    Ok(())
}
