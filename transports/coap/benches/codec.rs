//! Micro-benchmarks of the CoAP codec's hot path: decoding a confirmable POST to a 1/KP path
//! (and joining its Uri-Path, as the server does) and encoding the piggybacked 2.04 ACK.
//!
//! Datagrams are built outside the timed section; each iteration handles a batch of
//! `BATCH` messages so the figure is messages per second.

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fleetgate_transport_coap::codec::{Code, Message, MessageType, MessageWriter, option};

const BATCH: usize = 256;
const PATH: &str = "kp1/demo-v1/dcx/token-0001/json/42";

fn request(mid: u16) -> Bytes {
    let mut out = BytesMut::new();
    let mut w = MessageWriter::new(
        &mut out,
        MessageType::Confirmable,
        Code::POST,
        mid,
        b"\x01\x02\x03\x04",
    )
    .unwrap();
    for segment in PATH.split('/') {
        w.option(option::URI_PATH, segment.as_bytes()).unwrap();
    }
    w.uint_option(option::CONTENT_FORMAT, 50).unwrap();
    w.payload(&[b'x'; 64]);
    out.freeze()
}

fn decode(c: &mut Criterion) {
    let datagrams: Vec<Bytes> = (0..BATCH as u16).map(request).collect();
    let mut g = c.benchmark_group("coap_decode");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("con_post_kp1", |b| {
        b.iter(|| {
            for d in &datagrams {
                let m = Message::decode(d.clone()).unwrap();
                black_box((m.known(), m.payload().len()));
            }
        })
    });
    g.bench_function("con_post_kp1_with_path", |b| {
        let mut path = BytesMut::with_capacity(64 * BATCH);
        b.iter(|| {
            for d in &datagrams {
                let m = Message::decode(d.clone()).unwrap();
                m.write_uri_path(&mut path);
                black_box(path.split().freeze());
            }
        })
    });
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("coap_encode");
    g.throughput(Throughput::Elements(BATCH as u64));
    let token = [1u8, 2, 3, 4];
    g.bench_function("ack_2_04_piggybacked", |b| {
        let mut out = BytesMut::with_capacity(32 * BATCH);
        b.iter(|| {
            for mid in 0..BATCH as u16 {
                let w = MessageWriter::new(
                    &mut out,
                    MessageType::Acknowledgement,
                    Code::CHANGED,
                    mid,
                    &token,
                )
                .unwrap();
                w.finish();
                black_box(out.split().freeze());
            }
        })
    });
    g.bench_function("notification_2_05_observe", |b| {
        let mut out = BytesMut::with_capacity(128 * BATCH);
        let payload = [b'c'; 48];
        b.iter(|| {
            for mid in 0..BATCH as u16 {
                let mut w = MessageWriter::new(
                    &mut out,
                    MessageType::Confirmable,
                    Code::CONTENT,
                    mid,
                    &token,
                )
                .unwrap();
                w.uint_option(option::OBSERVE, u32::from(mid) + 2).unwrap();
                w.uint_option(option::MAX_AGE, 60).unwrap();
                w.payload(&payload);
                black_box(out.split().freeze());
            }
        })
    });
    g.bench_function("con_post_kp1_request", |b| {
        b.iter(|| {
            for mid in 0..BATCH as u16 {
                black_box(request(mid));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
