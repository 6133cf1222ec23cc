//! Resets everywhere: three thousand clients that vanish with a reset in the
//! middle of a handshake, a frame or a write leave nothing behind. Runs
//! against the backend `CORECAST_IO` selects (`.ci/run` runs the suite once
//! per backend).
//!
//! The test takes [`exclusive`] first, so that any test added here runs
//! apart from it: it compares this process's open descriptors before and
//! after, which a test running alongside would disturb.

mod common;

use common::*;
use corecast::proto::frame::{OpCode, client_frame};
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

#[test]
fn three_thousand_resets_mid_handshake_mid_frame_and_mid_write_leak_nothing() {
    let _one = exclusive();
    /// Big enough that the kernel's socket buffers (up to 4 MiB on
    /// loopback, about 3 MiB absorbed towards a 4 KiB window) cannot take
    /// it all: the server itself is still writing when the reset comes.
    const BIG: usize = 4 * MIB;
    const ECHOERS: usize = 40;
    const FLOODED: usize = 100;
    const FLOOD_MESSAGES: usize = BIG / (16 * KIB);
    let server = start_with(|c| {
        // Long enough that only the resets close anything, and room to
        // queue a whole 4 MiB echo or flood without backpressure.
        c.handshake_timeout = Duration::from_secs(60);
        c.ping_interval = None;
        c.max_outbound_bytes = 16 * MIB;
    });
    let addr = server.local_addr();
    let base_fds = open_fds();
    let mut victims: Vec<TcpStream> = Vec::with_capacity(3000);

    // 1100 in the request head: 0 to all-but-one bytes of it.
    let head = upgrade_request("/echo").into_bytes();
    for i in 0..1100 {
        let mut s = raw(addr);
        s.write_all(&head[..i % head.len()]).unwrap();
        victims.push(s);
    }
    // 900 inside a frame header: every proper prefix of a 64-bit and a
    // 16-bit length header, on echo, subscriber and publisher connections.
    let long = header64(0x82, 70_000);
    let short = client_frame(true, OpCode::Binary, &[1; 300], MASK)[..8].to_vec();
    let paths = ["/echo", "/ws?topics=rst", "/publish/rst"];
    for i in 0..900 {
        let mut s = raw_ws(addr, paths[i % 3]);
        let h = if i % 2 == 0 { &long } else { &short };
        s.write_all(&h[..1 + i % (h.len() - 1)]).unwrap();
        victims.push(s);
    }
    // 860 inside a payload: 1000 bytes of a declared 64 KiB, on echo and
    // publisher connections.
    let mut partial = header64(0x82, 64 * KIB as u64);
    partial.extend(masked(&[2; 1000], 0));
    for i in 0..860 {
        let mut s = raw_ws(addr, ["/echo", "/publish/rst"][i % 2]);
        s.write_all(&partial).unwrap();
        victims.push(s);
    }
    // Echo clients whose 4 MiB echo the server is writing.
    let big = client_frame(true, OpCode::Binary, &vec![3; BIG], MASK);
    for _ in 0..ECHOERS {
        let mut s = upgrade(tiny_window(addr), "/echo");
        s.write_all(&big).unwrap();
        victims.push(s);
    }
    // Subscribers a 4 MiB flood is being written to.
    for _ in 0..FLOODED {
        victims.push(upgrade(tiny_window(addr), "/ws?topics=flood"));
    }
    let mut publisher = raw(addr);
    for i in 0..FLOOD_MESSAGES {
        publisher
            .write_all(&post("flood", &numbered(i as u32, 16 * KIB)))
            .unwrap();
        assert!(read_head(&mut publisher).starts_with("HTTP/1.1 204 "));
    }
    drop(publisher);
    assert_eq!(victims.len(), 3000);
    assert!(
        eventually(Duration::from_secs(20), || {
            let s = server.stats();
            s.connections_open == 3000
                && s.messages_echoed == ECHOERS as u64
                && s.frames_sent == (FLOODED * FLOOD_MESSAGES) as u64
        }),
        "{:?}",
        server.stats()
    );
    // The server still holds part of every big echo and flood.
    let queued_per_conn = BIG as u64 / 8;
    let s = server.stats();
    let unsent = (s.handshakes_accepted * 200 + ((ECHOERS + FLOODED) * BIG) as u64)
        .saturating_sub(s.bytes_sent);
    assert!(
        unsent > (ECHOERS + FLOODED) as u64 * queued_per_conn,
        "only {unsent} bytes left to write: {s:?}"
    );
    // Reset them all, interleaving the kinds (7919 is prime: a permutation).
    let n = victims.len();
    let mut slots: Vec<Option<TcpStream>> = victims.into_iter().map(Some).collect();
    for k in 0..n {
        reset(slots[k * 7919 % n].take().expect("a permutation"));
    }
    assert!(
        eventually(Duration::from_secs(10), || server.stats().connections_open
            == 0),
        "{:?}",
        server.stats()
    );
    assert!(
        eventually(Duration::from_secs(5), || open_fds() == base_fds),
        "{} descriptors open, {base_fds} before",
        open_fds()
    );
    let s = server.stats();
    assert_eq!(s.subscriptions, 0, "{s:?}");
    assert_eq!((s.handshake_timeouts, s.protocol_errors), (0, 0), "{s:?}");
    // And the server still serves.
    assert!(honest_round_trip(addr, "after the storm") < Duration::from_secs(1));
}
