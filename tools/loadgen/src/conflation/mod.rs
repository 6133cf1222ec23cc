//! `loadgen conflation`: conflation under overload, the subscribers' side.
//! The publishers (in the parent: `publish`) send R messages per second to
//! each topic for `--duration`; every shard's subscribers hold every topic
//! of the URL (`?topics=a,b`, optionally `&max_rate=N`, with an envelope:
//! `corecast.v1` or `corecast.v1.binary`) and follow each topic's numbers
//! with storm's rules (`storm::track`): a number skipped is conflation when
//! the `conflated` marker just before its publication accounts for it, a
//! gap otherwise.
//!
//! A share of the subscribers (`--slow-fraction`, spread evenly as storm's
//! drops are) read slowly while publishing goes on: at most
//! `--slow-read-bytes-per-s` (`fleet::Fleet::pace`: an allowance renewed
//! every 50 ms), so once their kernel buffers are full (the client's
//! receive buffer, the server's send buffer: up to 4 MiB on loopback) the
//! server's queue for them grows and its `--slow-consumer` policy acts. When publishing is
//! over, every subscriber's distance to each topic's last publication is
//! taken, the slow ones read at full speed again, and the shard drains
//! until every open subscriber has every last publication or
//! `--drain-timeout`.
//!
//! Here: the phase of one shard ([`phase`]); `subscribers` is the
//! bookkeeping (staleness, markers, continuity), `report` the figures and
//! their merge.

pub mod report;
mod subscribers;

use crate::cli::ConflationPlan;
use crate::clock::{Anchor, mono_ns};
use crate::coord::Link;
use crate::fleet::{Fleet, PROGRESS_EVERY};
use crate::wire::{ShardReport, ToShard};
use std::time::{Duration, Instant};
use subscribers::Subscribers;

/// Longest event-loop wait in the phase.
const TURN: Duration = Duration::from_millis(20);
/// How often, once publishing is over, the shard checks whether every
/// subscriber has everything.
const SETTLE_CHECK_EVERY: Duration = Duration::from_millis(50);

/// The measured phase of one shard of conflation subscribers, from its
/// `Ready`: receive and check (before `Go` too), pace the slow subscribers
/// from `Go`, and at `Published` take how far behind everyone is, stop
/// pacing and drain until every open subscriber has every topic's last
/// publication, or the drain deadline, or the limit `Go` gave. Returns
/// this thread's CPU time at `Go`.
pub fn phase(
    fleet: &mut Fleet,
    link: &mut dyn Link,
    plan: &ConflationPlan,
    first: usize,
    anchor: &Anchor,
    report: &mut ShardReport,
) -> Result<f64, String> {
    let n = report.requested;
    let live: Vec<bool> = (0..n).map(|t| fleet.is_open(t)).collect();
    let slow: Vec<bool> = (0..n)
        .map(|i| crate::storm::selected(first + i, plan.slow_fraction))
        .collect();
    let mut subs = Subscribers::new(&live, &slow, plan.topics.clone(), *anchor);
    // Until `Go`, the parent's silence limit bounds the wait.
    let mut limit = Instant::now() + crate::shard::PARENT_SILENCE_LIMIT;
    let mut cpu0 = crate::sys::thread_cpu_s();
    let mut published: Vec<u64> = Vec::new();
    let mut drain_until: Option<Instant> = None;
    let mut next_check = Instant::now();
    let mut next_progress = Instant::now();
    let timed_out = loop {
        let now = Instant::now();
        match link.try_recv()? {
            Some(ToShard::Go { end_ns }) => {
                limit = anchor.instant(end_ns);
                cpu0 = crate::sys::thread_cpu_s();
                report.phase_start_ns = mono_ns();
                let tokens = subs.slow_tokens();
                if !tokens.is_empty() {
                    fleet.pace(tokens, plan.slow_read_bytes_per_s);
                }
            }
            Some(ToShard::Published {
                per_topic,
                drain_until_ns,
            }) => {
                subs.publishing_over(|t| fleet.is_live(t), &per_topic);
                fleet.unpace();
                published = per_topic;
                drain_until = Some(anchor.instant(drain_until_ns));
            }
            Some(other) => return Err(format!("unexpected {other:?} during conflation")),
            None => {}
        }
        if let Some(until) = drain_until {
            if now >= next_check {
                next_check = now + SETTLE_CHECK_EVERY;
                if subs.settled(|t| fleet.is_live(t), &published) {
                    break false;
                }
            }
            if now >= until {
                break true;
            }
        }
        if now >= limit {
            break true;
        }
        if now >= next_progress {
            next_progress = now + PROGRESS_EVERY;
            link.send(&crate::shard::progress(fleet, subs.frames));
        }
        fleet
            .serve(TURN, &mut subs)
            .map_err(|e| format!("event loop failed during conflation: {e}"))?;
    };
    report.drain_timed_out = timed_out;
    fleet.unpace();
    subs.finish(|t| fleet.is_live(t), &published, report);
    Ok(cpu0)
}
