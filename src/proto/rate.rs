//! A token bucket for the rate limits (control frames, connects, publishes),
//! refilled from a millisecond clock the caller passes in: no clock is read
//! here, so the limits behave the same under tests, fuzzers and both backends.

/// Highest rate a bucket honours, per second (keeps the arithmetic in `i32`).
pub const MAX_RATE: u32 = 1_000_000;

/// A reading up to this much older than a bucket's last one is a clock
/// stepping back (threads sharing a bucket read their clocks apart), not
/// the clock wrapping after 49 days: it refills nothing.
const STEP_BACK_MS: u32 = 60_000;

/// Holds up to one second's worth of a rate (`rate` tokens), counted in
/// thousandths of a token; refilled continuously at `rate` per second. A
/// rate of 0 means unlimited. Eight bytes: the rate itself lives in the
/// configuration and is passed to every call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    /// Negative while in debt (see [`Self::spend`]).
    milli: i32,
    last_ms: u32,
}

fn cap(rate: u32) -> i32 {
    (rate.min(MAX_RATE) * 1000) as i32
}

impl TokenBucket {
    /// A full bucket at `now_ms`.
    pub fn full(rate: u32, now_ms: u32) -> Self {
        Self {
            milli: cap(rate),
            last_ms: now_ms,
        }
    }

    /// Adds what accrued since the last refill (the clock may wrap).
    pub fn refill(&mut self, rate: u32, now_ms: u32) {
        let elapsed = now_ms.wrapping_sub(self.last_ms);
        if elapsed > u32::MAX - STEP_BACK_MS {
            // A reading a little older than the last one (two threads'
            // clocks racing to a shared bucket), not a gap of 49 days:
            // nothing is gained and the later reading stays.
            return;
        }
        self.last_ms = now_ms;
        // In i64: a gap of 2^32 ms at the highest rate, and a debt of
        // nearly i32::MIN, both fit; the result lies between the old level
        // and the cap, so it fits back in i32. (Capping the gain itself, as
        // this once did at two seconds' worth, left a debt of more than
        // that unpaid however long the wait.)
        let gain = elapsed as i64 * rate.min(MAX_RATE) as i64;
        self.milli = (self.milli as i64 + gain).min(cap(rate) as i64) as i32;
    }

    /// Takes a token if there is one; `false` (nothing taken) when empty.
    pub fn take(&mut self, rate: u32, now_ms: u32) -> bool {
        if rate == 0 {
            return true;
        }
        self.refill(rate, now_ms);
        if self.milli < 1000 {
            return false;
        }
        self.milli -= 1000;
        true
    }

    /// Takes a token even if there is none, going into debt; see
    /// [`Self::wait_ms`] for how long the debt lasts.
    pub fn spend(&mut self, rate: u32, now_ms: u32) {
        self.spend_n(rate, now_ms, 1);
    }

    /// [`Self::spend`] of `n` tokens at once (a debt of at most ~2 million
    /// tokens is kept: more saturates).
    pub fn spend_n(&mut self, rate: u32, now_ms: u32, n: u32) {
        if rate == 0 || n == 0 {
            return;
        }
        self.refill(rate, now_ms);
        let milli = (n as i64 * 1000).min(i32::MAX as i64) as i32;
        self.milli = self.milli.saturating_sub(milli);
    }

    /// Is the bucket out of debt at `now_ms` (a token may be spent)?
    pub fn ready(&mut self, rate: u32, now_ms: u32) -> bool {
        if rate == 0 {
            return true;
        }
        self.refill(rate, now_ms);
        self.milli >= 0
    }

    /// Milliseconds until the bucket is out of debt (0 when it is not).
    pub fn wait_ms(&self, rate: u32) -> u32 {
        if rate == 0 || self.milli >= 0 {
            return 0;
        }
        (-(self.milli as i64) as u64).div_ceil(rate.min(MAX_RATE) as u64) as u32
    }

    /// Would the bucket be full at `now_ms` (as good as a new one)?
    pub fn is_full(&self, rate: u32, now_ms: u32) -> bool {
        let mut b = *self;
        b.refill(rate, now_ms);
        b.milli >= cap(rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_that_steps_back_refills_nothing() {
        let mut b = TokenBucket::full(10, 5_000);
        for _ in 0..10 {
            assert!(b.take(10, 5_000));
        }
        // Another thread's older reading: not 49 days of refill.
        assert!(!b.take(10, 4_990));
        assert!(!b.is_full(10, 4_000));
        assert_eq!(b.last_ms, 5_000, "the later reading stays");
        assert!(!b.take(10, 5_099));
        assert!(b.take(10, 5_100), "refilled from the later reading");
        // A real wrap, far ahead: refilled.
        let mut w = TokenBucket::full(10, u32::MAX - 10);
        w.spend(10, u32::MAX - 10);
        assert!(w.is_full(10, 200_000));
    }

    #[test]
    fn refills_at_its_rate_up_to_one_second() {
        let mut b = TokenBucket::full(10, 0);
        for _ in 0..10 {
            assert!(b.take(10, 0));
        }
        assert!(!b.take(10, 0));
        assert!(!b.take(10, 99), "0.99 tokens after 99 ms");
        assert!(b.take(10, 100));
        assert!(b.is_full(10, 100_000));
        b.refill(10, 100_000);
        assert_eq!(b.milli, 10_000, "capped at one second's worth");
    }

    #[test]
    fn debt_is_repaid_at_the_rate() {
        let mut b = TokenBucket::full(40, 0);
        for _ in 0..80 {
            b.spend(40, 0);
        }
        assert_eq!(b.wait_ms(40), 1000, "40 tokens of debt at 40/s");
        b.refill(40, 500);
        assert_eq!(b.wait_ms(40), 500);
        assert!(!b.take(40, 999));
        assert!(b.take(40, 1025), "one token after the debt is repaid");
    }

    #[test]
    fn a_debt_of_many_seconds_is_repaid_by_the_wait_it_announced() {
        let mut b = TokenBucket::full(10, 0);
        for _ in 0..100 {
            b.spend(10, 0);
        }
        assert_eq!(b.wait_ms(10), 9000, "90 tokens of debt at 10/s");
        b.refill(10, 9000);
        assert_eq!(b.wait_ms(10), 0, "repaid in one refill after the wait");
        assert!(b.take(10, 9100));
    }

    #[test]
    fn zero_is_unlimited_and_the_clock_may_wrap() {
        let mut b = TokenBucket::full(0, 0);
        for _ in 0..1000 {
            assert!(b.take(0, 0));
            b.spend(0, 0);
        }
        assert_eq!(b.wait_ms(0), 0);
        let mut w = TokenBucket::full(5, u32::MAX - 10);
        for _ in 0..5 {
            assert!(w.take(5, u32::MAX - 10));
        }
        assert!(w.take(5, 200), "211 ms across the wrap: one token back");
    }

    #[test]
    fn huge_rates_and_long_gaps_do_not_overflow() {
        let mut b = TokenBucket::full(u32::MAX, 0);
        b.refill(u32::MAX, u32::MAX / 2);
        assert!(b.take(u32::MAX, u32::MAX / 2));
        for _ in 0..10_000_000 {
            b.spend(1, 0);
        }
        assert!(b.wait_ms(1) > 0);
    }
}
