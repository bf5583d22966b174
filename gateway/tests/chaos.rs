//! Chaos: the bus and the gateway misbehave under load, and no acknowledged message is lost.
//!
//! Each test runs `fleetgate up` on a private nats-server, drives MQTT QoS 1 devices at a steady
//! rate, does something bad (SIGSTOP NATS, kill it, SIGKILL or SIGTERM the gateway, leave DCX
//! out, send 1 MiB), and then counts, by a number each message carries: sent, acknowledged
//! (PUBACK), delivered (DCX broadcast its sample on NATS) and acknowledged but lost, which must
//! be 0. Every test is bounded in time.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fleetgate_testkit::NatsServer;
use fleetgate_transport_mqtt::codec::{
    Codec, Connect, Packet, ProtocolVersion, Publish, PublishProperties, QoS, ReasonCode,
};
use futures_util::StreamExt;
use support::{Fleetgate, demo_endpoint_env, http_get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOPIC: &str = "kp1/demo-v1/dcx/tok-1/json";

/// What the devices sent and heard, by message number.
#[derive(Default)]
struct Ledger {
    sent: u64,
    acked: HashSet<u64>,
}

/// MQTT 3.1.1 devices sending QoS 1 messages `[{"n":<n>}]` at a steady rate, reconnecting
/// when the gateway goes away. A message that is not acknowledged is not resent (a device
/// would; here it would only blur the count).
struct Load {
    ledger: Arc<Mutex<Ledger>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(addr: SocketAddr, per_second: u64) -> Self {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(drive(addr, per_second, ledger.clone(), stopped));
        Self { ledger, stop, task }
    }

    async fn finish(self) -> Arc<Mutex<Ledger>> {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
        self.ledger
    }

    fn acked(&self) -> usize {
        self.ledger.lock().unwrap().acked.len()
    }
}

async fn drive(
    addr: SocketAddr,
    per_second: u64,
    ledger: Arc<Mutex<Ledger>>,
    stopped: tokio::sync::watch::Receiver<bool>,
) {
    let interval = Duration::from_micros(1_000_000 / per_second.max(1));
    let mut n = 0u64;
    while !*stopped.borrow() {
        let Ok(stream) = TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (mut rd, mut wr) = stream.into_split();
        let mut codec = Codec::new(1 << 20);
        codec.set_version(ProtocolVersion::V311);
        let connect = Connect {
            protocol_version: ProtocolVersion::V311,
            clean_start: true,
            keep_alive_secs: 0,
            client_id: Bytes::from(format!("chaos-{n}")),
            will: None,
            username: None,
            password: None,
            properties: Default::default(),
        };
        let mut out = bytes::BytesMut::new();
        codec.encode(&Packet::Connect(Box::new(connect)), &mut out).unwrap();
        if wr.write_all(&out).await.is_err() {
            continue;
        }
        // In flight: packet id → message number, acknowledged by the reader.
        let inflight = Arc::new(Mutex::new(std::collections::HashMap::<u16, u64>::new()));
        let reader = {
            let (inflight, ledger) = (inflight.clone(), ledger.clone());
            tokio::spawn(async move {
                let mut codec = Codec::new(1 << 20);
                codec.set_version(ProtocolVersion::V311);
                let mut buf = bytes::BytesMut::new();
                loop {
                    while let Ok(Some(packet)) = codec.decode(&mut buf) {
                        if let Packet::PubAck(ack) = packet
                            && let Some(n) = inflight.lock().unwrap().remove(&ack.packet_id)
                        {
                            ledger.lock().unwrap().acked.insert(n);
                        }
                    }
                    match rd.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
        };
        let mut next = tokio::time::Instant::now();
        let mut pid: u16 = 0;
        loop {
            if *stopped.borrow() || reader.is_finished() {
                break;
            }
            // At most 100 unacknowledged per connection, as a device's client would keep.
            if inflight.lock().unwrap().len() >= 100 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            pid = pid.checked_add(1).unwrap_or(1);
            if inflight.lock().unwrap().contains_key(&pid) {
                continue;
            }
            n += 1;
            let publish = Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: Bytes::from_static(TOPIC.as_bytes()),
                packet_id: Some(pid),
                properties: PublishProperties::default(),
                payload: Bytes::from(format!("[{{\"n\":{n}}}]")),
            };
            out.clear();
            codec.encode(&Packet::Publish(publish), &mut out).unwrap();
            inflight.lock().unwrap().insert(pid, n);
            ledger.lock().unwrap().sent += 1;
            if wr.write_all(&out).await.is_err() {
                break;
            }
            next += interval;
            tokio::time::sleep_until(next).await;
        }
        reader.abort();
        if !*stopped.borrow() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Every message number DCX broadcast as a data sample, as seen on NATS.
struct Delivered {
    seen: Arc<Mutex<HashSet<u64>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl Delivered {
    async fn watch(nats_url: &str) -> Self {
        // The observer must be subscribed again before the gateway forwards its spool after a
        // NATS restart (a core NATS subscriber misses what is published while it is away), so
        // it tries every 20 ms where the gateway backs off (async-nats' default, up to seconds).
        let client = async_nats::ConnectOptions::new()
            .max_reconnects(None)
            .reconnect_delay_callback(|_| Duration::from_millis(20))
            .connect(nats_url)
            .await
            .expect("observer connects");
        let mut samples = client
            .subscribe("kaa.v1.events.dcx.endpoint.data-collection.data-samples-received")
            .await
            .expect("sub");
        client.flush().await.expect("flush");
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                let _client = client;
                while let Some(m) = samples.next().await {
                    for n in numbers_in(&m.payload) {
                        seen.lock().unwrap().insert(n);
                    }
                }
            })
        };
        Self { seen, _task: task }
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Waits (up to `wait`) until every acknowledged message was delivered; returns those
    /// that were not.
    async fn missing(&self, ledger: &Ledger, wait: Duration) -> Vec<u64> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let missing: Vec<u64> = {
                let seen = self.seen.lock().unwrap();
                let mut m: Vec<u64> = ledger.acked.difference(&seen).copied().collect();
                m.sort_unstable();
                m
            };
            if missing.is_empty() || tokio::time::Instant::now() >= deadline {
                return missing;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The numbers of `"n":<n>` in a samples event.
fn numbers_in(payload: &[u8]) -> Vec<u64> {
    let text = String::from_utf8_lossy(payload);
    text.match_indices("\"n\":")
        .filter_map(|(i, m)| {
            let digits: String =
                text[i + m.len()..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// Counts, reports and checks: nothing acknowledged is lost.
async fn account(name: &str, load: Load, delivered: &Delivered, drain: Duration) -> Counts {
    let ledger = load.finish().await;
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    let missing = delivered.missing(&ledger, drain).await;
    let counts = Counts {
        sent: ledger.sent,
        acked: ledger.acked.len() as u64,
        delivered: delivered.count() as u64,
        lost: missing.len() as u64,
    };
    eprintln!(
        "{name}: sent {}, acknowledged {}, delivered {}, acknowledged but lost {}",
        counts.sent, counts.acked, counts.delivered, counts.lost
    );
    assert!(
        missing.is_empty(),
        "{name}: {} acknowledged messages never delivered, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    counts
}

struct Counts {
    sent: u64,
    acked: u64,
    delivered: u64,
    lost: u64,
}

fn env(nats: &NatsServer) -> Vec<(&'static str, String)> {
    let mut env = demo_endpoint_env();
    env.push(("FLEETGATE_NATS_URL", nats.url()));
    env
}

/// NATS stops (SIGSTOP) for `secs` under load: requests are spooled after the delivery timeout
/// and acknowledged as stored, readiness fails while NATS does not answer, and everything
/// acknowledged is delivered once NATS resumes.
async fn stall(secs: u64) {
    let nats = NatsServer::start();
    let fg = Fleetgate::start("up", &env(&nats));
    let delivered = Delivered::watch(&nats.url()).await;
    let load = Load::start(fg.mqtt, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = load.acked();
    assert!(before > 300, "acknowledged before the stall: {before}");
    nats.freeze(true);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let during = load.acked() - before;
    let ready_during = readyz(&fg);
    nats.freeze(false);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let name = format!("NATS stopped (SIGSTOP) {secs} s");
    let counts = account(&name, load, &delivered, Duration::from_secs(60)).await;
    assert_eq!(ready_during, 503, "not ready while NATS is stopped");
    assert!(
        during as u64 > secs * 100,
        "the spool kept acknowledging during the stall: {during} in {secs} s"
    );
    assert!(counts.acked > counts.sent * 9 / 10, "nearly everything acknowledged");
    wait_ready_again(&fg).await;
}

fn readyz(fg: &Fleetgate) -> u16 {
    http_get(fg.admin, "/readyz").map_or(0, |(code, _)| code)
}

async fn wait_ready_again(fg: &Fleetgate) {
    for _ in 0..100 {
        if readyz(fg) == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not ready again: {:?}", http_get(fg.admin, "/readyz"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_nats_stopped_for_15_s_under_load() {
    stall(15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_nats_stopped_for_60_s_under_load() {
    stall(60).await;
}

/// NATS is killed and started again on the same port: the gateway spools meanwhile,
/// reconnects, and delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_nats_killed_and_restarted() {
    let mut nats = NatsServer::start();
    let fg = Fleetgate::start("up", &env(&nats));
    let delivered = Delivered::watch(&nats.url()).await;
    let load = Load::start(fg.mqtt, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    nats.kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let ready_during = readyz(&fg);
    let acked_during = load.acked();
    nats.restart();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let counts =
        account("NATS killed and restarted", load, &delivered, Duration::from_secs(60)).await;
    assert_eq!(ready_during, 503, "not ready while NATS is gone");
    assert!(counts.acked as usize > acked_during, "acknowledged again after the restart");
    wait_ready_again(&fg).await;
}

/// The gateway is SIGKILLed while its spool holds acknowledged requests (NATS stopped), and
/// started again on the same spool: nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_gateway_killed_with_a_full_spool_and_restarted() {
    let nats = NatsServer::start();
    let mut fg = Fleetgate::start("up", &env(&nats));
    let delivered = Delivered::watch(&nats.url()).await;
    let load = Load::start(fg.mqtt, 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.freeze(true);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let spooled = fg.metric("fleetgate_gateway_spool_messages").unwrap_or(0.0);
    assert!(spooled > 100.0, "the spool holds acknowledged requests: {spooled}");
    fg.kill();
    nats.freeze(false);
    fg.restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let counts = account(
        "gateway SIGKILLed with a non-empty spool",
        load,
        &delivered,
        Duration::from_secs(60),
    )
    .await;
    assert!(counts.acked > 0);
}

/// SIGTERM while NATS is stopped: the gateway takes nothing new, spools what it took, and exits
/// cleanly; started again, it delivers what it acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_sigterm_during_a_stall() {
    let nats = NatsServer::start();
    let mut fg = Fleetgate::start("up", &env(&nats));
    let delivered = Delivered::watch(&nats.url()).await;
    let load = Load::start(fg.mqtt, 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.freeze(true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fg.terminate(), Some(0), "a clean exit within the drain timeout");
    let acked_at_exit = load.acked();
    nats.freeze(false);
    fg.restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let counts = account("SIGTERM during a stall", load, &delivered, Duration::from_secs(60)).await;
    assert!(counts.acked as usize >= acked_at_exit);
}

/// No DCX runs: requests are spooled after the delivery timeout and acknowledged as stored;
/// once a DCX replica starts, they are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_dcx_absent() {
    let nats = NatsServer::start();
    let _auth = Fleetgate::start("auth", &env(&nats));
    let gateway = Fleetgate::start("gateway", &env(&nats));
    let delivered = Delivered::watch(&nats.url()).await;
    let load = Load::start(gateway.mqtt, 100);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let acked_without_dcx = load.acked();
    assert!(acked_without_dcx > 100, "acknowledged as stored: {acked_without_dcx}");
    assert_eq!(delivered.count(), 0, "nothing delivered without DCX");
    let _dcx = Fleetgate::start("dcx", &env(&nats));
    tokio::time::sleep(Duration::from_secs(4)).await;
    account("DCX absent, then started", load, &delivered, Duration::from_secs(60)).await;
}

/// A request near 1 MiB is over NATS's max_payload with its envelope: refused to that device
/// (413) alone, and traffic goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_a_1_mib_request_then_normal_traffic() {
    use support::RawClient;
    let nats = NatsServer::start();
    let fg = Fleetgate::start("up", &env(&nats));
    let connect = RawClient::connect_packet(ProtocolVersion::V311, None, None);
    let (mut client, _) = RawClient::connect(fg.mqtt, connect).await;
    // Within MQTT's 1 MiB packet limit; over NATS's 1 MiB max_payload with the 4/ESP envelope.
    let payload = Bytes::from(format!("[\"{}\"]", "x".repeat(1024 * 1024 - 45)));
    let publish = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: Bytes::from_static(b"kp1/demo-v1/dcx/tok-1/json/1"),
        packet_id: Some(1),
        properties: PublishProperties::default(),
        payload,
    };
    client.send(&Packet::Publish(publish)).await;
    let answer = client.next_publish().await.expect("an answer");
    assert_eq!(&answer.topic[..], b"kp1/demo-v1/dcx/tok-1/json/1/error");
    assert!(String::from_utf8_lossy(&answer.payload).contains("\"statusCode\":413"));
    let delivered = Delivered::watch(&nats.url()).await;
    let load = Load::start(fg.mqtt, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let counts =
        account("a 1 MiB request, then normal traffic", load, &delivered, Duration::from_secs(20))
            .await;
    assert!(counts.acked > 300, "traffic goes on: {}", counts.acked);
    assert_eq!(readyz(&fg), 200);
}

/// The auth provider is down: readiness fails, connections are refused clearly (CONNACK 3),
/// and all recovers once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_auth_provider_down() {
    use support::RawClient;
    let nats = NatsServer::start();
    let mut env = env(&nats);
    env.push(("FLEETGATE_GATEWAY_AUTH_TIMEOUT_MS", "500".into()));
    let _dcx = Fleetgate::start("dcx", &env);
    let mut gateway = Fleetgate::spawn("gateway", &env);
    // Not ready: nobody answers 16/ECAP.
    let mut not_ready = false;
    for _ in 0..100 {
        if readyz(&gateway) == 503
            && http_get(gateway.admin, "/readyz").is_some_and(|(_, b)| b.contains("authentication"))
        {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(not_ready, "readiness names the authentication provider");
    let connect = RawClient::connect_packet(ProtocolVersion::V311, None, None);
    let (_, connack) = RawClient::connect(gateway.mqtt, connect.clone()).await;
    // 3.1.1 return code 3: server unavailable.
    assert_eq!(connack.reason_code, ReasonCode::ServerUnavailable);
    let _auth = Fleetgate::start("auth", &env);
    gateway.wait_ready();
    let delivered = Delivered::watch(&nats.url()).await;
    let load = Load::start(gateway.mqtt, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let counts =
        account("auth provider down, then back", load, &delivered, Duration::from_secs(20)).await;
    assert!(counts.acked > 300, "devices connect and are acknowledged: {}", counts.acked);
}

/// A closed-loop QoS 0 flood from `mosquitto_pub` (every line a message, then DISCONNECT):
/// with a bus that keeps up, every message reaches DCX, including those still buffered when the
/// client hangs up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_flood_loses_nothing_when_the_bus_keeps_up() {
    const N: u64 = 20_000;
    let nats = NatsServer::start();
    let fg = Fleetgate::start("up", &env(&nats));
    let delivered = Delivered::watch(&nats.url()).await;
    let lines: String = (1..=N).map(|n| format!("[{{\"n\":{n}}}]\n")).collect();
    let port = fg.mqtt.port().to_string();
    let mut publisher = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-q", "0", "-t", TOPIC, "-l"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (scripts/test installs mosquitto-clients)");
    {
        use std::io::Write;
        let mut stdin = publisher.stdin.take().expect("stdin");
        stdin.write_all(lines.as_bytes()).expect("lines");
    }
    let status = publisher.wait().expect("mosquitto_pub ends");
    assert!(status.success());
    let ledger = Ledger { sent: N, acked: (1..=N).collect() };
    let missing = delivered.missing(&ledger, Duration::from_secs(30)).await;
    eprintln!("QoS 0 flood: sent {N}, delivered {}, lost {}", delivered.count(), missing.len());
    assert!(
        missing.is_empty(),
        "{} of {N} lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

/// SIGTERM while a device's requests are decoded but not yet handed over (every request waits
/// for its own write to the spool, so the gateway is behind): the process still exits cleanly
/// within the drain timeout. (A connection closed at the stop with requests it held back used
/// to spin, and the process never exited.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_sigterm_with_requests_queued_in_a_connection() {
    use support::RawClient;
    let nats = NatsServer::start();
    let mut env = env(&nats);
    env.push(("FLEETGATE_PROCESS_DRAIN_TIMEOUT_MS", "500".into()));
    env.push(("FLEETGATE_GATEWAY_SPOOL_MODE", "always".into()));
    let mut fg = Fleetgate::start("up", &env);
    let connect = RawClient::connect_packet(ProtocolVersion::V311, None, None);
    let (mut client, _) = RawClient::connect(fg.mqtt, connect).await;
    let mut burst = bytes::BytesMut::new();
    let mut codec = Codec::new(1 << 20);
    codec.set_version(ProtocolVersion::V311);
    for id in 1..=1000u16 {
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: Bytes::from_static(TOPIC.as_bytes()),
            packet_id: Some(id),
            properties: PublishProperties::default(),
            payload: Bytes::from(format!("[{{\"n\":{id}}}]")),
        };
        codec.encode(&Packet::Publish(publish), &mut burst).unwrap();
    }
    client.send_raw(&burst).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    assert_eq!(fg.terminate(), Some(0), "a clean exit");
    assert!(started.elapsed() < Duration::from_secs(10), "exited in {:?}", started.elapsed());
}

/// An extension slower than the delivery timeout: requests are spooled and acknowledged as
/// stored after it, but their originals are still on the bus. The extension answers them
/// within one more delivery timeout, so the forwarder must not send it a second copy (it used
/// to replay every record at once: under load twice the work, more timeouts, more replays).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_extension_gets_each_request_once() {
    use fleetgate_messages::{ClientData, Record as _};
    let nats = NatsServer::start();
    let _auth = Fleetgate::start("auth", &env(&nats));
    let mut gateway_env = env(&nats);
    gateway_env.push(("FLEETGATE_GATEWAY_SPOOL_DELIVERY_TIMEOUT_MS", "1000".into()));
    let gateway = Fleetgate::start("gateway", &gateway_env);

    // A DCX stand-in that answers every request 1.5 s after it came: after the delivery
    // timeout, within the second one.
    let client = async_nats::connect(nats.url()).await.expect("extension connects");
    let mut requests = client
        .queue_subscribe("kaa.v1.service.dcx.esp.ClientData", "dcx".into())
        .await
        .expect("sub");
    client.flush().await.expect("flush");
    let copies = Arc::new(Mutex::new(std::collections::HashMap::<u64, u32>::new()));
    let extension = {
        let copies = copies.clone();
        tokio::spawn(async move {
            while let Some(msg) = requests.next().await {
                let request = ClientData::decode(&msg.payload).expect("ClientData");
                for n in numbers_in(request.payload) {
                    *copies.lock().unwrap().entry(n).or_default() += 1;
                }
                let answer = dcx_answer(&request, 200, None);
                let (client, reply) = (client.clone(), msg.reply.expect("reply subject"));
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    client.publish(reply, answer).await.expect("answer");
                });
            }
        })
    };

    let load = Load::start(gateway.mqtt, 50);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let ledger = load.finish().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    extension.abort();
    let ledger = ledger.lock().unwrap();
    let copies = copies.lock().unwrap();
    let acked_but_unseen = ledger.acked.iter().filter(|n| !copies.contains_key(n)).count();
    let twice = copies.values().filter(|&&c| c > 1).count();
    eprintln!(
        "slow extension: sent {}, acknowledged {}, received {}, received more than once {twice}",
        ledger.sent,
        ledger.acked.len(),
        copies.len()
    );
    // Most are acknowledged (as stored) within the run; how many depends on the machine's load.
    assert!(
        ledger.acked.len() as u64 * 2 > ledger.sent,
        "acknowledged as stored: {}",
        ledger.acked.len()
    );
    assert_eq!(acked_but_unseen, 0, "every acknowledged request reached the extension");
    assert_eq!(twice, 0, "no request was sent to the extension twice");
    assert_eq!(
        gateway.metric("fleetgate_gateway_spool_messages"),
        Some(0.0),
        "the originals' answers emptied the spool"
    );
}

/// An extension that answers 5xx (a reliable receiver behind DCX is down, DCX answers 504) for
/// a while: what was acknowledged as stored stays in the spool and is replayed until it is
/// answered 200, never dropped on the 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_request_answered_5xx_stays_until_it_is_delivered() {
    use fleetgate_messages::{ClientData, Record as _};
    let nats = NatsServer::start();
    let _auth = Fleetgate::start("auth", &env(&nats));
    let mut gateway_env = env(&nats);
    gateway_env.push(("FLEETGATE_GATEWAY_SPOOL_DELIVERY_TIMEOUT_MS", "500".into()));
    let gateway = Fleetgate::start("gateway", &gateway_env);

    // A DCX stand-in: for its first 4 s it answers every request 504 after 1 s (after the
    // gateway's delivery timeout, so the device was already told "stored"); then 200 at once.
    let client = async_nats::connect(nats.url()).await.expect("extension connects");
    let mut requests = client
        .queue_subscribe("kaa.v1.service.dcx.esp.ClientData", "dcx".into())
        .await
        .expect("sub");
    client.flush().await.expect("flush");
    let delivered = Arc::new(Mutex::new(HashSet::<u64>::new()));
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let extension = {
        let (delivered, refused) = (delivered.clone(), refused.clone());
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            while let Some(msg) = requests.next().await {
                let request = ClientData::decode(&msg.payload).expect("ClientData");
                let failing = started.elapsed() < Duration::from_secs(4);
                if failing {
                    refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else {
                    delivered.lock().unwrap().extend(numbers_in(request.payload));
                }
                let answer = if failing {
                    dcx_answer(&request, 504, Some("a reliable receiver did not confirm"))
                } else {
                    dcx_answer(&request, 200, None)
                };
                let (client, reply) = (client.clone(), msg.reply.expect("reply subject"));
                tokio::spawn(async move {
                    if failing {
                        tokio::time::sleep(Duration::from_millis(1000)).await;
                    }
                    client.publish(reply, answer).await.expect("answer");
                });
            }
        })
    };

    let load = Load::start(gateway.mqtt, 50);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ledger = load.finish().await;
    // The back-off is at most 5 s; the spool drains once the extension answers 200.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while gateway.metric("fleetgate_gateway_spool_messages") != Some(0.0)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    extension.abort();
    let ledger = ledger.lock().unwrap();
    let delivered = delivered.lock().unwrap();
    let lost = ledger.acked.iter().filter(|n| !delivered.contains(n)).count();
    let refusals = gateway.metric("fleetgate_gateway_spool_replay_refusals_total");
    eprintln!(
        "5xx then 200: sent {}, acknowledged {}, delivered {}, refused answers {}, acknowledged \
         but lost {lost}, spool refusals counted {refusals:?}",
        ledger.sent,
        ledger.acked.len(),
        delivered.len(),
        refused.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(ledger.acked.len() > 20, "acknowledged as stored: {}", ledger.acked.len());
    assert!(refused.load(std::sync::atomic::Ordering::Relaxed) > 0, "the extension refused some");
    assert!(refusals.is_some_and(|r| r > 0.0), "refusals counted: {refusals:?}");
    assert_eq!(lost, 0, "every acknowledged request was delivered after the 5xx answers");
    assert_eq!(gateway.metric("fleetgate_gateway_spool_messages"), Some(0.0), "spool drained");
}

/// What a DCX stand-in answers to `request`: `status`, no payload.
fn dcx_answer(
    request: &fleetgate_messages::ClientData<'_>,
    status: i32,
    reason: Option<&str>,
) -> bytes::Bytes {
    use fleetgate_messages::{ExtensionData, Record as _};
    ExtensionData {
        correlation_id: request.correlation_id,
        timestamp_ms: request.timestamp_ms,
        timeout_ms: 0,
        app_version_name: Some(request.app_version_name),
        extension_instance_name: Some("dcx"),
        endpoint_id: request.endpoint_id,
        resource_path: request.resource_path,
        request_id: request.request_id,
        payload: None,
        status_code: status,
        reason_phrase: reason,
    }
    .to_bytes()
}
