//! 14/TSTP: Time Series Transmission Protocol records (namespace
//! `org.kaaproject.ipc.tstp.gen.v1`).

use crate::avro::{self, Reader};
use crate::{DecodeError, Record, header};
use bytes::BufMut;

/// One value of a [`DataPoint`]: the branches of the schema's value union, in its order
/// (`boolean`, `int`, `long`, `float`, `double`, `string`, `bytes`, `null`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TimeSeriesValue<'a> {
    /// Branch 0.
    Boolean(bool),
    /// Branch 1.
    Int(i32),
    /// Branch 2.
    Long(i64),
    /// Branch 3.
    Float(f32),
    /// Branch 4.
    Double(f64),
    /// Branch 5.
    String(&'a str),
    /// Branch 6.
    Bytes(&'a [u8]),
    /// Branch 7.
    Null,
}

impl<'a> TimeSeriesValue<'a> {
    fn encoded_len(&self) -> usize {
        1 + match self {
            TimeSeriesValue::Boolean(_) => 1,
            TimeSeriesValue::Int(i) => avro::int_len(*i),
            TimeSeriesValue::Long(l) => avro::long_len(*l),
            TimeSeriesValue::Float(_) => 4,
            TimeSeriesValue::Double(_) => 8,
            TimeSeriesValue::String(s) => avro::str_len(s),
            TimeSeriesValue::Bytes(b) => avro::bytes_len(b),
            TimeSeriesValue::Null => 0,
        }
    }

    fn encode<B: BufMut>(&self, out: &mut B) {
        match self {
            TimeSeriesValue::Boolean(b) => {
                avro::put_union_index(out, 0);
                out.put_u8(u8::from(*b));
            }
            TimeSeriesValue::Int(i) => {
                avro::put_union_index(out, 1);
                avro::put_int(out, *i);
            }
            TimeSeriesValue::Long(l) => {
                avro::put_union_index(out, 2);
                avro::put_long(out, *l);
            }
            TimeSeriesValue::Float(f) => {
                avro::put_union_index(out, 3);
                out.put_f32_le(*f);
            }
            TimeSeriesValue::Double(d) => {
                avro::put_union_index(out, 4);
                out.put_f64_le(*d);
            }
            TimeSeriesValue::String(s) => {
                avro::put_union_index(out, 5);
                avro::put_str(out, s);
            }
            TimeSeriesValue::Bytes(b) => {
                avro::put_union_index(out, 6);
                avro::put_bytes(out, b);
            }
            TimeSeriesValue::Null => avro::put_union_index(out, 7),
        }
    }

    fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        const FIELD: &str = "values";
        Ok(match r.union_index(FIELD, 8)? {
            0 => TimeSeriesValue::Boolean(r.boolean(FIELD)?),
            1 => TimeSeriesValue::Int(r.int(FIELD)?),
            2 => TimeSeriesValue::Long(r.long(FIELD)?),
            3 => TimeSeriesValue::Float(r.float(FIELD)?),
            4 => TimeSeriesValue::Double(r.double(FIELD)?),
            5 => TimeSeriesValue::String(r.str(FIELD)?),
            6 => TimeSeriesValue::Bytes(r.bytes(FIELD)?),
            _ => TimeSeriesValue::Null,
        })
    }
}

/// `DataPoint`: one point of a time series.
#[derive(Debug, Clone, PartialEq)]
pub struct DataPoint<'a> {
    /// `ingestionTimestamp` (formerly `systemTimestamp`): when the platform received it, Unix
    /// milliseconds.
    pub ingestion_timestamp_ms: i64,
    /// `timestamp`: the point's time, Unix milliseconds.
    pub timestamp_ms: i64,
    /// `values`: the named values, as map entries in wire order.
    pub values: Vec<(&'a str, TimeSeriesValue<'a>)>,
}

impl DataPoint<'_> {
    fn encoded_len(&self) -> usize {
        avro::long_len(self.ingestion_timestamp_ms)
            + avro::long_len(self.timestamp_ms)
            + avro::array_len(&self.values, |(k, v)| avro::str_len(k) + v.encoded_len())
    }

    fn encode<B: BufMut>(&self, out: &mut B) {
        avro::put_long(out, self.ingestion_timestamp_ms);
        avro::put_long(out, self.timestamp_ms);
        avro::put_array(out, &self.values, |o, (k, v)| {
            avro::put_str(o, k);
            v.encode(o);
        });
    }
}

/// `TimeSeriesEvent`: the points of one series of one endpoint, broadcast on
/// `kaa.v1.events.<transmitter>.endpoint.data-collection.data-points-received.<series>`.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeSeriesEvent<'a> {
    /// `correlationId`.
    pub correlation_id: &'a str,
    /// `timestamp`: creation time, Unix milliseconds.
    pub timestamp_ms: i64,
    /// `timeout`: milliseconds after `timestamp_ms` until the message expires; 0 = never.
    pub timeout_ms: i64,
    /// `appVersionName`.
    pub app_version_name: &'a str,
    /// `endpointId`.
    pub endpoint_id: &'a str,
    /// `timeSeriesName`.
    pub time_series_name: &'a str,
    /// `dataPoints`.
    pub data_points: Vec<DataPoint<'a>>,
}

impl<'a> Record<'a> for TimeSeriesEvent<'a> {
    const SCHEMA: &'static str = include_str!("../schemas/0014-ep-time-series-event.avsc");

    fn encoded_len(&self) -> usize {
        header::len(self.correlation_id, self.timestamp_ms, self.timeout_ms)
            + avro::str_len(self.app_version_name)
            + avro::str_len(self.endpoint_id)
            + avro::str_len(self.time_series_name)
            + avro::array_len(&self.data_points, DataPoint::encoded_len)
    }

    fn encode<B: BufMut>(&self, out: &mut B) {
        header::put(out, self.correlation_id, self.timestamp_ms, self.timeout_ms);
        avro::put_str(out, self.app_version_name);
        avro::put_str(out, self.endpoint_id);
        avro::put_str(out, self.time_series_name);
        avro::put_array(out, &self.data_points, |o, p| p.encode(o));
    }

    fn decode(input: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        let (correlation_id, timestamp_ms, timeout_ms) = header::read(&mut r)?;
        Ok(TimeSeriesEvent {
            correlation_id,
            timestamp_ms,
            timeout_ms,
            app_version_name: r.str("appVersionName")?,
            endpoint_id: r.str("endpointId")?,
            time_series_name: r.str("timeSeriesName")?,
            data_points: r.array("dataPoints", |r| {
                Ok(DataPoint {
                    ingestion_timestamp_ms: r.long("ingestionTimestamp")?,
                    timestamp_ms: r.long("timestamp")?,
                    values: r
                        .array("values", |r| Ok((r.str("values")?, TimeSeriesValue::decode(r)?)))?,
                })
            })?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use apache_avro::types::Value;
    use proptest::prelude::*;

    const TIME_SERIES_EVENT: &str = "04633180a0abfef962000c6170702d76310865702d311674656d7065726174757265020080a0abfef962020a76616c75650800000000008035400000";

    #[test]
    fn time_series_event_vector() {
        let rec = TimeSeriesEvent {
            correlation_id: "c1",
            timestamp_ms: 1_700_000_000_000,
            timeout_ms: 0,
            app_version_name: "app-v1",
            endpoint_id: "ep-1",
            time_series_name: "temperature",
            data_points: vec![DataPoint {
                ingestion_timestamp_ms: 0,
                timestamp_ms: 1_700_000_000_000,
                values: vec![("value", TimeSeriesValue::Double(21.5))],
            }],
        };
        let bytes = hex(TIME_SERIES_EVENT);
        assert_eq!(&rec.to_bytes()[..], &bytes[..]);
        assert_eq!(rec.encoded_len(), bytes.len());
        assert_eq!(TimeSeriesEvent::decode(&bytes), Ok(rec));
    }

    #[test]
    fn a_boolean_byte_other_than_0_or_1_is_refused() {
        let rec = TimeSeriesEvent {
            correlation_id: "c",
            timestamp_ms: 1,
            timeout_ms: 0,
            app_version_name: "a",
            endpoint_id: "e",
            time_series_name: "s",
            data_points: vec![DataPoint {
                ingestion_timestamp_ms: 0,
                timestamp_ms: 0,
                values: vec![("v", TimeSeriesValue::Boolean(true))],
            }],
        };
        let mut bytes = rec.to_bytes().to_vec();
        let at = bytes.len() - 3; // the boolean byte, before the two block terminators
        assert_eq!(bytes[at], 1);
        bytes[at] = 2;
        assert!(matches!(
            TimeSeriesEvent::decode(&bytes),
            Err(DecodeError::BadBoolean { byte: 2, .. })
        ));
    }

    fn value() -> impl Strategy<Value = (u8, bool, i32, i64, f32, f64, String, Vec<u8>)> {
        (
            0u8..8,
            any::<bool>(),
            int(),
            long(),
            -1e30f32..1e30,
            prop_oneof![any::<f64>().prop_filter("not NaN", |d| !d.is_nan()), Just(0.0)],
            text(),
            blob(),
        )
    }

    fn ours(v: &(u8, bool, i32, i64, f32, f64, String, Vec<u8>)) -> TimeSeriesValue<'_> {
        match v.0 {
            0 => TimeSeriesValue::Boolean(v.1),
            1 => TimeSeriesValue::Int(v.2),
            2 => TimeSeriesValue::Long(v.3),
            3 => TimeSeriesValue::Float(v.4),
            4 => TimeSeriesValue::Double(v.5),
            5 => TimeSeriesValue::String(&v.6),
            6 => TimeSeriesValue::Bytes(&v.7),
            _ => TimeSeriesValue::Null,
        }
    }

    fn theirs(v: TimeSeriesValue<'_>) -> Value {
        let (i, inner) = match v {
            TimeSeriesValue::Boolean(b) => (0, Value::Boolean(b)),
            TimeSeriesValue::Int(i) => (1, Value::Int(i)),
            TimeSeriesValue::Long(l) => (2, Value::Long(l)),
            TimeSeriesValue::Float(f) => (3, Value::Float(f)),
            TimeSeriesValue::Double(d) => (4, Value::Double(d)),
            TimeSeriesValue::String(s) => (5, Value::String(s.to_owned())),
            TimeSeriesValue::Bytes(b) => (6, Value::Bytes(b.to_vec())),
            TimeSeriesValue::Null => (7, Value::Null),
        };
        Value::Union(i, Box::new(inner))
    }

    proptest! {
        // apache-avro holds a map as a HashMap and writes it in no fixed order, so the byte
        // comparison uses one value per point; multi-value points are checked by reading our
        // bytes back with apache-avro.
        #[test]
        fn time_series_event_matches_apache_avro(
            correlation_id in text(), timestamp_ms in long(), timeout_ms in long(),
            app_version_name in text(), endpoint_id in text(), series in text(),
            points in proptest::collection::vec(
                (long(), long(), proptest::option::of((text(), value()))), 0..5),
        ) {
            let rec = TimeSeriesEvent {
                correlation_id: &correlation_id,
                timestamp_ms,
                timeout_ms,
                app_version_name: &app_version_name,
                endpoint_id: &endpoint_id,
                time_series_name: &series,
                data_points: points
                    .iter()
                    .map(|(ingested, ts, v)| DataPoint {
                        ingestion_timestamp_ms: *ingested,
                        timestamp_ms: *ts,
                        values: v.iter().map(|(k, v)| (k.as_str(), ours(v))).collect(),
                    })
                    .collect(),
            };
            let value = record(
                &correlation_id,
                timestamp_ms,
                timeout_ms,
                vec![
                    ("appVersionName", s(&app_version_name)),
                    ("endpointId", s(&endpoint_id)),
                    ("timeSeriesName", s(&series)),
                    (
                        "dataPoints",
                        Value::Array(
                            rec.data_points
                                .iter()
                                .map(|p| {
                                    Value::Record(vec![
                                        ("ingestionTimestamp".into(), Value::Long(p.ingestion_timestamp_ms)),
                                        ("timestamp".into(), Value::Long(p.timestamp_ms)),
                                        (
                                            "values".into(),
                                            Value::Map(
                                                p.values
                                                    .iter()
                                                    .map(|(k, v)| ((*k).to_owned(), theirs(*v)))
                                                    .collect(),
                                            ),
                                        ),
                                    ])
                                })
                                .collect(),
                        ),
                    ),
                ],
            );
            check_against_apache!(TimeSeriesEvent, rec.clone(), value);
            check_prefixes!(TimeSeriesEvent, rec.to_bytes(), None::<(usize, TimeSeriesEvent<'_>)>);
        }

        #[test]
        fn points_with_many_values_read_back_with_apache_avro(
            values in proptest::collection::btree_map("[a-z]{1,8}", value(), 0..6),
        ) {
            let rec = TimeSeriesEvent {
                correlation_id: "c",
                timestamp_ms: 1,
                timeout_ms: 0,
                app_version_name: "a",
                endpoint_id: "e",
                time_series_name: "s",
                data_points: vec![DataPoint {
                    ingestion_timestamp_ms: 2,
                    timestamp_ms: 3,
                    values: values.iter().map(|(k, v)| (k.as_str(), ours(v))).collect(),
                }],
            };
            let bytes = rec.to_bytes();
            prop_assert_eq!(bytes.len(), rec.encoded_len());
            let schema = schema(TimeSeriesEvent::SCHEMA);
            let parsed = apache_avro::from_avro_datum(&schema, &mut &bytes[..], None).unwrap();
            let Value::Record(fields) = parsed else { panic!("not a record") };
            let Value::Array(points) = &fields[6].1 else { panic!("not an array") };
            let Value::Record(point) = &points[0] else { panic!("not a record") };
            let Value::Map(map) = &point[2].1 else { panic!("not a map") };
            prop_assert_eq!(map.len(), values.len());
            for (k, v) in &values {
                prop_assert_eq!(map.get(k), Some(&theirs(ours(v))));
            }
            prop_assert_eq!(TimeSeriesEvent::decode(&bytes).unwrap(), rec);
        }
    }
}
