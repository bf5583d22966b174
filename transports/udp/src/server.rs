//! The tokio glue of the `udp` transport: sockets on the shared socket layer (one per core with
//! `reuse_port`, batched `recvmmsg` reads), one reader task per socket and one task per
//! session.
//!
//! A session id carries the index of the socket whose reader owns it in its low bits, so when
//! a device changes address and the kernel hands its datagrams to another socket, that reader
//! forwards them to the owner: no table or lock is shared between readers. A reader does the
//! cheap, stateless work itself: parsing headers, cookies and rate limits, and the first half of
//! the Noise handshake (which proves the device pinned this gateway's key before any state is
//! kept); the session task authenticates the credentials through the gateway (16/ECAP), answers
//! the handshake, then decrypts, checks replays, hands requests to the gateway and sends
//! answers and pushes. A reader never waits for a session: a full queue drops the datagram (the
//! device retries).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use fleetgate_kp::{ClientCredentials, KpError};
use fleetgate_transport_core::metrics::{
    Counter, Family, Gauge, Latency, Registry, TransportMetrics, transport_registry,
};
use fleetgate_transport_core::net::{self, PeerQueues, ReceiveBatch, Routed};
use fleetgate_transport_core::settings::{above_maximum, below_minimum};
use fleetgate_transport_core::{
    BindError, BoxFuture, KpHandler, Shutdown, Transport, outbox, stopped,
};
use prometheus_client::encoding::EncodeLabelSet;
use serde::{Deserialize, Serialize};
use snow::HandshakeState;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::handshake::{self, Hello, KeyPair, MIN_INIT, Welcome};
use crate::session::{Limits, NewSession, Refusal, SUBSCRIPTION_TAG, Session};
use crate::wire::{self, Packet};

const NAME: &str = "udp";

/// FGU/1 listener settings (`transports.udp.*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UdpConfig {
    /// Whether to listen at all.
    pub enabled: bool,
    /// Address and UDP port to listen on.
    pub listen: SocketAddr,
    /// One socket per core on the same port (SO_REUSEPORT), each with its own reader.
    pub reuse_port: bool,
    /// The gateway's key file (`fleetgate keygen` writes one); devices pin its public key.
    /// Without one, a key is generated at start-up and its public key logged: devices must
    /// then learn it anew after every restart, so set this in production.
    pub private_key_path: Option<PathBuf>,
    /// Largest datagram accepted and sent; a request in a larger one gets 413.
    pub max_datagram_bytes: usize,
    /// Extension instances devices may name by number (0, 1, ...) instead of by name; told to
    /// each device in the handshake. At most 8, and the names short enough that the
    /// handshake answer stays smaller than the smallest INIT.
    pub extension_aliases: Vec<String>,
    /// A session that sends nothing authentic for this long ends.
    pub session_idle_timeout_ms: u64,
    /// A session ends this long after its handshake; devices handshake anew before.
    pub session_lifetime_secs: u64,
    /// Told to devices: send a PING after this long without sending anything.
    pub keepalive_secs: u32,
    /// Sessions at once; a handshake past this is refused with 503.
    pub max_sessions: usize,
    /// Handshakes in progress at once before INITs must carry a cookie (RETRY).
    pub max_handshakes_in_progress: usize,
    /// INITs per second from one IP address before it must carry a cookie (RETRY); twice this
    /// with cookies and further INITs are dropped.
    pub handshakes_per_address_per_sec: u32,
    /// Handshakes per minute with one endpoint token; more are refused with 429.
    pub handshakes_per_token_per_min: u32,
    /// Per session: answers kept to answer a retried request again.
    pub response_cache: usize,
    /// Per session: requests awaiting their answer; more get 429.
    pub max_in_flight: usize,
    /// Per session: pushes awaiting their ACK; one more drops the oldest.
    pub max_pending_pushes: usize,
    /// First retransmission timeout of an unacknowledged push (doubled each time).
    pub push_retry_ms: u64,
    /// Per session: datagrams waiting for its task; more are dropped.
    pub peer_queue_capacity: usize,
    /// Per session: responses and pushes waiting to be sent.
    pub response_queue_capacity: usize,
}

impl Default for UdpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 5690)),
            reuse_port: false,
            private_key_path: None,
            max_datagram_bytes: 1200,
            extension_aliases: vec!["dcx".into(), "cmx".into(), "epts".into()],
            session_idle_timeout_ms: 300_000,
            session_lifetime_secs: 86_400,
            keepalive_secs: 25,
            max_sessions: 100_000,
            max_handshakes_in_progress: 1_024,
            handshakes_per_address_per_sec: 50,
            handshakes_per_token_per_min: 30,
            response_cache: 32,
            max_in_flight: 64,
            max_pending_pushes: 32,
            push_retry_ms: 2_000,
            peer_queue_capacity: 64,
            response_queue_capacity: 256,
        }
    }
}

impl UdpConfig {
    /// Values out of range, as `(setting, what is wrong)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut p = below_minimum(&[
            ("max_datagram_bytes", self.max_datagram_bytes as u64, 256),
            ("session_idle_timeout_ms", self.session_idle_timeout_ms, 100),
            ("session_lifetime_secs", self.session_lifetime_secs, 1),
            ("max_sessions", self.max_sessions as u64, 1),
            ("max_handshakes_in_progress", self.max_handshakes_in_progress as u64, 1),
            ("handshakes_per_address_per_sec", u64::from(self.handshakes_per_address_per_sec), 1),
            ("handshakes_per_token_per_min", u64::from(self.handshakes_per_token_per_min), 1),
            ("response_cache", self.response_cache as u64, 1),
            ("max_in_flight", self.max_in_flight as u64, 1),
            ("max_pending_pushes", self.max_pending_pushes as u64, 1),
            ("push_retry_ms", self.push_retry_ms, 10),
            ("peer_queue_capacity", self.peer_queue_capacity as u64, 1),
            ("response_queue_capacity", self.response_queue_capacity as u64, 1),
        ]);
        p.extend(above_maximum("max_datagram_bytes", self.max_datagram_bytes as u64, 65_507));
        p.extend(above_maximum("extension_aliases", self.extension_aliases.len() as u64, 8));
        let welcome = self.welcome(0).len();
        if wire::NOISE_MSG2_OVERHEAD + 9 + welcome > MIN_INIT {
            p.push((
                "extension_aliases",
                format!("the names are too long: the handshake answer must fit {MIN_INIT} bytes"),
            ));
        }
        if self.extension_aliases.iter().any(|a| a.is_empty() || a.contains('/')) {
            p.push(("extension_aliases", "a name is empty or has a `/`".into()));
        }
        p
    }

    fn welcome(&self, now_ms: u64) -> Vec<u8> {
        let mut out = Vec::new();
        Welcome::Accepted {
            lifetime_secs: u32::try_from(self.session_lifetime_secs).unwrap_or(u32::MAX),
            keepalive_secs: self.keepalive_secs,
            max_datagram: u16::try_from(self.max_datagram_bytes).unwrap_or(u16::MAX),
            server_time_ms: now_ms.max(1 << 40),
            aliases: self.extension_aliases.iter().map(String::as_str).collect(),
        }
        .put(&mut out);
        out
    }

    fn limits(&self) -> Limits {
        Limits {
            max_datagram: self.max_datagram_bytes,
            idle_timeout: Duration::from_millis(self.session_idle_timeout_ms),
            lifetime: Duration::from_secs(self.session_lifetime_secs),
            response_cache: self.response_cache,
            max_in_flight: self.max_in_flight,
            max_pending_pushes: self.max_pending_pushes,
            push_retry: Duration::from_millis(self.push_retry_ms),
        }
    }
}

/// The `reason` label of refused datagrams.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: &'static str,
}

/// The transport's own metrics, besides the shared families.
pub struct UdpMetrics {
    /// Datagrams refused, by reason: `malformed`, `replay`, `forged`, `unknown_session`,
    /// `handshake` (an INIT that does not authenticate: wrong gateway key, forged),
    /// `rate_limited`, `amplification`, `queue_full`.
    pub refused: Family<ReasonLabel, Counter>,
    /// Handshakes refused by the gateway, by status (401 bad token, ...).
    pub handshakes_refused: Family<StatusLabel, Counter>,
    /// Handshakes that opened a session.
    pub handshakes: Counter,
    /// RETRY cookies sent.
    pub retries: Counter,
    /// Sessions that ended idle or at the end of their lifetime.
    pub sessions_expired: Counter,
    /// Devices that moved to another address and kept their session.
    pub migrations: Counter,
    /// Retried requests answered from the cache or ignored while in flight.
    pub duplicates: Counter,
    /// Pushes dropped unacknowledged (queue full, session ended).
    pub pushes_dropped: Counter,
    /// Transmits held back because the device's address is not validated and they would
    /// have sent it more bytes than it sent (SPEC §6).
    pub held_for_validation: Counter,
    /// Sessions now.
    pub sessions: Gauge,
    received: Counter,
    sent: Counter,
    protocol_errors: Counter,
    sessions_opened: Counter,
    sessions_refused: Counter,
    accept: Latency,
}

/// The `status` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// HTTP-style status.
    pub status: u16,
}

impl UdpMetrics {
    fn new(shared: &TransportMetrics) -> Self {
        let c = shared.counters(NAME);
        Self {
            refused: Family::default(),
            handshakes_refused: Family::default(),
            handshakes: Counter::default(),
            retries: Counter::default(),
            sessions_expired: Counter::default(),
            migrations: Counter::default(),
            duplicates: Counter::default(),
            pushes_dropped: Counter::default(),
            held_for_validation: Counter::default(),
            sessions: c.sessions_open(),
            received: c.messages_received(),
            sent: c.messages_sent(),
            protocol_errors: c.protocol_errors(),
            sessions_opened: c.sessions_opened(),
            sessions_refused: c.sessions_refused(),
            accept: c.request_accept(),
        }
    }

    fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Datagrams refused for `reason` so far.
    pub fn refused_for(&self, reason: &'static str) -> u64 {
        self.refused.get_or_create(&ReasonLabel { reason }).get()
    }

    fn register(&self, registry: &mut Registry) {
        let r = transport_registry(registry, NAME);
        r.register("udp_datagrams_refused", "Datagrams refused, by reason", self.refused.clone());
        r.register(
            "udp_handshakes_refused",
            "Handshakes the gateway refused, by status",
            self.handshakes_refused.clone(),
        );
        let counters = [
            ("udp_handshakes", "Handshakes that opened a session", &self.handshakes),
            ("udp_retries", "Stateless cookie retries sent", &self.retries),
            (
                "udp_sessions_expired",
                "Sessions ended idle or at their lifetime",
                &self.sessions_expired,
            ),
            ("udp_migrations", "Sessions that moved to a new device address", &self.migrations),
            (
                "udp_duplicates",
                "Retried requests answered from cache or in flight",
                &self.duplicates,
            ),
            ("udp_pushes_dropped", "Pushes dropped unacknowledged", &self.pushes_dropped),
            (
                "udp_held_for_validation",
                "Transmits held until the device's new address is validated",
                &self.held_for_validation,
            ),
        ];
        for (name, help, counter) in counters {
            r.register(name, help, counter.clone());
        }
    }
}

/// What a reader hands a session task.
enum Inbound {
    /// The reader read message 1; the task finishes the handshake.
    Start(Box<Start>),
    /// A data packet (or a retransmitted INIT) for the session.
    Datagram { from: SocketAddr, bytes: Bytes, at: Instant },
}

struct Start {
    hs: HandshakeState,
    device: u32,
    from: SocketAddr,
    init_len: usize,
    app_version: String,
    token: Option<String>,
    username: Option<String>,
    password: Option<Vec<u8>>,
}

/// Per-address handshake budget (a token bucket refilled per second).
struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Shared {
    config: UdpConfig,
    keys: KeyPair,
    cookie_secret: [u8; 32],
    metrics: Arc<UdpMetrics>,
    limits: Limits,
    sessions: AtomicUsize,
    handshaking: AtomicUsize,
    /// Handshakes per token in the current minute.
    token_uses: std::sync::Mutex<(u64, HashMap<String, u32>)>,
}

/// The FGU/1 transport.
pub struct UdpTransport {
    sockets: Vec<Arc<UdpSocket>>,
    shared: Arc<Shared>,
    key_error: Option<String>,
}

impl UdpTransport {
    /// The transport for `config`. The key file is read here; an unreadable one fails
    /// [`Transport::bind`] naming `transports.udp.private_key_path`.
    pub fn new(config: UdpConfig, metrics: &TransportMetrics) -> Self {
        let (keys, key_error) = match &config.private_key_path {
            Some(path) => match crate::keys::read(path) {
                Ok(k) => (k, None),
                Err(e) => (KeyPair::from_private([1; 32]), Some(e.to_string())),
            },
            None => match KeyPair::generate() {
                Ok(k) => {
                    tracing::warn!(public_key = %handshake::hex(&k.public), "private_key_path is not set: using a key generated for this run");
                    (k, None)
                }
                Err(e) => (KeyPair::from_private([1; 32]), Some(e.to_string())),
            },
        };
        Self::with_keys(config, keys, metrics, key_error)
    }

    /// The transport with this key pair (tests).
    pub fn with_key_pair(config: UdpConfig, keys: KeyPair, metrics: &TransportMetrics) -> Self {
        Self::with_keys(config, keys, metrics, None)
    }

    fn with_keys(
        config: UdpConfig,
        keys: KeyPair,
        metrics: &TransportMetrics,
        key_error: Option<String>,
    ) -> Self {
        let shared = Shared {
            limits: config.limits(),
            keys,
            cookie_secret: rand::random(),
            metrics: Arc::new(UdpMetrics::new(metrics)),
            sessions: AtomicUsize::new(0),
            handshaking: AtomicUsize::new(0),
            token_uses: std::sync::Mutex::new((0, HashMap::new())),
            config,
        };
        Self { sockets: Vec::new(), shared: Arc::new(shared), key_error }
    }

    /// The gateway's public key, which devices pin.
    pub fn public_key(&self) -> [u8; 32] {
        self.shared.keys.public
    }

    /// The transport's metrics.
    pub fn metrics(&self) -> Arc<UdpMetrics> {
        self.shared.metrics.clone()
    }
}

impl Transport for UdpTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn config_section(&self) -> &'static str {
        "transports.udp"
    }

    fn bind(&mut self) -> Result<(), BindError> {
        let config = &self.shared.config;
        if let Some(e) = &self.key_error {
            return Err(BindError {
                setting: "private_key_path".into(),
                addr: config.listen,
                source: std::io::Error::other(e.clone()),
            });
        }
        let sockets = net::bind_udp_per_core(config.listen, config.reuse_port)
            .map_err(|e| BindError::listen(self.config_section(), config.listen, e))?;
        self.sockets = sockets.into_iter().map(Arc::new).collect();
        Ok(())
    }

    fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets.first().and_then(|s| s.local_addr().ok()).into_iter().collect()
    }

    fn register_metrics(&self, registry: &mut Registry) {
        self.shared.metrics.register(registry);
    }

    fn serve(
        self: Box<Self>,
        handler: Arc<dyn KpHandler>,
        shutdown: Shutdown,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let n = self.sockets.len().max(1);
            let (forward_tx, forward_rx): (Vec<_>, Vec<_>) =
                (0..n).map(|_| mpsc::channel::<(SocketAddr, Bytes, Instant)>(1024)).unzip();
            let mut readers = JoinSet::new();
            for (i, (socket, forwarded)) in self.sockets.into_iter().zip(forward_rx).enumerate() {
                let reader = Reader {
                    index: i,
                    shards: n,
                    socket,
                    shared: self.shared.clone(),
                    handler: handler.clone(),
                    shutdown: shutdown.clone(),
                    sessions: PeerQueues::new(self.shared.config.peer_queue_capacity),
                    recent_inits: HashMap::new(),
                    buckets: HashMap::new(),
                    tasks: JoinSet::new(),
                    forward: forward_tx.clone(),
                    forwarded,
                };
                readers.spawn(reader.run().instrument(tracing::info_span!("udp", socket = i)));
            }
            drop(forward_tx);
            while readers.join_next().await.is_some() {}
        })
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn minute() -> u64 {
    now_ms() / 60_000
}

/// Reads one socket and hands datagrams to their sessions' tasks.
struct Reader {
    index: usize,
    shards: usize,
    socket: Arc<UdpSocket>,
    shared: Arc<Shared>,
    handler: Arc<dyn KpHandler>,
    shutdown: Shutdown,
    sessions: PeerQueues<u32, Inbound>,
    /// INITs being answered, by (address, device session id): a retransmitted INIT goes to the
    /// same task, which repeats its RESP.
    recent_inits: HashMap<(SocketAddr, u32), (u32, Instant)>,
    buckets: HashMap<IpAddr, Bucket>,
    tasks: JoinSet<()>,
    forward: Vec<mpsc::Sender<(SocketAddr, Bytes, Instant)>>,
    forwarded: mpsc::Receiver<(SocketAddr, Bytes, Instant)>,
}

impl Reader {
    async fn run(mut self) {
        let mut batch = ReceiveBatch::new();
        let mut sweep = tokio::time::interval(Duration::from_secs(5));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop_rx = self.shutdown.stop.clone();
        let stop = stopped(&mut stop_rx);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                ready = self.socket.readable() => {
                    if ready.is_err() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    let fd = self.socket.as_raw_fd();
                    match self.socket.try_io(tokio::io::Interest::READABLE, || batch.receive(fd)) {
                        Ok(()) => {
                            let at = Instant::now();
                            while let Some((from, bytes)) = batch.next_datagram() {
                                self.dispatch(from, bytes, at);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "receive failed");
                            if !matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset) {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    }
                }
                Some((from, bytes, at)) = self.forwarded.recv() => self.dispatch(from, bytes, at),
                _ = sweep.tick() => {
                    self.sessions.sweep();
                    let now = Instant::now();
                    self.recent_inits.retain(|_, (_, t)| now.duration_since(*t) < Duration::from_secs(30));
                    self.buckets.retain(|_, b| now.duration_since(b.at) < Duration::from_secs(10));
                    while self.tasks.try_join_next().is_some() {}
                }
                () = &mut stop => break,
            }
        }
        drop(self.sessions);
        while self.tasks.join_next().await.is_some() {}
    }

    fn dispatch(&mut self, from: SocketAddr, bytes: Bytes, at: Instant) {
        let metrics = &self.shared.metrics;
        let packet = match Packet::parse(&bytes) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(%from, error = %e, "malformed datagram");
                metrics.protocol_errors.inc();
                metrics.refuse("malformed");
                return;
            }
        };
        match packet {
            Packet::Data { receiver, .. } => {
                let owner = receiver as usize % self.shards;
                if owner != self.index {
                    if self.forward[owner].try_send((from, bytes, at)).is_err() {
                        metrics.refuse("queue_full");
                    }
                    return;
                }
                match self.sessions.route(&receiver, Inbound::Datagram { from, bytes, at }) {
                    Ok(()) => {}
                    Err(Routed::Full(_)) => metrics.refuse("queue_full"),
                    // Unknown, ended or expired: dropped without an answer (SPEC §7), so a
                    // forged hint can never end a live session.
                    Err(Routed::NoPeer(_)) => metrics.refuse("unknown_session"),
                }
            }
            Packet::Init { sender, cookie, noise } => {
                if let Some(&(id, _)) = self.recent_inits.get(&(from, sender)) {
                    match self
                        .sessions
                        .route(&id, Inbound::Datagram { from, bytes: bytes.clone(), at })
                    {
                        Ok(()) => return,
                        Err(Routed::Full(_)) => return metrics.refuse("queue_full"),
                        Err(Routed::NoPeer(_)) => {
                            self.recent_inits.remove(&(from, sender));
                        }
                    }
                }
                self.init(from, sender, cookie, noise, bytes.len());
            }
            // Gateway-bound traffic never carries these.
            Packet::Resp { .. } | Packet::Retry { .. } => {
                metrics.protocol_errors.inc();
                metrics.refuse("malformed");
            }
        }
    }

    /// Whether `ip` may start one more handshake without a cookie (`true`), and with one
    /// (`None`: not even with a cookie).
    fn budget(&mut self, ip: IpAddr) -> Option<bool> {
        let rate = f64::from(self.shared.config.handshakes_per_address_per_sec);
        let now = Instant::now();
        let b = self.buckets.entry(ip).or_insert(Bucket { tokens: 2.0 * rate, at: now });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(2.0 * rate);
        b.at = now;
        if b.tokens < 1.0 {
            return None;
        }
        b.tokens -= 1.0;
        Some(b.tokens >= rate)
    }

    fn init(
        &mut self,
        from: SocketAddr,
        sender: u32,
        cookie: Option<&[u8; 16]>,
        noise: &[u8],
        len: usize,
    ) {
        let shared = self.shared.clone();
        let metrics = &shared.metrics;
        metrics.received.inc();
        if len < MIN_INIT {
            metrics.refuse("amplification");
            return;
        }
        let Some(free) = self.budget(from.ip()) else {
            metrics.refuse("rate_limited");
            return;
        };
        let busy =
            shared.handshaking.load(Ordering::Relaxed) >= shared.config.max_handshakes_in_progress;
        let cookie_ok = cookie.is_some_and(|c| {
            handshake::cookie_valid(&shared.cookie_secret, from, sender, minute(), c)
        });
        if (busy || !free) && !cookie_ok {
            let c = handshake::cookie(&shared.cookie_secret, from, sender, minute());
            let retry = wire::retry_packet(sender, &c);
            metrics.retries.inc();
            // A RETRY is 21 bytes, far below MIN_INIT.
            let _ = self.socket.try_send_to(&retry, from);
            return;
        }
        let Ok(mut hs) = handshake::responder(&shared.keys, None) else { return };
        let mut payload = vec![0; noise.len()];
        let hello = match handshake::read_init(&mut hs, noise, &mut payload) {
            Ok(n) => {
                payload.truncate(n);
                Hello::parse(&payload)
            }
            Err(e) => {
                tracing::debug!(%from, error = %e, "handshake does not authenticate");
                metrics.refuse("handshake");
                return;
            }
        };
        let hello = match hello {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(%from, error = %e, "malformed hello");
                metrics.protocol_errors.inc();
                metrics.refuse("malformed");
                return;
            }
        };
        // A session id this reader owns: random high bits, this reader's index below.
        let id = loop {
            let r: u32 = rand::random();
            let id = r - r % self.shards as u32 + self.index as u32;
            if id != 0 && !self.sessions.contains(&id) {
                break id;
            }
        };
        let start = Start {
            hs,
            device: sender,
            from,
            init_len: len,
            app_version: hello.app_version.to_owned(),
            token: hello.token.map(str::to_owned),
            username: hello.username.map(str::to_owned),
            password: hello.password.map(<[u8]>::to_vec),
        };
        self.recent_inits.insert((from, sender), (id, Instant::now()));
        let inbound = self.sessions.insert(id, Inbound::Start(Box::new(start)));
        shared.handshaking.fetch_add(1, Ordering::Relaxed);
        let task = SessionTask {
            id,
            shared: self.shared.clone(),
            socket: self.socket.clone(),
            handler: self.handler.clone(),
            shutdown: self.shutdown.clone(),
        };
        self.tasks.spawn(task.run(inbound).instrument(tracing::debug_span!("udp_session", id)));
    }
}

struct SessionTask {
    id: u32,
    shared: Arc<Shared>,
    socket: Arc<UdpSocket>,
    handler: Arc<dyn KpHandler>,
    shutdown: Shutdown,
}

impl SessionTask {
    /// Checks the token's handshake budget for this minute.
    fn token_allowed(&self, token: &str) -> bool {
        let Ok(mut uses) = self.shared.token_uses.lock() else { return true };
        let m = minute();
        if uses.0 != m {
            *uses = (m, HashMap::new());
        }
        let n = uses.1.entry(token.to_owned()).or_insert(0);
        *n += 1;
        *n <= self.shared.config.handshakes_per_token_per_min
    }

    async fn send(&self, bytes: &[u8], to: SocketAddr) {
        if self.socket.send_to(bytes, to).await.is_ok() {
            self.shared.metrics.sent.inc();
        }
    }

    async fn refuse(&self, start: Start, error: &KpError) -> Option<Vec<u8>> {
        let metrics = &self.shared.metrics;
        metrics.sessions_refused.inc();
        metrics.handshakes_refused.get_or_create(&StatusLabel { status: error.status }).inc();
        let mut header = Vec::new();
        wire::put_resp_header(&mut header, start.device, 0);
        let welcome = Welcome::Refused { status: error.status, reason: &error.reason };
        let Ok((resp, _)) = handshake::write_resp(start.hs, header, &welcome) else { return None };
        if resp.len() > start.init_len {
            metrics.refuse("amplification");
            return None;
        }
        self.send(&resp, start.from).await;
        Some(resp)
    }

    /// Opens the gateway session and checks the token: the session's id and outbox, or the
    /// refusal.
    async fn authenticate(
        &self,
        start: &Start,
        outbox: fleetgate_transport_core::Outbox,
    ) -> Result<fleetgate_kp::SessionId, KpError> {
        if self.shared.sessions.load(Ordering::Relaxed) >= self.shared.config.max_sessions {
            return Err(KpError::unavailable("too many sessions"));
        }
        if let Some(token) = &start.token
            && !self.token_allowed(token)
        {
            return Err(KpError::new(429, "too many handshakes with this token"));
        }
        let credentials = ClientCredentials {
            transport: NAME,
            client_id: "",
            username: start.username.as_deref(),
            password: start.password.as_deref(),
            peer: start.from,
            certificate: None,
        };
        let identity = self.handler.open_session(credentials, outbox).await?;
        let session = identity.session;
        // The token is checked (16/ECAP) by subscribing to what extensions push for it, which
        // also lets pushes reach the device before its first request.
        if let Some(token) = &start.token {
            let mut checked = false;
            for ext in &self.shared.config.extension_aliases {
                let filter = format!("kp1/{}/{ext}/{token}/#", start.app_version);
                match self.handler.subscribe(session, &filter, SUBSCRIPTION_TAG).await {
                    Ok(()) => checked = true,
                    // An alias for an extension this gateway does not run.
                    Err(e) if e.status == 404 && !checked => {}
                    Err(e) if e.status == 404 => {}
                    Err(e) => {
                        self.handler.close_session(session);
                        return Err(e);
                    }
                }
            }
        }
        Ok(session)
    }

    async fn run(self, mut inbound: mpsc::Receiver<Inbound>) {
        let Some(Inbound::Start(start)) = inbound.recv().await else {
            self.shared.handshaking.fetch_sub(1, Ordering::Relaxed);
            return;
        };
        let start = *start;
        let (outbox, mut responses) = outbox(self.shared.config.response_queue_capacity);
        let authenticated = self.authenticate(&start, outbox).await;
        self.shared.handshaking.fetch_sub(1, Ordering::Relaxed);
        let metrics = self.shared.metrics.clone();
        let kp_session = match authenticated {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(status = e.status, reason = %e.reason, "handshake refused");
                let resp = self.refuse(start, &e).await;
                // Answer retransmitted INITs with the same refusal for a moment.
                let until = tokio::time::Instant::now() + Duration::from_secs(2);
                while let Ok(Some(Inbound::Datagram { from, bytes, .. })) =
                    tokio::time::timeout_at(until, inbound.recv()).await
                {
                    if let (Some(r), Ok(Packet::Init { .. })) = (&resp, Packet::parse(&bytes))
                        && r.len() <= bytes.len()
                    {
                        self.send(r, from).await;
                    }
                }
                return;
            }
        };
        let mut header = Vec::new();
        wire::put_resp_header(&mut header, start.device, self.id);
        let welcome_bytes = self.shared.config.welcome(now_ms());
        let Ok(welcome) = Welcome::parse(&welcome_bytes) else { return };
        let (resp, keys) = match handshake::write_resp(start.hs, header, &welcome) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot write the handshake answer");
                self.handler.close_session(kp_session);
                return;
            }
        };
        if resp.len() > start.init_len {
            metrics.refuse("amplification");
            self.handler.close_session(kp_session);
            return;
        }
        self.send(&resp, start.from).await;
        metrics.handshakes.inc();
        metrics.sessions_opened.inc();
        metrics.sessions.inc();
        self.shared.sessions.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut session = Session::new(
            NewSession {
                id: self.id,
                device: start.device,
                peer: start.from,
                app_version: start.app_version.into(),
                token: start.token.unwrap_or_default().into(),
                keys,
                aliases: self.shared.config.extension_aliases.clone().into(),
                limits: self.shared.limits.clone(),
            },
            now,
        );
        let end = self.serve(&mut session, &mut inbound, &mut responses, kp_session, &resp).await;
        if let Some(close) = end.and_then(|(code, reason)| session.close_packet(code, reason)) {
            self.send(&close, session.peer).await;
        }
        metrics.pushes_dropped.inc_by(session.pending_pushes() as u64);
        self.handler.close_session(kp_session);
        metrics.sessions.dec();
        self.shared.sessions.fetch_sub(1, Ordering::Relaxed);
    }

    /// The session's life after the handshake; returns the CLOSE to send, if any.
    async fn serve(
        &self,
        session: &mut Session,
        inbound: &mut mpsc::Receiver<Inbound>,
        responses: &mut fleetgate_transport_core::OutboxReceiver,
        kp_session: fleetgate_kp::SessionId,
        resp: &[u8],
    ) -> Option<(u16, &'static str)> {
        let metrics = self.shared.metrics.clone();
        let mut stop_rx = self.shutdown.stop.clone();
        let stop = stopped(&mut stop_rx);
        tokio::pin!(stop);
        let mut pushes_dropped = 0;
        let mut held = 0;
        loop {
            let deadline = tokio::time::Instant::from_std(session.poll_timeout());
            tokio::select! {
                item = inbound.recv() => {
                    let Some(Inbound::Datagram { from, bytes, at }) = item else { return None };
                    match Packet::parse(&bytes) {
                        Ok(Packet::Data { number, sealed, .. }) => {
                            match session.receive(number, sealed, bytes.len(), from, Instant::now()) {
                                Ok(got) => {
                                    metrics.received.inc();
                                    if got.moved {
                                        metrics.migrations.inc();
                                    }
                                    metrics.duplicates.inc_by(got.duplicates as u64);
                                    if let Some(e) = &got.malformed {
                                        tracing::debug!(error = %e, "malformed frames");
                                        metrics.protocol_errors.inc();
                                        metrics.refuse("malformed");
                                    }
                                    let draining = *self.shutdown.drain.borrow();
                                    for request in got.requests {
                                        let result = if draining {
                                            Err(KpError::unavailable("the gateway is shutting down"))
                                        } else {
                                            self.handler.handle(kp_session, request.clone()).await
                                        };
                                        metrics.accept.observe(at.elapsed());
                                        if let Err(e) = result {
                                            session.refused(&request, &e);
                                        }
                                    }
                                    if got.closed {
                                        self.flush(session).await;
                                        return None;
                                    }
                                }
                                Err(Refusal::Replay) => metrics.refuse("replay"),
                                Err(Refusal::Forged) => metrics.refuse("forged"),
                                Err(Refusal::Malformed(_)) => metrics.refuse("malformed"),
                            }
                        }
                        // The device did not get the RESP: repeat it (never larger than the INIT).
                        Ok(Packet::Init { .. }) if resp.len() <= bytes.len() => self.send(resp, from).await,
                        _ => metrics.refuse("malformed"),
                    }
                }
                response = responses.recv() => {
                    let Some(response) = response else { return Some((503, "session closed by the gateway")) };
                    session.respond(&response, Instant::now());
                    // Take whatever else is queued, so that it shares datagrams.
                    while let Ok(r) = responses.try_recv() {
                        session.respond(&r, Instant::now());
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    if session.expired(Instant::now()) {
                        metrics.sessions_expired.inc();
                        return None;
                    }
                }
                () = &mut stop => return Some((503, "the gateway is stopping")),
            }
            if session.pushes_dropped > pushes_dropped {
                metrics.pushes_dropped.inc_by(session.pushes_dropped - pushes_dropped);
                pushes_dropped = session.pushes_dropped;
            }
            self.flush(session).await;
            if session.held_for_validation > held {
                metrics.held_for_validation.inc_by(session.held_for_validation - held);
                held = session.held_for_validation;
            }
        }
    }

    async fn flush(&self, session: &mut Session) {
        while let Some(packet) = session.poll_transmit(Instant::now()) {
            self.send(&packet, session.peer).await;
        }
    }
}
