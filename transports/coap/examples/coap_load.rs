//! An open-loop CoAP load tool, and a side-by-side runner that compares fleetgate with libcoap's
//! `coap-server-notls` in the same run (BENCHMARKS.md, "CoAP CON POST vs libcoap").
//!
//! The load: confirmable POST (or PUT) requests at stepped offered rates, spread over many
//! client sockets (one CoAP peer each), no retransmissions. One thread sends with `sendmmsg` in
//! bursts of `--batch` requests per socket once a millisecond, and then receives with `recvmmsg`
//! on the sockets epoll says are readable (so latencies are measured to within a millisecond),
//! sleeping in between: one core offers a few hundred thousand requests a second. A request counts as answered when a response (piggybacked on the ACK, or separate)
//! carries its token; an empty ACK or a RST is not an answer. For each step it prints the
//! answered rate, loss, error responses (not 2.xx) and latency percentiles; a step whose last
//! request went out late (the tool could not keep up) is marked generator-limited.
//!
//! ```text
//! coap_load <addr> [--path kp1/demo-v1/dcx/demo-token/json] [--method post|put]
//!     [--rates 20000,40000] [--secs 3] [--sockets 64] [--batch 8] [--payload '[{"t":1}]']
//! coap_load echo <addr>     # the ceiling: a batched UDP responder that answers 2.04
//! coap_load compare [--fleetgate PATH] [--fleetgate-b PATH] [--libcoap coap-server-notls]
//!     [--sut-cpus 0]
//!     [--pairs 3] [--port 25683] [--rates ...] [--secs 3] [--sockets 64] [--batch 8]
//! ```
//!
//! `compare` runs, for each pair, fleetgate (`fleetgate up`, CoAP on `--port`, its other
//! listeners on the ports just above) and `coap-server-notls -p <port + 1> -e -d 100` (in
//! that order in odd pairs, the other way round in even ones)
//! (which answers a POST to an existing resource with 2.04 and the payload echoed; the probe's
//! first POST creates it), each pinned with `taskset -c <sut-cpus>`, each given a warm-up and
//! then every step. It prints each side's steps with the server's CPU-seconds per million
//! answered (utime + stime from `/proc/<pid>/stat`), each side's maximum sustainable rate (MSR:
//! the highest step with loss ≤ `--max-loss-pct` and p99 < `--max-p99-ms`, generator-limited
//! steps excluded), the ratio per pair and the medians. Pin the tool itself to another core
//! (`taskset -c 1 coap_load compare ...`).
//!
//! Sends only to the address given, or to 127.0.0.1 (`compare`); every run is bounded by its
//! steps, and `compare` kills the servers it started.

#![allow(missing_docs, clippy::unwrap_used, clippy::print_stdout, clippy::expect_used)]

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fleetgate_transport_coap::codec::{Code, MessageType, MessageWriter, option};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg, sendmsg,
};

/// Largest response read; larger ones are truncated (and still counted by their token).
const RECV_BUF: usize = 1536;
/// Datagrams read per `recvmmsg`.
const RECV_BATCH: usize = 32;
/// How often the sender wakes up.
const TICK: Duration = Duration::from_millis(1);

#[derive(Clone)]
struct LoadArgs {
    path: String,
    method: Code,
    rates: Vec<u64>,
    secs: f64,
    sockets: usize,
    batch: usize,
    payload: Vec<u8>,
    drain_ms: u64,
    /// Send each socket's burst as one UDP GSO datagram train (`UDP_SEGMENT`), which the
    /// kernel splits into ordinary datagrams before the server's socket; else `sendmmsg`.
    gso: bool,
}

impl Default for LoadArgs {
    fn default() -> Self {
        Self {
            path: "kp1/demo-v1/dcx/demo-token/json".into(),
            method: Code::POST,
            rates: vec![10_000, 20_000, 40_000],
            secs: 3.0,
            sockets: 64,
            batch: 8,
            payload: br#"[{"t":1}]"#.to_vec(),
            drain_ms: 500,
            gso: true,
        }
    }
}

impl LoadArgs {
    /// Takes one option of the load itself; false when `flag` is not one.
    fn take(&mut self, flag: &str, value: &str) -> bool {
        match flag {
            "--path" => self.path = value.into(),
            "--method" => self.method = if value == "put" { Code::PUT } else { Code::POST },
            "--rates" => {
                self.rates = value.split(',').map(|r| r.trim().parse().expect("rate")).collect()
            }
            "--secs" => self.secs = value.parse().expect("secs"),
            "--sockets" => self.sockets = value.parse().expect("sockets"),
            "--batch" => self.batch = value.parse::<usize>().expect("batch").clamp(1, 64),
            "--payload" => self.payload = value.as_bytes().to_vec(),
            "--drain-ms" => self.drain_ms = value.parse().expect("drain ms"),
            "--gso" => self.gso = value != "off",
            _ => return false,
        }
        true
    }
}

/// The request every socket sends, with message id and token patched in.
fn template(args: &LoadArgs) -> Vec<u8> {
    let mut out = BytesMut::new();
    let mut w =
        MessageWriter::new(&mut out, MessageType::Confirmable, args.method, 0, &[0, 0]).unwrap();
    for segment in args.path.split('/').filter(|s| !s.is_empty()) {
        w.option(option::URI_PATH, segment.as_bytes()).unwrap();
    }
    w.payload(&args.payload);
    out.to_vec()
}

/// One step's outcome.
#[derive(Clone, Debug, Default)]
struct StepResult {
    rate: u64,
    sent: u64,
    send_failed: u64,
    answered: u64,
    /// Answers whose code is not 2.xx.
    errors: u64,
    empty_acks: u64,
    /// Answers to requests no longer waited for (late, or duplicates).
    stray: u64,
    /// Seconds from the first to the last request sent.
    send_secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    generator_limited: bool,
    /// CPU-seconds the server used during the step (compare only).
    server_cpu: Option<f64>,
    /// CPU-seconds this tool used during the step.
    load_cpu: Option<f64>,
}

impl StepResult {
    fn loss_pct(&self) -> f64 {
        100.0 * self.sent.saturating_sub(self.answered) as f64 / self.sent.max(1) as f64
    }

    fn sustained(&self, max_loss_pct: f64, max_p99_ms: f64) -> bool {
        !self.generator_limited
            && self.sent > 0
            && self.loss_pct() <= max_loss_pct
            && self.p99_ms < max_p99_ms
    }

    fn cpu_per_million(&self, cpu: Option<f64>) -> Option<f64> {
        cpu.map(|c| c * 1e6 / self.answered.max(1) as f64)
    }

    fn header() -> &'static str {
        "offered/s     sent  answered/s   loss%  errors  p50_ms  p99_ms  max_ms  srv_cpu_s/M  \
         load_cpu_s/M"
    }

    fn line(&self) -> String {
        let cpu = |c: Option<f64>| c.map_or_else(|| "-".into(), |c| format!("{c:.2}"));
        format!(
            "{:>9}  {:>7}  {:>10.0}  {:>6.3}  {:>6}  {:>6.2}  {:>6.2}  {:>6.2}  {:>11}  {:>12}{}{}",
            self.rate,
            self.sent,
            self.answered as f64 / self.send_secs.max(1e-3),
            self.loss_pct(),
            self.errors,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            cpu(self.cpu_per_million(self.server_cpu)),
            cpu(self.cpu_per_million(self.load_cpu)),
            if self.generator_limited { "  generator-limited" } else { "" },
            if self.send_failed + self.empty_acks + self.stray > 0 {
                format!(
                    "  (send failed {}, empty ACKs {}, stray {})",
                    self.send_failed, self.empty_acks, self.stray
                )
            } else {
                String::new()
            },
        )
    }
}

/// Client sockets and their outstanding requests; single-threaded.
struct Engine {
    sockets: Vec<UdpSocket>,
    epoll: Epoll,
    batch: usize,
    mids: Vec<u16>,
    /// Per socket and token: when the request went out, µs since `origin` plus one; 0 when none
    /// is outstanding.
    sent_at: Vec<u32>,
    origin: Instant,
    next_socket: usize,
    send_headers: MultiHeaders<SockaddrStorage>,
    send_bufs: Vec<Vec<u8>>,
    no_addrs: Vec<Option<SockaddrStorage>>,
    /// `Some(request length)` while sending with GSO; the train of requests goes in `train`.
    gso: Option<u16>,
    train: Vec<u8>,
    recv_headers: MultiHeaders<SockaddrStorage>,
    recv_bufs: Vec<Vec<u8>>,
}

#[derive(Default)]
struct Tally {
    answered: u64,
    errors: u64,
    empty_acks: u64,
    stray: u64,
    latencies_us: Vec<u32>,
}

impl Engine {
    fn new(addr: SocketAddr, args: &LoadArgs) -> std::io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let mut sockets = Vec::new();
        for i in 0..args.sockets.max(1) {
            let socket = UdpSocket::bind("127.0.0.1:0")?;
            socket.connect(addr)?;
            socket.set_nonblocking(true)?;
            let s = socket2::SockRef::from(&socket);
            let _ = s.set_recv_buffer_size(1 << 20);
            let _ = s.set_send_buffer_size(1 << 20);
            epoll.add(&socket, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
            sockets.push(socket);
        }
        let template = template(args);
        let batch = args.batch.max(1);
        Ok(Self {
            sent_at: vec![0; sockets.len() << 16],
            mids: vec![0; sockets.len()],
            sockets,
            epoll,
            gso: args.gso.then(|| u16::try_from(template.len()).unwrap()),
            train: template.repeat(batch),
            send_bufs: vec![template; batch],
            batch,
            origin: Instant::now(),
            next_socket: 0,
            send_headers: MultiHeaders::preallocate(batch, None),
            no_addrs: vec![None; batch],
            recv_headers: MultiHeaders::preallocate(RECV_BATCH, None),
            recv_bufs: vec![vec![0; RECV_BUF]; RECV_BATCH],
        })
    }

    fn micros(&self, at: Instant) -> u32 {
        u32::try_from(at.duration_since(self.origin).as_micros()).unwrap_or(u32::MAX - 1)
    }

    /// Sends `n` requests, `batch` at a time per socket, round robin; returns how many could not
    /// be sent.
    fn send(&mut self, mut n: u64, now: Instant) -> u64 {
        let stamp = self.micros(now) + 1;
        let mut failed = 0;
        while n > 0 {
            let k = (n as usize).min(self.batch);
            n -= k as u64;
            let i = self.next_socket;
            self.next_socket = (i + 1) % self.sockets.len();
            let mut tokens = [0u16; 64];
            for (j, token) in tokens.iter_mut().enumerate().take(k) {
                self.mids[i] = self.mids[i].wrapping_add(1);
                let mid = self.mids[i];
                *token = mid;
                let buf = &mut self.send_bufs[j];
                buf[2..4].copy_from_slice(&mid.to_be_bytes());
                buf[4..6].copy_from_slice(&mid.to_be_bytes());
                self.sent_at[(i << 16) | usize::from(mid)] = stamp;
            }
            let done = match self.gso {
                Some(len) if k > 1 => {
                    let size = usize::from(len);
                    for (j, token) in tokens[..k].iter().enumerate() {
                        let req = &mut self.train[j * size..(j + 1) * size];
                        req[2..4].copy_from_slice(&token.to_be_bytes());
                        req[4..6].copy_from_slice(&token.to_be_bytes());
                    }
                    let iov = [IoSlice::new(&self.train[..k * size])];
                    let cmsgs = [ControlMessage::UdpGsoSegments(&len)];
                    let fd = self.sockets[i].as_raw_fd();
                    match sendmsg::<()>(fd, &iov, &cmsgs, MsgFlags::MSG_DONTWAIT, None) {
                        Ok(_) => k,
                        Err(Errno::EAGAIN) => 0,
                        Err(e) => {
                            eprintln!("UDP GSO send failed ({e}); falling back to sendmmsg");
                            self.gso = None;
                            self.send_mmsg(i, k)
                        }
                    }
                }
                _ => self.send_mmsg(i, k),
            };
            for &mid in &tokens[done..k] {
                self.sent_at[(i << 16) | usize::from(mid)] = 0;
                failed += 1;
            }
        }
        failed
    }

    /// Sends the first `k` requests of `send_bufs` on socket `i`; returns how many went out.
    fn send_mmsg(&mut self, i: usize, k: usize) -> usize {
        let slices: Vec<[IoSlice<'_>; 1]> =
            self.send_bufs[..k].iter().map(|b| [IoSlice::new(b)]).collect();
        let cmsgs: [ControlMessage<'_>; 0] = [];
        match sendmmsg(
            self.sockets[i].as_raw_fd(),
            &mut self.send_headers,
            &slices,
            &self.no_addrs[..k],
            cmsgs,
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(results) => results.count(),
            Err(_) => 0,
        }
    }

    /// Reads everything socket `i` has.
    fn receive(&mut self, i: usize, tally: &mut Tally) {
        loop {
            let lens: Vec<usize> = {
                let mut slices: Vec<[IoSliceMut<'_>; 1]> =
                    self.recv_bufs.iter_mut().map(|b| [IoSliceMut::new(&mut b[..])]).collect();
                match recvmmsg(
                    self.sockets[i].as_raw_fd(),
                    &mut self.recv_headers,
                    slices.iter_mut(),
                    MsgFlags::MSG_DONTWAIT,
                    None,
                ) {
                    Ok(results) => results.map(|r| r.bytes).collect(),
                    Err(Errno::EINTR) => continue,
                    // EAGAIN, or an ICMP error (port unreachable) surfacing here.
                    Err(_) => return,
                }
            };
            let now = self.micros(Instant::now());
            for (j, &len) in lens.iter().enumerate() {
                self.on_response(i, j, len.min(RECV_BUF), now, tally);
            }
            if lens.len() < RECV_BATCH {
                return;
            }
        }
    }

    fn on_response(&mut self, i: usize, j: usize, len: usize, now: u32, tally: &mut Tally) {
        let d = &self.recv_bufs[j][..len];
        if len < 4 || d[0] >> 6 != 1 {
            tally.stray += 1;
            return;
        }
        let (mtype, tkl, code) = ((d[0] >> 4) & 3, d[0] & 0x0F, d[1]);
        if code == 0 {
            if mtype == 2 {
                tally.empty_acks += 1;
            }
            return;
        }
        if tkl != 2 || len < 6 {
            tally.stray += 1;
            return;
        }
        if mtype == 0 {
            // A separate confirmable response: acknowledge it so that it is not retransmitted.
            let ack = [0x60, 0, d[2], d[3]];
            let _ = self.sockets[i].send(&ack);
        }
        let token = u16::from_be_bytes([d[4], d[5]]);
        let slot = &mut self.sent_at[(i << 16) | usize::from(token)];
        if *slot == 0 {
            tally.stray += 1;
            return;
        }
        let latency = now.saturating_sub(*slot - 1);
        *slot = 0;
        tally.answered += 1;
        if code >> 5 != 2 {
            tally.errors += 1;
        }
        tally.latencies_us.push(latency);
    }

    /// One step: `rate` requests a second for `secs`, then `drain` to collect late answers.
    fn step(&mut self, rate: u64, secs: f64, drain: Duration) -> StepResult {
        let total = (rate as f64 * secs).round() as u64;
        let mut tally =
            Tally { latencies_us: Vec::with_capacity(total as usize), ..Tally::default() };
        let mut events = vec![EpollEvent::empty(); 64];
        let (mut sent, mut send_failed) = (0u64, 0u64);
        let start = Instant::now();
        let mut next_send = start;
        let mut last_send = start;
        let mut drain_until = None;
        loop {
            let now = Instant::now();
            if sent < total && now >= next_send {
                let due = ((now - start).as_secs_f64() * rate as f64) as u64;
                let due = due.min(total);
                if due > sent {
                    send_failed += self.send(due - sent, now);
                    sent = due;
                    last_send = now;
                }
                next_send += TICK;
                if next_send < now {
                    next_send = now;
                }
            }
            // Receive what has arrived, once a tick rather than on every datagram: fewer
            // wake-ups and larger `recvmmsg` batches (latencies are read to within a tick).
            let n = match self.epoll.wait(&mut events, EpollTimeout::ZERO) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => panic!("epoll_wait: {e}"),
            };
            for event in &events[..n] {
                self.receive(event.data() as usize, &mut tally);
            }
            let now = Instant::now();
            let wake = if sent < total {
                next_send
            } else {
                let until = *drain_until.get_or_insert(now + drain);
                if now >= until {
                    break;
                }
                until.min(now + TICK)
            };
            if n < events.len() && wake > now {
                std::thread::sleep(wake - now);
            }
        }
        // Whatever is still outstanding is lost; answers to it later are stray.
        self.sent_at.iter_mut().for_each(|s| *s = 0);
        let send_secs = (last_send - start).as_secs_f64();
        let mut lat = std::mem::take(&mut tally.latencies_us);
        lat.sort_unstable();
        let pct = |p: f64| {
            if lat.is_empty() {
                return f64::NAN;
            }
            let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
            f64::from(lat[i]) / 1000.0
        };
        StepResult {
            rate,
            sent: sent - send_failed,
            send_failed,
            answered: tally.answered,
            errors: tally.errors,
            empty_acks: tally.empty_acks,
            stray: tally.stray,
            send_secs: send_secs.max(secs.min(1e-3)),
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            max_ms: pct(1.0),
            // The last request was due at `secs`: more than 2 % + 20 ms later means the tool
            // itself could not keep up with the rate.
            generator_limited: send_secs > secs * 1.02 + 0.02 || send_failed * 1000 > sent,
            server_cpu: None,
            load_cpu: None,
        }
    }
}

// ---- /proc ----

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of a process (all its threads), in seconds.
fn cpu_secs(pid: &str, ticks: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / ticks)
}

// ---- one load run ----

fn load_main(mut argv: impl Iterator<Item = String>) {
    let addr: SocketAddr = argv
        .next()
        .expect("usage: coap_load <addr> [options] | coap_load compare [options]")
        .parse()
        .expect("address");
    let mut args = LoadArgs::default();
    while let Some(flag) = argv.next() {
        let value = argv.next().expect("option value");
        assert!(args.take(&flag, &value), "unknown option {flag}");
    }
    let ticks = clock_ticks();
    let mut engine = Engine::new(addr, &args).expect("client sockets");
    println!("{}", StepResult::header());
    for &rate in &args.rates {
        let before = cpu_secs("self", ticks);
        let mut step = engine.step(rate, args.secs, Duration::from_millis(args.drain_ms));
        step.load_cpu = cpu_secs("self", ticks).zip(before).map(|(a, b)| a - b);
        println!("{}", step.line());
    }
}

// ---- compare ----

struct CompareArgs {
    load: LoadArgs,
    fleetgate: String,
    fleetgate_b: String,
    libcoap: String,
    sut_cpus: String,
    pairs: usize,
    port: u16,
    warmup_secs: f64,
    max_loss_pct: f64,
    max_p99_ms: f64,
    /// Stop a side's steps after this many consecutive steps that lost more than 5 %.
    stop_after: usize,
}

/// A server process that is killed when dropped.
struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Fleetgate,
    Libcoap,
    /// A second fleetgate build (`--fleetgate-b`), run between the two, to A/B a change.
    FleetgateB,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Fleetgate => "fleetgate",
            Side::Libcoap => "libcoap",
            Side::FleetgateB => "fleetgate-b",
        }
    }
}

fn start(args: &CompareArgs, side: Side) -> (Server, SocketAddr) {
    let port = args.port;
    let local = |p: u16| format!("127.0.0.1:{p}");
    let (program, argv, env): (&str, Vec<String>, Vec<(String, String)>) = match side {
        Side::Fleetgate | Side::FleetgateB => (
            if side == Side::Fleetgate { &args.fleetgate } else { &args.fleetgate_b },
            vec!["up".into()],
            vec![
                ("FLEETGATE_TRANSPORTS_COAP_LISTEN".into(), local(port)),
                ("FLEETGATE_TRANSPORTS_MQTT_LISTEN".into(), local(port + 2)),
                ("FLEETGATE_TRANSPORTS_HTTP_LISTEN".into(), local(port + 3)),
                ("FLEETGATE_TRANSPORTS_UDP_ENABLED".into(), "false".into()),
                ("FLEETGATE_ADMIN_LISTEN".into(), local(port + 4)),
                ("FLEETGATE_LOG_FILTER".into(), "warn".into()),
            ],
        ),
        Side::Libcoap => (
            &args.libcoap,
            vec![
                "-A".into(),
                "127.0.0.1".into(),
                "-p".into(),
                (port + 1).to_string(),
                "-e".into(),
                "-d".into(),
                "100".into(),
            ],
            vec![],
        ),
    };
    let addr: SocketAddr =
        local(if side == Side::Libcoap { port + 1 } else { port }).parse().unwrap();
    let mut cmd = if args.sut_cpus.is_empty() {
        Command::new(program)
    } else {
        let mut c = Command::new("taskset");
        c.args(["-c", &args.sut_cpus, program]);
        c
    };
    // Its own working directory, for whatever a server writes there (fleetgate's spool).
    let dir = std::env::temp_dir().join(format!("coap-load-{}-{}", std::process::id(), port));
    let _ = std::fs::create_dir_all(&dir);
    cmd.current_dir(&dir);
    cmd.args(&argv).envs(env).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    let server = Server { child };
    // Ready when it answers a request (for libcoap, the first POST creates the resource).
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    probe.connect(addr).unwrap();
    probe.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut request = template(&args.load);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 1536];
    for mid in 1u16.. {
        assert!(Instant::now() < deadline, "{} did not answer within 20 s", side.name());
        request[2..4].copy_from_slice(&mid.to_be_bytes());
        request[4..6].copy_from_slice(&mid.to_be_bytes());
        let _ = probe.send(&request);
        if let Ok(n) = probe.recv(&mut buf)
            && n >= 4
            && buf[1] != 0
        {
            break;
        }
    }
    (server, addr)
}

/// The highest sustained step's index.
fn msr(steps: &[StepResult], args: &CompareArgs) -> Option<usize> {
    (0..steps.len())
        .filter(|&i| steps[i].sustained(args.max_loss_pct, args.max_p99_ms))
        .max_by_key(|&i| (steps[i].rate, i))
}

struct SideRun {
    steps: Vec<StepResult>,
    msr: Option<usize>,
}

impl SideRun {
    fn rate(&self) -> u64 {
        self.msr.map_or(0, |i| self.steps[i].rate)
    }

    /// Held the highest offered step: the MSR is only a lower bound.
    fn at_top(&self, top: u64) -> bool {
        self.msr.is_some() && self.rate() == top
    }

    fn cpu_at_msr(&self) -> Option<f64> {
        let s = &self.steps[self.msr?];
        s.cpu_per_million(s.server_cpu)
    }
}

fn run_side(args: &CompareArgs, side: Side, ticks: f64) -> SideRun {
    let (server, addr) = start(args, side);
    let pid = server.child.id().to_string();
    let mut engine = Engine::new(addr, &args.load).expect("client sockets");
    let drain = Duration::from_millis(args.load.drain_ms);
    let first = args.load.rates.first().copied().unwrap_or(1000);
    engine.step(first, args.warmup_secs, drain);
    println!("{}:\n{}", side.name(), StepResult::header());
    let mut steps = Vec::new();
    let mut failing = 0;
    for &rate in &args.load.rates {
        let (srv, own) = (cpu_secs(&pid, ticks), cpu_secs("self", ticks));
        let mut step = engine.step(rate, args.load.secs, drain);
        step.server_cpu = cpu_secs(&pid, ticks).zip(srv).map(|(a, b)| a - b);
        step.load_cpu = cpu_secs("self", ticks).zip(own).map(|(a, b)| a - b);
        println!("{}", step.line());
        failing = if step.loss_pct() > 5.0 { failing + 1 } else { 0 };
        steps.push(step);
        if args.stop_after > 0 && failing >= args.stop_after {
            println!("  (stopped after {failing} steps losing more than 5 %)");
            break;
        }
    }
    drop(engine);
    drop(server);
    let msr = msr(&steps, args);
    SideRun { steps, msr }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.2}"))
}

fn compare_main(mut argv: impl Iterator<Item = String>) {
    let fleetgate = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("fleetgate")))
        .map_or_else(|| "target/release/fleetgate".into(), |p| p.display().to_string());
    let mut args = CompareArgs {
        load: LoadArgs {
            rates: vec![
                20_000, 30_000, 40_000, 50_000, 60_000, 80_000, 100_000, 120_000, 140_000, 160_000,
                200_000,
            ],
            ..LoadArgs::default()
        },
        fleetgate,
        fleetgate_b: String::new(),
        libcoap: "coap-server-notls".into(),
        sut_cpus: "0".into(),
        pairs: 3,
        port: 25_683,
        warmup_secs: 1.0,
        max_loss_pct: 0.1,
        max_p99_ms: 50.0,
        stop_after: 2,
    };
    while let Some(flag) = argv.next() {
        let value = argv.next().expect("option value");
        if args.load.take(&flag, &value) {
            continue;
        }
        match flag.as_str() {
            "--fleetgate" => args.fleetgate = value,
            "--libcoap" => args.libcoap = value,
            "--fleetgate-b" => args.fleetgate_b = value,
            "--sut-cpus" => args.sut_cpus = value,
            "--pairs" => args.pairs = value.parse().expect("pairs"),
            "--port" => args.port = value.parse().expect("port"),
            "--warmup-secs" => args.warmup_secs = value.parse().expect("warm-up secs"),
            "--max-loss-pct" => args.max_loss_pct = value.parse().expect("loss %"),
            "--max-p99-ms" => args.max_p99_ms = value.parse().expect("p99 ms"),
            "--stop-after" => args.stop_after = value.parse().expect("steps"),
            other => panic!("unknown option {other}"),
        }
    }
    let ticks = clock_ticks();
    let top = args.load.rates.iter().copied().max().unwrap_or(0);
    let mut pairs = Vec::new();
    for pair in 1..=args.pairs {
        println!("=== pair {pair} of {}", args.pairs);
        // A B in odd pairs, B A in even ones: whoever runs first in a pair has no edge.
        let libcoap_first = pair % 2 == 0;
        let early = libcoap_first.then(|| run_side(&args, Side::Libcoap, ticks));
        let fg = run_side(&args, Side::Fleetgate, ticks);
        let b = (!args.fleetgate_b.is_empty()).then(|| run_side(&args, Side::FleetgateB, ticks));
        let lc = early.unwrap_or_else(|| run_side(&args, Side::Libcoap, ticks));
        pairs.push((fg, lc, b));
    }
    println!(
        "\nMSR = highest step with loss <= {} % and p99 < {} ms (generator-limited steps \
         excluded); CPU-s per million answered, at each side's MSR step",
        args.max_loss_pct, args.max_p99_ms
    );
    println!("pair  fleetgate_msr  libcoap_msr  ratio  fleetgate_cpu_s/M  libcoap_cpu_s/M");
    let mut ratios = Vec::new();
    let (mut fg_rates, mut lc_rates, mut fg_cpu, mut lc_cpu) = (vec![], vec![], vec![], vec![]);
    let (mut lower, mut upper) = (false, false);
    let mut b_lines = Vec::new();
    for (i, (fg, lc, b)) in pairs.iter().enumerate() {
        if let Some(b) = b {
            b_lines.push(format!(
                "{:>4}  fleetgate {} at {} CPU-s/M, fleetgate-b {} at {} CPU-s/M, ratio b/libcoap \
                 {:.2}",
                i + 1,
                fg.rate(),
                fmt_opt(fg.cpu_at_msr()),
                b.rate(),
                fmt_opt(b.cpu_at_msr()),
                b.rate() as f64 / lc.rate() as f64
            ));
        }
        let ratio = fg.rate() as f64 / lc.rate() as f64;
        let bound = match (fg.at_top(top), lc.at_top(top)) {
            _ if lc.msr.is_none() => "n/a ",
            (true, false) => {
                lower = true;
                ">= "
            }
            (false, true) => {
                upper = true;
                "<= "
            }
            (true, true) => "?? ",
            (false, false) => "",
        };
        println!(
            "{:>4}  {:>13}  {:>11}  {bound}{ratio:.2}  {:>17}  {:>15}",
            i + 1,
            format!("{}{}", fg.rate(), if fg.at_top(top) { "+" } else { "" }),
            format!("{}{}", lc.rate(), if lc.at_top(top) { "+" } else { "" }),
            fmt_opt(fg.cpu_at_msr()),
            fmt_opt(lc.cpu_at_msr()),
        );
        if lc.msr.is_some() {
            ratios.push(ratio);
        }
        fg_rates.push(fg.rate() as f64);
        lc_rates.push(lc.rate() as f64);
        fg_cpu.push(fg.cpu_at_msr().unwrap_or(f64::NAN));
        lc_cpu.push(lc.cpu_at_msr().unwrap_or(f64::NAN));
    }
    let note = match (lower, upper) {
        (true, false) => " (some pairs only a lower bound: fleetgate held the top step)",
        (false, true) => " (some pairs only an upper bound: libcoap held the top step)",
        (true, true) => " (mixed bounds)",
        (false, false) => "",
    };
    println!(
        "median  {:.0}  {:.0}  {:.2}{note}  {}  {}",
        median(fg_rates),
        median(lc_rates),
        median(ratios),
        fmt_opt(Some(median(fg_cpu))),
        fmt_opt(Some(median(lc_cpu))),
    );
    for line in b_lines {
        println!("{line}");
    }
}

// ---- echo ----

/// The physical ceiling: answers every confirmable request with a piggybacked 2.04 carrying
/// its token (header and token only), `recvmmsg`/`sendmmsg` in batches, on one thread.
fn echo_main(mut argv: impl Iterator<Item = String>) {
    let addr: SocketAddr = argv.next().expect("usage: coap_load echo <addr>").parse().unwrap();
    let socket = UdpSocket::bind(addr).expect("bind");
    let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(4 << 20);
    let fd = socket.as_raw_fd();
    let mut bufs = vec![vec![0u8; RECV_BUF]; RECV_BATCH];
    let mut recv_headers = MultiHeaders::<SockaddrStorage>::preallocate(RECV_BATCH, None);
    let mut send_headers = MultiHeaders::<SockaddrStorage>::preallocate(RECV_BATCH, None);
    println!("echoing on {addr}");
    loop {
        let received: Vec<(usize, Option<SockaddrStorage>)> = {
            let mut slices: Vec<[IoSliceMut<'_>; 1]> =
                bufs.iter_mut().map(|b| [IoSliceMut::new(&mut b[..])]).collect();
            match recvmmsg(fd, &mut recv_headers, slices.iter_mut(), MsgFlags::MSG_WAITFORONE, None)
            {
                Ok(results) => results.map(|r| (r.bytes, r.address)).collect(),
                Err(_) => continue,
            }
        };
        let mut addrs = Vec::with_capacity(received.len());
        let mut lens = Vec::with_capacity(received.len());
        for (j, (len, from)) in received.into_iter().enumerate() {
            let b = &mut bufs[j];
            if len < 4 || b[0] >> 4 != 0x4 {
                continue;
            }
            let tkl = usize::from(b[0] & 0x0F).min(8);
            b[0] = 0x60 | b[0] & 0x0F;
            b[1] = Code::CHANGED.0;
            lens.push((j, (4 + tkl).min(len)));
            addrs.push(from);
        }
        let slices: Vec<[IoSlice<'_>; 1]> =
            lens.iter().map(|&(j, n)| [IoSlice::new(&bufs[j][..n])]).collect();
        let cmsgs: [ControlMessage<'_>; 0] = [];
        let _ = sendmmsg(fd, &mut send_headers, &slices, &addrs, cmsgs, MsgFlags::empty());
    }
}

fn main() {
    let mut argv = std::env::args().skip(1).peekable();
    if argv.peek().map(String::as_str) == Some("compare") {
        argv.next();
        compare_main(argv);
    } else if argv.peek().map(String::as_str) == Some("echo") {
        argv.next();
        echo_main(argv);
    } else {
        load_main(argv);
    }
}
