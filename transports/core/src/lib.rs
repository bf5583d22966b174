//! The boundary between device transports and the gateway, and what every transport shares.
//!
//! A transport (MQTT, CoAP, HTTP, ...) turns its wire format into 1/KP requests (the plain
//! types of `fleetgate-kp`, re-exported here) and hands them to a [`KpHandler`]; answers and
//! pushes come back through the session's [`Outbox`]. The binary sees each transport as a
//! [`Transport`]: made from its configuration section, bound, served. This crate also holds
//! what every transport needs besides: the socket layer ([`net`]: SO_REUSEPORT listeners,
//! batched UDP reads, per-peer queues), the shared metric families ([`metrics`]), range checks
//! of configuration values ([`settings`]) and, behind
//! the `compliance` feature, the compliance kit every transport's tests run.
//!
//! It knows nothing of the bus or of any extension's payloads, and no protocol's wire format.

#[cfg(feature = "compliance")]
pub mod compliance;
mod handler;
pub mod metrics;
pub mod net;
mod outbox;
pub mod settings;

pub use fleetgate_kp::{
    ClientCertificate, ClientCredentials, ClientIdentity, KpError, KpOutcome, KpRequest,
    KpResponse, KpTopic, KpTopicError, SessionId, error_body, parse_request_id, response_topic,
    status_reason, topic_filter_matches,
};
pub use handler::{BindError, BoxFuture, KpHandler, Transport};
pub use outbox::{Outbox, OutboxReceiver, TryRecvError, TrySendError, outbox};

/// Resolves once `shutdown` turns true (or its sender is gone): the stop signal every transport
/// loop selects on.
pub async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// How a transport's service ends, in two steps: `drain` turns true first (take no new
/// connections and hand the gateway no new requests, so that nothing new is acknowledged, but
/// finish what was taken), then `stop` (close every connection). A stop without a drain before
/// it implies one.
#[derive(Debug, Clone)]
pub struct Shutdown {
    /// Stop taking work.
    pub drain: tokio::sync::watch::Receiver<bool>,
    /// Close.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// The senders of a [`Shutdown`].
#[derive(Debug)]
pub struct ShutdownHandle {
    drain: tokio::sync::watch::Sender<bool>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Shutdown {
    /// A fresh pair of signals and their senders.
    pub fn channel() -> (ShutdownHandle, Shutdown) {
        let (drain, drain_rx) = tokio::sync::watch::channel(false);
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        (ShutdownHandle { drain, stop }, Shutdown { drain: drain_rx, stop: stop_rx })
    }

    /// Signals that `stop` drives alone (draining when it stops).
    pub fn on(stop: tokio::sync::watch::Receiver<bool>) -> Self {
        Self { drain: stop.clone(), stop }
    }
}

impl ShutdownHandle {
    /// Stop taking work.
    pub fn drain(&self) {
        let _ = self.drain.send(true);
    }

    /// Close (drains first).
    pub fn stop(&self) {
        self.drain();
        let _ = self.stop.send(true);
    }
}
