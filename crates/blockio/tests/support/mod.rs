//! What the block I/O test files share: unlinked temporary files (in /tmp, or beside the test
//! binary where `O_DIRECT` works), an io_uring context where the kernel allows one, every
//! (context, engine) pair, a completion slot to poll for, and byte patterns to check data
//! against.

#![allow(dead_code)] // each test file uses its own part

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use aio_core::AioContext;
use blockio::{BlockIo, Engine};
use fdmon_uring::UringMonitor;

/// A temporary file, already unlinked, open for reading and writing.
pub fn temp_file() -> Arc<File> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("blockio-test-{}-{n}", std::process::id()));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("temp file");
    std::fs::remove_file(&path).expect("unlink temp file");
    Arc::new(f)
}

/// An io_uring context, or `None` (with the reason printed) where io_uring does not work.
pub fn uring_ctx() -> Option<AioContext> {
    match UringMonitor::new_checked() {
        Ok(m) => Some(AioContext::new(Box::new(m)).expect("context")),
        Err(e) => {
            println!("skipped the io_uring engine: io_uring is unavailable here: {e}");
            None
        }
    }
}

/// A byte pattern that differs at every offset of a small range.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A temporary file, already unlinked, open for reading and writing (with `O_DIRECT` if
/// `direct`; `None` if the file system refuses it).
pub fn temp_file_on_disk(direct: bool) -> Option<Arc<File>> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Beside the test binary rather than in /tmp, which may be a tmpfs without O_DIRECT.
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("blockio-disk-{}-{n}", std::process::id()));
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(true).truncate(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let f = match o.open(&path) {
        Ok(f) => f,
        Err(e) if direct => {
            let _ = std::fs::remove_file(&path);
            println!("skipped O_DIRECT: {e}");
            return None;
        }
        Err(e) => panic!("temp file: {e}"),
    };
    std::fs::remove_file(&path).expect("unlink temp file");
    Some(Arc::new(f))
}

/// Every (context, engine) pair to test, with a name for messages.
pub fn setups() -> Vec<(&'static str, AioContext, BlockIo)> {
    let mut v = Vec::new();
    if let Some(ctx) = uring_ctx() {
        let io = BlockIo::of(&ctx);
        assert_eq!(io.engine(), Engine::IoUring);
        assert!(ctx.has_io_uring());
        v.push(("io_uring", ctx, io));
    }
    if let Some(ctx) = uring_ctx() {
        let io = BlockIo::with_engine(&ctx, Engine::Threads).unwrap();
        v.push(("threads on io_uring", ctx, io));
    }
    let ctx = AioContext::new(Box::new(fdmon_epoll::EpollMonitor::new().unwrap())).unwrap();
    let io = BlockIo::of(&ctx);
    assert_eq!(io.engine(), Engine::Threads);
    assert!(!ctx.has_io_uring());
    v.push(("threads on epoll", ctx, io));
    let ctx = AioContext::new(Box::new(fdmon_poll::PollMonitor::new().unwrap())).unwrap();
    let io = BlockIo::of(&ctx);
    assert_eq!(io.engine(), Engine::Threads);
    v.push(("threads on poll", ctx, io));
    let ctx = AioContext::new(Box::new(fdmon_epoll::EpollMonitor::new().unwrap())).unwrap();
    match BlockIo::with_engine(&ctx, Engine::LinuxAio) {
        Ok(io) => v.push(("linux-aio on epoll", ctx, io)),
        Err(e) => println!("skipped the native AIO engine: {e}"),
    }
    if let Some(ctx) = uring_ctx() {
        let io = BlockIo::with_engine(&ctx, Engine::LinuxAio).unwrap();
        v.push(("linux-aio on io_uring", ctx, io));
    }
    v
}

/// A slot a completion callback fills in.
pub type Slot<T> = Rc<RefCell<Option<T>>>;

/// Polls `ctx` until `slot` is filled, and takes it.
pub fn wait_for<T>(ctx: &AioContext, slot: &Slot<T>) -> T {
    for _ in 0..100_000 {
        if let Some(v) = slot.borrow_mut().take() {
            return v;
        }
        ctx.poll();
    }
    panic!("the completion never came");
}

/// Runs `f` on `ctx`'s io_uring monitor (the context must run on one), for reading its
/// counters.
#[allow(dead_code)] // not every test binary reads them
pub fn ring<R>(ctx: &AioContext, f: impl FnOnce(&mut UringMonitor) -> R) -> R {
    // The callers only read counters; the monitor is neither driven nor replaced.
    // SAFETY: `with_backend`'s contract ([FD-1]), kept as just said.
    unsafe {
        ctx.with_backend(|b| {
            f(b.expect("a backend")
                .downcast_mut::<UringMonitor>()
                .expect("the io_uring backend"))
        })
    }
}
