//! `loadgen hold`: open N connections, hold them idle, and measure what
//! they cost the server (resident memory per connection, kernel socket
//! memory) and what driving them cost loadgen.
//!
//! Server figures are read around the ramp-up: before the first connect
//! ("before"), once all are up ("after"), and at the end of the hold
//! ("end"). `server_bytes_per_conn = (after - before) / connections_up`.

use crate::fleet::Fleet;
use crate::report::{self, Latency};
use crate::sys::{self, SelfUsage, Sockstat};
use crate::{ConnectPlan, HoldPlan};
use serde_json::json;
use std::time::{Duration, Instant};

/// How long the final close handshakes may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Server-side figures at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Snapshot {
    rss: Option<u64>,
    cpu_s: Option<f64>,
    sockstat: Option<Sockstat>,
}

impl Snapshot {
    fn take(pid: Option<u32>) -> Self {
        Self {
            rss: pid.and_then(|p| sys::rss_bytes(p).ok()),
            cpu_s: pid.and_then(|p| sys::process_cpu_s(p).ok()),
            sockstat: Sockstat::read().ok(),
        }
    }
}

/// Runs the scenario and prints the summary; `Ok(true)` when every
/// connection opened and stayed open.
pub fn run(plan: &HoldPlan) -> Result<bool, String> {
    let c: &ConnectPlan = &plan.connect;
    let pid = plan.server_pid;
    eprintln!(
        "hold: {} connections to {} ({}), {} handshakes in flight, {}; hold {} s",
        c.connections,
        c.url,
        c.dst,
        c.in_flight,
        describe_sources(c),
        plan.duration.as_secs()
    );
    let mut fleet = Fleet::for_plan(c)?;

    let before = Snapshot::take(pid);
    let ramp = fleet
        .ramp_up(Instant::now() + c.connect_timeout)
        .map_err(|e| format!("event loop failed during ramp-up: {e}"))?;
    let up = ramp.latencies_us.len();
    let after = Snapshot::take(pid);
    eprintln!(
        "hold: {up} up in {:.3} s; holding {} s",
        ramp.elapsed.as_secs_f64(),
        plan.duration.as_secs()
    );

    fleet
        .hold_until(Instant::now() + plan.duration)
        .map_err(|e| format!("event loop failed during the hold: {e}"))?;
    let held = fleet.open();
    let end = Snapshot::take(pid);
    let close = fleet
        .close_all(Instant::now() + CLOSE_TIMEOUT)
        .map_err(|e| format!("event loop failed while closing: {e}"))?;
    let usage = SelfUsage::now();

    let handshakes_per_s = if ramp.elapsed.is_zero() {
        0.0
    } else {
        up as f64 / ramp.elapsed.as_secs_f64()
    };
    let latency = Latency::from_sorted_us(&ramp.latencies_us);
    let bytes_per_conn = match (before.rss, after.rss) {
        (Some(b), Some(a)) if up > 0 => Some((a as f64 - b as f64) / up as f64),
        _ => None,
    };
    let server_cpu_s = match (before.cpu_s, end.cpu_s) {
        (Some(b), Some(e)) => Some(e - b),
        _ => None,
    };
    let failed: u64 = fleet.failures.values().sum();
    let lost: u64 = fleet.ended.values().sum();

    // Human summary.
    println!("scenario        hold");
    println!(
        "connections     {} requested, {up} up, {held} still open after {} s, {failed} failed to open, {lost} lost during the run",
        c.connections,
        plan.duration.as_secs()
    );
    println!("failures        {}", report::counts(&fleet.failures));
    if lost > 0 {
        println!("lost            {}", report::counts(&fleet.ended));
    }
    println!(
        "handshakes      {up} in {:.3} s = {handshakes_per_s:.0}/s ({} in flight)",
        ramp.elapsed.as_secs_f64(),
        c.in_flight
    );
    match latency {
        Some(l) => println!(
            "connect latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            l.p50, l.p99, l.max
        ),
        None => println!("connect latency n/a (no connection opened)"),
    }
    if let Some(pid) = pid {
        let show = |v: Option<u64>| v.map_or("n/a".into(), report::bytes);
        println!(
            "server RSS      pid {pid}: before {}, after {}, end {}",
            show(before.rss),
            show(after.rss),
            show(end.rss)
        );
        match bytes_per_conn {
            Some(b) => {
                println!("server memory   {b:.0} bytes per connection (RSS after - before) / {up}")
            }
            None => println!("server memory   n/a"),
        }
        if let Some(s) = server_cpu_s {
            println!("server CPU      {s:.2} s from before the ramp-up to the end of the hold");
        }
    }
    let page = sys::page_size();
    for (name, s) in [
        ("before", before.sockstat),
        ("after", after.sockstat),
        ("end", end.sockstat),
    ] {
        if let Some(s) = s {
            println!(
                "sockstat {name:<6} TCP inuse {}, orphan {}, tw {}, alloc {}, mem {} pages ({})",
                s.inuse,
                s.orphan,
                s.tw,
                s.alloc,
                s.mem_pages,
                report::bytes(s.mem_pages * page)
            );
        }
    }
    println!(
        "frames          {} pings answered, {} pongs and {} messages received",
        fleet.counters.pings_answered,
        fleet.counters.pongs_received,
        fleet.counters.messages_received
    );
    println!(
        "close           {} clean, {} dropped at the {} s close deadline",
        close.clean,
        close.timed_out,
        CLOSE_TIMEOUT.as_secs()
    );
    println!(
        "loadgen CPU     {:.2} s (user {:.2}, sys {:.2}), max RSS {}",
        usage.cpu_s(),
        usage.user_s,
        usage.sys_s,
        report::bytes(usage.max_rss_bytes)
    );

    if let Some(path) = &plan.json {
        let sock = |s: Option<Sockstat>| s.map(Sockstat::to_json);
        let v = json!({
            "scenario": "hold",
            "connections": c.connections,
            "connections_up": up,
            "connections_held": held,
            "failures": fleet.failures,
            "lost": fleet.ended,
            "connect_phase_s": ramp.elapsed.as_secs_f64(),
            "handshakes_per_s": handshakes_per_s,
            "latency_ms": latency.map(Latency::to_json),
            "server_pid": pid,
            "server_rss_before": before.rss,
            "server_rss_after": after.rss,
            "server_rss_end": end.rss,
            "server_bytes_per_conn": bytes_per_conn,
            "server_cpu_s": server_cpu_s,
            "sockstat_before": sock(before.sockstat),
            "sockstat_after": sock(after.sockstat),
            "sockstat_end": sock(end.sockstat),
            "pings_answered": fleet.counters.pings_answered,
            "pongs_received": fleet.counters.pongs_received,
            "messages_received": fleet.counters.messages_received,
            "close": { "clean": close.clean, "timed_out": close.timed_out },
            "loadgen_cpu_s": usage.cpu_s(),
            "loadgen_cpu_user_s": usage.user_s,
            "loadgen_cpu_sys_s": usage.sys_s,
            "loadgen_max_rss": usage.max_rss_bytes,
            "params": {
                "url": c.url.to_string(),
                "dst": c.dst.to_string(),
                "connections": c.connections,
                "in_flight": c.in_flight,
                "duration_s": plan.duration.as_secs(),
                "connect_timeout_s": c.connect_timeout.as_secs(),
                "handshake_timeout_s": c.handshake_timeout.as_secs(),
                "source_addrs": c.sources.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "server_pid": pid,
            },
        });
        let text = serde_json::to_string_pretty(&v).expect("a JSON value serializes");
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("hold: wrote {}", path.display());
    }
    Ok(failed == 0 && lost == 0 && up == c.connections)
}

fn describe_sources(c: &ConnectPlan) -> String {
    match c.sources.as_slice() {
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
