//! A timer list: the timers of one clock in one group, kept in deadline order behind one mutex,
//! and the run that fires the due ones.
//!
//! C original: `QEMUTimerList`, `timer_mod_ns`, `timer_mod_anticipate_ns`, `timer_del`,
//! `timerlist_deadline_ns` and `timerlist_run_timers` in `util/qemu-timer.c`.
//!
//! # Layout
//!
//! Timers live in a slab (`slots`) addressed by a [`Key`], a slot index plus a generation that
//! changes when the slot is freed, so a stale [`TimerRef`](crate::TimerRef) can never touch a
//! newer timer. Armed timers are queued in an indexed 4-ary heap ([`Heap`]) keyed by
//! `(deadline, seq)`, where `seq` counts arms: equal deadlines fire in arming order.
//!
//! # Locking
//!
//! One mutex (`parking_lot`'s; loom's under `--cfg aio_loom`, see `sync.rs`) guards the slab
//! and the heap; arming and cancelling from any thread take it for a few hundred instructions
//! at most. It has no poisoning, so a panicking timer callback (which never runs under the
//! lock anyway) leaves the list usable. No user code runs
//! under the lock: callbacks run after it is released, and callbacks that must be dropped
//! (freed timers, a dying group) are dropped after it is released, because dropping one may drop
//! a [`Timer`](crate::Timer) of this very list.
//!
//! The earliest deadline is mirrored in an atomic (`head_ns`), written under the lock, so that
//! the loop can compute its timeout and skip lists with nothing due without locking. A stale
//! read is harmless for the same reason as in QEMU: whoever makes a timer the new head calls the
//! group's notify callback after publishing it, and the loop's notify protocol orders that
//! against its own read (the mirror store precedes the notifier's fence; the loop's read follows
//! its own fence). `tests/loom_arm.rs` checks this against an arm from another thread, and
//! shows that a notify before the publish, or none, loses the wake-up.

use crate::sync::{Arc, AtomicU32, AtomicU64, Condvar, Mutex, MutexGuard, Ordering, thread_token};

use crate::clock::{ClockType, Source};
use crate::heap::{Entry, Heap, NOT_QUEUED};

/// The callback a group calls to wake its event loop; see [`TimerListGroup`](crate::TimerListGroup).
pub type Notify = Arc<dyn Fn() + Send + Sync>;

/// A timer callback. Boxed once when the timer is created, never again.
pub(crate) type Callback = Box<dyn FnMut() + Send>;

/// The deadline that never comes: deadline arithmetic saturates here, clocks stop one short of
/// it, and the head mirror of an empty list holds it.
pub(crate) const NEVER: u64 = u64::MAX;

/// Names one timer of a list: its slot and the slot's generation when it was allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key {
    slot: u32,
    generation: u32,
}

/// Whether [`TimerList::arm`] always sets the deadline or only moves it earlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ArmMode {
    /// QEMU `timer_mod_ns`.
    Always,
    /// QEMU `timer_mod_anticipate_ns`: no change when armed at or before the new deadline.
    IfEarlier,
}

/// Loom only: which variant of the arm protocol a group's lists run.
#[cfg(aio_loom)]
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoomVariant {
    /// The real protocol: publish the new head, unlock, then notify.
    #[default]
    Correct,
    /// Notifies before publishing the new head (still under the lock).
    NotifyBeforePublish,
    /// Never notifies when an arm makes a new head.
    SkipNotify,
}

/// The timers of one clock in one group.
pub(crate) struct TimerList {
    state: Mutex<ListState>,
    /// Signalled when the last run of this list ends (for [`VirtualClock::disable`](crate::VirtualClock::disable)).
    idle: Condvar,
    /// The head's deadline, or [`NEVER`] when nothing is queued. Written under `state`.
    head_ns: AtomicU64,
    /// The group's mask of lists with something queued, and this list's bit in it: kept in
    /// step with `head_ns` so that a loop iteration with no timer armed anywhere costs the group
    /// one load (see `TimerListGroup::run_expired`).
    armed: Arc<AtomicU32>,
    bit: u32,
    clock: ClockType,
    source: Source,
    notify: Notify,
    #[cfg(aio_loom)]
    variant: LoomVariant,
}

struct ListState {
    heap: Heap,
    slots: Vec<Slot>,
    /// Freed slots, reused last-in first-out (the most recently freed slot is the warmest).
    free: Vec<u32>,
    /// Arms so far; the tie-breaker of equal deadlines.
    seq: u64,
    /// Due timers popped by a nested run while their own callback was running further up the
    /// stack (a callback can't be entered twice). They go back into the heap, with their
    /// original key, when that nested run ends, and the outer run fires them after the callback
    /// returns, which is when QEMU's re-entrant run would have fired them too.
    deferred: Vec<Entry>,
    /// The innermost isolation scope of the loop that runs the list (see `set_scope`): timers
    /// of lower scopes are held.
    scope: u64,
    /// Armed timers of scopes below `scope`, out of the heap so that they neither run nor
    /// shorten the loop's wait; they go back when the scope ends.
    held: Vec<Entry>,
    /// The group is gone: every operation is a no-op and the slab is empty.
    dead: bool,
    /// Runs of this list in progress (nested runs count each), and the thread doing them.
    runs: u32,
    runner: u64,
}

struct Slot {
    /// `None` while the callback is running (it is moved out for the call).
    callback: Option<Callback>,
    /// Bumped when the slot is freed; see [`Key`].
    generation: u32,
    /// The isolation scope the timer was created in.
    scope: u64,
}

impl TimerList {
    pub(crate) fn new(
        clock: ClockType,
        source: Source,
        notify: Notify,
        armed: Arc<AtomicU32>,
    ) -> Self {
        TimerList {
            state: Mutex::new(ListState {
                heap: Heap::default(),
                slots: Vec::new(),
                free: Vec::new(),
                seq: 0,
                deferred: Vec::new(),
                scope: 0,
                held: Vec::new(),
                dead: false,
                runs: 0,
                runner: 0,
            }),
            idle: Condvar::new(),
            head_ns: AtomicU64::new(NEVER),
            armed,
            bit: 1 << clock.index(),
            clock,
            source,
            notify,
            #[cfg(aio_loom)]
            variant: LoomVariant::Correct,
        }
    }

    /// Loom only: runs `variant` of the arm protocol.
    #[cfg(aio_loom)]
    pub(crate) fn with_loom_variant(self, variant: LoomVariant) -> Self {
        TimerList { variant, ..self }
    }

    pub(crate) fn clock(&self) -> ClockType {
        self.clock
    }

    pub(crate) fn source(&self) -> &Source {
        &self.source
    }

    /// The list's clock reading in nanoseconds.
    #[inline]
    pub(crate) fn now_ns(&self) -> u64 {
        self.source.now_ns()
    }

    /// Whether timers of this list may run: only a [`ClockType::Virtual`] list on a disabled
    /// [`VirtualClock`](crate::VirtualClock) may not.
    #[inline]
    pub(crate) fn is_enabled(&self) -> bool {
        self.source.is_enabled_for(self.clock)
    }

    /// Whether some timer is queued that can ever come due (lock-free, may be stale).
    #[inline]
    pub(crate) fn has_armed(&self) -> bool {
        self.head_ns.load(Ordering::Acquire) != NEVER
    }

    pub(crate) fn notify(&self) {
        (self.notify)();
    }

    /// Adds a disarmed timer with `callback`.
    ///
    /// # Panics
    ///
    /// If the list already holds `u32::MAX - 1` timers (about 100 GiB of them).
    ///
    /// On a dead list (its group was dropped; reachable through a [`GroupHandle`]) nothing is
    /// added: the callback is dropped, after unlocking, and the key is one that no operation
    /// of a dead list accepts, so the timer is inert.
    ///
    /// [`GroupHandle`]: crate::GroupHandle
    pub(crate) fn insert(&self, callback: Callback, scope: Option<u64>) -> Key {
        let mut st = self.state.lock();
        let scope = scope.unwrap_or(st.scope);
        if st.dead {
            drop(st);
            drop(callback);
            return Key {
                slot: 0,
                generation: 0,
            };
        }
        let slot = match st.free.pop() {
            Some(slot) => {
                st.slots[slot as usize].callback = Some(callback);
                st.slots[slot as usize].scope = scope;
                slot
            }
            None => {
                let slot = u32::try_from(st.slots.len())
                    .ok()
                    .filter(|&s| s < NOT_QUEUED)
                    .expect("timers: a timer list cannot hold u32::MAX - 1 timers");
                st.slots.push(Slot {
                    callback: Some(callback),
                    generation: 0,
                    scope,
                });
                let len = st.slots.len();
                st.heap.grow_slots(len);
                slot
            }
        };
        Key {
            slot,
            generation: st.slots[slot as usize].generation,
        }
    }

    /// Frees `key`'s timer: disarms it and drops its callback (after unlocking). If the
    /// callback is running right now, the run drops it when it returns.
    pub(crate) fn remove(&self, key: Key) {
        let callback = {
            let mut st = self.state.lock();
            if !st.owns(key) {
                return;
            }
            st.dequeue(key.slot);
            let slot = &mut st.slots[key.slot as usize];
            slot.generation = slot.generation.wrapping_add(1);
            let callback = slot.callback.take();
            st.free.push(key.slot);
            self.publish_head(&st);
            callback
        };
        drop(callback);
    }

    /// Arms `key`'s timer at `deadline` (absolute ns). Calls notify, after unlocking, if the
    /// timer became the head of the list. A no-op for a stale key or a dead list.
    pub(crate) fn arm(&self, key: Key, deadline: u64, mode: ArmMode) {
        let became_head = {
            let mut st = self.state.lock();
            if !st.owns(key) {
                return;
            }
            let st = &mut *st;
            if mode == ArmMode::IfEarlier
                && st
                    .deadline_of(key.slot)
                    .is_some_and(|now_at| now_at <= deadline)
            {
                return;
            }
            st.seq += 1;
            if st.slots[key.slot as usize].scope < st.scope {
                // A timer of a held scope: armed, but out of the heap until its scope ends.
                st.dequeue(key.slot);
                let seq = st.seq;
                st.held.push(Entry {
                    deadline,
                    seq,
                    slot: key.slot,
                });
                self.publish_head(st);
                return;
            }
            let at = if st.heap.position(key.slot).is_some() {
                st.heap.update(key.slot, deadline, st.seq)
            } else {
                st.undefer(key.slot);
                st.heap.push(key.slot, deadline, st.seq)
            };
            #[cfg(aio_loom)]
            match self.variant {
                LoomVariant::Correct => {}
                // Deliberately broken (loom only): the loop may wake and read the old head.
                LoomVariant::NotifyBeforePublish => {
                    if at == 0 {
                        self.notify();
                    }
                    self.publish_head(st);
                    return;
                }
                // Deliberately broken (loom only): a loop asleep on the old head stays asleep.
                LoomVariant::SkipNotify => {
                    self.publish_head(st);
                    return;
                }
            }
            // The new head is published before the notify below, in program order: a loop
            // woken by the notify (whose protocol makes this thread's earlier writes visible
            // to it) reads the new deadline.
            self.publish_head(st);
            at == 0
        };
        if became_head {
            self.notify();
        }
    }

    /// Disarms `key`'s timer. Never notifies: the loop may wake for nothing, which is harmless.
    pub(crate) fn cancel(&self, key: Key) {
        let mut st = self.state.lock();
        if st.owns(key) && st.dequeue(key.slot) {
            self.publish_head(&st);
        }
    }

    /// The deadline `key`'s timer is armed at.
    pub(crate) fn expire_time_ns(&self, key: Key) -> Option<u64> {
        let st = self.state.lock();
        if st.owns(key) {
            st.deadline_of(key.slot)
        } else {
            None
        }
    }

    /// Nanoseconds from now until the earliest deadline (0 if it has passed), or `None` if the
    /// list is disabled or has nothing armed. Lock-free.
    #[inline]
    pub(crate) fn deadline_ns(&self) -> Option<u64> {
        if !self.is_enabled() {
            return None;
        }
        match self.head_ns.load(Ordering::Acquire) {
            NEVER => None,
            head => Some(head.saturating_sub(self.now_ns())),
        }
    }

    /// Runs every timer due at the clock reading taken once on entry, earliest first, with no
    /// lock held during a callback. Returns how many callbacks ran.
    pub(crate) fn run_expired(&self) -> u64 {
        if !self.is_enabled() {
            return 0;
        }
        // Cheap exits without the lock: nothing queued (no clock read either), or nothing due.
        let head = self.head_ns.load(Ordering::Acquire);
        if head == NEVER {
            return 0;
        }
        let now = self.now_ns();
        if head > now {
            return 0;
        }

        let mut st = self.state.lock();
        // Checked again under the lock: `disable` clears the flag before it takes this lock to
        // look for runs in progress, so either it sees this run and waits, or this sees the flag.
        if st.dead || !self.is_enabled() {
            return 0;
        }
        st.runs += 1;
        st.runner = thread_token();
        let mut run = Run {
            list: self,
            st: Some(st),
        };
        let mut ran = 0;
        loop {
            let Some(st) = run.st.as_mut() else {
                unreachable!("the run holds the lock between callbacks");
            };
            let due = match st.heap.peek() {
                Some(e) if e.deadline <= now => *e,
                _ => break,
            };
            st.heap.pop();
            if st.slots[due.slot as usize].scope < st.scope {
                // Put back by a nested run after the scope began: hold it.
                st.held.push(due);
                continue;
            }
            let slot = &mut st.slots[due.slot as usize];
            let Some(callback) = slot.callback.take() else {
                st.deferred.push(due);
                continue;
            };
            let key = Key {
                slot: due.slot,
                generation: slot.generation,
            };
            self.publish_head(st);
            // Unlock for the call: the callback may arm, cancel or drop any timer, this one
            // included, from this thread or another.
            run.st = None;
            let mut call = Call {
                list: self,
                key,
                callback: Some(callback),
            };
            if let Some(f) = call.callback.as_mut() {
                f();
            }
            ran += 1;
            let mut st = self.state.lock();
            if let Some(orphan) = call.callback.take().and_then(|f| st.restore(key, f)) {
                // The timer was freed during its own callback: drop the callback unlocked.
                drop(st);
                drop(orphan);
                st = self.state.lock();
            }
            run.st = Some(st);
            // A callback may have disabled this clock; QEMU would keep going, but stopping
            // here is what "disabled clocks run no timers" promises.
            if !self.is_enabled() {
                break;
            }
        }
        drop(run);
        ran
    }

    /// Waits until no run of this list is in progress on another thread.
    pub(crate) fn wait_until_idle(&self) {
        let me = thread_token();
        let mut st = self.state.lock();
        while st.runs > 0 && st.runner != me {
            st = self.idle.wait(st);
        }
    }

    /// The group is being dropped: empties the list for good. Returns how many timers were
    /// armed and their callbacks, which the caller drops without the lock.
    pub(crate) fn kill(&self) -> (usize, Vec<Callback>) {
        let mut st = self.state.lock();
        st.dead = true;
        let armed = st.heap.len() + st.deferred.len() + st.held.len();
        let callbacks = std::mem::take(&mut st.slots)
            .into_iter()
            .filter_map(|s| s.callback)
            .collect();
        st.heap = Heap::default();
        st.free = Vec::new();
        st.deferred = Vec::new();
        st.held = Vec::new();
        self.publish_head(&st);
        (armed, callbacks)
    }

    /// Whether the list's group still exists.
    pub(crate) fn is_alive(&self) -> bool {
        !self.state.lock().dead
    }

    /// `(timers, armed timers)` in the list.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let st = self.state.lock();
        (
            st.slots.len() - st.free.len(),
            st.heap.len() + st.deferred.len() + st.held.len(),
        )
    }

    /// Makes `scope` the innermost isolation scope (see `TimerListGroup::set_scope`): armed
    /// timers of lower scopes leave the heap, held ones that `scope` allows go back, with
    /// their deadlines and arming order. Never notifies: the loop's own thread calls it.
    pub(crate) fn set_scope(&self, scope: u64) {
        let mut st = self.state.lock();
        if st.dead {
            return;
        }
        let st = &mut *st;
        let old = st.scope;
        st.scope = scope;
        if scope > old {
            for slot in 0..st.slots.len() {
                if st.slots[slot].scope < scope
                    && let Some(e) = st.heap.remove(slot as u32)
                {
                    st.held.push(e);
                }
            }
        } else if scope < old {
            let (back, keep): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut st.held)
                .into_iter()
                .partition(|e| st.slots[e.slot as usize].scope >= scope);
            st.held = keep;
            for e in back {
                st.heap.push(e.slot, e.deadline, e.seq);
            }
        }
        self.publish_head(st);
    }

    /// Mirrors the head's deadline into `head_ns`. Stores only on change, so that arming behind
    /// the head does not write a cache line the loop thread reads every iteration.
    #[inline]
    fn publish_head(&self, st: &ListState) {
        let head = st.heap.peek().map_or(NEVER, |e| e.deadline);
        let old = self.head_ns.load(Ordering::Relaxed);
        if old != head {
            // Release pairs with the Acquire loads in `deadline_ns`/`run_expired`; the ordering
            // against the loop's sleep comes from the notify protocol (see the module docs).
            self.head_ns.store(head, Ordering::Release);
            // The group's mask follows the empty/non-empty transitions, under the same lock and
            // before any notify, with the same pairing (the group's Acquire load of the mask).
            if old == NEVER {
                self.armed.fetch_or(self.bit, Ordering::Release);
            } else if head == NEVER {
                self.armed.fetch_and(!self.bit, Ordering::Release);
            }
        }
    }
}

impl ListState {
    /// Whether `key` names a live timer of this (live) list.
    #[inline]
    fn owns(&self, key: Key) -> bool {
        !self.dead
            && self
                .slots
                .get(key.slot as usize)
                .is_some_and(|s| s.generation == key.generation)
    }

    /// The deadline `slot` is armed at, in the heap, deferred by a nested run, or held.
    fn deadline_of(&self, slot: u32) -> Option<u64> {
        self.heap.deadline(slot).or_else(|| {
            self.deferred
                .iter()
                .chain(&self.held)
                .find(|e| e.slot == slot)
                .map(|e| e.deadline)
        })
    }

    /// Takes `slot` out of the deferred set, if it is there.
    #[inline]
    fn undefer(&mut self, slot: u32) -> bool {
        if self.deferred.is_empty() {
            return false;
        }
        let before = self.deferred.len();
        self.deferred.retain(|e| e.slot != slot);
        self.deferred.len() != before
    }

    /// Disarms `slot`. Returns whether it was armed.
    fn dequeue(&mut self, slot: u32) -> bool {
        self.heap.remove(slot).is_some() || self.undefer(slot) || self.unhold(slot)
    }

    /// Takes `slot` out of the held set, if it is there.
    fn unhold(&mut self, slot: u32) -> bool {
        if self.held.is_empty() {
            return false;
        }
        let before = self.held.len();
        self.held.retain(|e| e.slot != slot);
        self.held.len() != before
    }

    /// Puts a callback back after its call, or hands it back if its timer was freed meanwhile.
    fn restore(&mut self, key: Key, callback: Callback) -> Option<Callback> {
        if self.owns(key) {
            self.slots[key.slot as usize].callback = Some(callback);
            None
        } else {
            Some(callback)
        }
    }
}

/// A run in progress. Holds the lock between callbacks; on drop (normal or unwinding) puts the
/// deferred timers back and marks the run finished, so a panicking callback leaves the list
/// consistent and `disable` never waits forever.
struct Run<'a> {
    list: &'a TimerList,
    st: Option<MutexGuard<'a, ListState>>,
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        let mut st = self.st.take().unwrap_or_else(|| self.list.state.lock());
        if !st.dead {
            for e in std::mem::take(&mut st.deferred) {
                st.heap.push(e.slot, e.deadline, e.seq);
            }
        }
        st.runs -= 1;
        if st.runs == 0 {
            st.runner = 0;
        }
        self.list.publish_head(&st);
        drop(st);
        self.list.idle.notify_all();
    }
}

/// A callback moved out of its slot for the call. If the call unwinds, drop puts it back (or
/// drops it, unlocked, if its timer was freed meanwhile).
struct Call<'a> {
    list: &'a TimerList,
    key: Key,
    callback: Option<Callback>,
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.callback.take() {
            let orphan = self.list.state.lock().restore(self.key, f);
            drop(orphan);
        }
    }
}
