//! `corecast serve --config FILE`, end to end in a child process: the
//! file's settings in force, a bad file refused at start with its file and
//! line, and `SIGHUP` reading it again: the TLS paths and the namespace
//! tables applied (to topics that exist already too), other changes
//! logged as waiting for a restart, a broken file keeping the old
//! configuration (and counted).

mod common;

use common::*;
use std::process::Command;
use std::time::{Duration, Instant};
use tungstenite::Message;

fn tls_lines(cert: &TestCert) -> String {
    format!(
        "tls-cert = {:?}\ntls-key = {:?}\n",
        cert.cert.display().to_string(),
        cert.key.display().to_string()
    )
}

/// Waits until the child's log has a line with every one of `needles`
/// (the metric counts a reload before its outcome is logged).
fn wait_log(server: &ChildServer, needles: &[&str]) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let log = server.log_text();
        if log.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
            return;
        }
        assert!(Instant::now() < end, "no line with {needles:?}:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sighup_rereads_the_file_applying_the_tls_pair_and_logging_what_waits_for_a_restart() {
    let (first, second) = (test_cert(), test_cert());
    let config = first.dir.join("corecast.toml");
    write_config(
        &config,
        &format!("{}max-message-size = \"1KiB\"\n", tls_lines(&first)),
    );
    let server = ChildServer::start(&["--config", config.to_str().unwrap()], None);
    let addr = server.addr;
    // The file's settings are in force: TLS with the first pair, and the
    // message limit (2 000 bytes close 1009).
    let mut ws = wss_connect(addr, "/echo", &client_config(&first));
    ws.send(Message::binary(vec![7u8; 2000])).unwrap();
    match ws.read().unwrap() {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1009),
        other => panic!("{other:?}"),
    }

    // The second pair and a change that cannot apply live.
    write_config(
        &config,
        &format!("{}max-message-size = \"2KiB\"\n", tls_lines(&second)),
    );
    server.hup();
    server.wait_reloads("ok", 1);
    let mut ws2 = wss_connect(addr, "/echo", &client_config(&second));
    ws2.send(Message::text("second pair")).unwrap();
    assert_eq!(ws2.read().unwrap(), Message::text("second pair"));
    wait_log(&server, &["max-message-size", "next restart"]);

    // A broken file: nothing applied, counted, the reason names the line.
    write_config(
        &config,
        &format!("{}max-topic-count = 4\n", tls_lines(&first)),
    );
    server.hup();
    server.wait_reloads("failed", 1);
    wait_log(&server, &["reload failed", "corecast.toml:3"]);
    let mut ws3 = wss_connect(addr, "/echo", &client_config(&second));
    ws3.send(Message::text("kept")).unwrap();
    assert_eq!(ws3.read().unwrap(), Message::text("kept"));
    assert_eq!(
        metric(&server.metrics(), "corecast_reloads_total{result=\"ok\"}"),
        1
    );
}

/// A namespace table changed in the file applies at `SIGHUP` to a topic
/// that exists already, held by a subscriber: its history trimmed to the
/// new size at once, no last value for new subscribers, and its existing
/// subscriber held to the new `max-rate`.
#[test]
fn sighup_applies_a_changed_namespace_table_to_existing_topics() {
    // A fresh directory, removed with it (the certificate goes unused).
    let cert = test_cert();
    let config = cert.dir.join("corecast.toml");
    write_config(&config, "[namespace.prices]\nhistory-size = 10\n");
    let server = ChildServer::start(&["--config", config.to_str().unwrap()], None);
    let addr = server.addr;
    let (mut holder, _) = subscribe_with(addr, "/ws?topics=prices.a", "corecast.v1");
    for n in 1..=3u8 {
        publish(addr, "prices.a", &[b'0' + n]);
    }
    let epoch = read_env(&mut holder).epoch;
    for n in 2..=3 {
        assert_eq!(read_env(&mut holder).seq, n);
    }
    // Before: a new subscriber gets the last value.
    let (mut before, _) = subscribe_with(addr, "/ws?topics=prices.a", "corecast.v1");
    let e = read_env(&mut before);
    assert_eq!((e.seq, e.snapshot), (3, true));
    drop(before);

    write_config(
        &config,
        "[namespace.prices]\nhistory-size = 2\nlast-value = false\nmax-rate = 1\n",
    );
    server.hup();
    server.wait_reloads("ok", 1);
    wait_log(
        &server,
        &["applied from the configuration file", "namespace"],
    );
    assert_eq!(server.log_count("next restart"), 0, "{}", server.log_text());

    // The history holds the newest two only.
    let (mut rec, _) = subscribe_with(addr, "/ws", "corecast.v1");
    let (reply, _) = subscribe_since(&mut rec, "prices.a", Some((epoch, 0)));
    assert_eq!(
        reply["recovery"]["prices.a"]["from"].as_u64(),
        Some(2),
        "{reply}"
    );
    drop(rec);
    // No last value: a new subscriber's first publication is a new one.
    let (mut after, _) = subscribe_with(addr, "/ws?topics=prices.a", "corecast.v1");
    const LAST: u64 = 13;
    for n in 4..=LAST {
        publish(addr, "prices.a", n.to_string().as_bytes());
    }
    // It is held to `max-rate` too: a conflation notice may come first
    // (publications replaced before its first one went out), never a
    // snapshot.
    let e = loop {
        match read_incoming(&mut after) {
            Incoming::Pub(e) => break e,
            Incoming::Reply(v) => assert_eq!(v["op"], "conflated", "{v}"),
        }
    };
    assert!(!e.snapshot && e.seq > 3, "{e:?}");
    // The existing subscriber gets at most one a second: the burst is
    // conflated to its newest, every one accounted for.
    let (mut delivered, mut replaced) = (0, 0);
    loop {
        match read_incoming(&mut holder) {
            Incoming::Pub(e) => {
                delivered += 1;
                if e.seq == LAST {
                    break;
                }
            }
            Incoming::Reply(v) => {
                assert_eq!(v["op"], "conflated", "{v}");
                replaced += v["replaced"].as_u64().unwrap();
            }
        }
    }
    assert!(
        replaced > 0 && delivered + replaced == LAST - 3,
        "{delivered} delivered, {replaced} replaced"
    );
}

#[test]
fn a_bad_file_stops_the_start_with_its_file_line_and_reason() {
    let cert = test_cert();
    let config = cert.dir.join("bad.toml");
    write_config(&config, "workers = 1\nmax-message-size = \"lots\"\n");
    let out = Command::new(env!("CARGO_BIN_EXE_corecast"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:2:", config.display())) && err.contains("max-message-size"),
        "{err}"
    );
}

/// The answer to an upgrade on a new connection: its head.
fn open_ws(addr: std::net::SocketAddr) -> (std::net::TcpStream, String) {
    let mut s = raw(addr);
    let head = request_upgrade(&mut s, "/ws?topics=t");
    (s, head)
}

#[test]
fn sighup_changes_the_connection_limits_for_new_connections_and_keeps_the_open_ones() {
    let dir = std::env::temp_dir().join(format!("corecast-limits-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("corecast.toml");
    write_config(&config, "max-connections-per-ip = 1\n");
    let server = ChildServer::start(&["--config", config.to_str().unwrap()], None);
    let addr = server.addr;
    let (mut a, head) = open_ws(addr);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let (_, head) = open_ws(addr);
    assert!(head.starts_with("HTTP/1.1 503 "), "one per address: {head}");

    // Two per address: the next one opens, the one after is refused.
    write_config(&config, "max-connections-per-ip = 2\n");
    server.hup();
    server.wait_reloads("ok", 1);
    wait_log(
        &server,
        &[
            "applied from the configuration file",
            "max-connections-per-ip",
        ],
    );
    let (_b, head) = open_ws(addr);
    assert!(head.starts_with("HTTP/1.1 101 "), "two per address: {head}");
    let (_, head) = open_ws(addr);
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");

    // The process cap lowered to what is open: new connections get 503.
    write_config(&config, "max-connections-per-ip = 5\nmax-connections = 2\n");
    server.hup();
    server.wait_reloads("ok", 2);
    assert_eq!(metric(&server.metrics(), "corecast_max_connections"), 2);
    let (mut c, head) = open_ws(addr);
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut c, &mut rest);
    assert!(
        String::from_utf8_lossy(&rest).contains("connection limit"),
        "{}",
        String::from_utf8_lossy(&rest)
    );

    // Turning the per-address limits off waits for a restart: the cap of
    // 5 stays (with the process cap raised again, 3 more open, not 4).
    write_config(&config, "max-connections = 100\n");
    server.hup();
    server.wait_reloads("ok", 3);
    wait_log(&server, &["max-connections-per-ip", "next restart"]);
    let opened: Vec<_> = (0..4).map(|_| open_ws(addr)).collect();
    let ok = opened
        .iter()
        .filter(|(_, h)| h.starts_with("HTTP/1.1 101 "))
        .count();
    assert_eq!(
        ok,
        3,
        "{:?}",
        opened
            .iter()
            .map(|(_, h)| h.lines().next())
            .collect::<Vec<_>>()
    );

    // The first connection lived through every reload: a ping is answered.
    std::io::Write::write_all(&mut a, &frame(0x89, b"still", Some([1, 2, 3, 4]))).unwrap();
    let (_, op, payload) = read_frame(&mut a);
    assert_eq!((op, payload.as_slice()), (0xA, &b"still"[..]));
    let _ = std::fs::remove_dir_all(&dir);
}
