//! HTTP transport metrics: the shared transport families, labelled `transport="http"`, and the
//! HTTP transport's own.

use fleetgate_transport_core::metrics::{
    Counter, Family, Gauge, Latency, Registry, TransportMetrics, transport_registry,
};
use prometheus_client::encoding::EncodeLabelSet;

/// The transport's name in metrics and logs.
pub(crate) const NAME: &str = "http";

/// The `class` label of `fleetgate_transport_http_responses_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

/// HTTP metrics for `/metrics`.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    /// Connections accepted.
    pub connections_accepted: Counter,
    /// Connections open now.
    pub connections_open: Gauge,
    /// Requests received (every method and path).
    pub requests_received: Counter,
    /// Responses sent, by class: other (1xx, 3xx: none expected), 2xx, 4xx, 5xx.
    responses: [Counter; 4],
    responses_family: Family<ClassLabel, Counter>,
    /// Requests answered 413 (body over `max_body_bytes`).
    pub payload_too_large: Counter,
    /// Requests answered 504 by the transport's own `request_timeout_ms`, or 408 for a body
    /// that did not arrive in time.
    pub request_timeouts: Counter,
    /// Connections closed because headers did not arrive within `header_read_timeout_ms`.
    pub header_timeouts: Counter,
    /// Connections accepted while fewer than a tenth of `max_connections` were free (they get
    /// `busy_header_read_timeout_ms`).
    pub busy_connections: Counter,
    /// Requests answered 408 because their body arrived slower than `min_body_bytes_per_sec`.
    pub body_rate_timeouts: Counter,
    /// Requests answered 413 as soon as a chunk size declared more than `max_body_bytes`.
    pub chunk_size_refusals: Counter,
    /// Sessions the gateway refused (bad credentials, authentication unavailable).
    pub sessions_refused: Counter,
    /// Long polls waiting for a push now (counted once their subscription is in place).
    pub long_polls_waiting: Gauge,
    /// From a request's body read to the gateway's acceptance.
    pub request_accept: Latency,
    /// The transport's handles, for `connections_limited` by reason.
    limits: fleetgate_transport_core::metrics::TransportCounters,
}

/// Index into [`HttpMetrics::responses`].
fn class_index(status: u16) -> usize {
    match status {
        200..=299 => 1,
        400..=499 => 2,
        500..=599 => 3,
        _ => 0,
    }
}

const CLASSES: [&str; 4] = ["other", "2xx", "4xx", "5xx"];

impl HttpMetrics {
    /// The HTTP handles of the shared families, and fresh ones of its own.
    pub fn new(shared: &TransportMetrics) -> Self {
        let c = shared.counters(NAME);
        let responses_family = Family::<ClassLabel, Counter>::default();
        let responses =
            CLASSES.map(|class| responses_family.get_or_create_owned(&ClassLabel { class }));
        Self {
            connections_accepted: c.connections_accepted(),
            connections_open: c.connections_open(),
            requests_received: c.messages_received(),
            sessions_refused: c.sessions_refused(),
            request_accept: c.request_accept(),
            responses,
            responses_family,
            payload_too_large: Counter::default(),
            request_timeouts: Counter::default(),
            header_timeouts: Counter::default(),
            body_rate_timeouts: Counter::default(),
            busy_connections: Counter::default(),
            chunk_size_refusals: Counter::default(),
            long_polls_waiting: Gauge::default(),
            limits: c,
        }
    }

    /// Counts a connection refused at accept by a per-address limit
    /// (`fleetgate_transport_connections_limited_total{transport="http",reason}`).
    pub fn limited(&self, refusal: fleetgate_transport_core::net::Refusal) {
        self.limits.connections_limited(refusal.reason()).inc();
    }

    /// `connections_limited` for `reason` (`per_address` or `rate`).
    pub fn connections_limited(&self, reason: &'static str) -> Counter {
        self.limits.connections_limited(reason)
    }

    /// Counts one response with `status`.
    pub fn count_response(&self, status: u16) {
        self.responses[class_index(status)].inc();
        if status == 413 {
            self.payload_too_large.inc();
        }
    }

    pub(crate) fn register(&self, registry: &mut Registry) {
        let r = transport_registry(registry, NAME);
        r.register(
            "http_responses",
            "HTTP responses sent, by status class",
            self.responses_family.clone(),
        );
        r.register(
            "payload_too_large",
            "Requests refused for a body over the limit",
            self.payload_too_large.clone(),
        );
        r.register(
            "request_timeouts",
            "Requests the transport timed out (408 body, 504 answer)",
            self.request_timeouts.clone(),
        );
        r.register(
            "header_timeouts",
            "Connections closed for slow request headers",
            self.header_timeouts.clone(),
        );
        r.register(
            "busy_connections",
            "Connections accepted near max_connections, given the short head timeout",
            self.busy_connections.clone(),
        );
        r.register(
            "body_rate_timeouts",
            "Requests refused (408) for a body slower than the minimum rate",
            self.body_rate_timeouts.clone(),
        );
        r.register(
            "chunk_size_refusals",
            "Requests refused (413) as soon as a chunk size declared more than the body limit",
            self.chunk_size_refusals.clone(),
        );
        r.register(
            "long_polls_waiting",
            "Long polls waiting for a push",
            self.long_polls_waiting.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use fleetgate_transport_core::metrics::encode;

    use super::*;

    #[test]
    fn renders_labelled_families() {
        let mut registry = Registry::with_prefix("fleetgate");
        let shared = TransportMetrics::register(&mut registry);
        let m = HttpMetrics::new(&shared);
        m.register(&mut registry);
        m.requests_received.inc();
        m.count_response(204);
        m.count_response(413);
        m.connections_open.inc();
        let out = encode(&registry);
        assert!(
            out.contains("fleetgate_transport_messages_received_total{transport=\"http\"} 1\n")
        );
        assert!(out.contains(
            "fleetgate_transport_http_responses_total{transport=\"http\",class=\"2xx\"} 1\n"
        ));
        assert!(out.contains(
            "fleetgate_transport_http_responses_total{transport=\"http\",class=\"4xx\"} 1\n"
        ));
        assert!(
            out.contains("fleetgate_transport_payload_too_large_total{transport=\"http\"} 1\n")
        );
        assert!(out.contains("fleetgate_transport_connections_open{transport=\"http\"} 1\n"));
    }
}
