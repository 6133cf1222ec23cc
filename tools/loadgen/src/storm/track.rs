//! What one subscriber knows of one topic ([`TopicTrack`]: four numbers),
//! and how each publication and each recovery relates to it.
//!
//! corecast numbers a topic's publications 1, 2, 3, ... within an epoch,
//! strictly consecutive at each subscriber. So the next number expected is
//! always the last one plus one, across a drop too: after a reconnect with
//! `since` (the last epoch and number), the recovered publications
//! `from ..= to` and then the live ones must continue exactly from there.
//! Anything else is counted: numbers skipped that nothing announced (a
//! gap), numbers at or below the last (a duplicate), a new epoch no
//! recovery announced. What the server does announce is not a gap: an
//! incomplete recovery (`too_old`, `capped`: the numbers it says are lost;
//! `epoch`: a new numbering) and a conflation marker (`replaced` numbers).

use super::envelope::Recovery;

/// One subscriber's state for one topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopicTrack {
    /// Epoch of the last publication.
    pub epoch: u64,
    /// Number of the last publication (0: none yet, no position).
    pub seq: u64,
    /// During a recovery: `to + 1`, the first live number; 0 otherwise.
    live_from: u64,
    /// The publisher's number of the newest publication received, plus one
    /// (0: none): how far towards the end of publishing this topic got.
    pub index: u64,
}

/// How one publication relates to what the subscriber had.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    /// The first publication of the topic here (no position before).
    pub first: bool,
    /// Numbers skipped that nothing announced.
    pub gap: u64,
    /// Numbers skipped that a conflation marker accounted for.
    pub conflated: u64,
    /// A number at or below the last one in the same epoch.
    pub duplicate: bool,
    /// Another epoch, which no recovery announced.
    pub new_epoch: bool,
    /// Within the recovered range `from ..= to`.
    pub recovered: bool,
    /// The last recovered publication (`to`): the replay is over.
    pub replayed: bool,
    /// The first live publication after a recovery: caught up.
    pub caught_up: bool,
}

/// What a recovery said about a topic, against the subscriber's position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resumed {
    /// Numbers the reply itself says are lost (an incomplete recovery that
    /// starts past the position); 0 for a new epoch (unknown).
    pub announced_lost: u64,
    /// The reply names another epoch than the subscriber's.
    pub new_epoch: bool,
    /// Publications announced: `to - from + 1`, or 0.
    pub announced: u64,
}

impl TopicTrack {
    /// The position to resubscribe from: `(epoch, seq)`, if any.
    pub fn since(&self) -> Option<(u64, u64)> {
        (self.seq > 0).then_some((self.epoch, self.seq))
    }

    /// Is a recovery waiting for its first live publication?
    #[cfg(test)]
    pub fn recovering(&self) -> bool {
        self.live_from > 0
    }

    /// A publication `(epoch, seq)`; `replaced`: what a conflation marker
    /// just before it said it replaced (0 without one); `index`: the
    /// publisher's number in its payload.
    pub fn publication(&mut self, epoch: u64, seq: u64, replaced: u64, index: Option<u64>) -> Seen {
        let mut s = Seen::default();
        if let Some(i) = index {
            self.index = self.index.max(i.saturating_add(1));
        }
        if self.seq == 0 {
            s.first = true;
        } else if epoch != self.epoch {
            s.new_epoch = true;
            // The recovery's numbers meant the old epoch: no catching up
            // can be told now.
            self.live_from = 0;
        } else if seq <= self.seq {
            s.duplicate = true;
            s.recovered = self.live_from > 0;
            return s;
        } else {
            let skipped = seq - self.seq - 1;
            s.conflated = skipped.min(replaced);
            s.gap = skipped - s.conflated;
        }
        self.epoch = epoch;
        self.seq = seq;
        if self.live_from > 0 {
            if seq >= self.live_from {
                s.caught_up = true;
                self.live_from = 0;
            } else {
                s.recovered = true;
                s.replayed = seq + 1 == self.live_from;
            }
        }
        s
    }

    /// The recovery the `subscribed` reply gives for this topic (sent with
    /// [`TopicTrack::since`]). A new epoch starts a new numbering from
    /// `from`; an incomplete recovery that starts past the position moves
    /// the position to `from - 1` (the numbers between are announced lost,
    /// not a gap); a complete one leaves it, so that a `from` past the
    /// position still counts as a gap when its publication arrives.
    pub fn recovery(&mut self, r: &Recovery) -> Resumed {
        let mut out = Resumed {
            announced: if r.to >= r.from { r.to - r.from + 1 } else { 0 },
            ..Resumed::default()
        };
        if r.epoch != self.epoch {
            out.new_epoch = true;
            self.epoch = r.epoch;
            self.seq = r.from.saturating_sub(1);
        } else if !r.complete && r.from > self.seq.saturating_add(1) {
            out.announced_lost = r.from - self.seq - 1;
            self.seq = r.from - 1;
        }
        self.live_from = r.to.saturating_add(1);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(epoch: u64, from: u64, to: u64, reason: Option<&str>) -> Recovery {
        Recovery {
            epoch,
            from,
            to,
            complete: reason.is_none(),
            reason: reason.map(str::to_string),
        }
    }

    /// Feeds `seqs` of epoch `e`; returns what each was.
    fn feed(t: &mut TopicTrack, e: u64, seqs: impl IntoIterator<Item = u64>) -> Vec<Seen> {
        seqs.into_iter()
            .map(|s| t.publication(e, s, 0, Some(s)))
            .collect()
    }

    #[test]
    fn a_complete_recovery_continues_exactly_and_catches_up_on_the_first_live() {
        let mut t = TopicTrack::default();
        assert_eq!(t.since(), None);
        let seen = feed(&mut t, 7, 41..=50);
        assert!(seen[0].first);
        assert!(seen[1..].iter().all(|s| *s == Seen::default()));
        // Dropped at 50; 51..=60 were published meanwhile.
        assert_eq!(t.since(), Some((7, 50)));
        let r = t.recovery(&rec(7, 51, 60, None));
        assert_eq!((r.announced, r.announced_lost, r.new_epoch), (10, 0, false));
        assert!(t.recovering());
        let seen = feed(&mut t, 7, 51..=62);
        assert!(
            seen[..10]
                .iter()
                .all(|s| s.recovered && !s.caught_up && s.gap == 0)
        );
        assert!(seen[9].replayed && !seen[8].replayed);
        assert!(seen[10].caught_up && !seen[10].recovered);
        assert_eq!(seen[11], Seen::default());
        assert!(!t.recovering());
        assert_eq!(t.index, 63);
    }

    #[test]
    fn nothing_missed_catches_up_on_the_next_publication() {
        let mut t = TopicTrack::default();
        feed(&mut t, 1, 1..=5);
        assert_eq!(t.recovery(&rec(1, 6, 5, None)).announced, 0);
        assert!(feed(&mut t, 1, [6])[0].caught_up);
    }

    #[test]
    fn gaps_and_duplicates_across_the_drop() {
        // The server skips 51 though it says complete: one gap.
        let mut t = TopicTrack::default();
        feed(&mut t, 7, 1..=50);
        t.recovery(&rec(7, 52, 60, None));
        let s = feed(&mut t, 7, [52]);
        assert_eq!((s[0].gap, s[0].recovered), (1, true));
        // It replays 49 and 50, which the subscriber had: duplicates.
        let mut t = TopicTrack::default();
        feed(&mut t, 7, 1..=50);
        t.recovery(&rec(7, 49, 55, None));
        let s = feed(&mut t, 7, 49..=56);
        assert!(s[0].duplicate && s[1].duplicate && s[0].recovered);
        assert_eq!(
            s[2],
            Seen {
                recovered: true,
                ..Seen::default()
            }
        );
        assert!(s[6].replayed);
        assert!(s[7].caught_up);
        assert_eq!(s.iter().filter(|s| s.duplicate).count(), 2);
        // A live publication that skips: a gap, after catching up too.
        let s = feed(&mut t, 7, [59]);
        assert_eq!(s[0].gap, 2);
        assert!(feed(&mut t, 7, [59])[0].duplicate);
    }

    #[test]
    fn an_incomplete_recovery_announces_its_loss() {
        let mut t = TopicTrack::default();
        feed(&mut t, 7, 1..=50);
        // The history holds only 71..=170: 51..=70 are lost, and said so.
        let r = t.recovery(&rec(7, 71, 170, Some("too_old")));
        assert_eq!((r.announced_lost, r.announced), (20, 100));
        let s = feed(&mut t, 7, 71..=171);
        assert!(s.iter().all(|s| s.gap == 0 && !s.duplicate));
        assert!(s[100].caught_up);
        // Capped, yet starting where the subscriber is: nothing lost.
        let mut t = TopicTrack::default();
        feed(&mut t, 7, 1..=50);
        assert_eq!(
            t.recovery(&rec(7, 51, 52, Some("capped"))).announced_lost,
            0
        );
    }

    #[test]
    fn epochs_announced_or_not() {
        let mut t = TopicTrack::default();
        feed(&mut t, 7, 1..=50);
        // The topic was forgotten: epoch 8 numbers from 1.
        let r = t.recovery(&rec(8, 1, 3, Some("epoch")));
        assert!(r.new_epoch);
        let s = feed(&mut t, 8, 1..=4);
        assert!(s.iter().all(|s| !s.new_epoch && s.gap == 0 && !s.duplicate));
        assert!(s[3].caught_up);
        // Unannounced: counted, and the new numbering is the position.
        let s = feed(&mut t, 9, [1, 2]);
        assert!(s[0].new_epoch && !s[1].new_epoch);
        assert_eq!(t.since(), Some((9, 2)));
    }

    #[test]
    fn conflation_markers_account_for_what_they_replaced() {
        let mut t = TopicTrack::default();
        feed(&mut t, 1, 1..=10);
        let s = t.publication(1, 15, 4, None);
        assert_eq!((s.conflated, s.gap), (4, 0));
        // A marker that accounts for less than the skip: the rest is a gap.
        let s = t.publication(1, 20, 2, None);
        assert_eq!((s.conflated, s.gap), (2, 2));
        assert_eq!(t.index, 11, "payloads without a header leave the index");
    }
}
