//! ECR, the endpoint configuration repository: the 6/CDTP provider.
//!
//! Keeps a default configuration per app version and per-endpoint configurations, each named
//! (`default` when unnamed), in the configuration store of the storage layer (embedded by
//! default, PostgreSQL when configured). Every change gets a new opaque `configId` and is
//! broadcast as `ConfigUpdated`. It answers `ConfigRequest`s (replicas share them in queue
//! group `ecr.instance`) and records per endpoint and configuration what was dispatched and
//! what was confirmed: by `ConfigApplied` events, and implicitly by a request that carries a
//! `configId` (status 200, `Implicitly applied`). Kaa's ECR REST API ([`api`]) is served on
//! the admin listener.
//!
//! A change of an app version's default is broadcast with an empty `endpointId`: ECR does not
//! know which endpoints exist, the consumer (CMX) knows which are connected.
//!
//! It knows the bus, the Avro records and the storage trait; nothing of transports.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod api;
pub mod filters;

use std::collections::BTreeMap;
use std::sync::Arc;

use fleetgate_bus::{AnyBus, Bus, Message, Subject, Subscription, now_ms};
use fleetgate_live::Live;
use fleetgate_messages::{
    ConfigApplied, ConfigRequest, ConfigResponse, ConfigUpdated, Record, subjects,
};
use fleetgate_service::{
    AdminRoutes, BoxFuture, Running, ServiceError, ServiceStatus, StartContext,
};
use fleetgate_storage::{ConfigStore, StatusEvent, StorageConfig, StoredConfig};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

/// The name of the configuration a device or request names none of.
pub const DEFAULT_NAME: &str = "default";
/// Reason recorded when a request's `configId` confirms a configuration.
pub const IMPLICITLY_APPLIED: &str = "Implicitly applied";
/// The most bytes a configuration may have at all (the admin listener reads at most 1 MiB).
pub const MAX_CONFIG_BYTES_LIMIT: usize = 1 << 20;

/// `ecr.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EcrConfig {
    /// Service instance name: the provider token of 6/CDTP subjects and the queue group
    /// replicas share.
    pub instance: String,
    /// The largest configuration accepted, in bytes of JSON text (larger: 413).
    pub max_config_bytes: usize,
    /// Endpoint filters by id, for `PUT /endpoints/filters/{filterId}` ([`filters`]).
    pub filters: Filters,
}

/// Endpoint filters by id.
pub type Filters = BTreeMap<String, filters::EndpointFilter>;

impl Default for EcrConfig {
    fn default() -> Self {
        Self { instance: "ecr".into(), max_config_bytes: 256 * 1024, filters: BTreeMap::new() }
    }
}

impl EcrConfig {
    /// Values out of range, as `(setting, what is wrong)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.max_config_bytes < 4 {
            problems.push((
                "max_config_bytes",
                format!("{} is too small: the minimum is 4", self.max_config_bytes),
            ));
        }
        if self.max_config_bytes > MAX_CONFIG_BYTES_LIMIT {
            problems.push((
                "max_config_bytes",
                format!(
                    "{} is too large: the maximum is {MAX_CONFIG_BYTES_LIMIT}",
                    self.max_config_bytes
                ),
            ));
        }
        if !subjects::is_valid_token(&self.instance) {
            problems
                .push(("instance", format!("`{}` is not a valid subject token", self.instance)));
        }
        problems.extend(filters::problems(&self.filters).into_iter().map(|p| ("filters", p)));
        problems
    }
}

/// Whether `name` can name a configuration: `^[a-zA-Z0-9_-]+$` (7/CMP).
pub fn is_valid_config_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The `outcome` label of answered requests.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// ECR metrics (`fleetgate_ecr_*`). Cloning shares them.
#[derive(Debug, Clone, Default)]
pub struct EcrMetrics {
    requests: Family<OutcomeLabel, Counter>,
    updates: Counter,
    confirmations: Counter,
    undecodable: Counter,
    storage_failures: Counter,
}

impl EcrMetrics {
    /// Registers them in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("ecr");
        r.register(
            "config_requests",
            "6/CDTP configuration requests answered, by outcome (config, unchanged, none, error)",
            self.requests.clone(),
        );
        r.register("config_updates", "Configuration changes broadcast", self.updates.clone());
        r.register(
            "config_confirmations",
            "ConfigApplied events recorded",
            self.confirmations.clone(),
        );
        r.register(
            "undecodable_messages",
            "Bus messages that were not valid 6/CDTP records",
            self.undecodable.clone(),
        );
        r.register(
            "storage_failures",
            "Store operations that failed",
            self.storage_failures.clone(),
        );
    }

    fn request(&self, outcome: &'static str) {
        self.requests.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

/// Why ECR cannot start.
#[derive(Debug, thiserror::Error)]
pub enum EcrError {
    /// A setting is out of range.
    #[error("{key}: {message}")]
    Invalid {
        /// The setting.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The store failed to open.
    #[error(transparent)]
    Storage(#[from] fleetgate_storage::StorageError),
    /// The bus refused a subscription.
    #[error(transparent)]
    Bus(#[from] fleetgate_bus::BusError),
}

/// The ECR service as the binary runs it.
pub struct EcrService {
    config: EcrConfig,
    filters: Live<Filters>,
    storage: StorageConfig,
    store: Option<Arc<dyn ConfigStore>>,
    metrics: EcrMetrics,
}

impl EcrService {
    /// ECR on the store `storage` names (opened at [`bind`](fleetgate_service::Service::bind)).
    pub fn new(config: EcrConfig, storage: StorageConfig) -> Self {
        let filters = Live::new(config.filters.clone());
        Self { config, filters, storage, store: None, metrics: EcrMetrics::default() }
    }

    /// `ecr.filters`, which a configuration reload replaces while ECR runs.
    pub fn filters(&self) -> Live<Filters> {
        self.filters.clone()
    }

    /// ECR on `store` (tests, benchmarks).
    pub fn with_store(config: EcrConfig, store: Arc<dyn ConfigStore>) -> Self {
        Self {
            filters: Live::new(config.filters.clone()),
            config,
            storage: StorageConfig::default(),
            store: Some(store),
            metrics: EcrMetrics::default(),
        }
    }
}

impl fleetgate_service::Service for EcrService {
    fn name(&self) -> &'static str {
        "ecr"
    }

    fn bind(&mut self) -> Result<(), ServiceError> {
        if self.store.is_none() {
            let store = self.storage.open_config("ecr").map_err(|e| ServiceError::new("ecr", e))?;
            tracing::info!(kind = store.kind(), "ecr store open");
            self.store = Some(store);
        }
        Ok(())
    }

    fn register_metrics(&self, registry: &mut Registry) {
        self.metrics.register(registry);
    }

    fn start(
        mut self: Box<Self>,
        context: StartContext,
    ) -> BoxFuture<'static, Result<Running, ServiceError>> {
        Box::pin(async move {
            self.bind()?;
            let store = self.store.take().ok_or_else(|| ServiceError::new("ecr", "no store"))?;
            start(context, self.config, self.filters, store, self.metrics)
                .await
                .map_err(|e| ServiceError::new("ecr", e))
        })
    }
}

/// What the request handlers and the REST API share.
pub(crate) struct Shared {
    pub(crate) config: EcrConfig,
    /// `ecr.filters` as now configured (reloads replace it).
    pub(crate) filters: Live<Filters>,
    pub(crate) store: Arc<dyn ConfigStore>,
    pub(crate) bus: AnyBus,
    pub(crate) replica_id: String,
    pub(crate) metrics: EcrMetrics,
}

struct Status {
    routes: Arc<dyn AdminRoutes>,
}

impl ServiceStatus for Status {
    fn admin_routes(&self) -> Option<Arc<dyn AdminRoutes>> {
        Some(self.routes.clone())
    }
}

async fn start(
    context: StartContext,
    config: EcrConfig,
    filters: Live<Filters>,
    store: Arc<dyn ConfigStore>,
    metrics: EcrMetrics,
) -> Result<Running, EcrError> {
    if let Some((key, message)) = config.problems().into_iter().next() {
        return Err(EcrError::Invalid { key: format!("ecr.{key}"), message });
    }
    store.open().await?;
    let bus = context.bus;
    let requests =
        bus.subscribe(&subjects::cdtp_request(&config.instance), Some(&config.instance)).await?;
    // One replica records each confirmation.
    let applied = bus.subscribe(subjects::CONFIG_APPLIED_ANY, Some(&config.instance)).await?;
    bus.flush().await?;
    let shared = Arc::new(Shared {
        replica_id: fleetgate_bus::new_replica_id(&config.instance),
        config,
        filters,
        store,
        bus,
        metrics,
    });
    let mut shutdown = context.shutdown;
    let tasks = [
        tokio::spawn(serve_requests(shared.clone(), requests)),
        tokio::spawn(record_confirmations(shared.clone(), applied)),
    ];
    let routes: Arc<dyn AdminRoutes> = Arc::new(api::Api::new(shared));
    Ok(Running {
        status: Arc::new(Status { routes }),
        stopped: Box::pin(async move {
            fleetgate_bus::stopped(&mut shutdown).await;
            for t in tasks {
                t.abort();
            }
        }),
    })
}

/// Requests answered at once; more wait on the bus.
const MAX_IN_FLIGHT: usize = 4096;

async fn serve_requests(shared: Arc<Shared>, mut requests: Subscription) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    while let Some(msg) = requests.next().await {
        // Each request is answered on its own task (bounded): a slow store does not hold up
        // the rest.
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let shared = shared.clone();
        tokio::spawn(async move {
            shared.answer(msg).await;
            drop(permit);
        });
    }
}

async fn record_confirmations(shared: Arc<Shared>, mut applied: Subscription) {
    while let Some(msg) = applied.next().await {
        let Ok(event) = ConfigApplied::decode(&msg.payload) else {
            shared.metrics.undecodable.inc();
            tracing::debug!(subject = %msg.subject, "undecodable ConfigApplied");
            continue;
        };
        let name = event.config_name.unwrap_or(DEFAULT_NAME);
        let confirmed = StatusEvent::Confirmed {
            status_code: event.status_code,
            reason: event.reason_phrase.map(str::to_owned),
        };
        let recorded = shared
            .store
            .record(
                event.app_version_name,
                event.endpoint_id,
                name,
                event.config_id,
                confirmed,
                now_ms(),
            )
            .await;
        match recorded {
            Ok(()) => {
                shared.metrics.confirmations.inc();
            }
            Err(e) => {
                shared.metrics.storage_failures.inc();
                tracing::warn!(error = %e, "cannot record a configuration confirmation");
            }
        }
    }
}

impl Shared {
    async fn answer(&self, msg: Message) {
        let Some(reply) = msg.reply.clone() else {
            self.metrics.undecodable.inc();
            tracing::debug!("a ConfigRequest without a reply subject");
            return;
        };
        let Ok(request) = ConfigRequest::decode(&msg.payload) else {
            self.metrics.undecodable.inc();
            tracing::debug!("undecodable ConfigRequest");
            return;
        };
        if fleetgate_bus::is_expired(request.timestamp_ms, request.timeout_ms) {
            return;
        }
        let mut response = ConfigResponse {
            correlation_id: request.correlation_id,
            timestamp_ms: now_ms(),
            timeout_ms: 0,
            app_version_name: request.app_version_name,
            endpoint_id: request.endpoint_id,
            config_id: None,
            content_type: "application/json",
            content: None,
            status_code: 200,
            reason_phrase: None,
        };
        let name = request.config_name.unwrap_or(DEFAULT_NAME);
        let found;
        let mut records = Vec::new();
        let outcome = if !is_valid_config_name(name) {
            response.status_code = 400;
            response.reason_phrase = Some("configName: must match ^[a-zA-Z0-9_-]+$");
            "error"
        } else {
            match self.lookup(&request, name).await.map(|(c, r)| {
                records = r;
                c
            }) {
                Err(()) => {
                    response.status_code = 500;
                    response.reason_phrase = Some("the configuration store failed");
                    "error"
                }
                Ok(None) if request.config_id == Some("") => "unchanged",
                Ok(None) => {
                    response.config_id = Some("");
                    "none"
                }
                Ok(Some(c)) if request.config_id == Some(c.config_id.as_str()) => "unchanged",
                Ok(Some(c)) => {
                    found = c;
                    response.config_id = Some(&found.config_id);
                    response.content = Some(&found.content);
                    "config"
                }
            }
        };
        self.metrics.request(outcome);
        let payload = response.to_bytes();
        if let Err(e) = self.bus.publish(reply, None, payload).await {
            tracing::warn!(error = %e, "cannot answer a ConfigRequest");
        }
        self.record_all(request.app_version_name, request.endpoint_id, name, records).await;
    }

    /// The configuration `request` gets, and what it says, to record once it is answered: a
    /// `configId` it carries is confirmed implicitly; a configuration it is sent is dispatched.
    async fn lookup(
        &self,
        request: &ConfigRequest<'_>,
        name: &str,
    ) -> Result<(Option<StoredConfig>, Vec<(String, StatusEvent)>), ()> {
        let (app, endpoint) = (request.app_version_name, request.endpoint_id);
        let current = self.store.effective(app, endpoint, name).await.map_err(|e| {
            self.metrics.storage_failures.inc();
            tracing::warn!(error = %e, "configuration store failed");
        })?;
        let mut records = Vec::new();
        if let Some(known) = request.config_id.filter(|id| !id.is_empty()) {
            let implicit = StatusEvent::Confirmed {
                status_code: 200,
                reason: Some(IMPLICITLY_APPLIED.into()),
            };
            records.push((known.to_owned(), implicit));
        }
        if let Some(c) =
            current.as_ref().filter(|c| request.config_id != Some(c.config_id.as_str()))
        {
            records.push((c.config_id.clone(), StatusEvent::Dispatched));
        }
        Ok((current, records))
    }

    /// Records what a request said, after its answer went out: the answer does not wait for
    /// the bookkeeping's fsync.
    async fn record_all(
        &self,
        app: &str,
        endpoint: &str,
        name: &str,
        records: Vec<(String, StatusEvent)>,
    ) {
        let now = now_ms();
        for (config_id, event) in records {
            if let Err(e) = self.store.record(app, endpoint, name, &config_id, event, now).await {
                self.metrics.storage_failures.inc();
                tracing::warn!(error = %e, "cannot record a configuration status");
            }
        }
    }

    /// Broadcasts `ConfigUpdated` for `config` (an empty endpoint id: an app version default).
    pub(crate) async fn broadcast(&self, config: &StoredConfig) {
        let event = ConfigUpdated {
            correlation_id: &config.config_id,
            timestamp_ms: now_ms(),
            timeout_ms: 0,
            app_version_name: &config.key.app_version,
            endpoint_id: config.key.endpoint.as_deref().unwrap_or(""),
            config_id: &config.config_id,
            content_type: "application/json",
            content: &config.content,
            originator_replica_id: Some(&self.replica_id),
            config_name: (config.key.name != DEFAULT_NAME).then_some(config.key.name.as_str()),
        };
        let subject = Subject::from(subjects::config_updated(&self.config.instance));
        match self.bus.publish(subject, None, event.to_bytes()).await {
            Ok(()) => {
                self.metrics.updates.inc();
            }
            Err(e) => tracing::warn!(error = %e, "cannot broadcast ConfigUpdated"),
        }
    }
}
