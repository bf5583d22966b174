//! Server-side WebSocket (RFC 6455) for byte-stream protocols such as MQTT.
//!
//! - [`handshake`]: the opening handshake, sans-IO: the upgrade request in, the `101` answer
//!   (with the chosen subprotocol) or a precise HTTP refusal out.
//! - [`frame`]: the frame codec, sans-IO: masked client frames in (the size limit checked
//!   from the header), unmasked server frames out.
//! - [`WsStream`]: the binary messages of an upgraded connection as one tokio byte stream.
//!
//! No extensions (permessage-deflate is declined by not answering it), no client side, no
//! text messages for the application, no HTTP beyond the upgrade.

pub mod frame;
pub mod handshake;
mod stream;

pub use stream::WsStream;
