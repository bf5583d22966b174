//! fleetgate: a high-throughput IoT device gateway, wire-compatible with the Kaa platform.
//!
//! This crate is the `fleetgate` binary: the command line, [`config`] (the YAML configuration
//! with its environment overrides), [`registry`] (every transport and service it can run),
//! [`run`] (`fleetgate up` runs every service on one bus, `fleetgate <service>` one on NATS),
//! [`admin`] (health, readiness, metrics), [`logging`] and [`gateway_service`], the one place where the
//! device transports meet the communication service and so the bus.
//!
//! It holds no protocol logic: codecs and sessions live in the transport crates, the
//! communication service in `fleetgate-communication`, the bus, records and extensions in
//! `backend/`.

pub mod admin;
pub mod config;
pub mod gateway_service;
pub mod logging;
pub mod registry;
pub mod reload;
pub mod run;
