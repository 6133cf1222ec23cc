//! The ring wrapper and the `user_data` encoding.
//!
//! Every entry goes to the kernel through [`Ring::push`], an `unsafe fn`:
//! the kernel uses what an entry points to after the push returns, so the
//! caller answers, in a `// SAFETY:` line at each call, for who owns that
//! memory until the completion (the module header's ownership rules).

use io_uring::{IoUring, squeue, types};
use std::io;
use std::time::{Duration, Instant};
use tracing::{error, warn};

/// Submission queue entries.
const SQ_ENTRIES: u32 = 4096;
/// Completion queue entries: room for a receive from every connection of a
/// busy turn before the kernel has to buffer overflowed completions.
const CQ_ENTRIES: u32 = 65536;
/// Largest fixed-file table per ring; the kernel also caps it at RLIMIT_NOFILE.
const MAX_FIXED_FILES: u32 = 1 << 20;

/// Operation kinds, in the top byte of `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Op {
    Accept = 1,
    Recv = 2,
    Send = 3,
    Close = 4,
    Shutdown = 5,
    Cancel = 6,
    Wake = 7,
    /// A single-shot receive from the reserve (a starved connection's).
    RecvReserve = 8,
}

/// The hidden switch for plain descriptors (see [`Ring::plain_fds`]).
pub(super) const PLAIN_FDS_ENV: &str = "CORECAST_URING_PLAIN_FDS";

/// Builds an operation on a connection's socket: `$slot` is an index in
/// the ring's fixed-file table, or, with plain descriptors, a descriptor.
macro_rules! on_socket {
    ($plain:expr, $slot:expr, |$fd:ident| $build:expr) => {
        if $plain {
            let $fd = ::io_uring::types::Fd($slot as ::std::os::fd::RawFd);
            $build
        } else {
            let $fd = ::io_uring::types::Fixed($slot);
            $build
        }
    };
}
pub(super) use on_socket;

/// A `user_data` key for no connection.
pub(super) const NO_KEY: usize = 0xFF_FFFF;

/// `user_data`: kind (8 bits), slab key (24 bits), serial (32 bits).
pub(super) fn user_data(op: Op, key: usize, serial: u32) -> u64 {
    debug_assert!(key <= NO_KEY);
    ((op as u64) << 56) | (((key as u64) & 0xFF_FFFF) << 32) | serial as u64
}

/// The kind byte, slab key and serial of a [`user_data`].
pub(super) fn split_user_data(ud: u64) -> (u8, usize, u32) {
    (
        (ud >> 56) as u8,
        ((ud >> 32) & 0xFF_FFFF) as usize,
        ud as u32,
    )
}

/// A completion as the loop handles it: `user_data`, result, flags.
pub(super) type Cqe = (u64, i32, u32);

/// The ring and a place for completions reaped in the middle of a turn.
pub(super) struct Ring {
    ring: IoUring,
    /// Completions taken aside when [`Self::push`] submits, to make room in
    /// a completion queue at least half full (or after a failed submit);
    /// [`Self::reap_into`] hands them out first.
    backlog: Vec<Cqe>,
    /// Operations whose memory the kernel may still touch (receives, sends,
    /// the wake-up read, the accepts): the exit waits for this to reach 0.
    in_flight: usize,
    /// Connections are plain process descriptors (`types::Fd`), not direct
    /// descriptors (`types::Fixed`): `CORECAST_URING_PLAIN_FDS=1`, read
    /// once when the worker starts. A measuring aid only (it shows what
    /// direct descriptors save per operation); the process's open-file
    /// limit then caps the connections, as with epoll.
    plain_fds: bool,
    /// Entries queued since the last submission.
    unsubmitted: u32,
    /// Submit once this many entries are queued, mid-turn (see [`SUBMIT_EVERY`]).
    submit_every: u32,
}

/// Entries a worker queues before it submits them, even in the middle of
/// a turn's flush. One `io_uring_enter` that runs thousands of sends (a
/// publication to 5 000 local subscribers) never returns to user space
/// meanwhile, so on a kernel without full preemption the processes those
/// sends wake (the subscribers' readers, on a shared machine) wait for the
/// whole batch; an enter per this many sends gives the scheduler a point
/// to run them and costs one syscall per that many sends.
/// `CORECAST_URING_SUBMIT_EVERY=N` in the environment overrides it (read
/// when each worker starts; a measuring aid, not a flag).
const SUBMIT_EVERY: u32 = 64;

impl Ring {
    /// Builds a worker's ring; with direct descriptors (not `plain_fds`),
    /// registers a sparse fixed-file table of `table` slots.
    pub(super) fn new(plain_fds: bool, table: u32) -> io::Result<Self> {
        let ring = build_ring()?;
        if !plain_fds {
            ring.submitter().register_files_sparse(table)?;
        }
        Ok(Self {
            ring,
            backlog: Vec::new(),
            in_flight: 0,
            plain_fds,
            unsubmitted: 0,
            submit_every: std::env::var("CORECAST_URING_SUBMIT_EVERY")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(SUBMIT_EVERY),
        })
    }

    /// The ring itself, to register and unregister the buffer ring.
    pub(super) fn uring(&self) -> &IoUring {
        &self.ring
    }

    /// Connections are plain process descriptors, not direct ones (see the
    /// field).
    pub(super) fn plain_fds(&self) -> bool {
        self.plain_fds
    }

    /// Queues `sqe`; when the queue is full, submits first, and once
    /// [`SUBMIT_EVERY`] entries are queued, submits them (without waiting).
    ///
    /// # Safety
    ///
    /// The kernel reads or writes what `sqe` names from now until the
    /// operation completes. Every buffer and pointer in the entry (an
    /// address buffer, a `msghdr` and the iovecs and data it points to, a
    /// read's target) must stay valid and unmoved, and must not be read or
    /// written by us, until the operation's completion has been handled
    /// (it may first wait in the backlog; for a multishot operation, its
    /// last completion, the one without `IORING_CQE_F_MORE`). A receive
    /// from the buffer group names no memory itself: the group's buffers
    /// must stay mapped and registered instead. Entries that name no
    /// memory (cancels, closes, shutdowns) need nothing.
    pub(super) unsafe fn push(&mut self, sqe: &squeue::Entry) {
        loop {
            // SAFETY: the caller keeps what `sqe` names valid until its
            // completion (this function's contract); the queue copies the
            // entry itself.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                self.unsubmitted += 1;
                if self.unsubmitted >= self.submit_every {
                    self.submit_queued();
                }
                return;
            }
            self.submit_queued();
        }
    }

    /// Submits what is queued now (without waiting), e.g. a send whose
    /// buffer was just written and is still in the cache.
    pub(super) fn submit_now(&mut self) {
        if self.unsubmitted > 0 {
            self.submit_queued();
        }
    }

    /// Submits what is queued (without waiting).
    fn submit_queued(&mut self) {
        self.unsubmitted = 0;
        // A long turn (thousands of sends, each completing) could fill the
        // completion queue before the turn's reap; past half full, take
        // completions aside now rather than leave the kernel to buffer
        // them in its overflow list (allocated atomically, and dropped,
        // with EBADR, when that fails).
        if self.ring.completion().len() >= CQ_ENTRIES as usize / 2 {
            self.stash();
        }
        if let Err(e) = self.ring.submit() {
            match e.raw_os_error() {
                // Older kernels: the completion queue is full; take
                // completions aside so the kernel can post more.
                Some(libc::EBUSY) => self.stash(),
                Some(libc::EINTR) => {}
                Some(libc::EBADR) => {
                    error!(error = %e, "io_uring dropped completions (out of memory in the kernel)");
                    self.stash();
                }
                _ => {
                    warn!(error = %e, "io_uring_enter failed");
                    self.stash();
                }
            }
        }
    }

    /// Takes the completions posted so far aside (handed out by the next
    /// reap, in order) and returns the result of the one with `user_data`
    /// among them, if it was posted: a send that completed inline, while
    /// it was submitted.
    pub(super) fn stash_and_find(&mut self, user_data: u64) -> Option<i32> {
        let from = self.backlog.len();
        self.stash();
        self.backlog[from..]
            .iter()
            .find(|c| c.0 == user_data)
            .map(|c| c.1)
    }

    fn stash(&mut self) {
        let backlog = &mut self.backlog;
        backlog.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
    }

    /// An operation that [`Self::in_flight`] counts was pushed.
    pub(super) fn in_flight_started(&mut self) {
        self.in_flight += 1;
    }

    /// The last completion of an operation that [`Self::in_flight`] counts
    /// was reaped.
    pub(super) fn in_flight_ended(&mut self) {
        self.in_flight -= 1;
    }

    /// Operations whose memory the kernel may still touch.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Submits what is queued. Unless `busy` (work is waiting for the next
    /// turn) or completions are taken aside, also waits for a completion,
    /// or until `deadline`.
    pub(super) fn enter(
        &mut self,
        busy: bool,
        now: Instant,
        deadline: Option<Instant>,
    ) -> io::Result<usize> {
        let busy = busy || !self.backlog.is_empty();
        self.unsubmitted = 0;
        match (busy, deadline) {
            (true, _) => self.ring.submit(),
            (false, None) => self.ring.submit_and_wait(1),
            (false, Some(t)) => self.submit_and_wait_for(t.saturating_duration_since(now)),
        }
    }

    /// Submits what is queued and waits for a completion, at most `timeout`.
    pub(super) fn submit_and_wait_for(&mut self, timeout: Duration) -> io::Result<usize> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        self.ring.submitter().submit_with_args(1, &args)
    }

    /// Appends the completions taken aside, then every one available.
    pub(super) fn reap_into(&mut self, cqes: &mut Vec<Cqe>) {
        cqes.append(&mut self.backlog);
        cqes.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
    }
}

/// A ring with the flags that help a single-threaded loop, where the kernel has them.
fn build_ring() -> io::Result<IoUring> {
    let attempts: [fn(&mut io_uring::Builder); 2] = [
        |b| {
            b.setup_single_issuer().setup_coop_taskrun();
        },
        |_| {},
    ];
    let mut last = None;
    for tweak in attempts {
        let mut b = IoUring::builder();
        b.setup_cqsize(CQ_ENTRIES);
        tweak(&mut b);
        match b.build(SQ_ENTRIES) {
            Ok(r) => return Ok(r),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("at least one attempt"))
}

/// The fixed-file table each ring gets for `config`: the open-file limit
/// (the kernel refuses more), or `ring_slots` when lower; `None` with plain
/// descriptors (hidden `CORECAST_URING_PLAIN_FDS=1`): no table to fill.
pub(in crate::server) fn table_slots(config: &crate::server::Config) -> Option<u32> {
    if plain_fds() {
        return None;
    }
    Some(
        fixed_table_size()
            .min(config.ring_slots.unwrap_or(u32::MAX))
            .max(1),
    )
}

/// Whether the rings use plain descriptors (a measurement mode).
pub(super) fn plain_fds() -> bool {
    std::env::var_os(PLAIN_FDS_ENV).is_some_and(|v| v == "1")
}

/// Fixed-file table size: the kernel refuses more than RLIMIT_NOFILE.
fn fixed_table_size() -> u32 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if !ok {
        return 1024;
    }
    (lim.rlim_cur.min(MAX_FIXED_FILES as u64) as u32).max(16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        for (op, key, serial) in [
            (Op::Recv, 0, 0),
            (Op::Send, 12345, u32::MAX),
            (Op::Close, NO_KEY, 7),
        ] {
            let (o, k, s) = split_user_data(user_data(op, key, serial));
            assert_eq!((o, k, s), (op as u8, key, serial));
        }
    }
}
