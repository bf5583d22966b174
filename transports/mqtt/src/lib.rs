//! MQTT 3.1.1 and 5.0 transport for 1/KP.
//!
//! [`codec`] is a sans-IO, zero-copy codec for both protocol versions: bytes in, packets out, no
//! I/O and no tokio. [`server`] is the tokio glue that accepts connections and hands 1/KP
//! requests to a [`fleetgate_transport_core::KpHandler`]. This crate knows nothing of the bus.

pub mod codec;
pub mod server;
pub mod session;
