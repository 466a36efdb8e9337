//! A context as a real `GSource` (feature `glib`): [`AioSource`] attaches an [`AioContext`] to
//! any [`glib::MainContext`], as QEMU's main loop attaches its AioContext to glib's
//! (`aio_get_g_source`), so aio's BHs, fd handlers, timers and tasks run inside a
//! `glib::MainLoop` (GTK, GStreamer, a D-Bus service) next to glib's own sources.
//!
//! The source's callbacks are QEMU's `aio_ctx_prepare` / `check` / `dispatch` (util/async.c):
//!
//! * **prepare** calls [`AioContext::prepare`], which raises bit 0 of `notify_me` (from here a
//!   notify writes the context's eventfd) and computes the timeout. A zero timeout is confirmed
//!   at once with [`AioContext::check`]: the io_uring backend asks for one when it only has
//!   requests to submit, and `check` submits them (QEMU 2025 submits in its prepare hook). If
//!   `check` finds work the source is ready (glib does not sleep and dispatches it); if not,
//!   `prepare` runs once more and its timeout is the one glib gets.
//! * **check** calls [`AioContext::check`]: bit 0 lowered, the pending notification accepted,
//!   the backend looked at without blocking; it says whether BHs, ready fds or due timers wait.
//! * **dispatch** calls [`AioContext::dispatch`] (QEMU `aio_dispatch`): BHs, then the ready
//!   handlers, then timers. glib skips `check` for a source whose `prepare` said ready; the
//!   dispatch then does that `check` itself, so every prepare is closed by one check.
//! * **Fds.** The active backend's outer fds ([`AioContext::outer_fds`]) are the source's unix
//!   fds (`g_source_add_unix_fd`), synchronised in every `prepare`: on the poll backend, each
//!   watched fd (QEMU's GPollFDs); on epoll, the epoll fd; on io_uring, the ring fd, which stays
//!   enabled (as in QEMU 2025). The context's own eventfd is among them (directly, or behind the
//!   epoll fd or ring), so a [`ContextHandle::schedule_oneshot`](crate::ContextHandle) or any
//!   notify from another thread wakes a sleeping `MainLoop`. glib keeps no kernel registration,
//!   only the numbers it polls, so a change (a handler added or removed on the poll backend, a
//!   move from poll to epoll) costs glib one extra wake-up of its own and nothing else.
//! * **Timers.** glib's poll timeout is whole milliseconds, so the source carries a timerfd
//!   armed to `prepare`'s timeout in nanoseconds, and also gives glib that timeout rounded *up*
//!   to the millisecond (QEMU's `qemu_timeout_ns_to_ms`): an aio timer fires when due, to the
//!   scheduler's latency (tens of microseconds), never early, and a sub-millisecond deadline is
//!   never rounded to "now" (no spinning) nor to "1 ms later". `g_source_set_ready_time` is not
//!   used: it wakes the whole `MainContext` each time it changes, and a deadline recomputed
//!   from "now" in every `prepare` would change every time.
//! * **No busy polling.** Adaptive polling (`PollParams`) is never used under glib: `prepare`
//!   leaves polling mode, and glib sleeps in its own `poll`. With nothing to do the source adds
//!   no wake-up at all.
//! * **Nesting.** An aio callback may poll its context directly ([`AioContext::poll`],
//!   [`AioContext::block_on`]) while the source is attached, and a glib callback may too, as a
//!   QEMU callback may call `aio_poll` on a context attached to the main loop.
//! * **Detaching.** Dropping the [`AioSource`] (or [`AioSource::detach`]) destroys the
//!   `GSource`: glib calls none of its callbacks afterwards (dropped from an aio callback that
//!   the source dispatched, the dispatch under way finishes first), and an outer-loop window
//!   that a `prepare` left open is closed with a `check` whose findings are left to whoever
//!   drives the context next. Dropping the `MainContext` first destroys the source too; the
//!   `AioSource` then only gives back its reference. Nothing leaks in either order.
//! * **Threads.** The `MainContext` must be iterated on the context's home thread (where the
//!   `AioSource`, which is not `Send`, lives): [`AioSource::attach`] refuses a `MainContext`
//!   that another thread owns, and if another thread iterates it later, the source detaches
//!   itself there, logging an error, without touching the context.
//! * **Panics.** A panic in an aio callback cannot unwind through glib's C frames: the source
//!   catches it, detaches itself and keeps the payload for [`AioSource::take_panic`].
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicBool, Ordering};
//! use std::time::Duration;
//! # fn main() -> std::io::Result<()> {
//! let main_context = glib::MainContext::new();
//! let main_loop = glib::MainLoop::new(Some(&main_context), false);
//! let ctx = aio::Builder::new().build()?;
//! let source = aio::glib::AioSource::attach(ctx.clone(), &main_context)?;
//!
//! // An aio timer fires under glib; a BH from another thread ends the loop.
//! let fired = Arc::new(AtomicBool::new(false));
//! let f = fired.clone();
//! let timer = ctx.timer(aio::ClockType::Realtime, aio::Scale::NS, move || {
//!     f.store(true, Ordering::SeqCst)
//! });
//! timer.arm_after(Duration::from_micros(500));
//! let (remote, quit) = (ctx.handle(), main_loop.clone());
//! std::thread::spawn(move || {
//!     std::thread::sleep(Duration::from_millis(5));
//!     remote.schedule_oneshot(move || quit.quit());
//! });
//! main_loop.run();
//! assert!(fired.load(Ordering::SeqCst));
//! source.detach();
//! # Ok(()) }
//! ```

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::ffi::c_int;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ::glib::ffi;
use ::glib::translate::{IntoGlib, ToGlibPtr};

use crate::timerfd::TimerFd;
use crate::{AioContext, Interest, OuterFd};

/// A context attached to a `glib::MainContext` as a `GSource`; see the
/// [module documentation](self). Dropping it detaches the context.
pub struct AioSource {
    /// Our reference to the `GSource` (see [GSOURCE] in ARCHITECTURE.md).
    raw: NonNull<Raw>,
    ctx: AioContext,
}

/// The memory of one of our `GSource`s: glib's part first, ours after it ([GSOURCE]).
#[repr(C)]
struct Raw {
    base: ffi::GSource,
    state: State,
}

/// What the callbacks need. Touched only on the thread whose mark is `home` (the context's),
/// except `home` and `foreign_logged` ([GSOURCE-THREAD]).
struct State {
    /// [`thread_mark`] of the context's home thread.
    home: usize,
    /// Whether a foreign thread's iteration was logged (once).
    foreign_logged: AtomicBool,
    /// The source's clone of the context; taken by `AioSource::drop`, on the home thread.
    ctx: RefCell<Option<AioContext>>,
    /// A `prepare` is not yet closed by a `check`.
    prepared: Cell<bool>,
    /// The last `check` found work for `dispatch`.
    work: Cell<bool>,
    /// The outer fds given to glib, sorted by fd, one entry each, with their tags.
    fds: RefCell<Vec<Watched>>,
    /// Scratch for the next `outer_fds`.
    scratch: RefCell<Vec<OuterFd>>,
    /// The context's next deadline, in nanoseconds.
    timer: TimerFd,
    /// The timerfd's unix-fd tag.
    timer_tag: Cell<ffi::gpointer>,
    /// Whether `timer` is armed.
    armed: Cell<bool>,
    /// The payload of a panic caught in a callback.
    panic: RefCell<Option<Box<dyn Any + Send>>>,
}

/// One outer fd that glib watches.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Watched {
    fd: RawFd,
    interest: Interest,
    /// From `g_source_add_unix_fd`.
    tag: ffi::gpointer,
}

/// The callbacks of every source of ours. glib only reads it.
static FUNCS: ffi::GSourceFuncs = ffi::GSourceFuncs {
    prepare: Some(prepare),
    check: Some(check),
    dispatch: Some(dispatch),
    finalize: Some(finalize),
    closure_callback: None,
    closure_marshal: None,
};

/// `g_source_new`'s size argument: all of [`Raw`].
const RAW_SIZE: u32 = {
    assert!(size_of::<Raw>() <= u32::MAX as usize);
    // glib allocates with `g_malloc0`, whose alignment is malloc's: two words.
    assert!(align_of::<Raw>() <= 2 * size_of::<usize>());
    size_of::<Raw>() as u32
};

thread_local! {
    static MARK: u8 = const { 0 };
}

/// An address unique to the running thread among live threads.
fn thread_mark() -> usize {
    MARK.with(|m| std::ptr::from_ref(m) as usize)
}

impl AioSource {
    /// Attaches `ctx` to `main_context` as a new `GSource` (default priority), on the
    /// context's home thread. glib runs it whenever that `MainContext` is iterated (a
    /// `glib::MainLoop` on it, `MainContext::iteration`) on this thread.
    ///
    /// # Errors
    ///
    /// `InvalidInput` if another thread owns `main_context` (runs a loop on it): the context's
    /// callbacks must run on its home thread. Creating the timerfd (out of fds).
    pub fn attach(ctx: AioContext, main_context: &::glib::MainContext) -> io::Result<Self> {
        if !main_context.is_owner() && main_context.acquire().is_err() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "aio::glib: the MainContext is owned by another thread; attach on the thread \
                 that iterates it, which must be the AioContext's home thread",
            ));
        }
        let timer = TimerFd::new()?;
        let timer_fd = timer.as_fd().as_raw_fd();
        // `FUNCS` is a static that glib only reads; `RAW_SIZE` is the size of `Raw`.
        // SAFETY: [GSOURCE]: `Raw` starts with the `GSource`, as `g_source_new` requires.
        let source = unsafe { ffi::g_source_new(std::ptr::addr_of!(FUNCS).cast_mut(), RAW_SIZE) };
        let raw = NonNull::new(source.cast::<Raw>()).expect("g_source_new returned null");
        let state = State {
            home: thread_mark(),
            foreign_logged: AtomicBool::new(false),
            ctx: RefCell::new(Some(ctx.clone())),
            prepared: Cell::new(false),
            work: Cell::new(false),
            fds: RefCell::default(),
            scratch: RefCell::default(),
            timer,
            timer_tag: Cell::new(std::ptr::null_mut()),
            armed: Cell::new(false),
            panic: RefCell::new(None),
        };
        // `g_source_new` returned `RAW_SIZE` zeroed bytes aligned for `Raw`.
        // SAFETY: [GSOURCE]: the state is written before anyone else can see the source.
        unsafe { std::ptr::addr_of_mut!((*raw.as_ptr()).state).write(state) };
        // From here `Drop` gives the reference back and `finalize` drops the state.
        let this = Self { raw, ctx };
        // The timerfd belongs to the source's state: open as long as glib may poll it.
        // SAFETY: [GSOURCE]: our live source.
        let tag = unsafe { ffi::g_source_add_unix_fd(source, timer_fd, ffi::G_IO_IN) };
        this.state().timer_tag.set(tag);
        // A static NUL-terminated name, which glib copies.
        // SAFETY: [GSOURCE]: our live source.
        unsafe { ffi::g_source_set_name(source, c"aio".as_ptr()) };
        // The `MainContext` pointer is valid for the call (glib takes its own references).
        // SAFETY: [GSOURCE]: our live source, never attached before.
        unsafe { ffi::g_source_attach(source, main_context.to_glib_none().0) };
        Ok(this)
    }

    /// The context this source drives.
    pub fn context(&self) -> &AioContext {
        &self.ctx
    }

    /// Whether the source is still attached: false once it detached itself (a panic, a
    /// foreign thread) or its `MainContext` was dropped.
    pub fn is_attached(&self) -> bool {
        // SAFETY: [GSOURCE]: we hold a reference to the source.
        unsafe { ffi::g_source_is_destroyed(self.source()) == ffi::GFALSE }
    }

    /// Sets the source's glib priority (`glib::Priority::DEFAULT` unless changed): sources of
    /// a numerically lower priority are dispatched first, and higher ones not at all in an
    /// iteration where a lower one is ready.
    pub fn set_priority(&self, priority: ::glib::Priority) {
        // SAFETY: [GSOURCE]: we hold a reference to the source.
        unsafe { ffi::g_source_set_priority(self.source(), priority.into_glib()) };
    }

    /// The payload of a panic that an aio callback raised under glib, if any; the source
    /// detached itself then. `std::panic::resume_unwind` re-raises it.
    pub fn take_panic(&self) -> Option<Box<dyn Any + Send>> {
        self.state().panic.borrow_mut().take()
    }

    /// Detaches the context from its `MainContext` (the same as dropping the source).
    pub fn detach(self) {}

    fn source(&self) -> *mut ffi::GSource {
        self.raw.as_ptr().cast()
    }

    fn state(&self) -> &State {
        // SAFETY: [GSOURCE]: we hold a reference, so the state is initialized and alive.
        unsafe { &(*self.raw.as_ptr()).state }
    }
}

impl Drop for AioSource {
    fn drop(&mut self) {
        let source = self.source();
        // SAFETY: [GSOURCE]: we hold a reference to the source.
        unsafe { ffi::g_source_destroy(source) };
        let state = self.state();
        // Close a window that a `prepare` opened and no `check` closed, so that bit 0 of
        // `notify_me` does not stay set and make every later notify write the eventfd. What
        // this `check` finds is found again by whoever drives the context next. Not while
        // unwinding: the context is as the panic left it.
        if state.prepared.take() && !std::thread::panicking() {
            self.ctx.check();
        }
        state.work.set(false);
        // The state's clone of the context dies here, on the home thread ([GSOURCE-THREAD]).
        let ctx = state.ctx.borrow_mut().take();
        drop(ctx);
        // The reference `g_source_new` gave us; the pointer is not used afterwards.
        // SAFETY: [GSOURCE]: given back once, here.
        unsafe { ffi::g_source_unref(source) };
    }
}

impl fmt::Debug for AioSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AioSource")
            .field("backend", &self.ctx.backend())
            .field("attached", &self.is_attached())
            .field("fds", &self.state().fds.borrow().len())
            .finish_non_exhaustive()
    }
}

impl State {
    /// Runs `f` with the context, on the home thread only, catching a panic. On another thread,
    /// or after a panic, the source detaches itself and `None` is returned.
    fn run<R>(&self, source: *mut ffi::GSource, f: impl FnOnce(&AioContext) -> R) -> Option<R> {
        if thread_mark() != self.home {
            if !self.foreign_logged.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    "aio::glib: the AioContext's GSource was iterated on a thread other than \
                     the context's home thread; it detached itself"
                );
            }
            // Nothing but `home` and `foreign_logged` was read on this thread.
            // SAFETY: [GSOURCE-THREAD]: glib's destroy is thread-safe.
            unsafe { ffi::g_source_destroy(source) };
            return None;
        }
        // A clone: the `AioSource` may be dropped (and take the state's) from a callback.
        let ctx = self.ctx.borrow().clone()?;
        match catch_unwind(AssertUnwindSafe(|| f(&ctx))) {
            Ok(r) => Some(r),
            Err(payload) => {
                tracing::error!("aio::glib: an aio callback panicked; the GSource detached itself");
                *self.panic.borrow_mut() = Some(payload);
                self.prepared.set(false);
                self.work.set(false);
                // SAFETY: [GSOURCE]: glib passed us this live source.
                unsafe { ffi::g_source_destroy(source) };
                None
            }
        }
    }

    /// QEMU `aio_ctx_prepare`: returns whether the source is ready, and glib's timeout in ms.
    fn prepare(&self, ctx: &AioContext, source: *mut ffi::GSource) -> (bool, c_int) {
        self.work.set(false);
        let mut timeout = ctx.prepare();
        let mut ready = false;
        if timeout == Some(Duration::ZERO) {
            if ctx.check() {
                self.work.set(true);
                ready = true;
            } else {
                timeout = ctx.prepare();
            }
        }
        if !ready {
            self.prepared.set(true);
            ready = timeout == Some(Duration::ZERO);
        }
        // SAFETY: [GSOURCE]: glib passed us this live source.
        if unsafe { ffi::g_source_is_destroyed(source) } != ffi::GFALSE {
            // A callback run by `prepare` (`on_poll_end`) dropped the `AioSource`.
            if self.prepared.take() {
                ctx.check();
            }
            return (false, -1);
        }
        self.sync_fds(ctx, source);
        let sleep = if ready { None } else { timeout };
        self.arm(sleep);
        let ms = if ready { 0 } else { ms_ceil(timeout) };
        (ready, ms)
    }

    /// QEMU `aio_ctx_check`.
    fn check(&self, ctx: &AioContext, source: *mut ffi::GSource) -> bool {
        if !self.prepared.take() {
            return false;
        }
        self.drain_timer(source);
        let work = ctx.check();
        self.work.set(work);
        work
    }

    /// QEMU `aio_ctx_dispatch`.
    fn dispatch(&self, ctx: &AioContext, source: *mut ffi::GSource) {
        let work = if self.prepared.take() {
            // glib skipped `check` (our `prepare` said ready): close the window here.
            self.drain_timer(source);
            ctx.check()
        } else {
            self.work.take()
        };
        if work {
            ctx.dispatch();
        }
    }

    /// Gives glib the context's outer fds, changing only what changed.
    fn sync_fds(&self, ctx: &AioContext, source: *mut ffi::GSource) {
        let mut next = self.scratch.take();
        next.clear();
        ctx.outer_fds(&mut next);
        next.sort_by_key(|f| f.fd);
        next.dedup_by(|later, kept| {
            if later.fd == kept.fd {
                kept.interest |= later.interest;
                true
            } else {
                false
            }
        });
        let mut fds = self.fds.borrow_mut();
        let same = fds.len() == next.len()
            && fds
                .iter()
                .zip(&next)
                .all(|(w, n)| w.fd == n.fd && w.interest == n.interest);
        if !same {
            let old = std::mem::take(&mut *fds);
            let mut old = old.into_iter().peekable();
            for n in &next {
                while let Some(w) = old.next_if(|w| w.fd < n.fd) {
                    // SAFETY: [GSOURCE]: our live source, and a tag it gave and still holds.
                    unsafe { ffi::g_source_remove_unix_fd(source, w.tag) };
                }
                let cond = condition(n.interest);
                let tag = match old.next_if(|w| w.fd == n.fd) {
                    Some(w) => {
                        if w.interest != n.interest {
                            // SAFETY: [GSOURCE]: as above.
                            unsafe { ffi::g_source_modify_unix_fd(source, w.tag, cond) };
                        }
                        w.tag
                    }
                    // glib only polls the number, which `outer_fds` just reported ([OUTER-FD]);
                    // it is removed here as soon as a later `outer_fds` no longer reports it.
                    // SAFETY: [GSOURCE]: our live source.
                    None => unsafe { ffi::g_source_add_unix_fd(source, n.fd, cond) },
                };
                fds.push(Watched {
                    fd: n.fd,
                    interest: n.interest,
                    tag,
                });
            }
            for w in old {
                // SAFETY: [GSOURCE]: as above.
                unsafe { ffi::g_source_remove_unix_fd(source, w.tag) };
            }
        }
        *self.scratch.borrow_mut() = next;
    }

    /// Arms the timerfd to `timeout` (disarms it for `None` or zero).
    fn arm(&self, timeout: Option<Duration>) {
        let want = timeout.is_some_and(|t| !t.is_zero());
        if !want && !self.armed.get() {
            return;
        }
        match self.timer.arm(timeout) {
            Ok(()) => self.armed.set(want),
            // glib's millisecond timeout still bounds the wait, rounded up.
            Err(e) => tracing::warn!("aio::glib: cannot arm the timerfd: {e}"),
        }
    }

    /// Reads the timerfd if glib saw it readable.
    fn drain_timer(&self, source: *mut ffi::GSource) {
        // SAFETY: [GSOURCE]: our live source and the timerfd's tag, held for its life.
        let revents = unsafe { ffi::g_source_query_unix_fd(source, self.timer_tag.get()) };
        if revents & ffi::G_IO_IN != 0 {
            self.timer.drain();
        }
    }
}

/// glib's events for an interest.
fn condition(interest: Interest) -> ffi::GIOCondition {
    let mut cond = 0;
    if interest.contains(Interest::READ) {
        cond |= ffi::G_IO_IN | ffi::G_IO_HUP | ffi::G_IO_ERR;
    }
    if interest.contains(Interest::WRITE) {
        cond |= ffi::G_IO_OUT | ffi::G_IO_ERR;
    }
    cond
}

/// A timeout in whole milliseconds, rounded up (QEMU `qemu_timeout_ns_to_ms`); -1 for none.
fn ms_ceil(timeout: Option<Duration>) -> c_int {
    match timeout {
        None => -1,
        Some(t) => {
            let ms = t.as_nanos().div_ceil(1_000_000);
            ms.min(c_int::MAX as u128) as c_int
        }
    }
}

/// The state behind one of our sources.
///
/// # Safety
///
/// `source` is a live source created by [`AioSource::attach`] ([GSOURCE]).
unsafe fn state<'a>(source: *mut ffi::GSource) -> &'a State {
    // Per the contract, `source` points to a live `Raw`.
    // SAFETY: [GSOURCE]: its state was written before glib could call us.
    unsafe { &(*source.cast::<Raw>()).state }
}

unsafe extern "C" fn prepare(source: *mut ffi::GSource, timeout: *mut c_int) -> ffi::gboolean {
    // SAFETY: [GSOURCE]: glib calls `prepare` with one of our sources, alive for the call.
    let state = unsafe { state(source) };
    let (ready, ms) = state
        .run(source, |ctx| state.prepare(ctx, source))
        .unwrap_or((false, -1));
    // SAFETY: [GSOURCE]: glib passes a valid pointer for the timeout.
    unsafe { *timeout = ms };
    ready.into_glib()
}

unsafe extern "C" fn check(source: *mut ffi::GSource) -> ffi::gboolean {
    // SAFETY: [GSOURCE]: as in `prepare`.
    let state = unsafe { state(source) };
    state
        .run(source, |ctx| state.check(ctx, source))
        .unwrap_or(false)
        .into_glib()
}

unsafe extern "C" fn dispatch(
    source: *mut ffi::GSource,
    _callback: ffi::GSourceFunc,
    _user_data: ffi::gpointer,
) -> ffi::gboolean {
    // SAFETY: [GSOURCE]: as in `prepare`.
    let state = unsafe { state(source) };
    state.run(source, |ctx| state.dispatch(ctx, source));
    ffi::G_SOURCE_CONTINUE
}

unsafe extern "C" fn finalize(source: *mut ffi::GSource) {
    let raw = source.cast::<Raw>();
    // glib calls `finalize` once, when the last reference is gone, before it frees the memory.
    // SAFETY: [GSOURCE]: nothing else uses the state any more.
    let state = unsafe { &mut (*raw).state };
    if thread_mark() != state.home {
        // Only if an `AioSource` was leaked: its context must not be dropped off its home
        // thread ([GSOURCE-THREAD]), so it is leaked too.
        if let Some(ctx) = state.ctx.get_mut().take() {
            std::mem::forget(ctx);
        }
    }
    // The state was written in `attach` and is dropped only here.
    // SAFETY: [GSOURCE]: as above.
    unsafe { std::ptr::drop_in_place(std::ptr::addr_of_mut!((*raw).state)) };
}
