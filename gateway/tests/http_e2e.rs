//! `fleetgate up` on the in-process bus, driven over HTTP by `curl`: 2/DCP batches get 204,
//! every error code of DESIGN decision 3 that HTTP can reach comes back as the HTTP status with
//! the 1/KP error body, over HTTP/1.1 and HTTP/2 (h2c with prior knowledge).

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::process::Command;

use fleetgate_testkit::free_port;
use support::{Fleetgate, demo_endpoint_env};

const BATCH: &str = r#"[{"t":1}]"#;

/// `fleetgate up` with its HTTP transport on a free port, a 1 KiB body limit and one client
/// credential.
fn up() -> (Fleetgate, SocketAddr) {
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut env = demo_endpoint_env();
    env.push(("FLEETGATE_TRANSPORTS_HTTP_LISTEN", http.to_string()));
    env.push(("FLEETGATE_TRANSPORTS_HTTP_MAX_BODY_BYTES", "1024".into()));
    env.push(("FLEETGATE_AUTH_CLIENTS", "[{username: device-1, password: s3cret}]".into()));
    (Fleetgate::start("up", &env), http)
}

/// Runs curl; returns the status code and body of the (last) response.
fn curl(args: &[&str]) -> (u16, String) {
    let output = Command::new("curl")
        .args(["-s", "--max-time", "15", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn url(http: SocketAddr, path: &str) -> String {
    format!("http://{http}/{path}")
}

/// The status code named in a 1/KP error body.
fn error_code(body: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(body).expect("error body is JSON");
    let obj = v.as_object().expect("object");
    assert_eq!(obj.len(), 2, "exactly statusCode and reasonPhrase: {v}");
    assert!(v["reasonPhrase"].is_string(), "{v}");
    v["statusCode"].as_u64().expect("statusCode")
}

#[test]
fn curl_posts_a_batch_and_gets_204() {
    let (fg, http) = up();
    let (code, body) =
        curl(&["-X", "POST", "--data", BATCH, &url(http, "kp1/demo-v1/dcx/tok-1/json/1")]);
    assert_eq!((code, body.as_str()), (204, ""));
    // Without a request id the request is answered all the same.
    let (code, _) =
        curl(&["-X", "POST", "--data", BATCH, &url(http, "kp1/demo-v1/dcx/tok-1/json")]);
    assert_eq!(code, 204);
    // PUT too.
    let (code, _) =
        curl(&["-X", "PUT", "--data", BATCH, &url(http, "kp1/demo-v1/dcx/tok-1/json/2")]);
    assert_eq!(code, 204);
    assert_eq!(fg.metric("fleetgate_dcx_samples_total"), Some(3.0));
    assert_eq!(
        fg.metric("fleetgate_transport_messages_received_total{transport=\"http\"}"),
        Some(3.0)
    );
}

#[test]
fn curl_over_http2_with_prior_knowledge_gets_204() {
    let (_fg, http) = up();
    let output = Command::new("curl")
        .args(["-s", "--max-time", "15", "--http2-prior-knowledge", "-o", "/dev/null"])
        .args(["-w", "%{http_code} %{http_version}", "-X", "POST", "--data", BATCH])
        .arg(url(http, "kp1/demo-v1/dcx/tok-1/json/1"))
        .output()
        .expect("curl runs");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "204 2");
}

#[test]
fn curl_reuses_a_keep_alive_connection() {
    let (_fg, http) = up();
    let (first, second) =
        (url(http, "kp1/demo-v1/dcx/tok-1/json/1"), url(http, "kp1/demo-v1/dcx/tok-1/json/2"));
    let output = Command::new("curl")
        .args(["-s", "--max-time", "15", "-o", "/dev/null", "-o", "/dev/null"])
        .args(["-w", "%{http_code} %{num_connects}\n", "--data", BATCH, &first, &second])
        .output()
        .expect("curl runs");
    // The second request went over the first one's connection.
    assert_eq!(String::from_utf8_lossy(&output.stdout), "204 1\n204 0\n");
}

#[test]
fn every_error_is_its_status_with_the_error_body() {
    let (_fg, http) = up();
    let cases: [(&str, &str, u16); 5] = [
        ("kp1/demo-v1/dcx/tok-1/json/1", r#"[{"t":"#, 400),
        ("kp1/demo-v1/dcx/unknown-token/json/2", BATCH, 401),
        ("kp1/demo-v1/nosuchext/tok-1/json/3", BATCH, 404),
        ("kp1/demo-v9/dcx/tok-1/json/4", BATCH, 404),
        ("not-kp/at/all", BATCH, 404),
    ];
    for (path, payload, expected) in cases {
        let (code, body) = curl(&["-X", "POST", "--data", payload, &url(http, path)]);
        assert_eq!(code, expected, "{path}: {body}");
        assert_eq!(error_code(&body), u64::from(expected), "{path}");
    }
    // Over the body limit, by Content-Length and chunked.
    let big = "1".repeat(2000);
    let target = url(http, "kp1/demo-v1/dcx/tok-1/json/5");
    let (code, body) = curl(&["-X", "POST", "--data", &big, &target]);
    assert_eq!((code, error_code(&body)), (413, 413));
    let (code, body) =
        curl(&["-X", "POST", "-H", "Transfer-Encoding: chunked", "--data", &big, &target]);
    assert_eq!((code, error_code(&body)), (413, 413));
    // Other methods.
    let (code, body) = curl(&["-X", "DELETE", &target]);
    assert_eq!((code, error_code(&body)), (405, 405));
}

#[test]
fn client_credentials_are_checked() {
    let (_fg, http) = up();
    let target = url(http, "kp1/demo-v1/dcx/tok-1/json/1");
    let (code, _) = curl(&["-u", "device-1:s3cret", "--data", BATCH, &target]);
    assert_eq!(code, 204);
    let (code, body) = curl(&["-u", "device-1:wrong", "--data", BATCH, &target]);
    assert_eq!((code, error_code(&body)), (401, 401));
}
