//! fleetgate's fleet load generator and its side-by-side comparison runner.
//!
//! - [`loadgen`]: simulated devices, each on its own MQTT 3.1.1/5 connection (fleetgate's
//!   sans-IO codec, no client library), CoAP socket ([`coap_device`], fleetgate's CoAP codec)
//!   or pipelined HTTP/1.1 connection ([`http_device`]), publishing 1/KP data samples at
//!   open-loop stepped rates from many loopback source addresses; delivery counted on NATS
//!   (fleetgate) or by an MQTT subscriber (any broker); per-step counts and HDR latency; JSON
//!   and SVG results, a CSV ([`output`]), a self-contained HTML report, `--fail-if`
//!   thresholds ([`threshold`]) and the merge of several processes' results ([`merge`]). The
//!   `fleetgate-loadgen` binary is its command line.
//! - [`compare`]: the `fleetgate-compare` runner: starts fleetgate and its peers (Mosquitto,
//!   rumqttd) pinned to their own core, alternates them (A B A B), runs the generator against
//!   each and prints maximum sustainable rates, CPU per message, latency and memory per
//!   connection as ratios.
//!
//! What it does not do: custom-UDP and QUIC devices (not yet), TLS, DTLS, QoS 2, or any traffic
//! outside 127.0.0.0/8 unless explicitly allowed. The per-codec criterion benches live beside
//! their crates.

pub mod coap_device;
pub mod compare;
pub mod device;
pub mod http_device;
pub mod loadgen;
pub mod merge;
pub mod output;
pub mod payload;
pub mod procfs;
pub mod report;
pub mod schedule;
pub mod sink;
pub mod stats;
pub mod svg;
pub mod threshold;
pub mod udp_device;

/// The environment that turns fleetgate's MQTT and HTTP connection and rate limits off (issue
/// 15): a benchmark measures the gateway's throughput, and its fleet connects faster, from
/// fewer addresses and with more messages per connection than those limits allow a real fleet.
pub const LIMITS_OFF: &[(&str, &str)] = &[
    ("FLEETGATE_TRANSPORTS_MQTT_MAX_CONNECTIONS", "0"),
    ("FLEETGATE_TRANSPORTS_MQTT_MAX_CONNECTIONS_PER_ADDRESS", "0"),
    ("FLEETGATE_TRANSPORTS_MQTT_MAX_NEW_CONNECTIONS_PER_ADDRESS_PER_SEC", "0"),
    ("FLEETGATE_TRANSPORTS_MQTT_MAX_MESSAGES_PER_SEC", "0"),
    ("FLEETGATE_TRANSPORTS_MQTT_MAX_BYTES_PER_SEC", "0"),
    ("FLEETGATE_TRANSPORTS_HTTP_MAX_CONNECTIONS_PER_ADDRESS", "0"),
    ("FLEETGATE_TRANSPORTS_HTTP_MAX_NEW_CONNECTIONS_PER_ADDRESS_PER_SEC", "0"),
];
