//! A sans-IO, borrowing CoAP message codec (RFC 7252 §3, with the options of RFC 7641 and 7959).
//!
//! [`Message::decode`] takes one datagram as [`Bytes`] and validates it in a single pass: header,
//! token, every option (delta and length in their 13/14 extended forms, the reserved nibble 15,
//! option numbers that would pass 65535) and the payload marker. Nothing is copied: the payload
//! is a slice of the datagram and options are read back from it on demand
//! ([`Message::options`], [`Message::uri_path`]). The options fleetgate acts on are summarised
//! while decoding ([`KnownOptions`]), so a request is inspected without a second pass.
//!
//! [`MessageWriter`] writes a message into a [`BytesMut`] without intermediate allocations;
//! options must be written in increasing number order, as they travel.
//!
//! Decoding never panics and never overflows on crafted input (every offset is checked); a
//! [`DecodeError`] is always the peer's fault. An [`EncodeError`] is the caller's (a bug).

use std::fmt;
use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

#[cfg(test)]
mod tests;

/// The only CoAP version (RFC 7252 §3: messages with another version are silently ignored).
pub const VERSION: u8 = 1;
/// Separates options from the payload.
pub const PAYLOAD_MARKER: u8 = 0xFF;
/// The longest token.
pub const MAX_TOKEN_LEN: usize = 8;

/// Option numbers (RFC 7252 §5.10, RFC 7641, RFC 7959, and a few later ones that are recognised
/// so that they are not mistaken for unknown critical options).
pub mod option {
    /// If-Match (critical, repeatable).
    pub const IF_MATCH: u16 = 1;
    /// Uri-Host (critical).
    pub const URI_HOST: u16 = 3;
    /// ETag (elective).
    pub const ETAG: u16 = 4;
    /// If-None-Match (critical).
    pub const IF_NONE_MATCH: u16 = 5;
    /// Observe (RFC 7641, elective).
    pub const OBSERVE: u16 = 6;
    /// Uri-Port (critical).
    pub const URI_PORT: u16 = 7;
    /// Location-Path (elective).
    pub const LOCATION_PATH: u16 = 8;
    /// OSCORE (RFC 8613, critical; not supported).
    pub const OSCORE: u16 = 9;
    /// Uri-Path (critical, repeatable): one path segment each.
    pub const URI_PATH: u16 = 11;
    /// Content-Format (elective).
    pub const CONTENT_FORMAT: u16 = 12;
    /// Max-Age (elective), seconds.
    pub const MAX_AGE: u16 = 14;
    /// Uri-Query (critical, repeatable): one `key=value` argument each.
    pub const URI_QUERY: u16 = 15;
    /// Accept (critical).
    pub const ACCEPT: u16 = 17;
    /// Location-Query (elective).
    pub const LOCATION_QUERY: u16 = 20;
    /// Block2 (RFC 7959, critical): response payload blocks.
    pub const BLOCK2: u16 = 23;
    /// Block1 (RFC 7959, critical): request payload blocks.
    pub const BLOCK1: u16 = 27;
    /// Size2 (RFC 7959, elective).
    pub const SIZE2: u16 = 28;
    /// Proxy-Uri (critical; not supported).
    pub const PROXY_URI: u16 = 35;
    /// Proxy-Scheme (critical; not supported).
    pub const PROXY_SCHEME: u16 = 39;
    /// Size1 (elective): the size of a request payload, or the largest one accepted in 4.13.
    pub const SIZE1: u16 = 60;

    /// Odd option numbers are critical: a recipient that does not understand one must reject
    /// the message (RFC 7252 §5.4.1).
    pub const fn is_critical(number: u16) -> bool {
        number & 1 == 1
    }
}

/// The message type (RFC 7252 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// Confirmable: acknowledged and retransmitted.
    Confirmable,
    /// Non-confirmable.
    NonConfirmable,
    /// Acknowledgement of a confirmable message, possibly with a piggybacked response.
    Acknowledgement,
    /// Reset: the recipient could not process a message.
    Reset,
}

impl MessageType {
    fn from_bits(bits: u8) -> Self {
        match bits & 0b11 {
            0 => Self::Confirmable,
            1 => Self::NonConfirmable,
            2 => Self::Acknowledgement,
            _ => Self::Reset,
        }
    }

    fn bits(self) -> u8 {
        match self {
            Self::Confirmable => 0,
            Self::NonConfirmable => 1,
            Self::Acknowledgement => 2,
            Self::Reset => 3,
        }
    }

    /// `CON`, `NON`, `ACK` or `RST`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Confirmable => "CON",
            Self::NonConfirmable => "NON",
            Self::Acknowledgement => "ACK",
            Self::Reset => "RST",
        }
    }
}

/// A method or response code, `c.dd` (RFC 7252 §3: 3-bit class, 5-bit detail).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Code(pub u8);

impl Code {
    /// 0.00: an Empty message.
    pub const EMPTY: Code = Code::new(0, 0);
    /// 0.01 GET.
    pub const GET: Code = Code::new(0, 1);
    /// 0.02 POST.
    pub const POST: Code = Code::new(0, 2);
    /// 0.03 PUT.
    pub const PUT: Code = Code::new(0, 3);
    /// 0.04 DELETE.
    pub const DELETE: Code = Code::new(0, 4);
    /// 2.01 Created.
    pub const CREATED: Code = Code::new(2, 1);
    /// 2.04 Changed.
    pub const CHANGED: Code = Code::new(2, 4);
    /// 2.05 Content.
    pub const CONTENT: Code = Code::new(2, 5);
    /// 2.31 Continue (RFC 7959).
    pub const CONTINUE: Code = Code::new(2, 31);
    /// 4.00 Bad Request.
    pub const BAD_REQUEST: Code = Code::new(4, 0);
    /// 4.01 Unauthorized.
    pub const UNAUTHORIZED: Code = Code::new(4, 1);
    /// 4.02 Bad Option.
    pub const BAD_OPTION: Code = Code::new(4, 2);
    /// 4.03 Forbidden.
    pub const FORBIDDEN: Code = Code::new(4, 3);
    /// 4.04 Not Found.
    pub const NOT_FOUND: Code = Code::new(4, 4);
    /// 4.05 Method Not Allowed.
    pub const METHOD_NOT_ALLOWED: Code = Code::new(4, 5);
    /// 4.08 Request Entity Incomplete (RFC 7959).
    pub const REQUEST_ENTITY_INCOMPLETE: Code = Code::new(4, 8);
    /// 4.12 Precondition Failed.
    pub const PRECONDITION_FAILED: Code = Code::new(4, 12);
    /// 4.13 Request Entity Too Large.
    pub const REQUEST_ENTITY_TOO_LARGE: Code = Code::new(4, 13);
    /// 4.29 Too Many Requests (RFC 8516).
    pub const TOO_MANY_REQUESTS: Code = Code::new(4, 29);
    /// 5.00 Internal Server Error.
    pub const INTERNAL_SERVER_ERROR: Code = Code::new(5, 0);
    /// 5.03 Service Unavailable.
    pub const SERVICE_UNAVAILABLE: Code = Code::new(5, 3);
    /// 5.04 Gateway Timeout.
    pub const GATEWAY_TIMEOUT: Code = Code::new(5, 4);
    /// 5.05 Proxying Not Supported.
    pub const PROXYING_NOT_SUPPORTED: Code = Code::new(5, 5);

    /// The code `class.detail`; the class is masked to 3 bits and the detail to 5.
    pub const fn new(class: u8, detail: u8) -> Self {
        Self(((class & 0b111) << 5) | (detail & 0b1_1111))
    }

    /// The class: 0 request, 2 success, 4 client error, 5 server error.
    pub const fn class(self) -> u8 {
        self.0 >> 5
    }

    /// The detail.
    pub const fn detail(self) -> u8 {
        self.0 & 0b1_1111
    }

    /// 0.00.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// A method code (class 0, not Empty).
    pub const fn is_request(self) -> bool {
        self.class() == 0 && self.0 != 0
    }

    /// A response code (classes 2, 4 and 5).
    pub const fn is_response(self) -> bool {
        matches!(self.class(), 2 | 4 | 5)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.class(), self.detail())
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A token of 0 to 8 bytes, kept inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Token {
    len: u8,
    bytes: [u8; MAX_TOKEN_LEN],
}

impl Token {
    /// The zero-length token.
    pub const EMPTY: Token = Token { len: 0, bytes: [0; MAX_TOKEN_LEN] };

    /// A token with these bytes; `None` when there are more than 8.
    pub fn new(bytes: &[u8]) -> Option<Self> {
        let mut token = Self::EMPTY;
        token.bytes.get_mut(..bytes.len())?.copy_from_slice(bytes);
        token.len = u8::try_from(bytes.len()).ok()?;
        Some(token)
    }

    /// The token's bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len).min(MAX_TOKEN_LEN)]
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("0x")?;
        for b in self.as_slice() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The value of a Block1 or Block2 option (RFC 7959 §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockOption {
    /// The block number (20 bits at most).
    pub num: u32,
    /// Whether more blocks follow.
    pub more: bool,
    /// The size exponent: blocks are `2^(szx + 4)` bytes; 7 is reserved (BERT, not over UDP).
    pub szx: u8,
}

impl BlockOption {
    /// Decodes the option's unsigned value.
    pub fn from_value(value: u32) -> Self {
        Self { num: value >> 4, more: value & 0b1000 != 0, szx: (value & 0b111) as u8 }
    }

    /// The option's unsigned value; the number is masked to 20 bits.
    pub fn value(self) -> u32 {
        ((self.num & 0xF_FFFF) << 4) | (u32::from(self.more) << 3) | u32::from(self.szx & 0b111)
    }

    /// The block size in bytes, 16 to 1024 (2048 for the reserved 7).
    pub fn size(self) -> usize {
        16usize << (self.szx & 0b111)
    }

    /// The size exponent for a block size: the largest power of two at most `size`, clamped to
    /// 16..=1024 bytes.
    pub fn szx_for(size: usize) -> u8 {
        let mut szx = 0u8;
        while szx < 6 && (32usize << szx) <= size {
            szx += 1;
        }
        szx
    }
}

/// Why a datagram is not a CoAP message. Always the peer's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer than the 4 bytes of the fixed header.
    #[error("peer sent {0} bytes, shorter than a CoAP header")]
    TooShort(usize),
    /// A version other than 1 (such messages are silently ignored, RFC 7252 §3).
    #[error("peer sent CoAP version {0}")]
    UnknownVersion(u8),
    /// Token length 9 to 15 (reserved).
    #[error("peer sent reserved token length {0}")]
    InvalidTokenLength(u8),
    /// The message ends inside the token or an option.
    #[error("peer's message ends inside its {0}")]
    Truncated(&'static str),
    /// An option delta or length nibble of 15 that is not the payload marker.
    #[error("peer used the reserved option {0} nibble 15")]
    ReservedNibble(&'static str),
    /// Option deltas add up past 65535.
    #[error("peer's option deltas add up to option number {0}, past 65535")]
    OptionNumberOverflow(u32),
    /// A payload marker with no payload after it.
    #[error("peer sent a payload marker followed by no payload")]
    EmptyPayload,
    /// An Empty message (code 0.00) with a token, options or payload.
    #[error("peer sent an Empty message with content after the header")]
    EmptyWithContent,
}

/// Why a message could not be written. Always the caller's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A token longer than 8 bytes.
    #[error("token of {0} bytes; at most 8")]
    TokenTooLong(usize),
    /// Options must be written in increasing number order.
    #[error("option {number} written after option {last}")]
    OptionOutOfOrder {
        /// The option being written.
        number: u16,
        /// The one written before.
        last: u16,
    },
    /// An option value longer than 65804 bytes.
    #[error("option value of {0} bytes; at most 65804")]
    OptionTooLong(usize),
}

/// The fixed header, readable from any datagram of 4 bytes or more with version 1: enough to
/// reset a confirmable message that fails to decode (RFC 7252 §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The message type.
    pub mtype: MessageType,
    /// The code.
    pub code: Code,
    /// The message id.
    pub message_id: u16,
}

impl Header {
    /// Reads the fixed header; `None` when the datagram is too short or not version 1.
    pub fn peek(datagram: &[u8]) -> Option<Self> {
        let [first, code, id_hi, id_lo, ..] = *datagram else { return None };
        (first >> 6 == VERSION).then(|| Self {
            mtype: MessageType::from_bits(first >> 4),
            code: Code(code),
            message_id: u16::from_be_bytes([id_hi, id_lo]),
        })
    }
}

/// The options fleetgate acts on, collected while decoding.
///
/// An option whose value length is outside its defined range, or a non-repeatable option that
/// repeats, is treated as unrecognised (RFC 7252 §5.4.3, §5.4.5): ignored when elective, noted
/// in [`KnownOptions::unrecognized_critical`] when critical.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KnownOptions {
    /// Observe (RFC 7641): 0 registers, 1 deregisters; in notifications, the sequence number.
    pub observe: Option<u32>,
    /// Content-Format.
    pub content_format: Option<u16>,
    /// Max-Age, seconds.
    pub max_age: Option<u32>,
    /// Accept.
    pub accept: Option<u16>,
    /// Block1 (RFC 7959).
    pub block1: Option<BlockOption>,
    /// Block2 (RFC 7959).
    pub block2: Option<BlockOption>,
    /// Size1.
    pub size1: Option<u32>,
    /// Size2.
    pub size2: Option<u32>,
    /// Number of Uri-Path options.
    pub uri_path_segments: usize,
    /// Total length of the Uri-Path values.
    pub uri_path_len: usize,
    /// Whether If-Match or If-None-Match is present.
    pub conditional: bool,
    /// Whether Proxy-Uri or Proxy-Scheme is present.
    pub proxy: bool,
    /// The first critical option this codec does not know, or that is malformed or repeated.
    pub unrecognized_critical: Option<u16>,
}

impl KnownOptions {
    fn note(&mut self, number: u16, value: &[u8]) {
        use option::*;
        let len = value.len();
        let uint = || (len <= 4).then(|| value.iter().fold(0u32, |v, b| (v << 8) | u32::from(*b)));
        let mut ok = true;
        match number {
            URI_PATH => {
                ok = len <= 255;
                self.uri_path_segments += 1;
                self.uri_path_len += len;
            }
            URI_QUERY | URI_HOST => ok = len <= 255,
            PROXY_SCHEME => {
                ok = (1..=255).contains(&len);
                self.proxy = true;
            }
            IF_MATCH => {
                ok = len <= 8;
                self.conditional = true;
            }
            IF_NONE_MATCH => {
                ok = len == 0;
                self.conditional = true;
            }
            URI_PORT => ok = len <= 2,
            PROXY_URI => {
                ok = (1..=1034).contains(&len);
                self.proxy = true;
            }
            OBSERVE if len <= 3 && self.observe.is_none() => self.observe = uint(),
            CONTENT_FORMAT if len <= 2 && self.content_format.is_none() => {
                self.content_format = uint().and_then(|v| u16::try_from(v).ok());
            }
            MAX_AGE if len <= 4 && self.max_age.is_none() => self.max_age = uint(),
            SIZE1 if len <= 4 && self.size1.is_none() => self.size1 = uint(),
            SIZE2 if len <= 4 && self.size2.is_none() => self.size2 = uint(),
            ACCEPT => {
                ok = len <= 2 && self.accept.is_none();
                if ok {
                    self.accept = uint().and_then(|v| u16::try_from(v).ok());
                }
            }
            BLOCK1 => {
                ok = len <= 3 && self.block1.is_none();
                if ok {
                    self.block1 = uint().map(BlockOption::from_value);
                }
            }
            BLOCK2 => {
                ok = len <= 3 && self.block2.is_none();
                if ok {
                    self.block2 = uint().map(BlockOption::from_value);
                }
            }
            other if is_critical(other) => ok = false,
            _ => {}
        }
        if !ok && is_critical(number) && self.unrecognized_critical.is_none() {
            self.unrecognized_critical = Some(number);
        }
    }
}

/// A decoded CoAP message. Its payload is a slice of the datagram; options are read back from
/// the datagram on demand.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    datagram: Bytes,
    mtype: MessageType,
    code: Code,
    message_id: u16,
    token: Token,
    options: Range<usize>,
    payload: Bytes,
    known: KnownOptions,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("type", &self.mtype)
            .field("code", &self.code)
            .field("message_id", &self.message_id)
            .field("token", &self.token)
            .field("options", &self.options().collect::<Vec<_>>())
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// Reads an extended option delta or length (RFC 7252 §3.1) for `nibble`, advancing `pos`.
fn extended(
    buf: &[u8],
    pos: &mut usize,
    nibble: u8,
    what: &'static str,
) -> Result<u32, DecodeError> {
    match nibble {
        0..=12 => Ok(u32::from(nibble)),
        13 => {
            let b = *buf.get(*pos).ok_or(DecodeError::Truncated("option header"))?;
            *pos += 1;
            Ok(u32::from(b) + 13)
        }
        14 => {
            let end = pos.checked_add(2).ok_or(DecodeError::Truncated("option header"))?;
            let b = buf.get(*pos..end).ok_or(DecodeError::Truncated("option header"))?;
            *pos = end;
            Ok(u32::from(u16::from_be_bytes([b[0], b[1]])) + 269)
        }
        _ => Err(DecodeError::ReservedNibble(what)),
    }
}

impl Message {
    /// Decodes one datagram. The message keeps `datagram` and slices it.
    pub fn decode(datagram: Bytes) -> Result<Self, DecodeError> {
        let buf = &datagram[..];
        let [first, code, id_hi, id_lo, ..] = *buf else {
            return Err(DecodeError::TooShort(buf.len()));
        };
        let version = first >> 6;
        if version != VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let token_len = first & 0x0F;
        if usize::from(token_len) > MAX_TOKEN_LEN {
            return Err(DecodeError::InvalidTokenLength(token_len));
        }
        let code = Code(code);
        if code.is_empty() && buf.len() != 4 {
            return Err(DecodeError::EmptyWithContent);
        }
        let token_end = 4 + usize::from(token_len);
        let token =
            buf.get(4..token_end).and_then(Token::new).ok_or(DecodeError::Truncated("token"))?;
        let mut known = KnownOptions::default();
        let mut pos = token_end;
        let mut number: u32 = 0;
        let mut options_end = buf.len();
        let mut payload = Bytes::new();
        while let Some(&byte) = buf.get(pos) {
            if byte == PAYLOAD_MARKER {
                options_end = pos;
                if pos + 1 == buf.len() {
                    return Err(DecodeError::EmptyPayload);
                }
                payload = datagram.slice(pos + 1..);
                break;
            }
            pos += 1;
            let delta = extended(buf, &mut pos, byte >> 4, "delta")?;
            let len = extended(buf, &mut pos, byte & 0x0F, "length")?;
            number =
                number.checked_add(delta).ok_or(DecodeError::OptionNumberOverflow(u32::MAX))?;
            let n = u16::try_from(number).map_err(|_| DecodeError::OptionNumberOverflow(number))?;
            let end = pos
                .checked_add(len as usize)
                .filter(|end| *end <= buf.len())
                .ok_or(DecodeError::Truncated("option value"))?;
            known.note(n, &buf[pos..end]);
            pos = end;
        }
        Ok(Self {
            mtype: MessageType::from_bits(first >> 4),
            code,
            message_id: u16::from_be_bytes([id_hi, id_lo]),
            token,
            options: token_end..options_end,
            payload,
            known,
            datagram,
        })
    }

    /// The message type.
    pub fn mtype(&self) -> MessageType {
        self.mtype
    }

    /// The method or response code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The message id.
    pub fn message_id(&self) -> u16 {
        self.message_id
    }

    /// The token.
    pub fn token(&self) -> Token {
        self.token
    }

    /// The payload, a slice of the datagram (empty when there is none).
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The options fleetgate acts on.
    pub fn known(&self) -> &KnownOptions {
        &self.known
    }

    /// The whole datagram.
    pub fn datagram(&self) -> &Bytes {
        &self.datagram
    }

    /// Every option in order, as `(number, value)`.
    pub fn options(&self) -> Options<'_> {
        let region = self.datagram.get(self.options.clone()).unwrap_or_default();
        Options { buf: region, pos: 0, number: 0 }
    }

    /// The values of the options with this number, in order.
    pub fn option_values(&self, number: u16) -> impl Iterator<Item = &[u8]> + '_ {
        self.options().filter(move |(n, _)| *n == number).map(|(_, v)| v)
    }

    /// The Uri-Path segments.
    pub fn uri_path(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.option_values(option::URI_PATH)
    }

    /// The Uri-Query arguments.
    pub fn uri_query(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.option_values(option::URI_QUERY)
    }

    /// The Uri-Path segments joined with `/`, without a leading slash (`kp1/a/dcx/tok/json`),
    /// appended to `out`.
    pub fn write_uri_path(&self, out: &mut BytesMut) {
        out.reserve(self.known.uri_path_len + self.known.uri_path_segments);
        for (i, segment) in self.uri_path().enumerate() {
            if i > 0 {
                out.put_u8(b'/');
            }
            out.put_slice(segment);
        }
    }
}

/// Iterator over a decoded message's options (see [`Message::options`]).
#[derive(Debug, Clone)]
pub struct Options<'a> {
    buf: &'a [u8],
    pos: usize,
    number: u32,
}

impl<'a> Iterator for Options<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        // The region was validated by `Message::decode`; any inconsistency just ends iteration.
        let byte = *self.buf.get(self.pos)?;
        self.pos += 1;
        let delta = extended(self.buf, &mut self.pos, byte >> 4, "delta").ok()?;
        let len = extended(self.buf, &mut self.pos, byte & 0x0F, "length").ok()?;
        self.number = self.number.checked_add(delta)?;
        let end = self.pos.checked_add(len as usize)?;
        let value = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some((u16::try_from(self.number).ok()?, value))
    }
}

/// Writes one message into a [`BytesMut`]: header and token on creation, then options in
/// increasing number order, then the payload.
#[derive(Debug)]
pub struct MessageWriter<'a> {
    out: &'a mut BytesMut,
    last: u16,
}

fn nibble(value: usize) -> Result<(u8, usize, usize), EncodeError> {
    // (nibble, extension bytes, extension value)
    match value {
        0..=12 => Ok((value as u8, 0, 0)),
        13..=268 => Ok((13, 1, value - 13)),
        269..=65_804 => Ok((14, 2, value - 269)),
        _ => Err(EncodeError::OptionTooLong(value)),
    }
}

impl<'a> MessageWriter<'a> {
    /// Starts a message with this header and token.
    pub fn new(
        out: &'a mut BytesMut,
        mtype: MessageType,
        code: Code,
        message_id: u16,
        token: &[u8],
    ) -> Result<Self, EncodeError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(EncodeError::TokenTooLong(token.len()));
        }
        out.reserve(4 + token.len());
        out.put_u8((VERSION << 6) | (mtype.bits() << 4) | token.len() as u8);
        out.put_u8(code.0);
        out.put_u16(message_id);
        out.put_slice(token);
        Ok(Self { out, last: 0 })
    }

    /// Appends an option. Options must come in increasing number order (repeats allowed).
    pub fn option(&mut self, number: u16, value: &[u8]) -> Result<&mut Self, EncodeError> {
        if number < self.last {
            return Err(EncodeError::OptionOutOfOrder { number, last: self.last });
        }
        let (dn, dlen, dext) = nibble(usize::from(number - self.last))?;
        let (ln, llen, lext) = nibble(value.len())?;
        self.out.reserve(1 + dlen + llen + value.len());
        self.out.put_u8((dn << 4) | ln);
        for (len, ext) in [(dlen, dext), (llen, lext)] {
            match len {
                1 => self.out.put_u8(ext as u8),
                2 => self.out.put_u16(ext as u16),
                _ => {}
            }
        }
        self.out.put_slice(value);
        self.last = number;
        Ok(self)
    }

    /// Appends an unsigned-integer option in its shortest form (0 is the empty value).
    pub fn uint_option(&mut self, number: u16, value: u32) -> Result<&mut Self, EncodeError> {
        let bytes = value.to_be_bytes();
        let skip = (value.leading_zeros() / 8) as usize;
        self.option(number, &bytes[skip.min(4)..])
    }

    /// Appends a Block1 or Block2 option.
    pub fn block_option(
        &mut self,
        number: u16,
        block: BlockOption,
    ) -> Result<&mut Self, EncodeError> {
        self.uint_option(number, block.value())
    }

    /// Appends the payload marker and payload (nothing when it is empty) and ends the message.
    pub fn payload(self, payload: &[u8]) {
        if !payload.is_empty() {
            self.out.reserve(1 + payload.len());
            self.out.put_u8(PAYLOAD_MARKER);
            self.out.put_slice(payload);
        }
    }

    /// Ends a message without payload.
    pub fn finish(self) {}
}

/// Writes an Empty message (an empty ACK, a RST, or a CoAP ping): 4 bytes.
pub fn write_empty(out: &mut BytesMut, mtype: MessageType, message_id: u16) {
    out.reserve(4);
    out.put_u8((VERSION << 6) | (mtype.bits() << 4));
    out.put_u8(0);
    out.put_u16(message_id);
}
