//! Codec errors.
//!
//! A [`DecodeError`] is always the **peer's** fault: the bytes it sent break the MQTT
//! specification. Each maps to the MQTT 5 reason code the server sends in a DISCONNECT (or a
//! CONNACK while connecting) before closing; for MQTT 3.1.1 the server just closes (or sends the
//! CONNACK return code from [`ReasonCode::v311_connack_code`]).
//!
//! An [`EncodeError`] is the **local caller's** fault (a bug or a misconfiguration: a field out of
//! range, a packet the negotiated version does not have), except
//! [`EncodeError::PacketTooLarge`], which means the packet exceeds the Maximum Packet Size the
//! peer announced: MQTT 5 §3.1.2.11.4 says to discard such a message as if it had been sent.

use super::reason::ReasonCode;

/// Why inbound bytes could not be decoded. Always the peer's fault; fatal for the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The fixed header declares a packet larger than this side accepts. Detected before the
    /// body is buffered.
    #[error("peer sent a {size}-byte packet; the limit is {max} bytes")]
    PacketTooLarge {
        /// Declared size of the whole packet, fixed header included.
        size: usize,
        /// The inbound limit.
        max: u32,
    },
    /// The Remaining Length does not end within four bytes.
    #[error("peer sent a malformed remaining length (more than four bytes)")]
    MalformedRemainingLength,
    /// The packet does not follow the wire format; names the offending field.
    #[error("peer sent a malformed packet: {0}")]
    MalformedPacket(&'static str),
    /// The packet is well-formed but breaks a protocol rule; says which.
    #[error("peer broke the MQTT protocol: {0}")]
    ProtocolError(&'static str),
    /// CONNECT asked for a protocol level other than 4 (3.1.1) or 5 (5.0).
    #[error("peer asked for unsupported MQTT protocol level {0}")]
    UnsupportedProtocolVersion(u8),
    /// A UTF-8 Encoded String is not valid UTF-8 or contains U+0000.
    #[error("peer sent a string that is not valid MQTT UTF-8")]
    InvalidUtf8,
    /// A Topic Name is empty (without a Topic Alias) or contains a wildcard.
    #[error("peer sent an invalid topic name")]
    TopicInvalid,
    /// A Topic Filter breaks the wildcard rules.
    #[error("peer sent an invalid topic filter")]
    TopicFilterInvalid,
    /// The first packet on the connection was not CONNECT.
    #[error("peer's first packet was not CONNECT")]
    FirstPacketNotConnect,
    /// A second CONNECT on the same connection.
    #[error("peer sent a second CONNECT")]
    DuplicateConnect,
    /// The flags in the fixed header are not the ones the spec fixes for this packet type.
    #[error("peer set reserved fixed-header flags {flags:#06b} on packet type {packet_type}")]
    ReservedFlags {
        /// Control packet type (upper nibble of the first byte).
        packet_type: u8,
        /// The lower nibble it sent.
        flags: u8,
    },
    /// A property appears more than once where the spec allows it once.
    #[error("peer repeated property {0:#04x}")]
    DuplicateProperty(u8),
    /// A property identifier that does not exist or is not allowed in this packet type.
    #[error("peer sent property {id:#04x}, not allowed in {packet}")]
    PropertyNotAllowed {
        /// Property identifier.
        id: u8,
        /// Packet (or will) it appeared in.
        packet: &'static str,
    },
    /// A reason code that is not defined for this packet type.
    #[error("peer sent reason code {code:#04x}, not valid in {packet}")]
    InvalidReasonCode {
        /// The byte it sent.
        code: u8,
        /// Packet it appeared in.
        packet: &'static str,
    },
}

impl DecodeError {
    /// The MQTT 5 reason code to send in the DISCONNECT (or CONNACK) that answers this error.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            DecodeError::MalformedRemainingLength
            | DecodeError::MalformedPacket(_)
            | DecodeError::InvalidUtf8
            | DecodeError::ReservedFlags { .. }
            | DecodeError::PropertyNotAllowed { .. }
            | DecodeError::InvalidReasonCode { .. } => ReasonCode::MalformedPacket,
            DecodeError::ProtocolError(_)
            | DecodeError::FirstPacketNotConnect
            | DecodeError::DuplicateConnect
            | DecodeError::DuplicateProperty(_) => ReasonCode::ProtocolError,
            DecodeError::UnsupportedProtocolVersion(_) => ReasonCode::UnsupportedProtocolVersion,
            DecodeError::TopicInvalid => ReasonCode::TopicNameInvalid,
            DecodeError::TopicFilterInvalid => ReasonCode::TopicFilterInvalid,
        }
    }
}

/// Why a packet could not be encoded. Nothing is written to the output when this is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The packet exceeds the peer's Maximum Packet Size (or the protocol's 256 MiB limit).
    /// Not a bug: discard the message.
    #[error("packet of {size} bytes exceeds the peer's maximum packet size {max}")]
    PacketTooLarge {
        /// Size the packet would have, fixed header included.
        size: usize,
        /// The limit it exceeds.
        max: usize,
    },
    /// The codec does not know the protocol version yet (no CONNECT decoded, none set).
    #[error("bug: protocol version not set before encoding")]
    VersionUnknown,
    /// The packet or field does not exist in the negotiated protocol version.
    #[error("bug: {0} does not exist in the negotiated MQTT version")]
    NotInVersion(&'static str),
    /// A string or binary field is longer than 65,535 bytes.
    #[error("bug: field {0} is longer than 65535 bytes")]
    FieldTooLong(&'static str),
    /// A string field is not valid UTF-8 or contains U+0000.
    #[error("bug: field {0} is not valid MQTT UTF-8")]
    InvalidUtf8(&'static str),
    /// A Topic Name is empty (without a Topic Alias) or contains a wildcard.
    #[error("bug: invalid topic name")]
    TopicInvalid,
    /// A Topic Filter breaks the wildcard rules.
    #[error("bug: invalid topic filter")]
    TopicFilterInvalid,
    /// A field holds a value the spec does not allow; names the field.
    #[error("bug: {0} is out of range")]
    OutOfRange(&'static str),
}
