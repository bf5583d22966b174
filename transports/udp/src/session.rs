//! One device's session on the gateway side, sans IO (SPEC §4.3, §5, §7): data packets in
//! (already split from their header), 1/KP requests out; responses and pushes in, data packets
//! out. Time is passed in; nothing here sleeps, reads a socket or spawns.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fleetgate_kp::{KpError, KpOutcome, KpRequest, KpResponse, KpTopic};
use snow::StatelessTransportState;

use crate::replay::ReplayWindow;
use crate::wire::{DATA_HEADER, Ext, Frame, Frames, TAG, WireError, data_header};

/// The tag of requests a session hands the gateway: a response carrying it answers one of the
/// session's own requests; anything else is a push.
pub const REQUEST_TAG: u64 = 1;
/// The tag of the session's subscription (made at the handshake, so that pushes reach a device
/// before its first request).
pub const SUBSCRIPTION_TAG: u64 = 2;
/// After this many packets in one direction a session must be replaced by a new handshake
/// (SPEC §4.3): far below ChaCha20-Poly1305's limits, and a fixed point for devices.
pub const REKEY_AFTER_PACKETS: u64 = 1 << 32;

/// Limits of a session.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest datagram accepted as a request without 413, and largest sent.
    pub max_datagram: usize,
    /// The session ends when nothing authentic arrived for this long.
    pub idle_timeout: Duration,
    /// The session ends this long after the handshake.
    pub lifetime: Duration,
    /// Answers kept per session to answer a retried request again.
    pub response_cache: usize,
    /// Requests awaiting their answer; more get 429.
    pub max_in_flight: usize,
    /// Pushes awaiting their ACK; one more drops the oldest.
    pub max_pending_pushes: usize,
    /// First retransmission timeout of a push (doubled each time, 4 retransmissions; after them
    /// the push waits for the next datagram from the device).
    pub push_retry: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_datagram: 1200,
            idle_timeout: Duration::from_secs(300),
            lifetime: Duration::from_secs(86_400),
            response_cache: 32,
            max_in_flight: 64,
            max_pending_pushes: 32,
            push_retry: Duration::from_secs(2),
        }
    }
}

/// Why a data packet was refused. Each is counted by the glue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Its packet number was seen already or is too old.
    #[error("replayed or too old packet number")]
    Replay,
    /// The AEAD tag did not verify: forged, corrupted, or for other keys.
    #[error("packet does not authenticate")]
    Forged,
    /// It authenticated but its frames did not parse (the frames before the error count).
    #[error("malformed frames: {0}")]
    Malformed(WireError),
}

/// What an authentic data packet brought.
#[derive(Debug, Default)]
pub struct Received {
    /// Requests for the gateway, in order.
    pub requests: Vec<KpRequest>,
    /// The packet came from a new address, which the session now uses.
    pub moved: bool,
    /// The device closed the session.
    pub closed: bool,
    /// Pushes the device acknowledged.
    pub acked: usize,
    /// Retried requests answered from the cache or ignored as in flight.
    pub duplicates: usize,
    /// A frame error after the frames that were taken.
    pub malformed: Option<WireError>,
}

struct PendingPush {
    id: u64,
    frame: Vec<u8>,
    due: Instant,
    tries: u32,
}

/// One device session.
pub struct Session {
    /// The gateway's id of this session (receiver id of the device's packets).
    pub id: u32,
    /// The device's id (receiver id of the gateway's packets).
    pub device: u32,
    /// Where the device last sent an authentic packet from.
    pub peer: SocketAddr,
    /// The endpoint's app version.
    pub app_version: Arc<str>,
    /// The endpoint token of the handshake.
    pub token: Arc<str>,
    keys: StatelessTransportState,
    aliases: Arc<[String]>,
    limits: Limits,
    rx: ReplayWindow<1>,
    tx_next: u64,
    started: Instant,
    last_heard: Instant,
    in_flight: HashSet<u32>,
    cache: VecDeque<(u32, Vec<u8>)>,
    /// Frames to send at the next transmit.
    out: VecDeque<Vec<u8>>,
    pushes: VecDeque<PendingPush>,
    next_push: u64,
    /// The device sent something since the last transmit: held pushes may ride along.
    heard_since_transmit: bool,
    plain: Vec<u8>,
    /// Pushes dropped because the queue was full or the session ended.
    pub pushes_dropped: u64,
    /// The device has shown that it receives at `peer` (see [`Session::poll_transmit`]).
    validated: bool,
    /// While `peer` is not validated: bytes received from it not yet matched by bytes sent.
    credit: usize,
    /// An authentic packet has arrived in this session.
    heard: bool,
    /// The PING data sent to a new address; its PONG from there validates it.
    challenge: Option<[u8; 8]>,
    /// The address last validated: a device that comes back to it needs no new challenge.
    validated_addr: Option<SocketAddr>,
    /// Transmits held back because they would have sent an unvalidated address more bytes than
    /// it sent (they go out once it has sent more, or is validated).
    pub held_for_validation: u64,
}

/// Fields of a new session.
pub struct NewSession {
    /// The gateway's session id.
    pub id: u32,
    /// The device's session id.
    pub device: u32,
    /// The device's address.
    pub peer: SocketAddr,
    /// App version of the hello.
    pub app_version: Arc<str>,
    /// Token of the hello ("" without one).
    pub token: Arc<str>,
    /// The keys split by the handshake.
    pub keys: StatelessTransportState,
    /// Extension aliases of the welcome.
    pub aliases: Arc<[String]>,
    /// Limits.
    pub limits: Limits,
}

fn resource_topic(
    app_version: &str,
    ext: &str,
    token: &str,
    path: &str,
    id: Option<u32>,
) -> String {
    let mut t =
        String::with_capacity(8 + app_version.len() + ext.len() + token.len() + path.len() + 11);
    t.push_str("kp1/");
    t.push_str(app_version);
    t.push('/');
    t.push_str(ext);
    t.push('/');
    t.push_str(token);
    t.push_str(path);
    if let Some(id) = id {
        t.push('/');
        t.push_str(&id.to_string());
    }
    t
}

/// The extension and resource path of `kp1/<app version>/<ext>/<token><path>`.
fn split_base(base: &str) -> (&str, &str) {
    let mut slashes = base.match_indices('/').map(|(i, _)| i);
    let (Some(_), Some(a)) = (slashes.next(), slashes.next()) else { return ("", "") };
    let Some(b) = slashes.next() else { return (&base[a + 1..], "") };
    let path = slashes.next().map_or("", |c| &base[c..]);
    (&base[a + 1..b], path)
}

impl Session {
    /// A session whose handshake just finished at `now`.
    pub fn new(s: NewSession, now: Instant) -> Self {
        Self {
            id: s.id,
            device: s.device,
            peer: s.peer,
            app_version: s.app_version,
            token: s.token,
            keys: s.keys,
            aliases: s.aliases,
            limits: s.limits,
            rx: ReplayWindow::default(),
            tx_next: 0,
            started: now,
            last_heard: now,
            in_flight: HashSet::new(),
            cache: VecDeque::new(),
            out: VecDeque::new(),
            pushes: VecDeque::new(),
            next_push: 1,
            heard_since_transmit: false,
            plain: Vec::with_capacity(2048),
            pushes_dropped: 0,
            validated: false,
            credit: 0,
            heard: false,
            challenge: None,
            validated_addr: None,
            held_for_validation: 0,
        }
    }

    fn ext_name<'a>(&'a self, ext: Ext<'a>) -> Option<&'a str> {
        match ext {
            Ext::Alias(a) => self.aliases.get(usize::from(a)).map(String::as_str),
            Ext::Name(n) => Some(n),
        }
    }

    fn ext_of<'a>(&self, name: &'a str) -> Ext<'a> {
        match self.aliases.iter().position(|a| a == name).and_then(|i| u8::try_from(i).ok()) {
            Some(i) => Ext::Alias(i),
            None => Ext::Name(name),
        }
    }

    /// Takes a data packet addressed to this session. `datagram_len` is the whole datagram's
    /// size (a request in a datagram over the limit gets 413).
    pub fn receive(
        &mut self,
        number: u64,
        sealed: &[u8],
        datagram_len: usize,
        from: SocketAddr,
        now: Instant,
    ) -> Result<Received, Refusal> {
        if !self.rx.may_accept(number) {
            return Err(Refusal::Replay);
        }
        let mut plain = std::mem::take(&mut self.plain);
        plain.resize(sealed.len(), 0);
        let opened = self.keys.read_message(number, sealed, &mut plain);
        let result = match opened {
            Err(_) => Err(Refusal::Forged),
            Ok(n) if !self.rx.accept(number) => {
                let _ = n;
                Err(Refusal::Replay)
            }
            Ok(n) => {
                self.last_heard = now;
                self.heard_since_transmit = true;
                let mut got = Received { moved: from != self.peer, ..Received::default() };
                self.peer = from;
                self.check_address(got.moved, datagram_len);
                let too_large = datagram_len > self.limits.max_datagram;
                for frame in Frames::new(&plain[..n]) {
                    match frame {
                        Ok(frame) => self.take_frame(frame, too_large, &mut got),
                        Err(e) => got.malformed = Some(e),
                    }
                }
                Ok(got)
            }
        };
        self.plain = plain;
        result
    }

    fn answer_now(&mut self, id: Option<u32>, target: Option<(Ext<'_>, &str)>, e: &KpError) {
        let mut f = Vec::new();
        Frame::Response { id, target, status: e.status, payload: e.reason.as_bytes() }.put(&mut f);
        if let Some(id) = id {
            self.remember(id, f.clone());
        }
        self.out.push_back(f);
    }

    fn remember(&mut self, id: u32, frame: Vec<u8>) {
        if self.cache.len() >= self.limits.response_cache {
            self.cache.pop_front();
        }
        self.cache.push_back((id, frame));
    }

    fn take_frame(&mut self, frame: Frame<'_>, too_large: bool, got: &mut Received) {
        match frame {
            Frame::Request { ext, path, id, payload } => {
                if let Some(id) = id {
                    if let Some((_, cached)) = self.cache.iter().find(|(i, _)| *i == id) {
                        let cached = cached.clone();
                        self.out.push_back(cached);
                        got.duplicates += 1;
                        return;
                    }
                    if self.in_flight.contains(&id) {
                        got.duplicates += 1;
                        return;
                    }
                }
                let target = id.is_none().then_some((ext, path));
                if too_large {
                    let e = KpError::too_large(format!(
                        "a datagram may carry at most {} bytes",
                        self.limits.max_datagram
                    ));
                    return self.answer_now(id, target, &e);
                }
                if id.is_some() && self.in_flight.len() >= self.limits.max_in_flight {
                    return self.answer_now(
                        id,
                        target,
                        &KpError::new(429, "too many requests in flight"),
                    );
                }
                let Some(ext_name) = self.ext_name(ext) else {
                    return self.answer_now(
                        id,
                        target,
                        &KpError::not_found("unknown extension alias"),
                    );
                };
                let valid = !ext_name.is_empty()
                    && !ext_name.contains('/')
                    && (path.is_empty() || path.starts_with('/'));
                let topic = resource_topic(&self.app_version, ext_name, &self.token, path, id);
                let parsed = if valid { KpTopic::parse(Bytes::from(topic)).ok() } else { None };
                let Some(topic) = parsed.filter(|t| t.request_id() == id) else {
                    return self.answer_now(
                        id,
                        target,
                        &KpError::not_found("not a 1/KP resource path"),
                    );
                };
                if let Some(id) = id {
                    self.in_flight.insert(id);
                }
                got.requests.push(KpRequest {
                    topic,
                    payload: Bytes::copy_from_slice(payload),
                    tag: REQUEST_TAG,
                    wants_answer: false,
                });
            }
            Frame::Ack(push) => {
                let before = self.pushes.len();
                self.pushes.retain(|p| p.id != push);
                got.acked += before - self.pushes.len();
            }
            Frame::Ping(data) => {
                let mut f = Vec::new();
                Frame::Pong(data).put(&mut f);
                self.out.push_back(f);
            }
            Frame::Pong(data) => {
                if self.challenge == Some(data) {
                    self.challenge = None;
                    self.validated = true;
                    self.validated_addr = Some(self.peer);
                }
            }
            Frame::Close { .. } => got.closed = true,
            Frame::Padding(_) | Frame::Response { .. } | Frame::Push { .. } => {}
        }
    }

    /// Address validation (SPEC §6): the handshake's address is validated by the session's
    /// first authentic packet from it (its keys came in the RESP sent there); a new address by
    /// the PONG to a PING challenge sent to it. Until then the address is sent no more bytes
    /// than it sent.
    fn check_address(&mut self, moved: bool, datagram_len: usize) {
        if moved && self.validated_addr == Some(self.peer) {
            self.validated = true;
            self.challenge = None;
        } else if moved {
            self.validated = false;
            self.credit = 0;
            let challenge: [u8; 8] = rand::random();
            self.challenge = Some(challenge);
            let mut f = Vec::new();
            Frame::Ping(challenge).put(&mut f);
            self.out.push_front(f);
        } else if !self.heard {
            self.validated = true;
        }
        self.heard = true;
        if self.validated {
            self.validated_addr = Some(self.peer);
        }
        if !self.validated {
            self.credit = self.credit.saturating_add(datagram_len);
        }
    }

    /// Whether the device has shown it receives at its current address.
    pub fn address_validated(&self) -> bool {
        self.validated
    }

    /// The gateway refused a request the session handed it: answer it.
    pub fn refused(&mut self, request: &KpRequest, error: &KpError) {
        let id = request.topic.request_id();
        if let Some(id) = id {
            self.in_flight.remove(&id);
        }
        let ext = request.topic.extension().to_owned();
        let path = request.topic.resource_path().unwrap_or("").to_owned();
        let target = id.is_none().then(|| (self.ext_of(&ext), path.as_str()));
        let mut f = Vec::new();
        Frame::Response { id, target, status: error.status, payload: error.reason.as_bytes() }
            .put(&mut f);
        if let Some(id) = id {
            self.remember(id, f.clone());
        }
        self.out.push_back(f);
    }

    /// A response or push from the gateway.
    pub fn respond(&mut self, response: &KpResponse, now: Instant) {
        let (status, payload): (u16, &[u8]) = match &response.outcome {
            KpOutcome::Success(p) => (200, p),
            KpOutcome::Stored => (202, b""),
            KpOutcome::Error(e) => (e.status, e.reason.as_bytes()),
        };
        let base = std::str::from_utf8(&response.base).unwrap_or("");
        let (ext, path) = split_base(base);
        let mut f = Vec::new();
        if let Some(id) = response.request_id {
            self.in_flight.remove(&id);
            Frame::Response { id: Some(id), target: None, status, payload }.put(&mut f);
            self.remember(id, f.clone());
            self.out.push_back(f);
        } else if response.tag == REQUEST_TAG || matches!(response.outcome, KpOutcome::Error(_)) {
            // An answer to a request without id: only errors come (1/KP), whichever way the
            // gateway routed them.
            Frame::Response { id: None, target: Some((self.ext_of(ext), path)), status, payload }
                .put(&mut f);
            self.out.push_back(f);
        } else {
            let id = self.next_push;
            self.next_push += 1;
            Frame::Push { id, ext: self.ext_of(ext), path, payload }.put(&mut f);
            if self.pushes.len() >= self.limits.max_pending_pushes {
                self.pushes.pop_front();
                self.pushes_dropped += 1;
            }
            self.pushes.push_back(PendingPush { id, frame: f, due: now, tries: 0 });
        }
    }

    fn seal(&mut self, plain: &[u8]) -> Option<Vec<u8>> {
        if self.tx_next >= REKEY_AFTER_PACKETS {
            return None;
        }
        let number = self.tx_next;
        self.tx_next += 1;
        let mut out = Vec::with_capacity(DATA_HEADER + plain.len() + TAG);
        out.extend_from_slice(&data_header(self.device, number));
        out.resize(DATA_HEADER + plain.len() + TAG, 0);
        let n = self.keys.write_message(number, plain, &mut out[DATA_HEADER..]).ok()?;
        out.truncate(DATA_HEADER + n);
        Some(out)
    }

    /// The next data packet to send, if anything is due: queued answers first, then pushes
    /// that are due (or held, when the device has just been heard from), as many frames as fit.
    /// To an address not validated, no more bytes than it sent: what does not fit waits.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        let mut room = self.limits.max_datagram - DATA_HEADER - TAG;
        // Unvalidated, a frame must fit the credit; validated, one frame always goes.
        let strict = !self.validated;
        if strict {
            let credit = self.credit.saturating_sub(DATA_HEADER + TAG);
            if credit == 0 {
                if !self.out.is_empty() || self.pushes.iter().any(|p| p.due <= now) {
                    self.held_for_validation += 1;
                }
                return None;
            }
            room = room.min(credit);
        }
        let mut plain = Vec::with_capacity(room.min(1500));
        while let Some(f) = self.out.front() {
            if (strict || !plain.is_empty()) && plain.len() + f.len() > room {
                break;
            }
            if let Some(f) = self.out.pop_front() {
                plain.extend_from_slice(&f);
            }
        }
        let heard = std::mem::take(&mut self.heard_since_transmit);
        let retry = self.limits.push_retry;
        for p in &mut self.pushes {
            let held = p.tries > 4;
            let due = if held { heard } else { p.due <= now };
            if !due || ((strict || !plain.is_empty()) && plain.len() + p.frame.len() > room) {
                continue;
            }
            plain.extend_from_slice(&p.frame);
            p.tries += 1;
            p.due = now + retry * (1 << p.tries.min(4));
        }
        if plain.is_empty() {
            if strict && (!self.out.is_empty() || self.pushes.iter().any(|p| p.due <= now)) {
                self.held_for_validation += 1;
            }
            return None;
        }
        let packet = self.seal(&plain)?;
        if strict {
            self.credit = self.credit.saturating_sub(packet.len());
        }
        Some(packet)
    }

    /// When the session next needs [`Session::poll_transmit`] or [`Session::expired`].
    pub fn poll_timeout(&self) -> Instant {
        let end =
            (self.last_heard + self.limits.idle_timeout).min(self.started + self.limits.lifetime);
        if !self.validated {
            // Pushes wait for the device's next packet (credit) or its PONG.
            return end;
        }
        self.pushes.iter().filter(|p| p.tries <= 4).map(|p| p.due).fold(end, Instant::min)
    }

    /// Whether the session is over: idle too long, past its lifetime, or out of packet numbers.
    pub fn expired(&self, now: Instant) -> bool {
        now >= self.last_heard + self.limits.idle_timeout
            || now >= self.started + self.limits.lifetime
            || self.tx_next >= REKEY_AFTER_PACKETS
    }

    /// A CLOSE for the device, sealed (the gateway is stopping or the session ended).
    pub fn close_packet(&mut self, code: u16, reason: &str) -> Option<Vec<u8>> {
        let mut f = Vec::new();
        Frame::Close { code, reason }.put(&mut f);
        if !self.validated && DATA_HEADER + f.len() + TAG > self.credit {
            return None;
        }
        self.seal(&f)
    }

    /// Pushes not yet acknowledged.
    pub fn pending_pushes(&self) -> usize {
        self.pushes.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::client::{Connecting, Established};
    use crate::handshake::{self, Hello, KeyPair, Welcome};
    use crate::wire::{self, Packet};

    fn pair(limits: Limits, now: Instant) -> (Established, Session) {
        let keys = KeyPair::from_private([7; 32]);
        let hello = Hello { app_version: "a", token: Some("t"), username: None, password: None };
        let mut device = Connecting::new(&keys.public, 5, &hello, None).unwrap();
        let init = device.init_packet(None).unwrap();
        let Ok(Packet::Init { noise, .. }) = Packet::parse(&init) else { panic!("INIT") };
        let mut hs = handshake::responder(&keys, None).unwrap();
        let mut buf = vec![0; noise.len()];
        handshake::read_init(&mut hs, noise, &mut buf).unwrap();
        let mut header = Vec::new();
        wire::put_resp_header(&mut header, 5, 6);
        let welcome = Welcome::Accepted {
            lifetime_secs: 60,
            keepalive_secs: 25,
            max_datagram: 1200,
            server_time_ms: 0,
            aliases: vec!["dcx"],
        };
        let (resp, server_keys) = handshake::write_resp(hs, header, &welcome).unwrap();
        let (client, _) = device.finish(&resp).unwrap();
        let session = Session::new(
            NewSession {
                id: 6,
                device: 5,
                peer: "127.0.0.1:1".parse().unwrap(),
                app_version: "a".into(),
                token: "t".into(),
                keys: server_keys,
                aliases: vec!["dcx".to_owned()].into(),
                limits,
            },
            now,
        );
        (client, session)
    }

    fn deliver(session: &mut Session, packet: &[u8], now: Instant) -> Result<Received, Refusal> {
        let Ok(Packet::Data { number, sealed, .. }) = Packet::parse(packet) else { panic!("DATA") };
        session.receive(number, sealed, packet.len(), "127.0.0.1:1".parse().unwrap(), now)
    }

    fn frames(client: &mut Established, packet: &[u8]) -> Vec<String> {
        let plain = client.open(packet).unwrap();
        Frames::new(&plain).map(|f| format!("{:?}", f.unwrap())).collect()
    }

    fn request(id: Option<u32>, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        Frame::Request { ext: Ext::Alias(0), path: "/json", id, payload }.put(&mut f);
        f
    }

    fn answer(session: &mut Session, id: u32, now: Instant) {
        let response = KpResponse {
            base: Bytes::from_static(b"kp1/a/dcx/t/json"),
            request_id: Some(id),
            tag: REQUEST_TAG,
            outcome: KpOutcome::Success(Bytes::from_static(b"ok")),
        };
        session.respond(&response, now);
    }

    #[test]
    fn a_retried_request_reaches_the_gateway_once_and_is_answered_from_the_cache() {
        let now = Instant::now();
        let (mut client, mut session) = pair(Limits::default(), now);
        let got = deliver(&mut session, &client.seal(&request(Some(9), b"[1]")), now).unwrap();
        assert_eq!(got.requests.len(), 1);
        assert_eq!(got.requests[0].topic.as_str(), "kp1/a/dcx/t/json/9");
        // Retried while in flight: ignored.
        let got = deliver(&mut session, &client.seal(&request(Some(9), b"[1]")), now).unwrap();
        assert_eq!((got.requests.len(), got.duplicates), (0, 1));
        assert!(session.poll_transmit(now).is_none());
        answer(&mut session, 9, now);
        let first = session.poll_transmit(now).unwrap();
        assert_eq!(
            frames(&mut client, &first),
            ["Response { id: Some(9), target: None, status: 200, payload: [111, 107] }"]
        );
        // Retried after the answer was lost: the cached answer again, no new request.
        let got = deliver(&mut session, &client.seal(&request(Some(9), b"[1]")), now).unwrap();
        assert_eq!((got.requests.len(), got.duplicates), (0, 1));
        let again = session.poll_transmit(now).unwrap();
        assert_ne!(again, first, "a new packet number");
        assert_eq!(frames(&mut client, &again), frames_of_first());
    }

    fn frames_of_first() -> Vec<String> {
        vec!["Response { id: Some(9), target: None, status: 200, payload: [111, 107] }".to_owned()]
    }

    #[test]
    fn replays_and_forgeries_are_refused_without_touching_the_window() {
        let now = Instant::now();
        let (mut client, mut session) = pair(Limits::default(), now);
        let packet = client.seal(&request(None, b"[1]"));
        assert!(deliver(&mut session, &packet, now).is_ok());
        assert_eq!(deliver(&mut session, &packet, now).err(), Some(Refusal::Replay));
        // A forged packet with a far-ahead number must not move the window.
        let mut forged = client.seal_with(1_000, &request(None, b"[1]"));
        let last = forged.len() - 1;
        forged[last] ^= 0x80;
        assert_eq!(deliver(&mut session, &forged, now).err(), Some(Refusal::Forged));
        let next = client.seal(&request(None, b"[2]"));
        assert_eq!(deliver(&mut session, &next, now).unwrap().requests.len(), 1);
    }

    #[test]
    fn oversized_datagrams_get_413_and_unknown_aliases_404() {
        let now = Instant::now();
        let limits = Limits { max_datagram: 256, ..Limits::default() };
        let (mut client, mut session) = pair(limits, now);
        let big = client.seal(&request(Some(1), &[b'x'; 400]));
        assert!(deliver(&mut session, &big, now).unwrap().requests.is_empty());
        let out = session.poll_transmit(now).unwrap();
        assert!(frames(&mut client, &out)[0].contains("status: 413"));
        let mut f = Vec::new();
        Frame::Request { ext: Ext::Alias(3), path: "/json", id: Some(2), payload: b"[]" }
            .put(&mut f);
        assert!(deliver(&mut session, &client.seal(&f), now).unwrap().requests.is_empty());
        let out = session.poll_transmit(now).unwrap();
        assert!(frames(&mut client, &out)[0].contains("status: 404"));
    }

    #[test]
    fn a_new_address_gets_no_more_bytes_than_it_sent_until_it_answers_the_challenge() {
        let now = Instant::now();
        let (mut client, mut session) = pair(Limits::default(), now);
        let big = Bytes::from(vec![b'x'; 1000]);
        let answer_big = |session: &mut Session, id: u32| {
            session.respond(
                &KpResponse {
                    base: Bytes::from_static(b"kp1/a/dcx/t/json"),
                    request_id: Some(id),
                    tag: REQUEST_TAG,
                    outcome: KpOutcome::Success(big.clone()),
                },
                now,
            )
        };
        // The handshake's address: validated by the first authentic packet.
        deliver(&mut session, &client.seal(&request(Some(1), b"[]")), now).unwrap();
        answer_big(&mut session, 1);
        assert!(session.poll_transmit(now).is_some_and(|p| p.len() > 1000));
        // The same device from another address (or a packet replayed from a spoofed one).
        let moved: SocketAddr = "127.0.0.2:9".parse().unwrap();
        let packet = client.seal(&request(Some(2), b"[]"));
        let Ok(Packet::Data { number, sealed, .. }) = Packet::parse(&packet) else { panic!() };
        let got = session.receive(number, sealed, packet.len(), moved, now).unwrap();
        assert!(got.moved && !session.address_validated());
        answer_big(&mut session, 2);
        let mut sent = 0;
        let mut challenge = None;
        while let Some(out) = session.poll_transmit(now) {
            sent += out.len();
            let plain = client.open(&out).unwrap();
            for frame in Frames::new(&plain) {
                if let Ok(Frame::Ping(data)) = frame {
                    challenge = Some(data);
                }
            }
        }
        assert!(sent <= packet.len(), "{sent} bytes sent for {} received", packet.len());
        assert!(session.held_for_validation > 0, "the answer waits");
        let challenge = challenge.expect("a PING challenge went to the new address");
        // The device answers the PING from there: validated, the answer goes out.
        let mut pong = Vec::new();
        Frame::Pong(challenge).put(&mut pong);
        let packet = client.seal(&pong);
        let Ok(Packet::Data { number, sealed, .. }) = Packet::parse(&packet) else { panic!() };
        session.receive(number, sealed, packet.len(), moved, now).unwrap();
        assert!(session.address_validated());
        let out = session.poll_transmit(now).expect("the held answer");
        assert!(frames(&mut client, &out).iter().any(|f| f.contains("Response { id: Some(2)")));
    }

    #[test]
    fn pushes_are_retransmitted_until_acknowledged_then_wait_for_the_device() {
        let now = Instant::now();
        let (mut client, mut session) = pair(Limits::default(), now);
        let push = KpResponse {
            base: Bytes::from_static(b"kp1/a/cmx/t/config/json"),
            request_id: None,
            tag: 0,
            outcome: KpOutcome::Success(Bytes::from_static(b"{}")),
        };
        session.respond(&push, now);
        // Not before the device's first packet shows it has the keys at its address.
        assert!(session.poll_transmit(now).is_none());
        let mut hello = Vec::new();
        Frame::Padding(1).put(&mut hello);
        deliver(&mut session, &client.seal(&hello), now).unwrap();
        assert!(session.address_validated());
        let first = session.poll_transmit(now).unwrap();
        let shown = frames(&mut client, &first);
        assert_eq!(
            shown,
            [r#"Push { id: 1, ext: Name("cmx"), path: "/config/json", payload: [123, 125] }"#]
        );
        assert!(session.poll_transmit(now).is_none(), "not again before its timeout");
        let mut t = now;
        for _ in 0..4 {
            t = session.poll_timeout();
            assert!(session.poll_transmit(t).is_some(), "retransmitted at {:?}", t - now);
        }
        // After four retransmissions it waits for the device's next packet.
        assert!(session.poll_timeout() > t + Duration::from_secs(60));
        assert!(session.poll_transmit(t + Duration::from_secs(100)).is_none());
        let mut ping = Vec::new();
        Frame::Ping(*b"12345678").put(&mut ping);
        deliver(&mut session, &client.seal(&ping), t).unwrap();
        let out = session.poll_transmit(t).unwrap();
        let shown = frames(&mut client, &out);
        assert_eq!(shown.len(), 2, "the pong and the held push: {shown:?}");
        let mut ack = Vec::new();
        Frame::Ack(1).put(&mut ack);
        assert_eq!(deliver(&mut session, &client.seal(&ack), t).unwrap().acked, 1);
        assert_eq!(session.pending_pushes(), 0);
        // An error for a request without id is an answer, not a push.
        let error = KpResponse {
            base: Bytes::from_static(b"kp1/a/dcx/t/json"),
            request_id: None,
            tag: 0,
            outcome: KpOutcome::Error(KpError::bad_request("bad")),
        };
        session.respond(&error, t);
        let out = session.poll_transmit(t).unwrap();
        assert!(
            frames(&mut client, &out)[0].starts_with(
                "Response { id: None, target: Some((Alias(0), \"/json\")), status: 400"
            )
        );
    }
}
