//! Completion delivery and nested polls: a batch of completions is delivered by one pass, and a
//! callback may poll the context (QEMU's `AIO_WAIT_WHILE` pattern) to wait for another request,
//! whether that one has already finished or not, at any depth.

mod common;

use common::{ctx, eventually, eventually_polling, poll_until};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::mpsc;
use threadpool::{Error, Status, ThreadPool, Ticket};

#[test]
fn one_pass_delivers_a_whole_batch_without_a_wake() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    pool.set_limits(4, 4).unwrap();
    eventually_polling(&ctx, "4 idle workers", || pool.stats().idle == 4);

    let delivered = Rc::new(Cell::new(0));
    let tickets: Vec<Ticket> = (0..200)
        .map(|i| {
            let d = delivered.clone();
            pool.submit_with(
                move || i,
                move |r| {
                    assert_eq!(r, Ok(i));
                    d.set(d.get() + 1);
                },
            )
        })
        .collect();
    eventually("the batch has finished", || {
        tickets.iter().all(|t| t.status() == Status::Finished)
    });
    let writes = ctx.stats().event_writes;
    assert!(ctx.poll_nonblocking());
    assert_eq!(delivered.get(), 200, "one poll delivers the whole batch");
    assert_eq!(
        ctx.stats().event_writes,
        writes,
        "the loop was awake: finishing the batch wrote no eventfd"
    );
    assert!(!ctx.poll_nonblocking(), "and nothing is left");
}

/// A callback that waits, in a nested poll, for a request that has already finished.
#[test]
fn a_callback_polls_for_a_request_that_already_finished() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    pool.set_limits(1, 1).unwrap();
    eventually_polling(&ctx, "the worker is idle", || pool.stats().idle == 1);

    let second_done = Rc::new(Cell::new(false));
    let order = Rc::new(RefCell::new(Vec::new()));
    let (inner_ctx, s, o) = (ctx.clone(), second_done.clone(), order.clone());
    let first = pool.submit_with(
        || 1,
        move |_| {
            o.borrow_mut().push("first starts");
            while !s.get() {
                inner_ctx.poll();
            }
            o.borrow_mut().push("first ends");
        },
    );
    let (s, o) = (second_done.clone(), order.clone());
    let second = pool.submit_with(
        || 2,
        move |_| {
            o.borrow_mut().push("second");
            s.set(true);
        },
    );
    eventually("both finished", || {
        first.status() == Status::Finished && second.status() == Status::Finished
    });
    poll_until(&ctx, || order.borrow().len() == 3);
    assert_eq!(*order.borrow(), ["first starts", "second", "first ends"]);
}

/// A callback that waits, in a nested poll, for a request that finishes only later.
#[test]
fn a_callback_polls_for_a_request_that_finishes_later() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    let (tx, rx) = mpsc::channel::<()>();
    let later = Rc::new(RefCell::new(None));
    let l = later.clone();
    let p = pool.clone();
    let inner_ctx = ctx.clone();
    let done = Rc::new(Cell::new(false));
    let d = done.clone();
    pool.submit_with(
        || (),
        move |_| {
            // Submit the request we wait for from inside the callback, then let it go.
            let req = p.submit(move || rx.recv().unwrap());
            tx.send(()).unwrap();
            while req.status() != Status::Completed {
                inner_ctx.poll();
            }
            *l.borrow_mut() = req.try_take();
            d.set(true);
        },
    );
    poll_until(&ctx, || done.get());
    assert_eq!(*later.borrow(), Some(Ok(())));
}

/// Five callbacks, each waiting in a nested poll for the next one's completion: callback `i`
/// lets request `i + 1` finish, then polls until its completion has run, so each completion
/// is delivered inside the previous one's callback.
#[test]
fn nested_waits_five_deep() {
    let ctx = ctx();
    let pool = ThreadPool::of(&ctx);
    let depth = 5;
    let finished: Rc<RefCell<Vec<usize>>> = Rc::new(RefCell::new(Vec::new()));
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..depth).map(|_| mpsc::channel::<()>()).unzip();
    let mut next_senders: Vec<Option<mpsc::Sender<()>>> =
        senders.iter().skip(1).cloned().map(Some).collect();
    next_senders.push(None);
    for (level, (rx, next)) in receivers.into_iter().zip(next_senders).enumerate() {
        let (f, inner_ctx) = (finished.clone(), ctx.clone());
        pool.submit_with(
            move || rx.recv().unwrap(),
            move |r: Result<(), Error>| {
                r.unwrap();
                if let Some(next) = next {
                    next.send(()).unwrap();
                    while !f.borrow().contains(&(level + 1)) {
                        inner_ctx.poll();
                    }
                }
                f.borrow_mut().push(level);
            },
        );
    }
    senders[0].send(()).unwrap();
    poll_until(&ctx, || finished.borrow().len() == depth);
    assert_eq!(*finished.borrow(), [4, 3, 2, 1, 0]);
}
