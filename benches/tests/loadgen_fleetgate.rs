//! End to end: the load generator against a real `fleetgate up` on a real NATS server, for
//! two seconds at a low rate, QoS 1 with request ids, so every count can be checked exactly.
//! fleetgate runs in this test's process (`fleetgate::run::run_until`).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use fleetgate::config::Config;
use fleetgate::run::{Role, run_until};
use fleetgate_benches::loadgen::{LoadgenArgs, run};
use fleetgate_benches::report::Report;
use fleetgate_testkit::{NatsServer, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: LoadgenArgs,
}

async fn ready(admin: SocketAddr) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(admin).await else { return false };
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.is_err() {
        return false;
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text).await;
    text.starts_with("HTTP/1.1 200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_counts_every_message_through_fleetgate_on_nats() {
    let nats = NatsServer::start();
    let mqtt = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut config = Config::default();
    config.nats.url = Some(nats.url());
    config.transports.mqtt.listen = mqtt;
    config.admin.listen = admin;
    config.auth.auto_register = true;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let gateway = tokio::spawn(run_until(Role::Up, config, async {
        let _ = stop_rx.await;
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !ready(admin).await {
        assert!(!gateway.is_finished(), "fleetgate stopped at start-up");
        assert!(tokio::time::Instant::now() < deadline, "fleetgate not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

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

    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), gateway).await;
}
