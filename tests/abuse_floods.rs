//! Slow consumers under a flood: subscribers that stop reading while
//! 256 MiB are published past them, under each slow-consumer policy. Every
//! test runs against the backend `CORECAST_IO` selects (`.ci/run` runs the
//! suite once per backend).
//!
//! The tests take [`exclusive`] first, so they run one at a time: each
//! measures this process's resident memory during the flood, which a test
//! running alongside would disturb.

mod common;

use common::*;
use corecast::server::config::SlowConsumerPolicy;
use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// What [`flood_past_stalled_subscribers`] observed.
struct Flood {
    server: corecast::server::ServerHandle,
    /// The subscribers that read everything (kept open: still subscribed).
    _readers: Vec<TcpStream>,
    /// Stalled subscribers still to be read, each with the number of the
    /// first message published after it joined.
    stalled: Vec<(TcpStream, u32)>,
    /// Stalled subscribers read to their close during the flood.
    closed: usize,
    /// Messages published.
    published: u32,
    /// Largest growth of this process's resident set during the flood.
    rss_growth: u64,
}

/// Subscribers that stall, one joining every 32 MiB of the flood.
const STALLED: usize = 8;

/// Publishes 256 MiB (16 KiB messages) to topic `flood` over HTTP, with two
/// subscribers that read everything (checked in order, round by round) and
/// [`STALLED`] subscribers with tiny receive windows that never read, under
/// a 64 KiB outbound bound and `policy`. With the disconnect policy, each
/// stalled subscriber is read as soon as the server has cut it off (before
/// the server's linger time drops it), with [`read_to_slow_consumer_close`].
fn flood_past_stalled_subscribers(policy: SlowConsumerPolicy) -> Flood {
    const SIZE: usize = 16 * KIB;
    const TOTAL: usize = 256 * MIB;
    const MESSAGES: u32 = (TOTAL / SIZE) as u32;
    /// Three messages (48 KiB) per round: under the bound, so the readers
    /// never lag by more than a round and are never slow themselves.
    const ROUND: u32 = 3;
    const JOIN_EVERY: u32 = MESSAGES / STALLED as u32;
    let server = start_with(|c| {
        c.max_outbound_bytes = 64 * KIB;
        c.slow_consumer = policy;
        c.ping_interval = None;
    });
    let addr = server.local_addr();
    let mut readers: Vec<TcpStream> = (0..2).map(|_| raw_ws(addr, "/ws?topics=flood")).collect();
    let mut publisher = raw(addr);
    let mut stalled = Vec::new();
    let mut joined = 0;
    let mut closed = 0;
    let rss_before = rss_bytes();
    let mut rss_peak = rss_before;
    let mut next = 0u32;
    let mut rounds = 0u32;
    while next < MESSAGES {
        if joined < STALLED && next >= joined as u32 * JOIN_EVERY {
            stalled.push((upgrade(tiny_window(addr), "/ws?topics=flood"), next));
            joined += 1;
        }
        let end = (next + ROUND).min(MESSAGES);
        let mut requests = Vec::with_capacity((SIZE + 200) * ROUND as usize);
        for i in next..end {
            requests.extend(post("flood", &numbered(i, SIZE)));
        }
        publisher.write_all(&requests).unwrap();
        for _ in next..end {
            let head = read_head(&mut publisher);
            assert!(head.starts_with("HTTP/1.1 204 "), "{head}");
        }
        for (r, reader) in readers.iter_mut().enumerate() {
            for i in next..end {
                let (fin, op, payload) = read_frame(reader);
                assert!(
                    fin && op == 0x2 && payload.len() == SIZE,
                    "reader {r}: message {i}"
                );
                assert_eq!(
                    number_of(&payload),
                    i,
                    "reader {r}: every message, in order"
                );
            }
        }
        next = end;
        rounds += 1;
        if policy == SlowConsumerPolicy::Disconnect
            && server.stats().slow_consumer_disconnects > closed as u64
        {
            // Only the latest joiner can be the one cut off: the ones before
            // were cut off long ago, and each joined 32 MiB after the last.
            let (s, first) = stalled.pop().expect("a stalled subscriber to read");
            read_to_slow_consumer_close(s, first, next);
            closed += 1;
        }
        if rounds.is_multiple_of(64) {
            rss_peak = rss_peak.max(rss_bytes());
        }
    }
    rss_peak = rss_peak.max(rss_bytes());
    Flood {
        server,
        _readers: readers,
        stalled,
        closed,
        published: MESSAGES,
        rss_growth: rss_peak.saturating_sub(rss_before),
    }
}

/// Reads a subscriber the server cut off as a slow consumer: an unbroken
/// run of the messages from `first`, far fewer than the `published` so
/// far, then the 1008 close and the end of the connection.
fn read_to_slow_consumer_close(mut s: TcpStream, first: u32, published: u32) {
    let mut expect = first;
    loop {
        let (_, op, p) = read_frame(&mut s);
        if op == 0x8 {
            assert_eq!(u16::from_be_bytes([p[0], p[1]]), 1008);
            assert_eq!(&p[2..], b"slow consumer");
            break;
        }
        assert_eq!(number_of(&p), expect, "no gap before the close");
        expect += 1;
    }
    assert_eof(&mut s);
    // What the socket buffers held (up to 4 MiB on loopback) and the 64 KiB
    // queue; the rest of the backlog was discarded, not kept.
    let got = expect - first;
    assert!(
        got < 512,
        "{got} messages of 16 KiB delivered after a cut-off at 64 KiB ({} published meanwhile)",
        published - first
    );
}

/// Resident-memory growth allowed while 256 MiB go through the server:
/// a queue per stalled subscriber is 64 KiB, so anything near the volume
/// published means a queue that is not bounded.
const RSS_GROWTH_LIMIT: u64 = 64 * MIB as u64;

#[test]
fn stalled_subscribers_are_disconnected_during_a_256_mib_flood_in_bounded_memory() {
    let _one = exclusive();
    let flood = flood_past_stalled_subscribers(SlowConsumerPolicy::Disconnect);
    let server = &flood.server;
    assert!(
        flood.rss_growth < RSS_GROWTH_LIMIT,
        "resident memory grew by {} MiB",
        flood.rss_growth / MIB as u64
    );
    // The last joiner may be cut off after the last round.
    let mut closed = flood.closed;
    for (s, first) in flood.stalled {
        assert!(eventually(Duration::from_secs(5), || server
            .stats()
            .slow_consumer_disconnects
            > closed as u64));
        read_to_slow_consumer_close(s, first, flood.published);
        closed += 1;
    }
    assert_eq!(closed, STALLED);
    let s = server.stats();
    assert_eq!(s.slow_consumer_disconnects, STALLED as u64, "{s:?}");
    assert_eq!(s.frames_dropped, 0, "{s:?}");
    assert_eq!(s.subscriptions, 2, "the stalled subscribers left the topic");
    assert_eq!(s.messages_published, u64::from(flood.published));
    let m = http_get(server.local_addr(), "/metrics");
    assert_eq!(
        metric(&m, "corecast_slow_consumer_disconnects_total"),
        STALLED as u64
    );
    assert!(metric(&m, "corecast_slow_consumer_discarded_bytes_total") > 0);
}

#[test]
fn drop_newest_keeps_stalled_subscribers_through_a_256_mib_flood_in_bounded_memory() {
    let _one = exclusive();
    let flood = flood_past_stalled_subscribers(SlowConsumerPolicy::DropNewest);
    let server = &flood.server;
    let n = u64::from(flood.published);
    assert!(
        flood.rss_growth < RSS_GROWTH_LIMIT,
        "resident memory grew by {} MiB",
        flood.rss_growth / MIB as u64
    );
    assert_eq!(flood.stalled.len(), STALLED);
    // Every frame for every subscriber is either sent or counted dropped:
    // the readers get all of them, each stalled one those after it joined.
    let stalled_share: u64 = flood
        .stalled
        .iter()
        .map(|(_, first)| n - u64::from(*first))
        .sum();
    let owed = 2 * n + stalled_share;
    assert!(eventually(Duration::from_secs(5), || {
        let s = server.stats();
        s.frames_sent + s.frames_dropped == owed
    }));
    let s = server.stats();
    assert_eq!(s.frames_sent + s.frames_dropped, owed, "{s:?}");
    assert!(
        s.frames_dropped * 10 > stalled_share * 9,
        "most of the stalled subscribers' {stalled_share} frames dropped: {s:?}"
    );
    assert_eq!(s.slow_consumer_disconnects, 0, "{s:?}");
    assert_eq!(
        s.subscriptions,
        2 + STALLED as u64,
        "everyone still subscribed"
    );
    let m = http_get(server.local_addr(), "/metrics");
    assert_eq!(
        metric(&m, "corecast_frames_dropped_total"),
        s.frames_dropped
    );
    // The stalled subscribers read what was queued for them: in order, with
    // gaps, as many frames as were counted sent beyond the readers' share.
    let expected = s.frames_sent - 2 * n;
    let mut stalled = flood.stalled;
    let mut last: Vec<Option<u32>> = vec![None; stalled.len()];
    let mut read = 0u64;
    let end = Instant::now() + Duration::from_secs(10);
    while read < expected && Instant::now() < end {
        for (k, (s, first)) in stalled.iter_mut().enumerate() {
            while frame_waiting(s, Duration::from_millis(20)) {
                let (_, op, p) = read_frame(s);
                assert_eq!(op, 0x2, "stalled {k}: data only");
                let i = number_of(&p);
                assert!(
                    i >= *first && last[k].is_none_or(|l| i > l),
                    "stalled {k}: order kept across drops"
                );
                last[k] = Some(i);
                read += 1;
            }
        }
    }
    assert_eq!(
        read, expected,
        "frames counted sent to the stalled subscribers"
    );
    for (k, (s, _)) in stalled.iter_mut().enumerate() {
        assert!(
            !frame_waiting(s, Duration::from_millis(100)),
            "stalled {k}: more than counted"
        );
    }
}

/// Does a frame start arrive on `s` within `wait`? Panics on EOF (the
/// server closed it).
fn frame_waiting(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut h = [0u8; 1];
    let waiting = match s.peek(&mut h) {
        Ok(0) => panic!("disconnected"),
        Ok(_) => true,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
        Err(e) => panic!("{e}"),
    };
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    waiting
}
