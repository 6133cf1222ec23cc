//! What a client can send an established TLS 1.3 session, into the record
//! layer that reads it after the handshake (`server::tls::TlsConn` handing
//! over to `record.rs`): each run completes a real handshake with a rustls
//! client under the server's configuration (`tls::load`), takes the
//! client's traffic keys, and sends records it seals around arbitrary inner
//! plaintexts (content, content type, padding: key updates, alerts, other
//! handshake messages, empty and oversized ones), records whose tag is
//! spoiled, and raw bytes (headers of any type and length).
//!
//! Input: the cut bytes (see `corecast_fuzz::Reads`, applied to the
//! ciphertext stream), then items `[kind, len_hi, len_lo, bytes...]`:
//! - kind % 4 == 0: a record sealed around `bytes` as the inner plaintext;
//! - 1: an application-data record carrying `bytes` (sealed around
//!   `bytes` + 0x17: always valid);
//! - 2: `bytes` as they are;
//! - 3: a record sealed around `bytes` with its last byte flipped.
//!
//! Invariants:
//! - no panic;
//! - what the session holds between reads stays within one record (a
//!   partial record at most) and what it queues to send within an alert
//!   and a key update;
//! - the plaintext that comes out begins with the data of every record
//!   before the first one that is not plain application data (a model of
//!   RFC 8446 §5.4), and is never more than all the data sent (when the
//!   session fails, the failing read's plaintext goes with it: then what
//!   came out is a prefix of that data, or begins with it);
//! - a failure is final and frees every buffer;
//! - cutting the stream into reads changes nothing: the same outcome and,
//!   unless it failed, the same plaintext as the stream in one read.
#![no_main]

use aws_lc_rs::aead::{
    AES_128_GCM, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey,
};
use corecast::server::tls::{self, Failure, MinVersion, Resumption, TlsConn, TlsSettings, Wire};
use corecast_fuzz::{Reads, on_worker_stack};
use libfuzzer_sys::fuzz_target;
use rustls::{ClientConfig, ConnectionTrafficSecrets, ServerConfig};
use std::io::Read;
use std::sync::{Arc, OnceLock};

const MAX_HEAD: usize = 8192;
/// A partial record: its header and at most 2^14 + 256 bytes.
const MAX_HELD: usize = 5 + (1 << 14) + 256;

/// The server's configuration (as `corecast serve` loads it) and a client
/// that trusts its certificate and may give up its keys.
fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    static CONFIGS: OnceLock<(Arc<ServerConfig>, Arc<ClientConfig>)> = OnceLock::new();
    CONFIGS
        .get_or_init(|| {
            let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
            params.is_ca = rcgen::IsCa::ExplicitNoCa;
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            let dir =
                std::env::temp_dir().join(format!("corecast-fuzz-tlsr-{}", std::process::id()));
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
            let mut roots = rustls::RootCertStore::empty();
            roots.add(cert.der().clone()).unwrap();
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let mut client = ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            client.enable_secret_extraction = true;
            (loaded.config, Arc::new(client))
        })
        .clone()
}

/// A handshaken session and the client's sealing key.
fn session() -> (TlsConn, Forger) {
    let (server_config, client_config) = configs();
    let mut server = TlsConn::new(server_config, MAX_HEAD).unwrap();
    let mut client =
        rustls::ClientConnection::new(client_config, "localhost".try_into().unwrap()).unwrap();
    for _ in 0..8 {
        let mut up = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut up).unwrap();
        }
        if !up.is_empty() {
            server.receive(&mut up).unwrap();
        }
        let mut wire = Wire::default();
        server.take_pending(&mut wire);
        let mut down = wire.pending();
        while !down.is_empty() {
            client.read_tls(&mut down).unwrap();
            client.process_new_packets().unwrap();
        }
        let _ = client.reader().read_to_end(&mut Vec::new());
        if !client.is_handshaking() && !client.wants_write() && !server.wants_write() {
            break;
        }
    }
    assert!(server.is_established() && server.is_own_records());
    let (seq, secrets) = client.dangerous_extract_secrets().unwrap().tx;
    let (algorithm, key, iv) = match &secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
        _ => unreachable!("a TLS 1.3 suite"),
    };
    let forger = Forger {
        key: LessSafeKey::new(UnboundKey::new(algorithm, key.as_ref()).unwrap()),
        iv: iv.as_ref().try_into().unwrap(),
        seq,
    };
    (server, forger)
}

struct Forger {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Forger {
    fn seal(&mut self, inner: &[u8]) -> Vec<u8> {
        let len = inner.len() + 16;
        let mut out = vec![23, 3, 3, (len >> 8) as u8, len as u8];
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        let mut body = inner.to_vec();
        let aad: [u8; 5] = out[..5].try_into().unwrap();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .unwrap();
        out.extend(body);
        out
    }
}

/// The ciphertext stream the items make, the data every sealed record
/// carries, and the model's prefix: the data of the records before the
/// first one that is not plain application data.
fn build(mut items: &[u8], forger: &mut Forger) -> (Vec<u8>, usize, Vec<u8>) {
    let (mut stream, mut all, mut prefix, mut plain_so_far) = (Vec::new(), 0, Vec::new(), true);
    // Records with no data in a row: the 33rd is refused.
    let mut empties = 0;
    while items.len() >= 3 {
        let kind = items[0] % 4;
        let len = (u16::from_be_bytes([items[1], items[2]]) as usize).min(items.len() - 3);
        let bytes = &items[3..3 + len];
        items = &items[3 + len..];
        let inner: Vec<u8> = match kind {
            1 => bytes.iter().copied().chain([23]).collect(),
            _ => bytes.to_vec(),
        };
        match kind {
            2 => {
                stream.extend_from_slice(bytes);
                plain_so_far = false;
            }
            _ => {
                let mut record = forger.seal(&inner);
                if kind == 3 {
                    *record.last_mut().unwrap() ^= 1;
                }
                // RFC 8446 §5.4: the content type is the last non-zero
                // byte; application data is 23; content, type and padding
                // at most 2^14 + 1 bytes.
                let content = inner
                    .iter()
                    .rposition(|&b| b != 0)
                    .map(|at| (inner[at], &inner[..at]));
                let (data, mut is_plain) = match content {
                    Some((23, data)) if inner.len() <= (1 << 14) + 1 => (data, kind != 3),
                    _ => (&[][..], false),
                };
                if is_plain && data.is_empty() {
                    empties += 1;
                    is_plain = empties <= 32;
                } else if is_plain {
                    empties = 0;
                }
                all += data.len();
                plain_so_far &= is_plain;
                if plain_so_far {
                    prefix.extend_from_slice(data);
                }
                stream.extend(record);
            }
        }
    }
    (stream, all, prefix)
}

/// Feeds `reads` to `session`; the outcome and the plaintext.
fn feed<'a>(
    mut session: TlsConn,
    reads: impl Iterator<Item = &'a [u8]>,
) -> (Result<(), Failure>, Vec<u8>) {
    let mut plain = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for read in reads {
        let mut read = read.to_vec();
        let result = session.receive(&mut read);
        let mut wire = Wire::default();
        session.take_pending(&mut wire);
        // An alert (24 bytes sealed) and a key update (27) at most.
        assert!(wire.len() <= 64, "{} bytes queued to send", wire.len());
        loop {
            let n = session.read_plain(&mut buf);
            if n == 0 {
                break;
            }
            plain.extend_from_slice(&buf[..n]);
        }
        if let Err(why) = result {
            assert_eq!(
                why,
                Failure::Protocol,
                "an established session fails as protocol"
            );
            assert_eq!(session.held(), 0, "a failed session holds nothing");
            assert_eq!(
                session.receive(&mut [23, 3, 3, 0, 17]),
                Err(why),
                "failure is final"
            );
            return (Err(why), plain);
        }
        assert!(
            session.held() <= 2 * MAX_HELD,
            "{} bytes held",
            session.held()
        );
    }
    (Ok(()), plain)
}

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    on_worker_stack(move || check(&data));
});

fn check(data: &[u8]) {
    let reads = Reads::new(data);
    let items = reads.stream();
    // The same keys for both feeds: two sessions, one forger per session
    // (each session's client keys differ), the same items.
    let (cut_session, mut cut_forger) = session();
    let (cut_stream, all, prefix) = build(items, &mut cut_forger);
    let (whole_session, mut whole_forger) = session();
    let (whole_stream, _, _) = build(items, &mut whole_forger);
    // `Reads` cuts the ciphertext with the input's cut bytes.
    let cuts_len = data.len() - items.len();
    let mut cut_input = data[..cuts_len].to_vec();
    cut_input.extend_from_slice(&cut_stream);
    let (cut, cut_plain) = feed(cut_session, Reads::new(&cut_input));
    let (whole, whole_plain) = feed(
        whole_session,
        std::iter::once(&whole_stream[..]).filter(|s| !s.is_empty()),
    );
    assert_eq!(cut, whole, "cutting the stream changed the outcome");
    assert!(cut_plain.len() <= all, "more plaintext than was sent");
    if cut.is_ok() {
        assert_eq!(
            cut_plain, whole_plain,
            "cutting the stream changed the plaintext"
        );
        assert!(
            cut_plain.starts_with(&prefix),
            "plain application data before any other record was lost"
        );
    } else {
        // A failing read's plaintext goes with the session (the backend
        // sends the alert and closes), so how much came out before the
        // failure depends on the cuts; what came out is still the data in
        // order.
        assert!(
            prefix.starts_with(&cut_plain) || cut_plain.starts_with(&prefix),
            "plaintext out of order"
        );
        assert!(
            prefix.starts_with(&whole_plain) || whole_plain.starts_with(&prefix),
            "plaintext out of order"
        );
    }
}
