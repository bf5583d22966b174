//! The endpoint and client authentication provider (16/ECAP), backed by configuration.
//!
//! Answers `ep-token-request` from the endpoints listed in `auth.endpoints` (or, with
//! `auth.auto_register`, makes any token an endpoint: for load tests), and
//! `client-username-password-request` from `auth.clients` and `auth.bearer_tokens` (a password
//! without a user name is a bearer token; clients with no credentials at all are let in when
//! `auth.allow_anonymous`), and `client-certificate-request` from `auth.certificates` (issuer
//! and base-10 serial of certificates the gateway has verified; any other is refused). fleetgate passes the app version name as the 16/ECAP `appName`, so a
//! token belongs to one app version.
//!
//! When new settings drop an endpoint token or a client credential (or change its password),
//! it broadcasts the 16/ECAP revocation (`EndpointTokenRevokedEvent`,
//! `ClientCredentialRevokedEvent`), so that gateways end the sessions that use it at once.
//!
//! It knows the bus and the Avro records; it keeps no state beyond its configuration, so any
//! number of replicas can share the queue group (each replica announces a revocation; gateways
//! end a session once). It does not store credentials elsewhere or rotate tokens.

use std::collections::HashMap;
use std::sync::Arc;

use fleetgate_bus::{Bus, BusError, Message, Subject, now_ms};
use fleetgate_live::Live;
use fleetgate_messages::{
    ClientCertificateValidationRequest, ClientCertificateValidationResponse,
    ClientCredentialRevokedEvent, ClientUsernamePasswordValidationRequest,
    ClientUsernamePasswordValidationResponse, EndpointTokenRevokedEvent,
    EndpointTokenValidationRequest, EndpointTokenValidationResponse, Record, subjects,
};
use fleetgate_service::{BoxFuture, Running, ServiceError, StartContext};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Auth provider settings (`auth.*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Service instance name: `kaa.v1.service.<instance>.ecap.*`, queue group `<instance>`.
    pub instance: String,
    /// Any token is a valid endpoint whose id is derived from app version and token. For load
    /// tests; never in production.
    pub auto_register: bool,
    /// Known endpoints.
    pub endpoints: Vec<EndpointEntry>,
    /// Known clients (MQTT user names and passwords).
    pub clients: Vec<ClientEntry>,
    /// Bearer tokens (HTTP `Authorization: Bearer`), passed to the provider as a password
    /// without a user name.
    pub bearer_tokens: Vec<BearerEntry>,
    /// Whether a client that presents no credentials at all may connect (its endpoint token is
    /// then its only proof). Off by default; `fleetgate up` on built-in defaults (the demo)
    /// turns it on unless `FLEETGATE_AUTH_ALLOW_ANONYMOUS` says otherwise.
    pub allow_anonymous: bool,
    /// Known client certificates (mutual TLS), by issuer and serial number.
    pub certificates: Vec<CertificateEntry>,
}

/// A client certificate credential. The gateway checks chain, signature, validity and CRLs;
/// the provider only says whether it knows the certificate and which client it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateEntry {
    /// The issuer's distinguished name as the gateway reports it (RFC 4514 order, e.g.
    /// `CN=Fleet CA, O=Example`).
    pub issuer: String,
    /// The serial number in base 10.
    pub serial_number: String,
    /// Client id reported to the gateway; the serial number when unset.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Credential id (what a 16/ECAP credential revocation names); the client id when unset.
    #[serde(default)]
    pub credential_id: Option<String>,
}

impl CertificateEntry {
    /// The client id reported for it.
    pub fn client_id(&self) -> &str {
        self.client_id.as_deref().unwrap_or(&self.serial_number)
    }

    /// The credential id reported for it.
    pub fn credential_id(&self) -> &str {
        self.credential_id.as_deref().unwrap_or(self.client_id())
    }
}

/// A bearer token credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BearerEntry {
    /// The token clients present.
    pub token: String,
    /// Client id reported to the gateway.
    pub client_id: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            instance: "auth".into(),
            auto_register: false,
            endpoints: Vec::new(),
            clients: Vec::new(),
            bearer_tokens: Vec::new(),
            allow_anonymous: false,
            certificates: Vec::new(),
        }
    }
}

/// An endpoint and its token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointEntry {
    /// App version name (the 16/ECAP `appName` fleetgate sends).
    pub app_version: String,
    /// The endpoint token devices put in 1/KP paths.
    pub token: String,
    /// The endpoint id extensions see.
    pub endpoint_id: String,
}

/// A client credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientEntry {
    /// MQTT user name.
    pub username: String,
    /// MQTT password.
    pub password: String,
    /// Client id reported to the gateway; the user name when unset.
    #[serde(default)]
    pub client_id: Option<String>,
}

/// Why the provider could not start. A configuration or backend fault.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The instance name cannot be a subject token.
    #[error("auth.instance: `{0}` is not a valid subject token")]
    InvalidInstance(String),
    /// Two entries for one app version and token.
    #[error("auth.endpoints: token `{token}` of app version `{app_version}` is listed twice")]
    DuplicateToken {
        /// App version.
        app_version: String,
        /// Token.
        token: String,
    },
    /// The bus refused a subscription.
    #[error("auth: cannot subscribe: {0}")]
    Bus(#[from] BusError),
}

impl AuthConfig {
    /// Entries the provider could not serve: two endpoints with one app version and token.
    /// A reload that brings one is refused like a start-up would be.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if !subjects::is_valid_token(&self.instance) {
            problems
                .push(("instance", format!("`{}` is not a valid subject token", self.instance)));
        }
        let mut seen = std::collections::HashSet::new();
        for e in &self.endpoints {
            if !seen.insert((&e.app_version, &e.token)) {
                let message = format!(
                    "token `{}` of app version `{}` is listed twice",
                    e.token, e.app_version
                );
                problems.push(("endpoints", message));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for c in &self.certificates {
            if !c.serial_number.bytes().all(|b| b.is_ascii_digit()) || c.serial_number.is_empty() {
                let message = format!("serial_number `{}` is not base 10", c.serial_number);
                problems.push(("certificates", message));
            }
            if !seen.insert((&c.issuer, &c.serial_number)) {
                let message = format!(
                    "certificate {} of issuer `{}` is listed twice",
                    c.serial_number, c.issuer
                );
                problems.push(("certificates", message));
            }
        }
        problems
    }
}

/// The provider as a service of the process: made from `auth.*`, started on the bus.
pub struct AuthService {
    settings: Live<AuthConfig>,
}

impl AuthService {
    /// The service for `config`.
    pub fn new(config: AuthConfig) -> Self {
        Self { settings: Live::new(config) }
    }

    /// Its settings: a reload that replaces them changes endpoints, clients, bearer tokens,
    /// `auto_register` and `allow_anonymous` for the next request (the instance stays).
    pub fn settings(&self) -> Live<AuthConfig> {
        self.settings.clone()
    }
}

impl fleetgate_service::Service for AuthService {
    fn name(&self) -> &'static str {
        "auth"
    }

    fn start(
        self: Box<Self>,
        context: StartContext,
    ) -> BoxFuture<'static, Result<Running, ServiceError>> {
        Box::pin(async move {
            let provider = AuthProvider::start(context.bus, self.settings, context.shutdown)
                .await
                .map_err(|e| ServiceError::new("auth", e))?;
            Ok(Running::task(provider.task))
        })
    }
}

/// A running provider replica.
pub struct AuthProvider {
    task: tokio::task::JoinHandle<()>,
}

struct Directory {
    auto_register: bool,
    allow_anonymous: bool,
    bearer_tokens: Vec<BearerEntry>,
    endpoints: HashMap<(String, String), String>,
    clients: HashMap<String, ClientEntry>,
    /// By (issuer, serial number).
    certificates: HashMap<(String, String), CertificateEntry>,
}

impl AuthProvider {
    /// Subscribes (and waits until the bus has the subscriptions) and serves until `shutdown`,
    /// answering from the settings current at each request.
    pub async fn start<B: Bus>(
        bus: B,
        settings: Live<AuthConfig>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<Self, AuthError> {
        let mut changed = settings.changed();
        let config = settings.get();
        let mut directory = Arc::new(Directory::new(&config)?);
        let group = Some(config.instance.as_str());
        let mut tokens =
            bus.subscribe(&subjects::ecap_token_request(&config.instance), group).await?;
        let mut passwords = bus
            .subscribe(&subjects::ecap_username_password_request(&config.instance), group)
            .await?;
        let mut certificates =
            bus.subscribe(&subjects::ecap_certificate_request(&config.instance), group).await?;
        bus.flush().await?;
        let instance = config.instance.clone();
        let replica = fleetgate_bus::new_replica_id(&instance);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(m) = tokens.next() => answer(&bus, m, |p| directory.validate_token(p)).await,
                    Some(m) = passwords.next() => answer(&bus, m, |p| directory.validate_client(p)).await,
                    Some(m) = certificates.next() => answer(&bus, m, |p| directory.validate_certificate(p)).await,
                    Ok(()) = changed.changed() => match Directory::new(&settings.get()) {
                        Ok(new) => {
                            tracing::info!(endpoints = new.endpoints.len(), clients = new.clients.len(), "auth: new settings applied");
                            let old = std::mem::replace(&mut directory, Arc::new(new));
                            announce_revocations(&bus, &instance, &replica, &old, &directory).await;
                        }
                        Err(e) => tracing::error!(error = %e, "auth: new settings refused; the old ones stay"),
                    },
                    _ = fleetgate_bus::stopped(&mut shutdown) => break,
                    else => break,
                }
            }
        });
        tracing::info!(instance = %config.instance, "auth provider started");
        Ok(Self { task })
    }

    /// Waits until the provider has stopped.
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

/// Broadcasts what `new` no longer accepts of what `old` did: endpoint tokens removed or moved
/// to another endpoint, client credentials removed or given another secret.
async fn announce_revocations<B: Bus>(
    bus: &B,
    instance: &str,
    replica: &str,
    old: &Directory,
    new: &Directory,
) {
    for ((app_version, token), endpoint_id) in &old.endpoints {
        let key = (app_version.clone(), token.clone());
        if new.endpoints.get(&key) == Some(endpoint_id) {
            continue;
        }
        let token_id = token_id(app_version, token);
        let event = EndpointTokenRevokedEvent {
            correlation_id: &next_correlation_id(replica),
            timestamp_ms: now_ms(),
            timeout_ms: 0,
            app_name: app_version,
            endpoint_id,
            token_ids: vec![&token_id],
            originator_replica_id: replica,
        };
        tracing::info!(app_version, endpoint_id, "auth: endpoint token revoked");
        let subject = Subject::from(subjects::token_revoked(instance));
        if let Err(e) = bus.publish(subject, None, event.to_bytes()).await {
            tracing::warn!(error = %e, "cannot announce a token revocation");
        }
    }
    let mut revoked: Vec<String> = Vec::new();
    for (user, c) in &old.clients {
        if new.clients.get(user) != Some(c) {
            revoked.push(c.client_id.clone().unwrap_or_else(|| c.username.clone()));
        }
    }
    for b in &old.bearer_tokens {
        if !new.bearer_tokens.contains(b) {
            revoked.push(b.client_id.clone());
        }
    }
    for (key, c) in &old.certificates {
        if new.certificates.get(key).is_none_or(|n| n.credential_id() != c.credential_id()) {
            revoked.push(c.credential_id().to_owned());
        }
    }
    for credential_id in &revoked {
        let event = ClientCredentialRevokedEvent {
            correlation_id: &next_correlation_id(replica),
            timestamp_ms: now_ms(),
            timeout_ms: 0,
            credential_id,
            originator_replica_id: replica,
        };
        tracing::info!(credential_id, "auth: client credential revoked");
        let subject = Subject::from(subjects::credential_revoked(instance));
        if let Err(e) = bus.publish(subject, None, event.to_bytes()).await {
            tracing::warn!(error = %e, "cannot announce a credential revocation");
        }
    }
}

/// A correlation id for an event of this replica.
fn next_correlation_id(replica: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{replica}-revoked-{n}")
}

/// The token id the provider reports for `token` of `app_version` (stable, one per token).
pub fn token_id(app_version: &str, token: &str) -> String {
    format!("tok-{}", &derived_endpoint_id(app_version, token)[3..])
}

async fn answer<B: Bus>(
    bus: &B,
    msg: Message,
    respond: impl FnOnce(&[u8]) -> Option<bytes::Bytes>,
) {
    let Some(reply) = msg.reply else {
        tracing::warn!(subject = %msg.subject, "16/ECAP request without reply subject dropped");
        return;
    };
    if let Some(header) = fleetgate_messages::ism_header(&msg.payload)
        && fleetgate_bus::is_expired(header.timestamp_ms, header.timeout_ms)
    {
        tracing::debug!(correlation_id = header.correlation_id, "expired 16/ECAP request dropped");
        return;
    }
    let Some(response) = respond(&msg.payload) else {
        return;
    };
    if let Err(e) = bus.publish(reply, None, response).await {
        tracing::warn!(error = %e, "cannot answer a 16/ECAP request");
    }
}

impl Directory {
    fn new(config: &AuthConfig) -> Result<Self, AuthError> {
        if !subjects::is_valid_token(&config.instance) {
            return Err(AuthError::InvalidInstance(config.instance.clone()));
        }
        let mut endpoints = HashMap::new();
        for e in &config.endpoints {
            let key = (e.app_version.clone(), e.token.clone());
            if endpoints.insert(key, e.endpoint_id.clone()).is_some() {
                return Err(AuthError::DuplicateToken {
                    app_version: e.app_version.clone(),
                    token: e.token.clone(),
                });
            }
        }
        if config.auto_register {
            tracing::warn!("auth.auto_register is on: every token is accepted as an endpoint");
        }
        Ok(Directory {
            auto_register: config.auto_register,
            allow_anonymous: config.allow_anonymous,
            bearer_tokens: config.bearer_tokens.clone(),
            endpoints,
            clients: config.clients.iter().map(|c| (c.username.clone(), c.clone())).collect(),
            certificates: config
                .certificates
                .iter()
                .map(|c| ((c.issuer.clone(), c.serial_number.clone()), c.clone()))
                .collect(),
        })
    }

    fn validate_token(&self, payload: &[u8]) -> Option<bytes::Bytes> {
        let request = EndpointTokenValidationRequest::decode(payload)
            .inspect_err(|e| tracing::warn!(error = %e, "undecodable ep-token-request dropped"))
            .ok()?;
        let key = (request.app_name.to_owned(), request.token.to_owned());
        let endpoint_id = match self.endpoints.get(&key) {
            Some(id) => Some(id.clone()),
            None if self.auto_register => {
                Some(derived_endpoint_id(request.app_name, request.token))
            }
            None => None,
        };
        let token_id = endpoint_id.as_ref().map(|_| token_id(request.app_name, request.token));
        let response = EndpointTokenValidationResponse {
            correlation_id: request.correlation_id,
            timestamp_ms: now_ms(),
            timeout_ms: 0,
            token_id: token_id.as_deref(),
            endpoint_id: endpoint_id.as_deref(),
            status_code: if endpoint_id.is_some() { 200 } else { 401 },
            reason_phrase: endpoint_id.is_none().then_some("unknown endpoint token"),
        };
        Some(response.to_bytes())
    }

    fn validate_client(&self, payload: &[u8]) -> Option<bytes::Bytes> {
        let request = ClientUsernamePasswordValidationRequest::decode(payload)
            .inspect_err(|e| tracing::warn!(error = %e, "undecodable password request dropped"))
            .ok()?;
        let (status, client_id, reason) = match (request.username, request.password) {
            // A password without a user name is a bearer token (HTTP `Authorization: Bearer`).
            (None, Some(token)) => {
                match self
                    .bearer_tokens
                    .iter()
                    .find(|b| constant_time_eq(b.token.as_bytes(), token.as_bytes()))
                {
                    Some(b) => (200, Some(b.client_id.clone()), None),
                    None => (401, None, Some("unknown bearer token")),
                }
            }
            (None, None) if self.allow_anonymous => (200, None, None),
            (None, None) => (401, None, Some("user name required")),
            (Some(user), _) => match self.clients.get(user) {
                Some(c)
                    if constant_time_eq(
                        c.password.as_bytes(),
                        request.password.unwrap_or("").as_bytes(),
                    ) =>
                {
                    (200, Some(c.client_id.clone().unwrap_or_else(|| c.username.clone())), None)
                }
                _ => (401, None, Some("bad user name or password")),
            },
        };
        let response = ClientUsernamePasswordValidationResponse {
            correlation_id: request.correlation_id,
            timestamp_ms: now_ms(),
            timeout_ms: 0,
            credential_id: client_id.as_deref(),
            client_id: client_id.as_deref(),
            status_code: status,
            reason_phrase: reason,
        };
        Some(response.to_bytes())
    }
}

impl Directory {
    fn validate_certificate(&self, payload: &[u8]) -> Option<bytes::Bytes> {
        let request = ClientCertificateValidationRequest::decode(payload)
            .inspect_err(|e| tracing::warn!(error = %e, "undecodable certificate request dropped"))
            .ok()?;
        let key = (request.issuer.to_owned(), request.serial_number.to_owned());
        let known = self.certificates.get(&key);
        if known.is_none() {
            tracing::debug!(
                issuer = request.issuer,
                serial = request.serial_number,
                "unknown client certificate"
            );
        }
        let response = ClientCertificateValidationResponse {
            correlation_id: request.correlation_id,
            timestamp_ms: now_ms(),
            timeout_ms: 0,
            credential_id: known.map(CertificateEntry::credential_id),
            client_id: known.map(CertificateEntry::client_id),
            status_code: if known.is_some() { 200 } else { 401 },
            reason_phrase: known.is_none().then_some("unknown client certificate"),
        };
        Some(response.to_bytes())
    }
}

/// A stable endpoint id for an auto-registered token: the same on every replica and restart.
pub fn derived_endpoint_id(app_version: &str, token: &str) -> String {
    // FNV-1a, 64 bit: stable across processes, unlike std's randomly keyed hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in app_version.bytes().chain([b'/']).chain(token.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("ep-{h:016x}")
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The subject a consumer sends token validation requests to, for tests and tools.
pub fn token_request_subject(instance: &str) -> Subject {
    Subject::from(subjects::ecap_token_request(instance))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fleetgate_bus::{InProcessBus, Requester};

    use super::*;

    fn correlation(p: &[u8]) -> Option<&str> {
        fleetgate_messages::avro::Reader::new(p).str("correlationId").ok()
    }

    async fn provider(config: AuthConfig) -> (InProcessBus, watch::Sender<bool>) {
        let bus = InProcessBus::new(64);
        let (stop, rx) = watch::channel(false);
        AuthProvider::start(bus.clone(), Live::new(config), rx).await.expect("start");
        (bus, stop)
    }

    async fn validate(bus: &InProcessBus, app: &str, token: &str) -> (i32, Option<String>) {
        let requester = Requester::start(
            bus.clone(),
            Subject::from_static("me.ecap.ep-token-response"),
            correlation,
        )
        .await
        .expect("requester");
        let request = EndpointTokenValidationRequest {
            correlation_id: "c1",
            timestamp_ms: now_ms(),
            timeout_ms: 0,
            app_name: app,
            token,
        };
        let reply = requester
            .request(
                token_request_subject("auth"),
                "c1",
                request.to_bytes(),
                Duration::from_secs(2),
            )
            .await
            .expect("reply");
        let r = EndpointTokenValidationResponse::decode(&reply.payload).expect("decode");
        (r.status_code, r.endpoint_id.map(str::to_owned))
    }

    fn endpoint(app: &str, token: &str, id: &str) -> EndpointEntry {
        EndpointEntry { app_version: app.into(), token: token.into(), endpoint_id: id.into() }
    }

    #[tokio::test]
    async fn known_and_unknown_tokens() {
        let config =
            AuthConfig { endpoints: vec![endpoint("demo-v1", "t1", "ep-1")], ..Default::default() };
        let (bus, _stop) = provider(config).await;
        assert_eq!(validate(&bus, "demo-v1", "t1").await, (200, Some("ep-1".into())));
        assert_eq!(validate(&bus, "demo-v1", "t2").await, (401, None));
        assert_eq!(validate(&bus, "demo-v2", "t1").await, (401, None));
    }

    #[tokio::test]
    async fn auto_register_accepts_any_token_stably() {
        let (bus, _stop) = provider(AuthConfig { auto_register: true, ..Default::default() }).await;
        let (status, id) = validate(&bus, "demo-v1", "anything").await;
        assert_eq!(status, 200);
        assert_eq!(id, Some(derived_endpoint_id("demo-v1", "anything")));
        assert_ne!(derived_endpoint_id("demo-v1", "a"), derived_endpoint_id("demo-v1", "b"));
    }

    #[tokio::test]
    async fn dropped_tokens_and_credentials_are_announced_revoked() {
        let client = |user: &str, pw: &str| ClientEntry {
            username: user.into(),
            password: pw.into(),
            client_id: None,
        };
        let config = AuthConfig {
            endpoints: vec![endpoint("demo-v1", "t1", "ep-1"), endpoint("demo-v1", "t2", "ep-2")],
            clients: vec![client("a", "pw"), client("b", "pw")],
            ..Default::default()
        };
        let settings = Live::new(config.clone());
        let bus = InProcessBus::new(64);
        let mut tokens = bus.subscribe(subjects::TOKEN_REVOKED_ANY, None).await.expect("sub");
        let mut credentials =
            bus.subscribe(subjects::CREDENTIAL_REVOKED_ANY, None).await.expect("sub");
        let (_stop, rx) = watch::channel(false);
        AuthProvider::start(bus.clone(), settings.clone(), rx).await.expect("start");
        settings.set(AuthConfig {
            endpoints: vec![endpoint("demo-v1", "t1", "ep-1")],
            clients: vec![client("a", "new password")],
            ..config
        });
        let wait = Duration::from_secs(2);
        let m = tokio::time::timeout(wait, tokens.next()).await.expect("event").expect("open");
        let event = EndpointTokenRevokedEvent::decode(&m.payload).expect("decode");
        assert_eq!((event.app_name, event.endpoint_id), ("demo-v1", "ep-2"));
        assert_eq!(event.token_ids, vec![token_id("demo-v1", "t2").as_str()]);
        let mut revoked = Vec::new();
        for _ in 0..2 {
            let m =
                tokio::time::timeout(wait, credentials.next()).await.expect("event").expect("open");
            let event = ClientCredentialRevokedEvent::decode(&m.payload).expect("decode");
            revoked.push(event.credential_id.to_owned());
        }
        revoked.sort();
        assert_eq!(revoked, ["a", "b"], "a's password changed, b was removed");
        assert_ne!(token_id("demo-v1", "t1"), token_id("demo-v1", "t2"));
    }

    #[tokio::test]
    async fn duplicate_tokens_are_a_config_error() {
        let config = AuthConfig {
            endpoints: vec![endpoint("a", "t", "1"), endpoint("a", "t", "2")],
            ..Default::default()
        };
        let (_stop, rx) = watch::channel(false);
        assert_eq!(config.problems().len(), 1, "the loader refuses it before the provider");
        let err = AuthProvider::start(InProcessBus::new(4), Live::new(config), rx)
            .await
            .err()
            .expect("error");
        assert!(err.to_string().contains("listed twice"), "{err}");
    }

    #[tokio::test]
    async fn new_settings_apply_to_the_next_request() {
        let config =
            AuthConfig { endpoints: vec![endpoint("demo-v1", "t1", "ep-1")], ..Default::default() };
        let settings = Live::new(config.clone());
        let bus = InProcessBus::new(64);
        let (_stop, rx) = watch::channel(false);
        AuthProvider::start(bus.clone(), settings.clone(), rx).await.expect("start");
        assert_eq!(validate(&bus, "demo-v1", "t2").await, (401, None));
        settings.set(AuthConfig { endpoints: vec![endpoint("demo-v1", "t2", "ep-2")], ..config });
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while validate(&bus, "demo-v1", "t2").await.0 != 200 {
            assert!(std::time::Instant::now() < deadline, "the new endpoint is never accepted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            validate(&bus, "demo-v1", "t1").await,
            (401, None),
            "the removed one is refused"
        );
    }

    #[tokio::test]
    async fn certificates_known_by_issuer_and_serial() {
        let entry = |serial: &str, client: Option<&str>| CertificateEntry {
            issuer: "CN=Fleet CA, O=Example".into(),
            serial_number: serial.into(),
            client_id: client.map(str::to_owned),
            credential_id: None,
        };
        let config = AuthConfig {
            certificates: vec![entry("1001", Some("device-1")), entry("1002", None)],
            ..Default::default()
        };
        assert!(config.problems().is_empty());
        let (bus, _stop) = provider(config).await;
        let requester = Requester::start(
            bus.clone(),
            Subject::from_static("me.ecap.client-certificate-response"),
            correlation,
        )
        .await
        .expect("requester");
        let ask = |issuer: &'static str, serial: &'static str| {
            let requester = &requester;
            async move {
                let request = ClientCertificateValidationRequest {
                    correlation_id: serial,
                    timestamp_ms: now_ms(),
                    timeout_ms: 0,
                    issuer,
                    serial_number: serial,
                };
                let subject = Subject::from(subjects::ecap_certificate_request("auth"));
                let reply = requester
                    .request(subject, serial, request.to_bytes(), Duration::from_secs(2))
                    .await
                    .expect("reply");
                let r =
                    ClientCertificateValidationResponse::decode(&reply.payload).expect("decode");
                (r.status_code, r.client_id.map(str::to_owned), r.credential_id.map(str::to_owned))
            }
        };
        let known = Some("device-1".to_owned());
        assert_eq!(ask("CN=Fleet CA, O=Example", "1001").await, (200, known.clone(), known));
        let serial = Some("1002".to_owned());
        assert_eq!(ask("CN=Fleet CA, O=Example", "1002").await, (200, serial.clone(), serial));
        assert_eq!(ask("CN=Fleet CA, O=Example", "1003").await, (401, None, None));
        assert_eq!(ask("CN=Other CA", "1001").await, (401, None, None), "issuer and serial");
    }

    #[test]
    fn certificate_entries_are_checked() {
        let entry = |serial: &str| CertificateEntry {
            issuer: "CN=CA".into(),
            serial_number: serial.into(),
            client_id: None,
            credential_id: None,
        };
        let config = AuthConfig {
            certificates: vec![entry("12"), entry("12"), entry("0x1f")],
            ..Default::default()
        };
        let problems = config.problems();
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn passwords() {
        let d = Directory {
            auto_register: false,
            allow_anonymous: false,
            bearer_tokens: vec![BearerEntry { token: "t0k".into(), client_id: "svc".into() }],
            endpoints: HashMap::new(),
            clients: [(
                "dev".to_owned(),
                ClientEntry { username: "dev".into(), password: "pw".into(), client_id: None },
            )]
            .into_iter()
            .collect(),
            certificates: HashMap::new(),
        };
        let check = |user: Option<&str>, pw: Option<&str>| {
            let req = ClientUsernamePasswordValidationRequest {
                correlation_id: "c",
                timestamp_ms: 0,
                timeout_ms: 0,
                username: user,
                password: pw,
            };
            let bytes = d.validate_client(&req.to_bytes()).expect("answer");
            let r = ClientUsernamePasswordValidationResponse::decode(&bytes).expect("decode");
            (r.status_code, r.client_id.map(str::to_owned))
        };
        assert_eq!(check(Some("dev"), Some("pw")), (200, Some("dev".into())));
        assert_eq!(check(Some("dev"), Some("px")), (401, None));
        assert_eq!(check(Some("who"), Some("pw")), (401, None));
        assert_eq!(check(None, None), (401, None));
        assert_eq!(check(None, Some("t0k")), (200, Some("svc".into())));
        assert_eq!(check(None, Some("nope")), (401, None));
    }
}
