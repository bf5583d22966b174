//! The tokio glue: UDP sockets, one reader task per socket, and one task per peer address that
//! owns the peer's CoAP state (deduplication, exchanges, observations, block-wise transfers)
//! and its 1/KP session.
//!
//! A reader never waits for a peer: it hands each datagram to its peer's bounded queue and
//! drops it when that queue is full (the peer retransmits). A peer task waits for the gateway
//! ([`KpHandler::handle`] returns when the bus accepted a request), so a slow backend slows the
//! peers that use it, not the socket. With `reuse_port`, each core gets its own socket
//! (SO_REUSEPORT), so the kernel spreads peers over readers and no task sees every datagram.
//!
//! CoAP has no credentials here (plain UDP; DTLS and OSCORE are for later): a session is opened
//! for a peer address on its first request. As a stand-in until DTLS, a request may carry
//! Uri-Query arguments `u=<user name>` and `p=<password>`, which are passed to
//! [`KpHandler::open_session`]; the first request's credentials hold for the session's
//! lifetime, and a later request with different ones is refused with 4.01.
//!
//! What a device sees:
//! - POST or PUT to `/kp1/<appver>/<ext>/<token>/<path>[/<request id>]`: 2.04 Changed with the
//!   extension's payload, or an error code ([`response_code`]) with the reason phrase as
//!   diagnostic payload; GET: 2.05 Content. Every request is answered, with or without request
//!   id. A confirmable request gets its answer piggybacked on the ACK when it comes within
//!   `ack_timeout_ms`, else an empty ACK and a separate confirmable response (retransmitted until
//!   acknowledged or reset); a non-confirmable one gets a non-confirmable response.
//! - A retransmission (same message id within `exchange_lifetime_ms`) is answered from the
//!   cache, or acknowledged while the answer is pending, and never reaches the backend twice.
//! - GET with Observe 0 registers (the answer is the first notification); pushes whose 1/KP
//!   path equals the observed one become notifications (confirmable when the registration was),
//!   with increasing 24-bit sequence numbers and Max-Age; GET with Observe 1, a RST to a
//!   notification, or an unacknowledged confirmable notification ends the observation.
//! - Block1 requests are reassembled (2.31 Continue per block) up to `max_payload_bytes`, else
//!   4.13 with Size1; answers and notifications larger than a block go out with Block2, and
//!   their later blocks are served from memory.
//! - Unknown critical options get 4.02, methods other than GET, POST and PUT 4.05, Proxy-Uri
//!   5.05, a ping (Empty CON) and a malformed confirmable message RST.

use fleetgate_transport_core::stopped;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, RawFd};

use bytes::{Bytes, BytesMut};
use fleetgate_transport_core::metrics::{Counter, Gauge, write_metric};
use fleetgate_transport_core::{KpHandler, Transport};
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::codec::{Code, Header, Message, MessageType, MessageWriter, option, write_empty};
use crate::peer::{Datagram, Peer};

/// CoAP listener settings (`transports.coap.*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoapConfig {
    /// Whether to listen at all.
    pub enabled: bool,
    /// Address and UDP port to listen on.
    pub listen: SocketAddr,
    /// Open one socket per core on the same port (SO_REUSEPORT), each with its own reader, so
    /// that the kernel spreads peers over cores; also lets several gateway replicas share the
    /// port. Off by default, so that a port taken by something else is a start-up error.
    pub reuse_port: bool,
    /// RFC 7252 ACK_TIMEOUT. A confirmable request whose answer arrives within this time gets
    /// it piggybacked on the ACK; otherwise it gets an empty ACK now and a separate confirmable
    /// response later. Also the initial timeout (times a random factor of 1 to 1.5, doubled on
    /// each try, at most 4 retransmissions) of separate responses and notifications.
    pub ack_timeout_ms: u64,
    /// How long a request's message id is remembered to recognise retransmissions (RFC 7252
    /// EXCHANGE_LIFETIME); a duplicate is answered from the cache and never reaches the
    /// backend twice.
    pub exchange_lifetime_ms: u64,
    /// Per peer: message ids remembered for deduplication and requests awaiting their answer.
    /// When the deduplication cache is full the oldest entry is forgotten early; when this many
    /// requests await an answer, further ones get 5.03.
    pub max_exchanges: usize,
    /// Largest request payload, whole or reassembled from Block1 blocks; larger ones get 4.13
    /// with Size1 set to this limit.
    pub max_payload_bytes: usize,
    /// Block size (16 to 1024, a power of two) asked of Block1 clients that send larger
    /// blocks, and of Block2 answers and notifications larger than one block (a client may ask
    /// for smaller ones).
    pub block_size_bytes: usize,
    /// Per peer: Block1 transfers in progress at once (one more gets 5.03), and Block2 answers
    /// kept for their later blocks (one more forgets the oldest).
    pub max_block_transfers: usize,
    /// A Block1 transfer, or a kept Block2 answer, with no block asked for this long is dropped
    /// (its next block gets 4.08).
    pub block_transfer_timeout_ms: u64,
    /// A peer that sends nothing for this long loses its state and its session is closed. Keep
    /// it above `observe_max_age_secs`, after which observers re-register.
    pub session_idle_timeout_ms: u64,
    /// Peers with state at once; the first request of one more gets 5.03.
    pub max_sessions: usize,
    /// Per peer: resources observed at once; a registration past this is served as a plain GET
    /// (without Observe, RFC 7641 §4.1).
    pub max_observations: usize,
    /// Max-Age of notifications (RFC 7641 §4.3.1): an observer that hears nothing for this
    /// long re-registers.
    pub observe_max_age_secs: u32,
    /// Per peer: datagrams waiting for the peer's task; more are dropped (and retransmitted by
    /// the peer if confirmable).
    pub peer_queue_capacity: usize,
    /// Per session: responses and pushes waiting to be sent; a session that lets it fill is
    /// closed by the gateway.
    pub response_queue_capacity: usize,
}

impl Default for CoapConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 5683)),
            reuse_port: false,
            ack_timeout_ms: 2_000,
            exchange_lifetime_ms: 247_000,
            max_exchanges: 1_024,
            max_payload_bytes: 64 * 1024,
            block_size_bytes: 1_024,
            max_block_transfers: 4,
            block_transfer_timeout_ms: 60_000,
            session_idle_timeout_ms: 300_000,
            max_sessions: 100_000,
            max_observations: 8,
            observe_max_age_secs: 60,
            peer_queue_capacity: 64,
            response_queue_capacity: 256,
        }
    }
}

/// CoAP counters for `/metrics`.
#[derive(Debug, Default)]
pub struct CoapMetrics {
    /// CoAP messages received (every datagram that decoded).
    pub messages_received: Counter,
    /// Responses and notifications sent (not counting empty ACKs, resets and retransmissions).
    pub messages_sent: Counter,
    /// Datagrams that are not CoAP messages.
    pub protocol_errors: Counter,
    /// Datagrams dropped because their peer's queue was full.
    pub datagrams_dropped: Counter,
    /// Retransmitted requests answered from the deduplication cache.
    pub duplicates: Counter,
    /// Empty ACKs sent because the answer took longer than `ack_timeout_ms`.
    pub separate_responses: Counter,
    /// Separate responses and notifications retransmitted.
    pub retransmissions: Counter,
    /// Separate responses and notifications given up after the last retransmission.
    pub retransmit_timeouts: Counter,
    /// Resets received.
    pub resets_received: Counter,
    /// Notifications sent to observers.
    pub notifications: Counter,
    /// Pushes for a resource the peer does not observe, dropped.
    pub pushes_unobserved: Counter,
    /// Block1 transfers completed.
    pub block_transfers: Counter,
    /// Sessions opened.
    pub sessions_opened: Counter,
    /// Sessions refused by the gateway (credentials, unavailable auth).
    pub sessions_refused: Counter,
    /// Peers dropped after `session_idle_timeout_ms` without traffic.
    pub sessions_expired: Counter,
    /// Requests refused with 5.03 because `max_sessions` peers have state.
    pub sessions_over_limit: Counter,
    /// Peers with state now (each with a session once it sent a request).
    pub sessions_open: Gauge,
    /// Observations registered now.
    pub observations_open: Gauge,
}

/// Labels of every CoAP transport metric.
const LABELS: &str = "{transport=\"coap\"}";

impl CoapMetrics {
    /// Appends the Prometheus text exposition.
    pub fn render(&self, out: &mut String) {
        let counters = [
            ("messages_received_total", "Messages received from devices", &self.messages_received),
            ("messages_sent_total", "Responses and pushes sent to devices", &self.messages_sent),
            (
                "protocol_errors_total",
                "Datagrams that are not valid messages",
                &self.protocol_errors,
            ),
            (
                "datagrams_dropped_total",
                "Datagrams dropped on a full peer queue",
                &self.datagrams_dropped,
            ),
            (
                "duplicates_total",
                "Retransmitted requests answered from the deduplication cache",
                &self.duplicates,
            ),
            (
                "separate_responses_total",
                "Requests acknowledged before their answer arrived",
                &self.separate_responses,
            ),
            (
                "retransmissions_total",
                "Confirmable responses and notifications retransmitted",
                &self.retransmissions,
            ),
            (
                "retransmit_timeouts_total",
                "Confirmable responses and notifications never acknowledged",
                &self.retransmit_timeouts,
            ),
            ("resets_received_total", "Resets received", &self.resets_received),
            ("notifications_total", "Notifications sent to observers", &self.notifications),
            (
                "pushes_unobserved_total",
                "Pushes for resources nobody observes, dropped",
                &self.pushes_unobserved,
            ),
            (
                "block_transfers_total",
                "Block-wise request transfers completed",
                &self.block_transfers,
            ),
            ("sessions_opened_total", "Sessions opened", &self.sessions_opened),
            ("sessions_refused_total", "Sessions refused", &self.sessions_refused),
            ("sessions_expired_total", "Sessions closed after idling", &self.sessions_expired),
            (
                "sessions_over_limit_total",
                "Requests refused because too many peers have sessions",
                &self.sessions_over_limit,
            ),
        ];
        for (name, help, counter) in counters {
            let name = format!("fleetgate_transport_{name}");
            write_metric(out, "counter", &name, help, LABELS, counter.get());
        }
        let gauges = [
            (
                "sessions_open",
                "Peers with state (a session once they sent a request)",
                &self.sessions_open,
            ),
            ("observations_open", "Observations registered", &self.observations_open),
        ];
        for (name, help, gauge) in gauges {
            let name = format!("fleetgate_transport_{name}");
            write_metric(out, "gauge", &name, help, LABELS, gauge.get());
        }
    }
}

/// The CoAP response code for an HTTP status (DESIGN decision 3): 2xx gives `success` (2.04
/// Changed for POST and PUT, 2.05 Content for GET and notifications), 400, 401, 403, 404, 413,
/// 429, 503 and 504 their CoAP twins, any other 4xx 4.00, anything else 5.00.
pub fn response_code(status: u16, success: Code) -> Code {
    match status {
        200..=299 => success,
        400 => Code::BAD_REQUEST,
        401 => Code::UNAUTHORIZED,
        403 => Code::FORBIDDEN,
        404 => Code::NOT_FOUND,
        413 => Code::REQUEST_ENTITY_TOO_LARGE,
        429 => Code::TOO_MANY_REQUESTS,
        503 => Code::SERVICE_UNAVAILABLE,
        504 => Code::GATEWAY_TIMEOUT,
        402..=499 => Code::BAD_REQUEST,
        _ => Code::INTERNAL_SERVER_ERROR,
    }
}

/// Settings and counters shared by the readers and peer tasks of one transport.
pub(crate) struct Shared {
    pub config: CoapConfig,
    pub metrics: Arc<CoapMetrics>,
    /// Peers with a task now, for `max_sessions`.
    pub peers: AtomicUsize,
    pub ack_timeout: Duration,
    pub exchange_lifetime: Duration,
    pub idle_timeout: Duration,
    pub block_timeout: Duration,
    pub block_szx: u8,
}

/// The CoAP transport, bound and ready to serve.
pub struct CoapTransport {
    sockets: Vec<Arc<UdpSocket>>,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
}

/// Room for one datagram: any UDP datagram fits, so none is ever truncated.
const MAX_DATAGRAM: usize = 65_536;
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

/// Receives up to [`RECEIVE_BATCH`] datagrams with one system call (`recvmmsg`).
struct ReceiveBatch {
    /// One `MAX_DATAGRAM` slot per datagram, reused (the kernel writes only what arrived).
    slots: Vec<Vec<u8>>,
    /// Length and sender of each datagram of the last call; `next` hands them out in order.
    received: Vec<(usize, Option<SockaddrStorage>)>,
    next: usize,
    arena: BytesMut,
}

impl ReceiveBatch {
    fn new() -> Self {
        Self {
            slots: vec![vec![0; MAX_DATAGRAM]; RECEIVE_BATCH],
            received: Vec::with_capacity(RECEIVE_BATCH),
            next: 0,
            arena: BytesMut::new(),
        }
    }

    /// One non-blocking `recvmmsg`: `WouldBlock` when nothing is waiting.
    fn receive(&mut self, fd: RawFd) -> std::io::Result<()> {
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
    fn next(&mut self) -> Option<(SocketAddr, Bytes)> {
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

fn udp_socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    // Best effort: a larger receive buffer absorbs bursts; the kernel caps it at rmem_max.
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

impl CoapTransport {
    /// Binds the socket (one per core with `reuse_port`). An error here (port taken, no
    /// permission) is a start-up error. Must be called within a tokio runtime.
    pub fn bind(config: CoapConfig) -> std::io::Result<Self> {
        let first = udp_socket(config.listen, config.reuse_port)?;
        let local_addr = first.local_addr()?;
        let mut sockets = vec![Arc::new(first)];
        if config.reuse_port {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            for _ in 1..cores {
                sockets.push(Arc::new(udp_socket(local_addr, true)?));
            }
        }
        let ms = Duration::from_millis;
        let shared = Shared {
            ack_timeout: ms(config.ack_timeout_ms.max(1)),
            exchange_lifetime: ms(config.exchange_lifetime_ms.max(1)),
            idle_timeout: ms(config.session_idle_timeout_ms.max(1)),
            block_timeout: ms(config.block_transfer_timeout_ms.max(1)),
            block_szx: crate::codec::BlockOption::szx_for(config.block_size_bytes),
            metrics: Arc::default(),
            peers: AtomicUsize::new(0),
            config,
        };
        Ok(Self { sockets, local_addr, shared: Arc::new(shared) })
    }

    /// The transport's counters.
    pub fn metrics(&self) -> Arc<CoapMetrics> {
        self.shared.metrics.clone()
    }
}

impl Transport for CoapTransport {
    fn name(&self) -> &'static str {
        "coap"
    }

    fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    async fn serve<H: KpHandler>(self, handler: Arc<H>, shutdown: watch::Receiver<bool>) {
        let mut readers = JoinSet::new();
        for (i, socket) in self.sockets.into_iter().enumerate() {
            let reader = Reader {
                socket,
                shared: self.shared.clone(),
                handler: handler.clone(),
                shutdown: shutdown.clone(),
                peers: HashMap::new(),
                tasks: JoinSet::new(),
                scratch: BytesMut::new(),
            };
            let span = tracing::info_span!("coap", socket = i);
            readers.spawn(reader.run().instrument(span));
        }
        while readers.join_next().await.is_some() {}
    }
}

/// Reads one socket and hands datagrams to their peers' tasks.
struct Reader<H> {
    socket: Arc<UdpSocket>,
    shared: Arc<Shared>,
    handler: Arc<H>,
    shutdown: watch::Receiver<bool>,
    peers: HashMap<SocketAddr, mpsc::Sender<Datagram>>,
    tasks: JoinSet<()>,
    scratch: BytesMut,
}

impl<H: KpHandler> Reader<H> {
    async fn run(mut self) {
        let mut batch = ReceiveBatch::new();
        let mut sweep = tokio::time::interval(Duration::from_secs(5));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.shutdown.clone();
        // Registered with the shutdown signal once, not once per datagram.
        let stop = stopped(&mut shutdown);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                ready = self.socket.readable() => {
                    if let Err(e) = ready {
                        tracing::debug!(error = %e, "socket not readable");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    let fd = self.socket.as_raw_fd();
                    let received = self
                        .socket
                        .try_io(tokio::io::Interest::READABLE, || batch.receive(fd));
                    match received {
                        Ok(()) => {
                            let at = Instant::now();
                            while let Some((peer, bytes)) = batch.next() {
                                self.dispatch(peer, Datagram { bytes, at }).await;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            // ICMP errors surface here on some systems; nothing to do but go on.
                            tracing::debug!(error = %e, "receive failed");
                            if !matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset) {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    }
                }
                _ = sweep.tick() => {
                    self.peers.retain(|_, queue| !queue.is_closed());
                    while self.tasks.try_join_next().is_some() {}
                }
                () = &mut stop => break,
            }
        }
        // Peer tasks see the same signal, answer what they can and close their sessions.
        drop(self.peers);
        while self.tasks.join_next().await.is_some() {}
    }

    async fn dispatch(&mut self, addr: SocketAddr, datagram: Datagram) {
        let datagram = match self.peers.get(&addr) {
            Some(queue) => match queue.try_send(datagram) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.shared.metrics.datagrams_dropped.inc();
                    return;
                }
                // The peer's task ended (idle): start a new one.
                Err(mpsc::error::TrySendError::Closed(datagram)) => {
                    self.peers.remove(&addr);
                    datagram
                }
            },
            None => datagram,
        };
        // Only a request or a ping from an unknown peer is worth state; a stray ACK or RST,
        // another version or garbage is dropped (RFC 7252 §3, §4.2).
        let Some(header) = Header::peek(&datagram.bytes) else {
            self.shared.metrics.protocol_errors.inc();
            return;
        };
        if !matches!(header.mtype, MessageType::Confirmable | MessageType::NonConfirmable) {
            return;
        }
        if header.code.is_empty() {
            // A ping (Empty CON) is answered with RST without keeping state (RFC 7252 §4.3).
            self.shared.metrics.messages_received.inc();
            if header.mtype == MessageType::Confirmable && datagram.bytes.len() == 4 {
                write_empty(&mut self.scratch, MessageType::Reset, header.message_id);
                let reset = self.scratch.split().freeze();
                let _ = self.socket.send_to(&reset, addr).await;
            }
            return;
        }
        let max = self.shared.config.max_sessions;
        if self.shared.peers.fetch_add(1, Ordering::Relaxed) >= max {
            self.shared.peers.fetch_sub(1, Ordering::Relaxed);
            self.refuse_busy(addr, &datagram.bytes).await;
            return;
        }
        let (queue, inbound) = mpsc::channel(self.shared.config.peer_queue_capacity.max(1));
        let _ = queue.try_send(datagram);
        self.peers.insert(addr, queue);
        let peer = Peer::new(self.handler.clone(), self.shared.clone(), self.socket.clone(), addr);
        let span = tracing::debug_span!("peer", %addr);
        self.tasks.spawn(peer.run(inbound, self.shutdown.clone()).instrument(span));
    }

    /// Answers a request from one peer too many with 5.03 and a Max-Age, keeping no state.
    async fn refuse_busy(&mut self, addr: SocketAddr, bytes: &Bytes) {
        let metrics = &self.shared.metrics;
        let Ok(msg) = Message::decode(bytes.clone()) else {
            metrics.protocol_errors.inc();
            return;
        };
        metrics.messages_received.inc();
        if !msg.code().is_request() {
            return;
        }
        metrics.sessions_over_limit.inc();
        let (mtype, id) = match msg.mtype() {
            MessageType::Confirmable => (MessageType::Acknowledgement, msg.message_id()),
            _ => (MessageType::NonConfirmable, msg.message_id().wrapping_add(0x8000)),
        };
        let code = Code::SERVICE_UNAVAILABLE;
        let Ok(mut w) =
            MessageWriter::new(&mut self.scratch, mtype, code, id, msg.token().as_slice())
        else {
            return;
        };
        if w.uint_option(option::MAX_AGE, 30).is_err() {
            return;
        }
        w.payload(b"too many peers");
        let reply = self.scratch.split().freeze();
        let _ = self.socket.send_to(&reply, addr).await;
        metrics.messages_sent.inc();
    }
}
