//! MQTT over QUIC (`transports.mqtt_quic`, UDP 14567), compatible with EMQX's single-stream
//! mode: ALPN `mqtt`, TLS 1.3; the client opens one bidirectional stream and it carries
//! ordinary MQTT bytes, run by the MQTT transport's own session unchanged
//! ([`fleetgate_transport_mqtt::server::MqttStreams`]); the end of that stream (either side)
//! ends the connection, as a TCP close would. 0-RTT is off: early data is replayable and an
//! MQTT PUBLISH is not idempotent.
//!
//! The peer may open one bidirectional stream and no unidirectional ones (EMQX's
//! single-stream limits); multi-stream mode is not supported. Certificates come from
//! `fleetgate-tls` and are reloaded into the endpoint for new connections. This crate knows
//! nothing of the bus.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleetgate_tls::rustls::pki_types::CertificateDer;
use fleetgate_tls::{HandshakeFailure, TlsConfig, TlsServer, Versions};
use fleetgate_transport_core::metrics::{Registry, TransportMetrics};
use fleetgate_transport_core::settings::{above_maximum, below_minimum};
use fleetgate_transport_core::{BindError, BoxFuture, KpHandler, Shutdown, Transport, stopped};
use fleetgate_transport_mqtt::server::{MqttConfig, MqttStreams};
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{ConnectionError, TransportErrorCode, VarInt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

const NAME: &str = "mqtt_quic";
const SECTION: &str = "transports.mqtt_quic";

/// How long a closing connection waits for the client to take the last bytes of its stream.
const LAST_WORDS: Duration = Duration::from_secs(2);

/// The ALPN protocol EMQX and its clients use.
pub const ALPN: &[u8] = b"mqtt";

/// `transports.mqtt_quic`: MQTT over QUIC. Session limits are those of `transports.mqtt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuicConfig {
    /// Whether to listen (off by default: it needs a certificate).
    pub enabled: bool,
    /// Address and UDP port to listen on.
    pub listen: SocketAddr,
    /// A connection with no packets for this long is closed (QUIC idle timeout). Keep it
    /// above 1.5 × the longest MQTT keep-alive clients use, or they must send QUIC pings.
    pub idle_timeout_ms: u64,
    /// Certificate, key, client CA (mTLS), reloads. TLS 1.3 only.
    pub tls: TlsConfig,
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([0, 0, 0, 0], 14567)),
            idle_timeout_ms: 300_000,
            tls: TlsConfig::default(),
        }
    }
}

impl QuicConfig {
    /// Values out of range, as `(setting, what is wrong)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = below_minimum(&[("idle_timeout_ms", self.idle_timeout_ms, 1)]);
        // QUIC's idle timeout is a varint of milliseconds.
        problems.extend(above_maximum("idle_timeout_ms", self.idle_timeout_ms, (1 << 62) - 1));
        problems.extend(self.tls.problems());
        problems
    }
}

/// The MQTT-over-QUIC transport.
pub struct QuicTransport {
    config: QuicConfig,
    streams: MqttStreams,
    metrics: TransportMetrics,
    endpoint: Option<(quinn::Endpoint, TlsServer)>,
}

impl QuicTransport {
    /// The transport for `config`, its sessions configured by `mqtt`.
    pub fn new(config: QuicConfig, mqtt: MqttConfig, metrics: &TransportMetrics) -> Self {
        let streams = MqttStreams::new(NAME, mqtt, metrics);
        Self { config, streams, metrics: metrics.clone(), endpoint: None }
    }

    /// The sessions' metrics.
    pub fn streams(&self) -> &MqttStreams {
        &self.streams
    }
}

/// Bytes a peer may have in flight unread, per stream and per connection.
const QUIC_RECEIVE_WINDOW: u32 = 64 * 1024;

/// quinn's server configuration around a rustls one.
fn server_config(
    config: &QuicConfig,
    tls: Arc<fleetgate_tls::rustls::ServerConfig>,
) -> Option<quinn::ServerConfig> {
    let crypto = QuicServerConfig::try_from(tls).ok()?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // EMQX single-stream mode: one client bidirectional stream, no unidirectional ones.
    transport.max_concurrent_bidi_streams(VarInt::from_u32(1));
    transport.max_concurrent_uni_streams(VarInt::from_u32(0));
    // What a peer may send that the session has not read yet (quinn's default is 1.25 MB):
    // before CONNECT is through the session reads little, so this is what an unauthenticated
    // peer could make the connection hold (issue 15). 64 KiB still keeps a busy connection's
    // pipe full at LAN round trips; a larger packet streams through it as it is read.
    transport.stream_receive_window(VarInt::from_u32(QUIC_RECEIVE_WINDOW));
    transport.receive_window(VarInt::from_u32(QUIC_RECEIVE_WINDOW));
    let idle = VarInt::from_u64(config.idle_timeout_ms).ok()?;
    transport.max_idle_timeout(Some(idle.into()));
    server.transport_config(Arc::new(transport));
    Some(server)
}

impl Transport for QuicTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn config_section(&self) -> &'static str {
        SECTION
    }

    fn bind(&mut self) -> Result<(), BindError> {
        let listen = self.config.listen;
        let tls_error = |e: String| BindError {
            setting: format!("{SECTION}.tls"),
            addr: listen,
            source: std::io::Error::other(e),
        };
        let tls = TlsServer::load(
            &self.config.tls,
            vec![ALPN.to_vec()],
            Versions::Tls13,
            NAME,
            &self.metrics,
        )
        .map_err(|e| tls_error(e.to_string()))?;
        let server = server_config(&self.config, tls.current())
            .ok_or_else(|| tls_error("no QUIC initial cipher suite in the provider".to_owned()))?;
        let endpoint = quinn::Endpoint::server(server, listen)
            .map_err(|e| BindError::listen(SECTION, listen, e))?;
        self.endpoint = Some((endpoint, tls));
        Ok(())
    }

    fn local_addrs(&self) -> Vec<SocketAddr> {
        self.endpoint.iter().filter_map(|(e, _)| e.local_addr().ok()).collect()
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
        Box::pin(self.accept_loop(handler, shutdown))
    }
}

impl QuicTransport {
    async fn accept_loop(self: Box<Self>, handler: Arc<dyn KpHandler>, shutdown: Shutdown) {
        let Some((endpoint, tls)) = self.endpoint else {
            tracing::error!("bug: the QUIC transport was served before it was bound");
            return;
        };
        tokio::spawn(tls.clone().watch_files(shutdown.stop.clone()));
        tokio::spawn(follow_reloads(endpoint.clone(), tls.clone(), self.config.clone()));
        let (live, mut all_ended) = mpsc::channel::<()>(1);
        let mut drain = shutdown.drain.clone();
        loop {
            tokio::select! {
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    // Refused by a connection limit: refused at once, before the handshake.
                    let Some(admitted) = self.streams.admit(incoming.remote_address()) else {
                        incoming.refuse();
                        continue;
                    };
                    let conn = Conn {
                        streams: self.streams.clone(),
                        tls: tls.clone(),
                        handler: handler.clone(),
                        shutdown: shutdown.clone(),
                        live: live.clone(),
                    };
                    tokio::spawn(async move {
                        conn.run(incoming).await;
                        drop(admitted);
                    });
                }
                _ = stopped(&mut drain) => break,
            }
        }
        // No new connections; the open ones finish and close at the stop signal.
        endpoint.set_server_config(None);
        self.streams.drain();
        drop(live);
        let _ = all_ended.recv().await;
        endpoint.close(VarInt::from_u32(0), b"shutting down");
        // Give the close frames a moment to leave.
        let _ = tokio::time::timeout(Duration::from_millis(200), endpoint.wait_idle()).await;
    }
}

/// Hands every reloaded certificate to the endpoint: new connections get it.
async fn follow_reloads(endpoint: quinn::Endpoint, tls: TlsServer, config: QuicConfig) {
    let mut changes = tls.subscribe();
    while changes.changed().await.is_ok() {
        let current = changes.borrow_and_update().clone();
        match server_config(&config, current) {
            Some(server) => endpoint.set_server_config(Some(server)),
            None => tracing::warn!(
                "reloaded TLS configuration unusable for QUIC; the previous one stays"
            ),
        }
    }
}

struct Conn {
    streams: MqttStreams,
    tls: TlsServer,
    handler: Arc<dyn KpHandler>,
    shutdown: Shutdown,
    live: mpsc::Sender<()>,
}

impl Conn {
    async fn run(self, incoming: quinn::Incoming) {
        let peer = incoming.remote_address();
        let timeout = Duration::from_millis(self.tls.config().handshake_timeout_ms);
        let connection = match tokio::time::timeout(timeout, async { incoming.accept()?.await })
            .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let failure = classify(&e);
                tracing::debug!(%peer, error = %e, reason = failure.reason(), "QUIC handshake failed");
                return self.tls.count_failure(failure);
            }
            Err(_) => {
                tracing::debug!(%peer, "QUIC handshake timed out");
                return self.tls.count_failure(HandshakeFailure::Timeout);
            }
        };
        self.tls.count_handshake();
        // rustls verified it during the handshake (chain, validity, CRLs).
        let certificate = connection
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|chain| self.tls.peer_certificate(Some(&chain)))
            .map(Into::into);
        // The control stream: the first bidirectional stream the client opens.
        let stream = tokio::time::timeout(timeout, connection.accept_bi()).await;
        let Ok(Ok((mut send, mut recv))) = stream else {
            tracing::debug!(%peer, "QUIC connection without an MQTT stream");
            connection.close(VarInt::from_u32(0), b"no stream");
            return;
        };
        let stop = self.shutdown.stop.clone();
        let io = (&mut recv, &mut send);
        self.streams.serve(self.handler, peer, certificate, io, stop, self.live).await;
        // The stream has ended: so does the connection (EMQX single-stream semantics), once
        // the client has what was written last (a refusing CONNACK, a DISCONNECT): closing at
        // once would discard it.
        let _ = tokio::time::timeout(LAST_WORDS, send.stopped()).await;
        connection.close(VarInt::from_u32(0), b"");
    }
}

/// Why a QUIC handshake failed, in the TLS failure reasons.
fn classify(error: &ConnectionError) -> HandshakeFailure {
    let crypto = |alert: u8| TransportErrorCode::crypto(alert);
    match error {
        ConnectionError::TimedOut => HandshakeFailure::Timeout,
        ConnectionError::TransportError(e) => match e.code {
            c if c == crypto(120) => HandshakeFailure::NoCommonParameters,
            c if c == crypto(116) => HandshakeFailure::NoClientCertificate,
            c if c == crypto(45) => HandshakeFailure::ClientCertificateExpired,
            c if c == crypto(44) => HandshakeFailure::ClientCertificateRevoked,
            c if c == crypto(42) || c == crypto(48) => HandshakeFailure::ClientCertificateInvalid,
            c if c == crypto(40) || c == crypto(70) => HandshakeFailure::NoCommonParameters,
            _ => HandshakeFailure::Other,
        },
        ConnectionError::ConnectionClosed(_) => HandshakeFailure::AlertReceived,
        ConnectionError::ApplicationClosed(_) | ConnectionError::Reset => HandshakeFailure::Closed,
        _ => HandshakeFailure::Other,
    }
}
