//! `AioContext::local`: one value per type and context, created on first use, dropped with the
//! context after its bottom halves, in reverse order of creation; `try_local` finds it without
//! creating it.

use std::cell::RefCell;
use std::rc::Rc;

// Under Miri, which has no ppoll, contexts run on the test-only `MiriMonitor`.
#[path = "support/ctx.rs"]
mod support;
use support::ctx;

struct Logged(&'static str, Rc<RefCell<Vec<&'static str>>>);
impl Drop for Logged {
    fn drop(&mut self) {
        self.1.borrow_mut().push(self.0);
    }
}

/// Two distinct types, each holding a drop logger.
struct First {
    _logged: Logged,
}
struct Second {
    _logged: Logged,
}

#[test]
fn one_value_per_type_and_context() {
    let (a, b) = (ctx(), ctx());
    let x = a.local(|_| RefCell::new(1u32));
    *x.borrow_mut() += 1;
    assert_eq!(*a.local(|_| RefCell::new(100u32)).borrow(), 2);
    assert_eq!(
        *b.local(|_| RefCell::new(100u32)).borrow(),
        100,
        "another context has its own"
    );
    assert_eq!(
        *a.local(|_| RefCell::new(7u64)).borrow(),
        7,
        "another type is another value"
    );
}

#[test]
fn init_may_use_other_locals_and_values_drop_with_the_context_in_reverse() {
    let log = Rc::new(RefCell::new(Vec::new()));
    let ctx = ctx();
    let l = log.clone();
    let second = ctx.local(move |ctx| {
        // An init that depends on another local creates it first.
        ctx.local(|_| First {
            _logged: Logged("first", l.clone()),
        });
        Second {
            _logged: Logged("second", l),
        }
    });
    drop(second);
    assert!(
        log.borrow().is_empty(),
        "the context still holds its values"
    );
    drop(ctx);
    assert_eq!(*log.borrow(), ["second", "first"]);
}

#[test]
fn try_local_finds_a_value_without_making_one() {
    let (a, b) = (ctx(), ctx());
    assert!(a.try_local::<RefCell<u32>>().is_none());
    assert!(
        a.try_local::<RefCell<u32>>().is_none(),
        "asking made nothing"
    );
    let x = a.local(|_| RefCell::new(5u32));
    let found = a.try_local::<RefCell<u32>>().expect("made by local");
    assert!(Rc::ptr_eq(&x, &found));
    assert!(
        b.try_local::<RefCell<u32>>().is_none(),
        "another context has none"
    );
    assert!(
        a.try_local::<RefCell<u64>>().is_none(),
        "another type has none"
    );
}
