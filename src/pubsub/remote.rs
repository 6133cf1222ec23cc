//! Publications numbered elsewhere: the fan-out's side of a cluster.
//!
//! In a cluster (`--nats-url`) a topic's one order is decided by the
//! cluster's sequencer (JetStream, see `server/cluster/`), not by the
//! topic's order lock here. Workers then hand their publications to the
//! [`Link`] instead of numbering them (`Shard::dispatch`), and every
//! publication, this process's own included, comes back through
//! [`inject_batch`] with its epoch and number, in the cluster's order. From
//! there on it takes the path of a local one: under the topic's order
//! lock it becomes the topic's newest number, goes to the mailbox of every
//! worker interested then, and into the topic's history, so floors,
//! joiners, recovery and patterns work as on one machine.

use super::bus::{Bus, Publication, order_stripe};
use super::directory::{Adopt, Directory};
use super::envelope::Message;
use super::shard::ConnRef;
use std::fmt;
use std::sync::Arc;

/// What the fan-out needs from a cluster (implemented by the server's
/// NATS bridge). Both calls are made on worker threads and must not block.
pub trait Link: Send + Sync + fmt::Debug {
    /// The process may have gained or lost its interest in `name` (a
    /// topic, or a pattern when `pattern`): the link reads the directory
    /// again ([`Directory::topic_held`], [`Directory::pattern_held`]).
    fn interest_changed(&self, name: &str, pattern: bool);

    /// A recovery here needs `name`'s history, which this process has not
    /// filled from the cluster yet ([`TopicInterest::is_warm`](super::directory::TopicInterest::is_warm)):
    /// the link fills it (and follows the topic a while meanwhile); the
    /// caller answers "try again". `false`: the link has as many waiting
    /// as it takes at once, and `name` was not taken (try again later).
    fn warm(&self, name: &str) -> bool;

    /// A publication made on `worker` to `topic`, for the cluster to
    /// number and deliver everywhere, this process included. `ack`: the
    /// publisher to tell the number (through the worker's replies).
    /// Refused: the caller counts it and tells the publisher.
    fn publish(
        &self,
        topic: &Arc<str>,
        msg: &Message,
        ack: Option<(usize, ConnRef)>,
    ) -> Result<(), Refused>;
}

/// Why a cluster link did not take a publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The link holds all it may (the cluster is slow or unreachable).
    Busy,
    /// Larger than one message of the cluster's transport.
    TooLarge,
}

/// Fills the history of `name` here with `older` (oldest first, in the
/// cluster's order, read from its stream) and marks it warm: a recovery
/// here may then use it. Nothing is delivered: they were published before
/// anyone here followed the topic. A topic nothing was numbered for here
/// yet takes the newest of them as its position (what arrives live after
/// it follows on). `false`: nobody here holds the topic.
pub fn fill(directory: &Directory, bus: &Bus, name: &str, older: Vec<Message>) -> bool {
    let Some(topic) = directory.get(name) else {
        return false;
    };
    {
        let _order = bus.hold_order(1u64 << order_stripe(Arc::as_ptr(&topic)));
        if topic.seq() == 0
            && let Some(newest) = older.last()
        {
            let _ = topic.adopt(newest.epoch, newest.seq);
        }
        let older: Vec<Arc<Message>> = older
            .into_iter()
            .map(|mut m| {
                m.topic = Some(Arc::clone(topic.name_arc()));
                Arc::new(m)
            })
            .collect();
        directory.fill_history(&topic, older, std::time::Instant::now());
        topic.set_warm();
    }
    directory.release(topic);
    true
}

/// What [`inject_batch`] did: the workers to wake (bit `w`) and how the
/// numbers followed on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Injection {
    pub wakes: u64,
    pub duplicates: usize,
    pub gaps: usize,
    pub restarts: usize,
    pub lost: usize,
}

/// [`inject_batch`] for several publications at once (in the cluster's order
/// per topic), with one send per interested worker for all of them: a
/// worker then delivers a burst as runs, not one publication per turn.
/// Each is numbered, recorded and its targets read under its topic's order
/// lock; the sends follow (this thread is the only one that sends in a
/// cluster, and each mailbox is FIFO, so every worker receives each topic
/// in order; a worker whose interest starts between the two has its floor
/// past the number, or was among the targets).
pub fn inject_batch(directory: &Directory, bus: &Bus, items: Vec<(String, Message)>) -> Injection {
    let mut done = Injection::default();
    let mut batches: Vec<Vec<Publication>> = (0..bus.workers()).map(|_| Vec::new()).collect();
    for (name, mut msg) in items {
        let topic = directory.get(&name).or_else(|| {
            directory
                .pattern_matches(&name)
                .then(|| directory.entry(&name))
        });
        let Some(topic) = topic else {
            continue;
        };
        {
            let _order = bus.hold_order(1u64 << order_stripe(Arc::as_ptr(&topic)));
            match topic.adopt(msg.epoch, msg.seq) {
                Adopt::Old => done.duplicates += 1,
                step => {
                    match step {
                        Adopt::Gap => done.gaps += 1,
                        Adopt::Restart => done.restarts += 1,
                        _ => {}
                    }
                    if step != Adopt::Next {
                        directory.clear_history(&topic);
                    }
                    msg.topic = Some(Arc::clone(topic.name_arc()));
                    let msg = Arc::new(msg);
                    let mut targets = directory.targets(&topic);
                    while targets != 0 {
                        let w = targets.trailing_zeros() as usize;
                        targets &= targets - 1;
                        batches[w].push(Publication::new(Arc::downgrade(&topic), Arc::clone(&msg)));
                    }
                    directory.record(&topic, &msg);
                }
            }
        }
        directory.release(topic);
    }
    for (w, batch) in batches.into_iter().enumerate() {
        if batch.is_empty() {
            continue;
        }
        match bus.send(w, batch) {
            Ok(wake) => done.wakes |= u64::from(wake) << w,
            Err(n) => done.lost += n,
        }
    }
    done
}
