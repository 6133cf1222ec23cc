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
}

impl Work {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Hold { .. } => "hold",
            Self::Fanout(_) => "fanout",
            Self::Echo(_) => "echo",
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
