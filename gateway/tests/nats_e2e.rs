//! fleetgate on a real NATS server (a `nats-server` child process): `fleetgate up` on NATS,
//! gateway, DCX and auth as separate processes, and DCX replicas sharing a queue group.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::collections::{BTreeSet, HashSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use fleetgate_messages::{ClientData, DataSamplesEvent, Record};
use fleetgate_testkit::NatsServer;
use support::{Fleetgate, NatsObserver, demo_endpoint_env, rumqttc_request};

const BATCH: &[u8] = br#"[{"temperature":21},{"temperature":22}]"#;
const TOPIC: &str = "kp1/demo-v1/dcx/tok-1/json/42";

fn with_nats(nats: &NatsServer, extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut env = demo_endpoint_env();
    env.push(("FLEETGATE_NATS_URL", nats.url()));
    env.extend_from_slice(extra);
    env
}

/// One request's trace on NATS: exactly one ClientData and one DataSamplesEvent with 2 samples.
async fn expect_on_nats(observer: &mut NatsObserver) {
    let msg = observer.client_data().await;
    let data = ClientData::decode(&msg.payload).expect("ClientData decodes");
    assert_eq!(data.app_version_name, "demo-v1");
    assert_eq!(data.endpoint_id, Some("ep-1"));
    assert_eq!(data.resource_path, "/json");
    assert_eq!(data.request_id, Some(42));
    assert_eq!(data.payload, BATCH);
    let reply = msg.reply.expect("ClientData has a reply subject");
    assert!(
        reply.starts_with("kaa.v1.replica.") && reply.ends_with(".esp.ExtensionData"),
        "{reply}"
    );
    let msg = observer.samples_event().await;
    let event = DataSamplesEvent::decode(&msg.payload).expect("DataSamplesEvent decodes");
    assert_eq!(event.endpoint_id, "ep-1");
    assert_eq!(event.data_samples, [&br#"{"temperature":21}"#[..], br#"{"temperature":22}"#]);
    let reply = msg.reply.expect("event has a reply subject");
    assert!(reply.ends_with(".dstp.DataSamplesProcessed"), "{reply}");
    assert!(
        observer.drain_samples(Duration::from_millis(200)).await.is_empty(),
        "exactly one event"
    );
}

/// rumqttc without and with SUBSCRIBE, then mosquitto_pub beside mosquitto_sub.
async fn every_client_gets_status(fg: &Fleetgate, observer: &mut NatsObserver) {
    for subscribe in [None, Some("kp1/demo-v1/dcx/tok-1/json/#")] {
        let p = rumqttc_request(fg.mqtt, subscribe, TOPIC, BATCH).await;
        assert_eq!(p.topic, format!("{TOPIC}/status"));
        assert!(p.payload.is_empty());
        expect_on_nats(observer).await;
    }
    let port = fg.mqtt.port().to_string();
    let sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "kp1/demo-v1/dcx/tok-1/json/#",
            "-v",
            "-C",
            "1",
            "-W",
            "10",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-t", TOPIC, "-m"])
        .arg(std::str::from_utf8(BATCH).expect("utf8"))
        .status()
        .expect("mosquitto_pub");
    assert!(status.success());
    let out = sub.wait_with_output().expect("mosquitto_sub");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), format!("{TOPIC}/status (null)"));
    expect_on_nats(observer).await;
}

#[tokio::test]
async fn up_on_nats() {
    let nats = NatsServer::start();
    let mut observer = NatsObserver::connect(&nats.url()).await;
    let fg = Fleetgate::start("up", &with_nats(&nats, &[]));
    every_client_gets_status(&fg, &mut observer).await;
}

#[tokio::test]
async fn gateway_dcx_and_auth_as_separate_processes() {
    let nats = NatsServer::start();
    let mut observer = NatsObserver::connect(&nats.url()).await;
    let env = with_nats(&nats, &[]);
    let _auth = Fleetgate::start("auth", &env);
    let _dcx = Fleetgate::start("dcx", &env);
    let gateway = Fleetgate::start("gateway", &env);
    every_client_gets_status(&gateway, &mut observer).await;
}

/// README's "Running on NATS" on one host: auth, DCX and two gateway replicas, each with its own
/// admin port, the gateways sharing the device ports (`reuse_port`). The kernel spreads
/// connections over both, and every device is answered.
#[tokio::test]
async fn two_gateway_replicas_share_the_device_ports_on_one_host() {
    let nats = NatsServer::start();
    let reuse = [
        ("FLEETGATE_TRANSPORTS_MQTT_REUSE_PORT", "true".to_owned()),
        ("FLEETGATE_TRANSPORTS_COAP_REUSE_PORT", "true".to_owned()),
        ("FLEETGATE_TRANSPORTS_HTTP_REUSE_PORT", "true".to_owned()),
    ];
    let _auth = Fleetgate::start("auth", &with_nats(&nats, &[]));
    let _dcx = Fleetgate::start("dcx", &with_nats(&nats, &[]));
    let first = Fleetgate::start("gateway", &with_nats(&nats, &reuse));
    let mut shared = reuse.to_vec();
    shared.extend([
        ("FLEETGATE_TRANSPORTS_MQTT_LISTEN", first.mqtt.to_string()),
        ("FLEETGATE_TRANSPORTS_COAP_LISTEN", first.coap.to_string()),
        ("FLEETGATE_TRANSPORTS_HTTP_LISTEN", first.http.to_string()),
    ]);
    let second = Fleetgate::start("gateway", &with_nats(&nats, &shared));
    const DEVICES: usize = 24;
    for _ in 0..DEVICES {
        let p = rumqttc_request(first.mqtt, None, TOPIC, BATCH).await;
        assert_eq!(p.topic, format!("{TOPIC}/status"));
    }
    let accepted = |fg: &Fleetgate| {
        fg.metric("fleetgate_transport_connections_accepted_total{transport=\"mqtt\"}")
            .unwrap_or(0.0)
    };
    let (a, b) = (accepted(&first), accepted(&second));
    assert_eq!(a + b, DEVICES as f64, "every connection reached one of the two");
    assert!(a > 0.0 && b > 0.0, "both replicas took connections: {a} and {b}");
}

#[tokio::test]
async fn connectivity_events_on_nats() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let mut events =
        client.subscribe("kaa.v1.events.kpc.endpoint.connectivity.*").await.expect("sub");
    client.flush().await.expect("flush");
    let fg = Fleetgate::start("up", &with_nats(&nats, &[]));
    rumqttc_request(fg.mqtt, None, TOPIC, BATCH).await;
    use futures_util::StreamExt;
    for expected in ["connected", "disconnected"] {
        let msg = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("event")
            .expect("open");
        assert!(msg.subject.ends_with(expected), "{}", msg.subject);
        let event = fleetgate_messages::ConnectedEvent::decode(&msg.payload).expect("decodes");
        assert_eq!(event.endpoints, [("ep-1", "demo-v1")]);
        assert!(event.originator_replica_id.starts_with("kpc-"));
    }
}

/// Two DCX replicas in one queue group share the requests; killing one (SIGKILL) mid-stream
/// loses no request the device already got a `/status` for.
#[tokio::test]
async fn dcx_replicas_share_load_and_a_killed_one_loses_nothing_acknowledged() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    const N: u32 = 400;
    let nats = NatsServer::start();
    let mut observer = NatsObserver::connect(&nats.url()).await;
    let env = with_nats(&nats, &[("FLEETGATE_GATEWAY_REQUEST_TIMEOUT_MS", "2000".into())]);
    let _auth = Fleetgate::start("auth", &env);
    let mut dcx_a = Fleetgate::start("dcx", &env);
    let _dcx_b = Fleetgate::start("dcx", &env);
    let gateway = Fleetgate::start("gateway", &env);

    let mut options = MqttOptions::new("replicas", "127.0.0.1", gateway.mqtt.port());
    options.set_inflight(50);
    let (client, mut events) = AsyncClient::new(options, 64);
    let publisher = tokio::spawn(async move {
        for seq in 1..=N {
            let topic = format!("kp1/demo-v1/dcx/tok-1/json/{seq}");
            let payload = format!("[{{\"seq\":{seq}}}]");
            client.publish(topic, QoS::AtLeastOnce, false, payload).await.expect("publish");
            if seq % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        client
    });
    let mut acknowledged = BTreeSet::new();
    let mut failed = BTreeSet::new();
    let mut killed = false;
    tokio::time::timeout(Duration::from_secs(60), async {
        while acknowledged.len() + failed.len() < N as usize {
            let Event::Incoming(Packet::Publish(p)) = events.poll().await.expect("connected")
            else {
                continue;
            };
            let mut levels = p.topic.rsplit('/');
            let outcome = levels.next().expect("suffix");
            let seq: u32 = levels.next().and_then(|s| s.parse().ok()).expect("request id");
            match outcome {
                "status" => acknowledged.insert(seq),
                _ => failed.insert(seq),
            };
            if !killed && acknowledged.len() >= 100 {
                dcx_a.kill();
                killed = true;
            }
        }
    })
    .await
    .expect("every request answered");
    let _client = publisher.await.expect("publisher");
    eprintln!("acknowledged {}, failed {}", acknowledged.len(), failed.len());
    assert!(killed);
    assert!(
        acknowledged.len() > 200,
        "the surviving replica took over: {} acknowledged",
        acknowledged.len()
    );

    // Every acknowledged request's samples reached NATS, and both replicas did some of the work.
    let mut seen = HashSet::new();
    let mut replicas = HashSet::new();
    for msg in observer.drain_samples(Duration::from_millis(500)).await {
        let event = DataSamplesEvent::decode(&msg.payload).expect("decodes");
        for sample in event.data_samples {
            let v: serde_json::Value = serde_json::from_slice(sample).expect("sample is JSON");
            seen.insert(v["seq"].as_u64().expect("seq") as u32);
        }
        if let Some(reply) = msg.reply {
            replicas.insert(reply.split('.').nth(3).unwrap_or_default().to_owned());
        }
    }
    let lost: Vec<_> = acknowledged.iter().filter(|s| !seen.contains(s)).collect();
    assert!(lost.is_empty(), "acknowledged but never broadcast: {lost:?}");
    assert_eq!(replicas.len(), 2, "both DCX replicas served requests: {replicas:?}");
    assert!(failed.iter().all(|s| !acknowledged.contains(s)));
}

/// Answers every `DataSamplesEvent` as receiver `name` with `status`.
async fn receiver(url: String, name: &'static str, status: i32) {
    use fleetgate_messages::DataSamplesProcessed;
    use futures_util::StreamExt;
    let client = async_nats::connect(url).await.expect("receiver connects");
    let mut events = client
        .subscribe("kaa.v1.events.dcx.endpoint.data-collection.data-samples-received")
        .await
        .expect("sub");
    client.flush().await.expect("flush");
    while let Some(msg) = events.next().await {
        let event = DataSamplesEvent::decode(&msg.payload).expect("decodes");
        let answer = DataSamplesProcessed {
            correlation_id: event.correlation_id,
            timestamp_ms: 0,
            timeout_ms: 0,
            receiver_service_instance_name: name,
            status_code: status,
            reason_phrase: (status != 200).then_some("disk full"),
        };
        let reply = msg.reply.expect("reply subject");
        client.publish(reply, answer.to_bytes()).await.expect("answer");
    }
}

#[tokio::test]
async fn dcx_waits_for_its_reliable_receivers() {
    let nats = NatsServer::start();
    let env = with_nats(
        &nats,
        &[
            ("FLEETGATE_DCX_RELIABLE_RECEIVERS", "[epts, archive]".into()),
            ("FLEETGATE_DCX_RECEIVER_TIMEOUT_MS", "700".into()),
        ],
    );
    let fg = Fleetgate::start("up", &env);

    // Only one of the two receivers answers: 504 once the receiver timeout has passed.
    let epts = tokio::spawn(receiver(nats.url(), "epts", 200));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let p = rumqttc_request(fg.mqtt, None, "kp1/demo-v1/dcx/tok-1/json/1", BATCH).await;
    assert_eq!(p.topic, "kp1/demo-v1/dcx/tok-1/json/1/error");
    assert!(std::str::from_utf8(&p.payload).expect("utf8").contains("504"), "{p:?}");
    assert!(started.elapsed() >= Duration::from_millis(600));

    // Both answer 200: the device hears 200.
    let archive = tokio::spawn(receiver(nats.url(), "archive", 200));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p = rumqttc_request(fg.mqtt, None, "kp1/demo-v1/dcx/tok-1/json/2", BATCH).await;
    assert_eq!(p.topic, "kp1/demo-v1/dcx/tok-1/json/2/status");
    archive.abort();

    // A receiver that fails passes its status on.
    let failing = tokio::spawn(receiver(nats.url(), "archive", 507));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p = rumqttc_request(fg.mqtt, None, "kp1/demo-v1/dcx/tok-1/json/3", BATCH).await;
    assert_eq!(p.topic, "kp1/demo-v1/dcx/tok-1/json/3/error");
    let body: serde_json::Value = serde_json::from_slice(&p.payload).expect("json");
    assert_eq!(body["statusCode"], 507);
    failing.abort();
    epts.abort();
}

/// When NATS stops reading, the gateway stops acknowledging (and reading) instead of buffering
/// without limit; when NATS resumes, everything goes through.
#[tokio::test]
async fn a_stalled_nats_slows_devices_down_and_acknowledges_nothing_it_cannot_deliver() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    const N: usize = 4000;
    let nats = NatsServer::start();
    // Without a spool: what the bus cannot take is not acknowledged (with one, it would be
    // acknowledged as stored; tests/chaos.rs).
    let env = with_nats(
        &nats,
        &[
            ("FLEETGATE_NATS_PUBLISH_CAPACITY", "16".into()),
            ("FLEETGATE_GATEWAY_SPOOL_ENABLED", "false".into()),
        ],
    );
    let fg = Fleetgate::start("up", &env);
    // Validate the token and connect while NATS still answers: only publishing is tested here.
    rumqttc_request(fg.mqtt, None, TOPIC, BATCH).await;
    let mut options = MqttOptions::new("stall", "127.0.0.1", fg.mqtt.port());
    options.set_inflight(1000).set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(options, 100);
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await.expect("connects") {
            break;
        }
    }
    let payload = format!("[\"{}\"]", "x".repeat(16 * 1024));
    nats.freeze(true);
    let publisher = tokio::spawn(async move {
        for _ in 0..N {
            // No request id: only the PUBACK tells that the gateway took the message.
            let topic = "kp1/demo-v1/dcx/tok-1/json";
            client.publish(topic, QoS::AtLeastOnce, false, payload.clone()).await.expect("queue");
        }
        client
    });
    let mut acked = 0;
    let count_acks = |acked: &mut usize, event| {
        if let Event::Incoming(Packet::PubAck(_)) = event {
            *acked += 1;
        }
    };
    let stall = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(event) = tokio::time::timeout_at(stall, events.poll()).await {
        count_acks(&mut acked, event.expect("connected"));
    }
    let acked_while_frozen = acked;
    // A PUBACK means DCX has the message (DESIGN decision 9): nothing is acknowledged while
    // the bus cannot deliver, however much the socket to NATS still buffers.
    assert_eq!(acked_while_frozen, 0, "acknowledged while NATS was frozen");
    nats.freeze(false);
    tokio::time::timeout(Duration::from_secs(60), async {
        while acked < N {
            count_acks(&mut acked, events.poll().await.expect("connected"));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {acked} of {N} acknowledged after NATS resumed"));
    let _client = publisher.await.expect("publisher");
    eprintln!("acknowledged while frozen: {acked_while_frozen} of {N}");
}

/// A NATS restart: readiness fails while the bus is down and requests succeed again after.
#[tokio::test]
async fn survives_a_nats_restart() {
    let mut nats = NatsServer::start();
    let fg = Fleetgate::start("up", &with_nats(&nats, &[]));
    let p = rumqttc_request(fg.mqtt, None, TOPIC, BATCH).await;
    assert!(p.topic.ends_with("/status"));
    nats.kill();
    fleetgate_testkit::eventually("/readyz to fail", Duration::from_secs(10), || {
        (support::http_get(fg.admin, "/readyz")?.0 == 503).then_some(())
    })
    .await;
    nats.restart();
    fleetgate_testkit::eventually("/readyz to recover", Duration::from_secs(20), || {
        (support::http_get(fg.admin, "/readyz")?.0 == 200).then_some(())
    })
    .await;
    let p = rumqttc_request(fg.mqtt, None, TOPIC, BATCH).await;
    assert!(p.topic.ends_with("/status"), "{p:?}");
}

/// SIGTERM stops the process even when NATS is already gone.
#[tokio::test]
async fn stops_on_sigterm_without_nats() {
    let mut nats = NatsServer::start();
    let mut fg = Fleetgate::start("up", &with_nats(&nats, &[]));
    nats.kill();
    let started = std::time::Instant::now();
    assert_eq!(fg.terminate(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

/// HTTP on NATS: curl's POST is answered 204 and appears as one ClientData and one
/// DataSamplesEvent.
#[tokio::test]
async fn http_request_on_nats() {
    let nats = NatsServer::start();
    let mut observer = NatsObserver::connect(&nats.url()).await;
    let fg = Fleetgate::start("up", &with_nats(&nats, &[]));
    let url = format!("http://{}/{TOPIC}", fg.http);
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "-X", "POST"])
        .args(["--data", std::str::from_utf8(BATCH).expect("utf8"), &url])
        .output()
        .expect("curl runs");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "204");
    expect_on_nats(&mut observer).await;
}

/// After a stall, the burst of answers that had waited (each a `/status` at QoS 1, which a
/// 3.1.1 client takes `max_inflight_v311` at a time) does not cut the device off as slow: the
/// answers had room reserved, and the device gets every one of them.
#[tokio::test]
async fn the_burst_of_answers_after_a_stall_reaches_a_well_behaved_device() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    const N: u32 = 1500;
    let nats = NatsServer::start();
    // No spool: every answer waits for NATS and comes in one burst when it resumes.
    let env = with_nats(&nats, &[("FLEETGATE_GATEWAY_SPOOL_ENABLED", "false".into())]);
    let fg = Fleetgate::start("up", &env);
    rumqttc_request(fg.mqtt, None, TOPIC, BATCH).await;
    let mut options = MqttOptions::new("burst", "127.0.0.1", fg.mqtt.port());
    options.set_inflight(1000);
    let (client, mut events) = AsyncClient::new(options, 100);
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await.expect("connects") {
            break;
        }
    }
    nats.freeze(true);
    let publisher = tokio::spawn(async move {
        for id in 1..=N {
            let topic = format!("kp1/demo-v1/dcx/tok-1/json/{id}");
            client.publish(topic, QoS::AtLeastOnce, false, "[1]").await.expect("queue");
        }
        client
    });
    // Let the requests pile up behind the stall, then release them all at once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.freeze(false);
    let mut answered = HashSet::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while answered.len() < N as usize {
            match events.poll().await.expect("the device stays connected") {
                Event::Incoming(Packet::Publish(p)) if p.topic.ends_with("/status") => {
                    let id: u32 =
                        p.topic.rsplit('/').nth(1).and_then(|s| s.parse().ok()).expect("id");
                    answered.insert(id);
                }
                Event::Incoming(Packet::Disconnect) => panic!("disconnected by the gateway"),
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} of {N} answers arrived", answered.len()));
    let _client = publisher.await.expect("publisher");
    let closed = fg.metric("fleetgate_gateway_slow_sessions_closed_total").unwrap_or(0.0);
    assert_eq!(closed, 0.0, "no session cut off as slow");
}
