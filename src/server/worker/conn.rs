//! One connection's entry in a worker's slab: the backend's handle and the
//! protocol state, with the core's bookkeeping (deadline stamps, budget
//! charge). Its fields are the core's (the parent module's); a backend
//! reaches its handle and its queue through the methods here.

use super::IoState;
use crate::proto::OutQueue;
use crate::pubsub::shard::ConnRef;
use crate::server::session::Session;

/// One connection: the backend's handle `S` and the protocol state.
///
/// The backend reaches its handle and the queue it writes through the
/// methods below; everything else is the core's.
pub struct Conn<S> {
    pub(super) io: S,
    pub(super) session: Session,
    /// Distinguishes this connection from later ones reusing its slab key.
    pub(super) serial: u32,
    pub(super) state: IoState,
    /// Stopped reading because the outbound queue is over its bound.
    pub(super) read_paused: bool,
    /// The peer sent FIN: once the queue is flushed there is nothing to wait for.
    pub(super) peer_eof: bool,
    /// Already in the dirty list this turn.
    pub(super) dirty: bool,
    /// A keepalive ping is out and unanswered (nothing received since).
    pub(super) ping_pending: bool,
    /// When input last arrived, or the ping went out: milliseconds since
    /// the worker started (wrapping; compared by difference).
    pub(super) last_rx_ms: u32,
    pub(super) ping_sent_ms: u32,
    /// `session.requests()` when the current request deadline was armed.
    pub(super) request_gen: u32,
    /// Bytes of this connection charged to the worker's buffer budget.
    pub(super) charged: u32,
    /// The send deadline, by epochs: at `tx_ms` the queue held everything
    /// up to byte `tx_goal` of the connection's output (counted by `sent`,
    /// wrapping). Once `sent` passes `tx_goal` a new epoch starts; an epoch
    /// older than the send timeout means a queued byte waited that long.
    pub(super) tx_ms: u32,
    pub(super) tx_goal: u32,
    /// Bytes the kernel has taken from this connection's queue (wrapping).
    pub(super) sent: u32,
    /// Counted by the admission limits (false: refused at accept).
    pub(super) admitted: bool,
}

impl<S> Conn<S> {
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
        self.read_paused
    }

    /// The peer has sent its FIN.
    pub fn peer_eof(&self) -> bool {
        self.peer_eof
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
    pub(super) fn mark_dirty(&mut self, key: usize, list: &mut Vec<ConnRef>) {
        if !self.dirty {
            self.dirty = true;
            list.push((key, self.serial));
        }
    }
}
