//! TLS for the main listener (wss://, https://): the certificate and key
//! the server was given, loaded into a rustls configuration that every
//! worker's new connections use ([`Certs`], replaced whole by a reload),
//! and one connection's TLS state ([`TlsConn`], sans-IO: ciphertext in,
//! plaintext out and back; the backends move the bytes).
//!
//! The WebSocket core never sees TLS: a backend decrypts what it reads
//! before [`Core::input`](super::worker::Core::input) and encrypts the
//! connection's queue (plaintext, shared frames encoded once per
//! publication) as the socket takes it, so every limit, budget and policy
//! counts plaintext, as on a plain connection.

mod cert_time;
mod conn;
pub mod cost;
mod record;

pub use conn::{CIPHERTEXT_LIMIT, Failure, PLAIN_HTTP_ANSWER, TlsConn, Wire};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

/// The most TLS handshake steps a worker takes per loop turn (a step: one
/// read of a session whose handshake has not completed); the rest wait for
/// the next turn, after the turn's fan-out. The ClientHello's step costs
/// the key exchange and the flight (~0.15 ms: a whole P-256 handshake,
/// accept to close, took 0.17 ms of server CPU here) and the signature,
/// which depends on the key by two orders of magnitude (P-256 ~20 µs,
/// RSA-2048 ~0.8 ms, RSA-4096 5–10 ms), so a worker takes the current
/// key's [`Certs::handshake_steps`]: as many as sign within
/// [`cost::SIGNING_BUDGET_PER_TURN`] (3 ms), timed when the key is loaded
/// ([`cost::steps_per_turn`]), at least 1 and at most this many (P-256:
/// 32; RSA-2048: 3 or 4; RSA-4096: 1). A reconnect storm of
/// thousands of clients thus holds established subscribers for ~5 ms of
/// handshakes per turn with P-256, ~3 ms with RSA-2048, one signature
/// (5–10 ms) where a signature alone takes longer than the budget.
pub const HANDSHAKE_STEPS_PER_TURN: u32 = 32;

/// Ciphertext a client may send before its handshake completes, besides
/// its first request head (`--max-handshake-size`): a ClientHello is a few
/// hundred bytes to ~2 KiB (with a post-quantum key share); a client that
/// sends more is failed instead of held in the session's buffer (rustls'
/// handshake reassembly would accept a single message of up to 64 KiB).
pub const MAX_HANDSHAKE_FLIGHT_BYTES: usize = 16 * 1024;

/// Largest certificate or key file read (a chain of a few certificates is
/// a few KiB): a wrong path (a log, a disk image) fails at once instead of
/// being read whole.
const MAX_PEM_FILE_BYTES: u64 = 1024 * 1024;

/// The lowest TLS version a client may negotiate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MinVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[value(name = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[value(name = "1.3")]
    Tls13,
}

/// Where the certificate and key are, and what to accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM: the server's certificate, then its chain.
    pub cert: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key: PathBuf,
    pub min_version: MinVersion,
}

/// A loaded certificate: the rustls configuration, and when it expires.
pub struct Loaded {
    pub config: Arc<ServerConfig>,
    /// The leaf certificate's `notAfter`, in seconds since the Unix epoch
    /// (`None` if its validity could not be read).
    pub not_after: Option<i64>,
    /// Handshake steps per loop turn with this key
    /// ([`cost::steps_per_turn`] of its measured signature).
    pub handshake_steps: u32,
}

/// What a reload keeps: the session-ticket keys and the session cache, so
/// that a client's resumption survives a certificate rotation.
#[derive(Clone)]
pub struct Resumption {
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    cache: Arc<dyn rustls::server::StoresServerSessions>,
}

impl Resumption {
    /// Ticket keys made here, shared by every worker (the configuration is
    /// one `Arc`) and rotated by rustls every 6 hours (the previous key
    /// still decrypts); a TLS 1.2 session-ID cache of
    /// [`SESSION_CACHE_ENTRIES`].
    pub fn new() -> Result<Self, String> {
        Ok(Self {
            ticketer: rustls::crypto::aws_lc_rs::Ticketer::new()
                .map_err(|e| format!("TLS session tickets: {e}"))?,
            cache: rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES),
        })
    }
}

/// TLS 1.2 sessions remembered for resumption by session ID (TLS 1.3 and
/// most 1.2 clients use tickets, which cost the server no memory).
pub const SESSION_CACHE_ENTRIES: usize = 4096;

/// Reads the certificate chain and key `settings` name and builds the
/// server configuration, resuming sessions with `resumption`. The error is
/// one line naming the file.
pub fn load(settings: &TlsSettings, resumption: &Resumption) -> Result<Loaded, String> {
    let cert_pem = read_pem(&settings.cert, "certificate")?;
    let key_pem = read_pem(&settings.key, "key")?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate {}: {e}", settings.cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "certificate {}: no PEM certificate in the file",
            settings.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("key {}: {e}", settings.key.display()))?;
    let not_after = cert_time::not_after(&chain[0]);
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    server_suite_order(&mut provider.cipher_suites);
    let provider = Arc::new(provider);
    let versions: &[&rustls::SupportedProtocolVersion] = match settings.min_version {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let signing = key.clone_key();
    let mut config = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            format!(
                "certificate {} with key {}: {e}",
                settings.cert.display(),
                settings.key.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // The suite is ours to choose (see `server_suite_order`).
    config.ignore_client_order = true;
    // Resumption: a reconnect storm after a network blip costs ticket
    // decryptions, not full handshakes.
    config.ticketer = Arc::clone(&resumption.ticketer);
    config.session_storage = Arc::clone(&resumption.cache);
    // Early data replays: never.
    config.max_early_data_size = 0;
    // An established TLS 1.3 session leaves rustls for `record.rs`.
    config.enable_secret_extraction = true;
    // Timed once the pair is known to make a configuration: a failed
    // reload logs no steps of its own.
    let handshake_steps = handshake_steps(&provider, signing);
    Ok(Loaded {
        config: Arc::new(config),
        not_after,
        handshake_steps,
    })
}

/// The handshake steps per turn for `key`, from its signature timed here
/// (four signatures, at start and at each reload: ~25–40 ms with an
/// RSA-4096 key, well under a millisecond with P-256). A key that cannot
/// be timed (it signs with no scheme a client may offer) keeps the most.
fn handshake_steps(provider: &rustls::crypto::CryptoProvider, key: PrivateKeyDer<'static>) -> u32 {
    let signature = provider
        .key_provider
        .load_private_key(key)
        .ok()
        .and_then(|k| cost::signature_cost(&*k));
    let Some(signature) = signature else {
        return HANDSHAKE_STEPS_PER_TURN;
    };
    let steps = cost::steps_per_turn(signature);
    tracing::info!(
        signature_us = signature.as_micros() as u64,
        steps,
        "TLS handshake steps per loop turn for this key"
    );
    steps
}

/// Puts the AES-128-GCM suites first, keeping the provider's order
/// otherwise (then AES-256-GCM, then ChaCha20-Poly1305), for a server that
/// chooses the suite itself instead of taking the client's first choice.
///
/// Every TLS 1.3 client implements `TLS_AES_128_GCM_SHA256` (RFC 8446
/// §9.1), browsers on AES hardware already put it first, and it is what
/// Go's and most CDNs' servers choose; rustls clients put AES-256-GCM
/// first. With AES-128 both sides do 10 AES rounds instead of 14, and the
/// handshake's transcript and key schedule use SHA-256 instead of SHA-384
/// (a fifth of a TLS handshake's server CPU here went to SHA-384):
/// measured in docs/BENCHMARKS.md ("TLS cipher suite order").
pub fn server_suite_order(suites: &mut [rustls::SupportedCipherSuite]) {
    use rustls::CipherSuite as S;
    let aes128 = |s: &rustls::SupportedCipherSuite| {
        matches!(
            s.suite(),
            S::TLS13_AES_128_GCM_SHA256
                | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    };
    // Stable: the rest keeps the provider's order.
    suites.sort_by_key(|s| !aes128(s));
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let data = crate::server::config::read_regular_file(path, MAX_PEM_FILE_BYTES)
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if data.len() as u64 > MAX_PEM_FILE_BYTES {
        return Err(format!(
            "{what} {}: more than a PEM file of this kind can be ({MAX_PEM_FILE_BYTES} bytes)",
            path.display(),
        ));
    }
    Ok(data)
}

/// The configuration new connections get, replaced whole by a reload;
/// connections already open keep the one they started with.
pub struct Certs {
    settings: std::sync::Mutex<TlsSettings>,
    resumption: Resumption,
    current: RwLock<Arc<ServerConfig>>,
    not_after: std::sync::atomic::AtomicI64,
    handshake_steps: AtomicU32,
}

impl Certs {
    pub fn new(settings: TlsSettings, resumption: Resumption, loaded: Loaded) -> Self {
        Self {
            settings: std::sync::Mutex::new(settings),
            resumption,
            current: RwLock::new(loaded.config),
            not_after: loaded.not_after.unwrap_or(0).into(),
            handshake_steps: loaded.handshake_steps.into(),
        }
    }

    /// The configuration for a new connection.
    pub fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The current certificate's `notAfter` (Unix seconds; 0 if unknown).
    pub fn not_after(&self) -> i64 {
        self.not_after.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Handshake steps a worker may take per loop turn with the current
    /// key (read at each turn's start: a reload's key applies from the
    /// next turn).
    pub fn handshake_steps(&self) -> u32 {
        self.handshake_steps.load(Ordering::Relaxed)
    }

    /// Reads the files again (or, with `new`, the files and version it
    /// names); on success new connections use them, on failure the old
    /// pair and settings stay and the error says why.
    pub fn reload(&self, new: Option<TlsSettings>) -> Result<(), String> {
        let mut settings = self.settings.lock().unwrap_or_else(|e| e.into_inner());
        let loaded = load(new.as_ref().unwrap_or(&settings), &self.resumption)?;
        if let Some(new) = new {
            *settings = new;
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = loaded.config;
        self.not_after.store(
            loaded.not_after.unwrap_or(0),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.handshake_steps
            .store(loaded.handshake_steps, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a self-signed certificate for `key` and the key as PEM files
    /// named `name` in `dir`.
    fn write_pair(dir: &Path, name: &str, key: &rcgen::KeyPair) -> (PathBuf, PathBuf) {
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(key)
            .unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    /// Coarse, as in `cost.rs`: an RSA-4096 signature costs two orders of
    /// magnitude more than a P-256 one on any machine.
    #[test]
    fn a_reload_with_a_slower_key_lowers_the_steps_workers_read() {
        let dir = std::env::temp_dir().join(format!("corecast-tls-cost-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let rsa =
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_4096)
                .unwrap();
        let (cert, key) = write_pair(&dir, "p256", &p256);
        let settings = TlsSettings {
            cert,
            key,
            min_version: MinVersion::Tls12,
        };
        let resumption = Resumption::new().unwrap();
        let loaded = load(&settings, &resumption).unwrap();
        let certs = Certs::new(settings, resumption, loaded);
        let fast = certs.handshake_steps();
        let (cert, key) = write_pair(&dir, "rsa", &rsa);
        certs
            .reload(Some(TlsSettings {
                cert,
                key,
                min_version: MinVersion::Tls12,
            }))
            .unwrap();
        let slow = certs.handshake_steps();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!((1..fast).contains(&slow), "P-256 {fast}, RSA-4096 {slow}");
        assert!(fast <= HANDSHAKE_STEPS_PER_TURN);
    }
}
