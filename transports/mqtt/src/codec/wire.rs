//! Wire primitives shared by every packet: a bounds-checked reader over a frozen frame, the
//! Variable Byte Integer, length-prefixed strings and binary data, and topic validation.
//!
//! Everything here is private to the codec. Readers never index without a bounds check and
//! never allocate: strings and binary data come out as `Bytes` slices of the frame.

use bytes::{BufMut, Bytes, BytesMut};

use super::error::{DecodeError, EncodeError};

/// Largest value a Variable Byte Integer can carry (four bytes): 268,435,455.
pub(crate) const MAX_VARINT: u32 = 268_435_455;

/// Largest UTF-8 string or binary data field: a two-byte length prefix.
pub(crate) const MAX_FIELD: usize = u16::MAX as usize;

/// Outcome of reading a Variable Byte Integer from a byte slice that may be incomplete.
pub(crate) enum VarInt {
    /// Value and number of bytes it took.
    Done(u32, usize),
    /// The slice ends before the last byte of the integer.
    Incomplete,
}

/// Reads a Variable Byte Integer from the front of `bytes` (MQTT 5 §1.5.5, 3.1.1 §2.2.3).
///
/// A fifth byte (the fourth with its continuation bit set) is malformed.
pub(crate) fn read_varint(bytes: &[u8]) -> Result<VarInt, DecodeError> {
    let mut value: u32 = 0;
    for (i, &b) in bytes.iter().take(4).enumerate() {
        value |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(VarInt::Done(value, i + 1));
        }
    }
    if bytes.len() >= 4 {
        Err(DecodeError::MalformedRemainingLength)
    } else {
        Ok(VarInt::Incomplete)
    }
}

/// Number of bytes `value` takes as a Variable Byte Integer (values above the maximum are
/// rejected by the callers before they get here).
pub(crate) fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Appends `value` as a Variable Byte Integer. `value` must be at most [`MAX_VARINT`].
pub(crate) fn put_varint(out: &mut BytesMut, value: usize) {
    let mut v = value;
    loop {
        // Masked to seven bits, so the cast cannot truncate.
        let mut byte = (v & 0x7f) as u8;
        v >>= 7;
        if v > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if v == 0 {
            break;
        }
    }
}

/// Appends a two-byte length prefix and `bytes`. The caller has checked the length.
pub(crate) fn put_field(out: &mut BytesMut, bytes: &[u8]) {
    // Checked by `check_str` / `check_bin` during sizing; clamp rather than panic.
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.put_u16(len);
    out.put_slice(bytes);
}

/// Validates an outbound UTF-8 string field and returns its encoded size (prefix included).
pub(crate) fn check_str(bytes: &[u8], field: &'static str) -> Result<usize, EncodeError> {
    if bytes.len() > MAX_FIELD {
        return Err(EncodeError::FieldTooLong(field));
    }
    if std::str::from_utf8(bytes).is_err() || bytes.contains(&0) {
        return Err(EncodeError::InvalidUtf8(field));
    }
    Ok(2 + bytes.len())
}

/// Validates an outbound binary data field and returns its encoded size (prefix included).
pub(crate) fn check_bin(bytes: &[u8], field: &'static str) -> Result<usize, EncodeError> {
    if bytes.len() > MAX_FIELD {
        return Err(EncodeError::FieldTooLong(field));
    }
    Ok(2 + bytes.len())
}

/// Checks that `bytes` is a well-formed MQTT UTF-8 string: valid UTF-8 (which excludes
/// surrogates) and no U+0000 (MQTT 5 §1.5.4, 3.1.1 §1.5.3).
pub(crate) fn validate_utf8(bytes: &[u8]) -> Result<(), DecodeError> {
    match std::str::from_utf8(bytes) {
        Ok(_) if !bytes.contains(&0) => Ok(()),
        _ => Err(DecodeError::InvalidUtf8),
    }
}

/// Checks a Topic Name as used in PUBLISH and the Will: well-formed UTF-8 and no wildcard
/// characters. Emptiness is checked by the caller (allowed in MQTT 5 with a Topic Alias).
///
/// One branch-free pass over the bytes (it vectorises); full UTF-8 validation only when a
/// non-ASCII byte is present.
pub(crate) fn validate_topic_name(bytes: &[u8]) -> Result<(), DecodeError> {
    let (mut wildcard, mut nul, mut non_ascii) = (false, false, false);
    for &b in bytes {
        wildcard |= b == b'+' || b == b'#';
        nul |= b == 0;
        non_ascii |= b >= 0x80;
    }
    if wildcard {
        return Err(DecodeError::TopicInvalid);
    }
    if nul || (non_ascii && std::str::from_utf8(bytes).is_err()) {
        return Err(DecodeError::InvalidUtf8);
    }
    Ok(())
}

/// Whether `bytes` is a valid Topic Filter (MQTT 5 §4.7, 3.1.1 §4.7): non-empty, `+` only as a
/// whole level, `#` only as the whole last level, and, for a shared subscription
/// `$share/{ShareName}/{filter}`, a non-empty ShareName without wildcards followed by a valid
/// filter. UTF-8 validity is checked separately.
pub(crate) fn is_valid_topic_filter(bytes: &[u8]) -> bool {
    if bytes.is_empty() {
        return false;
    }
    let filter = match bytes.strip_prefix(b"$share/") {
        Some(rest) => {
            let Some(slash) = rest.iter().position(|&b| b == b'/') else {
                return false;
            };
            let (share, filter) = rest.split_at(slash);
            if share.is_empty() || share.iter().any(|&b| b == b'+' || b == b'#') {
                return false;
            }
            // Skip the '/' that separates ShareName from the filter.
            let filter = filter.get(1..).unwrap_or_default();
            if filter.is_empty() {
                return false;
            }
            filter
        }
        None => bytes,
    };
    let mut levels = filter.split(|&b| b == b'/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        for &b in level {
            match b {
                b'+' if level.len() != 1 => return false,
                b'#' if level.len() != 1 || !is_last => return false,
                _ => {}
            }
        }
    }
    true
}

/// Whether a filter is a shared subscription (`$share/...`).
pub(crate) fn is_shared_filter(bytes: &[u8]) -> bool {
    bytes.starts_with(b"$share/")
}

/// A bounds-checked cursor over one frozen frame. Every read either succeeds or returns
/// [`DecodeError::MalformedPacket`] naming the field that ran past the end.
#[derive(Clone)]
pub(crate) struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `data[pos..end]`. Out-of-range bounds give an empty reader.
    pub(crate) fn new(data: &'a Bytes, pos: usize, end: usize) -> Self {
        let end = end.min(data.len());
        Reader { data, pos: pos.min(end), end }
    }

    /// Whether every byte has been read.
    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.end
    }

    /// Current position in the frame.
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    /// Fails unless every byte has been consumed.
    pub(crate) fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.is_empty() { Ok(()) } else { Err(DecodeError::MalformedPacket(what)) }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let stop = self
            .pos
            .checked_add(n)
            .filter(|&s| s <= self.end)
            .ok_or(DecodeError::MalformedPacket(what))?;
        let s = self.data.get(self.pos..stop).ok_or(DecodeError::MalformedPacket(what))?;
        self.pos = stop;
        Ok(s)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let s = self.take(1, what)?;
        s.first().copied().ok_or(DecodeError::MalformedPacket(what))
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        match *self.take(2, what)? {
            [a, b] => Ok(u16::from_be_bytes([a, b])),
            _ => Err(DecodeError::MalformedPacket(what)),
        }
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        match *self.take(4, what)? {
            [a, b, c, d] => Ok(u32::from_be_bytes([a, b, c, d])),
            _ => Err(DecodeError::MalformedPacket(what)),
        }
    }

    /// A Variable Byte Integer inside the body (property lengths, subscription identifiers).
    pub(crate) fn varint(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let rest = self.data.get(self.pos..self.end).unwrap_or_default();
        match read_varint(rest) {
            Ok(VarInt::Done(v, n)) => {
                self.pos += n;
                Ok(v)
            }
            Ok(VarInt::Incomplete) | Err(_) => Err(DecodeError::MalformedPacket(what)),
        }
    }

    /// The unread bytes as a zero-copy slice, without consuming them.
    pub(crate) fn peek_rest(&self) -> Bytes {
        self.data.slice(self.pos..self.end)
    }

    /// `n` bytes as a zero-copy slice of the frame.
    pub(crate) fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n, what)?;
        Ok(self.data.slice(start..self.pos))
    }

    /// Binary Data: a two-byte length and that many bytes.
    pub(crate) fn binary(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let n = self.u16(what)?;
        self.bytes(usize::from(n), what)
    }

    /// A UTF-8 Encoded String, validated.
    pub(crate) fn string(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let s = self.binary(what)?;
        validate_utf8(&s)?;
        Ok(s)
    }

    /// Splits off the next `n` bytes as a sub-reader over the same frame.
    pub(crate) fn sub(&mut self, n: usize, what: &'static str) -> Result<Reader<'a>, DecodeError> {
        let start = self.pos;
        self.take(n, what)?;
        Ok(Reader::new(self.data, start, self.pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_boundaries() {
        for (v, enc) in [
            (0usize, &[0x00][..]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xff, 0x7f]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xff, 0xff, 0x7f]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (268_435_455, &[0xff, 0xff, 0xff, 0x7f]),
        ] {
            let mut out = BytesMut::new();
            put_varint(&mut out, v);
            assert_eq!(&out[..], enc, "{v}");
            assert_eq!(varint_len(v), enc.len());
            match read_varint(enc) {
                Ok(VarInt::Done(d, n)) => {
                    assert_eq!(d as usize, v);
                    assert_eq!(n, enc.len());
                }
                _ => panic!("decode {v}"),
            }
        }
        assert!(matches!(read_varint(&[0x80, 0x80]), Ok(VarInt::Incomplete)));
        assert!(matches!(
            read_varint(&[0x80, 0x80, 0x80, 0x80, 0x01]),
            Err(DecodeError::MalformedRemainingLength)
        ));
    }

    #[test]
    fn filters() {
        for ok in ["a", "+", "#", "a/+/b", "a/#", "+/+", "/", "a//b", "$share/g/a/#", "$SYS/#"] {
            assert!(is_valid_topic_filter(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "a+",
            "a/b#",
            "#/a",
            "a/#/b",
            "+a/b",
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g/",
        ] {
            assert!(!is_valid_topic_filter(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn strings() {
        assert!(validate_utf8("héllo".as_bytes()).is_ok());
        assert!(validate_utf8(b"a\0b").is_err());
        assert!(validate_utf8(&[0xff]).is_err());
        assert!(validate_utf8(&[0xed, 0xa0, 0x80]).is_err()); // U+D800 surrogate
        assert!(validate_topic_name(b"a/+").is_err());
        assert!(validate_topic_name(b"a/#").is_err());
    }
}
