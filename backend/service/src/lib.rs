//! The service plug point: one trait, [`Service`], for everything a fleetgate process runs on
//! the bus (the communication service with its transports, DCX, the auth provider, and the
//! extensions to come), so that the binary can list them in one registry, run all of them in
//! one process (`fleetgate up`) or one of them alone (`fleetgate <name>`), and report their
//! readiness and metrics the same way.
//!
//! A service's life: made from its configuration section (by the binary's registry), then
//! [`Service::bind`] (sockets, so a taken port fails start-up before anything runs), then
//! [`Service::register_metrics`], then [`Service::start`] on the bus, which returns once the
//! service is subscribed and answers; the returned [`Running`] reports readiness and work in
//! flight while it runs, and completes after the shutdown signal once the service has stopped.
//!
//! A service may also serve HTTP routes on the admin listener ([`AdminRoutes`], e.g. a REST
//! API), reported through its [`ServiceStatus`].
//!
//! Helpers the REST APIs share: [`percent_decode`] and ISO-8601 times ([`time`]).
//!
//! This crate knows the bus and nothing of transports, storage or any protocol.

pub mod time;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use fleetgate_bus::AnyBus;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

/// A boxed, sendable future: what the object-safe [`Service`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a service could not start. Its source says whose fault it is (a setting, the bus, a
/// port) and is kept, not flattened into a string.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct ServiceError {
    /// The service that failed.
    pub service: &'static str,
    /// What went wrong.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl ServiceError {
    /// `service` failed with `source`.
    pub fn new(
        service: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self { service, source: source.into() }
    }
}

/// What the process gives a service when it starts.
pub struct StartContext {
    /// The bus (in-process or NATS).
    pub bus: AnyBus,
    /// Turns true when the service must stop.
    pub shutdown: watch::Receiver<bool>,
}

/// A service as the binary runs it. Implementations live in the services' own crates; the
/// binary's registry makes them from configuration.
pub trait Service: Send {
    /// The service's name: its `fleetgate <name>` command, and its area in logs.
    fn name(&self) -> &'static str;

    /// Opens whatever listens (device transports). Must be called within a tokio runtime.
    fn bind(&mut self) -> Result<(), ServiceError> {
        Ok(())
    }

    /// Registers the service's metrics in the process registry (prefixed `fleetgate`).
    fn register_metrics(&self, registry: &mut Registry) {
        let _ = registry;
    }

    /// Subscribes on the bus and starts serving; resolves once the bus has the subscriptions.
    fn start(
        self: Box<Self>,
        context: StartContext,
    ) -> BoxFuture<'static, Result<Running, ServiceError>>;
}

/// What a running service reports while it runs.
pub trait ServiceStatus: Send + Sync {
    /// `Ok` while the service can do its work; otherwise why not (for `/readyz`).
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }

    /// Stop taking new work (SIGTERM): what was taken is finished, nothing new is accepted.
    /// The shutdown signal follows once [`ServiceStatus::in_flight`] is 0 or the drain
    /// timeout has passed.
    fn drain(&self) {}

    /// Work accepted and not finished yet: a graceful stop waits (bounded) until it is 0
    /// before the shutdown signal goes out.
    fn in_flight(&self) -> usize {
        0
    }

    /// The REST API (or pages) the service serves on the admin listener, if any.
    fn admin_routes(&self) -> Option<Arc<dyn AdminRoutes>> {
        None
    }
}

/// An HTTP request to a service's routes on the admin listener. The admin server has read
/// the body (bounded) and checked the bearer token already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminRequest {
    /// `GET`, `POST`, `PUT`, ...
    pub method: String,
    /// The path, percent-encoded as received, e.g. `/epts/api/v1/time-series/config`.
    pub path: String,
    /// The query string without `?` (empty when none).
    pub query: String,
    /// The body.
    pub body: Vec<u8>,
}

/// A service's answer to an [`AdminRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminResponse {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
    /// For 405: the methods the resource takes (the `Allow` header).
    pub allow: Option<&'static str>,
    /// Other headers, e.g. `ETag`.
    pub headers: Vec<(&'static str, String)>,
}

impl AdminResponse {
    /// A JSON answer.
    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Self { status, content_type: "application/json", body, allow: None, headers: Vec::new() }
    }
}

/// Decodes the percent-encoding of a path segment or (with `plus_is_space`) of a query
/// component; `None` for a bad escape or bytes that are not UTF-8.
pub fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Routes a service serves on the admin listener (its REST API, its pages).
pub trait AdminRoutes: Send + Sync {
    /// Path prefixes it serves, e.g. `/epts/`.
    fn prefixes(&self) -> &[&'static str];

    /// Whether `path` is served without a bearer token even when `admin.api_tokens` is set
    /// (an OpenAPI document, a page whose script asks for the token).
    fn is_public(&self, path: &str) -> bool {
        let _ = path;
        false
    }

    /// Answers a request to one of its prefixes.
    fn handle(&self, request: AdminRequest) -> BoxFuture<'static, AdminResponse>;
}

/// A service with nothing to report but that it runs.
#[derive(Debug, Default, Clone, Copy)]
pub struct AlwaysReady;

impl ServiceStatus for AlwaysReady {}

/// A started service.
pub struct Running {
    /// Its readiness and work in flight.
    pub status: Arc<dyn ServiceStatus>,
    /// Resolves once the service has stopped (after the shutdown signal, having finished what
    /// it could).
    pub stopped: BoxFuture<'static, ()>,
}

impl Running {
    /// A service that reports nothing but runs until `task` ends.
    pub fn task(task: tokio::task::JoinHandle<()>) -> Self {
        Self {
            status: Arc::new(AlwaysReady),
            stopped: Box::pin(async move {
                let _ = task.await;
            }),
        }
    }
}
