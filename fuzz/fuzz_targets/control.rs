//! Arbitrary bytes as a subscriber control message (`pubsub::control::parse`,
//! its depth and surrogate-escape checks, then simd-json in place on a
//! mutable copy), and the replies built from it. Runs on a worker-sized
//! stack (`corecast_fuzz::on_worker_stack`), so a parse that would overflow a
//! worker crashes here.
//!
//! Input: one byte for `max_topic_len` (0..=255), one for `max_topics`
//! (0..=255), then the message.
//! Invariants:
//! - no panic; input over `MAX_CONTROL_BYTES` is refused without parsing;
//! - the depth check agrees with simd-json's own structure, read from its
//!   tape (built without recursion): valid JSON nested deeper than
//!   `MAX_CONTROL_DEPTH` is refused as too deep, valid JSON within it is
//!   not, and JSON simd-json finds too deep for itself is refused as too
//!   deep;
//! - an accepted message is valid JSON with valid, distinct topic names
//!   within both limits, and its reply is JSON naming the same op and
//!   topics;
//! - a refusal's reason survives `control::error` as a JSON string.
#![no_main]

use corecast::pubsub::control::{self, ControlError, MAX_CONTROL_BYTES, MAX_CONTROL_DEPTH, Op};
use corecast::pubsub::topic;
use corecast_fuzz::on_worker_stack;
use libfuzzer_sys::fuzz_target;
use simd_json::prelude::*;
use simd_json::{ErrorType, Node};

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    on_worker_stack(move || check(&data));
});

/// What simd-json makes of a message on its own.
#[derive(Debug)]
enum Structure {
    /// Valid JSON, arrays and objects nested this deep.
    Depth(usize),
    /// Nested deeper than simd-json's own limit.
    TooDeep,
    /// Not JSON.
    Invalid,
}

/// The message's structure from simd-json's tape: each array or object
/// node counts the nodes inside it, so depth is a walk with a stack of
/// where the open containers end. No recursion, independent of the depth
/// check under test.
fn structure(msg: &[u8]) -> Structure {
    let mut copy = msg.to_vec();
    let tape = match simd_json::to_tape(&mut copy) {
        Ok(tape) => tape,
        Err(e) if *e.error() == ErrorType::DepthLimitExceeded => return Structure::TooDeep,
        Err(_) => return Structure::Invalid,
    };
    let mut ends: Vec<usize> = Vec::new();
    let mut deepest = 0;
    for (i, node) in tape.0.iter().enumerate() {
        while ends.last().is_some_and(|&end| end <= i) {
            ends.pop();
        }
        if let Node::Array { count, .. } | Node::Object { count, .. } = node {
            ends.push(i + 1 + count);
            deepest = deepest.max(ends.len());
        }
    }
    Structure::Depth(deepest)
}

/// Checks one input (on a worker-sized stack).
fn check(data: &[u8]) {
    let [max_topic_len, max_topics, msg @ ..] = data else {
        return;
    };
    let limits = control::Limits {
        max_topic_len: *max_topic_len as usize,
        max_topics: *max_topics as usize,
        max_patterns: 16,
    };
    let mut buf = msg.to_vec();
    let result = control::parse(&mut buf, limits);
    if msg.len() > MAX_CONTROL_BYTES {
        assert_eq!(result, Err(ControlError::TooLarge));
        return;
    }
    let too_deep = result == Err(ControlError::TooDeep);
    match structure(msg) {
        Structure::Depth(d) => assert_eq!(
            too_deep,
            d > MAX_CONTROL_DEPTH,
            "valid JSON {d} deep, parse gave {result:?}"
        ),
        Structure::TooDeep => assert!(too_deep, "simd-json: too deep; parse gave {result:?}"),
        Structure::Invalid => assert!(result.is_err(), "invalid JSON accepted"),
    }
    match result {
        Ok(c) => {
            assert!(c.topics.len() <= limits.max_topics);
            assert!(
                c.since.is_empty() || c.since.len() == c.topics.len(),
                "since: one position per topic, or none"
            );
            assert!(c.since.is_empty() || c.op == Op::Subscribe);
            for (i, t) in c.topics.iter().enumerate() {
                assert!(topic::validate_subscription(t, limits.max_topic_len).is_ok());
                assert!(
                    c.op != Op::History || topic::validate(t, limits.max_topic_len).is_ok(),
                    "a history names topics only"
                );
                assert!(!c.topics[..i].contains(t), "duplicate topic {t:?}");
            }
            assert!(
                c.op != Op::Subscribe
                    || c.topics
                        .iter()
                        .filter(|t| corecast::pubsub::pattern::is_pattern(t))
                        .count()
                        <= limits.max_patterns,
                "a subscribe names at most max_patterns patterns"
            );
            assert!(c.pattern_since.len() <= corecast::pubsub::shard::PATTERN_REPLAY_TOPICS);
            for (t, _) in &c.pattern_since {
                assert_eq!(topic::validate(t, limits.max_topic_len), Ok(t.as_str()));
                assert!(
                    c.topics
                        .iter()
                        .any(|p| corecast::pubsub::pattern::matches(p, t)),
                    "a position through a pattern is matched by one: {t:?}"
                );
            }
            let mut reply = control::reply(c.op, &c.topics).into_bytes();
            let v = simd_json::to_borrowed_value(&mut reply).expect("reply is JSON");
            let want = match c.op {
                Op::Subscribe => "subscribed",
                Op::Unsubscribe => "unsubscribed",
                Op::History => "history",
                Op::Refresh => {
                    assert!(
                        c.token.is_some() && c.topics.is_empty(),
                        "a refresh has its token"
                    );
                    "refreshed"
                }
            };
            assert_eq!(v.get("op").and_then(|o| o.as_str()), Some(want));
            let topics: Vec<&str> = v
                .get("topics")
                .and_then(|t| t.as_array())
                .expect("reply has topics")
                .iter()
                .map(|t| t.as_str().expect("topic is a string"))
                .collect();
            assert_eq!(topics, c.topics);
        }
        Err(e) => {
            let reason = e.to_string();
            let mut reply = control::error(&reason).into_bytes();
            let v = simd_json::to_borrowed_value(&mut reply).expect("error reply is JSON");
            assert_eq!(v.get("op").and_then(|o| o.as_str()), Some("error"));
            assert_eq!(
                v.get("reason").and_then(|r| r.as_str()),
                Some(reason.as_str())
            );
        }
    }
}
