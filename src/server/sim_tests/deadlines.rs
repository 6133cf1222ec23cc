//! Deadlines in virtual time: keepalive, the request head, an unfinished
//! message, the send timeout, the linger after a close.

use super::*;

#[test]
fn a_silent_subscriber_is_pinged_then_closed_1001_in_virtual_time() {
    let mut sim = Sim::new(|_| {});
    let s = sim.upgrade("/ws?topics=a", 1 << 20);
    sim.wait(29 * SECOND, TICK);
    assert!(sim.received(s).is_empty(), "nothing before the interval");
    sim.wait(2 * SECOND, TICK);
    assert_eq!(sim.received(s), [0x89, 0x00], "a ping after 30 s");
    sim.wait(11 * SECOND, TICK);
    assert_eq!(close_code(&sim.received(s)), Some(1001));
    assert_eq!(
        sim.stats()
            .keepalive_timeouts
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    sim.wait(3 * SECOND, TICK);
    assert!(sim.closed.contains(&s), "dropped after the linger");
}

#[test]
fn a_queued_byte_that_waits_past_the_send_timeout_closes_the_connection() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| {
        c.send_timeout = Some(5 * SECOND);
        c.ping_interval = None;
    });
    let slow = sim.upgrade("/echo", 0);
    // Echoes of 1 KiB and more are queued as chunks of their own (smaller
    // ones are copied into one buffer, which a cut keeps whole), so the
    // cut below has frames to discard.
    for _ in 0..3 {
        sim.send(slow, &client_frame(true, OpCode::Binary, &[7; 2000], MASK));
    }
    // It reads 50 bytes a second: progress, but its first 2 004-byte echo
    // needs 40 s. Not cut before the deadline...
    for _ in 0..4 {
        sim.wait(SECOND, TICK);
        sim.read(slow, 50);
    }
    assert_eq!(sim.stats().send_timeouts.load(Relaxed), 0);
    // ...cut once the first queued byte has waited 5 s (one sweep later at most).
    for _ in 0..3 {
        sim.wait(SECOND, TICK);
        sim.read(slow, 50);
    }
    assert_eq!(sim.stats().send_timeouts.load(Relaxed), 1);
    assert!(sim.stats().send_timeout_discarded_bytes.load(Relaxed) > 0);
    sim.wait(3 * SECOND, TICK);
    assert!(sim.closed.contains(&slow));
    assert_eq!(sim.core.stats().buffered_bytes.load(Relaxed), 0);
}

#[test]
fn a_reader_that_keeps_up_with_a_steady_backlog_is_never_cut() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| {
        c.send_timeout = Some(2 * SECOND);
        c.ping_interval = None;
    });
    let s = sim.upgrade("/ws?topics=feed", 0);
    // 60 s of a feed where the reader always lags by five messages (its
    // queue is never empty) but each byte leaves within half a second.
    for _ in 0..5 {
        publish(&mut sim, "feed", &[1; 2000]);
    }
    for _ in 0..600 {
        publish(&mut sim, "feed", &[1; 2000]);
        sim.now += TICK;
        sim.read(s, 2004);
        assert!(!sim.core.conn(s).out().is_empty(), "a steady backlog");
    }
    assert_eq!(sim.stats().send_timeouts.load(Relaxed), 0);
    assert!(!sim.closed.contains(&s));
}

#[test]
fn half_a_request_head_gets_408_at_the_handshake_deadline() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|_| {});
    let c = sim.connect(1 << 20);
    sim.send(c, b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgr");
    sim.wait(9 * SECOND, TICK);
    assert!(sim.received(c).is_empty());
    sim.wait(2 * SECOND, TICK);
    let answer = String::from_utf8(sim.received(c)).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 408 Request Timeout"),
        "{answer}"
    );
    assert!(
        answer.contains("--handshake-timeout"),
        "names the flag: {answer}"
    );
    assert_eq!(sim.stats().handshake_timeouts.load(Relaxed), 1);
    sim.wait(3 * SECOND, TICK);
    assert!(sim.closed.contains(&c), "then closed after the linger");
}

#[test]
fn a_connection_that_says_nothing_is_closed_silently_at_the_handshake_deadline() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|_| {});
    let silent = sim.connect(1 << 20);
    sim.wait(9 * SECOND, TICK);
    // An honest client arriving meanwhile is served.
    let honest = sim.upgrade("/echo", 1 << 20);
    sim.send(honest, &client_frame(true, OpCode::Text, b"hi", MASK));
    assert_eq!(sim.received(honest), [&[0x81, 2][..], b"hi"].concat());
    assert!(!sim.closed.contains(&silent));
    sim.wait(2 * SECOND, TICK);
    assert!(sim.received(silent).is_empty(), "no answer to no request");
    assert!(sim.closed.contains(&silent));
    assert!(!sim.closed.contains(&honest), "its own deadline is later");
    assert_eq!(sim.stats().handshake_timeouts.load(Relaxed), 1);
}

#[test]
fn a_message_that_never_completes_is_closed_1008_while_a_steady_talker_stays() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| c.ping_interval = None);
    let steady = sim.upgrade("/echo", 1 << 20);
    let stuck = sim.upgrade("/echo", 1 << 20);
    // A first fragment, then half of a continuation frame's payload: then silence.
    let mut start = client_frame(false, OpCode::Text, b"part one", MASK);
    start.extend_from_slice(&client_frame(false, OpCode::Continuation, &[b'x'; 100], MASK)[..50]);
    sim.send(stuck, &start);
    past_the_message_deadline(&mut sim, steady, stuck, |_, _| {});
    assert_eq!(sim.stats().message_timeouts.load(Relaxed), 1);
}

/// 35 s pass, `steady` completing a message each second, and `at(i)`
/// run at each second `i` first: `stuck` hears nothing before 30 s, then
/// gets `1008`; `steady` stays.
fn past_the_message_deadline(
    sim: &mut Sim,
    steady: usize,
    stuck: usize,
    mut at: impl FnMut(&mut Sim, u8),
) {
    for i in 0..35u8 {
        at(sim, i);
        sim.send(steady, &client_frame(true, OpCode::Binary, &[i], MASK));
        assert_eq!(sim.received(steady), [0x82, 1, i]);
        if i == 28 {
            assert!(sim.received(stuck).is_empty(), "not before 30 s");
        }
        sim.wait(SECOND, TICK);
    }
    assert_eq!(close_code(&sim.received(stuck)), Some(1008));
    assert!(!sim.closed.contains(&steady));
}

/// A frame header cut short is a message begun: closed `1008` at the
/// message deadline from its first byte, however it trickles (outside
/// probe: only keepalive closed it, 40 s later, and never with keepalive
/// off).
#[test]
fn a_frame_header_cut_short_is_closed_1008_at_the_message_deadline() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| c.ping_interval = None);
    let steady = sim.upgrade("/echo", 1 << 20);
    let stuck = sim.upgrade("/echo", 1 << 20);
    // A whole message, then the first byte of the next frame's header.
    let mut first = client_frame(true, OpCode::Text, b"ok", MASK);
    first.push(0x81);
    sim.send(stuck, &first);
    assert_eq!(sim.received(stuck), [&[0x81, 2][..], b"ok"].concat());
    past_the_message_deadline(&mut sim, steady, stuck, |sim, i| {
        if i == 20 {
            // One more byte of the header (a 16-bit length follows): still
            // not whole, and the deadline still runs from the first.
            sim.send(stuck, &[0xFE]);
        }
    });
    assert_eq!(sim.stats().message_timeouts.load(Relaxed), 1);
}

/// A connection paused for its queue while a frame header it began is
/// kept, whose client sent the rest meanwhile (waiting in the socket), is
/// not judged by the message deadline in the turn that resumes it, before
/// that rest is read (review of the header deadline: a sweep in that turn
/// closed it 1008 from the header's first byte).
#[test]
fn a_connection_resumed_this_turn_is_read_before_its_message_deadline_is_judged() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| {
        c.ping_interval = None;
        c.send_timeout = None;
        c.max_outbound_bytes = 64 << 10;
    });
    let c = sim.upgrade("/echo", 0);
    // A message whose echo passes the queue's bound (reading pauses),
    // then the first byte of the next frame's header.
    let next = client_frame(true, OpCode::Binary, b"after", MASK);
    let mut input = client_frame(true, OpCode::Binary, &vec![7u8; 100 << 10], MASK);
    input.push(next[0]);
    sim.send(c, &input);
    sim.wait(5 * SECOND, TICK);
    sim.send(c, &next[1..]); // waits in the socket: not read while paused
    sim.wait(30 * SECOND, TICK);
    assert_eq!(
        sim.stats().message_timeouts.load(Relaxed),
        0,
        "paused: not judged"
    );
    // The client reads: in the turn that resumes it a sweep is due.
    sim.now += 2 * SECOND;
    sim.read(c, 1 << 20);
    sim.turn();
    assert_eq!(sim.stats().message_timeouts.load(Relaxed), 0);
    let got = sim.received(c);
    assert!(
        got.ends_with(&[&[0x82, 5][..], b"after"].concat()),
        "echoed"
    );
    assert!(!sim.closed.contains(&c));
}

#[test]
fn a_subscriber_that_answers_pings_is_kept_and_pinged_again() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|_| {});
    let s = sim.upgrade("/ws?topics=k", 1 << 20);
    for round in 1..=3u64 {
        sim.wait(31 * SECOND, TICK);
        assert_eq!(sim.received(s), [0x89, 0x00], "ping {round}");
        sim.send(s, &client_frame(true, OpCode::Pong, b"", MASK));
        assert_eq!(sim.stats().keepalive_pings.load(Relaxed), round);
    }
    sim.wait(15 * SECOND, TICK);
    assert!(sim.received(s).is_empty(), "no close: it answered");
    assert_eq!(sim.stats().keepalive_timeouts.load(Relaxed), 0);
    assert!(!sim.closed.contains(&s));
}

#[test]
fn a_peer_that_stops_reading_while_closing_is_dropped_after_the_linger() {
    let mut sim = Sim::new(|c| c.max_outbound_bytes = 256 << 20);
    let s = sim.upgrade("/echo", 0);
    // 4 MiB of echoes it never reads, then its close frame: the server
    // cannot send its echoes nor the close reply...
    for _ in 0..64 {
        sim.send(
            s,
            &client_frame(true, OpCode::Binary, &[1; 64 * 1024], MASK),
        );
    }
    sim.send(
        s,
        &client_frame(true, OpCode::Close, &1000u16.to_be_bytes(), MASK),
    );
    sim.wait(SECOND, TICK);
    assert!(!sim.closed.contains(&s));
    // ...and does not hold the connection past the linger bound.
    sim.wait(crate::server::worker::LINGER, TICK);
    assert!(sim.closed.contains(&s));
    assert!(sim.received(s).is_empty());
}

#[test]
fn upgraded_connections_leave_no_request_deadlines_behind() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|_| {});
    let silent = sim.connect(1 << 20);
    let half = sim.connect(1 << 20);
    sim.send(half, b"GET /echo HTTP/1.1\r\nHost: x\r\n");
    // A thousand subscribers within the handshake timeout: their entries
    // are dropped as the queue fills, not kept for 10 s each.
    let subscribers: Vec<usize> = (0..1000)
        .map(|_| sim.upgrade("/ws?topics=idle", 1 << 16))
        .collect();
    assert!(
        sim.core.request_deadlines() <= 8,
        "{} entries",
        sim.core.request_deadlines()
    );
    // The two still in their request keep theirs.
    sim.wait(11 * SECOND, TICK);
    assert!(sim.closed.contains(&silent));
    assert!(sim.received(half).starts_with(b"HTTP/1.1 408 "));
    assert_eq!(sim.stats().handshake_timeouts.load(Relaxed), 2);
    assert!(subscribers.iter().all(|k| !sim.closed.contains(k)));
}

/// Bytes that cannot begin an HTTP request (a wss:// client's ClientHello
/// on the plain port) are answered `400` at once, not kept until the
/// request deadline (outside probe: `408` ten seconds later), while a
/// request arriving a byte at a time is still waited for.
#[test]
fn a_first_line_that_cannot_be_http_is_answered_at_once() {
    let mut sim = Sim::new(|_| {});
    let tls = sim.connect(1 << 20);
    sim.send(tls, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]);
    let answer = String::from_utf8_lossy(&sim.received(tls)).into_owned();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    // The reason the whole head would get: how the bytes are cut into
    // reads changes nothing (the `connection` fuzz target checks it).
    assert!(answer.contains("malformed request head"), "{answer}");
    let slow = sim.connect(1 << 20);
    for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\n" {
        sim.send(slow, &[*b]);
    }
    assert!(
        sim.received(slow).is_empty(),
        "a real request is waited for"
    );
    sim.send(slow, b"\r\n");
    let answer = String::from_utf8_lossy(&sim.received(slow)).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
}

/// The early refusal looks at the head only, up to its blank line: blank
/// lines then junk give the same answer in one read as cut into reads
/// (the `connection` fuzz target: "malformed" whole, where the junk
/// after the first "\n\n" was read with it, "incomplete" cut there).
#[test]
fn a_head_is_judged_up_to_its_blank_line_however_the_reads_cut_it() {
    let stream: &[u8] = b"\n\n\n\nTP/1.1\r\nHost: x\r\n\r\n";
    let mut answers = Vec::new();
    for cut in [stream.len(), 1, 2, 5] {
        let mut sim = Sim::new(|_| {});
        let c = sim.connect(1 << 20);
        for read in stream.chunks(cut) {
            sim.send(c, read);
        }
        let answer = String::from_utf8_lossy(&sim.received(c)).into_owned();
        assert!(answer.starts_with("HTTP/1.1 400 "), "{cut}: {answer}");
        answers.push(answer);
    }
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:#?}");
}

/// A ping queued behind a backlog the client is still reading waits for
/// it: while the client takes our bytes, the ping's wait starts over
/// (outside probe: a subscriber reading 200 KB/s and answering every ping
/// at once was closed 1001 `keepalive timeout` while its ping sat behind
/// its own queue, and lost what was queued). One that stops answering is
/// still cut once nothing more goes out.
#[test]
fn a_ping_behind_a_backlog_the_client_reads_does_not_time_out() {
    let mut sim = Sim::new(|c| {
        c.ping_interval = Some(2 * SECOND);
        c.ping_timeout = SECOND;
        c.send_timeout = Some(10 * SECOND);
    });
    let s = sim.upgrade("/ws?topics=feed", 0);
    for _ in 0..20 {
        publish(&mut sim, "feed", &[1; 10_000]);
    }
    // Not reading for 2.5 s: the ping is queued behind 200 KB.
    sim.wait(Duration::from_millis(2500), TICK);
    assert!(sim.received(s).is_empty());
    // Then 10 KB a tick (100 KB/s): the ping comes out after ~2 s, well
    // past the 1 s ping timeout counted from its queueing.
    let mut got = Vec::new();
    for _ in 0..25 {
        sim.now += TICK;
        sim.read(s, 10_000);
        got.extend(sim.received(s));
    }
    assert_eq!(close_code(&got), None, "not cut while reading");
    assert!(got.ends_with(&[0x89, 0x00]), "the ping, behind the backlog");
    sim.send(s, &client_frame(true, OpCode::Pong, b"", MASK));
    sim.wait(Duration::from_millis(1500), TICK);
    assert!(!sim.closed.contains(&s));
    assert_eq!(close_code(&sim.received(s)), None);
    // Silent from now on (nothing to write): pinged, then cut.
    sim.wait(4 * SECOND, TICK);
    let wire = sim.received(s);
    assert!(wire.starts_with(&[0x89, 0x00]), "{wire:02x?}");
    assert_eq!(close_code(&wire), Some(1001));
}
