//! Which worker's listener takes a new connection, when some workers exist
//! only for room.
//!
//! An io_uring worker holds its connections as direct descriptors in its
//! ring's fixed-file table, which the kernel caps at the open-file limit
//! (20 000 on a typical box). To hold `--max-connections` the server starts
//! more workers than cores when it must ([`rings_needed`]): the first
//! `primaries` (one per core) take connections; the rest, *overflow*
//! workers, take them only once every primary is full, one at a time, in
//! order. Without help the kernel would hash new connections over every
//! listener of the `SO_REUSEPORT` group, overflow workers included, and a
//! full worker's backlog would hold clients it cannot accept.
//!
//! The help is a classic BPF program attached to the group
//! (`SO_ATTACH_REUSEPORT_CBPF`): it takes the packet's flow hash (or, if
//! none was set, a random number), reduces it modulo the number of
//! open listeners and returns the group index of one of them. Listeners
//! join the group in worker order when they `listen()` and are never closed
//! before shutdown, so a listener's group index is its worker's id. A
//! worker reports when it becomes full and when it has room again
//! ([`Steering::set_full`], with hysteresis: [`FULL_BELOW`] and
//! [`ROOM_ABOVE`] free slots); the set of open listeners is recomputed and,
//! when it changed, a new program replaces the old one. A failed attach
//! leaves the old program in place and is retried every turn
//! ([`Steering::retry`]). Clients the kernel had already queued on a
//! worker whose table then filled are answered `503` by that worker while
//! new connections go elsewhere (see [`FULL_BELOW`]).
//!
//! A limit: the program returns an index in the group, and assumes the
//! group's listeners are exactly this process's workers, in worker order.
//! Another process that binds the same port with `SO_REUSEPORT` (the
//! kernel allows it for the same user) joins the same group and can shift
//! the indexes: a listener of its that joined before ours, or one that
//! closes (the kernel moves the group's last listener into the freed
//! index). Connections would then go to other listeners than the program
//! means, some of them the other process's. Nothing detects this; do not
//! share the port.
//!
//! With no overflow workers (epoll, plain descriptors, or a table big
//! enough) nothing is attached and the kernel's own hash spreads
//! connections over the workers, as before.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::{info, warn};

/// A worker with fewer free slots than this stops taking new connections
/// (an eighth of the table when that is less). The headroom absorbs most
/// of what the kernel had already queued on its listener when the program
/// changed; a backlog can hold more (up to `net.core.somaxconn`), and the
/// clients left in it once every slot is in use are answered `503` with
/// `Retry-After: 1` by the worker's refusing accept while new connections
/// are steered elsewhere, not left to time out (when every worker is full,
/// they wait in the backlog for a slot, as on epoll at the descriptor
/// limit).
pub const FULL_BELOW: u32 = 256;

/// A full worker takes new connections again once this many slots are
/// free (half the table when that is less).
pub const ROOM_ABOVE: u32 = 1024;

/// Free slots under which a table of `slots` counts as full: at least 1,
/// so that a table of fewer than 8 slots reports full too (once no slot is
/// free).
pub fn full_below(slots: u32) -> u32 {
    FULL_BELOW.min(slots / 8).max(1)
}

/// Free slots from which a full table of `slots` takes connections again.
pub fn room_above(slots: u32) -> u32 {
    // Never below the full mark: a tiny table would flip every turn.
    ROOM_ABOVE.min(slots / 2).max(full_below(slots))
}

/// Rings (workers) needed to hold `max_connections` when each ring's table
/// has `slots`, and at least `primaries`.
pub fn rings_needed(max_connections: usize, slots: u32, primaries: usize) -> usize {
    let per_ring = (slots - full_below(slots)).max(1) as usize;
    max_connections.div_ceil(per_ring).max(primaries)
}

/// The steering state of one listener group.
pub struct Steering {
    primaries: usize,
    state: Mutex<State>,
    /// The last attach failed: the attached program is not the one the
    /// workers' fullness calls for (see [`Self::retry`]).
    stale: AtomicBool,
}

struct State {
    full: Vec<bool>,
    /// The open set of the program attached last (empty: none attached).
    attached: Vec<u32>,
}

impl Steering {
    /// `workers` listeners, of which the first `primaries` are preferred.
    pub fn new(primaries: usize, workers: usize) -> Self {
        Self {
            primaries: primaries.min(workers),
            state: Mutex::new(State {
                full: vec![false; workers],
                attached: Vec::new(),
            }),
            stale: AtomicBool::new(false),
        }
    }

    /// Whether some workers are overflow workers (a program is needed).
    pub fn is_active(&self) -> bool {
        self.state.lock().unwrap().full.len() > self.primaries
    }

    /// Attaches the first program (primaries only) through `listener`, any
    /// member of the group. Call once every listener has joined the group.
    pub fn start(&self, listener: &impl AsRawFd) -> io::Result<()> {
        if !self.is_active() {
            return Ok(());
        }
        let mut state = self.state.lock().unwrap();
        let open = open_set(self.primaries, &state.full);
        attach(listener, &program(&open))?;
        state.attached = open;
        Ok(())
    }

    /// Whether the program attached last sends new connections to
    /// `worker` (always, when none is attached).
    pub fn takes(&self, worker: usize) -> bool {
        let state = self.state.lock().unwrap();
        state.attached.is_empty()
            || worker >= state.full.len()
            || state.attached.contains(&(worker as u32))
    }

    /// Worker `worker` is full (or has room again): recomputes the open
    /// set and, if it changed, attaches the new program through `listener`.
    pub fn set_full(&self, worker: usize, full: bool, listener: &impl AsRawFd) {
        let mut state = self.state.lock().unwrap();
        // A worker of another listener group (`--plain-listen`) is not steered.
        if state.attached.is_empty() || state.full.get(worker).is_none_or(|&f| f == full) {
            return;
        }
        state.full[worker] = full;
        self.reattach(&mut state, listener);
    }

    /// After a failed attach: tries again (each worker calls this every
    /// turn; it costs an atomic load while nothing failed).
    pub fn retry(&self, worker: usize, listener: &impl AsRawFd) {
        if self.stale.load(Ordering::Relaxed) {
            let mut state = self.state.lock().unwrap();
            if worker >= state.full.len() {
                return; // another listener group's worker
            }
            self.reattach(&mut state, listener);
        }
    }

    fn reattach(&self, state: &mut State, listener: &impl AsRawFd) {
        let open = open_set(self.primaries, &state.full);
        if open == state.attached {
            self.stale.store(false, Ordering::Relaxed);
            return;
        }
        match attach(listener, &program(&open)) {
            Ok(()) => {
                info!(taking = ?open, "new connections steered");
                state.attached = open;
                self.stale.store(false, Ordering::Relaxed);
            }
            // The old program stays: connections still arrive, some wait
            // (or are refused by a full worker); retried next turn.
            Err(e) => {
                if !self.stale.swap(true, Ordering::Relaxed) {
                    warn!(error = %e, "could not steer new connections; retrying");
                }
            }
        }
    }
}

/// The listeners that take new connections: the primaries with room; when
/// every primary is full, the first overflow worker with room; when all
/// are full, the primaries (new clients wait in their backlogs).
fn open_set(primaries: usize, full: &[bool]) -> Vec<u32> {
    let open: Vec<u32> = (0..primaries)
        .filter(|&w| !full[w])
        .map(|w| w as u32)
        .collect();
    if !open.is_empty() {
        return open;
    }
    match (primaries..full.len()).find(|&w| !full[w]) {
        Some(w) => vec![w as u32],
        None => (0..primaries as u32).collect(),
    }
}

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// A program returning `open[h % open.len()]`, `h` the packet's flow hash
/// (a random number when the hash is 0: the CPU number would send every
/// connection arriving on one CPU to one listener).
fn program(open: &[u32]) -> Vec<libc::sock_filter> {
    use libc::{BPF_ABS, BPF_ALU, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_MOD, BPF_RET, BPF_W};
    let ancillary = |what: i32| (libc::SKF_AD_OFF + what) as u32;
    let mut p = Vec::with_capacity(5 + 2 * open.len());
    if let [only] = open {
        p.push(stmt(BPF_RET | BPF_K, *only));
        return p;
    }
    p.push(stmt(
        BPF_LD | BPF_W | BPF_ABS,
        ancillary(libc::SKF_AD_RXHASH),
    ));
    // A hash of 0 means none: spread at random then.
    p.push(jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 1));
    p.push(stmt(
        BPF_LD | BPF_W | BPF_ABS,
        ancillary(libc::SKF_AD_RANDOM),
    ));
    p.push(stmt(BPF_ALU | BPF_MOD | BPF_K, open.len() as u32));
    for (i, &w) in open.iter().enumerate().take(open.len() - 1) {
        p.push(jump(BPF_JMP | BPF_JEQ | BPF_K, i as u32, 0, 1));
        p.push(stmt(BPF_RET | BPF_K, w));
    }
    p.push(stmt(
        BPF_RET | BPF_K,
        *open.last().expect("an open listener"),
    ));
    p
}

fn attach(listener: &impl AsRawFd, program: &[libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points at `program`, alive for the call; the kernel
    // copies the program and keeps no pointer to it.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&raw const fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_cover_the_connection_cap_after_the_headroom() {
        // 20 000 slots, 256 kept free: 19 744 per ring.
        assert_eq!(rings_needed(262_144, 20_000, 2), 14);
        assert_eq!(rings_needed(19_744, 20_000, 2), 2);
        assert_eq!(rings_needed(19_745 * 2, 20_000, 1), 3);
        assert_eq!(rings_needed(64, 16, 1), 5, "16 slots, 2 kept free");
        assert_eq!(rings_needed(10, 1, 1), 10, "one slot");
    }

    #[test]
    fn primaries_first_then_one_overflow_worker_at_a_time() {
        let f = |v: &[u8]| v.iter().map(|&b| b == 1).collect::<Vec<_>>();
        assert_eq!(open_set(2, &f(&[0, 0, 0, 0])), [0, 1]);
        assert_eq!(open_set(2, &f(&[1, 0, 0, 0])), [1]);
        assert_eq!(open_set(2, &f(&[1, 1, 0, 0])), [2]);
        assert_eq!(open_set(2, &f(&[1, 1, 1, 0])), [3]);
        assert_eq!(
            open_set(2, &f(&[0, 1, 1, 0])),
            [0],
            "a primary with room again"
        );
        assert_eq!(open_set(2, &f(&[1, 1, 1, 1])), [0, 1], "all full: wait");
    }

    /// Runs `program` the way the kernel's classic BPF interpreter would,
    /// for the few instructions it uses.
    fn run(program: &[libc::sock_filter], hash: u32, random: u32) -> u32 {
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = program[pc];
            let code = u32::from(i.code);
            pc += 1;
            match code {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    a = if i.k == (libc::SKF_AD_OFF + libc::SKF_AD_RXHASH) as u32 {
                        hash
                    } else {
                        assert_eq!(i.k, (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32);
                        random
                    }
                }
                c if c == libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K => a %= i.k,
                c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => {
                    pc += usize::from(if a == i.k { i.jt } else { i.jf });
                }
                c if c == libc::BPF_RET | libc::BPF_K => return i.k,
                other => panic!("unexpected instruction {other:#x}"),
            }
        }
    }

    #[test]
    fn the_program_spreads_over_the_open_set_only() {
        for open in [vec![3], vec![0, 1], vec![0, 2, 5], (0..64).collect()] {
            let p = program(&open);
            assert!(p.len() <= 4096, "the kernel's limit");
            let mut hits = vec![0u32; 64];
            for h in 1..=6400u32 {
                hits[run(&p, h.wrapping_mul(2_654_435_761), 0) as usize] += 1;
            }
            for (w, &n) in hits.iter().enumerate() {
                if open.contains(&(w as u32)) {
                    let fair = 6400 / open.len() as u32;
                    assert!(n.abs_diff(fair) <= fair / 4 + 2, "{open:?}: {w} took {n}");
                } else {
                    assert_eq!(n, 0, "{open:?}: {w} is not open");
                }
            }
            // No hash: a random number picks.
            assert_eq!(run(&p, 0, 1), open[1 % open.len()]);
            assert_eq!(run(&p, 0, 2), open[2 % open.len()]);
        }
    }

    #[test]
    fn a_program_attaches_to_a_reuseport_group_and_steers_connections() {
        use std::net::TcpStream;
        let (addr, listeners) =
            super::super::listener::bind_group("127.0.0.1:0".parse().unwrap(), 3, None).unwrap();
        let steering = Steering::new(1, 3);
        steering.start(&listeners[0]).unwrap();
        let accepted = |l: &std::net::TcpListener| {
            let mut n = 0;
            while l.accept().is_ok() {
                n += 1;
            }
            n
        };
        let connect = |n| {
            (0..n)
                .map(|_| TcpStream::connect(addr).unwrap())
                .collect::<Vec<_>>()
        };
        // On loopback the handshake completes inside `connect`: the
        // connection is in a listener's queue when it returns.
        let _a = connect(20);
        assert_eq!(
            listeners.iter().map(accepted).collect::<Vec<_>>(),
            [20, 0, 0]
        );
        steering.set_full(0, true, &listeners[2]);
        let _b = connect(20);
        assert_eq!(
            listeners.iter().map(accepted).collect::<Vec<_>>(),
            [0, 20, 0]
        );
        steering.set_full(1, true, &listeners[1]);
        steering.set_full(0, false, &listeners[0]);
        let _c = connect(20);
        assert_eq!(
            listeners.iter().map(accepted).collect::<Vec<_>>(),
            [20, 0, 0]
        );
    }

    #[test]
    fn two_primaries_share_new_connections_by_flow_hash() {
        use std::net::TcpStream;
        let (addr, listeners) =
            super::super::listener::bind_group("127.0.0.1:0".parse().unwrap(), 3, None).unwrap();
        Steering::new(2, 3).start(&listeners[2]).unwrap();
        let _conns: Vec<_> = (0..200)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let counts: Vec<usize> = listeners
            .iter()
            .map(|l| std::iter::from_fn(|| l.accept().ok()).count())
            .collect();
        assert_eq!(counts.iter().sum::<usize>(), 200);
        assert_eq!(counts[2], 0, "the overflow listener waits");
        assert!(counts[0] >= 50 && counts[1] >= 50, "{counts:?}");
    }
}
