//! Resource tests: bounded floods on loopback from spoofed-looking sources (every datagram from
//! a new address in 127.0.0.0/8), each asserting a memory or count bound and that a real
//! device (aiocoap, and the tests' own client) keeps being served meanwhile.
//!
//! The gateway behind the transport is the compliance kit's scripted one: `reject` refuses
//! before the bus as the gateway does for an unknown token, `echo` answers as an extension
//! would. RSS figures are printed (`--no-capture`) for BENCHMARKS.md and the closing note.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::{CoapClient, Req};
use fleetgate_transport_coap::CoapConfig;
use fleetgate_transport_coap::codec::{Code, Message, MessageType, MessageWriter, option};
use fleetgate_transport_core::compliance::ScriptedGateway;
use tokio::net::UdpSocket;
use tokio::process::Command;

/// The process's resident set, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// The `i`-th spoofed-looking source address: 127.1.0.0 and up, a free port.
fn source(i: u32) -> SocketAddr {
    let [_, _, a, b] = (0x0001_0000u32 + i).to_be_bytes();
    let hi = 1 + (i >> 16) as u8;
    SocketAddr::from((Ipv4Addr::new(127, hi, a, b), 0))
}

/// Sends `datagram(i)` once from each of `count` new source addresses.
async fn flood(server: SocketAddr, count: u32, datagram: impl Fn(u32) -> Vec<u8>) {
    for i in 0..count {
        let socket = UdpSocket::bind(source(i)).await.expect("bind a 127/8 address");
        socket.send_to(&datagram(i), server).await.expect("send");
        if i % 256 == 0 {
            tokio::task::yield_now().await;
        }
    }
}

fn encode(
    mtype: MessageType,
    code: Code,
    mid: u16,
    token: &[u8],
    options: &[(u16, Vec<u8>)],
    payload: &[u8],
) -> Vec<u8> {
    let mut out = BytesMut::new();
    let mut w = MessageWriter::new(&mut out, mtype, code, mid, token).expect("token");
    for (n, v) in options {
        w.option(*n, v).expect("option");
    }
    w.payload(payload);
    out.to_vec()
}

fn path_options(path: &str) -> Vec<(u16, Vec<u8>)> {
    path.split('/').map(|s| (option::URI_PATH, s.as_bytes().to_vec())).collect()
}

/// A POST with a token the gateway refuses (401 before the bus).
fn bad_token_post(i: u32) -> Vec<u8> {
    let options = path_options("kp1/demo-v1/reject/no-such-token/json");
    encode(MessageType::Confirmable, Code::POST, i as u16, &i.to_be_bytes(), &options, b"401")
}

fn require_aiocoap() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import aiocoap"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "python3 with aiocoap is not installed; install it with `pip install aiocoap`");
}

/// One aiocoap client context (one source address) that POSTs a small record, then a 3 KiB
/// one (block-wise), `rounds` times; prints each answer's code and payload size.
const AIOCOAP_DEVICE: &str = r#"
import asyncio, sys
import aiocoap

async def main():
    ctx = await aiocoap.Context.create_client_context()
    base = sys.argv[1]
    for i in range(int(sys.argv[2])):
        for payload in (b'[{"t":1}]', b'x' * 3072):
            req = aiocoap.Message(code=aiocoap.POST, uri=base, payload=payload)
            resp = await asyncio.wait_for(ctx.request(req).response, 30)
            print(resp.code, len(resp.payload), flush=True)
    await ctx.shutdown()

asyncio.run(main())
"#;

/// Runs the aiocoap device against `server`; panics unless every answer is 2.04 with the echo.
async fn aiocoap_device(server: SocketAddr, rounds: u32) {
    let uri = format!("coap://127.0.0.1:{}/kp1/demo-v1/echo/tok-1/json", server.port());
    let child = Command::new("python3")
        .args(["-c", AIOCOAP_DEVICE, &uri, &rounds.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("aiocoap finishes")
        .expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let mut expected = String::new();
    for _ in 0..rounds {
        expected.push_str("2.04 Changed 9\n2.04 Changed 3072\n");
    }
    assert_eq!(stdout, expected, "the device's every request is answered");
}

/// Our own client, from one address, posts in a loop until `stop`; every answer must be 2.04.
async fn steady_device(server: SocketAddr, stop: Arc<tokio::sync::Notify>) -> u32 {
    let mut client = CoapClient::new(server).await;
    let mut served = 0;
    loop {
        let answer = client
            .exchange(Req::post("kp1/demo-v1/echo/tok-1/json/1", b"[1]"), Duration::from_secs(5))
            .await
            .expect("the device is answered during the flood");
        assert_eq!(answer.code(), Code::CHANGED, "{:?}", answer.payload());
        served += 1;
        tokio::select! {
            () = stop.notified() => return served,
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_datagram_from_each_of_20000_new_addresses_keeps_a_bounded_pool() {
    require_aiocoap();
    let gateway = Arc::new(ScriptedGateway::default());
    // `max_sessions` below the flood: spoofed senders must not be what fills it.
    let config = CoapConfig { max_sessions: 2_000, max_unproven_peers: 256, ..Default::default() };
    let (server, metrics, _stop) = common::serve(gateway.clone(), config).await;
    let before = rss_kib();
    let stop = Arc::new(tokio::sync::Notify::new());
    let steady = tokio::spawn(steady_device(server, stop.clone()));
    let flooding = tokio::spawn(flood(server, 20_000, bad_token_post));
    aiocoap_device(server, 2).await;
    flooding.await.expect("flood");
    aiocoap_device(server, 1).await;
    stop.notify_one();
    let served = steady.await.expect("steady device");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib();
    let open = metrics.sessions_open.get();
    eprintln!(
        "20,000 new source addresses: RSS {before} -> {after} KiB (+{} KiB); peers open {open}, \
         evicted {}, steady device served {served} times",
        after.saturating_sub(before),
        metrics.unproven_evicted.get()
    );
    assert!(open <= 256 + 4, "peers with state after the flood: {open}");
    assert!(metrics.unproven_evicted.get() >= 19_000, "{}", metrics.text());
    assert_eq!(metrics.sessions_over_limit.get(), 0, "no device got 5.03 for lack of room");
    assert!(served >= 5, "the steady device was served throughout ({served})");
    // main kept one peer and one gateway session per address: +173 MB for 20,000.
    assert!(after.saturating_sub(before) < 32 * 1024, "RSS grew {before} -> {after} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block1_starts_declaring_64_kib_from_many_sources_stay_within_the_budget() {
    require_aiocoap();
    let gateway = Arc::new(ScriptedGateway::default());
    let (server, metrics, _stop) = common::serve(gateway, CoapConfig::default()).await;
    let block = vec![b'b'; 1024];
    let start = move |i: u32| {
        let mut options = path_options("kp1/demo-v1/reject/no-such-token/json");
        // Block1 NUM 0, M, SZX 6 (1024 bytes); Size1 64 KiB.
        options.push((option::BLOCK1, vec![0x0E]));
        options.push((option::SIZE1, 65_536u32.to_be_bytes()[1..].to_vec()));
        options.sort_by_key(|(n, _)| *n);
        encode(MessageType::Confirmable, Code::POST, i as u16, &i.to_be_bytes(), &options, &block)
    };
    let before = rss_kib();
    let flooding = tokio::spawn(flood(server, 2_000, start));
    // A device that proves its token first uploads block-wise even while the budget is spent.
    aiocoap_device(server, 2).await;
    flooding.await.expect("flood");
    aiocoap_device(server, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib();
    let refused = metrics.block1_budget_refusals.get();
    eprintln!(
        "2,000 Block1 starts declaring 64 KiB: RSS {before} -> {after} KiB (+{} KiB); \
         refused over budget {refused}",
        after.saturating_sub(before)
    );
    // 1024 unproven peers at most, 256 KiB of blocks among them: most starts are refused.
    assert!(refused >= 1_000, "{}", metrics.text());
    // main allocated the declared 64 KiB per start: +131 MB for 2,000.
    assert!(after.saturating_sub(before) < 24 * 1024, "RSS grew {before} -> {after} KiB");
}

/// Requests an unproven source may send, small and malformed-ish, each answered by the
/// transport itself.
fn reflection_probes() -> Vec<(&'static str, Vec<u8>)> {
    let con = MessageType::Confirmable;
    let non = MessageType::NonConfirmable;
    vec![
        // The 4-byte GET that got 52 bytes: no path, no token.
        ("bare GET", encode(con, Code::GET, 1, b"", &[], b"")),
        ("bare NON GET", encode(non, Code::GET, 2, b"", &[], b"")),
        ("bare POST", encode(con, Code::POST, 3, b"", &[], b"")),
        ("DELETE", encode(con, Code::DELETE, 4, b"", &[], b"")),
        ("Proxy-Uri", encode(con, Code::GET, 5, b"", &[(option::PROXY_URI, b"x".to_vec())], b"")),
        ("unknown critical option", encode(con, Code::GET, 6, b"", &[(13, b"x".to_vec())], b"")),
        (
            "bad token",
            encode(con, Code::POST, 7, b"t", &path_options("kp1/demo-v1/reject/x/json"), b"401"),
        ),
        (
            "later Block2 block",
            encode(
                con,
                Code::GET,
                8,
                b"",
                &[path_options("kp1/a/echo/t/json"), vec![(option::BLOCK2, vec![0x16])]].concat(),
                b"",
            ),
        ),
        (
            "Block1 out of order",
            encode(
                con,
                Code::POST,
                9,
                b"",
                &[path_options("kp1/a/echo/t/json"), vec![(option::BLOCK1, vec![0x1E])]].concat(),
                &[0u8; 1024],
            ),
        ),
        ("garbage", vec![0x40, 0x01, 0x00]),
        ("ping", vec![0x40, 0x00, 0x00, 0x0A]),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_to_unproven_sources_are_never_larger_than_their_requests() {
    require_aiocoap();
    let gateway = Arc::new(ScriptedGateway::default());
    let (server, metrics, _stop) = common::serve(gateway, CoapConfig::default()).await;
    let (mut sent, mut reflected) = (0usize, 0usize);
    for (n, (what, probe)) in reflection_probes().into_iter().enumerate() {
        for i in 0..50u32 {
            let socket = UdpSocket::bind(source(n as u32 * 100 + i)).await.expect("bind");
            socket.send_to(&probe, server).await.expect("send");
            sent += probe.len();
            let mut buf = [0u8; 2048];
            // Every datagram the source gets in the next moments (retransmissions included).
            while let Ok(Ok((len, _))) =
                tokio::time::timeout(Duration::from_millis(150), socket.recv_from(&mut buf)).await
            {
                assert!(
                    len <= probe.len(),
                    "{what}: {} bytes answered with {len}: {:?}",
                    probe.len(),
                    Message::decode(bytes::Bytes::copy_from_slice(&buf[..len])).map(|m| m.code())
                );
                reflected += len;
            }
            if i >= 2 {
                // A few of each kind are enough for the ratio; the rest only add time.
                break;
            }
        }
    }
    eprintln!(
        "reflection: {sent} bytes sent from unproven sources, {reflected} answered \
         (ratio {:.2}); trimmed {}",
        reflected as f64 / sent as f64,
        metrics.replies_trimmed.get()
    );
    assert!(reflected <= sent);
    assert!(metrics.replies_trimmed.get() > 0, "diagnostic payloads were cut");
    // A real device is served in full, its answers as large as they need to be.
    aiocoap_device(server, 1).await;
}
