//! The `fanout` figures: what was published, what arrived and how fast,
//! against the server's own count; computed once ([`Delivery`]), then
//! written as summary lines and as `--json` figures.

use super::{CPU_BOUND, Summary, Verdict};
use crate::cli::{FanoutPlan, PublishMode};
use crate::clock::Anchor;
use crate::metrics;
use crate::report::{self, Totals, pct, per_s};
use crate::run::{Phase, Published};
use serde_json::json;

/// Fanout's delivery figures, shared by its summary lines and its JSON.
struct Delivery {
    /// From the first publish to the last receive.
    delivery_s: f64,
    delivered_fps: f64,
    /// Loadgen's CPU in the phase: the subscribers' loops and the publisher.
    loadgen_phase_cpu: f64,
    /// A loadgen event loop (or the publisher) was CPU-bound.
    bound: bool,
    /// The subscribers offered permessage-deflate.
    deflate_offered: bool,
}

/// `fanout`: what was published, what arrived and how fast, against the
/// server's own count; clean when the publisher had no problem and every
/// frame arrived once, in order, intact.
pub(super) fn fanout_figures<'t>(
    s: &mut Summary,
    t: &'t Totals,
    (f, deflate_offered): (&FanoutPlan, bool),
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
        deflate_offered,
    };
    fanout_lines(s, t, f, p, &d, phase, server_phase_cpu);
    fanout_json(s, t, f, p, &d, phase, server_phase_cpu);
    Verdict {
        clean: p.problem.is_none()
            && t.lost == 0
            && t.out_of_order == 0
            && t.duplicates == 0
            && t.malformed == 0
            && t.wrong_opcode == 0,
        plot: &t.latency,
        plot_title: format!(
            "fanout publish-to-receive, {}{}",
            f.mode.describe(),
            if t.verified < t.tracked {
                format!(", {} verified subscribers", t.verified)
            } else {
                String::new()
            }
        ),
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
            "{} of {} messages of {} B{} to {} topic{} in {:.3} s ({:.0}/s) over {} publisher connection{}{}",
            p.published,
            p.planned,
            f.size,
            match &f.corpus {
                Some(c) => format!(" on average, text from {}", c.path.display()),
                None => String::new(),
            },
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
            "{} expected, {} received ({:.3}%), lost {}, out of order {}, duplicates {}, malformed {}, not {} {}, fragments {}",
            t.expected,
            t.frames,
            pct(t.frames as f64, t.expected as f64),
            t.lost,
            t.out_of_order,
            t.duplicates,
            t.malformed,
            if f.corpus.is_some() { "text" } else { "binary" },
            t.wrong_opcode,
            t.fragments_received
        ),
    );
    s.say(
        "subscribers",
        format!(
            "{} followed, {} complete, {} with gaps, {} with reordering{}",
            t.tracked,
            t.complete,
            t.with_loss,
            t.with_reorder,
            if t.verified < t.tracked {
                format!(
                    "; {} verified (1 in {}: decoded, order, content and latency checked), the others counted",
                    t.verified, f.verify_every
                )
            } else {
                String::new()
            }
        ),
    );
    if d.deflate_offered {
        s.say(
            "permessage-deflate",
            format!(
                "offered by every subscriber, agreed by {} of {} up; {} frames received compressed ({:.1}%)",
                t.deflate_agreed,
                t.up,
                t.compressed_received,
                pct(t.compressed_received as f64, t.frames as f64)
            ),
        );
    }
    s.say(
        "bytes",
        format!(
            "{} of payload received ({:.1} B per frame, as on the wire){}",
            report::bytes(t.payload_bytes),
            t.payload_bytes as f64 / t.frames.max(1) as f64,
            match phase.bytes_sent {
                Some(b) => format!(
                    "; the server wrote {} to sockets in the phase ({}, all traffic): {:.1} B per frame received",
                    report::bytes(b as u64),
                    metrics::BYTES_SENT,
                    b / t.frames.max(1) as f64
                ),
                None => String::new(),
            }
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
    s.put(
        "corpus",
        json!(f.corpus.as_ref().map(|c| c.path.display().to_string())),
    );
    s.put("verify_every", json!(f.verify_every));
    s.put("subscribers_verified", json!(t.verified));
    s.put("permessage_deflate_offered", json!(d.deflate_offered));
    s.put("deflate_agreed", json!(t.deflate_agreed));
    s.put("compressed_frames_received", json!(t.compressed_received));
    s.put("payload_bytes_received", json!(t.payload_bytes));
    s.put("server_bytes_sent", json!(phase.bytes_sent));
    s.put(
        "server_bytes_per_frame",
        json!(phase.bytes_sent.map(|b| b / t.frames.max(1) as f64)),
    );
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
    s.put(
        if f.corpus.is_some() {
            "not_text"
        } else {
            "not_binary"
        },
        json!(t.wrong_opcode),
    );
    s.put("fragments", json!(t.fragments_received));
    s.put("drain_timed_out", json!(t.drain_timed_out));
    s.put("latency_us", t.latency.to_json_us());
    s.put("loadgen_delivery_cpu_s", json!(d.loadgen_phase_cpu));
    s.put("publisher_cpu_s", json!(phase.parent_cpu_s));
    s.put("loadgen_cpu_bound", json!(d.bound));
    s.put("delivery_phase_wall_s", json!(phase.wall_s));
    s.put("server_delivery_cpu_s", json!(server_phase_cpu));
}
