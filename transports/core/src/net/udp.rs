//! UDP sockets and batched reads.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use bytes::{Bytes, BytesMut};
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};
use tokio::net::UdpSocket;

/// Room for one datagram: any UDP datagram fits, so none is ever truncated.
pub const MAX_DATAGRAM: usize = 65_536;
/// Received datagrams are copied into buffers allocated this large and carved into one `Bytes`
/// per datagram.
const RECEIVE_ARENA: usize = 4 * MAX_DATAGRAM;
/// Datagrams taken from the socket by one `recvmmsg` call.
const RECEIVE_BATCH: usize = 32;

thread_local! {
    /// `recvmmsg` headers, one set per thread: they hold raw pointers, so they are not `Send`
    /// and cannot live in a reader task.
    static HEADERS: std::cell::RefCell<MultiHeaders<SockaddrStorage>> =
        std::cell::RefCell::new(MultiHeaders::preallocate(RECEIVE_BATCH, None));
}

/// Binds a UDP socket on `addr` (SO_REUSEPORT when `reuse_port`) with 4 MiB socket buffers
/// where the kernel allows, so that bursts are absorbed rather than dropped. Must be called
/// within a tokio runtime.
pub fn bind_udp(addr: SocketAddr, reuse_port: bool) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    // Best effort: the kernel caps these at rmem_max / wmem_max.
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Binds `addr`, and with `reuse_port` one more socket per further core on the same port, so
/// that the kernel spreads peers (by address hash) over one reader per core. The first socket
/// decides the port when `addr` asks for port 0.
pub fn bind_udp_per_core(addr: SocketAddr, reuse_port: bool) -> std::io::Result<Vec<UdpSocket>> {
    let first = bind_udp(addr, reuse_port)?;
    let local = first.local_addr()?;
    let mut sockets = vec![first];
    if reuse_port {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        for _ in 1..cores {
            sockets.push(bind_udp(local, true)?);
        }
    }
    Ok(sockets)
}

/// Receives up to 32 datagrams with one system call (`recvmmsg`) and hands each out as its own
/// `Bytes`, carved from a shared arena.
pub struct ReceiveBatch {
    /// One `MAX_DATAGRAM` slot per datagram, reused (the kernel writes only what arrived).
    slots: Vec<Vec<u8>>,
    /// Length and sender of each datagram of the last call; `next` hands them out in order.
    received: Vec<(usize, Option<SockaddrStorage>)>,
    next: usize,
    arena: BytesMut,
}

impl Default for ReceiveBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl ReceiveBatch {
    /// Room for one batch (2 MiB of slots).
    pub fn new() -> Self {
        Self {
            slots: vec![vec![0; MAX_DATAGRAM]; RECEIVE_BATCH],
            received: Vec::with_capacity(RECEIVE_BATCH),
            next: 0,
            arena: BytesMut::new(),
        }
    }

    /// One non-blocking `recvmmsg` on `fd`: `WouldBlock` when nothing is waiting. Call it
    /// through `UdpSocket::try_io` so that tokio learns when the socket is drained.
    pub fn receive(&mut self, fd: RawFd) -> std::io::Result<()> {
        self.received.clear();
        self.next = 0;
        let (slots, received) = (&mut self.slots, &mut self.received);
        HEADERS.with_borrow_mut(|headers| {
            let mut slices: Vec<[IoSliceMut<'_>; 1]> =
                slots.iter_mut().map(|slot| [IoSliceMut::new(slot)]).collect();
            let results = recvmmsg(fd, headers, slices.iter_mut(), MsgFlags::MSG_DONTWAIT, None)?;
            received.extend(results.map(|r| (r.bytes, r.address)));
            Ok(())
        })
    }

    /// The next datagram of the last call and its sender, copied out of its slot.
    pub fn next_datagram(&mut self) -> Option<(SocketAddr, Bytes)> {
        loop {
            let &(len, from) = self.received.get(self.next)?;
            let slot = &self.slots[self.next];
            self.next += 1;
            let Some(peer) = from.and_then(socket_addr) else { continue };
            if self.arena.capacity() < len {
                self.arena.reserve(RECEIVE_ARENA.max(len));
            }
            self.arena.extend_from_slice(&slot[..len.min(slot.len())]);
            return Some((peer, self.arena.split().freeze()));
        }
    }
}

fn socket_addr(addr: SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    addr.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[tokio::test]
    async fn a_batch_hands_out_every_datagram_with_its_sender() {
        let server = bind_udp("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = server.local_addr().unwrap();
        for i in 0..5u8 {
            client.send_to(&[i; 3], to).unwrap();
        }
        let mut batch = ReceiveBatch::new();
        let mut got = Vec::new();
        while got.len() < 5 {
            server.readable().await.unwrap();
            let fd = server.as_raw_fd();
            match server.try_io(tokio::io::Interest::READABLE, || batch.receive(fd)) {
                Ok(()) => {
                    while let Some((from, bytes)) = batch.next_datagram() {
                        assert_eq!(from, client.local_addr().unwrap());
                        got.push(bytes);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, (0..5u8).map(|i| Bytes::from(vec![i; 3])).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn per_core_sockets_share_one_port() {
        let sockets = bind_udp_per_core("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let port = sockets[0].local_addr().unwrap().port();
        assert!(sockets.iter().all(|s| s.local_addr().unwrap().port() == port));
    }
}
