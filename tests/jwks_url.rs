//! `--jwks URL`, end to end, against a JWKS host run by the test (a
//! `std::net` listener on loopback that serves what the test sets and
//! counts the requests): the keys fetched at start verify tokens; a
//! rotated key is refused `401 unknown_key` once and then accepted after
//! the re-fetch that refusal asked for; a flood of unknown `kid`s fetches
//! at most once per interval; a bad answer keeps the keys in force and is
//! counted; a host down at start delays nothing and its keys are taken
//! when it comes up; `https://` trusts the roots `SSL_CERT_FILE` names
//! and no others.

mod common;

use base64::Engine;
use common::*;
use corecast::server::auth::{DEFAULT_LEEWAY, JwtSettings, parse_jwks};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const KEY_A: &[u8] = b"the first HMAC secret, 32 bytes+";
const KEY_B: &[u8] = b"the second HMAC secret, rotated in";

/// What the JWKS host answers.
#[derive(Clone)]
struct Answer {
    status: u16,
    body: Vec<u8>,
    /// Sent with `Transfer-Encoding: chunked` rather than a length.
    chunked: bool,
}

impl Answer {
    fn ok(body: Vec<u8>) -> Self {
        Self {
            status: 200,
            body,
            chunked: false,
        }
    }
}

/// A JWKS of HMAC secrets, `(kid, secret)`.
fn jwks(keys: &[(&str, &[u8])]) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let keys: Vec<_> = keys
        .iter()
        .map(|(kid, k)| json!({"kty": "oct", "alg": "HS256", "kid": kid, "k": b64.encode(k)}))
        .collect();
    json!({ "keys": keys }).to_string().into_bytes()
}

/// An HTTP/1.1 host on loopback serving one [`Answer`] to every request
/// (plain, or TLS with `tls`), one connection at a time, each closed after
/// its answer.
struct JwksHost {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl JwksHost {
    fn start(answer: Answer) -> Self {
        Self::on(TcpListener::bind("127.0.0.1:0").unwrap(), answer, None)
    }

    fn on(listener: TcpListener, answer: Answer, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(Mutex::new(answer));
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (answer, requests, stop) = (answer.clone(), requests.clone(), stop.clone());
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    let Ok(tcp) = conn else { continue };
                    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let reply = answer.lock().unwrap().clone();
                    let served = match &tls {
                        None => serve(tcp, &reply),
                        Some(config) => {
                            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                            serve(rustls::StreamOwned::new(conn, tcp), &reply)
                        }
                    };
                    if served {
                        requests.fetch_add(1, Ordering::AcqRel);
                    }
                }
            })
        };
        Self {
            addr,
            answer,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    /// Requests answered so far.
    fn requests(&self) -> usize {
        self.requests.load(Ordering::Acquire)
    }
}

impl Drop for JwksHost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request head on `s` and writes `reply`; `false` if no
/// request came (a probe, a failed TLS handshake).
fn serve(mut s: impl Read + Write, reply: &Answer) -> bool {
    let mut head = Vec::new();
    let mut b = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
    }
    assert!(head.starts_with(b"GET /.well-known/jwks.json HTTP/1.1\r\n"));
    let mut out = format!(
        "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nConnection: close\r\n",
        reply.status
    )
    .into_bytes();
    if reply.chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
        for chunk in reply.body.chunks(100) {
            out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
    } else {
        out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", reply.body.len()).as_bytes());
        out.extend_from_slice(&reply.body);
    }
    let _ = s.write_all(&out);
    let _ = s.flush();
    true
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A subscriber's token for topic `t`, signed by `secret` under `kid`.
fn token(kid: &str, secret: &[u8]) -> String {
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some(kid.into());
    encode(
        &h,
        &json!({"sub": "alice", "exp": now() + 3600, "corecast": {"subscribe": ["t"]}}),
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// The whole answer to a subscriber's upgrade with `token`: `101 …` (the
/// connection is then dropped), or a refusal with its reason.
fn upgrade_with(addr: SocketAddr, token: &str) -> String {
    let mut s = raw(addr);
    s.write_all(upgrade_request_with(&format!("/ws?topics=t&token={token}"), "").as_bytes())
        .unwrap();
    let head = read_head(&mut s);
    if head.starts_with("HTTP/1.1 101 ") {
        return head;
    }
    head + &String::from_utf8_lossy(&read_to_eof(&mut s))
}

fn settings(url: &str) -> JwtSettings {
    JwtSettings {
        keys: Vec::new(),
        jwks: Some(parse_jwks(url).unwrap()),
        audience: Vec::new(),
        issuer: Vec::new(),
        leeway: DEFAULT_LEEWAY,
        anonymous_subscribe: false,
    }
}

/// Polls `addr` with `token` until it is upgraded, for at most `limit`.
fn accepted_within(addr: SocketAddr, token: &str, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    loop {
        if upgrade_with(addr, token).starts_with("HTTP/1.1 101 ") {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_token_signed_by_a_key_of_the_jwks_url_is_accepted_from_the_start() {
    let host = JwksHost::start(Answer::ok(jwks(&[("a", KEY_A)])));
    let server = start_with(|c| c.jwt = Some(settings(&host.url())));
    let addr = server.local_addr();
    // Fetched before the workers took connections: no wait.
    let r = upgrade_with(addr, &token("a", KEY_A));
    assert!(r.starts_with("HTTP/1.1 101 "), "{r}");
    let forged = upgrade_with(addr, &token("a", KEY_B));
    assert!(
        forged.starts_with("HTTP/1.1 401 ") && forged.contains("token invalid"),
        "{forged}"
    );
    assert_eq!(host.requests(), 1);
    let m = server.metrics();
    assert_eq!(metric(&m, "corecast_jwks_fetches_total{result=\"ok\"}"), 1);
    assert_eq!(
        metric(&m, "corecast_jwks_fetches_total{result=\"error\"}"),
        0
    );
    let last = metric(&m, "corecast_jwks_last_success_seconds");
    assert!(last + 60 > now() && last <= now(), "{last}");
}

#[test]
fn a_rotated_key_is_refused_as_unknown_then_accepted_after_the_refetch_it_asked_for() {
    let host = JwksHost::start(Answer::ok(jwks(&[("a", KEY_A)])));
    let server = start_with(|c| c.jwt = Some(settings(&host.url())));
    let addr = server.local_addr();
    assert!(upgrade_with(addr, &token("a", KEY_A)).starts_with("HTTP/1.1 101 "));
    // The issuer rotates: b is added (chunked this time), a withdrawn.
    host.set(Answer {
        chunked: true,
        ..Answer::ok(jwks(&[("b", KEY_B)]))
    });
    let first = upgrade_with(addr, &token("b", KEY_B));
    assert!(
        first.starts_with("HTTP/1.1 401 ") && first.contains("token key unknown"),
        "refused at once, without waiting for the fetch: {first}"
    );
    assert!(
        accepted_within(addr, &token("b", KEY_B), Duration::from_secs(10)),
        "the new key never came in force"
    );
    assert_eq!(host.requests(), 2, "one fetch at start, one for the kid");
    let gone = upgrade_with(addr, &token("a", KEY_A));
    assert!(
        gone.starts_with("HTTP/1.1 401 ") && gone.contains("token key unknown"),
        "{gone}"
    );
    let m = server.metrics();
    assert!(metric(&m, "corecast_auth_refused_total{reason=\"unknown_key\"}") >= 2);
    assert_eq!(metric(&m, "corecast_jwks_fetches_total{result=\"ok\"}"), 2);
}

#[test]
fn a_flood_of_unknown_kids_fetches_the_jwks_at_most_once_per_interval() {
    let host = JwksHost::start(Answer::ok(jwks(&[("a", KEY_A)])));
    let server = start_with(|c| c.jwt = Some(settings(&host.url())));
    let addr = server.local_addr();
    const FLOOD: u64 = 300;
    for i in 0..FLOOD {
        let r = upgrade_with(addr, &token(&format!("random-{i}"), KEY_A));
        assert!(r.starts_with("HTTP/1.1 401 "), "{r}");
    }
    // The first unknown kid is fetched for; the rest fall within
    // UNKNOWN_KID_INTERVAL (30 s) of it.
    assert!(eventually(Duration::from_secs(5), || host.requests() == 2));
    thread::sleep(Duration::from_millis(500));
    assert_eq!(host.requests(), 2, "at start and once for {FLOOD} kids");
    let m = server.metrics();
    assert_eq!(
        metric(&m, "corecast_auth_refused_total{reason=\"unknown_key\"}"),
        FLOOD
    );
    // Known keys are unaffected.
    assert!(upgrade_with(addr, &token("a", KEY_A)).starts_with("HTTP/1.1 101 "));
}

#[test]
fn an_answer_that_is_not_a_good_key_set_keeps_the_keys_in_force_and_counts_an_error() {
    let good = jwks(&[("a", KEY_A)]);
    let host = JwksHost::start(Answer::ok(good.clone()));
    let cert = test_cert();
    let config = cert.dir.join("corecast.toml");
    write_config(&config, &format!("jwks = \"{}\"\n", host.url()));
    let server = ChildServer::start(&["--config", config.to_str().unwrap()], None);
    let addr = server.addr;
    let ok = token("a", KEY_A);
    assert!(upgrade_with(addr, &ok).starts_with("HTTP/1.1 101 "));
    let mut oversized = good.clone();
    oversized.resize(1024 * 1024 + 1, b' ');
    // Each bad answer, and what its logged failure says.
    let bad = [
        (
            Answer::ok(b"<html>an error page</html>".to_vec()),
            "expected value",
        ),
        (
            Answer {
                status: 404,
                ..Answer::ok(good.clone())
            },
            "answered 404",
        ),
        (
            Answer {
                status: 302,
                ..Answer::ok(Vec::new())
            },
            "answered 302",
        ),
        (Answer::ok(oversized), "larger than"),
        (
            Answer::ok(br#"{"keys": [{"kty": "oct", "kid": "a", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}]}"#.to_vec()),
            "has no \"alg\"",
        ),
        (
            Answer::ok(jwks(&[("a", b"too short")])),
            "at least 32 bytes",
        ),
    ];
    for (n, (answer, why)) in (1..).zip(bad) {
        host.set(answer);
        // A reload fetches again at once.
        server.hup();
        server.wait_reloads("ok", n);
        let logged = eventually(Duration::from_secs(10), || {
            server.log_count("JWKS fetch failed") >= n as usize && server.log_count(why) >= 1
        });
        assert!(logged, "answer {n} ({why}):\n{}", server.log_text());
        let r = upgrade_with(addr, &ok);
        assert!(r.starts_with("HTTP/1.1 101 "), "answer {n}: {r}");
    }
    // One error counted per fetch (a retry after a failure, on a slow
    // machine, may add one), the one success at start.
    let m = server.metrics();
    assert!(metric(&m, "corecast_jwks_fetches_total{result=\"error\"}") >= 6);
    assert_eq!(metric(&m, "corecast_jwks_fetches_total{result=\"ok\"}"), 1);
    // A good set again is taken at the next reload.
    host.set(Answer::ok(jwks(&[("b", KEY_B)])));
    server.hup();
    assert!(accepted_within(
        addr,
        &token("b", KEY_B),
        Duration::from_secs(10)
    ));
}

#[test]
fn a_jwks_host_down_at_start_delays_nothing_and_its_keys_are_taken_when_it_comes_up() {
    // A port nothing listens on yet (taken by the host later).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/.well-known/jwks.json");
    let started = Instant::now();
    let server = ChildServer::start(&["--jwks", &url], None);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        server.log_count("JWKS unreachable at start"),
        1,
        "{}",
        server.log_text()
    );
    let ok = token("a", KEY_A);
    let r = upgrade_with(server.addr, &ok);
    assert!(
        r.starts_with("HTTP/1.1 401 ") && r.contains("token keys not loaded yet"),
        "{r}"
    );
    let m = server.metrics();
    assert!(
        metric(
            &m,
            "corecast_auth_refused_total{reason=\"keys_unavailable\"}"
        ) >= 1
    );
    assert!(metric(&m, "corecast_jwks_fetches_total{result=\"error\"}") >= 1);
    assert_eq!(metric(&m, "corecast_jwks_last_success_seconds"), 0);
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("the port is still free");
    let _host = JwksHost::on(listener, Answer::ok(jwks(&[("a", KEY_A)])), None);
    // Retries back off from 1 s: within a few.
    assert!(
        accepted_within(server.addr, &ok, Duration::from_secs(20)),
        "{}",
        server.log_text()
    );
    assert!(metric(&server.metrics(), "corecast_jwks_last_success_seconds") > 0);
}

/// A TLS configuration serving `cert` (aws-lc-rs, as the server's own).
fn tls_server_config(cert: &TestCert) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let key = PrivateKeyDer::from_pem_file(&cert.key).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der.clone()], key)
            .unwrap(),
    )
}

#[test]
fn an_https_jwks_is_trusted_through_ssl_cert_file_and_not_otherwise() {
    let cert = test_cert();
    let host = JwksHost::on(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        Answer::ok(jwks(&[("a", KEY_A)])),
        Some(tls_server_config(&cert)),
    );
    let url = format!("https://{}/.well-known/jwks.json", host.addr);
    let ok = token("a", KEY_A);
    let trusting = ChildServer::start_with_env(
        &["--jwks", &url],
        &[("SSL_CERT_FILE", cert.cert.to_str().unwrap())],
    );
    let r = upgrade_with(trusting.addr, &ok);
    assert!(
        r.starts_with("HTTP/1.1 101 "),
        "{r}\n{}",
        trusting.log_text()
    );
    // Roots that do not hold it: another certificate made a moment ago.
    let other = test_cert();
    let doubting = ChildServer::start_with_env(
        &["--jwks", &url],
        &[("SSL_CERT_FILE", other.cert.to_str().unwrap())],
    );
    let r = upgrade_with(doubting.addr, &ok);
    assert!(r.starts_with("HTTP/1.1 401 "), "{r}");
    let m = doubting.metrics();
    assert!(metric(&m, "corecast_jwks_fetches_total{result=\"error\"}") >= 1);
    assert_eq!(metric(&m, "corecast_jwks_fetches_total{result=\"ok\"}"), 0);
}
