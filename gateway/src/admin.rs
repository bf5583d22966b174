//! The admin HTTP server: `/livez` or `/healthz` (the process runs), `/readyz` (it takes
//! traffic: started, bus connected, every service ready, not draining) and `/metrics`
//! (OpenMetrics text of the process's one registry).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use fleetgate_bus::{AnyBus, Bus};
use fleetgate_service::ServiceStatus;
use fleetgate_transport_core::metrics::{Registry, encode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The OpenMetrics content type `/metrics` answers with.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the admin endpoints report on. Served from before the bus is reached: until
/// [`AdminState::started`], `/readyz` says the process is starting and `/metrics` is empty.
#[derive(Default)]
pub struct AdminState {
    started: OnceLock<Started>,
    /// Set on SIGTERM: not ready again.
    draining: AtomicBool,
}

/// What a started process reports on.
struct Started {
    bus: AnyBus,
    services: Vec<Arc<dyn ServiceStatus>>,
    registry: Registry,
}

impl AdminState {
    /// Every service runs on `bus`: readiness follows the bus and `services`, `/metrics`
    /// serves `registry`.
    pub fn started(&self, bus: AnyBus, services: Vec<Arc<dyn ServiceStatus>>, registry: Registry) {
        let _ = self.started.set(Started { bus, services, registry });
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
                async move { Ok::<_, Infallible>(respond(&state, &req)) }
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

fn respond(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
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
