//! The measurement behind `pubsub::shard::TOPIC_ENTRY_BYTES`: live heap
//! bytes the topic registries (directory + one worker's shard) hold per
//! topic, counted by a global allocator wrapper. The buffer budget charges
//! every subscription `registry_charge(max_topic_len)`, so this must stay
//! below it, however the maps happen to be sized when the count is taken.

use corecast::pubsub::bus::{Bus, Wake};
use corecast::pubsub::directory::Directory;
use corecast::pubsub::shard::{Shard, TOPIC_ENTRY_BYTES, registry_charge};
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

/// Live bytes per topic after subscribing `n` topics named with `len` bytes.
fn bytes_per_topic(n: usize, len: usize) -> usize {
    let d = Arc::new(Directory::new());
    let (bus, _inboxes) = Bus::new(vec![Box::new(NoWake) as Box<dyn Wake>]);
    let mut shard = Shard::new(0, Arc::clone(&d), bus);
    let names: Vec<String> = (0..n).map(|i| format!("{i:0>len$}")).collect();
    let before = LIVE.load(Ordering::Relaxed);
    let subs: Vec<_> = names.iter().map(|t| shard.subscribe(t, (0, 0))).collect();
    let held = LIVE.load(Ordering::Relaxed) - before;
    for s in subs {
        shard.unsubscribe(s);
    }
    assert!(d.is_empty());
    held as usize / n
}

#[test]
fn a_topic_costs_the_registries_less_than_a_subscription_is_charged() {
    // Several counts, so the maps are caught both just after and just
    // before a doubling.
    for n in [1_000, 1_500, 2_048, 3_000, 10_000] {
        for len in [8, 128] {
            let per_topic = bytes_per_topic(n, len);
            assert!(
                per_topic <= registry_charge(len),
                "{n} topics of {len} bytes: {per_topic} B each, charged {}",
                registry_charge(len)
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
