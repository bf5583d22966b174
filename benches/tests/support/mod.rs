//! Shared by the generator's end-to-end tests: a real `fleetgate up` in the test's process on
//! its own NATS server, every listener on a free port and every file in its own directory (tests
//! run side by side), and the generator's command line.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)] // each test file uses a part; test support may panic

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use fleetgate::config::Config;
use fleetgate::run::{Role, run_until};
use fleetgate_benches::loadgen::LoadgenArgs;
use fleetgate_testkit::{NatsServer, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The generator's arguments, parsed as its binary does.
#[derive(Parser)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) args: LoadgenArgs,
}

/// A running `fleetgate up` on its own NATS server.
pub(crate) struct Gateway {
    pub(crate) nats: NatsServer,
    pub(crate) mqtt: SocketAddr,
    pub(crate) coap: SocketAddr,
    pub(crate) http: SocketAddr,
    pub(crate) udp: SocketAddr,
    /// The FGU/1 public key, hex.
    pub(crate) udp_key: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), fleetgate::run::StartError>>,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts and waits until `/readyz` says ready; `auto_register`: any token is an endpoint.
    pub(crate) async fn start(auto_register: bool) -> Self {
        let nats = NatsServer::start();
        let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let (mqtt, coap, http, admin) =
            (local(free_port()), local(free_port()), local(free_port()), local(free_port()));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let dir = tempfile::tempdir().expect("a working directory");
        let key_path = dir.path().join("udp.key");
        let keys = fleetgate_transport_udp::keys::generate(&key_path).unwrap();
        let mut config = Config::default();
        config.nats.url = Some(nats.url());
        config.transports.mqtt.listen = mqtt;
        // The fleet connects faster and sends more per connection than the limits allow.
        let limits = &mut config.transports.mqtt;
        limits.max_connections = 0;
        limits.max_connections_per_address = 0;
        limits.max_new_connections_per_address_per_sec = 0;
        limits.max_messages_per_sec = 0;
        limits.max_bytes_per_sec = 0;
        config.transports.http.max_connections_per_address = 0;
        config.transports.http.max_new_connections_per_address_per_sec = 0;
        config.transports.coap.listen = coap;
        config.transports.http.listen = http;
        config.transports.udp.listen = udp;
        config.transports.udp.private_key_path = Some(key_path);
        config.admin.listen = admin;
        config.auth.auto_register = auto_register;
        // The generator's devices present no credentials, as in the demo of `fleetgate up`.
        config.auth.allow_anonymous = true;
        // Runs with unknown tokens on purpose (failures by reason): from one address, the
        // per-address back-off would then refuse the next run's devices as well.
        config.gateway.auth_failures.max_failures = 0;
        config.gateway.spool.path = dir.path().join("spool");
        config.storage.path = dir.path().join("storage");
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run_until(Role::Up, config, async {
            let _ = stop_rx.await;
        }));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !ready(admin).await {
            assert!(!task.is_finished(), "fleetgate stopped at start-up");
            assert!(tokio::time::Instant::now() < deadline, "fleetgate not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let udp_key = fleetgate_transport_udp::handshake::hex(&keys.public);
        Gateway { nats, mqtt, coap, http, udp, udp_key, stop, task, _dir: dir }
    }

    /// Stops it (bounded).
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

async fn ready(admin: SocketAddr) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(admin).await else { return false };
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.is_err() {
        return false;
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text).await;
    text.starts_with("HTTP/1.1 200")
}
