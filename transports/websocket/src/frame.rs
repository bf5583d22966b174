//! WebSocket frames (RFC 6455 §5), server side and sans-IO: masked client frames in, unmasked
//! server frames out. The size limit is checked from the header, before a payload is buffered.

use bytes::{BufMut, Bytes, BytesMut};

/// A frame's opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// A continuation of a fragmented message.
    Continuation,
    /// UTF-8 text.
    Text,
    /// Binary data.
    Binary,
    /// Close, with an optional status code and reason.
    Close,
    /// Ping: answered with a pong carrying its payload.
    Ping,
    /// Pong.
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// Close, ping and pong.
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// One decoded frame, its payload unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The final fragment of its message.
    pub fin: bool,
    /// What it carries.
    pub opcode: Opcode,
    /// The unmasked payload: a slice of the read buffer.
    pub payload: Bytes,
}

/// A client that broke the protocol: the connection is closed with [`FrameError::close_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Reserved bits set (no extension was negotiated).
    #[error("reserved bits set")]
    Reserved,
    /// An opcode RFC 6455 does not define.
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    /// A client frame without a mask (RFC 6455 §5.1).
    #[error("unmasked client frame")]
    Unmasked,
    /// A control frame that is fragmented or longer than 125 bytes.
    #[error("bad control frame")]
    BadControl,
    /// A payload length over the limit (or not minimally encoded past 2^63).
    #[error("frame of {0} bytes over the limit")]
    TooLarge(u64),
}

impl FrameError {
    /// The close status code (RFC 6455 §7.4.1): 1009 too big, else 1002 protocol error.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::TooLarge(_) => 1009,
            _ => 1002,
        }
    }
}

/// Decodes one client frame from the front of `buf`: `Ok(None)` when more bytes are needed.
/// A payload over `max_payload` is an error as soon as its header is read.
pub fn decode(buf: &mut BytesMut, max_payload: u64) -> Result<Option<Frame>, FrameError> {
    let Some(&[b0, b1]) = buf.get(..2) else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(FrameError::Reserved);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = Opcode::from_bits(b0 & 0x0F).ok_or(FrameError::UnknownOpcode(b0 & 0x0F))?;
    if b1 & 0x80 == 0 {
        return Err(FrameError::Unmasked);
    }
    let (len, mut at) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut len = [0u8; 8];
                len.copy_from_slice(b);
                (u64::from_be_bytes(len), 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if opcode.is_control() && (!fin || len > 125) {
        return Err(FrameError::BadControl);
    }
    if len > max_payload {
        return Err(FrameError::TooLarge(len));
    }
    // Below `max_payload`, which the caller keeps within memory.
    let len = usize::try_from(len).map_err(|_| FrameError::TooLarge(len))?;
    let Some(mask) = buf.get(at..at + 4) else { return Ok(None) };
    let mask = [mask[0], mask[1], mask[2], mask[3]];
    at += 4;
    if buf.len() < at + len {
        buf.reserve(at + len - buf.len());
        return Ok(None);
    }
    let _ = buf.split_to(at);
    let mut payload = buf.split_to(len);
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
    Ok(Some(Frame { fin, opcode, payload: payload.freeze() }))
}

/// Appends one unmasked, final server frame carrying `payload`.
pub fn encode(opcode: Opcode, payload: &[u8], out: &mut BytesMut) {
    out.reserve(payload.len() + 10);
    out.put_u8(0x80 | opcode.bits());
    match payload.len() {
        n @ 0..=125 => out.put_u8(n as u8),
        n @ 126..=0xFFFF => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(payload);
}

/// Appends a close frame with `code`.
pub fn encode_close(code: u16, out: &mut BytesMut) {
    encode(Opcode::Close, &code.to_be_bytes(), out);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A client frame: masked with `mask`.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode(Opcode::Binary, payload, &mut out);
        let mut bytes = out.to_vec();
        bytes[0] = if fin { 0x80 } else { 0 } | opcode;
        bytes[1] |= 0x80;
        let at = match payload.len() {
            0..=125 => 2,
            126..=0xFFFF => 4,
            _ => 10,
        };
        let mut masked: Vec<u8> =
            payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]).collect();
        bytes.truncate(at);
        bytes.extend_from_slice(&mask);
        bytes.append(&mut masked);
        bytes
    }

    #[test]
    fn the_rfc_masked_hello() {
        // RFC 6455 §5.7: a single-frame masked text message "Hello".
        let mut buf =
            BytesMut::from(&[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58][..]);
        let frame = decode(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(
            frame,
            Frame { fin: true, opcode: Opcode::Text, payload: Bytes::from_static(b"Hello") }
        );
        assert!(buf.is_empty());
        let mut out = BytesMut::new();
        encode(Opcode::Text, b"Hello", &mut out);
        assert_eq!(&out[..], &[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
    }

    #[test]
    fn violations_are_errors() {
        let mask = [1, 2, 3, 4];
        let cases: [(Vec<u8>, FrameError); 5] = [
            (vec![0x82, 0x00], FrameError::Unmasked),
            (vec![0xC2, 0x80, 1, 2, 3, 4], FrameError::Reserved),
            (vec![0x83, 0x80, 1, 2, 3, 4], FrameError::UnknownOpcode(3)),
            (client_frame(false, 0x9, b"", mask), FrameError::BadControl),
            (client_frame(true, 0x2, &[0; 300], mask), FrameError::TooLarge(300)),
        ];
        for (bytes, error) in cases {
            assert_eq!(decode(&mut BytesMut::from(&bytes[..]), 200), Err(error));
        }
        // Over the limit: refused from the header alone.
        let huge = [0x82, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
        assert!(matches!(
            decode(&mut BytesMut::from(&huge[..]), 1 << 20),
            Err(FrameError::TooLarge(_))
        ));
        assert_eq!(FrameError::TooLarge(1).close_code(), 1009);
        assert_eq!(FrameError::Unmasked.close_code(), 1002);
    }

    proptest! {
        #[test]
        fn frames_decode_whole_at_any_cut(
            payload in proptest::collection::vec(any::<u8>(), 0..70_000),
            mask in any::<[u8; 4]>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let bytes = client_frame(true, 0x2, &payload, mask);
            let cut = cut.index(bytes.len());
            let mut buf = BytesMut::from(&bytes[..cut]);
            prop_assert_eq!(decode(&mut buf, 1 << 20).unwrap(), None);
            buf.extend_from_slice(&bytes[cut..]);
            let frame = decode(&mut buf, 1 << 20).unwrap().unwrap();
            prop_assert_eq!(&frame.payload[..], &payload[..]);
            prop_assert!(buf.is_empty());
        }
    }
}
