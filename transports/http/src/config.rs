//! `transports.http.*`.

use std::net::SocketAddr;

use fleetgate_tls::TlsConfig;
use fleetgate_transport_core::net::ConnectionLimits;
use fleetgate_transport_core::settings::below_minimum;
use serde::{Deserialize, Serialize};

/// HTTP listener settings (`transports.http.*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Whether to listen at all.
    pub enabled: bool,
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Share the port with other processes (SO_REUSEPORT), for several gateway replicas on one
    /// host. Off by default, so that a port taken by something else is a start-up error.
    pub reuse_port: bool,
    /// Largest request body accepted. A larger one is answered 413 with the 1/KP error body:
    /// at once when its `Content-Length` says so, else as soon as the streamed (chunked) body
    /// passes the limit.
    pub max_body_bytes: u64,
    /// Time a client has to send a request's headers (and, on a new connection, its first
    /// bytes), against slowloris clients: after it, the connection is closed without an
    /// answer. An idle keep-alive connection is closed after the same time.
    pub header_read_timeout_ms: u64,
    /// The head timeout of a connection accepted while fewer than a tenth of `max_connections`
    /// are free (the effective timeout is the smaller of the two); and while every connection
    /// is taken, connections that have not sent a whole request head for this long are cut.
    /// Under a slowloris flood connections turn over quickly, and real clients wait little for
    /// a slot.
    pub busy_header_read_timeout_ms: u64,
    /// How long a request may take to send its body, and then to get its answer from the
    /// gateway. A safety net: the gateway answers 504 itself after its own
    /// `gateway.request_timeout_ms`. A body not received in time is answered 408, an answer
    /// not received in time 504.
    pub request_timeout_ms: u64,
    /// Slowest a request body may arrive, on average from the end of its head after a first
    /// second of grace; a slower one is answered 408 and its connection closed, so that slow
    /// clients cannot hold connections (and `max_connections`) for `request_timeout_ms`.
    /// 0: no minimum.
    pub min_body_bytes_per_sec: u64,
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Connections open at once from one source address; more are closed at accept (reset).
    /// 0: no limit.
    pub max_connections_per_address: u32,
    /// New connections per second from one source address (a token bucket); faster ones are
    /// closed at accept. 0: no limit.
    pub max_new_connections_per_address_per_sec: u32,
    /// New connections one address may open at once after a quiet spell (the bucket's size).
    pub new_connections_burst_per_address: u32,
    /// Longest a long poll (`GET ...?observe=true&timeout_ms=N`) is held; a larger or missing
    /// `timeout_ms` is cut to this.
    pub long_poll_max_ms: u64,
    /// Requests and long polls one connection may have waiting for answers at once (the
    /// HTTP/2 concurrent stream limit); more are answered 429.
    pub max_in_flight_per_connection: u32,
    /// Pushes queued from the gateway for one connection before they are routed to the waiting
    /// long polls; the gateway closes a session that lets it fill. Answers to the connection's
    /// own requests have room besides (up to `max_in_flight_per_connection` of them).
    pub response_queue_capacity: usize,
    /// Accept HTTP/2 with prior knowledge (h2c) besides HTTP/1.1; over TLS, offer `h2` by ALPN.
    pub http2: bool,
    /// HTTPS: serve TLS with the `tls` section (HTTP/2 chosen by ALPN).
    pub tls_enabled: bool,
    /// Certificate, key, client CA (mTLS), reloads; read when `tls_enabled`.
    pub tls: TlsConfig,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            reuse_port: false,
            max_body_bytes: 1024 * 1024,
            header_read_timeout_ms: 10_000,
            busy_header_read_timeout_ms: 1_000,
            request_timeout_ms: 30_000,
            min_body_bytes_per_sec: 1024,
            max_connections: 10_000,
            max_connections_per_address: 1_000,
            max_new_connections_per_address_per_sec: 50,
            new_connections_burst_per_address: 200,
            long_poll_max_ms: 60_000,
            max_in_flight_per_connection: 256,
            response_queue_capacity: 1024,
            http2: true,
            tls_enabled: false,
            tls: TlsConfig::default(),
        }
    }
}

impl HttpConfig {
    /// The per-address limits applied at accept (`max_connections` is the listener's own
    /// semaphore).
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: 0,
            max_per_address: self.max_connections_per_address,
            new_per_address_per_sec: self.max_new_connections_per_address_per_sec,
            new_per_address_burst: self.new_connections_burst_per_address,
        }
    }

    /// Values out of range, as `(setting, what is wrong)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = below_minimum(&[
            ("max_body_bytes", self.max_body_bytes, 1),
            ("header_read_timeout_ms", self.header_read_timeout_ms, 1),
            ("busy_header_read_timeout_ms", self.busy_header_read_timeout_ms, 1),
            ("request_timeout_ms", self.request_timeout_ms, 1),
            ("max_connections", self.max_connections as u64, 1),
            ("max_in_flight_per_connection", self.max_in_flight_per_connection.into(), 1),
            ("response_queue_capacity", self.response_queue_capacity as u64, 1),
        ]);
        if self.tls_enabled {
            problems.extend(self.tls.problems());
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_refused_and_missing_ones_default() {
        let c: HttpConfig =
            serde_json::from_str(r#"{"listen":"127.0.0.1:9000"}"#).expect("partial config");
        assert_eq!(c.listen, SocketAddr::from(([127, 0, 0, 1], 9000)));
        assert_eq!(c.max_body_bytes, 1024 * 1024);
        let e = serde_json::from_str::<HttpConfig>(r#"{"max_body":1}"#).expect_err("unknown key");
        assert!(e.to_string().contains("max_body"), "{e}");
    }
}
