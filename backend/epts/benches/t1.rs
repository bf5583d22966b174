//! Benchmark T1: points stored per second through EPTS (13/DSTP events on the in-process bus,
//! extraction, batched durable writes, `DataSamplesProcessed` answers, 14/TSTP events) against
//! a minimal batched insert of the same points into the same store, in the same run, A B A B,
//! median ratio of the pairs. Target: EPTS ≥ 0.8× the bare insert.
//!
//! ```text
//! cargo bench -p fleetgate-epts --bench t1 -- [embedded|postgres] [pairs] [events]
//! ```
//! PostgreSQL: `EPTS_BENCH_POSTGRES_URL`, else a server of its own in a temp directory.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetgate_bus::{AnyBus, Bus, InProcessBus, Subject};
use fleetgate_epts::{AppTimeSeries, EptsConfig, EptsService, TimeSeriesConfig};
use fleetgate_messages::{DataSamplesEvent, Record, subjects};
use fleetgate_service::{Service, StartContext};
use fleetgate_storage::{EmbeddedStore, Point, PostgresStore, TimeSeriesStore, Value};

/// Samples per event (a device's batch) and numeric fields per sample (auto-extracted).
const SAMPLES: usize = 25;
const FIELDS: usize = 4;
/// The bare insert's batch: EPTS's `max_batch_points` default.
const BATCH: usize = 8192;

fn sample(ts: i64, i: usize) -> String {
    format!(
        r#"{{"ts":{ts},"temperature":{}.5,"humidity":{},"pressure":{}.25,"voltage":{}}}"#,
        i % 40,
        i % 100,
        1000 + i % 50,
        i % 5
    )
}

async fn through_epts(bus: &AnyBus, round: i64, events: usize) -> (usize, Duration) {
    let mut replies = bus.subscribe("bench.replies", None).await.unwrap();
    let subject = Subject::from(subjects::dstp_data_samples_received("dcx"));
    let payloads: Vec<_> = (0..events)
        .map(|e| {
            let samples: Vec<String> = (0..SAMPLES)
                .map(|s| sample(round * 1_000_000_000 + (e * SAMPLES + s) as i64, s))
                .collect();
            let id = format!("r{round}-{e}");
            let endpoint = format!("ep-{}", e % 100);
            DataSamplesEvent {
                correlation_id: &id,
                timestamp_ms: 1,
                timeout_ms: 0,
                app_version_name: "bench-v1",
                endpoint_id: &endpoint,
                content_type: "application/json",
                data_samples: samples.iter().map(|s| s.as_bytes()).collect(),
            }
            .to_bytes()
        })
        .collect();
    let started = Instant::now();
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            for p in payloads {
                bus.publish(subject.clone(), Some(Subject::from("bench.replies")), p)
                    .await
                    .unwrap();
            }
        })
    };
    for _ in 0..events {
        let msg = replies.next().await.unwrap();
        let status = fleetgate_messages::DataSamplesProcessed::decode(&msg.payload).unwrap();
        assert_eq!(status.status_code, 200, "{:?}", status.reason_phrase);
    }
    let elapsed = started.elapsed();
    publisher.await.unwrap();
    (events * SAMPLES * FIELDS, elapsed)
}

async fn bare_insert(store: &dyn TimeSeriesStore, round: i64, events: usize) -> (usize, Duration) {
    let mut points = Vec::with_capacity(events * SAMPLES * FIELDS);
    for e in 0..events {
        for s in 0..SAMPLES {
            let ts = round * 1_000_000_000 + (e * SAMPLES + s) as i64;
            for (field, v) in ["temperature", "humidity", "pressure", "voltage"].iter().zip(0..) {
                points.push(Point {
                    app: "raw".into(),
                    series: format!("auto~{field}"),
                    endpoint: format!("ep-{}", e % 100),
                    timestamp_ms: ts,
                    values: vec![("value".into(), Value::Double(f64::from(v) + s as f64))],
                });
            }
        }
    }
    let n = points.len();
    let started = Instant::now();
    let mut points = points.into_iter().peekable();
    while points.peek().is_some() {
        let batch: Vec<Point> = points.by_ref().take(BATCH).collect();
        store.write(Arc::new(batch)).await.unwrap();
    }
    (n, started.elapsed())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let kind = args.first().map_or("embedded", String::as_str).to_owned();
    let pairs: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let events: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(400);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let mut _server = None;
        let store: Arc<dyn TimeSeriesStore> = match kind.as_str() {
            "postgres" => {
                let url = std::env::var("EPTS_BENCH_POSTGRES_URL").unwrap_or_else(|_| {
                    let server = fleetgate_testkit::PostgresServer::start();
                    let url = server.url();
                    _server = Some(server);
                    url
                });
                Arc::new(PostgresStore::new(&url))
            }
            _ => Arc::new(EmbeddedStore::open(dir.path()).unwrap()),
        };
        store.open().await.unwrap();
        let time_series: TimeSeriesConfig = serde_yaml::from_str(
            "auto_extract: true\ntimestamp: {path: ts, format: millis-unix-epoch}",
        )
        .unwrap();
        let apps = BTreeMap::from([(
            "bench".to_owned(),
            AppTimeSeries { versions: vec!["bench-v1".into()], time_series },
        )]);
        let bus = AnyBus::InProcess(InProcessBus::new(4096));
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let service = Box::new(EptsService::with_store(EptsConfig::default(), store.clone(), apps));
        let _running = service.start(StartContext { bus: bus.clone(), shutdown }).await.unwrap();

        // Warm-up of both sides (also creates PostgreSQL's first partitions).
        through_epts(&bus, 0, events / 4).await;
        bare_insert(store.as_ref(), 0, events / 4).await;
        let mut ratios = Vec::new();
        println!(
            "T1 {kind}: {events} events x {SAMPLES} samples x {FIELDS} fields per measurement"
        );
        for pair in 1..=pairs {
            let round = pair as i64;
            let (n, t) = through_epts(&bus, round, events).await;
            let epts = n as f64 / t.as_secs_f64();
            let (n, t) = bare_insert(store.as_ref(), round, events).await;
            let bare = n as f64 / t.as_secs_f64();
            println!(
                "pair {pair}: epts {epts:.0} points/s, bare insert {bare:.0} points/s, ratio {:.2}",
                epts / bare
            );
            ratios.push(epts / bare);
        }
        println!(
            "T1 {kind}: median ratio {:.2} over {pairs} pairs (target >= 0.80)",
            median(ratios)
        );
    });
}
