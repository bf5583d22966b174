//! 9/ELCE: Endpoint Lifecycle and Connectivity Events, connectivity group (namespace
//! `org.kaaproject.ipc.event.gen.v1.endpoint.connectivity`).
//!
//! `ConnectedEvent` and `DisconnectedEvent` have the same layout; one implementation serves
//! both.

use crate::avro::{self, Reader};
use crate::{DecodeError, header};
use bytes::BufMut;

const ENDPOINTS: &str = "endpoints";
const ORIGINATOR_REPLICA_ID: &str = "originatorReplicaId";

#[inline]
fn encoded_len(
    correlation_id: &str,
    timestamp_ms: i64,
    timeout_ms: i64,
    endpoints: &[(&str, &str)],
    originator_replica_id: &str,
) -> usize {
    header::len(correlation_id, timestamp_ms, timeout_ms)
        + avro::str_map_len(endpoints)
        + avro::str_len(originator_replica_id)
}

#[inline]
fn encode<B: BufMut>(
    out: &mut B,
    correlation_id: &str,
    timestamp_ms: i64,
    timeout_ms: i64,
    endpoints: &[(&str, &str)],
    originator_replica_id: &str,
) {
    header::put(out, correlation_id, timestamp_ms, timeout_ms);
    avro::put_str_map(out, endpoints);
    avro::put_str(out, originator_replica_id);
}

/// Decoded fields in wire order.
type Fields<'a> = (&'a str, i64, i64, Vec<(&'a str, &'a str)>, &'a str);

#[inline]
fn decode(input: &[u8]) -> Result<Fields<'_>, DecodeError> {
    let mut r = Reader::new(input);
    let (correlation_id, timestamp_ms, timeout_ms) = header::read(&mut r)?;
    let endpoints = r.str_map(ENDPOINTS)?;
    let originator_replica_id = r.str(ORIGINATOR_REPLICA_ID)?;
    Ok((correlation_id, timestamp_ms, timeout_ms, endpoints, originator_replica_id))
}

macro_rules! connectivity_event {
    ($(#[$doc:meta])* $name:ident, $schema:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name<'a> {
            /// `correlationId`: message id used to trace processing across services.
            pub correlation_id: &'a str,
            /// `timestamp`: creation time, Unix milliseconds.
            pub timestamp_ms: i64,
            /// `timeout`: milliseconds after `timestamp_ms` until the message expires; 0 = never.
            pub timeout_ms: i64,
            /// `endpoints` (`map<string>`): endpoint id → application version name, in wire
            /// order. An Avro map has unique keys; the encoder writes the pairs as given.
            pub endpoints: Vec<(&'a str, &'a str)>,
            /// `originatorReplicaId`: replica that emitted the event.
            pub originator_replica_id: &'a str,
        }

        impl<'a> $crate::Record<'a> for $name<'a> {
            const SCHEMA: &'static str = include_str!($schema);

            fn encoded_len(&self) -> usize {
                encoded_len(
                    self.correlation_id,
                    self.timestamp_ms,
                    self.timeout_ms,
                    &self.endpoints,
                    self.originator_replica_id,
                )
            }

            fn encode<B: BufMut>(&self, out: &mut B) {
                encode(
                    out,
                    self.correlation_id,
                    self.timestamp_ms,
                    self.timeout_ms,
                    &self.endpoints,
                    self.originator_replica_id,
                );
            }

            fn decode(input: &'a [u8]) -> Result<Self, DecodeError> {
                let (correlation_id, timestamp_ms, timeout_ms, endpoints, originator_replica_id) =
                    decode(input)?;
                Ok($name {
                    correlation_id,
                    timestamp_ms,
                    timeout_ms,
                    endpoints,
                    originator_replica_id,
                })
            }
        }
    };
}

connectivity_event!(
    /// `ConnectedEvent`: endpoints came online, broadcast on
    /// `kaa.v1.events.<originator>.endpoint.connectivity.connected`.
    ConnectedEvent,
    "../schemas/0009-ep-connected.avsc"
);

connectivity_event!(
    /// `DisconnectedEvent`: endpoints went offline, broadcast on
    /// `kaa.v1.events.<originator>.endpoint.connectivity.disconnected`. A session drop that
    /// covers many endpoints should send one event listing them all.
    DisconnectedEvent,
    "../schemas/0009-ep-disconnected.avsc"
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Record;
    use crate::testutil::*;
    use apache_avro::types::Value;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap};

    fn value(
        correlation_id: &str,
        timestamp_ms: i64,
        timeout_ms: i64,
        endpoints: &BTreeMap<String, String>,
        originator: &str,
    ) -> Value {
        let map: HashMap<String, Value> =
            endpoints.iter().map(|(k, v)| (k.clone(), s(v))).collect();
        record(
            correlation_id,
            timestamp_ms,
            timeout_ms,
            vec![("endpoints", Value::Map(map)), ("originatorReplicaId", s(originator))],
        )
    }

    /// `apache-avro` writes maps in `HashMap` order, so bytes can only be compared when there
    /// is at most one entry; beyond that compare lengths and what each side reads back.
    macro_rules! check_event {
        ($ty:ident, $c:expr, $ts:expr, $to:expr, $eps:expr, $orig:expr) => {{
            let eps: &BTreeMap<String, String> = $eps;
            let rec = $ty {
                correlation_id: $c,
                timestamp_ms: $ts,
                timeout_ms: $to,
                endpoints: eps.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
                originator_replica_id: $orig,
            };
            let value = value($c, $ts, $to, eps, $orig);
            if eps.len() <= 1 {
                check_against_apache!($ty, rec.clone(), value);
            } else {
                let ours = rec.to_bytes();
                prop_assert_eq!(ours.len(), rec.encoded_len());
                let schema = schema($ty::SCHEMA);
                let theirs = apache_avro::to_avro_datum(&schema, value.clone()).unwrap();
                prop_assert_eq!(ours.len(), theirs.len());
                let parsed = apache_avro::from_avro_datum(&schema, &mut &ours[..], None).unwrap();
                prop_assert_eq!(&parsed, &value);
                prop_assert_eq!(&$ty::decode(&ours).unwrap(), &rec);
                let mut back = $ty::decode(&theirs).unwrap();
                back.endpoints.sort();
                prop_assert_eq!(&back, &rec);
            }
            check_prefixes!($ty, rec.to_bytes(), None::<(usize, $ty<'_>)>);
        }};
    }

    #[test]
    fn empty_map_is_a_single_zero() {
        let rec = ConnectedEvent {
            correlation_id: "c1",
            timestamp_ms: 1_700_000_000_000,
            timeout_ms: 0,
            endpoints: vec![],
            originator_replica_id: "gw-0",
        };
        let bytes = rec.to_bytes();
        assert_eq!(&bytes[..], &hex("04633180a0abfef96200000867772d30")[..]);
        assert_eq!(ConnectedEvent::decode(&bytes), Ok(rec));
    }

    proptest! {
        #[test]
        fn connected_matches_apache_avro(
            correlation_id in text(), timestamp_ms in long(), timeout_ms in long(),
            endpoints in proptest::collection::btree_map(text(), text(), 0..5),
            originator in text(),
        ) {
            check_event!(ConnectedEvent, &correlation_id, timestamp_ms, timeout_ms, &endpoints, &originator);
        }

        #[test]
        fn disconnected_matches_apache_avro(
            correlation_id in text(), timestamp_ms in long(), timeout_ms in long(),
            endpoints in proptest::collection::btree_map(text(), text(), 0..5),
            originator in text(),
        ) {
            check_event!(DisconnectedEvent, &correlation_id, timestamp_ms, timeout_ms, &endpoints, &originator);
        }
    }
}
