//! One MQTT connection as a sans-IO state machine, in the style of quinn-proto's `Connection`:
//! bytes and time in as values, bytes to write, events and the next timeout out.
//!
//! The glue reads socket bytes into [`Session::read_buffer`] (or hands them over with
//! [`Session::receive`]) and calls [`Session::handle_input`]; writes [`Session::transmit`] and
//! reports it with [`Session::advance_transmit`]; sleeps until [`Session::poll_timeout`] and then
//! calls [`Session::handle_timeout`]. What needs the gateway comes out of
//! [`Session::poll_event`] and goes back in as an answer: [`Event::Connect`] with
//! [`Session::connected`], [`Event::Request`] with [`Session::request_done`],
//! [`Event::Subscribe`] with [`Session::subscribed`], [`Event::Unsubscribe`] with
//! [`Session::unsubscribed`]. Responses and pushes from the gateway go in with
//! [`Session::send_response`] while [`Session::wants_responses`] says the client's receive
//! window has room. [`Event::Closed`] comes last and says why the connection ended.
//!
//! What it keeps: the handshake and the limits negotiated in CONNECT/CONNACK (keep-alive, receive
//! maximum both ways, topic aliases, maximum packet size), the client's topic aliases, and an
//! ordered queue of the acknowledgements still owed, so that requests may complete in any order
//! while PUBACKs leave in the order the PUBLISH packets came ([MQTT-4.6.0-2]). A request's error
//! answer (`<topic>/error`) is published before its PUBACK and, at QoS 1, waits for room in the
//! client's receive window like any other PUBLISH ([MQTT-3.3.4-9]).
//!
//! What it does not do: I/O, reading a clock, logging or metrics (it counts in [`Stats`] and says
//! why it closed in [`Close`]; the glue logs and reports), authentication, routing, or anything a
//! broker does (retained messages, wills, QoS 2, shared subscriptions, subscription identifiers:
//! each refused as MQTT 5 allows). It depends on `bytes`, `thiserror`, the crate's [`codec`] and
//! `fleetgate-kp` only.
//!
//! [`codec`]: crate::codec

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use fleetgate_kp::{ClientIdentity, KpError, KpOutcome, KpRequest, KpResponse, KpTopic, SessionId};

use crate::codec::{
    AckProperties, Codec, ConnAck, ConnAckProperties, Connect, DecodeError, Disconnect, Packet,
    ProtocolVersion, PubAck, Publish, PublishHeader, QoS, ReasonCode, SubAck, Subscribe, UnsubAck,
    Unsubscribe,
};

/// A connection that has received nothing for this long gives its empty buffers back: idle
/// connections, the bulk of a large fleet, then hold no buffer memory at all.
pub const IDLE_RELEASE: Duration = Duration::from_secs(2);

/// [`Session::wants_responses`] turns false while this much output waits to be written, so that
/// a client that does not read cannot make the session buffer without limit.
const TRANSMIT_HIGH_WATER: usize = 64 * 1024;

/// The protocol settings of a session (the MQTT part of the transport's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Largest packet accepted from the client, fixed header included (advertised in MQTT 5).
    pub max_packet_size: u32,
    /// Largest first packet (CONNECT) accepted: what an unauthenticated peer may make the
    /// session buffer. The smaller of this and `max_packet_size` applies until CONNACK.
    pub max_connect_packet_size: u32,
    /// Time a new connection has to send CONNECT and be authenticated.
    pub connect_timeout: Duration,
    /// Longest keep-alive granted; a client asking for more, or for none, gets this (MQTT 5:
    /// as Server Keep Alive; 3.1.1 cannot be told, so it is the server's idle timeout). 0:
    /// whatever the client asks, none included.
    pub max_keep_alive_secs: u16,
    /// QoS 1 PUBLISH packets the client may have unacknowledged (our MQTT 5 Receive Maximum);
    /// also how many requests the session decodes ahead of the gateway's answers.
    pub receive_maximum: u16,
    /// Topic aliases the client may use (MQTT 5 Topic Alias Maximum).
    pub topic_alias_maximum: u16,
    /// QoS 1 PUBLISH packets we send a 3.1.1 client before waiting for its PUBACKs (an MQTT 5
    /// client states its own Receive Maximum).
    pub max_inflight_v311: u16,
    /// PUBLISH packets per second taken from the client once connected; above it the session
    /// stops decoding (and the glue reading) until the rate allows more: TCP flow control
    /// slows the client down, nothing is lost. 0: no limit.
    pub max_messages_per_sec: u32,
    /// Bytes of packets per second taken from the client once connected, likewise. 0: no
    /// limit.
    pub max_bytes_per_sec: u32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_packet_size: 1024 * 1024,
            max_connect_packet_size: 4096,
            connect_timeout: Duration::from_secs(10),
            max_keep_alive_secs: 1200,
            receive_maximum: 1024,
            topic_alias_maximum: 64,
            max_inflight_v311: 64,
            max_messages_per_sec: 0,
            max_bytes_per_sec: 0,
        }
    }
}

/// Identifies a request, subscription or unsubscription handed out in an [`Event`], for its
/// answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(u64);

/// What the client sent in CONNECT for the gateway to authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    client_id: Bytes,
    username: Option<Bytes>,
    password: Option<Bytes>,
}

impl ConnectRequest {
    /// The client identifier, possibly empty.
    pub fn client_id(&self) -> &str {
        // The codec validated it as UTF-8.
        std::str::from_utf8(&self.client_id).unwrap_or_default()
    }

    /// The user name, if any.
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref().and_then(|u| std::str::from_utf8(u).ok())
    }

    /// The password (binary), if any.
    pub fn password(&self) -> Option<&[u8]> {
        self.password.as_deref()
    }
}

/// One topic filter of a SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeFilter {
    /// The topic filter, validated UTF-8.
    pub filter: Bytes,
    /// The tag for copies sent on this subscription: 1 + the granted QoS (at most 1).
    pub tag: u64,
}

impl SubscribeFilter {
    /// The filter as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.filter).unwrap_or_default()
    }
}

/// What the session needs from the gateway, or a fact the glue reports.
#[derive(Debug)]
pub enum Event {
    /// A valid CONNECT: authenticate it and answer with [`Session::connected`].
    Connect(ConnectRequest),
    /// A 1/KP request: hand it to the gateway and answer with [`Session::request_done`] once the
    /// gateway has it (or refused it). The request's tag is 1 + its QoS.
    Request {
        /// For the answer.
        id: RequestId,
        /// The request; topic and payload are slices of the read buffer.
        request: KpRequest,
    },
    /// A SUBSCRIBE: ask the gateway about each filter and answer with [`Session::subscribed`].
    Subscribe {
        /// For the answer.
        id: RequestId,
        /// The filters, in order.
        filters: Vec<SubscribeFilter>,
    },
    /// An UNSUBSCRIBE: cancel each filter and answer with [`Session::unsubscribed`].
    Unsubscribe {
        /// For the answer.
        id: RequestId,
        /// The filters (validated UTF-8), in order.
        filters: Vec<Bytes>,
    },
    /// The session has ended; nothing more comes after this. Write what
    /// [`Session::transmit`] still holds, then close the socket and the gateway's session.
    Closed(Close),
}

/// Why a session ended, and whose fault it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    /// The client sent DISCONNECT.
    ClientDisconnected,
    /// The client sent no CONNECT, or the gateway did not authenticate it, within the connect
    /// timeout.
    ConnectTimeout,
    /// Nothing came from the client for 1.5 times its keep-alive (the device's fault; MQTT 5:
    /// DISCONNECT 0x8D).
    KeepAliveTimeout,
    /// CONNECT was refused with this reason code in CONNACK (bad credentials, an unsupported
    /// protocol version or feature, the gateway unavailable).
    Refused(ReasonCode),
    /// The client broke the protocol or a limit (the device's fault; MQTT 5: DISCONNECT, or
    /// CONNACK while connecting, with [`Violation::reason_code`]).
    Violation(Violation),
    /// The glue closed it ([`Session::close`]): shutting down, or the gateway gave up on the
    /// session. MQTT 5: DISCONNECT with this reason code.
    Local(ReasonCode),
}

impl Close {
    /// Whether this counts as a refused connection.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Close::Refused(_))
    }

    /// Whether this counts as a protocol error.
    pub fn is_protocol_error(&self) -> bool {
        matches!(self, Close::Violation(_))
    }
}

impl fmt::Display for Close {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Close::ClientDisconnected => f.write_str("client disconnected"),
            Close::ConnectTimeout => f.write_str("no CONNECT accepted within the connect timeout"),
            Close::KeepAliveTimeout => f.write_str("client exceeded its keep-alive"),
            Close::Refused(code) => write!(f, "connection refused: {code:?}"),
            Close::Violation(v) => write!(f, "{v}"),
            Close::Local(code) => write!(f, "closed by the gateway: {code:?}"),
        }
    }
}

/// How a client broke the protocol or a limit the session announced. Always the device's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// Bytes that are not valid MQTT (or a packet over the maximum packet size).
    #[error(transparent)]
    Malformed(#[from] DecodeError),
    /// A packet a client may not send, or one of a flow fleetgate does not take (QoS 2 acks).
    #[error("client sent {0}, which the server does not accept")]
    UnexpectedPacket(&'static str),
    /// A QoS 2 PUBLISH; CONNACK said QoS 1 at most.
    #[error("client sent a QoS 2 PUBLISH; the server grants at most QoS 1")]
    QoS2,
    /// A retained PUBLISH on MQTT 5; CONNACK said retain is not available.
    #[error("client sent a retained PUBLISH; retain is not available")]
    Retain,
    /// A topic alias of 0 or above the Topic Alias Maximum.
    #[error("client used topic alias {0}, outside the range it was granted")]
    TopicAliasInvalid(u16),
    /// A PUBLISH with an empty topic and an alias that was never set.
    #[error("client used topic alias {0} before setting it")]
    TopicAliasUnknown(u16),
    /// More unacknowledged QoS 1 PUBLISH packets than the Receive Maximum we announced.
    #[error("client exceeded the receive maximum of {0} unacknowledged QoS 1 PUBLISH packets")]
    ReceiveMaximumExceeded(u16),
    /// A SUBSCRIBE with a Subscription Identifier; CONNACK said they are not available.
    #[error("client sent a subscription identifier; they are not available")]
    SubscriptionIdentifier,
    /// A `$share/` filter on MQTT 5; CONNACK said shared subscriptions are not available.
    #[error("client asked for a shared subscription; they are not available")]
    SharedSubscription,
    /// An AUTH packet, although CONNECT named no authentication method (MQTT 5 §4.12).
    #[error("client sent AUTH without an authentication method in CONNECT")]
    Auth,
}

impl Violation {
    /// The MQTT 5 reason code that answers it.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            Violation::Malformed(e) => e.reason_code(),
            Violation::UnexpectedPacket(_) | Violation::TopicAliasUnknown(_) | Violation::Auth => {
                ReasonCode::ProtocolError
            }
            Violation::QoS2 => ReasonCode::QoSNotSupported,
            Violation::Retain => ReasonCode::RetainNotSupported,
            Violation::TopicAliasInvalid(_) => ReasonCode::TopicAliasInvalid,
            Violation::ReceiveMaximumExceeded(_) => ReasonCode::ReceiveMaximumExceeded,
            Violation::SubscriptionIdentifier => ReasonCode::SubscriptionIdentifiersNotSupported,
            Violation::SharedSubscription => ReasonCode::SharedSubscriptionsNotSupported,
        }
    }
}

/// Counts the glue adds to its metrics once in a while ([`Session::take_stats`]). Rare facts
/// (refusals, protocol errors, keep-alive timeouts) come with [`Event::Closed`] instead.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// PUBLISH packets received.
    pub messages_received: u32,
    /// PUBLISH packets sent: responses, pushes and error answers.
    pub messages_sent: u32,
    /// Responses and pushes not sent because they exceeded the client's Maximum Packet Size.
    pub messages_too_large: u32,
}

/// One MQTT connection's protocol state. See the module documentation.
#[derive(Debug)]
pub struct Session {
    codec: Codec,
    /// Bytes from the client not yet decoded. Empty (no allocation) until the first read and
    /// again after [`IDLE_RELEASE`].
    read: BytesMut,
    /// Bytes for the client not yet written.
    write: BytesMut,
    state: State,
    /// Granted keep-alive × 1.5 in milliseconds; 0: none.
    keep_alive_ms: u32,
    limits: Limits,
    session: Option<SessionId>,
    /// Topic aliases the client has set (MQTT 5), index = alias - 1; grows to the highest
    /// alias used, not to the maximum up front.
    aliases: Box<[Option<Bytes>]>,
    /// Everything the client sent that is still owed an answer or acknowledgement, in arrival
    /// order. Entry `i` has request id `first_id + i`.
    pending: VecDeque<Entry>,
    first_id: u64,
    /// Index in `pending` of the first entry not yet handed out as an event (`pending` holds
    /// at most `receive_maximum + 1` entries).
    next_event: u32,
    /// Our QoS 1 PUBLISH packets not yet acknowledged, and how many may be.
    inflight: u16,
    max_inflight: u16,
    /// The client's QoS 1 PUBLISH packets not yet acknowledged (saturating: only MQTT 5
    /// checks it, and there it stops at the receive maximum).
    unacked: u16,
    next_packet_id: u16,
    stats: Stats,
    /// The rate limits, applied once connected; `None` when none are configured (boxed: it
    /// stays out of the memory of connections without limits).
    throttle: Option<Box<Throttle>>,
    /// Give the buffers back once the CONNACK has been written: most devices idle after it.
    release_after_write: bool,
    close_reported: bool,
    /// The client closed its side (or the socket failed): what it sent before is still
    /// decoded and handed to the gateway, then the session ends.
    input_ended: bool,
}

/// What the session keeps of its [`SessionConfig`] after `new`.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_packet_size: u32,
    max_keep_alive_secs: u16,
    receive_maximum: u16,
    topic_alias_maximum: u16,
    max_inflight_v311: u16,
}

/// Token buckets on the packets a connected client sends: messages (PUBLISH) and bytes per
/// second, each holding at most one second's worth. A packet is decoded only while both hold a
/// token; its cost is taken after, so one large packet may leave the byte bucket in debt.
#[derive(Debug)]
struct Throttle {
    messages_per_sec: f64,
    bytes_per_sec: f64,
    messages: f64,
    bytes: f64,
    at: Instant,
}

impl Throttle {
    /// The buckets `config` asks for, full at `now`; `None` when it asks for none.
    fn new(config: &SessionConfig, now: Instant) -> Option<Box<Self>> {
        if config.max_messages_per_sec == 0 && config.max_bytes_per_sec == 0 {
            return None;
        }
        let (messages_per_sec, bytes_per_sec) =
            (f64::from(config.max_messages_per_sec), f64::from(config.max_bytes_per_sec));
        Some(Box::new(Self {
            messages_per_sec,
            bytes_per_sec,
            messages: messages_per_sec,
            bytes: bytes_per_sec,
            at: now,
        }))
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.messages =
            (self.messages + elapsed * self.messages_per_sec).min(self.messages_per_sec);
        self.bytes = (self.bytes + elapsed * self.bytes_per_sec).min(self.bytes_per_sec);
    }

    /// When the next packet may be decoded; `None`: now.
    fn resume_at(&self) -> Option<Instant> {
        let wait = |tokens: f64, need: f64, rate: f64| {
            if rate > 0.0 && tokens < need { (need - tokens) / rate } else { 0.0 }
        };
        let secs = wait(self.messages, 1.0, self.messages_per_sec).max(wait(
            self.bytes,
            1.0,
            self.bytes_per_sec,
        ));
        // At least a millisecond: a wait rounded to nothing would wake the timer for nothing.
        (secs > 0.0).then(|| self.at + Duration::from_secs_f64(secs).max(Duration::from_millis(1)))
    }

    fn take(&mut self, publish: bool, bytes: usize) {
        if self.messages_per_sec > 0.0 && publish {
            self.messages -= 1.0;
        }
        if self.bytes_per_sec > 0.0 {
            self.bytes -= bytes as f64;
        }
    }
}

#[derive(Debug)]
enum State {
    /// Waiting for CONNECT until `deadline` (`None`: an `Instant` cannot hold it; never).
    Connecting {
        deadline: Option<Instant>,
    },
    /// CONNECT decoded; the gateway authenticates until `deadline`. Packets after CONNECT stay
    /// in the read buffer until then.
    Authenticating {
        deadline: Option<Instant>,
        handshake: Box<Handshake>,
    },
    Connected {
        last_input: Instant,
    },
    Closed(Close),
}

/// What CONNECT said that CONNACK needs, and the request until it is handed out.
#[derive(Debug)]
struct Handshake {
    request: Option<ConnectRequest>,
    client_id_empty: bool,
    keep_alive_secs: u16,
    session_expiry: bool,
    receive_maximum: Option<u16>,
    maximum_packet_size: Option<u32>,
}

/// Something owed to the client, in arrival order.
#[derive(Debug)]
struct Entry {
    /// The packet id to acknowledge: a QoS 1 PUBLISH, SUBSCRIBE or UNSUBSCRIBE. `None` for a
    /// QoS 0 PUBLISH, which is answered (on error) but not acknowledged.
    packet_id: Option<u16>,
    step: Step,
}

#[derive(Debug)]
enum Step {
    /// Decoded, not yet handed out as an event.
    Request(KpRequest),
    Subscribe(Vec<SubscribeFilter>),
    Unsubscribe(Vec<Bytes>),
    /// Handed out; waiting for the gateway to take it. A request keeps its topic to address an
    /// error answer; a subscription the codes it would grant.
    Requested(KpTopic),
    /// A QoS 1 request the gateway took: its PUBACK waits for the extension's answer (or the
    /// gateway's word that the request is durable some other way), which comes back as a
    /// response carrying the request's tag.
    Delivering,
    Subscribing(Vec<ReasonCode>),
    Unsubscribing(usize),
    /// Answered: written once it reaches the front of the queue. A PUBLISH's answer (an error,
    /// or a response to a request id) goes out before its PUBACK, which carries `reason`
    /// (MQTT 5; 3.1.1 PUBACKs have none).
    PubAck {
        answer: Option<KpResponse>,
        reason: ReasonCode,
    },
    SubAck(Vec<ReasonCode>),
    UnsubAck(Vec<ReasonCode>),
}

impl Step {
    fn is_answered(&self) -> bool {
        matches!(self, Step::PubAck { .. } | Step::SubAck(_) | Step::UnsubAck(_))
    }
}

/// The QoS of a response: the low two bits of a tag are `1 + the QoS` of the request it
/// answers (or of the subscription it is a copy for); pushes (tag 0) go at QoS 1.
fn response_qos(tag: u64) -> QoS {
    if tag & 3 == 1 { QoS::AtMostOnce } else { QoS::AtLeastOnce }
}

/// The tag of request `id` at `qos`: the request number above the two bits of the QoS, so
/// that an answer finds its request ([`request_of`]) and a copy's tag (1 or 2) never looks like
/// a request's.
fn request_tag(id: RequestId, qos: QoS) -> u64 {
    ((id.0 + 1) << 2) | (1 + qos as u64)
}

/// The request a response's tag names, if it names one.
fn request_of(tag: u64) -> Option<RequestId> {
    (tag >> 2).checked_sub(1).map(RequestId)
}

/// The MQTT 5 PUBACK reason code for a request the gateway or the extension refused with
/// `status` (DESIGN decision 9).
fn puback_reason(status: u16) -> ReasonCode {
    match status {
        400 => ReasonCode::PayloadFormatInvalid,
        401 | 403 => ReasonCode::NotAuthorized,
        404 => ReasonCode::TopicNameInvalid,
        413 | 429 => ReasonCode::QuotaExceeded,
        _ => ReasonCode::UnspecifiedError,
    }
}

impl Session {
    /// How many requests the session decodes ahead of the gateway's answers (its
    /// `receive_maximum`, at least 1).
    pub fn receive_maximum(&self) -> u16 {
        self.limits.receive_maximum
    }

    /// A session for a connection accepted at `now`. It waits for CONNECT until
    /// `now + config.connect_timeout` and holds no buffer memory yet.
    pub fn new(config: &SessionConfig, now: Instant) -> Self {
        // Until CONNACK, a peer that has proven nothing may make the session hold at most one
        // small packet.
        let first_packet_max = config.max_packet_size.min(config.max_connect_packet_size.max(64));
        Self {
            codec: Codec::new(first_packet_max),
            read: BytesMut::new(),
            write: BytesMut::new(),
            state: State::Connecting { deadline: add(now, config.connect_timeout) },
            keep_alive_ms: 0,
            limits: Limits {
                max_packet_size: config.max_packet_size,
                max_keep_alive_secs: config.max_keep_alive_secs,
                receive_maximum: config.receive_maximum.max(1),
                topic_alias_maximum: config.topic_alias_maximum,
                max_inflight_v311: config.max_inflight_v311,
            },
            throttle: Throttle::new(config, now),
            session: None,
            aliases: Box::default(),
            pending: VecDeque::new(),
            first_id: 0,
            next_event: 0,
            inflight: 0,
            max_inflight: 0,
            unacked: 0,
            next_packet_id: 0,
            stats: Stats::default(),
            release_after_write: false,
            close_reported: false,
            input_ended: false,
        }
    }

    // ----- input --------------------------------------------------------------------------

    /// Where the glue puts bytes read from the socket before calling
    /// [`Session::handle_input`]. Empty without capacity while the connection is idle: the
    /// glue may then read onto its stack and append only what arrived.
    pub fn read_buffer(&mut self) -> &mut BytesMut {
        &mut self.read
    }

    /// Bytes from the client arrived in [`Session::read_buffer`] at `now`: they count as
    /// activity for the keep-alive (a packet need not be complete), and complete packets are
    /// decoded while [`Session::wants_input`] would be true. Call it after every read that got
    /// bytes.
    pub fn handle_input(&mut self, now: Instant) {
        if let State::Connected { last_input } = &mut self.state {
            *last_input = now;
        }
        if let Some(throttle) = &mut self.throttle {
            throttle.refill(now);
        }
        self.drive();
    }

    /// Appends `data` to the read buffer and handles it (nothing happens for no bytes).
    pub fn receive(&mut self, data: &[u8], now: Instant) {
        if !data.is_empty() && !self.is_closed() {
            self.read.extend_from_slice(data);
            self.handle_input(now);
        }
    }

    /// Whether the glue should read more from the socket. False while the gateway authenticates
    /// the CONNECT, while as many requests as the receive maximum (plus one) await answers or
    /// acknowledgement (a slow gateway slows the reading instead of growing memory), and once
    /// closed.
    pub fn wants_input(&self) -> bool {
        if self.input_ended {
            return false;
        }
        match self.state {
            State::Connecting { .. } => true,
            State::Connected { .. } => self.has_room() && !self.is_throttled(),
            State::Authenticating { .. } | State::Closed(_) => false,
        }
    }

    /// Whether the rate limits (`max_messages_per_sec`, `max_bytes_per_sec`) hold the next
    /// packet back; [`Session::poll_timeout`] then says when they allow it.
    pub fn is_throttled(&self) -> bool {
        self.throttle.as_ref().is_some_and(|t| t.resume_at().is_some())
    }

    /// Room to decode another packet: at most `receive_maximum + 1` entries wait, so that an
    /// MQTT 5 client that sends one QoS 1 PUBLISH too many is caught, not merely stalled.
    fn has_room(&self) -> bool {
        self.pending.len() <= usize::from(self.limits.receive_maximum)
    }

    // ----- output -------------------------------------------------------------------------

    /// Bytes to write to the client, in order.
    pub fn transmit(&self) -> &[u8] {
        &self.write
    }

    /// The glue wrote the first `n` bytes of [`Session::transmit`].
    pub fn advance_transmit(&mut self, n: usize) {
        if n >= self.write.len() {
            self.write.clear();
            if self.release_after_write {
                self.release_after_write = false;
                self.release_idle_buffers();
            }
        } else {
            self.write.advance(n);
        }
    }

    /// The counts since the last call, reset to zero.
    pub fn take_stats(&mut self) -> Stats {
        std::mem::take(&mut self.stats)
    }

    /// Whether the next event [`Session::poll_event`] gives is a request (a draining glue holds
    /// requests back: nothing new may be acknowledged).
    pub fn next_is_request(&self) -> bool {
        matches!(
            self.pending.get(self.next_event as usize),
            Some(Entry { step: Step::Request(_), .. })
        )
    }

    /// The next event, if any. Events come in the order of the packets that caused them;
    /// [`Event::Closed`] comes last, once.
    pub fn poll_event(&mut self) -> Option<Event> {
        if let State::Authenticating { handshake, .. } = &mut self.state
            && let Some(request) = handshake.request.take()
        {
            return Some(Event::Connect(request));
        }
        while let Some(entry) = self.pending.get_mut(self.next_event as usize) {
            let id = RequestId(self.first_id + u64::from(self.next_event));
            self.next_event += 1;
            let event;
            let placeholder = Step::PubAck { answer: None, reason: ReasonCode::Success };
            (entry.step, event) = match std::mem::replace(&mut entry.step, placeholder) {
                Step::Request(request) => {
                    (Step::Requested(request.topic.clone()), Event::Request { id, request })
                }
                Step::Subscribe(filters) => {
                    let granted = filters
                        .iter()
                        .map(|f| match f.tag {
                            1 => ReasonCode::GRANTED_QOS_0,
                            _ => ReasonCode::GrantedQoS1,
                        })
                        .collect();
                    (Step::Subscribing(granted), Event::Subscribe { id, filters })
                }
                Step::Unsubscribe(filters) => {
                    (Step::Unsubscribing(filters.len()), Event::Unsubscribe { id, filters })
                }
                // Answered by the session itself (a topic that is not 1/KP): nothing to ask.
                other => {
                    entry.step = other;
                    continue;
                }
            };
            return Some(event);
        }
        if let State::Closed(close) = &self.state
            && !self.close_reported
        {
            self.close_reported = true;
            return Some(Event::Closed(close.clone()));
        }
        None
    }

    // ----- time ---------------------------------------------------------------------------

    /// When [`Session::handle_timeout`] should next be called: the connect deadline, the
    /// keep-alive deadline, or earlier the moment to give idle buffers back while the session
    /// holds any it could give back. `None` when nothing is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Connecting { deadline } | State::Authenticating { deadline, .. } => *deadline,
            State::Connected { last_input } => {
                let expire =
                    (self.keep_alive_ms > 0).then(|| add(*last_input, self.keep_alive())).flatten();
                let release =
                    self.holds_idle_buffers().then(|| add(*last_input, IDLE_RELEASE)).flatten();
                let resume = self.throttle.as_ref().and_then(|t| t.resume_at());
                [expire, release, resume].into_iter().flatten().min()
            }
            State::Closed(_) => None,
        }
    }

    /// Acts on the time: closes a connection whose CONNECT or keep-alive is overdue, and gives
    /// back buffers that have been idle for [`IDLE_RELEASE`].
    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.state {
            State::Connecting { deadline } | State::Authenticating { deadline, .. } => {
                if deadline.is_some_and(|d| now >= d) {
                    self.close_with(Close::ConnectTimeout);
                }
            }
            State::Connected { last_input } => {
                let idle = now.saturating_duration_since(*last_input);
                if let Some(throttle) = &mut self.throttle
                    && throttle.resume_at().is_some()
                {
                    throttle.refill(now);
                    if throttle.resume_at().is_none() {
                        // The session stopped reading by its own choice: that pause is not
                        // the client's silence.
                        self.state = State::Connected { last_input: now };
                        self.drive();
                        return;
                    }
                }
                if self.keep_alive_ms > 0 && idle >= self.keep_alive() {
                    self.close_with(Close::KeepAliveTimeout);
                } else if idle >= IDLE_RELEASE {
                    self.release_idle_buffers();
                }
            }
            State::Closed(_) => {}
        }
    }

    /// 1.5 times the granted keep-alive.
    fn keep_alive(&self) -> Duration {
        Duration::from_millis(u64::from(self.keep_alive_ms))
    }

    /// Buffers that hold nothing but memory.
    fn holds_idle_buffers(&self) -> bool {
        (self.read.is_empty() && self.read.capacity() > 0)
            || (self.write.is_empty() && self.write.capacity() > 0)
            || (self.pending.is_empty() && self.pending.capacity() > 0)
    }

    /// Drops the buffers that hold nothing (a partial packet, unwritten bytes or owed answers
    /// stay).
    fn release_idle_buffers(&mut self) {
        if self.read.is_empty() {
            self.read = BytesMut::new();
        }
        if self.write.is_empty() {
            self.write = BytesMut::new();
        }
        if self.pending.is_empty() {
            self.pending = VecDeque::new();
        }
    }

    // ----- the gateway's answers ----------------------------------------------------------

    /// The gateway's answer to [`Event::Connect`] at `now`: CONNACK accepts or refuses the
    /// client (401 → bad user name or password, 403 → not authorized, anything else → server
    /// unavailable). Packets the client sent after CONNECT are handled from here on.
    pub fn connected(&mut self, result: Result<ClientIdentity, KpError>, now: Instant) {
        let State::Authenticating { handshake, .. } = &self.state else { return };
        let handshake = Handshake { request: None, ..**handshake };
        let identity = match result {
            Ok(identity) => identity,
            Err(e) => {
                self.refuse(match e.status {
                    401 => ReasonCode::BadUserNameOrPassword,
                    403 => ReasonCode::NotAuthorized,
                    _ => ReasonCode::ServerUnavailable,
                });
                return;
            }
        };
        self.state = State::Connected { last_input: now };
        self.session = Some(identity.session);
        let v5 = self.is_v5();
        let limits = self.limits;
        self.codec.set_max_inbound_packet_size(limits.max_packet_size);
        if let Some(throttle) = &mut self.throttle {
            // Full buckets from CONNACK on (the handshake took none).
            throttle.refill(now);
        }
        self.max_inflight = if v5 {
            handshake.receive_maximum.unwrap_or(u16::MAX)
        } else {
            limits.max_inflight_v311
        }
        .max(1);
        if let Some(max) = handshake.maximum_packet_size {
            self.codec.set_max_outbound_packet_size(max);
        }
        let asked = handshake.keep_alive_secs;
        let max_ka = limits.max_keep_alive_secs;
        // 3.1.1 cannot be told: there the cap is the server's own idle timeout.
        let granted = if max_ka > 0 && (asked == 0 || asked > max_ka) { max_ka } else { asked };
        self.keep_alive_ms = u32::from(granted) * 1500;
        let mut properties = ConnAckProperties::default();
        if v5 {
            properties.receive_maximum = Some(limits.receive_maximum);
            properties.maximum_qos = Some(QoS::AtLeastOnce);
            properties.retain_available = Some(false);
            properties.maximum_packet_size = Some(limits.max_packet_size);
            properties.topic_alias_maximum = Some(limits.topic_alias_maximum);
            properties.wildcard_subscription_available = Some(true);
            properties.subscription_identifiers_available = Some(false);
            properties.shared_subscription_available = Some(false);
            if handshake.session_expiry {
                // No session state survives the connection.
                properties.session_expiry_interval = Some(0);
            }
            if granted != asked {
                properties.server_keep_alive = Some(granted);
            }
            if handshake.client_id_empty {
                let assigned = format!("fleetgate-{}", identity.session.0);
                properties.assigned_client_identifier = Some(Bytes::from(assigned));
            }
        }
        let connack =
            ConnAck { session_present: false, reason_code: ReasonCode::Success, properties };
        self.encode(&Packet::ConnAck(Box::new(connack)));
        self.release_after_write = true;
        self.drive();
    }

    /// The gateway has the request `id` (`Ok`), or refused it: then the client gets the error
    /// on `<topic>/error` (at the request's QoS) before the PUBACK, which carries the refusal's
    /// reason code on MQTT 5. A QoS 1 request the gateway took is acknowledged only when its
    /// answer comes ([`Session::send_response`] with the request's tag): PUBACK means the
    /// extension has it (DESIGN decision 9).
    pub fn request_done(&mut self, id: RequestId, result: Result<(), KpError>) {
        let v5 = self.is_v5();
        let Some(entry) = self.entry_mut(id) else { return };
        // An answer that came first has settled the entry already.
        let Step::Requested(topic) = &entry.step else { return };
        entry.step = match result {
            Ok(()) if entry.packet_id.is_some() => Step::Delivering,
            Ok(()) => Step::PubAck { answer: None, reason: ReasonCode::Success },
            Err(e) => {
                let reason = if v5 { puback_reason(e.status) } else { ReasonCode::Success };
                let answer = KpResponse {
                    base: topic.base(),
                    request_id: topic.request_id(),
                    tag: if entry.packet_id.is_some() { 2 } else { 1 },
                    outcome: KpOutcome::Error(e),
                };
                Step::PubAck { answer: Some(answer), reason }
            }
        };
        self.drive();
    }

    /// The gateway's answers to [`Event::Subscribe`] `id`, one per filter in order: SUBACK
    /// grants each accepted filter at most QoS 1; a refusal is 401/403 → not authorized, 404 →
    /// topic filter invalid, anything else → unspecified error. A missing answer counts as
    /// unspecified error.
    pub fn subscribed(
        &mut self,
        id: RequestId,
        results: impl IntoIterator<Item = Result<(), KpError>>,
    ) {
        let Some(entry) = self.entry_mut(id) else { return };
        let Step::Subscribing(codes) = &mut entry.step else { return };
        let mut codes = std::mem::take(codes);
        let mut results = results.into_iter();
        for code in &mut codes {
            *code = match results.next() {
                Some(Ok(())) => *code,
                Some(Err(e)) => match e.status {
                    401 | 403 => ReasonCode::NotAuthorized,
                    404 => ReasonCode::TopicFilterInvalid,
                    429 => ReasonCode::QuotaExceeded,
                    _ => ReasonCode::UnspecifiedError,
                },
                None => ReasonCode::UnspecifiedError,
            };
        }
        entry.step = Step::SubAck(codes);
        self.drive();
    }

    /// The gateway's answers to [`Event::Unsubscribe`] `id`, one per filter in order: whether
    /// such a subscription existed. A missing answer counts as unspecified error.
    pub fn unsubscribed(&mut self, id: RequestId, existed: impl IntoIterator<Item = bool>) {
        let Some(entry) = self.entry_mut(id) else { return };
        let Step::Unsubscribing(n) = entry.step else { return };
        let mut existed = existed.into_iter();
        let codes = (0..n)
            .map(|_| match existed.next() {
                Some(true) => ReasonCode::Success,
                Some(false) => ReasonCode::NoSubscriptionExisted,
                None => ReasonCode::UnspecifiedError,
            })
            .collect();
        entry.step = Step::UnsubAck(codes);
        self.drive();
    }

    fn entry_mut(&mut self, id: RequestId) -> Option<&mut Entry> {
        if self.is_closed() {
            return None;
        }
        let index = usize::try_from(id.0.checked_sub(self.first_id)?).ok()?;
        // Only entries already handed out can be answered.
        if index >= self.next_event as usize {
            return None;
        }
        self.pending.get_mut(index)
    }

    /// Whether [`Session::send_response`] may be called: connected, the client's receive
    /// window has room for a QoS 1 PUBLISH, and little output waits to be written.
    pub fn wants_responses(&self) -> bool {
        matches!(self.state, State::Connected { .. })
            && self.inflight < self.max_inflight
            && self.write.len() < TRANSMIT_HIGH_WATER
    }

    /// Publishes a response or push from the gateway on `<base>[/<request id>]/status|error`,
    /// at QoS 0 for tag 1 and QoS 1 otherwise. A response over the client's Maximum Packet Size
    /// is dropped and counted ([`Stats::messages_too_large`]). Gives the response back when it
    /// cannot go out now: not connected, or a QoS 1 response and the client's receive window is
    /// full (see [`Session::wants_responses`]).
    pub fn send_response(&mut self, response: KpResponse) -> Result<(), KpResponse> {
        // The answer to a request still owed its PUBACK settles it; it goes out (before the
        // PUBACK) in the order the requests came.
        if let Some(id) = request_of(response.tag) {
            let v5 = self.is_v5();
            if let Some(entry) = self.entry_mut(id)
                && matches!(entry.step, Step::Requested(_) | Step::Delivering)
            {
                let (answer, reason) = match &response.outcome {
                    // Without a request id a success is only acknowledged (1/KP); a request
                    // the gateway spooled is acknowledged, and its answer comes later.
                    KpOutcome::Success(_) if response.request_id.is_none() => {
                        (None, ReasonCode::Success)
                    }
                    KpOutcome::Stored => (None, ReasonCode::Success),
                    KpOutcome::Success(_) => (Some(response), ReasonCode::Success),
                    KpOutcome::Error(e) if v5 => {
                        let reason = puback_reason(e.status);
                        (Some(response), reason)
                    }
                    KpOutcome::Error(_) => (Some(response), ReasonCode::Success),
                };
                entry.step = Step::PubAck { answer, reason };
                self.drive();
                return Ok(());
            }
        }
        if response.outcome == KpOutcome::Stored {
            // Only ever the answer to a request still owed its PUBACK; nothing to publish.
            return Ok(());
        }
        let window_full =
            response_qos(response.tag) == QoS::AtLeastOnce && self.inflight >= self.max_inflight;
        if !matches!(self.state, State::Connected { .. }) || window_full {
            return Err(response);
        }
        self.publish(&response);
        Ok(())
    }

    /// Closes the session for a reason of the gateway's (shutting down 0x8B, unable to keep up
    /// 0x89): MQTT 5 clients get DISCONNECT with `reason` if they were connected.
    pub fn close(&mut self, reason: ReasonCode) {
        self.close_with(Close::Local(reason));
    }

    /// Whether the session has ended (its last bytes may still wait in
    /// [`Session::transmit`]).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    /// The gateway's session, once connected.
    pub fn session_id(&self) -> Option<SessionId> {
        self.session
    }

    /// The protocol version, once CONNECT has named one.
    pub fn version(&self) -> Option<ProtocolVersion> {
        self.codec.version()
    }

    fn is_v5(&self) -> bool {
        self.codec.version() == Some(ProtocolVersion::V5)
    }

    // ----- the machine --------------------------------------------------------------------

    /// Writes what is ready at the front of the queue, then decodes buffered packets one at a
    /// time while there is room, writing again after each.
    fn drive(&mut self) {
        loop {
            self.flush();
            if !self.decode_one() {
                break;
            }
        }
        // Input over, everything it brought decoded and handed out: nothing more will come.
        if self.input_ended
            && !self.is_closed()
            && self.next_event as usize == self.pending.len()
            && !matches!(self.state, State::Authenticating { .. })
            && (!matches!(self.state, State::Connected { .. })
                || (self.has_room() && !self.is_throttled()))
        {
            self.close_with(Close::ClientDisconnected);
        }
    }

    /// The client closed its side of the connection, or the socket failed, at `now`. What it
    /// sent before is still decoded and handed out as events (a device that publishes and
    /// hangs up loses nothing it sent); then the session ends with
    /// [`Close::ClientDisconnected`]. A partial packet at the end is dropped.
    pub fn end_input(&mut self, now: Instant) {
        let _ = now;
        self.input_ended = true;
        self.drive();
    }

    /// Decodes and handles one packet; false when there is none (or no room, or the session is
    /// not taking packets).
    fn decode_one(&mut self) -> bool {
        let connecting = match self.state {
            State::Connecting { .. } => true,
            State::Connected { .. } if self.has_room() && !self.is_throttled() => false,
            _ => return false,
        };
        let before = self.read.len();
        let decoded = self.codec.decode(&mut self.read);
        if let (Some(throttle), Ok(Some(packet))) = (&mut self.throttle, &decoded) {
            throttle.take(matches!(packet, Packet::Publish(_)), before - self.read.len());
        }
        match decoded {
            Ok(Some(packet)) if connecting => match packet {
                Packet::Connect(connect) => self.on_connect(*connect),
                // The codec refuses anything else before CONNECT.
                _ => self.violation(Violation::UnexpectedPacket("a packet before CONNECT")),
            },
            Ok(Some(packet)) => self.on_packet(packet),
            Ok(None) => return false,
            Err(DecodeError::UnsupportedProtocolVersion(_)) if connecting => {
                // 3.1.1 §3.1.2.2: return code 1 in a 3.1.1 CONNACK, whatever level was asked.
                self.write.extend_from_slice(&[0x20, 0x02, 0x00, 0x01]);
                self.close_with(Close::Refused(ReasonCode::UnsupportedProtocolVersion));
            }
            Err(e) => self.violation(Violation::Malformed(e)),
        }
        !self.is_closed()
    }

    fn on_connect(&mut self, connect: Connect) {
        let v5 = self.is_v5();
        let props = &connect.properties;
        if props.authentication_method.is_some() {
            return self.refuse(ReasonCode::BadAuthenticationMethod);
        }
        // CONNACK says QoS 1 at most and no retain; an MQTT 5 will that needs either is refused
        // [MQTT-3.2.2-12/13]. 3.1.1 has no code for it (and allows will QoS 2): the will is
        // accepted and, like every will, not published.
        if v5 && let Some(will) = &connect.will {
            if will.qos == QoS::ExactlyOnce {
                return self.refuse(ReasonCode::QoSNotSupported);
            }
            if will.retain {
                return self.refuse(ReasonCode::RetainNotSupported);
            }
        }
        if connect.client_id.is_empty() && !connect.clean_start && !v5 {
            // 3.1.1 §3.1.3.1: a zero-length id needs CleanSession = 1.
            return self.refuse(ReasonCode::ClientIdentifierNotValid);
        }
        let handshake = Handshake {
            client_id_empty: connect.client_id.is_empty(),
            keep_alive_secs: connect.keep_alive_secs,
            session_expiry: props.session_expiry_interval.is_some_and(|s| s > 0),
            receive_maximum: props.receive_maximum,
            maximum_packet_size: props.maximum_packet_size,
            request: Some(ConnectRequest {
                client_id: connect.client_id,
                username: connect.username,
                password: connect.password,
            }),
        };
        let State::Connecting { deadline } = self.state else { return };
        self.state = State::Authenticating { deadline, handshake: Box::new(handshake) };
    }

    /// Handles a packet on a connected session.
    fn on_packet(&mut self, packet: Packet) {
        match packet {
            Packet::Publish(publish) => self.on_publish(publish),
            Packet::PubAck(_) => {
                self.inflight = self.inflight.saturating_sub(1);
            }
            Packet::Subscribe(subscribe) => self.on_subscribe(subscribe),
            Packet::Unsubscribe(unsubscribe) => self.on_unsubscribe(unsubscribe),
            Packet::PingReq => self.encode(&Packet::PingResp),
            Packet::Disconnect(_) => self.close_with(Close::ClientDisconnected),
            Packet::Auth(_) => self.violation(Violation::Auth),
            Packet::Connect(_) => self.violation(Violation::UnexpectedPacket("a second CONNECT")),
            Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => {
                self.violation(Violation::UnexpectedPacket("a QoS 2 acknowledgement"))
            }
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                self.violation(Violation::UnexpectedPacket("a packet only a server sends"))
            }
        }
    }

    fn on_publish(&mut self, publish: Publish) {
        self.stats.messages_received += 1;
        if publish.qos == QoS::ExactlyOnce {
            return self.violation(Violation::QoS2);
        }
        let v5 = self.is_v5();
        if v5 && publish.retain {
            return self.violation(Violation::Retain);
        }
        if publish.qos == QoS::AtLeastOnce && v5 && self.unacked >= self.limits.receive_maximum {
            return self.violation(Violation::ReceiveMaximumExceeded(self.limits.receive_maximum));
        }
        let topic = match self.resolve_alias(&publish) {
            Ok(topic) => topic,
            Err(v) => return self.violation(v),
        };
        let id = RequestId(self.first_id + self.pending.len() as u64);
        let tag = request_tag(id, publish.qos);
        let step = match KpTopic::parse(topic.clone()) {
            Ok(topic) => Step::Request(KpRequest {
                topic,
                payload: publish.payload,
                tag,
                // A QoS 1 PUBACK waits for the extension's answer, with or without request id.
                wants_answer: publish.qos == QoS::AtLeastOnce,
            }),
            // Not a 1/KP path: answered on `<topic>/error` all the same.
            Err(e) => {
                let reason = if v5 { ReasonCode::TopicNameInvalid } else { ReasonCode::Success };
                let answer = KpResponse {
                    base: topic,
                    request_id: None,
                    tag,
                    outcome: KpOutcome::Error(KpError::not_found(e.to_string())),
                };
                Step::PubAck { answer: Some(answer), reason }
            }
        };
        let packet_id = publish.packet_id.filter(|_| publish.qos == QoS::AtLeastOnce);
        if packet_id.is_some() {
            self.unacked = self.unacked.saturating_add(1);
        }
        self.pending.push_back(Entry { packet_id, step });
    }

    /// MQTT 5 topic aliases: a PUBLISH with a topic and an alias sets it; one with an empty
    /// topic and an alias uses it.
    fn resolve_alias(&mut self, publish: &Publish) -> Result<Bytes, Violation> {
        let Some(alias) = publish.properties.topic_alias else {
            // The codec refuses an empty topic without an alias.
            return Ok(publish.topic.clone());
        };
        let index = usize::from(alias)
            .checked_sub(1)
            .filter(|_| alias <= self.limits.topic_alias_maximum)
            .ok_or(Violation::TopicAliasInvalid(alias))?;
        if self.aliases.len() <= index {
            // Rare: a client sets each alias once.
            let mut grown = std::mem::take(&mut self.aliases).into_vec();
            grown.resize(index + 1, None);
            self.aliases = grown.into_boxed_slice();
        }
        let slot = &mut self.aliases[index];
        if publish.topic.is_empty() {
            slot.clone().ok_or(Violation::TopicAliasUnknown(alias))
        } else {
            *slot = Some(publish.topic.clone());
            Ok(publish.topic.clone())
        }
    }

    /// Subscriptions are granted at most QoS 1, for the filters the gateway accepts.
    fn on_subscribe(&mut self, subscribe: Subscribe) {
        if self.is_v5() {
            // CONNACK said neither is available (MQTT 5 §3.8.3.1, §4.8.2).
            if subscribe.properties.subscription_identifier.is_some() {
                return self.violation(Violation::SubscriptionIdentifier);
            }
            if subscribe.subscriptions.iter().any(|s| s.filter.starts_with(b"$share/")) {
                return self.violation(Violation::SharedSubscription);
            }
        }
        let filters = subscribe
            .subscriptions
            .into_iter()
            .map(|s| SubscribeFilter {
                filter: s.filter,
                tag: 1 + s.options.qos.min(QoS::AtLeastOnce) as u64,
            })
            .collect();
        self.pending.push_back(Entry {
            packet_id: Some(subscribe.packet_id),
            step: Step::Subscribe(filters),
        });
    }

    fn on_unsubscribe(&mut self, unsubscribe: Unsubscribe) {
        let step = Step::Unsubscribe(unsubscribe.filters);
        self.pending.push_back(Entry { packet_id: Some(unsubscribe.packet_id), step });
    }

    /// Writes the answered entries at the front of the queue, in order. Stops at the first one
    /// still waiting for the gateway, or whose QoS 1 error answer finds the client's receive
    /// window full.
    fn flush(&mut self) {
        if !matches!(self.state, State::Connected { .. }) {
            return;
        }
        while let Some(front) = self.pending.front() {
            if !front.step.is_answered() {
                break;
            }
            if let Step::PubAck { answer: Some(answer), .. } = &front.step
                && response_qos(answer.tag) == QoS::AtLeastOnce
                && self.inflight >= self.max_inflight
            {
                break;
            }
            let Some(Entry { packet_id, step }) = self.pending.pop_front() else { break };
            self.first_id += 1;
            self.next_event = self.next_event.saturating_sub(1);
            match (step, packet_id) {
                (Step::PubAck { answer, reason }, packet_id) => {
                    if let Some(answer) = answer {
                        self.publish(&answer);
                    }
                    if let Some(packet_id) = packet_id {
                        self.unacked = self.unacked.saturating_sub(1);
                        let ack = PubAck { reason_code: reason, ..PubAck::new(packet_id) };
                        self.encode(&Packet::PubAck(ack));
                    }
                }
                (Step::SubAck(reason_codes), Some(packet_id)) => {
                    let properties = AckProperties::default();
                    self.encode(&Packet::SubAck(SubAck { packet_id, reason_codes, properties }));
                }
                (Step::UnsubAck(reason_codes), Some(packet_id)) => {
                    let properties = AckProperties::default();
                    let ack = UnsubAck { packet_id, reason_codes, properties };
                    self.encode(&Packet::UnsubAck(ack));
                }
                _ => {}
            }
        }
    }

    /// Writes a response as PUBLISH to `<base>[/<request id>]/status|error`.
    fn publish(&mut self, response: &KpResponse) {
        let qos = response_qos(response.tag);
        let packet_id = (qos == QoS::AtLeastOnce).then(|| {
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            self.next_packet_id
        });
        let error_body;
        let (suffix, payload): (&[u8], &[u8]) = match &response.outcome {
            KpOutcome::Success(payload) => (b"/status", payload),
            // Never published (see `send_response`).
            KpOutcome::Stored => return,
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
                self.stats.messages_sent += 1;
                if packet_id.is_some() {
                    self.inflight += 1;
                }
            }
            // Over the client's Maximum Packet Size: discarded as if sent (MQTT 5
            // §3.1.2.11.4). Nothing else can fail for a topic and payload from 1/KP.
            Err(_) => self.stats.messages_too_large += 1,
        }
    }

    /// Appends a packet. A control packet over the client's Maximum Packet Size is discarded
    /// as if sent (MQTT 5 §3.1.2.11.4); the packets built here cannot fail otherwise.
    fn encode(&mut self, packet: &Packet) {
        let _ = self.codec.encode(packet, &mut self.write);
    }

    /// Appends the packet `make` builds with `reason`, or with Unspecified error (0x80) when
    /// that packet type cannot carry `reason`.
    fn encode_reason(&mut self, reason: ReasonCode, make: impl Fn(ReasonCode) -> Packet) {
        if self.codec.encode(&make(reason), &mut self.write).is_err() {
            self.encode(&make(ReasonCode::UnspecifiedError));
        }
    }

    /// Refuses CONNECT with CONNACK `reason` and closes.
    fn refuse(&mut self, reason: ReasonCode) {
        let connack = ConnAck {
            session_present: false,
            reason_code: reason,
            properties: ConnAckProperties::default(),
        };
        self.encode(&Packet::ConnAck(Box::new(connack)));
        self.close_with(Close::Refused(reason));
    }

    fn violation(&mut self, violation: Violation) {
        self.close_with(Close::Violation(violation));
    }

    /// Ends the session. A connected MQTT 5 client is told why with DISCONNECT; before CONNACK
    /// only a CONNACK may say it [MQTT-3.14.0-1]: an MQTT 5 CONNECT that breaks the protocol
    /// gets one with the reason code. Answers still owed are not written any more; events
    /// already decoded are still handed out, then [`Event::Closed`].
    fn close_with(&mut self, close: Close) {
        let v5 = self.is_v5();
        match (&self.state, &close) {
            (State::Closed(_), _) => return,
            (State::Connected { .. }, Close::ClientDisconnected) => {}
            (State::Connected { .. }, close) if v5 => {
                let reason = match close {
                    Close::Violation(v) => v.reason_code(),
                    Close::KeepAliveTimeout => ReasonCode::KeepAliveTimeout,
                    Close::Local(reason) => *reason,
                    _ => ReasonCode::UnspecifiedError,
                };
                self.encode_reason(reason, |r| Packet::Disconnect(Disconnect::with_reason(r)));
            }
            (State::Connecting { .. } | State::Authenticating { .. }, Close::Violation(v))
                if v5 =>
            {
                self.encode_reason(v.reason_code(), |reason_code| {
                    let properties = ConnAckProperties::default();
                    Packet::ConnAck(Box::new(ConnAck {
                        session_present: false,
                        reason_code,
                        properties,
                    }))
                });
            }
            _ => {}
        }
        self.state = State::Closed(close);
    }
}

/// `t + d`; `None` when an `Instant` cannot hold it.
fn add(t: Instant, d: Duration) -> Option<Instant> {
    t.checked_add(d)
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
