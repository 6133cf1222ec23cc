//! The payload header, the sequence accounting, and what a shard of
//! subscribers counts and checks.

use super::*;
use corecast::proto::frame::parse_header;

#[test]
fn a_binary_envelope_is_unwrapped_to_its_payload() {
    let p = encode_payload_header(7, 99);
    let frame = corecast::pubsub::envelope::binary_frame(
        "topic",
        1,
        2,
        corecast::proto::frame::OpCode::Binary,
        &p,
    );
    // Skip the (short) WebSocket header the reader has already removed.
    let body = &frame[2..];
    assert_eq!(
        unwrap_binary_envelope(body).and_then(decode_payload),
        Some((7, 99))
    );
    assert_eq!(unwrap_binary_envelope(&p[..10]), None, "too short");
    assert_eq!(unwrap_binary_envelope(&[2; 40]), None, "another kind");
}

#[test]
fn payload_round_trips_through_a_masked_frame() {
    let mut out = Vec::new();
    push_message(&mut out, 7, 123_456_789, 64, [1, 2, 3, 4]);
    push_message(&mut out, u64::MAX, 1, 300, [9, 8, 7, 6]);
    let h = parse_header(&out).unwrap().unwrap();
    assert_eq!((h.fin, h.opcode, h.payload_len), (true, OpCode::Binary, 64));
    let mask = h.mask.expect("client frames are masked");
    let mut p = out[h.header_len..h.header_len + 64].to_vec();
    apply_mask(&mut p, mask, 0);
    assert_eq!(decode_payload(&p), Some((7, 123_456_789)));
    assert!(p[PAYLOAD_HEADER..].iter().all(|&b| b == 0));
    let rest = &out[h.header_len + 64..];
    let h2 = parse_header(rest).unwrap().unwrap();
    assert_eq!((h2.payload_len, h2.header_len), (300, 8));
    let mut p = rest[h2.header_len..].to_vec();
    assert_eq!(p.len(), 300);
    apply_mask(&mut p, h2.mask.unwrap(), 0);
    assert_eq!(decode_payload(&p), Some((u64::MAX, 1)));
    assert_eq!(decode_payload(&[0; 15]), None);
    assert_eq!(
        encode_payload_header(1, 2)[..9],
        [1, 0, 0, 0, 0, 0, 0, 0, 2]
    );
}

#[test]
fn in_order_delivery_counts_nothing_wrong() {
    let mut t = SeqTracker::default();
    for s in 0..100 {
        assert_eq!(t.record(s), Arrival::InOrder);
    }
    assert_eq!(
        (t.received, t.lost(100), t.out_of_order, t.duplicates),
        (100, 0, 0, 0)
    );
    assert!(t.missing.is_empty());
    // Messages never seen at the end are lost too.
    assert_eq!(t.lost(103), 3);
}

#[test]
fn gaps_reorders_and_duplicates() {
    let mut t = SeqTracker::default();
    assert_eq!(t.record(0), Arrival::InOrder);
    assert_eq!(t.record(3), Arrival::Gap(2));
    assert_eq!(t.lost(4), 2);
    assert_eq!(t.record(1), Arrival::Late);
    assert_eq!(t.record(1), Arrival::Duplicate);
    assert_eq!(t.record(3), Arrival::Duplicate);
    assert_eq!(t.record(0), Arrival::Duplicate);
    assert_eq!(t.record(4), Arrival::InOrder);
    assert_eq!(t.record(9), Arrival::Gap(4));
    assert_eq!(
        (t.received, t.lost(10), t.out_of_order, t.duplicates),
        (5, 5, 1, 3)
    );
    assert_eq!(t.record(2), Arrival::Late);
    assert_eq!(t.lost(10), 4);
    // Only numbers below the expected count are lost.
    assert_eq!(t.lost(7), 2);
}

#[test]
fn a_huge_gap_is_one_hole() {
    let mut t = SeqTracker::default();
    assert_eq!(t.record(1_000_000), Arrival::Gap(1_000_000));
    assert_eq!(t.missing.len(), 1);
    assert_eq!(t.lost(1_000_001), 1_000_000);
    assert_eq!(t.record(5), Arrival::Late);
    assert_eq!(t.record(5), Arrival::Duplicate);
    assert_eq!(t.record(0), Arrival::Late);
    assert_eq!(t.record(999_999), Arrival::Late);
    assert_eq!(t.missing.len(), 2, "{:?}", t.missing);
    assert_eq!(t.lost(1_000_001), 999_997);
    assert_eq!((t.out_of_order, t.duplicates), (3, 1));
}

#[test]
fn holes_beyond_the_cap_are_counted_not_remembered() {
    let mut t = SeqTracker::default();
    // Every other number lost: one hole each.
    for i in 0..(MAX_TRACKED_GAPS as u64 + 10) {
        t.record(2 * i + 1);
    }
    assert_eq!(t.missing.len(), MAX_TRACKED_GAPS);
    let n = 2 * (MAX_TRACKED_GAPS as u64 + 10);
    assert_eq!(t.lost(n), n / 2);
    // A remembered hole is filled exactly; an untracked one is assumed late.
    assert_eq!(t.record(0), Arrival::Late);
    assert_eq!(t.record(0), Arrival::Late);
    assert_eq!(t.lost(n), n / 2 - 2);
}

#[test]
fn delivery_counts_completion_latency_loss_and_strays() {
    let anchor = Anchor::now();
    let origin = anchor.ns(Instant::now());
    // Subscribers 0 and 2 on topic 0, 3 on topic 1; 1 was not up.
    let mut d = Delivery::new(
        vec![true, false, true, true],
        vec![0, 0, 0, 1],
        vec![2, 1],
        anchor,
    );
    let frame = |seq: u64, sent_ns: u64| {
        let mut p = encode_payload_header(seq, sent_ns).to_vec();
        p.resize(64, 0);
        p
    };
    let at = anchor.instant(origin + 500_000);
    d.message(0, OpCode::Binary, &frame(0, origin + 100_000), at);
    d.message(0, OpCode::Binary, &frame(1, origin + 200_000), at);
    d.message(0, OpCode::Binary, &frame(1, origin), at);
    d.message(1, OpCode::Binary, &frame(0, origin), at); // not tracked
    d.message(2, OpCode::Text, &frame(1, origin), at); // a gap: 0 is missing
    d.message(2, OpCode::Binary, b"short", at);
    d.message(3, OpCode::Binary, &frame(0, origin), at);
    assert_eq!(
        (
            d.arrivals.frames,
            d.complete,
            d.arrivals.wrong_opcode,
            d.arrivals.malformed
        ),
        (6, 2, 1, 1)
    );
    assert_eq!(d.latency.len(), 4);
    assert_eq!(d.latency.max_ns().unwrap() / 1000, 500);
    let mut r = ShardReport::default();
    d.report(&mut r);
    assert_eq!((r.tracked, r.expected, r.lost), (3, 5, 1));
    assert_eq!((r.duplicates, r.with_loss, r.with_reorder), (1, 1, 0));
    // Fewer published than planned: subscriber 2 is complete after all.
    d.set_targets(vec![0, 1]);
    assert_eq!(d.complete, 3);
}

#[test]
fn only_verified_subscribers_inflate_and_check_corpus_messages() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/quotes-1k.jsonl");
    let corpus = Arc::new(Corpus::load(&path).unwrap());
    let anchor = Anchor::now();
    let origin = anchor.ns(Instant::now());
    // Four subscribers of one topic, 0 and 2 verified; 3 was not up.
    let mut d = Delivery::new(vec![true; 4], vec![0; 4], vec![2], anchor)
        .verifying(|t| t % 2 == 0)
        .with_corpus(Some(corpus.clone()));
    d.tracked[3] = false;
    let at = anchor.instant(origin + 1_000_000);
    let message = |seq: u64| {
        let mut p = Vec::new();
        corpus.push_body(&mut p, seq, origin);
        p
    };
    let deflated = |seq: u64| corecast::proto::deflate::compress(&message(seq)).unwrap();
    for conn in 0..4 {
        d.compressed(conn, OpCode::Text, &deflated(0), at).unwrap();
    }
    d.message(0, OpCode::Text, &message(1), at);
    d.compressed(1, OpCode::Text, &deflated(1), at).unwrap();
    // Not the line its header names: malformed, so 2 lacks message 1.
    let mut wrong = message(1);
    let n = wrong.len();
    wrong[n - 2] ^= 1;
    d.message(2, OpCode::Text, &wrong, at);
    // Garbage is an error for a verified subscriber only.
    assert_eq!(
        d.compressed(2, OpCode::Text, &[0xff; 8], at),
        Err("bad_deflate_data")
    );
    assert_eq!(d.compressed(1, OpCode::Text, &[0xff; 8], at), Ok(()));
    assert_eq!(d.latency.len(), 3, "from the verified subscribers only");
    assert_eq!(d.arrivals.malformed, 1);
    assert_eq!(d.arrivals.frames, 8, "every frame of a tracked subscriber");
    assert!(d.arrivals.payload_bytes < 4 * 1000, "counted as received");
    let mut r = ShardReport::default();
    d.report(&mut r);
    assert_eq!((r.tracked, r.verified, r.expected), (3, 2, 6));
    // 1 counted a third frame: a duplicate, as far as it can tell.
    assert_eq!((r.lost, r.duplicates, r.complete), (1, 1, 2));
    assert_eq!(r.wrong_opcode, 0);
}
