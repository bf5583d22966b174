//! ECR on the in-process bus with a real embedded store: the REST API stores and broadcasts,
//! 6/CDTP requests are answered per the RFC, dispatches and confirmations show in
//! `/statuses`, and bad input changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use fleetgate_bus::{AnyBus, Bus, InProcessBus, Subject, Subscription};
use fleetgate_ecr::{EcrConfig, EcrService};
use fleetgate_messages::{
    ConfigApplied, ConfigRequest, ConfigResponse, ConfigUpdated, Record, subjects,
};
use fleetgate_service::{AdminRequest, AdminResponse, AdminRoutes, Running, Service, StartContext};
use fleetgate_storage::EmbeddedConfigStore;
use serde_json::{Value as Json, json};
use tokio::sync::watch;

struct Harness {
    bus: AnyBus,
    _running: Running,
    _stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
    replies: Subscription,
    updates: Subscription,
    routes: Arc<dyn AdminRoutes>,
}

async fn start() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedConfigStore::open(dir.path()).unwrap());
    let bus = AnyBus::InProcess(InProcessBus::new(256));
    let (stop, shutdown) = watch::channel(false);
    let config = EcrConfig { max_config_bytes: 64, ..EcrConfig::default() };
    let service = Box::new(EcrService::with_store(config, store));
    let running =
        service.start(StartContext { bus: bus.clone(), shutdown }).await.expect("ecr starts");
    let replies = bus.subscribe("test.replies", None).await.unwrap();
    let updates = bus.subscribe(subjects::CONFIG_UPDATED_ANY, None).await.unwrap();
    let routes = running.status.admin_routes().expect("ecr serves routes");
    Harness { bus, _running: running, _stop: stop, _dir: dir, replies, updates, routes }
}

#[derive(Debug, PartialEq)]
struct Answer {
    config_id: Option<String>,
    content: Option<Json>,
    status: i32,
    reason: Option<String>,
}

impl Harness {
    async fn ask(&mut self, endpoint: &str, config_id: Option<&str>, name: Option<&str>) -> Answer {
        let request = ConfigRequest {
            correlation_id: "corr-1",
            timestamp_ms: fleetgate_bus::now_ms(),
            timeout_ms: 5_000,
            app_version_name: "demo-v1",
            endpoint_id: endpoint,
            config_id,
            config_name: name,
        };
        self.bus
            .publish(
                Subject::from(subjects::cdtp_request("ecr")),
                Some(Subject::from("test.replies")),
                request.to_bytes(),
            )
            .await
            .unwrap();
        let msg = tokio::time::timeout(Duration::from_secs(10), self.replies.next())
            .await
            .expect("an answer in time")
            .unwrap();
        let r = ConfigResponse::decode(&msg.payload).unwrap();
        assert_eq!(
            (r.correlation_id, r.endpoint_id, r.app_version_name),
            ("corr-1", endpoint, "demo-v1")
        );
        Answer {
            config_id: r.config_id.map(str::to_owned),
            content: r.content.map(|c| serde_json::from_slice(c).unwrap()),
            status: r.status_code,
            reason: r.reason_phrase.map(str::to_owned),
        }
    }

    async fn update(&mut self) -> (String, String, String, Option<String>, Json) {
        let msg = tokio::time::timeout(Duration::from_secs(10), self.updates.next())
            .await
            .expect("a ConfigUpdated in time")
            .unwrap();
        let u = ConfigUpdated::decode(&msg.payload).unwrap();
        assert_eq!(u.content_type, "application/json");
        (
            u.app_version_name.to_owned(),
            u.endpoint_id.to_owned(),
            u.config_id.to_owned(),
            u.config_name.map(str::to_owned),
            serde_json::from_slice(u.content).unwrap(),
        )
    }

    async fn raw(&self, method: &str, path: &str, query: &str, body: &[u8]) -> AdminResponse {
        self.routes
            .handle(AdminRequest {
                method: method.into(),
                path: format!("/ecr/api/v1{path}"),
                query: query.into(),
                body: body.to_vec(),
            })
            .await
    }

    async fn rest(&self, method: &str, path: &str, query: &str, body: &str) -> (u16, Json) {
        let r = self.raw(method, path, query, body.as_bytes()).await;
        let json =
            if r.body.is_empty() { Json::Null } else { serde_json::from_slice(&r.body).unwrap() };
        (r.status, json)
    }

    /// The statuses of `query` once `ready` holds for them (ECR records after it answers).
    async fn statuses_when(&self, query: &str, ready: impl Fn(&[Json]) -> bool) -> Vec<Json> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.statuses(query).await;
            if ready(&s) {
                return s;
            }
            assert!(tokio::time::Instant::now() < deadline, "statuses never ready: {s:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn statuses(&self, query: &str) -> Vec<Json> {
        let (status, page) = self.rest("GET", "/statuses", query, "").await;
        assert_eq!(status, 200, "{page}");
        page["content"].as_array().unwrap().clone()
    }
}

#[tokio::test]
async fn a_configuration_is_stored_broadcast_requested_and_confirmed() {
    let mut h = start().await;
    // Nothing assigned: configId "" and no content; asking with "" is "unchanged".
    let none = h.ask("ep-1", None, None).await;
    assert_eq!(
        none,
        Answer { config_id: Some(String::new()), content: None, status: 200, reason: None }
    );
    let same = h.ask("ep-1", Some(""), None).await;
    assert_eq!(same.config_id, None);

    let r = h.raw("PUT", "/endpoints/ep-1/app-versions/demo-v1", "", br#"{"mode":"AP"}"#).await;
    assert_eq!(r.status, 200);
    let body: Json = serde_json::from_slice(&r.body).unwrap();
    let id = body["configId"].as_str().unwrap().to_owned();
    assert_eq!(body["name"], "default");
    assert_eq!(body["config"], json!({"mode": "AP"}));
    assert!(body["createdDate"].as_str().unwrap().ends_with('Z'));
    assert_eq!(r.headers, vec![("etag", format!("\"{id}\""))]);
    let (app, endpoint, update_id, name, content) = h.update().await;
    assert_eq!((app.as_str(), endpoint.as_str(), name), ("demo-v1", "ep-1", None));
    assert_eq!((update_id, content), (id.clone(), json!({"mode": "AP"})));

    // The current configuration, then "unchanged" for its id.
    let got = h.ask("ep-1", None, None).await;
    assert_eq!(got.config_id.as_deref(), Some(id.as_str()));
    assert_eq!(got.content, Some(json!({"mode": "AP"})));
    let statuses = h.statuses_when("endpointId=ep-1", |s| !s.is_empty()).await;
    assert_eq!(statuses.len(), 1);
    assert_eq!(statuses[0]["status"], "DISPATCHED");
    assert_eq!(statuses[0]["config"], json!({"mode": "AP"}));
    assert!(statuses[0]["lastConfirmedDate"].is_null());
    let unchanged = h.ask("ep-1", Some(&id), None).await;
    assert_eq!(unchanged, Answer { config_id: None, content: None, status: 200, reason: None });
    // The request that carried the id confirmed it implicitly.
    let statuses =
        h.statuses_when(&format!("configId={id}"), |s| s[0]["status"] == "APPLIED").await;
    assert_eq!(statuses[0]["confirmationStatusCode"], 200);
    assert_eq!(statuses[0]["confirmationReasonPhrase"], "Implicitly applied");

    // A failure reported by ConfigApplied is recorded with its reason.
    let applied = ConfigApplied {
        correlation_id: "a1",
        timestamp_ms: 1,
        timeout_ms: 0,
        app_version_name: "demo-v1",
        endpoint_id: "ep-1",
        config_id: &id,
        originator_replica_id: None,
        status_code: 400,
        reason_phrase: Some("unknown mode"),
        config_name: None,
    };
    h.bus
        .publish(Subject::from(subjects::config_applied("cmx")), None, applied.to_bytes())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = h.statuses("endpointId=ep-1&appVersionName=demo-v1").await;
        if s[0]["status"] == "FAILED" {
            assert_eq!(s[0]["confirmationReasonPhrase"], "unknown mode");
            assert_eq!(s[0]["confirmationStatusCode"], 400);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "ConfigApplied not recorded: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn defaults_named_configurations_and_deletes() {
    let mut h = start().await;
    let (status, default) = h.rest("PUT", "/app-versions/demo-v1", "", r#"{"level":1}"#).await;
    assert_eq!(status, 200);
    let (_, endpoint, _, _, _) = h.update().await;
    assert_eq!(endpoint, "", "a default change names no endpoint");
    // Every endpoint gets the default until it has its own.
    let got = h.ask("ep-7", None, None).await;
    assert_eq!(got.config_id.as_deref(), default["configId"].as_str());
    let (_, own) = h.rest("PUT", "/endpoints/ep-7/app-versions/demo-v1", "", "[1,2]").await;
    h.update().await;
    assert_eq!(h.ask("ep-7", None, None).await.content, Some(json!([1, 2])));
    // A named configuration is separate, and so is its update.
    let (status, net) = h
        .rest("PUT", "/endpoints/ep-7/app-versions/demo-v1", "name=network", r#"{"ssid":"x"}"#)
        .await;
    assert_eq!((status, net["name"].as_str()), (200, Some("network")));
    let (_, _, _, name, _) = h.update().await;
    assert_eq!(name.as_deref(), Some("network"));
    assert_eq!(h.ask("ep-7", None, Some("network")).await.content, Some(json!({"ssid": "x"})));
    let (_, list) =
        h.rest("GET", "/endpoints/ep-7/app-versions/demo-v1/configurations", "", "").await;
    let names: Vec<&str> =
        list.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["default", "network"]);
    let (_, list) = h.rest("GET", "/app-versions/demo-v1/configurations", "", "").await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    // Deleting the endpoint's own configuration broadcasts the default it falls back to.
    let (status, _) = h.rest("DELETE", "/endpoints/ep-7/app-versions/demo-v1", "", "").await;
    assert_eq!(status, 204);
    let (_, endpoint, id, _, content) = h.update().await;
    assert_eq!((endpoint.as_str(), content), ("ep-7", json!({"level": 1})));
    assert_eq!(Some(id.as_str()), default["configId"].as_str());
    assert_ne!(own["configId"], default["configId"]);
    let (status, _) = h.rest("GET", "/endpoints/ep-7/app-versions/demo-v1", "", "").await;
    assert_eq!(status, 404);
    let (status, _) = h.rest("DELETE", "/endpoints/ep-7/app-versions/demo-v1", "", "").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn batch_assigns_one_configuration_to_many_endpoints() {
    let mut h = start().await;
    let body = json!({"configPayload": {"on": true}, "endpoints": {"demo-v1": ["a", "b"], "demo-v2": ["c"]}});
    let (status, stored) = h.rest("PUT", "/endpoints/batch", "", &body.to_string()).await;
    assert_eq!(status, 200, "{stored}");
    assert_eq!(stored.as_array().unwrap().len(), 3);
    for _ in 0..3 {
        h.update().await;
    }
    for (ep, v) in [("a", "demo-v1"), ("b", "demo-v1"), ("c", "demo-v2")] {
        let (status, c) = h.rest("GET", &format!("/endpoints/{ep}/app-versions/{v}"), "", "").await;
        assert_eq!((status, &c["config"]), (200, &json!({"on": true})));
    }
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let mut h = start().await;
    let path = "/endpoints/ep-1/app-versions/demo-v1";
    let (status, _) = h.rest("PUT", path, "", r#"{"v":1}"#).await;
    assert_eq!(status, 200);
    h.update().await;
    let before = h.rest("GET", path, "", "").await;
    let cases: &[(&str, &str, &[u8], u16, &str)] = &[
        ("PUT", "", b"{not json", 400, "config: not valid JSON"),
        ("PUT", "", b"", 400, "config: not valid JSON"),
        ("PUT", "", &[b'1'; 65], 413, "config: 65 bytes, over ecr.max_config_bytes (64)"),
        ("PUT", "name=bad%20name", b"{}", 400, "name: `bad name` does not match"),
        ("PUT", "name=", b"{}", 400, "name: `` does not match"),
        ("PUT", "colour=red", b"{}", 400, "colour: unknown parameter"),
        ("PUT", "name=a&name=b", b"{}", 400, "name: given more than once"),
        ("POST", "", b"{}", 405, "method not allowed"),
    ];
    for (method, query, body, status, reason) in cases {
        let r = h.raw(method, path, query, body).await;
        let json: Json = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(r.status, *status, "{method} ?{query}: {json}");
        assert_eq!(json["statusCode"], *status);
        let got = json["reasonPhrase"].as_str().unwrap();
        assert!(got.starts_with(reason), "{method} ?{query}: {got}");
    }
    assert_eq!(h.rest("GET", path, "", "").await, before, "nothing stored changed");
    for (query, reason) in [("size=0", "size:"), ("page=-1", "page:"), ("other=1", "other:")] {
        let (status, json) = h.rest("GET", "/statuses", query, "").await;
        assert_eq!(status, 400);
        assert!(json["reasonPhrase"].as_str().unwrap().starts_with(reason), "{json}");
    }
    let bad_batch = [
        r#"{"endpoints":{}}"#,
        r#"{"configPayload":1,"endpoints":{"v":"a"}}"#,
        r#"{"configPayload":1,"endpoints":{"v":["a"]},"extra":1}"#,
        r#"[1]"#,
    ];
    for body in bad_batch {
        let (status, json) = h.rest("PUT", "/endpoints/batch", "", body).await;
        assert_eq!(status, 400, "{body}: {json}");
    }
    // A bad configuration name in a 6/CDTP request is a 400 answer.
    let bad = h.ask("ep-1", None, Some("no/slash")).await;
    assert_eq!(bad.status, 400);
    assert_eq!((bad.config_id, bad.content), (None, None));
    // No update was broadcast for any of it.
    assert!(tokio::time::timeout(Duration::from_millis(200), h.updates.next()).await.is_err());
}

#[tokio::test]
async fn a_json_schema_per_app_version_refuses_what_does_not_match() {
    let h = start().await;
    let schema = r#"{"type":"object","properties":{"interval":{"type":"integer","minimum":1}},"required":["interval"]}"#;
    let (status, _) = h.rest("GET", "/app-versions/demo-v1/schemas", "", "").await;
    assert_eq!(status, 404);
    let (status, json) =
        h.rest("PUT", "/app-versions/demo-v1/schemas", "", r#"{"type":"nonsense"}"#).await;
    assert_eq!(status, 400, "{json}");
    assert!(
        json["reasonPhrase"].as_str().unwrap().starts_with("schema: not a valid JSON Schema"),
        "{json}"
    );
    let (status, _) = h.rest("PUT", "/app-versions/demo-v1/schemas", "", schema).await;
    assert_eq!(status, 200);
    let (status, got) = h.rest("GET", "/app-versions/demo-v1/schemas", "", "").await;
    assert_eq!((status, got["required"].clone()), (200, json!(["interval"])));

    let path = "/endpoints/ep-1/app-versions/demo-v1";
    let (status, json) = h.rest("PUT", path, "", r#"{"interval":0}"#).await;
    assert_eq!(status, 400);
    let reason = json["reasonPhrase"].as_str().unwrap();
    assert!(
        reason.starts_with("config: does not match the JSON Schema of app version demo-v1"),
        "{reason}"
    );
    assert!(reason.contains("/interval"), "the violation is located: {reason}");
    let (status, json) = h.rest("PUT", "/app-versions/demo-v1", "", r#"{"other":1}"#).await;
    assert_eq!(status, 400, "{json}");
    assert!(json["reasonPhrase"].as_str().unwrap().contains("interval"), "{json}");
    let batch = json!({"configPayload": {"interval": "x"}, "endpoints": {"demo-v1": ["a"]}});
    assert_eq!(h.rest("PUT", "/endpoints/batch", "", &batch.to_string()).await.0, 400);
    // Nothing was stored; another app version has no schema.
    assert_eq!(h.rest("GET", path, "", "").await.0, 404);
    assert_eq!(
        h.rest("PUT", "/endpoints/ep-1/app-versions/demo-v2", "", r#"{"interval":0}"#).await.0,
        200
    );

    let (status, _) =
        h.rest("PUT", "/app-versions/demo-v1/schemas/validate", "", r#"{"interval":3}"#).await;
    assert_eq!(status, 200);
    let (status, _) =
        h.rest("PUT", "/app-versions/demo-v1/schemas/validate", "", r#"{"interval":-3}"#).await;
    assert_eq!(status, 400);
    assert_eq!(h.rest("PUT", path, "", r#"{"interval":3}"#).await.0, 200);
    // Without the schema, anything JSON goes again.
    assert_eq!(h.rest("DELETE", "/app-versions/demo-v1/schemas", "", "").await.0, 204);
    assert_eq!(h.rest("PUT", path, "", r#"{"interval":0}"#).await.0, 200);
}
