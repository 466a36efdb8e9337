//! The conformance suites of aio (package `aio-conformance`, not published): the behaviour every
//! backend must show, written once and run by each backend's test files.
//!
//! Two suites, each a set of plain functions plus macros that expand them into `#[test]`s, in the
//! style of tokio's `rt_test!`:
//!
//! - the **context suite**: every behaviour of the loop that must hold on every backend, as
//!   functions over a [`MakeContext`], one module per topic. Each module's cases are listed once,
//!   in its macro ([`bottom_half_tests!`], [`event_notifier_tests!`], ...); [`conformance_tests!`]
//!   expands all of them, and is what `tests/tests/conformance_*.rs` call, once per backend:
//!
//!   ```ignore
//!   fn make() -> std::io::Result<aio_core::AioContext> {
//!       aio_core::AioContext::new(Box::new(fdmon_epoll::EpollMonitor::new()?))
//!   }
//!   aio_conformance::conformance_tests!(make);
//!   ```
//!
//!   Attributes written after the constructor go on every generated test; a backend the machine
//!   may lack uses this to have its cases reported as *ignored*, with the reason:
//!   `conformance_tests!(make, #[cfg_attr(aio_no_uring, ignore = "...")])`.
//!   The cases follow QEMU's `tests/unit/test-aio.c` and the numbered conformance cases; each
//!   asserts exact counts and return values. Conventions, as in QEMU's tests: "drain" means
//!   non-blocking polls until one returns false (registering handlers and scheduling BHs notify
//!   the loop, which is not progress); handler callbacks assert that their notifier really was
//!   set, so a spurious dispatch fails the case. No case asserts a wall-clock upper bound tighter
//!   than 5 s, and cross-thread cases never rely on one thread winning a race: a blocking poll
//!   that a bug would hang is guarded by a watchdog that turns the hang into a failed assertion.
//! - the **monitor suite** ([`monitor`], Linux): the behaviour every `FdMonitor` must show against
//!   real kernel objects, run by each backend crate's `tests/*_monitor.rs` through
//!   [`monitor_conformance_tests!`], with the scaffolding those files share.
//!
//! Everything here uses only aio-core's public API.
//!
//! # Rules for `unsafe`
//!
//! The suites call libc directly (pipes, eventfds, rlimits, `poll`, signals). Every `unsafe`
//! block cites one of these rules in its `// SAFETY:` comment (a registration through
//! `fd_handler_raw` cites that function's contract instead: ARCHITECTURE.md, "Raw fds"):
//!
//! - **[CONF-1]** (pointers): every pointer a libc call receives points into a live local, array
//!   or slice that the call may use for its whole duration (exclusively borrowed where the call
//!   writes), at least as long as the length or count passed with it.
//! - **[CONF-2]** (integers): calls that take only fds, flags and integers (`fcntl`, `close`,
//!   `dup3`, `eventfd`, `pthread_kill` on a thread that has not been joined) touch no memory of
//!   ours; an fd the suite closes is one it created, closed exactly once.
//! - **[CONF-3]** (fd ownership): a raw fd becomes an `OwnedFd` only right after the call that
//!   created it succeeded, so nothing else owns it. (A number the suite closed itself, as
//!   `fd_register_closed_fd_ebadf` registers, is never made an `OwnedFd` or `BorrowedFd`: it
//!   goes to `fd_handler_raw`, whose `register` must refuse it with `EBADF`.)
//! - **[CONF-5]** (watched fds): an fd a case gives a monitor (`FdMonitor::update`, whose
//!   contract this keeps, or `monitor::add`) is one the case created and owns; it stays open
//!   until the case has removed it or dropped the monitor. A case that closes a watched fd on
//!   purpose, to check what a backend does then, says so at the close; the backends take that
//!   as an error to report or an entry to forget, and nothing else in the process can be
//!   given that number meanwhile but a fresh fd of the same case or of another test, which a
//!   backend would then watch until the case removes it, corrupting nothing.
//! - **[CONF-4]** (process-wide hooks): the SIGUSR1 handler does only an atomic add, which is
//!   async-signal-safe, and is installed from a zeroed `sigaction` (a valid value of that plain C
//!   struct); `CountingAllocator` forwards every call unchanged to `System`, so `System`'s
//!   contract is exactly what its callers uphold.

mod support;

pub mod bottom_halves;
pub mod current;
pub mod dropping;
pub mod event_notifiers;
pub mod external;
pub mod fd_handlers;
#[cfg(target_os = "linux")]
pub mod monitor;
pub mod notify;
pub mod outer_loop;
pub mod panics;
pub mod polling;
pub mod removal;
pub mod syscalls;
pub mod timers;

pub use polling::{Counted, Polled, PolledCounts};
pub use support::MakeContext;

/// Every case of the context suite, one `#[test]` each, for the backend `$make` builds: all the
/// per-topic macros below, at the caller's module level (so test names are the case names).
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr $(, #[$meta:meta])* $(,)?) => {
        $crate::bottom_half_tests!($make $(, #[$meta])*);
        $crate::event_notifier_tests!($make $(, #[$meta])*);
        $crate::notify_tests!($make $(, #[$meta])*);
        $crate::external_client_tests!($make $(, #[$meta])*);
        $crate::removal_tests!($make $(, #[$meta])*);
        $crate::fd_handler_tests!($make $(, #[$meta])*);
        $crate::outer_loop_tests!($make $(, #[$meta])*);
        $crate::current_context_tests!($make $(, #[$meta])*);
        $crate::panic_tests!($make $(, #[$meta])*);
        $crate::syscall_tests!($make $(, #[$meta])*);
        $crate::drop_tests!($make $(, #[$meta])*);
        $crate::timer_tests!($make $(, #[$meta])*);
        $crate::polling_tests!($make $(, #[$meta])*);
    };
}

/// One `#[test]` per case of [`bottom_halves`]: poll results and bottom halves.
#[macro_export]
macro_rules! bottom_half_tests {
    ($make:expr $(, #[$meta:meta])* $(,)?) => {
        $crate::__cases!([$(#[$meta])*] $make; bottom_halves:
            poll_fresh_context_is_idle,
            bh_schedule,
            bh_schedule10,
            bh_cancel,
            bh_cancel_then_reschedule,
            bh_delete,
            bh_callback_delete_one,
            bh_callback_delete_many,
            bh_flush,
            bh_double_schedule_runs_once,
            bh_scheduled_from_bh_runs_next_pass,
            bh_nested_poll_runs_outer_pass,
            bh_oneshot_from_other_thread_wakes_poll,
            bh_idle_runs_but_is_not_progress,
            bh_idle_blocking_poll_returns,
        );
    };
}

/// One `#[test]` per case of [`event_notifiers`]: event notifiers.
#[macro_export]
macro_rules! event_notifier_tests {
    ($make:expr $(, #[$meta:meta])* $(,)?) => {
        $crate::__cases!([$(#[$meta])*] $make; event_notifiers:
            event_add_remove,
            event_wait,
            event_wait_no_flush_cb,
            event_flush,
            event_level_triggered_uncleared,
            event_unregistered_set_is_not_progress,
            event_register_twice_already_exists,
            event_set_from_other_thread_wakes_poll,
        );
    };
}

/// One `#[test]` per case of [`notify`]: `notify`.
#[macro_export]
macro_rules! notify_tests {
    ($make:expr $(, #[$meta:meta])* $(,)?) => {
        $crate::__cases!([$(#[$meta])*] $make; notify:
            notify_is_not_progress,
            notify_wakes_blocked_poll,
        );
    };
}

/// One `#[test]` per case of [`external`]: external clients (`disable_external`).
#[macro_export]
macro_rules! external_client_tests {
    ($make:expr $(, #[$meta:meta])* $(,)?) => {
        $crate::__cases!([$(#[$meta])*] $make; external:
            external_client_depth1,
            external_client_depth2,
            external_enable_without_disable_errors,
        );
    };
}

/// One `#[test]` per case of [`removal`]: handlers removed while dispatching.
#[macro_export]
macro_rules! removal_tests {
    ($make:expr $(, #[$meta:meta])* $(,)?) => {
        $crate::__cases!([$(#[$meta])*] $make; removal:
            #[cfg_attr(miri, ignore = "uses UnixStream, whose ioctl and send/recv Miri does not emulate")]
            handler_removes_itself,
            handlers_remove_each_other,
            handler_nested_poll_steals_ready_handler,
            handler_reregistered_in_callback_gets_no_stale_report,
            bh_nested_poll_defers_running_bh,
            handler_registered_in_callback_runs_next_iteration,
        );
    };
}

/// One `#[test]` per case of [`fd_handlers`]: fd handlers on sockets and pipes.
#[macro_export]
macro_rules! fd_handler_tests {
    ($make:expr $(, #[$meta:meta])* $(,)?) => {
        $crate::__cases!([$(#[$meta])*] $make; fd_handlers:
            #[cfg_attr(miri, ignore = "uses UnixStream, whose ioctl and send/recv Miri does not emulate")]
            fd_read_and_write_callbacks,
            #[cfg_attr(miri, ignore = "uses UnixStream, whose ioctl and send/recv Miri does not emulate")]
            fd_level_triggered_unread_data,
            #[cfg_attr(miri, ignore = "uses UnixStream, whose ioctl and send/recv Miri does not emulate")]
            fd_handler_with_poll_callbacks_is_dispatched,
            #[cfg_attr(miri, ignore = "uses UnixStream, whose ioctl and send/recv Miri does not emulate")]
            fd_write_readiness,
            #[cfg_attr(miri, ignore = "uses UnixStream, whose ioctl and send/recv Miri does not emulate")]
            fd_hangup_calls_read,
            #[cfg_attr(miri, ignore = "uses UnixStream, whose ioctl and send/recv Miri does not emulate")]
            fd_dropping_a_handler_closes_its_socket,
            fd_error_readiness_reaches_the_write_callback,
            fd_removed_and_readded_in_one_iteration,
            #[cfg_attr(miri, ignore = "needs getrlimit, which Miri does not emulate")]
            fd_ten_thousand_idle_one_active,
            #[cfg_attr(miri, ignore = "uses UnixStream, whose ioctl and send/recv Miri does not emulate")]
            fd_replace_handler,
            #[cfg_attr(miri, ignore = "uses UnixStream, whose ioctl and send/recv Miri does not emulate")]
            fd_replace_wrong_fd_rejected,
            #[cfg_attr(miri, ignore = "uses UnixStream, whose ioctl and send/recv Miri does not emulate")]
            fd_register_twice_already_exists,
            #[cfg_attr(miri, ignore = "needs getrlimit, which Miri does not emulate")]
            fd_register_closed_fd_ebadf,
            #[cfg_attr(miri, ignore = "uses UnixStream, whose ioctl and send/recv Miri does not emulate")]
            fd_register_without_callbacks_invalid_input,
            fd_nested_blocking_poll_waits_for_remote_bh,
        );
    };
}

/// One `#[test]` per case of [`outer_loop`]: an outer loop driving the context (QEMU's GSource).
#[macro_export]
macro_rules! outer_loop_tests {
    ($make:expr $(, #[$meta:meta])* $(,)?) => {
        $crate::__cases!([$(#[$meta])*] $make; outer_loop:
            #[cfg_attr(miri, ignore = "the outer loop waits with poll(2), which Miri does not emulate")]
            outer_loop_bh_schedule,
            #[cfg_attr(miri, ignore = "the outer loop waits with poll(2), which Miri does not emulate")]
            outer_loop_bh_delete_self,
            #[cfg_attr(miri, ignore = "the outer loop waits with poll(2), which Miri does not emulate")]
            outer_loop_notify_wakes_outer_fds,
            #[cfg_attr(miri, ignore = "the outer loop waits with poll(2), which Miri does not emulate")]
            outer_loop_watches_handlers_registered_in_dispatch,
            #[cfg_attr(miri, ignore = "the outer loop waits with poll(2), which Miri does not emulate")]
            outer_loop_notify_is_consumed,
        );
    };
}

/// One `#[test]` per case of [`current`]: the current context.
#[macro_export]
macro_rules! current_context_tests {
    ($make:expr $(, #[$meta:meta])* $(,)?) => {
        $crate::__cases!([$(#[$meta])*] $make; current:
            current_context_in_callbacks,
            current_context_nested,
        );
    };
}

/// One `#[test]` per case of [`panics`]: panics in callbacks.
#[macro_export]
macro_rules! panic_tests {
    ($make:expr $(, #[$meta:meta])* $(,)?) => {
        $crate::__cases!([$(#[$meta])*] $make; panics:
            panic_in_bh_keeps_context_usable,
            panic_in_fd_handler_keeps_context_usable,
        );
    };
}

/// One `#[test]` per case of [`syscalls`]: the system calls a BH-only loop makes.
#[macro_export]
macro_rules! syscall_tests {
    ($make:expr $(, #[$meta:meta])* $(,)?) => {
        $crate::__cases!([$(#[$meta])*] $make; syscalls:
            stats_bh_only_makes_no_syscalls,
        );
    };
}

/// One `#[test]` per case of [`dropping`]: dropping the context with work pending.
#[macro_export]
macro_rules! drop_tests {
    ($make:expr $(, #[$meta:meta])* $(,)?) => {
        $crate::__cases!([$(#[$meta])*] $make; dropping:
            drop_context_frees_pending_work,
            drop_context_with_live_handle,
        );
    };
}

/// One `#[test]` per case of [`timers`]: timers in real time.
#[macro_export]
macro_rules! timer_tests {
    ($make:expr $(, #[$meta:meta])* $(,)?) => {
        $crate::__cases!([$(#[$meta])*] $make; timers:
            timer_schedule,
            timer_blocking_poll_sleeps_until_the_deadline,
            timer_moved_earlier_from_another_thread_wakes_poll,
            timer_cancelled_after_its_deadline_never_fires,
            timer_periodic_rearm_never_fires_early,
            timer_poll_timeout_sleeps_at_most_its_limit,
        );
    };
}

/// One `#[test]` per case of [`polling`]: adaptive polling and isolation scopes.
#[macro_export]
macro_rules! polling_tests {
    ($make:expr $(, #[$meta:meta])* $(,)?) => {
        $crate::__cases!([$(#[$meta])*] $make; polling:
            poll_nested_poll_does_not_poll,
            poll_nested_poll_ends_polling_mode_for_the_running_handler,
            poll_right_after_an_fd_dispatch,
            poll_members_that_leave_get_on_poll_end,
            #[cfg_attr(miri, ignore = "uses UnixStream, whose ioctl and send/recv Miri does not emulate")]
            poll_outer_dispatch_callback_polls_nested,
            #[cfg_attr(miri, ignore = "uses UnixStream, whose ioctl and send/recv Miri does not emulate")]
            poll_windows_are_per_handler,
            #[cfg_attr(miri, ignore = "uses UnixStream, whose ioctl and send/recv Miri does not emulate")]
            poll_fd_only_handler_next_to_polled_one_runs,
            #[cfg_attr(miri, ignore = "uses UnixStream, whose ioctl and send/recv Miri does not emulate")]
            poll_in_backend_joins_only_where_readiness_shows,
            poll_callback_removes_its_own_handler,
            poll_params_from_another_thread_take_effect,
            poll_remote_schedule_seen_while_polling,
            poll_event_notifier_polled_through_its_flag,
            poll_outer_loop_leaves_polling_mode,
            poll_outer_loop_frees_a_hit_removed_before_dispatch,
            poll_outer_loop_frees_a_hit_removed_while_leaving_polling_mode,
            isolation_scope_holds_a_readable_outer_fd,
        );
    };
}

/// Expands `[attrs] make; module: case, ...` into one `#[test]` per case; a case may carry
/// attributes of its own (the Miri exclusions: what Miri does not emulate).
#[doc(hidden)]
#[macro_export]
macro_rules! __cases {
    ($attrs:tt $make:expr; $module:ident: $($(#[$cmeta:meta])* $case:ident),* $(,)?) => {
        $($crate::__case!($attrs [$(#[$cmeta])*] $make; $module::$case);)*
    };
}

/// One `#[test]` calling `$crate::$module::$case($make)` under the given attributes.
#[doc(hidden)]
#[macro_export]
macro_rules! __case {
    ([$(#[$meta:meta])*] [$(#[$cmeta:meta])*] $make:expr; $module:ident::$case:ident) => {
        #[test]
        $(#[$meta])*
        $(#[$cmeta])*
        fn $case() {
            $crate::$module::$case($make)
        }
    };
}
