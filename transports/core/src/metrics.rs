//! Transport metrics on the process's one `prometheus-client` registry.
//!
//! The families every transport reports (connections, messages, protocol errors, sessions) are
//! declared once, here, with a `transport` label: [`TransportMetrics`] is registered once by the
//! binary and each transport takes its own labelled handles from it ([`TransportCounters`]).
//! A transport's own families (CoAP's retransmissions, HTTP's response classes) are registered
//! by the transport in [`crate::Transport::register_metrics`], under
//! [`transport_registry`]. Names follow DESIGN's `fleetgate_<area>_<what>_<unit>`.

use prometheus_client::encoding::EncodeLabelSet;
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
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
}
