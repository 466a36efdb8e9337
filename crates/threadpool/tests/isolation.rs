//! Completions and isolation scopes (`AioContext::isolated`, seed 003): a callback that reads
//! metadata synchronously through the pool inside a scope sees only its own completion; the
//! completions of unrelated requests that arrive meanwhile are held, without making the loop
//! spin, and are delivered in order once the scope ends.

mod common;

use common::{ctx, eventually, poll_until};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use threadpool::{Status, ThreadPool, Ticket};

/// The seed's motivating case, with the pool: a request's completion callback reads metadata
/// synchronously, through the pool, in a scope; the completions of two unrelated requests
/// arrive meanwhile and are delivered, in order, only after the scope ends.
#[test]
fn metadata_read_in_a_scope_holds_unrelated_completions() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    pool.set_limits(3, 4).unwrap();
    let log: Rc<RefCell<Vec<String>>> = Rc::default();
    let in_callback = Arc::new(AtomicBool::new(false));
    let unrelated_done = Arc::new(AtomicBool::new(false));
    // The request, whose callback does the read.
    let (l, p, c) = (log.clone(), pool.clone(), ctx.clone());
    let (inside, u) = (in_callback.clone(), unrelated_done.clone());
    let _request = pool.submit_with(
        || (),
        move |_| {
            l.borrow_mut().push("request".into());
            inside.store(true, Ordering::SeqCst);
            c.isolated(|_| {
                let read = Rc::new(Cell::new(None));
                let r = read.clone();
                p.submit_with(
                    move || {
                        eventually("the unrelated requests finish", || u.load(Ordering::SeqCst));
                        // Let the second one reach the completion queue.
                        std::thread::sleep(Duration::from_millis(20));
                        42
                    },
                    move |v| r.set(Some(v.unwrap())),
                );
                poll_until(&c, || read.get().is_some());
                l.borrow_mut().push(format!("read {}", read.get().unwrap()));
                // More polls in the scope still hold them.
                for _ in 0..3 {
                    c.poll_nonblocking();
                }
                l.borrow_mut().push("scope-end".into());
            });
        },
    );
    // Two unrelated requests, submitted at the root scope, that finish while the callback
    // waits for its read: the first, then the second (which waits until the first is queued
    // for delivery or taken by the completion BH, which holds its callback, so that their
    // completions arrive in this order whatever the scheduler does).
    let mut tickets: Vec<Ticket> = Vec::new();
    for name in ["unrelated-1", "unrelated-2"] {
        let l = log.clone();
        let (inside, u) = (in_callback.clone(), unrelated_done.clone());
        let first = tickets.first().cloned();
        tickets.push(pool.submit_with(
            move || {
                eventually("the request's callback runs", || {
                    inside.load(Ordering::SeqCst)
                });
                if let Some(first) = first {
                    eventually("the first unrelated request is queued for delivery", || {
                        matches!(first.status(), Status::Finished | Status::Completed)
                    });
                    u.store(true, Ordering::SeqCst);
                }
            },
            move |r| {
                r.unwrap();
                l.borrow_mut().push(name.to_owned());
            },
        ));
    }
    poll_until(&ctx, || log.borrow().len() == 5);
    assert_eq!(
        *log.borrow(),
        [
            "request",
            "read 42",
            "scope-end",
            "unrelated-1",
            "unrelated-2"
        ]
    );
    drop(tickets);
}

/// A held completion makes no wait return early: a scope blocked on its own 50 ms request
/// makes few waits.
#[test]
fn held_completion_does_not_spin() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    pool.set_limits(2, 2).unwrap();
    let outer = Rc::new(Cell::new(false));
    let o = outer.clone();
    let _t = pool.submit_with(|| (), move |_| o.set(true));
    ctx.isolated(|_| {
        let done = Rc::new(Cell::new(false));
        let d = done.clone();
        pool.submit_with(
            || std::thread::sleep(Duration::from_millis(50)),
            move |_| d.set(true),
        );
        let waits = ctx.stats().waits;
        let mut polls = 0;
        while !done.get() {
            ctx.poll();
            polls += 1;
        }
        assert!(!outer.get());
        assert!(polls < 20, "{polls} polls");
        assert!(ctx.stats().waits - waits < 20);
    });
    poll_until(&ctx, || outer.get());
}

/// A request future awaited inside the scope completes there (its completion only wakes a
/// waker); callbacks of requests submitted in a nested scope that ended run in the parent.
#[test]
fn futures_complete_in_the_scope_and_ended_scopes_belong_to_the_parent() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    let ran = Rc::new(Cell::new(0));
    ctx.isolated(|_| {
        let r = ran.clone();
        ctx.isolated(|_| {
            pool.submit_with(|| 1, move |v| r.set(v.unwrap()));
        });
        assert_eq!(ctx.block_on(pool.submit(|| 7)), Ok(7));
        poll_until(&ctx, || ran.get() == 1);
    });
}
