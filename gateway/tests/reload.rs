//! Configuration reloads while devices stay connected: a changed file (and SIGHUP) applies new
//! endpoints, app versions and limits without dropping a connection, names what needs a
//! restart, and a bad file is refused with the start-up error while the old settings stay.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use fleetgate_testkit::free_port;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use support::Fleetgate;

/// One MQTT connection kept open across reloads; a reconnect is an error.
struct Device {
    client: AsyncClient,
    events: EventLoop,
    topic: String,
    connacks: u32,
    next_request: u32,
}

impl Device {
    async fn connect(addr: SocketAddr, app_version: &str, token: &str) -> Result<Self, String> {
        let mut options =
            MqttOptions::new(format!("reload-{}", free_port()), addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        let (client, events) = AsyncClient::new(options, 16);
        let topic = format!("kp1/{app_version}/dcx/{token}/json");
        let mut device = Self { client, events, topic, connacks: 0, next_request: 1 };
        device.wait(|p| matches!(p, Packet::ConnAck(_))).await?;
        Ok(device)
    }

    /// Sends `payload` and returns the answer's last topic level (`status` or `error`), or
    /// why the connection ended.
    async fn send(&mut self, payload: &[u8]) -> Result<String, String> {
        let topic = format!("{}/{}", self.topic, self.next_request);
        self.next_request += 1;
        self.client
            .publish(&topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .map_err(|e| e.to_string())?;
        let prefix = format!("{topic}/");
        let answer =
            self.wait(|p| matches!(p, Packet::Publish(p) if p.topic.starts_with(&prefix))).await?;
        match answer {
            Packet::Publish(p) => Ok(p.topic[prefix.len()..].to_owned()),
            other => Err(format!("unexpected {other:?}")),
        }
    }

    async fn wait(&mut self, want: impl Fn(&Packet) -> bool) -> Result<Packet, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = match tokio::time::timeout(left, self.events.poll()).await {
                Err(_) => return Err("nothing within 10 s".into()),
                Ok(Err(e)) => return Err(format!("connection ended: {e}")),
                Ok(Ok(event)) => event,
            };
            match event {
                Event::Incoming(Packet::ConnAck(c)) => {
                    self.connacks += 1;
                    if self.connacks > 1 {
                        return Err("the connection was dropped and made again".into());
                    }
                    let packet = Packet::ConnAck(c);
                    if want(&packet) {
                        return Ok(packet);
                    }
                }
                Event::Incoming(p) if want(&p) => return Ok(p),
                _ => {}
            }
        }
    }
}

const SAMPLE: &[u8] = br#"[{"temperature": 21.5}]"#;

/// Replaces the file whole (written beside it, then renamed), as editors and Kubernetes do.
fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

const V1: &str = "
process: {config_check_interval_ms: 100}
auth:
  allow_anonymous: true
  endpoints: [{app_version: demo-v1, token: tok-1, endpoint_id: ep-1}]
gateway: {app_versions: [demo-v1]}
";

const V2: &str = "
process: {config_check_interval_ms: 100}
auth:
  allow_anonymous: true
  endpoints:
    - {app_version: demo-v1, token: tok-1, endpoint_id: ep-1}
    - {app_version: demo-v2, token: tok-2, endpoint_id: ep-2}
gateway: {app_versions: [demo-v1, demo-v2]}
transports:
  mqtt: {max_packet_size_bytes: 1024}
  http: {max_connections: 77}
";

const BAD: &str = "
process: {config_check_interval_ms: 100}
transports:
  mqtt: {max_packet_size_bytes: 0}
";

const V3: &str = "
process: {config_check_interval_ms: 100}
auth:
  allow_anonymous: true
  endpoints: [{app_version: demo-v2, token: tok-2, endpoint_id: ep-2}]
gateway: {app_versions: [demo-v1, demo-v2]}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_applies_live_and_a_bad_one_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fleetgate.yml");
    write(&path, V1);
    let mut fg = Fleetgate::start("up", &[("FLEETGATE_CONFIG", path.display().to_string())]);
    let mut kept = Device::connect(fg.mqtt, "demo-v1", "tok-1").await.expect("connect");
    assert_eq!(kept.send(SAMPLE).await.as_deref(), Ok("status"));
    let mut unknown = Device::connect(fg.mqtt, "demo-v2", "tok-2").await.expect("connect");
    assert_eq!(unknown.send(SAMPLE).await.as_deref(), Ok("error"), "not known yet");

    // New endpoint and app version, a smaller packet limit, and a setting that needs a restart.
    write(&path, V2);
    let log = fg.wait_log("configuration reloaded: applied", Duration::from_secs(10));
    assert!(log.contains("take effect only after a restart"), "{log}");
    assert!(log.contains("transports.http.max_connections"), "{log}");
    let mut new = Device::connect(fg.mqtt, "demo-v2", "tok-2").await.expect("connect");
    assert_eq!(new.send(SAMPLE).await.as_deref(), Ok("status"), "the new endpoint is served");
    let big = format!(r#"[{{"blob": "{}"}}]"#, "x".repeat(4000));
    assert!(new.send(big.as_bytes()).await.is_err(), "a new connection has the new limit");
    assert_eq!(kept.send(SAMPLE).await.as_deref(), Ok("status"), "the old connection stays");
    assert_eq!(
        kept.send(big.as_bytes()).await.as_deref(),
        Ok("status"),
        "and keeps the limits it connected with"
    );

    // A bad file: the start-up error, and the running settings stay.
    write(&path, BAD);
    let log = fg.wait_log("configuration reload refused", Duration::from_secs(10));
    assert!(log.contains("transports.mqtt.max_packet_size_bytes"), "{log}");
    fg.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert!(fg.running(), "SIGHUP does not stop the process");
    let refused = r#"fleetgate_config_reloads_total{result="refused"}"#;
    assert!(fg.metric(refused).is_some_and(|n| n >= 2.0), "file change and SIGHUP both refused");
    let mut again = Device::connect(fg.mqtt, "demo-v2", "tok-2").await.expect("connect");
    assert_eq!(again.send(SAMPLE).await.as_deref(), Ok("status"));

    // A removed token is refused on its next new use (the token cache is emptied), and the
    // connection that already used it is ended (the provider announces the revocation).
    write(&path, V3);
    let applied = r#"fleetgate_config_reloads_total{result="applied"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while fg.metric(applied) != Some(2.0) {
        assert!(Instant::now() < deadline, "V3 never applied:\n{}", fg.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut removed = Device::connect(fg.mqtt, "demo-v1", "tok-1").await.expect("connect");
    assert_eq!(removed.send(SAMPLE).await.as_deref(), Ok("error"), "tok-1 was removed");
    assert!(kept.send(SAMPLE).await.is_err(), "the revoked token's connection is ended");
}

/// `PUT /ecr/api/v1/endpoints/filters/{id}` with curl: (HTTP status, body).
fn put_by_filter(fg: &Fleetgate, id: &str) -> (String, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "-X", "PUT", "-H", "Content-Type: application/json"])
        .args(["--data", r#"{"configPayload":{"on":true}}"#])
        .arg(format!("http://{}/ecr/api/v1/endpoints/filters/{id}", fg.admin))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("a status");
    (code.to_owned(), body.to_owned())
}

const NO_FILTERS: &str = "
process: {config_check_interval_ms: 100}
";

const A_FILTER: &str = "
process: {config_check_interval_ms: 100}
ecr:
  filters:
    pair: {app_versions: [demo-v1], endpoints: [ep-1, ep-2]}
";

const A_BAD_FILTER: &str = "
process: {config_check_interval_ms: 100}
ecr:
  filters:
    everything: {}
";

#[test]
fn endpoint_filters_apply_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fleetgate.yml");
    write(&path, NO_FILTERS);
    let fg = Fleetgate::start("up", &[("FLEETGATE_CONFIG", path.display().to_string())]);
    assert_eq!(put_by_filter(&fg, "pair").0, "404");

    write(&path, A_FILTER);
    let log = fg.wait_log("configuration reloaded: applied", Duration::from_secs(10));
    assert!(log.contains(r#"settings="ecr.filters.pair""#), "{log}");
    assert!(!log.contains("only after a restart"), "applied live: {log}");
    let (code, body) = put_by_filter(&fg, "pair");
    assert_eq!(code, "200", "{body}");
    let stored: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> =
        stored.as_array().unwrap().iter().map(|c| c["endpointId"].as_str().unwrap()).collect();
    assert_eq!(ids, ["ep-1", "ep-2"]);

    // A filter that would select every endpoint is refused; the running ones stay.
    write(&path, A_BAD_FILTER);
    let log = fg.wait_log("configuration reload refused", Duration::from_secs(10));
    assert!(log.contains("ecr.filters"), "{log}");
    assert_eq!(put_by_filter(&fg, "pair").0, "200");
    assert_eq!(put_by_filter(&fg, "everything").0, "404");
}

const LIMITS_1: &str = "
process: {config_check_interval_ms: 100}
auth:
  endpoints: [{app_version: demo-v1, token: tok-1, endpoint_id: ep-1}]
  allow_anonymous: true
gateway: {app_versions: [demo-v1], max_subscriptions_per_session: 10}
transports:
  mqtt: {max_connections_per_address: 1, max_messages_per_sec: 100}
";

const LIMITS_2: &str = "
process: {config_check_interval_ms: 100}
auth:
  endpoints: [{app_version: demo-v1, token: tok-1, endpoint_id: ep-1}]
  allow_anonymous: true
gateway: {app_versions: [demo-v1], max_subscriptions_per_session: 20}
transports:
  mqtt: {max_connections_per_address: 3, max_messages_per_sec: 200}
";

/// The limits of issue 15 apply to new connections after a reload, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_session_limits_reload_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fleetgate.yml");
    write(&path, LIMITS_1);
    let fg = Fleetgate::start("up", &[("FLEETGATE_CONFIG", path.display().to_string())]);
    let mut first = Device::connect(fg.mqtt, "demo-v1", "tok-1").await.expect("connect");
    assert!(
        Device::connect(fg.mqtt, "demo-v1", "tok-1").await.is_err(),
        "one connection per address"
    );
    write(&path, LIMITS_2);
    let log = fg.wait_log("configuration reloaded: applied", Duration::from_secs(10));
    assert!(!log.contains("take effect only after a restart"), "{log}");
    let mut second = Device::connect(fg.mqtt, "demo-v1", "tok-1").await.expect("now allowed");
    assert_eq!(second.send(SAMPLE).await.as_deref(), Ok("status"));
    assert_eq!(first.send(SAMPLE).await.as_deref(), Ok("status"), "the first one stays");
}
