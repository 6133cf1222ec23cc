//! Arbitrary bytes as a subscriber control message (`pubsub::control::parse`,
//! simd-json in place on a mutable copy), and the replies built from it.
//!
//! Input: one byte for `max_topic_len` (0..=255), then the message.
//! Invariants:
//! - no panic; input over `MAX_CONTROL_BYTES` is refused without parsing;
//! - an accepted message has valid, distinct topic names within the limit,
//!   and its reply is JSON naming the same op and topics;
//! - a refusal's reason survives `control::error` as a JSON string.
#![no_main]

use corecast::pubsub::control::{self, MAX_CONTROL_BYTES, Op};
use corecast::pubsub::topic;
use corecast_fuzz::on_worker_stack;
use libfuzzer_sys::fuzz_target;
use simd_json::prelude::*;

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    on_worker_stack(move || check(&data));
});

/// Checks one input (on a worker-sized stack).
fn check(data: &[u8]) {
    let Some((&max_topic_len, msg)) = data.split_first() else {
        return;
    };
    let max_topic_len = max_topic_len as usize;
    let mut buf = msg.to_vec();
    let limits = control::Limits {
        max_topic_len,
        max_topics: topic::DEFAULT_MAX_TOPICS_PER_CONN,
    };
    match control::parse(&mut buf, limits) {
        Ok(c) => {
            assert!(msg.len() <= MAX_CONTROL_BYTES);
            assert!(c.topics.len() <= limits.max_topics);
            for (i, t) in c.topics.iter().enumerate() {
                assert_eq!(topic::validate(t, max_topic_len), Ok(t.as_str()));
                assert!(!c.topics[..i].contains(t), "duplicate topic {t:?}");
            }
            let mut reply = control::reply(c.op, &c.topics).into_bytes();
            let v = simd_json::to_borrowed_value(&mut reply).expect("reply is JSON");
            let want = match c.op {
                Op::Subscribe => "subscribed",
                Op::Unsubscribe => "unsubscribed",
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
