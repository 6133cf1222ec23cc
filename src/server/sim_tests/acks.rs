//! A publisher's acknowledgements (`corecast.v1`) and the close frame:
//! what it published before a close, whoever closes, is acknowledged ahead
//! of the close frame; what it sends after ours is not published.

use super::*;

/// The sequence numbers of the acknowledgements in `frames`, in order,
/// and the close code of the frame after them (which must be the last).
fn acks_then_close(frames: &[(u8, Vec<u8>)]) -> (Vec<u64>, Option<u16>) {
    let mut seqs = Vec::new();
    let mut close = None;
    for (i, (op, payload)) in frames.iter().enumerate() {
        match op {
            0x1 => {
                assert!(close.is_none(), "a text frame after the close frame");
                let text = std::str::from_utf8(payload).unwrap();
                assert!(text.starts_with(r#"{"op":"ack","epoch":"#), "{text}");
                let seq = text.rsplit_once(r#""seq":"#).unwrap().1;
                seqs.push(seq.trim_end_matches('}').parse().unwrap());
            }
            0x8 => {
                assert_eq!(i, frames.len() - 1, "the close frame is the last");
                close = Some(u16::from_be_bytes([payload[0], payload[1]]));
            }
            other => panic!("opcode {other}"),
        }
    }
    (seqs, close)
}

/// The drain, as the backends' loop runs it: begun, then a step a turn
/// (its closes spread over half its window) for 1.5 s.
fn drain(sim: &mut Sim) {
    sim.core.begin_turn(sim.now);
    let mut remove = sim.core.begin_drain();
    for _ in 0..15 {
        for k in remove {
            Backend::remove(sim, k);
        }
        sim.now += TICK;
        sim.turn();
        remove = sim.core.drain_step();
    }
}

fn text_frame(payload: &[u8]) -> Vec<u8> {
    client_frame(true, OpCode::Text, payload, MASK)
}

/// Three messages and a close (or a frame that fails the connection) in
/// one read: the three are published, and their acknowledgements go out
/// before the close frame (before, the close was queued while reading and
/// the acknowledgements, queued at the end of the turn, could not follow
/// it: the publisher got none).
#[test]
fn messages_read_with_a_close_are_acknowledged_before_the_close_frame() {
    let unmasked = [0x81u8, 0x01, b'x'];
    let bad_utf8 = text_frame(&[0xff]);
    let close_1000 = client_frame(true, OpCode::Close, &1000u16.to_be_bytes(), MASK);
    for (last, code) in [
        (&close_1000[..], 1000),
        (&unmasked[..], 1002),
        (&bad_utf8[..], 1007),
    ] {
        let mut sim = Sim::new(|_| {});
        let sub = sim.upgrade("/ws?topics=t", 1 << 20);
        let publisher = sim.upgrade_with(
            "/publish/t",
            "Sec-WebSocket-Protocol: corecast.v1\r\n",
            1 << 20,
        );
        let mut read = Vec::new();
        for m in [b"m0", b"m1", b"m2"] {
            read.extend_from_slice(&text_frame(m));
        }
        read.extend_from_slice(last);
        sim.send(publisher, &read);
        sim.turn();
        let (seqs, close) = acks_then_close(&frames(&sim.received(publisher)));
        assert_eq!(seqs, [1, 2, 3], "closing {code}");
        assert_eq!(close, Some(code));
        let delivered: Vec<_> = frames(&sim.received(sub))
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        assert_eq!(delivered, [b"m0", b"m1", b"m2"], "closing {code}");
    }
}

/// Once the server's close frame is queued (here the shutdown drain's
/// 1001), an acknowledged publisher's messages are not published: they
/// could not be acknowledged, so the publisher would count as lost what
/// subscribers got (before, ~34 000 messages of a flat-out publisher were
/// published after the drain's close, none acknowledged). Counted.
#[test]
fn an_acknowledged_publishers_messages_after_our_close_are_not_published() {
    let mut sim = Sim::new(|c| c.drain_timeout = 2 * SECOND);
    let publisher = sim.upgrade_with(
        "/publish/t",
        "Sec-WebSocket-Protocol: corecast.v1\r\n",
        1 << 20,
    );
    let plain = sim.upgrade("/publish/u", 1 << 20);
    sim.send(publisher, &text_frame(b"before"));
    drain(&mut sim);
    let (seqs, close) = acks_then_close(&frames(&sim.received(publisher)));
    assert_eq!((seqs, close), (vec![1], Some(1001)));
    let published = |sim: &Sim| {
        sim.stats()
            .messages_published
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let after_close = |sim: &Sim| {
        sim.stats()
            .messages_after_close
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(published(&sim), 1);
    let mut read = text_frame(b"late 1");
    read.extend_from_slice(&text_frame(b"late 2"));
    sim.send(publisher, &read);
    assert_eq!(published(&sim), 1, "not published");
    assert_eq!(after_close(&sim), 2, "counted");
    assert!(
        sim.received(publisher).is_empty(),
        "nothing after the close"
    );
    // A publisher that asked for no acknowledgements has nothing to be
    // told: what it sends before its close reply is published as before.
    assert_eq!(close_code(&sim.received(plain)), Some(1001));
    sim.send(plain, &text_frame(b"late 3"));
    assert_eq!(published(&sim), 2);
    assert_eq!(after_close(&sim), 2);
}

/// The same when the server closes it in the read, over the buffer budget
/// (1013): the messages before the one that took it past are acknowledged
/// ahead of the close frame.
#[test]
fn messages_read_before_a_budget_close_are_acknowledged_before_it() {
    let mut sim = Sim::new(|c| c.max_buffered_bytes = 128 << 10);
    let publisher = sim.upgrade_with(
        "/publish/t",
        "Sec-WebSocket-Protocol: corecast.v1\r\n",
        1 << 20,
    );
    let mut read = text_frame(b"m0");
    read.extend_from_slice(&text_frame(b"m1"));
    // A 4 MiB message announced, 200 KiB of it in the same read (within
    // a turn's work, so the two messages before it are decoded first).
    read.extend_from_slice(&[0x82, 0xff]);
    read.extend_from_slice(&(4u64 << 20).to_be_bytes());
    read.extend_from_slice(&MASK);
    read.extend_from_slice(&vec![0u8; 200 * 1024]);
    sim.send(publisher, &read);
    sim.turn();
    let (seqs, close) = acks_then_close(&frames(&sim.received(publisher)));
    assert_eq!((seqs, close), (vec![1, 2], Some(1013)));
}

/// A ping from an acknowledged publisher is answered (its pong queued
/// apart, with the close frames, and moved to the connection's queue
/// whether or not a message follows in the read).
#[test]
fn an_acknowledged_publishers_ping_is_answered() {
    let mut sim = Sim::new(|_| {});
    let publisher = sim.upgrade_with(
        "/publish/t",
        "Sec-WebSocket-Protocol: corecast.v1\r\n",
        1 << 20,
    );
    sim.send(publisher, &client_frame(true, OpCode::Ping, b"hi", MASK));
    assert_eq!(frames(&sim.received(publisher)), [(0xa, b"hi".to_vec())]);
    let mut read = client_frame(true, OpCode::Ping, b"1", MASK);
    read.extend_from_slice(&text_frame(b"m"));
    read.extend_from_slice(&client_frame(true, OpCode::Ping, b"2", MASK));
    sim.send(publisher, &read);
    let got = frames(&sim.received(publisher));
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!((got[0].0, &got[0].1[..]), (0xa, &b"1"[..]));
    assert_eq!(got[2].0, 0x1, "the ack, at the end of the turn");
}

/// Input kept when a publisher's read yielded is read by a later turn's
/// `unthrottle`, after that turn's dispatch; a close the server makes in
/// the same turn (here the drain's) follows the acknowledgements of what
/// that input published, numbered at once (they could not follow it).
#[test]
fn what_a_kept_read_published_is_acknowledged_before_a_close_the_same_turn() {
    let mut sim = Sim::new(|c| c.drain_timeout = 2 * SECOND);
    let publisher = sim.upgrade_with(
        "/publish/t",
        "Sec-WebSocket-Protocol: corecast.v1\r\n",
        1 << 20,
    );
    // 300 KiB in one read: past a turn's work at once, kept whole.
    let mut read = Vec::new();
    for _ in 0..100 {
        read.extend_from_slice(&text_frame(&[b'x'; 3000]));
    }
    sim.send(publisher, &read);
    assert!(sim.received(publisher).is_empty(), "yielded, nothing read");
    // The next turn's unthrottle reads it; the drain begins right after.
    sim.now += TICK;
    sim.turn();
    drain(&mut sim);
    let (seqs, close) = acks_then_close(&frames(&sim.received(publisher)));
    assert_eq!(seqs, (1..=100).collect::<Vec<u64>>());
    assert_eq!(close, Some(1001));
}
