//! Command-line interface: `corecast serve ...`.

use crate::proto::handshake::DEFAULT_MAX_HEAD_BYTES;
use crate::proto::ws::{
    DEFAULT_MAX_CONTROL_RATE, DEFAULT_MAX_FRAGMENTS, DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
};
use crate::pubsub::directory::DEFAULT_RETAINED_TOPICS;
use crate::pubsub::history::{
    DEFAULT_HISTORY_BYTES, DEFAULT_HISTORY_MEMORY, DEFAULT_HISTORY_SIZE, HistoryLimits,
};
use crate::pubsub::topic::{
    DEFAULT_MAX_PATTERNS_PER_CONN, DEFAULT_MAX_TOPIC_LEN, DEFAULT_MAX_TOPICS_PER_CONN,
};
use crate::server::Config;
use crate::server::admission::DEFAULT_MAX_CONNECTIONS;
use crate::server::config::{
    DEFAULT_DRAIN_TIMEOUT, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_IPV6_PREFIX_LEN,
    DEFAULT_MAX_BUFFERED_BYTES, DEFAULT_MAX_OUTBOUND_BYTES, DEFAULT_MESSAGE_TIMEOUT,
    DEFAULT_PING_INTERVAL, DEFAULT_PING_TIMEOUT, DEFAULT_TCP_KEEPALIVE, IoMode, PinMode,
    SlowConsumerPolicy,
};
use crate::server::tls::{MinVersion, TlsSettings};
use clap::{Args, Parser, Subcommand, value_parser};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// corecast: a thread-per-core WebSocket push server (RFC 6455).
#[derive(Debug, Parser)]
#[command(name = "corecast", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server until SIGINT or SIGTERM.
    Serve(ServeArgs),
}

/// Flags of `corecast serve`. Sizes accept a suffix (`KiB`, `MiB`, `GiB`, or
/// `K`, `M`, `G`), durations a unit (`ms`, `s`, `m`).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A TOML file of settings: each key a flag's long name without `--`
    /// (`max-connections = 500000`; a repeatable flag takes a list, a
    /// switch `true`/`false`). Flags given here win over the file; SIGHUP
    /// reads it again (see README "Configuration file").
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to listen on; every worker binds it with SO_REUSEPORT.
    #[arg(long, default_value = "0.0.0.0:9001", value_name = "ADDR")]
    pub listen: SocketAddr,

    /// Worker threads (event loops); 0 = one per available core.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub workers: usize,

    /// Pin worker threads to cores: `auto` (only when the process was
    /// given fewer CPUs than the machine has, e.g. by a cpuset or taskset),
    /// `always` or `never`.
    #[arg(long, default_value = "auto", value_parser = parse_pin, value_name = "MODE")]
    pub pin: PinMode,

    /// The same as `--pin never`.
    #[arg(long, conflicts_with = "pin")]
    pub no_pin: bool,

    /// Largest message a client may send (after reassembly); larger closes with 1009.
    #[arg(long, default_value_t = DEFAULT_MAX_MESSAGE_BYTES, value_parser = parse_limit_size, value_name = "BYTES")]
    pub max_message_size: usize,

    /// Largest HTTP request head; larger is answered 431 (capped at 32 KiB).
    #[arg(long, default_value_t = DEFAULT_MAX_HEAD_BYTES, value_parser = parse_head_size, value_name = "BYTES")]
    pub max_handshake_size: usize,

    /// Per-connection bound on queued outbound bytes. A subscriber over it is
    /// handled by --slow-consumer; an echo client is not read until its queue
    /// drains to half.
    #[arg(long, default_value_t = DEFAULT_MAX_OUTBOUND_BYTES, value_parser = parse_limit_size, value_name = "BYTES")]
    pub max_outbound_bytes: usize,

    /// A subprotocol the server accepts (repeat, in order of preference).
    #[arg(long = "subprotocol", value_name = "NAME")]
    pub subprotocols: Vec<String>,

    /// Time a client has to send its complete request head.
    #[arg(long, default_value = "10s", value_parser = parse_limit_duration, value_name = "DURATION")]
    pub handshake_timeout: Duration,

    /// On SIGINT/SIGTERM, how long to wait for clients to finish closing.
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub drain_timeout: Duration,

    /// I/O backend: `uring` (io_uring), `epoll`, or `auto` (io_uring when the
    /// kernel supports everything it uses, else epoll).
    #[arg(long, default_value = "auto", value_parser = parse_io, value_name = "BACKEND")]
    pub io: IoMode,

    /// What to do with a subscriber whose queue would pass --max-outbound-bytes:
    /// `disconnect` (close 1008 "slow consumer"), `drop-newest` (skip the message for it),
    /// `conflate` (keep only each topic's newest waiting publication for it) or
    /// `always` (conflate at all times).
    #[arg(long, default_value = "disconnect", value_parser = parse_policy, value_name = "POLICY")]
    pub slow_consumer: SlowConsumerPolicy,

    /// Most topics one subscriber connection may hold.
    #[arg(long, default_value_t = DEFAULT_MAX_TOPICS_PER_CONN, value_name = "N")]
    pub max_topics_per_conn: usize,

    /// Most patterns (`prices.*.EUR`, `news.>`) among them.
    #[arg(long, default_value_t = DEFAULT_MAX_PATTERNS_PER_CONN, value_name = "N")]
    pub max_patterns_per_conn: usize,

    /// Longest topic name, in bytes (1 to 65535).
    #[arg(long, default_value_t = DEFAULT_MAX_TOPIC_LEN, value_parser = parse_topic_len, value_name = "BYTES")]
    pub max_topic_len: usize,

    /// Messages each topic keeps for recovery (`since`); 0 turns history
    /// and recovery off.
    #[arg(long, default_value_t = DEFAULT_HISTORY_SIZE, value_name = "N")]
    pub history_size: usize,

    /// Bytes each topic's history may hold (frames plus 288 B each).
    #[arg(long, default_value_t = DEFAULT_HISTORY_BYTES, value_parser = parse_size, value_name = "BYTES")]
    pub history_bytes: usize,

    /// Age of the oldest message a history keeps (the newest, the last
    /// value, stays while the topic is held); a topic nobody holds is
    /// forgotten once even its newest message is this old.
    #[arg(long, default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    pub history_age: Duration,

    /// Bytes all histories together may hold.
    #[arg(long, default_value_t = DEFAULT_HISTORY_MEMORY, value_parser = parse_size, value_name = "BYTES")]
    pub history_memory: usize,

    /// Most topics kept for their history after their last subscriber
    /// and publisher left (the oldest goes first).
    #[arg(long, default_value_t = DEFAULT_RETAINED_TOPICS, value_name = "N")]
    pub retained_topics: usize,

    /// Do not send a topic's newest publication (its last value, marked as
    /// a snapshot) to each new enveloped subscriber.
    #[arg(long)]
    pub no_last_value: bool,

    /// Do not agree to permessage-deflate (RFC 7692) with clients that
    /// offer it: every frame goes uncompressed.
    #[arg(long)]
    pub no_permessage_deflate: bool,

    /// Ping a connection after this long without input; 0 disables keepalive.
    #[arg(long, default_value = "30s", value_parser = parse_timer, value_name = "DURATION")]
    pub ping_interval: Duration,

    /// Close (1001 "keepalive timeout") a pinged connection that sends nothing for this long
    /// (counted again from each write it takes: a ping behind a backlog waits for the client).
    #[arg(long, default_value = "10s", value_parser = parse_limit_timer, value_name = "DURATION")]
    pub ping_timeout: Duration,

    /// Serve /metrics and /healthz on this address instead of the main port.
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,

    /// Shared secret publishers must present (`Authorization: Bearer TOKEN` or
    /// `?token=TOKEN`); unset = publishing is open.
    #[arg(
        long,
        env = "CORECAST_PUBLISH_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub publish_token: Option<String>,

    /// A web origin whose pages may open WebSockets and publish through a
    /// visitor's browser (repeat): `https://app.example`, `*.example.com`
    /// (its subdomains), `http://localhost:*` (any port), `null`, or `*`.
    /// A browser request from another origin gets `403`; a request without
    /// `Origin` (not from a browser) is not affected. None given: every
    /// origin. Reloaded with the configuration file (docs/PROTOCOL.md "Origins").
    #[arg(long = "allowed-origin", value_name = "ORIGIN", value_parser = crate::server::origin::parse_pattern)]
    pub allowed_origins: Vec<String>,

    /// A key that verifies the JSON Web Tokens of subscribers and
    /// publishers (repeat): `[KID@]ALG=FILE`, ALG one of HS256 HS384 HS512
    /// (FILE holds the secret, at least 32 bytes), RS256 RS384 RS512 PS256
    /// PS384 PS512 ES256 ES384 EdDSA (FILE: a PEM public key). Each key
    /// verifies its algorithm only. With a key or `--jwks`, subscribing
    /// and publishing need a token (docs/PROTOCOL.md "Tokens").
    #[arg(long = "jwt-key", value_name = "[KID@]ALG=FILE", value_parser = crate::server::auth::parse_key_spec)]
    pub jwt_keys: Vec<String>,

    /// A JSON Web Key Set of token keys, each naming its `alg` (and maybe
    /// a `kid`): a file, or an `http://` or `https://` URL, which a
    /// background thread fetches at start, every 10 minutes, when a token
    /// names a `kid` the set lacks (at most once per 30 s) and at each
    /// reload; a failed fetch keeps the keys in force. `https` trusts the
    /// system's roots (`SSL_CERT_FILE`, `SSL_CERT_DIR`). Beside
    /// `--jwt-key`, both sets of keys are used (docs/PROTOCOL.md "Tokens").
    #[arg(long, value_name = "FILE|URL", value_parser = crate::server::auth::parse_jwks)]
    pub jwks: Option<crate::server::auth::JwksSource>,

    /// Tokens must name this audience (`aud`; repeat for several).
    #[arg(long = "jwt-audience", value_name = "AUD")]
    pub jwt_audiences: Vec<String>,

    /// Tokens must name this issuer (`iss`; repeat for several).
    #[arg(long = "jwt-issuer", value_name = "ISS")]
    pub jwt_issuers: Vec<String>,

    /// Slack allowed on a token's `exp`, `nbf` and `iat` for clock skew.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub jwt_leeway: Duration,

    /// With tokens: subscribers without one may subscribe (to anything;
    /// publishing still needs a token or `--publish-token`).
    #[arg(long)]
    pub anonymous_subscribe: bool,

    /// Most open connections in the process; more are answered
    /// `503 Service Unavailable` with `Retry-After`.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = parse_limit, value_name = "N")]
    pub max_connections: usize,

    /// Most open connections from one source address (503 over it); 0 = no
    /// limit. Off by default: clients behind a proxy or NAT share an address.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub max_connections_per_ip: u32,

    /// New connections per second from one source address, with a burst of
    /// one second's worth (503 over it); 0 = no limit.
    #[arg(long, default_value_t = 0, value_name = "PER_SECOND")]
    pub max_connect_rate_per_ip: u32,

    /// Messages per second one publisher may publish: an HTTP publisher's
    /// address over it gets 429 with Retry-After; a WebSocket publisher is
    /// paced (not read until it is back under the rate). 0 = no limit.
    #[arg(long, default_value_t = 0, value_name = "PER_SECOND")]
    pub max_publish_rate: u32,

    /// Subscribes with `since` each worker admits per second (burst: one
    /// second's worth; in a cluster each topic whose history must first be
    /// read from the stream counts one more, in a `history` request too);
    /// one over it is answered "recovery busy" with a retry delay and
    /// changes nothing. 0 = no limit.
    #[arg(long, default_value_t = crate::server::config::DEFAULT_MAX_RECOVERY_RATE, value_name = "PER_SECOND")]
    pub max_recovery_rate: u32,

    /// Leading bits of an IPv6 address that make one source address for
    /// --max-connections-per-ip, --max-connect-rate-per-ip and the HTTP
    /// --max-publish-rate (1 to 128; 128 = each address alone). The default
    /// /64 is the smallest network an IPv6 site is given, and its owner can
    /// use every address in it. IPv4 (also IPv4-mapped IPv6) counts per address.
    #[arg(long, default_value_t = DEFAULT_IPV6_PREFIX_LEN, value_parser = value_parser!(u8).range(1..=128), value_name = "BITS")]
    pub ipv6_prefix_len: u8,

    /// Largest frame payload a client may send; larger closes with 1009.
    #[arg(long, default_value_t = DEFAULT_MAX_FRAME_BYTES, value_parser = parse_limit_size, value_name = "BYTES")]
    pub max_frame_size: usize,

    /// Most frames (fragments) in one client message; more closes with 1009.
    #[arg(long, default_value_t = DEFAULT_MAX_FRAGMENTS, value_parser = value_parser!(u32).range(1..), value_name = "N")]
    pub max_fragments: u32,

    /// Pings, pongs and token refreshes one client may send per second (burst: one second's
    /// worth); more closes with 1008. 0 = no limit.
    #[arg(long, default_value_t = DEFAULT_MAX_CONTROL_RATE, value_name = "PER_SECOND")]
    pub max_control_rate: u32,

    /// Time a client has to finish a message it started; over it closes with
    /// 1008 "message not finished in time". 0 disables.
    #[arg(long, default_value = "30s", value_parser = parse_timer, value_name = "DURATION")]
    pub message_timeout: Duration,

    /// Longest a byte queued for a client may wait to be sent: a client
    /// that stops reading, or reads too slowly to ever catch up (the bytes
    /// queued when a check begins must all have left within this time), is
    /// closed, with 1008 "send timeout" for a WebSocket and 408 in HTTP;
    /// applies in every state, paused or not. 0 disables.
    #[arg(long, default_value = "30s", value_parser = parse_timer, value_name = "DURATION")]
    pub send_timeout: Duration,

    /// TCP keepalive idle time on accepted sockets (probes every 10 s, 6
    /// unanswered close the socket); 0 disables.
    #[arg(long, default_value = "60s", value_parser = parse_tcp_keepalive, value_name = "DURATION")]
    pub tcp_keepalive: Duration,

    /// Process-wide budget for bytes held on behalf of connections (partial
    /// requests and messages, queued replies, copied frames). A connection
    /// that would grow past it is closed with 1013 (or refused with 503).
    #[arg(long, default_value_t = DEFAULT_MAX_BUFFERED_BYTES, value_parser = parse_budget_size, value_name = "BYTES")]
    pub max_buffered_bytes: usize,

    /// Serve TLS (wss://, https://) on the main listener with this
    /// certificate chain (PEM, the server's certificate first). Needs
    /// --tls-key. `SIGHUP` reloads both files.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// With --tls-cert: also serve plain ws:// and http:// on this address
    /// (one more worker per core; topics are shared with the TLS side).
    #[arg(long, value_name = "ADDR", requires = "tls_cert")]
    pub plain_listen: Option<SocketAddr>,

    /// The main listener (--listen) expects a PROXY protocol header (v1 or
    /// v2, from HAProxy, nginx, AWS NLB, …) before each connection's first
    /// byte, and takes the client's address from it: per-address limits
    /// count that address. A connection without one is refused (400).
    /// Only for a port that nothing but the balancer can reach.
    #[arg(long)]
    pub proxy_protocol: bool,

    /// The same as --proxy-protocol, for --plain-listen.
    #[arg(long, requires = "plain_listen")]
    pub plain_proxy_protocol: bool,

    /// The lowest TLS version a client may use.
    #[arg(long, value_enum, default_value = "1.2", value_name = "VERSION")]
    pub tls_min_version: MinVersion,

    /// Join a cluster of corecast nodes over NATS with JetStream
    /// (`nats://HOST:PORT`, `tls://HOST:PORT`; repeat, or a comma-separated
    /// list, for several servers of one NATS cluster; `user:pass@` or
    /// `token@` in the URL authenticate). A publication made on any node
    /// reaches subscribers on every node, in one order per topic, with
    /// the same epochs and numbers everywhere (README "Cluster").
    #[arg(long = "nats-url", value_name = "URL", value_delimiter = ',', value_parser = crate::server::cluster::parse_url)]
    pub nats_urls: Vec<String>,

    /// A NATS credentials file (JWT and nkey seed) for --nats-url.
    #[arg(long = "nats-credentials", value_name = "FILE", requires = "nats_urls")]
    pub nats_credentials: Option<std::path::PathBuf>,

    /// A PEM file of certificate authorities to trust for tls:// NATS
    /// URLs (beside the system's roots).
    #[arg(long = "nats-ca", value_name = "FILE", requires = "nats_urls")]
    pub nats_ca: Option<std::path::PathBuf>,

    /// Most bytes of publications a node holds for the cluster while
    /// NATS has not stored them yet (NATS slow or unreachable); past it,
    /// publishing is refused (HTTP 503, a WebSocket publisher closed 1013).
    #[arg(long, default_value = "64MiB", value_parser = parse_size, value_name = "BYTES")]
    pub nats_max_pending: usize,

    /// Replicas of the cluster's JetStream stream (with a NATS cluster of
    /// at least as many servers), set when a node creates it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5), value_name = "N")]
    pub nats_replicas: u8,
}

impl ServeArgs {
    /// The server configuration these flags describe.
    pub fn to_config(&self) -> Config {
        Config {
            listen: self.listen,
            workers: self.workers,
            pin: if self.no_pin {
                PinMode::Never
            } else {
                self.pin
            },
            io: self.io,
            max_message_size: self.max_message_size,
            max_handshake_size: self.max_handshake_size,
            max_outbound_bytes: self.max_outbound_bytes,
            subprotocols: self.subprotocols.clone(),
            handshake_timeout: self.handshake_timeout,
            drain_timeout: self.drain_timeout,
            max_topics_per_conn: self.max_topics_per_conn,
            max_patterns_per_conn: self.max_patterns_per_conn,
            max_topic_len: self.max_topic_len,
            history: HistoryLimits {
                size: self.history_size,
                bytes: self.history_bytes,
                age: self.history_age,
                memory: self.history_memory,
            },
            retained_topics: self.retained_topics,
            last_value: !self.no_last_value,
            permessage_deflate: !self.no_permessage_deflate,
            slow_consumer: self.slow_consumer,
            ping_interval: (!self.ping_interval.is_zero()).then_some(self.ping_interval),
            ping_timeout: self.ping_timeout,
            admin_listen: self.admin_listen,
            publish_token: self.publish_token.clone().filter(|t| !t.is_empty()),
            allowed_origins: self.allowed_origins.clone(),
            jwt: (!self.jwt_keys.is_empty() || self.jwks.is_some()).then(|| {
                crate::server::auth::JwtSettings {
                    keys: self.jwt_keys.clone(),
                    jwks: self.jwks.clone(),
                    audience: self.jwt_audiences.clone(),
                    issuer: self.jwt_issuers.clone(),
                    leeway: self.jwt_leeway,
                    anonymous_subscribe: self.anonymous_subscribe,
                }
            }),
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            max_connect_rate_per_ip: self.max_connect_rate_per_ip,
            max_publish_rate: self.max_publish_rate,
            max_recovery_rate: self.max_recovery_rate,
            ipv6_prefix_len: self.ipv6_prefix_len,
            max_frame_size: self.max_frame_size,
            max_fragments: self.max_fragments,
            max_control_rate: self.max_control_rate,
            message_timeout: (!self.message_timeout.is_zero()).then_some(self.message_timeout),
            send_timeout: (!self.send_timeout.is_zero()).then_some(self.send_timeout),
            tcp_keepalive: (!self.tcp_keepalive.is_zero()).then_some(self.tcp_keepalive),
            max_buffered_bytes: self.max_buffered_bytes,
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(TlsSettings {
                    cert: cert.clone(),
                    key: key.clone(),
                    min_version: self.tls_min_version,
                }),
                _ => None,
            },
            plain_listen: self.plain_listen,
            proxy_protocol: self.proxy_protocol,
            plain_proxy_protocol: self.plain_proxy_protocol,
            cluster: (!self.nats_urls.is_empty()).then(|| {
                crate::server::cluster::ClusterSettings {
                    urls: self.nats_urls.clone(),
                    credentials: self.nats_credentials.clone(),
                    ca: self.nats_ca.clone(),
                    max_pending: self.nats_max_pending,
                    replicas: self.nats_replicas,
                    buffered: crate::server::cluster::NATS_BUFFERED,
                }
            }),
            ..Config::default()
        }
    }
}

// The defaults shown in --help come from the same constants as `Config::default`.
const _: () = assert!(
    DEFAULT_HANDSHAKE_TIMEOUT.as_secs() == 10
        && DEFAULT_DRAIN_TIMEOUT.as_secs() == 5
        && DEFAULT_PING_INTERVAL.as_secs() == 30
        && DEFAULT_PING_TIMEOUT.as_secs() == 10
        && DEFAULT_MESSAGE_TIMEOUT.as_secs() == 30
        && DEFAULT_TCP_KEEPALIVE.as_secs() == 60
        && crate::pubsub::history::DEFAULT_HISTORY_AGE.as_secs() == 300
);

/// Parses `auto`, `always` or `never`.
pub fn parse_pin(s: &str) -> Result<PinMode, String> {
    match s {
        "auto" => Ok(PinMode::Auto),
        "always" => Ok(PinMode::Always),
        "never" => Ok(PinMode::Never),
        _ => Err(format!(
            "unknown pinning mode {s:?}; expected auto, always or never"
        )),
    }
}

/// Parses `auto`, `epoll` or `uring`.
pub fn parse_io(s: &str) -> Result<IoMode, String> {
    match s {
        "auto" => Ok(IoMode::Auto),
        "epoll" => Ok(IoMode::Epoll),
        "uring" | "io_uring" | "io-uring" => Ok(IoMode::Uring),
        _ => Err(format!(
            "unknown I/O backend {s:?}; expected auto, epoll or uring"
        )),
    }
}

/// Parses `disconnect`, `drop-newest`, `conflate` or `always`.
pub fn parse_policy(s: &str) -> Result<SlowConsumerPolicy, String> {
    SlowConsumerPolicy::parse(s)
}

/// Parses a topic length limit: 1 to 65535 (the binary envelope's field).
pub fn parse_topic_len(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n @ 1..=65_535) => Ok(n),
        _ => Err(format!("invalid topic length {s:?}: expected 1 to 65535")),
    }
}

/// Parses `4096`, `64K`, `64KiB`, `16M`, `16MiB`, `1G` (binary multiples).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 4096, 64KiB, 16MiB"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("invalid size unit {other:?}: use KiB, MiB or GiB")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

/// A limit's size ([`parse_size`]) that must let something through: 0
/// would refuse every client (every message over it, every request head,
/// every queue), and is not "no limit" as it is for the per-address and
/// rate flags, so it is refused at start rather than taken.
pub fn parse_limit_size(s: &str) -> Result<usize, String> {
    match parse_size(s)? {
        0 => Err(format!(
            "{s:?}: 0 would refuse every client (this limit has no \"off\"; give a size)"
        )),
        n => Ok(n),
    }
}

/// The smallest `--max-handshake-size`: a browser's upgrade request is
/// 400 to 1 500 bytes before its cookies.
pub const MIN_HEAD_BYTES: usize = 1024;

/// The smallest `--max-buffered-bytes`: below it a worker's share cannot
/// hold a few clients' buffers (a subscriber's 64 KiB read buffer, a
/// queued reply), and every client would be closed `1013`.
pub const MIN_BUFFERED_BYTES: usize = 1024 * 1024;

/// `--max-handshake-size`: at least [`MIN_HEAD_BYTES`] (an outside probe
/// started the server with 1 byte, and every request was answered `431`).
pub fn parse_head_size(s: &str) -> Result<usize, String> {
    match parse_size(s)? {
        n if n < MIN_HEAD_BYTES => Err(format!(
            "{s:?}: below 1KiB would refuse every browser's upgrade request (400 to 1500 bytes before cookies)"
        )),
        n => Ok(n),
    }
}

/// `--max-buffered-bytes`: at least [`MIN_BUFFERED_BYTES`] (an outside
/// probe started the server with 1 byte, and every client was closed
/// `1013` at its first message).
pub fn parse_budget_size(s: &str) -> Result<usize, String> {
    match parse_size(s)? {
        n if n < MIN_BUFFERED_BYTES => Err(format!(
            "{s:?}: below 1MiB the budget could not hold a few clients' buffers, and every client would be closed 1013"
        )),
        n => Ok(n),
    }
}

/// A count limit that must let something through (see
/// [`parse_limit_size`]).
pub fn parse_limit(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err(format!(
            "{s:?}: 0 would refuse every client (this limit has no \"off\"; give a number)"
        )),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("invalid number {s:?}")),
    }
}

/// A deadline that must leave the client some time ([`parse_duration`]):
/// 0 would close every connection it covers at once.
pub fn parse_limit_duration(s: &str) -> Result<Duration, String> {
    nonzero_deadline(s, parse_duration(s)?)
}

/// [`parse_limit_duration`] for a per-connection timer ([`parse_timer`]).
pub fn parse_limit_timer(s: &str) -> Result<Duration, String> {
    nonzero_deadline(s, parse_timer(s)?)
}

fn nonzero_deadline(s: &str, d: Duration) -> Result<Duration, String> {
    if d.is_zero() {
        return Err(format!(
            "{s:?}: 0 would close every connection at once (this deadline has no \"off\"; give a time)"
        ));
    }
    Ok(d)
}

/// The longest duration any setting takes: a year. Past it a deadline
/// added to the clock could overflow it.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The longest of the per-connection timers (`--ping-interval`,
/// `--ping-timeout`, `--message-timeout`, `--send-timeout`): 24 days, as
/// the workers keep their times in 32-bit milliseconds (elapsed times are
/// exact up to 2^31 ms).
pub const MAX_TIMER: Duration = Duration::from_secs(24 * 24 * 3600);

/// Parses `250ms`, `10s`, `2m`; a bare number is seconds. At most
/// [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 10s, 2m"))?;
    let d = match unit {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        other => return Err(format!("invalid duration unit {other:?}: use ms, s or m")),
    };
    d.filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| format!("duration {s:?} is over a year (525600m)"))
}

/// A per-connection timer: [`parse_duration`], at most [`MAX_TIMER`].
pub fn parse_timer(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d > MAX_TIMER {
        return Err(format!("{s:?} is over 24 days (34560m)"));
    }
    Ok(d)
}

/// `--tcp-keepalive`: 0 (off) or whole seconds from 1 to 32767, what
/// Linux takes for `TCP_KEEPIDLE`.
pub fn parse_tcp_keepalive(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Ok(d);
    }
    if d.subsec_nanos() != 0 || !(1..=32767).contains(&d.as_secs()) {
        return Err(format!(
            "{s:?}: the TCP keepalive idle time is 0 (off) or whole seconds from 1s to 32767s"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert_eq!(parse_size("1gib"), Ok(1 << 30));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("1h").is_err());
        assert_eq!(parse_duration("525600m"), Ok(MAX_DURATION));
        // Outside probe: `n * 60` wrapped in a release build, and a huge
        // `--drain-timeout` overflowed the clock when added to it.
        for over in [
            "525601m",
            "3381903080180084463m",
            "9223372036854775807s",
            "18446744073709551615ms",
            "99999999999999999999",
        ] {
            assert!(parse_duration(over).is_err(), "{over}");
        }
        assert_eq!(parse_timer("34560m"), Ok(MAX_TIMER));
        assert!(parse_timer("34561m").is_err());
        assert_eq!(parse_tcp_keepalive("0"), Ok(Duration::ZERO));
        assert_eq!(
            parse_tcp_keepalive("32767s"),
            Ok(Duration::from_secs(32767))
        );
        for bad in ["32768s", "500ms", "1500ms", "600m"] {
            assert!(parse_tcp_keepalive(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_timer_flag_is_bounded_by_its_parser() {
        for (flag, over) in [
            ("--ping-interval", "34561m"),
            ("--ping-timeout", "34561m"),
            ("--message-timeout", "34561m"),
            ("--send-timeout", "34561m"),
            ("--tcp-keepalive", "32768s"),
            ("--drain-timeout", "9223372036854775807s"),
            ("--handshake-timeout", "525601m"),
            ("--history-age", "525601m"),
            ("--jwt-leeway", "525601m"),
        ] {
            let r = Cli::try_parse_from(["corecast", "serve", flag, over]);
            assert!(r.is_err(), "{flag} {over} accepted");
        }
    }

    /// A limit with no "off" refuses 0 at start, with the reason, instead
    /// of starting a server that refuses every client (`--max-connections
    /// 0` read as "no limit" answered every client 503; a 0 handshake
    /// timeout closed every connection at once).
    #[test]
    fn limits_without_an_off_refuse_zero_and_take_one() {
        for flag in [
            "--max-message-size",
            "--max-outbound-bytes",
            "--max-frame-size",
            "--max-connections",
            "--max-fragments",
            "--handshake-timeout",
            "--ping-timeout",
        ] {
            let timer = flag.ends_with("timeout");
            let size = flag.ends_with("size") || flag.ends_with("bytes");
            let other = [(timer, "0ms"), (size, "0KiB")].into_iter().filter(|o| o.0);
            for zero in std::iter::once("0").chain(other.map(|o| o.1)) {
                let err = Cli::try_parse_from(["corecast", "serve", flag, zero])
                    .err()
                    .unwrap_or_else(|| panic!("{flag} {zero} accepted"))
                    .to_string();
                assert!(err.contains(flag), "{flag} {zero}: {err}");
                assert!(
                    err.contains("0 would") || err.contains("1.."),
                    "{flag} {zero}: the reason is given: {err}"
                );
            }
            let one = if timer { "1ms" } else { "1" };
            assert!(
                Cli::try_parse_from(["corecast", "serve", flag, one]).is_ok(),
                "{flag} {one} refused"
            );
        }
        // The flags whose 0 means "off" still take it.
        for flag in [
            "--max-connections-per-ip",
            "--max-publish-rate",
            "--max-control-rate",
            "--message-timeout",
            "--send-timeout",
            "--ping-interval",
            "--history-size",
        ] {
            assert!(
                Cli::try_parse_from(["corecast", "serve", flag, "0"]).is_ok(),
                "{flag} 0 refused"
            );
        }
    }

    /// Two limits have a floor above 0: a request head of a few bytes, or
    /// a budget of one, refused or closed every client (outside probe).
    #[test]
    fn the_head_and_budget_limits_refuse_values_that_serve_nobody() {
        for (flag, below, floor, why) in [
            (
                "--max-handshake-size",
                ["0", "1", "1023"],
                "1KiB",
                "below 1KiB",
            ),
            (
                "--max-buffered-bytes",
                ["0", "1", "1048575"],
                "1MiB",
                "below 1MiB",
            ),
        ] {
            for bad in below {
                let err = Cli::try_parse_from(["corecast", "serve", flag, bad])
                    .err()
                    .unwrap_or_else(|| panic!("{flag} {bad} accepted"))
                    .to_string();
                assert!(
                    err.contains(flag) && err.contains(why),
                    "{flag} {bad}: {err}"
                );
            }
            assert!(
                Cli::try_parse_from(["corecast", "serve", flag, floor]).is_ok(),
                "{flag} {floor} refused"
            );
        }
    }

    #[test]
    fn defaults_match_config_defaults() {
        let cli = Cli::try_parse_from(["corecast", "serve"]).unwrap();
        let Command::Serve(args) = cli.command;
        let c = args.to_config();
        let d = Config::default();
        assert_eq!(c.listen, d.listen);
        assert_eq!(c.workers, d.workers);
        assert_eq!(c.pin, d.pin);
        assert_eq!(c.max_message_size, d.max_message_size);
        assert_eq!(c.max_handshake_size, d.max_handshake_size);
        assert_eq!(c.max_outbound_bytes, d.max_outbound_bytes);
        assert_eq!(c.handshake_timeout, d.handshake_timeout);
        assert_eq!(c.drain_timeout, d.drain_timeout);
        assert_eq!(c.slow_consumer, d.slow_consumer);
        assert_eq!(c.max_topics_per_conn, d.max_topics_per_conn);
        assert_eq!(c.max_patterns_per_conn, d.max_patterns_per_conn);
        assert_eq!(c.max_topic_len, d.max_topic_len);
        assert_eq!(c.ping_interval, d.ping_interval);
        assert_eq!(c.ping_timeout, d.ping_timeout);
        assert_eq!(c.admin_listen, d.admin_listen);
        assert_eq!(c.max_connections, d.max_connections);
        assert_eq!(c.max_connections_per_ip, d.max_connections_per_ip);
        assert_eq!(c.max_connect_rate_per_ip, d.max_connect_rate_per_ip);
        assert_eq!(c.max_publish_rate, d.max_publish_rate);
        assert_eq!(c.max_recovery_rate, d.max_recovery_rate);
        assert_eq!(c.ipv6_prefix_len, d.ipv6_prefix_len);
        assert_eq!(c.max_frame_size, d.max_frame_size);
        assert_eq!(c.max_fragments, d.max_fragments);
        assert_eq!(c.max_control_rate, d.max_control_rate);
        assert_eq!(c.message_timeout, d.message_timeout);
        assert_eq!(c.send_timeout, d.send_timeout);
        assert_eq!(c.tcp_keepalive, d.tcp_keepalive);
        assert_eq!(c.max_buffered_bytes, d.max_buffered_bytes);
    }

    #[test]
    fn pubsub_flags() {
        let cli = Cli::try_parse_from([
            "corecast",
            "serve",
            "--slow-consumer",
            "drop-newest",
            "--ping-interval",
            "0",
            "--publish-token",
            "s3cret",
            "--admin-listen",
            "127.0.0.1:9100",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command;
        let c = args.to_config();
        assert_eq!(c.slow_consumer, SlowConsumerPolicy::DropNewest);
        assert_eq!(c.ping_interval, None, "0 disables keepalive");
        assert_eq!(c.publish_token.as_deref(), Some("s3cret"));
        assert_eq!(c.admin_listen, Some("127.0.0.1:9100".parse().unwrap()));
        assert!(parse_policy("sometimes").is_err());
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "corecast",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "3",
            "--no-pin",
            "--max-message-size",
            "1MiB",
            "--subprotocol",
            "a",
            "--subprotocol",
            "b",
            "--drain-timeout",
            "100ms",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command;
        let c = args.to_config();
        assert_eq!(
            (c.workers, c.pin, c.max_message_size),
            (3, PinMode::Never, 1 << 20)
        );
        assert_eq!(c.subprotocols, vec!["a", "b"]);
        assert_eq!(c.drain_timeout, Duration::from_millis(100));
        assert!(Cli::try_parse_from(["corecast", "serve", "--workers", "x"]).is_err());
    }

    #[test]
    fn ipv6_prefix_len_takes_1_to_128_bits_and_names_the_range_otherwise() {
        let parse =
            |v: &str| Cli::try_parse_from(["corecast", "serve", &format!("--ipv6-prefix-len={v}")]);
        for ok in [1u8, 48, 64, 128] {
            let Command::Serve(args) = parse(&ok.to_string()).unwrap().command;
            assert_eq!(args.to_config().ipv6_prefix_len, ok);
            assert_eq!(args.to_config().admission_limits().ipv6_prefix_len, ok);
        }
        for bad in ["0", "129", "-1", "64bits", ""] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains("--ipv6-prefix-len"), "{bad}: {err}");
        }
        let err = parse("129").unwrap_err().to_string();
        assert!(err.contains("1..=128"), "the error names the range: {err}");
    }

    #[test]
    fn tls_flags_come_as_a_pair_and_plain_listen_needs_them() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["corecast", "serve"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv)
        };
        let Command::Serve(args) = parse(&[
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-min-version",
            "1.3",
            "--plain-listen",
            "127.0.0.1:9080",
        ])
        .unwrap()
        .command;
        let c = args.to_config();
        let tls = c.tls.expect("TLS configured");
        assert_eq!(
            (tls.cert.to_str(), tls.key.to_str()),
            (Some("c.pem"), Some("k.pem"))
        );
        assert_eq!(tls.min_version, crate::server::tls::MinVersion::Tls13);
        assert_eq!(c.plain_listen, Some("127.0.0.1:9080".parse().unwrap()));
        assert!(
            parse(&["--tls-cert", "c.pem"]).is_err(),
            "a certificate needs its key"
        );
        assert!(
            parse(&["--tls-key", "k.pem"]).is_err(),
            "a key needs its certificate"
        );
        assert!(
            parse(&["--plain-listen", "127.0.0.1:1"]).is_err(),
            "nothing to be beside"
        );
        let Command::Serve(args) = parse(&[]).unwrap().command;
        let c = args.to_config();
        assert!(c.tls.is_none());
        assert!(!c.proxy_protocol && !c.plain_proxy_protocol);
        assert!(
            parse(&["--plain-proxy-protocol"]).is_err(),
            "no plain listener to expect the header on"
        );
        let Command::Serve(args) = parse(&[
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--plain-listen",
            "127.0.0.1:9080",
            "--plain-proxy-protocol",
            "--proxy-protocol",
        ])
        .unwrap()
        .command;
        let c = args.to_config();
        assert!(c.proxy_protocol && c.plain_proxy_protocol);
    }

    #[test]
    fn help_documents_every_flag() {
        let mut cmd = Cli::command();
        let serve = cmd.find_subcommand_mut("serve").unwrap();
        let help = serve.render_long_help().to_string();
        for arg in serve.get_arguments() {
            if let Some(long) = arg.get_long() {
                assert!(
                    help.contains(&format!("--{long}")),
                    "--{long} missing from help"
                );
                assert!(arg.get_help().is_some(), "--{long} has no help text");
            }
        }
    }
}
