//! CMX, the configuration management extension: 7/CMP over 4/ESP, and a 6/CDTP consumer.
//!
//! Devices reach it as extension instance `cmx`:
//!
//! * `/config/json[/<name>]` with `{"configId"?, "observe"?}` is answered with
//!   `{"configId", "config"}`, or `{}` when the device has the current one, from a
//!   `ConfigRequest` to the provider (ECR); `observe: false` stops pushes to that endpoint and
//!   name until its next request, `observe: true` (or nothing said) lets them go.
//! * `/applied/json[/<name>]` with `{"configId", "statusCode"?, "reasonPhrase"?}` is answered
//!   with an empty payload and broadcast as `ConfigApplied`.
//! * Pushes, as Kaa's CMX does, without any request: when the provider broadcasts
//!   `ConfigUpdated`, and when 9/ELCE says an endpoint connected without having confirmed its
//!   current configuration. A push is an `ExtensionData` without request id, which the gateway
//!   sends to the bare `.../config/json[/<name>]/status` topic (MQTT), as an Observe
//!   notification (CoAP) or as the answer of a long poll (HTTP). Every push is fetched through
//!   a `ConfigRequest`, so the provider records it as dispatched and an endpoint with its own
//!   configuration never gets a changed default.
//!
//! What an endpoint confirmed and its observe choices are kept in memory: after a restart CMX
//! pushes on the next connect once more (re-applying a configuration is harmless), and
//! replicas each know what they served. The table is bounded (`cmx.max_endpoints`, least
//! recently used forgotten) and a 9/ELCE disconnect takes the endpoint out of the connected
//! set an app version's changed default goes to (see `endpoints.rs`). The request id is already taken off the resource path
//! by the gateway (DESIGN decision 1), so `/config/json/42` never reaches here as name `42`.
//!
//! It knows the bus and the Avro records; nothing of transports or storage.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod endpoints;
pub mod request;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetgate_bus::{AnyBus, Bus, Message, Requester, Subject, Subscription, now_ms};
use fleetgate_messages::{
    ClientData, ConfigApplied, ConfigRequest, ConfigResponse, ConfigUpdated, ConnectedEvent,
    DisconnectedEvent, ExtensionData, Record, subjects,
};
use fleetgate_service::{BoxFuture, Running, ServiceError, StartContext};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use endpoints::{Endpoints, NameState};
use request::{Applied, Resource, parse_applied, parse_config_request, resource_of};

/// The configuration name when a device names none.
pub const DEFAULT_NAME: &str = "default";

/// `cmx.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CmxConfig {
    /// Extension instance name devices use in topics, and the queue group of the replicas.
    pub instance: String,
    /// The 6/CDTP provider (ECR) instance.
    pub provider: String,
    /// The gateway's instance, for pushes to endpoints no request came from yet.
    pub gateway_instance: String,
    /// How long a `ConfigRequest` may wait for the provider (then the device gets 504).
    pub provider_timeout_ms: u64,
    /// The most endpoints remembered (connected, or with a confirmation or observe choice);
    /// past it the least recently used is forgotten (`fleetgate_cmx_endpoints_evicted_total`).
    pub max_endpoints: usize,
}

impl Default for CmxConfig {
    fn default() -> Self {
        Self {
            instance: "cmx".into(),
            provider: "ecr".into(),
            gateway_instance: "kpc".into(),
            provider_timeout_ms: 5_000,
            max_endpoints: 250_000,
        }
    }
}

impl CmxConfig {
    /// Values out of range, as `(setting, what is wrong)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        for (key, value) in [
            ("instance", &self.instance),
            ("provider", &self.provider),
            ("gateway_instance", &self.gateway_instance),
        ] {
            if !subjects::is_valid_token(value) {
                problems.push((key, format!("`{value}` is not a valid subject token")));
            }
        }
        if self.provider_timeout_ms == 0 {
            problems.push(("provider_timeout_ms", "0 is too small: the minimum is 1".into()));
        }
        if self.max_endpoints == 0 {
            problems.push(("max_endpoints", "0 is too small: the minimum is 1".into()));
        }
        problems
    }
}

/// CMX metrics (`fleetgate_cmx_*`). Cloning shares them.
#[derive(Debug, Clone, Default)]
pub struct CmxMetrics {
    requests: Counter,
    refused: Counter,
    pushes: Counter,
    applied: Counter,
    provider_failures: Counter,
    endpoints: Gauge,
    evicted: Counter,
}

impl CmxMetrics {
    /// Registers them in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("cmx");
        r.register("requests", "7/CMP requests from devices", self.requests.clone());
        r.register("requests_refused", "7/CMP requests answered with a 4xx", self.refused.clone());
        r.register("pushes", "Configurations pushed without a request", self.pushes.clone());
        r.register("applied", "ConfigApplied events broadcast", self.applied.clone());
        r.register(
            "provider_failures",
            "ConfigRequests the provider did not answer in time or answered with an error",
            self.provider_failures.clone(),
        );
        r.register(
            "endpoints",
            "Endpoints remembered (connected, or with a confirmation or observe choice)",
            self.endpoints.clone(),
        );
        r.register(
            "endpoints_evicted",
            "Endpoints forgotten because cmx.max_endpoints were remembered",
            self.evicted.clone(),
        );
    }
}

/// Why CMX cannot start.
#[derive(Debug, thiserror::Error)]
pub enum CmxError {
    /// A setting is out of range.
    #[error("cmx.{key}: {message}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The bus refused a subscription.
    #[error(transparent)]
    Bus(#[from] fleetgate_bus::BusError),
}

/// The CMX service as the binary runs it.
pub struct CmxService {
    config: CmxConfig,
    metrics: CmxMetrics,
}

impl CmxService {
    /// CMX with `config`.
    pub fn new(config: CmxConfig) -> Self {
        Self { config, metrics: CmxMetrics::default() }
    }
}

impl fleetgate_service::Service for CmxService {
    fn name(&self) -> &'static str {
        "cmx"
    }

    fn register_metrics(&self, registry: &mut Registry) {
        self.metrics.register(registry);
    }

    fn start(
        self: Box<Self>,
        context: StartContext,
    ) -> BoxFuture<'static, Result<Running, ServiceError>> {
        Box::pin(async move {
            start(context, self.config, self.metrics).await.map_err(|e| ServiceError::new("cmx", e))
        })
    }
}

struct Shared {
    config: CmxConfig,
    bus: AnyBus,
    requester: Requester<AnyBus>,
    replica_id: String,
    next_id: AtomicU64,
    endpoints: Mutex<Endpoints>,
    fallback_reply: Subject,
    metrics: CmxMetrics,
}

async fn start(
    context: StartContext,
    config: CmxConfig,
    metrics: CmxMetrics,
) -> Result<Running, CmxError> {
    if let Some((key, message)) = config.problems().into_iter().next() {
        return Err(CmxError::Invalid { key, message });
    }
    let bus = context.bus;
    let replica_id = fleetgate_bus::new_replica_id(&config.instance);
    let requester = Requester::start(
        bus.clone(),
        Subject::from(subjects::cdtp_response_reply(&replica_id)),
        fleetgate_messages::correlation_id,
    )
    .await?;
    let requests =
        bus.subscribe(&subjects::esp_client_data(&config.instance), Some(&config.instance)).await?;
    let updates = bus.subscribe(subjects::CONFIG_UPDATED_ANY, Some(&config.instance)).await?;
    let connected = bus.subscribe(subjects::CONNECTED_ANY, Some(&config.instance)).await?;
    let disconnected = bus.subscribe(subjects::DISCONNECTED_ANY, Some(&config.instance)).await?;
    bus.flush().await?;
    let max_endpoints = config.max_endpoints;
    let shared = Arc::new(Shared {
        fallback_reply: Subject::from(subjects::esp_extension_data(&config.gateway_instance)),
        config,
        bus,
        requester,
        replica_id,
        next_id: AtomicU64::new(0),
        endpoints: Mutex::new(Endpoints::new(max_endpoints)),
        metrics,
    });
    let tasks = [
        tokio::spawn(each(shared.clone(), requests, |s, m| {
            Box::pin(async move { s.on_request(m).await })
        })),
        tokio::spawn(each(shared.clone(), updates, |s, m| {
            Box::pin(async move { s.on_updated(m).await })
        })),
        tokio::spawn(each(shared.clone(), connected, |s, m| {
            Box::pin(async move { s.on_connected(m).await })
        })),
        tokio::spawn(each(shared.clone(), disconnected, |s, m| {
            Box::pin(async move { s.on_disconnected(m) })
        })),
    ];
    let mut shutdown = context.shutdown;
    tracing::info!(replica = %shared.replica_id, "cmx started");
    Ok(Running::task(tokio::spawn(async move {
        fleetgate_bus::stopped(&mut shutdown).await;
        for t in tasks {
            t.abort();
        }
    })))
}

type Handler = fn(Arc<Shared>, Message) -> BoxFuture<'static, ()>;

/// Handles every message of `sub` on its own task: a slow provider does not hold up the rest.
async fn each(shared: Arc<Shared>, mut sub: Subscription, handler: Handler) {
    while let Some(msg) = sub.next().await {
        tokio::spawn(handler(shared.clone(), msg));
    }
}

/// The resource path of configuration `name`.
fn config_path(name: &str) -> String {
    if name == DEFAULT_NAME { "/config/json".into() } else { format!("/config/json/{name}") }
}

/// The 7/CMP answer to a provider's response: `{}` when unchanged, else the pair.
fn cmp_payload(r: &ConfigResponse<'_>) -> Option<Vec<u8>> {
    let id = r.config_id?;
    let config = match r.content {
        Some(c) if !c.is_empty() => c,
        _ => b"null",
    };
    let mut out = Vec::with_capacity(config.len() + id.len() + 24);
    out.extend_from_slice(b"{\"configId\":");
    out.extend_from_slice(serde_json::Value::String(id.to_owned()).to_string().as_bytes());
    out.extend_from_slice(b",\"config\":");
    out.extend_from_slice(config);
    out.push(b'}');
    Some(out)
}

impl Shared {
    fn correlation_id(&self) -> String {
        format!("{}-{:x}", self.replica_id, self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Asks the provider; `Err` is the (status, reason) a device gets instead.
    async fn fetch(
        &self,
        app_version: &str,
        endpoint: &str,
        name: &str,
        known: Option<&str>,
    ) -> Result<(Message, i32), (i32, String)> {
        let correlation_id = self.correlation_id();
        let request = ConfigRequest {
            correlation_id: &correlation_id,
            timestamp_ms: now_ms(),
            timeout_ms: i64::try_from(self.config.provider_timeout_ms).unwrap_or(i64::MAX),
            app_version_name: app_version,
            endpoint_id: endpoint,
            config_id: known,
            config_name: (name != DEFAULT_NAME).then_some(name),
        };
        let timeout = Duration::from_millis(self.config.provider_timeout_ms);
        let subject = Subject::from(subjects::cdtp_request(&self.config.provider));
        let reply = self
            .requester
            .request(subject, &correlation_id, request.to_bytes(), timeout)
            .await
            .map_err(|e| {
                self.metrics.provider_failures.inc();
                match e {
                    fleetgate_bus::BusError::Timeout(_) => {
                        (504, "the configuration provider did not answer in time".to_owned())
                    }
                    e => (503, format!("the configuration provider is unreachable: {e}")),
                }
            })?;
        let status = ConfigResponse::decode(&reply.payload)
            .map_err(|e| (502, format!("the configuration provider answered badly: {e}")))?
            .status_code;
        Ok((reply, status))
    }

    fn endpoints(&self) -> std::sync::MutexGuard<'_, Endpoints> {
        self.endpoints.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Updates the gauge and the eviction count after a change of `table`.
    fn count(&self, table: &mut Endpoints) {
        self.metrics.endpoints.set(i64::try_from(table.len()).unwrap_or(i64::MAX));
        let evicted = std::mem::take(&mut table.evicted);
        if evicted > 0 {
            if self.metrics.evicted.get() == 0 {
                tracing::warn!(
                    max_endpoints = self.config.max_endpoints,
                    "cmx.max_endpoints reached: the least recently used endpoints are forgotten \
                     (fleetgate_cmx_endpoints_evicted_total counts them)"
                );
            }
            self.metrics.evicted.inc_by(evicted);
        }
    }

    /// A request of `endpoint`: it is connected, and its gateway replica listens at `reply`.
    fn remember(&self, endpoint: &str, app_version: &str, reply: Option<Subject>) {
        let mut table = self.endpoints();
        let state = table.entry(endpoint);
        app_version.clone_into(&mut state.app_version);
        if reply.is_some() {
            state.reply = reply;
        }
        self.count(&mut table);
    }

    fn with_name<T>(&self, endpoint: &str, name: &str, f: impl FnOnce(&mut NameState) -> T) -> T {
        let mut table = self.endpoints();
        let state = table.entry(endpoint);
        let out = f(state.names.entry(name.to_owned()).or_default());
        self.count(&mut table);
        out
    }

    async fn send(&self, reply: Subject, answer: ExtensionData<'_>) {
        if let Err(e) = self.bus.publish(reply, None, answer.to_bytes()).await {
            tracing::warn!(error = %e, "cannot send to the gateway");
        }
    }

    async fn on_request(&self, msg: Message) {
        let Ok(request) = ClientData::decode(&msg.payload) else {
            tracing::debug!(subject = %msg.subject, "undecodable ClientData dropped");
            return;
        };
        if fleetgate_bus::is_expired(request.timestamp_ms, request.timeout_ms) {
            return;
        }
        self.metrics.requests.inc();
        let reply = msg.reply.clone().unwrap_or_else(|| self.fallback_reply.clone());
        let mut answer = ExtensionData {
            correlation_id: request.correlation_id,
            timestamp_ms: now_ms(),
            timeout_ms: 0,
            app_version_name: Some(request.app_version_name),
            extension_instance_name: Some(&self.config.instance),
            endpoint_id: request.endpoint_id,
            resource_path: request.resource_path,
            request_id: request.request_id,
            payload: None,
            status_code: 200,
            reason_phrase: None,
        };
        let outcome = self.serve(&request, msg.reply).await;
        let body;
        match &outcome {
            Ok(None) if request.request_id.is_none() => return,
            Ok(None) => {}
            Ok(Some(b)) => {
                body = b;
                answer.payload = Some(body);
            }
            Err((status, reason)) => {
                if (400..500).contains(status) {
                    self.metrics.refused.inc();
                }
                answer.status_code = *status;
                answer.reason_phrase = Some(reason);
            }
        }
        self.send(reply, answer).await;
    }

    /// Serves one 7/CMP request: the payload to answer with (`None`: nothing for a request
    /// without id), or an error status and reason.
    async fn serve(
        &self,
        request: &ClientData<'_>,
        reply: Option<Subject>,
    ) -> Result<Option<Vec<u8>>, (i32, String)> {
        let endpoint =
            request.endpoint_id.ok_or((401, "configuration needs an endpoint token".to_owned()))?;
        let resource = resource_of(request.resource_path, request.config_name)
            .map_err(|reason| (404, reason))?;
        self.remember(endpoint, request.app_version_name, reply);
        match resource {
            Resource::Config(name) => {
                let ask = parse_config_request(request.payload).map_err(|r| (400, r))?;
                if ask.observe.is_some() {
                    self.with_name(endpoint, &name, |s| s.observe = ask.observe);
                }
                if let Some(id) = ask.config_id.as_ref().filter(|id| !id.is_empty()) {
                    self.with_name(endpoint, &name, |s| s.confirmed = Some(id.clone()));
                }
                let (reply, status) = self
                    .fetch(request.app_version_name, endpoint, &name, ask.config_id.as_deref())
                    .await?;
                let r = ConfigResponse::decode(&reply.payload).map_err(|e| (502, e.to_string()))?;
                if !(200..300).contains(&status) {
                    self.metrics.provider_failures.inc();
                    return Err((status, r.reason_phrase.unwrap_or("provider error").to_owned()));
                }
                match cmp_payload(&r) {
                    Some(p) => Ok(Some(p)),
                    // Unchanged: `{}` to a request with an id, nothing to a request without.
                    None if request.request_id.is_some() => Ok(Some(b"{}".to_vec())),
                    None => Ok(None),
                }
            }
            Resource::Applied(name) => {
                let Applied { config_id, status_code, reason } =
                    parse_applied(request.payload).map_err(|r| (400, r))?;
                if (200..300).contains(&status_code) {
                    self.with_name(endpoint, &name, |s| s.confirmed = Some(config_id.clone()));
                }
                let correlation_id = self.correlation_id();
                let event = ConfigApplied {
                    correlation_id: &correlation_id,
                    timestamp_ms: now_ms(),
                    timeout_ms: 0,
                    app_version_name: request.app_version_name,
                    endpoint_id: endpoint,
                    config_id: &config_id,
                    originator_replica_id: Some(&self.replica_id),
                    status_code,
                    reason_phrase: reason.as_deref(),
                    config_name: (name != DEFAULT_NAME).then_some(name.as_str()),
                };
                let subject = Subject::from(subjects::config_applied(&self.config.instance));
                self.bus
                    .publish(subject, None, event.to_bytes())
                    .await
                    .map_err(|e| (503, format!("cannot broadcast ConfigApplied: {e}")))?;
                self.metrics.applied.inc();
                Ok(None)
            }
        }
    }

    /// Pushes configuration `name` to `endpoint` if it lets pushes go and the provider has
    /// something it has not confirmed.
    async fn push(&self, app_version: &str, endpoint: &str, name: &str) {
        // Read only: a push for an endpoint CMX does not know (it may be connected to a
        // gateway whose 9/ELCE event another replica heard) remembers nothing new.
        let (observe, confirmed, reply) = {
            let table = self.endpoints();
            match table.get(endpoint) {
                Some(state) => {
                    let n = state.names.get(name);
                    (
                        n.and_then(|n| n.observe),
                        n.and_then(|n| n.confirmed.clone()),
                        state.reply.clone(),
                    )
                }
                None => (None, None, None),
            }
        };
        if observe == Some(false) {
            return;
        }
        let Ok((msg, 200..=299)) =
            self.fetch(app_version, endpoint, name, confirmed.as_deref()).await
        else {
            tracing::debug!(endpoint, name, "no configuration to push");
            return;
        };
        let Ok(r) = ConfigResponse::decode(&msg.payload) else { return };
        // Nothing assigned (configId "") is nothing to push.
        let Some(payload) = cmp_payload(&r).filter(|_| r.config_id != Some("")) else {
            return;
        };
        let path = config_path(name);
        let correlation_id = self.correlation_id();
        let answer = ExtensionData {
            correlation_id: &correlation_id,
            timestamp_ms: now_ms(),
            timeout_ms: 0,
            app_version_name: Some(app_version),
            extension_instance_name: Some(&self.config.instance),
            endpoint_id: Some(endpoint),
            resource_path: &path,
            request_id: None,
            payload: Some(&payload),
            status_code: 200,
            reason_phrase: None,
        };
        self.metrics.pushes.inc();
        self.send(reply.unwrap_or_else(|| self.fallback_reply.clone()), answer).await;
    }

    async fn on_updated(self: Arc<Self>, msg: Message) {
        let Ok(event) = ConfigUpdated::decode(&msg.payload) else {
            tracing::debug!("undecodable ConfigUpdated dropped");
            return;
        };
        let name = event.config_name.unwrap_or(DEFAULT_NAME);
        let targets: Vec<String> = if event.endpoint_id.is_empty() {
            // An app version's default: every connected endpoint of it that CMX knows.
            self.endpoints().connected_of(event.app_version_name)
        } else {
            vec![event.endpoint_id.to_owned()]
        };
        for endpoint in targets {
            let (shared, app, name) =
                (self.clone(), event.app_version_name.to_owned(), name.to_owned());
            tokio::spawn(async move { shared.push(&app, &endpoint, &name).await });
        }
    }

    async fn on_connected(self: Arc<Self>, msg: Message) {
        let Ok(event) = ConnectedEvent::decode(&msg.payload) else {
            tracing::debug!("undecodable ConnectedEvent dropped");
            return;
        };
        for (endpoint, app_version) in event.endpoints {
            // The default and every name the endpoint used before.
            let mut names = vec![DEFAULT_NAME.to_owned()];
            {
                let mut table = self.endpoints();
                let state = table.connected(endpoint, app_version);
                names.extend(state.names.keys().filter(|n| *n != DEFAULT_NAME).cloned());
                self.count(&mut table);
            }
            for name in names {
                let (shared, app, endpoint) =
                    (self.clone(), app_version.to_owned(), endpoint.to_owned());
                tokio::spawn(async move { shared.push(&app, &endpoint, &name).await });
            }
        }
    }

    /// 9/ELCE disconnected: the endpoints leave the connected set (see [`endpoints`]).
    fn on_disconnected(&self, msg: Message) {
        let Ok(event) = DisconnectedEvent::decode(&msg.payload) else {
            tracing::debug!("undecodable DisconnectedEvent dropped");
            return;
        };
        let mut table = self.endpoints();
        for (endpoint, _) in event.endpoints {
            table.disconnected(endpoint);
        }
        self.count(&mut table);
    }
}
