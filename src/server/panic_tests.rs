//! The panic policy, on both backends, with panics injected by the
//! library's own tests (a bug on purpose: `session::TEST_PANIC` as input,
//! `Shared::test_panic_worker` at a turn): a panic in one connection's
//! input closes that connection alone (`500` in HTTP, `1011` on a
//! WebSocket) while the others go on; a panic in a worker drains the
//! whole server (`/healthz` answers `503 draining`) and `join` reports the
//! failure, so the process exits non-zero for its supervisor. Both are
//! counted in `corecast_panics_total{scope}`.

use super::config::{Config, IoMode};
use super::session::TEST_PANIC;
use super::{ServerHandle, start};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn server(io: IoMode, workers: usize) -> Option<ServerHandle> {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        io,
        workers,
        drain_timeout: Duration::from_secs(1),
        ..Config::default()
    };
    match start(config) {
        Ok(s) => Some(s),
        // No io_uring here (a kernel or seccomp without it): epoll covers it.
        Err(e) if io == IoMode::Uring => {
            eprintln!("io_uring unavailable, skipped: {e}");
            None
        }
        Err(e) => panic!("start: {e}"),
    }
}

fn connect(s: &ServerHandle) -> TcpStream {
    let c = TcpStream::connect(s.local_addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

/// Upgrades `c` to a WebSocket on `path`; the answer must be `101`.
fn upgrade(c: &mut TcpStream, path: &str) {
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        c.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101 "));
}

/// An upgraded `/echo` connection.
fn echo(s: &ServerHandle) -> TcpStream {
    let mut c = connect(s);
    upgrade(&mut c, "/echo");
    c
}

/// Sends a masked text frame and reads the echo's payload.
fn round_trip(c: &mut TcpStream, text: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81, 0x80 | text.len() as u8, 0, 0, 0, 0];
    f.extend_from_slice(text);
    c.write_all(&f).unwrap();
    let mut h = [0u8; 2];
    c.read_exact(&mut h).unwrap();
    let mut p = vec![0u8; (h[1] & 0x7f) as usize];
    c.read_exact(&mut p).unwrap();
    p
}

fn read_all(c: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    out
}

fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    String::from_utf8_lossy(&read_all(&mut c)).into_owned()
}

fn panics(s: &ServerHandle, scope: &str) -> u64 {
    let line = format!("corecast_panics_total{{scope=\"{scope}\"}} ");
    s.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&line)?.parse().ok())
        .expect("corecast_panics_total")
}

#[test]
fn a_panic_in_one_connections_input_closes_it_alone() {
    for io in [IoMode::Epoll, IoMode::Uring] {
        let Some(s) = server(io, 1) else { continue };
        let mut bystander = echo(&s);
        assert_eq!(round_trip(&mut bystander, b"before"), b"before");
        // In a request: 500.
        let mut c = connect(&s);
        c.write_all(TEST_PANIC).unwrap();
        let answer = String::from_utf8_lossy(&read_all(&mut c)).into_owned();
        assert!(answer.starts_with("HTTP/1.1 500 "), "{io:?}: {answer}");
        // On a WebSocket: 1011.
        let mut ws = echo(&s);
        ws.write_all(TEST_PANIC).unwrap();
        let close = read_all(&mut ws);
        assert_eq!(
            (close.first(), close.get(2..4)),
            (Some(&0x88), Some(&[0x03, 0xf3][..])),
            "{io:?}: {close:?}"
        );
        // The same worker serves the others as before.
        assert_eq!(round_trip(&mut bystander, b"after"), b"after", "{io:?}");
        assert_eq!(panics(&s, "connection"), 2, "{io:?}");
        assert_eq!(panics(&s, "worker"), 0, "{io:?}");
        s.shutdown();
        assert!(s.join(), "{io:?}: no worker failed");
    }
}

#[test]
fn a_worker_panic_drains_the_server_and_join_reports_it() {
    for io in [IoMode::Epoll, IoMode::Uring] {
        let Some(s) = server(io, 2) else { continue };
        let told = Arc::new(AtomicBool::new(false));
        let t = Arc::clone(&told);
        s.on_worker_failure(move || t.store(true, Ordering::Release));
        let admin = s.admin_addr().unwrap();
        assert!(get(admin, "/healthz").starts_with("HTTP/1.1 200 "));
        assert!(s.metrics().contains("\ncorecast_draining 0\n"), "{io:?}");
        let mut c = echo(&s);
        assert_eq!(round_trip(&mut c, b"hi"), b"hi");
        s.shared.test_panic_worker.store(1, Ordering::Relaxed);
        s.shared.bus.wake(0);
        let started = Instant::now();
        while !told.load(Ordering::Acquire) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{io:?}: not told"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(s.worker_failed());
        let health = get(admin, "/healthz");
        assert!(
            health.starts_with("HTTP/1.1 503 ") && health.contains("draining"),
            "{io:?}: {health}"
        );
        assert_eq!(panics(&s, "worker"), 1, "{io:?}");
        assert!(s.metrics().contains("\ncorecast_draining 1\n"), "{io:?}");
        // Every connection ends (the failed worker's at once, the others'
        // with 1001 within the drain), and join says a worker failed.
        let _ = read_all(&mut c);
        assert!(!s.join(), "{io:?}: join reports the failure");
    }
}

/// Reads one server frame: (opcode, payload).
fn read_frame(c: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    c.read_exact(&mut h).unwrap();
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            c.read_exact(&mut l).unwrap();
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            c.read_exact(&mut l).unwrap();
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    c.read_exact(&mut p).unwrap();
    (h[0] & 0x0f, p)
}

#[test]
fn a_panic_while_the_queue_is_being_sent_keeps_the_stream_whole() {
    // A subscriber that does not read holds a full queue, part of it in a
    // send the kernel is reading (io_uring) or half written (epoll); its
    // panic must not drop or cut that: the publications come whole, then
    // the 1011 close.
    for io in [IoMode::Epoll, IoMode::Uring] {
        let Some(s) = server(io, 1) else { continue };
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect(&s.local_addr().into()).unwrap();
        let mut sub: TcpStream = sock.into();
        sub.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        upgrade(&mut sub, "/ws?topics=t");
        // 320 publications of 16 KiB: more than the sockets hold (the
        // server's send buffer grows to 4 MiB), less than the queue's
        // bound on top of it.
        let body = vec![b'x'; 16 * 1024];
        let mut publisher = connect(&s);
        for _ in 0..320 {
            write!(
                publisher,
                "POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .unwrap();
            publisher.write_all(&body).unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        sub.write_all(TEST_PANIC).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let mut texts = 0;
        let close = loop {
            let (op, payload) = read_frame(&mut sub);
            match op {
                1 | 2 => {
                    assert_eq!(payload.len(), body.len(), "{io:?}: a cut frame");
                    texts += 1;
                }
                8 => break payload,
                other => panic!("{io:?}: opcode {other}"),
            }
        };
        assert_eq!(
            close.get(..2),
            Some(&[0x03, 0xf3][..]),
            "{io:?}: 1011, not {:?} ({texts} frames before it)",
            String::from_utf8_lossy(&close)
        );
        assert!(texts > 0, "{io:?}: the queue before the close is delivered");
        assert_eq!(panics(&s, "connection"), 1, "{io:?}");
        assert_eq!(panics(&s, "worker"), 0, "{io:?}");
        s.shutdown();
        assert!(s.join(), "{io:?}");
    }
}
