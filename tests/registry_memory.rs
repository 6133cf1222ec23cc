//! The measurement behind `pubsub::shard::TOPIC_ENTRY_BYTES` and
//! `SUBSCRIPTION_BYTES`: live heap bytes the topic registries (directory +
//! one worker's shard) hold per topic and per subscription, counted by a
//! global allocator wrapper. The worker's buffer budget is charged
//! `topic_charge(name)` per topic and `SUBSCRIPTION_BYTES` per
//! subscription (`Shard::charged_bytes`), so what is really held must stay
//! below that, however the maps happen to be sized when the count is taken.

use corecast::pubsub::bus::{Bus, Wake};
use corecast::pubsub::directory::Directory;
use corecast::pubsub::shard::{SUBSCRIPTION_BYTES, Shard, TOPIC_ENTRY_BYTES, topic_charge};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

struct NoWake;
impl Wake for NoWake {
    fn wake(&self) {}
}

/// Live bytes per topic after subscribing `n` topics named with `len`
/// bytes, one subscriber each; checks the shard charges what it says.
fn bytes_per_topic(n: usize, len: usize) -> usize {
    let d = Arc::new(Directory::new());
    let (bus, _inboxes) = Bus::new(vec![Box::new(NoWake) as Box<dyn Wake>]);
    let mut shard = Shard::new(0, Arc::clone(&d), bus);
    let names: Vec<String> = (0..n).map(|i| format!("{i:0>len$}")).collect();
    let before = LIVE.load(Ordering::Relaxed);
    let subs: Vec<_> = names.iter().map(|t| shard.subscribe(t, (0, 0))).collect();
    let held = LIVE.load(Ordering::Relaxed) - before;
    assert_eq!(
        shard.charged_bytes(),
        n * (topic_charge(len) + SUBSCRIPTION_BYTES)
    );
    for s in subs {
        shard.unsubscribe(s);
    }
    assert!(d.is_empty());
    assert_eq!(shard.charged_bytes(), 0, "everything given back");
    held as usize / n
}

/// Live bytes per subscription when `n` connections subscribe to one topic.
fn bytes_per_subscription(n: usize) -> usize {
    let d = Arc::new(Directory::new());
    let (bus, _inboxes) = Bus::new(vec![Box::new(NoWake) as Box<dyn Wake>]);
    let mut shard = Shard::new(0, Arc::clone(&d), bus);
    let first = shard.subscribe("t", (0, 0));
    let before = LIVE.load(Ordering::Relaxed);
    let subs: Vec<_> = (1..=n).map(|c| shard.subscribe("t", (c, 0))).collect();
    let held = LIVE.load(Ordering::Relaxed) - before;
    for s in subs {
        shard.unsubscribe(s);
    }
    shard.unsubscribe(first);
    // The connection's own list holds 8 bytes a subscription besides.
    held as usize / n + 8
}

/// The allocation counter is process-wide: the measurements run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_topic_costs_the_registries_less_than_it_is_charged() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Several counts, so the maps are caught both just after and just
    // before a doubling.
    for n in [1_000, 1_500, 2_048, 3_000, 10_000] {
        for len in [8, 128] {
            let per_topic = bytes_per_topic(n, len);
            let charged = topic_charge(len) + SUBSCRIPTION_BYTES;
            assert!(
                per_topic <= charged,
                "{n} topics of {len} bytes: {per_topic} B each, charged {charged}"
            );
            // The constant is a measurement, not a guess: not wildly above.
            assert!(
                per_topic + 2 * len >= TOPIC_ENTRY_BYTES / 4,
                "{n} topics of {len} bytes: only {per_topic} B each; lower TOPIC_ENTRY_BYTES"
            );
            eprintln!("{n} topics, names of {len} B: {per_topic} B per topic");
        }
    }
}

#[test]
fn a_subscription_costs_the_registries_less_than_it_is_charged() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for n in [1_000, 1_025, 4_096, 10_000] {
        let per_sub = bytes_per_subscription(n);
        assert!(
            per_sub <= SUBSCRIPTION_BYTES,
            "{n} subscriptions: {per_sub} B each, charged {SUBSCRIPTION_BYTES}"
        );
        eprintln!("{n} subscriptions of one topic: {per_sub} B each");
    }
}
