//! Shared helpers for the integration tests, written once: an in-process
//! server on port 0 and a tungstenite client here; raw sockets
//! ([`sockets`]), HTTP requests and answers ([`http`]), WebSocket frames
//! ([`frames`]), and the `corecast` binary in a child process with `/proc`
//! measurements ([`process`]). Each test file takes `use common::*;`.
//!
//! Each test binary compiles its own copy of this module: a `static` here
//! (the [`exclusive`] lock) is one per test file, never shared across files.
#![allow(dead_code)]

pub mod envelope;
pub mod frames;
pub mod http;
pub mod nats;
pub mod process;
pub mod sockets;
pub mod tls;

// One `use common::*;` per test file; each file uses part of them.
#[allow(unused_imports)]
pub use {envelope::*, frames::*, http::*, nats::*, process::*, sockets::*, tls::*};

use corecast::server::{self, Config, IoMode, ServerHandle};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tungstenite::Message;

pub const KIB: usize = 1024;
pub const MIB: usize = 1024 * 1024;

/// The backend under test: `CORECAST_IO=epoll|uring|auto` (default `auto`,
/// the server's own default). `.ci/run` runs the suite once per backend.
pub fn io_mode() -> IoMode {
    match std::env::var("CORECAST_IO").as_deref() {
        Ok("epoll") => IoMode::Epoll,
        Ok("uring") => IoMode::Uring,
        Ok("auto") | Err(_) => IoMode::Auto,
        Ok(other) => panic!("CORECAST_IO={other}: expected epoll, uring or auto"),
    }
}

/// A server on 127.0.0.1:0 with two unpinned workers and `tweak` applied.
pub fn start_with(tweak: impl FnOnce(&mut Config)) -> ServerHandle {
    let mut cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        workers: 2,
        pin: corecast::server::PinMode::Never,
        io: io_mode(),
        ..Config::default()
    };
    tweak(&mut cfg);
    server::start(cfg).expect("server starts")
}

pub fn start() -> ServerHandle {
    start_with(|_| {})
}

/// A tungstenite client over plain TCP.
pub type Ws = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

pub fn ws_url(addr: SocketAddr, path: &str) -> String {
    format!("ws://{addr}{path}")
}

/// A tungstenite client connected to `path`.
pub fn connect(addr: SocketAddr, path: &str) -> Ws {
    let (ws, resp) = tungstenite::connect(ws_url(addr, path)).expect("handshake");
    assert_eq!(resp.status(), 101);
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    }
    ws
}

/// One echo round trip through tungstenite on a fresh connection; returns
/// how long the whole thing (connect, upgrade, echo) took.
pub fn honest_round_trip(addr: SocketAddr, text: &str) -> Duration {
    let started = Instant::now();
    let mut ws = connect(addr, "/echo");
    ws.send(Message::text(text)).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text(text));
    started.elapsed()
}

/// Polls `cond` until true or `limit` passes.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// Polls `read` every 100 ms until it returns `target` or `limit` passes;
/// returns the last value read.
pub fn settle(limit: Duration, mut read: impl FnMut() -> u64, target: u64) -> u64 {
    let end = Instant::now() + limit;
    loop {
        let v = read();
        if v == target || Instant::now() >= end {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

static EXCLUSIVE: Mutex<()> = Mutex::new(());

/// Runs the calling test alone among the tests of its file that take it
/// too: for tests that compare process-wide quantities (open descriptors,
/// resident memory) before and after, which a test running alongside would
/// disturb, or that load a small machine enough to make another's latency
/// bounds noise. Test files are separate binaries, which `cargo test` runs
/// one at a time. A test that panicked while holding it does not stop the
/// others.
pub fn exclusive() -> MutexGuard<'static, ()> {
    EXCLUSIVE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
