//! `fleetgate up` driven over the custom UDP protocol (FGU/1) by the crate's device: samples
//! reach DCX and the device hears `/status`; pushes reach the device; replayed, forged and
//! truncated datagrams, a wrong gateway key, a bad token and an expired session are each
//! refused and counted; a device that changes source port keeps its session.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::time::Duration;

use fleetgate_messages::{ClientData, DataSamplesEvent, ExtensionData, Record};
use fleetgate_testkit::NatsServer;
use fleetgate_transport_udp::client::ClientError;
use fleetgate_transport_udp::device::{Device, DeviceError};
use fleetgate_transport_udp::handshake::{Hello, KeyPair};
use support::{Fleetgate, NatsObserver, demo_endpoint_env, http_get};

const BATCH: &[u8] = br#"[{"temperature":21},{"temperature":22}]"#;
const WAIT: Duration = Duration::from_secs(5);

struct Keys {
    _dir: tempfile::TempDir,
    path: PathBuf,
    pair: KeyPair,
}

fn keys() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.key");
    let pair = fleetgate_transport_udp::keys::generate(&path).unwrap();
    Keys { _dir: dir, path, pair }
}

fn up(keys: &Keys, extra: &[(&'static str, String)]) -> Fleetgate {
    let mut env = demo_endpoint_env();
    env.push(("FLEETGATE_TRANSPORTS_UDP_PRIVATE_KEY_PATH", keys.path.display().to_string()));
    env.extend_from_slice(extra);
    Fleetgate::start("up", &env)
}

fn hello(token: &str) -> Hello<'_> {
    Hello { app_version: "demo-v1", token: Some(token), username: None, password: None }
}

/// The value of the `/metrics` sample whose line contains every one of `parts`.
fn metric(fg: &Fleetgate, parts: &[&str]) -> f64 {
    let (_, body) = http_get(fg.admin, "/metrics").expect("metrics");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn refused(fg: &Fleetgate, reason: &str) -> f64 {
    metric(
        fg,
        &["fleetgate_transport_udp_datagrams_refused_total", &format!("reason=\"{reason}\"")],
    )
}

/// Polls until the counter reaches `at_least` (the gateway counts after the datagram arrives).
async fn wait_for(fg: &Fleetgate, reason: &str, at_least: f64) {
    for _ in 0..100 {
        if refused(fg, reason) >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{reason}: {} refused, expected {at_least}", refused(fg, reason));
}

#[tokio::test]
async fn samples_reach_dcx_the_device_hears_status_and_pushes_arrive() {
    let keys = keys();
    let nats = NatsServer::start();
    let mut observer = NatsObserver::connect(&nats.url()).await;
    let fg = up(&keys, &[("FLEETGATE_NATS_URL", nats.url())]);
    let mut device =
        Device::connect(fg.udp, &keys.pair.public, &hello("tok-1"), WAIT).await.unwrap();
    assert_eq!(device.accepted().aliases, ["dcx", "cmx", "epts"]);

    let reply = device.request("dcx", "/json", 42, BATCH, WAIT).await.expect("an answer");
    assert_eq!(reply.status, 200, "{reply:?}");
    let msg = observer.client_data().await;
    let data = ClientData::decode(&msg.payload).unwrap();
    assert_eq!((data.app_version_name, data.endpoint_id), ("demo-v1", Some("ep-1")));
    assert_eq!((data.resource_path, data.request_id), ("/json", Some(42)));
    assert_eq!(data.payload, BATCH);
    let event = observer.samples_event().await;
    let event = DataSamplesEvent::decode(&event.payload).unwrap();
    assert_eq!(event.data_samples, [&br#"{"temperature":21}"#[..], br#"{"temperature":22}"#]);

    // A push from an extension, to the reply subject it saw: on the next datagram.
    let push = ExtensionData {
        correlation_id: "push-1",
        timestamp_ms: 0,
        timeout_ms: 0,
        app_version_name: Some("demo-v1"),
        extension_instance_name: Some("cmx"),
        endpoint_id: Some("ep-1"),
        resource_path: "/config/json",
        request_id: None,
        payload: Some(br#"{"configId":"c2"}"#),
        status_code: 200,
        reason_phrase: None,
    };
    observer.client.publish(msg.reply.unwrap(), push.to_bytes()).await.unwrap();
    let push = device.next_push(WAIT).await.expect("the push arrives");
    assert_eq!((push.ext.as_str(), push.path.as_str()), ("cmx", "/config/json"));
    assert_eq!(push.payload, br#"{"configId":"c2"}"#);
    // Acknowledged: no retransmission follows.
    assert!(device.next_push(Duration::from_millis(2500)).await.is_none());

    // A request without id gets no success answer; an error without id does come back.
    device.send("dcx", "/json", None, b"not json").await.unwrap();
    let error = device.next_unsolicited(WAIT).await.expect("an error answer");
    assert_eq!((error.status, error.ext.as_str(), error.path.as_str()), (400, "dcx", "/json"));
    assert_eq!(device.next_unsolicited(Duration::from_millis(300)).await, None, "once");
    assert_eq!(device.next_push(Duration::from_millis(10)).await, None);
    assert!(metric(&fg, &["fleetgate_transport_udp_handshakes_total"]) >= 1.0);
}

#[tokio::test]
async fn bad_datagrams_keys_and_tokens_are_refused_and_counted() {
    let keys = keys();
    let fg = up(&keys, &[]);
    let mut device =
        Device::connect(fg.udp, &keys.pair.public, &hello("tok-1"), WAIT).await.unwrap();
    let reply = device.request("dcx", "/json", 1, BATCH, WAIT).await.expect("answer");
    assert_eq!(reply.status, 200);

    // Replayed: the same bytes twice; the second is refused and its request not handled again.
    let frames = device.request_frame("dcx", "/json", Some(2), BATCH);
    let packet = device.session().seal(&frames);
    device.send_raw(&packet).await.unwrap();
    assert_eq!(device.request("dcx", "/json", 2, BATCH, WAIT).await.map(|r| r.status), Some(200));
    let before = refused(&fg, "replay");
    device.send_raw(&packet).await.unwrap();
    wait_for(&fg, "replay", before + 1.0).await;

    // Forged: one bit of the ciphertext flipped.
    let mut forged = device.session().seal(&frames);
    let last = forged.len() - 1;
    forged[last] ^= 1;
    device.send_raw(&forged).await.unwrap();
    wait_for(&fg, "forged", 1.0).await;

    // Truncated: a header cut short, and a packet without room for its tag.
    device.send_raw(&packet[..9]).await.unwrap();
    device.send_raw(&packet[..20]).await.unwrap();
    wait_for(&fg, "malformed", 2.0).await;

    // The session survived all that.
    assert_eq!(device.request("dcx", "/json", 3, BATCH, WAIT).await.map(|r| r.status), Some(200));

    // A device that pins another key gets no answer at all.
    let wrong = KeyPair::generate().unwrap();
    let result =
        Device::connect(fg.udp, &wrong.public, &hello("tok-1"), Duration::from_millis(1500)).await;
    assert!(matches!(result, Err(DeviceError::Timeout)), "{:?}", result.err());
    wait_for(&fg, "handshake", 1.0).await;

    // A bad token: refused in the (authenticated) handshake answer.
    let result = Device::connect(fg.udp, &keys.pair.public, &hello("no-such-token"), WAIT).await;
    match result {
        Err(DeviceError::Protocol(ClientError::Refused { status, .. })) => assert_eq!(status, 401),
        other => panic!("expected 401, got {:?}", other.err()),
    }
    let counted =
        metric(&fg, &["fleetgate_transport_udp_handshakes_refused_total", "status=\"401\""]);
    assert_eq!(counted, 1.0);
    assert!(fg.log().lines().all(|l| !l.contains("panicked")));
}

#[tokio::test]
async fn a_device_that_changes_port_keeps_its_session_until_it_expires() {
    let keys = keys();
    let fg = up(&keys, &[("FLEETGATE_TRANSPORTS_UDP_SESSION_IDLE_TIMEOUT_MS", "1500".into())]);
    let mut device =
        Device::connect(fg.udp, &keys.pair.public, &hello("tok-1"), WAIT).await.unwrap();
    assert_eq!(device.request("dcx", "/json", 1, BATCH, WAIT).await.map(|r| r.status), Some(200));
    let old = device.local_addr().unwrap();
    device.rebind().await.unwrap();
    assert_ne!(device.local_addr().unwrap(), old);
    assert_eq!(device.request("dcx", "/json", 2, BATCH, WAIT).await.map(|r| r.status), Some(200));
    assert_eq!(metric(&fg, &["fleetgate_transport_udp_migrations_total"]), 1.0);

    // Idle past the timeout: the session is gone, its datagrams are dropped and counted.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(metric(&fg, &["fleetgate_transport_udp_sessions_expired_total"]), 1.0);
    let answer = device.request("dcx", "/json", 3, BATCH, Duration::from_millis(800)).await;
    assert_eq!(answer, None);
    wait_for(&fg, "unknown_session", 1.0).await;
    // A new handshake opens a new session.
    let mut again =
        Device::connect(fg.udp, &keys.pair.public, &hello("tok-1"), WAIT).await.unwrap();
    assert_eq!(again.request("dcx", "/json", 4, BATCH, WAIT).await.map(|r| r.status), Some(200));
}

/// The independent device of `transports/udp/tests/python_device.py`, written from SPEC.md with
/// the `noiseprotocol` package: its samples get 200, a malformed batch 400.
#[tokio::test]
async fn an_independent_python_device_sends_samples_and_hears_status() {
    let found = std::process::Command::new("python3")
        .args(["-c", "import noise"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "python3 with `noiseprotocol` is needed: `python3 -m pip install noiseprotocol`"
    );
    let keys = keys();
    let fg = up(&keys, &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../transports/udp/tests/python_device.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .args([
            fg.udp.ip().to_string(),
            fg.udp.port().to_string(),
            fleetgate_transport_udp::handshake::hex(&keys.pair.public),
            "demo-v1".into(),
            "tok-1".into(),
        ])
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python device failed:\n{stdout}\n{stderr}");
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(result["status"], 200, "{result}");
    assert_eq!(result["bad_status"], 400, "{result}");
    assert_eq!(result["aliases"], serde_json::json!(["dcx", "cmx", "epts"]));
}

/// Handshake limits: over the per-address rate an INIT gets a stateless cookie (RETRY) and
/// proceeds once it echoes it; over the per-token rate the handshake is refused with 429.
#[tokio::test]
async fn handshakes_over_the_limits_get_a_cookie_or_429() {
    let keys = keys();
    let fg = up(
        &keys,
        &[
            ("FLEETGATE_TRANSPORTS_UDP_HANDSHAKES_PER_ADDRESS_PER_SEC", "1".into()),
            ("FLEETGATE_TRANSPORTS_UDP_HANDSHAKES_PER_TOKEN_PER_MIN", "2".into()),
        ],
    );
    let mut first =
        Device::connect(fg.udp, &keys.pair.public, &hello("tok-1"), WAIT).await.unwrap();
    let mut second =
        Device::connect(fg.udp, &keys.pair.public, &hello("tok-1"), WAIT).await.unwrap();
    assert!(
        metric(&fg, &["fleetgate_transport_udp_retries_total"]) >= 1.0,
        "a cookie was asked for"
    );
    for device in [&mut first, &mut second] {
        assert_eq!(
            device.request("dcx", "/json", 1, BATCH, WAIT).await.map(|r| r.status),
            Some(200)
        );
    }
    match Device::connect(fg.udp, &keys.pair.public, &hello("tok-1"), WAIT).await {
        Err(DeviceError::Protocol(ClientError::Refused { status, .. })) => assert_eq!(status, 429),
        other => panic!("expected 429, got {:?}", other.err()),
    }
}
