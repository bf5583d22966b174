//! CoAP transport for 1/KP (RFC 7252, with Observe from RFC 7641 and block-wise transfers from
//! RFC 7959).
//!
//! [`codec`] is a sans-IO, borrowing CoAP message codec: a datagram in, a validated message
//! whose payload and options are slices of that datagram out; no I/O, no tokio. [`session`] is
//! the sans-IO state machine of one peer on top of it (deduplication, piggybacked and separate
//! responses, retransmission, Observe, block-wise transfers, the idle timeout, its 1/KP
//! session): datagrams, time and the gateway's results in; datagrams to send, events for the
//! gateway and the next deadline out; no I/O, no clock. [`server`] is the tokio glue that
//! serves 1/KP over UDP with one session per peer address: the URI path is the 1/KP path, POST
//! and PUT (and GET, for reads and Observe) carry requests to a
//! [`fleetgate_transport_core::KpHandler`], and its answers and pushes come back as
//! piggybacked, separate or non-confirmable responses and Observe notifications. Request
//! payloads larger than a datagram arrive in Block1 blocks and are reassembled; answers and
//! notifications larger than a block go out in Block2 blocks.
//!
//! This crate knows nothing of the bus or of any extension's payloads. It does not do DTLS,
//! OSCORE, proxying, multicast, conditional requests (If-Match, If-None-Match), Content-Format
//! on responses, or CoAP over TCP.

pub mod codec;
mod peer;
pub mod server;
pub mod session;

pub use server::{CoapConfig, CoapMetrics, CoapTransport, response_code};
