//! The session on simulated time, without sockets: a scripted client on one side, the test
//! standing in for the gateway on the other.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::codec::{
    MAX_PACKET_SIZE, PublishProperties, SubscribeProperties, Subscription, SubscriptionOptions,
    UnsubscribeProperties, Will, WillProperties,
};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V311;
const SESSION: SessionId = SessionId(7);

/// A device talking to a session, and the clock.
struct Client {
    session: Session,
    /// The device's codec, to encode what it sends and decode what the session writes.
    codec: Codec,
    now: Instant,
}

impl Client {
    fn new(version: ProtocolVersion, config: SessionConfig) -> Self {
        let now = Instant::now();
        let mut codec = Codec::new(MAX_PACKET_SIZE);
        codec.set_version(version);
        Self { session: Session::new(&config, now), codec, now }
    }

    fn bytes(&self, packet: &Packet) -> Vec<u8> {
        let mut out = BytesMut::new();
        self.codec.encode(packet, &mut out).expect("the test's packet encodes");
        out.to_vec()
    }

    fn send(&mut self, packet: &Packet) {
        let bytes = self.bytes(packet);
        self.session.receive(&bytes, self.now);
    }

    fn publish(&mut self, topic: &str, qos: QoS, packet_id: u16) {
        self.send(&publish(topic, qos, packet_id));
    }

    /// Lets `d` pass, firing the session's timer whenever it is due, as the glue does.
    fn advance(&mut self, d: Duration) {
        let until = self.now + d;
        while let Some(due) = self.session.poll_timeout()
            && due <= until
        {
            self.now = self.now.max(due);
            self.session.handle_timeout(self.now);
            if self.session.poll_timeout() == Some(due) {
                break;
            }
        }
        self.now = until;
    }

    /// Everything the session wrote since the last call, decoded; the output is then consumed.
    fn received(&mut self) -> Vec<Packet> {
        let mut buf = BytesMut::from(self.session.transmit());
        self.session.advance_transmit(buf.len());
        let mut packets = Vec::new();
        while let Some(packet) = self.codec.decode(&mut buf).expect("the session writes valid MQTT")
        {
            packets.push(packet);
        }
        assert!(buf.is_empty(), "a partial packet in the output");
        packets
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.session.poll_event()).collect()
    }

    /// The request events, answered later by the test.
    fn requests(&mut self) -> Vec<(RequestId, KpRequest)> {
        self.events()
            .into_iter()
            .map(|e| match e {
                Event::Request { id, request } => (id, request),
                other => panic!("expected a request, got {other:?}"),
            })
            .collect()
    }

    /// The gateway takes `request` and its extension answers success (without payload): what
    /// a QoS 1 PUBACK waits for.
    fn deliver(&mut self, id: RequestId, request: &KpRequest) {
        self.session.request_done(id, Ok(()));
        self.session.send_response(answer(request, KpOutcome::Success(Bytes::new()))).unwrap();
    }

    /// Sends CONNECT, expects the Connect event, accepts it, and returns the CONNACK.
    fn connect_with(&mut self, connect: Connect) -> ConnAck {
        self.send(&Packet::Connect(Box::new(connect)));
        assert!(self.received().is_empty(), "nothing before the gateway answers");
        let events = self.events();
        assert!(matches!(events[..], [Event::Connect(_)]), "{events:?}");
        self.session.connected(Ok(ClientIdentity { session: SESSION, client_id: None }), self.now);
        match &self.received()[..] {
            [Packet::ConnAck(c)] => (**c).clone(),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn connect(&mut self) -> ConnAck {
        let version = self.codec.version().expect("set in new");
        self.connect_with(connect(version, "dev-1", 0))
    }

    fn closed(&mut self) -> Close {
        match &self.events()[..] {
            [Event::Closed(close)] => close.clone(),
            other => panic!("expected Closed, got {other:?}"),
        }
    }

    fn expect_disconnect(&mut self, reason: ReasonCode) {
        match &self.received()[..] {
            [Packet::Disconnect(d)] => assert_eq!(d.reason_code, reason),
            other => panic!("expected DISCONNECT {reason:?}, got {other:?}"),
        }
        assert!(self.session.is_closed());
    }
}

/// The extension's answer to `request`, as the gateway routes it back: its base, request id and
/// tag.
fn answer(request: &KpRequest, outcome: KpOutcome) -> KpResponse {
    KpResponse {
        base: request.topic.base(),
        request_id: request.topic.request_id(),
        tag: request.tag,
        outcome,
    }
}

fn connected(version: ProtocolVersion, config: SessionConfig) -> Client {
    let mut client = Client::new(version, config);
    client.connect();
    client
}

fn connect(version: ProtocolVersion, client_id: &str, keep_alive_secs: u16) -> Connect {
    Connect {
        protocol_version: version,
        clean_start: true,
        keep_alive_secs,
        client_id: Bytes::copy_from_slice(client_id.as_bytes()),
        will: None,
        username: None,
        password: None,
        properties: Default::default(),
    }
}

fn publish(topic: &str, qos: QoS, packet_id: u16) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        packet_id: (qos != QoS::AtMostOnce).then_some(packet_id),
        properties: PublishProperties::default(),
        payload: Bytes::from_static(b"[1]"),
    })
}

fn response(tag: u64, request_id: Option<u32>, outcome: KpOutcome) -> KpResponse {
    KpResponse { base: Bytes::from_static(b"kp1/a/dcx/t/json"), request_id, tag, outcome }
}

fn push() -> KpResponse {
    response(0, None, KpOutcome::Success(Bytes::from_static(b"{}")))
}

fn topic(p: &Packet) -> &str {
    match p {
        Packet::Publish(p) => std::str::from_utf8(&p.topic).unwrap(),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

fn puback_id(p: &Packet) -> u16 {
    match p {
        Packet::PubAck(a) => a.packet_id,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

// ----- CONNECT ----------------------------------------------------------------------------

#[test]
fn mqtt5_connack_announces_the_limits() {
    let config = SessionConfig { max_packet_size: 4096, ..SessionConfig::default() };
    let mut client = Client::new(V5, config);
    let mut c = connect(V5, "", 60);
    c.properties.session_expiry_interval = Some(300);
    c.username = Some(Bytes::from_static(b"user"));
    c.password = Some(Bytes::from_static(b"\x00secret"));
    client.send(&Packet::Connect(Box::new(c)));
    let Some(Event::Connect(request)) = client.session.poll_event() else { panic!() };
    assert_eq!((request.client_id(), request.username()), ("", Some("user")));
    assert_eq!(request.password(), Some(&b"\x00secret"[..]));
    assert!(client.session.poll_event().is_none());
    client.session.connected(Ok(ClientIdentity { session: SESSION, client_id: None }), client.now);
    let [Packet::ConnAck(connack)] = &client.received()[..] else { panic!() };
    assert_eq!(connack.reason_code, ReasonCode::Success);
    let p = &connack.properties;
    assert_eq!(p.receive_maximum, Some(1024));
    assert_eq!(p.maximum_qos, Some(QoS::AtLeastOnce));
    assert_eq!(p.retain_available, Some(false));
    assert_eq!(p.maximum_packet_size, Some(4096));
    assert_eq!(p.topic_alias_maximum, Some(64));
    assert_eq!(p.wildcard_subscription_available, Some(true));
    assert_eq!(p.subscription_identifiers_available, Some(false));
    assert_eq!(p.shared_subscription_available, Some(false));
    assert_eq!(p.session_expiry_interval, Some(0), "no session outlives the connection");
    assert_eq!(p.server_keep_alive, None, "the keep-alive asked for is granted");
    assert_eq!(p.assigned_client_identifier.as_deref(), Some(&b"fleetgate-7"[..]));
    assert_eq!(client.session.session_id(), Some(SESSION));
}

#[test]
fn mqtt311_connack_is_plain() {
    let mut client = Client::new(V311, SessionConfig::default());
    let connack = client.connect();
    assert_eq!(connack.reason_code, ReasonCode::Success);
    assert_eq!(connack.properties, ConnAckProperties::default());
}

#[test]
fn the_gateways_refusal_is_a_connack_code() {
    for (version, status, reason) in [
        (V5, 401, ReasonCode::BadUserNameOrPassword),
        (V5, 403, ReasonCode::NotAuthorized),
        (V5, 503, ReasonCode::ServerUnavailable),
        (V311, 401, ReasonCode::BadUserNameOrPassword),
        (V311, 504, ReasonCode::ServerUnavailable),
    ] {
        let mut client = Client::new(version, SessionConfig::default());
        client.send(&Packet::Connect(Box::new(connect(version, "d", 0))));
        assert!(matches!(client.events()[..], [Event::Connect(_)]));
        client.session.connected(Err(KpError::new(status, "no")), client.now);
        let [Packet::ConnAck(connack)] = &client.received()[..] else { panic!() };
        assert_eq!(connack.reason_code, reason, "{version:?} {status}");
        let close = client.closed();
        assert_eq!(close, Close::Refused(reason));
        assert!(close.is_refusal());
        assert_eq!(client.session.session_id(), None);
        assert_eq!(client.session.poll_timeout(), None);
    }
}

#[test]
fn connect_times_out_waiting_for_connect_or_for_the_gateway() {
    let config = SessionConfig { connect_timeout: Duration::from_secs(10), ..Default::default() };
    let mut client = Client::new(V311, config);
    let deadline = client.now + Duration::from_secs(10);
    assert_eq!(client.session.poll_timeout(), Some(deadline));
    client.advance(Duration::from_millis(9_999));
    assert!(client.events().is_empty());
    // Bytes that are not yet a CONNECT do not move the deadline.
    client.session.receive(b"\x10", client.now);
    client.advance(Duration::from_millis(1));
    assert_eq!(client.closed(), Close::ConnectTimeout);
    assert!(client.received().is_empty(), "nothing is sent before CONNACK");

    // The gateway's authentication counts against the same deadline.
    let mut client = Client::new(V5, config);
    let deadline = client.now + Duration::from_secs(10);
    client.advance(Duration::from_secs(4));
    client.send(&Packet::Connect(Box::new(connect(V5, "d", 0))));
    assert!(matches!(client.events()[..], [Event::Connect(_)]));
    assert_eq!(client.session.poll_timeout(), Some(deadline));
    client.advance(Duration::from_secs(6));
    assert_eq!(client.closed(), Close::ConnectTimeout);
    // A late answer changes nothing.
    client.session.connected(Ok(ClientIdentity { session: SESSION, client_id: None }), client.now);
    assert!(client.received().is_empty());
    assert_eq!(client.session.session_id(), None);
}

#[test]
fn an_unsupported_protocol_level_gets_a_3_1_1_connack_code_1() {
    for connect in [
        &b"\x10\x0f\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x01a"[..],
        &b"\x10\x0d\x00\x04MQTT\x06\x02\x00\x3c\x00\x01a"[..],
    ] {
        let mut session = Session::new(&SessionConfig::default(), Instant::now());
        session.receive(connect, Instant::now());
        assert_eq!(session.transmit(), b"\x20\x02\x00\x01");
        let Some(Event::Closed(close)) = session.poll_event() else { panic!() };
        assert_eq!(close, Close::Refused(ReasonCode::UnsupportedProtocolVersion));
    }
}

#[test]
fn a_malformed_mqtt5_connect_gets_a_connack_never_a_disconnect() {
    // Level 5, then connect flags with the reserved bit set.
    let mut session = Session::new(&SessionConfig::default(), Instant::now());
    session.receive(b"\x10\x0e\x00\x04MQTT\x05\x03\x00\x3c\x00\x00\x01a", Instant::now());
    let mut codec = Codec::new(MAX_PACKET_SIZE);
    codec.set_version(V5);
    let mut out = BytesMut::from(session.transmit());
    let Ok(Some(Packet::ConnAck(connack))) = codec.decode(&mut out) else { panic!() };
    assert_eq!(connack.reason_code, ReasonCode::MalformedPacket);
    assert!(out.is_empty());
    let Some(Event::Closed(close)) = session.poll_event() else { panic!() };
    assert!(close.is_protocol_error());

    // MQTT 3.1.1 has no code for it: the connection just closes.
    let mut session = Session::new(&SessionConfig::default(), Instant::now());
    session.receive(b"\x10\x0d\x00\x04MQTT\x04\x03\x00\x3c\x00\x01a", Instant::now());
    assert!(session.transmit().is_empty());
    assert!(session.is_closed());
}

#[test]
fn connect_refusals_the_session_makes_itself() {
    // Enhanced authentication.
    let mut client = Client::new(V5, SessionConfig::default());
    let mut c = connect(V5, "d", 0);
    c.properties.authentication_method = Some(Bytes::from_static(b"SCRAM-SHA-1"));
    client.send(&Packet::Connect(Box::new(c)));
    let [Packet::ConnAck(connack)] = &client.received()[..] else { panic!() };
    assert_eq!(connack.reason_code, ReasonCode::BadAuthenticationMethod);
    assert_eq!(client.closed(), Close::Refused(ReasonCode::BadAuthenticationMethod));

    // 3.1.1: an empty client id needs a clean session (code 2); MQTT 5 assigns one.
    let mut client = Client::new(V311, SessionConfig::default());
    let mut c = connect(V311, "", 0);
    c.clean_start = false;
    client.send(&Packet::Connect(Box::new(c)));
    let [Packet::ConnAck(connack)] = &client.received()[..] else { panic!() };
    assert_eq!(connack.reason_code, ReasonCode::ClientIdentifierNotValid);
    assert_eq!(client.closed(), Close::Refused(ReasonCode::ClientIdentifierNotValid));
    let mut client = Client::new(V5, SessionConfig::default());
    let mut c = connect(V5, "", 0);
    c.clean_start = false;
    assert_eq!(client.connect_with(c).reason_code, ReasonCode::Success);
}

fn will(qos: QoS, retain: bool) -> Will {
    Will {
        topic: Bytes::from_static(b"last/words"),
        payload: Bytes::from_static(b"bye"),
        qos,
        retain,
        properties: WillProperties::default(),
    }
}

/// [MQTT-3.2.2-12/13]: CONNACK says QoS 1 at most and no retain, so an MQTT 5 will that
/// needs either is refused. 3.1.1 has no such code (and allows will QoS 2): accepted.
#[test]
fn an_mqtt5_will_beyond_what_connack_offers_is_refused() {
    for (qos, retain, reason) in [
        (QoS::ExactlyOnce, false, ReasonCode::QoSNotSupported),
        (QoS::AtLeastOnce, true, ReasonCode::RetainNotSupported),
    ] {
        let mut client = Client::new(V5, SessionConfig::default());
        let mut c = connect(V5, "d", 0);
        c.will = Some(will(qos, retain));
        client.send(&Packet::Connect(Box::new(c)));
        let [Packet::ConnAck(connack)] = &client.received()[..] else { panic!() };
        assert_eq!(connack.reason_code, reason);
        assert_eq!(client.closed(), Close::Refused(reason));
    }
    let mut client = Client::new(V5, SessionConfig::default());
    let mut c = connect(V5, "d", 0);
    c.will = Some(will(QoS::AtLeastOnce, false));
    assert_eq!(client.connect_with(c).reason_code, ReasonCode::Success);

    let mut client = Client::new(V311, SessionConfig::default());
    let mut c = connect(V311, "d", 0);
    c.will = Some(will(QoS::ExactlyOnce, true));
    assert_eq!(client.connect_with(c).reason_code, ReasonCode::Success);
}

#[test]
fn packets_sent_right_after_connect_wait_for_the_gateways_answer() {
    let mut client = Client::new(V311, SessionConfig::default());
    let mut bytes = client.bytes(&Packet::Connect(Box::new(connect(V311, "d", 0))));
    bytes.extend(client.bytes(&publish("kp1/a/dcx/t/json", QoS::AtLeastOnce, 1)));
    client.session.receive(&bytes, client.now);
    assert!(matches!(client.events()[..], [Event::Connect(_)]));
    assert!(!client.session.wants_input(), "no reading while the gateway authenticates");
    client.session.connected(Ok(ClientIdentity { session: SESSION, client_id: None }), client.now);
    let requests = client.requests();
    assert_eq!(requests.len(), 1);
    client.deliver(requests[0].0, &requests[0].1);
    let packets = client.received();
    assert!(matches!(&packets[..], [Packet::ConnAck(_), Packet::PubAck(a)] if a.packet_id == 1));
}

// ----- keep-alive -------------------------------------------------------------------------

#[test]
fn keep_alive_expires_after_one_and_a_half_times_the_interval() {
    for version in [V5, V311] {
        let mut client = Client::new(version, SessionConfig::default());
        client.connect_with(connect(version, "d", 10));
        client.advance(Duration::from_millis(14_999));
        assert!(!client.session.is_closed());
        client.advance(Duration::from_millis(1));
        if version == V5 {
            client.expect_disconnect(ReasonCode::KeepAliveTimeout);
        } else {
            assert!(client.received().is_empty(), "3.1.1 just closes");
        }
        assert_eq!(client.closed(), Close::KeepAliveTimeout);
    }
}

#[test]
fn any_packet_or_part_of_one_keeps_the_connection_alive() {
    let mut client = Client::new(V5, SessionConfig::default());
    client.connect_with(connect(V5, "d", 10));
    client.advance(Duration::from_secs(14));
    client.send(&Packet::PingReq);
    assert!(matches!(client.received()[..], [Packet::PingResp]));
    client.advance(Duration::from_secs(14));
    client.send(&Packet::PubAck(PubAck::new(9)));
    client.advance(Duration::from_secs(14));
    client.publish("kp1/a/dcx/t/json", QoS::AtMostOnce, 0);
    client.events();
    client.advance(Duration::from_secs(14));
    // The first byte of a packet whose rest is slow to come.
    client.session.receive(b"\xc0", client.now);
    client.advance(Duration::from_secs(14));
    assert!(!client.session.is_closed());
    client.advance(Duration::from_secs(1));
    client.expect_disconnect(ReasonCode::KeepAliveTimeout);
}

#[test]
fn max_keep_alive_caps_what_mqtt5_clients_get() {
    let config = SessionConfig { max_keep_alive_secs: 30, ..Default::default() };
    for (asked, granted) in [(0, Some(30)), (100, Some(30)), (20, None)] {
        let mut client = Client::new(V5, config);
        let connack = client.connect_with(connect(V5, "d", asked));
        assert_eq!(connack.properties.server_keep_alive, granted, "asked {asked}");
        let expires = u64::from(granted.unwrap_or(asked)) * 1500;
        client.advance(Duration::from_millis(expires - 1));
        assert!(!client.session.is_closed());
        client.advance(Duration::from_millis(1));
        client.expect_disconnect(ReasonCode::KeepAliveTimeout);
    }
}

/// 3.1.1 has no way to tell the client, so the cap is the server's own idle timeout: a client
/// asking for more, or for none, is closed after 1.5 times the cap without a packet (issue 15:
/// keep-alive 0 held a connection forever).
#[test]
fn max_keep_alive_is_the_idle_timeout_of_mqtt311_clients() {
    let config = SessionConfig { max_keep_alive_secs: 30, ..Default::default() };
    for (asked, expires_ms) in [(0, 45_000), (100, 45_000), (20, 30_000)] {
        let mut client = Client::new(V311, config);
        let connack = client.connect_with(connect(V311, "d", asked));
        assert_eq!(connack.properties.server_keep_alive, None, "3.1.1 cannot be told");
        client.advance(Duration::from_millis(expires_ms - 1));
        assert!(!client.session.is_closed(), "asked {asked}");
        client.advance(Duration::from_millis(1));
        assert_eq!(client.closed(), Close::KeepAliveTimeout, "asked {asked}");
    }
}

#[test]
fn without_a_keep_alive_cap_nothing_is_due_once_buffers_are_back() {
    let config = SessionConfig { max_keep_alive_secs: 0, ..Default::default() };
    let mut client = connected(V311, config);
    assert_eq!(client.session.poll_timeout(), None);
    client.advance(Duration::from_secs(86_400));
    assert!(!client.session.is_closed());
}

#[test]
fn by_default_keep_alive_zero_is_capped() {
    let mut client = connected(V311, SessionConfig::default());
    let due = client.session.poll_timeout().expect("a deadline");
    assert!(due <= client.now + Duration::from_secs(1800), "{due:?}");
    client.advance(Duration::from_secs(1800));
    assert_eq!(client.closed(), Close::KeepAliveTimeout);
}

// ----- limits before CONNECT --------------------------------------------------------------

/// A peer that has proven nothing may make the session buffer one small packet: a CONNECT
/// over `max_connect_packet_size` is refused from its fixed header, before its body comes.
#[test]
fn a_big_first_packet_closes_before_its_body_is_read() {
    let config = SessionConfig { max_connect_packet_size: 256, ..Default::default() };
    for version in [V5, V311] {
        let mut client = Client::new(version, config);
        let mut big = connect(version, "d", 60);
        big.username = Some(Bytes::from_static(b"u"));
        big.password = Some(Bytes::from(vec![b'x'; 300]));
        let bytes = client.bytes(&Packet::Connect(Box::new(big)));
        // The fixed header alone is enough.
        client.session.receive(&bytes[..4], client.now);
        assert!(client.session.is_closed(), "{version:?}");
        assert!(matches!(client.closed(), Close::Violation(Violation::Malformed(_))));
    }
    // Once connected, the packet size limit is the larger one.
    let mut client = connected(V311, config);
    client.publish("kp1/a/dcx/t/json", QoS::AtMostOnce, 0);
    client.send(&publish_with_payload("kp1/a/dcx/t/json", 1000));
    assert!(!client.session.is_closed());
    assert_eq!(client.requests().len(), 2);
}

fn publish_with_payload(topic: &str, size: usize) -> Packet {
    match publish(topic, QoS::AtMostOnce, 0) {
        Packet::Publish(mut p) => {
            p.payload = Bytes::from(vec![b'p'; size]);
            Packet::Publish(p)
        }
        other => other,
    }
}

// ----- rate limits ------------------------------------------------------------------------

/// Over `max_messages_per_sec` the session stops decoding and asks for no input until the
/// rate allows the next packet: nothing is refused or lost, the client is only slowed down.
#[test]
fn the_message_rate_limit_pauses_decoding_without_losing_anything() {
    let config = SessionConfig { max_messages_per_sec: 10, ..Default::default() };
    for version in [V5, V311] {
        let mut client = connected(version, config);
        for _ in 0..25 {
            client.publish("kp1/a/dcx/t/json", QoS::AtMostOnce, 0);
        }
        // A second's worth at once, then nothing until the bucket refills.
        assert_eq!(client.requests().len(), 10);
        assert!(!client.session.wants_input());
        assert!(client.session.is_throttled());
        let resume = client.session.poll_timeout().expect("a resume time");
        assert!(resume <= client.now + Duration::from_millis(100), "{version:?}");
        client.advance(Duration::from_millis(500));
        assert_eq!(client.requests().len(), 5);
        client.advance(Duration::from_secs(2));
        assert_eq!(client.requests().len(), 10);
        assert!(client.session.wants_input());
        assert!(!client.session.is_closed());
        assert!(client.received().is_empty(), "{version:?}: nothing refused");
    }
}

#[test]
fn the_byte_rate_limit_pauses_decoding_too() {
    let config = SessionConfig { max_bytes_per_sec: 2000, ..Default::default() };
    let mut client = connected(V311, config);
    for _ in 0..5 {
        client.send(&publish_with_payload("kp1/a/dcx/t/json", 1000));
    }
    assert_eq!(client.requests().len(), 2, "2000 bytes a second, about 1 KB each");
    client.advance(Duration::from_secs(3));
    assert_eq!(client.requests().len(), 3);
}

#[test]
fn a_throttled_pause_is_not_the_clients_silence() {
    let config = SessionConfig { max_messages_per_sec: 1, ..Default::default() };
    let mut client = Client::new(V311, config);
    client.connect_with(connect(V311, "d", 2));
    for _ in 0..4 {
        client.publish("kp1/a/dcx/t/json", QoS::AtMostOnce, 0);
    }
    // Keep-alive 2 s expires after 3 s of silence; the session reads the last of these only
    // after 3 s, and the client was never silent.
    client.advance(Duration::from_millis(3100));
    assert!(!client.session.is_closed());
    assert_eq!(client.requests().len(), 4);
}

// ----- idle buffers -----------------------------------------------------------------------

fn holds_buffers(session: &Session) -> bool {
    session.read.capacity() > 0 || session.write.capacity() > 0 || session.pending.capacity() > 0
}

#[test]
fn idle_connections_give_their_buffers_back() {
    let mut client = Client::new(V311, SessionConfig::default());
    client.connect_with(connect(V311, "d", 60));
    assert!(!holds_buffers(&client.session), "nothing held once CONNACK is written");

    // Traffic the way the glue reads it: into a reserved buffer.
    client.advance(Duration::from_secs(5));
    let bytes = client.bytes(&publish("kp1/a/dcx/t/json/1", QoS::AtLeastOnce, 1));
    client.session.read_buffer().reserve(2048);
    client.session.read_buffer().extend_from_slice(&bytes);
    client.session.handle_input(client.now);
    let requests = client.requests();
    client.deliver(requests[0].0, &requests[0].1);
    // The answer to a request with an id, then its PUBACK.
    assert_eq!(client.received().len(), 2);
    assert!(holds_buffers(&client.session));
    let release = client.now + IDLE_RELEASE;
    assert_eq!(client.session.poll_timeout(), Some(release), "before the keep-alive's 90 s");
    client.advance(IDLE_RELEASE - Duration::from_millis(1));
    assert!(holds_buffers(&client.session));
    client.advance(Duration::from_millis(1));
    assert!(!holds_buffers(&client.session));
    assert!(!client.session.is_closed());
    assert_eq!(
        client.session.poll_timeout(),
        Some(release - IDLE_RELEASE + Duration::from_secs(90))
    );
}

#[test]
fn a_partial_packet_is_kept_and_does_not_make_the_timer_spin() {
    let config = SessionConfig { max_keep_alive_secs: 0, ..Default::default() };
    let mut client = connected(V311, config);
    let bytes = client.bytes(&publish("kp1/a/dcx/t/json/1", QoS::AtMostOnce, 0));
    let (head, tail) = bytes.split_at(5);
    client.session.receive(head, client.now);
    client.advance(Duration::from_secs(10));
    // No keep-alive and nothing to give back: nothing is due, certainly not in the past.
    assert_eq!(client.session.poll_timeout(), None);
    assert_eq!(client.session.read.len(), 5);
    client.session.receive(tail, client.now);
    assert_eq!(client.requests().len(), 1);
}

// ----- requests and acknowledgements ------------------------------------------------------

#[test]
fn pubacks_leave_in_arrival_order_whatever_order_requests_complete_in() {
    let mut client = connected(V5, SessionConfig::default());
    for id in [10, 11, 12] {
        client.publish(&format!("kp1/a/dcx/t/json/{id}"), QoS::AtLeastOnce, id);
    }
    let requests = client.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[0].1.tag & 3, 2, "the low bits of a tag are 1 + QoS");
    assert!(requests.iter().all(|(_, r)| r.wants_answer), "QoS 1 waits for the answer");
    client.deliver(requests[2].0, &requests[2].1);
    assert!(client.received().is_empty(), "12 waits for 10 and 11");
    client.deliver(requests[0].0, &requests[0].1);
    let packets = client.received();
    assert_eq!(topic(&packets[0]), "kp1/a/dcx/t/json/10/status");
    assert_eq!(puback_id(&packets[1]), 10);
    client.session.request_done(requests[1].0, Err(KpError::forbidden("no")));
    let packets = client.received();
    assert_eq!(packets.len(), 4);
    assert_eq!(topic(&packets[0]), "kp1/a/dcx/t/json/11/error", "the error before its PUBACK");
    assert_eq!(puback_id(&packets[1]), 11);
    let Packet::PubAck(refused) = &packets[1] else { panic!() };
    assert_eq!(refused.reason_code, ReasonCode::NotAuthorized, "MQTT 5: a negative PUBACK");
    assert_eq!(topic(&packets[2]), "kp1/a/dcx/t/json/12/status");
    assert_eq!(puback_id(&packets[3]), 12);
    // An answer for an id already answered, or never handed out, is ignored.
    client.session.request_done(requests[1].0, Err(KpError::forbidden("again")));
    client.session.request_done(RequestId(99), Ok(()));
    assert!(client.received().is_empty());
}

#[test]
fn a_refused_qos0_request_gets_its_error_at_qos0_and_no_ack() {
    let mut client = connected(V311, SessionConfig::default());
    client.publish("kp1/a/dcx/t/json", QoS::AtMostOnce, 0);
    let requests = client.requests();
    assert_eq!(requests[0].1.tag & 3, 1);
    assert!(!requests[0].1.wants_answer, "QoS 0 waits for nothing");
    client.session.request_done(requests[0].0, Err(KpError::unauthorized("bad token")));
    let [Packet::Publish(p)] = &client.received()[..] else { panic!() };
    assert_eq!(&p.topic[..], b"kp1/a/dcx/t/json/error");
    assert_eq!(p.qos, QoS::AtMostOnce);
    assert_eq!(&p.payload[..], br#"{"statusCode":401,"reasonPhrase":"bad token"}"#);
}

#[test]
fn topics_that_are_not_kp1_are_answered_404_on_their_error_topic() {
    let mut client = connected(V311, SessionConfig::default());
    client.publish("sensors/7", QoS::AtLeastOnce, 3);
    assert!(client.events().is_empty(), "nothing for the gateway");
    let packets = client.received();
    let Packet::Publish(p) = &packets[0] else { panic!() };
    assert_eq!(&p.topic[..], b"sensors/7/error");
    assert_eq!(p.qos, QoS::AtLeastOnce, "the request's QoS");
    assert!(p.payload.starts_with(br#"{"statusCode":404,"#));
    assert_eq!(puback_id(&packets[1]), 3);
}

#[test]
fn responses_go_to_their_status_or_error_topic_at_the_requests_qos() {
    let mut client = connected(V5, SessionConfig::default());
    let ok = KpOutcome::Success(Bytes::from_static(b"[1]"));
    client.session.send_response(response(1, Some(42), ok.clone())).unwrap();
    client.session.send_response(response(2, Some(7), ok)).unwrap();
    let error = KpOutcome::Error(KpError::timeout("slow"));
    client.session.send_response(response(2, None, error)).unwrap();
    client.session.send_response(push()).unwrap();
    let packets = client.received();
    let published: Vec<_> = packets
        .iter()
        .map(|p| match p {
            Packet::Publish(p) => (std::str::from_utf8(&p.topic).unwrap(), p.qos),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        published,
        [
            ("kp1/a/dcx/t/json/42/status", QoS::AtMostOnce),
            ("kp1/a/dcx/t/json/7/status", QoS::AtLeastOnce),
            ("kp1/a/dcx/t/json/error", QoS::AtLeastOnce),
            ("kp1/a/dcx/t/json/status", QoS::AtLeastOnce),
        ]
    );
    assert_eq!(client.session.take_stats().messages_sent, 4);
}

#[test]
fn request_ids_format() {
    let mut buf = [0u8; 11];
    assert_eq!(format_request_id(42, &mut buf), b"/42");
    assert_eq!(format_request_id(0, &mut buf), b"/0");
    assert_eq!(format_request_id(u32::MAX, &mut buf), b"/4294967295");
}

// ----- receive maximum --------------------------------------------------------------------

#[test]
fn the_clients_receive_maximum_limits_our_qos1_publishes() {
    let mut client = Client::new(V5, SessionConfig::default());
    let mut c = connect(V5, "d", 0);
    c.properties.receive_maximum = Some(2);
    client.connect_with(c);
    assert!(client.session.wants_responses());
    client.session.send_response(push()).unwrap();
    client.session.send_response(push()).unwrap();
    assert!(!client.session.wants_responses());
    let refused = client.session.send_response(push()).unwrap_err();
    assert_eq!(refused, push(), "given back, not dropped");
    // QoS 0 does not count against the window.
    client.session.send_response(response(1, None, KpOutcome::Success(Bytes::new()))).unwrap();
    let ids: Vec<u16> = client
        .received()
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => p.packet_id,
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 2);
    client.send(&Packet::PubAck(PubAck::new(ids[0])));
    assert!(client.session.wants_responses());
    client.session.send_response(push()).unwrap();
    assert!(!client.session.wants_responses());
}

#[test]
fn mqtt311_clients_get_max_inflight_v311() {
    let config = SessionConfig { max_inflight_v311: 1, ..Default::default() };
    let mut client = connected(V311, config);
    client.session.send_response(push()).unwrap();
    assert!(!client.session.wants_responses());
    let [Packet::Publish(p)] = &client.received()[..] else { panic!() };
    client.send(&Packet::PubAck(PubAck::new(p.packet_id.unwrap())));
    assert!(client.session.wants_responses());
}

/// [MQTT-3.3.4-9]: every unacknowledged QoS 1 PUBLISH we send counts, the error answers the
/// session makes itself included (a topic that is not 1/KP, a refusal by the gateway). Each
/// waits for room, and its PUBACK waits behind it.
#[test]
fn error_answers_wait_for_the_clients_receive_window() {
    for version in [V5, V311] {
        let config = SessionConfig { max_inflight_v311: 1, ..Default::default() };
        let mut client = Client::new(version, config);
        let mut c = connect(version, "d", 0);
        c.properties.receive_maximum = Some(1);
        client.connect_with(c);
        client.session.send_response(push()).unwrap();
        let [Packet::Publish(first)] = &client.received()[..] else { panic!() };
        let first = first.packet_id.unwrap();

        // The window is full: neither the 404 answer nor the refusal may go out yet.
        client.publish("not/kp1", QoS::AtLeastOnce, 1);
        client.publish("kp1/a/dcx/t/json/5", QoS::AtLeastOnce, 2);
        let requests = client.requests();
        client.session.request_done(requests[0].0, Err(KpError::unauthorized("bad token")));
        assert!(client.received().is_empty(), "{version:?}: everything waits for the window");
        assert!(!client.session.wants_responses());

        client.send(&Packet::PubAck(PubAck::new(first)));
        let packets = client.received();
        assert_eq!(packets.len(), 2, "{version:?}: {packets:?}");
        assert_eq!(topic(&packets[0]), "not/kp1/error");
        assert_eq!(puback_id(&packets[1]), 1);
        let Packet::Publish(answer) = &packets[0] else { panic!() };

        client.send(&Packet::PubAck(PubAck::new(answer.packet_id.unwrap())));
        let packets = client.received();
        assert_eq!(topic(&packets[0]), "kp1/a/dcx/t/json/5/error");
        assert_eq!(puback_id(&packets[1]), 2);
    }
}

#[test]
fn a_qos0_error_answer_does_not_wait_for_the_window() {
    let mut client = Client::new(V5, SessionConfig::default());
    let mut c = connect(V5, "d", 0);
    c.properties.receive_maximum = Some(1);
    client.connect_with(c);
    client.session.send_response(push()).unwrap();
    client.received();
    client.publish("not/kp1", QoS::AtMostOnce, 0);
    assert_eq!(topic(&client.received()[0]), "not/kp1/error");
}

#[test]
fn our_receive_maximum_is_enforced_on_mqtt5_clients() {
    let config = SessionConfig { receive_maximum: 2, ..Default::default() };
    let mut client = connected(V5, config);
    client.publish("kp1/a/dcx/t/json", QoS::AtLeastOnce, 1);
    client.publish("kp1/a/dcx/t/json", QoS::AtLeastOnce, 2);
    let requests = client.requests();
    client.deliver(requests[0].0, &requests[0].1);
    // One acknowledged: room for one more, not two.
    client.publish("kp1/a/dcx/t/json", QoS::AtLeastOnce, 3);
    assert_eq!(client.requests().len(), 1);
    client.publish("kp1/a/dcx/t/json", QoS::AtLeastOnce, 4);
    let packets = client.received();
    assert_eq!(puback_id(&packets[0]), 1);
    let Packet::Disconnect(d) = &packets[1] else { panic!("{packets:?}") };
    assert_eq!(d.reason_code, ReasonCode::ReceiveMaximumExceeded);
    assert_eq!(client.closed(), Close::Violation(Violation::ReceiveMaximumExceeded(2)));
}

#[test]
fn decoding_stops_while_the_gateway_is_behind() {
    let config = SessionConfig { receive_maximum: 2, ..Default::default() };
    let mut client = connected(V311, config);
    let mut bytes = Vec::new();
    for id in 1..=6 {
        bytes.extend(client.bytes(&publish(&format!("kp1/a/dcx/t/json/{id}"), QoS::AtMostOnce, 0)));
    }
    client.session.receive(&bytes, client.now);
    // Receive maximum + 1 requests decoded; the rest stays in the read buffer.
    let requests = client.requests();
    assert_eq!(requests.len(), 3);
    assert!(!client.session.wants_input());
    assert!(!client.session.read.is_empty());
    // Room is used at once, from what is buffered, without waiting for more input.
    client.session.request_done(requests[0].0, Ok(()));
    let more = client.requests();
    assert_eq!(more.len(), 1);
    assert_eq!(more[0].1.topic.request_id(), Some(4));
    for (id, _) in requests.into_iter().skip(1).chain(more) {
        client.session.request_done(id, Ok(()));
    }
    assert_eq!(client.requests().len(), 2);
    assert!(client.session.read.is_empty());
    assert!(client.session.wants_input());
}

// ----- topic aliases ----------------------------------------------------------------------

fn aliased(topic: &str, alias: u16) -> Packet {
    let mut p = publish(topic, QoS::AtMostOnce, 0);
    if let Packet::Publish(p) = &mut p {
        p.properties.topic_alias = Some(alias);
    }
    p
}

#[test]
fn topic_aliases_are_set_and_used() {
    let mut client = connected(V5, SessionConfig::default());
    client.send(&aliased("kp1/a/dcx/t/json/1", 3));
    client.send(&aliased("", 3));
    let requests = client.requests();
    let topics: Vec<_> = requests.iter().map(|(_, r)| r.topic.base()).collect();
    assert_eq!(topics, [&b"kp1/a/dcx/t/json"[..]; 2]);
    assert_eq!(client.session.aliases.len(), 3, "grown to the highest alias used");
}

#[test]
fn a_topic_alias_out_of_range_or_unset_closes_the_connection() {
    let config = SessionConfig { topic_alias_maximum: 4, ..Default::default() };
    let mut client = connected(V5, config);
    client.send(&aliased("kp1/a/dcx/t/json", 5));
    client.expect_disconnect(ReasonCode::TopicAliasInvalid);
    assert!(client.closed().is_protocol_error());

    let mut client = connected(V5, config);
    client.send(&aliased("", 2));
    client.expect_disconnect(ReasonCode::ProtocolError);
    assert_eq!(client.closed(), Close::Violation(Violation::TopicAliasUnknown(2)));
}

// ----- what fleetgate does not do ---------------------------------------------------------

#[test]
fn qos2_is_refused() {
    let mut client = connected(V5, SessionConfig::default());
    client.publish("kp1/a/dcx/t/json", QoS::ExactlyOnce, 1);
    client.expect_disconnect(ReasonCode::QoSNotSupported);
    assert_eq!(client.closed(), Close::Violation(Violation::QoS2));

    // 3.1.1 cannot refuse it: the connection closes.
    let mut client = connected(V311, SessionConfig::default());
    client.publish("kp1/a/dcx/t/json", QoS::ExactlyOnce, 1);
    assert!(client.received().is_empty());
    assert_eq!(client.closed(), Close::Violation(Violation::QoS2));
}

#[test]
fn retain_is_refused_on_mqtt5_and_ignored_on_3_1_1() {
    for version in [V5, V311] {
        let mut client = connected(version, SessionConfig::default());
        let mut p = publish("kp1/a/dcx/t/json", QoS::AtMostOnce, 0);
        if let Packet::Publish(p) = &mut p {
            p.retain = true;
        }
        client.send(&p);
        if version == V5 {
            client.expect_disconnect(ReasonCode::RetainNotSupported);
        } else {
            assert_eq!(client.requests().len(), 1);
        }
    }
}

#[test]
fn qos2_acknowledgements_and_auth_close_the_connection() {
    let mut client = connected(V5, SessionConfig::default());
    client.send(&Packet::PubRel(PubAck::new(1)));
    client.expect_disconnect(ReasonCode::ProtocolError);
    let mut client = connected(V5, SessionConfig::default());
    let auth = crate::codec::Auth {
        reason_code: ReasonCode::ReAuthenticate,
        properties: Default::default(),
    };
    client.send(&Packet::Auth(auth));
    client.expect_disconnect(ReasonCode::ProtocolError);
    assert_eq!(client.closed(), Close::Violation(Violation::Auth));
}

// ----- SUBSCRIBE and UNSUBSCRIBE ----------------------------------------------------------

fn subscribe(filters: &[(&str, QoS)]) -> Subscribe {
    Subscribe {
        packet_id: 5,
        subscriptions: filters
            .iter()
            .map(|(f, qos)| Subscription {
                filter: Bytes::copy_from_slice(f.as_bytes()),
                options: SubscriptionOptions::new(*qos),
            })
            .collect(),
        properties: SubscribeProperties::default(),
    }
}

#[test]
fn subscriptions_are_granted_at_most_qos1_as_the_gateway_decides() {
    for version in [V5, V311] {
        let mut client = connected(version, SessionConfig::default());
        let filters = [
            ("kp1/a/cmx/t/config/json/#", QoS::AtMostOnce),
            ("kp1/a/dcx/+/json", QoS::AtLeastOnce),
            ("kp1/a/cmx/t/#", QoS::ExactlyOnce),
        ];
        client.send(&Packet::Subscribe(subscribe(&filters)));
        let [Event::Subscribe { id, filters }] = &client.events()[..] else { panic!() };
        let asked: Vec<_> = filters.iter().map(|f| (f.as_str(), f.tag)).collect();
        assert_eq!(
            asked,
            [("kp1/a/cmx/t/config/json/#", 1), ("kp1/a/dcx/+/json", 2), ("kp1/a/cmx/t/#", 2)]
        );
        client.session.subscribed(*id, [Ok(()), Err(KpError::forbidden("no token")), Ok(())]);
        let [Packet::SubAck(ack)] = &client.received()[..] else { panic!() };
        assert_eq!(ack.packet_id, 5);
        let expected = [ReasonCode::Success, ReasonCode::NotAuthorized, ReasonCode::GrantedQoS1];
        if version == V5 {
            assert_eq!(ack.reason_codes, expected);
        } else {
            // 3.1.1 has one failure code.
            assert_eq!(
                ack.reason_codes,
                [ReasonCode::Success, ReasonCode::UnspecifiedError, ReasonCode::GrantedQoS1]
            );
        }
    }
}

#[test]
fn unsubscribe_says_which_subscriptions_existed() {
    let mut client = connected(V5, SessionConfig::default());
    let unsubscribe = Unsubscribe {
        packet_id: 6,
        filters: vec![Bytes::from_static(b"a/#"), Bytes::from_static(b"b/#")],
        properties: UnsubscribeProperties::default(),
    };
    client.send(&Packet::Unsubscribe(unsubscribe));
    let [Event::Unsubscribe { id, filters }] = &client.events()[..] else { panic!() };
    assert_eq!(filters.len(), 2);
    client.session.unsubscribed(*id, [true, false]);
    let [Packet::UnsubAck(ack)] = &client.received()[..] else { panic!() };
    assert_eq!(ack.reason_codes, [ReasonCode::Success, ReasonCode::NoSubscriptionExisted]);
}

/// CONNACK says MQTT 5 clients get neither (MQTT 5 §3.8.3.1, §4.8.2).
#[test]
fn subscription_identifiers_and_shared_subscriptions_are_refused_on_mqtt5() {
    let mut client = connected(V5, SessionConfig::default());
    let mut s = subscribe(&[("kp1/a/cmx/t/#", QoS::AtLeastOnce)]);
    s.properties.subscription_identifier = Some(1);
    client.send(&Packet::Subscribe(s));
    client.expect_disconnect(ReasonCode::SubscriptionIdentifiersNotSupported);
    assert_eq!(client.closed(), Close::Violation(Violation::SubscriptionIdentifier));

    let mut client = connected(V5, SessionConfig::default());
    let shared = [("kp1/a/cmx/t/#", QoS::AtMostOnce), ("$share/g/kp1/a/cmx/t/#", QoS::AtMostOnce)];
    client.send(&Packet::Subscribe(subscribe(&shared)));
    client.expect_disconnect(ReasonCode::SharedSubscriptionsNotSupported);
    assert_eq!(client.closed(), Close::Violation(Violation::SharedSubscription));

    // 3.1.1 has no shared subscriptions: `$share/...` is a filter like any other.
    let mut client = connected(V311, SessionConfig::default());
    client.send(&Packet::Subscribe(subscribe(&shared)));
    assert!(
        matches!(&client.events()[..], [Event::Subscribe { filters, .. }] if filters.len() == 2)
    );
}

// ----- maximum packet size ----------------------------------------------------------------

#[test]
fn an_oversized_packet_is_refused_from_its_fixed_header() {
    let config = SessionConfig { max_packet_size: 100, ..Default::default() };
    let mut client = connected(V5, config);
    // PUBLISH with a remaining length of 1000: refused before its body arrives.
    client.session.receive(b"\x30\xe8\x07", client.now);
    client.expect_disconnect(ReasonCode::PacketTooLarge);
    assert!(client.closed().is_protocol_error());
}

#[test]
fn responses_over_the_clients_maximum_packet_size_are_dropped_and_counted() {
    let mut client = Client::new(V5, SessionConfig::default());
    let mut c = connect(V5, "d", 0);
    c.properties.maximum_packet_size = Some(40);
    c.properties.receive_maximum = Some(1);
    client.connect_with(c);
    client.session.take_stats();
    let error = KpOutcome::Error(KpError::bad_request("the payload is not JSON at all"));
    client.session.send_response(response(2, Some(1), error)).unwrap();
    assert!(client.received().is_empty());
    assert!(client.session.wants_responses(), "a dropped response takes no room in the window");
    client.session.send_response(response(2, Some(2), KpOutcome::Success(Bytes::new()))).unwrap();
    assert_eq!(topic(&client.received()[0]), "kp1/a/dcx/t/json/2/status");
    let stats = client.session.take_stats();
    assert_eq!((stats.messages_too_large, stats.messages_sent), (1, 1));
}

// ----- the end ----------------------------------------------------------------------------

#[test]
fn requests_before_a_disconnect_still_reach_the_gateway() {
    let mut client = connected(V311, SessionConfig::default());
    let mut bytes = client.bytes(&publish("kp1/a/dcx/t/json", QoS::AtMostOnce, 0));
    bytes.extend(client.bytes(&Packet::Disconnect(Disconnect::normal())));
    client.session.receive(&bytes, client.now);
    let events = client.events();
    assert!(matches!(
        &events[..],
        [Event::Request { .. }, Event::Closed(Close::ClientDisconnected)]
    ));
    assert!(client.received().is_empty());
    assert!(!client.session.wants_input());
}

#[test]
fn the_gateway_closes_with_a_reason_mqtt5_clients_are_told() {
    let mut client = connected(V5, SessionConfig::default());
    client.session.close(ReasonCode::ServerShuttingDown);
    client.expect_disconnect(ReasonCode::ServerShuttingDown);
    assert_eq!(client.closed(), Close::Local(ReasonCode::ServerShuttingDown));
    assert!(client.session.poll_event().is_none(), "Closed comes once");

    let mut client = connected(V311, SessionConfig::default());
    client.session.close(ReasonCode::ServerBusy);
    assert!(client.received().is_empty());

    // Before CONNACK nothing may be sent.
    let mut client = Client::new(V5, SessionConfig::default());
    client.session.close(ReasonCode::ServerShuttingDown);
    assert!(client.received().is_empty());
    assert_eq!(client.closed(), Close::Local(ReasonCode::ServerShuttingDown));
}

#[test]
fn nothing_is_written_after_the_session_closed() {
    let mut client = connected(V5, SessionConfig::default());
    client.publish("kp1/a/dcx/t/json/1", QoS::AtLeastOnce, 1);
    client.send(&Packet::PubComp(PubAck::new(1)));
    let events = client.events();
    let [Event::Request { id, .. }, Event::Closed(_)] = &events[..] else { panic!("{events:?}") };
    client.expect_disconnect(ReasonCode::ProtocolError);
    client.session.request_done(*id, Ok(()));
    assert!(client.session.send_response(push()).is_err());
    client.session.receive(b"\xc0\x00", client.now);
    assert!(client.received().is_empty());
}

#[test]
fn stats_count_messages_and_reset_when_taken() {
    let mut client = connected(V311, SessionConfig::default());
    client.publish("kp1/a/dcx/t/json", QoS::AtMostOnce, 0);
    let requests = client.requests();
    client.session.request_done(requests[0].0, Ok(()));
    client.publish("other", QoS::AtMostOnce, 0);
    let stats = client.session.take_stats();
    assert_eq!(stats, Stats { messages_received: 2, messages_sent: 1, ..Stats::default() });
    assert_eq!(client.session.take_stats(), Stats::default());
}

#[test]
fn a_reason_a_disconnect_cannot_carry_becomes_unspecified_error() {
    // 0x8C is a CONNACK code, not a DISCONNECT one: the client still learns the session ended.
    let mut client = connected(V5, SessionConfig::default());
    client.session.close(ReasonCode::BadAuthenticationMethod);
    client.expect_disconnect(ReasonCode::UnspecifiedError);
}

// ----- acknowledgements mean the extension has the message (DESIGN decision 9) -------------

#[test]
fn a_qos1_puback_waits_for_the_extensions_answer() {
    for version in [V5, V311] {
        let mut client = connected(version, SessionConfig::default());
        client.publish("kp1/a/dcx/t/json", QoS::AtLeastOnce, 5);
        let requests = client.requests();
        client.session.request_done(requests[0].0, Ok(()));
        assert!(client.received().is_empty(), "handed to the bus is not yet an acknowledgement");
        let success = answer(&requests[0].1, KpOutcome::Success(Bytes::new()));
        client.session.send_response(success).unwrap();
        // No request id: acknowledged, no `/status` (1/KP).
        let packets = client.received();
        assert_eq!(packets.len(), 1, "{packets:?}");
        assert_eq!(puback_id(&packets[0]), 5);
    }
}

#[test]
fn an_answer_that_comes_before_the_gateway_returns_settles_the_request() {
    let mut client = connected(V5, SessionConfig::default());
    client.publish("kp1/a/dcx/t/json/9", QoS::AtLeastOnce, 1);
    let requests = client.requests();
    let early = answer(&requests[0].1, KpOutcome::Success(Bytes::from_static(b"{}")));
    client.session.send_response(early).unwrap();
    client.session.request_done(requests[0].0, Ok(()));
    let packets = client.received();
    assert_eq!(topic(&packets[0]), "kp1/a/dcx/t/json/9/status");
    assert_eq!(puback_id(&packets[1]), 1);
    assert_eq!(packets.len(), 2);
}

#[test]
fn an_extensions_refusal_is_a_negative_puback_on_mqtt5_and_an_error_topic_on_both() {
    for (version, reason) in [(V5, ReasonCode::PayloadFormatInvalid), (V311, ReasonCode::Success)] {
        let mut client = connected(version, SessionConfig::default());
        client.publish("kp1/a/dcx/t/json", QoS::AtLeastOnce, 3);
        let requests = client.requests();
        client.session.request_done(requests[0].0, Ok(()));
        let refusal = answer(&requests[0].1, KpOutcome::Error(KpError::bad_request("not JSON")));
        client.session.send_response(refusal).unwrap();
        let packets = client.received();
        assert_eq!(topic(&packets[0]), "kp1/a/dcx/t/json/error");
        let Packet::PubAck(ack) = &packets[1] else { panic!("{packets:?}") };
        assert_eq!((ack.packet_id, ack.reason_code), (3, reason), "{version:?}");
    }
}

#[test]
fn a_late_answer_to_a_settled_request_is_published_as_a_response() {
    let mut client = connected(V311, SessionConfig::default());
    client.publish("kp1/a/dcx/t/json/4", QoS::AtMostOnce, 0);
    let requests = client.requests();
    client.session.request_done(requests[0].0, Ok(()));
    assert!(client.received().is_empty(), "QoS 0: nothing to acknowledge");
    let late = answer(&requests[0].1, KpOutcome::Success(Bytes::new()));
    client.session.send_response(late).unwrap();
    let packets = client.received();
    assert_eq!(topic(&packets[0]), "kp1/a/dcx/t/json/4/status");
    let Packet::Publish(p) = &packets[0] else { panic!() };
    assert_eq!(p.qos, QoS::AtMostOnce, "at the request's QoS");
}
