//! The flags every scenario takes ([`CommonArgs`]) and their validation:
//! how many processes and source addresses a run needs within one
//! process's [`Limits`].

use super::plan::{ConnectPlan, Plan, Work};
use super::{
    CONNECTIONS_PER_DEFAULT_SOURCE, MAX_CONNECTIONS_PER_PROCESS, MAX_PROCESSES, RESERVED_FDS,
    resolve, secs,
};
use crate::sys;
use crate::url::{self, WsUrl};
use clap::Args;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

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

    /// PEM certificates to trust for wss:// targets (e.g. the server's
    /// self-signed certificate).
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,

    /// wss://: make a full TLS handshake on every connection instead of
    /// resuming the session a previous connection of the process got.
    #[arg(long)]
    pub no_tls_resume: bool,

    /// Offer this subprotocol in every upgrade request (e.g. corecast.v1.binary:
    /// the subscribers then unwrap corecast's binary envelope before reading
    /// the payload).
    #[arg(long, value_name = "NAME")]
    pub subprotocol: Option<String>,

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

impl CommonArgs {
    pub(super) fn plan(&self, work: Work, limits: Limits) -> Result<Plan, String> {
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
        if targets.iter().any(|t| t.url.tls) && self.ca_file.is_none() {
            return Err("a wss:// --url needs --ca-file (the certificate to trust)".into());
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
                tls: crate::client::tls::TlsPlan {
                    ca_file: self.ca_file.clone(),
                    resume: !self.no_tls_resume,
                },
                subprotocol: self.subprotocol.clone(),
                permessage_deflate: false,
            },
            work,
            server_pids: self.server_pid.clone(),
            json: self.json.clone(),
            plot: self.plot.clone(),
        })
    }
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
