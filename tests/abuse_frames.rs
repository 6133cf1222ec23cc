//! Hostile frames, each with its exact close code: lengths with the top bit
//! set, unmasked frames, reserved opcodes, invalid close codes, and invalid
//! UTF-8 found as soon as it arrives, a mebibyte into a message. Every test
//! runs against the backend `CORECAST_IO` selects (`.ci/run` runs the suite
//! once per backend).
//!
//! The tests take [`exclusive`] first, so they run one at a time: each
//! loads a small machine (some write megabytes) enough to make another's
//! time bounds noise.

mod common;

use common::*;
use corecast::proto::frame::{OpCode, client_frame};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

/// Sends each case on a fresh /echo connection and checks the close code
/// and the end of the connection after it.
fn check_close_codes(addr: SocketAddr, cases: &[(String, Vec<u8>, u16)]) {
    for (name, bytes, code) in cases {
        let mut s = raw_ws(addr, "/echo");
        s.write_all(bytes).unwrap();
        assert_eq!(close_code_then_eof(&mut s), *code, "{name}");
    }
}

#[test]
fn frame_lengths_with_the_top_bit_set_close_1002_however_they_arrive() {
    let _one = exclusive();
    let server = start();
    let addr = server.local_addr();
    let lengths = [
        u64::MAX,
        (1 << 63) | 1,
        (1 << 63) | 0xffff,
        0xffff_ffff_0000_0000,
    ];
    let mut cases = Vec::new();
    for len in lengths {
        for (b0, what) in [(0x82, "binary"), (0x81, "text"), (0x02, "first fragment")] {
            cases.push((format!("{what}, length {len:#x}"), header64(b0, len), 1002));
        }
        // As the continuation of a message in progress.
        let mut bytes = client_frame(false, OpCode::Text, b"start", MASK);
        bytes.extend(header64(0x80, len));
        cases.push((format!("continuation, length {len:#x}"), bytes, 1002));
    }
    check_close_codes(addr, &cases);
    // The header split over many reads: the partial header is kept and the
    // verdict comes when the eighth length byte arrives, without a payload.
    for split in [1, 3, 7] {
        let mut s = raw_ws(addr, "/echo");
        for piece in header64(0x82, 1 << 63).chunks(split) {
            // The mask key comes after the verdict: the server may be gone by then.
            let _ = s.write_all(piece);
            thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            close_code_then_eof(&mut s),
            1002,
            "header in {split}-byte pieces"
        );
    }
    // Just under 2^63 is a valid header: it is over the message limit
    // (1009), decided from the header alone.
    let mut s = raw_ws(addr, "/echo");
    s.write_all(&header64(0x82, (1 << 63) - 1)).unwrap();
    assert_eq!(close_code_then_eof(&mut s), 1009, "2^63 - 1");
    assert_eq!(server.stats().protocol_errors, cases.len() as u64 + 3 + 1);
}

#[test]
fn unmasked_frames_of_every_kind_close_1002() {
    let _one = exclusive();
    let server = start();
    let addr = server.local_addr();
    let mut cases = vec![
        (
            "text, 16-bit length".to_string(),
            frame(0x81, &[b'a'; 200], None),
            1002,
        ),
        (
            "binary, 64-bit length".into(),
            frame(0x82, &vec![0; 70_000], None),
            1002,
        ),
        ("empty binary".into(), frame(0x82, &[], None), 1002),
        (
            "close".into(),
            frame(0x88, &1000u16.to_be_bytes(), None),
            1002,
        ),
        ("ping".into(), frame(0x89, b"hi", None), 1002),
        ("pong".into(), frame(0x8a, b"hi", None), 1002),
    ];
    // Unmasked in the middle of a masked message, after masked frames that
    // were fine: the rule holds for every frame, not only the first.
    let mut mid = client_frame(false, OpCode::Text, b"one ", MASK);
    mid.extend(client_frame(false, OpCode::Continuation, b"two ", MASK));
    mid.extend(frame(0x80, b"three", None));
    cases.push(("unmasked continuation".into(), mid, 1002));
    let mut after = client_frame(true, OpCode::Text, b"fine", MASK);
    after.extend(frame(0x81, b"not fine", None));
    cases.push(("unmasked after a good message".into(), after, 1002));
    check_close_codes(addr, &cases);
    // The good message before it was echoed: the failure is per frame.
    assert_eq!(server.stats().messages_echoed, 1);
    assert_eq!(server.stats().protocol_errors, cases.len() as u64);
}

#[test]
fn every_reserved_opcode_closes_1002_alone_or_inside_a_message() {
    let _one = exclusive();
    let server = start();
    let addr = server.local_addr();
    let mut cases = Vec::new();
    for op in (3u8..=7).chain(0xb..=0xf) {
        cases.push((
            format!("opcode {op:#x}, FIN"),
            frame(0x80 | op, b"x", Some(MASK)),
            1002,
        ));
        cases.push((
            format!("opcode {op:#x}, no FIN"),
            frame(op, b"", Some(MASK)),
            1002,
        ));
        let mut inside = client_frame(false, OpCode::Binary, b"part", MASK);
        inside.extend(frame(0x80 | op, b"y", Some(MASK)));
        cases.push((format!("opcode {op:#x} inside a message"), inside, 1002));
        // A big declared payload must not be waited for: the opcode decides.
        cases.push((
            format!("opcode {op:#x} declaring 1 MiB"),
            header64(0x80 | op, MIB as u64),
            1002,
        ));
    }
    check_close_codes(addr, &cases);
    assert_eq!(server.stats().protocol_errors, cases.len() as u64);
}

#[test]
fn close_codes_are_echoed_when_valid_and_refused_with_1002_when_not() {
    let _one = exclusive();
    let server = start();
    let addr = server.local_addr();
    let mut cases = Vec::new();
    // Reserved for local use (1005, 1006, 1015), unassigned, or out of range.
    for code in [
        0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        cases.push((
            format!("close code {code}"),
            client_frame(true, OpCode::Close, &code.to_be_bytes(), MASK),
            1002,
        ));
        // The same with a reason attached.
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(b"bye");
        cases.push((
            format!("close code {code} with a reason"),
            client_frame(true, OpCode::Close, &p, MASK),
            1002,
        ));
    }
    cases.push((
        "one-byte close payload".into(),
        client_frame(true, OpCode::Close, &[0x03], MASK),
        1002,
    ));
    let mut bad_reason = 1000u16.to_be_bytes().to_vec();
    bad_reason.extend_from_slice(&[b'o', b'k', 0xc3, 0x28]);
    cases.push((
        "close reason not UTF-8".into(),
        client_frame(true, OpCode::Close, &bad_reason, MASK),
        1007,
    ));
    cases.push((
        "close payload of 126 bytes".into(),
        frame(0x88, &[b'a'; 126], Some(MASK)),
        1002,
    ));
    let failures = cases.len() as u64;
    // Valid codes are echoed: the exact code comes back, not a generic one.
    for code in [
        1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
        4000, 4999,
    ] {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice("ça va".as_bytes());
        cases.push((
            format!("valid close code {code}"),
            client_frame(true, OpCode::Close, &p, MASK),
            code,
        ));
    }
    check_close_codes(addr, &cases);
    assert_eq!(
        server.stats().protocol_errors,
        failures,
        "valid closes are not errors"
    );
}

/// Sends `bytes` in `chunk`-byte writes; stops early (returning the bytes
/// written) if the server closes meanwhile.
fn write_in_chunks(s: &mut TcpStream, bytes: &[u8], chunk: usize) -> usize {
    let mut written = 0;
    for piece in bytes.chunks(chunk) {
        if s.write_all(piece).is_err() {
            break;
        }
        written += piece.len();
    }
    written
}

#[test]
fn invalid_utf8_at_one_mebibyte_closes_1007_before_the_message_ends() {
    let _one = exclusive();
    let server = start();
    let addr = server.local_addr();
    // Sent in full only up to a little past the bad byte: if the server
    // waited for the declared message (4 MiB) or for its last fragment, it
    // would never answer, and the read below would time out.
    let sent = MIB + 64 * KIB;
    let mut text = vec![b'a'; sent];
    text[MIB] = 0xff;

    // One frame declaring 4 MiB, written in odd-sized chunks.
    let mut s = raw_ws(addr, "/echo");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut bytes = header64(0x81, 4 * MIB as u64);
    bytes.extend(masked(&text, 0));
    write_in_chunks(&mut s, &bytes, 64 * KIB + 7);
    assert_eq!(close_code_then_eof(&mut s), 1007, "one 4 MiB frame");

    // The same text as 64 KiB fragments (no FIN ever), with a ping between
    // two of them that is answered before the close.
    let mut s = raw_ws(addr, "/echo");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut bytes = Vec::new();
    for (i, part) in text.chunks(64 * KIB).enumerate() {
        let op = if i == 0 {
            OpCode::Text
        } else {
            OpCode::Continuation
        };
        bytes.extend(client_frame(false, op, part, MASK));
        if i == 3 {
            bytes.extend(client_frame(true, OpCode::Ping, b"still there?", MASK));
        }
    }
    write_in_chunks(&mut s, &bytes, 64 * KIB);
    assert_eq!(read_frame(&mut s), (true, 0xa, b"still there?".to_vec()));
    assert_eq!(close_code_then_eof(&mut s), 1007, "fragments");

    // A four-byte sequence cut by a fragment boundary at 1 MiB, its third
    // byte invalid: found across the boundary.
    let mut split = vec![b'b'; sent];
    split[MIB - 2..MIB + 2].copy_from_slice(&[0xf0, 0x9f, b'A', b'A']);
    let mut s = raw_ws(addr, "/echo");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut bytes = Vec::new();
    for (i, part) in split.chunks(64 * KIB).enumerate() {
        let op = if i == 0 {
            OpCode::Text
        } else {
            OpCode::Continuation
        };
        bytes.extend(client_frame(false, op, part, MASK));
    }
    write_in_chunks(&mut s, &bytes, 64 * KIB);
    assert_eq!(
        close_code_then_eof(&mut s),
        1007,
        "sequence across fragments"
    );

    // A message that ends inside a sequence: the fast path (one whole
    // frame) and the reassembly path (its last fragment).
    let mut tail = vec![b'c'; 1000];
    tail.extend_from_slice(&[0xf0, 0x9f, 0x98]);
    let mut fragmented = client_frame(false, OpCode::Text, &tail[..500], MASK);
    fragmented.extend(client_frame(true, OpCode::Continuation, &tail[500..], MASK));
    check_close_codes(
        addr,
        &[
            (
                "truncated at the end of one frame".into(),
                client_frame(true, OpCode::Text, &tail, MASK),
                1007,
            ),
            (
                "truncated at the end of the last fragment".into(),
                fragmented,
                1007,
            ),
        ],
    );
    assert_eq!(server.stats().protocol_errors, 5);
    assert_eq!(server.stats().messages_echoed, 0);
}

#[test]
fn valid_utf8_split_across_fragments_and_reads_is_echoed_whole() {
    let _one = exclusive();
    let server = start();
    // The counterpart of the test above: four-byte characters straddling
    // every 64 KiB fragment boundary and every odd-sized write.
    let mut text = String::from("a");
    while text.len() < MIB {
        text.push('😀');
    }
    let mut s = raw_ws(server.local_addr(), "/echo");
    let parts: Vec<&[u8]> = text.as_bytes().chunks(64 * KIB).collect();
    let mut bytes = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let op = if i == 0 {
            OpCode::Text
        } else {
            OpCode::Continuation
        };
        bytes.extend(client_frame(i == parts.len() - 1, op, part, MASK));
    }
    write_in_chunks(&mut s, &bytes, 4093);
    let (fin, op, payload) = read_frame(&mut s);
    assert!(fin && op == 0x1, "one text frame back");
    assert!(payload == text.as_bytes(), "echoed intact");
    assert_eq!(server.stats().protocol_errors, 0);
}
