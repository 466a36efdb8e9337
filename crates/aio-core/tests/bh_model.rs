//! Model-based randomized test of bottom halves: seeded random programs of BH operations run
//! against a real `AioContext` and against a small reference model of the documented semantics
//! (README.md "Semantics", the `BottomHalf`/`RunningBh` docs), compared after every step.
//!
//! A program creates BHs (plain and `bh_with_self`), schedules, schedules as idle, cancels and
//! drops them from the home thread and from a helper thread (which runs one command at a time
//! and acknowledges it, so every program is deterministic), schedules one-shots from both
//! threads and polls, blocking or not. Each BH has a script per run: what its callback does on
//! its first, second, ... run (reschedule or cancel itself through `RunningBh`, drop its own
//! handle or have the helper drop it, poll again from inside, act on other BHs). Finally the
//! context and every handle are dropped, in a random order.
//!
//! The model is driven by what the real context does: when a callback starts, the model checks
//! that this BH is the next one it may run; when a `poll` returns, that nothing runnable was
//! left and that the returned progress is right. What the model checks:
//!
//! * a BH runs once per scheduling (schedules before its run coalesce), in the first pass that
//!   takes it, in scheduling order (the other thread's first), and a pass started by a nested
//!   poll first finishes the outer pass's BHs;
//! * a BH scheduled during a pass runs in the next one; a cancelled one does not run; a deleted
//!   one never runs again; idle BHs do not count as progress;
//! * a BH whose callback is running is never re-entered. Rescheduled while it runs (by itself or
//!   by another thread) it runs again after the callback returns, in a later pass, at a position
//!   the docs do not fix (the model accepts any). Nested polls never run it, and once a nested
//!   pass has met it, it no longer counts as pending work, so a nested blocking poll sleeps. (The
//!   model accepts either reading of "does not count as pending" for the nested polls that come
//!   before that first pass: the implementation links the BH when it is scheduled and parks it
//!   when a nested pass meets it, so until then it makes a blocking poll's timeout zero; never
//!   more than once per schedule, so a nested wait cannot spin.)
//! * what a blocking `poll` waits for: the test's monitor never blocks but records each wait's
//!   timeout, which must be none (a BH or a notification is pending), 10 ms (only idle BHs) or
//!   unbounded, so a nested "blocking" poll that would spin is caught;
//! * `poll`'s return value, each BH's run count and `is_scheduled`;
//! * each closure is dropped at most once, never while its BH's handle lives or its callback
//!   runs, at the latest when a pass started after its delete (and after its callback returned)
//!   has ended, and exactly once when the context and all handles are gone; a one-shot's closure
//!   is dropped when it has run, or with the context.
//!
//! By default it runs 8000 programs natively (a few seconds in debug) and 20 short ones under
//! Miri. A failure prints the seed and the program's trace (in it, the op `Oneshot(s)` names a
//! one-shot script, `run Oneshot(j)` the j-th one-shot created). `AIO_BH_MODEL_SEED=<seed>`
//! runs one seed (decimal or 0x-hex) and prints its trace; `AIO_BH_MODEL_PROGRAMS=<n>` sets how
//! many programs to run; `AIO_BH_MODEL_KEEP_GOING=1` runs them all and summarizes the failures;
//! `AIO_BH_MODEL_LIST=1` prints each seed before its program runs (always on under Miri, which
//! aborts on undefined behaviour). Natively a crash (a signal) also prints the seed it happened
//! in. Under Miri it runs a few short programs; to replay one seed there, forward the variable
//! (`MIRIFLAGS=-Zmiri-env-forward=AIO_BH_MODEL_SEED`) and delete
//! `target/miri/*/debug/deps/bh_model-*` first: cargo-miri records the environment when it
//! builds the test, not when it runs it.

use aio_core::RunningBh;
use aio_core::{AioContext, BottomHalf, Change, ContextHandle, FdMonitor, OuterFd, ReadyList};
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::Duration;

/// How long an idle BH lets the loop sleep (documented in `BottomHalf::schedule_idle`).
const IDLE_TIMEOUT: Duration = Duration::from_millis(10);

// ------------------------------------------------------------------------------------------
// Programs
// ------------------------------------------------------------------------------------------

/// splitmix64: a tiny deterministic PRNG.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<T: Copy>(&mut self, weighted: &[(u32, T)]) -> T {
        let total: u32 = weighted.iter().map(|w| w.0).sum();
        let mut x = (self.next() % u64::from(total)) as u32;
        for &(w, v) in weighted {
            if x < w {
                return v;
            }
            x -= w;
        }
        unreachable!()
    }
}

/// One operation, at top level or in a callback's script. BHs are named by index; an
/// operation on a BH that does not exist (not created yet, or its handle is gone) is skipped,
/// by the model and the real side alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Create(usize),
    Schedule(usize),
    ScheduleIdle(usize),
    Cancel(usize),
    Drop(usize),
    /// Performed by the helper thread, which acknowledges it before the program goes on.
    Remote(RemoteOp),
    /// A one-shot from the home thread running the given one-shot script.
    Oneshot(usize),
    Poll {
        blocking: bool,
    },
    /// Through the running callback's `RunningBh` (scripts of `bh_with_self` BHs only).
    SelfSchedule,
    SelfScheduleIdle,
    SelfCancel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RemoteOp {
    Schedule(usize),
    ScheduleIdle(usize),
    Cancel(usize),
    Drop(usize),
    Oneshot(usize),
}

#[derive(Debug)]
struct BhSpec {
    with_self: bool,
    /// What the callback does on its first, second, ... run; nothing once this runs out.
    runs: Vec<Vec<Op>>,
}

#[derive(Debug)]
struct Program {
    bhs: Vec<BhSpec>,
    /// One-shot scripts (they never schedule one-shots, so every program ends).
    oneshots: Vec<Vec<Op>>,
    ops: Vec<Op>,
    /// Poll until idle before the end.
    drain: bool,
    /// Drop the context before the handles (else after).
    context_first: bool,
    /// Operations after the context is gone (only with `context_first`).
    after_death: Vec<Op>,
    /// For each BH, whether its last handle drop happens on the helper thread.
    remote_final_drop: Vec<bool>,
}

fn gen_script(r: &mut Rng, me: usize, n: usize, with_self: bool, oneshots: usize) -> Vec<Op> {
    let len = r.pick(&[(2, 0), (3, 1), (4, 2), (4, 3), (3, 4), (2, 5)]);
    (0..len)
        .map(|_| {
            let o = r.below(n);
            let s = r.below(oneshots);
            let (sched, idle, cancel) = if with_self {
                (Op::SelfSchedule, Op::SelfScheduleIdle, Op::SelfCancel)
            } else {
                (Op::Schedule(me), Op::ScheduleIdle(me), Op::Cancel(me))
            };
            r.pick(&[
                (14, sched),
                (3, idle),
                (3, cancel),
                (2, Op::Cancel(me)),
                (14, Op::Poll { blocking: false }),
                (8, Op::Poll { blocking: true }),
                (5, Op::Drop(me)),
                (5, Op::Remote(RemoteOp::Drop(me))),
                (7, Op::Remote(RemoteOp::Schedule(me))),
                (2, Op::Remote(RemoteOp::Cancel(me))),
                (5, Op::Schedule(o)),
                (2, Op::ScheduleIdle(o)),
                (3, Op::Cancel(o)),
                (3, Op::Drop(o)),
                (2, Op::Remote(RemoteOp::Schedule(o))),
                (2, Op::Create(o)),
                (2, Op::Oneshot(s)),
                (2, Op::Remote(RemoteOp::Oneshot(s))),
            ])
        })
        .collect()
}

fn gen_program(seed: u64, short: bool) -> Program {
    let mut r = Rng(seed);
    let n = 1 + r.below(if short { 3 } else { 4 });
    let n_oneshots = 3;
    let bhs = (0..n)
        .map(|me| {
            let with_self = r.chance(70);
            let runs = 1 + r.below(5);
            BhSpec {
                with_self,
                runs: (0..runs)
                    .map(|_| gen_script(&mut r, me, n, with_self, n_oneshots))
                    .collect(),
            }
        })
        .collect();
    let oneshots = (0..n_oneshots)
        .map(|_| {
            (0..r.below(3))
                .map(|_| {
                    let o = r.below(n);
                    r.pick(&[
                        (3, Op::Poll { blocking: false }),
                        (2, Op::Poll { blocking: true }),
                        (3, Op::Schedule(o)),
                        (1, Op::Cancel(o)),
                        (1, Op::Drop(o)),
                        (1, Op::Remote(RemoteOp::Schedule(o))),
                        (1, Op::Remote(RemoteOp::Drop(o))),
                    ])
                })
                .collect()
        })
        .collect();
    let mut ops: Vec<Op> = (0..n).filter(|_| r.chance(85)).map(Op::Create).collect();
    let len = if short {
        4 + r.below(8)
    } else {
        6 + r.below(30)
    };
    for _ in 0..len {
        let o = r.below(n);
        let s = r.below(n_oneshots);
        ops.push(r.pick(&[
            (6, Op::Create(o)),
            (26, Op::Schedule(o)),
            (4, Op::ScheduleIdle(o)),
            (4, Op::Cancel(o)),
            (3, Op::Drop(o)),
            (10, Op::Remote(RemoteOp::Schedule(o))),
            (2, Op::Remote(RemoteOp::ScheduleIdle(o))),
            (2, Op::Remote(RemoteOp::Cancel(o))),
            (3, Op::Remote(RemoteOp::Drop(o))),
            (3, Op::Remote(RemoteOp::Oneshot(s))),
            (3, Op::Oneshot(s)),
            (16, Op::Poll { blocking: false }),
            (8, Op::Poll { blocking: true }),
        ]));
    }
    let context_first = r.chance(50);
    let after_death = if context_first {
        (0..r.below(4))
            .map(|_| {
                let o = r.below(n);
                let s = r.below(n_oneshots);
                r.pick(&[
                    (2, Op::Schedule(o)),
                    (2, Op::Remote(RemoteOp::Schedule(o))),
                    (1, Op::Oneshot(s)),
                    (1, Op::Remote(RemoteOp::Oneshot(s))),
                    (1, Op::Drop(o)),
                    (1, Op::Remote(RemoteOp::Drop(o))),
                ])
            })
            .collect()
    } else {
        Vec::new()
    };
    Program {
        bhs,
        oneshots,
        ops,
        drain: r.chance(50),
        context_first,
        after_death,
        remote_final_drop: (0..n).map(|_| r.chance(30)).collect(),
    }
}

// ------------------------------------------------------------------------------------------
// The reference model
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    Bh(usize),
    Oneshot(usize),
    /// The link of a BH scheduled while its callback runs: a pass that meets it parks it (runs
    /// nothing); it counts as pending work only in the lenient reading (see the module docs).
    Deferred(usize),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct MBh {
    created: bool,
    /// Its `BottomHalf` handle exists.
    alive: bool,
    deleted: bool,
    /// Linked (on a pending list or in a pass) and not yet dispatched; while the callback runs,
    /// as a `Node::Deferred`.
    pending: bool,
    scheduled: bool,
    idle: bool,
    running: bool,
    /// Scheduled while its callback was running: runs in a pass after the callback returns.
    deferred: bool,
    runs: u32,
    /// Clock at which freeing became allowed (the delete, or the callback's return if later).
    free_ready_at: u64,
    /// A pass that started after `free_ready_at` has ended: the closure must be dropped.
    must_drop: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct MOneshot {
    pending: bool,
    running: bool,
    ran: bool,
}

/// One `poll` on the stack.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Frame {
    begin: u64,
    /// The wait this poll makes (`None` for no wait, else its timeout), by the strict and the
    /// lenient reading of "a deferred BH is not pending work".
    wait: [Option<Option<Duration>>; 2],
    wait_checked: bool,
    progress: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Model {
    bhs: Vec<MBh>,
    oneshots: Vec<MOneshot>,
    /// Pending, linked from the helper thread / the home thread, in scheduling order.
    remote: Vec<Node>,
    local: Vec<Node>,
    /// Taken by passes on the stack and not yet dispatched, front first.
    slice: VecDeque<Node>,
    frames: Vec<Frame>,
    notified: bool,
    dead: bool,
    clock: u64,
}

/// What the real side looks like after a step.
struct Real {
    runs: Vec<u32>,
    drops: Vec<u32>,
    is_scheduled: Vec<Option<bool>>,
    oneshot_drops: Vec<u32>,
}

impl Model {
    fn new(n: usize) -> Model {
        Model {
            bhs: vec![MBh::default(); n],
            ..Model::default()
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn create(&mut self, k: usize) {
        self.bhs[k] = MBh {
            created: true,
            alive: true,
            ..MBh::default()
        };
    }

    fn link(&mut self, node: Node, remote: bool) {
        if remote {
            self.remote.push(node);
        } else {
            self.local.push(node);
        }
    }

    fn schedule(&mut self, k: usize, idle: bool, remote: bool) {
        if remote {
            self.notified = true;
        }
        let dead = self.dead;
        let b = &mut self.bhs[k];
        if b.deleted {
            return; // `RunningBh::schedule` after the handle is gone: harmless
        }
        b.scheduled = true;
        b.idle |= idle;
        if dead {
            return;
        }
        if b.running {
            b.deferred = true;
            if !b.pending {
                b.pending = true;
                self.link(Node::Deferred(k), remote);
            }
            return;
        }
        if b.pending {
            return;
        }
        b.pending = true;
        self.link(Node::Bh(k), remote);
    }

    fn cancel(&mut self, k: usize) {
        let b = &mut self.bhs[k];
        if !b.deleted {
            b.scheduled = false;
        }
    }

    fn delete(&mut self, k: usize, remote: bool) {
        if remote {
            self.notified = true;
        }
        let now = self.tick();
        let dead = self.dead;
        let b = &mut self.bhs[k];
        b.alive = false;
        b.deleted = true;
        b.scheduled = false;
        b.deferred = false;
        b.free_ready_at = now;
        b.must_drop = dead;
        if std::mem::take(&mut b.pending) {
            // A deleted node never runs, so where it sits no longer matters.
            self.unlink(k);
        }
    }

    /// Forgets where BH `k` is linked.
    fn unlink(&mut self, k: usize) {
        let mine = |n: &Node| *n == Node::Bh(k) || *n == Node::Deferred(k);
        self.remote.retain(|n| !mine(n));
        self.local.retain(|n| !mine(n));
        self.slice.retain(|n| !mine(n));
    }

    fn oneshot(&mut self, remote: bool) {
        let j = self.oneshots.len();
        self.oneshots.push(MOneshot {
            pending: !self.dead,
            ..MOneshot::default()
        });
        if remote {
            self.notified = true;
        }
        if !self.dead {
            self.link(Node::Oneshot(j), remote);
        }
    }

    /// The timeout the pending BHs allow a blocking wait: `Some(ZERO)` when one must run now.
    /// `lenient`: a deferred BH that no nested pass has met yet counts as pending.
    fn timeout(&self, lenient: bool) -> Option<Duration> {
        let mut idle = false;
        for node in self.remote.iter().chain(&self.local).chain(&self.slice) {
            match *node {
                Node::Deferred(_) if !lenient => {}
                Node::Bh(k) | Node::Deferred(k) => {
                    let b = &self.bhs[k];
                    if b.scheduled && !b.deleted {
                        if !b.idle {
                            return Some(Duration::ZERO);
                        }
                        idle = true;
                    }
                }
                Node::Oneshot(_) => return Some(Duration::ZERO),
            }
        }
        idle.then_some(IDLE_TIMEOUT)
    }

    fn poll_begin(&mut self, blocking: bool) {
        let wait = |lenient| {
            let t = self.timeout(lenient);
            (blocking && t != Some(Duration::ZERO) && !self.notified).then_some(t)
        };
        let wait = [wait(false), wait(true)];
        self.notified = false;
        let begin = self.tick();
        let remote = std::mem::take(&mut self.remote);
        let local = std::mem::take(&mut self.local);
        self.slice.extend(remote);
        self.slice.extend(local);
        self.frames.push(Frame {
            begin,
            wait,
            wait_checked: false,
            progress: false,
        });
    }

    /// Dispatches slice entries until one whose callback runs: returns it and whether it is
    /// idle.
    fn next_runnable(&mut self) -> Option<(Node, bool)> {
        while let Some(node) = self.slice.pop_front() {
            match node {
                Node::Bh(k) => {
                    let b = &mut self.bhs[k];
                    b.pending = false;
                    let run = b.scheduled && !b.deleted;
                    let idle = b.idle;
                    b.scheduled = false;
                    b.idle = false;
                    if run {
                        assert!(!b.running, "model: a running BH is never linked");
                        return Some((node, idle));
                    }
                }
                Node::Oneshot(j) => {
                    self.oneshots[j].pending = false;
                    return Some((node, false));
                }
                // Parked: its flags stay for the running frame.
                Node::Deferred(k) => self.bhs[k].pending = false,
            }
        }
        None
    }

    fn check_wait(&mut self, waits: &[Option<Duration>]) -> Result<(), String> {
        let frame = self.frames.last_mut().expect("inside a poll");
        if std::mem::replace(&mut frame.wait_checked, true) {
            return Ok(());
        }
        let matches = |wait: Option<Option<Duration>>| match wait {
            None => waits.is_empty(),
            Some(t) => waits == [t],
        };
        if frame.wait.iter().any(|&w| matches(w)) {
            Ok(())
        } else {
            Err(format!(
                "the poll's wait: expected {}, the monitor saw {waits:?}",
                match frame.wait[0] {
                    None => "no wait (something is pending)".to_string(),
                    Some(None) => "an unbounded wait".to_string(),
                    Some(Some(t)) => format!("a wait of {t:?}"),
                }
            ))
        }
    }

    fn on_run(&mut self, node: Node, waits: &[Option<Duration>]) -> Result<(), String> {
        self.check_wait(waits)?;
        match self.next_runnable() {
            Some((n, idle)) if n == node => {
                match node {
                    Node::Bh(k) => {
                        self.bhs[k].runs += 1;
                        self.bhs[k].running = true;
                    }
                    Node::Oneshot(j) => self.oneshots[j].running = true,
                    Node::Deferred(_) => unreachable!("next_runnable never returns it"),
                }
                self.frames.last_mut().unwrap().progress |= !idle;
                Ok(())
            }
            Some((n, _)) => Err(format!("{node:?} ran, but {n:?} should run first")),
            None => Err(format!("{node:?} ran, but nothing should run in this pass")),
        }
    }

    /// The callback returned. A BH deferred while it ran is linked now, at a position the
    /// docs do not fix: one candidate model per position (and, if it was cancelled meanwhile,
    /// one where it is not linked at all).
    fn on_return(mut self, node: Node) -> Vec<Model> {
        let now = self.tick();
        let k = match node {
            Node::Oneshot(j) => {
                self.oneshots[j].running = false;
                self.oneshots[j].ran = true;
                return vec![self];
            }
            Node::Bh(k) => k,
            Node::Deferred(_) => unreachable!("never runs"),
        };
        if std::mem::take(&mut self.bhs[k].pending) {
            self.unlink(k); // a deferred link that no nested pass met
        }
        let b = &mut self.bhs[k];
        b.running = false;
        if b.deleted {
            b.free_ready_at = now;
            return vec![self];
        }
        if !std::mem::take(&mut b.deferred) {
            return vec![self];
        }
        let scheduled = b.scheduled;
        let mut out = Vec::new();
        if !scheduled {
            out.push(self.clone());
        }
        self.bhs[k].pending = true;
        for i in 0..=self.remote.len() {
            let mut m = self.clone();
            m.remote.insert(i, node);
            out.push(m);
        }
        for i in 0..=self.local.len() {
            let mut m = self.clone();
            m.local.insert(i, node);
            out.push(m);
        }
        out
    }

    fn poll_end(&mut self, progress: bool, waits: &[Option<Duration>]) -> Result<(), String> {
        self.check_wait(waits)?;
        if let Some((n, _)) = self.next_runnable() {
            return Err(format!(
                "poll returned, but {n:?} was taken by this pass and did not run"
            ));
        }
        let frame = self.frames.pop().unwrap();
        if frame.progress != progress {
            return Err(format!(
                "poll returned {progress}, the model expected {}",
                frame.progress
            ));
        }
        for b in &mut self.bhs {
            if b.deleted && !b.running && b.free_ready_at < frame.begin {
                b.must_drop = true;
            }
        }
        Ok(())
    }

    /// The last `AioContext` is dropped: nothing runs any more; what is linked is freed.
    fn kill(&mut self) {
        assert!(self.frames.is_empty());
        self.dead = true;
        self.remote.clear();
        self.local.clear();
        self.slice.clear();
        for b in &mut self.bhs {
            b.pending = false;
            b.deferred = false;
            if b.deleted {
                b.must_drop = true;
            }
        }
        for o in &mut self.oneshots {
            o.pending = false;
        }
    }

    fn check(&self, real: &Real) -> Result<(), String> {
        for (k, b) in self.bhs.iter().enumerate() {
            if real.runs[k] != b.runs {
                return Err(format!(
                    "Bh({k}) ran {} times, the model says {}",
                    real.runs[k], b.runs
                ));
            }
            let drops = real.drops[k];
            let may = b.deleted && !b.running;
            if drops > 1 {
                return Err(format!("Bh({k})'s closure was dropped {drops} times"));
            }
            if drops == 1 && !may {
                return Err(format!(
                    "Bh({k})'s closure was dropped while {}",
                    if b.running {
                        "its callback runs"
                    } else {
                        "its handle lives"
                    }
                ));
            }
            if drops == 0 && b.must_drop {
                return Err(format!(
                    "Bh({k})'s closure was not dropped, though it was deleted and {}",
                    if self.dead {
                        "the context is gone"
                    } else {
                        "a later pass has ended"
                    }
                ));
            }
            if !self.dead
                && let Some(s) = real.is_scheduled[k]
                && s != b.scheduled
            {
                return Err(format!(
                    "Bh({k}).is_scheduled() is {s}, the model says {}",
                    b.scheduled
                ));
            }
        }
        for (j, o) in self.oneshots.iter().enumerate() {
            let expect = u32::from(!o.running && (o.ran || self.dead));
            if real.oneshot_drops[j] != expect {
                return Err(format!(
                    "Oneshot({j})'s closure was dropped {} times, the model says {expect}",
                    real.oneshot_drops[j]
                ));
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// The real side
// ------------------------------------------------------------------------------------------

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A monitor that never blocks and never reports an fd: it records each wait's timeout.
#[derive(Debug)]
struct RecordingMonitor {
    waits: Arc<Mutex<Vec<Option<Duration>>>>,
}

impl FdMonitor for RecordingMonitor {
    fn name(&self) -> &'static str {
        "recording"
    }

    unsafe fn update(&mut self, _change: Change) -> io::Result<()> {
        Ok(())
    }

    fn wait(&mut self, _ready: &mut ReadyList, timeout: Option<Duration>) -> io::Result<usize> {
        lock(&self.waits).push(timeout);
        Ok(0)
    }

    fn outer_fds(&self, _out: &mut Vec<OuterFd>) {}
}

/// Counts drops of the closure it lives in.
struct Drops(Arc<AtomicU32>);

impl Drop for Drops {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

enum Command {
    Op(RemoteOp),
    Oneshot(Box<dyn FnOnce() + Send>),
    Quit,
}

/// Everything a program's callbacks and its helper thread share.
struct Harness {
    seed: u64,
    program: Program,
    handle: ContextHandle,
    handles: Mutex<Vec<Option<BottomHalf>>>,
    created: Vec<AtomicU32>,
    runs: Vec<AtomicU32>,
    drops: Vec<Arc<AtomicU32>>,
    oneshot_drops: Mutex<Vec<Arc<AtomicU32>>>,
    models: Mutex<Vec<Model>>,
    max_candidates: AtomicUsize,
    /// The monitor's record, and where each poll on the stack started reading it.
    waits: Arc<Mutex<Vec<Option<Duration>>>>,
    marks: Mutex<Vec<usize>>,
    to_helper: Mutex<mpsc::Sender<Command>>,
    acks: Mutex<mpsc::Receiver<()>>,
    trace: Mutex<String>,
    depth: AtomicUsize,
    /// Print the trace as it is written (single-seed runs: a crash loses the rest).
    verbose: bool,
}

impl Harness {
    fn note(&self, line: &str) {
        let depth = self.depth.load(Ordering::Relaxed);
        let line = format!("{:w$}{line}", "", w = depth * 2);
        if self.verbose {
            eprintln!("{line}");
        }
        let _ = writeln!(lock(&self.trace), "{line}");
    }

    fn fail(&self, msg: &str) -> ! {
        let trace = lock(&self.trace).clone();
        panic!(
            "bh_model: seed {:#x} failed: {msg}\n--- trace (AIO_BH_MODEL_SEED={:#x} to rerun) ---\n{trace}",
            self.seed, self.seed
        );
    }

    /// Applies `f` to every candidate model, keeping those that agree with the real side.
    fn step(&self, what: &str, f: impl Fn(Model) -> Result<Vec<Model>, String>) {
        let mut models = lock(&self.models);
        let mut next: Vec<Model> = Vec::new();
        let mut first_err = None;
        for m in models.drain(..) {
            match f(m) {
                Ok(v) => {
                    for m in v {
                        if !next.contains(&m) {
                            next.push(m);
                        }
                    }
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if next.is_empty() {
            drop(models);
            self.fail(&format!("{what}: {}", first_err.unwrap()));
        }
        self.max_candidates.fetch_max(next.len(), Ordering::Relaxed);
        *models = next;
    }

    fn update(&self, f: impl Fn(&mut Model)) {
        self.step("model", |mut m| {
            f(&mut m);
            Ok(vec![m])
        });
    }

    fn waits_since_mark(&self) -> Vec<Option<Duration>> {
        let mark = *lock(&self.marks).last().expect("inside a poll");
        lock(&self.waits)[mark..].to_vec()
    }

    fn alive(&self, k: usize) -> bool {
        lock(&self.handles)[k].is_some()
    }

    fn check(&self, what: &str) {
        let real = Real {
            runs: self.runs.iter().map(|r| r.load(Ordering::SeqCst)).collect(),
            drops: self
                .drops
                .iter()
                .map(|d| d.load(Ordering::SeqCst))
                .collect(),
            is_scheduled: lock(&self.handles)
                .iter()
                .map(|h| h.as_ref().map(BottomHalf::is_scheduled))
                .collect(),
            oneshot_drops: lock(&self.oneshot_drops)
                .iter()
                .map(|d| d.load(Ordering::SeqCst))
                .collect(),
        };
        self.step(&format!("after {what}"), |m| {
            m.check(&real).map(|()| vec![m])
        });
    }

    fn remote(&self, cmd: Command) {
        lock(&self.to_helper).send(cmd).expect("helper alive");
        lock(&self.acks).recv().expect("helper acknowledges");
    }

    fn new_oneshot(self: &Arc<Self>, script: usize) -> impl FnOnce() + Send + 'static {
        let drops = Arc::new(AtomicU32::new(0));
        let j = {
            let mut all = lock(&self.oneshot_drops);
            all.push(drops.clone());
            all.len() - 1
        };
        let (h, guard) = (self.clone(), Drops(drops));
        move || {
            let _guard = guard;
            let ops = h.program.oneshots[script].clone();
            run_callback(&h, Node::Oneshot(j), None, &ops);
        }
    }
}

fn helper(h: Arc<Harness>, rx: mpsc::Receiver<Command>, acks: mpsc::Sender<()>) {
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Command::Quit => return,
            Command::Oneshot(f) => h.handle.schedule_oneshot(f),
            Command::Op(op) => match op {
                RemoteOp::Schedule(k) => lock(&h.handles)[k].as_ref().unwrap().schedule(),
                RemoteOp::ScheduleIdle(k) => {
                    lock(&h.handles)[k].as_ref().unwrap().schedule_idle();
                }
                RemoteOp::Cancel(k) => lock(&h.handles)[k].as_ref().unwrap().cancel(),
                RemoteOp::Drop(k) => {
                    let bh = lock(&h.handles)[k].take();
                    drop(bh);
                }
                RemoteOp::Oneshot(_) => unreachable!("sent as a closure"),
            },
        }
        if acks.send(()).is_err() {
            return;
        }
    }
}

/// A callback's body: tells the model, then runs this run's script.
fn run_callback(h: &Arc<Harness>, node: Node, this: Option<&RunningBh<'_>>, ops: &[Op]) {
    let ctx = AioContext::current().expect("callbacks run inside poll");
    h.note(&format!("run {node:?}"));
    let waits = h.waits_since_mark();
    h.step(&format!("{node:?} starts"), |mut m| {
        m.on_run(node, &waits).map(|()| vec![m])
    });
    h.depth.fetch_add(1, Ordering::Relaxed);
    for &op in ops {
        exec(h, Some(&ctx), op, Some((node, this)));
    }
    h.depth.fetch_sub(1, Ordering::Relaxed);
    h.note(&format!("return {node:?}"));
    h.step(&format!("{node:?} returns"), |m| Ok(m.on_return(node)));
}

type Me<'a, 'b> = Option<(Node, Option<&'a RunningBh<'b>>)>;

/// Performs `op` on the real context and on the model, then compares them. Returns what a
/// poll returned.
fn exec(h: &Arc<Harness>, ctx: Option<&AioContext>, op: Op, me: Me<'_, '_>) -> Option<bool> {
    let mut result = None;
    match op {
        Op::Create(k) => {
            if h.created[k].swap(1, Ordering::SeqCst) == 1 {
                return None;
            }
            let guard = Drops(h.drops[k].clone());
            let h2 = h.clone();
            let bh = if h.program.bhs[k].with_self {
                let f = move |this: &RunningBh<'_>| {
                    let _keep = &guard;
                    let run = h2.runs[k].fetch_add(1, Ordering::SeqCst) as usize;
                    let ops = h2.program.bhs[k].runs.get(run).cloned().unwrap_or_default();
                    run_callback(&h2, Node::Bh(k), Some(this), &ops);
                };
                match ctx {
                    Some(ctx) => ctx.bh_with_self(f),
                    None => h.handle.bh_with_self(f),
                }
            } else {
                let f = move || {
                    let _keep = &guard;
                    let run = h2.runs[k].fetch_add(1, Ordering::SeqCst) as usize;
                    let ops = h2.program.bhs[k].runs.get(run).cloned().unwrap_or_default();
                    run_callback(&h2, Node::Bh(k), None, &ops);
                };
                match ctx {
                    Some(ctx) => ctx.bh(f),
                    None => h.handle.bh(f),
                }
            };
            lock(&h.handles)[k] = Some(bh);
            h.update(|m| m.create(k));
        }
        Op::Schedule(k) | Op::ScheduleIdle(k) | Op::Cancel(k) => {
            if !h.alive(k) {
                return None;
            }
            {
                let handles = lock(&h.handles);
                let bh = handles[k].as_ref().unwrap();
                match op {
                    Op::Schedule(_) => bh.schedule(),
                    Op::ScheduleIdle(_) => bh.schedule_idle(),
                    _ => bh.cancel(),
                }
            }
            h.update(|m| match op {
                Op::Schedule(_) => m.schedule(k, false, false),
                Op::ScheduleIdle(_) => m.schedule(k, true, false),
                _ => m.cancel(k),
            });
        }
        Op::Drop(k) => {
            let bh = lock(&h.handles)[k].take()?;
            drop(bh);
            h.update(|m| m.delete(k, false));
        }
        Op::Remote(RemoteOp::Oneshot(s)) => {
            let f = h.new_oneshot(s);
            h.remote(Command::Oneshot(Box::new(f)));
            h.update(|m| m.oneshot(true));
        }
        Op::Remote(r) => {
            let (RemoteOp::Schedule(k)
            | RemoteOp::ScheduleIdle(k)
            | RemoteOp::Cancel(k)
            | RemoteOp::Drop(k)) = r
            else {
                unreachable!()
            };
            if !h.alive(k) {
                return None;
            }
            h.remote(Command::Op(r));
            h.update(|m| match r {
                RemoteOp::Schedule(_) => m.schedule(k, false, true),
                RemoteOp::ScheduleIdle(_) => m.schedule(k, true, true),
                RemoteOp::Cancel(_) => m.cancel(k),
                _ => m.delete(k, true),
            });
        }
        Op::Oneshot(s) => {
            let f = h.new_oneshot(s);
            match ctx {
                Some(ctx) => ctx.schedule_oneshot(f),
                None => h.handle.schedule_oneshot(f),
            }
            h.update(|m| m.oneshot(false));
        }
        Op::Poll { blocking } => {
            let ctx = ctx?;
            h.update(|m| m.poll_begin(blocking));
            let mark = lock(&h.waits).len();
            lock(&h.marks).push(mark);
            h.note(&format!("{op:?} {{"));
            let progress = ctx.aio_poll(blocking);
            let waits = h.waits_since_mark();
            lock(&h.marks).pop();
            h.note(&format!("}} -> {progress}"));
            h.step("poll returns", |mut m| {
                m.poll_end(progress, &waits).map(|()| vec![m])
            });
            result = Some(progress);
        }
        Op::SelfSchedule | Op::SelfScheduleIdle | Op::SelfCancel => {
            let Some((Node::Bh(k), Some(this))) = me else {
                return None;
            };
            match op {
                Op::SelfSchedule => this.schedule(),
                Op::SelfScheduleIdle => this.schedule_idle(),
                _ => this.cancel(),
            }
            h.update(|m| match op {
                Op::SelfSchedule => m.schedule(k, false, false),
                Op::SelfScheduleIdle => m.schedule(k, true, false),
                _ => m.cancel(k),
            });
        }
    }
    if !matches!(op, Op::Poll { .. }) {
        h.note(&format!("{op:?}"));
    }
    h.check(&format!("{op:?}"));
    result
}

/// Statistics of one program that passed.
struct Outcome {
    runs: u32,
    max_candidates: usize,
}

fn run_program(seed: u64, short: bool) -> Outcome {
    let program = gen_program(seed, short);
    let n = program.bhs.len();
    let waits = Arc::new(Mutex::new(Vec::new()));
    let ctx = AioContext::new(Box::new(RecordingMonitor {
        waits: waits.clone(),
    }))
    .expect("context");
    let (to_helper, rx) = mpsc::channel();
    let (ack_tx, acks) = mpsc::channel();
    let h = Arc::new(Harness {
        seed,
        handle: ctx.handle(),
        handles: Mutex::new((0..n).map(|_| None).collect()),
        created: (0..n).map(|_| AtomicU32::new(0)).collect(),
        runs: (0..n).map(|_| AtomicU32::new(0)).collect(),
        drops: (0..n).map(|_| Arc::new(AtomicU32::new(0))).collect(),
        oneshot_drops: Mutex::new(Vec::new()),
        models: Mutex::new(vec![Model::new(n)]),
        max_candidates: AtomicUsize::new(1),
        waits,
        marks: Mutex::new(Vec::new()),
        to_helper: Mutex::new(to_helper),
        acks: Mutex::new(acks),
        trace: Mutex::new(String::new()),
        depth: AtomicUsize::new(0),
        verbose: std::env::var_os("AIO_BH_MODEL_SEED").is_some(),
        program,
    });
    let thread = {
        let h = h.clone();
        std::thread::spawn(move || helper(h, rx, ack_tx))
    };

    for &op in &h.program.ops {
        exec(&h, Some(&ctx), op, None);
    }
    if h.program.drain {
        let mut rounds = 0;
        while exec(&h, Some(&ctx), Op::Poll { blocking: false }, None) == Some(true) {
            rounds += 1;
            if rounds > 500 {
                h.fail("the loop does not become idle");
            }
        }
    }
    let drop_handles = |h: &Arc<Harness>, ctx: Option<&AioContext>| {
        for k in 0..n {
            let op = if h.program.remote_final_drop[k] {
                Op::Remote(RemoteOp::Drop(k))
            } else {
                Op::Drop(k)
            };
            exec(h, ctx, op, None);
        }
    };
    let kill = |h: &Arc<Harness>, ctx: AioContext| {
        h.note("drop the context");
        drop(ctx);
        h.update(Model::kill);
        h.check("dropping the context");
    };
    if h.program.context_first {
        kill(&h, ctx);
        for &op in &h.program.after_death {
            exec(&h, None, op, None);
        }
        drop_handles(&h, None);
    } else {
        drop_handles(&h, Some(&ctx));
        kill(&h, ctx);
    }

    // Everything is gone: every closure must have been dropped exactly once.
    for (k, d) in h.drops.iter().enumerate() {
        let d = d.load(Ordering::SeqCst);
        if h.created[k].load(Ordering::SeqCst) == 1 && d != 1 {
            h.fail(&format!(
                "at the end, Bh({k})'s closure was dropped {d} times"
            ));
        }
    }
    for (j, d) in lock(&h.oneshot_drops).iter().enumerate() {
        let d = d.load(Ordering::SeqCst);
        if d != 1 {
            h.fail(&format!(
                "at the end, Oneshot({j})'s closure was dropped {d} times"
            ));
        }
    }
    lock(&h.to_helper).send(Command::Quit).unwrap();
    thread.join().unwrap();
    let runs = h.runs.iter().map(|r| r.load(Ordering::SeqCst)).sum();
    let max_candidates = h.max_candidates.load(Ordering::Relaxed);
    if Arc::strong_count(&h) != 1 {
        h.fail("a callback's closure outlived the context and its handles");
    }
    Outcome {
        runs,
        max_candidates,
    }
}

/// Reports the seed of a program that crashed the process (natively; Miri reports UB itself).
#[cfg(not(miri))]
mod crash_report {
    use std::sync::Once;
    use std::sync::atomic::{AtomicU64, Ordering};

    pub(crate) static SEED: AtomicU64 = AtomicU64::new(0);

    extern "C" fn on_fatal(sig: libc::c_int) {
        let mut msg = *b"\nbh_model: fatal signal in seed 0x0000000000000000 (or an earlier program's corruption)\n";
        let seed = SEED.load(Ordering::Relaxed);
        let end = msg.iter().position(|&c| c == b'(').unwrap() - 1;
        for i in 0..16 {
            let digit = ((seed >> (4 * i)) & 0xf) as u8;
            msg[end - 1 - i] = if digit < 10 {
                b'0' + digit
            } else {
                b'a' + digit - 10
            };
        }
        // The handler was installed with SA_RESETHAND, so raising the signal again runs the
        // default action (the crash the test would have had anyway).
        // SAFETY: write(2) and raise(3) are async-signal-safe; `msg` is a live stack buffer.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::raise(sig);
        }
    }

    pub(crate) fn install() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            for sig in [libc::SIGSEGV, libc::SIGBUS, libc::SIGABRT, libc::SIGILL] {
                // A zeroed `sigaction` is a valid empty one; we fill in a handler that only
                // calls async-signal-safe functions.
                // SAFETY: so the struct is valid, and every pointer passed is live.
                unsafe {
                    let mut sa: libc::sigaction = std::mem::zeroed();
                    sa.sa_sigaction = on_fatal as extern "C" fn(libc::c_int) as usize;
                    sa.sa_flags = libc::SA_RESETHAND | libc::SA_NODEFER;
                    libc::sigemptyset(&mut sa.sa_mask);
                    libc::sigaction(sig, &sa, std::ptr::null_mut());
                }
            }
        });
    }
}

fn parse_seed(s: &str) -> u64 {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .unwrap_or_else(|e| panic!("bad seed {s:?}: {e}"))
}

fn seed_of(i: u64) -> u64 {
    Rng(0xb0b0_a10c_0000_0000 ^ i).next()
}

fn run_one(seed: u64, short: bool) -> Result<Outcome, String> {
    #[cfg(not(miri))]
    crash_report::SEED.store(seed, Ordering::Relaxed);
    catch_unwind(AssertUnwindSafe(|| run_program(seed, short))).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_string()))
            .unwrap_or_else(|| "non-string panic".into())
    })
}

#[test]
fn bottom_halves_match_the_model() {
    #[cfg(not(miri))]
    crash_report::install();
    let short = cfg!(miri);
    if let Ok(seed) = std::env::var("AIO_BH_MODEL_SEED") {
        // Full-size programs, as natively, so that a native seed replays under Miri too.
        let (seed, short) = (parse_seed(&seed), false);
        match run_one(seed, short) {
            Ok(o) => eprintln!(
                "bh_model: seed {seed:#x} passed ({} runs, {} candidate models at most)\n{}",
                o.runs,
                o.max_candidates,
                gen_program_summary(seed, short),
            ),
            Err(e) => panic!("{}", e.lines().next().unwrap_or_default()),
        }
        return;
    }
    let programs: u64 = std::env::var("AIO_BH_MODEL_PROGRAMS")
        .map(|s| s.parse().expect("AIO_BH_MODEL_PROGRAMS is a number"))
        .unwrap_or(if cfg!(miri) { 20 } else { 8000 });
    let keep_going = std::env::var_os("AIO_BH_MODEL_KEEP_GOING").is_some();
    let (mut runs, mut max_candidates) = (0u64, 0);
    // Under Miri (which aborts on undefined behaviour) or on request, say which program runs.
    let announce = cfg!(miri) || std::env::var_os("AIO_BH_MODEL_LIST").is_some();
    let mut failures: Vec<(u64, String)> = Vec::new();
    for i in 0..programs {
        let seed = seed_of(i);
        if announce {
            eprintln!("bh_model: program {i}, seed {seed:#x}");
        }
        match run_one(seed, short) {
            Ok(o) => {
                runs += u64::from(o.runs);
                max_candidates = max_candidates.max(o.max_candidates);
            }
            Err(e) if keep_going => failures.push((seed, e)),
            // The panic hook has printed the whole message (with the trace) already.
            Err(e) => panic!("{}", e.lines().next().unwrap_or_default()),
        }
    }
    eprintln!(
        "bh_model: {programs} programs, {} failed, {runs} callback runs, at most {max_candidates} candidate models",
        failures.len()
    );
    if !failures.is_empty() {
        let mut kinds: Vec<(String, Vec<u64>)> = Vec::new();
        for (seed, e) in &failures {
            let first = e.lines().next().unwrap_or_default();
            let kind = first.split_once(": ").map_or(first, |(_, k)| k);
            let kind = kind.split_once(": ").map_or(kind, |(_, k)| k).to_string();
            match kinds.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, seeds)) => seeds.push(*seed),
                None => kinds.push((kind, vec![*seed])),
            }
        }
        for (kind, seeds) in &kinds {
            let shown: Vec<String> = seeds.iter().take(4).map(|s| format!("{s:#x}")).collect();
            eprintln!("  {:4} x {kind}  (e.g. {})", seeds.len(), shown.join(", "));
        }
        panic!("{} of {programs} programs failed", failures.len());
    }
}

/// The shape of a program, for the single-seed report.
fn gen_program_summary(seed: u64, short: bool) -> String {
    let p = gen_program(seed, short);
    let mut s = String::new();
    for (k, b) in p.bhs.iter().enumerate() {
        let _ = writeln!(s, "Bh({k}) with_self={} runs={:?}", b.with_self, b.runs);
    }
    let _ = writeln!(s, "oneshots={:?}", p.oneshots);
    let _ = writeln!(
        s,
        "ops={:?}\ndrain={} context_first={} after_death={:?}",
        p.ops, p.drain, p.context_first, p.after_death
    );
    s
}

/// The PRNG is deterministic and spreads seeds (a failing seed must replay the same program).
#[test]
fn programs_are_reproducible() {
    let a = gen_program(42, false);
    let b = gen_program(42, false);
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    assert_ne!(format!("{a:?}"), format!("{:?}", gen_program(43, false)));
}

/// The model itself rejects the defects it is there to catch (so a passing sweep means
/// something).
#[test]
fn the_model_rejects_known_bad_behaviour() {
    let real = |drops: u32, runs: u32| Real {
        runs: vec![runs],
        drops: vec![drops],
        is_scheduled: vec![None],
        oneshot_drops: Vec::new(),
    };
    // A run after the delete.
    let mut m = Model::new(1);
    m.create(0);
    m.schedule(0, false, false);
    m.delete(0, false);
    m.poll_begin(false);
    assert!(m.on_run(Node::Bh(0), &[]).is_err());

    // A scheduled BH that the pass skipped, and a wrong progress value.
    let mut m = Model::new(1);
    m.create(0);
    m.schedule(0, false, false);
    m.poll_begin(false);
    assert!(m.clone().poll_end(false, &[]).is_err());
    let mut m = Model::new(1);
    m.create(0);
    m.poll_begin(false);
    assert!(m.poll_end(true, &[]).is_err());

    // Re-entry, and the spin: nested blocking polls that keep counting the rescheduled running
    // BH as pending (the first one may, before a nested pass has met it).
    let mut m = Model::new(1);
    m.create(0);
    m.schedule(0, false, false);
    m.poll_begin(false);
    m.on_run(Node::Bh(0), &[]).unwrap();
    m.schedule(0, false, false);
    m.poll_begin(true);
    assert!(m.clone().on_run(Node::Bh(0), &[]).is_err());
    m.poll_end(false, &[]).unwrap();
    m.poll_begin(true);
    assert!(m.poll_end(false, &[]).is_err(), "expects an unbounded wait");

    // A deleted closure that a later pass did not free, one freed while its handle lives, and
    // one freed twice.
    let mut m = Model::new(1);
    m.create(0);
    assert!(m.check(&real(1, 0)).is_err());
    m.delete(0, false);
    assert!(m.check(&real(2, 0)).is_err());
    m.poll_begin(false);
    m.poll_end(false, &[]).unwrap();
    assert!(m.check(&real(0, 0)).is_err());
    assert!(m.check(&real(1, 0)).is_ok());
}
