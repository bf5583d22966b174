//! The bytes of FGU/1 (SPEC.md §3 and §5): cleartext packet headers, QUIC variable-length
//! integers, and the frames inside a data packet's ciphertext. Parsing borrows from the
//! datagram; every length is checked before it is used, and every error names what was wrong.

use bytes::{BufMut, Bytes};

/// The protocol version in the high nibble of every packet's first byte.
pub const VERSION: u8 = 1;
/// Packet types (low nibble of the first byte).
pub const INIT: u8 = 1;
/// Handshake response.
pub const RESP: u8 = 2;
/// Stateless cookie retry.
pub const RETRY: u8 = 3;
/// Encrypted data.
pub const DATA: u8 = 4;
/// Bytes of a data packet's cleartext header: first byte, receiver session id, packet number.
pub const DATA_HEADER: usize = 13;
/// Bytes of the AEAD tag after every ciphertext.
pub const TAG: usize = 16;
/// Bytes of a cookie.
pub const COOKIE: usize = 16;
/// Noise NK message 1 without payload: ephemeral key, and the empty payload's tag... plus the
/// payload's own tag (NK encrypts the payload of message 1 under `es`).
pub const NOISE_MSG1_OVERHEAD: usize = 32 + TAG;
/// Noise NK message 2 without payload: ephemeral key and the payload's tag.
pub const NOISE_MSG2_OVERHEAD: usize = 32 + TAG;
/// Packet numbers at or above this are never sent nor accepted (SPEC §4.3).
pub const MAX_PACKET_NUMBER: u64 = 1 << 63;

/// What was wrong with a packet or frame. Always the sender's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than the structure needs.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A version other than 1.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// A packet type this version does not define.
    #[error("unknown packet type {0}")]
    PacketType(u8),
    /// A frame type this version does not define.
    #[error("unknown frame type {0:#x}")]
    FrameType(u64),
    /// A string that is not UTF-8.
    #[error("{0} is not UTF-8")]
    Utf8(&'static str),
    /// A value out of its range.
    #[error("{0} out of range")]
    Range(&'static str),
}

/// A parsed cleartext packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// Handshake message 1 from a device.
    Init {
        /// The device's session id: the gateway addresses its RESP and RETRY to it.
        sender: u32,
        /// The cookie of an earlier RETRY, echoed.
        cookie: Option<&'a [u8; COOKIE]>,
        /// The Noise message.
        noise: &'a [u8],
    },
    /// Handshake message 2 from the gateway.
    Resp {
        /// The device's session id.
        receiver: u32,
        /// The gateway's session id (0 when the handshake was refused).
        sender: u32,
        /// The Noise message.
        noise: &'a [u8],
    },
    /// A cookie to echo in a repeated INIT.
    Retry {
        /// The device's session id.
        receiver: u32,
        /// The cookie.
        cookie: &'a [u8; COOKIE],
    },
    /// Encrypted frames.
    Data {
        /// The receiver's session id.
        receiver: u32,
        /// The packet number (the AEAD nonce).
        number: u64,
        /// Ciphertext and tag.
        sealed: &'a [u8],
    },
}

fn first_byte(kind: u8) -> u8 {
    (VERSION << 4) | kind
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl<'a> Packet<'a> {
    /// Parses the cleartext header of a datagram.
    pub fn parse(datagram: &'a [u8]) -> Result<Self, WireError> {
        let &first = datagram.first().ok_or(WireError::Truncated("packet"))?;
        if first >> 4 != VERSION {
            return Err(WireError::Version(first >> 4));
        }
        match first & 0x0f {
            INIT => {
                let sender = u32_at(datagram, 1).ok_or(WireError::Truncated("INIT header"))?;
                let &cookie_len = datagram.get(5).ok_or(WireError::Truncated("INIT header"))?;
                let (cookie, rest) = match cookie_len {
                    0 => (None, &datagram[6..]),
                    16 => {
                        let cookie = datagram
                            .get(6..6 + COOKIE)
                            .and_then(|c| c.try_into().ok())
                            .ok_or(WireError::Truncated("INIT cookie"))?;
                        (Some(cookie), &datagram[6 + COOKIE..])
                    }
                    _ => return Err(WireError::Range("INIT cookie length")),
                };
                if rest.len() < NOISE_MSG1_OVERHEAD {
                    return Err(WireError::Truncated("INIT handshake message"));
                }
                Ok(Packet::Init { sender, cookie, noise: rest })
            }
            RESP => {
                let receiver = u32_at(datagram, 1).ok_or(WireError::Truncated("RESP header"))?;
                let sender = u32_at(datagram, 5).ok_or(WireError::Truncated("RESP header"))?;
                let noise = &datagram[9..];
                if noise.len() < NOISE_MSG2_OVERHEAD {
                    return Err(WireError::Truncated("RESP handshake message"));
                }
                Ok(Packet::Resp { receiver, sender, noise })
            }
            RETRY => {
                let receiver = u32_at(datagram, 1).ok_or(WireError::Truncated("RETRY"))?;
                let cookie = datagram
                    .get(5..5 + COOKIE)
                    .and_then(|c| c.try_into().ok())
                    .ok_or(WireError::Truncated("RETRY"))?;
                Ok(Packet::Retry { receiver, cookie })
            }
            DATA => {
                let receiver = u32_at(datagram, 1).ok_or(WireError::Truncated("DATA header"))?;
                let number = datagram
                    .get(5..13)
                    .and_then(|n| n.try_into().ok())
                    .map(u64::from_be_bytes)
                    .ok_or(WireError::Truncated("DATA header"))?;
                if number >= MAX_PACKET_NUMBER {
                    return Err(WireError::Range("packet number"));
                }
                let sealed = &datagram[DATA_HEADER..];
                if sealed.len() < TAG {
                    return Err(WireError::Truncated("DATA ciphertext"));
                }
                Ok(Packet::Data { receiver, number, sealed })
            }
            other => Err(WireError::PacketType(other)),
        }
    }
}

/// Appends an INIT header (the Noise message follows).
pub fn put_init_header(out: &mut Vec<u8>, sender: u32, cookie: Option<&[u8; COOKIE]>) {
    out.push(first_byte(INIT));
    out.extend_from_slice(&sender.to_be_bytes());
    match cookie {
        Some(c) => {
            out.push(COOKIE as u8);
            out.extend_from_slice(c);
        }
        None => out.push(0),
    }
}

/// Appends a RESP header (the Noise message follows).
pub fn put_resp_header(out: &mut Vec<u8>, receiver: u32, sender: u32) {
    out.push(first_byte(RESP));
    out.extend_from_slice(&receiver.to_be_bytes());
    out.extend_from_slice(&sender.to_be_bytes());
}

/// A whole RETRY packet.
pub fn retry_packet(receiver: u32, cookie: &[u8; COOKIE]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + COOKIE);
    out.push(first_byte(RETRY));
    out.extend_from_slice(&receiver.to_be_bytes());
    out.extend_from_slice(cookie);
    out
}

/// The 13-byte header of a data packet.
pub fn data_header(receiver: u32, number: u64) -> [u8; DATA_HEADER] {
    let mut h = [0; DATA_HEADER];
    h[0] = first_byte(DATA);
    h[1..5].copy_from_slice(&receiver.to_be_bytes());
    h[5..13].copy_from_slice(&number.to_be_bytes());
    h
}

// ---- QUIC variable-length integers (RFC 9000 §16) -------------------------------------------

/// The largest value a varint holds.
pub const VARINT_MAX: u64 = (1 << 62) - 1;

/// Bytes `v` takes as a varint.
pub fn varint_len(v: u64) -> usize {
    match v {
        0..=63 => 1,
        64..=16_383 => 2,
        16_384..=1_073_741_823 => 4,
        _ => 8,
    }
}

/// Appends `v` (at most [`VARINT_MAX`]; larger values are clamped) as a varint.
pub fn put_varint(out: &mut impl BufMut, v: u64) {
    let v = v.min(VARINT_MAX);
    match varint_len(v) {
        1 => out.put_u8(v as u8),
        2 => out.put_u16(0x4000 | v as u16),
        4 => out.put_u32(0x8000_0000 | v as u32),
        _ => out.put_u64(0xc000_0000_0000_0000 | v),
    }
}

/// A cursor over a borrowed buffer.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads `buf` from its start.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Bytes left.
    pub fn remaining(&self) -> &'a [u8] {
        self.buf
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// One byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        let (&b, rest) = self.buf.split_first().ok_or(WireError::Truncated(what))?;
        self.buf = rest;
        Ok(b)
    }

    /// `n` bytes.
    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// A varint.
    pub fn varint(&mut self, what: &'static str) -> Result<u64, WireError> {
        let first = self.u8(what)?;
        let len = 1usize << (first >> 6);
        let rest = self.bytes(len - 1, what)?;
        let mut v = u64::from(first & 0x3f);
        for &b in rest {
            v = (v << 8) | u64::from(b);
        }
        Ok(v)
    }

    /// A varint that must fit `max`.
    pub fn varint_max(&mut self, max: u64, what: &'static str) -> Result<u64, WireError> {
        let v = self.varint(what)?;
        if v > max {
            return Err(WireError::Range(what));
        }
        Ok(v)
    }

    /// Varint length, then that many bytes.
    pub fn prefixed(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let n = self.varint(what)?;
        let n = usize::try_from(n).map_err(|_| WireError::Truncated(what))?;
        self.bytes(n, what)
    }

    /// Varint length, then that many bytes of UTF-8.
    pub fn string(&mut self, what: &'static str) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.prefixed(what)?).map_err(|_| WireError::Utf8(what))
    }
}

/// Appends a varint length and `bytes`.
pub fn put_prefixed(out: &mut impl BufMut, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.put_slice(bytes);
}

// ---- Frames (SPEC §5) -------------------------------------------------------------------------

/// Frame type numbers.
pub mod frame_type {
    /// One zero byte of padding.
    pub const PADDING: u64 = 0x00;
    /// A 1/KP request.
    pub const REQUEST: u64 = 0x01;
    /// The answer to a request.
    pub const RESPONSE: u64 = 0x02;
    /// A message an extension pushed.
    pub const PUSH: u64 = 0x03;
    /// Acknowledges a push.
    pub const ACK: u64 = 0x04;
    /// Liveness probe.
    pub const PING: u64 = 0x05;
    /// Answer to a PING.
    pub const PONG: u64 = 0x06;
    /// Ends the session.
    pub const CLOSE: u64 = 0x07;
}

/// Frame flag: a request id follows.
const HAS_ID: u8 = 0x01;
/// Frame flag: the extension is an alias number, not a name.
const ALIAS: u8 = 0x02;

/// An extension instance, by alias number (agreed in the handshake) or by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ext<'a> {
    /// The n-th alias of the session's welcome.
    Alias(u8),
    /// The name itself.
    Name(&'a str),
}

/// One frame, borrowing from the plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// `n` bytes of padding (consecutive PADDING bytes are parsed as one frame).
    Padding(usize),
    /// A 1/KP request.
    Request {
        /// The extension instance.
        ext: Ext<'a>,
        /// The resource path, with its leading slash and without token or request id.
        path: &'a str,
        /// The request id (1 to 2^31-1), when the device wants an answer.
        id: Option<u32>,
        /// The payload.
        payload: &'a [u8],
    },
    /// The answer to a request.
    Response {
        /// The request's id; `None` for an error answering a request without one.
        id: Option<u32>,
        /// For answers without id: the request's extension and path.
        target: Option<(Ext<'a>, &'a str)>,
        /// HTTP-style status (2xx success, else the 1/KP error's code).
        status: u16,
        /// The extension's payload, or the error's reason phrase.
        payload: &'a [u8],
    },
    /// A push from an extension.
    Push {
        /// Numbers pushes of a session; acknowledged by ACK.
        id: u64,
        /// The extension instance.
        ext: Ext<'a>,
        /// The resource path.
        path: &'a str,
        /// The payload.
        payload: &'a [u8],
    },
    /// Acknowledges the push with this id.
    Ack(u64),
    /// Liveness probe with 8 opaque bytes, echoed by PONG.
    Ping([u8; 8]),
    /// Answer to PING.
    Pong([u8; 8]),
    /// Ends the session.
    Close {
        /// HTTP-style code (200 normal end, 401 token no longer valid, 503 gateway stopping).
        code: u16,
        /// Why, for humans.
        reason: &'a str,
    },
}

fn read_ext<'a>(r: &mut Reader<'a>, flags: u8) -> Result<Ext<'a>, WireError> {
    if flags & ALIAS != 0 {
        Ok(Ext::Alias(
            u8::try_from(r.varint("extension alias")?)
                .map_err(|_| WireError::Range("extension alias"))?,
        ))
    } else {
        Ok(Ext::Name(r.string("extension name")?))
    }
}

fn put_ext(out: &mut impl BufMut, ext: Ext<'_>) {
    match ext {
        Ext::Alias(a) => put_varint(out, u64::from(a)),
        Ext::Name(n) => put_prefixed(out, n.as_bytes()),
    }
}

fn ext_flag(ext: Ext<'_>) -> u8 {
    if matches!(ext, Ext::Alias(_)) { ALIAS } else { 0 }
}

fn request_id(r: &mut Reader<'_>) -> Result<u32, WireError> {
    let id = r.varint_max(0x7fff_ffff, "request id")?;
    if id == 0 {
        return Err(WireError::Range("request id"));
    }
    Ok(id as u32)
}

fn status(r: &mut Reader<'_>) -> Result<u16, WireError> {
    let s = r.varint_max(999, "status")?;
    if s < 100 {
        return Err(WireError::Range("status"));
    }
    Ok(s as u16)
}

/// Iterates over the frames of a plaintext.
#[derive(Debug)]
pub struct Frames<'a> {
    r: Reader<'a>,
}

impl<'a> Frames<'a> {
    /// The frames of `plaintext`.
    pub fn new(plaintext: &'a [u8]) -> Self {
        Self { r: Reader::new(plaintext) }
    }

    fn next_frame(&mut self) -> Result<Frame<'a>, WireError> {
        let r = &mut self.r;
        let kind = r.varint("frame type")?;
        Ok(match kind {
            frame_type::PADDING => {
                let n = r.remaining().iter().take_while(|&&b| b == 0).count();
                r.bytes(n, "padding")?;
                Frame::Padding(n + 1)
            }
            frame_type::REQUEST => {
                let flags = r.u8("REQUEST flags")?;
                let ext = read_ext(r, flags)?;
                let path = r.string("resource path")?;
                let id = if flags & HAS_ID != 0 { Some(request_id(r)?) } else { None };
                let payload = r.prefixed("REQUEST payload")?;
                Frame::Request { ext, path, id, payload }
            }
            frame_type::RESPONSE => {
                let flags = r.u8("RESPONSE flags")?;
                let (id, target) = if flags & HAS_ID != 0 {
                    (Some(request_id(r)?), None)
                } else {
                    let ext = read_ext(r, flags)?;
                    (None, Some((ext, r.string("resource path")?)))
                };
                let status = status(r)?;
                let payload = r.prefixed("RESPONSE payload")?;
                Frame::Response { id, target, status, payload }
            }
            frame_type::PUSH => {
                let flags = r.u8("PUSH flags")?;
                let id = r.varint("push id")?;
                let ext = read_ext(r, flags)?;
                let path = r.string("resource path")?;
                let payload = r.prefixed("PUSH payload")?;
                Frame::Push { id, ext, path, payload }
            }
            frame_type::ACK => Frame::Ack(r.varint("push id")?),
            frame_type::PING | frame_type::PONG => {
                let b: [u8; 8] = r
                    .bytes(8, "PING data")?
                    .try_into()
                    .map_err(|_| WireError::Truncated("PING"))?;
                if kind == frame_type::PING { Frame::Ping(b) } else { Frame::Pong(b) }
            }
            frame_type::CLOSE => {
                let code = status(r)?;
                let reason = r.string("CLOSE reason")?;
                Frame::Close { code, reason }
            }
            other => return Err(WireError::FrameType(other)),
        })
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Frame<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.r.is_empty() {
            return None;
        }
        let frame = self.next_frame();
        if frame.is_err() {
            // One error ends the packet: what follows cannot be delimited.
            self.r = Reader::new(&[]);
        }
        Some(frame)
    }
}

impl Frame<'_> {
    /// Appends the frame.
    pub fn put(&self, out: &mut impl BufMut) {
        match *self {
            Frame::Padding(n) => out.put_bytes(0, n),
            Frame::Request { ext, path, id, payload } => {
                put_varint(out, frame_type::REQUEST);
                out.put_u8(ext_flag(ext) | if id.is_some() { HAS_ID } else { 0 });
                put_ext(out, ext);
                put_prefixed(out, path.as_bytes());
                if let Some(id) = id {
                    put_varint(out, u64::from(id));
                }
                put_prefixed(out, payload);
            }
            Frame::Response { id, target, status, payload } => {
                put_varint(out, frame_type::RESPONSE);
                match (id, target) {
                    (Some(id), _) => {
                        out.put_u8(HAS_ID);
                        put_varint(out, u64::from(id));
                    }
                    (None, Some((ext, path))) => {
                        out.put_u8(ext_flag(ext));
                        put_ext(out, ext);
                        put_prefixed(out, path.as_bytes());
                    }
                    (None, None) => {
                        out.put_u8(0);
                        put_ext(out, Ext::Name(""));
                        put_prefixed(out, b"");
                    }
                }
                put_varint(out, u64::from(status));
                put_prefixed(out, payload);
            }
            Frame::Push { id, ext, path, payload } => {
                put_varint(out, frame_type::PUSH);
                out.put_u8(ext_flag(ext));
                put_varint(out, id);
                put_ext(out, ext);
                put_prefixed(out, path.as_bytes());
                put_prefixed(out, payload);
            }
            Frame::Ack(id) => {
                put_varint(out, frame_type::ACK);
                put_varint(out, id);
            }
            Frame::Ping(b) => {
                put_varint(out, frame_type::PING);
                out.put_slice(&b);
            }
            Frame::Pong(b) => {
                put_varint(out, frame_type::PONG);
                out.put_slice(&b);
            }
            Frame::Close { code, reason } => {
                put_varint(out, frame_type::CLOSE);
                put_varint(out, u64::from(code));
                put_prefixed(out, reason.as_bytes());
            }
        }
    }
}

/// Bytes of a frame, computed without writing it.
pub fn frame_len(frame: &Frame<'_>) -> usize {
    let mut v = Vec::new();
    frame.put(&mut v);
    v.len()
}

/// Copies a borrowed slice of a datagram into an owned `Bytes` (plaintexts live in a scratch
/// buffer, so payloads handed on are copied once).
pub fn owned(b: &[u8]) -> Bytes {
    Bytes::copy_from_slice(b)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_at_every_length() {
        for v in [0, 63, 64, 16_383, 16_384, 1_073_741_823, 1_073_741_824, VARINT_MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v));
            assert_eq!(Reader::new(&out).varint("v").unwrap(), v);
        }
        // RFC 9000 §A.1 examples.
        assert_eq!(Reader::new(&[0x25]).varint("v").unwrap(), 37);
        assert_eq!(Reader::new(&[0x40, 0x25]).varint("v").unwrap(), 37);
        assert_eq!(Reader::new(&[0x7b, 0xbd]).varint("v").unwrap(), 15_293);
    }

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::Request { ext: Ext::Alias(0), path: "/json", id: Some(7), payload: b"[1]" },
            Frame::Request { ext: Ext::Name("dcx"), path: "/json", id: None, payload: b"" },
            Frame::Response { id: Some(7), target: None, status: 200, payload: b"" },
            Frame::Response {
                id: None,
                target: Some((Ext::Alias(1), "/config/json")),
                status: 404,
                payload: b"nope",
            },
            Frame::Push { id: 3, ext: Ext::Name("cmx"), path: "/config/json", payload: b"{}" },
            Frame::Ack(3),
            Frame::Ping(*b"12345678"),
            Frame::Pong(*b"12345678"),
            Frame::Close { code: 200, reason: "bye" },
            Frame::Padding(5),
        ];
        let mut out = Vec::new();
        for f in &frames {
            f.put(&mut out);
        }
        let parsed: Vec<_> = Frames::new(&out).collect::<Result<_, _>>().unwrap();
        assert_eq!(parsed, frames);
        assert_eq!(frames.iter().map(frame_len).sum::<usize>(), out.len());
    }

    #[test]
    fn truncated_frames_and_headers_are_errors() {
        let mut out = Vec::new();
        Frame::Request { ext: Ext::Alias(0), path: "/json", id: Some(7), payload: b"[1]" }
            .put(&mut out);
        for cut in 0..out.len() {
            let r: Result<Vec<_>, _> = Frames::new(&out[..cut]).collect();
            assert!(cut == 0 || r.is_err(), "cut at {cut}");
        }
        let header = data_header(9, 1);
        for cut in 0..header.len() + TAG {
            let mut d = header.to_vec();
            d.resize(cut, 0);
            assert!(Packet::parse(&d).is_err(), "cut at {cut}");
        }
        assert!(Packet::parse(&[0x24, 0, 0, 0, 1]).is_err(), "version 2");
        assert_eq!(Packet::parse(&[0x1f]), Err(WireError::PacketType(15)));
    }
}

#[cfg(test)]
mod arbitrary_input {
    use proptest::prelude::*;

    use super::*;
    use crate::handshake::{Hello, Welcome};

    proptest! {
        /// What the fuzz targets check, in every test run: arbitrary bytes through every
        /// parser of network input refuse or parse, never panic.
        #[test]
        fn parsers_never_panic(data in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = Packet::parse(&data);
            // An error ends the iteration (the frames after it cannot be delimited).
            for f in Frames::new(&data).flatten() {
                let mut out = Vec::new();
                f.put(&mut out);
            }
            let _ = Hello::parse(&data);
            let _ = Welcome::parse(&data);
        }
    }
}
