//! The flush order: a bounded batch of dirty connections per turn, the
//! rest first in the next turn, after that turn's delivery.

use super::*;
use crate::server::worker::FLUSHES_PER_TURN;

fn has(wire: &[u8], payload: &[u8]) -> bool {
    wire.windows(payload.len()).any(|w| w == payload)
}

#[test]
fn a_publication_reaches_the_subscribers_a_round_has_not_written_yet_in_that_round() {
    let mut sim = Sim::new(|_| {});
    let n = FLUSHES_PER_TURN + 10;
    let subs: Vec<usize> = (0..n)
        .map(|_| sim.upgrade("/ws?topics=t", 1 << 20))
        .collect();
    let publisher = sim.upgrade("/publish/t", 1 << 20);
    let written = |sim: &Sim| sim.stats().latency.count();

    // One turn writes one batch: the first subscribers, not the last ten.
    sim.send(
        publisher,
        &client_frame(true, OpCode::Text, b"first-message", MASK),
    );
    assert!(has(&sim.peers[&subs[0]].received, b"first-message"));
    assert!(has(
        &sim.peers[&subs[FLUSHES_PER_TURN - 1]].received,
        b"first-message"
    ));
    assert!(sim.peers[&subs[n - 1]].received.is_empty());
    assert_eq!(written(&sim), 0, "not yet written to every subscriber");
    assert_eq!(sim.stats().first_write_latency.count(), 1);

    // The next publication, read in the next turn, goes out in that same
    // turn with the first to the ten the round had not reached, and
    // then to the ones written first, in the order they were written.
    sim.send(
        publisher,
        &client_frame(true, OpCode::Text, b"second-message", MASK),
    );
    let last = &sim.peers[&subs[n - 1]].received;
    assert!(has(last, b"first-message") && has(last, b"second-message"));
    assert!(has(&sim.peers[&subs[0]].received, b"second-message"));
    assert!(
        !has(
            &sim.peers[&subs[FLUSHES_PER_TURN - 1]].received,
            b"second-message"
        ),
        "written last in the round before, so last in this one"
    );
    assert_eq!(written(&sim), 1, "the first is written to all now");

    sim.turn();
    for &s in &subs {
        let got = sim.received(s);
        assert!(has(&got, b"first-message") && has(&got, b"second-message"));
    }
    assert_eq!(written(&sim), 2);
    assert!(!sim.core.busy(), "everything flushed");
}
