//! Codec tests: byte-exact vectors written from the MQTT 3.1.1 and 5.0 specifications, round
//! trips, incremental decoding, limits, error cases and garbage input.

#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

const V3: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn codec(v: ProtocolVersion) -> Codec {
    let mut c = Codec::new(MAX_PACKET_SIZE);
    c.set_version(v);
    c
}

/// Decodes exactly one packet from `bytes` with a codec of version `v` (a fresh server codec
/// for CONNECT).
fn dec(v: ProtocolVersion, bytes: &[u8]) -> Result<Packet, DecodeError> {
    let mut c = if bytes.first().is_some_and(|&f| f >> 4 == 1) {
        Codec::new(MAX_PACKET_SIZE)
    } else {
        codec(v)
    };
    let mut buf = BytesMut::from(bytes);
    let p = c.decode(&mut buf)?.expect("complete packet");
    assert!(buf.is_empty(), "trailing bytes after one packet");
    Ok(p)
}

fn enc(v: ProtocolVersion, p: &Packet) -> Result<Vec<u8>, EncodeError> {
    let mut out = BytesMut::new();
    codec(v).encode(p, &mut out)?;
    Ok(out.to_vec())
}

/// Checks both directions of a vector.
#[track_caller]
fn vector(v: ProtocolVersion, bytes: &[u8], packet: Packet) {
    assert_eq!(dec(v, bytes).unwrap(), packet, "decode");
    assert_eq!(enc(v, &packet).unwrap(), bytes, "encode");
}

fn connect(v: ProtocolVersion, client_id: &str) -> Connect {
    Connect {
        protocol_version: v,
        clean_start: true,
        keep_alive_secs: 60,
        client_id: b(client_id),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }
}

fn publish(qos: QoS, topic: &str, packet_id: Option<u16>, payload: &str) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: b(topic),
        packet_id,
        properties: PublishProperties::default(),
        payload: b(payload),
    }
}

// ---------------------------------------------------------------------------------------------
// Byte-exact vectors
// ---------------------------------------------------------------------------------------------

#[test]
fn v311_connect_with_username_password() {
    let bytes = b"\x10\x1b\x00\x04MQTT\x04\xc2\x00\x3c\x00\x03cid\x00\x04user\x00\x04pass";
    let mut c = connect(V3, "cid");
    c.username = Some(b("user"));
    c.password = Some(b("pass"));
    vector(V3, bytes, Packet::Connect(Box::new(c)));
}

#[test]
fn v311_connect_with_will() {
    // Will flag 0x04, will QoS 1 (0x08), will retain 0x20, clean session 0x02.
    let bytes = b"\x10\x17\x00\x04MQTT\x04\x2e\x00\x0a\x00\x01c\x00\x03w/t\x00\x03bye";
    let mut c = connect(V3, "c");
    c.keep_alive_secs = 10;
    c.will = Some(Will {
        topic: b("w/t"),
        payload: b("bye"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: WillProperties::default(),
    });
    vector(V3, bytes, Packet::Connect(Box::new(c)));
}

#[test]
fn v5_connect_with_properties() {
    let bytes = b"\x10\x26\x00\x04MQTT\x05\x02\x00\x3c\x17\
        \x11\x00\x00\x0e\x10\
        \x21\x00\x14\
        \x27\x00\x00\x10\x00\
        \x22\x00\x0a\
        \x26\x00\x01k\x00\x01v\
        \x00\x02id";
    let mut c = connect(V5, "id");
    c.properties = ConnectProperties {
        session_expiry_interval: Some(3600),
        receive_maximum: Some(20),
        maximum_packet_size: Some(4096),
        topic_alias_maximum: Some(10),
        user_properties: UserProperties::from_pairs([("k", "v")]).unwrap(),
        ..ConnectProperties::default()
    };
    vector(V5, bytes, Packet::Connect(Box::new(c.clone())));
    let Packet::Connect(d) = dec(V5, bytes).unwrap() else { panic!() };
    let pairs: Vec<_> = d.properties.user_properties.iter().collect();
    assert_eq!(pairs, vec![(b("k"), b("v"))]);
}

#[test]
fn v5_connect_with_will_properties_and_auth() {
    let bytes = b"\x10\x24\x00\x04MQTT\x05\xc4\x00\x00\
        \x05\x15\x00\x02am\
        \x00\x00\
        \x05\x18\x00\x00\x00\x05\
        \x00\x01t\x00\x00\
        \x00\x01u\x00\x02pw";
    // flags: username 0x80, password 0x40, will 0x04 (QoS 0, no retain), no clean start.
    let c = Connect {
        protocol_version: V5,
        clean_start: false,
        keep_alive_secs: 0,
        client_id: Bytes::new(),
        will: Some(Will {
            topic: b("t"),
            payload: Bytes::new(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: WillProperties {
                will_delay_interval: Some(5),
                ..WillProperties::default()
            },
        }),
        username: Some(b("u")),
        password: Some(b("pw")),
        properties: ConnectProperties {
            authentication_method: Some(b("am")),
            ..ConnectProperties::default()
        },
    };
    vector(V5, bytes, Packet::Connect(Box::new(c)));
}

#[test]
fn connack_vectors() {
    let ok = ConnAck {
        session_present: false,
        reason_code: ReasonCode::Success,
        properties: ConnAckProperties::default(),
    };
    vector(V3, b"\x20\x02\x00\x00", Packet::ConnAck(Box::new(ok.clone())));
    vector(V5, b"\x20\x03\x00\x00\x00", Packet::ConnAck(Box::new(ok.clone())));
    let bad = ConnAck { reason_code: ReasonCode::BadUserNameOrPassword, ..ok.clone() };
    vector(V3, b"\x20\x02\x00\x04", Packet::ConnAck(Box::new(bad.clone())));
    vector(V5, b"\x20\x03\x00\x86\x00", Packet::ConnAck(Box::new(bad)));
    let full = ConnAck {
        session_present: true,
        reason_code: ReasonCode::Success,
        properties: ConnAckProperties {
            receive_maximum: Some(100),
            maximum_qos: Some(QoS::AtLeastOnce),
            retain_available: Some(false),
            assigned_client_identifier: Some(b("x")),
            topic_alias_maximum: Some(0),
            server_keep_alive: Some(30),
            ..ConnAckProperties::default()
        },
    };
    vector(
        V5,
        b"\x20\x14\x01\x00\x11\
          \x21\x00\x64\x24\x01\x25\x00\x12\x00\x01x\x22\x00\x00\x13\x00\x1e",
        Packet::ConnAck(Box::new(full)),
    );
    // A 3.1.1 CONNACK cannot carry a v5-only refusal without an equivalent.
    let m = ConnAck { reason_code: ReasonCode::MalformedPacket, ..ok };
    assert_eq!(
        enc(V3, &Packet::ConnAck(Box::new(m))),
        Err(EncodeError::NotInVersion("this CONNACK reason code"))
    );
}

#[test]
fn publish_vectors() {
    vector(
        V3,
        b"\x30\x0a\x00\x03a/bhello",
        Packet::Publish(publish(QoS::AtMostOnce, "a/b", None, "hello")),
    );
    // DUP, QoS 1, RETAIN: 0x3b.
    let mut p = publish(QoS::AtLeastOnce, "a/b", Some(7), "hi");
    p.dup = true;
    p.retain = true;
    vector(V3, b"\x3b\x09\x00\x03a/b\x00\x07hi", Packet::Publish(p.clone()));
    // MQTT 5: an empty property block.
    vector(V5, b"\x3b\x0a\x00\x03a/b\x00\x07\x00hi", Packet::Publish(p));
    vector(
        V5,
        b"\x30\x08\x00\x03a/b\x00hi",
        Packet::Publish(publish(QoS::AtMostOnce, "a/b", None, "hi")),
    );
    // MQTT 5 with payload format indicator and topic alias; QoS 2.
    let mut p = publish(QoS::ExactlyOnce, "a/b", Some(10), "x");
    p.properties.payload_format_indicator = Some(true);
    p.properties.topic_alias = Some(5);
    vector(V5, b"\x34\x0e\x00\x03a/b\x00\x0a\x05\x01\x01\x23\x00\x05x", Packet::Publish(p));
    // MQTT 5: empty topic with a topic alias.
    let mut p = publish(QoS::AtMostOnce, "", None, "");
    p.properties.topic_alias = Some(1);
    vector(V5, b"\x30\x06\x00\x00\x03\x23\x00\x01", Packet::Publish(p));
}

#[test]
fn puback_family_vectors() {
    vector(V3, b"\x40\x02\x00\x07", Packet::PubAck(PubAck::new(7)));
    vector(V3, b"\x50\x02\x00\x07", Packet::PubRec(PubAck::new(7)));
    vector(V3, b"\x62\x02\x00\x07", Packet::PubRel(PubAck::new(7)));
    vector(V3, b"\x70\x02\x00\x07", Packet::PubComp(PubAck::new(7)));
    // MQTT 5 short form: remaining length 2 means reason 0x00 and no properties.
    vector(V5, b"\x40\x02\x00\x07", Packet::PubAck(PubAck::new(7)));
    let nms = PubAck { reason_code: ReasonCode::NoMatchingSubscribers, ..PubAck::new(7) };
    vector(V5, b"\x40\x03\x00\x07\x10", Packet::PubAck(nms.clone()));
    // Reason code with an empty property block decodes the same.
    assert_eq!(dec(V5, b"\x40\x04\x00\x07\x10\x00").unwrap(), Packet::PubAck(nms));
    assert_eq!(dec(V5, b"\x40\x04\x00\x07\x00\x00").unwrap(), Packet::PubAck(PubAck::new(7)));
    let with_reason = PubAck {
        reason_code: ReasonCode::PacketIdentifierNotFound,
        properties: AckProperties { reason_string: Some(b("gone")), ..AckProperties::default() },
        ..PubAck::new(1)
    };
    vector(V5, b"\x62\x0b\x00\x01\x92\x07\x1f\x00\x04gone", Packet::PubRel(with_reason));
}

#[test]
fn subscribe_vectors() {
    let s = Subscribe {
        packet_id: 1,
        subscriptions: vec![
            Subscription {
                filter: b("a/+/b"),
                options: SubscriptionOptions::new(QoS::AtLeastOnce),
            },
            Subscription { filter: b("c/#"), options: SubscriptionOptions::new(QoS::AtMostOnce) },
        ],
        properties: SubscribeProperties::default(),
    };
    vector(V3, b"\x82\x10\x00\x01\x00\x05a/+/b\x01\x00\x03c/#\x00", Packet::Subscribe(s));
    let s5 = Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: b("#"),
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: RetainHandling::DoNotSend,
            },
        }],
        properties: SubscribeProperties {
            subscription_identifier: Some(5),
            ..SubscribeProperties::default()
        },
    };
    vector(V5, b"\x82\x09\x00\x01\x02\x0b\x05\x00\x01#\x2d", Packet::Subscribe(s5));
}

#[test]
fn suback_unsubscribe_unsuback_vectors() {
    let sa = SubAck {
        packet_id: 1,
        reason_codes: vec![ReasonCode::GrantedQoS1, ReasonCode::UnspecifiedError],
        properties: AckProperties::default(),
    };
    vector(V3, b"\x90\x04\x00\x01\x01\x80", Packet::SubAck(sa.clone()));
    vector(V5, b"\x90\x05\x00\x01\x00\x01\x80", Packet::SubAck(sa));
    // 3.1.1 folds every failure into 0x80.
    let sa = SubAck {
        packet_id: 1,
        reason_codes: vec![ReasonCode::NotAuthorized],
        properties: AckProperties::default(),
    };
    assert_eq!(enc(V3, &Packet::SubAck(sa)).unwrap(), b"\x90\x03\x00\x01\x80");

    let u = Unsubscribe {
        packet_id: 2,
        filters: vec![b("a")],
        properties: UnsubscribeProperties::default(),
    };
    vector(V3, b"\xa2\x05\x00\x02\x00\x01a", Packet::Unsubscribe(u.clone()));
    vector(V5, b"\xa2\x06\x00\x02\x00\x00\x01a", Packet::Unsubscribe(u));
    vector(
        V3,
        b"\xb0\x02\x00\x02",
        Packet::UnsubAck(UnsubAck {
            packet_id: 2,
            reason_codes: vec![],
            properties: AckProperties::default(),
        }),
    );
    vector(
        V5,
        b"\xb0\x04\x00\x02\x00\x11",
        Packet::UnsubAck(UnsubAck {
            packet_id: 2,
            reason_codes: vec![ReasonCode::NoSubscriptionExisted],
            properties: AckProperties::default(),
        }),
    );
}

#[test]
fn ping_disconnect_auth_vectors() {
    for v in [V3, V5] {
        vector(v, b"\xc0\x00", Packet::PingReq);
        vector(v, b"\xd0\x00", Packet::PingResp);
        vector(v, b"\xe0\x00", Packet::Disconnect(Disconnect::normal()));
    }
    vector(
        V5,
        b"\xe0\x01\x8e",
        Packet::Disconnect(Disconnect::with_reason(ReasonCode::SessionTakenOver)),
    );
    vector(
        V5,
        b"\xe0\x07\x04\x05\x11\x00\x00\x00\x3c",
        Packet::Disconnect(Disconnect {
            reason_code: ReasonCode::DisconnectWithWillMessage,
            properties: DisconnectProperties {
                session_expiry_interval: Some(60),
                ..DisconnectProperties::default()
            },
        }),
    );
    // Remaining length 2 with an empty property block means the same as 1.
    assert_eq!(
        dec(V5, b"\xe0\x02\x8e\x00").unwrap(),
        Packet::Disconnect(Disconnect::with_reason(ReasonCode::SessionTakenOver))
    );
    vector(
        V5,
        b"\xf0\x00",
        Packet::Auth(Auth {
            reason_code: ReasonCode::Success,
            properties: AuthProperties::default(),
        }),
    );
    vector(
        V5,
        b"\xf0\x0d\x18\x0b\x15\x00\x04SCRM\x16\x00\x01\x01",
        Packet::Auth(Auth {
            reason_code: ReasonCode::ContinueAuthentication,
            properties: AuthProperties {
                authentication_method: Some(b("SCRM")),
                authentication_data: Some(Bytes::from_static(b"\x01")),
                ..AuthProperties::default()
            },
        }),
    );
    let auth = Packet::Auth(Auth {
        reason_code: ReasonCode::Success,
        properties: AuthProperties::default(),
    });
    assert_eq!(enc(V3, &auth), Err(EncodeError::NotInVersion("AUTH")));
}

// ---------------------------------------------------------------------------------------------
// Decoder behaviour
// ---------------------------------------------------------------------------------------------

#[test]
fn connect_sets_version_and_first_packet_rules() {
    let mut c = Codec::new(1024);
    assert_eq!(c.version(), None);
    let mut buf = BytesMut::from(&b"\xc0\x00"[..]);
    assert_eq!(c.decode(&mut buf), Err(DecodeError::FirstPacketNotConnect));

    let mut c = Codec::new(1024);
    let mut buf = BytesMut::from(&b"\x10\x0d\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00"[..]);
    assert!(matches!(c.decode(&mut buf), Ok(Some(Packet::Connect(_)))));
    assert_eq!(c.version(), Some(V5));
    let mut buf = BytesMut::from(&b"\x10\x0d\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00"[..]);
    assert_eq!(c.decode(&mut buf), Err(DecodeError::DuplicateConnect));
}

#[test]
fn unsupported_versions() {
    // MQTT 3.1.
    let bytes = b"\x10\x0f\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x01a";
    assert_eq!(dec(V3, bytes), Err(DecodeError::UnsupportedProtocolVersion(3)));
    let bytes = b"\x10\x0d\x00\x04MQTT\x06\x02\x00\x3c\x00\x01a";
    let e = dec(V3, bytes).unwrap_err();
    assert_eq!(e, DecodeError::UnsupportedProtocolVersion(6));
    assert_eq!(e.reason_code(), ReasonCode::UnsupportedProtocolVersion);
    // An error after the level is answered in the right version.
    let mut c = Codec::new(1024);
    let mut buf = BytesMut::from(&b"\x10\x0d\x00\x04MQTT\x05\x03\x00\x3c\x00\x00\x00"[..]);
    assert!(c.decode(&mut buf).is_err());
    assert_eq!(c.version(), Some(V5));
}

#[test]
fn need_more_leaves_buffer_untouched() {
    let mut c = codec(V3);
    let full = b"\x30\x0a\x00\x03a/bhello";
    for n in 0..full.len() {
        let mut buf = BytesMut::from(&full[..n]);
        assert_eq!(c.decode(&mut buf), Ok(None), "prefix {n}");
        assert_eq!(&buf[..], &full[..n]);
    }
}

#[test]
fn size_limit_checked_before_body() {
    let mut c = Codec::new(100);
    c.set_version(V3);
    // Remaining length 1000, body absent.
    let mut buf = BytesMut::from(&b"\x30\xe8\x07"[..]);
    assert_eq!(c.decode(&mut buf), Err(DecodeError::PacketTooLarge { size: 1003, max: 100 }));
    assert_eq!(
        DecodeError::PacketTooLarge { size: 1003, max: 100 }.reason_code(),
        ReasonCode::PacketTooLarge
    );
    // Exactly at the limit is fine: 1 + 1 + 98.
    let mut c = Codec::new(100);
    c.set_version(V3);
    let mut buf = BytesMut::from(&b"\x30\x62\x00\x01a"[..]);
    assert_eq!(c.decode(&mut buf), Ok(None));
    buf.extend_from_slice(&[b'x'; 95]);
    assert!(matches!(c.decode(&mut buf), Ok(Some(Packet::Publish(_)))));
    // Too large CONNECT from a fresh server codec is refused too.
    let mut c = Codec::new(100);
    let mut buf = BytesMut::from(&b"\x10\xff\x7f"[..]);
    assert!(matches!(c.decode(&mut buf), Err(DecodeError::PacketTooLarge { .. })));
}

#[test]
fn remaining_length_five_bytes_is_malformed() {
    let mut c = codec(V3);
    let mut buf = BytesMut::from(&b"\x30\xff\xff\xff\xff\x01"[..]);
    assert_eq!(c.decode(&mut buf), Err(DecodeError::MalformedRemainingLength));
    let mut buf = BytesMut::from(&b"\x30\x80\x80\x80\x80"[..]);
    assert_eq!(c.decode(&mut buf), Err(DecodeError::MalformedRemainingLength));
    assert_eq!(DecodeError::MalformedRemainingLength.reason_code(), ReasonCode::MalformedPacket);
    let mut buf = BytesMut::from(&b"\x30\x80\x80\x80"[..]);
    assert_eq!(c.decode(&mut buf), Ok(None));
}

#[test]
fn zero_copy_slices_of_read_buffer() {
    let mut c = codec(V5);
    let mut buf = BytesMut::with_capacity(256);
    buf.extend_from_slice(b"\x30\x08\x00\x03a/b\x00hi\x30\x08\x00\x03c/d\x00yo");
    let base = buf.as_ptr() as usize;
    let range = base..base + 256;
    for _ in 0..2 {
        let Some(Packet::Publish(p)) = c.decode(&mut buf).unwrap() else { panic!() };
        assert!(range.contains(&(p.topic.as_ptr() as usize)));
        assert!(range.contains(&(p.payload.as_ptr() as usize)));
    }
    assert!(buf.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn err(v: ProtocolVersion, bytes: &[u8]) -> DecodeError {
    match dec(v, bytes) {
        Err(e) => e,
        Ok(p) => panic!("decoded {p:?}"),
    }
}

#[test]
fn error_cases() {
    // QoS 3.
    assert_eq!(
        err(V3, b"\x36\x07\x00\x03a/b\x00\x01"),
        DecodeError::MalformedPacket("PUBLISH QoS 3")
    );
    // Reserved flags: PINGREQ with flags, PUBREL without 0b0010, SUBSCRIBE without 0b0010.
    assert_eq!(err(V3, b"\xc1\x00"), DecodeError::ReservedFlags { packet_type: 12, flags: 1 });
    assert!(matches!(err(V3, b"\x60\x02\x00\x01"), DecodeError::ReservedFlags { .. }));
    assert!(matches!(err(V3, b"\x80\x06\x00\x01\x00\x01a\x00"), DecodeError::ReservedFlags { .. }));
    // Wildcards in a PUBLISH topic.
    assert_eq!(err(V3, b"\x30\x05\x00\x03a/+"), DecodeError::TopicInvalid);
    assert_eq!(err(V3, b"\x30\x05\x00\x03a/#"), DecodeError::TopicInvalid);
    assert_eq!(DecodeError::TopicInvalid.reason_code(), ReasonCode::TopicNameInvalid);
    // Empty topic: never in 3.1.1, and not without a topic alias in 5.
    assert_eq!(err(V3, b"\x30\x02\x00\x00"), DecodeError::TopicInvalid);
    assert_eq!(err(V5, b"\x30\x03\x00\x00\x00"), DecodeError::TopicInvalid);
    // Packet identifier 0 on QoS 1.
    assert_eq!(
        err(V3, b"\x32\x07\x00\x03a/b\x00\x00"),
        DecodeError::MalformedPacket("packet identifier 0")
    );
    // DUP on QoS 0.
    assert!(matches!(err(V3, b"\x38\x05\x00\x03a/b"), DecodeError::MalformedPacket(_)));
    // Duplicate property (message expiry twice).
    assert_eq!(
        err(V5, b"\x30\x10\x00\x03a/b\x0a\x02\x00\x00\x00\x01\x02\x00\x00\x00\x01"),
        DecodeError::DuplicateProperty(0x02)
    );
    assert_eq!(DecodeError::DuplicateProperty(2).reason_code(), ReasonCode::ProtocolError);
    // A property not allowed in the packet (session expiry in PUBLISH).
    assert_eq!(
        err(V5, b"\x30\x0b\x00\x03a/b\x05\x11\x00\x00\x00\x01"),
        DecodeError::PropertyNotAllowed { id: 0x11, packet: "PUBLISH" }
    );
    // An unknown property identifier.
    assert!(matches!(
        err(V5, b"\x30\x08\x00\x03a/b\x02\x7f\x00"),
        DecodeError::PropertyNotAllowed { id: 0x7f, .. }
    ));
    // Topic alias 0 is a protocol error.
    assert!(matches!(
        err(V5, b"\x30\x09\x00\x03a/b\x03\x23\x00\x00"),
        DecodeError::ProtocolError(_)
    ));
    // U+0000 in a topic and in a client identifier.
    assert_eq!(err(V3, b"\x30\x05\x00\x03a\x00b"), DecodeError::InvalidUtf8);
    assert_eq!(
        err(V3, b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01\x00"),
        DecodeError::InvalidUtf8
    );
    // Invalid UTF-8 (a lone continuation byte, an encoded surrogate).
    assert_eq!(err(V3, b"\x30\x05\x00\x03a\x80b"), DecodeError::InvalidUtf8);
    assert_eq!(err(V3, b"\x30\x05\x00\x03\xed\xa0\x80"), DecodeError::InvalidUtf8);
    assert_eq!(DecodeError::InvalidUtf8.reason_code(), ReasonCode::MalformedPacket);
    // Truncated properties: the block claims 5 bytes, 2 are there.
    assert!(matches!(err(V5, b"\x30\x08\x00\x03a/b\x05\x02\x00"), DecodeError::MalformedPacket(_)));
    // A property whose value runs past the end of its block.
    assert!(matches!(
        err(V5, b"\x30\x0b\x00\x03a/b\x02\x02\x00\x00\x00\x01"),
        DecodeError::MalformedPacket(_)
    ));
    // Topic length past the end of the packet.
    assert!(matches!(err(V3, b"\x30\x03\x00\x09a"), DecodeError::MalformedPacket(_)));
    // Trailing bytes.
    assert!(matches!(err(V3, b"\xc0\x01\x00"), DecodeError::MalformedPacket(_)));
    assert!(matches!(err(V3, b"\x40\x03\x00\x01\x00"), DecodeError::MalformedPacket(_)));
    // Reserved packet types: 0 always, 15 (AUTH) in 3.1.1.
    assert!(matches!(err(V3, b"\x00\x00"), DecodeError::MalformedPacket(_)));
    assert!(matches!(err(V3, b"\xf0\x00"), DecodeError::MalformedPacket(_)));
    // CONNECT: reserved flag, will QoS 3, will flags without will, 3.1.1 password alone.
    assert!(matches!(
        err(V3, b"\x10\x0d\x00\x04MQTT\x04\x03\x00\x3c\x00\x01a"),
        DecodeError::MalformedPacket(_)
    ));
    assert!(matches!(
        err(V3, b"\x10\x0d\x00\x04MQTT\x04\x1e\x00\x3c\x00\x01a"),
        DecodeError::MalformedPacket(_)
    ));
    assert!(matches!(
        err(V3, b"\x10\x0d\x00\x04MQTT\x04\x22\x00\x3c\x00\x01a"),
        DecodeError::MalformedPacket(_)
    ));
    assert!(matches!(
        err(V3, b"\x10\x0f\x00\x04MQTT\x04\x42\x00\x3c\x00\x01a\x00\x00"),
        DecodeError::MalformedPacket(_)
    ));
    // Property not allowed in CONNECT (topic alias).
    assert_eq!(
        err(V5, b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x03\x23\x00\x01\x00\x00"),
        DecodeError::PropertyNotAllowed { id: 0x23, packet: "CONNECT" }
    );
    // Invalid topic filters and options.
    assert_eq!(err(V3, b"\x82\x07\x00\x01\x00\x02a+\x00"), DecodeError::TopicFilterInvalid);
    assert_eq!(err(V3, b"\x82\x08\x00\x01\x00\x03#/a\x00"), DecodeError::TopicFilterInvalid);
    assert!(matches!(err(V3, b"\x82\x06\x00\x01\x00\x01a\x03"), DecodeError::MalformedPacket(_)));
    assert!(matches!(err(V3, b"\x82\x06\x00\x01\x00\x01a\x04"), DecodeError::MalformedPacket(_)));
    assert!(matches!(
        err(V5, b"\x82\x07\x00\x01\x00\x00\x01a\x30"),
        DecodeError::MalformedPacket(_)
    ));
    assert!(matches!(err(V3, b"\x82\x02\x00\x01"), DecodeError::ProtocolError(_)));
    // Reason codes not valid in the packet.
    assert_eq!(
        err(V5, b"\x40\x03\x00\x01\x92"),
        DecodeError::InvalidReasonCode { code: 0x92, packet: "PUBACK" }
    );
    assert!(matches!(err(V3, b"\x20\x02\x00\x06"), DecodeError::InvalidReasonCode { code: 6, .. }));
    // Session present on a refused connection.
    assert!(matches!(err(V3, b"\x20\x02\x01\x05"), DecodeError::ProtocolError(_)));
}

#[test]
fn encode_errors_write_nothing() {
    let c = codec(V3);
    let mut out = BytesMut::from(&b"keep"[..]);
    let mut bad = publish(QoS::AtMostOnce, "a/+", None, "x");
    assert_eq!(c.encode(&Packet::Publish(bad.clone()), &mut out), Err(EncodeError::TopicInvalid));
    bad.topic = b("a");
    bad.packet_id = Some(1);
    assert!(c.encode(&Packet::Publish(bad.clone()), &mut out).is_err());
    bad.qos = QoS::AtLeastOnce;
    bad.packet_id = Some(0);
    assert!(c.encode(&Packet::Publish(bad), &mut out).is_err());
    assert!(c.encode(&Packet::PubAck(PubAck::new(0)), &mut out).is_err());
    assert!(Codec::new(10).encode(&Packet::PingReq, &mut out).is_err());
    assert_eq!(&out[..], b"keep");

    let mut small = codec(V3);
    small.set_max_outbound_packet_size(10);
    let p = publish(QoS::AtMostOnce, "a/b", None, "hello");
    assert_eq!(
        small.encode(&Packet::Publish(p), &mut out),
        Err(EncodeError::PacketTooLarge { size: 12, max: 10 })
    );
    assert_eq!(&out[..], b"keep");
}

#[test]
fn publish_parts_matches_publish() {
    for v in [V3, V5] {
        let c = codec(v);
        let p = publish(QoS::AtLeastOnce, "kp1/app/dcx/tok/json/42/status", Some(9), "{}");
        let mut whole = BytesMut::new();
        c.encode(&Packet::Publish(p.clone()), &mut whole).unwrap();
        let mut parts = BytesMut::new();
        let header =
            PublishHeader { packet_id: Some(9), qos: QoS::AtLeastOnce, ..PublishHeader::qos0() };
        c.encode_publish_parts(
            header,
            &[b"kp1/app/dcx/", b"tok", b"/json/42", b"/status"],
            None,
            b"{}",
            &mut parts,
        )
        .unwrap();
        assert_eq!(whole, parts);
    }
    // A multi-byte character split across parts is fine; a wildcard part is not.
    let c = codec(V5);
    let mut out = BytesMut::new();
    let e = "é".as_bytes();
    c.encode_publish_parts(PublishHeader::qos0(), &[&e[..1], &e[1..]], None, b"", &mut out)
        .unwrap();
    assert_eq!(&out[..], b"\x30\x05\x00\x02\xc3\xa9\x00");
    let mut out = BytesMut::new();
    assert_eq!(
        c.encode_publish_parts(PublishHeader::qos0(), &[b"a/", b"#"], None, b"x", &mut out),
        Err(EncodeError::TopicInvalid)
    );
    assert!(out.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

fn arb_str(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(
        prop_oneof![Just('a'), Just('z'), Just('/'), Just(' '), Just('é'), Just('€')],
        0..max,
    )
    .prop_map(|cs| Bytes::from(cs.into_iter().collect::<String>()))
}

fn arb_bin(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn arb_topic() -> impl Strategy<Value = Bytes> {
    "[a-z0-9é-]{1,6}(/[a-z0-9]{0,4}){0,3}".prop_map(Bytes::from)
}

fn arb_filter() -> impl Strategy<Value = Bytes> {
    (
        proptest::collection::vec(prop_oneof![Just("+".to_owned()), "[a-z]{0,3}"], 1..4),
        any::<bool>(),
    )
        .prop_map(|(levels, hash)| {
            let mut f = levels.join("/");
            if hash {
                f.push_str("/#");
            }
            if f.is_empty() {
                f.push('a');
            }
            Bytes::from(f)
        })
}

fn arb_qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn arb_user_props(v5: bool) -> BoxedStrategy<UserProperties> {
    if !v5 {
        return Just(UserProperties::new()).boxed();
    }
    proptest::collection::vec((arb_str(5), arb_str(5)), 0..3)
        .prop_map(|pairs| {
            let strs: Vec<(String, String)> = pairs
                .iter()
                .map(|(k, v)| {
                    (String::from_utf8(k.to_vec()).unwrap(), String::from_utf8(v.to_vec()).unwrap())
                })
                .collect();
            UserProperties::from_pairs(strs.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap()
        })
        .boxed()
}

fn opt<T: std::fmt::Debug + Clone + 'static>(
    v5: bool,
    s: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<Option<T>> {
    if v5 { proptest::option::of(s).boxed() } else { Just(None).boxed() }
}

fn arb_reason(v5: bool, codes: &'static [u8], v311: ReasonCode) -> BoxedStrategy<ReasonCode> {
    if v5 {
        proptest::sample::select(codes).prop_map(|b| ReasonCode::from_v5(b).unwrap()).boxed()
    } else {
        Just(v311).boxed()
    }
}

fn arb_connect(v5: bool) -> impl Strategy<Value = Packet> {
    let props = (
        opt(v5, any::<u32>()),
        opt(v5, 1..=u16::MAX),
        opt(v5, 1..=u32::MAX),
        opt(v5, any::<u16>()),
        opt(v5, any::<bool>()),
        opt(v5, any::<bool>()),
        arb_user_props(v5),
        opt(v5, arb_str(6)),
    )
        .prop_map(|(se, rm, mps, tam, rri, rpi, up, am)| ConnectProperties {
            session_expiry_interval: se,
            receive_maximum: rm,
            maximum_packet_size: mps,
            topic_alias_maximum: tam,
            request_response_information: rri,
            request_problem_information: rpi,
            user_properties: up,
            authentication_data: am.as_ref().map(|_| Bytes::from_static(b"\x00\x01")),
            authentication_method: am,
        });
    let will_props = (
        opt(v5, any::<u32>()),
        opt(v5, any::<bool>()),
        opt(v5, arb_str(4)),
        opt(v5, arb_topic()),
        opt(v5, arb_bin(4)),
        arb_user_props(v5),
    )
        .prop_map(|(wd, pfi, ct, rt, cd, up)| WillProperties {
            will_delay_interval: wd,
            payload_format_indicator: pfi,
            message_expiry_interval: wd.map(|d| d / 2),
            content_type: ct,
            response_topic: rt,
            correlation_data: cd,
            user_properties: up,
        });
    let will = proptest::option::of(
        (arb_topic(), arb_bin(10), arb_qos(), any::<bool>(), will_props).prop_map(
            |(topic, payload, qos, retain, properties)| Will {
                topic,
                payload,
                qos,
                retain,
                properties,
            },
        ),
    );
    (
        any::<bool>(),
        any::<u16>(),
        arb_str(10),
        will,
        proptest::option::of(arb_str(8)),
        proptest::option::of(arb_bin(8)),
        props,
    )
        .prop_map(
            move |(
                clean_start,
                keep_alive_secs,
                client_id,
                will,
                username,
                password,
                properties,
            )| {
                let password = if v5 || username.is_some() { password } else { None };
                Packet::Connect(Box::new(Connect {
                    protocol_version: if v5 { V5 } else { V3 },
                    clean_start,
                    keep_alive_secs,
                    client_id,
                    will,
                    username,
                    password,
                    properties,
                }))
            },
        )
}

const CONNACK_CODES: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x8c, 0x90, 0x95, 0x97,
    0x99, 0x9a, 0x9b, 0x9c, 0x9d, 0x9f,
];

fn arb_connack(v5: bool) -> impl Strategy<Value = Packet> {
    let code = if v5 {
        arb_reason(true, CONNACK_CODES, ReasonCode::Success)
    } else {
        (0u8..=5).prop_map(|c| ReasonCode::from_v311_connack_code(c).unwrap()).boxed()
    };
    let props = (
        (
            opt(v5, any::<u32>()),
            opt(v5, 1..=u16::MAX),
            opt(v5, prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce)]),
            opt(v5, any::<bool>()),
            opt(v5, 1..=u32::MAX),
            opt(v5, arb_str(8)),
            opt(v5, any::<u16>()),
            opt(v5, arb_str(8)),
        ),
        (
            arb_user_props(v5),
            opt(v5, any::<bool>()),
            opt(v5, any::<bool>()),
            opt(v5, any::<bool>()),
            opt(v5, any::<u16>()),
            opt(v5, arb_str(4)),
            opt(v5, arb_str(4)),
            opt(v5, arb_str(4)),
        ),
        opt(v5, arb_bin(4)),
    )
        .prop_map(
            |((se, rm, mq, ra, mps, aci, tam, rs), (up, wsa, sia, ssa, ska, ri, sr, am), ad)| {
                ConnAckProperties {
                    session_expiry_interval: se,
                    receive_maximum: rm,
                    maximum_qos: mq,
                    retain_available: ra,
                    maximum_packet_size: mps,
                    assigned_client_identifier: aci,
                    topic_alias_maximum: tam,
                    reason_string: rs,
                    user_properties: up,
                    wildcard_subscription_available: wsa,
                    subscription_identifiers_available: sia,
                    shared_subscription_available: ssa,
                    server_keep_alive: ska,
                    response_information: ri,
                    server_reference: sr,
                    authentication_method: am,
                    authentication_data: ad,
                }
            },
        );
    (any::<bool>(), code, props).prop_map(|(sp, reason_code, properties)| {
        Packet::ConnAck(Box::new(ConnAck {
            session_present: sp && !reason_code.is_error(),
            reason_code,
            properties,
        }))
    })
}

fn arb_publish(v5: bool) -> impl Strategy<Value = Packet> {
    let props = (
        opt(v5, any::<bool>()),
        opt(v5, any::<u32>()),
        opt(v5, 1..=u16::MAX),
        opt(v5, arb_topic()),
        opt(v5, arb_bin(6)),
        arb_user_props(v5),
        if v5 {
            proptest::collection::vec(1..=wire::MAX_VARINT, 0..3).boxed()
        } else {
            Just(vec![]).boxed()
        },
        opt(v5, arb_str(6)),
    )
        .prop_map(|(pfi, mei, ta, rt, cd, up, sids, ct)| PublishProperties {
            payload_format_indicator: pfi,
            message_expiry_interval: mei,
            topic_alias: ta,
            response_topic: rt,
            correlation_data: cd,
            user_properties: up,
            subscription_identifiers: sids,
            content_type: ct,
        });
    (
        any::<bool>(),
        arb_qos(),
        any::<bool>(),
        arb_topic(),
        any::<bool>(),
        1..=u16::MAX,
        props,
        arb_bin(40),
    )
        .prop_map(move |(dup, qos, retain, topic, empty_topic, id, properties, payload)| {
            let use_alias = empty_topic && properties.topic_alias.is_some();
            Packet::Publish(Publish {
                dup: dup && qos != QoS::AtMostOnce,
                qos,
                retain,
                topic: if use_alias { Bytes::new() } else { topic },
                packet_id: (qos != QoS::AtMostOnce).then_some(id),
                properties,
                payload,
            })
        })
}

fn arb_ack_props(v5: bool) -> impl Strategy<Value = AckProperties> {
    (opt(v5, arb_str(8)), arb_user_props(v5))
        .prop_map(|(rs, up)| AckProperties { reason_string: rs, user_properties: up })
}

const PUBACK_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_CODES: &[u8] = &[0x00, 0x92];
const SUBACK_CODES: &[u8] =
    &[0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8f, 0x91, 0x97, 0x9e, 0xa1, 0xa2];
const UNSUBACK_CODES: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8f, 0x91];
const DISCONNECT_CODES: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8b, 0x8d, 0x8e, 0x8f, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9a, 0x9b, 0x9c, 0x9d, 0x9e, 0x9f, 0xa0, 0xa1, 0xa2,
];

fn arb_pub_ack(v5: bool) -> impl Strategy<Value = Packet> {
    (
        0..4u8,
        1..=u16::MAX,
        arb_reason(v5, PUBACK_CODES, ReasonCode::Success),
        arb_reason(v5, PUBREL_CODES, ReasonCode::Success),
        arb_ack_props(v5),
    )
        .prop_map(|(k, packet_id, rc_ack, rc_rel, properties)| {
            let ack =
                |reason_code| PubAck { packet_id, reason_code, properties: properties.clone() };
            match k {
                0 => Packet::PubAck(ack(rc_ack)),
                1 => Packet::PubRec(ack(rc_ack)),
                2 => Packet::PubRel(ack(rc_rel)),
                _ => Packet::PubComp(ack(rc_rel)),
            }
        })
}

fn arb_subscribe(v5: bool) -> impl Strategy<Value = Packet> {
    let sub = (arb_filter(), arb_qos(), any::<bool>(), any::<bool>(), 0..3u8).prop_map(
        move |(filter, qos, nl, rap, rh)| Subscription {
            filter,
            options: SubscriptionOptions {
                qos,
                no_local: v5 && nl,
                retain_as_published: v5 && rap,
                retain_handling: match (v5, rh) {
                    (true, 1) => RetainHandling::SendAtSubscribeIfNew,
                    (true, 2) => RetainHandling::DoNotSend,
                    _ => RetainHandling::SendAtSubscribe,
                },
            },
        },
    );
    (
        1..=u16::MAX,
        proptest::collection::vec(sub, 1..4),
        opt(v5, 1..=wire::MAX_VARINT),
        arb_user_props(v5),
    )
        .prop_map(|(packet_id, subscriptions, sid, up)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                subscriptions,
                properties: SubscribeProperties {
                    subscription_identifier: sid,
                    user_properties: up,
                },
            })
        })
}

fn arb_suback(v5: bool) -> impl Strategy<Value = Packet> {
    let code = if v5 {
        arb_reason(true, SUBACK_CODES, ReasonCode::Success)
    } else {
        proptest::sample::select(&[0x00u8, 0x01, 0x02, 0x80][..])
            .prop_map(|b| ReasonCode::from_v5(b).unwrap())
            .boxed()
    };
    (1..=u16::MAX, proptest::collection::vec(code, 1..4), arb_ack_props(v5)).prop_map(
        |(packet_id, reason_codes, properties)| {
            Packet::SubAck(SubAck { packet_id, reason_codes, properties })
        },
    )
}

fn arb_unsub(v5: bool) -> impl Strategy<Value = Packet> {
    let unsub = (1..=u16::MAX, proptest::collection::vec(arb_filter(), 1..4), arb_user_props(v5))
        .prop_map(|(packet_id, filters, up)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties: UnsubscribeProperties { user_properties: up },
            })
        });
    let codes = if v5 {
        proptest::collection::vec(arb_reason(true, UNSUBACK_CODES, ReasonCode::Success), 1..4)
            .boxed()
    } else {
        Just(vec![]).boxed()
    };
    let unsuback = (1..=u16::MAX, codes, arb_ack_props(v5)).prop_map(
        |(packet_id, reason_codes, properties)| {
            Packet::UnsubAck(UnsubAck { packet_id, reason_codes, properties })
        },
    );
    prop_oneof![unsub, unsuback]
}

fn arb_disconnect_auth(v5: bool) -> BoxedStrategy<Packet> {
    if !v5 {
        return prop_oneof![
            Just(Packet::PingReq),
            Just(Packet::PingResp),
            Just(Packet::Disconnect(Disconnect::normal()))
        ]
        .boxed();
    }
    let disconnect = (
        arb_reason(true, DISCONNECT_CODES, ReasonCode::Success),
        opt(true, any::<u32>()),
        opt(true, arb_str(8)),
        arb_user_props(true),
        opt(true, arb_str(8)),
    )
        .prop_map(|(reason_code, se, rs, up, sr)| {
            Packet::Disconnect(Disconnect {
                reason_code,
                properties: DisconnectProperties {
                    session_expiry_interval: se,
                    reason_string: rs,
                    user_properties: up,
                    server_reference: sr,
                },
            })
        });
    let auth = (
        arb_reason(true, &[0x00, 0x18, 0x19], ReasonCode::Success),
        opt(true, arb_str(8)),
        opt(true, arb_bin(8)),
        opt(true, arb_str(8)),
        arb_user_props(true),
    )
        .prop_map(|(reason_code, am, ad, rs, up)| {
            Packet::Auth(Auth {
                reason_code,
                properties: AuthProperties {
                    authentication_method: am,
                    authentication_data: ad,
                    reason_string: rs,
                    user_properties: up,
                },
            })
        });
    prop_oneof![Just(Packet::PingReq), Just(Packet::PingResp), disconnect, auth].boxed()
}

/// Any packet other than CONNECT that is valid in the version.
fn arb_non_connect(v5: bool) -> impl Strategy<Value = Packet> {
    prop_oneof![
        1 => arb_connack(v5),
        3 => arb_publish(v5),
        1 => arb_pub_ack(v5),
        1 => arb_subscribe(v5),
        1 => arb_suback(v5),
        1 => arb_unsub(v5),
        1 => arb_disconnect_auth(v5),
    ]
}

fn arb_packet(v5: bool) -> impl Strategy<Value = Packet> {
    prop_oneof![1 => arb_connect(v5), 6 => arb_non_connect(v5)]
}

/// A connection's worth of packets: CONNECT, then anything else, encoded.
fn arb_stream() -> impl Strategy<Value = (ProtocolVersion, Vec<Packet>)> {
    any::<bool>().prop_flat_map(|v5| {
        (arb_connect(v5), proptest::collection::vec(arb_non_connect(v5), 0..12)).prop_map(
            move |(c, rest)| {
                let mut all = vec![c];
                all.extend(rest);
                (if v5 { V5 } else { V3 }, all)
            },
        )
    })
}

fn encode_all(v: ProtocolVersion, packets: &[Packet]) -> BytesMut {
    let c = codec(v);
    let mut out = BytesMut::new();
    for p in packets {
        c.encode(p, &mut out).unwrap();
    }
    out
}

/// Decodes until need-more or error; never panics.
fn drain(c: &mut Codec, buf: &mut BytesMut) -> Result<Vec<Packet>, DecodeError> {
    let mut out = Vec::new();
    while let Some(p) = c.decode(buf)? {
        out.push(p);
    }
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn round_trip(
        (v5, p) in any::<bool>().prop_flat_map(|v5| (Just(v5), arb_packet(v5)))
    ) {
        let v = if v5 { V5 } else { V3 };
        let bytes = enc(v, &p).unwrap();
        let d = dec(v, &bytes).unwrap();
        prop_assert_eq!(&d, &p);
        prop_assert_eq!(enc(v, &d).unwrap(), bytes);
    }

    #[test]
    fn stream_round_trip_and_byte_at_a_time((v, packets) in arb_stream()) {
        let bytes = encode_all(v, &packets);
        // All at once with a server codec.
        let mut server = Codec::new(MAX_PACKET_SIZE);
        let mut buf = bytes.clone();
        let decoded = drain(&mut server, &mut buf).unwrap();
        prop_assert!(buf.is_empty());
        prop_assert_eq!(&decoded, &packets);
        prop_assert_eq!(server.version(), Some(v));
        // One byte at a time: Ok(None) until each packet is complete.
        let mut server = Codec::new(MAX_PACKET_SIZE);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &byte in bytes.iter() {
            buf.extend_from_slice(&[byte]);
            if let Some(p) = server.decode(&mut buf).unwrap() {
                prop_assert!(buf.is_empty());
                got.push(p);
            }
        }
        prop_assert_eq!(got, packets);
    }

    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut fresh = Codec::new(4096);
        let _ = drain(&mut fresh, &mut BytesMut::from(&data[..]));
        for v in [V3, V5] {
            let mut c = Codec::new(4096);
            c.set_version(v);
            let _ = drain(&mut c, &mut BytesMut::from(&data[..]));
        }
        // After a valid CONNECT.
        for connect in [
            &b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01a"[..],
            &b"\x10\x0e\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x01a"[..],
        ] {
            let mut c = Codec::new(4096);
            let mut buf = BytesMut::from(connect);
            buf.extend_from_slice(&data);
            let r = drain(&mut c, &mut buf);
            prop_assert!(r.as_ref().map_or(true, |ps| !ps.is_empty()) || r.is_err());
        }
    }

    #[test]
    fn mutated_packets_never_panic(
        (v, packets) in arb_stream(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = encode_all(v, &packets).to_vec();
        for (i, byte) in edits {
            let i = i.index(bytes.len());
            bytes[i] = byte;
        }
        bytes.truncate(cut.index(bytes.len() + 1).max(1));
        let mut c = Codec::new(1 << 16);
        let _ = drain(&mut c, &mut BytesMut::from(&bytes[..]));
        let mut c = codec(v);
        let _ = drain(&mut c, &mut BytesMut::from(&bytes[..]));
    }
}
