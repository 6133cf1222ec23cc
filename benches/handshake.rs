//! The server side of the opening handshake on a Chrome-style upgrade request.
//!
//! - `handshake/full`: what `src/server/session.rs` does once a head has
//!   arrived: `HeadScanner::find_end`, `parse_head` into a fresh stack array of
//!   64 headers, `validate_upgrade`, `choose_subprotocol` (one supported
//!   protocol, none offered: the whole header list is scanned) and
//!   `write_switching_protocols` into a fresh `Vec::with_capacity(192)`.
//! - `handshake/find_end`, `handshake/parse_head`, `handshake/validate_upgrade`:
//!   the first steps alone, to show where the time goes.
//! - `handshake/accept_key`: SHA-1 + base64 of the key alone.
//!
//! Throughput in handshakes (or calls). Run: `cargo bench --bench handshake`.

use corecast::proto::handshake::{
    HeadScanner, MAX_HEADERS, accept_key, choose_subprotocol, parse_head, validate_upgrade,
    write_switching_protocols,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;

/// The headers Chrome 124 sends for `new WebSocket("ws://example.com:8080/chat")`
/// from a page on https://example.com, in Chrome's order.
const CHROME_REQUEST: &[u8] = b"GET /chat HTTP/1.1\r\n\
Host: example.com:8080\r\n\
Connection: Upgrade\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36\r\n\
Upgrade: websocket\r\n\
Origin: https://example.com\r\n\
Sec-WebSocket-Version: 13\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
\r\n";

/// One full server-side handshake; returns the `101` response.
fn handshake(raw: &[u8], supported: &[String]) -> Vec<u8> {
    let end = HeadScanner::default().find_end(raw).expect("complete head");
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let req = parse_head(&raw[..end], &mut headers).expect("parses");
    let upgrade = validate_upgrade(&req).expect("valid upgrade");
    let subprotocol = choose_subprotocol(&req, supported);
    let mut response = Vec::with_capacity(192);
    write_switching_protocols(&mut response, upgrade.key, subprotocol);
    response
}

fn bench_handshake(c: &mut Criterion) {
    let supported = vec!["corecast.v1".to_string()];
    let response = handshake(CHROME_REQUEST, &supported);
    assert!(response.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
    assert!(
        response
            .windows(28)
            .any(|w| w == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    eprintln!(
        "request head: {} bytes, response: {} bytes",
        CHROME_REQUEST.len(),
        response.len()
    );

    let mut group = c.benchmark_group("handshake");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .throughput(Throughput::Elements(1));

    group.bench_function("full", |b| {
        b.iter(|| black_box(handshake(black_box(CHROME_REQUEST), black_box(&supported))))
    });
    group.bench_function("find_end", |b| {
        b.iter(|| black_box(HeadScanner::default().find_end(black_box(CHROME_REQUEST))))
    });
    group.bench_function("parse_head", |b| {
        b.iter(|| {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let req = parse_head(black_box(CHROME_REQUEST), &mut headers);
            black_box(req.map(|r| r.headers.len()).ok())
        })
    });
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let req = parse_head(CHROME_REQUEST, &mut headers).expect("parses");
    group.bench_function("validate_upgrade", |b| {
        b.iter(|| black_box(validate_upgrade(black_box(&req)).map(|u| u.key.len())))
    });
    group.bench_function("accept_key", |b| {
        b.iter(|| black_box(accept_key(black_box(b"dGhlIHNhbXBsZSBub25jZQ=="))))
    });
    group.finish();
}

criterion_group!(benches, bench_handshake);
criterion_main!(benches);
