//! One shard of a run: opens its share of the connections on one event
//! loop, then follows the parent through the barriers (see `wire`):
//! ramp-up, `Ready`, wait for `Go`, the scenario's measured phase, `Done`,
//! wait for `Close`, close, `Finished`.
//!
//! Every wait here is bounded: a shard whose parent goes away (its stdin
//! closes) stops at once, and one whose parent says nothing gives up after
//! [`PARENT_SILENCE_LIMIT`].

use crate::cli::{Plan, Work};
use crate::client::RequestTemplate;
use crate::clock::{Anchor, mono_ns};
use crate::coord::{ChannelLink, Link};
use crate::fleet::{Fleet, FleetConfig, PROGRESS_EVERY, Targets};
use crate::topics::TopicMap;
use crate::wire::{Progress, ShardReport, ToParent, ToShard};
use crate::{conflation, echo, fanout, storm, sys};
use std::time::{Duration, Instant};

/// How long a shard waits for the parent's next step (`Go` after the
/// slowest shard's ramp-up, `Close` after the slowest shard's drain).
pub const PARENT_SILENCE_LIMIT: Duration = Duration::from_secs(300);
/// How long the parent may take to send the plan.
const PLAN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the final close handshakes may take.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait in one event-loop turn while waiting for the parent.
const TURN: Duration = Duration::from_millis(20);

/// Runs a shard to its end; errors go to the parent as `Failed`.
pub fn main(link: &mut ChannelLink) {
    let result = link.recv_blocking(PLAN_TIMEOUT).and_then(|m| match m {
        ToShard::Start { shard, plan } => run(shard, &plan, link),
        other => Err(format!("expected the plan first, got {other:?}")),
    });
    if let Err(error) = result {
        link.send(&ToParent::Failed { error });
    }
}

pub fn progress(fleet: &Fleet, received: u64) -> ToParent {
    ToParent::Progress(Progress {
        started: fleet.open() + fleet.in_flight() + fleet.failed() as usize,
        open: fleet.open(),
        in_flight: fleet.in_flight(),
        failed: fleet.failed(),
        received,
    })
}

/// Serves the connections until the parent's next message, which is returned.
pub fn wait_for_parent(fleet: &mut Fleet, link: &mut dyn Link) -> Result<ToShard, String> {
    let limit = Instant::now() + PARENT_SILENCE_LIMIT;
    loop {
        if let Some(m) = link.try_recv()? {
            return Ok(m);
        }
        if Instant::now() >= limit {
            return Err("the parent said nothing for too long".into());
        }
        fleet
            .hold_until(Instant::now() + TURN)
            .map_err(|e| format!("event loop failed: {e}"))?;
    }
}

fn run(shard: usize, plan: &Plan, link: &mut dyn Link) -> Result<(), String> {
    let anchor = Anchor::now();
    let c = &plan.connect;
    crate::client::tls::configure(&c.tls)?;
    crate::client::set_offered(c.subprotocol.as_deref());
    crate::fanout::expect_binary_envelope(
        c.subprotocol.as_deref() == Some(corecast::pubsub::envelope::BINARY_PROTOCOL),
    );
    let (first, count) = c.share(shard);
    let topics = match &plan.work {
        Work::Fanout(f) => Some(TopicMap::new(c.connections, f.topics, f.topic_dist)),
        _ => None,
    };
    let targets = Targets {
        dsts: c
            .targets
            .iter()
            .map(|t| {
                let offer = c.subprotocol.as_deref();
                (
                    t.dst,
                    RequestTemplate::offering(&t.url, offer, c.permessage_deflate),
                )
            })
            .collect(),
        sources: c.sources.clone(),
        topics,
    };
    let mut fleet = Fleet::new(FleetConfig {
        targets,
        first,
        connections: count,
        in_flight: c.in_flight_per_shard(),
        handshake_timeout: c.handshake_timeout,
    })
    .map_err(|e| format!("cannot create the poller: {e}"))?;
    let mut report = ShardReport {
        shard,
        pid: std::process::id(),
        requested: count,
        ..Default::default()
    };

    let ramp = fleet
        .ramp_up(Instant::now() + c.connect_timeout, &mut |f| {
            link.send(&progress(f, 0))
        })
        .map_err(|e| format!("event loop failed during ramp-up: {e}"))?;
    report.up = ramp.latency.len() as usize;
    report.failures = fleet.failures.clone();
    report.ramp_start_ns = anchor.ns(ramp.started);
    report.ramp_end_ns = anchor.ns(ramp.finished);
    report.connect_latency = ramp.latency.to_wire();
    link.send(&progress(&fleet, 0));
    link.send(&ToParent::Ready(Box::new(report.clone())));

    let cpu0 = match &plan.work {
        // Subscribers listen from now on: the publisher starts at `Go`,
        // and a message must not arrive while nobody checks it.
        Work::Fanout(f) => fanout::subscribe_phase(
            &mut fleet,
            link,
            f,
            first,
            c.connections,
            &anchor,
            &mut report,
        )?,
        // Likewise: a snapshot may arrive before `Storm`.
        Work::Storm(s) => storm::phase(&mut fleet, link, s, c, first, &anchor, &mut report)?,
        // And here too: the subscribers are followed from `Ready`.
        Work::Conflation(p) => conflation::phase(&mut fleet, link, p, first, &anchor, &mut report)?,
        work => {
            let end = match wait_for_parent(&mut fleet, link)? {
                ToShard::Go { end_ns } => anchor.instant(end_ns),
                other => return Err(format!("expected go, got {other:?}")),
            };
            let cpu0 = sys::thread_cpu_s();
            report.phase_start_ns = mono_ns();
            match work {
                Work::Hold { .. } => hold(&mut fleet, link, end)?,
                Work::Echo(e) => echo::phase(&mut fleet, link, e, end, &anchor, &mut report)?,
                _ => {}
            }
            cpu0
        }
    };
    report.phase_end_ns = mono_ns();
    report.phase_cpu_s = sys::thread_cpu_s() - cpu0;
    report.open_at_end = fleet.open();
    report.ended = fleet.ended.clone();
    // Connections that failed late (e.g. fanout's) are in the map too.
    report.failures = fleet.failures.clone();
    let k = &fleet.counters;
    report.pings_answered = k.pings_answered;
    report.pongs_received = k.pongs_received;
    report.messages_received = k.messages_received;
    report.fragments_received = k.fragments_received;
    report.deflate_agreed = k.deflate_agreed;
    report.compressed_received = k.compressed_received;
    link.send(&ToParent::Done(Box::new(report.clone())));

    match wait_for_parent(&mut fleet, link)? {
        ToShard::Close => {}
        other => return Err(format!("expected close, got {other:?}")),
    }
    report.close = fleet
        .close_all(Instant::now() + CLOSE_TIMEOUT)
        .map_err(|e| format!("event loop failed while closing: {e}"))?;
    report.cpu_s = sys::thread_cpu_s();
    report.max_rss = sys::SelfUsage::now().max_rss_bytes;
    link.send(&ToParent::Finished(Box::new(report)));
    Ok(())
}

/// Serves idle connections until `end`, reporting progress.
fn hold(fleet: &mut Fleet, link: &mut dyn Link, end: Instant) -> Result<(), String> {
    loop {
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        // A parent that went away ends the hold early.
        link.try_recv()?;
        link.send(&progress(fleet, 0));
        fleet
            .hold_until((now + PROGRESS_EVERY).min(end))
            .map_err(|e| format!("event loop failed during the hold: {e}"))?;
    }
}
