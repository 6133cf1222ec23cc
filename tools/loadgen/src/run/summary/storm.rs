//! The `storm` figures: what was published, the drop, the reconnects,
//! what the recoveries said and whether the numbers that followed them
//! continued exactly, and how long the subscribers took to catch up;
//! written as summary lines and as `--json` figures.

use super::{CPU_BOUND, Summary, Verdict};
use crate::cli::StormPlan;
use crate::report::{self, Totals, per_s};
use crate::run::{Phase, Published};
use crate::storm::report::StormTotals;
use serde_json::json;

/// `storm`: clean when the publisher had no problem, some subscribers
/// dropped and every one of them resubscribed and caught up, no number was
/// skipped without the server saying so or repeated, every subscriber
/// ended with the last publication of every topic, and nothing unexpected
/// or unreadable arrived. Incomplete recoveries and announced epoch
/// changes are reported, not failed: the server said what it lost.
pub(super) fn storm_figures<'t>(
    s: &mut Summary,
    t: &'t Totals,
    st: &'t StormTotals,
    plan: &StormPlan,
    phase: &Phase,
    server_phase_cpu: Option<f64>,
) -> Verdict<'t> {
    let p = phase.published.as_ref().expect("storm published");
    let bound = t.max_phase_load > CPU_BOUND || per_s(phase.parent_cpu_s, phase.wall_s) > CPU_BOUND;
    storm_lines(s, t, st, plan, p, phase, bound, server_phase_cpu);
    storm_json(s, t, st, plan, p, phase, bound, server_phase_cpu);
    let c = &st.counts;
    Verdict {
        clean: p.problem.is_none()
            && c.dropped > 0
            && c.resubscribed == c.dropped
            && st.failed() == 0
            && c.not_caught_up == 0
            && c.gaps == 0
            && c.duplicates == 0
            && c.tail_incomplete == 0
            && st.unexpected() == 0
            && t.malformed == 0,
        plot: &st.caught_up_from_drop,
        plot_title: format!(
            "storm, time to caught up from the drop ({} subscribers, reconnect jitter 0..{} ms, {}/s per topic)",
            c.dropped,
            plan.jitter.as_millis(),
            plan.rate
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn storm_lines(
    s: &mut Summary,
    t: &Totals,
    st: &StormTotals,
    plan: &StormPlan,
    p: &Published,
    phase: &Phase,
    bound: bool,
    server_phase_cpu: Option<f64>,
) {
    let c = &st.counts;
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
        "storm",
        format!(
            "{} of {} subscribers dropped ({}) {:.3} s into publishing, each back after 0..{} ms; {} selected were already gone",
            c.dropped,
            t.tracked,
            plan.drop_mode.name(),
            plan.drop_at.as_secs_f64(),
            plan.jitter.as_millis(),
            c.not_open_at_drop
        ),
    );
    s.say(
        "reconnects",
        format!(
            "{} started, {} opened, {} resubscribed, {} failed ({})",
            c.reconnects,
            c.reopened,
            c.resubscribed,
            st.failed(),
            report::counts(&c.reconnect_failures)
        ),
    );
    s.say("reconnect 101", st.reconnect_handshake.describe());
    s.say("subscribe reply", st.reply_latency.describe());
    s.say(
        "recoveries",
        format!(
            "{} complete, {} incomplete ({}), {} missing from the reply; {} publications announced, {} received; {} announced lost; {} topics without a position; {} subscribes sent again after recovery busy",
            c.recoveries_complete,
            st.incomplete(),
            report::counts(&c.recoveries_incomplete),
            c.recoveries_missing,
            c.recovered_announced,
            c.recovered_received,
            c.announced_lost,
            c.no_position,
            c.busy_retries
        ),
    );
    s.say(
        "continuity",
        format!(
            "gaps {} ({} subscribers), duplicates {} ({} subscribers), unannounced epoch changes {}, conflated {}, snapshots {}, unexpected {} ({}), malformed {}, without payload header {}",
            c.gaps,
            c.subscribers_with_gaps,
            c.duplicates,
            c.subscribers_with_duplicates,
            c.epoch_changes,
            c.conflated,
            c.snapshots,
            st.unexpected(),
            report::counts(&c.unexpected),
            t.malformed,
            c.no_header
        ),
    );
    s.say(
        "caught up",
        format!(
            "{} of {} resubscribed ({} of them by replaying up to the last publication; {} not); the last {}",
            c.caught_up,
            c.resubscribed,
            c.caught_up_at_the_end,
            c.not_caught_up,
            match st.storm_s() {
                Some(v) => format!("{v:.3} s after the drop"),
                None => "n/a".into(),
            }
        ),
    );
    s.say("from the drop", st.caught_up_from_drop.describe());
    s.say("from reconnect", st.caught_up_from_reconnect.describe());
    s.say(
        "at the end",
        format!(
            "{} of {} subscribers have every topic's last publication; {} lack {} publications{}",
            t.complete,
            t.tracked,
            c.tail_incomplete,
            c.tail_missing,
            if t.drain_timed_out {
                "; ended at the drain timeout"
            } else {
                ""
            }
        ),
    );
    s.say(
        "frames",
        format!(
            "{} received ({} recovered), fragments {}",
            t.frames, c.recovered_received, t.fragments_received
        ),
    );
    s.say("live latency", t.latency.describe());
    super::say_phase_cpu(s, t, phase, bound, server_phase_cpu);
}

#[allow(clippy::too_many_arguments)]
fn storm_json(
    s: &mut Summary,
    t: &Totals,
    st: &StormTotals,
    plan: &StormPlan,
    p: &Published,
    phase: &Phase,
    bound: bool,
    server_phase_cpu: Option<f64>,
) {
    let c = &st.counts;
    s.put("mode", json!("rate"));
    s.put("rate", json!(plan.rate));
    s.put("duration_s", json!(plan.duration.as_secs()));
    s.put("size", json!(plan.size));
    s.put("topics", json!(plan.topics));
    s.put("drop_at_s", json!(plan.drop_at.as_secs_f64()));
    s.put("drop_fraction", json!(plan.drop_fraction));
    s.put("drop_mode", json!(plan.drop_mode.name()));
    s.put("reconnect_jitter_ms", json!(plan.jitter.as_millis() as u64));
    s.put("published", json!(p.published));
    s.put("publish_s", json!(p.publish_s));
    s.put("publish_problem", json!(p.problem));
    s.put("publish_max_lag_ms", json!(p.max_lag.as_secs_f64() * 1e3));
    s.put("publisher_connections", json!(p.connections));
    s.put("subscribers_up", json!(t.up));
    s.put("subscribers_followed", json!(t.tracked));
    s.put("subscribers_dropped", json!(c.dropped));
    s.put("not_open_at_drop", json!(c.not_open_at_drop));
    s.put("reconnects_started", json!(c.reconnects));
    s.put("reconnects_opened", json!(c.reopened));
    s.put("resubscribed", json!(c.resubscribed));
    s.put("reconnect_failed", json!(st.failed()));
    s.put("reconnect_failures", json!(c.reconnect_failures));
    s.put("recoveries_complete", json!(c.recoveries_complete));
    s.put("recoveries_incomplete", json!(st.incomplete()));
    s.put(
        "recoveries_incomplete_by_reason",
        json!(c.recoveries_incomplete),
    );
    s.put("recoveries_missing", json!(c.recoveries_missing));
    s.put("recovered_announced", json!(c.recovered_announced));
    s.put("recovered_received", json!(c.recovered_received));
    s.put("announced_lost", json!(c.announced_lost));
    s.put("topics_without_position", json!(c.no_position));
    s.put("busy_retries", json!(c.busy_retries));
    s.put("gaps", json!(c.gaps));
    s.put("subscribers_with_gaps", json!(c.subscribers_with_gaps));
    s.put("duplicates", json!(c.duplicates));
    s.put(
        "subscribers_with_duplicates",
        json!(c.subscribers_with_duplicates),
    );
    s.put("epoch_changes", json!(c.epoch_changes));
    s.put("conflated", json!(c.conflated));
    s.put("snapshots", json!(c.snapshots));
    s.put("unexpected", json!(c.unexpected));
    s.put("malformed", json!(t.malformed));
    s.put("without_payload_header", json!(c.no_header));
    s.put("caught_up", json!(c.caught_up));
    s.put("caught_up_at_the_end", json!(c.caught_up_at_the_end));
    s.put("not_caught_up", json!(c.not_caught_up));
    s.put("storm_s", json!(st.storm_s()));
    s.put("caught_up_us", st.caught_up_from_drop.to_json_us());
    s.put(
        "caught_up_from_reconnect_us",
        st.caught_up_from_reconnect.to_json_us(),
    );
    s.put(
        "reconnect_handshake_us",
        st.reconnect_handshake.to_json_us(),
    );
    s.put("subscribe_reply_us", st.reply_latency.to_json_us());
    s.put("subscribers_complete", json!(t.complete));
    s.put("tail_incomplete", json!(c.tail_incomplete));
    s.put("tail_missing", json!(c.tail_missing));
    s.put("lost", json!(t.lost));
    s.put("frames_received", json!(t.frames));
    s.put("fragments", json!(t.fragments_received));
    s.put("latency_us", t.latency.to_json_us());
    s.put("drain_timed_out", json!(t.drain_timed_out));
    s.put(
        "loadgen_storm_cpu_s",
        json!(t.phase_cpu_s + phase.parent_cpu_s),
    );
    s.put("publisher_cpu_s", json!(phase.parent_cpu_s));
    s.put("loadgen_cpu_bound", json!(bound));
    s.put("storm_phase_wall_s", json!(phase.wall_s));
    s.put("server_storm_cpu_s", json!(server_phase_cpu));
}
