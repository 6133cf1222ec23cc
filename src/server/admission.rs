//! Who may connect and publish: the process-wide connection cap and the
//! per-source-address limits (connections, connect rate, HTTP publish rate).
//!
//! Shared by every worker. The process-wide count is one atomic; the
//! per-address state is a table split into [`STRIPES`] mutex-guarded maps
//! (one lock per accept, held for a hash lookup), consulted only when a
//! per-address limit is set. The stripe of an address is chosen by a hash
//! with random keys drawn at start, so a client cannot pick addresses that
//! all land in one stripe (one contended lock, one huge map). Entries live
//! while the address holds a connection and until its rate buckets have
//! refilled; a full table refuses new addresses rather than grow without
//! bound.
//!
//! A "source address" is what one client controls: an IPv4 address, or an
//! IPv6 prefix (`--ipv6-prefix-len`, /64 by default), since anyone with an
//! IPv6 network can pick a fresh address from it for every connection. An
//! IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack listener
//! reports for an IPv4 client) is its IPv4 address. The table is keyed by
//! that source (`source_key`), never by the raw address.

use crate::proto::rate::TokenBucket;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Instant;

/// Default process-wide cap on open connections (flag `--max-connections`):
/// 250 000 subscribers with room for their publishers and scrapes.
pub const DEFAULT_MAX_CONNECTIONS: usize = 262_144;
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
    /// The io_uring worker whose listener the kernel queued the connection
    /// on has no free slot in its fixed-file table (it was steered away
    /// from, but its backlog still held clients): retry, and the listener
    /// group sends the new attempt to a worker with room.
    WorkerFull,
}

impl Refusal {
    /// The reason sent in the refusal's body.
    pub fn reason(self) -> &'static str {
        match self {
            Self::ProcessFull => "server at its connection limit (see --max-connections)",
            Self::AddressFull => "too many connections from your address",
            Self::ConnectRate => "connecting too fast from your address",
            Self::TableFull => "server tracking too many addresses",
            Self::WorkerFull => "no room on the worker that took this connection; retry",
        }
    }

    /// Label of `corecast_connections_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::ProcessFull => "max_connections",
            Self::AddressFull => "max_connections_per_ip",
            Self::ConnectRate => "connect_rate",
            Self::TableFull => "address_table_full",
            Self::WorkerFull => "worker_table_full",
        }
    }

    pub const ALL: [Refusal; 5] = [
        Self::ProcessFull,
        Self::AddressFull,
        Self::ConnectRate,
        Self::TableFull,
        Self::WorkerFull,
    ];

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The limits, as configured (0 = off for the per-address ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Most open connections in the process.
    pub max_connections: usize,
    /// Most open connections from one source address.
    pub max_connections_per_ip: u32,
    /// New connections per second from one source address.
    pub connect_rate_per_ip: u32,
    /// HTTP publications per second from one source address.
    pub publish_rate_per_ip: u32,
    /// Leading bits of an IPv6 address that name its source (1..=128 from
    /// the command line; 0 would make all of IPv6 one source, and more
    /// than 128 is taken as 128).
    pub ipv6_prefix_len: u8,
}

/// The first `prefix_len` bits set, the rest clear (all clear for 0, all
/// set from 128 up).
fn ipv6_mask(prefix_len: u8) -> u128 {
    // /0 needs a shift by all 128 bits, which checked_shl refuses: no bit.
    u128::MAX
        .checked_shl(128 - u32::from(prefix_len.min(128)))
        .unwrap_or(0)
}

/// The per-address table's key for `ip`: an IPv4 address as it is (also
/// when it arrives IPv4-mapped), an IPv6 address with every bit after its
/// prefix cleared (`mask` from [`ipv6_mask`]).
fn source_key(ip: IpAddr, mask: u128) -> IpAddr {
    match ip.to_canonical() {
        v4 @ IpAddr::V4(_) => v4,
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask)),
    }
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
    /// The limits at start; the three a reload changes are read from the
    /// atomics below instead (see [`Self::current`]).
    limits: AdmissionLimits,
    max_connections: AtomicUsize,
    max_connections_per_ip: AtomicU32,
    connect_rate_per_ip: AtomicU32,
    /// [`ipv6_mask`] of `limits.ipv6_prefix_len`.
    ipv6_mask: u128,
    /// Picks a key's stripe, with random keys drawn when the server starts.
    stripe_hasher: RandomState,
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
            max_connections: AtomicUsize::new(limits.max_connections),
            max_connections_per_ip: AtomicU32::new(limits.max_connections_per_ip),
            connect_rate_per_ip: AtomicU32::new(limits.connect_rate_per_ip),
            ipv6_mask: ipv6_mask(limits.ipv6_prefix_len),
            stripe_hasher: RandomState::new(),
            open: AtomicUsize::new(0),
            table: per_ip.then(|| (0..STRIPES).map(|_| Mutex::default()).collect()),
            tracked: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u32 {
        self.epoch.elapsed().as_millis() as u32
    }

    /// The source key of `peer` and the stripe that holds it, when the
    /// table exists.
    fn locate(&self, peer: Option<IpAddr>) -> Option<(IpAddr, &Stripe)> {
        let table = self.table.as_ref()?;
        let key = source_key(peer?, self.ipv6_mask);
        Some((key, &table[self.stripe_index(&key)]))
    }

    /// Which stripe holds `key`. A keyed hash (SipHash), not a fixed fold
    /// of the address: with a fixed fold a client can compute addresses
    /// that share a stripe. Costs one more SipHash of the key per lookup
    /// (the stripe's map hashes it again with its own keys).
    fn stripe_index(&self, key: &IpAddr) -> usize {
        (self.stripe_hasher.hash_one(key) % STRIPES as u64) as usize
    }

    /// The limits in force (a reload may have changed some).
    pub fn current(&self) -> AdmissionLimits {
        AdmissionLimits {
            max_connections: self.max_connections.load(Ordering::Relaxed),
            max_connections_per_ip: self.max_connections_per_ip.load(Ordering::Relaxed),
            connect_rate_per_ip: self.connect_rate_per_ip.load(Ordering::Relaxed),
            ..self.limits
        }
    }

    /// Is the per-address table kept (a per-address limit was set at
    /// start)? A reload can change the per-address limits' values only
    /// while this stays as it is.
    pub fn tracks_addresses(&self) -> bool {
        self.table.is_some()
    }

    /// A reload's limits: `--max-connections` always (existing
    /// connections over a lowered cap stay; new ones wait for room), the
    /// per-address connection cap and connect rate when given (only while
    /// [`Self::tracks_addresses`], checked by the caller). Counts and
    /// buckets carry over.
    pub fn set_limits(&self, max_connections: usize, per_address: Option<(u32, u32)>) {
        self.max_connections
            .store(max_connections, Ordering::Relaxed);
        if let Some((per_ip, rate)) = per_address {
            self.max_connections_per_ip.store(per_ip, Ordering::Relaxed);
            self.connect_rate_per_ip.store(rate, Ordering::Relaxed);
        }
    }

    /// Open connections counted against `--max-connections`.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts a new connection from `peer`, or says why it is refused.
    /// Without a known address only the process-wide cap applies.
    pub fn admit(&self, peer: Option<IpAddr>) -> Result<Ticket, Refusal> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max_connections.load(Ordering::Relaxed)
        {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::ProcessFull);
        }
        let verdict = self.admit_address(peer);
        if verdict.is_err() {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
        verdict
    }

    /// The per-address half of [`Self::admit`], for a connection already
    /// counted against the process-wide cap whose address became known
    /// later (from a PROXY protocol header). A refusal leaves the process
    /// count as it is: the connection still holds its place until it is
    /// released.
    pub fn admit_address(&self, peer: Option<IpAddr>) -> Result<Ticket, Refusal> {
        let Some((ip, stripe)) = self.locate(peer) else {
            return Ok(Ticket { per_ip: false });
        };
        let l = &self.current();
        // Under the stripe's lock: two workers' readings reach one bucket in
        // the order they were taken.
        let mut map = stripe.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.now_ms();
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
        verdict.map(|()| Ticket { per_ip: true })
    }

    /// Uncounts an admitted connection; `per_ip` is its address when its
    /// [`Ticket`] said it was counted per address.
    pub fn release(&self, per_ip: Option<IpAddr>) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        let Some((ip, stripe)) = self.locate(per_ip) else {
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
        let Some((ip, stripe)) = self.locate(peer) else {
            return true;
        };
        // Under the stripe's lock: two workers' readings reach one bucket in
        // the order they were taken.
        let mut map = stripe.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.now_ms();
        // The publisher's connection is open, so its entry exists.
        map.get_mut(&ip).is_none_or(|e| e.publish.take(rate, now))
    }

    /// Would a fresh entry behave the same as this one (buckets full)?
    fn idle(&self, e: &Entry, now: u32) -> bool {
        let l = &self.current();
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
    use crate::server::config::DEFAULT_IPV6_PREFIX_LEN;

    fn limits(per_ip: u32, rate: u32) -> AdmissionLimits {
        AdmissionLimits {
            max_connections: 10,
            max_connections_per_ip: per_ip,
            connect_rate_per_ip: rate,
            publish_rate_per_ip: 0,
            ipv6_prefix_len: DEFAULT_IPV6_PREFIX_LEN,
        }
    }

    fn ip(d: u8) -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, 0, d]))
    }

    fn v6(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn an_address_known_later_is_counted_alone_and_its_refusal_keeps_the_place() {
        // A PROXY listener: the process cap at accept, the address after
        // the header.
        let a = Admission::new(limits(1, 0));
        assert_eq!(a.admit(None), Ok(Ticket { per_ip: false }));
        assert_eq!(a.admit(None), Ok(Ticket { per_ip: false }));
        assert_eq!(a.open(), 2);
        assert_eq!(a.admit_address(ip(1)), Ok(Ticket { per_ip: true }));
        assert_eq!(a.admit_address(ip(1)), Err(Refusal::AddressFull));
        // The refused connection still holds its place until released.
        assert_eq!(a.open(), 2);
        a.release(None);
        a.release(ip(1));
        assert_eq!(a.open(), 0);
        assert_eq!(a.admit_address(ip(1)), Ok(Ticket { per_ip: true }));
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

    #[test]
    fn a_full_address_table_refuses_new_addresses_until_an_entry_is_freed() {
        // Room for max_connections + SPARE_ENTRIES addresses.
        let a = Admission::new(AdmissionLimits {
            max_connections: 2,
            publish_rate_per_ip: 1,
            ..limits(0, 0)
        });
        let addr = |i: u32| Some(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)));
        let room = 2 + SPARE_ENTRIES as u32;
        // Each of these published over HTTP and left: its entry stays until
        // its publish bucket has refilled (a second at this rate).
        for i in 0..room - 1 {
            let t = a.admit(addr(i)).unwrap();
            assert!(a.allow_publish(addr(i)));
            a.release(t.per_ip.then(|| addr(i)).flatten());
        }
        // The last free entry, held by an open connection.
        let held = a.admit(addr(room - 1)).unwrap();
        assert_eq!(a.tracked(), room as usize);
        assert_eq!(a.admit(addr(room)), Err(Refusal::TableFull));
        assert_eq!(a.open(), 1, "the refusal is not counted");
        let last = addr(room - 2);
        assert!(
            a.admit(last).is_ok(),
            "a tracked address still has its entry"
        );
        a.release(last);
        // The held connection closes: its entry (buckets full) goes at once
        // and makes room for a new address.
        a.release(held.per_ip.then(|| addr(room - 1)).flatten());
        assert_eq!(a.tracked(), room as usize - 1);
        assert!(a.admit(addr(room)).is_ok());
        assert_eq!(a.tracked(), room as usize);
    }

    #[test]
    fn two_addresses_in_one_slash_64_share_a_connection_cap() {
        let a = Admission::new(limits(2, 0));
        assert!(a.admit(v6("2001:db8:1:2::1")).is_ok());
        assert!(a.admit(v6("2001:db8:1:2:ffff:ffff:ffff:ffff")).is_ok());
        assert_eq!(
            a.admit(v6("2001:db8:1:2:1234::9")),
            Err(Refusal::AddressFull)
        );
        assert_eq!(a.tracked(), 1, "one entry for the whole /64");
        a.release(v6("2001:db8:1:2::1"));
        assert!(
            a.admit(v6("2001:db8:1:2:1234::9")).is_ok(),
            "released by its own address"
        );
        a.release(v6("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        a.release(v6("2001:db8:1:2:1234::9"));
        assert_eq!(a.tracked(), 0, "every release found the shared entry");
    }

    #[test]
    fn addresses_in_different_slash_64s_do_not_share_a_cap() {
        let a = Admission::new(limits(1, 0));
        assert!(a.admit(v6("2001:db8:1:2::1")).is_ok());
        assert!(a.admit(v6("2001:db8:1:3::1")).is_ok(), "the next /64");
        assert!(
            a.admit(v6("2001:db9:1:2::1")).is_ok(),
            "same low bits, other prefix"
        );
        assert_eq!(a.admit(v6("2001:db8:1:3::2")), Err(Refusal::AddressFull));
        assert_eq!(a.tracked(), 3);
    }

    #[test]
    fn a_prefix_of_128_bits_counts_every_ipv6_address_alone() {
        let a = Admission::new(AdmissionLimits {
            ipv6_prefix_len: 128,
            ..limits(1, 0)
        });
        assert!(a.admit(v6("2001:db8::1")).is_ok());
        assert!(
            a.admit(v6("2001:db8::2")).is_ok(),
            "a neighbour is another source"
        );
        assert_eq!(a.admit(v6("2001:db8::1")), Err(Refusal::AddressFull));
        assert_eq!(a.tracked(), 2);
    }

    #[test]
    fn an_ipv4_mapped_address_counts_as_its_ipv4_address() {
        let a = Admission::new(limits(1, 0));
        assert!(a.admit(ip(1)).is_ok());
        assert_eq!(
            a.admit(v6("::ffff:127.0.0.1")),
            Err(Refusal::AddressFull),
            "the same client over a dual-stack listener"
        );
        assert!(
            a.admit(v6("::ffff:127.0.0.2")).is_ok(),
            "IPv4 stays per address: mapped ones are not grouped by the IPv6 prefix"
        );
        assert_eq!(a.admit(ip(2)), Err(Refusal::AddressFull));
        a.release(v6("::ffff:127.0.0.1"));
        a.release(ip(2));
        assert_eq!(a.tracked(), 0, "released under either form");
    }

    #[test]
    fn the_prefix_mask_keeps_exactly_the_first_n_bits() {
        let all_ones = IpAddr::V6(Ipv6Addr::from(u128::MAX));
        let key = |n| match source_key(all_ones, ipv6_mask(n)) {
            IpAddr::V6(a) => u128::from(a),
            IpAddr::V4(_) => panic!("an IPv6 address stays IPv6"),
        };
        assert_eq!(key(1), 1 << 127, "/1: the top bit only");
        assert_eq!(key(64), u128::MAX << 64, "/64: the network half");
        assert_eq!(key(127), u128::MAX - 1, "/127: all but the last bit");
        assert_eq!(key(128), u128::MAX, "/128: the address itself");
        assert_eq!(key(0), 0, "/0 (not accepted by the flag): one source");
        assert_eq!(key(200), u128::MAX, "past 128: the address itself");
        let v4 = IpAddr::from([192, 0, 2, 255]);
        assert_eq!(source_key(v4, ipv6_mask(1)), v4, "IPv4 is never masked");
    }

    /// Distinct /64s that all shared stripe 0 under the fixed fold this
    /// module used before, which kept only the third, fourth, seventh and
    /// eighth 16-bit groups of an IPv6 address: these differ in the second.
    fn one_stripe_under_the_old_fold() -> Vec<IpAddr> {
        let keys: Vec<IpAddr> = (0..=255u16)
            .map(|i| IpAddr::V6(Ipv6Addr::new(0x2001, i, 0, 0, 0, 0, 0, 0)))
            .collect();
        let old_fold = |k: &IpAddr| match k {
            IpAddr::V6(a) => (u128::from(*a) >> 64) as u32 ^ (u128::from(*a) as u32),
            IpAddr::V4(_) => unreachable!(),
        };
        assert!(
            keys.iter()
                .all(|k| (old_fold(k) as usize).is_multiple_of(STRIPES))
        );
        keys
    }

    #[test]
    fn addresses_that_collided_under_the_old_fold_spread_over_the_stripes() {
        let a = Admission::new(limits(1, 0));
        let mut used = [false; STRIPES];
        for key in one_stripe_under_the_old_fold() {
            used[a.stripe_index(&key)] = true;
        }
        // 256 keys thrown at random into 64 stripes fill about 63. Filling
        // at most 31 means all 256 fell into some 31 stripes: fewer than
        // 2^64 such sets, each hit with odds below 2^-256, so this bound
        // does not flake.
        let spread = used.iter().filter(|&&u| u).count();
        assert!(spread >= STRIPES / 2, "only {spread} stripes used");
    }

    #[test]
    fn two_servers_put_the_same_addresses_in_different_stripes() {
        let (a, b) = (Admission::new(limits(1, 0)), Admission::new(limits(1, 0)));
        let keys = one_stripe_under_the_old_fold();
        // Agreement on all 256 by chance: 64^-256.
        assert!(
            keys.iter().any(|k| a.stripe_index(k) != b.stripe_index(k)),
            "the stripe of an address is not fixed, so it cannot be predicted"
        );
    }
}
