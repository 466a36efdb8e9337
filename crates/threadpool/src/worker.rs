//! Worker threads: how one is created, what it does (take a request, run it, hand it to the
//! completion queue, repeat), how it waits when idle, and when it exits.
//!
//! C original: `worker_thread` and `do_spawn_thread` in `util/thread-pool.c`.
//!
//! Workers are detached: nothing ever joins one, so neither a shutdown nor a lower maximum
//! waits for a request that runs for a long time. A worker holds the pool's shared state (an
//! `Arc`), never the context's loop, and exits when it sees the pool closed or too many
//! threads; an idle one above the minimum exits after the idle timeout.

use crate::pool::{MAX_IDLE_SPIN, PoolShared};
use crate::sync::Arc;
use crate::sync::{AtomicBool, Condvar, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Where one idle worker sleeps. Each worker has its own, so that a waker picks which worker
/// to wake (the most recently idle) and knows that it woke exactly that one.
#[derive(Debug, Default)]
pub(crate) struct Parker {
    cond: Condvar,
    /// Set (under the pool lock) by whoever took this worker off the idle list to wake it.
    /// Only read and written under the pool lock; an atomic only because `Parker` is shared.
    woken: AtomicBool,
}

impl Parker {
    pub(crate) fn set_woken(&self) {
        self.woken.store(true, Ordering::Relaxed);
    }

    /// Wakes the worker; called after the pool lock is released, so that the worker does not
    /// wake up only to block on it.
    pub(crate) fn wake(&self) {
        self.cond.notify_one();
    }
}

/// Creates one worker thread, or returns the OS's refusal. The caller has counted it in `cur`
/// and `pending_threads`, and on error takes it out again.
pub(crate) fn start(shared: &Arc<PoolShared>) -> std::io::Result<()> {
    let s = shared.clone();
    let spawned = thread::Builder::new()
        .name(format!("aio-pool-{}", shared.id))
        .spawn(move || run(s));
    // Dropping the JoinHandle detaches the thread.
    spawned.map(|_| {
        shared.created.fetch_add(1, Ordering::Relaxed);
    })
}

/// Creates one worker thread of the creation chain. The caller has counted it in `cur` and
/// `pending_threads`.
pub(crate) fn spawn(shared: &Arc<PoolShared>) {
    match start(shared) {
        Ok(()) => {}
        Err(e) => {
            // Give up on this thread and on the chain it would have continued; the next
            // request that finds no worker asks again. Requests already queued wait until then
            // (or run on workers that exist).
            let mut st = shared.state.lock();
            st.pending_threads -= 1;
            st.cur -= 1 + st.new_threads;
            st.new_threads = 0;
            drop(st);
            tracing::warn!("threadpool: cannot create a worker thread: {e}");
        }
    }
}

/// Spins until a request is queued or `spin` has passed.
fn spin_for_work(shared: &PoolShared, spin: Duration) {
    let deadline = Instant::now() + spin;
    while shared.queued.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        // Yield rather than pause: a spinning worker must not take the CPU from a thread that
        // has work, such as the context's own thread, or the client on the same machine. With
        // a plain spin, an NBD server at queue depth 32 on two cores lost a third of its IOPS
        // to the spinner; with the yield it keeps the spin's gain at queue depth 1.
        std::thread::yield_now();
    }
}

/// The pool's watch after a worker that watched the queue for `now` (the setting being
/// `setting`) slept for `asleep`, and was `woken` for a request (else its wait ended on its
/// own): doubled, up to [`MAX_IDLE_SPIN`], when the request came within four watches' time,
/// which a longer watch would have caught without the wake-up; halved, down to the setting,
/// after a sleep longer than the cap, which no watch would have bridged; else unchanged.
fn adapted_spin(now: Duration, setting: Duration, asleep: Duration, woken: bool) -> Duration {
    let cap = MAX_IDLE_SPIN.max(setting);
    if woken && asleep < now * 4 {
        (now * 2).min(cap)
    } else if asleep > cap {
        (now / 2).max(setting)
    } else {
        now
    }
}

/// The body of a worker thread.
fn run(shared: Arc<PoolShared>) {
    let me = Arc::new(Parker::default());
    let mut st = shared.state.lock();
    // Continue the creation chain before looking for work, as QEMU does: the context's thread
    // only ever creates one thread at a time.
    if st.take_spawn() {
        drop(st);
        spawn(&shared);
        st = shared.state.lock();
    }
    // Only now do we look at the queue: until here we counted as a thread on its way to it
    // (QEMU creates the next thread under the lock, so it needs no such care).
    st.pending_threads -= 1;
    tracing::debug!("threadpool: worker started ({} threads)", st.cur);
    // Whether we ran a request since we last slept.
    let mut ran = false;
    loop {
        if st.must_exit() {
            break;
        }
        let popped = st.pop_started();
        shared.queued.store(st.queue.len(), Ordering::Relaxed);
        if let Some(job) = popped {
            // More requests behind this one: make sure someone comes for them.
            let kick = st.kick();
            drop(st);
            kick.perform();
            job.run();
            ran = true;
            st = shared.state.lock();
            if let Some(bh) = shared.finish_locked(&mut st, job) {
                // Schedule outside the lock (it may write the context's eventfd), but count as
                // on our way to the queue meanwhile: a request submitted now needs neither a
                // wake nor a new thread. (The completion we schedule may well be what makes the
                // submitter send the next request.)
                st.searching += 1;
                drop(st);
                bh.schedule();
                st = shared.state.lock();
                st.searching -= 1;
            }
            continue;
        }
        if ran && !st.spinning && !st.idle_spin.is_zero() {
            // We just ran out of requests: watch the queue for a moment before sleeping (see
            // the pool's module docs). Counted as on our way: a submitter meanwhile neither
            // wakes nor creates a thread.
            // Never below the setting: `set_idle_spin` and `adapted_spin` keep it so.
            let spin = st.spin_now;
            st.spinning = true;
            st.searching += 1;
            drop(st);
            spin_for_work(&shared, spin);
            st = shared.state.lock();
            st.spinning = false;
            st.searching -= 1;
            if !st.queue.is_empty() {
                continue;
            }
        }
        // Whether this sleep comes after a watch, which it then tells about (`adapt_spin`).
        let watched = ran && !st.idle_spin.is_zero();
        ran = false;
        me.woken.store(false, Ordering::Relaxed);
        st.idle.push(me.clone());
        let timeout = st.idle_timeout;
        let slept = watched.then(Instant::now);
        let timed_out = me.cond.wait_for(&mut st, timeout).timed_out();
        if let Some(slept) = slept {
            let woken = me.woken.load(Ordering::Relaxed);
            st.spin_now = adapted_spin(st.spin_now, st.idle_spin, slept.elapsed(), woken);
        }
        if me.woken.load(Ordering::Relaxed) {
            // Taken off the idle list by whoever woke us; we are no longer on our way.
            st.searching -= 1;
            continue;
        }
        // A timeout (or a spurious wake-up): still on the idle list.
        st.idle.retain(|p| !Arc::ptr_eq(p, &me));
        if timed_out && st.queue.is_empty() && st.cur > st.min {
            break;
        }
    }
    st.cur -= 1;
    // Counted under the lock, with `cur`: a reader of the stats never sees a thread gone from
    // `threads` but not yet in `threads_exited`.
    shared.exited.fetch_add(1, Ordering::Relaxed);
    // We may have been woken for a request and be leaving instead (more threads than the
    // maximum): pass the wake-up on, as QEMU does.
    let kick = st.kick();
    let left = st.cur;
    drop(st);
    kick.perform();
    tracing::debug!("threadpool: worker exited ({left} threads left)");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_grows_while_requests_come_back_soon_and_shrinks_after_long_sleeps() {
        let us = Duration::from_micros;
        let base = us(50);
        // Wanted again within four watches: doubled, up to the cap.
        assert_eq!(adapted_spin(base, base, us(120), true), us(100));
        assert_eq!(adapted_spin(us(800), base, us(900), true), MAX_IDLE_SPIN);
        // Wanted again later, but within the cap: unchanged.
        assert_eq!(adapted_spin(us(100), base, us(700), true), us(100));
        // A sleep longer than the cap, woken or timed out: halved, down to the setting.
        assert_eq!(adapted_spin(us(400), base, us(5_000), true), us(200));
        assert_eq!(adapted_spin(us(60), base, us(5_000), false), base);
        // Timed out within the cap (a short idle timeout): unchanged.
        assert_eq!(adapted_spin(us(100), base, us(300), false), us(100));
        // A setting above the cap is the cap.
        let long = Duration::from_millis(5);
        assert_eq!(adapted_spin(long, long, us(10), true), long);
    }
}
