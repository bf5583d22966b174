//! Shared by the end-to-end tests: the real `fleetgate` binary as a child process, real MQTT
//! clients and a NATS observer.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)] // each test file uses a different part; test support may panic

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fleetgate_testkit::free_port;
use futures_util::StreamExt;

/// A `fleetgate` child process with its own ports, killed on drop.
pub(crate) struct Fleetgate {
    child: Option<Child>,
    pub mqtt: SocketAddr,
    pub admin: SocketAddr,
    /// CoAP (UDP) and HTTP listeners, on free ports unless `env` chose others.
    pub coap: SocketAddr,
    pub http: SocketAddr,
    /// The custom UDP (FGU/1) listener, on a free port unless `env` chose another.
    pub udp: SocketAddr,
    log: PathBuf,
    /// The working directory: its own spool (`fleetgate-data/`), removed with the process.
    dir: tempfile::TempDir,
    command: String,
    env: Vec<(String, String)>,
}

impl Fleetgate {
    /// Starts `fleetgate <command>` with `env` overrides on free ports, and waits until
    /// `/readyz` says ready.
    pub(crate) fn start(command: &str, env: &[(&str, String)]) -> Self {
        let mut fg = Self::spawn(command, env);
        fg.wait_ready();
        fg
    }

    /// Starts without waiting.
    pub(crate) fn spawn(command: &str, env: &[(&str, String)]) -> Self {
        let mqtt = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let coap = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let udp = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
        let log = std::env::temp_dir().join(format!(
            "fleetgate-test-{}-{}.log",
            std::process::id(),
            admin.port()
        ));
        let dir = tempfile::tempdir().expect("a working directory");
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
        let mut fg = Self {
            child: None,
            mqtt,
            admin,
            coap,
            http,
            udp,
            log,
            dir,
            command: command.to_owned(),
            env,
        };
        fg.launch();
        fg
    }

    /// Starts the process (again): same ports, working directory (and so spool) and settings;
    /// its log goes on in the same file.
    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        // TEST_FLEETGATE_BIN: another build, to measure it with the same test (the hostile and
        // resource tests' before/after figures). Not FLEETGATE_*: fleetgate reads those.
        let bin = std::env::var_os("TEST_FLEETGATE_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_fleetgate").into());
        let mut cmd = Command::new(bin);
        cmd.arg(&self.command)
            .current_dir(self.dir.path())
            .env_remove("FLEETGATE_CONFIG")
            .env("FLEETGATE_TRANSPORTS_MQTT_LISTEN", self.mqtt.to_string())
            .env("FLEETGATE_ADMIN_LISTEN", self.admin.to_string())
            .env("FLEETGATE_TRANSPORTS_COAP_LISTEN", self.coap.to_string())
            .env("FLEETGATE_TRANSPORTS_HTTP_LISTEN", self.http.to_string())
            .env("FLEETGATE_TRANSPORTS_UDP_LISTEN", self.udp.to_string())
            .env("RUST_LOG", "info,fleetgate=debug")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn fleetgate"));
    }

    /// SIGKILLs the process if it runs, starts it again with what it left on disk, and waits
    /// until it is ready.
    pub(crate) fn restart(&mut self) {
        self.kill();
        self.launch();
        self.wait_ready();
    }

    pub(crate) fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("fleetgate exited at start-up ({status}):\n{}", self.log());
            }
            if http_get(self.admin, "/readyz").is_some_and(|(code, _)| code == 200) {
                return;
            }
            assert!(Instant::now() < deadline, "fleetgate not ready:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to exit by itself and returns its exit code and log.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return (status.code(), self.log());
            }
            assert!(Instant::now() < deadline, "fleetgate did not exit:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: the process gets no chance to finish anything.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal (`HUP`, `TERM`, ...) to the process.
    pub(crate) fn signal(&self, name: &str) {
        if let Some(child) = &self.child {
            let _ =
                Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status();
        }
    }

    /// Whether the process still runs.
    pub(crate) fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Waits up to `timeout` until the log contains `text`.
    pub(crate) fn wait_log(&self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            assert!(Instant::now() < deadline, "`{text}` never logged:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub(crate) fn terminate(&mut self) -> Option<i32> {
        let child = self.child.as_ref()?;
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        self.wait_exit(Duration::from_secs(15)).0
    }

    /// The process id, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The value of a metric sample line that starts with `name` on `/metrics`.
    /// The process's resident set size, KiB (Linux).
    pub(crate) fn rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    pub(crate) fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = http_get(self.admin, "/metrics")?;
        body.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Fleetgate {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("--- fleetgate log ({}) ---\n{}", self.log.display(), self.log());
        }
    }
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
pub(crate) fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("no free UDP port on 127.0.0.1")
}

/// A minimal HTTP/1.1 GET: (status, body).
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((code, body))
}

/// The auth settings of a test: one endpoint with token `tok-1` in app version `demo-v1`.
pub(crate) fn demo_endpoint_env() -> Vec<(&'static str, String)> {
    vec![
        (
            "FLEETGATE_AUTH_ENDPOINTS",
            "[{app_version: demo-v1, token: tok-1, endpoint_id: ep-1}]".into(),
        ),
        ("FLEETGATE_GATEWAY_APP_VERSIONS", "[demo-v1]".into()),
    ]
}

/// `auth.certificates` listing the test client certificate `client_cert` (CN `device-1`) as
/// client `device-1`, so that the provider accepts it and no other.
pub(crate) fn certificate_env(
    files: &fleetgate_tls::test_certs::TestFiles,
) -> (&'static str, String) {
    let id = fleetgate_tls::test_certs::TestFiles::identity(&files.client_cert);
    let entry = format!(
        "[{{issuer: {:?}, serial_number: \"{}\", client_id: device-1}}]",
        id.issuer, id.serial
    );
    ("FLEETGATE_AUTH_CERTIFICATES", entry)
}

/// A NATS subscriber that records what arrives on the subjects of interest.
pub(crate) struct NatsObserver {
    pub client: async_nats::Client,
    client_data: async_nats::Subscriber,
    samples: async_nats::Subscriber,
}

impl NatsObserver {
    pub(crate) async fn connect(url: &str) -> Self {
        let client = async_nats::connect(url).await.expect("observer connects");
        let client_data = client.subscribe("kaa.v1.service.dcx.esp.ClientData").await.expect("sub");
        let samples = client
            .subscribe("kaa.v1.events.dcx.endpoint.data-collection.data-samples-received")
            .await
            .expect("sub");
        client.flush().await.expect("flush");
        // A round trip, so that the server has the subscriptions before anything is published.
        let inbox = client.new_inbox();
        let mut probe = client.subscribe(inbox.clone()).await.expect("probe");
        client.publish(inbox, Bytes::new()).await.expect("probe");
        tokio::time::timeout(Duration::from_secs(5), probe.next()).await.expect("probe back");
        Self { client, client_data, samples }
    }

    /// The next `ClientData` payload.
    pub(crate) async fn client_data(&mut self) -> async_nats::Message {
        tokio::time::timeout(Duration::from_secs(10), self.client_data.next())
            .await
            .expect("ClientData in time")
            .expect("subscription open")
    }

    /// The next `DataSamplesEvent` message.
    pub(crate) async fn samples_event(&mut self) -> async_nats::Message {
        tokio::time::timeout(Duration::from_secs(10), self.samples.next())
            .await
            .expect("DataSamplesEvent in time")
            .expect("subscription open")
    }

    /// Every message that arrives on the samples subject within `quiet` of the previous one.
    pub(crate) async fn drain_samples(&mut self, quiet: Duration) -> Vec<async_nats::Message> {
        let mut out = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout(quiet, self.samples.next()).await {
            out.push(m);
        }
        out
    }
}

/// Publishes with rumqttc (MQTT 3.1.1) and returns the first PUBLISH the gateway sends back.
pub(crate) async fn rumqttc_request(
    addr: SocketAddr,
    subscribe_first: Option<&str>,
    topic: &str,
    payload: &[u8],
) -> rumqttc::Publish {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut options =
        MqttOptions::new(format!("test-{}", free_port()), addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 16);
    if let Some(filter) = subscribe_first {
        client.subscribe(filter, QoS::AtLeastOnce).await.expect("subscribe");
    }
    client.publish(topic, QoS::AtLeastOnce, false, payload.to_vec()).await.expect("publish");
    // The answer goes out before the PUBACK: the PUBACK means the extension has the message
    // (DESIGN decision 9), which its answer shows.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut answer = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, events.poll()).await.expect("response in time");
        match event.expect("connection stays up") {
            Event::Incoming(Packet::PubAck(_)) => {
                let answer = answer.expect("the answer comes before the PUBACK");
                let _ = client.disconnect().await;
                return answer;
            }
            Event::Incoming(Packet::Publish(p)) if answer.is_none() => answer = Some(p),
            _ => {}
        }
    }
}

/// A bare MQTT client built on fleetgate's own codec, for the cases real clients do not
/// produce (topic aliases, exact CONNECT contents).
pub(crate) struct RawClient {
    stream: tokio::net::TcpStream,
    codec: fleetgate_transport_mqtt::codec::Codec,
    read: bytes::BytesMut,
}

impl RawClient {
    /// Connects and returns the CONNACK.
    pub(crate) async fn connect(
        addr: SocketAddr,
        connect: fleetgate_transport_mqtt::codec::Connect,
    ) -> (Self, fleetgate_transport_mqtt::codec::ConnAck) {
        use fleetgate_transport_mqtt::codec::{Codec, Packet};
        let mut codec = Codec::new(1 << 20);
        codec.set_version(connect.protocol_version);
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut client = Self { stream, codec, read: bytes::BytesMut::new() };
        client.send(&Packet::Connect(Box::new(connect))).await;
        match client.next().await {
            Some(Packet::ConnAck(c)) => (client, *c),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub(crate) fn connect_packet(
        version: fleetgate_transport_mqtt::codec::ProtocolVersion,
        username: Option<&str>,
        password: Option<&str>,
    ) -> fleetgate_transport_mqtt::codec::Connect {
        fleetgate_transport_mqtt::codec::Connect {
            protocol_version: version,
            clean_start: true,
            keep_alive_secs: 30,
            client_id: Bytes::from_static(b"raw"),
            will: None,
            username: username.map(|u| Bytes::copy_from_slice(u.as_bytes())),
            password: password.map(|p| Bytes::copy_from_slice(p.as_bytes())),
            properties: Default::default(),
        }
    }

    /// Writes bytes as they are (several packets at once, say).
    pub(crate) async fn send_raw(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.expect("write");
    }

    pub(crate) async fn send(&mut self, packet: &fleetgate_transport_mqtt::codec::Packet) {
        use tokio::io::AsyncWriteExt;
        let mut out = bytes::BytesMut::new();
        self.codec.encode(packet, &mut out).expect("encode");
        self.stream.write_all(&out).await.expect("write");
    }

    /// The next packet from the server, `None` when it closed the connection (or nothing came
    /// within 10 s).
    pub(crate) async fn next(&mut self) -> Option<fleetgate_transport_mqtt::codec::Packet> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(p) = self.codec.decode(&mut self.read).expect("server sends valid MQTT") {
                return Some(p);
            }
            let read =
                tokio::time::timeout(Duration::from_secs(10), self.stream.read_buf(&mut self.read));
            match read.await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    /// The next PUBLISH, acknowledging it when it is QoS 1; skips other packets.
    pub(crate) async fn next_publish(
        &mut self,
    ) -> Option<fleetgate_transport_mqtt::codec::Publish> {
        use fleetgate_transport_mqtt::codec::{Packet, PubAck};
        loop {
            match self.next().await? {
                Packet::Publish(p) => {
                    if let Some(id) = p.packet_id {
                        self.send(&Packet::PubAck(PubAck::new(id))).await;
                    }
                    return Some(p);
                }
                _ => continue,
            }
        }
    }
}
