//! Publish/subscribe: the fan-out engine and the pieces that need no I/O.
//!
//! | module | holds |
//! |---|---|
//! | [`topic`] | topic-name rules, `?topics=` lists |
//! | [`pattern`] | wildcard patterns (`*`, `>`) and the trie that matches them |
//! | [`envelope`] | one sequenced publication and its raw / JSON / binary frames |
//! | [`history`] | a topic's recent publications, recovery after `since` |
//! | [`policy`] | per-namespace history bounds and last value |
//! | [`control`] | subscriber control messages (JSON): parse, replies, errors |
//! | [`directory`] | process-wide topic → interested workers (atomic masks) |
//! | [`bus`] | cross-worker publication batches and wake-ups |
//! | [`shard`] | one worker's registry (topic → local subscribers) and outbox |
//! | [`remote`] | publications numbered by a cluster, into the fan-out |
//! | [`ledger`] | published frames shared by reference, each charged once to the buffer budget |
//!
//! See docs/ARCHITECTURE.md for the path of one publication.

pub mod bus;
pub mod control;
pub mod directory;
pub mod envelope;
pub mod history;
pub mod ledger;
pub mod pattern;
pub mod policy;
pub mod remote;
pub mod shard;
mod slots;
pub mod topic;
