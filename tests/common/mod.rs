//! Shared helpers for the integration tests: an in-process server on port 0,
//! a raw TCP client for byte-exact probes, and a tungstenite client.
#![allow(dead_code)]

use corecast::server::{self, Config, IoMode, ServerHandle};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Socket timeout so a broken server fails a test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

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
        pin_cores: false,
        io: io_mode(),
        ..Config::default()
    };
    tweak(&mut cfg);
    server::start(cfg).expect("server starts")
}

pub fn start() -> ServerHandle {
    start_with(|_| {})
}

pub fn ws_url(addr: SocketAddr, path: &str) -> String {
    format!("ws://{addr}{path}")
}

/// A tungstenite client connected to `path`.
pub fn connect(
    addr: SocketAddr,
    path: &str,
) -> tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>> {
    let (ws, resp) = tungstenite::connect(ws_url(addr, path)).expect("handshake");
    assert_eq!(resp.status(), 101);
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    }
    ws
}

/// A raw TCP connection with a read timeout.
pub fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A valid upgrade request for `path`.
pub fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Reads an HTTP response head (through the blank line) byte by byte, so no
/// frame bytes after it are consumed.
pub fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) => head.push(b[0]),
            Err(e) => panic!(
                "reading response head: {e}; got {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    String::from_utf8(head).expect("ASCII head")
}

/// Reads until EOF (bounded by the socket timeout); returns everything.
pub fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    all
}

/// Sends `req` and returns the whole response (server closes after refusals).
pub fn refused(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = raw(addr);
    s.write_all(req).unwrap();
    String::from_utf8_lossy(&read_to_eof(&mut s)).into_owned()
}

/// A server frame: (fin, opcode, payload).
pub fn read_frame(s: &mut TcpStream) -> (bool, u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).expect("frame header");
    assert_eq!(h[1] & 0x80, 0, "server frames must not be masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    (h[0] & 0x80 != 0, h[0] & 0x0f, p)
}

/// Reads the server's close frame and returns its code.
pub fn read_close_code(s: &mut TcpStream) -> u16 {
    loop {
        let (_, op, p) = read_frame(s);
        if op == 0x8 {
            assert!(p.len() >= 2, "close frame carries a code");
            return u16::from_be_bytes([p[0], p[1]]);
        }
    }
}

/// A raw connection that has completed the handshake on `path`.
pub fn raw_ws(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = raw(addr);
    s.write_all(upgrade_request(path).as_bytes()).unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    s
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
