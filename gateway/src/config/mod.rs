//! fleetgate's configuration tree (DESIGN "Conventions": YAML, `FLEETGATE_*` overrides,
//! unknown keys are errors, units in key names). Each service and transport owns its section's
//! type and says which of its values are out of range; the transports' sections are gathered
//! in [`crate::registry::TransportsConfig`].

pub mod loader;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use fleetgate_auth::AuthConfig;
use fleetgate_cmx::CmxConfig;
use fleetgate_communication::GatewayConfig;
use fleetgate_dcx::DcxConfig;
use fleetgate_ecr::EcrConfig;
use fleetgate_epts::{AppTimeSeries, EptsConfig, TimeSeriesConfig};
use fleetgate_storage::StorageConfig;
use fleetgate_transport_core::settings::below_minimum;
use serde::{Deserialize, Serialize};

use crate::registry::{TRANSPORTS, TransportsConfig};
use loader::{Checked, Problem};

/// The whole configuration of a fleetgate process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The NATS bus; unset `url` means the in-process bus.
    pub nats: NatsConfig,
    /// The in-process bus.
    pub bus: BusConfig,
    /// Health, readiness and metrics over HTTP.
    pub admin: AdminConfig,
    /// Device transports.
    pub transports: TransportsConfig,
    /// The communication service.
    pub gateway: GatewayConfig,
    /// The data collection extension.
    pub dcx: DcxConfig,
    /// The 16/ECAP provider.
    pub auth: AuthConfig,
    /// Log lines: filter and format.
    pub log: LogConfig,
    /// Shutdown.
    pub process: ProcessConfig,
    /// Applications: their app versions and time-series settings.
    pub applications: BTreeMap<String, ApplicationConfig>,
    /// Where services that keep data (EPTS) keep it.
    pub storage: StorageConfig,
    /// Endpoint time series.
    pub epts: EptsConfig,
    /// Endpoint configuration repository.
    pub ecr: EcrConfig,
    /// Configuration management extension.
    pub cmx: CmxConfig,
}

/// `applications.<app>`: an application as Kaa configures one, in snake case.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApplicationConfig {
    /// Its app versions (the names devices use in 1/KP topics).
    pub versions: Vec<String>,
    /// How EPTS makes time series of its data samples.
    pub time_series: TimeSeriesConfig,
}

impl Config {
    /// The applications as EPTS serves them.
    pub fn time_series_apps(&self) -> BTreeMap<String, AppTimeSeries> {
        self.applications
            .iter()
            .map(|(name, app)| {
                let app = AppTimeSeries {
                    versions: app.versions.clone(),
                    time_series: app.time_series.clone(),
                };
                (name.clone(), app)
            })
            .collect()
    }
}

impl Checked for Config {
    fn problems(&self) -> Vec<Problem> {
        let nats = &self.nats;
        let mut problems = Problem::within(
            "nats",
            below_minimum(&[
                ("publish_capacity", nats.publish_capacity as u64, 1),
                ("subscription_capacity", nats.subscription_capacity as u64, 1),
                ("connect_timeout_ms", nats.connect_timeout_ms, 1),
                ("publish_batch", nats.publish_batch as u64, 1),
                ("health_probe_interval_ms", nats.health_probe_interval_ms, 1),
                ("health_probe_timeout_ms", nats.health_probe_timeout_ms, 1),
            ]),
        );
        problems.extend(Problem::within(
            "bus",
            below_minimum(&[("in_process_capacity", self.bus.in_process_capacity as u64, 1)]),
        ));
        for transport in TRANSPORTS {
            let section = format!("transports.{}", transport.name);
            problems.extend(Problem::within(&section, (transport.problems)(&self.transports)));
        }
        problems.extend(Problem::within("gateway", self.gateway.problems()));
        problems.extend(Problem::within("dcx", self.dcx.problems()));
        problems.extend(Problem::within("auth", self.auth.problems()));
        problems.extend(Problem::within("epts", self.epts.problems()));
        problems.extend(Problem::within("ecr", self.ecr.problems()));
        problems.extend(Problem::within("cmx", self.cmx.problems()));
        for (key, message) in fleetgate_epts::application_problems(&self.time_series_apps()) {
            problems.push(Problem { key: format!("applications.{key}"), message });
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            let message = format!("not a log filter: {e}");
            problems.push(Problem { key: "log.filter".into(), message });
        }
        problems
    }
}

/// `nats.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// `nats://host:port` (several comma-separated); unset: the in-process bus.
    pub url: Option<String>,
    /// Outgoing messages buffered before publishing waits (backpressure to devices).
    pub publish_capacity: usize,
    /// Incoming messages buffered per subscription.
    pub subscription_capacity: usize,
    /// Time allowed for the first connection, tried again with backoff meanwhile (in a
    /// cluster NATS may come up after the gateway); start-up fails after it.
    pub connect_timeout_ms: u64,
    /// The shortest time between two batches written to NATS: under load a batch waits out
    /// the rest of it for more messages; after a quiet spell a message goes at once (0: no
    /// wait beyond one scheduler round). Larger batches cost nats-server and the gateway less
    /// CPU per message, for up to this much latency (BENCHMARKS.md has the trade measured).
    pub publish_linger_ms: u64,
    /// A batch of this many messages is written at once, without waiting out the linger.
    pub publish_batch: usize,
    /// How often a round trip through the server checks that NATS answers.
    pub health_probe_interval_ms: u64,
    /// A round trip slower than this makes the bus unhealthy: `/readyz` fails and the gateway
    /// spools instead of publishing, until one comes back in time.
    pub health_probe_timeout_ms: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: None,
            publish_capacity: 8192,
            subscription_capacity: 65_536,
            connect_timeout_ms: 30_000,
            publish_linger_ms: 0,
            publish_batch: 256,
            health_probe_interval_ms: 1000,
            health_probe_timeout_ms: 2000,
        }
    }
}

/// `bus.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// Messages buffered per in-process subscription before publishers wait.
    pub in_process_capacity: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self { in_process_capacity: 4096 }
    }
}

/// `admin.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Whether to serve `/healthz`, `/readyz` and `/metrics`.
    pub enabled: bool,
    /// Address and port of the admin HTTP server. Loopback by default: `/metrics` and the REST
    /// APIs are for operators, so exposing them (0.0.0.0 in a container) is a choice to make.
    pub listen: SocketAddr,
    /// Bearer tokens the REST APIs accept; empty: no token needed.
    pub api_tokens: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8008)),
            api_tokens: Vec::new(),
        }
    }
}

/// `log.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `fleetgate=debug,info`; `RUST_LOG` wins when set.
    pub filter: String,
    /// `text` (one line per event, coloured on a terminal unless `NO_COLOR` is set) or `json`
    /// (one JSON object per line, for log collectors).
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`.
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { filter: "info".into(), format: LogFormat::Text }
    }
}

/// `process.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessConfig {
    /// On SIGTERM, how long to keep serving requests already in flight (readiness is already
    /// failing) before closing connections.
    pub drain_timeout_ms: u64,
    /// How often the configuration file is checked for changes, which are then applied like
    /// on SIGHUP; 0: only on SIGHUP.
    pub config_check_interval_ms: u64,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self { drain_timeout_ms: 5000, config_check_interval_ms: 2000 }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::loader::{ConfigSource, load};
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn issue_settings_exist_under_their_names() {
        let vars = env(&[
            ("FLEETGATE_TRANSPORTS_MQTT_LISTEN", "127.0.0.1:11883"),
            ("FLEETGATE_ADMIN_LISTEN", "127.0.0.1:18008"),
            ("FLEETGATE_NATS_URL", "nats://nats:4222"),
            ("FLEETGATE_AUTH_AUTO_REGISTER", "true"),
            ("FLEETGATE_AUTH_ENDPOINTS", "[{app_version: demo-v1, token: t1, endpoint_id: e1}]"),
            ("FLEETGATE_DCX_RELIABLE_RECEIVERS", "[epts]"),
            ("FLEETGATE_DCX_RECEIVER_TIMEOUT_MS", "250"),
        ]);
        let c: Config = load(&ConfigSource::BuiltInDefaults, &vars).expect("valid");
        assert_eq!(c.transports.mqtt.listen, "127.0.0.1:11883".parse().expect("addr"));
        assert_eq!(c.admin.listen, "127.0.0.1:18008".parse().expect("addr"));
        assert_eq!(c.nats.url.as_deref(), Some("nats://nats:4222"));
        assert!(c.auth.auto_register);
        assert_eq!(c.auth.endpoints.len(), 1);
        assert_eq!(c.auth.endpoints[0].endpoint_id, "e1");
        assert_eq!(c.dcx.reliable_receivers, ["epts"]);
        assert_eq!(c.dcx.receiver_timeout_ms, 250);
    }

    #[test]
    fn shipped_config_files_load() {
        let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let example: Config =
            load(&ConfigSource::File(deploy.join("fleetgate.example.yml")), &HashMap::new())
                .expect("the example configuration loads");
        assert_eq!(example, Config::default(), "the example lists every default");
        load::<Config>(
            &ConfigSource::File(deploy.join("kubernetes/service-config.yml")),
            &HashMap::new(),
        )
        .expect("the Kubernetes configuration loads");
    }

    #[test]
    fn unknown_key_is_named() {
        let dir =
            std::env::temp_dir().join(format!("fleetgate-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("c.yml");
        std::fs::write(&path, "transports:\n  mqtt:\n    listn: 0.0.0.0:1\n").expect("write");
        let err =
            load::<Config>(&ConfigSource::File(path), &HashMap::new()).expect_err("unknown key");
        assert!(err.to_string().contains("transports.mqtt.listn"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
