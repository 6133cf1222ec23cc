//! HTTP on raw sockets: the upgrade request and its answer, publish
//! requests, `GET`s, and metric values read from `/metrics`.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};

use super::{raw, raw_from, read_to_eof};

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// The `Content-Type` of a binary publication (also what the server
/// assumes without one).
pub const BINARY: &str = "application/octet-stream";

/// A valid upgrade request for `path`.
pub fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// The upgrade request for `path` with `extra` header lines (each ending
/// in CRLF).
pub fn upgrade_request_with(path: &str, extra: &str) -> String {
    upgrade_request(path).replacen("\r\n\r\n", &format!("\r\n{extra}\r\n"), 1)
}

/// Reads an HTTP response head (through the blank line) byte by byte, so no
/// frame bytes after it are consumed.
pub fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) => head.push(b[0]),
            Err(e) => panic!(
                "reading response head: {e}; got {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    String::from_utf8(head).expect("ASCII head")
}

/// Reads a response head like [`read_head`], but `None` on a timeout, EOF
/// or reset instead of a panic.
pub fn try_read_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return None,
        }
    }
    String::from_utf8(head).ok()
}

/// Sends `req` and returns the whole response (server closes after refusals).
pub fn refused(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = raw(addr);
    s.write_all(req).unwrap();
    String::from_utf8_lossy(&read_to_eof(&mut s)).into_owned()
}

/// Sends the upgrade request for `path` on `s`; returns the response head,
/// whatever it says.
pub fn request_upgrade(s: &mut TcpStream, path: &str) -> String {
    s.write_all(upgrade_request(path).as_bytes()).unwrap();
    read_head(s)
}

/// Completes the upgrade to `path` on `s`.
pub fn upgrade(mut s: TcpStream, path: &str) -> TcpStream {
    let head = request_upgrade(&mut s, path);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    s
}

/// A raw connection that has completed the handshake on `path`.
pub fn raw_ws(addr: SocketAddr, path: &str) -> TcpStream {
    upgrade(raw(addr), path)
}

/// A `POST` of `body` to `/publish/{topic}` as `content_type`, keeping the
/// connection, with `extra` header lines (each ending in CRLF).
pub fn post_with(topic: &str, content_type: &str, body: &[u8], extra: &str) -> Vec<u8> {
    let mut r = format!(
        "POST /publish/{topic} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// A `POST` of `body` to `/publish/{topic}` as binary, keeping the connection.
pub fn post(topic: &str, body: &[u8]) -> Vec<u8> {
    post_with(topic, BINARY, body, "")
}

/// Publishes `body` to `topic` as binary on a fresh connection and waits
/// for the 204.
pub fn publish(addr: SocketAddr, topic: &str, body: &[u8]) {
    let mut s = raw(addr);
    s.write_all(&post_with(topic, BINARY, body, "Connection: close\r\n"))
        .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 204 "), "{head}");
}

/// The body of `GET path` on a fresh connection (`Connection: close`).
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    get_on(raw(addr), path)
}

/// The body of `GET path` on `s` (`Connection: close`); the answer must be 200.
fn get_on(mut s: TcpStream, path: &str) -> String {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let resp = String::from_utf8(read_to_eof(&mut s)).expect("UTF-8 response");
    assert!(resp.starts_with("HTTP/1.1 200 "), "{path}: {resp:?}");
    resp.split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string())
}

/// The `/metrics` body served at `addr`.
pub fn metrics(addr: SocketAddr) -> String {
    http_get(addr, "/metrics")
}

/// The `/metrics` body served at `addr`, asked from the source address
/// `from`: from an address of its own, per-address limits never refuse it.
pub fn metrics_from(from: IpAddr, addr: SocketAddr) -> String {
    get_on(raw_from(from, addr), "/metrics")
}

/// The value of metric `name` in a `/metrics` body, summed over its label
/// sets (`corecast_connections_open{worker="0"} 3` and so on). `name` may
/// carry its labels (`corecast_ws_failures_total{code="1009"}`) to read one
/// line.
pub fn metric(body: &str, name: &str) -> u64 {
    let values: Vec<u64> = body
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let v = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            v.trim().parse().ok()
        })
        .collect();
    assert!(!values.is_empty(), "{name} not in\n{body}");
    values.iter().sum()
}
