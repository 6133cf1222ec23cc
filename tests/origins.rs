//! `--allowed-origin`, end to end: a browser request (one with `Origin`)
//! from a page of another origin gets `403` with its reason, on every
//! WebSocket endpoint and on `POST`/`DELETE /publish`; a request without
//! `Origin` (not from a browser) is not affected; refusals are counted by
//! reason; and `SIGHUP` replaces the list from the configuration file (a
//! bad pattern there keeps the old list).

mod common;

use common::*;
use std::io::Write;
use std::net::SocketAddr;
use std::process::Command;

/// The response head to an upgrade of `path` carrying `Origin: origin`.
fn handshake(addr: SocketAddr, path: &str, origin: Option<&str>) -> String {
    let extra = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
    let mut s = raw(addr);
    s.write_all(upgrade_request_with(path, &extra).as_bytes())
        .unwrap();
    read_head(&mut s)
}

/// The whole answer to a refused request.
fn refused_with(addr: SocketAddr, req: &str) -> String {
    refused(addr, req.as_bytes())
}

#[test]
fn browser_requests_from_other_origins_get_403_and_the_rest_pass() {
    let server = start_with(|c| {
        c.allowed_origins = vec!["https://app.example".into(), "*.good.example".into()];
    });
    let addr = server.local_addr();
    for path in ["/ws?topics=t", "/echo", "/publish/t"] {
        for ok in [
            Some("https://app.example"),
            Some("https://a.good.example"),
            Some("http://b.a.good.example"),
            None,
        ] {
            let head = handshake(addr, path, ok);
            assert!(head.starts_with("HTTP/1.1 101 "), "{path} {ok:?}: {head}");
        }
        for foreign in [
            "https://evil.example",
            "https://evil-good.example",
            "https://good.example",
            "http://app.example",
            "https://app.example.evil",
            "null",
        ] {
            let answer = refused_with(
                addr,
                &upgrade_request_with(path, &format!("Origin: {foreign}\r\n")),
            );
            assert!(
                answer.starts_with("HTTP/1.1 403 Forbidden\r\n"),
                "{path} {foreign}: {answer}"
            );
            assert!(answer.contains("origin not allowed"), "{answer}");
        }
    }
    let malformed = refused_with(
        addr,
        &upgrade_request_with("/ws", "Origin: https://app.example/path\r\n"),
    );
    assert!(malformed.starts_with("HTTP/1.1 403 "), "{malformed}");
    assert!(malformed.contains("malformed Origin header"), "{malformed}");
    let two = refused_with(
        addr,
        &upgrade_request_with(
            "/ws",
            "Origin: https://app.example\r\nOrigin: https://evil.example\r\n",
        ),
    );
    assert!(two.contains("more than one Origin header"), "{two}");

    // POST /publish is a cross-site request too (text/plain needs no
    // preflight): the same rule, and nothing is published.
    let (mut sub, _) = subscribe_with(addr, "/ws?topics=t", "corecast.v1");
    let answer = refused_with(
        addr,
        &String::from_utf8(post_with(
            "t",
            "text/plain",
            b"forged",
            "Origin: https://evil.example\r\nConnection: close\r\n",
        ))
        .unwrap(),
    );
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    let delete = refused_with(
        addr,
        "DELETE /publish/t HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\n\r\n",
    );
    assert!(delete.starts_with("HTTP/1.1 403 "), "{delete}");
    // From the allowed page, and from a non-browser client: published.
    let mut s = raw(addr);
    s.write_all(&post_with(
        "t",
        "text/plain",
        b"from the page",
        "Origin: https://app.example\r\n",
    ))
    .unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 204 "));
    publish(addr, "t", b"from a script");
    assert_eq!(read_env(&mut sub).payload, b"from the page");
    assert_eq!(read_env(&mut sub).payload, b"from a script");

    let m = metrics(addr);
    assert_eq!(
        metric(&m, "corecast_origin_refused_total{reason=\"not_allowed\"}"),
        3 * 6 + 2
    );
    assert_eq!(
        metric(&m, "corecast_origin_refused_total{reason=\"malformed\"}"),
        1
    );
    assert_eq!(
        metric(&m, "corecast_origin_refused_total{reason=\"several\"}"),
        1
    );
    assert_eq!(
        metric(&m, "corecast_handshakes_rejected_total{status=\"403\"}"),
        3 * 6 + 4
    );
    // `/metrics` on the main port is not a cross-site action.
    let mut s = raw(addr);
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 200 "));
}

#[test]
fn without_a_list_every_origin_passes() {
    let server = start();
    let addr = server.local_addr();
    for origin in ["https://anything.example", "null"] {
        let head = handshake(addr, "/ws?topics=t", Some(origin));
        assert!(head.starts_with("HTTP/1.1 101 "), "{origin}: {head}");
    }
    let m = metrics(addr);
    assert_eq!(
        metric(&m, "corecast_origin_refused_total{reason=\"not_allowed\"}"),
        0
    );
}

#[test]
fn a_bad_pattern_fails_the_start_naming_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_corecast"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--allowed-origin",
            "https://*.example.*",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--allowed-origin") && err.contains("https://*.example.*"),
        "{err}"
    );
}

#[test]
fn sighup_replaces_the_list_and_a_bad_one_keeps_the_old() {
    let cert = test_cert();
    let config = cert.dir.join("corecast.toml");
    write_config(&config, "allowed-origin = [\"https://a.example\"]\n");
    let server = ChildServer::start(&["--config", config.to_str().unwrap()], None);
    let addr = server.addr;
    let status = |origin: &str| handshake(addr, "/ws?topics=t", Some(origin))[9..12].to_string();
    assert_eq!(status("https://a.example"), "101");
    assert_eq!(status("https://b.example"), "403");

    write_config(&config, "allowed-origin = [\"https://b.example\"]\n");
    server.hup();
    server.wait_reloads("ok", 1);
    assert_eq!(status("https://a.example"), "403");
    assert_eq!(status("https://b.example"), "101");
    assert_eq!(server.log_count("next restart"), 0, "{}", server.log_text());

    // A pattern that does not parse: the reload fails as a whole.
    write_config(&config, "allowed-origin = [\"https://c.example/x\"]\n");
    server.hup();
    server.wait_reloads("failed", 1);
    assert_eq!(status("https://b.example"), "101");
    assert_eq!(status("https://c.example"), "403");
}
