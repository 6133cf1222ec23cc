//! Conflation end to end, on the backend `CORECAST_IO` names: a subscriber
//! that falls behind under `--slow-consumer conflate` keeps its connection,
//! ends with the newest value of every topic, and can tell conflation (a
//! marker naming how many were replaced) from loss; `always` per namespace
//! conflates at all times while other topics keep every publication.

mod common;

use common::*;
use corecast::pubsub::policy::{NamespacePolicy, SlowConsumerPolicy};
use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use tungstenite::Message;

/// A `corecast.v1` subscriber of `topics` that reads nothing until told
/// (a 4 KiB receive window).
fn stalled_enveloped(addr: SocketAddr, topics: &str) -> TcpStream {
    let mut s = tiny_window(addr);
    let req = upgrade_request(&format!("/ws?topics={topics}")).replace(
        "\r\n\r\n",
        "\r\nSec-WebSocket-Protocol: corecast.v1\r\n\r\n",
    );
    s.write_all(req.as_bytes()).unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(
        head.contains("Sec-WebSocket-Protocol: corecast.v1"),
        "{head}"
    );
    s
}

/// What an enveloped subscriber read of one topic: publications in order,
/// each with the `replaced` of the conflation marker before it (0: none).
type Read = HashMap<String, Vec<(u64, u64)>>;

/// Checks that `got` accounts for every number up to `last` of each topic:
/// each jump in the numbers is announced by a marker replacing exactly
/// the numbers skipped.
fn accounts_for_everything(got: &Read, last: u64) -> u64 {
    let mut replaced_total = 0;
    for (topic, list) in got {
        let mut expect = list[0].0 - list[0].1;
        assert_eq!(expect, 1, "{topic}: starts at 1 (or replaces up to it)");
        for &(seq, replaced) in list {
            assert_eq!(
                seq - replaced,
                expect,
                "{topic}: {seq} replaced {replaced}: nothing lost between"
            );
            expect = seq + 1;
            replaced_total += replaced;
        }
        assert_eq!(expect - 1, last, "{topic}: ends with the newest value");
    }
    replaced_total
}

/// Reads JSON frames from `s` into a [`Read`] until every topic in
/// `topics` reached number `last`.
fn read_enveloped(s: &mut TcpStream, topics: &[&str], last: u64) -> Read {
    let mut got: Read = HashMap::new();
    let mut marker: Option<(String, u64, u64)> = None;
    while topics.iter().any(|t| {
        got.get(*t)
            .and_then(|l| l.last())
            .is_none_or(|l| l.0 < last)
    }) {
        let (_, op, p) = read_frame(s);
        assert_eq!(op, 1, "text frames only");
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        let topic = v["topic"].as_str().unwrap().to_owned();
        let seq = v["seq"].as_u64().unwrap();
        match v["op"].as_str().unwrap() {
            "conflated" => {
                assert!(marker.is_none(), "one marker before its publication");
                marker = Some((topic, seq, v["replaced"].as_u64().unwrap()));
            }
            "pub" => {
                let replaced = match marker.take() {
                    Some((t, s, n)) => {
                        assert_eq!(
                            (t.as_str(), s),
                            (topic.as_str(), seq),
                            "a marker names what follows"
                        );
                        n
                    }
                    None => 0,
                };
                got.entry(topic).or_default().push((seq, replaced));
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    got
}

#[test]
fn a_slow_conflating_subscriber_ends_with_the_newest_values_and_tells_conflation_from_loss() {
    let server = start_with(|c| {
        c.workers = 2;
        c.max_outbound_bytes = 64 * KIB;
        c.slow_consumer = SlowConsumerPolicy::Conflate;
    });
    let addr = server.local_addr();
    let mut stalled = stalled_enveloped(addr, "c.a,c.b");
    let mut witness = [connect(addr, "/ws?topics=c.a,c.b")];
    wait_subscriptions(addr, 4);
    // 2 × 3 000 messages of 2 KiB: far more than the stalled socket's
    // buffers and its 64 KiB queue hold.
    const N: u64 = 3000;
    let mut pubs: Vec<Ws> = ["c.a", "c.b"]
        .iter()
        .map(|t| connect(addr, &format!("/publish/{t}")))
        .collect();
    // Rounds of 2 × 10 messages (40 KiB): the witness, which reads each
    // round, never holds more than its 64 KiB bound.
    for round in 0..N / 10 {
        for p in pubs.iter_mut() {
            for i in 0..10 {
                let mut m = vec![0u8; 2048];
                m[..8].copy_from_slice(&(round * 10 + i).to_be_bytes());
                p.send(Message::binary(m)).unwrap();
            }
        }
        for k in 0..20 {
            if let Err(e) = witness[0].read() {
                panic!("round {round}, message {k}: {e}; {}", metrics(addr));
            }
        }
    }
    let m = metrics(addr);
    assert!(
        metric(&m, "corecast_publications_replaced_total") > 0,
        "conflated while stalled"
    );
    assert_eq!(metric(&m, "corecast_slow_consumer_disconnects_total"), 0);
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let got = read_enveloped(&mut stalled, &["c.a", "c.b"], N);
    let replaced = accounts_for_everything(&got, N);
    assert!(replaced > 0);
    let m = metrics(addr);
    assert_eq!(
        metric(&m, "corecast_publications_replaced_total"),
        replaced,
        "every replaced publication counted, and told to the subscriber"
    );
    assert_eq!(
        metric(&m, "corecast_publications_conflated_total"),
        got.values().flatten().filter(|p| p.1 > 0).count() as u64
    );
    // Still subscribed, now keeping up: the next publication comes as is.
    pubs[0].send(Message::binary(vec![1u8; 16])).unwrap();
    let (_, _, p) = read_frame(&mut stalled);
    let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
    assert_eq!(
        (v["op"].as_str(), v["seq"].as_u64()),
        (Some("pub"), Some(N + 1))
    );
}

/// Waits until the server counts `n` subscriptions.
fn wait_subscriptions(addr: SocketAddr, n: u64) {
    let ok = eventually(Duration::from_secs(10), || {
        metric(&metrics(addr), "corecast_subscriptions") == n
    });
    assert!(ok, "{n} subscriptions");
}

#[test]
fn always_conflates_its_namespace_at_all_times_and_leaves_other_topics_whole() {
    let server = start_with(|c| {
        c.namespaces = vec![NamespacePolicy {
            prefix: "fast".into(),
            slow_consumer: Some(SlowConsumerPolicy::Always),
            ..Default::default()
        }];
    });
    let addr = server.local_addr();
    let mut sub = stalled_enveloped(addr, "fast.x,other");
    wait_subscriptions(addr, 2);
    const N: u64 = 200;
    for topic in ["fast.x", "other"] {
        let mut p = connect(addr, &format!("/publish/{topic}"));
        // One write: the server reads the burst in one go.
        for i in 0..N {
            p.write(Message::binary(i.to_be_bytes().to_vec())).unwrap();
        }
        p.flush().unwrap();
        // Let it be delivered before the publisher goes.
        std::thread::sleep(Duration::from_millis(200));
    }
    sub.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let got = read_enveloped(&mut sub, &["fast.x", "other"], N);
    let fast: Read = got
        .iter()
        .filter(|(t, _)| *t == "fast.x")
        .map(|(t, l)| (t.clone(), l.clone()))
        .collect();
    let replaced = accounts_for_everything(&fast, N);
    assert!(
        replaced > 0 && (fast["fast.x"].len() as u64) < N,
        "a burst read at once is conflated: {:?}",
        fast["fast.x"]
    );
    let other = &got["other"];
    assert_eq!(
        other.len() as u64,
        N,
        "the other namespace keeps everything"
    );
    assert!(other.iter().all(|p| p.1 == 0));
}

/// `max_rate`: at most that many publications per second of each topic
/// for this subscriber, the newest, each jump announced; the last value
/// always arrives; other subscribers get everything.
#[test]
fn a_maximum_rate_delivers_the_newest_value_at_that_rate() {
    let server = start();
    let addr = server.local_addr();
    let mut rated = stalled_enveloped(addr, "r.a,r.b&max_rate=5");
    rated
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut full = connect(addr, "/ws?topics=r.a");
    wait_subscriptions(addr, 3);
    let mut pubs: Vec<Ws> = ["r.a", "r.b"]
        .iter()
        .map(|t| connect(addr, &format!("/publish/{t}")))
        .collect();
    const N: u64 = 100;
    let started = std::time::Instant::now();
    for i in 0..N {
        for p in pubs.iter_mut() {
            p.send(Message::binary(i.to_be_bytes().to_vec())).unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let got = read_enveloped(&mut rated, &["r.a", "r.b"], N);
    let took = started.elapsed().as_secs_f64();
    accounts_for_everything(&got, N);
    for (t, list) in &got {
        // 5 per second over the run, the first at once, the newest at the end.
        let bound = (took * 5.0).ceil() as usize + 2;
        assert!(
            list.len() <= bound,
            "{t}: {} publications in {took:.2} s at 5/s",
            list.len()
        );
        assert!(list.len() >= 3, "{t}: the rate lets some through: {list:?}");
    }
    for i in 0..N {
        match full.read().unwrap() {
            Message::Binary(b) => assert_eq!(b[..], i.to_be_bytes()),
            other => panic!("{other:?}"),
        }
    }
    // Out of range: refused.
    let answer = refused(
        addr,
        upgrade_request("/ws?topics=x&max_rate=5000").as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
}

/// A subscriber that leaves a topic gets nothing of it after the
/// `unsubscribed` reply, even what waited for it in its table (here held
/// there by a maximum rate of one a second).
#[test]
fn leaving_a_topic_drops_what_waited_of_it() {
    let server = start_with(|c| c.workers = 1);
    let addr = server.local_addr();
    let (mut sub, _) = subscribe_with(addr, "/ws?topics=u.a,u.b&max_rate=1", "corecast.v1");
    wait_subscriptions(addr, 2);
    for i in 1..=3u8 {
        publish(addr, "u.a", &[i]);
    }
    let first = read_env(&mut sub);
    assert_eq!(
        (first.topic.as_str(), first.seq),
        ("u.a", 1),
        "the first at once"
    );
    // 2 and 3 wait for the interval; leaving the topic drops them.
    sub.send(Message::text(r#"{"op":"unsubscribe","topics":["u.a"]}"#))
        .unwrap();
    match read_incoming(&mut sub) {
        Incoming::Reply(v) => assert_eq!(v["op"], "unsubscribed", "{v}"),
        Incoming::Pub(e) => panic!("before the reply: {e:?}"),
    }
    std::thread::sleep(Duration::from_millis(1200));
    publish(addr, "u.b", b"b");
    let e = read_env(&mut sub);
    assert_eq!(e.topic, "u.b", "nothing of u.a after leaving it: {e:?}");
}

/// A conflating subscriber with more distinct topics waiting than its
/// bound holds is a slow consumer: closed, counted.
#[test]
fn a_table_past_its_bound_closes_its_subscriber() {
    let server = start_with(|c| {
        c.workers = 1;
        c.max_outbound_bytes = 4 * KIB;
        c.slow_consumer = SlowConsumerPolicy::Always;
    });
    let addr = server.local_addr();
    let _stalled = stalled_enveloped(addr, "w.%3E");
    wait_subscriptions(addr, 1);
    let mut p = raw(addr);
    // Keep-alive HTTP publishes of 10 KiB to 1 000 distinct topics: the
    // socket's buffers fill, then the table grows a topic at a time.
    for i in 0..1000 {
        p.write_all(&post_with(&format!("w.{i}"), BINARY, &[0u8; 10 * KIB], ""))
            .unwrap();
        let head = read_head(&mut p);
        assert!(head.starts_with("HTTP/1.1 204 "), "{head}");
    }
    let closed = eventually(Duration::from_secs(10), || {
        metric(&metrics(addr), "corecast_slow_consumer_disconnects_total") == 1
    });
    assert!(closed, "{}", metrics(addr));
}

/// A namespace's `max-rate` holds every subscriber of its topics to that
/// many publications per second each (the newest, announced), and leaves
/// other topics whole.
#[test]
fn a_namespace_maximum_rate_applies_to_every_subscriber_of_its_topics() {
    let server = start_with(|c| {
        c.namespaces = vec![NamespacePolicy {
            prefix: "slow".into(),
            max_rate: Some(5),
            ..Default::default()
        }];
    });
    let addr = server.local_addr();
    let (mut sub, _) = subscribe_with(addr, "/ws?topics=slow.x,fast.x", "corecast.v1");
    wait_subscriptions(addr, 2);
    let mut pubs: Vec<Ws> = ["slow.x", "fast.x"]
        .iter()
        .map(|t| connect(addr, &format!("/publish/{t}")))
        .collect();
    const N: u64 = 100;
    let started = std::time::Instant::now();
    for i in 0..N {
        for p in pubs.iter_mut() {
            p.send(Message::binary(i.to_be_bytes().to_vec())).unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut got: Read = HashMap::new();
    let mut marker = 0;
    while got
        .get("slow.x")
        .and_then(|l| l.last())
        .is_none_or(|l| l.0 < N)
        || got.get("fast.x").is_none_or(|l| (l.len() as u64) < N)
    {
        match read_incoming(&mut sub) {
            Incoming::Pub(e) => {
                got.entry(e.topic.clone())
                    .or_default()
                    .push((e.seq, marker));
                marker = 0;
            }
            Incoming::Reply(v) => {
                assert_eq!(v["op"], "conflated", "{v}");
                marker = v["replaced"].as_u64().unwrap();
            }
        }
    }
    let took = started.elapsed().as_secs_f64();
    let slow: Read = got
        .iter()
        .filter(|(t, _)| *t == "slow.x")
        .map(|(t, l)| (t.clone(), l.clone()))
        .collect();
    accounts_for_everything(&slow, N);
    let bound = (took * 5.0).ceil() as usize + 2;
    assert!(slow["slow.x"].len() <= bound, "{:?}", slow["slow.x"]);
    assert_eq!(got["fast.x"].len() as u64, N, "another namespace keeps all");
}

/// Conflation keys (`?key=`): a conflating subscriber keeps the newest
/// publication per key of a topic, delivered in number order after one
/// marker whose `from`, `seq` and `replaced` account for every number
/// between; each key ends with its newest value.
#[test]
fn a_keyed_topic_conflates_per_key_and_accounts_for_every_number() {
    let server = start_with(|c| {
        c.workers = 2;
        c.namespaces = vec![NamespacePolicy {
            prefix: "venue".into(),
            slow_consumer: Some(SlowConsumerPolicy::Always),
            ..Default::default()
        }];
    });
    let addr = server.local_addr();
    let mut sub = stalled_enveloped(addr, "venue.x");
    let mut witness = connect(addr, "/ws?topics=venue.x");
    wait_subscriptions(addr, 2);
    let mut p = raw(addr);
    const N: u64 = 300;
    let keys = ["EURUSD", "GBP%2FUSD", "USDJPY"];
    let mut newest: HashMap<String, u64> = HashMap::new();
    // Pipelined in one write: the server reads many in one turn, and
    // their run reaches the subscriber at once.
    let mut requests = Vec::new();
    for i in 0..N {
        // An irregular order of keys, 1 KiB each.
        let key = keys[((i * 7) / 3 % 3) as usize];
        let mut body = vec![b' '; 1024];
        let text = format!("{key} {i}");
        body[..text.len()].copy_from_slice(text.as_bytes());
        let path = format!("venue.x?key={key}");
        requests.extend(post_with(&path, "text/plain", &body, ""));
        newest.insert(key.to_owned(), i);
    }
    p.write_all(&requests).unwrap();
    for _ in 0..N {
        let head = read_head(&mut p);
        assert!(head.starts_with("HTTP/1.1 204 "), "{head}");
    }
    // A raw subscriber is conflated too (`always` is the topic's policy),
    // without markers: in order, ending with every key's newest.
    let mut seen: HashMap<String, u64> = HashMap::new();
    let (mut prev, mut witnessed) = (None, 0);
    while seen != newest {
        let m = witness.read().unwrap();
        witnessed += 1;
        let (key, i) = m.to_text().unwrap().trim_end().split_once(' ').unwrap();
        let i: u64 = i.parse().unwrap();
        assert!(prev < Some(i), "in order");
        prev = Some(i);
        seen.insert(key.to_owned(), i);
    }
    sub.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Numbers delivered so far; what the current marker still covers.
    let (mut last, mut window): (u64, Option<(u64, u64, u64, u64)>) = (0, None);
    let mut last_of_key: HashMap<String, u64> = HashMap::new();
    let mut replaced_total = 0;
    while last < N {
        let (_, op, body) = read_frame(&mut sub);
        assert_eq!(op, 1, "text frames only");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let seq = v["seq"].as_u64().unwrap();
        match v["op"].as_str().unwrap() {
            "conflated" => {
                assert!(window.is_none(), "a marker's run ends before the next");
                let (from, replaced) =
                    (v["from"].as_u64().unwrap(), v["replaced"].as_u64().unwrap());
                assert_eq!(from, last + 1, "nothing lost before the run: {v}");
                window = Some((from, seq, replaced, 0));
                replaced_total += replaced;
            }
            "pub" => {
                assert!(seq > last, "one order: {seq} after {last}");
                let text = v["text"].as_str().unwrap();
                let (key, i) = text.trim_end().split_once(' ').unwrap();
                assert_eq!(
                    i.parse::<u64>().unwrap() + 1,
                    seq,
                    "payload {i} is number {seq}"
                );
                last_of_key.insert(key.to_owned(), seq - 1);
                match &mut window {
                    Some((_, to, replaced, k)) => {
                        *k += 1;
                        assert!(seq <= *to, "{seq} within its marker's run");
                        if seq == *to {
                            let (from, to, replaced, k) = window.take().unwrap();
                            assert_eq!(replaced, to - from + 1 - k, "the rest were replaced");
                        } else {
                            let _ = replaced;
                        }
                    }
                    None => assert_eq!(seq, last + 1, "no marker, no jump"),
                }
                last = seq;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert!(window.is_none());
    assert!(replaced_total > 0, "the stalled subscriber was conflated");
    assert_eq!(last_of_key, newest, "every key ends with its newest value");
    assert_eq!(
        metric(&metrics(addr), "corecast_publications_replaced_total"),
        replaced_total + (N - witnessed),
        "what either subscriber did not get is counted"
    );
}

#[test]
fn a_bad_conflation_key_is_refused() {
    let server = start();
    let addr = server.local_addr();
    let mut p = raw(addr);
    p.write_all(&post_with("k?key=a%20b", "text/plain", b"x", ""))
        .unwrap();
    let answer = String::from_utf8_lossy(&read_to_eof(&mut p)).into_owned();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("key must be"), "{answer}");
    let err = tungstenite::connect(ws_url(addr, "/publish/k?key=")).unwrap_err();
    assert!(format!("{err:?}").contains("400"), "{err:?}");
}

/// `max_rate` is per subscription: a subscribe's rate applies to the names
/// it lists; a topic's own subscription wins over a pattern's; a topic
/// reached only through patterns gets the most generous of them; a
/// subscribe without a rate lifts it.
#[test]
fn a_maximum_rate_is_per_subscription() {
    let server = start_with(|c| c.workers = 1);
    let addr = server.local_addr();
    let (mut sub, _) = subscribe_with(addr, "/ws?topics=q.free", "corecast.v1");
    let subscribe = |ws: &mut Ws, msg: &str| {
        ws.send(Message::text(msg)).unwrap();
        match read_incoming(ws) {
            Incoming::Reply(v) => assert_eq!(v["op"], "subscribed", "{v}"),
            Incoming::Pub(e) => panic!("{e:?}"),
        }
    };
    subscribe(
        &mut sub,
        r#"{"op":"subscribe","topics":["q.slow","q.p.*"],"max_rate":1}"#,
    );
    subscribe(&mut sub, r#"{"op":"subscribe","topics":["q.p.own"]}"#);
    wait_subscriptions(addr, 4);
    // Three each, at once: a rated topic gets the first, then one a second.
    for t in ["q.free", "q.slow", "q.p.x", "q.p.own"] {
        for i in 1..=3u8 {
            publish(addr, t, &[i]);
        }
    }
    let mut got: HashMap<String, Vec<u64>> = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_millis(600);
    let timeout = |ws: &mut Ws, t: u64| match ws.get_mut() {
        tungstenite::stream::MaybeTlsStream::Plain(s) => {
            s.set_read_timeout(Some(Duration::from_millis(t))).unwrap()
        }
        _ => unreachable!("plain ws://"),
    };
    timeout(&mut sub, 100);
    while std::time::Instant::now() < deadline {
        match sub.read() {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["op"] == "pub" {
                    got.entry(v["topic"].as_str().unwrap().into())
                        .or_default()
                        .push(v["seq"].as_u64().unwrap());
                }
            }
            Ok(other) => panic!("{other:?}"),
            Err(_) => {}
        }
    }
    assert_eq!(got["q.free"], [1, 2, 3], "unrated: everything");
    assert_eq!(
        got["q.p.own"],
        [1, 2, 3],
        "its own unrated subscription wins"
    );
    assert_eq!(got["q.slow"], [1], "rated: the first, the rest waits");
    assert_eq!(got["q.p.x"], [1], "rated through its pattern");
    timeout(&mut sub, 10_000);
    // Lifting q.slow's rate: what waits still comes first (one order per
    // topic), then every publication.
    subscribe(
        &mut sub,
        r#"{"op":"subscribe","topics":["q.slow"],"max_rate":0}"#,
    );
    for i in 4..=6u8 {
        publish(addr, "q.slow", &[i]);
    }
    let mut slow = Vec::new();
    while slow.last() != Some(&6) {
        if let Incoming::Pub(e) = read_incoming(&mut sub)
            && e.topic == "q.slow"
        {
            slow.push(e.seq);
        }
    }
    for i in 7..=9u8 {
        publish(addr, "q.slow", &[i]);
    }
    let mut after = Vec::new();
    while after.len() < 3 {
        // (q.p.x's newest comes at its interval meanwhile.)
        if let Incoming::Pub(e) = read_incoming(&mut sub)
            && e.topic == "q.slow"
        {
            after.push((e.topic, e.seq));
        }
    }
    assert_eq!(
        after,
        [7, 8, 9].map(|n| ("q.slow".to_string(), n)),
        "no limit any more (after {slow:?})"
    );
}
