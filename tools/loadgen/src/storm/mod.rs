//! `loadgen storm`: a reconnect storm with recovery, the subscribers' side.
//! The publishers (in the parent: `publish`) send R messages per second to
//! each topic for the whole run; every shard's subscribers hold every topic
//! of the URL (`?topics=a,b`, with an envelope: `corecast.v1` or
//! `corecast.v1.binary`) and follow each topic's numbers.
//!
//! At the drop time the parent gives (`ToShard::Storm`), the selected
//! subscribers' connections are severed (RST, or FIN with `--drop-mode
//! close`); each reconnects after a uniform random delay in `[0, J]` to
//! the same server, to the URL without its `topics=` (a topic held already
//! is not recovered), and sends `{"op":"subscribe","topics":[…],
//! "since":{…}}` with the last epoch and number it has of each topic. Its
//! reply's recoveries are checked against those positions, and then every
//! number that follows: recovered `from ..= to`, then live, with no gap
//! and no duplicate (`track`).
//!
//! A `subscribe` answered "recovery busy" (the server's
//! `--max-recovery-rate`) is sent again after the `retry_ms` it gives,
//! plus as much jitter, and counted (`busy_retries`).
//!
//! "Time to caught up" is, per reconnected subscriber, from the drop until
//! it has received a live publication (number above the recovery's `to`)
//! on every recovered topic; so it includes the jitter and up to one
//! publishing interval (1/R) of waiting for the next publication. It is
//! also given from the start of the reconnect (without the jitter). A
//! subscriber whose recovery reached the last publication gets no live
//! one: it counts as caught up when its replay was over, if it then holds
//! every topic's last publication.
//!
//! Here: the phase of one shard ([`phase`]). `request` holds the topics,
//! the reconnect target and the `subscribe`; `envelope` reads frames;
//! `track` is one topic's continuity; `subscribers` every subscriber's
//! state; `report` the figures and their merge.

pub mod envelope;
pub mod report;
pub mod request;
mod subscribers;
pub mod track;

use crate::cli::{ConnectPlan, DropMode, StormPlan};
use crate::client::{RequestTemplate, Rng};
use crate::clock::{Anchor, mono_ns};
use crate::coord::Link;
use crate::fleet::{Fleet, PROGRESS_EVERY};
use crate::wire::{ShardReport, ToShard};
use corecast::proto::OpCode;
use corecast::proto::frame::client_frame;
use std::time::{Duration, Instant};
use subscribers::Subscribers;

/// Longest event-loop wait in the phase (reconnects due sooner shorten it).
const TURN: Duration = Duration::from_millis(20);
/// How often, once publishing is over, the shard checks whether every
/// subscriber has everything.
const SETTLE_CHECK_EVERY: Duration = Duration::from_millis(50);

/// Is subscriber `g` (a global connection index) among the `fraction`
/// that drop? Exactly `floor(n * fraction)` of the first n are, evenly
/// spread, so every shard drops its share.
pub fn selected(g: usize, fraction: f64) -> bool {
    ((g + 1) as f64 * fraction).floor() > (g as f64 * fraction).floor()
}

/// The measured phase of one shard of storm subscribers, from its
/// `Ready`: receive and check (before `Storm` too: snapshots may come),
/// drop at the time `Storm` gives, reconnect each dropped subscriber after
/// its delay and resubscribe it with `since`, then receive until the
/// parent says what was published and every subscriber has it, or the
/// drain deadline, or the limit `Storm` gave. Returns this thread's CPU
/// time at `Storm`.
pub fn phase(
    fleet: &mut Fleet,
    link: &mut dyn Link,
    plan: &StormPlan,
    connect: &ConnectPlan,
    first: usize,
    anchor: &Anchor,
    report: &mut ShardReport,
) -> Result<f64, String> {
    let n = report.requested;
    let live: Vec<bool> = (0..n).map(|t| fleet.is_live(t)).collect();
    let mut subs = Subscribers::new(live, plan.topics.clone(), *anchor);
    let templates: Vec<RequestTemplate> = connect
        .targets
        .iter()
        .map(|t| {
            let mut url = t.url.clone();
            url.target = request::without_topics(&url.target);
            RequestTemplate::offering(&url, connect.subprotocol.as_deref(), false)
        })
        .collect();
    let reset = plan.drop_mode == DropMode::Reset;
    let jitter_us = plan.jitter.as_micros() as u64;
    let mut rng = Rng::from_entropy();
    fleet.watch_handshakes();
    // Until `Storm`, the parent's silence limit bounds the wait.
    let mut limit = Instant::now() + crate::shard::PARENT_SILENCE_LIMIT;
    let mut cpu0 = crate::sys::thread_cpu_s();
    let mut drop_at: Option<Instant> = None;
    let mut failures_before = None;
    // Reconnects, by due time; `next` is the first not started.
    let mut due: Vec<(Instant, usize)> = Vec::new();
    let mut next = 0;
    let mut published: Vec<u64> = Vec::new();
    let mut drain_until: Option<Instant> = None;
    let mut next_check = Instant::now();
    let mut next_progress = Instant::now();
    let timed_out = loop {
        let now = Instant::now();
        match link.try_recv()? {
            Some(ToShard::Storm { drop_ns, end_ns }) => {
                limit = anchor.instant(end_ns);
                drop_at = Some(anchor.instant(drop_ns));
                cpu0 = crate::sys::thread_cpu_s();
                report.phase_start_ns = mono_ns();
            }
            Some(ToShard::Published {
                per_topic,
                drain_until_ns,
            }) => {
                published = per_topic;
                drain_until = Some(anchor.instant(drain_until_ns));
            }
            Some(other) => return Err(format!("unexpected {other:?} during the storm")),
            None => {}
        }
        if failures_before.is_none() && drop_at.is_some_and(|d| now >= d) {
            // Reconnect failures are the storm's, not the ramp-up's.
            failures_before = Some(fleet.failures.clone());
            subs.drop_starts(now);
            for i in (0..n).filter(|&i| selected(first + i, plan.drop_fraction)) {
                let Some(token) = subs.live_token(i) else {
                    continue;
                };
                if fleet.sever(token, reset) {
                    subs.dropped(i);
                    let delay = Duration::from_micros(rng.next_u64() % (jitter_us + 1));
                    due.push((now + delay, i));
                } else {
                    subs.not_open_at_drop();
                }
            }
            due.sort_unstable();
        }
        while let Some(&(_, i)) = due.get(next).filter(|(at, _)| *at <= now) {
            next += 1;
            let g = first + i;
            match fleet.reopen(g, &templates[g % templates.len()]) {
                Ok(Some(token)) => subs.reopening(i, token, now),
                Ok(None) => subs.reopen_failed(i),
                Err(e) => return Err(format!("event loop failed reconnecting: {e}")),
            }
        }
        for (token, opened) in fleet.take_notices() {
            if !opened {
                subs.handshake_failed(token);
                continue;
            }
            let mask = rng.mask();
            match (fleet.conn_mut(token), subs.opened(token, Instant::now())) {
                (Some(conn), Some(msg)) => {
                    conn.outbox().extend_from_slice(&client_frame(
                        true,
                        OpCode::Text,
                        msg.as_bytes(),
                        mask,
                    ));
                    // A write error ends the connection on its next event.
                    let _ = conn.flush();
                }
                (None, Some(_)) => subs.ended_before_reply(token),
                (_, None) => {}
            }
        }
        for (token, msg) in subs.due_retries(now) {
            let mask = rng.mask();
            if let Some(conn) = fleet.conn_mut(token) {
                conn.outbox().extend_from_slice(&client_frame(
                    true,
                    OpCode::Text,
                    msg.as_bytes(),
                    mask,
                ));
                let _ = conn.flush();
            }
        }
        fleet.expire_handshakes(now);
        if let Some(until) = drain_until {
            if now >= next_check {
                next_check = now + SETTLE_CHECK_EVERY;
                if next >= due.len() && subs.settled(|t| fleet.is_live(t), &published) {
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
        let mut wait = TURN;
        if let Some(d) = drop_at.filter(|_| failures_before.is_none()) {
            wait = wait.min(d.saturating_duration_since(now));
        }
        if let Some(&(at, _)) = due.get(next) {
            wait = wait.min(at.saturating_duration_since(now));
        }
        if let Some(at) = subs.next_retry() {
            wait = wait.min(at.saturating_duration_since(now));
        }
        fleet
            .serve(wait, &mut subs)
            .map_err(|e| format!("event loop failed during the storm: {e}"))?;
    };
    report.drain_timed_out = timed_out;
    if let Some(before) = failures_before {
        // The reconnects' failures by cause; the ramp-up's stay in `failures`.
        let after = std::mem::replace(&mut fleet.failures, before.clone());
        for (k, v) in after {
            let d = v - before.get(&k).copied().unwrap_or(0);
            if d > 0 {
                *subs
                    .counts
                    .reconnect_failures
                    .entry(format!("handshake:{k}"))
                    .or_default() += d;
            }
        }
    }
    subs.finish(|t| fleet.is_live(t), &published, report);
    report.storm.reconnect_handshake = fleet.take_latency().to_wire();
    Ok(cpu0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dropped_share_is_exact_and_spread() {
        let count = |n: usize, f: f64| (0..n).filter(|&g| selected(g, f)).count();
        assert_eq!(count(10_000, 1.0), 10_000);
        assert_eq!(count(10_000, 0.5), 5_000);
        assert_eq!(count(10_000, 0.1), 1_000);
        assert_eq!(count(3, 0.3), 0);
        // Spread: every run of 10 has one of a tenth.
        assert!(
            (0..1000).all(|k| (10 * k..10 * k + 10).filter(|&g| selected(g, 0.1)).count() == 1)
        );
    }
}
