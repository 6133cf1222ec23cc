//! Publish/subscribe: the pieces of the fan-out that need no I/O.
//!
//! | module | holds |
//! |---|---|
//! | [`topic`] | topic-name rules, `?topics=` lists |
//! | [`control`] | subscriber control messages (JSON): parse, replies, errors |
//!
//! The engine (per-worker registries, the cross-worker view of interest,
//! encode-once delivery) builds on these; see docs/ARCHITECTURE.md.

pub mod control;
pub mod topic;
