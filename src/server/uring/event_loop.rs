//! The worker and its loop: one turn submits, reaps and batches.

use super::accept::Acceptor;
use super::bufring::BufRing;
use super::conn::{Sock, conn_of};
use super::recv::Group;
use super::ring::{Cqe, Op, PLAIN_FDS_ENV, Ring, split_user_data, table_slots};
use super::send::SendOp;
use super::wake::{EventFd, WakeRead};
use crate::pubsub::bus::Inbox;
use crate::server::Shared;
use crate::server::backend::{self, Backend};
use crate::server::worker::{Core, IoState};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// How long an exiting worker waits for the kernel to finish its operations.
const EXIT_WAIT: Duration = Duration::from_secs(2);
/// One wait of the exit's loop: short, so that it frees gone connections
/// as their operations complete and notices the deadline.
const EXIT_POLL: Duration = Duration::from_millis(10);
/// The worker's scratch buffer: receive data behind bytes kept from earlier input.
const SCRATCH_BYTES: usize = crate::server::backend::READ_BUF_BYTES;

/// An io_uring worker: the backend-independent [`Core`] and what the
/// kernel shares with it.
///
/// The impl is split by path, one file each (accept.rs, recv.rs, send.rs,
/// conn.rs); the fields those files use are `pub(super)`, visible inside
/// `uring` only. The kernel-facing state they hold keeps its own fields
/// private.
pub(in crate::server) struct Worker {
    pub(super) core: Core<Sock>,
    pub(super) ring: Ring,
    pub(super) bufs: BufRing,
    /// The reserve: buffers only starved connections' receives draw from
    /// ([`BufRing::reserve`]).
    pub(super) reserve: BufRing,
    /// Connections whose receive found no shared buffer, by slab key and
    /// serial, in the order they starved (each at most once: its `QUEUED`
    /// bit); served before each wait ([`Worker::serve_starved`]).
    pub(super) starved: VecDeque<(usize, u32)>,
    /// The last pass of the starved queue had more entries than the
    /// reserve serves in a turn: receives re-armed after a reserve receive
    /// then wait for data ([`super::recv::poll_first`]).
    pub(super) reserve_short: bool,
    pub(super) accept: Acceptor,
    wake: WakeRead,
    /// The receive path's scratch buffer ([`SCRATCH_BYTES`], grown when
    /// kept input needs more).
    pub(super) scratch: Vec<u8>,
    /// This turn's completions (reused).
    cqes: Vec<Cqe>,
    /// Spare send arguments, reused. Boxed on purpose: a box moves into
    /// `send_ops` while its send is in flight, and the arguments' address
    /// must not change.
    #[allow(clippy::vec_box)]
    pub(super) send_pool: Vec<Box<SendOp>>,
    /// The arguments of each vectored send in flight, by slab key (a
    /// connection has at most one send in flight, and its key is reused
    /// only once that send has completed). Here rather than in the
    /// connection's `Sock`, which stays 8 bytes on every idle connection.
    pub(super) send_ops: HashMap<usize, Box<SendOp>>,
    /// The TLS sessions of this worker's connections, by slab key (none
    /// without `--tls-cert`), each dropped when its entry is freed.
    pub(super) tls: HashMap<usize, Box<super::tls::TlsState>>,
    /// TLS handshake steps left this turn (the current key's
    /// [`Certs::handshake_steps`](crate::server::tls::Certs::handshake_steps)).
    pub(super) tls_steps: u32,
    /// The buffer the next TLS flush seals into: given back after each send
    /// that completes as it is submitted, so it stays in the cache (see
    /// `flush_tls`); empty until the first TLS flush.
    pub(super) tls_scratch: Vec<u8>,
}

impl Worker {
    /// Builds the worker's ring; call on the worker's own thread (the ring
    /// is created single-issuer where the kernel supports it).
    pub(in crate::server) fn new(
        id: usize,
        listener: TcpListener,
        inbox: Inbox,
        wake: Arc<EventFd>,
        shared: Arc<Shared>,
    ) -> io::Result<Self> {
        let slots = table_slots(&shared.config);
        let plain_fds = slots.is_none();
        if plain_fds {
            info!(
                worker = id,
                "io_uring with plain descriptors ({PLAIN_FDS_ENV}=1)"
            );
        }
        // With plain descriptors there is no table to fill.
        let table = slots.unwrap_or(u32::MAX);
        let ring = Ring::new(plain_fds, table)?;
        let bufs = BufRing::new(ring.uring())?;
        let reserve = BufRing::reserve(ring.uring())?;
        // Accepted sockets inherit TCP_NODELAY from the listener: pushed
        // frames leave at once, without a setsockopt per direct descriptor.
        socket2::SockRef::from(&listener).set_nodelay(true)?;
        Ok(Self {
            core: Core::new(id, inbox, shared),
            ring,
            bufs,
            reserve,
            starved: VecDeque::new(),
            reserve_short: false,
            accept: Acceptor::new(listener, table),
            wake: WakeRead::new(wake),
            scratch: vec![0u8; SCRATCH_BYTES],
            cqes: Vec::with_capacity(1024),
            send_pool: Vec::new(),
            send_ops: HashMap::new(),
            tls: HashMap::new(),
            tls_steps: 0,
            tls_scratch: Vec::new(),
        })
    }

    /// Runs the event loop until shutdown has drained every connection.
    pub(in crate::server) fn run(mut self) {
        let id = self.core.id();
        info!(worker = id, "worker started (io_uring)");
        let run =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| backend::run(&mut self)));
        if run.is_err() {
            self.core.shared().worker_failed(id);
            // Never unwind past memory the kernel may hold: the orderly
            // exit cancels and waits (leaking what is still held); if that
            // fails too, everything is leaked, never freed under the
            // kernel. The process is draining and exits.
            let exit = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.close_all_and_wait()
            }));
            if exit.is_err() {
                tracing::error!(worker = id, "exit after the panic failed; leaking the ring");
                std::mem::forget(self);
            }
            return;
        }
        info!(worker = id, "worker stopped");
    }

    /// Handles every completion available.
    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        self.ring.reap_into(&mut cqes);
        for &(ud, res, flags) in &cqes {
            self.complete(ud, res, flags);
        }
        cqes.clear();
        self.cqes = cqes;
    }

    /// Dispatches one completion by the operation in its `user_data`.
    fn complete(&mut self, ud: u64, res: i32, flags: u32) {
        let (op, key, serial) = split_user_data(ud);
        match op {
            x if x == Op::Accept as u8 => self.on_accept(serial as usize, res),
            x if x == Op::Recv as u8 => self.on_recv(key, serial, res, flags, Group::Shared),
            x if x == Op::RecvReserve as u8 => {
                self.on_recv(key, serial, res, flags, Group::Reserve)
            }
            x if x == Op::Send as u8 => self.on_send(key, serial, res),
            x if x == Op::Close as u8 => {
                if !self.ring.plain_fds() {
                    self.accept.slot_closed();
                }
                if let Some(conn) = conn_of(&mut self.core, key, serial) {
                    conn.io_mut().close_ended();
                    self.free_if_done(key);
                }
            }
            x if x == Op::Shutdown as u8 => {
                if let Some(conn) = conn_of(&mut self.core, key, serial) {
                    conn.io_mut().shutdown_ended();
                    if conn.state() == IoState::Gone {
                        self.free_if_done(key);
                    }
                }
            }
            x if x == Op::Wake as u8 => self.wake.completed(&mut self.ring),
            // Cancel results need no action: what they cancel reports
            // through its own completion.
            _ => {}
        }
    }

    /// Closes whatever is left, cancels every operation and waits for the
    /// kernel to let go of the memory they use.
    fn close_all_and_wait(&mut self) {
        let id = self.core.id();
        let open = self
            .core
            .keys()
            .into_iter()
            .filter(|&k| self.core.conn(k).state() != IoState::Gone)
            .count();
        if open > 0 {
            warn!(
                worker = id,
                left = open,
                "drain deadline passed; dropping connections"
            );
        }
        self.accept.stop(&mut self.ring);
        let keys = self.core.keys();
        for key in keys {
            if self.core.conn(key).state() != IoState::Gone {
                self.remove(key);
            }
        }
        self.wake.cancel(&mut self.ring);
        let deadline = Instant::now() + EXIT_WAIT;
        while (self.ring.in_flight() > 0 || !self.core.is_empty()) && Instant::now() < deadline {
            let _ = self.ring.submit_and_wait_for(EXIT_POLL);
            self.reap();
            self.free_gone();
        }
        self.core.finish();
        if self.ring.in_flight() > 0 || !self.core.is_empty() {
            warn!(
                worker = id,
                in_flight = self.ring.in_flight(),
                "the kernel still holds operations; leaking their memory"
            );
            // Never free what the kernel may still write to or read from.
            self.core.leak_connections();
            std::mem::forget(std::mem::take(&mut self.send_ops));
            std::mem::forget(std::mem::take(&mut self.tls));
            self.wake.leak_buf();
            self.accept.leak_addrs();
            self.bufs.leak();
            self.reserve.leak();
            return;
        }
        let _ = self.bufs.unregister(self.ring.uring());
        let _ = self.reserve.unregister(self.ring.uring());
    }
}

impl Backend for Worker {
    type Io = Sock;

    fn core(&mut self) -> &mut Core<Sock> {
        &mut self.core
    }

    /// Arms accepts and the wake-up read, submits what is queued, and
    /// waits for a completion or the deadline.
    fn wait(&mut self, busy: bool, deadline: Option<Instant>) -> io::Result<()> {
        // Closes completed in the last turn may have made room.
        self.steer();
        let away = self.accept.table_full() && !self.core.shared().steering.takes(self.core.id());
        self.accept.arm(&mut self.ring, away);
        self.wake.arm(&mut self.ring);
        self.serve_starved();
        match self.ring.enter(busy, Instant::now(), deadline) {
            Err(e)
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                // Not fatal: the ring is still usable; the next turn retries.
                if e.raw_os_error() == Some(libc::EBADR) {
                    error!(worker = self.core.id(), error = %e, "io_uring dropped completions (out of memory in the kernel)");
                } else {
                    warn!(worker = self.core.id(), error = %e, "io_uring_enter failed");
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn handle_events(&mut self) {
        self.tls_steps = self.core.handshake_steps_per_turn();
        self.reap();
    }

    fn sweep(&mut self) {
        for s in self.tls.values_mut() {
            s.sweep();
        }
    }

    /// Feeds input held while paused, and re-arms the multishot receive.
    fn reread(&mut self, key: usize) {
        let conn = self.core.conn(key);
        if conn.io().held() && !conn.read_paused() && conn.state() == IoState::Active {
            self.input_held(key);
        }
        if Self::wants_recv(self.core.conn(key)) {
            self.arm_recv(key);
        }
    }

    fn flush(&mut self, key: usize) {
        Worker::flush(self, key);
    }

    fn remove(&mut self, key: usize) {
        Worker::remove(self, key);
    }

    fn stop_accepting(&mut self) {
        self.accept.stop(&mut self.ring);
    }

    fn deadline(&self) -> Option<Instant> {
        self.accept.retry_at()
    }

    fn exit(&mut self) {
        self.close_all_and_wait();
    }
}
