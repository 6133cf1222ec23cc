//! One shard's storm subscribers ([`Subscribers`]), without the sockets:
//! where each one is (live, dropped, reconnecting, waiting for its reply,
//! recovering), a [`TopicTrack`] per subscriber and topic, and every frame
//! they receive checked against them (a [`Sink`] fed by the fleet). The
//! phase (`storm::phase`) does the I/O and tells them what happened.
//!
//! A subscriber's state is about 100 bytes plus four numbers (32 bytes)
//! per topic, so 19 000 of them on two topics take about 3.5 MB.

use super::envelope::{Envelope, Recovery};
use super::report::StormCounts;
use super::request::subscribe_message;
use super::track::TopicTrack;
use crate::client::Sink;
use crate::clock::Anchor;
use crate::hist::Hist;
use crate::wire::ShardReport;
use corecast::proto::OpCode;
use std::time::Instant;

/// `owner` of a token that is no subscriber's connection.
const NOBODY: u32 = u32::MAX;

/// Where a subscriber is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Not followed: it was not up when the phase began.
    Off,
    /// Subscribed and receiving (from the start, or back and caught up).
    Live,
    /// Dropped; reconnects at its time.
    Down,
    /// Its reconnect is in the handshake.
    Opening,
    /// Reconnected, `subscribe` sent; waiting for the reply.
    Asked,
    /// Reply read: receiving the recovered publications, then live ones
    /// until each recovered topic has had one.
    Back,
    /// Did not come back (counted by cause).
    Failed,
}

/// A marker (snapshot or conflation) waiting for the publication it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Marker {
    topic: u16,
    epoch: u64,
    seq: u64,
    /// Conflation: numbers replaced; a snapshot replaces none.
    replaced: u64,
    snapshot: bool,
}

/// One subscriber.
#[derive(Debug, Clone)]
struct Sub {
    stage: Stage,
    /// Its current connection.
    token: u32,
    /// Recovered topics still waiting for their first live publication.
    to_catch_up: u16,
    had_gap: bool,
    had_duplicate: bool,
    marker: Option<Marker>,
    /// When its reconnect started, and when it sent its `subscribe`.
    reconnected_at: Option<Instant>,
    asked_at: Option<Instant>,
    /// When it last made progress towards catching up (the reply, a
    /// topic's replay over, a topic's first live publication).
    settled_at: Option<Instant>,
}

/// Every subscriber of a shard.
pub struct Subscribers {
    topics: Vec<String>,
    anchor: Anchor,
    subs: Vec<Sub>,
    /// `tracks[i * topics + t]`.
    tracks: Vec<TopicTrack>,
    /// Subscriber of each connection token.
    owner: Vec<u32>,
    dropped_at: Option<Instant>,
    pub counts: StormCounts,
    caught_up_from_drop: Hist,
    caught_up_from_reconnect: Hist,
    reply_latency: Hist,
    /// Publish-to-receive latency of live publications.
    pub latency: Hist,
    /// Data frames received.
    pub frames: u64,
    /// Frames that are no envelope.
    pub malformed: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    /// Subscribes to send again (recovery busy): (when, connection token).
    retries: Vec<(Instant, usize)>,
}

impl Subscribers {
    /// Subscriber `i` is connection token `i`; `live[i]`: it was up.
    pub fn new(live: Vec<bool>, topics: Vec<String>, anchor: Anchor) -> Self {
        let n = live.len();
        Self {
            tracks: vec![TopicTrack::default(); n * topics.len()],
            topics,
            anchor,
            subs: live
                .iter()
                .enumerate()
                .map(|(i, &up)| Sub {
                    stage: if up { Stage::Live } else { Stage::Off },
                    token: i as u32,
                    to_catch_up: 0,
                    had_gap: false,
                    had_duplicate: false,
                    marker: None,
                    reconnected_at: None,
                    asked_at: None,
                    settled_at: None,
                })
                .collect(),
            owner: (0..n as u32).collect(),
            dropped_at: None,
            counts: StormCounts::default(),
            caught_up_from_drop: Hist::default(),
            caught_up_from_reconnect: Hist::default(),
            reply_latency: Hist::default(),
            latency: Hist::default(),
            frames: 0,
            malformed: 0,
            first: None,
            last: None,
            retries: Vec::new(),
        }
    }

    #[cfg(test)]
    pub fn stage(&self, i: usize) -> Stage {
        self.subs[i].stage
    }

    /// The connection of a live subscriber.
    pub fn live_token(&self, i: usize) -> Option<usize> {
        (self.subs[i].stage == Stage::Live).then_some(self.subs[i].token as usize)
    }

    fn track(&mut self, i: usize, t: usize) -> &mut TopicTrack {
        &mut self.tracks[i * self.topics.len() + t]
    }

    fn topic_index(&self, name: &[u8]) -> Option<usize> {
        self.topics.iter().position(|t| t.as_bytes() == name)
    }

    fn unexpected(&mut self, what: &str) {
        *self.counts.unexpected.entry(what.to_string()).or_default() += 1;
    }

    fn fail(&mut self, i: usize, cause: Option<String>) {
        self.subs[i].stage = Stage::Failed;
        if let Some(cause) = cause {
            *self.counts.reconnect_failures.entry(cause).or_default() += 1;
        }
    }

    /// The drop is starting now.
    pub fn drop_starts(&mut self, at: Instant) {
        self.dropped_at = Some(at);
        self.counts.drop_ns = Some(self.anchor.ns(at));
    }

    /// Subscriber `i` was selected but its connection had already ended.
    pub fn not_open_at_drop(&mut self) {
        self.counts.not_open_at_drop += 1;
    }

    /// Subscriber `i`'s connection was severed.
    pub fn dropped(&mut self, i: usize) {
        let s = &mut self.subs[i];
        s.stage = Stage::Down;
        s.marker = None;
        self.counts.dropped += 1;
    }

    /// Subscriber `i` starts its reconnect on connection `token` at `at`.
    pub fn reopening(&mut self, i: usize, token: usize, at: Instant) {
        if self.owner.len() <= token {
            self.owner.resize(token + 1, NOBODY);
        }
        self.owner[token] = i as u32;
        let s = &mut self.subs[i];
        s.stage = Stage::Opening;
        s.token = token as u32;
        s.reconnected_at = Some(at);
        self.counts.reconnects += 1;
    }

    /// Subscriber `i`'s reconnect could not even start (the cause is in
    /// the fleet's failures).
    pub fn reopen_failed(&mut self, i: usize) {
        self.fail(i, None);
    }

    /// The subscriber reconnecting on `token`, if any.
    fn reconnecting(&self, token: usize, stage: Stage) -> Option<usize> {
        let i = *self.owner.get(token)?;
        let s = self.subs.get(i as usize)?;
        (s.token as usize == token && s.stage == stage).then_some(i as usize)
    }

    /// The handshake on `token` failed (the cause is in the fleet's failures).
    pub fn handshake_failed(&mut self, token: usize) {
        if let Some(i) = self.reconnecting(token, Stage::Opening) {
            self.fail(i, None);
        }
    }

    /// The reconnect on `token` opened: the `subscribe` to send, with
    /// `since` for every topic the subscriber has a position in; from now
    /// on it waits for the reply. `None`: not a reconnect.
    /// The subscribes due again at `now` (recovery busy): each connection
    /// token with its message (still waiting for its reply).
    pub fn due_retries(&mut self, now: Instant) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.retries.len() {
            if self.retries[i].0 > now {
                i += 1;
                continue;
            }
            let (_, token) = self.retries.swap_remove(i);
            let Some(s) = self.reconnecting(token, Stage::Asked) else {
                continue;
            };
            let t_n = self.topics.len();
            let since: Vec<(usize, u64, u64)> = (0..t_n)
                .filter_map(|t| self.tracks[s * t_n + t].since().map(|(e, q)| (t, e, q)))
                .collect();
            out.push((token, subscribe_message(&self.topics, since)));
        }
        out
    }

    /// The next subscribe due again, if any.
    pub fn next_retry(&self) -> Option<Instant> {
        self.retries.iter().map(|r| r.0).min()
    }

    pub fn opened(&mut self, token: usize, at: Instant) -> Option<String> {
        let i = self.reconnecting(token, Stage::Opening)?;
        let t_n = self.topics.len();
        let since: Vec<(usize, u64, u64)> = (0..t_n)
            .filter_map(|t| self.tracks[i * t_n + t].since().map(|(e, s)| (t, e, s)))
            .collect();
        self.counts.no_position += (t_n - since.len()) as u64;
        self.counts.reopened += 1;
        let s = &mut self.subs[i];
        s.stage = Stage::Asked;
        s.asked_at = Some(at);
        Some(subscribe_message(&self.topics, since))
    }

    /// The reconnect on `token` ended before its reply.
    pub fn ended_before_reply(&mut self, token: usize) {
        let i = self
            .reconnecting(token, Stage::Asked)
            .or_else(|| self.reconnecting(token, Stage::Opening));
        if let Some(i) = i {
            self.fail(i, Some("ended_before_reply".into()));
        }
    }

    /// The reply to subscriber `i`'s `subscribe`.
    fn reply(&mut self, i: usize, recovery: &[(String, Recovery)], at: Instant) {
        let t_n = self.topics.len();
        if let Some(asked) = self.subs[i].asked_at {
            self.reply_latency
                .record_ns(at.saturating_duration_since(asked).as_nanos() as u64);
        }
        self.counts.resubscribed += 1;
        for (name, _) in recovery {
            let asked = self
                .topic_index(name.as_bytes())
                .is_some_and(|t| self.tracks[i * t_n + t].since().is_some());
            if !asked {
                self.unexpected("recovery_not_asked_for");
            }
        }
        let mut to_catch_up = 0u16;
        for t in 0..t_n {
            if self.tracks[i * t_n + t].since().is_none() {
                continue;
            }
            let Some((_, r)) = recovery.iter().find(|(n, _)| *n == self.topics[t]) else {
                self.counts.recoveries_missing += 1;
                continue;
            };
            let resumed = self.track(i, t).recovery(r);
            let c = &mut self.counts;
            if r.complete {
                c.recoveries_complete += 1;
            } else {
                let reason = r.reason.clone().unwrap_or_else(|| "none_given".into());
                *c.recoveries_incomplete.entry(reason).or_default() += 1;
            }
            c.announced_lost += resumed.announced_lost;
            c.recovered_announced += resumed.announced;
            to_catch_up += 1;
        }
        let s = &mut self.subs[i];
        s.stage = Stage::Back;
        s.to_catch_up = to_catch_up;
        s.settled_at = Some(at);
        if to_catch_up == 0 {
            self.caught_up(i, at);
        }
    }

    /// Subscriber `i` has had a live publication on every recovered topic.
    fn caught_up(&mut self, i: usize, at: Instant) {
        let s = &mut self.subs[i];
        s.stage = Stage::Live;
        self.counts.caught_up += 1;
        let ns = |from: Option<Instant>| from.map(|f| at.saturating_duration_since(f).as_nanos());
        if let Some(d) = ns(self.dropped_at) {
            self.caught_up_from_drop.record_ns(d as u64);
        }
        if let Some(d) = ns(s.reconnected_at) {
            self.caught_up_from_reconnect.record_ns(d as u64);
        }
        let at_ns = self.anchor.ns(at);
        self.counts.last_caught_up_ns = self.counts.last_caught_up_ns.max(Some(at_ns));
    }

    /// A publication for subscriber `i`.
    fn publication(
        &mut self,
        i: usize,
        t: usize,
        (epoch, seq): (u64, u64),
        header: Option<(u64, u64)>,
        at: Instant,
    ) {
        let marker = self.subs[i].marker.take();
        let (replaced, last_value) = match marker {
            Some(m) if m.topic as usize == t && m.epoch == epoch && m.seq == seq => {
                (m.replaced, m.snapshot)
            }
            Some(_) => {
                self.unexpected("marker_not_followed_by_its_publication");
                (0, false)
            }
            None => (0, false),
        };
        if header.is_none() {
            self.counts.no_header += 1;
        }
        let seen = self
            .track(i, t)
            .publication(epoch, seq, replaced, header.map(|h| h.0));
        let c = &mut self.counts;
        c.gaps += seen.gap;
        c.conflated += seen.conflated;
        c.epoch_changes += u64::from(seen.new_epoch);
        c.duplicates += u64::from(seen.duplicate);
        c.recovered_received += u64::from(seen.recovered);
        let s = &mut self.subs[i];
        s.had_gap |= seen.gap > 0;
        s.had_duplicate |= seen.duplicate;
        if seen.replayed || seen.caught_up {
            s.settled_at = Some(at);
        }
        if seen.caught_up && s.stage == Stage::Back {
            s.to_catch_up = s.to_catch_up.saturating_sub(1);
            if s.to_catch_up == 0 {
                self.caught_up(i, at);
            }
        }
        if let (false, false, false, Some((_, sent_ns))) =
            (seen.recovered, seen.duplicate, last_value, header)
        {
            self.latency
                .record_ns(self.anchor.ns(at).saturating_sub(sent_ns));
        }
    }

    /// A marker for subscriber `i`: the next publication is the one it names.
    fn marker(&mut self, i: usize, t: usize, m: Marker) {
        if self.subs[i].marker.is_some() {
            self.unexpected("marker_not_followed_by_its_publication");
        }
        if m.snapshot {
            self.counts.snapshots += 1;
            // A last value is for a topic the subscriber has nothing of.
            if self.track(i, t).since().is_some() {
                self.unexpected("snapshot_of_a_topic_with_a_position");
            }
        }
        self.subs[i].marker = Some(m);
    }

    /// Has every followed subscriber settled: failed, its connection gone,
    /// or (live) with the last publication of every topic?
    pub fn settled(&self, is_live: impl Fn(usize) -> bool, published: &[u64]) -> bool {
        let t_n = self.topics.len();
        self.subs.iter().enumerate().all(|(i, s)| match s.stage {
            Stage::Off | Stage::Failed => true,
            Stage::Down => false,
            _ if !is_live(s.token as usize) => true,
            Stage::Opening | Stage::Asked => false,
            Stage::Live | Stage::Back => (0..t_n)
                .all(|t| self.tracks[i * t_n + t].index >= published.get(t).copied().unwrap_or(0)),
        })
    }

    /// The end of the phase: what did not happen is counted (reconnects
    /// not made, replies not received, publications missing at the end),
    /// and everything goes into `r`.
    pub fn finish(
        &mut self,
        is_live: impl Fn(usize) -> bool,
        published: &[u64],
        r: &mut ShardReport,
    ) {
        let t_n = self.topics.len();
        for i in 0..self.subs.len() {
            let s = &self.subs[i];
            let (stage, live) = (s.stage, is_live(s.token as usize));
            match stage {
                Stage::Off => continue,
                Stage::Down | Stage::Opening => {
                    self.fail(i, Some("not_reconnected_by_the_end".into()))
                }
                Stage::Asked => self.fail(
                    i,
                    Some(
                        if live {
                            "no_reply_by_the_end"
                        } else {
                            "ended_before_reply"
                        }
                        .into(),
                    ),
                ),
                _ => {}
            }
            let s = &self.subs[i];
            r.tracked += 1;
            let c = &mut self.counts;
            c.subscribers_with_gaps += u64::from(s.had_gap);
            c.subscribers_with_duplicates += u64::from(s.had_duplicate);
            if s.stage == Stage::Failed {
                continue;
            }
            let missing: u64 = (0..t_n)
                .map(|t| {
                    let want = published.get(t).copied().unwrap_or(0);
                    want.saturating_sub(self.tracks[i * t_n + t].index)
                })
                .sum();
            if missing > 0 {
                c.tail_incomplete += 1;
                c.tail_missing += missing;
            } else {
                r.complete += 1;
            }
            r.with_loss += u64::from(missing > 0 || s.had_gap);
            // Still waiting for a live publication: none came after its
            // replay. With every last publication it is caught up, as of
            // the end of its replay.
            if s.stage == Stage::Back {
                match (missing, s.settled_at) {
                    (0, Some(at)) => {
                        self.counts.caught_up_at_the_end += 1;
                        self.caught_up(i, at);
                    }
                    _ => self.counts.not_caught_up += 1,
                }
            }
        }
        let c = &mut self.counts;
        c.caught_up_from_drop = self.caught_up_from_drop.to_wire();
        c.caught_up_from_reconnect = self.caught_up_from_reconnect.to_wire();
        c.reply_latency = self.reply_latency.to_wire();
        r.frames = self.frames;
        r.malformed = self.malformed;
        r.first_receive_ns = self.first.map(|i| self.anchor.ns(i));
        r.last_receive_ns = self.last.map(|i| self.anchor.ns(i));
        r.latency = self.latency.to_wire();
        r.duplicates = c.duplicates;
        r.lost = c.gaps + c.tail_missing;
        r.storm = c.clone();
    }
}

impl Sink for Subscribers {
    fn message(&mut self, token: usize, opcode: OpCode, payload: &[u8], at: Instant) {
        let Some(i) = self.owner.get(token).map(|&i| i as usize) else {
            return;
        };
        let Some(s) = self.subs.get(i) else {
            return;
        };
        if s.token as usize != token || s.stage == Stage::Off {
            return;
        }
        let stage = s.stage;
        self.frames += 1;
        self.first.get_or_insert(at);
        self.last = Some(at);
        let (name, marker) = match Envelope::parse(opcode, payload) {
            Envelope::Pub {
                topic,
                epoch,
                seq,
                header,
            } => {
                match (self.topic_index(&topic), stage) {
                    (None, _) => self.unexpected("publication_of_another_topic"),
                    (Some(_), Stage::Asked) => self.unexpected("publication_before_the_reply"),
                    (Some(t), Stage::Live | Stage::Back) => {
                        self.publication(i, t, (epoch, seq), header, at)
                    }
                    (Some(_), _) => self.unexpected("publication_while_reconnecting"),
                }
                return;
            }
            Envelope::Snapshot { topic, epoch, seq } => (
                topic,
                Marker {
                    topic: 0,
                    epoch,
                    seq,
                    replaced: 0,
                    snapshot: true,
                },
            ),
            Envelope::Conflated {
                topic,
                epoch,
                seq,
                replaced,
            } => (
                topic,
                Marker {
                    topic: 0,
                    epoch,
                    seq,
                    replaced,
                    snapshot: false,
                },
            ),
            Envelope::Subscribed { recovery } => {
                if stage == Stage::Asked {
                    self.reply(i, &recovery, at);
                } else {
                    self.unexpected("reply_not_asked_for");
                }
                return;
            }
            Envelope::Error {
                retry_ms: Some(ms), ..
            } if stage == Stage::Asked => {
                // Recovery busy: the same subscribe again after the delay
                // the server gave, plus as much jitter.
                let jitter = (token as u64).wrapping_mul(0x9E37_79B9) % (ms + 1);
                let at = at + std::time::Duration::from_millis(ms + jitter);
                self.retries.push((at, token));
                self.counts.busy_retries += 1;
                return;
            }
            Envelope::Error { reason, .. } => {
                if stage == Stage::Asked {
                    self.fail(i, Some(format!("subscribe_error:{reason}")));
                } else {
                    self.unexpected("error_reply");
                }
                return;
            }
            Envelope::Other(what) => return self.unexpected(&what),
            Envelope::Malformed => {
                self.malformed += 1;
                return;
            }
        };
        match self.topic_index(&name) {
            Some(t) if t <= u16::MAX as usize => self.marker(
                i,
                t,
                Marker {
                    topic: t as u16,
                    ..marker
                },
            ),
            _ => self.unexpected("marker_of_another_topic"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::encode_payload_header;
    use corecast::pubsub::envelope::{Form, binary_frame, json_frame, snapshot_marker};
    use std::time::Duration;

    fn body(frame: &[u8]) -> Vec<u8> {
        let h = corecast::proto::frame::parse_header(frame)
            .unwrap()
            .unwrap();
        frame[h.header_len..].to_vec()
    }

    /// A publication of `topic`, number `seq`, publisher's number `n`.
    fn publ(form: Form, topic: &str, seq: u64, n: u64, sent_ns: u64) -> (OpCode, Vec<u8>) {
        let mut p = encode_payload_header(n, sent_ns).to_vec();
        p.resize(40, 0);
        match form {
            Form::Binary => (
                OpCode::Binary,
                body(&binary_frame(topic, 9, seq, OpCode::Binary, &p)),
            ),
            _ => (
                OpCode::Text,
                body(&json_frame(topic, 9, seq, OpCode::Binary, &p)),
            ),
        }
    }

    fn reply(text: &str) -> (OpCode, Vec<u8>) {
        (OpCode::Text, text.as_bytes().to_vec())
    }

    #[test]
    fn a_drop_and_a_complete_recovery_in_both_forms() {
        for form in [Form::Json, Form::Binary] {
            let anchor = Anchor::now();
            let t0 = Instant::now();
            let ns0 = anchor.ns(t0);
            let topics = vec!["a".to_string(), "b".to_string()];
            // Subscriber 0 drops; 1 stays; 2 was never up.
            let mut s = Subscribers::new(vec![true, true, false], topics, anchor);
            let send = |s: &mut Subscribers, token, (op, b): (OpCode, Vec<u8>), ms: u64| {
                s.message(token, op, &b, t0 + Duration::from_millis(ms))
            };
            // A last value, then live publications a:10..=12 (publisher's 0..=2), b:5..=6.
            let snap = snapshot_marker(form, "a", 9, 10).unwrap();
            let op = if form == Form::Json {
                OpCode::Text
            } else {
                OpCode::Binary
            };
            send(&mut s, 0, (op, body(&snap)), 0);
            for (seq, n) in [(10, 0), (11, 1), (12, 2)] {
                send(&mut s, 0, publ(form, "a", seq, n, ns0), 1);
                send(&mut s, 1, publ(form, "a", seq, n, ns0), 1);
            }
            for (seq, n) in [(5, 0), (6, 1)] {
                send(&mut s, 0, publ(form, "b", seq, n, ns0), 1);
            }
            send(&mut s, 2, publ(form, "a", 10, 0, ns0), 1); // not followed
            assert_eq!(s.counts.snapshots, 1);
            assert_eq!(s.latency.len(), 7, "the last value is no live sample");
            // The drop, the reconnect on token 7, the reply.
            s.drop_starts(t0 + Duration::from_millis(100));
            assert_eq!(s.live_token(0), Some(0));
            s.dropped(0);
            send(&mut s, 0, publ(form, "a", 13, 3, ns0), 101); // stale: ignored
            s.reopening(0, 7, t0 + Duration::from_millis(300));
            let msg = s.opened(7, t0 + Duration::from_millis(301)).unwrap();
            assert!(
                msg.contains(r#""since":{"a":{"epoch":9,"seq":12},"b":{"epoch":9,"seq":6}}"#),
                "{msg}"
            );
            send(&mut s, 7, publ(form, "a", 13, 3, ns0), 302); // before the reply
            send(
                &mut s,
                7,
                reply(
                    r#"{"op":"subscribed","topics":["a","b"],"recovery":{"a":{"epoch":9,"from":13,"to":15,"complete":true},"b":{"epoch":9,"from":7,"to":6,"complete":true}}}"#,
                ),
                303,
            );
            assert_eq!(s.stage(0), Stage::Back);
            for (seq, n) in [(13, 3), (14, 4), (15, 5)] {
                send(&mut s, 7, publ(form, "a", seq, n, ns0), 304);
            }
            send(&mut s, 7, publ(form, "b", 7, 2, ns0), 305);
            assert_eq!(s.stage(0), Stage::Back, "a has had no live one yet");
            send(&mut s, 7, publ(form, "a", 16, 6, ns0), 310);
            assert_eq!(s.stage(0), Stage::Live);
            let c = &s.counts;
            assert_eq!(
                (c.dropped, c.reconnects, c.reopened, c.resubscribed),
                (1, 1, 1, 1)
            );
            assert_eq!(
                (
                    c.recoveries_complete,
                    c.recovered_announced,
                    c.recovered_received
                ),
                (2, 3, 3)
            );
            assert_eq!((c.gaps, c.duplicates, c.caught_up), (0, 0, 1));
            assert_eq!(c.unexpected.get("publication_before_the_reply"), Some(&1));
            assert_eq!(s.caught_up_from_drop.max_ns().unwrap() / 1_000_000, 210);
            assert_eq!(s.caught_up_from_reconnect.max_ns().unwrap() / 1_000_000, 10);
            assert_eq!(s.reply_latency.max_ns().unwrap() / 1_000_000, 2);
            // The end: a got 7 messages, b 3; subscriber 1 lacks a's last 4.
            assert!(!s.settled(|_| true, &[7, 3]));
            assert!(s.settled(|t| t != 1, &[7, 3]), "1's connection is gone");
            let mut r = ShardReport::default();
            s.finish(|_| true, &[7, 3], &mut r);
            assert_eq!((r.tracked, r.complete, r.with_loss), (2, 1, 1));
            assert_eq!((r.storm.tail_incomplete, r.storm.tail_missing), (1, 7));
            assert_eq!(r.storm.caught_up_from_drop.0.len(), 1);
        }
    }

    #[test]
    fn a_recovery_up_to_the_last_publication_is_caught_up_at_its_end() {
        let anchor = Anchor::now();
        let t0 = Instant::now();
        let mut s = Subscribers::new(vec![true, true], vec!["a".to_string()], anchor);
        for i in 0..2 {
            for seq in 1..=3 {
                let (op, b) = publ(Form::Json, "a", seq, seq - 1, 0);
                s.message(i, op, &b, t0);
            }
        }
        s.drop_starts(t0);
        for i in 0..2 {
            s.dropped(i);
            s.reopening(i, 2 + i, t0);
            s.opened(2 + i, t0).unwrap();
        }
        // Publishing ended at 5: both replay 4..=5 and no live one follows.
        let r5 = r#"{"op":"subscribed","topics":["a"],"recovery":{"a":{"epoch":9,"from":4,"to":5,"complete":true}}}"#;
        for token in [2, 3] {
            let (op, b) = reply(r5);
            s.message(token, op, &b, t0 + Duration::from_millis(10));
            let (op, b) = publ(Form::Json, "a", 4, 3, 0);
            s.message(token, op, &b, t0 + Duration::from_millis(20));
        }
        // Subscriber 0 gets 5; subscriber 1 does not.
        let (op, b) = publ(Form::Json, "a", 5, 4, 0);
        s.message(2, op, &b, t0 + Duration::from_millis(30));
        assert_eq!(s.counts.caught_up, 0);
        let mut r = ShardReport::default();
        s.finish(|_| true, &[5], &mut r);
        let c = &r.storm;
        assert_eq!(
            (c.caught_up, c.caught_up_at_the_end, c.not_caught_up),
            (1, 1, 1)
        );
        assert_eq!(s.caught_up_from_drop.max_ns().unwrap() / 1_000_000, 30);
        assert_eq!((c.tail_incomplete, c.tail_missing), (1, 1));
    }

    #[test]
    fn failures_gaps_and_incomplete_recoveries_are_counted() {
        let anchor = Anchor::now();
        let t0 = Instant::now();
        let topics = vec!["a".to_string()];
        let mut s = Subscribers::new(vec![true; 4], topics, anchor);
        for i in 0..4 {
            for seq in 1..=5 {
                let (op, b) = publ(Form::Json, "a", seq, seq - 1, 0);
                s.message(i, op, &b, t0);
            }
        }
        s.drop_starts(t0);
        for i in 0..4 {
            s.dropped(i);
            s.reopening(i, 10 + i, t0);
        }
        // 0: the server skips a number it claims to have recovered.
        s.opened(10, t0).unwrap();
        let ok = r#"{"op":"subscribed","topics":["a"],"recovery":{"a":{"epoch":9,"from":6,"to":8,"complete":true}}}"#;
        let (op, b) = reply(ok);
        s.message(10, op, &b, t0);
        for seq in [6, 8, 9] {
            let (op, b) = publ(Form::Json, "a", seq, seq - 1, 0);
            s.message(10, op, &b, t0);
        }
        // 1: too old, announced; 2: an error reply; 3: handshake failed.
        s.opened(11, t0).unwrap();
        let old = r#"{"op":"subscribed","topics":["a"],"recovery":{"a":{"epoch":9,"from":8,"to":8,"complete":false,"reason":"too_old"}}}"#;
        let (op, b) = reply(old);
        s.message(11, op, &b, t0);
        for seq in [8, 9, 9] {
            let (op, b) = publ(Form::Json, "a", seq, seq - 1, 0);
            s.message(11, op, &b, t0);
        }
        s.opened(12, t0).unwrap();
        let (op, b) = reply(r#"{"op":"error","reason":"too many topics"}"#);
        s.message(12, op, &b, t0);
        s.handshake_failed(13);
        let c = &s.counts;
        assert_eq!((c.gaps, c.duplicates, c.announced_lost), (1, 1, 2));
        assert_eq!(c.recoveries_incomplete.get("too_old"), Some(&1));
        assert_eq!(
            c.reconnect_failures.get("subscribe_error:too many topics"),
            Some(&1)
        );
        assert_eq!((s.stage(2), s.stage(3)), (Stage::Failed, Stage::Failed));
        assert_eq!(c.caught_up, 2);
        let mut r = ShardReport::default();
        s.finish(|_| true, &[9], &mut r);
        assert_eq!(
            (
                r.storm.subscribers_with_gaps,
                r.storm.subscribers_with_duplicates
            ),
            (1, 1)
        );
        assert_eq!((r.complete, r.lost), (2, 1));
    }
}
