//! MQTT over TLS and over WebSocket: two transports that carry the MQTT transport's own
//! sans-IO session unchanged ([`fleetgate_transport_mqtt::server::MqttStreams`]) over other
//! byte streams.
//!
//! - [`MqttsTransport`] (`transports.mqtts`, port 8883): MQTT over TLS 1.2/1.3, with mutual
//!   TLS when a client CA is configured.
//! - [`MqttWsTransport`] (`transports.mqtt_ws`, port 8083): MQTT over WebSocket at one path
//!   (`/mqtt`, subprotocol `mqtt`), plain or over TLS, for browser dashboards and paho's
//!   websockets transport.
//!
//! Both take the MQTT session limits (packet size, keep-alive, receive maximum, ...) from
//! `transports.mqtt`, so a device gets the same protocol whichever port it uses. TLS itself
//! (certificates, reloads, handshake metrics) is `fleetgate-tls`; the WebSocket codec is
//! `fleetgate-websocket`. This crate knows nothing of the bus.

mod listener;
mod mqtts;
mod ws;

pub use mqtts::{MqttsConfig, MqttsTransport};
pub use ws::{MqttWsConfig, MqttWsTransport};
