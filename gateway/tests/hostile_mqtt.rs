//! Issue 15, the MQTT part: bounded floods on loopback against `fleetgate up`, one test per
//! attack. Each asserts a bound (the process's memory, a count on `/metrics`) and that a real
//! device (paho-mqtt, `tests/clients/paho_device.py`) keeps being served while it runs.
//!
//! The attackers connect from other loopback addresses (127.0.x.y) than the device
//! (127.0.0.1), as they would from elsewhere on a network. Each test prints what the attack cost
//! (RSS growth, CPU seconds of the fleetgate process) for the record.
//!
//! `TEST_FLEETGATE_BIN=<path>` runs the attacks against another build (say main's, for the
//! figures before) and `HOSTILE_MEASURE_ONLY=1` then prints the figures without asserting the
//! bounds.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use fleetgate_transport_mqtt::codec::{
    Codec, Connect, Packet, ProtocolVersion, QoS, ReasonCode, Subscribe, SubscribeProperties,
    Subscription, SubscriptionOptions,
};
use support::{Fleetgate, demo_endpoint_env};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn measure_only() -> bool {
    std::env::var_os("HOSTILE_MEASURE_ONLY").is_some()
}

/// `fleetgate up` with the demo endpoint (token `tok-1`) and `env`.
fn up(env: &[(&'static str, &str)]) -> Fleetgate {
    let mut all = demo_endpoint_env();
    all.extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
    all.push(("RUST_LOG", "warn".to_owned()));
    Fleetgate::start("up", &all)
}

/// Resident memory of `pid`, MB.
fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

/// User + system CPU seconds of `pid` so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// What an attack cost the fleetgate process.
struct Cost {
    pid: u32,
    rss: f64,
    cpu: f64,
}

impl Cost {
    fn start(fg: &Fleetgate) -> Self {
        let pid = fg.pid().unwrap();
        Self { pid, rss: rss_mb(pid), cpu: cpu_secs(pid) }
    }

    /// Prints and returns (RSS growth MB, CPU seconds) since `start`.
    fn report(&self, attack: &str) -> (f64, f64) {
        let (rss, cpu) = (rss_mb(self.pid), cpu_secs(self.pid));
        let grown = rss - self.rss;
        let spent = cpu - self.cpu;
        eprintln!(
            "ATTACK {attack}: RSS {:.1} -> {rss:.1} MB (+{grown:.1}), CPU {spent:.2} s",
            self.rss
        );
        (grown, spent)
    }
}

/// A paho-mqtt device publishing a request every 100 ms for `secs`, from 127.0.0.1.
fn device(fg: &Fleetgate, secs: f64) -> Child {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/paho_device.py");
    Command::new("python3")
        .args([script, "127.0.0.1", &fg.mqtt.port().to_string(), "demo-v1", "tok-1"])
        .args(["--secs", &secs.to_string(), "--every", "0.1"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with paho-mqtt")
}

/// Waits for the device; asserts it was served throughout.
fn served(device: Child) {
    let out = device.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    eprintln!("device: {report}");
    let result: serde_json::Value = serde_json::from_str(&report).expect("the device's report");
    assert!(out.status.success(), "the device was not served during the attack: {report}");
    assert!(result["sent"].as_u64().unwrap() >= 5, "{report}");
}

/// An attacker's source address: 127.0.x.y, `i` spread over many addresses when `spread`.
fn attacker_ip(i: usize, spread: bool) -> IpAddr {
    if spread {
        IpAddr::from([127, 0, 1 + (i / 250) as u8, 1 + (i % 250) as u8])
    } else {
        IpAddr::from([127, 0, 0, 3])
    }
}

async fn connect_from(ip: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(to).await
}

fn encode(packet: &Packet, version: ProtocolVersion) -> BytesMut {
    let mut codec = Codec::new(1 << 20);
    codec.set_version(version);
    let mut out = BytesMut::new();
    codec.encode(packet, &mut out).unwrap();
    out
}

fn connect_packet(client_id: &'static str, keep_alive_secs: u16) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol_version: ProtocolVersion::V311,
        clean_start: true,
        keep_alive_secs,
        client_id: Bytes::from_static(client_id.as_bytes()),
        will: None,
        username: None,
        password: None,
        properties: Default::default(),
    }))
}

/// Connects from `ip` with `client_id`; the stream once CONNACK has come, or `None`.
async fn mqtt_connect(
    ip: IpAddr,
    to: SocketAddr,
    client_id: &'static str,
    keep_alive_secs: u16,
) -> Option<TcpStream> {
    let mut stream = connect_from(ip, to).await.ok()?;
    let bytes = encode(&connect_packet(client_id, keep_alive_secs), ProtocolVersion::V311);
    stream.write_all(&bytes).await.ok()?;
    let mut connack = [0u8; 4];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut connack));
    match read.await {
        Ok(Ok(_)) if connack == [0x20, 2, 0, 0] => Some(stream),
        _ => None,
    }
}

/// Whether the server has closed `stream` (reads end within `within`).
async fn closed(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// How many of `streams` the server closes within `within` (waited for together).
async fn count_closed(streams: &mut [TcpStream], within: Duration) -> usize {
    let all = streams.iter_mut().map(|s| closed(s, within));
    futures_util::future::join_all(all).await.into_iter().filter(|c| *c).count()
}

/// The sample of `name` whose labels include each of `labels` (`key="value"`), 0 if none.
fn metric(fg: &Fleetgate, name: &str, labels: &[&str]) -> f64 {
    let Some((_, body)) = support::http_get(fg.admin, "/metrics") else { return 0.0 };
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const MQTT: &str = "transport=\"mqtt\"";

/// 200 connections that each announce a 1 MB CONNECT and send it, and 200 that send nothing:
/// before issue 15 the first kind made the gateway buffer up to 1 MiB each (RSS 27 → 285 MB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_cost_a_small_fixed_budget() {
    let fg = up(&[("FLEETGATE_TRANSPORTS_MQTT_CONNECT_TIMEOUT_MS", "3000")]);
    let cost = Cost::start(&fg);
    let device = device(&fg, 3.0);
    let to = fg.mqtt;
    let mut tasks = Vec::new();
    for i in 0..200 {
        tasks.push(tokio::spawn(async move {
            let mut stream = connect_from(attacker_ip(i, true), to).await.ok()?;
            // CONNECT, Remaining Length 1,000,000, then the body it announced.
            let mut header = BytesMut::new();
            header.put_u8(0x10);
            header.put_slice(&[0xC0, 0x84, 0x3D]);
            let _ = stream.write_all(&header).await;
            let chunk = vec![0u8; 64 * 1024];
            for _ in 0..16 {
                let write = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&chunk));
                if !matches!(write.await, Ok(Ok(()))) {
                    break;
                }
            }
            Some(stream)
        }));
    }
    let mut big = Vec::new();
    for t in tasks {
        big.extend(t.await.unwrap());
    }
    let mut silent = Vec::new();
    for i in 0..200 {
        silent.extend(connect_from(attacker_ip(i, true), to).await.ok());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (grown, _) = cost.report("pre-CONNECT: 200 × 1 MB CONNECT + 200 silent");
    let big_closed = count_closed(&mut big, Duration::from_millis(500)).await;
    served(device);
    eprintln!("big CONNECTs closed: {big_closed}/{}", big.len());
    // Silent ones go at the connect timeout.
    let silent_closed = count_closed(&mut silent, Duration::from_secs(5)).await;
    eprintln!("silent connections closed after the connect timeout: {silent_closed}/200");
    if measure_only() {
        return;
    }
    assert!(grown < 40.0, "200 big CONNECTs took {grown:.1} MB");
    assert_eq!(big_closed, big.len(), "every oversized CONNECT is closed");
    assert_eq!(silent_closed, 200);
}

/// 500 connections with one client id (MQTT's takeover rule): one stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_id_holds_one_connection() {
    let fg = up(&[]);
    let cost = Cost::start(&fg);
    let device = device(&fg, 3.0);
    let mut held = Vec::new();
    for i in 0..500 {
        held.extend(mqtt_connect(attacker_ip(i, true), fg.mqtt, "same-id", 60).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    cost.report("takeover: 500 CONNECTs with one client id");
    let open = metric(&fg, "fleetgate_transport_connections_open", &[MQTT]);
    eprintln!("connected: {}, open now: {open}", held.len());
    served(device);
    if measure_only() {
        return;
    }
    assert_eq!(held.len(), 500, "each CONNECT is accepted (and takes the last one over)");
    assert!(open <= 2.0, "{open} connections open with one client id (and the device's)");
    let taken = metric(&fg, "fleetgate_transport_sessions_taken_over_total", &[MQTT]);
    assert_eq!(taken, 499.0);
}

/// 200 connections with keep-alive 0: held forever before issue 15; now closed after 1.5 ×
/// `max_keep_alive_secs` of silence, on 3.1.1 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_zero_is_not_forever() {
    let fg = up(&[("FLEETGATE_TRANSPORTS_MQTT_MAX_KEEP_ALIVE_SECS", "2")]);
    let cost = Cost::start(&fg);
    let device = device(&fg, 4.0);
    let mut held = Vec::new();
    for i in 0..200 {
        let id: &'static str = Box::leak(format!("idle-{i}").into_boxed_str());
        held.extend(mqtt_connect(attacker_ip(i, true), fg.mqtt, id, 0).await);
    }
    assert_eq!(held.len(), 200);
    cost.report("keep-alive 0: 200 idle connections");
    let closed_count = count_closed(&mut held, Duration::from_secs(6)).await;
    served(device);
    let timeouts = metric(&fg, "fleetgate_transport_keep_alive_timeouts_total", &[MQTT]);
    eprintln!("closed by the server: {closed_count}/200, keep-alive timeouts {timeouts}");
    if measure_only() {
        return;
    }
    assert_eq!(closed_count, 200);
    assert!(timeouts >= 200.0, "{timeouts}");
}

/// One session subscribing 20,000 filters in SUBSCRIBEs of 500: capped at
/// `max_subscriptions_per_session` (100), the rest refused in SUBACK; the bookkeeping is not
/// quadratic (200,000 filters took 64 s of CPU before issue 15).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_flood_is_capped() {
    let fg = up(&[]);
    let cost = Cost::start(&fg);
    let device = device(&fg, 3.0);
    let mut stream = mqtt_connect(attacker_ip(0, false), fg.mqtt, "subscriber", 60).await.unwrap();
    let (mut granted, mut refused) = (0usize, 0usize);
    let mut codec = Codec::new(1 << 20);
    codec.set_version(ProtocolVersion::V311);
    let mut read = BytesMut::new();
    let started = Instant::now();
    for packet in 0..40u16 {
        let subscriptions = (0..500)
            .map(|i| Subscription {
                filter: Bytes::from(format!("kp1/demo-v1/dcx/tok-1/f/{packet}/{i}")),
                options: SubscriptionOptions::new(QoS::AtMostOnce),
            })
            .collect();
        let subscribe = Subscribe {
            packet_id: packet + 1,
            subscriptions,
            properties: SubscribeProperties::default(),
        };
        stream
            .write_all(&encode(&Packet::Subscribe(subscribe), ProtocolVersion::V311))
            .await
            .unwrap();
        let suback = loop {
            if let Some(p) = codec.decode(&mut read).unwrap() {
                break p;
            }
            let n = tokio::time::timeout(Duration::from_secs(60), stream.read_buf(&mut read));
            assert!(n.await.unwrap().unwrap() > 0, "closed");
        };
        let Packet::SubAck(suback) = suback else { panic!("expected SUBACK, got {suback:?}") };
        for code in suback.reason_codes {
            match code {
                ReasonCode::UnspecifiedError => refused += 1,
                _ => granted += 1,
            }
        }
    }
    let (_, cpu) = cost.report("subscription flood: 20,000 filters in one session");
    eprintln!("granted {granted}, refused {refused} in {:?}", started.elapsed());
    served(device);
    if measure_only() {
        return;
    }
    assert_eq!((granted, refused), (100, 19_900));
    assert_eq!(metric(&fg, "fleetgate_gateway_subscriptions_refused_total", &[]), 19_900.0);
    assert!(cpu < 10.0, "{cpu:.1} s of CPU for 20,000 filters");
}

/// Connections opened and closed as fast as one address can for 3 s (7,687/s before issue
/// 15): the address gets its burst and then its rate, and the refusals are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_rate_flood_from_one_address_is_limited() {
    let fg = up(&[]);
    let cost = Cost::start(&fg);
    let device = device(&fg, 3.0);
    let until = Instant::now() + Duration::from_secs(3);
    let mut attempts = 0u64;
    while Instant::now() < until {
        if let Ok(mut s) = connect_from(attacker_ip(0, false), fg.mqtt).await {
            let _ = s.write_all(&encode(&connect_packet("", 60), ProtocolVersion::V311)).await;
        }
        attempts += 1;
    }
    cost.report(&format!("connection-rate flood: {attempts} connections in 3 s from one address"));
    served(device);
    let limited =
        metric(&fg, "fleetgate_transport_connections_limited_total", &[MQTT, "reason=\"rate\""]);
    let accepted = metric(&fg, "fleetgate_transport_connections_accepted_total", &[MQTT]);
    eprintln!("attempts {attempts}, accepted {accepted}, refused for rate {limited}");
    if measure_only() {
        return;
    }
    // Burst 200 and 50/s for 3 s, the device's connection besides (and some slack for the
    // seconds it took to start).
    assert!(accepted <= 200.0 + 50.0 * 5.0 + 1.0, "{accepted} accepted");
    // Most refusals are counted (the last few may still wait in the listen backlog).
    assert!(limited > 0.0 && limited + accepted >= attempts as f64 * 0.5, "{limited}");
}
