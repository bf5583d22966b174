//! Proves that the PUBLISH hot path does not touch the heap: decoding a PUBLISH (MQTT 3.1.1, and
//! MQTT 5 with properties, user properties included) and encoding one into a buffer with room.
//!
//! Counting allocations needs a global allocator; `stats_alloc` provides one without `unsafe`
//! in this crate. The counter is process-wide, so this file holds a single test.

#![allow(missing_docs, clippy::unwrap_used)]

use std::alloc::System;
use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use fleetgate_transport_mqtt::codec::{
    Codec, MAX_PACKET_SIZE, Packet, ProtocolVersion, Publish, PublishHeader, PublishProperties,
    QoS, UserProperties,
};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const N: usize = 64;

fn codec(v: ProtocolVersion) -> Codec {
    let mut c = Codec::new(MAX_PACKET_SIZE);
    c.set_version(v);
    c
}

fn publish(qos: QoS, properties: PublishProperties) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: Bytes::from_static(b"kp1/demo-v1/dcx/token-0001/json/42"),
        packet_id: (qos != QoS::AtMostOnce).then_some(42),
        properties,
        payload: Bytes::from(vec![b'x'; 64]),
    }
}

#[test]
fn publish_hot_path_does_not_allocate() {
    let rich = PublishProperties {
        message_expiry_interval: Some(60),
        topic_alias: Some(3),
        content_type: Some(Bytes::from_static(b"application/json")),
        user_properties: UserProperties::from_pairs([("k", "v"), ("trace", "1")]).unwrap(),
        ..PublishProperties::default()
    };
    let cases = [
        ("3.1.1 QoS 0", ProtocolVersion::V311, QoS::AtMostOnce, PublishProperties::default()),
        ("3.1.1 QoS 1", ProtocolVersion::V311, QoS::AtLeastOnce, PublishProperties::default()),
        ("5 QoS 0", ProtocolVersion::V5, QoS::AtMostOnce, PublishProperties::default()),
        ("5 QoS 1 with properties", ProtocolVersion::V5, QoS::AtLeastOnce, rich),
    ];
    for (name, v, qos, props) in cases {
        let mut c = codec(v);
        let packet = Packet::Publish(publish(qos, props));
        let mut buf = BytesMut::new();
        for _ in 0..N {
            c.encode(&packet, &mut buf).unwrap();
        }
        // The first split turns the buffer into a shared one (one allocation per buffer, not
        // per packet); count from the second packet on.
        assert!(c.decode(&mut buf).unwrap().is_some());

        let region = Region::new(GLOBAL);
        let mut decoded = 0;
        while let Some(p) = c.decode(&mut buf).unwrap() {
            let Packet::Publish(p) = p else { panic!("{name}: not a PUBLISH") };
            black_box(&p.topic);
            black_box(&p.payload);
            black_box(p.properties.user_properties.iter().count());
            decoded += 1;
        }
        let stats = region.change();
        assert_eq!(decoded, N - 1, "{name}");
        assert_eq!(stats.allocations, 0, "{name}: decode allocated");
        assert_eq!(stats.reallocations, 0, "{name}: decode reallocated");

        // Encoding into a buffer with room. The counter is process-wide, so another thread of
        // the test process (the harness's) can allocate inside the region now and then: the
        // best of three attempts counts. An allocation on the path itself shows in every
        // attempt, N times over.
        let header = PublishHeader {
            qos,
            packet_id: (qos != QoS::AtMostOnce).then_some(7),
            ..PublishHeader::qos0()
        };
        let best = (0..3)
            .map(|_| {
                let mut out = BytesMut::with_capacity(N * 256);
                let region = Region::new(GLOBAL);
                for _ in 0..N {
                    c.encode(&packet, &mut out).unwrap();
                    c.encode_publish_parts(
                        header,
                        &[b"kp1/demo-v1/dcx/", b"token-0001", b"/json/42/status"],
                        None,
                        b"{}",
                        &mut out,
                    )
                    .unwrap();
                }
                let stats = region.change();
                (stats.allocations, stats.reallocations)
            })
            .min()
            .unwrap();
        assert_eq!(best, (0, 0), "{name}: encode allocated (allocations, reallocations)");
    }

    // Positive control: the counter does see allocations (subscription identifiers are a Vec).
    let mut c = codec(ProtocolVersion::V5);
    let with_ids =
        PublishProperties { subscription_identifiers: vec![1, 2], ..PublishProperties::default() };
    let packet = Packet::Publish(publish(QoS::AtMostOnce, with_ids));
    let mut buf = BytesMut::new();
    c.encode(&packet, &mut buf).unwrap();
    c.encode(&packet, &mut buf).unwrap();
    assert!(c.decode(&mut buf).unwrap().is_some());
    let region = Region::new(GLOBAL);
    black_box(c.decode(&mut buf).unwrap());
    assert!(region.change().allocations > 0, "allocation counter is not counting");
}
