//! Paced reading ([`Pacing`]): some connections of a fleet read at most a
//! number of bytes per second, to play slow consumers. Every [`TICK`] each
//! paced connection's allowance is set to `bytes_per_s × TICK` (not
//! accumulated: an idle one does not save up); a connection that spent it
//! stops reading, and is driven again when it is renewed.
//!
//! The socket's receive buffer is left alone: Linux grows it only for a
//! reader that keeps up, so a paced one keeps the initial `tcp_rmem`
//! (128 KiB here). Shrinking it with `SO_RCVBUF` on an open connection
//! makes the kernel drop what the window already allowed, and the
//! server's retransmission backoff, not the pace, then sets the rate (and
//! keeps setting it after the pacing ends).

use super::Fleet;
use std::time::{Duration, Instant};

/// How often paced connections get their allowance.
pub const TICK: Duration = Duration::from_millis(50);

/// The paced connections of a fleet.
#[derive(Debug, Clone)]
pub(super) struct Pacing {
    pub tokens: Vec<usize>,
    /// Bytes each may read per [`TICK`] (at least 1).
    pub per_tick: usize,
    pub next: Instant,
}

/// Bytes per [`TICK`] for a rate of `bytes_per_s` (at least 1).
pub fn per_tick(bytes_per_s: u64) -> usize {
    ((bytes_per_s as u128 * TICK.as_millis() / 1000) as usize).max(1)
}

impl Fleet {
    /// From now on, connections `tokens` (open ones) read at most
    /// `bytes_per_s` bytes per second.
    pub fn pace(&mut self, tokens: Vec<usize>, bytes_per_s: u64) {
        let per_tick = per_tick(bytes_per_s);
        for &t in &tokens {
            if let Some(c) = self.conns.get_mut(t).and_then(Option::as_mut) {
                c.allowance = Some(per_tick);
            }
        }
        self.pacing = Some(Pacing {
            tokens,
            per_tick,
            next: Instant::now() + TICK,
        });
    }

    /// Ends paced reading: every paced connection reads at full speed again.
    pub fn unpace(&mut self) {
        let Some(p) = self.pacing.take() else {
            return;
        };
        for t in p.tokens {
            if let Some(c) = self.conns.get_mut(t).and_then(Option::as_mut) {
                c.allowance = None;
                if c.starved {
                    self.reread.push(t);
                }
            }
        }
    }

    /// Renews the allowances when their time has come; the connections
    /// that had stopped are read again in this turn. Returns when the next
    /// renewal is due.
    pub(super) fn renew_allowances(&mut self, now: Instant) -> Option<Instant> {
        let p = self.pacing.as_mut()?;
        if now >= p.next {
            // Late turns do not bank ticks.
            p.next = (p.next + TICK).max(now);
            for &t in &p.tokens {
                if let Some(c) = self.conns.get_mut(t).and_then(Option::as_mut) {
                    c.allowance = Some(p.per_tick);
                    if c.starved {
                        c.starved = false;
                        self.reread.push(t);
                    }
                }
            }
        }
        Some(p.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowance_per_tick() {
        assert_eq!(per_tick(2000), 100);
        assert_eq!(per_tick(1), 1, "at least a byte");
        assert_eq!(per_tick(1_000_000), 50_000);
    }
}
