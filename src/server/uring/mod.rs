//! The io_uring backend: one ring per worker thread, driving the same
//! [`Core`](crate::server::worker::Core) as the epoll loop.
//!
//! Per worker:
//! - [`ACCEPTS_IN_FLIGHT`] single-shot accepts on the worker's
//!   `SO_REUSEPORT` listener, each re-armed after it completes, which install
//!   each connection straight into the ring's sparse fixed-file table (a
//!   *direct descriptor*: no slot in the process's descriptor table, so the
//!   open-file limit caps each ring, not the process). Single-shot, not
//!   multishot: a multishot accept has one address buffer for all its
//!   completions, so it cannot tell each connection's peer address. While
//!   the table is full and new connections are steered to other workers,
//!   one more, plain accept answers the clients still queued `503`
//!   (`REFUSE` in accept.rs);
//! - one multishot receive per connection, into a provided-buffer ring shared
//!   by all of the worker's connections and consumed incrementally (a
//!   receive takes only the bytes it needs; see `BufRing`): an idle
//!   connection owns no receive buffer, and a used-up buffer goes back to
//!   the ring as soon as the core has consumed its bytes. A receive that
//!   finds none (`ENOBUFS`) waits in the starved queue, served in order
//!   from a small reserve group before each wait (`Worker::serve_starved`);
//! - at the end of each loop turn, one send per dirty connection: a plain
//!   `IORING_OP_SEND` when its queue's front is a single buffer, a
//!   vectored `sendmsg` over up to
//!   [`MAX_IOVECS`](crate::proto::outbound::MAX_IOVECS) queued chunks
//!   otherwise. `Ring::push` submits every 64 queued entries
//!   (`SUBMIT_EVERY`) and when the submission queue is full; what is left
//!   goes with the `io_uring_enter` that starts the next turn (a TLS
//!   connection's send of its own ciphertext is submitted at once, see
//!   `tls.rs`). A connection has at most one send in flight, so its bytes
//!   never reorder; a short send leaves the rest queued for the next turn;
//! - cross-worker wake-ups through an eventfd read kept armed in the ring.
//!
//! # Who owns what the kernel reads or writes
//!
//! Every operation's memory stays valid until its completion (CQE) is reaped:
//! - **receive buffers** belong to the kernel while published in the buffer
//!   ring (incrementally consumed, it also rewrites the head entry, so we
//!   write only entries past the published tail); a CQE hands us the bytes
//!   it names, and one without `IORING_CQE_F_BUF_MORE` hands back the
//!   whole buffer `bid`, which we publish again once its bytes are
//!   processed (or at once, when the connection is gone); the same holds
//!   for the reserve group, each its own `BufRing`;
//! - **send data** is the connection's [`OutQueue`](crate::proto::outbound::OutQueue)
//!   front, pinned ([`pin_front`](crate::proto::outbound::OutQueue::pin_front))
//!   so that neither new frames nor a slow-consumer cut move or free it.
//!   A plain send names only that data; a vectored send's `msghdr` and
//!   iovec array live in a boxed [`SendOp`](send::SendOp) held by the
//!   worker in `send_ops`, under the connection's slab key (the
//!   connection's 8-byte `Sock` records only which kind of send is in
//!   flight). Both are released only by the send's CQE;
//! - a **closed connection** stays in the slab (state `Gone`, out of every
//!   list, no longer counted) until its receive, send and close operations
//!   have all completed; removing it cancels the receive and the send first;
//! - the **wake-up counter** (8 bytes) belongs to the worker;
//! - each **accept's peer address** (a `sockaddr_storage` and its
//!   `socklen_t`, which the kernel reads and writes when the connection
//!   arrives) is one entry of the worker's boxed `Acceptor` array,
//!   allocated once and never resized; entry `i` is the kernel's from the
//!   arming of accept `i` until its CQE (every accept posts exactly one,
//!   also when cancelled), and only then read; the listener stays open
//!   while any accept names it;
//! - at **exit**, the worker cancels everything and waits (bounded) for the
//!   completions; if the kernel has not finished in time, the memory
//!   (connections, the vectored sends' arguments in `send_ops`, receive
//!   buffers, wake-up counter, accept addresses) is leaked rather than
//!   freed under it.
//!
//! # Where things are
//!
//! One concern per file. A connection's bytes flow accept.rs → recv.rs
//! (from bufring.rs) → the core → send.rs, and it ends in conn.rs; each
//! file states the invariants of the state it keeps.
//!
//! | file | holds |
//! |---|---|
//! | `ring.rs` | the ring wrapper; `Ring::push`, which every worker entry goes through, and its safety contract; `user_data` encoding |
//! | `event_loop.rs` | `Worker`: building it, the loop turn, completion dispatch, exit |
//! | `accept.rs` | the single-shot accepts and the peer addresses they write |
//! | `bufring.rs` | the provided-buffer ring the receives fill |
//! | `recv.rs` | the receive path: multishot receives to the core |
//! | `send.rs` | the send path: one send per dirty connection, plain (one buffer) or vectored (`sendmsg`, its `SendOp`) |
//! | `tls.rs` | TLS connections: ciphertext received pumped through the session to the core, the queue encrypted into the session's `wire` buffer and sent; who owns `wire` and until when |
//! | `conn.rs` | a connection's socket state (`Sock`) and how it closes (`SlotClose`) |
//! | `wake.rs` | the eventfd other workers use to wake this one, and its armed read |
//! | `probe.rs` | the start-up probe: does the kernel run all of this? |

mod accept;
mod bufring;
mod conn;
mod event_loop;
mod probe;
mod recv;
mod ring;
mod send;
mod tls;
mod wake;

pub use accept::ACCEPTS_IN_FLIGHT;
pub(super) use event_loop::Worker;
pub use probe::probe;
pub(super) use ring::table_slots;
pub(super) use wake::{EventFd, EventFdWake};
