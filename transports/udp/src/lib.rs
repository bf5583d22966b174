//! FGU/1, fleetgate's compact UDP protocol for constrained devices (specified in `SPEC.md`
//! beside this crate): a one-round-trip Noise NK handshake that carries the endpoint's app
//! version and token encrypted, then AEAD data packets of 1/KP frames with a 29-byte overhead,
//! sessions named by id rather than address, and a sliding replay window.
//!
//! The core is sans IO (no tokio, no sockets, no clock): [`wire`] (headers, varints, frames),
//! [`replay`] (the window, a pure value), [`handshake`] (Noise, hello and welcome payloads,
//! cookies), [`session`] (a gateway-side session) and [`client`] (the device side). The tokio
//! glue is [`server`] (the `udp` transport) and [`device`] (a device for tests and the load
//! generator); [`keys`] reads and writes the gateway's key file.
//!
//! It does not know the bus, and it does not fragment: a request must fit one datagram.

pub mod client;
pub mod device;
pub mod handshake;
pub mod keys;
pub mod replay;
pub mod server;
pub mod session;
pub mod wire;

pub use server::{UdpConfig, UdpTransport};
