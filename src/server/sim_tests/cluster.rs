//! `POST /publish` on a cluster node, in virtual time, with the test as
//! the bridge: the answer waits for the number the stream gives
//! (`204` with it), or for the request deadline (`202`: still held), or
//! says NATS refused it (`503`); a drain answers `202` and closes.
//! Pipelined requests wait their turn, and a late number never answers
//! the connection's next request.

use super::*;
use crate::server::cluster::Reply;
use std::sync::atomic::Ordering::Relaxed;

fn post(topic: &str, body: &[u8], close: bool) -> Vec<u8> {
    let mut req = format!(
        "POST /publish/{topic}?confirm=1 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n{}\r\n",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

fn text(wire: Vec<u8>) -> String {
    String::from_utf8(wire).unwrap()
}

impl Sim {
    /// The one publication offered to the stream since the last call:
    /// its payload and whom to answer.
    fn offered(&mut self) -> (Vec<u8>, crate::server::cluster::AckTo) {
        let mut offered = self.cluster().take_offered();
        assert_eq!(offered.len(), 1, "one publication offered");
        let p = offered.pop().unwrap();
        (p.payload.to_vec(), p.ack.expect("an HTTP publisher waits"))
    }

    /// The bridge replies; two loop turns pass (the reply is taken at the
    /// first one's dispatch, the next request is read at the second).
    fn reply(&mut self, ack: crate::server::cluster::AckTo, stored: Option<(u64, u64)>) {
        let reply = match stored {
            Some((epoch, seq)) => Reply::Stored {
                conn: ack.conn,
                request: ack.request,
                epoch,
                seq,
            },
            None => Reply::Lost {
                conn: ack.conn,
                request: ack.request,
            },
        };
        self.cluster().reply(ack.worker as usize, reply);
        self.turn();
        self.turn();
    }
}

#[test]
fn pipelined_publications_are_answered_in_order_with_the_numbers_the_stream_gave() {
    let mut sim = Sim::in_cluster(|_| {});
    let key = sim.connect(1 << 20);
    let mut both = post("t", b"one", false);
    both.extend(post("t", b"two", true));
    sim.send(key, &both);
    // The first goes to the stream; the second waits behind its answer.
    let (payload, ack) = sim.offered();
    assert_eq!(payload, b"one");
    assert!(sim.received(key).is_empty(), "no answer before the number");
    assert!(sim.core.conn(key).read_paused());
    sim.reply(ack, Some((9, 41)));
    assert_eq!(
        text(sim.received(key)),
        "HTTP/1.1 204 No Content\r\nCorecast-Epoch: 9\r\nCorecast-Seq: 41\r\n\r\n"
    );
    let (payload, second) = sim.offered();
    assert_eq!(payload, b"two");
    assert_ne!(second.request, ack.request);
    sim.reply(second, Some((9, 42)));
    assert_eq!(
        text(sim.received(key)),
        "HTTP/1.1 204 No Content\r\nCorecast-Epoch: 9\r\nCorecast-Seq: 42\r\nConnection: close\r\n\r\n"
    );
    assert!(sim.peers[&key].shut_down, "closed after the last answer");
}

#[test]
fn not_stored_by_the_deadline_is_answered_202_and_a_late_number_answers_nothing_else() {
    let mut sim = Sim::in_cluster(|c| c.handshake_timeout = 2 * SECOND);
    let key = sim.connect(1 << 20);
    sim.send(key, &post("t", b"x", false));
    let (_, first) = sim.offered();
    sim.wait(SECOND, TICK);
    assert!(sim.received(key).is_empty());
    sim.wait(2 * SECOND, TICK);
    assert_eq!(
        text(sim.received(key)),
        "HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
    );
    assert_eq!(sim.cluster().stats.unconfirmed.load(Relaxed), 1);
    // The connection reads its next request, which waits in turn; the
    // first one's number, late, does not answer it.
    sim.send(key, &post("t", b"y", false));
    let (_, second) = sim.offered();
    sim.reply(first, Some((1, 1)));
    assert!(
        sim.received(key).is_empty(),
        "a late number answers nothing"
    );
    sim.reply(second, Some((1, 2)));
    assert!(text(sim.received(key)).contains("Corecast-Seq: 2\r\n"));
    // Then an idle keep-alive connection, under the request deadline.
    sim.wait(3 * SECOND, TICK);
    assert!(sim.closed.contains(&key), "idle past the request deadline");
}

#[test]
fn a_publication_nats_refused_is_answered_503_and_closed() {
    let mut sim = Sim::in_cluster(|_| {});
    let key = sim.connect(1 << 20);
    let mut both = post("t", b"x", false);
    both.extend(post("t", b"never read", false));
    sim.send(key, &both);
    let (_, ack) = sim.offered();
    sim.reply(ack, None);
    let got = text(sim.received(key));
    assert!(got.starts_with("HTTP/1.1 503 "), "{got}");
    assert!(got.contains("Connection: close\r\n"), "{got}");
    assert!(sim.cluster().take_offered().is_empty(), "nothing more read");
    assert!(sim.peers[&key].shut_down);
}

#[test]
fn a_drain_answers_a_waiting_publisher_202_and_closes() {
    let mut sim = Sim::in_cluster(|_| {});
    let key = sim.connect(1 << 20);
    sim.send(key, &post("t", b"x", false));
    let _ = sim.offered();
    sim.core.begin_turn(sim.now);
    for k in sim.core.begin_drain() {
        Backend::remove(&mut sim, k);
    }
    sim.turn();
    assert_eq!(
        text(sim.received(key)),
        "HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    assert!(sim.peers[&key].shut_down);
}

#[test]
fn a_publisher_that_half_closed_still_gets_its_answer_then_the_close() {
    let mut sim = Sim::in_cluster(|_| {});
    let key = sim.connect(1 << 20);
    sim.send(key, &post("t", b"x", false));
    let (_, ack) = sim.offered();
    sim.core.begin_turn(sim.now);
    sim.core.eof(key);
    sim.core.after_input(key);
    sim.turn();
    assert!(!sim.closed.contains(&key), "kept for its answer");
    sim.reply(ack, Some((3, 7)));
    assert_eq!(
        text(sim.received(key)),
        "HTTP/1.1 204 No Content\r\nCorecast-Epoch: 3\r\nCorecast-Seq: 7\r\nConnection: close\r\n\r\n"
    );
}

#[test]
fn a_late_number_for_a_connection_now_a_websocket_sends_it_nothing() {
    let mut sim = Sim::in_cluster(|c| c.handshake_timeout = 2 * SECOND);
    let key = sim.connect(1 << 20);
    sim.send(key, &post("t", b"x", false));
    let (_, ack) = sim.offered();
    sim.wait(3 * SECOND, TICK);
    assert!(text(sim.received(key)).starts_with("HTTP/1.1 202 "));
    let req = format!(
        "GET /ws?topics=t HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    sim.send(key, req.as_bytes());
    assert!(text(sim.received(key)).starts_with("HTTP/1.1 101 "));
    sim.reply(ack, Some((1, 1)));
    assert!(sim.received(key).is_empty(), "no frame for a late number");
}

#[test]
fn without_confirm_the_answer_is_at_once_and_pipelined_requests_go_on() {
    let mut sim = Sim::in_cluster(|_| {});
    let key = sim.connect(1 << 20);
    let one = b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na";
    let mut three = one.repeat(2);
    three.extend_from_slice(
        b"POST /publish/t?confirm=0 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nb",
    );
    sim.send(key, &three);
    let offered = sim.cluster().take_offered();
    assert_eq!(offered.len(), 3, "all three held for the stream at once");
    assert!(offered.iter().all(|p| p.ack.is_none()), "nobody waits");
    assert_eq!(
        text(sim.received(key)),
        "HTTP/1.1 204 No Content\r\n\r\n".repeat(2)
            + "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
    );
    // A value other than 0 or 1 is refused.
    let bad = sim.connect(1 << 20);
    sim.send(
        bad,
        b"POST /publish/t?confirm=yes HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na",
    );
    assert!(text(sim.received(bad)).starts_with("HTTP/1.1 400 "));
}

/// In a cluster every publication comes back from NATS, charged by no
/// dispatch: the worker that queues one charges it (outside review: a
/// cluster node's queued published frames were charged to no budget).
#[test]
fn a_publication_from_the_cluster_is_charged_where_it_is_queued() {
    let mut sim = Sim::in_cluster(|c| c.ping_interval = None);
    let shared = Arc::clone(sim.core.shared());
    let link = Arc::clone(shared.cluster.as_ref().unwrap());
    shared
        .directory
        .set_link(link as Arc<dyn crate::pubsub::remote::Link>);
    // A raw subscriber that never reads.
    let sub = sim.upgrade("/ws?topics=t", 0);
    let before = sim.stats().buffered_bytes.load(Relaxed);
    let frame = crate::proto::frame::server_frame(crate::proto::frame::OpCode::Binary, &[7; 65536]);
    let mut msg = crate::pubsub::envelope::Message::new(bytes::Bytes::from(frame), sim.now);
    let entry = shared.directory.get("t").unwrap();
    (msg.epoch, msg.seq) = (entry.epoch(), 1);
    shared.directory.release(entry);
    crate::pubsub::remote::inject_batch(&shared.directory, &shared.bus, vec![("t".into(), msg)]);
    sim.wait(TICK, TICK);
    sim.wait(TICK, TICK);
    assert_eq!(sim.stats().frames_sent.load(Relaxed), 1, "queued");
    let charged = sim.stats().buffered_bytes.load(Relaxed) - before;
    assert!(
        charged >= 65536,
        "{charged} bytes charged for a 64 KiB frame queued"
    );
    // Read: released.
    sim.read(sub, 1 << 20);
    sim.wait(TICK, TICK);
    assert_eq!(sim.received(sub).len(), 65546);
    let after = sim.stats().buffered_bytes.load(Relaxed) - before;
    assert!(after < 4096, "{after} bytes still charged");
}
