//! The transport plug-in trait and the types that cross it.

use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use tokio::sync::watch;

use crate::{KpError, KpTopic, Outbox};

/// Identifies one device session (an MQTT connection, later a CoAP peer or HTTP client) within a
/// gateway process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// What a client presented when it connected.
#[derive(Debug, Clone, Copy)]
pub struct ClientCredentials<'a> {
    /// Transport name, e.g. `mqtt`.
    pub transport: &'static str,
    /// Transport-level client id (MQTT client identifier), possibly empty.
    pub client_id: &'a str,
    /// User name, if any.
    pub username: Option<&'a str>,
    /// Password, if any (MQTT passwords are binary).
    pub password: Option<&'a [u8]>,
    /// Address of the peer.
    pub peer: SocketAddr,
}

/// What the gateway knows of an authenticated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The session's id, to pass to [`KpHandler::handle`] and [`KpHandler::close_session`].
    pub session: SessionId,
    /// The client id the credential provider assigned, when it did.
    pub client_id: Option<String>,
}

/// One 1/KP request from a device.
#[derive(Debug, Clone)]
pub struct KpRequest {
    /// The parsed resource path.
    pub topic: KpTopic,
    /// The payload, a slice of the transport's read buffer.
    pub payload: Bytes,
    /// An opaque value the transport chooses; the response to this request carries it back (a
    /// CoAP transport keeps its exchange there; MQTT does not need it).
    pub tag: u64,
    /// The transport must answer this request even when its path has no request id (an HTTP
    /// request, a confirmable CoAP request): the gateway then asks the extension for an answer
    /// as if the path had one, and responds with `request_id: None`. MQTT leaves it false:
    /// there, a request without id gets no success response (1/KP).
    pub wants_answer: bool,
}

/// What happened to a request, or what an extension pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KpOutcome {
    /// 2xx: the extension's payload (empty for none), for the `/status` topic.
    Success(Bytes),
    /// Anything else, for the `/error` topic with the 1/KP error body.
    Error(KpError),
}

/// A response or push for a device, addressed by 1/KP path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KpResponse {
    /// The path without request id or status suffix: `kp1/<appver>/<ext>/<token><resource path>`.
    pub base: Bytes,
    /// The request id the response answers; `None` for pushes and id-less requests.
    pub request_id: Option<u32>,
    /// The request's [`KpRequest::tag`]; 0 for pushes.
    pub tag: u64,
    /// Success payload or error.
    pub outcome: KpOutcome,
}

/// The gateway side of the boundary, called by every transport.
pub trait KpHandler: Send + Sync + 'static {
    /// Authenticates a connecting client and opens a session whose responses and pushes go to
    /// `outbox`. An error says why the client is refused (401 bad credentials, 503 no
    /// credential provider answered, ...).
    fn open_session(
        &self,
        credentials: ClientCredentials<'_>,
        outbox: Outbox,
    ) -> impl Future<Output = Result<ClientIdentity, KpError>> + Send;

    /// Accepts one request from a session. Returns once the request has been handed to the bus
    /// (the moment an MQTT QoS 1 PUBACK may go out); its response arrives later in the outbox.
    /// An error means the request never reached an extension and the transport answers it
    /// with that error itself.
    fn handle(
        &self,
        session: SessionId,
        request: KpRequest,
    ) -> impl Future<Output = Result<(), KpError>> + Send;

    /// The session asks for copies of responses and pushes whose path matches `filter` (MQTT
    /// topic filter syntax: `+` one level, `#` the rest), besides those for its own requests,
    /// which it gets anyway. Copies carry `tag`. An error refuses the filter (401 unknown token,
    /// 403 a filter that does not name one endpoint token, 404 unknown app version or
    /// extension).
    fn subscribe(
        &self,
        session: SessionId,
        filter: &str,
        tag: u64,
    ) -> impl Future<Output = Result<(), KpError>> + Send;

    /// Cancels [`KpHandler::subscribe`]; false when there was no such subscription.
    fn unsubscribe(&self, session: SessionId, filter: &str) -> bool;

    /// The session has ended (disconnect, error or timeout). Idempotent.
    fn close_session(&self, session: SessionId);
}

/// A device transport: bound at start-up (so a taken port fails start-up), then served until
/// shutdown.
pub trait Transport: Send + 'static {
    /// Short name used in metrics and logs: `mqtt`, `coap`, `http`, ...
    fn name(&self) -> &'static str;

    /// The address it listens on.
    fn local_addr(&self) -> SocketAddr;

    /// Serves devices until `shutdown` turns true, then closes its sessions.
    fn serve<H: KpHandler>(
        self,
        handler: std::sync::Arc<H>,
        shutdown: watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send;
}
