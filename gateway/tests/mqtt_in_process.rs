//! `fleetgate up` on the in-process bus, driven by real MQTT clients: rumqttc (3.1.1 and 5.0)
//! and the Mosquitto command-line clients.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use support::{Fleetgate, demo_endpoint_env, rumqttc_request};

const BATCH: &[u8] = br#"[{"temperature":21},{"temperature":22}]"#;

fn up() -> Fleetgate {
    Fleetgate::start("up", &demo_endpoint_env())
}

fn error_body(payload: &[u8]) -> (u64, String) {
    let v: serde_json::Value = serde_json::from_slice(payload).expect("error body is JSON");
    let obj = v.as_object().expect("object");
    assert_eq!(obj.len(), 2, "exactly statusCode and reasonPhrase: {v}");
    (
        v["statusCode"].as_u64().expect("statusCode"),
        v["reasonPhrase"].as_str().expect("reasonPhrase").to_owned(),
    )
}

#[tokio::test]
async fn batch_gets_status_without_subscribe() {
    let fg = up();
    let p = rumqttc_request(fg.mqtt, None, "kp1/demo-v1/dcx/tok-1/json/42", BATCH).await;
    assert_eq!(p.topic, "kp1/demo-v1/dcx/tok-1/json/42/status");
    assert!(p.payload.is_empty());
    assert_eq!(fg.metric("fleetgate_dcx_samples_total"), Some(2.0));
}

#[tokio::test]
async fn batch_gets_status_with_subscribe() {
    let fg = up();
    let filter = "kp1/demo-v1/dcx/tok-1/json/#";
    let p = rumqttc_request(fg.mqtt, Some(filter), "kp1/demo-v1/dcx/tok-1/json/42", BATCH).await;
    assert_eq!(p.topic, "kp1/demo-v1/dcx/tok-1/json/42/status");
    assert!(p.payload.is_empty());
}

#[tokio::test]
async fn mqtt5_client_gets_status() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let fg = up();
    let options = MqttOptions::new("v5-client", "127.0.0.1", fg.mqtt.port());
    let (client, mut events) = AsyncClient::new(options, 16);
    client
        .publish("kp1/demo-v1/dcx/tok-1/json/7", QoS::AtLeastOnce, false, BATCH.to_vec())
        .await
        .expect("publish");
    let publish = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = events.poll().await.expect("connected") {
                return p;
            }
        }
    })
    .await
    .expect("status in time");
    assert_eq!(&publish.topic[..], b"kp1/demo-v1/dcx/tok-1/json/7/status");
    assert!(publish.payload.is_empty());
}

#[tokio::test]
async fn errors_go_to_the_error_topic() {
    let fg = up();
    let cases: [(&str, &[u8], u64); 5] = [
        ("kp1/demo-v1/dcx/tok-1/json/1", b"[{\"temperature\":", 400),
        ("kp1/demo-v1/dcx/unknown-token/json/2", BATCH, 401),
        ("kp1/demo-v1/nosuchext/tok-1/json/3", BATCH, 404),
        ("kp1/demo-v9/dcx/tok-1/json/4", BATCH, 404),
        ("kp1/demo-v1/dcx/tok-1/xml/5", BATCH, 404),
    ];
    for (topic, payload, status) in cases {
        let p = rumqttc_request(fg.mqtt, None, topic, payload).await;
        assert_eq!(p.topic, format!("{topic}/error"));
        let (code, reason) = error_body(&p.payload);
        assert_eq!(code, status, "{topic}: {reason}");
        assert!(!reason.is_empty());
    }
}

#[tokio::test]
async fn plain_metric_and_single_value() {
    let fg = up();
    let p = rumqttc_request(fg.mqtt, None, "kp1/demo-v1/dcx/tok-1/plain/humidity/9", b"47%").await;
    assert_eq!(p.topic, "kp1/demo-v1/dcx/tok-1/plain/humidity/9/status");
    let p = rumqttc_request(fg.mqtt, None, "kp1/demo-v1/dcx/tok-1/json/10", br#"{"t":1}"#).await;
    assert_eq!(p.topic, "kp1/demo-v1/dcx/tok-1/json/10/status");
    assert_eq!(fg.metric("fleetgate_dcx_samples_total"), Some(2.0));
}

fn mosquitto(args: &[&str]) -> Command {
    let mut c = Command::new(args[0]);
    c.args(&args[1..]);
    c
}

#[test]
fn mosquitto_pub_and_sub() {
    let fg = up();
    let port = fg.mqtt.port().to_string();
    let sub = mosquitto(&[
        "mosquitto_sub",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-t",
        "kp1/demo-v1/dcx/tok-1/json/#",
        "-v",
        "-C",
        "2",
        "-W",
        "10",
    ])
    .stdout(std::process::Stdio::piped())
    .spawn()
    .expect("mosquitto_sub is installed (.ci/run installs mosquitto-clients)");
    std::thread::sleep(Duration::from_millis(300));
    for (topic, payload) in
        [("kp1/demo-v1/dcx/tok-1/json/42", BATCH), ("kp1/demo-v1/dcx/tok-1/json/43", &b"[1,"[..])]
    {
        let status = mosquitto(&[
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
            "-t",
            topic,
            "-m",
        ])
        .arg(std::str::from_utf8(payload).expect("utf8"))
        .status()
        .expect("mosquitto_pub is installed");
        assert!(status.success());
    }
    let out = sub.wait_with_output().expect("mosquitto_sub ends");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    // mosquitto_sub -v prints an empty payload as `(null)`.
    assert_eq!(lines[0], "kp1/demo-v1/dcx/tok-1/json/42/status (null)", "empty payload: {text}");
    assert!(
        lines[1].starts_with("kp1/demo-v1/dcx/tok-1/json/43/error {\"statusCode\":400"),
        "{text}"
    );
}

#[test]
fn subscriptions_must_name_a_known_token() {
    let fg = up();
    let port = fg.mqtt.port().to_string();
    for filter in ["kp1/#", "kp1/demo-v1/dcx/+/json/#", "kp1/demo-v1/dcx/unknown-token/#"] {
        let out = mosquitto(&[
            "mosquitto_sub",
            "-V",
            "mqttv5",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            filter,
            "-C",
            "1",
            "-W",
            "5",
        ])
        .output()
        .expect("mosquitto_sub");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("denied"), "{filter}: {err}");
    }
}

/// Reads until the server closes the connection; panics if it stays open.
fn expect_closed(mut s: TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("connection not closed: {e}"),
        }
    }
}

const CONNECT_V311: &[u8] = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04test";
const CONNECT_V5: &[u8] = b"\x10\x11\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x04test";

#[test]
fn oversized_packet_is_a_clean_disconnect() {
    let fg = Fleetgate::start(
        "up",
        &[("FLEETGATE_TRANSPORTS_MQTT_MAX_PACKET_SIZE_BYTES", "1024".into())],
    );
    // MQTT 5: DISCONNECT with 0x95 Packet too large, sent before any of the body arrives.
    let mut s = TcpStream::connect(fg.mqtt).expect("connect");
    s.write_all(CONNECT_V5).expect("connect");
    s.write_all(b"\x30\xff\xff\x03").expect("header of a 65535-byte PUBLISH");
    let got = expect_closed(s);
    assert!(got.starts_with(b"\x20"), "CONNACK first: {got:02x?}");
    assert!(
        got.windows(3).any(|w| w == b"\xe0\x01\x95" || w == b"\xe0\x02\x95"),
        "DISCONNECT 0x95: {got:02x?}"
    );
    // MQTT 3.1.1: the connection is closed.
    let mut s = TcpStream::connect(fg.mqtt).expect("connect");
    s.write_all(CONNECT_V311).expect("connect");
    s.write_all(b"\x30\xff\xff\x03").expect("oversized header");
    let got = expect_closed(s);
    assert_eq!(got, b"\x20\x02\x00\x00", "only the CONNACK");
    // The gateway still serves others.
    let mut s = TcpStream::connect(fg.mqtt).expect("connect");
    s.write_all(CONNECT_V311).expect("connect");
    s.write_all(b"\xc0\x00").expect("pingreq");
    let mut buf = [0u8; 6];
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    s.read_exact(&mut buf).expect("connack and pingresp");
    assert_eq!(&buf, b"\x20\x02\x00\x00\xd0\x00");
    assert_eq!(
        fg.metric("fleetgate_transport_protocol_errors_total{transport=\"mqtt\"}"),
        Some(2.0)
    );
}

#[test]
fn truncated_and_garbage_frames_disconnect() {
    let fg = up();
    let cases: [&[u8]; 6] = [
        b"\xff\xff\xff\xff\xff\xff",                         // not MQTT at all
        b"\x30\x05\x00\x03abc",                              // PUBLISH before CONNECT
        b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x09te", // CONNECT whose client id runs past the packet
        b"\x10\x80\x80\x80\x80\x01",                       // remaining length of five bytes
        b"\x10\x10\x00\x04MQTT\x07\x02\x00\x3c\x00\x04test", // protocol level 7
        b"\x10\x10\x00\x04MQTT\x04\x03\x00\x3c\x00\x04test", // reserved CONNECT flag set
    ];
    for bytes in cases {
        let mut s = TcpStream::connect(fg.mqtt).expect("connect");
        s.write_all(bytes).expect("write");
        let _ = s.shutdown(std::net::Shutdown::Write);
        expect_closed(s);
    }
    // After CONNECT: a PUBLISH with QoS 3, one with a wildcard topic, one cut short.
    let after_connect: [&[u8]; 3] =
        [b"\x36\x05\x00\x01a\x00\x01", b"\x30\x05\x00\x03a/#", b"\x32\x09\x00\x03a/b"];
    for bytes in after_connect {
        let mut s = TcpStream::connect(fg.mqtt).expect("connect");
        s.write_all(CONNECT_V311).expect("connect");
        s.write_all(bytes).expect("write");
        let _ = s.shutdown(std::net::Shutdown::Write);
        expect_closed(s);
    }
    // Still alive and serving.
    assert_eq!(support::http_get(fg.admin, "/healthz").map(|r| r.0), Some(200));
    assert_eq!(support::http_get(fg.admin, "/livez").map(|r| r.0), Some(200));
}

#[test]
fn qos2_is_refused() {
    let fg = up();
    let mut s = TcpStream::connect(fg.mqtt).expect("connect");
    s.write_all(CONNECT_V5).expect("connect");
    s.write_all(b"\x34\x0a\x00\x03a/b\x00\x01\x00xy").expect("QoS 2 publish");
    let got = expect_closed(s);
    assert!(
        got.windows(3).any(|w| w == b"\xe0\x01\x9b" || w == b"\xe0\x02\x9b"),
        "DISCONNECT 0x9B: {got:02x?}"
    );
}

#[test]
fn keep_alive_timeout_closes() {
    let fg = up();
    let mut s = TcpStream::connect(fg.mqtt).expect("connect");
    // Keep-alive 1 s: silent for 1.5 s means gone.
    s.write_all(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x01\x00\x04test").expect("connect");
    let started = std::time::Instant::now();
    let got = expect_closed(s);
    assert_eq!(got, b"\x20\x02\x00\x00");
    assert!(started.elapsed() >= Duration::from_millis(1400), "{:?}", started.elapsed());
}

#[test]
fn traffic_keeps_a_connection_alive_and_an_idle_one_still_answers() {
    let fg = up();
    let ping = |s: &mut TcpStream| {
        s.write_all(b"\xc0\x00").expect("PINGREQ");
        let mut pong = [0u8; 2];
        s.read_exact(&mut pong).expect("PINGRESP");
        assert_eq!(&pong, b"\xd0\x00");
    };
    let connect = |keep_alive: u8| {
        let mut s = TcpStream::connect(fg.mqtt).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut packet = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x01\x00\x04test".to_vec();
        packet[11] = keep_alive;
        s.write_all(&packet).expect("CONNECT");
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack).expect("CONNACK");
        assert_eq!(&connack, b"\x20\x02\x00\x00");
        s
    };
    // Keep-alive 1 s (closed after 1.5 s of silence), but a packet every 0.4 s for 2.4 s.
    let mut busy = connect(1);
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(400));
        ping(&mut busy);
    }
    // Silent for longer than the 2 s after which a connection gives its buffers back.
    let mut idle = connect(10);
    std::thread::sleep(Duration::from_millis(2500));
    ping(&mut idle);
    ping(&mut idle);
}

#[test]
fn a_device_that_publishes_and_hangs_up_is_let_go() {
    let fg = up();
    let open = r#"fleetgate_transport_connections_open{transport="mqtt"}"#;
    let topic = b"kp1/demo-v1/dcx/tok-1/json";
    let payload = br#"[{"t":1}]"#;
    let mut publish = vec![0x30, (2 + topic.len() + payload.len()) as u8, 0, topic.len() as u8];
    publish.extend_from_slice(topic);
    publish.extend_from_slice(payload);
    // Keep-alive 0: the gateway times these out only after 1.5 × max_keep_alive_secs, so
    // reading the FIN is what ends them. The FIN follows the last packet at once, often in the
    // same read as the data before it.
    for round in 0..20 {
        // A client id of its own each (4 bytes): one in use would take the last one over.
        let mut keep_alive_off = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x00\x00\x04".to_vec();
        keep_alive_off.extend_from_slice(format!("t{round:03}").as_bytes());
        let keep_alive_off = &keep_alive_off[..];
        let mut s = TcpStream::connect(fg.mqtt).expect("connect");
        if round % 2 == 0 {
            let mut both = keep_alive_off.to_vec();
            both.extend_from_slice(&publish);
            s.write_all(&both).expect("CONNECT and PUBLISH");
        } else {
            s.write_all(keep_alive_off).expect("CONNECT");
            let mut connack = [0u8; 4];
            s.read_exact(&mut connack).expect("CONNACK");
            s.write_all(&publish).expect("PUBLISH");
        }
        s.shutdown(std::net::Shutdown::Write).expect("FIN");
        drop(s);
    }
    let received = r#"fleetgate_transport_messages_received_total{transport="mqtt"}"#;
    let wait_for = |name: &str, value: f64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while fg.metric(name) != Some(value) {
            assert!(std::time::Instant::now() < deadline, "{name}: {:?}", fg.metric(name));
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for(received, 20.0);
    wait_for(open, 0.0);
}
