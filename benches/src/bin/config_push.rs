//! Configuration pushes to a connected fleet: N MQTT devices (one connection and token each)
//! connect to fleetgate and send one data sample (which announces them connected), then wait;
//! one `PUT /ecr/api/v1/app-versions/<v>` changes the app version's default configuration, and
//! each device answers the push it gets on `.../config/json/status` with `/applied`, as the
//! official clients do. Reported: pushes per second (devices / time from the PUT to the last
//! push received) and the time until the last `ConfigApplied` seen on NATS.
//!
//! fleetgate must run with `auth.auto_register: true`, the app version in
//! `gateway.app_versions`, `cmx` in `gateway.extensions`, and NATS (`--nats-url`).

// A benchmark run: any failure ends it with its reason.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use clap::Parser;
use fleetgate_benches::device::tcp_connect;
use fleetgate_messages::{ConfigApplied, Record};
use fleetgate_transport_mqtt::codec::{Codec, Connect, Packet, ProtocolVersion, Publish, QoS};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    /// fleetgate's MQTT listener.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: SocketAddr,
    /// fleetgate's admin listener (the ECR REST API).
    #[arg(long, default_value = "127.0.0.1:8008")]
    admin: SocketAddr,
    /// The NATS server fleetgate uses.
    #[arg(long)]
    nats_url: String,
    /// Devices.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Their app version.
    #[arg(long, default_value = "demo-v1")]
    app_version: String,
    /// Connections opened at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Give up after this long from the PUT.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
}

fn publish(codec: &Codec, topic: String, payload: Vec<u8>, out: &mut BytesMut) {
    let p = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: Bytes::from(topic),
        packet_id: None,
        properties: Default::default(),
        payload: Bytes::from(payload),
    };
    codec.encode(&Packet::Publish(p), out).expect("a publish encodes");
}

/// One device: connects, announces itself, answers one push; reports when it was pushed.
async fn device(
    args: Arc<Args>,
    token: String,
    connected: Arc<AtomicU64>,
    pushed: Arc<AtomicU64>,
    last_push_us: Arc<AtomicU64>,
    start: Instant,
) {
    let mut stream = tcp_connect(args.mqtt, None).await.expect("connects");
    let mut codec = Codec::new(1 << 20);
    codec.set_version(ProtocolVersion::V311);
    let mut out = BytesMut::new();
    let connect = Connect {
        protocol_version: ProtocolVersion::V311,
        clean_start: true,
        keep_alive_secs: 600,
        client_id: Bytes::from(token.clone()),
        will: None,
        username: None,
        password: None,
        properties: Default::default(),
    };
    codec.encode(&Packet::Connect(Box::new(connect)), &mut out).expect("CONNECT encodes");
    let av = &args.app_version;
    publish(&codec, format!("kp1/{av}/dcx/{token}/json"), br#"{"hello":1}"#.to_vec(), &mut out);
    stream.write_all(&out).await.expect("writes");
    out.clear();
    let mut read = BytesMut::with_capacity(4096);
    let push_topic = format!("kp1/{av}/cmx/{token}/config/json/status");
    let mut counted = false;
    loop {
        while let Some(packet) = codec.decode(&mut read).expect("valid MQTT from fleetgate") {
            match packet {
                Packet::ConnAck(_) if !counted => {
                    counted = true;
                    connected.fetch_add(1, Ordering::Relaxed);
                }
                Packet::Publish(p) if p.topic == push_topic.as_bytes() => {
                    let at = start.elapsed().as_micros() as u64;
                    last_push_us.fetch_max(at, Ordering::Relaxed);
                    pushed.fetch_add(1, Ordering::Relaxed);
                    let body: serde_json::Value =
                        serde_json::from_slice(&p.payload).expect("a JSON push");
                    let applied =
                        serde_json::json!({"configId": body["configId"], "statusCode": 200});
                    publish(
                        &codec,
                        format!("kp1/{av}/cmx/{token}/applied/json"),
                        applied.to_string().into_bytes(),
                        &mut out,
                    );
                    stream.write_all(&out).await.expect("writes");
                    out.clear();
                }
                _ => {}
            }
        }
        match stream.read_buf(&mut read).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn put(admin: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(admin).expect("admin listener");
    write!(
        s,
        "PUT {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("writes");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("reads");
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

#[tokio::main]
async fn main() {
    let args = Arc::new(Args::parse());
    let nats = async_nats::connect(&args.nats_url).await.expect("NATS");
    let mut applied = nats.subscribe("kaa.v1.events.*.endpoint.config.applied").await.expect("sub");
    nats.flush().await.expect("flush");
    let (connected, pushed, last_push_us) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let start = Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    let run = format!("{:x}", std::process::id());
    for i in 0..args.devices {
        let permit = gate.clone().acquire_owned().await.expect("semaphore");
        let (a, c, p, l) = (args.clone(), connected.clone(), pushed.clone(), last_push_us.clone());
        let token = format!("cfg-{run}-{i}");
        let connected = connected.clone();
        tokio::spawn(async move {
            let before = connected.load(Ordering::Relaxed);
            let task = tokio::spawn(device(a, token, c, p, l, start));
            // Hold the permit until this device's CONNACK (or a moment), bounding connects.
            let deadline = Instant::now() + Duration::from_secs(5);
            while connected.load(Ordering::Relaxed) <= before && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            drop(permit);
            let _ = task.await;
        });
    }
    while connected.load(Ordering::Relaxed) < args.devices as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("{} devices connected in {:.1} s", args.devices, start.elapsed().as_secs_f64());
    // Let the connected events reach CMX.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let put_at = start.elapsed();
    let body = format!(r#"{{"run":"{run}","interval":5}}"#);
    let (code, answer) =
        put(args.admin, &format!("/ecr/api/v1/app-versions/{}", args.app_version), &body);
    assert_eq!(code, 200, "{answer}");
    let id = serde_json::from_str::<serde_json::Value>(&answer).expect("JSON")["configId"]
        .as_str()
        .expect("configId")
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    let mut confirmed = 0usize;
    let mut last_confirm = Duration::ZERO;
    while confirmed < args.devices && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), applied.next()).await {
            Ok(Some(m)) => {
                if ConfigApplied::decode(&m.payload).is_ok_and(|a| a.config_id == id) {
                    confirmed += 1;
                    last_confirm = start.elapsed() - put_at;
                }
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    let pushes = pushed.load(Ordering::Relaxed);
    let last_push =
        Duration::from_micros(last_push_us.load(Ordering::Relaxed)).saturating_sub(put_at);
    let rate = pushes as f64 / last_push.as_secs_f64().max(1e-9);
    println!(
        "{{\"devices\":{},\"pushes\":{pushes},\"confirmed\":{confirmed},\"last_push_s\":{:.3},\"pushes_per_s\":{rate:.0},\"last_confirmed_s\":{:.3}}}",
        args.devices,
        last_push.as_secs_f64(),
        last_confirm.as_secs_f64()
    );
}
