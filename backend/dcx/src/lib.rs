//! DCX, the data collection extension.
//!
//! Takes 4/ESP `ClientData` for the 2/DCP resources (`/json`: a JSON array is a batch, any other
//! JSON value one sample; `/plain/<metric>`: a number with an optional unit), splits the batch
//! into samples and broadcasts one 13/DSTP `DataSamplesEvent` per request. When reliable
//! receivers are configured it waits for each of them to answer (or for the receiver timeout)
//! before it answers the device through `ExtensionData` (DESIGN decision 8). It answers only
//! requests that carry a request id, and errors always.
//!
//! It knows the bus and the Avro records; it knows nothing of transports or storage.

mod payload;
mod waiters;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use fleetgate_bus::{Bus, BusError, Message, Subject, Subscription, now_ms};
use fleetgate_messages::{
    ClientData, DataSamplesHeader, DataSamplesProcessed, ExtensionData, Record, subjects,
};
use fleetgate_service::{BoxFuture, Running, ServiceError, StartContext};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};

pub use payload::{SampleError, samples_of};
use waiters::Waiters;

/// DCX settings (`dcx.*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DcxConfig {
    /// Service instance name: subjects `kaa.v1.service.<instance>.esp.ClientData` (queue group
    /// `<instance>`) and `kaa.v1.events.<instance>.endpoint.data-collection...`.
    pub instance: String,
    /// This replica's id; generated when unset.
    pub replica_id: Option<String>,
    /// Service instance names of the 13/DSTP receivers that must confirm every batch before the
    /// device gets its answer.
    pub reliable_receivers: Vec<String>,
    /// How long to wait for the reliable receivers before answering 504.
    pub receiver_timeout_ms: u64,
    /// Requests processed at once by this replica (those waiting for receivers included).
    pub max_in_flight: usize,
    /// Gateway instance to answer when a `ClientData` came without a reply subject.
    pub gateway_instance: String,
}

impl Default for DcxConfig {
    fn default() -> Self {
        Self {
            instance: "dcx".into(),
            replica_id: None,
            reliable_receivers: Vec::new(),
            receiver_timeout_ms: 5000,
            max_in_flight: 1024,
            gateway_instance: "kpc".into(),
        }
    }
}

impl DcxConfig {
    /// Values out of range, as `(setting, what is wrong)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.receiver_timeout_ms == 0 {
            problems.push(("receiver_timeout_ms", "0 is too small: the minimum is 1".to_owned()));
        }
        if self.max_in_flight == 0 {
            problems.push(("max_in_flight", "0 is too small: the minimum is 1".to_owned()));
        }
        problems
    }
}

/// Why DCX could not start. A configuration or backend fault.
#[derive(Debug, thiserror::Error)]
pub enum DcxError {
    /// A name used in a subject is not a valid subject token.
    #[error("dcx.{key}: `{value}` is not a valid subject token")]
    InvalidName {
        /// The setting.
        key: &'static str,
        /// Its value.
        value: String,
    },
    /// The bus refused a subscription.
    #[error("dcx: cannot subscribe: {0}")]
    Bus(#[from] BusError),
}

/// DCX metrics (`fleetgate_dcx_*`). Cloning shares them.
#[derive(Debug, Clone, Default)]
pub struct DcxMetrics {
    requests: Counter,
    samples: Counter,
    failed: Counter,
    undecodable: Counter,
    expired: Counter,
    receiver_timeouts: Counter,
}

impl DcxMetrics {
    /// Registers the counters under `fleetgate_dcx_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("dcx");
        r.register("requests", "ClientData requests processed", self.requests.clone());
        r.register("samples", "Data samples broadcast over 13/DSTP", self.samples.clone());
        r.register("failed_requests", "Requests answered with an error", self.failed.clone());
        r.register(
            "undecodable_messages",
            "ClientData that was not valid Avro",
            self.undecodable.clone(),
        );
        r.register("expired_messages", "ClientData dropped past its timeout", self.expired.clone());
        r.register(
            "receiver_timeouts",
            "Batches a reliable receiver did not confirm in time",
            self.receiver_timeouts.clone(),
        );
    }
}

/// DCX as a service of the process: made from `dcx.*`, started on the bus.
pub struct DcxService {
    config: DcxConfig,
    metrics: DcxMetrics,
}

impl DcxService {
    /// The service for `config`.
    pub fn new(config: DcxConfig) -> Self {
        Self { config, metrics: DcxMetrics::default() }
    }
}

impl fleetgate_service::Service for DcxService {
    fn name(&self) -> &'static str {
        "dcx"
    }

    fn register_metrics(&self, registry: &mut Registry) {
        self.metrics.register(registry);
    }

    fn start(
        self: Box<Self>,
        context: StartContext,
    ) -> BoxFuture<'static, Result<Running, ServiceError>> {
        Box::pin(async move {
            let dcx = Dcx::start(context.bus, self.config, self.metrics, context.shutdown)
                .await
                .map_err(|e| ServiceError::new("dcx", e))?;
            Ok(Running::task(dcx.task))
        })
    }
}

/// A running DCX replica.
pub struct Dcx {
    /// Its replica id.
    pub replica_id: String,
    task: tokio::task::JoinHandle<()>,
}

impl Dcx {
    /// Subscribes (and waits until the bus has the subscriptions) and starts serving until
    /// `shutdown` turns true.
    pub async fn start<B: Bus>(
        bus: B,
        config: DcxConfig,
        metrics: DcxMetrics,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, DcxError> {
        for (key, value) in
            [("instance", &config.instance), ("gateway_instance", &config.gateway_instance)]
        {
            if !subjects::is_valid_token(value) {
                return Err(DcxError::InvalidName { key, value: value.clone() });
            }
        }
        let replica_id = match &config.replica_id {
            Some(id) if !subjects::is_valid_token(id) => {
                return Err(DcxError::InvalidName { key: "replica_id", value: id.clone() });
            }
            Some(id) => id.clone(),
            None => fleetgate_bus::new_replica_id(&config.instance),
        };
        let requests = bus
            .subscribe(&subjects::esp_client_data(&config.instance), Some(&config.instance))
            .await?;
        let processed_subject =
            subjects::replica(&replica_id, subjects::DSTP, subjects::DATA_SAMPLES_PROCESSED);
        let processed = bus.subscribe(&processed_subject, None).await?;
        bus.flush().await?;
        let service = Arc::new(Replica {
            events_subject: Subject::from(subjects::event(
                &config.instance,
                subjects::ENDPOINT,
                subjects::DATA_COLLECTION,
                subjects::DATA_SAMPLES_RECEIVED,
            )),
            processed_subject: Subject::from(processed_subject),
            fallback_reply: Subject::from(subjects::esp_extension_data(&config.gateway_instance)),
            waiters: Waiters::default(),
            next_id: AtomicU64::new(0),
            replica_id: replica_id.clone(),
            metrics,
            bus,
            config,
        });
        tokio::spawn(route_confirmations(service.clone(), processed));
        let task = tokio::spawn(serve(service, requests, shutdown));
        tracing::info!(replica = %replica_id, "dcx started");
        Ok(Self { replica_id, task })
    }

    /// Waits until the replica has stopped (after shutdown, with in-flight requests answered).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

struct Replica<B> {
    bus: B,
    config: DcxConfig,
    replica_id: String,
    events_subject: Subject,
    processed_subject: Subject,
    fallback_reply: Subject,
    waiters: Waiters,
    next_id: AtomicU64,
    metrics: DcxMetrics,
}

async fn serve<B: Bus>(
    service: Arc<Replica<B>>,
    mut requests: Subscription,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = service.config.max_in_flight.max(1);
    let in_flight = Arc::new(Semaphore::new(limit));
    let waits = !service.config.reliable_receivers.is_empty();
    loop {
        let msg = tokio::select! {
            m = requests.next() => match m { Some(m) => m, None => break },
            _ = fleetgate_bus::stopped(&mut shutdown) => break,
        };
        if waits {
            // Waiting for receivers takes a while: process concurrently, bounded.
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                break;
            };
            let service = service.clone();
            tokio::spawn(async move {
                service.process(msg).await;
                drop(permit);
            });
        } else {
            service.process(msg).await;
        }
    }
    // Stop taking requests, then let those in flight finish.
    drop(requests);
    let limit = u32::try_from(limit).unwrap_or(u32::MAX);
    let _ = in_flight.acquire_many(limit).await;
    tracing::info!(replica = %service.replica_id, "dcx stopped");
}

async fn route_confirmations<B: Bus>(service: Arc<Replica<B>>, mut processed: Subscription) {
    while let Some(msg) = processed.next().await {
        match DataSamplesProcessed::decode(&msg.payload) {
            Ok(p) => service.waiters.confirm(
                p.correlation_id,
                p.receiver_service_instance_name,
                p.status_code,
                p.reason_phrase,
            ),
            Err(e) => tracing::warn!(error = %e, "undecodable DataSamplesProcessed dropped"),
        }
    }
}

/// How a request ended: a status code and, for errors, a reason.
type Outcome = (i32, Option<String>);

impl<B: Bus> Replica<B> {
    async fn process(&self, msg: Message) {
        let request = match ClientData::decode(&msg.payload) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.undecodable.inc();
                tracing::warn!(error = %e, subject = %msg.subject, "undecodable ClientData dropped");
                return;
            }
        };
        if fleetgate_bus::is_expired(request.timestamp_ms, request.timeout_ms) {
            self.metrics.expired.inc();
            tracing::debug!(correlation_id = request.correlation_id, "expired ClientData dropped");
            return;
        }
        self.metrics.requests.inc();
        let (status, reason) = self.collect(&request).await;
        if status != 200 {
            self.metrics.failed.inc();
        }
        if request.request_id.is_none() && status == 200 {
            return;
        }
        let answer = ExtensionData {
            correlation_id: request.correlation_id,
            timestamp_ms: now_ms(),
            timeout_ms: 0,
            app_version_name: Some(request.app_version_name),
            extension_instance_name: Some(&self.config.instance),
            endpoint_id: request.endpoint_id,
            resource_path: request.resource_path,
            request_id: request.request_id,
            payload: None,
            status_code: status,
            reason_phrase: reason.as_deref(),
        };
        let reply = msg.reply.unwrap_or_else(|| self.fallback_reply.clone());
        if let Err(e) = self.bus.publish(reply, None, answer.to_bytes()).await {
            tracing::warn!(error = %e, correlation_id = request.correlation_id, "cannot answer the gateway");
        }
    }

    /// Broadcasts the request's samples and waits for the reliable receivers.
    async fn collect(&self, request: &ClientData<'_>) -> Outcome {
        let Some(endpoint_id) = request.endpoint_id else {
            return (400, Some("data collection needs an endpoint token".into()));
        };
        let samples = match samples_of(request.resource_path, request.payload) {
            Ok(s) => s,
            Err(e) => return (e.status(), Some(e.to_string())),
        };
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let correlation_id = format!("{}-{n:x}", self.replica_id);
        let header = DataSamplesHeader {
            correlation_id: &correlation_id,
            timestamp_ms: now_ms(),
            timeout_ms: i64::try_from(self.config.receiver_timeout_ms).unwrap_or(i64::MAX),
            app_version_name: request.app_version_name,
            endpoint_id,
            content_type: "application/json",
        };
        let mut event = BytesMut::with_capacity(header.encoded_len(&samples));
        header.encode(&samples, &mut event);
        let receivers = &self.config.reliable_receivers;
        let wait =
            (!receivers.is_empty()).then(|| self.waiters.register(&correlation_id, receivers));
        let reply = Some(self.processed_subject.clone());
        if let Err(e) = self.bus.publish(self.events_subject.clone(), reply, event.freeze()).await {
            // Only the in-process bus knows that nobody listens; NATS would time out below.
            if !matches!(e, BusError::NoResponders(_)) || wait.is_some() {
                self.waiters.forget(&correlation_id);
                return (503, Some(format!("cannot broadcast data samples: {e}")));
            }
        }
        self.metrics.samples.inc_by(samples.len() as u64);
        tracing::debug!(
            request = request.correlation_id,
            event = %correlation_id,
            samples = samples.len(),
            "data samples broadcast"
        );
        let Some(wait) = wait else { return (200, None) };
        let timeout = Duration::from_millis(self.config.receiver_timeout_ms);
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(outcome)) => outcome,
            _ => {
                self.waiters.forget(&correlation_id);
                self.metrics.receiver_timeouts.inc();
                (504, Some("a reliable data receiver did not confirm in time".into()))
            }
        }
    }
}
