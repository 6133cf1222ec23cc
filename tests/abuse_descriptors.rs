//! At the descriptor limit: a child `corecast` server under a small
//! `RLIMIT_NOFILE`, filled, must wait without spinning and serve the
//! clients that waited once descriptors free. Every test runs against the
//! backend `CORECAST_IO` selects (`.ci/run` runs the suite once per
//! backend).
//!
//! The tests take [`exclusive`] first, so they run one at a time: each
//! fills a child server up to its limit and bounds how soon it answers
//! once descriptors free, and one measures the child's CPU time, which
//! another test's load would turn into noise.

mod common;

use common::*;
use corecast::proto::frame::{OpCode, client_frame};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

/// The descriptor limit the child servers of these tests run under.
const NOFILE: u32 = 64;

/// A one-worker child server under a limit of [`NOFILE`] descriptors,
/// filled: upgraded /echo connections (returned) until one is not answered
/// within a second (returned as the first waiting one). On epoll the
/// process then has no descriptor left; on io_uring the ring's file table,
/// sized from the limit, is full.
fn server_at_the_limit() -> (ChildServer, Vec<TcpStream>, TcpStream) {
    let server = ChildServer::start(
        &[
            "--workers",
            "1",
            "--handshake-timeout",
            "60s",
            "--ping-interval",
            "0",
        ],
        Some(NOFILE),
    );
    let mut served = Vec::new();
    let waiting = loop {
        assert!(
            served.len() < 4 * NOFILE as usize,
            "{} connections served under a limit of {NOFILE}",
            served.len()
        );
        let mut s = raw(server.addr);
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s.write_all(upgrade_request("/echo").as_bytes()).unwrap();
        match try_read_head(&mut s) {
            Some(head) if head.starts_with("HTTP/1.1 101 ") => served.push(s),
            _ => break s,
        }
    };
    assert!(
        served.len() > NOFILE as usize / 2,
        "only {} served",
        served.len()
    );
    (server, served, waiting)
}

#[test]
fn at_the_descriptor_limit_the_server_waits_without_spinning_and_recovers() {
    let _one = exclusive();
    let (server, mut served, first_waiting) = server_at_the_limit();
    let addr = server.addr;
    let mut waiting = vec![first_waiting];
    for _ in 0..20 {
        let mut s = raw(addr);
        s.write_all(upgrade_request("/echo").as_bytes()).unwrap();
        waiting.push(s);
    }
    // At the limit, with connections waiting: the server must idle, not spin.
    thread::sleep(Duration::from_millis(300));
    let (cpu0, logged0, t0) = (
        server.cpu_time(),
        server.log_count("accept failed"),
        Instant::now(),
    );
    thread::sleep(Duration::from_secs(1));
    let (cpu, logged, wall) = (
        server.cpu_time() - cpu0,
        server.log_count("accept failed") - logged0,
        t0.elapsed(),
    );
    assert!(
        cpu.as_secs_f64() < 0.3 * wall.as_secs_f64(),
        "the server used {cpu:?} of CPU in {wall:?} at the descriptor limit"
    );
    assert!(logged <= 20, "{logged} accept failures logged in {wall:?}");
    // The connections it holds are served normally meanwhile.
    let s = &mut served[0];
    s.write_all(&client_frame(true, OpCode::Text, b"at the limit", MASK))
        .unwrap();
    assert_eq!(read_frame(s), (true, 0x1, b"at the limit".to_vec()));
    // Free some: the waiting ones go, and a new client is served quickly.
    drop(waiting);
    served.truncate(served.len() - 10);
    let started = Instant::now();
    let mut s = raw(addr);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(upgrade_request("/echo").as_bytes()).unwrap();
    let head = try_read_head(&mut s).expect("a new client is answered once descriptors are free");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    s.write_all(&client_frame(true, OpCode::Text, b"room again", MASK))
        .unwrap();
    assert_eq!(read_frame(&mut s), (true, 0x1, b"room again".to_vec()));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "served after {took:?}");
    let m = server.metrics();
    let errors = metric(&m, "corecast_accept_errors_total");
    // epoll meets EMFILE and counts it; io_uring knows its fixed-file table
    // is full and arms no accept until a slot frees (an accept completing
    // into a full table would reset the client).
    if std::env::var("CORECAST_IO").as_deref() == Ok("epoll") {
        assert!(errors > 0, "accept errors counted");
    }
    assert!(
        errors < 100,
        "{errors} accept errors: retried in a tight loop"
    );
    assert_eq!(metric(&m, "corecast_handshake_timeouts_total"), 0);
    drop(served);
    drop(s);
    let open = || metric(&server.metrics(), "corecast_connections_open");
    assert_eq!(settle(Duration::from_secs(5), open, 0), 0, "all closed");
}

#[test]
fn clients_waiting_at_the_descriptor_limit_are_served_once_descriptors_free() {
    let _one = exclusive();
    let (server, mut served, first_waiting) = server_at_the_limit();
    drop(first_waiting);
    let mut waiting: Vec<TcpStream> = (0..5)
        .map(|_| {
            let mut s = raw(server.addr);
            s.write_all(upgrade_request("/echo").as_bytes()).unwrap();
            s
        })
        .collect();
    // They wait a second, as clients do, while the server is at its limit.
    thread::sleep(Duration::from_secs(1));
    served.truncate(served.len() - 10);
    for (i, s) in waiting.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut b) {
                Ok(1) => head.push(b[0]),
                other => panic!(
                    "waiting client {i}: {other:?} after {:?}",
                    String::from_utf8_lossy(&head)
                ),
            }
        }
        assert!(head.starts_with(b"HTTP/1.1 101 "), "waiting client {i}");
    }
}

#[test]
fn an_admin_request_made_at_the_descriptor_limit_is_answered_once_descriptors_free() {
    let _one = exclusive();
    let (server, mut served, first_waiting) = server_at_the_limit();
    drop(first_waiting);
    let mut m = raw(server.admin);
    m.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    served.truncate(served.len() - 10);
    m.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let head = try_read_head(&mut m)
        .expect("the admin request answered within 2 s of freeing descriptors");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
}

/// io_uring: a worker whose fixed-file table fills is steered away from,
/// but its listener's backlog still holds the clients that arrived before:
/// each gets `503` with `Retry-After` at once (and its retry goes to a
/// worker with room), none waits until it times out. The child is stopped
/// while the clients connect, so they all queue on the first worker.
#[test]
fn clients_queued_on_a_full_ring_are_refused_at_once_while_others_have_room() {
    if io_flag() == "epoll"
        || std::env::var_os("CORECAST_URING_PLAIN_FDS").is_some_and(|v| v == "1")
    {
        return; // one process-wide descriptor limit: clients wait (above)
    }
    let _one = exclusive();
    // 1 024 slots per ring (the limit), 896 before a ring counts as full:
    // three rings for 1 800 connections, worker 0 the only primary.
    let server = ChildServer::start(
        &[
            "--workers",
            "1",
            "--max-connections",
            "1800",
            "--ping-interval",
            "0",
        ],
        Some(1024),
    );
    let pid = server.pid() as i32;
    // SAFETY: signals to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let mut clients: Vec<TcpStream> = (0..1100)
        .map(|_| {
            let mut s = raw(server.addr);
            s.write_all(upgrade_request("/ws?topics=t").as_bytes())
                .unwrap();
            s
        })
        .collect();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let started = Instant::now();
    let (mut upgraded, mut refused) = (0, 0);
    for (i, s) in clients.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head = try_read_head(s)
            .unwrap_or_else(|| panic!("client {i} got no answer in {:?}", started.elapsed()));
        if head.starts_with("HTTP/1.1 101 ") {
            upgraded += 1;
        } else {
            assert!(head.starts_with("HTTP/1.1 503 "), "client {i}: {head}");
            assert!(head.contains("Retry-After: 1"), "{head}");
            refused += 1;
        }
    }
    let took = started.elapsed();
    eprintln!("{upgraded} upgraded, {refused} refused in {took:?}");
    assert!(took < Duration::from_secs(5), "answered in {took:?}");
    assert!((896..=1024).contains(&upgraded), "{upgraded} upgraded");
    assert_eq!(upgraded + refused, 1100);
    let m = server.metrics();
    assert_eq!(
        metric(
            &m,
            "corecast_connections_refused_total{limit=\"worker_table_full\"}"
        ),
        refused as u64
    );
    // The refused retry: it lands on a worker with room.
    let mut again = raw(server.addr);
    again
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    again
        .write_all(upgrade_request("/ws?topics=t").as_bytes())
        .unwrap();
    let head = try_read_head(&mut again).expect("the retry is answered");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
}
