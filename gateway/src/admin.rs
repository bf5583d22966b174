//! The admin HTTP server: `/healthz` (the process runs), `/readyz` (it takes traffic: started,
//! bus connected, not draining) and `/metrics` (Prometheus text).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use fleetgate_transport_core::metrics::merge_families;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Something that appends Prometheus text to `/metrics`.
pub type MetricsSource = Box<dyn Fn(&mut String) + Send + Sync>;

/// What the admin endpoints report on.
pub struct AdminState {
    /// True once every service has started, false again while draining.
    pub ready: AtomicBool,
    /// Extra readiness condition (the bus connection).
    pub bus_connected: Box<dyn Fn() -> bool + Send + Sync>,
    /// Every component's metrics.
    pub metrics: Vec<MetricsSource>,
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
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            if !state.ready.load(Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: starting or draining\n".into())
            } else if !(state.bus_connected)() {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: bus disconnected\n".into())
            } else {
                text(StatusCode::OK, "ready\n".into())
            }
        }
        "/metrics" => {
            let mut out = String::with_capacity(8192);
            for source in &state.metrics {
                source(&mut out);
            }
            let mut r = text(StatusCode::OK, merge_families(&out));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /healthz, /readyz or /metrics\n".into()),
    }
}

/// The address the admin server is bound to, for logs.
pub fn describe(listener: &TcpListener) -> String {
    listener.local_addr().map_or_else(|_| "?".into(), |a: SocketAddr| a.to_string())
}
