//! Shutdown under load: SIGTERM to a child `corecast` server busy with
//! subscribers, echo clients, silent clients and a publisher. Runs against
//! the backend `CORECAST_IO` selects (`.ci/run` runs the suite once per
//! backend).
//!
//! The test takes [`exclusive`] first, so that any test added here runs
//! apart from it: it checks the drain deadline to the second on a small
//! machine, which a test running alongside would make noise.

mod common;

use common::*;
use corecast::proto::frame::{OpCode, client_frame};
use std::io::Write;
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// A subscriber until the server's close: checks the stream is unbroken
/// from message 0, answers the close; returns (close code, messages).
fn subscriber_until_close(mut s: TcpStream, start: &Barrier) -> (u16, u32) {
    start.wait();
    let mut next = 0u32;
    loop {
        let (_, op, p) = read_frame(&mut s);
        match op {
            0x2 => {
                assert_eq!(number_of(&p), next, "unbroken stream");
                next += 1;
            }
            0x8 => {
                let code = u16::from_be_bytes([p[0], p[1]]);
                s.write_all(&client_frame(true, OpCode::Close, &p[..2], MASK))
                    .unwrap();
                assert_eof(&mut s);
                return (code, next);
            }
            other => panic!("opcode {other:#x}"),
        }
    }
}

/// An echo client in conversation until the server's close; returns
/// (close code, echoes received).
fn echo_until_close(mut s: TcpStream, id: usize, start: &Barrier) -> (u16, u32) {
    start.wait();
    let mut echoed = 0u32;
    loop {
        let msg = format!("client {id} message {echoed}");
        s.write_all(&client_frame(true, OpCode::Text, msg.as_bytes(), MASK))
            .unwrap();
        let (_, op, p) = read_frame(&mut s);
        match op {
            0x1 => {
                assert_eq!(p, msg.as_bytes());
                echoed += 1;
                thread::sleep(Duration::from_millis(20));
            }
            0x8 => {
                let code = u16::from_be_bytes([p[0], p[1]]);
                s.write_all(&client_frame(true, OpCode::Close, &p[..2], MASK))
                    .unwrap();
                assert_eof(&mut s);
                return (code, echoed);
            }
            other => panic!("opcode {other:#x}"),
        }
    }
}

#[test]
fn sigterm_under_load_closes_every_client_1001_and_exits_0_within_the_drain_time() {
    let _one = exclusive();
    const SUBSCRIBERS: usize = 300;
    const ECHOERS: usize = 200;
    /// Clients that never answer the close: the drain deadline must end them.
    const SILENT: usize = 10;
    let drain = Duration::from_secs(3);
    let mut server = ChildServer::start(
        &[
            "--workers",
            "2",
            "--drain-timeout",
            "3s",
            "--ping-interval",
            "0",
        ],
        None,
    );
    let addr = server.addr;
    let start = Arc::new(Barrier::new(SUBSCRIBERS + ECHOERS + 2));
    let spawn = |f: Box<dyn FnOnce() -> (u16, u32) + Send>| {
        thread::Builder::new()
            .stack_size(256 * KIB)
            .spawn(f)
            .unwrap()
    };
    let mut subscribers = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let s = raw_ws(addr, "/ws?topics=load");
        let start = Arc::clone(&start);
        subscribers.push(spawn(Box::new(move || subscriber_until_close(s, &start))));
    }
    let mut echoers = Vec::new();
    for id in 0..ECHOERS {
        let s = raw_ws(addr, "/echo");
        let start = Arc::clone(&start);
        echoers.push(spawn(Box::new(move || echo_until_close(s, id, &start))));
    }
    let mut silent: Vec<TcpStream> = (0..SILENT).map(|_| raw_ws(addr, "/echo")).collect();
    // A steady stream: a numbered message every 5 ms over HTTP, until the
    // server closes the publisher's connection (it is not a WebSocket).
    let publisher = {
        let start = Arc::clone(&start);
        thread::spawn(move || {
            let mut p = raw(addr);
            start.wait();
            let mut i = 0u32;
            loop {
                if p.write_all(&post("load", &numbered(i, 200))).is_err() {
                    return i;
                }
                match try_read_head(&mut p) {
                    Some(h) if h.starts_with("HTTP/1.1 204 ") => i += 1,
                    _ => return i,
                }
                thread::sleep(Duration::from_millis(5));
            }
        })
    };
    start.wait();
    thread::sleep(Duration::from_millis(500));
    let m = server.metrics();
    assert!(
        metric(&m, "corecast_frames_sent_total") > SUBSCRIBERS as u64,
        "the stream flows"
    );
    assert!(
        metric(&m, "corecast_messages_echoed_total") > ECHOERS as u64,
        "echo clients talk"
    );
    let signalled = Instant::now();
    server.terminate();
    let status = server.wait_exit(drain + Duration::from_secs(5));
    let took = signalled.elapsed();
    let status = status.unwrap_or_else(|| panic!("still running {took:?} after SIGTERM"));
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        server.log_text()
    );
    assert!(
        took < drain + Duration::from_millis(1500),
        "exited {took:?} after SIGTERM"
    );
    assert!(
        took + Duration::from_millis(200) >= drain,
        "exited after {took:?}: did not wait for the silent clients"
    );
    for (i, t) in subscribers.into_iter().enumerate() {
        let (code, got) = t.join().unwrap_or_else(|_| panic!("subscriber {i} failed"));
        assert_eq!(code, 1001, "subscriber {i}");
        assert!(got > 0, "subscriber {i} got nothing before the close");
    }
    for (i, t) in echoers.into_iter().enumerate() {
        let (code, echoed) = t
            .join()
            .unwrap_or_else(|_| panic!("echo client {i} failed"));
        assert_eq!(code, 1001, "echo client {i}");
        assert!(echoed > 0, "echo client {i} had no conversation");
    }
    for (i, s) in silent.iter_mut().enumerate() {
        assert_eq!(read_close_code(s), 1001, "silent client {i}");
    }
    assert!(publisher.join().unwrap() > 0);
}

/// From the moment SIGTERM arrives, `/healthz` on the admin listener
/// answers `503` `draining` (a load balancer stops sending clients) while
/// the open connections are closed; `/metrics` still answers.
#[test]
fn healthz_says_draining_during_the_drain() {
    let _one = exclusive();
    let mut server = ChildServer::start(&["--drain-timeout", "3s"], None);
    let healthz = |addr| {
        let mut s = raw(addr);
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        String::from_utf8_lossy(&read_to_eof(&mut s)).into_owned()
    };
    assert!(healthz(server.admin).starts_with("HTTP/1.1 200 "));
    // A client that never answers the close keeps the drain going.
    let silent = raw_ws(server.addr, "/ws?topics=t");
    server.terminate();
    let end = Instant::now() + Duration::from_secs(2);
    let answer = loop {
        let a = healthz(server.admin);
        if !a.starts_with("HTTP/1.1 200 ") || Instant::now() > end {
            break a;
        }
        thread::sleep(Duration::from_millis(10));
    };
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.ends_with("draining\n"), "{answer}");
    assert!(metric(&server.metrics(), "corecast_connections_open") >= 1);
    drop(silent);
    let status = server.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(status.success(), "{status:?}");
}

/// The drain's 1001 closes are spread over the first half of the drain
/// window, not sent all at once: clients reconnect in a spread, not in one
/// wave.
#[test]
fn the_drains_closes_are_spread_over_half_the_window() {
    let _one = exclusive();
    let server = start_with(|c| c.drain_timeout = Duration::from_secs(2));
    let addr = server.local_addr();
    let clients: Vec<TcpStream> = (0..40).map(|_| raw_ws(addr, "/ws?topics=t")).collect();
    let started = Instant::now();
    server.shutdown();
    let arrivals: Vec<Duration> = thread::scope(|s| {
        let handles: Vec<_> = clients
            .into_iter()
            .map(|mut c| {
                s.spawn(move || {
                    assert_eq!(read_close_code(&mut c), 1001);
                    started.elapsed()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = *arrivals.iter().min().unwrap();
    let last = *arrivals.iter().max().unwrap();
    assert!(
        first < Duration::from_millis(300),
        "first close after {first:?}"
    );
    assert!(
        last >= Duration::from_millis(600) && last < Duration::from_millis(1800),
        "last close after {last:?}"
    );
    let early = arrivals
        .iter()
        .filter(|&&a| a < Duration::from_millis(500))
        .count();
    assert!(
        (10..=30).contains(&early),
        "{early} of 40 closed in the first 500 ms"
    );
    server.join();
}
