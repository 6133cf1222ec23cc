//! `loadgen echo`: every connection keeps M messages in flight to an echo
//! endpoint (a new one leaves as each echo returns) until the end of the
//! phase, then waits for the last echoes.
//!
//! Messages carry the fanout payload header (`fanout::push_message`):
//! a per-connection sequence number and the send time, so each echo gives
//! one round-trip sample, and a [`SeqTracker`] per connection counts lost,
//! reordered and duplicated echoes.

use crate::cli::EchoPlan;
use crate::client::{Rng, Sink};
use crate::clock::{Anchor, mono_ns};
use crate::coord::Link;
use crate::fanout::{Arrival, Arrivals, SeqTracker, push_message};
use crate::fleet::{Fleet, PROGRESS_EVERY};
use crate::hist::Hist;
use crate::wire::ShardReport;
use corecast::proto::OpCode;
use std::time::{Duration, Instant};

/// Longest event-loop wait in the phase.
const TURN: Duration = Duration::from_millis(20);

/// Per-connection state, indexed by local token.
#[derive(Debug, Clone, Default)]
struct Slot {
    live: bool,
    /// Next sequence number to send.
    next: u64,
    in_flight: usize,
    tracker: SeqTracker,
}

/// The echoes' side: a [`Sink`] fed by the fleet.
pub struct Echoes {
    anchor: Anchor,
    slots: Vec<Slot>,
    /// Connections that got an echo this turn and may send again.
    pub wake: Vec<usize>,
    pub arrivals: Arrivals,
    pub latency: Hist,
}

impl Echoes {
    pub fn new(live: Vec<bool>, anchor: Anchor) -> Self {
        Self {
            anchor,
            slots: live
                .into_iter()
                .map(|live| Slot {
                    live,
                    ..Default::default()
                })
                .collect(),
            wake: Vec::new(),
            arrivals: Arrivals::default(),
            latency: Hist::default(),
        }
    }

    /// Messages sent and not echoed yet, over every connection.
    pub fn in_flight(&self) -> usize {
        self.slots.iter().map(|s| s.in_flight).sum()
    }

    /// Totals into `r`.
    pub fn report(&self, r: &mut ShardReport) {
        self.arrivals.report(r, &self.anchor);
        r.latency = self.latency.to_wire();
        for s in self.slots.iter().filter(|s| s.live) {
            let lost = s.tracker.lost(s.next);
            r.tracked += 1;
            r.sent += s.next;
            r.expected += s.next;
            r.lost += lost;
            r.out_of_order += s.tracker.out_of_order;
            r.duplicates += s.tracker.duplicates;
            r.with_loss += u64::from(lost > 0);
            r.with_reorder += u64::from(s.tracker.out_of_order > 0);
        }
    }
}

impl Sink for Echoes {
    fn message(&mut self, conn: usize, opcode: OpCode, payload: &[u8], at: Instant) {
        let Some(slot) = self.slots.get_mut(conn).filter(|s| s.live) else {
            return;
        };
        let Some((seq, sent_ns)) = self.arrivals.record(opcode, payload, at) else {
            return;
        };
        if slot.tracker.record(seq) == Arrival::Duplicate {
            return;
        }
        slot.in_flight = slot.in_flight.saturating_sub(1);
        self.wake.push(conn);
        self.latency
            .record_ns(self.anchor.ns(at).saturating_sub(sent_ns));
    }
}

/// Tops connection `t` up to `window` messages in flight and writes them.
fn top_up(fleet: &mut Fleet, e: &mut Echoes, t: usize, plan: &EchoPlan, rng: &mut Rng) {
    let slot = &mut e.slots[t];
    let Some(conn) = fleet.conn_mut(t) else {
        slot.live = slot.live && slot.next > 0;
        return;
    };
    while slot.in_flight < plan.window {
        push_message(conn.outbox(), slot.next, mono_ns(), plan.size, rng.mask());
        slot.next += 1;
        slot.in_flight += 1;
    }
    // A write error ends the connection on its next event.
    let _ = conn.flush();
}

/// The measured phase of one shard: send until `end`, then wait for the
/// outstanding echoes up to the drain timeout.
pub fn phase(
    fleet: &mut Fleet,
    link: &mut dyn Link,
    plan: &EchoPlan,
    end: Instant,
    anchor: &Anchor,
    report: &mut ShardReport,
) -> Result<(), String> {
    let n = report.requested;
    let live: Vec<bool> = (0..n).map(|t| fleet.is_live(t)).collect();
    let mut e = Echoes::new(live, *anchor);
    let mut rng = Rng::from_entropy();
    for t in 0..n {
        if e.slots[t].live {
            top_up(fleet, &mut e, t, plan, &mut rng);
        }
    }
    let drain_until = end + plan.drain_timeout;
    let mut next_progress = Instant::now();
    let timed_out = loop {
        let now = Instant::now();
        let sending = now < end;
        if !sending && e.in_flight() == 0 {
            break false;
        }
        if now >= drain_until {
            break true;
        }
        if now >= next_progress {
            next_progress = now + PROGRESS_EVERY;
            // A parent that went away ends the phase early.
            link.try_recv()?;
            link.send(&crate::shard::progress(fleet, e.arrivals.frames));
        }
        let wait = if sending { TURN.min(end - now) } else { TURN };
        fleet
            .serve(wait, &mut e)
            .map_err(|err| format!("event loop failed during echo: {err}"))?;
        let woken = std::mem::take(&mut e.wake);
        for t in woken {
            if sending {
                top_up(fleet, &mut e, t, plan, &mut rng);
            }
        }
        // Connections that ended stop counting as in flight.
        for t in 0..n {
            if e.slots[t].in_flight > 0 && !fleet.is_live(t) {
                e.slots[t].in_flight = 0;
            }
        }
    };
    report.drain_timed_out = timed_out;
    e.report(report);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::encode_payload_header;

    #[test]
    fn echoes_count_rtt_loss_and_order() {
        let anchor = Anchor::now();
        let base = anchor.ns(Instant::now());
        let mut e = Echoes::new(vec![true, true, false], anchor);
        e.slots[0].next = 3;
        e.slots[0].in_flight = 3;
        e.slots[1].next = 2;
        e.slots[1].in_flight = 2;
        let msg = |seq: u64| {
            let mut p = encode_payload_header(seq, base).to_vec();
            p.resize(32, 0);
            p
        };
        let at = anchor.instant(base + 40_000);
        e.message(0, OpCode::Binary, &msg(0), at);
        e.message(0, OpCode::Binary, &msg(2), at); // 1 is late or lost
        e.message(1, OpCode::Binary, &msg(0), at);
        e.message(1, OpCode::Binary, &msg(0), at); // duplicate
        e.message(2, OpCode::Binary, &msg(0), at); // not live: ignored
        assert_eq!(e.arrivals.frames, 4);
        assert_eq!(e.wake, [0, 0, 1]);
        assert_eq!(e.in_flight(), 2);
        assert_eq!(e.latency.len(), 3);
        assert_eq!(e.latency.quantile_ns(0.5).unwrap() / 1000, 40);
        let mut r = ShardReport::default();
        e.report(&mut r);
        assert_eq!((r.sent, r.frames, r.lost, r.duplicates), (5, 4, 2, 1));
        assert_eq!((r.tracked, r.with_loss), (2, 2));
        e.message(0, OpCode::Binary, &msg(1), at);
        let mut r = ShardReport::default();
        e.report(&mut r);
        assert_eq!((r.lost, r.out_of_order, r.with_reorder), (1, 1, 1));
    }
}
