//! Avro records of the Kaa inter-service protocols, and their NATS subjects.
//!
//! This crate defines the messages that fleetgate services exchange on the bus, byte-compatible
//! with the Kaa platform:
//!
//! * 4/ESP: [`ClientData`] (gateway → extension) and [`ExtensionData`] (extension → gateway);
//! * 6/CDTP: [`ConfigUpdated`], [`ConfigApplied`], [`ConfigRequest`] and [`ConfigResponse`];
//! * 9/ELCE: [`ConnectedEvent`] and [`DisconnectedEvent`];
//! * 13/DSTP: [`DataSamplesEvent`] and [`DataSamplesProcessed`];
//! * 14/TSTP: [`TimeSeriesEvent`];
//! * 16/ECAP: [`EndpointTokenValidationRequest`]/[`EndpointTokenValidationResponse`],
//!   [`ClientUsernamePasswordValidationRequest`]/[`ClientUsernamePasswordValidationResponse`]
//!   and [`EndpointTokenRevokedEvent`];
//! * 3/ISM subject builders in [`subjects`].
//!
//! Every record is a borrowed struct that implements [`Record`]: its `.avsc` schema text, the
//! exact encoded length, an encoder into any [`bytes::BufMut`] that does not allocate, and a
//! zero-copy decoder that borrows strings and payloads from the input. The wire format is the raw
//! Avro binary datum with no header, as the Kaa services use on NATS. The hand-written codec in
//! [`avro`] is tested byte for byte against `apache-avro` and the test vectors of the Kaa
//! protocol summary.
//!
//! Decoders follow Avro schema evolution the way Kaa messages need: trailing fields that have a
//! default in the schema (e.g. `ClientData.configName`, `reasonPhrase`) take it when an older
//! writer left them out, and bytes after the last known field (a newer writer) are ignored.
//!
//! This crate does no I/O and knows nothing about the bus, NATS, tokio or transports: it turns
//! records into bytes and back, and builds subject strings.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod avro;
mod cdtp;
mod dstp;
mod ecap;
mod elce;
mod esp;
pub mod subjects;
mod tstp;

#[cfg(test)]
mod testutil;

pub use avro::DecodeError;
pub use cdtp::{ConfigApplied, ConfigRequest, ConfigResponse, ConfigUpdated};
pub use dstp::{DataSamplesEvent, DataSamplesHeader, DataSamplesProcessed};
pub use ecap::{
    ClientCertificateValidationRequest, ClientCertificateValidationResponse,
    ClientCredentialRevokedEvent, ClientUsernamePasswordValidationRequest,
    ClientUsernamePasswordValidationResponse, EndpointTokenRevokedEvent,
    EndpointTokenValidationRequest, EndpointTokenValidationResponse,
};
pub use elce::{ConnectedEvent, DisconnectedEvent};
pub use esp::{ClientData, ExtensionData};
pub use tstp::{DataPoint, TimeSeriesEvent, TimeSeriesValue};

/// An Avro record of a Kaa inter-service protocol, borrowed from the buffer it was decoded from
/// (or from the values it will be encoded from).
pub trait Record<'a>: Sized {
    /// The `.avsc` schema text, as published in the Kaa RFC repository.
    const SCHEMA: &'static str;

    /// Exact length of the encoding, so callers can reserve once.
    fn encoded_len(&self) -> usize;

    /// Appends the raw Avro datum (no header) to `out`.
    ///
    /// Does not allocate beyond what `out` itself needs to grow (none if it has
    /// [`encoded_len`](Record::encoded_len) spare capacity). Panics only if `out` cannot grow,
    /// e.g. a fixed `&mut [u8]` shorter than `encoded_len()`.
    fn encode<B: bytes::BufMut>(&self, out: &mut B);

    /// Decodes a raw Avro datum.
    ///
    /// Fields missing at the end of the input that have a default in the schema take it (older
    /// writers); bytes after the last known field are ignored (newer writers append fields).
    fn decode(input: &'a [u8]) -> Result<Self, DecodeError>;

    /// Encodes into a fresh [`bytes::Bytes`] of exactly [`encoded_len`](Record::encoded_len)
    /// bytes.
    fn to_bytes(&self) -> bytes::Bytes {
        let mut buf = bytes::BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut buf);
        buf.freeze()
    }
}

/// Records up to this size are encoded into a shared per-thread arena by [`encode_pooled`].
const ARENA_MAX_RECORD: usize = 8 * 1024;
/// Size of each arena chunk.
const ARENA_CHUNK: usize = 64 * 1024;

thread_local! {
    static ARENA: std::cell::RefCell<bytes::BytesMut> =
        std::cell::RefCell::new(bytes::BytesMut::new());
}

/// Encodes `record` like [`Record::to_bytes`], but small records share 64 KiB chunks of a
/// per-thread arena instead of costing an allocation each: what the per-message hot path uses.
/// A chunk is freed once every record encoded into it has been dropped.
pub fn encode_pooled<'a, R: Record<'a>>(record: &R) -> bytes::Bytes {
    let len = record.encoded_len();
    if len > ARENA_MAX_RECORD {
        return record.to_bytes();
    }
    ARENA.with_borrow_mut(|arena| {
        if arena.capacity() < len {
            *arena = bytes::BytesMut::with_capacity(ARENA_CHUNK);
        }
        record.encode(arena);
        arena.split().freeze()
    })
}

/// The `correlationId` of any 3/ISM record here/// The `correlationId` of any 3/ISM record here (it is every record's first field), without
/// decoding the rest: what a requester needs to match a reply to its request.
pub fn correlation_id(payload: &[u8]) -> Option<&str> {
    avro::Reader::new(payload).str(header::CORRELATION_ID).ok()
}

/// The 3/ISM common fields every record here opens with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IsmHeader<'a> {
    /// `correlationId`.
    pub correlation_id: &'a str,
    /// `timestamp`, Unix milliseconds.
    pub timestamp_ms: i64,
    /// `timeout`, milliseconds after `timestamp`; 0 = never.
    pub timeout_ms: i64,
}

/// Reads the 3/ISM common fields of any record here without decoding the rest, e.g. to drop
/// an expired request before doing any work for it.
pub fn ism_header(payload: &[u8]) -> Option<IsmHeader<'_>> {
    let (correlation_id, timestamp_ms, timeout_ms) =
        header::read(&mut avro::Reader::new(payload)).ok()?;
    Some(IsmHeader { correlation_id, timestamp_ms, timeout_ms })
}

/// The 3/ISM common fields that open every record here: `correlationId`, `timestamp`,
/// `timeout`.
pub(crate) mod header {
    use crate::DecodeError;
    use crate::avro::{self, Reader};
    use bytes::BufMut;

    /// Avro field names of the common fields.
    pub(crate) const CORRELATION_ID: &str = "correlationId";
    pub(crate) const TIMESTAMP: &str = "timestamp";
    pub(crate) const TIMEOUT: &str = "timeout";

    #[inline]
    pub(crate) fn len(correlation_id: &str, timestamp_ms: i64, timeout_ms: i64) -> usize {
        avro::str_len(correlation_id) + avro::long_len(timestamp_ms) + avro::long_len(timeout_ms)
    }

    #[inline]
    pub(crate) fn put<B: BufMut>(
        out: &mut B,
        correlation_id: &str,
        timestamp_ms: i64,
        timeout_ms: i64,
    ) {
        avro::put_str(out, correlation_id);
        avro::put_long(out, timestamp_ms);
        avro::put_long(out, timeout_ms);
    }

    #[inline]
    pub(crate) fn read<'a>(r: &mut Reader<'a>) -> Result<(&'a str, i64, i64), DecodeError> {
        Ok((r.str(CORRELATION_ID)?, r.long(TIMESTAMP)?, r.long(TIMEOUT)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(data: &[u8]) {
        let _ = ClientData::decode(data);
        let _ = ExtensionData::decode(data);
        let _ = DataSamplesEvent::decode(data);
        let _ = DataSamplesProcessed::decode(data);
        let _ = EndpointTokenValidationRequest::decode(data);
        let _ = EndpointTokenValidationResponse::decode(data);
        let _ = ClientUsernamePasswordValidationRequest::decode(data);
        let _ = ClientUsernamePasswordValidationResponse::decode(data);
        let _ = EndpointTokenRevokedEvent::decode(data);
        let _ = ConnectedEvent::decode(data);
        let _ = DisconnectedEvent::decode(data);
        let _ = TimeSeriesEvent::decode(data);
        let _ = ConfigUpdated::decode(data);
        let _ = ConfigApplied::decode(data);
        let _ = ConfigRequest::decode(data);
        let _ = ConfigResponse::decode(data);
    }

    fn samples() -> Vec<Vec<u8>> {
        vec![
            ClientData {
                correlation_id: "c1",
                timestamp_ms: 1_700_000_000_000,
                timeout_ms: 5_000,
                app_version_name: "app-v1",
                endpoint_id: Some("ep-1"),
                resource_path: "/json",
                request_id: Some(42),
                payload: b"[1,2,3]",
                config_name: Some("net"),
            }
            .to_bytes()
            .to_vec(),
            DataSamplesEvent {
                correlation_id: "c1",
                timestamp_ms: 1,
                timeout_ms: 0,
                app_version_name: "app-v1",
                endpoint_id: "ep-1",
                content_type: "application/json",
                data_samples: vec![b"1", b"{}", b""],
            }
            .to_bytes()
            .to_vec(),
            ConnectedEvent {
                correlation_id: "c1",
                timestamp_ms: 1,
                timeout_ms: 0,
                endpoints: vec![("ep-1", "app-v1"), ("ep-2", "app-v2")],
                originator_replica_id: "gw-0",
            }
            .to_bytes()
            .to_vec(),
        ]
    }

    #[test]
    fn pooled_encoding_equals_to_bytes_across_chunks() {
        let mut kept = Vec::new();
        // Enough records, small and large, to fill several arena chunks.
        for i in 0..5_000usize {
            let payload = vec![b'x'; if i % 500 == 0 { ARENA_MAX_RECORD + 1 } else { i % 200 }];
            let correlation_id = format!("c{i}");
            let data = ClientData {
                correlation_id: &correlation_id,
                timestamp_ms: 1,
                timeout_ms: 2,
                app_version_name: "app-v1",
                endpoint_id: Some("ep-1"),
                resource_path: "/json",
                request_id: None,
                payload: &payload,
                config_name: None,
            };
            let pooled = encode_pooled(&data);
            assert_eq!(pooled, data.to_bytes());
            kept.push((pooled, data.to_bytes()));
        }
        // Earlier records are unchanged by later ones written into the same chunk.
        for (pooled, expected) in kept {
            assert_eq!(pooled, expected);
        }
    }

    proptest! {
        #[test]
        fn decode_of_arbitrary_bytes_never_panics(
            data in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            decode_all(&data);
        }

        #[test]
        fn decode_of_mutated_messages_never_panics(
            which in 0usize..3,
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut data = samples().swap_remove(which);
            for (at, byte) in edits {
                let i = at.index(data.len());
                data[i] = byte;
            }
            decode_all(&data);
        }
    }

    #[test]
    fn error_messages_say_what_is_wrong() {
        let err = ClientData::decode(&[0x04, b'c']).unwrap_err();
        assert_eq!(
            err.to_string(),
            "malformed Avro message: field `correlationId` declares 2 bytes but only 1 remain"
        );
    }
}

#[cfg(test)]
mod header_tests {
    use super::*;

    #[test]
    fn reads_the_common_fields_of_any_record() {
        let request = EndpointTokenValidationRequest {
            correlation_id: "c9",
            timestamp_ms: 1_700_000_000_000,
            timeout_ms: 250,
            app_name: "demo-v1",
            token: "t",
        };
        let bytes = request.to_bytes();
        let h = ism_header(&bytes).expect("header");
        assert_eq!(
            (h.correlation_id, h.timestamp_ms, h.timeout_ms),
            ("c9", 1_700_000_000_000, 250)
        );
        assert_eq!(correlation_id(&bytes), Some("c9"));
        assert_eq!(ism_header(&bytes[..3]), None);
    }
}
