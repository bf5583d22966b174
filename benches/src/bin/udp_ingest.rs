//! Benchmark U1: one-way 1/KP ingest over FGU/1 (fleetgate's custom UDP protocol) against a
//! raw UDP sink, same datagrams, same generator, same run.
//!
//! `fleetgate-udp-ingest compare` runs pairs: in each, `fleetgate up` (in-process bus, every
//! other transport off) and then a raw sink (this binary's `sink`: `recvmmsg` batches of 32,
//! counting), or the other way round in even pairs, each pinned to `--sut-cpus`. The generator
//! (this process; pin it elsewhere with `taskset`) opens `--sessions` FGU/1 sessions and offers
//! each rate of `--rates` for `--secs`, open loop, one REQUEST frame without request id (QoS 0:
//! no answer) to `dcx` `/json` per datagram, payload `--payload-bytes` of JSON. The sink gets
//! the very same sealed datagrams (keys from a handshake with a local stand-in). Delivered is
//! `fleetgate_gateway_requests_total` for fleetgate (requests handed to the bus) and the sink's
//! count; MSR = highest step with loss ≤ 0.1 % whose offered rate the generator kept up with;
//! CPU-s per million = the server's utime + stime over the step ÷ delivered.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetgate_benches::procfs;
use fleetgate_transport_udp::client::{Connecting, Established};
use fleetgate_transport_udp::handshake::{self, Hello, KeyPair, Welcome};
use fleetgate_transport_udp::wire::{self, Ext, Frame, Packet};

const COUNT: &[u8] = b"COUNT";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("sink") => sink(args.get(1).map_or("127.0.0.1:26000", String::as_str)),
        Some("compare") => compare(&args[1..]),
        _ => {
            eprintln!(
                "usage: fleetgate-udp-ingest sink ADDR\n       fleetgate-udp-ingest compare \
                 [--fleetgate PATH] [--pairs 3] [--secs 2] [--rates 10000,20000,...] \
                 [--sut-cpus 0] [--sessions 256] [--payload-bytes 64] [--port 26000]"
            );
            std::process::exit(2);
        }
    }
}

/// The raw sink: counts datagrams, answers `COUNT` with the count (8 bytes, big-endian).
fn sink(addr: &str) {
    let Ok(socket) = UdpSocket::bind(addr) else {
        eprintln!("sink: cannot bind {addr}");
        std::process::exit(2);
    };
    let sock = socket2::SockRef::from(&socket);
    let _ = sock.set_recv_buffer_size(4 << 20);
    let mut count: u64 = 0;
    let mut buf = [0u8; 2048];
    // One blocking recv per datagram into a 4 MiB socket buffer: the plain ceiling.
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
        if &buf[..n] == COUNT {
            let _ = socket.send_to(&count.to_be_bytes(), from);
        } else {
            count += 1;
        }
    }
}

struct Opts {
    fleetgate: PathBuf,
    pairs: usize,
    secs: f64,
    rates: Vec<u64>,
    sut_cpus: String,
    sessions: usize,
    payload_bytes: usize,
    port: u16,
}

fn parse(args: &[String]) -> Opts {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut o = Opts {
        fleetgate: exe.with_file_name("fleetgate"),
        pairs: 3,
        secs: 2.0,
        rates: vec![10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 80_000, 100_000],
        sut_cpus: "0".into(),
        sessions: 256,
        payload_bytes: 64,
        port: 26_000,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it.next().cloned().unwrap_or_default();
        match flag.as_str() {
            // Absolute: the server runs in its own working directory.
            "--fleetgate" => o.fleetgate = std::fs::canonicalize(&v).unwrap_or_else(|_| v.into()),
            "--pairs" => o.pairs = v.parse().unwrap_or(3),
            "--secs" => o.secs = v.parse().unwrap_or(2.0),
            "--rates" => o.rates = v.split(',').filter_map(|r| r.parse().ok()).collect(),
            "--sut-cpus" => o.sut_cpus = v,
            "--sessions" => o.sessions = v.parse().unwrap_or(256),
            "--payload-bytes" => o.payload_bytes = v.parse().unwrap_or(64),
            "--port" => o.port = v.parse().unwrap_or(26_000),
            other => {
                eprintln!("unknown option {other}");
                std::process::exit(2);
            }
        }
    }
    o
}

/// A number that differs per call.
fn fastrand() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// A 2/DCP sample of exactly `n` bytes (at least 16).
fn sample(n: usize) -> Vec<u8> {
    let head = br#"[{"t":1,"p":""#;
    let tail = br#""}]"#;
    let mut s = head.to_vec();
    s.resize(n.max(head.len() + tail.len()) - tail.len(), b'x');
    s.extend_from_slice(tail);
    s
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Fleetgate,
    Sink,
}

struct Server {
    child: Child,
    side: Side,
    udp: SocketAddr,
    admin: SocketAddr,
    dir: PathBuf,
    key: [u8; 32],
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(o: &Opts, side: Side) -> Server {
    let dir = std::env::temp_dir().join(format!("fgu-u1-{}-{}", std::process::id(), fastrand()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let udp = SocketAddr::from(([127, 0, 0, 1], o.port));
    let admin = SocketAddr::from(([127, 0, 0, 1], o.port + 1));
    let mut cmd = Command::new("taskset");
    cmd.arg("-c").arg(&o.sut_cpus).stdout(Stdio::null()).stderr(Stdio::inherit());
    let key = match side {
        Side::Fleetgate => {
            let path = dir.join("udp.key");
            let keys = fleetgate_transport_udp::keys::generate(&path)
                .unwrap_or_else(|e| panic!("key: {e}"));
            cmd.arg(&o.fleetgate)
                .arg("up")
                .current_dir(&dir)
                .env_remove("FLEETGATE_CONFIG")
                .env("FLEETGATE_TRANSPORTS_UDP_LISTEN", udp.to_string())
                .env("FLEETGATE_TRANSPORTS_UDP_PRIVATE_KEY_PATH", &path)
                .env("FLEETGATE_TRANSPORTS_UDP_HANDSHAKES_PER_TOKEN_PER_MIN", "100000")
                // All the generator's sessions come from one address, at set-up speed.
                .env("FLEETGATE_TRANSPORTS_UDP_HANDSHAKES_PER_ADDRESS_PER_SEC", "1000000")
                .env("FLEETGATE_TRANSPORTS_MQTT_ENABLED", "false")
                .env("FLEETGATE_TRANSPORTS_COAP_ENABLED", "false")
                .env("FLEETGATE_TRANSPORTS_HTTP_ENABLED", "false")
                .env("FLEETGATE_ADMIN_LISTEN", admin.to_string())
                .env("FLEETGATE_AUTH_AUTO_REGISTER", "true")
                .env("FLEETGATE_LOG_FILTER", "warn");
            keys.public
        }
        Side::Sink => {
            cmd.arg(std::env::current_exe().unwrap_or_default()).arg("sink").arg(udp.to_string());
            [0; 32]
        }
    };
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn: {e}"));
    let server = Server { child, side, udp, admin, dir, key };
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.delivered().is_none() {
        assert!(Instant::now() < deadline, "server not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

impl Server {
    fn pid(&self) -> u32 {
        // taskset execs the server, so the child's pid is the server's.
        self.child.id()
    }

    /// The `/metrics` sample lines of fleetgate that contain `part`, joined.
    fn metrics_matching(&self, part: &str) -> Option<String> {
        let mut s = TcpStream::connect_timeout(&self.admin, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let lines: Vec<&str> =
            text.lines().filter(|l| l.contains(part) && !l.starts_with('#')).collect();
        Some(lines.join("; "))
    }

    fn delivered(&self) -> Option<u64> {
        match self.side {
            Side::Fleetgate => {
                let mut s =
                    TcpStream::connect_timeout(&self.admin, Duration::from_millis(500)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
                let mut text = String::new();
                s.read_to_string(&mut text).ok()?;
                text.lines()
                    .find(|l| l.starts_with("fleetgate_gateway_requests_total"))
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|v| v.parse::<f64>().ok())
                    .map(|v| v as u64)
                    .or(Some(0))
            }
            Side::Sink => {
                let s = UdpSocket::bind("127.0.0.1:0").ok()?;
                s.set_read_timeout(Some(Duration::from_millis(300))).ok()?;
                s.send_to(COUNT, self.udp).ok()?;
                let mut b = [0u8; 8];
                let (n, _) = s.recv_from(&mut b).ok()?;
                (n == 8).then(|| u64::from_be_bytes(b))
            }
        }
    }
}

/// A session to `server`: a real handshake with fleetgate, a local one for the sink.
fn session(server: &Server, i: usize) -> (UdpSocket, Established) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    socket.connect(server.udp).unwrap_or_else(|e| panic!("connect: {e}"));
    let _ = socket2::SockRef::from(&socket).set_send_buffer_size(1 << 20);
    let token = format!("u1-{i:06}");
    let hello =
        Hello { app_version: "demo-v1", token: Some(&token), username: None, password: None };
    let id = u32::try_from(i + 1).unwrap_or(1);
    match server.side {
        Side::Fleetgate => {
            let mut c =
                Connecting::new(&server.key, id, &hello, None).unwrap_or_else(|e| panic!("{e}"));
            let init = c.init_packet(None).unwrap_or_else(|e| panic!("{e}"));
            socket.set_read_timeout(Some(Duration::from_secs(1))).ok();
            let mut buf = [0u8; 2048];
            for _ in 0..10 {
                socket.send(&init).ok();
                if let Ok(n) = socket.recv(&mut buf) {
                    let (est, _) = c.finish(&buf[..n]).unwrap_or_else(|e| panic!("handshake: {e}"));
                    return (socket, est);
                }
            }
            panic!("no handshake answer");
        }
        Side::Sink => {
            let keys = KeyPair::from_private([5; 32]);
            let mut c =
                Connecting::new(&keys.public, id, &hello, None).unwrap_or_else(|e| panic!("{e}"));
            let init = c.init_packet(None).unwrap_or_else(|e| panic!("{e}"));
            let Ok(Packet::Init { noise, .. }) = Packet::parse(&init) else { panic!("INIT") };
            let mut hs = handshake::responder(&keys, None).unwrap_or_else(|e| panic!("{e}"));
            let mut buf = vec![0; noise.len()];
            handshake::read_init(&mut hs, noise, &mut buf).unwrap_or_else(|e| panic!("{e}"));
            let mut header = Vec::new();
            wire::put_resp_header(&mut header, id, 7);
            let welcome = Welcome::Accepted {
                lifetime_secs: 60,
                keepalive_secs: 25,
                max_datagram: 1200,
                server_time_ms: 0,
                aliases: vec!["dcx"],
            };
            let (resp, _) =
                handshake::write_resp(hs, header, &welcome).unwrap_or_else(|e| panic!("{e}"));
            let (est, _) = c.finish(&resp).unwrap_or_else(|e| panic!("{e}"));
            (socket, est)
        }
    }
}

struct Step {
    rate: u64,
    sent: u64,
    delivered: u64,
    cpu: f64,
    secs: f64,
}

fn run_steps(o: &Opts, server: &Server) -> Vec<Step> {
    let mut sessions: Vec<_> = (0..o.sessions).map(|i| session(server, i)).collect();
    let mut frames = Vec::new();
    Frame::Request {
        ext: Ext::Alias(0),
        path: "/json",
        id: None,
        payload: &sample(o.payload_bytes),
    }
    .put(&mut frames);
    let mut steps = Vec::new();
    for &rate in &o.rates {
        std::thread::sleep(Duration::from_millis(300));
        let before = server.delivered().unwrap_or(0);
        let cpu_before = procfs::cpu_secs(server.pid()).unwrap_or(0.0);
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(o.secs);
        let mut sent: u64 = 0;
        let mut next = 0;
        let mut tick = start;
        while tick < end {
            let due = (rate as f64 * tick.duration_since(start).as_secs_f64()) as u64;
            while sent < due {
                let (socket, est) = &mut sessions[next];
                next = (next + 1) % o.sessions;
                let packet = est.seal(&frames);
                if socket.send(&packet).is_ok() {
                    sent += 1;
                }
            }
            tick += Duration::from_millis(1);
            if let Some(wait) = tick.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let secs = start.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(500));
        let delivered = server.delivered().unwrap_or(0).saturating_sub(before);
        let cpu = procfs::cpu_secs(server.pid()).unwrap_or(0.0) - cpu_before;
        eprintln!(
            "  {:>9} {:>7}/s: sent {sent} ({:.0}/s), delivered {delivered} (loss {:.3} %), {:.2} CPU-s/M",
            if server.side == Side::Fleetgate { "fleetgate" } else { "sink" },
            rate,
            sent as f64 / secs,
            100.0 * (1.0 - delivered as f64 / sent.max(1) as f64),
            cpu * 1e6 / delivered.max(1) as f64
        );
        if server.side == Side::Fleetgate
            && let Some(refused) = server.metrics_matching("datagrams_refused_total")
        {
            eprintln!("            refused so far: {refused}");
        }
        steps.push(Step { rate, sent, delivered, cpu, secs });
    }
    steps
}

/// The highest step with loss ≤ 0.1 % at which the generator offered at least 95 % of the rate.
fn msr(steps: &[Step]) -> Option<&Step> {
    steps
        .iter()
        .filter(|s| s.sent as f64 / s.secs >= 0.95 * s.rate as f64)
        .filter(|s| s.delivered as f64 >= 0.999 * s.sent as f64)
        .max_by_key(|s| s.rate)
}

fn compare(args: &[String]) {
    let o = parse(args);
    println!(
        "| pair (first) | FGU/1 ingest MSR | raw sink MSR | ratio | fleetgate CPU-s/M | sink CPU-s/M |"
    );
    println!("|---|---|---|---|---|---|");
    for pair in 1..=o.pairs {
        let order = if pair % 2 == 1 {
            [Side::Fleetgate, Side::Sink]
        } else {
            [Side::Sink, Side::Fleetgate]
        };
        let mut results = Vec::new();
        for side in order {
            let server = start(&o, side);
            let steps = run_steps(&o, &server);
            let best = msr(&steps).map(|s| (s.rate, s.cpu * 1e6 / s.delivered.max(1) as f64));
            results.push((side, best));
        }
        let get = |side| results.iter().find(|(s, _)| *s == side).and_then(|(_, b)| *b);
        let (f, s) = (get(Side::Fleetgate), get(Side::Sink));
        let ratio = match (f, s) {
            (Some(f), Some(s)) => format!("{:.2}", f.0 as f64 / s.0 as f64),
            _ => "n/a".into(),
        };
        let show = |b: Option<(u64, f64)>| {
            b.map_or(("none".to_owned(), "-".to_owned()), |(r, c)| {
                (format!("{} k/s", r / 1000), format!("{c:.2}"))
            })
        };
        let ((fr, fc), (sr, sc)) = (show(f), show(s));
        let first = if order[0] == Side::Fleetgate { "fleetgate" } else { "sink" };
        println!("| {pair} ({first}) | {fr} | {sr} | {ratio} | {fc} | {sc} |");
    }
}
