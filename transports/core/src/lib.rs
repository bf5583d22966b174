//! The boundary between device transports and the gateway.
//!
//! A transport (MQTT, CoAP, HTTP, ...) turns its wire format into [`KpRequest`]s and hands them
//! to a [`KpHandler`]; answers and pushes come back as [`KpResponse`]s through the session's
//! [`Outbox`]. This crate defines those types, the 1/KP resource path rules
//! ([`KpTopic`], DESIGN decisions 1 and 6), the status codes of DESIGN decision 3 and the 1/KP
//! error body. It knows nothing of sockets, the bus or any extension's payloads.

#[cfg(feature = "compliance")]
pub mod compliance;
mod handler;
pub mod listener;
pub mod metrics;
mod outbox;
mod status;
mod topic;

pub use handler::{
    ClientCredentials, ClientIdentity, KpHandler, KpOutcome, KpRequest, KpResponse, SessionId,
    Transport,
};
pub use outbox::{Outbox, OutboxReceiver, TryRecvError, TrySendError, outbox};
pub use status::{KpError, error_body, status_reason};
pub use topic::{KpTopic, KpTopicError, parse_request_id, topic_filter_matches};

/// Resolves once `shutdown` turns true (or its sender is gone): the stop signal every transport
/// loop selects on.
pub async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
