//! The communication service's metrics (`fleetgate_gateway_*`).

use fleetgate_transport_core::metrics::{Counter, Family, Gauge, Latency, Registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::registry::Unit;

/// The `status` label of refused requests: why they were refused (DESIGN decision 3).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StatusLabel {
    pub(crate) status: u16,
}

/// The `reason` label of authentication refusals.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    pub(crate) reason: &'static str,
}

/// The `extension` label of the request latency.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ExtensionLabel {
    pub(crate) extension: String,
}

/// Counters, gauges and the request latency. Cloning shares them.
#[derive(Debug, Clone, Default)]
pub struct GatewayMetrics {
    pub(crate) requests: Counter,
    pub(crate) rejected: Family<StatusLabel, Counter>,
    pub(crate) responses: Counter,
    pub(crate) pushes: Counter,
    pub(crate) copies: Counter,
    pub(crate) timeouts: Counter,
    pub(crate) undeliverable: Counter,
    pub(crate) slow_sessions: Counter,
    pub(crate) sessions_opened: Counter,
    pub(crate) sessions_refused: Counter,
    pub(crate) sessions_revoked: Counter,
    pub(crate) auth_refusals: Family<ReasonLabel, Counter>,
    pub(crate) auth_backoffs: Counter,
    pub(crate) token_cache_misses: Counter,
    pub(crate) subscriptions_refused: Counter,
    pub(crate) sessions_open: Gauge,
    pub(crate) requests_pending: Gauge,
    pub(crate) spooled: Counter,
    pub(crate) spool_forwarded: Counter,
    pub(crate) spool_full: Counter,
    pub(crate) spool_delivery_timeouts: Counter,
    pub(crate) spool_replay_timeouts: Counter,
    pub(crate) spool_replay_refusals: Counter,
    pub(crate) spool_messages: Gauge,
    pub(crate) spool_bytes: Gauge,
    pub(crate) spool_oldest_age_ms: Gauge,
    /// From a request's `ClientData` on the bus to its `ExtensionData` (or the timeout).
    pub(crate) request_duration: Family<ExtensionLabel, Latency>,
}

impl GatewayMetrics {
    /// Registers every metric under `fleetgate_gateway_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("gateway");
        let counters = [
            ("requests", "1/KP requests received", &self.requests),
            ("responses", "Extension answers routed to the requesting session", &self.responses),
            ("pushes", "Extension pushes routed to sessions", &self.pushes),
            ("subscriber_copies", "Responses and pushes copied to subscribers", &self.copies),
            ("request_timeouts", "Requests an extension did not answer in time", &self.timeouts),
            ("undeliverable", "Answers for sessions that have gone", &self.undeliverable),
            ("slow_sessions_closed", "Sessions closed for not reading", &self.slow_sessions),
            ("sessions_opened", "Sessions opened", &self.sessions_opened),
            ("sessions_refused", "Sessions refused by authentication", &self.sessions_refused),
            (
                "sessions_revoked",
                "Sessions ended by a 16/ECAP token or credential revocation",
                &self.sessions_revoked,
            ),
            ("token_cache_misses", "Token validations sent to 16/ECAP", &self.token_cache_misses),
            (
                "subscriptions_refused",
                "Subscriptions refused: the session had max_subscriptions_per_session",
                &self.subscriptions_refused,
            ),
        ];
        for (name, help, counter) in counters {
            r.register(name, help, counter.clone());
        }
        r.register(
            "auth_refusals",
            "Authentication refusals (tokens and client credentials), by reason",
            self.auth_refusals.clone(),
        );
        r.register(
            "auth_backoffs",
            "Back-offs started for a source address after too many failed authentications",
            self.auth_backoffs.clone(),
        );
        r.register(
            "requests_rejected",
            "Requests refused before reaching an extension, by status (none of them acknowledged)",
            self.rejected.clone(),
        );
        r.register("sessions_open", "Sessions open", self.sessions_open.clone());
        r.register(
            "requests_pending",
            "Requests awaiting an extension (sampled every 50 ms)",
            self.requests_pending.clone(),
        );
        let spool_counters = [
            (
                "spooled",
                "Requests written to the spool (and acknowledged as stored)",
                &self.spooled,
            ),
            (
                "spool_forwarded",
                "Spooled requests delivered (their extension answered)",
                &self.spool_forwarded,
            ),
            (
                "spool_full",
                "Times a request found the spool full and had to wait (not acknowledged)",
                &self.spool_full,
            ),
            (
                "spool_delivery_timeouts",
                "Requests not answered within the delivery timeout, then spooled",
                &self.spool_delivery_timeouts,
            ),
            (
                "spool_replay_timeouts",
                "Replays of spooled requests not answered in time (replayed again)",
                &self.spool_replay_timeouts,
            ),
            (
                "spool_replay_refusals",
                "Spooled requests their extension answered with a 5xx status (kept, replayed again \
                 after a back-off)",
                &self.spool_replay_refusals,
            ),
        ];
        for (name, help, counter) in spool_counters {
            r.register(name, help, counter.clone());
        }
        r.register("spool_messages", "Requests in the spool", self.spool_messages.clone());
        r.register("spool_bytes", "Bytes the spool holds", self.spool_bytes.clone());
        r.register(
            "spool_oldest_age_ms",
            "Age of the oldest spooled request, milliseconds (0: empty)",
            self.spool_oldest_age_ms.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "From a request's ClientData on the bus to the extension's answer or the timeout",
            Unit::Seconds,
            self.request_duration.clone(),
        );
    }

    /// Counts a request refused with `status`.
    pub(crate) fn rejected(&self, status: u16) {
        self.rejected.get_or_create(&StatusLabel { status }).inc();
    }

    /// Counts an authentication refused for `reason`.
    pub(crate) fn auth_refused(&self, reason: &'static str) {
        self.auth_refusals.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// The request latency of `extension`.
    pub(crate) fn request_duration_of(&self, extension: &str) -> Latency {
        self.request_duration.get_or_create_owned(&ExtensionLabel { extension: extension.into() })
    }
}
