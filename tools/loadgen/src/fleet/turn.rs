//! One event-loop turn of a [`Fleet`] (a `poll` and the connections it
//! reports, plus deferred re-reads) and the bookkeeping around it:
//! starting and registering connections, and counting those that open,
//! fail, time out in the handshake or end.

use super::Fleet;
use crate::client::{Conn, Failure, Sink, Step};
use mio::{Interest, Token};
use std::io;
use std::time::{Duration, Instant};

impl Fleet {
    pub(super) fn start_one(&mut self) -> io::Result<()> {
        let t = self.conns.len();
        let g = self.cfg.first + t;
        let targets = &self.cfg.targets;
        let (dst, template) = targets.dst(g);
        let key = self.rng.ws_key();
        match Conn::connect(targets.src(g), *dst, key, template, targets.topic(g)) {
            Ok(c) => self.add(t, c)?,
            Err(e) => {
                self.conns.push(None);
                self.last_done = Instant::now();
                *self
                    .failures
                    .entry(Failure::Connect(e.kind()).key())
                    .or_default() += 1;
            }
        }
        Ok(())
    }

    pub(super) fn add(&mut self, t: usize, mut c: Conn) -> io::Result<()> {
        debug_assert_eq!(t, self.conns.len());
        self.poll.registry().register(
            &mut c.stream,
            Token(t),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.conns.push(Some(c));
        self.opening.push_back(t);
        self.in_flight += 1;
        Ok(())
    }

    /// One `poll` and the work it reports (plus deferred re-reads).
    pub(super) fn turn(&mut self, wait: Duration, sink: &mut dyn Sink) -> io::Result<()> {
        let now = Instant::now();
        let wait = match self.renew_allowances(now) {
            Some(next) => wait.min(next.saturating_duration_since(now)),
            None => wait,
        };
        let wait = if self.reread.is_empty() {
            wait
        } else {
            Duration::ZERO
        };
        match self.poll.poll(&mut self.events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut ready: Vec<usize> = std::mem::take(&mut self.reread);
        ready.extend(self.events.iter().map(|e| e.token().0));
        for t in ready {
            let Some(c) = self.conns.get_mut(t).and_then(Option::as_mut) else {
                continue;
            };
            let was_opening = c.is_opening();
            let step = c.drive(
                t,
                &mut self.scratch,
                &mut self.rng,
                &mut self.counters,
                sink,
            );
            if c.reread {
                self.reread.push(t);
            }
            if let (true, Some(at)) = (was_opening, c.opened_at) {
                self.latency
                    .record_ns(at.saturating_duration_since(c.started).as_nanos() as u64);
                self.in_flight -= 1;
                self.open += 1;
                self.last_done = at;
                if self.watch {
                    self.notices.push((t, true));
                }
            }
            self.apply(t, step);
        }
        Ok(())
    }

    pub(super) fn apply(&mut self, t: usize, step: Step) {
        match step {
            Step::Continue => {}
            Step::Failed(f) => self.fail(t, f),
            Step::Ended(end) => {
                self.conns[t] = None;
                self.open -= 1;
                if self.closing && end == crate::client::End::Clean {
                    self.clean_closes += 1;
                } else {
                    *self.ended.entry(end.key()).or_default() += 1;
                }
            }
        }
    }

    pub(super) fn fail(&mut self, t: usize, f: Failure) {
        if self.conns[t].take().is_some() {
            self.in_flight -= 1;
            self.last_done = Instant::now();
            *self.failures.entry(f.key()).or_default() += 1;
            if self.watch {
                self.notices.push((t, false));
            }
        }
    }

    /// Fails the connections whose handshake has run past the timeout.
    pub fn expire_handshakes(&mut self, now: Instant) {
        while let Some(&t) = self.opening.front() {
            match self.conns[t].as_ref() {
                Some(c) if c.is_opening() => {
                    if now.saturating_duration_since(c.started) < self.cfg.handshake_timeout {
                        return;
                    }
                    self.opening.pop_front();
                    self.fail(t, Failure::Timeout);
                }
                _ => {
                    self.opening.pop_front();
                }
            }
        }
    }

    /// When the oldest opening connection times out.
    pub(super) fn next_expiry(&self) -> Option<Instant> {
        self.opening
            .iter()
            .find_map(|&t| self.conns[t].as_ref().filter(|c| c.is_opening()))
            .map(|c| c.started + self.cfg.handshake_timeout)
    }
}
