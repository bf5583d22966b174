//! The fifteen MQTT control packets: their types, and the decoding and encoding of each body.
//!
//! Decoding works on one frozen frame (fixed header included) with a bounds-checked
//! [`Reader`]; every string, binary field and payload is a `Bytes` slice of that frame.
//! Encoding sizes and validates a packet completely before writing a byte of it.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::error::{DecodeError, EncodeError};
use super::properties::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    Props, PublishProperties, SubscribeProperties, UnsubscribeProperties, WillProperties,
    block_len, props_len, write_block,
};
use super::reason::{ReasonCode, ReasonContext};
use super::wire::{self, MAX_VARINT, Reader};
use super::{ProtocolVersion, QoS};

/// Control packet types (upper nibble of the first byte).
pub(crate) mod kind {
    pub(crate) const CONNECT: u8 = 1;
    pub(crate) const CONNACK: u8 = 2;
    pub(crate) const PUBLISH: u8 = 3;
    pub(crate) const PUBACK: u8 = 4;
    pub(crate) const PUBREC: u8 = 5;
    pub(crate) const PUBREL: u8 = 6;
    pub(crate) const PUBCOMP: u8 = 7;
    pub(crate) const SUBSCRIBE: u8 = 8;
    pub(crate) const SUBACK: u8 = 9;
    pub(crate) const UNSUBSCRIBE: u8 = 10;
    pub(crate) const UNSUBACK: u8 = 11;
    pub(crate) const PINGREQ: u8 = 12;
    pub(crate) const PINGRESP: u8 = 13;
    pub(crate) const DISCONNECT: u8 = 14;
    pub(crate) const AUTH: u8 = 15;
}

/// One MQTT control packet.
///
/// CONNECT and CONNACK are boxed: they are large and rare. PUBLISH is kept inline because boxing
/// it would allocate per message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // Publish inline on purpose: no allocation per message.
pub enum Packet {
    /// CONNECT (client to server).
    Connect(Box<Connect>),
    /// CONNACK (server to client).
    ConnAck(Box<ConnAck>),
    /// PUBLISH (both directions).
    Publish(Publish),
    /// PUBACK: QoS 1 acknowledgement.
    PubAck(PubAck),
    /// PUBREC: QoS 2 delivery part 1.
    PubRec(PubAck),
    /// PUBREL: QoS 2 delivery part 2.
    PubRel(PubAck),
    /// PUBCOMP: QoS 2 delivery part 3.
    PubComp(PubAck),
    /// SUBSCRIBE (client to server).
    Subscribe(Subscribe),
    /// SUBACK (server to client).
    SubAck(SubAck),
    /// UNSUBSCRIBE (client to server).
    Unsubscribe(Unsubscribe),
    /// UNSUBACK (server to client).
    UnsubAck(UnsubAck),
    /// PINGREQ (client to server).
    PingReq,
    /// PINGRESP (server to client).
    PingResp,
    /// DISCONNECT (client to server; both directions in MQTT 5).
    Disconnect(Disconnect),
    /// AUTH (MQTT 5 only, both directions).
    Auth(Auth),
}

/// CONNECT (MQTT 5 §3.1, 3.1.1 §3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol level: 4 (3.1.1) or 5. Encoding a CONNECT uses this, not the codec's version.
    pub protocol_version: ProtocolVersion,
    /// Clean Start (MQTT 5) / Clean Session (3.1.1).
    pub clean_start: bool,
    /// Keep Alive in seconds; 0 turns it off.
    pub keep_alive_secs: u16,
    /// Client Identifier, validated UTF-8; may be empty.
    pub client_id: Bytes,
    /// The Will Message, if any.
    pub will: Option<Will>,
    /// User Name, validated UTF-8.
    pub username: Option<Bytes>,
    /// Password (binary). MQTT 3.1.1 allows it only with a user name.
    pub password: Option<Bytes>,
    /// MQTT 5 properties (empty in 3.1.1; ignored when encoding 3.1.1).
    pub properties: ConnectProperties,
}

/// A Will Message in CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Will Topic: a non-empty topic name without wildcards.
    pub topic: Bytes,
    /// Will Payload.
    pub payload: Bytes,
    /// Will QoS.
    pub qos: QoS,
    /// Will Retain.
    pub retain: bool,
    /// MQTT 5 will properties.
    pub properties: WillProperties,
}

/// CONNACK (MQTT 5 §3.2, 3.1.1 §3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    /// Session Present; must be false when the reason code is an error.
    pub session_present: bool,
    /// Connect Reason Code; in 3.1.1 mapped to a return code by
    /// [`ReasonCode::v311_connack_code`].
    pub reason_code: ReasonCode,
    /// MQTT 5 properties.
    pub properties: ConnAckProperties,
}

/// PUBLISH (MQTT 5 §3.3, 3.1.1 §3.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// DUP flag: a re-delivery. Always false at QoS 0.
    pub dup: bool,
    /// QoS level.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic Name: validated UTF-8 without wildcards. Empty only in MQTT 5 with a Topic Alias.
    pub topic: Bytes,
    /// Packet Identifier: present (and non-zero) iff QoS > 0.
    pub packet_id: Option<u16>,
    /// MQTT 5 properties.
    pub properties: PublishProperties,
    /// Application payload, a slice of the read buffer.
    pub payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP (MQTT 5 §3.4–3.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubAck {
    /// Packet Identifier, non-zero.
    pub packet_id: u16,
    /// MQTT 5 reason code; always `Success` in 3.1.1.
    pub reason_code: ReasonCode,
    /// MQTT 5 properties.
    pub properties: AckProperties,
}

impl PubAck {
    /// A successful acknowledgement without properties (the 2-byte short form).
    pub fn new(packet_id: u16) -> Self {
        PubAck { packet_id, reason_code: ReasonCode::Success, properties: AckProperties::default() }
    }
}

/// Retain Handling subscription option (MQTT 5 §3.8.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetainHandling {
    /// 0: send retained messages at the time of the subscribe.
    #[default]
    SendAtSubscribe,
    /// 1: send retained messages only if the subscription did not exist.
    SendAtSubscribeIfNew,
    /// 2: do not send retained messages.
    DoNotSend,
}

/// Subscription Options (MQTT 5 §3.8.3.1); 3.1.1 has only the QoS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionOptions {
    /// Maximum QoS.
    pub qos: QoS,
    /// No Local (MQTT 5); not allowed on a shared subscription.
    pub no_local: bool,
    /// Retain As Published (MQTT 5).
    pub retain_as_published: bool,
    /// Retain Handling (MQTT 5).
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    /// Options with the given maximum QoS and the MQTT 5 defaults.
    pub fn new(qos: QoS) -> Self {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::SendAtSubscribe,
        }
    }
}

/// One topic filter in a SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Topic Filter: validated UTF-8 and wildcard rules.
    pub filter: Bytes,
    /// Its options.
    pub options: SubscriptionOptions,
}

/// SUBSCRIBE (MQTT 5 §3.8, 3.1.1 §3.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet Identifier, non-zero.
    pub packet_id: u16,
    /// At least one subscription.
    pub subscriptions: Vec<Subscription>,
    /// MQTT 5 properties.
    pub properties: SubscribeProperties,
}

/// SUBACK (MQTT 5 §3.9, 3.1.1 §3.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// Packet Identifier of the SUBSCRIBE.
    pub packet_id: u16,
    /// One per subscription: `Success` (granted QoS 0), `GrantedQoS1`, `GrantedQoS2`, or an error
    /// (3.1.1 encodes every error as 0x80 and decodes 0x80 as `UnspecifiedError`).
    pub reason_codes: Vec<ReasonCode>,
    /// MQTT 5 properties.
    pub properties: AckProperties,
}

/// UNSUBSCRIBE (MQTT 5 §3.10, 3.1.1 §3.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet Identifier, non-zero.
    pub packet_id: u16,
    /// At least one topic filter.
    pub filters: Vec<Bytes>,
    /// MQTT 5 properties.
    pub properties: UnsubscribeProperties,
}

/// UNSUBACK (MQTT 5 §3.11, 3.1.1 §3.11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    /// Packet Identifier of the UNSUBSCRIBE.
    pub packet_id: u16,
    /// MQTT 5: one per filter. 3.1.1 has none (empty when decoded, ignored when encoded).
    pub reason_codes: Vec<ReasonCode>,
    /// MQTT 5 properties.
    pub properties: AckProperties,
}

/// DISCONNECT (MQTT 5 §3.14, 3.1.1 §3.14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// MQTT 5 reason code (`Success` is "Normal disconnection"); ignored when encoding 3.1.1.
    pub reason_code: ReasonCode,
    /// MQTT 5 properties.
    pub properties: DisconnectProperties,
}

impl Disconnect {
    /// A normal disconnection without properties.
    pub fn normal() -> Self {
        Self::with_reason(ReasonCode::NORMAL_DISCONNECTION)
    }

    /// A disconnection with this reason and no properties.
    pub fn with_reason(reason_code: ReasonCode) -> Self {
        Disconnect { reason_code, properties: DisconnectProperties::default() }
    }
}

/// AUTH (MQTT 5 §3.15).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// `Success`, `ContinueAuthentication` or `ReAuthenticate`.
    pub reason_code: ReasonCode,
    /// Properties.
    pub properties: AuthProperties,
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

/// Fixed-header flags the spec fixes for each type other than PUBLISH.
fn required_flags(packet_type: u8) -> u8 {
    match packet_type {
        kind::PUBREL | kind::SUBSCRIBE | kind::UNSUBSCRIBE => 0b0010,
        _ => 0,
    }
}

fn non_zero_id(r: &mut Reader<'_>) -> Result<u16, DecodeError> {
    match r.u16("packet identifier")? {
        0 => Err(DecodeError::MalformedPacket("packet identifier 0")),
        id => Ok(id),
    }
}

fn reason_v5(b: u8, ctx: ReasonContext, packet: &'static str) -> Result<ReasonCode, DecodeError> {
    ReasonCode::from_v5(b)
        .filter(|rc| rc.valid_in(ctx))
        .ok_or(DecodeError::InvalidReasonCode { code: b, packet })
}

/// Decodes one whole frame (fixed header included) whose body starts at `body`.
/// `version` is the connection's version (`None` only for CONNECT, checked by the caller);
/// a CONNECT reports the version it asks for through `on_version` as soon as it is known.
pub(crate) fn decode_frame(
    frame: Bytes,
    body: usize,
    version: Option<ProtocolVersion>,
    on_version: &mut Option<ProtocolVersion>,
) -> Result<Packet, DecodeError> {
    let first = frame.first().copied().unwrap_or_default();
    let packet_type = first >> 4;
    let flags = first & 0x0f;
    if packet_type == kind::PUBLISH {
        let v = version.ok_or(DecodeError::FirstPacketNotConnect)?;
        return Ok(Packet::Publish(decode_publish(flags, frame, body, v)?));
    }
    if flags != required_flags(packet_type) {
        return Err(DecodeError::ReservedFlags { packet_type, flags });
    }
    let r = &mut Reader::new(&frame, body, frame.len());
    if packet_type == kind::CONNECT {
        return Ok(Packet::Connect(Box::new(decode_connect(r, on_version)?)));
    }
    let v = version.ok_or(DecodeError::FirstPacketNotConnect)?;
    let v5 = v == ProtocolVersion::V5;
    let packet = match packet_type {
        kind::CONNACK => Packet::ConnAck(Box::new(decode_connack(r, v5)?)),
        kind::PUBACK => Packet::PubAck(decode_ack(r, v5, ReasonContext::PubAck, "PUBACK")?),
        kind::PUBREC => Packet::PubRec(decode_ack(r, v5, ReasonContext::PubAck, "PUBREC")?),
        kind::PUBREL => Packet::PubRel(decode_ack(r, v5, ReasonContext::PubRel, "PUBREL")?),
        kind::PUBCOMP => Packet::PubComp(decode_ack(r, v5, ReasonContext::PubRel, "PUBCOMP")?),
        kind::SUBSCRIBE => Packet::Subscribe(decode_subscribe(r, v5)?),
        kind::SUBACK => Packet::SubAck(decode_suback(r, v5)?),
        kind::UNSUBSCRIBE => Packet::Unsubscribe(decode_unsubscribe(r, v5)?),
        kind::UNSUBACK => Packet::UnsubAck(decode_unsuback(r, v5)?),
        kind::PINGREQ => {
            r.finish("PINGREQ with a body")?;
            Packet::PingReq
        }
        kind::PINGRESP => {
            r.finish("PINGRESP with a body")?;
            Packet::PingResp
        }
        kind::DISCONNECT => Packet::Disconnect(decode_disconnect(r, v5)?),
        kind::AUTH if v5 => Packet::Auth(decode_auth(r)?),
        _ => return Err(DecodeError::MalformedPacket("reserved packet type")),
    };
    Ok(packet)
}

fn decode_connect(
    r: &mut Reader<'_>,
    on_version: &mut Option<ProtocolVersion>,
) -> Result<Connect, DecodeError> {
    let name = r.binary("protocol name")?;
    let level = r.u8("protocol level")?;
    if name.as_ref() != b"MQTT" {
        // MQTT 3.1 ("MQIsdp", level 3) gets the unsupported-version answer it understands.
        return Err(if name.as_ref() == b"MQIsdp" {
            DecodeError::UnsupportedProtocolVersion(level)
        } else {
            DecodeError::MalformedPacket("protocol name is not MQTT")
        });
    }
    let version = match level {
        4 => ProtocolVersion::V311,
        5 => ProtocolVersion::V5,
        other => return Err(DecodeError::UnsupportedProtocolVersion(other)),
    };
    // Known from here on, so that errors later in CONNECT are answered in the right version.
    *on_version = Some(version);
    let v5 = version == ProtocolVersion::V5;

    let flags = r.u8("connect flags")?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::MalformedPacket("connect flags reserved bit set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::MalformedPacket("will QoS or retain without a will"));
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::MalformedPacket("will QoS 3"))?;
    if !v5 && password_flag && !username_flag {
        return Err(DecodeError::MalformedPacket("password without user name"));
    }
    let keep_alive_secs = r.u16("keep alive")?;
    let properties = if v5 { ConnectProperties::decode(r)? } else { ConnectProperties::default() };
    let client_id = r.string("client identifier")?;
    let will = if will_flag {
        let properties = if v5 { WillProperties::decode(r)? } else { WillProperties::default() };
        let topic = r.binary("will topic")?;
        wire::validate_topic_name(&topic)?;
        if topic.is_empty() {
            return Err(DecodeError::TopicInvalid);
        }
        let payload = r.binary("will payload")?;
        Some(Will { topic, payload, qos: will_qos, retain: will_retain, properties })
    } else {
        None
    };
    let username = if username_flag { Some(r.string("user name")?) } else { None };
    let password = if password_flag { Some(r.binary("password")?) } else { None };
    r.finish("bytes after the CONNECT payload")?;
    Ok(Connect {
        protocol_version: version,
        clean_start,
        keep_alive_secs,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn decode_connack(r: &mut Reader<'_>, v5: bool) -> Result<ConnAck, DecodeError> {
    let flags = r.u8("connect acknowledge flags")?;
    if flags & 0xfe != 0 {
        return Err(DecodeError::MalformedPacket("connect acknowledge flags reserved bits"));
    }
    let session_present = flags & 0x01 != 0;
    let code = r.u8("connect reason code")?;
    let reason_code = if v5 {
        reason_v5(code, ReasonContext::ConnAck, "CONNACK")?
    } else {
        ReasonCode::from_v311_connack_code(code)
            .ok_or(DecodeError::InvalidReasonCode { code, packet: "CONNACK" })?
    };
    if session_present && reason_code.is_error() {
        return Err(DecodeError::ProtocolError("session present on a refused connection"));
    }
    let properties = if v5 { ConnAckProperties::decode(r)? } else { ConnAckProperties::default() };
    r.finish("bytes after the CONNACK properties")?;
    Ok(ConnAck { session_present, reason_code, properties })
}

/// The hot path: no allocation unless the PUBLISH carries Subscription Identifiers. The frame
/// itself, advanced past the headers, becomes the payload (one reference count fewer to take
/// and release per message).
fn decode_publish(
    flags: u8,
    mut frame: Bytes,
    body: usize,
    v: ProtocolVersion,
) -> Result<Publish, DecodeError> {
    let v5 = v == ProtocolVersion::V5;
    let r = &mut Reader::new(&frame, body, frame.len());
    let dup = flags & 0x08 != 0;
    let qos =
        QoS::from_u8((flags >> 1) & 0x03).ok_or(DecodeError::MalformedPacket("PUBLISH QoS 3"))?;
    let retain = flags & 0x01 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::MalformedPacket("DUP set on a QoS 0 PUBLISH"));
    }
    let topic = r.binary("topic name")?;
    wire::validate_topic_name(&topic)?;
    let packet_id = match qos {
        QoS::AtMostOnce => None,
        _ => Some(non_zero_id(r)?),
    };
    let properties = if v5 { PublishProperties::decode(r)? } else { PublishProperties::default() };
    if topic.is_empty() && properties.topic_alias.is_none() {
        return Err(DecodeError::TopicInvalid);
    }
    let payload_start = r.pos();
    // `payload_start <= frame.len()` (a reader position); `advance` would panic otherwise, so
    // fall back to an empty payload rather than trust it blindly.
    let payload = if payload_start <= frame.len() {
        frame.advance(payload_start);
        frame
    } else {
        Bytes::new()
    };
    Ok(Publish { dup, qos, retain, topic, packet_id, properties, payload })
}

fn decode_ack(
    r: &mut Reader<'_>,
    v5: bool,
    ctx: ReasonContext,
    packet: &'static str,
) -> Result<PubAck, DecodeError> {
    let packet_id = non_zero_id(r)?;
    let mut ack = PubAck::new(packet_id);
    if v5 && !r.is_empty() {
        ack.reason_code = reason_v5(r.u8("reason code")?, ctx, packet)?;
        if !r.is_empty() {
            ack.properties = AckProperties::decode(r, packet)?;
        }
    }
    r.finish("bytes after the acknowledgement")?;
    Ok(ack)
}

fn decode_subscription_options(
    b: u8,
    filter: &[u8],
    v5: bool,
) -> Result<SubscriptionOptions, DecodeError> {
    let reserved = if v5 { 0xc0 } else { 0xfc };
    if b & reserved != 0 {
        return Err(DecodeError::MalformedPacket("subscription options reserved bits"));
    }
    let qos = QoS::from_u8(b & 0x03).ok_or(DecodeError::MalformedPacket("subscription QoS 3"))?;
    let retain_handling = match (b >> 4) & 0x03 {
        0 => RetainHandling::SendAtSubscribe,
        1 => RetainHandling::SendAtSubscribeIfNew,
        2 => RetainHandling::DoNotSend,
        _ => return Err(DecodeError::MalformedPacket("retain handling 3")),
    };
    let no_local = b & 0x04 != 0;
    if no_local && wire::is_shared_filter(filter) {
        return Err(DecodeError::ProtocolError("no local on a shared subscription"));
    }
    Ok(SubscriptionOptions { qos, no_local, retain_as_published: b & 0x08 != 0, retain_handling })
}

fn read_filter(r: &mut Reader<'_>) -> Result<Bytes, DecodeError> {
    let filter = r.string("topic filter")?;
    if !wire::is_valid_topic_filter(&filter) {
        return Err(DecodeError::TopicFilterInvalid);
    }
    Ok(filter)
}

fn decode_subscribe(r: &mut Reader<'_>, v5: bool) -> Result<Subscribe, DecodeError> {
    let packet_id = non_zero_id(r)?;
    let properties =
        if v5 { SubscribeProperties::decode(r)? } else { SubscribeProperties::default() };
    let mut subscriptions = Vec::new();
    while !r.is_empty() {
        let filter = read_filter(r)?;
        let options = decode_subscription_options(r.u8("subscription options")?, &filter, v5)?;
        subscriptions.push(Subscription { filter, options });
    }
    if subscriptions.is_empty() {
        return Err(DecodeError::ProtocolError("SUBSCRIBE without topic filters"));
    }
    Ok(Subscribe { packet_id, subscriptions, properties })
}

fn decode_suback(r: &mut Reader<'_>, v5: bool) -> Result<SubAck, DecodeError> {
    let packet_id = non_zero_id(r)?;
    let properties =
        if v5 { AckProperties::decode(r, "SUBACK")? } else { AckProperties::default() };
    let mut reason_codes = Vec::new();
    while !r.is_empty() {
        let b = r.u8("SUBACK reason code")?;
        let rc = if v5 {
            reason_v5(b, ReasonContext::SubAck, "SUBACK")?
        } else {
            match b {
                0x00 => ReasonCode::Success,
                0x01 => ReasonCode::GrantedQoS1,
                0x02 => ReasonCode::GrantedQoS2,
                0x80 => ReasonCode::UnspecifiedError,
                code => {
                    return Err(DecodeError::InvalidReasonCode { code, packet: "SUBACK" });
                }
            }
        };
        reason_codes.push(rc);
    }
    if reason_codes.is_empty() {
        return Err(DecodeError::ProtocolError("SUBACK without reason codes"));
    }
    Ok(SubAck { packet_id, reason_codes, properties })
}

fn decode_unsubscribe(r: &mut Reader<'_>, v5: bool) -> Result<Unsubscribe, DecodeError> {
    let packet_id = non_zero_id(r)?;
    let properties =
        if v5 { UnsubscribeProperties::decode(r)? } else { UnsubscribeProperties::default() };
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(read_filter(r)?);
    }
    if filters.is_empty() {
        return Err(DecodeError::ProtocolError("UNSUBSCRIBE without topic filters"));
    }
    Ok(Unsubscribe { packet_id, filters, properties })
}

fn decode_unsuback(r: &mut Reader<'_>, v5: bool) -> Result<UnsubAck, DecodeError> {
    let packet_id = non_zero_id(r)?;
    let mut ack =
        UnsubAck { packet_id, reason_codes: Vec::new(), properties: AckProperties::default() };
    if v5 {
        ack.properties = AckProperties::decode(r, "UNSUBACK")?;
        while !r.is_empty() {
            let b = r.u8("UNSUBACK reason code")?;
            ack.reason_codes.push(reason_v5(b, ReasonContext::UnsubAck, "UNSUBACK")?);
        }
        if ack.reason_codes.is_empty() {
            return Err(DecodeError::ProtocolError("UNSUBACK without reason codes"));
        }
    }
    r.finish("bytes after the UNSUBACK")?;
    Ok(ack)
}

fn decode_disconnect(r: &mut Reader<'_>, v5: bool) -> Result<Disconnect, DecodeError> {
    let mut d = Disconnect::normal();
    if v5 && !r.is_empty() {
        d.reason_code = reason_v5(r.u8("reason code")?, ReasonContext::Disconnect, "DISCONNECT")?;
        if !r.is_empty() {
            d.properties = DisconnectProperties::decode(r)?;
        }
    }
    r.finish("bytes after the DISCONNECT")?;
    Ok(d)
}

fn decode_auth(r: &mut Reader<'_>) -> Result<Auth, DecodeError> {
    let mut a = Auth { reason_code: ReasonCode::Success, properties: AuthProperties::default() };
    if !r.is_empty() {
        a.reason_code = reason_v5(r.u8("reason code")?, ReasonContext::Auth, "AUTH")?;
        if !r.is_empty() {
            a.properties = AuthProperties::decode(r)?;
        }
    }
    r.finish("bytes after the AUTH")?;
    Ok(a)
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// Checks the size of a packet with this remaining length against `max` and returns the total.
fn total_size(rem: usize, max: usize) -> Result<usize, EncodeError> {
    let total = 1usize.saturating_add(wire::varint_len(rem)).saturating_add(rem);
    if rem > MAX_VARINT as usize || total > max {
        return Err(EncodeError::PacketTooLarge { size: total, max });
    }
    Ok(total)
}

/// Reserves room for the packet and writes its fixed header.
fn put_header(out: &mut BytesMut, first: u8, rem: usize, total: usize) {
    out.reserve(total);
    out.put_u8(first);
    wire::put_varint(out, rem);
}

fn check_packet_id(id: u16) -> Result<(), EncodeError> {
    if id == 0 { Err(EncodeError::OutOfRange("packet identifier 0")) } else { Ok(()) }
}

/// Size of an optional MQTT 5 property block: `(block size, inner size)`.
fn opt_block<P: Props>(v5: bool, p: &P) -> Result<(usize, usize), EncodeError> {
    if !v5 {
        return Ok((0, 0));
    }
    let inner = props_len(p)?;
    Ok((block_len(inner), inner))
}

fn check_filter(f: &[u8]) -> Result<usize, EncodeError> {
    let n = wire::check_str(f, "topic filter")?;
    if !wire::is_valid_topic_filter(f) {
        return Err(EncodeError::TopicFilterInvalid);
    }
    Ok(n)
}

fn check_topic_name(t: &[u8], field: &'static str) -> Result<usize, EncodeError> {
    let n = wire::check_str(t, field)?;
    if t.is_empty() || t.iter().any(|&b| b == b'+' || b == b'#') {
        return Err(EncodeError::TopicInvalid);
    }
    Ok(n)
}

pub(crate) fn encode_packet(
    p: &Packet,
    version: Option<ProtocolVersion>,
    max: usize,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    if let Packet::Connect(c) = p {
        return encode_connect(c, max, out);
    }
    let v5 = version.ok_or(EncodeError::VersionUnknown)? == ProtocolVersion::V5;
    match p {
        Packet::Connect(_) => Ok(()),
        Packet::ConnAck(c) => encode_connack(c, v5, max, out),
        Packet::Publish(p) => encode_publish(
            v5,
            max,
            PublishHeader { dup: p.dup, qos: p.qos, retain: p.retain, packet_id: p.packet_id },
            &[p.topic.as_ref()],
            &p.properties,
            &p.payload,
            out,
        ),
        Packet::PubAck(a) => encode_ack(kind::PUBACK, a, v5, ReasonContext::PubAck, max, out),
        Packet::PubRec(a) => encode_ack(kind::PUBREC, a, v5, ReasonContext::PubAck, max, out),
        Packet::PubRel(a) => encode_ack(kind::PUBREL, a, v5, ReasonContext::PubRel, max, out),
        Packet::PubComp(a) => encode_ack(kind::PUBCOMP, a, v5, ReasonContext::PubRel, max, out),
        Packet::Subscribe(s) => encode_subscribe(s, v5, max, out),
        Packet::SubAck(s) => encode_suback(s, v5, max, out),
        Packet::Unsubscribe(u) => encode_unsubscribe(u, v5, max, out),
        Packet::UnsubAck(u) => encode_unsuback(u, v5, max, out),
        Packet::PingReq => encode_empty(kind::PINGREQ, max, out),
        Packet::PingResp => encode_empty(kind::PINGRESP, max, out),
        Packet::Disconnect(d) => encode_disconnect(d, v5, max, out),
        Packet::Auth(a) => encode_auth(a, v5, max, out),
    }
}

fn encode_empty(packet_type: u8, max: usize, out: &mut BytesMut) -> Result<(), EncodeError> {
    let total = total_size(0, max)?;
    put_header(out, packet_type << 4, 0, total);
    Ok(())
}

fn encode_connect(c: &Connect, max: usize, out: &mut BytesMut) -> Result<(), EncodeError> {
    let v5 = c.protocol_version == ProtocolVersion::V5;
    // Protocol name (6), level (1), flags (1), keep alive (2).
    let mut rem: usize = 10;
    let (props_block, props_inner) = opt_block(v5, &c.properties)?;
    rem = rem.saturating_add(props_block);
    rem = rem.saturating_add(wire::check_str(&c.client_id, "client identifier")?);
    let mut flags = 0u8;
    if c.clean_start {
        flags |= 0x02;
    }
    let mut will_inner = 0;
    if let Some(w) = &c.will {
        flags |= 0x04 | ((w.qos as u8) << 3);
        if w.retain {
            flags |= 0x20;
        }
        let (block, inner) = opt_block(v5, &w.properties)?;
        will_inner = inner;
        rem = rem
            .saturating_add(block)
            .saturating_add(check_topic_name(&w.topic, "will topic")?)
            .saturating_add(wire::check_bin(&w.payload, "will payload")?);
    }
    if let Some(u) = &c.username {
        flags |= 0x80;
        rem = rem.saturating_add(wire::check_str(u, "user name")?);
    }
    if let Some(p) = &c.password {
        if !v5 && c.username.is_none() {
            return Err(EncodeError::OutOfRange("MQTT 3.1.1 password without user name"));
        }
        flags |= 0x40;
        rem = rem.saturating_add(wire::check_bin(p, "password")?);
    }
    let total = total_size(rem, max)?;
    put_header(out, kind::CONNECT << 4, rem, total);
    wire::put_field(out, b"MQTT");
    out.put_u8(if v5 { 5 } else { 4 });
    out.put_u8(flags);
    out.put_u16(c.keep_alive_secs);
    if v5 {
        write_block(&c.properties, props_inner, out);
    }
    wire::put_field(out, &c.client_id);
    if let Some(w) = &c.will {
        if v5 {
            write_block(&w.properties, will_inner, out);
        }
        wire::put_field(out, &w.topic);
        wire::put_field(out, &w.payload);
    }
    if let Some(u) = &c.username {
        wire::put_field(out, u);
    }
    if let Some(p) = &c.password {
        wire::put_field(out, p);
    }
    Ok(())
}

fn encode_connack(
    c: &ConnAck,
    v5: bool,
    max: usize,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    if c.session_present && c.reason_code.is_error() {
        return Err(EncodeError::OutOfRange("session present on a refused connection"));
    }
    let code = if v5 {
        if !c.reason_code.valid_in(ReasonContext::ConnAck) {
            return Err(EncodeError::OutOfRange("CONNACK reason code"));
        }
        c.reason_code.to_v5()
    } else {
        c.reason_code
            .v311_connack_code()
            .ok_or(EncodeError::NotInVersion("this CONNACK reason code"))?
    };
    let (block, inner) = opt_block(v5, &c.properties)?;
    let rem = 2usize.saturating_add(block);
    let total = total_size(rem, max)?;
    put_header(out, kind::CONNACK << 4, rem, total);
    out.put_u8(u8::from(c.session_present));
    out.put_u8(code);
    if v5 {
        write_block(&c.properties, inner, out);
    }
    Ok(())
}

/// The fixed-header flags and packet identifier of a PUBLISH being encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishHeader {
    /// DUP flag; must be false at QoS 0.
    pub dup: bool,
    /// QoS level.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Packet Identifier: `Some` (non-zero) iff QoS > 0.
    pub packet_id: Option<u16>,
}

impl PublishHeader {
    /// A QoS 0, non-retained, first delivery.
    pub fn qos0() -> Self {
        PublishHeader { dup: false, qos: QoS::AtMostOnce, retain: false, packet_id: None }
    }
}

/// Encodes a PUBLISH whose topic is the concatenation of `topic_parts`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode_publish(
    v5: bool,
    max: usize,
    h: PublishHeader,
    topic_parts: &[&[u8]],
    props: &PublishProperties,
    payload: &[u8],
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    match (h.qos, h.packet_id) {
        (QoS::AtMostOnce, None) => {}
        (QoS::AtMostOnce, Some(_)) => {
            return Err(EncodeError::OutOfRange("packet identifier on a QoS 0 PUBLISH"));
        }
        (_, None) => return Err(EncodeError::OutOfRange("missing packet identifier")),
        (_, Some(id)) => check_packet_id(id)?,
    }
    if h.dup && h.qos == QoS::AtMostOnce {
        return Err(EncodeError::OutOfRange("DUP on a QoS 0 PUBLISH"));
    }
    let topic_len = topic_parts.iter().fold(0usize, |n, p| n.saturating_add(p.len()));
    if topic_len > wire::MAX_FIELD {
        return Err(EncodeError::FieldTooLong("topic"));
    }
    let has_alias = v5 && props.topic_alias.is_some();
    if topic_len == 0 && !has_alias {
        return Err(EncodeError::TopicInvalid);
    }
    let (block, inner) = if !v5 {
        (0, 0)
    } else if props.is_empty() {
        (1, 0)
    } else {
        let inner = props_len(props)?;
        (block_len(inner), inner)
    };
    let rem = (2 + topic_len)
        .saturating_add(if h.packet_id.is_some() { 2 } else { 0 })
        .saturating_add(block)
        .saturating_add(payload.len());
    let total = total_size(rem, max)?;
    let first =
        (kind::PUBLISH << 4) | (u8::from(h.dup) << 3) | ((h.qos as u8) << 1) | u8::from(h.retain);
    let start = out.len();
    put_header(out, first, rem, total);
    // topic_len <= u16::MAX, checked above.
    out.put_u16(u16::try_from(topic_len).unwrap_or(u16::MAX));
    let topic_start = out.len();
    for part in topic_parts {
        out.put_slice(part);
    }
    // Validated once written so a multi-byte character may straddle two parts.
    let topic_ok = out.get(topic_start..).is_some_and(|t| wire::validate_topic_name(t).is_ok());
    if !topic_ok {
        out.truncate(start);
        return Err(EncodeError::TopicInvalid);
    }
    if let Some(id) = h.packet_id {
        out.put_u16(id);
    }
    if v5 {
        write_block(props, inner, out);
    }
    out.put_slice(payload);
    Ok(())
}

fn encode_ack(
    packet_type: u8,
    a: &PubAck,
    v5: bool,
    ctx: ReasonContext,
    max: usize,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    check_packet_id(a.packet_id)?;
    let first = (packet_type << 4) | required_flags(packet_type);
    if !v5 {
        if a.reason_code != ReasonCode::Success {
            return Err(EncodeError::NotInVersion("an acknowledgement reason code"));
        }
        let total = total_size(2, max)?;
        put_header(out, first, 2, total);
        out.put_u16(a.packet_id);
        return Ok(());
    }
    if !a.reason_code.valid_in(ctx) {
        return Err(EncodeError::OutOfRange("acknowledgement reason code"));
    }
    let short = a.properties.is_empty();
    let (block, inner) = if short {
        (0, 0)
    } else {
        let inner = props_len(&a.properties)?;
        (block_len(inner), inner)
    };
    let rem = if short && a.reason_code == ReasonCode::Success {
        2
    } else {
        3usize.saturating_add(block)
    };
    let total = total_size(rem, max)?;
    put_header(out, first, rem, total);
    out.put_u16(a.packet_id);
    if rem > 2 {
        out.put_u8(a.reason_code.to_v5());
    }
    if !short {
        write_block(&a.properties, inner, out);
    }
    Ok(())
}

fn encode_subscribe(
    s: &Subscribe,
    v5: bool,
    max: usize,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    check_packet_id(s.packet_id)?;
    if s.subscriptions.is_empty() {
        return Err(EncodeError::OutOfRange("SUBSCRIBE without topic filters"));
    }
    let (block, inner) = opt_block(v5, &s.properties)?;
    let mut rem = 2usize.saturating_add(block);
    for sub in &s.subscriptions {
        if v5 && sub.options.no_local && wire::is_shared_filter(&sub.filter) {
            return Err(EncodeError::OutOfRange("no local on a shared subscription"));
        }
        rem = rem.saturating_add(check_filter(&sub.filter)?).saturating_add(1);
    }
    let total = total_size(rem, max)?;
    put_header(out, (kind::SUBSCRIBE << 4) | 0b0010, rem, total);
    out.put_u16(s.packet_id);
    if v5 {
        write_block(&s.properties, inner, out);
    }
    for sub in &s.subscriptions {
        wire::put_field(out, &sub.filter);
        let o = &sub.options;
        let mut b = o.qos as u8;
        if v5 {
            b |= u8::from(o.no_local) << 2;
            b |= u8::from(o.retain_as_published) << 3;
            b |= (o.retain_handling as u8) << 4;
        }
        out.put_u8(b);
    }
    Ok(())
}

fn encode_suback(s: &SubAck, v5: bool, max: usize, out: &mut BytesMut) -> Result<(), EncodeError> {
    check_packet_id(s.packet_id)?;
    if s.reason_codes.is_empty() {
        return Err(EncodeError::OutOfRange("SUBACK without reason codes"));
    }
    for rc in &s.reason_codes {
        let ok =
            if v5 { rc.valid_in(ReasonContext::SubAck) } else { rc.v311_suback_code().is_some() };
        if !ok {
            return Err(EncodeError::OutOfRange("SUBACK reason code"));
        }
    }
    let (block, inner) = opt_block(v5, &s.properties)?;
    let rem = 2usize.saturating_add(block).saturating_add(s.reason_codes.len());
    let total = total_size(rem, max)?;
    put_header(out, kind::SUBACK << 4, rem, total);
    out.put_u16(s.packet_id);
    if v5 {
        write_block(&s.properties, inner, out);
    }
    for rc in &s.reason_codes {
        out.put_u8(if v5 { rc.to_v5() } else { rc.v311_suback_code().unwrap_or(0x80) });
    }
    Ok(())
}

fn encode_unsubscribe(
    u: &Unsubscribe,
    v5: bool,
    max: usize,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    check_packet_id(u.packet_id)?;
    if u.filters.is_empty() {
        return Err(EncodeError::OutOfRange("UNSUBSCRIBE without topic filters"));
    }
    let (block, inner) = opt_block(v5, &u.properties)?;
    let mut rem = 2usize.saturating_add(block);
    for f in &u.filters {
        rem = rem.saturating_add(check_filter(f)?);
    }
    let total = total_size(rem, max)?;
    put_header(out, (kind::UNSUBSCRIBE << 4) | 0b0010, rem, total);
    out.put_u16(u.packet_id);
    if v5 {
        write_block(&u.properties, inner, out);
    }
    for f in &u.filters {
        wire::put_field(out, f);
    }
    Ok(())
}

fn encode_unsuback(
    u: &UnsubAck,
    v5: bool,
    max: usize,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    check_packet_id(u.packet_id)?;
    if !v5 {
        let total = total_size(2, max)?;
        put_header(out, kind::UNSUBACK << 4, 2, total);
        out.put_u16(u.packet_id);
        return Ok(());
    }
    if u.reason_codes.is_empty() {
        return Err(EncodeError::OutOfRange("UNSUBACK without reason codes"));
    }
    if !u.reason_codes.iter().all(|rc| rc.valid_in(ReasonContext::UnsubAck)) {
        return Err(EncodeError::OutOfRange("UNSUBACK reason code"));
    }
    let (block, inner) = opt_block(true, &u.properties)?;
    let rem = 2usize.saturating_add(block).saturating_add(u.reason_codes.len());
    let total = total_size(rem, max)?;
    put_header(out, kind::UNSUBACK << 4, rem, total);
    out.put_u16(u.packet_id);
    write_block(&u.properties, inner, out);
    for rc in &u.reason_codes {
        out.put_u8(rc.to_v5());
    }
    Ok(())
}

/// Encodes a packet that may end after its reason code (DISCONNECT, AUTH): nothing at all for
/// success without properties, the reason code alone without properties, else both.
fn encode_reason_and_props<P: Props>(
    first: u8,
    reason: ReasonCode,
    props: &P,
    props_empty: bool,
    max: usize,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let (block, inner) = if props_empty {
        (0, 0)
    } else {
        let inner = props_len(props)?;
        (block_len(inner), inner)
    };
    let rem = match (reason, props_empty) {
        (ReasonCode::Success, true) => 0,
        (_, true) => 1,
        _ => 1usize.saturating_add(block),
    };
    let total = total_size(rem, max)?;
    put_header(out, first, rem, total);
    if rem > 0 {
        out.put_u8(reason.to_v5());
    }
    if !props_empty {
        write_block(props, inner, out);
    }
    Ok(())
}

fn encode_disconnect(
    d: &Disconnect,
    v5: bool,
    max: usize,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    if !v5 {
        return encode_empty(kind::DISCONNECT, max, out);
    }
    if !d.reason_code.valid_in(ReasonContext::Disconnect) {
        return Err(EncodeError::OutOfRange("DISCONNECT reason code"));
    }
    encode_reason_and_props(
        kind::DISCONNECT << 4,
        d.reason_code,
        &d.properties,
        d.properties.is_empty(),
        max,
        out,
    )
}

fn encode_auth(a: &Auth, v5: bool, max: usize, out: &mut BytesMut) -> Result<(), EncodeError> {
    if !v5 {
        return Err(EncodeError::NotInVersion("AUTH"));
    }
    if !a.reason_code.valid_in(ReasonContext::Auth) {
        return Err(EncodeError::OutOfRange("AUTH reason code"));
    }
    // Only "success, no properties" may be shortened (§3.15.2.1); otherwise write a property
    // length even when there are no properties.
    encode_reason_and_props(
        kind::AUTH << 4,
        a.reason_code,
        &a.properties,
        a.properties.is_empty() && a.reason_code == ReasonCode::Success,
        max,
        out,
    )
}
