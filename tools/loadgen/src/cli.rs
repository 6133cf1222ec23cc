//! The command line: flags, their validation into a [`Plan`], and the
//! arithmetic that splits a run over processes and source addresses.

use crate::topics::TopicDist;
use crate::url::{self, WsUrl};
use crate::{client, fanout, sys};
use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

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
    /// Internal: one worker process of a multi-process run (reads its plan
    /// from stdin, reports on stdout).
    #[command(hide = true)]
    Shard,
}

/// How to open connections, where to write the report; every scenario.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Server URL ws://HOST:PORT/PATH; repeat to spread the connections
    /// round-robin over several servers. A `{topic}` in the path is
    /// replaced by the connection's topic number (fanout --topics).
    #[arg(long, value_parser = url::parse, value_name = "URL", required = true)]
    pub url: Vec<WsUrl>,

    /// Connections to open, in total (spread over as many processes as
    /// needed, at most 19000 each).
    #[arg(long, value_name = "N")]
    pub connections: usize,

    /// Handshakes in flight at once, in total (split over the processes).
    #[arg(long, default_value_t = 256, value_name = "C")]
    pub in_flight: usize,

    /// Source addresses to bind (comma-separated); each destination gets
    /// every one of them equally. Default for a loopback IPv4 target:
    /// 127.0.0.1, plus 127.0.0.2, ... for every further 14000 connections
    /// per destination; otherwise the kernel chooses.
    #[arg(long, value_delimiter = ',', value_name = "ADDRS")]
    pub source_addrs: Vec<IpAddr>,

    /// Worker processes (default: as few as hold the connections, 19000 each).
    #[arg(long, value_name = "P")]
    pub processes: Option<usize>,

    /// Stop opening connections after this many seconds; those still opening
    /// count as timeouts.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub connect_timeout: u64,

    /// Time one connection has from connect to a verified 101.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub handshake_timeout: u64,

    /// Server process to measure (repeatable; figures are summed): CPU time
    /// over the measured phase, and for hold VmRSS before, after the
    /// ramp-up and at the end.
    #[arg(long, value_name = "PID")]
    pub server_pid: Vec<u32>,

    /// Also write the report, with every parameter, as one JSON object to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Draw the latency distribution (percentile plot) as an SVG to FILE.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct ConnectCmd {
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Clone, Args)]
pub struct HoldCmd {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Seconds to hold the connections once every process has them up.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub duration: u64,
}

#[derive(Debug, Clone, Args)]
pub struct FanoutCmd {
    /// Subscribers' URL(s), e.g. ws://HOST:PORT/ws?topics=T; --connections of them.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Publisher URL: ws://HOST:PORT/publish/T (a WebSocket publisher) or
    /// http://HOST:PORT/publish/T (POST, keep-alive, pipelined). Repeat for
    /// several servers: every message goes to each publish URL once.
    #[arg(long, value_parser = url::parse_any, value_name = "URL", required = true)]
    pub publish_url: Vec<WsUrl>,

    /// Burst mode: publish K messages as fast as the server takes them.
    #[arg(long, value_name = "K", required_unless_present = "rate", conflicts_with_all = ["rate", "duration"])]
    pub messages: Option<u64>,

    /// Rate mode: messages per second (over all topics), for --duration seconds.
    #[arg(long, value_name = "R", requires = "duration")]
    pub rate: Option<f64>,

    /// Rate mode: seconds to publish for.
    #[arg(long, value_name = "SECS", requires = "rate")]
    pub duration: Option<u64>,

    /// Payload bytes per message (at least 16: sequence number and send time).
    #[arg(long, default_value_t = 64, value_name = "BYTES")]
    pub size: usize,

    /// Topics: subscriber and publish URLs carry `{topic}`, replaced by
    /// 0..T; messages go to the topics round-robin.
    #[arg(long, default_value_t = 1, value_name = "T")]
    pub topics: usize,

    /// How subscribers spread over the topics: uniform or zipf:S.
    #[arg(long, default_value = "uniform", value_name = "DIST")]
    pub topic_dist: TopicDist,

    /// Seconds to wait for deliveries after the last publish.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub drain_timeout: u64,

    /// corecast metrics to read before and after (repeatable, e.g.
    /// http://HOST:PORT/metrics): the report gives the server's own count
    /// of frames sent (corecast_frames_sent_total) beside frames received.
    #[arg(long, value_parser = url::parse_http, value_name = "URL")]
    pub metrics_url: Vec<WsUrl>,
}

#[derive(Debug, Clone, Args)]
pub struct EchoCmd {
    /// Echo endpoint URL(s), e.g. ws://HOST:PORT/echo.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Messages in flight per connection (a new one leaves as each echo returns).
    #[arg(long, default_value_t = 1, value_name = "M")]
    pub messages_in_flight: usize,

    /// Seconds to keep sending.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub duration: u64,

    /// Payload bytes per message (at least 16).
    #[arg(long, default_value_t = 64, value_name = "BYTES")]
    pub size: usize,

    /// Seconds to wait for the last echoes after sending stops.
    #[arg(long, default_value_t = 5, value_name = "SECS")]
    pub drain_timeout: u64,
}

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

/// What bounds one process.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Soft RLIMIT_NOFILE.
    pub nofile: u64,
    /// Ephemeral ports per source address and destination.
    pub ports_per_source: u64,
}

impl Limits {
    pub fn current() -> Self {
        Self {
            nofile: sys::raise_nofile_limit(),
            ports_per_source: sys::ephemeral_ports(),
        }
    }

    pub fn max_connections(self) -> usize {
        let by_fds = self.nofile.saturating_sub(RESERVED_FDS);
        MAX_CONNECTIONS_PER_PROCESS.min(usize::try_from(by_fds).unwrap_or(usize::MAX))
    }
}

/// 127.0.0.1 ..= 127.0.0.k with k = ceil(per_destination / 14000).
pub fn default_source_addrs(per_destination: usize) -> Vec<IpAddr> {
    let k = per_destination
        .div_ceil(CONNECTIONS_PER_DEFAULT_SOURCE)
        .clamp(1, 250) as u32;
    (1..=k)
        .map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::LOCALHOST) - 1 + i)))
        .collect()
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
    if v < fanout::PAYLOAD_HEADER || v > max_size {
        return Err(format!(
            "--size {v}: must be between {} and {max_size} bytes",
            fanout::PAYLOAD_HEADER
        ));
    }
    Ok(v)
}

impl CommonArgs {
    fn plan(&self, work: Work, limits: Limits) -> Result<Plan, String> {
        let targets = resolve(&self.url)?;
        let n = self.connections;
        if n == 0 {
            return Err("--connections must be at least 1".into());
        }
        let max = limits.max_connections();
        let processes = match self.processes {
            Some(0) => return Err("--processes must be at least 1".into()),
            Some(p) => p,
            None => n.div_ceil(max),
        };
        if processes > MAX_PROCESSES {
            return Err(format!(
                "{n} connections need {processes} processes: at most {MAX_PROCESSES}"
            ));
        }
        if processes > n {
            return Err(format!(
                "--processes {processes} is more than --connections {n}"
            ));
        }
        let per_process = n.div_ceil(processes);
        if per_process > max {
            return Err(format!(
                "--processes {processes} puts {per_process} connections in one process: at most \
                 {max} (the open-file limit is {}); give more processes or leave --processes out",
                limits.nofile
            ));
        }
        if self.in_flight == 0 {
            return Err("--in-flight must be at least 1".into());
        }
        let connect_timeout = secs("connect-timeout", self.connect_timeout, 1)?;
        let handshake_timeout = secs("handshake-timeout", self.handshake_timeout, 1)?;
        let ipv4 = targets[0].dst.is_ipv4();
        if targets.iter().any(|t| t.dst.is_ipv4() != ipv4) {
            return Err("every --url must be of one address family".into());
        }
        let per_dst = n.div_ceil(targets.len());
        let sources = if self.source_addrs.is_empty() {
            if ipv4 && targets.iter().all(|t| t.dst.ip().is_loopback()) {
                default_source_addrs(per_dst)
            } else {
                Vec::new()
            }
        } else {
            if let Some(bad) = self.source_addrs.iter().find(|a| a.is_ipv4() != ipv4) {
                return Err(format!(
                    "--source-addrs: {bad} is not of the same address family as the targets"
                ));
            }
            self.source_addrs.clone()
        };
        let per_source = limits.ports_per_source.max(1);
        let need = (per_dst as u64).div_ceil(per_source);
        if !sources.is_empty() && (sources.len() as u64) < need {
            return Err(format!(
                "{per_dst} connections to one destination need at least {need} source addresses \
                 ({per_source} ephemeral ports each); --source-addrs gives {}",
                sources.len()
            ));
        }
        Ok(Plan {
            connect: ConnectPlan {
                targets,
                sources,
                connections: n,
                in_flight: self.in_flight.min(n),
                processes,
                connect_timeout,
                handshake_timeout,
            },
            work,
            server_pids: self.server_pid.clone(),
            json: self.json.clone(),
            plot: self.plot.clone(),
        })
    }
}

impl FanoutCmd {
    fn work(&self) -> Result<Work, String> {
        let mode = match (self.messages, self.rate, self.duration) {
            (Some(k), None, None) => {
                if k == 0 || k > MAX_MESSAGES {
                    return Err(format!(
                        "--messages {k}: must be between 1 and {MAX_MESSAGES}"
                    ));
                }
                PublishMode::Burst { messages: k }
            }
            (None, Some(r), Some(t)) => {
                if !(r > 0.0 && r <= MAX_RATE) {
                    return Err(format!(
                        "--rate {r}: must be above 0 and at most {MAX_RATE}"
                    ));
                }
                let mode = PublishMode::Rate {
                    per_s: r,
                    duration: secs("duration", t, 1)?,
                };
                if mode.messages() == 0 || mode.messages() > MAX_MESSAGES {
                    return Err(format!(
                        "--rate {r} --duration {t} publishes {} messages: must be between 1 and {MAX_MESSAGES}",
                        mode.messages()
                    ));
                }
                mode
            }
            _ => return Err("give either --messages K, or --rate R with --duration T".into()),
        };
        if self.topics == 0 || self.topics > MAX_TOPICS {
            return Err(format!(
                "--topics {}: must be between 1 and {MAX_TOPICS}",
                self.topics
            ));
        }
        let placeholder = |u: &WsUrl| u.target.contains(client::TOPIC_PLACEHOLDER);
        if self.topics > 1
            && let Some(u) = self
                .common
                .url
                .iter()
                .chain(&self.publish_url)
                .find(|u| !placeholder(u))
        {
            return Err(format!(
                "--topics {}: {u} has no {{topic}} in its path (e.g. /ws?topics=t{{topic}} \
                 and /publish/t{{topic}})",
                self.topics
            ));
        }
        if self.publish_url.iter().any(|u| u.http) && self.publish_url.iter().any(|u| !u.http) {
            return Err("--publish-url: all ws:// or all http://, not both".into());
        }
        Ok(Work::Fanout(FanoutPlan {
            publish: resolve(&self.publish_url)?,
            mode,
            size: size(self.size)?,
            topics: self.topics,
            topic_dist: self.topic_dist,
            drain_timeout: secs("drain-timeout", self.drain_timeout, 1)?,
            metrics: self.metrics_url.clone(),
        }))
    }
}

impl Command {
    /// The validated plan of a scenario (`None` for the internal `shard`).
    pub fn plan(&self, limits: Limits) -> Option<Result<Plan, String>> {
        Some(match self {
            Self::Connect(c) => c.common.plan(Work::Connect, limits),
            Self::Hold(c) => secs("duration", c.duration, 0)
                .and_then(|duration| c.common.plan(Work::Hold { duration }, limits)),
            Self::Fanout(c) => c.work().and_then(|w| c.common.plan(w, limits)),
            Self::Echo(c) => {
                let work = (|| {
                    if c.messages_in_flight == 0 || c.messages_in_flight > MAX_WINDOW {
                        return Err(format!(
                            "--messages-in-flight {}: must be between 1 and {MAX_WINDOW}",
                            c.messages_in_flight
                        ));
                    }
                    Ok(Work::Echo(EchoPlan {
                        window: c.messages_in_flight,
                        duration: secs("duration", c.duration, 1)?,
                        size: size(c.size)?,
                        drain_timeout: secs("drain-timeout", c.drain_timeout, 1)?,
                    }))
                })();
                work.and_then(|w| c.common.plan(w, limits))
            }
            Self::Shard => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    const LIMITS: Limits = Limits {
        nofile: 20_000,
        ports_per_source: 28_232,
    };

    fn plan(argv: &[&str]) -> Result<Plan, String> {
        let mut full = vec!["loadgen"];
        full.extend_from_slice(argv);
        let cli = Cli::try_parse_from(full).map_err(|e| e.to_string())?;
        cli.command.plan(LIMITS).expect("a scenario")
    }

    fn hold(extra: &[&str]) -> Result<Plan, String> {
        let mut argv = vec!["hold", "--url", "ws://127.0.0.1:9101/echo"];
        argv.extend_from_slice(extra);
        plan(&argv)
    }

    fn fanout(extra: &[&str]) -> Result<(Plan, FanoutPlan), String> {
        let mut argv = vec![
            "fanout",
            "--url",
            "ws://127.0.0.1:9201/ws?topics=bench",
            "--publish-url",
            "ws://127.0.0.1:9201/publish/bench",
            "--connections",
            "100",
        ];
        argv.extend_from_slice(extra);
        let p = plan(&argv)?;
        let Work::Fanout(f) = p.work.clone() else {
            panic!("not fanout")
        };
        Ok((p, f))
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let p = hold(&["--connections", "10000"]).unwrap();
        let c = &p.connect;
        assert_eq!((c.connections, c.in_flight, c.processes), (10_000, 256, 1));
        assert_eq!(
            p.work,
            Work::Hold {
                duration: Duration::from_secs(10)
            }
        );
        assert_eq!(c.connect_timeout, Duration::from_secs(60));
        assert_eq!(c.sources, vec![IpAddr::from([127, 0, 0, 1])]);
        assert_eq!(c.targets[0].dst, "127.0.0.1:9101".parse().unwrap());
        assert_eq!((p.server_pids.len(), p.json, p.plot), (0, None, None));
    }

    #[test]
    fn all_common_flags_parse() {
        let p = hold(&[
            "--connections",
            "100",
            "--in-flight",
            "1000",
            "--duration",
            "3",
            "--server-pid",
            "42",
            "--server-pid",
            "43",
            "--source-addrs",
            "127.0.0.1,127.0.0.2",
            "--json",
            "out.json",
            "--plot",
            "out.svg",
            "--processes",
            "2",
        ])
        .unwrap();
        // In flight never exceeds the connection count.
        assert_eq!(p.connect.in_flight, 100);
        assert_eq!(p.connect.in_flight_per_shard(), 50);
        assert_eq!(
            p.work,
            Work::Hold {
                duration: Duration::from_secs(3)
            }
        );
        assert_eq!(p.server_pids, [42, 43]);
        assert_eq!(p.json, Some(PathBuf::from("out.json")));
        assert_eq!(p.plot, Some(PathBuf::from("out.svg")));
        assert_eq!(
            p.connect.sources,
            vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2])]
        );
    }

    #[test]
    fn several_urls_and_processes() {
        let p = plan(&[
            "hold",
            "--url",
            "ws://127.0.0.1:9401/ws?topics=a,b",
            "--url",
            "ws://127.0.0.1:9402/echo",
            "--url",
            "ws://127.0.0.1:9403/echo",
            "--connections",
            "100000",
        ])
        .unwrap();
        let c = &p.connect;
        assert_eq!(c.targets.len(), 3);
        assert_eq!(
            c.targets[0].url.target, "/ws?topics=a,b",
            "commas stay in a URL"
        );
        // 100 000 / 19 000 per process: 6 processes.
        assert_eq!(c.processes, 6);
        // 33 334 per destination: 3 source addresses.
        assert_eq!(c.sources.len(), 3);
        // Shares are contiguous, cover everything, and differ by at most one.
        let shares: Vec<_> = (0..6).map(|i| c.share(i)).collect();
        assert_eq!(shares[0], (0, 16_666));
        assert_eq!(shares[5].0 + shares[5].1, 100_000);
        for w in shares.windows(2) {
            assert_eq!(w[0].0 + w[0].1, w[1].0);
        }
        assert!(shares.iter().all(|s| s.1.abs_diff(16_666) <= 1));
        assert_eq!(c.in_flight_per_shard(), 43);
    }

    #[test]
    fn process_count_limits() {
        assert_eq!(
            hold(&["--connections", "19000"]).unwrap().connect.processes,
            1
        );
        assert_eq!(
            hold(&["--connections", "19001"]).unwrap().connect.processes,
            2
        );
        assert_eq!(
            hold(&["--connections", "10", "--processes", "3"])
                .unwrap()
                .connect
                .share(2),
            (6, 4)
        );
        let err = hold(&["--connections", "40000", "--processes", "2"]).unwrap_err();
        assert!(err.contains("20000 connections in one process"), "{err}");
        assert!(hold(&["--connections", "2", "--processes", "3"]).is_err());
        assert!(hold(&["--connections", "2", "--processes", "0"]).is_err());
        let err = hold(&["--connections", "2000000"]).unwrap_err();
        assert!(err.contains("at most 64"), "{err}");
        // A lower descriptor limit lowers the cap per process.
        let small = Limits {
            nofile: 1024,
            ports_per_source: 28_232,
        };
        let cli = Cli::try_parse_from([
            "loadgen",
            "connect",
            "--url",
            "ws://127.0.0.1:1/",
            "--connections",
            "961",
        ])
        .unwrap();
        assert_eq!(
            cli.command.plan(small).unwrap().unwrap().connect.processes,
            2
        );
    }

    #[test]
    fn rejects_bad_arguments() {
        for bad in [
            &["--connections", "0"][..],
            &["--connections", "10", "--in-flight", "0"],
            &["--connections", "-1"],
            &["--connections", "10", "--duration", "100000"],
            &["--connections", "10", "--connect-timeout", "0"],
            &["--connections", "10", "--handshake-timeout", "0"],
            &["--connections", "10", "--source-addrs", "::1"],
            &["--connections", "10", "--source-addrs", "nope"],
            &["--connections", "10", "--server-pid", "x"],
            &["--connections", "10", "--url", "ws://[::1]:1/"],
            &["--in-flight", "10"],
        ] {
            assert!(hold(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(plan(&["hold", "--url", "http://x/", "--connections", "1"]).is_err());
        assert!(
            plan(&["hold", "--connections", "1"]).is_err(),
            "--url is required"
        );
    }

    #[test]
    fn too_few_source_addresses_for_the_ports() {
        let few_ports = Limits {
            nofile: 20_000,
            ports_per_source: 2000,
        };
        let cli = |extra: &[&str]| {
            let mut argv = vec![
                "loadgen",
                "connect",
                "--url",
                "ws://127.0.0.1:1/",
                "--connections",
                "5000",
            ];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).unwrap()
        };
        let err = cli(&["--source-addrs", "127.0.0.1"])
            .command
            .plan(few_ports)
            .unwrap()
            .unwrap_err();
        assert!(err.contains("at least 3 source addresses"), "{err}");
        // The default list grows to fit.
        assert!(cli(&[]).command.plan(LIMITS).unwrap().is_ok());
    }

    #[test]
    fn default_sources_grow_every_14000_per_destination() {
        let ip = |d| IpAddr::from([127, 0, 0, d]);
        assert_eq!(default_source_addrs(1), vec![ip(1)]);
        assert_eq!(default_source_addrs(14_000), vec![ip(1)]);
        assert_eq!(default_source_addrs(14_001), vec![ip(1), ip(2)]);
        assert_eq!(default_source_addrs(100_000).len(), 8);
        assert_eq!(default_source_addrs(100_000)[7], ip(8));
    }

    #[test]
    fn non_loopback_targets_bind_nothing_by_default() {
        let p = plan(&[
            "connect",
            "--url",
            "ws://10.0.0.1:1/",
            "--connections",
            "10",
        ])
        .unwrap();
        assert!(p.connect.sources.is_empty());
    }

    #[test]
    fn fanout_modes_parse() {
        let (p, f) = fanout(&["--messages", "200", "--size", "64"]).unwrap();
        assert_eq!(f.mode, PublishMode::Burst { messages: 200 });
        assert_eq!((f.size, f.drain_timeout), (64, Duration::from_secs(10)));
        assert_eq!((f.topics, f.topic_dist), (1, TopicDist::Uniform));
        assert_eq!(p.connect.targets[0].url.target, "/ws?topics=bench");
        assert_eq!(f.publish[0].url.target, "/publish/bench");
        assert_eq!(f.publish[0].dst, "127.0.0.1:9201".parse().unwrap());
        let (p, f) = fanout(&[
            "--rate",
            "1000",
            "--duration",
            "5",
            "--size",
            "16384",
            "--drain-timeout",
            "3",
            "--json",
            "f.json",
            "--server-pid",
            "7",
            "--metrics-url",
            "http://127.0.0.1:9201/metrics",
        ])
        .unwrap();
        assert_eq!(
            f.mode,
            PublishMode::Rate {
                per_s: 1000.0,
                duration: Duration::from_secs(5)
            }
        );
        assert_eq!(f.mode.messages(), 5000);
        assert_eq!(f.drain_timeout, Duration::from_secs(3));
        assert_eq!(f.metrics[0].target, "/metrics");
        assert_eq!(
            (p.server_pids, p.json),
            (vec![7], Some(PathBuf::from("f.json")))
        );
    }

    #[test]
    fn fanout_topics_and_http_publishers() {
        let (_, f) = plan(&[
            "fanout",
            "--url",
            "ws://127.0.0.1:1/ws?topics=t{topic}",
            "--publish-url",
            "http://127.0.0.1:1/publish/t{topic}",
            "--connections",
            "10",
            "--messages",
            "5",
            "--topics",
            "4",
            "--topic-dist",
            "zipf:1.1",
        ])
        .map(|p| {
            let Work::Fanout(f) = p.work.clone() else {
                unreachable!()
            };
            (p, f)
        })
        .unwrap();
        assert_eq!((f.topics, f.topic_dist), (4, TopicDist::Zipf(1.1)));
        assert!(f.publish[0].url.http);
        // Several topics need the placeholder everywhere.
        let err = fanout(&["--messages", "5", "--topics", "2"]).unwrap_err();
        assert!(err.contains("has no {topic}"), "{err}");
        // Publishers of one kind.
        assert!(
            fanout(&[
                "--messages",
                "5",
                "--publish-url",
                "http://127.0.0.1:9201/publish/bench"
            ])
            .unwrap_err()
            .contains("not both")
        );
    }

    #[test]
    fn fanout_rejects_bad_arguments() {
        for bad in [
            &[][..],
            &["--messages", "0"],
            &["--messages", "10", "--rate", "5", "--duration", "1"],
            &["--rate", "5"],
            &["--duration", "5"],
            &["--rate", "0", "--duration", "5"],
            &["--rate", "-1", "--duration", "5"],
            &["--rate", "0.1", "--duration", "1"],
            &["--messages", "10", "--size", "15"],
            &["--messages", "10", "--size", "2000000"],
            &["--messages", "10", "--drain-timeout", "0"],
            &["--messages", "10", "--topics", "0"],
            &["--messages", "10", "--topic-dist", "zipf:0"],
            &["--messages", "10", "--metrics-url", "ws://h/metrics"],
        ] {
            assert!(fanout(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn echo_parses_and_validates() {
        let p = plan(&[
            "echo",
            "--url",
            "ws://127.0.0.1:1/echo",
            "--connections",
            "10",
            "--messages-in-flight",
            "8",
            "--duration",
            "2",
            "--size",
            "128",
        ])
        .unwrap();
        assert_eq!(
            p.work,
            Work::Echo(EchoPlan {
                window: 8,
                duration: Duration::from_secs(2),
                size: 128,
                drain_timeout: Duration::from_secs(5),
            })
        );
        for bad in [
            &["--messages-in-flight", "0"][..],
            &["--messages-in-flight", "5000"],
            &["--duration", "0"],
            &["--size", "8"],
        ] {
            let mut argv = vec![
                "echo",
                "--url",
                "ws://127.0.0.1:1/echo",
                "--connections",
                "1",
            ];
            argv.extend_from_slice(bad);
            assert!(plan(&argv).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn plans_round_trip_through_json() {
        // Shards get the plan as JSON: nothing may be lost on the way.
        let (p, _) = fanout(&["--rate", "3.5", "--duration", "2", "--size", "100"]).unwrap();
        let back: Plan = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }
}
