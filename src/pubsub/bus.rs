//! How publications cross workers: one unbounded MPSC queue per worker
//! (std's channel, lock-free since Rust 1.67) plus a coalesced wake-up.
//!
//! A worker sends at most one batch per peer per loop turn (everything its
//! publishers produced that turn for topics the peer has subscribers of),
//! so channel operations and wake-ups are per turn, not per message.
//!
//! Wake-up protocol: the sender enqueues, then wakes the receiver only if its
//! `notified` flag was clear; the receiver clears the flag *before* draining.
//! Either the receiver's drain sees the batch, or the sender sees the cleared
//! flag and wakes it: no batch is left waiting for a wake-up that never comes.
//!
//! Backpressure: each mailbox counts the bytes queued in it, until the
//! receiver has delivered them, and when the oldest publication its
//! receiver has found and not yet delivered was published (so its *lag*,
//! seen from any thread, is the time since). A
//! publisher's worker stops reading its publishers (WebSocket and HTTP
//! alike) while any mailbox is over [`MAILBOX_HIGH_WATER`] or behind by
//! more than [`MAILBOX_HIGH_LAG`], and resumes below half of both, so a
//! burst faster than the subscribers' workers can grow neither memory nor
//! the wait of everyone else's publications behind it without bound: a
//! publication that costs many deliveries (a `>` subscriber's table on
//! every worker) is a few hundred bytes in a mailbox, and 64 MiB of them
//! were seconds of work. The receiver takes batches one at a time
//! ([`Inbox::next`]) and may stop between them, so its drain is bounded
//! per loop turn.

use super::directory::TopicInterest;
use super::envelope::Message;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// Bytes queued for one worker above which publishers pause.
/// 64 MiB: a few hundred milliseconds of the fastest fan-out measured here.
pub const MAILBOX_HIGH_WATER: usize = 64 * 1024 * 1024;
/// How far behind a worker's deliveries may fall (the wait of the oldest
/// publication it has found, taken from its mailbox or carried past a
/// turn's delivery bound, and not yet delivered) before publishers pause.
/// On a quiet machine the benchmarks' bursts and overload stay below it
/// (docs/BENCHMARKS.md: the overload's p99 from publish to the clients is
/// 40–100 ms); where they reach it, the publisher is held instead of its
/// backlog growing, and nothing is lost.
/// Outside probe: rated `>` subscribers on both workers and a publisher
/// of new topic names kept the mailboxes 2–3 s behind, far below the byte
/// mark, and an honest publication of another topic waited that long.
pub const MAILBOX_HIGH_LAG: Duration = Duration::from_millis(200);
/// What a mailbox counts for one publication besides its frame: the
/// `Publication` in its batch, its [`Message`] (with room for its
/// envelope frames' handles and its boxed compressed-form cells), the
/// frame's allocation and shared count (~300 B with the allocator's
/// rounding; `history.rs` checks the message's size). Without it a flood of empty
/// messages would hold many times what the mailbox counted.
pub const PUBLICATION_OVERHEAD_BYTES: usize = 320;

/// One published message on its way to a worker: the topic by identity
/// and the sequenced message, whose frames are encoded once and shared by
/// every subscriber's queue on every worker.
#[derive(Debug, Clone)]
pub struct Publication {
    /// The topic, by identity. Weak, so a publication in flight does not keep
    /// a topic nobody uses in the directory; the allocation (and so the
    /// address receivers look it up by) stays reserved while it exists, so
    /// the address cannot be reused by another topic meanwhile.
    pub topic: Weak<TopicInterest>,
    /// The message: raw frame, epoch and sequence number, envelopes.
    pub msg: Arc<Message>,
    /// Its raw frame, one more reference per publication in a mailbox: a
    /// frame waiting in a mailbox counts as held for the ledger (which
    /// judges by the frame's count), so its charge lasts until the last
    /// queue lets it go.
    frame: Bytes,
}

impl Publication {
    /// A publication of `msg` to `topic`.
    pub fn new(topic: Weak<TopicInterest>, msg: Arc<Message>) -> Self {
        let frame = msg.frame.clone();
        Self { topic, msg, frame }
    }

    /// The raw server frame (header + payload), ready to write.
    pub fn frame(&self) -> &Bytes {
        &self.frame
    }

    /// When the publisher's worker decoded it (for the latency histogram).
    pub fn published_at(&self) -> Instant {
        self.msg.published_at
    }
}

/// Wakes a worker's event loop (a mio `Waker`, an eventfd).
pub trait Wake: Send + Sync {
    fn wake(&self);
}

struct Mailbox {
    tx: Sender<Vec<Publication>>,
    notified: AtomicBool,
    queued_bytes: AtomicUsize,
    /// When the oldest publication its receiver found and has not
    /// delivered was published ([`Inbox::report_oldest`]), in nanoseconds
    /// after the bus's `epoch` plus one; 0 when there is none.
    oldest_ns: AtomicU64,
    /// Batches handed over so far (see [`Bus::sent_to`]).
    sent: AtomicU64,
    waker: Box<dyn Wake>,
}

/// Every worker's mailbox.
pub struct Bus {
    mailboxes: Box<[Mailbox]>,
    /// See [`Bus::stranded`].
    stranded: Arc<AtomicU64>,
    /// One order per topic: see [`Bus::hold_order`].
    order: [Mutex<()>; ORDER_STRIPES],
    /// See [`Bus::add_external_sender`].
    external: AtomicBool,
    /// What [`Inbox::report_oldest`] counts from.
    epoch: Instant,
}

/// Locks a topic's publications are sent under ([`Bus::hold_order`]); a
/// topic maps to one by the address of its directory entry.
const ORDER_STRIPES: usize = 64;

/// The stripe of the topic whose entry is at `addr`.
pub fn order_stripe<T>(addr: *const T) -> u32 {
    // Entries are heap allocations (16-byte aligned): drop the low bits,
    // then a multiplicative hash's top six bits.
    let x = (addr as usize as u64 >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 58) as u32
}

/// The stripe locks one worker holds while its turn's batches go out.
pub struct OrderGuard<'a> {
    _held: Vec<MutexGuard<'a, ()>>,
}

/// A worker's receiving end.
pub struct Inbox {
    worker: usize,
    rx: Receiver<Vec<Publication>>,
    /// Batches taken so far: the number of the last one taken.
    taken: std::cell::Cell<u64>,
    /// Shared with the bus: publications this inbox still held when it was
    /// dropped (its worker exited), counted by [`Drop`].
    stranded: Arc<AtomicU64>,
}

impl Bus {
    /// A bus for `wakers.len()` workers; returns it with each worker's inbox.
    pub fn new(wakers: Vec<Box<dyn Wake>>) -> (Arc<Self>, Vec<Inbox>) {
        let mut inboxes = Vec::with_capacity(wakers.len());
        let stranded = Arc::new(AtomicU64::new(0));
        let mailboxes = wakers
            .into_iter()
            .enumerate()
            .map(|(worker, waker)| {
                let (tx, rx) = channel();
                inboxes.push(Inbox {
                    worker,
                    rx,
                    taken: std::cell::Cell::new(0),
                    stranded: Arc::clone(&stranded),
                });
                Mailbox {
                    tx,
                    notified: AtomicBool::new(false),
                    queued_bytes: AtomicUsize::new(0),
                    oldest_ns: AtomicU64::new(0),
                    sent: AtomicU64::new(0),
                    waker,
                }
            })
            .collect();
        (
            Arc::new(Self {
                mailboxes,
                stranded,
                order: std::array::from_fn(|_| Mutex::new(())),
                external: AtomicBool::new(false),
                epoch: Instant::now(),
            }),
            inboxes,
        )
    }

    /// Holds the order locks of `stripes` (bit `i`: stripe `i`, from
    /// [`order_stripe`]) until the guard drops, taking them in increasing
    /// order (so two workers never wait on each other in a cycle).
    ///
    /// A worker holds the stripes of every topic in its turn's batches
    /// while it sends them to every mailbox: another worker's batch for
    /// the same topic then reaches every mailbox wholly before or wholly
    /// after it, and since each mailbox is FIFO, every worker dequeues a
    /// topic's publications in one order, whoever published them. (Without
    /// it, worker A's batch could reach mailbox 0 before worker B's and
    /// mailbox 1 after it.)
    pub fn hold_order(&self, stripes: u64) -> OrderGuard<'_> {
        let mut held = Vec::with_capacity(stripes.count_ones() as usize);
        let mut rest = stripes;
        while rest != 0 {
            let i = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            // A panic while holding it protects no data: poisoning ignored.
            held.push(self.order[i].lock().unwrap_or_else(|p| p.into_inner()));
        }
        OrderGuard { _held: held }
    }

    /// Holds every order lock (none with one worker): while it is held no
    /// batch is on its way to any mailbox, so [`Self::sent_to`] draws a
    /// line between what was sent before and what will be sent after.
    pub fn hold_all_order(&self) -> OrderGuard<'_> {
        self.hold_order(if self.order_needed() { u64::MAX } else { 0 })
    }

    /// Whether more than one thread sends batches (more than one worker,
    /// or a cluster's bridge besides them): otherwise the order locks are
    /// skipped.
    pub fn order_needed(&self) -> bool {
        self.workers() > 1 || self.external.load(Ordering::Relaxed)
    }

    /// Another thread than the workers will send batches (a cluster's
    /// bridge): set before any worker runs.
    pub fn add_external_sender(&self) {
        self.external.store(true, Ordering::Relaxed);
    }

    /// Batches handed to `worker`'s mailbox so far. Its inbox numbers the
    /// batches it takes the same way ([`Inbox::taken`]): batch number `n`
    /// was sent after this read `k` if and only if `n > k`, when the read
    /// is made under [`Self::hold_all_order`] (every batch is sent under
    /// an order lock; with one worker, by the reader itself).
    pub fn sent_to(&self, worker: usize) -> u64 {
        self.mailboxes[worker].sent.load(Ordering::Acquire)
    }

    /// Publications left in a worker's mailbox when it exited (shutdown):
    /// batches sent after its last drain and before its inbox was dropped.
    pub fn stranded(&self) -> u64 {
        self.stranded.load(Ordering::Relaxed)
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.mailboxes.len()
    }

    /// Hands `batch` to `worker`. `Ok(true)`: the worker must be woken
    /// (its flag was clear), which the caller does with [`Self::wake`]
    /// once its turn's sends are done, so no wake-up happens inside the
    /// fan-out core. `Err(n)`: that worker has already exited (shutdown)
    /// and its `n` publications are lost, for the caller to count.
    pub fn send(&self, worker: usize, batch: Vec<Publication>) -> Result<bool, usize> {
        let m = &self.mailboxes[worker];
        let bytes = counted_bytes(&batch);
        m.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Err(lost) = m.tx.send(batch) {
            // The worker has exited (shutdown): nobody left to deliver to.
            m.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            return Err(lost.0.len());
        }
        m.sent.fetch_add(1, Ordering::Release);
        Ok(!m.notified.swap(true, Ordering::AcqRel))
    }

    /// Wakes `worker`: after a [`Self::send`] that asked for it, or
    /// without a batch (shutdown).
    pub fn wake(&self, worker: usize) {
        self.mailboxes[worker].waker.wake();
    }

    /// Bytes waiting in the fullest mailbox.
    pub fn max_queued_bytes(&self) -> usize {
        self.mailboxes
            .iter()
            .map(|m| m.queued_bytes.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    /// The lag of the worker furthest behind at `now`: how long the
    /// oldest publication a worker has found and not yet delivered has
    /// waited ([`Inbox::report_oldest`]); zero if every worker delivered
    /// all it found.
    pub fn max_lag(&self, now: Instant) -> Duration {
        let oldest = self
            .mailboxes
            .iter()
            .map(|m| m.oldest_ns.load(Ordering::Relaxed))
            .filter(|&ns| ns > 0)
            .min();
        oldest.map_or(Duration::ZERO, |ns| {
            now.saturating_duration_since(self.epoch + Duration::from_nanos(ns - 1))
        })
    }

    /// Clears what `worker` reported pending ([`Inbox::report_oldest`]):
    /// it stopped (panicked), and will deliver nothing more.
    pub fn forget_lag(&self, worker: usize) {
        self.mailboxes[worker].oldest_ns.store(0, Ordering::Relaxed);
    }

    /// Bytes waiting in `worker`'s mailbox.
    pub fn queued_bytes(&self, worker: usize) -> usize {
        self.mailboxes[worker].queued_bytes.load(Ordering::Relaxed)
    }
}

/// What a batch counts against its mailbox: frames plus overhead.
fn counted_bytes(batch: &[Publication]) -> usize {
    batch
        .iter()
        .map(|p| p.msg.frame.len() + PUBLICATION_OVERHEAD_BYTES)
        .sum()
}

impl Inbox {
    /// Starts a drain: clears the wake-up flag *before* taking batches (see
    /// the wake-up protocol above). Call once per loop turn, then
    /// [`Self::next`] until `None` or until the turn's delivery bound.
    pub fn begin_drain(&self, bus: &Bus) {
        bus.mailboxes[self.worker]
            .notified
            .store(false, Ordering::Release);
    }

    /// The next batch queued for this worker, in arrival order. Its bytes
    /// still count against the mailbox until [`Self::done`].
    pub fn next(&self) -> Option<Vec<Publication>> {
        let batch = self.rx.try_recv().ok()?;
        self.taken.set(self.taken.get() + 1);
        Some(batch)
    }

    /// The number of the last batch [`Self::next`] took (1 for the first):
    /// comparable with [`Bus::sent_to`].
    pub fn taken(&self) -> u64 {
        self.taken.get()
    }

    /// Marks `batch` (from [`Self::next`]) as delivered: its bytes leave the
    /// mailbox's count.
    pub fn done(&self, bus: &Bus, batch: &[Publication]) {
        bus.mailboxes[self.worker]
            .queued_bytes
            .fetch_sub(counted_bytes(batch), Ordering::Relaxed);
    }

    /// Reports when the oldest publication this worker has found (taken
    /// from its mailbox, or carried from its last turn) and not yet
    /// delivered was published; `None` once it has delivered all it found.
    /// Set when a drain finds its first publication (so that a long turn's
    /// delivery shows as a growing lag to the other workers) and at its end.
    pub fn report_oldest(&self, bus: &Bus, published_at: Option<Instant>) {
        let ns = published_at.map_or(0, |t| {
            let since = t.saturating_duration_since(bus.epoch).as_nanos();
            u64::try_from(since).unwrap_or(u64::MAX - 1) + 1
        });
        bus.mailboxes[self.worker]
            .oldest_ns
            .store(ns, Ordering::Relaxed);
    }

    /// Takes every batch queued for this worker, in arrival order.
    pub fn drain(&self, bus: &Bus, mut f: impl FnMut(Vec<Publication>)) {
        self.begin_drain(bus);
        while let Some(batch) = self.next() {
            self.done(bus, &batch);
            f(batch);
        }
    }
}

impl Drop for Inbox {
    /// A worker's inbox goes when the worker exits: whatever is still in
    /// it (sent after the worker's last drain) is counted, not lost
    /// silently. Batches sent after this fail at the sender, who counts them.
    fn drop(&mut self) {
        let mut n = 0;
        while let Ok(batch) = self.rx.try_recv() {
            n += batch.len() as u64;
        }
        self.stranded.fetch_add(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pubsub::directory::Directory;
    use std::sync::atomic::AtomicUsize;

    struct Count(Arc<AtomicUsize>);
    impl Wake for Count {
        fn wake(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A bus of two workers whose wake-ups are counted nowhere.
    fn two_workers() -> (Arc<Bus>, Vec<Inbox>) {
        Bus::new(vec![
            Box::new(Count(Arc::new(AtomicUsize::new(0)))),
            Box::new(Count(Arc::new(AtomicUsize::new(0)))),
        ])
    }

    /// Workers holding overlapping sets of order stripes, in any mix,
    /// never wait on each other in a cycle, and a held stripe excludes.
    #[test]
    fn order_stripes_are_exclusive_and_taken_without_deadlock() {
        let (bus, _inboxes) = two_workers();
        let d = Directory::new();
        let topics: Vec<_> = (0..200).map(|i| d.entry(&format!("t{i}"))).collect();
        let stripes: Vec<u32> = topics
            .iter()
            .map(|t| order_stripe(Arc::as_ptr(t)))
            .collect();
        assert!(stripes.iter().all(|&s| s < ORDER_STRIPES as u32));
        let used: std::collections::HashSet<_> = stripes.iter().collect();
        assert!(
            used.len() > 32,
            "200 topics spread over the stripes: {}",
            used.len()
        );
        let inside = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let (bus, inside) = (&bus, &inside);
                scope.spawn(move || {
                    let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                    for _ in 0..20_000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // Every set includes stripe 0: at most one holder at a time.
                        let _g = bus.hold_order(x | 1);
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
        });
    }

    #[test]
    fn wakeups_are_coalesced_and_bytes_counted() {
        let wakes = Arc::new(AtomicUsize::new(0));
        let (bus, inboxes) = Bus::new(vec![
            Box::new(Count(Arc::clone(&wakes))),
            Box::new(Count(Arc::new(AtomicUsize::new(0)))),
        ]);
        let d = Directory::new();
        let topic = d.entry("t");
        let p = Publication::new(
            Arc::downgrade(&topic),
            Arc::new(Message::new(Bytes::from_static(b"12345"), Instant::now())),
        );
        assert_eq!(bus.send(0, vec![p.clone(), p.clone()]), Ok(true));
        bus.wake(0);
        assert_eq!(
            bus.send(0, vec![p.clone()]),
            Ok(false),
            "second send finds the flag set"
        );
        assert_eq!(wakes.load(Ordering::SeqCst), 1);
        let counted = 15 + 3 * PUBLICATION_OVERHEAD_BYTES;
        assert_eq!(bus.queued_bytes(0), counted, "frames plus overhead");
        assert_eq!(bus.max_queued_bytes(), counted);
        let mut got = 0;
        inboxes[0].drain(&bus, |b| got += b.len());
        assert_eq!(got, 3);
        assert_eq!(bus.queued_bytes(0), 0);
        assert_eq!(
            bus.send(0, vec![p]),
            Ok(true),
            "drained: the next send wakes again"
        );
    }

    /// The lag is the wait of the oldest publication a worker found and
    /// has not delivered, measured at the reader's `now`, not frozen at
    /// the report (a worker that caught up reports none: a stale lag would
    /// hold every publisher until that worker's next turn).
    #[test]
    fn the_lag_is_the_oldest_pending_publications_wait_until_it_is_delivered() {
        let (bus, inboxes) = two_workers();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(bus.max_lag(t0 + ms(500)), Duration::ZERO, "none found");
        inboxes[0].report_oldest(&bus, Some(t0 + ms(10)));
        inboxes[1].report_oldest(&bus, Some(t0));
        assert_eq!(bus.max_lag(t0 + ms(250)), ms(250), "the oldest of all");
        assert_eq!(bus.max_lag(t0 + ms(400)), ms(400), "it grows with time");
        inboxes[1].report_oldest(&bus, None);
        assert_eq!(bus.max_lag(t0 + ms(400)), ms(390));
        inboxes[0].report_oldest(&bus, None);
        assert_eq!(bus.max_lag(t0 + ms(400)), Duration::ZERO, "caught up");
    }
}
