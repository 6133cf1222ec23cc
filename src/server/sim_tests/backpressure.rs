//! Backpressure in virtual time: slow consumers, the buffer budget,
//! publishers held by full mailboxes or paced by their rate.

use super::*;

#[test]
fn a_subscriber_that_stops_reading_is_cut_at_its_bound_and_the_others_get_everything() {
    let mut sim = Sim::new(|c| c.max_outbound_bytes = 64 * 1024);
    let stalled = sim.upgrade("/ws?topics=t", 0);
    let reader = sim.upgrade("/ws?topics=t", usize::MAX / 2);
    for i in 0..10u8 {
        publish(&mut sim, "t", &[i; 16 * 1024]);
    }
    let got = sim.received(reader);
    assert_eq!(got.len(), 10 * (4 + 16 * 1024), "every message, whole");
    let st = sim.stats();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(st.slow_consumer_disconnects.load(Relaxed), 1);
    assert_eq!(
        ws_failures(&sim),
        [(1008, 1)],
        "a slow consumer is a failed WebSocket"
    );
    // The stalled one reads at last: an unbroken prefix, then 1008.
    sim.read(stalled, usize::MAX / 2);
    let wire = sim.received(stalled);
    assert_eq!(close_code(&wire), Some(1008));
    assert_eq!(wire[4..4 + 16], [0u8; 16], "starting at the first message");
}

#[test]
fn the_connection_that_grows_past_the_budget_is_closed_1013_and_the_others_keep_theirs() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| c.max_buffered_bytes = 1 << 20);
    let a = sim.upgrade("/echo", 1 << 20);
    let b = sim.upgrade("/echo", 1 << 20);
    // A 4 MiB message announced on each; 300 KiB of it arrives on a, then
    // 800 KiB on b: together over the 1 MiB budget.
    let header = {
        let mut h = vec![0x82, 0xff];
        h.extend_from_slice(&(4u64 << 20).to_be_bytes());
        h.extend_from_slice(&MASK);
        h
    };
    sim.send(a, &header);
    sim.send(a, &vec![0u8; 300 * 1024]);
    assert!(sim.received(a).is_empty(), "a is within the budget");
    sim.send(b, &header);
    sim.send(b, &vec![0u8; 800 * 1024]);
    assert_eq!(close_code(&sim.received(b)), Some(1013), "b took it past");
    assert!(sim.received(a).is_empty(), "a keeps what it holds");
    assert_eq!(sim.stats().budget_closes.load(Relaxed), 1);
    assert_eq!(ws_failures(&sim), [(1013, 1)]);
}

/// The budget is the process's, not a sum of shares: with io_uring the
/// server may run more workers than cores (overflow workers), and each
/// one's share used to be the budget divided by the cores (outside probe:
/// 127 % of the budget held with the defaults). Here another worker has
/// leased three quarters of the pool: this worker's client is failed
/// 1013 once it holds more than the quarter left, well within the
/// worker's own share.
#[test]
fn a_worker_holds_no_more_than_the_other_workers_leases_left_of_the_budget() {
    use std::sync::atomic::Ordering::Relaxed;
    const BUDGET: usize = 4 << 20;
    let mut sim = Sim::new(|c| c.max_buffered_bytes = BUDGET);
    let pool = &sim.core.shared().budget;
    let other = pool.take(BUDGET / 4 * 3);
    assert_eq!(other, BUDGET / 4 * 3);
    let a = sim.upgrade("/echo", 1 << 20);
    let mut header = vec![0x82, 0xff];
    header.extend_from_slice(&(4u64 << 20).to_be_bytes());
    header.extend_from_slice(&MASK);
    sim.send(a, &header);
    // (A read of more than a turn's work resumes at the next turn: time
    // goes on while the rest is read.)
    let step = Duration::from_millis(1);
    sim.send(a, &vec![0u8; 600 * 1024]);
    sim.wait(Duration::from_millis(20), step);
    assert!(sim.received(a).is_empty(), "within what is left");
    sim.send(a, &vec![0u8; 600 * 1024]);
    sim.wait(Duration::from_millis(20), step);
    assert_eq!(
        close_code(&sim.received(a)),
        Some(1013),
        "past what is left"
    );
    assert_eq!(sim.stats().budget_closes.load(Relaxed), 1);
    // Once the other worker gives its lease back, the whole budget is
    // this worker's share again.
    sim.core.shared().budget.give(other);
    let b = sim.upgrade("/echo", 1 << 20);
    sim.send(b, &header);
    sim.send(b, &vec![0u8; 3 << 20]);
    sim.wait(Duration::from_millis(50), step);
    let held = sim.stats().buffered_bytes.load(Relaxed);
    assert!(held >= 3 << 20, "all read: {held}");
    assert!(sim.received(b).is_empty(), "the whole share");
    assert!(sim.core.shared().budget.free() <= BUDGET - (3 << 20));
    // Once b is gone, the turn gives its lease back to the pool (all but
    // a chunk or two of slack), for the other workers.
    Backend::remove(&mut sim, b);
    sim.turn();
    let chunk = crate::server::budget::chunk(BUDGET);
    assert!(sim.core.shared().budget.free() >= BUDGET - 2 * chunk);
}

#[test]
fn a_connection_already_closing_is_not_counted_as_a_budget_close() {
    // The budget is all but held by echoes their clients do not read; the
    // clients then close (1000). Each close answer that tipped the worker
    // over the budget used to count a budget close and a 1013 failure,
    // though the client got its 1000 (outside probe: 11 849 counted, 2
    // sent). Now only connections the budget actually fails count.
    use std::sync::atomic::Ordering::Relaxed;
    const BUDGET: usize = 256 * 1024;
    let mut sim = Sim::new(|c| c.max_buffered_bytes = BUDGET);
    let buffered = |sim: &Sim| sim.stats().buffered_bytes.load(Relaxed) as usize;
    let mut closers = Vec::new();
    // Stop a closer's worth (~1.3 KB) and more short of the budget.
    while buffered(&sim) + 3000 < BUDGET && closers.len() < 1000 {
        let c = sim.upgrade("/echo", 0);
        sim.send(c, &client_frame(true, OpCode::Binary, &[7u8; 1024], MASK));
        closers.push(c);
    }
    let before = sim.stats().budget_closes.load(Relaxed);
    let failed_before = ws_failures(&sim).iter().map(|&(_, n)| n).sum::<u64>();
    for &c in &closers {
        sim.send(
            c,
            &client_frame(true, OpCode::Close, &1000u16.to_be_bytes(), MASK),
        );
    }
    assert_eq!(
        sim.stats().budget_closes.load(Relaxed) - before,
        0,
        "no connection was failed by the budget"
    );
    assert_eq!(
        ws_failures(&sim).iter().map(|&(_, n)| n).sum::<u64>(),
        failed_before
    );
    for &c in &closers[closers.len() - 5..] {
        sim.read(c, 1 << 20);
        assert_eq!(close_code(&sim.received(c)), Some(1000), "closer {c}");
    }
}

#[test]
fn an_http_body_past_the_budget_is_answered_503_and_is_no_websocket_failure() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| c.max_buffered_bytes = 1 << 20);
    let c = sim.connect(1 << 20);
    sim.send(
        c,
        b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 4194304\r\n\r\n",
    );
    sim.send(c, &vec![0u8; 600 * 1024]);
    assert!(sim.received(c).is_empty(), "within the budget");
    sim.send(c, &vec![0u8; 600 * 1024]);
    let answer = String::from_utf8(sim.received(c)).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 503 Service Unavailable"),
        "{answer}"
    );
    assert_eq!(sim.stats().budget_closes.load(Relaxed), 1);
    assert_eq!(ws_failures(&sim), [], "an HTTP request is not a WebSocket");
    assert_eq!(sim.stats().messages_published.load(Relaxed), 0);
}

#[test]
fn an_http_publisher_is_not_read_while_a_peer_mailbox_is_over_its_mark() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| {
        c.workers = 2;
        c.mailbox_high_water = 4096;
    });
    // A subscriber on worker 1, whose mailbox the test drains by hand.
    let directory = Arc::clone(&sim.core.shared().directory);
    let bus = Arc::clone(&sim.core.shared().bus);
    let mut shard1 = crate::pubsub::shard::Shard::new(1, directory, Arc::clone(&bus));
    shard1.subscribe("t", (0, 0));
    let publisher = sim.connect(1 << 20);
    let post = |i: u8| {
        let mut r = b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\n\r\n".to_vec();
        r.extend_from_slice(&[i; 3000]);
        r
    };
    let answers = |wire: &[u8]| wire.windows(12).filter(|w| w == b"HTTP/1.1 204").count();
    // Two requests in one read: both published, each numbered and sent to
    // worker 1's mailbox as it is answered (6 KiB and overhead, over the
    // 4 KiB mark) within the read. The mark is checked after each read (a
    // publisher overshoots by at most one read): the publisher is held at
    // once, its next requests wait in the socket, however long, unanswered.
    sim.send(publisher, &[post(1), post(2)].concat());
    assert_eq!(answers(&sim.received(publisher)), 2);
    assert_eq!(sim.stats().publishers_throttled.load(Relaxed), 1);
    for i in 3..10 {
        sim.send(publisher, &post(i));
    }
    sim.wait(20 * SECOND, TICK);
    let wire = sim.received(publisher);
    assert!(wire.is_empty(), "{}", String::from_utf8_lossy(&wire));
    assert_eq!(sim.stats().messages_published.load(Relaxed), 2);
    assert!(!sim.closed.contains(&publisher), "held, not timed out");
    // Worker 1 drains its mailbox: the publisher is read again and every
    // request is answered, in order.
    let mut delivered = 0;
    sim.others[0].drain(&bus, |batch| delivered += batch.len());
    assert_eq!(delivered, 2);
    sim.wait(SECOND, TICK);
    assert_eq!(answers(&sim.received(publisher)), 7);
    assert_eq!(sim.stats().messages_published.load(Relaxed), 9);
}

/// `n` pipelined `POST`s of one byte, each to a new topic `r.t{i}` from
/// `from` on.
fn posts_to_new_topics(from: usize, n: usize) -> Vec<u8> {
    (from..from + n)
        .flat_map(|i| {
            format!("POST /publish/r.t{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
                .into_bytes()
        })
        .collect()
}

/// A worker behind on its deliveries by more than the lag mark holds
/// every publisher until it catches up, however few bytes its mailbox
/// holds: a publication put in 500 rated `>` subscribers' tables is a few
/// hundred bytes in a mailbox and 500 table puts of work (outside probe:
/// a publisher of new topic names kept both workers 2–3 s behind, far
/// below the byte mark, and an honest publication of another topic waited
/// that long behind it).
#[test]
fn a_publisher_is_not_read_while_a_worker_is_behind_by_the_lag_mark() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| c.ping_interval = None);
    let rated: Vec<usize> = (0..500)
        .map(|_| sim.upgrade("/ws?topics=r.>&max_rate=1", 1 << 30))
        .collect();
    let c = sim.connect(1 << 30);
    let answers = |wire: &[u8]| wire.windows(12).filter(|w| w == b"HTTP/1.1 204").count();
    // The worker learns what its deliveries cost; then 500 000 puts, more
    // than three turns' worth (a put counts 8 deliveries of 1 Mi a turn),
    // all read and answered while no time passes.
    sim.send(c, &posts_to_new_topics(0, 100));
    sim.send(c, &posts_to_new_topics(100, 1000));
    let mut answered = answers(&sim.received(c));
    for _ in 0..10 {
        if answered == 1100 {
            break;
        }
        sim.turn();
        answered += answers(&sim.received(c));
    }
    assert_eq!(answered, 1100);
    let bus = Arc::clone(&sim.core.shared().bus);
    assert!(bus.max_queued_bytes() < sim.core.shared().config.mailbox_high_water / 100);
    assert_eq!(bus.max_lag(sim.now), Duration::ZERO, "no time has passed");
    // 300 ms later the worker has delivered one more turn's worth and is
    // still behind: by 300 ms.
    let later = Duration::from_millis(300);
    sim.wait(later, later);
    assert_eq!(bus.max_lag(sim.now), later);
    // The publisher's next request is taken (the mark is checked after a
    // read), then it is held: the one after waits in its socket.
    sim.send(c, &posts_to_new_topics(1100, 1));
    assert_eq!(answers(&sim.received(c)), 1);
    assert_eq!(sim.stats().publishers_throttled.load(Relaxed), 1);
    sim.send(c, &posts_to_new_topics(1101, 1));
    assert!(
        sim.received(c).is_empty(),
        "held while the worker is behind"
    );
    // Caught up, the worker reports no lag, and the publisher is read.
    sim.wait(5 * TICK, TICK);
    assert_eq!(bus.max_lag(sim.now), Duration::ZERO);
    assert_eq!(answers(&sim.received(c)), 1);
    assert_eq!(frames(&sim.received(rated[0])).len(), 1102, "nothing lost");
}

#[test]
fn large_holders_are_cut_at_ninety_percent_so_a_small_client_is_still_served() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| c.max_buffered_bytes = 4 << 20);
    let header = {
        let mut h = vec![0x82, 0xff];
        h.extend_from_slice(&(16u64 << 20).to_be_bytes());
        h.extend_from_slice(&MASK);
        h
    };
    // Two large partial messages: 2 MiB (50 %), then 1.7 MiB (92 %).
    let a = sim.upgrade("/echo", 1 << 20);
    sim.send(a, &header);
    sim.send(a, &vec![0u8; 2 << 20]);
    let b = sim.upgrade("/echo", 1 << 20);
    sim.send(b, &header);
    sim.send(b, &vec![0u8; 1700 << 10]);
    assert_eq!(close_code(&sim.received(b)), Some(1013), "b passed 90 %");
    assert!(sim.received(a).is_empty(), "a keeps what it holds");
    // The headroom is for small clients: an echo goes through.
    let c = sim.upgrade("/echo", 1 << 20);
    sim.send(c, &client_frame(true, OpCode::Text, b"still serving", MASK));
    assert_eq!(
        sim.received(c),
        [&[0x81, 13][..], b"still serving"].concat()
    );
    assert_eq!(sim.stats().budget_closes.load(Relaxed), 1);
}

/// Subscribers that never read, under a policy that keeps them
/// (`drop-newest`, `conflate`), hold what their queues hold: publications
/// queued behind a backlog take at most 90 % of the budget, so the last
/// 10 % stays for everyone's replies (outside probe: 300 such subscribers
/// filled the whole budget, and honest echo clients were closed 1013).
/// An 8 MiB budget (one worker) under `policy`, filled by 12 subscribers
/// of `k` that never read: 20 bursts of 100 × 1 KB, a virtual tick apart.
/// Returns the sim, the stalled subscribers and the peak charge.
fn stalled_behind_bursts(
    policy: crate::server::config::SlowConsumerPolicy,
) -> (Sim, Vec<usize>, u64) {
    let mut sim = Sim::new(|c| {
        c.max_buffered_bytes = STALLED_BUDGET as usize;
        c.slow_consumer = policy;
        c.ping_interval = None;
    });
    let subs: Vec<usize> = (0..12).map(|_| sim.upgrade("/ws?topics=k", 0)).collect();
    let publisher = sim.upgrade("/publish/k", 1 << 20);
    let mut peak = 0;
    for round in 0..20u8 {
        let burst: Vec<u8> = (0..100)
            .flat_map(|_| client_frame(true, OpCode::Binary, &[round; 1000], MASK))
            .collect();
        sim.send(publisher, &burst);
        sim.wait(TICK, TICK);
        peak = peak.max(
            sim.stats()
                .buffered_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
        );
    }
    (sim, subs, peak)
}

/// [`stalled_behind_bursts`]' budget.
const STALLED_BUDGET: u64 = 8 << 20;

#[test]
fn subscribers_kept_behind_a_backlog_leave_the_last_tenth_of_the_budget() {
    use crate::server::config::SlowConsumerPolicy;
    use std::sync::atomic::Ordering::Relaxed;
    for policy in [SlowConsumerPolicy::DropNewest, SlowConsumerPolicy::Conflate] {
        let (mut sim, subs, peak) = stalled_behind_bursts(policy);
        let budget = STALLED_BUDGET;
        // A subscriber is judged once per run of a topic's publications
        // (here 100 of 1 KB): the one that crosses takes its run (and a
        // conflating one's table holds its newest).
        assert!(
            peak <= budget / 100 * 90 + 256 * 1024,
            "{policy:?}: {peak} of {budget} held"
        );
        assert!(
            sim.stats().frames_dropped.load(Relaxed) > 0
                || policy != SlowConsumerPolicy::DropNewest,
            "{policy:?}: dropped, counted"
        );
        // The headroom is for small clients: an echo goes through.
        let c = sim.upgrade("/echo", 1 << 20);
        sim.send(c, &client_frame(true, OpCode::Text, b"still serving", MASK));
        assert_eq!(
            sim.received(c),
            [&[0x81, 13][..], b"still serving"].concat(),
            "{policy:?}"
        );
        assert_eq!(sim.stats().budget_closes.load(Relaxed), 0, "{policy:?}");
        assert!(
            subs.iter().all(|s| !sim.closed.contains(s)),
            "{policy:?}: kept"
        );
    }
}

/// Past 90 % of the budget, only backlogs of 64 KiB or more stop growing:
/// a subscriber that reads, sent a burst of ten messages in one turn,
/// gets all ten, its queue holding the burst's first while the rest come.
/// Before, any backlog did (outside probe: an honest subscriber closed
/// 1008 beside 100 that never read; here, under `drop-newest`, nine of
/// its ten dropped).
#[test]
fn past_ninety_percent_a_subscriber_that_reads_still_gets_its_burst() {
    use crate::server::config::SlowConsumerPolicy;
    use std::sync::atomic::Ordering::Relaxed;
    let budget = STALLED_BUDGET;
    let (mut sim, _, _) = stalled_behind_bursts(SlowConsumerPolicy::DropNewest);
    let held = sim.stats().buffered_bytes.load(Relaxed);
    assert!(
        held > budget / 100 * 90 && held <= budget,
        "{held} of {budget}: past 90 %, within the budget"
    );
    let dropped = sim.stats().frames_dropped.load(Relaxed);
    let reader = sim.upgrade("/ws?topics=v", 1 << 20);
    let to_v = sim.upgrade("/publish/v", 1 << 20);
    let burst: Vec<u8> = (0..10u8)
        .flat_map(|i| client_frame(true, OpCode::Binary, &[i; 100], MASK))
        .collect();
    sim.send(to_v, &burst);
    sim.wait(TICK, TICK);
    let got = frames(&sim.received(reader));
    assert_eq!(got.len(), 10, "the whole burst");
    assert_eq!(sim.stats().frames_dropped.load(Relaxed), dropped);
}

/// A rated subscriber that reads keeps a record of each topic it was sent
/// lately (when it may be sent next): they are no backlog, so past 90 %
/// of the budget it still gets every new topic (review: its records,
/// ~70 B each, counted as a backlog and closed it 1008 after ~950 topics).
#[test]
fn past_ninety_percent_a_rated_subscriber_that_reads_gets_every_topic() {
    use crate::server::config::SlowConsumerPolicy;
    use std::sync::atomic::Ordering::Relaxed;
    let budget = STALLED_BUDGET;
    let (mut sim, _, _) = stalled_behind_bursts(SlowConsumerPolicy::DropNewest);
    let held = sim.stats().buffered_bytes.load(Relaxed);
    assert!(held > budget / 100 * 90, "{held} of {budget}: past 90 %");
    let reader = sim.upgrade("/ws?topics=r.*&max_rate=1", 1 << 30);
    for i in 0..1200 {
        publish(&mut sim, &format!("r.t{i}"), b"x");
    }
    let got = frames(&sim.received(reader));
    assert_eq!(got.len(), 1200, "every topic");
    assert!(got.iter().all(|(op, _)| *op != 0x8), "not closed");
}

/// A publication put in a conflation table counts 8 deliveries toward a
/// turn's bound (`TABLE_PUT_WORK`), and a worker plans its steps at the
/// weight its last turn found: 200 rated subscribers sent 1 000 new
/// topics in one read (200 000 puts) take more than one turn; counted as
/// plain deliveries they took one (and ~1 Mi puts a turn held a worker
/// seconds: outside probe).
#[test]
fn table_puts_count_more_toward_a_turns_deliveries() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| c.ping_interval = None);
    let _rated: Vec<usize> = (0..200)
        .map(|_| sim.upgrade("/ws?topics=r.*&max_rate=1", 1 << 30))
        .collect();
    let c = sim.connect(1 << 30);
    // A first read: the worker learns what its deliveries cost.
    sim.send(c, &posts_to_new_topics(0, 100));
    let before = sim.stats().deliveries_deferred.load(Relaxed);
    sim.send(c, &posts_to_new_topics(100, 1000));
    assert!(sim.stats().deliveries_deferred.load(Relaxed) > before);
    // The rest follows at the next turns, every one.
    sim.wait(TICK, TICK);
    assert_eq!(frames(&sim.received(_rated[0])).len(), 1100);
}

/// Rated subscribers (`max_rate`) that never read, and a publisher
/// inventing topic names: each name waits in every one's table, charged,
/// up to `--max-outbound-bytes` each. Under budget pressure a table of
/// 64 KiB or more takes no new name, as a queue would not: the subscriber
/// is closed 1008, and the worker stays within its budget (outside probe:
/// 100 of them held 5x a 64 MiB budget and were never closed, while an
/// honest subscriber was).
#[test]
fn rated_subscribers_tables_stop_growing_under_budget_pressure() {
    use std::sync::atomic::Ordering::Relaxed;
    let budget = 4u64 << 20;
    let mut sim = Sim::new(|c| {
        c.max_buffered_bytes = budget as usize;
        c.ping_interval = None;
    });
    let rated: Vec<usize> = (0..20)
        .map(|_| sim.upgrade("/ws?topics=r.*&max_rate=1", 0))
        .collect();
    let mut peak = 0;
    for i in 0..1500 {
        publish(&mut sim, &format!("r.t{i}"), &[b'x'; 900]);
        peak = peak.max(sim.stats().buffered_bytes.load(Relaxed));
    }
    assert!(peak <= budget, "{peak} of {budget} held");
    let closed = sim.stats().slow_consumer_disconnects.load(Relaxed);
    assert!(
        closed > 0,
        "the tables' subscribers closed as slow: {closed}"
    );
    assert!(closed <= rated.len() as u64);
}

/// A subscriber gone with a large conflation table (20 000 topics waiting)
/// leaves it to be freed a share per turn, charged until the last share;
/// the worker keeps turning meanwhile.
#[test]
fn a_large_table_left_behind_is_freed_over_turns_and_charged_until_then() {
    // 20 000 topics waiting for a rated subscriber, or 20 000 keys of one
    // topic for an `always` one (review: a key counted as nothing, so a
    // table of one topic was freed whole at once).
    for keys in [false, true] {
        large_table_left_behind(keys);
    }
}

fn large_table_left_behind(keys: bool) {
    use crate::server::config::SlowConsumerPolicy;
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| {
        c.ping_interval = None;
        if keys {
            c.slow_consumer = SlowConsumerPolicy::Always;
        }
    });
    let path = if keys {
        "/ws?topics=k"
    } else {
        "/ws?topics=r.*&max_rate=1"
    };
    let rated = sim.upgrade(path, 0);
    for i in 0..20_000 {
        if keys {
            publish(&mut sim, &format!("k?key=K{i}"), b"x");
        } else {
            publish(&mut sim, &format!("r.t{i}"), b"x");
        }
    }
    let held = sim.stats().buffered_bytes.load(Relaxed);
    assert!(held > 20_000 * 128, "{held} charged for the table");
    // It closes; it reads nothing, so it goes at the linger's end.
    sim.send(
        rated,
        &client_frame(true, OpCode::Close, &[0x03, 0xe8], MASK),
    );
    let mut turns = 0;
    while !sim.closed.contains(&rated) {
        sim.wait(TICK, TICK);
        assert!(turns < 100, "gone within the linger");
        turns += 1;
    }
    let just_gone = sim.stats().buffered_bytes.load(Relaxed);
    assert!(just_gone > 20_000 * 128, "{just_gone}: still charged");
    assert!(sim.core.busy(), "turns on to free it");
    let mut more = 0;
    while sim.core.busy() {
        sim.turn();
        more += 1;
        assert!(more < 10, "freed in a few turns");
    }
    assert!(more >= 1, "not all in one turn");
    assert!(
        sim.stats().buffered_bytes.load(Relaxed) < held / 10,
        "given back"
    );
}

/// A compressed message begun and left holds an inflater (64 KiB charged
/// for a few bytes sent): such connections are large holders too, cut at
/// 90 %, so the headroom stays for others (outside probe: they filled the
/// budget to its last byte and an honest echo was closed 1013).
#[test]
fn partial_compressed_messages_are_cut_at_ninety_percent_too() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| c.max_buffered_bytes = 4 << 20);
    let deflate = "Sec-WebSocket-Extensions: permessage-deflate\r\n";
    // The first byte of a compressed message, then nothing.
    let mut begun = client_frame(false, OpCode::Text, &[0x00], MASK);
    begun[0] |= 0x40;
    let mut held = Vec::new();
    let mut cut = None;
    for i in 0..80 {
        let c = sim.upgrade_with("/echo", deflate, 1 << 20);
        sim.send(c, &begun);
        if sim.stats().budget_closes.load(Relaxed) > 0 {
            assert_eq!(
                close_code(&sim.received(c)),
                Some(1013),
                "the one that grew"
            );
            cut = Some(i);
            break;
        }
        held.push(c);
    }
    let cut = cut.expect("cut before 80 such messages");
    let per = (crate::proto::deflate::INFLATER_BYTES + 16 * 1024) as f64;
    let share = cut as f64 * per / (4 << 20) as f64;
    assert!(
        (0.80..0.92).contains(&share),
        "cut at {share:.2} of the budget"
    );
    assert_eq!(sim.stats().budget_closes.load(Relaxed), 1);
    // The headroom serves an honest client's 100 KB echo.
    let honest = sim.upgrade("/echo", 1 << 20);
    let body = vec![b'x'; 100_000];
    sim.send(honest, &client_frame(true, OpCode::Binary, &body, MASK));
    let got = sim.received(honest);
    assert_eq!(&got[..2], &[0x82, 127], "echoed, not closed");
    assert_eq!(got.len(), 10 + body.len());
    assert!(held.iter().all(|&c| sim.received(c).is_empty()));
}

#[test]
fn a_websocket_publisher_over_the_publish_rate_is_not_read_until_its_debt_is_repaid() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| {
        c.max_publish_rate = 10;
        c.ping_interval = None;
    });
    let sub = sim.upgrade("/ws?topics=p", 1 << 20);
    let publisher = sim.upgrade("/publish/p", 1 << 20);
    // 30 messages in one read: the burst of 10 and one more (into one
    // message of debt) are published at once; the rest wait, read and
    // published at 10 per second (the pace loses nothing).
    let burst: Vec<u8> = (0..30u8)
        .flat_map(|i| client_frame(true, OpCode::Binary, &[i], MASK))
        .collect();
    sim.send(publisher, &burst);
    let expected: Vec<u8> = (0..11u8).flat_map(|i| [0x82, 1, i]).collect();
    assert_eq!(
        sim.received(sub),
        expected,
        "the burst and one more, in order"
    );
    assert_eq!(sim.stats().messages_published.load(Relaxed), 11);
    assert!(sim.stats().publishers_paced.load(Relaxed) >= 1);
    // One second later about ten more, in order.
    sim.wait(Duration::from_millis(1000), TICK);
    let got = sim.received(sub);
    let n = got.len() / 3;
    assert!((9..=11).contains(&n), "{n} in the second second");
    let expected: Vec<u8> = (11..11 + n as u8).flat_map(|i| [0x82, 1, i]).collect();
    assert_eq!(got, expected);
    // The next message waits behind the rest...
    sim.send(publisher, &client_frame(true, OpCode::Binary, &[30], MASK));
    sim.wait(Duration::from_millis(1200), TICK);
    let expected: Vec<u8> = (11 + n as u8..31).flat_map(|i| [0x82, 1, i]).collect();
    assert_eq!(
        sim.received(sub),
        expected,
        "the rest, then the next, in order"
    );
    assert_eq!(sim.stats().messages_published.load(Relaxed), 31);
    assert!(!sim.closed.contains(&publisher), "paced, never cut");
    assert_eq!(ws_failures(&sim), []);
}

#[test]
fn compressed_messages_of_one_read_are_inflated_a_turns_worth_at_a_time() {
    // 8 messages of 512 KiB of one byte, ~600 B each compressed, in one
    // read: inflated whole, they would make 4 MiB in one turn (a read of
    // 64 KiB of such messages, 64 GiB). About 1 MiB of work per turn, an
    // inflated byte counting INFLATE_WORK and then one more delivered:
    // ~128 KiB inflated a turn, a message every four turns; the rest
    // waits, in order, nothing lost.
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| c.ping_interval = None);
    let sub = sim.upgrade("/ws?topics=z", 64 << 20);
    let publisher = sim.upgrade_with(
        "/publish/z",
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
        1 << 20,
    );
    let payload = |i: u8| vec![b'a' + i; 512 * 1024];
    let mut read = Vec::new();
    for i in 0..8u8 {
        let compressed = crate::proto::deflate::compress(&payload(i)).unwrap();
        assert!(compressed.len() < 4096);
        let mut frame = client_frame(true, OpCode::Binary, &compressed, MASK);
        frame[0] |= 0x40; // RSV1: compressed
        read.extend_from_slice(&frame);
    }
    sim.send(publisher, &read);
    assert_eq!(
        sim.stats().messages_published.load(Relaxed),
        0,
        "a turn's worth in the first turn: part of the first message"
    );
    let mut turns = 1;
    while sim.stats().messages_published.load(Relaxed) < 8 {
        let before = sim.stats().messages_published.load(Relaxed);
        sim.wait(TICK, TICK);
        turns += 1;
        assert!(sim.stats().messages_published.load(Relaxed) - before <= 1);
        assert!(turns <= 40, "the rest follows, a turn's worth at a time");
    }
    assert!(turns >= 24, "{turns} turns");
    // Delivered at the turn after its publication.
    sim.wait(TICK, TICK);
    let got = sim.received(sub);
    let mut expected = Vec::new();
    for i in 0..8u8 {
        expected.extend_from_slice(&[0x82, 127]);
        expected.extend_from_slice(&(512u64 * 1024).to_be_bytes());
        expected.extend_from_slice(&payload(i));
    }
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "every message whole, in order");
    assert_eq!(ws_failures(&sim), []);
}

#[test]
fn a_turns_worth_of_input_counts_every_read_of_the_turn() {
    // 40 messages of 60 KiB arrive in pieces of 32 KiB within one turn, as
    // io_uring hands them over (one receive buffer a completion): each
    // piece alone is far below a turn's worth, but together they are 2.4
    // MB. The turn stops at its worth (each byte received counts
    // WIRE_WORK, each byte decoded one more), and the rest follows at the
    // next turns, in order, nothing lost. Counted per read, all 40 went in
    // the first turn (outside probe: a flooding publisher held its io_uring
    // worker, every other connection of it waiting, for the whole flood).
    use crate::server::session::{WIRE_WORK, YIELD_AFTER_BYTES};
    use std::sync::atomic::Ordering::Relaxed;
    const SIZE: usize = 60 * 1024;
    let mut sim = Sim::new(|c| c.ping_interval = None);
    let sub = sim.upgrade("/ws?topics=f", 64 << 20);
    let publisher = sim.upgrade("/publish/f", 1 << 20);
    let payload = |i: usize| vec![b'a' + (i % 26) as u8; SIZE];
    let mut wire = Vec::new();
    for i in 0..40 {
        wire.extend_from_slice(&client_frame(true, OpCode::Binary, &payload(i), MASK));
    }
    sim.send_in_pieces(publisher, &wire, 32 * 1024);
    let per_turn = YIELD_AFTER_BYTES / (SIZE * (WIRE_WORK + 1)) + 1;
    let first = sim.stats().messages_published.load(Relaxed) as usize;
    assert!(
        (1..=per_turn).contains(&first),
        "{first} messages in the first turn, at most {per_turn}"
    );
    let mut turns = 1;
    while sim.stats().messages_published.load(Relaxed) < 40 {
        let before = sim.stats().messages_published.load(Relaxed) as usize;
        sim.wait(TICK, TICK);
        turns += 1;
        let now = sim.stats().messages_published.load(Relaxed) as usize;
        // Input held while it was paused was counted when it came: what
        // decoding it costs is the bound now.
        assert!(now - before <= YIELD_AFTER_BYTES / SIZE + 1);
        assert!(turns <= 40, "the rest follows, a turn's worth at a time");
    }
    sim.wait(TICK, TICK);
    let got = sim.received(sub);
    let mut expected = Vec::new();
    for i in 0..40 {
        expected.extend_from_slice(&[0x82, 126]);
        expected.extend_from_slice(&(SIZE as u16).to_be_bytes());
        expected.extend_from_slice(&payload(i));
    }
    assert!(got == expected, "every message whole, in order");
    assert!(!sim.closed.contains(&publisher));
    assert_eq!(ws_failures(&sim), []);
}

#[test]
fn a_turn_compresses_its_share_of_publications_and_sends_the_rest_plain() {
    // A burst of 60 KiB text publications to a permessage-deflate
    // subscriber: compressing them all in one turn took ~5 ms each on the
    // worker's thread (outside probe: half a second of every other
    // connection of the worker waiting, per burst of 100). A turn
    // compresses its room's worth; the rest go plain (RSV1 clear), counted;
    // every message arrives whole and in order.
    use std::sync::atomic::Ordering::Relaxed;
    const SIZE: usize = 60 * 1024;
    let mut sim = Sim::new(|c| c.ping_interval = None);
    let sub = sim.upgrade_with(
        "/ws?topics=d",
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
        64 << 20,
    );
    let publisher = sim.upgrade("/publish/d", 1 << 20);
    let payload = |i: usize| vec![b'a' + i as u8; SIZE];
    let mut wire = Vec::new();
    for i in 0..12 {
        wire.extend_from_slice(&client_frame(true, OpCode::Text, &payload(i), MASK));
    }
    sim.send(publisher, &wire);
    sim.wait(TICK * 30, TICK);
    assert_eq!(sim.stats().messages_published.load(Relaxed), 12);
    let got = sim.received(sub);
    let (mut pos, mut plain, mut compressed, mut i) = (0, 0, 0, 0);
    while pos < got.len() {
        let h = crate::proto::frame::parse_header(&got[pos..])
            .unwrap()
            .unwrap();
        let body = &got[pos + h.header_len..pos + h.header_len + h.payload_len as usize];
        let message = if got[pos] & 0x40 != 0 {
            compressed += 1;
            let mut out = Vec::new();
            crate::proto::deflate::inflate(body, 1 << 20, &mut out).unwrap();
            out
        } else {
            plain += 1;
            body.to_vec()
        };
        assert!(message == payload(i), "message {i} whole, in order");
        pos += h.header_len + h.payload_len as usize;
        i += 1;
    }
    assert_eq!(i, 12);
    assert!(
        compressed >= 2,
        "a turn's share is compressed ({compressed})"
    );
    assert!(plain >= 1, "past it, plain ({plain})");
    assert_eq!(sim.stats().compression_skipped.load(Relaxed), plain);
    assert_eq!(ws_failures(&sim), []);
}

#[test]
fn a_turn_compresses_its_share_of_echoes_and_sends_the_rest_plain() {
    // Eight permessage-deflate echo clients each send a 60 KiB text
    // message, all read in one turn: each compressed echo costs ~1-5 ms,
    // and each connection's own turn always takes one message, so the
    // worker compressed them all in the turn (outside probe: 32 such
    // clients kept a victim's round trip at ~90 ms). The turn compresses
    // its room's worth; the rest go plain (RSV1 clear), every echo whole.
    const SIZE: usize = 60 * 1024;
    let mut sim = Sim::new(|c| c.ping_interval = None);
    let deflate = "Sec-WebSocket-Extensions: permessage-deflate\r\n";
    let clients: Vec<usize> = (0..8)
        .map(|_| sim.upgrade_with("/echo", deflate, 1 << 20))
        .collect();
    let text = |i: usize| vec![b'a' + i as u8; SIZE];
    for (i, &c) in clients.iter().enumerate() {
        sim.peers.get_mut(&c).unwrap().unread = client_frame(true, OpCode::Text, &text(i), MASK);
    }
    sim.core.begin_turn(sim.now);
    for &c in &clients {
        sim.pump(c);
    }
    sim.turn();
    let (mut compressed, mut plain) = (0, 0);
    for (i, &c) in clients.iter().enumerate() {
        let got = sim.received(c);
        let h = crate::proto::frame::parse_header(&got).unwrap().unwrap();
        let body = &got[h.header_len..h.header_len + h.payload_len as usize];
        let message = if h.rsv1 {
            compressed += 1;
            let mut out = Vec::new();
            crate::proto::deflate::inflate(body, 1 << 20, &mut out).unwrap();
            out
        } else {
            plain += 1;
            body.to_vec()
        };
        assert!(message == text(i), "echo {i} whole");
    }
    assert!(
        (2..=3).contains(&compressed),
        "a turn's share: {compressed}"
    );
    assert_eq!(compressed + plain, 8);
    assert_eq!(ws_failures(&sim), []);
}

#[test]
fn a_paced_publishers_fin_waits_for_what_it_sent_before_it() {
    // The FIN arrives while the publisher is paced, with 19 of its 30
    // messages still kept (io_uring reads it so): they are published at
    // the pace, in order, and then the connection closes.
    let mut sim = Sim::new(|c| {
        c.max_publish_rate = 10;
        c.ping_interval = None;
    });
    let sub = sim.upgrade("/ws?topics=p", 1 << 20);
    let publisher = sim.upgrade("/publish/p", 1 << 20);
    let burst: Vec<u8> = (0..30u8)
        .flat_map(|i| client_frame(true, OpCode::Binary, &[i], MASK))
        .collect();
    sim.send(publisher, &burst);
    sim.core.eof(publisher);
    sim.core.after_input(publisher);
    sim.turn();
    assert!(!sim.closed.contains(&publisher), "not before what it sent");
    sim.wait(Duration::from_millis(2500), TICK);
    let expected: Vec<u8> = (0..30u8).flat_map(|i| [0x82, 1, i]).collect();
    assert_eq!(sim.received(sub), expected, "all 30, in order");
    assert!(sim.closed.contains(&publisher), "then closed");
    assert_eq!(ws_failures(&sim), []);
}

#[test]
fn a_paced_backlog_not_worked_off_within_the_message_timeout_is_closed_1008() {
    // 100 messages in one read at one per second: 98 s of backlog, past the
    // 3 s message timeout. Closed 1008 "publish rate exceeded" (while paced
    // it is not read, so nothing else would show a client that left).
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| {
        c.max_publish_rate = 1;
        c.ping_interval = None;
        c.message_timeout = Some(Duration::from_secs(3));
    });
    let sub = sim.upgrade("/ws?topics=p", 1 << 20);
    let publisher = sim.upgrade("/publish/p", 1 << 20);
    let burst: Vec<u8> = (0..100u8)
        .flat_map(|i| client_frame(true, OpCode::Binary, &[i], MASK))
        .collect();
    sim.send(publisher, &burst);
    sim.wait(Duration::from_millis(2500), TICK);
    assert!(!sim.closed.contains(&publisher));
    sim.wait(Duration::from_secs(3), TICK);
    let closing = sim.received(publisher);
    assert!(
        closing.windows(2).any(|w| w == 1008u16.to_be_bytes()),
        "a 1008 close: {closing:?}"
    );
    assert_eq!(ws_failures(&sim), [(1008, 1)]);
    let published = sim.stats().messages_published.load(Relaxed);
    assert!((2..10).contains(&published), "{published} published");
    assert_eq!(sim.received(sub).len() as u64, 3 * published);
}

/// `n` permessage-deflate publishers of `topic`, each with one compressed
/// message of `size` bytes of one letter (a few KiB on the wire) sent and
/// not read yet: the test pumps them within one turn.
fn compressed_publishers(sim: &mut Sim, topic: &str, n: usize, size: usize) -> Vec<usize> {
    (0..n)
        .map(|i| {
            let p = sim.upgrade_with(
                &format!("/publish/{topic}"),
                "Sec-WebSocket-Extensions: permessage-deflate\r\n",
                1 << 20,
            );
            let compressed = crate::proto::deflate::compress(&vec![b'a' + i as u8; size]).unwrap();
            assert!(compressed.len() < 8192);
            let mut frame = client_frame(true, OpCode::Binary, &compressed, MASK);
            frame[0] |= 0x40; // RSV1: compressed
            sim.peers.get_mut(&p).unwrap().unread = frame;
            p
        })
        .collect()
}

#[test]
fn a_small_compressed_message_that_inflates_to_megabytes_takes_turns() {
    // Four publishers each send one compressed message of 4 KiB that
    // inflates to 4 MiB. Inflated whole in the turn that read it, each was
    // 4 MiB of work for 4 KiB of input, and the worker's other connections
    // waited for all of them (outside probe: 16 connections sending such
    // messages of 16 MiB held a worker ~0.2 s a turn, a victim's round
    // trip up to 0.9 s). Each now inflates its turn's worth (~128 KiB) and
    // goes on at the next turns; every message is published whole.
    use std::sync::atomic::Ordering::Relaxed;
    const MESSAGE: usize = 4 << 20;
    let mut sim = Sim::new(|c| {
        c.max_outbound_bytes = 64 << 20;
        c.ping_interval = None;
    });
    let sub = sim.upgrade("/ws?topics=b", 64 << 20);
    let publishers = compressed_publishers(&mut sim, "b", 4, MESSAGE);
    sim.core.begin_turn(sim.now);
    for &p in &publishers {
        sim.pump(p);
    }
    sim.turn();
    assert_eq!(
        sim.stats().messages_published.load(Relaxed),
        0,
        "none inflated whole in the turn that read it"
    );
    let mut turns = 1;
    while sim.stats().messages_published.load(Relaxed) < 4 {
        sim.wait(TICK, TICK);
        turns += 1;
        assert!(turns <= 40, "a turn's worth at a time, then published");
    }
    assert!(turns >= 24, "{turns} turns");
    sim.wait(TICK, TICK);
    let got = sim.received(sub);
    assert_eq!(got.len(), 4 * (MESSAGE + 10));
    for m in got.chunks(MESSAGE + 10) {
        assert!(m[10..].iter().all(|&b| b == m[10]), "whole");
    }
    assert_eq!(ws_failures(&sim), []);
}

#[test]
fn the_compressed_publications_of_one_turn_stay_within_the_budget() {
    // Six publishers, each one compressed message of 2 MiB (a few KiB on
    // the wire), all read in the same turn, against a budget of 8 MiB:
    // each inflates a turn's worth and goes on at the next turns (a
    // partial message, charged as it grows), and what is published is
    // charged as it is published, so the messages that would take the
    // worker past the budget are not published and their publishers are
    // failed 1013, while the worker holds no more than its budget. The
    // others are delivered whole.
    use std::sync::atomic::Ordering::Relaxed;
    const MESSAGE: usize = 2 << 20;
    let mut sim = Sim::new(|c| {
        c.max_buffered_bytes = 8 << 20;
        // The subscriber takes all of them in one turn.
        c.max_outbound_bytes = 16 << 20;
        c.ping_interval = None;
    });
    let sub = sim.upgrade("/ws?topics=z", 64 << 20);
    let publishers = compressed_publishers(&mut sim, "z", 6, MESSAGE);
    sim.core.begin_turn(sim.now);
    let mut peak = 0;
    for &p in &publishers {
        sim.pump(p);
        peak = peak.max(sim.stats().buffered_bytes.load(Relaxed));
    }
    sim.turn();
    for _ in 0..30 {
        peak = peak.max(sim.stats().buffered_bytes.load(Relaxed));
        sim.wait(TICK, TICK);
    }
    assert!(peak <= 8 << 20, "the publications held {peak} bytes");
    let published = sim.stats().messages_published.load(Relaxed) as usize;
    assert!(
        (2..=4).contains(&published),
        "{published} of 6 fit the budget"
    );
    assert_eq!(ws_failures(&sim), [(1013, 6 - published as u64)]);
    assert_eq!(
        sim.stats().budget_closes.load(Relaxed) as usize,
        6 - published
    );
    let mut expected = Vec::new();
    for (i, &p) in publishers.iter().enumerate() {
        let wire = sim.received(p);
        if close_code(&wire) == Some(1013) {
            continue; // refused, and told so
        }
        expected.extend_from_slice(&[0x82, 127]);
        expected.extend_from_slice(&(MESSAGE as u64).to_be_bytes());
        expected.extend_from_slice(&vec![b'a' + i as u8; MESSAGE]);
    }
    assert_eq!(expected.len(), published * (MESSAGE + 10));
    let got = sim.received(sub);
    assert!(
        got.len() == expected.len()
            && got
                .chunks(MESSAGE + 10)
                .all(|m| expected.chunks(MESSAGE + 10).any(|e| e == m)),
        "the publications that fit, whole"
    );
}

#[test]
fn metrics_bodies_a_client_does_not_read_are_charged_to_the_budget() {
    // A client pipelines a scrape per loop turn and never reads: each turn
    // renders a new body, which its queue holds. All of it is charged, so
    // many such clients meet the buffer budget, not the machine's memory.
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| c.ping_interval = None);
    let key = sim.connect(0);
    let before = sim.stats().buffered_bytes.load(Relaxed);
    for _ in 0..10 {
        sim.now += TICK;
        sim.send(key, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    }
    let queued = sim.core.conn_mut(key).out_mut().len() as u64;
    assert!(queued > 10 * 4096, "ten renderings queued: {queued} bytes");
    let charged = sim.stats().buffered_bytes.load(Relaxed) - before;
    assert!(
        charged >= queued,
        "{charged} bytes charged for {queued} queued"
    );
}

#[test]
fn a_pipeline_a_client_does_not_read_the_answers_of_waits_for_them() {
    // 54 scrapes pipelined in one read by a client that reads nothing:
    // each answer was queued (and charged) at once, so a few thousand such
    // clients held twice the budget (outside probe: 2.3 GB of a 1 GiB
    // budget, honest clients refused 1013). Past 64 KiB of answers the
    // rest of the pipeline waits, kept, and the connection is not read;
    // as the client reads, the rest is answered, all 54, in order.
    use crate::server::session::PIPELINE_AHEAD_BYTES;
    let mut sim = Sim::new(|c| c.ping_interval = None);
    let key = sim.connect(0);
    let scrape = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    sim.send(key, &scrape[..]);
    let one = sim.core.conn_mut(key).out_mut().len();
    assert!(one > 4096, "an answer is a few KiB: {one}");
    sim.send(key, &scrape.repeat(53));
    sim.wait(TICK * 5, TICK);
    let held = sim.core.conn_mut(key).out_mut().len();
    assert!(
        held > PIPELINE_AHEAD_BYTES && held <= PIPELINE_AHEAD_BYTES + one,
        "{held} bytes of answers queued, {one} each"
    );
    // The client reads: the rest follows, in order.
    let mut got = Vec::new();
    for _ in 0..200 {
        sim.read(key, 1 << 20);
        sim.wait(TICK, TICK);
        got.extend(sim.received(key));
        if got.windows(9).filter(|w| w == b"HTTP/1.1 ").count() == 54 {
            break;
        }
    }
    let answers = String::from_utf8_lossy(&got);
    assert_eq!(
        answers.matches("HTTP/1.1 200 OK").count(),
        54,
        "all answered"
    );
    assert!(!sim.closed.contains(&key), "and kept open");
}

#[test]
fn a_pipeline_read_slowly_is_answered_whole_past_the_message_timeout() {
    // A client pipelines 200 scrapes and reads its answers slowly: the
    // pipeline waits for them, turn after turn, longer than
    // --message-timeout. Only a publisher paced by --max-publish-rate is
    // judged by that timeout (outside probe: such a pipeline was closed
    // "publish rate exceeded" after ~550 of 2 000 answers).
    let mut sim = Sim::new(|c| {
        c.ping_interval = None;
        c.message_timeout = Some(Duration::from_secs(1));
    });
    let key = sim.connect(0);
    let scrape = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    sim.send(key, &scrape.repeat(200));
    let mut got = Vec::new();
    for _ in 0..400 {
        sim.read(key, 64 * 1024);
        sim.now += Duration::from_millis(20);
        got.extend(sim.received(key));
        if got.windows(15).filter(|w| w == b"HTTP/1.1 200 OK").count() == 200 {
            break;
        }
    }
    let answers = got.windows(15).filter(|w| w == b"HTTP/1.1 200 OK").count();
    assert_eq!(answers, 200, "every answer");
    assert!(
        !sim.closed.contains(&key) && !sim.peers[&key].shut_down,
        "kept open"
    );
    assert_eq!(ws_failures(&sim), []);
}

#[test]
fn an_http_client_closed_over_the_budget_is_answered_once() {
    // Answers of a pipeline pass a small budget: the connection is closed
    // after the answers queued, each whole (an answer spans chunks: its
    // head, then the shared body), and no 503 follows them, since no
    // request of its own waits for one (outside probe: an honest POST
    // answered 204 and then 503).
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| {
        c.ping_interval = None;
        c.max_buffered_bytes = 48 * 1024;
    });
    let key = sim.connect(0);
    let scrape = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    sim.send(key, &scrape.repeat(3));
    assert_eq!(sim.stats().budget_closes.load(Relaxed), 1);
    let mut got = Vec::new();
    for _ in 0..10 {
        sim.read(key, 1 << 20);
        sim.wait(TICK, TICK);
        got.extend(sim.received(key));
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(
        !text.contains("HTTP/1.1 503"),
        "no answer to a request not made"
    );
    let mut rest = &got[..];
    let mut answers = 0;
    while !rest.is_empty() {
        let head_end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a head")
            + 4;
        let head = String::from_utf8_lossy(&rest[..head_end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("Content-Length");
        assert!(rest.len() >= head_end + len, "answer {answers} whole");
        rest = &rest[head_end + len..];
        answers += 1;
    }
    assert!((1..=3).contains(&answers), "{answers} answers");
    assert!(sim.peers[&key].shut_down, "then closed");
}

#[test]
fn frames_replayed_from_a_history_stay_charged_after_the_history_drops_them() {
    // A message published while nobody listened (its charge released at
    // once), then replayed to ten subscribers that never read, then pushed
    // out of its history by the next publication: the ten queues hold the
    // one frame, and the budget charges it once.
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| {
        c.ping_interval = None;
        c.history.size = 1;
    });
    let _holder = sim.upgrade("/publish/t", 1 << 20);
    let http = |sim: &mut Sim, fill: u8| {
        let key = sim.connect(1 << 20);
        let body = vec![fill; 64 * 1024];
        let mut req = format!(
            "POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        sim.send(key, &req);
        let answer = String::from_utf8(sim.received(key)).unwrap();
        assert!(answer.starts_with("HTTP/1.1 204 "), "{answer}");
        answer
            .lines()
            .find_map(|l| l.strip_prefix("Corecast-Epoch: "))
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let epoch = http(&mut sim, b'a');
    sim.wait(TICK, TICK);
    let base = sim.stats().buffered_bytes.load(Relaxed);
    let subscribe = format!(
        r#"{{"op":"subscribe","topics":["t"],"since":{{"t":{{"epoch":{epoch},"seq":0}}}}}}"#
    );
    for _ in 0..10 {
        let sub = sim.upgrade("/ws", 0);
        sim.send(
            sub,
            &client_frame(true, OpCode::Text, subscribe.as_bytes(), MASK),
        );
    }
    http(&mut sim, b'b');
    sim.wait(TICK, TICK);
    let charged = sim.stats().buffered_bytes.load(Relaxed) - base;
    assert!(
        charged >= 2 * 64 * 1024,
        "two 64 KiB frames queued, {charged} bytes charged"
    );
    assert!(
        charged < 3 * 64 * 1024,
        "each once: {charged} bytes charged"
    );
}

/// A rated subscriber's rates are its own copies of its names (up to 64
/// of 128 bytes, ~15 KB), charged to the budget while it holds them
/// (outside review: uncharged, ~1.5 GB at 100 000 such connections).
/// Measured against the same subscriptions without a rate.
#[test]
fn a_rated_subscribers_rates_are_charged_while_it_holds_them() {
    use std::sync::atomic::Ordering::Relaxed;
    // 100 bytes each: 64 of them fit in a request head.
    let names: Vec<String> = (0..64)
        .map(|i| format!("{i:02}{}", "n".repeat(98)))
        .collect();
    let run = |query: &str| {
        let mut sim = Sim::new(|c| c.ping_interval = None);
        let before = sim.stats().buffered_bytes.load(Relaxed);
        let sub = sim.upgrade(&format!("/ws?topics={}{query}", names.join(",")), 1 << 20);
        sim.wait(TICK, TICK);
        let held = sim.stats().buffered_bytes.load(Relaxed) - before;
        let unsubscribe = format!(
            r#"{{"op":"unsubscribe","topics":["{}"]}}"#,
            names[..63].join("\",\"")
        );
        sim.send(
            sub,
            &client_frame(true, OpCode::Text, unsubscribe.as_bytes(), MASK),
        );
        sim.wait(TICK, TICK);
        (held, sim.stats().buffered_bytes.load(Relaxed) - before)
    };
    let (plain, plain_after) = run("");
    let (rated, rated_after) = run("&max_rate=1");
    // `RATE_ENTRY_BYTES` (96) and the name (100), each.
    assert!(
        rated >= plain + 64 * (96 + 100),
        "{rated} bytes charged with a rate, {plain} without"
    );
    assert!(
        rated_after < plain_after + 2 * (96 + 100) + 128,
        "one name left: {rated_after} bytes charged with a rate, {plain_after} without"
    );
}

#[test]
fn a_rated_subscribers_record_of_the_topics_it_was_sent_is_charged() {
    // A `>`-style subscriber with a rate keeps, per topic it was sent,
    // when that topic may be sent next: a publisher inventing topic names
    // makes one record each, charged to the budget until it is forgotten.
    // Measured against the same run without a rate (the topics' registry
    // entries cost the same in both).
    use std::sync::atomic::Ordering::Relaxed;
    let run = |query: &str| {
        let mut sim = Sim::new(|c| c.ping_interval = None);
        let _sub = sim.upgrade(&format!("/ws?topics=r.*{query}"), 1 << 20);
        for i in 0..200 {
            publish(&mut sim, &format!("r.t{i}"), b"x");
        }
        sim.wait(TICK, TICK);
        let sent = sim.stats().buffered_bytes.load(Relaxed);
        // Forgotten once their interval is over, at the next release.
        sim.wait(2 * SECOND, TICK);
        publish(&mut sim, "r.t0", b"y");
        sim.wait(TICK, TICK);
        (sent, sim.stats().buffered_bytes.load(Relaxed))
    };
    let (plain, plain_later) = run("");
    let (rated, rated_later) = run("&max_rate=1");
    // `conflation::SENT_LATELY_BYTES` (64) and the name, each.
    assert!(
        rated >= plain + 200 * 64,
        "{rated} bytes charged with a rate, {plain} without"
    );
    assert!(
        rated_later < plain_later + 10 * 64,
        "{rated_later} bytes still charged with a rate, {plain_later} without"
    );
}

/// Empty publications hold their message and slot (~300 bytes each), not
/// their 2-byte frame: one read of 20 000 of them (120 KB on the wire) is
/// charged what it holds, yields after a bounded number, and the rest
/// follow in the next turns, every one delivered.
#[test]
fn empty_publications_are_charged_what_they_hold_and_a_read_of_them_yields() {
    use crate::pubsub::bus::PUBLICATION_OVERHEAD_BYTES;
    use crate::server::session::YIELD_AFTER_BYTES;
    use std::sync::atomic::Ordering::Relaxed;
    const N: usize = 20_000;
    let mut sim = Sim::new(|c| c.ping_interval = None);
    let sub = sim.upgrade("/ws?topics=e", 64 << 20);
    let p = sim.upgrade("/publish/e", 1 << 20);
    let read: Vec<u8> = (0..N)
        .flat_map(|_| client_frame(true, OpCode::Binary, &[], MASK))
        .collect();
    sim.peers.get_mut(&p).unwrap().unread = read;
    sim.core.begin_turn(sim.now);
    sim.pump(p);
    let published = sim.stats().messages_published.load(Relaxed) as usize;
    let held = sim.stats().buffered_bytes.load(Relaxed) as usize;
    assert!(
        published <= YIELD_AFTER_BYTES / PUBLICATION_OVERHEAD_BYTES + 1,
        "{published} publications from one read"
    );
    assert!(
        held >= published * PUBLICATION_OVERHEAD_BYTES,
        "{published} publications charged {held} bytes"
    );
    // Read on a millisecond later (a yielded read is paced), turn by turn.
    for _ in 0..100 {
        if sim.stats().messages_published.load(Relaxed) as usize == N {
            break;
        }
        sim.wait(TICK, TICK);
    }
    sim.turn();
    assert_eq!(sim.stats().messages_published.load(Relaxed) as usize, N);
    assert_eq!(
        sim.received(sub),
        [0x82, 0].repeat(N),
        "every one delivered"
    );
}

/// Matching names to patterns counts toward a read's turn: one read of
/// two control messages, each making the worker compare 258 048 tokens
/// (256 `since` keys of 63 tokens against 16 patterns, 15 of them near
/// misses), answers the first and leaves the second for the next turn
/// (before: both, and as many as one read holds, in one turn).
#[test]
fn control_messages_that_match_many_names_yield_the_turn() {
    let mut sim = Sim::new(|c| c.ping_interval = None);
    let sub = sim.upgrade("/ws", 64 << 20);
    let patterns: Vec<String> = (0..15)
        .map(|i| format!("\"{}*.b{i:02}\"", "a.".repeat(61)))
        .chain(["\">\"".to_string()])
        .collect();
    let since: Vec<String> = (0..256)
        .map(|i| format!("\"{}k{i:x}\":{{\"epoch\":1,\"seq\":1}}", "a.".repeat(62)))
        .collect();
    let msg = format!(
        r#"{{"op":"subscribe","topics":[{}],"since":{{{}}}}}"#,
        patterns.join(","),
        since.join(",")
    );
    let frame = client_frame(true, OpCode::Text, msg.as_bytes(), MASK);
    sim.peers.get_mut(&sub).unwrap().unread = [frame.clone(), frame].concat();
    sim.core.begin_turn(sim.now);
    sim.pump(sub);
    // The turn ends at once (a yielded read goes on a millisecond later).
    sim.turn();
    let replies = |sim: &mut Sim| {
        String::from_utf8_lossy(&sim.received(sub))
            .matches("{\"op\":")
            .count()
    };
    assert_eq!(replies(&mut sim), 1, "one answered in the first turn");
    for _ in 0..10 {
        sim.wait(TICK, TICK);
    }
    sim.turn();
    assert_eq!(replies(&mut sim), 1, "the second in a later turn");
}

/// Under `always`, a subscriber whose table fills is failed once: what
/// comes for it while its close is queued is not put in its table, nor
/// failed and counted again (outside probe: 5 never-reading subscribers
/// and 40 000 keys counted 120 disconnects and as many 1008 failures).
/// Here one turn delivers runs of two topics in turn, each after the
/// table filled.
#[test]
fn a_conflating_subscriber_failed_as_slow_is_counted_once() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(|c| {
        c.slow_consumer = crate::server::config::SlowConsumerPolicy::Always;
        c.max_outbound_bytes = 16 * 1024;
        c.ping_interval = None;
    });
    let _stalled = sim.upgrade("/ws?topics=a,b", 0);
    let publisher = sim.connect(1 << 30);
    let pipeline: String = (0..400)
        .map(|i| {
            let topic = if i % 2 == 0 { "a" } else { "b" };
            format!(
                "POST /publish/{topic}?key=k{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx"
            )
        })
        .collect();
    sim.send(publisher, pipeline.as_bytes());
    sim.wait(TICK, TICK);
    let st = sim.stats();
    assert_eq!(st.slow_consumer_disconnects.load(Relaxed), 1);
    assert_eq!(ws_failures(&sim), [(1008, 1)]);
}

/// A pipeline of `POST /publish` requests, each naming a topic nobody has
/// named, against many long patterns that share prefixes with the names:
/// each request walks the patterns' trie (is there a pattern matching the
/// new name?), thousands of nodes matched in part and never whole. The
/// walk counts toward the connection's turn like the bytes it would take
/// to decode as long, so the pipeline yields after a few requests instead
/// of holding the worker for every one (it counted 320 bytes a request:
/// ~3 000 requests, and their walks, in one turn).
#[test]
fn http_publications_to_new_names_pay_for_their_pattern_walks() {
    let mut sim = Sim::new(|c| c.ping_interval = None);
    // 256 patterns: the first 8 tokens `a` or `*` (every combination),
    // then 40 tokens `a` and a last one no name here has. A name of 49
    // `a`s then `q` walks every one of their ~10 700 nodes.
    let patterns: Vec<String> = (0..256u32)
        .map(|bits| {
            let head: Vec<&str> = (0..8)
                .map(|j| if bits >> j & 1 == 1 { "*" } else { "a" })
                .collect();
            format!("{}.{}zz", head.join("."), "a.".repeat(40))
        })
        .collect();
    for chunk in patterns.chunks(16) {
        let sub = sim.upgrade("/ws", 1 << 20);
        let list: Vec<String> = chunk.iter().map(|p| format!("\"{p}\"")).collect();
        let msg = format!(r#"{{"op":"subscribe","topics":[{}]}}"#, list.join(","));
        sim.send(sub, &client_frame(true, OpCode::Text, msg.as_bytes(), MASK));
        sim.wait(TICK, TICK);
        let reply = String::from_utf8_lossy(&sim.received(sub)).into_owned();
        assert!(reply.contains("\"op\":\"subscribed\""), "{reply}");
    }
    let publisher = sim.connect(1 << 30);
    let pipeline: String = (0..40)
        .map(|i| {
            format!(
                "POST /publish/{}q{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx",
                "a.".repeat(48)
            )
        })
        .collect();
    sim.send(publisher, pipeline.as_bytes());
    let answered = |sim: &mut Sim| {
        String::from_utf8_lossy(&sim.received(publisher))
            .matches("HTTP/1.1 204")
            .count()
    };
    let first = answered(&mut sim);
    assert!(
        (1..=8).contains(&first),
        "{first} answered in the first turn"
    );
    // The rest in later turns, none lost.
    sim.wait(Duration::from_millis(50), Duration::from_millis(1));
    assert_eq!(first + answered(&mut sim), 40);
}

/// A release from a conflating subscriber's table stops at the topic whose
/// frames would take its queue past `--max-outbound-bytes`; that topic and
/// those after it wait for the next release, in their order, and every
/// topic's newest value arrives (review: no test took that path).
#[test]
fn a_release_cut_by_the_queue_bound_leaves_the_rest_waiting_in_order() {
    use crate::server::config::SlowConsumerPolicy;
    let mut sim = Sim::new(|c| {
        c.max_outbound_bytes = 64 * 1024;
        c.slow_consumer = SlowConsumerPolicy::Conflate;
        c.ping_interval = None;
    });
    let sub = sim.upgrade("/ws?topics=c.>", 0);
    let body = |t: usize, v: usize| {
        let mut b = format!("{t}:{v}:").into_bytes();
        b.resize(20 * 1024, b'x');
        b
    };
    // Ten topics twice, 20 KiB each: the queue takes the first few, the
    // rest wait in the table, the newest of each topic.
    for v in 0..2 {
        for t in 0..10 {
            publish(&mut sim, &format!("c.t{t}"), &body(t, v));
        }
    }
    for _ in 0..30 {
        sim.read(sub, 1 << 20);
    }
    let got: Vec<(usize, usize)> = frames(&sim.received(sub))
        .into_iter()
        .filter(|(op, _)| *op == 0x1 || *op == 0x2)
        .map(|(_, p)| {
            let text = String::from_utf8_lossy(&p[..8]).into_owned();
            let mut it = text.split(':');
            let t = it.next().unwrap().parse().unwrap();
            (t, it.next().unwrap().parse().unwrap())
        })
        .collect();
    for t in 0..10 {
        assert_eq!(
            got.iter().rev().find(|(topic, _)| *topic == t).map(|g| g.1),
            Some(1),
            "topic {t}'s newest value arrives last: {got:?}"
        );
    }
    // Released in the order the topics first waited, each once: the
    // first three went to the queue at once, so 3 to 9 waited first, then
    // the second values of 0 to 2.
    let newest: Vec<usize> = got.iter().filter(|g| g.1 == 1).map(|g| g.0).collect();
    assert_eq!(newest, [3, 4, 5, 6, 7, 8, 9, 0, 1, 2], "{got:?}");
}
