//! One HTTP connection: its gateway sessions, the requests waiting for their answers and the
//! long polls waiting for pushes, and the routing of the gateway's responses to them.
//!
//! Every request gets a tag; the gateway's [`KpResponse`] carries it back into the connection's
//! outbox, and [`Connection::dispatch`] hands the outcome to the waiting request through a
//! oneshot channel. Request tags are odd. Long polls are matched by path instead: a push comes
//! with tag 0 (to a session that used the token) or with the even tag of the subscription the
//! long poll made, and goes to every long poll of the connection on exactly its path.
//!
//! The connection's driver task reads the outbox ([`Connection::poll_responses`]); a request
//! whose answer is already queued when the gateway accepts it (an answer or refusal decided at
//! once) takes it from the outbox itself, without waking the driver.

use fleetgate_live::Live;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll as TaskPoll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fleetgate_transport_core::{
    ClientCertificate, ClientCredentials, KpError, KpHandler, KpOutcome, KpRequest, KpResponse,
    KpTopic, Outbox, OutboxReceiver, SessionId, outbox,
};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper::header::{
    ALLOW, AUTHORIZATION, CONNECTION, CONTENT_TYPE, HeaderMap, HeaderValue, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::{oneshot, watch};

use crate::framing::Tripwire;
use crate::metrics::HttpMetrics;
use crate::{HttpConfig, HttpError, wire};

/// Different credentials one connection may use, each its own session.
const MAX_SESSIONS_PER_CONNECTION: usize = 4;

/// The most of a refused (too large) body read and dropped before the refusal goes out.
const DISCARD_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// The response body type of the transport.
pub(crate) type HttpResponse = Response<Full<Bytes>>;

/// What every connection of a transport shares.
pub(crate) struct Shared {
    /// Replaced by configuration reloads: each request reads the limits current when it
    /// arrives (the listener's address and connection limit stay as started).
    pub settings: Live<HttpConfig>,
    pub metrics: Arc<HttpMetrics>,
    /// The listener's per-address connection counts.
    pub addresses: Arc<fleetgate_transport_core::net::Admission>,
}

pub(crate) struct Connection {
    handler: Arc<dyn KpHandler>,
    shared: Arc<Shared>,
    peer: SocketAddr,
    /// The client certificate the TLS handshake verified (HTTPS with a client CA).
    certificate: Option<ClientCertificate>,
    shutdown: watch::Receiver<bool>,
    /// Given to every session the connection opens.
    outbox: Outbox,
    /// The other end of `outbox`.
    responses: Mutex<OutboxReceiver>,
    sessions: Mutex<Sessions>,
    /// Held while a session is being opened, so that concurrent HTTP/2 requests with the same
    /// credentials share one session.
    opening: tokio::sync::Mutex<()>,
    waiters: Mutex<Waiters>,
    next_tag: AtomicU64,
    /// Raised when the HTTP/1 stream declares a chunk over `max_body_bytes`.
    tripwire: Arc<Tripwire>,
}

#[derive(Default)]
struct Sessions {
    /// The raw `Authorization` header (or none) each session was opened with.
    open: Vec<(Option<Bytes>, SessionId)>,
    /// The connection has ended: no more sessions.
    closed: bool,
}

#[derive(Default)]
struct Waiters {
    /// Requests waiting for their answers, by tag.
    requests: HashMap<u64, oneshot::Sender<KpOutcome>>,
    /// Long polls waiting for a push.
    polls: Vec<Poll>,
    /// The subscriptions long polls hold and how many long polls use each.
    subscriptions: Vec<(SessionId, String, usize)>,
}

struct Poll {
    tag: u64,
    path: Bytes,
    answer: Option<oneshot::Sender<KpOutcome>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Connection {
    pub(crate) fn new(
        handler: Arc<dyn KpHandler>,
        shared: Arc<Shared>,
        peer: SocketAddr,
        certificate: Option<ClientCertificate>,
        shutdown: watch::Receiver<bool>,
        tripwire: Arc<Tripwire>,
    ) -> Arc<Self> {
        // Room for the pushes, and for the answer to every request in flight.
        let (outbox, responses) = outbox(
            shared.settings.read().response_queue_capacity
                + shared.settings.read().max_in_flight_per_connection as usize,
        );
        let conn = Self {
            handler,
            shared,
            peer,
            certificate,
            shutdown,
            outbox,
            responses: Mutex::new(responses),
            sessions: Mutex::default(),
            opening: tokio::sync::Mutex::new(()),
            waiters: Mutex::default(),
            next_tag: AtomicU64::new(0),
            tripwire,
        };
        Arc::new(conn)
    }

    /// Answers one HTTP request.
    pub(crate) async fn respond(self: Arc<Self>, req: Request<Incoming>) -> HttpResponse {
        self.tripwire.headed();
        let metrics = &self.shared.metrics;
        metrics.requests_received.inc();
        let response = match self.route(req).await {
            Ok(response) => response,
            Err(e) => {
                tracing::debug!(status = e.status, reason = %e.reason, "request refused");
                error_response(&e)
            }
        };
        metrics.count_response(response.status().as_u16());
        response
    }

    async fn route(&self, req: Request<Incoming>) -> Result<HttpResponse, KpError> {
        let path = req.uri().path();
        let raw = path.strip_prefix('/').unwrap_or(path);
        let topic =
            KpTopic::parse(Bytes::copy_from_slice(raw.as_bytes())).map_err(HttpError::from)?;
        match *req.method() {
            Method::POST | Method::PUT => self.request(topic, req).await,
            Method::GET => match wire::parse_observe(req.uri().query())? {
                Some(timeout_ms) => self.long_poll(topic, req.headers(), timeout_ms).await,
                None => Err(HttpError::MethodNotAllowed.into()),
            },
            _ => Err(HttpError::MethodNotAllowed.into()),
        }
    }

    /// A 1/KP request: hands it to the gateway and waits for the answer.
    async fn request(
        &self,
        topic: KpTopic,
        req: Request<Incoming>,
    ) -> Result<HttpResponse, KpError> {
        let (parts, body) = req.into_parts();
        let limit = self.shared.settings.read().max_body_bytes;
        let http1 = parts.version < hyper::Version::HTTP_2;
        // The size hint is the Content-Length when there is one.
        if body.size_hint().lower() > limit {
            let mut body = body;
            self.discard(&mut body).await;
            return Ok(body_too_large(limit, http1));
        }
        let session = self.session(&parts.headers).await?;
        let payload = match self.read_body(body).await {
            Ok(payload) => payload,
            Err(HttpError::BodyTooLarge { limit }) => return Ok(body_too_large(limit, http1)),
            Err(e @ HttpError::BodyTooSlow(_)) => {
                return Ok(closing(error_response(&e.into()), http1));
            }
            Err(e) => return Err(e.into()),
        };
        let received = Instant::now();
        // Request tags are odd (see the module doc).
        let tag = self.next_tag.fetch_add(2, Ordering::Relaxed) | 1;
        let answer = self.register_request(tag)?;
        let mut pending = PendingRequest { waiters: &self.waiters, tag, armed: true };
        let request = KpRequest { topic, payload, tag, wants_answer: true };
        let exchange = async {
            let accepted = self.handler.handle(session, request).await;
            self.shared.metrics.request_accept.observe(received.elapsed());
            accepted?;
            self.take_ready_responses();
            answer.await.map_err(|_| KpError::from(HttpError::Gone))
        };
        let ms = self.shared.settings.read().request_timeout_ms;
        let outcome = match tokio::time::timeout(Duration::from_millis(ms), exchange).await {
            Ok(result) => result?,
            Err(_) => {
                self.shared.metrics.request_timeouts.inc();
                return Err(HttpError::AnswerTimeout(ms).into());
            }
        };
        pending.armed = false;
        Ok(outcome_response(outcome, StatusCode::NO_CONTENT))
    }

    /// The gateway session for a request's credentials: the connection's session opened with
    /// the same `Authorization` header, else a new one.
    async fn session(&self, headers: &HeaderMap) -> Result<SessionId, KpError> {
        let key = headers.get(AUTHORIZATION).map(HeaderValue::as_bytes);
        if let Some(session) = self.find_session(key) {
            return Ok(session);
        }
        let _opening = self.opening.lock().await;
        if let Some(session) = self.find_session(key) {
            return Ok(session);
        }
        if lock(&self.sessions).open.len() >= MAX_SESSIONS_PER_CONNECTION {
            return Err(HttpError::TooManySessions.into());
        }
        let credentials = wire::parse_authorization(key)?;
        let presented = ClientCredentials {
            transport: "http",
            client_id: "",
            username: credentials.username.as_deref(),
            password: credentials.password.as_deref(),
            peer: self.peer,
            certificate: self.certificate.as_ref(),
        };
        let identity = match self.handler.open_session(presented, self.outbox.clone()).await {
            Ok(identity) => identity,
            Err(e) => {
                self.shared.metrics.sessions_refused.inc();
                tracing::debug!(status = e.status, reason = %e.reason, "session refused");
                return Err(e);
            }
        };
        let mut sessions = lock(&self.sessions);
        if sessions.closed {
            drop(sessions);
            self.handler.close_session(identity.session);
            return Err(HttpError::Gone.into());
        }
        sessions.open.push((key.map(Bytes::copy_from_slice), identity.session));
        tracing::debug!(session = identity.session.0, "session opened");
        Ok(identity.session)
    }

    fn find_session(&self, key: Option<&[u8]>) -> Option<SessionId> {
        let sessions = lock(&self.sessions);
        sessions.open.iter().find(|(k, _)| k.as_deref() == key).map(|(_, s)| *s)
    }

    /// Reads the whole body, within the size limit and the request timeout. A body that comes
    /// in one frame (the usual case) is not copied.
    async fn read_body(&self, mut body: Incoming) -> Result<Bytes, HttpError> {
        let (limit, rate) = {
            let settings = self.shared.settings.read();
            (settings.max_body_bytes, settings.min_body_bytes_per_sec)
        };
        let read = async {
            let mut first = Bytes::new();
            let mut joined = BytesMut::new();
            let mut total = 0u64;
            let start = tokio::time::Instant::now();
            // The body must keep up with `rate` after a second of grace: each byte that
            // arrives moves the deadline on by its share of a second.
            let due = |total: u64| match rate {
                0 => None,
                rate => Some(start + GRACE + Duration::from_secs_f64(total as f64 / rate as f64)),
            };
            loop {
                let slow = async {
                    match due(total) {
                        Some(due) => tokio::time::sleep_until(due).await,
                        None => std::future::pending().await,
                    }
                };
                let frame = tokio::select! {
                    frame = body.frame() => frame,
                    () = self.tripwire.tripped() => {
                        // A chunk declared over the limit: refused before it is read (and,
                        // unlike a body that merely grew too large, not drained).
                        self.shared.metrics.chunk_size_refusals.inc();
                        return Err(HttpError::BodyTooLarge { limit });
                    }
                    () = slow => {
                        self.shared.metrics.body_rate_timeouts.inc();
                        return Err(HttpError::BodyTooSlow(rate));
                    }
                };
                let Some(frame) = frame else { break };
                let Ok(data) = frame.map_err(HttpError::BodyRead)?.into_data() else {
                    continue; // trailers
                };
                total += data.len() as u64;
                if total > limit {
                    self.discard(&mut body).await;
                    return Err(HttpError::BodyTooLarge { limit });
                }
                if first.is_empty() && joined.is_empty() {
                    first = data;
                } else {
                    if joined.is_empty() {
                        joined.extend_from_slice(&first);
                    }
                    joined.extend_from_slice(&data);
                }
            }
            Ok(if joined.is_empty() { first } else { joined.freeze() })
        };
        let ms = self.shared.settings.read().request_timeout_ms;
        match tokio::time::timeout(Duration::from_millis(ms), read).await {
            Ok(read) => read,
            Err(_) => {
                self.shared.metrics.request_timeouts.inc();
                Err(HttpError::BodyTimeout(ms))
            }
        }
    }

    /// Reads and drops the rest of a refused body, up to [`DISCARD_MAX_BYTES`] and the request
    /// timeout, so that a client that writes its whole body before it reads (Python's urllib,
    /// many device stacks) reads the refusal instead of a reset connection.
    async fn discard(&self, body: &mut Incoming) {
        let drain = async {
            let mut dropped = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                dropped += frame.data_ref().map_or(0, |d| d.len() as u64);
                if dropped > DISCARD_MAX_BYTES {
                    break;
                }
            }
        };
        let ms = self.shared.settings.read().request_timeout_ms;
        let _ = tokio::time::timeout(Duration::from_millis(ms), drain).await;
    }

    fn register(&self, waiter: impl FnOnce(&mut Waiters)) -> Result<(), HttpError> {
        let mut waiters = lock(&self.waiters);
        let max = self.shared.settings.read().max_in_flight_per_connection as usize;
        if waiters.requests.len() + waiters.polls.len() >= max {
            return Err(HttpError::TooManyInFlight);
        }
        waiter(&mut waiters);
        Ok(())
    }

    fn register_request(&self, tag: u64) -> Result<oneshot::Receiver<KpOutcome>, HttpError> {
        let (tx, rx) = oneshot::channel();
        self.register(|w| {
            w.requests.insert(tag, tx);
        })?;
        Ok(rx)
    }

    /// A long poll: subscribes to the path, waits for the next push on it or the timeout, and
    /// unsubscribes.
    async fn long_poll(
        &self,
        topic: KpTopic,
        headers: &HeaderMap,
        timeout_ms: Option<u64>,
    ) -> Result<HttpResponse, KpError> {
        let max = self.shared.settings.read().long_poll_max_ms;
        let wait = Duration::from_millis(timeout_ms.unwrap_or(max).min(max));
        let session = self.session(headers).await?;
        // Subscription tags are even and never 0 (see the module doc).
        let tag = (self.next_tag.fetch_add(2, Ordering::Relaxed) | 1) + 1;
        let (tx, answer) = oneshot::channel();
        let path = topic.raw().clone();
        self.register(|w| w.polls.push(Poll { tag, path, answer: Some(tx) }))?;
        let mut poll = PollGuard { conn: self, tag, subscription: None, counted: false };
        let filter = format!("{}/#", topic.as_str());
        self.subscribe(session, &filter, tag).await?;
        poll.subscription = Some((session, filter));
        self.shared.metrics.long_polls_waiting.inc();
        poll.counted = true;
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            outcome = answer => match outcome {
                Ok(outcome) => Ok(outcome_response(outcome, StatusCode::OK)),
                Err(_) => Err(HttpError::Gone.into()),
            },
            () = tokio::time::sleep(wait) => Ok(empty(StatusCode::NO_CONTENT)),
            () = fleetgate_transport_core::stopped(&mut shutdown) => Err(HttpError::Gone.into()),
        }
    }

    /// Subscribes `session` to `filter` unless another long poll of the connection already
    /// has.
    async fn subscribe(&self, session: SessionId, filter: &str, tag: u64) -> Result<(), KpError> {
        let first = {
            let mut waiters = lock(&self.waiters);
            let subs = &mut waiters.subscriptions;
            match subs.iter_mut().find(|(s, f, _)| *s == session && f == filter) {
                Some(entry) => {
                    entry.2 += 1;
                    false
                }
                None => {
                    subs.push((session, filter.to_owned(), 1));
                    true
                }
            }
        };
        if first && let Err(e) = self.handler.subscribe(session, filter, tag).await {
            self.release(session, filter, false);
            return Err(e);
        }
        Ok(())
    }

    /// Drops one long poll's use of a subscription; the last one unsubscribes.
    fn release(&self, session: SessionId, filter: &str, unsubscribe: bool) {
        let last = {
            let mut waiters = lock(&self.waiters);
            let subs = &mut waiters.subscriptions;
            match subs.iter().position(|(s, f, _)| *s == session && f == filter) {
                Some(i) if subs[i].2 > 1 => {
                    subs[i].2 -= 1;
                    false
                }
                Some(i) => {
                    subs.swap_remove(i);
                    true
                }
                None => false,
            }
        };
        if last && unsubscribe {
            self.handler.unsubscribe(session, filter);
        }
    }

    /// Routes the responses in the outbox until it is empty; `Pending` then, having registered
    /// `cx` for the next one. For the connection's driver.
    pub(crate) fn poll_responses(&self, cx: &mut Context<'_>) -> TaskPoll<()> {
        let mut responses = lock(&self.responses);
        loop {
            match responses.poll_recv(cx) {
                TaskPoll::Ready(Some(response)) => self.dispatch(response),
                // Never: the connection holds a sender.
                TaskPoll::Ready(None) => return TaskPoll::Ready(()),
                TaskPoll::Pending => return TaskPoll::Pending,
            }
        }
    }

    /// Routes the responses already in the outbox, unless the driver is at it.
    fn take_ready_responses(&self) {
        if let Ok(mut responses) = self.responses.try_lock() {
            while let Ok(response) = responses.try_recv() {
                self.dispatch(response);
            }
        }
    }

    /// Routes one response or push from the outbox to whoever waits for it; nobody may, e.g.
    /// for a request that timed out or a push for an endpoint nobody long-polls.
    fn dispatch(&self, response: KpResponse) {
        let mut waiters = lock(&self.waiters);
        if response.tag & 1 == 1 {
            if let Some(answer) = waiters.requests.remove(&response.tag) {
                let _ = answer.send(response.outcome);
            }
            return;
        }
        let mut taken = false;
        for poll in waiters.polls.iter_mut().filter(|p| p.path == response.base) {
            if let Some(answer) = poll.answer.take() {
                let _ = answer.send(response.outcome.clone());
                taken = true;
            }
        }
        if !taken {
            tracing::trace!(base = ?response.base, "push with no long poll dropped");
        }
    }

    /// The connection has ended: closes its sessions and wakes whatever still waits.
    pub(crate) fn close(&self) {
        let open = {
            let mut sessions = lock(&self.sessions);
            sessions.closed = true;
            std::mem::take(&mut sessions.open)
        };
        for (_, session) in open {
            self.handler.close_session(session);
        }
        let mut waiters = lock(&self.waiters);
        waiters.requests.clear();
        for poll in &mut waiters.polls {
            poll.answer = None;
        }
    }
}

/// Removes a request's waiter when the request ends without its answer (error, timeout, or
/// the client went away).
struct PendingRequest<'a> {
    waiters: &'a Mutex<Waiters>,
    tag: u64,
    armed: bool,
}

impl Drop for PendingRequest<'_> {
    fn drop(&mut self) {
        if self.armed {
            lock(self.waiters).requests.remove(&self.tag);
        }
    }
}

/// Ends a long poll however it ends: removes it, releases its subscription, uncounts it.
struct PollGuard<'a> {
    conn: &'a Connection,
    tag: u64,
    subscription: Option<(SessionId, String)>,
    counted: bool,
}

impl Drop for PollGuard<'_> {
    fn drop(&mut self) {
        lock(&self.conn.waiters).polls.retain(|p| p.tag != self.tag);
        if let Some((session, filter)) = &self.subscription {
            self.conn.release(*session, filter, true);
        }
        if self.counted {
            self.conn.shared.metrics.long_polls_waiting.dec();
        }
    }
}

fn empty(status: StatusCode) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// An extension's answer: its payload with `status` (`on_empty` when there is none), or its
/// error.
fn outcome_response(outcome: KpOutcome, on_empty: StatusCode) -> HttpResponse {
    match outcome {
        KpOutcome::Success(payload) if payload.is_empty() => empty(on_empty),
        KpOutcome::Success(payload) => {
            let content_type = wire::content_type(&payload);
            let mut response = Response::new(Full::new(payload));
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            response
        }
        KpOutcome::Error(e) => error_response(&e),
        // Durable in the gateway's spool; the extension has not answered yet.
        KpOutcome::Stored => empty(StatusCode::ACCEPTED),
    }
}

/// The error's status code with the 1/KP error body.
/// 413 for a body over `limit`, whose rest was read and dropped only up to a bound: an
/// HTTP/1 connection cannot carry another request after it, so the answer says it closes.
fn body_too_large(limit: u64, http1: bool) -> HttpResponse {
    closing(error_response(&HttpError::BodyTooLarge { limit }.into()), http1)
}

/// Closes an HTTP/1 connection after `response`: what is left of the request is not read.
fn closing(mut response: HttpResponse, http1: bool) -> HttpResponse {
    if http1 {
        response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Time a body has before `min_body_bytes_per_sec` applies.
const GRACE: Duration = Duration::from_secs(1);

pub(crate) fn error_response(e: &KpError) -> HttpResponse {
    let mut response = Response::new(Full::new(e.body()));
    *response.status_mut() =
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    match e.status {
        401 => {
            let challenge = HeaderValue::from_static("Basic realm=\"fleetgate\", Bearer");
            headers.insert(WWW_AUTHENTICATE, challenge);
        }
        405 => {
            headers.insert(ALLOW, HeaderValue::from_static("POST, PUT, GET"));
        }
        _ => {}
    }
    response
}
