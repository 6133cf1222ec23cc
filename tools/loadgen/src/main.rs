//! `loadgen`: a load generator for corecast (and any RFC 6455 server).
//!
//! One thread drives thousands of non-blocking sockets through mio. Each
//! scenario is a subcommand:
//!
//! - `hold`: open N connections, hold them idle, measure the server's
//!   memory per connection;
//! - `fanout`: open N subscribers and one publisher, publish a burst or a
//!   steady rate, measure delivered frames/s, losses, reordering and
//!   publish-to-receive latency.
//!
//! One process holds at most [`MAX_CONNECTIONS_PER_PROCESS`] connections
//! (the open-file limit is 20 000); spreading a run over several processes
//! is future work.
//!
//! Exit status: 0 when every connection opened and stayed open (and, for
//! `fanout`, every message arrived once and in order), 1 when not (the
//! report is still printed) or the run failed, 2 for bad arguments.

mod client;
mod fanout;
mod fleet;
mod hold;
mod report;
mod sys;
mod url;

use clap::{Args, Parser, Subcommand};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use url::WsUrl;

/// Most connections one loadgen process opens: the open-file limit (20 000)
/// less a margin for the poller, stdio and the report file.
pub const MAX_CONNECTIONS_PER_PROCESS: usize = 19_000;
/// Descriptors kept free besides the sockets.
const RESERVED_FDS: u64 = 64;
/// By default, one loopback source address per this many connections (below
/// the 28 232 ephemeral ports, leaving room for TIME_WAIT and other users).
pub const CONNECTIONS_PER_DEFAULT_SOURCE: usize = 14_000;
/// Upper bound on every duration flag, so each run ends.
const MAX_SECS: u64 = 24 * 3600;

/// Load generator for corecast (and any RFC 6455 WebSocket server).
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open N connections, hold them idle (answering pings), and report what
    /// they cost the server: RSS per connection, socket memory, CPU.
    Hold(HoldArgs),
    /// Open N subscribers and one publisher, publish K messages (burst) or
    /// R per second for T seconds, and report delivered frames/s, lost and
    /// reordered messages and publish-to-receive latency.
    Fanout(FanoutArgs),
}

/// How to open connections; shared by every scenario.
#[derive(Debug, Clone, Args)]
struct ConnectArgs {
    /// Server URL: ws://HOST:PORT/PATH.
    #[arg(long, value_parser = url::parse, value_name = "URL")]
    url: WsUrl,

    /// Connections to open (at most 19000 per process).
    #[arg(long, value_name = "N")]
    connections: usize,

    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 256, value_name = "C")]
    in_flight: usize,

    /// Source addresses to bind, used round-robin (comma-separated). Default
    /// for a loopback IPv4 target: 127.0.0.1, plus 127.0.0.2, ... for every
    /// further 14000 connections; otherwise the kernel chooses.
    #[arg(long, value_delimiter = ',', value_name = "ADDRS")]
    source_addrs: Vec<IpAddr>,

    /// Stop opening connections after this many seconds; those still opening
    /// count as timeouts.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    connect_timeout: u64,

    /// Time one connection has from connect to a verified 101.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    handshake_timeout: u64,
}

#[derive(Debug, Clone, Args)]
struct HoldArgs {
    #[command(flatten)]
    connect: ConnectArgs,

    /// Seconds to hold the connections once they are up.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    duration: u64,

    /// Server process to measure: VmRSS before, after the ramp-up and at the
    /// end; CPU time.
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,

    /// Also write the report as one JSON object to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
struct FanoutArgs {
    /// Subscribers' URL, e.g. ws://HOST:PORT/ws?topics=T; --connections of them.
    #[command(flatten)]
    connect: ConnectArgs,

    /// Publisher URL: ws://HOST:PORT/publish/T (one WebSocket connection;
    /// every message it sends is published).
    #[arg(long, value_parser = url::parse, value_name = "URL")]
    publish_url: WsUrl,

    /// Burst mode: publish K messages as fast as the socket takes them.
    #[arg(long, value_name = "K", required_unless_present = "rate", conflicts_with_all = ["rate", "duration"])]
    messages: Option<u64>,

    /// Rate mode: messages per second, for --duration seconds.
    #[arg(long, value_name = "R", requires = "duration")]
    rate: Option<f64>,

    /// Rate mode: seconds to publish for.
    #[arg(long, value_name = "SECS", requires = "rate")]
    duration: Option<u64>,

    /// Payload bytes per message (at least 16: sequence number and send time).
    #[arg(long, default_value_t = 64, value_name = "BYTES")]
    size: usize,

    /// Seconds to wait for deliveries after the last publish.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    drain_timeout: u64,

    /// Server process whose CPU time over the delivery phase is reported.
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,

    /// Also write the report as one JSON object to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Most messages one fanout run publishes (bounds its time and memory).
const MAX_MESSAGES: u64 = 100_000_000;
/// Highest publish rate accepted, in messages per second.
const MAX_RATE: f64 = 10_000_000.0;

/// How the publisher sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PublishMode {
    /// K messages as fast as the socket takes them.
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

/// Validated `fanout` parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct FanoutPlan {
    pub connect: ConnectPlan,
    pub publish_url: WsUrl,
    pub publish_dst: SocketAddr,
    pub mode: PublishMode,
    pub size: usize,
    pub drain_timeout: Duration,
    pub server_pid: Option<u32>,
    pub json: Option<PathBuf>,
}

/// Validated connection parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectPlan {
    pub url: WsUrl,
    pub dst: SocketAddr,
    /// Empty: no explicit bind.
    pub sources: Vec<IpAddr>,
    pub connections: usize,
    pub in_flight: usize,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
}

/// Validated `hold` parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldPlan {
    pub connect: ConnectPlan,
    pub duration: Duration,
    pub server_pid: Option<u32>,
    pub json: Option<PathBuf>,
}

/// What bounds one process.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Soft RLIMIT_NOFILE.
    nofile: u64,
    /// Ephemeral ports per source address and destination.
    ports_per_source: u64,
}

impl Limits {
    fn current() -> Self {
        Self {
            nofile: sys::raise_nofile_limit(),
            ports_per_source: sys::ephemeral_ports(),
        }
    }

    fn max_connections(self) -> usize {
        let by_fds = self.nofile.saturating_sub(RESERVED_FDS);
        MAX_CONNECTIONS_PER_PROCESS.min(usize::try_from(by_fds).unwrap_or(usize::MAX))
    }
}

/// 127.0.0.1 for fewer than [`CONNECTIONS_PER_DEFAULT_SOURCE`] connections,
/// else 127.0.0.1 ..= 127.0.0.k with k = ceil(n / 14000).
fn default_source_addrs(connections: usize) -> Vec<IpAddr> {
    let k = connections.div_ceil(CONNECTIONS_PER_DEFAULT_SOURCE).max(1) as u32;
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

impl ConnectArgs {
    fn plan(&self, dst: SocketAddr, limits: Limits) -> Result<ConnectPlan, String> {
        let n = self.connections;
        if n == 0 {
            return Err("--connections must be at least 1".into());
        }
        let max = limits.max_connections();
        if n > max {
            return Err(format!(
                "--connections {n} is more than one loadgen process can hold: at most {max} \
                 (the open-file limit is {}, and cannot be raised). Spreading connections over \
                 several loadgen processes is not implemented yet; it comes with multi-process \
                 scaling. For now, run several loadgen processes with smaller --connections.",
                limits.nofile
            ));
        }
        if self.in_flight == 0 {
            return Err("--in-flight must be at least 1".into());
        }
        let connect_timeout = secs("connect-timeout", self.connect_timeout, 1)?;
        let handshake_timeout = secs("handshake-timeout", self.handshake_timeout, 1)?;
        let sources = if self.source_addrs.is_empty() {
            if dst.is_ipv4() && dst.ip().is_loopback() {
                default_source_addrs(n)
            } else {
                Vec::new()
            }
        } else {
            if let Some(bad) = self
                .source_addrs
                .iter()
                .find(|a| a.is_ipv4() != dst.is_ipv4())
            {
                return Err(format!(
                    "--source-addrs: {bad} is not of the same address family as the target {dst}"
                ));
            }
            self.source_addrs.clone()
        };
        let per_source = limits.ports_per_source.max(1);
        let need = (n as u64).div_ceil(per_source);
        if !sources.is_empty() && (sources.len() as u64) < need {
            return Err(format!(
                "{n} connections to one destination need at least {need} source addresses \
                 ({per_source} ephemeral ports each); --source-addrs gives {}",
                sources.len()
            ));
        }
        Ok(ConnectPlan {
            url: self.url.clone(),
            dst,
            sources,
            connections: n,
            in_flight: self.in_flight.min(n),
            connect_timeout,
            handshake_timeout,
        })
    }
}

impl HoldArgs {
    fn plan(&self, dst: SocketAddr, limits: Limits) -> Result<HoldPlan, String> {
        Ok(HoldPlan {
            connect: self.connect.plan(dst, limits)?,
            duration: secs("duration", self.duration, 0)?,
            server_pid: self.server_pid,
            json: self.json.clone(),
        })
    }
}

impl FanoutArgs {
    fn plan(
        &self,
        dst: SocketAddr,
        publish_dst: SocketAddr,
        limits: Limits,
    ) -> Result<FanoutPlan, String> {
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
        let max_size = client::MAX_FRAME_PAYLOAD as usize;
        if self.size < fanout::PAYLOAD_HEADER || self.size > max_size {
            return Err(format!(
                "--size {}: must be between {} and {max_size} bytes",
                self.size,
                fanout::PAYLOAD_HEADER
            ));
        }
        Ok(FanoutPlan {
            connect: self.connect.plan(dst, limits)?,
            publish_url: self.publish_url.clone(),
            publish_dst,
            mode,
            size: self.size,
            drain_timeout: secs("drain-timeout", self.drain_timeout, 1)?,
            server_pid: self.server_pid,
            json: self.json.clone(),
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let usage_error = |msg: String| {
        eprintln!("loadgen: error: {msg}");
        ExitCode::from(2)
    };
    let result = match cli.command {
        Command::Hold(args) => {
            let dst = match args.connect.url.resolve() {
                Ok(d) => d,
                Err(e) => return usage_error(e),
            };
            let plan = match args.plan(dst, Limits::current()) {
                Ok(p) => p,
                Err(e) => return usage_error(e),
            };
            if let Some(pid) = plan.server_pid
                && let Err(e) = sys::rss_bytes(pid)
            {
                return usage_error(format!("--server-pid {pid}: cannot read its VmRSS: {e}"));
            }
            hold::run(&plan)
        }
        Command::Fanout(args) => {
            let resolved = args
                .connect
                .url
                .resolve()
                .and_then(|d| Ok((d, args.publish_url.resolve()?)));
            let (dst, publish_dst) = match resolved {
                Ok(d) => d,
                Err(e) => return usage_error(e),
            };
            let plan = match args.plan(dst, publish_dst, Limits::current()) {
                Ok(p) => p,
                Err(e) => return usage_error(e),
            };
            if let Some(pid) = plan.server_pid
                && let Err(e) = sys::process_cpu_s(pid)
            {
                return usage_error(format!("--server-pid {pid}: cannot read its CPU time: {e}"));
            }
            fanout::run(&plan)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("loadgen: error: {e}");
            ExitCode::FAILURE
        }
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

    fn hold(extra: &[&str]) -> Result<HoldPlan, String> {
        let mut argv = vec!["loadgen", "hold", "--url", "ws://127.0.0.1:9101/echo"];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Command::Hold(args) = cli.command else {
            return Err("not hold".into());
        };
        let dst = args.connect.url.resolve()?;
        args.plan(dst, LIMITS)
    }

    fn fanout(extra: &[&str]) -> Result<FanoutPlan, String> {
        let mut argv = vec![
            "loadgen",
            "fanout",
            "--url",
            "ws://127.0.0.1:9201/ws?topics=bench",
            "--publish-url",
            "ws://127.0.0.1:9201/publish/bench",
            "--connections",
            "100",
        ];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Command::Fanout(args) = cli.command else {
            return Err("not fanout".into());
        };
        let dst = args.connect.url.resolve()?;
        let pdst = args.publish_url.resolve()?;
        args.plan(dst, pdst, LIMITS)
    }

    #[test]
    fn fanout_modes_parse() {
        let p = fanout(&["--messages", "200", "--size", "64"]).unwrap();
        assert_eq!(p.mode, PublishMode::Burst { messages: 200 });
        assert_eq!((p.size, p.drain_timeout), (64, Duration::from_secs(10)));
        assert_eq!(p.connect.url.target, "/ws?topics=bench");
        assert_eq!(p.publish_url.target, "/publish/bench");
        assert_eq!(p.publish_dst, "127.0.0.1:9201".parse().unwrap());
        let p = fanout(&[
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
        ])
        .unwrap();
        assert_eq!(
            p.mode,
            PublishMode::Rate {
                per_s: 1000.0,
                duration: Duration::from_secs(5)
            }
        );
        assert_eq!(p.mode.messages(), 5000);
        assert_eq!(p.drain_timeout, Duration::from_secs(3));
        assert_eq!(
            (p.server_pid, p.json),
            (Some(7), Some(PathBuf::from("f.json")))
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
        ] {
            assert!(fanout(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let p = hold(&["--connections", "10000"]).unwrap();
        assert_eq!(p.connect.connections, 10_000);
        assert_eq!(p.connect.in_flight, 256);
        assert_eq!(p.duration, Duration::from_secs(10));
        assert_eq!(p.connect.connect_timeout, Duration::from_secs(60));
        assert_eq!(p.connect.sources, vec![IpAddr::from([127, 0, 0, 1])]);
        assert_eq!(p.connect.dst, "127.0.0.1:9101".parse().unwrap());
        assert_eq!((p.server_pid, p.json), (None, None));
    }

    #[test]
    fn all_flags_parse() {
        let p = hold(&[
            "--connections",
            "100",
            "--in-flight",
            "1000",
            "--duration",
            "3",
            "--server-pid",
            "42",
            "--source-addrs",
            "127.0.0.1,127.0.0.2",
            "--json",
            "out.json",
        ])
        .unwrap();
        // In flight never exceeds the connection count.
        assert_eq!(p.connect.in_flight, 100);
        assert_eq!(p.duration, Duration::from_secs(3));
        assert_eq!(p.server_pid, Some(42));
        assert_eq!(p.json, Some(PathBuf::from("out.json")));
        assert_eq!(
            p.connect.sources,
            vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2])]
        );
    }

    #[test]
    fn refuses_more_than_one_process_can_hold() {
        assert!(hold(&["--connections", "19000"]).is_ok());
        let err = hold(&["--connections", "19001"]).unwrap_err();
        assert!(err.contains("at most 19000"), "{err}");
        assert!(err.contains("not implemented yet"), "{err}");
        // A lower descriptor limit lowers the cap.
        let args = ConnectArgs {
            url: url::parse("ws://127.0.0.1:1/").unwrap(),
            connections: 960,
            in_flight: 1,
            source_addrs: vec![],
            connect_timeout: 60,
            handshake_timeout: 10,
        };
        let small = Limits {
            nofile: 1024,
            ports_per_source: 28_232,
        };
        let dst = "127.0.0.1:1".parse().unwrap();
        assert!(args.plan(dst, small).is_ok());
        let args = ConnectArgs {
            connections: 961,
            ..args
        };
        assert!(args.plan(dst, small).unwrap_err().contains("at most 960"));
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
            &["--in-flight", "10"],
        ] {
            assert!(hold(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(
            Cli::try_parse_from([
                "loadgen",
                "hold",
                "--url",
                "http://x/",
                "--connections",
                "1"
            ])
            .is_err()
        );
    }

    #[test]
    fn too_few_source_addresses_for_the_ports() {
        let args = ConnectArgs {
            url: url::parse("ws://127.0.0.1:1/").unwrap(),
            connections: 5000,
            in_flight: 1,
            source_addrs: vec![IpAddr::from([127, 0, 0, 1])],
            connect_timeout: 60,
            handshake_timeout: 10,
        };
        let few_ports = Limits {
            nofile: 20_000,
            ports_per_source: 2000,
        };
        let err = args
            .plan("127.0.0.1:1".parse().unwrap(), few_ports)
            .unwrap_err();
        assert!(err.contains("at least 3 source addresses"), "{err}");
        // The default list grows to fit.
        let args = ConnectArgs {
            source_addrs: vec![],
            ..args
        };
        assert!(args.plan("127.0.0.1:1".parse().unwrap(), LIMITS).is_ok());
    }

    #[test]
    fn default_sources_grow_every_14000() {
        let ip = |d| IpAddr::from([127, 0, 0, d]);
        assert_eq!(default_source_addrs(1), vec![ip(1)]);
        assert_eq!(default_source_addrs(14_000), vec![ip(1)]);
        assert_eq!(default_source_addrs(14_001), vec![ip(1), ip(2)]);
        assert_eq!(default_source_addrs(100_000).len(), 8);
        assert_eq!(default_source_addrs(100_000)[7], ip(8));
    }

    #[test]
    fn non_loopback_targets_bind_nothing_by_default() {
        let args = ConnectArgs {
            url: url::parse("ws://10.0.0.1:1/").unwrap(),
            connections: 10,
            in_flight: 1,
            source_addrs: vec![],
            connect_timeout: 60,
            handshake_timeout: 10,
        };
        let p = args.plan("10.0.0.1:1".parse().unwrap(), LIMITS).unwrap();
        assert!(p.sources.is_empty());
    }
}
