//! The admin HTTP server: `/livez` or `/healthz` (the process runs), `/readyz` (it takes traffic: started,
//! bus connected, every service ready, not draining), `/metrics` (OpenMetrics text of the
//! process's one registry), and the routes services serve (REST APIs such as `/epts/api/v1`,
//! pages), behind the bearer tokens of `admin.api_tokens` when any are set.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use fleetgate_bus::{AnyBus, Bus};
use fleetgate_service::{AdminRequest, AdminRoutes, ServiceStatus};
use fleetgate_transport_core::metrics::{Registry, encode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The OpenMetrics content type `/metrics` answers with.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The largest request body a service route reads.
const MAX_BODY_BYTES: usize = 1 << 20;

/// What the admin endpoints report on. Served from before the bus is reached: until
/// [`AdminState::started`], `/readyz` says the process is starting and `/metrics` is empty.
#[derive(Default)]
pub struct AdminState {
    started: OnceLock<Started>,
    /// Set on SIGTERM: not ready again.
    draining: AtomicBool,
    /// `admin.api_tokens`.
    api_tokens: Vec<String>,
}

/// What a started process reports on.
struct Started {
    bus: AnyBus,
    services: Vec<Arc<dyn ServiceStatus>>,
    registry: Registry,
    routes: Vec<Arc<dyn AdminRoutes>>,
}

impl AdminState {
    /// A state whose service routes need one of `api_tokens` (none: no token needed).
    pub fn with_api_tokens(api_tokens: Vec<String>) -> Self {
        Self { api_tokens, ..Self::default() }
    }

    /// Every service runs on `bus`: readiness follows the bus and `services`, `/metrics`
    /// serves `registry`, and the services' routes are served.
    pub fn started(&self, bus: AnyBus, services: Vec<Arc<dyn ServiceStatus>>, registry: Registry) {
        let routes = services.iter().filter_map(|s| s.admin_routes()).collect();
        let _ = self.started.set(Started { bus, services, registry, routes });
    }

    /// The service routes that serve `path`.
    fn routes_for(&self, path: &str) -> Option<Arc<dyn AdminRoutes>> {
        let started = self.started.get()?;
        started.routes.iter().find(|r| r.prefixes().iter().any(|p| path.starts_with(p))).cloned()
    }

    /// Whether `header` (an `Authorization` value) carries one of the API tokens.
    fn authorized(&self, header: Option<&str>) -> bool {
        self.api_tokens.is_empty()
            || header.and_then(|h| h.strip_prefix("Bearer ")).is_some_and(|token| {
                self.api_tokens
                    .iter()
                    .any(|t| constant_time_eq(t.as_bytes(), token.trim().as_bytes()))
            })
    }

    /// Not ready from now on (the process drains).
    pub fn draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// `Ok` when the process takes traffic, else why not.
    fn readiness(&self) -> Result<(), String> {
        let Some(started) = self.started.get() else {
            return Err("starting (reaching the bus, starting services)".into());
        };
        if self.draining.load(Ordering::Relaxed) {
            return Err("draining".into());
        }
        if !started.bus.is_healthy() {
            return Err("the bus is unreachable or stalled".into());
        }
        started.services.iter().try_for_each(|s| s.readiness())
    }

    fn metrics(&self) -> String {
        self.started.get().map(|s| encode(&s.registry)).unwrap_or_default()
    }
}

/// Serves the admin endpoints on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = fleetgate_bus::stopped(&mut shutdown) => break,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

/// Compares without an early exit, so that timing tells nothing about a token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json_error(status: u16, reason: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "{{\"statusCode\":{status},\"reasonPhrase\":{}}}",
        serde_json::Value::String(reason.to_owned())
    );
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A request to a service's routes: token, body (bounded), then the service answers.
async fn serve_route(
    state: &AdminState,
    routes: Arc<dyn AdminRoutes>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let authorization =
        req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if !routes.is_public(&path) && !state.authorized(authorization) {
        let mut r = json_error(401, "a bearer token of admin.api_tokens is required");
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    let method = req.method().as_str().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES).collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => return json_error(413, "body: larger than 1 MiB or unreadable"),
    };
    let answer = routes.handle(AdminRequest { method, path, query, body }).await;
    let mut r = Response::new(Full::new(Bytes::from(answer.body)));
    *r.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(answer.content_type),
    );
    if let Some(allow) = answer.allow {
        r.headers_mut()
            .insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static(allow));
    }
    for (name, value) in answer.headers {
        if let Ok(value) = hyper::header::HeaderValue::from_str(&value) {
            r.headers_mut().insert(name, value);
        }
    }
    r
}

async fn respond(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(routes) = state.routes_for(req.uri().path()) {
        return serve_route(state, routes, req).await;
    }
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
        // /livez is the Kubernetes name for the same check (the process answers).
        "/livez" | "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match state.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
        "/metrics" => {
            let mut r = text(StatusCode::OK, state.metrics());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(OPENMETRICS),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /livez, /readyz or /metrics\n".into()),
    }
}

/// The address the admin server is bound to, for logs.
pub fn describe(listener: &TcpListener) -> String {
    listener.local_addr().map_or_else(|_| "?".into(), |a: SocketAddr| a.to_string())
}
