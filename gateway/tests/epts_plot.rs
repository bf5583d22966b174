//! The EPTS plot page in a real browser: headless Chromium (Debian's `chromium`, driven by
//! playwright-core from `backend/epts/tests/browser`) opens the page of a `fleetgate up`, a
//! device sends samples over MQTT, and the plotted points appear (live, without a reload). The
//! screenshot is kept at `<target>/tmp/epts-plot.png`.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::{Fleetgate, demo_endpoint_env, rumqttc_request};

const POINTS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plotted_points_appear_live() {
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../backend/epts/tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").exists(),
        "playwright-core is missing: npm --prefix backend/epts/tests/browser install (scripts/test does)"
    );
    let fg = Fleetgate::start("up", &demo_endpoint_env());
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("epts-plot.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut node = Command::new("node")
        .arg(browser_dir.join("plot.mjs"))
        .arg(format!("http://{}/epts/plot", fg.admin))
        .arg(&screenshot)
        .arg(POINTS.to_string())
        .arg("45000")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node runs (scripts/test installs it)");
    let (lines_tx, lines) = mpsc::channel();
    let stdout = node.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let first = lines.recv_timeout(Duration::from_secs(45)).expect("the page opens");
    assert_eq!(first, "page-open");

    // Samples arrive while the page is open; one request each, so each has its own time.
    for i in 0..POINTS {
        let sample = format!(r#"{{"temperature":{}}}"#, 20 + i);
        let topic = format!("kp1/demo-v1/dcx/tok-1/json/{}", i + 1);
        let p = rumqttc_request(fg.mqtt, None, &topic, sample.as_bytes()).await;
        assert_eq!(p.topic, format!("{topic}/status"));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    let done = lines.recv_timeout(Duration::from_secs(50)).expect("the points are plotted in time");
    let status = node.wait().unwrap();
    assert!(status.success(), "the browser script failed: {done}");
    assert!(done.starts_with(&format!("plotted {POINTS} ")), "{done}");
    assert!(screenshot.exists(), "screenshot at {}", screenshot.display());
    eprintln!("screenshot: {}", screenshot.display());
}
