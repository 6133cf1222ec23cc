//! The numbering of this node's publications in a cluster (sans-IO: the
//! bridge performs each [`Step`] and reports how it went).
//!
//! A topic's one order is the stream's: every node publishes to the
//! topic's input subject, and JetStream stores one message at a time. Each
//! message carries its topic's epoch and number (`Corecast-Epoch`,
//! `Corecast-Seq`), which this node decides before publishing and the
//! stream checks: the publication names the stream sequence of the topic's
//! last stored message (`Nats-Expected-Last-Subject-Sequence`), and the
//! stream refuses it if another message of the topic was stored since
//! (another node published). So the numbers are the stream's order, with
//! no gap and no duplicate, whichever node publishes, and no protocol of
//! our own between nodes: the check is JetStream's.
//!
//! Per topic, one publication is in flight at a time (the next one's
//! expected sequence is the stream sequence the last one's acknowledgement
//! gives); the others wait in the topic's queue, in publish order. After
//! a refusal (another node published), the topic's last stored message is
//! read again (epoch, number, stream sequence) and the same publication is
//! numbered again. A topic with nothing stored starts a new epoch, which
//! the caller passes in (the wall clock in microseconds).
//!
//! Everything queued counts against one bound in bytes ([`Sequencer::push`]
//! refuses past it): what a node holds while NATS is slow or away.

use crate::pubsub::shard::ConnRef;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// What one queued publication costs besides its payload.
pub const PENDING_OVERHEAD_BYTES: usize = 128;

/// Who asked to be told the number a publication got: a WebSocket
/// publisher, or an HTTP one waiting for its answer (`worker`,
/// connection, and for HTTP the request it answers: a late reply must not
/// answer the connection's next request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckTo {
    pub worker: u32,
    pub conn: ConnRef,
    pub request: u32,
}

/// A publication made on this node, not yet stored by the stream.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Unique per publication of this node: the stream's duplicate check
    /// (`Nats-Msg-Id`) for a publication tried again after a timeout.
    pub id: Arc<str>,
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub text: bool,
    pub key: Option<Arc<str>>,
    pub ack: Option<AckTo>,
}

impl Pending {
    /// What it counts against the bound.
    pub fn cost(&self) -> usize {
        self.payload.len() + self.topic.len() + PENDING_OVERHEAD_BYTES
    }
}

/// A topic's last stored publication, as the stream has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Last {
    pub epoch: u64,
    pub seq: u64,
    /// Its sequence in the stream (what the next publication expects).
    pub stream_seq: u64,
}

/// What the bridge is to do next for a topic.
#[derive(Debug, Clone)]
pub enum Step {
    /// Read the topic's last stored message, then call [`Sequencer::fetched`].
    FetchLast { topic: Arc<str> },
    /// Publish `items` (one, or several of the topic queued behind each
    /// other, as one stream message) numbered from (`epoch`, `seq`) on,
    /// expecting the topic's last stored message at stream sequence
    /// `expect` (0: none), then call [`Sequencer::acked`],
    /// [`Sequencer::conflict`] or [`Sequencer::failed`].
    Publish {
        items: Vec<Pending>,
        epoch: u64,
        seq: u64,
        expect: u64,
    },
}

/// A publication the stream stored, with its number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub ack: Option<AckTo>,
    pub epoch: u64,
    pub seq: u64,
    /// Its payload's length and what it counted against the bound.
    pub payload_len: usize,
    pub cost: usize,
}

#[derive(Debug, Default)]
struct TopicState {
    last: Option<Last>,
    queue: VecDeque<Pending>,
    /// A step is in flight (a fetch, or the publications at the queue's front).
    busy: bool,
    /// How many of the queue's first publications the publish in flight
    /// carries (0 while fetching).
    flight: usize,
    /// A publish that failed (NATS away, a timeout): the same publications
    /// go again together, so the stream recognises them (`Nats-Msg-Id`)
    /// if the first attempt was stored after all.
    retry: Option<usize>,
}

/// Most publications one stream message carries.
pub const MAX_BATCH: usize = 1024;

/// Every topic this node publishes to, while it has something queued (and
/// its last known position, kept for the next publication).
#[derive(Debug)]
pub struct Sequencer {
    topics: HashMap<Arc<str>, TopicState>,
    queued: usize,
    max_bytes: usize,
    /// Most payload bytes one stream message carries (under NATS's
    /// `max_payload`, with room for the headers).
    batch_bytes: usize,
    /// Topics gone idle since the last pass of [`Self::trim_idle`].
    idled: usize,
    /// Passes of [`Self::trim_idle`] over the topics (tests).
    #[cfg(test)]
    trims: usize,
}

/// Idle topics' positions kept (a node publishing to many topics once
/// each): past this many topics, the idle ones go.
const MAX_TOPICS: usize = 65_536;

impl Sequencer {
    /// A sequencer holding at most `max_bytes` of queued publications.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            topics: HashMap::new(),
            queued: 0,
            max_bytes,
            batch_bytes: 256 * 1024,
            idled: 0,
            #[cfg(test)]
            trims: 0,
        }
    }

    /// Sets how many payload bytes one stream message may carry.
    pub fn set_batch_bytes(&mut self, n: usize) {
        self.batch_bytes = n.max(1);
    }

    /// Bytes queued (payloads plus overhead), in flight included.
    pub fn queued_bytes(&self) -> usize {
        self.queued
    }

    /// Publications queued, in flight included.
    pub fn queued(&self) -> usize {
        self.topics.values().map(|t| t.queue.len()).sum()
    }

    /// Queues `item`; returns the step to take now, if its topic was idle.
    /// Past the bound, gives the publication back (the caller refuses it).
    pub fn push(&mut self, item: Pending) -> Result<Option<Step>, Pending> {
        let cost = item.cost();
        if self.queued + cost > self.max_bytes {
            return Err(item);
        }
        self.queued += cost;
        let batch = self.batch_bytes;
        let t = self.topics.entry(Arc::clone(&item.topic)).or_default();
        t.queue.push_back(item);
        Ok(Self::next(t, batch))
    }

    /// The step an idle topic takes next, if it has work: the publications
    /// queued (up to [`MAX_BATCH`] and `batch` bytes, at least one) go as
    /// one stream message, numbered together.
    fn next(t: &mut TopicState, batch: usize) -> Option<Step> {
        if t.busy {
            return None;
        }
        let front = t.queue.front()?;
        t.busy = true;
        Some(match t.last {
            None => Step::FetchLast {
                topic: Arc::clone(&front.topic),
            },
            Some(last) => {
                let n = t.retry.unwrap_or_else(|| {
                    let mut bytes = 0;
                    t.queue
                        .iter()
                        .take(MAX_BATCH)
                        .take_while(|p| {
                            bytes += p.payload.len() + 16;
                            bytes <= batch
                        })
                        .count()
                        .max(1)
                });
                let n = n.min(t.queue.len());
                t.flight = n;
                Step::Publish {
                    items: t.queue.iter().take(n).cloned().collect(),
                    epoch: last.epoch,
                    seq: last.seq + 1,
                    expect: last.stream_seq,
                }
            }
        })
    }

    /// The topic's last stored message was read: `None`, nothing is
    /// stored, so its numbering starts again in `new_epoch`.
    pub fn fetched(&mut self, topic: &str, last: Option<Last>, new_epoch: u64) -> Option<Step> {
        let batch = self.batch_bytes;
        let t = self.topics.get_mut(topic)?;
        t.busy = false;
        t.last = Some(last.unwrap_or(Last {
            epoch: new_epoch,
            seq: 0,
            stream_seq: 0,
        }));
        Self::next(t, batch)
    }

    /// The publications in flight for `topic` were stored (as one message)
    /// at `stream_seq`: each with its number.
    pub fn acked(&mut self, topic: &str, stream_seq: u64) -> (Vec<Stored>, Option<Step>) {
        let batch = self.batch_bytes;
        let Some(t) = self.topics.get_mut(topic) else {
            return (Vec::new(), None);
        };
        t.busy = false;
        t.retry = None;
        let n = std::mem::take(&mut t.flight).min(t.queue.len());
        let Some(last) = t.last.filter(|_| n > 0) else {
            return (Vec::new(), Self::next(t, batch));
        };
        let mut stored = Vec::with_capacity(n);
        for (i, item) in t.queue.drain(..n).enumerate() {
            self.queued -= item.cost();
            stored.push(Stored {
                ack: item.ack,
                epoch: last.epoch,
                seq: last.seq + 1 + i as u64,
                payload_len: item.payload.len(),
                cost: item.cost(),
            });
        }
        t.last = Some(Last {
            epoch: last.epoch,
            seq: last.seq + n as u64,
            stream_seq,
        });
        let step = Self::next(t, batch);
        if step.is_none() && t.queue.is_empty() {
            // Kept while idle: the next publication skips the fetch. (A
            // stale position costs one refusal and a fetch, never a wrong
            // number.)
            self.trim_idle();
        }
        (stored, step)
    }

    /// The stream refused the publications in flight: the topic moved on
    /// (another node published, or the stream forgot it). Read its last
    /// message again; they stay first in line (and may go with more).
    pub fn conflict(&mut self, topic: &str) -> Option<Step> {
        let batch = self.batch_bytes;
        let t = self.topics.get_mut(topic)?;
        t.busy = false;
        t.flight = 0;
        t.retry = None;
        t.last = None;
        Self::next(t, batch)
    }

    /// The publications in flight for `topic` can never be stored (too
    /// large for NATS): they leave the queue; the next ones start.
    pub fn drop_front(&mut self, topic: &str) -> (Vec<Pending>, Option<Step>) {
        let batch = self.batch_bytes;
        let Some(t) = self.topics.get_mut(topic) else {
            return (Vec::new(), None);
        };
        t.busy = false;
        t.retry = None;
        let n = std::mem::take(&mut t.flight).clamp(1, t.queue.len().max(1));
        let items: Vec<Pending> = t.queue.drain(..n.min(t.queue.len())).collect();
        for i in &items {
            self.queued -= i.cost();
        }
        (items, Self::next(t, batch))
    }

    /// The stream says it had stored the publications in flight already (an
    /// earlier attempt reached it): they leave the queue, and the topic's
    /// position is read again before the next ones.
    pub fn stored_before(&mut self, topic: &str) -> (Vec<Pending>, Option<Step>) {
        if let Some(t) = self.topics.get_mut(topic) {
            t.last = None;
        }
        self.drop_front(topic)
    }

    /// The step in flight for `topic` failed for want of NATS (disconnected,
    /// timed out): its publications stay first in line until
    /// [`Self::resume`], and go again together.
    pub fn failed(&mut self, topic: &str) {
        if let Some(t) = self.topics.get_mut(topic) {
            t.busy = false;
            if t.flight > 0 {
                t.retry = Some(std::mem::take(&mut t.flight));
            }
            // A timed-out publication may have been stored after all: its
            // number is checked again against the stream before reuse.
            t.last = None;
        }
    }

    /// The steps of every idle topic with something queued (after NATS is
    /// back).
    pub fn resume(&mut self) -> Vec<Step> {
        let batch = self.batch_bytes;
        self.topics
            .values_mut()
            .filter_map(|t| Self::next(t, batch))
            .collect()
    }

    /// Gives up on everything queued (the process stops): the publications
    /// lost, each with whom to tell.
    pub fn abandon(&mut self) -> Vec<Pending> {
        self.queued = 0;
        self.topics
            .drain()
            .flat_map(|(_, t)| t.queue.into_iter())
            .collect()
    }

    /// A topic went idle: keeps the positions of idle topics bounded (a
    /// node publishing to many topics once each): past [`MAX_TOPICS`], the
    /// idle ones go, in a pass over all topics once an eighth of them went
    /// idle since the last. So the passes stay linear in all: after an
    /// outage every topic may be busy at once, and a pass per
    /// acknowledgement, each over all of them and freeing one, would be
    /// quadratic.
    fn trim_idle(&mut self) {
        self.idled += 1;
        if self.topics.len() > MAX_TOPICS && self.idled >= self.topics.len() / 8 {
            self.topics.retain(|_, t| t.busy || !t.queue.is_empty());
            self.idled = 0;
            #[cfg(test)]
            {
                self.trims += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(topic: &str, p: &[u8]) -> Pending {
        Pending {
            id: Arc::from("x"),
            topic: Arc::from(topic),
            payload: Bytes::copy_from_slice(p),
            text: false,
            key: None,
            ack: None,
        }
    }

    /// The payloads, first number and expected stream sequence of a publish.
    fn publish(step: Option<Step>) -> (Vec<Bytes>, u64, u64, u64) {
        match step {
            Some(Step::Publish {
                items,
                epoch,
                seq,
                expect,
            }) => (
                items.into_iter().map(|i| i.payload).collect(),
                epoch,
                seq,
                expect,
            ),
            other => panic!("expected a publish, got {other:?}"),
        }
    }

    fn b(p: &'static [u8]) -> Bytes {
        Bytes::from_static(p)
    }

    #[test]
    fn one_in_flight_per_topic_numbered_from_the_stream_the_queued_together() {
        let mut s = Sequencer::new(1 << 20);
        assert!(matches!(
            s.push(item("a", b"1")),
            Ok(Some(Step::FetchLast { .. }))
        ));
        assert!(matches!(s.push(item("a", b"2")), Ok(None)), "a is busy");
        // Another topic does not wait for a.
        assert!(matches!(
            s.push(item("b", b"x")),
            Ok(Some(Step::FetchLast { .. }))
        ));
        let last = Last {
            epoch: 7,
            seq: 41,
            stream_seq: 900,
        };
        // Both queued go as one message, numbered 42 and 43.
        assert_eq!(
            publish(s.fetched("a", Some(last), 99)),
            (vec![b(b"1"), b(b"2")], 7, 42, 900)
        );
        assert!(matches!(s.push(item("a", b"3")), Ok(None)), "a is busy");
        let (stored, next) = s.acked("a", 1000);
        assert_eq!(
            stored
                .iter()
                .map(|s| (s.epoch, s.seq, s.payload_len))
                .collect::<Vec<_>>(),
            [(7, 42, 1), (7, 43, 1)]
        );
        assert_eq!(publish(next), (vec![b(b"3")], 7, 44, 1000));
        let (_, next) = s.acked("a", 1003);
        assert!(next.is_none());
        // Idle, its position kept: no fetch for the next one.
        assert_eq!(
            publish(s.push(item("a", b"4")).unwrap()),
            (vec![b(b"4")], 7, 45, 1003)
        );
        // Nothing stored of b: a new epoch from 1, expecting nothing.
        assert_eq!(publish(s.fetched("b", None, 99)), (vec![b(b"x")], 99, 1, 0));
    }

    /// After an outage every topic may be in flight at once: their
    /// acknowledgements then trim the idle positions a few times, not once
    /// each over every topic (quadratic), and the idle ones still go.
    #[test]
    fn many_busy_topics_are_trimmed_in_linear_time() {
        let n = MAX_TOPICS + 5_000;
        let mut s = Sequencer::new(1 << 30);
        let names: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
        for name in &names {
            assert!(matches!(
                s.push(item(name, b"x")),
                Ok(Some(Step::FetchLast { .. }))
            ));
        }
        let last = Last {
            epoch: 1,
            seq: 0,
            stream_seq: 0,
        };
        for name in &names {
            publish(s.fetched(name, Some(last), 1));
        }
        for (i, name) in names.iter().enumerate() {
            let (stored, next) = s.acked(name, i as u64 + 1);
            assert_eq!(stored.len(), 1);
            assert!(next.is_none());
        }
        assert!(s.trims <= 16, "{} passes over the topics", s.trims);
        assert!(
            s.topics.len() <= MAX_TOPICS + n / 8,
            "idle positions bounded: {}",
            s.topics.len()
        );
    }

    #[test]
    fn a_batch_stays_within_its_bytes_and_count() {
        let mut s = Sequencer::new(1 << 30);
        s.set_batch_bytes(100);
        s.push(item("a", &[0; 10])).unwrap();
        for _ in 0..9 {
            s.push(item("a", &[0; 30])).unwrap();
        }
        let (items, ..) = publish(s.fetched(
            "a",
            Some(Last {
                epoch: 1,
                seq: 0,
                stream_seq: 0,
            }),
            0,
        ));
        // 10 + 16, then 30 + 16 twice = 118 > 100: two fit.
        assert_eq!(items.len(), 2);
        let (stored, next) = s.acked("a", 5);
        assert_eq!(stored.len(), 2);
        assert_eq!(publish(next).0.len(), 2);
        // A single publication over the bytes still goes, alone.
        let mut s = Sequencer::new(1 << 30);
        s.set_batch_bytes(10);
        s.push(item("a", &[0; 50])).unwrap();
        s.push(item("a", &[0; 50])).unwrap();
        let (items, ..) = publish(s.fetched(
            "a",
            Some(Last {
                epoch: 1,
                seq: 0,
                stream_seq: 0,
            }),
            0,
        ));
        assert_eq!(items.len(), 1);
        // At most MAX_BATCH.
        let mut s = Sequencer::new(1 << 30);
        for _ in 0..MAX_BATCH + 5 {
            s.push(item("a", b"")).unwrap();
        }
        let (items, ..) = publish(s.fetched(
            "a",
            Some(Last {
                epoch: 1,
                seq: 0,
                stream_seq: 0,
            }),
            0,
        ));
        assert_eq!(items.len(), MAX_BATCH);
    }

    #[test]
    fn a_refusal_renumbers_the_same_publications_after_a_fetch() {
        let mut s = Sequencer::new(1 << 20);
        s.push(item("a", b"1")).unwrap();
        let _ = s.fetched(
            "a",
            Some(Last {
                epoch: 7,
                seq: 1,
                stream_seq: 10,
            }),
            0,
        );
        s.push(item("a", b"2")).unwrap();
        // Another node stored number 2 first.
        assert!(matches!(s.conflict("a"), Some(Step::FetchLast { .. })));
        let step = s.fetched(
            "a",
            Some(Last {
                epoch: 7,
                seq: 2,
                stream_seq: 11,
            }),
            0,
        );
        assert_eq!(publish(step), (vec![b(b"1"), b(b"2")], 7, 3, 11));
        let (stored, next) = s.acked("a", 12);
        assert_eq!(stored.iter().map(|s| s.seq).collect::<Vec<_>>(), [3, 4]);
        assert!(next.is_none());
    }

    #[test]
    fn a_failure_waits_for_resume_and_retries_the_same_batch_after_checking_the_position() {
        let mut s = Sequencer::new(1 << 20);
        s.push(item("a", b"1")).unwrap();
        s.push(item("a", b"2")).unwrap();
        let (items, ..) = publish(s.fetched(
            "a",
            Some(Last {
                epoch: 7,
                seq: 1,
                stream_seq: 10,
            }),
            0,
        ));
        assert_eq!(items.len(), 2);
        s.failed("a");
        // More arrives meanwhile; the retry carries the same two.
        assert!(matches!(
            s.push(item("a", b"3")),
            Ok(Some(Step::FetchLast { .. }))
        ));
        s.failed("a");
        let steps = s.resume();
        assert_eq!(steps.len(), 1);
        assert!(matches!(steps[0], Step::FetchLast { .. }));
        assert!(s.resume().is_empty(), "already in flight");
        let (items, _, seq, _) = publish(s.fetched(
            "a",
            Some(Last {
                epoch: 7,
                seq: 1,
                stream_seq: 10,
            }),
            0,
        ));
        assert_eq!((items, seq), (vec![b(b"1"), b(b"2")], 2));
        // The stream had them already: they leave; the position is read again.
        let (gone, next) = s.stored_before("a");
        assert_eq!(gone.len(), 2);
        assert!(matches!(next, Some(Step::FetchLast { .. })));
        assert_eq!(s.queued(), 1);
    }

    #[test]
    fn the_bound_counts_payloads_until_stored() {
        let one = item("a", &[0; 100]).cost();
        let mut s = Sequencer::new(2 * one);
        s.push(item("a", &[0; 100])).unwrap();
        s.push(item("a", &[0; 100])).unwrap();
        assert!(s.push(item("b", &[0; 100])).is_err());
        assert_eq!(s.queued_bytes(), 2 * one);
        let _ = s.fetched("a", None, 5);
        let _ = s.acked("a", 1);
        assert_eq!(s.queued_bytes(), 0);
        s.push(item("b", &[0; 100])).unwrap();
        assert_eq!(s.abandon().len(), 1);
        assert_eq!(s.queued_bytes(), 0);
    }
}
