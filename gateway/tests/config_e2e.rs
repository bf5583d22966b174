//! Configuration end to end in the real binary on a real nats-server: a configuration set
//! through the ECR REST API reaches a device that behaves like the official Kaa Python client
//! (paho-mqtt, `tests/clients/kaa_config_client.py`) while it is connected, again after it
//! reconnects without having confirmed, and not once it confirmed; its confirmation shows in
//! `/statuses`; 6/CDTP is observed on NATS.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleetgate_messages::{ConfigApplied, ConfigRequest, ConfigUpdated, Record};
use fleetgate_testkit::NatsServer;
use futures_util::StreamExt;
use serde_json::{Value as Json, json};
use support::{Fleetgate, demo_endpoint_env};

fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text.split(' ').nth(1).unwrap().parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (code, head.to_ascii_lowercase(), body.to_owned())
}

/// Starts the paho client; its stdout lines are what it received.
fn client(mqtt: SocketAddr, confirm: bool, wait_s: &str) -> Child {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/kaa_config_client.py");
    let mut cmd = Command::new("python3");
    cmd.args([script, &mqtt.ip().to_string(), &mqtt.port().to_string(), "demo-v1", "tok-1"]);
    if confirm {
        cmd.arg("--confirm");
    }
    cmd.args(["--wait", wait_s]).stdout(Stdio::piped()).stderr(Stdio::inherit());
    cmd.spawn().expect("python3 with paho-mqtt")
}

fn lines(child: Child) -> Vec<String> {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the client failed");
    BufReader::new(&out.stdout[..]).lines().map(Result::unwrap).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kaa_client_gets_its_configuration_until_it_confirms() {
    let nats = NatsServer::start();
    let mut env = demo_endpoint_env();
    env.push(("FLEETGATE_NATS_URL", nats.url()));
    let fg = Fleetgate::start("up", &env);
    let observer = async_nats::connect(nats.url()).await.unwrap();
    let mut cdtp = observer.subscribe("kaa.v1.service.ecr.cdtp.request").await.unwrap();
    let mut events = observer.subscribe("kaa.v1.events.*.endpoint.config.>").await.unwrap();
    observer.flush().await.unwrap();

    // Connected, nothing assigned yet: nothing is pushed.
    let quiet = client(fg.mqtt, false, "1.5");
    let quiet = tokio::task::spawn_blocking(move || lines(quiet)).await.unwrap();
    assert_eq!(quiet, ["none"]);

    // Set while the device is connected: pushed to the bare status topic.
    let device = client(fg.mqtt, false, "15");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, head, body) = http(
        fg.admin,
        "PUT",
        "/ecr/api/v1/endpoints/ep-1/app-versions/demo-v1",
        r#"{"interval":5}"#,
    );
    assert_eq!(status, 200, "{body}");
    let stored: Json = serde_json::from_str(&body).unwrap();
    let id = stored["configId"].as_str().unwrap().to_owned();
    assert!(head.contains(&format!("etag: \"{id}\"")), "{head}");
    let got = tokio::task::spawn_blocking(move || lines(device)).await.unwrap();
    let push: Json = serde_json::from_str(&got[0]).unwrap();
    assert_eq!(push["topic"], "kp1/demo-v1/cmx/tok-1/config/json/status");
    assert_eq!(push["payload"], json!({"configId": id, "config": {"interval": 5}}));

    // 6/CDTP on NATS: the update broadcast, and the request CMX made for the push.
    let update =
        tokio::time::timeout(Duration::from_secs(5), events.next()).await.unwrap().unwrap();
    assert_eq!(update.subject.as_str(), "kaa.v1.events.ecr.endpoint.config.updated");
    let u = ConfigUpdated::decode(&update.payload).unwrap();
    assert_eq!(
        (u.endpoint_id, u.config_id, u.content),
        ("ep-1", id.as_str(), &br#"{"interval":5}"#[..])
    );
    let mut requests = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), cdtp.next()).await {
        assert!(m.reply.is_some(), "a ConfigRequest has a reply subject");
        let r = ConfigRequest::decode(&m.payload).unwrap();
        requests.push((r.endpoint_id.to_owned(), r.config_id.map(str::to_owned)));
    }
    assert!(requests.contains(&("ep-1".to_owned(), None)), "{requests:?}");

    // Reconnected without having confirmed: pushed again; this time it confirms.
    let device = client(fg.mqtt, true, "10");
    let got = tokio::task::spawn_blocking(move || lines(device)).await.unwrap();
    let push: Json = serde_json::from_str(&got[0]).unwrap();
    assert_eq!(push["payload"]["configId"], id.as_str());
    let applied = loop {
        let m = tokio::time::timeout(Duration::from_secs(5), events.next()).await.unwrap().unwrap();
        if m.subject.as_str() == "kaa.v1.events.cmx.endpoint.config.applied" {
            break m;
        }
    };
    let a = ConfigApplied::decode(&applied.payload).unwrap();
    assert_eq!((a.endpoint_id, a.config_id, a.status_code), ("ep-1", id.as_str(), 200));

    // The confirmation in /statuses.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, body) = http(fg.admin, "GET", "/ecr/api/v1/statuses?endpointId=ep-1", "");
        assert_eq!(status, 200);
        let page: Json = serde_json::from_str(&body).unwrap();
        let s = &page["content"][0];
        if s["status"] == "APPLIED" {
            assert_eq!(s["configId"], id.as_str());
            assert_eq!(s["confirmationReasonPhrase"], "applied by the test client");
            assert!(s["lastDispatchedDate"].is_string() && s["lastConfirmedDate"].is_string());
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no confirmation in /statuses: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Confirmed: reconnecting brings nothing.
    let device = client(fg.mqtt, false, "1.5");
    let got = tokio::task::spawn_blocking(move || lines(device)).await.unwrap();
    assert_eq!(got, ["none"]);
}

fn put_config(fg: &Fleetgate, config: &str) -> String {
    let (status, _, body) =
        http(fg.admin, "PUT", "/ecr/api/v1/endpoints/ep-1/app-versions/demo-v1", config);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Json>(&body).unwrap()["configId"].as_str().unwrap().to_owned()
}

#[test]
fn the_push_answers_an_http_long_poll() {
    let port = fleetgate_testkit::free_port();
    let mut env = demo_endpoint_env();
    env.push(("FLEETGATE_TRANSPORTS_HTTP_LISTEN", format!("127.0.0.1:{port}")));
    let fg = Fleetgate::start("up", &env);
    // As a device does: ask for the configuration, then long-poll for changes on the same
    // connection (the session uses the endpoint from its first request on).
    let base = format!("http://127.0.0.1:{port}/kp1/demo-v1/cmx/tok-1/config/json");
    let poll = Command::new("curl")
        .args(["-s", "--max-time", "15", "-w", "\n%{http_code}\n"])
        .args(["-X", "POST", "--data", r#"{"observe":true}"#, &format!("{base}/1")])
        .args(["--next", "-s", "-w", "\n%{http_code}"])
        .arg(format!("{base}?observe=true&timeout_ms=10000"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl runs");
    std::thread::sleep(Duration::from_millis(1000));
    let id = put_config(&fg, r#"{"over":"http"}"#);
    let out = poll.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[..2], [r#"{"configId":"","config":null}"#, "200"], "{text}");
    let (body, code) = (lines[2], lines[3]);
    assert_eq!(code, "200", "{text}");
    assert_eq!(
        serde_json::from_str::<Json>(body).unwrap(),
        json!({"configId": id, "config": {"over": "http"}})
    );
}

/// Starts `curl` long-polling the default configuration of tok-1 for up to `secs` seconds,
/// on a connection of its own; its stdout is the body, a newline and the HTTP status.
fn long_poll(http: SocketAddr, secs: u64) -> Child {
    let url = format!(
        "http://{http}/kp1/demo-v1/cmx/tok-1/config/json?observe=true&timeout_ms={}",
        secs * 1000
    );
    Command::new("curl")
        .args(["-s", "--max-time", &(secs + 5).to_string(), "-w", "\n%{http_code}", &url])
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl runs")
}

/// What a [`long_poll`] answered: (HTTP status, body as JSON, or null when empty).
fn poll_answer(poll: Child) -> (String, Json) {
    let out = poll.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or_else(|| panic!("curl said {text:?}"));
    let body = if body.is_empty() { Json::Null } else { j(body) };
    (code.to_owned(), body)
}

#[test]
fn a_long_poll_as_the_first_request_gets_the_push() {
    let nats = NatsServer::start();
    let mut env = demo_endpoint_env();
    env.push(("FLEETGATE_NATS_URL", nats.url()));
    let fg = Fleetgate::start("up", &env);
    // The long poll is the device's first request on its connection: nothing before it made
    // the endpoint known. The app version's default, set afterwards, reaches it (CMX knows
    // the endpoint from the long poll alone).
    let poll = long_poll(fg.http, 10);
    std::thread::sleep(Duration::from_millis(1000));
    let (status, _, body) =
        http(fg.admin, "PUT", "/ecr/api/v1/app-versions/demo-v1", r#"{"level":1}"#);
    assert_eq!(status, 200, "{body}");
    let default_id = j(&body)["configId"].as_str().unwrap().to_owned();
    assert_eq!(
        poll_answer(poll),
        ("200".into(), json!({"configId": default_id, "config": {"level": 1}}))
    );

    // Unconfirmed, it is pushed again on the next connection's long poll at once (the
    // endpoint connected without having confirmed it)...
    let poll = long_poll(fg.http, 10);
    assert_eq!(
        poll_answer(poll),
        ("200".into(), json!({"configId": default_id, "config": {"level": 1}}))
    );
    // ... and not once confirmed: then the endpoint's own configuration, set afterwards, is
    // what the long poll gets.
    let applied = Command::new("curl")
        .args(["-s", "-w", "%{http_code}", "-X", "POST", "--data"])
        .arg(format!(r#"{{"configId":"{default_id}"}}"#))
        .arg(format!("http://{}/kp1/demo-v1/cmx/tok-1/applied/json/1", fg.http))
        .output()
        .unwrap();
    // Confirmed: the empty answer of /applied.
    assert_eq!(String::from_utf8_lossy(&applied.stdout), "204");
    let poll = long_poll(fg.http, 10);
    std::thread::sleep(Duration::from_millis(1000));
    let id = put_config(&fg, r#"{"over":"http"}"#);
    assert_eq!(
        poll_answer(poll),
        ("200".into(), json!({"configId": id, "config": {"over": "http"}}))
    );
}

/// An FGU/1 device that only shook hands and pinged (no request yet) gets the push. The PING
/// is its first authentic DATA packet, which validates its address (SPEC §6): before it the
/// gateway sends nothing there, so that a spoofed handshake cannot aim pushes at a third party.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fgu1_device_gets_the_push_before_its_first_request() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("gateway.key");
    let pair = fleetgate_transport_udp::keys::generate(&key).unwrap();
    let nats = NatsServer::start();
    let mut env = demo_endpoint_env();
    env.push(("FLEETGATE_NATS_URL", nats.url()));
    env.push(("FLEETGATE_TRANSPORTS_UDP_PRIVATE_KEY_PATH", key.display().to_string()));
    let fg = Fleetgate::start("up", &env);
    let hello = fleetgate_transport_udp::handshake::Hello {
        app_version: "demo-v1",
        token: Some("tok-1"),
        username: None,
        password: None,
    };
    let wait = Duration::from_secs(5);
    let mut device =
        fleetgate_transport_udp::device::Device::connect(fg.udp, &pair.public, &hello, wait)
            .await
            .unwrap();
    assert!(device.ping(wait).await, "the gateway answers the PING");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let admin = fg.admin;
    let id = tokio::task::spawn_blocking(move || {
        let (status, _, body) = http(
            admin,
            "PUT",
            "/ecr/api/v1/endpoints/ep-1/app-versions/demo-v1",
            r#"{"over":"fgu1"}"#,
        );
        assert_eq!(status, 200, "{body}");
        j(&body)["configId"].as_str().unwrap().to_owned()
    })
    .await
    .unwrap();
    let push = device.next_push(wait).await.expect("the push arrives");
    assert_eq!((push.ext.as_str(), push.path.as_str()), ("cmx", "/config/json"));
    assert_eq!(
        j(std::str::from_utf8(&push.payload).unwrap()),
        json!({"configId": id, "config": {"over": "fgu1"}})
    );
}

#[test]
fn the_push_is_a_coap_observe_notification() {
    let fg = Fleetgate::start("up", &demo_endpoint_env());
    let uri = format!("coap://{}/kp1/demo-v1/cmx/tok-1/config/json", fg.coap);
    // Observe for 6 s (-s), printing what arrives.
    let observe = Command::new("coap-client-notls")
        .args(["-m", "get", "-s", "6", "-B", "8", &uri])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("coap-client-notls (libcoap3-bin) runs");
    std::thread::sleep(Duration::from_millis(1500));
    let id = put_config(&fg, r#"{"over":"coap"}"#);
    let out = observe.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let expected = json!({"configId": id, "config": {"over": "coap"}});
    // coap-client prints each payload as it comes, without separators.
    let payloads: Vec<Json> = serde_json::Deserializer::from_str(&text)
        .into_iter::<Json>()
        .map_while(Result::ok)
        .collect();
    // The registration's answer, then the notification.
    assert_eq!(payloads, [json!({"configId": "", "config": null}), expected], "{text}");
}

/// One MQTT device (rumqttc) that never subscribes, as the official clients.
struct Device {
    client: rumqttc::AsyncClient,
    incoming: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
}

impl Device {
    async fn connect(addr: SocketAddr) -> Self {
        let mut options = rumqttc::MqttOptions::new(
            format!("cfg-{}", fleetgate_testkit::free_port()),
            addr.ip().to_string(),
            addr.port(),
        );
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = rumqttc::AsyncClient::new(options, 64);
        let (tx, incoming) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(event) = events.poll().await {
                if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = event {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                }
            }
        });
        Self { client, incoming }
    }

    async fn publish(&self, path: &str, body: &str) {
        let topic = format!("kp1/demo-v1/cmx/tok-1/{path}");
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, body.as_bytes().to_vec())
            .await
            .unwrap();
    }

    /// The next message: (topic without the `kp1/demo-v1/cmx/tok-1/` prefix, payload).
    async fn next(&mut self) -> (String, String) {
        let (topic, payload) = tokio::time::timeout(Duration::from_secs(10), self.incoming.recv())
            .await
            .expect("a message in time")
            .unwrap();
        let topic = topic.strip_prefix("kp1/demo-v1/cmx/tok-1/").unwrap().to_owned();
        (topic, String::from_utf8(payload).unwrap())
    }

    async fn nothing(&mut self) {
        let got = tokio::time::timeout(Duration::from_millis(500), self.incoming.recv()).await;
        assert!(got.is_err(), "unexpected {got:?}");
    }
}

fn j(s: &str) -> Json {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_7cmp_behaviour_over_mqtt() {
    let fg = Fleetgate::start("up", &demo_endpoint_env());
    let mut d = Device::connect(fg.mqtt).await;

    // Nothing assigned: the pair "" and null on the request's status topic.
    d.publish("config/json/1", r#"{"observe":true}"#).await;
    assert_eq!(
        d.next().await,
        ("config/json/1/status".into(), r#"{"configId":"","config":null}"#.into())
    );

    // observe:true: a change is pushed to the bare status topic.
    let id = put_config(&fg, r#"{"a":1}"#);
    let (topic, body) = d.next().await;
    assert_eq!(
        (topic.as_str(), j(&body)),
        ("config/json/status", json!({"configId": id, "config": {"a": 1}}))
    );

    // The same configId: `{}`; none: the pair.
    d.publish("config/json/2", &format!(r#"{{"configId":"{id}"}}"#)).await;
    assert_eq!(d.next().await, ("config/json/2/status".into(), "{}".into()));
    d.publish("config/json/3", "{}").await;
    assert_eq!(j(&d.next().await.1), json!({"configId": id, "config": {"a": 1}}));

    // observe:false: no push until the next request.
    d.publish("config/json/4", &format!(r#"{{"configId":"{id}","observe":false}}"#)).await;
    assert_eq!(d.next().await.1, "{}");
    let id2 = put_config(&fg, r#"{"a":2}"#);
    d.nothing().await;
    d.publish("config/json/5", r#"{"observe":true}"#).await;
    assert_eq!(j(&d.next().await.1), json!({"configId": id2, "config": {"a": 2}}));

    // A request id is never a name: `.../config/json/42` is the default with request 42.
    d.publish("config/json/42", "{}").await;
    let (topic, body) = d.next().await;
    assert_eq!(
        (topic.as_str(), j(&body)["configId"].as_str()),
        ("config/json/42/status", Some(id2.as_str()))
    );

    // A named configuration, its push, and its confirmation.
    d.publish("config/json/network/6", "{}").await;
    assert_eq!(
        d.next().await,
        ("config/json/network/6/status".into(), r#"{"configId":"","config":null}"#.into())
    );
    let (status, _, body) = http(
        fg.admin,
        "PUT",
        "/ecr/api/v1/endpoints/ep-1/app-versions/demo-v1?name=network",
        r#"{"ssid":"x"}"#,
    );
    assert_eq!(status, 200);
    let net = j(&body)["configId"].as_str().unwrap().to_owned();
    let (topic, body) = d.next().await;
    assert_eq!(
        (topic.as_str(), j(&body)),
        ("config/json/network/status", json!({"configId": net, "config": {"ssid": "x"}}))
    );
    d.publish("applied/json/network/7", &format!(r#"{{"configId":"{net}"}}"#)).await;
    assert_eq!(d.next().await, ("applied/json/network/7/status".into(), String::new()));

    // /applied with a status and a reason: empty /status, recorded.
    d.publish(
        "applied/json/8",
        &format!(r#"{{"configId":"{id2}","statusCode":500,"reasonPhrase":"disk full"}}"#),
    )
    .await;
    assert_eq!(d.next().await, ("applied/json/8/status".into(), String::new()));

    // Bad input: precise errors on /error; a missing configId is 400.
    for (path, body, code, reason) in [
        ("applied/json/9", "{}", 400, "configId: required"),
        ("config/json/10", "[]", 400, "payload: must be a JSON object"),
        ("config/json/11", "{x", 400, "payload: not valid JSON"),
        ("config/json/12", r#"{"configId":"c","extra":1}"#, 400, "extra: unknown field"),
        ("config/json/bad.name/13", "{}", 404, "configuration name `bad.name`"),
    ] {
        d.publish(path, body).await;
        let (topic, answer) = d.next().await;
        assert_eq!(topic, format!("{path}/error"));
        let e = j(&answer);
        assert_eq!(e["statusCode"], code, "{path}: {e}");
        assert!(e["reasonPhrase"].as_str().unwrap().starts_with(reason), "{path}: {e}");
    }

    let (_, _, body) = http(fg.admin, "GET", "/ecr/api/v1/statuses?endpointId=ep-1", "");
    let page = j(&body);
    let by_id = |id: &str| {
        page["content"].as_array().unwrap().iter().find(|s| s["configId"] == id).cloned().unwrap()
    };
    assert_eq!(by_id(&net)["status"], "APPLIED");
    let failed = by_id(&id2);
    assert_eq!(
        (failed["status"].as_str(), failed["confirmationReasonPhrase"].as_str()),
        (Some("FAILED"), Some("disk full"))
    );
}

/// Asks ECR on NATS, as CMX does, for the configuration of `endpoint` (so that ECR records a
/// dispatch and knows the endpoint), and waits until `/statuses` shows it.
async fn known_to_ecr(fg: &Fleetgate, nats: &async_nats::Client, app: &str, endpoint: &str) {
    let request = ConfigRequest {
        correlation_id: endpoint,
        timestamp_ms: fleetgate_bus::now_ms(),
        timeout_ms: 5_000,
        app_version_name: app,
        endpoint_id: endpoint,
        config_id: None,
        config_name: None,
    };
    let reply = nats
        .request("kaa.v1.service.ecr.cdtp.request", request.to_bytes().to_vec().into())
        .await
        .unwrap();
    let answer = fleetgate_messages::ConfigResponse::decode(&reply.payload).unwrap();
    assert_eq!(answer.status_code, 200);
    let admin = fg.admin;
    let path = format!("/ecr/api/v1/statuses?endpointId={endpoint}");
    for _ in 0..100 {
        let path = path.clone();
        let (_, _, body) =
            tokio::task::spawn_blocking(move || http(admin, "GET", &path, "")).await.unwrap();
        if j(&body)["totalElements"] == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("ECR did not record {endpoint}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_goes_to_the_endpoints_a_filter_matches() {
    let nats = NatsServer::start();
    let mut env = demo_endpoint_env();
    env.push(("FLEETGATE_NATS_URL", nats.url()));
    env.push((
        "FLEETGATE_ECR_FILTERS",
        r#"{sensors: {app_versions: [demo-v1], endpoint_pattern: "s-*"},
            listed: {app_versions: [demo-v2], endpoints: [x-1, x-2]},
            anywhere: {endpoint_pattern: "*-9"}}"#
            .to_owned(),
    ));
    let fg = Fleetgate::start("up", &env);
    let observer = async_nats::connect(nats.url()).await.unwrap();
    let mut updates = observer.subscribe("kaa.v1.events.*.endpoint.config.updated").await.unwrap();
    observer.flush().await.unwrap();
    let rest = |method: &'static str, path: String, body: String| {
        let admin = fg.admin;
        async move {
            tokio::task::spawn_blocking(move || http(admin, method, &path, &body)).await.unwrap()
        }
    };

    // ECR knows endpoints once it served them: a default to serve, then four endpoints ask.
    for app in ["demo-v1", "demo-v3"] {
        let path = format!("/ecr/api/v1/app-versions/{app}");
        let (status, _, _) = rest("PUT", path, r#"{"mode":"day"}"#.into()).await;
        assert_eq!(status, 200);
        updates.next().await.unwrap();
    }
    for (app, endpoint) in
        [("demo-v1", "s-1"), ("demo-v1", "s-2"), ("demo-v1", "other"), ("demo-v3", "s-9")]
    {
        known_to_ecr(&fg, &observer, app, endpoint).await;
    }

    // An endpoint with a configuration of its own is known too, before it ever asked.
    let path = "/ecr/api/v1/endpoints/s-7/app-versions/demo-v1".to_owned();
    let (status, _, _) = rest("PUT", path, r#"{"mode":"own"}"#.into()).await;
    assert_eq!(status, 200);
    updates.next().await.unwrap();

    // The pattern within the app version: s-1, s-2 and s-7, not `other`, not s-9 of demo-v3.
    let body = r#"{"configPayload":{"mode":"night"}}"#;
    let (status, head, answer) =
        rest("PUT", "/ecr/api/v1/endpoints/filters/sensors".into(), body.into()).await;
    assert_eq!(status, 200, "{answer}");
    assert!(head.contains("content-type: application/json"), "{head}");
    let stored = j(&answer);
    let targets: Vec<(&str, &str)> = stored
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["appVersionName"].as_str().unwrap(), c["endpointId"].as_str().unwrap()))
        .collect();
    assert_eq!(targets, [("demo-v1", "s-1"), ("demo-v1", "s-2"), ("demo-v1", "s-7")]);
    for c in stored.as_array().unwrap() {
        assert_eq!((&c["name"], &c["config"]), (&json!("default"), &json!({"mode": "night"})));
        // Broadcast on NATS, for CMX to push.
        let event = updates.next().await.unwrap();
        let event = ConfigUpdated::decode(&event.payload).unwrap();
        assert_eq!(event.endpoint_id, c["endpointId"].as_str().unwrap());
        assert_eq!(event.config_id, c["configId"].as_str().unwrap());
    }
    let get = |endpoint: &str, app: &str| {
        rest("GET", format!("/ecr/api/v1/endpoints/{endpoint}/app-versions/{app}"), String::new())
    };
    assert_eq!(j(&get("s-2", "demo-v1").await.2)["config"], json!({"mode": "night"}));
    assert_eq!(get("other", "demo-v1").await.0, 404, "not matched: still the default");
    assert_eq!(get("s-9", "demo-v3").await.0, 404);

    // Endpoints named by id, in the listed app version, before ECR heard of them; named.
    let (status, _, answer) = rest(
        "PUT",
        "/ecr/api/v1/endpoints/filters/listed?name=network".into(),
        r#"{"configPayload":{"ssid":"x"}}"#.into(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let ids: Vec<Json> = j(&answer)
        .as_array()
        .unwrap()
        .iter()
        .map(|c| json!([c["appVersionName"], c["endpointId"], c["name"]]))
        .collect();
    assert_eq!(ids, [json!(["demo-v2", "x-1", "network"]), json!(["demo-v2", "x-2", "network"])]);

    // Any app version.
    let (status, _, answer) = rest(
        "PUT",
        "/ecr/api/v1/endpoints/filters/anywhere".into(),
        r#"{"configPayload":1}"#.into(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let ids: Vec<Json> =
        j(&answer).as_array().unwrap().iter().map(|c| c["endpointId"].clone()).collect();
    assert_eq!(ids, [json!("s-9")]);

    // An unknown filter, a batch's `endpoints`, bad bodies and methods: clear 4xx, nothing stored.
    for (method, path, body, code, reason) in [
        ("PUT", "filters/nope", body, 404, "no endpoint filter `nope`"),
        (
            "PUT",
            "filters/sensors",
            r#"{"configPayload":1,"endpoints":{}}"#,
            400,
            "endpoints: unknown field",
        ),
        ("PUT", "filters/sensors", r#"{}"#, 400, "configPayload: required"),
        ("PUT", "filters/sensors", "[1]", 400, "body: must be an object"),
        ("PUT", "filters/sensors", "{x", 400, "body: not valid JSON"),
        ("GET", "filters/sensors", "", 405, "method not allowed"),
    ] {
        let (status, _, answer) =
            rest(method, format!("/ecr/api/v1/endpoints/{path}"), body.into()).await;
        let e = j(&answer);
        assert_eq!((status, &e["statusCode"]), (code, &json!(code)), "{path}: {e}");
        assert!(e["reasonPhrase"].as_str().unwrap().starts_with(reason), "{path} {body}: {e}");
    }
    assert_eq!(j(&get("s-1", "demo-v1").await.2)["config"], json!({"mode": "night"}));
    assert_eq!(get("other", "demo-v1").await.0, 404);
}

/// Polls `/metrics` until `name` (a whole sample name) has `value`.
async fn metric_becomes(fg: &Fleetgate, name: &str, value: f64) {
    let with_space = format!("{name} ");
    for _ in 0..200 {
        if fg.metric(&with_space) == Some(value) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{name}: {:?}, expected {value}", fg.metric(&with_space));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cmx_forgets_an_endpoint_that_disconnected() {
    let nats = NatsServer::start();
    let mut env = demo_endpoint_env();
    env.push(("FLEETGATE_NATS_URL", nats.url()));
    let fg = Fleetgate::start("up", &env);
    let set_default = |config: &'static str| {
        let admin = fg.admin;
        tokio::task::spawn_blocking(move || {
            let (status, _, body) = http(admin, "PUT", "/ecr/api/v1/app-versions/demo-v1", config);
            assert_eq!(status, 200, "{body}");
        })
    };

    let mut d = Device::connect(fg.mqtt).await;
    d.publish("config/json/1", "{}").await;
    assert_eq!(d.next().await.0, "config/json/1/status");
    metric_becomes(&fg, "fleetgate_cmx_endpoints", 1.0).await;
    // Connected: a changed default is pushed to it.
    set_default(r#"{"a":1}"#).await.unwrap();
    assert_eq!(d.next().await.0, "config/json/status");
    metric_becomes(&fg, "fleetgate_cmx_pushes_total", 1.0).await;

    // Disconnected (9/ELCE on NATS): forgotten, and the next default goes to nobody.
    d.client.disconnect().await.unwrap();
    metric_becomes(&fg, "fleetgate_cmx_endpoints", 0.0).await;
    set_default(r#"{"a":2}"#).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fg.metric("fleetgate_cmx_pushes_total "), Some(1.0));
}
