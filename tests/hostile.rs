//! Hostile subscribers and publishers (issue #12): one regression test per
//! defect found, and the deadline invariant driven through every
//! connection state. Each asserts a bound (a count, bytes held, a
//! deadline with generous slack), never a speed. `.ci/run` runs this file
//! once per backend (`CORECAST_IO`).

mod common;

use common::*;
use corecast::proto::frame::{OpCode, client_frame};
use corecast::server::ServerHandle;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Slack on top of a documented deadline: the sweep period, a loaded CI
/// machine's scheduling, and the test's own polling.
const SLACK: Duration = Duration::from_secs(3);
/// How long a closing connection may take (`worker::LINGER`).
const LINGER: Duration = Duration::from_secs(2);

fn reply_text(s: &mut TcpStream) -> String {
    let (_, op, payload) = read_frame(s);
    assert_eq!(op, 0x1, "a text reply");
    String::from_utf8(payload).unwrap()
}

#[test]
fn six_thousand_nested_brackets_get_an_error_reply_and_the_subscriber_lives_on() {
    let server = start();
    let addr = server.local_addr();
    let mut s = raw_ws(addr, "/ws?topics=nest");
    let bomb = format!("{}{}", "[".repeat(6000), "]".repeat(6000));
    s.write_all(&client_frame(true, OpCode::Text, bomb.as_bytes(), MASK))
        .unwrap();
    let reply = reply_text(&mut s);
    assert!(reply.starts_with(r#"{"op":"error""#), "{reply}");
    // Objects nest the same way.
    let objects = format!("{}{}", r#"{"a":"#.repeat(5000), "}".repeat(5000));
    s.write_all(&client_frame(true, OpCode::Text, objects.as_bytes(), MASK))
        .unwrap();
    assert!(reply_text(&mut s).starts_with(r#"{"op":"error""#));
    // The worker is alive and this subscriber still subscribed.
    publish(addr, "nest", b"still here");
    let (_, op, payload) = read_frame(&mut s);
    assert_eq!((op, payload.as_slice()), (0x2, &b"still here"[..]));
    assert_eq!(server.stats().control_errors, 2);
}

#[test]
fn a_subscribe_naming_nine_thousand_topics_is_refused_without_subscribing_any() {
    let server = start();
    let addr = server.local_addr();
    let mut s = raw_ws(addr, "/ws");
    // Distinct names of at most three characters (base 36), so that 9 000
    // of them fit one control message.
    let base36 = |mut i: u32| {
        let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let mut name = Vec::new();
        loop {
            name.push(digits[(i % 36) as usize]);
            i /= 36;
            if i == 0 {
                break;
            }
        }
        format!("\"{}\"", String::from_utf8(name).unwrap())
    };
    let names: Vec<String> = (0..9000).map(base36).collect();
    let msg = format!(r#"{{"op":"subscribe","topics":[{}]}}"#, names.join(","));
    assert!(msg.len() < 64 * KIB, "within the control-message size");
    s.write_all(&client_frame(true, OpCode::Text, msg.as_bytes(), MASK))
        .unwrap();
    let reply = reply_text(&mut s);
    assert!(
        reply.starts_with(r#"{"op":"error""#) && reply.contains("too many"),
        "{reply}"
    );
    assert_eq!(server.stats().subscriptions, 0);
    // A message within the limit still works on the same connection.
    s.write_all(&client_frame(
        true,
        OpCode::Text,
        br#"{"op":"subscribe","topics":["a","b","a"]}"#,
        MASK,
    ))
    .unwrap();
    assert_eq!(
        reply_text(&mut s),
        r#"{"op":"subscribed","topics":["a","b"]}"#
    );
}

#[test]
fn a_subscriber_message_over_the_control_limit_closes_1009_before_it_is_buffered() {
    let server = start();
    let addr = server.local_addr();
    let mut s = raw_ws(addr, "/ws?topics=a");
    // A frame header announcing 1 MiB: refused on the header, no payload read.
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(MIB as u64).to_be_bytes());
    header.extend_from_slice(&MASK);
    s.write_all(&header).unwrap();
    assert_eq!(read_close_code(&mut s), 1009);
    assert!(server.stats().buffered_bytes < 64 * KIB as u64);
}

/// Waits until the server has accepted the connection under test, then
/// until it holds no connection; returns how long that took.
fn until_all_closed(server: &ServerHandle, limit: Duration) -> Duration {
    let start = Instant::now();
    assert!(
        eventually(Duration::from_secs(2), || server.stats().connections_open
            > 0),
        "the connection under test was never accepted"
    );
    assert!(
        eventually(limit, || server.stats().connections_open == 0),
        "still open after {limit:?}: {:?}",
        server.stats()
    );
    start.elapsed()
}

#[test]
fn an_echo_client_that_never_reads_its_echo_is_cut_by_the_send_timeout() {
    let server = start_with(|c| {
        c.send_timeout = Some(Duration::from_secs(1));
        c.ping_interval = None;
    });
    let addr = server.local_addr();
    let mut s = upgrade(tiny_window(addr), "/echo");
    // 8 MiB to echo: more than the queue bound, so the server pauses
    // reading this client and holds the echo it cannot send.
    let payload = vec![7u8; 8 * MIB];
    s.write_all(&client_frame(true, OpCode::Binary, &payload, MASK))
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || server
        .stats()
        .buffered_bytes
        > MIB as u64));
    // Paused, skipped by keepalive (off here), yet cut: 1 s without
    // progress, then the linger bound.
    until_all_closed(&server, Duration::from_secs(1) + LINGER + SLACK);
    let st = server.stats();
    assert_eq!(st.send_timeouts, 1, "{st:?}");
    assert_eq!(st.buffered_bytes, 0, "{st:?}");
    drop(s);
}

#[test]
fn a_large_publication_held_for_a_stalled_subscriber_is_charged_until_it_is_freed() {
    let server = start_with(|c| {
        c.send_timeout = Some(Duration::from_secs(2));
        c.ping_interval = None;
    });
    let addr = server.local_addr();
    let stalled = upgrade(tiny_window(addr), "/ws?topics=big");
    // 8 MiB into an empty queue: taken whole (a queue takes one frame of
    // any size), shared, and charged once while it is held.
    publish(addr, "big", &vec![1u8; 8 * MIB]);
    assert!(
        eventually(Duration::from_secs(5), || server.stats().buffered_bytes
            >= 8 * MIB as u64),
        "{:?}",
        server.stats()
    );
    // The subscriber never reads: the send timeout frees the frame.
    until_all_closed(&server, Duration::from_secs(2) + LINGER + SLACK);
    assert!(eventually(Duration::from_secs(2), || server
        .stats()
        .buffered_bytes
        == 0));
    assert_eq!(server.stats().send_timeouts, 1);
    drop(stalled);
}

#[test]
fn two_thousand_pipelined_metrics_requests_share_a_few_renderings() {
    let server = start();
    let addr = server.local_addr();
    let mut s = raw(addr);
    let n = 2000;
    let requests = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(n);
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(requests.as_bytes()).unwrap());
    for i in 0..n {
        let head = read_head(&mut s);
        assert!(head.starts_with("HTTP/1.1 200 "), "response {i}: {head}");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("Content-Length");
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        assert!(body.starts_with(b"# HELP "));
    }
    writer.join().unwrap();
    let renders = server.stats().metrics_renders;
    // One rendering per loop turn that answered requests, and a turn
    // answers until 64 KiB of answers wait unread (PIPELINE_AHEAD_BYTES),
    // at least three of these: not 2 000 renderings.
    assert!(
        (1..=n as u64 / 3).contains(&renders),
        "{renders} renderings for {n} requests"
    );
}

#[test]
fn pipelined_http_publishes_under_a_tiny_mailbox_mark_lose_nothing() {
    // Every queued byte is over the mark: HTTP publishers are held (not
    // read) whenever a peer's mailbox is not yet drained, and resumed.
    let server = start_with(|c| c.mailbox_high_water = 1);
    let addr = server.local_addr();
    // Enough subscribers that both workers have some (2^-15 chance not).
    let mut subs: Vec<TcpStream> = (0..16).map(|_| raw_ws(addr, "/ws?topics=p")).collect();
    let n = 3000u32;
    let mut req = Vec::new();
    for i in 0..n {
        let body = i.to_be_bytes().repeat(256); // 1 KiB, queued by reference
        req.extend_from_slice(
            format!(
                "POST /publish/p HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        req.extend_from_slice(&body);
    }
    let mut publisher = raw(addr);
    let mut w = publisher.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&req).unwrap());
    let readers: Vec<_> = subs
        .drain(..)
        .map(|mut s| {
            std::thread::spawn(move || {
                for i in 0..n {
                    let (_, _, payload) = read_frame(&mut s);
                    assert_eq!(payload[..4], i.to_be_bytes(), "in order, none lost");
                }
            })
        })
        .collect();
    for _ in 0..n {
        assert!(read_head(&mut publisher).starts_with("HTTP/1.1 204 "));
    }
    writer.join().unwrap();
    for r in readers {
        r.join().unwrap();
    }
    let st = server.stats();
    assert_eq!(st.messages_published, n as u64);
    assert_eq!((st.frames_dropped, st.undelivered), (0, 0), "{st:?}");
}

/// A server whose every deadline is short, for the state-by-state test,
/// publishing at most `rate` messages per second per publisher (0: any).
fn short_deadlines(rate: u32) -> ServerHandle {
    start_with(|c| {
        c.handshake_timeout = Duration::from_secs(1);
        c.ping_interval = Some(Duration::from_secs(1));
        c.ping_timeout = Duration::from_secs(1);
        c.message_timeout = Some(Duration::from_secs(1));
        c.send_timeout = Some(Duration::from_secs(1));
        c.max_outbound_bytes = 64 * KIB;
        c.max_publish_rate = rate;
    })
}

#[test]
fn a_silent_peer_is_closed_within_its_deadline_in_every_connection_state() {
    let server = short_deadlines(1);
    let addr = server.local_addr();
    let second = Duration::from_secs(1);
    let mut report = Vec::new();

    // Handshaking: half a request head, then silence (408, then linger).
    let mut s = raw(addr);
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").unwrap();
    report.push((
        "handshaking",
        until_all_closed(&server, second + LINGER + SLACK),
    ));
    drop(s);

    // Active: an open subscriber that never answers a ping.
    let s = raw_ws(addr, "/ws?topics=quiet");
    report.push((
        "active",
        until_all_closed(&server, 2 * second + LINGER + SLACK),
    ));
    drop(s);

    // Mid-message: a frame started and never finished (1008, then the
    // linger state: our close is sent, the peer never sends its FIN).
    let mut s = raw_ws(addr, "/echo");
    let frame = client_frame(true, OpCode::Binary, &[0u8; 1000], MASK);
    s.write_all(&frame[..500]).unwrap();
    report.push((
        "mid-message, then lingering",
        until_all_closed(&server, second + LINGER + SLACK),
    ));
    drop(s);

    // Mid-header: the first two bytes of a frame header (a 16-bit length
    // follows), never the rest (1008 at the message deadline).
    let mut s = raw_ws(addr, "/echo");
    s.write_all(&[0x82, 0xFE]).unwrap();
    report.push((
        "mid-header, then lingering",
        until_all_closed(&server, second + LINGER + SLACK),
    ));
    drop(s);

    // Paused for backpressure: echoes pile up for a client that never reads.
    let mut s = upgrade(tiny_window(addr), "/echo");
    let big = client_frame(true, OpCode::Binary, &vec![1u8; 4 * MIB], MASK);
    s.write_all(&big).unwrap();
    report.push(("paused", until_all_closed(&server, second + LINGER + SLACK)));
    drop(s);

    // Paced: a publisher over --max-publish-rate (1/s) is not read for ~3 s,
    // then judged by keepalive like any other.
    let mut s = raw_ws(addr, "/publish/paced");
    for _ in 0..4 {
        s.write_all(&client_frame(true, OpCode::Binary, b"x", MASK))
            .unwrap();
    }
    report.push((
        "paced",
        until_all_closed(&server, 3 * second + 2 * second + LINGER + SLACK),
    ));
    drop(s);

    // Closing with a queue it cannot flush: a slow consumer cut 1008 whose
    // close frame waits behind data the peer never reads. (Another server:
    // this one would answer the HTTP publisher 429 at 1/s.)
    let st = server.stats();
    let server = short_deadlines(0);
    let addr = server.local_addr();
    let s = upgrade(tiny_window(addr), "/ws?topics=flood");
    for _ in 0..8 {
        publish(addr, "flood", &vec![2u8; MIB]);
    }
    report.push(("closing", until_all_closed(&server, LINGER + SLACK)));
    drop(s);

    assert!(st.handshake_timeouts >= 1, "{st:?}");
    assert!(st.keepalive_timeouts >= 2, "active and paced: {st:?}");
    assert!(
        st.message_timeouts >= 2,
        "mid-message and mid-header: {st:?}"
    );
    assert!(st.send_timeouts >= 1, "{st:?}");
    assert!(st.publishers_paced >= 1, "{st:?}");
    assert!(server.stats().slow_consumer_disconnects >= 1);
    eprintln!("closed after: {report:?}");
}

#[test]
fn a_publisher_fanning_out_to_its_own_worker_is_bounded_per_turn_and_loses_nothing() {
    // One worker: every subscriber is local to the publisher. 1 000
    // messages to 2 000 subscribers are 2 M deliveries, more than one
    // turn's bound (1 Mi) even if the publisher's bytes arrive in 8 KiB
    // pieces (800 messages: 1.6 M deliveries).
    let server = start_with(|c| c.workers = 1);
    let addr = server.local_addr();
    let n_subs = 2000;
    let n_msgs = 1000u32;
    let mut subs: Vec<TcpStream> = (0..n_subs)
        .map(|_| raw_ws(addr, "/ws?topics=own"))
        .collect();
    let mut publisher = raw_ws(addr, "/publish/own");
    let mut burst = Vec::new();
    for i in 0..n_msgs {
        burst.extend(client_frame(true, OpCode::Binary, &i.to_be_bytes(), MASK));
    }
    publisher.write_all(&burst).unwrap();
    // Every subscriber gets every message, in order: 6 bytes each
    // (a 2-byte header and the 4-byte number).
    for (k, s) in subs.iter_mut().enumerate() {
        let mut got = vec![0u8; 6 * n_msgs as usize];
        s.read_exact(&mut got).unwrap();
        for (i, frame) in got.chunks(6).enumerate() {
            assert_eq!(frame[..2], [0x82, 4], "subscriber {k}, message {i}");
            assert_eq!(frame[2..], (i as u32).to_be_bytes(), "subscriber {k}");
        }
    }
    let st = server.stats();
    assert!(
        st.deliveries_deferred >= 1,
        "2 M local deliveries were made in one turn: {st:?}"
    );
    assert_eq!((st.frames_dropped, st.undelivered), (0, 0), "{st:?}");
}

#[test]
fn an_http_1_1_request_without_exactly_one_host_is_answered_400() {
    let server = start();
    let addr = server.local_addr();
    for req in [
        &b"POST /publish/h HTTP/1.1\r\nContent-Length: 1\r\n\r\nx"[..],
        b"POST /publish/h HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 1\r\n\r\nx",
        b"GET /healthz HTTP/1.1\r\n\r\n",
        // Two values folded into one line, and bytes no host has.
        b"GET /healthz HTTP/1.1\r\nHost: a, b\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a/b\r\n\r\n",
    ] {
        let r = refused(addr, req);
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        assert!(r.contains("Host header"), "{r}");
    }
    // Host bytes in no host's shape (an outside probe's values), on an
    // admin endpoint and on an upgrade.
    for host in [
        "[zz]", "[::1", "[::1]x", "a:b", "a:80:90", "a:-1", "::1", "a]", "a:65536",
    ] {
        let req = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let r = refused(addr, req.as_bytes());
        assert!(r.starts_with("HTTP/1.1 400 "), "{host}: {r}");
        assert!(r.contains("invalid Host header"), "{host}: {r}");
    }
    let upgrade = upgrade_request("/echo").replacen("Host: localhost", "Host: [::1]x", 1);
    let r = refused(addr, upgrade.as_bytes());
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
    assert!(r.contains("invalid Host header"), "{r}");
    // Names, addresses, IP literals and ports are hosts.
    for host in [
        "example.com:443",
        "127.0.0.1",
        "[::1]:9000",
        "[::ffff:127.0.0.1]",
        "xn--bcher-kva.example",
        "a%20b",
        "localhost:",
    ] {
        let req = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let r = refused(addr, req.as_bytes());
        assert!(r.starts_with("HTTP/1.1 200 "), "{host}: {r}");
    }
    // HTTP/1.0 has no Host requirement; its keep-alive is answered with a
    // close (the answer says so), not left to guess.
    let r = refused(addr, b"GET /healthz HTTP/1.0\r\n\r\n");
    assert!(r.contains(" 200 "), "{r}");
    let r = refused(
        addr,
        b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    );
    assert!(
        r.contains(" 200 ") && r.contains("Connection: close\r\n"),
        "{r}"
    );
}
