//! The tokio glue: a TCP listener and one task per MQTT connection, feeding 1/KP requests to a
//! [`KpHandler`] and writing its responses and pushes back as PUBLISH packets.
//!
//! fleetgate is not a broker (DESIGN decision 2): responses and pushes for a connection's
//! endpoints are written to that connection whether or not it subscribed. A client may also
//! subscribe to filters that name an endpoint token (`kp1/<appver>/<ext>/<token>/...`) to get
//! copies of that endpoint's responses and pushes, e.g. a `mosquitto_sub` beside a
//! `mosquitto_pub`; filters that do not name a token are refused. QoS 2 is refused (MQTT 5: DISCONNECT
//! 0x9B after CONNACK advertised Maximum QoS 1; 3.1.1, which has no way to refuse: the
//! connection is closed). Retained messages and wills are not supported.

use fleetgate_transport_core::stopped;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleetgate_transport_core::metrics::{
    Counter, Gauge, Registry, TransportMetrics, transport_registry,
};
use fleetgate_transport_core::{
    BindError, BoxFuture, ClientCredentials, KpError, KpHandler, KpOutcome, KpRequest, KpResponse,
    KpTopic, OutboxReceiver, SessionId, Transport, TryRecvError, net,
};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::codec::{
    AckProperties, Codec, ConnAck, ConnAckProperties, Connect, DecodeError, Disconnect,
    DisconnectProperties, Packet, ProtocolVersion, PubAck, Publish, PublishHeader, QoS, ReasonCode,
    SubAck, Subscribe, UnsubAck, Unsubscribe,
};

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
    /// Time a new connection has to send CONNECT.
    pub connect_timeout_ms: u64,
    /// Longest keep-alive granted; a client asking for more (or for none) gets this (MQTT 5
    /// Server Keep Alive). 0: whatever the client asks.
    pub max_keep_alive_secs: u16,
    /// QoS 1 PUBLISH packets a client may have unacknowledged (MQTT 5 Receive Maximum).
    pub receive_maximum: u16,
    /// Topic aliases a client may use (MQTT 5 Topic Alias Maximum).
    pub topic_alias_maximum: u16,
    /// QoS 1 responses sent but not yet acknowledged by a 3.1.1 client (5.0 clients state their
    /// own Receive Maximum).
    pub max_inflight_v311: u16,
    /// Responses and pushes queued for one connection; a connection that lets the queue fill
    /// (it does not read) is closed rather than buffered without limit.
    pub response_queue_capacity: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            reuse_port: false,
            max_packet_size_bytes: 1024 * 1024,
            connect_timeout_ms: 10_000,
            max_keep_alive_secs: 0,
            receive_maximum: 1024,
            topic_alias_maximum: 64,
            max_inflight_v311: 64,
            response_queue_capacity: 1024,
        }
    }
}

/// MQTT metrics: the shared transport families, labelled `transport="mqtt"`, and two of its own.
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
}

impl MqttMetrics {
    /// The MQTT handles of the shared families, and fresh counters of its own.
    pub fn new(shared: &TransportMetrics) -> Self {
        let c = shared.counters(NAME);
        Self {
            connections_accepted: c.connections_accepted(),
            connections_open: c.connections_open(),
            connections_refused: c.connections_refused(),
            messages_received: c.messages_received(),
            messages_sent: c.messages_sent(),
            protocol_errors: c.protocol_errors(),
            messages_too_large: Counter::default(),
            keep_alive_timeouts: Counter::default(),
        }
    }

    fn register(&self, registry: &mut Registry) {
        let r = transport_registry(registry, NAME);
        r.register(
            "messages_too_large",
            "Responses over the client's maximum packet size, not sent",
            self.messages_too_large.clone(),
        );
        r.register(
            "keep_alive_timeouts",
            "Connections closed for keep-alive timeout",
            self.keep_alive_timeouts.clone(),
        );
    }
}

/// The transport's name in metrics and logs.
const NAME: &str = "mqtt";

/// Read buffer policy: when less than `READ_MIN_SPARE` bytes are free, reserve `READ_RESERVE`
/// more. Small, so that an idle connection holds little memory; a busy one still reads many
/// packets per system call.
const READ_MIN_SPARE: usize = 256;
const READ_RESERVE: usize = 2048;

/// A connection that has read nothing for this long gives its (empty) buffers back: idle
/// connections, the bulk of a large fleet, then hold no buffer memory at all.
const IDLE_RELEASE: Duration = Duration::from_secs(2);

/// The MQTT transport over TCP.
pub struct MqttTransport {
    config: Arc<MqttConfig>,
    listener: Option<TcpListener>,
    metrics: Arc<MqttMetrics>,
}

impl MqttTransport {
    /// The transport for `config`, reporting into `metrics`; [`Transport::bind`] opens its
    /// listener.
    pub fn new(config: MqttConfig, metrics: &TransportMetrics) -> Self {
        Self {
            config: Arc::new(config),
            listener: None,
            metrics: Arc::new(MqttMetrics::new(metrics)),
        }
    }

    /// The transport's metrics.
    pub fn metrics(&self) -> Arc<MqttMetrics> {
        self.metrics.clone()
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
        let listen = self.config.listen;
        let listener = net::bind_tcp(listen, self.config.reuse_port)
            .map_err(|e| BindError::listen(self.config_section(), listen, e))?;
        self.listener = Some(listener);
        Ok(())
    }

    fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listener.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    fn register_metrics(&self, registry: &mut Registry) {
        self.metrics.register(registry);
    }

    fn serve(
        self: Box<Self>,
        handler: Arc<dyn KpHandler>,
        shutdown: watch::Receiver<bool>,
    ) -> BoxFuture<'static, ()> {
        Box::pin(self.accept_loop(handler, shutdown))
    }
}

impl MqttTransport {
    async fn accept_loop(
        self: Box<Self>,
        handler: Arc<dyn KpHandler>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let Some(listener) = self.listener else {
            tracing::error!("bug: the MQTT transport was served before it was bound");
            return;
        };
        // Each connection task holds a sender; `recv` returns None once all have ended. (A
        // JoinSet would keep an entry per connection, idle ones included.)
        let (live, mut all_ended) = mpsc::channel::<()>(1);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        self.metrics.connections_accepted.inc();
                        let conn = Connection::new(handler.clone(), self.config.clone(), self.metrics.clone(), peer, shutdown.clone(), live.clone());
                        // No tracing span per connection (it would be part of every idle
                        // connection's state): events carry the peer address instead.
                        let _ = stream.set_nodelay(true);
                        let fut = conn.run(stream.into_split());
                        tokio::spawn(fut);
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = stopped(&mut shutdown) => break,
            }
        }
        // Connections see the same shutdown signal and close themselves.
        drop(live);
        let _ = all_ended.recv().await;
    }
}

/// What a packet leaves for the handler.
enum Forward {
    /// A 1/KP request, and the packet id to acknowledge once the bus has it.
    Publish {
        request: KpRequest,
        packet_id: Option<u16>,
    },
    Subscribe(Subscribe),
}

/// Why a connection ends.
enum Close {
    /// The client disconnected or the socket failed: nothing more to send.
    Quietly,
    /// Send DISCONNECT with this reason (MQTT 5 only), then close.
    Disconnect(ReasonCode),
}

/// How responses to a request are published: the tag a request carries is `1 + its QoS`;
/// pushes (tag 0) go at QoS 1.
fn response_qos(tag: u64) -> QoS {
    if tag == 1 { QoS::AtMostOnce } else { QoS::AtLeastOnce }
}

struct Connection {
    handler: Arc<dyn KpHandler>,
    config: Arc<MqttConfig>,
    metrics: Arc<MqttMetrics>,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
    codec: Codec,
    read: BytesMut,
    write: BytesMut,
    session: Option<SessionId>,
    /// Topic aliases the client has set (MQTT 5), index = alias - 1.
    aliases: Vec<Option<Bytes>>,
    /// Our QoS 1 PUBLISH packets not yet acknowledged, and how many may be.
    inflight: u16,
    max_inflight: u16,
    next_packet_id: u16,
    /// Held until the connection ends; the listener waits for all of them at shutdown.
    _live: mpsc::Sender<()>,
}

impl Connection {
    fn new(
        handler: Arc<dyn KpHandler>,
        config: Arc<MqttConfig>,
        metrics: Arc<MqttMetrics>,
        peer: SocketAddr,
        shutdown: watch::Receiver<bool>,
        live: mpsc::Sender<()>,
    ) -> Self {
        let codec = Codec::new(config.max_packet_size_bytes);
        Self {
            handler,
            config,
            metrics,
            peer,
            shutdown,
            codec,
            // Small to start: most connections are idle most of the time (M4); buffers grow
            // with traffic.
            read: BytesMut::new(),
            write: BytesMut::new(),
            session: None,
            aliases: Vec::new(),
            inflight: 0,
            max_inflight: 0,
            next_packet_id: 0,
            _live: live,
        }
    }

    fn is_v5(&self) -> bool {
        self.codec.version() == Some(ProtocolVersion::V5)
    }

    // Not an `async fn`: that would keep a second copy of `self` (its argument) in the
    // connection's state for its whole life.
    #[allow(clippy::manual_async_fn)]
    fn run(
        mut self,
        (mut rd, mut wr): (OwnedReadHalf, OwnedWriteHalf),
    ) -> impl Future<Output = ()> + Send {
        async move {
            self.metrics.connections_open.inc();
            let connect_timeout = Duration::from_millis(self.config.connect_timeout_ms);
            // Boxed, like every call into the handler below: those futures (authentication with
            // its timer, token validation, a bus publish) would otherwise sit inline in the
            // connection's state for its whole life, idle connections included (M4). Freed once
            // CONNECT is done.
            let connected =
                Box::pin(tokio::time::timeout(connect_timeout, self.accept_connect(&mut rd))).await;
            let outcome = match connected {
                Ok(Ok((outbox, keep_alive))) => {
                    let _ = wr.write_all(&self.write).await;
                    self.write.clear();
                    // Most devices idle after CONNECT: hold no buffers until they send again.
                    self.release_idle_buffers();
                    self.serve(&mut rd, &mut wr, outbox, keep_alive).await
                }
                Ok(Err(close)) => close,
                Err(_) => {
                    tracing::debug!(peer = %self.peer, "no CONNECT in time");
                    Close::Quietly
                }
            };
            if let Close::Disconnect(reason) = outcome
                && self.is_v5()
            {
                let packet = Packet::Disconnect(Disconnect {
                    reason_code: reason,
                    properties: DisconnectProperties::default(),
                });
                let _ = self.codec.encode(&packet, &mut self.write);
            }
            if !self.write.is_empty() {
                let _ = wr.write_all(&self.write).await;
            }
            let _ = wr.shutdown().await;
            if let Some(session) = self.session {
                self.handler.close_session(session);
            }
            self.metrics.connections_open.dec();
        }
    }

    async fn read_more(&mut self, rd: &mut OwnedReadHalf) -> Result<(), Close> {
        loop {
            // Not `readable()`: its future is ~100 bytes of every idle connection's state.
            std::future::poll_fn(|cx| rd.as_ref().poll_read_ready(cx))
                .await
                .map_err(|_| Close::Quietly)?;
            match self.read_once(rd) {
                Ok(0) => return Err(Close::Quietly),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(Close::Quietly),
            }
        }
    }

    /// One `recv` into the read buffer. Without a buffer (a new connection, or one that has
    /// been idle) it reads onto the stack and keeps exactly what arrived, so that a connection
    /// that sends one packet and then idles holds a few dozen bytes, not a read buffer.
    ///
    /// A read that leaves room unfilled has drained the socket, so it also clears the socket's
    /// readiness: the next read then waits for the device instead of making a second `recv`
    /// that only reports "nothing more" (half the `recvfrom` calls at M1). Tokio's own
    /// `poll_read` applies the same rule on epoll; its `try_read` does not. Tokio clears only if
    /// no readiness event arrived since the read began, and never clears "read closed", so data
    /// or a FIN that came in meanwhile still wakes the connection.
    fn read_once(&mut self, rd: &OwnedReadHalf) -> std::io::Result<usize> {
        let mut got = 0;
        let read = rd.as_ref().try_io(tokio::io::Interest::READABLE, || {
            let (n, room) = if self.read.capacity() == 0 {
                let mut scratch = [0u8; READ_RESERVE];
                let n = rd.try_read(&mut scratch)?;
                self.read.extend_from_slice(&scratch[..n]);
                (n, scratch.len())
            } else {
                if self.read.capacity() - self.read.len() < READ_MIN_SPARE {
                    self.read.reserve(READ_RESERVE);
                }
                let room = self.read.capacity() - self.read.len();
                (rd.try_read_buf(&mut self.read)?, room)
            };
            got = n;
            if n > 0 && n < room { Err(std::io::ErrorKind::WouldBlock.into()) } else { Ok(n) }
        });
        match read {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && got > 0 => Ok(got),
            read => read,
        }
    }

    fn decode_error(&mut self, e: &DecodeError) -> Close {
        self.metrics.protocol_errors.inc();
        tracing::debug!(peer = %self.peer, error = %e, "closing on a bad packet");
        Close::Disconnect(e.reason_code())
    }

    /// Reads CONNECT, authenticates, and queues CONNACK. Returns the outbox receiver and the
    /// keep-alive to enforce.
    async fn accept_connect(
        &mut self,
        rd: &mut OwnedReadHalf,
    ) -> Result<(OutboxReceiver, Option<Duration>), Close> {
        let connect = loop {
            match self.codec.decode(&mut self.read) {
                Ok(Some(Packet::Connect(c))) => break c,
                Ok(Some(_)) => return Err(Close::Quietly),
                Ok(None) => self.read_more(rd).await?,
                Err(DecodeError::UnsupportedProtocolVersion(level)) => {
                    // 3.1.1 §3.1.2.2: answer return code 1 in a 3.1.1 CONNACK, then close.
                    tracing::debug!(peer = %self.peer, level, "unsupported MQTT protocol level");
                    self.metrics.connections_refused.inc();
                    self.write.extend_from_slice(&[0x20, 0x02, 0x00, 0x01]);
                    return Err(Close::Quietly);
                }
                Err(e) => {
                    let close = self.decode_error(&e);
                    return Err(if self.is_v5() { close } else { Close::Quietly });
                }
            }
        };
        self.open_session(*connect).await
    }

    async fn open_session(
        &mut self,
        connect: Connect,
    ) -> Result<(OutboxReceiver, Option<Duration>), Close> {
        let v5 = self.is_v5();
        let props = &connect.properties;
        if props.authentication_method.is_some() {
            return Err(self.refuse(ReasonCode::BadAuthenticationMethod));
        }
        let client_id = std::str::from_utf8(&connect.client_id).unwrap_or_default().to_owned();
        if client_id.is_empty() && !connect.clean_start && !v5 {
            // 3.1.1 §3.1.3.1: a zero-length id needs CleanSession = 1.
            return Err(self.refuse(ReasonCode::ClientIdentifierNotValid));
        }
        let username = connect.username.as_deref().and_then(|u| std::str::from_utf8(u).ok());
        let (tx, rx) = fleetgate_transport_core::outbox(self.config.response_queue_capacity);
        let credentials = ClientCredentials {
            transport: "mqtt",
            client_id: &client_id,
            username,
            password: connect.password.as_deref(),
            peer: self.peer,
        };
        let identity = match self.handler.open_session(credentials, tx).await {
            Ok(identity) => identity,
            Err(e) => {
                tracing::info!(peer = %self.peer, status = e.status, reason = %e.reason, "connection refused");
                let reason = match e.status {
                    401 => ReasonCode::BadUserNameOrPassword,
                    403 => ReasonCode::NotAuthorized,
                    _ => ReasonCode::ServerUnavailable,
                };
                return Err(self.refuse(reason));
            }
        };
        self.session = Some(identity.session);
        if connect.will.is_some() {
            tracing::debug!(peer = %self.peer, "will message ignored: fleetgate does not publish wills");
        }
        self.max_inflight = if v5 {
            props.receive_maximum.unwrap_or(u16::MAX)
        } else {
            self.config.max_inflight_v311
        }
        .max(1);
        if let Some(max) = props.maximum_packet_size {
            self.codec.set_max_outbound_packet_size(max);
        }
        let max_ka = self.config.max_keep_alive_secs;
        let asked = connect.keep_alive_secs;
        let granted =
            if max_ka > 0 && v5 && (asked == 0 || asked > max_ka) { max_ka } else { asked };
        let keep_alive = (granted > 0).then(|| Duration::from_millis(u64::from(granted) * 1500));
        let mut properties = ConnAckProperties::default();
        if v5 {
            properties.receive_maximum = Some(self.config.receive_maximum.max(1));
            properties.maximum_qos = Some(QoS::AtLeastOnce);
            properties.retain_available = Some(false);
            properties.maximum_packet_size = Some(self.config.max_packet_size_bytes);
            properties.topic_alias_maximum = Some(self.config.topic_alias_maximum);
            properties.wildcard_subscription_available = Some(true);
            properties.subscription_identifiers_available = Some(false);
            properties.shared_subscription_available = Some(false);
            if props.session_expiry_interval.is_some_and(|s| s > 0) {
                properties.session_expiry_interval = Some(0);
            }
            if granted != asked {
                properties.server_keep_alive = Some(granted);
            }
            if client_id.is_empty() {
                let assigned = format!("fleetgate-{}", identity.session.0);
                properties.assigned_client_identifier = Some(Bytes::from(assigned));
            }
        }
        let connack =
            ConnAck { session_present: false, reason_code: ReasonCode::Success, properties };
        self.encode(&Packet::ConnAck(Box::new(connack)));
        tracing::debug!(peer = %self.peer, client_id, v5, "connected");
        Ok((rx, keep_alive))
    }

    /// Queues a refusing CONNACK.
    fn refuse(&mut self, reason: ReasonCode) -> Close {
        self.metrics.connections_refused.inc();
        let connack = ConnAck {
            session_present: false,
            reason_code: reason,
            properties: ConnAckProperties::default(),
        };
        self.encode(&Packet::ConnAck(Box::new(connack)));
        Close::Quietly
    }

    fn encode(&mut self, packet: &Packet) {
        if let Err(e) = self.codec.encode(packet, &mut self.write) {
            tracing::warn!(peer = %self.peer, error = %e, "cannot encode a packet");
        }
    }

    async fn serve(
        &mut self,
        rd: &mut OwnedReadHalf,
        wr: &mut OwnedWriteHalf,
        mut outbox: OutboxReceiver,
        keep_alive: Option<Duration>,
    ) -> Close {
        // One timer for the keep-alive and for giving idle buffers back. Reads do not move it
        // (that would touch the timer wheel per packet); when it fires, it checks the time of
        // the last read and sets itself again.
        let mut last_read = Instant::now();
        let timer = tokio::time::sleep_until(self.next_check(last_read, keep_alive));
        tokio::pin!(timer);
        // Pinned once: re-created per turn, it would join and leave the shutdown signal's
        // waiter list (a lock every connection shares) for every packet.
        let mut shutdown = self.shutdown.clone();
        let stop = stopped(&mut shutdown);
        tokio::pin!(stop);
        loop {
            // Packets already buffered (several can arrive in one read) are handled first.
            loop {
                // No temporaries live across the await below: they would be part of the
                // connection's state for its whole life.
                let forward = match self.codec.decode(&mut self.read) {
                    Ok(Some(packet)) => match self.on_packet(packet) {
                        Ok(forward) => forward,
                        Err(close) => return close,
                    },
                    Ok(None) => break,
                    Err(e) => return self.decode_error(&e),
                };
                if let Some(forward) = forward {
                    // Boxed with the handler's future inside: one short-lived allocation per
                    // request rather than its size in every connection's state.
                    Box::pin(self.forward(forward)).await;
                }
            }
            // Then whatever responses are ready, within the client's receive window.
            while self.inflight < self.max_inflight {
                match outbox.try_recv() {
                    Ok(response) => self.on_response(response),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        return Close::Disconnect(ReasonCode::ServerBusy);
                    }
                }
            }
            if !self.write.is_empty() {
                if wr.write_all(&self.write).await.is_err() {
                    return Close::Quietly;
                }
                self.write.clear();
            }
            let window_open = self.inflight < self.max_inflight;
            tokio::select! {
                read = self.read_more(rd) => {
                    if let Err(close) = read {
                        return close;
                    }
                    last_read = Instant::now();
                }
                response = outbox.recv(), if window_open => match response {
                    Some(response) => self.on_response(response),
                    // The gateway dropped the session: it could not keep up with its responses.
                    None => return Close::Disconnect(ReasonCode::ServerBusy),
                },
                () = &mut timer => {
                    let now = Instant::now();
                    if keep_alive.is_some_and(|idle| now >= last_read + idle) {
                        self.metrics.keep_alive_timeouts.inc();
                        tracing::debug!(peer = %self.peer, "keep-alive timeout");
                        return Close::Disconnect(ReasonCode::KeepAliveTimeout);
                    }
                    if now >= last_read + IDLE_RELEASE {
                        self.release_idle_buffers();
                    }
                    timer.as_mut().reset(self.next_check(last_read, keep_alive));
                }
                () = &mut stop => return Close::Disconnect(ReasonCode::ServerShuttingDown),
            }
        }
    }

    /// When the serve loop's timer should next fire: the keep-alive deadline, or earlier the
    /// moment to give idle buffers back while the connection holds any.
    fn next_check(&self, last_read: Instant, keep_alive: Option<Duration>) -> Instant {
        let holds_buffers = self.read.capacity() > 0 || self.write.capacity() > 0;
        let release = holds_buffers.then(|| last_read + IDLE_RELEASE);
        let expire = keep_alive.map(|idle| last_read + idle);
        match (release, expire) {
            (Some(a), Some(b)) => a.min(b),
            (Some(t), None) | (None, Some(t)) => t,
            (None, None) => last_read + Duration::from_secs(86_400 * 365),
        }
    }

    /// Drops the read and write buffers when they hold nothing (a partial packet stays).
    fn release_idle_buffers(&mut self) {
        if self.read.is_empty() {
            self.read = BytesMut::new();
        }
        if self.write.is_empty() {
            self.write = BytesMut::new();
        }
    }

    /// Handles a packet that needs no waiting; a PUBLISH that is a 1/KP request comes back to
    /// be forwarded. Synchronous, and the only await per request is the handler's (boxed)
    /// future in [`Connection::forward`]: what an idle connection's task holds stays small.
    fn on_packet(&mut self, packet: Packet) -> Result<Option<Forward>, Close> {
        match packet {
            Packet::Publish(publish) => self.on_publish(publish),
            Packet::PubAck(_) => {
                self.inflight = self.inflight.saturating_sub(1);
                Ok(None)
            }
            Packet::Subscribe(subscribe) => Ok(Some(Forward::Subscribe(subscribe))),
            Packet::Unsubscribe(unsubscribe) => {
                self.on_unsubscribe(unsubscribe);
                Ok(None)
            }
            Packet::PingReq => {
                self.encode(&Packet::PingResp);
                Ok(None)
            }
            Packet::Disconnect(_) => Err(Close::Quietly),
            Packet::Auth(_) => Err(Close::Disconnect(ReasonCode::BadAuthenticationMethod)),
            // QoS 2 flows, or packets only a server sends.
            other => {
                self.metrics.protocol_errors.inc();
                tracing::debug!(peer = %self.peer, packet = ?std::mem::discriminant(&other), "unexpected packet");
                Err(Close::Disconnect(ReasonCode::ProtocolError))
            }
        }
    }

    fn on_publish(&mut self, publish: Publish) -> Result<Option<Forward>, Close> {
        self.metrics.messages_received.inc();
        if publish.qos == QoS::ExactlyOnce {
            tracing::debug!(peer = %self.peer, "QoS 2 refused");
            self.metrics.protocol_errors.inc();
            return Err(Close::Disconnect(ReasonCode::QoSNotSupported));
        }
        let v5 = self.is_v5();
        if v5 && publish.retain {
            return Err(Close::Disconnect(ReasonCode::RetainNotSupported));
        }
        let topic = self.resolve_alias(&publish)?;
        let tag = 1 + publish.qos as u64;
        match KpTopic::parse(topic.clone()) {
            Ok(topic) => {
                let request =
                    KpRequest { topic, payload: publish.payload, tag, wants_answer: false };
                return Ok(Some(Forward::Publish { request, packet_id: publish.packet_id }));
            }
            Err(e) => {
                // Not a 1/KP path: answer on `<topic>/error` all the same.
                let response = KpResponse {
                    base: topic,
                    request_id: None,
                    tag,
                    outcome: KpOutcome::Error(KpError::not_found(e.to_string())),
                };
                self.on_response(response);
            }
        }
        self.acknowledge(publish.packet_id);
        Ok(None)
    }

    /// Hands a request to the handler and waits until the bus has it (or refused it).
    async fn forward(&mut self, forward: Forward) {
        match forward {
            Forward::Publish { request, packet_id } => {
                let (base, request_id, tag) =
                    (request.topic.base(), request.topic.request_id(), request.tag);
                if let Err(e) = self.handler.handle(self.session_id(), request).await {
                    let outcome = KpOutcome::Error(e);
                    self.on_response(KpResponse { base, request_id, tag, outcome });
                }
                self.acknowledge(packet_id);
            }
            Forward::Subscribe(subscribe) => Box::pin(self.on_subscribe(subscribe)).await,
        }
    }

    /// PUBACK for a QoS 1 PUBLISH.
    fn acknowledge(&mut self, packet_id: Option<u16>) {
        if let Some(packet_id) = packet_id {
            let ack = PubAck {
                packet_id,
                reason_code: ReasonCode::Success,
                properties: AckProperties::default(),
            };
            self.encode(&Packet::PubAck(ack));
        }
    }

    fn session_id(&self) -> SessionId {
        self.session.unwrap_or(SessionId(0))
    }

    /// MQTT 5 topic aliases: a PUBLISH with a topic and an alias sets it; one with an empty
    /// topic and an alias uses it.
    fn resolve_alias(&mut self, publish: &Publish) -> Result<Bytes, Close> {
        let Some(alias) = publish.properties.topic_alias else {
            if publish.topic.is_empty() {
                return Err(Close::Disconnect(ReasonCode::ProtocolError));
            }
            return Ok(publish.topic.clone());
        };
        let index =
            usize::from(alias).checked_sub(1).filter(|_| alias <= self.config.topic_alias_maximum);
        let Some(index) = index else {
            self.metrics.protocol_errors.inc();
            return Err(Close::Disconnect(ReasonCode::TopicAliasInvalid));
        };
        // The table grows to the highest alias the client uses, not to the maximum up front.
        if self.aliases.len() <= index {
            self.aliases.resize(index + 1, None);
        }
        let slot = &mut self.aliases[index];
        if publish.topic.is_empty() {
            slot.clone().ok_or(Close::Disconnect(ReasonCode::ProtocolError))
        } else {
            *slot = Some(publish.topic.clone());
            Ok(publish.topic.clone())
        }
    }

    /// Subscriptions are granted at most QoS 1 and only for filters that name one endpoint
    /// token the client knows (the gateway decides); responses to the client's own requests
    /// need no subscription.
    async fn on_subscribe(&mut self, subscribe: Subscribe) {
        let mut reason_codes = Vec::with_capacity(subscribe.subscriptions.len());
        for s in &subscribe.subscriptions {
            let granted = s.options.qos.min(QoS::AtLeastOnce);
            let filter = std::str::from_utf8(&s.filter).unwrap_or_default();
            let tag = 1 + granted as u64;
            let code = match self.handler.subscribe(self.session_id(), filter, tag).await {
                Ok(()) if granted == QoS::AtMostOnce => ReasonCode::Success,
                Ok(()) => ReasonCode::GrantedQoS1,
                Err(e) => {
                    tracing::debug!(peer = %self.peer, filter, status = e.status, reason = %e.reason, "subscription refused");
                    match e.status {
                        401 | 403 => ReasonCode::NotAuthorized,
                        404 => ReasonCode::TopicFilterInvalid,
                        _ => ReasonCode::UnspecifiedError,
                    }
                }
            };
            reason_codes.push(code);
        }
        let ack = SubAck {
            packet_id: subscribe.packet_id,
            reason_codes,
            properties: AckProperties::default(),
        };
        self.encode(&Packet::SubAck(ack));
    }

    fn on_unsubscribe(&mut self, unsubscribe: Unsubscribe) {
        let session = self.session_id();
        let reason_codes = unsubscribe
            .filters
            .iter()
            .map(|f| {
                let filter = std::str::from_utf8(f).unwrap_or_default();
                if self.handler.unsubscribe(session, filter) {
                    ReasonCode::Success
                } else {
                    ReasonCode::NoSubscriptionExisted
                }
            })
            .collect();
        let ack = UnsubAck {
            packet_id: unsubscribe.packet_id,
            reason_codes,
            properties: AckProperties::default(),
        };
        self.encode(&Packet::UnsubAck(ack));
    }

    /// Writes a response or push as PUBLISH to `<base>[/<request id>]/status|error`.
    fn on_response(&mut self, response: KpResponse) {
        let qos = response_qos(response.tag);
        let packet_id = (qos == QoS::AtLeastOnce).then(|| {
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            self.next_packet_id
        });
        let error_body;
        let (suffix, payload): (&[u8], &[u8]) = match &response.outcome {
            KpOutcome::Success(payload) => (b"/status", payload),
            KpOutcome::Error(e) => {
                error_body = e.body();
                (b"/error", &error_body)
            }
        };
        let mut digits = [0u8; 11];
        let id: &[u8] = match response.request_id {
            Some(id) => format_request_id(id, &mut digits),
            None => b"",
        };
        let parts: [&[u8]; 3] = [&response.base, id, suffix];
        let header = PublishHeader { dup: false, qos, retain: false, packet_id };
        match self.codec.encode_publish_parts(header, &parts, None, payload, &mut self.write) {
            Ok(()) => {
                self.metrics.messages_sent.inc();
                if packet_id.is_some() {
                    self.inflight += 1;
                }
            }
            Err(e) => {
                self.metrics.messages_too_large.inc();
                tracing::warn!(peer = %self.peer, error = %e, "response not sent");
            }
        }
    }
}

/// `/<id>` in decimal, written into `buf`.
fn format_request_id(id: u32, buf: &mut [u8; 11]) -> &[u8] {
    let mut i = buf.len();
    let mut n = id;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    i -= 1;
    buf[i] = b'/';
    &buf[i..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_format() {
        let mut buf = [0u8; 11];
        assert_eq!(format_request_id(42, &mut buf), b"/42");
        assert_eq!(format_request_id(0, &mut buf), b"/0");
        assert_eq!(format_request_id(u32::MAX, &mut buf), b"/4294967295");
    }
}
