//! The shared transport compliance kit against MQTT over TLS and over WebSocket (plain and
//! TLS), in both protocol versions.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fleetgate_tls::rustls;
use fleetgate_tls::test_certs::TestFiles;
use fleetgate_transport_core::compliance::{self, Answer, KpClient, ScriptedGateway};
use fleetgate_transport_core::metrics::TransportMetrics;
use fleetgate_transport_mqtt::codec::{
    Codec, Connect, Packet, ProtocolVersion, PubAck, Publish, PublishProperties, QoS, ReasonCode,
};
use fleetgate_transport_mqtt::server::MqttConfig;
use fleetgate_transport_mqtt_secure::{MqttWsConfig, MqttWsTransport, MqttsConfig, MqttsTransport};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// How the client reaches the server.
#[derive(Clone, Copy)]
enum Via {
    Tls,
    Ws,
    Wss,
}

struct MqttClient {
    rd: Reader,
    wr: Writer,
    /// WebSocket framing on top of the byte stream.
    ws: bool,
    raw: BytesMut,
    /// A WebSocket close frame arrived.
    closed: bool,
    codec: Codec,
    read: BytesMut,
    next_id: u16,
}

fn connector(ca: &Path) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(fleetgate_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

impl MqttClient {
    async fn open(addr: SocketAddr, via: Via, ca: &Path) -> (Reader, Writer) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut rd, mut wr): (Reader, Writer) = match via {
            Via::Ws => {
                let (r, w) = tcp.into_split();
                (Box::new(r), Box::new(w))
            }
            Via::Tls | Via::Wss => {
                let name = ServerName::try_from("localhost").unwrap();
                let tls = connector(ca).connect(name, tcp).await.unwrap();
                let (r, w) = tokio::io::split(tls);
                (Box::new(r), Box::new(w))
            }
        };
        if matches!(via, Via::Ws | Via::Wss) {
            let upgrade = "GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n";
            wr.write_all(upgrade.as_bytes()).await.unwrap();
            // The 101 answer, byte by byte up to its blank line (frames may follow it).
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(rd.read_u8().await.unwrap());
            }
            let head = String::from_utf8(head).unwrap();
            assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
            assert!(head.contains("Sec-WebSocket-Protocol: mqtt\r\n"), "{head}");
        }
        (rd, wr)
    }

    async fn connect(
        addr: SocketAddr,
        via: Via,
        ca: &Path,
        version: ProtocolVersion,
        credentials: Option<(&str, &str)>,
    ) -> Result<Self, u16> {
        let (rd, wr) = Self::open(addr, via, ca).await;
        let mut codec = Codec::new(1 << 20);
        codec.set_version(version);
        let ws = matches!(via, Via::Ws | Via::Wss);
        let mut client = Self {
            rd,
            wr,
            ws,
            raw: BytesMut::new(),
            closed: false,
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
        if self.ws {
            // One masked binary frame (a zero mask leaves the payload as it is).
            let mut frame = vec![0x82];
            match out.len() {
                n @ 0..=125 => frame.push(0x80 | n as u8),
                n @ 126..=0xFFFF => {
                    frame.push(0x80 | 126);
                    frame.extend_from_slice(&(n as u16).to_be_bytes());
                }
                n => {
                    frame.push(0x80 | 127);
                    frame.extend_from_slice(&(n as u64).to_be_bytes());
                }
            }
            frame.extend_from_slice(&[0, 0, 0, 0]);
            frame.extend_from_slice(&out);
            self.wr.write_all(&frame).await.expect("write");
        } else {
            self.wr.write_all(&out).await.expect("write");
        }
        self.wr.flush().await.expect("flush");
    }

    /// Moves the payloads of complete server frames from `raw` to `read`.
    fn unframe(&mut self) {
        loop {
            let Some(&[b0, b1]) = self.raw.get(..2) else { return };
            assert_eq!(b1 & 0x80, 0, "server frames are not masked");
            let (len, at) = match b1 & 0x7F {
                126 if self.raw.len() >= 4 => {
                    (usize::from(u16::from_be_bytes([self.raw[2], self.raw[3]])), 4)
                }
                127 if self.raw.len() >= 10 => {
                    (u64::from_be_bytes(self.raw[2..10].try_into().unwrap()) as usize, 10)
                }
                126 | 127 => return,
                n => (usize::from(n), 2),
            };
            if self.raw.len() < at + len {
                return;
            }
            self.raw.advance(at);
            let payload = self.raw.split_to(len);
            match b0 & 0x0F {
                2 => self.read.extend_from_slice(&payload),
                // The server closes (after a refusing CONNACK, a DISCONNECT, ...).
                8 => self.closed = true,
                other => panic!("unexpected frame opcode {other}"),
            }
        }
    }

    async fn next(&mut self, wait: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(p) = self.codec.decode(&mut self.read).expect("valid MQTT from the server")
            {
                return Some(p);
            }
            if self.closed {
                return None;
            }
            let target = if self.ws { &mut self.raw } else { &mut self.read };
            match tokio::time::timeout_at(deadline, self.rd.read_buf(target)).await {
                Ok(Ok(n)) if n > 0 => {
                    if self.ws {
                        self.unframe();
                    }
                }
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

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn run(via: Via, version: ProtocolVersion) {
    let dir = tempfile::tempdir().unwrap();
    let files = TestFiles::write(dir.path());
    let gateway = Arc::new(ScriptedGateway::default());
    let metrics = TransportMetrics::default();
    let transport: Box<dyn fleetgate_transport_core::Transport> = match via {
        Via::Tls => {
            let config = MqttsConfig {
                listen: any_port(),
                tls: files.tls_config(false),
                ..Default::default()
            };
            Box::new(MqttsTransport::new(config, MqttConfig::default(), &metrics))
        }
        Via::Ws | Via::Wss => {
            let config = MqttWsConfig {
                listen: any_port(),
                tls_enabled: matches!(via, Via::Wss),
                tls: files.tls_config(false),
                ..Default::default()
            };
            Box::new(MqttWsTransport::new(config, MqttConfig::default(), &metrics))
        }
    };
    let (addr, stop) = compliance::start(transport, gateway.clone());
    let ca = files.ca.clone();
    compliance::run(&gateway, |creds| MqttClient::connect(addr, via, &ca, version, creds)).await;
    stop.stop();
}

#[tokio::test]
async fn mqtt_over_tls_passes_the_compliance_kit() {
    run(Via::Tls, ProtocolVersion::V311).await;
    run(Via::Tls, ProtocolVersion::V5).await;
}

#[tokio::test]
async fn mqtt_over_websocket_passes_the_compliance_kit() {
    run(Via::Ws, ProtocolVersion::V311).await;
    run(Via::Ws, ProtocolVersion::V5).await;
}

#[tokio::test]
async fn mqtt_over_secure_websocket_passes_the_compliance_kit() {
    run(Via::Wss, ProtocolVersion::V5).await;
}
