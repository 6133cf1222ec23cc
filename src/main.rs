//! The `corecast` binary: parses flags (and the configuration file
//! `--config` names), starts the server, turns SIGHUP into a reload and
//! SIGINT/SIGTERM into a graceful shutdown (a second signal exits at
//! once).

use corecast::cli::{Cli, Command};
use corecast::config_file::{self, ConfigFile};
use corecast::server::Reload;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::ffi::OsString;
use std::process::ExitCode;
use tracing::{error, info, warn};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // rustls warns once per failed handshake (a client's bad
                // ClientHello, say): a flood of them, each counted in
                // `corecast_tls_failures_total`, must not flood the log.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let argv: Vec<OsString> = std::env::args_os().collect();
    let (cli, file) = match config_file::parse(&argv) {
        Ok(parsed) => parsed,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Serve(args) => serve(args.to_config(), &argv, file),
    }
}

/// Panics are bugs; a caught one (docs/SECURITY.md, "A bug that panics")
/// is logged through the log, not printed whole each time: the first ten,
/// then every thousandth, with the count, so a bug a client can reach
/// cannot flood the log. `RUST_BACKTRACE=1` adds backtraces.
fn install_panic_hook() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static PANICS: AtomicU64 = AtomicU64::new(0);
    std::panic::set_hook(Box::new(|info| {
        let n = PANICS.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= 10 || n.is_multiple_of(1000) {
            let thread = std::thread::current();
            let backtrace = std::backtrace::Backtrace::capture();
            error!(
                panics = n,
                thread = thread.name().unwrap_or("?"),
                "panic: {info}\n{backtrace}"
            );
        }
    }));
}

fn serve(
    mut config: corecast::server::Config,
    argv: &[OsString],
    file: Option<ConfigFile>,
) -> ExitCode {
    if let Some(f) = &file {
        config.namespaces = f.namespaces().to_vec();
    }
    // Install the handlers before the workers start, so an early signal is not
    // met by the default action (immediate termination).
    let mut signals = match Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    install_panic_hook();
    let admission = config.admission_limits();
    let running = Running {
        tls: config.tls.is_some(),
        jwt: config.jwt.is_some(),
        tracks_addresses: admission.max_connections_per_ip > 0
            || admission.connect_rate_per_ip > 0
            || admission.publish_rate_per_ip > 0,
    };
    let server = match corecast::server::start(config) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot start server");
            return ExitCode::FAILURE;
        }
    };
    // A worker that fails drains the server by itself: stop waiting.
    let waiting = signals.handle();
    server.on_worker_failure(move || waiting.close());
    // SIGHUP reloads (the configuration file, the certificate and key); the
    // first other signal shuts down.
    let signal = signals.forever().find(|&s| {
        if s != SIGHUP {
            return true;
        }
        let result = match &file {
            None => server.reload(),
            Some(startup) => reload_file(&server, argv, startup, running),
        };
        match result {
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
    let clean = server.join();
    handle.close();
    if !clean {
        error!("stopped after a worker failed");
        return ExitCode::FAILURE;
    }
    info!("stopped");
    ExitCode::SUCCESS
}

/// Reads the configuration file again and applies what a reload can (the
/// TLS settings: new handshakes use them; the namespace tables: existing
/// topics too), all or nothing; every other difference from the file the
/// server started with is logged as waiting for a restart (again at each
/// reload, until it is undone or restarted).
/// What the server started with that a reload cannot switch on or off.
#[derive(Debug, Clone, Copy)]
struct Running {
    tls: bool,
    jwt: bool,
    /// A per-address limit was set at start (the table that counts
    /// addresses exists).
    tracks_addresses: bool,
}

fn reload_file(
    server: &corecast::server::ServerHandle,
    argv: &[OsString],
    startup: &ConfigFile,
    running: Running,
) -> Result<(), String> {
    let parsed = ConfigFile::read(startup.path()).and_then(|new| {
        let cli: Cli = config_file::parse_with(argv, &new).map_err(|e| e.to_string())?;
        Ok((new, cli))
    });
    let (new, cli) = match parsed {
        Ok(p) => p,
        Err(e) => return Err(server.reload_failed(e)),
    };
    let Command::Serve(args) = cli.command;
    let config = args.to_config();
    let mut changes = startup.changes(&new, argv);
    let mut reload = Reload {
        tls: config.tls.clone(),
        namespaces: Some(new.namespaces().to_vec()),
        origins: Some(config.allowed_origins.clone()),
        jwt: config.jwt.clone(),
        limits: None,
    };
    let admission = config.admission_limits();
    let tracks = admission.max_connections_per_ip > 0
        || admission.connect_rate_per_ip > 0
        || admission.publish_rate_per_ip > 0;
    let per_address = if tracks == running.tracks_addresses {
        Some((
            admission.max_connections_per_ip,
            admission.connect_rate_per_ip,
        ))
    } else {
        // Turning the per-address limits on or off (their table) waits.
        let keys = changes
            .applied
            .extract_if(.., |k| config_file::PER_ADDRESS_KEYS.contains(&k.as_str()));
        changes.need_restart.extend(keys);
        None
    };
    reload.limits = Some((admission.max_connections, per_address));
    if config.tls.is_some() != running.tls {
        // Turning TLS on or off changes what the listener speaks: the TLS
        // keys wait, the files named at start are read again.
        let tls_keys = changes.applied.extract_if(.., |k| k.starts_with("tls-"));
        changes.need_restart.extend(tls_keys);
        reload.tls = None;
    }
    if config.jwt.is_some() != running.jwt {
        // Turning tokens on or off waits for a restart too.
        let jwt_keys = changes
            .applied
            .extract_if(.., |k| config_file::JWT_KEYS.contains(&k.as_str()));
        changes.need_restart.extend(jwt_keys);
        reload.jwt = None;
    }
    server.reload_with(reload)?;
    for key in &changes.applied {
        info!(setting = %key, "applied from the configuration file");
    }
    for key in &changes.need_restart {
        warn!(setting = %key, file = %new.path().display(), "changed in the configuration file: takes effect at the next restart");
    }
    Ok(())
}
