//! The tokio glue: a TCP listener and one small task per MQTT connection that moves bytes
//! between the socket and the connection's sans-IO [`Session`], hands the session's events to a
//! [`KpHandler`], and feeds the gateway's responses and pushes back in.
//!
//! The protocol is all in [`crate::session`]; this module only reads, writes, awaits and sleeps,
//! logs, and turns the session's counts and close reasons into metrics. It keeps what an idle
//! connection holds small (M4): no tracing span per connection, the handler's futures boxed,
//! buffers that start empty and are given back when idle, the first read of an empty
//! connection onto the stack, the shutdown future pinned once and one timer that moves only
//! when it fires (or must fire sooner).
//!
//! fleetgate is not a broker (DESIGN decision 2): responses and pushes for a connection's
//! endpoints are written to that connection whether or not it subscribed. A client may also
//! subscribe to filters that name an endpoint token (`kp1/<appver>/<ext>/<token>/...`) to get
//! copies of that endpoint's responses and pushes, e.g. a `mosquitto_sub` beside a
//! `mosquitto_pub`; filters that do not name a token are refused. QoS 2 is refused (MQTT 5:
//! DISCONNECT 0x9B after CONNACK advertised Maximum QoS 1; 3.1.1, which has no way to refuse: the
//! connection is closed). Retained messages, wills, shared subscriptions and subscription
//! identifiers are not supported.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use fleetgate_live::Live;
use fleetgate_transport_core::metrics::{
    Counter, Gauge, Latency, Registry, TransportCounters, TransportMetrics,
};
use fleetgate_transport_core::net::{Admission, Admitted, ConnectionLimits, Refusal};
use fleetgate_transport_core::settings::{above_maximum, below_minimum};
use fleetgate_transport_core::{
    BindError, BoxFuture, ClientCertificate, ClientCredentials, KpHandler, KpResponse,
    OutboxReceiver, SessionId, Shutdown, Transport, TryRecvError, net, stopped,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::codec::{ProtocolVersion, ReasonCode};
use crate::session::{Close, Event, Session, SessionConfig, Stats};
use crate::takeover;

/// MQTT listener settings (`transports.mqtt.*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Whether to listen at all.
    pub enabled: bool,
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Share the port with other processes (SO_REUSEPORT), for several gateway replicas on one
    /// host. Off by default, so that a port taken by something else is a start-up error.
    pub reuse_port: bool,
    /// Largest packet accepted from a client, fixed header included; larger ones close the
    /// connection (MQTT 5: DISCONNECT 0x95) before their body is read.
    pub max_packet_size_bytes: u32,
    /// Largest first packet (CONNECT) accepted, fixed header included: what a peer that has
    /// proven nothing may make the connection buffer. A bigger one closes the connection
    /// before its body is read. Applies up to `max_packet_size_bytes`.
    pub max_connect_packet_size_bytes: u32,
    /// Time a new connection has to send CONNECT and be authenticated.
    pub connect_timeout_ms: u64,
    /// Longest keep-alive granted; a client asking for more, or for none (0), gets this. MQTT 5
    /// clients are told (Server Keep Alive); 3.1.1 clients cannot be, so for them it is the
    /// server's idle timeout (closed after 1.5 times it without a packet).
    pub max_keep_alive_secs: u16,
    /// Connections open at once on each MQTT listener (TCP, TLS, WebSocket, QUIC count
    /// apart); more are closed at once, counted in `connections_limited{reason="total"}`. 0: no
    /// limit.
    pub max_connections: u32,
    /// Connections open at once from one source address, per listener (`reason="per_address"`).
    /// Devices behind one NAT share an address. 0: no limit.
    pub max_connections_per_address: u32,
    /// New connections per second from one source address, per listener: a token bucket
    /// holding `new_connections_burst_per_address` (`reason="rate"`). 0: no limit.
    pub max_new_connections_per_address_per_sec: u32,
    /// Connections one source address may open at once after a quiet spell.
    pub new_connections_burst_per_address: u32,
    /// PUBLISH packets per second taken from one connection. Above it the connection is read
    /// no further until the rate allows (TCP flow control slows the client; nothing is lost
    /// or refused, on 3.1.1 and 5 alike); counted in `reads_throttled`. 0: no limit.
    pub max_messages_per_sec: u32,
    /// Bytes of packets per second taken from one connection, likewise. 0: no limit.
    pub max_bytes_per_sec: u32,
    /// QoS 1 PUBLISH packets a client may have unacknowledged (MQTT 5 Receive Maximum).
    pub receive_maximum: u16,
    /// Topic aliases a client may use (MQTT 5 Topic Alias Maximum).
    pub topic_alias_maximum: u16,
    /// QoS 1 responses sent but not yet acknowledged by a 3.1.1 client (5.0 clients state their
    /// own Receive Maximum).
    pub max_inflight_v311: u16,
    /// Pushes and subscription copies queued for one connection; a connection that lets the
    /// queue fill (it does not read) is closed rather than buffered without limit. Answers to
    /// the connection's own requests have room besides (up to `receive_maximum` of them).
    pub response_queue_capacity: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            reuse_port: false,
            max_packet_size_bytes: 1024 * 1024,
            max_connect_packet_size_bytes: 4096,
            connect_timeout_ms: 10_000,
            max_keep_alive_secs: 1200,
            max_connections: 100_000,
            max_connections_per_address: 1_000,
            max_new_connections_per_address_per_sec: 50,
            new_connections_burst_per_address: 200,
            max_messages_per_sec: 1_000,
            max_bytes_per_sec: 1024 * 1024,
            receive_maximum: 1024,
            topic_alias_maximum: 64,
            max_inflight_v311: 64,
            response_queue_capacity: 1024,
        }
    }
}

impl MqttConfig {
    /// Values out of range, as `(setting, what is wrong)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = below_minimum(&[
            // A CONNECT with a short client id and no will or credentials is about 20 bytes; 64
            // leaves room for a useful PUBLISH. Smaller limits close every connection.
            ("max_packet_size_bytes", self.max_packet_size_bytes.into(), 64),
            // As for max_packet_size_bytes; CONNECT carries credentials, so a few KiB is usual.
            ("max_connect_packet_size_bytes", self.max_connect_packet_size_bytes.into(), 64),
            ("connect_timeout_ms", self.connect_timeout_ms, 1),
            // 0 would hold an idle connection forever, the default before issue 15.
            ("max_keep_alive_secs", self.max_keep_alive_secs.into(), 1),
            ("new_connections_burst_per_address", self.new_connections_burst_per_address.into(), 1),
            // MQTT 5 §3.2.2.3.3: a Receive Maximum of 0 is a protocol error.
            ("receive_maximum", self.receive_maximum.into(), 1),
            ("max_inflight_v311", self.max_inflight_v311.into(), 1),
            ("response_queue_capacity", self.response_queue_capacity as u64, 1),
        ]);
        // The largest packet the Remaining Length can describe, with its fixed header.
        problems.extend(above_maximum(
            "max_packet_size_bytes",
            self.max_packet_size_bytes.into(),
            268_435_460,
        ));
        problems
    }

    /// The connection limits, for [`fleetgate_transport_core::net::Admission`].
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections,
            max_per_address: self.max_connections_per_address,
            new_per_address_per_sec: self.max_new_connections_per_address_per_sec,
            new_per_address_burst: self.new_connections_burst_per_address,
        }
    }
}

/// MQTT metrics: handles of the shared transport families, labelled `transport="mqtt"` (or
/// the transport that carries the sessions), `messages_too_large` and `keep_alive_timeouts`
/// among them.
#[derive(Debug, Clone)]
pub struct MqttMetrics {
    /// Connections accepted.
    pub connections_accepted: Counter,
    /// Connections open now.
    pub connections_open: Gauge,
    /// CONNECTs refused (bad credentials, unavailable auth, bad protocol version).
    pub connections_refused: Counter,
    /// PUBLISH packets received.
    pub messages_received: Counter,
    /// PUBLISH packets sent (responses and pushes).
    pub messages_sent: Counter,
    /// Connections closed for a protocol violation or malformed packet.
    pub protocol_errors: Counter,
    /// Responses not sent because they exceeded the client's Maximum Packet Size.
    pub messages_too_large: Counter,
    /// Connections closed for exceeding the keep-alive.
    pub keep_alive_timeouts: Counter,
    /// The transport's handles, for `connections_limited` by reason.
    limits: TransportCounters,
    /// Sessions closed because a new CONNECT came with their client id.
    pub sessions_taken_over: Counter,
    /// Times a connection's reads were paused by its message or byte rate limit.
    pub reads_throttled: Counter,
    /// From the read that brought a request to the gateway's acceptance.
    pub request_accept: Latency,
}

impl MqttMetrics {
    /// The MQTT handles of the shared families, and fresh counters of its own.
    pub fn new(shared: &TransportMetrics) -> Self {
        Self::labelled(shared, NAME)
    }

    /// The same, labelled `transport` for another transport that carries MQTT (`mqtts`,
    /// `mqtt_ws`, `mqtt_quic`).
    pub fn labelled(shared: &TransportMetrics, transport: &'static str) -> Self {
        let c = shared.counters(transport);
        Self {
            connections_accepted: c.connections_accepted(),
            connections_open: c.connections_open(),
            connections_refused: c.connections_refused(),
            messages_received: c.messages_received(),
            messages_sent: c.messages_sent(),
            protocol_errors: c.protocol_errors(),
            request_accept: c.request_accept(),
            messages_too_large: c.messages_too_large(),
            keep_alive_timeouts: c.keep_alive_timeouts(),
            sessions_taken_over: c.sessions_taken_over(),
            reads_throttled: c.reads_throttled(),
            limits: c,
        }
    }

    /// `fleetgate_transport_connections_limited_total` of this transport for `reason`
    /// (`total`, `per_address` or `rate`).
    pub fn connections_limited(&self, reason: &'static str) -> Counter {
        self.limits.connections_limited(reason)
    }

    /// Counts a connection refused by a limit.
    pub fn limited(&self, refusal: Refusal) {
        self.connections_limited(refusal.reason()).inc();
    }
}

/// The transport's name in metrics and logs.
const NAME: &str = "mqtt";

/// Read buffer policy: when less than `READ_MIN_SPARE` bytes are free, reserve `READ_RESERVE`
/// more. Small, so that an idle connection holds little memory; a busy one still reads many
/// packets per system call.
const READ_MIN_SPARE: usize = 256;
const READ_RESERVE: usize = 2048;

/// The MQTT transport over TCP.
pub struct MqttTransport {
    listener: Option<TcpListener>,
    shared: Arc<Shared>,
}

/// What every connection of the transport shares (one pointer in each connection's state).
struct Shared {
    /// The transport's name in metrics, logs and the credentials it presents.
    name: &'static str,
    /// Replaced by configuration reloads: each connection takes the limits current when it
    /// opens (the listener's address stays as bound).
    settings: Live<MqttConfig>,
    metrics: MqttMetrics,
    /// Set when the transport drains: connections hand the gateway no new requests.
    draining: AtomicBool,
    /// The listener's open connections, for its connection limits.
    admission: Arc<Admission>,
}

impl Shared {
    fn new(name: &'static str, config: MqttConfig, metrics: MqttMetrics) -> Arc<Self> {
        Arc::new(Self {
            name,
            settings: Live::new(config),
            metrics,
            draining: AtomicBool::new(false),
            admission: Admission::new(),
        })
    }

    /// Admits a new connection from `peer` under the current limits, or counts its refusal.
    fn admit(&self, peer: SocketAddr) -> Option<Admitted> {
        let limits = self.settings.read().connection_limits();
        match self.admission.admit(peer.ip(), &limits, std::time::Instant::now()) {
            Ok(admitted) => Some(admitted),
            Err(refusal) => {
                self.metrics.limited(refusal);
                tracing::debug!(%peer, reason = refusal.reason(), "connection refused by a limit");
                None
            }
        }
    }
}

impl MqttTransport {
    /// The transport for `config`, reporting into `metrics`; [`Transport::bind`] opens its
    /// listener.
    pub fn new(config: MqttConfig, metrics: &TransportMetrics) -> Self {
        let shared = Shared::new(NAME, config, MqttMetrics::new(metrics));
        Self { listener: None, shared }
    }

    /// Its settings, for configuration reloads: new connections get the new limits.
    pub fn settings(&self) -> Live<MqttConfig> {
        self.shared.settings.clone()
    }

    /// The transport's metrics.
    pub fn metrics(&self) -> MqttMetrics {
        self.shared.metrics.clone()
    }
}

impl Transport for MqttTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn config_section(&self) -> &'static str {
        "transports.mqtt"
    }

    fn bind(&mut self) -> Result<(), BindError> {
        let config = self.shared.settings.get();
        let listen = config.listen;
        let listener = net::bind_tcp(listen, config.reuse_port)
            .map_err(|e| BindError::listen(self.config_section(), listen, e))?;
        self.listener = Some(listener);
        Ok(())
    }

    fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listener.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    fn register_metrics(&self, _registry: &mut Registry) {
        // Every family it reports is a shared one (`TransportMetrics`).
    }

    fn serve(
        self: Box<Self>,
        handler: Arc<dyn KpHandler>,
        shutdown: Shutdown,
    ) -> BoxFuture<'static, ()> {
        Box::pin(self.accept_loop(handler, shutdown))
    }
}

impl MqttTransport {
    async fn accept_loop(self: Box<Self>, handler: Arc<dyn KpHandler>, shutdown: Shutdown) {
        let Some(listener) = self.listener else {
            tracing::error!("bug: the MQTT transport was served before it was bound");
            return;
        };
        // Each connection task holds a sender; `recv` returns None once all have ended. (A
        // JoinSet would keep an entry per connection, idle ones included.)
        let (live, mut all_ended) = mpsc::channel::<()>(1);
        let mut drain = shutdown.drain.clone();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Refused: closed at once, before anything is spent on it.
                        let Some(admitted) = self.shared.admit(peer) else {
                            net::refuse_tcp(stream);
                            continue;
                        };
                        self.shared.metrics.connections_accepted.inc();
                        let conn = Connection::new(handler.clone(), self.shared.clone(), peer, shutdown.stop.clone(), live.clone());
                        // No tracing span per connection (it would be part of every idle
                        // connection's state): events carry the peer address instead.
                        let _ = stream.set_nodelay(true);
                        let (rd, wr) = stream.into_split();
                        let fut = conn.run((TcpRead(rd), wr));
                        tokio::spawn(async move {
                            fut.await;
                            drop(admitted);
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = stopped(&mut drain) => break,
            }
        }
        // No new connections; the open ones take no new requests, finish what they took, and
        // close at the stop signal, which they see themselves.
        self.shared.draining.store(true, Ordering::Relaxed);
        drop(listener);
        drop(live);
        let _ = all_ended.recv().await;
    }
}

/// MQTT sessions over byte streams that another transport accepts (TLS, WebSocket, QUIC):
/// the same session and glue as the TCP transport, with the other transport's name in metrics,
/// logs and credentials. Cloning shares it.
#[derive(Clone)]
pub struct MqttStreams {
    shared: Arc<Shared>,
}

impl MqttStreams {
    /// Sessions configured by `config` (its `listen`, `enabled` and `reuse_port` are not read),
    /// reporting as `transport`.
    pub fn new(transport: &'static str, config: MqttConfig, metrics: &TransportMetrics) -> Self {
        let shared = Shared::new(transport, config, MqttMetrics::labelled(metrics, transport));
        Self { shared }
    }

    /// The sessions' settings, for configuration reloads (`transports.mqtt`): new connections
    /// get the new limits.
    pub fn settings(&self) -> Live<MqttConfig> {
        self.shared.settings.clone()
    }

    /// The sessions' metrics.
    pub fn metrics(&self) -> &MqttMetrics {
        &self.shared.metrics
    }

    /// Admits a connection just accepted from `peer` under the connection limits of
    /// `transports.mqtt` (this transport's own counts); `None` (counted) means close it at
    /// once, before a handshake. Hold the result until the connection ends.
    pub fn admit(&self, peer: SocketAddr) -> Option<Admitted> {
        self.shared.admit(peer)
    }

    /// From now on the sessions hand the gateway no new requests (see [`Shutdown`]).
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::Relaxed);
    }

    /// One connection, from its first byte to its end: reads from `rd`, writes to `wr` (shut
    /// down at the end), closes at `stop`. `live` is held until it ends. `certificate` is the
    /// client certificate the stream's TLS handshake verified, presented with the CONNECT.
    pub fn serve<R, W>(
        &self,
        handler: Arc<dyn KpHandler>,
        peer: SocketAddr,
        certificate: Option<ClientCertificate>,
        (rd, wr): (R, W),
        stop: watch::Receiver<bool>,
        live: mpsc::Sender<()>,
    ) -> impl Future<Output = ()> + Send + use<R, W>
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send,
    {
        self.shared.metrics.connections_accepted.inc();
        let mut conn = Connection::new(handler, self.shared.clone(), peer, stop, live);
        conn.certificate = certificate.map(Box::new);
        conn.run((StreamRead(rd), wr))
    }
}

/// The protocol part of the configuration, for each connection's [`Session`].
fn session_config(config: &MqttConfig) -> SessionConfig {
    SessionConfig {
        max_packet_size: config.max_packet_size_bytes,
        max_connect_packet_size: config.max_connect_packet_size_bytes,
        connect_timeout: Duration::from_millis(config.connect_timeout_ms),
        max_keep_alive_secs: config.max_keep_alive_secs,
        receive_maximum: config.receive_maximum,
        topic_alias_maximum: config.topic_alias_maximum,
        max_inflight_v311: config.max_inflight_v311,
        max_messages_per_sec: config.max_messages_per_sec,
        max_bytes_per_sec: config.max_bytes_per_sec,
    }
}

/// A deadline for "never": the timer still needs one.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365);

/// One connection's task: the [`Session`] and what it needs to reach the gateway. Every field
/// is part of every idle connection's memory (M4), so there are few, and no tracing span.
struct Connection {
    handler: Arc<dyn KpHandler>,
    shared: Arc<Shared>,
    peer: SocketAddr,
    /// The verified client certificate of a TLS connection (one pointer when there is none).
    certificate: Option<Box<ClientCertificate>>,
    shutdown: watch::Receiver<bool>,
    session: Session,
    /// Held until the connection ends; the listener waits for all of them at shutdown.
    _live: mpsc::Sender<()>,
}

impl Connection {
    fn new(
        handler: Arc<dyn KpHandler>,
        shared: Arc<Shared>,
        peer: SocketAddr,
        shutdown: watch::Receiver<bool>,
        live: mpsc::Sender<()>,
    ) -> Self {
        let config = session_config(&shared.settings.read());
        let session = Session::new(&config, Instant::now().into_std());
        Self { handler, shared, peer, certificate: None, shutdown, session, _live: live }
    }

    // Not an `async fn`: that would keep a second copy of `self` (its argument) in the
    // connection's state for its whole life.
    #[allow(clippy::manual_async_fn)]
    fn run<R: ReadSource, W: AsyncWrite + Unpin + Send>(
        mut self,
        (mut rd, mut wr): (R, W),
    ) -> impl Future<Output = ()> + Send {
        async move {
            self.shared.metrics.connections_open.inc();
            self.serve(&mut rd, &mut wr).await;
            // The session's last words: a DISCONNECT, a refusing CONNACK.
            if !self.session.transmit().is_empty() {
                let _ = wr.write_all(self.session.transmit()).await;
            }
            let _ = wr.shutdown().await;
            if let Some(session) = self.session.session_id() {
                takeover::ended(&self.handler, session);
                self.handler.close_session(session);
            }
            self.report_stats();
            self.shared.metrics.connections_open.dec();
        }
    }

    /// Moves bytes, events and time between the socket, the session and the gateway until the
    /// session closes or the socket does.
    async fn serve<R: ReadSource, W: AsyncWrite + Unpin + Send>(&mut self, rd: &mut R, wr: &mut W) {
        let mut outbox: Option<OutboxReceiver> = None;
        // One timer for every deadline of the session. Reads do not move it (that would touch
        // the timer wheel per packet); it moves when it fires, or when the session's next
        // deadline comes before the one it is set for.
        let timer = tokio::time::sleep_until(self.next_deadline());
        tokio::pin!(timer);
        // Pinned once: re-created per turn, it would join and leave the shutdown signal's
        // waiter list (a lock every connection shares) for every packet.
        let mut shutdown = self.shutdown.clone();
        let stop = stopped(&mut shutdown);
        tokio::pin!(stop);
        let mut output_gone = false;
        loop {
            // What the session decoded, in order, one gateway call at a time. The event is
            // taken apart in a scope that ends before the request's await: only the handler's
            // boxed future, a request id and when this turn began (a request's latency counts
            // from the read that brought it) are held across it, not the event.
            let turn = Instant::now();
            loop {
                // Draining: nothing more goes to the gateway, so nothing new is acknowledged
                // (the device sends it again elsewhere).
                if self.shared.draining.load(Ordering::Relaxed) && self.session.next_is_request() {
                    if !self.session.is_closed() {
                        break;
                    }
                    // Closed while draining: what it had not handed over is dropped,
                    // unacknowledged; its Closed event follows.
                    let _ = self.session.poll_event();
                    continue;
                }
                let (id, request) = {
                    let Some(event) = self.session.poll_event() else { break };
                    match event {
                        Event::Request { id, request } => (id, request),
                        Event::Closed(close) => return self.on_close(&close),
                        // Rare, and with more to hold across their awaits: boxed whole.
                        event => {
                            Box::pin(self.on_other_event(event, &mut outbox)).await;
                            continue;
                        }
                    }
                };
                let result = self.handler.handle(self.session_id(), request).await;
                self.shared.metrics.request_accept.observe(turn.elapsed());
                self.session.request_done(id, result);
            }
            // Then whatever responses are ready, within the client's receive window.
            if let Some(rx) = &mut outbox {
                while self.session.wants_responses() {
                    match rx.try_recv() {
                        Ok(response) => self.send_response(response),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            self.gateway_gone();
                            break;
                        }
                    }
                }
            }
            if self.session.is_closed() {
                // Its Closed event next.
                continue;
            }
            let pending = self.session.transmit().len();
            if pending > 0 {
                // A client that is gone reads nothing; what it sent is still handled.
                // Flushed: a TLS or WebSocket stream may hold what it was given (for TCP the
                // flush does nothing).
                if !output_gone
                    && (wr.write_all(self.session.transmit()).await.is_err()
                        || wr.flush().await.is_err())
                {
                    output_gone = true;
                    self.session.end_input(Instant::now().into_std());
                }
                self.session.advance_transmit(pending);
            }
            self.report_stats();
            if let Some(next) = self.session.poll_timeout().map(Instant::from_std)
                && next < timer.deadline()
            {
                timer.as_mut().reset(next);
            }
            let wants_input =
                self.session.wants_input() && !self.shared.draining.load(Ordering::Relaxed);
            let window_open = outbox.is_some() && self.session.wants_responses();
            tokio::select! {
                read = read_more(&mut self.session, rd), if wants_input => match read {
                    Ok(()) => {
                        self.session.handle_input(Instant::now().into_std());
                        if self.session.is_throttled() {
                            self.shared.metrics.reads_throttled.inc();
                        }
                    }
                    // The client closed the connection, or the socket failed: what it sent
                    // before still goes to the gateway.
                    Err(()) => self.session.end_input(Instant::now().into_std()),
                },
                response = poll_fn(|cx| match &mut outbox {
                    Some(rx) => rx.poll_recv(cx),
                    None => Poll::Pending,
                }), if window_open => match response {
                    Some(response) => self.send_response(response),
                    None => self.gateway_gone(),
                },
                () = &mut timer => {
                    self.session.handle_timeout(Instant::now().into_std());
                    timer.as_mut().reset(self.next_deadline());
                }
                () = &mut stop => {
                    // Answers already queued (acknowledgements among them) go out first.
                    if let Some(rx) = &mut outbox {
                        while let Ok(response) = rx.try_recv() {
                            let _ = self.session.send_response(response);
                        }
                    }
                    self.session.close(ReasonCode::ServerShuttingDown);
                }
            }
        }
    }

    /// When the timer should fire next.
    fn next_deadline(&self) -> Instant {
        match self.session.poll_timeout() {
            Some(deadline) => Instant::from_std(deadline),
            None => Instant::now() + FAR_FUTURE,
        }
    }

    fn session_id(&self) -> SessionId {
        self.session.session_id().unwrap_or(SessionId(0))
    }

    fn send_response(&mut self, response: KpResponse) {
        // The glue asks `wants_responses` first, so this is not expected to fail.
        if self.session.send_response(response).is_err() {
            tracing::debug!(peer = %self.peer, "bug: a response arrived outside the receive window; dropped");
        }
    }

    /// The gateway dropped the session's outbox: another connection took its client id over,
    /// or the gateway could not keep up with its responses.
    fn gateway_gone(&mut self) {
        let taken_over = self
            .session
            .session_id()
            .is_some_and(|session| takeover::was_taken_over(&self.handler, session));
        self.session.close(match taken_over {
            true => ReasonCode::SessionTakenOver,
            false => ReasonCode::ServerBusy,
        });
    }

    /// Every event but a request and the end: ask the gateway, answer the session.
    async fn on_other_event(&mut self, event: Event, outbox: &mut Option<OutboxReceiver>) {
        match event {
            Event::Connect(request) => {
                // Room for the pushes, and for the answer to every request the session takes
                // in at once (it decodes at most `receive_maximum + 1` ahead).
                let capacity = self.shared.settings.read().response_queue_capacity
                    + usize::from(self.session.receive_maximum())
                    + 1;
                let (tx, rx) = fleetgate_transport_core::outbox(capacity);
                let credentials = ClientCredentials {
                    transport: self.shared.name,
                    client_id: request.client_id(),
                    username: request.username(),
                    password: request.password(),
                    peer: self.peer,
                    certificate: self.certificate.as_deref(),
                };
                // The connect timeout covers authentication too.
                let open = self.handler.open_session(credentials, tx);
                let result = match self.session.poll_timeout() {
                    Some(deadline) => {
                        tokio::time::timeout_at(Instant::from_std(deadline), open).await.ok()
                    }
                    None => Some(open.await),
                };
                let now = Instant::now().into_std();
                let Some(result) = result else {
                    return self.session.handle_timeout(now);
                };
                let opened = match &result {
                    Ok(identity) => {
                        let v5 = self.session.version() == Some(ProtocolVersion::V5);
                        tracing::debug!(peer = %self.peer, client_id = request.client_id(), v5, "connected");
                        *outbox = Some(rx);
                        Some(identity.session)
                    }
                    Err(e) => {
                        tracing::info!(peer = %self.peer, status = e.status, reason = %e.reason, "connection refused");
                        None
                    }
                };
                self.session.connected(result, now);
                // Not expected: a session the gateway opened that this one did not take.
                if let Some(opened) = opened
                    && self.session.session_id() != Some(opened)
                {
                    self.handler.close_session(opened);
                } else if let Some(opened) = opened
                    && let Some(old) =
                        takeover::connected(&self.handler, request.client_id(), opened)
                {
                    self.shared.metrics.sessions_taken_over.inc();
                    tracing::debug!(peer = %self.peer, client_id = request.client_id(), old = old.0, "session taken over");
                }
            }
            Event::Subscribe { id, filters } => {
                let session = self.session_id();
                let mut results = Vec::with_capacity(filters.len());
                for f in &filters {
                    let result = self.handler.subscribe(session, f.as_str(), f.tag).await;
                    if let Err(e) = &result {
                        tracing::debug!(peer = %self.peer, filter = f.as_str(), status = e.status, reason = %e.reason, "subscription refused");
                    }
                    results.push(result);
                }
                self.session.subscribed(id, results);
            }
            Event::Unsubscribe { id, filters } => {
                let session = self.session_id();
                let existed: Vec<bool> = filters
                    .iter()
                    .map(|f| {
                        let filter = std::str::from_utf8(f).unwrap_or_default();
                        self.handler.unsubscribe(session, filter)
                    })
                    .collect();
                self.session.unsubscribed(id, existed);
            }
            // Handled by the caller.
            Event::Request { .. } | Event::Closed(_) => {}
        }
    }

    /// Counts and logs why the session ended.
    fn on_close(&self, close: &Close) {
        let peer = self.peer;
        match close {
            Close::Refused(reason) => {
                self.shared.metrics.connections_refused.inc();
                tracing::debug!(%peer, ?reason, "CONNECT refused");
            }
            Close::Violation(violation) => {
                self.shared.metrics.protocol_errors.inc();
                tracing::debug!(%peer, error = %violation, "closing on a protocol violation");
            }
            Close::KeepAliveTimeout => {
                self.shared.metrics.keep_alive_timeouts.inc();
                tracing::debug!(%peer, "keep-alive timeout");
            }
            close => tracing::debug!(%peer, %close, "connection closed"),
        }
    }

    /// Adds the session's counts to the metrics: once per turn of the loop, not per message.
    fn report_stats(&mut self) {
        let stats = self.session.take_stats();
        if stats == Stats::default() {
            return;
        }
        let m = &self.shared.metrics;
        m.messages_received.inc_by(u64::from(stats.messages_received));
        m.messages_sent.inc_by(u64::from(stats.messages_sent));
        m.messages_too_large.inc_by(u64::from(stats.messages_too_large));
    }
}

/// Where a connection's bytes come from: a TCP socket read the cheap way ([`TcpRead`]), or
/// any other byte stream ([`StreamRead`]).
pub trait ReadSource: Send {
    /// Reads what is available into `buf` (which may have no capacity yet); `Err` at the end
    /// of the stream or on an error.
    fn read_into<'a>(
        &'a mut self,
        buf: &'a mut BytesMut,
    ) -> impl Future<Output = Result<(), ()>> + Send + 'a;
}

/// A TCP socket's read half, read with [`read_once`].
struct TcpRead(OwnedReadHalf);

impl ReadSource for TcpRead {
    fn read_into<'a>(
        &'a mut self,
        buf: &'a mut BytesMut,
    ) -> impl Future<Output = Result<(), ()>> + Send + 'a {
        tcp_read_more(buf, &mut self.0)
    }
}

/// Any byte stream (TLS, WebSocket, a QUIC stream).
pub struct StreamRead<R>(pub R);

impl<R: AsyncRead + Unpin + Send> ReadSource for StreamRead<R> {
    async fn read_into(&mut self, buf: &mut BytesMut) -> Result<(), ()> {
        if buf.capacity() - buf.len() < READ_MIN_SPARE {
            buf.reserve(READ_RESERVE);
        }
        match self.0.read_buf(buf).await {
            Ok(0) | Err(_) => Err(()),
            Ok(_) => Ok(()),
        }
    }
}

// Not an `async fn`: that would wrap the source's future in one more state (part of every
// idle connection's memory).
fn read_more<'a, R: ReadSource>(
    session: &'a mut Session,
    rd: &'a mut R,
) -> impl Future<Output = Result<(), ()>> + Send + 'a {
    rd.read_into(session.read_buffer())
}

async fn tcp_read_more(buf: &mut BytesMut, rd: &mut OwnedReadHalf) -> Result<(), ()> {
    loop {
        // Not `readable()`: its future is ~100 bytes of every idle connection's state.
        poll_fn(|cx| rd.as_ref().poll_read_ready(cx)).await.map_err(|_| ())?;
        match read_once(buf, rd) {
            Ok(0) => return Err(()),
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(()),
        }
    }
}

/// One `recv` into the session's read buffer. Without a buffer (a new connection, or one that
/// has been idle) it reads onto the stack and keeps exactly what arrived, so that a connection
/// that sends one packet and then idles holds a few dozen bytes, not a read buffer.
///
/// A read that leaves room unfilled has drained the socket, so it also clears the socket's
/// readiness: the next read then waits for the device instead of making a second `recv` that
/// only reports "nothing more" (half the `recvfrom` calls at M1). Tokio's own `poll_read`
/// applies the same rule on epoll; its `try_read` does not. Tokio clears only if no readiness
/// event arrived since the read began, and never clears "read closed", so data or a FIN that
/// came in meanwhile still wakes the connection.
fn read_once(read: &mut BytesMut, rd: &OwnedReadHalf) -> std::io::Result<usize> {
    let mut got = 0;
    let result = rd.as_ref().try_io(tokio::io::Interest::READABLE, || {
        let (n, room) = if read.capacity() == 0 {
            let mut scratch = [0u8; READ_RESERVE];
            let n = rd.try_read(&mut scratch)?;
            read.extend_from_slice(&scratch[..n]);
            (n, scratch.len())
        } else {
            if read.capacity() - read.len() < READ_MIN_SPARE {
                read.reserve(READ_RESERVE);
            }
            let room = read.capacity() - read.len();
            (rd.try_read_buf(read)?, room)
        };
        got = n;
        if n > 0 && n < room { Err(std::io::ErrorKind::WouldBlock.into()) } else { Ok(n) }
    });
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        result => result,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::codec::{Codec, Connect, Packet};
    use fleetgate_transport_core::compliance::{self, ScriptedGateway};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    /// The connection's future is part of every idle connection's memory (M4). It was 832
    /// bytes before the protocol moved into the session; 840 since it carries the client
    /// certificate of an mTLS connection (one pointer, issue 13). It must not grow past that.
    #[tokio::test]
    async fn connection_state_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let (_stop, shutdown) = watch::channel(false);
        let (live, _all_ended) = mpsc::channel(1);
        let metrics = MqttMetrics::new(&TransportMetrics::default());
        let handler = Arc::new(ScriptedGateway::default());
        let shared = Shared::new(NAME, MqttConfig::default(), metrics);
        let conn = Connection::new(handler, shared, peer, shutdown, live);
        let (rd, wr) = stream.into_split();
        let run = conn.run((TcpRead(rd), wr));
        let size = std::mem::size_of_val(&run);
        eprintln!("connection future: {size} bytes");
        assert!(size <= 840, "the connection future grew to {size} bytes");
        drop(client);
    }

    async fn connect_v5(addr: SocketAddr, keep_alive_secs: u16) -> (TcpStream, Codec) {
        connect_as(addr, ProtocolVersion::V5, "glue", keep_alive_secs).await
    }

    async fn connect_as(
        addr: SocketAddr,
        version: ProtocolVersion,
        client_id: &'static str,
        keep_alive_secs: u16,
    ) -> (TcpStream, Codec) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut codec = Codec::new(1 << 20);
        codec.set_version(version);
        let connect = Connect {
            protocol_version: version,
            clean_start: true,
            keep_alive_secs,
            client_id: bytes::Bytes::from_static(client_id.as_bytes()),
            will: None,
            username: None,
            password: None,
            properties: Default::default(),
        };
        let mut out = BytesMut::new();
        codec.encode(&Packet::Connect(Box::new(connect)), &mut out).unwrap();
        stream.write_all(&out).await.unwrap();
        let mut client = (stream, codec);
        assert!(matches!(next(&mut client).await, Some(Packet::ConnAck(_))));
        client
    }

    /// The next packet from the server, or `None` once it closes the connection.
    async fn next((stream, codec): &mut (TcpStream, Codec)) -> Option<Packet> {
        let mut buf = BytesMut::new();
        loop {
            if let Some(p) = codec.decode(&mut buf).unwrap() {
                return Some(p);
            }
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read_buf(&mut buf));
            if read.await.unwrap().unwrap() == 0 {
                return None;
            }
        }
    }

    fn disconnect_reason(packet: Option<Packet>) -> ReasonCode {
        match packet {
            Some(Packet::Disconnect(d)) => d.reason_code,
            other => panic!("expected DISCONNECT, got {other:?}"),
        }
    }

    /// What the glue adds to the session: its timer, the shutdown signal and the metrics.
    #[tokio::test]
    async fn the_glue_drives_timeouts_shutdown_and_metrics() {
        let config = MqttConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            connect_timeout_ms: 200,
            ..MqttConfig::default()
        };
        let transport = MqttTransport::new(config, &TransportMetrics::default());
        let metrics = transport.metrics();
        let gateway = Arc::new(ScriptedGateway::default());
        let (addr, stop) = compliance::start(Box::new(transport), gateway.clone());

        // No CONNECT: closed after the connect timeout, without a word.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf));
        assert_eq!(read.await.unwrap().unwrap(), 0);

        // Keep-alive 1 s: DISCONNECT 0x8D after 1.5 s of silence, counted.
        let mut idle = connect_v5(addr, 1).await;
        assert_eq!(disconnect_reason(next(&mut idle).await), ReasonCode::KeepAliveTimeout);
        assert_eq!(metrics.keep_alive_timeouts.get(), 1);
        assert!(next(&mut idle).await.is_none());

        // Shutdown: DISCONNECT 0x8B, and the gateway's session is closed.
        let mut open = connect_v5(addr, 0).await;
        stop.stop();
        assert_eq!(disconnect_reason(next(&mut open).await), ReasonCode::ServerShuttingDown);
        assert!(next(&mut open).await.is_none());
        for _ in 0..100 {
            if gateway.closed_sessions() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(gateway.closed_sessions(), 2);
        assert_eq!(metrics.connections_open.get(), 0);
    }

    fn local_config() -> MqttConfig {
        MqttConfig { listen: "127.0.0.1:0".parse().unwrap(), ..MqttConfig::default() }
    }

    /// MQTT 3.1.1 §3.1.4 and MQTT 5 §3.1.4: a CONNECT with a client id in use closes the
    /// session that had it (MQTT 5: DISCONNECT 0x8E first); the table forgets both once they
    /// have ended.
    #[tokio::test]
    async fn a_second_connect_with_the_same_client_id_takes_the_session_over() {
        let transport = MqttTransport::new(local_config(), &TransportMetrics::default());
        let metrics = transport.metrics();
        let gateway = Arc::new(ScriptedGateway::default());
        let handler: Arc<dyn KpHandler> = gateway.clone();
        let (addr, stop) = compliance::start(Box::new(transport), gateway.clone());

        let mut first = connect_as(addr, ProtocolVersion::V5, "dev-1", 60).await;
        let mut second = connect_as(addr, ProtocolVersion::V5, "dev-1", 60).await;
        assert_eq!(disconnect_reason(next(&mut first).await), ReasonCode::SessionTakenOver);
        assert!(next(&mut first).await.is_none());
        // 3.1.1 has no DISCONNECT from the server: the old connection is closed.
        let mut third = connect_as(addr, ProtocolVersion::V311, "dev-1", 60).await;
        assert_eq!(disconnect_reason(next(&mut second).await), ReasonCode::SessionTakenOver);
        let mut fourth = connect_as(addr, ProtocolVersion::V311, "dev-1", 60).await;
        assert!(next(&mut third).await.is_none());
        assert_eq!(metrics.sessions_taken_over.get(), 3);
        // Another client id is left alone.
        let mut other = connect_as(addr, ProtocolVersion::V311, "dev-2", 60).await;
        let ping = |c: &mut (TcpStream, Codec)| {
            let mut out = BytesMut::new();
            c.1.encode(&Packet::PingReq, &mut out).unwrap();
            out
        };
        for c in [&mut fourth, &mut other] {
            let out = ping(c);
            c.0.write_all(&out).await.unwrap();
            assert!(matches!(next(c).await, Some(Packet::PingResp)));
        }
        drop((fourth, other));
        for _ in 0..200 {
            if metrics.connections_open.get() == 0 && takeover::entries(&handler) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(takeover::entries(&handler), 0, "the table keeps nothing of ended sessions");
        stop.stop();
    }

    /// Connections over a limit are closed at once, before a byte is read, and counted by
    /// reason; closing one makes room; a reload applies to the next connection.
    #[tokio::test]
    async fn connections_over_a_limit_are_closed_at_once_and_counted() {
        let config = MqttConfig { max_connections_per_address: 2, ..local_config() };
        let transport = MqttTransport::new(config.clone(), &TransportMetrics::default());
        let metrics = transport.metrics();
        let settings = transport.settings();
        let gateway = Arc::new(ScriptedGateway::default());
        let (addr, stop) = compliance::start(Box::new(transport), gateway);
        let limited = |reason| metrics.connections_limited(reason).get();

        let a = connect_as(addr, ProtocolVersion::V311, "a", 60).await;
        let _b = connect_as(addr, ProtocolVersion::V311, "b", 60).await;
        let mut refused = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(5), refused.read(&mut buf));
        assert_eq!(read.await.unwrap().unwrap_or(0), 0, "closed without a word");
        assert_eq!(limited("per_address"), 1);

        drop(a);
        let mut room = None;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if metrics.connections_open.get() == 1 {
                room = Some(connect_as(addr, ProtocolVersion::V311, "c", 60).await);
                break;
            }
        }
        assert!(room.is_some(), "a closed connection makes room");

        settings.set(MqttConfig { max_connections_per_address: 3, ..config });
        let _d = connect_as(addr, ProtocolVersion::V311, "d", 60).await;
        assert_eq!(limited("per_address"), 1);
        stop.stop();
    }

    /// The takeover holds across the MQTT transports of one gateway: a session over another
    /// byte stream (TLS, WebSocket and QUIC serve theirs through `MqttStreams`) takes over the
    /// TCP one with its client id, and the other way round.
    #[tokio::test]
    async fn takeover_holds_across_transports() {
        let transport = MqttTransport::new(local_config(), &TransportMetrics::default());
        let gateway = Arc::new(ScriptedGateway::default());
        let handler: Arc<dyn KpHandler> = gateway.clone();
        let (addr, stop) = compliance::start(Box::new(transport), gateway);
        let streams = MqttStreams::new("mqtts", local_config(), &TransportMetrics::default());

        let mut tcp = connect_as(addr, ProtocolVersion::V5, "roaming", 60).await;
        // The same client id over an in-memory stream served by the other transport's glue.
        let (client, server) = tokio::io::duplex(4096);
        let (_stop_tx, stop_rx) = watch::channel(false);
        let (live, _ended) = mpsc::channel(1);
        let peer: SocketAddr = "127.0.0.9:1".parse().unwrap();
        let (rd, wr) = tokio::io::split(server);
        tokio::spawn(streams.serve(handler.clone(), peer, None, (rd, wr), stop_rx, live));
        let (mut crd, mut cwr) = tokio::io::split(client);
        let mut codec = Codec::new(1 << 20);
        codec.set_version(ProtocolVersion::V5);
        let connect = Connect {
            protocol_version: ProtocolVersion::V5,
            clean_start: true,
            keep_alive_secs: 60,
            client_id: bytes::Bytes::from_static(b"roaming"),
            will: None,
            username: None,
            password: None,
            properties: Default::default(),
        };
        let mut out = BytesMut::new();
        codec.encode(&Packet::Connect(Box::new(connect)), &mut out).unwrap();
        cwr.write_all(&out).await.unwrap();
        let mut buf = BytesMut::new();
        let mut next_other = async || loop {
            if let Some(p) = codec.decode(&mut buf).unwrap() {
                return Some(p);
            }
            let read = tokio::time::timeout(Duration::from_secs(5), crd.read_buf(&mut buf));
            if read.await.unwrap().unwrap() == 0 {
                return None;
            }
        };
        assert!(matches!(next_other().await, Some(Packet::ConnAck(_))));
        assert_eq!(disconnect_reason(next(&mut tcp).await), ReasonCode::SessionTakenOver);
        assert_eq!(streams.metrics().sessions_taken_over.get(), 1);

        // And back: TCP takes it over from the other one.
        let _tcp_again = connect_as(addr, ProtocolVersion::V5, "roaming", 60).await;
        assert_eq!(disconnect_reason(next_other().await), ReasonCode::SessionTakenOver);
        stop.stop();
    }
}
