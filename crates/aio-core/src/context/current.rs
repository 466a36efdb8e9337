//! The current context: the thread-local naming the context this thread is polling
//! ([`AioContext::current`], QEMU `qemu_get_current_aio_context`) and [`CurrentGuard`], which
//! sets it for the duration of an iteration or a `block_on` poll. The pointer it holds is
//! turned back into an `Rc` under rule [CURRENT-1] in ARCHITECTURE.md.

use super::{AioContext, Inner};
use crate::sync::thread_local;
use std::cell::Cell;
use std::rc::Rc;

thread_local! {
    /// The context this thread is polling, innermost first (QEMU
    /// `qemu_get_current_aio_context`). Null when none. (Not a `const` initializer: loom's
    /// `thread_local!` does not accept one.)
    #[allow(clippy::missing_const_for_thread_local)]
    static CURRENT: Cell<*const Inner> = Cell::new(std::ptr::null());
}

/// Makes a context current for the duration of a poll, restoring the previous one after. It
/// also hides the task being polled, if any (an iteration nested in a task's poll runs other
/// callbacks, which are not that task), until the iteration ends.
pub(crate) struct CurrentGuard {
    previous: *const Inner,
    _task: Option<crate::task::RunningGuard>,
}

impl CurrentGuard {
    /// Makes `inner` current. The caller passes `Rc::as_ptr` of a context it borrows and keeps
    /// the guard in that frame ([CURRENT-1] in ARCHITECTURE.md).
    pub(crate) fn enter(inner: *const Inner) -> CurrentGuard {
        CurrentGuard {
            previous: CURRENT.with(|c| c.replace(inner)),
            _task: crate::task::hide_running(),
        }
    }
}

impl Drop for CurrentGuard {
    fn drop(&mut self) {
        let previous = self.previous;
        CURRENT.with(|c| c.set(previous));
    }
}

impl AioContext {
    /// Makes this context the current one (and hides the running task) until the guard drops:
    /// for `block_on`'s polls of its future, which run outside any iteration.
    pub(crate) fn enter_current(&self) -> CurrentGuard {
        CurrentGuard::enter(Rc::as_ptr(&self.inner))
    }

    /// The context this thread is polling right now, if any (QEMU
    /// `qemu_get_current_aio_context`). Inside a callback, this is the context running it.
    ///
    /// `None` while the innermost context polled on this thread belongs to a
    /// [`SharedContext`](crate::SharedContext): a shared context is never reachable as an
    /// `AioContext` (that would let an `Rc` of it stay on a thread that no longer holds it).
    /// Use [`SharedContext::current`](crate::SharedContext::current) there, which names the
    /// shared context the calling thread holds.
    pub fn current() -> Option<AioContext> {
        let ptr = CURRENT.with(|c| c.get());
        if ptr.is_null() {
            return None;
        }
        // SAFETY: [CURRENT-1]: non-null, so a frame below us keeps this `Rc` alive; we add a count.
        let ctx = unsafe {
            Rc::increment_strong_count(ptr);
            AioContext {
                inner: Rc::from_raw(ptr),
            }
        };
        // A shared context's clone is dropped here, on the thread that polls it (so holds
        // it), and never reaches the caller ([SHARED-1]).
        (!ctx.inner.in_shared.get()).then_some(ctx)
    }
}
