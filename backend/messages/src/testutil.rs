//! Shared helpers for the record tests: proptest strategies, `apache-avro` value builders and
//! the checks every record goes through.

// Test support: a broken expectation here is a failed test, so it may panic.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use crate::avro::NullBranch;
use apache_avro::Schema;
use apache_avro::types::Value;
use proptest::prelude::*;

/// Decodes a hex string of a test vector.
pub(crate) fn hex(s: &str) -> Vec<u8> {
    s.as_bytes()
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

/// Parses an `.avsc` schema with `apache-avro`.
pub(crate) fn schema(text: &str) -> Schema {
    Schema::parse_str(text).unwrap()
}

/// Strings: arbitrary Unicode (often empty or short), empty, and long enough for multi-byte
/// length prefixes.
pub(crate) fn text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => any::<String>(),
        1 => Just(String::new()),
        1 => "[a-zA-Z0-9/_.-]{60,300}",
        1 => "[ü€😀a]{20,80}",
    ]
    .boxed()
}

/// Optional strings.
pub(crate) fn opt_text() -> BoxedStrategy<Option<String>> {
    proptest::option::of(text()).boxed()
}

/// Byte payloads, empty to a few hundred bytes.
pub(crate) fn blob() -> BoxedStrategy<Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..300).boxed()
}

/// Longs, biased towards edge values.
pub(crate) fn long() -> BoxedStrategy<i64> {
    prop_oneof![
        3 => any::<i64>(),
        1 => -130i64..130,
        1 => Just(i64::MIN),
        1 => Just(i64::MAX),
        1 => Just(0i64),
    ]
    .boxed()
}

/// Ints, biased towards edge values.
pub(crate) fn int() -> BoxedStrategy<i32> {
    prop_oneof![
        3 => any::<i32>(),
        1 => -130i32..130,
        1 => Just(i32::MIN),
        1 => Just(i32::MAX),
    ]
    .boxed()
}

/// `apache-avro` string value.
pub(crate) fn s(v: &str) -> Value {
    Value::String(v.to_owned())
}

fn union(v: Option<Value>, null: NullBranch) -> Value {
    match v {
        Some(v) => Value::Union(null.value_index() as u32, Box::new(v)),
        None => Value::Union(null.null_index() as u32, Box::new(Value::Null)),
    }
}

/// `apache-avro` value of an optional string union.
pub(crate) fn opt_s(v: Option<&str>, null: NullBranch) -> Value {
    union(v.map(s), null)
}

/// `apache-avro` value of an optional bytes union.
pub(crate) fn opt_b(v: Option<&[u8]>, null: NullBranch) -> Value {
    union(v.map(|b| Value::Bytes(b.to_vec())), null)
}

/// `apache-avro` value of an optional int union.
pub(crate) fn opt_i(v: Option<i32>, null: NullBranch) -> Value {
    union(v.map(Value::Int), null)
}

/// `apache-avro` record value: the common header, then `rest`.
pub(crate) fn record(
    correlation_id: &str,
    timestamp_ms: i64,
    timeout_ms: i64,
    rest: Vec<(&str, Value)>,
) -> Value {
    let mut fields = vec![
        ("correlationId".to_owned(), s(correlation_id)),
        ("timestamp".to_owned(), Value::Long(timestamp_ms)),
        ("timeout".to_owned(), Value::Long(timeout_ms)),
    ];
    fields.extend(rest.into_iter().map(|(k, v)| (k.to_owned(), v)));
    Value::Record(fields)
}

/// Checks a record against `apache-avro`: same bytes as `to_avro_datum`, exact
/// `encoded_len()`, `from_avro_datum` accepts our bytes and reads `value` back, and our decoder
/// returns the record. Use inside `proptest!`.
macro_rules! check_against_apache {
    ($ty:ident, $rec:expr, $value:expr) => {{
        use $crate::Record as _;
        let rec = $rec;
        let value: apache_avro::types::Value = $value;
        let ours = rec.to_bytes();
        prop_assert_eq!(ours.len(), rec.encoded_len(), "encoded_len is not exact");
        let schema = $crate::testutil::schema($ty::SCHEMA);
        let theirs = apache_avro::to_avro_datum(&schema, value.clone()).unwrap();
        prop_assert_eq!(&ours[..], &theirs[..], "bytes differ from apache-avro");
        let parsed = apache_avro::from_avro_datum(&schema, &mut &ours[..], None).unwrap();
        prop_assert_eq!(&parsed, &value, "apache-avro reads back something else");
        let back = $ty::decode(&ours[..]).unwrap();
        prop_assert_eq!(&back, &rec, "decode(encode(x)) != x");
        // A newer writer's extra trailing bytes are ignored.
        let mut longer = ours.to_vec();
        longer.extend_from_slice(&[0x02, 0x04, 0x61, 0x62]);
        prop_assert_eq!(&$ty::decode(&longer[..]).unwrap(), &rec);
    }};
}
pub(crate) use check_against_apache;

/// Checks that every strict prefix of `bytes` fails to decode, except the one of length
/// `older_len` (if any), which must decode to `older` (an older writer's message without the
/// trailing defaulted field).
macro_rules! check_prefixes {
    ($ty:ident, $bytes:expr, $older:expr) => {{
        use $crate::Record as _;
        let bytes: &[u8] = &$bytes[..];
        let older: Option<(usize, _)> = $older;
        for n in 0..bytes.len() {
            let got = $ty::decode(&bytes[..n]);
            match &older {
                Some((len, rec)) if *len == n => {
                    prop_assert_eq!(got.as_ref(), Ok(rec), "older-writer prefix of {} bytes", n)
                }
                _ => prop_assert!(got.is_err(), "prefix of {} bytes decoded: {:?}", n, got),
            }
        }
    }};
}
pub(crate) use check_prefixes;
