//! A subscriber's control messages (`{"op":"subscribe",...}`) applied to
//! its subscriptions; the reply to send back.

use super::Ctx;
use crate::pubsub::control::{self, Op};
use crate::pubsub::shard::SubList;

/// Applies a subscriber's control message; returns the JSON reply.
pub(super) fn control_message(msg: &mut [u8], subs: &mut SubList, ctx: &mut Ctx<'_>) -> String {
    let cfg = &ctx.shared.config;
    let limits = control::Limits {
        max_topic_len: cfg.max_topic_len,
        max_topics: cfg.max_topics_per_conn,
    };
    let c = match control::parse(msg, limits) {
        Ok(c) => c,
        Err(e) => {
            ctx.stats.control_error();
            return control::error(&e.to_string());
        }
    };
    // Linear in the names plus the topics held: each name costs hash
    // lookups, never a search of `subs` (held at most max_topics_per_conn).
    match c.op {
        Op::Subscribe => {
            let held: std::collections::HashSet<u32> =
                subs.as_slice().iter().map(|s| s.topic()).collect();
            let new: Vec<&String> = c
                .topics
                .iter()
                .filter(|n| ctx.shard.topic_id(n).is_none_or(|id| !held.contains(&id)))
                .collect();
            if subs.len() + new.len() > cfg.max_topics_per_conn {
                ctx.stats.control_error();
                let max = cfg.max_topics_per_conn;
                return control::error(&control::ControlError::TooManyTopics { max }.to_string());
            }
            for name in new {
                subs.push(ctx.shard.subscribe(name, ctx.me));
                ctx.stats.subscribed(1);
            }
        }
        Op::Unsubscribe => {
            let gone: std::collections::HashSet<u32> = c
                .topics
                .iter()
                .filter_map(|n| ctx.shard.topic_id(n))
                .collect();
            let shard = &mut *ctx.shard;
            let mut dropped = 0;
            subs.retain(|s| {
                let keep = !gone.contains(&s.topic());
                if !keep {
                    shard.unsubscribe(*s);
                    dropped += 1;
                }
                keep
            });
            ctx.stats.unsubscribed(dropped);
        }
    }
    control::reply(c.op, &c.topics)
}
