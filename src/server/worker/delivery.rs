//! The fan-out half of a worker's turn: this turn's publications out to
//! the mailboxes, the mailbox into subscribers' queues (bounded per turn),
//! the budget's share of what the shard holds, throttled and paced
//! publishers resumed, and what an exiting worker leaves undelivered.

use super::conflation::{Full, Tables};
use super::*;
use crate::proto::handshake::Status;
use crate::pubsub::envelope::{CompressRoom, Form};
use crate::pubsub::remote::Refused;
use crate::pubsub::shard::TopicView;
use crate::server::cluster::Reply;
use crate::server::config::SlowConsumerPolicy;

impl<S> Core<S> {
    /// Sends this turn's publications to the interested workers' mailboxes
    /// (this one's included); returns the workers to wake (bit `w`), which
    /// the caller wakes before [`Self::deliver`] so that they work while
    /// this one delivers. The core itself performs no wake-up.
    pub fn dispatch(&mut self) -> u64 {
        self.shard.dispatch();
        let lost = self.shard.take_lost();
        if lost > 0 {
            self.stats().undelivered(Undelivered::WorkerStopped, lost);
        }
        self.queue_acks();
        if self.shared.cluster.is_some() {
            self.cluster_answers();
        }
        self.shard.take_wakes()
    }

    /// In a cluster: acknowledgements of what the cluster numbered, and
    /// the publishers whose publications it refused, which are closed
    /// (1013: it is unreachable or slow; 1009: larger than NATS takes).
    fn cluster_answers(&mut self) {
        let (refused, publishers) = self.shard.take_refused();
        if refused > 0 {
            debug!(
                worker = self.id,
                refused, "publications refused by the cluster link"
            );
        }
        for ((key, serial), why) in publishers {
            if !self.is_current(key, serial) || self.conns[key].state != IoState::Active {
                continue;
            }
            let (code, reason) = match why {
                Refused::Busy => (CloseCode::TRY_AGAIN_LATER, "cluster unavailable"),
                Refused::TooLarge => (
                    CloseCode::MESSAGE_TOO_BIG,
                    "message larger than the cluster takes",
                ),
            };
            let stats = &self.shared.stats[self.id];
            stats.ws_failure(code.0);
            self.conns[key]
                .session
                .abort(code, Status::ServiceUnavailable, reason, stats);
            self.recharge(key);
            self.start_closing(key);
        }
        let Some(cluster) = self.shared.cluster.clone() else {
            return;
        };
        for reply in cluster.take_replies(self.id) {
            let ((key, serial), request, answer) = match reply {
                Reply::Stored {
                    conn,
                    request,
                    epoch,
                    seq,
                } => (conn, request, Confirm::Stored { epoch, seq }),
                Reply::Lost { conn, request } => (conn, request, Confirm::Refused),
            };
            if !self.is_current(key, serial) {
                continue;
            }
            let session = &self.conns[key].session;
            if session.confirming() {
                // An HTTP publisher waiting for this very request's answer
                // (a late one, after its 202, is not the next request's).
                if session.requests() == request && self.conns[key].state == IoState::Active {
                    self.confirm(key, answer, false);
                }
            } else if let Confirm::Stored { epoch, seq } = answer
                && request == 0
            {
                // A WebSocket publisher's acknowledgement (an HTTP
                // request's late number, after its 202, answers nothing).
                self.ack((key, serial), epoch, seq);
            }
        }
    }

    /// Queues the acknowledgements of what this turn numbered to the
    /// publishers that asked for them (written with the turn's flush).
    fn queue_acks(&mut self) {
        for (conn, epoch, seq) in self.shard.take_acks() {
            self.ack(conn, epoch, seq);
        }
    }

    /// Before the server closes `key` itself (the drain, keepalive, a
    /// token's end, a deadline, the budget, publish pacing): a publisher
    /// that asked for acknowledgements gets those still due to it, what it
    /// published being numbered now if the turn has not yet (input read
    /// after the turn's dispatch, by `unthrottle`): no acknowledgement may
    /// follow the close frame. A close the publisher's own input brings is
    /// handled where it is read (`Session::on_frames`).
    pub(super) fn ack_owed(&mut self, key: usize) {
        if !self.conns[key].session.wants_acks() {
            return;
        }
        self.shard.dispatch();
        let serial = self.conns[key].serial;
        for (epoch, seq) in self.shard.take_acks_of((key, serial)) {
            self.ack((key, serial), epoch, seq);
        }
    }

    /// Queues publisher `conn`'s acknowledgement of number `seq` of `epoch`
    /// (if it is still the same connection and can take it).
    fn ack(&mut self, (key, serial): ConnRef, epoch: u64, seq: u64) {
        if !self.is_current(key, serial) {
            return;
        }
        let conn = &mut self.conns[key];
        if conn.session.push_ack(epoch, seq) {
            conn.mark_dirty(key, &mut self.dirty);
            recharge(conn, &mut self.buffered, &self.shared.stats[self.id]);
        }
    }

    /// Hands what the mailbox holds (this turn's local publications and
    /// other workers' batches) to the local subscribers' queues. Delivery
    /// stops after [`MAX_DELIVERIES_PER_TURN`]; the rest is carried to the
    /// next turn ([`Self::busy`] stays true meanwhile), so no flood, from
    /// this worker's publishers or another's, keeps it from its sockets and
    /// timers.
    pub fn deliver(&mut self) {
        // What the last turn's writes freed no longer counts; this turn's
        // publications do.
        self.shard.release_frames(false);
        self.sync_shard_charge();
        let cfg = &self.shared.config;
        let stats = &self.shared.stats[self.id];
        let conns = &mut self.conns;
        let dirty = &mut self.dirty;
        let slow = &mut self.slow;
        let delivered = &mut self.delivered;
        let shard = &mut self.shard;
        let mut compress = CompressRoom::turn();
        let mut budget = Budget {
            buffered: &mut self.buffered,
            lease: &mut self.lease,
            pool: &self.shared.budget,
            compress: &mut compress,
            tables_synced: self.tables.bytes(),
        };
        // The run last seen, reset before each `Shard::deliver` call (its
        // slice is alive for the call, so addresses cannot repeat within it).
        let last = std::cell::Cell::new(std::ptr::null::<Publication>());
        let work = std::cell::Cell::new(0usize);
        // This turn's deliveries, and those of them put in tables.
        let (delivered_n, tabled_n) = (std::cell::Cell::new(0usize), std::cell::Cell::new(0usize));
        let weight = self.delivery_weight;
        let now = self.now;
        let built = &mut self.built;
        let tables = &mut self.tables;
        // In a cluster every publication comes from NATS (`remote::inject`),
        // charged by no dispatch: each worker that queues one charges it.
        let in_cluster = shard.directory().link().is_some();
        let unpaid = &mut self.unpaid;
        let mut to_conns =
            |run: &[Publication], topic: &TopicView<'_>, targets: &[(usize, u32)]| {
                // Called once per chunk of subscribers: record each run's times once.
                if !std::ptr::eq(last.get(), run.as_ptr()) {
                    last.set(run.as_ptr());
                    for p in run {
                        let waited = now.saturating_duration_since(p.published_at());
                        stats.handoff_latency.observe(waited);
                    }
                    delivered.extend(run.iter().map(|p| p.published_at()));
                    if in_cluster {
                        unpaid.extend(
                            run.iter()
                                .filter(|p| p.msg.frame.len() >= COPY_BELOW)
                                .cloned(),
                        );
                    }
                }
                work.set(work.get() + run.len() * targets.len());
                delivered_n.set(delivered_n.get() + run.len() * targets.len());
                let to = Targets {
                    run,
                    topic,
                    targets,
                };
                let tabled = push_to(
                    conns,
                    dirty,
                    slow,
                    &mut budget,
                    built,
                    tables,
                    cfg,
                    stats,
                    to,
                );
                // A table's put costs several queue pushes (a hashed name,
                // its entry): counted so, a turn delivering to tables ends
                // as soon (outside probe: 350 rated `>` subscribers sent
                // new topics, 1 Mi puts a turn, held a worker seconds).
                work.set(work.get() + tabled * (TABLE_PUT_WORK - 1));
                tabled_n.set(tabled_n.get() + tabled);
            };
        let bus = &self.shared.bus;
        self.inbox.begin_drain(bus);
        loop {
            let (batch, mut pos, number) = match self.carry.take() {
                Some(carried) => carried,
                None => match self.inbox.next() {
                    Some(batch) => (batch, 0, self.inbox.taken()),
                    None => break,
                },
            };
            // The oldest publication found and not delivered is this
            // batch's next: seen by the other workers while this turn
            // delivers, so a long turn shows as a growing lag.
            self.inbox
                .report_oldest(bus, batch.get(pos).map(Publication::published_at));
            while pos < batch.len() && work.get() < MAX_DELIVERIES_PER_TURN {
                // Whole runs of one topic while they fit the bound, so each
                // subscriber still takes a run at a time.
                let before = work.get();
                // Planned in plain deliveries, at the last turn's weight: a
                // step is delivered whole, so one of table puts planned as
                // plain ones would take 8 times its share of the turn.
                let room = ((MAX_DELIVERIES_PER_TURN - work.get()) / weight).max(1);
                let (end, cost) = shard.step_end(&batch, pos, room);
                last.set(std::ptr::null());
                shard.deliver(&batch[pos..end], number, &mut to_conns);
                // What it delivered, or what walking its slots cost if more.
                work.set(work.get().max(before.saturating_add(cost)));
                pos = end;
            }
            if pos < batch.len() {
                stats.delivery_deferred();
                self.carry = Some((batch, pos, number));
                break;
            }
            self.inbox.done(bus, &batch);
        }
        // What this worker has found and not delivered: the carry, if any
        // (publishers pause while it waits too long: `MAILBOX_HIGH_LAG`).
        let pending = self
            .carry
            .as_ref()
            .map(|(b, pos, _)| b[*pos].published_at());
        self.inbox.report_oldest(bus, pending);
        let (n, t) = (delivered_n.get(), tabled_n.get());
        if n > 0 {
            self.delivery_weight = 1 + (t * (TABLE_PUT_WORK - 1)).div_ceil(n);
        }
        if compress.skipped > 0 {
            self.shared.stats[self.id].compression_skipped(compress.skipped);
        }
        // `always` publications (and any other waiting for a queue that is
        // empty now) go out this turn, the newest of each topic; rated
        // topics whose interval is over too.
        self.release_due_tables();
        self.release_idle_tables();
        self.tables.free_some();
        for p in self.unpaid.drain(..) {
            self.shard.charge_remote(&p.msg);
        }
        // Envelopes built here are charged here, like published frames.
        let stats = &self.shared.stats[self.id];
        for (p, form) in self.built.drain(..) {
            let topic = self.shard.local_id(&p);
            self.shard.charge_built(topic, &p.msg, form);
            if form.is_deflated() {
                let len = |f: Form| p.msg.frame_of(f).map_or(0, Bytes::len);
                stats.compressed(len(form.base()).saturating_sub(len(form)));
            }
        }
        // What the tables took this turn counts now, not at the next turn.
        self.sync_shard_charge();
        for (key, serial) in std::mem::take(&mut self.slow) {
            if self.is_current(key, serial) && self.conns[key].state == IoState::Active {
                self.start_closing(key);
            }
        }
    }

    /// Moves the budget (and its gauge) by the change in what the shard
    /// holds for this worker's clients (published frames, the topic
    /// registry) since the last call; `true` when it grew.
    pub(super) fn sync_shard_charge(&mut self) -> bool {
        let now = self.shard.charged_bytes() + self.tables.bytes();
        let delta = now as isize - self.shard_charged as isize;
        if delta != 0 {
            self.shard_charged = now;
            self.buffered = (self.buffered as isize + delta) as usize;
            self.stats().buffered(delta);
        }
        delta > 0
    }

    /// Whether this turn queued publications (whose latencies the write
    /// pass then records).
    pub fn delivered_any(&self) -> bool {
        !self.delivered.is_empty()
    }

    /// Records the publish-to-first-write latency of what this turn
    /// delivered: `started`, when its first write batch began.
    pub fn observe_write_pass(&mut self, started: Instant) {
        let stats = &self.shared.stats[self.id];
        // Written to every local subscriber once the flushes reach the
        // dirty list's end as it is now (each subscriber is listed, once,
        // before it).
        let end = self.dirty.end();
        for t in self.delivered.drain(..) {
            stats
                .first_write_latency
                .observe(started.saturating_duration_since(t));
            self.unwritten.push_back((t, end));
        }
    }

    /// Records the publish-to-write latency of what has now been handed to
    /// the kernel for every local subscriber. `written`: when this turn's
    /// batch of writes was.
    pub fn observe_written(&mut self, written: Instant) {
        let taken = self.dirty.taken();
        let stats = &self.shared.stats[self.id];
        while let Some(&(t, end)) = self.unwritten.front()
            && end <= taken
        {
            stats.observe_latency(written.saturating_duration_since(t));
            self.unwritten.pop_front();
        }
    }

    /// Resumes throttled publishers once every mailbox is below half its
    /// byte mark and every worker less than half its lag mark behind, and
    /// paced publishers whose pause is over.
    pub fn unthrottle(&mut self) {
        if !self.paced.is_empty() {
            let now = self.now;
            let mut due = Vec::new();
            let mut i = 0;
            while i < self.paced.len() {
                if self.paced[i].0 > now {
                    i += 1;
                    continue;
                }
                let (_, key, serial) = self.paced.swap_remove(i);
                due.push((key, serial));
            }
            for (key, serial) in due {
                if !self.is_current(key, serial) {
                    continue;
                }
                self.conns[key].set_flag(PACED, false);
                if self.conns[key].flag(THROTTLED) {
                    continue;
                }
                self.conns[key].set_flag(READ_PAUSED, false);
                // Input it kept (it stopped early, or what arrived while
                // paused) goes first; the socket is read once it is used up
                // (a read after it could otherwise find no room).
                let fed = self.input_kept(key);
                // Its FIN, if it came while it was paused and nothing it
                // sent waits any more, closes it now.
                self.after_input(key);
                if fed == Some(Input::Stop) {
                    // Paused again (its pace, another turn's worth), or
                    // closing.
                    self.judge_backlog(key, serial);
                    continue;
                }
                self.backlogged.remove(&key);
                if self.conns[key].state != IoState::Active {
                    continue;
                }
                self.reread.push((key, serial));
            }
        }
        if self.throttled.is_empty() || past_marks(&self.shared, self.now, 2) {
            return;
        }
        for (key, serial) in std::mem::take(&mut self.throttled) {
            if self.is_current(key, serial) {
                self.conns[key].set_flag(THROTTLED, false);
                if self.conns[key].flag(PACED) {
                    continue; // its pace resumes it
                }
                self.conns[key].set_flag(READ_PAUSED, false);
                self.reread.push((key, serial));
            }
        }
    }

    /// `key` was resumed and paused again with input still kept: a paced
    /// publisher that sent far more than its rate allows keeps it. It must
    /// work that off within `--message-timeout` (30 s), or it is closed
    /// `1008` "publish rate exceeded" and what it kept is dropped unread:
    /// while it is paced its socket is not read, so without this bound a
    /// burst of thousands of messages at a rate of one per second would hold
    /// it, and its descriptor, for hours after the client left.
    fn judge_backlog(&mut self, key: usize, serial: u32) {
        let rate = self.shared.config.max_publish_rate;
        if !self.is_current(key, serial)
            || self.conns[key].state != IoState::Active
            || self.conns[key].session.pending_len() == 0
            // Only the publish rate holds input back for want of the
            // client's own pace: a connection stopped at a turn's worth, or
            // an HTTP pipeline waiting for its answers to be read, goes on
            // as the turns come and the client reads (outside probe: a
            // pipeline read at 2 MB/s, and a compressed echo on io_uring,
            // were closed "publish rate exceeded" at --message-timeout).
            || self.conns[key].session.publish_wait_ms(rate) == 0
        {
            self.backlogged.remove(&key);
            return;
        }
        let now = self.now;
        let since = match self.backlogged.get(&key) {
            Some(&(s, since)) if s == serial => since,
            _ => {
                self.backlogged.insert(key, (serial, now));
                now
            }
        };
        let Some(limit) = self.shared.config.message_timeout else {
            return;
        };
        if now.saturating_duration_since(since) < limit {
            return;
        }
        self.backlogged.remove(&key);
        self.ack_owed(key);
        let stats = &self.shared.stats[self.id];
        stats.ws_failure(CloseCode::POLICY_VIOLATION.0);
        debug!(
            worker = self.id,
            "publish rate exceeded for longer than the message timeout"
        );
        self.conns[key].session.abort(
            CloseCode::POLICY_VIOLATION,
            Status::TooManyRequests,
            "publish rate exceeded",
            stats,
        );
        self.recharge(key);
        self.start_closing(key);
    }

    /// At the worker's exit: publications still waiting for it (carried or
    /// in its mailbox) will never be delivered; count them.
    pub fn finish(&mut self) {
        let bus = &self.shared.bus;
        // Nothing of it is pending any more: a lag left set would hold
        // every other worker's publishers.
        self.inbox.report_oldest(bus, None);
        let mut lost = 0;
        if let Some((batch, pos, _)) = self.carry.take() {
            lost += batch.len() - pos;
            self.inbox.done(bus, &batch);
        }
        while let Some(batch) = self.inbox.next() {
            lost += batch.len();
            self.inbox.done(bus, &batch);
        }
        if lost > 0 {
            self.stats().undelivered(Undelivered::WorkerStopped, lost);
        }
    }
}

/// A run of publications of one topic and a chunk of its local subscribers.
struct Targets<'a> {
    run: &'a [Publication],
    topic: &'a TopicView<'a>,
    targets: &'a [ConnRef],
}

/// Queues a run of publications of one topic for each target, subscriber by
/// subscriber, each in the form it asked for, applying the topic's
/// slow-consumer policy (its namespace's, or the flag's): a publication to
/// conflate waits in the subscriber's table instead. Envelopes built on
/// the way are added to `built`.
#[allow(clippy::too_many_arguments)]
fn push_to<S>(
    conns: &mut PagedSlab<Conn<S>>,
    dirty: &mut DirtyList,
    slow: &mut Vec<ConnRef>,
    budget: &mut Budget<'_>,
    built: &mut Vec<(Publication, Form)>,
    tables: &mut Tables,
    cfg: &Config,
    stats: &WorkerStats,
    to: Targets<'_>,
) -> usize {
    let Targets {
        run,
        topic: entry,
        targets,
    } = to;
    let topic: &str = entry.name;
    let policy = entry.slow_consumer.unwrap_or(cfg.slow_consumer);
    // The namespace's maximum rate: every publication waits its turn.
    let topic_interval = entry
        .max_rate
        .filter(|&r| r > 0)
        .map(|r| Duration::from_secs(1) / r.min(crate::pubsub::control::MAX_RATE));
    // Room for the run's small frames in each form, reserved once per
    // subscriber instead of growing the tail buffer step by step; summed
    // the first time a subscriber of the form comes (which builds the
    // form's envelopes: they are needed next anyway).
    let mut small: [Option<usize>; crate::pubsub::envelope::FORMS] =
        [None; crate::pubsub::envelope::FORMS];
    let mut sent = 0;
    let mut tabled = 0;
    for &(key, serial) in targets {
        let Some(conn) = conns.get_mut(key) else {
            continue;
        };
        debug_assert_eq!(conn.serial, serial, "registry holds a stale connection");
        if !conn.session.takes_publications() {
            // Closing (failed as a slow consumer, or closed by its client):
            // not put in its table, nor failed and counted again, and no
            // envelope is built for it (outside probe: a JSON subscriber
            // cut as slow went on making the worker build every
            // publication's ~384 KiB envelope, 64 KiB of control characters
            // each, and charge it: ~840 MB, the worker's budget spent, its
            // other connections closed 1013).
            stats.undelivered(Undelivered::Closing, run.len());
            continue;
        }
        let form = conn.session.form();
        let mut queued = false;
        let pressure = budget.pressure(tables);
        // What waits in the subscriber's table: everything of a rated
        // subscriber (`max_rate`); everything of an `always` topic; a
        // conflating topic's while anything waits; and any topic's while
        // one of its own waits (one order per topic).
        // The subscription's `max_rate`; the namespace's may be stricter.
        let interval = if conn.flag(RATED) {
            topic_interval.max(tables.interval_for((key, serial), topic))
        } else {
            topic_interval
        };
        let waits = interval.is_some()
            || policy == SlowConsumerPolicy::Always
            || (conn.flag(CONFLATING)
                && (policy.conflates() || tables.waits_for((key, serial), topic)));
        if waits {
            let to = Waits {
                name: entry.name,
                interval,
            };
            tabled += run.len();
            if wait_in_table(
                conn,
                (key, serial),
                tables,
                run,
                to,
                pressure,
                cfg,
                stats,
                slow,
            ) {
                conn.mark_dirty(key, dirty);
            }
            continue;
        }
        let room = *small[form as usize].get_or_insert_with(|| {
            run.iter()
                .map(|p| {
                    let mut on_built = |f: Form, _: &Bytes| built.push((p.clone(), f));
                    p.msg
                        .frame_within(form, topic, &mut on_built, budget.compress)
                        .len()
                })
                .filter(|&n| n < COPY_BELOW)
                .sum()
        });
        conn.session.out.reserve_tail(room);
        for (i, p) in run.iter().enumerate() {
            let mut on_built = |f: Form, _: &Bytes| built.push((p.clone(), f));
            let frame = p
                .msg
                .frame_within(form, topic, &mut on_built, budget.compress);
            match conn.session.push_published(frame, policy, cfg, pressure) {
                Push::Queued => {
                    sent += 1;
                    queued = true;
                }
                Push::Ignored => break,
                Push::Closing => {
                    stats.undelivered(Undelivered::Closing, run.len() - i);
                    break;
                }
                Push::Dropped => stats.frame_dropped(),
                Push::Conflate => {
                    // Over the bound: the rest of the run waits, the newest.
                    let to = Waits {
                        name: entry.name,
                        interval,
                    };
                    tabled += run.len() - i;
                    queued |= wait_in_table(
                        conn,
                        (key, serial),
                        tables,
                        &run[i..],
                        to,
                        pressure,
                        cfg,
                        stats,
                        slow,
                    );
                    break;
                }
                Push::SlowConsumer { discarded } => {
                    failed_slow(stats, slow, (key, serial), discarded);
                    queued = true;
                    break;
                }
            }
        }
        if queued {
            conn.mark_dirty(key, dirty);
            recharge(conn, budget.buffered, stats);
        }
    }
    stats.frames_sent(sent);
    tabled
}

/// What one publication put in a subscriber's conflation table counts
/// toward [`MAX_DELIVERIES_PER_TURN`], in queue pushes.
const TABLE_PUT_WORK: usize = 8;

/// A topic's table entry: its name and its namespace's interval.
struct Waits<'a> {
    name: &'a Arc<str>,
    interval: Option<Duration>,
}

/// Keeps the newest of `run` (per conflation key; the others replaced) in
/// the subscriber's conflation table; returns `true` when the table was full and the
/// subscriber failed as a slow consumer (its close is queued). Under
/// budget `pressure` a table holding that much or more takes no new topic
/// or key (what waits is still replaced): full, as a queue would be.
#[allow(clippy::too_many_arguments)]
fn wait_in_table<S>(
    conn: &mut Conn<S>,
    me: ConnRef,
    tables: &mut Tables,
    run: &[Publication],
    to: Waits<'_>,
    pressure: Option<usize>,
    cfg: &Config,
    stats: &WorkerStats,
    slow: &mut Vec<ConnRef>,
) -> bool {
    let max_bytes = match pressure {
        Some(from) if tables.waiting_bytes_of(me) >= from => 0,
        _ => cfg.max_outbound_bytes,
    };
    match tables.put(me, to.name, run, to.interval, max_bytes) {
        Ok(replaced) => {
            stats.replaced(replaced);
            conn.set_flag(CONFLATING, true);
            false
        }
        Err(Full) => {
            // More distinct topics waiting than its bound holds.
            failed_slow(stats, slow, me, conn.session.fail_slow());
            true
        }
    }
}

/// Counts a subscriber failed as a slow consumer (1008) and lists it to
/// close.
fn failed_slow(stats: &WorkerStats, slow: &mut Vec<ConnRef>, me: ConnRef, discarded: usize) {
    stats.slow_consumer_disconnect(discarded);
    // Only an open WebSocket is queued to: failed with 1008.
    stats.ws_failure(CloseCode::POLICY_VIOLATION.0);
    slow.push(me);
}

/// The worker's buffer budget, lent to [`push_to`].
struct Budget<'a> {
    buffered: &'a mut usize,
    /// The worker's lease of the process's budget, grown to cover
    /// `buffered` where the pool has room.
    lease: &'a mut crate::server::budget::Lease,
    pool: &'a crate::server::budget::Pool,
    /// What this turn may still compress.
    compress: &'a mut CompressRoom,
    /// The conflation tables' charge already in `buffered` (their growth
    /// during the delivery is counted in `buffered` at its end).
    tables_synced: usize,
}

/// Under budget pressure, the backlog (queued bytes, or a conflation
/// table's charge) from which a subscriber's next publication is refused
/// while the worker is past [`LARGE_HOLDER_SHARE_PERCENT`] of its budget
/// (its policy decides: dropped, conflated, or closed 1008). 64 KiB: a
/// subscriber that reads has a frame or two in flight, far less; one that
/// does not fills its `--max-outbound-bytes` (4 MiB) and passes it early.
const PRESSURE_BACKLOG_BYTES: usize = 64 * 1024;

impl Budget<'_> {
    /// The backlog from which subscribers take no more (`None`: any).
    /// Past 90 % of the worker's budget, backlogs of
    /// [`PRESSURE_BACKLOG_BYTES`] (the rest stays for everyone's replies
    /// and echoes; outside probe: 300 subscribers that never read, under
    /// `drop-newest`, filled the whole budget, 4 MiB queued each, and
    /// honest echo clients were closed 1013); past all of it, any backlog
    /// (a byte). Before, any backlog past 90 %: an honest subscriber that
    /// reads at once was closed 1008 beside 100 that never read (outside
    /// probe), its queue holding a frame not yet written.
    /// The tables' growth during this delivery counts (a turn delivering
    /// thousands of new topics to rated subscribers grew them by 100 MB
    /// past the budget before the end of the turn counted it).
    fn pressure(&mut self, tables: &Tables) -> Option<usize> {
        let held = *self.buffered + tables.bytes().saturating_sub(self.tables_synced);
        if self.lease.fits(self.pool, held, LARGE_HOLDER_SHARE_PERCENT) {
            None
        } else if self.lease.fits(self.pool, held, 100) {
            Some(PRESSURE_BACKLOG_BYTES)
        } else {
            Some(1)
        }
    }
}

/// Whether publishers are held at `now`: a mailbox holds more than
/// `1/divisor` of `mailbox_high_water`, or a worker is more than
/// `1/divisor` of `mailbox_high_lag` behind on its deliveries
/// ([`Bus::max_lag`](crate::pubsub::bus::Bus::max_lag)). Held past the
/// marks (`divisor` 1), resumed at half (2). The lag never counts in a
/// cluster: there every publication reaches the mailboxes through the
/// NATS bridge, local publishers publish to NATS, and holding them would
/// not slow what keeps a worker behind (review: a flood through another
/// node would have held every publisher of this one).
pub(super) fn past_marks(shared: &Shared, now: Instant, divisor: u32) -> bool {
    let cfg = &shared.config;
    shared.bus.max_queued_bytes() > cfg.mailbox_high_water / divisor as usize
        || (shared.cluster.is_none() && shared.bus.max_lag(now) > cfg.mailbox_high_lag / divisor)
}
