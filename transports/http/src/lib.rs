//! HTTP transport for 1/KP: HTTP/1.1 with keep-alive and HTTP/2 over cleartext (h2c, prior
//! knowledge), on hyper.
//!
//! `POST` (or `PUT`) `/kp1/<appver>/<ext>/<token>/<path>[/<request id>]` is one 1/KP request:
//! the URI path without its leading slash is the 1/KP resource path and the body is the
//! payload. The extension's answer comes back as the HTTP response: 200 with its payload, 204
//! when it is empty, or the status code of DESIGN decision 3 with the 1/KP error body
//! `{"statusCode":..,"reasonPhrase":".."}`. `GET` on the same paths with `?observe=true` is a
//! long poll that returns the next push on that path (see [`server`]).
//!
//! One gateway session per TCP connection, opened at its first request with the credentials of
//! its `Authorization` header (`Basic` user and password, or `Bearer` token as the password)
//! and closed when the connection ends.
//!
//! This crate knows nothing of the bus or of any extension's payloads; it talks to the gateway
//! only through [`fleetgate_transport_core::KpHandler`]. It does not terminate TLS (put a proxy
//! in front), does not percent-decode paths, and does not negotiate HTTP/2 by `Upgrade: h2c`
//! (HTTP/2 clients must use prior knowledge, e.g. `curl --http2-prior-knowledge`).

mod config;
mod connection;
mod error;
pub mod framing;
mod metrics;
pub mod server;
mod wire;

pub use config::HttpConfig;
pub use error::HttpError;
pub use metrics::HttpMetrics;
pub use server::HttpTransport;
