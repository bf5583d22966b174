//! 1/KP as plain values: what every transport and the gateway exchange.
//!
//! A transport turns its wire format into a [`KpRequest`] (a parsed [`KpTopic`] and a payload)
//! and gets back [`KpResponse`]s (the answer's [`KpOutcome`]: a payload, or a [`KpError`] with
//! a status code of DESIGN decision 3 and the 1/KP error body). The resource path rules of
//! DESIGN decisions 1 and 6 live in [`KpTopic`].
//!
//! This crate depends on `bytes` and `thiserror` only: no I/O, no clock, no async. The sans-IO
//! protocol sessions of the transports build on it; the async boundary between transports and
//! the gateway (`KpHandler`, `Transport`) is in `fleetgate-transport-core`.

mod request;
mod status;
mod topic;

pub use request::{
    ClientCertificate, ClientCredentials, ClientIdentity, KpOutcome, KpRequest, KpResponse,
    SessionId, response_topic,
};
pub use status::{KpError, error_body, status_reason};
pub use topic::{KpTopic, KpTopicError, parse_request_id, topic_filter_matches};
