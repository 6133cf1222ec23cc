//! A cluster of corecast nodes over a real `nats-server` (JetStream) on
//! loopback: publications cross nodes in one order per topic with the
//! same numbers everywhere, interest comes and goes with subscribers, and
//! NATS away or restarted is answered as docs/ARCHITECTURE.md "Cluster"
//! says. Each test starts its own nats-server (skipped with a loud message
//! when it is not installed, outside CI).

mod common;

use common::*;
use corecast::server::ServerHandle;
use corecast::server::cluster::ClusterSettings;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;
use tungstenite::Message;

const WAIT: Duration = Duration::from_secs(15);

fn node(nats: &NatsServer) -> ServerHandle {
    node_at(&nats.url())
}

fn node_at(url: &str) -> ServerHandle {
    node_with(url, |_| {})
}

fn node_with(url: &str, tweak: impl FnOnce(&mut corecast::server::config::Config)) -> ServerHandle {
    start_with(|c| {
        tweak(c);
        // A port of its own (two nodes in one process must never share one).
        c.listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        c.cluster = Some(ClusterSettings {
            urls: vec![url.to_string()],
            credentials: None,
            ca: None,
            max_pending: 64 * MIB,
            replicas: 1,
            buffered: corecast::server::cluster::NATS_BUFFERED,
        });
    })
}

/// Two nodes on `nats`, both connected.
fn two_nodes(nats: &NatsServer) -> (ServerHandle, ServerHandle) {
    let (a, b) = (node(nats), node(nats));
    assert!(eventually(WAIT, || connected(a.local_addr())
        && connected(b.local_addr())));
    (a, b)
}

/// Runs `f` with a NATS client of its own on `nats`, as another program
/// on the same NATS would.
fn with_client<T>(nats: &NatsServer, f: impl AsyncFnOnce(async_nats::Client) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        f(client).await
    })
}

/// Runs `f` with a JetStream context of its own on `nats`, as an
/// operator's tool would.
fn with_jetstream<T>(
    nats: &NatsServer,
    f: impl AsyncFnOnce(async_nats::jetstream::Context) -> T,
) -> T {
    with_client(nats, async |client| {
        f(async_nats::jetstream::new(client)).await
    })
}

/// The `(Corecast-Epoch, Corecast-Seq)` of a `204` answering a publish.
fn numbered(head: &str) -> (u64, u64) {
    assert!(head.starts_with("HTTP/1.1 204 "), "{head}");
    let value = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {head}"))
    };
    (value("Corecast-Epoch:"), value("Corecast-Seq:"))
}

/// `n` pipelined publications of `topic` (with a query, as `?confirm=1`) on one keep-alive connection
/// (the last closes it); their answers' heads, in order.
fn publish_pipelined(addr: SocketAddr, topic: &str, bodies: &[&[u8]]) -> Vec<String> {
    let mut s = raw(addr);
    let mut all = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let close = if i + 1 == bodies.len() {
            "Connection: close\r\n"
        } else {
            ""
        };
        all.extend(post_with(topic, BINARY, body, close));
    }
    s.write_all(&all).unwrap();
    bodies.iter().map(|_| read_head(&mut s)).collect()
}

fn gauge(addr: SocketAddr, name: &str) -> u64 {
    metric(&metrics(addr), name)
}

fn connected(addr: SocketAddr) -> bool {
    gauge(addr, "corecast_cluster_connected") == 1
}

/// An enveloped (JSON) subscriber of `topic` on `addr`, once the node's
/// interest is in NATS (`subs` subscriptions there in all).
fn subscriber(addr: SocketAddr, topic: &str, subs: u64) -> Ws {
    let (ws, proto) = subscribe_with(addr, &format!("/ws?topics={topic}"), "corecast.v1");
    assert_eq!(proto.as_deref(), Some("corecast.v1"));
    assert!(
        eventually(WAIT, || gauge(addr, "corecast_cluster_subscriptions")
            == subs),
        "the node subscribes in NATS"
    );
    ws
}

/// A WebSocket publisher to `topic` on `addr`.
fn publisher(addr: SocketAddr, topic: &str) -> Ws {
    connect(addr, &format!("/publish/{topic}"))
}

#[test]
fn a_publication_on_one_node_reaches_subscribers_on_every_node_in_order() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let (a, b) = two_nodes(&nats);
    let mut on_a = subscriber(a.local_addr(), "prices.EURUSD", 1);
    let mut on_b = subscriber(b.local_addr(), "prices.EURUSD", 1);
    for i in 0..50u32 {
        publish(a.local_addr(), "prices.EURUSD", format!("p{i}").as_bytes());
    }
    for ws in [&mut on_a, &mut on_b] {
        let got: Vec<Env> = (0..50).map(|_| read_env(ws)).collect();
        let payloads: Vec<String> = got
            .iter()
            .map(|e| String::from_utf8(e.payload.clone()).unwrap())
            .collect();
        let want: Vec<String> = (0..50).map(|i| format!("p{i}")).collect();
        assert_eq!(payloads, want, "publish order, on each node");
        let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (1..=50).collect::<Vec<_>>(),
            "numbered from 1, no hole"
        );
        assert!(
            got.iter()
                .all(|e| e.epoch == got[0].epoch && e.topic == "prices.EURUSD")
        );
    }
    // An HTTP publication is answered once the stream stored it, with the
    // number it got; pipelined ones in order, from either node.
    for (at, from) in [(a.local_addr(), 51u64), (b.local_addr(), 54)] {
        let heads = publish_pipelined(at, "prices.EURUSD?confirm=1", &[b"x", b"y", b"z"]);
        let got: Vec<(u64, u64)> = heads.iter().map(|h| numbered(h)).collect();
        let epoch = read_env(&mut on_a).epoch;
        assert_eq!(
            got,
            (from..from + 3).map(|s| (epoch, s)).collect::<Vec<_>>()
        );
        for _ in 0..2 {
            read_env(&mut on_a);
        }
    }
    let ma = metrics(a.local_addr());
    assert_eq!(metric(&ma, "corecast_cluster_published_total"), 53);
    // At most one NATS message in per publication per interested node
    // (publications queued for a topic go together), and every node got
    // every publication. (The stream may republish a message a moment
    // after the next, which the node then reads from the stream to keep the
    // order: the late copy still arrives, as a duplicate.)
    for node in [a.local_addr(), b.local_addr()] {
        let m = metrics(node);
        let received = metric(&m, "corecast_cluster_received_total");
        assert!((1..=56).contains(&received), "{received}");
    }
}

#[test]
fn concurrent_publishers_on_different_nodes_give_every_subscriber_one_order() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let (a, b) = two_nodes(&nats);
    let mut subs = [
        subscriber(a.local_addr(), "t", 1),
        subscriber(a.local_addr(), "t", 1),
        subscriber(b.local_addr(), "t", 1),
    ];
    const N: usize = 300;
    let threads: Vec<_> = [a.local_addr(), b.local_addr()]
        .into_iter()
        .enumerate()
        .map(|(n, addr)| {
            std::thread::spawn(move || {
                let mut p = publisher(addr, "t");
                for i in 0..N {
                    p.send(Message::text(format!("{n}:{i}"))).unwrap();
                }
                p.close(None).unwrap();
                while p.read().is_ok() {}
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let orders: Vec<Vec<(u64, Vec<u8>)>> = subs
        .iter_mut()
        .map(|ws| {
            (0..2 * N)
                .map(|_| read_env(ws))
                .map(|e| (e.seq, e.payload))
                .collect()
        })
        .collect();
    for o in &orders {
        let seqs: Vec<u64> = o.iter().map(|e| e.0).collect();
        assert_eq!(seqs, (1..=2 * N as u64).collect::<Vec<_>>());
        // Each publisher's own messages in its order.
        for n in 0..2 {
            let mine: Vec<String> = o
                .iter()
                .map(|e| String::from_utf8(e.1.clone()).unwrap())
                .filter(|p| p.starts_with(&format!("{n}:")))
                .collect();
            assert_eq!(mine, (0..N).map(|i| format!("{n}:{i}")).collect::<Vec<_>>());
        }
    }
    assert_eq!(orders[0], orders[1]);
    assert_eq!(orders[0], orders[2], "the same order on both nodes");
}

#[test]
fn interest_is_subscribed_while_subscribers_are_there_and_only_then() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let (a, b) = two_nodes(&nats);
    assert_eq!(gauge(b.local_addr(), "corecast_cluster_subscriptions"), 0);
    let s1 = subscriber(b.local_addr(), "x", 1);
    let s2 = subscriber(b.local_addr(), "x", 1);
    let mut p = subscriber(b.local_addr(), "news.%3E", 2);
    drop(s1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        gauge(b.local_addr(), "corecast_cluster_subscriptions"),
        2,
        "one subscriber of x left"
    );
    drop(s2);
    assert!(eventually(WAIT, || gauge(
        b.local_addr(),
        "corecast_cluster_subscriptions"
    ) == 1));
    // Published on a, nobody on a: it crosses to b's pattern only.
    publish(a.local_addr(), "news.eu", b"hello");
    publish(a.local_addr(), "x", b"nobody");
    let e = read_env(&mut p);
    assert_eq!(
        (e.topic.as_str(), e.payload.as_slice(), e.seq),
        ("news.eu", &b"hello"[..], 1)
    );
    std::thread::sleep(Duration::from_millis(200));
    // a has no interest: nothing was sent to it; b received news.eu only.
    assert_eq!(gauge(a.local_addr(), "corecast_cluster_received_total"), 0);
    assert_eq!(gauge(b.local_addr(), "corecast_cluster_received_total"), 1);
    p.close(None).unwrap();
    assert!(eventually(WAIT, || gauge(
        b.local_addr(),
        "corecast_cluster_subscriptions"
    ) == 0));
}

#[test]
fn nats_away_at_start_then_back_and_restarted_mid_stream() {
    let Some(mut nats) = NatsServer::start() else {
        return;
    };
    nats.stop();
    // Both nodes start without NATS; /healthz says so. (A short request
    // deadline: a publication the stream has not stored by then is
    // answered 202.)
    let short =
        |c: &mut corecast::server::config::Config| c.handshake_timeout = Duration::from_millis(500);
    let (a, b) = (node_with(&nats.url(), short), node_with(&nats.url(), short));
    let mut s = raw(a.local_addr());
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    // Publications made meanwhile are held (the bound is 64 MiB): answered
    // 202 at the request deadline, each in turn ...
    let early: Vec<Vec<u8>> = (0..5u32)
        .map(|i| format!("early{i}").into_bytes())
        .collect();
    let early: Vec<&[u8]> = early.iter().map(|b| &b[..]).collect();
    for head in publish_pipelined(a.local_addr(), "r?confirm=1", &early) {
        assert!(head.starts_with("HTTP/1.1 202 "), "{head}");
    }
    assert_eq!(
        gauge(a.local_addr(), "corecast_cluster_publish_unconfirmed_total"),
        5
    );
    assert!(gauge(a.local_addr(), "corecast_cluster_pending_bytes") > 0);
    nats.run();
    assert!(eventually(WAIT, || connected(a.local_addr())
        && connected(b.local_addr())));
    // ... and stored once NATS is back.
    assert!(eventually(WAIT, || gauge(
        a.local_addr(),
        "corecast_cluster_pending_bytes"
    ) == 0));
    assert_eq!(gauge(a.local_addr(), "corecast_cluster_published_total"), 5);
    let mut sub = subscriber(b.local_addr(), "r", 1);
    let live = publish_pipelined(a.local_addr(), "r?confirm=1", &[b"live1"]);
    assert_eq!(numbered(&live[0]).1, 6);
    let e = read_env(&mut sub);
    assert_eq!(
        (e.seq, e.payload.as_slice()),
        (6, &b"live1"[..]),
        "numbering went on after the held ones"
    );
    // NATS restarts (its store stays): the stream, the numbering and the
    // subscriptions come back. What is published while it is away is held
    // and stored once the publishing node is back, in order. A node that
    // resubscribes after that store missed it: its subscribers see the
    // number skip (never a silent loss, never a reordering), and it counts
    // the gap.
    nats.stop();
    assert!(eventually(WAIT, || !connected(a.local_addr())));
    let during = publish_pipelined(a.local_addr(), "r?confirm=1", &[b"during"]);
    assert!(during[0].starts_with("HTTP/1.1 202 "), "{}", during[0]);
    nats.run();
    assert!(eventually(WAIT, || connected(a.local_addr())
        && connected(b.local_addr())));
    assert!(eventually(WAIT, || gauge(
        a.local_addr(),
        "corecast_cluster_pending_bytes"
    ) == 0));
    publish(a.local_addr(), "r", b"after");
    // b was away while "during" was stored: it reads what it missed from
    // the stream when it is back, before what follows.
    let got: Vec<(u64, Vec<u8>)> = (0..2)
        .map(|_| read_env(&mut sub))
        .map(|e| (e.seq, e.payload))
        .collect();
    assert_eq!(got, vec![(7, b"during".to_vec()), (8, b"after".to_vec())]);
    // (Counted when the stream's acknowledgement reaches a, which may be
    // after b handed the message on.)
    let published = || gauge(a.local_addr(), "corecast_cluster_published_total");
    assert_eq!(settle(WAIT, published, 8), 8);
    publish(a.local_addr(), "r", b"more");
    assert_eq!(
        read_env(&mut sub).epoch,
        e.epoch,
        "one epoch across the restart"
    );
}

/// Subscribes with `since` on `ws`, retrying while the node answers
/// `recovery busy` (it is filling the topic's history from the stream).
fn subscribe_since_retrying(
    ws: &mut Ws,
    topic: &str,
    since: (u64, u64),
) -> (serde_json::Value, Vec<Env>) {
    for _ in 0..100 {
        let (reply, early) = subscribe_since(ws, topic, Some(since));
        if reply["op"] == "error" {
            assert_eq!(reply["reason"], "recovery busy: try again", "{reply}");
            let ms = reply["retry_ms"].as_u64().unwrap();
            std::thread::sleep(Duration::from_millis(ms));
            continue;
        }
        return (reply, early);
    }
    panic!("the recovery never became possible");
}

#[test]
fn a_subscriber_moves_to_another_node_with_since_and_misses_nothing() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let (a, b) = two_nodes(&nats);
    let mut on_a = subscriber(a.local_addr(), "fx.EURUSD", 1);
    for i in 1..=10u32 {
        publish(a.local_addr(), "fx.EURUSD", format!("m{i}").as_bytes());
    }
    let seen: Vec<Env> = (0..4).map(|_| read_env(&mut on_a)).collect();
    let (epoch, last) = (seen[3].epoch, seen[3].seq);
    assert_eq!(last, 4);
    drop(on_a);
    // Published while it moves.
    publish(a.local_addr(), "fx.EURUSD", b"m11");
    // b has never followed the topic: it fills the history from the
    // stream (the client is asked to retry meanwhile), then recovers.
    let (mut ws, _) = subscribe_with(b.local_addr(), "/ws", "corecast.v1");
    let (reply, early) = subscribe_since_retrying(&mut ws, "fx.EURUSD", (epoch, last));
    assert!(early.is_empty());
    let r = &reply["recovery"]["fx.EURUSD"];
    assert_eq!(r["complete"], true, "{reply}");
    assert_eq!(
        (r["epoch"].as_u64(), r["from"].as_u64(), r["to"].as_u64()),
        (Some(epoch), Some(5), Some(11)),
        "{reply}"
    );
    let replayed: Vec<(u64, Vec<u8>)> = (0..7)
        .map(|_| read_env(&mut ws))
        .map(|e| (e.seq, e.payload))
        .collect();
    let want: Vec<(u64, Vec<u8>)> = (5..=11u64)
        .map(|i| (i, format!("m{i}").into_bytes()))
        .collect();
    assert_eq!(replayed, want);
    // Then the live stream, numbers going on, published on either node
    // (a 204 means held for the stream, not stored: one at a time here).
    for (at, want) in [
        (b.local_addr(), (12u64, &b"m12"[..])),
        (a.local_addr(), (13, b"m13")),
    ] {
        publish(at, "fx.EURUSD", want.1);
        let e = read_env(&mut ws);
        assert_eq!(
            (e.epoch, e.seq, e.payload.as_slice()),
            (epoch, want.0, want.1)
        );
    }
}

#[test]
fn a_node_stopped_its_subscribers_recover_on_another_node() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let (a, b) = two_nodes(&nats);
    let mut on_a = subscriber(a.local_addr(), "quotes", 1);
    for i in 1..=3u32 {
        publish(b.local_addr(), "quotes", format!("q{i}").as_bytes());
    }
    let last = (0..3).map(|_| read_env(&mut on_a)).last().unwrap();
    // Node a goes away (its clients see the connection end) ...
    a.shutdown();
    assert!(a.join());
    let closed = loop {
        match on_a.read() {
            Ok(Message::Close(_)) | Err(_) => break true,
            Ok(_) => {}
        }
    };
    assert!(closed);
    // ... publishing goes on through b, and the client comes back on b.
    publish(b.local_addr(), "quotes", b"q4");
    publish(b.local_addr(), "quotes", b"q5");
    let (mut ws, _) = subscribe_with(b.local_addr(), "/ws", "corecast.v1");
    let (reply, _) = subscribe_since_retrying(&mut ws, "quotes", (last.epoch, last.seq));
    assert_eq!(reply["recovery"]["quotes"]["complete"], true, "{reply}");
    let got: Vec<(u64, Vec<u8>)> = (0..2)
        .map(|_| read_env(&mut ws))
        .map(|e| (e.seq, e.payload))
        .collect();
    assert_eq!(got, vec![(4, b"q4".to_vec()), (5, b"q5".to_vec())]);
    publish(b.local_addr(), "quotes", b"q6");
    let e = read_env(&mut ws);
    assert_eq!(
        (e.epoch, e.seq, e.payload.as_slice()),
        (last.epoch, 6, &b"q6"[..])
    );
}

/// Empties the stream of `topic` (what an operator's purge, or the
/// stream's byte limit, does), with the NATS client the server uses.
fn purge_topic(nats: &NatsServer, topic: &str) {
    with_jetstream(nats, async |js| {
        let stream = js.get_stream("CORECAST").await.unwrap();
        stream
            .purge()
            .filter(format!("corecast.in.{topic}"))
            .await
            .unwrap();
    });
}

#[test]
fn a_topic_the_stream_forgot_starts_a_new_epoch_at_every_subscriber() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let (a, b) = two_nodes(&nats);
    let mut on_b = subscriber(b.local_addr(), "e", 1);
    for i in 1..=3u32 {
        publish(a.local_addr(), "e", format!("old{i}").as_bytes());
    }
    let old: Vec<Env> = (0..3).map(|_| read_env(&mut on_b)).collect();
    assert_eq!(old.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    purge_topic(&nats, "e");
    // The next publication finds nothing stored: a new epoch, from 1, and
    // the subscriber already there gets it (its old position counts in the
    // old epoch).
    publish(a.local_addr(), "e", b"new1");
    publish(a.local_addr(), "e", b"new2");
    let new: Vec<Env> = (0..2).map(|_| read_env(&mut on_b)).collect();
    assert!(
        new[0].epoch > old[0].epoch,
        "{} then {}",
        old[0].epoch,
        new[0].epoch
    );
    assert_eq!(
        new.iter()
            .map(|e| (e.epoch, e.seq, e.payload.clone()))
            .collect::<Vec<_>>(),
        vec![
            (new[0].epoch, 1, b"new1".to_vec()),
            (new[0].epoch, 2, b"new2".to_vec())
        ]
    );
    // (Counted once the batch is handed on, which may be after it is read.)
    let restarts = || {
        gauge(
            b.local_addr(),
            "corecast_cluster_sequence_breaks_total{kind=\"restart\"}",
        )
    };
    assert_eq!(settle(WAIT, restarts, 1), 1);
    // A new subscriber on either node joins the new numbering.
    let (mut late, _) = subscribe_with(a.local_addr(), "/ws", "corecast.v1");
    let (reply, _) = subscribe_since_retrying(&mut late, "e", (new[0].epoch, 1));
    assert_eq!(reply["recovery"]["e"]["complete"], true, "{reply}");
    let e = read_env(&mut late);
    assert_eq!(
        (e.epoch, e.seq, e.payload.as_slice()),
        (new[0].epoch, 2, &b"new2"[..])
    );
}

/// What a NATS client publishes by hand on the subjects the stream
/// republishes to is not taken, however like ours it looks (outside
/// probe: one message numbered 1 000 ahead made every later publication
/// of the topic look handed on already, on every node, and text that was
/// not UTF-8 went out in text frames).
#[test]
fn a_message_published_by_hand_where_the_stream_republishes_is_not_taken() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let (a, b) = two_nodes(&nats);
    let mut on_b = subscriber(b.local_addr(), "f", 1);
    publish(a.local_addr(), "f", b"one");
    let first = read_env(&mut on_b);
    with_client(&nats, async |client| {
        for (seq, body) in [
            (first.seq + 1000, &b"ahead"[..]),
            (first.seq + 1, b"\xc3(bad"),
        ] {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Corecast-Epoch", first.epoch.to_string().as_str());
            h.insert("Corecast-Seq", seq.to_string().as_str());
            h.insert("Corecast-Kind", "text");
            client
                .publish_with_headers("corecast.t.f", h, bytes::Bytes::copy_from_slice(body))
                .await
                .unwrap();
        }
        client.flush().await.unwrap();
    });
    let foreign = || {
        gauge(
            b.local_addr(),
            "corecast_cluster_received_skipped_total{reason=\"foreign\"}",
        )
    };
    assert_eq!(settle(WAIT, foreign, 2), 2);
    publish(a.local_addr(), "f", b"two");
    let next = read_env(&mut on_b);
    assert_eq!(
        (next.epoch, next.seq, next.payload.as_slice()),
        (first.epoch, first.seq + 1, &b"two"[..])
    );
}

/// Deletes corecast's stream, as an operator might by mistake.
fn delete_stream(nats: &NatsServer) {
    with_jetstream(nats, async |js| {
        assert!(js.delete_stream("CORECAST").await.unwrap().success);
    });
}

/// The stream deleted under running nodes: the next publication finds no
/// stream for its subject, the node ensures the stream again (creating it
/// as its own), and publishing goes on in a new numbering, delivered
/// across nodes, instead of being retried for ever against nothing.
#[test]
fn a_deleted_stream_is_created_again_and_publishing_goes_on() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let (a, b) = two_nodes(&nats);
    let mut on_b = subscriber(b.local_addr(), "d", 1);
    let before = publish_pipelined(a.local_addr(), "d?confirm=1", &[b"before"]);
    let (epoch, seq) = numbered(&before[0]);
    assert_eq!(seq, 1);
    assert_eq!(read_env(&mut on_b).payload, b"before");
    delete_stream(&nats);
    // The first try may meet the request deadline (202) while the stream
    // is ensured again; it is stored all the same, and the next ones are
    // numbered at once.
    let after = publish_pipelined(a.local_addr(), "d?confirm=1", &[b"after1"]);
    assert!(
        after[0].starts_with("HTTP/1.1 204 ") || after[0].starts_with("HTTP/1.1 202 "),
        "{}",
        after[0]
    );
    let again = publish_pipelined(a.local_addr(), "d?confirm=1", &[b"after2"]);
    let (new_epoch, new_seq) = numbered(&again[0]);
    assert!(
        new_epoch > epoch,
        "a new numbering: {epoch} then {new_epoch}"
    );
    assert_eq!(new_seq, 2);
    let got: Vec<(u64, u64, Vec<u8>)> = (0..2)
        .map(|_| {
            let e = read_env(&mut on_b);
            (e.epoch, e.seq, e.payload)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (new_epoch, 1, b"after1".to_vec()),
            (new_epoch, 2, b"after2".to_vec())
        ]
    );
}

#[test]
fn nodes_reach_nats_over_tls_trusting_the_ca_they_are_given() {
    let cert = test_cert();
    let (c, k) = (cert.cert.to_str().unwrap(), cert.key.to_str().unwrap());
    let Some(nats) = NatsServer::start_with(&["--tls", "--tlscert", c, "--tlskey", k]) else {
        return;
    };
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let tls_node = |ca: Option<&std::path::Path>| {
        start_with(|cfg| {
            cfg.listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
            cfg.cluster = Some(ClusterSettings {
                urls: vec![url.clone()],
                credentials: None,
                ca: ca.map(|p| p.to_path_buf()),
                max_pending: 64 * MIB,
                replicas: 1,
                buffered: corecast::server::cluster::NATS_BUFFERED,
            });
        })
    };
    let (a, b) = (tls_node(Some(&cert.cert)), tls_node(Some(&cert.cert)));
    assert!(eventually(WAIT, || connected(a.local_addr())
        && connected(b.local_addr())));
    let mut sub = subscriber(b.local_addr(), "secure", 1);
    publish(a.local_addr(), "secure", b"over tls");
    assert_eq!(read_env(&mut sub).payload, b"over tls");
    // Without the CA the self-signed certificate is not trusted: never up,
    // and /healthz says so.
    let untrusting = tls_node(None);
    std::thread::sleep(Duration::from_secs(2));
    assert!(!connected(untrusting.local_addr()));
    let mut s = raw(untrusting.local_addr());
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 503 "));
    // And it stops at once, NATS or not.
    let t = std::time::Instant::now();
    untrusting.shutdown();
    assert!(untrusting.join());
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
}

#[test]
fn publishing_past_the_held_bound_while_nats_is_away_is_refused_then_the_held_are_stored() {
    let Some(mut nats) = NatsServer::start() else {
        return;
    };
    nats.stop();
    let url = nats.url();
    let node = start_with(|c| {
        c.listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        c.handshake_timeout = Duration::from_secs(1);
        c.cluster = Some(ClusterSettings {
            urls: vec![url],
            credentials: None,
            ca: None,
            max_pending: 8 * KIB,
            replicas: 1,
            buffered: corecast::server::cluster::NATS_BUFFERED,
        });
    });
    let addr = node.local_addr();
    let body = vec![7u8; KIB];
    // Twenty publishers at once, each on its own connection: those within
    // the bound are held and answered 202 at the request deadline (not
    // stored yet), the rest refused at once.
    let mut conns: Vec<_> = (0..20)
        .map(|_| {
            let mut s = raw(addr);
            s.write_all(&post_with(
                "h?confirm=1",
                BINARY,
                &body,
                "Connection: close\r\n",
            ))
            .unwrap();
            s
        })
        .collect();
    let heads: Vec<String> = conns.iter_mut().map(read_head).collect();
    let held = heads
        .iter()
        .filter(|h| h.starts_with("HTTP/1.1 202 "))
        .count() as u64;
    let refused = heads
        .iter()
        .filter(|h| h.starts_with("HTTP/1.1 503 "))
        .count() as u64;
    assert_eq!(held + refused, 20, "{heads:?}");
    assert!((4..20).contains(&held), "{held} held before the bound");
    assert_eq!(
        gauge(
            addr,
            "corecast_cluster_publish_refused_total{reason=\"pending\"}"
        ),
        refused
    );
    assert_eq!(
        gauge(addr, "corecast_cluster_publish_unconfirmed_total"),
        held
    );
    // A WebSocket publisher past the bound is closed 1013.
    let mut p = publisher(addr, "h");
    p.send(Message::binary(body.clone())).unwrap();
    let close = loop {
        match p.read() {
            Ok(Message::Close(c)) => break c,
            Ok(_) => {}
            Err(e) => panic!("no close: {e}"),
        }
    };
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1013));
    // NATS back: every publication answered 202 is stored, in order.
    nats.run();
    assert!(eventually(WAIT, || gauge(
        addr,
        "corecast_cluster_pending_bytes"
    ) == 0));
    assert_eq!(gauge(addr, "corecast_cluster_published_total"), held);
}

/// Node `a` on NATS directly, node `b` through a [`Relay`] (a queue bound
/// that holds a burst), both connected.
fn behind_relay(nats: &NatsServer) -> (Relay, ServerHandle, ServerHandle) {
    let relay = Relay::start(nats.port);
    let a = node(nats);
    let b = node_with(&relay.url(), |c| c.max_outbound_bytes = 64 * MIB);
    assert!(eventually(WAIT, || connected(a.local_addr())
        && connected(b.local_addr())));
    (relay, a, b)
}

#[test]
fn a_node_cut_off_from_nats_catches_up_from_the_stream_in_order_while_publishing_goes_on() {
    // What a node sees when NATS cuts it as a slow consumer (or its
    // network fails): its connection closes while others publish. Back, it
    // reads what it missed from the stream, batches of publications
    // included, while live ones (batches too) wait behind that read.
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let (relay, a, b) = behind_relay(&nats);
    let connects = gauge(b.local_addr(), "corecast_cluster_connects_total");
    let mut sub = subscriber(b.local_addr(), "cut", 1);
    let body = |i: u64| {
        let mut body = vec![b'.'; 4 * KIB];
        body[..8].copy_from_slice(&i.to_be_bytes());
        Message::binary(body)
    };
    let mut p = publisher(a.local_addr(), "cut");
    // Twice: cut while its first fill runs, then again once it follows.
    const N: u64 = 500;
    let mut last = 0u64;
    for round in 0..2u64 {
        relay.cut(true);
        assert!(eventually(WAIT, || !connected(b.local_addr())));
        let base = round * 2 * N;
        for i in base..base + N {
            p.send(body(i)).unwrap();
        }
        assert!(eventually(WAIT, || gauge(
            a.local_addr(),
            "corecast_cluster_published_total"
        ) == base + N));
        relay.cut(false);
        for i in base + N..base + 2 * N {
            p.send(body(i)).unwrap();
        }
        while last < base + 2 * N {
            let e = read_env(&mut sub);
            assert_eq!(e.seq, last + 1, "every number, in order (round {round})");
            assert_eq!(u64::from_be_bytes(e.payload[..8].try_into().unwrap()), last);
            last = e.seq;
        }
    }
    assert!(gauge(b.local_addr(), "corecast_cluster_connects_total") > connects);
    assert_eq!(
        gauge(
            b.local_addr(),
            "corecast_cluster_sequence_breaks_total{kind=\"gap\"}"
        ),
        0
    );
}

#[test]
fn a_node_nats_cuts_as_a_slow_consumer_comes_back_with_every_number_in_order_or_a_counted_gap() {
    // NATS cuts a client that leaves more than 2 MiB unread, or whose
    // write blocks for a second: its slow-consumer rule.
    let conf = std::env::temp_dir().join(format!("corecast-nats-slow-{}.conf", std::process::id()));
    std::fs::write(&conf, "max_pending: 2097152\nwrite_deadline: \"1s\"\n").unwrap();
    let Some(nats) = NatsServer::start_with(&["-c", conf.to_str().unwrap()]) else {
        return;
    };
    let (relay, a, b) = behind_relay(&nats);
    let connects = gauge(b.local_addr(), "corecast_cluster_connects_total");
    let mut sub = subscriber(b.local_addr(), "slow", 1);
    // b stops reading NATS; 8 MiB is published on a meanwhile.
    relay.stall(true);
    const N: u64 = 1000;
    let mut p = publisher(a.local_addr(), "slow");
    for i in 0..N {
        let mut body = vec![b'.'; 8 * KIB];
        body[..8].copy_from_slice(&i.to_be_bytes());
        p.send(Message::binary(body)).unwrap();
    }
    assert!(eventually(Duration::from_secs(60), || gauge(
        a.local_addr(),
        "corecast_cluster_published_total"
    ) == N));
    relay.stall(false);
    // Every number after the last, or a skip counted as a gap.
    let mut last = 0u64;
    let mut skipped = 0u64;
    while last < N {
        let e = read_env(&mut sub);
        assert!(e.seq > last, "{} after {last}", e.seq);
        assert_eq!(
            u64::from_be_bytes(e.payload[..8].try_into().unwrap()),
            e.seq - 1
        );
        skipped += e.seq - last - 1;
        last = e.seq;
    }
    assert!(
        gauge(b.local_addr(), "corecast_cluster_connects_total") > connects,
        "NATS cut the slow node and it came back"
    );
    if skipped > 0 {
        assert!(
            gauge(
                b.local_addr(),
                "corecast_cluster_sequence_breaks_total{kind=\"gap\"}"
            ) > 0,
            "{skipped} skipped, not counted"
        );
    }
    let _ = std::fs::remove_file(conf);
}

#[test]
fn a_node_whose_workers_fall_behind_drops_in_its_nats_client_and_reads_the_rest_from_the_stream() {
    // While a node's workers are behind (their mailboxes over the
    // high-water mark), its bridge takes nothing more from NATS, and the
    // NATS client holds at most `buffered` messages per subscription: the
    // rest it drops (counted), and the node reads them from the stream,
    // the last of a burst included (no later message would show them
    // missing), and a catch-up longer than one fill may read.
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let a = node(&nats);
    let b = start_with(|c| {
        c.listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        // Any batch in a mailbox holds the bridge back.
        c.mailbox_high_water = 1;
        c.max_outbound_bytes = 64 * MIB;
        c.cluster = Some(ClusterSettings {
            urls: vec![nats.url()],
            credentials: None,
            ca: None,
            max_pending: 64 * MIB,
            replicas: 1,
            buffered: 1,
        });
    });
    assert!(eventually(WAIT, || connected(a.local_addr())
        && connected(b.local_addr())));
    let mut sub = subscriber(b.local_addr(), "behind", 1);
    // Many subscribers on b, so that each batch takes its worker a while.
    let _crowd: Vec<Ws> = (0..500)
        .map(|_| subscriber(b.local_addr(), "behind", 1))
        .collect();
    let mut p = publisher(a.local_addr(), "behind");
    const N: u64 = 4000;
    for i in 0..N {
        let mut body = vec![b'.'; 2 * KIB];
        body[..8].copy_from_slice(&i.to_be_bytes());
        p.send(Message::binary(body)).unwrap();
    }
    let mut last = 0u64;
    while last < N {
        let e = read_env(&mut sub);
        assert_eq!(e.seq, last + 1, "every number, in order");
        assert_eq!(u64::from_be_bytes(e.payload[..8].try_into().unwrap()), last);
        last = e.seq;
    }
    assert!(
        gauge(b.local_addr(), "corecast_cluster_slow_consumer_total") > 0,
        "the client dropped some (else this test tests nothing)"
    );
    assert_eq!(
        gauge(
            b.local_addr(),
            "corecast_cluster_sequence_breaks_total{kind=\"gap\"}"
        ),
        0
    );
}

/// The name of the server leading the `CORECAST` stream, asked of `via`
/// in NATS's own protocol (`$JS.API.STREAM.INFO`).
fn stream_leader(via: &NatsServer) -> String {
    use std::io::{BufRead, BufReader, Read};
    let s = std::net::TcpStream::connect(("127.0.0.1", via.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = s.try_clone().unwrap();
    w.write_all(
        b"CONNECT {\"verbose\":false}\r\nSUB _INBOX.leader 1\r\nPUB $JS.API.STREAM.INFO.CORECAST _INBOX.leader 0\r\n\r\nPING\r\n",
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).expect("an answer from NATS");
        if let Some(rest) = line.strip_prefix("MSG ") {
            let len: usize = rest.split_whitespace().last().unwrap().parse().unwrap();
            let mut body = vec![0; len + 2];
            r.read_exact(&mut body).unwrap();
            let info: serde_json::Value = serde_json::from_slice(&body[..len]).unwrap();
            return info["cluster"]["leader"]
                .as_str()
                .unwrap_or_else(|| panic!("no leader in {info}"))
                .to_string();
        }
        assert!(!line.starts_with("-ERR"), "{line}");
    }
}

/// Three `nats-server`s routed into one NATS cluster (JetStream clustered:
/// a stream of 3 replicas needs all three to be created).
fn nats_cluster() -> Option<Vec<NatsServer>> {
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut servers = Vec::new();
    for (i, &route) in routes.iter().enumerate() {
        let name = format!("n{i}");
        let listen = format!("nats://127.0.0.1:{route}");
        let others = routes
            .iter()
            .filter(|&&r| r != route)
            .map(|r| format!("nats://127.0.0.1:{r}"))
            .collect::<Vec<_>>()
            .join(",");
        let server = NatsServer::start_with(&[
            "--name",
            &name,
            "--cluster_name",
            "corecast-test",
            "--cluster",
            &listen,
            "--routes",
            &others,
        ])?;
        servers.push(server);
    }
    Some(servers)
}

#[test]
fn a_stream_of_three_replicas_keeps_every_number_when_a_nats_server_of_the_cluster_dies() {
    // The deployment for a cluster that must outlive a NATS server: three
    // routed servers, the stream replicated on all three
    // (`--nats-replicas 3`), each node given every server's URL. One
    // server dies while publishing goes on: the stream elects another
    // leader, a node connected to the dead one reconnects to another, and
    // the subscriber sees every number once, in order.
    let Some(mut servers) = nats_cluster() else {
        return;
    };
    let urls: Vec<String> = servers.iter().map(NatsServer::url).collect();
    let node_on = |first: usize| {
        let mut urls = urls.clone();
        urls.rotate_left(first);
        start_with(|c| {
            c.listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
            c.cluster = Some(ClusterSettings {
                urls,
                credentials: None,
                ca: None,
                max_pending: 64 * MIB,
                replicas: 3,
                buffered: corecast::server::cluster::NATS_BUFFERED,
            });
        })
    };
    let a = node_on(0);
    let b = node_on(1);
    // JetStream elects its leaders first: the stream is created (and the
    // nodes ready) once it has.
    let ready = |addr| {
        eventually(Duration::from_secs(30), || {
            connected(addr) && {
                let mut s = raw(addr);
                s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    .unwrap();
                read_head(&mut s).starts_with("HTTP/1.1 200 ")
            }
        })
    };
    assert!(ready(a.local_addr()) && ready(b.local_addr()));
    let mut sub = subscriber(b.local_addr(), "r3", 1);
    let mut p = publisher(a.local_addr(), "r3");
    let body = |i: u64| Message::binary(i.to_be_bytes().to_vec());
    let mut last = 0u64;
    let mut read_to = |sub: &mut Ws, n: u64| {
        while last < n {
            let e = read_env(sub);
            assert_eq!(e.seq, last + 1, "every number once, in order");
            assert_eq!(u64::from_be_bytes(e.payload[..8].try_into().unwrap()), last);
            last = e.seq;
        }
    };
    for i in 0..100 {
        p.send(body(i)).unwrap();
    }
    read_to(&mut sub, 100);
    // The stream's leader dies.
    let leader = stream_leader(&servers[2]);
    let i: usize = leader
        .strip_prefix('n')
        .and_then(|i| i.parse().ok())
        .expect(&leader);
    servers[i].stop();
    for i in 100..200 {
        p.send(body(i)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    read_to(&mut sub, 200);
    assert_eq!(
        gauge(
            b.local_addr(),
            "corecast_cluster_sequence_breaks_total{kind=\"gap\"}"
        ),
        0
    );
}

/// NATS away, and clients subscribe to topics new to the node: the link
/// does not wait for NATS to answer (its client answers only once it has
/// reconnected, which may be never), so it goes on subscribing and the
/// node still stops at once. (The scenario runs on a thread of its own:
/// before the fix it never ended, and the test fails at its deadline
/// instead of hanging.)
#[test]
fn a_node_whose_nats_is_away_still_subscribes_new_topics_and_stops_at_once() {
    let Some(mut nats) = NatsServer::start() else {
        return;
    };
    let a = node(&nats);
    assert!(eventually(WAIT, || connected(a.local_addr())));
    nats.stop();
    assert!(eventually(WAIT, || !connected(a.local_addr())));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let addr = a.local_addr();
        // Each subscriber waits for the node's NATS subscriptions to count it.
        let subs: Vec<Ws> = (1..=3u64)
            .map(|i| subscriber(addr, &format!("fresh{i}"), i))
            .collect();
        a.shutdown();
        let _ = done_tx.send(a.join());
        drop(subs);
    });
    assert_eq!(
        done_rx.recv_timeout(3 * WAIT),
        Ok(true),
        "subscribed in NATS's absence and stopped"
    );
    drop(nats);
}

/// A `history` request for topics the node has no history of yet makes it
/// follow and fill each one: each counts as a recovery against
/// `--max-recovery-rate` (before: not counted at all, so one client could
/// have any number of fresh names followed and read from the stream). A
/// request of more than are left is admitted in its turn, into debt that
/// the next ones wait out; asking again for names being filled costs
/// nothing.
#[test]
fn history_requests_for_fresh_names_are_admitted_at_the_recovery_rate() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let a = node_with(&nats.url(), |c| c.max_recovery_rate = 10);
    let addr = a.local_addr();
    assert!(eventually(WAIT, || connected(addr)));
    let (mut ws, _) = subscribe_with(addr, "/ws", "corecast.v1");
    let names: Vec<String> = (0..64).map(|i| format!("\"fresh{i}\"")).collect();
    let ask = |ws: &mut Ws, names: &[String]| {
        let op = format!("{{\"op\":\"history\",\"topics\":[{}]}}", names.join(","));
        ws.send(Message::text(op)).unwrap();
        match ws.read().unwrap() {
            Message::Text(t) => t.to_string(),
            other => panic!("{other:?}"),
        }
    };
    // 64 fresh names against 10 a second: followed, 54 tokens of debt.
    let reply = ask(&mut ws, &names);
    assert!(reply.contains("recovery busy"), "{reply}");
    assert!(eventually(WAIT, || gauge(
        addr,
        "corecast_cluster_subscriptions"
    ) == 64));
    // Three more fresh names wait the debt out: not followed meanwhile.
    let more: Vec<String> = (0..3).map(|i| format!("\"more{i}\"")).collect();
    let reply = ask(&mut ws, &more);
    assert!(reply.contains("recovery busy"), "{reply}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(gauge(addr, "corecast_cluster_subscriptions"), 64);
    assert!(metric(&metrics(addr), "corecast_recoveries_deferred_total") >= 2);
    // The first 64 again (being filled, or filled): answered, at no cost.
    assert!(eventually(WAIT, || {
        let reply = ask(&mut ws, &names);
        reply.contains("\"op\":\"history\"")
    }));
    assert_eq!(gauge(addr, "corecast_cluster_subscriptions"), 64);
}

/// The NATS client stops taking commands while it reconnects, once 2 048
/// wait: a subscription past that is tried again later instead of
/// waiting for NATS (before, the node's link waited, every interest change
/// piled up behind it, and SIGTERM hung until NATS came back). Once NATS
/// is back, every topic is subscribed.
#[test]
fn a_node_whose_nats_client_is_full_defers_new_subscriptions_and_stops_at_once() {
    let Some(mut nats) = NatsServer::start() else {
        return;
    };
    let a = node(&nats);
    let addr = a.local_addr();
    assert!(eventually(WAIT, || connected(addr)));
    nats.stop();
    assert!(eventually(WAIT, || !connected(addr)));
    // 40 × 64 fresh topics: more than the client's queue holds.
    let subs: Vec<Ws> = (0..40)
        .map(|c| {
            let topics: Vec<String> = (0..64).map(|i| format!("t{c}x{i}")).collect();
            let (ws, _) = subscribe_with(addr, &format!("/ws?topics={}", topics.join(",")), "");
            ws
        })
        .collect();
    assert!(
        eventually(WAIT, || gauge(
            addr,
            "corecast_cluster_subscribes_deferred_total"
        ) >= 1),
        "the link went on past the full queue"
    );
    // (The queue also holds the fills' reads of the stream.)
    let queued = gauge(addr, "corecast_cluster_subscriptions");
    assert!(queued < 2560, "{queued} subscriptions");
    nats.run();
    assert!(
        eventually(WAIT, || gauge(addr, "corecast_cluster_subscriptions")
            == 2560),
        "every topic subscribed once NATS is back"
    );
    nats.stop();
    assert!(eventually(WAIT, || !connected(addr)));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        a.shutdown();
        let _ = done_tx.send(a.join());
    });
    assert_eq!(done_rx.recv_timeout(3 * WAIT), Ok(true), "stopped");
    drop(subs);
}
