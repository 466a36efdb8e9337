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
use threadpool::ThreadPool;

/// The seed's motivating case, with the pool.
#[test]
fn metadata_read_in_a_scope_holds_unrelated_completions() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    pool.set_limits(2, 4).unwrap();
    let log: Rc<RefCell<Vec<String>>> = Rc::default();
    // Two unrelated requests, submitted at the root scope, finish while the read is waited
    // for (the read's work waits for them).
    let unrelated_done = Arc::new(AtomicBool::new(false));
    let mut tickets = Vec::new();
    for name in ["unrelated-1", "unrelated-2"] {
        let l = log.clone();
        let u = unrelated_done.clone();
        tickets.push(pool.submit_with(
            move || {
                if name == "unrelated-2" {
                    u.store(true, Ordering::SeqCst);
                }
            },
            move |r| {
                r.unwrap();
                l.borrow_mut().push(name.to_owned());
            },
        ));
    }
    let l = log.clone();
    let p = pool.clone();
    let c = ctx.clone();
    let u = unrelated_done.clone();
    let _request = ctx.isolated(|scope| {
        assert!(c.scope_allows(scope.id()));
        // The synchronous metadata read, through the pool.
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
    assert_eq!(*log.borrow(), ["read 42", "scope-end"]);
    poll_until(&ctx, || log.borrow().len() == 4);
    assert_eq!(
        *log.borrow(),
        ["read 42", "scope-end", "unrelated-1", "unrelated-2"]
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
