//! One shard's conflation subscribers ([`Subscribers`]), without the
//! sockets: a [`TopicTrack`] per subscriber and topic (storm's continuity
//! rules: a number skipped is a gap unless the `conflated` marker just
//! before it accounted for it), the marker waiting for its publication,
//! and every publication's staleness, counted apart for normal and slow
//! subscribers (a [`Sink`] fed by the fleet).
//!
//! A subscriber's state is a few bytes plus 32 per topic: 19 000 of them
//! on two topics take about 1.5 MB.

use super::report::{ClassCounts, ConflationCounts, NORMAL, SLOW};
use crate::client::Sink;
use crate::clock::Anchor;
use crate::hist::Hist;
use crate::storm::envelope::Envelope;
use crate::storm::track::TopicTrack;
use crate::wire::ShardReport;
use corecast::proto::OpCode;
use std::time::Instant;

/// A marker waiting for the publication it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Marker {
    topic: usize,
    epoch: u64,
    seq: u64,
    /// Conflation: numbers replaced; a snapshot replaces none.
    replaced: u64,
    snapshot: bool,
}

/// One subscriber.
#[derive(Debug, Clone, Copy, Default)]
struct Sub {
    /// Followed: it was up when the phase began.
    followed: bool,
    slow: bool,
    had_gap: bool,
    had_duplicate: bool,
    marker: Option<Marker>,
}

/// Every subscriber of a shard; subscriber `i` is connection token `i`.
pub struct Subscribers {
    topics: Vec<String>,
    anchor: Anchor,
    subs: Vec<Sub>,
    /// `tracks[i * topics + t]`.
    tracks: Vec<TopicTrack>,
    /// `[normal, slow]`.
    classes: [ClassCounts; 2],
    staleness: [Hist; 2],
    /// Data frames received, both classes.
    pub frames: u64,
}

impl Subscribers {
    /// `live[i]`: subscriber `i` was up; `slow[i]`: it reads slowly.
    pub fn new(live: &[bool], slow: &[bool], topics: Vec<String>, anchor: Anchor) -> Self {
        let subs: Vec<Sub> = live
            .iter()
            .zip(slow)
            .map(|(&followed, &slow)| Sub {
                followed,
                slow,
                ..Sub::default()
            })
            .collect();
        let mut classes: [ClassCounts; 2] = Default::default();
        for s in subs.iter().filter(|s| s.followed) {
            classes[class(s)].subscribers += 1;
        }
        Self {
            tracks: vec![TopicTrack::default(); subs.len() * topics.len()],
            topics,
            anchor,
            subs,
            classes,
            staleness: Default::default(),
            frames: 0,
        }
    }

    /// The followed slow subscribers (their connection tokens).
    pub fn slow_tokens(&self) -> Vec<usize> {
        (0..self.subs.len())
            .filter(|&i| self.subs[i].followed && self.subs[i].slow)
            .collect()
    }

    fn topic_index(&self, name: &[u8]) -> Option<usize> {
        self.topics.iter().position(|t| t.as_bytes() == name)
    }

    fn unexpected(&mut self, k: usize, what: &str) {
        *self.classes[k]
            .unexpected
            .entry(what.to_string())
            .or_default() += 1;
    }

    /// How far each open subscriber's topics are behind `published`
    /// (the publisher's count per topic), in numbers.
    fn behind(
        &self,
        is_live: &impl Fn(usize) -> bool,
        published: &[u64],
    ) -> [super::report::Behind; 2] {
        let t_n = self.topics.len();
        let mut out: [super::report::Behind; 2] = Default::default();
        for (i, s) in self.subs.iter().enumerate() {
            if !s.followed || !is_live(i) {
                continue;
            }
            for t in 0..t_n {
                let want = published.get(t).copied().unwrap_or(0);
                out[class(s)].record(want.saturating_sub(self.tracks[i * t_n + t].index));
            }
        }
        out
    }

    /// Publishing is over (`published` per topic): how far behind each
    /// open subscriber is now.
    pub fn publishing_over(&mut self, is_live: impl Fn(usize) -> bool, published: &[u64]) {
        let b = self.behind(&is_live, published);
        for k in [NORMAL, SLOW] {
            self.classes[k].behind_at_publish_end = b[k];
        }
    }

    /// Has every open followed subscriber every topic's last publication?
    pub fn settled(&self, is_live: impl Fn(usize) -> bool, published: &[u64]) -> bool {
        self.behind(&is_live, published)
            .iter()
            .all(|b| b.behind == 0)
    }

    /// The end of the phase: how far behind each open subscriber is, who
    /// ended, and everything into `r`.
    pub fn finish(
        &mut self,
        is_live: impl Fn(usize) -> bool,
        published: &[u64],
        r: &mut ShardReport,
    ) {
        let b = self.behind(&is_live, published);
        let t_n = self.topics.len();
        for (i, s) in self.subs.iter().enumerate().filter(|(_, s)| s.followed) {
            let c = &mut self.classes[class(s)];
            r.tracked += 1;
            c.subscribers_with_gaps += u64::from(s.had_gap);
            c.subscribers_with_duplicates += u64::from(s.had_duplicate);
            if !is_live(i) {
                c.ended += 1;
                continue;
            }
            let complete = (0..t_n)
                .all(|t| self.tracks[i * t_n + t].index >= published.get(t).copied().unwrap_or(0));
            if complete {
                r.complete += 1;
            } else {
                c.tail_incomplete += 1;
            }
        }
        let mut all = Hist::default();
        for k in [NORMAL, SLOW] {
            let c = &mut self.classes[k];
            c.behind_at_end = b[k];
            c.staleness = self.staleness[k].to_wire();
            all.add_wire(&c.staleness);
            r.malformed += c.malformed;
            r.duplicates += c.duplicates;
            r.lost += c.gaps + c.behind_at_end.sum;
        }
        r.frames = self.frames;
        r.latency = all.to_wire();
        r.conflation = ConflationCounts {
            classes: self.classes.clone(),
        };
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
        let k = class(&self.subs[i]);
        let (replaced, last_value) = match self.subs[i].marker.take() {
            Some(m) if m.topic == t && m.epoch == epoch && m.seq == seq => (m.replaced, m.snapshot),
            Some(_) => {
                self.unexpected(k, "marker_not_followed_by_its_publication");
                (0, false)
            }
            None => (0, false),
        };
        let t_n = self.topics.len();
        let seen = self.tracks[i * t_n + t].publication(epoch, seq, replaced, header.map(|h| h.0));
        let c = &mut self.classes[k];
        c.publications += 1;
        c.gaps += seen.gap;
        c.conflated += seen.conflated;
        c.duplicates += u64::from(seen.duplicate);
        c.epoch_changes += u64::from(seen.new_epoch);
        let s = &mut self.subs[i];
        s.had_gap |= seen.gap > 0;
        s.had_duplicate |= seen.duplicate;
        match header {
            None => c.no_header += 1,
            Some((_, sent_ns)) if !seen.duplicate && !last_value => {
                self.staleness[k].record_ns(self.anchor.ns(at).saturating_sub(sent_ns));
            }
            Some(_) => {}
        }
    }
}

/// The class index of a subscriber.
fn class(s: &Sub) -> usize {
    if s.slow { SLOW } else { NORMAL }
}

impl Sink for Subscribers {
    fn message(&mut self, token: usize, opcode: OpCode, payload: &[u8], at: Instant) {
        let Some(&s) = self.subs.get(token).filter(|s| s.followed) else {
            return;
        };
        let k = class(&s);
        self.frames += 1;
        self.classes[k].frames += 1;
        let (topic, marker) = match Envelope::parse(opcode, payload) {
            Envelope::Pub {
                topic,
                epoch,
                seq,
                header,
            } => {
                match self.topic_index(&topic) {
                    Some(t) => self.publication(token, t, (epoch, seq), header, at),
                    None => self.unexpected(k, "publication_of_another_topic"),
                }
                return;
            }
            Envelope::Snapshot { topic, epoch, seq } => {
                self.classes[k].snapshots += 1;
                (
                    topic,
                    Marker {
                        topic: 0,
                        epoch,
                        seq,
                        replaced: 0,
                        snapshot: true,
                    },
                )
            }
            Envelope::Conflated {
                topic,
                epoch,
                seq,
                replaced,
            } => {
                self.classes[k].markers += 1;
                self.classes[k].replaced += replaced;
                (
                    topic,
                    Marker {
                        topic: 0,
                        epoch,
                        seq,
                        replaced,
                        snapshot: false,
                    },
                )
            }
            Envelope::Subscribed { .. } => return self.unexpected(k, "reply_not_asked_for"),
            Envelope::Error { .. } => return self.unexpected(k, "error_reply"),
            Envelope::Other(what) => return self.unexpected(k, &what),
            Envelope::Malformed => {
                self.classes[k].malformed += 1;
                return;
            }
        };
        let Some(t) = self.topic_index(&topic) else {
            return self.unexpected(k, "marker_of_another_topic");
        };
        if self.subs[token].marker.is_some() {
            self.unexpected(k, "marker_not_followed_by_its_publication");
        }
        self.subs[token].marker = Some(Marker { topic: t, ..marker });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::encode_payload_header;
    use corecast::pubsub::envelope::{Form, binary_frame, conflated_marker, json_frame};
    use std::time::Duration;

    fn body(frame: &[u8]) -> Vec<u8> {
        let h = corecast::proto::frame::parse_header(frame)
            .unwrap()
            .unwrap();
        frame[h.header_len..].to_vec()
    }

    fn opcode(form: Form) -> OpCode {
        if form == Form::Json {
            OpCode::Text
        } else {
            OpCode::Binary
        }
    }

    /// A publication of `topic`, number `seq`, publisher's number `n`, sent at `sent_ns`.
    fn publ(form: Form, topic: &str, seq: u64, n: u64, sent_ns: u64) -> Vec<u8> {
        let mut p = encode_payload_header(n, sent_ns).to_vec();
        p.resize(40, 0);
        match form {
            Form::Binary => body(&binary_frame(topic, 9, seq, OpCode::Binary, &p)),
            _ => body(&json_frame(topic, 9, seq, OpCode::Binary, &p)),
        }
    }

    #[test]
    fn staleness_markers_and_continuity_by_class() {
        for form in [Form::Json, Form::Binary] {
            let anchor = Anchor::now();
            let t0 = Instant::now();
            let ns0 = anchor.ns(t0);
            let op = opcode(form);
            // 0 normal, 1 slow, 2 never up.
            let mut s = Subscribers::new(
                &[true, true, false],
                &[false, true, true],
                vec!["a".into(), "b".into()],
                anchor,
            );
            assert_eq!(s.slow_tokens(), [1]);
            let at = |ms| t0 + Duration::from_millis(ms);
            // Normal: a 1..=4 (publisher's 0..=3), each received 2 ms after it was sent.
            for seq in 1..=4 {
                s.message(0, op, &publ(form, "a", seq, seq - 1, ns0), at(2));
            }
            // Slow: a 1, then a marker: 4 replaced 2 and 3, received 50 ms late.
            s.message(1, op, &publ(form, "a", 1, 0, ns0), at(10));
            let m = conflated_marker(form, "a", 9, 4, 2).unwrap();
            s.message(1, op, &body(&m), at(50));
            s.message(1, op, &publ(form, "a", 4, 3, ns0), at(50));
            // Slow on b: 1, then 3 without a marker (a gap), then 3 again (a duplicate).
            for seq in [1, 3, 3] {
                s.message(1, op, &publ(form, "b", seq, seq - 1, ns0), at(60));
            }
            s.message(2, op, &publ(form, "a", 1, 0, ns0), at(1)); // not followed
            let (n, sl) = (&s.classes[NORMAL], &s.classes[SLOW]);
            assert_eq!((n.publications, n.gaps, n.markers), (4, 0, 0));
            assert_eq!((sl.markers, sl.replaced, sl.conflated), (1, 2, 2));
            assert_eq!((sl.gaps, sl.duplicates), (1, 1));
            assert_eq!(sl.frames, 6);
            assert_eq!(s.staleness[NORMAL].len(), 4);
            assert_eq!(s.staleness[NORMAL].max_ns().unwrap() / 1_000_000, 2);
            assert_eq!(s.staleness[SLOW].len(), 4, "the duplicate is no sample");
            assert_eq!(s.staleness[SLOW].max_ns().unwrap() / 1_000_000, 60);
            // Published: a 4, b 3. Normal lacks b entirely; slow has both.
            s.publishing_over(|_| true, &[4, 3]);
            assert_eq!(s.classes[NORMAL].behind_at_publish_end.sum, 3);
            assert_eq!(s.classes[SLOW].behind_at_publish_end.behind, 0);
            assert!(!s.settled(|_| true, &[4, 3]));
            assert!(s.settled(|t| t != 0, &[4, 3]), "0's connection is gone");
            let mut r = ShardReport::default();
            s.finish(|_| true, &[4, 3], &mut r);
            let c = &r.conflation.classes;
            assert_eq!((r.tracked, r.complete), (2, 1));
            assert_eq!((c[NORMAL].tail_incomplete, c[SLOW].tail_incomplete), (1, 0));
            assert_eq!(
                (c[NORMAL].behind_at_end.max, c[SLOW].subscribers_with_gaps),
                (3, 1)
            );
            assert_eq!(r.duplicates, 1);
            assert_eq!(r.lost, 1 + 3, "a gap and three numbers behind");
        }
    }

    #[test]
    fn a_marker_must_name_the_next_publication_and_ended_subscribers_count() {
        let anchor = Anchor::now();
        let t0 = Instant::now();
        let mut s = Subscribers::new(&[true, true], &[false, false], vec!["a".into()], anchor);
        let m = body(&conflated_marker(Form::Json, "a", 9, 7, 3).unwrap());
        s.message(0, OpCode::Text, &publ(Form::Json, "a", 1, 0, 0), t0);
        s.message(0, OpCode::Text, &m, t0);
        // The next publication is 6, not 7: the marker does not account for it.
        s.message(0, OpCode::Text, &publ(Form::Json, "a", 6, 5, 0), t0);
        s.message(0, OpCode::Text, b"{garbage", t0);
        s.message(
            0,
            OpCode::Text,
            br#"{"op":"subscribed","topics":["a"]}"#,
            t0,
        );
        let c = &s.classes[NORMAL];
        assert_eq!(
            c.unexpected.get("marker_not_followed_by_its_publication"),
            Some(&1)
        );
        assert_eq!((c.gaps, c.conflated, c.malformed), (4, 0, 1));
        assert_eq!(c.unexpected_total(), 3);
        let mut r = ShardReport::default();
        s.finish(|t| t == 0, &[6], &mut r);
        let c = &r.conflation.classes[NORMAL];
        assert_eq!((c.subscribers, c.ended, c.tail_incomplete), (2, 1, 0));
        assert_eq!(c.behind_at_end.positions, 1);
    }
}
