//! Arbitrary bytes as a TLS client's stream into `server::tls::TlsConn`,
//! the session both backends run: rustls' record layer, ClientHello parsing
//! and handshake state machine under the server's real configuration
//! (`tls::load`: ALPN, versions, resumption), the flight bound, plain-HTTP
//! detection, and the buffers `TlsConn` keeps between reads.
//!
//! Input: cut bytes and the stream (see `corecast_fuzz::Reads`).
//! Invariants:
//! - no panic;
//! - no plaintext comes out before a handshake completes (none can here:
//!   the fuzzer holds no keys);
//! - what the session holds between reads stays within the flight bound
//!   (16 KiB + the head limit, at most twice that allocated) and what it
//!   queues to send within one server flight and an alert;
//! - a failure is final, frees every buffer, and is classified by the
//!   first byte (`PlainHttp` for an uppercase letter, else `Handshake`);
//! - cutting the stream into reads changes nothing: the same outcome as the
//!   stream in one read.
#![no_main]

use corecast::server::tls::{self, Failure, MinVersion, Resumption, TlsConn, TlsSettings, Wire};
use corecast_fuzz::{Reads, on_worker_stack};
use libfuzzer_sys::fuzz_target;
use rustls::ServerConfig;
use std::sync::{Arc, OnceLock};

/// The head limit the sessions are made with (`--max-handshake-size`).
const MAX_HEAD: usize = 8192;
/// A server flight (ServerHello with a post-quantum key share, the
/// certificate, its signature, Finished) and an alert fit in this.
const MAX_OUTPUT: usize = 16 * 1024;

/// The server's configuration, loaded once from a fresh self-signed pair
/// written to a temporary directory, as `corecast serve` loads its own.
fn config() -> Arc<ServerConfig> {
    static CONFIG: OnceLock<Arc<ServerConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
            params.is_ca = rcgen::IsCa::ExplicitNoCa;
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            let dir =
                std::env::temp_dir().join(format!("corecast-fuzz-tls-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
            std::fs::write(&cert_path, cert.pem()).unwrap();
            std::fs::write(&key_path, key.serialize_pem()).unwrap();
            let settings = TlsSettings {
                cert: cert_path,
                key: key_path,
                min_version: MinVersion::Tls12,
            };
            let loaded = tls::load(&settings, &Resumption::new().unwrap()).unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            loaded.config
        })
        .clone()
}

/// Feeds `reads` to a fresh session; returns the outcome (the first
/// failure, or none).
fn feed<'a>(reads: impl Iterator<Item = &'a [u8]>, first: Option<u8>) -> Result<(), Failure> {
    let mut session = TlsConn::new(config(), MAX_HEAD).unwrap();
    let bound = 2 * (tls::MAX_HANDSHAKE_FLIGHT_BYTES + MAX_HEAD);
    let mut sent = 0;
    let mut plain = [0u8; 64];
    for read in reads {
        let mut read = read.to_vec();
        let result = session.receive(&mut read);
        let mut wire = Wire::default();
        session.take_pending(&mut wire);
        sent += wire.len();
        assert!(sent <= MAX_OUTPUT, "{sent} bytes queued to send");
        assert_eq!(session.read_plain(&mut plain), 0, "plaintext without keys");
        if let Err(why) = result {
            let expected = if first.is_some_and(|b| b.is_ascii_uppercase()) {
                Failure::PlainHttp
            } else {
                Failure::Handshake
            };
            assert_eq!(why, expected, "classified by the first byte");
            assert_eq!(session.held(), 0, "a failed session holds nothing");
            let mut again = vec![0x16; 5];
            assert_eq!(session.receive(&mut again), Err(why), "failure is final");
            return Err(why);
        }
        assert!(
            !session.is_established(),
            "no handshake completes without keys"
        );
        assert!(session.held() <= bound, "{} bytes held", session.held());
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    on_worker_stack(move || check(&data));
});

/// Checks one input (on a worker-sized stack).
fn check(data: &[u8]) {
    let reads = Reads::new(data);
    let stream = reads.stream();
    let first = stream.first().copied();
    let cut = feed(reads, first);
    let whole = feed(std::iter::once(stream).filter(|s| !s.is_empty()), first);
    assert_eq!(cut, whole, "cutting the stream changed the outcome");
}
