//! Time in a worker: the periodic sweep (keepalive, message and send
//! deadlines, the ledger's full scan), the FIFO deadline queues (request
//! heads, lingering), the wait's next deadline, and the drain.

use super::*;
use crate::pubsub::policy::NamespacePolicy;
use std::collections::HashSet;

impl<S> Core<S> {
    /// Runs the periodic sweep (keepalive, message and send deadlines,
    /// admission table, the ledger's full scan) when it is due; whether it
    /// ran (the backend then sweeps what it holds itself).
    pub fn keepalive(&mut self) -> bool {
        let due = self.now >= self.next_sweep;
        if due {
            self.sweep();
        }
        due
    }

    /// Pings connections idle for the ping interval; closes those whose ping
    /// went unanswered for the ping timeout, those that started a message
    /// longer than the message timeout ago, and those with bytes queued at
    /// the start of a send epoch that have not all left within the send
    /// timeout.
    fn sweep(&mut self) {
        let period = sweep_period(&self.shared.config, &self.shared.directory.namespaces());
        self.next_sweep = self.now + period;
        self.shared
            .admission
            .sweep(self.id, self.shared.stats.len());
        // A published frame stuck in one stalled queue keeps the later ones
        // charged until the next full scan of the ledger: this one.
        self.shard.release_frames(true);
        self.sync_shard_charge();
        if self.id == 0 {
            // One worker sweeps the retained topics for all, and gives
            // memory back after a load.
            self.shard.directory().sweep(self.now);
            if self.trim.looks(self.now) {
                use crate::server::metrics::sum;
                let stats = &self.shared.stats;
                let charged = sum(stats, |w| &w.buffered_bytes);
                let sent = sum(stats, |w| &w.bytes_sent);
                let rss = trim::resident_bytes().unwrap_or(0);
                if self.trim.due(self.now, rss, charged, sent) {
                    trim::release_free_memory();
                    self.shared.stats[self.id].memory_trimmed();
                }
            }
        }
        self.shard.sweep_pattern_topics();
        self.shard.shrink_registry();
        let cfg = &self.shared.config;
        let interval = cfg.ping_interval.map(timer_ms);
        let timeout = timer_ms(cfg.ping_timeout);
        let message_timeout = cfg.message_timeout.map(timer_ms);
        let send_timeout = cfg.send_timeout.map(timer_ms);
        let now = self.now_ms();
        let stats = &self.shared.stats[self.id];
        // Connections resumed this turn and not read yet: what they sent
        // while paused waits in the socket, so they are not judged on what
        // they had sent before (a message or frame header begun before the
        // pause) until it is read.
        let rereading: HashSet<usize> = self.reread.iter().map(|&(key, _)| key).collect();
        let mut timed_out = Vec::new();
        let mut slow_messages = Vec::new();
        let mut stalled = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            // Closing and lingering connections have the linger deadline.
            if conn.state != IoState::Active {
                continue;
            }
            // The send timeout judges every open connection, read or paused,
            // WebSocket or HTTP: no queued byte may wait longer (a peer that
            // stops reading, or reads too slowly to ever catch up, is cut
            // however it got there; docs/SECURITY.md, "Deadlines").
            if let Some(since) = conn.session.out.send_epoch(now)
                && send_timeout.is_some_and(|limit| now.wrapping_sub(since) >= limit)
            {
                stalled.push(key);
                continue;
            }
            // A connection we are not reading (its queue is over the bound, or a
            // throttled or paced publisher) cannot show us its pong or finish
            // its message: not judged by those while paused. Its pause ends by
            // itself (the queue drains or the send timeout cuts it; the
            // mailboxes drain; the pace runs out).
            if !conn.session.is_websocket() || conn.flag(READ_PAUSED) || rereading.contains(&key) {
                continue;
            }
            if let (Some(limit), Some(started)) = (message_timeout, conn.session.message_started())
                && now.wrapping_sub(started) >= limit
            {
                slow_messages.push(key);
                continue;
            }
            let Some(interval) = interval else {
                continue;
            };
            if conn.flag(PING_PENDING) {
                if now.wrapping_sub(conn.keepalive_ms) >= timeout {
                    timed_out.push(key);
                }
            } else if now.wrapping_sub(conn.keepalive_ms) >= interval && conn.session.ping() {
                stats.keepalive_ping();
                conn.set_flag(PING_PENDING, true);
                conn.keepalive_ms = now;
                conn.mark_dirty(key, &mut self.dirty);
            }
        }
        // Tokens past their `exp` (and the leeway): the connection goes,
        // with 3000 (a subscriber may reconnect with a new token).
        let mut expired = Vec::new();
        if !self.grants.is_empty()
            && let Some(verifier) = self.shared.verifier()
        {
            let leeway = verifier.leeway_s();
            for (&key, grant) in &self.grants {
                if grant.exp.saturating_add(leeway) < self.wall_s
                    && self.conns[key].state == IoState::Active
                    && self.conns[key].session.is_websocket()
                {
                    expired.push(key);
                }
            }
        }
        // The operator's disconnections (`POST /disconnect?sub=`), 3003.
        let mut revoked = Vec::new();
        if let Some((last, subs)) = self.shared.revoked_since(self.revoked_seen) {
            self.revoked_seen = last;
            for (&key, grant) in &self.grants {
                if grant.sub.as_ref().is_some_and(|s| subs.contains(s))
                    && self.conns[key].state == IoState::Active
                    && !expired.contains(&key)
                {
                    revoked.push(key);
                }
            }
        }
        for key in revoked {
            self.grants.remove(&key);
            self.stats().operator_disconnect();
            self.ack_owed(key);
            let conn = &mut self.conns[key];
            if conn.session.is_websocket() {
                conn.session
                    .close(CloseCode::FORBIDDEN, "disconnected by the operator");
            }
            self.start_closing(key);
        }
        for key in expired {
            self.grants.remove(&key);
            self.stats().token_expired();
            debug!(worker = self.id, "token expired");
            self.ack_owed(key);
            self.conns[key]
                .session
                .close(CloseCode::UNAUTHORIZED, "token expired");
            self.start_closing(key);
        }
        for key in timed_out {
            self.stats().keepalive_timeout();
            debug!(worker = self.id, "keepalive timeout");
            self.ack_owed(key);
            self.conns[key]
                .session
                .close(CloseCode::GOING_AWAY, "keepalive timeout");
            self.start_closing(key);
        }
        for key in stalled {
            let stats = &self.shared.stats[self.id];
            stats.send_timeout();
            debug!(worker = self.id, "send timeout");
            let conn = &mut self.conns[key];
            // Nothing queued is going anywhere: free it now, keeping only a
            // frame already partly on the wire.
            stats.send_timeout_discarded(conn.session.out.truncate_to_front());
            if conn.session.is_websocket() {
                stats.ws_failure(CloseCode::POLICY_VIOLATION.0);
            }
            conn.session.abort(
                CloseCode::POLICY_VIOLATION,
                Status::RequestTimeout,
                "send timeout",
                stats,
            );
            self.recharge(key);
            self.start_closing(key);
        }
        for key in slow_messages {
            self.ack_owed(key);
            let stats = &self.shared.stats[self.id];
            stats.message_timeout();
            stats.ws_failure(CloseCode::POLICY_VIOLATION.0);
            debug!(worker = self.id, "message timeout");
            self.conns[key].session.abort(
                CloseCode::POLICY_VIOLATION,
                Status::RequestTimeout,
                "message not finished in time",
                stats,
            );
            self.recharge(key);
            self.start_closing(key);
        }
    }

    /// The earliest time the worker must wake up for a deadline of its own
    /// (besides `extra`, the backend's).
    pub fn next_deadline(&self, now: Instant, extra: Option<Instant>) -> Option<Instant> {
        [
            self.handshake_deadlines
                .front()
                .map(|d| self.epoch + Duration::from_millis(d.0)),
            self.linger_deadlines
                .front()
                .map(|d| self.epoch + Duration::from_millis(d.0)),
            extra,
            self.drain_deadline,
            // The next share of the drain's closes.
            (!self.drain_queue.is_empty()).then(|| now + DRAIN_STEP),
            Some(self.next_sweep),
            (!self.throttled.is_empty()).then(|| now + THROTTLE_RECHECK),
            self.paced.iter().map(|p| p.0).min(),
            self.tables.next_timer(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Queues a request deadline: at `at`, `key` (`serial`) must have
    /// finished request number `generation`.
    ///
    /// An entry outlives its purpose as soon as the connection upgrades,
    /// closes or completes the request, and would otherwise wait for its
    /// time to be popped: at 10 000 connections opened within one handshake
    /// timeout, 24 bytes each, nearly all dead. So before the queue would
    /// grow, its dead entries are dropped ([`request_pending`], order
    /// kept): it holds about as many entries as requests in progress, not
    /// connections opened. A purge that frees less than half makes room
    /// for as many again, so each costs O(capacity) once per capacity / 2
    /// pushes at the least (amortised O(1), however many stay alive).
    pub(super) fn push_request_deadline(
        &mut self,
        at: u64,
        key: usize,
        serial: u32,
        generation: u32,
    ) {
        let queue = &mut self.handshake_deadlines;
        if queue.len() == queue.capacity() && !queue.is_empty() {
            let conns = &self.conns;
            queue.retain(|&(_, key, serial, generation)| {
                request_pending(conns, key as usize, serial, generation)
            });
            if queue.len() > queue.capacity() / 2 {
                queue.reserve(queue.capacity());
            }
        }
        queue.push_back((at, key as u32, serial, generation));
    }

    /// Request deadlines queued (live or not yet purged).
    #[cfg(test)]
    pub fn request_deadlines(&self) -> usize {
        self.handshake_deadlines.len()
    }

    /// Handles the request and linger deadlines that ran out by `now`;
    /// returns the connections the backend must close now (check each with
    /// [`Self::is_current`]: one may be listed twice).
    pub fn expire(&mut self, now: Instant) -> Vec<ConnRef> {
        let mut remove = Vec::new();
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        while let Some(&(deadline, key, serial, generation)) = self.handshake_deadlines.front() {
            let key = key as usize;
            if deadline > now_ms {
                break;
            }
            self.handshake_deadlines.pop_front();
            if self.is_current(key, serial) {
                let conn = &self.conns[key];
                if conn.session.confirming()
                    && conn.state == IoState::Active
                    && conn.session.requests() == generation
                {
                    // The cluster has not stored it in time: `202`, it is
                    // still held for the stream; the next request gets a
                    // deadline of its own.
                    if let Some(cluster) = &self.shared.cluster {
                        cluster.stats.unconfirmed.fetch_add(1, Ordering::Relaxed);
                    }
                    self.confirm(key, Confirm::NotYet, false);
                    continue;
                }
                let conn = &self.conns[key];
                if conn.flag(READ_PAUSED)
                    && conn.session.awaiting_request()
                    && conn.session.requests() == generation
                {
                    // Not read because of us (a held publisher, a full queue):
                    // its next request cannot arrive. Judged again once read;
                    // the send timeout covers a queue that does not drain.
                    let at = ms_after(self.epoch, now, self.shared.config.handshake_timeout);
                    self.push_request_deadline(at, key, serial, generation);
                    continue;
                }
                if conn.session.awaiting_request()
                    && conn.state == IoState::Active
                    && conn.session.requests() == generation
                {
                    let stats = &self.shared.stats[self.id];
                    stats.handshake_timeout();
                    debug!(worker = self.id, "request timed out");
                    // A PROXY header still incomplete is not a request
                    // (and on a TLS listener no answer could be read).
                    if !conn.session.partial_request() || conn.flag(AWAIT_PROXY) {
                        // Sent nothing (an idle keep-alive or preconnect): just close.
                        remove.push((key, serial));
                        continue;
                    }
                    // Part of a request: 408, then the usual close (linger-bounded).
                    self.conns[key].session.abort(
                        CloseCode::POLICY_VIOLATION,
                        Status::RequestTimeout,
                        "request not received in time (see --handshake-timeout)",
                        stats,
                    );
                    self.recharge(key);
                    self.start_closing(key);
                }
            }
        }
        // After a connection storm, give the queues' memory back.
        if self.handshake_deadlines.is_empty() && self.handshake_deadlines.capacity() > SHRINK_ABOVE
        {
            self.handshake_deadlines.shrink_to_fit();
        }
        if self.linger_deadlines.is_empty() && self.linger_deadlines.capacity() > SHRINK_ABOVE {
            self.linger_deadlines.shrink_to_fit();
        }
        if self.addresses.is_empty() && self.addresses.capacity() > SHRINK_ABOVE {
            self.addresses.shrink_to_fit();
        }
        while let Some(&(deadline, key, serial)) = self.linger_deadlines.front() {
            let key = key as usize;
            if deadline > now_ms {
                break;
            }
            self.linger_deadlines.pop_front();
            if self.is_current(key, serial) && self.conns[key].state != IoState::Active {
                remove.push((key, serial));
            }
        }
        remove
    }

    /// Starts the close handshake on every open WebSocket; returns the
    /// connections still in an HTTP request, for the backend to close now.
    ///
    /// The WebSockets are closed over the first half of the drain window,
    /// a share each turn ([`Self::drain_step`]), not all at once: their
    /// clients then reconnect (elsewhere) in a spread, not in one wave.
    pub fn begin_drain(&mut self) -> Vec<usize> {
        let mut remove = Vec::new();
        let mut confirming = Vec::new();
        info!(worker = self.id, connections = self.conns.len(), "draining");
        let window = self.shared.config.drain_timeout;
        self.drain_deadline = Some(self.now + window);
        self.drain_spread = (self.now, window / 2);
        for (key, conn) in self.conns.iter() {
            if conn.state != IoState::Active {
                continue;
            }
            if conn.session.is_websocket() {
                self.drain_queue.push((key, conn.serial));
            } else if conn.session.confirming() {
                // Waiting for the cluster: told `202` (still held; stored
                // if the bridge gets it out before it stops), then closed.
                confirming.push(key);
            } else {
                // Still in an HTTP request: nothing to say goodbye to.
                remove.push(key);
            }
        }
        for key in confirming {
            self.confirm(key, Confirm::NotYet, true);
        }
        self.drain_total = self.drain_queue.len();
        remove.extend(self.drain_step());
        remove
    }

    /// Closes (1001) the share of the draining WebSockets due by now: a
    /// straight line from none at the drain's start to all at half its
    /// window. Returns the connections to remove now.
    pub fn drain_step(&mut self) -> Vec<usize> {
        let mut remove = Vec::new();
        if self.drain_queue.is_empty() {
            return remove;
        }
        let (started, spread) = self.drain_spread;
        let elapsed = self.now.saturating_duration_since(started);
        let due = if elapsed >= spread {
            self.drain_total
        } else {
            let share = self.drain_total as u128 * elapsed.as_nanos() / spread.as_nanos();
            (share as usize + 1).min(self.drain_total)
        };
        let closed = self.drain_total - self.drain_queue.len();
        for _ in closed..due {
            let Some((key, serial)) = self.drain_queue.pop() else {
                break;
            };
            if !self.is_current(key, serial) || self.conns[key].state != IoState::Active {
                continue;
            }
            self.ack_owed(key);
            if self.conns[key]
                .session
                .close(CloseCode::GOING_AWAY, "server shutting down")
            {
                self.mark_dirty(key);
            } else {
                remove.push(key);
            }
        }
        if self.drain_queue.is_empty() {
            self.drain_queue = Vec::new();
        }
        remove
    }

    /// Has shutdown been asked for, and the drain not yet begun?
    pub fn drain_requested(&self) -> bool {
        self.shared.shutdown.load(Ordering::Acquire) && self.drain_deadline.is_none()
    }

    /// Is the drain over (everything closed, or the deadline passed)?
    pub fn drained(&self) -> bool {
        self.drain_deadline
            .is_some_and(|d| self.conns.is_empty() || self.now >= d)
    }
}

/// Can the request deadline `(key, serial, generation)` still act: is the
/// connection still `serial`, not gone, reading request number
/// `generation`? (What [`Core::expire`] checks before it does anything;
/// once false it stays false: the phase never returns to a request and
/// the generation only moves on.)
fn request_pending<S>(
    conns: &PagedSlab<Conn<S>>,
    key: usize,
    serial: u32,
    generation: u32,
) -> bool {
    conns.get(key).is_some_and(|c| {
        c.serial == serial
            && c.state != IoState::Gone
            && c.session.awaiting_request()
            && c.session.requests() == generation
    })
}

/// `now + after` in milliseconds since `epoch` (rounded up, so a deadline
/// never fires early).
pub(super) fn ms_after(epoch: Instant, now: Instant, after: Duration) -> u64 {
    (now.saturating_duration_since(epoch) + after)
        .as_micros()
        .div_ceil(1000) as u64
}

/// A per-connection timer in the workers' 32-bit milliseconds, where
/// elapsed times are exact up to 2^31 ms: longer ones (which the flags'
/// parser refuses, `cli::MAX_TIMER`) are taken as that.
fn timer_ms(d: Duration) -> u32 {
    d.as_millis().min(i32::MAX as u128) as u32
}

/// The sweep period: a quarter of the shortest timeout it enforces (ping
/// interval and timeout, message timeout, send timeout, history age; 4 s
/// when the admission table exists, so it is swept every second), kept between
/// [`SWEEP_MIN`] and [`SWEEP_MAX`]; [`SWEEP_MAX`] with nothing to sweep for.
///
/// The history ages are the flag's and those of `namespaces`, the
/// directory's table in force: recomputed at every sweep, so a reload's
/// shorter `history-age` sets the period from the next sweep on (within
/// [`SWEEP_MAX`]), and a sweep always comes for it, even when nothing
/// needed one when the server started.
pub(super) fn sweep_period(cfg: &Config, namespaces: &[NamespacePolicy]) -> Duration {
    let keepalive = cfg.ping_interval.map(|i| i.min(cfg.ping_timeout));
    let per_ip = (cfg.max_connections_per_ip > 0
        || cfg.max_connect_rate_per_ip > 0
        || cfg.max_publish_rate > 0)
        .then_some(SWEEP_MAX * 4);
    // Retained topics age out of the directory (`Directory::sweep`).
    let history = std::iter::once((cfg.history.size, cfg.history.age))
        .chain(namespaces.iter().map(|n| {
            (
                n.history_size.unwrap_or(cfg.history.size),
                n.history_age.unwrap_or(cfg.history.age),
            )
        }))
        .filter(|&(size, _)| size > 0)
        .map(|(_, age)| age)
        .min();
    let shortest = [
        keepalive,
        cfg.message_timeout,
        cfg.send_timeout,
        per_ip,
        history,
    ]
    .into_iter()
    .flatten()
    .min();
    shortest.map_or(SWEEP_MAX, |s| (s / 4).clamp(SWEEP_MIN, SWEEP_MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timer_past_the_clocks_range_saturates_rather_than_wraps() {
        assert_eq!(timer_ms(Duration::from_millis(1500)), 1500);
        assert_eq!(timer_ms(crate::cli::MAX_TIMER), 24 * 24 * 3600 * 1000);
        let fifty_days = Duration::from_secs(50 * 24 * 3600);
        assert_eq!(
            timer_ms(fifty_days),
            i32::MAX as u32,
            "not 50 days mod 2^32 ms"
        );
    }

    #[test]
    fn the_sweep_period_follows_the_namespace_table_in_force_and_a_sweep_always_comes() {
        let mut cfg = Config {
            ping_interval: None,
            message_timeout: None,
            send_timeout: None,
            ..Config::default()
        };
        cfg.history.size = 0;
        assert_eq!(sweep_period(&cfg, &[]), SWEEP_MAX, "nothing to sweep for");
        let short = NamespacePolicy {
            prefix: "prices".into(),
            history_size: Some(10),
            history_age: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        assert_eq!(
            sweep_period(&cfg, std::slice::from_ref(&short)),
            Duration::from_millis(500),
            "a quarter of the namespace's age"
        );
        let off = NamespacePolicy {
            history_size: None,
            ..short
        };
        assert_eq!(
            sweep_period(&cfg, &[off]),
            SWEEP_MAX,
            "an age without a history"
        );
    }
}
