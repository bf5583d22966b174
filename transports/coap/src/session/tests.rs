//! The session on simulated time, without sockets or a runtime: every deadline is fired at
//! exactly the instant [`PeerSession::poll_timeout`] names, so schedules are checked to the
//! nanosecond and runs are repeatable.

#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fleetgate_kp::{ClientIdentity, KpError, KpOutcome, KpRequest, KpResponse, SessionId};

use super::{Diagnostic, Event, PeerSession, Settings, Stats};
use crate::codec::{BlockOption, Code, Message, MessageType, MessageWriter, option, write_empty};

const SECOND: Duration = Duration::from_secs(1);
const PATH: &str = "kp1/demo-v1/dcx/tok-1/json/1";
const CONFIG: &str = "kp1/demo-v1/cmx/tok-1/config/json";

/// A session, a simulated clock, and what came out of it.
struct Sim {
    session: PeerSession,
    start: Instant,
    now: Instant,
    /// Datagrams the session sent, decoded, with the simulated time they went out at.
    sent: VecDeque<(Duration, Message)>,
    events: VecDeque<Event>,
    diagnostics: Vec<Diagnostic>,
    stats: Stats,
    next_mid: u16,
    next_token: u8,
}

impl Sim {
    fn new(settings: Settings) -> Self {
        Self::seeded(settings, 7)
    }

    fn seeded(settings: Settings, seed: u64) -> Self {
        let start = Instant::now();
        Self {
            session: PeerSession::new(Arc::new(settings), seed, start),
            start,
            now: start,
            sent: VecDeque::new(),
            events: VecDeque::new(),
            diagnostics: Vec::new(),
            stats: Stats::default(),
            next_mid: 0x100,
            next_token: 0,
        }
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Takes everything the session produced.
    fn collect(&mut self) {
        while let Some(datagram) = self.session.poll_transmit() {
            let msg = Message::decode(datagram).expect("the session sends valid CoAP");
            self.sent.push_back((self.elapsed(), msg));
        }
        while let Some(event) = self.session.poll_event() {
            match event {
                Event::Diagnostic(d) => self.diagnostics.push(d),
                other => self.events.push_back(other),
            }
        }
        let s = self.session.take_stats();
        let t = &mut self.stats;
        t.messages_received += s.messages_received;
        t.messages_sent += s.messages_sent;
        t.protocol_errors += s.protocol_errors;
        t.duplicates += s.duplicates;
        t.separate_responses += s.separate_responses;
        t.retransmissions += s.retransmissions;
        t.retransmit_timeouts += s.retransmit_timeouts;
        t.resets_received += s.resets_received;
        t.notifications += s.notifications;
        t.pushes_unobserved += s.pushes_unobserved;
        t.block_transfers += s.block_transfers;
        t.sessions_opened += s.sessions_opened;
        t.sessions_refused += s.sessions_refused;
        t.sessions_expired += s.sessions_expired;
        t.observations_registered += s.observations_registered;
        t.observations_ended += s.observations_ended;
        t.replies_trimmed += s.replies_trimmed;
        t.block1_budget_refusals += s.block1_budget_refusals;
        t.proven += s.proven;
    }

    fn deliver(&mut self, datagram: Bytes) {
        self.session.handle_datagram(datagram, self.now);
        self.collect();
    }

    /// Moves the clock by `by`, firing every deadline on the way at its exact instant.
    fn advance(&mut self, by: Duration) {
        let target = self.now + by;
        while let Some(due) = self.session.poll_timeout() {
            if due > target {
                break;
            }
            self.now = self.now.max(due);
            self.session.handle_timeout(self.now);
            self.collect();
        }
        self.now = target;
    }

    fn new_mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }

    fn new_token(&mut self) -> Vec<u8> {
        self.next_token += 1;
        vec![0xA0, self.next_token]
    }

    /// Sends `req` (filling in a message id and token when it has none); returns both.
    fn send(&mut self, mut req: Req) -> (u16, Vec<u8>) {
        let mid = *req.mid.get_or_insert_with(|| self.new_mid());
        let token = req.token.get_or_insert_with(|| self.new_token()).clone();
        self.deliver(req.bytes());
        (mid, token)
    }

    fn send_empty(&mut self, mtype: MessageType, mid: u16) {
        let mut out = BytesMut::new();
        write_empty(&mut out, mtype, mid);
        self.deliver(out.freeze());
    }

    fn take_sent(&mut self) -> Vec<Message> {
        self.sent.drain(..).map(|(_, m)| m).collect()
    }

    /// The one datagram sent since the last look.
    fn one_sent(&mut self) -> Message {
        let sent = self.take_sent();
        assert_eq!(sent.len(), 1, "one datagram expected: {sent:?}");
        sent.into_iter().next().unwrap()
    }

    fn nothing_sent(&mut self) {
        let sent = self.take_sent();
        assert!(sent.is_empty(), "nothing expected: {sent:?}");
    }

    fn event(&mut self) -> Event {
        self.events.pop_front().expect("an event")
    }

    fn no_event(&self) {
        assert!(self.events.is_empty(), "no event expected: {:?}", self.events);
    }

    /// Expects the session to ask for the 1/KP session, and opens it.
    fn open(&mut self) -> SessionId {
        match self.event() {
            Event::OpenSession { .. } => {}
            other => panic!("OpenSession expected, got {other:?}"),
        }
        let id = SessionId(41);
        self.session.session_opened(Ok(ClientIdentity { session: id, client_id: None }), self.now);
        self.collect();
        id
    }

    /// Expects a forwarded request, and accepts it.
    fn forwarded(&mut self) -> KpRequest {
        let request = match self.event() {
            Event::Request { request, .. } => request,
            other => panic!("Request expected, got {other:?}"),
        };
        self.session.request_done(request.tag, Ok(()), self.now);
        self.collect();
        request
    }

    fn respond(&mut self, request: &KpRequest, outcome: KpOutcome) {
        let response = KpResponse {
            base: request.topic.base(),
            request_id: request.topic.request_id(),
            tag: request.tag,
            outcome,
        };
        self.session.on_response(response, self.now);
        self.collect();
    }

    fn echo(&mut self, request: &KpRequest) {
        self.respond(request, KpOutcome::Success(request.payload.clone()));
    }

    fn push(&mut self, base: &'static str, payload: &'static [u8]) {
        let response = KpResponse {
            base: Bytes::from_static(base.as_bytes()),
            request_id: None,
            tag: 0,
            outcome: KpOutcome::Success(Bytes::from_static(payload)),
        };
        self.session.on_response(response, self.now);
        self.collect();
    }
}

/// A request to encode.
struct Req {
    mtype: MessageType,
    code: Code,
    mid: Option<u16>,
    token: Option<Vec<u8>>,
    path: String,
    options: Vec<(u16, Vec<u8>)>,
    payload: Vec<u8>,
}

impl Req {
    fn post(path: &str, payload: &[u8]) -> Self {
        Self {
            mtype: MessageType::Confirmable,
            code: Code::POST,
            mid: None,
            token: None,
            path: path.to_owned(),
            options: Vec::new(),
            payload: payload.to_vec(),
        }
    }

    fn get(path: &str) -> Self {
        Self { code: Code::GET, ..Self::post(path, b"") }
    }

    fn non(self) -> Self {
        Self { mtype: MessageType::NonConfirmable, ..self }
    }

    fn token(self, token: &[u8]) -> Self {
        Self { token: Some(token.to_vec()), ..self }
    }

    fn option(mut self, number: u16, value: &[u8]) -> Self {
        self.options.push((number, value.to_vec()));
        self
    }

    fn uint(self, number: u16, value: u32) -> Self {
        let bytes = value.to_be_bytes();
        let skip = (value.leading_zeros() / 8) as usize;
        self.option(number, &bytes[skip.min(4)..])
    }

    fn block1(self, num: u32, more: bool, szx: u8) -> Self {
        self.uint(option::BLOCK1, BlockOption { num, more, szx }.value())
    }

    fn block2(self, num: u32, szx: u8) -> Self {
        self.uint(option::BLOCK2, BlockOption { num, more: false, szx }.value())
    }

    fn bytes(&self) -> Bytes {
        let mut options = self.options.clone();
        for segment in self.path.split('/').filter(|s| !s.is_empty()) {
            options.push((option::URI_PATH, segment.as_bytes().to_vec()));
        }
        options.sort_by_key(|(n, _)| *n);
        let mut out = BytesMut::new();
        let token = self.token.as_deref().unwrap_or_default();
        let mut w =
            MessageWriter::new(&mut out, self.mtype, self.code, self.mid.unwrap_or(0), token)
                .unwrap();
        for (n, v) in &options {
            w.option(*n, v).unwrap();
        }
        w.payload(&self.payload);
        out.freeze()
    }
}

fn is_empty_ack(m: &Message, mid: u16) -> bool {
    m.mtype() == MessageType::Acknowledgement && m.code().is_empty() && m.message_id() == mid
}

/// A session with its 1/KP session open: the first request opened it and was answered.
fn opened(settings: Settings) -> Sim {
    let mut sim = Sim::new(settings);
    sim.send(Req::post(PATH, b"[0]"));
    sim.open();
    let request = sim.forwarded();
    sim.echo(&request);
    sim.take_sent();
    sim
}

// ---- piggybacked and separate responses ----

#[test]
fn an_answer_within_the_ack_timeout_is_piggybacked() {
    let mut sim = Sim::new(Settings::default());
    let (mid, token) = sim.send(Req::post(PATH, b"[1]"));
    let session = sim.open();
    let request = match sim.event() {
        Event::Request { session: s, request } => {
            assert_eq!(s, session);
            request
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(request.topic.as_str(), PATH);
    assert_eq!(&request.payload[..], b"[1]");
    assert!(request.wants_answer);
    sim.session.request_done(request.tag, Ok(()), sim.now);
    sim.advance(SECOND);
    sim.nothing_sent();
    sim.echo(&request);
    let ack = sim.one_sent();
    assert_eq!(
        (ack.mtype(), ack.code(), ack.message_id()),
        (MessageType::Acknowledgement, Code::CHANGED, mid)
    );
    assert_eq!(ack.token().as_slice(), &token[..]);
    assert_eq!(&ack.payload()[..], b"[1]");
    // Nothing is left to do: no ACK deadline, no retransmission.
    sim.advance(10 * SECOND);
    sim.nothing_sent();
    assert_eq!((sim.stats.messages_received, sim.stats.messages_sent), (1, 1));
    assert_eq!(sim.stats.separate_responses, 0);
}

#[test]
fn an_answer_after_the_ack_timeout_comes_separately_after_an_empty_ack() {
    let mut sim = opened(Settings::default());
    let (mid, token) = sim.send(Req::post(PATH, b"[2]"));
    let request = sim.forwarded();
    // The empty ACK goes out exactly at the ACK timeout.
    sim.advance(2 * SECOND - Duration::from_nanos(1));
    sim.nothing_sent();
    sim.advance(Duration::from_nanos(1));
    let (at, ack) = sim.sent.pop_front().unwrap();
    assert_eq!(at, 2 * SECOND);
    assert!(is_empty_ack(&ack, mid));
    sim.echo(&request);
    let response = sim.one_sent();
    assert_eq!((response.mtype(), response.code()), (MessageType::Confirmable, Code::CHANGED));
    assert_ne!(response.message_id(), mid, "a separate response has a message id of ours");
    assert_eq!(response.token().as_slice(), &token[..]);
    sim.send_empty(MessageType::Acknowledgement, response.message_id());
    sim.advance(100 * SECOND);
    sim.nothing_sent();
    assert_eq!(sim.stats.separate_responses, 1);
    assert_eq!(sim.stats.retransmissions, 0);
}

#[test]
fn non_confirmable_requests_get_non_confirmable_responses_and_duplicates_are_dropped() {
    let mut sim = opened(Settings::default());
    let req = Req::post(PATH, b"[3]").non();
    let (mid, token) = sim.send(req);
    let request = sim.forwarded();
    // A NON request has no ACK deadline: the answer may come late and is still NON.
    sim.advance(5 * SECOND);
    sim.nothing_sent();
    sim.echo(&request);
    let response = sim.one_sent();
    assert_eq!((response.mtype(), response.code()), (MessageType::NonConfirmable, Code::CHANGED));
    assert_eq!(response.token().as_slice(), &token[..]);
    sim.send(Req::post(PATH, b"[3]").non().token(&token).mid(mid));
    sim.nothing_sent();
    sim.no_event();
    assert_eq!(sim.stats.duplicates, 1);
}

impl Req {
    fn mid(self, mid: u16) -> Self {
        Self { mid: Some(mid), ..self }
    }
}

// ---- retransmission ----

/// Sends a request, lets its answer come late, and returns the simulated times at which the
/// separate response went out (the first and every retransmission), never acknowledged.
fn unacknowledged_schedule(seed: u64) -> (Vec<Duration>, Sim) {
    let mut sim = Sim::seeded(Settings::default(), seed);
    sim.send(Req::post(PATH, b"[4]"));
    sim.open();
    let request = sim.forwarded();
    sim.advance(2 * SECOND);
    sim.take_sent();
    sim.echo(&request);
    sim.advance(200 * SECOND);
    let copies: Vec<_> = sim.sent.drain(..).collect();
    let first = copies[0].1.datagram().clone();
    assert!(copies.iter().all(|(_, m)| *m.datagram() == first), "retransmissions are copies");
    (copies.into_iter().map(|(at, _)| at).collect(), sim)
}

#[test]
fn confirmable_responses_are_retransmitted_with_exponential_backoff_then_given_up() {
    let (times, sim) = unacknowledged_schedule(11);
    assert_eq!(times.len(), 5, "the response and MAX_RETRANSMIT = 4 copies: {times:?}");
    assert_eq!(times[0], 2 * SECOND);
    let initial = times[1] - times[0];
    // ACK_TIMEOUT times a random factor in [1, 1.5].
    assert!(initial >= 2 * SECOND && initial <= 3 * SECOND, "{initial:?}");
    for (i, pair) in times.windows(2).enumerate() {
        assert_eq!(pair[1] - pair[0], initial * (1 << i), "the timeout doubles: {times:?}");
    }
    assert_eq!(sim.stats.retransmissions, 4);
    assert_eq!(sim.stats.retransmit_timeouts, 1);
    assert!(sim.diagnostics.iter().any(|d| matches!(d, Diagnostic::GaveUp { .. })));
    // Given up after the last timeout (16 times the initial one): nothing is left pending.
    let (_, mut later) = unacknowledged_schedule(11);
    later.advance(Duration::from_secs(1000));
    later.nothing_sent();
}

#[test]
fn the_retransmission_jitter_comes_from_the_seed() {
    let (a, _) = unacknowledged_schedule(1);
    let (b, _) = unacknowledged_schedule(1);
    assert_eq!(a, b, "the same seed, the same schedule");
    let differs = (2..10).any(|seed| unacknowledged_schedule(seed).0 != a);
    assert!(differs, "other seeds, other jitter");
}

#[test]
fn a_reset_stops_the_retransmission_of_a_separate_response() {
    let mut sim = opened(Settings::default());
    sim.send(Req::post(PATH, b"[5]"));
    let request = sim.forwarded();
    sim.advance(2 * SECOND);
    sim.take_sent();
    sim.echo(&request);
    let response = sim.one_sent();
    sim.send_empty(MessageType::Reset, response.message_id());
    sim.advance(100 * SECOND);
    sim.nothing_sent();
    assert_eq!(sim.stats.resets_received, 1);
    assert_eq!(sim.stats.retransmissions, 0);
}

// ---- deduplication ----

#[test]
fn duplicates_are_answered_from_the_cache_for_the_exchange_lifetime() {
    let settings = Settings { exchange_lifetime: 10 * SECOND, ..Settings::default() };
    let mut sim = opened(settings);
    let req = Req::post(PATH, b"[6]").mid(0x4000).token(b"t6");
    sim.deliver(req.bytes());
    let request = sim.forwarded();
    sim.echo(&request);
    let first = sim.one_sent();
    sim.advance(5 * SECOND);
    sim.deliver(req.bytes());
    let again = sim.one_sent();
    assert_eq!(again.datagram(), first.datagram(), "the same bytes, from the cache");
    sim.no_event();
    assert_eq!(sim.stats.duplicates, 1);
    // Just before the lifetime ends it is still a duplicate; after, a new request.
    sim.advance(5 * SECOND - Duration::from_nanos(1));
    sim.deliver(req.bytes());
    assert_eq!(sim.one_sent().datagram(), first.datagram());
    sim.no_event();
    sim.advance(Duration::from_nanos(1));
    sim.deliver(req.bytes());
    sim.forwarded();
    assert_eq!(sim.stats.duplicates, 2);
}

#[test]
fn a_duplicate_while_the_answer_is_pending_is_acknowledged_and_forwarded_once() {
    let mut sim = opened(Settings::default());
    let req = Req::post(PATH, b"[7]").mid(0x4100).token(b"t7");
    sim.deliver(req.bytes());
    let request = sim.forwarded();
    sim.advance(SECOND / 2);
    sim.deliver(req.bytes());
    assert!(is_empty_ack(&sim.one_sent(), 0x4100));
    sim.no_event();
    sim.echo(&request);
    let response = sim.one_sent();
    assert_eq!(response.mtype(), MessageType::Confirmable);
    // Later duplicates get the empty ACK again.
    sim.deliver(req.bytes());
    assert!(is_empty_ack(&sim.one_sent(), 0x4100));
}

#[test]
fn the_dedup_cache_is_bounded_by_max_exchanges() {
    let settings = Settings { max_exchanges: 2, ..Settings::default() };
    let mut sim = opened(settings);
    for mid in [1, 2, 3] {
        sim.send(Req::post(PATH, b"[]").mid(mid));
        let request = sim.forwarded();
        sim.echo(&request);
    }
    sim.take_sent();
    // Message id 1 was forgotten early (oldest first): it is a new request again.
    sim.send(Req::post(PATH, b"[]").mid(1));
    sim.forwarded();
}

// ---- limits and refusals ----

#[test]
fn too_many_requests_in_flight_get_5_03() {
    let settings = Settings { max_exchanges: 2, ..Settings::default() };
    let mut sim = opened(settings);
    sim.send(Req::post(PATH, b"[]"));
    sim.send(Req::post(PATH, b"[]"));
    sim.forwarded();
    sim.forwarded();
    sim.send(Req::post(PATH, b"[]"));
    let refusal = sim.one_sent();
    assert_eq!(refusal.code(), Code::SERVICE_UNAVAILABLE);
    assert_eq!(refusal.known().max_age, Some(1));
    sim.no_event();
}

#[test]
fn the_transport_refuses_what_it_does_not_serve() {
    let mut sim = opened(Settings::default());
    let cases = [
        (Req { code: Code::DELETE, ..Req::post(PATH, b"") }, Code::METHOD_NOT_ALLOWED),
        (
            Req::post(PATH, b"").option(option::PROXY_URI, b"coap://x/"),
            Code::PROXYING_NOT_SUPPORTED,
        ),
        (Req::post(PATH, b"").option(option::OSCORE, b""), Code::BAD_OPTION),
        (Req::post(PATH, b"").option(option::IF_NONE_MATCH, b""), Code::BAD_OPTION),
        (Req::post("kp2/x/y/z", b""), Code::NOT_FOUND),
        (Req::post(PATH, &[b'x'; 70_000]), Code::REQUEST_ENTITY_TOO_LARGE),
        (Req::post(PATH, b"").option(option::URI_QUERY, b"u=\xff"), Code::BAD_REQUEST),
    ];
    for (req, code) in cases {
        sim.send(req);
        let answer = sim.one_sent();
        assert_eq!((answer.mtype(), answer.code()), (MessageType::Acknowledgement, code));
        assert!(!answer.payload().is_empty(), "a reason as diagnostic payload");
    }
    sim.no_event();
    let refused = sim.diagnostics.iter().filter(|d| matches!(d, Diagnostic::Refused { .. }));
    assert_eq!(refused.count(), 7);
}

#[test]
fn pings_responses_and_malformed_confirmables_are_reset() {
    let mut sim = opened(Settings::default());
    sim.send_empty(MessageType::Confirmable, 0x4242);
    let rst = sim.one_sent();
    assert_eq!((rst.mtype(), rst.message_id()), (MessageType::Reset, 0x4242));
    sim.deliver(Bytes::from_static(b"\x40\x02\x43\x43\xf1a"));
    assert_eq!(sim.one_sent().message_id(), 0x4343);
    // A confirmable response to nothing we asked.
    sim.send(Req { code: Code::CONTENT, ..Req::post("", b"") }.mid(0x4444));
    let rst = sim.one_sent();
    assert_eq!((rst.mtype(), rst.message_id()), (MessageType::Reset, 0x4444));
    // A malformed NON, and another version: silently dropped.
    sim.deliver(Bytes::from_static(b"\x50\x02\x44\x45\xf1a"));
    sim.deliver(Bytes::from_static(b"\x80\x02\x44\x44"));
    sim.nothing_sent();
    assert_eq!(sim.stats.protocol_errors, 3);
}

// ---- sessions ----

#[test]
fn requests_wait_for_the_session_to_open() {
    let mut sim = Sim::new(Settings::default());
    let (mid1, _) = sim.send(Req::post(PATH, b"[1]"));
    let (_, _) = sim.send(Req::post(PATH, b"[2]").non());
    assert!(matches!(sim.event(), Event::OpenSession { username: None, password: None }));
    sim.no_event();
    // The gateway takes its time: the confirmable request is acknowledged meanwhile.
    sim.advance(3 * SECOND);
    assert!(is_empty_ack(&sim.one_sent(), mid1));
    let id = SessionId(9);
    sim.session.session_opened(Ok(ClientIdentity { session: id, client_id: None }), sim.now);
    sim.collect();
    assert_eq!(sim.session.session(), Some(id));
    let first = sim.forwarded();
    let second = sim.forwarded();
    assert_eq!((&first.payload[..], &second.payload[..]), (&b"[1]"[..], &b"[2]"[..]), "in order");
    sim.echo(&second);
    sim.echo(&first);
    let sent = sim.take_sent();
    assert_eq!(sent[0].mtype(), MessageType::NonConfirmable);
    assert_eq!(sent[1].mtype(), MessageType::Confirmable, "separate, after the empty ACK");
    assert_eq!(sim.stats.sessions_opened, 1);
}

#[test]
fn a_refused_session_answers_the_requests_with_those_credentials_and_asks_again_for_others() {
    let mut sim = Sim::new(Settings::default());
    let intruder = |r: Req| r.option(option::URI_QUERY, b"u=intruder");
    sim.send(intruder(Req::post(PATH, b"[1]")));
    sim.send(intruder(Req::post(PATH, b"[2]")));
    sim.send(Req::post(PATH, b"[3]").option(option::URI_QUERY, b"u=device"));
    match sim.event() {
        Event::OpenSession { username, .. } => assert_eq!(username.as_deref(), Some("intruder")),
        other => panic!("{other:?}"),
    }
    sim.no_event();
    sim.session.session_opened(Err(KpError::unauthorized("bad credentials")), sim.now);
    sim.collect();
    let refused = sim.take_sent();
    assert_eq!(refused.len(), 2);
    for m in &refused {
        assert_eq!((m.mtype(), m.code()), (MessageType::Acknowledgement, Code::UNAUTHORIZED));
        assert_eq!(&m.payload()[..], b"bad credentials");
    }
    match sim.event() {
        Event::OpenSession { username, .. } => assert_eq!(username.as_deref(), Some("device")),
        other => panic!("{other:?}"),
    }
    sim.session
        .session_opened(Ok(ClientIdentity { session: SessionId(2), client_id: None }), sim.now);
    sim.collect();
    assert_eq!(&sim.forwarded().payload[..], b"[3]");
    assert_eq!((sim.stats.sessions_refused, sim.stats.sessions_opened), (1, 1));
}

#[test]
fn other_credentials_on_an_open_session_get_4_01() {
    let mut sim = Sim::new(Settings::default());
    sim.send(Req::post(PATH, b"[1]").option(option::URI_QUERY, b"u=device"));
    // One more waits with other credentials; it is refused once the session opens.
    sim.send(Req::post(PATH, b"[2]").option(option::URI_QUERY, b"u=other"));
    sim.open();
    sim.forwarded();
    assert_eq!(sim.one_sent().code(), Code::UNAUTHORIZED);
    sim.no_event();
    // On the open session: other credentials are refused, the same or none are fine.
    sim.send(Req::post(PATH, b"[3]").option(option::URI_QUERY, b"u=someone-else"));
    assert_eq!(sim.one_sent().code(), Code::UNAUTHORIZED);
    sim.send(Req::post(PATH, b"[4]").option(option::URI_QUERY, b"u=device"));
    sim.forwarded();
    sim.send(Req::post(PATH, b"[5]"));
    sim.forwarded();
}

#[test]
fn requests_may_complete_in_any_order() {
    let mut sim = opened(Settings::default());
    let sent: Vec<(u16, Vec<u8>)> =
        (0..4u8).map(|i| sim.send(Req::post(PATH, &[b'0' + i]))).collect();
    let requests: Vec<KpRequest> = (0..4)
        .map(|_| match sim.event() {
            Event::Request { request, .. } => request,
            other => panic!("{other:?}"),
        })
        .collect();
    // Several in flight at once: acceptances and answers come back interleaved, out of order.
    sim.echo(&requests[2]);
    sim.session.request_done(requests[0].tag, Ok(()), sim.now);
    sim.session.request_done(requests[1].tag, Err(KpError::forbidden("not yours")), sim.now);
    sim.session.request_done(requests[2].tag, Ok(()), sim.now);
    sim.echo(&requests[3]);
    sim.echo(&requests[0]);
    sim.session.request_done(requests[3].tag, Err(KpError::unavailable("too late")), sim.now);
    sim.collect();
    let answers = sim.take_sent();
    assert_eq!(answers.len(), 4, "one answer each: {answers:?}");
    let expect = [(2, Code::CHANGED), (1, Code::FORBIDDEN), (3, Code::CHANGED), (0, Code::CHANGED)];
    for (m, (i, code)) in answers.iter().zip(expect) {
        assert_eq!((m.message_id(), m.token().as_slice()), (sent[i].0, &sent[i].1[..]));
        assert_eq!(m.code(), code);
        if code == Code::CHANGED {
            assert_eq!(m.payload()[..], [b'0' + i as u8]);
        }
    }
    // An answer to a request already refused is not sent twice.
    sim.echo(&requests[1]);
    assert!(sim.take_sent().iter().all(|m| m.mtype() != MessageType::Acknowledgement));
}

#[test]
fn the_session_lost_forgets_its_state_and_the_next_request_opens_another() {
    let mut sim = opened(Settings::default());
    let token = register(&mut sim, CONFIG);
    assert_eq!(sim.session.observations(), 1);
    sim.session.session_lost();
    sim.collect();
    assert_eq!(sim.session.session(), None);
    assert_eq!(sim.session.observations(), 0);
    assert_eq!(sim.stats.observations_ended, 1);
    sim.push(CONFIG, b"{}");
    assert!(sim.take_sent().iter().all(|m| m.token().as_slice() != &token[..]));
    sim.send(Req::post(PATH, b"[]"));
    sim.open();
    sim.forwarded();
}

#[test]
fn idle_peers_close_their_session() {
    let settings = Settings { idle_timeout: 30 * SECOND, ..Settings::default() };
    let mut sim = opened(settings);
    register(&mut sim, CONFIG);
    // Traffic keeps it alive; the deadline is measured from the last datagram.
    sim.advance(20 * SECOND);
    sim.send(Req::post(PATH, b"[]"));
    let request = sim.forwarded();
    sim.echo(&request);
    sim.take_sent();
    sim.advance(30 * SECOND - Duration::from_nanos(1));
    assert!(!sim.session.is_closed());
    sim.advance(Duration::from_nanos(1));
    assert!(sim.session.is_closed());
    assert!(matches!(sim.event(), Event::CloseSession(SessionId(41))));
    assert_eq!(sim.session.poll_timeout(), None);
    assert_eq!(sim.stats.sessions_expired, 1);
    assert_eq!(sim.stats.observations_registered, sim.stats.observations_ended);
    // Closed: nothing more goes in or out.
    sim.send(Req::post(PATH, b"[]"));
    sim.nothing_sent();
    sim.no_event();
}

#[test]
fn a_session_opened_for_a_closed_peer_is_closed_again() {
    let mut sim = Sim::new(Settings::default());
    sim.send(Req::post(PATH, b"[]"));
    assert!(matches!(sim.event(), Event::OpenSession { .. }));
    sim.session.close();
    sim.session
        .session_opened(Ok(ClientIdentity { session: SessionId(5), client_id: None }), sim.now);
    sim.collect();
    assert!(matches!(sim.event(), Event::CloseSession(SessionId(5))));
    sim.no_event();
    sim.nothing_sent();
}

// ---- Block1 ----

fn text(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

#[test]
fn block1_requests_are_reassembled() {
    let mut sim = opened(Settings::default());
    let payload = text(2500);
    let token = b"b1".to_vec();
    for (num, chunk) in payload.chunks(1024).enumerate() {
        let more = num < 2;
        sim.send(Req::post(PATH, chunk).token(&token).block1(num as u32, more, 6));
        if more {
            let cont = sim.one_sent();
            assert_eq!(cont.code(), Code::CONTINUE);
            let block = BlockOption { num: num as u32, more: true, szx: 6 };
            assert_eq!(cont.known().block1, Some(block));
            sim.no_event();
        }
    }
    let request = sim.forwarded();
    assert_eq!(request.payload, payload, "the gateway gets the whole payload");
    sim.respond(&request, KpOutcome::Success(Bytes::from_static(b"ok")));
    let last = sim.one_sent();
    assert_eq!(last.code(), Code::CHANGED);
    assert_eq!(last.known().block1, Some(BlockOption { num: 2, more: false, szx: 6 }));
    assert_eq!(sim.stats.block_transfers, 1);
}

#[test]
fn block1_asks_for_smaller_blocks_when_its_own_are_smaller() {
    let settings = Settings { block_size_bytes: 256, ..Settings::default() };
    let mut sim = opened(settings);
    sim.send(Req::post(PATH, &text(1024)).block1(0, true, 6));
    let cont = sim.one_sent();
    assert_eq!(cont.known().block1, Some(BlockOption { num: 0, more: true, szx: 4 }));
}

#[test]
fn block1_errors() {
    let settings = Settings {
        max_payload_bytes: 2048,
        max_block_transfers: 1,
        block_transfer_timeout: 10 * SECOND,
        ..Settings::default()
    };
    let mut sim = opened(settings);
    let block = |num: u32, more: bool| Req::post(PATH, &[b'x'; 1024]).block1(num, more, 6);
    fn code_of(sim: &mut Sim, req: Req) -> Message {
        sim.send(req);
        sim.one_sent()
    }
    // A block out of order, with no transfer in progress.
    assert_eq!(code_of(&mut sim, block(3, true)).code(), Code::REQUEST_ENTITY_INCOMPLETE);
    // A block whose payload does not match its size; BERT.
    let short = Req::post(PATH, &[b'x'; 100]).block1(0, true, 6);
    assert_eq!(code_of(&mut sim, short).code(), Code::BAD_REQUEST);
    let bert = Req::post(PATH, &[b'x'; 100]).block1(0, false, 7);
    assert_eq!(code_of(&mut sim, bert).code(), Code::BAD_REQUEST);
    // Size1 announces too much: refused at once, with the limit.
    let announced = block(0, true).uint(option::SIZE1, 4096);
    let m = code_of(&mut sim, announced);
    assert_eq!((m.code(), m.known().size1), (Code::REQUEST_ENTITY_TOO_LARGE, Some(2048)));
    // Too much arrives: refused at the block that passes the limit.
    assert_eq!(code_of(&mut sim, block(0, true)).code(), Code::CONTINUE);
    assert_eq!(code_of(&mut sim, block(1, true)).code(), Code::CONTINUE);
    let m = code_of(&mut sim, block(2, false));
    assert_eq!((m.code(), m.known().size1), (Code::REQUEST_ENTITY_TOO_LARGE, Some(2048)));
    // A block repeated out of order ends the transfer.
    assert_eq!(code_of(&mut sim, block(0, true)).code(), Code::CONTINUE);
    assert_eq!(code_of(&mut sim, block(2, true)).code(), Code::REQUEST_ENTITY_INCOMPLETE);
    assert_eq!(code_of(&mut sim, block(1, true)).code(), Code::REQUEST_ENTITY_INCOMPLETE);
    // One transfer at a time here: a second path gets 5.03.
    assert_eq!(code_of(&mut sim, block(0, true)).code(), Code::CONTINUE);
    let other = Req::post("kp1/demo-v1/dcx/tok-1/other", &[b'x'; 1024]).block1(0, true, 6);
    let m = code_of(&mut sim, other);
    assert_eq!((m.code(), m.known().max_age), (Code::SERVICE_UNAVAILABLE, Some(5)));
    // A transfer idle past its timeout is dropped: its next block gets 4.08.
    sim.advance(10 * SECOND);
    assert_eq!(code_of(&mut sim, block(1, true)).code(), Code::REQUEST_ENTITY_INCOMPLETE);
    sim.no_event();
    assert_eq!(sim.stats.block_transfers, 0);
}

// ---- Block2 ----

#[test]
fn later_blocks_of_a_large_answer_are_served_from_memory() {
    let settings = Settings { block_transfer_timeout: 10 * SECOND, ..Settings::default() };
    let mut sim = opened(settings);
    let body = text(2500);
    // The client asks for 256-byte blocks.
    sim.send(Req::post(PATH, b"[]").block2(0, 4));
    let request = sim.forwarded();
    sim.respond(&request, KpOutcome::Success(Bytes::from(body.clone())));
    let first = sim.one_sent();
    assert_eq!(first.known().block2, Some(BlockOption { num: 0, more: true, szx: 4 }));
    assert_eq!(first.known().size2, Some(2500));
    let mut got = first.payload().to_vec();
    for num in 1..10 {
        sim.advance(SECOND);
        sim.send(Req::post(PATH, b"").block2(num, 4));
        let m = sim.one_sent();
        assert_eq!(m.code(), Code::CHANGED);
        assert_eq!(m.known().block2.map(|b| (b.num, b.more)), Some((num, num < 9)));
        got.extend_from_slice(m.payload());
    }
    assert_eq!(got, body);
    sim.no_event();
    // Past the end: 4.02. Kept no longer than the transfer timeout after the last block: 4.08.
    sim.send(Req::post(PATH, b"").block2(10, 4));
    assert_eq!(sim.one_sent().code(), Code::BAD_OPTION);
    sim.advance(10 * SECOND);
    sim.send(Req::post(PATH, b"").block2(1, 4));
    assert_eq!(sim.one_sent().code(), Code::REQUEST_ENTITY_INCOMPLETE);
}

// ---- Observe ----

/// Registers a confirmable observation of `path` and answers it; returns the token.
fn register(sim: &mut Sim, path: &str) -> Vec<u8> {
    let (_, token) = sim.send(Req::get(path).uint(option::OBSERVE, 0));
    let request = sim.forwarded();
    sim.respond(&request, KpOutcome::Success(Bytes::from_static(b"{}")));
    let first = sim.one_sent();
    assert_eq!(first.code(), Code::CONTENT);
    assert!(first.known().observe.is_some(), "the first notification carries Observe");
    token
}

#[test]
fn observe_registers_and_notifies_with_increasing_sequence_numbers() {
    let mut sim = opened(Settings::default());
    let (_, token) = sim.send(Req::get(CONFIG).uint(option::OBSERVE, 0));
    let request = sim.forwarded();
    assert_eq!(request.topic.as_str(), CONFIG);
    // Not active before its answer: a push meanwhile is not a notification.
    sim.push(CONFIG, b"early");
    sim.nothing_sent();
    sim.respond(&request, KpOutcome::Success(Bytes::from_static(b"{\"v\":0}")));
    let first = sim.one_sent();
    assert_eq!(first.known().max_age, Some(60));
    let mut seq = first.known().observe.unwrap();
    assert_eq!(sim.session.observations(), 1);
    for v in 1..=3u8 {
        sim.push(CONFIG, b"{}");
        let note = sim.one_sent();
        assert_eq!((note.mtype(), note.code()), (MessageType::Confirmable, Code::CONTENT));
        assert_eq!(note.token().as_slice(), &token[..]);
        let next = note.known().observe.unwrap();
        assert!(next > seq, "notification {v}: {next} after {seq}");
        seq = next;
        sim.send_empty(MessageType::Acknowledgement, note.message_id());
    }
    // Pushes for other paths are not notifications.
    sim.push("kp1/demo-v1/cmx/tok-1/other", b"x");
    sim.nothing_sent();
    assert_eq!(sim.stats.pushes_unobserved, 2);
    assert_eq!(sim.stats.notifications, 3);
    sim.advance(100 * SECOND);
    sim.nothing_sent();
    assert_eq!(sim.stats.retransmissions, 0, "acknowledged notifications are not repeated");
}

#[test]
fn a_non_confirmable_registration_gets_non_confirmable_notifications_and_a_reset_cancels() {
    let mut sim = opened(Settings::default());
    sim.send(Req::get(CONFIG).uint(option::OBSERVE, 0).non());
    let request = sim.forwarded();
    sim.respond(&request, KpOutcome::Success(Bytes::new()));
    sim.take_sent();
    sim.push(CONFIG, b"{}");
    let note = sim.one_sent();
    assert_eq!(note.mtype(), MessageType::NonConfirmable);
    sim.send_empty(MessageType::Reset, note.message_id());
    assert_eq!(sim.session.observations(), 0);
    sim.push(CONFIG, b"{}");
    sim.nothing_sent();
}

#[test]
fn a_reset_to_a_confirmable_notification_cancels_the_observation() {
    let mut sim = opened(Settings::default());
    register(&mut sim, CONFIG);
    sim.push(CONFIG, b"{}");
    let note = sim.one_sent();
    sim.send_empty(MessageType::Reset, note.message_id());
    assert_eq!(sim.session.observations(), 0);
    sim.advance(100 * SECOND);
    sim.nothing_sent();
    assert_eq!(sim.stats.resets_received, 1);
}

#[test]
fn an_unacknowledged_confirmable_notification_ends_the_observation() {
    let mut sim = opened(Settings::default());
    register(&mut sim, CONFIG);
    sim.push(CONFIG, b"{}");
    sim.advance(200 * SECOND);
    assert_eq!(sim.take_sent().len(), 5, "the notification and four retransmissions");
    assert_eq!(sim.stats.retransmit_timeouts, 1);
    assert_eq!(sim.session.observations(), 0);
    sim.push(CONFIG, b"{}");
    sim.nothing_sent();
}

#[test]
fn a_newer_notification_takes_over_the_one_in_flight() {
    let mut sim = opened(Settings::default());
    register(&mut sim, CONFIG);
    sim.push(CONFIG, b"1");
    let first = sim.one_sent();
    sim.advance(SECOND);
    sim.push(CONFIG, b"2");
    let second = sim.one_sent();
    assert_ne!(first.message_id(), second.message_id());
    // Only the newer one is retransmitted, on the older one's schedule.
    sim.advance(2 * SECOND);
    let again = sim.one_sent();
    assert_eq!(again.datagram(), second.datagram());
    // The newer one's ACK ends it.
    sim.send_empty(MessageType::Acknowledgement, second.message_id());
    sim.advance(100 * SECOND);
    sim.nothing_sent();
    assert_eq!(sim.session.observations(), 1);
}

#[test]
fn observe_1_and_error_notifications_deregister() {
    let mut sim = opened(Settings::default());
    let token = register(&mut sim, CONFIG);
    sim.send(Req::get(CONFIG).uint(option::OBSERVE, 1).token(&token));
    assert_eq!(sim.session.observations(), 0);
    let request = sim.forwarded();
    sim.respond(&request, KpOutcome::Success(Bytes::new()));
    assert_eq!(sim.one_sent().known().observe, None, "answered as a plain GET");
    register(&mut sim, CONFIG);
    let error = KpOutcome::Error(KpError::not_found("gone"));
    sim.session.on_response(
        KpResponse {
            base: Bytes::from_static(CONFIG.as_bytes()),
            request_id: None,
            tag: 0,
            outcome: error,
        },
        sim.now,
    );
    sim.collect();
    let last = sim.one_sent();
    assert_eq!((last.code(), last.known().observe), (Code::NOT_FOUND, None));
    assert_eq!(sim.session.observations(), 0);
    assert_eq!(sim.stats.observations_registered, sim.stats.observations_ended);
}

#[test]
fn an_error_answer_to_a_registration_is_not_an_observation() {
    let mut sim = opened(Settings::default());
    sim.send(Req::get(CONFIG).uint(option::OBSERVE, 0));
    let request = sim.forwarded();
    sim.respond(&request, KpOutcome::Error(KpError::not_found("no config")));
    let m = sim.one_sent();
    assert_eq!((m.code(), m.known().observe), (Code::NOT_FOUND, None));
    assert_eq!(sim.session.observations(), 0);
}

#[test]
fn registrations_past_the_limit_are_served_as_plain_gets() {
    let settings = Settings { max_observations: 1, ..Settings::default() };
    let mut sim = opened(settings);
    register(&mut sim, CONFIG);
    sim.send(Req::get("kp1/demo-v1/cmx/tok-1/config/other").uint(option::OBSERVE, 0));
    let request = sim.forwarded();
    sim.respond(&request, KpOutcome::Success(Bytes::new()));
    assert_eq!(sim.one_sent().known().observe, None);
    assert_eq!(sim.session.observations(), 1);
}

#[test]
fn large_notifications_go_block_wise() {
    let mut sim = opened(Settings::default());
    register(&mut sim, CONFIG);
    static BIG: [u8; 2500] = [b'z'; 2500];
    sim.push(CONFIG, &BIG);
    let note = sim.one_sent();
    assert_eq!(note.known().block2, Some(BlockOption { num: 0, more: true, szx: 6 }));
    assert!(note.known().observe.is_some());
    sim.send_empty(MessageType::Acknowledgement, note.message_id());
    sim.send(Req::get(CONFIG).block2(1, 6));
    let m = sim.one_sent();
    assert_eq!((m.code(), m.payload().len()), (Code::CONTENT, 1024));
    sim.no_event();
}

// ---- peers that have not proven a token ----

#[test]
fn answers_to_an_unproven_peer_are_no_larger_than_the_request() {
    let mut sim = Sim::new(Settings::default());
    // A bare GET (4 bytes, no token, no path): 4.04 without its diagnostic payload.
    let bare = Req { path: String::new(), token: Some(Vec::new()), ..Req::get("") };
    let len = bare.bytes().len();
    sim.send(bare);
    let answer = sim.one_sent();
    assert_eq!(answer.code(), Code::NOT_FOUND);
    assert!(answer.datagram().len() <= len, "{} > {len}", answer.datagram().len());
    assert!(answer.payload().is_empty());
    // A refused token: the code alone.
    let (_, token) = sim.send(Req::post(PATH, b"[1]"));
    sim.open();
    let request = match sim.event() {
        Event::Request { request, .. } => request,
        other => panic!("{other:?}"),
    };
    let long = "this endpoint token is not known for this application version, sorry";
    sim.session.request_done(request.tag, Err(KpError::unauthorized(long)), sim.now);
    sim.collect();
    let answer = sim.one_sent();
    assert_eq!((answer.code(), answer.token().as_slice()), (Code::UNAUTHORIZED, &token[..]));
    assert!(answer.payload().is_empty(), "no reason phrase to an unproven peer");
    assert!(!sim.session.is_proven());
    assert_eq!(sim.stats.replies_trimmed, 2);
    // Once the gateway accepts a request the peer is proven and answers are whole again.
    sim.send(Req::post(PATH, b"[2]"));
    let request = sim.forwarded();
    assert!(sim.session.is_proven());
    assert_eq!(sim.stats.proven, 1);
    sim.respond(&request, KpOutcome::Error(KpError::new(404, "a long reason phrase, in full")));
    assert_eq!(sim.one_sent().payload().as_ref(), b"a long reason phrase, in full");
}

#[test]
fn an_unproven_peer_gets_one_retransmission_burst_at_most() {
    let mut sim = Sim::new(Settings::default());
    sim.send(Req::post(PATH, b"[1]"));
    sim.open();
    let first = match sim.event() {
        Event::Request { request, .. } => request,
        other => panic!("{other:?}"),
    };
    let (mid2, _) = sim.send(Req::post(PATH, b"[2]"));
    let second = match sim.event() {
        Event::Request { request, .. } => request,
        other => panic!("{other:?}"),
    };
    // Both refusals come after the ACK timeout: empty ACKs, then separate responses.
    sim.advance(3 * SECOND);
    assert!(sim.take_sent().iter().any(|m| is_empty_ack(m, mid2)));
    for request in [&first, &second] {
        sim.session.request_done(request.tag, Err(KpError::unauthorized("no")), sim.now);
    }
    sim.collect();
    assert_eq!(sim.take_sent().len(), 2, "two separate responses");
    // Never acknowledged: only the first is retransmitted (4 times), not the second.
    sim.advance(120 * SECOND);
    assert_eq!(sim.take_sent().len(), 4, "one retransmission burst");
}

#[test]
fn block1_buffers_grow_with_the_blocks_not_with_size1_and_unproven_ones_stay_in_budget() {
    let budget = super::Block1Budget::new(2048);
    let mut sim = Sim::new(Settings::default());
    sim.session.set_block1_budget(budget.clone());
    let block = |num: u32| Req::post(PATH, &[b'x'; 1024]).block1(num, true, 6);
    sim.send(block(0).uint(option::SIZE1, 65_536));
    assert_eq!(sim.one_sent().code(), Code::CONTINUE);
    let capacity = sim.session.transfers[0].buf.capacity();
    assert!(capacity < 4096, "a declared 64 KiB reserves nothing: capacity {capacity}");
    assert_eq!(budget.used(), 1024);
    sim.send(block(1));
    assert_eq!(sim.one_sent().code(), Code::CONTINUE);
    // The budget of 2 KiB is spent: 5.03 with a Max-Age, and the transfer gives its bytes back.
    sim.send(block(2));
    let m = sim.one_sent();
    assert_eq!((m.code(), m.known().max_age), (Code::SERVICE_UNAVAILABLE, Some(5)));
    assert_eq!(budget.used(), 0);
    assert_eq!(sim.stats.block1_budget_refusals, 1);
    // Proven, the peer's transfers no longer count against the budget.
    sim.send(Req::post(PATH, b"[1]"));
    sim.open();
    sim.forwarded();
    sim.take_sent();
    for num in 0..4 {
        sim.send(block(num));
        assert_eq!(sim.one_sent().code(), Code::CONTINUE);
    }
    assert_eq!(budget.used(), 0);
}
