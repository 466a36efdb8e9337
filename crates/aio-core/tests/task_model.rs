//! Model-based randomized test of tasks: seeded random programs spawn tasks with random
//! scripts (yield, park until released, spawn a child and await it, spawn a child and
//! `block_on` it from inside the task, panic), and a driver on the home thread interleaves
//! loop iterations, releases of parked tasks (from the home thread, or from a helper thread
//! that acknowledges each command so that a program stays deterministic), aborts and detaches,
//! and finally either runs everything to the end or drops the context with tasks unfinished.
//!
//! What is checked against the model:
//!
//! * a task never takes a step after its abort was requested (between loop iterations), and an
//!   aborted unfinished task's handle says cancelled;
//! * a task that reaches `Panic` reports the panic; every other task returns its id;
//! * a released task always runs again (no lost wake-up: the program ends within a bounded
//!   number of iterations), and a parked task never passes its park before its release;
//! * every task's future is dropped exactly once, by completion, abort, or the context's drop,
//!   and after the context's drop nothing is left (no leak, no double drop);
//! * a nested `block_on` inside a task sees its child finish, whatever else runs meanwhile.
//!
//! `AIO_TASK_MODEL_SEED=<n>` runs one seed; `AIO_TASK_MODEL_PROGRAMS=<n>` sets the count (2000
//! natively, 6 under Miri). A failure names its seed.

use aio_core::AioContext;
use aio_core::JoinHandle;
use aio_core::task::yield_now;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Poll, Waker};
use std::thread;

#[path = "support/ctx.rs"]
mod support;
use support::ctx;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Clone, Debug)]
enum Step {
    Yield,
    /// Wait until the driver releases this task (only in root tasks: the driver cannot run
    /// while a task blocks the home thread in `block_on`).
    Park,
    /// Spawn a child with this script and await its handle.
    Await(Vec<Step>),
    /// Spawn a child with this script and `block_on` its handle from inside the task.
    BlockOn(Vec<Step>),
    Panic,
}

fn script(rng: &mut Rng, depth: u32, may_park: bool) -> Vec<Step> {
    let len = rng.below(5);
    (0..len)
        .map(|_| match rng.below(if depth < 2 { 10 } else { 7 }) {
            0..=2 => Step::Yield,
            3..=5 if may_park => Step::Park,
            3..=5 => Step::Yield,
            6 if rng.below(4) == 0 => Step::Panic,
            6 => Step::Yield,
            7 | 8 => Step::Await(script(rng, depth + 1, may_park)),
            _ => Step::BlockOn(script(rng, depth + 1, false)),
        })
        .collect()
}

/// Whether running `s` reaches a panic (its own, or a child's propagated through `expect`).
fn panics(s: &[Step]) -> bool {
    s.iter().any(|step| match step {
        Step::Panic => true,
        Step::Await(c) | Step::BlockOn(c) => panics(c),
        _ => false,
    })
}

/// What the tasks share with the driver.
#[derive(Default)]
struct World {
    /// Per root task: released flag and parked waker.
    parks: Vec<Mutex<(bool, Option<Waker>)>>,
    /// Per root task: abort requested.
    aborted: Vec<AtomicBool>,
    /// A task stepped after its abort.
    violations: Mutex<Vec<String>>,
    created: AtomicUsize,
    dropped: AtomicUsize,
}

struct Tracked(Arc<World>);
impl Drop for Tracked {
    fn drop(&mut self) {
        self.0.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

/// A task's body: `root` is the root task whose abort flag and park slot it uses.
fn body(
    world: Arc<World>,
    root: usize,
    steps: Vec<Step>,
    is_root: bool,
) -> Pin<Box<dyn Future<Output = usize> + Send>> {
    world.created.fetch_add(1, Ordering::SeqCst);
    let tracked = Tracked(world.clone());
    Box::pin(async move {
        let _tracked = tracked;
        for step in steps {
            if is_root && world.aborted[root].load(Ordering::SeqCst) {
                world
                    .violations
                    .lock()
                    .unwrap()
                    .push(format!("task {root} stepped after its abort"));
            }
            match step {
                Step::Yield => yield_now().await,
                Step::Park => {
                    poll_fn(|cx| {
                        let mut p = world.parks[root].lock().unwrap();
                        if p.0 {
                            p.0 = false;
                            Poll::Ready(())
                        } else {
                            p.1 = Some(cx.waker().clone());
                            Poll::Pending
                        }
                    })
                    .await
                }
                Step::Await(child) => {
                    let h = AioContext::current().unwrap().spawn(body(
                        world.clone(),
                        root,
                        child,
                        false,
                    ));
                    assert_eq!(h.await.expect("child result"), root);
                }
                Step::BlockOn(child) => {
                    let ctx = AioContext::current().unwrap();
                    let h = ctx.spawn(body(world.clone(), root, child, false));
                    assert_eq!(ctx.block_on(h).expect("child result"), root);
                }
                Step::Panic => panic!("scripted panic"),
            }
        }
        root
    })
}

enum Remote {
    Release(usize),
}

fn release(world: &World, id: usize) {
    let waker = {
        let mut p = world.parks[id].lock().unwrap();
        p.0 = true;
        p.1.take()
    };
    if let Some(w) = waker {
        w.wake();
    }
}

/// How many root results of each kind the programs saw: (returned, panicked, cancelled).
#[derive(Default, Debug)]
struct Seen {
    ok: usize,
    panicked: usize,
    cancelled: usize,
}

fn run_program(seed: u64, seen: &mut Seen) -> Result<(), String> {
    let mut rng = Rng(seed | 1);
    let roots = 1 + rng.below(6);
    let scripts: Vec<Vec<Step>> = (0..roots).map(|_| script(&mut rng, 0, true)).collect();
    let world = Arc::new(World {
        parks: (0..roots).map(|_| Mutex::default()).collect(),
        aborted: (0..roots).map(|_| AtomicBool::new(false)).collect(),
        ..World::default()
    });
    // The helper thread: releases on command, acknowledging each.
    let (cmd_tx, cmd_rx) = mpsc::channel::<Remote>();
    let (ack_tx, ack_rx) = mpsc::channel::<()>();
    let w = world.clone();
    let helper = thread::spawn(move || {
        for Remote::Release(id) in cmd_rx {
            release(&w, id);
            ack_tx.send(()).unwrap();
        }
    });
    let ctx = ctx();
    let mut handles: Vec<Option<JoinHandle<usize>>> = scripts
        .iter()
        .enumerate()
        .map(|(id, s)| {
            let f = body(world.clone(), id, s.clone(), true);
            Some(if rng.below(2) == 0 {
                ctx.spawn(f)
            } else {
                ctx.handle().spawn(f)
            })
        })
        .collect();
    let mut detached = vec![false; roots];
    let steps = rng.below(40);
    for _ in 0..steps {
        let id = rng.below(roots);
        match rng.below(10) {
            0..=3 => {
                ctx.poll_nonblocking();
            }
            4 | 5 => release(&world, id),
            6 | 7 => {
                cmd_tx.send(Remote::Release(id)).unwrap();
                ack_rx.recv().unwrap();
            }
            8 => {
                if let Some(h) = &handles[id] {
                    if !h.is_finished() {
                        world.aborted[id].store(true, Ordering::SeqCst);
                    }
                    h.abort();
                }
            }
            _ => {
                if rng.below(3) == 0 && handles[id].take().is_some() {
                    detached[id] = true;
                }
            }
        }
    }
    let drop_early = rng.below(4) == 0;
    if !drop_early {
        // Run to the end: keep releasing; a lost wake-up shows as a task that never finishes.
        let mut rounds = 0;
        // (A task spawned through the handle is in no table until its one-shot has run.)
        while ctx.task_count() > 0 || handles.iter().flatten().any(|h| !h.is_finished()) {
            rounds += 1;
            if rounds > 10_000 {
                return Err(format!("tasks left unfinished: {}", ctx.task_count()));
            }
            for id in 0..roots {
                release(&world, id);
            }
            ctx.poll_nonblocking();
        }
        for (id, h) in handles.iter_mut().enumerate() {
            let Some(h) = h.take() else { continue };
            if !h.is_finished() {
                return Err(format!("task {id}'s handle not finished after its task"));
            }
            let result = ctx.block_on(h);
            let aborted = world.aborted[id].load(Ordering::SeqCst);
            match (&result, aborted, panics(&scripts[id])) {
                (Err(e), true, _) if e.is_cancelled() => seen.cancelled += 1,
                (Err(e), false, true) if e.is_panic() => seen.panicked += 1,
                (Ok(v), false, false) if *v == id => seen.ok += 1,
                _ => {
                    return Err(format!(
                        "task {id} (aborted {aborted}, script {:?}): {result:?}",
                        scripts[id]
                    ));
                }
            }
        }
        drop(ctx);
    } else {
        let unfinished: Vec<usize> = (0..roots)
            .filter(|&id| handles[id].as_ref().is_some_and(|h| !h.is_finished()))
            .collect();
        drop(ctx);
        for id in unfinished {
            let h = handles[id].take().unwrap();
            let c = crate::ctx();
            let result = c.block_on(h);
            seen.cancelled += 1;
            if !result.as_ref().is_err_and(|e| e.is_cancelled()) {
                return Err(format!(
                    "task {id} unfinished at the context's drop: {result:?}"
                ));
            }
        }
    }
    drop(cmd_tx);
    helper.join().unwrap();
    let _ = detached;
    if let Some(v) = world.violations.lock().unwrap().first() {
        return Err(v.clone());
    }
    let (created, dropped) = (
        world.created.load(Ordering::SeqCst),
        world.dropped.load(Ordering::SeqCst),
    );
    if created != dropped {
        return Err(format!("{created} futures created, {dropped} dropped"));
    }
    Ok(())
}

#[test]
fn random_task_programs_match_the_model() {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let seeds: Vec<u64> = match env("AIO_TASK_MODEL_SEED") {
        Some(seed) => vec![seed],
        None => {
            let n = env("AIO_TASK_MODEL_PROGRAMS").unwrap_or(if cfg!(miri) { 6 } else { 2000 });
            (1..=n)
                .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
                .collect()
        }
    };
    // Scripted panics are expected: keep them off the output.
    std::panic::set_hook(Box::new(|info| {
        if !info.to_string().contains("scripted panic") {
            eprintln!("{info}");
        }
    }));
    let one = seeds.len() == 1;
    let mut seen = Seen::default();
    for seed in seeds {
        if let Err(e) = run_program(seed, &mut seen) {
            panic!("seed {seed}: {e}");
        }
    }
    println!("root results: {seen:?}");
    if !one && !cfg!(miri) {
        assert!(
            seen.ok > 0 && seen.panicked > 0 && seen.cancelled > 0,
            "the programs reach every outcome: {seen:?}"
        );
    }
}
