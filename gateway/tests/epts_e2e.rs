//! EPTS in the real binary: `fleetgate up`'s demo stores what a device sends before the device
//! hears `/status`, the REST API answers over the admin listener (with and without bearer
//! tokens), and `fleetgate epts` runs alone on NATS beside the gateway and DCX.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use fleetgate_testkit::NatsServer;
use support::{Fleetgate, demo_endpoint_env, http_get, rumqttc_request};

/// An HTTP/1.1 request with an optional bearer token: (status, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text.split(' ').nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (code, body)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test]
async fn status_means_stored_in_the_demo() {
    let fg = Fleetgate::start("up", &demo_endpoint_env());
    let p = rumqttc_request(
        fg.mqtt,
        None,
        "kp1/demo-v1/dcx/tok-1/json/1",
        br#"[{"temperature":21.5,"humidity":40},{"label":"x"}]"#,
    )
    .await;
    assert_eq!(p.topic, "kp1/demo-v1/dcx/tok-1/json/1/status");
    // Right after `/status`, no waiting: the points are stored.
    let (status, body) = http_get(
        fg.admin,
        "/epts/api/v1/applications/demo/time-series/last?timeSeriesName=auto~temperature,auto~humidity",
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let last = json(&body);
    assert_eq!(last["ep-1"]["auto~temperature"][0]["values"]["value"], 21.5, "{body}");
    assert_eq!(last["ep-1"]["auto~humidity"][0]["values"]["value"], 40, "{body}");
    assert_eq!(fg.metric("fleetgate_epts_points_stored_total"), Some(2.0));

    let (status, body) = http_get(fg.admin, "/epts/api/v1/time-series/config").unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        json(&body),
        serde_json::json!({"demo": [
            {"name": "auto~humidity", "values": ["value"]},
            {"name": "auto~temperature", "values": ["value"]},
        ]})
    );
    let (status, body) = http_get(
        fg.admin,
        "/epts/api/v1/applications/demo/time-series/data?timeSeriesName=auto~temperature",
    )
    .unwrap();
    assert_eq!(status, 400);
    assert!(json(&body)["reasonPhrase"].as_str().unwrap().starts_with("fromDate:"), "{body}");
    let (status, _) = http_get(fg.admin, "/epts/plot").unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn api_tokens_guard_the_api_but_not_its_document() {
    let mut env = demo_endpoint_env();
    env.push(("FLEETGATE_ADMIN_API_TOKENS", "[s3cret, other]".into()));
    let fg = Fleetgate::start("up", &env);
    let path = "/epts/api/v1/time-series/config";
    let (status, body) = http(fg.admin, "GET", path, None, "");
    assert_eq!(status, 401, "{body}");
    assert_eq!(json(&body)["statusCode"], 401);
    assert_eq!(http(fg.admin, "GET", path, Some("wrong"), "").0, 401);
    assert_eq!(http(fg.admin, "GET", path, Some("other"), "").0, 200);
    let (status, body) = http(fg.admin, "GET", "/epts/api/v1/openapi.json", None, "");
    assert_eq!(status, 200);
    assert_eq!(json(&body)["openapi"], "3.1.0");
    // Health and metrics stay open.
    assert_eq!(http(fg.admin, "GET", "/healthz", None, "").0, 200);
    // PUT with the token: stored and readable.
    let (status, body) = http(
        fg.admin,
        "PUT",
        "/epts/api/v1/app-versions/demo-v1/time-series/data",
        Some("s3cret"),
        r#"{"ep-7": {"power": [{"timestamp": "2024-01-01T00:00:00Z", "values": {"value": 3}}]}}"#,
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(
        fg.admin,
        "POST",
        "/epts/api/v1/applications/demo/time-series/data",
        Some("s3cret"),
        r#"{"timeSeriesNames": ["power"], "fromDate": "2024-01-01T00:00:00Z", "toDate": "2024-01-02T00:00:00Z"}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        json(&body),
        serde_json::json!([{"ep-7": {"power": [{"timestamp": "2024-01-01T00:00:00.000Z", "values": {"value": 3}}]}}])
    );
}

#[tokio::test]
async fn epts_runs_alone_on_nats_as_a_reliable_receiver() {
    let nats = NatsServer::start();
    let url = nats.url();
    let apps = "{demo: {versions: [demo-v1], time_series: {auto_extract: true}}}".to_owned();
    let epts = Fleetgate::start(
        "epts",
        &[("FLEETGATE_NATS_URL", url.clone()), ("FLEETGATE_APPLICATIONS", apps)],
    );
    let _dcx = Fleetgate::start(
        "dcx",
        &[
            ("FLEETGATE_NATS_URL", url.clone()),
            ("FLEETGATE_DCX_RELIABLE_RECEIVERS", "[epts]".into()),
        ],
    );
    let _auth = Fleetgate::start(
        "auth",
        &[("FLEETGATE_NATS_URL", url.clone()), demo_endpoint_env()[0].clone()],
    );
    let mut env = demo_endpoint_env();
    env.push(("FLEETGATE_NATS_URL", url.clone()));
    let gateway = Fleetgate::start("gateway", &env);
    let p = rumqttc_request(
        gateway.mqtt,
        None,
        "kp1/demo-v1/dcx/tok-1/json/5",
        br#"{"temperature":7}"#,
    )
    .await;
    assert_eq!(p.topic, "kp1/demo-v1/dcx/tok-1/json/5/status");
    let (status, body) = http_get(
        epts.admin,
        "/epts/api/v1/applications/demo/time-series/last?timeSeriesName=auto~temperature",
    )
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(json(&body)["ep-1"]["auto~temperature"][0]["values"]["value"], 7, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_postgresql_and_store_each_sample_once() {
    let postgres = fleetgate_testkit::PostgresServer::start();
    let nats = NatsServer::start();
    let url = nats.url();
    let apps = "{demo: {versions: [demo-v1], time_series: {auto_extract: true}}}".to_owned();
    let replica_env = [
        ("FLEETGATE_NATS_URL", url.clone()),
        ("FLEETGATE_APPLICATIONS", apps),
        ("FLEETGATE_STORAGE_POSTGRES_URL", postgres.url()),
    ];
    let a = Fleetgate::start("epts", &replica_env);
    let b = Fleetgate::start("epts", &replica_env);
    let _dcx = Fleetgate::start(
        "dcx",
        &[
            ("FLEETGATE_NATS_URL", url.clone()),
            ("FLEETGATE_DCX_RELIABLE_RECEIVERS", "[epts]".into()),
        ],
    );
    let _auth = Fleetgate::start(
        "auth",
        &[("FLEETGATE_NATS_URL", url.clone()), demo_endpoint_env()[0].clone()],
    );
    let mut env = demo_endpoint_env();
    env.push(("FLEETGATE_NATS_URL", url.clone()));
    let gateway = Fleetgate::start("gateway", &env);
    for i in 1..=20 {
        let sample = format!(r#"{{"n":{i}}}"#);
        let topic = format!("kp1/demo-v1/dcx/tok-1/json/{i}");
        let p = rumqttc_request(gateway.mqtt, None, &topic, sample.as_bytes()).await;
        assert_eq!(p.topic, format!("{topic}/status"));
    }
    let stored_a = a.metric("fleetgate_epts_points_stored_total").unwrap_or(0.0);
    let stored_b = b.metric("fleetgate_epts_points_stored_total").unwrap_or(0.0);
    assert_eq!(
        stored_a + stored_b,
        20.0,
        "each sample is stored by one replica (a {stored_a}, b {stored_b})"
    );
    // Either replica answers from the shared database.
    for replica in [&a, &b] {
        let (status, body) = http_get(
            replica.admin,
            "/epts/api/v1/applications/demo/time-series/data?timeSeriesName=auto~n&fromDate=2000-01-01T00:00:00Z&toDate=2100-01-01T00:00:00Z",
        )
        .unwrap();
        assert_eq!(status, 200);
        let points = json(&body)[0]["ep-1"]["auto~n"].as_array().unwrap().len();
        assert_eq!(points, 20, "{body}");
    }
}
