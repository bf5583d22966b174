//! End to end: the load generator against a real `fleetgate up` on a real NATS server, for
//! two seconds at a low rate, so every count can be checked exactly: MQTT devices at QoS 1 with
//! request ids, CoAP devices (CON), HTTP devices and FGU/1 (custom UDP) devices. fleetgate runs in this test's process
//! (`fleetgate::run::run_until`), every listener on a free port.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use clap::Parser;
use fleetgate_benches::loadgen::run;
use fleetgate_benches::report::Report;

mod support;

use support::{Cli, Gateway};

/// 20 CoAP or HTTP devices, 100 then 200 msg/s for a second each: every message sent is
/// acknowledged without error and delivered on NATS, and no device is lost.
async fn short_run_delivers_and_acknowledges_everything(transport: &str, qos: &str) {
    let gw = Gateway::start(true).await;
    let (coap, http, nats_url) = (gw.coap.to_string(), gw.http.to_string(), gw.nats.url());
    let udp = gw.udp.to_string();
    let cli = Cli::parse_from([
        "loadgen",
        "--transport",
        transport,
        "--coap",
        &coap,
        "--http",
        &http,
        "--udp",
        &udp,
        "--udp-public-key",
        &gw.udp_key,
        "--nats-url",
        &nats_url,
        "--devices",
        "20",
        "--source-ips",
        "127.0.0.1-127.0.0.3",
        "--connect-rate",
        "1000",
        "--rates",
        "100,200",
        "--step-secs",
        "1",
        "--qos",
        qos,
        "--drain-secs",
        "5",
        "--workers",
        "2",
        "--quiet",
    ]);
    let report = tokio::time::timeout(Duration::from_secs(30), run(&cli.args))
        .await
        .expect("the run ends by itself")
        .expect("the run succeeds");
    assert_eq!(report.settings.transport, transport);
    assert_eq!(report.connect.connected, 20, "{:?}", report.connect);
    let t = &report.totals;
    assert_eq!((t.sent, t.skipped, t.backpressure_window, t.backpressure_buffer), (300, 0, 0, 0));
    assert_eq!((t.acked, t.ack_errors), (300, 0), "{t:?}");
    // Every acknowledgement (CoAP response, HTTP response) was timed.
    assert_eq!(t.rtt.count, 300, "{:?}", t.rtt);
    assert_eq!((t.delivered, t.lost), (300, 0), "{t:?}");
    assert_eq!(report.foreign_deliveries, 0);
    assert_eq!(t.latency.count, 300);
    assert_eq!(report.connections_lost, 0);
    for (step, rate) in report.steps.iter().zip([100, 200]) {
        assert_eq!(step.delivered, rate, "per-step attribution: {step:?}");
    }
    assert_eq!(report.msr.as_ref().map(|m| m.rate), Some(200));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coap_devices_are_acknowledged_and_delivered() {
    short_run_delivers_and_acknowledges_everything("coap", "1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_devices_are_acknowledged_and_delivered() {
    short_run_delivers_and_acknowledges_everything("udp", "1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_devices_are_answered_and_delivered() {
    // QoS 0: HTTP answers every request all the same.
    short_run_delivers_and_acknowledges_everything("http", "0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_counts_every_message_through_fleetgate_on_nats() {
    let gw = Gateway::start(true).await;
    let (nats, mqtt) = (&gw.nats, gw.mqtt);

    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("run.json");
    let mqtt_arg = mqtt.to_string();
    let nats_url = nats.url();
    let out_arg = out.display().to_string();
    let cli = Cli::parse_from([
        "loadgen",
        "--target",
        "fleetgate",
        "--mqtt",
        &mqtt_arg,
        "--nats-url",
        &nats_url,
        "--devices",
        "20",
        "--source-ips",
        "127.0.0.1-127.0.0.3",
        "--connect-rate",
        "1000",
        "--rates",
        "100,200",
        "--step-secs",
        "1",
        "--qos",
        "1",
        "--request-ids",
        "--drain-secs",
        "5",
        "--workers",
        "2",
        "--quiet",
        "--out",
        &out_arg,
    ]);
    let report = tokio::time::timeout(Duration::from_secs(30), run(&cli.args))
        .await
        .expect("the run ends by itself")
        .expect("the run succeeds");

    assert_eq!(report.connect.connected, 20, "{:?}", report.connect);
    let t = &report.totals;
    assert_eq!(report.steps.len(), 2);
    assert_eq!(t.scheduled, 300, "{t:?}");
    assert_eq!((t.sent, t.skipped, t.backpressure_window, t.backpressure_buffer), (300, 0, 0, 0));
    assert_eq!(t.acked, 300, "{t:?}");
    assert_eq!(t.rtt.count, 300, "every PUBACK timed: {:?}", t.rtt);
    assert_eq!(t.responded, 300, "{t:?}");
    assert_eq!(t.errors, 0);
    assert_eq!(t.delivered, 300, "{t:?}");
    assert_eq!(t.lost, 0);
    assert_eq!(report.foreign_deliveries, 0);
    assert_eq!(t.latency.count, 300);
    assert!(t.latency.p99_us > 0 && t.latency.p99_us < 1_000_000, "{:?}", t.latency);
    for (step, rate) in report.steps.iter().zip([100, 200]) {
        assert_eq!(step.delivered, rate, "per-step attribution: {step:?}");
    }
    assert_eq!(report.msr.as_ref().map(|m| m.rate), Some(200));

    // The files: the JSON reads back, the SVG is there.
    let back: Report =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("json written")).expect("json");
    // (Floats may differ in the last digit: serde_json parses them fast, not exactly.)
    assert_eq!((back.totals.delivered, back.totals.acked), (300, 300));
    assert_eq!(back.msr, report.msr);
    let svg = std::fs::read_to_string(out.with_extension("svg")).expect("svg written");
    assert!(svg.contains("</svg>"));

    gw.stop().await;
}
