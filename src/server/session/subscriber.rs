//! A subscriber's control messages (`{"op":"subscribe",...}`) applied to
//! its subscriptions; the reply to send back.

use super::Ctx;
use crate::pubsub::control::{self, Op};
use crate::pubsub::envelope::{Form, snapshot_marker};
use crate::pubsub::history::{Recovery, Since, Start};
use crate::pubsub::pattern;
use crate::pubsub::shard::{Replay, SubList};
use crate::server::auth::Refusal;
use bytes::Bytes;
use std::collections::HashSet;

/// How a subscription without `since` starts: with the topic's last
/// value for an enveloped subscriber (unless `--no-last-value`), live
/// otherwise (a raw subscriber could not tell a snapshot from news).
pub(super) fn fresh_start(form: Form) -> Start {
    // Whether the topic has last values (`--no-last-value`, its
    // namespace, a history at all) is the topic's to say.
    if form.base() != Form::Raw {
        Start::LastValue
    } else {
        Start::Live
    }
}

/// The frames of `r`'s messages in `form`, as many of the newest as fit
/// in `cap_left` bytes of queue (envelopes counted as built); the older
/// ones are dropped from `r`, which then says so (`capped`, `from`).
/// Takes what it returns off `cap_left`.
pub(super) fn fit(
    form: Form,
    name: &str,
    r: &mut Recovery,
    cap_left: &mut usize,
    ctx: &mut Ctx<'_>,
) -> Vec<Bytes> {
    let shard = &mut *ctx.shard;
    let id = shard.topic_id(name);
    let mut frames = Vec::new();
    let mut bytes = 0;
    for m in r.messages.iter().rev() {
        // Measured before it is built: one that does not fit is not built.
        // Measuring an envelope not built yet reads the whole payload (a
        // JSON one's escapes); its payload's length, which no form not
        // built yet is shorter than, rules most out first (a replay whose
        // room is spent would otherwise read every message it is offered).
        let len = match m.frame_of(form) {
            Some(f) => f.len(),
            None if bytes + m.payload().1.len() > *cap_left => break,
            None => m.frame_len(form, name),
        };
        if bytes + len > *cap_left {
            break;
        }
        bytes += len;
        let mut built = false;
        let f = m.frame_for(form, name, &mut |f, _| {
            built = true;
            shard.charge_built(id, m, f)
        });
        frames.push(f.clone());
        if !built {
            // Its charges may be gone (no queue held it), and its history
            // may drop it while the queue holds it.
            shard.charge_replayed(m, form);
        }
    }
    *cap_left -= bytes;
    frames.reverse();
    let dropped = r.messages.len() - frames.len();
    if dropped > 0 {
        r.messages.drain(..dropped);
        r.first = r.messages.first().map_or(r.last + 1, |m| m.seq);
        r.gap = r.gap.or(Some(crate::pubsub::history::Gap::Capped));
    }
    frames
}

/// A topic's last value after its snapshot marker, if `r` (from
/// [`Start::LastValue`]) holds one and it fits in `cap_left`.
pub(super) fn snapshot_frames(
    form: Form,
    name: &str,
    r: &mut Recovery,
    cap_left: &mut usize,
    ctx: &mut Ctx<'_>,
) -> Vec<Bytes> {
    let mut frames = fit(form, name, r, cap_left, ctx);
    let Some(m) = r.messages.last() else {
        return Vec::new();
    };
    let Some(marker) = snapshot_marker(form, name, m.epoch, m.seq) else {
        return Vec::new();
    };
    frames.insert(0, marker);
    ctx.stats.snapshot_sent();
    frames
}

/// Subscribes to `names` (topics and patterns, none held yet), each topic
/// from its `since` position if it has one (`since[i]`, or empty for
/// none), a pattern's matching topics from theirs in `pattern_since`, the
/// others with their last values (enveloped subscribers). Returns the
/// frames to queue (snapshots, recovered messages: at most `cap_left`
/// bytes, taken off it) and the recoveries to report. The token
/// comparisons it spends checking replayed topics against patterns are
/// charged to the worker's pattern-scan budget and added to `work`.
pub(super) fn subscribe_names(
    names: &[&str],
    since: &[Option<Since>],
    pattern_since: &[(String, Since)],
    subs: &mut SubList,
    cap_left: &mut usize,
    ctx: &mut Ctx<'_>,
    work: &mut usize,
) -> (Vec<Bytes>, Vec<(String, Recovery)>) {
    let form = subs.form();
    let fresh = fresh_start(form);
    let mut recovered = Vec::new();
    let mut frames = Vec::new();
    // Topics first, then patterns. A replay (last value, recovery) is
    // left out for a topic the connection already gets otherwise: one it
    // subscribes to itself, one a pattern it holds matches (joining that
    // one's stream at another number would skip or repeat some), one an
    // earlier pattern of this message replayed.
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by_key(|&i| pattern::is_pattern(names[i]));
    let mut exact: HashSet<String> = HashSet::new();
    let mut held_patterns: Vec<String> = Vec::new();
    for s in subs.as_slice() {
        if s.is_pattern() {
            held_patterns.extend(ctx.shard.pattern_name(s.topic()).map(str::to_owned));
        } else {
            exact.extend(ctx.shard.topic_name(s.topic()).map(str::to_owned));
        }
    }
    let mut replayed: HashSet<String> = HashSet::new();
    let mut positions_used = vec![false; pattern_since.len()];
    for i in order {
        let name = names[i];
        if pattern::is_pattern(name) {
            // Token comparisons: at most one per token of the name and
            // pattern tried.
            let steps = std::cell::Cell::new(0usize);
            let covered = |t: &str| {
                if exact.contains(t) || replayed.contains(t) {
                    return true;
                }
                let mut tried = 0;
                let hit = held_patterns.iter().any(|q| {
                    tried += 1;
                    pattern::matches(q, t)
                });
                steps.set(steps.get() + tried * pattern::token_count(t));
                hit
            };
            // The positions this pattern matches, each used once.
            let mut mine: Vec<(String, Since)> = Vec::new();
            for (j, p) in pattern_since.iter().enumerate() {
                if positions_used[j] {
                    continue;
                }
                steps.set(steps.get() + pattern::token_count(&p.0));
                if pattern::matches(name, &p.0) && !covered(&p.0) {
                    positions_used[j] = true;
                    mine.push(p.clone());
                }
            }
            let replay = Replay {
                since: &mine,
                last_values: fresh == Start::LastValue,
                skip: &covered,
                max_bytes: *cap_left,
                now: ctx.now,
                held: subs.as_slice(),
            };
            let (sub, reads) = ctx.shard.subscribe_pattern(name, ctx.me, replay);
            *work += steps.get();
            ctx.shard.charge_scans(steps.get());
            subs.push(sub);
            held_patterns.push(name.to_owned());
            ctx.stats.subscribed(1);
            ctx.stats.pattern_subscribed(1);
            for (topic, mut r) in reads {
                replayed.insert(topic.to_string());
                if mine.iter().any(|(t, _)| **t == *topic) {
                    frames.extend(fit(form, &topic, &mut r, cap_left, ctx));
                    ctx.stats.recovered(r.gap.is_none(), r.messages.len());
                    recovered.push((topic.to_string(), r));
                } else {
                    frames.extend(snapshot_frames(form, &topic, &mut r, cap_left, ctx));
                }
            }
            continue;
        }
        exact.insert(name.to_owned());
        let since = since.get(i).copied().flatten();
        let through_pattern = held_patterns.iter().any(|q| pattern::matches(q, name));
        let start = match since {
            _ if through_pattern => Start::Continue,
            Some(s) => Start::Since(s),
            None => fresh,
        };
        let since = since.filter(|_| !through_pattern);
        let (sub, recovery) =
            ctx.shard
                .subscribe_since(name, ctx.me, start, *cap_left, Some(ctx.now));
        subs.push(sub);
        ctx.stats.subscribed(1);
        match recovery {
            Some(mut r) if since.is_some() => {
                frames.extend(fit(form, name, &mut r, cap_left, ctx));
                ctx.stats.recovered(r.gap.is_none(), r.messages.len());
                recovered.push((name.to_owned(), r));
            }
            Some(mut r) => {
                frames.extend(snapshot_frames(form, name, &mut r, cap_left, ctx));
            }
            None => {}
        }
    }
    // A connection holding a pattern and anything else is served once per
    // publication, whichever of its subscriptions it comes through.
    ctx.shard.mark_multi(subs.as_slice());
    (frames, recovered)
}

/// Applies a subscriber's control message; returns the JSON reply and the
/// recovered messages that follow it (a subscribe with `since`), in the
/// subscriber's form. Adds to `work` the token comparisons it spent
/// matching names to patterns (its `since` keys, a replay's topics
/// against the patterns held), which are also charged to the worker's
/// pattern-scan budget. Sets `refreshed` for a token refresh (which the
/// caller counts against the connection's control-frame allowance).
pub(super) fn control_message(
    msg: &mut [u8],
    subs: &mut SubList,
    queued: usize,
    ctx: &mut Ctx<'_>,
    work: &mut usize,
    refreshed: &mut bool,
) -> (String, Vec<Bytes>) {
    let cfg = &ctx.shared.config;
    let limits = control::Limits {
        max_topic_len: cfg.max_topic_len,
        max_topics: cfg.max_topics_per_conn,
        max_patterns: cfg.max_patterns_per_conn,
    };
    let mut parsed = 0;
    let c = control::parse_charged(msg, limits, &mut parsed);
    *work += parsed;
    ctx.shard.charge_scans(parsed);
    let c = match c {
        Ok(c) => c,
        Err(e) => {
            ctx.stats.control_error();
            return (control::error(&e.to_string()), Vec::new());
        }
    };
    // The local id of a name (a topic's, or a pattern's with its top bit).
    let id_of = |shard: &crate::pubsub::shard::Shard, n: &str| {
        if pattern::is_pattern(n) {
            shard.pattern_id(n)
        } else {
            shard.topic_id(n)
        }
    };
    // Linear in the names plus the topics held: each name costs hash
    // lookups, never a search of `subs` (held at most max_topics_per_conn).
    // With tokens on, a subscribe or a history request names only
    // topics within the token's rights (and the token is still valid),
    // or the server is open to anonymous subscribers. A refusal is a
    // reply; the connection stays.
    if matches!(c.op, Op::Subscribe | Op::History)
        && let Some(verifier) = ctx.shared.verifier()
    {
        let why = match &ctx.grant {
            Some(g) if g.exp.saturating_add(verifier.leeway_s()) < ctx.wall_s => {
                Some(Refusal::Expired)
            }
            Some(g) => c
                .topics
                .iter()
                .any(|n| !g.may_subscribe(n))
                .then_some(Refusal::Forbidden),
            None => (!super::request::anonymous_may_subscribe(&c.topics, &verifier, ctx))
                .then_some(Refusal::Missing),
        };
        if let Some(why) = why {
            ctx.stats.auth_refused(why);
            let reason = match why {
                Refusal::Forbidden => {
                    "not allowed: the token grants no subscribe right to one of these topics"
                }
                Refusal::Expired => "not allowed: the token has expired",
                _ => "not allowed: subscribing needs a token",
            };
            return (control::error(reason), Vec::new());
        }
    }
    match c.op {
        Op::Subscribe => {
            let held: std::collections::HashSet<u32> =
                subs.as_slice().iter().map(|s| s.topic()).collect();
            let new: Vec<usize> = (0..c.topics.len())
                .filter(|&i| id_of(ctx.shard, &c.topics[i]).is_none_or(|id| !held.contains(&id)))
                .collect();
            if subs.len() + new.len() > cfg.max_topics_per_conn {
                ctx.stats.control_error();
                let max = cfg.max_topics_per_conn;
                let e = control::ControlError::TooManyTopics { max };
                return (control::error(&e.to_string()), Vec::new());
            }
            let patterns = subs.as_slice().iter().filter(|s| s.is_pattern()).count()
                + new
                    .iter()
                    .filter(|&&i| pattern::is_pattern(&c.topics[i]))
                    .count();
            if patterns > cfg.max_patterns_per_conn {
                ctx.stats.control_error();
                let max = cfg.max_patterns_per_conn;
                return (
                    control::error(&format!(
                        "too many patterns: at most {max} per connection (see --max-patterns-per-conn)"
                    )),
                    Vec::new(),
                );
            }
            // A recovery for a topic not held yet (a pattern's positions
            // included) is admitted at a bounded rate per worker (reconnect
            // storms): over it, nothing changes and the client is told when
            // to try again.
            let recovers = new
                .iter()
                .any(|&i| c.since.get(i).copied().flatten().is_some())
                || (!c.pattern_since.is_empty()
                    && new.iter().any(|&i| pattern::is_pattern(&c.topics[i])));
            if recovers && let Err(ms) = ctx.shard.admit_recovery(cfg.max_recovery_rate, ctx.now_ms)
            {
                ctx.stats.recovery_deferred();
                return (control::busy(ms), Vec::new());
            }
            // In a cluster, a topic's history here is filled from the
            // stream once the node follows it: until then a recovery is
            // asked to come back (the node starts filling it now).
            if recovers {
                let wanted = new
                    .iter()
                    .filter(|&&i| c.since.get(i).copied().flatten().is_some())
                    .map(|&i| c.topics[i].as_str())
                    .chain(c.pattern_since.iter().map(|(n, _)| n.as_str()));
                if let Some(ms) = cold_in_cluster(wanted, ctx) {
                    ctx.stats.recovery_deferred();
                    return (control::busy(ms), Vec::new());
                }
            }
            let new_patterns = new
                .iter()
                .filter(|&&i| {
                    pattern::is_pattern(&c.topics[i])
                        && ctx.shard.pattern_id(&c.topics[i]).is_none()
                })
                .count();
            let names_pattern = new.iter().any(|&i| pattern::is_pattern(&c.topics[i]));
            if names_pattern && let Err(ms) = ctx.shard.admit_scans(ctx.now_ms) {
                ctx.stats.control_error();
                return (
                    control::busy_with("patterns changing too fast: try again", ms),
                    Vec::new(),
                );
            }
            if new_patterns > 0
                && let Err(ms) = ctx.shard.admit_patterns(new_patterns, ctx.now_ms)
            {
                ctx.stats.control_error();
                return (
                    control::busy_with("patterns changing too fast: try again", ms),
                    Vec::new(),
                );
            }
            ctx.rated = Some((c.max_rate, c.topics.clone()));
            ctx.resubscribed = true;
            // One subscribe's replay (recoveries and last values, however
            // many topics): at most half a subscriber's queue with what is
            // queued already, so the live stream that follows is not cut
            // as a slow consumer.
            let mut cap_left = (cfg.max_outbound_bytes / 2).saturating_sub(queued);
            let names: Vec<&str> = new.iter().map(|&i| c.topics[i].as_str()).collect();
            let since: Vec<Option<Since>> = new
                .iter()
                .map(|&i| c.since.get(i).copied().flatten())
                .collect();
            let (frames, recovered) = subscribe_names(
                &names,
                &since,
                &c.pattern_since,
                subs,
                &mut cap_left,
                ctx,
                work,
            );
            let listed: Vec<(&str, &Recovery)> =
                recovered.iter().map(|(n, r)| (n.as_str(), r)).collect();
            let reply = control::subscribed_with_recovery(&c.topics, &listed);
            return (reply, frames);
        }
        Op::History => {
            if let Some(ms) = cold_in_cluster(c.topics.iter().map(String::as_str), ctx) {
                ctx.stats.recovery_deferred();
                return (control::busy(ms), Vec::new());
            }
            let directory = ctx.shard.directory();
            let ranges: Vec<(&str, Option<control::Range>)> = c
                .topics
                .iter()
                .map(|n| {
                    let r = directory.get(n).map(|t| {
                        let r = directory.range(&t, ctx.now);
                        directory.release(t);
                        r
                    });
                    (n.as_str(), r)
                })
                .collect();
            return (control::history_reply(&ranges), Vec::new());
        }
        Op::Refresh => {
            // A signature check costs what decoding tens of kilobytes does.
            *work += REFRESH_WORK;
            *refreshed = true;
            return refresh(c.token.as_deref().unwrap_or(""), subs, ctx);
        }
        Op::Unsubscribe => {
            let gone: std::collections::HashSet<u32> = c
                .topics
                .iter()
                .filter_map(|n| id_of(ctx.shard, n))
                .collect();
            let shard = &mut *ctx.shard;
            let mut dropped = 0;
            let mut patterns = 0;
            subs.retain(|s| {
                let keep = !gone.contains(&s.topic());
                if !keep {
                    shard.unsubscribe(*s);
                    dropped += 1;
                    patterns += usize::from(s.is_pattern());
                }
                keep
            });
            shard.mark_multi(subs.as_slice());
            ctx.resubscribed = dropped > 0;
            ctx.stats.unsubscribed(dropped);
            ctx.stats.pattern_unsubscribed(patterns);
        }
    }
    (control::reply(c.op, &c.topics), Vec::new())
}

/// In-band token refreshes each worker checks per second (a signature
/// check each: 50–220 µs with one to four keys; at this rate at most about
/// a tenth of a core). Over it a refresh is answered busy with
/// `retry_ms`, the old token staying.
const REFRESHES_PER_SECOND: u32 = 500;

/// What one refresh counts toward the connection's turn, in token
/// comparisons (16 B each: 64 KiB, about what decoding costs as long as
/// a signature check takes).
const REFRESH_WORK: usize = 4096;

/// `{"op":"refresh","token":"…"}`: the connection's token replaced by a
/// valid one for the same `sub` whose rights cover every subscription
/// held; anything else is an error reply and the old token stays (until
/// it expires and the connection is closed with 3000).
fn refresh(token: &str, subs: &SubList, ctx: &mut Ctx<'_>) -> (String, Vec<Bytes>) {
    let Some(verifier) = ctx.shared.verifier() else {
        ctx.stats.control_error();
        return (
            control::error("refresh: this server does not use tokens"),
            Vec::new(),
        );
    };
    if let Err(ms) = ctx.shard.admit_refresh(REFRESHES_PER_SECOND, ctx.now_ms) {
        ctx.stats.control_error();
        return (
            control::busy_with("refreshes busy: try again", ms),
            Vec::new(),
        );
    }
    let grant = match ctx.shared.verify(&verifier, token, ctx.wall_s) {
        Ok(g) => g,
        Err(why) => {
            ctx.stats.auth_refused(why);
            return (
                control::error(&format!("refresh refused: {}", why.reason())),
                Vec::new(),
            );
        }
    };
    if ctx.grant.as_ref().is_some_and(|old| old.sub != grant.sub) {
        ctx.stats.auth_refused(Refusal::Forbidden);
        return (
            control::error("refresh refused: the new token names another sub"),
            Vec::new(),
        );
    }
    let uncovered = subs.as_slice().iter().any(|s| {
        let name = if s.is_pattern() {
            ctx.shard.pattern_name(s.topic())
        } else {
            ctx.shard.topic_name(s.topic())
        };
        name.is_some_and(|n| !grant.may_subscribe(n))
    });
    if uncovered {
        ctx.stats.auth_refused(Refusal::Forbidden);
        return (
            control::error("refresh refused: the new token does not cover the topics held"),
            Vec::new(),
        );
    }
    let exp = grant.exp;
    ctx.grant = Some(std::sync::Arc::new(grant));
    (
        format!("{{\"op\":\"refreshed\",\"exp\":{exp}}}"),
        Vec::new(),
    )
}

/// How long a client should wait before asking again for a recovery from
/// a history the node is filling from the cluster (one stream read per
/// retained message, on loopback well under this).
const WARM_RETRY_MS: u32 = 50;
/// The same when the link has as many topics waiting to be filled as it
/// takes at once.
const WARM_FULL_RETRY_MS: u32 = 500;

/// In a cluster: whether any of `names` has no history here yet that a
/// recovery may use; each such topic is handed to the link to fill, and
/// the client is to retry after the returned milliseconds. `None` on one
/// machine. Each such topic the node has no entry for yet counts as one
/// recovery against `--max-recovery-rate` (a subscribe with `since` has
/// counted one already; a retry while its fill runs counts nothing):
/// over it, none is handed on.
fn cold_in_cluster<'a>(names: impl Iterator<Item = &'a str>, ctx: &mut Ctx<'_>) -> Option<u32> {
    let directory = ctx.shard.directory();
    let link = directory.link()?;
    // Each cold name, and whether the node has no entry for it yet (one it
    // follows already, held or being filled, is a retry: not counted again).
    let mut cold: Vec<&str> = Vec::new();
    let mut fresh = 0;
    for name in names.filter(|n| !pattern::is_pattern(n)) {
        match directory.get(name) {
            None => fresh += 1,
            Some(t) => {
                let warm = t.is_warm();
                directory.release(t);
                if warm {
                    continue;
                }
            }
        }
        cold.push(name);
    }
    if cold.is_empty() {
        return None;
    }
    let link = std::sync::Arc::clone(link);
    let rate = ctx.shared.config.max_recovery_rate;
    if let Err(ms) = ctx.shard.admit_recoveries(rate, fresh, ctx.now_ms) {
        return Some(ms);
    }
    let mut retry = WARM_RETRY_MS;
    for name in cold {
        if !link.warm(name) {
            retry = WARM_FULL_RETRY_MS;
            break;
        }
    }
    Some(retry)
}
