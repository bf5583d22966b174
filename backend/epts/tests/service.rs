//! EPTS on the in-process bus with a real embedded store: 13/DSTP in, `DataSamplesProcessed`
//! after storage, 14/TSTP out, the REST API over what was stored, and a failing store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fleetgate_bus::{AnyBus, Bus, InProcessBus, Subject, Subscription};
use fleetgate_epts::{AppTimeSeries, EptsConfig, EptsService, TimeSeriesConfig};
use fleetgate_messages::{
    DataSamplesEvent, DataSamplesProcessed, Record, TimeSeriesEvent, TimeSeriesValue, subjects,
};
use fleetgate_service::{AdminRequest, AdminRoutes, Running, Service, StartContext};
use fleetgate_storage::{
    BoxFuture, EmbeddedStore, LastQuery, Point, RangeQuery, StorageError, TimeSeriesStore,
};
use serde_json::{Value as Json, json};
use tokio::sync::watch;

fn apps() -> BTreeMap<String, AppTimeSeries> {
    let time_series: TimeSeriesConfig = serde_yaml::from_str(
        r#"
auto_extract: true
names:
  location:
    values:
      - {path: lat, name: latitude}
      - {path: lon, name: longitude}
timestamp: {path: ts, format: millis-unix-epoch, fallback: reject}
"#,
    )
    .unwrap();
    BTreeMap::from([(
        "demo".to_owned(),
        AppTimeSeries { versions: vec!["demo-v1".into()], time_series },
    )])
}

struct Harness {
    bus: AnyBus,
    running: Running,
    _stop: watch::Sender<bool>,
    replies: Subscription,
    tstp: Subscription,
    routes: Arc<dyn AdminRoutes>,
}

async fn start(store: Arc<dyn TimeSeriesStore>) -> Harness {
    let bus = AnyBus::InProcess(InProcessBus::new(256));
    let (stop, shutdown) = watch::channel(false);
    let service = Box::new(EptsService::with_store(EptsConfig::default(), store, apps()));
    let running =
        service.start(StartContext { bus: bus.clone(), shutdown }).await.expect("epts starts");
    let replies = bus.subscribe("test.replies", None).await.unwrap();
    let tstp = bus
        .subscribe("kaa.v1.events.epts.endpoint.data-collection.data-points-received.*", None)
        .await
        .unwrap();
    let routes = running.status.admin_routes().expect("epts serves routes");
    Harness { bus, running, _stop: stop, replies, tstp, routes }
}

impl Harness {
    async fn send(&self, correlation_id: &str, endpoint: &str, samples: &[&str]) {
        let event = DataSamplesEvent {
            correlation_id,
            timestamp_ms: 1,
            timeout_ms: 0,
            app_version_name: "demo-v1",
            endpoint_id: endpoint,
            content_type: "application/json",
            data_samples: samples.iter().map(|s| s.as_bytes()).collect(),
        };
        self.bus
            .publish(
                Subject::from(subjects::dstp_data_samples_received("dcx")),
                Some(Subject::from("test.replies")),
                event.to_bytes(),
            )
            .await
            .unwrap();
    }

    async fn reply(&mut self) -> (String, i32, Option<String>, String) {
        let msg = tokio::time::timeout(Duration::from_secs(10), self.replies.next())
            .await
            .expect("an answer in time")
            .expect("bus open");
        let p = DataSamplesProcessed::decode(&msg.payload).unwrap();
        (
            p.correlation_id.to_owned(),
            p.status_code,
            p.reason_phrase.map(str::to_owned),
            p.receiver_service_instance_name.to_owned(),
        )
    }

    async fn request(&self, method: &str, path: &str, query: &str, body: &str) -> (u16, Json) {
        let response = self
            .routes
            .handle(AdminRequest {
                method: method.into(),
                path: path.into(),
                query: query.into(),
                body: body.as_bytes().to_vec(),
            })
            .await;
        let json = if response.body.is_empty() {
            Json::Null
        } else {
            serde_json::from_slice(&response.body).unwrap()
        };
        (response.status, json)
    }
}

#[tokio::test]
async fn samples_are_stored_answered_broadcast_and_queryable() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let mut h = start(store.clone()).await;

    h.send(
        "c1",
        "ep-1",
        &[
            r#"{"ts":1556293267000,"temperature":21.5,"lat":1.5,"lon":2}"#,
            r#"{"ts":1556293268000,"temperature":22}"#,
            r#"{"temperature":99}"#,
            r#"{"ts":1556293269000,"lat":"north","lon":3}"#,
        ],
    )
    .await;
    let (id, status, reason, receiver) = h.reply().await;
    assert_eq!((id.as_str(), status, reason, receiver.as_str()), ("c1", 200, None, "epts"));

    // Answered only after storage: the points are there.
    let stored = store
        .range(RangeQuery {
            app: "demo".into(),
            series: vec!["auto~temperature".into(), "location".into()],
            endpoints: None,
            from_ms: 0,
            to_ms: i64::MAX,
            order: Default::default(),
            limit: 100,
        })
        .await
        .unwrap();
    let keys: Vec<_> = stored.iter().map(|p| (p.series.as_str(), p.timestamp_ms)).collect();
    assert_eq!(
        keys,
        [
            ("auto~temperature", 1_556_293_267_000),
            ("location", 1_556_293_267_000),
            ("auto~temperature", 1_556_293_268_000),
        ],
        "the sample without a timestamp (fallback: reject) and the wrongly typed location are skipped"
    );

    // 14/TSTP: one event per series of the batch.
    let mut events = BTreeMap::new();
    for _ in 0..4 {
        let msg =
            tokio::time::timeout(Duration::from_secs(5), h.tstp.next()).await.unwrap().unwrap();
        let e = TimeSeriesEvent::decode(&msg.payload).unwrap();
        assert_eq!(msg.subject.as_str(), subjects::tstp_data_points("epts", e.time_series_name));
        assert_eq!((e.app_version_name, e.endpoint_id), ("demo-v1", "ep-1"));
        let points: Vec<_> = e
            .data_points
            .iter()
            .map(|p| {
                assert!(p.ingestion_timestamp_ms > 1_600_000_000_000);
                (p.timestamp_ms, format!("{:?}", p.values))
            })
            .collect();
        events.insert(e.time_series_name.to_owned(), points);
    }
    // Auto-extraction takes every numeric top-level field, the named series' fields too.
    assert_eq!(
        events.keys().collect::<Vec<_>>(),
        ["auto~lat", "auto~lon", "auto~temperature", "location"]
    );
    assert_eq!(events["auto~temperature"].len(), 2);
    assert_eq!(
        events["auto~temperature"][0].1,
        format!("{:?}", vec![("value", TimeSeriesValue::Double(21.5))])
    );
    assert_eq!(
        events["location"][0].1,
        format!(
            "{:?}",
            vec![
                ("latitude", TimeSeriesValue::Double(1.5)),
                ("longitude", TimeSeriesValue::Long(2))
            ]
        )
    );

    // A re-sent batch overwrites: still one point per key.
    h.send("c2", "ep-1", &[r#"{"ts":1556293268000,"temperature":23}"#]).await;
    assert_eq!(h.reply().await.1, 200);

    // The REST API, Kaa's shapes.
    let (status, body) = h
        .request(
            "GET",
            "/epts/api/v1/applications/demo/time-series/data",
            "timeSeriesName=auto~temperature&fromDate=2019-04-26T15:41:07Z&toDate=2019-04-26T15:41:08%2B00:00&sort=DESC",
            "",
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!([{"ep-1": {"auto~temperature": [
            {"timestamp": "2019-04-26T15:41:08.000Z", "values": {"value": 23}},
            {"timestamp": "2019-04-26T15:41:07.000Z", "values": {"value": 21.5}},
        ]}}])
    );
    let (status, body) = h
        .request(
            "GET",
            "/epts/api/v1/applications/demo/time-series/last",
            "timeSeriesName=auto~temperature,location&endpointId=ep-1",
            "",
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"ep-1": {
            "auto~temperature": [{"timestamp": "2019-04-26T15:41:08.000Z", "values": {"value": 23}}],
            "location": [{"timestamp": "2019-04-26T15:41:07.000Z", "values": {"latitude": 1.5, "longitude": 2}}],
        }})
    );
    let (status, body) = h
        .request(
            "POST",
            "/epts/api/v1/applications/demo/time-series/last",
            "",
            r#"{"timeSeriesNames":["auto~temperature"],"endpointIDs":["ep-1"],"beforeDate":"2019-04-26T15:41:08Z","offset":0,"limit":10}"#,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"ep-1": {"auto~temperature": [{"timestamp": "2019-04-26T15:41:07.000Z", "values": {"value": 21.5}}]}})
    );
    let (status, body) = h.request("GET", "/epts/api/v1/time-series/config", "", "").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"demo": [
            {"name": "auto~lat", "values": ["value"]},
            {"name": "auto~lon", "values": ["value"]},
            {"name": "auto~temperature", "values": ["value"]},
            {"name": "location", "values": ["latitude", "longitude"]},
        ]})
    );
    drop(h.running);
}

#[tokio::test]
async fn bad_requests_name_the_parameter_and_unknown_applications_are_404() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(Arc::new(EmbeddedStore::open(dir.path()).unwrap())).await;
    let data = "/epts/api/v1/applications/demo/time-series/data";
    for (query, param) in [
        ("fromDate=2019-01-01&toDate=2019-01-02", "timeSeriesName"),
        ("timeSeriesName=t&toDate=2019-01-02", "fromDate"),
        ("timeSeriesName=t&fromDate=yesterday&toDate=2019-01-02", "fromDate"),
        ("timeSeriesName=t&fromDate=2019-01-01&toDate=2019-01-02&sort=UP", "sort"),
        ("timeSeriesName=t&fromDate=2019-01-01&toDate=2019-01-02&limit=0", "limit"),
        ("timeSeriesName=t&fromDate=2019-01-01&toDate=2019-01-02&includeTime=maybe", "includeTime"),
    ] {
        let (status, body) = h.request("GET", data, query, "").await;
        assert_eq!(status, 400, "{query}: {body}");
        let reason = body["reasonPhrase"].as_str().unwrap();
        assert!(reason.starts_with(&format!("{param}:")), "{query}: {reason}");
        assert_eq!(body["statusCode"], 400);
    }
    let (status, body) = h
        .request("GET", "/epts/api/v1/applications/nope/time-series/last", "timeSeriesName=t", "")
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, _) =
        h.request("PUT", "/epts/api/v1/app-versions/nope/time-series/data", "", "{}").await;
    assert_eq!(status, 404);
    let (status, body) = h.request("POST", data, "", "[1]").await;
    assert_eq!(
        (status, body["reasonPhrase"].as_str().unwrap()),
        (400, "body: must be a JSON object")
    );
    let (status, _) = h.request("DELETE", data, "", "").await;
    assert_eq!(status, 405);
    let (status, _) = h.request("GET", "/epts/api/v1/nothing", "", "").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn points_put_over_rest_are_stored_and_broadcast() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(Arc::new(EmbeddedStore::open(dir.path()).unwrap())).await;
    let (status, body) = h
        .request(
            "PUT",
            "/epts/api/v1/app-versions/demo-v1/time-series/data",
            "",
            r#"{"ep-9": {"humidity": [{"timestamp": "2020-01-01T00:00:00Z", "values": {"value": 40, "ok": true, "note": null}}]}}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let msg = tokio::time::timeout(Duration::from_secs(5), h.tstp.next()).await.unwrap().unwrap();
    let e = TimeSeriesEvent::decode(&msg.payload).unwrap();
    assert_eq!((e.endpoint_id, e.time_series_name), ("ep-9", "humidity"));
    assert_eq!(e.data_points[0].timestamp_ms, 1_577_836_800_000);
    let (status, body) = h
        .request(
            "POST",
            "/epts/api/v1/applications/demo/time-series/data",
            "",
            r#"{"timeSeriesNames":["humidity"],"fromDate":"2020-01-01T00:00:00Z","toDate":"2020-01-01T00:00:00Z"}"#,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!([{"ep-9": {"humidity": [{"timestamp": "2020-01-01T00:00:00.000Z", "values": {"value": 40, "ok": true, "note": null}}]}}])
    );
    let (status, body) = h
        .request(
            "PUT",
            "/epts/api/v1/app-versions/demo-v1/time-series/data",
            "",
            r#"{"ep-9": {"bad name": []}}"#,
        )
        .await;
    assert_eq!(status, 400);
    assert!(body["reasonPhrase"].as_str().unwrap().starts_with("body.ep-9.bad name:"));
}

/// A store whose disk has failed.
struct Broken;

impl TimeSeriesStore for Broken {
    fn write(&self, _: Arc<Vec<Point>>) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async { Err(StorageError::Backend("disk on fire".into())) })
    }
    fn range(&self, _: RangeQuery) -> BoxFuture<'_, Result<Vec<Point>, StorageError>> {
        Box::pin(async { Err(StorageError::Backend("disk on fire".into())) })
    }
    fn last(&self, _: LastQuery) -> BoxFuture<'_, Result<Vec<Point>, StorageError>> {
        Box::pin(async { Err(StorageError::Backend("disk on fire".into())) })
    }
    fn sweep(&self, _: &str, _: i64) -> BoxFuture<'_, Result<u64, StorageError>> {
        Box::pin(async { Ok(0) })
    }
    fn series(&self, _: &str) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn endpoints(&self, _: &str) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn kind(&self) -> &'static str {
        "broken"
    }
}

#[tokio::test]
async fn a_storage_failure_is_answered_with_a_failure_status() {
    let mut h = start(Arc::new(Broken)).await;
    h.send("c1", "ep-1", &[r#"{"ts":1,"temperature":1}"#]).await;
    let (id, status, reason, _) = h.reply().await;
    assert_eq!((id.as_str(), status), ("c1", 500));
    assert!(reason.unwrap().contains("disk on fire"));
    // Nothing was stored, so nothing is broadcast.
    assert!(tokio::time::timeout(Duration::from_millis(200), h.tstp.next()).await.is_err());
    let (status, body) = h
        .request("GET", "/epts/api/v1/applications/demo/time-series/last", "timeSeriesName=t", "")
        .await;
    assert_eq!(status, 503, "{body}");
}

#[tokio::test]
async fn the_retention_sweep_deletes_points_past_retention_days() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let now = fleetgate_bus::now_ms();
    let point = |age_days: i64| Point {
        app: "demo".into(),
        series: "t".into(),
        endpoint: "ep-1".into(),
        timestamp_ms: now - age_days * 86_400_000,
        values: vec![("value".into(), fleetgate_storage::Value::Long(age_days))],
    };
    store.write(Arc::new(vec![point(3), point(1), point(0)])).await.unwrap();
    let mut apps = apps();
    apps.get_mut("demo").unwrap().time_series.retention_days = 2;
    let bus = AnyBus::InProcess(InProcessBus::new(16));
    let (_stop, shutdown) = watch::channel(false);
    let service = Box::new(EptsService::with_store(EptsConfig::default(), store.clone(), apps));
    let _running = service.start(StartContext { bus, shutdown }).await.unwrap();
    // The first sweep runs at start.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = store
            .range(RangeQuery {
                app: "demo".into(),
                series: vec!["t".into()],
                endpoints: None,
                from_ms: 0,
                to_ms: i64::MAX,
                order: Default::default(),
                limit: 10,
            })
            .await
            .unwrap();
        if left.len() == 2 {
            assert!(left.iter().all(|p| p.timestamp_ms >= now - 86_400_000));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not swept: {left:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
