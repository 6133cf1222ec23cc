//! One connection's entry in a worker's slab: the backend's handle and the
//! protocol state, with the core's bookkeeping (deadline stamps, budget
//! charge). Its fields are the core's (the parent module's); a backend
//! reaches its handle and its queue through the methods here.

use super::IoState;

use crate::proto::OutQueue;
use crate::server::session::Session;

/// One connection: the backend's handle `S` and the protocol state.
///
/// The backend reaches its handle and the queue it writes through the
/// methods below; everything else is the core's. There is one per
/// connection, idle ones included: every field counts (see
/// docs/BENCHMARKS.md, "Idle memory per subscriber, accounted").
pub struct Conn<S> {
    pub(super) io: S,
    pub(super) session: Session,
    /// Distinguishes this connection from later ones reusing its slab key.
    pub(super) serial: u32,
    /// The keepalive clock, in milliseconds since the worker started
    /// (wrapping; compared by difference): when input last arrived, or,
    /// while [`PING_PENDING`], when the ping went out.
    pub(super) keepalive_ms: u32,
    /// Bytes of this connection charged to the worker's buffer budget.
    pub(super) charged: u32,
    pub(super) state: IoState,
    /// [`READ_PAUSED`], [`PEER_EOF`], [`DIRTY`], [`PING_PENDING`],
    /// [`ADMITTED`], [`REQUEST_DONE`], [`PUBLISHED`], [`CONFLATING`], [`RATED`],
    /// [`AWAIT_PROXY`], [`PACED`], [`THROTTLED`]: bits.
    flags: u16,
}

/// Stopped reading because the outbound queue is over its bound (or a
/// publisher is paced or throttled).
pub(super) const READ_PAUSED: u16 = 1;
/// The peer sent FIN: once the queue is flushed there is nothing to wait for.
pub(super) const PEER_EOF: u16 = 2;
/// Already in the dirty list this turn.
pub(super) const DIRTY: u16 = 4;
/// A keepalive ping is out and unanswered (nothing received since).
pub(super) const PING_PENDING: u16 = 8;
/// Counted by the admission limits (clear: refused at accept).
pub(super) const ADMITTED: u16 = 16;
/// The session completed an HTTP request since the request deadline was
/// last armed ([`Core::after_input`](super::Core::after_input) arms the next).
pub(super) const REQUEST_DONE: u16 = 32;
/// The session published something since the last read's backpressure
/// check took the mark.
pub(super) const PUBLISHED: u16 = 64;
/// Publications wait for this subscriber in the core's conflation tables.
pub(super) const CONFLATING: u16 = 128;
/// The subscriber asked for a maximum rate per topic (`max_rate`): all its
/// publications go through its conflation table.
pub(super) const RATED: u16 = 256;
/// On a listener that expects a PROXY protocol header, which has not come
/// yet: counted against the process-wide cap only, until it names the
/// client.
pub(super) const AWAIT_PROXY: u16 = 512;
/// Listed in the core's `paced` (one entry per connection): membership
/// without a search of the list.
pub(super) const PACED: u16 = 1024;
/// Listed in the core's `throttled`.
pub(super) const THROTTLED: u16 = 2048;

impl<S> Conn<S> {
    /// A connection just accepted at `now_ms`, its request head awaited.
    pub(super) fn new(io: S, serial: u32, now_ms: u32, admitted: bool) -> Self {
        Self {
            io,
            session: Session::new(),
            serial,
            keepalive_ms: now_ms,
            charged: 0,
            state: IoState::Active,
            flags: if admitted { ADMITTED } else { 0 },
        }
    }

    pub(super) fn flag(&self, bit: u16) -> bool {
        self.flags & bit != 0
    }

    pub(super) fn set_flag(&mut self, bit: u16, on: bool) {
        if on {
            self.flags |= bit;
        } else {
            self.flags &= !bit;
        }
    }

    /// Clears `bit`; returns whether it was set.
    pub(super) fn take_flag(&mut self, bit: u16) -> bool {
        let was = self.flag(bit);
        self.flags &= !bit;
        was
    }

    /// The backend's socket handle.
    pub fn io(&self) -> &S {
        &self.io
    }

    pub fn io_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// Tells this connection from a later one reusing its slab key.
    pub fn serial(&self) -> u32 {
        self.serial
    }

    pub fn state(&self) -> IoState {
        self.state
    }

    /// Not to be read: paused by backpressure, pacing or throttling.
    pub fn read_paused(&self) -> bool {
        self.flag(READ_PAUSED)
    }

    /// Its first bytes are a PROXY protocol header still to come: give
    /// them to [`Core::proxy_header`](super::Core::proxy_header), not to
    /// TLS or the session.
    pub fn awaits_proxy(&self) -> bool {
        self.flag(AWAIT_PROXY)
    }

    /// The peer has sent its FIN.
    pub fn peer_eof(&self) -> bool {
        self.flag(PEER_EOF)
    }

    /// The socket handle and the queue together, for a write that gathers
    /// one and writes to the other.
    pub fn io_and_out(&mut self) -> (&mut S, &mut OutQueue) {
        (&mut self.io, &mut self.session.out)
    }

    /// The bytes waiting to be written, for the backend's write.
    pub fn out(&self) -> &OutQueue {
        &self.session.out
    }

    /// The queue, to gather it, pin it for the kernel and advance it by
    /// what was written (then report with [`Core::after_flush`]).
    pub fn out_mut(&mut self) -> &mut OutQueue {
        &mut self.session.out
    }

    /// Input kept from the previous read (see [`Session::restore_pending`]).
    pub fn pending_len(&self) -> usize {
        self.session.pending_len()
    }

    pub fn restore_pending(&mut self, buf: &mut [u8]) -> usize {
        self.session.restore_pending(buf)
    }

    /// Keeps input that arrived while reading was paused (see [`Session::hold`]).
    pub fn hold(&mut self, data: &[u8]) {
        self.session.hold(data);
    }

    /// Lists the connection (slab key `key`) for the end-of-turn flush, once.
    pub(super) fn mark_dirty(&mut self, key: usize, list: &mut super::DirtyList) {
        if !self.flag(DIRTY) {
            self.set_flag(DIRTY, true);
            list.push((key, self.serial));
        }
    }
}
