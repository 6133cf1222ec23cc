//! [`Core`] driven by a simulated backend with virtual time, quinn-style:
//! no sockets, no threads, no sleeps. Each peer is a byte pipe whose
//! receive window the test sets (0: a peer that stops reading); time moves
//! only when a test says so. What the real backends do per loop turn
//! (read, end of turn: re-reads, delivery, one flush per dirty connection,
//! unthrottle, sweep, deadlines) is done here in the same order.
//!
//! This file holds the simulator; the tests are in `acks.rs` (a
//! publisher's acknowledgements around a close), `deadlines.rs`
//! (keepalive, request, message, send and linger deadlines) and
//! `backpressure.rs` (slow consumers, the buffer budget, publisher
//! throttling and pacing).

mod acks;
mod backpressure;
mod cluster;
mod deadlines;
mod flush_order;
mod http_publish;

use super::Shared;
use super::backend::{self, Backend};
use super::config::Config;
use super::stats::{FAILURE_CODES, WorkerStats};
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
        Self::build(tweak, false)
    }

    /// A node of a cluster whose bridge is the test: it takes what the
    /// worker offers ([`Cluster::take_offered`](super::cluster::Cluster))
    /// and replies for the stream.
    fn in_cluster(tweak: impl FnOnce(&mut Config)) -> Self {
        Self::build(tweak, true)
    }

    fn cluster(&self) -> &super::cluster::Cluster {
        self.core
            .shared()
            .cluster
            .as_deref()
            .expect("a cluster node")
    }

    /// A server whose tokens `verifier` checks.
    fn with_tokens(tweak: impl FnOnce(&mut Config), verifier: super::auth::Verifier) -> Self {
        Self::build_with(tweak, false, Some(verifier))
    }

    fn build(tweak: impl FnOnce(&mut Config), cluster: bool) -> Self {
        Self::build_with(tweak, cluster, None)
    }

    fn build_with(
        tweak: impl FnOnce(&mut Config),
        cluster: bool,
        verifier: Option<super::auth::Verifier>,
    ) -> Self {
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
        let mut shared = Shared::new(
            config,
            (0..workers).map(|_| WorkerStats::default()).collect(),
            Arc::new(Directory::new()),
            Arc::clone(&bus),
        );
        if cluster {
            let settings = super::cluster::ClusterSettings {
                urls: vec!["nats://127.0.0.1:1".into()],
                credentials: None,
                ca: None,
                max_pending: 1 << 20,
                replicas: 1,
                buffered: super::cluster::NATS_BUFFERED,
            };
            shared.cluster = Some(Arc::new(super::cluster::Cluster::new(settings, bus)));
        }
        shared.auth = verifier.map(|v| std::sync::RwLock::new(Arc::new(v)));
        let shared = Arc::new(shared);
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
        self.upgrade_with(path, "", window)
    }

    /// [`Self::upgrade`] with more header lines (each ending in CRLF).
    fn upgrade_with(&mut self, path: &str, headers: &str, window: usize) -> usize {
        let key = self.connect(window + 256);
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
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

    /// The peer sends `bytes`, which the server reads in reads of at most
    /// `piece` bytes within one loop turn (as io_uring hands a turn's
    /// input over in receive completions of one buffer each), as long as
    /// it reads that connection; then the turn ends.
    fn send_in_pieces(&mut self, key: usize, bytes: &[u8], piece: usize) {
        self.core.begin_turn(self.now);
        for chunk in bytes.chunks(piece) {
            let peer = self.peers.get_mut(&key).unwrap();
            peer.unread.extend_from_slice(chunk);
            self.pump(key);
        }
        backend::end_of_turn(self);
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

/// The frames in `wire` (server frames: unmasked, uncompressed), as
/// (opcode, payload); a frame cut short at the end is left out.
fn frames(wire: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
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
        let Some(payload) = wire.get(pos + head..pos + head + len) else {
            break;
        };
        out.push((op, payload.to_vec()));
        pos += head + len;
    }
    out
}

/// The close code of the first close frame in `wire`, if any.
fn close_code(wire: &[u8]) -> Option<u16> {
    frames(wire)
        .into_iter()
        .find(|(op, _)| *op == 0x8)
        .map(|(_, payload)| u16::from_be_bytes([payload[0], payload[1]]))
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

/// The non-zero `corecast_ws_failures_total` samples: (close code, count).
fn ws_failures(sim: &Sim) -> Vec<(u16, u64)> {
    FAILURE_CODES
        .iter()
        .zip(&sim.stats().ws_failures)
        .map(|(&code, n)| (code, n.load(std::sync::atomic::Ordering::Relaxed)))
        .filter(|&(_, n)| n > 0)
        .collect()
}

const SECOND: Duration = Duration::from_secs(1);
const TICK: Duration = Duration::from_millis(100);
