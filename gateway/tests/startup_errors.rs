//! Bad configuration stops start-up with an error that names the setting at fault.

mod support;

use std::net::TcpListener;
use std::time::Duration;

use support::Fleetgate;

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

#[test]
fn sigterm_stops_cleanly() {
    let mut fg = Fleetgate::start("up", &[]);
    assert_eq!(fg.terminate(), Some(0));
    assert!(fg.log().contains("stopped"));
}
