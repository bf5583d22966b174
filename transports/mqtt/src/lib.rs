//! MQTT 3.1.1 and 5.0 transport for 1/KP.
//!
//! Three layers, each usable without the next:
//!
//! - [`codec`]: a sans-IO, zero-copy codec for both protocol versions: bytes in, packets out.
//! - [`session`]: one connection's protocol as a sans-IO state machine on the codec: bytes and
//!   time in; bytes to write, events for the gateway and the next timeout out. It depends on
//!   nothing but `bytes`, `thiserror` and the plain 1/KP types of `fleetgate-kp`, so it is
//!   tested on simulated time and fuzzed without sockets.
//! - [`server`]: the tokio glue: a listener and one small task per connection that moves bytes
//!   between the socket and its session and hands the session's events to a
//!   [`fleetgate_transport_core::KpHandler`]. It applies the limits a peer meets before it
//!   has proven anything: connections per listener and per address, a small first packet, a
//!   connect timeout; and after: a keep-alive cap, message and byte rates, and client-id
//!   takeover across every MQTT transport of the process (`takeover`).
//!
//! This crate knows nothing of the bus.

pub mod codec;
pub mod server;
pub mod session;
mod takeover;
