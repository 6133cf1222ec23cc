//! Unit tests for [`TlsConn`](super::TlsConn): records, alerts, the
//! handshake bound and the wire layer's buffers, driven by a rustls client.

use super::*;
use std::io::{Read, Write};

fn configs() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
    configs_with(rustls::DEFAULT_VERSIONS)
}

/// The client offers `versions`, and its keys can be taken out (to
/// write records a rustls client would not).
fn configs_with(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(signing_key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
    // As `tls::load` sets it: TLS 1.3 sessions move to `record.rs`.
    server.enable_secret_extraction = true;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.enable_secret_extraction = true;
    (Arc::new(server), Arc::new(client))
}

/// A server session and an independent (buffered) rustls client,
/// connected in memory.
struct Pair {
    server: TlsConn,
    client: rustls::ClientConnection,
    wire: Wire,
    /// What the client decrypted.
    got: Vec<u8>,
}

impl Pair {
    /// A TLS 1.3 session: past its handshake, our record layer has it.
    fn new() -> Self {
        let pair = Self::with(configs());
        assert!(pair.server.is_own_records(), "TLS 1.3 leaves rustls");
        pair
    }

    fn with((server, client): (Arc<ServerConfig>, Arc<rustls::ClientConfig>)) -> Self {
        let mut pair = Pair {
            server: TlsConn::new(server, 8192).unwrap(),
            client: rustls::ClientConnection::new(client, "localhost".try_into().unwrap()).unwrap(),
            wire: Wire::default(),
            got: Vec::new(),
        };
        pair.pump();
        assert!(pair.server.is_established());
        assert_eq!(pair.server.just_established(), Some(false));
        pair
    }

    /// Moves ciphertext both ways until neither side has any to send.
    fn pump(&mut self) {
        for _ in 0..8 {
            let mut up = Vec::new();
            while self.client.wants_write() {
                self.client.write_tls(&mut up).unwrap();
            }
            if !up.is_empty() {
                self.server.receive(&mut up).unwrap();
            }
            self.server.take_pending(&mut self.wire);
            let down = self.wire.pending().to_vec();
            self.wire.consume(down.len());
            self.deliver(&down);
            if !self.client.wants_write() && !self.server.wants_write() {
                return;
            }
        }
    }

    fn deliver(&mut self, mut down: &[u8]) {
        while !down.is_empty() {
            self.client.read_tls(&mut down).unwrap();
            self.client.process_new_packets().unwrap();
            let _ = self.client.reader().read_to_end(&mut self.got);
        }
    }

    fn client_reads(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.got)
    }

    /// The client's pending ciphertext.
    fn client_sends(&mut self) -> Vec<u8> {
        let mut up = Vec::new();
        while self.client.wants_write() {
            self.client.write_tls(&mut up).unwrap();
        }
        up
    }

    /// The server encrypts `data`; the client must read it back.
    fn round_trip_down(&mut self, data: &[u8]) {
        let n = self
            .server
            .encrypt(&[IoSlice::new(data)], &mut self.wire, CIPHERTEXT_LIMIT);
        assert_eq!(n, data.len());
        let sent = self.wire.pending().to_vec();
        self.wire.consume(sent.len());
        self.deliver(&sent);
        assert_eq!(self.client_reads(), data);
    }

    /// The server's failure reaches the client as `alert`.
    fn client_gets_alert(&mut self, alert: rustls::AlertDescription) {
        let mut wire = Wire::default();
        self.server.take_pending(&mut wire);
        let mut down = wire.pending();
        assert!(!down.is_empty(), "an alert was sent");
        self.client.read_tls(&mut down).unwrap();
        match self.client.process_new_packets() {
            Err(rustls::Error::AlertReceived(a)) => assert_eq!(a, alert),
            other => panic!("client saw {other:?}, not {alert:?}"),
        }
    }
}

/// The nonce of record number `seq` (RFC 8446 §5.3: the IV XOR the
/// number), and the number moved on.
fn next_nonce(iv: &[u8; 12], seq: &mut u64) -> [u8; 12] {
    let mut nonce = *iv;
    for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
        *n ^= s;
    }
    *seq += 1;
    nonce
}

/// Records a rustls client would never send, sealed with its keys.
struct Forger {
    key: aws_lc_rs::aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    /// The server's direction, to read what it answers.
    rx: (aws_lc_rs::aead::LessSafeKey, [u8; 12], u64),
}

impl Forger {
    /// Takes the client's keys (the pair's client is spent).
    fn take(p: Pair) -> (TlsConn, Forger) {
        let secrets = p.client.dangerous_extract_secrets().unwrap();
        let keys = |(seq, secret)| {
            let rustls::ConnectionTrafficSecrets::Aes256Gcm { key, iv } = secret else {
                panic!("the default client agrees on AES-256-GCM")
            };
            let key = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, key.as_ref())
                .unwrap();
            let iv: [u8; 12] = iv.as_ref().try_into().unwrap();
            (aws_lc_rs::aead::LessSafeKey::new(key), iv, seq)
        };
        let (key, iv, seq) = keys(secrets.tx);
        let forger = Forger {
            key,
            iv,
            seq,
            rx: keys(secrets.rx),
        };
        (p.server, forger)
    }

    /// One record: outer type 23, `inner` (content, type, padding).
    fn record(&mut self, inner: &[u8]) -> Vec<u8> {
        let len = (inner.len() + 16) as u16;
        let mut out = vec![23, 3, 3];
        out.extend(len.to_be_bytes());
        let nonce = next_nonce(&self.iv, &mut self.seq);
        let mut body = inner.to_vec();
        let aad: [u8; 5] = out[..5].try_into().unwrap();
        self.key
            .seal_in_place_append_tag(
                aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                aws_lc_rs::aead::Aad::from(aad),
                &mut body,
            )
            .unwrap();
        out.extend(body);
        out
    }

    /// The inner plaintext (content, then its type) of the first
    /// record of what the server sent.
    fn open(&mut self, wire: &[u8]) -> Vec<u8> {
        let len = u16::from_be_bytes([wire[3], wire[4]]) as usize;
        let aad: [u8; 5] = wire[..5].try_into().unwrap();
        let (key, iv, seq) = &mut self.rx;
        let nonce = next_nonce(iv, seq);
        let mut body = wire[5..5 + len].to_vec();
        let plain = key
            .open_in_place(
                aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                aws_lc_rs::aead::Aad::from(aad),
                &mut body,
            )
            .unwrap();
        plain.to_vec()
    }
}

/// The content types of the records in `wire`.
fn records(mut wire: &[u8]) -> Vec<(u8, usize)> {
    let mut out = Vec::new();
    while wire.len() >= 5 {
        let len = u16::from_be_bytes([wire[3], wire[4]]) as usize;
        out.push((wire[0], len));
        wire = &wire[5 + len..];
    }
    assert!(wire.is_empty(), "records end at the wire's end");
    out
}

#[test]
fn small_frames_share_a_record_and_a_large_chunk_starts_its_own() {
    let mut p = Pair::new();
    let (small, large) = ([1u8; 64], [2u8; ALIGN_RECORDS_FROM]);
    let iov = [
        IoSlice::new(&small),
        IoSlice::new(&small),
        IoSlice::new(&large),
        IoSlice::new(&small),
    ];
    let taken = p.server.encrypt(&iov, &mut p.wire, CIPHERTEXT_LIMIT);
    assert_eq!(taken, 128 + ALIGN_RECORDS_FROM + 64);
    let sent = p.wire.pending().to_vec();
    let data = records(&sent);
    assert_eq!(data.len(), 3, "two small, the large, one small: {data:?}");
    assert!(data.iter().all(|&(ty, _)| ty == 23));
    p.wire.consume(sent.len());
    p.deliver(&sent);
    let mut want = Vec::new();
    want.extend_from_slice(&small);
    want.extend_from_slice(&small);
    want.extend_from_slice(&large);
    want.extend_from_slice(&small);
    assert_eq!(p.client_reads(), want);
}

/// `tls::load`'s configuration chooses AES-128-GCM for a client that
/// prefers AES-256-GCM (a rustls client's default order), in TLS 1.3
/// and 1.2; a client without AES-128-GCM gets its own choice; and the
/// records flow either way.
#[test]
fn the_loaded_configuration_chooses_aes_128_gcm_first() {
    use rustls::CipherSuite as S;
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let dir = std::env::temp_dir().join(format!("corecast-suites-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), signing_key.serialize_pem()).unwrap();
    let settings = super::super::TlsSettings {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        min_version: super::super::MinVersion::Tls12,
    };
    let loaded = super::super::load(&settings, &super::super::Resumption::new().unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let cases = [
        (None, &rustls::version::TLS13, S::TLS13_AES_128_GCM_SHA256),
        (
            None,
            &rustls::version::TLS12,
            S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
        (
            Some(vec![
                cs::TLS13_AES_256_GCM_SHA384,
                cs::TLS13_CHACHA20_POLY1305_SHA256,
            ]),
            &rustls::version::TLS13,
            S::TLS13_AES_256_GCM_SHA384,
        ),
        (
            Some(vec![cs::TLS13_CHACHA20_POLY1305_SHA256]),
            &rustls::version::TLS13,
            S::TLS13_CHACHA20_POLY1305_SHA256,
        ),
    ];
    for (only, version, want) in cases {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        assert_eq!(
            provider.cipher_suites[0].suite(),
            S::TLS13_AES_256_GCM_SHA384,
            "the client prefers AES-256-GCM"
        );
        if let Some(only) = only {
            provider.cipher_suites = only;
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut p = Pair::with((Arc::clone(&loaded.config), Arc::new(client)));
        assert_eq!(p.client.negotiated_cipher_suite().unwrap().suite(), want);
        p.round_trip_down(b"tick");
    }
}

#[test]
fn encryption_stops_at_the_limit_and_goes_on_where_it_stopped() {
    let mut p = Pair::new();
    let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let mut at = 0;
    let mut got = Vec::new();
    while at < big.len() {
        let n = p
            .server
            .encrypt(&[IoSlice::new(&big[at..])], &mut p.wire, CIPHERTEXT_LIMIT);
        assert!(n > 0);
        assert!(
            p.wire.len() < CIPHERTEXT_LIMIT + 2 * (MAX_RECORD_PLAINTEXT + RECORD_OVERHEAD),
            "{}",
            p.wire.len()
        );
        at += n;
        let sent = p.wire.pending().to_vec();
        p.wire.consume(sent.len());
        p.deliver(&sent);
        got.extend(p.client_reads());
    }
    assert_eq!(got, big);
}

/// The io_uring backend's scratch hand-back: a buffer taken from one
/// wire and adopted by another is the same allocation, filled from its
/// start, and the wire it left holds nothing.
#[test]
fn a_wire_buffer_moves_between_wires_without_reallocating() {
    let mut a = Wire::default();
    a.extend(&[1u8; 3000]);
    a.consume(3000);
    let buf = a.take_buffer();
    let at = buf.as_ptr();
    assert_eq!((a.capacity(), a.len()), (0, 0));
    let mut b = Wire::default();
    b.adopt(buf);
    b.extend(b"abc");
    assert_eq!(b.pending(), b"abc");
    assert_eq!(
        b.pending().as_ptr(),
        at,
        "the same allocation, from its start"
    );
    let mut n = Pair::new();
    let taken = n.server.encrypt(
        &[IoSlice::new(b"sealed into an adopted buffer")],
        &mut b,
        CIPHERTEXT_LIMIT,
    );
    assert_eq!(taken, 29);
    assert_eq!(b.pending()[..3], *b"abc");
    n.deliver(&b.pending()[3..]);
    assert_eq!(n.client_reads(), b"sealed into an adopted buffer");
}

#[test]
fn client_data_is_decrypted_and_an_idle_session_holds_no_buffer() {
    let mut p = Pair::new();
    p.client.writer().write_all(b"hello").unwrap();
    p.pump();
    let mut buf = [0u8; 64];
    let n = p.server.read_plain(&mut buf);
    assert_eq!(&buf[..n], b"hello");
    assert_eq!(p.server.read_plain(&mut buf), 0);
    let n = p
        .server
        .encrypt(&[IoSlice::new(b"world")], &mut p.wire, CIPHERTEXT_LIMIT);
    assert_eq!(n, 5);
    let sent = p.wire.pending().to_vec();
    p.wire.consume(sent.len());
    p.wire.free();
    p.deliver(&sent);
    assert_eq!(p.client_reads(), b"world");
    assert_eq!(p.server.held(), 0, "an idle session buffers nothing");
}

#[test]
fn a_record_split_across_reads_is_kept_until_whole() {
    let mut p = Pair::new();
    p.client.writer().write_all(&[7u8; 3000]).unwrap();
    let mut up = Vec::new();
    while p.client.wants_write() {
        p.client.write_tls(&mut up).unwrap();
    }
    let mut buf = vec![0u8; 4096];
    let (a, b) = up.split_at_mut(1000);
    p.server.receive(a).unwrap();
    assert_eq!(p.server.read_plain(&mut buf), 0);
    assert!(p.server.held() >= 1000, "the partial record is held");
    p.server.receive(b).unwrap();
    assert_eq!(p.server.read_plain(&mut buf), 3000);
    assert_eq!(p.server.held(), 0);
}

#[test]
fn close_notify_is_seen_after_the_data_before_it() {
    let mut p = Pair::new();
    p.client.writer().write_all(b"last").unwrap();
    p.client.send_close_notify();
    p.pump();
    assert!(!p.server.peer_closed(), "data first");
    let mut buf = [0u8; 16];
    assert_eq!(p.server.read_plain(&mut buf), 4);
    assert!(p.server.peer_closed());
    p.server.close();
    assert!(p.server.wants_write(), "our close_notify");
}

#[test]
fn garbage_after_the_handshake_fails_with_an_alert() {
    let mut p = Pair::new();
    let mut junk = [23u8, 3, 3, 0, 40].to_vec();
    junk.extend([0u8; 40]);
    assert_eq!(p.server.receive(&mut junk), Err(Failure::Protocol));
    let mut wire = Wire::default();
    p.server.take_pending(&mut wire);
    assert_eq!(records(wire.pending()).len(), 1, "one alert record");
    assert_eq!(p.server.receive(&mut [23u8]), Err(Failure::Protocol));
    assert_eq!(p.server.held(), 0);
}

#[test]
fn plain_http_and_garbage_hellos_are_told_apart() {
    let (server, _) = configs();
    let mut s = TlsConn::new(server.clone(), 8192).unwrap();
    let mut req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    assert_eq!(s.receive(&mut req), Err(Failure::PlainHttp));
    let mut s = TlsConn::new(server, 8192).unwrap();
    let mut junk = [22u8, 3, 1, 0, 4, 9, 9, 9, 9].to_vec();
    assert_eq!(s.receive(&mut junk), Err(Failure::Handshake));
}

#[test]
fn a_handshake_flight_past_its_limit_fails() {
    let (server, _) = configs();
    let mut s = TlsConn::new(server, 0).unwrap();
    // A ClientHello announcing a long message (which rustls would
    // reassemble up to 64 KiB), its records dribbled in: refused once
    // past the flight limit, holding nothing.
    let mut flight = Vec::new();
    for i in 0..4 {
        flight.extend_from_slice(&[22u8, 3, 1, 0x40, 0]);
        let mut record = vec![0u8; 0x4000];
        if i == 0 {
            record[..4].copy_from_slice(&[1, 0, 0xff, 0xff]);
        }
        flight.extend_from_slice(&record);
    }
    let mut result = Ok(());
    let mut sent = 0;
    for chunk in flight.chunks(4096) {
        result = s.receive(&mut chunk.to_vec());
        sent += chunk.len();
        if result.is_err() {
            break;
        }
    }
    assert_eq!(result, Err(Failure::Handshake));
    assert!(
        sent <= 16 * 1024 + 4096,
        "refused within one read of the limit"
    );
    // Told so with a fatal alert in the clear (nothing was said before).
    let mut wire = Wire::default();
    s.take_pending(&mut wire);
    assert_eq!(wire.pending(), PLAIN_INTERNAL_ERROR);
    assert_eq!(s.held(), 0);
}

/// A ClientHello past the handshake's bound is refused with the same
/// answer however the network cuts it: a fatal alert in the clear, never
/// the server's flight (which rustls writes when the whole hello arrives
/// in the read that crosses the bound) followed by a close.
#[test]
fn a_client_hello_past_the_bound_gets_one_answer_however_it_is_cut() {
    let (server, client) = configs();
    let hello = padded_client_hello(&client, 30_000);
    assert!(hello.len() > 16 * 1024 + 8192);
    for cut in [hello.len(), 20_000, 16_384, 4096, 1000] {
        let mut s = TlsConn::new(server.clone(), 8192).unwrap();
        let mut result = Ok(());
        for chunk in hello.chunks(cut) {
            result = s.receive(&mut chunk.to_vec());
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(Failure::Handshake), "cut {cut}");
        let mut wire = Wire::default();
        s.take_pending(&mut wire);
        assert_eq!(wire.pending(), PLAIN_INTERNAL_ERROR, "cut {cut}");
        assert_eq!(s.held(), 0);
    }
    // Within the bound, the same padding is taken and answered.
    let hello = padded_client_hello(&client, 10_000);
    for cut in [hello.len(), 4096] {
        let mut s = TlsConn::new(server.clone(), 8192).unwrap();
        for chunk in hello.chunks(cut) {
            assert_eq!(s.receive(&mut chunk.to_vec()), Ok(()), "cut {cut}");
        }
        let mut wire = Wire::default();
        s.take_pending(&mut wire);
        assert_eq!(wire.pending().first(), Some(&22), "cut {cut}");
    }
}

/// A rustls client's ClientHello with an unknown (GREASE) extension of
/// `pad` zero bytes first, in records of 2^14 bytes.
fn padded_client_hello(client: &Arc<rustls::ClientConfig>, pad: usize) -> Vec<u8> {
    let record = client_hello(client);
    let msg = &record[5..];
    assert_eq!(msg[0], 1, "a ClientHello");
    let body = &msg[4..];
    // version, random, session id, cipher suites, compression methods
    let mut at = 2 + 32;
    at += 1 + body[at] as usize;
    at += 2 + u16::from_be_bytes([body[at], body[at + 1]]) as usize;
    at += 1 + body[at] as usize;
    let ext_len = u16::from_be_bytes([body[at], body[at + 1]]) as usize;
    let mut exts = vec![0xfa, 0xfa];
    exts.extend_from_slice(&(pad as u16).to_be_bytes());
    exts.resize(exts.len() + pad, 0);
    exts.extend_from_slice(&body[at + 2..at + 2 + ext_len]);
    let mut new_body = body[..at].to_vec();
    new_body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    new_body.extend_from_slice(&exts);
    let mut msg = vec![1];
    msg.extend_from_slice(&(new_body.len() as u32).to_be_bytes()[1..]);
    msg.extend_from_slice(&new_body);
    let mut out = Vec::new();
    for part in msg.chunks(16 * 1024) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// A rustls client's first flight: its ClientHello, one record.
fn client_hello(client: &Arc<rustls::ClientConfig>) -> Vec<u8> {
    let mut c =
        rustls::ClientConnection::new(client.clone(), "localhost".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut hello).unwrap();
    }
    assert_eq!(records(&hello).len(), 1);
    hello
}

#[test]
fn a_record_over_the_limit_before_the_handshake_is_refused_on_its_header_with_record_overflow() {
    let (server, client) = configs();
    // rustls would wait for all of a record under 2^14 + 2 048 bytes,
    // then say decode_error: refused on the header, told so in the
    // clear. Before the server has spoken, every record is plaintext:
    // 2^14 bytes at most.
    for len in [16_385u16, 16_640, 16_641, 18_431, 18_432, 65_535] {
        let mut s = TlsConn::new(server.clone(), 8192).unwrap();
        let mut header = [22u8, 3, 1, (len >> 8) as u8, len as u8].to_vec();
        assert_eq!(s.receive(&mut header), Err(Failure::Handshake), "{len}");
        let mut wire = Wire::default();
        s.take_pending(&mut wire);
        assert_eq!(wire.pending(), PLAIN_RECORD_OVERFLOW, "{len}");
        assert_eq!(s.held(), 0);
    }
    // The largest a plaintext record may be waits for the rest.
    let mut s = TlsConn::new(server.clone(), 8192).unwrap();
    assert_eq!(s.receive(&mut [22u8, 3, 1, 0x40, 0x00].to_vec()), Ok(()));
    // After the server's flight, records may be encrypted: 2^14 + 256
    // waits, one more is refused, without an alert of ours in the clear
    // (its keys are rustls'). The same whether the header came in the
    // hello's read or after the flight was taken.
    for taken in [true, false] {
        for (len, refused) in [(0x4100u16, false), (0x4101, true)] {
            let mut s = TlsConn::new(server.clone(), 8192).unwrap();
            let mut input = client_hello(&client);
            if taken {
                assert_eq!(s.receive(&mut input), Ok(()));
                input.clear();
                let mut flight = Wire::default();
                s.take_pending(&mut flight);
                assert!(!flight.is_empty());
            }
            input.extend_from_slice(&[23u8, 3, 3, (len >> 8) as u8, len as u8]);
            let got = s.receive(&mut input);
            assert_eq!(got.is_err(), refused, "{len} {taken}");
            if refused {
                let mut wire = Wire::default();
                s.take_pending(&mut wire);
                assert!(
                    !wire.pending().ends_with(&PLAIN_RECORD_OVERFLOW),
                    "{len} {taken}"
                );
            }
        }
    }
}

/// Record headers are read at record boundaries only, wherever the
/// reads cut: within a header, within a record, within a handshake
/// message that goes on in the next record.
#[test]
fn a_client_hello_cut_anywhere_is_answered_with_the_servers_flight() {
    let (server, client) = configs();
    let hello = client_hello(&client);
    // The same message in two records, cut 100 bytes in.
    let body = &hello[5..];
    let mut two = Vec::new();
    for part in [&body[..100], &body[100..]] {
        two.extend_from_slice(&[22, 3, 1]);
        two.extend_from_slice(&(part.len() as u16).to_be_bytes());
        two.extend_from_slice(part);
    }
    for flight in [hello, two] {
        let cuts = (1..16)
            .chain((16..flight.len()).step_by(29))
            .chain(100..112);
        for cut in cuts {
            let mut s = TlsConn::new(server.clone(), 8192).unwrap();
            for piece in [&flight[..cut], &flight[cut..]] {
                assert_eq!(s.receive(&mut piece.to_vec()), Ok(()), "cut at {cut}");
            }
            assert!(s.wants_write(), "cut at {cut}: the server's flight");
        }
    }
}

/// rustls joins a handshake message's pieces in place, over the headers
/// of the records after the first: the record a read ends in is
/// remembered, not read again from what rustls rewrote (the tls fuzz
/// target: a false record_overflow from a header read in the middle of
/// joined bytes).
#[test]
fn a_client_hello_in_many_records_read_in_small_pieces_is_answered() {
    let (server, client) = configs();
    let hello = client_hello(&client);
    let body = &hello[5..];
    for part_len in [1, 3, 40, 100] {
        let mut flight = Vec::new();
        for part in body.chunks(part_len) {
            flight.extend_from_slice(&[22, 3, 1]);
            flight.extend_from_slice(&(part.len() as u16).to_be_bytes());
            flight.extend_from_slice(part);
        }
        for read in [1, 2, 5, 7, 64, 300] {
            let mut s = TlsConn::new(server.clone(), 8192).unwrap();
            for piece in flight.chunks(read) {
                let got = s.receive(&mut piece.to_vec());
                assert_eq!(got, Ok(()), "records of {part_len}, reads of {read}");
            }
            assert!(s.wants_write(), "records of {part_len}, reads of {read}");
        }
    }
}

#[test]
fn a_freed_wire_buffer_serves_the_next_busy_connection() {
    let mut a = Wire::default();
    a.extend(&[1u8; 70_000]);
    let at = a.pending().as_ptr();
    a.consume(70_000);
    a.free();
    assert_eq!(a.capacity(), 0, "an idle connection holds no buffer");
    let mut b = Wire::default();
    b.extend(b"next");
    assert_eq!(b.pending().as_ptr(), at, "the pooled buffer, not a new one");
    assert_eq!(b.pending(), b"next");
    // Past the pool's size bound, a buffer goes back to the allocator.
    let mut big = Wire::default();
    big.extend(&vec![0u8; POOLED_WIRE_MAX_BYTES + 1]);
    big.consume(big.len());
    big.free();
    let mut c = Wire::default();
    c.extend(b"x");
    assert!(c.capacity() <= POOLED_WIRE_MAX_BYTES);
}

#[test]
fn data_sent_with_the_clients_finished_is_not_counted_against_the_handshake_bound() {
    // A client that writes its request before the handshake completes
    // (curl posting a body, say) sends its Finished and ~60 KiB of
    // application data in one flight, which the server reads at once:
    // past the handshake bound (16 KiB + the head bound) but not
    // handshake bytes.
    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let (server, client) = configs_with(versions);
        let mut server = TlsConn::new(server, 8192).unwrap();
        let mut client =
            rustls::ClientConnection::new(client, "localhost".try_into().unwrap()).unwrap();
        let body: Vec<u8> = (0..60 * 1024).map(|i| (i % 251) as u8).collect();
        client.writer().write_all(&body).unwrap();
        let mut got = Vec::new();
        for _ in 0..6 {
            let mut up = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut up).unwrap();
            }
            if !up.is_empty() {
                server.receive(&mut up).unwrap();
            }
            let mut buf = [0u8; 16 * 1024];
            loop {
                let n = server.read_plain(&mut buf);
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            let mut wire = Wire::default();
            server.take_pending(&mut wire);
            let mut down = wire.pending();
            while !down.is_empty() {
                client.read_tls(&mut down).unwrap();
                client.process_new_packets().unwrap();
            }
        }
        assert!(server.is_established());
        assert_eq!(got.len(), body.len(), "{versions:?}");
        assert!(got == body);
    }
}

#[test]
fn a_quiet_session_keeps_key_bytes_only_and_a_busy_one_its_contexts() {
    let mut p = Pair::new();
    // One message each way after the handshake: built for it, let go.
    p.client.writer().write_all(b"GET").unwrap();
    p.pump();
    let mut buf = [0u8; 8];
    assert_eq!(p.server.read_plain(&mut buf), 3);
    p.round_trip_down(b"101");
    assert_eq!(
        p.server.built(),
        Some((false, false)),
        "one use builds and drops"
    );
    // Busy: the second use in a sweep period keeps the send context.
    p.round_trip_down(b"a");
    assert_eq!(p.server.built(), Some((false, true)));
    p.round_trip_down(b"b");
    p.server.sweep();
    assert_eq!(
        p.server.built(),
        Some((false, true)),
        "used in the period: kept"
    );
    p.server.sweep();
    assert_eq!(
        p.server.built(),
        Some((false, false)),
        "a quiet period: let go"
    );
    // And it works on from the key bytes.
    p.round_trip_down(b"again");
    p.client.writer().write_all(b"up").unwrap();
    p.pump();
    assert_eq!(p.server.read_plain(&mut buf), 2);
    assert_eq!(&buf[..2], b"up");
}

#[test]
fn a_tls12_session_stays_with_rustls_and_works() {
    let mut p = Pair::with(configs_with(&[&rustls::version::TLS12]));
    assert!(!p.server.is_own_records());
    p.client.writer().write_all(b"up").unwrap();
    p.pump();
    let mut buf = [0u8; 8];
    assert_eq!(p.server.read_plain(&mut buf), 2);
    p.round_trip_down(b"down");
}

#[test]
fn key_updates_the_client_asks_for_are_answered_and_both_sides_go_on() {
    let mut p = Pair::new();
    for i in 0..5u8 {
        p.client.refresh_traffic_keys().unwrap();
        p.client.writer().write_all(&[i; 100]).unwrap();
        let mut up = p.client_sends();
        p.server.receive(&mut up).unwrap();
        let mut buf = [0u8; 256];
        assert_eq!(p.server.read_plain(&mut buf), 100);
        assert_eq!(buf[..100], [i; 100]);
        // Our own key update comes first, then the data, under the new
        // key (the client reads it only if it followed).
        let n = p
            .server
            .encrypt(&[IoSlice::new(b"after")], &mut p.wire, CIPHERTEXT_LIMIT);
        assert_eq!(n, 5);
        let sent = p.wire.pending().to_vec();
        p.wire.consume(sent.len());
        assert_eq!(records(&sent).len(), 2, "a key update, then the data");
        p.deliver(&sent);
        assert_eq!(p.client_reads(), b"after");
    }
}

#[test]
fn what_follows_the_client_finished_in_the_same_read_goes_to_our_record_layer() {
    // The client's Finished, a key update asking for ours, and data, in
    // one read: rustls must stop at the Finished (it would answer the
    // key update itself, out of our sight), the rest is ours.
    let (server, client) = configs();
    let mut server = TlsConn::new(server, 8192).unwrap();
    let mut client =
        rustls::ClientConnection::new(client, "localhost".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut hello).unwrap();
    }
    server.receive(&mut hello).unwrap();
    let mut flight = Wire::default();
    server.take_pending(&mut flight);
    let mut down = flight.pending();
    while !down.is_empty() {
        client.read_tls(&mut down).unwrap();
        client.process_new_packets().unwrap();
    }
    assert!(
        !client.is_handshaking(),
        "the client has its Finished to send"
    );
    client.refresh_traffic_keys().unwrap();
    client.writer().write_all(b"first words").unwrap();
    let mut up = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut up).unwrap();
    }
    server.receive(&mut up).unwrap();
    assert!(server.is_own_records());
    let mut buf = [0u8; 32];
    let n = server.read_plain(&mut buf);
    assert_eq!(&buf[..n], b"first words");
    let mut p = Pair {
        server,
        client,
        wire: Wire::default(),
        got: Vec::new(),
    };
    // The tickets, then our key update, then the reply: the client
    // reads the reply only under the keys it asked for (`encrypt` takes
    // what is pending first).
    p.round_trip_down(b"reply");
    p.round_trip_down(b"and on");
}

#[test]
fn empty_records_and_oversized_inner_plaintexts_are_bounded() {
    // 32 empty records in a row are read, the 33rd is one too many.
    let (mut server, mut forger) = Forger::take(Pair::new());
    for _ in 0..32 {
        assert_eq!(server.receive(&mut forger.record(b"\x17")), Ok(()));
    }
    assert_eq!(
        server.receive(&mut forger.record(b"\x17")),
        Err(Failure::Protocol)
    );
    // Data between them resets the count.
    let (mut server, mut forger) = Forger::take(Pair::new());
    for i in 0..100 {
        let inner: &[u8] = if i % 30 == 29 { b"x\x17" } else { b"\x17\0" };
        assert_eq!(
            server.receive(&mut forger.record(inner)),
            Ok(()),
            "record {i}"
        );
    }
    // Content, type and padding past 2^14 + 1 bytes: record_overflow,
    // however short the content.
    let (mut server, mut forger) = Forger::take(Pair::new());
    let mut inner = b"x\x17".to_vec();
    inner.resize(16_386, 0);
    assert_eq!(
        server.receive(&mut forger.record(&inner)),
        Err(Failure::Protocol)
    );
    let (mut server, mut forger) = Forger::take(Pair::new());
    inner.truncate(16_385);
    assert_eq!(server.receive(&mut forger.record(&inner)), Ok(()));
    // A fatal alert from the client ends it without ours, and so does
    // a warning TLS 1.3 does not have (an error alert whatever its
    // level, RFC 8446 §6); an alert of no known level is a decode error.
    let mut wire = Wire::default();
    assert_eq!(
        server.receive(&mut forger.record(b"\x02\x28\x15")),
        Err(Failure::Protocol)
    );
    server.take_pending(&mut wire);
    assert!(wire.is_empty(), "no alert answers a fatal alert");
    let (mut server, mut forger) = Forger::take(Pair::new());
    assert_eq!(
        server.receive(&mut forger.record(b"\x01\x28\x15")),
        Err(Failure::Protocol)
    );
    server.take_pending(&mut wire);
    assert!(
        wire.is_empty(),
        "no alert answers a warning-level error alert"
    );
    let (mut server, mut forger) = Forger::take(Pair::new());
    assert_eq!(
        server.receive(&mut forger.record(b"\x03\x28\x15")),
        Err(Failure::Protocol)
    );
    server.take_pending(&mut wire);
    assert!(!wire.is_empty(), "decode_error");
}

#[test]
fn too_many_key_updates_in_a_row_fail_the_session() {
    let mut p = Pair::new();
    let mut failed = None;
    for i in 0..40 {
        p.client.refresh_traffic_keys().unwrap();
        let mut up = p.client_sends();
        if p.server.receive(&mut up).is_err() {
            failed = Some(i);
            break;
        }
        // Answer the client, so that it follows our key changes.
        p.server
            .encrypt(&[IoSlice::new(b"")], &mut p.wire, CIPHERTEXT_LIMIT);
    }
    assert_eq!(failed, Some(32), "the 33rd in a row without data");
}

#[test]
fn a_tampered_record_fails_with_bad_record_mac() {
    let mut p = Pair::new();
    p.client.writer().write_all(b"secret").unwrap();
    let mut up = p.client_sends();
    *up.last_mut().unwrap() ^= 1;
    assert_eq!(p.server.receive(&mut up), Err(Failure::Protocol));
    p.client_gets_alert(rustls::AlertDescription::BadRecordMac);
    assert_eq!(p.server.held(), 0);
}

/// The alert each malformed message after the handshake gets (outside
/// probe: a key update of the wrong length was answered
/// unexpected_message, and a warning-level bad_certificate
/// decode_error).
#[test]
fn malformed_messages_after_the_handshake_get_the_rfcs_alerts() {
    const UNEXPECTED_MESSAGE: u8 = 10;
    const DECODE_ERROR: u8 = 50;
    let cases: [(&[u8], Option<u8>); 5] = [
        // KeyUpdate whose length says 2, two bytes of body.
        (b"\x18\0\0\x02\0\0\x16", Some(DECODE_ERROR)),
        // KeyUpdate whose length says 0.
        (b"\x18\0\0\0\x16", Some(DECODE_ERROR)),
        // A whole KeyUpdate and a byte after it in its record.
        (b"\x18\0\0\x01\0\x07\x16", Some(UNEXPECTED_MESSAGE)),
        // A warning-level alert TLS 1.3 does not have: the client
        // failed the session, nothing of ours answers it.
        (b"\x01\x2a\x15", None),
        // An alert of no level.
        (b"\x07\x00\x15", Some(DECODE_ERROR)),
    ];
    for (inner, alert) in cases {
        let (mut server, mut forger) = Forger::take(Pair::new());
        assert_eq!(
            server.receive(&mut forger.record(inner)),
            Err(Failure::Protocol),
            "{inner:?}"
        );
        let mut wire = Wire::default();
        server.take_pending(&mut wire);
        match alert {
            None => assert!(wire.is_empty(), "{inner:?}: no alert"),
            Some(code) => assert_eq!(
                forger.open(wire.pending()),
                [2, code, 21],
                "{inner:?}: fatal alert {code}"
            ),
        }
    }
}

#[test]
fn records_no_client_sends_after_the_handshake_fail_with_their_alerts() {
    use rustls::AlertDescription as A;
    // A change_cipher_spec, a plaintext alert, a plaintext handshake
    // record: unexpected_message; a record over 2^14 + 256: overflow.
    for (bytes, alert) in [
        (vec![20u8, 3, 3, 0, 1, 1], A::UnexpectedMessage),
        (vec![21u8, 3, 3, 0, 2, 2, 40], A::UnexpectedMessage),
        (vec![22u8, 3, 3, 0, 4, 24, 0, 0, 1], A::UnexpectedMessage),
        (vec![23u8, 3, 3, 0x41, 0x01], A::RecordOverflow),
    ] {
        let mut p = Pair::new();
        let mut bytes = bytes;
        assert_eq!(p.server.receive(&mut bytes), Err(Failure::Protocol));
        p.client_gets_alert(alert);
    }
}

#[test]
fn forged_inner_records_are_checked_like_rustls_would() {
    type Case = (&'static [&'static [u8]], Option<Failure>);
    let cases: [Case; 9] = [
        // Data with padding after its content type: fine.
        (&[b"hi\x17\0\0\0"], None),
        // An empty data record, and one of padding alone after it.
        (&[b"\x17", b"\x17\0"], None),
        // No content type at all (all padding): refused.
        (&[b"\0\0\0"], Some(Failure::Protocol)),
        // A key update split over two records: fine.
        (&[b"\x18\0\x16", b"\0\x01\x00\x16"], None),
        // A key update with a byte after it in its record.
        (&[b"\x18\0\0\x01\x00\x07\x16"], Some(Failure::Protocol)),
        // request_update 2: illegal.
        (&[b"\x18\0\0\x01\x02\x16"], Some(Failure::Protocol)),
        // A NewSessionTicket (or any other handshake message).
        (&[b"\x04\0\0\x01\x00\x16"], Some(Failure::Protocol)),
        // A key update cut by data.
        (&[b"\x18\0\x16", b"x\x17"], Some(Failure::Protocol)),
        // An alert other than close_notify or user_canceled.
        (&[b"\x02\x28\x15"], Some(Failure::Protocol)),
    ];
    for (i, (inners, expect)) in cases.iter().enumerate() {
        let (mut server, mut forger) = Forger::take(Pair::new());
        let mut result = Ok(());
        for inner in inners.iter() {
            let mut rec = forger.record(inner);
            result = server.receive(&mut rec);
        }
        assert_eq!(result.err(), *expect, "case {i}");
    }
    // user_canceled four times is read, the fifth is one too many.
    let (mut server, mut forger) = Forger::take(Pair::new());
    for _ in 0..4 {
        assert_eq!(server.receive(&mut forger.record(b"\x01\x5a\x15")), Ok(()));
    }
    let mut rec = forger.record(b"\x01\x5a\x15");
    assert_eq!(server.receive(&mut rec), Err(Failure::Protocol));
    // After a key update, the old key no longer opens anything.
    let (mut server, mut forger) = Forger::take(Pair::new());
    assert_eq!(
        server.receive(&mut forger.record(b"\x18\0\0\x01\x00\x16")),
        Ok(())
    );
    let mut rec = forger.record(b"x\x17");
    assert_eq!(server.receive(&mut rec), Err(Failure::Protocol));
}

#[test]
fn the_plain_http_answer_declares_its_length() {
    let text = std::str::from_utf8(PLAIN_HTTP_ANSWER).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let declared: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(declared, body.len());
}
