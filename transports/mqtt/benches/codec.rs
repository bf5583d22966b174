//! Micro-benchmarks of the MQTT codec's hot path: PUBLISH decode and encode.
//!
//! Decode benchmarks take packets off a buffer that already holds many of them (built outside
//! the timed section, just before it, so the buffer is warm in cache as after a socket read),
//! so they measure decoding only, not I/O or buffer building.

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use fleetgate_transport_mqtt::codec::{
    Codec, MAX_PACKET_SIZE, Packet, ProtocolVersion, Publish, PublishHeader, PublishProperties, QoS,
};

const PACKETS: usize = 256;
const TOPIC: &str = "kp1/demo-v1/dcx/token-0001/json/42";

fn codec(v: ProtocolVersion) -> Codec {
    let mut c = Codec::new(MAX_PACKET_SIZE);
    c.set_version(v);
    c
}

fn publish(qos: QoS) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: Bytes::from_static(TOPIC.as_bytes()),
        packet_id: (qos != QoS::AtMostOnce).then_some(42),
        properties: PublishProperties::default(),
        payload: Bytes::from(vec![b'x'; 64]),
    }
}

fn stream(v: ProtocolVersion, p: &Publish) -> BytesMut {
    let c = codec(v);
    let mut out = BytesMut::new();
    for _ in 0..PACKETS {
        c.encode(&Packet::Publish(p.clone()), &mut out).unwrap();
    }
    out
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("mqtt_publish_decode");
    g.throughput(Throughput::Elements(PACKETS as u64));
    for (name, v, qos) in [
        ("v311_qos0", ProtocolVersion::V311, QoS::AtMostOnce),
        ("v311_qos1", ProtocolVersion::V311, QoS::AtLeastOnce),
        ("v5_qos1", ProtocolVersion::V5, QoS::AtLeastOnce),
    ] {
        let template = stream(v, &publish(qos));
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || (codec(v), template.clone()),
                |(codec, buf)| {
                    while let Some(p) = codec.decode(buf).unwrap() {
                        black_box(p);
                    }
                },
                BatchSize::PerIteration,
            )
        });
    }
    // The peer, in the same run: rumqttc's MQTT 3.1.1 decoder on the same stream.
    let template = stream(ProtocolVersion::V311, &publish(QoS::AtLeastOnce));
    g.bench_function("v311_qos1_peer_rumqttc", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |buf| {
                while !buf.is_empty() {
                    black_box(rumqttc::mqttbytes::v4::Packet::read(buf, 1 << 20).unwrap());
                }
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("mqtt_publish_encode");
    g.throughput(Throughput::Elements(PACKETS as u64));
    for (name, v, qos) in [
        ("v311_qos0", ProtocolVersion::V311, QoS::AtMostOnce),
        ("v5_qos1", ProtocolVersion::V5, QoS::AtLeastOnce),
    ] {
        let codec = codec(v);
        let packet = Packet::Publish(publish(qos));
        let mut out = BytesMut::with_capacity(PACKETS * 128);
        g.bench_function(format!("{name}_packet"), |b| {
            b.iter(|| {
                out.clear();
                for _ in 0..PACKETS {
                    codec.encode(black_box(&packet), &mut out).unwrap();
                }
            })
        });
        let header = PublishHeader {
            qos,
            packet_id: (qos != QoS::AtMostOnce).then_some(42),
            ..PublishHeader::qos0()
        };
        let payload = [b'x'; 64];
        g.bench_function(format!("{name}_parts"), |b| {
            b.iter(|| {
                out.clear();
                for _ in 0..PACKETS {
                    codec
                        .encode_publish_parts(
                            header,
                            black_box(&[b"kp1/demo-v1/dcx/", b"token-0001", b"/json/42"]),
                            None,
                            black_box(&payload),
                            &mut out,
                        )
                        .unwrap();
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
