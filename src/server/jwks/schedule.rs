//! When the JWKS fetcher fetches, sans-IO: the caller passes the time and
//! what it was asked since its last fetch began; [`Schedule::poll`]
//! answers a fetch now (and why) or how long to sleep, and
//! [`Schedule::handle_fetched`] takes each fetch's outcome.
//!
//! Invariant: fetches asked by tokens naming an unknown `kid` begin at
//! least [`UNKNOWN_KID_INTERVAL`] apart, whatever the clients send; every
//! other fetch is the server's own (the period, a retry, a reload).

use std::time::{Duration, Instant};

/// How often the set is fetched when nothing asks sooner: a key the
/// issuer publishes ahead of a rotation is in force within this, and one
/// it withdraws stops verifying within this.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// The least time between two fetches asked by tokens naming a `kid` the
/// set lacks: what a client sending random `kid`s makes the server send
/// the JWKS host is one request per this.
pub const UNKNOWN_KID_INTERVAL: Duration = Duration::from_secs(30);
/// The wait after a failed fetch, doubled at each failure in a row up to
/// [`RETRY_MAX`]: a JWKS host that is down at start is tried again within
/// a second, one that stays down about once a minute.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between retries.
pub const RETRY_MAX: Duration = Duration::from_secs(60);

/// Why a fetch is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The first, the periodic one, or a retry after a failure.
    Due,
    /// A reload (`SIGHUP`) asked for the set now.
    Reload,
    /// A worker met a token naming a key the set lacks.
    UnknownKid,
}

impl Why {
    /// For the logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::Due => "scheduled",
            Self::Reload => "reload",
            Self::UnknownKid => "unknown kid",
        }
    }
}

/// What the fetcher was asked since its last fetch began.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Asked {
    pub reload: bool,
    pub unknown_kid: bool,
}

/// [`Schedule::poll`]'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Fetch(Why),
    /// Nothing to do for this long (or until asked again).
    Sleep(Duration),
}

/// The fetcher's timing state.
#[derive(Debug)]
pub struct Schedule {
    /// When the next fetch is due on its own: [`REFRESH_INTERVAL`] after a
    /// success, a backoff after a failure.
    due: Instant,
    /// When the last fetch asked by an unknown `kid` began.
    last_kid_fetch: Option<Instant>,
    /// Failed fetches in a row.
    failures: u32,
}

impl Schedule {
    /// A schedule whose first fetch is due at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            due: now,
            last_kid_fetch: None,
            failures: 0,
        }
    }

    /// What to do at `now`, given what was `asked`.
    pub fn poll(&self, now: Instant, asked: Asked) -> Next {
        if asked.reload {
            return Next::Fetch(Why::Reload);
        }
        if now >= self.due {
            return Next::Fetch(Why::Due);
        }
        let mut until = self.due;
        if asked.unknown_kid {
            let allowed = self
                .last_kid_fetch
                .map_or(now, |t| t + UNKNOWN_KID_INTERVAL);
            if now >= allowed {
                return Next::Fetch(Why::UnknownKid);
            }
            until = until.min(allowed);
        }
        Next::Sleep(until - now)
    }

    /// Records a fetch made for `why` that began at `began` and ended at
    /// `now`, `ok` or not.
    pub fn handle_fetched(&mut self, began: Instant, now: Instant, why: Why, ok: bool) {
        if why == Why::UnknownKid {
            self.last_kid_fetch = Some(began);
        }
        if ok {
            self.failures = 0;
            self.due = now + REFRESH_INTERVAL;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.due = now + retry_after(self.failures);
        }
    }

    /// Failed fetches in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// The wait after `failures` failed fetches in a row (at least one).
fn retry_after(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    RETRY_FIRST.saturating_mul(1 << doublings).min(RETRY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KID: Asked = Asked {
        reload: false,
        unknown_kid: true,
    };
    const NOTHING: Asked = Asked {
        reload: false,
        unknown_kid: false,
    };

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn the_first_fetch_is_at_once_and_the_next_a_refresh_interval_after_a_success() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        assert_eq!(s.poll(t0, NOTHING), Next::Fetch(Why::Due));
        s.handle_fetched(t0, t0 + secs(1), Why::Due, true);
        assert_eq!(s.poll(t0 + secs(1), NOTHING), Next::Sleep(REFRESH_INTERVAL));
        assert_eq!(
            s.poll(t0 + secs(1) + REFRESH_INTERVAL, NOTHING),
            Next::Fetch(Why::Due)
        );
    }

    #[test]
    fn failures_back_off_from_a_second_doubling_to_a_minute_and_a_success_resets() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..9 {
            assert_eq!(s.poll(now, NOTHING), Next::Fetch(Why::Due));
            s.handle_fetched(now, now, Why::Due, false);
            let Next::Sleep(d) = s.poll(now, NOTHING) else {
                panic!("a failure is not retried at once");
            };
            waits.push(d.as_secs());
            now += d;
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(s.failures(), 9);
        s.handle_fetched(now, now, Why::Due, true);
        assert_eq!(s.failures(), 0);
        assert_eq!(s.poll(now, NOTHING), Next::Sleep(REFRESH_INTERVAL));
        // Past u32::MAX failures, still a minute.
        assert_eq!(retry_after(u32::MAX), RETRY_MAX);
    }

    #[test]
    fn an_unknown_kid_fetches_at_once_then_at_most_once_per_interval() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        s.handle_fetched(t0, t0, Why::Due, true);
        let at = t0 + secs(5);
        assert_eq!(s.poll(at, KID), Next::Fetch(Why::UnknownKid));
        s.handle_fetched(at, at + secs(1), Why::UnknownKid, true);
        // Asked again a second later: sleeps until the interval has passed
        // since the last such fetch began.
        assert_eq!(
            s.poll(at + secs(1), KID),
            Next::Sleep(UNKNOWN_KID_INTERVAL - secs(1))
        );
        assert_eq!(
            s.poll(at + UNKNOWN_KID_INTERVAL, KID),
            Next::Fetch(Why::UnknownKid)
        );
        // A reload is the operator's: never held back.
        assert_eq!(
            s.poll(
                at + secs(2),
                Asked {
                    reload: true,
                    unknown_kid: true
                }
            ),
            Next::Fetch(Why::Reload)
        );
    }

    #[test]
    fn a_flood_of_unknown_kids_for_an_hour_fetches_once_per_interval_and_no_more() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        let (mut due, mut kid) = (0, 0);
        let mut now = t0;
        let end = t0 + secs(3600);
        // Asked every 10 ms; every other fetch fails, so retries mix in.
        while now < end {
            if let Next::Fetch(why) = s.poll(now, KID) {
                match why {
                    Why::UnknownKid => kid += 1,
                    Why::Due => due += 1,
                    Why::Reload => unreachable!(),
                }
                let ok = (due + kid) % 2 == 0;
                s.handle_fetched(now, now + secs(1), why, ok);
                now += secs(1);
            }
            now += Duration::from_millis(10);
        }
        let most = 3600 / UNKNOWN_KID_INTERVAL.as_secs() + 1;
        assert!(
            kid <= most,
            "{kid} fetches for unknown kids, at most {most}"
        );
        assert!(kid >= most - 2, "{kid}: the limit also lets them through");
        assert!(due <= 3600 / RETRY_FIRST.as_secs(), "{due}");
    }
}
