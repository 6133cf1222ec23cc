//! What a read does to a connection: the session consumes the bytes, the
//! worker re-measures what the connection holds against the buffer
//! budget, then decides whether to read it again (publish pacing, a full
//! outbound queue, a mailbox over its mark hold it).

use super::*;
use crate::server::session::WIRE_WORK;

impl<S> Core<S> {
    /// Re-measures what `key` holds against the buffer budget; `true` when
    /// it grew and the worker is now over its budget.
    ///
    /// A connection holding [`LARGE_HOLDER_BYTES`] or more is cut earlier,
    /// once the worker is over [`LARGE_HOLDER_SHARE_PERCENT`] of its budget:
    /// large holders (partial 16 MiB messages, stalled queues) can then never
    /// fill the budget to its last byte, and the headroom left is for the
    /// small requests, replies and echoes of everyone else. So is one whose
    /// compressed message in progress holds an inflater (64 KiB charged for
    /// a few bytes sent: outside probe, 16 400 such connections filled the
    /// default budget with ~115 KB of traffic, and an honest 200-byte echo
    /// was then closed 1013).
    pub(super) fn recharge(&mut self, key: usize) -> bool {
        let conn = &mut self.conns[key];
        let grew = recharge(conn, &mut self.buffered, &self.shared.stats[self.id]);
        let large = conn.charged as usize >= LARGE_HOLDER_BYTES || conn.session.inflating();
        let percent = if large {
            LARGE_HOLDER_SHARE_PERCENT
        } else {
            100
        };
        grew && self.over_budget(percent)
    }

    /// Whether what the worker holds is over `percent` % of what it may
    /// hold: its share of the budget, or what the other workers' leases
    /// left of the process's pool if that is less. The lease grows first
    /// to cover what is held, where the pool has room.
    pub(super) fn over_budget(&mut self, percent: usize) -> bool {
        !self.lease.fits(&self.shared.budget, self.buffered, percent)
    }

    /// Moves what `key`'s wire layer (TLS) holds outside its session (a
    /// record being read, ciphertext waiting for the socket) from `was` to
    /// `now` bytes in the worker's budget. When that grew the worker past
    /// its budget, the connection is failed like any connection that grows
    /// past it (1013, or 503 in a request) and `true` is returned. The
    /// backend keeps the figure and returns it (`now` = 0) when the
    /// connection is freed.
    pub fn charge_wire(&mut self, key: usize, was: usize, now: usize) -> bool {
        let delta = now as isize - was as isize;
        if delta == 0 {
            return false;
        }
        self.buffered = (self.buffered as isize + delta) as usize;
        self.shared.stats[self.id].buffered(delta);
        if delta < 0 || !self.over_budget(100) {
            return false;
        }
        if self
            .conns
            .get(key)
            .is_none_or(|c| c.state != IoState::Active)
        {
            return false;
        }
        self.close_over_budget(key);
        self.mark_dirty(key);
        true
    }

    /// Over the buffer budget: `key`, which just grew, goes. A WebSocket
    /// is failed with 1013; an HTTP request is answered 503, which
    /// `corecast_ws_failures_total` does not count.
    fn close_over_budget(&mut self, key: usize) {
        let stats = &self.shared.stats[self.id];
        let conn = &mut self.conns[key];
        if conn.session.is_websocket() && !conn.session.takes_publications() {
            // Its close frame is queued already (it answered its client's
            // close, or failed for another reason): closing anyway, it is
            // not failed a second time, nor counted as a budget close
            // (outside probe: 39 300 clients closing with 1000 while the
            // budget was ~90 % held counted 11 849 budget closes, and 2
            // clients got 1013).
            if conn.state == IoState::Active {
                conn.state = IoState::Closing;
            }
            self.recharge(key);
            return;
        }
        stats.budget_close();
        debug!(
            worker = self.id,
            buffered = self.buffered,
            "buffer budget spent"
        );
        if conn.session.is_websocket() {
            stats.ws_failure(CloseCode::TRY_AGAIN_LATER.0);
        }
        self.ack_owed(key);
        let stats = &self.shared.stats[self.id];
        let conn = &mut self.conns[key];
        conn.session.abort(
            CloseCode::TRY_AGAIN_LATER,
            Status::ServiceUnavailable,
            "server memory budget exceeded",
            stats,
        );
        conn.state = IoState::Closing;
        self.recharge(key);
    }

    /// Input `key`'s backend kept without processing (reading was paused)
    /// is charged to the buffer budget; a connection that takes the worker
    /// over it is closed like any that grows past it.
    pub fn charge_held(&mut self, key: usize) {
        if self.recharge(key) {
            self.close_over_budget(key);
        }
    }

    /// Processes input for `key`: `buf` holds the bytes kept from earlier
    /// input (see [`Session::restore_pending`]) followed by the new ones.
    pub fn input(&mut self, key: usize, buf: &mut [u8]) -> Input {
        let now_ms = self.now_ms();
        let stats = &self.shared.stats[self.id];
        let conn = &mut self.conns[key];
        conn.keepalive_ms = now_ms;
        conn.set_flag(PING_PENDING, false);
        let others = self.buffered.saturating_sub(conn.charged as usize);
        // This turn's work so far (earlier reads or receive completions of
        // this turn), and the bytes new in this input (the rest were kept
        // from earlier input and counted then).
        let serial = conn.serial;
        let before = match self.turn_work.get(&key) {
            Some(&(s, work)) if s == serial => work,
            _ => 0,
        };
        let new_bytes = buf.len().saturating_sub(conn.session.pending_len());
        let mut ctx = Ctx {
            shared: &self.shared,
            stats,
            shard: &mut self.shard,
            me: (key, conn.serial),
            now: self.now,
            now_ms,
            peer: if self.addresses.is_empty() {
                None
            } else {
                self.addresses.get(&key).copied()
            },
            metrics: &mut self.metrics,
            unanswered: Vec::new(),
            published: false,
            requests: 0,
            rated: None,
            resubscribed: false,
            wall_s: self.wall_s,
            grant: if self.grants.is_empty() {
                None
            } else {
                self.grants.get(&key).cloned()
            },
            yielded: false,
            room: self.lease.limit(&self.shared.budget).saturating_sub(others),
            work: before.saturating_add(new_bytes.saturating_mul(WIRE_WORK)),
            echo_compress: self.echo_compress,
        };
        // The grant held before, to store only one the session changed.
        let held = ctx.grant.as_ref().map(Arc::as_ptr);
        // A bug in what a client's bytes reach (the request, frames,
        // control messages, tokens) costs that connection, not the worker.
        let next = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            conn.session.on_input(buf, &mut ctx)
        })) {
            Ok(next) => next,
            Err(_) => {
                drop(ctx);
                return self.input_panicked(key);
            }
        };
        self.echo_compress = ctx.echo_compress;
        if ctx.published {
            conn.set_flag(PUBLISHED, true);
        }
        if ctx.work > 0 {
            self.turn_work.insert(key, (serial, ctx.work));
        }
        let yielded = ctx.yielded;
        let rated = ctx.rated.take();
        let resubscribed = ctx.resubscribed;
        if let Some(grant) = ctx.grant.take()
            && held != Some(Arc::as_ptr(&grant))
        {
            self.grants.insert(key, grant);
        }
        if ctx.requests > 0 {
            conn.set_flag(REQUEST_DONE, true);
        }
        if let Some((rate, names)) = rated {
            self.set_rates(key, rate, &names);
        }
        if resubscribed {
            self.prune_waiting(key);
        }
        // What it subscribed to or published is charged here too.
        let shard_grew = self.sync_shard_charge();
        if self.recharge(key) || (shard_grew && self.over_budget(100)) {
            self.close_over_budget(key);
            return Input::Stop;
        }
        let stats = &self.shared.stats[self.id];
        let conn = &mut self.conns[key];
        if next == Next::FlushAndClose {
            conn.state = IoState::Closing;
            return Input::Stop;
        }
        if conn.session.confirming() {
            // Not read until its publication is answered (`confirm`).
            conn.set_flag(READ_PAUSED, true);
            return Input::Stop;
        }
        let rate = self.shared.config.max_publish_rate;
        let wait = conn.session.publish_wait_ms(rate);
        if wait > 0 {
            // Over --max-publish-rate: not read until the debt is repaid.
            stats.publisher_paced();
            conn.set_flag(READ_PAUSED, true);
            let at = self.now + Duration::from_millis(wait as u64);
            // io_uring may deliver input already received while paused: one
            // entry per connection, holding the latest resume time.
            let serial = conn.serial;
            if conn.flag(PACED) {
                // Rare (input delivered while paused): the one search.
                if let Some(p) = self.paced.iter_mut().find(|p| (p.1, p.2) == (key, serial)) {
                    p.0 = p.0.max(at);
                }
            } else {
                conn.set_flag(PACED, true);
                self.paced.push((at, key, serial));
            }
            return Input::Stop;
        }
        if yielded {
            // It stopped with input left (decoded as much as one turn
            // may): read on at the next turn, what arrives meanwhile held.
            conn.set_flag(READ_PAUSED, true);
            let serial = conn.serial;
            if !conn.flag(PACED) {
                // Due at the next turn, not this one (whose `unthrottle`
                // has not run yet): the others' input of the next turn
                // comes first (on io_uring, their receives are submitted
                // while this one's is stopped).
                conn.set_flag(PACED, true);
                self.paced
                    .push((self.now + Duration::from_micros(1), key, serial));
            }
            return Input::Stop;
        }
        if conn.session.out.len()
            > conn
                .session
                .queue_bound(self.shared.config.max_outbound_bytes)
        {
            // Resumed by `after_flush` once the queue is down to half.
            conn.set_flag(READ_PAUSED, true);
            return Input::Stop;
        }
        let published = conn.take_flag(PUBLISHED);
        if (published || conn.session.is_publisher())
            && super::delivery::past_marks(&self.shared, self.now, 1)
        {
            // Every publisher, WebSocket or HTTP, is held alike: not read
            // until the mailboxes drain and catch up (`unthrottle`), so
            // pipelined requests wait in the socket, not in a mailbox, and
            // a flood of costly publications cannot keep everyone else's
            // waiting behind it for seconds.
            stats.publisher_throttled();
            conn.set_flag(READ_PAUSED, true);
            if !conn.flag(THROTTLED) {
                conn.set_flag(THROTTLED, true);
                self.throttled.push((key, conn.serial));
            }
            return Input::Stop;
        }
        Input::More
    }

    /// `key`'s input panicked (a bug): counted and logged, and the
    /// connection is closed alone, with `1011` on a WebSocket or `500` in
    /// HTTP; its subscriptions go with it as on any close.
    #[cold]
    fn input_panicked(&mut self, key: usize) -> Input {
        self.shared.panics[crate::server::PANIC_CONNECTION].fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            worker = self.id,
            "a connection's input panicked (a bug: please report it with the log); closing that connection"
        );
        // Not `fail_wire`: that drops the queue, part of which an io_uring
        // send may still be reading.
        let conn = &mut self.conns[key];
        conn.session.fail_internal();
        if conn.state == IoState::Active {
            self.start_closing(key);
        } else {
            self.mark_dirty(key);
        }
        self.recharge(key);
        Input::Stop
    }

    /// The peer sent FIN.
    pub fn eof(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        conn.set_flag(PEER_EOF, true);
        if conn.session.confirming() && conn.state == IoState::Active {
            // A publisher that half-closed after its request still gets
            // its answer (`confirm`), then the connection closes.
            return;
        }
        if conn.state == IoState::Active && conn.flag(READ_PAUSED) && conn.session.pending_len() > 0
        {
            // What it sent before its FIN waits (it was paced, or stopped
            // at a turn's worth): taken up first when it resumes, then the
            // connection closes (`after_input`).
            return;
        }
        self.answer_cut_short(key);
        self.conns[key].state = IoState::Closing;
    }

    /// A connection closing on its client's FIN with part of a request:
    /// answered `400`, as a client that half-closed can still read, and is
    /// told why nothing comes (outside probe: a cut body or head was
    /// closed without a word).
    fn answer_cut_short(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.state == IoState::Active
            && conn.session.awaiting_request()
            && conn.session.partial_request()
            && !conn.session.confirming()
            && !conn.flag(AWAIT_PROXY)
        {
            let stats = &self.shared.stats[self.id];
            conn.session.abort(
                CloseCode::POLICY_VIOLATION,
                Status::BadRequest,
                "request cut short by the client's end of stream",
                stats,
            );
            self.recharge(key);
        }
    }

    /// After a batch of input for `key`: re-arms the request deadline of a
    /// keep-alive connection, and starts closing or schedules the flush.
    pub fn after_input(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let serial = conn.serial;
        if conn.session.awaiting_request() && conn.take_flag(REQUEST_DONE) {
            // A keep-alive HTTP connection finished a request: the next one
            // gets a fresh deadline, for this request number. (Input is
            // always followed by this call, so wherever a deadline is
            // judged, a connection reading a request has had its deadline
            // armed for its current request number.)
            let generation = conn.session.requests();
            let at = ms_after(self.epoch, self.now, self.shared.config.handshake_timeout);
            self.push_request_deadline(at, key, serial, generation);
        }
        let conn = &mut self.conns[key];
        if conn.state == IoState::Active
            && conn.flag(PEER_EOF)
            && !conn.flag(READ_PAUSED)
            && !conn.session.confirming()
        {
            // Its FIN came while what it sent before waited; that is
            // taken up now, and a request it left cut short is answered.
            self.answer_cut_short(key);
            self.conns[key].state = IoState::Closing;
        }
        let conn = &self.conns[key];
        if conn.state == IoState::Closing {
            self.start_closing(key);
        } else if !conn.session.out.is_empty() {
            self.mark_dirty(key);
        }
    }
}

/// Re-measures what `conn` holds and moves the worker's total (and its
/// gauge) by the difference; `true` when it grew.
pub(super) fn recharge<S>(conn: &mut Conn<S>, buffered: &mut usize, stats: &WorkerStats) -> bool {
    let held = conn.session.held_bytes().min(u32::MAX as usize) as u32;
    let delta = held as isize - conn.charged as isize;
    if delta == 0 {
        return false;
    }
    conn.charged = held;
    *buffered = (*buffered as isize + delta) as usize;
    stats.buffered(delta);
    delta > 0
}
