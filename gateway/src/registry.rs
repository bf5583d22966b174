//! The registries: every device transport and every service this binary can run, each made
//! from its configuration section. Adding a transport or a service means its crate, its entry
//! here and its configuration section (a field below, or of [`crate::config::Config`]):
//! nothing else in the binary names them.

use fleetgate_auth::AuthService;
use fleetgate_cmx::CmxService;
use fleetgate_dcx::DcxService;
use fleetgate_ecr::EcrService;
use fleetgate_epts::EptsService;
use fleetgate_service::Service;
use fleetgate_transport_coap::{CoapConfig, CoapTransport};
use fleetgate_transport_core::Transport;
use fleetgate_transport_core::metrics::TransportMetrics;
use fleetgate_transport_http::{HttpConfig, HttpTransport};
use fleetgate_transport_mqtt::server::{MqttConfig, MqttTransport};
use fleetgate_transport_mqtt_secure::{MqttWsConfig, MqttWsTransport, MqttsConfig, MqttsTransport};
use fleetgate_transport_quic::{QuicConfig, QuicTransport};
use fleetgate_transport_udp::{UdpConfig, UdpTransport};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::gateway_service::GatewayService;
use crate::reload::{Keys, Reloads};

/// `transports.*`: one section per registered transport.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportsConfig {
    /// MQTT 3.1.1 and 5.0 over TCP.
    pub mqtt: MqttConfig,
    /// CoAP over UDP.
    pub coap: CoapConfig,
    /// HTTP/1.1 and h2c.
    pub http: HttpConfig,
    /// FGU/1, the compact encrypted UDP protocol.
    pub udp: UdpConfig,
    /// MQTT over TLS (sessions configured by `mqtt`).
    pub mqtts: MqttsConfig,
    /// MQTT over WebSocket, plain or TLS (sessions configured by `mqtt`).
    pub mqtt_ws: MqttWsConfig,
    /// MQTT over QUIC (sessions configured by `mqtt`).
    pub mqtt_quic: QuicConfig,
}

/// A device transport the binary can serve.
pub struct TransportEntry {
    /// Its name (the metrics label, its section under `transports`).
    pub name: &'static str,
    /// Makes it from the configuration, or `None` when its section disables it; what it can
    /// change while running it adds to the reloads.
    pub make: fn(&TransportsConfig, &TransportMetrics, &mut Reloads) -> Option<Box<dyn Transport>>,
    /// Its section's values out of range, as `(setting, what is wrong)`.
    pub problems: fn(&TransportsConfig) -> Vec<(&'static str, String)>,
}

/// Every device transport, in the order they are bound.
pub const TRANSPORTS: &[TransportEntry] = &[
    TransportEntry {
        name: "mqtt",
        make: |c, m, r| {
            if !c.mqtt.enabled {
                return None;
            }
            let t = MqttTransport::new(c.mqtt.clone(), m);
            r.follow("transports.mqtt", STARTED_WITH, t.settings(), |c| &c.transports.mqtt);
            Some(boxed(t))
        },
        problems: |c| c.mqtt.problems(),
    },
    TransportEntry {
        name: "coap",
        make: |c, m, r| {
            if !c.coap.enabled {
                return None;
            }
            let t = CoapTransport::new(c.coap.clone(), m);
            let keys = Keys::AllBut(&["enabled", "listen", "reuse_port", "peer_queue_capacity"]);
            r.follow("transports.coap", keys, t.settings(), |c| &c.transports.coap);
            Some(boxed(t))
        },
        problems: |c| c.coap.problems(),
    },
    TransportEntry {
        name: "http",
        make: |c, m, r| {
            if !c.http.enabled {
                return None;
            }
            let t = HttpTransport::new(c.http.clone(), m);
            let keys = Keys::AllBut(&["enabled", "listen", "reuse_port", "max_connections"]);
            r.follow("transports.http", keys, t.settings(), |c| &c.transports.http);
            Some(boxed(t))
        },
        problems: |c| c.http.problems(),
    },
    TransportEntry {
        // Its settings apply at the next start (a reload names them in its warning).
        name: "udp",
        make: |c, m, _| c.udp.enabled.then(|| boxed(UdpTransport::new(c.udp.clone(), m))),
        problems: |c| c.udp.problems(),
    },
    TransportEntry {
        name: "mqtts",
        make: |c, m, r| {
            if !c.mqtts.enabled {
                return None;
            }
            let t = MqttsTransport::new(c.mqtts.clone(), c.mqtt.clone(), m);
            r.follow("transports.mqtt", STARTED_WITH, t.streams().settings(), |c| {
                &c.transports.mqtt
            });
            Some(boxed(t))
        },
        problems: |c| c.mqtts.problems(),
    },
    TransportEntry {
        name: "mqtt_ws",
        make: |c, m, r| {
            if !c.mqtt_ws.enabled {
                return None;
            }
            let t = MqttWsTransport::new(c.mqtt_ws.clone(), c.mqtt.clone(), m);
            r.follow("transports.mqtt", STARTED_WITH, t.streams().settings(), |c| {
                &c.transports.mqtt
            });
            Some(boxed(t))
        },
        problems: |c| c.mqtt_ws.problems(),
    },
    TransportEntry {
        name: "mqtt_quic",
        make: |c, m, r| {
            if !c.mqtt_quic.enabled {
                return None;
            }
            let t = QuicTransport::new(c.mqtt_quic.clone(), c.mqtt.clone(), m);
            r.follow("transports.mqtt", STARTED_WITH, t.streams().settings(), |c| {
                &c.transports.mqtt
            });
            Some(boxed(t))
        },
        problems: |c| c.mqtt_quic.problems(),
    },
];

fn boxed(transport: impl Transport) -> Box<dyn Transport> {
    Box::new(transport)
}

/// The settings of a transport that stay as it started: its listener. The MQTT over TLS,
/// WebSocket and QUIC transports follow `transports.mqtt` for their sessions; their own
/// sections apply at the next start, but for their certificates, which reload themselves when
/// the files change.
const STARTED_WITH: Keys = Keys::AllBut(&["enabled", "listen", "reuse_port"]);

/// A service the binary can run: `fleetgate <name>` runs it alone (on NATS), `fleetgate up`
/// runs every one.
pub struct ServiceEntry {
    /// Its command name.
    pub name: &'static str,
    /// One line for `--help`.
    pub about: &'static str,
    /// Makes it from the configuration; what it can change while running it adds to the
    /// reloads.
    pub make: fn(&Config, &TransportMetrics, &mut Reloads) -> Box<dyn Service>,
}

/// Every service, in the order `fleetgate up` starts them: providers first, so that the
/// gateway's first devices find them running.
pub const SERVICES: &[ServiceEntry] = &[
    ServiceEntry {
        name: "auth",
        about: "Run the 16/ECAP authentication provider (needs nats.url)",
        make: |c, _, r| {
            let auth = AuthService::new(c.auth.clone());
            r.follow("auth", Keys::AllBut(&["instance"]), auth.settings(), |c| &c.auth);
            Box::new(auth)
        },
    },
    ServiceEntry {
        name: "dcx",
        about: "Run the data collection extension (needs nats.url)",
        make: |c, _, _| Box::new(DcxService::new(c.dcx.clone())),
    },
    ServiceEntry {
        name: "epts",
        about: "Run the endpoint time-series service and its REST API (needs nats.url)",
        // Its settings (applications' extraction, storage) apply at the next start.
        make: |c, _, _| {
            Box::new(EptsService::new(c.epts.clone(), c.storage.clone(), c.time_series_apps()))
        },
    },
    ServiceEntry {
        name: "ecr",
        about: "Run the endpoint configuration repository and its REST API (needs nats.url)",
        // `ecr.filters` applies live; the rest at the next start.
        make: |c, _, r| {
            let ecr = EcrService::new(c.ecr.clone(), c.storage.clone());
            r.follow("ecr", Keys::Only(&["filters"]), ecr.filters(), |c| &c.ecr.filters);
            Box::new(ecr)
        },
    },
    ServiceEntry {
        name: "cmx",
        about: "Run the configuration management extension (7/CMP; needs nats.url)",
        make: |c, _, _| Box::new(CmxService::new(c.cmx.clone())),
    },
    ServiceEntry {
        name: "gateway",
        about: "Run the communication service and its device transports (needs nats.url)",
        make: |c, m, r| Box::new(GatewayService::new(c, m, r)),
    },
];

/// The service named `name`.
pub fn service(name: &str) -> Option<&'static ServiceEntry> {
    SERVICES.iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use fleetgate_transport_core::metrics::{Registry, encode};

    use super::*;

    #[test]
    fn names_are_unique() {
        let mut names: Vec<_> = SERVICES.iter().map(|s| s.name).collect();
        names.extend(["up", "config", "keygen"]);
        let before = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), before, "a service name clashes with another command");
        let mut transports: Vec<_> = TRANSPORTS.iter().map(|t| t.name).collect();
        transports.sort_unstable();
        transports.dedup();
        assert_eq!(transports.len(), TRANSPORTS.len());
    }

    #[tokio::test]
    async fn every_metric_family_is_declared_once() {
        let config = Config::default();
        let mut registry = Registry::with_prefix("fleetgate");
        let shared = TransportMetrics::register(&mut registry);
        for entry in SERVICES {
            (entry.make)(&config, &shared, &mut Reloads::default()).register_metrics(&mut registry);
        }
        // Touch the shared families for every transport, so that each shows its samples.
        for t in TRANSPORTS {
            shared.counters(t.name).messages_received().inc();
        }
        let text = encode(&registry);
        let mut families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert!(families.len() > 30, "{text}");
        let before = families.len();
        families.sort_unstable();
        families.dedup();
        assert_eq!(families.len(), before, "a metric family is declared twice:\n{text}");
        assert!(families.iter().all(|f| f.starts_with("fleetgate_")), "{families:?}");
        for t in TRANSPORTS {
            let sample = format!(
                "fleetgate_transport_messages_received_total{{transport=\"{}\"}} 1",
                t.name
            );
            assert!(text.contains(&sample), "{sample} in\n{text}");
        }
    }
}
