//! A cluster of corecast nodes over NATS (`--nats-url`): what the workers
//! share with the bridge thread, and the bridge itself.
//!
//! | module | holds |
//! |---|---|
//! | [`subject`] | topic names and patterns as NATS subjects (sans-IO) |
//! | [`sequencer`] | per-topic numbering through JetStream's compare-and-set (sans-IO) |
//! | [`bridge`] | the thread: the NATS connection, the stream, interest subscriptions, publications in and out ← I/O here |
//!
//! The design (docs/ARCHITECTURE.md, "Cluster"): every node publishes to
//! one JetStream stream, `CORECAST`, which stores at most `--history-size`
//! messages per topic and republishes each stored message, in the order
//! stored, on the topic's output subject. A node subscribes to the output
//! subject of each topic and pattern it has subscribers for, and hands
//! what arrives to its workers ([`crate::pubsub::remote::inject_batch`]). The
//! stream's order is the topic's one order; its numbers are decided
//! before publishing and checked by the stream ([`sequencer`]).

pub mod bridge;
pub mod sequencer;
pub mod subject;

use crate::pubsub::bus::Bus;
use crate::pubsub::envelope::Message;
use crate::pubsub::remote::{Link, Refused};
use crate::pubsub::shard::ConnRef;
use crate::server::stats::Histogram;
pub use sequencer::AckTo;
use sequencer::Pending;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The stream every node of a cluster publishes to.
pub const STREAM: &str = "CORECAST";
/// The longest topic name in a cluster (a NATS subject carries it in a
/// protocol line, whose default limit is 4 KiB).
pub const MAX_TOPIC_LEN: usize = 1024;

/// Room left in a NATS message for our headers and the topic (the
/// `max_payload` limit counts headers too).
const HEADER_ROOM: usize = 512 + MAX_TOPIC_LEN;

/// `--nats-url` and its companions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    pub urls: Vec<String>,
    pub credentials: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub max_pending: usize,
    pub replicas: u8,
    /// Messages the NATS client holds for one interest subscription while
    /// the workers' mailboxes are over their high-water mark
    /// ([`NATS_BUFFERED`]).
    pub buffered: usize,
}

/// What the NATS client may hold per interest subscription while the
/// workers fall behind (their mailboxes over the high-water mark, which
/// stops the bridge taking more). Past it the client drops what NATS sends
/// for that subscription (`corecast_cluster_slow_consumer_total`), and the
/// node reads what it missed from the stream. A message is at most NATS's
/// `max_payload` (1 MiB by default), so this bounds what a node holds for
/// its peers' publications at 256 MiB per subscription, where the client's
/// own default (65 536 messages) would allow 64 GiB.
pub const NATS_BUFFERED: usize = 256;

/// Checks a `--nats-url` value: `nats://`, `tls://` (or no scheme) and a
/// host with a port.
pub fn parse_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    let rest = s
        .strip_prefix("nats://")
        .or_else(|| s.strip_prefix("tls://"))
        .unwrap_or(s);
    if rest.contains("://") {
        return Err(format!("{s}: the scheme must be nats:// or tls://"));
    }
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let port = host.rsplit_once(':').map(|(_, p)| p);
    if host.is_empty() || !port.is_some_and(|p| p.parse::<u16>().is_ok_and(|p| p > 0)) {
        return Err(format!("{s}: expected nats://HOST:PORT"));
    }
    Ok(s.to_string())
}

/// What the bridge tells a worker about a publication it handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Stored by the stream as number `seq` of `epoch` (`request`: which
    /// of an HTTP connection's requests; 0 for a WebSocket).
    Stored {
        conn: ConnRef,
        request: u32,
        epoch: u64,
        seq: u64,
    },
    /// Refused by NATS for good (dropped, counted as rejected).
    Lost { conn: ConnRef, request: u32 },
}

/// Counters of the cluster link (`/metrics`, `corecast_cluster_*`).
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Publications this node had the stream store.
    pub published: AtomicU64,
    /// Payload bytes of those.
    pub published_bytes: AtomicU64,
    /// Publications refused: the bound (`--nats-max-pending`), larger
    /// than NATS takes, or unusable settings.
    pub refused: AtomicU64,
    /// Publications larger than NATS takes.
    pub too_large: AtomicU64,
    /// Publications NATS refused for good after taking them (dropped,
    /// logged).
    pub rejected: AtomicU64,
    /// Publications renumbered because another node stored first.
    pub conflicts: AtomicU64,
    /// Publication attempts that failed for want of NATS (retried).
    pub failures: AtomicU64,
    /// Publications not stored when the node stopped.
    pub abandoned: AtomicU64,
    /// Messages received from the cluster (interest subscriptions).
    pub received: AtomicU64,
    pub received_bytes: AtomicU64,
    /// Of those: copies already handed on (a topic's and a pattern's
    /// subscription both matching).
    pub duplicates: AtomicU64,
    /// Numbers that skipped (messages that never reached this node).
    pub gaps: AtomicU64,
    /// A topic's numbering seen starting over (a new epoch).
    pub restarts: AtomicU64,
    /// Messages without our headers (published into the stream by
    /// something else): ignored.
    pub foreign: AtomicU64,
    /// Connections (re-)established to NATS.
    pub connects: AtomicU64,
    /// Slow-consumer notices from the NATS client.
    pub slow_consumer: AtomicU64,
    /// Rounds in which a new interest subscription could not be handed to
    /// the NATS client in time (its queue full while it reconnects): tried
    /// again a second later.
    pub subscribes_deferred: AtomicU64,
    /// Interest subscriptions held now.
    pub subscriptions: AtomicU64,
    /// HTTP publications answered `202`: not stored within the request
    /// deadline (still held, stored once NATS takes them).
    pub unconfirmed: AtomicU64,
    /// Catch-ups from the stream started because a message's predecessor
    /// had not reached this node.
    pub missed: AtomicU64,
    /// From the publishing node's clock to this node's, per message.
    pub latency: Histogram,
}

/// What workers and the bridge share.
pub struct Cluster {
    settings: ClusterSettings,
    /// Work for the bridge: publications and interest changes.
    inbox: Mutex<Inbox>,
    wake: tokio::sync::Notify,
    /// Bytes of publications held (inbox and sequencer), against
    /// `settings.max_pending`.
    pending: AtomicUsize,
    /// Connected to NATS now.
    connected: AtomicBool,
    /// The NATS client dropped messages for this node (its buffer for a
    /// subscription was full): the bridge reads what was missed from the
    /// stream.
    dropped: AtomicBool,
    /// The stream is known to exist (since the last connect).
    ready: AtomicBool,
    stop: AtomicBool,
    /// The settings cannot work (a bad credentials file): publications
    /// are refused.
    unusable: AtomicBool,
    /// The largest message NATS takes (its `max_payload`; 1 MiB until
    /// the server says).
    pub(crate) max_payload: AtomicUsize,
    /// This process's name in message ids (start time and pid).
    node_id: String,
    next_id: AtomicU64,
    /// Per worker: replies waiting for it.
    replies: Box<[Mutex<Vec<Reply>>]>,
    bus: Arc<Bus>,
    pub stats: ClusterStats,
}

/// Most topics followed at once for recoveries alone (without
/// subscribers here), and most waiting to be: past it the oldest hold
/// gives way (its recovery has had its retry long since), and a
/// recovery asking for more while as many wait is told to come back.
pub(crate) const MAX_HOLDS: usize = 10_000;

#[derive(Debug, Default)]
struct Inbox {
    publications: Vec<Pending>,
    interest: Vec<(Box<str>, bool)>,
    /// Topics whose history a recovery waits for.
    warm: Vec<Box<str>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("settings", &self.settings)
            .field("pending", &self.pending)
            .field("connected", &self.connected)
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// The shared half of a cluster link for `workers` workers.
    pub fn new(settings: ClusterSettings, bus: Arc<Bus>) -> Self {
        Self {
            settings,
            inbox: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            pending: AtomicUsize::new(0),
            connected: AtomicBool::new(false),
            dropped: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            unusable: AtomicBool::new(false),
            max_payload: AtomicUsize::new(1024 * 1024),
            node_id: format!(
                "{:x}.{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
                std::process::id()
            ),
            next_id: AtomicU64::new(0),
            replies: (0..bus.workers()).map(|_| Mutex::default()).collect(),
            bus,
            stats: ClusterStats::default(),
        }
    }

    fn inbox(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the node is connected to NATS and the stream exists:
    /// publications flow (`corecast_cluster_connected`, `/healthz`).
    pub fn is_up(&self) -> bool {
        self.connected.load(Ordering::Relaxed) && self.ready.load(Ordering::Relaxed)
    }

    /// Replicas of the stream, when a node creates it.
    pub fn replicas(&self) -> u8 {
        self.settings.replicas
    }

    /// Bytes of publications held for the cluster.
    pub fn pending_bytes(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// The bound on them.
    pub fn max_pending(&self) -> usize {
        self.settings.max_pending
    }

    /// The replies waiting for `worker` (taken).
    pub fn take_replies(&self, worker: usize) -> Vec<Reply> {
        let mut r = self.replies[worker]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *r)
    }

    /// What workers offered and the bridge has not taken (tests stand in
    /// for the bridge).
    #[cfg(test)]
    pub(crate) fn take_offered(&self) -> Vec<Pending> {
        std::mem::take(&mut self.inbox().publications)
    }

    pub(crate) fn reply(&self, worker: usize, reply: Reply) {
        self.replies[worker]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(reply);
        self.bus.wake(worker);
    }

    /// Asks the bridge to stop (it waits a moment for what is in flight).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// The bridge cannot work with the settings given.
    pub(crate) fn settings_failed(&self) {
        self.unusable.store(true, Ordering::Relaxed);
    }

    /// Whether a payload of `len` bytes fits in one NATS message (with
    /// our headers).
    pub fn fits(&self, len: usize) -> bool {
        len + HEADER_ROOM <= self.max_payload.load(Ordering::Relaxed)
    }

    /// Queues a publication for the bridge; refused past the bound, when
    /// too large for NATS, or with settings that cannot work.
    fn offer(&self, mut item: Pending) -> Result<(), Refused> {
        if !self.fits(item.payload.len()) {
            self.stats.too_large.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::TooLarge);
        }
        if self.unusable.load(Ordering::Relaxed) {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::Busy);
        }
        item.id = Arc::from(format!(
            "{}-{}",
            self.node_id,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        ));
        let cost = item.cost();
        let mut held = self.pending.load(Ordering::Relaxed);
        loop {
            if held + cost > self.settings.max_pending {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                return Err(Refused::Busy);
            }
            match self.pending.compare_exchange_weak(
                held,
                held + cost,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => held = now,
            }
        }
        self.inbox().publications.push(item);
        self.wake.notify_one();
        Ok(())
    }

    /// A publication's bytes are no longer held (stored, or abandoned).
    fn release(&self, item: &Pending) {
        self.pending.fetch_sub(item.cost(), Ordering::Relaxed);
    }

    /// A publication will never be stored: released, and a publisher
    /// waiting for its number is told (`Reply::Lost`).
    fn lose(&self, item: &Pending) {
        self.release(item);
        if let Some(a) = &item.ack {
            self.reply(
                a.worker as usize,
                Reply::Lost {
                    conn: a.conn,
                    request: a.request,
                },
            );
        }
    }
}

impl Link for Cluster {
    fn interest_changed(&self, name: &str, pattern: bool) {
        self.inbox().interest.push((name.into(), pattern));
        self.wake.notify_one();
    }

    fn warm(&self, name: &str) -> bool {
        {
            let mut inbox = self.inbox();
            // The bridge holds at most MAX_HOLDS topics for recoveries: more
            // waiting than that would only push out the ones just taken.
            if inbox.warm.len() >= MAX_HOLDS {
                return false;
            }
            inbox.warm.push(name.into());
        }
        self.wake.notify_one();
        true
    }

    fn publish(
        &self,
        topic: &Arc<str>,
        msg: &Message,
        ack: Option<(usize, ConnRef)>,
    ) -> Result<(), Refused> {
        let (opcode, payload) = msg.payload();
        let start = msg.frame.len() - payload.len();
        self.offer(Pending {
            id: Arc::from(""),
            topic: Arc::clone(topic),
            payload: msg.frame.slice(start..),
            text: opcode == crate::proto::frame::OpCode::Text,
            key: msg.key.clone(),
            ack: ack.map(|(worker, conn)| AckTo {
                worker: worker as u32,
                conn,
                request: 0,
            }),
        })
    }
}

/// An HTTP publication (`POST /publish/{topic}`) for the cluster.
pub fn publish_http(
    cluster: &Cluster,
    topic: &str,
    payload: &[u8],
    text: bool,
    key: Option<Arc<str>>,
    ack: Option<AckTo>,
) -> Result<(), Refused> {
    cluster.offer(Pending {
        id: Arc::from(""),
        topic: Arc::from(topic),
        payload: bytes::Bytes::copy_from_slice(payload),
        text,
        key,
        ack,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_need_a_host_and_port() {
        assert!(parse_url("nats://127.0.0.1:4222").is_ok());
        assert!(parse_url("tls://user:pw@nats.example:4443").is_ok());
        assert!(parse_url("127.0.0.1:4222").is_ok());
        assert!(parse_url("http://127.0.0.1:4222").is_err());
        assert!(parse_url("nats://127.0.0.1").is_err());
        assert!(parse_url("nats://:0").is_err());
    }
}
