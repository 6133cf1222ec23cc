//! Who may connect and publish: the process-wide connection cap and the
//! per-source-address limits (connections, connect rate, HTTP publish rate).
//!
//! Shared by every worker. The process-wide count is one atomic; the
//! per-address state is a table split into [`STRIPES`] mutex-guarded maps
//! (one lock per accept, held for a hash lookup), consulted only when a
//! per-address limit is set. Entries live while the address holds a
//! connection and until its rate buckets have refilled; a full table
//! refuses new addresses rather than grow without bound.

use crate::proto::rate::TokenBucket;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Default process-wide cap on open connections (flag `--max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 250_000;
/// Mutex-guarded shards of the per-address table.
const STRIPES: usize = 64;
/// Most addresses tracked at once, beyond those holding a connection.
const SPARE_ENTRIES: usize = 65_536;

/// One shard of the per-address table.
type Stripe = Mutex<HashMap<IpAddr, Entry>>;

/// Why a connection or a publication was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The process holds `--max-connections`.
    ProcessFull,
    /// The source address holds `--max-connections-per-ip`.
    AddressFull,
    /// The source address connects faster than `--max-connect-rate-per-ip`.
    ConnectRate,
    /// The per-address table is full (too many distinct addresses at once).
    TableFull,
}

impl Refusal {
    /// The reason sent in the refusal's body.
    pub fn reason(self) -> &'static str {
        match self {
            Self::ProcessFull => "server at its connection limit (see --max-connections)",
            Self::AddressFull => "too many connections from your address",
            Self::ConnectRate => "connecting too fast from your address",
            Self::TableFull => "server tracking too many addresses",
        }
    }

    /// Label of `corecast_connections_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::ProcessFull => "max_connections",
            Self::AddressFull => "max_connections_per_ip",
            Self::ConnectRate => "connect_rate",
            Self::TableFull => "address_table_full",
        }
    }

    pub const ALL: [Refusal; 4] = [
        Self::ProcessFull,
        Self::AddressFull,
        Self::ConnectRate,
        Self::TableFull,
    ];

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The limits, as configured (0 = off for the per-address ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    pub max_connections: usize,
    pub max_connections_per_ip: u32,
    pub connect_rate_per_ip: u32,
    pub publish_rate_per_ip: u32,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    conns: u32,
    connect: TokenBucket,
    publish: TokenBucket,
}

/// Process-wide admission state (one per server).
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    open: AtomicUsize,
    /// Present when a per-address limit is set.
    table: Option<Box<[Stripe]>>,
    tracked: AtomicUsize,
    epoch: Instant,
}

/// What [`Admission::admit`] granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// Counted in the per-address table: give the address back to
    /// [`Admission::release`].
    pub per_ip: bool,
}

impl Admission {
    pub fn new(limits: AdmissionLimits) -> Self {
        let per_ip = limits.max_connections_per_ip > 0
            || limits.connect_rate_per_ip > 0
            || limits.publish_rate_per_ip > 0;
        Self {
            limits,
            open: AtomicUsize::new(0),
            table: per_ip.then(|| (0..STRIPES).map(|_| Mutex::default()).collect()),
            tracked: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u32 {
        self.epoch.elapsed().as_millis() as u32
    }

    fn stripe(&self, ip: &IpAddr) -> Option<&Stripe> {
        let table = self.table.as_ref()?;
        // Fold the address: cheap, and spreads 127.0.x.y and /64s alike.
        let h = match ip {
            IpAddr::V4(a) => u32::from(*a).wrapping_mul(0x9e37_79b9) >> 16,
            IpAddr::V6(a) => (u128::from(*a) >> 64) as u32 ^ (u128::from(*a) as u32),
        };
        Some(&table[h as usize % table.len()])
    }

    /// Open connections counted against `--max-connections`.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts a new connection from `peer`, or says why it is refused.
    /// Without a known address only the process-wide cap applies.
    pub fn admit(&self, peer: Option<IpAddr>) -> Result<Ticket, Refusal> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.limits.max_connections {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::ProcessFull);
        }
        let Some((ip, stripe)) = peer.and_then(|ip| Some((ip, self.stripe(&ip)?))) else {
            return Ok(Ticket { per_ip: false });
        };
        let l = &self.limits;
        let now = self.now_ms();
        let mut map = stripe.lock().unwrap_or_else(|e| e.into_inner());
        let verdict = match map.get_mut(&ip) {
            Some(e) => {
                if l.max_connections_per_ip > 0 && e.conns >= l.max_connections_per_ip {
                    Err(Refusal::AddressFull)
                } else if !e.connect.take(l.connect_rate_per_ip, now) {
                    Err(Refusal::ConnectRate)
                } else {
                    e.conns += 1;
                    Ok(())
                }
            }
            None if self.tracked.load(Ordering::Relaxed)
                >= l.max_connections.saturating_add(SPARE_ENTRIES) =>
            {
                Err(Refusal::TableFull)
            }
            None => {
                let mut connect = TokenBucket::full(l.connect_rate_per_ip, now);
                connect.take(l.connect_rate_per_ip, now);
                map.insert(
                    ip,
                    Entry {
                        conns: 1,
                        connect,
                        publish: TokenBucket::full(l.publish_rate_per_ip, now),
                    },
                );
                self.tracked.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        };
        drop(map);
        match verdict {
            Ok(()) => Ok(Ticket { per_ip: true }),
            Err(r) => {
                self.open.fetch_sub(1, Ordering::Relaxed);
                Err(r)
            }
        }
    }

    /// Uncounts an admitted connection; `per_ip` is its address when its
    /// [`Ticket`] said it was counted per address.
    pub fn release(&self, per_ip: Option<IpAddr>) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        let Some((ip, stripe)) = per_ip.and_then(|ip| Some((ip, self.stripe(&ip)?))) else {
            return;
        };
        let mut map = stripe.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get_mut(&ip) {
            e.conns = e.conns.saturating_sub(1);
            if e.conns == 0 && self.idle(e, self.now_ms()) {
                map.remove(&ip);
                self.tracked.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// May `peer` publish one more message over HTTP now? `false` when its
    /// address is over `--max-publish-rate` (answered 429).
    pub fn allow_publish(&self, peer: Option<IpAddr>) -> bool {
        let rate = self.limits.publish_rate_per_ip;
        if rate == 0 {
            return true;
        }
        let Some((ip, stripe)) = peer.and_then(|ip| Some((ip, self.stripe(&ip)?))) else {
            return true;
        };
        let now = self.now_ms();
        let mut map = stripe.lock().unwrap_or_else(|e| e.into_inner());
        // The publisher's connection is open, so its entry exists.
        map.get_mut(&ip).is_none_or(|e| e.publish.take(rate, now))
    }

    /// Would a fresh entry behave the same as this one (buckets full)?
    fn idle(&self, e: &Entry, now: u32) -> bool {
        let l = &self.limits;
        e.connect.is_full(l.connect_rate_per_ip, now)
            && e.publish.is_full(l.publish_rate_per_ip, now)
    }

    /// Forgets addresses with no connection whose buckets have refilled.
    /// Worker `worker` of `workers` sweeps its share of the stripes.
    pub fn sweep(&self, worker: usize, workers: usize) {
        let Some(table) = &self.table else {
            return;
        };
        let now = self.now_ms();
        for stripe in table.iter().skip(worker).step_by(workers.max(1)) {
            let mut map = stripe.lock().unwrap_or_else(|e| e.into_inner());
            let before = map.len();
            map.retain(|_, e| e.conns > 0 || !self.idle(e, now));
            self.tracked
                .fetch_sub(before - map.len(), Ordering::Relaxed);
            if map.is_empty() && map.capacity() > 1024 {
                map.shrink_to_fit();
            }
        }
    }

    /// Addresses in the table (a test and metrics view).
    pub fn tracked(&self) -> usize {
        self.tracked.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_ip: u32, rate: u32) -> AdmissionLimits {
        AdmissionLimits {
            max_connections: 10,
            max_connections_per_ip: per_ip,
            connect_rate_per_ip: rate,
            publish_rate_per_ip: 0,
        }
    }

    fn ip(d: u8) -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, 0, d]))
    }

    #[test]
    fn process_cap_counts_every_connection() {
        let a = Admission::new(limits(0, 0));
        let tickets: Vec<_> = (0..10).map(|i| a.admit(ip(i)).unwrap()).collect();
        assert_eq!(a.admit(ip(99)), Err(Refusal::ProcessFull));
        assert_eq!(a.admit(None), Err(Refusal::ProcessFull));
        a.release(tickets[0].per_ip.then(|| ip(0)).flatten());
        assert!(a.admit(None).is_ok());
        assert_eq!(a.open(), 10);
        assert_eq!(a.tracked(), 0, "no per-address limit, no table");
    }

    #[test]
    fn per_address_cap_is_per_address() {
        let a = Admission::new(limits(2, 0));
        let t1 = a.admit(ip(1)).unwrap();
        let _t2 = a.admit(ip(1)).unwrap();
        assert_eq!(a.admit(ip(1)), Err(Refusal::AddressFull));
        assert!(a.admit(ip(2)).is_ok(), "another address is not affected");
        a.release(t1.per_ip.then(|| ip(1)).flatten());
        assert!(a.admit(ip(1)).is_ok());
        assert_eq!(a.open(), 3, "refusals are not counted");
    }

    #[test]
    fn entries_go_once_their_last_connection_closes() {
        let a = Admission::new(limits(5, 0));
        let t = a.admit(ip(1)).unwrap();
        assert_eq!(a.tracked(), 1);
        a.release(t.per_ip.then(|| ip(1)).flatten());
        assert_eq!(a.tracked(), 0);
    }

    #[test]
    fn connect_rate_refuses_a_burst_and_recovers() {
        let a = Admission::new(limits(0, 3));
        for _ in 0..3 {
            let t = a.admit(ip(1)).unwrap();
            a.release(t.per_ip.then(|| ip(1)).flatten());
        }
        assert_eq!(
            a.admit(ip(1)),
            Err(Refusal::ConnectRate),
            "closing and reconnecting does not reset the bucket"
        );
        assert_eq!(a.tracked(), 1, "kept until the bucket refills");
        std::thread::sleep(std::time::Duration::from_millis(400));
        assert!(a.admit(ip(1)).is_ok(), "one token back after 1/3 s");
        a.sweep(0, 1);
        assert_eq!(a.tracked(), 1, "held by the open connection");
    }

    #[test]
    fn sweep_forgets_refilled_addresses() {
        let a = Admission::new(limits(0, 1000));
        let t = a.admit(ip(1)).unwrap();
        a.release(t.per_ip.then(|| ip(1)).flatten());
        std::thread::sleep(std::time::Duration::from_millis(5));
        a.sweep(0, 1);
        assert_eq!(a.tracked(), 0);
    }

    #[test]
    fn publish_rate_is_per_address() {
        let a = Admission::new(AdmissionLimits {
            publish_rate_per_ip: 2,
            ..limits(0, 0)
        });
        let _t = a.admit(ip(1)).unwrap();
        let _u = a.admit(ip(2)).unwrap();
        assert!(a.allow_publish(ip(1)));
        assert!(a.allow_publish(ip(1)));
        assert!(!a.allow_publish(ip(1)));
        assert!(a.allow_publish(ip(2)));
        assert!(a.allow_publish(None), "unknown address: not limited");
    }
}
