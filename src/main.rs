//! The `corecast` binary: parses flags, starts the server, turns SIGHUP
//! into a reload and SIGINT/SIGTERM into a graceful shutdown (a second
//! signal exits at once).

use clap::Parser;
use corecast::cli::{Cli, Command};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::process::ExitCode;
use tracing::{error, info, warn};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args.to_config()),
    }
}

fn serve(config: corecast::server::Config) -> ExitCode {
    // Install the handlers before the workers start, so an early signal is not
    // met by the default action (immediate termination).
    let mut signals = match Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let server = match corecast::server::start(config) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot start server");
            return ExitCode::FAILURE;
        }
    };
    // SIGHUP reloads (the certificate and key); the first other signal
    // shuts down.
    let signal = signals.forever().find(|&s| {
        if s != SIGHUP {
            return true;
        }
        match server.reload() {
            Ok(()) => info!("reloaded"),
            Err(e) => error!(error = %e, "reload failed; the old configuration stays"),
        }
        false
    });
    info!(?signal, "shutting down: closing connections with 1001");
    server.shutdown();
    // A second signal during the drain exits immediately.
    let handle = signals.handle();
    std::thread::spawn(move || {
        if signals.forever().any(|s| s != SIGHUP) {
            warn!("second signal: exiting without waiting for the drain");
            std::process::exit(130);
        }
    });
    server.join();
    handle.close();
    info!("stopped");
    ExitCode::SUCCESS
}
