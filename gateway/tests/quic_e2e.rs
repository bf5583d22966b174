//! `fleetgate up` with MQTT over QUIC, driven by a client on an independent QUIC stack
//! (aioquic, `tests/clients/mqtt_quic.py`): EMQX single-stream mode, ALPN `mqtt`.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};

use fleetgate_tls::test_certs::TestFiles;
use support::{Fleetgate, demo_endpoint_env, free_udp_port};

const BATCH: &str = r#"[{"temperature":21},{"temperature":22}]"#;

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

fn client(port: u16, ca: &Path, alpn: &str, request_id: u32) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/mqtt_quic.py");
    let topic = format!("kp1/demo-v1/dcx/tok-1/json/{request_id}");
    Command::new("python3")
        .arg(script)
        .args([&port.to_string(), &path(ca), alpn, &topic, BATCH])
        .output()
        .expect("python3 with aioquic (scripts/test installs it)")
}

#[test]
fn aioquic_gets_status_and_a_bad_alpn_or_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let files = TestFiles::write(dir.path());
    let quic = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let mut env = demo_endpoint_env();
    env.extend([
        ("FLEETGATE_TRANSPORTS_MQTT_QUIC_ENABLED", "true".to_owned()),
        ("FLEETGATE_TRANSPORTS_MQTT_QUIC_LISTEN", quic.to_string()),
        ("FLEETGATE_TRANSPORTS_MQTT_QUIC_TLS_CERT_FILE", path(&files.server_cert)),
        ("FLEETGATE_TRANSPORTS_MQTT_QUIC_TLS_KEY_FILE", path(&files.server_key)),
    ]);
    let fg = Fleetgate::start("up", &env);

    let out = client(quic.port(), &files.ca, "mqtt", 11);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "kp1/demo-v1/dcx/tok-1/json/11/status");
    assert_eq!(fg.metric("fleetgate_dcx_samples_total"), Some(2.0));
    let handshakes = r#"fleetgate_transport_tls_handshakes_total{transport="mqtt_quic"}"#;
    assert_eq!(fg.metric(handshakes), Some(1.0));

    // A client that offers another protocol: refused at the handshake, counted.
    let out = client(quic.port(), &files.ca, "h3", 12);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let alpn = r#"fleetgate_transport_tls_handshake_failures_total{transport="mqtt_quic",reason="no_common_parameters"}"#;
    assert_eq!(fg.metric(alpn), Some(1.0));

    // A client that does not trust the server's certificate.
    let out = client(quic.port(), &files.other_ca, "mqtt", 13);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(fg.metric("fleetgate_dcx_samples_total"), Some(2.0));
}
