//! MQTT 5 properties (§2.2.2): one generic, typed parser for every property identifier, and one
//! struct per packet type holding the properties that packet may carry.
//!
//! Decoding rejects an identifier not allowed in the packet (a Malformed Packet, §2.2.2.2), a
//! repeated property where the spec allows one (a Protocol Error), and out-of-range values
//! (a Protocol Error). Strings and binary data are `Bytes` slices of the frame, and user
//! properties are kept as a slice of the raw property block that [`UserProperties::iter`] walks,
//! so decoding properties never allocates, except for the (server-to-client only) list of
//! Subscription Identifiers in a PUBLISH.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use super::QoS;
use super::error::{DecodeError, EncodeError};
use super::wire::{self, MAX_VARINT, Reader};

/// Property identifiers (§2.2.2.2).
pub(crate) mod id {
    pub(crate) const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub(crate) const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub(crate) const CONTENT_TYPE: u8 = 0x03;
    pub(crate) const RESPONSE_TOPIC: u8 = 0x08;
    pub(crate) const CORRELATION_DATA: u8 = 0x09;
    pub(crate) const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub(crate) const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub(crate) const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub(crate) const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub(crate) const AUTHENTICATION_METHOD: u8 = 0x15;
    pub(crate) const AUTHENTICATION_DATA: u8 = 0x16;
    pub(crate) const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub(crate) const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub(crate) const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub(crate) const RESPONSE_INFORMATION: u8 = 0x1A;
    pub(crate) const SERVER_REFERENCE: u8 = 0x1C;
    pub(crate) const REASON_STRING: u8 = 0x1F;
    pub(crate) const RECEIVE_MAXIMUM: u8 = 0x21;
    pub(crate) const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub(crate) const TOPIC_ALIAS: u8 = 0x23;
    pub(crate) const MAXIMUM_QOS: u8 = 0x24;
    pub(crate) const RETAIN_AVAILABLE: u8 = 0x25;
    pub(crate) const USER_PROPERTY: u8 = 0x26;
    pub(crate) const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub(crate) const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub(crate) const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub(crate) const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// One decoded property with the value type its identifier prescribes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Property {
    /// A Byte (0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A).
    Byte(u8, u8),
    /// A Two Byte Integer (0x13, 0x21, 0x22, 0x23).
    U16(u8, u16),
    /// A Four Byte Integer (0x02, 0x11, 0x18, 0x27).
    U32(u8, u32),
    /// A Variable Byte Integer (0x0B).
    VarInt(u8, u32),
    /// A UTF-8 Encoded String (0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F).
    Str(u8, Bytes),
    /// Binary Data (0x09, 0x16).
    Bin(u8, Bytes),
    /// A UTF-8 String Pair (0x26).
    Pair(Bytes, Bytes),
}

impl Property {
    fn id(&self) -> u8 {
        match self {
            Property::Byte(i, _)
            | Property::U16(i, _)
            | Property::U32(i, _)
            | Property::VarInt(i, _)
            | Property::Str(i, _)
            | Property::Bin(i, _) => *i,
            Property::Pair(..) => id::USER_PROPERTY,
        }
    }
}

/// Parses one property: identifier, then the value its type prescribes, with value range checks.
pub(crate) fn parse_property(
    r: &mut Reader<'_>,
    packet: &'static str,
) -> Result<Property, DecodeError> {
    use id::*;
    let raw_id = r.varint("property identifier")?;
    let not_allowed =
        DecodeError::PropertyNotAllowed { id: u8::try_from(raw_id).unwrap_or(u8::MAX), packet };
    let Ok(pid) = u8::try_from(raw_id) else {
        return Err(not_allowed);
    };
    let p = match pid {
        PAYLOAD_FORMAT_INDICATOR
        | REQUEST_PROBLEM_INFORMATION
        | REQUEST_RESPONSE_INFORMATION
        | MAXIMUM_QOS
        | RETAIN_AVAILABLE
        | WILDCARD_SUBSCRIPTION_AVAILABLE
        | SUBSCRIPTION_IDENTIFIER_AVAILABLE
        | SHARED_SUBSCRIPTION_AVAILABLE => {
            let v = r.u8("byte property")?;
            if v > 1 {
                return Err(DecodeError::ProtocolError("byte property value other than 0 or 1"));
            }
            Property::Byte(pid, v)
        }
        SERVER_KEEP_ALIVE | RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | TOPIC_ALIAS => {
            let v = r.u16("two-byte property")?;
            if v == 0 && (pid == RECEIVE_MAXIMUM || pid == TOPIC_ALIAS) {
                return Err(DecodeError::ProtocolError("receive maximum or topic alias of 0"));
            }
            Property::U16(pid, v)
        }
        MESSAGE_EXPIRY_INTERVAL
        | SESSION_EXPIRY_INTERVAL
        | WILL_DELAY_INTERVAL
        | MAXIMUM_PACKET_SIZE => {
            let v = r.u32("four-byte property")?;
            if v == 0 && pid == MAXIMUM_PACKET_SIZE {
                return Err(DecodeError::ProtocolError("maximum packet size of 0"));
            }
            Property::U32(pid, v)
        }
        SUBSCRIPTION_IDENTIFIER => {
            let v = r.varint("subscription identifier")?;
            if v == 0 {
                return Err(DecodeError::ProtocolError("subscription identifier of 0"));
            }
            Property::VarInt(pid, v)
        }
        CONTENT_TYPE
        | RESPONSE_TOPIC
        | ASSIGNED_CLIENT_IDENTIFIER
        | AUTHENTICATION_METHOD
        | RESPONSE_INFORMATION
        | SERVER_REFERENCE
        | REASON_STRING => {
            let s = r.string("string property")?;
            if pid == RESPONSE_TOPIC {
                wire::validate_topic_name(&s)?;
                if s.is_empty() {
                    return Err(DecodeError::TopicInvalid);
                }
            }
            Property::Str(pid, s)
        }
        CORRELATION_DATA | AUTHENTICATION_DATA => Property::Bin(pid, r.binary("binary property")?),
        USER_PROPERTY => {
            let k = r.string("user property name")?;
            let v = r.string("user property value")?;
            Property::Pair(k, v)
        }
        _ => return Err(not_allowed),
    };
    Ok(p)
}

/// Reads a property block (length, then properties), calls `f` on each property other than
/// User Property, rejects repeats (except User Property, and Subscription Identifier when
/// `multi_sub_id`), and returns the user properties.
fn decode_block(
    r: &mut Reader<'_>,
    packet: &'static str,
    multi_sub_id: bool,
    mut f: impl FnMut(Property) -> Result<(), DecodeError>,
) -> Result<UserProperties, DecodeError> {
    let len = r.varint("property length")?;
    let len = usize::try_from(len).map_err(|_| DecodeError::MalformedPacket("property length"))?;
    let mut block = r.sub(len, "property length exceeds packet")?;
    let whole = block.clone();
    let mut seen: u64 = 0;
    let mut has_user = false;
    while !block.is_empty() {
        let p = parse_property(&mut block, packet)?;
        let pid = p.id();
        if pid == id::USER_PROPERTY {
            has_user = true;
            continue;
        }
        if !(multi_sub_id && pid == id::SUBSCRIPTION_IDENTIFIER) {
            // Every identifier is below 64 (checked by `parse_property`).
            let bit = 1u64 << (pid & 63);
            if seen & bit != 0 {
                return Err(DecodeError::DuplicateProperty(pid));
            }
            seen |= bit;
        }
        f(p)?;
    }
    Ok(if has_user { UserProperties { raw: whole.peek_rest() } } else { UserProperties::default() })
}

/// Rejects a property that parsed but does not belong in this packet.
fn not_allowed(p: &Property, packet: &'static str) -> DecodeError {
    DecodeError::PropertyNotAllowed { id: p.id(), packet }
}

/// User properties (0x26): UTF-8 name/value pairs, in order, repeats allowed.
///
/// Decoded user properties are a zero-copy slice of the packet's property block; build
/// outbound ones with [`UserProperties::from_pairs`]. Equality compares the pairs.
#[derive(Clone, Default)]
pub struct UserProperties {
    /// Property block contents that contain at least one user property (and possibly other
    /// properties, which iteration skips), or empty.
    raw: Bytes,
}

impl UserProperties {
    /// No user properties.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds user properties from name/value pairs; fails if a string is not valid MQTT UTF-8
    /// or longer than 65,535 bytes.
    pub fn from_pairs<'a, I>(pairs: I) -> Result<Self, EncodeError>
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        let mut out = BytesMut::new();
        for (k, v) in pairs {
            wire::check_str(k.as_bytes(), "user property name")?;
            wire::check_str(v.as_bytes(), "user property value")?;
            out.put_u8(id::USER_PROPERTY);
            wire::put_field(&mut out, k.as_bytes());
            wire::put_field(&mut out, v.as_bytes());
        }
        Ok(UserProperties { raw: out.freeze() })
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// The pairs, in order, as zero-copy slices (validated UTF-8).
    pub fn iter(&self) -> UserPropertyIter<'_> {
        UserPropertyIter { raw: &self.raw, pos: 0 }
    }

    fn visit<S: Sink>(&self, s: &mut S) {
        for (k, v) in self.iter() {
            s.pair(&k, &v);
        }
    }
}

impl PartialEq for UserProperties {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for UserProperties {}

impl fmt::Debug for UserProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Iterator over [`UserProperties`]: `(name, value)` slices.
#[derive(Debug, Clone)]
pub struct UserPropertyIter<'a> {
    raw: &'a Bytes,
    pos: usize,
}

impl Iterator for UserPropertyIter<'_> {
    type Item = (Bytes, Bytes);

    fn next(&mut self) -> Option<(Bytes, Bytes)> {
        loop {
            let mut r = Reader::new(self.raw, self.pos, self.raw.len());
            if r.is_empty() {
                return None;
            }
            // The block was validated when decoded or built; stop on any surprise.
            let p = parse_property(&mut r, "user properties").ok()?;
            self.pos = r.pos();
            if let Property::Pair(k, v) = p {
                return Some((k, v));
            }
        }
    }
}

/// Receives a packet's properties for encoding: either sizes and validates them ([`Sizer`]) or
/// writes them ([`Writer`]), so each property list is spelled once.
pub(crate) trait Sink {
    fn byte(&mut self, pid: u8, v: u8);
    fn u16(&mut self, pid: u8, v: u16);
    fn u32(&mut self, pid: u8, v: u32);
    fn varint(&mut self, pid: u8, v: u32);
    fn str(&mut self, pid: u8, v: &[u8], field: &'static str);
    fn bin(&mut self, pid: u8, v: &[u8], field: &'static str);
    fn pair(&mut self, k: &[u8], v: &[u8]);
    fn check(&mut self, ok: bool, field: &'static str);
}

/// Sizes and validates a property list.
#[derive(Default)]
pub(crate) struct Sizer {
    len: usize,
    err: Option<EncodeError>,
}

impl Sizer {
    fn add(&mut self, n: usize) {
        self.len = self.len.saturating_add(n);
    }
    fn fail(&mut self, e: EncodeError) {
        if self.err.is_none() {
            self.err = Some(e);
        }
    }
}

impl Sink for Sizer {
    fn byte(&mut self, _: u8, _: u8) {
        self.add(2);
    }
    fn u16(&mut self, _: u8, _: u16) {
        self.add(3);
    }
    fn u32(&mut self, _: u8, _: u32) {
        self.add(5);
    }
    fn varint(&mut self, _: u8, v: u32) {
        if v == 0 || v > MAX_VARINT {
            self.fail(EncodeError::OutOfRange("subscription identifier"));
        }
        self.add(1 + wire::varint_len(v as usize));
    }
    fn str(&mut self, _: u8, v: &[u8], field: &'static str) {
        match wire::check_str(v, field) {
            Ok(n) => self.add(1 + n),
            Err(e) => self.fail(e),
        }
    }
    fn bin(&mut self, _: u8, v: &[u8], field: &'static str) {
        match wire::check_bin(v, field) {
            Ok(n) => self.add(1 + n),
            Err(e) => self.fail(e),
        }
    }
    fn pair(&mut self, k: &[u8], v: &[u8]) {
        match (wire::check_str(k, "user property name"), wire::check_str(v, "user property value"))
        {
            (Ok(a), Ok(b)) => self.add(1usize.saturating_add(a).saturating_add(b)),
            (Err(e), _) | (_, Err(e)) => self.fail(e),
        }
    }
    fn check(&mut self, ok: bool, field: &'static str) {
        if !ok {
            self.fail(EncodeError::OutOfRange(field));
        }
    }
}

/// Writes a property list.
pub(crate) struct Writer<'a>(pub(crate) &'a mut BytesMut);

impl Sink for Writer<'_> {
    fn byte(&mut self, pid: u8, v: u8) {
        self.0.put_u8(pid);
        self.0.put_u8(v);
    }
    fn u16(&mut self, pid: u8, v: u16) {
        self.0.put_u8(pid);
        self.0.put_u16(v);
    }
    fn u32(&mut self, pid: u8, v: u32) {
        self.0.put_u8(pid);
        self.0.put_u32(v);
    }
    fn varint(&mut self, pid: u8, v: u32) {
        self.0.put_u8(pid);
        wire::put_varint(self.0, v as usize);
    }
    fn str(&mut self, pid: u8, v: &[u8], _: &'static str) {
        self.0.put_u8(pid);
        wire::put_field(self.0, v);
    }
    fn bin(&mut self, pid: u8, v: &[u8], _: &'static str) {
        self.0.put_u8(pid);
        wire::put_field(self.0, v);
    }
    fn pair(&mut self, k: &[u8], v: &[u8]) {
        self.0.put_u8(id::USER_PROPERTY);
        wire::put_field(self.0, k);
        wire::put_field(self.0, v);
    }
    fn check(&mut self, _: bool, _: &'static str) {}
}

/// A packet's property list, for encoding.
pub(crate) trait Props {
    fn visit<S: Sink>(&self, s: &mut S);
}

/// Size of the property list (without its length prefix), validated.
pub(crate) fn props_len<P: Props>(p: &P) -> Result<usize, EncodeError> {
    let mut s = Sizer::default();
    p.visit(&mut s);
    match s.err {
        Some(e) => Err(e),
        None if s.len > MAX_VARINT as usize => Err(EncodeError::OutOfRange("property length")),
        None => Ok(s.len),
    }
}

/// Size of a property block: length prefix plus properties.
pub(crate) fn block_len(inner: usize) -> usize {
    wire::varint_len(inner).saturating_add(inner)
}

/// Writes a property block whose inner size `props_len` returned.
pub(crate) fn write_block<P: Props>(p: &P, inner: usize, out: &mut BytesMut) {
    wire::put_varint(out, inner);
    p.visit(&mut Writer(out));
}

fn opt_byte<S: Sink>(s: &mut S, pid: u8, v: Option<u8>) {
    if let Some(v) = v {
        s.byte(pid, v);
    }
}
fn opt_bool<S: Sink>(s: &mut S, pid: u8, v: Option<bool>) {
    opt_byte(s, pid, v.map(u8::from));
}
fn opt_u16<S: Sink>(s: &mut S, pid: u8, v: Option<u16>) {
    if let Some(v) = v {
        s.u16(pid, v);
    }
}
fn opt_u32<S: Sink>(s: &mut S, pid: u8, v: Option<u32>) {
    if let Some(v) = v {
        s.u32(pid, v);
    }
}
fn opt_str<S: Sink>(s: &mut S, pid: u8, v: &Option<Bytes>, field: &'static str) {
    if let Some(v) = v {
        s.str(pid, v, field);
    }
}
fn opt_bin<S: Sink>(s: &mut S, pid: u8, v: &Option<Bytes>, field: &'static str) {
    if let Some(v) = v {
        s.bin(pid, v, field);
    }
}

fn bool_of(v: u8) -> bool {
    v == 1
}

/// CONNECT properties (§3.1.2.11).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectProperties {
    /// Session Expiry Interval in seconds (0x11); absent means 0.
    pub session_expiry_interval: Option<u32>,
    /// Receive Maximum (0x21), non-zero; absent means 65,535.
    pub receive_maximum: Option<u16>,
    /// Maximum Packet Size the client accepts (0x27), non-zero.
    pub maximum_packet_size: Option<u32>,
    /// Topic Alias Maximum the client accepts (0x22).
    pub topic_alias_maximum: Option<u16>,
    /// Request Response Information (0x19).
    pub request_response_information: Option<bool>,
    /// Request Problem Information (0x17); absent means true.
    pub request_problem_information: Option<bool>,
    /// User properties (0x26).
    pub user_properties: UserProperties,
    /// Authentication Method (0x15), UTF-8.
    pub authentication_method: Option<Bytes>,
    /// Authentication Data (0x16).
    pub authentication_data: Option<Bytes>,
}

impl ConnectProperties {
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        const P: &str = "CONNECT";
        let mut c = Self::default();
        let up = decode_block(r, P, false, |p| {
            match p {
                Property::U32(id::SESSION_EXPIRY_INTERVAL, v) => {
                    c.session_expiry_interval = Some(v)
                }
                Property::U16(id::RECEIVE_MAXIMUM, v) => c.receive_maximum = Some(v),
                Property::U32(id::MAXIMUM_PACKET_SIZE, v) => c.maximum_packet_size = Some(v),
                Property::U16(id::TOPIC_ALIAS_MAXIMUM, v) => c.topic_alias_maximum = Some(v),
                Property::Byte(id::REQUEST_RESPONSE_INFORMATION, v) => {
                    c.request_response_information = Some(bool_of(v))
                }
                Property::Byte(id::REQUEST_PROBLEM_INFORMATION, v) => {
                    c.request_problem_information = Some(bool_of(v))
                }
                Property::Str(id::AUTHENTICATION_METHOD, v) => c.authentication_method = Some(v),
                Property::Bin(id::AUTHENTICATION_DATA, v) => c.authentication_data = Some(v),
                other => return Err(not_allowed(&other, P)),
            }
            Ok(())
        })?;
        c.user_properties = up;
        if c.authentication_data.is_some() && c.authentication_method.is_none() {
            return Err(DecodeError::ProtocolError(
                "authentication data without authentication method",
            ));
        }
        Ok(c)
    }
}

impl Props for ConnectProperties {
    fn visit<S: Sink>(&self, s: &mut S) {
        opt_u32(s, id::SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        s.check(self.receive_maximum != Some(0), "receive maximum");
        opt_u16(s, id::RECEIVE_MAXIMUM, self.receive_maximum);
        s.check(self.maximum_packet_size != Some(0), "maximum packet size");
        opt_u32(s, id::MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        opt_u16(s, id::TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        opt_bool(s, id::REQUEST_RESPONSE_INFORMATION, self.request_response_information);
        opt_bool(s, id::REQUEST_PROBLEM_INFORMATION, self.request_problem_information);
        self.user_properties.visit(s);
        opt_str(s, id::AUTHENTICATION_METHOD, &self.authentication_method, "authentication method");
        opt_bin(s, id::AUTHENTICATION_DATA, &self.authentication_data, "authentication data");
    }
}

/// Will properties in the CONNECT payload (§3.1.3.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WillProperties {
    /// Will Delay Interval in seconds (0x18).
    pub will_delay_interval: Option<u32>,
    /// Payload Format Indicator (0x01): `true` means UTF-8 text.
    pub payload_format_indicator: Option<bool>,
    /// Message Expiry Interval in seconds (0x02).
    pub message_expiry_interval: Option<u32>,
    /// Content Type (0x03), UTF-8.
    pub content_type: Option<Bytes>,
    /// Response Topic (0x08), a topic name.
    pub response_topic: Option<Bytes>,
    /// Correlation Data (0x09).
    pub correlation_data: Option<Bytes>,
    /// User properties (0x26).
    pub user_properties: UserProperties,
}

impl WillProperties {
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        const P: &str = "will properties";
        let mut w = Self::default();
        let up = decode_block(r, P, false, |p| {
            match p {
                Property::U32(id::WILL_DELAY_INTERVAL, v) => w.will_delay_interval = Some(v),
                Property::Byte(id::PAYLOAD_FORMAT_INDICATOR, v) => {
                    w.payload_format_indicator = Some(bool_of(v))
                }
                Property::U32(id::MESSAGE_EXPIRY_INTERVAL, v) => {
                    w.message_expiry_interval = Some(v)
                }
                Property::Str(id::CONTENT_TYPE, v) => w.content_type = Some(v),
                Property::Str(id::RESPONSE_TOPIC, v) => w.response_topic = Some(v),
                Property::Bin(id::CORRELATION_DATA, v) => w.correlation_data = Some(v),
                other => return Err(not_allowed(&other, P)),
            }
            Ok(())
        })?;
        w.user_properties = up;
        Ok(w)
    }
}

impl Props for WillProperties {
    fn visit<S: Sink>(&self, s: &mut S) {
        opt_u32(s, id::WILL_DELAY_INTERVAL, self.will_delay_interval);
        opt_bool(s, id::PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        opt_u32(s, id::MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        opt_str(s, id::CONTENT_TYPE, &self.content_type, "content type");
        check_response_topic(s, &self.response_topic);
        opt_str(s, id::RESPONSE_TOPIC, &self.response_topic, "response topic");
        opt_bin(s, id::CORRELATION_DATA, &self.correlation_data, "correlation data");
        self.user_properties.visit(s);
    }
}

fn check_response_topic<S: Sink>(s: &mut S, t: &Option<Bytes>) {
    if let Some(t) = t {
        s.check(!t.is_empty() && !t.iter().any(|&b| b == b'+' || b == b'#'), "response topic");
    }
}

/// CONNACK properties (§3.2.2.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnAckProperties {
    /// Session Expiry Interval the server uses (0x11).
    pub session_expiry_interval: Option<u32>,
    /// Receive Maximum of the server (0x21), non-zero.
    pub receive_maximum: Option<u16>,
    /// Maximum QoS the server supports (0x24): only QoS 0 or 1 may be sent; absent means 2.
    pub maximum_qos: Option<QoS>,
    /// Retain Available (0x25); absent means true.
    pub retain_available: Option<bool>,
    /// Maximum Packet Size the server accepts (0x27), non-zero.
    pub maximum_packet_size: Option<u32>,
    /// Assigned Client Identifier (0x12), UTF-8.
    pub assigned_client_identifier: Option<Bytes>,
    /// Topic Alias Maximum of the server (0x22).
    pub topic_alias_maximum: Option<u16>,
    /// Reason String (0x1F), UTF-8.
    pub reason_string: Option<Bytes>,
    /// User properties (0x26).
    pub user_properties: UserProperties,
    /// Wildcard Subscription Available (0x28); absent means true.
    pub wildcard_subscription_available: Option<bool>,
    /// Subscription Identifiers Available (0x29); absent means true.
    pub subscription_identifiers_available: Option<bool>,
    /// Shared Subscription Available (0x2A); absent means true.
    pub shared_subscription_available: Option<bool>,
    /// Server Keep Alive in seconds (0x13), overriding the client's.
    pub server_keep_alive: Option<u16>,
    /// Response Information (0x1A), UTF-8.
    pub response_information: Option<Bytes>,
    /// Server Reference (0x1C), UTF-8.
    pub server_reference: Option<Bytes>,
    /// Authentication Method (0x15), UTF-8.
    pub authentication_method: Option<Bytes>,
    /// Authentication Data (0x16).
    pub authentication_data: Option<Bytes>,
}

impl ConnAckProperties {
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        const P: &str = "CONNACK";
        let mut c = Self::default();
        let up = decode_block(r, P, false, |p| {
            match p {
                Property::U32(id::SESSION_EXPIRY_INTERVAL, v) => {
                    c.session_expiry_interval = Some(v)
                }
                Property::U16(id::RECEIVE_MAXIMUM, v) => c.receive_maximum = Some(v),
                Property::Byte(id::MAXIMUM_QOS, v) => {
                    c.maximum_qos = Some(if v == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce })
                }
                Property::Byte(id::RETAIN_AVAILABLE, v) => c.retain_available = Some(bool_of(v)),
                Property::U32(id::MAXIMUM_PACKET_SIZE, v) => c.maximum_packet_size = Some(v),
                Property::Str(id::ASSIGNED_CLIENT_IDENTIFIER, v) => {
                    c.assigned_client_identifier = Some(v)
                }
                Property::U16(id::TOPIC_ALIAS_MAXIMUM, v) => c.topic_alias_maximum = Some(v),
                Property::Str(id::REASON_STRING, v) => c.reason_string = Some(v),
                Property::Byte(id::WILDCARD_SUBSCRIPTION_AVAILABLE, v) => {
                    c.wildcard_subscription_available = Some(bool_of(v))
                }
                Property::Byte(id::SUBSCRIPTION_IDENTIFIER_AVAILABLE, v) => {
                    c.subscription_identifiers_available = Some(bool_of(v))
                }
                Property::Byte(id::SHARED_SUBSCRIPTION_AVAILABLE, v) => {
                    c.shared_subscription_available = Some(bool_of(v))
                }
                Property::U16(id::SERVER_KEEP_ALIVE, v) => c.server_keep_alive = Some(v),
                Property::Str(id::RESPONSE_INFORMATION, v) => c.response_information = Some(v),
                Property::Str(id::SERVER_REFERENCE, v) => c.server_reference = Some(v),
                Property::Str(id::AUTHENTICATION_METHOD, v) => c.authentication_method = Some(v),
                Property::Bin(id::AUTHENTICATION_DATA, v) => c.authentication_data = Some(v),
                other => return Err(not_allowed(&other, P)),
            }
            Ok(())
        })?;
        c.user_properties = up;
        Ok(c)
    }
}

impl Props for ConnAckProperties {
    fn visit<S: Sink>(&self, s: &mut S) {
        opt_u32(s, id::SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        s.check(self.receive_maximum != Some(0), "receive maximum");
        opt_u16(s, id::RECEIVE_MAXIMUM, self.receive_maximum);
        s.check(self.maximum_qos != Some(QoS::ExactlyOnce), "maximum QoS");
        opt_byte(s, id::MAXIMUM_QOS, self.maximum_qos.map(|q| q as u8));
        opt_bool(s, id::RETAIN_AVAILABLE, self.retain_available);
        s.check(self.maximum_packet_size != Some(0), "maximum packet size");
        opt_u32(s, id::MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        opt_str(
            s,
            id::ASSIGNED_CLIENT_IDENTIFIER,
            &self.assigned_client_identifier,
            "assigned client identifier",
        );
        opt_u16(s, id::TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        opt_str(s, id::REASON_STRING, &self.reason_string, "reason string");
        self.user_properties.visit(s);
        opt_bool(s, id::WILDCARD_SUBSCRIPTION_AVAILABLE, self.wildcard_subscription_available);
        opt_bool(s, id::SUBSCRIPTION_IDENTIFIER_AVAILABLE, self.subscription_identifiers_available);
        opt_bool(s, id::SHARED_SUBSCRIPTION_AVAILABLE, self.shared_subscription_available);
        opt_u16(s, id::SERVER_KEEP_ALIVE, self.server_keep_alive);
        opt_str(s, id::RESPONSE_INFORMATION, &self.response_information, "response information");
        opt_str(s, id::SERVER_REFERENCE, &self.server_reference, "server reference");
        opt_str(s, id::AUTHENTICATION_METHOD, &self.authentication_method, "authentication method");
        opt_bin(s, id::AUTHENTICATION_DATA, &self.authentication_data, "authentication data");
    }
}

/// PUBLISH properties (§3.3.2.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishProperties {
    /// Payload Format Indicator (0x01): `true` means UTF-8 text. Not enforced on decode.
    pub payload_format_indicator: Option<bool>,
    /// Message Expiry Interval in seconds (0x02).
    pub message_expiry_interval: Option<u32>,
    /// Topic Alias (0x23), non-zero.
    pub topic_alias: Option<u16>,
    /// Response Topic (0x08), a topic name.
    pub response_topic: Option<Bytes>,
    /// Correlation Data (0x09).
    pub correlation_data: Option<Bytes>,
    /// User properties (0x26).
    pub user_properties: UserProperties,
    /// Subscription Identifiers (0x0B), server to client only; each 1..=268,435,455.
    pub subscription_identifiers: Vec<u32>,
    /// Content Type (0x03), UTF-8.
    pub content_type: Option<Bytes>,
}

impl PublishProperties {
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        const P: &str = "PUBLISH";
        let mut c = Self::default();
        let up = decode_block(r, P, true, |p| {
            match p {
                Property::Byte(id::PAYLOAD_FORMAT_INDICATOR, v) => {
                    c.payload_format_indicator = Some(bool_of(v))
                }
                Property::U32(id::MESSAGE_EXPIRY_INTERVAL, v) => {
                    c.message_expiry_interval = Some(v)
                }
                Property::U16(id::TOPIC_ALIAS, v) => c.topic_alias = Some(v),
                Property::Str(id::RESPONSE_TOPIC, v) => c.response_topic = Some(v),
                Property::Bin(id::CORRELATION_DATA, v) => c.correlation_data = Some(v),
                Property::VarInt(id::SUBSCRIPTION_IDENTIFIER, v) => {
                    c.subscription_identifiers.push(v)
                }
                Property::Str(id::CONTENT_TYPE, v) => c.content_type = Some(v),
                other => return Err(not_allowed(&other, P)),
            }
            Ok(())
        })?;
        c.user_properties = up;
        Ok(c)
    }

    /// Whether no property is set (the common case; encodes as a single zero byte).
    pub fn is_empty(&self) -> bool {
        self.payload_format_indicator.is_none()
            && self.message_expiry_interval.is_none()
            && self.topic_alias.is_none()
            && self.response_topic.is_none()
            && self.correlation_data.is_none()
            && self.user_properties.is_empty()
            && self.subscription_identifiers.is_empty()
            && self.content_type.is_none()
    }
}

impl Props for PublishProperties {
    fn visit<S: Sink>(&self, s: &mut S) {
        opt_bool(s, id::PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        opt_u32(s, id::MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        s.check(self.topic_alias != Some(0), "topic alias");
        opt_u16(s, id::TOPIC_ALIAS, self.topic_alias);
        check_response_topic(s, &self.response_topic);
        opt_str(s, id::RESPONSE_TOPIC, &self.response_topic, "response topic");
        opt_bin(s, id::CORRELATION_DATA, &self.correlation_data, "correlation data");
        self.user_properties.visit(s);
        for &v in &self.subscription_identifiers {
            s.varint(id::SUBSCRIPTION_IDENTIFIER, v);
        }
        opt_str(s, id::CONTENT_TYPE, &self.content_type, "content type");
    }
}

/// Properties of PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK (§3.4.2.2 and others).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckProperties {
    /// Reason String (0x1F), UTF-8.
    pub reason_string: Option<Bytes>,
    /// User properties (0x26).
    pub user_properties: UserProperties,
}

impl AckProperties {
    pub(crate) fn decode(r: &mut Reader<'_>, packet: &'static str) -> Result<Self, DecodeError> {
        let mut c = Self::default();
        let up = decode_block(r, packet, false, |p| {
            match p {
                Property::Str(id::REASON_STRING, v) => c.reason_string = Some(v),
                other => return Err(not_allowed(&other, packet)),
            }
            Ok(())
        })?;
        c.user_properties = up;
        Ok(c)
    }

    /// Whether no property is set.
    pub fn is_empty(&self) -> bool {
        self.reason_string.is_none() && self.user_properties.is_empty()
    }
}

impl Props for AckProperties {
    fn visit<S: Sink>(&self, s: &mut S) {
        opt_str(s, id::REASON_STRING, &self.reason_string, "reason string");
        self.user_properties.visit(s);
    }
}

/// SUBSCRIBE properties (§3.8.2.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeProperties {
    /// Subscription Identifier (0x0B), 1..=268,435,455.
    pub subscription_identifier: Option<u32>,
    /// User properties (0x26).
    pub user_properties: UserProperties,
}

impl SubscribeProperties {
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        const P: &str = "SUBSCRIBE";
        let mut c = Self::default();
        let up = decode_block(r, P, false, |p| {
            match p {
                Property::VarInt(id::SUBSCRIPTION_IDENTIFIER, v) => {
                    c.subscription_identifier = Some(v)
                }
                other => return Err(not_allowed(&other, P)),
            }
            Ok(())
        })?;
        c.user_properties = up;
        Ok(c)
    }
}

impl Props for SubscribeProperties {
    fn visit<S: Sink>(&self, s: &mut S) {
        if let Some(v) = self.subscription_identifier {
            s.varint(id::SUBSCRIPTION_IDENTIFIER, v);
        }
        self.user_properties.visit(s);
    }
}

/// UNSUBSCRIBE properties (§3.10.2.1): user properties only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnsubscribeProperties {
    /// User properties (0x26).
    pub user_properties: UserProperties,
}

impl UnsubscribeProperties {
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        const P: &str = "UNSUBSCRIBE";
        let up = decode_block(r, P, false, |p| Err(not_allowed(&p, P)))?;
        Ok(Self { user_properties: up })
    }
}

impl Props for UnsubscribeProperties {
    fn visit<S: Sink>(&self, s: &mut S) {
        self.user_properties.visit(s);
    }
}

/// DISCONNECT properties (§3.14.2.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DisconnectProperties {
    /// Session Expiry Interval in seconds (0x11), client to server only.
    pub session_expiry_interval: Option<u32>,
    /// Reason String (0x1F), UTF-8.
    pub reason_string: Option<Bytes>,
    /// User properties (0x26).
    pub user_properties: UserProperties,
    /// Server Reference (0x1C), UTF-8.
    pub server_reference: Option<Bytes>,
}

impl DisconnectProperties {
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        const P: &str = "DISCONNECT";
        let mut c = Self::default();
        let up = decode_block(r, P, false, |p| {
            match p {
                Property::U32(id::SESSION_EXPIRY_INTERVAL, v) => {
                    c.session_expiry_interval = Some(v)
                }
                Property::Str(id::REASON_STRING, v) => c.reason_string = Some(v),
                Property::Str(id::SERVER_REFERENCE, v) => c.server_reference = Some(v),
                other => return Err(not_allowed(&other, P)),
            }
            Ok(())
        })?;
        c.user_properties = up;
        Ok(c)
    }

    /// Whether no property is set.
    pub fn is_empty(&self) -> bool {
        self.session_expiry_interval.is_none()
            && self.reason_string.is_none()
            && self.user_properties.is_empty()
            && self.server_reference.is_none()
    }
}

impl Props for DisconnectProperties {
    fn visit<S: Sink>(&self, s: &mut S) {
        opt_u32(s, id::SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        opt_str(s, id::REASON_STRING, &self.reason_string, "reason string");
        self.user_properties.visit(s);
        opt_str(s, id::SERVER_REFERENCE, &self.server_reference, "server reference");
    }
}

/// AUTH properties (§3.15.2.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthProperties {
    /// Authentication Method (0x15), UTF-8.
    pub authentication_method: Option<Bytes>,
    /// Authentication Data (0x16).
    pub authentication_data: Option<Bytes>,
    /// Reason String (0x1F), UTF-8.
    pub reason_string: Option<Bytes>,
    /// User properties (0x26).
    pub user_properties: UserProperties,
}

impl AuthProperties {
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        const P: &str = "AUTH";
        let mut c = Self::default();
        let up = decode_block(r, P, false, |p| {
            match p {
                Property::Str(id::AUTHENTICATION_METHOD, v) => c.authentication_method = Some(v),
                Property::Bin(id::AUTHENTICATION_DATA, v) => c.authentication_data = Some(v),
                Property::Str(id::REASON_STRING, v) => c.reason_string = Some(v),
                other => return Err(not_allowed(&other, P)),
            }
            Ok(())
        })?;
        c.user_properties = up;
        Ok(c)
    }

    /// Whether no property is set.
    pub fn is_empty(&self) -> bool {
        self.authentication_method.is_none()
            && self.authentication_data.is_none()
            && self.reason_string.is_none()
            && self.user_properties.is_empty()
    }
}

impl Props for AuthProperties {
    fn visit<S: Sink>(&self, s: &mut S) {
        opt_str(s, id::AUTHENTICATION_METHOD, &self.authentication_method, "authentication method");
        opt_bin(s, id::AUTHENTICATION_DATA, &self.authentication_data, "authentication data");
        opt_str(s, id::REASON_STRING, &self.reason_string, "reason string");
        self.user_properties.visit(s);
    }
}
