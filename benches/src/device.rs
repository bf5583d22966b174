//! One simulated device: its own TCP connection (bound to a chosen source address), an MQTT
//! session on fleetgate's sans-IO codec, and the 1/KP data-collection topic of its token.
//!
//! Sending never waits: [`Device::publish`] encodes into the connection's outbox and writes
//! what the socket takes right now; what it does not take stays in the outbox (bounded) for
//! the next attempt. A reader task per connection ([`Device::read_loop`]) takes PUBACKs,
//! `/status` and `/error` responses, acknowledges QoS 1 responses, and keeps the session alive
//! with PINGREQ. It times each QoS 1 message from its send to its PUBACK (the device's round
//! trip) and counts failures by reason: an `/error` response by its `statusCode`, an MQTT 5
//! PUBACK by its reason code, a connection the server closes.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fleetgate_transport_mqtt::codec::{
    Codec, Connect, Disconnect, Packet, ProtocolVersion, PubAck, PublishHeader, QoS, ReasonCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::stats::{Failure, RunCounters, mono_nanos};

/// Largest packet accepted from the server.
const MAX_INBOUND: u32 = 1 << 20;
/// Read buffer growth step: small, because idle runs hold ~17,000 connections per process.
const READ_CHUNK: usize = 512;

/// How every device of a run connects.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// The MQTT server.
    pub target: SocketAddr,
    /// MQTT 3.1.1 or 5.
    pub version: ProtocolVersion,
    /// Keep Alive asked for in CONNECT; PINGREQ goes out every ¾ of it. 0: no keep-alive.
    pub keep_alive_secs: u16,
    /// TCP connect plus CONNACK must finish within this.
    pub connect_timeout: Duration,
    /// The 1/KP application version in the topic.
    pub app_version: String,
    /// QoS 1 messages a connection may have unacknowledged (lowered to the server's Receive
    /// Maximum in MQTT 5).
    pub window: u32,
    /// Unwritten bytes a connection may hold before further messages are dropped as
    /// backpressure.
    pub max_buffer_bytes: usize,
}

/// Why a device could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The source address could not be bound (not a local address, or out of ports).
    #[error("cannot bind source address {0}: {1}")]
    Bind(SocketAddr, io::Error),
    /// TCP connect failed.
    #[error("TCP connect: {0}")]
    Tcp(io::Error),
    /// A socket operation other than TCP connect failed.
    #[error("socket: {0}")]
    Socket(io::Error),
    /// No answer to the opening exchange (HTTP and CoAP devices) in time.
    #[error("no {0} within the connect timeout")]
    Unanswered(&'static str),
    /// No CONNACK in time.
    #[error("no CONNACK within the connect timeout")]
    Timeout,
    /// The server refused the session.
    #[error("CONNACK refused: {0:?}")]
    Refused(ReasonCode),
    /// The server closed the connection, or sent something other than CONNACK.
    #[error("{0}")]
    Protocol(String),
}

impl ConnectError {
    /// The kind of failure, as connect failures are counted: `tcp connect: ConnectionRefused`,
    /// `CONNACK refused: NotAuthorized`, `timeout`, ...
    pub fn kind(&self) -> String {
        match self {
            ConnectError::Bind(_, e) => format!("bind: {:?}", e.kind()),
            ConnectError::Tcp(e) => format!("tcp connect: {:?}", e.kind()),
            ConnectError::Socket(e) => format!("socket: {:?}", e.kind()),
            ConnectError::Unanswered(what) => format!("no {what}"),
            ConnectError::Timeout => "no CONNACK in time".into(),
            ConnectError::Refused(rc) => format!("CONNACK refused: {rc:?}"),
            ConnectError::Protocol(_) => "protocol error".into(),
        }
    }
}

/// What became of one message handed to [`Device::publish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// Encoded and written; `pending` when part of it is still in the outbox.
    Sent {
        /// Bytes are left to write: call [`Device::flush`] later.
        pending: bool,
    },
    /// QoS 1 in-flight window full: not sent.
    WindowFull,
    /// Outbox over its bound: not sent.
    BufferFull,
    /// The connection is closed: not sent.
    Closed,
}

struct Outbox {
    buf: BytesMut,
    next_packet_id: u16,
    next_request_id: u32,
    /// QoS 1 messages awaiting their PUBACK: packet id and send time ([`mono_nanos`]), in
    /// send order (servers acknowledge in order, so the match is nearly always the first).
    unacked: VecDeque<(u16, u64)>,
}

/// A connected device.
pub struct Device {
    stream: TcpStream,
    codec: Codec,
    topic: Bytes,
    out: Mutex<Outbox>,
    inflight: AtomicU32,
    /// `/error` answers not yet followed by an error PUBACK: fleetgate refuses an MQTT 5 QoS 1
    /// request with both, and the refusal is one failure, counted by its `/error`.
    errors_before_puback: AtomicU32,
    v5: bool,
    window: u32,
    max_buffer: usize,
    keep_alive_secs: u16,
    live: Liveness,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("topic", &String::from_utf8_lossy(&self.topic))
            .field("open", &self.live.is_open())
            .finish_non_exhaustive()
    }
}

/// A connected device and what its reader needs: bytes read after CONNACK, and the codec.
pub struct Connected {
    /// The device, shared by its sender and its reader.
    pub device: Arc<Device>,
    read: BytesMut,
    codec: Codec,
}

impl Connected {
    /// Starts the reader task of this device; it runs until `stop` turns true or the
    /// connection closes.
    pub fn spawn_reader(self, stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let device = self.device.clone();
        tokio::spawn(device.read_loop(self.read, self.codec, stop))
    }
}

/// The 1/KP data-collection topic of a token: `kp1/<app version>/dcx/<token>/json`.
pub fn data_topic(app_version: &str, token: &str) -> String {
    format!("kp1/{app_version}/dcx/{token}/json")
}

/// Opens a TCP connection from `source` (port chosen by the kernel) to `target`, bound with
/// socket2 before connecting, so that many source addresses multiply the ephemeral ports.
pub async fn tcp_connect(
    target: SocketAddr,
    source: Option<IpAddr>,
) -> Result<TcpStream, ConnectError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(target), Type::STREAM, Some(Protocol::TCP))
        .map_err(ConnectError::Tcp)?;
    socket.set_nonblocking(true).map_err(ConnectError::Tcp)?;
    if let Some(ip) = source {
        let addr = SocketAddr::new(ip, 0);
        socket.bind(&addr.into()).map_err(|e| ConnectError::Bind(addr, e))?;
    }
    let std_stream: std::net::TcpStream = socket.into();
    let stream =
        TcpSocket::from_std_stream(std_stream).connect(target).await.map_err(ConnectError::Tcp)?;
    stream.set_nodelay(true).map_err(ConnectError::Tcp)?;
    Ok(stream)
}

/// Connects one device: TCP, CONNECT with the token as client id, CONNACK.
pub async fn connect(
    opts: &DeviceOptions,
    source: Option<IpAddr>,
    token: &str,
    counters: Arc<RunCounters>,
) -> Result<Connected, ConnectError> {
    let work = async {
        let mut stream = tcp_connect(opts.target, source).await?;
        let mut codec = Codec::new(MAX_INBOUND);
        codec.set_version(opts.version);
        let connect = Connect {
            protocol_version: opts.version,
            clean_start: true,
            keep_alive_secs: opts.keep_alive_secs,
            client_id: Bytes::copy_from_slice(token.as_bytes()),
            will: None,
            username: None,
            password: None,
            properties: Default::default(),
        };
        let mut out = BytesMut::new();
        codec
            .encode(&Packet::Connect(Box::new(connect)), &mut out)
            .map_err(|e| ConnectError::Protocol(format!("encoding CONNECT: {e}")))?;
        stream.write_all(&out).await.map_err(ConnectError::Tcp)?;
        let mut read = BytesMut::with_capacity(READ_CHUNK);
        let connack = loop {
            match codec.decode(&mut read) {
                Ok(Some(Packet::ConnAck(c))) => break c,
                Ok(Some(other)) => {
                    return Err(ConnectError::Protocol(format!(
                        "expected CONNACK, got {}",
                        packet_name(&other)
                    )));
                }
                Ok(None) => {}
                Err(e) => return Err(ConnectError::Protocol(format!("bad CONNACK: {e}"))),
            }
            if stream.read_buf(&mut read).await.map_err(ConnectError::Tcp)? == 0 {
                return Err(ConnectError::Protocol("closed before CONNACK".into()));
            }
        };
        if connack.reason_code.is_error() {
            return Err(ConnectError::Refused(connack.reason_code));
        }
        let window = match connack.properties.receive_maximum {
            Some(rm) => opts.window.min(u32::from(rm)),
            None => opts.window,
        };
        if let Some(max) = connack.properties.maximum_packet_size {
            codec.set_max_outbound_packet_size(max);
        }
        Ok((stream, codec, read, window))
    };
    let (stream, codec, read, window) = tokio::time::timeout(opts.connect_timeout, work)
        .await
        .map_err(|_| ConnectError::Timeout)??;
    let device = Arc::new(Device {
        stream,
        codec: codec.clone(),
        topic: Bytes::from(data_topic(&opts.app_version, token)),
        out: Mutex::new(Outbox {
            buf: BytesMut::new(),
            next_packet_id: 1,
            next_request_id: 1,
            unacked: VecDeque::new(),
        }),
        inflight: AtomicU32::new(0),
        errors_before_puback: AtomicU32::new(0),
        v5: opts.version == ProtocolVersion::V5,
        window: window.max(1),
        max_buffer: opts.max_buffer_bytes,
        keep_alive_secs: opts.keep_alive_secs,
        live: Liveness::opened(counters),
    });
    Ok(Connected { device, read, codec })
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::Disconnect(_) => "DISCONNECT",
        _ => "another packet",
    }
}

/// The `statusCode` and `reasonPhrase` of an `/error` response body
/// (`{"statusCode":401,"reasonPhrase":"..."}`); status 0 when the body has none.
pub fn parse_error_body(body: &[u8]) -> (u16, Option<String>) {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct ErrorBody {
        status_code: Option<u16>,
        reason_phrase: Option<String>,
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => (b.status_code.unwrap_or(0), b.reason_phrase),
        Err(_) => (0, Some(String::from_utf8_lossy(body).into_owned())),
    }
}

/// Writes `/<id>` as decimal into `buf`, returning its length.
fn request_id_suffix(buf: &mut [u8; 11], mut id: u32) -> usize {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (id % 10) as u8;
        id /= 10;
        if id == 0 {
            break;
        }
    }
    let n = digits.len() - i;
    buf[0] = b'/';
    buf[1..=n].copy_from_slice(&digits[i..]);
    n + 1
}

/// A device's state as the run counts it: open until it closes or is stopped; a close counts as
/// a lost connection unless the run is stopping the device (shared by every transport).
pub(crate) struct Liveness {
    open: AtomicBool,
    stopping: AtomicBool,
    counters: Arc<RunCounters>,
}

impl Liveness {
    /// A device that has just connected: counted in `connections_open`.
    pub(crate) fn opened(counters: Arc<RunCounters>) -> Self {
        counters.connections_open.fetch_add(1, Ordering::Relaxed);
        Self { open: AtomicBool::new(true), stopping: AtomicBool::new(false), counters }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    /// The run's counters.
    pub(crate) fn counters(&self) -> &RunCounters {
        &self.counters
    }

    /// Closed (once): a lost connection (and a failure) unless [`Liveness::stop`] came first.
    pub(crate) fn mark_closed(&self) {
        if self.open.swap(false, Ordering::Relaxed) {
            self.counters.connections_open.fetch_sub(1, Ordering::Relaxed);
            if !self.stopping.load(Ordering::Relaxed) {
                self.counters.connections_lost.fetch_add(1, Ordering::Relaxed);
                self.counters.fail(Failure::ConnectionLost, || None);
            }
        }
    }

    /// The run is stopping the device: closing it is not a loss.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }
}

/// What a write of an outbox that does not wait did.
pub(crate) enum Written {
    /// The socket took everything; the outbox is empty.
    All,
    /// The socket is full: bytes are left for a later attempt.
    Pending,
    /// The connection is gone; the outbox was dropped.
    Closed,
}

/// Writes what `stream` takes of `buf` now, without waiting (shared by the TCP devices).
pub(crate) fn write_now(stream: &TcpStream, buf: &mut BytesMut) -> Written {
    while !buf.is_empty() {
        match stream.try_write(buf) {
            Ok(0) => break,
            Ok(n) => buf.advance(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Written::Pending,
            Err(_) => break,
        }
    }
    let all = buf.is_empty();
    buf.clear();
    if all { Written::All } else { Written::Closed }
}

/// Reads what `stream` has into `read` without waiting; `false` when the peer closed the
/// connection or it failed (shared by the TCP devices).
pub(crate) fn read_now(stream: &TcpStream, read: &mut BytesMut) -> bool {
    match stream.try_read_buf(read) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
    }
}

impl Device {
    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        self.live.is_open()
    }

    /// Sends one data sample with `payload`, now, without waiting for anything.
    pub fn publish(&self, qos: QoS, with_request_id: bool, payload: &[u8]) -> SendOutcome {
        if !self.is_open() {
            return SendOutcome::Closed;
        }
        let qos1 = qos != QoS::AtMostOnce;
        if qos1 && self.inflight.load(Ordering::Relaxed) >= self.window {
            return SendOutcome::WindowFull;
        }
        let Ok(mut guard) = self.out.lock() else {
            return SendOutcome::Closed;
        };
        let out = &mut *guard;
        if out.buf.len() >= self.max_buffer {
            return SendOutcome::BufferFull;
        }
        let packet_id = qos1.then(|| {
            let id = out.next_packet_id;
            out.next_packet_id = id.checked_add(1).unwrap_or(1);
            id
        });
        let header = PublishHeader { dup: false, qos, retain: false, packet_id };
        let encoded = if with_request_id {
            let id = out.next_request_id;
            out.next_request_id = if id >= i32::MAX as u32 { 1 } else { id + 1 };
            let mut suffix = [0u8; 11];
            let n = request_id_suffix(&mut suffix, id);
            self.codec.encode_publish_parts(
                header,
                &[&self.topic, &suffix[..n]],
                None,
                payload,
                &mut out.buf,
            )
        } else {
            self.codec.encode_publish_parts(header, &[&self.topic], None, payload, &mut out.buf)
        };
        if encoded.is_err() {
            // Only a payload over the server's Maximum Packet Size gets here.
            return SendOutcome::BufferFull;
        }
        if let Some(id) = packet_id {
            self.inflight.fetch_add(1, Ordering::Relaxed);
            out.unacked.push_back((id, mono_nanos()));
        }
        let pending = self.write_out(&mut out.buf);
        SendOutcome::Sent { pending }
    }

    /// Writes what the socket takes of the outbox; `true` when bytes are left.
    pub fn flush(&self) -> bool {
        match self.out.lock() {
            Ok(mut out) => self.write_out(&mut out.buf),
            Err(_) => false,
        }
    }

    fn write_out(&self, buf: &mut BytesMut) -> bool {
        match write_now(&self.stream, buf) {
            Written::All => false,
            Written::Pending => true,
            Written::Closed => {
                self.mark_closed();
                false
            }
        }
    }

    /// Queues a control packet (PUBACK, PINGREQ, DISCONNECT) and writes what the socket takes;
    /// `true` when bytes are left.
    fn send_control(&self, packet: &Packet) -> bool {
        let Ok(mut out) = self.out.lock() else {
            return false;
        };
        if self.codec.encode(packet, &mut out.buf).is_err() {
            return false;
        }
        self.write_out(&mut out.buf)
    }

    fn mark_closed(&self) {
        self.live.mark_closed();
    }

    /// Handles one packet from the server; `true` when a reply is left unwritten.
    fn handle(&self, packet: Packet) -> bool {
        match packet {
            Packet::PubAck(ack) => {
                let _ = self.inflight.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(1))
                });
                let sent = self.out.lock().ok().and_then(|mut out| {
                    let at = out.unacked.iter().position(|(id, _)| *id == ack.packet_id)?;
                    out.unacked.remove(at).map(|(_, t)| t)
                });
                let counters = self.live.counters();
                if let Some(t) = sent {
                    counters.round_trip(t);
                }
                let step = counters.current();
                step.acked.fetch_add(1, Ordering::Relaxed);
                if ack.reason_code.is_error() {
                    step.ack_errors.fetch_add(1, Ordering::Relaxed);
                    let after_error = self
                        .errors_before_puback
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                        .is_ok();
                    if !after_error {
                        counters.fail(Failure::PubAck(ack.reason_code.to_v5()), || None);
                    }
                }
                false
            }
            Packet::Publish(p) => {
                let counters = self.live.counters();
                let step = counters.current();
                if p.topic.ends_with(b"/status") {
                    step.responded.fetch_add(1, Ordering::Relaxed);
                } else if p.topic.ends_with(b"/error") {
                    step.errors.fetch_add(1, Ordering::Relaxed);
                    let (code, reason) = parse_error_body(&p.payload);
                    counters.fail(Failure::ErrorTopic(code), || reason);
                    if self.v5 {
                        self.errors_before_puback.fetch_add(1, Ordering::Relaxed);
                    }
                }
                match p.packet_id {
                    Some(id) if p.qos == QoS::AtLeastOnce => {
                        self.send_control(&Packet::PubAck(PubAck::new(id)))
                    }
                    _ => false,
                }
            }
            Packet::Disconnect(_) => {
                self.mark_closed();
                false
            }
            _ => false,
        }
    }

    /// The reader: runs until `stop` turns true (then sends DISCONNECT) or the connection
    /// closes.
    pub async fn read_loop(
        self: Arc<Self>,
        mut read: BytesMut,
        mut codec: Codec,
        mut stop: watch::Receiver<bool>,
    ) {
        let ping_every = (self.keep_alive_secs > 0)
            .then(|| Duration::from_millis(u64::from(self.keep_alive_secs) * 750));
        let mut next_ping = Instant::now() + ping_every.unwrap_or(Duration::from_secs(3600));
        let mut want_write = false;
        while self.is_open() && !*stop.borrow() {
            loop {
                match codec.decode(&mut read) {
                    Ok(Some(p)) => want_write |= self.handle(p),
                    Ok(None) => break,
                    Err(_) => {
                        self.mark_closed();
                        return;
                    }
                }
            }
            if read.capacity() - read.len() < READ_CHUNK / 4 {
                read.reserve(READ_CHUNK);
            }
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                r = self.stream.readable() => {
                    if r.is_err() || !read_now(&self.stream, &mut read) {
                        self.mark_closed();
                        return;
                    }
                }
                r = self.stream.writable(), if want_write => {
                    want_write = r.is_ok() && self.flush();
                }
                _ = tokio::time::sleep_until(next_ping), if ping_every.is_some() => {
                    want_write |= self.send_control(&Packet::PingReq);
                    next_ping = Instant::now() + ping_every.unwrap_or_default();
                }
            }
        }
        self.shutdown();
    }

    /// Sends DISCONNECT (best effort) and marks the connection closed without counting it as
    /// lost.
    pub fn shutdown(&self) {
        self.live.stop();
        if self.is_open() {
            let _ = self.send_control(&Packet::Disconnect(Disconnect::normal()));
            self.mark_closed();
        }
    }
}

/// A simulated device of any transport, as the sender and the run see it.
#[derive(Debug, Clone)]
pub enum SimDevice {
    /// An MQTT connection.
    Mqtt(Arc<Device>),
    /// A CoAP socket.
    Coap(Arc<crate::coap_device::CoapDevice>),
    /// An HTTP/1.1 connection.
    Http(Arc<crate::http_device::HttpDevice>),
    /// An FGU/1 session.
    Udp(Arc<crate::udp_device::UdpDevice>),
}

impl SimDevice {
    /// Sends one data sample now, without waiting. `with_request_id` is for MQTT only (the run
    /// refuses it for the other transports); HTTP requests are answered whatever `qos` says.
    pub fn publish(&self, qos: QoS, with_request_id: bool, payload: &[u8]) -> SendOutcome {
        match self {
            SimDevice::Mqtt(d) => d.publish(qos, with_request_id, payload),
            SimDevice::Coap(d) => d.publish(qos, payload),
            SimDevice::Http(d) => d.publish(payload),
            SimDevice::Udp(d) => d.publish(qos, payload),
        }
    }

    /// Writes what the socket takes of the outbox; `true` when bytes are left.
    pub fn flush(&self) -> bool {
        match self {
            SimDevice::Mqtt(d) => d.flush(),
            SimDevice::Coap(d) => d.flush(),
            SimDevice::Http(d) => d.flush(),
            SimDevice::Udp(d) => d.flush(),
        }
    }

    /// Whether the device can still send.
    pub fn is_open(&self) -> bool {
        match self {
            SimDevice::Mqtt(d) => d.is_open(),
            SimDevice::Coap(d) => d.is_open(),
            SimDevice::Http(d) => d.is_open(),
            SimDevice::Udp(d) => d.is_open(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_suffixes() {
        let mut b = [0u8; 11];
        let n = request_id_suffix(&mut b, 1);
        assert_eq!(&b[..n], b"/1");
        let n = request_id_suffix(&mut b, 2_147_483_647);
        assert_eq!(&b[..n], b"/2147483647");
        let n = request_id_suffix(&mut b, u32::MAX);
        assert_eq!(&b[..n], b"/4294967295");
    }

    #[test]
    fn error_bodies() {
        assert_eq!(
            parse_error_body(br#"{"statusCode":401,"reasonPhrase":"unknown token"}"#),
            (401, Some("unknown token".into()))
        );
        assert_eq!(parse_error_body(br#"{"statusCode":503}"#), (503, None));
        assert_eq!(parse_error_body(b"oops"), (0, Some("oops".into())));
        assert_eq!(parse_error_body(br#"{"statusCode":70000}"#).0, 0);
    }

    #[test]
    fn topic_shape() {
        assert_eq!(data_topic("demo-v1", "dev-000001"), "kp1/demo-v1/dcx/dev-000001/json");
    }
}
