//! The shared transport compliance kit against the MQTT transport, in both protocol versions.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleetgate_transport_core::compliance::{self, Answer, KpClient, ScriptedGateway};
use fleetgate_transport_core::metrics::TransportMetrics;
use fleetgate_transport_mqtt::codec::{
    Codec, Connect, Packet, ProtocolVersion, PubAck, Publish, PublishProperties, QoS, ReasonCode,
};
use fleetgate_transport_mqtt::server::{MqttConfig, MqttTransport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct MqttClient {
    stream: TcpStream,
    codec: Codec,
    read: BytesMut,
    next_id: u16,
}

impl MqttClient {
    async fn connect(
        addr: SocketAddr,
        version: ProtocolVersion,
        credentials: Option<(&str, &str)>,
    ) -> Result<Self, u16> {
        let mut codec = Codec::new(1 << 20);
        codec.set_version(version);
        let stream = TcpStream::connect(addr).await.map_err(|_| 503u16)?;
        let mut client = Self { stream, codec, read: BytesMut::new(), next_id: 0 };
        let connect = Connect {
            protocol_version: version,
            clean_start: true,
            keep_alive_secs: 30,
            client_id: Bytes::from_static(b"compliance"),
            will: None,
            username: credentials.map(|(u, _)| Bytes::copy_from_slice(u.as_bytes())),
            password: credentials.map(|(_, p)| Bytes::copy_from_slice(p.as_bytes())),
            properties: Default::default(),
        };
        client.send(&Packet::Connect(Box::new(connect))).await;
        match client.next(Duration::from_secs(5)).await {
            Some(Packet::ConnAck(c)) if c.reason_code == ReasonCode::Success => Ok(client),
            Some(Packet::ConnAck(c)) if c.reason_code == ReasonCode::BadUserNameOrPassword => {
                Err(401)
            }
            other => panic!("unexpected answer to CONNECT: {other:?}"),
        }
    }

    async fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        self.codec.encode(packet, &mut out).expect("encode");
        self.stream.write_all(&out).await.expect("write");
    }

    async fn next(&mut self, wait: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(p) = self.codec.decode(&mut self.read).expect("valid MQTT from the server")
            {
                return Some(p);
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.read)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    /// The next PUBLISH (acknowledged if QoS 1) as an answer.
    async fn next_answer(&mut self, wait: Duration) -> Option<(Bytes, Answer)> {
        loop {
            let Packet::Publish(p) = self.next(wait).await? else { continue };
            if let Some(id) = p.packet_id {
                self.send(&Packet::PubAck(PubAck::new(id))).await;
            }
            let status = if p.topic.ends_with(b"/status") {
                200
            } else {
                let body: serde_json::Value = serde_json::from_slice(&p.payload).expect("json");
                body["statusCode"].as_u64().and_then(|s| u16::try_from(s).ok()).expect("code")
            };
            return Some((p.topic, Answer { status, payload: p.payload }));
        }
    }
}

impl KpClient for MqttClient {
    const ANSWERS_REQUESTS_WITHOUT_ID: bool = false;

    async fn request(&mut self, path: &str, payload: &[u8], wait: Duration) -> Option<Answer> {
        self.next_id += 1;
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: Bytes::copy_from_slice(path.as_bytes()),
            packet_id: Some(self.next_id),
            properties: PublishProperties::default(),
            payload: Bytes::copy_from_slice(payload),
        };
        self.send(&Packet::Publish(publish)).await;
        let (topic, answer) = self.next_answer(wait).await?;
        let topic = String::from_utf8_lossy(&topic);
        assert!(
            topic == format!("{path}/status") || topic == format!("{path}/error"),
            "answer on {topic} for {path}"
        );
        Some(answer)
    }

    async fn observe(&mut self, _path: &str) {
        // Pushes reach the connection that used the token; no subscription needed.
    }

    async fn next_push(&mut self, wait: Duration) -> Option<Answer> {
        self.next_answer(wait).await.map(|(_, answer)| answer)
    }
}

async fn serve(gateway: Arc<ScriptedGateway>) -> SocketAddr {
    let config = MqttConfig { listen: "127.0.0.1:0".parse().expect("addr"), ..Default::default() };
    let transport = MqttTransport::new(config, &TransportMetrics::default());
    let (addr, stop) = compliance::start(Box::new(transport), gateway);
    // Served for the rest of the test process.
    std::mem::forget(stop);
    addr
}

#[tokio::test]
async fn mqtt_3_1_1_passes_the_compliance_kit() {
    let gateway = Arc::new(ScriptedGateway::default());
    let addr = serve(gateway.clone()).await;
    compliance::run(&gateway, |creds| MqttClient::connect(addr, ProtocolVersion::V311, creds))
        .await;
}

#[tokio::test]
async fn mqtt_5_passes_the_compliance_kit() {
    let gateway = Arc::new(ScriptedGateway::default());
    let addr = serve(gateway.clone()).await;
    compliance::run(&gateway, |creds| MqttClient::connect(addr, ProtocolVersion::V5, creds)).await;
}
