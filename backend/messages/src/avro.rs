//! A small Avro binary codec: raw datum, no header, no schema at run time.
//!
//! Writers append to any [`bytes::BufMut`] and never allocate on their own; the `*_len`
//! functions give the exact encoded size so a caller can reserve once. [`Reader`] walks a
//! borrowed `&[u8]` and hands out `&str` / `&[u8]` slices of it. Every length read from the
//! input is checked against the bytes that remain before anything is sliced or allocated, so a
//! crafted message can neither panic the decoder nor make it allocate more than a small
//! multiple of its own size.
//!
//! Only the parts of Avro that the Kaa inter-service records use are here: `int`, `long`,
//! `string`, `bytes`, two-branch unions with `null`, arrays and maps.

use bytes::BufMut;

/// Why a raw Avro datum could not be decoded.
///
/// Every variant means the sender produced a malformed message (or one written with an
/// incompatible schema); none of them is a bug in this crate. `field` is the Avro field name as
/// it appears in the `.avsc` schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended in the middle of a field that has no default.
    #[error("malformed Avro message: input ends inside field `{field}`")]
    Truncated {
        /// Field being read.
        field: &'static str,
    },
    /// A variable-length integer continues past the 10 bytes a 64-bit value can take.
    #[error("malformed Avro message: varint in field `{field}` is longer than 10 bytes")]
    VarintTooLong {
        /// Field being read.
        field: &'static str,
    },
    /// The 10th byte of a variable-length integer carries bits beyond 64.
    #[error("malformed Avro message: varint in field `{field}` overflows 64 bits")]
    VarintOverflow {
        /// Field being read.
        field: &'static str,
    },
    /// A string, bytes or block-size prefix is negative.
    #[error("malformed Avro message: negative length {len} in field `{field}`")]
    NegativeLength {
        /// Field being read.
        field: &'static str,
        /// The length as decoded.
        len: i64,
    },
    /// A length prefix points past the end of the input.
    #[error(
        "malformed Avro message: field `{field}` declares {len} bytes but only {remaining} remain"
    )]
    LengthBeyondInput {
        /// Field being read.
        field: &'static str,
        /// The declared length.
        len: i64,
        /// Bytes left in the input after the prefix.
        remaining: usize,
    },
    /// A `boolean` byte other than 0 or 1.
    #[error("malformed Avro message: boolean field `{field}` holds byte {byte}")]
    BadBoolean {
        /// Field being read.
        field: &'static str,
        /// The byte found.
        byte: u8,
    },
    /// An array or map block announces more items than the remaining input could hold.
    #[error(
        "malformed Avro message: block in field `{field}` announces {count} items but only {remaining} bytes remain"
    )]
    TooManyItems {
        /// Field being read.
        field: &'static str,
        /// The announced item count (absolute value).
        count: u64,
        /// Bytes left in the input.
        remaining: usize,
    },
    /// A `string` field is not valid UTF-8.
    #[error("malformed Avro message: field `{field}` is not valid UTF-8")]
    InvalidUtf8 {
        /// Field being read.
        field: &'static str,
    },
    /// A union branch index does not name a branch of the field's union.
    #[error(
        "malformed Avro message: union index {index} in field `{field}` is not one of its {branches} branches"
    )]
    BadUnionIndex {
        /// Field being read.
        field: &'static str,
        /// The index as decoded.
        index: i64,
        /// Number of branches the schema has.
        branches: usize,
    },
    /// An `int` field holds a value outside the 32-bit range.
    #[error("malformed Avro message: value {value} of int field `{field}` is out of 32-bit range")]
    IntOutOfRange {
        /// Field being read.
        field: &'static str,
        /// The value as decoded.
        value: i64,
    },
}

/// Where `null` sits in a two-branch union such as `["null","string"]` or `["string","null"]`.
///
/// The branch index is what goes on the wire, so the order in the schema matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NullBranch {
    /// `["null", T]`: `null` is branch 0 and a value is branch 1.
    First,
    /// `[T, "null"]`: a value is branch 0 and `null` is branch 1.
    Second,
}

impl NullBranch {
    /// Branch index of `null` in this union.
    #[inline]
    pub const fn null_index(self) -> i64 {
        match self {
            NullBranch::First => 0,
            NullBranch::Second => 1,
        }
    }

    /// Branch index of the value in this union.
    #[inline]
    pub const fn value_index(self) -> i64 {
        match self {
            NullBranch::First => 1,
            NullBranch::Second => 0,
        }
    }
}

#[inline]
const fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

#[inline]
const fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

// ---------------------------------------------------------------------------------------------
// Sizes

/// Encoded size of an Avro `long` (zig-zag varint), 1 to 10 bytes.
#[inline]
pub const fn long_len(v: i64) -> usize {
    let bits = 64 - (zigzag(v) | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Encoded size of an Avro `int`.
#[inline]
pub const fn int_len(v: i32) -> usize {
    long_len(v as i64)
}

/// Encoded size of an Avro `bytes` value: length prefix plus content.
#[inline]
pub const fn bytes_len(b: &[u8]) -> usize {
    long_len(b.len() as i64) + b.len()
}

/// Encoded size of an Avro `string` value: length prefix plus UTF-8 content.
#[inline]
pub const fn str_len(s: &str) -> usize {
    bytes_len(s.as_bytes())
}

/// Encoded size of a two-branch union with `null` holding `v` (the same for either branch
/// order, since both indices take one byte).
#[inline]
pub fn opt_len<T>(v: Option<T>, len: impl FnOnce(T) -> usize) -> usize {
    1 + v.map_or(0, len)
}

/// Encoded size of an optional `string` union.
#[inline]
pub fn opt_str_len(v: Option<&str>) -> usize {
    opt_len(v, str_len)
}

/// Encoded size of an optional `bytes` union.
#[inline]
pub fn opt_bytes_len(v: Option<&[u8]>) -> usize {
    opt_len(v, bytes_len)
}

/// Encoded size of an optional `int` union.
#[inline]
pub fn opt_int_len(v: Option<i32>) -> usize {
    opt_len(v, int_len)
}

/// Encoded size of an array written as one block (count, items, terminating 0), or a single 0
/// byte when empty; `item_len` gives each item's size.
pub fn array_len<T>(items: &[T], item_len: impl Fn(&T) -> usize) -> usize {
    if items.is_empty() {
        1
    } else {
        long_len(items.len() as i64) + items.iter().map(item_len).sum::<usize>() + 1
    }
}

/// Encoded size of a `map<string>` written as one block, entries in slice order.
pub fn str_map_len(entries: &[(&str, &str)]) -> usize {
    array_len(entries, |(k, v)| str_len(k) + str_len(v))
}

// ---------------------------------------------------------------------------------------------
// Writers

/// Appends an Avro `long` as a zig-zag varint.
#[inline]
pub fn put_long<B: BufMut>(out: &mut B, v: i64) {
    let mut n = zigzag(v);
    if n < 0x80 {
        out.put_u8(n as u8);
        return;
    }
    let mut buf = [0u8; 10];
    let mut i = 0;
    while n >= 0x80 {
        buf[i] = (n as u8) | 0x80;
        n >>= 7;
        i += 1;
    }
    buf[i] = n as u8;
    out.put_slice(&buf[..=i]);
}

/// Appends an Avro `int` (same varint encoding as `long`).
#[inline]
pub fn put_int<B: BufMut>(out: &mut B, v: i32) {
    put_long(out, i64::from(v));
}

/// Appends an Avro `bytes` value: length, then content.
#[inline]
pub fn put_bytes<B: BufMut>(out: &mut B, b: &[u8]) {
    put_long(out, b.len() as i64);
    out.put_slice(b);
}

/// Appends an Avro `string` value: length, then UTF-8 content.
#[inline]
pub fn put_str<B: BufMut>(out: &mut B, s: &str) {
    put_bytes(out, s.as_bytes());
}

/// Appends a union branch index.
#[inline]
pub fn put_union_index<B: BufMut>(out: &mut B, index: i64) {
    put_long(out, index);
}

/// Appends a two-branch union with `null`: the branch index, then the value if there is one.
#[inline]
pub fn put_opt<B: BufMut, T>(
    out: &mut B,
    v: Option<T>,
    null: NullBranch,
    put: impl FnOnce(&mut B, T),
) {
    match v {
        Some(v) => {
            put_union_index(out, null.value_index());
            put(out, v);
        }
        None => put_union_index(out, null.null_index()),
    }
}

/// Appends an optional `string` union.
#[inline]
pub fn put_opt_str<B: BufMut>(out: &mut B, v: Option<&str>, null: NullBranch) {
    put_opt(out, v, null, |o, s| put_str(o, s));
}

/// Appends an optional `bytes` union.
#[inline]
pub fn put_opt_bytes<B: BufMut>(out: &mut B, v: Option<&[u8]>, null: NullBranch) {
    put_opt(out, v, null, |o, b| put_bytes(o, b));
}

/// Appends an optional `int` union.
#[inline]
pub fn put_opt_int<B: BufMut>(out: &mut B, v: Option<i32>, null: NullBranch) {
    put_opt(out, v, null, |o, i| put_int(o, i));
}

/// Appends an array as one block (count, items, terminating 0), or a single 0 when empty.
pub fn put_array<B: BufMut, T>(out: &mut B, items: &[T], mut put_item: impl FnMut(&mut B, &T)) {
    if !items.is_empty() {
        put_long(out, items.len() as i64);
        for item in items {
            put_item(out, item);
        }
    }
    put_long(out, 0);
}

/// Appends a `map<string>` as one block, entries in slice order.
pub fn put_str_map<B: BufMut>(out: &mut B, entries: &[(&str, &str)]) {
    put_array(out, entries, |o, (k, v)| {
        put_str(o, k);
        put_str(o, v);
    });
}

// ---------------------------------------------------------------------------------------------
// Reader

/// Decoding cursor over a borrowed raw Avro datum.
///
/// Strings and bytes come back as slices of the input; nothing is copied.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `buf`.
    #[inline]
    pub const fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Number of bytes not read yet.
    #[inline]
    pub const fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Whether the whole input has been read (used for trailing fields with defaults, which
    /// older writers leave out).
    #[inline]
    pub const fn is_at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// Byte offset of the next read.
    #[inline]
    pub const fn position(&self) -> usize {
        self.pos
    }

    /// Reads an Avro `long`.
    #[inline]
    pub fn long(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        let mut n: u64 = 0;
        let mut shift = 0u32;
        loop {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(DecodeError::Truncated { field });
            };
            self.pos += 1;
            if shift == 63 {
                // 10th byte: only its lowest bit still fits in 64 bits.
                if b & 0x80 != 0 {
                    return Err(DecodeError::VarintTooLong { field });
                }
                if b > 1 {
                    return Err(DecodeError::VarintOverflow { field });
                }
            }
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(unzigzag(n));
            }
            shift += 7;
        }
    }

    /// Reads an Avro `int`, rejecting values outside the 32-bit range.
    #[inline]
    pub fn int(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        let value = self.long(field)?;
        i32::try_from(value).map_err(|_| DecodeError::IntOutOfRange { field, value })
    }

    /// Reads `N` raw bytes (the fixed-size `float`, `double` and `boolean` encodings).
    #[inline]
    fn fixed<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = self.buf.get(self.pos..self.pos + N).ok_or(DecodeError::Truncated { field })?;
        self.pos += N;
        bytes.try_into().map_err(|_| DecodeError::Truncated { field })
    }

    /// Reads an Avro `boolean` (one byte, 0 or 1).
    #[inline]
    pub fn boolean(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.fixed::<1>(field)? {
            [0] => Ok(false),
            [1] => Ok(true),
            [b] => Err(DecodeError::BadBoolean { field, byte: b }),
        }
    }

    /// Reads an Avro `float` (4 bytes, little-endian IEEE 754).
    #[inline]
    pub fn float(&mut self, field: &'static str) -> Result<f32, DecodeError> {
        Ok(f32::from_le_bytes(self.fixed(field)?))
    }

    /// Reads an Avro `double` (8 bytes, little-endian IEEE 754).
    #[inline]
    pub fn double(&mut self, field: &'static str) -> Result<f64, DecodeError> {
        Ok(f64::from_le_bytes(self.fixed(field)?))
    }

    /// Reads a length prefix and checks it against the remaining input.
    #[inline]
    fn len_prefix(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let len = self.long(field)?;
        if len < 0 {
            return Err(DecodeError::NegativeLength { field, len });
        }
        let remaining = self.remaining();
        match usize::try_from(len) {
            Ok(n) if n <= remaining => Ok(n),
            _ => Err(DecodeError::LengthBeyondInput { field, len, remaining }),
        }
    }

    /// Reads an Avro `bytes` value as a slice of the input.
    #[inline]
    pub fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.len_prefix(field)?;
        let start = self.pos;
        let out = self.buf.get(start..start + n).ok_or(DecodeError::Truncated { field })?;
        self.pos = start + n;
        Ok(out)
    }

    /// Reads an Avro `string` value as a UTF-8-checked slice of the input.
    #[inline]
    pub fn str(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let b = self.bytes(field)?;
        core::str::from_utf8(b).map_err(|_| DecodeError::InvalidUtf8 { field })
    }

    /// Reads a union branch index and checks it names one of `branches` branches.
    #[inline]
    pub fn union_index(
        &mut self,
        field: &'static str,
        branches: usize,
    ) -> Result<usize, DecodeError> {
        let index = self.long(field)?;
        match usize::try_from(index) {
            Ok(i) if i < branches => Ok(i),
            _ => Err(DecodeError::BadUnionIndex { field, index, branches }),
        }
    }

    /// Reads a two-branch union with `null`; `read` decodes the value branch.
    #[inline]
    pub fn opt<T>(
        &mut self,
        field: &'static str,
        null: NullBranch,
        read: impl FnOnce(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, DecodeError> {
        let index = self.union_index(field, 2)?;
        if index as i64 == null.null_index() { Ok(None) } else { read(self).map(Some) }
    }

    /// Reads an optional `string` union.
    #[inline]
    pub fn opt_str(
        &mut self,
        field: &'static str,
        null: NullBranch,
    ) -> Result<Option<&'a str>, DecodeError> {
        self.opt(field, null, |r| r.str(field))
    }

    /// Reads an optional `bytes` union.
    #[inline]
    pub fn opt_bytes(
        &mut self,
        field: &'static str,
        null: NullBranch,
    ) -> Result<Option<&'a [u8]>, DecodeError> {
        self.opt(field, null, |r| r.bytes(field))
    }

    /// Reads an optional `int` union.
    #[inline]
    pub fn opt_int(
        &mut self,
        field: &'static str,
        null: NullBranch,
    ) -> Result<Option<i32>, DecodeError> {
        self.opt(field, null, |r| r.int(field))
    }

    /// Reads one block header; `Ok(0)` ends the array or map.
    fn block_count(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let count = self.long(field)?;
        if count == 0 {
            return Ok(0);
        }
        if count < 0 {
            // A negative count is followed by the block's size in bytes.
            let size = self.long(field)?;
            if size < 0 {
                return Err(DecodeError::NegativeLength { field, len: size });
            }
            if size as u64 > self.remaining() as u64 {
                return Err(DecodeError::LengthBeyondInput {
                    field,
                    len: size,
                    remaining: self.remaining(),
                });
            }
        }
        let count = count.unsigned_abs();
        let remaining = self.remaining();
        // Every item this crate reads (string, bytes, string pair) takes at least one byte, so
        // a count above the remaining input is a lie; refusing it bounds allocation.
        match usize::try_from(count) {
            Ok(n) if n <= remaining => Ok(n),
            _ => Err(DecodeError::TooManyItems { field, count, remaining }),
        }
    }

    /// Reads an array whose items each take at least one byte; `read` decodes one item.
    pub fn array<T>(
        &mut self,
        field: &'static str,
        mut read: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let mut items = Vec::new();
        loop {
            let count = self.block_count(field)?;
            if count == 0 {
                return Ok(items);
            }
            items.reserve(count);
            for _ in 0..count {
                items.push(read(self)?);
            }
        }
    }

    /// Reads a `map<string>` as `(key, value)` pairs in wire order.
    pub fn str_map(&mut self, field: &'static str) -> Result<Vec<(&'a str, &'a str)>, DecodeError> {
        self.array(field, |r| Ok((r.str(field)?, r.str(field)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc_long(v: i64) -> Vec<u8> {
        let mut out = Vec::new();
        put_long(&mut out, v);
        out
    }

    #[test]
    fn long_known_encodings() {
        assert_eq!(enc_long(0), [0x00]);
        assert_eq!(enc_long(-1), [0x01]);
        assert_eq!(enc_long(1), [0x02]);
        assert_eq!(enc_long(42), [0x54]);
        assert_eq!(enc_long(-64), [0x7f]);
        assert_eq!(enc_long(64), [0x80, 0x01]);
        assert_eq!(enc_long(1_700_000_000_000), [0x80, 0xa0, 0xab, 0xfe, 0xf9, 0x62]);
        assert_eq!(enc_long(i64::MIN).len(), 10);
        assert_eq!(enc_long(i64::MAX).len(), 10);
    }

    #[test]
    fn varint_errors() {
        let too_long = [0xffu8; 11];
        assert_eq!(
            Reader::new(&too_long).long("f"),
            Err(DecodeError::VarintTooLong { field: "f" })
        );
        let mut overflow = [0xffu8; 10];
        overflow[9] = 0x02;
        assert_eq!(
            Reader::new(&overflow).long("f"),
            Err(DecodeError::VarintOverflow { field: "f" })
        );
        assert_eq!(Reader::new(&[0x80]).long("f"), Err(DecodeError::Truncated { field: "f" }));
        assert_eq!(Reader::new(&[]).long("f"), Err(DecodeError::Truncated { field: "f" }));
    }

    #[test]
    fn length_errors() {
        // -1 as a length
        assert_eq!(
            Reader::new(&[0x01]).bytes("p"),
            Err(DecodeError::NegativeLength { field: "p", len: -1 })
        );
        // 3 bytes declared, 2 present
        assert_eq!(
            Reader::new(&[0x06, b'a', b'b']).str("s"),
            Err(DecodeError::LengthBeyondInput { field: "s", len: 3, remaining: 2 })
        );
        // i64::MAX length must not allocate or overflow
        let mut huge = Vec::new();
        put_long(&mut huge, i64::MAX);
        assert!(matches!(
            Reader::new(&huge).bytes("p"),
            Err(DecodeError::LengthBeyondInput { .. })
        ));
        assert_eq!(
            Reader::new(&[0x04, 0xff, 0xfe]).str("s"),
            Err(DecodeError::InvalidUtf8 { field: "s" })
        );
    }

    #[test]
    fn union_and_int_errors() {
        assert_eq!(
            Reader::new(&[0x04]).opt_str("u", NullBranch::First),
            Err(DecodeError::BadUnionIndex { field: "u", index: 2, branches: 2 })
        );
        assert_eq!(
            Reader::new(&[0x01]).opt_str("u", NullBranch::First),
            Err(DecodeError::BadUnionIndex { field: "u", index: -1, branches: 2 })
        );
        let mut big = Vec::new();
        put_long(&mut big, i64::from(i32::MAX) + 1);
        assert_eq!(
            Reader::new(&big).int("i"),
            Err(DecodeError::IntOutOfRange { field: "i", value: i64::from(i32::MAX) + 1 })
        );
    }

    #[test]
    fn array_blocks() {
        // Two blocks, the second with a negative count and a byte size.
        let mut buf = Vec::new();
        put_long(&mut buf, 1);
        put_bytes(&mut buf, b"a");
        put_long(&mut buf, -2);
        put_long(&mut buf, 4);
        put_bytes(&mut buf, b"b");
        put_bytes(&mut buf, b"cd");
        put_long(&mut buf, 0);
        let items = Reader::new(&buf).array("xs", |r| r.bytes("xs"));
        assert_eq!(items, Ok(vec![&b"a"[..], b"b", b"cd"]));

        // A crafted count far beyond the input is refused before allocating.
        let mut lie = Vec::new();
        put_long(&mut lie, i64::MAX);
        assert!(matches!(
            Reader::new(&lie).array("xs", |r| r.bytes("xs")),
            Err(DecodeError::TooManyItems { .. })
        ));
        let mut lie = Vec::new();
        put_long(&mut lie, i64::MIN);
        put_long(&mut lie, 0);
        assert!(matches!(
            Reader::new(&lie).array("xs", |r| r.bytes("xs")),
            Err(DecodeError::TooManyItems { .. })
        ));
        // Missing terminator.
        let mut open = Vec::new();
        put_long(&mut open, 1);
        put_bytes(&mut open, b"a");
        assert_eq!(
            Reader::new(&open).array("xs", |r| r.bytes("xs")),
            Err(DecodeError::Truncated { field: "xs" })
        );
    }

    proptest! {
        #[test]
        fn long_roundtrip_and_len(v in any::<i64>()) {
            let buf = enc_long(v);
            prop_assert_eq!(buf.len(), long_len(v));
            let mut r = Reader::new(&buf);
            prop_assert_eq!(r.long("v"), Ok(v));
            prop_assert!(r.is_at_end());
        }

        #[test]
        fn str_roundtrip_and_len(s in any::<String>()) {
            let mut buf = Vec::new();
            put_str(&mut buf, &s);
            prop_assert_eq!(buf.len(), str_len(&s));
            prop_assert_eq!(Reader::new(&buf).str("s"), Ok(s.as_str()));
        }

        #[test]
        fn reader_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut r = Reader::new(&data);
            let _ = r.long("a");
            let _ = r.str("b");
            let _ = r.opt_bytes("c", NullBranch::Second);
            let _ = r.array("d", |r| r.str("d"));
            let _ = r.str_map("e");
        }
    }
}
