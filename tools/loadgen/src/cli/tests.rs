//! The command line's unit tests: parsing, defaults, validation, and the
//! arithmetic that splits a run.

use super::common::default_source_addrs;
use super::*;
use crate::topics::TopicDist;
use clap::CommandFactory;
use std::net::IpAddr;
use std::path::PathBuf;

const LIMITS: Limits = Limits {
    nofile: 20_000,
    ports_per_source: 28_232,
};

fn plan(argv: &[&str]) -> Result<Plan, String> {
    let mut full = vec!["loadgen"];
    full.extend_from_slice(argv);
    let cli = Cli::try_parse_from(full).map_err(|e| e.to_string())?;
    cli.command.plan(LIMITS).expect("a scenario")
}

fn hold(extra: &[&str]) -> Result<Plan, String> {
    let mut argv = vec!["hold", "--url", "ws://127.0.0.1:9101/echo"];
    argv.extend_from_slice(extra);
    plan(&argv)
}

fn fanout(extra: &[&str]) -> Result<(Plan, FanoutPlan), String> {
    let mut argv = vec![
        "fanout",
        "--url",
        "ws://127.0.0.1:9201/ws?topics=bench",
        "--publish-url",
        "ws://127.0.0.1:9201/publish/bench",
        "--connections",
        "100",
    ];
    argv.extend_from_slice(extra);
    let p = plan(&argv)?;
    let Work::Fanout(f) = p.work.clone() else {
        panic!("not fanout")
    };
    Ok((p, f))
}

#[test]
fn cli_is_well_formed() {
    Cli::command().debug_assert();
}

#[test]
fn defaults() {
    let p = hold(&["--connections", "10000"]).unwrap();
    let c = &p.connect;
    assert_eq!((c.connections, c.in_flight, c.processes), (10_000, 256, 1));
    assert_eq!(
        p.work,
        Work::Hold {
            duration: Duration::from_secs(10)
        }
    );
    assert_eq!(c.connect_timeout, Duration::from_secs(60));
    assert_eq!(c.sources, vec![IpAddr::from([127, 0, 0, 1])]);
    assert_eq!(c.targets[0].dst, "127.0.0.1:9101".parse().unwrap());
    assert_eq!((p.server_pids.len(), p.json, p.plot), (0, None, None));
}

#[test]
fn all_common_flags_parse() {
    let p = hold(&[
        "--connections",
        "100",
        "--in-flight",
        "1000",
        "--duration",
        "3",
        "--server-pid",
        "42",
        "--server-pid",
        "43",
        "--source-addrs",
        "127.0.0.1,127.0.0.2",
        "--json",
        "out.json",
        "--plot",
        "out.svg",
        "--processes",
        "2",
    ])
    .unwrap();
    // In flight never exceeds the connection count.
    assert_eq!(p.connect.in_flight, 100);
    assert_eq!(p.connect.in_flight_per_shard(), 50);
    assert_eq!(
        p.work,
        Work::Hold {
            duration: Duration::from_secs(3)
        }
    );
    assert_eq!(p.server_pids, [42, 43]);
    assert_eq!(p.json, Some(PathBuf::from("out.json")));
    assert_eq!(p.plot, Some(PathBuf::from("out.svg")));
    assert_eq!(
        p.connect.sources,
        vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2])]
    );
}

#[test]
fn several_urls_and_processes() {
    let p = plan(&[
        "hold",
        "--url",
        "ws://127.0.0.1:9401/ws?topics=a,b",
        "--url",
        "ws://127.0.0.1:9402/echo",
        "--url",
        "ws://127.0.0.1:9403/echo",
        "--connections",
        "100000",
    ])
    .unwrap();
    let c = &p.connect;
    assert_eq!(c.targets.len(), 3);
    assert_eq!(
        c.targets[0].url.target, "/ws?topics=a,b",
        "commas stay in a URL"
    );
    // 100 000 / 19 000 per process: 6 processes.
    assert_eq!(c.processes, 6);
    // 33 334 per destination: 3 source addresses.
    assert_eq!(c.sources.len(), 3);
    // Shares are contiguous, cover everything, and differ by at most one.
    let shares: Vec<_> = (0..6).map(|i| c.share(i)).collect();
    assert_eq!(shares[0], (0, 16_666));
    assert_eq!(shares[5].0 + shares[5].1, 100_000);
    for w in shares.windows(2) {
        assert_eq!(w[0].0 + w[0].1, w[1].0);
    }
    assert!(shares.iter().all(|s| s.1.abs_diff(16_666) <= 1));
    assert_eq!(c.in_flight_per_shard(), 43);
}

#[test]
fn process_count_limits() {
    assert_eq!(
        hold(&["--connections", "19000"]).unwrap().connect.processes,
        1
    );
    assert_eq!(
        hold(&["--connections", "19001"]).unwrap().connect.processes,
        2
    );
    assert_eq!(
        hold(&["--connections", "10", "--processes", "3"])
            .unwrap()
            .connect
            .share(2),
        (6, 4)
    );
    let err = hold(&["--connections", "40000", "--processes", "2"]).unwrap_err();
    assert!(err.contains("20000 connections in one process"), "{err}");
    assert!(hold(&["--connections", "2", "--processes", "3"]).is_err());
    assert!(hold(&["--connections", "2", "--processes", "0"]).is_err());
    let err = hold(&["--connections", "2000000"]).unwrap_err();
    assert!(err.contains("at most 64"), "{err}");
    // A lower descriptor limit lowers the cap per process.
    let small = Limits {
        nofile: 1024,
        ports_per_source: 28_232,
    };
    let cli = Cli::try_parse_from([
        "loadgen",
        "connect",
        "--url",
        "ws://127.0.0.1:1/",
        "--connections",
        "961",
    ])
    .unwrap();
    assert_eq!(
        cli.command.plan(small).unwrap().unwrap().connect.processes,
        2
    );
}

#[test]
fn rejects_bad_arguments() {
    for bad in [
        &["--connections", "0"][..],
        &["--connections", "10", "--in-flight", "0"],
        &["--connections", "-1"],
        &["--connections", "10", "--duration", "100000"],
        &["--connections", "10", "--connect-timeout", "0"],
        &["--connections", "10", "--handshake-timeout", "0"],
        &["--connections", "10", "--source-addrs", "::1"],
        &["--connections", "10", "--source-addrs", "nope"],
        &["--connections", "10", "--server-pid", "x"],
        &["--connections", "10", "--url", "ws://[::1]:1/"],
        &["--in-flight", "10"],
    ] {
        assert!(hold(bad).is_err(), "{bad:?} should be rejected");
    }
    assert!(plan(&["hold", "--url", "http://x/", "--connections", "1"]).is_err());
    assert!(
        plan(&["hold", "--connections", "1"]).is_err(),
        "--url is required"
    );
}

#[test]
fn too_few_source_addresses_for_the_ports() {
    let few_ports = Limits {
        nofile: 20_000,
        ports_per_source: 2000,
    };
    let cli = |extra: &[&str]| {
        let mut argv = vec![
            "loadgen",
            "connect",
            "--url",
            "ws://127.0.0.1:1/",
            "--connections",
            "5000",
        ];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap()
    };
    let err = cli(&["--source-addrs", "127.0.0.1"])
        .command
        .plan(few_ports)
        .unwrap()
        .unwrap_err();
    assert!(err.contains("at least 3 source addresses"), "{err}");
    // The default list grows to fit.
    assert!(cli(&[]).command.plan(LIMITS).unwrap().is_ok());
}

#[test]
fn default_sources_grow_every_14000_per_destination() {
    let ip = |d| IpAddr::from([127, 0, 0, d]);
    assert_eq!(default_source_addrs(1), vec![ip(1)]);
    assert_eq!(default_source_addrs(14_000), vec![ip(1)]);
    assert_eq!(default_source_addrs(14_001), vec![ip(1), ip(2)]);
    assert_eq!(default_source_addrs(100_000).len(), 8);
    assert_eq!(default_source_addrs(100_000)[7], ip(8));
}

#[test]
fn non_loopback_targets_bind_nothing_by_default() {
    let p = plan(&[
        "connect",
        "--url",
        "ws://10.0.0.1:1/",
        "--connections",
        "10",
    ])
    .unwrap();
    assert!(p.connect.sources.is_empty());
}

#[test]
fn fanout_modes_parse() {
    let (p, f) = fanout(&["--messages", "200", "--size", "64"]).unwrap();
    assert_eq!(f.mode, PublishMode::Burst { messages: 200 });
    assert_eq!((f.size, f.drain_timeout), (64, Duration::from_secs(10)));
    assert_eq!((f.topics, f.topic_dist), (1, TopicDist::Uniform));
    assert_eq!(p.connect.targets[0].url.target, "/ws?topics=bench");
    assert_eq!(f.publish[0].url.target, "/publish/bench");
    assert_eq!(f.publish[0].dst, "127.0.0.1:9201".parse().unwrap());
    let (p, f) = fanout(&[
        "--rate",
        "1000",
        "--duration",
        "5",
        "--size",
        "16384",
        "--drain-timeout",
        "3",
        "--json",
        "f.json",
        "--server-pid",
        "7",
        "--metrics-url",
        "http://127.0.0.1:9201/metrics",
    ])
    .unwrap();
    assert_eq!(
        f.mode,
        PublishMode::Rate {
            per_s: 1000.0,
            duration: Duration::from_secs(5)
        }
    );
    assert_eq!(f.mode.messages(), 5000);
    assert_eq!(f.drain_timeout, Duration::from_secs(3));
    assert_eq!(f.metrics[0].target, "/metrics");
    assert_eq!(
        (p.server_pids, p.json),
        (vec![7], Some(PathBuf::from("f.json")))
    );
}

#[test]
fn fanout_topics_and_http_publishers() {
    let (_, f) = plan(&[
        "fanout",
        "--url",
        "ws://127.0.0.1:1/ws?topics=t{topic}",
        "--publish-url",
        "http://127.0.0.1:1/publish/t{topic}",
        "--connections",
        "10",
        "--messages",
        "5",
        "--topics",
        "4",
        "--topic-dist",
        "zipf:1.1",
    ])
    .map(|p| {
        let Work::Fanout(f) = p.work.clone() else {
            unreachable!()
        };
        (p, f)
    })
    .unwrap();
    assert_eq!((f.topics, f.topic_dist), (4, TopicDist::Zipf(1.1)));
    assert!(f.publish[0].url.http);
    // Several topics need the placeholder everywhere.
    let err = fanout(&["--messages", "5", "--topics", "2"]).unwrap_err();
    assert!(err.contains("has no {topic}"), "{err}");
    // Publishers of one kind.
    assert!(
        fanout(&[
            "--messages",
            "5",
            "--publish-url",
            "http://127.0.0.1:9201/publish/bench"
        ])
        .unwrap_err()
        .contains("not both")
    );
}

#[test]
fn fanout_rejects_bad_arguments() {
    for bad in [
        &[][..],
        &["--messages", "0"],
        &["--messages", "10", "--rate", "5", "--duration", "1"],
        &["--rate", "5"],
        &["--duration", "5"],
        &["--rate", "0", "--duration", "5"],
        &["--rate", "-1", "--duration", "5"],
        &["--rate", "0.1", "--duration", "1"],
        &["--messages", "10", "--size", "15"],
        &["--messages", "10", "--size", "2000000"],
        &["--messages", "10", "--drain-timeout", "0"],
        &["--messages", "10", "--topics", "0"],
        &["--messages", "10", "--topic-dist", "zipf:0"],
        &["--messages", "10", "--metrics-url", "ws://h/metrics"],
    ] {
        assert!(fanout(bad).is_err(), "{bad:?} should be rejected");
    }
}

#[test]
fn echo_parses_and_validates() {
    let p = plan(&[
        "echo",
        "--url",
        "ws://127.0.0.1:1/echo",
        "--connections",
        "10",
        "--messages-in-flight",
        "8",
        "--duration",
        "2",
        "--size",
        "128",
    ])
    .unwrap();
    assert_eq!(
        p.work,
        Work::Echo(EchoPlan {
            window: 8,
            duration: Duration::from_secs(2),
            size: 128,
            drain_timeout: Duration::from_secs(5),
        })
    );
    for bad in [
        &["--messages-in-flight", "0"][..],
        &["--messages-in-flight", "5000"],
        &["--duration", "0"],
        &["--size", "8"],
    ] {
        let mut argv = vec![
            "echo",
            "--url",
            "ws://127.0.0.1:1/echo",
            "--connections",
            "1",
        ];
        argv.extend_from_slice(bad);
        assert!(plan(&argv).is_err(), "{bad:?} should be rejected");
    }
}

#[test]
fn plans_round_trip_through_json() {
    // Shards get the plan as JSON: nothing may be lost on the way.
    let (p, _) = fanout(&["--rate", "3.5", "--duration", "2", "--size", "100"]).unwrap();
    let back: Plan = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
    assert_eq!(back, p);
}

fn storm(extra: &[&str]) -> Result<(Plan, StormPlan), String> {
    let mut argv = vec![
        "storm",
        "--url",
        "ws://127.0.0.1:9470/ws?topics=s0,s1",
        "--publish-url",
        "ws://127.0.0.1:9470/publish/s0",
        "--publish-url",
        "ws://127.0.0.1:9470/publish/s1",
        "--connections",
        "10000",
        "--rate",
        "100",
    ];
    argv.extend_from_slice(extra);
    let p = plan(&argv)?;
    let Work::Storm(s) = p.work.clone() else {
        panic!("not storm")
    };
    Ok((p, s))
}

#[test]
fn storm_defaults_and_flags() {
    let (p, s) = storm(&[]).unwrap();
    assert_eq!(s.topics, ["s0", "s1"]);
    assert_eq!(s.publish.len(), 2);
    assert_eq!(s.publish[1][0].url.target, "/publish/s1");
    assert_eq!((s.rate, s.duration), (100.0, Duration::from_secs(12)));
    assert_eq!(s.drop_at, Duration::from_secs(4), "a third of the duration");
    assert_eq!((s.drop_fraction, s.drop_mode), (1.0, DropMode::Reset));
    assert_eq!(s.jitter, Duration::from_millis(1000));
    assert_eq!(p.connect.subprotocol.as_deref(), Some("corecast.v1"));
    assert_eq!(
        s.mode(),
        PublishMode::Rate {
            per_s: 200.0,
            duration: Duration::from_secs(12)
        }
    );
    assert_eq!(p.connect.sources.len(), 1);
    let (p, s) = storm(&[
        "--duration",
        "6",
        "--drop-at",
        "1.5",
        "--drop-fraction",
        "0.25",
        "--reconnect-jitter-ms",
        "200",
        "--drop-mode",
        "close",
        "--subprotocol",
        "corecast.v1.binary",
        "--size",
        "128",
    ])
    .unwrap();
    assert_eq!(s.drop_at, Duration::from_millis(1500));
    assert_eq!((s.drop_fraction, s.drop_mode), (0.25, DropMode::Close));
    assert_eq!((s.jitter, s.size), (Duration::from_millis(200), 128));
    assert_eq!(p.connect.subprotocol.as_deref(), Some("corecast.v1.binary"));
    // Closed sockets wait in TIME_WAIT: twice the ports, two addresses.
    assert_eq!(p.connect.sources.len(), 2);
    // Several publishers of one topic (two servers, say): each gets it.
    let (_, s) = storm(&["--publish-url", "ws://127.0.0.1:9471/publish/s0"]).unwrap();
    assert_eq!(s.publish[0].len(), 2);
    let back: Plan = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
    assert_eq!(back, p);
}

#[test]
fn storm_rejects_bad_arguments() {
    for bad in [
        &["--drop-at", "12"][..],
        &["--drop-at", "0"],
        &["--drop-at", "11.5"],
        &["--drop-fraction", "0"],
        &["--drop-fraction", "1.5"],
        &["--rate", "0"],
        &["--size", "8"],
        &["--subprotocol", "corecast.raw"],
        &["--drop-mode", "vanish"],
        &["--reconnect-jitter-ms", "900000"],
        &["--publish-url", "ws://127.0.0.1:9470/publish/other"],
        &["--publish-url", "ws://127.0.0.1:9470/ws"],
        &["--url", "ws://127.0.0.1:9471/ws?topics=s0"],
    ] {
        assert!(storm(bad).is_err(), "{bad:?} should be rejected");
    }
    let base = |url: &str, publish: &[&str]| {
        let mut argv = vec!["storm", "--url", url, "--connections", "10", "--rate", "5"];
        for p in publish {
            argv.extend(["--publish-url", p]);
        }
        plan(&argv)
    };
    let p0 = "ws://127.0.0.1:1/publish/s0";
    let err = base("ws://127.0.0.1:1/ws?topics=s0,s1", &[p0]).unwrap_err();
    assert!(err.contains("topic s1 has no --publish-url"), "{err}");
    let err = base("ws://127.0.0.1:1/ws", &[p0]).unwrap_err();
    assert!(err.contains("name the subscribers' topics"), "{err}");
    let err = base("ws://127.0.0.1:1/ws?topics=t{topic}", &[p0]).unwrap_err();
    assert!(err.contains("no {topic}"), "{err}");
    let err = base("ws://127.0.0.1:1/ws?topics=s0,news.>", &[p0]).unwrap_err();
    assert!(err.contains("pattern"), "{err}");
    let mut argv = vec![
        "storm",
        "--url",
        "ws://127.0.0.1:1/ws?topics=s0",
        "--publish-url",
        p0,
        "--connections",
        "3",
        "--rate",
        "5",
        "--drop-fraction",
        "0.3",
    ];
    let err = plan(&argv).unwrap_err();
    assert!(err.contains("drops nobody"), "{err}");
    argv[6] = "4";
    assert!(plan(&argv).is_ok());
}

fn conflation(extra: &[&str]) -> Result<(Plan, ConflationPlan), String> {
    let mut argv = vec![
        "conflation",
        "--url",
        "ws://127.0.0.1:9480/ws?topics=c0,c1",
        "--publish-url",
        "ws://127.0.0.1:9480/publish/c0",
        "--publish-url",
        "ws://127.0.0.1:9480/publish/c1",
        "--connections",
        "5000",
        "--rate",
        "200",
    ];
    argv.extend_from_slice(extra);
    let p = plan(&argv)?;
    let Work::Conflation(c) = p.work.clone() else {
        panic!("not conflation")
    };
    Ok((p, c))
}

#[test]
fn conflation_defaults_and_flags() {
    let (p, c) = conflation(&[]).unwrap();
    assert_eq!(c.topics, ["c0", "c1"]);
    assert_eq!((c.rate, c.duration), (200.0, Duration::from_secs(10)));
    assert_eq!((c.slow_fraction, c.slow_read_bytes_per_s), (0.1, 2048));
    assert_eq!((c.max_rate, c.size), (None, 64));
    assert_eq!(p.connect.subprotocol.as_deref(), Some("corecast.v1"));
    assert_eq!(p.connect.targets[0].url.target, "/ws?topics=c0,c1");
    assert_eq!(
        c.mode(),
        PublishMode::Rate {
            per_s: 400.0,
            duration: Duration::from_secs(10)
        }
    );
    let (p, c) = conflation(&[
        "--max-rate",
        "5",
        "--slow-fraction",
        "0",
        "--slow-read-bytes-per-s",
        "100",
        "--subprotocol",
        "corecast.v1.binary",
    ])
    .unwrap();
    assert_eq!(
        p.connect.targets[0].url.target,
        "/ws?topics=c0,c1&max_rate=5"
    );
    assert_eq!((c.max_rate, c.slow_fraction), (Some(5), 0.0));
    let back: Plan = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
    assert_eq!(back, p);
}

#[test]
fn conflation_rejects_bad_arguments() {
    for bad in [
        &["--slow-fraction", "1.5"][..],
        &["--slow-fraction", "-0.1"],
        &["--slow-read-bytes-per-s", "0"],
        &["--max-rate", "0"],
        &["--max-rate", "1001"],
        &["--rate", "0"],
        &["--size", "8"],
        &["--subprotocol", "corecast.raw"],
        &["--publish-url", "ws://127.0.0.1:9480/publish/other"],
        &["--url", "ws://127.0.0.1:9481/ws?topics=c0"],
    ] {
        assert!(conflation(bad).is_err(), "{bad:?} should be rejected");
    }
    let err = plan(&[
        "conflation",
        "--url",
        "ws://127.0.0.1:1/ws?topics=c0&max_rate=3",
        "--publish-url",
        "ws://127.0.0.1:1/publish/c0",
        "--connections",
        "3",
        "--rate",
        "5",
    ])
    .unwrap_err();
    assert!(err.contains("--max-rate"), "{err}");
}

#[test]
fn fanout_publish_spread_is_off_unless_asked() {
    let (_, f) = fanout(&["--messages", "5"]).unwrap();
    assert!(!f.spread);
    let (_, f) = fanout(&[
        "--messages",
        "5",
        "--publish-url",
        "ws://127.0.0.1:9202/publish/bench",
        "--publish-spread",
    ])
    .unwrap();
    assert!(f.spread);
    assert_eq!(f.publish.len(), 2);
}
