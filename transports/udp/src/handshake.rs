//! The handshake (SPEC §4): `Noise_NK_25519_ChaChaPoly_BLAKE2s` with prologue `FGU/1`, the
//! device's hello (message 1 payload: app version and credentials, encrypted under `es`), the
//! gateway's welcome (message 2 payload), and the stateless cookie of a RETRY.

use std::net::SocketAddr;

use blake2::digest::{KeyInit, Mac};
use bytes::BufMut;
use snow::{HandshakeState, StatelessTransportState};

use crate::wire::{COOKIE, Reader, WireError, put_prefixed, put_varint};

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_NK_25519_ChaChaPoly_BLAKE2s";
/// Hashed into the handshake by both sides: binds the session to this protocol version.
pub const PROLOGUE: &[u8] = b"FGU/1";
/// The smallest INIT the gateway answers (SPEC §6): its RESP or RETRY is never larger, so the
/// gateway amplifies nothing. Devices pad their hello up to it.
pub const MIN_INIT: usize = 160;

/// An X25519 key pair.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    /// The private key.
    pub private: [u8; 32],
    /// The public key, which devices pin.
    pub public: [u8; 32],
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPair {{ public: {} }}", hex(&self.public))
    }
}

/// Handshake failures: the peer's fault (bad message, wrong key) unless said otherwise.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Noise refused the message: forged, truncated, or for another key.
    #[error("handshake message does not authenticate: {0}")]
    Noise(#[from] snow::Error),
    /// The payload did not parse.
    #[error("handshake payload: {0}")]
    Payload(#[from] WireError),
}

fn params() -> snow::params::NoiseParams {
    // A constant that parses: the test `the_noise_name_parses` proves it.
    NOISE_PARAMS.parse().unwrap_or_else(|_| unreachable!("constant Noise name"))
}

impl KeyPair {
    /// A fresh random key pair.
    pub fn generate() -> Result<Self, snow::Error> {
        let k = snow::Builder::new(params()).generate_keypair()?;
        let mut pair = Self { private: [0; 32], public: [0; 32] };
        pair.private.copy_from_slice(&k.private);
        pair.public.copy_from_slice(&k.public);
        Ok(pair)
    }

    /// The pair of a private key.
    pub fn from_private(private: [u8; 32]) -> Self {
        let public = x25519_base(&private);
        Self { private, public }
    }
}

/// The public key of `private`: X25519 with the base point, through snow's own Curve25519.
fn x25519_base(private: &[u8; 32]) -> [u8; 32] {
    use snow::resolvers::{CryptoResolver, DefaultResolver};
    let Some(mut dh) = DefaultResolver.resolve_dh(&snow::params::DHChoice::Curve25519) else {
        unreachable!("the default resolver has Curve25519")
    };
    dh.set(private);
    let mut public = [0; 32];
    public.copy_from_slice(dh.pubkey());
    public
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses 64 hex digits (surrounding white space ignored).
pub fn parse_key_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut k = [0; 32];
    for (i, out) in k.iter_mut().enumerate() {
        *out = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}

/// The device's credentials and app version (message 1 payload).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hello<'a> {
    /// The endpoint's app version name.
    pub app_version: &'a str,
    /// Its endpoint token.
    pub token: Option<&'a str>,
    /// Client credentials (16/ECAP username/password), when the gateway asks for them.
    pub username: Option<&'a str>,
    /// Their password.
    pub password: Option<&'a [u8]>,
}

const HELLO_TOKEN: u8 = 1;
const HELLO_BASIC: u8 = 2;
const HELLO_VERSION: u8 = 1;

impl<'a> Hello<'a> {
    /// Appends the payload, padded with zeros to at least `min` bytes.
    pub fn put(&self, out: &mut Vec<u8>, min: usize) {
        let start = out.len();
        out.push(HELLO_VERSION);
        let mut flags = 0;
        if self.token.is_some() {
            flags |= HELLO_TOKEN;
        }
        if self.username.is_some() {
            flags |= HELLO_BASIC;
        }
        out.push(flags);
        put_prefixed(out, self.app_version.as_bytes());
        if let Some(t) = self.token {
            put_prefixed(out, t.as_bytes());
        }
        if let Some(u) = self.username {
            put_prefixed(out, u.as_bytes());
            put_prefixed(out, self.password.unwrap_or_default());
        }
        let len = out.len() - start;
        if len < min {
            out.put_bytes(0, min - len);
        }
    }

    /// Parses a payload (trailing zeros are padding).
    pub fn parse(payload: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        let version = r.u8("hello version")?;
        if version != HELLO_VERSION {
            return Err(WireError::Version(version));
        }
        let flags = r.u8("hello flags")?;
        let app_version = r.string("app version")?;
        let token = if flags & HELLO_TOKEN != 0 { Some(r.string("token")?) } else { None };
        let (username, password) = if flags & HELLO_BASIC != 0 {
            (Some(r.string("username")?), Some(r.prefixed("password")?))
        } else {
            (None, None)
        };
        if r.remaining().iter().any(|&b| b != 0) {
            return Err(WireError::Range("hello padding"));
        }
        Ok(Self { app_version, token, username, password })
    }
}

/// The gateway's answer (message 2 payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Welcome<'a> {
    /// The session is open.
    Accepted {
        /// The session ends this long after the handshake; the device handshakes anew before.
        lifetime_secs: u32,
        /// A device that has sent nothing for this long should PING (NAT bindings, liveness).
        keepalive_secs: u32,
        /// The largest datagram the gateway accepts and sends.
        max_datagram: u16,
        /// The gateway's clock, Unix milliseconds.
        server_time_ms: u64,
        /// Extension instance names by alias number (frames may use the number).
        aliases: Vec<&'a str>,
    },
    /// The session is refused with this HTTP-style status and reason.
    Refused {
        /// 400, 401, 403, 404, 429 or 503.
        status: u16,
        /// Why.
        reason: &'a str,
    },
}

impl<'a> Welcome<'a> {
    /// Appends the payload.
    pub fn put(&self, out: &mut Vec<u8>) {
        match self {
            Welcome::Accepted {
                lifetime_secs,
                keepalive_secs,
                max_datagram,
                server_time_ms,
                aliases,
            } => {
                put_varint(out, 200);
                put_varint(out, u64::from(*lifetime_secs));
                put_varint(out, u64::from(*keepalive_secs));
                put_varint(out, u64::from(*max_datagram));
                put_varint(out, *server_time_ms);
                put_varint(out, aliases.len() as u64);
                for a in aliases {
                    put_prefixed(out, a.as_bytes());
                }
            }
            Welcome::Refused { status, reason } => {
                put_varint(out, u64::from(*status));
                put_prefixed(out, reason.as_bytes());
            }
        }
    }

    /// Parses a payload.
    pub fn parse(payload: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        let status = r.varint_max(999, "welcome status")? as u16;
        let welcome = if status == 200 {
            let lifetime_secs = r.varint_max(u64::from(u32::MAX), "lifetime")? as u32;
            let keepalive_secs = r.varint_max(u64::from(u32::MAX), "keepalive")? as u32;
            let max_datagram = r.varint_max(65_535, "max datagram")? as u16;
            let server_time_ms = r.varint("server time")?;
            let n = r.varint_max(255, "alias count")?;
            let aliases = (0..n).map(|_| r.string("alias")).collect::<Result<_, _>>()?;
            Welcome::Accepted {
                lifetime_secs,
                keepalive_secs,
                max_datagram,
                server_time_ms,
                aliases,
            }
        } else {
            Welcome::Refused { status, reason: r.string("reason")? }
        };
        if !r.is_empty() {
            return Err(WireError::Range("welcome length"));
        }
        Ok(welcome)
    }
}

fn builder<'b>() -> snow::Builder<'b> {
    snow::Builder::new(params())
}

/// The device side: starts a handshake with the gateway whose public key is pinned.
/// `ephemeral` fixes the ephemeral key (test vectors only).
pub fn initiator(
    gateway_public: &[u8; 32],
    ephemeral: Option<&[u8; 32]>,
) -> Result<HandshakeState, snow::Error> {
    let mut b = builder().prologue(PROLOGUE)?.remote_public_key(gateway_public)?;
    if let Some(e) = ephemeral {
        b = b.fixed_ephemeral_key_for_testing_only(e);
    }
    b.build_initiator()
}

/// The gateway side of one handshake.
pub fn responder(
    keys: &KeyPair,
    ephemeral: Option<&[u8; 32]>,
) -> Result<HandshakeState, snow::Error> {
    let mut b = builder().prologue(PROLOGUE)?.local_private_key(&keys.private)?;
    if let Some(e) = ephemeral {
        b = b.fixed_ephemeral_key_for_testing_only(e);
    }
    b.build_responder()
}

/// Reads message 1 into `payload_buf`; returns the payload's length.
pub fn read_init(
    hs: &mut HandshakeState,
    noise: &[u8],
    payload_buf: &mut [u8],
) -> Result<usize, HandshakeError> {
    Ok(hs.read_message(noise, payload_buf)?)
}

/// Writes message 2 with `welcome` after `header` into a datagram and splits the session's
/// keys: the returned transport state, when the handshake finished.
pub fn write_resp(
    mut hs: HandshakeState,
    header: Vec<u8>,
    welcome: &Welcome<'_>,
) -> Result<(Vec<u8>, StatelessTransportState), HandshakeError> {
    let mut payload = Vec::with_capacity(64);
    welcome.put(&mut payload);
    let mut out = header;
    let at = out.len();
    out.resize(at + payload.len() + 64, 0);
    let n = hs.write_message(&payload, &mut out[at..])?;
    out.truncate(at + n);
    Ok((out, hs.into_stateless_transport_mode()?))
}

/// The stateless cookie of a RETRY (SPEC §6): a keyed BLAKE2s MAC of the source address, the
/// device's session id and the current minute, truncated to 16 bytes.
pub fn cookie(secret: &[u8; 32], from: SocketAddr, sender: u32, minute: u64) -> [u8; COOKIE] {
    let mut mac = <blake2::Blake2sMac256 as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("a 32-byte key fits BLAKE2s"));
    match from.ip() {
        std::net::IpAddr::V4(ip) => mac.update(&ip.to_ipv6_mapped().octets()),
        std::net::IpAddr::V6(ip) => mac.update(&ip.octets()),
    }
    mac.update(&from.port().to_be_bytes());
    mac.update(&sender.to_be_bytes());
    mac.update(&minute.to_be_bytes());
    let full = mac.finalize().into_bytes();
    let mut c = [0; COOKIE];
    c.copy_from_slice(&full[..COOKIE]);
    c
}

/// Whether `echoed` is the cookie of this minute or the one before (constant-time compare).
pub fn cookie_valid(
    secret: &[u8; 32],
    from: SocketAddr,
    sender: u32,
    minute: u64,
    echoed: &[u8; COOKIE],
) -> bool {
    [minute, minute.saturating_sub(1)].iter().any(|&m| {
        let c = cookie(secret, from, sender, m);
        c.iter().zip(echoed).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_noise_name_parses() {
        assert!(NOISE_PARAMS.parse::<snow::params::NoiseParams>().is_ok());
    }

    #[test]
    fn a_public_key_follows_from_its_private_key() {
        let k = KeyPair::generate().unwrap();
        assert_eq!(KeyPair::from_private(k.private), k);
        assert_eq!(parse_key_hex(&hex(&k.public)), Some(k.public));
    }

    #[test]
    fn hello_and_welcome_round_trip() {
        let h = Hello {
            app_version: "demo-v1",
            token: Some("tok"),
            username: Some("u"),
            password: Some(b"p"),
        };
        let mut out = Vec::new();
        h.put(&mut out, 40);
        assert_eq!(out.len(), 40);
        assert_eq!(Hello::parse(&out).unwrap(), h);
        for w in [
            Welcome::Accepted {
                lifetime_secs: 86_400,
                keepalive_secs: 25,
                max_datagram: 1200,
                server_time_ms: 1_700_000_000_000,
                aliases: vec!["dcx", "cmx"],
            },
            Welcome::Refused { status: 401, reason: "bad token" },
        ] {
            let mut out = Vec::new();
            w.put(&mut out);
            assert_eq!(Welcome::parse(&out).unwrap(), w);
        }
    }

    #[test]
    fn cookies_hold_for_two_minutes_and_one_address() {
        let secret = [7; 32];
        let a: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let b: SocketAddr = "10.0.0.1:5001".parse().unwrap();
        let c = cookie(&secret, a, 9, 100);
        assert!(cookie_valid(&secret, a, 9, 100, &c));
        assert!(cookie_valid(&secret, a, 9, 101, &c));
        assert!(!cookie_valid(&secret, a, 9, 102, &c));
        assert!(!cookie_valid(&secret, b, 9, 100, &c));
        assert!(!cookie_valid(&secret, a, 8, 100, &c));
    }
}
