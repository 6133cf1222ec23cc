//! A whole connection through `server::session::Session::on_input`, the
//! state machine both backends run: request head, routing, upgrade or
//! refusal, publish bodies, keep-alive, `/metrics` and `/healthz`, then
//! frames for an echo, subscriber (JSON control messages) or publisher
//! WebSocket. The session is driven as a backend drives it: pending bytes
//! restored in front of each read, output written (drained) after each one,
//! reading stopped at `Next::FlushAndClose`.
//!
//! Input: two bytes choosing the configuration (limits small enough to be
//! reached, token, subprotocol, where `/metrics` lives), then cut bytes and
//! the stream (see `corecast_fuzz::Reads`).
//! Invariants:
//! - no panic;
//! - bytes kept between reads never exceed the head limit or one control
//!   frame (`MAX_PENDING_BYTES`), unless the session yielded (it decoded a
//!   turn's worth of messages, `YIELD_AFTER_BYTES`) and keeps the rest of
//!   its input: then, as the backends do, what it kept is fed to it again,
//!   alone, before anything more is read;
//! - the output is bounded by the input so far: 16 bytes per input byte (a
//!   6-byte binary frame to a subscriber earns an 85-byte error reply),
//!   plus one HTTP response per request and one refusal or close per read
//!   (not per read alone: an echo of a message in many fragments goes out
//!   whole when its last fragment arrives);
//! - the output is a valid transcript (see `corecast_fuzz::read_transcript`):
//!   well-formed HTTP responses, then valid server frames, data frames no
//!   bigger than the message limit plus a control reply;
//! - cutting the stream into reads changes nothing;
//! - after `detach`, no subscription or topic entry is left behind.
#![no_main]

use corecast::proto::ws::MAX_PENDING_BYTES;
use corecast::server::Config;
use corecast::server::config::SlowConsumerPolicy;
use corecast::server::fuzzing;
use corecast::server::metrics;
use corecast::server::session::{Ctx, Next, PIPELINE_AHEAD_BYTES, Session, WIRE_WORK};
use corecast::server::stats::WorkerStats;
use corecast_fuzz::{Item, Reads, drain, on_worker_stack, read_transcript};
use libfuzzer_sys::fuzz_target;
use std::time::Instant;

/// Output allowed per input byte of one read.
const AMPLIFICATION: usize = 16;
/// Output allowed per read on top: one refusal or close frame.
const PER_READ_SLACK: usize = 512;
/// Largest JSON reply to a control message beyond the message's own size.
const REPLY_SLACK: usize = 256;
/// Publisher token when one is configured.
const TOKEN: &str = "s3cret";

fn config(a: u8, b: u8) -> Config {
    Config {
        max_message_size: match a & 0x0f {
            0x0f => Config::default().max_message_size,
            n => 1 << n,
        },
        max_handshake_size: [64, 256, 1024, Config::default().max_handshake_size]
            [(a >> 4 & 3) as usize],
        admin_listen: (a & 0x40 != 0).then(|| "127.0.0.1:9002".parse().expect("address")),
        publish_token: (a & 0x80 != 0).then(|| TOKEN.to_string()),
        max_topics_per_conn: (b & 0x07) as usize,
        max_patterns_per_conn: (b & 0x03) as usize,
        max_topic_len: [1, 2, 4, 8, 16, 32, 64, 128][(b >> 3 & 7) as usize],
        subprotocols: if b & 0x40 != 0 {
            vec!["chat".into(), "superchat".into()]
        } else {
            Vec::new()
        },
        slow_consumer: if b & 0x80 != 0 {
            SlowConsumerPolicy::DropNewest
        } else {
            SlowConsumerPolicy::Disconnect
        },
        // The frame checks below read server frames without inflating
        // them; permessage-deflate is fuzzed in `frames` (decoding) and
        // tested end to end in tests/deflate.rs.
        permessage_deflate: false,
        ..Config::default()
    }
}

/// Runs one connection over `reads`; returns what it wrote, read back.
fn run<'a>(cfg: &Config, reads: impl Iterator<Item = &'a [u8]>) -> Vec<Item> {
    let (shared, mut shard) = fuzzing::single_worker(cfg.clone());
    let stats = WorkerStats::default();
    let now = Instant::now();
    let keep_bound = cfg.max_handshake_size.max(MAX_PENDING_BYTES);
    // The largest HTTP answer: `/metrics` (its numbers stay small here):
    // the workers' part, and 4 KiB for the process-wide figures after it
    // (history, limits, drain, reloads, panics).
    let max_response = metrics::render(&[WorkerStats::default()], 0, 0).len() + 4096;
    let mut session = Session::new();
    let mut wire = Vec::new();
    let mut kept: Vec<u8> = Vec::new();
    let mut turn = 0u32;
    // Input bytes read so far, and the output allowed besides 16 per byte.
    let (mut input, mut allowance) = (0usize, 0usize);
    'reads: for read in reads {
        let mut read = read;
        loop {
            let mut buf = kept.clone();
            buf.extend_from_slice(read);
            let i = turn;
            turn += 1;
            let (next, responses, yielded) = {
                let mut ctx = Ctx {
                    shared: &shared,
                    stats: &stats,
                    shard: &mut shard,
                    me: (0, 0),
                    now,
                    // 7 ms per read: the control-frame allowance refills as it would.
                    now_ms: (i as u32).wrapping_mul(7),
                    peer: Some(std::net::IpAddr::from([127, 0, 0, 1])),
                    metrics: &mut None,
                    unanswered: Vec::new(),
                    published: false,
                    requests: 0,
                    rated: None,
                    resubscribed: false,
                    wall_s: 0,
                    grant: None,
                    yielded: false,
                    // A few largest messages per turn, then a refusal (1013).
                    room: 4 * cfg.max_message_size,
                    // Each read is a turn: its new bytes count as the
                    // worker counts them (`Core::input`).
                    work: read.len().saturating_mul(WIRE_WORK),
                    // Each read is a turn: the worker's echo compression
                    // room is whole again.
                    echo_compress: corecast::pubsub::envelope::COMPRESS_PER_TURN,
                };
                let next = session.on_input(&mut buf, &mut ctx);
                (next, ctx.requests as usize, ctx.yielded)
            };
            // End of the loop turn: publications leave (nobody else is subscribed).
            shard.dispatch();
            // Over the pipeline's bound the worker stops reading until the
            // answers drain, then goes on with the requests kept.
            let waited = session.out.len() > PIPELINE_AHEAD_BYTES && session.awaiting_request();
            let wrote = drain(&mut session.out, &mut wire);
            // Bounded by all the input so far, not by this read's: an echo
            // of a message in many fragments goes out whole when its last
            // (perhaps tiny) fragment arrives.
            input += read.len();
            allowance += PER_READ_SLACK + responses * max_response;
            assert!(
                wire.len() <= AMPLIFICATION * input + allowance,
                "{} bytes written for {input} read ({wrote} for a read of {})",
                wire.len(),
                buf.len()
            );
            kept.resize(buf.len(), 0);
            let n = session.restore_pending(&mut kept);
            kept.truncate(n);
            assert!(
                n <= keep_bound || yielded || waited,
                "{n} bytes kept between reads"
            );
            if next == Next::FlushAndClose {
                break 'reads;
            }
            if !yielded && !(waited && n > 0) {
                break;
            }
            // Resumed at the next turn: what it kept, alone.
            assert!(n < buf.len(), "a yield makes progress");
            read = &[];
        }
    }
    session.detach(&mut shard, &stats);
    assert_eq!(shard.topic_count(), 0, "subscriptions left after detach");
    assert_eq!(shard.pattern_count(), 0, "patterns left after detach");
    assert_eq!(
        shard.directory().pattern_count(),
        0,
        "patterns registered after detach"
    );
    // Topics with a history are retained (nobody holds them); no other
    // entry is left.
    let d = shard.directory();
    assert_eq!(d.len(), d.retained_len(), "topic entries held after detach");
    read_transcript(&wire, cfg.max_message_size + REPLY_SLACK)
}

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    on_worker_stack(move || check(&data));
});

/// Checks one input (on a worker-sized stack).
fn check(data: &[u8]) {
    let [a, b, data @ ..] = data else {
        return;
    };
    let cfg = config(*a, *b);
    let reads = Reads::new(data);
    let whole = run(&cfg, std::iter::once(reads.stream()));
    let cut = run(&cfg, reads);
    assert_eq!(
        whole, cut,
        "cutting the stream into reads changed the output"
    );
}
