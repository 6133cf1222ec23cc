//! The opt-in envelope (`corecast.v1`, `corecast.v1.binary`): each form by
//! its subprotocol, raw subscribers unchanged, one order per topic with
//! strictly consecutive sequence numbers at every subscriber, epochs.
//! Clients are tungstenite (an independent implementation); the JSON is
//! read with serde_json.

mod common;

use common::*;
use std::time::Duration;
use tungstenite::Message;

#[test]
fn each_subscriber_gets_the_form_its_subprotocol_names_and_raw_ones_are_unchanged() {
    let server = start_with(|c| c.subprotocols = vec!["chat".into()]);
    let addr = server.local_addr();
    let (mut raw, p) = subscribe_with(addr, "/ws?topics=fx", "");
    assert_eq!(p, None);
    let (mut raw2, p) = subscribe_with(addr, "/ws?topics=fx", "corecast.raw");
    assert_eq!(p.as_deref(), Some("corecast.raw"));
    let (mut json, p) = subscribe_with(addr, "/ws?topics=fx", "corecast.v1");
    assert_eq!(p.as_deref(), Some("corecast.v1"));
    let (mut bin, p) = subscribe_with(addr, "/ws?topics=fx", "x, corecast.v1.binary");
    assert_eq!(p.as_deref(), Some("corecast.v1.binary"));
    let (mut chat, p) = subscribe_with(addr, "/ws?topics=fx", "corecast.v1, chat");
    assert_eq!(
        p.as_deref(),
        Some("chat"),
        "--subprotocol's names come first, and carry raw payloads"
    );
    let (mut both, p) = subscribe_with(addr, "/ws?topics=fx", "corecast.v1, corecast.v1.binary");
    assert_eq!(
        p.as_deref(),
        Some("corecast.v1.binary"),
        "server preference"
    );

    let text = "q \"1.0842\" \\ \n é";
    publish(addr, "fx", text.as_bytes()); // binary (no text/ content type)
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    use std::io::Write;
    s.write_all(&post_with("fx", "text/plain", text.as_bytes(), ""))
        .unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 204"));

    for ws in [&mut raw, &mut raw2, &mut chat] {
        assert_eq!(
            ws.read().unwrap(),
            Message::binary(text.as_bytes().to_vec())
        );
        assert_eq!(ws.read().unwrap(), Message::text(text));
    }
    let mut seen = Vec::new();
    for ws in [&mut json, &mut bin, &mut both] {
        let a = read_env(ws);
        let b = read_env(ws);
        assert_eq!((a.topic.as_str(), a.seq, a.text), ("fx", 1, false));
        assert_eq!((b.topic.as_str(), b.seq, b.text), ("fx", 2, true));
        assert_eq!(a.payload, text.as_bytes());
        assert_eq!(b.payload, text.as_bytes());
        assert_eq!(a.epoch, b.epoch);
        seen.push(a.epoch);
    }
    assert!(
        seen.iter().all(|&e| e == seen[0] && e > 0),
        "one epoch: {seen:?}"
    );
    // Control replies stay JSON text in every form.
    bin.send(Message::text(r#"{"op":"subscribe","topics":["gx"]}"#))
        .unwrap();
    match bin.read().unwrap() {
        Message::Text(t) => assert!(t.contains("subscribed"), "{t}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_topic_forgotten_and_used_again_starts_a_new_epoch_at_sequence_one() {
    // Without history a topic nobody holds is forgotten at once (with it,
    // retained: `a_lone_subscriber_recovers_what_was_published_while_it_was_away`).
    let server = start_with(|c| c.history.size = 0);
    let addr = server.local_addr();
    let (mut a, _) = subscribe_with(addr, "/ws?topics=ep", "corecast.v1");
    publish(addr, "ep", b"1");
    publish(addr, "ep", b"2");
    let first = read_env(&mut a);
    assert_eq!(read_env(&mut a).seq, 2);
    // While anyone holds the topic, its numbers go on.
    let (mut b, _) = subscribe_with(addr, "/ws?topics=ep", "corecast.v1.binary");
    publish(addr, "ep", b"3");
    assert_eq!(read_env(&mut a).seq, 3);
    let e = read_env(&mut b);
    assert_eq!((e.epoch, e.seq), (first.epoch, 3));
    drop(a);
    drop(b);
    // The server forgets the topic once its last subscriber is gone.
    assert!(eventually(Duration::from_secs(10), || metric(
        &metrics(addr),
        "corecast_topics"
    ) == 0));
    let (mut c, _) = subscribe_with(addr, "/ws?topics=ep", "corecast.v1");
    publish(addr, "ep", b"4");
    let e = read_env(&mut c);
    assert_eq!(e.seq, 1, "a new lifetime starts at 1");
    assert!(e.epoch > first.epoch, "and has a new epoch");
}

/// One order per topic with sequence numbers: publishers on four workers
/// publish to one topic at once while subscribers (both forms, on every
/// worker) are connected, and more subscribers join in the middle; at each
/// subscriber the numbers are strictly consecutive from its first, and
/// every two subscribers agree on what each number carries.
#[test]
fn concurrent_publishers_give_every_subscriber_consecutive_numbers_of_one_order() {
    let server = start_with(|c| c.workers = 4);
    let addr = server.local_addr();
    const PUBLISHERS: u8 = 6;
    const EACH: u32 = 1500;
    let total = u64::from(PUBLISHERS) * u64::from(EACH);
    let form = |i: usize| {
        if i.is_multiple_of(2) {
            "corecast.v1"
        } else {
            "corecast.v1.binary"
        }
    };
    let mut early: Vec<Ws> = (0..8)
        .map(|i| subscribe_with(addr, "/ws?topics=seq", form(i)).0)
        .collect();
    let pubs: Vec<Ws> = (0..PUBLISHERS)
        .map(|_| connect(addr, "/publish/seq"))
        .collect();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(PUBLISHERS as usize + 1));
    let senders: Vec<_> = pubs
        .into_iter()
        .enumerate()
        .map(|(p, mut ws)| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..EACH {
                    let mut m = vec![p as u8];
                    m.extend_from_slice(&i.to_be_bytes());
                    ws.send(Message::binary(m)).unwrap();
                    if i % 10 == 0 {
                        // Long enough for the late joiners to join mid-stream.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                ws.flush().unwrap();
                ws
            })
        })
        .collect();
    barrier.wait();
    // Late joiners, while the publishers run.
    let late: Vec<Ws> = (0..8)
        .map(|i| {
            std::thread::sleep(Duration::from_millis(5));
            subscribe_with(addr, "/ws?topics=seq", form(i)).0
        })
        .collect();
    let read_all = |mut ws: Ws, until: u64| {
        std::thread::spawn(move || {
            let mut got: Vec<Env> = Vec::new();
            loop {
                let e = read_env(&mut ws);
                let done = e.seq == until;
                got.push(e);
                if done {
                    return got;
                }
            }
        })
    };
    let readers: Vec<_> = early
        .drain(..)
        .chain(late)
        .map(|ws| read_all(ws, total))
        .collect();
    let _pubs: Vec<Ws> = senders.into_iter().map(|h| h.join().unwrap()).collect();
    let got: Vec<Vec<Env>> = readers.into_iter().map(|h| h.join().unwrap()).collect();
    let reference = &got[0];
    assert_eq!(
        reference.len() as u64,
        total,
        "an early subscriber gets all"
    );
    for (i, g) in got.iter().enumerate() {
        let first = g[0].seq;
        for (k, e) in g.iter().enumerate() {
            assert_eq!(e.seq, first + k as u64, "subscriber {i}: consecutive");
            assert_eq!(e.epoch, reference[0].epoch);
            assert_eq!(
                e.payload,
                reference[(e.seq - 1) as usize].payload,
                "subscriber {i}: number {} carries what it carries everywhere",
                e.seq
            );
        }
        if i < 8 {
            assert_eq!(first, 1, "subscriber {i} was there from the start");
        } else {
            assert!(
                first > 1,
                "subscriber {i} joined mid-stream (else: pace the publishers)"
            );
        }
    }
    // Each publisher's own messages in its order.
    for p in 0..PUBLISHERS {
        let mine: Vec<u32> = reference
            .iter()
            .filter(|e| e.payload[0] == p)
            .map(|e| u32::from_be_bytes(e.payload[1..5].try_into().unwrap()))
            .collect();
        assert_eq!(mine, (0..EACH).collect::<Vec<_>>());
    }
}

/// The issue's proof: subscribers cut off in the middle of a stream come
/// back (on whichever worker) with `since` while publishing goes on, and
/// each ends with exactly the full sequence, no gap and no duplicate.
#[test]
fn subscribers_cut_off_mid_stream_recover_with_since_and_get_every_number_once() {
    let server = start_with(|c| {
        c.workers = 4;
        c.history.size = 10_000;
    });
    let addr = server.local_addr();
    const TOTAL: u64 = 3000;
    let subscribers: Vec<_> = (0..6)
        .map(|i| {
            let form = if i % 2 == 0 {
                "corecast.v1"
            } else {
                "corecast.v1.binary"
            };
            let (mut ws, _) = subscribe_with(addr, "/ws", form);
            let (reply, early) = subscribe_since(&mut ws, "rec", None);
            assert_eq!(reply["op"], "subscribed");
            assert!(early.is_empty());
            (ws, form, i)
        })
        .collect();
    let mut publisher = connect(addr, "/publish/rec");
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|(mut ws, form, i)| {
            std::thread::spawn(move || {
                let mut seen: Vec<u64> = Vec::new();
                let mut cuts = 0;
                // Cut off after these numbers (different per subscriber).
                let cut_at = [400 + 37 * i, 1300 + 91 * i, 2200 + 53 * i];
                while seen.last() != Some(&TOTAL) {
                    let e = match read_incoming(&mut ws) {
                        Incoming::Pub(e) => e,
                        Incoming::Reply(v) => panic!("unexpected reply {v}"),
                    };
                    let epoch = e.epoch;
                    seen.push(e.seq);
                    if cuts < cut_at.len() && e.seq == cut_at[cuts] {
                        cuts += 1;
                        // Gone without a close handshake, then back.
                        drop(ws);
                        let (fresh, _) = subscribe_with(addr, "/ws", form);
                        ws = fresh;
                        let (reply, early) = subscribe_since(&mut ws, "rec", Some((epoch, e.seq)));
                        assert!(early.is_empty(), "nothing before the reply");
                        let r = &reply["recovery"]["rec"];
                        assert_eq!(r["complete"], true, "{reply}");
                        assert_eq!(r["epoch"].as_u64(), Some(epoch));
                        assert_eq!(r["from"].as_u64(), Some(e.seq + 1), "{reply}");
                    }
                }
                assert_eq!(cuts, 3, "subscriber {i} was cut off three times");
                seen
            })
        })
        .collect();
    for n in 0..TOTAL {
        publisher
            .send(Message::binary(n.to_be_bytes().to_vec()))
            .unwrap();
        if n % 20 == 0 {
            publisher.flush().unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    publisher.flush().unwrap();
    for (i, h) in readers.into_iter().enumerate() {
        let seen = h.join().unwrap();
        assert_eq!(
            seen,
            (1..=TOTAL).collect::<Vec<_>>(),
            "subscriber {i}: every number once, in order"
        );
    }
    let m = metrics(addr);
    assert_eq!(metric(&m, "corecast_recoveries_complete_total"), 18);
    assert_eq!(metric(&m, "corecast_recoveries_incomplete_total"), 0);
}

#[test]
fn an_incomplete_recovery_says_why_and_what_it_replays() {
    let server = start_with(|c| c.history.size = 5);
    let addr = server.local_addr();
    let (mut a, _) = subscribe_with(addr, "/ws?topics=inc", "corecast.v1");
    for n in 1..=20u8 {
        publish(addr, "inc", &[n]);
    }
    let mut epoch = 0;
    for n in 1..=20 {
        let e = read_env(&mut a);
        assert_eq!(e.seq, n);
        epoch = e.epoch;
    }
    let (mut b, _) = subscribe_with(addr, "/ws", "corecast.v1.binary");
    let (reply, _) = subscribe_since(&mut b, "inc", Some((epoch, 3)));
    let r = &reply["recovery"]["inc"];
    assert_eq!(r["complete"], false);
    assert_eq!(r["reason"], "too_old");
    assert_eq!((r["from"].as_u64(), r["to"].as_u64()), (Some(16), Some(20)));
    for n in 16..=20u8 {
        let e = read_env(&mut b);
        assert_eq!((e.seq, e.payload.as_slice()), (u64::from(n), &[n][..]));
    }
    let (mut c, _) = subscribe_with(addr, "/ws", "corecast.v1");
    let (reply, _) = subscribe_since(&mut c, "inc", Some((epoch - 1, 19)));
    let r = &reply["recovery"]["inc"];
    assert_eq!(
        (r["complete"].as_bool(), r["reason"].as_str()),
        (Some(false), Some("epoch"))
    );
    assert_eq!(
        r["epoch"].as_u64(),
        Some(epoch),
        "the epoch to start over in"
    );
    for n in 16..=20 {
        assert_eq!(read_env(&mut c).seq, n, "from the oldest the history holds");
    }
    // A bad since is an error reply; the connection stays.
    c.send(Message::text(
        r#"{"op":"subscribe","topics":["x"],"since":{"y":{"epoch":1,"seq":1}}}"#,
    ))
    .unwrap();
    match read_incoming(&mut c) {
        Incoming::Reply(v) => assert_eq!(v["op"], "error", "{v}"),
        Incoming::Pub(e) => panic!("{e:?}"),
    }
    let m = metrics(addr);
    assert_eq!(metric(&m, "corecast_recoveries_incomplete_total"), 2);
    assert_eq!(metric(&m, "corecast_messages_recovered_total"), 10);
}

/// A topic whose only subscriber went away keeps its history (retained),
/// HTTP publications to it go on being numbered, and the subscriber that
/// comes back recovers them all.
#[test]
fn a_lone_subscriber_recovers_what_was_published_while_it_was_away() {
    let server = start();
    let addr = server.local_addr();
    let (mut a, _) = subscribe_with(addr, "/ws?topics=solo", "corecast.v1");
    publish(addr, "solo", b"1");
    let first = read_env(&mut a);
    drop(a);
    assert!(eventually(Duration::from_secs(10), || metric(
        &metrics(addr),
        "corecast_retained_topics"
    ) == 1));
    for n in 2..=4u8 {
        publish(addr, "solo", &[b'0' + n]);
    }
    let (mut b, _) = subscribe_with(addr, "/ws", "corecast.v1");
    let (reply, _) = subscribe_since(&mut b, "solo", Some((first.epoch, first.seq)));
    assert_eq!(reply["recovery"]["solo"]["complete"], true, "{reply}");
    for n in 2..=4 {
        let e = read_env(&mut b);
        assert_eq!((e.epoch, e.seq), (first.epoch, n));
    }
    assert_eq!(
        metric(&metrics(addr), "corecast_retained_topics"),
        0,
        "held again"
    );
}

/// Large frames (and envelopes) are charged to the budget while a queue
/// holds them; what a history alone keeps is not charged but counted in
/// the history's bytes (within --history-memory), and a retained topic's
/// history ages out with the sweep.
#[test]
fn large_frames_a_history_keeps_count_in_its_bytes_not_in_the_budget() {
    let server = start_with(|c| {
        c.workers = 1;
        c.history.size = 5;
        c.history.age = Duration::from_secs(1);
    });
    let addr = server.local_addr();
    let (mut sub, _) = subscribe_with(addr, "/ws?topics=big", "corecast.v1.binary");
    let mut publisher = connect(addr, "/publish/big");
    for _ in 0..20 {
        publisher.send(Message::binary(vec![1u8; 65_536])).unwrap();
    }
    for n in 1..=20 {
        assert_eq!(read_env(&mut sub).seq, n);
    }
    let held = || metric(&metrics(addr), "corecast_buffered_bytes");
    let registry = corecast::pubsub::shard::TOPIC_ENTRY_BYTES as u64 + 2 * 3 + 80;
    let frame = 65_536 + 10;
    // Everything written: only the registry stays charged. The history
    // holds the last five messages with the binary envelope built for
    // them (20 B header and the topic): both count in its bytes (with
    // ENTRY_OVERHEAD_BYTES per message).
    assert_eq!(settle(Duration::from_secs(5), held, registry), registry);
    let envelope = frame + 20 + 3;
    let entry = corecast::pubsub::history::ENTRY_OVERHEAD_BYTES as u64;
    let history = 5 * (frame + envelope + entry);
    assert_eq!(metric(&metrics(addr), "corecast_history_bytes"), history);
    drop(sub);
    drop(publisher);
    // Retained for its history, then aged out (1 s): nothing held.
    assert_eq!(settle(Duration::from_secs(10), held, 0), 0);
    let retained = || metric(&metrics(addr), "corecast_retained_topics");
    assert_eq!(settle(Duration::from_secs(10), retained, 0), 0);
    // (The history's bytes are given back just after the count drops.)
    let history = || metric(&metrics(addr), "corecast_history_bytes");
    assert_eq!(settle(Duration::from_secs(5), history, 0), 0);
}

#[test]
fn an_http_publish_is_answered_with_the_number_it_got() {
    let server = start();
    let addr = server.local_addr();
    let head = |s: &mut std::net::TcpStream, topic: &str| {
        use std::io::Write;
        s.write_all(&post(topic, b"x")).unwrap();
        read_head(s)
    };
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let h = head(&mut s, "nobody");
    assert!(h.starts_with("HTTP/1.1 204"), "{h}");
    assert!(!h.contains("Corecast-Seq"), "no entry, no number: {h}");
    let (mut sub, _) = subscribe_with(addr, "/ws?topics=num", "corecast.v1");
    for n in 1..=3u64 {
        let h = head(&mut s, "num");
        let e = read_env(&mut sub);
        assert!(h.contains(&format!("Corecast-Seq: {n}\r\n")), "{h}");
        assert!(
            h.contains(&format!("Corecast-Epoch: {}\r\n", e.epoch)),
            "{h}"
        );
        assert_eq!(e.seq, n);
    }
}

/// Reads a snapshot marker and returns (topic, epoch, seq).
#[test]
fn a_new_enveloped_subscriber_gets_the_last_value_marked_then_the_live_stream() {
    let server = start();
    let addr = server.local_addr();
    // Someone holds the topic so it has a history.
    let (mut first, _) = subscribe_with(addr, "/ws?topics=lv", "corecast.v1");
    for n in 1..=3u8 {
        publish(addr, "lv", &[b'0' + n]);
    }
    assert_eq!(read_env(&mut first).seq, 1);
    for form in ["corecast.v1", "corecast.v1.binary"] {
        let (mut ws, _) = subscribe_with(addr, "/ws?topics=lv", form);
        let (topic, epoch, seq) = read_marker(&mut ws);
        let e = read_env(&mut ws);
        assert_eq!((topic.as_str(), seq), ("lv", 3), "{form}");
        assert_eq!(
            (e.epoch, e.seq, e.payload.as_slice()),
            (epoch, 3, &b"3"[..])
        );
    }
    // By control message too, and only for topics newly held.
    let (mut c, _) = subscribe_with(addr, "/ws", "corecast.v1.binary");
    let (reply, _) = subscribe_since(&mut c, "lv", None);
    assert!(reply.get("recovery").is_none(), "{reply}");
    assert_eq!(read_marker(&mut c).2, 3);
    assert_eq!(read_env(&mut c).seq, 3);
    publish(addr, "lv", b"4");
    assert_eq!(read_env(&mut c).seq, 4, "then live, nothing twice");
    // A raw subscriber gets no snapshot: its first message is the next one.
    let mut raw = connect(addr, "/ws?topics=lv");
    publish(addr, "lv", b"5");
    assert_eq!(raw.read().unwrap(), Message::binary(b"5".to_vec()));
    assert_eq!(metric(&metrics(addr), "corecast_snapshots_sent_total"), 3);
}

#[test]
fn no_last_value_turns_snapshots_off() {
    let server = start_with(|c| c.last_value = false);
    let addr = server.local_addr();
    let _holder = subscribe_with(addr, "/ws?topics=nolv", "corecast.v1").0;
    publish(addr, "nolv", b"1");
    let (mut ws, _) = subscribe_with(addr, "/ws?topics=nolv", "corecast.v1");
    publish(addr, "nolv", b"2");
    assert_eq!(
        read_env(&mut ws).seq,
        2,
        "no snapshot: the next publication first"
    );
}

/// A WebSocket publisher that negotiates corecast.v1 gets one
/// acknowledgement per message, with the number its subscribers see; one
/// without it gets none.
#[test]
fn a_websocket_publisher_can_ask_for_acknowledgements() {
    let server = start_with(|c| c.workers = 2);
    let addr = server.local_addr();
    let (mut sub, _) = subscribe_with(addr, "/ws?topics=acks", "corecast.v1.binary");
    let (mut acked, p) = subscribe_with(addr, "/publish/acks", "corecast.v1");
    assert_eq!(p.as_deref(), Some("corecast.v1"));
    let mut plain = connect(addr, "/publish/acks");
    for n in 0..5u8 {
        acked.send(Message::binary(vec![n])).unwrap();
    }
    plain.send(Message::binary(vec![9])).unwrap();
    let mut seqs = Vec::new();
    for _ in 0..5 {
        match acked.read().unwrap() {
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(v["op"], "ack", "{t}");
                seqs.push((v["epoch"].as_u64().unwrap(), v["seq"].as_u64().unwrap()));
            }
            other => panic!("{other:?}"),
        }
    }
    let mut seen = std::collections::HashMap::new();
    for _ in 0..6 {
        let e = read_env(&mut sub);
        seen.insert(e.payload[0], (e.epoch, e.seq));
    }
    for n in 0..5u8 {
        assert_eq!(
            seqs[n as usize], seen[&n],
            "the ack names the number subscribers see"
        );
    }
    // The plain publisher gets nothing but what keepalive sends.
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = plain.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
    }
    assert!(
        plain.read().is_err(),
        "no acknowledgement without corecast.v1"
    );
}

/// One subscribe's replay is capped as a whole (half of
/// --max-outbound-bytes), however many topics it names.
#[test]
fn one_subscribe_replays_at_most_half_a_queue_over_all_its_topics() {
    let server = start_with(|c| c.max_outbound_bytes = 64 * 1024);
    let addr = server.local_addr();
    let (mut holder, _) = subscribe_with(addr, "/ws?topics=ca,cb", "corecast.v1.binary");
    let mut epochs = std::collections::HashMap::new();
    for topic in ["ca", "cb"] {
        for _ in 0..10 {
            publish(addr, topic, &[7u8; 4096]);
        }
    }
    for _ in 0..20 {
        let e = read_env(&mut holder);
        epochs.insert(e.topic.clone(), e.epoch);
    }
    let (mut ws, _) = subscribe_with(addr, "/ws", "corecast.v1.binary");
    let msg = format!(
        r#"{{"op":"subscribe","topics":["ca","cb"],"since":{{"ca":{{"epoch":{},"seq":0}},"cb":{{"epoch":{},"seq":0}}}}}}"#,
        epochs["ca"], epochs["cb"]
    );
    ws.send(Message::text(msg)).unwrap();
    let reply = match read_incoming(&mut ws) {
        Incoming::Reply(v) => v,
        Incoming::Pub(e) => panic!("{e:?}"),
    };
    let (a, b) = (&reply["recovery"]["ca"], &reply["recovery"]["cb"]);
    // The cap counts raw frames, 4096 + 4 bytes each: 7 fit in 32 KiB.
    assert_eq!(
        (a["from"].as_u64(), a["to"].as_u64()),
        (Some(4), Some(10)),
        "{reply}"
    );
    assert_eq!(a["reason"], "capped");
    assert_eq!(
        (b["from"].as_u64(), b["to"].as_u64()),
        (Some(11), Some(10)),
        "{reply}"
    );
    assert_eq!(b["reason"], "capped", "nothing left for the second topic");
    for n in 4..=10 {
        assert_eq!(read_env(&mut ws).seq, n);
    }
}

#[test]
fn namespace_policies_set_history_and_last_value_per_topic_prefix() {
    use corecast::pubsub::policy::NamespacePolicy;
    let server = start_with(|c| {
        c.namespaces = vec![
            NamespacePolicy {
                prefix: "prices".into(),
                history_size: Some(2),
                ..Default::default()
            },
            NamespacePolicy {
                prefix: "quiet".into(),
                last_value: Some(false),
                ..Default::default()
            },
        ];
    });
    let addr = server.local_addr();
    let (mut holder, _) = subscribe_with(addr, "/ws?topics=prices.a,quiet.x,other", "corecast.v1");
    let mut epochs = std::collections::HashMap::new();
    for topic in ["prices.a", "quiet.x", "other"] {
        for n in 1..=5u8 {
            publish(addr, topic, &[b'0' + n]);
        }
    }
    for _ in 0..15 {
        let e = read_env(&mut holder);
        epochs.insert(e.topic.clone(), e.epoch);
    }
    let (mut ws, _) = subscribe_with(addr, "/ws", "corecast.v1");
    for (topic, from) in [("prices.a", 4), ("other", 1)] {
        let (reply, _) = subscribe_since(&mut ws, topic, Some((epochs[topic], 0)));
        let r = &reply["recovery"][topic];
        assert_eq!(r["from"].as_u64(), Some(from), "{topic}: {reply}");
        for n in from..=5 {
            assert_eq!(read_env(&mut ws).seq, n);
        }
    }
    // No last value in `quiet`: the next message is the first one.
    let (mut q, _) = subscribe_with(addr, "/ws?topics=quiet.x", "corecast.v1");
    publish(addr, "quiet.x", b"6");
    let e = read_env(&mut q);
    assert_eq!((e.seq, e.snapshot), (6, false));
    // Elsewhere there is one.
    let (mut o, _) = subscribe_with(addr, "/ws?topics=prices.a", "corecast.v1");
    let e = read_env(&mut o);
    assert_eq!((e.seq, e.snapshot), (5, true));
}

/// The replay cap counts frames as queued, in the subscriber's form: a last
/// value whose JSON envelope (control characters escaped six-fold) would
/// pass half the queue is not sent, so the subscriber is not made a slow
/// consumer by its own snapshot.
#[test]
fn a_last_value_too_big_in_its_envelope_is_not_sent() {
    let server = start();
    let addr = server.local_addr();
    let _holder = connect(addr, "/ws?topics=esc");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    use std::io::Write;
    // 400 KiB of \x01: 2.4 MiB as JSON, over half of the 4 MiB queue.
    s.write_all(&post_with("esc", "text/plain", &vec![1u8; 400 * 1024], ""))
        .unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 204"));
    let (mut json, _) = subscribe_with(addr, "/ws?topics=esc", "corecast.v1");
    let (mut bin, _) = subscribe_with(addr, "/ws?topics=esc", "corecast.v1.binary");
    let e = read_env(&mut bin);
    assert_eq!((e.seq, e.snapshot), (1, true), "the binary form fits");
    publish(addr, "esc", b"small");
    let e = read_env(&mut json);
    assert_eq!(
        (e.seq, e.snapshot),
        (2, false),
        "no snapshot: the next message first"
    );
}

/// `{"op":"history"}` tells what a topic's history holds; `DELETE
/// /publish/{topic}` drops it (and the last value with it); a topic kept
/// for its history alone is forgotten with it.
#[test]
fn a_history_request_tells_the_range_and_delete_drops_the_last_value() {
    use std::io::Write;
    let server = start();
    let addr = server.local_addr();
    let (mut sub, _) = subscribe_with(addr, "/ws?topics=h", "corecast.v1");
    for i in 1..=3u8 {
        publish(addr, "h", &[i]);
    }
    for n in 1..=3 {
        assert_eq!(read_env(&mut sub).seq, n);
    }
    let history = |ws: &mut Ws| {
        ws.send(Message::text(r#"{"op":"history","topics":["h","nope"]}"#))
            .unwrap();
        match read_incoming(ws) {
            Incoming::Reply(v) => v,
            Incoming::Pub(e) => panic!("{e:?}"),
        }
    };
    let v = history(&mut sub);
    assert_eq!(v["op"], "history", "{v}");
    let epoch = v["history"]["h"]["epoch"].as_u64().unwrap();
    assert_eq!(
        (
            v["history"]["h"]["first"].as_u64(),
            v["history"]["h"]["last"].as_u64()
        ),
        (Some(1), Some(3))
    );
    assert!(v["history"]["nope"].is_null(), "{v}");
    let delete = |path: &str, extra: &str| {
        let mut s = raw(addr);
        s.write_all(
            format!("DELETE {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n")
                .as_bytes(),
        )
        .unwrap();
        String::from_utf8_lossy(&read_to_eof(&mut s)).into_owned()
    };
    let answer = delete("/publish/h", "");
    assert!(answer.starts_with("HTTP/1.1 204 "), "{answer}");
    assert!(answer.contains("Corecast-Deleted: 3"), "{answer}");
    let v = history(&mut sub);
    let h = &v["history"]["h"];
    assert_eq!(
        (h["epoch"].as_u64(), h["first"].as_u64(), h["last"].as_u64()),
        (Some(epoch), Some(4), Some(3)),
        "in use: same epoch, nothing held"
    );
    // No last value for a new subscriber now; numbers go on.
    let (mut late, _) = subscribe_with(addr, "/ws?topics=h", "corecast.v1");
    publish(addr, "h", b"4");
    let e = read_env(&mut late);
    assert_eq!((e.seq, e.snapshot), (4, false));
    assert_eq!(read_env(&mut sub).seq, 4);
    // Refusals.
    assert!(delete("/publish/nope", "").starts_with("HTTP/1.1 404 "));
    assert!(delete("/publish/h", "Content-Length: 2\r\n").starts_with("HTTP/1.1 400 "));
    assert!(delete("/publish/h.*", "").contains("cannot publish to a pattern"));
    sub.send(Message::text(r#"{"op":"history","topics":["h.*"]}"#))
        .unwrap();
    match read_incoming(&mut sub) {
        Incoming::Reply(v) => assert_eq!(v["op"], "error", "{v}"),
        Incoming::Pub(e) => panic!("{e:?}"),
    }
    // Kept for its history alone, then deleted: forgotten, a new epoch.
    drop((sub, late));
    let gone = eventually(Duration::from_secs(5), || {
        metric(&metrics(addr), "corecast_subscriptions") == 0
    });
    assert!(gone);
    assert!(delete("/publish/h", "").starts_with("HTTP/1.1 204 "));
    let (mut again, _) = subscribe_with(addr, "/ws?topics=h", "corecast.v1");
    publish(addr, "h", b"5");
    let e = read_env(&mut again);
    assert_eq!(e.seq, 1, "a new lifetime");
    assert_ne!(e.epoch, epoch);
}

/// Over `--max-recovery-rate`, a subscribe with `since` is answered
/// "recovery busy" with a delay and changes nothing; after it, the same
/// subscribe recovers.
#[test]
fn recoveries_are_admitted_at_a_bounded_rate() {
    let server = start_with(|c| {
        c.workers = 1;
        c.max_recovery_rate = 2;
    });
    let addr = server.local_addr();
    let (mut holder, _) = subscribe_with(addr, "/ws?topics=adm", "corecast.v1");
    publish(addr, "adm", b"1");
    let epoch = read_env(&mut holder).epoch;
    let mut busy = None;
    let mut clients = Vec::new();
    // The bucket holds two: the third in the same instant waits.
    for _ in 0..3 {
        let (mut ws, _) = subscribe_with(addr, "/ws", "corecast.v1");
        let (reply, _) = subscribe_since(&mut ws, "adm", Some((epoch, 0)));
        if reply["op"] == "error" {
            busy = Some(reply);
        }
        clients.push(ws);
    }
    let busy = busy.expect("one over the rate");
    assert_eq!(busy["reason"], "recovery busy: try again", "{busy}");
    let wait = busy["retry_ms"].as_u64().unwrap();
    assert!((1..=1000).contains(&wait), "{busy}");
    assert!(metric(&metrics(addr), "corecast_recoveries_deferred_total") >= 1);
    std::thread::sleep(Duration::from_millis(wait + 50));
    let ws = clients.last_mut().unwrap();
    let (reply, _) = subscribe_since(ws, "adm", Some((epoch, 0)));
    assert_eq!(reply["op"], "subscribed", "{reply}");
    assert_eq!(reply["recovery"]["adm"]["complete"], true, "{reply}");
    assert_eq!(read_env(ws).seq, 1);
}
