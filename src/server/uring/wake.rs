//! The eventfd that wakes a worker, and the read the ring keeps armed on it.

use super::Worker;
use super::ring::{NO_KEY, Op, user_data};
use crate::pubsub::bus::Wake;
use io_uring::{opcode, types};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// The eventfd that wakes a worker (other workers' publications, shutdown).
pub(in crate::server) struct EventFd(OwnedFd);

impl EventFd {
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

impl Worker {
    pub(super) fn arm_wake(&mut self) {
        if self.wake_armed {
            return;
        }
        let sqe = opcode::Read::new(
            types::Fd(self.wake.raw()),
            (&raw mut *self.wake_buf).cast(),
            8,
        )
        .build()
        .user_data(user_data(Op::Wake, NO_KEY, 0));
        self.ring.push(&sqe);
        self.ring.in_flight += 1;
        self.wake_armed = true;
    }
}
