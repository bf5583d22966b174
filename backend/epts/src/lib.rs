//! EPTS, endpoint time series.
//!
//! A 13/DSTP receiver: takes the `DataSamplesEvent`s DCX broadcasts (replicas share them in
//! queue group `epts.instance`), extracts data points per application (auto-extraction, named
//! series, the sample's timestamp; see [`extract`]), stores them in batches and only then
//! answers `DataSamplesProcessed` (200, or 500 when storage failed), so that with EPTS a
//! reliable receiver of DCX a device's `/status` means "stored". Stored points are broadcast
//! as 14/TSTP `TimeSeriesEvent`s, one per endpoint and series. Kaa's EPTS REST API
//! ([`api`]) and a plot page are served on the admin listener. A background sweep deletes
//! points past each application's `retention_days`.
//!
//! It knows the bus, the Avro records and the storage trait; nothing of transports.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod api;
pub mod config;
pub mod extract;
/// ISO-8601 times, shared with the other REST APIs (moved to the service crate).
pub use fleetgate_service::time;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fleetgate_bus::{AnyBus, Bus, Message, Subject, Subscription, now_ms};
use fleetgate_messages::{
    DataPoint, DataSamplesEvent, DataSamplesProcessed, Record, TimeSeriesEvent, TimeSeriesValue,
    subjects,
};
use fleetgate_service::{
    AdminRoutes, BoxFuture, Running, ServiceError, ServiceStatus, StartContext,
};
use fleetgate_storage::{Point, StorageConfig, TimeSeriesStore, Value};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot, watch};

pub use config::{AppTimeSeries, EptsConfig, TimeSeriesConfig};
use extract::{Extracted, Extractor, SkipReason};

/// The `reason` label of skipped points.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// EPTS metrics (`fleetgate_epts_*`). Cloning shares them.
#[derive(Debug, Clone, Default)]
pub struct EptsMetrics {
    events: Counter,
    stored: Counter,
    skipped: Family<ReasonLabel, Counter>,
    fallbacks: Counter,
    storage_failures: Counter,
    undecodable: Counter,
    swept: Counter,
    published: Counter,
}

impl EptsMetrics {
    /// Registers the metrics under `fleetgate_epts_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("epts");
        r.register("data_samples_events", "13/DSTP events received", self.events.clone());
        r.register("points_stored", "Data points durably stored", self.stored.clone());
        r.register(
            "points_skipped",
            "Data points (or whole samples) not stored, by reason",
            self.skipped.clone(),
        );
        r.register(
            "timestamp_fallbacks",
            "Samples whose missing or unreadable timestamp was replaced by the receipt time",
            self.fallbacks.clone(),
        );
        r.register(
            "storage_failures",
            "Batches the store refused (answered with a failure status)",
            self.storage_failures.clone(),
        );
        r.register(
            "undecodable_messages",
            "DataSamplesEvents that were not valid Avro",
            self.undecodable.clone(),
        );
        r.register(
            "points_swept",
            "Data points deleted by the retention sweep",
            self.swept.clone(),
        );
        r.register(
            "time_series_events",
            "14/TSTP TimeSeriesEvents published",
            self.published.clone(),
        );
    }

    fn skip(&self, reason: SkipReason, n: u64) {
        self.skipped.get_or_create(&ReasonLabel { reason: reason.as_str() }).inc_by(n);
    }
}

/// Why EPTS could not start. A configuration or backend fault.
#[derive(Debug, thiserror::Error)]
pub enum EptsError {
    /// A setting is invalid.
    #[error("{key}: {message}")]
    Invalid {
        /// The setting.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The store cannot be opened.
    #[error(transparent)]
    Storage(#[from] fleetgate_storage::StorageError),
    /// The bus refused a subscription.
    #[error("epts: cannot subscribe: {0}")]
    Bus(#[from] fleetgate_bus::BusError),
}

/// One application as EPTS serves it.
struct App {
    config: TimeSeriesConfig,
    extractor: Extractor,
}

/// Where the outcome of a stored batch goes.
enum Reply {
    /// A `DataSamplesProcessed` to this subject, for this correlation id.
    Bus(Subject, String),
    /// A REST request waiting for it.
    Http(oneshot::Sender<Result<(), String>>),
    /// Nobody.
    None,
}

/// Points to store, from one event or request.
struct Job {
    app_version: String,
    endpoint: String,
    received_ms: i64,
    points: Vec<Point>,
    reply: Reply,
}

/// What the service's tasks share.
struct Shared {
    config: EptsConfig,
    apps: BTreeMap<String, App>,
    /// App version → application.
    versions: HashMap<String, String>,
    store: Arc<dyn TimeSeriesStore>,
    metrics: EptsMetrics,
    jobs: mpsc::Sender<Job>,
    bus: AnyBus,
    next_id: AtomicU64,
    replica_id: String,
}

/// EPTS as a service of the process: made from `epts.*`, `storage.*` and the applications,
/// started on the bus.
pub struct EptsService {
    config: EptsConfig,
    storage: StorageConfig,
    apps: BTreeMap<String, AppTimeSeries>,
    metrics: EptsMetrics,
    store: Option<Arc<dyn TimeSeriesStore>>,
}

impl EptsService {
    /// The service for `config`, storing per `storage`, serving `apps`.
    pub fn new(
        config: EptsConfig,
        storage: StorageConfig,
        apps: BTreeMap<String, AppTimeSeries>,
    ) -> Self {
        Self { config, storage, apps, metrics: EptsMetrics::default(), store: None }
    }

    /// The same, on a store opened elsewhere (tests, benchmarks).
    pub fn with_store(
        config: EptsConfig,
        store: Arc<dyn TimeSeriesStore>,
        apps: BTreeMap<String, AppTimeSeries>,
    ) -> Self {
        let mut service = Self::new(config, StorageConfig::default(), apps);
        service.store = Some(store);
        service
    }
}

/// Checks the applications' time-series settings: `(setting, what is wrong)` with settings
/// under `applications.`.
pub fn application_problems(apps: &BTreeMap<String, AppTimeSeries>) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let mut owners: HashMap<&str, &str> = HashMap::new();
    for (name, app) in apps {
        for (key, message) in app.time_series.problems() {
            problems.push((format!("{name}.time_series.{key}"), message));
        }
        for version in &app.versions {
            if let Some(other) = owners.insert(version, name) {
                problems.push((
                    format!("{name}.versions"),
                    format!("app version `{version}` also belongs to application `{other}`"),
                ));
            }
        }
    }
    problems
}

impl fleetgate_service::Service for EptsService {
    fn name(&self) -> &'static str {
        "epts"
    }

    fn bind(&mut self) -> Result<(), ServiceError> {
        // Opened here so that a store that cannot be opened fails start-up before anything runs.
        if self.store.is_none() {
            let store =
                self.storage.open_time_series("epts").map_err(|e| ServiceError::new("epts", e))?;
            tracing::info!(kind = store.kind(), "epts store open");
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
            let store = self.store.take().ok_or_else(|| ServiceError::new("epts", "no store"))?;
            start(context, self.config, store, self.apps, self.metrics)
                .await
                .map_err(|e| ServiceError::new("epts", e))
        })
    }
}

/// A running EPTS replica's status: ready while the store takes writes.
struct Status {
    shared: Arc<Shared>,
    routes: Arc<dyn AdminRoutes>,
}

impl ServiceStatus for Status {
    fn in_flight(&self) -> usize {
        self.shared.config.queue_capacity - self.shared.jobs.capacity()
    }

    fn admin_routes(&self) -> Option<Arc<dyn AdminRoutes>> {
        Some(self.routes.clone())
    }
}

async fn start(
    context: StartContext,
    config: EptsConfig,
    store: Arc<dyn TimeSeriesStore>,
    apps: BTreeMap<String, AppTimeSeries>,
    metrics: EptsMetrics,
) -> Result<Running, EptsError> {
    if let Some((key, message)) = config.problems().into_iter().next() {
        return Err(EptsError::Invalid { key: format!("epts.{key}"), message });
    }
    if let Some((key, message)) = application_problems(&apps).into_iter().next() {
        return Err(EptsError::Invalid { key: format!("applications.{key}"), message });
    }
    store.open().await?;
    let bus = context.bus;
    let events = bus.subscribe(subjects::DATA_SAMPLES_RECEIVED_ANY, Some(&config.instance)).await?;
    bus.flush().await?;
    let (jobs_tx, jobs_rx) = mpsc::channel(config.queue_capacity.max(1));
    let mut versions = HashMap::new();
    let apps = apps
        .into_iter()
        .map(|(name, app)| {
            for v in &app.versions {
                versions.insert(v.clone(), name.clone());
            }
            let extractor = Extractor::new(&app.time_series);
            (name, App { config: app.time_series, extractor })
        })
        .collect();
    let shared = Arc::new(Shared {
        replica_id: fleetgate_bus::new_replica_id(&config.instance),
        config,
        apps,
        versions,
        store,
        metrics,
        jobs: jobs_tx,
        bus,
        next_id: AtomicU64::new(0),
    });
    let writer = tokio::spawn(write_batches(shared.clone(), jobs_rx, context.shutdown.clone()));
    let reader = tokio::spawn(read_events(shared.clone(), events, context.shutdown.clone()));
    tokio::spawn(sweep(shared.clone(), context.shutdown));
    tracing::info!(replica = %shared.replica_id, "epts started");
    let routes: Arc<dyn AdminRoutes> = Arc::new(api::Api::new(shared.clone()));
    Ok(Running {
        status: Arc::new(Status { shared, routes }),
        stopped: Box::pin(async move {
            let _ = reader.await;
            // The writer stores what is queued, then ends.
            let _ = writer.await;
        }),
    })
}

/// Reads 13/DSTP events, extracts their points and queues them for the writer.
async fn read_events(
    shared: Arc<Shared>,
    mut events: Subscription,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let msg = tokio::select! {
            m = events.next() => match m { Some(m) => m, None => break },
            _ = fleetgate_bus::stopped(&mut shutdown) => break,
        };
        if let Some(job) = shared.prepare(&msg).await
            && shared.jobs.send(job).await.is_err()
        {
            break;
        }
    }
    tracing::info!(replica = %shared.replica_id, "epts stopped reading events");
}

impl Shared {
    /// The job of one event, or `None` when it was answered (or dropped) here.
    async fn prepare(&self, msg: &Message) -> Option<Job> {
        let received_ms = now_ms();
        let event = match DataSamplesEvent::decode(&msg.payload) {
            Ok(e) => e,
            Err(e) => {
                self.metrics.undecodable.inc();
                tracing::warn!(error = %e, subject = %msg.subject, "undecodable DataSamplesEvent");
                if let (Some(reply), Some(id)) =
                    (&msg.reply, fleetgate_messages::correlation_id(&msg.payload))
                {
                    self.answer(reply.clone(), id, 400, Some(&format!("undecodable event: {e}")))
                        .await;
                }
                return None;
            }
        };
        self.metrics.events.inc();
        let reply = match &msg.reply {
            Some(r) => Reply::Bus(r.clone(), event.correlation_id.to_owned()),
            None => Reply::None,
        };
        let app_name = self.versions.get(event.app_version_name);
        let Some((app_name, app)) = app_name.and_then(|n| self.apps.get(n).map(|a| (n, a))) else {
            // No time series are configured for it: nothing to store, which is no failure.
            self.metrics.skip(SkipReason::UnknownAppVersion, event.data_samples.len() as u64);
            if let Reply::Bus(subject, id) = reply {
                self.answer(subject, &id, 200, None).await;
            }
            return None;
        };
        let json =
            event.content_type.is_empty() || event.content_type.starts_with("application/json");
        let mut extracted: Vec<Extracted> = Vec::new();
        for sample in &event.data_samples {
            if !json {
                self.metrics.skip(SkipReason::NotJson, 1);
                continue;
            }
            let report = app.extractor.extract(sample, received_ms, &mut extracted);
            for reason in report.skipped {
                self.metrics.skip(reason, 1);
            }
            if report.fell_back {
                self.metrics.fallbacks.inc();
            }
        }
        let points = extracted
            .into_iter()
            .map(|e| Point {
                app: app_name.clone(),
                series: e.series,
                endpoint: event.endpoint_id.to_owned(),
                timestamp_ms: e.timestamp_ms,
                values: e.values,
            })
            .collect();
        Some(Job {
            app_version: event.app_version_name.to_owned(),
            endpoint: event.endpoint_id.to_owned(),
            received_ms,
            points,
            reply,
        })
    }

    async fn answer(
        &self,
        subject: Subject,
        correlation_id: &str,
        status: i32,
        reason: Option<&str>,
    ) {
        let processed = DataSamplesProcessed {
            correlation_id,
            timestamp_ms: now_ms(),
            timeout_ms: 0,
            receiver_service_instance_name: &self.config.instance,
            status_code: status,
            reason_phrase: reason,
        };
        if let Err(e) = self.bus.publish(subject, None, processed.to_bytes()).await {
            tracing::warn!(error = %e, correlation_id, "cannot answer DataSamplesEvent");
        }
    }

    /// Broadcasts the points of one job on 14/TSTP, one event per series.
    async fn publish_points(&self, job: &Job, stored: &[Point]) {
        let mut by_series: BTreeMap<&str, Vec<&Point>> = BTreeMap::new();
        for p in stored {
            by_series.entry(&p.series).or_default().push(p);
        }
        for (series, points) in by_series {
            let n = self.next_id.fetch_add(1, Ordering::Relaxed);
            let correlation_id = format!("{}-{n:x}", self.replica_id);
            let event = TimeSeriesEvent {
                correlation_id: &correlation_id,
                timestamp_ms: now_ms(),
                timeout_ms: 0,
                app_version_name: &job.app_version,
                endpoint_id: &job.endpoint,
                time_series_name: series,
                data_points: points
                    .iter()
                    .map(|p| DataPoint {
                        ingestion_timestamp_ms: job.received_ms,
                        timestamp_ms: p.timestamp_ms,
                        values: p.values.iter().map(|(k, v)| (k.as_str(), tstp_value(v))).collect(),
                    })
                    .collect(),
            };
            let subject = Subject::from(subjects::tstp_data_points(&self.config.instance, series));
            match self.bus.publish(subject, None, event.to_bytes()).await {
                Ok(()) | Err(fleetgate_bus::BusError::NoResponders(_)) => {
                    self.metrics.published.inc();
                }
                Err(e) => tracing::warn!(error = %e, series, "cannot publish TimeSeriesEvent"),
            }
        }
    }
}

fn tstp_value(v: &Value) -> TimeSeriesValue<'_> {
    match v {
        Value::Null => TimeSeriesValue::Null,
        Value::Bool(b) => TimeSeriesValue::Boolean(*b),
        Value::Long(l) => TimeSeriesValue::Long(*l),
        Value::Double(d) => TimeSeriesValue::Double(*d),
        Value::String(s) => TimeSeriesValue::String(s),
    }
}

/// Stores queued jobs in batches (one durable write for every job waiting, up to
/// `max_batch_points`), then answers each and broadcasts its points.
/// After the shutdown signal it stores what is queued (no new jobs are taken) and ends.
async fn write_batches(
    shared: Arc<Shared>,
    mut jobs: mpsc::Receiver<Job>,
    mut shutdown: watch::Receiver<bool>,
) {
    let max = shared.config.max_batch_points.max(1);
    let mut closed = false;
    loop {
        let first = tokio::select! {
            biased;
            job = jobs.recv() => match job { Some(j) => j, None => break },
            _ = fleetgate_bus::stopped(&mut shutdown), if !closed => {
                jobs.close();
                closed = true;
                continue;
            }
        };
        let mut count = first.points.len();
        let mut batch = vec![first];
        while count < max {
            match jobs.try_recv() {
                Ok(job) => {
                    count += job.points.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        // The jobs' points move into one batch; each job remembers its range of it.
        let mut points = Vec::with_capacity(count);
        let mut ranges = Vec::with_capacity(batch.len());
        for job in &mut batch {
            let start = points.len();
            points.append(&mut job.points);
            ranges.push(start..points.len());
        }
        let points = Arc::new(points);
        let outcome = match points.is_empty() {
            true => Ok(()),
            false => shared.store.write(points.clone()).await,
        };
        match &outcome {
            Ok(()) => {
                shared.metrics.stored.inc_by(count as u64);
            }
            Err(e) => {
                shared.metrics.storage_failures.inc();
                tracing::error!(error = %e, points = count, "cannot store data points");
            }
        }
        for (job, range) in batch.into_iter().zip(ranges) {
            let result =
                outcome.as_ref().map(|_| ()).map_err(|e| format!("cannot store data points: {e}"));
            if result.is_ok() && shared.config.emit_events && !range.is_empty() {
                shared.publish_points(&job, &points[range]).await;
            }
            match job.reply {
                Reply::Bus(subject, id) => match &result {
                    Ok(()) => shared.answer(subject, &id, 200, None).await,
                    Err(reason) => shared.answer(subject, &id, 500, Some(reason)).await,
                },
                Reply::Http(tx) => {
                    let _ = tx.send(result);
                }
                Reply::None => {}
            }
        }
    }
}

/// Deletes points past each application's retention, every `retention_sweep_interval_ms`.
async fn sweep(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let interval = Duration::from_millis(shared.config.retention_sweep_interval_ms.max(1));
    loop {
        for (name, app) in &shared.apps {
            let days = i64::from(app.config.retention_days);
            if days == 0 {
                continue;
            }
            let cutoff = now_ms().saturating_sub(days * 86_400_000);
            match shared.store.sweep(name, cutoff).await {
                Ok(n) => {
                    shared.metrics.swept.inc_by(n);
                    if n > 0 {
                        tracing::info!(app = %name, points = n, "retention sweep");
                    }
                }
                Err(e) => tracing::warn!(error = %e, app = %name, "retention sweep failed"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = fleetgate_bus::stopped(&mut shutdown) => return,
        }
    }
}
