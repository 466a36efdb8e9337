//! Seeded random programs of handler operations issued from the home thread and from a worker
//! thread (register, replace, remove, external disable/enable, notifier set/clear, polls),
//! checked step by step against a model of the documented semantics: a callback runs only
//! while its registration is current, a ready handler that is current and not disabled runs
//! on the next poll, no callback starts after `remove` or `disable_external` returned, errors
//! are the model's, and every closure is freed once, on the home thread.
//!
//! `ANY_THREAD_SEEDS=a..b` picks the seeds (default `0..200`, fewer under Miri).

use aio_core::{AioContext, ContextHandle, EventNotifier, RemoteFdHandler};
use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

#[path = "support/ctx.rs"]
mod support;
use support::ctx;

const SLOTS: usize = 4;
const STEPS: usize = if cfg!(miri) { 30 } else { 200 };
const HANG: Duration = Duration::from_secs(20);

/// xorshift64*: small, seeded, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a callback records: (slot, generation, thread).
type Log = Arc<Mutex<Vec<(usize, u64, thread::ThreadId)>>>;

/// Counts closure drops per generation, with the dropping thread.
type Drops = Arc<Mutex<Vec<(u64, thread::ThreadId)>>>;

struct Token(u64, Drops);

impl Drop for Token {
    fn drop(&mut self) {
        self.1
            .lock()
            .unwrap()
            .push((self.0, thread::current().id()));
    }
}

/// The model of one slot.
#[derive(Clone, Copy, Default)]
struct Slot {
    /// The current registration's generation, if registered.
    generation: Option<u64>,
    external: bool,
    /// Whether the slot's notifier is set (ready).
    set: bool,
}

/// The handlers of the slots, shared with the worker.
type Handlers = Arc<Mutex<Vec<Option<RemoteFdHandler>>>>;

/// A command for the worker: runs there, answers with an io::Result.
type Command = Box<dyn FnOnce() -> io::Result<()> + Send>;

struct World {
    ctx: AioContext,
    handle: ContextHandle,
    notifiers: Vec<Arc<EventNotifier>>,
    handlers: Handlers,
    log: Log,
    drops: Drops,
    to_worker: mpsc::Sender<Command>,
    from_worker: mpsc::Receiver<io::Result<()>>,
    home: thread::ThreadId,
}

impl World {
    /// Runs `cmd` on the worker (or here), polling meanwhile, and returns its answer.
    fn run(&self, remote: bool, cmd: Command) -> io::Result<()> {
        if !remote {
            return cmd();
        }
        self.to_worker.send(cmd).unwrap();
        let start = Instant::now();
        loop {
            if let Ok(r) = self.from_worker.try_recv() {
                return r;
            }
            self.ctx.poll_nonblocking();
            assert!(start.elapsed() < HANG, "worker command hung");
            thread::yield_now();
        }
    }

    fn register(
        &self,
        remote: bool,
        slot: usize,
        generation: u64,
        external: bool,
    ) -> io::Result<()> {
        let (handle, n, handlers) = (
            self.handle.clone(),
            self.notifiers[slot].clone(),
            self.handlers.clone(),
        );
        let (log, token) = (self.log.clone(), Token(generation, self.drops.clone()));
        self.run(
            remote,
            Box::new(move || {
                let h = handle
                    .fd_handler(n.clone())
                    .external(external)
                    .on_read(move |_| {
                        let _keep = &token;
                        log.lock()
                            .unwrap()
                            .push((slot, generation, thread::current().id()));
                    })
                    .register()?;
                handlers.lock().unwrap()[slot] = Some(h);
                Ok(())
            }),
        )
    }

    fn replace(
        &self,
        remote: bool,
        slot: usize,
        generation: u64,
        external: bool,
    ) -> io::Result<()> {
        let (handle, n, handlers) = (
            self.handle.clone(),
            self.notifiers[slot].clone(),
            self.handlers.clone(),
        );
        let (log, token) = (self.log.clone(), Token(generation, self.drops.clone()));
        self.run(
            remote,
            Box::new(move || {
                let mut h = handlers.lock().unwrap()[slot].take().unwrap();
                let r = handle
                    .fd_handler(n.clone())
                    .external(external)
                    .on_read(move |_| {
                        let _keep = &token;
                        log.lock()
                            .unwrap()
                            .push((slot, generation, thread::current().id()));
                    })
                    .replace(&mut h);
                handlers.lock().unwrap()[slot] = Some(h);
                r
            }),
        )
    }

    fn remove(&self, remote: bool, slot: usize) {
        let handlers = self.handlers.clone();
        self.run(
            remote,
            Box::new(move || {
                let h = handlers.lock().unwrap()[slot].take().unwrap();
                drop(h);
                Ok(())
            }),
        )
        .unwrap();
    }
}

fn run_program(seed: u64) {
    let mut rng = Rng::new(seed);
    let ctx = ctx();
    let (to_worker, worker_rx) = mpsc::channel::<Command>();
    let (worker_tx, from_worker) = mpsc::channel();
    let worker = thread::spawn(move || {
        for cmd in worker_rx {
            worker_tx.send(cmd()).unwrap();
        }
    });
    let w = World {
        handle: ctx.handle(),
        ctx,
        notifiers: (0..SLOTS)
            .map(|_| Arc::new(EventNotifier::new().unwrap()))
            .collect(),
        handlers: Arc::new(Mutex::new((0..SLOTS).map(|_| None).collect())),
        log: Arc::default(),
        drops: Arc::default(),
        to_worker,
        from_worker,
        home: thread::current().id(),
    };
    let mut model = [Slot::default(); SLOTS];
    let mut disabled = 0u32;
    let mut next_gen = 1u64;
    let mut made = 0usize;
    // Generations that may still appear in the log (current ones, and during a command the
    // one being replaced); all others must not.
    let allowed = |model: &[Slot; SLOTS], extra: &[u64]| -> HashSet<u64> {
        model
            .iter()
            .filter_map(|s| s.generation)
            .chain(extra.iter().copied())
            .collect()
    };
    let check_log = |allowed: &HashSet<u64>, step: usize| {
        for &(slot, generation, thread) in w.log.lock().unwrap().iter() {
            assert!(
                allowed.contains(&generation),
                "seed {seed} step {step}: slot {slot} ran generation {generation}, not current"
            );
            assert_eq!(
                thread, w.home,
                "seed {seed}: a callback ran off the home thread"
            );
        }
        w.log.lock().unwrap().clear();
    };
    for step in 0..STEPS {
        let remote = rng.below(2) == 0;
        let slot = rng.below(SLOTS as u64) as usize;
        match rng.below(10) {
            0 | 1 => {
                let (generation, external) = (next_gen, rng.below(3) == 0);
                next_gen += 1;
                made += 1;
                let r = w.register(remote, slot, generation, external);
                match model[slot].generation {
                    None => {
                        r.unwrap_or_else(|e| panic!("seed {seed} step {step}: register: {e}"));
                        model[slot].generation = Some(generation);
                        model[slot].external = external;
                    }
                    Some(_) => assert_eq!(
                        r.unwrap_err().kind(),
                        io::ErrorKind::AlreadyExists,
                        "seed {seed} step {step}"
                    ),
                }
                check_log(&allowed(&model, &[]), step);
            }
            2 => {
                let Some(old) = model[slot].generation else {
                    continue;
                };
                let (generation, external) = (next_gen, rng.below(3) == 0);
                next_gen += 1;
                made += 1;
                w.replace(remote, slot, generation, external)
                    .unwrap_or_else(|e| panic!("seed {seed} step {step}: replace: {e}"));
                // While the command was in flight the old generation could still run.
                check_log(&allowed(&model, &[old, generation]), step);
                model[slot].generation = Some(generation);
                model[slot].external = external;
            }
            3 => {
                let Some(old) = model[slot].generation else {
                    continue;
                };
                w.remove(remote, slot);
                // Until the worker returned, the old generation could run; from now on never.
                check_log(&allowed(&model, &[old]), step);
                model[slot].generation = None;
            }
            4 => {
                let handle = w.handle.clone();
                w.run(
                    remote,
                    Box::new(move || {
                        handle.disable_external();
                        Ok(())
                    }),
                )
                .unwrap();
                check_log(&allowed(&model, &[]), step);
                disabled += 1;
            }
            5 => {
                let handle = w.handle.clone();
                let r = w.run(
                    remote,
                    Box::new(move || {
                        handle
                            .enable_external()
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
                    }),
                );
                assert_eq!(r.is_ok(), disabled > 0, "seed {seed} step {step}: enable");
                disabled = disabled.saturating_sub(1);
                check_log(&allowed(&model, &[]), step);
            }
            6 => {
                let set = rng.below(2) == 0;
                if set {
                    w.notifiers[slot].set().unwrap();
                } else {
                    w.notifiers[slot].test_and_clear();
                }
                model[slot].set = set;
            }
            _ => {
                // A poll: exactly the current, ready, enabled handlers run, once each.
                w.ctx.poll_nonblocking();
                let mut ran: Vec<(usize, u64)> = w
                    .log
                    .lock()
                    .unwrap()
                    .drain(..)
                    .map(|(s, g, t)| {
                        assert_eq!(t, w.home, "seed {seed}: off the home thread");
                        (s, g)
                    })
                    .collect();
                ran.sort_unstable();
                let mut expected: Vec<(usize, u64)> = model
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.set && !(s.external && disabled > 0))
                    .filter_map(|(i, s)| s.generation.map(|g| (i, g)))
                    .collect();
                expected.sort_unstable();
                assert_eq!(ran, expected, "seed {seed} step {step}: who ran");
            }
        }
        // Every closure no longer registered has been freed once the removal was applied; a
        // poll applies what is queued.
        w.ctx.poll_nonblocking();
        w.log.lock().unwrap().clear();
        let live = model.iter().filter(|s| s.generation.is_some()).count();
        let start = Instant::now();
        while w.drops.lock().unwrap().len() != made - live {
            w.ctx.poll_nonblocking();
            assert!(
                start.elapsed() < HANG,
                "seed {seed} step {step}: {} closures freed, {} expected",
                w.drops.lock().unwrap().len(),
                made - live
            );
        }
    }
    let World {
        ctx,
        to_worker,
        drops,
        handlers,
        home,
        ..
    } = w;
    drop(to_worker);
    worker.join().unwrap();
    drop(ctx);
    assert_eq!(
        drops.lock().unwrap().len(),
        made,
        "seed {seed}: every closure freed"
    );
    let freed: HashSet<u64> = drops.lock().unwrap().iter().map(|&(g, _)| g).collect();
    assert_eq!(freed.len(), made, "seed {seed}: each closure freed once");
    assert!(
        drops.lock().unwrap().iter().all(|&(_, t)| t == home),
        "seed {seed}: closures are freed on the home thread"
    );
    // The remaining handles outlive the context: dropping them does nothing.
    drop(handlers);
}

#[test]
fn random_programs_match_the_model() {
    let default = if cfg!(miri) { 0..2 } else { 0..200 };
    let seeds = std::env::var("ANY_THREAD_SEEDS")
        .ok()
        .and_then(|s| {
            let (a, b) = s.split_once("..")?;
            Some(a.parse().ok()?..b.parse().ok()?)
        })
        .unwrap_or(default);
    let ran = Arc::new(AtomicUsize::new(0));
    for seed in seeds {
        run_program(seed);
        ran.fetch_add(1, Ordering::Relaxed);
    }
    assert!(ran.load(Ordering::Relaxed) > 0);
}
