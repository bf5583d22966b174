//! `fleetgate up` with its secure MQTT transports, driven by clients that are not ours:
//! Mosquitto's command-line clients over TLS and mTLS, paho-mqtt (Python) over WebSocket,
//! plain and TLS, with and without client certificates. Certificates are made at test time;
//! the 16/ECAP provider (`auth.certificates`) knows the client certificate `device-1` only.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use fleetgate_testkit::free_port;
use fleetgate_tls::test_certs::TestFiles;
use support::{Fleetgate, certificate_env, demo_endpoint_env};

const BATCH: &str = r#"[{"temperature":21},{"temperature":22}]"#;

struct Secure {
    fg: Fleetgate,
    mqtts: SocketAddr,
    ws: SocketAddr,
    wss: Option<SocketAddr>,
    files: TestFiles,
    _dir: tempfile::TempDir,
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// `fleetgate up` with MQTT/TLS (mTLS when `mtls`) and MQTT/WebSocket (plain, or TLS when
/// `wss`, mTLS when both).
fn up(mtls: bool, wss: bool) -> Secure {
    up_with(mtls, wss, &[])
}

fn up_with(mtls: bool, wss: bool, more: &[(&'static str, &str)]) -> Secure {
    let dir = tempfile::tempdir().unwrap();
    let files = TestFiles::write(dir.path());
    let mqtts = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let ws = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut env = demo_endpoint_env();
    env.extend([
        ("FLEETGATE_TRANSPORTS_MQTTS_ENABLED", "true".to_owned()),
        ("FLEETGATE_TRANSPORTS_MQTTS_LISTEN", mqtts.to_string()),
        ("FLEETGATE_TRANSPORTS_MQTTS_TLS_CERT_FILE", path(&files.server_cert)),
        ("FLEETGATE_TRANSPORTS_MQTTS_TLS_KEY_FILE", path(&files.server_key)),
        ("FLEETGATE_TRANSPORTS_MQTT_WS_ENABLED", "true".to_owned()),
        ("FLEETGATE_TRANSPORTS_MQTT_WS_LISTEN", ws.to_string()),
    ]);
    if mtls {
        env.extend([
            ("FLEETGATE_TRANSPORTS_MQTTS_TLS_CLIENT_CA_FILE", path(&files.ca)),
            ("FLEETGATE_TRANSPORTS_MQTTS_TLS_CRL_FILES", format!("[{}]", path(&files.crl))),
            certificate_env(&files),
        ]);
    }
    if wss {
        env.extend([
            ("FLEETGATE_TRANSPORTS_MQTT_WS_TLS_ENABLED", "true".to_owned()),
            ("FLEETGATE_TRANSPORTS_MQTT_WS_TLS_CERT_FILE", path(&files.server_cert)),
            ("FLEETGATE_TRANSPORTS_MQTT_WS_TLS_KEY_FILE", path(&files.server_key)),
        ]);
    }
    if wss && mtls {
        env.extend([
            ("FLEETGATE_TRANSPORTS_MQTT_WS_TLS_CLIENT_CA_FILE", path(&files.ca)),
            ("FLEETGATE_TRANSPORTS_MQTT_WS_TLS_CRL_FILES", format!("[{}]", path(&files.crl))),
        ]);
    }
    env.extend(more.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let fg = Fleetgate::start("up", &env);
    Secure { fg, mqtts, ws, wss: wss.then_some(ws), files, _dir: dir }
}

/// `mosquitto_sub` for one message on the endpoint's answers, then `mosquitto_pub` of a batch;
/// both with `tls` arguments. Returns the subscriber's output and the publisher's.
fn mosquitto_request(port: u16, tls: &[String], request_id: u32) -> (Output, Output) {
    let port = port.to_string();
    let common = |cmd: &str| {
        let mut c = Command::new(cmd);
        c.args(["-h", "localhost", "-p", &port]).args(tls);
        c
    };
    let sub = common("mosquitto_sub")
        .args(["-t", "kp1/demo-v1/dcx/tok-1/json/#", "-v", "-C", "1", "-W", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub is installed (scripts/test installs mosquitto-clients)");
    std::thread::sleep(Duration::from_millis(400));
    let publish = common("mosquitto_pub")
        .args(["-q", "1", "-t", &format!("kp1/demo-v1/dcx/tok-1/json/{request_id}"), "-m", BATCH])
        .output()
        .expect("mosquitto_pub is installed");
    let sub = sub.wait_with_output().unwrap();
    (sub, publish)
}

fn tls_args(ca: &Path, identity: Option<(&Path, &Path)>) -> Vec<String> {
    let mut args = vec!["--cafile".to_owned(), path(ca)];
    if let Some((cert, key)) = identity {
        args.extend(["--cert".to_owned(), path(cert), "--key".to_owned(), path(key)]);
    }
    args
}

fn failures(fg: &Fleetgate, transport: &str, reason: &str) -> f64 {
    let name = format!(
        "fleetgate_transport_tls_handshake_failures_total{{transport=\"{transport}\",reason=\"{reason}\"}}"
    );
    fg.metric(&name).unwrap_or(0.0)
}

#[test]
fn mosquitto_over_tls_gets_status_and_bad_clients_are_refused() {
    let s = up(false, false);
    let (sub, publish) = mosquitto_request(s.mqtts.port(), &tls_args(&s.files.ca, None), 42);
    assert!(publish.status.success(), "{publish:?}");
    let text = String::from_utf8_lossy(&sub.stdout);
    assert_eq!(text.trim(), "kp1/demo-v1/dcx/tok-1/json/42/status (null)", "{sub:?}");
    assert_eq!(s.fg.metric("fleetgate_dcx_samples_total"), Some(2.0));
    let handshakes = r#"fleetgate_transport_tls_handshakes_total{transport="mqtts"}"#;
    assert_eq!(s.fg.metric(handshakes), Some(2.0));

    // A client that trusts another CA: the handshake fails and nothing is published.
    let (_, publish) = mosquitto_request(s.mqtts.port(), &tls_args(&s.files.other_ca, None), 43);
    assert!(!publish.status.success());
    assert!(failures(&s.fg, "mqtts", "alert_received") >= 1.0);

    // A plaintext client on the TLS port.
    let port = s.mqtts.port().to_string();
    let plain = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-t", "kp1/demo-v1/dcx/tok-1/json/44"])
        .args(["-m", BATCH])
        .output()
        .unwrap();
    assert!(!plain.status.success());
    assert_eq!(failures(&s.fg, "mqtts", "not_tls"), 1.0);
    assert_eq!(s.fg.metric("fleetgate_dcx_samples_total"), Some(2.0));
}

#[test]
fn mosquitto_over_mtls_needs_a_valid_client_certificate() {
    let s = up(true, false);
    let f = &s.files;
    let good = tls_args(&f.ca, Some((&f.client_cert, &f.client_key)));
    let (sub, publish) = mosquitto_request(s.mqtts.port(), &good, 7);
    assert!(publish.status.success(), "{publish:?}");
    assert_eq!(
        String::from_utf8_lossy(&sub.stdout).trim(),
        "kp1/demo-v1/dcx/tok-1/json/7/status (null)"
    );

    for (cert, key, reason) in [
        (&f.expired_cert, &f.expired_key, "client_certificate_expired"),
        (&f.revoked_cert, &f.revoked_key, "client_certificate_revoked"),
        (&f.stranger_cert, &f.stranger_key, "client_certificate_invalid"),
    ] {
        let port = s.mqtts.port().to_string();
        let out = Command::new("mosquitto_pub")
            .args(["-h", "localhost", "-p", &port])
            .args(tls_args(&f.ca, Some((cert, key))))
            .args(["-q", "1", "-t", "kp1/demo-v1/dcx/tok-1/json/8", "-m", BATCH])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{reason}");
        assert_eq!(failures(&s.fg, "mqtts", reason), 1.0, "{reason}");
    }
    // No certificate at all.
    let (_, publish) = mosquitto_request(s.mqtts.port(), &tls_args(&f.ca, None), 9);
    assert!(!publish.status.success());
    assert!(failures(&s.fg, "mqtts", "no_client_certificate") >= 1.0);
    assert_eq!(s.fg.metric("fleetgate_dcx_samples_total"), Some(2.0));
    // The MQTT session's own metrics are reported for this transport too.
    let keep_alive = r#"fleetgate_transport_keep_alive_timeouts_total{transport="mqtts"}"#;
    assert_eq!(s.fg.metric(keep_alive), Some(0.0));
    let too_large = r#"fleetgate_transport_messages_too_large_total{transport="mqtts"}"#;
    assert_eq!(s.fg.metric(too_large), Some(0.0));
}

/// One `mosquitto_pub` of a batch over mTLS with `cert` and `key`; whether it succeeded.
fn mosquitto_publish(port: u16, ca: &Path, cert: &Path, key: &Path) -> Output {
    Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &port.to_string()])
        .args(tls_args(ca, Some((cert, key))))
        .args(["-q", "1", "-t", "kp1/demo-v1/dcx/tok-1/json", "-m", BATCH])
        .output()
        .unwrap()
}

#[test]
fn the_provider_decides_on_certificates_that_pass_the_handshake() {
    // The provider knows device-1 only: device-2 (valid, same CA) passes the handshake and is
    // refused at CONNECT by 16/ECAP.
    let s = up(true, false);
    let f = &s.files;
    let refused = "fleetgate_gateway_sessions_refused_total";
    let ok = mosquitto_publish(s.mqtts.port(), &f.ca, &f.client_cert, &f.client_key);
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(s.fg.metric(refused), Some(0.0));
    let out = mosquitto_publish(s.mqtts.port(), &f.ca, &f.unlisted_cert, &f.unlisted_key);
    assert!(!out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(said.contains("not authori") || said.contains("refused"), "{said}");
    assert_eq!(s.fg.metric(refused), Some(1.0));
    assert_eq!(
        s.fg.metric("fleetgate_transport_tls_handshakes_total{transport=\"mqtts\"}"),
        Some(2.0)
    );
    assert_eq!(s.fg.metric("fleetgate_dcx_samples_total"), Some(2.0));
    drop(s);

    // `gateway.certificate_check: local`: the handshake's check alone decides.
    let s = up_with(true, false, &[("FLEETGATE_GATEWAY_CERTIFICATE_CHECK", "local")]);
    let f = &s.files;
    let out = mosquitto_publish(s.mqtts.port(), &f.ca, &f.unlisted_cert, &f.unlisted_key);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(s.fg.metric("fleetgate_dcx_samples_total"), Some(2.0));
}

/// paho-mqtt over WebSocket: publishes a batch with a request id and prints what arrives.
const PAHO: &str = r#"
import sys, time, ssl
import paho.mqtt.client as mqtt
port, ca, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
got = []
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-ws", transport="websockets")
c.ws_set_options(path="/mqtt")
if ca:
    c.tls_set(ca_certs=ca, certfile=cert or None, keyfile=key or None)
c.on_message = lambda c, u, m: got.append(m.topic)
c.connect("localhost", port, keepalive=30)
c.loop_start()
c.publish("kp1/demo-v1/dcx/tok-1/json/5", '[{"temperature":21},{"temperature":22}]', qos=1).wait_for_publish(5)
deadline = time.time() + 5
while not got and time.time() < deadline:
    time.sleep(0.05)
c.disconnect(); c.loop_stop()
print(" ".join(got))
"#;

fn paho(port: u16, ca: Option<&Path>) -> Output {
    paho_with(port, ca, None)
}

/// paho-mqtt over WebSocket, over TLS trusting `ca` when given, with a client certificate and
/// key when given.
fn paho_with(port: u16, ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Output {
    let (cert, key) = identity.map(|(c, k)| (path(c), path(k))).unwrap_or_default();
    Command::new("python3")
        .args(["-c", PAHO, &port.to_string(), &ca.map(path).unwrap_or_default(), &cert, &key])
        .output()
        .expect("python3 with paho-mqtt (scripts/test installs it)")
}

#[test]
fn paho_over_websocket_gets_status() {
    let s = up(false, false);
    let out = paho(s.ws.port(), None);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "kp1/demo-v1/dcx/tok-1/json/5/status",
        "{out:?}"
    );
    assert_eq!(s.fg.metric("fleetgate_dcx_samples_total"), Some(2.0));
    let open = r#"fleetgate_transport_connections_accepted_total{transport="mqtt_ws"}"#;
    assert_eq!(s.fg.metric(open), Some(1.0));

    // Another path, and a plain HTTP request: refused with their HTTP status.
    let answer = |request: &str| {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(s.ws).unwrap();
        tcp.write_all(request.as_bytes()).unwrap();
        let mut text = String::new();
        let _ = tcp.read_to_string(&mut text);
        text
    };
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
    let other = answer(&format!("GET /other HTTP/1.1\r\nHost: x\r\n{upgrade}\r\n"));
    assert!(other.starts_with("HTTP/1.1 404 "), "{other}");
    let plain = answer("GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(plain.starts_with("HTTP/1.1 400 "), "{plain}");
    let wamp = answer(&format!(
        "GET /mqtt HTTP/1.1\r\nHost: x\r\n{upgrade}Sec-WebSocket-Protocol: wamp\r\n\r\n"
    ));
    assert!(wamp.starts_with("HTTP/1.1 400 "), "{wamp}");
}

#[test]
fn paho_over_secure_websocket_gets_status() {
    let s = up(false, true);
    let wss = s.wss.unwrap();
    let out = paho(wss.port(), Some(&s.files.ca));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "kp1/demo-v1/dcx/tok-1/json/5/status",
        "{out:?}"
    );
    let handshakes = r#"fleetgate_transport_tls_handshakes_total{transport="mqtt_ws"}"#;
    assert_eq!(s.fg.metric(handshakes), Some(1.0));
    // A client that trusts another CA gets nothing through.
    let out = paho(wss.port(), Some(&s.files.other_ca));
    assert!(!out.status.success() || out.stdout.trim_ascii().is_empty(), "{out:?}");
    assert_eq!(s.fg.metric("fleetgate_dcx_samples_total"), Some(2.0));
}

#[test]
fn paho_over_secure_websocket_with_client_certificates() {
    let s = up(true, true);
    let (wss, f) = (s.wss.unwrap(), &s.files);
    let out = paho_with(wss.port(), Some(&f.ca), Some((&f.client_cert, &f.client_key)));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "kp1/demo-v1/dcx/tok-1/json/5/status",
        "{out:?}"
    );
    assert_eq!(s.fg.metric("fleetgate_dcx_samples_total"), Some(2.0));
    let keep_alive = r#"fleetgate_transport_keep_alive_timeouts_total{transport="mqtt_ws"}"#;
    assert_eq!(s.fg.metric(keep_alive), Some(0.0));
    let too_large = r#"fleetgate_transport_messages_too_large_total{transport="mqtt_ws"}"#;
    assert_eq!(s.fg.metric(too_large), Some(0.0));

    // Valid for the CA but unknown to the provider: refused at CONNECT.
    let out = paho_with(wss.port(), Some(&f.ca), Some((&f.unlisted_cert, &f.unlisted_key)));
    assert!(out.stdout.trim_ascii().is_empty(), "{out:?}");
    // paho's network loop tries again after a refused CONNECT: once or more.
    let refused = s.fg.metric("fleetgate_gateway_sessions_refused_total");
    assert!(refused.is_some_and(|n| n >= 1.0), "{refused:?}");
    // Refused at the handshake: expired, revoked, or no certificate.
    for (identity, reason) in [
        (Some((&f.expired_cert, &f.expired_key)), "client_certificate_expired"),
        (Some((&f.revoked_cert, &f.revoked_key)), "client_certificate_revoked"),
        (None, "no_client_certificate"),
    ] {
        let identity = identity.map(|(c, k)| (c.as_path(), k.as_path()));
        let out = paho_with(wss.port(), Some(&f.ca), identity);
        assert!(!out.status.success() || out.stdout.trim_ascii().is_empty(), "{out:?}");
        assert!(failures(&s.fg, "mqtt_ws", reason) >= 1.0, "{reason}");
    }
    assert_eq!(s.fg.metric("fleetgate_dcx_samples_total"), Some(2.0));
}

/// Runs curl; returns its exit code, the status code and the HTTP version of the response.
fn curl(args: &[String]) -> (Option<i32>, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "15", "-o", "/dev/null", "-w", "%{http_code} %{http_version}"])
        .args(args)
        .output()
        .expect("curl runs");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn curl_over_https_and_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let f = TestFiles::write(dir.path());
    let mut env = demo_endpoint_env();
    env.extend([
        ("FLEETGATE_TRANSPORTS_HTTP_TLS_ENABLED", "true".to_owned()),
        ("FLEETGATE_TRANSPORTS_HTTP_TLS_CERT_FILE", path(&f.server_cert)),
        ("FLEETGATE_TRANSPORTS_HTTP_TLS_KEY_FILE", path(&f.server_key)),
        ("FLEETGATE_TRANSPORTS_HTTP_TLS_CLIENT_CA_FILE", path(&f.ca)),
        ("FLEETGATE_TRANSPORTS_HTTP_TLS_CRL_FILES", format!("[{}]", path(&f.crl))),
        certificate_env(&f),
    ]);
    let fg = Fleetgate::start("up", &env);
    let url = format!("https://localhost:{}/kp1/demo-v1/dcx/tok-1/json/1", fg.http.port());
    let request = |version: &str, ca: &Path, cert: &Path, key: &Path| {
        let mut args: Vec<String> = vec![version.into(), "--cacert".into(), path(ca)];
        args.extend(["--cert".into(), path(cert), "--key".into(), path(key)]);
        args.extend(["-X".into(), "POST".into(), "--data".into(), BATCH.into(), url.clone()]);
        curl(&args)
    };
    // HTTP/1.1 and HTTP/2 (chosen by ALPN).
    let ok = request("--http1.1", &f.ca, &f.client_cert, &f.client_key);
    assert_eq!(ok, (Some(0), "204 1.1".to_owned()));
    let ok = request("--http2", &f.ca, &f.client_cert, &f.client_key);
    assert_eq!(ok, (Some(0), "204 2".to_owned()));
    assert_eq!(fg.metric("fleetgate_dcx_samples_total"), Some(4.0));
    // Valid for the CA, unknown to the 16/ECAP provider: the request is refused (401).
    let refused = request("--http1.1", &f.ca, &f.unlisted_cert, &f.unlisted_key);
    assert_eq!(refused, (Some(0), "401 1.1".to_owned()));
    assert_eq!(fg.metric("fleetgate_gateway_sessions_refused_total"), Some(1.0));

    // Refused at the handshake: the server is not trusted (curl 60), or the client's
    // certificate is expired, revoked or from another CA.
    let (code, _) = request("--http1.1", &f.other_ca, &f.client_cert, &f.client_key);
    assert_eq!(code, Some(60));
    for (cert, key, reason) in [
        (&f.expired_cert, &f.expired_key, "client_certificate_expired"),
        (&f.revoked_cert, &f.revoked_key, "client_certificate_revoked"),
        (&f.stranger_cert, &f.stranger_key, "client_certificate_invalid"),
    ] {
        let (code, status) = request("--http1.1", &f.ca, cert, key);
        assert!(code != Some(0) && status.starts_with("000"), "{reason}: {code:?} {status}");
        assert_eq!(failures(&fg, "http", reason), 1.0, "{reason}");
    }
    // A plaintext request on the HTTPS port gets no HTTP answer.
    let plain = format!("http://127.0.0.1:{}/kp1/demo-v1/dcx/tok-1/json/1", fg.http.port());
    let (_, status) = curl(&["-X".into(), "POST".into(), "--data".into(), BATCH.into(), plain]);
    assert!(status.starts_with("000"), "{status}");
    assert_eq!(failures(&fg, "http", "not_tls"), 1.0);
    assert_eq!(fg.metric("fleetgate_dcx_samples_total"), Some(4.0));
}
