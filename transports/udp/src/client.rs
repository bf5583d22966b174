//! The device side, sans IO: builds the INIT, reads the RESP (or RETRY), then seals frames into
//! data packets and opens the gateway's. The load generator, the tests and the tokio
//! [`crate::device`] build on it; firmware would do the same steps.

use snow::{HandshakeState, StatelessTransportState};

use crate::handshake::{self, Hello, MIN_INIT, Welcome};
use crate::replay::ReplayWindow;
use crate::wire::{self, COOKIE, DATA_HEADER, Packet, TAG, WireError};

/// Why the device side failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A packet did not parse.
    #[error("{0}")]
    Wire(#[from] WireError),
    /// Noise refused: the gateway is not the one whose key is pinned, or a packet is forged.
    #[error("{0}")]
    Handshake(#[from] handshake::HandshakeError),
    /// The packet is for another session.
    #[error("packet for session {0}, not this one")]
    OtherSession(u32),
    /// The packet is not the kind expected now.
    #[error("unexpected packet")]
    Unexpected,
    /// The gateway refused the session.
    #[error("refused: {status} {reason}")]
    Refused {
        /// HTTP-style status.
        status: u16,
        /// Why.
        reason: String,
    },
    /// A replayed data packet.
    #[error("replayed packet")]
    Replay,
}

/// A handshake in progress.
pub struct Connecting {
    hs: HandshakeState,
    sender: u32,
    hello: Vec<u8>,
    msg1: Option<Vec<u8>>,
}

impl Connecting {
    /// Starts a handshake with the gateway `gateway_public` as session `sender` (random, not
    /// 0). `ephemeral` fixes the ephemeral key (test vectors only).
    pub fn new(
        gateway_public: &[u8; 32],
        sender: u32,
        hello: &Hello<'_>,
        ephemeral: Option<&[u8; 32]>,
    ) -> Result<Self, ClientError> {
        let hs = handshake::initiator(gateway_public, ephemeral)
            .map_err(handshake::HandshakeError::from)?;
        // Pad so that the whole INIT reaches MIN_INIT (with room for a cookie).
        let fixed = 6 + wire::NOISE_MSG1_OVERHEAD;
        let mut payload = Vec::new();
        hello.put(&mut payload, MIN_INIT.saturating_sub(fixed));
        Ok(Self { hs, sender, hello: payload, msg1: None })
    }

    /// The INIT datagram (with the cookie of a RETRY, when one came). Noise message 1 can be
    /// written once only, so a retransmission repeats the first one's bytes.
    pub fn init_packet(&mut self, cookie: Option<&[u8; COOKIE]>) -> Result<Vec<u8>, ClientError> {
        let noise = match &self.msg1 {
            Some(n) => n.clone(),
            None => {
                let mut n = vec![0; self.hello.len() + 128];
                let len = self
                    .hs
                    .write_message(&self.hello, &mut n)
                    .map_err(handshake::HandshakeError::from)?;
                n.truncate(len);
                self.msg1 = Some(n.clone());
                n
            }
        };
        let mut out = Vec::with_capacity(6 + COOKIE + noise.len());
        wire::put_init_header(&mut out, self.sender, cookie);
        out.extend_from_slice(&noise);
        Ok(out)
    }

    /// This side's session id.
    pub fn sender(&self) -> u32 {
        self.sender
    }

    /// Reads the gateway's RESP: the open session, or why it was refused. A RETRY is
    /// `Err(Unexpected)` here; read it with [`retry_cookie`].
    pub fn finish(mut self, datagram: &[u8]) -> Result<(Established, Accepted), ClientError> {
        let Packet::Resp { receiver, sender, noise } = Packet::parse(datagram)? else {
            return Err(ClientError::Unexpected);
        };
        if receiver != self.sender {
            return Err(ClientError::OtherSession(receiver));
        }
        let mut payload = vec![0; noise.len()];
        let n =
            self.hs.read_message(noise, &mut payload).map_err(handshake::HandshakeError::from)?;
        let welcome = Welcome::parse(&payload[..n])?;
        let accepted = match welcome {
            Welcome::Refused { status, reason } => {
                return Err(ClientError::Refused { status, reason: reason.to_owned() });
            }
            Welcome::Accepted {
                lifetime_secs,
                keepalive_secs,
                max_datagram,
                server_time_ms,
                aliases,
            } => Accepted {
                lifetime_secs,
                keepalive_secs,
                max_datagram,
                server_time_ms,
                aliases: aliases.into_iter().map(str::to_owned).collect(),
            },
        };
        let keys =
            self.hs.into_stateless_transport_mode().map_err(handshake::HandshakeError::from)?;
        Ok((
            Established {
                keys,
                own: self.sender,
                gateway: sender,
                tx_next: 0,
                rx: ReplayWindow::default(),
            },
            accepted,
        ))
    }
}

/// The cookie of a RETRY addressed to `sender`.
pub fn retry_cookie(datagram: &[u8], sender: u32) -> Option<[u8; COOKIE]> {
    match Packet::parse(datagram) {
        Ok(Packet::Retry { receiver, cookie }) if receiver == sender => Some(*cookie),
        _ => None,
    }
}

/// What the gateway's welcome said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Session lifetime.
    pub lifetime_secs: u32,
    /// PING after this long without sending.
    pub keepalive_secs: u32,
    /// Largest datagram.
    pub max_datagram: u16,
    /// The gateway's clock.
    pub server_time_ms: u64,
    /// Extension names by alias number.
    pub aliases: Vec<String>,
}

/// An open session on the device side.
pub struct Established {
    keys: StatelessTransportState,
    own: u32,
    gateway: u32,
    tx_next: u64,
    rx: ReplayWindow<1>,
}

impl Established {
    /// Seals `frames` (encoded) into a data packet.
    pub fn seal(&mut self, frames: &[u8]) -> Vec<u8> {
        let number = self.tx_next;
        self.tx_next += 1;
        self.seal_with(number, frames)
    }

    /// Seals with an explicit packet number (tests: replays and vectors).
    pub fn seal_with(&self, number: u64, frames: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(DATA_HEADER + frames.len() + TAG);
        out.extend_from_slice(&wire::data_header(self.gateway, number));
        out.resize(DATA_HEADER + frames.len() + TAG, 0);
        match self.keys.write_message(number, frames, &mut out[DATA_HEADER..]) {
            Ok(n) => out.truncate(DATA_HEADER + n),
            // Only over 65535 bytes, which no caller sends.
            Err(_) => out.truncate(DATA_HEADER),
        }
        out
    }

    /// Opens a data packet from the gateway: its frames' bytes.
    pub fn open(&mut self, datagram: &[u8]) -> Result<Vec<u8>, ClientError> {
        let Packet::Data { receiver, number, sealed } = Packet::parse(datagram)? else {
            return Err(ClientError::Unexpected);
        };
        if receiver != self.own {
            return Err(ClientError::OtherSession(receiver));
        }
        if !self.rx.may_accept(number) {
            return Err(ClientError::Replay);
        }
        let mut plain = vec![0; sealed.len()];
        let n = self
            .keys
            .read_message(number, sealed, &mut plain)
            .map_err(|e| ClientError::Handshake(e.into()))?;
        if !self.rx.accept(number) {
            return Err(ClientError::Replay);
        }
        plain.truncate(n);
        Ok(plain)
    }

    /// The gateway's session id.
    pub fn gateway_session(&self) -> u32 {
        self.gateway
    }

    /// This side's session id.
    pub fn own_session(&self) -> u32 {
        self.own
    }

    /// The next packet number this side will use.
    pub fn next_number(&self) -> u64 {
        self.tx_next
    }
}
