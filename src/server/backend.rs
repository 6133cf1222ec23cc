//! The contract between a worker's event loop and its I/O backend, in
//! code: what every backend provides ([`Backend`]), and the loop skeleton
//! written once over it ([`run`]).
//!
//! Ownership: a backend owns its sockets, its kernel-facing buffers and
//! its event source (mio's `Poll`, an io_uring ring); the [`Core`] owns
//! every connection's protocol state, deadlines and the fan-out. A backend
//! tells the core what happened (input, EOF, bytes written) through the
//! core's methods and does what the core asks (read again, write, close)
//! when the skeleton calls it; the core never touches a socket.
//!
//! One loop turn, the same on every backend:
//! 1. [`Backend::wait`] until an event, a completion, or the core's next
//!    deadline (no wait at all while the core is busy);
//! 2. the core takes the turn's time ([`Core::begin_turn`]): every deadline
//!    and rate decided in this turn uses it;
//! 3. [`Backend::handle_events`]: accepts, input and EOFs go to the core;
//! 4. the end of the turn: [`Backend::before_end_of_turn`], every
//!    connection the core resumed is read again ([`Backend::reread`]),
//!    the core dispatches this turn's publications to the mailboxes, the
//!    workers that need it are woken, the core delivers its mailbox, every connection with
//!    something queued is flushed once ([`Backend::flush`]), throttles,
//!    keepalive and deadlines run, and what they close is removed
//!    ([`Backend::remove`]);
//! 5. on shutdown: accepting stops and the drain begins; once drained
//!    (or its deadline passed) the loop ends with [`Backend::exit`].
//!
//! Backends are chosen once at start (`server::Backend`) and the skeleton
//! is generic over them: no dynamic dispatch per operation.

use super::worker::{Core, FLUSHES_PER_TURN};
use std::io;
use std::time::{Duration, Instant};
use tracing::warn;

/// The worker's read buffer (epoll) and receive scratch buffer (io_uring).
/// 64 KiB: one read drains a full default socket receive queue chunk while
/// staying in L2.
pub const READ_BUF_BYTES: usize = 64 * 1024;
/// Pause before accepting again after the process ran out of descriptors
/// or memory, instead of spinning on a backlog it cannot take.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// What every I/O backend provides to the loop skeleton.
pub(super) trait Backend {
    /// A connection's socket handle, kept by the core in its slab entry.
    type Io;

    /// The worker's core.
    fn core(&mut self) -> &mut Core<Self::Io>;

    /// Waits until an event, a completion or `deadline` (`None`: no
    /// deadline; `busy`: do not block at all). Queued submissions go to the
    /// kernel here. `Err` ends the worker.
    fn wait(&mut self, busy: bool, deadline: Option<Instant>) -> io::Result<()>;

    /// Handles every event or completion the wait returned: accepts go to
    /// [`Core::admit`], input to [`Core::input`], EOFs to [`Core::eof`].
    fn handle_events(&mut self);

    /// Backend work at the start of the end of a turn (accepts deferred by
    /// the per-turn bound or by exhaustion, re-arming).
    fn before_end_of_turn(&mut self) {}

    /// Reads `key` again: the core resumed it (backpressure, pacing,
    /// throttling lifted) or its read budget ran out last turn.
    fn reread(&mut self, key: usize);

    /// Writes what `key` has queued and reports to [`Core::after_flush`].
    fn flush(&mut self, key: usize);

    /// Closes `key` now (its topics are left by [`Core::retire`]).
    fn remove(&mut self, key: usize);

    /// Stops accepting new connections (shutdown).
    fn stop_accepting(&mut self);

    /// The core's periodic sweep ran: the backend's own (TLS sessions let
    /// the keys of quiet connections go).
    fn sweep(&mut self) {}

    /// A deadline of the backend's own, besides the core's (accept retry).
    fn deadline(&self) -> Option<Instant> {
        None
    }

    /// Closes what is left and releases what the kernel holds, once the
    /// drain is over.
    fn exit(&mut self);
}

/// Runs `backend`'s event loop until shutdown has drained every connection.
pub(super) fn run<B: Backend>(backend: &mut B) {
    loop {
        let now = Instant::now();
        let extra = backend.deadline();
        let core = backend.core();
        let busy = core.busy();
        let deadline = core.next_deadline(now, extra);
        if let Err(e) = backend.wait(busy, deadline) {
            warn!(worker = backend.core().id(), error = %e, "waiting for events failed; worker stops");
            break;
        }
        backend.core().begin_turn(Instant::now());
        if backend.core().needs_wall_clock() {
            let wall = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            backend.core().set_wall_clock(wall);
        }
        backend.handle_events();
        end_of_turn(backend);
        if backend.core().drain_requested() {
            backend.stop_accepting();
            for key in backend.core().begin_drain() {
                backend.remove(key);
            }
        } else {
            for key in backend.core().drain_step() {
                backend.remove(key);
            }
        }
        if backend.core().drained() {
            break;
        }
    }
    backend.exit();
}

/// The work batched per turn: re-reads, delivery, one flush per dirty
/// connection, throttles, keepalive and deadlines (at the turn's time).
pub(super) fn end_of_turn<B: Backend>(backend: &mut B) {
    backend.before_end_of_turn();
    backend.core().resume_confirmed();
    let reread = backend.core().take_reread();
    for &(key, serial) in &reread {
        if backend.core().is_current(key, serial) {
            backend.reread(key);
        }
    }
    backend.core().return_reread(reread);
    let core = backend.core();
    // This turn's publications go to the mailboxes; the workers that must
    // be woken for them are woken here, before this one delivers.
    let mut wakes = core.dispatch();
    while wakes != 0 {
        let w = wakes.trailing_zeros() as usize;
        wakes &= wakes - 1;
        core.shared().bus.wake(w);
    }
    core.deliver();
    if core.delivered_any() {
        core.observe_write_pass(Instant::now());
    }
    // A bounded batch: the rest of the list waits for the next turn, which
    // first delivers what was published meanwhile (see `FLUSHES_PER_TURN`).
    let dirty = backend.core().take_dirty(FLUSHES_PER_TURN);
    for &(key, serial) in &dirty {
        // A flush earlier in this walk may have closed it.
        if backend.core().is_current(key, serial) {
            backend.flush(key);
        }
    }
    backend.core().return_dirty(dirty);
    let core = backend.core();
    core.observe_written(Instant::now());
    core.unthrottle();
    if core.keepalive() {
        backend.sweep();
    }
    let core = backend.core();
    let now = core.now();
    for (key, serial) in core.expire(now) {
        if backend.core().is_current(key, serial) {
            backend.remove(key);
        }
    }
    backend.core().settle_lease();
}

/// Accept errors that mean "out of descriptors or memory": retry after
/// [`ACCEPT_RETRY`] instead of spinning.
pub fn is_resource_exhaustion(errno: i32) -> bool {
    matches!(
        errno,
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
    )
}

/// Logs an accept that failed for lack of resources (one text for both
/// backends) and returns when to try again.
pub fn accept_exhausted(worker: usize, errno: i32, now: Instant) -> Instant {
    warn!(
        worker,
        error = %io::Error::from_raw_os_error(errno),
        "accept failed: out of resources; retrying shortly"
    );
    now + ACCEPT_RETRY
}
