//! The fleet load generator: N simulated devices, each on its own MQTT or HTTP connection or
//! CoAP socket (`--transport`), publishing 1/KP data samples at an open-loop offered rate in
//! steps, with delivery counted at the far end (NATS for fleetgate, an MQTT subscriber for a
//! broker). Also an idle mode (MQTT only) that only holds connections, for
//! memory-per-connection measurements.
//!
//! Every message carries the run's id, and the delivery counter counts only its own run's
//! messages, so that runs sharing a NATS server do not count each other. Failures (`/error`
//! status codes, error statuses and reason codes, lost connections) are counted by reason,
//! shown live and in the result; device round trips (PUBACK, HTTP response, CoAP response) are
//! measured beside device → delivery latency. A run stopped early (a signal, `--max-secs`)
//! still writes its result, marked partial. Results go to JSON, CSV, SVG and a self-contained
//! HTML report; `--fail-if` thresholds decide the exit status.
//!
//! What it does not do: retransmit (a QoS 1 message whose window is full is dropped and
//! counted as backpressure, never queued), QoS 2, TLS, or send anywhere but the loopback range
//! unless told to.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Args, ValueEnum};
use fleetgate_transport_mqtt::codec::{ProtocolVersion, QoS};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::coap_device::{self, CoapOptions};
use crate::device::{self, DeviceOptions, SendOutcome, SimDevice};
use crate::http_device::{self, HttpOptions};
use crate::payload;
use crate::procfs;
use crate::report::{
    ConnectSummary, IdleReport, LatencySummary, MsrCriteria, ProcessUsage, Report, Sample,
    Settings, StepReport, msr, sum_processes, sum_steps,
};
use crate::schedule::{StepPlan, split_even};
use crate::sink::{SinkTarget, SinkThread};
use crate::stats::{DeliveryRecorder, LiveDelivery, RunCounters, StepCounts, histogram_pairs};
use crate::threshold::Threshold;
use crate::udp_device::{self, UdpOptions};

/// What the devices talk to, and so where delivery is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// fleetgate: delivery counted on NATS (`ClientData`), needs `--nats-url`.
    Fleetgate,
    /// Any MQTT broker: delivery counted by an MQTT subscriber on `kp1/#`.
    Broker,
}

/// The devices' transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// MQTT over TCP (`--mqtt`).
    Mqtt,
    /// CoAP over UDP (`--coap`): QoS 1 sends CON, QoS 0 NON requests.
    Coap,
    /// HTTP/1.1 over TCP (`--http`), pipelined; every request is answered.
    Http,
    /// FGU/1, fleetgate's custom UDP protocol (`--udp`, `--udp-public-key`): QoS 1 sends
    /// requests with an id (answered), QoS 0 without.
    Udp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Mqtt => "mqtt",
            Transport::Coap => "coap",
            Transport::Http => "http",
            Transport::Udp => "udp",
        }
    }
}

/// MQTT protocol version of the devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MqttVersion {
    /// MQTT 3.1.1.
    #[value(name = "3.1.1", alias = "3", alias = "4")]
    V311,
    /// MQTT 5.0.
    #[value(name = "5", alias = "5.0")]
    V5,
}

impl MqttVersion {
    fn codec(self) -> ProtocolVersion {
        match self {
            MqttVersion::V311 => ProtocolVersion::V311,
            MqttVersion::V5 => ProtocolVersion::V5,
        }
    }

    fn name(self) -> &'static str {
        match self {
            MqttVersion::V311 => "3.1.1",
            MqttVersion::V5 => "5",
        }
    }
}

/// Command-line settings of a load-generator run.
#[derive(Debug, Clone, Args)]
pub struct LoadgenArgs {
    /// What the devices talk to (`broker` needs `--transport mqtt`).
    #[arg(long, value_enum, default_value = "fleetgate")]
    pub target: Target,
    /// The devices' transport. CoAP and HTTP devices take neither `--request-ids` nor
    /// `--idle`.
    #[arg(long, value_enum, default_value = "mqtt")]
    pub transport: Transport,
    /// MQTT address of the system under test.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub mqtt: SocketAddr,
    /// CoAP (UDP) address of the system under test (`--transport coap`).
    #[arg(long, default_value = "127.0.0.1:5683")]
    pub coap: SocketAddr,
    /// HTTP address of the system under test (`--transport http`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// FGU/1 (UDP) address of the system under test (`--transport udp`).
    #[arg(long, default_value = "127.0.0.1:5690")]
    pub udp: SocketAddr,
    /// The gateway's FGU/1 public key (64 hex digits, or a file holding them, such as the
    /// `.pub` file of `fleetgate keygen`), for `--transport udp`.
    #[arg(long)]
    pub udp_public_key: Option<String>,
    /// NATS URL where fleetgate's ClientData is counted (`--target fleetgate`).
    #[arg(long)]
    pub nats_url: Option<String>,
    /// MQTT version of the devices.
    #[arg(long, value_enum, default_value = "3.1.1")]
    pub mqtt_version: MqttVersion,
    /// QoS of the data samples: 0 or 1 (CoAP: NON or CON; HTTP: no difference).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// Simulated devices, one TCP connection (or UDP socket) each.
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Number of the first device: tokens and client ids are `<prefix><number, 6 digits>`.
    /// Give each of several generator processes its own range.
    #[arg(long, default_value_t = 1)]
    pub device_offset: usize,
    /// Token (and client id) prefix.
    #[arg(long, default_value = "dev-")]
    pub token_prefix: String,
    /// 1/KP application version in the topic.
    #[arg(long, default_value = "demo-v1")]
    pub app_version: String,
    /// Payload size in bytes (a JSON sample with the send time, padded).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Offered rate of each step, messages per second over all devices.
    #[arg(long, value_delimiter = ',', default_value = "10000")]
    pub rates: Vec<u64>,
    /// Length of each step, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub step_secs: f64,
    /// Connection ramp-up, connections per second.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Connections being set up at once, at most.
    #[arg(long, default_value_t = 512)]
    pub connect_concurrency: usize,
    /// Time allowed for TCP connect plus CONNACK, ms.
    #[arg(long, default_value_t = 10_000)]
    pub connect_timeout_ms: u64,
    /// Source addresses, bound before connecting: `127.0.0.2-127.0.0.20`, or a comma list.
    /// Each adds ~28,000 ephemeral ports.
    #[arg(long, default_value = "127.0.0.1")]
    pub source_ips: String,
    /// Give each message a request id (devices then count `/status` responses). MQTT only.
    #[arg(long)]
    pub request_ids: bool,
    /// QoS 1 messages (CoAP: CON requests; HTTP: any request) a device may have
    /// unacknowledged; a send finding it full is dropped and counted as backpressure.
    #[arg(long, default_value_t = 100)]
    pub window: u32,
    /// Unwritten bytes a connection may hold before sends are dropped as backpressure.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_buffer_bytes: usize,
    /// MQTT Keep Alive, seconds (PINGREQ every ¾ of it).
    #[arg(long, default_value_t = 60)]
    pub keep_alive_secs: u16,
    /// After the last step, wait at most this long for deliveries to arrive.
    #[arg(long, default_value_t = 3.0)]
    pub drain_secs: f64,
    /// A sender further behind its schedule than this skips the excess (and the step is
    /// marked generator-limited) rather than bursting.
    #[arg(long, default_value_t = 200)]
    pub max_lag_ms: u64,
    /// Stop sending after this many messages in all.
    #[arg(long)]
    pub max_messages: Option<u64>,
    /// Stop when the whole run (ramp-up included) takes longer than this, seconds: the partial
    /// result is written, and the exit status is 2.
    #[arg(long, default_value_t = 3600.0)]
    pub max_secs: f64,
    /// Sending tasks (default: one per runtime thread).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Idle mode: connect, hold the connections with keep-alive, report how many held. MQTT
    /// only.
    #[arg(long)]
    pub idle: bool,
    /// Idle mode: how long to hold after the ramp-up, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub hold_secs: f64,
    /// Watch processes' CPU and memory, per step and per second (repeatable): `PID`, `NAME`
    /// (every process of that name or program file name, summed), `LABEL=PID` or
    /// `LABEL=NAME`, e.g. `sut=1234`, `nats-server`, `gw=fleetgate`. Resolved at start.
    #[arg(long = "watch", value_name = "[LABEL=]PID|NAME")]
    pub watch: Vec<String>,
    /// The run id every message carries (1 to 8 letters, digits, `-`, `_`; default: random).
    /// Only messages with this run's id count as delivered.
    #[arg(long)]
    pub run_id: Option<String>,
    /// Write the JSON result here (and beside it, unless given otherwise, the CSV, SVG and
    /// HTML report with the same name).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the SVG plot here (default: the JSON path with `.svg`).
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Write the per-step CSV here (default: the JSON path with `.csv`).
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Write the self-contained HTML report here (default: the JSON path with `.html`).
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Fail the run (exit status 1) when `METRIC OP VALUE` holds for the whole run, e.g.
    /// `p99_ms>50`, `loss_pct>0.1`, `failures>0` (repeatable). Metrics: p50_ms p90_ms p99_ms
    /// p999_ms max_ms mean_ms rtt_p50_ms rtt_p99_ms rtt_max_ms loss_ratio loss_pct lost sent
    /// delivered attempted acked sent_rate delivered_rate failures ack_errors errors
    /// backpressure skipped connect_failed connections_lost msr generator_limited other_runs;
    /// operators > >= < <= == !=.
    #[arg(long = "fail-if", value_name = "METRIC OP VALUE")]
    pub fail_if: Vec<String>,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Allow targets and source addresses outside 127.0.0.0/8.
    #[arg(long)]
    pub allow_remote: bool,
}

/// Why a run could not be done.
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    /// A setting is wrong.
    #[error("invalid setting: {0}")]
    Settings(String),
    /// The delivery counter could not start.
    #[error(transparent)]
    Sink(#[from] crate::sink::SinkError),
    /// Not one device connected.
    #[error("no device connected ({0})")]
    NoConnections(String),
    /// The run did not stop in time after it was told to.
    #[error("the run did not stop within {0} s of being stopped ({1})")]
    TimedOut(u64, String),
    /// Writing the result failed.
    #[error("writing {0}: {1}")]
    Write(PathBuf, std::io::Error),
}

/// Parses `127.0.0.2-127.0.0.20`, `127.0.0.2,127.0.0.3` or a mix.
pub fn parse_source_ips(spec: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a.trim().parse().map_err(|_| format!("bad address in {part:?}"))?;
            let b: Ipv4Addr = b.trim().parse().map_err(|_| format!("bad address in {part:?}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a > 65_535 {
                return Err(format!("bad range {part:?}"));
            }
            out.extend((a..=b).map(|v| IpAddr::V4(Ipv4Addr::from(v))));
        } else {
            out.push(part.parse().map_err(|_| format!("bad address {part:?}"))?);
        }
    }
    if out.is_empty() {
        return Err("no source address".into());
    }
    Ok(out)
}

/// A watched process (or several of one name), resolved from a `--watch` at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    /// The name it is reported under.
    pub name: String,
    /// Its pids.
    pub pids: Vec<u32>,
}

impl Watched {
    fn cpu_secs(&self) -> f64 {
        self.pids.iter().filter_map(|p| procfs::cpu_secs(*p)).sum()
    }

    fn rss_kib(&self) -> Option<u64> {
        self.pids.iter().map(|p| procfs::rss_kib(*p)).sum()
    }

    fn usage(&self, cpu_secs: f64) -> ProcessUsage {
        ProcessUsage {
            name: self.name.clone(),
            pid: self.pids.first().copied().unwrap_or(0),
            pids: self.pids.clone(),
            cpu_secs,
            rss_kib: self.rss_kib(),
        }
    }
}

/// Resolves `--watch` specs: `PID`, `NAME`, `LABEL=PID`, `LABEL=NAME`.
pub fn parse_watch(spec: &[String]) -> Result<Vec<Watched>, String> {
    let mut out: Vec<Watched> = Vec::new();
    for s in spec {
        let (label, target) = match s.split_once('=') {
            Some((l, t)) if !l.is_empty() && !t.is_empty() => (Some(l), t),
            Some(_) => return Err(format!("--watch {s}: expected [LABEL=]PID or [LABEL=]NAME")),
            None => (None, s.as_str()),
        };
        let w = if let Ok(pid) = target.parse::<u32>() {
            let comm = procfs::comm(pid).ok_or_else(|| format!("--watch {s}: no process {pid}"))?;
            Watched {
                name: label.map_or_else(|| format!("{comm}-{pid}"), str::to_owned),
                pids: vec![pid],
            }
        } else {
            let pids = procfs::pids_named(target);
            if pids.is_empty() {
                return Err(format!("--watch {s}: no process named {target:?}"));
            }
            Watched { name: label.unwrap_or(target).to_owned(), pids }
        };
        if out.iter().any(|o| o.name == w.name) {
            return Err(format!("--watch {s}: {:?} is watched twice", w.name));
        }
        out.push(w);
    }
    Ok(out)
}

fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback()
}

fn nats_host_is_local(url: &str) -> bool {
    url.split(',').all(|u| {
        let rest = u.trim().split_once("://").map_or(u.trim(), |(_, r)| r);
        let host_port = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost" || host.parse::<IpAddr>().is_ok_and(is_local)
    })
}

/// The settings, checked.
struct Plan {
    steps: StepPlan,
    sources: Vec<IpAddr>,
    watch: Vec<Watched>,
    thresholds: Vec<Threshold>,
    run_id: String,
    qos: QoS,
    device_opts: DeviceOptions,
    coap_opts: CoapOptions,
    http_opts: HttpOptions,
    udp_opts: UdpOptions,
}

fn check(args: &LoadgenArgs) -> Result<Plan, LoadgenError> {
    let bad = |m: String| Err(LoadgenError::Settings(m));
    let sources = parse_source_ips(&args.source_ips).map_err(LoadgenError::Settings)?;
    if args.transport != Transport::Mqtt {
        let t = args.transport.name();
        if args.target == Target::Broker {
            return bad(format!("--target broker needs --transport mqtt (not {t})"));
        }
        if args.idle {
            return bad(format!("--idle is for MQTT devices only (not {t})"));
        }
        if args.request_ids {
            return bad(format!("--request-ids is for MQTT devices only (not {t})"));
        }
    }
    if !args.allow_remote {
        let (flag, addr) = target_addr(args);
        if !is_local(addr.ip()) {
            return bad(format!("--{flag} {addr} is not on 127.0.0.0/8 (--allow-remote)"));
        }
        if let Some(ip) = sources.iter().find(|ip| !is_local(**ip)) {
            return bad(format!("source address {ip} is not on 127.0.0.0/8 (--allow-remote)"));
        }
        if let Some(url) = &args.nats_url
            && !nats_host_is_local(url)
        {
            return bad(format!("--nats-url {url} is not on this machine (--allow-remote)"));
        }
    }
    if args.target == Target::Fleetgate && !args.idle && args.nats_url.is_none() {
        return bad("--target fleetgate counts delivery on NATS: give --nats-url".into());
    }
    if args.devices == 0 {
        return bad("--devices must be at least 1".into());
    }
    if args.payload_bytes < payload::MIN_PAYLOAD_BYTES {
        return bad(format!(
            "--payload-bytes must be at least {} (the send time, step and run id must fit)",
            payload::MIN_PAYLOAD_BYTES
        ));
    }
    if args.rates.len() >= payload::MAX_STEPS {
        return bad(format!("--rates: at most {} steps", payload::MAX_STEPS - 1));
    }
    let run_id = match &args.run_id {
        Some(id) if !payload::valid_run_id(id) => {
            return bad(format!(
                "--run-id {id:?}: 1 to {} letters, digits, '-' or '_'",
                payload::MAX_RUN_ID_LEN
            ));
        }
        Some(id) => id.clone(),
        None => payload::new_run_id(),
    };
    let thresholds = args
        .fail_if
        .iter()
        .map(|t| t.parse::<Threshold>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(LoadgenError::Settings)?;
    if !args.idle && (args.rates.is_empty() || args.step_secs.is_nan() || args.step_secs <= 0.0) {
        return bad("--rates needs at least one rate and --step-secs must be positive".into());
    }
    if args.connect_rate.is_nan() || args.connect_rate <= 0.0 {
        return bad("--connect-rate must be positive".into());
    }
    let watch = parse_watch(&args.watch).map_err(LoadgenError::Settings)?;
    let gateway_key = match (&args.udp_public_key, args.transport) {
        (Some(key), _) => udp_public_key(key).map_err(LoadgenError::Settings)?,
        (None, Transport::Udp) => {
            return bad("--transport udp needs --udp-public-key (hex or a .pub file)".into());
        }
        (None, _) => [0; 32],
    };
    let steps = if args.idle {
        StepPlan::new(Vec::new(), Duration::ZERO)
    } else {
        StepPlan::new(args.rates.clone(), Duration::from_secs_f64(args.step_secs))
    };
    Ok(Plan {
        steps,
        sources,
        watch,
        thresholds,
        run_id,
        qos: if args.qos == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce },
        device_opts: DeviceOptions {
            target: args.mqtt,
            version: args.mqtt_version.codec(),
            keep_alive_secs: args.keep_alive_secs,
            connect_timeout: Duration::from_millis(args.connect_timeout_ms),
            app_version: args.app_version.clone(),
            window: args.window.max(1),
            max_buffer_bytes: args.max_buffer_bytes,
        },
        coap_opts: CoapOptions {
            target: args.coap,
            app_version: args.app_version.clone(),
            window: args.window.max(1),
            connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        },
        udp_opts: UdpOptions {
            target: args.udp,
            gateway_key,
            app_version: args.app_version.clone(),
            window: args.window.max(1),
            connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        },
        http_opts: HttpOptions {
            target: args.http,
            app_version: args.app_version.clone(),
            window: args.window.max(1),
            max_buffer_bytes: args.max_buffer_bytes,
            connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        },
    })
}

/// The gateway's FGU/1 public key: 64 hex digits, or a file that holds them.
fn udp_public_key(value: &str) -> Result<[u8; 32], String> {
    use fleetgate_transport_udp::handshake::parse_key_hex;
    if let Some(key) = parse_key_hex(value) {
        return Ok(key);
    }
    let text = std::fs::read_to_string(value)
        .map_err(|e| format!("--udp-public-key: neither 64 hex digits nor a readable file: {e}"))?;
    parse_key_hex(&text).ok_or_else(|| format!("--udp-public-key: {value} does not hold a key"))
}

/// The option naming the devices' target address, and the address.
fn target_addr(args: &LoadgenArgs) -> (&'static str, SocketAddr) {
    match args.transport {
        Transport::Mqtt => ("mqtt", args.mqtt),
        Transport::Coap => ("coap", args.coap),
        Transport::Http => ("http", args.http),
        Transport::Udp => ("udp", args.udp),
    }
}

/// The soft limit on open files of this process, from `/proc/self/limits`.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_ascii_whitespace().nth(3)?.parse().ok()
}

/// Runs the load generator: connect, run the steps (or hold, in idle mode), drain, report.
/// Writes the result files when asked to.
pub async fn run(args: &LoadgenArgs) -> Result<Report, LoadgenError> {
    run_until(args, std::future::pending()).await
}

/// [`run`], stopped early when `interrupt` resolves (to the reason, e.g. `SIGINT`) or when
/// `--max-secs` is over: the senders stop, deliveries drain briefly, and the partial result
/// (marked `interrupted`) is returned and written like a whole one.
pub async fn run_until(
    args: &LoadgenArgs,
    interrupt: impl Future<Output = String>,
) -> Result<Report, LoadgenError> {
    let plan = check(args)?;
    let thresholds = plan.thresholds.clone();
    let (halt_tx, halt_rx) = watch::channel(None::<String>);
    let work = run_checked(args, plan, halt_rx);
    tokio::pin!(work);
    tokio::pin!(interrupt);
    let max = tokio::time::sleep(Duration::from_secs_f64(args.max_secs.max(1.0)));
    tokio::pin!(max);
    // Once stopped, the run gets its drain time and a margin to wind down.
    let grace = args.drain_secs.clamp(0.0, 2.0) as u64 + 15;
    let mut deadline: Option<Instant> = None;
    let mut report = loop {
        let halted = deadline.is_some();
        tokio::select! {
            r = &mut work => break r?,
            why = &mut interrupt, if !halted => {
                deadline = Some(Instant::now() + Duration::from_secs(grace));
                let _ = halt_tx.send(Some(why));
            }
            _ = &mut max, if !halted => {
                deadline = Some(Instant::now() + Duration::from_secs(grace));
                let _ = halt_tx.send(Some("--max-secs".into()));
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if halted => {
                let why = halt_tx.borrow().clone().unwrap_or_default();
                return Err(LoadgenError::TimedOut(grace, why));
            }
        }
    };
    crate::threshold::apply(&mut report, &thresholds);
    write_outputs(args, &report)?;
    Ok(report)
}

/// Writes the JSON, and beside it the SVG, CSV and HTML report, where asked to.
fn write_outputs(args: &LoadgenArgs, report: &Report) -> Result<(), LoadgenError> {
    let write = |path: &PathBuf, text: String| {
        std::fs::write(path, text).map_err(|e| LoadgenError::Write(path.clone(), e))
    };
    let beside = |given: &Option<PathBuf>, ext: &str| {
        given.clone().or_else(|| args.out.as_ref().map(|p| p.with_extension(ext)))
    };
    if let Some(path) = &args.out {
        write(path, serde_json::to_string_pretty(report).unwrap_or_default())?;
    }
    if args.idle {
        return Ok(());
    }
    if let Some(path) = beside(&args.svg, "svg") {
        let title = format!(
            "fleetgate-loadgen: {} {} {} QoS {}, {} devices, {} B, run {}",
            report.settings.target,
            report.settings.transport,
            report.settings.address,
            args.qos,
            args.devices,
            args.payload_bytes,
            report.run_id
        );
        write(&path, crate::svg::render(&title, &crate::svg::report_charts(report)))?;
    }
    if let Some(path) = beside(&args.csv, "csv") {
        write(&path, crate::output::csv(report))?;
    }
    if let Some(path) = beside(&args.html, "html") {
        write(&path, crate::output::html(report))?;
    }
    Ok(())
}

fn progress(args: &LoadgenArgs, line: std::fmt::Arguments<'_>) {
    if !args.quiet {
        eprintln!("{line}");
    }
}

async fn run_checked(
    args: &LoadgenArgs,
    plan: Plan,
    halt: watch::Receiver<Option<String>>,
) -> Result<Report, LoadgenError> {
    let started_unix_ms = crate::stats::unix_nanos() / 1_000_000;
    let counters = RunCounters::new(plan.steps.len());
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(limit) = open_files_limit()
        && args.devices as u64 + 64 > limit
    {
        progress(
            args,
            format_args!(
                "warning: {} devices need more file descriptors than this process may open ({limit}); run several generator processes",
                args.devices
            ),
        );
    }

    for w in plan.watch.iter().filter(|w| w.pids.len() > 1) {
        progress(
            args,
            format_args!("--watch {}: {} processes {:?}, summed", w.name, w.pids.len(), w.pids),
        );
    }

    // The delivery counter first, so that nothing sent is missed.
    let mut sink: Option<SinkThread> = None;
    let mut live = Arc::new(LiveDelivery::default());
    if !args.idle {
        let target = match args.target {
            Target::Fleetgate => SinkTarget::Nats(args.nats_url.clone().unwrap_or_default()),
            Target::Broker => SinkTarget::Mqtt(args.mqtt, "kp1/#".into()),
        };
        let started =
            SinkThread::start(target, plan.steps.len(), plan.run_id.clone(), stop_rx.clone())
                .await?;
        live = started.live();
        sink = Some(started);
    }

    let (devices, readers, connect) =
        connect_all(args, &plan, &counters, &stop_rx, halt.clone()).await;
    println!(
        "{{\"event\":\"connected\",\"connected\":{},\"failed\":{},\"pid\":{},\"run_id\":\"{}\"}}",
        connect.connected,
        connect.failed,
        std::process::id(),
        plan.run_id
    );
    let interrupted = || halt.borrow().clone();
    if devices.is_empty() && interrupted().is_none() {
        let _ = stop_tx.send(true);
        return Err(LoadgenError::NoConnections(
            connect.first_error.unwrap_or_else(|| "no error recorded".into()),
        ));
    }

    let mut report = Report {
        settings: settings(args, &plan),
        run_id: plan.run_id.clone(),
        command: format!(
            "fleetgate-loadgen {} {}",
            env!("CARGO_PKG_VERSION"),
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
        started_unix_ms,
        connect,
        ..Default::default()
    };

    if args.idle {
        report.idle = Some(hold(args, &plan, &counters, halt.clone()).await);
    } else {
        let outcome = if devices.is_empty() {
            LoadOutcome::default()
        } else {
            load(args, &plan, &devices, &counters, &live, halt.clone()).await
        };
        let _ = stop_tx.send(true);
        let recorder = match sink.take() {
            Some(s) => s.finish().await,
            None => None,
        }
        .unwrap_or_else(|| DeliveryRecorder::new(plan.steps.len(), &plan.run_id));
        report.load_started_unix_ms = outcome.started_unix_ms;
        fill_steps(&mut report, args, &plan, &counters, &recorder, outcome);
    }
    report.interrupted = interrupted();
    let _ = stop_tx.send(true);
    let shutdown = async {
        for r in readers {
            let _ = r.await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), shutdown).await;
    report.connections_lost = counters.connections_lost.load(Ordering::Relaxed);
    report.finished_unix_ms = crate::stats::unix_nanos() / 1_000_000;
    Ok(report)
}

fn settings(args: &LoadgenArgs, plan: &Plan) -> Settings {
    Settings {
        target: match args.target {
            Target::Fleetgate => "fleetgate".into(),
            Target::Broker => "broker".into(),
        },
        transport: args.transport.name().into(),
        address: target_addr(args).1.to_string(),
        nats_url: args.nats_url.clone(),
        mqtt_version: args.mqtt_version.name().into(),
        qos: args.qos,
        devices: args.devices,
        device_offset: args.device_offset,
        payload_bytes: args.payload_bytes,
        rates: plan.steps.rates().to_vec(),
        step_secs: args.step_secs,
        request_ids: args.request_ids,
        window: plan.device_opts.window,
        source_ips: plan.sources.len(),
        workers: worker_count(args),
        threads: runtime_threads(),
        idle: args.idle,
    }
}

fn runtime_threads() -> usize {
    tokio::runtime::Handle::try_current().map_or(1, |h| h.metrics().num_workers())
}

fn worker_count(args: &LoadgenArgs) -> usize {
    args.workers.unwrap_or_else(runtime_threads).clamp(1, args.devices.max(1))
}

/// A connect task's result: the device and its reader task.
type ConnectResult = Result<(SimDevice, JoinHandle<()>), device::ConnectError>;

/// Connects every device at the ramp-up rate; returns the connected ones, their reader tasks
/// and the summary.
async fn connect_all(
    args: &LoadgenArgs,
    plan: &Plan,
    counters: &Arc<RunCounters>,
    stop: &watch::Receiver<bool>,
    mut halt: watch::Receiver<Option<String>>,
) -> (Vec<SimDevice>, Vec<JoinHandle<()>>, ConnectSummary) {
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / args.connect_rate);
    let permits = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let opts = Arc::new((
        plan.device_opts.clone(),
        plan.coap_opts.clone(),
        plan.http_opts.clone(),
        plan.udp_opts.clone(),
    ));
    let transport = args.transport;
    let mut devices = Vec::with_capacity(args.devices);
    let mut readers = Vec::with_capacity(args.devices);
    let mut summary = ConnectSummary { requested: args.devices, ..Default::default() };
    let mut next_report = start + Duration::from_secs(1);
    let mut collect = |r: Result<ConnectResult, tokio::task::JoinError>,
                       summary: &mut ConnectSummary| match r {
        Ok(Ok((d, reader))) => {
            summary.connected += 1;
            devices.push(d);
            readers.push(reader);
        }
        Ok(Err(e)) => {
            summary.failed += 1;
            *summary.failures.entry(e.kind()).or_insert(0) += 1;
            summary.first_error.get_or_insert_with(|| e.to_string());
        }
        Err(e) => {
            summary.failed += 1;
            *summary.failures.entry("connect task failed".into()).or_insert(0) += 1;
            summary.first_error.get_or_insert_with(|| e.to_string());
        }
    };
    for i in 0..args.devices {
        tokio::select! {
            _ = tokio::time::sleep_until(start + interval * i as u32) => {}
            _ = halt.changed() => {}
        }
        if halt.borrow().is_some() {
            break;
        }
        while let Some(r) = tasks.try_join_next() {
            collect(r, &mut summary);
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(1);
            progress(
                args,
                format_args!(
                    "[{:5.1}s] connecting: {}/{} connected, {} failed",
                    start.elapsed().as_secs_f64(),
                    summary.connected,
                    args.devices,
                    summary.failed
                ),
            );
        }
        let Ok(permit) = permits.clone().acquire_owned().await else { break };
        let source = plan.sources[i % plan.sources.len()];
        let token = format!("{}{:06}", args.token_prefix, args.device_offset + i);
        let opts = opts.clone();
        let counters = counters.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let (mqtt, coap, http, udp) = &*opts;
            let connected = match transport {
                Transport::Mqtt => device::connect(mqtt, Some(source), &token, counters)
                    .await
                    .map(|c| (SimDevice::Mqtt(c.device.clone()), c.spawn_reader(stop))),
                Transport::Coap => coap_device::connect(coap, Some(source), &token, counters)
                    .await
                    .map(|d| (SimDevice::Coap(d.clone()), tokio::spawn(d.read_loop(stop)))),
                Transport::Http => http_device::connect(http, Some(source), &token, counters)
                    .await
                    .map(|d| (SimDevice::Http(d.clone()), tokio::spawn(d.read_loop(stop)))),
                Transport::Udp => udp_device::connect(udp, Some(source), &token, counters)
                    .await
                    .map(|d| (SimDevice::Udp(d.clone()), tokio::spawn(d.read_loop(stop)))),
            };
            drop(permit);
            connected
        });
    }
    while let Some(r) = tasks.join_next().await {
        collect(r, &mut summary);
    }
    summary.seconds = start.elapsed().as_secs_f64();
    if summary.failed > 0 {
        progress(
            args,
            format_args!(
                "connect failures: {}",
                summary
                    .failures
                    .iter()
                    .map(|(k, v)| format!("{k} ×{v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    progress(
        args,
        format_args!(
            "[{:5.1}s] connected {}/{} ({} failed{})",
            summary.seconds,
            summary.connected,
            args.devices,
            summary.failed,
            summary.first_error.as_deref().map(|e| format!(", first: {e}")).unwrap_or_default()
        ),
    );
    (devices, readers, summary)
}

/// Idle mode: hold the connections, report how many stayed up.
async fn hold(
    args: &LoadgenArgs,
    plan: &Plan,
    counters: &RunCounters,
    mut halt: watch::Receiver<Option<String>>,
) -> IdleReport {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.hold_secs.max(0.0));
    let mut tick = start;
    while Instant::now() < end && halt.borrow().is_none() {
        tick += Duration::from_secs(1);
        tokio::select! {
            _ = tokio::time::sleep_until(tick.min(end)) => {}
            _ = halt.changed() => {}
        }
        progress(
            args,
            format_args!(
                "[{:5.1}s] holding {} connections ({} lost)",
                start.elapsed().as_secs_f64(),
                counters.connections_open.load(Ordering::Relaxed),
                counters.connections_lost.load(Ordering::Relaxed)
            ),
        );
    }
    let processes = plan.watch.iter().map(|w| w.usage(w.cpu_secs())).collect();
    IdleReport {
        hold_secs: start.elapsed().as_secs_f64(),
        held: counters.connections_open.load(Ordering::Relaxed),
        lost: counters.connections_lost.load(Ordering::Relaxed),
        processes,
    }
}

/// What the load phase measured beside the counters.
#[derive(Debug, Default)]
struct LoadOutcome {
    /// Per step run: the watched processes' CPU and memory.
    usage: Vec<Vec<ProcessUsage>>,
    /// Per step run: how long it ran (the last may be cut short), seconds.
    step_secs: Vec<f64>,
    /// Once a second.
    timeline: Vec<Sample>,
    /// When the first step began, Unix milliseconds.
    started_unix_ms: u64,
}

/// The largest failure counts, for the progress line.
fn top_failures(failures: &std::collections::BTreeMap<String, u64>, n: usize) -> String {
    let mut v: Vec<(&String, &u64)> = failures.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    v.iter().take(n).map(|(k, c)| format!("{k} ×{c}")).collect::<Vec<_>>().join(", ")
}

/// Runs the steps, prints progress, then drains; stops early when `halt` is set.
async fn load(
    args: &LoadgenArgs,
    plan: &Plan,
    devices: &[SimDevice],
    counters: &Arc<RunCounters>,
    live: &Arc<LiveDelivery>,
    mut halt: watch::Receiver<Option<String>>,
) -> LoadOutcome {
    let workers = worker_count(args).min(devices.len());
    let mut groups: Vec<Vec<SimDevice>> = vec![Vec::new(); workers];
    for (i, d) in devices.iter().enumerate() {
        groups[i % workers].push(d.clone());
    }
    let caps: Vec<Option<u64>> = match args.max_messages {
        Some(max) => {
            split_even(max as usize, workers).into_iter().map(|c| Some(c as u64)).collect()
        }
        None => vec![None; workers],
    };
    let origin = Instant::now() + Duration::from_millis(20);
    let mut outcome = LoadOutcome {
        started_unix_ms: crate::stats::unix_nanos() / 1_000_000 + 20,
        ..Default::default()
    };
    let total = devices.len() as f64;
    let mut tasks = Vec::with_capacity(workers);
    for (group, cap) in groups.into_iter().zip(caps) {
        let w = Worker {
            share: group.len() as f64 / total,
            devices: group,
            steps: plan.steps.clone(),
            origin,
            qos: plan.qos,
            request_ids: args.request_ids,
            payload_bytes: args.payload_bytes,
            run_id: plan.run_id.clone(),
            max_lag: Duration::from_millis(args.max_lag_ms),
            cap,
            counters: counters.clone(),
        };
        tasks.push(tokio::spawn(w.run()));
    }

    // Controller: step boundaries (CPU samples), progress and the timeline once a second.
    let cpu_now = || plan.watch.iter().map(Watched::cpu_secs).collect::<Vec<f64>>();
    let mut cpu_at_step: Vec<f64> = cpu_now();
    let mut cpu_at_tick = cpu_at_step.clone();
    let mut step = 0usize;
    let mut step_start = origin;
    let mut next_tick = origin + Duration::from_secs(1);
    let mut last = counters.totals();
    let mut last_failures = 0u64;
    let mut last_delivered = live.delivered.load(Ordering::Relaxed);
    let mut last_time = origin;
    while step < plan.steps.len() {
        // The step that ran up to now: what the progress line and the sample are about.
        let ran = step;
        let boundary = origin + plan.steps.bounds(step).1;
        let wake = next_tick.min(boundary);
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = halt.changed() => {}
        }
        let halted = halt.borrow().is_some();
        if halted {
            counters.halted.store(true, Ordering::Relaxed);
        }
        let all_done = tasks.iter().all(|t| t.is_finished());
        let now = Instant::now();
        if now >= boundary || all_done || halted {
            let cpu = cpu_now();
            outcome.usage.push(
                plan.watch
                    .iter()
                    .zip(cpu.iter().zip(&cpu_at_step))
                    .map(|(w, (now, before))| w.usage((now - before).max(0.0)))
                    .collect(),
            );
            outcome.step_secs.push(
                now.saturating_duration_since(step_start).min(plan.steps.step_len()).as_secs_f64(),
            );
            step_start = boundary;
            cpu_at_step = cpu;
            if all_done || halted {
                break;
            }
            step += 1;
            counters.current_step.store(step.min(plan.steps.len() - 1), Ordering::Relaxed);
        }
        if now >= next_tick {
            next_tick += Duration::from_secs(1);
            let secs = now.duration_since(last_time).as_secs_f64().max(1e-3);
            let t = counters.totals();
            let delivered = live.delivered.load(Ordering::Relaxed);
            let failures_now: u64 = counters.steps.iter().map(|s| s.failures.total()).sum();
            let cpu = cpu_now();
            let s = (ran, plan.steps.len());
            let sample = Sample {
                t: now.duration_since(origin).as_secs_f64(),
                step: s.0,
                sent_rate: (t.sent - last.sent) as f64 / secs,
                delivered_rate: delivered.saturating_sub(last_delivered) as f64 / secs,
                acked_rate: (t.acked - last.acked) as f64 / secs,
                failure_rate: failures_now.saturating_sub(last_failures) as f64 / secs,
                p50_ms: live.p50_us.load(Ordering::Relaxed) as f64 / 1e3,
                p99_ms: live.p99_us.load(Ordering::Relaxed) as f64 / 1e3,
                connections: counters.connections_open.load(Ordering::Relaxed),
                cpu_pct: plan
                    .watch
                    .iter()
                    .zip(cpu.iter().zip(&cpu_at_tick))
                    .map(|(w, (now, before))| {
                        (w.name.clone(), (now - before).max(0.0) * 100.0 / secs)
                    })
                    .collect(),
            };
            let failures = if failures_now > 0 {
                format!(
                    " | failures {:.0}/s: {}",
                    sample.failure_rate,
                    top_failures(&counters.failure_totals(), 3)
                )
            } else {
                String::new()
            };
            let cpu_line: String =
                sample.cpu_pct.iter().map(|(k, v)| format!(" {k} {v:.0}%")).collect();
            progress(
                args,
                format_args!(
                    "[{:5.1}s] step {}/{} @{}/s | sent {:.0}/s acked {:.0}/s resp {:.0}/s delivered {:.0}/s | p50 {:.2} ms p99 {:.2} ms | backpressure {} skipped {} late wake-ups {} | conns {}{}{}",
                    sample.t,
                    s.0 + 1,
                    s.1,
                    plan.steps.rates()[s.0],
                    sample.sent_rate,
                    sample.acked_rate,
                    (t.responded - last.responded) as f64 / secs,
                    sample.delivered_rate,
                    sample.p50_ms,
                    sample.p99_ms,
                    t.backpressure_window + t.backpressure_buffer,
                    t.skipped,
                    t.late_ticks - last.late_ticks,
                    sample.connections,
                    if cpu_line.is_empty() { String::new() } else { format!(" | cpu{cpu_line}") },
                    failures,
                ),
            );
            outcome.timeline.push(sample);
            last = t;
            last_failures = failures_now;
            last_delivered = delivered;
            last_time = now;
            cpu_at_tick = cpu;
        }
    }
    for t in tasks {
        let _ = t.await;
    }

    // Drain: until everything offered arrived (and was answered), or the drain time is up
    // (at most 2 s once stopped early).
    let halted = halt.borrow().is_some();
    let drain = if halted { args.drain_secs.clamp(0.0, 2.0) } else { args.drain_secs.max(0.0) };
    if halted {
        progress(args, format_args!("stopping early: draining for up to {drain:.1} s"));
    }
    let drain_end = Instant::now() + Duration::from_secs_f64(drain);
    let wants_responses = args.request_ids && args.target == Target::Fleetgate;
    loop {
        let t = counters.totals();
        // A failure (an `/error`, an error status) is the last word on its message too.
        let failed: u64 = counters.steps.iter().map(|s| s.failures.total()).sum();
        let delivered = live.delivered.load(Ordering::Relaxed);
        let done = delivered + failed >= t.sent
            // HTTP answers every request, so its acknowledgements are awaited at QoS 0 too.
            && ((plan.qos == QoS::AtMostOnce && args.transport != Transport::Http)
                || t.acked >= t.sent)
            && (!wants_responses || t.responded + t.errors >= t.sent);
        if done || Instant::now() >= drain_end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Leave devices flushed: anything still in an outbox is written if the socket takes it.
    for d in devices {
        d.flush();
    }
    outcome
}

/// One sending task: a share of the devices and of the offered rate.
struct Worker {
    devices: Vec<SimDevice>,
    share: f64,
    steps: StepPlan,
    origin: Instant,
    qos: QoS,
    request_ids: bool,
    payload_bytes: usize,
    run_id: String,
    max_lag: Duration,
    cap: Option<u64>,
    counters: Arc<RunCounters>,
}

impl Worker {
    async fn run(self) {
        if self.devices.is_empty() || self.steps.is_empty() {
            return;
        }
        let n = self.devices.len();
        let mut tick = tokio::time::interval_at(
            self.origin,
            Duration::from_millis(1).min(self.steps.step_len()),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut step = 0usize;
        let mut pacer = self.steps.pacer(0, self.share, self.max_lag);
        let mut payload = Vec::with_capacity(self.payload_bytes);
        let mut dirty: Vec<usize> = Vec::new();
        let mut is_dirty = vec![false; n];
        let mut next = 0usize;
        let mut sent_total = 0u64;
        loop {
            let due_at = tick.tick().await;
            if self.counters.halted.load(Ordering::Relaxed) {
                return;
            }
            let now = self.origin.elapsed();
            let lag_us = u64::try_from(due_at.elapsed().as_micros()).unwrap_or(u64::MAX);
            // Retry connections whose earlier bytes the socket did not take.
            dirty.retain(|&i| {
                let pending = self.devices[i].flush();
                is_dirty[i] = pending;
                pending
            });
            loop {
                let due = pacer.due(now);
                let mut c = StepCounts {
                    scheduled: due.send + due.skipped,
                    skipped: due.skipped,
                    ticks: 1,
                    late_ticks: u64::from(lag_us > crate::stats::LATE_TICK_US),
                    max_tick_lag_us: lag_us,
                    ..Default::default()
                };
                for k in 0..due.send {
                    if k > 0 && k % 256 == 0 {
                        // A long catch-up burst: let the readers (acknowledgements) run.
                        tokio::task::yield_now().await;
                    }
                    if self.cap.is_some_and(|cap| sent_total >= cap) {
                        // Bounded in count: what is left of the schedule is not offered.
                        c.scheduled -= 1;
                        continue;
                    }
                    let i = next;
                    next = if next + 1 == n { 0 } else { next + 1 };
                    payload::write(
                        &mut payload,
                        crate::stats::unix_nanos(),
                        step as u32,
                        self.run_id.as_bytes(),
                        self.payload_bytes,
                    );
                    sent_total += 1;
                    match self.devices[i].publish(self.qos, self.request_ids, &payload) {
                        SendOutcome::Sent { pending } => {
                            c.sent += 1;
                            if pending && !is_dirty[i] {
                                is_dirty[i] = true;
                                dirty.push(i);
                            }
                        }
                        SendOutcome::WindowFull => c.backpressure_window += 1,
                        SendOutcome::BufferFull => c.backpressure_buffer += 1,
                        SendOutcome::Closed => c.dropped_closed += 1,
                    }
                }
                self.counters.steps[step].add(&c);
                if self.cap.is_some_and(|cap| sent_total >= cap) {
                    return;
                }
                match pacer.end() {
                    Some(end) if now >= end => {
                        step += 1;
                        if step >= self.steps.len() {
                            return;
                        }
                        pacer = self.steps.pacer(step, self.share, self.max_lag);
                    }
                    _ => break,
                }
            }
        }
    }
}

fn fill_steps(
    report: &mut Report,
    args: &LoadgenArgs,
    plan: &Plan,
    counters: &RunCounters,
    recorder: &DeliveryRecorder,
    outcome: LoadOutcome,
) {
    for (i, secs) in outcome.step_secs.iter().copied().enumerate() {
        let c = counters.steps[i].snapshot();
        let delivery = &recorder.steps()[i];
        let attempted = c.attempted();
        let lost = attempted as i64 - delivery.delivered as i64;
        let rtt = counters.steps[i].rtt.to_histogram();
        let secs_nz = secs.max(1e-9);
        report.steps.push(StepReport {
            index: i,
            offered_rate: plan.steps.rates()[i],
            seconds: secs,
            scheduled: c.scheduled,
            skipped: c.skipped,
            attempted,
            sent: c.sent,
            backpressure_window: c.backpressure_window,
            backpressure_buffer: c.backpressure_buffer,
            dropped_closed: c.dropped_closed,
            acked: c.acked,
            ack_errors: c.ack_errors,
            responded: c.responded,
            errors: c.errors,
            delivered: delivery.delivered,
            lost,
            loss_ratio: if attempted == 0 { 0.0 } else { lost as f64 / attempted as f64 },
            sent_rate: c.sent as f64 / secs_nz,
            delivered_rate: delivery.delivered as f64 / secs_nz,
            latency: recorder.summary(i),
            rtt: LatencySummary::from_histogram(&rtt),
            failures: counters.steps[i].failures.snapshot(),
            generator_limited: c.generator_limited(),
            generator_late_ratio: if c.ticks == 0 {
                0.0
            } else {
                c.late_ticks as f64 / c.ticks as f64
            },
            generator_max_lag_ms: c.max_tick_lag_us as f64 / 1e3,
            processes: outcome.usage.get(i).cloned().unwrap_or_default(),
            latency_histogram: histogram_pairs(&delivery.latency),
            rtt_histogram: histogram_pairs(&rtt),
        });
    }
    let mut totals = sum_steps(&report.steps, false);
    totals.index = report.steps.len();
    totals.processes = sum_processes(&report.steps);
    report.totals = totals;
    report.timeline = outcome.timeline;
    report.foreign_deliveries = recorder.foreign;
    report.other_run_deliveries = recorder.other_runs;
    report.failure_examples =
        counters.failure_examples.lock().map(|m| m.clone()).unwrap_or_default();
    report.msr = Some(msr(&report.steps, MsrCriteria::for_qos(args.qos)));
}

/// One line per step for the terminal, then failures, MSR and thresholds.
pub fn summary_table(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    if let Some(why) = &report.interrupted {
        let _ = writeln!(s, "partial result: stopped early ({why})");
    }
    if let Some(idle) = &report.idle {
        let _ = writeln!(
            s,
            "idle: {} of {} connections held for {:.1} s ({} lost, {} failed to connect)",
            idle.held, report.connect.requested, idle.hold_secs, idle.lost, report.connect.failed
        );
        return s;
    }
    let names: Vec<&str> = report.totals.processes.iter().map(|p| p.name.as_str()).collect();
    let _ = write!(
        s,
        "{:>9} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "offered/s",
        "sent",
        "acked",
        "delivered",
        "lost",
        "loss %",
        "failures",
        "backpr.",
        "p50 ms",
        "p99 ms",
        "max ms",
        "rtt p50",
        "rtt p99",
    );
    for n in &names {
        let _ = write!(s, "  {n} cpu-s/M");
    }
    s.push('\n');
    for st in report.steps.iter().chain(std::iter::once(&report.totals)) {
        let _ = write!(
            s,
            "{:>9} {:>10} {:>10} {:>10} {:>10} {:>8.3} {:>8} {:>8} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            if st.index == report.steps.len() {
                "total".to_owned()
            } else {
                st.offered_rate.to_string()
            },
            st.sent,
            st.acked,
            st.delivered,
            st.lost,
            st.loss_ratio * 100.0,
            st.failure_count(),
            st.backpressure_window + st.backpressure_buffer,
            st.latency.p50_us as f64 / 1e3,
            st.latency.p99_us as f64 / 1e3,
            st.latency.max_us as f64 / 1e3,
            st.rtt.p50_us as f64 / 1e3,
            st.rtt.p99_us as f64 / 1e3,
        );
        for n in &names {
            let v = st.cpu_secs_per_million(n).map_or_else(|| "-".into(), |v| format!("{v:.2}"));
            let _ = write!(s, "  {v:>w$}", w = n.len() + 9);
        }
        let _ = writeln!(s, "{}", if st.generator_limited { "  (generator-limited)" } else { "" });
    }
    for (k, v) in report.totals.failures.iter().chain(report.connect.failures.iter()) {
        let why = report.failure_examples.get(k).map(|e| format!(": {e}")).unwrap_or_default();
        let _ = writeln!(s, "failure: {k} ×{v}{why}");
    }
    if report.other_run_deliveries > 0 {
        let _ = writeln!(
            s,
            "(the delivery counter also saw {} messages of other runs; not counted)",
            report.other_run_deliveries
        );
    }
    if let Some(m) = &report.msr {
        let _ = writeln!(
            s,
            "MSR: {} msg/s{}{}",
            m.rate,
            if m.lower_bound { " (lower bound: the highest step held)" } else { "" },
            if m.generator_limited_above { " (a higher step was generator-limited)" } else { "" }
        );
    }
    for t in &report.thresholds {
        let _ = writeln!(
            s,
            "--fail-if {}: {} (value {})",
            t.expr,
            if t.failed { "FAILED" } else { "passed" },
            t.value.map_or_else(|| "none".into(), |v| format!("{v}"))
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadgenArgs,
    }

    fn args(extra: &[&str]) -> LoadgenArgs {
        let mut v = vec!["loadgen"];
        v.extend_from_slice(extra);
        Cli::parse_from(v).args
    }

    #[test]
    fn source_ip_ranges() {
        let ips = parse_source_ips("127.0.0.2-127.0.0.4, 127.0.1.1").expect("valid");
        assert_eq!(ips.len(), 4);
        assert_eq!(ips[3], IpAddr::from([127, 0, 1, 1]));
        assert!(parse_source_ips("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_source_ips("").is_err());
        assert!(parse_source_ips("nope").is_err());
    }

    #[test]
    fn loopback_only_unless_allowed() {
        let a = args(&["--target", "broker", "--mqtt", "10.0.0.1:1883"]);
        assert!(matches!(check(&a), Err(LoadgenError::Settings(_))));
        let a = args(&["--target", "broker", "--source-ips", "192.168.1.2"]);
        assert!(check(&a).is_err());
        let a = args(&["--nats-url", "nats://example.com:4222"]);
        assert!(check(&a).is_err());
        let a = args(&["--nats-url", "nats://127.0.0.1:4222,nats://localhost:4223"]);
        assert!(check(&a).is_ok());
        let a = args(&["--target", "broker", "--mqtt", "10.0.0.1:1883", "--allow-remote"]);
        assert!(check(&a).is_ok());
    }

    #[test]
    fn settings_are_checked() {
        assert!(check(&args(&[])).is_err(), "fleetgate needs a NATS URL");
        assert!(check(&args(&["--target", "broker", "--payload-bytes", "20"])).is_err());
        assert!(check(&args(&["--target", "broker", "--devices", "0"])).is_err());
        assert!(check(&args(&["--target", "broker", "--step-secs", "0"])).is_err());
        assert!(check(&args(&["--target", "broker", "--watch", "no-such-process-xyz"])).is_err());
        assert!(check(&args(&["--target", "broker", "--watch", "sut="])).is_err());
        assert!(check(&args(&["--target", "broker", "--run-id", "toolongid"])).is_err());
        assert!(check(&args(&["--target", "broker", "--fail-if", "p99>5"])).is_err());
        let me = std::process::id().to_string();
        let sut = format!("sut={me}");
        let a = args(&["--target", "broker", "--rates", "10,20", "--qos", "1", "--watch", &sut]);
        let p = check(&a).expect("valid");
        assert_eq!(p.steps.rates(), &[10, 20]);
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert_eq!(p.watch, vec![Watched { name: "sut".into(), pids: vec![std::process::id()] }]);
        assert!(payload::valid_run_id(&p.run_id));
        let a = args(&["--target", "broker", "--run-id", "r-1", "--fail-if", "p99_ms>50"]);
        let p = check(&a).expect("valid");
        assert_eq!((p.run_id.as_str(), p.thresholds.len()), ("r-1", 1));
        // Idle mode needs neither NATS nor rates.
        assert!(check(&args(&["--idle"])).is_ok());
    }

    #[test]
    fn coap_and_http_settings() {
        let nats = ["--nats-url", "nats://127.0.0.1:14333"];
        for t in ["coap", "http"] {
            let with = |extra: &[&str]| {
                let mut v = vec!["--transport", t];
                v.extend_from_slice(&nats);
                v.extend_from_slice(extra);
                check(&args(&v))
            };
            assert!(with(&[]).is_ok(), "{t}");
            for bad in [&["--target", "broker"][..], &["--idle"], &["--request-ids"]] {
                assert!(matches!(with(bad), Err(LoadgenError::Settings(_))), "{t} {bad:?}");
            }
            let remote = format!("--{t}");
            assert!(with(&[&remote, "10.0.0.1:5683"]).is_err(), "{t} remote target");
            assert!(with(&[&remote, "10.0.0.1:5683", "--allow-remote"]).is_ok());
        }
        // The MQTT address is not checked for CoAP and HTTP runs, and vice versa.
        let a = args(&[
            "--transport",
            "coap",
            "--mqtt",
            "10.0.0.1:1883",
            "--nats-url",
            "nats://127.0.0.1:1",
        ]);
        assert!(check(&a).is_ok());
        let a = args(&["--target", "broker", "--coap", "10.0.0.1:5683"]);
        assert!(check(&a).is_ok());
    }

    #[test]
    fn processes_are_watched_by_pid_or_name() {
        let me = std::process::id();
        let comm = procfs::comm(me).expect("this process has a name");
        let w = parse_watch(&[me.to_string()]).expect("by pid");
        assert_eq!(w, vec![Watched { name: format!("{comm}-{me}"), pids: vec![me] }]);
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("sleep runs");
        let w = parse_watch(&["sleep".into(), format!("self={me}")]);
        let _ = child.kill();
        let _ = child.wait();
        let w = w.expect("by name");
        assert_eq!(w[0].name, "sleep");
        assert!(w[0].pids.contains(&child.id()), "{w:?}");
        assert_eq!(w[1].name, "self");
        assert!(w[1].cpu_secs() >= 0.0 && w[1].rss_kib().is_some_and(|k| k > 0));
        assert!(parse_watch(&["a=1".into(), "a=1".into()]).is_err(), "a name twice");
        assert!(parse_watch(&["4294967295".into()]).is_err(), "no such pid");
    }
}
