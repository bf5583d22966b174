//! One peer address: its CoAP state and its 1/KP session, owned by one task.
//!
//! The task takes datagrams from its reader's queue, answers, forwards requests to the
//! gateway, and turns the session's outbox (answers carrying the request's tag, pushes with
//! tag 0) into piggybacked, separate or non-confirmable responses and Observe notifications.
//! Timers (empty ACKs, retransmissions, cache expiry, the idle timeout) are deadlines it keeps
//! itself; it sleeps until the earliest.

use fleetgate_transport_core::stopped;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleetgate_transport_core::{
    ClientCredentials, KpError, KpHandler, KpOutcome, KpRequest, KpResponse, KpTopic, SessionId,
};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::codec::{
    BlockOption, Code, EncodeError, Header, Message, MessageType, MessageWriter, Token, option,
    write_empty,
};
use crate::server::{Shared, response_code};

/// RFC 7252 MAX_RETRANSMIT.
const MAX_RETRANSMIT: u8 = 4;
/// RFC 7641 §4.5: a notification is confirmable at least this often.
const CONFIRM_EVERY: Duration = Duration::from_secs(24 * 3600);
/// Observe sequence numbers are 24 bits (RFC 7641 §4.4).
const OBSERVE_MASK: u32 = 0xFF_FFFF;
/// Non-confirmable notifications remembered so that a RST to one cancels its observation.
const RECENT_NON: usize = 32;
/// Queued datagrams and answers a peer handles in a row before it looks at its timers again.
const READY_BUDGET: usize = 32;

/// One received datagram and when it arrived.
pub(crate) struct Datagram {
    pub bytes: Bytes,
    pub at: Instant,
}

/// How to answer a request directly.
#[derive(Clone, Copy)]
struct Reply {
    con: bool,
    mid: u16,
    token: Token,
}

/// Options a response may carry besides the code and payload.
#[derive(Default, Clone, Copy)]
struct Extra {
    observe: Option<u32>,
    max_age: Option<u32>,
    block2: Option<BlockOption>,
    block1: Option<BlockOption>,
    size2: Option<u32>,
    size1: Option<u32>,
}

/// What a remembered message id stands for.
enum Seen {
    /// Forwarded; its answer is awaited under this tag.
    Pending(u64),
    /// Answered (or acknowledged) with these bytes: a duplicate gets them again.
    Answered(Bytes),
    /// A non-confirmable request already handled: duplicates are dropped.
    Ignore,
}

struct SeenEntry {
    expires: Instant,
    seen: Seen,
}

/// A request awaiting its answer from the gateway.
struct Exchange {
    token: Token,
    /// The message id of a confirmable request not yet acknowledged: its answer can still be
    /// piggybacked.
    ack: Option<u16>,
    con: bool,
    success: Code,
    block1: Option<BlockOption>,
    /// An Observe registration: the answer is the first notification.
    observe: bool,
    created: Instant,
    /// The request's Uri-Path, joined: the key of a Block2 body.
    uri: Bytes,
    /// The block size exponent for a response that does not fit one block.
    block2_szx: u8,
}

/// A confirmable message of ours awaiting its ACK.
struct Outgoing {
    datagram: Bytes,
    retransmissions: u8,
    timeout: Duration,
    due: Instant,
    /// The observation this notification (or first response) belongs to.
    observation: Option<Token>,
}

struct Observation {
    /// The observed 1/KP path without request id: pushes whose `base` equals it are notified.
    path: Bytes,
    token: Token,
    con: bool,
    /// The registration was answered with success: notifications may flow.
    active: bool,
    /// The message id of the confirmable notification in flight.
    outstanding: Option<u16>,
    last_con: Instant,
    /// The registration's Uri-Path, joined: the key of a Block2 body.
    uri: Bytes,
    block2_szx: u8,
}

/// A response too large for one block (RFC 7959 §2.4), kept so that its later blocks can be
/// asked for with Block2.
struct Body {
    uri: Bytes,
    code: Code,
    payload: Bytes,
    expires: Instant,
}

struct Transfer {
    path: Bytes,
    buf: BytesMut,
    expires: Instant,
}

struct Session {
    id: SessionId,
    username: Option<String>,
    password: Option<Vec<u8>>,
}

/// Decrements the transport's peer count when a peer task ends, however it ends.
struct PeerSlot(Arc<Shared>);

impl Drop for PeerSlot {
    fn drop(&mut self) {
        self.0.peers.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.sessions_open.dec();
    }
}

pub(crate) struct Peer {
    handler: Arc<dyn KpHandler>,
    shared: Arc<Shared>,
    socket: Arc<UdpSocket>,
    addr: SocketAddr,
    session: Option<Session>,
    outbox: Option<fleetgate_transport_core::OutboxReceiver>,
    next_tag: u64,
    next_mid: u16,
    observe_seq: u32,
    rng: u64,
    dedup: HashMap<u16, SeenEntry, KeyedState>,
    dedup_order: VecDeque<(Instant, u16)>,
    exchanges: HashMap<u64, Exchange, KeyedState>,
    /// Confirmable requests by ACK deadline: when one passes unanswered, an empty ACK goes out.
    piggyback: VecDeque<(Instant, u64)>,
    outgoing: HashMap<u16, Outgoing, KeyedState>,
    retransmits: BinaryHeap<Reverse<(Instant, u16)>>,
    observations: Vec<Observation>,
    recent_non: VecDeque<(u16, Token)>,
    transfers: Vec<Transfer>,
    bodies: VecDeque<Body>,
    out: BytesMut,
    last_seen: Instant,
    _slot: PeerSlot,
}

/// Why a request is answered by the transport itself.
struct Refusal {
    code: Code,
    reason: std::borrow::Cow<'static, str>,
    extra: Extra,
}

impl Refusal {
    fn new(code: Code, reason: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        Self { code, reason: reason.into(), extra: Extra::default() }
    }
}

impl Peer {
    pub(crate) fn new(
        handler: Arc<dyn KpHandler>,
        shared: Arc<Shared>,
        socket: Arc<UdpSocket>,
        addr: SocketAddr,
    ) -> Self {
        shared.metrics.sessions_open.inc();
        let now = Instant::now();
        let mut rng = seed(addr);
        let next_mid = (xorshift(&mut rng) >> 48) as u16;
        let keyed = KeyedState(xorshift(&mut rng));
        Self {
            handler,
            socket,
            addr,
            session: None,
            outbox: None,
            next_tag: 0,
            next_mid,
            observe_seq: 1,
            rng,
            dedup: HashMap::with_hasher(keyed),
            dedup_order: VecDeque::new(),
            exchanges: HashMap::with_hasher(keyed),
            piggyback: VecDeque::new(),
            outgoing: HashMap::with_hasher(keyed),
            retransmits: BinaryHeap::new(),
            observations: Vec::new(),
            recent_non: VecDeque::new(),
            transfers: Vec::new(),
            bodies: VecDeque::new(),
            out: BytesMut::with_capacity(1024),
            last_seen: now,
            _slot: PeerSlot(shared.clone()),
            shared,
        }
    }

    pub(crate) async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Datagram>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let sleep = tokio::time::sleep_until(self.next_deadline());
        tokio::pin!(sleep);
        // Registered with the shutdown signal once for the task's life, not once per event.
        let stop = stopped(&mut shutdown);
        tokio::pin!(stop);
        loop {
            let now = Instant::now();
            self.fire_timers(now).await;
            if now >= self.last_seen + self.shared.idle_timeout {
                self.shared.metrics.sessions_expired.inc();
                tracing::debug!("idle: closing");
                break;
            }
            self.prune_piggyback();
            let next = self.next_deadline();
            // The timer is only moved earlier (or re-armed once it fired): most events push
            // the next deadline later (the idle timeout), and a timer that fires early merely
            // wakes the task once to re-arm it, which is cheaper than updating the timer wheel
            // on every datagram.
            if next < sleep.deadline() || sleep.is_elapsed() {
                sleep.as_mut().reset(next);
            }
            let outbox = async {
                match self.outbox.as_mut() {
                    Some(outbox) => outbox.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = &mut stop => {
                    self.drain_outbox().await;
                    break;
                }
                () = &mut sleep => {}
                // Answers before new requests: they free state, and a session whose outbox
                // fills is closed by the gateway.
                response = outbox => match response {
                    Some(response) => {
                        self.on_response(response).await;
                        self.take_ready(&mut inbound).await;
                    }
                    None => self.session_lost(),
                },
                datagram = inbound.recv() => match datagram {
                    Some(datagram) => {
                        self.on_datagram(datagram).await;
                        self.take_ready(&mut inbound).await;
                    }
                    None => break,
                },
            }
        }
        inbound.close();
        self.close();
    }

    fn close(&mut self) {
        if let Some(session) = self.session.take() {
            self.handler.close_session(session.id);
        }
        let metrics = &self.shared.metrics;
        for _ in self.observations.drain(..) {
            metrics.observations_open.dec();
        }
    }

    /// The gateway closed the session (it did not keep up, or ended it): forget everything
    /// that belonged to it; the next request opens a new one.
    fn session_lost(&mut self) {
        tracing::debug!("session closed by the gateway");
        self.outbox = None;
        self.session = None;
        self.exchanges.clear();
        let metrics = &self.shared.metrics;
        for _ in self.observations.drain(..) {
            metrics.observations_open.dec();
        }
    }

    /// Handles what is already queued (answers first), up to a budget, without going through
    /// the `select!` for each: a woken peer usually finds several. Stops as soon as a timer is
    /// due, so that, e.g., an answer that comes after `ack_timeout_ms` still goes out as a
    /// separate response after an empty ACK.
    async fn take_ready(&mut self, inbound: &mut mpsc::Receiver<Datagram>) {
        for _ in 0..READY_BUDGET {
            self.prune_piggyback();
            if self.next_deadline() <= Instant::now() {
                return;
            }
            if let Some(response) = self.outbox.as_mut().and_then(|o| o.try_recv().ok()) {
                self.on_response(response).await;
            } else if let Ok(datagram) = inbound.try_recv() {
                self.on_datagram(datagram).await;
            } else {
                return;
            }
        }
    }

    async fn drain_outbox(&mut self) {
        while let Some(response) = self.outbox.as_mut().and_then(|o| o.try_recv().ok()) {
            self.on_response(response).await;
        }
    }

    // ---- time ----

    /// Forgets the ACK deadlines at the front that no longer matter (the request was answered,
    /// or acknowledged), so that they neither wake the task nor pile up.
    fn prune_piggyback(&mut self) {
        while let Some(&(_, tag)) = self.piggyback.front() {
            if self.exchanges.get(&tag).is_some_and(|e| e.ack.is_some()) {
                break;
            }
            self.piggyback.pop_front();
        }
    }

    fn next_deadline(&self) -> Instant {
        let mut next = self.last_seen + self.shared.idle_timeout;
        let mut consider = |t: Instant| next = next.min(t);
        if let Some((t, _)) = self.piggyback.front() {
            consider(*t);
        }
        if let Some(Reverse((t, _))) = self.retransmits.peek() {
            consider(*t);
        }
        if let Some((t, _)) = self.dedup_order.front() {
            consider(*t);
        }
        for t in &self.transfers {
            consider(t.expires);
        }
        next
    }

    async fn fire_timers(&mut self, now: Instant) {
        while let Some(&(due, tag)) = self.piggyback.front() {
            if due > now {
                break;
            }
            self.piggyback.pop_front();
            if let Some(mid) = self.exchanges.get_mut(&tag).and_then(|e| e.ack.take()) {
                self.acknowledge_empty(mid).await;
            }
        }
        while let Some(&Reverse((due, mid))) = self.retransmits.peek() {
            if due > now {
                break;
            }
            self.retransmits.pop();
            self.retransmit(mid, due, now).await;
        }
        while let Some(&(expires, mid)) = self.dedup_order.front() {
            if expires > now {
                break;
            }
            self.dedup_order.pop_front();
            if self.dedup.get(&mid).is_some_and(|e| e.expires == expires) {
                self.dedup.remove(&mid);
            }
        }
        self.transfers.retain(|t| t.expires > now);
        self.bodies.retain(|b| b.expires > now);
    }

    async fn retransmit(&mut self, mid: u16, due: Instant, now: Instant) {
        let Some(out) = self.outgoing.get_mut(&mid) else { return };
        if out.due != due {
            return;
        }
        if out.retransmissions >= MAX_RETRANSMIT {
            let observation = out.observation;
            self.outgoing.remove(&mid);
            self.shared.metrics.retransmit_timeouts.inc();
            tracing::debug!(mid, "confirmable message never acknowledged");
            if let Some(token) = observation {
                // RFC 7641 §4.5: an observer that does not acknowledge is gone.
                self.remove_observation(&token);
            }
            return;
        }
        out.retransmissions += 1;
        out.timeout = out.timeout.saturating_mul(2);
        out.due = now + out.timeout;
        let (datagram, next) = (out.datagram.clone(), out.due);
        self.retransmits.push(Reverse((next, mid)));
        self.shared.metrics.retransmissions.inc();
        self.send(&datagram).await;
    }

    fn initial_timeout(&mut self) -> Duration {
        // ACK_TIMEOUT times a random factor in [1, ACK_RANDOM_FACTOR = 1.5].
        let ack = self.shared.ack_timeout;
        let jitter = (xorshift(&mut self.rng) >> 11) as f64 / (1u64 << 53) as f64;
        ack + ack.mul_f64(0.5 * jitter)
    }

    fn new_mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }

    fn next_observe(&mut self) -> u32 {
        self.observe_seq = (self.observe_seq + 1) & OBSERVE_MASK;
        self.observe_seq
    }

    // ---- inbound ----

    async fn on_datagram(&mut self, datagram: Datagram) {
        self.last_seen = datagram.at;
        let metrics = &self.shared.metrics;
        let header = Header::peek(&datagram.bytes);
        let msg = match Message::decode(datagram.bytes) {
            Ok(msg) => msg,
            Err(e) => {
                metrics.protocol_errors.inc();
                tracing::debug!(error = %e, "undecodable datagram");
                // RFC 7252 §4.2: a confirmable message with a format error is reset (one with
                // an unknown version is silently ignored: `peek` gives no header for it).
                if let Some(h) = header
                    && h.mtype == MessageType::Confirmable
                {
                    let mut out = BytesMut::with_capacity(4);
                    write_empty(&mut out, MessageType::Reset, h.message_id);
                    self.send(&out).await;
                }
                return;
            }
        };
        metrics.messages_received.inc();
        match msg.mtype() {
            MessageType::Acknowledgement | MessageType::Reset => self.on_ack(&msg),
            MessageType::Confirmable | MessageType::NonConfirmable => {
                let con = msg.mtype() == MessageType::Confirmable;
                if msg.code().is_request() {
                    self.on_request(msg, datagram.at).await;
                } else if con {
                    // A ping (Empty CON), or a response we never asked for: reset.
                    let mut out = BytesMut::with_capacity(4);
                    write_empty(&mut out, MessageType::Reset, msg.message_id());
                    self.send(&out).await;
                }
            }
        }
    }

    fn on_ack(&mut self, msg: &Message) {
        let mid = msg.message_id();
        let reset = msg.mtype() == MessageType::Reset;
        if reset {
            self.shared.metrics.resets_received.inc();
        }
        if let Some(out) = self.outgoing.remove(&mid) {
            if let Some(token) = out.observation {
                if let Some(obs) = self.observations.iter_mut().find(|o| o.token == token)
                    && obs.outstanding == Some(mid)
                {
                    obs.outstanding = None;
                }
                if reset {
                    // RFC 7641 §3.6: a RST to a notification cancels the observation.
                    self.remove_observation(&token);
                }
            }
            return;
        }
        if reset
            && let Some(i) = self.recent_non.iter().position(|(m, _)| *m == mid)
            && let Some((_, token)) = self.recent_non.remove(i)
        {
            self.remove_observation(&token);
        }
    }

    async fn on_request(&mut self, msg: Message, at: Instant) {
        let reply = Reply {
            con: msg.mtype() == MessageType::Confirmable,
            mid: msg.message_id(),
            token: msg.token(),
        };
        if let Some(entry) = self.dedup.get(&reply.mid) {
            self.shared.metrics.duplicates.inc();
            match &entry.seen {
                Seen::Answered(bytes) => {
                    let bytes = bytes.clone();
                    self.send(&bytes).await;
                }
                Seen::Pending(tag) if reply.con => {
                    // The client retransmits while the backend works: acknowledge now, answer
                    // separately later.
                    let tag = *tag;
                    if let Some(mid) = self.exchanges.get_mut(&tag).and_then(|e| e.ack.take()) {
                        self.acknowledge_empty(mid).await;
                    }
                }
                _ => {}
            }
            return;
        }
        self.remember(reply.mid, Seen::Ignore, at);
        if let Err(refusal) = self.serve(&msg, reply, at).await {
            tracing::debug!(code = %refusal.code, reason = %refusal.reason, "request refused");
            self.reply(reply, refusal.code, refusal.extra, refusal.reason.as_bytes()).await;
        }
    }

    /// Validates, reassembles and forwards one request. `Ok` when it was forwarded or already
    /// answered (2.31 Continue); a refusal is answered by the caller.
    async fn serve(&mut self, msg: &Message, reply: Reply, at: Instant) -> Result<(), Refusal> {
        let config = &self.shared.config;
        let known = *msg.known();
        let success = match msg.code() {
            Code::GET => Code::CONTENT,
            Code::POST | Code::PUT => Code::CHANGED,
            other => {
                return Err(Refusal::new(
                    Code::METHOD_NOT_ALLOWED,
                    format!("method {other} is not served; use POST, PUT or GET"),
                ));
            }
        };
        if known.proxy {
            return Err(Refusal::new(Code::PROXYING_NOT_SUPPORTED, "this is not a proxy"));
        }
        if let Some(number) = known.unrecognized_critical {
            return Err(Refusal::new(
                Code::BAD_OPTION,
                format!("critical option {number} is not supported or malformed"),
            ));
        }
        if known.conditional {
            return Err(Refusal::new(
                Code::BAD_OPTION,
                "If-Match and If-None-Match are not supported",
            ));
        }
        let max = config.max_payload_bytes;
        if known.block1.is_none() && msg.payload().len() > max {
            return Err(too_large(max));
        }
        if msg.uri_path().any(|segment| segment.contains(&b'/')) {
            return Err(Refusal::new(Code::NOT_FOUND, "a Uri-Path segment contains `/`"));
        }
        let mut path = BytesMut::new();
        msg.write_uri_path(&mut path);
        let path = path.freeze();
        let topic = KpTopic::parse(path.clone())
            .map_err(|e| Refusal::new(Code::NOT_FOUND, e.to_string()))?;
        let mut block2_szx = self.shared.block_szx;
        if let Some(block) = known.block2 {
            if block.szx == 7 {
                return Err(Refusal::new(Code::BAD_REQUEST, "BERT blocks are not used over UDP"));
            }
            if block.num > 0 {
                return self.later_block(&path, block, reply).await;
            }
            block2_szx = block2_szx.min(block.szx);
        }
        let mut payload = msg.payload().clone();
        let mut block1 = None;
        if let Some(block) = known.block1 {
            match self.block1(block, path.clone(), payload, known.size1, at)? {
                Some(whole) => {
                    payload = whole;
                    block1 = Some(BlockOption { more: false, ..block });
                }
                None => {
                    let ours = BlockOption { szx: block.szx.min(self.shared.block_szx), ..block };
                    let extra = Extra { block1: Some(ours), ..Extra::default() };
                    self.reply(reply, Code::CONTINUE, extra, b"").await;
                    return Ok(());
                }
            }
        }
        let session = self.ensure_session(msg).await?;
        let mut observe = false;
        if msg.code() == Code::GET {
            match known.observe {
                Some(0) => observe = self.register(topic.base(), path.clone(), block2_szx, reply),
                Some(1) => self.remove_observation(&reply.token),
                _ => {}
            }
        }
        let config = &self.shared.config;
        if self.exchanges.len() >= config.max_exchanges {
            let lifetime = self.shared.exchange_lifetime;
            self.exchanges.retain(|_, e| e.created + lifetime > at);
            if self.exchanges.len() >= config.max_exchanges {
                if observe {
                    self.remove_observation(&reply.token);
                }
                let mut refusal =
                    Refusal::new(Code::SERVICE_UNAVAILABLE, "too many requests in flight");
                refusal.extra.max_age = Some(1);
                return Err(refusal);
            }
        }
        self.next_tag += 1;
        let tag = self.next_tag;
        self.set_seen(reply.mid, Seen::Pending(tag));
        let request = KpRequest { topic, payload, tag, wants_answer: true };
        if let Err(e) = self.handler.handle(session, request).await {
            if observe {
                self.remove_observation(&reply.token);
            }
            let mut refusal = Refusal::new(response_code(e.status, success), e.reason);
            refusal.extra.block1 = block1;
            return Err(refusal);
        }
        let exchange = Exchange {
            token: reply.token,
            ack: reply.con.then_some(reply.mid),
            con: reply.con,
            success,
            block1,
            observe,
            created: at,
            uri: path,
            block2_szx,
        };
        self.exchanges.insert(tag, exchange);
        if reply.con {
            self.piggyback.push_back((at + self.shared.ack_timeout, tag));
        }
        Ok(())
    }

    /// Handles one Block1 block (RFC 7959 §2.5): `Ok(None)` when more are expected,
    /// `Ok(Some(payload))` with the whole payload after the last.
    fn block1(
        &mut self,
        block: BlockOption,
        path: Bytes,
        payload: Bytes,
        size1: Option<u32>,
        at: Instant,
    ) -> Result<Option<Bytes>, Refusal> {
        let max = self.shared.config.max_payload_bytes;
        if block.szx == 7 {
            return Err(Refusal::new(Code::BAD_REQUEST, "BERT blocks are not used over UDP"));
        }
        let size = block.size();
        if (block.more && payload.len() != size) || payload.len() > size {
            return Err(Refusal::new(Code::BAD_REQUEST, "block payload does not match its size"));
        }
        if block.num == 0 {
            self.transfers.retain(|t| t.path != path);
            if size1.is_some_and(|s| s as usize > max) {
                return Err(too_large(max));
            }
            if !block.more {
                return Ok(Some(payload));
            }
            if self.transfers.len() >= self.shared.config.max_block_transfers {
                let mut refusal =
                    Refusal::new(Code::SERVICE_UNAVAILABLE, "too many block-wise transfers");
                refusal.extra.max_age = Some(5);
                return Err(refusal);
            }
            self.transfers.push(Transfer {
                path: path.clone(),
                buf: BytesMut::with_capacity(size1.map_or(size * 2, |s| s as usize).min(max)),
                expires: at,
            });
        }
        let Some(i) = self.transfers.iter().position(|t| t.path == path) else {
            return Err(Refusal::new(
                Code::REQUEST_ENTITY_INCOMPLETE,
                "no block-wise transfer in progress for this path",
            ));
        };
        let offset = u64::from(block.num) * size as u64;
        let transfer = &mut self.transfers[i];
        if offset != transfer.buf.len() as u64 {
            self.transfers.remove(i);
            return Err(Refusal::new(Code::REQUEST_ENTITY_INCOMPLETE, "block out of order"));
        }
        if transfer.buf.len() + payload.len() > max {
            self.transfers.remove(i);
            return Err(too_large(max));
        }
        transfer.buf.extend_from_slice(&payload);
        transfer.expires = at + self.shared.block_timeout;
        if block.more {
            return Ok(None);
        }
        let whole = self.transfers.remove(i).buf.freeze();
        self.shared.metrics.block_transfers.inc();
        Ok(Some(whole))
    }

    /// The session to use, opened on the peer's first request with the Uri-Query credentials
    /// `u=` and `p=` (a stand-in until DTLS).
    async fn ensure_session(&mut self, msg: &Message) -> Result<SessionId, Refusal> {
        let mut username = None;
        let mut password = None;
        for arg in msg.uri_query() {
            if let Some(u) = arg.strip_prefix(b"u=") {
                let u = std::str::from_utf8(u)
                    .map_err(|_| Refusal::new(Code::BAD_REQUEST, "user name is not UTF-8"))?;
                username = Some(u);
            } else if let Some(p) = arg.strip_prefix(b"p=") {
                password = Some(p);
            }
        }
        if let Some(session) = &self.session {
            let differs = username.is_some_and(|u| session.username.as_deref() != Some(u))
                || password.is_some_and(|p| session.password.as_deref() != Some(p));
            if differs {
                return Err(Refusal::new(
                    Code::UNAUTHORIZED,
                    "this peer's session was opened with other credentials",
                ));
            }
            return Ok(session.id);
        }
        let (outbox, responses) =
            fleetgate_transport_core::outbox(self.shared.config.response_queue_capacity);
        let credentials = ClientCredentials {
            transport: "coap",
            client_id: "",
            username,
            password,
            peer: self.addr,
        };
        match self.handler.open_session(credentials, outbox).await {
            Ok(identity) => {
                self.shared.metrics.sessions_opened.inc();
                tracing::debug!(session = identity.session.0, "session opened");
                self.session = Some(Session {
                    id: identity.session,
                    username: username.map(str::to_owned),
                    password: password.map(<[u8]>::to_vec),
                });
                self.outbox = Some(responses);
                Ok(identity.session)
            }
            Err(e) => {
                self.shared.metrics.sessions_refused.inc();
                tracing::debug!(status = e.status, reason = %e.reason, "session refused");
                Err(Refusal::new(response_code(e.status, Code::CHANGED), e.reason))
            }
        }
    }

    /// Registers (or re-registers, same token) an observation; false when the peer observes too
    /// many resources already and the GET is served plainly.
    fn register(&mut self, path: Bytes, uri: Bytes, block2_szx: u8, reply: Reply) -> bool {
        let observation = Observation {
            path,
            token: reply.token,
            con: reply.con,
            active: false,
            outstanding: None,
            last_con: Instant::now(),
            uri,
            block2_szx,
        };
        if let Some(obs) = self.observations.iter_mut().find(|o| o.token == reply.token) {
            if let Some(mid) = obs.outstanding.take() {
                self.outgoing.remove(&mid);
            }
            *obs = observation;
            return true;
        }
        if self.observations.len() >= self.shared.config.max_observations {
            return false;
        }
        self.observations.push(observation);
        self.shared.metrics.observations_open.inc();
        true
    }

    fn remove_observation(&mut self, token: &Token) {
        if let Some(i) = self.observations.iter().position(|o| o.token == *token) {
            let obs = self.observations.swap_remove(i);
            if let Some(mid) = obs.outstanding {
                self.outgoing.remove(&mid);
            }
            self.shared.metrics.observations_open.dec();
        }
    }

    // ---- outbound ----

    /// A response payload larger than one block goes out as its first block with Block2 and
    /// Size2 (RFC 7959 §2.4); the whole body is kept for the requests that fetch the rest.
    fn first_block(
        &mut self,
        uri: &Bytes,
        code: Code,
        payload: Bytes,
        szx: u8,
        extra: &mut Extra,
    ) -> Bytes {
        let size = 16usize << szx.min(6);
        if payload.len() <= size {
            return payload;
        }
        extra.block2 = Some(BlockOption { num: 0, more: true, szx: szx.min(6) });
        extra.size2 = u32::try_from(payload.len()).ok();
        self.bodies.retain(|b| b.uri != *uri);
        if self.bodies.len() >= self.shared.config.max_block_transfers.max(1) {
            self.bodies.pop_front();
        }
        let first = payload.slice(..size);
        let expires = Instant::now() + self.shared.block_timeout;
        self.bodies.push_back(Body { uri: uri.clone(), code, payload, expires });
        first
    }

    /// Serves block `block.num` of a kept response body, without asking the backend again.
    async fn later_block(
        &mut self,
        uri: &Bytes,
        block: BlockOption,
        reply: Reply,
    ) -> Result<(), Refusal> {
        let Some(body) = self.bodies.iter_mut().find(|b| b.uri == *uri) else {
            return Err(Refusal::new(
                Code::REQUEST_ENTITY_INCOMPLETE,
                "no response body is kept for this path; ask again from block 0",
            ));
        };
        let size = block.size() as u64;
        let len = body.payload.len() as u64;
        let offset = u64::from(block.num) * size;
        if offset >= len {
            return Err(Refusal::new(Code::BAD_OPTION, "Block2 number past the end of the body"));
        }
        let end = (offset + size).min(len);
        body.expires = Instant::now() + self.shared.block_timeout;
        let (code, part) = (body.code, body.payload.slice(offset as usize..end as usize));
        let extra =
            Extra { block2: Some(BlockOption { more: end < len, ..block }), ..Extra::default() };
        self.reply(reply, code, extra, &part).await;
        Ok(())
    }

    async fn on_response(&mut self, response: KpResponse) {
        if response.tag != 0
            && let Some(exchange) = self.exchanges.remove(&response.tag)
        {
            self.answer(exchange, response.outcome).await;
        } else {
            self.notify(response).await;
        }
    }

    async fn answer(&mut self, exchange: Exchange, outcome: KpOutcome) {
        let (code, payload) = outcome_parts(&outcome, exchange.success);
        let mut extra = Extra { block1: exchange.block1, ..Extra::default() };
        let payload =
            self.first_block(&exchange.uri, code, payload, exchange.block2_szx, &mut extra);
        if exchange.observe {
            let active =
                code.class() == 2 && self.observations.iter().any(|o| o.token == exchange.token);
            if active {
                extra.observe = Some(self.next_observe());
                extra.max_age = Some(self.shared.config.observe_max_age_secs);
                if let Some(obs) = self.observations.iter_mut().find(|o| o.token == exchange.token)
                {
                    obs.active = true;
                }
            } else {
                self.remove_observation(&exchange.token);
            }
        }
        let observation = exchange.observe.then_some(exchange.token);
        match (exchange.ack, exchange.con) {
            (Some(mid), _) => {
                let token = exchange.token;
                let Some(bytes) =
                    self.encode(MessageType::Acknowledgement, code, mid, &token, extra, &payload)
                else {
                    return;
                };
                if let Some(entry) = self.dedup.get_mut(&mid)
                    && matches!(entry.seen, Seen::Pending(_))
                {
                    entry.seen = Seen::Answered(bytes.clone());
                }
                self.send_counted(&bytes).await;
            }
            (None, confirmable) => {
                // A separate response: CON for a CON request (tracked until ACKed), else NON.
                let kind = if confirmable {
                    MessageType::Confirmable
                } else {
                    MessageType::NonConfirmable
                };
                let mid = self.new_mid();
                let Some(bytes) = self.encode(kind, code, mid, &exchange.token, extra, &payload)
                else {
                    return;
                };
                if confirmable {
                    self.track(mid, bytes.clone(), observation, None);
                }
                self.send_counted(&bytes).await;
            }
        }
    }

    /// Sends a push to the observers of its path (RFC 7641 §4.2).
    async fn notify(&mut self, push: KpResponse) {
        let matching: Vec<Token> = self
            .observations
            .iter()
            .filter(|o| o.active && o.path == push.base)
            .map(|o| o.token)
            .collect();
        if matching.is_empty() {
            self.shared.metrics.pushes_unobserved.inc();
            tracing::debug!(base = %String::from_utf8_lossy(&push.base), "push for a path nobody observes dropped");
            return;
        }
        let (code, payload) = outcome_parts(&push.outcome, Code::CONTENT);
        // A notification with an error code ends the observation (RFC 7641 §4.2).
        let ends = code.class() != 2;
        let now = Instant::now();
        for token in matching {
            let seq = self.next_observe();
            let mid = self.new_mid();
            let Some(obs) = self.observations.iter_mut().find(|o| o.token == token) else {
                continue;
            };
            let con = obs.con || now.duration_since(obs.last_con) >= CONFIRM_EVERY;
            let (uri, szx) = (obs.uri.clone(), obs.block2_szx);
            let previous = obs.outstanding.take();
            if con {
                obs.outstanding = Some(mid);
                obs.last_con = now;
            }
            let mut extra = Extra {
                observe: (!ends).then_some(seq),
                max_age: Some(self.shared.config.observe_max_age_secs),
                ..Extra::default()
            };
            let block = self.first_block(&uri, code, payload.clone(), szx, &mut extra);
            let mtype = if con { MessageType::Confirmable } else { MessageType::NonConfirmable };
            let Some(bytes) = self.encode(mtype, code, mid, &token, extra, &block) else {
                continue;
            };
            if con {
                // RFC 7641 §4.5.2: a newer notification takes over the one in flight, with its
                // retransmission state.
                let inherited = previous.and_then(|old| self.outgoing.remove(&old));
                self.track(mid, bytes.clone(), Some(token), inherited);
            } else {
                if self.recent_non.len() >= RECENT_NON {
                    self.recent_non.pop_front();
                }
                self.recent_non.push_back((mid, token));
            }
            self.shared.metrics.notifications.inc();
            self.send_counted(&bytes).await;
            if ends {
                self.remove_observation(&token);
            }
        }
    }

    /// Starts retransmitting a confirmable message until it is acknowledged.
    fn track(
        &mut self,
        mid: u16,
        datagram: Bytes,
        observation: Option<Token>,
        inherited: Option<Outgoing>,
    ) {
        let (retransmissions, timeout, due) = match inherited {
            Some(old) => (old.retransmissions, old.timeout, old.due),
            None => {
                let timeout = self.initial_timeout();
                (0, timeout, Instant::now() + timeout)
            }
        };
        self.outgoing
            .insert(mid, Outgoing { datagram, retransmissions, timeout, due, observation });
        self.retransmits.push(Reverse((due, mid)));
    }

    /// Acknowledges a confirmable request whose answer is late; the answer follows separately.
    async fn acknowledge_empty(&mut self, mid: u16) {
        let mut out = BytesMut::with_capacity(4);
        write_empty(&mut out, MessageType::Acknowledgement, mid);
        let bytes = out.freeze();
        if let Some(entry) = self.dedup.get_mut(&mid) {
            entry.seen = Seen::Answered(bytes.clone());
        }
        self.shared.metrics.separate_responses.inc();
        self.send(&bytes).await;
    }

    /// Answers a request directly: a piggybacked ACK for CON (remembered for duplicates), a NON
    /// response for NON.
    async fn reply(&mut self, reply: Reply, code: Code, extra: Extra, payload: &[u8]) {
        let (mtype, mid) = match reply.con {
            true => (MessageType::Acknowledgement, reply.mid),
            false => (MessageType::NonConfirmable, self.new_mid()),
        };
        let Some(bytes) = self.encode(mtype, code, mid, &reply.token, extra, payload) else {
            return;
        };
        if reply.con {
            self.set_seen(reply.mid, Seen::Answered(bytes.clone()));
        }
        self.send_counted(&bytes).await;
    }

    fn encode(
        &mut self,
        mtype: MessageType,
        code: Code,
        mid: u16,
        token: &Token,
        extra: Extra,
        payload: &[u8],
    ) -> Option<Bytes> {
        let written = (|| -> Result<(), EncodeError> {
            let mut w = MessageWriter::new(&mut self.out, mtype, code, mid, token.as_slice())?;
            if let Some(seq) = extra.observe {
                w.uint_option(option::OBSERVE, seq)?;
            }
            if let Some(age) = extra.max_age {
                w.uint_option(option::MAX_AGE, age)?;
            }
            if let Some(block) = extra.block2 {
                w.block_option(option::BLOCK2, block)?;
            }
            if let Some(block) = extra.block1 {
                w.block_option(option::BLOCK1, block)?;
            }
            if let Some(size) = extra.size2 {
                w.uint_option(option::SIZE2, size)?;
            }
            if let Some(size) = extra.size1 {
                w.uint_option(option::SIZE1, size)?;
            }
            w.payload(payload);
            Ok(())
        })();
        let bytes = self.out.split().freeze();
        match written {
            Ok(()) => Some(bytes),
            Err(e) => {
                tracing::error!(error = %e, "bug: cannot encode a response");
                None
            }
        }
    }

    async fn send_counted(&mut self, bytes: &[u8]) {
        self.shared.metrics.messages_sent.inc();
        self.send(bytes).await;
    }

    async fn send(&self, bytes: &[u8]) {
        if let Err(e) = self.socket.send_to(bytes, self.addr).await {
            tracing::debug!(error = %e, "send failed");
        }
    }

    // ---- deduplication ----

    /// Remembers a new message id for the exchange lifetime, forgetting the oldest when full.
    fn remember(&mut self, mid: u16, seen: Seen, at: Instant) {
        let max = self.shared.config.max_exchanges.max(1);
        while self.dedup.len() >= max {
            let Some((_, old)) = self.dedup_order.pop_front() else { break };
            self.dedup.remove(&old);
        }
        let expires = at + self.shared.exchange_lifetime;
        self.dedup.insert(mid, SeenEntry { expires, seen });
        self.dedup_order.push_back((expires, mid));
    }

    fn set_seen(&mut self, mid: u16, seen: Seen) {
        if let Some(entry) = self.dedup.get_mut(&mid) {
            entry.seen = seen;
        }
    }
}

fn too_large(max: usize) -> Refusal {
    let mut refusal =
        Refusal::new(Code::REQUEST_ENTITY_TOO_LARGE, format!("payload larger than {max} bytes"));
    refusal.extra.size1 = Some(u32::try_from(max).unwrap_or(u32::MAX));
    refusal
}

/// The response code and payload of an outcome: the extension's payload on success, the reason
/// phrase as diagnostic payload on error.
fn outcome_parts(outcome: &KpOutcome, success: Code) -> (Code, Bytes) {
    match outcome {
        KpOutcome::Success(payload) => (success, payload.clone()),
        KpOutcome::Error(KpError { status, reason }) => {
            (response_code(*status, success), Bytes::copy_from_slice(reason.as_bytes()))
        }
    }
}

/// A cheap keyed hash for the integer keys of a peer's tables (message ids the peer chooses,
/// tags and message ids we choose), instead of SipHash: a multiply-xorshift of the key mixed
/// with a per-peer random secret, so a peer cannot aim its message ids at collisions (and the
/// tables are bounded by `max_exchanges` anyway).
#[derive(Clone, Copy)]
struct KeyedState(u64);

impl std::hash::BuildHasher for KeyedState {
    type Hasher = KeyedHasher;

    fn build_hasher(&self) -> KeyedHasher {
        KeyedHasher(self.0)
    }
}

struct KeyedHasher(u64);

impl std::hash::Hasher for KeyedHasher {
    fn finish(&self) -> u64 {
        let x = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^ (x >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01B3);
        }
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0xD6E8_FEB8_6659_FD93).rotate_left(29);
    }
}

fn seed(addr: SocketAddr) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    addr.hash(&mut h);
    std::time::SystemTime::now().hash(&mut h);
    h.finish() | 1
}

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}
