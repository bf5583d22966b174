//! A small CoAP client on the crate's codec, and a server harness, for the tests.

#![allow(dead_code, missing_docs, clippy::expect_used, clippy::unwrap_used)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleetgate_transport_coap::codec::{
    Code, Message, MessageType, MessageWriter, Token, option, write_empty,
};
use fleetgate_transport_coap::{CoapConfig, CoapMetrics, CoapTransport};
use fleetgate_transport_core::Transport;
use fleetgate_transport_core::compliance::{Answer, KpClient, ScriptedGateway, start};
use fleetgate_transport_core::metrics::{Registry, TransportMetrics, encode};
use tokio::net::UdpSocket;

/// Serves `gateway` on a CoAP transport on a free loopback port.
pub(crate) async fn serve(
    gateway: Arc<ScriptedGateway>,
    config: CoapConfig,
) -> (SocketAddr, Served, fleetgate_transport_core::ShutdownHandle) {
    let config = CoapConfig { listen: "127.0.0.1:0".parse().expect("addr"), ..config };
    let mut registry = Registry::with_prefix("fleetgate");
    let shared = TransportMetrics::register(&mut registry);
    let transport = CoapTransport::new(config, &shared);
    transport.register_metrics(&mut registry);
    let metrics = transport.metrics();
    let (addr, stop) = start(Box::new(transport), gateway);
    (addr, Served { metrics, registry }, stop)
}

/// The served transport's metrics: its handles, and the registry they render from.
pub(crate) struct Served {
    pub metrics: Arc<CoapMetrics>,
    pub registry: Registry,
}

impl std::ops::Deref for Served {
    type Target = CoapMetrics;

    fn deref(&self) -> &CoapMetrics {
        &self.metrics
    }
}

impl Served {
    /// The OpenMetrics text of the transport's metrics.
    pub(crate) fn text(&self) -> String {
        encode(&self.registry)
    }
}

pub(crate) struct CoapClient {
    pub socket: UdpSocket,
    next_mid: u16,
    next_token: u32,
    /// Uri-Query arguments added to every request (`u=...`, `p=...`).
    pub query: Vec<String>,
    /// Messages received while waiting for something else.
    pub inbox: VecDeque<Message>,
    /// The token of the last Observe registration.
    pub observe_token: Option<Token>,
}

/// A request to build.
pub(crate) struct Req {
    pub mtype: MessageType,
    pub code: Code,
    pub path: String,
    pub payload: Vec<u8>,
    pub options: Vec<(u16, Vec<u8>)>,
    pub token: Option<Token>,
    pub mid: Option<u16>,
}

impl Req {
    pub(crate) fn post(path: &str, payload: &[u8]) -> Self {
        Self {
            mtype: MessageType::Confirmable,
            code: Code::POST,
            path: path.to_owned(),
            payload: payload.to_vec(),
            options: Vec::new(),
            token: None,
            mid: None,
        }
    }

    pub(crate) fn option(mut self, number: u16, value: impl Into<Vec<u8>>) -> Self {
        self.options.push((number, value.into()));
        self
    }

    pub(crate) fn uint(self, number: u16, value: u32) -> Self {
        let bytes = value.to_be_bytes();
        let skip = (value.leading_zeros() / 8) as usize;
        self.option(number, bytes[skip.min(4)..].to_vec())
    }
}

pub(crate) fn status_of(msg: &Message) -> u16 {
    match msg.code().class() {
        2 => 200,
        c => u16::from(c) * 100 + u16::from(msg.code().detail()),
    }
}

pub(crate) fn answer_of(msg: &Message) -> Answer {
    let status = status_of(msg);
    let payload = if status == 200 {
        msg.payload().clone()
    } else {
        // The diagnostic payload is the reason phrase; the kit compares 1/KP error bodies.
        let reason = String::from_utf8_lossy(msg.payload());
        fleetgate_transport_core::error_body(status, &reason)
    };
    Answer { status, payload }
}

impl CoapClient {
    pub(crate) async fn new(server: SocketAddr) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
        socket.connect(server).await.expect("connect");
        Self {
            socket,
            next_mid: 0x100,
            next_token: 0x1000,
            query: Vec::new(),
            inbox: VecDeque::new(),
            observe_token: None,
        }
    }

    pub(crate) fn new_token(&mut self) -> Token {
        self.next_token += 1;
        Token::new(&self.next_token.to_be_bytes()).expect("4 bytes")
    }

    pub(crate) fn new_mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }

    /// Encodes `req`, returning its message id, token and bytes.
    pub(crate) fn build(&mut self, req: Req) -> (u16, Token, Bytes) {
        let mid = req.mid.unwrap_or_else(|| self.new_mid());
        let token = req.token.unwrap_or_else(|| self.new_token());
        let mut options = req.options;
        for segment in req.path.split('/').filter(|s| !s.is_empty()) {
            options.push((option::URI_PATH, segment.as_bytes().to_vec()));
        }
        for q in &self.query {
            options.push((option::URI_QUERY, q.as_bytes().to_vec()));
        }
        options.sort_by_key(|(n, _)| *n);
        let mut out = BytesMut::new();
        let mut w = MessageWriter::new(&mut out, req.mtype, req.code, mid, token.as_slice())
            .expect("token");
        for (n, v) in &options {
            w.option(*n, v).expect("option");
        }
        w.payload(&req.payload);
        (mid, token, out.freeze())
    }

    pub(crate) async fn send(&self, bytes: &[u8]) {
        self.socket.send(bytes).await.expect("send");
    }

    pub(crate) async fn send_empty(&self, mtype: MessageType, mid: u16) {
        let mut out = BytesMut::new();
        write_empty(&mut out, mtype, mid);
        self.send(&out).await;
    }

    /// The next datagram from the server, decoded.
    pub(crate) async fn recv(&mut self, wait: Duration) -> Option<Message> {
        let mut buf = vec![0u8; 70_000];
        let n = tokio::time::timeout(wait, self.socket.recv(&mut buf)).await.ok()?.ok()?;
        buf.truncate(n);
        Some(Message::decode(Bytes::from(buf)).expect("the server sends valid CoAP"))
    }

    /// The next message matching `want`, first from the inbox; others are kept in the inbox.
    pub(crate) async fn recv_matching(
        &mut self,
        wait: Duration,
        want: impl Fn(&Message) -> bool,
    ) -> Option<Message> {
        if let Some(i) = self.inbox.iter().position(&want) {
            return self.inbox.remove(i);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let msg = self.recv(left).await?;
            if want(&msg) {
                return Some(msg);
            }
            self.inbox.push_back(msg);
        }
    }

    /// Sends a request and returns its response: piggybacked, or separate after an empty ACK
    /// (which it acknowledges), or the NON response.
    pub(crate) async fn exchange(&mut self, req: Req, wait: Duration) -> Option<Message> {
        let mtype = req.mtype;
        let (mid, token, bytes) = self.build(req);
        self.send(&bytes).await;
        self.response_to(mtype, mid, token, wait).await
    }

    pub(crate) async fn response_to(
        &mut self,
        mtype: MessageType,
        mid: u16,
        token: Token,
        wait: Duration,
    ) -> Option<Message> {
        if mtype == MessageType::Confirmable {
            let ack = self
                .recv_matching(wait, |m| {
                    m.mtype() == MessageType::Acknowledgement && m.message_id() == mid
                })
                .await?;
            if !ack.code().is_empty() {
                assert_eq!(ack.token(), token, "piggybacked response carries the request's token");
                return Some(ack);
            }
        }
        let response = self
            .recv_matching(wait, |m| {
                matches!(m.mtype(), MessageType::Confirmable | MessageType::NonConfirmable)
                    && m.token() == token
                    && m.code().is_response()
            })
            .await?;
        if response.mtype() == MessageType::Confirmable {
            self.send_empty(MessageType::Acknowledgement, response.message_id()).await;
        }
        Some(response)
    }
}

impl KpClient for CoapClient {
    const ANSWERS_REQUESTS_WITHOUT_ID: bool = true;

    async fn request(&mut self, path: &str, payload: &[u8], wait: Duration) -> Option<Answer> {
        self.exchange(Req::post(path, payload), wait).await.map(|m| answer_of(&m))
    }

    async fn observe(&mut self, path: &str) {
        let req = Req { code: Code::GET, ..Req::post(path, b"") }.uint(option::OBSERVE, 0);
        let first =
            self.exchange(req, Duration::from_secs(5)).await.expect("registration answered");
        assert_eq!(first.code(), Code::CONTENT, "registration succeeds");
        assert!(first.known().observe.is_some(), "first response carries Observe");
        self.observe_token = Some(first.token());
    }

    async fn next_push(&mut self, wait: Duration) -> Option<Answer> {
        let token = self.observe_token?;
        let msg = self
            .recv_matching(wait, |m| {
                m.token() == token
                    && m.code().is_response()
                    && m.mtype() != MessageType::Acknowledgement
            })
            .await?;
        if msg.mtype() == MessageType::Confirmable {
            self.send_empty(MessageType::Acknowledgement, msg.message_id()).await;
        }
        Some(answer_of(&msg))
    }
}

/// `connect` for the compliance kit: credentials travel as Uri-Query `u=`/`p=`; a refusal is
/// the status of the first request.
pub(crate) async fn connect(
    server: SocketAddr,
    credentials: Option<(&str, &str)>,
) -> Result<CoapClient, u16> {
    let mut client = CoapClient::new(server).await;
    if let Some((user, password)) = credentials {
        client.query = vec![format!("u={user}"), format!("p={password}")];
        let path = format!(
            "kp1/{}/echo/{}/json/1",
            fleetgate_transport_core::compliance::APP_VERSION,
            fleetgate_transport_core::compliance::TOKEN
        );
        let answer = client.request(&path, b"[]", Duration::from_secs(5)).await.ok_or(503u16)?;
        if answer.status != 200 {
            return Err(answer.status);
        }
    }
    Ok(client)
}
