//! `--proxy-protocol`, end to end on the backend `CORECAST_IO` picks: the
//! header a balancer sends (v1 or v2) names the client, and the
//! per-address limits count that address, not the balancer's; what follows
//! the header (a request, a TLS handshake) is served as on any connection,
//! also when the header arrives in pieces; a connection without a header,
//! or with a malformed one, is answered 400 and counted by reason; a
//! header that never completes is closed at the handshake deadline; and a
//! listener that did not ask for the header does not trust one.

mod common;

use common::*;
use corecast::server::tls::{MinVersion, TlsSettings};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::Message;

/// A v1 header naming `client` (an IPv4 address) as the source.
fn v1(client: &str) -> Vec<u8> {
    format!("PROXY TCP4 {client} 203.0.113.9 40000 9001\r\n").into_bytes()
}

/// A v2 header: `PROXY` over TCP/IPv4 from `client`, with one TLV.
fn v2(client: [u8; 4]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // TCP over IPv4
    let mut body = client.to_vec();
    body.extend_from_slice(&[203, 0, 113, 9]);
    body.extend_from_slice(&40000u16.to_be_bytes());
    body.extend_from_slice(&9001u16.to_be_bytes());
    body.extend_from_slice(&[0x05, 0x00, 0x03, b'a', b'b', b'c']); // PP2_TYPE_UNIQUE_ID
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(&body);
    h
}

/// A v2 `LOCAL` header (a balancer's own health check): no address.
fn v2_local() -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    h
}

/// A connection that has sent `header`.
fn behind(addr: SocketAddr, header: &[u8]) -> TcpStream {
    let mut s = raw(addr);
    s.write_all(header).unwrap();
    s
}

/// The head of the answer to an upgrade of `path` after `header`, sent in
/// one write with the request.
fn upgrade_behind(addr: SocketAddr, header: &[u8], path: &str) -> (TcpStream, String) {
    let mut bytes = header.to_vec();
    bytes.extend_from_slice(upgrade_request(path).as_bytes());
    let mut s = behind(addr, &bytes);
    let head = read_head(&mut s);
    (s, head)
}

fn proxied_server(tweak: impl FnOnce(&mut corecast::server::Config)) -> server_handle::Handle {
    server_handle::Handle(start_with(|c| {
        c.proxy_protocol = true;
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        tweak(c);
    }))
}

mod server_handle {
    /// The server and its admin listener (the main port wants a header).
    pub struct Handle(pub corecast::server::ServerHandle);
    impl Handle {
        pub fn addr(&self) -> std::net::SocketAddr {
            self.0.local_addr()
        }
        pub fn metrics(&self) -> String {
            super::metrics(self.0.admin_addr().unwrap())
        }
    }
}

#[test]
fn per_address_limits_count_the_client_the_header_names() {
    let server = proxied_server(|c| c.max_connections_per_ip = 1);
    let addr = server.addr();
    // Both arrive from 127.0.0.1, for two different clients.
    let (_a, head) = upgrade_behind(addr, &v1("192.0.2.1"), "/ws?topics=t");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let (_b, head) = upgrade_behind(addr, &v2([192, 0, 2, 2]), "/ws?topics=t");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    // The first client again, in the other version: over its limit.
    let (mut c, head) = upgrade_behind(addr, &v2([192, 0, 2, 1]), "/ws?topics=t");
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    let body = String::from_utf8_lossy(&rest);
    assert!(
        body.contains("too many connections from your address"),
        "{body}"
    );
    let m = server.metrics();
    assert_eq!(
        metric(
            &m,
            "corecast_connections_refused_total{limit=\"max_connections_per_ip\"}"
        ),
        1
    );
    // A balancer's LOCAL health check names nobody: the process cap only.
    let (_d, head) = upgrade_behind(addr, &v2_local(), "/ws?topics=t");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
}

#[test]
fn the_bytes_after_a_header_in_pieces_are_the_clients() {
    let server = proxied_server(|_| {});
    let addr = server.addr();
    let header = v2([198, 51, 100, 7]);
    let mut s = raw(addr);
    // The header in three writes, each its own segment; the request after.
    for piece in [&header[..5], &header[5..14], &header[14..]] {
        s.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    let head = request_upgrade(&mut s, "/echo");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    s.write_all(&frame(0x81, b"after the header", Some([1, 2, 3, 4])))
        .unwrap();
    let (fin, op, payload) = read_frame(&mut s);
    assert_eq!(
        (fin, op, payload.as_slice()),
        (true, 1, &b"after the header"[..])
    );
    // v1 split inside its line.
    let line = v1("192.0.2.40");
    let mut s = raw(addr);
    s.write_all(&line[..9]).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    s.write_all(&line[9..]).unwrap();
    let head = request_upgrade(&mut s, "/echo");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert_eq!(metric(&server.metrics(), "corecast_proxy_refused_total"), 0);
}

#[test]
fn no_header_or_a_malformed_one_is_answered_400_and_counted() {
    let server = proxied_server(|_| {});
    let addr = server.addr();
    let cases: [(Vec<u8>, &str); 4] = [
        (
            upgrade_request("/ws?topics=t").into_bytes(),
            "expects a PROXY protocol header",
        ),
        (
            b"PROXY TCP4 999.0.2.1 203.0.113.9 1 2\r\n".to_vec(),
            "malformed PROXY protocol v1",
        ),
        // A v1 line with no end within its 107 bytes.
        (
            [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat(),
            "malformed PROXY protocol v1",
        ),
        // Version 3.
        (
            [&v2([192, 0, 2, 1])[..12], &[0x31, 0x11, 0, 12], &[0; 12]].concat(),
            "malformed PROXY protocol v2",
        ),
    ];
    for (bytes, reason) in &cases {
        let answer = refused(addr, bytes);
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
        assert!(answer.contains(reason), "{reason}: {answer}");
    }
    let m = server.metrics();
    assert_eq!(
        metric(&m, "corecast_proxy_refused_total{reason=\"missing\"}"),
        1
    );
    assert_eq!(
        metric(&m, "corecast_proxy_refused_total{reason=\"bad_v1\"}"),
        2
    );
    assert_eq!(
        metric(&m, "corecast_proxy_refused_total{reason=\"bad_v2\"}"),
        1
    );
}

/// A client that shuts its side with its header unfinished is let go at
/// once, with an orderly close, on both backends (outside probe: epoll,
/// which peeks the header, never saw the end of input and held the
/// connection to the request deadline, then reset it).
#[test]
fn a_header_cut_short_by_the_clients_fin_ends_the_connection_at_once() {
    let server = proxied_server(|_| {});
    for partial in [&b"PROXY TCP4 192.0.2."[..], &v2([192, 0, 2, 1])[..20]] {
        let mut s = behind(server.addr(), partial);
        s.shutdown(std::net::Shutdown::Write).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        let mut rest = Vec::new();
        // An orderly close reads as the end; a reset (or the timeout) as an error.
        let end = s.read_to_end(&mut rest);
        let waited = started.elapsed();
        assert!(end.is_ok(), "{partial:?}: {end:?} after {waited:?}");
        assert!(
            waited < Duration::from_secs(2),
            "{partial:?}: closed after {waited:?}"
        );
        assert!(rest.is_empty(), "{partial:?}: no answer to a cut header");
    }
}

#[test]
fn a_header_that_never_completes_is_closed_at_the_handshake_deadline() {
    let server = proxied_server(|c| c.handshake_timeout = Duration::from_secs(1));
    let mut s = behind(server.addr(), b"PROXY TCP4 192.0.2.");
    let started = Instant::now();
    let mut rest = Vec::new();
    // An orderly close (a FIN) reads as the end; a reset as an error
    // (outside probe: epoll, which only peeks the header, reset it).
    let end = s.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(end.is_ok(), "{end:?} after {waited:?}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(8),
        "closed after {waited:?}"
    );
    assert_eq!(
        metric(&server.metrics(), "corecast_handshake_timeouts_total"),
        1
    );
}

#[test]
fn tls_follows_the_header() {
    let cert = test_cert();
    let server = proxied_server(|c| {
        c.tls = Some(TlsSettings {
            cert: cert.cert.clone(),
            key: cert.key.clone(),
            min_version: MinVersion::Tls12,
        });
    });
    let addr = server.addr();
    let config = client_config(&cert);
    for header in [v1("192.0.2.9"), v2([192, 0, 2, 10])] {
        let tcp = behind(addr, &header);
        let conn = rustls::ClientConnection::new(
            Arc::clone(&config),
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let stream = rustls::StreamOwned::new(conn, tcp);
        let url = format!("wss://localhost:{}/echo", addr.port());
        let (mut ws, resp) = tungstenite::client::client(url, stream).expect("wss after header");
        assert_eq!(resp.status(), 101);
        ws.send(Message::text("through TLS")).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text("through TLS"));
    }
    // A TLS client that sends no header is refused (in plain text, which
    // it cannot read) and counted.
    let mut stream = tls_connect(addr, &config);
    assert!(
        stream
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .and_then(|_| stream.flush())
            .is_err()
            || stream.read(&mut [0; 64]).map_or(true, |n| n == 0)
    );
    assert!(eventually(Duration::from_secs(5), || metric(
        &server.metrics(),
        "corecast_proxy_refused_total{reason=\"missing\"}"
    ) == 1));
}

#[test]
fn a_listener_that_did_not_ask_does_not_trust_a_header() {
    let server = start();
    let addr = server.local_addr();
    let mut bytes = v1("192.0.2.1");
    bytes.extend_from_slice(upgrade_request("/ws?topics=t").as_bytes());
    // Its line is taken for a request line, and a bad one.
    let answer = refused(addr, &bytes);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert_eq!(metric(&metrics(addr), "corecast_proxy_refused_total"), 0);
}
