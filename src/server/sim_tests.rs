//! [`Core`] driven by a simulated backend with virtual time, quinn-style:
//! no sockets, no threads, no sleeps. Each peer is a byte pipe whose
//! receive window the test sets (0: a peer that stops reading); time moves
//! only when a test says so. What the real backends do per loop turn
//! (read, end of turn: re-reads, delivery, one flush per dirty connection,
//! unthrottle, sweep, deadlines) is done here in the same order.

use super::Shared;
use super::backend::{self, Backend};
use super::config::Config;
use super::stats::WorkerStats;
use super::worker::{AfterFlush, Core, IoState};
use crate::proto::frame::{OpCode, client_frame};
use crate::pubsub::bus::{Bus, Wake};
use crate::pubsub::directory::Directory;
use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MASK: [u8; 4] = [1, 2, 3, 4];
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

struct NoWake;
impl Wake for NoWake {
    fn wake(&self) {}
}

/// One simulated peer: what it has received, how much more its socket
/// takes, and whether the server closed or shut down its side.
#[derive(Debug, Default)]
struct Peer {
    received: Vec<u8>,
    window: usize,
    shut_down: bool,
    /// Sent by the peer, not yet read by the server (its socket buffer).
    unread: Vec<u8>,
}

/// Worker 0's core and its simulated peers; the other workers of the
/// configuration exist only as mailboxes (`others`) the test drains, or not.
struct Sim {
    core: Core<()>,
    now: Instant,
    peers: HashMap<usize, Peer>,
    closed: Vec<usize>,
    others: Vec<crate::pubsub::bus::Inbox>,
}

impl Sim {
    fn new(tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config {
            workers: 1,
            ..Config::default()
        };
        tweak(&mut config);
        let workers = config.workers;
        let (bus, mut inboxes) = Bus::new(
            (0..workers)
                .map(|_| Box::new(NoWake) as Box<dyn Wake>)
                .collect(),
        );
        let shared = Arc::new(Shared::new(
            config,
            (0..workers).map(|_| WorkerStats::default()).collect(),
            Arc::new(Directory::new()),
            bus,
        ));
        let core = Core::new(0, inboxes.remove(0), shared);
        let now = core.now();
        Self {
            core,
            now,
            peers: HashMap::new(),
            closed: Vec::new(),
            others: inboxes,
        }
    }

    fn stats(&self) -> &WorkerStats {
        self.core.stats()
    }

    /// A new connection whose socket takes `window` bytes before it blocks.
    fn connect(&mut self, window: usize) -> usize {
        self.core.begin_turn(self.now);
        let key = self.core.admit((), None);
        self.peers.insert(
            key,
            Peer {
                window,
                ..Peer::default()
            },
        );
        self.turn();
        key
    }

    /// A connection upgraded on `path`, its 101 read.
    fn upgrade(&mut self, path: &str, window: usize) -> usize {
        let key = self.connect(window + 256);
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        self.send(key, req.as_bytes());
        let peer = self.peers.get_mut(&key).unwrap();
        assert!(peer.received.starts_with(b"HTTP/1.1 101 "));
        peer.received.clear();
        peer.window = window;
        key
    }

    /// The peer sends `bytes`; the server reads them (one read) unless it
    /// is not reading that connection; then a loop turn ends.
    fn send(&mut self, key: usize, bytes: &[u8]) {
        self.peers
            .get_mut(&key)
            .unwrap()
            .unread
            .extend_from_slice(bytes);
        self.core.begin_turn(self.now);
        self.pump(key);
        self.turn();
    }

    /// The server reads what `key` sent, if it reads that connection now.
    fn pump(&mut self, key: usize) {
        let readable = self
            .core
            .get(key)
            .is_some_and(|c| c.state() == IoState::Active && !c.read_paused());
        let unread = std::mem::take(&mut self.peers.get_mut(&key).unwrap().unread);
        if !readable || unread.is_empty() {
            self.peers.get_mut(&key).unwrap().unread = unread;
            return;
        }
        let mut buf = vec![0u8; self.core.conn(key).pending_len()];
        self.core.conn_mut(key).restore_pending(&mut buf);
        buf.extend_from_slice(&unread);
        self.core.input(key, &mut buf);
        self.core.after_input(key);
    }

    /// The peer reads: its socket takes `n` more bytes.
    fn read(&mut self, key: usize, n: usize) {
        self.peers.get_mut(&key).unwrap().window += n;
        if self.core.get(key).is_some() {
            self.core.mark_dirty(key);
        }
        self.turn();
    }

    /// Virtual time passes, one loop turn per `step`.
    fn wait(&mut self, total: Duration, step: Duration) {
        let end = self.now + total;
        while self.now < end {
            self.now += step;
            self.turn();
        }
    }

    /// The end of a loop turn: the skeleton both backends run.
    fn turn(&mut self) {
        self.core.begin_turn(self.now);
        backend::end_of_turn(self);
    }

    fn flush(&mut self, key: usize) {
        let peer = self.peers.get_mut(&key).unwrap();
        let out = self.core.conn_mut(key).out_mut();
        let mut wrote = 0;
        while !out.is_empty() && peer.window > 0 {
            let mut iov = [IoSlice::new(&[]); 64];
            let n = out.gather(&mut iov);
            let mut take = peer.window.min(out.len());
            let mut taken = 0;
            for s in &iov[..n] {
                let k = s.len().min(take);
                peer.received.extend_from_slice(&s[..k]);
                take -= k;
                taken += k;
            }
            out.advance(taken);
            peer.window -= taken;
            wrote += taken;
        }
        match self.core.after_flush(key, wrote) {
            AfterFlush::Keep => {}
            AfterFlush::ShutdownWrite => peer.shut_down = true,
            AfterFlush::Remove => Backend::remove(self, key),
        }
    }

    fn received(&mut self, key: usize) -> Vec<u8> {
        std::mem::take(&mut self.peers.get_mut(&key).unwrap().received)
    }
}

/// The simulated backend: no event source (the test is the event source),
/// byte pipes for sockets.
impl Backend for Sim {
    type Io = ();

    fn core(&mut self) -> &mut Core<()> {
        &mut self.core
    }

    fn wait(&mut self, _busy: bool, _deadline: Option<Instant>) -> std::io::Result<()> {
        Ok(())
    }

    fn handle_events(&mut self) {}

    fn reread(&mut self, key: usize) {
        self.pump(key);
    }

    fn flush(&mut self, key: usize) {
        Sim::flush(self, key);
    }

    fn remove(&mut self, key: usize) {
        self.core.retire(key);
        self.core.free(key);
        self.closed.push(key);
    }

    fn stop_accepting(&mut self) {}

    fn exit(&mut self) {}
}

/// The close code of the first close frame in `wire`, if any.
fn close_code(wire: &[u8]) -> Option<u16> {
    let mut pos = 0;
    while pos + 2 <= wire.len() {
        let (op, len7) = (wire[pos] & 0x0f, (wire[pos + 1] & 0x7f) as usize);
        let (len, head) = match len7 {
            126 => (
                u16::from_be_bytes([wire[pos + 2], wire[pos + 3]]) as usize,
                4,
            ),
            127 => (
                u64::from_be_bytes(wire[pos + 2..pos + 10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n, 2),
        };
        if op == 0x8 {
            return Some(u16::from_be_bytes([wire[pos + head], wire[pos + head + 1]]));
        }
        pos += head + len;
    }
    None
}

fn publish(sim: &mut Sim, topic: &str, body: &[u8]) {
    let key = sim.connect(1 << 20);
    let mut req = format!(
        "POST /publish/{topic} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    sim.send(key, &req);
    assert!(sim.received(key).starts_with(b"HTTP/1.1 204 "));
}

const SECOND: Duration = Duration::from_secs(1);
const TICK: Duration = Duration::from_millis(100);

#[test]
fn a_silent_subscriber_is_pinged_then_closed_1001_in_virtual_time() {
    let mut sim = Sim::new(|_| {});
    let s = sim.upgrade("/ws?topics=a", 1 << 20);
    sim.wait(29 * SECOND, TICK);
    assert!(sim.received(s).is_empty(), "nothing before the interval");
    sim.wait(2 * SECOND, TICK);
    assert_eq!(sim.received(s), [0x89, 0x00], "a ping after 30 s");
    sim.wait(11 * SECOND, TICK);
    assert_eq!(close_code(&sim.received(s)), Some(1001));
    assert_eq!(
        sim.stats()
            .keepalive_timeouts
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    sim.wait(3 * SECOND, TICK);
    assert!(sim.closed.contains(&s), "dropped after the linger");
}

#[test]
fn a_subscriber_that_stops_reading_is_cut_at_its_bound_and_the_others_get_everything() {
    let mut sim = Sim::new(|c| c.max_outbound_bytes = 64 * 1024);
    let stalled = sim.upgrade("/ws?topics=t", 0);
    let reader = sim.upgrade("/ws?topics=t", usize::MAX / 2);
    for i in 0..10u8 {
        publish(&mut sim, "t", &[i; 16 * 1024]);
    }
    let got = sim.received(reader);
    assert_eq!(got.len(), 10 * (4 + 16 * 1024), "every message, whole");
    let st = sim.stats();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(st.slow_consumer_disconnects.load(Relaxed), 1);
    // The stalled one reads at last: an unbroken prefix, then 1008.
    sim.read(stalled, usize::MAX / 2);
    let wire = sim.received(stalled);
    assert_eq!(close_code(&wire), Some(1008));
    assert_eq!(wire[4..4 + 16], [0u8; 16], "starting at the first message");
}

#[test]
fn a_queued_byte_that_waits_past_the_send_timeout_closes_the_connection() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| {
        c.send_timeout = Some(5 * SECOND);
        c.ping_interval = None;
    });
    let slow = sim.upgrade("/echo", 0);
    for _ in 0..3 {
        sim.send(slow, &client_frame(true, OpCode::Binary, &[7; 1000], MASK));
    }
    // It reads 50 bytes a second: progress, but its first 1 004-byte echo
    // needs 20 s. Not cut before the deadline...
    for _ in 0..4 {
        sim.wait(SECOND, TICK);
        sim.read(slow, 50);
    }
    assert_eq!(sim.stats().send_timeouts.load(Relaxed), 0);
    // ...cut once the first queued byte has waited 5 s (one sweep later at most).
    for _ in 0..3 {
        sim.wait(SECOND, TICK);
        sim.read(slow, 50);
    }
    assert_eq!(sim.stats().send_timeouts.load(Relaxed), 1);
    assert!(sim.stats().send_timeout_discarded_bytes.load(Relaxed) > 0);
    sim.wait(3 * SECOND, TICK);
    assert!(sim.closed.contains(&slow));
    assert_eq!(sim.core.stats().buffered_bytes.load(Relaxed), 0);
}

#[test]
fn a_reader_that_keeps_up_with_a_steady_backlog_is_never_cut() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| {
        c.send_timeout = Some(2 * SECOND);
        c.ping_interval = None;
    });
    let s = sim.upgrade("/ws?topics=feed", 0);
    // 60 s of a feed where the reader always lags by five messages (its
    // queue is never empty) but each byte leaves within half a second.
    for _ in 0..5 {
        publish(&mut sim, "feed", &[1; 2000]);
    }
    for _ in 0..600 {
        publish(&mut sim, "feed", &[1; 2000]);
        sim.now += TICK;
        sim.read(s, 2004);
        assert!(!sim.core.conn(s).out().is_empty(), "a steady backlog");
    }
    assert_eq!(sim.stats().send_timeouts.load(Relaxed), 0);
    assert!(!sim.closed.contains(&s));
}

#[test]
fn half_a_request_head_gets_408_at_the_handshake_deadline() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|_| {});
    let c = sim.connect(1 << 20);
    sim.send(c, b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgr");
    sim.wait(9 * SECOND, TICK);
    assert!(sim.received(c).is_empty());
    sim.wait(2 * SECOND, TICK);
    let answer = String::from_utf8(sim.received(c)).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 408 Request Timeout"),
        "{answer}"
    );
    assert!(
        answer.contains("--handshake-timeout"),
        "names the flag: {answer}"
    );
    assert_eq!(sim.stats().handshake_timeouts.load(Relaxed), 1);
    sim.wait(3 * SECOND, TICK);
    assert!(sim.closed.contains(&c), "then closed after the linger");
}

#[test]
fn a_connection_that_says_nothing_is_closed_silently_at_the_handshake_deadline() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|_| {});
    let silent = sim.connect(1 << 20);
    sim.wait(9 * SECOND, TICK);
    // An honest client arriving meanwhile is served.
    let honest = sim.upgrade("/echo", 1 << 20);
    sim.send(honest, &client_frame(true, OpCode::Text, b"hi", MASK));
    assert_eq!(sim.received(honest), [&[0x81, 2][..], b"hi"].concat());
    assert!(!sim.closed.contains(&silent));
    sim.wait(2 * SECOND, TICK);
    assert!(sim.received(silent).is_empty(), "no answer to no request");
    assert!(sim.closed.contains(&silent));
    assert!(!sim.closed.contains(&honest), "its own deadline is later");
    assert_eq!(sim.stats().handshake_timeouts.load(Relaxed), 1);
}

#[test]
fn upgraded_connections_leave_no_request_deadlines_behind() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|_| {});
    let silent = sim.connect(1 << 20);
    let half = sim.connect(1 << 20);
    sim.send(half, b"GET /echo HTTP/1.1\r\nHost: x\r\n");
    // A thousand subscribers within the handshake timeout: their entries
    // are dropped as the queue fills, not kept for 10 s each.
    let subscribers: Vec<usize> = (0..1000)
        .map(|_| sim.upgrade("/ws?topics=idle", 1 << 16))
        .collect();
    assert!(
        sim.core.request_deadlines() <= 8,
        "{} entries",
        sim.core.request_deadlines()
    );
    // The two still in their request keep theirs.
    sim.wait(11 * SECOND, TICK);
    assert!(sim.closed.contains(&silent));
    assert!(sim.received(half).starts_with(b"HTTP/1.1 408 "));
    assert_eq!(sim.stats().handshake_timeouts.load(Relaxed), 2);
    assert!(subscribers.iter().all(|k| !sim.closed.contains(k)));
}

#[test]
fn a_message_that_never_completes_is_closed_1008_while_a_steady_talker_stays() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| c.ping_interval = None);
    let steady = sim.upgrade("/echo", 1 << 20);
    let stuck = sim.upgrade("/echo", 1 << 20);
    // A first fragment, then half of a continuation frame's payload: then silence.
    let mut start = client_frame(false, OpCode::Text, b"part one", MASK);
    start.extend_from_slice(&client_frame(false, OpCode::Continuation, &[b'x'; 100], MASK)[..50]);
    sim.send(stuck, &start);
    // The steady talker's messages complete, one a second, past the deadline.
    for i in 0..35u8 {
        sim.send(steady, &client_frame(true, OpCode::Binary, &[i], MASK));
        assert_eq!(sim.received(steady), [0x82, 1, i]);
        if i == 28 {
            assert!(sim.received(stuck).is_empty(), "not before 30 s");
        }
        sim.wait(SECOND, TICK);
    }
    assert_eq!(close_code(&sim.received(stuck)), Some(1008));
    assert_eq!(sim.stats().message_timeouts.load(Relaxed), 1);
    assert!(!sim.closed.contains(&steady));
}

#[test]
fn a_subscriber_that_answers_pings_is_kept_and_pinged_again() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|_| {});
    let s = sim.upgrade("/ws?topics=k", 1 << 20);
    for round in 1..=3u64 {
        sim.wait(31 * SECOND, TICK);
        assert_eq!(sim.received(s), [0x89, 0x00], "ping {round}");
        sim.send(s, &client_frame(true, OpCode::Pong, b"", MASK));
        assert_eq!(sim.stats().keepalive_pings.load(Relaxed), round);
    }
    sim.wait(15 * SECOND, TICK);
    assert!(sim.received(s).is_empty(), "no close: it answered");
    assert_eq!(sim.stats().keepalive_timeouts.load(Relaxed), 0);
    assert!(!sim.closed.contains(&s));
}

#[test]
fn a_peer_that_stops_reading_while_closing_is_dropped_after_the_linger() {
    let mut sim = Sim::new(|c| c.max_outbound_bytes = 256 << 20);
    let s = sim.upgrade("/echo", 0);
    // 4 MiB of echoes it never reads, then its close frame: the server
    // cannot send its echoes nor the close reply...
    for _ in 0..64 {
        sim.send(
            s,
            &client_frame(true, OpCode::Binary, &[1; 64 * 1024], MASK),
        );
    }
    sim.send(
        s,
        &client_frame(true, OpCode::Close, &1000u16.to_be_bytes(), MASK),
    );
    sim.wait(SECOND, TICK);
    assert!(!sim.closed.contains(&s));
    // ...and does not hold the connection past the linger bound.
    sim.wait(super::worker::LINGER, TICK);
    assert!(sim.closed.contains(&s));
    assert!(sim.received(s).is_empty());
}

#[test]
fn the_connection_that_grows_past_the_budget_is_closed_1013_and_the_others_keep_theirs() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| c.max_buffered_bytes = 1 << 20);
    let a = sim.upgrade("/echo", 1 << 20);
    let b = sim.upgrade("/echo", 1 << 20);
    // A 4 MiB message announced on each; 300 KiB of it arrives on a, then
    // 800 KiB on b: together over the 1 MiB budget.
    let header = {
        let mut h = vec![0x82, 0xff];
        h.extend_from_slice(&(4u64 << 20).to_be_bytes());
        h.extend_from_slice(&MASK);
        h
    };
    sim.send(a, &header);
    sim.send(a, &vec![0u8; 300 * 1024]);
    assert!(sim.received(a).is_empty(), "a is within the budget");
    sim.send(b, &header);
    sim.send(b, &vec![0u8; 800 * 1024]);
    assert_eq!(close_code(&sim.received(b)), Some(1013), "b took it past");
    assert!(sim.received(a).is_empty(), "a keeps what it holds");
    assert_eq!(sim.stats().budget_closes.load(Relaxed), 1);
}

#[test]
fn an_http_publisher_is_not_read_while_a_peer_mailbox_is_over_its_mark() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| {
        c.workers = 2;
        c.mailbox_high_water = 4096;
    });
    // A subscriber on worker 1, whose mailbox the test drains by hand.
    let directory = Arc::clone(&sim.core.shared().directory);
    let bus = Arc::clone(&sim.core.shared().bus);
    let mut shard1 = crate::pubsub::shard::Shard::new(1, directory, Arc::clone(&bus));
    shard1.subscribe("t", (0, 0));
    let publisher = sim.connect(1 << 20);
    let post = |i: u8| {
        let mut r = b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\n\r\n".to_vec();
        r.extend_from_slice(&[i; 3000]);
        r
    };
    let answers = |wire: &[u8]| wire.windows(12).filter(|w| w == b"HTTP/1.1 204").count();
    // Two requests in one read: both published; they reach worker 1's
    // mailbox (6 KiB and overhead, over the 4 KiB mark) at the end of the
    // turn.
    sim.send(publisher, &[post(1), post(2)].concat());
    assert_eq!(answers(&sim.received(publisher)), 2);
    // The next read is still processed (the mark is checked after each
    // read: a publisher overshoots by at most one read), then the
    // publisher is held: its next requests wait in the socket, however
    // long, unanswered.
    sim.send(publisher, &post(3));
    assert_eq!(answers(&sim.received(publisher)), 1);
    assert_eq!(sim.stats().publishers_throttled.load(Relaxed), 1);
    for i in 4..10 {
        sim.send(publisher, &post(i));
    }
    sim.wait(20 * SECOND, TICK);
    let wire = sim.received(publisher);
    assert!(wire.is_empty(), "{}", String::from_utf8_lossy(&wire));
    assert_eq!(sim.stats().messages_published.load(Relaxed), 3);
    assert!(!sim.closed.contains(&publisher), "held, not timed out");
    // Worker 1 drains its mailbox: the publisher is read again and every
    // request is answered, in order.
    let mut delivered = 0;
    sim.others[0].drain(&bus, |batch| delivered += batch.len());
    assert_eq!(delivered, 3);
    sim.wait(SECOND, TICK);
    assert_eq!(answers(&sim.received(publisher)), 6);
    assert_eq!(sim.stats().messages_published.load(Relaxed), 9);
}

#[test]
fn large_holders_are_cut_at_ninety_percent_so_a_small_client_is_still_served() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| c.max_buffered_bytes = 4 << 20);
    let header = {
        let mut h = vec![0x82, 0xff];
        h.extend_from_slice(&(16u64 << 20).to_be_bytes());
        h.extend_from_slice(&MASK);
        h
    };
    // Two large partial messages: 2 MiB (50 %), then 1.7 MiB (92 %).
    let a = sim.upgrade("/echo", 1 << 20);
    sim.send(a, &header);
    sim.send(a, &vec![0u8; 2 << 20]);
    let b = sim.upgrade("/echo", 1 << 20);
    sim.send(b, &header);
    sim.send(b, &vec![0u8; 1700 << 10]);
    assert_eq!(close_code(&sim.received(b)), Some(1013), "b passed 90 %");
    assert!(sim.received(a).is_empty(), "a keeps what it holds");
    // The headroom is for small clients: an echo goes through.
    let c = sim.upgrade("/echo", 1 << 20);
    sim.send(c, &client_frame(true, OpCode::Text, b"still serving", MASK));
    assert_eq!(
        sim.received(c),
        [&[0x81, 13][..], b"still serving"].concat()
    );
    assert_eq!(sim.stats().budget_closes.load(Relaxed), 1);
}
