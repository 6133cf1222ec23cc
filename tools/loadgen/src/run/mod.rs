//! The parent's side of every scenario: start the shards, take the
//! server's figures around the barriers, publish (fanout, storm), then merge the
//! shards' reports, print the summary and write `--json` and `--plot`
//! ([`summary`]).

mod summary;

use crate::cli::{ConflationPlan, FanoutPlan, Plan, PublishMode, StormPlan, Work};
use crate::clock::Anchor;
use crate::coord::{Coordinator, Spawn, Stage};
use crate::metrics;
use crate::publish::{Publisher, Schedule};
use crate::report::Totals;
use crate::shard::CLOSE_TIMEOUT;
use crate::sys::{self, SelfUsage, Sockstat};
use crate::topics::per_topic;
use crate::wire::{ShardReport, ToShard};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use summary::summarize;

/// Extra time every barrier allows beyond what the plan needs (process
/// start, a slow last shard).
const BARRIER_SLACK: Duration = Duration::from_secs(30);
/// Burst mode gives up publishing after this long (a server that stops
/// reading would otherwise hold the run forever).
const BURST_PUBLISH_LIMIT: Duration = Duration::from_secs(120);
/// Longest wait of the publishing loop.
const TURN: Duration = Duration::from_millis(20);
/// How often the progress line is redrawn while publishing.
const DRAW_EVERY: Duration = Duration::from_millis(250);

/// Server-side figures at one moment, summed over the `--server-pid`s.
#[derive(Debug, Clone, Copy, Default)]
struct Snapshot {
    rss: Option<u64>,
    cpu_s: Option<f64>,
    sockstat: Option<Sockstat>,
}

impl Snapshot {
    fn take(pids: &[u32]) -> Self {
        let all = |f: &dyn Fn(u32) -> Option<f64>| -> Option<f64> {
            if pids.is_empty() {
                return None;
            }
            pids.iter().map(|&p| f(p)).sum()
        };
        Self {
            rss: all(&|p| sys::rss_bytes(p).ok().map(|b| b as f64)).map(|b| b as u64),
            cpu_s: all(&|p| sys::process_cpu_s(p).ok()),
            sockstat: Sockstat::read().ok(),
        }
    }
}

/// What the publisher did (fanout, storm).
#[derive(Debug, Default)]
struct Published {
    published: u64,
    planned: u64,
    publish_s: f64,
    max_lag: Duration,
    problem: Option<String>,
    connections: usize,
    first: Option<Instant>,
    /// The server's frames and bytes sent when publishing started.
    server_sent_before: Option<[f64; 2]>,
    metrics_problem: Option<String>,
}

/// The server's figures around the phases: before the ramp-up, after it
/// (the start of the measured phase) and at the end of the measured phase.
struct Server {
    before: Snapshot,
    after: Snapshot,
    end: Snapshot,
}

/// The measured phase (hold, echo, or publishing and draining), timed.
struct Phase {
    wall_s: f64,
    /// CPU of the parent's thread in the phase: the publisher, in fanout and storm.
    parent_cpu_s: f64,
    /// Cores of the whole machine busy in the phase (all processes).
    machine_busy_cores: Option<f64>,
    /// The server's figures at its end.
    end: Snapshot,
    /// What the publisher did (fanout, storm).
    published: Option<Published>,
    /// Frames the server counted sent during the phase (fanout with
    /// `--metrics-url`).
    frames_sent: Option<f64>,
    /// Bytes the server counted written to sockets during the phase (all
    /// traffic: the frames, and whatever else it sent meanwhile).
    bytes_sent: Option<f64>,
}

/// What is left once the shards are gone.
struct Closed {
    reports: Vec<ShardReport>,
    /// How the shards ended (`Err`: a worker failed or had to be killed).
    reap: Result<(), String>,
    own: SelfUsage,
    children: SelfUsage,
}

/// Runs `plan`; `Ok(true)` when everything went as it should (see each
/// scenario's summary), `Ok(false)` when the run completed but not cleanly.
pub fn run(plan: &Plan, how: Spawn, argv: &[String]) -> Result<bool, String> {
    announce(plan);
    crate::client::tls::configure(&plan.connect.tls)?;
    let anchor = Anchor::now();
    let before = Snapshot::take(&plan.server_pids);
    let mut coord = Coordinator::spawn(plan, how)?;
    let after = ramp_up(plan, &mut coord)?;
    let phase = measured_phase(plan, &mut coord, &anchor)?;
    let closed = close(coord)?;
    let server = Server {
        before,
        after,
        end: phase.end,
    };
    summarize(plan, how, argv, &anchor, &server, &phase, closed)
}

/// Says what the run is about to do.
fn announce(plan: &Plan) {
    let c = &plan.connect;
    eprintln!(
        "{}: {} connections to {} over {} process{}, {} handshakes in flight, {}",
        plan.work.name(),
        c.connections,
        c.targets
            .iter()
            .map(|t| t.url.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        c.processes,
        if c.processes == 1 { "" } else { "es" },
        c.in_flight,
        describe_sources(&c.sources)
    );
}

/// Waits until every shard has its connections up (or given up on), says
/// how that went, and returns the server's figures right after.
fn ramp_up(plan: &Plan, coord: &mut Coordinator) -> Result<Snapshot, String> {
    let c = &plan.connect;
    coord.barrier(
        Stage::Ready,
        Instant::now() + c.connect_timeout + BARRIER_SLACK,
        "ramp-up",
    )?;
    let ready = Totals::merge(&coord.reports);
    let after = Snapshot::take(&plan.server_pids);
    eprintln!(
        "{}: {} of {} up in {:.3} s ({:.0} handshakes/s), {} failed",
        plan.work.name(),
        ready.up,
        c.connections,
        ready.ramp_s(),
        ready.handshakes_per_s(),
        ready.failed()
    );
    Ok(after)
}

/// Starts the shards' measured phase (publishing meanwhile, for fanout),
/// waits for its end, and measures it: wall time, CPU, the server's
/// figures, and the server's count of frames sent.
fn measured_phase(plan: &Plan, coord: &mut Coordinator, anchor: &Anchor) -> Result<Phase, String> {
    let machine0 = sys::machine_cpu_ticks().ok();
    let parent_cpu0 = sys::thread_cpu_s();
    let phase_start = Instant::now();
    let go_at = |d: Duration| ToShard::Go {
        end_ns: anchor.ns(Instant::now() + d),
    };
    let mut published = None;
    let done_within = match &plan.work {
        Work::Connect => {
            coord.broadcast(&go_at(Duration::ZERO))?;
            Duration::ZERO
        }
        Work::Hold { duration } => {
            eprintln!("hold: holding {} s", duration.as_secs());
            coord.broadcast(&go_at(*duration))?;
            *duration
        }
        Work::Echo(e) => {
            coord.broadcast(&go_at(e.duration))?;
            e.duration + e.drain_timeout
        }
        Work::Fanout(f) => {
            let p = publish(plan, f, coord, anchor)?;
            published = Some(p);
            f.drain_timeout
        }
        Work::Storm(s) => {
            published = Some(publish_storm(plan, s, coord, anchor)?);
            s.drain_timeout
        }
        Work::Conflation(c) => {
            published = Some(publish_conflation(plan, c, coord, anchor)?);
            c.drain_timeout
        }
    };
    coord.barrier(
        Stage::Done,
        Instant::now() + done_within + BARRIER_SLACK,
        match &plan.work {
            Work::Fanout(_) | Work::Storm(_) | Work::Conflation(_) => "draining",
            Work::Echo(_) => "echo",
            _ => "hold",
        },
    )?;
    let phase_end = Instant::now();
    let parent_cpu_s = sys::thread_cpu_s() - parent_cpu0;
    let machine1 = sys::machine_cpu_ticks().ok();
    let end = Snapshot::take(&plan.server_pids);
    let (mut frames_sent, mut bytes_sent) = (None, None);
    if let (Work::Fanout(f), Some(p)) = (&plan.work, published.as_mut())
        && !f.metrics.is_empty()
    {
        match scrape_sent(&f.metrics) {
            Ok([frames, bytes]) => {
                frames_sent = p.server_sent_before.map(|b| frames - b[0]);
                bytes_sent = p.server_sent_before.map(|b| bytes - b[1]);
            }
            Err(e) => p.metrics_problem = Some(e),
        }
    }
    let machine_busy_cores = match (machine0, machine1) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
            Some((b1 - b0) as f64 / (t1 - t0) as f64 * sys::online_cpus() as f64)
        }
        _ => None,
    };
    Ok(Phase {
        wall_s: phase_end.duration_since(phase_start).as_secs_f64(),
        parent_cpu_s,
        machine_busy_cores,
        end,
        published,
        frames_sent,
        bytes_sent,
    })
}

/// The server's frames and bytes sent so far, once its byte count has
/// settled: a send is counted when the server reaps its completion, which
/// can come after the client has read the bytes (a worker off its core on
/// this 2-core machine missed 7 % of a 2 GB phase once). Scraped until
/// two scrapes [`SETTLE_PAUSE`] apart differ by at most [`SETTLE_SLACK`]
/// bytes (a metrics page is ~10 KB, and each scrape's own answer counts),
/// at most [`SETTLE_TRIES`] times; the earlier of the two is returned.
fn scrape_sent(urls: &[crate::url::WsUrl]) -> Result<[f64; 2], String> {
    let scrape = || -> Result<[f64; 2], String> {
        let v = metrics::scrape_sums(urls, &[metrics::FRAMES_SENT, metrics::BYTES_SENT])?;
        Ok([v[0], v[1]])
    };
    let mut last = scrape()?;
    for _ in 0..SETTLE_TRIES {
        std::thread::sleep(SETTLE_PAUSE);
        let next = scrape()?;
        if next[1] - last[1] <= SETTLE_SLACK * urls.len() as f64 {
            break;
        }
        last = next;
    }
    Ok(last)
}

/// See [`scrape_sent`]: bytes one scrape may add (its own answer, pings).
const SETTLE_SLACK: f64 = 64.0 * 1024.0;
/// See [`scrape_sent`].
const SETTLE_PAUSE: Duration = Duration::from_millis(50);
/// See [`scrape_sent`]: at most a second of waiting.
const SETTLE_TRIES: usize = 20;

/// Has the shards close their connections, waits for them, and reaps them.
fn close(mut coord: Coordinator) -> Result<Closed, String> {
    coord.broadcast(&ToShard::Close)?;
    coord.barrier(
        Stage::Finished,
        Instant::now() + CLOSE_TIMEOUT + BARRIER_SLACK,
        "closing",
    )?;
    let reports = coord.reports.clone();
    let reap = coord.finish();
    Ok(Closed {
        reports,
        reap,
        own: SelfUsage::now(),
        children: SelfUsage::children(),
    })
}

/// The publisher's source address: the first of the subscribers'.
fn publisher_source(plan: &Plan) -> Option<SocketAddr> {
    plan.connect
        .sources
        .first()
        .map(|&ip| SocketAddr::new(ip, 0))
}

/// Fanout: opens the publishers, starts the shards' receiving phase,
/// publishes, and tells the shards what was published.
fn publish(
    plan: &Plan,
    f: &FanoutPlan,
    coord: &mut Coordinator,
    anchor: &Anchor,
) -> Result<Published, String> {
    let mut out = Published {
        planned: f.mode.messages(),
        ..Default::default()
    };
    if !f.metrics.is_empty() {
        match scrape_sent(&f.metrics) {
            Ok(v) => out.server_sent_before = Some(v),
            Err(e) => out.metrics_problem = Some(e),
        }
    }
    let publisher = Publisher::open(f, publisher_source(plan))?;
    let limit_after = match f.mode {
        PublishMode::Burst { .. } => BURST_PUBLISH_LIMIT,
        PublishMode::Rate { duration, .. } => duration + f.drain_timeout,
    };
    let job = Job {
        mode: f.mode,
        topics: f.topics,
        limit_after,
        drain_timeout: f.drain_timeout,
    };
    // The shards' own limit, should `Published` never reach them.
    drive(publisher, &job, coord, anchor, &mut out, |start| {
        ToShard::Go {
            end_ns: anchor.ns(start + limit_after + f.drain_timeout + BARRIER_SLACK),
        }
    })?;
    Ok(out)
}

/// Storm: opens the publishers (each topic's to its URLs), starts the
/// shards' phase with the drop time, publishes at the rate, and tells the
/// shards what was published.
fn publish_storm(
    plan: &Plan,
    s: &StormPlan,
    coord: &mut Coordinator,
    anchor: &Anchor,
) -> Result<Published, String> {
    let mode = s.mode();
    let mut out = Published {
        planned: mode.messages(),
        ..Default::default()
    };
    let publisher = Publisher::open_by_topic(&s.publish, publisher_source(plan), s.size)?;
    let limit_after = s.duration + s.drain_timeout;
    let job = Job {
        mode,
        topics: s.topics.len(),
        limit_after,
        drain_timeout: s.drain_timeout,
    };
    drive(publisher, &job, coord, anchor, &mut out, |start| {
        ToShard::Storm {
            drop_ns: anchor.ns(start + s.drop_at),
            end_ns: anchor.ns(start + limit_after + s.drain_timeout + BARRIER_SLACK),
        }
    })?;
    Ok(out)
}

/// Conflation: opens the publishers (each topic's to its URLs), starts
/// the shards' phase (the slow subscribers' pacing with it), publishes at
/// the rate, and tells the shards what was published.
fn publish_conflation(
    plan: &Plan,
    c: &ConflationPlan,
    coord: &mut Coordinator,
    anchor: &Anchor,
) -> Result<Published, String> {
    let mode = c.mode();
    let mut out = Published {
        planned: mode.messages(),
        ..Default::default()
    };
    let publisher = Publisher::open_by_topic(&c.publish, publisher_source(plan), c.size)?;
    let limit_after = c.duration + c.drain_timeout;
    let job = Job {
        mode,
        topics: c.topics.len(),
        limit_after,
        drain_timeout: c.drain_timeout,
    };
    drive(publisher, &job, coord, anchor, &mut out, |start| {
        ToShard::Go {
            end_ns: anchor.ns(start + limit_after + c.drain_timeout + BARRIER_SLACK),
        }
    })?;
    Ok(out)
}

/// What a publisher is to send.
struct Job {
    mode: PublishMode,
    topics: usize,
    /// Publishing gives up this long after its start.
    limit_after: Duration,
    drain_timeout: Duration,
}

/// Starts the shards' phase with `go(start)`, publishes `job` from
/// `start`, and tells the shards what was published; fills `out`.
fn drive(
    mut publisher: Publisher,
    job: &Job,
    coord: &mut Coordinator,
    anchor: &Anchor,
    out: &mut Published,
    go: impl FnOnce(Instant) -> ToShard,
) -> Result<(), String> {
    out.connections = publisher.connections();
    let start = Instant::now();
    let limit = start + job.limit_after;
    coord.broadcast(&go(start))?;
    let mut s = Schedule::new(job.mode, job.topics, start);
    let mut next_draw = start;
    loop {
        let now = Instant::now();
        if let Err(e) = publisher.fill(&mut s) {
            out.problem = Some(e);
            break;
        }
        if s.done() && publisher.idle() {
            break;
        }
        if now >= limit {
            out.problem = Some(format!(
                "publishing stopped at the time limit after {} of {} messages",
                s.sent, s.planned
            ));
            break;
        }
        coord.pump(Duration::ZERO)?;
        if now >= next_draw {
            next_draw = now + DRAW_EVERY;
            coord.draw(&format!("published {}/{}", s.sent, s.planned));
        }
        // After `fill`, a message already due means the sockets are full:
        // wait for them; otherwise wait until the next one is due.
        let wait = match s.next_due() {
            Some(d) if d > now => (d - now).min(TURN),
            _ => TURN,
        };
        if let Err(e) = publisher.serve(wait) {
            out.problem = Some(e);
            break;
        }
    }
    let last = Instant::now();
    out.published = s.sent;
    out.max_lag = s.max_lag;
    out.first = s.first;
    out.publish_s = s
        .first
        .map_or(0.0, |f| last.saturating_duration_since(f).as_secs_f64());
    coord.broadcast(&ToShard::Published {
        per_topic: per_topic(s.sent, job.topics),
        drain_until_ns: anchor.ns(last + job.drain_timeout),
    })?;
    publisher.close();
    Ok(())
}

fn describe_sources(sources: &[std::net::IpAddr]) -> String {
    match sources {
        [] => "source address chosen by the kernel".into(),
        [one] => format!("source {one}"),
        many => format!(
            "{} source addresses {}..{}",
            many.len(),
            many[0],
            many[many.len() - 1]
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Limits};
    use clap::Parser;
    use serde_json::Value;

    fn server() -> corecast::server::ServerHandle {
        corecast::server::start(corecast::server::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            workers: 2,
            pin: corecast::server::PinMode::Never,
            ..Default::default()
        })
        .unwrap()
    }

    /// Runs a command line in this process, each shard a thread; returns
    /// the exit verdict and the JSON report.
    fn run_threads(argv: &[String]) -> (bool, Value) {
        let json = std::env::temp_dir().join(format!(
            "loadgen-run-{}-{:?}.json",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut full = vec!["loadgen".to_string()];
        full.extend_from_slice(argv);
        full.extend(["--json".into(), json.display().to_string()]);
        let cli = Cli::try_parse_from(&full).unwrap();
        let limits = Limits {
            nofile: 20_000,
            ports_per_source: 28_232,
        };
        let plan = cli.command.plan(limits).unwrap().unwrap();
        let ok = run(&plan, Spawn::Threads, &full).unwrap();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        std::fs::remove_file(&json).unwrap();
        (ok, v)
    }

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn connect_over_three_shards_and_two_servers() {
        let (a, b) = (server(), server());
        let (ok, v) = run_threads(&args(&format!(
            "connect --url ws://{}/echo --url ws://{}/echo --connections 90 --in-flight 9 --processes 3",
            a.local_addr(),
            b.local_addr()
        )));
        assert!(ok, "{v}");
        assert_eq!(v["connections_up"], 90);
        assert_eq!(v["processes"], 3);
        assert_eq!(v["shards"].as_array().unwrap().len(), 3);
        assert!(v["handshakes_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(v["connect_latency_us"]["count"], 90);
        assert!(v["latency_us"]["p99"].as_f64().unwrap() > 0.0);
        assert_eq!(v["close"]["clean"], 90);
        // Round-robin over the two servers.
        assert_eq!(a.stats().handshakes_accepted, 45);
        assert_eq!(b.stats().handshakes_accepted, 45);
        assert_eq!(v["params"]["connect"]["connections"], 90);
        for s in [a, b] {
            s.shutdown();
            s.join();
        }
    }

    #[test]
    fn hold_reports_server_memory() {
        let srv = server();
        let (ok, v) = run_threads(&args(&format!(
            "hold --url ws://{}/ws?topics=idle --connections 40 --processes 2 --duration 1 --server-pid {}",
            srv.local_addr(),
            std::process::id()
        )));
        assert!(ok, "{v}");
        assert_eq!(v["connections_held"], 40);
        assert!(v["server_bytes_per_conn"].is_number(), "{v}");
        assert!(v["sockstat_after"]["tcp_inuse"].is_number());
        assert!(v["loadgen_cpu_s"].as_f64().unwrap() > 0.0);
        srv.shutdown();
        srv.join();
    }

    #[test]
    fn fanout_over_shards_and_topics_delivers_what_the_server_sent() {
        let srv = server();
        let a = srv.local_addr();
        let (ok, v) = run_threads(&args(&format!(
            "fanout --url ws://{a}/ws?topics=t{{topic}} --publish-url ws://{a}/publish/t{{topic}} \
             --connections 60 --processes 3 --topics 4 --topic-dist zipf:1 --messages 50 --size 32 \
             --metrics-url http://{a}/metrics"
        )));
        assert!(ok, "{v}");
        let expected = v["frames_expected"].as_u64().unwrap();
        assert!(expected > 60 * 10, "{v}");
        assert_eq!(v["frames_received"].as_u64(), Some(expected));
        assert_eq!(v["server_frames_sent"].as_f64(), Some(expected as f64));
        assert_eq!(
            (v["lost"].as_u64(), v["out_of_order"].as_u64()),
            (Some(0), Some(0))
        );
        assert_eq!(v["subscribers_complete"], 60);
        assert_eq!(v["publisher_connections"], 4);
        assert!(v["latency_us"]["p999"].as_f64().unwrap() > 0.0);
        assert!(v["delivered_fps"].as_f64().unwrap() > 0.0);
        srv.shutdown();
        srv.join();
    }

    #[test]
    fn fanout_of_corpus_text_compressed_for_subscribers_that_offered_deflate() {
        let srv = server();
        let a = srv.local_addr();
        let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/corpus/quotes-1k.jsonl");
        let run = |extra: &str| {
            run_threads(&args(&format!(
                "fanout --url ws://{a}/ws?topics=q --publish-url ws://{a}/publish/q \
                 --connections 40 --processes 2 --messages 30 --corpus {corpus} \
                 --verify-every 4 --metrics-url http://{a}/metrics {extra}"
            )))
        };
        let (ok, plain) = run("");
        assert!(ok, "{plain}");
        let (ok, v) = run("--permessage-deflate");
        assert!(ok, "{v}");
        for v in [&plain, &v] {
            assert_eq!(v["frames_received"], 40 * 30);
            assert_eq!(
                (v["lost"].as_u64(), v["malformed"].as_u64()),
                (Some(0), Some(0))
            );
            assert_eq!(v["not_text"], 0);
            assert_eq!(v["subscribers_verified"], 10);
            assert_eq!(v["latency_us"]["count"], 10 * 30);
            assert!(v["size"].as_u64().unwrap() > 900, "{v}");
        }
        assert_eq!(plain["compressed_frames_received"], 0);
        assert_eq!(
            (
                v["deflate_agreed"].as_u64(),
                v["compressed_frames_received"].as_u64()
            ),
            (Some(40), Some(40 * 30))
        );
        // Compressed, the payload and the server's bytes shrink alike.
        let per_frame =
            |v: &Value, k: &str| v[k].as_f64().unwrap() / v["frames_received"].as_f64().unwrap();
        let (b0, b1) = (
            per_frame(&plain, "server_bytes_sent"),
            per_frame(&v, "server_bytes_sent"),
        );
        assert!(b1 < 0.6 * b0, "{b1} vs {b0}");
        assert!(
            b0 >= per_frame(&plain, "payload_bytes_received"),
            "headers too"
        );
        let (p0, p1) = (
            per_frame(&plain, "payload_bytes_received"),
            per_frame(&v, "payload_bytes_received"),
        );
        assert!(p1 < 0.6 * p0 && p0 > 900.0, "{p1} vs {p0}");
        srv.shutdown();
        srv.join();
    }

    #[test]
    fn fanout_with_an_http_publisher_at_a_rate() {
        let srv = server();
        let a = srv.local_addr();
        let (ok, v) = run_threads(&args(&format!(
            "fanout --url ws://{a}/ws?topics=h --publish-url http://{a}/publish/h \
             --connections 20 --processes 2 --rate 40 --duration 1 --size 100"
        )));
        assert!(ok, "{v}");
        assert_eq!(v["published"], 40);
        assert_eq!(v["frames_received"], 800);
        assert_eq!(v["lost"], 0);
        // Paced: 40 messages at 40/s take about a second, not a burst.
        assert!(v["publish_s"].as_f64().unwrap() > 0.9, "{v}");
        srv.shutdown();
        srv.join();
    }

    #[test]
    fn storm_in_threads_binary_envelopes_closed_sockets() {
        let srv = server();
        let a = srv.local_addr();
        let (ok, v) = run_threads(&args(&format!(
            "storm --url ws://{a}/ws?topics=x,y --publish-url ws://{a}/publish/x \
             --publish-url ws://{a}/publish/y --connections 40 --processes 2 --rate 40 \
             --duration 2 --drop-at 0.5 --reconnect-jitter-ms 300 --drop-mode close \
             --drop-fraction 0.5 --subprotocol corecast.v1.binary"
        )));
        assert!(ok, "{v}");
        assert_eq!(v["subscribers_dropped"], 20);
        assert_eq!(v["resubscribed"], 20);
        // The history (100 messages) holds the whole run: all complete.
        assert_eq!(v["recoveries_complete"], 40, "{v}");
        assert_eq!(v["recovered_received"], v["recovered_announced"]);
        assert_eq!(
            (v["gaps"].as_u64(), v["duplicates"].as_u64()),
            (Some(0), Some(0))
        );
        assert_eq!(v["caught_up"], 20);
        assert_eq!(v["caught_up_us"]["count"], 20);
        assert_eq!(v["subscribers_complete"], 40);
        assert_eq!(v["published"], 160);
        // 160 publications each (the 20 that came back: before the drop,
        // recovered and live), and the 20 replies.
        assert_eq!(v["frames_received"], 40 * 160 + 20);
        srv.shutdown();
        srv.join();
    }

    #[test]
    fn echo_keeps_messages_in_flight() {
        let srv = server();
        let (ok, v) = run_threads(&args(&format!(
            "echo --url ws://{}/echo --connections 10 --processes 2 --messages-in-flight 4 --duration 1 --size 64",
            srv.local_addr()
        )));
        assert!(ok, "{v}");
        let sent = v["messages_sent"].as_u64().unwrap();
        assert!(sent > 40, "{v}");
        assert_eq!(v["frames_received"].as_u64(), Some(sent));
        assert_eq!(
            (v["lost"].as_u64(), v["out_of_order"].as_u64()),
            (Some(0), Some(0))
        );
        assert!(v["latency_us"]["p50"].as_f64().unwrap() > 0.0);
        srv.shutdown();
        srv.join();
    }

    #[test]
    fn refusals_are_counted_and_fail_the_run() {
        let srv = server();
        let (ok, v) = run_threads(&args(&format!(
            "connect --url ws://{}/nowhere --connections 6 --processes 2",
            srv.local_addr()
        )));
        assert!(!ok);
        assert_eq!(v["failures"]["handshake_status_404"], 6);
        assert_eq!(v["connections_up"], 0);
        srv.shutdown();
        srv.join();
    }
}
