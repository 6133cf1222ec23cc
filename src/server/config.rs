//! Server configuration, shared read-only by every worker.

use crate::proto::handshake::DEFAULT_MAX_HEAD_BYTES;
use crate::proto::ws::{
    DEFAULT_MAX_CONTROL_RATE, DEFAULT_MAX_FRAGMENTS, DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES, WsLimits,
};
use crate::pubsub::bus::{MAILBOX_HIGH_LAG, MAILBOX_HIGH_WATER};
use crate::pubsub::topic::{
    DEFAULT_MAX_PATTERNS_PER_CONN, DEFAULT_MAX_TOPIC_LEN, DEFAULT_MAX_TOPICS_PER_CONN,
};
use crate::server::admission::{AdmissionLimits, DEFAULT_MAX_CONNECTIONS};
use std::net::SocketAddr;
use std::time::Duration;

/// Default per-connection cap on queued outbound bytes. Above it the
/// connection stops being read until the queue drains to half (echo
/// backpressure), so one connection never holds more than about this much
/// plus one message.
pub const DEFAULT_MAX_OUTBOUND_BYTES: usize = 4 * 1024 * 1024;
/// Default time a client has to send its whole request head.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default interval after which an idle connection (nothing received) is pinged.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);
/// Default time a pinged connection has to send anything before it is closed.
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time shutdown waits for clients to finish the close handshake.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time a client has to finish a message it started (all its
/// fragments, or one frame's payload).
pub const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default longest time a byte queued for a client may wait to be taken by
/// the kernel before the connection is closed (the bytes queued when a send
/// epoch begins must all have left by its end): the deadline that covers a
/// peer which stops reading, or reads too slowly to ever catch up, whatever
/// state the connection is in (see docs/SECURITY.md, "Deadlines"). 30 s: as
/// long as the message timeout; a client that keeps up, even with a steady
/// backlog, is never cut (a full 4 MiB queue asks for about 140 KB/s), and
/// a stalled one holds its queue (up to `--max-outbound-bytes`, budgeted)
/// no longer than this.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Default idle time before the kernel sends TCP keepalive probes.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// Default process-wide budget for bytes held on behalf of connections
/// (partial requests and messages, replies and copied frames waiting to be
/// written); see docs/SECURITY.md.
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 1024 * 1024 * 1024;
/// Default IPv6 prefix, in bits, that counts as one source address for the
/// per-address limits. A /64 is the smallest network an IPv6 site is given
/// (SLAAC fills in a 64-bit interface identifier: RFC 4291 section 2.5.1,
/// RFC 7421), so every ordinary IPv6 client can use 2^64 addresses; many
/// sites get a /56 or a /48 (RFC 6177), which a shorter prefix covers at
/// the cost of grouping more neighbours.
pub const DEFAULT_IPV6_PREFIX_LEN: u8 = 64;

pub use crate::pubsub::policy::SlowConsumerPolicy;

/// Default `--max-recovery-rate`: subscribes with `since` per worker per
/// second. A recovery costs its worker a history read under the topic's
/// lock and the replayed frames (up to half a queue); 2 000 a second leaves
/// a storm of 10 000 reconnecting subscribers on two workers caught up in
/// under 3 s while the live stream keeps flowing.
pub const DEFAULT_MAX_RECOVERY_RATE: u32 = 2000;

/// Which event loop the workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// io_uring when the kernel runs everything the backend uses (probed at
    /// start), else epoll, with one log line saying why.
    #[default]
    Auto,
    /// mio (epoll).
    Epoll,
    /// io_uring; starting fails if the kernel does not support it.
    Uring,
}

/// Whether worker threads are pinned to cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PinMode {
    /// Decided from the CPUs the process may run on: pinned (`Always`)
    /// when that set is smaller than the machine's (the operator gave the
    /// server its own cores, with a cpuset or `taskset`); otherwise left
    /// to the scheduler (`Never`), so that a worker sharing its core with
    /// another busy process can move. See [`crate::server::pinning`].
    #[default]
    Auto,
    /// Worker `i` runs only on core `i % cores` (of the process's CPUs).
    Always,
    /// The scheduler places the workers.
    Never,
}

/// Everything a server needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address every worker's `SO_REUSEPORT` listener binds (port 0: pick one).
    pub listen: SocketAddr,
    /// Worker threads (event loops); 0 means one per available core.
    pub workers: usize,
    /// Whether worker `i` is pinned to core `i % cores`.
    pub pin: PinMode,
    /// The I/O backend.
    pub io: IoMode,
    /// Largest accepted message (reassembled), in bytes; bigger ones close 1009.
    pub max_message_size: usize,
    /// Largest accepted request head, in bytes; bigger ones get 431.
    pub max_handshake_size: usize,
    /// Per-connection outbound queue bound, in bytes.
    pub max_outbound_bytes: usize,
    /// Subprotocols the server speaks, in order of preference.
    pub subprotocols: Vec<String>,
    /// Deadline for a complete request head.
    pub handshake_timeout: Duration,
    /// Bound on the graceful shutdown.
    pub drain_timeout: Duration,
    /// Most topics one subscriber connection may hold.
    pub max_topics_per_conn: usize,
    /// Most patterns among them.
    pub max_patterns_per_conn: usize,
    /// Longest topic name, in bytes.
    pub max_topic_len: usize,
    /// What each topic's history keeps (size 0: no history, no recovery).
    pub history: crate::pubsub::history::HistoryLimits,
    /// Most topics kept for their history once nobody holds them.
    pub retained_topics: usize,
    /// Send a topic's newest publication (a snapshot) to each new
    /// enveloped subscriber.
    pub last_value: bool,
    /// Agree to permessage-deflate with clients that offer it: publications
    /// compressed once for all of them, echoes per message.
    pub permessage_deflate: bool,
    /// Per-namespace policies (the configuration file's
    /// `[namespace."…"]` tables) at start; a reload replaces the
    /// directory's table, not this one.
    pub namespaces: Vec<crate::pubsub::policy::NamespacePolicy>,
    /// What to do with a subscriber that cannot keep up.
    pub slow_consumer: SlowConsumerPolicy,
    /// Ping connections idle this long; `None` disables keepalive.
    pub ping_interval: Option<Duration>,
    /// Close a pinged connection that sends nothing for this long.
    pub ping_timeout: Duration,
    /// Serve `/metrics` and `/healthz` on this address instead of the main port.
    pub admin_listen: Option<SocketAddr>,
    /// Shared secret publishers must present (`Authorization: Bearer` or `?token=`).
    pub publish_token: Option<String>,
    /// Web origins whose pages may open WebSockets and publish through a
    /// visitor's browser ([`crate::server::origin`]); empty: every origin.
    /// The server keeps its own copy, which a reload replaces.
    pub allowed_origins: Vec<String>,
    /// Most open connections in the process; more are answered 503.
    pub max_connections: usize,
    /// Most open connections from one source address; 0 = no limit.
    pub max_connections_per_ip: u32,
    /// New connections per second from one source address (burst: one
    /// second's worth); 0 = no limit.
    pub max_connect_rate_per_ip: u32,
    /// Messages per second one publisher may publish (HTTP: per source
    /// address, answered 429 over it; WebSocket: per connection, paced by
    /// not reading it); 0 = no limit.
    pub max_publish_rate: u32,
    /// Subscribes with `since` one worker admits per second (a token
    /// bucket holding one second's worth); 0 = no limit.
    pub max_recovery_rate: u32,
    /// IPv6 clients whose addresses share this many leading bits count as
    /// one source address for the per-address limits (1 to 128). IPv4
    /// clients, also IPv4-mapped ones, count per address.
    pub ipv6_prefix_len: u8,
    /// Largest frame payload a client may send; bigger closes 1009.
    pub max_frame_size: usize,
    /// Most frames in one client message; more closes 1009.
    pub max_fragments: u32,
    /// Pings and pongs per second one client may send; more closes 1008. 0 = no limit.
    pub max_control_rate: u32,
    /// Time a client has to finish a message it started; `None`: no limit.
    pub message_timeout: Option<Duration>,
    /// Longest a queued byte may wait to be sent before the connection is
    /// closed (1008 for a WebSocket, 408 in HTTP): the bytes queued when a
    /// send epoch begins must all leave within it, so a client that reads
    /// but too slowly is cut too; `None`: no limit.
    pub send_timeout: Option<Duration>,
    /// TCP keepalive idle time on accepted sockets; `None`: off.
    pub tcp_keepalive: Option<Duration>,
    /// Process-wide budget for bytes held on behalf of connections.
    pub max_buffered_bytes: usize,
    /// Bytes queued in a worker's mailbox above which every publisher is
    /// held (not a flag: tests lower it to reach the mark with little data).
    pub mailbox_high_water: usize,
    /// How far behind a worker's deliveries may fall before every
    /// publisher is held ([`MAILBOX_HIGH_LAG`]; not a flag, like the mark).
    pub mailbox_high_lag: Duration,
    /// Slots of each io_uring ring's fixed-file table, below the open-file
    /// limit that caps it (not a flag: tests lower it to fill rings, and
    /// so start overflow workers, with few connections).
    pub ring_slots: Option<u32>,
    /// TLS on the main listener (wss://, https://): the certificate and
    /// key files; `None` serves plain ws:// and http://.
    pub tls: Option<crate::server::tls::TlsSettings>,
    /// Tokens (`--jwt-key`, `--jwks`): who may subscribe and publish;
    /// `None`: anyone may subscribe, `publish_token` guards publishing.
    pub jwt: Option<crate::server::auth::JwtSettings>,
    /// With `tls`: also serve plain ws:// and http:// on this address (one
    /// more worker per core, on its own listener group).
    pub plain_listen: Option<SocketAddr>,
    /// The main listener's connections start with a PROXY protocol header.
    pub proxy_protocol: bool,
    /// The `plain_listen` listener's connections start with one.
    pub plain_proxy_protocol: bool,
    /// A cluster over NATS (`--nats-url`); `None`: this process alone.
    pub cluster: Option<crate::server::cluster::ClusterSettings>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9001)),
            workers: 0,
            pin: PinMode::Auto,
            io: IoMode::Auto,
            max_message_size: DEFAULT_MAX_MESSAGE_BYTES,
            max_handshake_size: DEFAULT_MAX_HEAD_BYTES,
            max_outbound_bytes: DEFAULT_MAX_OUTBOUND_BYTES,
            subprotocols: Vec::new(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_topics_per_conn: DEFAULT_MAX_TOPICS_PER_CONN,
            max_patterns_per_conn: DEFAULT_MAX_PATTERNS_PER_CONN,
            max_topic_len: DEFAULT_MAX_TOPIC_LEN,
            history: crate::pubsub::history::HistoryLimits::default(),
            retained_topics: crate::pubsub::directory::DEFAULT_RETAINED_TOPICS,
            last_value: true,
            permessage_deflate: true,
            namespaces: Vec::new(),
            slow_consumer: SlowConsumerPolicy::Disconnect,
            ping_interval: Some(DEFAULT_PING_INTERVAL),
            ping_timeout: DEFAULT_PING_TIMEOUT,
            admin_listen: None,
            publish_token: None,
            allowed_origins: Vec::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: 0,
            max_connect_rate_per_ip: 0,
            max_publish_rate: 0,
            max_recovery_rate: DEFAULT_MAX_RECOVERY_RATE,
            ipv6_prefix_len: DEFAULT_IPV6_PREFIX_LEN,
            max_frame_size: DEFAULT_MAX_FRAME_BYTES,
            max_fragments: DEFAULT_MAX_FRAGMENTS,
            max_control_rate: DEFAULT_MAX_CONTROL_RATE,
            message_timeout: Some(DEFAULT_MESSAGE_TIMEOUT),
            send_timeout: Some(DEFAULT_SEND_TIMEOUT),
            tcp_keepalive: Some(DEFAULT_TCP_KEEPALIVE),
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
            mailbox_high_water: MAILBOX_HIGH_WATER,
            mailbox_high_lag: MAILBOX_HIGH_LAG,
            ring_slots: None,
            tls: None,
            jwt: None,
            plain_listen: None,
            proxy_protocol: false,
            plain_proxy_protocol: false,
            cluster: None,
        }
    }
}

impl Config {
    /// What every WebSocket enforces on its client's frames.
    pub fn ws_limits(&self) -> WsLimits {
        WsLimits {
            max_message: self.max_message_size as u64,
            max_frame: self.max_frame_size.min(self.max_message_size) as u64,
            max_fragments: self.max_fragments.max(1),
            control_rate: self.max_control_rate,
        }
    }

    /// What a subscriber's WebSocket enforces: its messages are control
    /// messages, so nothing longer than one is ever buffered.
    pub fn subscriber_limits(&self) -> WsLimits {
        let max = self
            .max_message_size
            .min(crate::pubsub::control::MAX_CONTROL_BYTES) as u64;
        let limits = self.ws_limits();
        WsLimits {
            max_message: max,
            max_frame: limits.max_frame.min(max),
            ..limits
        }
    }

    /// The admission limits.
    pub fn admission_limits(&self) -> AdmissionLimits {
        AdmissionLimits {
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            connect_rate_per_ip: self.max_connect_rate_per_ip,
            publish_rate_per_ip: self.max_publish_rate,
            ipv6_prefix_len: self.ipv6_prefix_len,
        }
    }

    /// Each worker's share of the buffer budget.
    pub fn buffered_bytes_per_worker(&self) -> usize {
        self.max_buffered_bytes / self.worker_count().max(1)
    }

    /// The worker count after resolving 0 to the number of available cores.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// Reads at most `max + 1` bytes of the regular file at `path` (a caller
/// that gets more than `max` refuses the file): the file is opened without
/// blocking and must be a regular file, so a FIFO, a device (`/dev/zero`)
/// or a file still growing is neither waited on nor read without bound,
/// at start or on a reload.
pub fn read_regular_file(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut data = Vec::new();
    file.take(max + 1).read_to_end(&mut data)?;
    Ok(data)
}

#[cfg(test)]
mod read_tests {
    use super::read_regular_file;

    #[test]
    fn a_fifo_or_a_device_is_refused_and_a_long_file_read_only_past_its_bound() {
        let dir = std::env::temp_dir().join(format!("corecast-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path and writes nothing.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_regular_file(&fifo, 10).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(read_regular_file(std::path::Path::new("/dev/zero"), 10).is_err());
        let long = dir.join("long");
        std::fs::write(&long, vec![b'x'; 100]).unwrap();
        assert_eq!(read_regular_file(&long, 10).unwrap().len(), 11);
        assert_eq!(read_regular_file(&long, 100).unwrap().len(), 100);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
