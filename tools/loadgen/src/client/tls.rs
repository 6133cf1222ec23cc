//! TLS for `wss://` targets: one rustls client configuration per process
//! (set once from the plan: which CA to trust, whether to resume
//! sessions), and a session per connection, driven over the connection's
//! non-blocking socket by [`Conn`](super::Conn).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// How `wss://` connections set up TLS (part of the plan every shard gets).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsPlan {
    /// PEM certificates to trust (the server's own, for a self-signed
    /// one); `None`: no `wss://` target can be verified.
    pub ca_file: Option<PathBuf>,
    /// Resume sessions (tickets) across this process's connections to a
    /// host; off, every connection makes a full handshake.
    pub resume: bool,
}

static CONFIG: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();

/// Makes this process's client configuration from `plan` (the first call
/// decides; later calls return its result).
pub fn configure(plan: &TlsPlan) -> Result<(), String> {
    CONFIG
        .get_or_init(|| build(plan))
        .as_ref()
        .map(|_| ())
        .map_err(Clone::clone)
}

fn build(plan: &TlsPlan) -> Result<Arc<ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = &plan.ca_file {
        for cert in CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("--ca-file {}: {e}", path.display()))?
        {
            let cert = cert.map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !plan.resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// A client session for `host` (a name or an IP address, as in the URL).
pub fn session(host: &str) -> std::io::Result<ClientConnection> {
    let config = match CONFIG.get() {
        Some(Ok(c)) => Arc::clone(c),
        _ => {
            return Err(std::io::Error::other(
                "TLS not configured (a wss:// target needs --ca-file)",
            ));
        }
    };
    let name = ServerName::try_from(host.to_string()).map_err(std::io::Error::other)?;
    ClientConnection::new(config, name).map_err(std::io::Error::other)
}
