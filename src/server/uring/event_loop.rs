//! The worker and its loop: one turn submits, reaps and batches.

use super::accept::Acceptor;
use super::bufring::{BGID, BufRing};
use super::conn::{SlotClose, Sock, conn_of, remove};
use super::ring::{
    NO_KEY, Op, PLAIN_FDS_ENV, Ring, build_ring, fixed_table_size, split_user_data, user_data,
};
use super::send::SendOp;
use super::wake::EventFd;
use crate::pubsub::bus::Inbox;
use crate::server::Shared;
use crate::server::worker::{Core, IoState};
use io_uring::{opcode, types};
use std::io;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long an exiting worker waits for the kernel to finish its operations.
const EXIT_WAIT: Duration = Duration::from_secs(2);
/// The worker's scratch buffer: receive data behind bytes kept from earlier input.
const SCRATCH_BYTES: usize = crate::server::epoll::READ_BUF_BYTES;

pub(in crate::server) struct Worker {
    pub(super) core: Core<Sock>,
    pub(super) ring: Ring,
    pub(super) bufs: BufRing,
    pub(super) accept: Acceptor,
    pub(super) wake: Arc<EventFd>,
    /// Where the armed eventfd read puts the counter.
    pub(super) wake_buf: Box<u64>,
    pub(super) wake_armed: bool,
    pub(super) scratch: Vec<u8>,
    pub(super) cqes: Vec<(u64, i32, u32)>,
    /// Spare send arguments, reused. Boxed on purpose: a box moves into a
    /// connection while its send is in flight, and its address must not change.
    #[allow(clippy::vec_box)]
    pub(super) send_pool: Vec<Box<SendOp>>,
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
        let plain_fds = std::env::var_os(PLAIN_FDS_ENV).is_some_and(|v| v == "1");
        let ring = build_ring()?;
        if plain_fds {
            info!(
                worker = id,
                "io_uring with plain descriptors ({PLAIN_FDS_ENV}=1)"
            );
        } else {
            ring.submitter().register_files_sparse(fixed_table_size())?;
        }
        let mut accept = Acceptor::new(listener);
        if !plain_fds {
            accept.table = fixed_table_size();
        }
        let bufs = BufRing::new(&ring)?;
        // Accepted sockets inherit TCP_NODELAY from the listener: pushed
        // frames leave at once, without a setsockopt per direct descriptor.
        socket2::SockRef::from(accept.listener.as_ref().expect("just bound")).set_nodelay(true)?;
        Ok(Self {
            core: Core::new(id, inbox, shared),
            ring: Ring {
                ring,
                backlog: Vec::new(),
                in_flight: 0,
                plain_fds,
            },
            bufs,
            accept,
            wake,
            wake_buf: Box::new(0),
            wake_armed: false,
            scratch: vec![0u8; SCRATCH_BYTES],
            cqes: Vec::with_capacity(1024),
            send_pool: Vec::new(),
        })
    }

    /// Runs the event loop until shutdown has drained every connection.
    pub(in crate::server) fn run(mut self) {
        let id = self.core.id;
        info!(worker = id, "worker started (io_uring)");
        loop {
            self.arm_accepts();
            self.arm_wake();
            self.enter();
            self.core.now = Instant::now();
            self.reap();
            self.end_of_turn();
            if self.core.drain_requested() {
                self.begin_drain();
            }
            if self.core.drained() {
                break;
            }
        }
        self.exit();
        info!(worker = id, "worker stopped");
    }

    /// Submits what is queued and waits for a completion or the next deadline.
    fn enter(&mut self) {
        let now = Instant::now();
        let busy = self.core.busy() || !self.ring.backlog.is_empty();
        let deadline = self.core.next_deadline(now, self.accept.retry_at);
        let result = match (busy, deadline) {
            (true, _) => self.ring.ring.submit(),
            (false, None) => self.ring.ring.submit_and_wait(1),
            (false, Some(t)) => {
                let ts = types::Timespec::from(t.saturating_duration_since(now));
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.ring.submitter().submit_with_args(1, &args)
            }
        };
        match result {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(e) => warn!(worker = self.core.id, error = %e, "io_uring_enter failed"),
        }
    }

    /// Handles every completion available.
    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.append(&mut self.ring.backlog);
        cqes.extend(
            self.ring
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(ud, res, flags) in &cqes {
            self.complete(ud, res, flags);
        }
        cqes.clear();
        self.cqes = cqes;
    }

    fn complete(&mut self, ud: u64, res: i32, flags: u32) {
        let (op, key, serial) = split_user_data(ud);
        match op {
            x if x == Op::Accept as u8 => self.on_accept(serial as usize, res),
            x if x == Op::Recv as u8 => self.on_recv(key, serial, res, flags),
            x if x == Op::Send as u8 => self.on_send(key, serial, res),
            x if x == Op::Close as u8 => {
                if !self.ring.plain_fds {
                    // Every accepted slot is closed exactly once.
                    self.accept.slots_used = self.accept.slots_used.saturating_sub(1);
                }
                if let Some(conn) = conn_of(&mut self.core, key, serial) {
                    conn.io.close = SlotClose::Done;
                    self.free_if_done(key);
                }
            }
            x if x == Op::Shutdown as u8 => {
                if let Some(conn) = conn_of(&mut self.core, key, serial) {
                    conn.io.shutdown_pending = false;
                    if conn.state == IoState::Gone {
                        self.free_if_done(key);
                    }
                }
            }
            x if x == Op::Wake as u8 => {
                self.wake_armed = false;
                self.ring.in_flight -= 1;
            }
            // Cancel results need no action: what they cancel reports
            // through its own completion.
            _ => {}
        }
    }

    /// Work that is batched per turn: re-armed receives, delivery of this
    /// turn's publications, one send per dirty connection, deadlines.
    fn end_of_turn(&mut self) {
        let reread = self.core.take_reread();
        for &(key, serial) in &reread {
            if !self.core.is_current(key, serial) {
                continue;
            }
            let conn = &self.core.conns[key];
            if conn.io.held && !conn.read_paused && conn.state == IoState::Active {
                self.input_held(key);
            }
            if Self::wants_recv(&self.core.conns[key]) {
                self.arm_recv(key);
            }
        }
        self.core.return_reread(reread);
        self.core.deliver();
        let dirty = self.core.take_dirty();
        for &(key, serial) in &dirty {
            if self.core.is_current(key, serial) {
                self.flush(key);
            }
        }
        self.core.return_dirty(dirty);
        self.core.observe_written();
        self.core.unthrottle();
        self.core.keepalive();
        let ring = &mut self.ring;
        self.core
            .expire(Instant::now(), |core, key| remove(core, ring, key));
    }

    /// Stops accepting and starts the close handshake on every open WebSocket.
    fn begin_drain(&mut self) {
        self.stop_accepting();
        let ring = &mut self.ring;
        self.core.begin_drain(|core, key| remove(core, ring, key));
        self.free_gone();
    }

    /// Closes whatever is left, cancels every operation and waits for the
    /// kernel to let go of the memory they use.
    fn exit(&mut self) {
        let id = self.core.id;
        let open = self
            .core
            .conns
            .iter()
            .filter(|(_, c)| c.state != IoState::Gone)
            .count();
        if open > 0 {
            warn!(
                worker = id,
                left = open,
                "drain deadline passed; dropping connections"
            );
        }
        self.stop_accepting();
        let keys: Vec<usize> = self.core.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            if self.core.conns[key].state != IoState::Gone {
                self.remove(key);
            }
        }
        if self.wake_armed {
            let sqe = opcode::AsyncCancel::new(user_data(Op::Wake, NO_KEY, 0))
                .build()
                .user_data(user_data(Op::Cancel, NO_KEY, 0));
            self.ring.push(&sqe);
        }
        let deadline = Instant::now() + EXIT_WAIT;
        while (self.ring.in_flight > 0 || !self.core.conns.is_empty()) && Instant::now() < deadline
        {
            let ts = types::Timespec::from(Duration::from_millis(10));
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.ring.submitter().submit_with_args(1, &args);
            self.reap();
            self.free_gone();
        }
        self.core.finish();
        if self.ring.in_flight > 0 || !self.core.conns.is_empty() {
            warn!(
                worker = id,
                in_flight = self.ring.in_flight,
                "the kernel still holds operations; leaking their memory"
            );
            // Never free what the kernel may still write to or read from.
            std::mem::forget(std::mem::take(&mut self.core.conns));
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
            std::mem::forget(std::mem::take(&mut self.accept.addrs));
            let bufs = std::mem::replace(&mut self.bufs, BufRing::leaked());
            std::mem::forget(bufs);
            return;
        }
        let _ = self.ring.ring.submitter().unregister_buf_ring(BGID);
    }
}
