//! The end of a run: the shards' reports merged, the summary printed
//! (one line per figure), the same figures as one `--json` object, and the
//! `--plot`: the figures every scenario has, one function per scenario,
//! then loadgen's own cost.

use super::{Closed, Phase, Published, Server};
use crate::cli::{EchoPlan, FanoutPlan, Plan, PublishMode, Work};
use crate::clock::Anchor;
use crate::coord::Spawn;
use crate::hist::Hist;
use crate::metrics;
use crate::report::{self, Totals, pct, per_s};
use crate::shard::CLOSE_TIMEOUT;
use crate::sys::{self, Sockstat};
use serde_json::{Value, json};
use std::time::Duration;

/// Measured-phase CPU over wall time above which an event loop counts as
/// CPU-bound (then the figures are a floor for the server, not its ceiling).
const CPU_BOUND: f64 = 0.9;

/// `b - a`, when both were measured.
fn diff(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(b? - a?)
}

/// The human summary (one line per figure) and the `--json` object,
/// filled side by side.
#[derive(Default)]
struct Summary {
    lines: Vec<String>,
    json: serde_json::Map<String, Value>,
}

impl Summary {
    fn say(&mut self, label: &str, text: String) {
        self.lines.push(format!("{label:<15} {text}"));
    }

    fn put(&mut self, key: &str, value: Value) {
        self.json.insert(key.to_string(), value);
    }
}

/// A scenario's verdict and the latency distribution `--plot` draws.
struct Verdict<'t> {
    clean: bool,
    plot: &'t Hist,
    plot_title: String,
}

/// Prints the summary and writes `--plot` and `--json`; `Ok(true)` when
/// the run was clean.
pub(super) fn summarize(
    plan: &Plan,
    how: Spawn,
    argv: &[String],
    anchor: &Anchor,
    server: &Server,
    phase: &Phase,
    closed: Closed,
) -> Result<bool, String> {
    let c = &plan.connect;
    let name = plan.work.name();
    let t = Totals::merge(&closed.reports);
    let server_phase_cpu = diff(server.after.cpu_s, server.end.cpu_s);
    let procs = if how == Spawn::Processes {
        format!("{} worker processes + the parent", t.shards)
    } else {
        format!(
            "{} event loop{} in one process",
            t.shards,
            if t.shards == 1 { "" } else { "s" }
        )
    };

    let mut s = Summary::default();
    s.say("scenario", format!("{name} ({procs})"));
    connection_figures(&mut s, plan, &t, server_phase_cpu);
    let verdict = match &plan.work {
        Work::Connect => connect_figures(&mut s, &t, server),
        Work::Hold { duration } => hold_figures(&mut s, plan, &t, server, *duration),
        Work::Echo(e) => echo_figures(&mut s, &t, e, phase, server_phase_cpu),
        Work::Fanout(f) => fanout_figures(&mut s, &t, f, anchor, phase, server_phase_cpu),
    };
    let ok = t.up == c.connections && t.ended_early() == 0 && verdict.clean;
    loadgen_lines(&mut s, plan, &t, phase, &closed, &procs);
    for line in &s.lines {
        println!("{line}");
    }
    loadgen_json(&mut s, &t, phase, &closed);
    s.put("ok", json!(ok));
    s.put("argv", json!(argv));
    s.put(
        "params",
        serde_json::to_value(plan).expect("plans serialize"),
    );

    if let Some(path) = &plan.plot {
        let title = format!("{name}: {}", verdict.plot_title);
        match crate::plot::latency_svg(path, &title, verdict.plot) {
            Ok(()) => eprintln!("{name}: wrote {}", path.display()),
            Err(e) => eprintln!("{name}: no plot: {e}"),
        }
    }
    if let Some(path) = &plan.json {
        let text = serde_json::to_string_pretty(&Value::Object(s.json)).expect("JSON serializes");
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("{name}: wrote {}", path.display());
    }
    Ok(ok && closed.reap.is_ok())
}

/// Figures every scenario has: the connections, their failures, the
/// handshakes.
fn connection_figures(s: &mut Summary, plan: &Plan, t: &Totals, server_phase_cpu: Option<f64>) {
    let c = &plan.connect;
    s.say(
        "connections",
        format!(
            "{} requested, {} up, {} failed to open, {} ended during the run, {} open at the end",
            c.connections,
            t.up,
            t.failed(),
            t.ended_early(),
            t.open_at_end
        ),
    );
    s.say("failures", report::counts(&t.failures));
    if t.ended_early() > 0 {
        s.say("ended", report::counts(&t.ended));
    }
    s.say(
        "handshakes",
        format!(
            "{} in {:.3} s = {:.0}/s ({} in flight)",
            t.up,
            t.ramp_s(),
            t.handshakes_per_s(),
            c.in_flight
        ),
    );
    s.say("connect latency", t.connect_latency.describe());

    s.put("scenario", json!(plan.work.name()));
    s.put("connections", json!(c.connections));
    s.put("processes", json!(c.processes));
    s.put("connections_up", json!(t.up));
    s.put("failures", json!(t.failures));
    s.put("ended", json!(t.ended));
    s.put("connections_open_at_end", json!(t.open_at_end));
    s.put("connect_phase_s", json!(t.ramp_s()));
    s.put("handshakes_per_s", json!(t.handshakes_per_s()));
    s.put("connect_latency_us", t.connect_latency.to_json_us());
    s.put("server_pids", json!(plan.server_pids));
    s.put("server_phase_cpu_s", json!(server_phase_cpu));
    s.put("pings_answered", json!(t.pings_answered));
    s.put("pongs_received", json!(t.pongs_received));
    s.put("messages_received", json!(t.messages_received));
    s.put("close", json!(t.close));
}

/// `connect`: the server's CPU during the ramp-up.
fn connect_figures<'t>(s: &mut Summary, t: &'t Totals, server: &Server) -> Verdict<'t> {
    s.put("latency_us", t.connect_latency.to_json_us());
    s.put("frames_expected", json!(0));
    s.put("frames_received", json!(0));
    s.put("delivered_fps", json!(0.0));
    s.put("lost", json!(0));
    s.put("out_of_order", json!(0));
    let ramp_cpu = diff(server.before.cpu_s, server.after.cpu_s);
    if let Some(cpu) = ramp_cpu {
        s.say("server CPU", format!("{cpu:.2} s during the ramp-up"));
    }
    s.put("server_cpu_s", json!(ramp_cpu));
    Verdict {
        clean: true,
        plot: &t.connect_latency,
        plot_title: "connect latency".into(),
    }
}

/// `hold`: what the held connections cost the server (RSS, socket memory,
/// CPU); clean when every connection up was still open at the end.
fn hold_figures<'t>(
    s: &mut Summary,
    plan: &Plan,
    t: &'t Totals,
    server: &Server,
    duration: Duration,
) -> Verdict<'t> {
    let pids = &plan.server_pids;
    let Server { before, after, end } = server;
    s.put("latency_us", t.connect_latency.to_json_us());
    let bytes_per_conn = match (before.rss, after.rss) {
        (Some(b), Some(a)) if t.up > 0 => Some((a as f64 - b as f64) / t.up as f64),
        _ => None,
    };
    if !pids.is_empty() {
        let show = |v: Option<u64>| v.map_or("n/a".into(), report::bytes);
        s.say(
            "server RSS",
            format!(
                "pid {pids:?} (summed): before {}, after {}, end {}",
                show(before.rss),
                show(after.rss),
                show(end.rss)
            ),
        );
        s.say(
            "server memory",
            bytes_per_conn.map_or("n/a".into(), |b| {
                format!(
                    "{b:.0} bytes per connection (RSS after - before) / {}",
                    t.up
                )
            }),
        );
        if let Some(cpu) = diff(before.cpu_s, end.cpu_s) {
            s.say(
                "server CPU",
                format!("{cpu:.2} s from before the ramp-up to the end of the hold"),
            );
        }
    }
    let page = sys::page_size();
    for (label, st) in [
        ("before", before.sockstat),
        ("after", after.sockstat),
        ("end", end.sockstat),
    ] {
        if let Some(st) = st {
            s.say(
                &format!("sockstat {label}"),
                format!(
                    "TCP inuse {}, orphan {}, tw {}, alloc {}, mem {} pages ({})",
                    st.inuse,
                    st.orphan,
                    st.tw,
                    st.alloc,
                    st.mem_pages,
                    report::bytes(st.mem_pages * page)
                ),
            );
        }
    }
    s.say(
        "held",
        format!(
            "{} of {} open after {} s; {} pings answered, {} pongs and {} messages received",
            t.open_at_end,
            t.up,
            duration.as_secs(),
            t.pings_answered,
            t.pongs_received,
            t.messages_received
        ),
    );
    let sock = |st: Option<Sockstat>| st.map(Sockstat::to_json);
    s.put("connections_held", json!(t.open_at_end));
    s.put("hold_s", json!(duration.as_secs_f64()));
    s.put("server_rss_before", json!(before.rss));
    s.put("server_rss_after", json!(after.rss));
    s.put("server_rss_end", json!(end.rss));
    s.put("server_bytes_per_conn", json!(bytes_per_conn));
    s.put("server_cpu_s", json!(diff(before.cpu_s, end.cpu_s)));
    s.put("sockstat_before", json!(sock(before.sockstat)));
    s.put("sockstat_after", json!(sock(after.sockstat)));
    s.put("sockstat_end", json!(sock(end.sockstat)));
    s.put(
        "sockstat_mem_bytes_per_conn",
        json!(match (after.sockstat, before.sockstat) {
            (Some(a), Some(b)) if t.up > 0 =>
                Some((a.mem_pages as f64 - b.mem_pages as f64) * page as f64 / t.up as f64),
            _ => None,
        }),
    );
    s.put("frames_expected", json!(0));
    s.put("frames_received", json!(t.frames));
    s.put("delivered_fps", json!(0.0));
    s.put("lost", json!(t.ended_early()));
    s.put("out_of_order", json!(0));
    Verdict {
        clean: t.open_at_end == t.up,
        plot: &t.connect_latency,
        plot_title: "connect latency".into(),
    }
}

/// `echo`: round trips, throughput, and whether a loadgen event loop was
/// the bottleneck; clean when every echo came back once, in order, intact.
fn echo_figures<'t>(
    s: &mut Summary,
    t: &'t Totals,
    e: &EchoPlan,
    phase: &Phase,
    server_phase_cpu: Option<f64>,
) -> Verdict<'t> {
    let phase_wall_s = phase.wall_s;
    let span = match (t.phase_start_ns, t.last_receive_ns) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / 1e9,
        _ => 0.0,
    };
    let rate = per_s(t.frames as f64, span);
    s.say(
        "echo",
        format!(
            "{} sent, {} echoed, lost {}, out of order {}, duplicates {}, malformed {}, not binary {}{}",
            t.sent,
            t.frames,
            t.lost,
            t.out_of_order,
            t.duplicates,
            t.malformed,
            t.not_binary,
            if t.drain_timed_out {
                "; ended at the drain timeout"
            } else {
                ""
            }
        ),
    );
    s.say(
        "throughput",
        format!(
            "{rate:.0} messages/s ({}/s of payload each way) over {span:.3} s",
            report::bytes((rate * e.size as f64) as u64)
        ),
    );
    s.say("round trip", t.latency.describe());
    s.say(
        "loadgen phase",
        format!(
            "{:.2} s CPU in the {phase_wall_s:.3} s phase; busiest event loop {:.0}% of a core",
            t.phase_cpu_s,
            t.max_phase_load * 100.0
        ),
    );
    if t.max_phase_load > CPU_BOUND {
        s.say(
            "note",
            "a loadgen event loop was CPU-bound: add --processes to measure the server, not loadgen".into(),
        );
    }
    if let Some(cpu) = server_phase_cpu {
        s.say(
            "server CPU",
            format!(
                "{cpu:.2} s in the echo phase ({:.0}% of one core)",
                pct(cpu, phase_wall_s)
            ),
        );
    }
    s.put("loadgen_cpu_bound", json!(t.max_phase_load > CPU_BOUND));
    s.put("latency_us", t.latency.to_json_us());
    s.put("messages_sent", json!(t.sent));
    s.put("frames_expected", json!(t.sent));
    s.put("frames_received", json!(t.frames));
    s.put("delivered_fps", json!(rate));
    s.put("echo_bytes_per_s", json!(rate * e.size as f64));
    s.put("echo_s", json!(span));
    s.put("lost", json!(t.lost));
    s.put("out_of_order", json!(t.out_of_order));
    s.put("duplicates", json!(t.duplicates));
    s.put("malformed", json!(t.malformed));
    s.put("not_binary", json!(t.not_binary));
    s.put("connections_with_loss", json!(t.with_loss));
    s.put("connections_out_of_order", json!(t.with_reorder));
    s.put("drain_timed_out", json!(t.drain_timed_out));
    Verdict {
        clean: t.lost == 0
            && t.out_of_order == 0
            && t.duplicates == 0
            && t.malformed == 0
            && t.not_binary == 0,
        plot: &t.latency,
        plot_title: format!("round trip, {} in flight per connection", e.window),
    }
}

/// Fanout's delivery figures, shared by its summary lines and its JSON.
struct Delivery {
    /// From the first publish to the last receive.
    delivery_s: f64,
    delivered_fps: f64,
    /// Loadgen's CPU in the phase: the subscribers' loops and the publisher.
    loadgen_phase_cpu: f64,
    /// A loadgen event loop (or the publisher) was CPU-bound.
    bound: bool,
}

/// `fanout`: what was published, what arrived and how fast, against the
/// server's own count; clean when the publisher had no problem and every
/// frame arrived once, in order, intact.
fn fanout_figures<'t>(
    s: &mut Summary,
    t: &'t Totals,
    f: &FanoutPlan,
    anchor: &Anchor,
    phase: &Phase,
    server_phase_cpu: Option<f64>,
) -> Verdict<'t> {
    let p = phase.published.as_ref().expect("fanout published");
    let first_publish_ns = p.first.map(|i| anchor.ns(i));
    let delivery_s = match (first_publish_ns, t.last_receive_ns) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / 1e9,
        _ => 0.0,
    };
    let d = Delivery {
        delivery_s,
        delivered_fps: per_s(t.frames as f64, delivery_s),
        loadgen_phase_cpu: t.phase_cpu_s + phase.parent_cpu_s,
        bound: t.max_phase_load > CPU_BOUND || per_s(phase.parent_cpu_s, phase.wall_s) > CPU_BOUND,
    };
    fanout_lines(s, t, f, p, &d, phase, server_phase_cpu);
    fanout_json(s, t, f, p, &d, phase, server_phase_cpu);
    Verdict {
        clean: p.problem.is_none()
            && t.lost == 0
            && t.out_of_order == 0
            && t.duplicates == 0
            && t.malformed == 0
            && t.not_binary == 0,
        plot: &t.latency,
        plot_title: format!("fanout publish-to-receive, {}", f.mode.describe()),
    }
}

/// Fanout's summary lines.
fn fanout_lines(
    s: &mut Summary,
    t: &Totals,
    f: &FanoutPlan,
    p: &Published,
    d: &Delivery,
    phase: &Phase,
    server_phase_cpu: Option<f64>,
) {
    let (delivery_s, delivered_fps) = (d.delivery_s, d.delivered_fps);
    let loadgen_phase_cpu = d.loadgen_phase_cpu;
    let (phase_wall_s, parent_phase_cpu) = (phase.wall_s, phase.parent_cpu_s);
    s.say(
        "published",
        format!(
            "{} of {} messages of {} B to {} topic{} in {:.3} s ({:.0}/s) over {} publisher connection{}{}",
            p.published,
            p.planned,
            f.size,
            f.topics,
            if f.topics == 1 { "" } else { "s" },
            p.publish_s,
            per_s(p.published as f64, p.publish_s),
            p.connections,
            if p.connections == 1 { "" } else { "s" },
            match f.mode {
                PublishMode::Rate { .. } => format!(
                    ", max lag behind schedule {:.3} ms",
                    p.max_lag.as_secs_f64() * 1e3
                ),
                PublishMode::Burst { .. } => String::new(),
            }
        ),
    );
    if let Some(pr) = &p.problem {
        s.say("publish problem", pr.clone());
    }
    s.say(
        "frames",
        format!(
            "{} expected, {} received ({:.3}%), lost {}, out of order {}, duplicates {}, malformed {}, not binary {}, fragments {}",
            t.expected,
            t.frames,
            pct(t.frames as f64, t.expected as f64),
            t.lost,
            t.out_of_order,
            t.duplicates,
            t.malformed,
            t.not_binary,
            t.fragments_received
        ),
    );
    s.say(
        "subscribers",
        format!(
            "{} followed, {} complete, {} with gaps, {} with reordering",
            t.tracked, t.complete, t.with_loss, t.with_reorder
        ),
    );
    if !f.metrics.is_empty() {
        s.say(
            "server frames",
            match (&p.metrics_problem, phase.frames_sent) {
                (Some(e), _) => format!("cannot read: {e}"),
                (None, Some(n)) => format!(
                    "{n:.0} sent by the server ({}), {} received: {}",
                    metrics::FRAMES_SENT,
                    t.frames,
                    if n == t.frames as f64 {
                        "equal"
                    } else {
                        "DIFFERENT"
                    }
                ),
                (None, None) => "n/a".into(),
            },
        );
    }
    s.say(
        "delivery",
        format!(
            "{delivered_fps:.0} frames/s ({}/s of payload) over {delivery_s:.3} s from first publish to last receive{}",
            report::bytes((delivered_fps * f.size as f64) as u64),
            if t.drain_timed_out {
                "; ended at the drain timeout"
            } else {
                ""
            }
        ),
    );
    s.say("latency", t.latency.describe());
    s.say(
        "loadgen phase",
        format!(
            "{loadgen_phase_cpu:.2} s CPU in the {phase_wall_s:.3} s delivery phase (publisher {parent_phase_cpu:.2} s, subscribers {:.2} s; busiest subscriber loop {:.0}% of a core)",
            t.phase_cpu_s,
            t.max_phase_load * 100.0
        ),
    );
    if d.bound {
        s.say(
            "note",
            format!(
                "a loadgen event loop was CPU-bound (>{:.0}% in the delivery phase): these figures are a floor for the server, not its ceiling",
                CPU_BOUND * 100.0
            ),
        );
    }
    if let Some(cpu) = server_phase_cpu {
        s.say(
            "server CPU",
            format!(
                "{cpu:.2} s in the delivery phase ({:.0}% of one core)",
                pct(cpu, phase_wall_s)
            ),
        );
    }
}

/// Fanout's figures in the `--json` object.
fn fanout_json(
    s: &mut Summary,
    t: &Totals,
    f: &FanoutPlan,
    p: &Published,
    d: &Delivery,
    phase: &Phase,
    server_phase_cpu: Option<f64>,
) {
    let (mode, rate, duration_s) = match f.mode {
        PublishMode::Burst { .. } => ("burst", None, None),
        PublishMode::Rate { per_s, duration } => ("rate", Some(per_s), Some(duration.as_secs())),
    };
    s.put("mode", json!(mode));
    s.put("rate", json!(rate));
    s.put("duration_s", json!(duration_s));
    s.put("size", json!(f.size));
    s.put("topics", json!(f.topics));
    s.put("subscribers_up", json!(t.up));
    s.put("subscribers_followed", json!(t.tracked));
    s.put("subscribers_complete", json!(t.complete));
    s.put("subscribers_with_gaps", json!(t.with_loss));
    s.put("subscribers_out_of_order", json!(t.with_reorder));
    s.put("published", json!(p.published));
    s.put("publish_s", json!(p.publish_s));
    s.put("publish_problem", json!(p.problem));
    s.put("publish_max_lag_ms", json!(p.max_lag.as_secs_f64() * 1e3));
    s.put("publisher_connections", json!(p.connections));
    s.put("frames_expected", json!(t.expected));
    s.put("frames_received", json!(t.frames));
    s.put("server_frames_sent", json!(phase.frames_sent));
    s.put("metrics_problem", json!(p.metrics_problem));
    s.put("delivery_s", json!(d.delivery_s));
    s.put("delivered_fps", json!(d.delivered_fps));
    s.put("lost", json!(t.lost));
    s.put("out_of_order", json!(t.out_of_order));
    s.put("duplicates", json!(t.duplicates));
    s.put("malformed", json!(t.malformed));
    s.put("not_binary", json!(t.not_binary));
    s.put("fragments", json!(t.fragments_received));
    s.put("drain_timed_out", json!(t.drain_timed_out));
    s.put("latency_us", t.latency.to_json_us());
    s.put("loadgen_delivery_cpu_s", json!(d.loadgen_phase_cpu));
    s.put("publisher_cpu_s", json!(phase.parent_cpu_s));
    s.put("loadgen_cpu_bound", json!(d.bound));
    s.put("delivery_phase_wall_s", json!(phase.wall_s));
    s.put("server_delivery_cpu_s", json!(server_phase_cpu));
}

/// Loadgen's own cost and how the run closed: summary lines.
fn loadgen_lines(
    s: &mut Summary,
    plan: &Plan,
    t: &Totals,
    phase: &Phase,
    closed: &Closed,
    procs: &str,
) {
    let (own, children) = (&closed.own, &closed.children);
    let loadgen_cpu = own.cpu_s() + children.cpu_s();
    s.say(
        "loadgen CPU",
        format!(
            "{loadgen_cpu:.2} s in total (user {:.2}, sys {:.2}; {procs}); largest event-loop RSS {}",
            own.user_s + children.user_s,
            own.sys_s + children.sys_s,
            report::bytes(t.max_rss)
        ),
    );
    if let (Some(b), false) = (phase.machine_busy_cores, plan.work == Work::Connect) {
        s.say(
            "machine CPU",
            format!(
                "{b:.2} of {} cores busy in the measured phase (all processes)",
                sys::online_cpus()
            ),
        );
    }
    s.say(
        "close",
        format!(
            "{} clean, {} dropped at the {} s close deadline",
            t.close.clean,
            t.close.timed_out,
            CLOSE_TIMEOUT.as_secs()
        ),
    );
    if let Err(e) = &closed.reap {
        s.say("workers", e.clone());
    }
}

/// Loadgen's own cost and the shards' reports: `--json` figures.
fn loadgen_json(s: &mut Summary, t: &Totals, phase: &Phase, closed: &Closed) {
    let (own, children) = (&closed.own, &closed.children);
    s.put("loadgen_cpu_s", json!(own.cpu_s() + children.cpu_s()));
    s.put("loadgen_cpu_user_s", json!(own.user_s + children.user_s));
    s.put("loadgen_cpu_sys_s", json!(own.sys_s + children.sys_s));
    s.put("loadgen_max_rss", json!(t.max_rss));
    s.put("loadgen_phase_wall_s", json!(phase.wall_s));
    s.put(
        "loadgen_phase_cpu_s",
        json!(t.phase_cpu_s + phase.parent_cpu_s),
    );
    s.put("loadgen_busiest_loop_load", json!(t.max_phase_load));
    s.put("machine_busy_cores", json!(phase.machine_busy_cores));
    s.put("machine_cores", json!(sys::online_cpus()));
    s.put(
        "shards",
        json!(
            closed
                .reports
                .iter()
                .map(|r| json!({
                    "shard": r.shard, "pid": r.pid, "connections": r.requested, "up": r.up,
                    "frames": r.frames, "cpu_s": r.cpu_s, "phase_cpu_s": r.phase_cpu_s,
                    "max_rss": r.max_rss,
                }))
                .collect::<Vec<_>>()
        ),
    );
}
