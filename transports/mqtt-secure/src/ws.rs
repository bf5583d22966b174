//! MQTT over WebSocket (`transports.mqtt_ws`), plain or over TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use fleetgate_tls::{TlsConfig, TlsServer, Versions};
use fleetgate_transport_core::metrics::{Registry, TransportMetrics};
use fleetgate_transport_core::settings::below_minimum;
use fleetgate_transport_core::{
    BindError, BoxFuture, ClientCertificate, KpHandler, Shutdown, Transport, net,
};
use fleetgate_transport_mqtt::server::{MqttConfig, MqttStreams};
use fleetgate_websocket::{WsStream, handshake};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::listener::{self, Conn};
use crate::mqtts::tls_error;

const NAME: &str = "mqtt_ws";
const SECTION: &str = "transports.mqtt_ws";

/// Subprotocols served, preferred first: `mqtt` (MQTT 3.1.1 and 5), and `mqttv3.1`, which
/// older paho JavaScript clients offer.
const PROTOCOLS: &[&str] = &["mqtt", "mqttv3.1"];

/// `transports.mqtt_ws`: MQTT over WebSocket. Session limits are those of `transports.mqtt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttWsConfig {
    /// Whether to listen.
    pub enabled: bool,
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Share the port with other processes (SO_REUSEPORT).
    pub reuse_port: bool,
    /// The one path upgrades are accepted at; any other is 404.
    pub path: String,
    /// Time a connection has to send its upgrade request (after the TLS handshake).
    pub upgrade_timeout_ms: u64,
    /// WebSocket over TLS (`wss://`) with the `tls` section.
    pub tls_enabled: bool,
    /// Certificate, key, client CA (mTLS), reloads; read when `tls_enabled`.
    pub tls: TlsConfig,
}

impl Default for MqttWsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([0, 0, 0, 0], 8083)),
            reuse_port: false,
            path: "/mqtt".to_owned(),
            upgrade_timeout_ms: 10_000,
            tls_enabled: false,
            tls: TlsConfig::default(),
        }
    }
}

impl MqttWsConfig {
    /// Values out of range, as `(setting, what is wrong)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = below_minimum(&[("upgrade_timeout_ms", self.upgrade_timeout_ms, 1)]);
        if !self.path.starts_with('/') {
            problems.push(("path", format!("{:?} must start with /", self.path)));
        }
        if self.tls_enabled {
            problems.extend(self.tls.problems());
        }
        problems
    }
}

/// The MQTT-over-WebSocket transport.
pub struct MqttWsTransport {
    config: MqttWsConfig,
    streams: MqttStreams,
    metrics: TransportMetrics,
    /// Largest WebSocket frame payload: the largest MQTT packet.
    max_frame: u64,
    listener: Option<TcpListener>,
    tls: Option<TlsServer>,
}

impl MqttWsTransport {
    /// The transport for `config`, its sessions configured by `mqtt`.
    pub fn new(config: MqttWsConfig, mqtt: MqttConfig, metrics: &TransportMetrics) -> Self {
        let max_frame = u64::from(mqtt.max_packet_size_bytes);
        let streams = MqttStreams::new(NAME, mqtt, metrics);
        Self { config, streams, metrics: metrics.clone(), max_frame, listener: None, tls: None }
    }

    /// The sessions' metrics.
    pub fn streams(&self) -> &MqttStreams {
        &self.streams
    }
}

impl Transport for MqttWsTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn config_section(&self) -> &'static str {
        SECTION
    }

    fn bind(&mut self) -> Result<(), BindError> {
        let listen = self.config.listen;
        if self.config.tls_enabled {
            let tls = TlsServer::load(
                &self.config.tls,
                Vec::new(),
                Versions::Tls12And13,
                NAME,
                &self.metrics,
            )
            .map_err(|e| tls_error(SECTION, listen, e))?;
            self.tls = Some(tls);
        }
        let listener = net::bind_tcp(listen, self.config.reuse_port)
            .map_err(|e| BindError::listen(SECTION, listen, e))?;
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
            let Some(listener) = self.listener else {
                tracing::error!("bug: the MQTT/WebSocket transport was served before it was bound");
                return;
            };
            let upgrade = Arc::new(Upgrade {
                path: self.config.path.clone(),
                timeout: Duration::from_millis(self.config.upgrade_timeout_ms),
                max_frame: self.max_frame,
                streams: self.streams.clone(),
            });
            let tls = self.tls.clone();
            listener::serve(
                listener,
                self.streams,
                self.tls,
                handler,
                shutdown,
                move |tcp, c: Conn| {
                    let (tls, upgrade) = (tls.clone(), upgrade.clone());
                    async move {
                        match tls {
                            None => upgrade.run(tcp, None, c).await,
                            Some(tls) => {
                                let Ok(stream) = tls.accept(tcp).await else { return };
                                let certificate = tls.client_certificate(&stream);
                                upgrade.run(stream, certificate, c).await;
                            }
                        }
                    }
                },
            )
            .await;
        })
    }
}

/// The upgrade step and what it hands the connection to.
struct Upgrade {
    path: String,
    timeout: Duration,
    max_frame: u64,
    streams: MqttStreams,
}

impl Upgrade {
    /// Reads the upgrade request from `io` (the TCP socket of `c`, or the TLS stream over it
    /// and the client certificate it verified), answers it, and serves MQTT on the WebSocket
    /// until the connection ends.
    async fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        mut io: S,
        certificate: Option<ClientCertificate>,
        c: Conn,
    ) {
        let mut buf = BytesMut::with_capacity(1024);
        let read = async {
            loop {
                if io.read_buf(&mut buf).await? == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                }
                match handshake::accept(&buf, &self.path, PROTOCOLS) {
                    Ok(None) => continue,
                    Ok(Some(upgrade)) => return Ok(Ok(upgrade)),
                    Err(e) => return Ok(Err(e)),
                }
            }
        };
        let upgrade = match tokio::time::timeout(self.timeout, read).await {
            Ok(Ok(Ok(upgrade))) => upgrade,
            Ok(Ok(Err(refused))) => {
                tracing::debug!(peer = %c.peer, error = %refused, "WebSocket upgrade refused");
                self.streams.metrics().connections_refused.inc();
                let _ = io.write_all(&refused.response()).await;
                let _ = io.shutdown().await;
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(peer = %c.peer, error = %e, "connection closed before its upgrade");
                return;
            }
            Err(_) => {
                tracing::debug!(peer = %c.peer, "no upgrade request in time");
                return;
            }
        };
        if io.write_all(&upgrade.response).await.is_err() || io.flush().await.is_err() {
            return;
        }
        // The first frame carries CONNECT: it gets the smaller limit of a peer that has proven
        // nothing yet.
        let first_frame = u64::from(self.streams.settings().read().max_connect_packet_size_bytes);
        let ws = WsStream::new(io, &buf[upgrade.consumed..], self.max_frame)
            .with_first_frame_limit(first_frame);
        let halves = tokio::io::split(ws);
        self.streams.serve(c.handler, c.peer, certificate, halves, c.stop, c.live).await;
    }
}
