//! `fleetgate up` with MQTT over QUIC, driven by a client on an independent QUIC stack
//! (aioquic, `tests/clients/mqtt_quic.py`): EMQX single-stream mode, ALPN `mqtt`.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};

use fleetgate_tls::test_certs::TestFiles;
use support::{Fleetgate, certificate_env, demo_endpoint_env, free_udp_port};

const BATCH: &str = r#"[{"temperature":21},{"temperature":22}]"#;

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

fn client(port: u16, ca: &Path, alpn: &str, request_id: u32) -> Output {
    client_with(port, ca, alpn, request_id, None)
}

/// The aioquic client, with a client certificate and key when given.
fn client_with(
    port: u16,
    ca: &Path,
    alpn: &str,
    request_id: u32,
    identity: Option<(&Path, &Path)>,
) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/mqtt_quic.py");
    let topic = format!("kp1/demo-v1/dcx/tok-1/json/{request_id}");
    let mut command = Command::new("python3");
    command.arg(script).args([&port.to_string(), &path(ca), alpn, &topic, BATCH]);
    if let Some((cert, key)) = identity {
        command.args([path(cert), path(key)]);
    }
    command.output().expect("python3 with aioquic (scripts/test installs it)")
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

#[test]
fn aioquic_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let f = TestFiles::write(dir.path());
    let quic = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let mut env = demo_endpoint_env();
    env.extend([
        ("FLEETGATE_TRANSPORTS_MQTT_QUIC_ENABLED", "true".to_owned()),
        ("FLEETGATE_TRANSPORTS_MQTT_QUIC_LISTEN", quic.to_string()),
        ("FLEETGATE_TRANSPORTS_MQTT_QUIC_TLS_CERT_FILE", path(&f.server_cert)),
        ("FLEETGATE_TRANSPORTS_MQTT_QUIC_TLS_KEY_FILE", path(&f.server_key)),
        ("FLEETGATE_TRANSPORTS_MQTT_QUIC_TLS_CLIENT_CA_FILE", path(&f.ca)),
        ("FLEETGATE_TRANSPORTS_MQTT_QUIC_TLS_CRL_FILES", format!("[{}]", path(&f.crl))),
        certificate_env(&f),
    ]);
    let fg = Fleetgate::start("up", &env);

    let out = client_with(quic.port(), &f.ca, "mqtt", 21, Some((&f.client_cert, &f.client_key)));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "kp1/demo-v1/dcx/tok-1/json/21/status");
    assert_eq!(fg.metric("fleetgate_dcx_samples_total"), Some(2.0));
    let keep_alive = r#"fleetgate_transport_keep_alive_timeouts_total{transport="mqtt_quic"}"#;
    assert_eq!(fg.metric(keep_alive), Some(0.0));
    let too_large = r#"fleetgate_transport_messages_too_large_total{transport="mqtt_quic"}"#;
    assert_eq!(fg.metric(too_large), Some(0.0));

    // Valid for the CA, unknown to the 16/ECAP provider: the CONNECT is refused.
    let unlisted = Some((f.unlisted_cert.as_path(), f.unlisted_key.as_path()));
    let out = client_with(quic.port(), &f.ca, "mqtt", 22, unlisted);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(fg.metric("fleetgate_gateway_sessions_refused_total"), Some(1.0));

    // Refused at the handshake, counted by reason: expired, revoked, another CA, none.
    for (identity, reason) in [
        (Some((&f.expired_cert, &f.expired_key)), "client_certificate_expired"),
        (Some((&f.revoked_cert, &f.revoked_key)), "client_certificate_revoked"),
        (Some((&f.stranger_cert, &f.stranger_key)), "client_certificate_invalid"),
        (None, "no_client_certificate"),
    ] {
        let identity = identity.map(|(c, k)| (c.as_path(), k.as_path()));
        let out = client_with(quic.port(), &f.ca, "mqtt", 23, identity);
        assert!(matches!(out.status.code(), Some(2 | 4)), "{reason}: {out:?}");
        let name = format!(
            "fleetgate_transport_tls_handshake_failures_total{{transport=\"mqtt_quic\",reason=\"{reason}\"}}"
        );
        assert_eq!(fg.metric(&name), Some(1.0), "{reason}");
    }
    assert_eq!(fg.metric("fleetgate_dcx_samples_total"), Some(2.0));
}
