//! The communication service: 1/KP requests from any transport to 4/ESP `ClientData` on the
//! bus, `ExtensionData` back to the session that asked (or, for pushes, to every session that
//! uses the endpoint), 16/ECAP for tokens and client credentials, 9/ELCE connectivity events.

mod pending;
mod sessions;
mod sharded;
mod tokens;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use fleetgate_bus::{Bus, BusError, Requester, Subject, Subscription, now_ms};
use fleetgate_messages::{
    ClientData, ClientUsernamePasswordValidationRequest, ClientUsernamePasswordValidationResponse,
    ConnectedEvent, DisconnectedEvent, EndpointTokenRevokedEvent, ExtensionData, Record,
    encode_pooled, subjects,
};
use fleetgate_transport_core::metrics::{Counter, write_metric};
use fleetgate_transport_core::{
    ClientCredentials, ClientIdentity, KpError, KpHandler, KpOutcome, KpRequest, KpResponse,
    Outbox, SessionId, status_reason, topic_filter_matches,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use pending::{Pending, PendingTable};
use sessions::{Delivery, Sessions};
use tokens::TokenCache;

/// Communication service settings (`gateway.*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Service instance name: extensions push to `kaa.v1.service.<instance>.esp.ExtensionData`
    /// and connectivity events come from `kaa.v1.events.<instance>...`.
    pub instance: String,
    /// This replica's id; generated when unset.
    pub replica_id: Option<String>,
    /// App versions devices may use; empty: any.
    pub app_versions: Vec<String>,
    /// Extension instances devices may address; each is reached at
    /// `kaa.v1.service.<name>.esp.ClientData`.
    pub extensions: Vec<String>,
    /// The 16/ECAP provider's service instance.
    pub auth_instance: String,
    /// How long an extension has to answer a request before the device gets 504.
    pub request_timeout_ms: u64,
    /// How long the 16/ECAP provider has to answer before a device gets 503.
    pub auth_timeout_ms: u64,
    /// How long a validated token is trusted without asking the provider again.
    pub token_cache_ttl_ms: u64,
    /// How long an unknown token stays unknown without asking again.
    pub token_negative_cache_ttl_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            instance: "kpc".into(),
            replica_id: None,
            app_versions: Vec::new(),
            extensions: vec!["dcx".into()],
            auth_instance: "auth".into(),
            request_timeout_ms: 10_000,
            auth_timeout_ms: 5_000,
            token_cache_ttl_ms: 60_000,
            token_negative_cache_ttl_ms: 5_000,
        }
    }
}

/// Why the communication service could not start: configuration or backend.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A name used in subjects is not a valid subject token.
    #[error("gateway.{key}: `{value}` is not a valid subject token")]
    InvalidName {
        /// The setting.
        key: &'static str,
        /// Its value.
        value: String,
    },
    /// The bus refused a subscription.
    #[error("gateway: {0}")]
    Bus(#[from] BusError),
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct GatewayMetrics {
    requests: Counter,
    rejected: Counter,
    responses: Counter,
    pushes: Counter,
    copies: Counter,
    timeouts: Counter,
    undeliverable: Counter,
    slow_sessions: Counter,
    sessions_opened: Counter,
    sessions_refused: Counter,
    token_cache_misses: Counter,
}

/// The communication service of one gateway replica.
pub struct Gateway<B: Bus> {
    bus: B,
    config: GatewayConfig,
    replica_id: String,
    /// `<replica id>-`: every correlation id this replica makes starts with it.
    correlation_prefix: String,
    reply_subject: Subject,
    extensions: HashMap<String, Subject>,
    app_versions: HashSet<String>,
    connected_subject: Subject,
    disconnected_subject: Subject,
    client_requests: Subject,
    client_requester: Requester<B>,
    sessions: Sessions,
    pending: PendingTable,
    tokens: TokenCache<B>,
    next_session: AtomicU64,
    next_request: AtomicU64,
    metrics: GatewayMetrics,
}

impl<B: Bus> Gateway<B> {
    /// Validates the configuration, subscribes to this replica's reply subjects (and waits until
    /// the bus has them), and starts routing extension answers until `shutdown`.
    pub async fn start(
        bus: B,
        config: GatewayConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Self>, GatewayError> {
        let check = |key: &'static str, value: &str| {
            if subjects::is_valid_token(value) {
                Ok(())
            } else {
                Err(GatewayError::InvalidName { key, value: value.to_owned() })
            }
        };
        check("instance", &config.instance)?;
        check("auth_instance", &config.auth_instance)?;
        for e in &config.extensions {
            check("extensions", e)?;
        }
        let replica_id = match &config.replica_id {
            Some(id) => {
                check("replica_id", id)?;
                id.clone()
            }
            None => fleetgate_bus::new_replica_id(&config.instance),
        };
        let correlation = fleetgate_messages::correlation_id;
        let tokens = TokenCache::new(
            Requester::start(
                bus.clone(),
                subjects::ecap_token_response_reply(&replica_id).into(),
                correlation,
            )
            .await?,
            Subject::from(subjects::ecap_token_request(&config.auth_instance)),
            &config,
        );
        let client_requester = Requester::start(
            bus.clone(),
            subjects::ecap_username_password_response_reply(&replica_id).into(),
            correlation,
        )
        .await?;
        let reply_subject = Subject::from(subjects::esp_extension_data_reply(&replica_id));
        let replies = bus.subscribe(&reply_subject, None).await?;
        // Pushes without affinity go to every replica; only the one holding the session sends.
        let pushes = bus.subscribe(&subjects::esp_extension_data(&config.instance), None).await?;
        let revocations = bus.subscribe(subjects::TOKEN_REVOKED_ANY, None).await?;
        bus.flush().await?;
        let gateway = Arc::new(Self {
            correlation_prefix: format!("{replica_id}-"),
            extensions: config
                .extensions
                .iter()
                .map(|e| (e.clone(), Subject::from(subjects::esp_client_data(e))))
                .collect(),
            app_versions: config.app_versions.iter().cloned().collect(),
            connected_subject: subjects::elce_connected(&config.instance).into(),
            disconnected_subject: subjects::elce_disconnected(&config.instance).into(),
            client_requests: subjects::ecap_username_password_request(&config.auth_instance).into(),
            client_requester,
            sessions: Sessions::default(),
            pending: PendingTable::default(),
            next_session: AtomicU64::new(1),
            next_request: AtomicU64::new(1),
            metrics: GatewayMetrics::default(),
            reply_subject,
            tokens,
            replica_id,
            config,
            bus,
        });
        tokio::spawn(route_answers(Arc::downgrade(&gateway), replies, shutdown.clone()));
        tokio::spawn(route_answers(Arc::downgrade(&gateway), pushes, shutdown.clone()));
        tokio::spawn(end_revoked(Arc::downgrade(&gateway), revocations, shutdown.clone()));
        tokio::spawn(expire_requests(Arc::downgrade(&gateway), shutdown));
        tracing::info!(replica = %gateway.replica_id, "communication service started");
        Ok(gateway)
    }

    /// This replica's id.
    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// Requests sent to extensions that have not been answered yet.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    /// Appends the Prometheus text exposition of the service's counters.
    pub fn render_metrics(&self, out: &mut String) {
        let m = &self.metrics;
        let counters = [
            ("requests_total", "1/KP requests received", &m.requests),
            (
                "requests_rejected_total",
                "Requests refused before reaching an extension",
                &m.rejected,
            ),
            ("responses_total", "Extension answers routed to the requesting session", &m.responses),
            ("pushes_total", "Extension pushes routed to sessions", &m.pushes),
            ("subscriber_copies_total", "Responses and pushes copied to subscribers", &m.copies),
            ("request_timeouts_total", "Requests an extension did not answer in time", &m.timeouts),
            ("undeliverable_total", "Answers for sessions that have gone", &m.undeliverable),
            ("slow_sessions_closed_total", "Sessions closed for not reading", &m.slow_sessions),
            ("sessions_opened_total", "Sessions opened", &m.sessions_opened),
            ("sessions_refused_total", "Sessions refused by authentication", &m.sessions_refused),
            (
                "token_cache_misses_total",
                "Token validations sent to 16/ECAP",
                &m.token_cache_misses,
            ),
        ];
        for (name, help, counter) in counters {
            let name = format!("fleetgate_gateway_{name}");
            write_metric(out, "counter", &name, help, "", counter.get());
        }
        let gauges = [
            ("fleetgate_gateway_sessions_open", "Sessions open", self.sessions.len()),
            (
                "fleetgate_gateway_requests_pending",
                "Requests awaiting an extension",
                self.pending.len(),
            ),
        ];
        for (name, help, value) in gauges {
            write_metric(out, "gauge", name, help, "", value);
        }
    }

    fn new_correlation_id(&self) -> (u64, String) {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        (n, CorrelationId::new(&self.correlation_prefix, n).as_str().to_owned())
    }

    /// The request number in one of this replica's correlation ids.
    fn request_number(&self, correlation_id: &str) -> Option<u64> {
        let hex = correlation_id.strip_prefix(&self.correlation_prefix)?;
        u64::from_str_radix(hex, 16).ok()
    }

    async fn publish_connected(&self, endpoints: &[(&str, &str)]) {
        let subject = &self.connected_subject;
        let (_, correlation_id) = self.new_correlation_id();
        let event = ConnectedEvent {
            correlation_id: &correlation_id,
            timestamp_ms: now_ms(),
            timeout_ms: 0,
            endpoints: endpoints.to_vec(),
            originator_replica_id: &self.replica_id,
        };
        if let Err(e) = self.bus.publish(subject.clone(), None, event.to_bytes()).await {
            tracing::warn!(error = %e, subject = %subject, "cannot publish a connectivity event");
        }
    }

    /// Routes one `ExtensionData`: to the session that sent the request it answers, else (a
    /// push, or an error for a request without id) to every session that uses the endpoint.
    fn on_extension_data(&self, payload: &Bytes) {
        let answer = match ExtensionData::decode(payload) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable ExtensionData dropped");
                return;
            }
        };
        let outcome = if (200..300).contains(&answer.status_code) {
            KpOutcome::Success(answer.payload.map_or_else(Bytes::new, |p| payload.slice_ref(p)))
        } else {
            let status = u16::try_from(answer.status_code).unwrap_or(500);
            let reason = answer.reason_phrase.unwrap_or_else(|| status_reason(status));
            KpOutcome::Error(KpError::new(status, reason.to_owned()))
        };
        if let Some(pending) =
            self.request_number(answer.correlation_id).and_then(|n| self.pending.take(n))
        {
            let response = KpResponse {
                base: pending.base,
                request_id: pending.request_id,
                tag: pending.tag,
                outcome,
            };
            self.metrics.responses.inc();
            self.copy_to_subscribers(&response, &[pending.session]);
            self.deliver(pending.session, response);
            return;
        }
        let (Some(endpoint_id), Some(extension)) =
            (answer.endpoint_id, answer.extension_instance_name)
        else {
            tracing::debug!(
                correlation_id = answer.correlation_id,
                "answer for no pending request and no endpoint dropped"
            );
            return;
        };
        let request_id =
            answer.request_id.and_then(|id| u32::try_from(id).ok()).filter(|id| *id > 0);
        let routes = self.sessions.routes_of(endpoint_id, answer.app_version_name);
        if routes.is_empty() {
            self.metrics.undeliverable.inc();
            tracing::debug!(endpoint_id, "push for an endpoint with no session here dropped");
        }
        let delivered: Vec<SessionId> = routes.iter().map(|r| r.session).collect();
        let mut copied_for = Vec::new();
        for route in routes {
            let base = format!(
                "kp1/{}/{extension}/{}{}",
                route.app_version, route.token, answer.resource_path
            );
            let response = KpResponse {
                base: Bytes::from(base),
                request_id,
                tag: 0,
                outcome: outcome.clone(),
            };
            if !copied_for.contains(&route.token) {
                self.copy_to_subscribers(&response, &delivered);
                copied_for.push(route.token.clone());
            }
            self.metrics.pushes.inc();
            self.deliver(route.session, response);
        }
    }

    /// Copies `response` to the sessions whose subscriptions match its topic, except those in
    /// `delivered` (which have it already).
    fn copy_to_subscribers(&self, response: &KpResponse, delivered: &[SessionId]) {
        let Some(token) = token_of(&response.base) else {
            return;
        };
        let subscribers = self.sessions.subscribers_of(token);
        if subscribers.is_empty() {
            return;
        }
        let topic = response_topic(response);
        for s in subscribers {
            if !delivered.contains(&s.session) && topic_filter_matches(&s.filter, &topic) {
                self.metrics.copies.inc();
                self.deliver(s.session, KpResponse { tag: s.tag, ..response.clone() });
            }
        }
    }

    fn deliver(&self, session: SessionId, response: KpResponse) {
        match self.sessions.deliver(session, response) {
            Delivery::Queued => {}
            Delivery::NoSession => self.metrics.undeliverable.inc(),
            Delivery::TooSlow => {
                self.metrics.slow_sessions.inc();
                tracing::warn!(
                    session = session.0,
                    "session closed: it does not read its responses"
                );
                self.close_session(session);
            }
        }
    }
}

impl<B: Bus> KpHandler for Gateway<B> {
    async fn open_session(
        &self,
        credentials: ClientCredentials<'_>,
        outbox: Outbox,
    ) -> Result<ClientIdentity, KpError> {
        let (_, correlation_id) = self.new_correlation_id();
        let password = credentials.password.map(String::from_utf8_lossy);
        let request = ClientUsernamePasswordValidationRequest {
            correlation_id: &correlation_id,
            timestamp_ms: now_ms(),
            timeout_ms: i64::try_from(self.config.auth_timeout_ms).unwrap_or(0),
            username: credentials.username,
            password: password.as_deref(),
        };
        let timeout = Duration::from_millis(self.config.auth_timeout_ms);
        let reply = self
            .client_requester
            .request(self.client_requests.clone(), &correlation_id, request.to_bytes(), timeout)
            .await
            .map_err(|e| {
                self.metrics.sessions_refused.inc();
                tracing::warn!(error = %e, "client authentication unavailable");
                KpError::unavailable("the authentication service did not answer")
            })?;
        let answer =
            ClientUsernamePasswordValidationResponse::decode(&reply.payload).map_err(|e| {
                tracing::warn!(error = %e, "undecodable client-username-password-response");
                KpError::unavailable("the authentication service gave an unreadable answer")
            })?;
        if !(200..300).contains(&answer.status_code) {
            self.metrics.sessions_refused.inc();
            let reason = answer.reason_phrase.unwrap_or("bad credentials").to_owned();
            return Err(KpError::new(u16::try_from(answer.status_code).unwrap_or(401), reason));
        }
        let session = SessionId(self.next_session.fetch_add(1, Ordering::Relaxed));
        self.sessions.open(session, outbox);
        tracing::debug!(session = session.0, transport = credentials.transport, peer = %credentials.peer, "session opened");
        self.metrics.sessions_opened.inc();
        Ok(ClientIdentity { session, client_id: answer.client_id.map(str::to_owned) })
    }

    async fn handle(&self, session: SessionId, request: KpRequest) -> Result<(), KpError> {
        self.metrics.requests.inc();
        let result = self.forward(session, &request).await;
        if let Err(e) = &result {
            self.metrics.rejected.inc();
            // The transport answers the requester; subscribers get their copy from here.
            let response = KpResponse {
                base: request.topic.base(),
                request_id: request.topic.request_id(),
                tag: request.tag,
                outcome: KpOutcome::Error(e.clone()),
            };
            self.copy_to_subscribers(&response, &[session]);
        }
        result
    }

    async fn subscribe(&self, session: SessionId, filter: &str, tag: u64) -> Result<(), KpError> {
        let levels: Vec<&str> = filter.split('/').collect();
        let named = levels.len() >= 4
            && levels[..4].iter().all(|l| !l.is_empty() && *l != "+" && *l != "#");
        if !named || levels[0] != "kp1" {
            return Err(KpError::forbidden(
                "a subscription must name kp1/<app version>/<extension>/<endpoint token>",
            ));
        }
        let (app_version, extension, token) = (levels[1], levels[2], levels[3]);
        if !self.extensions.contains_key(extension) {
            return Err(KpError::not_found(format!("unknown extension instance `{extension}`")));
        }
        if !self.app_versions.is_empty() && !self.app_versions.contains(app_version) {
            return Err(KpError::not_found(format!("unknown app version `{app_version}`")));
        }
        self.tokens.resolve(app_version, token, &self.metrics.token_cache_misses).await?;
        if self.sessions.subscribe(session, token, filter, tag) {
            Ok(())
        } else {
            Err(KpError::unavailable("the session has ended"))
        }
    }

    fn unsubscribe(&self, session: SessionId, filter: &str) -> bool {
        self.sessions.unsubscribe(session, filter)
    }

    fn close_session(&self, session: SessionId) {
        let Some(endpoints) = self.sessions.close(session) else {
            return;
        };
        if endpoints.is_empty() {
            return;
        }
        // Called from synchronous code (a connection's teardown): publish in the background.
        let bus = self.bus.clone();
        let subject = self.disconnected_subject.clone();
        let (_, correlation_id) = self.new_correlation_id();
        let replica_id = self.replica_id.clone();
        tokio::spawn(async move {
            let pairs: Vec<(&str, &str)> =
                endpoints.iter().map(|(e, a)| (e.as_ref(), a.as_ref())).collect();
            let event = DisconnectedEvent {
                correlation_id: &correlation_id,
                timestamp_ms: now_ms(),
                timeout_ms: 0,
                endpoints: pairs,
                originator_replica_id: &replica_id,
            };
            if let Err(e) = bus.publish(subject, None, event.to_bytes()).await {
                tracing::warn!(error = %e, "cannot publish a disconnected event");
            }
        });
    }
}

impl<B: Bus> Gateway<B> {
    /// A token's first use in a session: resolve it, note it, announce the endpoint connected
    /// when the session had not used it yet.
    async fn first_use(
        &self,
        session: SessionId,
        app_version: &str,
        token: &str,
    ) -> Result<Arc<str>, KpError> {
        let resolved =
            self.tokens.resolve(app_version, token, &self.metrics.token_cache_misses).await?;
        let id = resolved.endpoint_id;
        match self.sessions.note_endpoint(session, &id, app_version, token, resolved.expires) {
            None => return Err(KpError::unavailable("the session has ended")),
            Some(true) => self.publish_connected(&[(&id, app_version)]).await,
            Some(false) => {}
        }
        Ok(id)
    }

    /// The request's `ClientData`, encoded, and its request number; registers the request as
    /// pending when an answer is expected. Synchronous, so that none of this is held in the
    /// request's future while the bus takes it.
    fn client_data(
        &self,
        session: SessionId,
        request: &KpRequest,
        endpoint_id: &str,
        resource_path: &str,
    ) -> (u64, Bytes) {
        let topic = &request.topic;
        let app_version = topic.app_version();
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        let correlation_id = CorrelationId::new(&self.correlation_prefix, n);
        // Without a request id the extension answers only errors, unless the transport needs
        // an answer: then the extension sees this replica's own (positive, 31-bit) id.
        let path_id = topic.request_id();
        let esp_request_id = match path_id {
            Some(id) => i32::try_from(id).ok(),
            None if request.wants_answer => Some(i32::try_from(n % 0x7fff_ffff + 1).unwrap_or(1)),
            None => None,
        };
        let data = ClientData {
            correlation_id: correlation_id.as_str(),
            timestamp_ms: now_ms(),
            timeout_ms: i64::try_from(self.config.request_timeout_ms).unwrap_or(0),
            app_version_name: app_version,
            endpoint_id: Some(endpoint_id),
            resource_path,
            request_id: esp_request_id,
            payload: &request.payload,
            config_name: None,
        };
        if esp_request_id.is_some() {
            let deadline = Instant::now() + Duration::from_millis(self.config.request_timeout_ms);
            let base = topic.base();
            let pending =
                Pending { session, base, request_id: path_id, tag: request.tag, deadline };
            self.pending.insert(n, pending);
        }
        (n, encode_pooled(&data))
    }

    async fn forward(&self, session: SessionId, request: &KpRequest) -> Result<(), KpError> {
        let topic = &request.topic;
        let extension = topic.extension();
        let subject = self.extensions.get(extension).ok_or_else(|| {
            KpError::not_found(format!("unknown extension instance `{extension}`"))
        })?;
        let app_version = topic.app_version();
        if !self.app_versions.is_empty() && !self.app_versions.contains(app_version) {
            return Err(KpError::not_found(format!("unknown app version `{app_version}`")));
        }
        let token =
            topic.token().ok_or_else(|| KpError::unauthorized("no endpoint token in the path"))?;
        let resource_path = topic
            .resource_path()
            .ok_or_else(|| KpError::not_found("no resource path after the endpoint token"))?;
        // A token the session already used needs no token cache lookup (revocation ends the
        // session; the trust expires with the cache entry it came from).
        let endpoint_id =
            match self.sessions.trusted_endpoint(session, app_version, token, Instant::now()) {
                None => return Err(KpError::unavailable("the session has ended")),
                Some(Some(endpoint_id)) => endpoint_id,
                // Boxed: the first use of a token in a session is rare, and its future (a 16/ECAP
                // request with a timer) would otherwise sit inline in every transport connection's
                // state, idle ones included.
                Some(None) => Box::pin(self.first_use(session, app_version, token)).await?,
            };
        let (n, payload) = self.client_data(session, request, &endpoint_id, resource_path);
        drop(endpoint_id);
        let published =
            self.bus.publish(subject.clone(), Some(self.reply_subject.clone()), payload).await;
        published.map_err(|e| {
            self.pending.take(n);
            match e {
                BusError::NoResponders(_) => KpError::unavailable(format!(
                    "no replica of extension `{extension}` is running"
                )),
                e => KpError::unavailable(format!("the bus did not take the request: {e}")),
            }
        })
    }
}

async fn route_answers<B: Bus>(
    gateway: Weak<Gateway<B>>,
    mut answers: Subscription,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let msg = tokio::select! {
            m = answers.next() => match m { Some(m) => m, None => break },
            _ = fleetgate_bus::stopped(&mut shutdown) => break,
        };
        let Some(gateway) = gateway.upgrade() else {
            break;
        };
        gateway.on_extension_data(&msg.payload);
    }
}

async fn end_revoked<B: Bus>(
    gateway: Weak<Gateway<B>>,
    mut events: Subscription,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let msg = tokio::select! {
            m = events.next() => match m { Some(m) => m, None => break },
            _ = fleetgate_bus::stopped(&mut shutdown) => break,
        };
        let Some(gateway) = gateway.upgrade() else {
            break;
        };
        match EndpointTokenRevokedEvent::decode(&msg.payload) {
            Ok(event) => {
                gateway.tokens.evict_endpoint(event.app_name, event.endpoint_id);
                for session in gateway.sessions.sessions_of(event.endpoint_id, event.app_name) {
                    tracing::info!(
                        session = session.0,
                        endpoint_id = event.endpoint_id,
                        "token revoked: session ended"
                    );
                    gateway.close_session(session);
                }
            }
            Err(e) => tracing::warn!(error = %e, "undecodable token revocation dropped"),
        }
    }
}

/// Answers 504 for requests whose extension did not answer in time.
async fn expire_requests<B: Bus>(gateway: Weak<Gateway<B>>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = fleetgate_bus::stopped(&mut shutdown) => break,
        }
        let Some(gateway) = gateway.upgrade() else {
            break;
        };
        let reason =
            format!("the extension did not answer within {} ms", gateway.config.request_timeout_ms);
        for pending in gateway.pending.expire(Instant::now()) {
            gateway.metrics.timeouts.inc();
            let response = KpResponse {
                base: pending.base,
                request_id: pending.request_id,
                tag: pending.tag,
                outcome: KpOutcome::Error(KpError::timeout(reason.clone())),
            };
            gateway.copy_to_subscribers(&response, &[pending.session]);
            gateway.deliver(pending.session, response);
        }
    }
}

/// `<replica id>-<request number in hex>`, built on the stack: one per request, so not worth
/// an allocation (unless the replica id is very long).
enum CorrelationId {
    Inline { buf: [u8; 96], len: usize },
    Heap(String),
}

impl CorrelationId {
    fn new(prefix: &str, n: u64) -> Self {
        let mut hex = [0u8; 16];
        let mut i = hex.len();
        let mut rest = n;
        loop {
            i -= 1;
            hex[i] = b"0123456789abcdef"[(rest & 0xf) as usize];
            rest >>= 4;
            if rest == 0 {
                break;
            }
        }
        let digits = &hex[i..];
        let len = prefix.len() + digits.len();
        let mut buf = [0u8; 96];
        if len > buf.len() {
            return Self::Heap(format!("{prefix}{n:x}"));
        }
        buf[..prefix.len()].copy_from_slice(prefix.as_bytes());
        buf[prefix.len()..len].copy_from_slice(digits);
        Self::Inline { buf, len }
    }

    fn as_str(&self) -> &str {
        match self {
            // A str prefix and ASCII digits: always UTF-8.
            Self::Inline { buf, len } => std::str::from_utf8(&buf[..*len]).unwrap_or_default(),
            Self::Heap(s) => s,
        }
    }
}

/// The endpoint token of a 1/KP path (`kp1/<app version>/<extension>/<token>/...`).
fn token_of(base: &[u8]) -> Option<&str> {
    let base = std::str::from_utf8(base).ok()?;
    base.split('/').nth(3)
}

/// The full topic a response goes to: `<base>[/<request id>]/status|error`.
fn response_topic(response: &KpResponse) -> String {
    let mut topic = String::from_utf8_lossy(&response.base).into_owned();
    if let Some(id) = response.request_id {
        topic.push('/');
        topic.push_str(&id.to_string());
    }
    topic.push_str(match response.outcome {
        KpOutcome::Success(_) => "/status",
        KpOutcome::Error(_) => "/error",
    });
    topic
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_ids() {
        assert_eq!(CorrelationId::new("kpc-1-", 0).as_str(), "kpc-1-0");
        assert_eq!(CorrelationId::new("kpc-1-", 0xabc).as_str(), "kpc-1-abc");
        assert_eq!(CorrelationId::new("r-", u64::MAX).as_str(), "r-ffffffffffffffff");
        let long = "x".repeat(200);
        assert_eq!(CorrelationId::new(&long, 0x1f).as_str(), format!("{long}1f"));
    }

    #[test]
    fn response_topics() {
        let mut r = KpResponse {
            base: Bytes::from_static(b"kp1/a/dcx/t/json"),
            request_id: Some(42),
            tag: 0,
            outcome: KpOutcome::Success(Bytes::new()),
        };
        assert_eq!(response_topic(&r), "kp1/a/dcx/t/json/42/status");
        assert_eq!(token_of(&r.base), Some("t"));
        r.request_id = None;
        r.outcome = KpOutcome::Error(KpError::bad_request("x"));
        assert_eq!(response_topic(&r), "kp1/a/dcx/t/json/error");
    }
}
