//! The HTTP/1.1 side of a connection: finding and parsing a request head in
//! place, validating a WebSocket upgrade (RFC 6455 §4.2.1), computing
//! `Sec-WebSocket-Accept` (§4.2.2), and rendering responses.
//!
//! Nothing here allocates per header: [`parse_head`] fills a caller-owned
//! array of `httparse::Header`s that borrow the read buffer.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha1::{Digest, Sha1};
use std::fmt::Write as _;

/// Default cap on a request head, in bytes (flag `--max-handshake-size`).
pub const DEFAULT_MAX_HEAD_BYTES: usize = 8 * 1024;
/// Headers parsed per request; a head with more is answered 431.
pub const MAX_HEADERS: usize = 64;
/// The GUID of RFC 6455 §1.3, appended to the key before hashing.
pub const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// HTTP statuses corecast answers with, each with its reason phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    LengthRequired,
    PayloadTooLarge,
    ExpectationFailed,
    UpgradeRequired,
    TooManyRequests,
    HeadTooLarge,
    NotImplemented,
    ServiceUnavailable,
}

impl Status {
    /// Every status, in code order (metrics iterate it).
    pub const ALL: [Status; 14] = [
        Self::BadRequest,
        Self::Unauthorized,
        Self::Forbidden,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::RequestTimeout,
        Self::LengthRequired,
        Self::PayloadTooLarge,
        Self::ExpectationFailed,
        Self::UpgradeRequired,
        Self::TooManyRequests,
        Self::HeadTooLarge,
        Self::NotImplemented,
        Self::ServiceUnavailable,
    ];

    pub fn code(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::RequestTimeout => 408,
            Self::LengthRequired => 411,
            Self::PayloadTooLarge => 413,
            Self::ExpectationFailed => 417,
            Self::UpgradeRequired => 426,
            Self::TooManyRequests => 429,
            Self::HeadTooLarge => 431,
            Self::NotImplemented => 501,
            Self::ServiceUnavailable => 503,
        }
    }

    /// Position in [`Status::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn phrase(self) -> &'static str {
        match self {
            Self::BadRequest => "Bad Request",
            Self::Unauthorized => "Unauthorized",
            Self::Forbidden => "Forbidden",
            Self::NotFound => "Not Found",
            Self::MethodNotAllowed => "Method Not Allowed",
            Self::RequestTimeout => "Request Timeout",
            Self::LengthRequired => "Length Required",
            Self::PayloadTooLarge => "Payload Too Large",
            Self::ExpectationFailed => "Expectation Failed",
            Self::UpgradeRequired => "Upgrade Required",
            Self::TooManyRequests => "Too Many Requests",
            Self::HeadTooLarge => "Request Header Fields Too Large",
            Self::NotImplemented => "Not Implemented",
            Self::ServiceUnavailable => "Service Unavailable",
        }
    }
}

/// A refused request: the status and a short human reason for the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    pub status: Status,
    pub reason: &'static str,
    /// Methods named in `Allow` on a 405.
    pub allow: &'static str,
}

impl Reject {
    pub const fn new(status: Status, reason: &'static str) -> Self {
        Self {
            status,
            reason,
            allow: "GET",
        }
    }

    /// A 405 naming the methods the resource does take.
    pub const fn method(reason: &'static str, allow: &'static str) -> Self {
        Self {
            status: Status::MethodNotAllowed,
            reason,
            allow,
        }
    }
}

/// Finds the end of a request head across reads without rescanning from byte 0.
#[derive(Debug, Default, Clone, Copy)]
pub struct HeadScanner {
    /// Bytes already known not to contain the end of the head.
    scanned: u32,
}

impl HeadScanner {
    /// Nothing of this head has been scanned yet.
    pub fn is_fresh(&self) -> bool {
        self.scanned == 0
    }

    /// Length of the head (through the blank line) if `buf` holds all of it.
    /// `buf` must be the same bytes as on the previous call, possibly longer.
    pub fn find_end(&mut self, buf: &[u8]) -> Option<usize> {
        // Back up over a terminator that may straddle the previous end
        // ("\r\n\r" seen, "\n" arriving now).
        let start = (self.scanned as usize).saturating_sub(3);
        let mut i = start;
        while let Some(off) = memchr_newline(&buf[i..]) {
            let nl = i + off;
            // A blank line: "\n\n" or "\n\r\n".
            match buf.get(nl + 1) {
                Some(b'\n') => return Some(nl + 2),
                Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
                _ => {}
            }
            i = nl + 1;
        }
        self.scanned = buf.len() as u32;
        None
    }
}

#[inline]
fn memchr_newline(hay: &[u8]) -> Option<usize> {
    memchr::memchr(b'\n', hay)
}

/// How much of an incomplete request head [`refutes_head`] looks at.
const REFUTE_WITHIN: usize = 64;

/// Whether the start of a request head that is not complete yet already
/// cannot begin one: its first line breaks HTTP/1.x's syntax as far as it
/// goes (a TLS ClientHello on a plain port, NUL bytes, a control character
/// in the method, a version other than `HTTP/1.x`). Such input was kept
/// until the request deadline and answered `408` ten seconds later; it can
/// be answered `400` at once. Looks at the first [`REFUTE_WITHIN`] bytes
/// only, so a head arriving a byte at a time costs little per read.
/// `max_head` (`--max-handshake-size`) narrows the bytes looked at, so
/// that a head refused for its size and refuted are judged on the same
/// bytes however they were cut into reads.
pub fn refutes_head(partial: &[u8], max_head: usize) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 0];
    let mut req = httparse::Request::new(&mut headers);
    let within = partial.len().min(REFUTE_WITHIN).min(max_head);
    // The header array is empty: a first line complete and valid and a
    // header begun is "too many headers", which refutes nothing.
    matches!(
        req.parse(&partial[..within]),
        Err(e) if e != httparse::Error::TooManyHeaders
    )
}

/// A header that must appear once appeared more than once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DuplicateHeader;

/// A parsed request head, borrowing the read buffer.
#[derive(Debug)]
pub struct Request<'b, 'h> {
    pub method: &'b str,
    /// The path without the query string.
    pub path: &'b str,
    /// The query string without `?`, if any.
    pub query: Option<&'b str>,
    /// Minor HTTP version: 1 for HTTP/1.1.
    pub version: u8,
    pub headers: &'h [httparse::Header<'b>],
}

impl<'b> Request<'b, '_> {
    /// Every value of header `name` (case-insensitive), in order.
    pub fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'b [u8]> + 's {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    /// Whether the request announces a body (RFC 9112 §6.3): any
    /// `Transfer-Encoding`, or any `Content-Length` other than zero (`0`,
    /// or `00`: digits, as a body's length is read), a duplicate included.
    /// A request that takes none must be refused, not answered: on a
    /// kept-alive connection its body would be read as the next request.
    pub fn has_body(&self) -> bool {
        self.header_values("transfer-encoding").next().is_some()
            || self.header_values("content-length").any(|v| {
                let v = v.trim_ascii();
                v.is_empty() || v.iter().any(|&b| b != b'0')
            })
    }

    /// The single value of header `name`; `Err` if it appears more than once.
    pub fn header(&self, name: &str) -> Result<Option<&'b [u8]>, DuplicateHeader> {
        let mut it = self.header_values(name);
        let first = it.next();
        if it.next().is_some() {
            Err(DuplicateHeader)
        } else {
            Ok(first)
        }
    }

    /// Does any value of header `name`, read as a comma list, contain `token`
    /// (case-insensitive)?
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.header_values(name).any(|v| {
            v.split(|&b| b == b',')
                .any(|t| trim(t).eq_ignore_ascii_case(token.as_bytes()))
        })
    }
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Parses a complete request head (as found by [`HeadScanner`]).
pub fn parse_head<'b, 'h>(
    head: &'b [u8],
    headers: &'h mut [httparse::Header<'b>; MAX_HEADERS],
) -> Result<Request<'b, 'h>, Reject> {
    let mut req = httparse::Request::new(headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(Reject::new(Status::BadRequest, "incomplete request head"));
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Reject::new(Status::HeadTooLarge, "too many header fields"));
        }
        Err(_) => return Err(Reject::new(Status::BadRequest, "malformed request head")),
    }
    let (method, target, version) = (
        req.method.unwrap_or(""),
        req.path.unwrap_or(""),
        req.version.unwrap_or(0),
    );
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let Some(path) = origin_path(path) else {
        return Err(Reject::new(
            Status::BadRequest,
            "invalid authority in the request target",
        ));
    };
    Ok(Request {
        method,
        path,
        query,
        version,
        headers: req.headers,
    })
}

/// The path of a request target: an absolute-form target
/// (`http://host:port/path`, RFC 9112 §3.2.2, which a server must accept)
/// stands for its path, `/` when it has none; any other form is its own.
/// `None` when an absolute-form target's authority is not a valid,
/// non-empty host and optional port: it stands in for `Host` (RFC 9112
/// §3.2.2), which is held to the same grammar ([`check_host`]); an
/// `http` URI with an empty host is refused (RFC 9110 §4.2.1), and so is
/// userinfo (`user@host`, deprecated by RFC 9110 §4.2.4, a known source of
/// disagreement between parsers).
fn origin_path(target: &str) -> Option<&str> {
    let b = target.as_bytes();
    // The scheme is ASCII, so where it ends is a character boundary.
    let rest = [&b"http://"[..], b"https://"]
        .into_iter()
        .find_map(|scheme| {
            let n = scheme.len();
            (b.len() >= n && b[..n].eq_ignore_ascii_case(scheme)).then(|| &target[n..])
        });
    match rest {
        Some(rest) => {
            let (authority, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
            (!authority.is_empty() && super::host::is_host(authority.as_bytes())).then_some(path)
        }
        None => Some(target),
    }
}

/// What a valid upgrade request carries forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpgradeRequest<'b> {
    /// `Sec-WebSocket-Key` as sent (24 base64 characters).
    pub key: &'b [u8],
}

/// An HTTP/1.1 request (an upgrade among them) must carry exactly one
/// `Host` (RFC 9112 §3.2; RFC 6455 §4.2.1), and a valid one: else `400`.
pub fn check_host(req: &Request<'_, '_>) -> Result<(), Reject> {
    match req.header("host") {
        Err(_) => Err(Reject::new(Status::BadRequest, "duplicate Host header")),
        Ok(None) => Err(Reject::new(Status::BadRequest, "missing Host header")),
        Ok(Some(v)) if !super::host::is_host(v) => {
            Err(Reject::new(Status::BadRequest, "invalid Host header"))
        }
        Ok(Some(_)) => Ok(()),
    }
}

/// Validates the WebSocket-specific parts of a request (§4.2.1). The path has
/// already been routed by the caller.
pub fn validate_upgrade<'b>(req: &Request<'b, '_>) -> Result<UpgradeRequest<'b>, Reject> {
    use Status::*;
    if req.method != "GET" {
        return Err(Reject::new(
            MethodNotAllowed,
            "WebSocket upgrade requires GET",
        ));
    }
    if req.version != 1 {
        return Err(Reject::new(
            BadRequest,
            "WebSocket upgrade requires HTTP/1.1",
        ));
    }
    check_host(req)?;
    if req.has_body() {
        // Its bytes would be read as the first WebSocket frames.
        return Err(Reject::new(
            BadRequest,
            "a WebSocket upgrade request has no body",
        ));
    }
    if !req.has_token("upgrade", "websocket") {
        return Err(Reject::new(BadRequest, "missing Upgrade: websocket"));
    }
    if !req.has_token("connection", "upgrade") {
        return Err(Reject::new(
            BadRequest,
            "Connection header lacks the Upgrade token",
        ));
    }
    let version = req
        .header("sec-websocket-version")
        .map_err(|_| Reject::new(UpgradeRequired, "duplicate Sec-WebSocket-Version"))?;
    if version.map(trim) != Some(b"13") {
        return Err(Reject::new(
            UpgradeRequired,
            "unsupported WebSocket version; use 13",
        ));
    }
    let key = req
        .header("sec-websocket-key")
        .map_err(|_| Reject::new(BadRequest, "duplicate Sec-WebSocket-Key"))?
        .ok_or(Reject::new(BadRequest, "missing Sec-WebSocket-Key"))?;
    let key = trim(key);
    let mut raw = [0u8; 18];
    match BASE64.decode_slice(key, &mut raw) {
        Ok(16) => {}
        _ => {
            return Err(Reject::new(
                BadRequest,
                "Sec-WebSocket-Key is not 16 base64-encoded bytes",
            ));
        }
    }
    Ok(UpgradeRequest { key })
}

/// Picks the subprotocol: the first of `supported` (server preference order)
/// that the client offered. Never returns one the server does not support.
pub fn choose_subprotocol<'c, S: AsRef<str>>(
    req: &Request<'_, '_>,
    supported: &'c [S],
) -> Option<&'c str> {
    if supported.is_empty() {
        return None;
    }
    supported.iter().map(AsRef::as_ref).find(|want| {
        req.header_values("sec-websocket-protocol")
            .flat_map(|v| v.split(|&b| b == b','))
            .any(|offered| trim(offered) == want.as_bytes())
    })
}

/// `Sec-WebSocket-Accept` for a key: base64(SHA-1(key ++ GUID)).
pub fn accept_key(key: &[u8]) -> [u8; 28] {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(WS_GUID);
    let digest = sha.finalize();
    let mut out = [0u8; 28];
    let n = BASE64
        .encode_slice(digest, &mut out)
        .expect("20 bytes encode to 28");
    debug_assert_eq!(n, 28);
    out
}

/// Appends the `101 Switching Protocols` response to `out`.
pub fn write_switching_protocols(out: &mut Vec<u8>, key: &[u8], subprotocol: Option<&str>) {
    write_switching_protocols_with(out, key, subprotocol, None);
}

/// [`write_switching_protocols`] with the `Sec-WebSocket-Extensions`
/// value agreed, if any.
pub fn write_switching_protocols_with(
    out: &mut Vec<u8>,
    key: &[u8],
    subprotocol: Option<&str>,
    extensions: Option<&str>,
) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(&accept_key(key));
    if let Some(p) = subprotocol {
        out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
        out.extend_from_slice(p.as_bytes());
    }
    if let Some(e) = extensions {
        out.extend_from_slice(b"\r\nSec-WebSocket-Extensions: ");
        out.extend_from_slice(e.as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
}

/// Renders a refusal: status line, a plain-text reason, `Connection: close`,
/// and the headers the status calls for (426 names the supported version,
/// 405 the allowed method).
pub fn error_response(reject: Reject) -> Vec<u8> {
    let body_len = reject.reason.len() + 1;
    let mut s = String::with_capacity(160 + body_len);
    let _ = write!(
        s,
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        reject.status.code(),
        reject.status.phrase(),
        body_len
    );
    match reject.status {
        Status::UpgradeRequired => {
            s.push_str("Sec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n")
        }
        Status::MethodNotAllowed => {
            let _ = write!(s, "Allow: {}\r\n", reject.allow);
        }
        Status::Unauthorized => s.push_str("WWW-Authenticate: Bearer\r\n"),
        Status::TooManyRequests | Status::ServiceUnavailable => s.push_str("Retry-After: 1\r\n"),
        _ => {}
    }
    let _ = write!(s, "\r\n{}\n", reject.reason);
    s.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Input that cannot begin a request is refuted as soon as its first
    /// bytes show it; any prefix of a real request, however cut, is not.
    #[test]
    fn heads_that_cannot_be_http_are_refuted_early() {
        let real = b"GET /ws?topics=a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n";
        for n in 0..real.len() {
            assert!(!refutes_head(&real[..n], 8192), "{:?}", &real[..n]);
        }
        assert!(
            !refutes_head(b"\r\nGET / HTTP/1.0\r\n", 8192),
            "a leading blank line"
        );
        let long = format!("GET /{} HTTP/1.1\r\n", "x".repeat(200));
        assert!(!refutes_head(long.as_bytes(), 8192), "a long target");
        let tls_hello = [
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ];
        for junk in [
            &tls_hello[..],
            &[0u8; 64][..],
            b"G\x01T / HTTP/1.1",
            b"GET / HTTP/2.0\r\n",
            b"GET / FTP/1.1\r\n",
            b"GET /\x00 HTTP/1.1\r\n",
        ] {
            assert!(refutes_head(junk, 8192), "{junk:?}");
        }
    }

    const GOOD: &str = "GET /echo?x=1 HTTP/1.1\r\nHost: localhost\r\nUpgrade: WebSocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat, superchat\r\n\r\n";

    fn with<R>(raw: &str, f: impl FnOnce(Result<Request<'_, '_>, Reject>) -> R) -> R {
        let mut h = [httparse::EMPTY_HEADER; MAX_HEADERS];
        f(parse_head(raw.as_bytes(), &mut h))
    }

    fn upgrade(raw: &str) -> Result<(), Reject> {
        with(raw, |r| validate_upgrade(&r?).map(|_| ()))
    }

    #[test]
    fn rfc_accept_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            &accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn parses_and_validates_a_good_request() {
        with(GOOD, |r| {
            let r = r.unwrap();
            assert_eq!(
                (r.method, r.path, r.query, r.version),
                ("GET", "/echo", Some("x=1"), 1)
            );
            let u = validate_upgrade(&r).unwrap();
            assert_eq!(u.key, b"dGhlIHNhbXBsZSBub25jZQ==");
            assert_eq!(
                choose_subprotocol(&r, &["superchat", "chat"]),
                Some("superchat")
            );
            assert_eq!(choose_subprotocol(&r, &["mqtt"]), None);
            assert_eq!(choose_subprotocol::<&str>(&r, &[]), None);
        });
    }

    #[test]
    fn switching_protocols_response() {
        let mut out = Vec::new();
        write_switching_protocols(&mut out, b"dGhlIHNhbXBsZSBub25jZQ==", Some("chat"));
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(s.contains("\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(s.contains("\r\nSec-WebSocket-Protocol: chat\r\n"));
        assert!(s.ends_with("\r\n\r\n"));
    }

    #[test]
    fn each_violation_gets_its_status() {
        use Status::*;
        let cases: &[(&str, &str, Status)] = &[
            ("GET ", "POST ", MethodNotAllowed),
            ("HTTP/1.1\r\nHost", "HTTP/1.0\r\nHost", BadRequest),
            ("Host: localhost\r\n", "", BadRequest),
            ("Host: localhost\r\n", "Host: a\r\nHost: b\r\n", BadRequest),
            ("Host: localhost", "Host: [::1]x", BadRequest),
            ("Upgrade: WebSocket", "Upgrade: h2c", BadRequest),
            ("keep-alive, Upgrade", "keep-alive", BadRequest),
            ("Version: 13", "Version: 8", UpgradeRequired),
            ("Sec-WebSocket-Version: 13\r\n", "", UpgradeRequired),
            ("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZQ==", BadRequest),
            (
                "dGhlIHNhbXBsZSBub25jZQ==",
                "!!!!!!!!!!!!!!!!!!!!!!!!",
                BadRequest,
            ),
            (
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
                "",
                BadRequest,
            ),
            (
                "Host: localhost\r\n",
                "Host: localhost\r\nContent-Length: 5\r\n",
                BadRequest,
            ),
            (
                "Host: localhost\r\n",
                "Host: localhost\r\nTransfer-Encoding: chunked\r\n",
                BadRequest,
            ),
        ];
        for (from, to, status) in cases {
            let raw = GOOD.replacen(from, to, 1);
            assert_ne!(raw, GOOD, "pattern {from:?} not found");
            assert_eq!(
                upgrade(&raw).unwrap_err().status,
                *status,
                "{from:?} -> {to:?}"
            );
        }
    }

    #[test]
    fn an_absolute_form_target_is_its_path() {
        for (target, path, query) in [
            ("http://example.com:9001/echo?x=1", "/echo", Some("x=1")),
            ("HTTPS://example.com/publish/t", "/publish/t", None),
            ("http://example.com", "/", None),
            ("http://example.com?a", "/", Some("a")),
            ("/ws?topics=a", "/ws", Some("topics=a")),
            ("*", "*", None),
            ("http://[::1]:80/ws", "/ws", None),
        ] {
            let raw = GOOD.replacen("/echo?x=1", target, 1);
            with(&raw, |r| {
                let r = r.unwrap();
                assert_eq!((r.path, r.query), (path, query), "{target}");
            });
        }
        // Its authority stands in for Host, and is held to Host's grammar
        // (these were taken, and are 400 as a Host): an empty host too.
        for target in [
            "http:///healthz",
            "http://:80/x",
            "http://a:99999/x",
            "http://[::1/x",
            "http://a:b:c/x",
            "http://a:80:90/x",
            "http://%zz/x",
            "http://a\\b/x",
            "http://[v1.x]/x",
            "http://user@a/x",
            "http://?x",
        ] {
            let raw = GOOD.replacen("/echo?x=1", target, 1);
            with(&raw, |r| {
                let e = r.expect_err(target);
                assert_eq!(e.status, Status::BadRequest, "{target}");
                assert_eq!(e.reason, "invalid authority in the request target");
            });
        }
        // An empty body is no body, however its length is written (a
        // POST's `0002` is read as 2, so `00` is 0); an empty length is
        // not a length.
        for (length, ok) in [
            ("0", true),
            ("00", true),
            (" 000 ", true),
            ("01", false),
            ("", false),
        ] {
            let raw = GOOD.replacen(
                "Host: localhost\r\n",
                &format!("Host: localhost\r\nContent-Length: {length}\r\n"),
                1,
            );
            assert_eq!(upgrade(&raw).is_ok(), ok, "{length:?}");
        }
    }

    #[test]
    fn tokens_are_case_insensitive_lists() {
        let raw = GOOD
            .replace("Upgrade: WebSocket", "upgrade: foo, websocket")
            .replace(
                "Connection: keep-alive, Upgrade",
                "connection: keep-alive\r\nConnection: UPGRADE",
            );
        assert_eq!(upgrade(&raw), Ok(()));
    }

    #[test]
    fn too_many_headers_is_431() {
        let mut raw = String::from("GET / HTTP/1.1\r\n");
        for i in 0..MAX_HEADERS + 1 {
            raw.push_str(&format!("X-{i}: v\r\n"));
        }
        raw.push_str("\r\n");
        assert_eq!(with(&raw, |r| r.unwrap_err().status), Status::HeadTooLarge);
    }

    #[test]
    fn garbage_is_400() {
        assert_eq!(
            with("\x00\x01\x02 \r\n\r\n", |r| r.unwrap_err().status),
            Status::BadRequest
        );
    }

    #[test]
    fn scanner_finds_end_across_reads_without_rescanning() {
        let bytes = GOOD.as_bytes();
        for split in 0..bytes.len() {
            let mut sc = HeadScanner::default();
            let first = sc.find_end(&bytes[..split]);
            let end = first.or_else(|| sc.find_end(bytes));
            assert_eq!(end, Some(bytes.len()), "split at {split}");
        }
        // Bare LF line endings are accepted too.
        assert_eq!(
            HeadScanner::default().find_end(b"GET / HTTP/1.1\nHost: a\n\nrest"),
            Some(24)
        );
    }

    #[test]
    fn error_responses_are_well_formed() {
        let r = String::from_utf8(error_response(Reject::new(
            Status::UpgradeRequired,
            "use 13",
        )))
        .unwrap();
        assert!(r.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(r.contains("Sec-WebSocket-Version: 13\r\n"));
        assert!(r.contains("Content-Length: 7\r\n"));
        assert!(r.ends_with("\r\n\r\nuse 13\n"));
        let r =
            String::from_utf8(error_response(Reject::new(Status::HeadTooLarge, "big"))).unwrap();
        assert!(r.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
    }
}
