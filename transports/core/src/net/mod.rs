//! The socket machinery every transport needs, in one place: listening TCP sockets and UDP
//! sockets (with SO_REUSEPORT, so several sockets or processes share a port and the kernel
//! spreads peers over them), batched UDP reads with `recvmmsg`, and per-peer queues that let a
//! reader hand each datagram to the task that owns its peer without waiting for it; and the
//! admission of new connections under limits on how many and how fast ([`Admission`]).

mod admission;
mod peers;
mod udp;

pub use admission::{Admission, Admitted, ConnectionLimits, Refusal};
pub use peers::{PeerQueues, Routed};
pub use udp::{MAX_DATAGRAM, ReceiveBatch, bind_udp, bind_udp_per_core};

use std::net::SocketAddr;

use tokio::net::TcpListener;

/// Binds a listening TCP socket on `addr` with SO_REUSEADDR and, when `reuse_port`, SO_REUSEPORT
/// (several gateway processes sharing one port). An error (port taken, no permission) is a
/// start-up error for the caller to name its setting in. Must be called within a tokio runtime.
pub fn bind_tcp(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Closes a connection refused at accept with a reset (SO_LINGER 0) instead of a FIN: the
/// refusing side then keeps no TIME_WAIT socket for it, so that a connection flood does not
/// fill the kernel's table with the flood's own leftovers.
pub fn refuse_tcp(stream: tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
