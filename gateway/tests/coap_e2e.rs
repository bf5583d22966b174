//! `fleetgate up` driven over CoAP by real clients: libcoap's `coap-client-notls` (Debian
//! `libcoap3-bin`) and `aiocoap-client` (PyPI `aiocoap`) POST 2/DCP data and get 2.04; the
//! error codes of DESIGN decision 3 that a device can reach come back as CoAP codes with the
//! reason phrase as diagnostic payload; on NATS, each message appears as `ClientData` and as a
//! `DataSamplesEvent`.
//!
//! The clients must be installed (`apt-get install -y libcoap3-bin`, `pip install aiocoap`); a
//! missing one fails the test with the command that installs it.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use fleetgate_messages::{ClientData, DataSamplesEvent, Record};
use fleetgate_testkit::NatsServer;
use support::{Fleetgate, NatsObserver, demo_endpoint_env};

const BATCH: &str = r#"[{"t":1}]"#;

fn require(tool: &str, install: &str) -> &'static str {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "`{tool}` is not installed; install it with `{install}`");
    Box::leak(tool.to_owned().into_boxed_str())
}

fn libcoap() -> &'static str {
    require("coap-client-notls", "apt-get install -y libcoap3-bin")
}

/// Runs a client; returns (exit code, stdout + stderr).
fn run(program: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(program).args(args).output().expect("client runs");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

/// `coap-client-notls` at verbosity 7 logs every PDU: the code of the response to the request.
fn libcoap_post(fg: &Fleetgate, path: &str, payload: &str) -> (String, String) {
    let uri = format!("coap://{}/{path}", fg.coap);
    // -B: give up after 10 s rather than libcoap's 90.
    let (code, text) =
        run(libcoap(), &["-v", "7", "-B", "10", "-m", "post", "-t", "json", "-e", payload, &uri]);
    assert_eq!(code, Some(0), "{text}");
    let response = text
        .lines()
        .find(|l| {
            l.starts_with("v:1 t:ACK") || (l.starts_with("v:1 t:CON") && !l.contains("c:POST"))
        })
        .unwrap_or_else(|| panic!("no response logged:\n{text}"));
    let code = response.split(" c:").nth(1).and_then(|r| r.split(' ').next()).unwrap_or("");
    (code.to_owned(), text)
}

fn up(extra: &[(&'static str, String)]) -> Fleetgate {
    let mut env = demo_endpoint_env();
    env.extend_from_slice(extra);
    Fleetgate::start("up", &env)
}

#[test]
fn libcoap_posts_a_batch_and_gets_2_04() {
    let fg = up(&[]);
    let (code, text) = libcoap_post(&fg, "kp1/demo-v1/dcx/tok-1/json/1", BATCH);
    assert_eq!(code, "2.04", "{text}");
    // Without a request id the confirmable request is answered all the same.
    let (code, text) = libcoap_post(&fg, "kp1/demo-v1/dcx/tok-1/json", BATCH);
    assert_eq!(code, "2.04", "{text}");
    // Non-confirmable: a non-confirmable 2.04.
    let uri = format!("coap://{}/kp1/demo-v1/dcx/tok-1/json/2", fg.coap);
    let (status, text) =
        run(libcoap(), &["-v", "7", "-B", "10", "-N", "-m", "post", "-e", BATCH, &uri]);
    assert_eq!(status, Some(0), "{text}");
    assert!(text.contains("t:NON c:2.04"), "{text}");
    assert_eq!(fg.metric("fleetgate_dcx_samples_total"), Some(3.0));
    assert_eq!(
        fg.metric("fleetgate_transport_messages_received_total{transport=\"coap\"}"),
        Some(3.0)
    );
}

#[test]
fn error_codes_reach_libcoap_with_the_reason_phrase() {
    let fg = up(&[]);
    let cases = [
        ("kp1/demo-v1/dcx/no-such-token/json/1", BATCH, "4.01"),
        ("kp1/demo-v1/nothing/tok-1/json/1", BATCH, "4.04"),
        ("kp1/other-v9/dcx/tok-1/json/1", BATCH, "4.04"),
        ("kp2/demo-v1/dcx/tok-1/json/1", BATCH, "4.04"),
        ("kp1/demo-v1/dcx/tok-1/json/1", "{not json", "4.00"),
    ];
    for (path, payload, expected) in cases {
        let (code, text) = libcoap_post(&fg, path, payload);
        assert_eq!(code, expected, "{path}: {text}");
        // libcoap prints an error response as `<code> <diagnostic payload>`.
        let printed = text.lines().find(|l| l.starts_with(expected)).unwrap_or("");
        assert!(printed.len() > expected.len() + 1, "a reason phrase for {path}: {text}");
    }
}

#[test]
fn aiocoap_client_posts_a_batch_and_gets_2_04() {
    let tool = require("aiocoap-client", "pip install aiocoap");
    let fg = up(&[]);
    let uri = format!("coap://{}/kp1/demo-v1/dcx/tok-1/json/1", fg.coap);
    // -v logs the response code.
    let (status, text) = run(tool, &["-v", "-m", "POST", "--payload", BATCH, &uri]);
    assert_eq!(status, Some(0), "{text}");
    assert!(text.contains("2.04 Changed"), "{text}");
    let uri = format!("coap://{}/kp1/demo-v1/dcx/no-such-token/json/1", fg.coap);
    let (_, text) = run(tool, &["-m", "POST", "--payload", BATCH, &uri]);
    assert!(text.contains("4.01 Unauthorized"), "{text}");
    assert_eq!(fg.metric("fleetgate_dcx_samples_total"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coap_data_appears_on_nats_as_client_data_and_a_samples_event() {
    let nats = NatsServer::start();
    let mut observer = NatsObserver::connect(&nats.url()).await;
    let mut env = demo_endpoint_env();
    env.push(("FLEETGATE_NATS_URL", nats.url()));
    let fg = Fleetgate::start("up", &env);
    let path = "kp1/demo-v1/dcx/tok-1/json/42";
    let (code, text) = tokio::task::block_in_place(|| libcoap_post(&fg, path, BATCH));
    assert_eq!(code, "2.04", "{text}");
    let msg = observer.client_data().await;
    let data = ClientData::decode(&msg.payload).expect("ClientData decodes");
    assert_eq!(data.endpoint_id, Some("ep-1"));
    assert_eq!(data.resource_path, "/json");
    assert_eq!(data.request_id, Some(42));
    assert_eq!(data.payload, BATCH.as_bytes());
    let msg = observer.samples_event().await;
    let event = DataSamplesEvent::decode(&msg.payload).expect("DataSamplesEvent decodes");
    assert_eq!(event.endpoint_id, "ep-1");
    assert_eq!(event.data_samples, [&br#"{"t":1}"#[..]]);
    assert!(observer.drain_samples(Duration::from_millis(200)).await.is_empty(), "exactly one");
}
