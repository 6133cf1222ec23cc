//! The `conflation` figures: what was published, then for normal and slow
//! subscribers apart the staleness of each delivered value, how far
//! behind the last publication they were when publishing stopped and
//! after the drain, the conflation markers, the continuity of the numbers
//! and the connections the server closed; written as summary lines and as
//! `--json` figures.

use super::{CPU_BOUND, Summary, Verdict};
use crate::cli::ConflationPlan;
use crate::conflation::report::{Behind, ClassCounts, ConflationTotals, NORMAL, SLOW};
use crate::hist::Hist;
use crate::report::{self, Totals, per_s};
use crate::run::{Phase, Published};
use serde_json::{Value, json};

/// The fleet's name for a connection the server closed with 1008 (slow
/// consumer).
pub(super) const SLOW_CONSUMER_CLOSE: &str = "server_close_1008";

/// `conflation`: clean when the publisher had no problem, no number was
/// skipped without a marker accounting for it or repeated, no epoch
/// changed, nothing unexpected or unreadable arrived, and every subscriber
/// still open at the end had every topic's last publication. Slow-consumer
/// closes (1008) are reported, not failed.
pub(super) fn conflation_figures<'t>(
    s: &mut Summary,
    t: &'t Totals,
    ct: ConflationTotals,
    plan: &ConflationPlan,
    phase: &Phase,
    server_phase_cpu: Option<f64>,
) -> Verdict<'t> {
    let p = phase.published.as_ref().expect("conflation published");
    let bound = t.max_phase_load > CPU_BOUND || per_s(phase.parent_cpu_s, phase.wall_s) > CPU_BOUND;
    let disconnects = t.ended.get(SLOW_CONSUMER_CLOSE).copied().unwrap_or(0);
    lines(
        s,
        t,
        &ct,
        plan,
        p,
        phase,
        bound,
        disconnects,
        server_phase_cpu,
    );
    put_json(
        s,
        t,
        &ct,
        plan,
        p,
        phase,
        bound,
        disconnects,
        server_phase_cpu,
    );
    Verdict {
        clean: p.problem.is_none()
            && ct.sum(|c| c.gaps) == 0
            && ct.sum(|c| c.duplicates) == 0
            && ct.sum(|c| c.epoch_changes) == 0
            && ct.sum(ClassCounts::unexpected_total) == 0
            && ct.sum(|c| c.tail_incomplete) == 0,
        plot: &t.latency,
        plot_title: format!(
            "conflation, staleness of the delivered values ({} subscribers, {} slow at {} B/s, {}/s per topic)",
            t.tracked, ct.classes[SLOW].subscribers, plan.slow_read_bytes_per_s, plan.rate
        ),
    }
}

fn describe_behind(b: &Behind) -> String {
    format!(
        "{} of {} (subscriber, topic) behind, mean {:.1} numbers, max {}",
        b.behind,
        b.positions,
        b.mean(),
        b.max
    )
}

#[allow(clippy::too_many_arguments)]
fn lines(
    s: &mut Summary,
    t: &Totals,
    ct: &ConflationTotals,
    plan: &ConflationPlan,
    p: &Published,
    phase: &Phase,
    bound: bool,
    disconnects: u64,
    server_phase_cpu: Option<f64>,
) {
    let topics = plan.topics.len();
    s.say(
        "published",
        format!(
            "{} of {} messages of {} B to {} topic{} ({}/s each) in {:.3} s over {} publisher connection{}, max lag behind schedule {:.3} ms",
            p.published,
            p.planned,
            plan.size,
            topics,
            if topics == 1 { "" } else { "s" },
            plan.rate,
            p.publish_s,
            p.connections,
            if p.connections == 1 { "" } else { "s" },
            p.max_lag.as_secs_f64() * 1e3
        ),
    );
    if let Some(pr) = &p.problem {
        s.say("publish problem", pr.clone());
    }
    s.say(
        "subscribers",
        format!(
            "{} normal, {} slow (reading at most {} B/s while publishing){}",
            ct.classes[NORMAL].subscribers,
            ct.classes[SLOW].subscribers,
            plan.slow_read_bytes_per_s,
            match plan.max_rate {
                Some(n) => format!(", each with max_rate={n}"),
                None => String::new(),
            }
        ),
    );
    for (k, name) in [(NORMAL, "normal"), (SLOW, "slow")] {
        let c = &ct.classes[k];
        if c.subscribers == 0 {
            continue;
        }
        s.say(&format!("{name} staleness"), ct.staleness[k].describe());
        s.say(
            &format!("{name} at stop"),
            describe_behind(&c.behind_at_publish_end),
        );
        s.say(
            &format!("{name} at end"),
            format!(
                "{}; {} open subscribers without every last publication",
                describe_behind(&c.behind_at_end),
                c.tail_incomplete
            ),
        );
        s.say(
            &format!("{name} conflated"),
            format!(
                "{} markers, {} replaced, {} skipped numbers accounted for; {} publications in {} frames",
                c.markers, c.replaced, c.conflated, c.publications, c.frames
            ),
        );
        s.say(
            &format!("{name} continuity"),
            format!(
                "gaps {} ({} subscribers), duplicates {} ({} subscribers), epoch changes {}, snapshots {}, unexpected {} ({}), malformed {}, without payload header {}; {} connections ended",
                c.gaps,
                c.subscribers_with_gaps,
                c.duplicates,
                c.subscribers_with_duplicates,
                c.epoch_changes,
                c.snapshots,
                c.unexpected.values().sum::<u64>(),
                report::counts(&c.unexpected),
                c.malformed,
                c.no_header,
                c.ended
            ),
        );
    }
    s.say(
        "disconnects",
        format!(
            "{disconnects} closed by the server with 1008 (slow consumer); all ended: {}{}",
            report::counts(&t.ended),
            if t.drain_timed_out {
                "; the drain ended at its timeout"
            } else {
                ""
            }
        ),
    );
    super::say_phase_cpu(s, t, phase, bound, server_phase_cpu);
}

fn behind_json(b: &Behind) -> Value {
    json!({
        "positions": b.positions, "behind": b.behind, "sum": b.sum,
        "mean": b.mean(), "max": b.max,
    })
}

fn class_json(c: &ClassCounts, staleness: &Hist) -> Value {
    json!({
        "subscribers": c.subscribers,
        "ended": c.ended,
        "frames": c.frames,
        "publications": c.publications,
        "staleness_us": staleness.to_json_us(),
        "behind_at_publish_end": behind_json(&c.behind_at_publish_end),
        "behind_at_end": behind_json(&c.behind_at_end),
        "tail_incomplete": c.tail_incomplete,
        "markers": c.markers,
        "replaced": c.replaced,
        "conflated": c.conflated,
        "gaps": c.gaps,
        "subscribers_with_gaps": c.subscribers_with_gaps,
        "duplicates": c.duplicates,
        "subscribers_with_duplicates": c.subscribers_with_duplicates,
        "epoch_changes": c.epoch_changes,
        "snapshots": c.snapshots,
        "unexpected": c.unexpected,
        "malformed": c.malformed,
        "without_payload_header": c.no_header,
    })
}

#[allow(clippy::too_many_arguments)]
fn put_json(
    s: &mut Summary,
    t: &Totals,
    ct: &ConflationTotals,
    plan: &ConflationPlan,
    p: &Published,
    phase: &Phase,
    bound: bool,
    disconnects: u64,
    server_phase_cpu: Option<f64>,
) {
    s.put("mode", json!("rate"));
    s.put("rate", json!(plan.rate));
    s.put("duration_s", json!(plan.duration.as_secs()));
    s.put("size", json!(plan.size));
    s.put("topics", json!(plan.topics));
    s.put("slow_fraction", json!(plan.slow_fraction));
    s.put("slow_read_bytes_per_s", json!(plan.slow_read_bytes_per_s));
    s.put("max_rate", json!(plan.max_rate));
    s.put("published", json!(p.published));
    s.put("publish_s", json!(p.publish_s));
    s.put("publish_problem", json!(p.problem));
    s.put("publish_max_lag_ms", json!(p.max_lag.as_secs_f64() * 1e3));
    s.put("publisher_connections", json!(p.connections));
    s.put("subscribers_followed", json!(t.tracked));
    s.put(
        "normal",
        class_json(&ct.classes[NORMAL], &ct.staleness[NORMAL]),
    );
    s.put("slow", class_json(&ct.classes[SLOW], &ct.staleness[SLOW]));
    s.put("staleness_us", t.latency.to_json_us());
    s.put("gaps", json!(ct.sum(|c| c.gaps)));
    s.put("duplicates", json!(ct.sum(|c| c.duplicates)));
    s.put("markers", json!(ct.sum(|c| c.markers)));
    s.put("replaced", json!(ct.sum(|c| c.replaced)));
    s.put("slow_consumer_disconnects", json!(disconnects));
    s.put("tail_incomplete", json!(ct.sum(|c| c.tail_incomplete)));
    s.put("subscribers_complete", json!(t.complete));
    s.put("lost", json!(t.lost));
    s.put("frames_received", json!(t.frames));
    s.put("latency_us", t.latency.to_json_us());
    s.put("drain_timed_out", json!(t.drain_timed_out));
    s.put(
        "loadgen_conflation_cpu_s",
        json!(t.phase_cpu_s + phase.parent_cpu_s),
    );
    s.put("publisher_cpu_s", json!(phase.parent_cpu_s));
    s.put("loadgen_cpu_bound", json!(bound));
    s.put("conflation_phase_wall_s", json!(phase.wall_s));
    s.put("server_conflation_cpu_s", json!(server_phase_cpu));
}
