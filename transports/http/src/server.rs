//! The tokio glue: a TCP listener and one task per connection, serving HTTP/1.1 or HTTP/2 with
//! hyper and feeding 1/KP requests to a [`KpHandler`].
//!
//! # Requests
//!
//! `POST` or `PUT /kp1/<appver>/<ext>/<token>/<path>[/<request id>]` with the payload as the
//! body. Every request is answered, with or without a request id (the gateway is asked for an
//! answer either way): 200 with the extension's payload (`application/json` when it is JSON,
//! else `application/octet-stream`), 204 when the payload is empty, or the error's status code
//! (DESIGN decision 3) with the 1/KP error body. A path that is not a 1/KP request path is 404,
//! any other method 405, a body over `max_body_bytes` 413.
//!
//! # Sessions and credentials
//!
//! A connection opens a gateway session at its first request, with what its `Authorization`
//! header presents: `Basic base64(user:password)` gives a user name and a password, `Bearer
//! <token>` no user name and the token as the password, no header neither. The session serves
//! every later request with the same header and is closed when the connection ends. A request
//! with different credentials opens another session on the same connection (up to four). A
//! refused session (401 bad credentials, 503 authentication unavailable) answers the request
//! with that status and is tried again at the next request.
//!
//! # Long poll
//!
//! `GET /kp1/<appver>/<ext>/<token>/<path>?observe=true&timeout_ms=N` subscribes the session to
//! `kp1/<appver>/<ext>/<token>/<path>/#` and holds the request until the next push whose path
//! is exactly `<path>` (200 with its payload, or its error status and body) or until N ms
//! (at most `long_poll_max_ms`, which is also the default) have passed (204). The subscription
//! makes the session a user of the token, so a long poll may be the connection's first request
//! (the gateway announces the endpoint connected, and CMX pushes a configuration the device has
//! not confirmed). Pushes that arrive while no long poll waits are not kept: a client polls
//! again at once to miss as few as possible.
//!
//! # Protocols and timeouts
//!
//! HTTP/1.1 (keep-alive) and HTTP/2 over cleartext with prior knowledge (h2c), told apart by
//! the HTTP/2 preface. A client that does not send its first bytes, or later a request's
//! headers, within `header_read_timeout_ms` is disconnected (slowloris); so is an idle
//! keep-alive HTTP/1.1 connection after that time.

use fleetgate_live::Live;
use fleetgate_transport_core::stopped;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fleetgate_transport_core::metrics::{Registry, TransportMetrics};
use fleetgate_transport_core::{BindError, BoxFuture, KpHandler, Shutdown, Transport, net};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use fleetgate_tls::{TlsServer, Versions};

use crate::connection::{Connection, Shared};
use crate::metrics::NAME;
use crate::wire::{Preface, preface};
use crate::{HttpConfig, HttpMetrics};

/// After the stop signal, how long connections still have to write what was due.
const STOP_GRACE: Duration = Duration::from_millis(500);

/// The HTTP transport over TCP.
pub struct HttpTransport {
    listener: Option<TcpListener>,
    shared: Arc<Shared>,
    /// HTTPS: the server configuration, loaded at bind.
    tls: Option<TlsServer>,
    transport_metrics: TransportMetrics,
}

impl HttpTransport {
    /// The transport for `config`, reporting into `metrics`; [`Transport::bind`] opens its
    /// listener.
    pub fn new(config: HttpConfig, metrics: &TransportMetrics) -> Self {
        let transport_metrics = metrics.clone();
        let metrics = Arc::new(HttpMetrics::new(&transport_metrics));
        let settings = Live::new(config);
        Self {
            listener: None,
            shared: Arc::new(Shared { settings, metrics }),
            tls: None,
            transport_metrics,
        }
    }

    /// Its settings, for configuration reloads: body size, timeouts and per-connection limits
    /// apply to the next request.
    pub fn settings(&self) -> Live<HttpConfig> {
        self.shared.settings.clone()
    }

    /// The transport's metrics.
    pub fn metrics(&self) -> Arc<HttpMetrics> {
        self.shared.metrics.clone()
    }
}

impl Transport for HttpTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn config_section(&self) -> &'static str {
        "transports.http"
    }

    fn bind(&mut self) -> Result<(), BindError> {
        let config = self.shared.settings.get();
        if config.tls_enabled {
            // h2 first: clients that speak it prefer it; HTTP/1.1 for the rest.
            let mut alpn = vec![b"http/1.1".to_vec()];
            if config.http2 {
                alpn.insert(0, b"h2".to_vec());
            }
            let tls = TlsServer::load(
                &config.tls,
                alpn,
                Versions::Tls12And13,
                NAME,
                &self.transport_metrics,
            )
            .map_err(|e| BindError {
                setting: "transports.http.tls".to_owned(),
                addr: config.listen,
                source: std::io::Error::other(e.to_string()),
            })?;
            self.tls = Some(tls);
        }
        let listener = net::bind_tcp(config.listen, config.reuse_port)
            .map_err(|e| BindError::listen(self.config_section(), config.listen, e))?;
        self.listener = Some(listener);
        Ok(())
    }

    fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listener.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    fn register_metrics(&self, registry: &mut Registry) {
        self.shared.metrics.register(registry);
    }

    fn serve(
        self: Box<Self>,
        handler: Arc<dyn KpHandler>,
        shutdown: Shutdown,
    ) -> BoxFuture<'static, ()> {
        Box::pin(self.accept_loop(handler, shutdown))
    }
}

impl HttpTransport {
    async fn accept_loop(self: Box<Self>, handler: Arc<dyn KpHandler>, shutdown: Shutdown) {
        let Shutdown { drain: mut draining, mut stop } = shutdown;
        let Some(listener) = &self.listener else {
            tracing::error!("bug: the HTTP transport was served before it was bound");
            return;
        };
        if let Some(tls) = &self.tls {
            tokio::spawn(tls.clone().watch_files(stop.clone()));
        }
        let limit = Arc::new(Semaphore::new(self.shared.settings.get().max_connections.max(1)));
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = accept(listener, &limit) => match accepted {
                    Ok((stream, peer, permit)) => {
                        self.shared.metrics.connections_accepted.inc();
                        let conn = serve_connection(
                            handler.clone(),
                            self.shared.clone(),
                            stream,
                            peer,
                            draining.clone(),
                            permit,
                            self.tls.clone(),
                        );
                        connections.spawn(conn.instrument(tracing::info_span!("http", %peer)));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                () = stopped(&mut draining) => break,
            }
            while connections.try_join_next().is_some() {}
        }
        // Connections see the same drain signal: they take no new requests, finish those in
        // flight, end their long polls, and close. What is still open a moment after the stop
        // (time to write the answers that were due) is cut.
        let all_closed = async { while connections.join_next().await.is_some() {} };
        let cut = async {
            stopped(&mut stop).await;
            tokio::time::sleep(STOP_GRACE).await;
        };
        tokio::select! {
            () = all_closed => {}
            () = cut => {}
        }
    }
}

/// Accepts a connection once fewer than `max_connections` are open.
async fn accept(
    listener: &TcpListener,
    limit: &Arc<Semaphore>,
) -> std::io::Result<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let permit = limit.clone().acquire_owned().await.map_err(std::io::Error::other)?;
    let (stream, peer) = listener.accept().await?;
    Ok((stream, peer, permit))
}

/// Waits for enough of the first bytes to tell HTTP/2 (its preface) from HTTP/1. `None` when
/// the client closed first.
async fn sniff(stream: &TcpStream) -> std::io::Result<Option<Preface>> {
    let mut first = [0u8; 24];
    loop {
        let n = stream.peek(&mut first).await?;
        if n == 0 {
            return Ok(None);
        }
        match preface(&first[..n]) {
            Preface::NeedMore => {
                // Part of "PRI * HTTP/2.0...": peek returns at once while data is buffered, so
                // wait a little for the rest (an h2 client sends all 24 bytes in one segment).
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            decided => return Ok(Some(decided)),
        }
    }
}

async fn serve_connection(
    handler: Arc<dyn KpHandler>,
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
    tls: Option<TlsServer>,
) {
    let metrics = shared.metrics.clone();
    metrics.connections_open.inc();
    let _ = stream.set_nodelay(true);
    match tls {
        None => serve_plain(handler, shared, stream, peer, shutdown).await,
        Some(tls) => {
            // Failures are counted and logged (at debug) by `accept`.
            if let Ok(stream) = tls.accept(stream).await {
                // HTTP/2 when ALPN chose it; no sniffing over TLS.
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                let protocol = if h2 { Preface::Http2 } else { Preface::Http1 };
                let certificate = tls.client_certificate(&stream);
                let conn =
                    Connection::new(handler, shared.clone(), peer, certificate, shutdown.clone());
                serve_http(conn, shared, stream, shutdown, protocol).await;
            }
        }
    }
    metrics.connections_open.dec();
}

/// A cleartext connection: HTTP/2 with prior knowledge or HTTP/1, told by its first bytes.
async fn serve_plain(
    handler: Arc<dyn KpHandler>,
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let metrics = shared.metrics.clone();
    let header_timeout = Duration::from_millis(shared.settings.read().header_read_timeout_ms);
    let protocol = match tokio::time::timeout(header_timeout, sniff(&stream)).await {
        Ok(Ok(Some(protocol))) => Some(protocol),
        Ok(Ok(None)) | Ok(Err(_)) => None,
        Err(_) => {
            metrics.header_timeouts.inc();
            tracing::debug!("no request within the header read timeout");
            None
        }
    };
    if let Some(protocol) = protocol {
        let conn = Connection::new(handler, shared.clone(), peer, None, shutdown.clone());
        serve_http(conn, shared, stream, shutdown, protocol).await;
    }
}

/// Serves HTTP on `stream` for `conn` until the connection ends.
async fn serve_http<S>(
    conn: Arc<Connection>,
    shared: Arc<Shared>,
    stream: S,
    shutdown: watch::Receiver<bool>,
    protocol: Preface,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let metrics = shared.metrics.clone();
    let config = shared.settings.get();
    let header_timeout = Duration::from_millis(config.header_read_timeout_ms);
    {
        let h2 = protocol == Preface::Http2 && config.http2;
        let max_streams = config.max_in_flight_per_connection;
        let service = {
            let conn = conn.clone();
            hyper::service::service_fn(move |req| {
                let conn = conn.clone();
                async move { Ok::<_, Infallible>(conn.respond(req).await) }
            })
        };
        let io = TokioIo::new(stream);
        let result = if h2 {
            let http = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(max_streams)
                .serve_connection(io, service);
            drive(http, |c| c.graceful_shutdown(), &conn, shutdown).await
        } else {
            let http = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(io, service);
            drive(http, |c| c.graceful_shutdown(), &conn, shutdown).await
        };
        if let Err(e) = result {
            if e.is_timeout() {
                metrics.header_timeouts.inc();
            }
            tracing::debug!(error = %e, h2, "connection ended");
        }
        conn.close();
    }
}

/// Runs a hyper connection and, beside it, routes the gateway's responses from the outbox to
/// the requests waiting on this connection. On shutdown, asks the connection to finish
/// gracefully.
async fn drive<C>(
    http: C,
    graceful: impl Fn(Pin<&mut C>),
    conn: &Connection,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(http);
    let stop = stopped(&mut shutdown);
    tokio::pin!(stop);
    let mut stopping = false;
    loop {
        tokio::select! {
            biased;
            () = std::future::poll_fn(|cx| conn.poll_responses(cx)) => {}
            result = http.as_mut() => return result,
            () = &mut stop, if !stopping => {
                stopping = true;
                graceful(http.as_mut());
            }
        }
    }
}
