//! Listening sockets: one per worker, all bound to the same address with
//! `SO_REUSEPORT`, so the kernel spreads incoming connections over the
//! workers without a shared accept queue or lock.

use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

/// Interval between TCP keepalive probes once the idle time has passed.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes after which the kernel drops the connection.
pub const KEEPALIVE_PROBES: u32 = 6;

/// Accept backlog requested from the kernel (it clamps to `net.core.somaxconn`).
/// Large so that connection storms queue in the kernel rather than fail.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Binds a non-blocking `SO_REUSEPORT` listener on `addr`. With
/// `keepalive`, TCP keepalive is set on the listener: Linux copies it (like
/// `TCP_NODELAY`) to every accepted socket, which matters for io_uring's
/// direct descriptors, on which no `setsockopt` can be called.
pub fn bind_reuseport(addr: SocketAddr, keepalive: Option<Duration>) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    if let Some(idle) = keepalive {
        sock.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(idle)
                .with_interval(KEEPALIVE_INTERVAL)
                .with_retries(KEEPALIVE_PROBES),
        )?;
    }
    sock.bind(&addr.into())?;
    sock.listen(LISTEN_BACKLOG)?;
    Ok(sock.into())
}

/// Binds `count` listeners on `addr`; when `addr` has port 0, the first
/// listener picks the port and the others join it.
pub fn bind_group(
    addr: SocketAddr,
    count: usize,
    keepalive: Option<Duration>,
) -> io::Result<(SocketAddr, Vec<TcpListener>)> {
    let first = bind_reuseport(addr, keepalive)?;
    let bound = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..count {
        all.push(bind_reuseport(bound, keepalive)?);
    }
    Ok((bound, all))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_shares_one_port() {
        let (addr, ls) = bind_group("127.0.0.1:0".parse().unwrap(), 3, None).unwrap();
        assert_ne!(addr.port(), 0);
        for l in &ls {
            assert_eq!(l.local_addr().unwrap(), addr);
        }
    }

    #[test]
    fn accepted_sockets_inherit_tcp_keepalive() {
        let idle = Duration::from_secs(42);
        let (addr, ls) = bind_group("127.0.0.1:0".parse().unwrap(), 1, Some(idle)).unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let accepted = loop {
            match ls[0].accept() {
                Ok((s, _)) => break Socket::from(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert!(accepted.keepalive().unwrap());
        assert_eq!(accepted.keepalive_time().unwrap(), idle);
        assert_eq!(accepted.keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(accepted.keepalive_retries().unwrap(), KEEPALIVE_PROBES);
    }
}
