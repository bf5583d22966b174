//! MQTT over TLS (`transports.mqtts`).

use std::net::SocketAddr;
use std::sync::Arc;

use fleetgate_tls::{TlsConfig, TlsServer, Versions};
use fleetgate_transport_core::metrics::{Registry, TransportMetrics};
use fleetgate_transport_core::{BindError, BoxFuture, KpHandler, Shutdown, Transport, net};
use fleetgate_transport_mqtt::server::{MqttConfig, MqttStreams};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::listener::{self, Conn};

const NAME: &str = "mqtts";
const SECTION: &str = "transports.mqtts";

/// `transports.mqtts`: MQTT over TLS. Session limits are those of `transports.mqtt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttsConfig {
    /// Whether to listen (off by default: it needs a certificate).
    pub enabled: bool,
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Share the port with other processes (SO_REUSEPORT).
    pub reuse_port: bool,
    /// Certificate, key, client CA (mTLS), reloads.
    pub tls: TlsConfig,
}

impl Default for MqttsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([0, 0, 0, 0], 8883)),
            reuse_port: false,
            tls: TlsConfig::default(),
        }
    }
}

impl MqttsConfig {
    /// Values out of range, as `(setting, what is wrong)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        self.tls.problems()
    }
}

/// The MQTT-over-TLS transport.
pub struct MqttsTransport {
    config: MqttsConfig,
    streams: MqttStreams,
    metrics: TransportMetrics,
    listener: Option<TcpListener>,
    tls: Option<TlsServer>,
}

impl MqttsTransport {
    /// The transport for `config`, its sessions configured by `mqtt`; [`Transport::bind`]
    /// loads the certificate and opens the listener.
    pub fn new(config: MqttsConfig, mqtt: MqttConfig, metrics: &TransportMetrics) -> Self {
        let streams = MqttStreams::new(NAME, mqtt, metrics);
        Self { config, streams, metrics: metrics.clone(), listener: None, tls: None }
    }

    /// The sessions' metrics.
    pub fn streams(&self) -> &MqttStreams {
        &self.streams
    }
}

/// A TLS configuration that cannot be loaded, as a start-up error naming the section.
pub(crate) fn tls_error(section: &str, addr: SocketAddr, e: fleetgate_tls::TlsError) -> BindError {
    BindError {
        setting: format!("{section}.tls"),
        addr,
        source: std::io::Error::other(e.to_string()),
    }
}

impl Transport for MqttsTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn config_section(&self) -> &'static str {
        SECTION
    }

    fn bind(&mut self) -> Result<(), BindError> {
        let listen = self.config.listen;
        let tls = TlsServer::load(
            &self.config.tls,
            Vec::new(),
            Versions::Tls12And13,
            NAME,
            &self.metrics,
        )
        .map_err(|e| tls_error(SECTION, listen, e))?;
        let listener = net::bind_tcp(listen, self.config.reuse_port)
            .map_err(|e| BindError::listen(SECTION, listen, e))?;
        self.tls = Some(tls);
        self.listener = Some(listener);
        Ok(())
    }

    fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listener.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    fn register_metrics(&self, _registry: &mut Registry) {
        // Its families are the shared ones (connections, messages, TLS handshakes, and the
        // MQTT session's keep-alive timeouts and responses too large).
    }

    fn serve(
        self: Box<Self>,
        handler: Arc<dyn KpHandler>,
        shutdown: Shutdown,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let (Some(listener), Some(tls)) = (self.listener, self.tls) else {
                tracing::error!("bug: the MQTT/TLS transport was served before it was bound");
                return;
            };
            let streams = self.streams.clone();
            let watch = tls.clone();
            listener::serve(
                listener,
                self.streams,
                Some(watch),
                handler,
                shutdown,
                move |tcp, c: Conn| {
                    let (tls, streams) = (tls.clone(), streams.clone());
                    async move {
                        // Failures are counted and logged (at debug) by `accept`.
                        let Ok(stream) = tls.accept(tcp).await else { return };
                        let certificate = tls.client_certificate(&stream);
                        let halves = tokio::io::split(stream);
                        streams.serve(c.handler, c.peer, certificate, halves, c.stop, c.live).await;
                    }
                },
            )
            .await;
        })
    }
}
