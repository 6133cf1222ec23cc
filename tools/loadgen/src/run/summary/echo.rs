//! The `echo` figures: round trips, throughput, and whether a loadgen
//! event loop was the bottleneck.

use super::{CPU_BOUND, Summary, Verdict};
use crate::cli::EchoPlan;
use crate::report::{self, Totals, pct, per_s};
use crate::run::Phase;
use serde_json::json;

/// `echo`: round trips, throughput, and whether a loadgen event loop was
/// the bottleneck; clean when every echo came back once, in order, intact.
pub(super) fn echo_figures<'t>(
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
            t.wrong_opcode,
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
    s.put("not_binary", json!(t.wrong_opcode));
    s.put("connections_with_loss", json!(t.with_loss));
    s.put("connections_out_of_order", json!(t.with_reorder));
    s.put("drain_timed_out", json!(t.drain_timed_out));
    Verdict {
        clean: t.lost == 0
            && t.out_of_order == 0
            && t.duplicates == 0
            && t.malformed == 0
            && t.wrong_opcode == 0,
        plot: &t.latency,
        plot_title: format!("round trip, {} in flight per connection", e.window),
    }
}
