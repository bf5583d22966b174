//! Device → bus: sessions open, tokens resolve, requests become `ClientData`.
//!
//! A session opens with the client's credentials checked through 16/ECAP (its certificate,
//! user name and password, or whether anonymous clients may connect). A request is checked
//! (extension, app version, token, resource path), its token resolved (through the session when
//! it used the token before, else the token cache and 16/ECAP, which also announces the
//! endpoint connected), and it goes to the extension's subject as `ClientData` with this
//! replica's reply subject; when an answer is due it waits in the pending table, where the
//! [`crate::downlink`] finds it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use fleetgate_bus::{Bus, BusError, now_ms};
use fleetgate_messages::{
    ClientCertificateValidationRequest, ClientCertificateValidationResponse, ClientData,
    ClientUsernamePasswordValidationRequest, ClientUsernamePasswordValidationResponse, Record,
    encode_pooled,
};
use fleetgate_transport_core::{
    ClientCertificate, ClientCredentials, ClientIdentity, KpError, KpOutcome, KpRequest,
    KpResponse, Outbox, SessionId,
};
use tokio::time::Instant;

use crate::correlation::CorrelationId;
use crate::pending::{Pending, Route, State};
use crate::sessions::{Reserve, SubscribeRefused};
use crate::tokens::{Refusal, Resolved};
use crate::{CertificateCheck, Gateway};

/// The refusal while an address backs off.
fn backoff_error() -> KpError {
    KpError::new(429, "too many failed authentications from this address; try again later")
}

/// The status a device gets for a provider's refusal: the provider's own when it is an error
/// status, else 401 (a provider that says "no" with a success or odd code still refuses).
fn refusal_status(status: i32) -> u16 {
    u16::try_from(status).ok().filter(|s| (400..600).contains(s)).unwrap_or(401)
}

impl<B: Bus> Gateway<B> {
    /// Checks a connecting client's credentials through 16/ECAP and opens its session.
    pub(crate) async fn open(
        &self,
        credentials: ClientCredentials<'_>,
        outbox: Outbox,
    ) -> Result<ClientIdentity, KpError> {
        let ip = credentials.peer.ip();
        let authenticated = match self.guard.blocked(ip, Instant::now()) {
            true => Err((backoff_error(), Refusal::Backoff.reason())),
            false => self.authenticate(&credentials).await,
        };
        let (client_id, credential_ids) = authenticated.map_err(|(e, reason)| {
            self.metrics.sessions_refused.inc();
            self.metrics.auth_refused(reason);
            if e.status != 503 && e.status != 429 {
                self.count_failure(ip);
            }
            tracing::debug!(transport = credentials.transport, peer = %credentials.peer, status = e.status, reason = %e.reason, "client refused");
            e
        })?;
        let session = SessionId(self.next_session.fetch_add(1, Ordering::Relaxed));
        self.sessions.open(session, outbox, ip, credential_ids);
        tracing::debug!(session = session.0, transport = credentials.transport, peer = %credentials.peer, "session opened");
        self.metrics.sessions_opened.inc();
        self.metrics.sessions_open.inc();
        Ok(ClientIdentity { session, client_id })
    }

    /// What the client presented, checked: its certificate (as `gateway.certificate_check`
    /// says) and its user name and password; with neither, whether anonymous clients may
    /// connect. Returns the client id and the ids of the credentials that were accepted (a
    /// 16/ECAP credential revocation names one of them).
    async fn authenticate(
        &self,
        credentials: &ClientCredentials<'_>,
    ) -> Result<(Option<String>, Vec<Box<str>>), (KpError, &'static str)> {
        let why = |refused: &'static str| {
            move |e: KpError| {
                let reason = if e.status == 503 { "provider_unavailable" } else { refused };
                (e, reason)
            }
        };
        let mut client_id = None;
        let mut credential_ids: Vec<Box<str>> = Vec::new();
        if let Some(certificate) = credentials.certificate
            && self.config.certificate_check != CertificateCheck::Local
            && let Some((credential, client)) =
                self.check_certificate(certificate).await.map_err(why("certificate_refused"))?
        {
            credential_ids.extend(credential.map(Box::from));
            client_id = client;
        }
        // A certificate authenticates the client: no anonymous check after it.
        let presented = credentials.username.is_some() || credentials.password.is_some();
        if presented || credentials.certificate.is_none() {
            let (credential, client) =
                self.check_password(credentials).await.map_err(why("bad_credentials"))?;
            credential_ids.extend(credential.map(Box::from));
            client_id = client_id.or(client);
        }
        Ok((client_id, credential_ids))
    }

    /// `client-certificate-request`: `Some((credential id, client id))` when the provider
    /// accepts the certificate, `None` when it does not handle certificates and
    /// `provider_when_supported` lets the local check decide, an error when it refuses or does
    /// not answer.
    async fn check_certificate(
        &self,
        certificate: &ClientCertificate,
    ) -> Result<Option<(Option<String>, Option<String>)>, KpError> {
        let (_, correlation_id) = self.new_correlation_id();
        let correlation_id = correlation_id.as_str();
        let request = ClientCertificateValidationRequest {
            correlation_id,
            timestamp_ms: now_ms(),
            timeout_ms: i64::try_from(self.config.auth_timeout_ms).unwrap_or(0),
            issuer: &certificate.issuer,
            serial_number: &certificate.serial,
        };
        let timeout = Duration::from_millis(self.config.auth_timeout_ms);
        let when_supported =
            self.config.certificate_check == CertificateCheck::ProviderWhenSupported;
        let reply = match self
            .certificate_requester
            .request(self.certificate_requests.clone(), correlation_id, request.to_bytes(), timeout)
            .await
        {
            Ok(reply) => reply,
            Err(BusError::NoResponders(_)) if when_supported => return Ok(None),
            Err(e) => {
                tracing::warn!(error = %e, "client certificate check unavailable");
                return Err(KpError::unavailable("the authentication service did not answer"));
            }
        };
        let answer = ClientCertificateValidationResponse::decode(&reply.payload).map_err(|e| {
            tracing::warn!(error = %e, "undecodable client-certificate-response");
            KpError::unavailable("the authentication service gave an unreadable answer")
        })?;
        match answer.status_code {
            200..=299 => Ok(Some((
                answer.credential_id.map(str::to_owned),
                answer.client_id.map(str::to_owned),
            ))),
            501 if when_supported => Ok(None),
            status => {
                let reason = answer.reason_phrase.unwrap_or("client certificate refused");
                tracing::debug!(status, issuer = %certificate.issuer, serial = %certificate.serial, reason, "client certificate refused by the provider");
                Err(KpError::new(refusal_status(status), reason.to_owned()))
            }
        }
    }

    /// `client-username-password-request` (also for bearer tokens and anonymous clients):
    /// (credential id, client id) when the provider accepts.
    async fn check_password(
        &self,
        credentials: &ClientCredentials<'_>,
    ) -> Result<(Option<String>, Option<String>), KpError> {
        let (_, correlation_id) = self.new_correlation_id();
        let correlation_id = correlation_id.as_str();
        let password = credentials.password.map(String::from_utf8_lossy);
        let request = ClientUsernamePasswordValidationRequest {
            correlation_id,
            timestamp_ms: now_ms(),
            timeout_ms: i64::try_from(self.config.auth_timeout_ms).unwrap_or(0),
            username: credentials.username,
            password: password.as_deref(),
        };
        let timeout = Duration::from_millis(self.config.auth_timeout_ms);
        let reply = self
            .client_requester
            .request(self.client_requests.clone(), correlation_id, request.to_bytes(), timeout)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "client authentication unavailable");
                KpError::unavailable("the authentication service did not answer")
            })?;
        let answer =
            ClientUsernamePasswordValidationResponse::decode(&reply.payload).map_err(|e| {
                tracing::warn!(error = %e, "undecodable client-username-password-response");
                KpError::unavailable("the authentication service gave an unreadable answer")
            })?;
        if !(200..300).contains(&answer.status_code) {
            let reason = answer.reason_phrase.unwrap_or("bad credentials").to_owned();
            return Err(KpError::new(refusal_status(answer.status_code), reason));
        }
        Ok((answer.credential_id.map(str::to_owned), answer.client_id.map(str::to_owned)))
    }

    /// Takes one request from a session: on the bus, or refused (and the refusal copied to
    /// subscribers; the transport answers the requester itself).
    pub(crate) async fn accept(
        &self,
        session: SessionId,
        request: KpRequest,
    ) -> Result<(), KpError> {
        self.metrics.requests.inc();
        if self.draining.load(Ordering::Relaxed) {
            self.metrics.rejected(503);
            return Err(KpError::unavailable("the gateway is shutting down; try another replica"));
        }
        let result = self.forward(session, &request).await;
        if let Err(e) = &result {
            self.metrics.rejected(e.status);
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

    /// A subscription to a filter that names one endpoint token the session may use.
    pub(crate) async fn add_subscription(
        &self,
        session: SessionId,
        filter: &str,
        tag: u64,
    ) -> Result<(), KpError> {
        let levels: Vec<&str> = filter.split('/').collect();
        let named = levels.len() >= 4
            && levels[..4].iter().all(|l| !l.is_empty() && *l != "+" && *l != "#");
        if !named || levels[0] != "kp1" {
            return Err(KpError::forbidden(
                "a subscription must name kp1/<app version>/<extension>/<endpoint token>",
            ));
        }
        let (app_version, extension, token) = (levels[1], levels[2], levels[3]);
        let routes = self.routes.get();
        if !routes.extensions.contains_key(extension) {
            return Err(KpError::not_found(format!("unknown extension instance `{extension}`")));
        }
        if !routes.app_versions.is_empty() && !routes.app_versions.contains(app_version) {
            return Err(KpError::not_found(format!("unknown app version `{app_version}`")));
        }
        let resolved = self.resolve(session, app_version, token).await?;
        let max = routes.max_subscriptions_per_session;
        match self.sessions.subscribe(session, token, filter, tag, max) {
            Ok(()) => {}
            Err(SubscribeRefused::NoSession) => {
                return Err(KpError::unavailable("the session has ended"));
            }
            Err(SubscribeRefused::TooMany) => {
                self.metrics.subscriptions_refused.inc();
                return Err(KpError::new(
                    429,
                    format!("a session may have at most {max} subscriptions"),
                ));
            }
        }
        // Naming the token is using it: the session is where pushes for the endpoint go from
        // now on, even before its first request (an HTTP long poll, an FGU/1 handshake, an
        // MQTT client that subscribes before it publishes), and extensions hear that it
        // connected (CMX then pushes a configuration it has not confirmed).
        let id = resolved.endpoint_id;
        let (token_id, expires) = (resolved.token_id, resolved.expires);
        match self.sessions.note_endpoint(session, &id, app_version, token, token_id, expires) {
            None => Err(KpError::unavailable("the session has ended")),
            Some(true) => {
                self.publish_connected(&[(&id, app_version)]).await;
                Ok(())
            }
            Some(false) => Ok(()),
        }
    }

    /// `token`'s endpoint in `app_version`, for `session`: from the caches when they know it,
    /// else from the provider unless the session's address is backing off. Refusals are
    /// counted by reason, and failures against the address.
    async fn resolve(
        &self,
        session: SessionId,
        app_version: &str,
        token: &str,
    ) -> Result<Resolved, KpError> {
        let peer = self.sessions.peer(session);
        let answer = match self.tokens.known(app_version, token) {
            Some(answer) => answer,
            None if peer.is_some_and(|ip| self.guard.blocked(ip, Instant::now())) => {
                Err((backoff_error(), Refusal::Backoff))
            }
            None => self.tokens.lookup(app_version, token, &self.metrics.token_cache_misses).await,
        };
        answer.map_err(|(e, why)| {
            self.metrics.auth_refused(why.reason());
            let failure = !matches!(why, Refusal::Backoff | Refusal::ProviderUnavailable);
            if let Some(ip) = peer
                && failure
            {
                self.count_failure(ip);
            }
            e
        })
    }

    /// Counts a failed authentication from `ip`; logs (at debug) when it starts a back-off.
    fn count_failure(&self, ip: std::net::IpAddr) {
        if self.guard.failed(ip, Instant::now()) {
            self.metrics.auth_backoffs.inc();
            tracing::debug!(peer = %ip, "too many failed authentications: backing off");
        }
    }

    /// A token's first use in a session: resolve it, note it, announce the endpoint connected
    /// when the session had not used it yet.
    async fn first_use(
        &self,
        session: SessionId,
        app_version: &str,
        token: &str,
    ) -> Result<Arc<str>, KpError> {
        let resolved = self.resolve(session, app_version, token).await?;
        let id = resolved.endpoint_id;
        let (token_id, expires) = (resolved.token_id, resolved.expires);
        match self.sessions.note_endpoint(session, &id, app_version, token, token_id, expires) {
            None => return Err(KpError::unavailable("the session has ended")),
            Some(true) => self.publish_connected(&[(&id, app_version)]).await,
            Some(false) => {}
        }
        Ok(id)
    }

    /// The request's `ClientData`, encoded, and its request number (the correlation id).
    /// Synchronous, so that none of this is held in the request's future while the bus takes
    /// it.
    fn client_data(
        &self,
        request: &KpRequest,
        endpoint_id: &str,
        resource_path: &str,
    ) -> (u64, Bytes) {
        let topic = &request.topic;
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        let correlation_id = CorrelationId::new(&self.correlation_prefix, n);
        // Without a request id the extension answers only errors, unless the transport needs
        // an answer: then the extension sees this replica's own (positive, 31-bit) id.
        let esp_request_id = match topic.request_id() {
            Some(id) => i32::try_from(id).ok(),
            None if request.wants_answer => Some(i32::try_from(n % 0x7fff_ffff + 1).unwrap_or(1)),
            None => None,
        };
        let data = ClientData {
            correlation_id: correlation_id.as_str(),
            timestamp_ms: now_ms(),
            timeout_ms: i64::try_from(self.config.request_timeout_ms).unwrap_or(0),
            app_version_name: topic.app_version(),
            endpoint_id: Some(endpoint_id),
            resource_path,
            request_id: esp_request_id,
            payload: &request.payload,
            config_name: None,
        };
        (n, encode_pooled(&data))
    }

    async fn forward(&self, session: SessionId, request: &KpRequest) -> Result<(), KpError> {
        let topic = &request.topic;
        let extension_name = topic.extension();
        let routes = self.routes.get();
        let extension = routes.extensions.get(extension_name).ok_or_else(|| {
            KpError::not_found(format!("unknown extension instance `{extension_name}`"))
        })?;
        let app_version = topic.app_version();
        if !routes.app_versions.is_empty() && !routes.app_versions.contains(app_version) {
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
                // Ended by the gateway under a connection that lives on (an HTTP keep-alive):
                // a revocation, so the client must authenticate again.
                None => {
                    return Err(KpError::unauthorized(
                        "the session has ended (its token or credentials were revoked)",
                    ));
                }
                Some(Some(endpoint_id)) => endpoint_id,
                // Boxed: the first use of a token in a session is rare, and its future (a 16/ECAP
                // request with a timer) would otherwise sit inline in every request's future.
                Some(None) => Box::pin(self.first_use(session, app_version, token)).await?,
            };
        // An answer expected is an answer promised room in the session's outbox, so that a
        // burst of answers (after a backend stall) cannot overflow it.
        let route = match topic.request_id().is_some() || request.wants_answer {
            true => {
                match self.sessions.reserve(session) {
                    Reserve::Reserved => {}
                    Reserve::NoSession => {
                        return Err(KpError::unavailable("the session has ended"));
                    }
                    Reserve::Full => {
                        return Err(KpError::new(
                            429,
                            "too many requests in flight on this session; wait for answers",
                        ));
                    }
                }
                Some(Route {
                    session,
                    base: topic.base(),
                    request_id: topic.request_id(),
                    tag: request.tag,
                })
            }
            false => None,
        };
        let (n, client_data) = self.client_data(request, &endpoint_id, resource_path);
        drop(endpoint_id);
        let release = |route: &Option<Route>| {
            if route.is_some() {
                self.sessions.release(session);
            }
        };
        // Behind older spooled requests, or while the bus is down or stalled: to the spool.
        if self.delivery.spooling() || (self.delivery.spool.is_some() && !self.bus.is_healthy()) {
            let spooled = self.spool_request(route.clone(), &extension.subject, client_data).await;
            if spooled.is_err() {
                release(&route);
            }
            return spooled;
        }
        if let Some(route) = &route {
            // Registered before the publish: the answer may come before it returns.
            let pending = Pending {
                route: Some(route.clone()),
                sent: Instant::now(),
                latency: extension.latency.clone(),
                state: State::Direct {
                    subject: extension.subject.clone(),
                    client_data: client_data.clone(),
                },
            };
            let timeout = match self.delivery.spool {
                Some(_) => self.delivery.delivery_timeout,
                None => Duration::from_millis(self.config.request_timeout_ms),
            };
            self.pending.insert(n, pending, Instant::now() + timeout);
        }
        let subject = extension.subject.clone();
        let publish =
            self.bus.publish(subject, Some(self.reply_subject.clone()), client_data.clone());
        let published = match self.delivery.spool {
            // A bus that does not even queue the message in time is down: the spool takes it.
            Some(_) => tokio::time::timeout(self.delivery.delivery_timeout, publish)
                .await
                .unwrap_or_else(|_| Err(BusError::Timeout("the bus's publish queue".into()))),
            None => publish.await,
        };
        let Err(e) = published else { return Ok(()) };
        // Not on the bus: settled here, unless its answer already came.
        if route.is_some() && self.pending.take(n).is_none() {
            return Ok(());
        }
        match e {
            BusError::NoResponders(_) => {
                release(&route);
                Err(KpError::unavailable(format!(
                    "no replica of extension `{extension_name}` is running"
                )))
            }
            // The device's payload plus the 4/ESP envelope is over the bus's limit.
            BusError::TooLarge { max, .. } => {
                release(&route);
                Err(KpError::too_large(format!(
                    "the payload with its 4/ESP envelope is over the bus's limit of {max} bytes"
                )))
            }
            // The bus is down: stored and forwarded later, if there is a spool.
            e if self.delivery.spool.is_some() => {
                tracing::debug!(error = %e, "the bus refused a request: spooling");
                let spooled =
                    self.spool_request(route.clone(), &extension.subject, client_data).await;
                if spooled.is_err() {
                    release(&route);
                }
                spooled
            }
            e => {
                release(&route);
                Err(KpError::unavailable(format!("the bus did not take the request: {e}")))
            }
        }
    }
}
