//! The two plug points of a transport: [`KpHandler`], the gateway as a transport sees it, and
//! [`Transport`], a transport as the binary sees it. Both are object-safe, so the binary holds
//! `Box<dyn Transport>` from its registry and hands each one an `Arc<dyn KpHandler>`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use crate::{Outbox, Shutdown};
use fleetgate_kp::{ClientCredentials, ClientIdentity, KpError, KpRequest, SessionId};
use prometheus_client::registry::Registry;

/// A boxed, sendable future: what the object-safe traits here return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The gateway side of the boundary, called by every transport.
pub trait KpHandler: Send + Sync + 'static {
    /// Authenticates a connecting client and opens a session whose responses and pushes go to
    /// `outbox`. An error says why the client is refused (401 bad credentials, 503 no
    /// credential provider answered, ...).
    fn open_session<'a>(
        &'a self,
        credentials: ClientCredentials<'a>,
        outbox: Outbox,
    ) -> BoxFuture<'a, Result<ClientIdentity, KpError>>;

    /// Accepts one request from a session. Returns once the request has been handed to the bus
    /// (the moment an MQTT QoS 1 PUBACK may go out); its response arrives later in the outbox.
    /// An error means the request never reached an extension and the transport answers it
    /// with that error itself.
    fn handle(&self, session: SessionId, request: KpRequest) -> BoxFuture<'_, Result<(), KpError>>;

    /// The session asks for copies of responses and pushes whose path matches `filter` (MQTT
    /// topic filter syntax: `+` one level, `#` the rest), besides those for its own requests,
    /// which it gets anyway. Copies carry `tag`. Naming the token counts as using it: from then
    /// on the session also gets the endpoint's pushes (tag 0), as after a request, and the
    /// endpoint is announced connected. An error refuses the filter (401 unknown token,
    /// 403 a filter that does not name one endpoint token, 404 unknown app version or
    /// extension).
    fn subscribe<'a>(
        &'a self,
        session: SessionId,
        filter: &'a str,
        tag: u64,
    ) -> BoxFuture<'a, Result<(), KpError>>;

    /// Cancels [`KpHandler::subscribe`]; false when there was no such subscription.
    fn unsubscribe(&self, session: SessionId, filter: &str) -> bool;

    /// The session has ended (disconnect, error or timeout). Idempotent.
    fn close_session(&self, session: SessionId);
}

/// Why a transport could not open its sockets: the setting to fix, the address and what the
/// OS said. Always the operator's fault (port taken, no permission).
#[derive(Debug, thiserror::Error)]
#[error("{setting}: cannot listen on {addr}: {source}")]
pub struct BindError {
    /// The setting that names the address, e.g. `transports.mqtt.listen`.
    pub setting: String,
    /// The address.
    pub addr: SocketAddr,
    /// What the OS said.
    #[source]
    pub source: std::io::Error,
}

impl BindError {
    /// A bind failure of the `listen` setting of the configuration section `section`.
    pub fn listen(section: &str, addr: SocketAddr, source: std::io::Error) -> Self {
        Self { setting: format!("{section}.listen"), addr, source }
    }
}

/// A device transport as the binary runs it: made from its configuration section, bound at
/// start-up (so that a taken port fails start-up before any service runs), then served until
/// shutdown. Transports are listed in the binary's registry; nothing else names them.
pub trait Transport: Send + 'static {
    /// Short name used in metrics labels and logs: `mqtt`, `coap`, `http`, ...
    fn name(&self) -> &'static str;

    /// Its configuration section, e.g. `transports.mqtt`; errors name settings under it.
    fn config_section(&self) -> &'static str;

    /// Opens the transport's sockets. Must be called within a tokio runtime.
    fn bind(&mut self) -> Result<(), BindError>;

    /// The addresses it listens on (empty before [`Transport::bind`]).
    fn local_addrs(&self) -> Vec<SocketAddr>;

    /// Registers the transport's own metrics (the families every transport shares are in
    /// [`crate::metrics::TransportMetrics`], which the transport got when it was made).
    fn register_metrics(&self, registry: &mut Registry);

    /// Serves devices until `shutdown.stop`, then closes its sessions. From `shutdown.drain`
    /// on it takes no new connections and hands the handler no new requests (nothing new is
    /// acknowledged), and finishes what it took.
    fn serve(
        self: Box<Self>,
        handler: Arc<dyn KpHandler>,
        shutdown: Shutdown,
    ) -> BoxFuture<'static, ()>;
}
