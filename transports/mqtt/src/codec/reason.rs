//! Reason codes: one enum for MQTT 5 reason codes (§2.4) with the mapping to MQTT 3.1.1
//! CONNACK return codes (§3.2.2.3) and SUBACK return codes (§3.9.3), and the per-packet lists of
//! which codes are valid.

/// An MQTT 5 reason code. Byte 0x00 means "Success", "Normal disconnection" or "Granted QoS 0"
/// depending on the packet; all three are [`ReasonCode::Success`] (with aliases as constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReasonCode {
    /// 0x00: Success / Normal disconnection / Granted QoS 0.
    Success,
    /// 0x01: Granted QoS 1 (SUBACK).
    GrantedQoS1,
    /// 0x02: Granted QoS 2 (SUBACK).
    GrantedQoS2,
    /// 0x04: Disconnect with Will Message (DISCONNECT).
    DisconnectWithWillMessage,
    /// 0x10: No matching subscribers (PUBACK, PUBREC).
    NoMatchingSubscribers,
    /// 0x11: No subscription existed (UNSUBACK).
    NoSubscriptionExisted,
    /// 0x18: Continue authentication (AUTH).
    ContinueAuthentication,
    /// 0x19: Re-authenticate (AUTH).
    ReAuthenticate,
    /// 0x80: Unspecified error (also the MQTT 3.1.1 SUBACK failure code).
    UnspecifiedError,
    /// 0x81: Malformed Packet.
    MalformedPacket,
    /// 0x82: Protocol Error.
    ProtocolError,
    /// 0x83: Implementation specific error.
    ImplementationSpecificError,
    /// 0x84: Unsupported Protocol Version (3.1.1 CONNACK return code 1).
    UnsupportedProtocolVersion,
    /// 0x85: Client Identifier not valid (3.1.1 return code 2).
    ClientIdentifierNotValid,
    /// 0x86: Bad User Name or Password (3.1.1 return code 4).
    BadUserNameOrPassword,
    /// 0x87: Not authorized (3.1.1 return code 5).
    NotAuthorized,
    /// 0x88: Server unavailable (3.1.1 return code 3).
    ServerUnavailable,
    /// 0x89: Server busy.
    ServerBusy,
    /// 0x8A: Banned.
    Banned,
    /// 0x8B: Server shutting down.
    ServerShuttingDown,
    /// 0x8C: Bad authentication method.
    BadAuthenticationMethod,
    /// 0x8D: Keep Alive timeout.
    KeepAliveTimeout,
    /// 0x8E: Session taken over.
    SessionTakenOver,
    /// 0x8F: Topic Filter invalid.
    TopicFilterInvalid,
    /// 0x90: Topic Name invalid.
    TopicNameInvalid,
    /// 0x91: Packet Identifier in use.
    PacketIdentifierInUse,
    /// 0x92: Packet Identifier not found.
    PacketIdentifierNotFound,
    /// 0x93: Receive Maximum exceeded.
    ReceiveMaximumExceeded,
    /// 0x94: Topic Alias invalid.
    TopicAliasInvalid,
    /// 0x95: Packet too large.
    PacketTooLarge,
    /// 0x96: Message rate too high.
    MessageRateTooHigh,
    /// 0x97: Quota exceeded.
    QuotaExceeded,
    /// 0x98: Administrative action.
    AdministrativeAction,
    /// 0x99: Payload format invalid.
    PayloadFormatInvalid,
    /// 0x9A: Retain not supported.
    RetainNotSupported,
    /// 0x9B: QoS not supported.
    QoSNotSupported,
    /// 0x9C: Use another server.
    UseAnotherServer,
    /// 0x9D: Server moved.
    ServerMoved,
    /// 0x9E: Shared Subscriptions not supported.
    SharedSubscriptionsNotSupported,
    /// 0x9F: Connection rate exceeded.
    ConnectionRateExceeded,
    /// 0xA0: Maximum connect time.
    MaximumConnectTime,
    /// 0xA1: Subscription Identifiers not supported.
    SubscriptionIdentifiersNotSupported,
    /// 0xA2: Wildcard Subscriptions not supported.
    WildcardSubscriptionsNotSupported,
}

/// Which packet a reason code appears in; selects the valid set (MQTT 5 §2.4 table 2-6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReasonContext {
    ConnAck,
    PubAck, // also PUBREC
    PubRel, // also PUBCOMP
    SubAck,
    UnsubAck,
    Disconnect,
    Auth,
}

impl ReasonCode {
    /// "Normal disconnection" (0x00) in DISCONNECT.
    pub const NORMAL_DISCONNECTION: ReasonCode = ReasonCode::Success;
    /// "Granted QoS 0" (0x00) in SUBACK.
    pub const GRANTED_QOS_0: ReasonCode = ReasonCode::Success;

    /// The MQTT 5 byte.
    pub fn to_v5(self) -> u8 {
        use ReasonCode::*;
        match self {
            Success => 0x00,
            GrantedQoS1 => 0x01,
            GrantedQoS2 => 0x02,
            DisconnectWithWillMessage => 0x04,
            NoMatchingSubscribers => 0x10,
            NoSubscriptionExisted => 0x11,
            ContinueAuthentication => 0x18,
            ReAuthenticate => 0x19,
            UnspecifiedError => 0x80,
            MalformedPacket => 0x81,
            ProtocolError => 0x82,
            ImplementationSpecificError => 0x83,
            UnsupportedProtocolVersion => 0x84,
            ClientIdentifierNotValid => 0x85,
            BadUserNameOrPassword => 0x86,
            NotAuthorized => 0x87,
            ServerUnavailable => 0x88,
            ServerBusy => 0x89,
            Banned => 0x8A,
            ServerShuttingDown => 0x8B,
            BadAuthenticationMethod => 0x8C,
            KeepAliveTimeout => 0x8D,
            SessionTakenOver => 0x8E,
            TopicFilterInvalid => 0x8F,
            TopicNameInvalid => 0x90,
            PacketIdentifierInUse => 0x91,
            PacketIdentifierNotFound => 0x92,
            ReceiveMaximumExceeded => 0x93,
            TopicAliasInvalid => 0x94,
            PacketTooLarge => 0x95,
            MessageRateTooHigh => 0x96,
            QuotaExceeded => 0x97,
            AdministrativeAction => 0x98,
            PayloadFormatInvalid => 0x99,
            RetainNotSupported => 0x9A,
            QoSNotSupported => 0x9B,
            UseAnotherServer => 0x9C,
            ServerMoved => 0x9D,
            SharedSubscriptionsNotSupported => 0x9E,
            ConnectionRateExceeded => 0x9F,
            MaximumConnectTime => 0xA0,
            SubscriptionIdentifiersNotSupported => 0xA1,
            WildcardSubscriptionsNotSupported => 0xA2,
        }
    }

    /// The reason code for an MQTT 5 byte, if the byte is a defined reason code.
    pub fn from_v5(byte: u8) -> Option<ReasonCode> {
        use ReasonCode::*;
        Some(match byte {
            0x00 => Success,
            0x01 => GrantedQoS1,
            0x02 => GrantedQoS2,
            0x04 => DisconnectWithWillMessage,
            0x10 => NoMatchingSubscribers,
            0x11 => NoSubscriptionExisted,
            0x18 => ContinueAuthentication,
            0x19 => ReAuthenticate,
            0x80 => UnspecifiedError,
            0x81 => MalformedPacket,
            0x82 => ProtocolError,
            0x83 => ImplementationSpecificError,
            0x84 => UnsupportedProtocolVersion,
            0x85 => ClientIdentifierNotValid,
            0x86 => BadUserNameOrPassword,
            0x87 => NotAuthorized,
            0x88 => ServerUnavailable,
            0x89 => ServerBusy,
            0x8A => Banned,
            0x8B => ServerShuttingDown,
            0x8C => BadAuthenticationMethod,
            0x8D => KeepAliveTimeout,
            0x8E => SessionTakenOver,
            0x8F => TopicFilterInvalid,
            0x90 => TopicNameInvalid,
            0x91 => PacketIdentifierInUse,
            0x92 => PacketIdentifierNotFound,
            0x93 => ReceiveMaximumExceeded,
            0x94 => TopicAliasInvalid,
            0x95 => PacketTooLarge,
            0x96 => MessageRateTooHigh,
            0x97 => QuotaExceeded,
            0x98 => AdministrativeAction,
            0x99 => PayloadFormatInvalid,
            0x9A => RetainNotSupported,
            0x9B => QoSNotSupported,
            0x9C => UseAnotherServer,
            0x9D => ServerMoved,
            0x9E => SharedSubscriptionsNotSupported,
            0x9F => ConnectionRateExceeded,
            0xA0 => MaximumConnectTime,
            0xA1 => SubscriptionIdentifiersNotSupported,
            0xA2 => WildcardSubscriptionsNotSupported,
            _ => return None,
        })
    }

    /// Whether this is an error (byte 0x80 or above).
    pub fn is_error(self) -> bool {
        self.to_v5() >= 0x80
    }

    /// The MQTT 3.1.1 CONNACK return code (§3.2.2.3) for this reason code, or `None` when 3.1.1
    /// has no equivalent (MQTT 3.1.1 then has the server close the connection without CONNACK).
    ///
    /// Besides the five direct equivalents, MQTT 5-only refusals map to their nearest 3.1.1
    /// meaning: Banned → 5 (not authorized), Bad authentication method → 4, and Server busy /
    /// shutting down / moved / use another server / connection rate exceeded / quota exceeded →
    /// 3 (server unavailable).
    pub fn v311_connack_code(self) -> Option<u8> {
        use ReasonCode::*;
        match self {
            Success => Some(0),
            UnsupportedProtocolVersion => Some(1),
            ClientIdentifierNotValid => Some(2),
            ServerUnavailable
            | ServerBusy
            | ServerShuttingDown
            | UseAnotherServer
            | ServerMoved
            | ConnectionRateExceeded
            | QuotaExceeded => Some(3),
            BadUserNameOrPassword | BadAuthenticationMethod => Some(4),
            NotAuthorized | Banned => Some(5),
            _ => None,
        }
    }

    /// The reason code for an MQTT 3.1.1 CONNACK return code.
    pub fn from_v311_connack_code(code: u8) -> Option<ReasonCode> {
        use ReasonCode::*;
        Some(match code {
            0 => Success,
            1 => UnsupportedProtocolVersion,
            2 => ClientIdentifierNotValid,
            3 => ServerUnavailable,
            4 => BadUserNameOrPassword,
            5 => NotAuthorized,
            _ => return None,
        })
    }

    /// The MQTT 3.1.1 SUBACK return code: granted QoS 0/1/2, or 0x80 for any failure.
    /// `None` for a success code that is not a granted QoS.
    pub fn v311_suback_code(self) -> Option<u8> {
        match self {
            ReasonCode::Success => Some(0),
            ReasonCode::GrantedQoS1 => Some(1),
            ReasonCode::GrantedQoS2 => Some(2),
            c if c.is_error() => Some(0x80),
            _ => None,
        }
    }

    /// Whether this code is valid in the given packet (MQTT 5 §2.4 and each packet's section).
    pub(crate) fn valid_in(self, ctx: ReasonContext) -> bool {
        let b = self.to_v5();
        match ctx {
            ReasonContext::ConnAck => matches!(
                b,
                0x00 | 0x80..=0x8A | 0x8C | 0x90 | 0x95 | 0x97 | 0x99..=0x9D | 0x9F
            ),
            ReasonContext::PubAck => {
                matches!(b, 0x00 | 0x10 | 0x80 | 0x83 | 0x87 | 0x90 | 0x91 | 0x97 | 0x99)
            }
            ReasonContext::PubRel => matches!(b, 0x00 | 0x92),
            ReasonContext::SubAck => matches!(
                b,
                0x00..=0x02 | 0x80 | 0x83 | 0x87 | 0x8F | 0x91 | 0x97 | 0x9E | 0xA1 | 0xA2
            ),
            ReasonContext::UnsubAck => {
                matches!(b, 0x00 | 0x11 | 0x80 | 0x83 | 0x87 | 0x8F | 0x91)
            }
            ReasonContext::Disconnect => matches!(
                b,
                0x00 | 0x04 | 0x80..=0x83 | 0x87 | 0x89 | 0x8B | 0x8D..=0x90 | 0x93..=0xA2
            ),
            ReasonContext::Auth => matches!(b, 0x00 | 0x18 | 0x19),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v5_bytes_round_trip() {
        for b in 0..=255u8 {
            if let Some(rc) = ReasonCode::from_v5(b) {
                assert_eq!(rc.to_v5(), b);
            }
        }
    }

    #[test]
    fn v311_connack_mapping() {
        use ReasonCode::*;
        assert_eq!(BadUserNameOrPassword.to_v5(), 0x86);
        assert_eq!(BadUserNameOrPassword.v311_connack_code(), Some(4));
        assert_eq!(NotAuthorized.to_v5(), 0x87);
        assert_eq!(NotAuthorized.v311_connack_code(), Some(5));
        assert_eq!(ServerUnavailable.to_v5(), 0x88);
        assert_eq!(ServerUnavailable.v311_connack_code(), Some(3));
        assert_eq!(UnsupportedProtocolVersion.to_v5(), 0x84);
        assert_eq!(UnsupportedProtocolVersion.v311_connack_code(), Some(1));
        assert_eq!(ClientIdentifierNotValid.to_v5(), 0x85);
        assert_eq!(ClientIdentifierNotValid.v311_connack_code(), Some(2));
        assert_eq!(Success.v311_connack_code(), Some(0));
        assert_eq!(MalformedPacket.v311_connack_code(), None);
        for c in 0..=5 {
            let rc = ReasonCode::from_v311_connack_code(c).expect("defined");
            assert_eq!(rc.v311_connack_code(), Some(c));
        }
        assert_eq!(ReasonCode::from_v311_connack_code(6), None);
    }
}
