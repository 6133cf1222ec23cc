//! permessage-deflate (RFC 7692) end to end, on the backend `CORECAST_IO`
//! names: negotiation, a publication compressed once and shared
//! byte-identical by every subscriber that agreed, raw and compressing
//! subscribers side by side, compressed messages from clients (control
//! messages, publishers), and the close codes of bad compressed input.
//! Frames are read raw (RSV1 and all) and inflated with flate2.

mod common;

use common::*;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A raw upgrade with `extensions` offered (and `protocol` asked for);
/// returns the socket and the response head.
fn upgrade_with(
    addr: SocketAddr,
    path: &str,
    extensions: &str,
    protocol: &str,
) -> (TcpStream, String) {
    let mut s = raw(addr);
    let mut extra = String::new();
    if !extensions.is_empty() {
        extra.push_str(&format!("Sec-WebSocket-Extensions: {extensions}\r\n"));
    }
    if !protocol.is_empty() {
        extra.push_str(&format!("Sec-WebSocket-Protocol: {protocol}\r\n"));
    }
    let req = upgrade_request(path).replace("\r\n\r\n", &format!("\r\n{extra}\r\n"));
    s.write_all(req.as_bytes()).unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    (s, head)
}

/// The `Sec-WebSocket-Extensions` value of a response head, if any.
fn extensions_of(head: &str) -> Option<&str> {
    head.lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Extensions: "))
}

/// A server frame with its RSV1 bit: (rsv1, opcode, payload as sent).
fn read_frame_rsv(s: &mut TcpStream) -> (bool, u8, Vec<u8>) {
    let (b0, p) = read_frame_head_byte(s);
    assert_eq!(b0 & 0x30, 0, "RSV2/3 clear");
    assert_eq!(b0 & 0x80, 0x80, "unfragmented");
    (b0 & 0x40 != 0, b0 & 0x0f, p)
}

/// Inflates a message's deflate data (the 4-byte tail added back).
fn inflate(data: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(data.len() * 20 + 1024);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .expect("valid deflate data");
    assert_eq!(d.total_in() as usize, input.len(), "output room");
    out
}

/// Compresses `payload` as a client would (fresh stream, tail removed).
fn compress(payload: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(payload.len() + 64);
    c.compress_vec(payload, &mut out, FlushCompress::Sync)
        .unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// A masked client frame, RSV1 set when `compressed`.
fn client_frame(op: u8, payload: &[u8], compressed: bool) -> Vec<u8> {
    let mut f = corecast::proto::frame::client_frame(
        true,
        if op == 1 {
            corecast::proto::frame::OpCode::Text
        } else {
            corecast::proto::frame::OpCode::Binary
        },
        payload,
        [1, 2, 3, 4],
    );
    if compressed {
        f[0] |= 0x40;
    }
    f
}

/// JSON-like text of `n` bytes: compresses well, like market data.
fn quotes(n: usize) -> Vec<u8> {
    let mut v = Vec::new();
    let mut i = 0u64;
    while v.len() < n {
        v.extend_from_slice(
            format!(
                r#"{{"sym":"EURUSD","bid":1.{:04},"ask":1.{:04}}},"#,
                i % 9973,
                (i * 7) % 9973
            )
            .as_bytes(),
        );
        i += 1;
    }
    v.truncate(n);
    v
}

#[test]
fn offers_are_negotiated_and_answered() {
    let server = start();
    let addr = server.local_addr();
    let (_s, head) = upgrade_with(
        addr,
        "/echo",
        "permessage-deflate; client_max_window_bits",
        "",
    );
    assert_eq!(
        extensions_of(&head),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
        "{head}"
    );
    let (_s, head) = upgrade_with(
        addr,
        "/ws?topics=a",
        "x-unknown, permessage-deflate; mystery=1, permessage-deflate; server_max_window_bits=10",
        "",
    );
    assert_eq!(
        extensions_of(&head),
        Some(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10"
        ),
        "the first acceptable offer: {head}"
    );
    let (_s, head) = upgrade_with(addr, "/echo", "", "");
    assert_eq!(extensions_of(&head), None, "nothing offered");
    let (_s, head) = upgrade_with(
        addr,
        "/echo",
        "permessage-deflate; server_max_window_bits=4",
        "",
    );
    assert_eq!(extensions_of(&head), None, "nothing acceptable");
    drop(server);
    let server = start_with(|c| c.permessage_deflate = false);
    let (_s, head) = upgrade_with(server.local_addr(), "/echo", "permessage-deflate", "");
    assert_eq!(extensions_of(&head), None, "turned off");
}

/// One publication compressed once: every subscriber that agreed gets the
/// very same bytes, which inflate to the payload; a raw subscriber of the
/// same topic gets the payload as is; a subscriber with a 9-bit window
/// gets it uncompressed (a compressed shared frame may reach 32 KiB back).
#[test]
fn a_publication_is_compressed_once_and_shared_byte_identical() {
    let server = start_with(|c| c.workers = 2);
    let addr = server.local_addr();
    const N: usize = 1000;
    let mut deflating: Vec<TcpStream> = (0..N)
        .map(|_| upgrade_with(addr, "/ws?topics=q", "permessage-deflate", "").0)
        .collect();
    let (mut plain, _) = upgrade_with(addr, "/ws?topics=q", "", "");
    let (mut small, head) = upgrade_with(
        addr,
        "/ws?topics=q",
        "permessage-deflate; server_max_window_bits=9",
        "",
    );
    assert!(extensions_of(&head).is_some());
    let ok = eventually(Duration::from_secs(10), || {
        metric(&metrics(addr), "corecast_subscriptions") == N as u64 + 2
    });
    assert!(ok);
    let payload = quotes(1024);
    let mut p = raw(addr);
    p.write_all(&post_with("q", "text/plain", &payload, ""))
        .unwrap();
    assert!(read_head(&mut p).starts_with("HTTP/1.1 204 "));
    let first = read_frame_rsv(&mut deflating[0]);
    assert!(first.0, "compressed");
    assert_eq!(first.1, 1, "a text message");
    assert!(
        first.2.len() * 2 < payload.len(),
        "1 KiB of quotes at least halves: {}",
        first.2.len()
    );
    assert_eq!(inflate(&first.2), payload);
    for s in &mut deflating[1..] {
        assert_eq!(read_frame_rsv(s), first, "byte-identical");
    }
    // Compressed once for a thousand subscribers on two workers.
    let m = metrics(addr);
    assert_eq!(
        metric(&m, "corecast_publications_compressed_total"),
        1,
        "{m}"
    );
    let plain_frame = 4 + payload.len() as u64;
    let compressed_frame = 4 + first.2.len() as u64;
    assert_eq!(
        metric(&m, "corecast_compressed_bytes_saved_total"),
        plain_frame - compressed_frame
    );
    assert_eq!(read_frame_rsv(&mut plain), (false, 1, payload.clone()));
    assert_eq!(read_frame_rsv(&mut small), (false, 1, payload.clone()));
    // A payload too short to gain goes uncompressed to everyone.
    p.write_all(&post_with("q", "text/plain", b"tiny", ""))
        .unwrap();
    assert!(read_head(&mut p).starts_with("HTTP/1.1 204 "));
    assert_eq!(
        read_frame_rsv(&mut deflating[N - 1]),
        (false, 1, b"tiny".to_vec())
    );
}

/// The envelopes compress too: a `corecast.v1` subscriber that agreed
/// gets its snapshot marker plain and the JSON envelope compressed.
#[test]
fn enveloped_publications_compress_and_markers_do_not() {
    let server = start();
    let addr = server.local_addr();
    // A subscriber holds the topic, so its publication is kept.
    let (_holder, _) = upgrade_with(addr, "/ws?topics=e", "", "");
    let ok = eventually(Duration::from_secs(10), || {
        metric(&metrics(addr), "corecast_subscriptions") == 1
    });
    assert!(ok);
    let payload = quotes(600);
    publish(addr, "e", &payload);
    let (mut s, head) = upgrade_with(addr, "/ws?topics=e", "permessage-deflate", "corecast.v1");
    assert!(head.contains("Sec-WebSocket-Protocol: corecast.v1"));
    let (rsv, op, marker) = read_frame_rsv(&mut s);
    assert!(!rsv && op == 1, "the marker is short and plain");
    let v: serde_json::Value = serde_json::from_slice(&marker).unwrap();
    assert_eq!(v["op"], "snapshot");
    let (rsv, op, body) = read_frame_rsv(&mut s);
    assert!(rsv && op == 1);
    let v: serde_json::Value = serde_json::from_slice(&inflate(&body)).unwrap();
    assert_eq!(v["op"], "pub");
    assert_eq!(
        v["base64"].as_str().map(|b| b.len()),
        Some(800),
        "the binary payload, base64"
    );
}

/// Clients may compress too: a subscriber's compressed control message is
/// read, a WebSocket publisher's compressed message is published (and
/// reaches a plain subscriber inflated); bad compressed data closes 1002,
/// a bomb past the control-message limit closes 1009.
#[test]
fn compressed_client_messages_are_inflated_with_limits() {
    let server = start();
    let addr = server.local_addr();
    let (mut sub, _) = upgrade_with(addr, "/ws", "permessage-deflate", "");
    let subscribe = br#"{"op":"subscribe","topics":["c"],"pad":"                                                            "}"#;
    sub.write_all(&client_frame(1, &compress(subscribe), true))
        .unwrap();
    let (_, _, reply) = read_frame_rsv(&mut sub);
    let v: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(v["op"], "subscribed", "{v}");
    let (mut plain, _) = upgrade_with(addr, "/ws?topics=c", "", "");
    let ok = eventually(Duration::from_secs(10), || {
        metric(&metrics(addr), "corecast_subscriptions") == 2
    });
    assert!(ok);
    let (mut publisher, _) = upgrade_with(addr, "/publish/c", "permessage-deflate", "");
    let message = quotes(2000);
    publisher
        .write_all(&client_frame(2, &compress(&message), true))
        .unwrap();
    assert_eq!(read_frame_rsv(&mut plain), (false, 2, message.clone()));
    let (rsv, _, body) = read_frame_rsv(&mut sub);
    assert!(rsv);
    assert_eq!(inflate(&body), message);
    // Not deflate data.
    publisher
        .write_all(&client_frame(2, &[0xff; 16], true))
        .unwrap();
    assert_eq!(read_close_code(&mut publisher), 1002);
    // A 64 MiB bomb in a control message (the subscriber limit is small).
    let bomb = compress(&vec![b' '; 64 << 20]);
    assert!(bomb.len() < 100_000);
    sub.write_all(&client_frame(1, &bomb, true)).unwrap();
    assert_eq!(read_close_code(&mut sub), 1009);
}

/// What compressed publications cost is charged and then released: once
/// everything is written only the registry stays charged, whether the
/// publications compressed (the shared frame counted in the history's
/// bytes beside the raw one) or did not (nothing kept beside the raw
/// frame, so nothing stays held).
#[test]
fn compressed_frames_are_charged_and_released() {
    for compressible in [false, true] {
        let server = start_with(|c| {
            c.workers = 1;
            c.history.size = 5;
        });
        let addr = server.local_addr();
        let (mut sub, _) = upgrade_with(addr, "/ws?topics=big", "permessage-deflate", "");
        let ok = eventually(Duration::from_secs(10), || {
            metric(&metrics(addr), "corecast_subscriptions") == 1
        });
        assert!(ok);
        let mut x = 0x2545f4914f6cdd1du64;
        let mut payload = |i: u64| -> Vec<u8> {
            if compressible {
                quotes(65_536)
            } else {
                (0..65_536)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (x ^ i) as u8
                    })
                    .collect()
            }
        };
        let mut p = raw(addr);
        let mut wire = 0;
        for i in 0..20 {
            p.write_all(&post("big", &payload(i))).unwrap();
            assert!(read_head(&mut p).starts_with("HTTP/1.1 204 "));
            let (rsv, _, body) = read_frame_rsv(&mut sub);
            assert_eq!(rsv, compressible);
            wire = body.len();
        }
        let held = || metric(&metrics(addr), "corecast_buffered_bytes");
        let registry = corecast::pubsub::shard::TOPIC_ENTRY_BYTES as u64 + 2 * 3 + 80;
        assert_eq!(
            settle(Duration::from_secs(5), held, registry),
            registry,
            "compressible: {compressible}"
        );
        let frame = 65_536 + 10;
        let entry = corecast::pubsub::history::ENTRY_OVERHEAD_BYTES as u64;
        let compressed = if compressible { wire as u64 + 4 } else { 0 };
        assert_eq!(
            metric(&metrics(addr), "corecast_history_bytes"),
            5 * (frame + compressed + entry),
            "compressible: {compressible}"
        );
    }
}
