//! The fleet's tests: against a corecast server (open, hold, close,
//! refusals, shutdown), a closed port, and a one-connection server that
//! pings.

use super::*;
use corecast::proto::OpCode;
use corecast::proto::frame::{parse_header, server_frame};
use corecast::proto::handshake::accept_key;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener};

fn server() -> corecast::server::ServerHandle {
    corecast::server::start(corecast::server::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        workers: 1,
        pin: corecast::server::PinMode::Never,
        ..Default::default()
    })
    .unwrap()
}

fn fleet(dst: SocketAddr, path: &str, n: usize) -> Fleet {
    let url = crate::url::parse(&format!("ws://{dst}{path}")).unwrap();
    Fleet::new(FleetConfig {
        targets: Targets {
            dsts: vec![(dst, RequestTemplate::new(&url))],
            sources: vec![IpAddr::from([127, 0, 0, 1])],
            topics: None,
        },
        first: 0,
        connections: n,
        in_flight: 8,
        handshake_timeout: Duration::from_secs(5),
    })
    .unwrap()
}

fn soon(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

#[test]
fn opens_holds_and_closes_against_corecast() {
    let srv = server();
    let mut f = fleet(srv.local_addr(), "/echo", 40);
    let ramp = f.ramp_up(soon(10), &mut |_| {}).unwrap();
    assert_eq!(ramp.latency.len(), 40, "failures: {:?}", f.failures);
    f.hold_until(Instant::now() + Duration::from_millis(50))
        .unwrap();
    assert_eq!(f.open(), 40);
    let close = f.close_all(soon(5)).unwrap();
    assert_eq!((close.clean, close.timed_out), (40, 0), "{:?}", f.ended);
}

#[test]
fn counts_refusals_by_status() {
    let srv = server();
    let mut f = fleet(srv.local_addr(), "/nowhere", 5);
    let ramp = f.ramp_up(soon(10), &mut |_| {}).unwrap();
    assert!(ramp.latency.is_empty());
    assert_eq!(f.failures.get("handshake_status_404"), Some(&5));
}

#[test]
fn counts_connect_errors() {
    // Bind and drop a listener to find a port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut f = fleet(SocketAddr::from(([127, 0, 0, 1], port)), "/", 3);
    f.ramp_up(soon(10), &mut |_| {}).unwrap();
    assert_eq!(
        f.failures.get("connect_error:ConnectionRefused"),
        Some(&3),
        "{:?}",
        f.failures
    );
}

#[test]
fn records_server_shutdown_as_server_close() {
    let srv = server();
    let mut f = fleet(srv.local_addr(), "/echo", 3);
    f.ramp_up(soon(10), &mut |_| {}).unwrap();
    srv.shutdown();
    f.hold_until(soon(3)).unwrap();
    srv.join();
    assert_eq!(f.open(), 0);
    assert_eq!(f.ended.get("server_close_1001"), Some(&3), "{:?}", f.ended);
}

/// A one-connection server that checks the handshake, pings, and
/// returns the frame the client answered with.
fn pinging_server(listener: TcpListener) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1024];
        while !head.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut b).unwrap();
            assert!(n > 0, "client closed during the request");
            head.extend_from_slice(&b[..n]);
        }
        let text = String::from_utf8(head).unwrap();
        let key = text
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap();
        let accept = accept_key(key.as_bytes());
        let mut resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Accept: "
            .to_vec();
        resp.extend_from_slice(&accept);
        resp.extend_from_slice(b"\r\n\r\n");
        // The ping rides in the same segment as the 101.
        resp.extend_from_slice(&server_frame(OpCode::Ping, b"keepalive"));
        s.write_all(&resp).unwrap();
        let mut got = Vec::new();
        while got.len() < 2 + 4 + 9 {
            let n = s.read(&mut b).unwrap();
            assert!(n > 0, "client closed before answering the ping");
            got.extend_from_slice(&b[..n]);
        }
        got
    })
}

#[test]
fn answers_pings_with_masked_pongs() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let dst = listener.local_addr().unwrap();
    let srv = pinging_server(listener);
    let mut f = fleet(dst, "/", 1);
    let ramp = f.ramp_up(soon(10), &mut |_| {}).unwrap();
    assert_eq!(ramp.latency.len(), 1, "{:?}", f.failures);
    let deadline = soon(5);
    while f.counters.pings_answered == 0 && Instant::now() < deadline {
        f.hold_until(Instant::now() + Duration::from_millis(20))
            .unwrap();
    }
    assert_eq!(f.counters.pings_answered, 1);
    let pong = srv.join().unwrap();
    let h = parse_header(&pong).unwrap().unwrap();
    assert_eq!((h.opcode, h.fin, h.payload_len), (OpCode::Pong, true, 9));
    let key = h.mask.expect("client frames are masked");
    let payload: Vec<u8> = pong[h.header_len..h.header_len + 9]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ key[i % 4])
        .collect();
    assert_eq!(payload, b"keepalive");
}
