//! The eventfd that wakes a worker, and the read the ring keeps armed on it.

use super::ring::{NO_KEY, Op, Ring, user_data};
use crate::pubsub::bus::Wake;
use io_uring::{opcode, types};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// The eventfd that wakes a worker (other workers' publications, shutdown).
pub(in crate::server) struct EventFd(OwnedFd);

impl EventFd {
    /// A new eventfd, counter 0.
    pub(in crate::server) fn new() -> io::Result<Self> {
        // Blocking: io_uring would complete a read of a non-blocking eventfd
        // at once with EAGAIN instead of waiting for a wake-up. (A write
        // blocks only if the counter would pass 2^64 - 2.)
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor we own.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// The bus's wake-up for an io_uring worker.
pub(in crate::server) struct EventFdWake(pub(in crate::server) Arc<EventFd>);

impl Wake for EventFdWake {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        let _ = unsafe { libc::write(self.0.raw(), (&raw const one).cast(), 8) };
    }
}

/// The read of the worker's eventfd that the ring keeps armed: its
/// completion is the wake-up.
pub(super) struct WakeRead {
    fd: Arc<EventFd>,
    /// Where the armed read puts the counter (8 bytes): the kernel's from
    /// [`Self::arm`] until the read's completion; leaked at exit if the
    /// read is still in flight.
    buf: Box<u64>,
    armed: bool,
}

impl WakeRead {
    pub(super) fn new(fd: Arc<EventFd>) -> Self {
        Self {
            fd,
            buf: Box::new(0),
            armed: false,
        }
    }

    /// Arms the read, unless it is armed.
    pub(super) fn arm(&mut self, ring: &mut Ring) {
        if self.armed {
            return;
        }
        let sqe = opcode::Read::new(types::Fd(self.fd.raw()), (&raw mut *self.buf).cast(), 8)
            .build()
            .user_data(user_data(Op::Wake, NO_KEY, 0));
        // SAFETY: the read writes into `self.buf`, a box this `WakeRead`
        // owns, not re-armed (`armed`) before the read completes, and
        // leaked at exit if the read is still in flight.
        unsafe { ring.push(&sqe) };
        ring.in_flight_started();
        self.armed = true;
    }

    /// The read completed (a wake-up, or its cancellation).
    pub(super) fn completed(&mut self, ring: &mut Ring) {
        self.armed = false;
        ring.in_flight_ended();
    }

    /// Cancels the read if it is armed; it still reports through its own
    /// completion.
    pub(super) fn cancel(&self, ring: &mut Ring) {
        if self.armed {
            let sqe = opcode::AsyncCancel::new(user_data(Op::Wake, NO_KEY, 0))
                .build()
                .user_data(user_data(Op::Cancel, NO_KEY, 0));
            // SAFETY: a cancel names no memory, only the `user_data` of what it cancels.
            unsafe { ring.push(&sqe) };
        }
    }

    /// Leaks the counter's buffer: the read is still in flight at exit.
    pub(super) fn leak_buf(&mut self) {
        std::mem::forget(std::mem::replace(&mut self.buf, Box::new(0)));
    }
}
