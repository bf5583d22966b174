//! CMX with ECR on the in-process bus (ECR on a real embedded store), the test playing the
//! gateway: 7/CMP requests in as `ClientData`, answers and pushes out as `ExtensionData`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use fleetgate_bus::{AnyBus, Bus, InProcessBus, Subject, Subscription};
use fleetgate_cmx::{CmxConfig, CmxService};
use fleetgate_ecr::{EcrConfig, EcrService};
use fleetgate_messages::{
    ClientData, ConfigApplied, ConnectedEvent, DisconnectedEvent, ExtensionData, Record, subjects,
};
use fleetgate_service::{AdminRequest, AdminRoutes, Running, Service, StartContext};
use fleetgate_storage::EmbeddedConfigStore;
use serde_json::{Value as Json, json};
use tokio::sync::watch;

struct Harness {
    bus: AnyBus,
    _services: Vec<Running>,
    _stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
    gateway: Subscription,
    applied: Subscription,
    ecr: Arc<dyn AdminRoutes>,
    metrics: prometheus_client::registry::Registry,
}

#[derive(Debug)]
struct Out {
    endpoint: Option<String>,
    request_id: Option<i32>,
    path: String,
    status: i32,
    reason: Option<String>,
    payload: Option<Json>,
}

async fn start() -> Harness {
    start_with(CmxConfig::default()).await
}

async fn start_with(cmx: CmxConfig) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let bus = AnyBus::InProcess(InProcessBus::new(1024));
    let (stop, shutdown) = watch::channel(false);
    let store = Arc::new(EmbeddedConfigStore::open(dir.path()).unwrap());
    let ecr = Box::new(EcrService::with_store(EcrConfig::default(), store))
        .start(StartContext { bus: bus.clone(), shutdown: shutdown.clone() })
        .await
        .unwrap();
    let cmx = Box::new(CmxService::new(cmx));
    let mut metrics = prometheus_client::registry::Registry::with_prefix("fleetgate");
    cmx.register_metrics(&mut metrics);
    let cmx = cmx.start(StartContext { bus: bus.clone(), shutdown }).await.unwrap();
    // Answers go to the requesting replica, pushes for endpoints CMX has no request from to
    // the gateway service: both land here.
    let gateway = bus.subscribe("kaa.v1.*.*.esp.ExtensionData", None).await.unwrap();
    let applied = bus.subscribe(subjects::CONFIG_APPLIED_ANY, None).await.unwrap();
    let routes = ecr.status.admin_routes().unwrap();
    Harness {
        bus,
        _services: vec![ecr, cmx],
        _stop: stop,
        _dir: dir,
        gateway,
        applied,
        ecr: routes,
        metrics,
    }
}

impl Harness {
    async fn device(&self, endpoint: &str, path: &str, request_id: Option<i32>, body: &str) {
        let data = ClientData {
            correlation_id: "gw-1-7",
            timestamp_ms: fleetgate_bus::now_ms(),
            timeout_ms: 5_000,
            app_version_name: "demo-v1",
            endpoint_id: Some(endpoint),
            resource_path: path,
            request_id,
            payload: body.as_bytes(),
            config_name: None,
        };
        self.bus
            .publish(
                Subject::from(subjects::esp_client_data("cmx")),
                Some(Subject::from("kaa.v1.replica.gw-1.esp.ExtensionData")),
                data.to_bytes(),
            )
            .await
            .unwrap();
    }

    async fn out(&mut self) -> Out {
        let msg = tokio::time::timeout(Duration::from_secs(10), self.gateway.next())
            .await
            .expect("CMX sends something in time")
            .unwrap();
        let d = ExtensionData::decode(&msg.payload).unwrap();
        assert_eq!(d.extension_instance_name, Some("cmx"));
        Out {
            endpoint: d.endpoint_id.map(str::to_owned),
            request_id: d.request_id,
            path: d.resource_path.to_owned(),
            status: d.status_code,
            reason: d.reason_phrase.map(str::to_owned),
            payload: d.payload.map(|p| {
                if p.is_empty() { Json::Null } else { serde_json::from_slice(p).unwrap() }
            }),
        }
    }

    async fn nothing(&mut self) {
        let got = tokio::time::timeout(Duration::from_millis(300), self.gateway.next()).await;
        assert!(
            got.is_err(),
            "unexpected: {:?}",
            got.ok().flatten().map(|m| ExtensionData::decode(&m.payload).map(|d| format!("{d:?}")))
        );
    }

    async fn set(&self, endpoint: &str, query: &str, config: &str) -> String {
        let r = self
            .ecr
            .handle(AdminRequest {
                method: "PUT".into(),
                path: format!("/ecr/api/v1/endpoints/{endpoint}/app-versions/demo-v1"),
                query: query.into(),
                body: config.as_bytes().to_vec(),
            })
            .await;
        assert_eq!(r.status, 200);
        let j: Json = serde_json::from_slice(&r.body).unwrap();
        j["configId"].as_str().unwrap().to_owned()
    }

    async fn statuses(&self, endpoint: &str) -> Json {
        let r = self
            .ecr
            .handle(AdminRequest {
                method: "GET".into(),
                path: "/ecr/api/v1/statuses".into(),
                query: format!("endpointId={endpoint}"),
                body: Vec::new(),
            })
            .await;
        serde_json::from_slice::<Json>(&r.body).unwrap()["content"].clone()
    }

    /// The value of metric `name` (OpenMetrics text).
    fn metric(&self, name: &str) -> f64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.metrics).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }

    /// Waits until metric `name` is `value`.
    async fn until(&self, name: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.metric(name) != value {
            assert!(tokio::time::Instant::now() < deadline, "{name}: {}", self.metric(name));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn disconnect(&self, endpoint: &str) {
        let event = DisconnectedEvent {
            correlation_id: "e2",
            timestamp_ms: 1,
            timeout_ms: 0,
            endpoints: vec![(endpoint, "demo-v1")],
            originator_replica_id: "gw-1",
        };
        self.bus
            .publish(Subject::from(subjects::elce_disconnected("kpc")), None, event.to_bytes())
            .await
            .unwrap();
    }

    async fn connect(&self, endpoint: &str) {
        let event = ConnectedEvent {
            correlation_id: "e1",
            timestamp_ms: 1,
            timeout_ms: 0,
            endpoints: vec![(endpoint, "demo-v1")],
            originator_replica_id: "gw-1",
        };
        self.bus
            .publish(Subject::from(subjects::elce_connected("kpc")), None, event.to_bytes())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn config_requests_observe_and_pushes() {
    let mut h = start().await;
    // No configuration yet: the pair with "" and null.
    h.device("ep-1", "/config/json", Some(1), r#"{"observe":true}"#).await;
    let o = h.out().await;
    assert_eq!((o.request_id, o.status), (Some(1), 200));
    assert_eq!(o.payload, Some(json!({"configId": "", "config": null})));

    // A change is pushed (no request id, bare resource path).
    let id = h.set("ep-1", "", r#"{"mode":"AP"}"#).await;
    let push = h.out().await;
    assert_eq!((push.request_id, push.path.as_str()), (None, "/config/json"));
    assert_eq!(push.payload, Some(json!({"configId": id, "config": {"mode": "AP"}})));

    // Asking with the current id: `{}`; without: the pair.
    h.device("ep-1", "/config/json", Some(2), &format!(r#"{{"configId":"{id}"}}"#)).await;
    assert_eq!(h.out().await.payload, Some(json!({})));
    h.device("ep-1", "/config/json", Some(3), "").await;
    assert_eq!(h.out().await.payload, Some(json!({"configId": id, "config": {"mode": "AP"}})));

    // observe:false: no push on the next change, until a new request says otherwise.
    h.device("ep-1", "/config/json", Some(4), r#"{"observe":false}"#).await;
    h.out().await;
    let id2 = h.set("ep-1", "", r#"{"mode":"STA"}"#).await;
    h.nothing().await;
    h.device("ep-1", "/config/json", Some(5), r#"{"observe":true}"#).await;
    assert_eq!(h.out().await.payload, Some(json!({"configId": id2, "config": {"mode": "STA"}})));
    h.set("ep-1", "", r#"{"mode":"X"}"#).await;
    assert_eq!(h.out().await.payload.unwrap()["config"], json!({"mode": "X"}));

    // A named configuration: its own path, its own pushes.
    h.device("ep-1", "/config/json/network", Some(6), "{}").await;
    assert_eq!(h.out().await.payload, Some(json!({"configId": "", "config": null})));
    let net = h.set("ep-1", "name=network", r#"{"ssid":"s"}"#).await;
    let push = h.out().await;
    assert_eq!(push.path, "/config/json/network");
    assert_eq!(push.payload, Some(json!({"configId": net, "config": {"ssid": "s"}})));
}

#[tokio::test]
async fn applied_is_broadcast_and_recorded_and_connect_pushes_only_unconfirmed() {
    let mut h = start().await;
    let id = h.set("ep-2", "", r#"{"v":1}"#).await;
    // Pushed on the change (to the gateway service: no request from ep-2 yet).
    assert_eq!(h.out().await.payload.unwrap()["configId"], id.as_str());
    // Connected without having confirmed: pushed again.
    h.connect("ep-2").await;
    let push = h.out().await;
    assert_eq!((push.request_id, push.path.as_str()), (None, "/config/json"));
    assert_eq!(push.payload, Some(json!({"configId": id, "config": {"v": 1}})));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while h.statuses("ep-2").await[0]["status"] != "DISPATCHED" {
        assert!(tokio::time::Instant::now() < deadline, "the dispatch not in /statuses");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The Python client's confirmation: no request id, so no answer; a ConfigApplied goes out.
    h.device(
        "ep-2",
        "/applied/json",
        None,
        &format!(r#"{{"configId":"{id}","statusCode":200,"reasonPhrase":"ok"}}"#),
    )
    .await;
    let event =
        tokio::time::timeout(Duration::from_secs(10), h.applied.next()).await.unwrap().unwrap();
    let event = ConfigApplied::decode(&event.payload).unwrap();
    assert_eq!((event.endpoint_id, event.config_id, event.status_code), ("ep-2", id.as_str(), 200));
    assert_eq!(event.reason_phrase, Some("ok"));
    h.nothing().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while h.statuses("ep-2").await[0]["status"] != "APPLIED" {
        assert!(tokio::time::Instant::now() < deadline, "confirmation not in /statuses");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Confirmed: a reconnect pushes nothing.
    h.connect("ep-2").await;
    h.nothing().await;

    // With a request id, /applied answers an empty payload.
    h.device("ep-2", "/applied/json", Some(9), &format!(r#"{{"configId":"{id}"}}"#)).await;
    let o = h.out().await;
    assert_eq!((o.request_id, o.status, o.payload), (Some(9), 200, None));
}

#[tokio::test]
async fn bad_requests_get_precise_errors() {
    let mut h = start().await;
    let cases = [
        ("/config/json", "[1]", 400, "payload: must be a JSON object"),
        ("/config/json", "{", 400, "payload: not valid JSON"),
        ("/config/json", r#"{"observe":1}"#, 400, "observe: must be true or false"),
        ("/config/json", r#"{"colour":1}"#, 400, "colour: unknown field"),
        ("/applied/json", "{}", 400, "configId: required"),
        ("/applied/json", r#"{"configId":"c","x":1}"#, 400, "x: unknown field"),
        ("/config/json/bad.name", "{}", 404, "configuration name `bad.name`"),
        ("/config/xml", "{}", 404, "unknown resource path"),
    ];
    for (i, (path, body, status, reason)) in cases.into_iter().enumerate() {
        let rid = i32::try_from(i).unwrap() + 1;
        h.device("ep-3", path, Some(rid), body).await;
        let o = h.out().await;
        assert_eq!((o.request_id, o.status), (Some(rid), status), "{path} {body}");
        let got = o.reason.unwrap();
        assert!(got.starts_with(reason), "{path} {body}: {got}");
    }
    // An error for a request without id still goes out (to .../error).
    h.device("ep-3", "/applied/json", None, "{}").await;
    assert_eq!(h.out().await.status, 400);
    // Nothing was broadcast as applied.
    assert!(tokio::time::timeout(Duration::from_millis(200), h.applied.next()).await.is_err());
}

#[tokio::test]
async fn a_disconnect_ends_default_pushes_and_the_endpoint_table_is_bounded() {
    let mut h = start_with(CmxConfig { max_endpoints: 3, ..CmxConfig::default() }).await;
    h.connect("ep-a").await;
    h.connect("ep-b").await;
    h.until("fleetgate_cmx_endpoints", 2.0).await;
    // ep-a goes: out of the connected set, and forgotten (it confirmed nothing).
    h.disconnect("ep-a").await;
    h.until("fleetgate_cmx_endpoints", 1.0).await;

    // The app version's default goes to ep-b only.
    let r = h
        .ecr
        .handle(AdminRequest {
            method: "PUT".into(),
            path: "/ecr/api/v1/app-versions/demo-v1".into(),
            query: String::new(),
            body: br#"{"level":2}"#.to_vec(),
        })
        .await;
    assert_eq!(r.status, 200);
    let push = h.out().await;
    assert_eq!((push.endpoint.as_deref(), push.path.as_str()), (Some("ep-b"), "/config/json"));
    assert_eq!(push.payload.unwrap()["config"], json!({"level": 2}));
    h.nothing().await;

    // A flood of connects: never more than 3 remembered, the rest counted as evicted.
    for i in 0..10 {
        h.connect(&format!("flood-{i}")).await;
    }
    h.until("fleetgate_cmx_endpoints_evicted_total", 8.0).await;
    assert_eq!(h.metric("fleetgate_cmx_endpoints"), 3.0);
}
