//! fleetgate: a high-throughput IoT device gateway, wire-compatible with the Kaa platform.
//!
//! This crate is the `fleetgate` binary and the communication service it runs: [`service`]
//! turns 1/KP requests from the device transports into 4/ESP messages on the bus and routes the
//! answers back; [`run`] starts the services of one process (`fleetgate up` all of them on one
//! bus, `fleetgate gateway|dcx|auth` one each on NATS); [`config`] loads the YAML configuration
//! with its environment overrides; [`admin`] serves health, readiness and metrics.
//!
//! Protocol codecs live in the transport crates, the bus and Avro records in `backend/`; this
//! crate is the only one that wires transports to the bus.

pub mod admin;
pub mod config;
pub mod run;
pub mod service;
