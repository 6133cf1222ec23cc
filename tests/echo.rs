//! The /echo endpoint driven by an independent client (tungstenite) and by
//! raw sockets for byte-exact protocol probes.

mod common;

use common::*;
use corecast::proto::frame::{OpCode, client_frame};
use std::io::Write;
use std::time::{Duration, Instant};
use tungstenite::Message;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{Data, OpCode as TOp};

#[test]
fn echoes_text_and_binary() {
    let server = start();
    let mut ws = connect(server.local_addr(), "/echo");
    ws.send(Message::text("héllo wörld")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("héllo wörld"));
    ws.send(Message::binary(vec![0u8, 1, 2, 255])).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(vec![0u8, 1, 2, 255]));
    ws.send(Message::binary(Vec::new())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(Vec::new()));
}

#[test]
fn ping_gets_pong_with_same_payload() {
    let server = start();
    let mut ws = connect(server.local_addr(), "/echo");
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .unwrap();
    assert_eq!(
        ws.read().unwrap(),
        Message::Pong(b"are you there".to_vec().into())
    );
}

#[test]
fn reassembles_fragmented_messages() {
    let server = start();
    let mut ws = connect(server.local_addr(), "/echo");
    let parts: [&[u8]; 3] = [b"frag", "mé".as_bytes(), b"nted"];
    for (i, p) in parts.iter().enumerate() {
        let op = if i == 0 {
            TOp::Data(Data::Text)
        } else {
            TOp::Data(Data::Continue)
        };
        let frame = Frame::message(p.to_vec(), op, i == parts.len() - 1);
        ws.write(Message::Frame(frame)).unwrap();
        // A ping between fragments is answered at once (control frames interleave).
        if i == 1 {
            ws.write(Message::Ping(b"mid".to_vec().into())).unwrap();
        }
    }
    ws.flush().unwrap();
    assert_eq!(ws.read().unwrap(), Message::Pong(b"mid".to_vec().into()));
    assert_eq!(ws.read().unwrap(), Message::text("fragménted"));
}

#[test]
fn echoes_a_16_mib_message() {
    let server = start();
    let mut ws = connect(server.local_addr(), "/echo");
    let big: Vec<u8> = (0..16 * 1024 * 1024)
        .map(|i: u32| (i * 7 + (i >> 13)) as u8)
        .collect();
    ws.send(Message::binary(big.clone())).unwrap();
    match ws.read().unwrap() {
        Message::Binary(got) => assert!(got[..] == big[..], "payload differs"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn over_the_message_limit_closes_1009() {
    let server = start_with(|c| c.max_message_size = 1000);
    let mut s = raw_ws(server.local_addr(), "/echo");
    s.write_all(&client_frame(true, OpCode::Binary, &[0; 1001], MASK))
        .unwrap();
    assert_eq!(read_close_code(&mut s), 1009);
}

#[test]
fn many_concurrent_connections_across_workers() {
    let server = start();
    let addr = server.local_addr();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let mut conns: Vec<_> = (0..100).map(|_| connect(addr, "/echo")).collect();
                for round in 0..3 {
                    for (i, ws) in conns.iter_mut().enumerate() {
                        ws.send(Message::text(format!("{t}-{i}-{round}"))).unwrap();
                    }
                    for (i, ws) in conns.iter_mut().enumerate() {
                        assert_eq!(
                            ws.read().unwrap(),
                            Message::text(format!("{t}-{i}-{round}"))
                        );
                    }
                }
                conns.len()
            })
        })
        .collect();
    let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, 400);
    let stats = server.stats();
    assert_eq!(stats.handshakes_accepted, 400);
    assert_eq!(stats.messages_echoed, 1200);
}

#[test]
fn close_handshake_echoes_code_and_closes_tcp() {
    let server = start();
    let mut s = raw_ws(server.local_addr(), "/echo");
    s.write_all(&client_frame(
        true,
        OpCode::Close,
        &[0x0f, 0xa0, b'b', b'y', b'e'],
        MASK,
    ))
    .unwrap();
    assert_eq!(read_close_code(&mut s), 4000);
    // Then the server closes the TCP connection.
    assert!(read_to_eof(&mut s).is_empty());
    assert!(eventually(Duration::from_secs(5), || server
        .stats()
        .connections_open
        == 0));
}

#[test]
fn tungstenite_close_is_clean() {
    let server = start();
    let mut ws = connect(server.local_addr(), "/echo");
    ws.close(None).unwrap();
    loop {
        match ws.read() {
            Ok(Message::Close(_)) => continue,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("close was not clean: {e}"),
        }
    }
}

#[test]
fn protocol_violations_get_their_close_codes() {
    let server = start();
    let addr = server.local_addr();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked frame", vec![0x81, 0x02, b'h', b'i'], 1002),
        (
            "reserved bit",
            {
                let mut f = client_frame(true, OpCode::Text, b"x", MASK);
                f[0] |= 0x40;
                f
            },
            1002,
        ),
        ("reserved opcode", vec![0x83, 0x80, 1, 2, 3, 4], 1002),
        (
            "long ping",
            client_frame(true, OpCode::Ping, &[0; 126], MASK),
            1002,
        ),
        (
            "orphan continuation",
            client_frame(true, OpCode::Continuation, b"x", MASK),
            1002,
        ),
        (
            "close code 1005",
            client_frame(true, OpCode::Close, &1005u16.to_be_bytes(), MASK),
            1002,
        ),
        (
            "bad utf-8",
            client_frame(true, OpCode::Text, &[b'a', 0xff], MASK),
            1007,
        ),
        (
            "2^63 length",
            {
                let mut f = vec![0x82, 0xff];
                f.extend_from_slice(&(1u64 << 63).to_be_bytes());
                f.extend_from_slice(&MASK);
                f
            },
            1002,
        ),
    ];
    for (name, bytes, code) in cases {
        let mut s = raw_ws(addr, "/echo");
        s.write_all(&bytes).unwrap();
        assert_eq!(read_close_code(&mut s), code, "{name}");
        assert!(
            read_to_eof(&mut s).is_empty(),
            "{name}: TCP closed after the close frame"
        );
    }
    assert_eq!(server.stats().protocol_errors, 8);
}

#[test]
fn invalid_utf8_fails_before_the_frame_completes() {
    let server = start();
    let mut s = raw_ws(server.local_addr(), "/echo");
    let mut payload = vec![b'a'; 1 << 20];
    payload[1] = 0xc0;
    let frame = client_frame(true, OpCode::Text, &payload, MASK);
    // Only the first 1 KiB of a 1 MiB frame: the server must not wait for the rest.
    s.write_all(&frame[..1024]).unwrap();
    assert_eq!(read_close_code(&mut s), 1007);
}

#[test]
fn handshake_split_byte_by_byte_with_pipelined_frame() {
    let server = start();
    let mut s = raw(server.local_addr());
    let mut bytes = upgrade_request("/echo").into_bytes();
    // A frame pipelined right behind the head, split along with it.
    bytes.extend(client_frame(true, OpCode::Text, b"pipelined", MASK));
    for chunk in bytes.chunks(1) {
        s.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_micros(200));
    }
    let head = read_head(&mut s);
    assert!(
        head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{head}"
    );
    assert!(
        head.contains(&format!("Sec-WebSocket-Accept: {ACCEPT}\r\n")),
        "{head}"
    );
    assert_eq!(read_frame(&mut s), (true, 0x1, b"pipelined".to_vec()));
}

#[test]
fn handshake_and_frames_in_one_write() {
    let server = start();
    let mut s = raw(server.local_addr());
    let mut bytes = upgrade_request("/echo").into_bytes();
    for i in 0..10u8 {
        bytes.extend(client_frame(true, OpCode::Binary, &[i; 3], MASK));
    }
    s.write_all(&bytes).unwrap();
    read_head(&mut s);
    for i in 0..10u8 {
        assert_eq!(read_frame(&mut s), (true, 0x2, vec![i; 3]));
    }
}

#[test]
fn refusals_have_status_and_reason() {
    let server = start();
    let addr = server.local_addr();
    let good = upgrade_request("/echo");
    let cases: Vec<(String, &str, &str)> = vec![
        (
            upgrade_request("/nope"),
            "404 Not Found",
            "no such endpoint",
        ),
        (
            good.replace("GET", "POST"),
            "405 Method Not Allowed",
            "requires GET",
        ),
        (
            good.replace("Version: 13", "Version: 8"),
            "426 Upgrade Required",
            "version",
        ),
        (
            good.replace(KEY, "c2hvcnQ="),
            "400 Bad Request",
            "Sec-WebSocket-Key",
        ),
        (
            good.replace("Upgrade: websocket\r\n", ""),
            "400 Bad Request",
            "Upgrade",
        ),
        (
            good.replace("Connection: Upgrade", "Connection: keep-alive"),
            "400 Bad Request",
            "Connection",
        ),
        (
            good.replace("Host: localhost\r\n", ""),
            "400 Bad Request",
            "Host",
        ),
        (
            good.replace("HTTP/1.1", "HTTP/1.0"),
            "400 Bad Request",
            "HTTP/1.1",
        ),
        (
            "\x16\x03\x01\x02\x00\x01\x00\r\n\r\n".to_string(),
            "400 Bad Request",
            "malformed",
        ),
        (
            good.replace(
                "\r\n\r\n",
                &format!("\r\nX-Big: {}\r\n\r\n", "a".repeat(9000)),
            ),
            "431 Request Header Fields Too Large",
            "too large",
        ),
        (
            "OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n".to_string(),
            "501 Not Implemented",
            "method not implemented",
        ),
        (
            "CONNECT localhost:1 HTTP/1.1\r\nHost: localhost:1\r\n\r\n".to_string(),
            "501 Not Implemented",
            "method not implemented",
        ),
        (
            "HEAD /nope HTTP/1.1\r\nHost: localhost\r\n\r\n".to_string(),
            "404 Not Found",
            "no such endpoint",
        ),
    ];
    for (req, status, reason) in &cases {
        let resp = refused(addr, req.as_bytes());
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {status}\r\n")),
            "{status}: got {resp:?}"
        );
        assert!(resp.contains("Connection: close\r\n"), "{resp}");
        let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
        assert!(
            body.contains(reason),
            "{status}: body {body:?} lacks {reason:?}"
        );
    }
    let resp = refused(addr, good.replace("Version: 13", "Version: 8").as_bytes());
    assert!(
        resp.contains("Sec-WebSocket-Version: 13\r\n"),
        "426 names the version: {resp}"
    );
    assert_eq!(server.stats().handshakes_rejected, cases.len() as u64 + 1);
}

#[test]
fn oversized_head_without_terminator_is_431() {
    let server = start();
    let mut s = raw(server.local_addr());
    // No blank line ever comes: the server answers once the limit is passed.
    let junk = format!("GET /echo HTTP/1.1\r\nX: {}", "a".repeat(10_000));
    let _ = s.write_all(junk.as_bytes());
    let resp = String::from_utf8_lossy(&read_to_eof(&mut s)).into_owned();
    assert!(resp.starts_with("HTTP/1.1 431 "), "{resp}");
}

#[test]
fn subprotocol_is_negotiated_never_invented() {
    let server = start_with(|c| c.subprotocols = vec!["v2.corecast".into(), "v1.corecast".into()]);
    let addr = server.local_addr();
    let offer = |protos: &str| {
        let req = upgrade_request("/echo").replace(
            "\r\n\r\n",
            &format!("\r\nSec-WebSocket-Protocol: {protos}\r\n\r\n"),
        );
        let mut s = raw(addr);
        s.write_all(req.as_bytes()).unwrap();
        read_head(&mut s)
    };
    assert!(offer("v1.corecast, v2.corecast").contains("Sec-WebSocket-Protocol: v2.corecast\r\n"));
    assert!(offer("v1.corecast").contains("Sec-WebSocket-Protocol: v1.corecast\r\n"));
    let none = offer("mqtt");
    assert!(none.starts_with("HTTP/1.1 101 "));
    assert!(!none.contains("Sec-WebSocket-Protocol"), "{none}");
    // And through tungstenite, which checks the answer itself.
    let mut req =
        tungstenite::client::IntoClientRequest::into_client_request(ws_url(addr, "/echo")).unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "v1.corecast".parse().unwrap());
    let (_ws, resp) = tungstenite::connect(req).unwrap();
    assert_eq!(resp.headers()["Sec-WebSocket-Protocol"], "v1.corecast");
}

#[test]
fn shutdown_sends_1001_and_finishes_within_drain_time() {
    let server = start_with(|c| c.drain_timeout = Duration::from_secs(3));
    let addr = server.local_addr();
    let mut clients: Vec<_> = (0..20).map(|_| connect(addr, "/echo")).collect();
    // One client that never answers the close: the drain deadline bounds the wait.
    let mut silent = raw_ws(addr, "/echo");
    assert!(eventually(Duration::from_secs(5), || server
        .stats()
        .handshakes_accepted
        == 21));
    let started = Instant::now();
    server.shutdown();
    for ws in &mut clients {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1001),
            other => panic!("expected close 1001, got {other:?}"),
        }
        // tungstenite answers the close; the server then closes TCP.
        loop {
            match ws.read() {
                Err(tungstenite::Error::ConnectionClosed) => break,
                Ok(_) => {}
                Err(e) => panic!("unclean close: {e}"),
            }
        }
    }
    assert_eq!(read_close_code(&mut silent), 1001);
    server.join();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    // The listener is gone.
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[test]
fn a_client_that_never_reads_is_throttled_and_others_are_served() {
    let server = start_with(|c| c.max_outbound_bytes = 64 * 1024);
    let addr = server.local_addr();
    let mut flood = raw_ws(addr, "/echo");
    flood
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let frame = client_frame(true, OpCode::Binary, &[7u8; 16 * 1024], MASK);
    // Write echo requests without ever reading the echoes. Once the socket
    // buffers and the server's bounded queue are full, the server stops
    // reading and our writes block.
    let limit = 512 * 1024 * 1024;
    let mut written = 0usize;
    let blocked = loop {
        match flood.write_all(&frame) {
            Ok(()) => written += frame.len(),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break true;
            }
            Err(e) => panic!("flood write failed: {e}"),
        }
        if written > limit {
            break false;
        }
    };
    assert!(
        blocked,
        "server kept reading {written} bytes from a client that never reads"
    );
    // Meanwhile an honest client is served normally.
    let mut ws = connect(addr, "/echo");
    for i in 0..50 {
        ws.send(Message::text(format!("m{i}"))).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text(format!("m{i}")));
    }
    // And the flooder's echoes are all still there, in order, once it reads.
    flood.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    for _ in 0..written / frame.len() {
        let (fin, op, payload) = read_frame(&mut flood);
        assert!(fin && op == 0x2 && payload.len() == 16 * 1024);
    }
}
