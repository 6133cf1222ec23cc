//! Arbitrary client bytes through `WsConn::decode`, driven as a backend
//! drives it: unconsumed bytes are kept and the next read appended. Covers
//! header parsing, unmasking at every phase, fast-path and streaming UTF-8
//! validation, reassembly, control frames between fragments, and the close
//! handshake.
//!
//! Input: one byte choosing the message cap (a small power of two or the
//! default; its top bit: permessage-deflate agreed, so RSV1 messages are
//! inflated; bits 4-6: the room each decode call may inflate, none or a
//! power of four, as a turn gives it), then cut bytes and the stream (see
//! `corecast_fuzz::Reads`).
//! Invariants:
//! - no panic; `consumed` never exceeds the input, and after a call that
//!   returns no event at most `MAX_PENDING_BYTES` are left for next time;
//! - a message is at most the cap, a text message is valid UTF-8, a pong at
//!   most 125 bytes; a peer's close code is allowed on the wire; a failure
//!   uses 1002, 1007 or 1009, or 1008 for a control frame flood only;
//!   nothing happens after a close or a failure;
//! - everything queued is a valid sequence of server frames (see
//!   `corecast_fuzz::read_frames`): in particular every close has a valid code;
//! - cutting the stream into reads changes nothing: the events and the
//!   frames written are those of the same stream in one read; nor does
//!   inflating in rooms (a call that stops for its room is called again).
#![no_main]

use corecast::proto::frame::MAX_CONTROL_PAYLOAD;
use corecast::proto::ws::{DEFAULT_MAX_MESSAGE_BYTES, MAX_PENDING_BYTES};
use corecast::proto::{CloseCode, CloseState, Event, MessageKind, OutQueue, WsConn};
use corecast_fuzz::{Item, Reads, drain, on_worker_stack, read_frames};
use libfuzzer_sys::fuzz_target;

/// An owned copy of an event, for comparing runs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Message(MessageKind, Vec<u8>),
    Pong(Vec<u8>),
    Closed(Option<u16>),
    Failed(u16),
}

/// Feeds `reads` to a fresh connection; returns its events and the frames it wrote.
fn run<'a>(
    max_message: usize,
    deflate: bool,
    room: usize,
    reads: impl Iterator<Item = &'a [u8]>,
) -> (Vec<Ev>, Vec<Item>) {
    let mut conn = WsConn::new(max_message);
    conn.set_deflate(deflate.then_some(corecast::proto::deflate::Agreed {
        server_window_bits: 15,
    }));
    let mut out = OutQueue::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut events = Vec::new();
    let mut wire = Vec::new();
    for read in reads {
        let mut buf = std::mem::take(&mut pending);
        buf.extend_from_slice(read);
        let mut pos = 0;
        loop {
            let ended = matches!(events.last(), Some(Ev::Closed(_) | Ev::Failed(_)));
            let avail = buf.len() - pos;
            let mut left = room;
            let decoded = conn.decode_within(&mut buf[pos..], &mut out, &mut left);
            assert!(decoded.consumed <= avail, "consumed past the input");
            let consumed = decoded.consumed;
            // An owned copy: the event borrows both the input and the connection.
            let event = decoded.event.map(|event| match event {
                Event::Message { kind, payload } => {
                    assert!(payload.len() <= max_message, "message over the cap");
                    if kind == MessageKind::Text {
                        assert!(
                            std::str::from_utf8(payload).is_ok(),
                            "invalid UTF-8 delivered"
                        );
                    }
                    Ev::Message(kind, payload.to_vec())
                }
                Event::Pong(p) => {
                    assert!(p.len() <= MAX_CONTROL_PAYLOAD);
                    Ev::Pong(p.to_vec())
                }
                Event::Closed { code } => {
                    assert!(
                        code.is_none_or(CloseCode::is_valid_on_wire),
                        "close code {code:?}"
                    );
                    Ev::Closed(code)
                }
                Event::Failed { code, reason } => {
                    // 1008 only for the ping/pong rate (the clock never moves
                    // here, so the 101st control frame trips it).
                    assert!(
                        [
                            CloseCode::PROTOCOL_ERROR,
                            CloseCode::INVALID_PAYLOAD,
                            CloseCode::MESSAGE_TOO_BIG
                        ]
                        .contains(&code)
                            || (code == CloseCode::POLICY_VIOLATION
                                && reason == "control frame flood"),
                        "failed with {code:?} ({reason})"
                    );
                    Ev::Failed(code.0)
                }
            });
            pos += consumed;
            let Some(event) = event else {
                if left == 0 && consumed < avail {
                    continue; // stopped for the room: on at the next turn
                }
                assert!(
                    buf.len() - pos <= MAX_PENDING_BYTES,
                    "{} bytes left pending",
                    buf.len() - pos
                );
                break;
            };
            assert!(!ended, "event after the connection ended: {event:?}");
            if matches!(event, Ev::Closed(_) | Ev::Failed(_)) {
                assert_eq!(conn.close_state(), CloseState::Closed);
            }
            events.push(event);
        }
        pending = buf.split_off(pos);
        drain(&mut out, &mut wire);
        // Vec growth may double the capacity (and allocates at least 8
        // bytes); a compressed message in progress adds its inflater.
        assert!(
            conn.buffered() <= (2 * max_message).max(8) + corecast::proto::deflate::INFLATER_BYTES,
            "reassembly buffer of {} bytes for a cap of {max_message}",
            conn.buffered()
        );
    }
    let mut items = Vec::new();
    // The server only answers here: pongs and closes, no data frames.
    read_frames(&wire, 0, &mut items);
    assert!(
        items
            .iter()
            .all(|i| matches!(i, Item::Pong(_) | Item::Close(_))),
        "unexpected frame written: {items:?}"
    );
    (events, items)
}

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    on_worker_stack(move || check(&data));
});

/// Checks one input (on a worker-sized stack).
fn check(data: &[u8]) {
    let Some((&cap, data)) = data.split_first() else {
        return;
    };
    // Small caps reach "message too big" within a fuzz input.
    let max_message = match cap & 0x0f {
        0x0f => DEFAULT_MAX_MESSAGE_BYTES,
        n => 1 << n,
    };
    let deflate = cap & 0x80 != 0;
    let room = match (cap >> 4) & 7 {
        0 => usize::MAX,
        n => 1 << (2 * n),
    };
    let reads = Reads::new(data);
    let whole = run(
        max_message,
        deflate,
        usize::MAX,
        std::iter::once(reads.stream()),
    );
    let cut = run(max_message, deflate, room, reads);
    assert_eq!(
        whole, cut,
        "cutting the stream into reads, inflating in rooms, changed the outcome"
    );
}
