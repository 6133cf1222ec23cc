//! Abuse before the upgrade: slowloris clients that trickle request heads
//! and bodies a byte at a time, and ten thousand half-open handshakes held
//! at once, each while honest clients are served beside them. Every test
//! runs against the backend `CORECAST_IO` selects (`.ci/run` runs the suite
//! once per backend); the half-open one spawns the `corecast` binary (more
//! sockets than one process may hold).
//!
//! The tests take [`exclusive`] first, so they run one at a time: each
//! bounds honest clients' latency, which another test's load would turn
//! into noise on a small machine.

mod common;

use common::*;
use socket2::{Domain, Socket, Type};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Slowloris.
// ---------------------------------------------------------------------------

/// A client that sends `head` at once (reading its whole answer first when
/// `answered`), then `tail` one byte per `step`.
struct Trickle {
    head: Vec<u8>,
    answered: bool,
    tail: Vec<u8>,
}

/// Runs `t` against `addr` until the server answers `408` or closes the
/// connection; returns how long after the deadline started (the connection
/// was established, or the head was answered) that came.
fn trickle(addr: SocketAddr, t: Trickle, step: Duration) -> Result<Duration, String> {
    let mut s = raw(addr);
    let mut since = Instant::now();
    s.write_all(&t.head).map_err(|e| format!("head: {e}"))?;
    if t.answered {
        let head = try_read_head(&mut s).ok_or("no answer to the head")?;
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map_or(0, |v| v.trim().parse().unwrap());
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).map_err(|e| format!("body: {e}"))?;
        since = Instant::now();
    }
    s.set_read_timeout(Some(step)).unwrap();
    let mut buf = [0u8; 512];
    for &b in &t.tail {
        if let Err(e) = s.write_all(&[b]) {
            // Only after the server closed (a reset answers a write to a closed socket).
            return match e.kind() {
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => Ok(since.elapsed()),
                _ => Err(format!("write: {e}")),
            };
        }
        // Waiting for the server's close doubles as the pause between bytes.
        match s.read(&mut buf) {
            Ok(0) => return Ok(since.elapsed()),
            // Part of a request arrived: the deadline is answered 408.
            Ok(n) if buf[..n].starts_with(b"HTTP/1.1 408 Request Timeout\r\n") => {
                return Ok(since.elapsed());
            }
            Ok(n) => {
                return Err(format!(
                    "unexpected answer {:?}",
                    String::from_utf8_lossy(&buf[..n])
                ));
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(since.elapsed()),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Err("sent every byte without being cut off".into())
}

#[test]
fn slowloris_heads_and_bodies_are_cut_at_the_deadline_while_honest_clients_are_served() {
    let _one = exclusive();
    let deadline = Duration::from_secs(1);
    let step = Duration::from_millis(200);
    let server = start_with(|c| {
        c.handshake_timeout = deadline;
        c.ping_interval = None;
    });
    let addr = server.local_addr();
    let upgrade = upgrade_request("/echo").into_bytes();
    let mut trickles = Vec::new();
    // A request head, one byte every 200 ms: 26 s for the whole head; each
    // byte arrives well inside any per-read timeout, the whole head never
    // inside the deadline.
    for _ in 0..16 {
        trickles.push(Trickle {
            head: Vec::new(),
            answered: false,
            tail: upgrade.clone(),
        });
    }
    // A complete publish head, then its body one byte at a time: the body
    // is part of the request and has the same deadline.
    for _ in 0..4 {
        trickles.push(Trickle {
            head: b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".to_vec(),
            answered: false,
            tail: vec![b'x'; 100],
        });
    }
    // A keep-alive request answered at once, then a second request trickled:
    // the deadline starts again for each request.
    for _ in 0..2 {
        trickles.push(Trickle {
            head: b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            answered: true,
            tail: upgrade.clone(),
        });
    }
    let n = trickles.len();
    let started = Instant::now();
    let threads: Vec<_> = trickles
        .into_iter()
        .map(|t| thread::spawn(move || trickle(addr, t, step)))
        .collect();
    // Meanwhile honest clients come and go quickly, all through the deadline.
    let mut honest = Vec::new();
    while started.elapsed() < deadline + Duration::from_millis(500) {
        honest.push(honest_round_trip(addr, "honest"));
        thread::sleep(Duration::from_millis(100));
    }
    for (i, t) in threads.into_iter().enumerate() {
        let cut = t
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("trickler {i}: {e}"));
        assert!(
            cut + Duration::from_millis(100) >= deadline,
            "trickler {i} cut after {cut:?}, before the {deadline:?} deadline"
        );
        assert!(
            cut < deadline + Duration::from_secs(2),
            "trickler {i} cut only after {cut:?}"
        );
    }
    let slowest = honest.iter().max().unwrap();
    assert!(
        *slowest < Duration::from_millis(500),
        "an honest round trip took {slowest:?} (all: {honest:?})"
    );
    assert!(eventually(Duration::from_secs(2), || server
        .stats()
        .handshake_timeouts
        == n as u64));
    let s = server.stats();
    assert_eq!(s.handshake_timeouts, n as u64, "{s:?}");
    assert_eq!(s.handshakes_accepted, honest.len() as u64, "{s:?}");
    assert!(eventually(Duration::from_secs(5), || server
        .stats()
        .connections_open
        == 0));
}

// ---------------------------------------------------------------------------
// Ten thousand half-open handshakes.
// ---------------------------------------------------------------------------

/// A connection from `src` that sent `partial` (a request head without its
/// end) and then nothing.
fn half_open(addr: SocketAddr, src: Ipv4Addr, partial: &[u8]) -> TcpStream {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from((src, 0)).into())
        .unwrap_or_else(|e| panic!("bind {src}: {e}"));
    sock.connect_timeout(&addr.into(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect from {src}: {e}"));
    let mut s: TcpStream = sock.into();
    s.write_all(partial).unwrap();
    s
}

#[test]
fn ten_thousand_half_open_handshakes_neither_starve_honest_clients_nor_leak() {
    let _one = exclusive();
    const HALF_OPEN: usize = 10_000;
    /// Source addresses 127.0.0.2..: 50 connections each.
    const SOURCES: usize = 200;
    // The server runs in a child: on epoll each connection is a descriptor
    // on both sides, 20 000 in all, which is the whole limit of one process.
    let server = ChildServer::start(
        &[
            "--workers",
            "2",
            "--handshake-timeout",
            "120s",
            "--ping-interval",
            "0",
        ],
        None,
    );
    let addr = server.addr;
    let open = || metric(&server.metrics(), "corecast_connections_open");
    assert_eq!(open(), 0);
    let base_fds = server.open_fds();
    let partial = b"GET /echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Up";
    let threads: Vec<_> = (0..2)
        .map(|t| {
            thread::spawn(move || {
                (t * HALF_OPEN / 2..(t + 1) * HALF_OPEN / 2)
                    .map(|i| {
                        let src = Ipv4Addr::new(127, 0, 0, 2 + (i % SOURCES) as u8);
                        half_open(addr, src, partial)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let held: Vec<TcpStream> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(
        settle(Duration::from_secs(15), open, HALF_OPEN as u64),
        HALF_OPEN as u64,
        "all half-open connections accepted"
    );
    // Honest clients are served promptly beside them.
    let latencies: Vec<Duration> = (0..20)
        .map(|i| honest_round_trip(addr, &format!("honest {i}")))
        .collect();
    let slowest = latencies.iter().max().unwrap();
    assert!(
        *slowest < Duration::from_secs(1),
        "an honest round trip took {slowest:?} (all: {latencies:?})"
    );
    let m = server.metrics();
    assert_eq!(metric(&m, "corecast_handshake_timeouts_total"), 0);
    assert_eq!(metric(&m, "corecast_handshakes_accepted_total"), 20);
    assert_eq!(
        settle(Duration::from_secs(5), open, HALF_OPEN as u64),
        HALF_OPEN as u64,
        "the half-open connections are all still there"
    );
    // Closing the half-open connections gives everything back.
    drop(held);
    assert_eq!(
        settle(Duration::from_secs(10), open, 0),
        0,
        "connections_open back to 0"
    );
    assert_eq!(
        settle(
            Duration::from_secs(5),
            || server.open_fds() as u64,
            base_fds as u64
        ),
        base_fds as u64,
        "the server's descriptors back to their baseline"
    );
}
