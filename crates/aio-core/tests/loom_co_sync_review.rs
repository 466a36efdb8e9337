//! Loom model from the co_sync review: an unlock hands the lock to the first waiter while that
//! waiter's future is dropped on another thread, with a second waiter queued behind it. The
//! second waiter must be woken and then own the lock (no lost grant, no lost wake-up), and
//! the lock must be free at the end.
#![cfg(aio_loom)]

use aio_core::task::CoMutex;
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::thread;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Wake, Waker};

/// A waker that raises a flag.
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
}

fn flag() -> (std::sync::Arc<Flag>, Waker) {
    let f = std::sync::Arc::new(Flag(AtomicBool::new(false)));
    (f.clone(), Waker::from(f))
}

#[test]
fn grantee_dropped_during_hand_off_passes_the_lock_to_the_next_waiter() {
    loom::model(|| {
        // Leaked, so that the lock futures borrowing it can move to a loom thread.
        let m: &'static CoMutex<usize> = Box::leak(Box::new(CoMutex::new(0usize)));
        let g = m.try_lock().unwrap();
        // Both waiters queue before the race starts (polled here, in order).
        let (_f1, w1) = flag();
        let (f2, w2) = flag();
        let mut l1 = Box::pin(m.lock());
        assert!(
            Pin::as_mut(&mut l1)
                .poll(&mut Context::from_waker(&w1))
                .is_pending()
        );
        let mut l2 = Box::pin(m.lock());
        assert!(
            Pin::as_mut(&mut l2)
                .poll(&mut Context::from_waker(&w2))
                .is_pending()
        );
        let t = thread::spawn(move || drop(l1));
        drop(g);
        t.join().unwrap();
        while !f2.0.load(Ordering::Acquire) {
            thread::yield_now();
        }
        match Pin::as_mut(&mut l2).poll(&mut Context::from_waker(&w2)) {
            Poll::Ready(mut g2) => *g2 += 1,
            Poll::Pending => panic!("woken but not handed the lock"),
        }
        drop(l2);
        assert_eq!(*m.try_lock().expect("free at the end"), 1);
    });
}
