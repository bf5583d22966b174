//! A sans-IO, zero-copy codec for MQTT 3.1.1 (protocol level 4) and MQTT 5.0 (level 5).
//!
//! Bytes in, packets out: [`Codec::decode`] takes one packet off the front of a read buffer,
//! [`Codec::encode`] appends one packet to a write buffer. Every packet type decodes and encodes
//! in both versions, so the same codec serves the server and a client (the load generator).
//!
//! - **Zero-copy.** A complete frame is cut off the read buffer with `split_to(..).freeze()`;
//!   topic, payload, strings, binary fields and user properties are `Bytes` slices of it.
//!   Decoding a PUBLISH does not allocate, in either version, unless it carries Subscription
//!   Identifiers (a `Vec`; sent only from server to client).
//! - **Bounded.** The Remaining Length is checked against the inbound limit as soon as the fixed
//!   header is readable, so an oversized packet is refused before its body is buffered. Nothing
//!   is allocated in proportion to a length the peer declares.
//! - **Strict.** Reserved flags, QoS 3, wildcards in topic names, malformed UTF-8 or U+0000,
//!   duplicate or misplaced properties, invalid reason codes and trailing bytes are errors, each
//!   mapped to an MQTT 5 reason code by [`DecodeError::reason_code`]. Any input is safe: the
//!   decoder never panics.
//!
//! What it does not do: I/O, timers, sessions, packet-identifier bookkeeping, topic-alias
//! mapping, keep-alive, flow control (Receive Maximum), or checking which direction a packet may
//! travel in (a server should refuse a CONNACK from a client; the codec decodes it). It does
//! not check that a payload marked as UTF-8 (Payload Format Indicator) is UTF-8.
//!
//! ```
//! use bytes::BytesMut;
//! use fleetgate_transport_mqtt::codec::{Codec, Packet};
//!
//! let mut codec = Codec::new(64 * 1024);
//! // CONNECT, MQTT 3.1.1, clean session, keep alive 60 s, client id "a".
//! let mut buf = BytesMut::from(&b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01a"[..]);
//! let Some(Packet::Connect(c)) = codec.decode(&mut buf)? else { panic!() };
//! assert_eq!(&c.client_id[..], b"a");
//! assert!(buf.is_empty());
//! # Ok::<(), fleetgate_transport_mqtt::codec::DecodeError>(())
//! ```

mod error;
mod packet;
mod properties;
mod reason;
mod wire;

#[cfg(test)]
mod tests;

use bytes::BytesMut;

pub use error::{DecodeError, EncodeError};
pub use packet::{
    Auth, ConnAck, Connect, Disconnect, Packet, PubAck, Publish, PublishHeader, RetainHandling,
    SubAck, Subscribe, Subscription, SubscriptionOptions, UnsubAck, Unsubscribe, Will,
};
pub use properties::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    PublishProperties, SubscribeProperties, UnsubscribeProperties, UserProperties,
    UserPropertyIter, WillProperties,
};
pub use reason::ReasonCode;

use wire::VarInt;

/// The largest packet MQTT can express: a one-byte type, a four-byte Remaining Length, and a
/// body of 268,435,455 bytes.
pub const MAX_PACKET_SIZE: u32 = 1 + 4 + wire::MAX_VARINT;

/// MQTT protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1.1, protocol level 4.
    V311,
    /// MQTT 5.0, protocol level 5.
    V5,
}

impl ProtocolVersion {
    /// The protocol level byte in CONNECT.
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V311 => 4,
            ProtocolVersion::V5 => 5,
        }
    }
}

/// Quality of Service level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum QoS {
    /// QoS 0: at most once.
    AtMostOnce = 0,
    /// QoS 1: at least once.
    AtLeastOnce = 1,
    /// QoS 2: exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for 0, 1 or 2.
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// The MQTT codec state of one connection: the negotiated version and the size limits.
///
/// A server creates it with [`Codec::new`] and lets the first decoded CONNECT set the version.
/// A client sets the version with [`Codec::set_version`] before decoding anything.
#[derive(Debug, Clone)]
pub struct Codec {
    version: Option<ProtocolVersion>,
    max_inbound: u32,
    max_outbound: u32,
    connect_seen: bool,
}

impl Codec {
    /// A codec whose inbound packets may be at most `max_packet_size` bytes (whole packet,
    /// fixed header included). Outbound packets are limited only by the protocol until
    /// [`Codec::set_max_outbound_packet_size`].
    pub fn new(max_packet_size: u32) -> Self {
        Codec {
            version: None,
            max_inbound: max_packet_size,
            max_outbound: MAX_PACKET_SIZE,
            connect_seen: false,
        }
    }

    /// Sets the protocol version (a client does this before sending CONNECT).
    pub fn set_version(&mut self, v: ProtocolVersion) {
        self.version = Some(v);
    }

    /// The protocol version: `None` until CONNECT is decoded or the version is set.
    pub fn version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    /// The inbound packet size limit.
    pub fn max_inbound_packet_size(&self) -> u32 {
        self.max_inbound
    }

    /// Changes the inbound packet size limit (a server allows a bigger one once CONNECT is
    /// through).
    pub fn set_max_inbound_packet_size(&mut self, max: u32) {
        self.max_inbound = max;
    }

    /// Limits outbound packets to the peer's Maximum Packet Size (from its CONNECT or CONNACK).
    pub fn set_max_outbound_packet_size(&mut self, max: u32) {
        self.max_outbound = max;
    }

    /// The outbound packet size limit.
    pub fn max_outbound_packet_size(&self) -> u32 {
        self.max_outbound
    }

    /// Decodes one packet from the front of `buf`.
    ///
    /// `Ok(None)` means more bytes are needed; `buf` is then untouched. On `Ok(Some(_))` the
    /// packet's bytes have been split off `buf`, and the packet's fields share them. The size
    /// limit is checked as soon as the fixed header is readable, before the body arrives.
    /// Decoding CONNECT sets the version; any other packet before it is
    /// [`DecodeError::FirstPacketNotConnect`] unless the version was set. Every error is fatal
    /// for the connection; the buffer contents are then unspecified.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        let (rem, len_bytes) = match wire::read_varint(buf.get(1..).unwrap_or_default())? {
            VarInt::Done(v, n) => (v, n),
            VarInt::Incomplete => return Ok(None),
        };
        // At most 1 + 4 + 268,435,455: no overflow even on 32-bit targets.
        let total = 1 + len_bytes + rem as usize;
        if total > self.max_inbound as usize {
            return Err(DecodeError::PacketTooLarge { size: total, max: self.max_inbound });
        }
        let packet_type = first >> 4;
        if packet_type == packet::kind::CONNECT {
            if self.connect_seen {
                return Err(DecodeError::DuplicateConnect);
            }
        } else if self.version.is_none() {
            return Err(DecodeError::FirstPacketNotConnect);
        }
        if buf.len() < total {
            return Ok(None);
        }
        let frame = buf.split_to(total).freeze();
        let mut connect_version = None;
        let result = packet::decode_frame(frame, 1 + len_bytes, self.version, &mut connect_version);
        if packet_type == packet::kind::CONNECT {
            self.connect_seen = true;
            if connect_version.is_some() {
                self.version = connect_version;
            }
        }
        result.map(Some)
    }

    /// Appends the encoding of `packet` for the current version to `out`.
    ///
    /// CONNECT is encoded in its own `protocol_version`; every other packet needs the version
    /// to be known. Fails without writing anything if a field is out of range, the packet does
    /// not exist in this version, or the packet would exceed the outbound size limit. MQTT 5-only
    /// properties are ignored when encoding 3.1.1.
    pub fn encode(&self, packet: &Packet, out: &mut BytesMut) -> Result<(), EncodeError> {
        packet::encode_packet(packet, self.version, self.max_outbound as usize, out)
    }

    /// Appends a PUBLISH whose topic is the concatenation of `topic_parts`, without building
    /// the topic or a [`Publish`] first: the fast path for the gateway's own responses.
    ///
    /// `properties` is for MQTT 5 (ignored in 3.1.1); `None` means no properties.
    pub fn encode_publish_parts(
        &self,
        header: PublishHeader,
        topic_parts: &[&[u8]],
        properties: Option<&PublishProperties>,
        payload: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        let v5 = self.version.ok_or(EncodeError::VersionUnknown)? == ProtocolVersion::V5;
        let none;
        let props = match properties {
            Some(p) => p,
            None => {
                none = PublishProperties::default();
                &none
            }
        };
        packet::encode_publish(
            v5,
            self.max_outbound as usize,
            header,
            topic_parts,
            props,
            payload,
            out,
        )
    }
}
