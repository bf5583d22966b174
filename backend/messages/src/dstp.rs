//! 13/DSTP: Data Samples Transmission Protocol records (namespace
//! `org.kaaproject.ipc.dstp.gen.v1`).

use crate::avro::{self, NullBranch, Reader};
use crate::{DecodeError, Record, header};
use bytes::BufMut;

/// `DataSamplesEvent`: endpoint data samples broadcast by the transmitter (DCX) on
/// `kaa.v1.events.<dcx>.endpoint.data-collection.data-samples-received`.
///
/// To encode from samples held elsewhere (e.g. a slice of `Bytes`) without building a `Vec`,
/// use [`DataSamplesHeader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSamplesEvent<'a> {
    /// `correlationId`: message id used to trace processing across services.
    pub correlation_id: &'a str,
    /// `timestamp`: creation time, Unix milliseconds.
    pub timestamp_ms: i64,
    /// `timeout`: milliseconds after `timestamp_ms` until the message expires; 0 = never.
    pub timeout_ms: i64,
    /// `appVersionName`: application version the samples were sent for.
    pub app_version_name: &'a str,
    /// `endpointId`: endpoint that originated the samples.
    pub endpoint_id: &'a str,
    /// `contentType` (schema default `application/json`): encoding of each sample.
    pub content_type: &'a str,
    /// `dataSamples`: one element per sample, each encoded per `content_type`.
    pub data_samples: Vec<&'a [u8]>,
}

/// The fields of a [`DataSamplesEvent`] other than the samples: encodes an event from any
/// slice of samples without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataSamplesHeader<'a> {
    /// `correlationId`.
    pub correlation_id: &'a str,
    /// `timestamp`, Unix milliseconds.
    pub timestamp_ms: i64,
    /// `timeout`, milliseconds; 0 = never.
    pub timeout_ms: i64,
    /// `appVersionName`.
    pub app_version_name: &'a str,
    /// `endpointId`.
    pub endpoint_id: &'a str,
    /// `contentType`.
    pub content_type: &'a str,
}

impl DataSamplesHeader<'_> {
    /// Exact length of the event these fields and `samples` encode to.
    pub fn encoded_len<S: AsRef<[u8]>>(&self, samples: &[S]) -> usize {
        header::len(self.correlation_id, self.timestamp_ms, self.timeout_ms)
            + avro::str_len(self.app_version_name)
            + avro::str_len(self.endpoint_id)
            + avro::str_len(self.content_type)
            + avro::array_len(samples, |s| avro::bytes_len(s.as_ref()))
    }

    /// Appends the raw Avro datum of the event made of these fields and `samples`.
    pub fn encode<B: BufMut, S: AsRef<[u8]>>(&self, samples: &[S], out: &mut B) {
        header::put(out, self.correlation_id, self.timestamp_ms, self.timeout_ms);
        avro::put_str(out, self.app_version_name);
        avro::put_str(out, self.endpoint_id);
        avro::put_str(out, self.content_type);
        avro::put_array(out, samples, |o, s| avro::put_bytes(o, s.as_ref()));
    }
}

impl<'a> DataSamplesEvent<'a> {
    /// The fields other than the samples.
    pub fn header(&self) -> DataSamplesHeader<'a> {
        DataSamplesHeader {
            correlation_id: self.correlation_id,
            timestamp_ms: self.timestamp_ms,
            timeout_ms: self.timeout_ms,
            app_version_name: self.app_version_name,
            endpoint_id: self.endpoint_id,
            content_type: self.content_type,
        }
    }
}

impl<'a> Record<'a> for DataSamplesEvent<'a> {
    const SCHEMA: &'static str = include_str!("../schemas/0013-ep-data-samples-event.avsc");

    fn encoded_len(&self) -> usize {
        self.header().encoded_len(&self.data_samples)
    }

    fn encode<B: BufMut>(&self, out: &mut B) {
        self.header().encode(&self.data_samples, out);
    }

    fn decode(input: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        let (correlation_id, timestamp_ms, timeout_ms) = header::read(&mut r)?;
        Ok(DataSamplesEvent {
            correlation_id,
            timestamp_ms,
            timeout_ms,
            app_version_name: r.str("appVersionName")?,
            endpoint_id: r.str("endpointId")?,
            content_type: r.str("contentType")?,
            data_samples: r.array("dataSamples", |r| r.bytes("dataSamples"))?,
        })
    }
}

/// `DataSamplesProcessed`: a receiver's answer to a [`DataSamplesEvent`], sent to the event's
/// reply subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataSamplesProcessed<'a> {
    /// `correlationId`: echoes the event's.
    pub correlation_id: &'a str,
    /// `timestamp`: creation time, Unix milliseconds.
    pub timestamp_ms: i64,
    /// `timeout`: milliseconds after `timestamp_ms` until the message expires; 0 = never.
    pub timeout_ms: i64,
    /// `receiverServiceInstanceName`: instance name of the answering receiver.
    pub receiver_service_instance_name: &'a str,
    /// `statusCode`: HTTP status code of the processing.
    pub status_code: i32,
    /// `reasonPhrase` (`["null","string"]`, default null): human-readable status reason.
    pub reason_phrase: Option<&'a str>,
}

impl<'a> Record<'a> for DataSamplesProcessed<'a> {
    const SCHEMA: &'static str = include_str!("../schemas/0013-ep-data-samples-processed.avsc");

    fn encoded_len(&self) -> usize {
        header::len(self.correlation_id, self.timestamp_ms, self.timeout_ms)
            + avro::str_len(self.receiver_service_instance_name)
            + avro::int_len(self.status_code)
            + avro::opt_str_len(self.reason_phrase)
    }

    fn encode<B: BufMut>(&self, out: &mut B) {
        header::put(out, self.correlation_id, self.timestamp_ms, self.timeout_ms);
        avro::put_str(out, self.receiver_service_instance_name);
        avro::put_int(out, self.status_code);
        avro::put_opt_str(out, self.reason_phrase, NullBranch::First);
    }

    fn decode(input: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        let (correlation_id, timestamp_ms, timeout_ms) = header::read(&mut r)?;
        Ok(DataSamplesProcessed {
            correlation_id,
            timestamp_ms,
            timeout_ms,
            receiver_service_instance_name: r.str("receiverServiceInstanceName")?,
            status_code: r.int("statusCode")?,
            reason_phrase: if r.is_at_end() {
                None
            } else {
                r.opt_str("reasonPhrase", NullBranch::First)?
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use apache_avro::types::Value;
    use proptest::prelude::*;

    const DATA_SAMPLES_EVENT: &str = "04633180a0abfef962000c6170702d76310865702d31206170706c69636174696f6e2f6a736f6e020e7b2274223a317d00";

    #[test]
    fn data_samples_event_vector() {
        let rec = DataSamplesEvent {
            correlation_id: "c1",
            timestamp_ms: 1_700_000_000_000,
            timeout_ms: 0,
            app_version_name: "app-v1",
            endpoint_id: "ep-1",
            content_type: "application/json",
            data_samples: vec![br#"{"t":1}"#],
        };
        let bytes = hex(DATA_SAMPLES_EVENT);
        assert_eq!(&rec.to_bytes()[..], &bytes[..]);
        assert_eq!(rec.encoded_len(), bytes.len());
        assert_eq!(DataSamplesEvent::decode(&bytes), Ok(rec.clone()));

        // The header form gives the same bytes from a slice of owned samples.
        let samples = [bytes::Bytes::from_static(br#"{"t":1}"#)];
        let mut out = bytes::BytesMut::new();
        rec.header().encode(&samples, &mut out);
        assert_eq!(&out[..], &bytes[..]);
        assert_eq!(rec.header().encoded_len(&samples), bytes.len());
    }

    #[test]
    fn data_samples_processed_without_reason_phrase_from_older_writer() {
        let rec = DataSamplesProcessed {
            correlation_id: "c1",
            timestamp_ms: 1,
            timeout_ms: 0,
            receiver_service_instance_name: "epts",
            status_code: 500,
            reason_phrase: Some("db down"),
        };
        let bytes = rec.to_bytes();
        let older = &bytes[..bytes.len() - avro::opt_str_len(Some("db down"))];
        assert_eq!(
            DataSamplesProcessed::decode(older),
            Ok(DataSamplesProcessed { reason_phrase: None, ..rec })
        );
    }

    proptest! {
        #[test]
        fn data_samples_event_matches_apache_avro(
            correlation_id in text(), timestamp_ms in long(), timeout_ms in long(),
            app_version_name in text(), endpoint_id in text(), content_type in text(),
            data_samples in proptest::collection::vec(blob(), 0..8),
        ) {
            let rec = DataSamplesEvent {
                correlation_id: &correlation_id,
                timestamp_ms,
                timeout_ms,
                app_version_name: &app_version_name,
                endpoint_id: &endpoint_id,
                content_type: &content_type,
                data_samples: data_samples.iter().map(Vec::as_slice).collect(),
            };
            let value = record(
                &correlation_id,
                timestamp_ms,
                timeout_ms,
                vec![
                    ("appVersionName", s(&app_version_name)),
                    ("endpointId", s(&endpoint_id)),
                    ("contentType", s(&content_type)),
                    (
                        "dataSamples",
                        Value::Array(data_samples.iter().map(|b| Value::Bytes(b.clone())).collect()),
                    ),
                ],
            );
            check_against_apache!(DataSamplesEvent, rec.clone(), value);
            check_prefixes!(DataSamplesEvent, rec.to_bytes(), None::<(usize, DataSamplesEvent<'_>)>);
        }

        #[test]
        fn data_samples_processed_matches_apache_avro(
            correlation_id in text(), timestamp_ms in long(), timeout_ms in long(),
            receiver in text(), status_code in int(), reason_phrase in opt_text(),
        ) {
            let rec = DataSamplesProcessed {
                correlation_id: &correlation_id,
                timestamp_ms,
                timeout_ms,
                receiver_service_instance_name: &receiver,
                status_code,
                reason_phrase: reason_phrase.as_deref(),
            };
            let value = record(
                &correlation_id,
                timestamp_ms,
                timeout_ms,
                vec![
                    ("receiverServiceInstanceName", s(&receiver)),
                    ("statusCode", Value::Int(status_code)),
                    ("reasonPhrase", opt_s(rec.reason_phrase, NullBranch::First)),
                ],
            );
            check_against_apache!(DataSamplesProcessed, rec, value);
            let bytes = rec.to_bytes();
            let older_len = bytes.len() - avro::opt_str_len(rec.reason_phrase);
            check_prefixes!(
                DataSamplesProcessed,
                bytes,
                Some((older_len, DataSamplesProcessed { reason_phrase: None, ..rec }))
            );
        }
    }
}
