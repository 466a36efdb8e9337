//! Loom model of the handler-deletion rule (docs/qemu-semantics.md §6–§7) on the real registry and dispatch:
//! handlers that remove each other from inside their callbacks while another thread makes both
//! ready.
//!
//! In this port the handler table is touched only by the home thread (`AioContext` is `!Send`),
//! so QEMU's `QemuLockCnt` becomes reference counting plus a deleted mark. What the model adds
//! over the unit tests is the cross-thread part: the readiness arrives from another thread, at
//! any point of the iteration, and the removed handler must still never run again.
#![cfg(aio_loom)]

use aio_core::fake::FakeMonitor;
use aio_core::{AioContext, EventNotifier, FdHandler};
use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;
use std::cell::RefCell;
use std::rc::Rc;

/// Two notifiers whose handlers each remove the other when they run. Another thread sets both.
/// Exactly one handler runs: whichever is dispatched first removes the other, which then never
/// runs, even though its readiness was already reported in the same iteration.
#[test]
fn handlers_removed_by_each_other_never_run_again() {
    loom::model(|| {
        let ctx = AioContext::new(Box::new(FakeMonitor::new())).unwrap();
        let notifiers = [
            Arc::new(EventNotifier::new().unwrap()),
            Arc::new(EventNotifier::new().unwrap()),
        ];
        let runs = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
        let slots: [Rc<RefCell<Option<FdHandler>>>; 2] = Default::default();
        for i in 0..2 {
            let (runs, other) = (runs[i].clone(), slots[1 - i].clone());
            let handler = ctx
                .set_event_notifier(&notifiers[i], move |e| {
                    e.test_and_clear();
                    runs.fetch_add(1, Ordering::Relaxed);
                    // Remove the other handler from inside this callback.
                    drop(other.borrow_mut().take());
                })
                .unwrap();
            *slots[i].borrow_mut() = Some(handler);
        }
        let setter = {
            let notifiers = notifiers.clone();
            thread::spawn(move || {
                notifiers[0].set().unwrap();
                notifiers[1].set().unwrap();
            })
        };
        let total = || runs[0].load(Ordering::Relaxed) + runs[1].load(Ordering::Relaxed);
        while total() == 0 {
            ctx.poll();
        }
        setter.join().unwrap();
        // Both notifiers are set now; drain. The removed handler must stay silent.
        while ctx.poll_nonblocking() {}
        assert_eq!(
            total(),
            1,
            "exactly one handler ran; the other was removed first"
        );
        let survivor = usize::from(runs[0].load(Ordering::Relaxed) == 0);
        assert!(
            slots[survivor]
                .borrow()
                .as_ref()
                .is_some_and(|h| h.is_registered())
        );
        assert!(slots[1 - survivor].borrow().is_none());
    });
}
