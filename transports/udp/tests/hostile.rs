//! Reflection through FGU/1 (SPEC §6): a captured packet raced from a spoofed address moves a
//! session there, and the gateway then sends that address no more than it received from it,
//! pushes included, until the device answers the PING challenge from there. A real device on
//! another session is served meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleetgate_transport_core::compliance::{self, ScriptedGateway};
use fleetgate_transport_core::metrics::TransportMetrics;
use fleetgate_transport_udp::client::{Connecting, Established};
use fleetgate_transport_udp::device::Device;
use fleetgate_transport_udp::handshake::{Hello, KeyPair};
use fleetgate_transport_udp::wire::{Ext, Frame, Frames};
use fleetgate_transport_udp::{UdpConfig, UdpTransport};
use tokio::net::UdpSocket;

/// Everything `socket` receives within `wait`, as datagrams.
async fn drain(socket: &UdpSocket, wait: Duration) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 2048];
    while let Ok(Ok(n)) = tokio::time::timeout(wait, socket.recv(&mut buf)).await {
        got.push(buf[..n].to_vec());
    }
    got
}

fn frames_of(session: &mut Established, datagram: &[u8]) -> Vec<String> {
    let plain = session.open(datagram).expect("authentic");
    Frames::new(&plain).map(|f| format!("{:?}", f.expect("frame"))).collect()
}

async fn handshake(socket: &UdpSocket, public: &[u8; 32]) -> Established {
    let hello = Hello {
        app_version: compliance::APP_VERSION,
        token: Some(compliance::TOKEN),
        username: None,
        password: None,
    };
    let mut connecting = Connecting::new(public, 77, &hello, None).unwrap();
    socket.send(&connecting.init_packet(None).unwrap()).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
        .await
        .expect("RESP")
        .unwrap();
    connecting.finish(&buf[..n]).expect("accepted").0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_address_gets_no_more_than_it_sent_until_it_answers_the_challenge() {
    let keys = KeyPair::generate().unwrap();
    let config = UdpConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        extension_aliases: vec!["echo".into()],
        ..UdpConfig::default()
    };
    let transport = UdpTransport::with_key_pair(config, keys.clone(), &TransportMetrics::default());
    let gateway = Arc::new(ScriptedGateway::default());
    let (addr, _stop) = compliance::start(Box::new(transport), gateway.clone());

    // The device, at its own address: handshake, one request, answered.
    let home = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    home.connect(addr).await.unwrap();
    let mut device = handshake(&home, &keys.public).await;
    let mut f = Vec::new();
    Frame::Request { ext: Ext::Alias(0), path: "/json", id: Some(1), payload: b"[1]" }.put(&mut f);
    home.send(&device.seal(&f)).await.unwrap();
    let answers = drain(&home, Duration::from_millis(300)).await;
    assert!(frames_of(&mut device, &answers[0])[0].contains("Response { id: Some(1)"));

    // An authentic packet, raced from a spoofed address, moves the session there.
    let victim = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 3], 0))).await.unwrap();
    victim.connect(addr).await.unwrap();
    let mut request = Vec::new();
    let payload = b"[22222222,22222222,22222222,22222222]";
    Frame::Request { ext: Ext::Alias(0), path: "/json", id: Some(2), payload }.put(&mut request);
    let raced = device.seal(&request);
    victim.send(&raced).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A 1 KiB push for the device now: it must not go to the unvalidated address.
    let big: &'static [u8] = Box::leak(vec![b'x'; 1000].into_boxed_slice());
    assert!(gateway.push(compliance::TOKEN, "/config/json", big) >= 1);
    let reflected = drain(&victim, Duration::from_millis(500)).await;
    let sent: usize = reflected.iter().map(Vec::len).sum();
    eprintln!(
        "FGU/1: a {}-byte packet from a spoofed address got {sent} bytes back ({} datagrams)",
        raced.len(),
        reflected.len()
    );
    assert!(sent <= raced.len(), "{sent} bytes reflected for {}", raced.len());
    let mut challenge = None;
    for datagram in &reflected {
        let plain = device.open(datagram).unwrap();
        for frame in Frames::new(&plain) {
            match frame.unwrap() {
                Frame::Ping(data) => challenge = Some(data),
                Frame::Push { .. } => panic!("a push went to the unvalidated address"),
                _ => {}
            }
        }
    }
    let challenge = challenge.expect("a PING challenge");

    // Another device is served meanwhile.
    let hello = Hello {
        app_version: compliance::APP_VERSION,
        token: Some(compliance::TOKEN),
        username: None,
        password: None,
    };
    let mut other =
        Device::connect(addr, &keys.public, &hello, Duration::from_secs(5)).await.unwrap();
    let reply = other.request("echo", "/json", 7, b"[7]", Duration::from_secs(5)).await;
    assert_eq!(reply.map(|r| r.status), Some(200));

    // The device answers the challenge from the new address (it is really there): the push
    // follows.
    let mut pong = Vec::new();
    Frame::Pong(challenge).put(&mut pong);
    victim.send(&device.seal(&pong)).await.unwrap();
    let after = drain(&victim, Duration::from_millis(500)).await;
    let pushed = after
        .iter()
        .flat_map(|d| frames_of(&mut device, d))
        .any(|f| f.starts_with("Push {") && f.contains("/config/json"));
    assert!(pushed, "the held push goes out once the address is validated");
}
