//! The communication service: 1/KP requests from any transport to 4/ESP `ClientData` on the
//! bus, `ExtensionData` back to the session that asked (or, for pushes, to every session that
//! uses the endpoint), 16/ECAP for tokens and client credentials, 9/ELCE connectivity events.
//!
//! A message's way reads straight through, one module per direction:
//! - [`uplink`]: device → bus. A session opens (16/ECAP client credentials), a request's token
//!   is resolved (16/ECAP, cached per session), the request becomes `ClientData` on the
//!   extension's subject and, when an answer is due, a pending request.
//! - [`downlink`]: bus → device. `ExtensionData` answers a pending request or is a push for an
//!   endpoint's sessions; copies go to subscribers; a request nobody answered gets 504.
//! - [`events`]: connectivity (9/ELCE connected and disconnected) and 16/ECAP revocations
//!   (endpoint tokens, matched by application name and token id; client credentials).
//!
//! What an unauthenticated peer can make it keep is bounded: tokens over `max_token_bytes`
//! are refused unseen, unknown tokens go to a bounded negative cache apart from the positive
//! one, and an address that keeps failing backs off (`guard`); refusals are counted by reason.
//!
//! The gateway is the transports' [`KpHandler`]; it knows the bus and the Avro records, and no
//! transport, socket or wire format. The binary wires it to the transports of its registry.

mod correlation;
mod delivery;
pub mod downlink;
pub mod events;
mod guard;
mod metrics;
mod pending;
mod sessions;
mod sharded;
pub mod spool;
mod tokens;
pub mod uplink;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use fleetgate_bus::{Bus, BusError, Requester, Subject};
use fleetgate_live::Live;
use fleetgate_messages::subjects;
use fleetgate_transport_core::metrics::Latency;
use fleetgate_transport_core::settings::below_minimum;
use fleetgate_transport_core::{
    BoxFuture, ClientCredentials, ClientIdentity, KpError, KpHandler, KpRequest, Outbox, SessionId,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use delivery::{SpoolConfig, SpoolMode};
pub use guard::AuthFailuresConfig;
pub use metrics::GatewayMetrics;

use correlation::CorrelationId;
use delivery::Delivery;
use guard::AuthGuard;
use pending::PendingTable;
use sessions::Sessions;
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
    /// How long an extension has to answer a request before the device gets 504 (without a
    /// spool), or before a spooled request is sent to it again.
    pub request_timeout_ms: u64,
    /// How long the 16/ECAP provider has to answer before a device gets 503.
    pub auth_timeout_ms: u64,
    /// How long a validated token is trusted without asking the provider again.
    pub token_cache_ttl_ms: u64,
    /// How long an unknown token stays unknown without asking again.
    pub token_negative_cache_ttl_ms: u64,
    /// Unknown or refused tokens remembered at most (the negative cache, apart from the
    /// positive one; the least useful go first).
    pub token_negative_cache_capacity: usize,
    /// Longer endpoint tokens are refused (401) without a lookup or a cache entry.
    pub max_token_bytes: usize,
    /// Back-off for source addresses that keep failing to authenticate.
    pub auth_failures: AuthFailuresConfig,
    /// Topic filters one session may subscribe to (MQTT SUBSCRIBE; a refused filter gets
    /// 429: SUBACK 0x97 on MQTT 5, 0x80 on 3.1.1). 0: no limit.
    pub max_subscriptions_per_session: u32,
    /// Store and forward when the bus cannot deliver in time.
    pub spool: SpoolConfig,
    /// When a client certificate (verified by the transport against its client CA and CRLs)
    /// is also checked with the 16/ECAP provider.
    pub certificate_check: CertificateCheck,
    /// App version → application name, from `applications.<app>.versions` (set by the binary,
    /// not a key of `gateway`): 16/ECAP revocations name the application.
    #[serde(skip)]
    pub app_names: std::collections::BTreeMap<String, String>,
}

/// When the 16/ECAP provider is asked about a client certificate
/// (`client-certificate-request`). The transport's own check (chain to the client CA,
/// validity, CRLs) happens at the handshake in every mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertificateCheck {
    /// Never: a certificate that passed the handshake authenticates the client.
    Local,
    /// Always: the provider must accept it; no answer refuses the client (503).
    Provider,
    /// Asked always; a provider that does not handle certificate requests (no responder on
    /// the subject, or it answers 501) leaves the decision to the local check. A refusal or no
    /// answer in time refuses the client, as in `provider`.
    #[default]
    ProviderWhenSupported,
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
            token_negative_cache_capacity: 10_000,
            max_token_bytes: 512,
            auth_failures: AuthFailuresConfig::default(),
            max_subscriptions_per_session: 100,
            spool: SpoolConfig::default(),
            certificate_check: CertificateCheck::default(),
            app_names: std::collections::BTreeMap::new(),
        }
    }
}

impl GatewayConfig {
    /// Values out of range, as `(setting, what is wrong)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let spool = &self.spool;
        let failures = &self.auth_failures;
        let backing_off = u64::from(failures.max_failures > 0);
        below_minimum(&[
            ("request_timeout_ms", self.request_timeout_ms, 1),
            ("auth_timeout_ms", self.auth_timeout_ms, 1),
            ("token_negative_cache_capacity", self.token_negative_cache_capacity as u64, 1),
            ("max_token_bytes", self.max_token_bytes as u64, 1),
            ("auth_failures.window_ms", failures.window_ms, backing_off),
            ("auth_failures.backoff_ms", failures.backoff_ms, backing_off),
            ("auth_failures.max_addresses", failures.max_addresses as u64, backing_off),
            // Less than a MiB holds a few requests at most: the spool would be full at once.
            ("spool.max_bytes", spool.max_bytes, 1024 * 1024),
            ("spool.delivery_timeout_ms", spool.delivery_timeout_ms, 1),
            ("spool.forward_window", spool.forward_window as u64, 1),
        ])
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
    #[error("gateway: cannot subscribe")]
    Bus(#[from] BusError),
    /// The spool cannot be opened.
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
}

/// An extension instance devices may address.
struct Extension {
    /// `kaa.v1.service.<name>.esp.ClientData`.
    subject: Subject,
    /// Its request latency.
    latency: Latency,
}

/// The communication service of one gateway replica.
pub struct Gateway<B: Bus> {
    bus: B,
    config: GatewayConfig,
    replica_id: String,
    /// `<replica id>-`: every correlation id this replica makes starts with it.
    correlation_prefix: String,
    reply_subject: Subject,
    /// Where requests may go; replaced when `gateway.extensions` or `gateway.app_versions`
    /// change.
    routes: Live<Routes>,
    connected_subject: Subject,
    disconnected_subject: Subject,
    client_requests: Subject,
    client_requester: Requester<B>,
    certificate_requests: Subject,
    certificate_requester: Requester<B>,
    sessions: Sessions,
    pending: PendingTable,
    tokens: TokenCache<B>,
    /// Failed authentications per source address.
    guard: AuthGuard,
    /// App version → application name (16/ECAP revocations name the application).
    app_names: std::collections::BTreeMap<String, String>,
    next_session: AtomicU64,
    next_request: AtomicU64,
    /// Set on SIGTERM: no new requests are taken (nothing new is acknowledged).
    draining: AtomicBool,
    delivery: Delivery,
    metrics: GatewayMetrics,
}

/// The extensions requests may name and the app versions they may come from (none listed: any).
struct Routes {
    extensions: HashMap<String, Extension>,
    app_versions: HashSet<String>,
    /// `max_subscriptions_per_session` (0: no limit).
    max_subscriptions_per_session: usize,
}

impl Routes {
    fn new(config: &GatewayConfig, metrics: &GatewayMetrics) -> Result<Self, GatewayError> {
        for e in &config.extensions {
            check_name("extensions", e)?;
        }
        let extensions = config
            .extensions
            .iter()
            .map(|e| {
                let subject = Subject::from(subjects::esp_client_data(e));
                (e.clone(), Extension { subject, latency: metrics.request_duration_of(e) })
            })
            .collect();
        Ok(Self {
            extensions,
            app_versions: config.app_versions.iter().cloned().collect(),
            max_subscriptions_per_session: config.max_subscriptions_per_session as usize,
        })
    }
}

fn check_name(key: &'static str, value: &str) -> Result<(), GatewayError> {
    match subjects::is_valid_token(value) {
        true => Ok(()),
        false => Err(GatewayError::InvalidName { key, value: value.to_owned() }),
    }
}

/// Applies replaced settings until `shutdown`: new routes, and a token cache emptied so that
/// the next use of each token asks the provider again.
async fn follow_settings<B: Bus>(
    gateway: std::sync::Weak<Gateway<B>>,
    settings: Live<GatewayConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changed = settings.changed();
    loop {
        tokio::select! {
            Ok(()) = changed.changed() => {}
            _ = fleetgate_bus::stopped(&mut shutdown) => return,
            else => return,
        }
        let Some(gateway) = gateway.upgrade() else { return };
        match Routes::new(&settings.get(), &gateway.metrics) {
            Ok(routes) => {
                gateway.routes.set(routes);
                gateway.tokens.forget_all();
                tracing::info!(
                    "gateway: new settings applied (extensions, app versions, token cache)"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "gateway: new settings refused; the old ones stay")
            }
        }
    }
}

impl<B: Bus> Gateway<B> {
    /// Validates the configuration, subscribes to this replica's reply subjects (and waits until
    /// the bus has them), and starts routing extension answers until `shutdown`.
    ///
    /// `settings` may be replaced while the gateway runs: new extensions and app versions apply
    /// to the next request, and any replacement drops the token cache (the provider's settings
    /// may have changed with them). The rest applies at the next start.
    pub async fn start(
        bus: B,
        settings: Live<GatewayConfig>,
        metrics: GatewayMetrics,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Self>, GatewayError> {
        let config = GatewayConfig::clone(&settings.get());
        check_name("instance", &config.instance)?;
        check_name("auth_instance", &config.auth_instance)?;
        let replica_id = match &config.replica_id {
            Some(id) => {
                check_name("replica_id", id)?;
                id.clone()
            }
            None => fleetgate_bus::new_replica_id(&config.instance),
        };
        let delivery = Delivery::open(&config.spool)?;
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
        let certificate_requester = Requester::start(
            bus.clone(),
            subjects::ecap_certificate_response_reply(&replica_id).into(),
            correlation,
        )
        .await?;
        let reply_subject = Subject::from(subjects::esp_extension_data_reply(&replica_id));
        let replies = bus.subscribe(&reply_subject, None).await?;
        // Pushes without affinity go to every replica; only the one holding the session sends.
        let pushes = bus.subscribe(&subjects::esp_extension_data(&config.instance), None).await?;
        let revocations = bus.subscribe(subjects::TOKEN_REVOKED_ANY, None).await?;
        let credential_revocations = bus.subscribe(subjects::CREDENTIAL_REVOKED_ANY, None).await?;
        bus.flush().await?;
        let routes = Live::new(Routes::new(&config, &metrics)?);
        let gateway = Arc::new(Self {
            correlation_prefix: format!("{replica_id}-"),
            routes,
            connected_subject: subjects::elce_connected(&config.instance).into(),
            disconnected_subject: subjects::elce_disconnected(&config.instance).into(),
            client_requests: subjects::ecap_username_password_request(&config.auth_instance).into(),
            client_requester,
            certificate_requests: subjects::ecap_certificate_request(&config.auth_instance).into(),
            certificate_requester,
            sessions: Sessions::default(),
            pending: PendingTable::default(),
            next_session: AtomicU64::new(1),
            next_request: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            delivery,
            metrics,
            reply_subject,
            tokens,
            guard: AuthGuard::new(&config.auth_failures),
            app_names: config.app_names.clone(),
            replica_id,
            config,
            bus,
        });
        let weak = || Arc::downgrade(&gateway);
        tokio::spawn(downlink::route_answers(weak(), replies, shutdown.clone()));
        tokio::spawn(downlink::route_answers(weak(), pushes, shutdown.clone()));
        tokio::spawn(downlink::expire_requests(weak(), shutdown.clone()));
        tokio::spawn(delivery::forward(weak(), shutdown.clone()));
        tokio::spawn(events::probe_auth(weak(), shutdown.clone()));
        tokio::spawn(events::end_revoked(weak(), revocations, shutdown.clone()));
        tokio::spawn(events::end_revoked_credentials(
            weak(),
            credential_revocations,
            shutdown.clone(),
        ));
        tokio::spawn(follow_settings(weak(), settings, shutdown));
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

    /// Takes no new requests from now on (they are refused with 503, which acknowledges
    /// nothing); those in flight are answered, or spooled after the delivery timeout.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Requests taken and not yet durable: on the bus without an answer, or on their way into
    /// the spool. A graceful stop waits for them.
    pub fn in_flight(&self) -> usize {
        self.pending.count_direct() + self.delivery.appending()
    }

    /// Why the service cannot take traffic now, if it cannot: the authentication provider
    /// does not answer, or the spool is full.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.tokens.provider_answers() {
            return Err("the authentication provider does not answer".into());
        }
        self.delivery.readiness()
    }

    /// Records spooled and not yet delivered.
    pub fn spooled(&self) -> u64 {
        self.delivery.spool.as_ref().map_or(0, |s| s.len())
    }

    /// Samples the gauges of `/metrics`: requests pending, the spool's depth, bytes and age.
    fn sample_gauges(&self) {
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics.requests_pending.set(gauge(self.pending.len() as u64));
        if let Some(spool) = &self.delivery.spool {
            self.metrics.spool_messages.set(gauge(spool.len()));
            self.metrics.spool_bytes.set(gauge(spool.bytes()));
            let age = spool.oldest_ms().map_or(0, |t| fleetgate_bus::now_ms().saturating_sub(t));
            self.metrics.spool_oldest_age_ms.set(age);
        }
    }

    /// A new request number and its correlation id.
    fn new_correlation_id(&self) -> (u64, CorrelationId) {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        (n, CorrelationId::new(&self.correlation_prefix, n))
    }
}

/// The transports' view of the gateway: each call goes to the direction it belongs to.
impl<B: Bus> KpHandler for Gateway<B> {
    fn open_session<'a>(
        &'a self,
        credentials: ClientCredentials<'a>,
        outbox: Outbox,
    ) -> BoxFuture<'a, Result<ClientIdentity, KpError>> {
        Box::pin(self.open(credentials, outbox))
    }

    fn handle(&self, session: SessionId, request: KpRequest) -> BoxFuture<'_, Result<(), KpError>> {
        Box::pin(self.accept(session, request))
    }

    fn subscribe<'a>(
        &'a self,
        session: SessionId,
        filter: &'a str,
        tag: u64,
    ) -> BoxFuture<'a, Result<(), KpError>> {
        Box::pin(self.add_subscription(session, filter, tag))
    }

    fn unsubscribe(&self, session: SessionId, filter: &str) -> bool {
        self.sessions.unsubscribe(session, filter)
    }

    fn close_session(&self, session: SessionId) {
        self.end_session(session);
    }
}
