//! `fleetgate-tls-bench`: fleetgate's MQTT over TLS against Mosquitto with the same certificate,
//! alternating A B in one run. Two figures per system and pair:
//!
//! - TLS handshakes per second: `--concurrency` clients that each, in a loop, connect, do the
//!   TLS handshake, send CONNECT, read CONNACK and hang up, for `--handshake-secs` (what a
//!   reconnect storm costs), with the server's CPU-seconds per thousand handshakes;
//! - QoS 0 ingest over TLS: `--connections` TLS connections publish `--messages` 2/DCP samples
//!   at `--rate` per second in total (open loop, 10 ms ticks); the server process's CPU-seconds
//!   per million messages, and how many arrived (fleetgate: its received-messages metric;
//!   Mosquitto: one subscriber on `kp1/#` over plain TCP).
//!
//! The server is pinned to `--sut-core`, the load to `--load-core` (with `taskset`). fleetgate
//! runs `fleetgate up` on its in-process bus, so its CPU includes the bus and DCX; Mosquitto's
//! includes delivery to the subscriber. The client is rustls (ring), TLS 1.3, for both.

// A measuring tool: a setup that fails (no port, no binary, a refused connection) ends the run.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use fleetgate_benches::procfs::cpu_secs;
use fleetgate_tls::rustls;
use fleetgate_tls::test_certs::TestFiles;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Debug)]
#[command(about = "fleetgate MQTT/TLS vs Mosquitto: handshakes per second and QoS 0 ingest CPU")]
struct Args {
    /// The fleetgate binary.
    #[arg(long, default_value = "target/release/fleetgate")]
    fleetgate_bin: PathBuf,
    /// The Mosquitto binary.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto_bin: PathBuf,
    /// A B pairs (the order swapped in every other pair).
    #[arg(long, default_value_t = 3)]
    pairs: usize,
    /// Length of the handshake phase.
    #[arg(long, default_value_t = 5)]
    handshake_secs: u64,
    /// Clients handshaking at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// TLS connections publishing in the ingest phase.
    #[arg(long, default_value_t = 20)]
    connections: usize,
    /// Messages published in the ingest phase.
    #[arg(long, default_value_t = 300_000)]
    messages: u64,
    /// Offered rate of the ingest phase, messages per second in total.
    #[arg(long, default_value_t = 30_000)]
    rate: u64,
    /// Core of the server.
    #[arg(long, default_value = "0")]
    sut_core: String,
    /// Core of the load (this process re-runs itself there when not pinned yet).
    #[arg(long, default_value = "1")]
    load_core: String,
}

const PAYLOAD: &[u8] = br#"[{"temperature":21.5,"humidity":40}]"#;

fn main() {
    let mut args = Args::parse();
    // fleetgate runs in a directory of its own: a relative path would not find it there.
    if let Ok(bin) = args.fleetgate_bin.canonicalize() {
        args.fleetgate_bin = bin;
    }
    // The load runs on its own core.
    let _ = Command::new("taskset")
        .args(["-cp", &args.load_core, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let files = TestFiles::write(dir.path());
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let mut results: Vec<(&str, Figures)> = Vec::new();
    for pair in 0..args.pairs {
        let order: [&str; 2] =
            if pair % 2 == 0 { ["fleetgate", "mosquitto"] } else { ["mosquitto", "fleetgate"] };
        for system in order {
            let server = Server::start(system, &args, &files, dir.path());
            let figures = runtime.block_on(measure(&args, &files, &server));
            println!(
                "pair {pair} {system:<9}: {:>7.0} handshakes/s ({:.3} cpu-s per 1000), ingest {:.2} cpu-s per million, {} of {} arrived",
                figures.handshakes_per_sec,
                figures.cpu_per_k_handshakes,
                figures.cpu_per_m_messages,
                figures.arrived,
                args.messages
            );
            results.push((system, figures));
            drop(server);
        }
    }
    let ratios = |f: fn(&Figures) -> f64| {
        let mut r: Vec<f64> = results
            .chunks(2)
            .map(|pair| {
                let get = |name| {
                    pair.iter().find(|(s, _)| *s == name).map(|(_, x)| f(x)).unwrap_or(f64::NAN)
                };
                get("fleetgate") / get("mosquitto")
            })
            .collect();
        r.sort_by(f64::total_cmp);
        r
    };
    let median = |r: &[f64]| r[r.len() / 2];
    let hs = ratios(|f| f.handshakes_per_sec);
    let cpu_hs = ratios(|f| f.cpu_per_k_handshakes);
    let ingest = ratios(|f| f.cpu_per_m_messages);
    println!(
        "fleetgate/mosquitto (median of {} pairs [min-max]): handshakes/s {:.2}x [{:.2}-{:.2}] (higher is better), cpu per handshake {:.2}x [{:.2}-{:.2}], QoS 0 ingest cpu per message {:.2}x [{:.2}-{:.2}] (lower is better)",
        hs.len(),
        median(&hs),
        hs[0],
        hs[hs.len() - 1],
        median(&cpu_hs),
        cpu_hs[0],
        cpu_hs[cpu_hs.len() - 1],
        median(&ingest),
        ingest[0],
        ingest[ingest.len() - 1],
    );
}

struct Figures {
    handshakes_per_sec: f64,
    cpu_per_k_handshakes: f64,
    cpu_per_m_messages: f64,
    arrived: u64,
}

/// A server under test, killed on drop.
struct Server {
    system: &'static str,
    child: Child,
    tls: SocketAddr,
    /// fleetgate: the admin listener; Mosquitto: the subscriber's plain listener.
    side: SocketAddr,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Server {
    fn start(system: &'static str, args: &Args, files: &TestFiles, dir: &Path) -> Self {
        let tls = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let side = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", &args.sut_core]).stdout(Stdio::null()).stderr(Stdio::null());
        let p = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
        if system == "fleetgate" {
            // Its own working directory (the spool lives there).
            let work = dir.join(format!("fleetgate-{}", tls.port()));
            std::fs::create_dir_all(&work).expect("a working directory");
            cmd.arg(&args.fleetgate_bin)
                .arg("up")
                .current_dir(&work)
                .env_remove("FLEETGATE_CONFIG")
                .env("FLEETGATE_TRANSPORTS_MQTT_LISTEN", format!("127.0.0.1:{}", free_port()))
                .env("FLEETGATE_TRANSPORTS_COAP_ENABLED", "false")
                .env("FLEETGATE_TRANSPORTS_HTTP_ENABLED", "false")
                .env("FLEETGATE_TRANSPORTS_MQTTS_ENABLED", "true")
                .envs(fleetgate_benches::LIMITS_OFF.iter().copied())
                .env("FLEETGATE_TRANSPORTS_MQTTS_LISTEN", tls.to_string())
                .env("FLEETGATE_TRANSPORTS_MQTTS_TLS_CERT_FILE", p(&files.server_cert))
                .env("FLEETGATE_TRANSPORTS_MQTTS_TLS_KEY_FILE", p(&files.server_key))
                .env("FLEETGATE_ADMIN_LISTEN", side.to_string())
                .env("FLEETGATE_AUTH_AUTO_REGISTER", "true")
                .env("RUST_LOG", "warn");
        } else {
            let conf = dir.join(format!("mosquitto-{}.conf", tls.port()));
            let text = format!(
                "per_listener_settings false\nallow_anonymous true\nset_tcp_nodelay true\nmax_queued_messages 1000000\n\
                 listener {} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nlistener {} 127.0.0.1\n",
                tls.port(),
                p(&files.ca),
                p(&files.server_cert),
                p(&files.server_key),
                side.port()
            );
            std::fs::write(&conf, text).expect("mosquitto.conf");
            cmd.arg(&args.mosquitto_bin).arg("-c").arg(&conf);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {system}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(tls).is_err()
            || std::net::TcpStream::connect(side).is_err()
        {
            assert!(Instant::now() < deadline, "{system} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { system, child, tls, side }
    }

    /// The server process (taskset execs it, so the child's pid is the server's).
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn cpu(&self) -> f64 {
        cpu_secs(self.pid()).unwrap_or(f64::NAN)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA certificate")).expect("a usable CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        out.push(if n > 0 { byte | 0x80 } else { byte });
        if n == 0 {
            return;
        }
    }
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.extend_from_slice(&[4, 2, 0, 60]);
    string(client_id.as_bytes(), &mut body);
    let mut out = vec![0x10];
    varint(body.len(), &mut out);
    out.extend(body);
    out
}

fn publish_packet(topic: &str) -> Vec<u8> {
    let mut body = Vec::new();
    string(topic.as_bytes(), &mut body);
    body.extend_from_slice(PAYLOAD);
    let mut out = vec![0x30];
    varint(body.len(), &mut out);
    out.extend(body);
    out
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// TCP connect, TLS handshake, CONNECT, CONNACK.
async fn session(
    addr: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    client_id: &str,
) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost").expect("a server name");
    let mut stream = tls.connect(name, tcp).await?;
    stream.write_all(&connect_packet(client_id)).await?;
    stream.flush().await?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await?;
    if connack[0] != 0x20 || connack[3] != 0 {
        return Err(std::io::Error::other("CONNECT refused"));
    }
    Ok(stream)
}

async fn measure(args: &Args, files: &TestFiles, server: &Server) -> Figures {
    let connector = tokio_rustls::TlsConnector::from(client_config(&files.ca));
    // Handshakes: closed loop, `concurrency` at a time.
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(args.handshake_secs);
    let cpu0 = server.cpu();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..args.concurrency {
        let (connector, done, failed, addr) =
            (connector.clone(), done.clone(), failed.clone(), server.tls);
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                n += 1;
                match session(addr, &connector, &format!("hs-{worker}-{n}")).await {
                    Ok(mut stream) => {
                        let _ = stream.write_all(&[0xE0, 0]).await;
                        let _ = stream.shutdown().await;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_hs = server.cpu() - cpu0;
    let handshakes = done.load(Ordering::Relaxed);
    if failed.load(Ordering::Relaxed) > 0 {
        eprintln!("{}: {} handshakes failed", server.system, failed.load(Ordering::Relaxed));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Ingest: the Mosquitto subscriber first.
    let counter = Arc::new(AtomicU64::new(0));
    if server.system == "mosquitto" {
        let mut sub = TcpStream::connect(server.side).await.expect("subscriber connects");
        sub.write_all(&connect_packet("counter")).await.expect("subscriber CONNECT");
        let mut connack = [0u8; 4];
        sub.read_exact(&mut connack).await.expect("CONNACK");
        let mut subscribe = vec![0x82];
        let mut body = vec![0, 1];
        string(b"kp1/#", &mut body);
        body.push(0);
        varint(body.len(), &mut subscribe);
        subscribe.extend(body);
        sub.write_all(&subscribe).await.expect("SUBSCRIBE");
        let counter = counter.clone();
        tokio::spawn(count_publishes(sub, counter));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut streams = Vec::new();
    for c in 0..args.connections {
        streams.push(
            session(server.tls, &connector, &format!("dev-{c}"))
                .await
                .expect("an ingest connection"),
        );
    }
    let per_conn = args.messages / args.connections as u64;
    let ticks_per_sec = 100u64;
    let per_tick = (args.rate / args.connections as u64 / ticks_per_sec).max(1);
    let cpu0 = server.cpu();
    let mut tasks = Vec::new();
    for (c, mut stream) in streams.into_iter().enumerate() {
        let packet = publish_packet(&format!("kp1/demo-v1/dcx/token-{c}/json"));
        tasks.push(tokio::spawn(async move {
            let mut batch = Vec::with_capacity(packet.len() * per_tick as usize);
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / ticks_per_sec));
            let mut sent = 0;
            while sent < per_conn {
                tick.tick().await;
                let n = per_tick.min(per_conn - sent);
                batch.clear();
                for _ in 0..n {
                    batch.extend_from_slice(&packet);
                }
                if stream.write_all(&batch).await.is_err() {
                    break;
                }
                sent += n;
            }
            let _ = stream.flush().await;
            stream
        }));
    }
    let mut open = Vec::new();
    for t in tasks {
        if let Ok(s) = t.await {
            open.push(s);
        }
    }
    let sent = per_conn * args.connections as u64;
    // Until the server has taken everything (or 10 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    let arrived = loop {
        let arrived = match server.system {
            "fleetgate" => fleetgate_received(server.side).unwrap_or(0),
            _ => counter.load(Ordering::Relaxed),
        };
        if arrived >= sent || Instant::now() > deadline {
            break arrived;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let cpu_ingest = server.cpu() - cpu0;
    drop(open);
    Figures {
        handshakes_per_sec: handshakes as f64 / elapsed,
        cpu_per_k_handshakes: cpu_hs / handshakes.max(1) as f64 * 1000.0,
        cpu_per_m_messages: cpu_ingest / sent.max(1) as f64 * 1e6,
        arrived,
    }
}

/// Counts the PUBLISH packets a subscriber receives.
async fn count_publishes(mut sub: TcpStream, counter: Arc<AtomicU64>) {
    let mut buf = Vec::with_capacity(1 << 16);
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let Ok(n) = sub.read(&mut chunk).await else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        // Fixed header: type byte, remaining length varint.
        while let Some(&first) = buf.get(at) {
            let (mut len, mut shift, mut i) = (0usize, 0, at + 1);
            let complete = loop {
                let Some(&b) = buf.get(i) else { break false };
                len |= usize::from(b & 0x7F) << shift;
                shift += 7;
                i += 1;
                if b & 0x80 == 0 {
                    break true;
                }
            };
            if !complete || buf.len() < i + len {
                break;
            }
            if first >> 4 == 3 {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            at = i + len;
        }
        buf.drain(..at);
    }
}

/// fleetgate's count of received MQTT/TLS messages, from `/metrics`.
fn fleetgate_received(admin: SocketAddr) -> Option<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let line = text.lines().find(|l| {
        l.starts_with(r#"fleetgate_transport_messages_received_total{transport="mqtts"}"#)
    })?;
    line.rsplit(' ').next()?.parse::<f64>().ok().map(|v| v as u64)
}
