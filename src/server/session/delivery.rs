//! Published frames into a subscriber's queue, with the slow-consumer
//! policy, and leaving every topic when the connection goes.

use super::{Phase, Push, Role, Session};
use crate::proto::CloseCode;
use crate::pubsub::envelope::Form;
use crate::pubsub::shard::Shard;
use crate::server::config::{Config, SlowConsumerPolicy};
use crate::server::stats::WorkerStats;
use bytes::Bytes;

impl Session {
    /// Queues a published frame for this subscriber, applying the
    /// slow-consumer `policy` (its topic's) at the queue bound, or under
    /// budget `pressure` at a backlog of that many bytes (the caller
    /// judges: `delivery::Budget::pressure`). A queue always
    /// takes one frame when empty, so a message bigger than the bound still
    /// goes out.
    pub fn push_published(
        &mut self,
        frame: &Bytes,
        policy: SlowConsumerPolicy,
        cfg: &Config,
        pressure: Option<usize>,
    ) -> Push {
        let Phase::Ws { ws, .. } = &mut self.phase else {
            return Push::Ignored;
        };
        if !ws.can_send() {
            return Push::Closing;
        }
        if !self.out.is_empty()
            && (pressure.is_some_and(|from| self.out.len() >= from)
                || self.out.len() + self.out.slot_bytes() + frame.len() > cfg.max_outbound_bytes)
        {
            return match policy {
                SlowConsumerPolicy::DropNewest => Push::Dropped,
                SlowConsumerPolicy::Conflate | SlowConsumerPolicy::Always => Push::Conflate,
                SlowConsumerPolicy::Disconnect => Push::SlowConsumer {
                    discarded: self.fail_slow(),
                },
            };
        }
        self.out.push_frame(frame);
        Push::Queued
    }

    /// Whether publications can still be queued to it: an open WebSocket
    /// that has not begun to close.
    pub fn takes_publications(&self) -> bool {
        matches!(&self.phase, Phase::Ws { ws, .. } if ws.can_send())
    }

    /// Whether it is a WebSocket publisher that asked for acknowledgements
    /// (`corecast.v1`).
    pub fn wants_acks(&self) -> bool {
        matches!(&self.phase, Phase::Ws { role: Role::Publisher(p), .. } if p.acks)
    }

    /// Fails a subscriber as a slow consumer (its conflation table is
    /// full): the frames queued but not started are discarded, a 1008 close
    /// queued. Returns the bytes discarded.
    pub fn fail_slow(&mut self) -> usize {
        let Phase::Ws { ws, .. } = &mut self.phase else {
            return 0;
        };
        let discarded = self.out.truncate_to_front();
        if ws.can_send() {
            ws.close(CloseCode::POLICY_VIOLATION, "slow consumer", &mut self.out);
        }
        discarded
    }

    /// A subscriber's subscriptions (none for other connections).
    pub fn subscriptions(&self) -> &[crate::pubsub::shard::Subscription] {
        match &self.phase {
            Phase::Ws {
                role: Role::Subscriber { subs },
                ..
            } => subs.as_slice(),
            _ => &[],
        }
    }

    /// Queues frames that waited in the subscriber's conflation table (a
    /// marker and a publication), if it is an open WebSocket that may still
    /// send; `false` otherwise.
    pub fn push_waiting(&mut self, frames: &[&Bytes]) -> bool {
        let Phase::Ws { ws, .. } = &mut self.phase else {
            return false;
        };
        if !ws.can_send() {
            return false;
        }
        for f in frames {
            self.out.push_frame(f);
        }
        true
    }

    /// Queues an acknowledgement of a published message (a publisher that
    /// negotiated `corecast.v1`); `false` if nothing could be queued (not
    /// an open WebSocket, or closing).
    pub fn push_ack(&mut self, epoch: u64, seq: u64) -> bool {
        let Phase::Ws { ws, .. } = &mut self.phase else {
            return false;
        };
        if !ws.can_send() {
            return false;
        }
        self.out.push(ack_frame(ws.deflate(), epoch, seq));
        true
    }

    /// How this connection receives publications (raw unless it is a
    /// subscriber that negotiated an envelope).
    pub fn form(&self) -> Form {
        match &self.phase {
            Phase::Ws {
                role: Role::Subscriber { subs },
                ..
            } => subs.form(),
            _ => Form::Raw,
        }
    }

    /// Leaves every topic and lets go of the publisher's topic. Called once
    /// the connection is closing or gone; idempotent.
    pub fn detach(&mut self, shard: &mut Shard, stats: &WorkerStats) {
        if let Phase::Ws { role, .. } = &mut self.phase {
            match role {
                Role::Subscriber { subs, .. } => {
                    stats.unsubscribed(subs.len());
                    let patterns = subs.as_slice().iter().filter(|s| s.is_pattern()).count();
                    stats.pattern_unsubscribed(patterns);
                    for sub in subs.take() {
                        shard.unsubscribe(sub);
                    }
                }
                Role::Publisher(p) => {
                    if let Some(t) = p.topic.take() {
                        shard.directory().release(t);
                    }
                }
                Role::Echo => {}
            }
        }
    }
}

/// The frame acknowledging number `seq` of `epoch` to a publisher
/// (compressed when agreed and it gains).
pub(super) fn ack_frame(
    deflate: Option<crate::proto::deflate::Agreed>,
    epoch: u64,
    seq: u64,
) -> Bytes {
    let text = crate::pubsub::envelope::ack(epoch, seq);
    Bytes::from(crate::proto::deflate::message_frame(
        deflate,
        crate::proto::MessageKind::Text.opcode(),
        text.as_bytes(),
    ))
}
