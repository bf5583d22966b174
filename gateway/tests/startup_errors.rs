//! Start-up and the process around the services: bad configuration stops start-up with an error
//! that names the setting at fault; NATS may come later; logs; SIGTERM.

mod support;

use std::net::TcpListener;
use std::time::Duration;

use fleetgate_testkit::NatsServer;
use support::{Fleetgate, http_get};

fn start_fails(command: &str, env: &[(&str, String)]) -> String {
    let mut fg = Fleetgate::spawn(command, env);
    let (code, log) = fg.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(2), "exit code 2 for a configuration error:\n{log}");
    log
}

#[test]
fn unknown_key_in_the_file_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fleetgate.yml");
    std::fs::write(&path, "dcx:\n  reliable_receivers: [epts]\n  receiver_timout_ms: 10\n")
        .expect("write");
    let log = start_fails("up", &[("FLEETGATE_CONFIG", path.display().to_string())]);
    assert!(log.contains("dcx.receiver_timout_ms"), "{log}");
    assert!(log.contains("fleetgate.yml"), "{log}");
}

#[test]
fn unknown_environment_setting_is_named() {
    let log = start_fails("up", &[("FLEETGATE_NATS_ULR", "nats://127.0.0.1:4222".into())]);
    assert!(log.contains("FLEETGATE_NATS_ULR"), "{log}");
}

#[test]
fn wrongly_typed_setting_is_named() {
    let log = start_fails("up", &[("FLEETGATE_DCX_RECEIVER_TIMEOUT_MS", "soon".into())]);
    assert!(log.contains("dcx.receiver_timeout_ms"), "{log}");
}

#[test]
fn taken_mqtt_port_is_named() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let log = start_fails("up", &[("FLEETGATE_TRANSPORTS_MQTT_LISTEN", addr.clone())]);
    assert!(log.contains("transports.mqtt.listen"), "{log}");
    assert!(log.contains(&addr), "{log}");
}

#[test]
fn taken_admin_port_is_named() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let log = start_fails("up", &[("FLEETGATE_ADMIN_LISTEN", addr)]);
    assert!(log.contains("admin.listen"), "{log}");
}

/// A value the type allows but the gateway cannot work with stops start-up, naming the setting
/// (a packet limit of 0 used to give a ready gateway that dropped every MQTT connection).
#[test]
fn value_out_of_range_is_named() {
    let log = start_fails("up", &[("FLEETGATE_TRANSPORTS_MQTT_MAX_PACKET_SIZE_BYTES", "0".into())]);
    assert!(log.contains("transports.mqtt.max_packet_size_bytes"), "{log}");
    assert!(log.contains("the minimum is 64"), "{log}");
    let log = start_fails("up", &[("FLEETGATE_TRANSPORTS_COAP_BLOCK_SIZE_BYTES", "100".into())]);
    assert!(log.contains("transports.coap.block_size_bytes"), "{log}");
}

#[test]
fn single_service_needs_nats() {
    let log = start_fails("dcx", &[]);
    assert!(log.contains("nats.url"), "{log}");
}

#[test]
fn unreachable_nats_is_named() {
    let port = fleetgate_testkit::free_port();
    let log = start_fails(
        "up",
        &[
            ("FLEETGATE_NATS_URL", format!("nats://127.0.0.1:{port}")),
            ("FLEETGATE_NATS_CONNECT_TIMEOUT_MS", "500".into()),
        ],
    );
    assert!(log.contains("nats.url"), "{log}");
}

/// In a cluster the gateway may start before NATS: it keeps trying, `/healthz` answers and
/// `/readyz` says it is starting, and it becomes ready once NATS is there.
#[test]
fn gateway_started_before_nats_waits_for_it() {
    let mut nats = NatsServer::start();
    nats.kill();
    let mut fg = Fleetgate::spawn("up", &[("FLEETGATE_NATS_URL", nats.url())]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let readyz = loop {
        if let Some(answer) = http_get(fg.admin, "/readyz") {
            break answer;
        }
        assert!(std::time::Instant::now() < deadline, "no admin endpoint:\n{}", fg.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(readyz.0, 503, "{readyz:?}");
    assert!(readyz.1.contains("starting"), "{readyz:?}");
    assert_eq!(http_get(fg.admin, "/healthz").map(|(code, _)| code), Some(200));
    std::thread::sleep(Duration::from_millis(500));
    nats.restart();
    fg.wait_ready();
    assert!(fg.log().contains("NATS is not reachable yet"), "{}", fg.log());
    assert_eq!(fg.terminate(), Some(0));
}

#[test]
fn sigterm_stops_cleanly() {
    let mut fg = Fleetgate::start("up", &[]);
    assert_eq!(fg.terminate(), Some(0));
    assert!(fg.log().contains("stopped"));
}

/// The variables the kubelet injects for a Service named `fleetgate-mqtt` are not settings:
/// they are ignored, and start-up goes on (they used to stop every pod with exit 2).
#[test]
fn kubernetes_service_links_do_not_stop_start_up() {
    let env = [
        ("FLEETGATE_MQTT_PORT", "tcp://10.96.0.12:1883".to_owned()),
        ("FLEETGATE_MQTT_SERVICE_HOST", "10.96.0.12".to_owned()),
        ("FLEETGATE_MQTT_SERVICE_PORT", "1883".to_owned()),
        ("FLEETGATE_MQTT_PORT_1883_TCP", "tcp://10.96.0.12:1883".to_owned()),
        ("FLEETGATE_MQTT_PORT_1883_TCP_PROTO", "tcp".to_owned()),
        ("FLEETGATE_MQTT_PORT_1883_TCP_PORT", "1883".to_owned()),
        ("FLEETGATE_MQTT_PORT_1883_TCP_ADDR", "10.96.0.12".to_owned()),
    ];
    let mut fg = Fleetgate::start("up", &env);
    assert_eq!(fg.terminate(), Some(0));
    assert!(fg.log().contains("Kubernetes service link"), "{}", fg.log());
}

/// `log.format: json` writes one JSON object per line (for log collectors); text written to a
/// file (not a terminal) carries no colour codes.
#[test]
fn logs_are_json_lines_or_plain_text() {
    let mut fg = Fleetgate::start("up", &[("FLEETGATE_LOG_FORMAT", "json".into())]);
    assert_eq!(fg.terminate(), Some(0));
    let log = fg.log();
    let mut messages = Vec::new();
    for line in log.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(event["level"].is_string() && event["timestamp"].is_string(), "{line}");
        messages.push(event["fields"]["message"].as_str().unwrap_or_default().to_owned());
    }
    assert!(messages.iter().any(|m| m == "fleetgate ready"), "{log}");

    let mut fg = Fleetgate::start("up", &[]);
    assert_eq!(fg.terminate(), Some(0));
    assert!(fg.log().contains("fleetgate ready"));
    assert!(!fg.log().contains('\x1b'), "colour codes in a log file:\n{}", fg.log());
}
