//! The shared transport compliance kit, run over real UDP sockets with the FGU/1 device.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetgate_kp::{error_body, parse_request_id};
use fleetgate_transport_core::compliance::{self, Answer, KpClient, ScriptedGateway};
use fleetgate_transport_core::metrics::TransportMetrics;
use fleetgate_transport_udp::device::{Device, Reply};
use fleetgate_transport_udp::handshake::{Hello, KeyPair};
use fleetgate_transport_udp::{UdpConfig, UdpTransport};

struct Client {
    device: Device,
}

fn answer(reply: Reply) -> Answer {
    let payload = if (200..300).contains(&reply.status) {
        Bytes::from(reply.payload)
    } else {
        error_body(reply.status, &String::from_utf8_lossy(&reply.payload))
    };
    Answer { status: reply.status, payload }
}

impl KpClient for Client {
    const ANSWERS_REQUESTS_WITHOUT_ID: bool = false;

    async fn request(&mut self, path: &str, payload: &[u8], wait: Duration) -> Option<Answer> {
        let mut levels: Vec<&str> = path.split('/').collect();
        let id = levels.last().and_then(|l| parse_request_id(l));
        if id.is_some() {
            levels.pop();
        }
        // The session fixes app version and token: a path that is not theirs is sent with an
        // empty extension name, which the gateway refuses with 404 as the kit expects.
        let ours = levels.len() >= 5
            && levels[0] == "kp1"
            && levels[1] == compliance::APP_VERSION
            && levels[3] == compliance::TOKEN;
        let (ext, resource) = if ours {
            (levels[2], format!("/{}", levels[4..].join("/")))
        } else {
            ("", "/".into())
        };
        match id {
            Some(id) => self.device.request(ext, &resource, id, payload, wait).await.map(answer),
            None => {
                self.device.send(ext, &resource, None, payload).await.ok()?;
                self.device.next_unsolicited(wait).await.map(answer)
            }
        }
    }

    async fn observe(&mut self, _path: &str) {}

    async fn next_push(&mut self, wait: Duration) -> Option<Answer> {
        self.device.next_push(wait).await.map(answer)
    }
}

#[tokio::test]
async fn passes_the_compliance_kit() {
    let keys = KeyPair::generate().unwrap();
    let config = UdpConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        extension_aliases: vec!["echo".into()],
        ..UdpConfig::default()
    };
    let transport = UdpTransport::with_key_pair(config, keys.clone(), &TransportMetrics::default());
    let gateway = Arc::new(ScriptedGateway::default());
    let (addr, _stop) = compliance::start(Box::new(transport), gateway.clone());
    let public = keys.public;
    compliance::run(&gateway, |credentials| async move {
        let hello = Hello {
            app_version: compliance::APP_VERSION,
            token: Some(compliance::TOKEN),
            username: credentials.map(|(u, _)| u),
            password: credentials.map(|(_, p)| p.as_bytes()),
        };
        match Device::connect(addr, &public, &hello, Duration::from_secs(5)).await {
            Ok(device) => Ok(Client { device }),
            Err(fleetgate_transport_udp::device::DeviceError::Protocol(
                fleetgate_transport_udp::client::ClientError::Refused { status, .. },
            )) => Err(status),
            Err(e) => panic!("connect: {e}"),
        }
    })
    .await;
}
