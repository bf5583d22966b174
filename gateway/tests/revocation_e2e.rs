//! 16/ECAP revocation ends sessions within a second: an endpoint token or a client credential
//! dropped from the provider's settings (which broadcasts the revocation), and a token
//! revocation that names the application (not the app version) arriving on NATS from another
//! provider. Devices are real clients (rumqttc over TCP and TLS, paho-mqtt over WebSocket,
//! aioquic over QUIC, the FGU/1 device of fleetgate-transport-udp) and raw protocol clients that keep their connection or source address
//! (an HTTP/1.1 keep-alive connection, a CoAP socket).

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use fleetgate_messages::{EndpointTokenRevokedEvent, Record};
use fleetgate_testkit::{NatsServer, free_port};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use support::Fleetgate;

/// An MQTT device that has published once with its token and got `/status`.
struct Device {
    _client: AsyncClient,
    events: EventLoop,
}

impl Device {
    async fn start(addr: SocketAddr, token: &str, login: Option<(&str, &str)>) -> Self {
        Self::start_over(addr, token, login, None).await
    }

    /// The same over MQTT/TLS, trusting the CA in `ca_file`.
    async fn start_tls(addr: SocketAddr, token: &str, ca_file: &Path) -> Self {
        use fleetgate_tls::rustls::pki_types::CertificateDer;
        use fleetgate_tls::rustls::pki_types::pem::PemObject;
        use fleetgate_tls::rustls::{ClientConfig, RootCertStore};
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(ca_file).unwrap()).unwrap();
        let config = ClientConfig::builder_with_provider(fleetgate_tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tls = rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(config));
        let addr = SocketAddr::from(([127, 0, 0, 1], addr.port()));
        Self::start_over(addr, token, None, Some(rumqttc::Transport::Tls(tls))).await
    }

    async fn start_over(
        addr: SocketAddr,
        token: &str,
        login: Option<(&str, &str)>,
        transport: Option<rumqttc::Transport>,
    ) -> Self {
        let id = format!("rev-{}", free_port());
        let host = if transport.is_some() { "localhost".to_owned() } else { addr.ip().to_string() };
        let mut options = MqttOptions::new(id, host, addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        if let Some(transport) = transport {
            options.set_transport(transport);
        }
        if let Some((user, password)) = login {
            options.set_credentials(user, password);
        }
        let (client, mut events) = AsyncClient::new(options, 16);
        let topic = format!("kp1/demo-v1/dcx/{token}/json/1");
        client.publish(&topic, QoS::AtLeastOnce, false, b"[{\"t\":1}]".to_vec()).await.unwrap();
        let status = format!("{topic}/status");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic == status => break,
                Ok(Ok(_)) => {}
                other => panic!("{token}: no /status: {other:?}"),
            }
        }
        Self { _client: client, events }
    }

    /// How long until the server closes the connection (at most `limit`).
    async fn ends_within(&mut self, limit: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        loop {
            let left = limit.saturating_sub(t0.elapsed());
            match tokio::time::timeout(left, self.events.poll()).await {
                Err(_) => return None,
                Ok(Err(_)) => return Some(t0.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// A client in another process that prints the topic of its `/status`, holds its connection
/// until the server ends it, then prints `closed`: the aioquic MQTT-over-QUIC client
/// (`tests/clients/mqtt_quic.py`) or paho-mqtt over WebSocket ([`PAHO_WS_HOLD`]).
struct HoldingClient {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

/// paho-mqtt over plain WebSocket with tok-1: prints the `/status` topic, then `closed` when the
/// server ends the connection.
const PAHO_WS_HOLD: &str = r#"
import sys, time
import paho.mqtt.client as mqtt
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-ws-hold", transport="websockets")
c.ws_set_options(path="/mqtt")
c.on_message = lambda c, u, m: print(m.topic, flush=True)
c.on_disconnect = lambda c, u, f, rc, p: (print("closed", flush=True), sys.exit(0))
c.connect("127.0.0.1", int(sys.argv[1]), keepalive=30)
c.publish("kp1/demo-v1/dcx/tok-1/json/1", '[{"t":1}]', qos=1)
c.loop_forever(retry_first_connection=False)
"#;

impl HoldingClient {
    fn quic(port: u16, ca: &Path) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/mqtt_quic.py");
        let mut command = std::process::Command::new("python3");
        command
            .arg(script)
            .args([&port.to_string(), ca.to_str().unwrap(), "mqtt"])
            .args(["kp1/demo-v1/dcx/tok-1/json/1", "[{\"t\":1}]"])
            .env("MQTT_QUIC_HOLD", "1");
        Self::start(command)
    }

    fn websocket(port: u16) -> Self {
        let mut command = std::process::Command::new("python3");
        command.args(["-c", PAHO_WS_HOLD, &port.to_string()]);
        Self::start(command)
    }

    fn start(mut command: std::process::Command) -> Self {
        use std::io::BufRead;
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 with aioquic and paho-mqtt");
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let first = lines.recv_timeout(Duration::from_secs(10)).expect("a /status");
        assert_eq!(first, "kp1/demo-v1/dcx/tok-1/json/1/status");
        Self { child, lines }
    }

    /// Whether the server closed the connection within `limit`.
    fn ends_within(&mut self, limit: Duration) -> bool {
        let ended = self.lines.recv_timeout(limit).is_ok_and(|l| l == "closed");
        let _ = self.child.kill();
        let _ = self.child.wait();
        ended
    }
}

/// One HTTP/1.1 request on a kept-alive connection: the status code.
fn http_post(conn: &mut TcpStream, token: &str) -> u16 {
    let body = "[{\"t\":1}]";
    let request = format!(
        "POST /kp1/demo-v1/dcx/{token}/json HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).unwrap();
    let mut buf = [0u8; 4096];
    let n = conn.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// One confirmable CoAP POST of a sample to `kp1/demo-v1/dcx/<token>/json` from `socket`
/// (the same source address each time: the same CoAP peer and gateway session); the response
/// code as `class.detail`, e.g. `2.04`.
fn coap_post(socket: &std::net::UdpSocket, to: SocketAddr, token: &str, message_id: u16) -> String {
    let mut datagram = vec![0x41, 0x02]; // version 1, CON, token length 1; POST
    datagram.extend_from_slice(&message_id.to_be_bytes());
    datagram.push(0x7a); // the CoAP token
    for (i, segment) in ["kp1", "demo-v1", "dcx", token, "json"].iter().enumerate() {
        let delta = if i == 0 { 11 } else { 0 }; // Uri-Path
        assert!(segment.len() < 13);
        datagram.push((delta << 4) | segment.len() as u8);
        datagram.extend_from_slice(segment.as_bytes());
    }
    datagram.push(0xff);
    datagram.extend_from_slice(b"[{\"t\":1}]");
    socket.send_to(&datagram, to).unwrap();
    let mut buf = [0u8; 1500];
    loop {
        let (n, _) = socket.recv_from(&mut buf).expect("a CoAP answer");
        // An empty ACK comes before a separate response.
        if n >= 4 && buf[1] != 0 {
            return format!("{}.{:02}", buf[1] >> 5, buf[1] & 0x1f);
        }
    }
}

/// Replaces the file whole, as editors and Kubernetes do.
fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

const BEFORE: &str = "
process: {config_check_interval_ms: 100}
auth:
  endpoints:
    - {app_version: demo-v1, token: tok-1, endpoint_id: ep-1}
    - {app_version: demo-v1, token: tok-2, endpoint_id: ep-2}
  clients: [{username: dev, password: pw}]
  allow_anonymous: true
gateway: {app_versions: [demo-v1]}
";

/// tok-1 and the client `dev` are gone.
const AFTER: &str = "
process: {config_check_interval_ms: 100}
auth:
  endpoints: [{app_version: demo-v1, token: tok-2, endpoint_id: ep-2}]
  allow_anonymous: true
gateway: {app_versions: [demo-v1]}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_tokens_and_credentials_end_their_sessions_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleetgate.yml");
    write(&path, BEFORE);
    let files = fleetgate_tls::test_certs::TestFiles::write(dir.path());
    let mqtts = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let quic = SocketAddr::from(([127, 0, 0, 1], support::free_udp_port()));
    let ws = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let env = [
        ("FLEETGATE_CONFIG", path.display().to_string()),
        ("FLEETGATE_TRANSPORTS_MQTTS_ENABLED", "true".to_owned()),
        ("FLEETGATE_TRANSPORTS_MQTTS_LISTEN", mqtts.to_string()),
        ("FLEETGATE_TRANSPORTS_MQTTS_TLS_CERT_FILE", files.server_cert.display().to_string()),
        ("FLEETGATE_TRANSPORTS_MQTTS_TLS_KEY_FILE", files.server_key.display().to_string()),
        ("FLEETGATE_TRANSPORTS_MQTT_WS_ENABLED", "true".to_owned()),
        ("FLEETGATE_TRANSPORTS_MQTT_WS_LISTEN", ws.to_string()),
        ("FLEETGATE_TRANSPORTS_MQTT_QUIC_ENABLED", "true".to_owned()),
        ("FLEETGATE_TRANSPORTS_MQTT_QUIC_LISTEN", quic.to_string()),
        ("FLEETGATE_TRANSPORTS_MQTT_QUIC_TLS_CERT_FILE", files.server_cert.display().to_string()),
        ("FLEETGATE_TRANSPORTS_MQTT_QUIC_TLS_KEY_FILE", files.server_key.display().to_string()),
    ];
    let udp_key = dir.path().join("gateway.key");
    let udp_keys = fleetgate_transport_udp::keys::generate(&udp_key).unwrap();
    let mut env = env.to_vec();
    env.push(("FLEETGATE_TRANSPORTS_UDP_PRIVATE_KEY_PATH", udp_key.display().to_string()));
    let fg = Fleetgate::start("up", &env);
    let mut revoked_token = Device::start(fg.mqtt, "tok-1", None).await;
    let mut revoked_tls = Device::start_tls(mqtts, "tok-1", &files.ca).await;
    let mut quic_device = HoldingClient::quic(quic.port(), &files.ca);
    let mut ws_device = HoldingClient::websocket(ws.port());
    let mut revoked_login = Device::start(fg.mqtt, "tok-2", Some(("dev", "pw"))).await;
    let mut kept = Device::start(fg.mqtt, "tok-2", None).await;
    let mut http = TcpStream::connect(fg.http).unwrap();
    http.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(http_post(&mut http, "tok-1"), 204);
    let hello = fleetgate_transport_udp::handshake::Hello {
        app_version: "demo-v1",
        token: Some("tok-1"),
        username: None,
        password: None,
    };
    let wait = Duration::from_secs(5);
    let mut fgu =
        fleetgate_transport_udp::device::Device::connect(fg.udp, &udp_keys.public, &hello, wait)
            .await
            .unwrap();
    let reply = fgu.request("dcx", "/json", 1, b"[{\"t\":1}]", wait).await.expect("an answer");
    assert_eq!(reply.status, 200);
    let coap = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    coap.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(coap_post(&coap, fg.coap, "tok-1", 1), "2.04");

    let written = Instant::now();
    write(&path, AFTER);
    // The file is checked every 100 ms; from then on a second at most.
    let limit = Duration::from_millis(1_100);
    let (a, b, c) = tokio::join!(
        revoked_token.ends_within(limit),
        revoked_login.ends_within(limit),
        revoked_tls.ends_within(limit)
    );
    assert!(a.is_some(), "the session of the revoked token is still open");
    assert!(c.is_some(), "the MQTT/TLS session of the revoked token is still open");
    assert!(quic_device.ends_within(Duration::from_millis(300)), "the QUIC session is still open");
    assert!(
        ws_device.ends_within(Duration::from_millis(300)),
        "the WebSocket session is still open"
    );
    assert!(b.is_some(), "the session of the revoked client credential is still open");
    assert!(written.elapsed() < Duration::from_millis(1_500), "{:?}", written.elapsed());
    assert_eq!(kept.ends_within(Duration::from_millis(500)).await, None, "tok-2 stays");
    // The HTTP connection and the CoAP peer live on; their sessions do not (without the
    // revocation, the session would trust the token for the token cache's TTL, 60 s).
    assert_eq!(http_post(&mut http, "tok-1"), 401);
    assert_eq!(coap_post(&coap, fg.coap, "tok-1", 2), "4.01");
    assert_eq!(fg.metric("fleetgate_gateway_sessions_revoked_total"), Some(8.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revocation_naming_the_application_ends_the_session() {
    let nats = NatsServer::start();
    let env = [
        ("FLEETGATE_NATS_URL", nats.url()),
        (
            "FLEETGATE_AUTH_ENDPOINTS",
            "[{app_version: demo-v1, token: tok-1, endpoint_id: ep-1}]".into(),
        ),
        ("FLEETGATE_GATEWAY_APP_VERSIONS", "[demo-v1]".into()),
        ("FLEETGATE_APPLICATIONS", "{fleet: {versions: [demo-v1]}}".into()),
    ];
    let fg = Fleetgate::start("up", &env);
    let mut device = Device::start(fg.mqtt, "tok-1", None).await;
    let nats_client = async_nats::connect(nats.url()).await.unwrap();
    let token_id = fleetgate_auth::token_id("demo-v1", "tok-1");
    let revoke = |app: &'static str, token_id: String| {
        let nats_client = nats_client.clone();
        async move {
            let event = EndpointTokenRevokedEvent {
                correlation_id: "c-1",
                timestamp_ms: 0,
                timeout_ms: 0,
                app_name: app,
                endpoint_id: "ep-1",
                token_ids: vec![&token_id],
                originator_replica_id: "another-provider-1",
            };
            let subject = "kaa.v1.events.another-provider.endpoint.token.revoked";
            nats_client.publish(subject, event.to_bytes()).await.unwrap();
            nats_client.flush().await.unwrap();
        }
    };
    // Another application's endpoint, or another token of this one: nothing ends.
    revoke("other-app", token_id.clone()).await;
    revoke("fleet", "tok-0000".into()).await;
    assert_eq!(device.ends_within(Duration::from_millis(500)).await, None);
    // The application's name (what 16/ECAP carries) and the token's id.
    revoke("fleet", token_id).await;
    let ended = device.ends_within(Duration::from_secs(1)).await;
    assert!(ended.is_some(), "the session is still open a second after the revocation");
    assert_eq!(fg.metric("fleetgate_gateway_sessions_revoked_total"), Some(1.0));
}
