//! The cost of the HTTP/1.1 framing scanner (`framing::ChunkScanner`) that every byte an
//! HTTP/1 connection reads passes through: requests per second it follows, to set beside the
//! transport's requests per second (`--bench throughput`).
//!
//! `cargo bench -p fleetgate-transport-http --bench framing`

#![allow(missing_docs)]

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use fleetgate_transport_http::framing::ChunkScanner;

/// The request the throughput benchmark's clients send, 256 of them on one connection.
const REQUEST: &[u8] = b"POST /kp1/demo-v1/dcx/tok-1/json HTTP/1.1\r\nhost: 127.0.0.1:8080\r\n\
content-type: application/json\r\ncontent-length: 40\r\n\r\n[{\"temperature\":21.5,\"humidity\":40.25}]";

const CHUNKED: &[u8] = b"POST /kp1/demo-v1/dcx/tok-1/json HTTP/1.1\r\nhost: 127.0.0.1:8080\r\n\
content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n\
28\r\n[{\"temperature\":21.5,\"humidity\":40.25}]\r\n0\r\n\r\n";

fn scanner(c: &mut Criterion) {
    let mut group = c.benchmark_group("chunk scanner");
    for (name, one) in [("content-length", REQUEST), ("chunked", CHUNKED)] {
        let stream = one.repeat(256);
        group.throughput(Throughput::Elements(256));
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut scanner = ChunkScanner::new(1 << 20);
                black_box(scanner.feed(black_box(&stream)))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, scanner);
criterion_main!(benches);
