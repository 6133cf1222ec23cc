//! One clock for every loadgen process: `CLOCK_MONOTONIC` in nanoseconds.
//!
//! On Linux `CLOCK_MONOTONIC` is system-wide, so a timestamp taken in the
//! publishing process and read in a subscriber's process measures latency
//! without clock synchronisation. `Instant` reads the same clock; an
//! [`Anchor`] converts between the two inside one process.

use std::time::{Duration, Instant};

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the struct it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_MONOTONIC is always available on Linux");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A pair of readings, `Instant` and [`mono_ns`], taken together: converts
/// `Instant`s of this process to system-wide nanoseconds and back (to
/// within the fraction of a microsecond between the two reads).
#[derive(Debug, Clone, Copy)]
pub struct Anchor {
    instant: Instant,
    ns: u64,
}

impl Anchor {
    pub fn now() -> Self {
        Self {
            instant: Instant::now(),
            ns: mono_ns(),
        }
    }

    /// `at` in [`mono_ns`] nanoseconds.
    pub fn ns(&self, at: Instant) -> u64 {
        match at.checked_duration_since(self.instant) {
            Some(d) => self.ns + d.as_nanos() as u64,
            None => self
                .ns
                .saturating_sub(self.instant.duration_since(at).as_nanos() as u64),
        }
    }

    /// The `Instant` of a [`mono_ns`] timestamp.
    pub fn instant(&self, ns: u64) -> Instant {
        if ns >= self.ns {
            self.instant + Duration::from_nanos(ns - self.ns)
        } else {
            self.instant
                .checked_sub(Duration::from_nanos(self.ns - ns))
                .unwrap_or(self.instant)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchor_round_trips_and_agrees_with_the_clock() {
        let a = Anchor::now();
        let later = Instant::now() + Duration::from_millis(5);
        let ns = a.ns(later);
        assert_eq!(a.instant(ns), later);
        let direct = mono_ns();
        let via = a.ns(Instant::now());
        // Both read CLOCK_MONOTONIC: within a millisecond of each other.
        assert!(via.abs_diff(direct) < 1_000_000, "{via} vs {direct}");
        let earlier = a.ns(a.instant - Duration::from_micros(3));
        assert_eq!(a.ns(a.instant) - earlier, 3_000);
    }
}
