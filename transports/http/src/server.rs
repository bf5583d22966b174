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
//! keep-alive HTTP/1.1 connection after that time. A connection accepted while fewer than a
//! tenth of `max_connections` are free gets `busy_header_read_timeout_ms` instead, and while
//! every connection is taken, the accept loop cuts those that have not sent a whole request head
//! within that time, so that slow clients cannot keep the connection limit full; a body slower than `min_body_bytes_per_sec`
//! is answered 408 (see [`crate::HttpConfig`]).

use fleetgate_live::Live;
use fleetgate_transport_core::stopped;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetgate_transport_core::metrics::{Registry, TransportMetrics};
use fleetgate_transport_core::{BindError, BoxFuture, KpHandler, Shutdown, Transport, net};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{AbortHandle, JoinSet};
use tracing::Instrument;

use fleetgate_tls::{TlsServer, Versions};

use crate::connection::{Connection, Shared};
use crate::framing::{Guarded, Tripwire};
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
            shared: Arc::new(Shared { settings, metrics, addresses: net::Admission::new() }),
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
        // Connections that have not sent a whole request head yet, oldest first.
        let mut heads: VecDeque<Head> = VecDeque::new();
        loop {
            let reap = |heads: &mut VecDeque<Head>| {
                let busy = self.shared.settings.read().busy_header_read_timeout_ms;
                let cut = Instant::now().checked_sub(Duration::from_millis(busy));
                while let Some((since, wire, task)) = heads.front() {
                    if wire.has_headed() || task.is_finished() {
                        heads.pop_front();
                    } else if cut.is_some_and(|cut| *since <= cut) {
                        // Every connection is taken and this one has not sent a request head
                        // in `busy_header_read_timeout_ms`: a slowloris, or too slow to keep.
                        task.abort();
                        self.shared.metrics.header_timeouts.inc();
                        heads.pop_front();
                    } else {
                        break;
                    }
                }
            };
            tokio::select! {
                accepted = accept(listener, &limit, &mut heads, reap) => match accepted {
                    Ok((stream, peer, permit)) => {
                        // Over a per-address limit: closed at once (reset), before a TLS
                        // handshake or a read buffer is spent on it.
                        let limits = self.shared.settings.read().connection_limits();
                        let counted = match self.shared.addresses.admit(peer.ip(), &limits, std::time::Instant::now()) {
                            Ok(counted) => counted,
                            Err(refusal) => {
                                self.shared.metrics.limited(refusal);
                                tracing::debug!(%peer, reason = refusal.reason(), "connection refused by a limit");
                                net::refuse_tcp(stream);
                                continue;
                            }
                        };
                        self.shared.metrics.connections_accepted.inc();
                        let header_timeout = {
                            let config = self.shared.settings.read();
                            let busy = limit.available_permits() < config.max_connections / 10;
                            let ms = if busy {
                                self.shared.metrics.busy_connections.inc();
                                config.busy_header_read_timeout_ms.min(config.header_read_timeout_ms)
                            } else {
                                config.header_read_timeout_ms
                            };
                            Duration::from_millis(ms)
                        };
                        let tripwire = Arc::new(Tripwire::default());
                        let conn = serve_connection(
                            handler.clone(),
                            self.shared.clone(),
                            stream,
                            peer,
                            draining.clone(),
                            Admission {
                                _permit: permit,
                                _counted: counted,
                                header_timeout,
                                tripwire: tripwire.clone(),
                            },
                            self.tls.clone(),
                        );
                        let task =
                            connections.spawn(conn.instrument(tracing::info_span!("http", %peer)));
                        // Pruned from the front as connections send heads or end.
                        while heads.front().is_some_and(|(_, w, t)| w.has_headed() || t.is_finished()) {
                            heads.pop_front();
                        }
                        heads.push_back((Instant::now(), tripwire, task));
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

/// Accepts a connection once fewer than `max_connections` are open. While every connection is
/// taken, `reap` runs every [`REAP_EVERY`] on `heads` to cut the slow ones.
async fn accept<H>(
    listener: &TcpListener,
    limit: &Arc<Semaphore>,
    heads: &mut H,
    reap: impl Fn(&mut H),
) -> std::io::Result<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let permit = loop {
        tokio::select! {
            permit = limit.clone().acquire_owned() => break permit.map_err(std::io::Error::other)?,
            () = tokio::time::sleep(REAP_EVERY) => reap(heads),
        }
    };
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

/// A connection's place under `max_connections`, the time it has for a request head, and what
/// its requests and its stream signal (a head arrived, a chunk too large).
struct Admission {
    _permit: OwnedSemaphorePermit,
    /// Its place in the per-address counts, given back when the connection ends.
    _counted: net::Admitted,
    header_timeout: Duration,
    tripwire: Arc<Tripwire>,
}

/// A connection that may not have sent a request head yet: since when, its signals, its task.
type Head = (Instant, Arc<Tripwire>, AbortHandle);

/// How often the accept loop looks for slow heads to cut while every connection is taken.
const REAP_EVERY: Duration = Duration::from_millis(100);

/// Counts an open connection for as long as its task lives, however it ends (it may be cut).
struct OpenGauge(Arc<HttpMetrics>);

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

async fn serve_connection(
    handler: Arc<dyn KpHandler>,
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
    admission: Admission,
    tls: Option<TlsServer>,
) {
    let watch = Watch { header_timeout: admission.header_timeout, tripwire: admission.tripwire };
    shared.metrics.connections_open.inc();
    let _open = OpenGauge(shared.metrics.clone());
    let _ = stream.set_nodelay(true);
    match tls {
        None => serve_plain(handler, shared, stream, peer, shutdown, watch).await,
        Some(tls) => {
            // Failures are counted and logged (at debug) by `accept`.
            if let Ok(stream) = tls.accept(stream).await {
                // HTTP/2 when ALPN chose it; no sniffing over TLS.
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                let protocol = if h2 { Preface::Http2 } else { Preface::Http1 };
                let certificate = tls.client_certificate(&stream);
                let conn = Connection::new(
                    handler,
                    shared.clone(),
                    peer,
                    certificate,
                    shutdown.clone(),
                    watch.tripwire.clone(),
                );
                serve_http(conn, shared, stream, shutdown, protocol, watch).await;
            }
        }
    }
}

/// What a connection is served with besides its stream: its head timeout, and the signals
/// shared with the accept loop and the framing scanner.
struct Watch {
    header_timeout: Duration,
    tripwire: Arc<Tripwire>,
}

/// A cleartext connection: HTTP/2 with prior knowledge or HTTP/1, told by its first bytes.
async fn serve_plain(
    handler: Arc<dyn KpHandler>,
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
    watch: Watch,
) {
    let metrics = shared.metrics.clone();
    let protocol = match tokio::time::timeout(watch.header_timeout, sniff(&stream)).await {
        Ok(Ok(Some(protocol))) => Some(protocol),
        Ok(Ok(None)) | Ok(Err(_)) => None,
        Err(_) => {
            metrics.header_timeouts.inc();
            tracing::debug!("no request within the header read timeout");
            None
        }
    };
    if let Some(protocol) = protocol {
        let conn = Connection::new(
            handler,
            shared.clone(),
            peer,
            None,
            shutdown.clone(),
            watch.tripwire.clone(),
        );
        serve_http(conn, shared, stream, shutdown, protocol, watch).await;
    }
}

/// Serves HTTP on `stream` for `conn` until the connection ends.
async fn serve_http<S>(
    conn: Arc<Connection>,
    shared: Arc<Shared>,
    stream: S,
    shutdown: watch::Receiver<bool>,
    protocol: Preface,
    watch: Watch,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let metrics = shared.metrics.clone();
    let config = shared.settings.get();
    {
        let h2 = protocol == Preface::Http2 && config.http2;
        let max_streams = config.max_in_flight_per_connection;
        let Watch { header_timeout, tripwire } = watch;
        let service = {
            let conn = conn.clone();
            hyper::service::service_fn(move |req| {
                let conn = conn.clone();
                async move { Ok::<_, Infallible>(conn.respond(req).await) }
            })
        };
        let result = if h2 {
            let io = TokioIo::new(stream);
            let http = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(max_streams)
                .serve_connection(io, service);
            drive(http, |c| c.graceful_shutdown(), &conn, shutdown).await
        } else {
            // HTTP/1 bodies may be chunked: chunk sizes are looked at as they arrive.
            let io = TokioIo::new(Guarded::new(stream, config.max_body_bytes, tripwire));
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
