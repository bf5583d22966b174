//! HTTP POST throughput through the transport against a bare hyper handler, same run, same
//! client, alternating A B A B.
//!
//! A: [`HttpTransport`] in front of a stand-in gateway that answers every request at once with
//! an empty payload (so the transport answers 204). B: a bare hyper HTTP/1.1 handler that
//! reads the body and answers 204. The servers run on a one-thread tokio runtime, the client
//! on another: `CONNS` keep-alive HTTP/1.1 connections, each sending
//! `POST /kp1/demo-v1/dcx/tok-1/json` with a 2/DCP body as fast as answers come back (closed
//! loop). Prints requests per second of every round and the median of the per-pair ratios.
//!
//! `cargo bench -p fleetgate-transport-http --bench throughput`
//! (environment: `ROUNDS` pairs, default 5; `SECS` per round, default 2; `CONNS`, default 32;
//! `ONLY=transport` or `ONLY=bare` loads one side only, for profiling; `H2=1` speaks HTTP/2
//! with prior knowledge instead, to both servers)

#![allow(missing_docs, clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fleetgate_transport_core::metrics::TransportMetrics;
use fleetgate_transport_core::{
    BoxFuture, ClientCredentials, ClientIdentity, KpError, KpHandler, KpOutcome, KpRequest,
    KpResponse, Outbox, SessionId, Transport,
};
use fleetgate_transport_http::{HttpConfig, HttpTransport};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

/// Answers every request at once with an empty success.
#[derive(Default)]
struct InstantGateway {
    next: AtomicU64,
    sessions: RwLock<HashMap<SessionId, Outbox>>,
}

impl KpHandler for InstantGateway {
    fn open_session<'a>(
        &'a self,
        _credentials: ClientCredentials<'a>,
        outbox: Outbox,
    ) -> BoxFuture<'a, Result<ClientIdentity, KpError>> {
        let session = SessionId(self.next.fetch_add(1, Ordering::Relaxed));
        if let Ok(mut sessions) = self.sessions.write() {
            sessions.insert(session, outbox);
        }
        Box::pin(std::future::ready(Ok(ClientIdentity { session, client_id: None })))
    }

    fn handle(&self, session: SessionId, request: KpRequest) -> BoxFuture<'_, Result<(), KpError>> {
        let response = KpResponse {
            base: request.topic.base(),
            request_id: request.topic.request_id(),
            tag: request.tag,
            outcome: KpOutcome::Success(Bytes::new()),
        };
        if let Ok(sessions) = self.sessions.read()
            && let Some(outbox) = sessions.get(&session)
        {
            let _ = outbox.try_send(response);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn subscribe<'a>(
        &'a self,
        _: SessionId,
        _: &'a str,
        _: u64,
    ) -> BoxFuture<'a, Result<(), KpError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn unsubscribe(&self, _: SessionId, _: &str) -> bool {
        false
    }

    fn close_session(&self, session: SessionId) {
        if let Ok(mut sessions) = self.sessions.write() {
            sessions.remove(&session);
        }
    }
}

async fn bare_hyper(listener: TcpListener, h2: bool) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async {
                let _ = req.into_body().collect().await;
                let mut response = Response::new(Full::new(Bytes::new()));
                *response.status_mut() = StatusCode::NO_CONTENT;
                Ok::<_, Infallible>(response)
            });
            let io = TokioIo::new(stream);
            if h2 {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .serve_connection(io, service)
                    .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(io, service)
                    .await;
            }
        });
    }
}

/// One client connection's way of sending requests.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn connect(addr: SocketAddr, h2: bool) -> Option<Self> {
        let stream = TcpStream::connect(addr).await.ok()?;
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        if h2 {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.ok()?;
            tokio::spawn(conn);
            Some(Sender::H2(sender))
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await.ok()?;
            tokio::spawn(conn);
            Some(Sender::H1(sender))
        }
    }

    /// Sends one request; whether it was answered 204.
    async fn send(&mut self, request: Request<Full<Bytes>>) -> bool {
        let response = match self {
            Sender::H1(s) => match s.ready().await {
                Ok(()) => s.send_request(request).await,
                Err(_) => return false,
            },
            Sender::H2(s) => match s.ready().await {
                Ok(()) => s.send_request(request).await,
                Err(_) => return false,
            },
        };
        match response {
            Ok(response) if response.status() == StatusCode::NO_CONTENT => {
                response.into_body().collect().await.is_ok()
            }
            _ => false,
        }
    }
}

/// Requests answered within `secs` over `conns` connections.
async fn load(addr: SocketAddr, conns: usize, secs: f64, h2: bool) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (stop, done) = (stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let Some(mut sender) = Sender::connect(addr, h2).await else { return };
            let body = Bytes::from_static(br#"[{"temperature":21.5,"humidity":40}]"#);
            while !stop.load(Ordering::Relaxed) {
                // HTTP/1.1 in origin form with Host, HTTP/2 with :authority.
                let (uri, host) = match h2 {
                    true => ("http://bench/kp1/demo-v1/dcx/tok-1/json", None),
                    false => ("/kp1/demo-v1/dcx/tok-1/json", Some("bench")),
                };
                let mut request = Request::post(uri);
                if let Some(host) = host {
                    request = request.header("host", host);
                }
                let Ok(request) = request
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))
                else {
                    return;
                };
                if !sender.send(request).await {
                    return;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Warm-up: connections open (and, for A, sessions too).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start_count = done.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let count = done.load(Ordering::Relaxed) - start_count;
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    count as f64 / elapsed
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn main() {
    let rounds: usize = env("ROUNDS", 5);
    let secs: f64 = env("SECS", 2.0);
    let conns: usize = env("CONNS", 32);
    let h2 = env("H2", 0) == 1;

    let servers = runtime("server");
    let (transport_addr, bare_addr) = servers.block_on(async {
        // No per-address limits: every connection of the bench comes from one address.
        let config = HttpConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            max_connections_per_address: 0,
            max_new_connections_per_address_per_sec: 0,
            ..Default::default()
        };
        let mut transport = HttpTransport::new(config, &TransportMetrics::default());
        transport.bind().expect("bind the transport");
        let transport_addr = transport.local_addrs()[0];
        let (stop, shutdown) = fleetgate_transport_core::Shutdown::channel();
        // Served until the process ends.
        std::mem::forget(stop);
        tokio::spawn(Box::new(transport).serve(Arc::new(InstantGateway::default()), shutdown));
        let bare = TcpListener::bind("127.0.0.1:0").await.expect("bind the bare server");
        let bare_addr = bare.local_addr().expect("addr");
        tokio::spawn(bare_hyper(bare, h2));
        (transport_addr, bare_addr)
    });

    let client = runtime("client");
    let protocol = if h2 { "HTTP/2 (h2c)" } else { "HTTP/1.1" };
    println!("{protocol} POST, {conns} connections, {secs} s per round, {rounds} pairs");
    let only = std::env::var("ONLY").unwrap_or_default();
    if !only.is_empty() {
        let addr = if only == "bare" { bare_addr } else { transport_addr };
        for round in 1..=rounds {
            let rate = client.block_on(load(addr, conns, secs, h2));
            println!("round {round}: {only} {rate:>9.0} req/s");
        }
        return;
    }
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let a = client.block_on(load(transport_addr, conns, secs, h2));
        let b = client.block_on(load(bare_addr, conns, secs, h2));
        let ratio = a / b;
        println!(
            "round {round}: transport {a:>9.0} req/s   bare hyper {b:>9.0} req/s   ratio {ratio:.3}"
        );
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    println!("median ratio transport / bare hyper: {median:.3} (target >= 0.8)");
}
