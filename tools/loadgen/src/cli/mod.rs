//! The command line: flags, their validation into a [`Plan`], and the
//! arithmetic that splits a run over processes and source addresses.
//!
//! Here: [`Cli`] and its [`Command`]s, the bounds every flag is checked
//! against and the small checks the subcommands share. Each subcommand's
//! flags and their validation are in their own file: `common` (the flags
//! every scenario takes, and how many processes and source addresses they
//! need), `connect` (connect and hold), `fanout`, `echo`, `storm` and
//! `conflation`; the
//! validated plan they produce is in `plan`.

mod common;
mod conflation;
mod connect;
mod echo;
mod fanout;
mod plan;
mod storm;
#[cfg(test)]
mod tests;

pub use common::Limits;
pub use plan::{
    ConflationPlan, ConnectPlan, DropMode, EchoPlan, FanoutPlan, Plan, PublishMode, StormPlan,
    Target, Work,
};

use crate::client;
use crate::url::WsUrl;
use clap::{Parser, Subcommand};
use conflation::ConflationCmd;
use connect::{ConnectCmd, HoldCmd};
use echo::EchoCmd;
use fanout::FanoutCmd;
use std::time::Duration;
use storm::StormCmd;

/// Most connections one loadgen process opens: the open-file limit (20 000)
/// less a margin for the poller, stdio, pipes and the report file.
pub const MAX_CONNECTIONS_PER_PROCESS: usize = 19_000;
/// Descriptors kept free besides the sockets.
const RESERVED_FDS: u64 = 64;
/// By default, one loopback source address per this many connections to
/// one destination (below the 28 232 ephemeral ports, leaving room for
/// TIME_WAIT and other users; at 19 000 on one address `connect` spends
/// most of its time searching for a free port).
pub const CONNECTIONS_PER_DEFAULT_SOURCE: usize = 14_000;
/// Most worker processes one run starts (64 × 19 000 = 1.2 M connections).
pub const MAX_PROCESSES: usize = 64;
/// Upper bound on every duration flag, so each run ends.
const MAX_SECS: u64 = 24 * 3600;
/// Most messages one fanout run publishes (bounds its time and memory).
const MAX_MESSAGES: u64 = 100_000_000;
/// Highest publish rate accepted, in messages per second.
const MAX_RATE: f64 = 10_000_000.0;
/// Most topics (each WebSocket publisher URL opens one connection per topic).
const MAX_TOPICS: usize = 10_000;
/// Most echo messages in flight per connection.
const MAX_WINDOW: usize = 1024;

/// Load generator for corecast (and any RFC 6455 WebSocket server).
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Open N connections with C handshakes in flight, then close them:
    /// handshakes/s, failures by cause, connect-latency percentiles.
    Connect(ConnectCmd),
    /// Open N connections, hold them idle (answering pings) for T seconds,
    /// and report what they cost the server: RSS per connection, socket
    /// memory, CPU.
    Hold(HoldCmd),
    /// Open N subscribers and a publisher, publish K messages (burst) or R
    /// per second for T seconds, and report delivered frames/s, lost and
    /// reordered messages and publish-to-receive latency.
    Fanout(FanoutCmd),
    /// Open N connections to an echo endpoint, keep M messages in flight on
    /// each for T seconds: round-trip latency and throughput.
    Echo(EchoCmd),
    /// A reconnect storm with recovery: N enveloped subscribers, publishers
    /// at R messages/s per topic; at --drop-at the subscribers' connections
    /// drop, each reconnects after a random delay and resubscribes with
    /// `since`. Reports time to caught up, recovery completeness, gaps and
    /// duplicates.
    Storm(StormCmd),
    /// Conflation under overload: N enveloped subscribers, publishers at R
    /// messages/s per topic, a share of the subscribers reading slowly
    /// (optionally every one asking `max_rate`). Reports the staleness of
    /// each delivered value, how far behind each subscriber is at the end,
    /// conflation markers, unannounced gaps and duplicates, slow-consumer
    /// disconnects; slow and normal subscribers apart.
    Conflation(ConflationCmd),
    /// Internal: one worker process of a multi-process run (reads its plan
    /// from stdin, reports on stdout).
    #[command(hide = true)]
    Shard,
}

impl Command {
    /// The validated plan of a scenario (`None` for the internal `shard`).
    pub fn plan(&self, limits: Limits) -> Option<Result<Plan, String>> {
        Some(match self {
            Self::Connect(c) => c.common.plan(Work::Connect, limits),
            Self::Hold(c) => secs("duration", c.duration, 0)
                .and_then(|duration| c.common.plan(Work::Hold { duration }, limits)),
            Self::Fanout(c) => c.plan(limits),
            Self::Echo(c) => c.work().and_then(|w| c.common.plan(w, limits)),
            Self::Storm(c) => c.plan(limits),
            Self::Conflation(c) => c.plan(limits),
            Self::Shard => return None,
        })
    }
}

fn secs(name: &str, v: u64, min: u64) -> Result<Duration, String> {
    if v < min || v > MAX_SECS {
        return Err(format!(
            "--{name} {v}: must be between {min} and {MAX_SECS} seconds"
        ));
    }
    Ok(Duration::from_secs(v))
}

fn resolve(urls: &[WsUrl]) -> Result<Vec<Target>, String> {
    urls.iter()
        .map(|u| {
            Ok(Target {
                url: u.clone(),
                dst: u.resolve()?,
            })
        })
        .collect()
}

fn size(v: usize) -> Result<usize, String> {
    let max_size = client::MAX_FRAME_PAYLOAD as usize;
    if v < crate::fanout::PAYLOAD_HEADER || v > max_size {
        return Err(format!(
            "--size {v}: must be between {} and {max_size} bytes",
            crate::fanout::PAYLOAD_HEADER
        ));
    }
    Ok(v)
}
