//! The end of a run: the shards' reports merged, the summary printed
//! (one line per figure), the same figures as one `--json` object, and the
//! `--plot`.
//!
//! Here: [`summarize`], the figures every scenario has (the connections
//! first, loadgen's own cost last) and the [`Summary`] they are written
//! to; each scenario's own figures are in `connect` (connect and hold),
//! `echo`, `fanout`, `storm` and `conflation`.

mod conflation;
mod connect;
mod echo;
mod fanout;
mod storm;

use super::{Closed, Phase, Server};
use crate::cli::{Plan, Work};
use crate::clock::Anchor;
use crate::coord::Spawn;
use crate::hist::Hist;
use crate::report::{self, Totals};
use crate::shard::CLOSE_TIMEOUT;
use crate::sys;
use conflation::{SLOW_CONSUMER_CLOSE, conflation_figures};
use connect::{connect_figures, hold_figures};
use echo::echo_figures;
use fanout::fanout_figures;
use serde_json::{Value, json};
use storm::storm_figures;

/// Measured-phase CPU over wall time above which an event loop counts as
/// CPU-bound (then the figures are a floor for the server, not its ceiling).
const CPU_BOUND: f64 = 0.9;

/// The last lines of a scenario with a publisher in the parent and
/// subscribers in the shards (`storm`, `conflation`): loadgen's CPU in the
/// phase, whether a loop was CPU-bound, the server's CPU.
fn say_phase_cpu(
    s: &mut Summary,
    t: &Totals,
    phase: &Phase,
    bound: bool,
    server_phase_cpu: Option<f64>,
) {
    s.say(
        "loadgen phase",
        format!(
            "{:.2} s CPU in the {:.3} s phase (publisher {:.2} s, subscribers {:.2} s; busiest subscriber loop {:.0}% of a core)",
            t.phase_cpu_s + phase.parent_cpu_s,
            phase.wall_s,
            phase.parent_cpu_s,
            t.phase_cpu_s,
            t.max_phase_load * 100.0
        ),
    );
    if bound {
        s.say(
            "note",
            format!(
                "a loadgen event loop was CPU-bound (>{:.0}% in the phase): the times are partly loadgen's",
                CPU_BOUND * 100.0
            ),
        );
    }
    if let Some(cpu) = server_phase_cpu {
        s.say(
            "server CPU",
            format!(
                "{cpu:.2} s in the phase ({:.0}% of one core)",
                report::pct(cpu, phase.wall_s)
            ),
        );
    }
}

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

    let storm_totals =
        crate::storm::report::StormTotals::merge(closed.reports.iter().map(|r| &r.storm));
    let mut s = Summary::default();
    s.say("scenario", format!("{name} ({procs})"));
    connection_figures(&mut s, plan, &t, server_phase_cpu);
    let verdict = match &plan.work {
        Work::Connect => connect_figures(&mut s, &t, server),
        Work::Hold { duration } => hold_figures(&mut s, plan, &t, server, *duration),
        Work::Echo(e) => echo_figures(&mut s, &t, e, phase, server_phase_cpu),
        Work::Fanout(f) => fanout_figures(
            &mut s,
            &t,
            (f, plan.connect.permessage_deflate),
            anchor,
            phase,
            server_phase_cpu,
        ),
        Work::Storm(st) => storm_figures(&mut s, &t, &storm_totals, st, phase, server_phase_cpu),
        Work::Conflation(cp) => {
            let totals = crate::conflation::report::ConflationTotals::merge(
                closed.reports.iter().map(|r| &r.conflation),
            );
            conflation_figures(&mut s, &t, totals, cp, phase, server_phase_cpu)
        }
    };
    // Conflation reports the server's slow-consumer closes; any other end
    // fails the run.
    let ended = match &plan.work {
        Work::Conflation(_) => {
            t.ended_early() - t.ended.get(SLOW_CONSUMER_CLOSE).copied().unwrap_or(0)
        }
        _ => t.ended_early(),
    };
    let ok = t.up == c.connections && ended == 0 && verdict.clean;
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
