//! The validated plan of a run ([`Plan`]): what the parent hands every
//! shard (as JSON), so nothing here may be lost on the way.

use crate::topics::TopicDist;
use crate::url::WsUrl;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// A destination: URL and resolved address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub url: WsUrl,
    pub dst: SocketAddr,
}

/// How the publisher sends.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum PublishMode {
    /// K messages as fast as the server takes them.
    Burst { messages: u64 },
    /// `per_s` messages per second for `duration`.
    Rate { per_s: f64, duration: Duration },
}

impl PublishMode {
    /// Messages the run publishes.
    pub fn messages(&self) -> u64 {
        match *self {
            Self::Burst { messages } => messages,
            Self::Rate { per_s, duration } => (per_s * duration.as_secs_f64()).round() as u64,
        }
    }

    pub fn describe(&self) -> String {
        match *self {
            Self::Burst { messages } => format!("burst of {messages}"),
            Self::Rate { per_s, duration } => {
                format!("{per_s} messages/s for {} s", duration.as_secs())
            }
        }
    }
}

/// Validated connection parameters of a whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectPlan {
    pub targets: Vec<Target>,
    /// Empty: no explicit bind.
    pub sources: Vec<IpAddr>,
    pub connections: usize,
    /// Handshakes in flight, in total.
    pub in_flight: usize,
    pub processes: usize,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// How `wss://` connections set up TLS.
    #[serde(default)]
    pub tls: crate::client::tls::TlsPlan,
    /// Offered in every upgrade request.
    #[serde(default)]
    pub subprotocol: Option<String>,
    /// Offer permessage-deflate (RFC 7692) in every upgrade request
    /// (fanout's subscribers, `--permessage-deflate`).
    #[serde(default)]
    pub permessage_deflate: bool,
}

impl ConnectPlan {
    /// The connections of shard `i`: `(first, count)`, contiguous and as
    /// equal as possible.
    pub fn share(&self, i: usize) -> (usize, usize) {
        let (n, p) = (self.connections, self.processes.max(1));
        let first = n * i / p;
        (first, n * (i + 1) / p - first)
    }

    /// Handshakes in flight in one shard (at least 1).
    pub fn in_flight_per_shard(&self) -> usize {
        self.in_flight.div_ceil(self.processes.max(1)).max(1)
    }
}

/// Validated `fanout` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FanoutPlan {
    pub publish: Vec<Target>,
    pub mode: PublishMode,
    pub size: usize,
    pub topics: usize,
    pub topic_dist: TopicDist,
    pub drain_timeout: Duration,
    pub metrics: Vec<WsUrl>,
    /// `--corpus`: text payloads, the lines of this file (`None`: the
    /// synthetic binary payload of `size` bytes).
    #[serde(default)]
    pub corpus: Option<crate::payload::Corpus>,
    /// `--publish-spread`: each message to one publish URL in turn.
    #[serde(default)]
    pub spread: bool,
    /// Subscribers that decode (inflate) and check what they receive: run
    /// index a multiple of this (1: every one); the others count frames.
    #[serde(default = "every_one")]
    pub verify_every: usize,
}

fn every_one() -> usize {
    1
}

/// How `storm` drops a subscriber's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum DropMode {
    /// close(2): the server reads EOF (an orderly FIN, no close frame).
    Close,
    /// close(2) with SO_LINGER 0: the server gets an RST.
    Reset,
}

impl DropMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Close => "close",
            Self::Reset => "reset",
        }
    }
}

/// Validated `storm` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StormPlan {
    /// The topics every subscriber holds: its URL's `topics=`, in order.
    pub topics: Vec<String>,
    /// `publish[t]`: the publish URLs of topic `t` (each gets every message of it).
    pub publish: Vec<Vec<Target>>,
    /// Messages per second to each topic.
    pub rate: f64,
    pub duration: Duration,
    pub size: usize,
    /// When the subscribers drop, from the start of publishing.
    pub drop_at: Duration,
    /// Share of the subscribers that drop (0 < f <= 1).
    pub drop_fraction: f64,
    /// Each dropped subscriber reconnects after a uniform random delay in `0..=jitter`.
    pub jitter: Duration,
    pub drop_mode: DropMode,
    pub drain_timeout: Duration,
}

impl StormPlan {
    /// The publisher's schedule: `rate` per topic, round-robin over the topics.
    pub fn mode(&self) -> PublishMode {
        PublishMode::Rate {
            per_s: self.rate * self.topics.len() as f64,
            duration: self.duration,
        }
    }
}

/// Validated `conflation` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflationPlan {
    /// The topics every subscriber holds: its URL's `topics=`, in order.
    pub topics: Vec<String>,
    /// `publish[t]`: the publish URLs of topic `t` (each gets every message of it).
    pub publish: Vec<Vec<Target>>,
    /// Messages per second to each topic.
    pub rate: f64,
    pub duration: Duration,
    pub size: usize,
    /// Share of the subscribers that read slowly (0 ..= 1).
    pub slow_fraction: f64,
    /// A slow subscriber's reading rate while publishing goes on.
    pub slow_read_bytes_per_s: u64,
    /// `max_rate=N` on the subscribers' URL (already appended to the targets).
    pub max_rate: Option<u32>,
    pub drain_timeout: Duration,
}

impl ConflationPlan {
    /// The publisher's schedule: `rate` per topic, round-robin over the topics.
    pub fn mode(&self) -> PublishMode {
        PublishMode::Rate {
            per_s: self.rate * self.topics.len() as f64,
            duration: self.duration,
        }
    }
}

/// Validated `echo` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EchoPlan {
    pub window: usize,
    pub duration: Duration,
    pub size: usize,
    pub drain_timeout: Duration,
}

/// What the connections do once they are up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Work {
    Connect,
    Hold { duration: Duration },
    Fanout(FanoutPlan),
    Echo(EchoPlan),
    Storm(StormPlan),
    Conflation(ConflationPlan),
}

impl Work {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Hold { .. } => "hold",
            Self::Fanout(_) => "fanout",
            Self::Echo(_) => "echo",
            Self::Storm(_) => "storm",
            Self::Conflation(_) => "conflation",
        }
    }
}

/// A validated run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub connect: ConnectPlan,
    pub work: Work,
    pub server_pids: Vec<u32>,
    pub json: Option<PathBuf>,
    pub plot: Option<PathBuf>,
}
