//! The comparison runner behind `fleetgate-compare`: in one run, fleetgate and each peer
//! (Mosquitto 2.0, rumqttd) are started, loaded by `fleetgate-loadgen` child processes and
//! stopped, alternating A B A B, and the medians of the pairs are printed as ratios
//! (DESIGN.md, "How performance is measured").
//!
//! Scenarios:
//! - **M1** MQTT QoS 0 ingest, 1000 devices, 64-byte payloads, stepped offered rates; the
//!   maximum sustainable rate (MSR), CPU-seconds per million messages of the system under test
//!   and, separately, of nats-server.
//! - **M2** the same at QoS 1.
//! - **M4** idle connections (10k, 50k, 100k) and resident memory per connection, fleetgate vs
//!   Mosquitto. One process may hold at most ~19,000 descriptors here, so counts above
//!   `--conns-per-process` use several processes: fleetgate replicas sharing the MQTT port
//!   with SO_REUSEPORT, Mosquitto instances on consecutive ports, and as many generator
//!   processes.
//! - **M5** latency at a fixed 10k msg/s: p50, p99 device → delivery counter.
//!
//! A/B of two fleetgate builds (`--fleetgate-b-bin`): a second fleetgate, `fleetgate-b`, takes
//! part in every pair of every scenario (M4 too) beside fleetgate, started the same way with a
//! nats-server of its own; the two swap order on odd pairs so neither always goes first. Each
//! scenario then also prints fleetgate / fleetgate-b: the median over pairs of the per-pair
//! ratio with the min–max of those ratios. `--peers ''` leaves the brokers out of M1, M2, M5.
//!
//! Placement on a 2-core machine (`--sut-core`, `--load-core`, `--nats-core`): the system under
//! test on core 0, the generator (and its delivery counter) on core 1, nats-server on core 0
//! beside fleetgate. fleetgate's path to its delivery counter includes NATS, so fleetgate and
//! its bus share the one core a broker has to itself: the comparison does not hand fleetgate a
//! second core. Every child is on 127.0.0.0/8, bounded in time, and killed at the end.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::procfs;
use crate::report::Report;
use crate::schedule::split_even;
use crate::svg::{self, Chart, Series};

/// Command-line settings of the runner.
#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// Scenarios to run: m1, m2, m4, m5.
    #[arg(long, value_delimiter = ',', default_value = "m1,m2,m4,m5")]
    pub scenarios: Vec<String>,
    /// Peers to compare with: mosquitto, rumqttd, or none ('') (M4 always uses Mosquitto
    /// only).
    #[arg(long, value_delimiter = ',', default_value = "mosquitto,rumqttd")]
    pub peers: Vec<String>,
    /// A B pairs per scenario; the figures are medians over the pairs.
    #[arg(long, default_value_t = 3)]
    pub pairs: usize,
    /// Where the generator's JSON and SVG files, the logs and the summary go.
    #[arg(long, default_value = "compare-results")]
    pub out: PathBuf,
    /// M1/M2: offered rates, msg/s.
    #[arg(long, value_delimiter = ',', default_value = "10000,20000,40000,80000,120000,160000")]
    pub rates: Vec<u64>,
    /// M1/M2/M5: seconds per step.
    #[arg(long, default_value_t = 5.0)]
    pub step_secs: f64,
    /// M1/M2/M5: devices.
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// QoS 1 in-flight window per device connection.
    #[arg(long, default_value_t = 100)]
    pub window: u32,
    /// M5: the offered rate.
    #[arg(long, default_value_t = 10_000)]
    pub m5_rate: u64,
    /// M5: seconds at that rate.
    #[arg(long, default_value_t = 10.0)]
    pub m5_secs: f64,
    /// M5: QoS.
    #[arg(long, default_value_t = 0)]
    pub m5_qos: u8,
    /// M4: connection counts.
    #[arg(long, value_delimiter = ',', default_value = "10000,50000,100000")]
    pub idle_counts: Vec<usize>,
    /// M4: connections per server or generator process at most (the descriptor limit here is
    /// 20,000 per process).
    #[arg(long, default_value_t = 16_000)]
    pub conns_per_process: usize,
    /// M4: connections per second over all generator processes.
    #[arg(long, default_value_t = 5000.0)]
    pub idle_connect_rate: f64,
    /// M4: seconds to hold after the ramp-up (memory is sampled ~2 s after every generator
    /// reported its connections up).
    #[arg(long, default_value_t = 8.0)]
    pub idle_hold_secs: f64,
    /// Source addresses for the devices.
    #[arg(long, default_value = "127.0.0.2-127.0.0.20")]
    pub source_ips: String,
    /// Core of the system under test.
    #[arg(long, default_value = "0")]
    pub sut_core: String,
    /// Core of the load generator.
    #[arg(long, default_value = "1")]
    pub load_core: String,
    /// Core of nats-server.
    #[arg(long, default_value = "0")]
    pub nats_core: String,
    /// Do not pin with taskset.
    #[arg(long)]
    pub no_pin: bool,
    /// The fleetgate binary (default: beside this one).
    #[arg(long)]
    pub fleetgate_bin: Option<PathBuf>,
    /// A second fleetgate binary to A/B against the first: it runs in every pair of every
    /// scenario as `fleetgate-b`, and fleetgate / fleetgate-b ratios are printed.
    #[arg(long)]
    pub fleetgate_b_bin: Option<PathBuf>,
    /// The fleetgate-loadgen binary (default: beside this one).
    #[arg(long)]
    pub loadgen_bin: Option<PathBuf>,
    /// The Mosquitto broker.
    #[arg(long, default_value = "mosquitto")]
    pub mosquitto_bin: PathBuf,
    /// rumqttd.
    #[arg(long, default_value = "rumqttd")]
    pub rumqttd_bin: PathBuf,
    /// nats-server.
    #[arg(long, default_value = "nats-server")]
    pub nats_server_bin: PathBuf,
}

/// Why the runner stopped.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// A binary or setting is missing or wrong.
    #[error("{0}")]
    Setup(String),
    /// A child process failed.
    #[error("{0}")]
    Run(String),
}

fn setup(msg: impl Into<String>) -> CompareError {
    CompareError::Setup(msg.into())
}

/// The systems the runner can start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum System {
    /// `fleetgate up` on NATS, auto-registering tokens; delivery counted on NATS.
    Fleetgate,
    /// The same with the `--fleetgate-b-bin` binary: the other side of an A/B of two builds.
    FleetgateB,
    /// Mosquitto 2.0, delivery counted by one subscriber on `kp1/#`.
    Mosquitto,
    /// rumqttd, segment sizes capped, delivery counted by one subscriber on `kp1/#`.
    Rumqttd,
}

impl System {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            System::Fleetgate => "fleetgate",
            System::FleetgateB => "fleetgate-b",
            System::Mosquitto => "mosquitto",
            System::Rumqttd => "rumqttd",
        }
    }

    /// Whether this is a fleetgate build: started on nats-server, delivery counted on NATS.
    fn is_fleetgate(self) -> bool {
        matches!(self, System::Fleetgate | System::FleetgateB)
    }

    /// A peer name of `--peers` (fleetgate-b is not one: it comes with `--fleetgate-b-bin`).
    fn parse(s: &str) -> Option<System> {
        match s.trim() {
            "fleetgate" => Some(System::Fleetgate),
            "mosquitto" => Some(System::Mosquitto),
            "rumqttd" => Some(System::Rumqttd),
            _ => None,
        }
    }
}

/// The median of `values` (mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// The per-pair ratios `a[i] / b[i]`; pairs where `b[i]` is 0 or a figure is missing are left
/// out.
fn pair_ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .filter(|(_, b)| **b > 0.0)
        .map(|(a, b)| a / b)
        .filter(|r| r.is_finite())
        .collect()
}

/// The median over pairs of `a[i] / b[i]` (pairs where `b[i]` is 0 are left out).
pub fn median_ratio(a: &[f64], b: &[f64]) -> Option<f64> {
    median(&pair_ratios(a, b))
}

/// Per-pair ratios summarised: their median and their spread.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RatioSpread {
    /// The median over pairs of the per-pair ratio.
    pub median: f64,
    /// The smallest per-pair ratio.
    pub min: f64,
    /// The largest per-pair ratio.
    pub max: f64,
    /// Pairs that gave a ratio.
    pub pairs: usize,
}

impl RatioSpread {
    /// The per-pair ratios `a[i] / b[i]` summarised (as [`median_ratio`] leaves pairs out);
    /// `None` when no pair gave one.
    pub fn of(a: &[f64], b: &[f64]) -> Option<RatioSpread> {
        let ratios = pair_ratios(a, b);
        Some(RatioSpread {
            median: median(&ratios)?,
            min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
            max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            pairs: ratios.len(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// A child process, stopped (SIGTERM, then SIGKILL) when dropped.
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Ok(None) = child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Builds commands, pinned to a core with taskset where that is possible.
struct Launcher {
    pin: bool,
    out: PathBuf,
}

impl Launcher {
    fn command(&self, core: &str, program: &Path) -> Command {
        if self.pin {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(core).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn spawn(&self, name: &str, mut cmd: Command) -> Result<Proc, CompareError> {
        let log = self.out.join("logs").join(format!("{name}.log"));
        let file = std::fs::File::create(&log)
            .map_err(|e| setup(format!("cannot create {}: {e}", log.display())))?;
        let err_file = file.try_clone().map_err(|e| setup(e.to_string()))?;
        cmd.stdin(Stdio::null()).stdout(file).stderr(err_file);
        let child = cmd.spawn().map_err(|e| setup(format!("cannot start {name}: {e}")))?;
        Ok(Proc { name: name.to_owned(), child: Some(child), log })
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<u16, CompareError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| setup(format!("no free port: {e}")))
}

/// `count` consecutive free ports.
fn free_port_block(count: usize) -> Result<u16, CompareError> {
    for _ in 0..50 {
        let base = free_port()?;
        if usize::from(base) + count >= 65_000 {
            continue;
        }
        let all_free =
            (0..count as u16).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if all_free {
            return Ok(base);
        }
    }
    Err(setup(format!("no block of {count} free ports")))
}

fn wait_until(
    proc_: &mut Proc,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), CompareError> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(status) = proc_.exited() {
            return Err(CompareError::Run(format!(
                "{} exited at start-up ({status}):\n{}",
                proc_.name,
                proc_.log_tail()
            )));
        }
        if Instant::now() >= deadline {
            return Err(CompareError::Run(format!(
                "{} not ready after {timeout:?}:\n{}",
                proc_.name,
                proc_.log_tail()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tcp_up(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

fn http_ready(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.starts_with("HTTP/1.1 200")
}

/// The binaries and where things go.
struct Env {
    args: CompareArgs,
    launcher: Launcher,
    fleetgate: PathBuf,
    /// The second fleetgate build of an A/B run.
    fleetgate_b: Option<PathBuf>,
    loadgen: PathBuf,
    peers: Vec<System>,
    run_no: usize,
}

/// One started system under test: its processes and where devices connect.
struct Sut {
    /// Processes whose CPU and memory are the system under test's.
    servers: Vec<Proc>,
    /// nats-server, for fleetgate.
    nats: Option<Proc>,
    nats_url: Option<String>,
    /// MQTT address of each server process (one shared address for fleetgate replicas).
    mqtt: Vec<SocketAddr>,
}

impl Sut {
    fn stop(&mut self) {
        for p in &mut self.servers {
            p.stop();
        }
        if let Some(n) = &mut self.nats {
            n.stop();
        }
    }
}

impl Drop for Sut {
    fn drop(&mut self) {
        self.stop();
    }
}

fn which(program: &Path) -> bool {
    if program.components().count() > 1 {
        return program.exists();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// The systems named by `--peers`. `--peers ''` (no broker) arrives as one empty name and
/// names none.
fn parse_peers(names: &[String]) -> Result<Vec<System>, CompareError> {
    names
        .iter()
        .filter(|p| !p.trim().is_empty())
        .map(|p| System::parse(p).ok_or_else(|| setup(format!("unknown peer {p:?}"))))
        .collect()
}

impl Env {
    fn new(args: CompareArgs) -> Result<Self, CompareError> {
        let here = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        let fleetgate = args.fleetgate_bin.clone().unwrap_or_else(|| here.join("fleetgate"));
        let loadgen = args.loadgen_bin.clone().unwrap_or_else(|| here.join("fleetgate-loadgen"));
        for (what, path) in [("fleetgate", &fleetgate), ("fleetgate-loadgen", &loadgen)] {
            if !path.exists() {
                return Err(setup(format!(
                    "{what} not found at {} (build both with `cargo build --release -p fleetgate -p fleetgate-benches` into the same target dir, or pass --{what}-bin)",
                    path.display()
                )));
            }
        }
        let fleetgate_b = args.fleetgate_b_bin.clone();
        if let Some(path) = fleetgate_b.as_ref().filter(|p| !p.exists()) {
            return Err(setup(format!("fleetgate-b not found at {}", path.display())));
        }
        if !which(&args.nats_server_bin) {
            return Err(setup("nats-server not found (apt-get install nats-server)"));
        }
        let mut peers = Vec::new();
        for sys in parse_peers(&args.peers)? {
            let bin = match sys {
                System::Mosquitto => &args.mosquitto_bin,
                System::Rumqttd => &args.rumqttd_bin,
                System::Fleetgate | System::FleetgateB => continue,
            };
            if !which(bin) {
                return Err(setup(format!(
                    "{} not found: install it (mosquitto: apt-get install mosquitto; rumqttd: cargo install rumqttd) or leave it out of --peers",
                    bin.display()
                )));
            }
            peers.push(sys);
        }
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let pin = !args.no_pin && cores >= 2 && which(Path::new("taskset"));
        if !pin {
            eprintln!(
                "note: not pinning to cores ({})",
                if args.no_pin { "--no-pin" } else { "taskset missing or fewer than 2 cores" }
            );
        }
        std::fs::create_dir_all(args.out.join("logs"))
            .map_err(|e| setup(format!("cannot create {}: {e}", args.out.display())))?;
        let launcher = Launcher { pin, out: args.out.clone() };
        Ok(Env { args, launcher, fleetgate, fleetgate_b, loadgen, peers, run_no: 0 })
    }

    fn next_name(&mut self, label: &str) -> String {
        self.run_no += 1;
        format!("{:03}-{label}", self.run_no)
    }

    fn start_nats(&self, name: &str) -> Result<(Proc, String), CompareError> {
        let port = free_port()?;
        let conf = self.args.out.join("logs").join(format!("{name}-nats.conf"));
        // max_pending: the delivery counter may lag for a moment at high rates; it must not be
        // cut off as a slow consumer (that would count as fleetgate's loss).
        std::fs::write(&conf, format!("listen: 127.0.0.1:{port}\nmax_pending: 268435456\n"))
            .map_err(|e| setup(e.to_string()))?;
        let mut cmd = self.launcher.command(&self.args.nats_core, &self.args.nats_server_bin);
        cmd.arg("-c").arg(&conf);
        let mut p = self.launcher.spawn(&format!("{name}-nats"), cmd)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_until(&mut p, Duration::from_secs(10), || tcp_up(addr))?;
        Ok((p, format!("nats://127.0.0.1:{port}")))
    }

    /// fleetgate (`system` says which build): nats-server plus `replicas` × `fleetgate up`
    /// sharing one MQTT port.
    fn start_fleetgate(
        &self,
        system: System,
        name: &str,
        replicas: usize,
    ) -> Result<Sut, CompareError> {
        let bin = match system {
            System::FleetgateB => self.fleetgate_b.as_ref(),
            _ => Some(&self.fleetgate),
        }
        .ok_or_else(|| setup("fleetgate-b runs only with --fleetgate-b-bin"))?;
        let (nats, url) = self.start_nats(name)?;
        let port = free_port()?;
        let mqtt = SocketAddr::from(([127, 0, 0, 1], port));
        let mut sut = Sut {
            servers: Vec::new(),
            nats: Some(nats),
            nats_url: Some(url.clone()),
            mqtt: vec![mqtt],
        };
        for r in 0..replicas {
            let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            // A working directory of its own: replicas keep their spools (the default
            // `fleetgate-data/` there) apart, whatever settings the build knows.
            let dir = self.args.out.join("logs").join(format!("{name}-{}-{r}-data", system.name()));
            std::fs::create_dir_all(&dir).map_err(|e| setup(e.to_string()))?;
            let mut cmd = self.launcher.command(&self.args.sut_core, bin);
            cmd.arg("up")
                .current_dir(&dir)
                .env_remove("FLEETGATE_CONFIG")
                .env("FLEETGATE_NATS_URL", &url)
                .env("FLEETGATE_TRANSPORTS_MQTT_LISTEN", mqtt.to_string())
                .env("FLEETGATE_TRANSPORTS_MQTT_REUSE_PORT", "true")
                .envs(crate::LIMITS_OFF.iter().copied())
                // MQTT scenarios only; replicas would also clash on the CoAP and HTTP ports.
                .env("FLEETGATE_TRANSPORTS_COAP_ENABLED", "false")
                .env("FLEETGATE_TRANSPORTS_HTTP_ENABLED", "false")
                .env("FLEETGATE_TRANSPORTS_UDP_ENABLED", "false")
                .env("FLEETGATE_ADMIN_LISTEN", admin.to_string())
                .env("FLEETGATE_AUTH_AUTO_REGISTER", "true")
                .env("FLEETGATE_PROCESS_DRAIN_TIMEOUT_MS", "500")
                .env("RUST_LOG", "warn");
            let mut p = self.launcher.spawn(&format!("{name}-{}-{r}", system.name()), cmd)?;
            wait_until(&mut p, Duration::from_secs(20), || http_ready(admin))?;
            sut.servers.push(p);
        }
        Ok(sut)
    }

    /// Mosquitto: `instances` brokers on consecutive ports.
    fn start_mosquitto(&self, name: &str, instances: usize) -> Result<Sut, CompareError> {
        let base = free_port_block(instances)?;
        let mut sut = Sut { servers: Vec::new(), nats: None, nats_url: None, mqtt: Vec::new() };
        for i in 0..instances {
            let port = base + i as u16;
            let conf = self.args.out.join("logs").join(format!("{name}-mosquitto-{i}.conf"));
            // Defaults except: no persistence, no per-connection log lines, and a deep queue
            // for the one subscriber (the default 1000 would drop bursts the subscriber could
            // still read).
            let text = format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\nlog_dest stderr\nlog_type error\nlog_type warning\nconnection_messages false\n"
            );
            std::fs::write(&conf, text).map_err(|e| setup(e.to_string()))?;
            let mut cmd = self.launcher.command(&self.args.sut_core, &self.args.mosquitto_bin);
            cmd.arg("-c").arg(&conf);
            let mut p = self.launcher.spawn(&format!("{name}-mosquitto-{i}"), cmd)?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            wait_until(&mut p, Duration::from_secs(10), || tcp_up(addr))?;
            sut.servers.push(p);
            sut.mqtt.push(addr);
        }
        Ok(sut)
    }

    /// rumqttd with its commit-log segments capped (100 KiB × 10 per topic instead of
    /// 100 MiB × 10).
    fn start_rumqttd(&self, name: &str) -> Result<Sut, CompareError> {
        let port = free_port()?;
        let conf = self.args.out.join("logs").join(format!("{name}-rumqttd.toml"));
        let text = format!(
            r#"id = 0

[router]
id = 0
max_connections = 20000
max_outgoing_packet_count = 200
max_segment_size = 102400
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 20480
    max_inflight_count = 100
    dynamic_filters = true
"#
        );
        std::fs::write(&conf, text).map_err(|e| setup(e.to_string()))?;
        let mut cmd = self.launcher.command(&self.args.sut_core, &self.args.rumqttd_bin);
        cmd.arg("-q").arg("--config").arg(&conf).env("RUST_LOG", "warn");
        let mut p = self.launcher.spawn(&format!("{name}-rumqttd"), cmd)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_until(&mut p, Duration::from_secs(10), || tcp_up(addr))?;
        Ok(Sut { servers: vec![p], nats: None, nats_url: None, mqtt: vec![addr] })
    }

    fn start(&self, system: System, name: &str, processes: usize) -> Result<Sut, CompareError> {
        match system {
            System::Fleetgate | System::FleetgateB => self.start_fleetgate(system, name, processes),
            System::Mosquitto => self.start_mosquitto(name, processes),
            System::Rumqttd => self.start_rumqttd(name),
        }
    }

    /// Starts a generator; its stdout event lines go to `events` (tagged with `tag`), its
    /// progress goes to the terminal with a prefix.
    fn spawn_loadgen(
        &self,
        tag: usize,
        label: &str,
        args: &[String],
        events: &mpsc::Sender<(usize, String)>,
    ) -> Result<Child, CompareError> {
        let mut cmd = self.launcher.command(&self.args.load_core, &self.loadgen);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child =
            cmd.spawn().map_err(|e| setup(format!("cannot start the generator: {e}")))?;
        if let Some(stdout) = child.stdout.take() {
            let tx = events.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = tx.send((tag, line));
                }
            });
        }
        if let Some(stderr) = child.stderr.take() {
            let label = label.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("  {label}: {line}");
                }
            });
        }
        Ok(child)
    }
}

fn wait_child(child: &mut Child, timeout: Duration, what: &str) -> Result<(), CompareError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| CompareError::Run(e.to_string()))? {
            return if status.success() {
                Ok(())
            } else {
                Err(CompareError::Run(format!("{what} failed: {status}")))
            };
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(CompareError::Run(format!("{what} did not finish in {timeout:?}")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_report(path: &Path) -> Result<Report, CompareError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CompareError::Run(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| CompareError::Run(format!("{}: {e}", path.display())))
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// One throughput or latency run of one system.
#[derive(Debug, Clone, Serialize)]
pub struct RateRun {
    /// Which system.
    pub system: System,
    /// Which pair (from 0).
    pub pair: usize,
    /// The generator's JSON result.
    pub report_file: PathBuf,
    /// Maximum sustainable rate, msg/s.
    pub msr: u64,
    /// Whether every step held (the MSR is a lower bound).
    pub msr_lower_bound: bool,
    /// Whether a higher step was generator-limited.
    pub generator_limited_above: bool,
    /// CPU-seconds per million delivered messages of the system under test, at the MSR step
    /// (or the first step when none held).
    pub sut_cpu_s_per_m: Option<f64>,
    /// The same for nats-server (fleetgate and fleetgate-b only).
    pub nats_cpu_s_per_m: Option<f64>,
    /// Resident memory of the system under test at the end of that step, KiB.
    pub sut_rss_kib: Option<u64>,
    /// p50 latency at that step, ms.
    pub p50_ms: f64,
    /// p99 latency at that step, ms.
    pub p99_ms: f64,
    /// Loss ratio at that step.
    pub loss_ratio: f64,
    /// (offered, delivered, p99 ms) of every step, for the plot.
    pub steps: Vec<(u64, f64, f64)>,
}

/// One idle-connection run of one system.
#[derive(Debug, Clone, Serialize)]
pub struct IdleRun {
    /// Which system.
    pub system: System,
    /// Which pair.
    pub pair: usize,
    /// Connections asked for.
    pub requested: usize,
    /// Connections the generators held at the end.
    pub held: u64,
    /// Server processes.
    pub processes: usize,
    /// Sum of the servers' RSS growth, KiB.
    pub rss_growth_kib: u64,
    /// Sum of the servers' descriptor growth (≈ connections they hold).
    pub fd_growth: u64,
    /// RSS growth per held connection, bytes (over all processes).
    pub bytes_per_conn: Option<f64>,
    /// Per process: (connections by descriptors, bytes per connection).
    pub per_process: Vec<(u64, Option<f64>)>,
}

/// What a fleetgate / fleetgate-b ratio compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AbMetric {
    /// Maximum sustainable rate (M1, M2).
    Msr,
    /// CPU-seconds per million messages of the fleetgate process alone.
    SutCpuSPerM,
    /// The same with each side's nats-server added.
    SutNatsCpuSPerM,
    /// p99 latency (M5).
    P99Ms,
    /// RSS per idle connection (M4).
    BytesPerConn,
}

impl AbMetric {
    /// The ratio `r` as a summary line reads it.
    fn describe(self, r: &str) -> String {
        match self {
            AbMetric::Msr => format!("MSR {r}"),
            AbMetric::SutCpuSPerM => format!("cpu-s/M {r} (sut)"),
            AbMetric::SutNatsCpuSPerM => format!("{r} (sut + nats)"),
            AbMetric::P99Ms => format!("p99 {r} (lower is better)"),
            AbMetric::BytesPerConn => format!("bytes per connection {r} (lower is better)"),
        }
    }
}

/// One fleetgate / fleetgate-b ratio of an A/B run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AbRatio {
    /// The scenario: m1, m2, m4 or m5.
    pub scenario: String,
    /// M4: the idle connection count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
    /// What is compared.
    pub metric: AbMetric,
    /// fleetgate / fleetgate-b over the pairs; `None` when no pair had both figures.
    pub ratio: Option<RatioSpread>,
}

/// Everything the runner measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Throughput and latency runs by scenario.
    pub rate_runs: BTreeMap<String, Vec<RateRun>>,
    /// Idle runs by connection count.
    pub idle_runs: BTreeMap<usize, Vec<IdleRun>>,
    /// Whether the processes were pinned.
    pub pinned: bool,
    /// fleetgate / fleetgate-b ratios of an A/B run (`--fleetgate-b-bin`), scenario by
    /// scenario; absent otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ab_ratios: Vec<AbRatio>,
    /// The result lines as printed.
    pub lines: Vec<String>,
}

impl Env {
    fn rate_run(
        &mut self,
        scenario: &str,
        system: System,
        pair: usize,
        qos: u8,
        rates: &[u64],
        step_secs: f64,
    ) -> Result<RateRun, CompareError> {
        let name = self.next_name(&format!("{scenario}-{}-{pair}", system.name()));
        let mut sut = self.start(system, &name, 1)?;
        let json = self.args.out.join(format!("{name}.json"));
        let sut_pid = sut.servers.first().map_or(0, Proc::pid);
        let mut args: Vec<String> = vec![
            "--target".into(),
            if system.is_fleetgate() { "fleetgate" } else { "broker" }.into(),
            "--mqtt".into(),
            sut.mqtt[0].to_string(),
            "--qos".into(),
            qos.to_string(),
            "--devices".into(),
            self.args.devices.to_string(),
            "--payload-bytes".into(),
            self.args.payload_bytes.to_string(),
            "--rates".into(),
            rates.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
            "--step-secs".into(),
            step_secs.to_string(),
            "--window".into(),
            self.args.window.to_string(),
            "--source-ips".into(),
            self.args.source_ips.clone(),
            "--connect-rate".into(),
            "5000".into(),
            "--drain-secs".into(),
            "3".into(),
            "--watch".into(),
            format!("sut={sut_pid}"),
            "--out".into(),
            json.display().to_string(),
        ];
        if let Some(url) = &sut.nats_url {
            args.extend(["--nats-url".into(), url.clone()]);
        }
        if let Some(n) = &sut.nats {
            args.extend(["--watch".into(), format!("nats={}", n.pid())]);
        }
        let (tx, _rx) = mpsc::channel();
        let mut child = self.spawn_loadgen(0, &name, &args, &tx)?;
        let budget = step_secs * rates.len() as f64 + 60.0;
        wait_child(&mut child, Duration::from_secs_f64(budget), &format!("generator {name}"))?;
        sut.stop();
        let report = read_report(&json)?;
        let msr = report.msr.clone();
        let at = report.msr_step().or(report.steps.first());
        Ok(RateRun {
            system,
            pair,
            report_file: json,
            msr: msr.as_ref().map_or(0, |m| m.rate),
            msr_lower_bound: msr.as_ref().is_some_and(|m| m.lower_bound),
            generator_limited_above: msr.as_ref().is_some_and(|m| m.generator_limited_above),
            sut_cpu_s_per_m: at.and_then(|s| s.cpu_secs_per_million("sut")),
            nats_cpu_s_per_m: at.and_then(|s| s.cpu_secs_per_million("nats")),
            sut_rss_kib: at
                .and_then(|s| s.processes.iter().find(|p| p.name == "sut").and_then(|p| p.rss_kib)),
            p50_ms: at.map_or(0.0, |s| s.latency.p50_us as f64 / 1e3),
            p99_ms: at.map_or(0.0, |s| s.latency.p99_us as f64 / 1e3),
            loss_ratio: at.map_or(0.0, |s| s.loss_ratio),
            steps: report
                .steps
                .iter()
                .map(|s| (s.offered_rate, s.delivered_rate, s.latency.p99_us as f64 / 1e3))
                .collect(),
        })
    }

    fn idle_run(
        &mut self,
        system: System,
        pair: usize,
        count: usize,
    ) -> Result<IdleRun, CompareError> {
        let per = self.args.conns_per_process.max(1);
        let processes = count.div_ceil(per).max(1);
        let name = self.next_name(&format!("m4-{count}-{}-{pair}", system.name()));
        let mut sut = self.start(system, &name, processes)?;
        // Let the servers settle before the baseline.
        std::thread::sleep(Duration::from_secs(1));
        let pids: Vec<u32> = sut.servers.iter().map(Proc::pid).collect();
        let before: Vec<(u64, usize)> = pids
            .iter()
            .map(|p| (procfs::rss_kib(*p).unwrap_or(0), procfs::open_fds(*p).unwrap_or(0)))
            .collect();
        let shares = split_even(count, processes);
        let (tx, rx) = mpsc::channel();
        let mut children = Vec::new();
        let mut offset = 1;
        let rate = self.args.idle_connect_rate / processes as f64;
        let ramp_secs = count as f64 / self.args.idle_connect_rate;
        for (j, n) in shares.iter().enumerate() {
            let mqtt = sut.mqtt.get(j).or(sut.mqtt.first()).copied().unwrap_or(sut.mqtt[0]);
            let json = self.args.out.join(format!("{name}-gen{j}.json"));
            let args: Vec<String> = vec![
                "--idle".into(),
                "--target".into(),
                "broker".into(),
                "--mqtt".into(),
                mqtt.to_string(),
                "--devices".into(),
                n.to_string(),
                "--device-offset".into(),
                offset.to_string(),
                "--connect-rate".into(),
                rate.to_string(),
                "--source-ips".into(),
                self.args.source_ips.clone(),
                "--keep-alive-secs".into(),
                "60".into(),
                "--hold-secs".into(),
                self.args.idle_hold_secs.to_string(),
                "--out".into(),
                json.display().to_string(),
                "--quiet".into(),
            ];
            offset += n;
            children.push((self.spawn_loadgen(j, &format!("{name}-gen{j}"), &args, &tx)?, json));
        }
        drop(tx);
        // Wait until every generator says its connections are up.
        let deadline = Instant::now() + Duration::from_secs_f64(ramp_secs * 2.0 + 60.0);
        let mut up = vec![false; children.len()];
        while !up.iter().all(|u| *u) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((j, line)) if line.contains("\"event\":\"connected\"") => up[j] = true,
                Ok(_) => {}
                Err(_) => {
                    for (c, _) in &mut children {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    return Err(CompareError::Run(format!("{name}: generators did not connect")));
                }
            }
        }
        std::thread::sleep(Duration::from_secs(2));
        let after: Vec<(u64, usize)> = pids
            .iter()
            .map(|p| (procfs::rss_kib(*p).unwrap_or(0), procfs::open_fds(*p).unwrap_or(0)))
            .collect();
        let mut held = 0;
        for (child, json) in &mut children {
            let budget = Duration::from_secs_f64(self.args.idle_hold_secs + 60.0);
            wait_child(child, budget, &format!("generator {}", json.display()))?;
            held += read_report(json)?.idle.map_or(0, |i| i.held);
        }
        sut.stop();
        let per_process: Vec<(u64, Option<f64>)> = before
            .iter()
            .zip(&after)
            .map(|((rss0, fd0), (rss1, fd1))| {
                let conns = fd1.saturating_sub(*fd0) as u64;
                let bytes =
                    (conns > 0).then(|| rss1.saturating_sub(*rss0) as f64 * 1024.0 / conns as f64);
                (conns, bytes)
            })
            .collect();
        let rss_growth_kib: u64 =
            before.iter().zip(&after).map(|((a, _), (b, _))| b.saturating_sub(*a)).sum();
        let fd_growth: u64 = per_process.iter().map(|(c, _)| c).sum();
        Ok(IdleRun {
            system,
            pair,
            requested: count,
            held,
            processes,
            rss_growth_kib,
            fd_growth,
            bytes_per_conn: (fd_growth > 0)
                .then(|| rss_growth_kib as f64 * 1024.0 / fd_growth as f64),
            per_process,
        })
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

/// The width of a system-name column: `min`, or the longest name if that is longer.
fn name_width(systems: &[System], min: usize) -> usize {
    systems.iter().map(|s| s.name().len()).fold(min, usize::max)
}

/// The order in which the systems run in pair `pair`: as listed, except that fleetgate and
/// fleetgate-b swap places on odd pairs so that neither build always goes first (the peers
/// keep theirs).
fn pair_order(systems: &[System], pair: usize) -> Vec<System> {
    let mut order = systems.to_vec();
    if pair % 2 == 1 {
        let at = |s: System| order.iter().position(|o| *o == s);
        if let (Some(a), Some(b)) = (at(System::Fleetgate), at(System::FleetgateB)) {
            order.swap(a, b);
        }
    }
    order
}

/// Runs the chosen scenarios and prints the comparison; returns what it measured.
pub fn run(args: CompareArgs) -> Result<Summary, CompareError> {
    let mut env = Env::new(args)?;
    let mut summary = Summary { pinned: env.launcher.pin, ..Default::default() };
    let pairs = env.args.pairs.max(1);
    let scenarios: Vec<String> =
        env.args.scenarios.iter().map(|s| s.trim().to_lowercase()).collect();
    // fleetgate-b stands right after fleetgate in every scenario.
    let mut fleetgates = vec![System::Fleetgate];
    fleetgates.extend(env.fleetgate_b.is_some().then_some(System::FleetgateB));
    let mut systems = fleetgates.clone();
    systems.extend(env.peers.iter().copied());
    let width = name_width(&systems, 9);

    for scenario in &scenarios {
        let (qos, rates, step_secs) = match scenario.as_str() {
            "m1" => (0, env.args.rates.clone(), env.args.step_secs),
            "m2" => (1, env.args.rates.clone(), env.args.step_secs),
            "m5" => (env.args.m5_qos, vec![env.args.m5_rate], env.args.m5_secs),
            "m4" => continue,
            other => return Err(setup(format!("unknown scenario {other:?}"))),
        };
        eprintln!("== {scenario}: QoS {qos}, rates {rates:?}, {pairs} pairs");
        let mut runs = Vec::new();
        for pair in 0..pairs {
            for system in pair_order(&systems, pair) {
                let run = env.rate_run(scenario, system, pair, qos, &rates, step_secs)?;
                eprintln!(
                    "   {scenario} pair {pair} {:<width$} MSR {:>7} msg/s  sut {} cpu-s/M  nats {} cpu-s/M  p99 {:.2} ms",
                    system.name(),
                    run.msr,
                    fmt_opt(run.sut_cpu_s_per_m, 2),
                    fmt_opt(run.nats_cpu_s_per_m, 2),
                    run.p99_ms
                );
                runs.push(run);
            }
        }
        let lines = rate_lines(scenario, &systems, &runs);
        for l in &lines {
            println!("{l}");
        }
        summary.lines.extend(lines);
        summary.ab_ratios.extend(ab_rate_ratios(scenario, &runs));
        write_rate_plot(&env.args.out, scenario, &systems, &runs);
        summary.rate_runs.insert(scenario.clone(), runs);
    }

    if scenarios.iter().any(|s| s == "m4") {
        let mut systems = fleetgates;
        systems.push(System::Mosquitto);
        if !env.peers.contains(&System::Mosquitto) && !which(&env.args.mosquitto_bin) {
            return Err(setup("M4 compares with Mosquitto, which is not installed"));
        }
        for &count in &env.args.idle_counts.clone() {
            eprintln!("== m4: {count} idle connections, {pairs} pairs");
            let mut runs = Vec::new();
            for pair in 0..pairs {
                for system in pair_order(&systems, pair) {
                    let run = env.idle_run(system, pair, count)?;
                    eprintln!(
                        "   m4 {count} pair {pair} {:<width$} held {}/{}  {} B/conn ({} processes)",
                        system.name(),
                        run.held,
                        run.requested,
                        fmt_opt(run.bytes_per_conn, 0),
                        run.processes
                    );
                    runs.push(run);
                }
            }
            let lines = idle_lines(count, &systems, &runs);
            for l in &lines {
                println!("{l}");
            }
            summary.lines.extend(lines);
            summary.ab_ratios.extend(ab_idle_ratios(count, &runs));
            summary.idle_runs.insert(count, runs);
        }
    }

    let path = env.args.out.join("compare.json");
    let _ = std::fs::write(&path, serde_json::to_string_pretty(&summary).unwrap_or_default());
    println!("results: {}", path.display());
    Ok(summary)
}

fn series<T>(
    runs: &[T],
    system: System,
    sys: impl Fn(&T) -> System,
    f: impl Fn(&T) -> Option<f64>,
) -> Vec<f64> {
    runs.iter().filter(|r| sys(r) == system).map(|r| f(r).unwrap_or(f64::NAN)).collect()
}

/// The printed result of a throughput or latency scenario.
pub fn rate_lines(scenario: &str, systems: &[System], runs: &[RateRun]) -> Vec<String> {
    let mut out = Vec::new();
    let latency_only = scenario == "m5";
    let w = name_width(systems, 10);
    out.push(format!(
        "{scenario}: {:<w$} {:>10} {:>12} {:>12} {:>9} {:>9} {:>10}",
        "system", "MSR msg/s", "sut cpu-s/M", "nats cpu-s/M", "p50 ms", "p99 ms", "RSS MiB"
    ));
    let sys = |r: &RateRun| r.system;
    for &s in systems {
        let med = |f: &dyn Fn(&RateRun) -> Option<f64>| median(&series(runs, s, sys, f));
        out.push(format!(
            "{scenario}: {:<w$} {:>10} {:>12} {:>12} {:>9} {:>9} {:>10}{}",
            s.name(),
            fmt_opt(med(&|r| Some(r.msr as f64)), 0),
            fmt_opt(med(&|r| r.sut_cpu_s_per_m), 2),
            fmt_opt(med(&|r| r.nats_cpu_s_per_m), 2),
            fmt_opt(med(&|r| Some(r.p50_ms)), 2),
            fmt_opt(med(&|r| Some(r.p99_ms)), 2),
            fmt_opt(med(&|r| r.sut_rss_kib.map(|k| k as f64 / 1024.0)), 1),
            if runs.iter().any(|r| r.system == s && r.msr_lower_bound) {
                "  (top step held: MSR is a lower bound)"
            } else if runs.iter().any(|r| r.system == s && r.generator_limited_above) {
                "  (generator-limited above the MSR)"
            } else {
                ""
            }
        ));
    }
    let fg = |f: &dyn Fn(&RateRun) -> Option<f64>| series(runs, System::Fleetgate, sys, f);
    for &peer in systems.iter().filter(|s| !s.is_fleetgate()) {
        let pe = |f: &dyn Fn(&RateRun) -> Option<f64>| series(runs, peer, sys, f);
        let msr = |r: &RateRun| Some(r.msr as f64);
        let cpu = |r: &RateRun| r.sut_cpu_s_per_m;
        let cpu_all = |r: &RateRun| Some(r.sut_cpu_s_per_m? + r.nats_cpu_s_per_m.unwrap_or(0.0));
        let p99 = |r: &RateRun| Some(r.p99_ms);
        if latency_only {
            out.push(format!(
                "{scenario}: fleetgate/{}: p99 {}× (lower is better), cpu-s/M {}× (sut), {}× (sut + nats)",
                peer.name(),
                fmt_opt(median_ratio(&fg(&p99), &pe(&p99)), 2),
                fmt_opt(median_ratio(&fg(&cpu), &pe(&cpu)), 2),
                fmt_opt(median_ratio(&fg(&cpu_all), &pe(&cpu)), 2),
            ));
        } else {
            out.push(format!(
                "{scenario}: fleetgate/{}: MSR {}×, cpu-s/M {}× (sut), {}× (sut + nats) (median of pairs)",
                peer.name(),
                fmt_opt(median_ratio(&fg(&msr), &pe(&msr)), 2),
                fmt_opt(median_ratio(&fg(&cpu), &pe(&cpu)), 2),
                fmt_opt(median_ratio(&fg(&cpu_all), &pe(&cpu)), 2),
            ));
        }
    }
    let ab = ab_rate_ratios(scenario, runs);
    if !ab.is_empty() {
        out.push(ab_line(scenario, &ab));
    }
    out
}

/// The printed result of an idle-connection count.
pub fn idle_lines(count: usize, systems: &[System], runs: &[IdleRun]) -> Vec<String> {
    let sys = |r: &IdleRun| r.system;
    let mut out = Vec::new();
    let w = name_width(systems, 10);
    for &s in systems {
        let held = median(&series(runs, s, sys, |r| Some(r.held as f64)));
        let bpc = median(&series(runs, s, sys, |r| r.bytes_per_conn));
        let procs = runs.iter().find(|r| r.system == s).map_or(0, |r| r.processes);
        out.push(format!(
            "m4 {count}: {:<w$} held {} of {count}, {} B RSS per connection, {procs} server process(es)",
            s.name(),
            fmt_opt(held, 0),
            fmt_opt(bpc, 0)
        ));
    }
    let f = series(runs, System::Fleetgate, sys, |r| r.bytes_per_conn);
    let m = series(runs, System::Mosquitto, sys, |r| r.bytes_per_conn);
    out.push(format!(
        "m4 {count}: fleetgate/mosquitto bytes per connection {}× (lower is better)",
        fmt_opt(median_ratio(&f, &m), 2)
    ));
    let ab = ab_idle_ratios(count, runs);
    if !ab.is_empty() {
        out.push(ab_line(&format!("m4 {count}"), &ab));
    }
    out
}

/// The fleetgate / fleetgate-b ratios of a throughput or latency scenario; none when
/// fleetgate-b did not run.
fn ab_rate_ratios(scenario: &str, runs: &[RateRun]) -> Vec<AbRatio> {
    if !runs.iter().any(|r| r.system == System::FleetgateB) {
        return Vec::new();
    }
    let sys = |r: &RateRun| r.system;
    let ratio = |metric: AbMetric, f: &dyn Fn(&RateRun) -> Option<f64>| AbRatio {
        scenario: scenario.to_owned(),
        connections: None,
        metric,
        ratio: RatioSpread::of(
            &series(runs, System::Fleetgate, sys, f),
            &series(runs, System::FleetgateB, sys, f),
        ),
    };
    // M5 runs one fixed rate: its figure is latency, as in the fleetgate/peer line.
    let headline = if scenario == "m5" {
        ratio(AbMetric::P99Ms, &|r| Some(r.p99_ms))
    } else {
        ratio(AbMetric::Msr, &|r| Some(r.msr as f64))
    };
    vec![
        headline,
        ratio(AbMetric::SutCpuSPerM, &|r| r.sut_cpu_s_per_m),
        // Unlike a broker peer, each side has a nats-server of its own to be charged with.
        ratio(AbMetric::SutNatsCpuSPerM, &|r| Some(r.sut_cpu_s_per_m? + r.nats_cpu_s_per_m?)),
    ]
}

/// The fleetgate / fleetgate-b ratio of an idle-connection count; none when fleetgate-b did
/// not run.
fn ab_idle_ratios(count: usize, runs: &[IdleRun]) -> Vec<AbRatio> {
    if !runs.iter().any(|r| r.system == System::FleetgateB) {
        return Vec::new();
    }
    let sys = |r: &IdleRun| r.system;
    let bpc = |r: &IdleRun| r.bytes_per_conn;
    vec![AbRatio {
        scenario: "m4".into(),
        connections: Some(count),
        metric: AbMetric::BytesPerConn,
        ratio: RatioSpread::of(
            &series(runs, System::Fleetgate, sys, bpc),
            &series(runs, System::FleetgateB, sys, bpc),
        ),
    }]
}

/// The summary line of fleetgate / fleetgate-b ratios, each with the spread of its pairs.
fn ab_line(prefix: &str, ratios: &[AbRatio]) -> String {
    let parts: Vec<String> = ratios
        .iter()
        .map(|r| {
            let text = r.ratio.map_or_else(
                || "-".into(),
                |r| format!("{:.2}× [{:.2}–{:.2}]", r.median, r.min, r.max),
            );
            r.metric.describe(&text)
        })
        .collect();
    format!("{prefix}: fleetgate/fleetgate-b: {} (median of pairs [min–max])", parts.join(", "))
}

fn write_rate_plot(out: &Path, scenario: &str, systems: &[System], runs: &[RateRun]) {
    let pick = |s: System| runs.iter().find(|r| r.system == s && r.pair == 0);
    let mut throughput = vec![];
    let mut latency = vec![];
    if let Some(r) = runs.first() {
        throughput.push(Series {
            name: "offered".into(),
            points: r.steps.iter().map(|(o, _, _)| (*o as f64, *o as f64)).collect(),
            dashed: true,
            color: Some("#7f7f7f".into()),
        });
    }
    for (i, &s) in systems.iter().enumerate() {
        // One colour per system in both panels.
        let color = Some(svg::COLORS[i % svg::COLORS.len()].to_owned());
        if let Some(r) = pick(s) {
            throughput.push(Series {
                name: s.name().into(),
                points: r.steps.iter().map(|(o, d, _)| (*o as f64, *d)).collect(),
                dashed: false,
                color: color.clone(),
            });
            latency.push(Series {
                name: format!("{} p99", s.name()),
                points: r
                    .steps
                    .iter()
                    .filter(|(_, d, _)| *d > 0.0)
                    .map(|(o, _, p)| (*o as f64, *p))
                    .collect(),
                dashed: false,
                color,
            });
        }
    }
    let charts = [
        Chart {
            title: "Delivered rate (first pair)".into(),
            x_label: "offered rate (msg/s)".into(),
            y_label: "msg/s".into(),
            log_y: false,
            series: throughput,
        },
        Chart {
            title: "p99 latency (first pair)".into(),
            x_label: "offered rate (msg/s)".into(),
            y_label: "ms".into(),
            log_y: true,
            series: latency,
        },
    ];
    let text = svg::render(&format!("fleetgate-compare {scenario}"), &charts);
    let _ = std::fs::write(out.join(format!("{scenario}.svg")), text);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
        assert_eq!(median(&[]), None);
        // Per pair: 2, 4, 1 → median 2.
        assert_eq!(median_ratio(&[20.0, 40.0, 10.0], &[10.0, 10.0, 10.0]), Some(2.0));
        assert_eq!(median_ratio(&[1.0], &[0.0]), None);
    }

    fn run(system: System, pair: usize, msr: u64, cpu: f64) -> RateRun {
        RateRun {
            system,
            pair,
            report_file: PathBuf::new(),
            msr,
            msr_lower_bound: false,
            generator_limited_above: false,
            sut_cpu_s_per_m: Some(cpu),
            nats_cpu_s_per_m: system.is_fleetgate().then_some(1.0),
            sut_rss_kib: Some(10_240),
            p50_ms: 0.5,
            p99_ms: 2.0,
            loss_ratio: 0.0,
            steps: vec![(10_000, 10_000.0, 2.0)],
        }
    }

    #[test]
    fn rate_lines_print_medians_and_ratios() {
        let runs = vec![
            run(System::Fleetgate, 0, 80_000, 4.0),
            run(System::Mosquitto, 0, 40_000, 8.0),
            run(System::Fleetgate, 1, 160_000, 4.0),
            run(System::Mosquitto, 1, 40_000, 8.0),
        ];
        let lines = rate_lines("m1", &[System::Fleetgate, System::Mosquitto], &runs);
        let text = lines.join("\n");
        assert!(text.contains("fleetgate/mosquitto: MSR 3.00×"), "{text}");
        assert!(text.contains("cpu-s/M 0.50× (sut), 0.62× (sut + nats)"), "{text}");
        assert!(lines[1].contains("120000"), "{text}");
    }

    #[test]
    fn idle_lines_print_bytes_per_connection() {
        let idle = |system, bpc| IdleRun {
            system,
            pair: 0,
            requested: 10_000,
            held: 10_000,
            processes: 1,
            rss_growth_kib: 0,
            fd_growth: 10_000,
            bytes_per_conn: Some(bpc),
            per_process: vec![],
        };
        let text = idle_lines(
            10_000,
            &[System::Fleetgate, System::Mosquitto],
            &[idle(System::Fleetgate, 1500.0), idle(System::Mosquitto, 3000.0)],
        )
        .join("\n");
        assert!(text.contains("1500 B RSS per connection"), "{text}");
        assert!(text.contains("bytes per connection 0.50×"), "{text}");
        assert!(!text.contains("fleetgate-b"), "{text}");
    }

    #[test]
    fn ratio_spread_is_median_min_max_of_pairs() {
        // Per pair: 1.2, 0.5, 2 (the pair with a 0 divisor is left out).
        let r = RatioSpread::of(&[12.0, 5.0, 20.0, 7.0], &[10.0, 10.0, 10.0, 0.0]);
        assert_eq!(r, Some(RatioSpread { median: 1.2, min: 0.5, max: 2.0, pairs: 3 }));
        assert_eq!(RatioSpread::of(&[f64::NAN], &[1.0]), None);
    }

    #[test]
    fn fleetgate_and_fleetgate_b_swap_on_odd_pairs() {
        use System::{Fleetgate, FleetgateB, Mosquitto, Rumqttd};
        let ab = [Fleetgate, FleetgateB, Mosquitto, Rumqttd];
        assert_eq!(pair_order(&ab, 0), ab);
        assert_eq!(pair_order(&ab, 1), [FleetgateB, Fleetgate, Mosquitto, Rumqttd]);
        assert_eq!(pair_order(&ab, 2), ab);
        // Without fleetgate-b the order is as it always was.
        assert_eq!(pair_order(&[Fleetgate, Mosquitto], 1), [Fleetgate, Mosquitto]);
    }

    #[test]
    fn empty_or_broker_only_peers_and_fleetgate_b_bin_parse() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: CompareArgs,
        }
        let parse = |argv: &[&str]| {
            let args = <Cli as clap::Parser>::try_parse_from(argv).map(|c| c.args);
            args.map_err(|e| e.to_string()).and_then(|a| {
                let peers = parse_peers(&a.peers).map_err(|e| e.to_string())?;
                Ok((peers, a.fleetgate_b_bin))
            })
        };
        // clap hands `--peers ''` over as one empty name, which `parse_peers` drops.
        let raw = <Cli as clap::Parser>::try_parse_from(["c", "--peers", ""]).map(|c| c.args.peers);
        assert_eq!(raw.map_err(|e| e.to_string()), Ok(vec![String::new()]));
        let (peers, b) = parse(&["c", "--peers", "", "--fleetgate-b-bin", "old/fleetgate"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(peers.is_empty());
        assert_eq!(b, Some(PathBuf::from("old/fleetgate")));
        let (peers, b) = parse(&["c", "--peers", "mosquitto"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((peers, b), (vec![System::Mosquitto], None));
        let (peers, _) = parse(&["c"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(peers, [System::Mosquitto, System::Rumqttd]);
        assert!(parse(&["c", "--peers", "fleetgate-b"]).is_err());
    }

    #[test]
    fn rate_lines_print_fleetgate_b_and_its_ratios_with_spread() {
        use System::{Fleetgate, FleetgateB, Mosquitto};
        // In run order: fleetgate-b first on the odd pair.
        let runs = vec![
            run(Fleetgate, 0, 120_000, 4.0),
            run(FleetgateB, 0, 100_000, 5.0),
            run(Mosquitto, 0, 40_000, 8.0),
            run(FleetgateB, 1, 100_000, 4.0),
            run(Fleetgate, 1, 110_000, 4.0),
            run(Mosquitto, 1, 40_000, 8.0),
            run(Fleetgate, 2, 90_000, 3.0),
            run(FleetgateB, 2, 100_000, 2.0),
            run(Mosquitto, 2, 40_000, 8.0),
        ];
        let lines = rate_lines("m1", &[Fleetgate, FleetgateB, Mosquitto], &runs);
        let text = lines.join("\n");
        assert!(lines[2].starts_with("m1: fleetgate-b  "), "{text}");
        assert!(lines[2].contains(" 100000 "), "{text}");
        // The peer's ratio is still fleetgate's: MSR per pair 3, 2.75, 2.25.
        assert!(text.contains("m1: fleetgate/mosquitto: MSR 2.75×"), "{text}");
        // MSR per pair 1.2, 1.1, 0.9; sut cpu 0.8, 1, 1.5; sut + nats 5/6, 5/5, 4/3.
        assert_eq!(
            lines.last().map(String::as_str),
            Some(
                "m1: fleetgate/fleetgate-b: MSR 1.10× [0.90–1.20], cpu-s/M 1.00× [0.80–1.50] (sut), 1.00× [0.83–1.33] (sut + nats) (median of pairs [min–max])"
            ),
            "{text}"
        );
        assert_eq!(text.matches("fleetgate/fleetgate-b").count(), 1, "{text}");

        // The same figures for the summary JSON.
        let ab = ab_rate_ratios("m1", &runs);
        let msr = ab[0].ratio.unwrap_or_else(|| panic!("no MSR ratio"));
        assert_eq!((ab[0].metric, msr.min, msr.max, msr.pairs), (AbMetric::Msr, 0.9, 1.2, 3));
        let json = serde_json::to_value(&ab).unwrap_or_default();
        assert_eq!(json[2]["metric"], "sut_nats_cpu_s_per_m", "{json}");
        assert_eq!(json[2]["ratio"]["pairs"], 3, "{json}");
        assert!(json[2].get("connections").is_none(), "{json}");
        assert!(ab_rate_ratios("m1", &runs[2..3]).is_empty());
    }

    #[test]
    fn m5_ab_without_peers_compares_p99() {
        use System::{Fleetgate, FleetgateB};
        let p99 = |system, pair, p99_ms| RateRun { p99_ms, ..run(system, pair, 10_000, 4.0) };
        let runs = vec![
            p99(Fleetgate, 0, 2.0),
            p99(FleetgateB, 0, 4.0),
            p99(FleetgateB, 1, 3.0),
            p99(Fleetgate, 1, 3.0),
            p99(Fleetgate, 2, 4.0),
            p99(FleetgateB, 2, 2.0),
        ];
        let lines = rate_lines("m5", &[Fleetgate, FleetgateB], &runs);
        let text = lines.join("\n");
        // Header, two systems, the A/B line: no fleetgate/peer line without peers.
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(
            lines[3],
            "m5: fleetgate/fleetgate-b: p99 1.00× [0.50–2.00] (lower is better), cpu-s/M 1.00× [1.00–1.00] (sut), 1.00× [1.00–1.00] (sut + nats) (median of pairs [min–max])",
            "{text}"
        );
    }

    #[test]
    fn idle_lines_print_fleetgate_b_and_its_ratio_with_spread() {
        use System::{Fleetgate, FleetgateB, Mosquitto};
        let idle = |system, pair, bpc| IdleRun {
            system,
            pair,
            requested: 10_000,
            held: 10_000,
            processes: 1,
            rss_growth_kib: 0,
            fd_growth: 10_000,
            bytes_per_conn: Some(bpc),
            per_process: vec![],
        };
        let runs = [
            idle(Fleetgate, 0, 1500.0),
            idle(FleetgateB, 0, 1500.0),
            idle(Mosquitto, 0, 750.0),
            idle(FleetgateB, 1, 2000.0),
            idle(Fleetgate, 1, 1600.0),
            idle(Mosquitto, 1, 750.0),
            idle(Fleetgate, 2, 1700.0),
            idle(FleetgateB, 2, 1000.0),
            idle(Mosquitto, 2, 750.0),
        ];
        let lines = idle_lines(10_000, &[Fleetgate, FleetgateB, Mosquitto], &runs);
        let text = lines.join("\n");
        assert!(text.contains("m4 10000: fleetgate-b held 10000 of 10000, 1500 B RSS"), "{text}");
        assert!(text.contains("fleetgate/mosquitto bytes per connection 2.13×"), "{text}");
        // Per pair 1, 0.8, 1.7.
        assert_eq!(
            lines.last().map(String::as_str),
            Some(
                "m4 10000: fleetgate/fleetgate-b: bytes per connection 1.00× [0.80–1.70] (lower is better) (median of pairs [min–max])"
            ),
            "{text}"
        );
        let ab = ab_idle_ratios(10_000, &runs);
        assert_eq!((ab[0].scenario.as_str(), ab[0].connections), ("m4", Some(10_000)));
    }
}
