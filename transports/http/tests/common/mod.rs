//! Test support: a served transport, a small hyper-based HTTP client that implements the
//! compliance kit's `KpClient`, and a handler that records the credentials it was given.

#![allow(dead_code, missing_docs, clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use fleetgate_transport_core::compliance::{Answer, KpClient, ScriptedGateway};
use fleetgate_transport_core::metrics::{Registry, TransportMetrics, encode};
use fleetgate_transport_core::{
    BoxFuture, ClientCredentials, ClientIdentity, KpError, KpHandler, KpRequest, Outbox, SessionId,
    Transport,
};
use fleetgate_transport_http::{HttpConfig, HttpMetrics, HttpTransport};
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// A transport serving `handler` on a free local port.
pub(crate) struct Served {
    pub addr: SocketAddr,
    pub metrics: Arc<HttpMetrics>,
    pub registry: Registry,
    pub stop: fleetgate_transport_core::ShutdownHandle,
    pub task: tokio::task::JoinHandle<()>,
}

pub(crate) fn config() -> HttpConfig {
    HttpConfig { listen: "127.0.0.1:0".parse().expect("addr"), ..Default::default() }
}

pub(crate) fn serve<H: KpHandler>(handler: Arc<H>, config: HttpConfig) -> Served {
    let mut registry = Registry::with_prefix("fleetgate");
    let shared = TransportMetrics::register(&mut registry);
    let mut transport = HttpTransport::new(config, &shared);
    transport.bind().expect("bind");
    transport.register_metrics(&mut registry);
    let addr = transport.local_addrs()[0];
    let metrics = transport.metrics();
    let (stop, shutdown) = fleetgate_transport_core::Shutdown::channel();
    let task = tokio::spawn(Box::new(transport).serve(handler, shutdown));
    Served { addr, metrics, registry, stop, task }
}

impl Served {
    /// The OpenMetrics text of the transport's metrics.
    pub(crate) fn metrics_text(&self) -> String {
        encode(&self.registry)
    }
}

pub(crate) fn basic(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

/// A response as the tests look at it.
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The status the 1/KP error body names; panics when the body is not one.
    pub(crate) fn error_code(&self) -> u16 {
        let text = std::str::from_utf8(&self.body).expect("UTF-8 body");
        let prefix = format!("{{\"statusCode\":{},\"reasonPhrase\":\"", self.status);
        assert!(text.starts_with(&prefix) && text.ends_with("\"}"), "1/KP error body: {text}");
        self.status
    }
}

/// One HTTP connection, HTTP/1.1 or HTTP/2 with prior knowledge.
pub(crate) enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    pub(crate) async fn h1(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("h1");
        tokio::spawn(conn);
        Conn::H1(sender)
    }

    pub(crate) async fn h2(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2");
        tokio::spawn(conn);
        Conn::H2(sender)
    }

    /// Sends one request; `None` when the connection failed.
    pub(crate) async fn send(
        &mut self,
        method: Method,
        uri: &str,
        auth: Option<&str>,
        body: &[u8],
    ) -> Option<Reply> {
        let mut builder = Request::builder().method(method).uri(uri);
        if let Conn::H1(_) = self {
            builder = builder.header("host", "fleetgate");
        }
        if let Some(auth) = auth {
            builder = builder.header("authorization", auth);
        }
        let request = builder.body(Full::new(Bytes::copy_from_slice(body))).expect("request");
        let response = match self {
            Conn::H1(s) => {
                s.ready().await.ok()?;
                s.send_request(request).await.ok()?
            }
            Conn::H2(s) => {
                s.ready().await.ok()?;
                s.send_request(request).await.ok()?
            }
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some(Reply { status, headers, body })
    }

    pub(crate) fn h2_sender(&self) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        match self {
            Conn::H2(s) => s.clone(),
            Conn::H1(_) => panic!("not an HTTP/2 connection"),
        }
    }
}

/// The compliance kit's client: requests on one keep-alive connection, long polls on their own.
pub(crate) struct HttpClient {
    addr: SocketAddr,
    auth: Option<String>,
    conn: Conn,
    metrics: Arc<HttpMetrics>,
    push: Option<tokio::task::JoinHandle<Option<Reply>>>,
}

impl HttpClient {
    pub(crate) async fn connect(
        addr: SocketAddr,
        metrics: Arc<HttpMetrics>,
        credentials: Option<(&str, &str)>,
    ) -> Result<Self, u16> {
        let auth = credentials.map(|(u, p)| basic(u, p));
        let conn = Conn::h1(addr).await;
        let mut client = Self { addr, auth, conn, metrics, push: None };
        if client.auth.is_some() {
            // Sessions open at the first request: make one to learn whether it is refused.
            let path = "/kp1/demo-v1/echo/tok-1/json/1";
            let reply = client.conn.send(Method::POST, path, client.auth.as_deref(), b"[]").await;
            match reply.map(|r| r.status) {
                Some(401) => return Err(401),
                Some(200) => {}
                other => panic!("unexpected answer to the first request: {other:?}"),
            }
        }
        Ok(client)
    }
}

fn answer(reply: Reply) -> Answer {
    // Any 2xx is a success (204: empty payload).
    let status = if (200..300).contains(&reply.status) { 200 } else { reply.status };
    Answer { status, payload: reply.body }
}

impl KpClient for HttpClient {
    const ANSWERS_REQUESTS_WITHOUT_ID: bool = true;

    async fn request(&mut self, path: &str, payload: &[u8], wait: Duration) -> Option<Answer> {
        let uri = format!("/{path}");
        let send = self.conn.send(Method::POST, &uri, self.auth.as_deref(), payload);
        let reply = tokio::time::timeout(wait, send).await.ok()??;
        Some(answer(reply))
    }

    async fn observe(&mut self, path: &str) {
        let (addr, auth) = (self.addr, self.auth.clone());
        let uri = format!("/{path}?observe=true&timeout_ms=10000");
        let before = self.metrics.long_polls_waiting.get();
        self.push = Some(tokio::spawn(async move {
            let mut conn = Conn::h1(addr).await;
            conn.send(Method::GET, &uri, auth.as_deref(), b"").await
        }));
        // The long poll holds its answer, so wait until the transport counts it as subscribed.
        for _ in 0..1000 {
            if self.metrics.long_polls_waiting.get() > before {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the long poll never started waiting");
    }

    async fn next_push(&mut self, wait: Duration) -> Option<Answer> {
        let push = self.push.take()?;
        let reply = tokio::time::timeout(wait, push).await.ok()?.ok()??;
        Some(answer(reply))
    }
}

/// What `open_session` was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Presented {
    pub transport: &'static str,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
}

/// The scripted gateway, recording the credentials of every session it opens.
#[derive(Default)]
pub(crate) struct Recording {
    pub inner: ScriptedGateway,
    pub opened: Mutex<Vec<Presented>>,
}

impl Recording {
    pub(crate) fn opened(&self) -> Vec<Presented> {
        self.opened.lock().map(|o| o.clone()).unwrap_or_default()
    }
}

impl KpHandler for Recording {
    fn open_session<'a>(
        &'a self,
        credentials: ClientCredentials<'a>,
        outbox: Outbox,
    ) -> BoxFuture<'a, Result<ClientIdentity, KpError>> {
        if let Ok(mut opened) = self.opened.lock() {
            opened.push(Presented {
                transport: credentials.transport,
                username: credentials.username.map(str::to_owned),
                password: credentials.password.map(<[u8]>::to_vec),
            });
        }
        self.inner.open_session(credentials, outbox)
    }

    fn handle(&self, session: SessionId, request: KpRequest) -> BoxFuture<'_, Result<(), KpError>> {
        self.inner.handle(session, request)
    }

    fn subscribe<'a>(
        &'a self,
        session: SessionId,
        filter: &'a str,
        tag: u64,
    ) -> BoxFuture<'a, Result<(), KpError>> {
        self.inner.subscribe(session, filter, tag)
    }

    fn unsubscribe(&self, session: SessionId, filter: &str) -> bool {
        self.inner.unsubscribe(session, filter)
    }

    fn close_session(&self, session: SessionId) {
        self.inner.close_session(session);
    }
}
