//! `loadgen`: a load generator for corecast (and any RFC 6455 server).
//!
//! Scenarios are subcommands: `connect` (handshake rate and latency),
//! `hold` (idle connections and what they cost the server), `fanout`
//! (subscribers and a publisher: delivery rate, loss, reordering,
//! publish-to-receive latency), `echo` (round trips with M messages in
//! flight per connection) and `storm` (enveloped subscribers dropped while
//! publishing goes on, reconnecting with `since`: time to caught up,
//! recovery completeness, gaps and duplicates) and `conflation` (a share
//! of the subscribers reading slowly while publishing overloads them:
//! staleness of the delivered values, conflation markers, how far behind
//! each subscriber ends).
//!
//! A run is split into shards of at most [`cli::MAX_CONNECTIONS_PER_PROCESS`]
//! connections (the open-file limit is 20 000 per process). One shard runs
//! on a thread of this process; several run as worker processes, this
//! executable re-run as `loadgen shard`, each with one event loop. The
//! parent (`run`, `coord`) starts them, holds them at barriers so every
//! measured phase starts when all connections of all processes are up,
//! publishes (fanout, storm), and merges their reports (`report`, `hist`).
//!
//! Exit status: 0 when every connection opened and stayed open (and, for
//! `fanout` and `echo`, every message arrived once and in order; for
//! `storm`, every dropped subscriber resubscribed and no number was skipped
//! or repeated; for `conflation`, no number skipped unannounced or
//! repeated and every open subscriber with every topic's last
//! publication), 1 when
//! not (the report is still printed) or the run failed, 2 for bad arguments.

mod cli;
mod client;
mod clock;
mod conflation;
mod coord;
mod echo;
mod fanout;
mod fleet;
mod hist;
mod metrics;
mod payload;
mod plot;
mod publish;
mod report;
mod run;
mod shard;
mod storm;
mod sys;
mod topics;
mod url;
mod wire;

use clap::Parser;
use cli::{Cli, Command, Limits};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Shard = cli.command {
        sys::raise_nofile_limit();
        shard::main(&mut coord::process_link());
        return ExitCode::SUCCESS;
    }
    let plan = match cli.command.plan(Limits::current()) {
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            eprintln!("loadgen: error: {e}");
            return ExitCode::from(2);
        }
        None => unreachable!("shard is handled above"),
    };
    for &pid in &plan.server_pids {
        if let Err(e) = sys::process_cpu_s(pid) {
            eprintln!("loadgen: error: --server-pid {pid}: cannot read its CPU time: {e}");
            return ExitCode::from(2);
        }
    }
    let how = if plan.connect.processes == 1 {
        coord::Spawn::Threads
    } else {
        coord::Spawn::Processes
    };
    let argv: Vec<String> = std::env::args().collect();
    match run::run(&plan, how, &argv) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("loadgen: error: {e}");
            ExitCode::FAILURE
        }
    }
}
