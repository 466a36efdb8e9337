//! B9 (docs/benchmarks.md): the CPU an idle loop costs. Each subject ([`Idle`]) is a thread sitting in
//! its loop: an aio context in `ctx.poll()` (blocking) with some polling parameters, or a tokio
//! `current_thread` runtime in `block_on`. Every subject is first made active, so that an aio
//! context has handlers in its poll set and grown windows: `activity` times, an
//! [`EventNotifier`] registered with `set_event_notifier` is set from this thread, then as many
//! remote BH schedules (tokio: as many messages on an mpsc channel), each waited for before the
//! next. Then all subjects sit idle together: for `settle` (the windows' decay), then for
//! `measure`, over which this thread reads, without waking them, each subject thread's CPU
//! clock (`pthread_getcpuclockid`, user + system, ns resolution), its context switches
//! (`/proc/self/task/<tid>/status`) and, for aio, how many times `ctx.poll()` returned.

use std::io;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use aio::{BottomHalf, ContextHandle, EventNotifier, PollParams};

use crate::{new_polling_context, tokio_runtime};

/// A loop to watch while idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// An aio context with these polling parameters, one event notifier registered.
    Aio(PollParams),
    /// A tokio `current_thread` runtime (`enable_all`) in `block_on` of an mpsc receive loop.
    Tokio,
}

/// What one idle subject cost over the measurement.
#[derive(Debug, Clone, Copy)]
pub struct IdleReport {
    /// The subject.
    pub subject: Idle,
    /// Wall time of the measurement.
    pub wall: Duration,
    /// CPU time (user + system) of the loop's thread over it.
    pub cpu: Duration,
    /// Voluntary context switches (sleeps, so wake-ups) of the loop's thread over it.
    pub voluntary_switches: u64,
    /// Involuntary context switches (preemptions) of the loop's thread over it.
    pub involuntary_switches: u64,
    /// aio: returns of `ctx.poll()` (loop iterations) over it.
    pub iterations: Option<u64>,
    /// aio: the context's polling window right after the activity (ns).
    pub window_after_activity_ns: Option<u64>,
    /// aio: the context's polling window at the end, read by the loop's thread on the wake-up
    /// that stops it (ns).
    pub window_at_end_ns: Option<u64>,
    /// aio: the poll hits of the whole life of the context (activity included).
    pub poll_hits: Option<u64>,
}

impl IdleReport {
    /// CPU time per second of wall time, in µs.
    pub fn cpu_us_per_s(&self) -> f64 {
        self.cpu.as_nanos() as f64 / 1e3 / self.wall.as_secs_f64()
    }

    /// Events per second of wall time.
    pub fn per_s(&self, count: u64) -> f64 {
        count as f64 / self.wall.as_secs_f64()
    }
}

/// What a subject thread publishes for this thread to read while it sleeps.
#[derive(Debug, Default)]
struct Probe {
    /// The kernel thread id (for `/proc/self/task/<tid>`).
    tid: AtomicI32,
    /// Activity events the loop has handled.
    handled: AtomicU64,
    /// Returns of `ctx.poll()`.
    iterations: AtomicU64,
    /// `poll_window()` after the last iteration, in ns.
    window_ns: AtomicU64,
    /// Poll hits after the last iteration.
    poll_hits: AtomicU64,
}

impl Probe {
    /// Adds one to `counter`; only the subject thread writes its counters, so a load and a store
    /// are exact.
    fn bump(counter: &AtomicU64) {
        // Relaxed: a count; the reader only compares it, no data rides on it.
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        // Relaxed: as in `bump`.
        counter.load(Ordering::Relaxed)
    }
}

/// How this thread pokes and stops a subject.
enum Poke {
    Aio {
        notifier: Arc<EventNotifier>,
        bh: BottomHalf,
        ctx: ContextHandle,
        stop: Arc<AtomicBool>,
    },
    Tokio(Option<tokio::sync::mpsc::UnboundedSender<()>>),
}

struct Subject {
    idle: Idle,
    probe: Arc<Probe>,
    poke: Poke,
    thread: JoinHandle<()>,
}

impl Subject {
    fn start(idle: Idle) -> Subject {
        let probe = Arc::new(Probe::default());
        let p = probe.clone();
        let (tx, rx) = mpsc::channel::<Poke>();
        let thread = thread::Builder::new()
            .name("b9-idle".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                p.tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
                match idle {
                    Idle::Aio(params) => aio_subject(params, &p, &tx),
                    Idle::Tokio => tokio_subject(&p, &tx),
                }
            })
            .expect("B9: cannot spawn a subject thread");
        // The channel's hand-over orders the tid store before this thread's reads.
        let poke = rx.recv().expect("B9: the subject thread died");
        Subject {
            idle,
            probe,
            poke,
            thread,
        }
    }

    /// Waits until the subject has handled `n` activity events.
    fn wait_handled(&self, n: u64) {
        while Probe::get(&self.probe.handled) < n {
            assert!(
                !self.thread.is_finished(),
                "B9: the subject thread ended early"
            );
            std::hint::spin_loop();
        }
    }

    fn activity(&self, n: u64) {
        let mut handled = Probe::get(&self.probe.handled);
        match &self.poke {
            Poke::Aio { notifier, bh, .. } => {
                for _ in 0..n {
                    notifier.set().expect("B9: EventNotifier::set failed");
                    handled += 1;
                    self.wait_handled(handled);
                }
                for _ in 0..n {
                    bh.schedule();
                    handled += 1;
                    self.wait_handled(handled);
                }
            }
            Poke::Tokio(tx) => {
                let tx = tx.as_ref().expect("B9: stopped");
                for _ in 0..2 * n {
                    tx.send(()).expect("B9: the tokio subject died");
                    handled += 1;
                    self.wait_handled(handled);
                }
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        let tid = self.probe.tid.load(Ordering::Relaxed);
        let (voluntary, involuntary) = context_switches(tid).unwrap_or((0, 0));
        Snapshot {
            at: Instant::now(),
            cpu: thread_cpu(&self.thread).expect("B9: cannot read a thread's CPU clock"),
            voluntary,
            involuntary,
            iterations: Probe::get(&self.probe.iterations),
        }
    }

    fn stop(mut self) -> Arc<Probe> {
        match &mut self.poke {
            Poke::Aio { stop, ctx, .. } => {
                // Release: the subject's Acquire load after its wake-up sees it.
                stop.store(true, Ordering::Release);
                ctx.notify();
            }
            Poke::Tokio(tx) => drop(tx.take()),
        }
        self.thread.join().expect("B9: a subject thread panicked");
        self.probe
    }
}

fn aio_subject(params: PollParams, p: &Arc<Probe>, tx: &mpsc::Sender<Poke>) {
    let ctx = new_polling_context(params);
    let notifier = Arc::new(EventNotifier::new().expect("B9: cannot create an EventNotifier"));
    let handled = p.clone();
    let _handler = ctx
        .set_event_notifier(&notifier, move |e| {
            if e.test_and_clear() {
                Probe::bump(&handled.handled);
            }
        })
        .expect("B9: set_event_notifier failed");
    let handled = p.clone();
    let bh = ctx.bh(move || Probe::bump(&handled.handled));
    let stop = Arc::new(AtomicBool::new(false));
    tx.send(Poke::Aio {
        notifier,
        bh,
        ctx: ctx.handle(),
        stop: stop.clone(),
    })
    .expect("B9: the bench thread died");
    // Acquire: pairs with the Release store in `Subject::stop`.
    while !stop.load(Ordering::Acquire) {
        ctx.poll();
        Probe::bump(&p.iterations);
        // Relaxed: values for a report; nothing rides on them.
        p.window_ns
            .store(ctx.poll_window().as_nanos() as u64, Ordering::Relaxed);
        p.poll_hits.store(ctx.stats().poll_hits, Ordering::Relaxed);
    }
}

fn tokio_subject(p: &Arc<Probe>, tx: &mpsc::Sender<Poke>) {
    let rt = tokio_runtime();
    let (msgs, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    tx.send(Poke::Tokio(Some(msgs)))
        .expect("B9: the bench thread died");
    rt.block_on(async {
        while rx.recv().await.is_some() {
            Probe::bump(&p.handled);
        }
    });
}

#[derive(Debug, Clone, Copy)]
struct Snapshot {
    at: Instant,
    cpu: Duration,
    voluntary: u64,
    involuntary: u64,
    iterations: u64,
}

/// The CPU time (user + system) `thread` has used so far, from its CPU-time clock.
fn thread_cpu<T>(thread: &JoinHandle<T>) -> io::Result<Duration> {
    let mut clock: libc::clockid_t = 0;
    // The pthread_t is that of a thread not joined yet (its JoinHandle is borrowed), so it is
    // valid; the pointer is to a local that outlives the call.
    // SAFETY: the conditions just stated hold for this call.
    let r = unsafe { libc::pthread_getcpuclockid(thread.as_pthread_t(), &mut clock) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock` is a clock id returned above; the pointer is to a local `timespec`.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// The voluntary and involuntary context switches of thread `tid` of this process.
fn context_switches(tid: i32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((
        field("voluntary_ctxt_switches:")?,
        field("nonvoluntary_ctxt_switches:")?,
    ))
}

/// Starts every subject, makes each active (`activity` notifier sets and as many remote BH
/// schedules, or 2 × `activity` tokio messages), lets them all sit idle for `settle`, then
/// measures them all over `measure`. Reports in the order of `subjects`.
///
/// # Panics
///
/// If a thread, context or runtime cannot be created, a CPU clock cannot be read, or a subject
/// panicked.
pub fn run(
    subjects: &[Idle],
    activity: u64,
    settle: Duration,
    measure: Duration,
) -> Vec<IdleReport> {
    let started: Vec<Subject> = subjects.iter().map(|&s| Subject::start(s)).collect();
    let mut after_activity = Vec::with_capacity(started.len());
    for s in &started {
        s.activity(activity);
        // The loop stores its window after the iteration that handled the last event.
        thread::sleep(Duration::from_millis(10));
        after_activity.push(Probe::get(&s.probe.window_ns));
    }
    thread::sleep(settle);
    let first: Vec<Snapshot> = started.iter().map(Subject::snapshot).collect();
    thread::sleep(measure);
    let last: Vec<Snapshot> = started.iter().map(Subject::snapshot).collect();
    started
        .into_iter()
        .zip(first.iter().zip(&last))
        .zip(after_activity)
        .map(|((s, (a, b)), window_after)| {
            let idle = s.idle;
            let aio = matches!(idle, Idle::Aio(_));
            let probe = s.stop();
            IdleReport {
                subject: idle,
                wall: b.at - a.at,
                cpu: b.cpu - a.cpu,
                voluntary_switches: b.voluntary - a.voluntary,
                involuntary_switches: b.involuntary - a.involuntary,
                iterations: aio.then_some(b.iterations - a.iterations),
                window_after_activity_ns: aio.then_some(window_after),
                window_at_end_ns: aio.then(|| Probe::get(&probe.window_ns)),
                poll_hits: aio.then(|| Probe::get(&probe.poll_hits)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU time of this thread, from its own CPU-time clock.
    fn own_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid clock id and a pointer to a local `timespec`.
        let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(r, 0);
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// `thread_cpu` reads the other thread's clock, not the caller's: a thread that burnt at
    /// least 20 ms of CPU and then sleeps reads at least that, while this thread, which only
    /// slept, has used less than that before it reads; and its context switches are readable.
    #[test]
    fn thread_cpu_reads_the_given_thread() {
        let (tid_tx, tid_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let t = thread::spawn(move || {
            while own_cpu() < Duration::from_millis(20) {
                std::hint::spin_loop();
            }
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = stop_rx.recv();
        });
        let tid = tid_rx.recv().unwrap();
        let mine = own_cpu();
        let theirs = thread_cpu(&t).unwrap();
        assert!(theirs >= Duration::from_millis(20), "{theirs:?}");
        assert!(mine < Duration::from_millis(20), "{mine:?}");
        assert!(context_switches(tid).is_some());
        drop(stop_tx);
        t.join().unwrap();
    }
}
