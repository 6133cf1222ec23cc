//! Wildcard subscriptions (`*` one token, `>` the rest) end to end, on the
//! backend `CORECAST_IO` names: each matching publication once per
//! connection whatever overlaps, consecutive numbers per topic, last values
//! and `since` through a pattern, the limits and refusals. Clients are
//! tungstenite; envelopes read as in tests/envelope.rs.

mod common;

use common::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tungstenite::Message;

fn text(ws: &mut Ws) -> serde_json::Value {
    match ws.read().expect("a message") {
        Message::Text(t) => serde_json::from_str(t.as_str()).expect("JSON"),
        other => panic!("expected text, got {other:?}"),
    }
}

/// Publications read until one to `last` arrives (included).
fn read_until(ws: &mut Ws, last: &str) -> Vec<Env> {
    let mut got = Vec::new();
    loop {
        let e = read_env(ws);
        let done = e.topic == last;
        got.push(e);
        if done {
            return got;
        }
    }
}

/// Waits until the server counts `n` pattern subscriptions (a
/// subscription made by another connection's handshake is in force once
/// counted).
fn wait_patterns(addr: SocketAddr, n: u64) {
    let ok = eventually(Duration::from_secs(10), || {
        metric(&metrics(addr), "corecast_pattern_subscriptions") == n
    });
    assert!(ok, "{n} pattern subscriptions");
}

#[test]
fn a_connection_gets_each_matching_publication_once_whatever_its_subscriptions_overlap() {
    let server = start_with(|c| c.workers = 4);
    let addr = server.local_addr();
    // Two patterns and a topic that all match prices.fx.EUR; `>` is sent
    // percent-encoded, as a browser does in a query.
    let (mut overlapping, proto) = subscribe_with(
        addr,
        "/ws?topics=prices.*.EUR,prices.%3E,prices.fx.EUR,end",
        "corecast.v1",
    );
    assert_eq!(proto.as_deref(), Some("corecast.v1"));
    let (mut star, _) = subscribe_with(addr, "/ws?topics=prices.*.EUR,end", "corecast.v1.binary");
    let (mut rest, _) = subscribe_with(addr, "/ws?topics=prices.%3E,end", "corecast.v1");
    wait_patterns(addr, 4);
    let topics = [
        "prices.fx.EUR",
        "prices.fx.USD",
        "prices",
        "news.fx.EUR",
        "prices.a.b.EUR",
        "prices.eq.EUR",
    ];
    for round in 0..5u8 {
        for t in topics {
            publish(addr, t, &[round]);
        }
    }
    publish(addr, "end", b"");
    let count = |got: &[Env]| {
        let mut n: HashMap<String, Vec<u64>> = HashMap::new();
        for e in got {
            n.entry(e.topic.clone()).or_default().push(e.seq);
        }
        n
    };
    let all = count(&read_until(&mut overlapping, "end"));
    let five: Vec<u64> = (1..=5).collect();
    for t in [
        "prices.fx.EUR",
        "prices.fx.USD",
        "prices.a.b.EUR",
        "prices.eq.EUR",
    ] {
        assert_eq!(all.get(t), Some(&five), "{t}: each number once, in order");
    }
    assert!(
        !all.contains_key("prices"),
        "`prices.>` needs a token after"
    );
    assert!(!all.contains_key("news.fx.EUR"));
    let s = count(&read_until(&mut star, "end"));
    assert_eq!(s.len(), 3, "{s:?}");
    assert_eq!(s["prices.fx.EUR"], five);
    assert_eq!(s["prices.eq.EUR"], five);
    let r = count(&read_until(&mut rest, "end"));
    assert_eq!(r.len(), 5, "{r:?}");
    // Leaving a pattern keeps the others; leaving all stops delivery.
    overlapping
        .send(Message::text(
            r#"{"op":"unsubscribe","topics":["prices.>","prices.*.EUR"]}"#,
        ))
        .unwrap();
    assert_eq!(text(&mut overlapping)["op"], "unsubscribed");
    wait_patterns(addr, 2);
    publish(addr, "prices.fx.USD", b"x");
    publish(addr, "prices.fx.EUR", b"y");
    publish(addr, "end", b"");
    let after = read_until(&mut overlapping, "end");
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(after[0].topic, "prices.fx.EUR");
    assert_eq!(after[0].seq, 6);
}

#[test]
fn publishing_to_a_pattern_and_malformed_patterns_are_refused_with_reasons() {
    let server = start();
    let addr = server.local_addr();
    let answer = refused(addr, &post("prices.*", b"x"));
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("cannot publish to a pattern"), "{answer}");
    let answer = refused(addr, upgrade_request("/publish/news.>").as_bytes());
    assert!(answer.contains("cannot publish to a pattern"), "{answer}");
    for bad in ["a*", "a.%3E.b", "%3E%3E"] {
        let answer = refused(
            addr,
            upgrade_request(&format!("/ws?topics={bad}")).as_bytes(),
        );
        assert!(answer.starts_with("HTTP/1.1 400 "), "{bad}: {answer}");
        assert!(answer.contains("bad pattern"), "{bad}: {answer}");
    }
    let mut ws = connect(addr, "/ws");
    ws.send(Message::text(r#"{"op":"subscribe","topics":["a.>.b"]}"#))
        .unwrap();
    let v = text(&mut ws);
    assert_eq!(v["op"], "error");
    assert!(v["reason"].as_str().unwrap().contains("bad pattern"), "{v}");
}

#[test]
fn patterns_per_connection_are_capped() {
    let server = start_with(|c| c.max_patterns_per_conn = 2);
    let addr = server.local_addr();
    let answer = refused(addr, upgrade_request("/ws?topics=a.*,b.*,c.*").as_bytes());
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("--max-patterns-per-conn"), "{answer}");
    let mut ws = connect(addr, "/ws?topics=a.*,x");
    ws.send(Message::text(
        r#"{"op":"subscribe","topics":["b.*","c.*"]}"#,
    ))
    .unwrap();
    let v = text(&mut ws);
    assert_eq!(v["op"], "error", "{v}");
    assert!(v["reason"].as_str().unwrap().contains("at most 2"), "{v}");
    ws.send(Message::text(r#"{"op":"subscribe","topics":["b.*","y"]}"#))
        .unwrap();
    assert_eq!(text(&mut ws)["op"], "subscribed", "the second fits");
}

/// Publishers on several workers, pattern subscribers joining while they
/// publish: at every subscriber each topic's numbers are consecutive from
/// the first it got, and the same number carries the same payload.
#[test]
fn pattern_subscribers_joining_mid_stream_see_consecutive_numbers_per_topic() {
    let server = start_with(|c| c.workers = 4);
    let addr = server.local_addr();
    const EACH: u32 = 800;
    let topics = ["feed.a", "feed.b", "feed.c"];
    // Keeps the topics' lifetimes (and epochs) for the whole run.
    let (mut witness, _) = subscribe_with(addr, "/ws?topics=feed.a,feed.b,feed.c", "corecast.v1");
    let pubs: Vec<Ws> = (0..6)
        .map(|i| connect(addr, &format!("/publish/{}", topics[i % 3])))
        .collect();
    let senders: Vec<_> = pubs
        .into_iter()
        .enumerate()
        .map(|(p, mut ws)| {
            std::thread::spawn(move || {
                for i in 0..EACH {
                    let mut m = vec![p as u8];
                    m.extend_from_slice(&i.to_be_bytes());
                    ws.send(Message::binary(m)).unwrap();
                    if i % 20 == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                ws.flush().unwrap();
                ws
            })
        })
        .collect();
    let joiners: Vec<Ws> = (0..8)
        .map(|i| {
            std::thread::sleep(Duration::from_millis(4));
            let path = if i % 2 == 0 {
                "/ws?topics=feed.*"
            } else {
                "/ws?topics=feed.%3E,feed.b"
            };
            subscribe_with(addr, path, "corecast.v1.binary").0
        })
        .collect();
    let _pubs: Vec<Ws> = senders.into_iter().map(|h| h.join().unwrap()).collect();
    // Each topic ends at 2 * EACH; read until all three did.
    let read_all = |mut ws: Ws| {
        std::thread::spawn(move || {
            let mut per: HashMap<String, Vec<Env>> = HashMap::new();
            while per.len() < 3
                || per
                    .values()
                    .any(|v| v.last().unwrap().seq < 2 * EACH as u64)
            {
                let e = read_env(&mut ws);
                per.entry(e.topic.clone()).or_default().push(e);
            }
            per
        })
    };
    let reference = read_all(std::mem::replace(&mut witness, connect(addr, "/ws")))
        .join()
        .unwrap();
    let got: Vec<_> = joiners.into_iter().map(read_all).collect();
    let mut joined_late = 0;
    for (i, h) in got.into_iter().enumerate() {
        let per = h.join().unwrap();
        joined_late += usize::from(
            per.values()
                .any(|l| l[0].seq > 1 && l[0].seq < 2 * EACH as u64),
        );
        for (t, list) in &per {
            let first = list[0].seq;
            for (k, e) in list.iter().enumerate() {
                assert_eq!(
                    e.seq,
                    first + k as u64,
                    "joiner {i}, {t}: consecutive, once"
                );
                assert_eq!(
                    e.payload,
                    reference[t][(e.seq - 1) as usize].payload,
                    "joiner {i}, {t}: number {} carries one payload",
                    e.seq
                );
            }
        }
    }
    assert!(
        joined_late > 0,
        "some joined mid-stream (else: pace the publishers)"
    );
}

#[test]
fn a_pattern_subscription_starts_with_last_values_or_recovers_with_since() {
    let server = start();
    let addr = server.local_addr();
    // Topics with history, nobody subscribed any more: retained.
    let mut holder = connect(addr, "/ws?topics=q.a,q.b,other");
    for i in 1..=3u8 {
        publish(addr, "q.a", &[i]);
    }
    for i in 1..=2u8 {
        publish(addr, "q.b", &[10 + i]);
    }
    publish(addr, "other", b"o");
    for _ in 0..6 {
        holder.read().unwrap();
    }
    drop(holder);
    let (mut ws, _) = subscribe_with(addr, "/ws?topics=q.*", "corecast.v1");
    let mut snaps = vec![read_env(&mut ws), read_env(&mut ws)];
    snaps.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert!(snaps.iter().all(|e| e.snapshot), "{snaps:?}");
    assert_eq!((snaps[0].topic.as_str(), snaps[0].seq), ("q.a", 3));
    assert_eq!(snaps[0].payload, [3]);
    assert_eq!((snaps[1].topic.as_str(), snaps[1].seq), ("q.b", 2));
    let epoch = snaps[0].epoch;
    // A second connection recovers q.a after number 1 through the pattern,
    // and gets q.b's last value.
    let (mut again, _) = subscribe_with(addr, "/ws", "corecast.v1");
    again
        .send(Message::text(format!(
            r#"{{"op":"subscribe","topics":["q.*"],"since":{{"q.a":{{"epoch":{epoch},"seq":1}}}}}}"#
        )))
        .unwrap();
    let reply = text(&mut again);
    assert_eq!(reply["op"], "subscribed", "{reply}");
    let r = &reply["recovery"]["q.a"];
    assert_eq!(
        (r["from"].as_u64(), r["to"].as_u64()),
        (Some(2), Some(3)),
        "{reply}"
    );
    assert_eq!(r["complete"], true);
    let mut next: Vec<Env> = (0..3).map(|_| read_env(&mut again)).collect();
    next.sort_by_key(|e| (e.topic.clone(), e.seq));
    let seen: Vec<(&str, u64, bool)> = next
        .iter()
        .map(|e| (e.topic.as_str(), e.seq, e.snapshot))
        .collect();
    assert_eq!(
        seen,
        [("q.a", 2, false), ("q.a", 3, false), ("q.b", 2, true)]
    );
    // Then live, once each.
    publish(addr, "q.a", b"live");
    for ws in [&mut ws, &mut again] {
        let e = read_env(ws);
        assert_eq!((e.topic.as_str(), e.seq, e.snapshot), ("q.a", 4, false));
    }
    // A position for a topic no pattern of the message matches is refused.
    again
        .send(Message::text(
            r#"{"op":"subscribe","topics":["z.*"],"since":{"q.a":{"epoch":1,"seq":1}}}"#,
        ))
        .unwrap();
    assert_eq!(text(&mut again)["op"], "error");
}

/// A topic the connection already gets through one subscription is not
/// replayed by another: overlapping patterns give one last value, and a
/// topic subscribed to under a pattern that matches it joins live, its
/// numbers continuing without a repeat or a hole.
#[test]
fn overlapping_subscriptions_replay_a_topic_once_and_never_rejoin_its_stream() {
    let server = start();
    let addr = server.local_addr();
    let mut holder = connect(addr, "/ws?topics=o.a");
    publish(addr, "o.a", b"1");
    holder.read().unwrap();
    let (mut ws, _) = subscribe_with(addr, "/ws?topics=o.*,o.%3E", "corecast.v1");
    let e = read_env(&mut ws);
    assert!(e.snapshot && e.seq == 1, "{e:?}");
    publish(addr, "o.a", b"2");
    let e = read_env(&mut ws);
    assert_eq!((e.seq, e.snapshot), (2, false), "the last value came once");
    ws.send(Message::text(r#"{"op":"subscribe","topics":["o.a"]}"#))
        .unwrap();
    match read_incoming(&mut ws) {
        Incoming::Reply(v) => assert_eq!(v["op"], "subscribed", "{v}"),
        Incoming::Pub(e) => panic!("no snapshot for a topic held through a pattern: {e:?}"),
    }
    for n in 3..=5u64 {
        publish(addr, "o.a", &[n as u8]);
        let e = read_env(&mut ws);
        assert_eq!((e.seq, e.snapshot), (n, false));
    }
}

/// Subscribers that get a topic through a pattern switch to the topic
/// itself (subscribe to it, then leave the pattern), and others the other
/// way round, while publishers on both workers go on: their numbers stay
/// consecutive, each once.
#[test]
fn switching_from_a_pattern_to_the_topic_mid_stream_keeps_every_number() {
    let server = start_with(|c| c.workers = 2);
    let addr = server.local_addr();
    const SUBS: usize = 8;
    // Even ones start with the pattern, odd ones with the topic.
    let from = |k: usize| if k.is_multiple_of(2) { "sw.>" } else { "sw.x" };
    let to = |k: usize| if k.is_multiple_of(2) { "sw.x" } else { "sw.>" };
    let mut subs: Vec<Ws> = (0..SUBS)
        .map(|k| {
            let path = format!("/ws?topics={}", from(k).replace('>', "%3E"));
            subscribe_with(addr, &path, "corecast.v1").0
        })
        .collect();
    wait_patterns(addr, (SUBS / 2) as u64);
    // Four publishers (most likely on both workers), 1 500 each.
    const PER: u64 = 1500;
    const N: u64 = 4 * PER;
    let publishers: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut p = connect(addr, "/publish/sw.x");
                for i in 0..PER {
                    p.send(Message::binary(i.to_be_bytes().to_vec())).unwrap();
                }
                p
            })
        })
        .collect();
    let readers: Vec<_> = subs
        .drain(..)
        .enumerate()
        .map(|(k, mut sub)| {
            std::thread::spawn(move || {
                let mut seqs: Vec<u64> = Vec::new();
                let mut switched = false;
                while seqs.last() != Some(&N) {
                    match read_incoming(&mut sub) {
                        Incoming::Pub(e) => {
                            assert_eq!(e.topic, "sw.x");
                            seqs.push(e.seq);
                            if seqs.len() == 200 + 300 * (k / 2) && !switched {
                                switched = true;
                                // In one segment: one read, one turn.
                                let (new, old) = (to(k), from(k));
                                let subscribe =
                                    format!(r#"{{"op":"subscribe","topics":["{new}"]}}"#);
                                let leave = format!(r#"{{"op":"unsubscribe","topics":["{old}"]}}"#);
                                sub.write(Message::text(subscribe)).unwrap();
                                sub.write(Message::text(leave)).unwrap();
                                sub.flush().unwrap();
                            }
                        }
                        Incoming::Reply(v) => {
                            let op = v["op"].as_str().unwrap();
                            assert!(op == "subscribed" || op == "unsubscribed", "{v}");
                        }
                    }
                }
                seqs
            })
        })
        .collect();
    let _p: Vec<Ws> = publishers.into_iter().map(|p| p.join().unwrap()).collect();
    for (k, r) in readers.into_iter().enumerate() {
        let seqs = r.join().unwrap();
        let first = seqs[0];
        let holes: Vec<(u64, u64)> = seqs
            .windows(2)
            .filter(|w| w[1] != w[0] + 1)
            .map(|w| (w[0], w[1]))
            .collect();
        assert!(holes.is_empty(), "subscriber {k}: jumps {holes:?}");
        assert_eq!(seqs.len() as u64, N - first + 1);
    }
}
