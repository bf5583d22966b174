//! Transport metrics on the process's one `prometheus-client` registry.
//!
//! The families every transport reports (connections, messages, protocol errors, sessions) are
//! declared once, here, with a `transport` label: [`TransportMetrics`] is registered once by the
//! binary and each transport takes its own labelled handles from it ([`TransportCounters`]).
//! A transport's own families (CoAP's retransmissions, HTTP's response classes) are registered
//! by the transport in [`crate::Transport::register_metrics`], under
//! [`transport_registry`]. Names follow DESIGN's `fleetgate_<area>_<what>_<unit>`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
pub use prometheus_client::registry::Registry;

/// The `transport` label of every transport metric.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    /// The transport's name: `mqtt`, `coap`, `http`, ...
    pub transport: &'static str,
}

/// The metric families every transport shares, labelled by transport. Cloning shares them.
/// `Default` gives families that are not registered anywhere (for tests that do not read them).
#[derive(Debug, Clone, Default)]
pub struct TransportMetrics {
    connections_accepted: Family<TransportLabel, Counter>,
    connections_refused: Family<TransportLabel, Counter>,
    connections_open: Family<TransportLabel, Gauge>,
    messages_received: Family<TransportLabel, Counter>,
    messages_sent: Family<TransportLabel, Counter>,
    protocol_errors: Family<TransportLabel, Counter>,
    sessions_opened: Family<TransportLabel, Counter>,
    sessions_refused: Family<TransportLabel, Counter>,
    sessions_open: Family<TransportLabel, Gauge>,
    request_accept: Family<TransportLabel, Latency>,
    tls_handshakes: Family<TransportLabel, Counter>,
    tls_handshake_failures: Family<TlsFailureLabel, Counter>,
    messages_too_large: Family<TransportLabel, Counter>,
    keep_alive_timeouts: Family<TransportLabel, Counter>,
    connections_limited: Family<LimitLabel, Counter>,
    sessions_taken_over: Family<TransportLabel, Counter>,
    reads_throttled: Family<TransportLabel, Counter>,
}

/// The labels of a connection refused by a connection limit: the transport and which limit.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    /// The transport's name.
    pub transport: &'static str,
    /// `total`, `per_address` or `rate`.
    pub reason: &'static str,
}

/// The labels of a failed TLS handshake: the transport and why it failed.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsFailureLabel {
    /// The transport's name.
    pub transport: &'static str,
    /// Why: `timeout`, `not_tls`, `client_certificate_expired`, ... (a short fixed set).
    pub reason: &'static str,
}

impl TransportMetrics {
    /// Creates the shared families and registers them in `registry` (the process's registry,
    /// prefixed `fleetgate`) as `fleetgate_transport_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let r = registry.sub_registry_with_prefix("transport");
        let m = &metrics;
        r.register("connections_accepted", "Connections accepted", m.connections_accepted.clone());
        r.register(
            "connections_refused",
            "Connections refused at connect (credentials, protocol version)",
            m.connections_refused.clone(),
        );
        r.register("connections_open", "Connections open", m.connections_open.clone());
        r.register(
            "messages_received",
            "Messages received from devices",
            m.messages_received.clone(),
        );
        r.register(
            "messages_sent",
            "Responses and pushes sent to devices",
            m.messages_sent.clone(),
        );
        r.register(
            "protocol_errors",
            "Malformed packets and protocol violations",
            m.protocol_errors.clone(),
        );
        r.register("sessions_opened", "Gateway sessions opened", m.sessions_opened.clone());
        r.register(
            "sessions_refused",
            "Gateway sessions refused (credentials, authentication unavailable)",
            m.sessions_refused.clone(),
        );
        r.register(
            "sessions_open",
            "Peers with state (a session once they sent a request)",
            m.sessions_open.clone(),
        );
        r.register_with_unit(
            "request_accept",
            "From a device request read off the wire to the gateway's acceptance (on the bus, or refused)",
            prometheus_client::registry::Unit::Seconds,
            m.request_accept.clone(),
        );
        r.register("tls_handshakes", "TLS handshakes completed", m.tls_handshakes.clone());
        r.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by reason",
            m.tls_handshake_failures.clone(),
        );
        // MQTT's own two, shared here because four transports carry MQTT sessions (one family
        // each, labelled, rather than one registration per transport).
        r.register(
            "messages_too_large",
            "Responses over the client's maximum packet size, not sent",
            m.messages_too_large.clone(),
        );
        r.register(
            "keep_alive_timeouts",
            "Connections closed for keep-alive timeout",
            m.keep_alive_timeouts.clone(),
        );
        r.register(
            "connections_limited",
            "Connections closed at accept by a connection limit, by reason (total, per_address, rate)",
            m.connections_limited.clone(),
        );
        r.register(
            "sessions_taken_over",
            "MQTT sessions closed because a new CONNECT used their client id",
            m.sessions_taken_over.clone(),
        );
        r.register(
            "reads_throttled",
            "Times a connection's reads were paused by max_messages_per_sec or max_bytes_per_sec",
            m.reads_throttled.clone(),
        );
        metrics
    }

    /// The handles of `transport`. Only the families a transport touches show up for it.
    pub fn counters(&self, transport: &'static str) -> TransportCounters {
        TransportCounters { label: TransportLabel { transport }, families: self.clone() }
    }
}

/// One transport's labelled handles into [`TransportMetrics`]. A handle is created (and then
/// shows in `/metrics`) the first time it is asked for; keep the returned counter rather than
/// asking per message.
#[derive(Debug, Clone)]
pub struct TransportCounters {
    label: TransportLabel,
    families: TransportMetrics,
}

macro_rules! handles {
    ($($name:ident: $kind:ty),* $(,)?) => {
        impl TransportCounters {
            $(
                #[doc = concat!("`fleetgate_transport_", stringify!($name), "` of this transport.")]
                pub fn $name(&self) -> $kind {
                    self.families.$name.get_or_create_owned(&self.label)
                }
            )*
        }
    };
}

handles! {
    connections_accepted: Counter,
    connections_refused: Counter,
    connections_open: Gauge,
    messages_received: Counter,
    messages_sent: Counter,
    protocol_errors: Counter,
    sessions_opened: Counter,
    sessions_refused: Counter,
    sessions_open: Gauge,
    request_accept: Latency,
    tls_handshakes: Counter,
    messages_too_large: Counter,
    keep_alive_timeouts: Counter,
    sessions_taken_over: Counter,
    reads_throttled: Counter,
}

impl TransportCounters {
    /// `fleetgate_transport_connections_limited_total` of this transport for `reason`.
    pub fn connections_limited(&self, reason: &'static str) -> Counter {
        let label = LimitLabel { transport: self.label.transport, reason };
        self.families.connections_limited.get_or_create_owned(&label)
    }

    /// `fleetgate_transport_tls_handshake_failures_total` of this transport for `reason`.
    pub fn tls_handshake_failures(&self, reason: &'static str) -> Counter {
        let label = TlsFailureLabel { transport: self.label.transport, reason };
        self.families.tls_handshake_failures.get_or_create_owned(&label)
    }
}

/// The sub-registry where `transport` registers its own metrics: names get the prefix
/// `fleetgate_transport_` and samples the label `transport="<name>"`.
pub fn transport_registry<'r>(
    registry: &'r mut Registry,
    transport: &'static str,
) -> &'r mut Registry {
    registry
        .sub_registry_with_prefix("transport")
        .sub_registry_with_label(("transport".into(), transport.into()))
}

/// Upper bounds, in seconds, of [`Latency`]'s buckets: 50 µs to 10 s, about three per decade.
const LATENCY_BOUNDS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram that costs three relaxed atomic additions per observation and takes no
/// lock (`prometheus-client`'s own histogram takes a lock per observation, which every message
/// would pass through). Buckets from 50 µs to 10 s; exposed in seconds. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Latency {
    inner: Arc<LatencyInner>,
}

#[derive(Debug, Default)]
struct LatencyInner {
    /// Observations per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Latency {
    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let i = LATENCY_BOUNDS.iter().position(|&b| secs <= b).unwrap_or(LATENCY_BOUNDS.len());
        self.inner.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.inner.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.inner.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0, 0u64); LATENCY_BOUNDS.len() + 1];
        for (i, slot) in buckets.iter_mut().enumerate() {
            let bound = LATENCY_BOUNDS.get(i).copied().unwrap_or(f64::MAX);
            *slot = (bound, self.inner.buckets[i].load(Ordering::Relaxed));
        }
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.inner.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The OpenMetrics text of `registry` (what `/metrics` serves); for tests and tools.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::with_capacity(4096);
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_families_are_declared_once_with_a_label_per_transport() {
        let mut registry = Registry::with_prefix("fleetgate");
        let metrics = TransportMetrics::register(&mut registry);
        let mqtt = metrics.counters("mqtt");
        let http = metrics.counters("http");
        mqtt.messages_received().inc();
        http.messages_received().inc_by(3);
        let own = Counter::<u64>::default();
        transport_registry(&mut registry, "http").register("timeouts", "Timeouts", own.clone());
        own.inc();
        let text = encode(&registry);
        assert_eq!(text.matches("# TYPE fleetgate_transport_messages_received counter").count(), 1);
        assert!(text.contains("fleetgate_transport_messages_received_total{transport=\"mqtt\"} 1"));
        assert!(text.contains("fleetgate_transport_messages_received_total{transport=\"http\"} 3"));
        assert!(
            text.contains("fleetgate_transport_timeouts_total{transport=\"http\"} 1"),
            "{text}"
        );
        // Families nobody touched show no samples.
        assert!(!text.contains("fleetgate_transport_sessions_open{"));
    }

    #[test]
    fn latency_buckets_are_cumulative_in_seconds() {
        let mut registry = Registry::with_prefix("fleetgate");
        let latency = Latency::default();
        registry.register_with_unit(
            "latency",
            "A latency",
            prometheus_client::registry::Unit::Seconds,
            latency.clone(),
        );
        latency.observe(Duration::from_micros(30));
        latency.observe(Duration::from_millis(3));
        latency.observe(Duration::from_secs(60));
        assert_eq!(latency.count(), 3);
        let text = encode(&registry);
        assert!(text.contains("# TYPE fleetgate_latency_seconds histogram"), "{text}");
        assert!(text.contains("fleetgate_latency_seconds_bucket{le=\"0.00005\"} 1"), "{text}");
        assert!(text.contains("fleetgate_latency_seconds_bucket{le=\"0.005\"} 2"), "{text}");
        assert!(text.contains("fleetgate_latency_seconds_bucket{le=\"+Inf\"} 3"), "{text}");
        assert!(text.contains("fleetgate_latency_seconds_count 3"), "{text}");
    }
}
