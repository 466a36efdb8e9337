//! An aio context driven from a tokio current_thread runtime (feature `tokio`): a tokio TCP
//! echo server and an aio fd handler, BH, timer and task on one thread, and another thread
//! waking the runtime with a one-shot BH.
//!
//! Run it with `cargo run -p aio --features tokio --example embed_tokio`. It exits 0 once every
//! part has run, or non-zero with a message.

// The tokio adapter is Linux-only (its outer fd is an epoll set); elsewhere this example only
// says so, so that `cargo check --all-targets --all-features` builds on every Unix.
#![cfg_attr(not(target_os = "linux"), allow(unused_imports))]

use std::error::Error;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aio::{ClockType, Scale};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[cfg(not(target_os = "linux"))]
fn main() -> Result<(), Box<dyn Error>> {
    Err("the tokio adapter (`aio::tokio`) exists on Linux only".into())
}

#[cfg(target_os = "linux")]
fn main() -> Result<(), Box<dyn Error>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ctx = aio::Builder::new().build()?;
    println!("aio backend: {}", ctx.backend());
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        // Attach: from here on aio's callbacks run on this runtime's thread.
        let driver = tokio::task::spawn_local(aio::tokio::drive(ctx.clone()));

        // tokio's side: a TCP echo server on loopback.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::task::spawn_local(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let n = conn.read(&mut buf).await.unwrap();
            conn.write_all(&buf[..n]).await.unwrap();
        });

        // aio's side: an fd handler, a timer, a task that uses tokio's TCP client.
        let (mut tx, rx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        // The handler owns the socket; the callback reads through a second `Rc`.
        let rx = Rc::new(rx);
        let sock = rx.clone();
        let seen = Rc::new(std::cell::RefCell::new(String::new()));
        let s = seen.clone();
        let _handler = ctx
            .fd_handler(rx)
            .on_read(move |_| {
                let mut buf = [0u8; 64];
                if let Ok(n) = (&*sock).read(&mut buf) {
                    s.borrow_mut().push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            })
            .register()?;
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let timer = ctx.timer(ClockType::Realtime, Scale::NS, move || {
            f.store(true, Ordering::SeqCst)
        });
        timer.arm_after(Duration::from_millis(10));
        let echo = ctx.spawn_local(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            stream.write_all(b"hello tokio").await?;
            let mut buf = [0u8; 11];
            stream.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
        });
        tx.write_all(b"hello aio")?;

        // Another thread wakes the (possibly sleeping) runtime through the context.
        let woke = Arc::new(AtomicBool::new(false));
        let (w, remote) = (woke.clone(), ctx.handle());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            remote.schedule_oneshot(move || w.store(true, Ordering::SeqCst));
        });

        let start = Instant::now();
        while !(echo.is_finished()
            && fired.load(Ordering::SeqCst)
            && woke.load(Ordering::SeqCst)
            && seen.borrow().len() == 9)
        {
            if start.elapsed() > Duration::from_secs(5) {
                return Err("timed out".into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        println!("aio handler read {:?}", seen.borrow());
        println!(
            "aio task echoed {:?} through tokio's TCP",
            ctx.block_on(echo)??
        );
        println!("aio timer fired; remote BH ran after {:?}", start.elapsed());
        driver.abort(); // detach
        Ok::<_, Box<dyn Error>>(())
    })?;
    Ok(())
}
