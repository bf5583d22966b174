//! HTTP transport counters and their Prometheus text.

use std::fmt::Write;

use fleetgate_transport_core::metrics::{Counter, Gauge, write_metric};

/// Labels of every HTTP transport metric.
const LABELS: &str = "{transport=\"http\"}";

/// HTTP counters for `/metrics`.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    /// Connections accepted.
    pub connections_accepted: Counter,
    /// Connections open now.
    pub connections_open: Gauge,
    /// Requests received (every method and path).
    pub requests_received: Counter,
    /// Responses sent, by class: 1xx and 3xx (none expected), 2xx, 4xx, 5xx.
    pub responses: [Counter; 4],
    /// Requests answered 413 (body over `max_body_bytes`).
    pub payload_too_large: Counter,
    /// Requests answered 504 by the transport's own `request_timeout_ms`, or 408 for a body
    /// that did not arrive in time.
    pub request_timeouts: Counter,
    /// Connections closed because headers did not arrive within `header_read_timeout_ms`.
    pub header_timeouts: Counter,
    /// Sessions the gateway refused (bad credentials, authentication unavailable).
    pub sessions_refused: Counter,
    /// Long polls waiting for a push now (counted once their subscription is in place).
    pub long_polls_waiting: Gauge,
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

impl HttpMetrics {
    /// Counts one response with `status`.
    pub fn count_response(&self, status: u16) {
        self.responses[class_index(status)].inc();
        if status == 413 {
            self.payload_too_large.inc();
        }
    }

    /// Appends the Prometheus text exposition.
    pub fn render(&self, out: &mut String) {
        let counters = [
            ("connections_accepted_total", "Connections accepted", &self.connections_accepted),
            ("messages_received_total", "Requests received from devices", &self.requests_received),
            (
                "payload_too_large_total",
                "Requests refused for a body over the limit",
                &self.payload_too_large,
            ),
            (
                "request_timeouts_total",
                "Requests the transport timed out (408 body, 504 answer)",
                &self.request_timeouts,
            ),
            (
                "header_timeouts_total",
                "Connections closed for slow request headers",
                &self.header_timeouts,
            ),
            (
                "sessions_refused_total",
                "Sessions refused by the gateway (credentials)",
                &self.sessions_refused,
            ),
        ];
        for (name, help, counter) in counters {
            let name = format!("fleetgate_transport_{name}");
            write_metric(out, "counter", &name, help, LABELS, counter.get());
        }
        let name = "fleetgate_transport_http_responses_total";
        let _ = writeln!(out, "# HELP {name} HTTP responses sent, by status class");
        let _ = writeln!(out, "# TYPE {name} counter");
        for (class, counter) in ["other", "2xx", "4xx", "5xx"].iter().zip(&self.responses) {
            let _ =
                writeln!(out, "{name}{{transport=\"http\",class=\"{class}\"}} {}", counter.get());
        }
        let gauges = [
            ("connections_open", "Connections open", &self.connections_open),
            ("long_polls_waiting", "Long polls waiting for a push", &self.long_polls_waiting),
        ];
        for (name, help, gauge) in gauges {
            let name = format!("fleetgate_transport_{name}");
            write_metric(out, "gauge", &name, help, LABELS, gauge.get());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_families() {
        let m = HttpMetrics::default();
        m.requests_received.inc();
        m.count_response(204);
        m.count_response(413);
        m.connections_open.inc();
        let mut out = String::new();
        m.render(&mut out);
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
        // Every sample line belongs to a family announced just before it.
        for line in out.lines().filter(|l| !l.starts_with('#')) {
            let family = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(out.contains(&format!("# TYPE {family} ")), "{line}");
        }
    }
}
