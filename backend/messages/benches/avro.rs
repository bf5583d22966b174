//! Micro-benchmarks of the hand-written Avro codec on the 4/ESP hot path: `ClientData` encode
//! (gateway → extension) and `ExtensionData` decode (extension → gateway).

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs, clippy::expect_used, clippy::unwrap_used)]

use bytes::BytesMut;
use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use fleetgate_messages::{ClientData, ExtensionData, Record};

fn client_data(payload: &[u8]) -> ClientData<'_> {
    ClientData {
        correlation_id: "0f8fad5b-d9cb-469f-a165-70867728950e",
        timestamp_ms: 1_700_000_000_000,
        timeout_ms: 5_000,
        app_version_name: "smart-kettle-v3",
        endpoint_id: Some("e3b0c442-98fc-1c14-9afb-f4c8996fb924"),
        resource_path: "/json",
        request_id: Some(42),
        payload,
        config_name: None,
    }
}

fn bench(c: &mut Criterion) {
    let payload = br#"[{"temperature":21.5,"humidity":48,"ts":1700000000000}]"#;

    let mut group = c.benchmark_group("avro");
    group.throughput(Throughput::Elements(1));

    let rec = client_data(payload);
    let mut buf = BytesMut::with_capacity(1024);
    group.bench_function("client_data_encode", |b| {
        b.iter(|| {
            buf.clear();
            let rec = black_box(&rec);
            buf.reserve(rec.encoded_len());
            rec.encode(&mut buf);
            black_box(buf.len())
        })
    });

    // The peer, in the same run: apache-avro writing the same record from a generic value.
    let schema = apache_avro::Schema::parse_str(ClientData::SCHEMA).expect("schema");
    group.bench_function("client_data_encode_peer_apache_avro", |b| {
        use apache_avro::types::Value;
        b.iter(|| {
            let rec = black_box(&rec);
            let value = Value::Record(vec![
                ("correlationId".into(), Value::String(rec.correlation_id.into())),
                ("timestamp".into(), Value::Long(rec.timestamp_ms)),
                ("timeout".into(), Value::Long(rec.timeout_ms)),
                ("appVersionName".into(), Value::String(rec.app_version_name.into())),
                (
                    "endpointId".into(),
                    Value::Union(0, Box::new(Value::String(rec.endpoint_id.unwrap_or("").into()))),
                ),
                ("resourcePath".into(), Value::String(rec.resource_path.into())),
                ("requestId".into(), Value::Union(0, Box::new(Value::Int(42)))),
                ("payload".into(), Value::Bytes(rec.payload.to_vec())),
                ("configName".into(), Value::Union(0, Box::new(Value::Null))),
            ]);
            black_box(apache_avro::to_avro_datum(&schema, value).expect("encodes").len())
        })
    });

    let ext = ExtensionData {
        correlation_id: "0f8fad5b-d9cb-469f-a165-70867728950e",
        timestamp_ms: 1_700_000_000_000,
        timeout_ms: 0,
        app_version_name: Some("smart-kettle-v3"),
        extension_instance_name: Some("dcx"),
        endpoint_id: Some("e3b0c442-98fc-1c14-9afb-f4c8996fb924"),
        resource_path: "/json",
        request_id: Some(42),
        payload: Some(b"{}"),
        status_code: 200,
        reason_phrase: None,
    }
    .to_bytes();
    group.bench_function("extension_data_decode", |b| {
        b.iter(|| {
            let rec = ExtensionData::decode(black_box(&ext[..]));
            black_box(rec.map(|r| r.status_code).unwrap_or_default())
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
