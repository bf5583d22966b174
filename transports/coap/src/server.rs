//! The tokio glue: UDP sockets, one reader task per socket, and one task per peer address that
//! drives the peer's [`PeerSession`](crate::session::PeerSession) (its CoAP state and its 1/KP
//! session): it feeds the session the peer's datagrams and the session's outbox, sends what the
//! session sends, calls the gateway for the session's events, and sleeps until its deadline.
//! The reader answers what needs no state itself: a ping from an unknown peer (RST), and a
//! request from one peer more than `max_sessions` (5.03).
//!
//! A reader never waits for a peer: it hands each datagram to its peer's bounded queue and
//! drops it when that queue is full (the peer retransmits). A peer task waits for the gateway
//! ([`KpHandler::handle`] returns when the bus accepted a request), so a slow backend slows the
//! peers that use it, not the socket. With `reuse_port`, each core gets its own socket
//! (SO_REUSEPORT), so the kernel spreads peers over readers and no task sees every datagram.
//!
//! A source address proves nothing over UDP, so a peer is *unproven* until the gateway accepts
//! one of its requests (its token is good). Unproven peers live in a small pool per socket
//! (`max_unproven_peers`; a new one evicts the oldest), so spoofed sources hold bounded state
//! and never fill `max_sessions`; no answer to them is larger than its request (longer ones go
//! out as the bare code), they get one retransmission burst at most, and their Block1 buffers,
//! grown block by block, come out of a shared budget (`unproven_block1_budget_bytes`).
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

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleetgate_live::Live;
use fleetgate_transport_core::metrics::{
    Counter, Gauge, Latency, Registry, TransportMetrics, transport_registry,
};
use fleetgate_transport_core::net::{self, PeerQueues, ReceiveBatch, Routed};
use fleetgate_transport_core::settings::below_minimum;
use fleetgate_transport_core::{BindError, BoxFuture, KpHandler, Shutdown, Transport, stopped};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tracing::Instrument;

use crate::codec::{Code, Header, Message, MessageType, MessageWriter, option, write_empty};
use crate::peer::{Datagram, Peer};
use crate::session::{Block1Budget, Settings};

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
    /// Peers with state whose token is not proven yet (the gateway has accepted none of their
    /// requests), per socket: a new one past this evicts the oldest of them (its session is
    /// closed; a real device's retransmission starts afresh). So spoofed source addresses hold
    /// at most this many peers and 1/KP sessions, and never fill `max_sessions`.
    pub max_unproven_peers: usize,
    /// Bytes that Block1 transfers of unproven peers may hold, all such peers together; a block
    /// past it gets 5.03 with Max-Age. Buffers grow as blocks arrive (a declared Size1 reserves
    /// nothing), and leave this budget once their peer proves a token.
    pub unproven_block1_budget_bytes: usize,
    /// Per peer: resources observed at once; a registration past this is served as a plain GET
    /// (without Observe, RFC 7641 §4.1).
    pub max_observations: usize,
    /// Max-Age of notifications (RFC 7641 §4.3.1): an observer that hears nothing for this
    /// long re-registers.
    pub observe_max_age_secs: u32,
    /// Per peer: datagrams waiting for the peer's task; more are dropped (and retransmitted by
    /// the peer if confirmable).
    pub peer_queue_capacity: usize,
    /// Per session: pushes waiting to be sent; a session that lets it fill is closed by the
    /// gateway. Answers to the session's own requests have room besides (up to
    /// `max_exchanges` of them).
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
            max_unproven_peers: 1_024,
            unproven_block1_budget_bytes: 256 * 1024,
            max_observations: 8,
            observe_max_age_secs: 60,
            peer_queue_capacity: 64,
            response_queue_capacity: 256,
        }
    }
}

impl CoapConfig {
    /// Values out of range, as `(setting, what is wrong)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = below_minimum(&[
            ("ack_timeout_ms", self.ack_timeout_ms, 1),
            ("exchange_lifetime_ms", self.exchange_lifetime_ms, 1),
            ("max_exchanges", self.max_exchanges as u64, 1),
            ("max_payload_bytes", self.max_payload_bytes as u64, 1),
            ("max_block_transfers", self.max_block_transfers as u64, 1),
            ("block_transfer_timeout_ms", self.block_transfer_timeout_ms, 1),
            ("session_idle_timeout_ms", self.session_idle_timeout_ms, 1),
            ("max_sessions", self.max_sessions as u64, 1),
            ("max_unproven_peers", self.max_unproven_peers as u64, 1),
            ("observe_max_age_secs", self.observe_max_age_secs.into(), 1),
            ("peer_queue_capacity", self.peer_queue_capacity as u64, 1),
            ("response_queue_capacity", self.response_queue_capacity as u64, 1),
        ]);
        // RFC 7959 §2.2: SZX 0 to 6, blocks of 16 to 1024 bytes.
        if !(16..=1024).contains(&self.block_size_bytes) || !self.block_size_bytes.is_power_of_two()
        {
            problems.push((
                "block_size_bytes",
                format!(
                    "{} is not a block size: 16, 32, 64, 128, 256, 512 or 1024",
                    self.block_size_bytes
                ),
            ));
        }
        problems
    }
}

/// CoAP metrics: the shared transport families, labelled `transport="coap"`, and its own.
#[derive(Debug, Clone)]
pub struct CoapMetrics {
    /// CoAP messages received (every datagram that decoded).
    pub messages_received: Counter,
    /// Responses and notifications sent (not counting empty ACKs, resets and retransmissions).
    pub messages_sent: Counter,
    /// Datagrams that are not CoAP messages.
    pub protocol_errors: Counter,
    /// Sessions opened.
    pub sessions_opened: Counter,
    /// From the read that brought a request to the gateway's acceptance.
    pub request_accept: Latency,
    /// Sessions refused by the gateway (credentials, unavailable auth).
    pub sessions_refused: Counter,
    /// Peers with state now (each with a session once it sent a request).
    pub sessions_open: Gauge,
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
    /// Peers dropped after `session_idle_timeout_ms` without traffic.
    pub sessions_expired: Counter,
    /// Requests refused with 5.03 because `max_sessions` peers have state.
    pub sessions_over_limit: Counter,
    /// Observations registered now.
    pub observations_open: Gauge,
    /// Peers without a proven token evicted to make room for a new one (`max_unproven_peers`).
    pub unproven_evicted: Counter,
    /// Answers to unproven peers cut to their code because they were larger than the request.
    pub replies_trimmed: Counter,
    /// Blocks refused because the Block1 budget of unproven peers was spent.
    pub block1_budget_refusals: Counter,
    /// Peers that proved a token.
    pub peers_proven: Counter,
}

/// The transport's name in metrics and logs.
const NAME: &str = "coap";

impl CoapMetrics {
    /// The CoAP handles of the shared families, and fresh counters of its own.
    pub fn new(shared: &TransportMetrics) -> Self {
        let c = shared.counters(NAME);
        Self {
            messages_received: c.messages_received(),
            messages_sent: c.messages_sent(),
            protocol_errors: c.protocol_errors(),
            sessions_opened: c.sessions_opened(),
            request_accept: c.request_accept(),
            sessions_refused: c.sessions_refused(),
            sessions_open: c.sessions_open(),
            datagrams_dropped: Counter::default(),
            duplicates: Counter::default(),
            separate_responses: Counter::default(),
            retransmissions: Counter::default(),
            retransmit_timeouts: Counter::default(),
            resets_received: Counter::default(),
            notifications: Counter::default(),
            pushes_unobserved: Counter::default(),
            block_transfers: Counter::default(),
            sessions_expired: Counter::default(),
            sessions_over_limit: Counter::default(),
            observations_open: Gauge::default(),
            unproven_evicted: Counter::default(),
            replies_trimmed: Counter::default(),
            block1_budget_refusals: Counter::default(),
            peers_proven: Counter::default(),
        }
    }

    fn register(&self, registry: &mut Registry) {
        let r = transport_registry(registry, NAME);
        let counters = [
            (
                "datagrams_dropped",
                "Datagrams dropped on a full peer queue",
                &self.datagrams_dropped,
            ),
            (
                "duplicates",
                "Retransmitted requests answered from the deduplication cache",
                &self.duplicates,
            ),
            (
                "separate_responses",
                "Requests acknowledged before their answer arrived",
                &self.separate_responses,
            ),
            (
                "retransmissions",
                "Confirmable responses and notifications retransmitted",
                &self.retransmissions,
            ),
            (
                "retransmit_timeouts",
                "Confirmable responses and notifications never acknowledged",
                &self.retransmit_timeouts,
            ),
            ("resets_received", "Resets received", &self.resets_received),
            ("notifications", "Notifications sent to observers", &self.notifications),
            (
                "pushes_unobserved",
                "Pushes for resources nobody observes, dropped",
                &self.pushes_unobserved,
            ),
            ("block_transfers", "Block-wise request transfers completed", &self.block_transfers),
            ("sessions_expired", "Sessions closed after idling", &self.sessions_expired),
            (
                "sessions_over_limit",
                "Requests refused because too many peers have sessions",
                &self.sessions_over_limit,
            ),
            (
                "unproven_evicted",
                "Peers without a proven token evicted for a newer one",
                &self.unproven_evicted,
            ),
            (
                "replies_trimmed",
                "Answers to unproven peers cut to their code, so as not to exceed the request",
                &self.replies_trimmed,
            ),
            (
                "block1_budget_refusals",
                "Blocks refused because unproven peers' Block1 budget was spent",
                &self.block1_budget_refusals,
            ),
            ("peers_proven", "Peers whose token the gateway accepted", &self.peers_proven),
        ];
        for (name, help, counter) in counters {
            r.register(name, help, counter.clone());
        }
        r.register("observations_open", "Observations registered", self.observations_open.clone());
    }
}

pub use crate::session::response_code;

impl From<&CoapConfig> for Settings {
    fn from(config: &CoapConfig) -> Self {
        let ms = |v: u64| Duration::from_millis(v.max(1));
        Settings {
            ack_timeout: ms(config.ack_timeout_ms),
            exchange_lifetime: ms(config.exchange_lifetime_ms),
            max_exchanges: config.max_exchanges,
            max_payload_bytes: config.max_payload_bytes,
            block_size_bytes: config.block_size_bytes,
            max_block_transfers: config.max_block_transfers,
            block_transfer_timeout: ms(config.block_transfer_timeout_ms),
            idle_timeout: ms(config.session_idle_timeout_ms),
            max_observations: config.max_observations,
            observe_max_age_secs: config.observe_max_age_secs,
        }
    }
}

/// Settings and counters shared by the readers and peer tasks of one transport.
pub(crate) struct Shared {
    /// Replaced by configuration reloads: a new peer's session is made with the settings
    /// current when it first sends (sockets and queues stay as started).
    pub config: Live<CoapConfig>,
    pub metrics: Arc<CoapMetrics>,
    /// Peers with a task now, for `max_sessions`.
    pub peers: AtomicUsize,
    /// Block1 bytes unproven peers may hold, all together.
    pub block1_budget: Arc<Block1Budget>,
}

impl Shared {
    /// What a new peer's session is made with.
    pub(crate) fn session_settings(&self) -> Arc<Settings> {
        Arc::new(Settings::from(&**self.config.read()))
    }
}

/// The CoAP transport over UDP.
pub struct CoapTransport {
    sockets: Vec<Arc<UdpSocket>>,
    shared: Arc<Shared>,
}

impl CoapTransport {
    /// The transport for `config`, reporting into `metrics`; [`Transport::bind`] opens its
    /// sockets (one per core with `reuse_port`).
    pub fn new(config: CoapConfig, metrics: &TransportMetrics) -> Self {
        let shared = Shared {
            metrics: Arc::new(CoapMetrics::new(metrics)),
            peers: AtomicUsize::new(0),
            block1_budget: Block1Budget::new(config.unproven_block1_budget_bytes),
            config: Live::new(config),
        };
        Self { sockets: Vec::new(), shared: Arc::new(shared) }
    }

    /// Its settings, for configuration reloads: new peers get the new limits and timers.
    pub fn settings(&self) -> Live<CoapConfig> {
        self.shared.config.clone()
    }

    /// The transport's metrics.
    pub fn metrics(&self) -> Arc<CoapMetrics> {
        self.shared.metrics.clone()
    }
}

impl Transport for CoapTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn config_section(&self) -> &'static str {
        "transports.coap"
    }

    fn bind(&mut self) -> Result<(), BindError> {
        let config = self.shared.config.get();
        let sockets = net::bind_udp_per_core(config.listen, config.reuse_port)
            .map_err(|e| BindError::listen(self.config_section(), config.listen, e))?;
        self.sockets = sockets.into_iter().map(Arc::new).collect();
        Ok(())
    }

    fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets.first().and_then(|s| s.local_addr().ok()).into_iter().collect()
    }

    fn register_metrics(&self, registry: &mut Registry) {
        self.shared.metrics.register(registry);
    }

    fn serve(
        self: Box<Self>,
        handler: Arc<dyn KpHandler>,
        shutdown: Shutdown,
    ) -> BoxFuture<'static, ()> {
        // No new requests while draining: the gateway refuses them (5.03), so nothing new is
        // acknowledged; peers close at the stop.
        let shutdown = shutdown.stop;
        Box::pin(async move {
            let mut readers = JoinSet::new();
            for (i, socket) in self.sockets.into_iter().enumerate() {
                let reader = Reader {
                    peers: PeerQueues::new(self.shared.config.get().peer_queue_capacity),
                    socket,
                    shared: self.shared.clone(),
                    handler: handler.clone(),
                    shutdown: shutdown.clone(),
                    tasks: JoinSet::new(),
                    scratch: BytesMut::new(),
                    unproven: VecDeque::new(),
                };
                let span = tracing::info_span!("coap", socket = i);
                readers.spawn(reader.run().instrument(span));
            }
            while readers.join_next().await.is_some() {}
        })
    }
}

/// A peer in the reader's pool of unproven ones.
struct Unproven {
    addr: SocketAddr,
    proven: Arc<AtomicBool>,
    task: AbortHandle,
}

/// Reads one socket and hands datagrams to their peers' tasks.
struct Reader {
    socket: Arc<UdpSocket>,
    shared: Arc<Shared>,
    handler: Arc<dyn KpHandler>,
    shutdown: watch::Receiver<bool>,
    peers: PeerQueues<SocketAddr, Datagram>,
    tasks: JoinSet<()>,
    scratch: BytesMut,
    /// Peers of this socket that have not proven a token, oldest first (proven ones and ended
    /// ones are dropped as they are met): the pool `max_unproven_peers` bounds.
    unproven: VecDeque<Unproven>,
}

impl Reader {
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
                            let at = std::time::Instant::now();
                            while let Some((peer, bytes)) = batch.next_datagram() {
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
                    self.peers.sweep();
                    let peers = &self.peers;
                    self.unproven
                        .retain(|u| !u.proven.load(Ordering::Relaxed) && peers.contains(&u.addr));
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
        let datagram = match self.peers.route(&addr, datagram) {
            Ok(()) => return,
            Err(Routed::Full(_)) => {
                self.shared.metrics.datagrams_dropped.inc();
                return;
            }
            // No task owns the peer (new, or its task ended idle): maybe start one.
            Err(Routed::NoPeer(datagram)) => datagram,
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
        let (max, max_unproven) = {
            let config = self.shared.config.read();
            (config.max_sessions, config.max_unproven_peers.max(1))
        };
        self.make_room(max_unproven);
        if self.shared.peers.fetch_add(1, Ordering::Relaxed) >= max {
            self.shared.peers.fetch_sub(1, Ordering::Relaxed);
            self.refuse_busy(addr, &datagram.bytes).await;
            return;
        }
        let inbound = self.peers.insert(addr, datagram);
        let proven = Arc::new(AtomicBool::new(false));
        let peer = Peer::new(
            self.handler.clone(),
            self.shared.clone(),
            self.socket.clone(),
            addr,
            proven.clone(),
        );
        let span = tracing::debug_span!("peer", %addr);
        let task = self.tasks.spawn(peer.run(inbound, self.shutdown.clone()).instrument(span));
        self.unproven.push_back(Unproven { addr, proven, task });
    }

    /// Evicts the oldest unproven peers until a new one fits in the pool of `max`: the task
    /// ends at once, wherever it waits (for the gateway's authentication too), and closes its
    /// session; so the pool bounds the tasks of unproven peers, not only their queues.
    fn make_room(&mut self, max: usize) {
        while self.unproven.len() >= max {
            let Some(u) = self.unproven.pop_front() else { break };
            if !u.proven.load(Ordering::Relaxed) && self.peers.remove(&u.addr) {
                u.task.abort();
                self.shared.metrics.unproven_evicted.inc();
            }
        }
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
        // No larger than the request: a Max-Age (2 bytes) and a reason only when they fit.
        let room = bytes.len().saturating_sub(4 + msg.token().len());
        if room >= 2 && w.uint_option(option::MAX_AGE, 30).is_err() {
            return;
        }
        let reason = b"too many peers";
        if room >= 2 + 1 + reason.len() {
            w.payload(reason);
        }
        let reply = self.scratch.split().freeze();
        let _ = self.socket.send_to(&reply, addr).await;
        metrics.messages_sent.inc();
    }
}
