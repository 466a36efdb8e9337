//! What a user sees of a loop's inner workings: the `Stats` counters of iterations and
//! callbacks, and the `tracing` spans around the phases of an iteration, with their durations.

use aio_core::{ClockType, Scale};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

#[path = "support/ctx.rs"]
mod support;
use support::ctx;

/// A subscriber that records, per span name, how often it was entered and for how long.
#[derive(Default)]
struct Spans {
    inner: Mutex<SpansInner>,
}

#[derive(Default)]
struct SpansInner {
    next: u64,
    names: HashMap<u64, &'static str>,
    entered: HashMap<u64, Instant>,
    /// name → (entries, total time inside)
    seen: HashMap<&'static str, (u64, Duration)>,
    /// names of spans with their parent at creation (the current span then)
    parents: Vec<(&'static str, Option<&'static str>)>,
    stack: Vec<u64>,
}

struct Shared(Arc<Spans>);

impl Subscriber for Shared {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut s = self.0.inner.lock().unwrap();
        s.next += 1;
        let id = s.next;
        let name = span.metadata().name();
        s.names.insert(id, name);
        let parent = s.stack.last().and_then(|p| s.names.get(p).copied());
        s.parents.push((name, parent));
        Id::from_u64(id)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, span: &Id) {
        let mut s = self.0.inner.lock().unwrap();
        s.entered.insert(span.into_u64(), Instant::now());
        s.stack.push(span.into_u64());
    }
    fn exit(&self, span: &Id) {
        let mut s = self.0.inner.lock().unwrap();
        let id = span.into_u64();
        s.stack.retain(|&x| x != id);
        let start = s.entered.remove(&id).expect("exit after enter");
        let name = s.names[&id];
        let e = s.seen.entry(name).or_default();
        e.0 += 1;
        e.1 += start.elapsed();
    }
}

#[test]
fn stats_count_iterations_and_each_kind_of_callback() {
    let ctx = ctx();
    let before = ctx.stats();
    assert_eq!(
        (
            before.iterations,
            before.bh_calls,
            before.handler_calls,
            before.timer_calls,
            before.task_polls
        ),
        (0, 0, 0, 0, 0)
    );
    // One BH, one readable fd, one due timer, one task polled twice.
    let bh = ctx.bh(|| {});
    bh.schedule();
    let (r, w) = std::io::pipe().unwrap();
    (&w).write_all_once();
    let _h = ctx.fd_handler(r).on_read(|_| {}).register().unwrap();
    let timer = ctx.timer(ClockType::Realtime, Scale::NS, || {});
    timer.arm_ns(0);
    let task = ctx.spawn_local(async {
        aio_core::task::yield_now().await;
    });
    let mut iterations = 0;
    while !task.is_finished() {
        ctx.poll_nonblocking();
        iterations += 1;
    }
    let after = ctx.stats();
    assert_eq!(after.iterations, iterations);
    assert_eq!(after.task_polls, 2, "spawned, then woken once by yield_now");
    assert_eq!(after.timer_calls, 1);
    // The fd stays readable: one read callback per iteration.
    assert_eq!(after.handler_calls, iterations);
    // The plain BH once, and the task's BH once per poll.
    assert_eq!(after.bh_calls, 1 + 2);
    drop(task);
}

/// Writes one byte, for a pipe that must be readable.
trait WriteOnce {
    fn write_all_once(self);
}

impl WriteOnce for &std::io::PipeWriter {
    fn write_all_once(self) {
        use std::io::Write;
        let mut w = self;
        w.write_all(b"x").unwrap();
    }
}

#[test]
fn each_phase_of_an_iteration_is_a_span_inside_the_iteration_span() {
    let spans = Arc::new(Spans::default());
    let dispatcher = tracing::Dispatch::new(Shared(spans.clone()));
    tracing::dispatcher::with_default(&dispatcher, || {
        let ctx = ctx();
        let bh = ctx.bh(|| {});
        bh.schedule();
        let (r, w) = std::io::pipe().unwrap();
        (&w).write_all_once();
        let _h = ctx.fd_handler(r).on_read(|_| {}).register().unwrap();
        let timer = ctx.timer(ClockType::Realtime, Scale::NS, || {});
        timer.arm_ns(0);
        // Blocking: the BH makes the wait's timeout zero, so this returns at once.
        ctx.poll();
    });
    let s = spans.inner.lock().unwrap();
    for name in [
        "aio_poll",
        "aio_wait",
        "aio_bh_pass",
        "aio_dispatch",
        "aio_timers",
    ] {
        let (entries, _) = s.seen.get(name).copied().unwrap_or_default();
        assert!(entries >= 1, "no {name} span: {:?}", s.seen);
    }
    for (name, parent) in &s.parents {
        if *name != "aio_poll" && name.starts_with("aio_") {
            assert_eq!(*parent, Some("aio_poll"), "{name} outside its iteration");
        }
    }
    // The iteration's span lasts at least as long as its phases together.
    let phases: Duration = ["aio_wait", "aio_bh_pass", "aio_dispatch", "aio_timers"]
        .iter()
        .map(|n| s.seen[n].1)
        .sum();
    assert!(s.seen["aio_poll"].1 >= phases);
}

#[test]
fn a_wait_span_records_a_sleep() {
    let spans = Arc::new(Spans::default());
    let dispatcher = tracing::Dispatch::new(Shared(spans.clone()));
    tracing::dispatcher::with_default(&dispatcher, || {
        let ctx = ctx();
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let timer = ctx.timer(ClockType::Realtime, Scale::MS, move || {
            f.store(true, SeqCst)
        });
        // The deadline is in whole milliseconds of the clock, so the timer may fire a little
        // before 20 ms have passed on `Instant`: wait for the timer itself, since a blocking
        // poll after it has fired has nothing left to wake it.
        timer.arm(ctx.now_ns(ClockType::Realtime) / 1_000_000 + 20);
        while !fired.load(SeqCst) {
            ctx.poll();
        }
    });
    let s = spans.inner.lock().unwrap();
    let (_, waited) = s.seen["aio_wait"];
    assert!(
        waited >= Duration::from_millis(15),
        "the loop slept ~20 ms, the wait spans say {waited:?}"
    );
}
