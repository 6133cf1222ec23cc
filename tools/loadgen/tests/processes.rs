//! The multi-process path end to end: the real `loadgen` binary starts
//! worker processes (`loadgen shard`), which report over pipes.

use std::process::Command;

fn server() -> corecast::server::ServerHandle {
    corecast::server::start(corecast::server::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        workers: 2,
        pin: corecast::server::PinMode::Never,
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn fanout_over_worker_processes() {
    let srv = server();
    let a = srv.local_addr();
    let dir = std::env::temp_dir();
    let json = dir.join(format!("loadgen-proc-{}.json", std::process::id()));
    let svg = dir.join(format!("loadgen-proc-{}.svg", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["fanout", "--url", &format!("ws://{a}/ws?topics=p")])
        .args(["--publish-url", &format!("ws://{a}/publish/p")])
        .args([
            "--connections",
            "90",
            "--processes",
            "3",
            "--messages",
            "30",
        ])
        .args(["--metrics-url", &format!("http://{a}/metrics")])
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 worker processes"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["frames_received"], 2700);
    assert_eq!(v["frames_expected"], 2700);
    assert_eq!(v["server_frames_sent"], 2700.0);
    assert_eq!(v["lost"], 0);
    let pids: Vec<u64> = v["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|&p| p != u64::from(std::process::id())));
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    std::fs::remove_file(&json).unwrap();
    std::fs::remove_file(&svg).unwrap();
    srv.shutdown();
    srv.join();
}

/// A reconnect storm over worker processes: 200 JSON-enveloped
/// subscribers of two topics at 200 messages/s each all drop after a
/// second and come back with `since`; every one resubscribes and no
/// number is skipped or repeated (what the 100-message history no longer
/// holds is announced as `too_old`, not a gap).
#[test]
fn storm_over_worker_processes() {
    let srv = server();
    let a = srv.local_addr();
    let dir = std::env::temp_dir();
    let json = dir.join(format!("loadgen-storm-{}.json", std::process::id()));
    let svg = dir.join(format!("loadgen-storm-{}.svg", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["storm", "--url", &format!("ws://{a}/ws?topics=s0,s1")])
        .args(["--publish-url", &format!("ws://{a}/publish/s0")])
        .args(["--publish-url", &format!("ws://{a}/publish/s1")])
        .args(["--connections", "200", "--processes", "2"])
        .args(["--rate", "200", "--duration", "3"])
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["subscribers_dropped"], 200);
    assert_eq!(v["resubscribed"], 200);
    assert_eq!(v["reconnect_failed"], 0);
    let (complete, incomplete) = (
        v["recoveries_complete"].as_u64().unwrap(),
        v["recoveries_incomplete"].as_u64().unwrap(),
    );
    assert_eq!(complete + incomplete, 400, "{v}");
    let reasons = v["recoveries_incomplete_by_reason"].as_object().unwrap();
    assert!(reasons.keys().all(|r| r == "too_old"), "{v}");
    assert_eq!(v["recovered_received"], v["recovered_announced"]);
    assert_eq!(v["gaps"], 0);
    assert_eq!(v["duplicates"], 0);
    assert_eq!(v["caught_up"], 200);
    assert_eq!(v["subscribers_complete"], 200);
    assert_eq!(v["published"], 1200);
    assert_eq!(v["caught_up_us"]["count"], 200);
    assert!(v["caught_up_us"]["max"].as_f64().unwrap() > 0.0);
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    std::fs::remove_file(&json).unwrap();
    std::fs::remove_file(&svg).unwrap();
    srv.shutdown();
    srv.join();
}

/// wss:// end to end: worker processes verify the server's (self-signed)
/// certificate from --ca-file and every frame arrives through TLS.
#[test]
fn fanout_over_wss_in_worker_processes() {
    let dir = std::env::temp_dir().join(format!("loadgen-wss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, signing_key.serialize_pem()).unwrap();
    let srv = corecast::server::start(corecast::server::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        workers: 2,
        pin: corecast::server::PinMode::Never,
        tls: Some(corecast::server::tls::TlsSettings {
            cert: cert_path.clone(),
            key: key_path,
            min_version: corecast::server::tls::MinVersion::Tls12,
        }),
        ..Default::default()
    })
    .unwrap();
    let a = srv.local_addr();
    let json = dir.join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["fanout", "--url", &format!("wss://{a}/ws?topics=p")])
        .args(["--publish-url", &format!("wss://{a}/publish/p")])
        .args([
            "--connections",
            "60",
            "--processes",
            "2",
            "--messages",
            "40",
            "--size",
            "3000",
        ])
        .arg("--ca-file")
        .arg(&cert_path)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["frames_received"], 2400);
    assert_eq!(v["lost"], 0);
    let m = srv.metrics();
    let handshakes: u64 = m
        .lines()
        .filter(|l| l.starts_with("corecast_tls_handshakes_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(handshakes, 61, "60 subscribers and the publisher over TLS");
    srv.shutdown();
    srv.join();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Conflation under overload over worker processes: a server that
/// conflates past a 16 KiB queue, 100 subscribers (binary envelopes) of
/// two topics at 100 messages/s each of 16 KiB for 2 s, a tenth of them
/// reading 1 KiB/s. The server's socket send buffer (up to 4 MiB on
/// loopback) fills first, so the messages are large enough to fill it
/// within the run. The slow ones get conflated publications (markers
/// account for every number skipped), nobody sees an unannounced gap or a
/// duplicate, and after the drain every subscriber has each topic's last
/// publication.
#[test]
fn conflation_over_worker_processes() {
    let srv = corecast::server::start(corecast::server::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        workers: 2,
        pin: corecast::server::PinMode::Never,
        slow_consumer: corecast::pubsub::policy::SlowConsumerPolicy::Conflate,
        max_outbound_bytes: 16 * 1024,
        ..Default::default()
    })
    .unwrap();
    let a = srv.local_addr();
    let json = std::env::temp_dir().join(format!("loadgen-conf-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["conflation", "--url", &format!("ws://{a}/ws?topics=c0,c1")])
        .args(["--publish-url", &format!("ws://{a}/publish/c0")])
        .args(["--publish-url", &format!("ws://{a}/publish/c1")])
        .args(["--connections", "100", "--processes", "2"])
        .args(["--rate", "100", "--duration", "2", "--size", "16384"])
        .args(["--subprotocol", "corecast.v1.binary"])
        .args(["--slow-fraction", "0.1", "--slow-read-bytes-per-s", "1024"])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["published"], 400);
    assert_eq!(
        (
            v["normal"]["subscribers"].as_u64(),
            v["slow"]["subscribers"].as_u64()
        ),
        (Some(90), Some(10))
    );
    assert_eq!(v["gaps"], 0, "{v}");
    assert_eq!(v["duplicates"], 0);
    assert_eq!(v["tail_incomplete"], 0);
    assert_eq!(v["subscribers_complete"], 100);
    let slow = &v["slow"];
    assert!(slow["markers"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(slow["conflated"], slow["replaced"], "{v}");
    assert!(
        slow["behind_at_publish_end"]["behind"].as_u64().unwrap() > 0,
        "{v}"
    );
    assert!(slow["staleness_us"]["count"].as_u64().unwrap() > 0);
    assert!(
        slow["staleness_us"]["p99"].as_f64().unwrap()
            > v["normal"]["staleness_us"]["p99"].as_f64().unwrap(),
        "{v}"
    );
    std::fs::remove_file(&json).unwrap();
    srv.shutdown();
    srv.join();
}
