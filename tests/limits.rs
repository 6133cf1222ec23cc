//! Every limit of docs/SECURITY.md, hit on purpose: the client sees the
//! documented answer (HTTP status with a reason, or close code) and the
//! limit's metric moves. Runs on both backends (CORECAST_IO).

mod common;

use common::*;
use corecast::proto::frame::{OpCode, client_frame};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use tungstenite::Message;

/// The source address `/metrics` is asked from: one of its own, so
/// per-address limits never refuse it.
const METRICS_FROM: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 250));

fn assert_503(head: &str, reason: &str, all: &str) {
    assert!(
        head.starts_with("HTTP/1.1 503 Service Unavailable"),
        "{head}"
    );
    assert!(head.contains("Retry-After: 1\r\n"), "{head}");
    assert!(all.contains(reason), "reason {reason:?} missing in {all}");
}

#[test]
fn the_connection_cap_answers_503_and_frees_with_closes() {
    let server = start_with(|c| c.max_connections = 3);
    let addr = server.local_addr();
    let mut held: Vec<TcpStream> = (0..3).map(|_| raw_ws(addr, "/echo")).collect();
    let mut extra = raw(addr);
    let head = read_head(&mut extra);
    let rest = String::from_utf8(read_to_eof(&mut extra)).unwrap();
    assert_503(&head, "connection limit", &rest);
    assert_eq!(server.stats().connections_refused, 1);
    drop(held.pop());
    // Room again once the server has seen the close: a new client is served.
    let mut s = raw(addr);
    assert!(eventually(Duration::from_secs(3), || {
        s = raw(addr);
        request_upgrade(&mut s, "/echo").starts_with("HTTP/1.1 101")
    }));
    drop(s);
    drop(held.pop());
    assert!(eventually(Duration::from_secs(3), || {
        let mut m = raw(addr);
        m.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        String::from_utf8_lossy(&read_to_eof(&mut m))
            .contains("corecast_connections_refused_total{limit=\"max_connections\"} ")
    }));
}

#[test]
fn the_per_address_cap_only_affects_that_address() {
    let server = start_with(|c| c.max_connections_per_ip = 2);
    let addr = server.local_addr();
    let one: IpAddr = [127, 0, 0, 1].into();
    let two: IpAddr = [127, 0, 0, 2].into();
    let mut a = raw_from(one, addr);
    let mut b = raw_from(one, addr);
    assert!(request_upgrade(&mut a, "/echo").starts_with("HTTP/1.1 101"));
    assert!(request_upgrade(&mut b, "/echo").starts_with("HTTP/1.1 101"));
    let mut c = raw_from(one, addr);
    let head = read_head(&mut c);
    assert_503(
        &head,
        "too many connections from your address",
        &String::from_utf8(read_to_eof(&mut c)).unwrap(),
    );
    let mut d = raw_from(two, addr);
    assert!(request_upgrade(&mut d, "/echo").starts_with("HTTP/1.1 101"));
    drop(a);
    // The slot comes back once the server has seen the close.
    assert!(eventually(Duration::from_secs(3), || {
        let mut e = raw_from(one, addr);
        request_upgrade(&mut e, "/echo").starts_with("HTTP/1.1 101")
    }));
    assert!(
        metric(
            &metrics_from(METRICS_FROM, addr),
            "corecast_connections_refused_total{limit=\"max_connections_per_ip\"}"
        ) >= 1
    );
}

#[test]
fn the_connect_rate_refuses_a_burst_from_one_address() {
    // 2 per second with a burst of 2: eight connections in a row get at
    // least the burst and at least one refusal, even on a slow machine
    // (one more token per 500 ms).
    let server = start_with(|c| c.max_connect_rate_per_ip = 2);
    let addr = server.local_addr();
    let from: IpAddr = [127, 0, 0, 3].into();
    let mut answers = Vec::new();
    for _ in 0..8 {
        let mut s = raw_from(from, addr);
        answers.push(request_upgrade(&mut s, "/echo"));
    }
    let ok = answers
        .iter()
        .filter(|h| h.starts_with("HTTP/1.1 101"))
        .count();
    let refused = answers
        .iter()
        .filter(|h| h.starts_with("HTTP/1.1 503"))
        .count();
    assert!(ok >= 2, "a second's worth gets in: {answers:?}");
    assert!(refused >= 1, "the rest are refused: {answers:?}");
    assert_eq!(ok + refused, 8);
    // Another address is not affected.
    let mut s = raw_from([127, 0, 0, 4].into(), addr);
    assert!(request_upgrade(&mut s, "/echo").starts_with("HTTP/1.1 101"));
    assert!(
        metric(
            &metrics_from(METRICS_FROM, addr),
            "corecast_connections_refused_total{limit=\"connect_rate\"}"
        ) >= 1
    );
}

#[test]
fn http_publishers_over_the_rate_get_429() {
    let server = start_with(|c| c.max_publish_rate = 3);
    let addr = server.local_addr();
    let mut s = raw(addr);
    let mut statuses = Vec::new();
    for i in 0..20u8 {
        s.write_all(&post("prices", &[i])).unwrap();
        let head = read_head(&mut s);
        statuses.push(head[9..12].to_string());
        if head.starts_with("HTTP/1.1 429") {
            assert!(head.contains("Retry-After: 1\r\n"), "{head}");
            let rest = String::from_utf8(read_to_eof(&mut s)).unwrap();
            assert!(rest.contains("--max-publish-rate"), "{rest}");
            break;
        }
    }
    // A second's worth (3) at least, then 429 (one more token per 333 ms).
    let (last, published) = statuses.split_last().unwrap();
    assert_eq!(last, "429", "{statuses:?}");
    assert!(
        published.len() >= 3 && published.iter().all(|s| s == "204"),
        "{statuses:?}"
    );
    assert_eq!(server.stats().publish_rate_limited, 1);
    assert_eq!(
        metric(
            &metrics_from(METRICS_FROM, addr),
            "corecast_publish_rate_limited_total"
        ),
        1
    );
}

#[test]
fn websocket_publishers_over_the_rate_are_paced_and_lose_nothing() {
    let rate = 40;
    let server = start_with(|c| c.max_publish_rate = rate);
    let addr = server.local_addr();
    let mut sub = connect(addr, "/ws?topics=paced");
    let mut publisher = connect(addr, "/publish/paced");
    // Two seconds' worth at once. What one read brings is published (the
    // publisher goes into debt), then the connection is not read until the
    // debt is repaid: 80 messages at 40/s with a burst of 40 leave it in debt
    // until one second after the start, however the reads were cut.
    let n = 2 * rate;
    let started = Instant::now();
    for i in 0..n {
        publisher
            .send(Message::binary(i.to_be_bytes().to_vec()))
            .unwrap();
    }
    for i in 0..n {
        assert_eq!(
            sub.read().unwrap(),
            Message::binary(i.to_be_bytes().to_vec())
        );
    }
    // Sent after all of those were published, so never in one of their
    // reads: it waits for the debt.
    publisher
        .send(Message::binary(n.to_be_bytes().to_vec()))
        .unwrap();
    assert_eq!(
        sub.read().unwrap(),
        Message::binary(n.to_be_bytes().to_vec())
    );
    let took = started.elapsed();
    // A lower bound (a slow machine only makes it longer); the bucket's
    // millisecond rounding costs at most a few ms.
    assert!(
        took >= Duration::from_millis(950),
        "not paced: {took:?} {:?}",
        server.stats()
    );
    assert!(server.stats().publishers_paced >= 1);
}

#[test]
fn a_frame_over_the_frame_limit_closes_1009() {
    let server = start_with(|c| c.max_frame_size = 1000);
    let mut s = raw_ws(server.local_addr(), "/echo");
    s.write_all(&client_frame(true, OpCode::Binary, &[7; 1000], MASK))
        .unwrap();
    let (_, op, p) = read_frame(&mut s);
    assert_eq!((op, p.len()), (0x2, 1000), "at the limit: echoed");
    // The header alone is enough to refuse the next one.
    s.write_all(&client_frame(true, OpCode::Binary, &[7; 1001], MASK)[..8])
        .unwrap();
    assert_eq!(read_close_code(&mut s), 1009);
    assert_eq!(
        metric(
            &metrics_from(METRICS_FROM, server.local_addr()),
            "corecast_ws_failures_total{code=\"1009\"}"
        ),
        1
    );
}

#[test]
fn too_many_fragments_close_1009() {
    let server = start_with(|c| c.max_fragments = 4);
    let mut s = raw_ws(server.local_addr(), "/echo");
    let mut msg = client_frame(false, OpCode::Text, b"a", MASK);
    for _ in 0..2 {
        msg.extend(client_frame(false, OpCode::Continuation, b"b", MASK));
    }
    msg.extend(client_frame(true, OpCode::Continuation, b"c", MASK));
    s.write_all(&msg).unwrap();
    assert_eq!(read_frame(&mut s), (true, 0x1, b"abbc".to_vec()));
    let mut msg = client_frame(false, OpCode::Text, b"a", MASK);
    for _ in 0..4 {
        msg.extend(client_frame(false, OpCode::Continuation, b"", MASK));
    }
    s.write_all(&msg).unwrap();
    assert_eq!(read_close_code(&mut s), 1009);
}

#[test]
fn a_ping_flood_is_answered_up_to_the_rate_then_closed_1008() {
    let server = start_with(|c| c.max_control_rate = 50);
    let mut s = raw_ws(server.local_addr(), "/echo");
    let mut flood = Vec::new();
    for _ in 0..500 {
        flood.extend(client_frame(true, OpCode::Ping, b"are you there", MASK));
    }
    s.write_all(&flood).unwrap();
    let mut pongs = 0;
    let code = loop {
        let (_, op, p) = read_frame(&mut s);
        match op {
            0xA => pongs += 1,
            0x8 => break u16::from_be_bytes([p[0], p[1]]),
            other => panic!("unexpected opcode {other}"),
        }
    };
    assert_eq!(code, 1008);
    // The whole flood arrives within a few ms: about one second's worth is answered.
    assert!((50..=60).contains(&pongs), "{pongs} pongs");
    assert_eq!(
        metric(
            &metrics_from(METRICS_FROM, server.local_addr()),
            "corecast_ws_failures_total{code=\"1008\"}"
        ),
        1
    );
}

#[test]
fn too_many_header_fields_get_431() {
    let server = start();
    let mut req = String::from("GET /echo HTTP/1.1\r\nHost: x\r\n");
    for i in 0..70 {
        req.push_str(&format!("X-Filler-{i}: y\r\n"));
    }
    req.push_str("\r\n");
    let answer = refused(server.local_addr(), req.as_bytes());
    assert!(
        answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large"),
        "{answer}"
    );
    assert!(answer.contains("too many header fields"), "{answer}");
}

#[test]
fn pipelined_junk_after_a_head_is_answered_not_ignored() {
    let server = start();
    let addr = server.local_addr();
    // After an upgrade the bytes are frames: junk is a protocol error (1002).
    let mut s = raw(addr);
    let mut bytes = upgrade_request("/echo").into_bytes();
    bytes.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
    s.write_all(&bytes).unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 101"));
    assert_eq!(read_close_code(&mut s), 1002);
    // After a keep-alive HTTP request they are the next request: 400.
    let mut s = raw(addr);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03\x01junk\r\n\r\n")
        .unwrap();
    let all = String::from_utf8_lossy(&read_to_eof(&mut s)).into_owned();
    assert!(all.starts_with("HTTP/1.1 200 OK"), "{all}");
    assert!(all.contains("HTTP/1.1 400 Bad Request"), "{all}");
}

/// The `tr` (timer) field of the server side of the connection whose
/// client end is `client`, from /proc/net/tcp: 2 = keepalive timer.
fn server_side_timer(server: SocketAddr, client: &TcpStream) -> u8 {
    let local = client.local_addr().unwrap();
    let hex = |a: SocketAddr| {
        let IpAddr::V4(v4) = a.ip() else {
            unreachable!()
        };
        format!("{:08X}:{:04X}", u32::from_le_bytes(v4.octets()), a.port())
    };
    let (srv, cli) = (hex(server), hex(local));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f[1] == srv && f[2] == cli {
            return f[5].split(':').next().unwrap().parse().unwrap();
        }
    }
    panic!("server side of {cli} not in /proc/net/tcp");
}

#[test]
fn accepted_sockets_have_tcp_keepalive_on_or_off_as_configured() {
    for (keepalive, timer) in [(Some(Duration::from_secs(60)), 2), (None, 0)] {
        let server = start_with(|c| c.tcp_keepalive = keepalive);
        let addr = server.local_addr();
        let s = raw_ws(addr, "/echo");
        // Let the 101's delayed ACK pass so only the keepalive timer can be armed.
        assert!(
            eventually(Duration::from_secs(2), || server_side_timer(addr, &s)
                == timer),
            "keepalive {keepalive:?}: timer {}",
            server_side_timer(addr, &s)
        );
    }
}

#[test]
fn closing_before_the_head_completes_leaves_nothing_counted() {
    let server = start_with(|c| c.max_connections_per_ip = 10);
    let addr = server.local_addr();
    for _ in 0..50 {
        let mut s = raw(addr);
        s.write_all(b"GET /echo HTTP/1.1\r\n").unwrap();
    }
    // Every slot came back: ten more from the same address are admitted.
    assert!(eventually(Duration::from_secs(3), || {
        let st = server.stats();
        st.connections_accepted == 50 && st.connections_open == 0
    }));
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut s = raw(addr);
        let head = request_upgrade(&mut s, "/echo");
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "{head} {:?}",
            server.stats()
        );
        held.push(s);
    }
}
