//! The sans-IO state machine of one CoAP peer: its message layer (deduplication, piggybacked
//! and separate responses, retransmission of confirmable messages), Observe, block-wise
//! transfers, the idle timeout, and the 1/KP session it speaks for.
//!
//! In the style of quinn-proto's `Connection`: datagrams, time and the gateway's answers go in
//! as values ([`PeerSession::handle_datagram`], [`PeerSession::handle_timeout`],
//! [`PeerSession::on_response`]); datagrams to send to the peer
//! ([`PeerSession::poll_transmit`]), what needs the gateway ([`PeerSession::poll_event`]) and
//! the next deadline ([`PeerSession::poll_timeout`]) come out. After any call that puts
//! something in, the caller sends every transmit, handles every event and sleeps until the new
//! deadline, then calls [`PeerSession::handle_timeout`].
//!
//! The gateway's side: the peer's first request asks for the 1/KP session
//! ([`Event::OpenSession`], answered with [`PeerSession::session_opened`]); requests that
//! arrive meanwhile wait for it, counted against [`Settings::max_exchanges`]. Each request is
//! an [`Event::Request`] whose `tag` comes back twice, in any order and with several requests
//! in flight: the gateway's acceptance or refusal ([`PeerSession::request_done`]) and its
//! answer ([`PeerSession::on_response`], where pushes carry tag 0). When the peer idles out or
//! is closed, [`Event::CloseSession`] ends the 1/KP session.
//!
//! Nothing here reads a clock, touches a socket, awaits, logs or updates a metric: randomness
//! (message ids, the retransmission jitter, the table hash keys) comes from the seed given to
//! [`PeerSession::new`], counts accumulate in [`Stats`] for the caller to collect
//! ([`PeerSession::take_stats`]), and what is worth a log line comes out as
//! [`Event::Diagnostic`]. It does not know the peer's address, and it does not answer pings
//! from peers without state or refuse peers over the transport's limit: the reader in
//! [`crate::server`] does, without a session. What a device sees is described there.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fleetgate_kp::{ClientIdentity, KpError, KpOutcome, KpRequest, KpResponse, SessionId};

use crate::codec::{
    BlockOption, Code, DecodeError, EncodeError, Header, Message, MessageType, Token,
};

mod budget;
mod inbound;
mod keyed;
mod outbound;
#[cfg(test)]
mod tests;

pub use budget::Block1Budget;
use budget::Reservation;
use keyed::{KeyedState, splitmix64, xorshift};

/// RFC 7252 MAX_RETRANSMIT.
const MAX_RETRANSMIT: u8 = 4;
/// RFC 7641 §4.5: a notification is confirmable at least this often.
const CONFIRM_EVERY: Duration = Duration::from_secs(24 * 3600);
/// Observe sequence numbers are 24 bits (RFC 7641 §4.4).
const OBSERVE_MASK: u32 = 0xFF_FFFF;
/// Non-confirmable notifications remembered so that a RST to one cancels its observation.
const RECENT_NON: usize = 32;
/// A deadline that would overflow an `Instant` (a configured duration of centuries) is this far
/// away instead.
const FAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// What a session needs of the transport's configuration. [`crate::CoapConfig`] explains each
/// setting as a device sees it; the transport derives these from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// RFC 7252 ACK_TIMEOUT: how long an answer may take to be piggybacked on the ACK, and the
    /// initial retransmission timeout (times a random factor of 1 to 1.5).
    pub ack_timeout: Duration,
    /// RFC 7252 EXCHANGE_LIFETIME: how long a request's message id is remembered.
    pub exchange_lifetime: Duration,
    /// Message ids remembered, and requests awaiting their answer or the session, at once.
    pub max_exchanges: usize,
    /// Largest request payload, whole or reassembled from Block1 blocks.
    pub max_payload_bytes: usize,
    /// Block size asked of Block1 clients and used for Block2 answers (16 to 1024, rounded down
    /// to a power of two).
    pub block_size_bytes: usize,
    /// Block1 transfers in progress, and Block2 bodies kept, at once.
    pub max_block_transfers: usize,
    /// How long a Block1 transfer or a kept Block2 body lasts with no block asked for.
    pub block_transfer_timeout: Duration,
    /// A peer that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Resources observed at once.
    pub max_observations: usize,
    /// Max-Age of notifications, in seconds.
    pub observe_max_age_secs: u32,
}

impl Default for Settings {
    /// The defaults of [`crate::CoapConfig`].
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(2),
            exchange_lifetime: Duration::from_secs(247),
            max_exchanges: 1_024,
            max_payload_bytes: 64 * 1024,
            block_size_bytes: 1_024,
            max_block_transfers: 4,
            block_transfer_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(300),
            max_observations: 8,
            observe_max_age_secs: 60,
        }
    }
}

/// Counts of what happened since the last [`PeerSession::take_stats`], for the transport's
/// metrics (see [`crate::CoapMetrics`] for what each one counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams that decoded as CoAP messages.
    pub messages_received: u64,
    /// Responses and notifications sent (not empty ACKs, resets or retransmissions).
    pub messages_sent: u64,
    /// Datagrams that are not CoAP messages.
    pub protocol_errors: u64,
    /// Retransmitted requests recognised by their message id.
    pub duplicates: u64,
    /// Empty ACKs sent because an answer took longer than the ACK timeout.
    pub separate_responses: u64,
    /// Confirmable responses and notifications retransmitted.
    pub retransmissions: u64,
    /// Confirmable responses and notifications given up after the last retransmission.
    pub retransmit_timeouts: u64,
    /// Resets received.
    pub resets_received: u64,
    /// Notifications sent.
    pub notifications: u64,
    /// Pushes for a resource the peer does not observe, dropped.
    pub pushes_unobserved: u64,
    /// Block1 transfers completed.
    pub block_transfers: u64,
    /// 1/KP sessions opened.
    pub sessions_opened: u64,
    /// 1/KP sessions refused by the gateway.
    pub sessions_refused: u64,
    /// Times the peer was closed for idling (0 or 1).
    pub sessions_expired: u64,
    /// Answers to a peer without a proven token sent without their payload and options, because
    /// they would have been larger than the request (no reflection amplification).
    pub replies_trimmed: u64,
    /// Block1 blocks from a peer without a proven token refused because the transport's budget
    /// for such transfers was spent.
    pub block1_budget_refusals: u64,
    /// Times the peer proved a token (0 or 1): the gateway accepted one of its requests.
    pub proven: u64,
    /// Observations registered.
    pub observations_registered: u64,
    /// Observations ended (cancelled, given up, or dropped with the session).
    pub observations_ended: u64,
}

/// What the session needs from the gateway, or reports.
#[derive(Debug)]
pub enum Event {
    /// Open the peer's 1/KP session with these credentials (Uri-Query `u=` and `p=` of its
    /// first request), then call [`PeerSession::session_opened`] with the result.
    OpenSession {
        /// The user name, if the request carried one.
        username: Option<String>,
        /// The password, if the request carried one.
        password: Option<Vec<u8>>,
    },
    /// Hand `request` to the gateway for `session`, then call [`PeerSession::request_done`]
    /// with `request.tag` and the result; the answer comes back to
    /// [`PeerSession::on_response`] with the same tag.
    Request {
        /// The session the request belongs to.
        session: SessionId,
        /// The request; its `tag` names the exchange.
        request: KpRequest,
    },
    /// The session has ended (the peer idled out or was closed, or the gateway opened one
    /// that is no longer wanted): tell the gateway.
    CloseSession(SessionId),
    /// Something worth a debug log line; nothing to do about it.
    Diagnostic(Diagnostic),
}

/// Facts worth a log line (see [`Event::Diagnostic`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Diagnostic {
    /// The peer sent a datagram that is not a CoAP message.
    Undecodable(DecodeError),
    /// The transport refused a request itself, with this code and diagnostic payload.
    Refused {
        /// The response code.
        code: Code,
        /// The reason, sent as diagnostic payload.
        reason: Cow<'static, str>,
    },
    /// A confirmable response or notification was never acknowledged and is given up.
    GaveUp {
        /// Its message id.
        message_id: u16,
    },
    /// A push for a 1/KP path the peer does not observe was dropped.
    PushUnobserved {
        /// The push's path.
        base: Bytes,
    },
    /// A response could not be encoded: a bug in this crate.
    EncodeFailed(EncodeError),
}

/// The CoAP response code for an HTTP status (DESIGN decision 3): 2xx gives `success` (2.04
/// Changed for POST and PUT, 2.05 Content for GET and notifications), 400, 401, 403, 404, 413,
/// 429, 503 and 504 their CoAP twins, any other 4xx 4.00, anything else 5.00.
pub fn response_code(status: u16, success: Code) -> Code {
    match status {
        200..=299 => success,
        400 => Code::BAD_REQUEST,
        401 => Code::UNAUTHORIZED,
        403 => Code::FORBIDDEN,
        404 => Code::NOT_FOUND,
        413 => Code::REQUEST_ENTITY_TOO_LARGE,
        429 => Code::TOO_MANY_REQUESTS,
        503 => Code::SERVICE_UNAVAILABLE,
        504 => Code::GATEWAY_TIMEOUT,
        402..=499 => Code::BAD_REQUEST,
        _ => Code::INTERNAL_SERVER_ERROR,
    }
}

/// How to answer a request directly.
#[derive(Clone, Copy)]
struct Reply {
    con: bool,
    mid: u16,
    token: Token,
    /// The request's size in bytes: the most an answer to an unproven peer may take.
    len: usize,
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
    /// The peer is not proven: a response larger than this goes out bare (code and token).
    limit: Option<usize>,
}

/// What a remembered message id stands for.
enum Seen {
    /// Forwarded (or waiting for the session); its answer is awaited under this tag.
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
    /// The request's size in bytes (see [`Reply::len`]).
    request_len: usize,
    /// Set while the request waits for the session to open (boxed: rare, and it keeps the
    /// table of exchanges small).
    waiting: Option<Box<Waiting>>,
}

/// A request kept until the session it needs is open.
struct Waiting {
    request: KpRequest,
    credentials: Credentials,
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

/// A Block1 request being reassembled.
struct Transfer {
    path: Bytes,
    /// Grows as blocks arrive; never sized from a declared Size1.
    buf: BytesMut,
    expires: Instant,
    /// What the transfer holds of the unproven peers' budget, while the peer is unproven.
    reserved: Option<Reservation>,
}

/// Uri-Query credentials, owned (kept with the session, or with a request that waits for it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Credentials {
    username: Option<String>,
    password: Option<Vec<u8>>,
}

impl Credentials {
    fn new(username: Option<&str>, password: Option<&[u8]>) -> Self {
        Self { username: username.map(str::to_owned), password: password.map(<[u8]>::to_vec) }
    }

    /// Whether a request presenting `username` and `password` may use a session opened with
    /// these: a request need not repeat them, but may not present others.
    fn admits(&self, username: Option<&str>, password: Option<&[u8]>) -> bool {
        !(username.is_some_and(|u| self.username.as_deref() != Some(u))
            || password.is_some_and(|p| self.password.as_deref() != Some(p)))
    }
}

/// The peer's 1/KP session.
enum Kp {
    /// None yet (or it was refused or lost): the next request asks for one.
    None,
    /// Asked for with these credentials; requests wait for [`PeerSession::session_opened`].
    Opening(Credentials),
    /// Open.
    Open { id: SessionId, credentials: Credentials },
}

/// One CoAP peer's state and its 1/KP session (see the module docs).
pub struct PeerSession {
    settings: Arc<Settings>,
    /// The block size exponent of [`Settings::block_size_bytes`].
    block_szx: u8,
    kp: Kp,
    /// The gateway has accepted a request of this peer (its token is good). Until then answers
    /// are no larger than their requests, at most one confirmable message is retransmitted,
    /// and Block1 buffers come out of [`PeerSession::set_block1_budget`]'s budget.
    proven: bool,
    /// An unproven peer had its one retransmission burst.
    burst_used: bool,
    /// The budget of Block1 bytes while unproven; `None`: no limit beyond the per-peer ones.
    budget: Option<Arc<Block1Budget>>,
    /// Tags of exchanges waiting for the session, oldest first.
    waiting: VecDeque<u64>,
    closed: bool,
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
    /// Where responses are encoded; each is split off as `Bytes`.
    out: BytesMut,
    last_seen: Instant,
    transmits: VecDeque<Bytes>,
    events: VecDeque<Event>,
    stats: Stats,
}

/// `t + d`, or [`FAR`] after `t` when that overflows.
fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).or_else(|| t.checked_add(FAR)).unwrap_or(t)
}

impl PeerSession {
    /// The settings the session was made with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// A peer with no state yet, first heard at `now`; `settings` are shared by every peer of
    /// a transport. `seed` drives every random choice (message ids, retransmission jitter, hash
    /// keys): the same seed and inputs give the same outputs.
    pub fn new(settings: Arc<Settings>, seed: u64, now: Instant) -> Self {
        // xorshift needs a state other than zero; splitmix64 spreads small seeds.
        let mut rng = splitmix64(seed).max(1);
        let next_mid = (xorshift(&mut rng) >> 48) as u16;
        let keyed = KeyedState(xorshift(&mut rng));
        Self {
            block_szx: BlockOption::szx_for(settings.block_size_bytes),
            settings,
            kp: Kp::None,
            proven: false,
            burst_used: false,
            budget: None,
            waiting: VecDeque::new(),
            closed: false,
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
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    // ---- in ----

    /// One datagram from the peer, received at `now`.
    pub fn handle_datagram(&mut self, datagram: Bytes, now: Instant) {
        if self.closed {
            return;
        }
        self.last_seen = now;
        let header = Header::peek(&datagram);
        let msg = match Message::decode(datagram) {
            Ok(msg) => msg,
            Err(e) => {
                self.stats.protocol_errors += 1;
                self.diagnostic(Diagnostic::Undecodable(e));
                // RFC 7252 §4.2: a confirmable message with a format error is reset (one with
                // an unknown version is silently ignored: `peek` gives no header for it).
                if let Some(h) = header
                    && h.mtype == MessageType::Confirmable
                {
                    self.send_empty(MessageType::Reset, h.message_id);
                }
                return;
            }
        };
        self.stats.messages_received += 1;
        match msg.mtype() {
            MessageType::Acknowledgement | MessageType::Reset => self.on_ack(&msg),
            MessageType::Confirmable | MessageType::NonConfirmable => {
                if msg.code().is_request() {
                    self.on_request(msg, now);
                } else if msg.mtype() == MessageType::Confirmable {
                    // A ping (Empty CON), or a response we never asked for: reset.
                    self.send_empty(MessageType::Reset, msg.message_id());
                }
            }
        }
    }

    /// Fires what is due at `now`: empty ACKs for answers that are late, retransmissions (and
    /// giving up on them), expiry of remembered message ids, Block1 transfers and Block2
    /// bodies, and finally the idle timeout, which closes the peer.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        while let Some(&(due, tag)) = self.piggyback.front() {
            if due > now {
                break;
            }
            self.piggyback.pop_front();
            if let Some(mid) = self.exchanges.get_mut(&tag).and_then(|e| e.ack.take()) {
                self.acknowledge_empty(mid);
            }
        }
        while let Some(&Reverse((due, mid))) = self.retransmits.peek() {
            if due > now {
                break;
            }
            self.retransmits.pop();
            self.retransmit(mid, due, now);
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
        if now >= after(self.last_seen, self.settings.idle_timeout) {
            self.stats.sessions_expired += 1;
            self.shut();
        }
    }

    /// An answer (`tag` of a request) or a push (tag 0, or an unknown tag) from the gateway.
    pub fn on_response(&mut self, response: KpResponse, now: Instant) {
        if self.closed {
            return;
        }
        if response.tag != 0
            && let Some(exchange) = self.exchanges.remove(&response.tag)
        {
            if exchange.waiting.is_none() {
                self.answer(exchange, &response.outcome, now);
                return;
            }
            // A tag not handed to the gateway yet: the answer cannot be for it.
            self.exchanges.insert(response.tag, exchange);
        }
        self.notify(response, now);
    }

    /// The result of [`Event::OpenSession`]. On success the requests that waited are forwarded
    /// (or refused with 4.01 when they presented other credentials). On refusal the waiting
    /// requests that presented the same credentials are answered with it, and the next one
    /// with other credentials asks again. A session that is no longer wanted (the peer closed
    /// meanwhile) is handed back as [`Event::CloseSession`].
    pub fn session_opened(&mut self, result: Result<ClientIdentity, KpError>, now: Instant) {
        let asked = match std::mem::replace(&mut self.kp, Kp::None) {
            Kp::Opening(credentials) if !self.closed => credentials,
            other => {
                self.kp = other;
                if let Ok(identity) = result
                    && !matches!(self.kp, Kp::Open { id, .. } if id == identity.session)
                {
                    self.events.push_back(Event::CloseSession(identity.session));
                }
                return;
            }
        };
        let waiting = std::mem::take(&mut self.waiting);
        match result {
            Ok(identity) => {
                self.stats.sessions_opened += 1;
                let id = identity.session;
                for tag in waiting {
                    let Some(w) = self.exchanges.get_mut(&tag).and_then(|e| e.waiting.take())
                    else {
                        continue;
                    };
                    let Waiting { request, credentials } = *w;
                    let admitted = asked
                        .admits(credentials.username.as_deref(), credentials.password.as_deref());
                    if admitted {
                        self.events.push_back(Event::Request { session: id, request });
                    } else if let Some(exchange) = self.exchanges.remove(&tag) {
                        let refusal = KpError::unauthorized(OTHER_CREDENTIALS);
                        self.answer(exchange, &KpOutcome::Error(refusal), now);
                    }
                }
                self.kp = Kp::Open { id, credentials: asked };
            }
            Err(refusal) => {
                self.stats.sessions_refused += 1;
                for tag in waiting {
                    let Some(exchange) = self.exchanges.get(&tag) else { continue };
                    let Some(w) = &exchange.waiting else { continue };
                    if w.credentials == asked {
                        if let Some(exchange) = self.exchanges.remove(&tag) {
                            self.answer(exchange, &KpOutcome::Error(refusal.clone()), now);
                        }
                        continue;
                    }
                    if matches!(self.kp, Kp::None) {
                        let Credentials { username, password } = w.credentials.clone();
                        self.kp = Kp::Opening(w.credentials.clone());
                        self.events.push_back(Event::OpenSession { username, password });
                    }
                    self.waiting.push_back(tag);
                }
            }
        }
    }

    /// The result of handing the request `tag` to the gateway ([`Event::Request`]). A refusal
    /// is answered to the peer; an acceptance needs nothing until the answer arrives. Unknown
    /// or already answered tags are ignored.
    pub fn request_done(&mut self, tag: u64, result: Result<(), KpError>, now: Instant) {
        let Err(refusal) = result else {
            self.prove();
            return;
        };
        let forwarded = self.exchanges.get(&tag).is_some_and(|e| e.waiting.is_none());
        if forwarded && let Some(exchange) = self.exchanges.remove(&tag) {
            self.answer(exchange, &KpOutcome::Error(refusal), now);
        }
    }

    /// The gateway ended the session (it dropped the session's outbox: the peer did not keep
    /// up, or the gateway closed it): everything that belonged to it is forgotten, and the
    /// next request opens a new one.
    pub fn session_lost(&mut self) {
        if !matches!(self.kp, Kp::Open { .. }) {
            return;
        }
        self.kp = Kp::None;
        self.exchanges.clear();
        self.end_observations();
    }

    /// Closes the peer (the transport shuts down): the session ends ([`Event::CloseSession`])
    /// and nothing more goes in or out, except what is already queued. Idempotent.
    pub fn close(&mut self) {
        if !self.closed {
            self.shut();
        }
    }

    // ---- out ----

    /// The next datagram to send to the peer.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.transmits.pop_front()
    }

    /// The next event for the gateway, or to log.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`PeerSession::handle_timeout`] is next due; `None` once the peer is closed.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        self.prune_piggyback();
        let mut next = after(self.last_seen, self.settings.idle_timeout);
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
        for b in &self.bodies {
            consider(b.expires);
        }
        Some(next)
    }

    /// The counts since the last call, reset.
    pub fn take_stats(&mut self) -> Stats {
        std::mem::take(&mut self.stats)
    }

    /// Whether the peer is closed (idle, or [`PeerSession::close`]): its task can end once it
    /// has sent the transmits and handled the events still queued.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Whether the gateway has accepted one of the peer's requests (its token is good).
    pub fn is_proven(&self) -> bool {
        self.proven
    }

    /// Block1 transfers of the peer, while it is unproven, are held within `budget` (shared by
    /// the transport's peers); without one only the per-peer limits apply.
    pub fn set_block1_budget(&mut self, budget: Arc<Block1Budget>) {
        self.budget = Some(budget);
    }

    /// The open 1/KP session, if any.
    pub fn session(&self) -> Option<SessionId> {
        match self.kp {
            Kp::Open { id, .. } => Some(id),
            _ => None,
        }
    }

    /// Observations registered now.
    pub fn observations(&self) -> usize {
        self.observations.len()
    }

    // ---- internals shared by the submodules ----

    fn prove(&mut self) {
        if self.proven {
            return;
        }
        self.proven = true;
        self.stats.proven += 1;
        for transfer in &mut self.transfers {
            transfer.reserved = None;
        }
    }

    /// The most an answer to a request of `len` bytes may take: unlimited once proven.
    fn limit(&self, len: usize) -> Option<usize> {
        (!self.proven).then_some(len)
    }

    fn shut(&mut self) {
        self.closed = true;
        if let Kp::Open { id, .. } = std::mem::replace(&mut self.kp, Kp::None) {
            self.events.push_back(Event::CloseSession(id));
        }
        self.end_observations();
        self.exchanges.clear();
        self.waiting.clear();
        self.outgoing.clear();
        self.retransmits.clear();
        self.piggyback.clear();
    }

    fn end_observations(&mut self) {
        self.stats.observations_ended += self.observations.len() as u64;
        self.observations.clear();
    }

    fn diagnostic(&mut self, diagnostic: Diagnostic) {
        self.events.push_back(Event::Diagnostic(diagnostic));
    }

    /// Forgets the ACK deadlines at the front that no longer matter (the request was answered,
    /// or acknowledged), so that they neither wake the caller nor pile up.
    fn prune_piggyback(&mut self) {
        while let Some(&(_, tag)) = self.piggyback.front() {
            if self.exchanges.get(&tag).is_some_and(|e| e.ack.is_some()) {
                break;
            }
            self.piggyback.pop_front();
        }
    }

    fn retransmit(&mut self, mid: u16, due: Instant, now: Instant) {
        let Some(out) = self.outgoing.get_mut(&mid) else { return };
        if out.due != due {
            return;
        }
        if out.retransmissions >= MAX_RETRANSMIT {
            let observation = out.observation;
            self.outgoing.remove(&mid);
            self.stats.retransmit_timeouts += 1;
            self.diagnostic(Diagnostic::GaveUp { message_id: mid });
            if let Some(token) = observation {
                // RFC 7641 §4.5: an observer that does not acknowledge is gone.
                self.remove_observation(&token);
            }
            return;
        }
        out.retransmissions += 1;
        out.timeout = out.timeout.saturating_mul(2);
        out.due = after(now, out.timeout);
        let (datagram, next) = (out.datagram.clone(), out.due);
        self.retransmits.push(Reverse((next, mid)));
        self.stats.retransmissions += 1;
        self.transmits.push_back(datagram);
    }

    fn initial_timeout(&mut self) -> Duration {
        // ACK_TIMEOUT times a random factor in [1, ACK_RANDOM_FACTOR = 1.5].
        let ack = self.settings.ack_timeout;
        let jitter = (xorshift(&mut self.rng) >> 11) as f64 / (1u64 << 53) as f64;
        ack.saturating_add(ack.mul_f64(0.5 * jitter))
    }

    fn new_mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }

    fn next_observe(&mut self) -> u32 {
        self.observe_seq = (self.observe_seq + 1) & OBSERVE_MASK;
        self.observe_seq
    }

    /// Remembers a new message id for the exchange lifetime, forgetting the oldest when full.
    fn remember(&mut self, mid: u16, seen: Seen, at: Instant) {
        let max = self.settings.max_exchanges.max(1);
        while self.dedup.len() >= max {
            let Some((_, old)) = self.dedup_order.pop_front() else { break };
            self.dedup.remove(&old);
        }
        let expires = after(at, self.settings.exchange_lifetime);
        self.dedup.insert(mid, SeenEntry { expires, seen });
        self.dedup_order.push_back((expires, mid));
    }

    fn set_seen(&mut self, mid: u16, seen: Seen) {
        if let Some(entry) = self.dedup.get_mut(&mid) {
            entry.seen = seen;
        }
    }

    fn remove_observation(&mut self, token: &Token) {
        if let Some(i) = self.observations.iter().position(|o| o.token == *token) {
            let obs = self.observations.swap_remove(i);
            if let Some(mid) = obs.outstanding {
                self.outgoing.remove(&mid);
            }
            self.stats.observations_ended += 1;
        }
    }
}

/// The reason a request is refused when the session was opened with other credentials.
const OTHER_CREDENTIALS: &str = "this peer's session was opened with other credentials";

/// The response code and payload of an outcome: the extension's payload on success, the reason
/// phrase as diagnostic payload on error.
fn outcome_parts(outcome: &KpOutcome, success: Code) -> (Code, Bytes) {
    match outcome {
        KpOutcome::Success(payload) => (success, payload.clone()),
        // Durable in the gateway's spool; the extension has not answered yet.
        KpOutcome::Stored => (success, Bytes::new()),
        KpOutcome::Error(KpError { status, reason }) => {
            (response_code(*status, success), Bytes::copy_from_slice(reason.as_bytes()))
        }
    }
}
