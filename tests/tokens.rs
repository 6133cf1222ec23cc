//! Tokens (`--jwt-key`, `--jwks`), end to end: who may subscribe and
//! publish, the exact refusals (401 by reason, 403 for a right the token
//! lacks, an error reply to a subscribe over an open connection), expiry
//! closing a WebSocket with 3000, anonymous subscribers, `--publish-token`
//! beside tokens, and a reload rotating the key.

mod common;

use common::*;
use corecast::server::auth::{DEFAULT_LEEWAY, JwtSettings};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::Message;
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::frame::coding::CloseCode;

/// A fresh HMAC secret in a file of its own (made at test time).
fn secret_file(dir: &Path, name: &str) -> (PathBuf, Vec<u8>) {
    let secret: Vec<u8> = (0..48)
        .map(|i| b"0123456789abcdef"[(i * 7 + name.len() + std::process::id() as usize) % 16])
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, &secret).unwrap();
    (path, secret)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(secret: &[u8], claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// A token for `sub` with these rights, valid for an hour.
fn rights(secret: &[u8], subscribe: &[&str], publish: &[&str]) -> String {
    token(
        secret,
        json!({"sub": "alice", "exp": now() + 3600,
               "corecast": {"subscribe": subscribe, "publish": publish}}),
    )
}

fn settings(key: &Path) -> JwtSettings {
    JwtSettings {
        keys: vec![format!("HS256={}", key.display())],
        jwks: None,
        audience: Vec::new(),
        issuer: Vec::new(),
        leeway: DEFAULT_LEEWAY,
        anonymous_subscribe: false,
    }
}

/// The whole answer to a request that is refused.
fn answer(addr: SocketAddr, req: &str) -> String {
    refused(addr, req.as_bytes())
}

/// A subscriber through tungstenite with `token` in the query.
fn subscriber(addr: SocketAddr, topics: &str, token: &str) -> Ws {
    let mut req = ws_url(addr, &format!("/ws?topics={topics}&token={token}"))
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "corecast.v1".parse().unwrap());
    let (ws, _) = tungstenite::connect(req).expect("allowed");
    ws
}

fn post_as(addr: SocketAddr, topic: &str, body: &[u8], bearer: &str) -> String {
    let req = post_with(
        topic,
        BINARY,
        body,
        &format!("Authorization: Bearer {bearer}\r\nConnection: close\r\n"),
    );
    let mut s = raw(addr);
    s.write_all(&req).unwrap();
    read_head(&mut s)
}

#[test]
fn subscribing_and_publishing_follow_the_rights_of_the_token() {
    let cert = test_cert();
    let (key, secret) = secret_file(&cert.dir, "hs256.key");
    let server = start_with(|c| {
        c.jwt = Some(settings(&key));
        c.publish_token = Some("back-end-secret".into());
    });
    let addr = server.local_addr();
    let reader = rights(&secret, &["prices.>", "user.{sub}.>"], &[]);

    // 401 by reason, 403 for a right the token lacks.
    let no_token = answer(addr, &upgrade_request_with("/ws?topics=prices.fx", ""));
    assert!(no_token.starts_with("HTTP/1.1 401 "), "{no_token}");
    assert!(no_token.contains("WWW-Authenticate: Bearer"), "{no_token}");
    assert!(no_token.contains("token required"), "{no_token}");
    let garbage = answer(
        addr,
        &upgrade_request_with("/ws?topics=prices.fx&token=abc.def.ghi", ""),
    );
    assert!(
        garbage.starts_with("HTTP/1.1 401 ") && garbage.contains("token invalid"),
        "{garbage}"
    );
    // A header that is not UTF-8 across the scheme: refused, not a crash.
    let r = answer(
        addr,
        &upgrade_request_with("/ws?topics=prices.fx", "Authorization: Bearer\u{e9}xx\r\n"),
    );
    assert!(r.starts_with("HTTP/1.1 401 "), "{r}");
    let other_key = rights(
        b"an entirely different secret, 32+ bytes",
        &["prices.>"],
        &[],
    );
    let forged = answer(
        addr,
        &upgrade_request_with(&format!("/ws?topics=prices.fx&token={other_key}"), ""),
    );
    assert!(forged.contains("token invalid"), "{forged}");
    let old = token(
        &secret,
        json!({"exp": now() - 3600, "corecast": {"subscribe": [">"]}}),
    );
    let expired = answer(
        addr,
        &upgrade_request_with(&format!("/ws?topics=prices.fx&token={old}"), ""),
    );
    assert!(
        expired.starts_with("HTTP/1.1 401 ") && expired.contains("token expired"),
        "{expired}"
    );
    for wider in [
        "news.a",
        "prices",
        ">",
        "user.bob.inbox",
        "prices.fx,news.a",
    ] {
        let r = answer(
            addr,
            &upgrade_request_with(&format!("/ws?topics={wider}&token={reader}"), ""),
        );
        assert!(
            r.starts_with("HTTP/1.1 403 ") && r.contains("grants no right"),
            "{wider}: {r}"
        );
    }
    // In the header too.
    let r = answer(
        addr,
        &upgrade_request_with(
            "/ws?topics=news.a",
            &format!("Authorization: Bearer {reader}\r\n"),
        ),
    );
    assert!(r.starts_with("HTTP/1.1 403 "), "{r}");

    // Within its rights (a pattern inside a wider one): subscribed.
    let mut sub = subscriber(addr, "prices.*.EUR,user.alice.inbox", &reader);
    // A reader cannot publish; a writer can, to its topics only; the
    // back end's --publish-token can publish anywhere.
    assert!(post_as(addr, "prices.fx.EUR", b"x", &reader).starts_with("HTTP/1.1 403 "));
    let writer = rights(&secret, &[], &["prices.fx.*"]);
    assert!(post_as(addr, "prices.fx.USD", b"x", &writer).starts_with("HTTP/1.1 204 "));
    assert!(post_as(addr, "prices.fx.EUR", b"from a writer", &writer).starts_with("HTTP/1.1 204 "));
    assert!(post_as(addr, "prices.eq.EUR", b"x", &writer).starts_with("HTTP/1.1 403 "));
    assert!(
        post_as(
            addr,
            "user.alice.inbox",
            b"from the back end",
            "back-end-secret"
        )
        .starts_with("HTTP/1.1 204 ")
    );
    let missing = answer(
        addr,
        &String::from_utf8(post_with(
            "prices.fx.EUR",
            BINARY,
            b"x",
            "Connection: close\r\n",
        ))
        .unwrap(),
    );
    assert!(missing.starts_with("HTTP/1.1 401 "), "{missing}");
    assert_eq!(read_env(&mut sub).payload, b"from a writer");
    assert_eq!(read_env(&mut sub).payload, b"from the back end");

    // A WebSocket publisher with a token.
    let mut req = ws_url(addr, "/publish/prices.fx.EUR")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {writer}").parse().unwrap());
    let (mut publisher, _) = tungstenite::connect(req).expect("a writer publishes");
    publisher.send(Message::text("over a socket")).unwrap();
    assert_eq!(read_env(&mut sub).payload, b"over a socket");

    // Over the open connection: a subscribe outside the rights is an
    // error reply, nothing changes, the connection stays.
    sub.send(Message::text(r#"{"op":"subscribe","topics":["news.a"]}"#))
        .unwrap();
    match read_incoming(&mut sub) {
        Incoming::Reply(v) => {
            assert_eq!(v["op"], "error", "{v}");
            assert!(v["reason"].as_str().unwrap().contains("not allowed"), "{v}");
        }
        Incoming::Pub(e) => panic!("{e:?}"),
    }
    // Nor what another topic's history holds.
    sub.send(Message::text(r#"{"op":"history","topics":["news.a"]}"#))
        .unwrap();
    match read_incoming(&mut sub) {
        Incoming::Reply(v) => assert_eq!(v["op"], "error", "{v}"),
        Incoming::Pub(e) => panic!("{e:?}"),
    }
    sub.send(Message::text(
        r#"{"op":"subscribe","topics":["prices.eq.>"]}"#,
    ))
    .unwrap();
    match read_incoming(&mut sub) {
        Incoming::Reply(v) => assert_eq!(v["op"], "subscribed", "{v}"),
        Incoming::Pub(e) => panic!("{e:?}"),
    }
    assert!(
        post_as(addr, "news.a", b"not for alice", "back-end-secret").starts_with("HTTP/1.1 204 ")
    );
    assert!(
        post_as(addr, "prices.eq.EUR", b"equity", "back-end-secret").starts_with("HTTP/1.1 204 ")
    );
    assert_eq!(read_env(&mut sub).payload, b"equity");

    let m = metrics(addr);
    assert_eq!(
        metric(&m, "corecast_auth_refused_total{reason=\"missing\"}"),
        3
    );
    assert_eq!(
        metric(&m, "corecast_auth_refused_total{reason=\"invalid\"}"),
        2
    );
    assert_eq!(
        metric(&m, "corecast_auth_refused_total{reason=\"expired\"}"),
        1
    );
    assert_eq!(
        metric(&m, "corecast_auth_refused_total{reason=\"forbidden\"}"),
        5 + 1 + 2 + 1 + 1
    );
}

#[test]
fn anonymous_subscribers_only_when_allowed_and_never_to_publish() {
    let cert = test_cert();
    let (key, _) = secret_file(&cert.dir, "anon.key");
    let server = start_with(|c| {
        let mut s = settings(&key);
        s.anonymous_subscribe = true;
        c.jwt = Some(s);
    });
    let addr = server.local_addr();
    let head = {
        let mut s = raw(addr);
        s.write_all(upgrade_request("/ws?topics=anything.at.all").as_bytes())
            .unwrap();
        read_head(&mut s)
    };
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let r = answer(
        addr,
        &String::from_utf8(post_with("t", BINARY, b"x", "Connection: close\r\n")).unwrap(),
    );
    assert!(r.starts_with("HTTP/1.1 401 "), "{r}");
    // A bad token is still refused: anonymity is not a fallback.
    let r = answer(addr, &upgrade_request_with("/ws?topics=a&token=x.y.z", ""));
    assert!(r.starts_with("HTTP/1.1 401 "), "{r}");
}

#[test]
fn a_websocket_whose_token_expires_is_closed_with_3000() {
    let cert = test_cert();
    let (key, secret) = secret_file(&cert.dir, "exp.key");
    let server = start_with(|c| {
        let mut s = settings(&key);
        s.leeway = Duration::ZERO;
        c.jwt = Some(s);
    });
    let addr = server.local_addr();
    let short = token(
        &secret,
        json!({"exp": now() + 2, "corecast": {"subscribe": ["t"]}}),
    );
    let mut ws = subscriber(addr, "t", &short);
    let lasting = rights(&secret, &["t"], &[]);
    let mut other = subscriber(addr, "t", &lasting);
    let started = Instant::now();
    let close = close_of(&mut ws);
    assert_eq!(close.code, CloseCode::from(3000));
    assert_eq!(close.reason, "token expired");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    // The other subscriber is untouched.
    let writer = rights(&secret, &[], &["t"]);
    assert!(post_as(addr, "t", b"still here", &writer).starts_with("HTTP/1.1 204 "));
    assert_eq!(read_env(&mut other).payload, b"still here");
    assert_eq!(metric(&metrics(addr), "corecast_tokens_expired_total"), 1);
}

#[test]
fn sighup_rotates_the_key_and_a_key_that_does_not_load_keeps_the_old() {
    let cert = test_cert();
    let (old_key, old_secret) = secret_file(&cert.dir, "old.key");
    let (new_key, new_secret) = secret_file(&cert.dir, "newer.key");
    let config = cert.dir.join("corecast.toml");
    write_config(
        &config,
        &format!("jwt-key = [\"HS256={}\"]\n", old_key.display()),
    );
    let server = ChildServer::start(&["--config", config.to_str().unwrap()], None);
    let addr = server.addr;
    let status = |secret: &[u8]| {
        let t = rights(secret, &["t"], &[]);
        let mut s = raw(addr);
        s.write_all(upgrade_request_with(&format!("/ws?topics=t&token={t}"), "").as_bytes())
            .unwrap();
        read_head(&mut s)[9..12].to_string()
    };
    assert_eq!(status(&old_secret), "101");
    assert_eq!(status(&new_secret), "401");
    write_config(
        &config,
        &format!("jwt-key = [\"HS256={}\"]\n", new_key.display()),
    );
    server.hup();
    server.wait_reloads("ok", 1);
    assert_eq!(status(&old_secret), "401");
    assert_eq!(status(&new_secret), "101");
    write_config(&config, "jwt-key = [\"HS256=/nonexistent/corecast.key\"]\n");
    server.hup();
    server.wait_reloads("failed", 1);
    assert_eq!(status(&new_secret), "101");
    assert!(server.log_text().contains("/nonexistent/corecast.key"));
}

/// The reply to a control message sent on `ws`.
/// The close frame `ws` receives next (what comes before it is skipped).
fn close_of(ws: &mut Ws) -> tungstenite::protocol::CloseFrame {
    loop {
        match ws.read() {
            Ok(Message::Close(c)) => return c.expect("a close frame with a code"),
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }
}

fn reply(ws: &mut Ws, msg: serde_json::Value) -> serde_json::Value {
    ws.send(Message::text(msg.to_string())).unwrap();
    match read_incoming(ws) {
        Incoming::Reply(v) => v,
        Incoming::Pub(e) => panic!("expected a reply, got {e:?}"),
    }
}

#[test]
fn a_refreshed_token_keeps_the_connection_past_the_old_exp() {
    let cert = test_cert();
    let (key, secret) = secret_file(&cert.dir, "refresh.key");
    let server = start_with(|c| {
        let mut s = settings(&key);
        s.leeway = Duration::ZERO;
        c.jwt = Some(s);
    });
    let addr = server.local_addr();
    let short = |sub: &str, topics: &[&str], secs: u64| {
        token(
            &secret,
            json!({"sub": sub, "exp": now() + secs, "corecast": {"subscribe": topics}}),
        )
    };
    let mut ws = subscriber(addr, "t", &short("alice", &["t"], 2));
    // Refusals change nothing.
    for (bad, why) in [
        (json!({"op": "refresh", "token": "x.y.z"}), "token invalid"),
        (
            json!({"op": "refresh", "token": short("bob", &["t"], 60)}),
            "another sub",
        ),
        (
            json!({"op": "refresh", "token": short("alice", &["u"], 60)}),
            "does not cover",
        ),
        (json!({"op": "refresh"}), "needs \"token\""),
    ] {
        let v = reply(&mut ws, bad);
        assert_eq!(v["op"], "error", "{v}");
        assert!(v["reason"].as_str().unwrap().contains(why), "{v}");
    }
    let v = reply(
        &mut ws,
        json!({"op": "refresh", "token": short("alice", &["t", "u"], 60)}),
    );
    assert_eq!(v["op"], "refreshed", "{v}");
    assert!(v["exp"].as_u64().unwrap() >= now() + 50, "{v}");
    // Past the first token's exp, and a sweep or more later: still open,
    // and the new rights apply.
    std::thread::sleep(Duration::from_secs(4));
    let v = reply(&mut ws, json!({"op": "subscribe", "topics": ["u"]}));
    assert_eq!(v["op"], "subscribed", "{v}");
    let writer = rights(&secret, &[], &["u"]);
    assert!(post_as(addr, "u", b"after the refresh", &writer).starts_with("HTTP/1.1 204 "));
    assert_eq!(read_env(&mut ws).payload, b"after the refresh");
    assert_eq!(metric(&metrics(addr), "corecast_tokens_expired_total"), 0);
}

#[test]
fn the_operator_disconnects_every_connection_of_a_sub() {
    let cert = test_cert();
    let (key, secret) = secret_file(&cert.dir, "admin.key");
    let server = ChildServer::start(&["--jwt-key", &format!("HS256={}", key.display())], None);
    let addr = server.addr;
    let as_user = |sub: &str| {
        token(
            &secret,
            json!({"sub": sub, "exp": now() + 600, "corecast": {"subscribe": ["t"]}}),
        )
    };
    let mut alice = [
        subscriber(addr, "t", &as_user("alice")),
        subscriber(addr, "t", &as_user("alice")),
    ];
    let mut bob = subscriber(addr, "t", &as_user("bob"));
    let mut zoe = subscriber(addr, "t", &as_user("zo\u{eb}"));
    let admin = |req: &str| answer(server.admin, req);
    assert!(
        admin("GET /disconnect?sub=alice HTTP/1.1\r\nHost: x\r\n\r\n").starts_with("HTTP/1.1 405 ")
    );
    assert!(admin("POST /disconnect HTTP/1.1\r\nHost: x\r\n\r\n").starts_with("HTTP/1.1 400 "));
    // Two subs, a body, or what cannot be HTTP: refused, nobody goes
    // (outside probe: 202 for the first sub, 202 with the body unread, a
    // ClientHello closed silently 2 s later).
    for (req, reason) in [
        (
            "POST /disconnect?sub=alice&sub=bob HTTP/1.1\r\nHost: x\r\n\r\n",
            "duplicate query parameter: sub",
        ),
        (
            "POST /disconnect?sub=alice HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nxx",
            "takes no body",
        ),
        (
            "\u{16}\u{3}\u{1}\u{2}\u{0}\u{1}\u{0}\u{1}\u{fc}\u{3}\u{3}",
            "malformed request head",
        ),
    ] {
        let started = std::time::Instant::now();
        let r = admin(req);
        assert!(
            r.starts_with("HTTP/1.1 400 ") && r.contains(reason),
            "{req:?}: {r}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "answered at once"
        );
    }
    let on_main = answer(
        addr,
        "POST /disconnect?sub=alice HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(on_main.starts_with("HTTP/1.1 404 "), "{on_main}");
    let r = admin("POST /disconnect?sub=alice HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 202 "), "{r}");
    for ws in &mut alice {
        let close = close_of(ws);
        assert_eq!(close.code, CloseCode::from(3003));
        assert_eq!(close.reason, "disconnected by the operator");
    }
    // A sub outside ASCII, percent-encoded as UTF-8 (outside probe: the
    // escapes were left as they were, the answer was 202 and nobody went).
    let r = admin("POST /disconnect?sub=%FF HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 400 "), "not UTF-8: {r}");
    let r = admin("POST /disconnect?sub=zo%C3%AB HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 202 "), "{r}");
    assert_eq!(close_of(&mut zoe).code, CloseCode::from(3003));
    let writer = token(
        &secret,
        json!({"exp": now() + 600, "corecast": {"publish": ["t"]}}),
    );
    assert!(post_as(addr, "t", b"bob stays", &writer).starts_with("HTTP/1.1 204 "));
    assert_eq!(read_env(&mut bob).payload, b"bob stays");
    assert_eq!(
        metric(&server.metrics(), "corecast_operator_disconnects_total"),
        3
    );
}

#[test]
fn anonymous_access_is_decided_per_namespace() {
    use corecast::pubsub::policy::NamespacePolicy;
    let cert = test_cert();
    let (key, _) = secret_file(&cert.dir, "ns.key");
    let ns = |prefix: &str, anon: bool| NamespacePolicy {
        prefix: prefix.into(),
        anonymous_subscribe: Some(anon),
        ..Default::default()
    };
    let server = start_with(|c| {
        c.jwt = Some(settings(&key));
        c.namespaces = vec![ns("public", true), ns("public.private", false)];
    });
    let addr = server.local_addr();
    let status = |topics: &str| {
        let mut s = raw(addr);
        s.write_all(upgrade_request(&format!("/ws?topics={topics}")).as_bytes())
            .unwrap();
        read_head(&mut s)[9..12].to_string()
    };
    assert_eq!(status("public.news"), "101");
    assert_eq!(status("public.news.*"), "101");
    assert_eq!(status("public.private.x"), "401");
    assert_eq!(status("public.>"), "401", "it reaches public.private");
    assert_eq!(status("other"), "401");
    assert_eq!(status("public.news,other"), "401");
    // Over the connection, the same rule.
    let (mut ws, _) = tungstenite::connect(ws_url(addr, "/ws?topics=public.news")).unwrap();
    ws.send(Message::text(
        r#"{"op":"subscribe","topics":["public.private.x"]}"#,
    ))
    .unwrap();
    match read_incoming(&mut ws) {
        Incoming::Reply(v) => assert_eq!(v["op"], "error", "{v}"),
        Incoming::Pub(e) => panic!("{e:?}"),
    }
    ws.send(Message::text(
        r#"{"op":"subscribe","topics":["public.sports"]}"#,
    ))
    .unwrap();
    match read_incoming(&mut ws) {
        Incoming::Reply(v) => assert_eq!(v["op"], "subscribed", "{v}"),
        Incoming::Pub(e) => panic!("{e:?}"),
    }
}

/// In-band refreshes are signature checks a client can ask for at will:
/// each worker checks at most 500 a second (one second's worth at once),
/// and answers the rest "refreshes busy" with `retry_ms`, the old token
/// staying (outside review: unmetered, ~2 200 checks per turn of one
/// connection). Every message is answered, in order.
#[test]
fn refreshes_are_checked_at_a_bounded_rate_per_worker() {
    let cert = test_cert();
    let (key, secret) = secret_file(&cert.dir, "refresh-rate.key");
    let server = start_with(|c| {
        c.workers = 1;
        c.jwt = Some(settings(&key));
        // Off: the worker's bound alone (one connection's is its own test).
        c.max_control_rate = 0;
    });
    let addr = server.local_addr();
    let mut ws = subscriber(addr, "t", &rights(&secret, &["t"], &[]));
    // Signed with another key: each costs a full signature check.
    let forged = rights(b"not the server's secret, but as long as one", &["t"], &[]);
    let n = 700;
    for _ in 0..n {
        ws.write(Message::text(
            json!({"op": "refresh", "token": forged}).to_string(),
        ))
        .unwrap();
    }
    ws.flush().unwrap();
    let (mut refused, mut busy) = (0, 0);
    for _ in 0..n {
        let Message::Text(t) = ws.read().unwrap() else {
            panic!("expected a text reply")
        };
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["op"], "error", "{v}");
        match v["reason"].as_str().unwrap() {
            r if r.starts_with("refresh refused") => refused += 1,
            "refreshes busy: try again" => {
                assert!(v["retry_ms"].as_u64().unwrap() >= 1, "{v}");
                busy += 1;
            }
            r => panic!("{r}"),
        }
    }
    assert!(
        refused <= 600 && busy >= 100,
        "{refused} checked, {busy} busy"
    );
    // The connection and its token are as they were.
    let v = reply(&mut ws, json!({"op": "subscribe", "topics": ["t"]}));
    assert_eq!(v["op"], "subscribed", "{v}");
}

/// A refresh counts like a ping against `--max-control-rate` (100 a
/// second per connection, one second's worth at once): one connection
/// sending more is closed 1008 as for a ping flood, so it cannot take its
/// worker's refreshes from everyone else (outside review).
#[test]
fn one_connection_refreshing_past_the_control_rate_is_closed_1008() {
    let cert = test_cert();
    let (key, secret) = secret_file(&cert.dir, "refresh-flood.key");
    let server = start_with(|c| c.jwt = Some(settings(&key)));
    let addr = server.local_addr();
    let mut ws = subscriber(addr, "t", &rights(&secret, &["t"], &[]));
    let forged = rights(b"not the server's secret, but as long as one", &["t"], &[]);
    for _ in 0..300 {
        if ws
            .write(Message::text(
                json!({"op": "refresh", "token": forged}).to_string(),
            ))
            .is_err()
        {
            break;
        }
    }
    let _ = ws.flush();
    let mut replies = 0;
    let close = loop {
        match ws.read() {
            Ok(Message::Text(_)) => replies += 1,
            Ok(Message::Close(f)) => break f,
            Ok(_) => {}
            Err(e) => panic!("{e} after {replies} replies"),
        }
    };
    let close = close.expect("a close frame");
    assert_eq!(close.code, CloseCode::Policy, "{close:?}");
    assert!((100..=110).contains(&replies), "{replies} replies");
}
