//! The buffer budget (`--max-buffered-bytes`): one pool for the process,
//! and each worker's lease of it.
//!
//! Each worker may hold at most its *share* (the budget divided by the
//! primary workers, one per core), so one worker's load never takes what
//! another's honest clients need. With io_uring the server may also run
//! overflow workers (their rings take the connections past the primaries'
//! fixed-file tables), and a share each would add up to more than the
//! budget (outside probe: 14 workers with the defaults, 127 % of a
//! 256 MiB budget held). So what a worker holds is also leased from the
//! process's pool, in [`chunk`]s, as it grows, and given back at the end
//! of the worker's turn once it is no longer held: every worker together never holds more
//! than the budget.

use std::sync::atomic::{AtomicUsize, Ordering};

/// What is left of the process's budget: the bytes no worker has leased.
#[derive(Debug)]
pub struct Pool {
    free: AtomicUsize,
    total: usize,
}

impl Pool {
    /// A pool of `total` bytes, none leased.
    pub fn new(total: usize) -> Self {
        Self {
            free: AtomicUsize::new(total),
            total,
        }
    }

    /// The bytes no worker has leased.
    pub fn free(&self) -> usize {
        self.free.load(Ordering::Relaxed)
    }

    /// Takes up to `want` bytes; what it took.
    pub fn take(&self, want: usize) -> usize {
        let mut free = self.free();
        loop {
            let took = want.min(free);
            if took == 0 {
                return 0;
            }
            match self.free.compare_exchange_weak(
                free,
                free - took,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return took,
                Err(now) => free = now,
            }
        }
    }

    /// Gives back `n` bytes taken before.
    pub fn give(&self, n: usize) {
        let was = self.free.fetch_add(n, Ordering::Relaxed);
        debug_assert!(was + n <= self.total, "more given back than taken");
    }
}

/// The step a lease grows and shrinks by: 1/1024 of the budget (1 MiB
/// with the default 1 GiB), at least 4 KiB and at most 1 MiB; a worker
/// keeps at most two beyond what it holds.
pub fn chunk(total: usize) -> usize {
    (total / 1024).clamp(4096, 1 << 20)
}

/// A worker's lease: the bytes of the pool it holds for what it buffers.
#[derive(Debug)]
pub struct Lease {
    /// Bytes taken from the pool.
    held: usize,
    /// The most this worker may hold: its share of the budget.
    share: usize,
    chunk: usize,
}

impl Lease {
    /// An empty lease of at most `share` bytes from a pool of `total`.
    pub fn new(share: usize, total: usize) -> Self {
        Self {
            held: 0,
            share,
            chunk: chunk(total),
        }
    }

    /// The most the worker may buffer now: its share, or less when the
    /// other workers' leases leave less in the pool.
    pub fn limit(&self, pool: &Pool) -> usize {
        self.share.min(self.held + pool.free())
    }

    /// Whether `buffered` bytes are within `percent` % of the
    /// [`limit`](Self::limit); the lease first grows to cover them (in
    /// chunks, up to the share) where the pool has room.
    pub fn fits(&mut self, pool: &Pool, buffered: usize, percent: usize) -> bool {
        if buffered.saturating_mul(100) <= self.held.saturating_mul(percent.min(100)) {
            // Within the part of the lease held already: the pool is not
            // looked at (the fan-out asks once per subscriber).
            return true;
        }
        if buffered > self.held && self.held < self.share {
            let want = (buffered - self.held)
                .div_ceil(self.chunk)
                .saturating_mul(self.chunk)
                .min(self.share - self.held);
            self.held += pool.take(want);
        }
        let limit = self.limit(pool);
        buffered
            <= if percent >= 100 {
                limit
            } else {
                limit / 100 * percent
            }
    }

    /// Gives back what is held beyond `buffered` and two chunks (a worker
    /// calls it at each turn's end).
    pub fn settle(&mut self, pool: &Pool, buffered: usize) {
        let keep = buffered.saturating_add(2 * self.chunk).min(self.share);
        if self.held > keep {
            // Down to one chunk over, so a worker near the line does not
            // give and take at every turn.
            let down_to = buffered.saturating_add(self.chunk).min(self.share);
            pool.give(self.held - down_to);
            self.held = down_to;
        }
    }

    /// The bytes this lease holds.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: usize = 1 << 20;

    /// Fourteen workers with a share of half the budget each (2 primaries,
    /// 12 overflow workers, as with the defaults on two cores), every one
    /// loaded to its share: together they hold the budget, never more, and
    /// those that came last are refused what the pool no longer has.
    #[test]
    fn workers_together_never_hold_more_than_the_budget() {
        let total = 256 * MB;
        let pool = Pool::new(total);
        let mut leases: Vec<Lease> = (0..14).map(|_| Lease::new(total / 2, total)).collect();
        let mut buffered = [0usize; 14];
        let mut refused = 0;
        for step in 0..200 {
            for (w, lease) in leases.iter_mut().enumerate() {
                let grown = buffered[w] + MB + step % 3 * 4096;
                if lease.fits(&pool, grown, 100) {
                    buffered[w] = grown;
                } else {
                    refused += 1;
                }
                assert!(lease.held() <= total / 2);
            }
            let held: usize = leases.iter().map(Lease::held).sum();
            assert_eq!(held + pool.free(), total);
            assert!(buffered.iter().sum::<usize>() <= total);
        }
        assert!(refused > 0);
        // Let go: everything comes back at the next turn.
        for lease in &mut leases {
            lease.settle(&pool, 0);
        }
        assert_eq!(pool.free(), total - 14 * chunk(total));
        let held: usize = leases.iter().map(Lease::held).sum();
        assert_eq!(held + pool.free(), total);
    }

    /// A worker alone may fill its share and no more; another worker's
    /// lease lowers its limit; the 90 % line is of that limit.
    #[test]
    fn a_lease_stops_at_its_share_and_at_what_others_left() {
        const GB: usize = 1 << 30;
        let pool = Pool::new(GB);
        let mut a = Lease::new(GB / 2, GB);
        let mut b = Lease::new(GB / 2, GB);
        assert!(a.fits(&pool, GB / 2, 100));
        assert!(!a.fits(&pool, GB / 2 + 1, 100));
        assert_eq!(a.held(), GB / 2);
        assert!(b.fits(&pool, 400 * MB, 100));
        // A third lease (an overflow worker) finds 112 MiB left.
        let mut c = Lease::new(GB / 2, GB);
        assert_eq!(c.limit(&pool), 112 * MB);
        assert!(c.fits(&pool, 100 * MB, 100));
        assert!(!c.fits(&pool, 102 * MB, 90));
        assert!(!c.fits(&pool, 113 * MB, 100));
        // b lets go of most: c may grow.
        b.settle(&pool, MB);
        assert_eq!(b.held(), 2 * MB);
        assert!(c.fits(&pool, 300 * MB, 100));
    }

    /// A worker near the line keeps a chunk over what it holds, so it does
    /// not give back and take again at every turn.
    #[test]
    fn settling_keeps_slack_and_chunks_have_bounds() {
        let pool = Pool::new(1 << 30);
        let mut a = Lease::new(512 * MB, 1 << 30);
        assert!(a.fits(&pool, 10, 100));
        assert_eq!(a.held(), MB);
        a.settle(&pool, 10);
        assert_eq!(a.held(), MB);
        assert!(a.fits(&pool, 5 * MB, 100));
        assert_eq!(a.held(), 5 * MB);
        a.settle(&pool, 2 * MB);
        assert_eq!(a.held(), 3 * MB);
        a.settle(&pool, MB);
        assert_eq!(a.held(), 3 * MB);
        a.settle(&pool, 0);
        assert_eq!(a.held(), MB);
        assert_eq!(chunk(1 << 20), 4096);
        assert_eq!(chunk(usize::MAX), MB);
    }
}
