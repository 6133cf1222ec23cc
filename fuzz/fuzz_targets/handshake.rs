//! Arbitrary bytes as a request head: `HeadScanner` across two reads, then
//! `parse_head`, `validate_upgrade`, `choose_subprotocol`, and the response
//! (`101` or a refusal).
//!
//! Input: one byte choosing where the first read ends, then the bytes.
//! Invariants:
//! - the scanner finds the same end whether the head arrives in one read or
//!   two, and agrees with a bytewise reference (first `\n\n` or `\n\r\n`);
//! - once a head is found, a response is always produced: a `101` whose
//!   accept key is 28 base64 bytes and whose subprotocol is one the server
//!   supports and the client offered, or a well-formed refusal whose status
//!   and `Content-Length` match; with no head found, more input is asked for.
#![no_main]

use corecast::proto::handshake::{
    HeadScanner, MAX_HEADERS, Reject, choose_subprotocol, error_response, parse_head,
    validate_upgrade, write_switching_protocols,
};
use corecast_fuzz::on_worker_stack;
use libfuzzer_sys::fuzz_target;

/// What the server is configured to speak, in preference order.
const SUPPORTED: [&str; 2] = ["chat", "superchat"];

/// The reference: the end of the first blank line, bytewise.
fn reference_end(buf: &[u8]) -> Option<usize> {
    (0..buf.len()).find_map(|i| {
        if buf[i] != b'\n' {
            None
        } else if buf.get(i + 1) == Some(&b'\n') {
            Some(i + 2)
        } else if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
            Some(i + 3)
        } else {
            None
        }
    })
}

/// A refusal must render as a complete response with its status and an exact body length.
fn check_refusal(reject: Reject) {
    let response = error_response(reject);
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(&response) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("refusal does not parse ({other:?}): {response:?}"),
    };
    assert_eq!(resp.code, Some(reject.status.code()));
    let len: usize = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
        .expect("refusal has a Content-Length");
    assert_eq!(
        response.len() - n,
        len,
        "body length differs from Content-Length"
    );
}

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    on_worker_stack(move || check(&data));
});

/// Checks one input (on a worker-sized stack).
fn check(data: &[u8]) {
    let Some((&cut, buf)) = data.split_first() else {
        return;
    };
    let cut = cut as usize % (buf.len() + 1);

    let mut scanner = HeadScanner::default();
    let end = scanner
        .find_end(&buf[..cut])
        .or_else(|| scanner.find_end(buf));
    assert_eq!(end, HeadScanner::default().find_end(buf), "one read vs two");
    assert_eq!(end, reference_end(buf), "scanner vs reference");

    let Some(end) = end else {
        // More input requested.
        return;
    };
    let head = &buf[..end];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let req = match parse_head(head, &mut headers) {
        Ok(req) => req,
        Err(reject) => return check_refusal(reject),
    };
    assert!(!req.path.contains('?'), "query left in the path");
    let upgrade = match validate_upgrade(&req) {
        Ok(u) => u,
        Err(reject) => return check_refusal(reject),
    };
    assert_eq!(req.method, "GET");
    assert_eq!(req.version, 1);
    assert_eq!(upgrade.key.len(), 24, "key is not 24 base64 bytes");

    let proto = choose_subprotocol(&req, &SUPPORTED);
    if let Some(p) = proto {
        assert!(SUPPORTED.contains(&p), "chose unsupported {p:?}");
        let offered = req
            .header_values("sec-websocket-protocol")
            .flat_map(|v| v.split(|&b| b == b','))
            .any(|o| o.trim_ascii() == p.as_bytes());
        assert!(offered, "chose {p:?}, which the client did not offer");
    }
    let mut response = Vec::new();
    write_switching_protocols(&mut response, upgrade.key, proto);
    let mut headers = [httparse::EMPTY_HEADER; 8];
    let mut resp = httparse::Response::new(&mut headers);
    assert!(
        matches!(resp.parse(&response), Ok(httparse::Status::Complete(n)) if n == response.len()),
        "101 is not one complete head"
    );
    assert_eq!(resp.code, Some(101));
}
