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
//! - **Publications out.** Through the [`Sequencer`]: one in flight per
//!   topic, numbered and checked by the stream.
//! - **Publications in.** Each message received is decoded (topic, epoch,
//!   number, kind, key), framed once, and injected; while any worker's
//!   mailbox is over its high-water mark, the bridge stops reading (the
//!   client buffers, then NATS drops for this slow consumer: a gap the
//!   numbers show).

use super::sequencer::{Last, Sequencer, Step};
use super::subject::{IN_PREFIX, OUT_PREFIX, interest_subject, publish_subject, topic_of};
use super::{Cluster, Reply, STREAM};
use crate::proto::frame::{OpCode, server_frame};
use crate::pubsub::bus::Bus;
use crate::pubsub::directory::{Adopt, Directory};
use crate::pubsub::envelope::Message;
use crate::pubsub::remote::{Injected, inject};
use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, header};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{info, warn};

const H_EPOCH: &str = "Corecast-Epoch";
const H_SEQ: &str = "Corecast-Seq";
const H_KIND: &str = "Corecast-Kind";
const H_KEY: &str = "Corecast-Key";
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

async fn run(
    cluster: Arc<Cluster>,
    directory: Arc<Directory>,
    bus: Arc<Bus>,
    settings: StreamSettings,
    high_water: usize,
) {
    let client = match connect(&cluster).await {
        Ok(c) => c,
        Err(e) => {
            // Only a bad setting gets here (the connection itself is
            // retried in the background): nothing will ever flow.
            tracing::error!(error = %e, "cluster: cannot use --nats-url; publications are refused");
            cluster.settings_failed();
            return;
        }
    };
    let js = jetstream::new(client.clone());
    let mut seq = Sequencer::new(usize::MAX);
    let mut stream: Option<stream::Stream> = None;
    let mut subs: HashMap<(Box<str>, bool), tokio::task::AbortHandle> = HashMap::new();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Done>();
    let mut retry_at: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
    let mut backoff = Duration::from_millis(100);
    let mut stopping: Option<Instant> = None;
    loop {
        // The stream, after each (re)connect.
        if stream.is_none() && cluster.connected.load(Ordering::Relaxed) && retry_due(retry_at) {
            match ensure_stream(&js, settings).await {
                Ok(s) => {
                    stream = Some(s);
                    cluster
                        .max_payload
                        .store(client.server_info().max_payload, Ordering::Relaxed);
                    cluster.ready.store(true, Ordering::Relaxed);
                    backoff = Duration::from_millis(100);
                    retry_at = None;
                    for step in seq.resume() {
                        start(step, &js, stream.as_ref(), &done_tx);
                    }
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
            retry_at = Some(tokio::time::Instant::now());
        }
        if stream.is_some() && retry_due(retry_at) {
            retry_at = None;
            for step in seq.resume() {
                start(step, &js, stream.as_ref(), &done_tx);
            }
        }
        if cluster.stop.load(Ordering::Acquire) {
            let since = *stopping.get_or_insert_with(Instant::now);
            if seq.queued() == 0 || since.elapsed() >= STOP_GRACE || stream.is_none() {
                break;
            }
        }
        let sleep_until =
            retry_at.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_millis(250));
        tokio::select! {
            _ = cluster.wake.notified() => {}
            Some(done) = done_rx.recv() => {
                finish(done, &cluster, &mut seq, &js, stream.as_ref(), &done_tx, &mut retry_at);
                while let Ok(done) = done_rx.try_recv() {
                    finish(done, &cluster, &mut seq, &js, stream.as_ref(), &done_tx, &mut retry_at);
                }
            }
            _ = tokio::time::sleep_until(sleep_until) => {}
        }
        let (publications, interest) = {
            let mut inbox = cluster.inbox();
            (
                std::mem::take(&mut inbox.publications),
                std::mem::take(&mut inbox.interest),
            )
        };
        let mut subscribed = false;
        for (name, pattern) in interest {
            let held = if pattern {
                directory.pattern_held(&name)
            } else {
                directory.topic_held(&name)
            };
            let key = (name, pattern);
            match (held, subs.contains_key(&key)) {
                (true, false) => match client.subscribe(interest_subject(&key.0)).await {
                    Ok(sub) => {
                        let task = tokio::spawn(receive(
                            sub,
                            Arc::clone(&cluster),
                            Arc::clone(&directory),
                            Arc::clone(&bus),
                            high_water,
                        ));
                        subs.insert(key, task.abort_handle());
                        subscribed = true;
                    }
                    Err(e) => warn!(error = %e, topic = %key.0, "cluster: cannot subscribe"),
                },
                (false, true) => {
                    if let Some(task) = subs.remove(&key) {
                        // Dropping the subscriber unsubscribes.
                        task.abort();
                    }
                }
                _ => {}
            }
        }
        if subscribed {
            // A round trip: NATS has every new subscription once the gauge
            // counts it (a publication anywhere after that reaches us).
            let _ = client.flush().await;
        }
        cluster
            .stats
            .subscriptions
            .store(subs.len() as u64, Ordering::Relaxed);
        for p in publications {
            match seq.push(p) {
                Ok(Some(step)) => start(step, &js, stream.as_ref(), &done_tx),
                Ok(None) => {}
                Err(p) => cluster.release(&p),
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
    let _ = client.flush().await;
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
            Step::Publish { item, .. } => item.topic,
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
                        let last = match (
                            header_u64(&m.headers, H_EPOCH),
                            header_u64(&m.headers, H_SEQ),
                        ) {
                            (Some(epoch), Some(seq)) => Last {
                                epoch,
                                seq,
                                stream_seq: m.sequence,
                            },
                            // Something else published there: our numbers start over after it.
                            _ => Last {
                                epoch: now_micros(),
                                seq: 0,
                                stream_seq: m.sequence,
                            },
                        };
                        Done::Fetched(topic, Some(last))
                    }
                    Err(e)
                        if e.kind()
                            == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                    {
                        Done::Fetched(topic, None)
                    }
                    Err(e) => Done::Failed(topic, e.to_string()),
                };
                let _ = done.send(d);
            });
        }
        Step::Publish {
            item,
            epoch,
            seq,
            expect,
        } => {
            let js = js.clone();
            tokio::spawn(async move {
                let mut h = HeaderMap::new();
                h.insert(H_EPOCH, epoch.to_string().as_str());
                h.insert(H_SEQ, seq.to_string().as_str());
                h.insert(H_KIND, if item.text { "text" } else { "binary" });
                if let Some(k) = &item.key {
                    h.insert(H_KEY, &**k);
                }
                h.insert(H_AT, now_nanos().to_string().as_str());
                // The same publication tried again (after a timeout) is
                // recognised by the stream, not stored twice.
                h.insert(header::NATS_MESSAGE_ID, &*item.id);
                h.insert(
                    header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                    expect.to_string().as_str(),
                );
                let subject = publish_subject(&item.topic);
                let topic = Arc::clone(&item.topic);
                let r = match js
                    .publish_with_headers(subject, h, item.payload.clone())
                    .await
                {
                    Ok(ack) => ack.await,
                    Err(e) => Err(e),
                };
                use jetstream::context::PublishErrorKind as K;
                let d = match r {
                    Ok(ack) if ack.duplicate => Done::Duplicate(topic),
                    Ok(ack) => Done::Acked(topic, ack.sequence),
                    Err(e) if e.kind() == K::WrongLastSequence => Done::Conflict(topic),
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

/// Applies how a step ended and starts what follows.
fn finish(
    done: Done,
    cluster: &Cluster,
    seq: &mut Sequencer,
    js: &jetstream::Context,
    stream: Option<&stream::Stream>,
    tx: &tokio::sync::mpsc::UnboundedSender<Done>,
    retry_at: &mut Option<tokio::time::Instant>,
) {
    let next = match done {
        Done::Fetched(topic, last) => seq.fetched(&topic, last, now_micros()),
        Done::Acked(topic, stream_seq) => {
            let (stored, next) = seq.acked(&topic, stream_seq);
            if let Some(s) = stored {
                cluster.stats.published.fetch_add(1, Ordering::Relaxed);
                cluster
                    .stats
                    .published_bytes
                    .fetch_add(s.payload_len as u64, Ordering::Relaxed);
                cluster.pending.fetch_sub(s.cost, Ordering::Relaxed);
                if let Some(a) = s.ack {
                    cluster.reply(
                        a.worker,
                        Reply::Stored {
                            conn: a.conn,
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
            if let Some(p) = stored {
                cluster.stats.published.fetch_add(1, Ordering::Relaxed);
                cluster.release(&p);
            }
            next
        }
        Done::Rejected(topic, why) => {
            warn!(%topic, %why, "cluster: NATS refused a publication for good; dropped");
            cluster.stats.rejected.fetch_add(1, Ordering::Relaxed);
            let (dropped, next) = seq.drop_front(&topic);
            if let Some(p) = dropped {
                cluster.release(&p);
            }
            next
        }
    };
    if let Some(step) = next {
        start(step, js, stream, tx);
    }
}

/// Reads one interest subscription and injects what arrives.
async fn receive(
    mut sub: async_nats::Subscriber,
    cluster: Arc<Cluster>,
    directory: Arc<Directory>,
    bus: Arc<Bus>,
    high_water: usize,
) {
    while let Some(m) = sub.next().await {
        // Backpressure: the mailboxes first.
        while bus.max_queued_bytes() > high_water {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let one = std::panic::AssertUnwindSafe(|| accept(&cluster, &directory, &bus, m));
        if std::panic::catch_unwind(one).is_err() {
            // A bug on one message: it is lost here (its number will show
            // as a gap), the subscription goes on.
            tracing::error!(
                "cluster: a panic handling a message from NATS (a bug: please report it with the log)"
            );
        }
    }
}

/// One message from the cluster into the fan-out.
fn accept(cluster: &Cluster, directory: &Directory, bus: &Bus, m: async_nats::Message) {
    let stats = &cluster.stats;
    stats.received.fetch_add(1, Ordering::Relaxed);
    stats
        .received_bytes
        .fetch_add(m.payload.len() as u64, Ordering::Relaxed);
    let Some(topic) = topic_of(&m.subject) else {
        stats.foreign.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let Some(h) = m.headers.as_ref() else {
        stats.foreign.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let (Some(epoch), Some(number)) = (header_u64(h, H_EPOCH), header_u64(h, H_SEQ)) else {
        stats.foreign.fetch_add(1, Ordering::Relaxed);
        return;
    };
    if number == 0 {
        stats.foreign.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if let Some(at) = header_u64(h, H_AT) {
        let now = now_nanos();
        stats
            .latency
            .observe(Duration::from_nanos(now.saturating_sub(at)));
    }
    let text = h.get(H_KIND).is_some_and(|k| k.as_str() == "text");
    let opcode = if text { OpCode::Text } else { OpCode::Binary };
    let key = h.get(H_KEY).map(|k| Arc::<str>::from(k.as_str()));
    let mut msg = Message::new(
        bytes::Bytes::from(server_frame(opcode, &m.payload)),
        Instant::now(),
    )
    .with_key(key);
    msg.epoch = epoch;
    msg.seq = number;
    match inject(directory, bus, &topic, msg) {
        Injected::Delivered { wakes, step, lost } => {
            let mut w = wakes;
            while w != 0 {
                bus.wake(w.trailing_zeros() as usize);
                w &= w - 1;
            }
            match step {
                Adopt::Gap => {
                    stats.gaps.fetch_add(1, Ordering::Relaxed);
                }
                Adopt::Restart => {
                    stats.restarts.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            let _ = lost;
        }
        Injected::Duplicate => {
            stats.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        Injected::NoInterest => {}
    }
}
