//! End to end, the load generator's results against a real `fleetgate up` on a real NATS server
//! (fleetgate in this test's process, the generator in-process or as its binary): two runs at
//! once each count only their own messages and merge into one result; a run without
//! auto-registration shows why everything was lost; SIGINT writes a partial result; `--fail-if`
//! decides the exit status.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Parser;
use fleetgate_benches::loadgen::{LoadgenArgs, run};
use fleetgate_benches::report::Report;

mod support;

use support::{Cli, Gateway};

impl Gateway {
    /// Generator arguments for an MQTT run against this gateway (rates, steps to add).
    fn mqtt_args(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "--mqtt",
            &self.mqtt.to_string(),
            "--nats-url",
            &self.nats.url(),
            "--devices",
            "10",
            "--connect-rate",
            "1000",
            "--workers",
            "2",
            "--quiet",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    }
}

fn parse(args: &[String]) -> LoadgenArgs {
    Cli::parse_from(std::iter::once("loadgen".to_owned()).chain(args.iter().cloned())).args
}

fn read_report(path: &Path) -> Report {
    serde_json::from_str(&std::fs::read_to_string(path).expect("the result is written"))
        .expect("the result reads back")
}

fn loadgen_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fleetgate-loadgen"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_runs_each_count_only_their_own_and_merge() {
    let gw = Gateway::start(true).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (out_a, out_b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    let steps = ["--rates", "100,100", "--step-secs", "1", "--drain-secs", "5"];
    let a = parse(
        &gw.mqtt_args(
            &[
                &steps[..],
                &["--qos", "1", "--token-prefix", "run-a-", "--out", out_a.to_str().unwrap()],
            ]
            .concat(),
        ),
    );
    let b = parse(
        &gw.mqtt_args(
            &[
                &steps[..],
                &["--qos", "1", "--token-prefix", "run-b-", "--out", out_b.to_str().unwrap()],
            ]
            .concat(),
        ),
    );
    let (ra, rb) =
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(run(&a), run(&b)) })
            .await
            .expect("both runs end by themselves");
    let (ra, rb) = (ra.expect("run a"), rb.expect("run b"));
    assert_ne!(ra.run_id, rb.run_id);
    for r in [&ra, &rb] {
        let t = &r.totals;
        assert_eq!((t.sent, t.acked), (200, 200), "{t:?}");
        // Each counts its own 200, not the other's: before run ids, each saw ~400.
        assert_eq!((t.delivered, t.lost), (200, 0), "{t:?}");
        assert_eq!(t.latency.count, 200);
        assert!(r.other_run_deliveries > 0, "the runs overlapped: {}", r.other_run_deliveries);
        assert_eq!(r.foreign_deliveries, 0);
        // Every PUBACK was timed: the device's round trip beside device → NATS.
        assert_eq!(t.rtt.count, 200, "{:?}", t.rtt);
        assert!(t.rtt.p99_us > 0 && t.rtt.p99_us < 5_000_000, "{:?}", t.rtt);
        assert!(t.failures.is_empty(), "{:?}", t.failures);
    }

    // The library merge: counts add up, percentiles come from the merged histograms.
    let (fa, fb) = (read_report(&out_a), read_report(&out_b));
    let m = fleetgate_benches::merge::merge(&[fa, fb]).expect("compatible results");
    assert_eq!(m.settings.devices, 20);
    assert_eq!(m.steps.iter().map(|s| s.offered_rate).collect::<Vec<_>>(), vec![200, 200]);
    for (i, s) in m.steps.iter().enumerate() {
        assert_eq!(s.sent, ra.steps[i].sent + rb.steps[i].sent);
        assert_eq!(s.delivered, ra.steps[i].delivered + rb.steps[i].delivered);
        assert_eq!(s.latency.count, ra.steps[i].latency.count + rb.steps[i].latency.count);
    }
    let t = &m.totals;
    assert_eq!((t.sent, t.delivered, t.lost, t.acked, t.rtt.count), (400, 400, 0, 400, 400));
    let (lo, hi) = (
        ra.totals.latency.p50_us.min(rb.totals.latency.p50_us),
        ra.totals.latency.p50_us.max(rb.totals.latency.p50_us),
    );
    assert!((lo..=hi).contains(&t.latency.p50_us), "{lo} ≤ {} ≤ {hi}", t.latency.p50_us);
    assert_eq!(t.latency.max_us, ra.totals.latency.max_us.max(rb.totals.latency.max_us));

    // The same through the binary's merge subcommand, with its files and thresholds.
    let merged = dir.path().join("all.json");
    let status = loadgen_bin()
        .args(["merge", "--quiet", "--fail-if", "delivered!=400", "--out"])
        .arg(&merged)
        .args([&out_a, &out_b])
        .stdout(Stdio::null())
        .status()
        .expect("the merge runs");
    assert_eq!(status.code(), Some(0));
    let back = read_report(&merged);
    assert_eq!((back.totals.sent, back.totals.delivered), (400, 400));
    assert_eq!(back.thresholds.len(), 1);
    assert!(!back.thresholds[0].failed);
    let html = std::fs::read_to_string(merged.with_extension("html")).expect("html written");
    assert!(html.contains(&ra.run_id) && html.contains(&rb.run_id));
    assert!(std::fs::read_to_string(merged.with_extension("csv")).expect("csv").contains("total,"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_register_the_reason_for_the_loss_is_shown() {
    let gw = Gateway::start(false).await;
    // MQTT at QoS 0 without request ids: the gateway still answers on `/error`.
    let mqtt = parse(&gw.mqtt_args(&["--rates", "50", "--step-secs", "1"]));
    let r = tokio::time::timeout(Duration::from_secs(30), run(&mqtt))
        .await
        .expect("the run ends")
        .expect("the run is done");
    let t = &r.totals;
    assert_eq!(t.sent, 50);
    assert_eq!((t.delivered, t.lost), (0, 50), "{t:?}");
    assert_eq!(t.failures.get("mqtt /error 401"), Some(&50), "{:?}", t.failures);
    let why = r.failure_examples.get("mqtt /error 401").expect("the reason given");
    assert!(!why.is_empty());
    let table = fleetgate_benches::loadgen::summary_table(&r);
    assert!(table.contains("failure: mqtt /error 401 ×50"), "{table}");

    // Live: the binary's once-a-second progress line names the failures as they happen.
    let args: Vec<String> = gw
        .mqtt_args(&["--rates", "50,50", "--step-secs", "1"])
        .into_iter()
        .filter(|a| a != "--quiet")
        .collect();
    let output = tokio::task::block_in_place(|| {
        loadgen_bin().args(&args).stdout(Stdio::null()).output().expect("the generator runs")
    });
    let stderr = String::from_utf8_lossy(&output.stderr);
    let live = stderr.lines().find(|l| l.starts_with('[') && l.contains("step 1/2"));
    let live = live.unwrap_or_else(|| panic!("no progress line in {stderr}"));
    assert!(live.contains("failures") && live.contains("mqtt /error 401 ×"), "{live}");
    assert!(
        stderr.contains("unknown endpoint token") || stderr.contains("failure: mqtt /error 401")
    );

    // MQTT 5 at QoS 1: fleetgate refuses with `/error` and a PUBACK with the reason code; the
    // refusal counts once, by its `/error`.
    let v5 = parse(&gw.mqtt_args(&[
        "--rates",
        "50",
        "--step-secs",
        "1",
        "--qos",
        "1",
        "--mqtt-version",
        "5",
    ]));
    let r = tokio::time::timeout(Duration::from_secs(30), run(&v5))
        .await
        .expect("the run ends")
        .expect("the run is done");
    let t = &r.totals;
    assert_eq!((t.sent, t.acked, t.ack_errors, t.delivered), (50, 50, 50, 0), "{t:?}");
    assert_eq!(t.failures.get("mqtt /error 401"), Some(&50), "{:?}", t.failures);
    assert_eq!(t.failure_count(), 50, "{:?}", t.failures);

    // HTTP: the status of every response.
    let http_addr = gw.http.to_string();
    let http = parse(&gw.mqtt_args(&[
        "--transport",
        "http",
        "--http",
        &http_addr,
        "--rates",
        "50",
        "--step-secs",
        "1",
    ]));
    let r = tokio::time::timeout(Duration::from_secs(30), run(&http))
        .await
        .expect("the run ends")
        .expect("the run is done");
    let t = &r.totals;
    assert_eq!((t.sent, t.acked, t.ack_errors, t.delivered), (50, 50, 50, 0), "{t:?}");
    assert_eq!(t.failures.get("http 401"), Some(&50), "{:?}", t.failures);
    assert_eq!(t.rtt.count, 50, "responses are timed too");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_writes_a_partial_result() {
    signal_writes_a_partial_result("INT", 130).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_writes_a_partial_result() {
    signal_writes_a_partial_result("TERM", 143).await;
}

async fn signal_writes_a_partial_result(signal: &str, exit: i32) {
    let name = format!("SIG{signal}");
    let gw = Gateway::start(true).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("run.json");
    let mut child = loadgen_bin()
        .args(gw.mqtt_args(&[
            "--qos",
            "1",
            "--rates",
            "100,100",
            "--step-secs",
            "30",
            "--drain-secs",
            "5",
        ]))
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the generator starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let connected = tokio::task::spawn_blocking(move || {
        let first = lines.next();
        (first, lines)
    });
    let (first, mut lines) = tokio::time::timeout(Duration::from_secs(20), connected)
        .await
        .expect("connects in time")
        .expect("reader");
    let first = first.expect("a line").expect("text");
    assert!(first.contains("\"event\":\"connected\""), "{first}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let kill = Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status();
    assert!(kill.expect("kill runs").success());
    let status = tokio::task::spawn_blocking(move || {
        let done = lines.next().and_then(Result::ok).unwrap_or_default();
        (child.wait(), done)
    });
    let (status, done) =
        tokio::time::timeout(Duration::from_secs(30), status).await.expect("exits").expect("waits");
    assert_eq!(status.expect("exit status").code(), Some(exit), "{done}");
    assert!(done.contains(&format!("\"interrupted\":\"{name}\"")), "{done}");

    let r = read_report(&out);
    assert_eq!(r.interrupted.as_deref(), Some(name.as_str()));
    assert_eq!(r.steps.len(), 1, "only the step that ran");
    let s = &r.steps[0];
    assert!(s.seconds > 1.5 && s.seconds < 10.0, "{}", s.seconds);
    assert!(s.sent >= 150 && s.sent <= 1000, "{s:?}");
    assert_eq!((s.delivered, s.lost, s.acked), (s.sent, 0, s.sent), "drained: {s:?}");
    assert_eq!(r.totals.sent, s.sent);
    assert!(!r.timeline.is_empty());
    let html = std::fs::read_to_string(out.with_extension("html")).expect("html written");
    assert!(html.contains("Partial result") && html.contains(&name));
    assert!(out.with_extension("csv").exists() && out.with_extension("svg").exists());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_if_sets_the_exit_code() {
    let gw = Gateway::start(true).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let me = std::process::id().to_string();
    let run_with = |name: &str, thresholds: &[&str]| {
        let out = dir.path().join(format!("{name}.json"));
        let mut cmd = loadgen_bin();
        let watch = format!("gw={me}");
        cmd.args(gw.mqtt_args(&[
            "--rates",
            "100",
            "--step-secs",
            "1",
            "--qos",
            "1",
            "--watch",
            &watch,
        ]));
        for t in thresholds {
            cmd.args(["--fail-if", t]);
        }
        let status = cmd.arg("--out").arg(&out).stdout(Stdio::null()).status().expect("runs");
        (status.code(), read_report(&out))
    };
    let pass = ["p99_ms>100000", "lost!=0", "failures>0"];
    let (code, r) = tokio::task::block_in_place(|| run_with("pass", &pass));
    assert_eq!(code, Some(0), "{:?}", r.thresholds);
    assert!(r.thresholds.iter().all(|t| !t.failed) && r.thresholds.len() == 3);
    // The watched process (this test, which runs fleetgate) shows in every step.
    assert!(r.steps.iter().all(|s| s.processes.iter().any(|p| p.name == "gw")));
    let (code, r) =
        tokio::task::block_in_place(|| run_with("fail", &["p99_ms>100000", "delivered<1000000"]));
    assert_eq!(code, Some(1), "{:?}", r.thresholds);
    assert_eq!(r.thresholds.iter().map(|t| t.failed).collect::<Vec<_>>(), vec![false, true]);
    assert_eq!(r.thresholds[1].value, Some(100.0));
    gw.stop().await;
}
