//! Interoperability with real CoAP clients: libcoap's `coap-client-notls` (Debian
//! `libcoap3-bin`) and `aiocoap` (PyPI `aiocoap`), against the transport in front of the
//! compliance kit's scripted gateway.
//!
//! These tools must be installed (`apt-get install -y libcoap3-bin`, `pip install aiocoap`);
//! a missing tool fails the test with the command that installs it.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use fleetgate_transport_coap::CoapConfig;
use fleetgate_transport_core::compliance::ScriptedGateway;
use tokio::process::Command;

fn require(tool: &str, install: &str) -> String {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "`{tool}` is not installed; install it with `{install}`");
    tool.to_owned()
}

fn libcoap() -> String {
    require("coap-client-notls", "apt-get install -y libcoap3-bin")
}

fn python_with_aiocoap() -> String {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import aiocoap"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "python3 with aiocoap is not installed; install it with `pip install aiocoap`");
    "python3".to_owned()
}

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn run(program: &str, args: &[&str]) -> Output {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish in 30 s"))
        .expect("output");
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn server() -> (Arc<ScriptedGateway>, u16, fleetgate_transport_core::ShutdownHandle) {
    let gateway = Arc::new(ScriptedGateway::default());
    let (addr, _metrics, stop) = common::serve(gateway.clone(), CoapConfig::default()).await;
    (gateway, addr.port(), stop)
}

#[tokio::test]
async fn libcoap_posts_data_and_gets_2_04() {
    let tool = libcoap();
    let (gateway, port, _stop) = server().await;
    let uri = format!("coap://127.0.0.1:{port}/kp1/demo-v1/echo/tok-1/json/1");
    let out = run(&tool, &["-v", "7", "-m", "post", "-t", "json", "-e", "[{\"t\":1}]", &uri]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // At verbosity 7 libcoap logs the PDUs (on stdout, with the payload it prints).
    let ack = "t:ACK c:2.04 i:";
    assert!(out.stdout.contains(ack), "a piggybacked 2.04: {}", out.stdout);
    assert!(out.stdout.contains("process incoming 2.04 response:\n[{\"t\":1}]"), "{}", out.stdout);
    assert_eq!(gateway.requests(), 1);

    // An error: the code and the reason phrase as diagnostic payload.
    let uri = format!("coap://127.0.0.1:{port}/kp1/demo-v1/fail/tok-1/json/2");
    let out = run(&tool, &["-m", "post", "-e", "404", &uri]).await;
    assert!(out.stderr.contains("4.04 failed as asked"), "{}", out.stderr);
}

#[tokio::test]
async fn libcoap_sends_block_wise_and_reads_a_block_wise_answer() {
    let tool = libcoap();
    let (gateway, port, _stop) = server().await;
    let dir = std::env::temp_dir().join(format!("coap-block-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("payload.json");
    let payload: String = (0..3072).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    std::fs::write(&file, &payload).expect("write");
    let uri = format!("coap://127.0.0.1:{port}/kp1/demo-v1/echo/tok-1/json/3");
    let file_arg = file.to_string_lossy().into_owned();
    let out = run(&tool, &["-m", "post", "-b", "256", "-f", &file_arg, &uri]).await;
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(
        out.stdout.trim_end(),
        payload,
        "the echo of the 3 KiB payload, block-wise both ways"
    );
    assert_eq!(gateway.requests(), 1, "reassembled before it reached the backend");
}

#[tokio::test]
async fn libcoap_observes_pushes() {
    let tool = libcoap();
    let (gateway, port, _stop) = server().await;
    let uri = format!("coap://127.0.0.1:{port}/kp1/demo-v1/echo/tok-1/config/json");
    let pusher = gateway.clone();
    let pushes = tokio::spawn(async move {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            pusher.push("tok-1", "/config/json", b"{\"configId\":\"c7\"}");
        }
    });
    let out = run(&tool, &["-s", "3", "-w", &uri]).await;
    pushes.abort();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let notifications = out.stdout.matches("{\"configId\":\"c7\"}").count();
    assert!(notifications >= 2, "notifications received: {}", out.stdout);
}

#[tokio::test]
async fn aiocoap_client_posts_data() {
    let tool = require("aiocoap-client", "pip install aiocoap");
    let (gateway, port, _stop) = server().await;
    let uri = format!("coap://127.0.0.1:{port}/kp1/demo-v1/echo/tok-1/json/1");
    let out = run(&tool, &["-m", "POST", "--payload", "[{\"t\":1}]", &uri]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "[{\"t\":1}]");
    assert_eq!(gateway.requests(), 1);
    let uri = format!("coap://127.0.0.1:{port}/kp1/demo-v1/reject/tok-1/json/2");
    let out = run(&tool, &["-m", "POST", "--payload", "429", &uri]).await;
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(all.contains("4.29") && all.contains("rejected as asked"), "{all}");
}

const AIOCOAP_OBSERVE: &str = r#"
import asyncio, sys
import aiocoap

async def main():
    ctx = await aiocoap.Context.create_client_context()
    request = aiocoap.Message(code=aiocoap.GET, uri=sys.argv[1], observe=0)
    pr = ctx.request(request)
    first = await pr.response
    print("registered", first.code, first.opt.observe is not None, flush=True)
    count = 0
    async for note in pr.observation:
        print("notification", note.code, note.payload.decode(), flush=True)
        count += 1
        if count == 2:
            pr.observation.cancel()
            break
    await ctx.shutdown()

asyncio.run(asyncio.wait_for(main(), 20))
"#;

#[tokio::test]
async fn aiocoap_observes_pushes() {
    let python = python_with_aiocoap();
    let (gateway, port, _stop) = server().await;
    let uri = format!("coap://127.0.0.1:{port}/kp1/demo-v1/echo/tok-1/config/json");
    let pusher = gateway.clone();
    let pushes = tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            pusher.push("tok-1", "/config/json", b"{\"configId\":\"c8\"}");
        }
    });
    let out = run(&python, &["-c", AIOCOAP_OBSERVE, &uri]).await;
    pushes.abort();
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("registered 2.05 Content True"), "{}", out.stdout);
    assert_eq!(out.stdout.matches("notification 2.05 Content {\"configId\":\"c8\"}").count(), 2);
}
