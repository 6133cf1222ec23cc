//! The bridge thread: one per process, the only one that talks to NATS.
//!
//! It runs a current-thread tokio runtime (the NATS client is async) and
//! never blocks a worker: workers hand it publications and interest
//! changes through [`Cluster`]'s inbox and a `Notify`; it hands numbered
//! publications to the workers through the bus ([`inject`]) and replies
//! through [`Cluster`]'s per-worker queues, waking them with the bus's
//! wake-ups.
//!
//! - **Connection.** Connects in the background and reconnects for ever
//!   (the client's own backoff); the node starts whether or not NATS is
//!   there. `corecast_cluster_connected` and `/healthz` say whether
//!   publications flow.
//! - **Stream.** After each connect, the stream is created if missing
//!   (`get_or_create_stream`: an existing stream's settings are kept).
//! - **Interest.** One subscription per topic and per pattern the node's
//!   workers hold (a topic held through a pattern only is not subscribed
//!   on its own), made when the first subscriber arrives and dropped when
//!   the last one leaves; the client makes them again after a reconnect.
//! - **Publications out.** Through the [`Sequencer`]: one stream message
//!   in flight per topic, carrying every publication of the topic queued
//!   behind the last (`Corecast-Batch`), numbered and checked by the
//!   stream.
//! - **Publications in.** What has arrived is decoded (topic, epoch,
//!   numbers, kinds, keys), framed once per publication, and handed to the
//!   workers as one batch each ([`inject_batch`](crate::pubsub::remote::inject_batch));
//!   while any worker's mailbox is over its high-water mark, the bridge
//!   stops reading (the client buffers, then NATS drops for this slow
//!   consumer: a skip the next message shows, read back from the stream).
//! - **Fills** ([`fill`]): a topic's retained messages read from the stream
//!   when the node starts following it (its history), and what the node
//!   missed after a skip or a reconnect (delivered); live messages wait
//!   behind a running fill.

use super::sequencer::{Last, Sequencer, Step};
use super::subject::{IN_PREFIX, OUT_PREFIX, interest_subject, publish_subject, topic_of};
use super::{Cluster, MAX_HOLDS, Reply, STREAM};
use crate::proto::frame::{OpCode, server_frame};
use crate::pubsub::bus::Bus;
use crate::pubsub::directory::Directory;
use crate::pubsub::envelope::Message;
use crate::pubsub::topic;
use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, header};
use futures_util::StreamExt;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{info, warn};

const H_EPOCH: &str = "Corecast-Epoch";
const H_SEQ: &str = "Corecast-Seq";
const H_KIND: &str = "Corecast-Kind";
const H_KEY: &str = "Corecast-Key";
/// Set when one stream message carries several publications of the topic
/// (numbered from `Corecast-Seq` on): how many; the payload is then each
/// one's kind (1 text, 2 binary), key length (u16), key, length (u32) and
/// bytes, big-endian, in order.
const H_BATCH: &str = "Corecast-Batch";
/// The publishing node's wall clock at publish, in nanoseconds since 1970.
const H_AT: &str = "Corecast-Published-At";

/// How long the bridge waits at shutdown for publications in flight.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// What the stream is made with (when no node made it yet).
#[derive(Debug, Clone, Copy)]
pub struct StreamSettings {
    pub per_topic: usize,
    pub max_bytes: usize,
    pub replicas: u8,
}

/// The running bridge thread.
#[derive(Debug)]
pub struct Bridge {
    thread: Option<std::thread::JoinHandle<()>>,
    cluster: Arc<Cluster>,
}

impl Bridge {
    /// Starts the bridge thread. Fails only if the thread or its runtime
    /// cannot be made; NATS itself may be away.
    pub fn spawn(
        cluster: Arc<Cluster>,
        directory: Arc<Directory>,
        bus: Arc<Bus>,
        stream: StreamSettings,
        high_water: usize,
    ) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let c = Arc::clone(&cluster);
        let thread = std::thread::Builder::new()
            .name("corecast-nats".into())
            .spawn(move || {
                let c2 = Arc::clone(&c);
                let run = std::panic::AssertUnwindSafe(|| {
                    rt.block_on(run(c, directory, bus, stream, high_water));
                });
                if std::panic::catch_unwind(run).is_err() {
                    // A bug: the node goes on alone, and says so (/healthz
                    // 503, publications refused) instead of looking joined.
                    tracing::error!("cluster: the NATS bridge panicked (a bug: please report it with the log); this node no longer takes part in the cluster");
                    c2.settings_failed();
                    c2.connected.store(false, Ordering::Relaxed);
                }
            })?;
        Ok(Self {
            thread: Some(thread),
            cluster,
        })
    }

    /// Stops the bridge (after a moment for publications in flight) and
    /// waits for its thread.
    pub fn stop(mut self) {
        self.cluster.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How a step the bridge started ended.
enum Done {
    Fetched(Arc<str>, Option<Last>),
    Acked(Arc<str>, u64),
    Conflict(Arc<str>),
    Failed(Arc<str>, String),
    /// No stream takes the topic's subject (the stream was deleted, or
    /// replaced by one capturing other subjects): tried again once the
    /// stream has been ensured anew.
    NoStream(Arc<str>),
    /// The stream can never take it (too large for NATS): dropped.
    Rejected(Arc<str>, String),
    /// The stream had stored it already (an attempt that timed out had
    /// reached it): its number is the one stored; read the topic again.
    Duplicate(Arc<str>),
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn header_u64(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.as_str().parse().ok()
}

async fn connect(cluster: &Arc<Cluster>) -> Result<async_nats::Client, String> {
    let c = Arc::clone(cluster);
    let mut opts = async_nats::ConnectOptions::new()
        .name("corecast")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(5)))
        .subscription_capacity(cluster.settings.buffered.max(1))
        .event_callback(move |event| {
            let c = Arc::clone(&c);
            async move {
                match event {
                    async_nats::Event::Connected => {
                        c.stats.connects.fetch_add(1, Ordering::Relaxed);
                        c.connected.store(true, Ordering::Relaxed);
                        info!("cluster: connected to NATS");
                    }
                    async_nats::Event::Disconnected => {
                        c.connected.store(false, Ordering::Relaxed);
                        c.ready.store(false, Ordering::Relaxed);
                        warn!("cluster: disconnected from NATS; reconnecting");
                    }
                    async_nats::Event::SlowConsumer(_) => {
                        c.stats.slow_consumer.fetch_add(1, Ordering::Relaxed);
                        c.dropped.store(true, Ordering::Relaxed);
                    }
                    other => warn!(event = %other, "cluster: NATS"),
                }
                c.wake.notify_one();
            }
        });
    if let Some(path) = &cluster.settings.credentials {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &cluster.settings.ca {
        opts = opts.add_root_certificates(path.clone());
    }
    if cluster
        .settings
        .urls
        .iter()
        .any(|u| u.starts_with("tls://"))
    {
        opts = opts.require_tls(true);
    }
    let urls: Vec<async_nats::ServerAddr> = cluster
        .settings
        .urls
        .iter()
        .map(|u| u.parse().map_err(|e| format!("{u}: {e}")))
        .collect::<Result<_, _>>()?;
    opts.connect(urls).await.map_err(|e| e.to_string())
}

async fn ensure_stream(
    js: &jetstream::Context,
    s: StreamSettings,
) -> Result<stream::Stream, String> {
    let config = stream::Config {
        name: STREAM.into(),
        description: Some("corecast publications: one order and a history per topic".into()),
        subjects: vec![format!("{IN_PREFIX}>")],
        max_messages_per_subject: s.per_topic.max(1) as i64,
        max_bytes: s.max_bytes.min(i64::MAX as usize) as i64,
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::File,
        num_replicas: usize::from(s.replicas),
        republish: Some(stream::Republish {
            source: format!("{IN_PREFIX}>"),
            destination: format!("{OUT_PREFIX}>"),
            headers_only: false,
        }),
        allow_direct: true,
        ..Default::default()
    };
    js.get_or_create_stream(config)
        .await
        .map_err(|e| e.to_string())
}

/// What the bridge's tasks share (all on the bridge's one thread).
struct Node {
    cluster: Arc<Cluster>,
    directory: Arc<Directory>,
    bus: Arc<Bus>,
    high_water: usize,
    /// Most messages one fill reads from the stream.
    fill_limit: usize,
    /// The stream, while known to exist (a fill reads it).
    stream: Mutex<Option<stream::Stream>>,
    /// Per topic followed here: where it stands against the stream.
    follows: Mutex<HashMap<Arc<str>, Follow>>,
}

/// A topic this node follows, as the bridge sees it.
#[derive(Debug, Default)]
struct Follow {
    /// The directory entry this is about (its address): a new entry for
    /// the name (the old one was forgotten) starts over.
    entry: usize,
    /// Stream sequence of the newest message handed on here (0: none).
    last_stream: u64,
    /// Its epoch and number (what the next one should follow).
    last: Option<(u64, u64)>,
    /// A fill from the stream is running: what arrives live meanwhile
    /// waits here, in order, and follows it.
    filling: Option<Waiting>,
    /// A fill ran (the topic is followed for itself, not only through a
    /// pattern): `last_stream` says what the stream held of it, even 0.
    synced: bool,
    /// Followed without subscribers until then (a recovery asked for its
    /// history): the entry is held so it stays.
    hold: Option<(Arc<crate::pubsub::directory::TopicInterest>, Instant)>,
    /// The NATS client dropped messages while a fill ran: once it ends,
    /// the stream is read again from what it handed on.
    recheck: bool,
    /// Where the last fill for a skipped number began: a skip still there
    /// after a fill from the same place is not in the stream to be read
    /// (it shows as a gap), and is not read again.
    refilled_from: u64,
}

#[derive(Debug)]
struct Incoming {
    msg: Message,
    stream_seq: u64,
}

/// Live messages waiting behind a running fill, in order, bounded by
/// count ([`MAX_WAITING`]) and bytes ([`MAX_WAITING_BYTES`]).
#[derive(Debug, Default)]
struct Waiting {
    items: Vec<Incoming>,
    /// Frame bytes of `items`.
    bytes: usize,
}

impl Waiting {
    /// Appends `inc` if it fits both bounds (the first always does);
    /// `false` (dropped: a gap the numbers show) if not.
    fn push(&mut self, inc: Incoming) -> bool {
        let n = inc.msg.frame.len();
        if self.items.len() >= MAX_WAITING
            || (self.bytes + n > MAX_WAITING_BYTES && !self.items.is_empty())
        {
            return false;
        }
        self.bytes += n;
        self.items.push(inc);
        true
    }

    fn iter(&self) -> impl Iterator<Item = &Incoming> {
        self.items.iter()
    }
}

/// What waits already when a fill starts (one stream message's worth, or
/// what a finished fill left): kept whole, its bytes counted.
impl FromIterator<Incoming> for Waiting {
    fn from_iter<I: IntoIterator<Item = Incoming>>(iter: I) -> Self {
        let items: Vec<Incoming> = iter.into_iter().collect();
        let bytes = items.iter().map(|i| i.msg.frame.len()).sum();
        Self { items, bytes }
    }
}

impl IntoIterator for Waiting {
    type Item = Incoming;
    type IntoIter = std::vec::IntoIter<Incoming>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter()
    }
}

/// How long a topic filled for a recovery stays followed without
/// subscribers (the client's retry comes within milliseconds).
const WARM_HOLD: Duration = Duration::from_secs(30);
/// How long a new subscription may wait for the NATS client to take it.
const SUBSCRIBE_WAIT: Duration = Duration::from_millis(100);
/// Most messages handed on in one batch.
const MAX_BATCH: usize = 256;
/// How long after the NATS client's last report of dropped messages the
/// followed topics are read from the stream (one read for a burst of drops).
const DROP_SETTLE: Duration = Duration::from_millis(100);
/// Most live messages waiting behind one running fill; past it they are
/// dropped (a gap the numbers show, counted).
const MAX_WAITING: usize = 65_536;
/// Most frame bytes waiting behind one running fill (a topic of large
/// messages reaches it long before [`MAX_WAITING`]).
const MAX_WAITING_BYTES: usize = 16 << 20;

/// The topics followed for recoveries alone ([`Follow::hold`]), in the
/// order their holds run out.
#[derive(Debug, Default)]
struct Holds {
    /// Holds now (at most [`MAX_HOLDS`]).
    count: usize,
    /// Each hold's end with its topic, in time order (every hold ends
    /// [`WARM_HOLD`] after it was taken or renewed). A renewal lists the
    /// topic again; the earlier listing, whose time no longer matches the
    /// hold's, is skipped. So at most one listing per topic and second of
    /// [`WARM_HOLD`] (renewals are listed once a second at most).
    order: VecDeque<(Instant, Arc<str>)>,
}

type Held = Arc<crate::pubsub::directory::TopicInterest>;

impl Holds {
    /// The hold of the listing at the front, taken if the listing is the
    /// one that counts.
    fn take_front(&mut self, follows: &mut HashMap<Arc<str>, Follow>) -> Option<(Arc<str>, Held)> {
        let (until, name) = self.order.pop_front()?;
        let f = follows.get_mut(&*name)?;
        if f.hold.as_ref().is_some_and(|h| h.1 == until) {
            let (entry, _) = f.hold.take().expect("checked");
            self.count -= 1;
            return Some((name, entry));
        }
        None
    }

    /// The holds that ran out by `now`, taken.
    fn expire(
        &mut self,
        follows: &mut HashMap<Arc<str>, Follow>,
        now: Instant,
    ) -> Vec<(Arc<str>, Held)> {
        let mut out = Vec::new();
        while self.order.front().is_some_and(|(until, _)| *until <= now) {
            out.extend(self.take_front(follows));
        }
        out
    }

    /// `f`, the follow of `name`, held until `until` (renewed if held:
    /// then `entry` is handed back, the hold has its own).
    fn set(&mut self, f: &mut Follow, name: &str, entry: Held, until: Instant) -> Option<Held> {
        match &mut f.hold {
            Some((_, at)) => {
                // Listed again once a second at most per topic.
                if *at + Duration::from_secs(1) <= until {
                    *at = until;
                    self.order.push_back((until, Arc::from(name)));
                }
                Some(entry)
            }
            None => {
                f.hold = Some((entry, until));
                self.count += 1;
                self.order.push_back((until, Arc::from(name)));
                None
            }
        }
    }

    /// Room for one more hold within `max`: at it, the hold that runs out
    /// first is taken before its time.
    fn make_room(
        &mut self,
        follows: &mut HashMap<Arc<str>, Follow>,
        max: usize,
    ) -> Option<(Arc<str>, Held)> {
        if self.count < max {
            return None;
        }
        while !self.order.is_empty() {
            if let Some(taken) = self.take_front(follows) {
                return Some(taken);
            }
        }
        None
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Node {
    /// The follow state of `topic`, started over if its entry changed.
    fn follow<'a>(
        &self,
        follows: &'a mut HashMap<Arc<str>, Follow>,
        topic: &str,
    ) -> &'a mut Follow {
        let entry = self.directory.get(topic).map_or(0, |t| {
            let at = Arc::as_ptr(&t) as usize;
            self.directory.release(t);
            at
        });
        let f = follows.entry(Arc::from(topic)).or_default();
        if f.entry != entry && f.filling.is_none() {
            let hold = f.hold.take();
            *f = Follow {
                entry,
                hold,
                ..Follow::default()
            };
        }
        f
    }

    /// Hands `msg` to the fan-out here (wake-ups, counters).
    fn deliver(&self, topic: &str, msg: Message) {
        self.deliver_batch(vec![(topic.to_string(), msg)]);
    }

    /// Hands a batch of publications to the fan-out here (one send per
    /// worker), with its wake-ups and counters.
    fn deliver_batch(&self, batch: Vec<(String, Message)>) {
        if batch.is_empty() {
            return;
        }
        let done = crate::pubsub::remote::inject_batch(&self.directory, &self.bus, batch);
        let mut w = done.wakes;
        while w != 0 {
            self.bus.wake(w.trailing_zeros() as usize);
            w &= w - 1;
        }
        let stats = &self.cluster.stats;
        stats.gaps.fetch_add(done.gaps as u64, Ordering::Relaxed);
        stats
            .restarts
            .fetch_add(done.restarts as u64, Ordering::Relaxed);
        stats
            .duplicates
            .fetch_add(done.duplicates as u64, Ordering::Relaxed);
    }

    /// Starts a fill of `topic` from the stream (the caller set its
    /// `filling`): `initial`, its history here (nothing delivered);
    /// otherwise what this node missed from stream sequence `from` on
    /// (delivered, in order, before what waited).
    /// Where `topic` stands here, as its last number handed on (`None`:
    /// nothing yet).
    fn position(&self, topic: &str) -> Option<(u64, u64)> {
        let t = self.directory.get(topic)?;
        let at = (t.seq() > 0).then(|| (t.epoch(), t.seq()));
        self.directory.release(t);
        at
    }

    fn start_fill(self: &Arc<Self>, topic: Arc<str>, from: u64, first: Option<u64>) {
        use futures_util::FutureExt;
        let node = Arc::clone(self);
        tokio::spawn(async move {
            let run = std::panic::AssertUnwindSafe(fill(
                Arc::clone(&node),
                Arc::clone(&topic),
                from,
                first,
            ));
            if run.catch_unwind().await.is_err() {
                // A bug: the topic must not wait behind a fill that will
                // never end. What waited is dropped (its numbers show as a
                // gap) and live messages flow again.
                tracing::error!(%topic, "cluster: a panic filling a topic from the stream (a bug: please report it with the log)");
                let mut follows = lock(&node.follows);
                if let Some(f) = follows.get_mut(&*topic)
                    && let Some(waiting) = f.filling.take()
                {
                    node.cluster
                        .stats
                        .gaps
                        .fetch_add(waiting.items.len() as u64, Ordering::Relaxed);
                }
            }
        });
    }
}

async fn run(
    cluster: Arc<Cluster>,
    directory: Arc<Directory>,
    bus: Arc<Bus>,
    settings: StreamSettings,
    high_water: usize,
) {
    // Stopping wins over a connection that does not come (the client may
    // wait for its first server while it retries).
    let connected = tokio::select! {
        c = connect(&cluster) => c,
        _ = stopped(&cluster) => return,
    };
    let client = match connected {
        Ok(c) => c,
        Err(e) => {
            // Only a bad setting gets here (the connection itself is
            // retried in the background): nothing will ever flow.
            tracing::error!(error = %e, "cluster: cannot use --nats-url; publications are refused");
            cluster.settings_failed();
            return;
        }
    };
    let node = Arc::new(Node {
        cluster: Arc::clone(&cluster),
        directory: Arc::clone(&directory),
        bus,
        high_water,
        fill_limit: settings.per_topic.max(1) + 1024,
        stream: Mutex::new(None),
        follows: Mutex::new(HashMap::new()),
    });
    let js = jetstream::new(client.clone());
    let mut seq = Sequencer::new(usize::MAX);
    let mut stream: Option<stream::Stream> = None;
    let mut had_stream = false;
    let mut subs: HashMap<(Box<str>, bool), tokio::task::AbortHandle> = HashMap::new();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Done>();
    let mut retry_at: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
    // The NATS client dropped messages: what every followed topic missed is
    // read from the stream once the drops have had a moment to end.
    let mut catch_up_at: Option<tokio::time::Instant> = None;
    let mut backoff = Duration::from_millis(100);
    let mut stopping: Option<Instant> = None;
    // Topics followed for a recovery alone now (bounded by MAX_HOLDS),
    // and when each hold runs out, oldest first (a hold renewed later
    // leaves its earlier listing stale: skipped when its turn comes).
    let mut holds = Holds::default();
    let mut next_prune = Instant::now() + Duration::from_secs(10);
    // Subscriptions the NATS client could not take in time (see
    // SUBSCRIBE_WAIT), tried again at `deferred_at`. Only names held here:
    // one let go leaves it with the change that says so.
    let mut deferred: HashSet<(Box<str>, bool)> = HashSet::new();
    let mut deferred_at: Option<tokio::time::Instant> = None;
    loop {
        // The stream, after each (re)connect.
        if stream.is_none() && cluster.connected.load(Ordering::Relaxed) && retry_due(retry_at) {
            match ensure_stream(&js, settings).await {
                Ok(s) => {
                    *lock(&node.stream) = Some(s.clone());
                    stream = Some(s);
                    let max_payload = client.server_info().max_payload;
                    cluster.max_payload.store(max_payload, Ordering::Relaxed);
                    // Publications queued for one topic go together, within
                    // half of what one NATS message may carry.
                    seq.set_batch_bytes((max_payload / 2).min(1024 * 1024));
                    cluster.ready.store(true, Ordering::Relaxed);
                    backoff = Duration::from_millis(100);
                    retry_at = None;
                    for step in seq.resume() {
                        start(step, &js, stream.as_ref(), &done_tx);
                    }
                    if had_stream {
                        catch_up_all(&node);
                    }
                    had_stream = true;
                }
                Err(e) => {
                    warn!(error = %e, "cluster: the stream {STREAM} is not available yet");
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        if !cluster.ready.load(Ordering::Relaxed) && stream.is_some() {
            // Disconnected since: check the stream again once back.
            stream = None;
            *lock(&node.stream) = None;
            retry_at = Some(tokio::time::Instant::now());
        }
        if stream.is_some() && retry_due(retry_at) {
            retry_at = None;
            for step in seq.resume() {
                start(step, &js, stream.as_ref(), &done_tx);
            }
        }
        if cluster.dropped.swap(false, Ordering::Relaxed) {
            catch_up_at.get_or_insert(tokio::time::Instant::now() + DROP_SETTLE);
        }
        if stream.is_some() && retry_due(catch_up_at) {
            catch_up_at = None;
            catch_up_all(&node);
        }
        if cluster.stop.load(Ordering::Acquire) {
            let since = *stopping.get_or_insert_with(Instant::now);
            if seq.queued() == 0 || since.elapsed() >= STOP_GRACE || stream.is_none() {
                break;
            }
        }
        let sleep_until = [retry_at, catch_up_at, deferred_at]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_millis(250));
        tokio::select! {
            _ = cluster.wake.notified() => {}
            Some(done) = done_rx.recv() => {
                let mut gone =
                    finish(done, &cluster, &mut seq, &js, stream.as_ref(), &done_tx, &mut retry_at);
                while let Ok(done) = done_rx.try_recv() {
                    gone |= finish(done, &cluster, &mut seq, &js, stream.as_ref(), &done_tx, &mut retry_at);
                }
                if gone && stream.is_some() {
                    // Deleted, or replaced by one that does not capture our
                    // subjects: ensured anew (created as ours if missing),
                    // then everything queued is tried again and the followed
                    // topics read from it.
                    warn!("cluster: the stream {STREAM} no longer takes corecast's subjects; ensuring it again");
                    stream = None;
                    *lock(&node.stream) = None;
                    retry_at = Some(tokio::time::Instant::now());
                }
            }
            _ = tokio::time::sleep_until(sleep_until) => {}
        }
        let (publications, mut interest, warm) = {
            let mut inbox = cluster.inbox();
            (
                std::mem::take(&mut inbox.publications),
                std::mem::take(&mut inbox.interest),
                std::mem::take(&mut inbox.warm),
            )
        };
        // Recoveries waiting for a topic's history here: follow it a while
        // (held, subscribed) and fill it.
        let mut fills: Vec<Arc<str>> = Vec::new();
        for name in warm {
            let mut follows = lock(&node.follows);
            let entry = directory.entry(&name);
            if entry.is_warm() {
                directory.release(entry);
                continue;
            }
            let now = Instant::now();
            let renewing = follows.get(&*name).is_some_and(|f| f.hold.is_some());
            if !renewing {
                // At the bound: the oldest hold gives way. Recoveries are
                // admitted at a bounded rate per worker, each fresh name
                // counted, so a hold lasts seconds even under a flood of
                // them, and its client's retry came within milliseconds.
                if let Some((old, held)) = holds.make_room(&mut follows, MAX_HOLDS) {
                    directory.release(held);
                    interest.push((Box::from(&*old), false));
                }
            }
            let f = node.follow(&mut follows, &name);
            if let Some(entry) = holds.set(f, &name, entry, now + WARM_HOLD) {
                directory.release(entry);
            }
            if f.filling.is_none() {
                f.filling = Some(Waiting::default());
                fills.push(Arc::from(&*name));
            }
            interest.push((name, false));
        }
        // Holds that ran out.
        {
            let now = Instant::now();
            let mut follows = lock(&node.follows);
            for (name, entry) in holds.expire(&mut follows, now) {
                directory.release(entry);
                interest.push((Box::from(&*name), false));
            }
            if now >= next_prune {
                next_prune = now + Duration::from_secs(10);
                follows.retain(|name, f| {
                    f.filling.is_some()
                        || f.hold.is_some()
                        || directory.get(name).is_some_and(|t| {
                            directory.release(t);
                            true
                        })
                });
            }
        }
        let mut subscribed = false;
        let mut boundary: Option<u64> = None;
        if !deferred.is_empty() && retry_due(deferred_at) {
            deferred_at = None;
            interest.extend(deferred.drain());
        }
        // Set once a subscription could not be handed to the NATS client
        // in time: the rest of the round's wait with it.
        let mut stalled = false;
        for (name, pattern) in interest {
            let held = if pattern {
                directory.pattern_held(&name)
            } else {
                directory.topic_held(&name)
                    || lock(&node.follows)
                        .get(&*name)
                        .is_some_and(|f| f.hold.is_some())
            };
            let key = (name, pattern);
            deferred.remove(&key);
            match (held, subs.contains_key(&key)) {
                (true, false) if stalled => {
                    deferred.insert(key);
                }
                (true, false) => {
                    if !pattern {
                        // Its history is filled once the subscription is in
                        // NATS (what is stored after that arrives live).
                        {
                            let mut follows = lock(&node.follows);
                            let f = node.follow(&mut follows, &key.0);
                            let warm = directory.get(&key.0).is_some_and(|t| {
                                let w = t.is_warm();
                                directory.release(t);
                                w
                            });
                            if !warm && f.filling.is_none() {
                                f.filling = Some(Waiting::default());
                                fills.push(Arc::from(&*key.0));
                            }
                        }
                        if boundary.is_none() && !fills.is_empty() {
                            // Once per round, before subscribing.
                            boundary = Some(last_sequence(stream.as_ref()).await);
                        }
                    }
                    // The NATS client takes commands into a bounded queue,
                    // which it stops reading while it reconnects: once that
                    // is full a subscribe waits for NATS to come back, and so
                    // would this loop (while every interest change piles up
                    // in the inbox). Bounded: past it the subscription is
                    // tried again a second later (a fill started for it
                    // meanwhile misses what is stored until then, a gap the
                    // next live message's number shows and fills).
                    let subject = interest_subject(&key.0);
                    match tokio::time::timeout(SUBSCRIBE_WAIT, client.subscribe(subject)).await {
                        Ok(Ok(sub)) => {
                            let task = tokio::spawn(receive(sub, Arc::clone(&node)));
                            subs.insert(key, task.abort_handle());
                            subscribed = true;
                        }
                        Ok(Err(e)) => {
                            warn!(error = %e, topic = %key.0, "cluster: cannot subscribe")
                        }
                        Err(_) => {
                            stalled = true;
                            deferred.insert(key);
                        }
                    }
                }
                (false, true) => {
                    if let Some(task) = subs.remove(&key) {
                        // Dropping the subscriber unsubscribes.
                        task.abort();
                    }
                }
                _ => {}
            }
        }
        if stalled && deferred_at.is_none() {
            cluster
                .stats
                .subscribes_deferred
                .fetch_add(1, Ordering::Relaxed);
            deferred_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
        }
        if subscribed {
            // A round trip: NATS has every new subscription once the gauge
            // counts it (a publication anywhere after that reaches us), and
            // a fill started after it misses nothing.
            // Not while NATS is away: the client answers a flush only once
            // it has reconnected, and this loop would wait as long (and
            // SIGTERM with it). Bounded otherwise, for the same reason.
            if cluster.connected.load(Ordering::Relaxed) {
                let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
            }
        }
        for topic in fills {
            node.start_fill(topic, 1, Some(boundary.unwrap_or(u64::MAX)));
        }
        cluster
            .stats
            .subscriptions
            .store(subs.len() as u64, Ordering::Relaxed);
        for p in publications {
            match seq.push(p) {
                Ok(Some(step)) => start(step, &js, stream.as_ref(), &done_tx),
                Ok(None) => {}
                Err(p) => {
                    // Past the sequencer's own bound (the inbox's is checked
                    // first, so this is rare): refused, and its publisher told.
                    cluster.stats.refused.fetch_add(1, Ordering::Relaxed);
                    cluster.lose(&p);
                }
            }
        }
    }
    let lost = seq.abandon();
    if !lost.is_empty() {
        cluster
            .stats
            .abandoned
            .fetch_add(lost.len() as u64, Ordering::Relaxed);
        warn!(
            publications = lost.len(),
            "cluster: stopping with publications NATS had not stored"
        );
        for p in &lost {
            cluster.release(p);
        }
    }
    for (_, task) in subs {
        task.abort();
    }
    for (_, f) in lock(&node.follows).drain() {
        if let Some((entry, _)) = f.hold {
            directory.release(entry);
        }
    }
    if cluster.connected.load(Ordering::Relaxed) {
        // What was published reaches NATS before the process ends (bounded:
        // a server that stopped answering does not hold the stop up).
        let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
    }
}

/// The stream's last sequence now (`u64::MAX` when it cannot be read:
/// then only what arrives live is taken as live).
async fn last_sequence(stream: Option<&stream::Stream>) -> u64 {
    let Some(stream) = stream else {
        return u64::MAX;
    };
    let mut stream = stream.clone();
    match tokio::time::timeout(Duration::from_millis(500), stream.info()).await {
        Ok(Ok(info)) => info.state.last_sequence,
        _ => u64::MAX,
    }
}

/// Attempts of one read in a fill while NATS is away (200 ms apart).
const FILL_RETRIES: u32 = 50;

/// After a reconnect: each topic followed here catches up with what the
/// stream stored while this node was away (its subscription was not in
/// NATS meanwhile). A topic nothing was handed on for yet (the stream held
/// nothing of it when the node began following it) catches up from the
/// stream's start: all it holds of the topic came after.
fn catch_up_all(node: &Arc<Node>) {
    let mut starts = Vec::new();
    {
        let mut follows = lock(&node.follows);
        for (name, f) in follows.iter_mut() {
            // (A topic seen only through a pattern, and nothing of it yet,
            // has no place in the stream to go on from.)
            if f.filling.is_some() {
                f.recheck = true;
            } else if f.synced || f.last_stream > 0 {
                f.filling = Some(Waiting::default());
                starts.push((Arc::clone(name), f.last_stream + 1));
            }
        }
    }
    for (topic, from) in starts {
        node.start_fill(topic, from, None);
    }
}

/// Reads `topic`'s messages from the stream from sequence `from` on, hands
/// them on (see [`Node::start_fill`]), then what waited behind the fill.
///
/// `first`: the node starts following the topic, and this is its first
/// fill, with the stream's last sequence taken before the node subscribed
/// (after its subscribers did): what the stream stored after that is
/// theirs live, even what never arrived live (the connection was cut
/// meanwhile, say); what it stored before is history only.
async fn fill(node: Arc<Node>, topic: Arc<str>, from: u64, first: Option<u64>) {
    // Just reconnected, the stream may not be known again yet: wait for it
    // (what arrives live meanwhile waits behind this fill).
    let mut stream = lock(&node.stream).clone();
    for _ in 0..FILL_RETRIES {
        if stream.is_some() || node.cluster.stop.load(Ordering::Acquire) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        stream = lock(&node.stream).clone();
    }
    let mut fetched: Vec<(Message, u64)> = Vec::new();
    let (initial, boundary) = (first.is_some(), first.unwrap_or(u64::MAX));
    if let Some(stream) = stream {
        let subject = publish_subject(&topic);
        let mut next = from.max(1);
        // NATS may be away for a moment (the connection that made this
        // fill necessary was cut, say): the client reconnects by itself,
        // and the read is tried again, for up to FILL_RETRIES × 200 ms.
        let mut retries = 0;
        while fetched.len() < node.fill_limit {
            match stream
                .direct_get_next_for_subject(subject.as_str(), Some(next))
                .await
            {
                Ok(m) => {
                    next = m.sequence + 1;
                    if let Some((_, msgs)) = decode(&m.subject, Some(&m.headers), &m.payload) {
                        fetched.extend(msgs.into_iter().map(|msg| (msg, m.sequence)));
                    }
                }
                Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => break,
                Err(e) if retries < FILL_RETRIES && !node.cluster.stop.load(Ordering::Acquire) => {
                    retries += 1;
                    tracing::debug!(error = %e, %topic, "cluster: reading a topic from the stream failed; trying again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    warn!(error = %e, %topic, "cluster: reading a topic from the stream failed; what is missing shows as a gap");
                    break;
                }
            }
        }
    }
    // Stopped at the bound, not at the stream's end: a catch-up goes on
    // from where this one ends (a first fill is bounded on purpose: what
    // it reads is history).
    let cut_short = !initial && fetched.len() >= node.fill_limit;
    let mut follows = lock(&node.follows);
    let f = node.follow(&mut follows, &topic);
    let newest = fetched.last().map_or(0, |m| m.1);
    if initial {
        // What arrived on the subscription is live (stored after the node's
        // interest was in NATS, so after its subscribers subscribed), and
        // so is what the stream stored after `boundary`: delivered below,
        // in order. The rest is history only.
        let first_live = f
            .filling
            .as_ref()
            .and_then(|w| w.iter().map(|i| i.stream_seq).find(|&s| s > 0))
            .unwrap_or(u64::MAX);
        let (older, live): (Vec<_>, Vec<_>) = fetched
            .into_iter()
            .partition(|m| m.1 < first_live && m.1 <= boundary);
        let last_older = older.last().map_or(0, |m| m.1);
        let older = older.into_iter().map(|m| m.0).collect();
        let _ = crate::pubsub::remote::fill(&node.directory, &node.bus, &topic, older);
        f.last_stream = f.last_stream.max(last_older);
        fetched = live;
    }
    for (msg, _) in fetched {
        node.deliver(&topic, msg);
    }
    f.last_stream = f.last_stream.max(newest);
    // What waited is handed on unless the fill already did: by its stream
    // message (one stream message may hold a batch of publications, all
    // with its sequence, and all waiting together).
    let handed_on = f.last_stream;
    let mut waiting = f.filling.take().unwrap_or_default().into_iter();
    while let Some(inc) = waiting.next() {
        if inc.stream_seq != 0 && inc.stream_seq <= handed_on {
            continue;
        }
        // A number skipped before this one: the NATS client dropped what
        // came between (its buffer was full while this fill ran). Read on
        // from the stream, the rest waiting, unless a fill from here did
        // already (what it did not find shows as a gap).
        let from = f.last_stream + 1;
        if let Some((epoch, seq)) = node.position(&topic)
            && inc.msg.epoch == epoch
            && inc.msg.seq > seq + 1
            && f.last_stream > 0
            && f.refilled_from != from
        {
            f.refilled_from = from;
            f.recheck = false;
            f.filling = Some(std::iter::once(inc).chain(waiting).collect());
            drop(follows);
            node.cluster.stats.missed.fetch_add(1, Ordering::Relaxed);
            node.start_fill(topic, from, None);
            return;
        }
        f.last_stream = f.last_stream.max(inc.stream_seq);
        node.deliver(&topic, inc.msg);
    }
    f.synced = true;
    if std::mem::take(&mut f.recheck) || cut_short {
        // Messages were dropped while this fill ran, perhaps the last of a
        // burst, which no later message would show missing; or the fill
        // read as much as one may.
        f.filling = Some(Waiting::default());
        let from = f.last_stream + 1;
        drop(follows);
        node.start_fill(topic, from, None);
        return;
    }
    // Where the topic stands here now (all of it was handed on by this
    // thread): what the next live message follows.
    f.last = node.position(&topic);
}

/// Resolves once the bridge is asked to stop.
async fn stopped(cluster: &Cluster) {
    while !cluster.stop.load(Ordering::Acquire) {
        tokio::select! {
            _ = cluster.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

fn retry_due(at: Option<tokio::time::Instant>) -> bool {
    at.is_some_and(|t| t <= tokio::time::Instant::now())
}

/// Starts `step` as a task; without the stream (NATS away), the topic
/// waits for the next resume instead.
fn start(
    step: Step,
    js: &jetstream::Context,
    stream: Option<&stream::Stream>,
    done: &tokio::sync::mpsc::UnboundedSender<Done>,
) {
    let done = done.clone();
    let Some(stream) = stream else {
        let topic = match step {
            Step::FetchLast { topic } => topic,
            Step::Publish { items, .. } => Arc::clone(&items[0].topic),
        };
        let _ = done.send(Done::Failed(topic, "not connected".into()));
        return;
    };
    match step {
        Step::FetchLast { topic } => {
            let stream = stream.clone();
            tokio::spawn(async move {
                let r = stream
                    .get_last_raw_message_by_subject(&publish_subject(&topic))
                    .await;
                let d = match r {
                    Ok(m) => {
                        let last = last_stored(&m.headers, m.sequence);
                        Done::Fetched(topic, Some(last))
                    }
                    Err(e)
                        if e.kind()
                            == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                    {
                        Done::Fetched(topic, None)
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            jetstream::stream::LastRawMessageErrorKind::JetStream(j)
                                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                        ) =>
                    {
                        Done::NoStream(topic)
                    }
                    Err(e) => Done::Failed(topic, e.to_string()),
                };
                let _ = done.send(d);
            });
        }
        Step::Publish {
            items,
            epoch,
            seq,
            expect,
        } => {
            let js = js.clone();
            tokio::spawn(async move {
                let first = &items[0];
                let mut h = HeaderMap::new();
                h.insert(H_EPOCH, epoch.to_string().as_str());
                h.insert(H_SEQ, seq.to_string().as_str());
                h.insert(H_AT, now_nanos().to_string().as_str());
                // The same publications tried again (after a timeout, always
                // together) are recognised by the stream, not stored twice.
                let id = if items.len() == 1 {
                    first.id.to_string()
                } else {
                    format!("{}+{}", first.id, items.len())
                };
                h.insert(header::NATS_MESSAGE_ID, id.as_str());
                h.insert(
                    header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                    expect.to_string().as_str(),
                );
                let payload = if items.len() == 1 {
                    h.insert(H_KIND, if first.text { "text" } else { "binary" });
                    if let Some(k) = &first.key {
                        h.insert(H_KEY, &**k);
                    }
                    first.payload.clone()
                } else {
                    h.insert(H_BATCH, items.len().to_string().as_str());
                    encode_batch(&items)
                };
                let subject = publish_subject(&first.topic);
                let topic = Arc::clone(&first.topic);
                let r = match js.publish_with_headers(subject, h, payload).await {
                    Ok(ack) => ack.await,
                    Err(e) => Err(e),
                };
                use jetstream::context::PublishErrorKind as K;
                let d = match r {
                    Ok(ack) if ack.duplicate => Done::Duplicate(topic),
                    Ok(ack) => Done::Acked(topic, ack.sequence),
                    Err(e) if e.kind() == K::WrongLastSequence => Done::Conflict(topic),
                    Err(e) if e.kind() == K::StreamNotFound => Done::NoStream(topic),
                    Err(e) if e.kind() == K::MaxPayloadExceeded => {
                        Done::Rejected(topic, e.to_string())
                    }
                    Err(e) => Done::Failed(topic, e.to_string()),
                };
                let _ = done.send(d);
            });
        }
    }
}

/// Applies how a step ended and starts what follows; `true` when the
/// stream is gone and must be ensured again.
fn finish(
    done: Done,
    cluster: &Cluster,
    seq: &mut Sequencer,
    js: &jetstream::Context,
    stream: Option<&stream::Stream>,
    tx: &tokio::sync::mpsc::UnboundedSender<Done>,
    retry_at: &mut Option<tokio::time::Instant>,
) -> bool {
    let mut no_stream = false;
    let next = match done {
        Done::Fetched(topic, last) => seq.fetched(&topic, last, now_micros()),
        Done::Acked(topic, stream_seq) => {
            let (stored, next) = seq.acked(&topic, stream_seq);
            for s in stored {
                cluster.stats.published.fetch_add(1, Ordering::Relaxed);
                cluster
                    .stats
                    .published_bytes
                    .fetch_add(s.payload_len as u64, Ordering::Relaxed);
                cluster.pending.fetch_sub(s.cost, Ordering::Relaxed);
                if let Some(a) = s.ack {
                    cluster.reply(
                        a.worker as usize,
                        Reply::Stored {
                            conn: a.conn,
                            request: a.request,
                            epoch: s.epoch,
                            seq: s.seq,
                        },
                    );
                }
            }
            next
        }
        Done::Conflict(topic) => {
            cluster.stats.conflicts.fetch_add(1, Ordering::Relaxed);
            seq.conflict(&topic)
        }
        Done::NoStream(topic) => {
            cluster.stats.failures.fetch_add(1, Ordering::Relaxed);
            seq.failed(&topic);
            no_stream = true;
            None
        }
        Done::Failed(topic, why) => {
            cluster.stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%topic, %why, "cluster: publication not stored yet; retrying");
            seq.failed(&topic);
            let at = tokio::time::Instant::now() + Duration::from_millis(200);
            *retry_at = Some(retry_at.map_or(at, |t| t.min(at)));
            None
        }
        Done::Duplicate(topic) => {
            let (stored, next) = seq.stored_before(&topic);
            for p in stored {
                cluster.stats.published.fetch_add(1, Ordering::Relaxed);
                cluster.release(&p);
            }
            next
        }
        Done::Rejected(topic, why) => {
            warn!(%topic, %why, "cluster: NATS refused a publication for good; dropped");
            let (dropped, next) = seq.drop_front(&topic);
            for p in dropped {
                cluster.stats.rejected.fetch_add(1, Ordering::Relaxed);
                cluster.lose(&p);
            }
            next
        }
    };
    if let Some(step) = next {
        start(step, js, stream, tx);
    }
    no_stream
}

/// Reads one interest subscription and injects what arrives.
async fn receive(mut sub: async_nats::Subscriber, node: Arc<Node>) {
    use futures_util::FutureExt;
    while let Some(m) = sub.next().await {
        // Backpressure: the mailboxes first. Polled, from 1 ms up to 16 ms
        // apart: one task per subscription polls, and thousands of them at
        // 1 ms would take the cores the workers need to drain.
        let mut pause = Duration::from_millis(1);
        while node.bus.max_queued_bytes() > node.high_water {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(16));
        }
        // What has arrived already goes in one batch (one send per
        // worker), so a burst is delivered as runs.
        let mut ready = vec![m];
        while ready.len() < MAX_BATCH {
            match sub.next().now_or_never() {
                Some(Some(m)) => ready.push(m),
                _ => break,
            }
        }
        let one = std::panic::AssertUnwindSafe(|| {
            let mut batch = Vec::with_capacity(ready.len());
            for m in ready {
                accept(&node, m, &mut batch);
            }
            node.deliver_batch(batch);
        });
        if std::panic::catch_unwind(one).is_err() {
            // A bug: what it held is lost here (its numbers will show as
            // a gap), the subscription goes on.
            tracing::error!(
                "cluster: a panic handling messages from NATS (a bug: please report it with the log)"
            );
        }
    }
}

/// The payload of a stream message carrying several publications.
fn encode_batch(items: &[super::sequencer::Pending]) -> bytes::Bytes {
    let size: usize = items
        .iter()
        .map(|p| 7 + p.payload.len() + p.key.as_deref().map_or(0, str::len))
        .sum();
    let mut out = Vec::with_capacity(size);
    for p in items {
        out.push(if p.text { 1 } else { 2 });
        let key = p.key.as_deref().unwrap_or("").as_bytes();
        let key = &key[..key.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(key.len() as u16).to_be_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(&(p.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&p.payload);
    }
    bytes::Bytes::from(out)
}

/// The publications of a batch payload: (text, key, payload) each;
/// `None` if it does not parse as `n` of them exactly.
/// One publication of a batch: text or not, its key, its payload.
type Item<'a> = (bool, Option<Arc<str>>, &'a [u8]);

fn decode_batch(mut b: &[u8], n: usize) -> Option<Vec<Item<'_>>> {
    let mut out = Vec::with_capacity(n.min(MAX_DECODED));
    for _ in 0..n {
        let (&kind, rest) = b.split_first()?;
        let text = match kind {
            1 => true,
            2 => false,
            _ => return None,
        };
        let (kl, rest) = rest.split_first_chunk::<2>()?;
        let kl = u16::from_be_bytes(*kl) as usize;
        let (key, rest) = rest.split_at_checked(kl)?;
        let key = if key.is_empty() {
            None
        } else {
            // A key none of ours could have sent: the message is not ours.
            let key = std::str::from_utf8(key).ok().filter(|k| topic::key_ok(k))?;
            Some(Arc::<str>::from(key))
        };
        let (len, rest) = rest.split_first_chunk::<4>()?;
        let len = u32::from_be_bytes(*len) as usize;
        let (payload, rest) = rest.split_at_checked(len)?;
        out.push((text, key, payload));
        b = rest;
    }
    b.is_empty().then_some(out)
}

/// Most publications one decoded message may carry (what a stream message
/// of ours holds; more is not ours).
const MAX_DECODED: usize = super::sequencer::MAX_BATCH;

/// Numbers of ours stay below 2^53: exact in every JSON reader, and far
/// from wrapping when the sequencer counts on from the stream's last.
const MAX_SEQ: u64 = 1 << 53;
/// How far ahead of this node's clock an epoch (the microsecond a topic's
/// numbering began, by the clock of the node that began it) may be.
const EPOCH_AHEAD_MICROS: u64 = 24 * 3600 * 1_000_000;
/// Longest topic name taken from the cluster (the binary envelope's
/// 16-bit length); its characters are checked like a local name's.
const MAX_REMOTE_TOPIC_LEN: usize = u16::MAX as usize;

/// Whether `count` publications numbered from `first` in `epoch` could be
/// ours. A message of the stream claiming more (a NATS client publishing
/// to our subjects by hand, or a misconfigured one) is foreign: adopted,
/// its position would make every later number of the topic look old
/// everywhere, or wrap the sequencer's count.
fn position_ok(epoch: u64, first: u64, count: u64) -> bool {
    first >= 1
        && first.saturating_add(count) <= MAX_SEQ
        && epoch <= now_micros().saturating_add(EPOCH_AHEAD_MICROS)
}

/// Where a topic's numbering stands after the stream's last message for
/// it (headers `h`, at stream sequence `stream_seq`): that message's last
/// number, or, when it is not a message of ours (published there by
/// something else, or claiming a position none of ours could have), 0 in
/// a new epoch, so the numbers start over after it.
fn last_stored(h: &HeaderMap, stream_seq: u64) -> Last {
    // A batch's header numbers its first.
    match (header_u64(h, H_EPOCH), header_u64(h, H_SEQ), carried(h)) {
        (Some(epoch), Some(seq), Some(count)) if position_ok(epoch, seq, count as u64) => Last {
            epoch,
            seq: seq + count as u64 - 1,
            stream_seq,
        },
        _ => Last {
            epoch: now_micros(),
            seq: 0,
            stream_seq,
        },
    }
}

/// How many publications a stream message carries by its headers: one
/// without `Corecast-Batch`, else the batch's count if it is 1 to
/// [`MAX_DECODED`]; `None`: not a message of ours.
fn carried(h: &HeaderMap) -> Option<usize> {
    match h.get(H_BATCH) {
        None => Some(1),
        Some(n) => n
            .as_str()
            .parse()
            .ok()
            .filter(|n| (1..=MAX_DECODED).contains(n)),
    }
}

/// The topic a subject of ours names, if it is a name a client could use
/// here (a topic, not a pattern; its characters are written into JSON
/// envelopes unescaped).
fn remote_topic(subject: &str) -> Option<String> {
    let name = topic_of(subject)?;
    topic::validate(&name, MAX_REMOTE_TOPIC_LEN).ok()?;
    Some(name)
}

/// A message of ours as the fan-out takes it: its topic and the message
/// (framed once, numbered); `None` for anything else.
fn decode(
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Option<(String, Vec<Message>)> {
    let topic = remote_topic(subject)?;
    let h = headers?;
    let (epoch, number) = (header_u64(h, H_EPOCH)?, header_u64(h, H_SEQ)?);
    let count = carried(h)?;
    if !position_ok(epoch, number, count as u64) {
        return None;
    }
    // Its age by the publishing node's clock (history ages), at most now.
    let now = Instant::now();
    let at = header_u64(h, H_AT)
        .and_then(|at| now.checked_sub(Duration::from_nanos(now_nanos().saturating_sub(at))))
        .unwrap_or(now);
    let message = |i: usize, text: bool, key: Option<Arc<str>>, payload: &[u8]| {
        let opcode = if text { OpCode::Text } else { OpCode::Binary };
        let mut msg =
            Message::new(bytes::Bytes::from(server_frame(opcode, payload)), at).with_key(key);
        msg.epoch = epoch;
        msg.seq = number + i as u64;
        msg
    };
    // A text publication of ours is UTF-8 (checked where it was published):
    // one that is not would go out as a text frame every client must fail
    // (RFC 6455 §8.1), and stay on as the topic's last value.
    let utf8 = |text: bool, p: &[u8]| !text || crate::proto::utf8::validate(p).is_ok();
    let msgs = if h.get(H_BATCH).is_some() {
        let items = decode_batch(payload, count)?;
        if !items.iter().all(|(text, _, p)| utf8(*text, p)) {
            return None;
        }
        items
            .into_iter()
            .enumerate()
            .map(|(i, (text, key, p))| message(i, text, key, p))
            .collect()
    } else {
        let text = h.get(H_KIND).is_some_and(|k| k.as_str() == "text");
        let key = match h.get(H_KEY) {
            Some(k) if !topic::key_ok(k.as_str()) => return None,
            k => k.map(|k| Arc::<str>::from(k.as_str())),
        };
        if !utf8(text, payload) {
            return None;
        }
        vec![message(0, text, key, payload)]
    };
    Some((topic, msgs))
}

/// The stream sequence of a live message the stream republished: the
/// republish names our stream and the message's place in it. `None` for
/// anything else on our subjects, such as a NATS client publishing to
/// them by hand (which could otherwise claim any position: one number far
/// ahead made every later publication of the topic look handed on
/// already, on every node).
fn republished(h: Option<&HeaderMap>) -> Option<u64> {
    let h = h?;
    if h.get(header::NATS_STREAM)?.as_str() != super::STREAM {
        return None;
    }
    h.get(header::NATS_SEQUENCE)?
        .as_str()
        .parse()
        .ok()
        .filter(|&n| n >= 1)
}

/// One message from the cluster into the fan-out.
fn accept(node: &Arc<Node>, m: async_nats::Message, batch: &mut Vec<(String, Message)>) {
    let stats = &node.cluster.stats;
    stats.received.fetch_add(1, Ordering::Relaxed);
    stats
        .received_bytes
        .fetch_add(m.payload.len() as u64, Ordering::Relaxed);
    let decoded = decode(&m.subject, m.headers.as_ref(), &m.payload);
    let (Some((topic, msgs)), Some(stream_seq)) = (decoded, republished(m.headers.as_ref())) else {
        stats.foreign.fetch_add(1, Ordering::Relaxed);
        return;
    };
    if let Some(at) = m.headers.as_ref().and_then(|h| header_u64(h, H_AT)) {
        stats
            .latency
            .observe(Duration::from_nanos(now_nanos().saturating_sub(at)));
    }
    // The stream sequence of the topic's message before this one (the
    // republish says): another than the last handed on here means some
    // were missed (this node's connection was cut, say, while others
    // published), and they are read from the stream first.
    let previous: Option<u64> = m
        .headers
        .as_ref()
        .and_then(|h| h.get(header::NATS_LAST_SEQUENCE))
        .and_then(|v| v.as_str().parse().ok());
    let mut follows = lock(&node.follows);
    let f = node.follow(&mut follows, &topic);
    if f.filling.is_none()
        && (f.synced || f.last_stream > 0)
        && previous.is_some_and(|p| p > f.last_stream)
    {
        stats.missed.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        f.filling = Some(
            msgs.into_iter()
                .map(|mut msg| {
                    msg.published_at = now;
                    Incoming { msg, stream_seq }
                })
                .collect(),
        );
        let from = f.last_stream + 1;
        drop(follows);
        node.start_fill(Arc::from(topic.as_str()), from, None);
        return;
    }
    let mut msgs = msgs.into_iter();
    while let Some(mut msg) = msgs.next() {
        // Live: its latency here counts from now.
        msg.published_at = Instant::now();
        if let Some(waiting) = f.filling.as_mut() {
            if !waiting.push(Incoming { msg, stream_seq }) {
                stats.gaps.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        if let Some((epoch, seq)) = f.last {
            if msg.epoch < epoch || (msg.epoch == epoch && msg.seq <= seq) {
                // Handed on already (a topic's and a pattern's subscription).
                stats.duplicates.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // A number skipped: what was missed is read from the stream
            // first (what this batch holds before it is handed on first),
            // then this message and the rest of its stream message.
            let skipped = msg.epoch == epoch && msg.seq > seq + 1;
            if skipped && f.last_stream > 0 {
                let waiting = std::iter::once(Incoming { msg, stream_seq })
                    .chain(msgs.by_ref().map(|msg| Incoming { msg, stream_seq }))
                    .collect();
                f.filling = Some(waiting);
                let from = f.last_stream + 1;
                drop(follows);
                node.start_fill(Arc::from(topic.as_str()), from, None);
                return;
            }
        }
        f.last = Some((msg.epoch, msg.seq));
        f.last_stream = f.last_stream.max(stream_seq);
        batch.push((topic.clone(), msg));
    }
}

#[cfg(test)]
mod tests {
    use super::super::sequencer::Pending;
    use super::*;

    fn item(text: bool, key: Option<&str>, p: &[u8]) -> Pending {
        Pending {
            id: Arc::from("x"),
            topic: Arc::from("t"),
            payload: bytes::Bytes::copy_from_slice(p),
            text,
            key: key.map(Arc::from),
            ack: None,
        }
    }

    /// A batch reads back as written, and anything else (cut short, one
    /// byte more, another count, an unknown kind) is refused whole.
    #[test]
    fn batches_read_back_exactly_or_not_at_all() {
        let items = [
            item(true, None, b"hi"),
            item(false, Some("k1"), &[0, 255]),
            item(true, None, b""),
        ];
        let b = encode_batch(&items);
        let got = decode_batch(&b, 3).unwrap();
        let want: Vec<Item<'_>> = vec![
            (true, None, b"hi"),
            (false, Some(Arc::from("k1")), &[0, 255]),
            (true, None, b""),
        ];
        assert_eq!(got, want);
        for cut in 0..b.len() {
            assert!(decode_batch(&b[..cut], 3).is_none(), "cut at {cut}");
        }
        let mut longer = b.to_vec();
        longer.push(0);
        assert!(decode_batch(&longer, 3).is_none());
        assert!(decode_batch(&b, 2).is_none());
        assert!(decode_batch(&b, 4).is_none());
        let mut bad = b.to_vec();
        bad[0] = 9;
        assert!(decode_batch(&bad, 3).is_none());
    }

    /// Numbers run on through a batch; its size is checked before use.
    #[test]
    fn a_batch_message_numbers_its_publications_in_order() {
        let mut h = HeaderMap::new();
        h.insert(H_EPOCH, "5");
        h.insert(H_SEQ, "41");
        h.insert(H_BATCH, "2");
        let payload = encode_batch(&[item(true, None, b"a"), item(false, None, b"b")]);
        let (topic, msgs) = decode("corecast.t.x.y", Some(&h), &payload).unwrap();
        assert_eq!(topic, "x.y");
        assert_eq!(
            msgs.iter().map(|m| (m.epoch, m.seq)).collect::<Vec<_>>(),
            [(5, 41), (5, 42)]
        );
        assert_eq!(msgs[0].payload(), (OpCode::Text, &b"a"[..]));
        assert_eq!(msgs[1].payload(), (OpCode::Binary, &b"b"[..]));
        h.insert(H_BATCH, "0");
        assert!(decode("corecast.t.x", Some(&h), &payload).is_none());
        h.insert(H_BATCH, "99999");
        assert!(decode("corecast.t.x", Some(&h), &payload).is_none());
    }

    /// What waits behind a fill is bounded in bytes as well as in count:
    /// a topic of large messages cannot make the node hold 65 536 of them.
    #[test]
    fn what_waits_behind_a_fill_is_bounded_in_bytes_and_count() {
        let inc = |len: usize| Incoming {
            msg: Message::new(bytes::Bytes::from(vec![0u8; len]), Instant::now()),
            stream_seq: 1,
        };
        let mut w = Waiting::default();
        assert!(w.push(inc(MAX_WAITING_BYTES + 1)), "the first always waits");
        assert!(!w.push(inc(1)));
        let mut w = Waiting::default();
        let big = 1 << 20;
        let fit = MAX_WAITING_BYTES / big;
        for _ in 0..fit {
            assert!(w.push(inc(big)));
        }
        assert!(!w.push(inc(big)), "past the bytes");
        assert_eq!(w.bytes, fit * big);
        let mut w = Waiting::default();
        for _ in 0..MAX_WAITING {
            assert!(w.push(inc(1)));
        }
        assert!(!w.push(inc(1)), "past the count");
        let again: Waiting = w.into_iter().take(3).collect();
        assert_eq!((again.items.len(), again.bytes), (3, 3));
    }

    /// What a NATS client publishing to our subjects by hand (or a
    /// misconfigured one) could send is not taken: a position that would
    /// make every later number of the topic look old everywhere (or wrap
    /// the sequencer's count), a name no client could use here (a pattern,
    /// characters written into JSON unescaped), a key none of ours could
    /// have. The stream's last such message starts the numbering over in a
    /// new epoch instead of going on from it.
    #[test]
    fn a_message_claiming_what_ours_never_do_is_foreign() {
        let single = |epoch: &str, seq: &str, key: Option<&str>| {
            let mut h = HeaderMap::new();
            h.insert(H_EPOCH, epoch);
            h.insert(H_SEQ, seq);
            if let Some(k) = key {
                h.insert(H_KEY, k);
            }
            h
        };
        let now = now_micros().to_string();
        assert!(decode("corecast.t.x", Some(&single(&now, "7", Some("k"))), b"p").is_some());
        let max = u64::MAX.to_string();
        let top = MAX_SEQ.to_string();
        let far = (now_micros() + 2 * EPOCH_AHEAD_MICROS).to_string();
        for (why, h) in [
            ("number 0", single(&now, "0", None)),
            ("the largest number", single(&now, &max, None)),
            ("at 2^53", single(&now, &top, None)),
            ("an epoch two days ahead", single(&far, "1", None)),
            ("a key with a space", single(&now, "1", Some("a b"))),
        ] {
            assert!(decode("corecast.t.x", Some(&h), b"p").is_none(), "{why}");
        }
        let h = single(&now, "1", None);
        for subject in [
            r#"corecast.t.x""#,
            "corecast.t.x\u{e9}",
            r#"corecast.t.news.x","topic":"bank"#,
            "corecast.t.news.>",
            "corecast.t.a*",
        ] {
            assert!(decode(subject, Some(&h), b"p").is_none(), "{subject}");
        }
        // Text that is not UTF-8, alone or in a batch (outside probe: it
        // went out in text frames and stayed on as the last value).
        let mut text = single(&now, "1", None);
        text.insert(H_KIND, "text");
        assert!(decode("corecast.t.x", Some(&text), "caf\u{e9}".as_bytes()).is_some());
        assert!(decode("corecast.t.x", Some(&text), b"\xc3(bad").is_none());
        let mut binary = single(&now, "1", None);
        binary.insert(H_KIND, "binary");
        assert!(decode("corecast.t.x", Some(&binary), b"\xc3(bad").is_some());
        let mut batch = single(&now, "1", None);
        batch.insert(H_BATCH, "2");
        let good = encode_batch(&[item(true, None, b"a"), item(false, None, b"\xff")]);
        assert!(decode("corecast.t.x", Some(&batch), &good).is_some());
        let bad = encode_batch(&[item(true, None, b"a"), item(true, None, b"\xff")]);
        assert!(decode("corecast.t.x", Some(&batch), &bad).is_none());
        // A batch running past 2^53 from a number below it.
        let mut h = single(&now, &(MAX_SEQ - 1).to_string(), None);
        h.insert(H_BATCH, "2");
        let payload = encode_batch(&[item(true, None, b"a"), item(true, None, b"b")]);
        assert!(decode("corecast.t.x", Some(&h), &payload).is_none());
        h.insert(H_SEQ, (MAX_SEQ - 2).to_string().as_str());
        assert!(decode("corecast.t.x", Some(&h), &payload).is_some());
        // The stream's last message: ours goes on, a poisoned one starts over.
        h.insert(H_EPOCH, "5");
        h.insert(H_SEQ, "41");
        let last = last_stored(&h, 9);
        assert_eq!((last.epoch, last.seq, last.stream_seq), (5, 42, 9));
        h.insert(H_BATCH, &*max);
        let over = last_stored(&h, 10);
        assert!(over.epoch >= now_micros() - 60_000_000 && over.seq == 0);
        let poisoned = last_stored(&single("5", &max, None), 11);
        assert_eq!((poisoned.seq, poisoned.stream_seq), (0, 11));
        assert!(poisoned.epoch > 5, "a new epoch, later than the old");
    }
    /// Only what the stream republished is live: a message on our subjects
    /// without the republish's stream and sequence is not ours.
    #[test]
    fn a_live_message_is_the_streams_republish() {
        let mut h = HeaderMap::new();
        assert_eq!(republished(None), None);
        assert_eq!(republished(Some(&h)), None, "published by hand");
        h.insert(header::NATS_SEQUENCE, "7");
        assert_eq!(republished(Some(&h)), None, "no stream named");
        h.insert(header::NATS_STREAM, "OTHER");
        assert_eq!(republished(Some(&h)), None, "another stream");
        h.insert(header::NATS_STREAM, super::super::STREAM);
        assert_eq!(republished(Some(&h)), Some(7));
        for bad in ["0", "-1", "x", ""] {
            h.insert(header::NATS_SEQUENCE, bad);
            assert_eq!(republished(Some(&h)), None, "{bad:?}");
        }
    }

    /// Recovery holds at their bound: the one that runs out first gives
    /// way (a renewal counts from its own time), never the new one, so a
    /// client asking for fresh names cannot keep every other recovery out
    /// (before: refused while 10 000 were held). Holds run out in time
    /// order, each once.
    #[test]
    fn the_oldest_recovery_hold_gives_way_to_a_new_one() {
        let directory = Directory::new();
        let mut follows: HashMap<Arc<str>, Follow> = HashMap::new();
        let mut holds = Holds::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let hold = |holds: &mut Holds, follows: &mut HashMap<Arc<str>, Follow>, name: &str, t| {
            let renewing = follows.get(name).is_some_and(|f| f.hold.is_some());
            let evicted = if renewing {
                None
            } else {
                holds.make_room(follows, 2).map(|(n, e)| {
                    directory.release(e);
                    n.to_string()
                })
            };
            let f = follows.entry(Arc::from(name)).or_default();
            if let Some(e) = holds.set(f, name, directory.entry(name), t) {
                directory.release(e);
            }
            evicted
        };
        assert_eq!(hold(&mut holds, &mut follows, "a", at(30)), None);
        assert_eq!(hold(&mut holds, &mut follows, "b", at(31)), None);
        // "a" renewed: "b" now runs out first.
        assert_eq!(hold(&mut holds, &mut follows, "a", at(32)), None);
        // Within a second of the last listing: not listed again.
        assert_eq!(hold(&mut holds, &mut follows, "a", at(32)), None);
        assert_eq!(holds.order.len(), 3);
        assert_eq!(holds.count, 2);
        assert_eq!(
            hold(&mut holds, &mut follows, "c", at(33)).as_deref(),
            Some("b")
        );
        assert!(follows["b"].hold.is_none() && follows["c"].hold.is_some());
        assert_eq!(holds.count, 2);
        // Nothing ran out at 31 ("a" was renewed to 32; "b" is gone).
        assert!(holds.expire(&mut follows, at(31)).is_empty());
        let out: Vec<String> = holds
            .expire(&mut follows, at(40))
            .into_iter()
            .map(|(n, e)| {
                directory.release(e);
                n.to_string()
            })
            .collect();
        assert_eq!(out, ["a", "c"]);
        assert_eq!(holds.count, 0);
        assert!(holds.order.is_empty());
        assert!(holds.make_room(&mut follows, 2).is_none());
    }
}
