//! Unit tests of the shard (`pubsub/shard.rs`): registry, dispatch through
//! the mailboxes, runs and chunks, delivery steps, lifetimes.

use super::*;
use crate::pubsub::bus::Wake;

struct NoWake;
impl Wake for NoWake {
    fn wake(&self) {}
}

/// `n` workers' shards over one directory and bus.
type Workers = (
    Arc<Directory>,
    Arc<Bus>,
    Vec<crate::pubsub::bus::Inbox>,
    Vec<Shard>,
);

fn shards_over(n: usize, directory: Directory) -> Workers {
    let d = Arc::new(directory);
    let (bus, inboxes) = Bus::new((0..n).map(|_| Box::new(NoWake) as Box<dyn Wake>).collect());
    let shards = (0..n)
        .map(|i| Shard::new(i, Arc::clone(&d), Arc::clone(&bus)))
        .collect();
    (d, bus, inboxes, shards)
}

/// No history: a topic nobody holds is forgotten at once (history and
/// retention: `shards_with_history`).
fn shards(n: usize) -> Workers {
    let no_history = crate::pubsub::history::HistoryLimits {
        size: 0,
        ..Default::default()
    };
    shards_over(n, Directory::with_history(no_history, 0))
}

/// Dispatches `shard`'s outbox and delivers what its own mailbox got,
/// calling `f` per (run, subscribers) as a worker would.
fn dispatch_local(
    shard: &mut Shard,
    inbox: &crate::pubsub::bus::Inbox,
    bus: &Bus,
    mut f: impl FnMut(&[Publication], &[ConnRef]),
) {
    shard.dispatch();
    inbox.drain(bus, |batch| {
        shard.deliver(&batch, inbox.taken(), &mut |r, _, c| f(r, c))
    });
}

fn collect(
    shard: &mut Shard,
    inbox: &crate::pubsub::bus::Inbox,
    bus: &Bus,
) -> Vec<(Bytes, ConnRef)> {
    let mut got = Vec::new();
    dispatch_local(shard, inbox, bus, |run, conns| {
        for &c in conns {
            got.extend(run.iter().map(|p| (p.frame().clone(), c)));
        }
    });
    got
}

#[test]
fn publish_reaches_local_and_remote_subscribers_in_order() {
    let (d, bus, inboxes, mut s) = shards(3);
    let a0 = s[0].subscribe("a", (1, 0));
    s[0].subscribe("b", (2, 0));
    s[2].subscribe("a", (7, 0));
    assert_eq!(d.get("a").unwrap().workers(), 0b101);
    let a = d.entry("a");
    for i in 0..3u8 {
        s[0].publish(&a, Bytes::from(vec![i]), Instant::now());
    }
    let local = collect(&mut s[0], &inboxes[0], &bus);
    assert_eq!(
        local,
        (0..3u8)
            .map(|i| (Bytes::from(vec![i]), (1, 0)))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        bus.queued_bytes(2),
        3 * (1 + crate::pubsub::bus::PUBLICATION_OVERHEAD_BYTES)
    );
    assert_eq!(bus.queued_bytes(1), 0, "worker 1 has no subscriber of a");
    let mut remote = Vec::new();
    inboxes[2].drain(&bus, |batch| {
        s[2].deliver(
            &batch,
            inboxes[2].taken(),
            &mut |run: &[Publication], _: &TopicView<'_>, c: &[ConnRef]| {
                for &c in c {
                    remote.extend(run.iter().map(|p| (p.frame()[0], c)))
                }
            },
        );
    });
    assert_eq!(remote, vec![(0, (7, 0)), (1, (7, 0)), (2, (7, 0))]);
    s[0].unsubscribe(a0);
    assert_eq!(a.workers(), 0b100);
    assert_eq!(s[0].topic_count(), 1);
}

#[test]
fn many_subscribers_are_handed_out_in_chunks() {
    let (d, bus, inboxes, mut s) = shards(1);
    let subs: Vec<_> = (0..150).map(|i| s[0].subscribe("t", (i, 0))).collect();
    for sub in subs.iter().step_by(3) {
        s[0].unsubscribe(*sub);
    }
    s[0].publish(&d.entry("t"), Bytes::from_static(b"x"), Instant::now());
    let got: Vec<usize> = collect(&mut s[0], &inboxes[0], &bus)
        .into_iter()
        .map(|(_, c)| c.0)
        .collect();
    let want: Vec<usize> = (0..150).filter(|i| i % 3 != 0).collect();
    assert_eq!(got, want);
}

#[test]
fn runs_keep_each_subscribers_order_across_topics() {
    let (d, bus, inboxes, mut s) = shards(1);
    s[0].subscribe("a", (1, 0));
    s[0].subscribe("b", (1, 0));
    s[0].subscribe("b", (2, 0));
    let (a, b) = (d.entry("a"), d.entry("b"));
    for (t, x) in [(&a, 1u8), (&a, 2), (&b, 3), (&a, 4), (&b, 5), (&b, 6)] {
        s[0].publish(t, Bytes::from(vec![x]), Instant::now());
    }
    let mut runs = 0;
    let mut got: Vec<(usize, u8)> = Vec::new();
    dispatch_local(&mut s[0], &inboxes[0], &bus, |run, conns| {
        runs += 1;
        for &c in conns {
            got.extend(run.iter().map(|p| (c.0, p.frame()[0])));
        }
    });
    assert_eq!(runs, 4, "a a | b | a | b b");
    let of = |c: usize| {
        got.iter()
            .filter(|g| g.0 == c)
            .map(|g| g.1)
            .collect::<Vec<_>>()
    };
    assert_eq!(of(1), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(of(2), vec![3, 5, 6]);
}

#[test]
fn publications_in_flight_do_not_keep_a_topic_alive() {
    let (d, bus, inboxes, mut s) = shards(2);
    let sub = s[1].subscribe("gone", (0, 0));
    let t = d.entry("gone");
    s[0].publish(&t, Bytes::from_static(b"x"), Instant::now());
    d.release(t);
    s[0].dispatch();
    s[1].unsubscribe(sub);
    assert!(
        d.is_empty(),
        "the queued publication holds no strong reference"
    );
    let mut delivered = 0;
    inboxes[1].drain(&bus, |batch| {
        s[1].deliver(
            &batch,
            inboxes[1].taken(),
            &mut |_: &[Publication], _: &TopicView<'_>, _: &[ConnRef]| delivered += 1,
        )
    });
    assert_eq!(delivered, 0, "nobody left to deliver to");
}

#[test]
fn delivery_steps_keep_whole_runs_and_stay_near_the_budget() {
    let (d, _bus, _inboxes, mut s) = shards(1);
    for c in 0..100 {
        s[0].subscribe("a", (c, 0));
    }
    s[0].subscribe("b", (0, 0));
    let (a, b) = (d.entry("a"), d.entry("b"));
    let p = |t: &Arc<TopicInterest>| {
        Publication::new(
            Arc::downgrade(t),
            Arc::new(Message::new(Bytes::from_static(b"x"), Instant::now())),
        )
    };
    // a×10 (1 000 deliveries), b×5 (5), a×3 (300).
    let pubs: Vec<Publication> = (0..10)
        .map(|_| p(&a))
        .chain((0..5).map(|_| p(&b)))
        .chain((0..3).map(|_| p(&a)))
        .collect();
    assert_eq!(s[0].step_end(&pubs, 0, 10_000).0, 18, "everything fits");
    assert_eq!(s[0].step_end(&pubs, 0, 1_005).0, 15, "two whole runs");
    assert_eq!(
        s[0].step_end(&pubs, 0, 1_100).0,
        15,
        "not part of a later run"
    );
    assert_eq!(s[0].step_end(&pubs, 0, 450).0, 4, "part of the first run");
    assert_eq!(s[0].step_end(&pubs, 0, 0).0, 1, "at least one publication");
    assert_eq!(
        s[0].step_end(&pubs, 10, 3).0,
        13,
        "a run with one subscriber"
    );
}

/// A delivery step counts the walk over a topic's slots, not only its
/// subscribers: slots are never given back, so one subscriber left of
/// 100 000 walks 100 000 slots per publication (36 µs at 200 000, outside
/// review), which a step counted as one delivery each (1 000 publications
/// in a step of 10 000: 100 M slot visits in one turn).
#[test]
fn a_delivery_step_counts_the_slots_a_topic_walks() {
    let (d, _bus, _inboxes, mut s) = shards(1);
    let subs: Vec<Subscription> = (0..100_000).map(|c| s[0].subscribe("a", (c, 0))).collect();
    let a = d.entry("a");
    let pubs: Vec<Publication> = (0..1000)
        .map(|_| {
            Publication::new(
                Arc::downgrade(&a),
                Arc::new(Message::new(Bytes::from_static(b"x"), Instant::now())),
            )
        })
        .collect();
    assert_eq!(s[0].step_end(&pubs, 0, 300_000).0, 3, "100 000 subscribers");
    for sub in &subs[1..] {
        s[0].unsubscribe(*sub);
    }
    // One subscriber, 100 000 slots: 3 125 deliveries' worth each, and
    // the step says so (the worker counts it against its turn).
    assert_eq!(s[0].step_end(&pubs, 0, 10_000), (3, 3 * 3125));
    assert_eq!(s[0].step_end(&pubs, 0, 0), (1, 3125), "at least one");
}

#[test]
fn sub_lists_grow_and_shrink() {
    let sub = |t| Subscription { topic: t, slot: 0 };
    let mut l = SubList::default();
    assert!(l.is_empty());
    for t in 0..3 {
        l.push(sub(t));
    }
    assert_eq!(
        l.as_slice().iter().map(|s| s.topic()).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(l.swap_remove(0).topic(), 0);
    assert_eq!(l.len(), 2);
    l.swap_remove(1);
    assert!(matches!(l, SubList::One(..)));
    assert_eq!(l.take().len(), 1);
    assert!(l.is_empty());
}

#[test]
fn retain_visits_each_subscription_once_and_keeps_the_list_compact() {
    let sub = |t| Subscription { topic: t, slot: 0 };
    let mut l = SubList::default();
    for t in 0..5 {
        l.push(sub(t));
    }
    let mut seen = Vec::new();
    l.retain(|s| {
        seen.push(s.topic());
        s.topic() % 2 == 0
    });
    assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    assert_eq!(
        l.as_slice().iter().map(|s| s.topic()).collect::<Vec<_>>(),
        vec![0, 2, 4]
    );
    l.retain(|s| s.topic() == 2);
    assert!(matches!(l, SubList::One(_, s) if s.topic() == 2));
    l.retain(|_| true);
    assert!(matches!(l, SubList::One(..)));
    l.retain(|_| false);
    assert!(l.is_empty());
    l.retain(|_| panic!("an empty list has nothing to visit"));
}

#[test]
fn the_last_unsubscribe_forgets_the_topic() {
    let (d, _bus, _inboxes, mut s) = shards(2);
    let x = s[1].subscribe("x", (0, 0));
    let y = s[1].subscribe("x", (1, 0));
    s[1].unsubscribe(x);
    assert_eq!(s[1].subscriber_count("x"), 1);
    s[1].unsubscribe(y);
    assert!(s[1].topic_id("x").is_none());
    assert!(d.is_empty());
}

/// A burst of topics registered and let go leaves no tables at the
/// burst's size behind: the worker's sweep shrinks the shard's, the
/// directory's sweep its map (outside probe: 320 000 topics registered
/// and released left 84-91 MiB of RSS over the baseline).
#[test]
fn tables_a_burst_of_topics_let_go_are_shrunk_at_the_sweep() {
    let (d, _bus, _inboxes, mut s) = shards(1);
    let keep = s[0].subscribe("kept", (0, 0));
    let subs: Vec<_> = (0..20_000)
        .map(|i| s[0].subscribe(&format!("burst.{i}"), (1, 0)))
        .collect();
    let grown = (s[0].by_name.capacity(), d.map_capacity());
    assert!(grown.0 >= 20_000 && grown.1 >= 20_000, "{grown:?}");
    for sub in subs {
        s[0].unsubscribe(sub);
    }
    assert!(s[0].by_name.capacity() >= 20_000, "kept until the sweep");
    s[0].shrink_registry();
    d.sweep(Instant::now());
    assert!(
        s[0].by_name.capacity() < 1024,
        "{}",
        s[0].by_name.capacity()
    );
    assert!(s[0].by_interest.capacity() < 1024);
    assert!(s[0].topics.capacity() < 1024, "{}", s[0].topics.capacity());
    assert!(d.map_capacity() < 1024, "{}", d.map_capacity());
    // What is left is still there.
    assert_eq!(s[0].subscriber_count("kept"), 1);
    s[0].unsubscribe(keep);
    assert!(d.is_empty());
    // A table not sparse enough stays as it is (no shrink per sweep).
    let subs: Vec<_> = (0..4000)
        .map(|i| s[0].subscribe(&format!("again.{i}"), (1, 0)))
        .collect();
    for sub in &subs[..2000] {
        s[0].unsubscribe(*sub);
    }
    let cap = s[0].by_name.capacity();
    s[0].shrink_registry();
    assert_eq!(s[0].by_name.capacity(), cap);
}

/// A worker that loses its last subscriber of a topic and gains a new one
/// while a publication sent under its old interest is still in its
/// mailbox: the new subscriber starts after the topic's number at its
/// arrival, so it never sees that old publication followed by a gap.
#[test]
fn a_returning_worker_skips_what_was_sequenced_before_its_new_interest() {
    let (d, bus, inboxes, mut s) = shards(2);
    let t = d.entry("t"); // a publisher's reference keeps the topic's lifetime
    let a = s[1].subscribe("t", (1, 0));
    let publish = |s: &mut Shard, x: u8| {
        s.publish(&t, Bytes::from(vec![x]), Instant::now());
        s.dispatch();
    };
    publish(&mut s[0], 1); // sent to worker 1: its old interest
    s[1].unsubscribe(a);
    publish(&mut s[0], 2); // nobody on worker 1
    s[1].subscribe("t", (2, 0));
    publish(&mut s[0], 3);
    let mut got = Vec::new();
    inboxes[1].drain(&bus, |batch| {
        s[1].deliver(
            &batch,
            inboxes[1].taken(),
            &mut |run: &[Publication], topic: &TopicView<'_>, c: &[ConnRef]| {
                assert_eq!(&**topic.name, "t");
                for &c in c {
                    got.extend(run.iter().map(|p| (p.msg.seq, p.frame()[0], c)));
                }
            },
        );
    });
    assert_eq!(got, vec![(3, 3, (2, 0))], "not 1 then 3");
    assert_eq!(t.seq(), 3, "every publication numbered, delivered or not");
}

#[test]
fn publications_are_numbered_per_topic_in_dispatch_order() {
    let (d, bus, inboxes, mut s) = shards(2);
    s[0].subscribe("a", (1, 0));
    s[0].subscribe("b", (1, 0));
    let (a, b) = (d.entry("a"), d.entry("b"));
    assert_ne!(a.epoch(), b.epoch(), "each topic's lifetime its own epoch");
    for x in 0..3u8 {
        s[1].publish(&a, Bytes::from(vec![x]), Instant::now());
        s[0].publish(&b, Bytes::from(vec![x]), Instant::now());
        s[0].publish(&a, Bytes::from(vec![10 + x]), Instant::now());
    }
    s[1].dispatch();
    s[0].dispatch();
    let mut got = Vec::new();
    inboxes[0].drain(&bus, |batch| {
        s[0].deliver(
            &batch,
            inboxes[0].taken(),
            &mut |run: &[Publication], topic: &TopicView<'_>, _: &[ConnRef]| {
                got.extend(
                    run.iter()
                        .map(|p| (topic.name.to_string(), p.msg.seq, p.frame()[0])),
                );
            },
        );
    });
    let of = |name: &str| -> Vec<(u64, u8)> {
        got.iter()
            .filter(|g| g.0 == name)
            .map(|g| (g.1, g.2))
            .collect()
    };
    assert_eq!(of("a"), [(1, 0), (2, 1), (3, 2), (4, 10), (5, 11), (6, 12)]);
    assert_eq!(of("b"), [(1, 0), (2, 1), (3, 2)]);
}

#[test]
fn released_references_forget_a_topic_nobody_holds() {
    let (d, _bus, _inboxes, mut s) = shards(2);
    let t = d.entry("t");
    s[0].publish_owned(Arc::clone(&t), Bytes::from_static(b"x"), Instant::now());
    d.release(t);
    assert_eq!(d.len(), 1, "the outbox still holds it");
    s[0].dispatch();
    assert!(d.is_empty(), "dispatch released the last reference");
}

fn shards_with_history(n: usize) -> Workers {
    shards_over(n, Directory::new())
}

/// Drains worker `w`'s mailbox; returns (connection key, number) per delivery.
fn drain_numbers(s: &mut Shard, inbox: &crate::pubsub::bus::Inbox, bus: &Bus) -> Vec<(usize, u64)> {
    let mut got = Vec::new();
    inbox.drain(bus, |batch| {
        s.deliver(
            &batch,
            inbox.taken(),
            &mut |run: &[Publication], _: &TopicView<'_>, c: &[ConnRef]| {
                for &c in c {
                    got.extend(run.iter().map(|p| (c.0, p.msg.seq)));
                }
            },
        );
    });
    got
}

/// A subscriber recovering on a worker whose mailbox still holds
/// publications it recovers gets each number once: from the history up to
/// the topic's number at its join, live after it.
#[test]
fn a_recovering_subscriber_gets_each_number_once_though_the_mailbox_holds_some() {
    use crate::pubsub::history::{Since, Start};
    let (d, bus, inboxes, mut s) = shards_with_history(2);
    let t = d.entry("t");
    s[1].subscribe("t", (1, 0));
    for x in 1..=5u8 {
        s[0].publish(&t, Bytes::from(vec![x]), Instant::now());
    }
    s[0].dispatch(); // 1..=5 in worker 1's mailbox, not delivered yet
    let since = Since {
        epoch: t.epoch(),
        seq: 2,
    };
    let (sub, r) = s[1].subscribe_since("t", (2, 0), Start::Since(since), usize::MAX, None);
    let r = r.expect("a recovery");
    let replayed: Vec<u64> = r.messages.iter().map(|m| m.seq).collect();
    assert_eq!(
        (replayed, r.first, r.last, r.gap),
        (vec![3, 4, 5], 3, 5, None)
    );
    s[0].publish(&t, Bytes::from_static(b"6"), Instant::now());
    s[0].dispatch();
    let got = drain_numbers(&mut s[1], &inboxes[1], &bus);
    let of = |k: usize| {
        got.iter()
            .filter(|g| g.0 == k)
            .map(|g| g.1)
            .collect::<Vec<_>>()
    };
    assert_eq!(of(1), [1, 2, 3, 4, 5, 6], "the old subscriber: everything");
    assert_eq!(of(2), [6], "the recovering one: live after its recovery");
    // Leaving before its first live publication leaves nothing behind.
    let (sub3, _) = s[1].subscribe_since("t", (3, 0), Start::Since(since), usize::MAX, None);
    s[1].unsubscribe(sub3);
    s[1].unsubscribe(sub);
    s[0].publish(&t, Bytes::from_static(b"7"), Instant::now());
    s[0].dispatch();
    assert_eq!(drain_numbers(&mut s[1], &inboxes[1], &bus), [(1, 7)]);
}

#[test]
fn a_recovery_on_a_worker_new_to_the_topic_meets_the_live_stream() {
    use crate::pubsub::history::{Gap, Since, Start};
    let (d, bus, inboxes, mut s) = shards_with_history(2);
    let t = d.entry("t");
    for x in 1..=3u8 {
        s[0].publish(&t, Bytes::from(vec![x]), Instant::now());
    }
    s[0].dispatch(); // nobody subscribed: numbered and kept, sent nowhere
    let since = Since {
        epoch: t.epoch(),
        seq: 0,
    };
    let (_, r) = s[1].subscribe_since("t", (1, 0), Start::Since(since), usize::MAX, None);
    let r = r.unwrap();
    assert_eq!((r.messages.len(), r.first, r.last, r.gap), (3, 1, 3, None));
    s[0].publish(&t, Bytes::from_static(b"4"), Instant::now());
    s[0].dispatch();
    assert_eq!(drain_numbers(&mut s[1], &inboxes[1], &bus), [(1, 4)]);
    let other = Since {
        epoch: t.epoch() + 1_000,
        seq: 2,
    };
    let (_, r) = s[1].subscribe_since("t", (2, 0), Start::Since(other), usize::MAX, None);
    let r = r.unwrap();
    assert_eq!(
        (r.first, r.last, r.gap),
        (1, 4, Some(Gap::Epoch)),
        "start over"
    );
}

/// A last value taken while the same publication is still in the mailbox:
/// the new subscriber gets it once (as the snapshot) and then only what
/// is newer; once caught up it is an ordinary subscriber. Joining when the
/// worker has delivered everything makes no pending slot at all.
#[test]
fn a_last_value_and_the_mailbox_never_give_one_message_twice() {
    use crate::pubsub::history::Start;
    let (d, bus, inboxes, mut s) = shards_with_history(2);
    let t = d.entry("t");
    s[1].subscribe("t", (1, 0));
    for x in 1..=2u8 {
        s[0].publish(&t, Bytes::from(vec![x]), Instant::now());
    }
    s[0].dispatch(); // 1, 2 in worker 1's mailbox
    let (_, r) = s[1].subscribe_since("t", (2, 0), Start::LastValue, usize::MAX, None);
    let r = r.unwrap();
    assert_eq!(r.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [2]);
    assert_eq!(s[1].topics[0].joiners.len(), 1, "pending until caught up");
    s[0].publish(&t, Bytes::from_static(b"3"), Instant::now());
    s[0].dispatch();
    let got = drain_numbers(&mut s[1], &inboxes[1], &bus);
    let of = |g: &[(usize, u64)], k: usize| {
        g.iter()
            .filter(|x| x.0 == k)
            .map(|x| x.1)
            .collect::<Vec<_>>()
    };
    assert_eq!(of(&got, 1), [1, 2, 3]);
    assert_eq!(of(&got, 2), [3], "2 came as the snapshot");
    assert!(s[1].topics[0].joiners.is_empty(), "caught up");
    // Everything delivered: the next one joins as an ordinary subscriber.
    let (_, r) = s[1].subscribe_since("t", (3, 0), Start::LastValue, usize::MAX, None);
    assert_eq!(r.unwrap().messages.len(), 1);
    assert!(s[1].topics[0].joiners.is_empty());
    s[0].publish(&t, Bytes::from_static(b"4"), Instant::now());
    s[0].dispatch();
    let got = drain_numbers(&mut s[1], &inboxes[1], &bus);
    assert_eq!(
        (of(&got, 1), of(&got, 2), of(&got, 3)),
        (vec![4], vec![4], vec![4])
    );
}

/// What worker `w`'s mailbox holds, delivered: (connection, topic, number).
fn drain_named(
    shard: &mut Shard,
    inbox: &crate::pubsub::bus::Inbox,
    bus: &Bus,
) -> Vec<(ConnRef, String, u64)> {
    let mut got = Vec::new();
    inbox.drain(bus, |batch| {
        shard.deliver(&batch, inbox.taken(), &mut |run, name, conns| {
            for &c in conns {
                got.extend(run.iter().map(|p| (c, name.name.to_string(), p.msg.seq)));
            }
        })
    });
    got
}

/// A pattern registered on a worker while a publication sent for an
/// earlier, ended interest is still in its mailbox: the pattern's
/// subscriber does not get that one (it would be followed by a gap: the
/// worker missed the publications between).
#[test]
fn a_new_pattern_skips_what_its_worker_was_sent_before_it() {
    let (d, bus, inboxes, mut s) = shards(2);
    let t = d.entry("t.x"); // a publisher's reference
    let a = s[1].subscribe("t.x", (1, 0));
    s[0].publish(&t, Bytes::from_static(b"1"), Instant::now());
    s[0].dispatch(); // number 1, to worker 1's mailbox
    s[1].unsubscribe(a);
    s[0].publish(&t, Bytes::from_static(b"2"), Instant::now());
    s[0].dispatch(); // number 2: worker 1 not interested
    let (p, _) = s[1].subscribe_pattern("t.*", (2, 0), Replay::live());
    assert!(p.is_pattern());
    s[0].publish(&t, Bytes::from_static(b"3"), Instant::now());
    s[0].dispatch(); // number 3: for the pattern
    let got = drain_named(&mut s[1], &inboxes[1], &bus);
    assert_eq!(got, [((2, 0), "t.x".to_owned(), 3)]);
    s[1].unsubscribe(p);
    assert_eq!(s[1].topic_count(), 0, "the topic went with the pattern");
    assert_eq!(s[1].pattern_count(), 0);
    drop(t);
}

/// One connection holding two patterns and the topic they match, another
/// holding one pattern: each gets each publication once; unsubscribing
/// one pattern keeps the rest working.
#[test]
fn overlapping_subscriptions_deliver_once_per_connection() {
    let (d, bus, inboxes, mut s) = shards(2);
    let t = d.entry("a.b");
    let now = Instant::now();
    let (p1, _) = s[1].subscribe_pattern("a.*", (1, 0), Replay::live());
    let (p2, _) = s[1].subscribe_pattern("a.>", (1, 0), Replay::live());
    let e = s[1].subscribe("a.b", (1, 0));
    let mine = [p1, p2, e];
    s[1].mark_multi(&mine);
    let (q, _) = s[1].subscribe_pattern("a.*", (2, 0), Replay::live());
    s[1].mark_multi(&[q]);
    for x in [b"1", b"2"] {
        s[0].publish(&t, Bytes::from_static(x), now);
    }
    s[0].dispatch();
    let mut got = drain_named(&mut s[1], &inboxes[1], &bus);
    got.sort();
    let want: Vec<(ConnRef, String, u64)> = [(1, 0), (2, 0)]
        .into_iter()
        .flat_map(|c| [1, 2].map(|n| (c, "a.b".to_owned(), n)))
        .collect();
    assert_eq!(got, want);
    // Without the marks, the first connection would get each three times.
    s[1].unsubscribe(p2);
    s[1].mark_multi(&[p1, e]);
    s[0].publish(&t, Bytes::from_static(b"3"), now);
    s[0].dispatch();
    let mut got = drain_named(&mut s[1], &inboxes[1], &bus);
    got.sort();
    assert_eq!(
        got,
        [((1, 0), "a.b".to_owned(), 3), ((2, 0), "a.b".to_owned(), 3)]
    );
    for sub in [p1, e, q] {
        s[1].unsubscribe(sub);
    }
    assert_eq!((s[1].topic_count(), s[1].pattern_count()), (0, 0));
    drop(t);
    assert_eq!(d.pattern_count(), 0);
}

/// A publish's cost does not depend on patterns elsewhere: a topic's
/// targets are cached and recomputed only when the patterns change.
#[test]
fn targets_follow_pattern_changes() {
    let (d, _bus, _inboxes, mut s) = shards(3);
    let t = d.entry("x.y");
    assert_eq!(d.targets(&t), 0);
    let (p, _) = s[2].subscribe_pattern("x.*", (1, 0), Replay::live());
    assert_eq!(d.targets(&t), 0b100);
    let other = s[1].subscribe("x.y", (1, 0));
    assert_eq!(d.targets(&t), 0b110);
    s[2].unsubscribe(p);
    assert_eq!(d.targets(&t), 0b010);
    s[1].unsubscribe(other);
    assert_eq!(d.targets(&t), 0);
    assert!(!d.pattern_matches("x.y"));
}

/// A pattern subscriber that starts with a topic's last value while later
/// publications of it are already in its worker's mailbox gets each number
/// once: the last value, then only what follows it; the pattern's earlier
/// subscriber gets everything.
#[test]
fn a_pattern_last_value_meets_the_mailbox_without_a_duplicate() {
    let (d, bus, inboxes, mut s) = shards_with_history(2);
    let t = d.entry("p.x");
    let now = Instant::now();
    let (a, _) = s[1].subscribe_pattern("p.*", (1, 0), Replay::live());
    for x in [b"1", b"2"] {
        s[0].publish(&t, Bytes::from_static(x), now);
    }
    s[0].dispatch(); // numbers 1 and 2 in worker 1's mailbox, for the pattern
    let replay = Replay {
        since: &[],
        last_values: true,
        skip: &|_| false,
        max_bytes: 1 << 20,
        now,
        held: &[],
    };
    let (b, read) = s[1].subscribe_pattern("p.*", (2, 0), replay);
    assert_eq!(read.len(), 1);
    assert_eq!(&*read[0].0, "p.x");
    assert_eq!(
        read[0].1.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [2]
    );
    s[0].publish(&t, Bytes::from_static(b"3"), now);
    s[0].dispatch();
    let got = drain_named(&mut s[1], &inboxes[1], &bus);
    let of = |c: ConnRef| -> Vec<u64> { got.iter().filter(|g| g.0 == c).map(|g| g.2).collect() };
    assert_eq!(of((1, 0)), [1, 2, 3]);
    assert_eq!(of((2, 0)), [3], "2 came as the last value");
    // With a `since`, the same through the recovery.
    let positions = [(
        "p.x".to_owned(),
        Since {
            epoch: t.epoch(),
            seq: 1,
        },
    )];
    let replay = Replay {
        since: &positions,
        ..replay
    };
    s[0].publish(&t, Bytes::from_static(b"4"), now);
    s[0].dispatch();
    let (c, read) = s[1].subscribe_pattern("p.*", (3, 0), replay);
    assert_eq!(
        read[0].1.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    s[0].publish(&t, Bytes::from_static(b"5"), now);
    s[0].dispatch();
    let got = drain_named(&mut s[1], &inboxes[1], &bus);
    let of = |c: ConnRef| -> Vec<u64> { got.iter().filter(|g| g.0 == c).map(|g| g.2).collect() };
    assert_eq!(of((1, 0)), [4, 5]);
    assert_eq!(of((2, 0)), [4, 5]);
    assert_eq!(of((3, 0)), [5], "2 to 4 came as the recovery");
    for sub in [a, b, c] {
        s[1].unsubscribe(sub);
    }
    assert_eq!((s[1].topic_count(), s[1].pattern_count()), (0, 0));
}

/// A topic nobody holds and no history keeps (an HTTP publish to a name
/// only a pattern matches) is gone from the directory before the pattern's
/// worker delivers it: the pattern's subscribers get it all the same.
/// Topics kept for patterns alone are let go once idle for a sweep.
#[test]
fn pattern_subscribers_get_publications_of_topics_already_gone_and_idle_topics_go() {
    let (d, bus, inboxes, mut s) = shards(2);
    let (p, _) = s[1].subscribe_pattern("n.*", (1, 0), Replay::live());
    let now = Instant::now();
    for i in 1..=3u8 {
        let t = d.entry("n.a");
        s[0].publish_now(t, Bytes::from(vec![i]), now, None);
    }
    assert!(d.get("n.a").is_none(), "forgotten at each dispatch");
    let got = drain_named(&mut s[1], &inboxes[1], &bus);
    assert_eq!(
        got,
        [1, 1, 1].map(|n| ((1, 0), "n.a".to_owned(), n)),
        "each a new epoch's number 1, delivered"
    );
    assert_eq!(s[1].topic_count(), 0, "nothing held for it");
    // A topic someone holds becomes local on arrival, and goes when idle.
    let held = d.entry("n.b");
    s[0].publish(&held, Bytes::from_static(b"x"), now);
    s[0].dispatch();
    assert_eq!(drain_named(&mut s[1], &inboxes[1], &bus).len(), 1);
    assert_eq!(s[1].topic_count(), 1);
    s[1].sweep_pattern_topics();
    assert_eq!(s[1].topic_count(), 1, "delivered to since the last sweep");
    s[1].sweep_pattern_topics();
    assert_eq!(s[1].topic_count(), 0, "idle for a whole sweep");
    d.release(held);
    assert!(d.is_empty());
    s[1].unsubscribe(p);
}

/// New patterns are registered at a bounded rate per worker (a bucket of
/// one second's worth); patterns already held cost nothing.
#[test]
fn new_patterns_are_admitted_at_a_bounded_rate() {
    let (_d, _bus, _inboxes, mut s) = shards(1);
    let n = PATTERN_REGISTRATIONS_PER_SECOND as usize;
    assert_eq!(s[0].admit_patterns(n, 0), Ok(()), "a full second's worth");
    let wait = s[0].admit_patterns(1, 0).expect_err("then none");
    assert!((1..=2).contains(&wait), "one more accrues in ~1 ms: {wait}");
    assert_eq!(s[0].admit_patterns(1, 2), Ok(()), "after it");
    assert_eq!(
        s[0].admit_patterns(0, 2),
        Ok(()),
        "nothing new, nothing taken"
    );
}

/// A connection that gets a topic through a pattern subscribes to the
/// topic itself, then leaves the pattern, while publications numbered
/// before its subscription are still in its worker's mailbox: it still
/// gets every number once, in order (it joins at what its worker
/// delivered, not at the topic's number).
#[test]
fn switching_from_a_pattern_to_its_topic_with_publications_in_flight_leaves_no_gap() {
    let (d, bus, inboxes, mut s) = shards(2);
    let t = d.entry("t.x"); // a publisher's reference
    let now = Instant::now();
    let (p, _) = s[1].subscribe_pattern("t.*", (1, 0), Replay::live());
    s[0].publish(&t, Bytes::from_static(b"1"), now);
    s[0].dispatch();
    let mut got = drain_numbers(&mut s[1], &inboxes[1], &bus);
    // 2 and 3 are numbered and sent for the pattern; not delivered yet.
    for x in [b"2", b"3"] {
        s[0].publish(&t, Bytes::from_static(x), now);
        s[0].dispatch();
    }
    let (e, _) = s[1].subscribe_since("t.x", (1, 0), Start::Continue, 0, None);
    s[1].mark_multi(&[p, e]);
    s[1].unsubscribe(p);
    s[1].mark_multi(&[e]);
    s[0].publish(&t, Bytes::from_static(b"4"), now);
    s[0].dispatch();
    got.extend(drain_numbers(&mut s[1], &inboxes[1], &bus));
    assert_eq!(got, [(1, 1), (1, 2), (1, 3), (1, 4)]);
    s[1].unsubscribe(e);
    drop(t);
}

/// The same after a pattern's last value: the connection got number 2 as
/// its last value while 1 and 2 were still in the mailbox; subscribing to
/// the topic itself and leaving the pattern repeats nothing.
#[test]
fn switching_from_a_pattern_after_its_last_value_repeats_nothing() {
    let (d, bus, inboxes, mut s) = shards_with_history(2);
    let t = d.entry("p.x");
    let now = Instant::now();
    let (a, _) = s[1].subscribe_pattern("p.*", (1, 0), Replay::live());
    for x in [b"1", b"2"] {
        s[0].publish(&t, Bytes::from_static(x), now);
    }
    s[0].dispatch();
    let replay = Replay {
        since: &[],
        last_values: true,
        skip: &|_| false,
        max_bytes: 1 << 20,
        now,
        held: &[],
    };
    let (b, read) = s[1].subscribe_pattern("p.*", (2, 0), replay);
    assert_eq!(
        read[0].1.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [2]
    );
    let (e, _) = s[1].subscribe_since("p.x", (2, 0), Start::Continue, 0, None);
    s[1].mark_multi(&[b, e]);
    s[1].unsubscribe(b);
    s[1].mark_multi(&[e]);
    s[0].publish(&t, Bytes::from_static(b"3"), now);
    s[0].dispatch();
    let got = drain_named(&mut s[1], &inboxes[1], &bus);
    let of = |c: ConnRef| -> Vec<u64> { got.iter().filter(|g| g.0 == c).map(|g| g.2).collect() };
    assert_eq!(of((1, 0)), [1, 2, 3]);
    assert_eq!(of((2, 0)), [3], "2 came as the last value, 3 live");
    for sub in [a, e] {
        s[1].unsubscribe(sub);
    }
    assert_eq!((s[1].topic_count(), s[1].pattern_count()), (0, 0));
}

/// The other way round: a connection holding a topic subscribes to a
/// pattern new to its worker that matches it, then leaves the topic,
/// while publications sent for the topic before the pattern was
/// registered are still in the mailbox: it gets them through the pattern,
/// each number once.
#[test]
fn switching_from_a_topic_to_a_new_pattern_with_publications_in_flight_leaves_no_gap() {
    let (d, bus, inboxes, mut s) = shards(2);
    let t = d.entry("t.x");
    let now = Instant::now();
    let e = s[1].subscribe("t.x", (1, 0));
    s[0].publish(&t, Bytes::from_static(b"1"), now);
    s[0].dispatch();
    let mut got = drain_numbers(&mut s[1], &inboxes[1], &bus);
    for x in [b"2", b"3"] {
        s[0].publish(&t, Bytes::from_static(x), now);
        s[0].dispatch();
    }
    let held = [e];
    let replay = Replay {
        held: &held,
        ..Replay::live()
    };
    let (p, _) = s[1].subscribe_pattern("t.*", (1, 0), replay);
    s[1].mark_multi(&[e, p]);
    s[1].unsubscribe(e);
    s[1].mark_multi(&[p]);
    s[0].publish(&t, Bytes::from_static(b"4"), now);
    s[0].dispatch();
    got.extend(drain_numbers(&mut s[1], &inboxes[1], &bus));
    assert_eq!(got, [(1, 1), (1, 2), (1, 3), (1, 4)]);
    s[1].unsubscribe(p);
    drop(t);
}

/// Pattern matching work is charged as it is done: registering a pattern
/// here tests it against every local topic, and once that work passes a
/// second's worth, subscribes naming patterns wait until it is paid for.
#[test]
fn pattern_scans_are_charged_and_hold_further_pattern_subscribes() {
    let (_d, _bus, _inboxes, mut s) = shards(1);
    // 20 000 topics here, a pattern of 240 tokens: 4.8 M steps of matching.
    let subs: Vec<Subscription> = (0..20_000)
        .map(|i| s[0].subscribe(&format!("t.{i}"), (1, 0)))
        .collect();
    assert_eq!(s[0].admit_scans(0), Ok(()), "nothing done yet");
    let long = format!("{}z", "*.".repeat(239));
    let (p, _) = s[0].subscribe_pattern(&long, (2, 0), Replay::live());
    let wait = s[0].admit_scans(0).expect_err("in debt");
    // 4.8 M steps against 4 M a second (a second's worth in the bucket):
    // about 0.2 s.
    assert!((150..=250).contains(&wait), "{wait} ms");
    assert_eq!(s[0].admit_scans(wait), Ok(()), "paid for by then");
    // A departure is not charged (its arrival was); the next arrival is:
    // 2 × 20 000 steps, about 10 ms.
    s[0].unsubscribe(p);
    assert_eq!(s[0].admit_scans(wait), Ok(()));
    let (q, _) = s[0].subscribe_pattern("t.*", (2, 0), Replay::live());
    s[0].unsubscribe(q);
    let more = s[0].admit_scans(wait).expect_err("in debt again");
    assert!((5..=15).contains(&more), "{more} ms");
    assert_eq!(s[0].admit_scans(wait + more), Ok(()));
    for sub in subs {
        s[0].unsubscribe(sub);
    }
}

/// A pattern is charged per token (a trie node in the worker's trie and
/// in the directory's each), not as one topic entry, and the charge goes
/// with it.
#[test]
fn a_pattern_is_charged_per_token_and_released_with_it() {
    let (_d, _bus, _inboxes, mut s) = shards(1);
    let before = s[0].charged_bytes();
    let long = format!("p1{}*", ".".repeat(121));
    assert_eq!(pattern::token_count(&long), 122);
    let (sub, _) = s[0].subscribe_pattern(&long, (1, 0), Replay::live());
    let charged = s[0].charged_bytes() - before;
    assert!(
        charged >= 122 * PATTERN_TOKEN_BYTES,
        "{charged} bytes for 122 tokens"
    );
    s[0].unsubscribe(sub);
    assert_eq!(s[0].charged_bytes(), before);
}

/// A recovery costing more tokens than are left (in a cluster, one per
/// topic to fill: up to 64 and 256 positions) is admitted when a token is
/// there, into debt that later ones wait out; a refused one takes nothing
/// (outside review: it took what was left and was told to retry in a
/// millisecond, so it never gathered enough and kept the bucket empty for
/// everyone on the worker).
#[test]
fn a_recovery_of_many_topics_is_admitted_in_its_turn_and_a_refusal_takes_nothing() {
    let (_d, _bus, _inboxes, mut s) = shards(1);
    // 10 a second (a second's worth at once): 64 at once all the same.
    assert_eq!(s[0].admit_recoveries(10, 64, 0), Ok(()));
    // 54 tokens of debt and the one asked for: 5.5 s.
    assert_eq!(s[0].admit_recovery(10, 0), Err(5_500));
    for _ in 0..100 {
        assert!(
            s[0].admit_recovery(10, 1_000).is_err(),
            "refusals take nothing"
        );
    }
    assert_eq!(s[0].admit_recovery(10, 5_500), Ok(()));
}
