//! The shared transport compliance kit against MQTT over QUIC (single stream), in both
//! protocol versions, with a quinn client; and the limits of single-stream mode.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleetgate_tls::rustls;
use fleetgate_tls::test_certs::TestFiles;
use fleetgate_transport_core::compliance::{self, Answer, KpClient, ScriptedGateway};
use fleetgate_transport_core::metrics::TransportMetrics;
use fleetgate_transport_mqtt::codec::{
    Codec, Connect, Packet, ProtocolVersion, PubAck, Publish, PublishProperties, QoS, ReasonCode,
};
use fleetgate_transport_mqtt::server::MqttConfig;
use fleetgate_transport_quic::{ALPN, QuicConfig, QuicTransport};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use tokio::io::AsyncReadExt;

struct MqttClient {
    _endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    codec: Codec,
    read: BytesMut,
    next_id: u16,
}

fn endpoint(ca: &Path, alpn: &[u8]) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(fleetgate_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint
}

impl MqttClient {
    async fn connect(
        addr: SocketAddr,
        ca: &Path,
        version: ProtocolVersion,
        credentials: Option<(&str, &str)>,
    ) -> Result<Self, u16> {
        let endpoint = endpoint(ca, ALPN);
        let connection = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
        let (send, recv) = connection.open_bi().await.unwrap();
        let mut codec = Codec::new(1 << 20);
        codec.set_version(version);
        let mut client = Self {
            _endpoint: endpoint,
            connection,
            send,
            recv,
            codec,
            read: BytesMut::new(),
            next_id: 0,
        };
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
        self.send.write_all(&out).await.expect("write");
    }

    async fn next(&mut self, wait: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(p) = self.codec.decode(&mut self.read).expect("valid MQTT from the server")
            {
                return Some(p);
            }
            match tokio::time::timeout_at(deadline, self.recv.read_buf(&mut self.read)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

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

    async fn observe(&mut self, _path: &str) {}

    async fn next_push(&mut self, wait: Duration) -> Option<Answer> {
        self.next_answer(wait).await.map(|(_, answer)| answer)
    }
}

async fn serve(
    files: &TestFiles,
    gateway: Arc<ScriptedGateway>,
) -> (SocketAddr, fleetgate_transport_core::ShutdownHandle) {
    let config = QuicConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: files.tls_config(false),
        ..Default::default()
    };
    let transport = QuicTransport::new(config, MqttConfig::default(), &TransportMetrics::default());
    compliance::start(Box::new(transport), gateway)
}

#[tokio::test]
async fn mqtt_over_quic_passes_the_compliance_kit() {
    let dir = tempfile::tempdir().unwrap();
    let files = TestFiles::write(dir.path());
    let gateway = Arc::new(ScriptedGateway::default());
    let (addr, stop) = serve(&files, gateway.clone()).await;
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let ca = files.ca.clone();
        compliance::run(&gateway, |creds| MqttClient::connect(addr, &ca, version, creds)).await;
    }
    stop.stop();
}

#[tokio::test]
async fn single_stream_mode_limits_and_close() {
    let dir = tempfile::tempdir().unwrap();
    let files = TestFiles::write(dir.path());
    let gateway = Arc::new(ScriptedGateway::default());
    let (addr, stop) = serve(&files, gateway.clone()).await;

    // A bad ALPN is refused at the handshake.
    let other = endpoint(&files.ca, b"h3");
    assert!(other.connect(addr, "localhost").unwrap().await.is_err());

    let mut client = MqttClient::connect(addr, &files.ca, ProtocolVersion::V5, None).await.unwrap();
    // No second bidirectional stream for the client.
    let second = tokio::time::timeout(Duration::from_millis(500), client.connection.open_bi());
    assert!(second.await.is_err(), "a second bidirectional stream was granted");
    // The MQTT stream still works.
    let path = format!("kp1/{}/echo/{}/json/1", compliance::APP_VERSION, compliance::TOKEN);
    let answer = client.request(&path, b"{}", Duration::from_secs(5)).await.unwrap();
    assert_eq!(answer.status, 200);
    // Closing the stream closes the connection.
    client.send.finish().unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), client.connection.closed());
    assert!(closed.await.is_ok(), "the connection outlived its stream");
    stop.stop();
}
