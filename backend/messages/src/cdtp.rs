//! 6/CDTP: Configuration Data Transport Protocol records. Events in namespace
//! `org.kaaproject.ipc.event.gen.v1.endpoint.config`, request and response in
//! `org.kaaproject.ipc.cdtp.gen.v1`.
//!
//! The RFC's `ConfigUpdated` and `ConfigApplied` have no configuration name, so a named
//! configuration's change or confirmation could not be told from the default one. fleetgate
//! appends an optional `configName` to both (null: `default`), the way the RFC itself added
//! `configName` to `ConfigRequest`: Kaa readers stop before it, and messages from Kaa writers,
//! which lack it, decode with the default.

use crate::avro::{self, NullBranch, Reader};
use crate::{DecodeError, Record, header};
use bytes::BufMut;

/// `ConfigUpdated`: the provider (ECR) broadcasts a new configuration of an endpoint on
/// `kaa.v1.events.{provider}.endpoint.config.updated`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigUpdated<'a> {
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
    /// `configId`: id of the new configuration.
    pub config_id: &'a str,
    /// `contentType` (default `application/json`).
    pub content_type: &'a str,
    /// `content`: the configuration.
    pub content: &'a [u8],
    /// `originatorReplicaId` (`["null","string"]`).
    pub originator_replica_id: Option<&'a str>,
    /// `configName` (fleetgate, appended; `["null","string"]`): null means `default`.
    pub config_name: Option<&'a str>,
}

impl<'a> Record<'a> for ConfigUpdated<'a> {
    const SCHEMA: &'static str = include_str!("../schemas/0006-config-updated.avsc");

    fn encoded_len(&self) -> usize {
        header::len(self.correlation_id, self.timestamp_ms, self.timeout_ms)
            + avro::str_len(self.app_version_name)
            + avro::str_len(self.endpoint_id)
            + avro::str_len(self.config_id)
            + avro::str_len(self.content_type)
            + avro::bytes_len(self.content)
            + avro::opt_str_len(self.originator_replica_id)
            + avro::opt_str_len(self.config_name)
    }

    fn encode<B: BufMut>(&self, out: &mut B) {
        header::put(out, self.correlation_id, self.timestamp_ms, self.timeout_ms);
        avro::put_str(out, self.app_version_name);
        avro::put_str(out, self.endpoint_id);
        avro::put_str(out, self.config_id);
        avro::put_str(out, self.content_type);
        avro::put_bytes(out, self.content);
        avro::put_opt_str(out, self.originator_replica_id, NullBranch::First);
        avro::put_opt_str(out, self.config_name, NullBranch::First);
    }

    fn decode(input: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        let (correlation_id, timestamp_ms, timeout_ms) = header::read(&mut r)?;
        Ok(ConfigUpdated {
            correlation_id,
            timestamp_ms,
            timeout_ms,
            app_version_name: r.str("appVersionName")?,
            endpoint_id: r.str("endpointId")?,
            config_id: r.str("configId")?,
            content_type: r.str("contentType")?,
            content: r.bytes("content")?,
            originator_replica_id: opt_str_or_null(&mut r, "originatorReplicaId")?,
            config_name: opt_str_or_null(&mut r, "configName")?,
        })
    }
}

/// `ConfigApplied`: the consumer (CMX) broadcasts what an endpoint reported on a
/// configuration, on `kaa.v1.events.{consumer}.endpoint.config.applied`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigApplied<'a> {
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
    /// `configId`: the configuration the endpoint tried.
    pub config_id: &'a str,
    /// `originatorReplicaId` (`["null","string"]`).
    pub originator_replica_id: Option<&'a str>,
    /// `statusCode` (default 200): 2xx means applied.
    pub status_code: i32,
    /// `reasonPhrase` (`["null","string"]`).
    pub reason_phrase: Option<&'a str>,
    /// `configName` (fleetgate, appended; `["null","string"]`): null means `default`.
    pub config_name: Option<&'a str>,
}

impl<'a> Record<'a> for ConfigApplied<'a> {
    const SCHEMA: &'static str = include_str!("../schemas/0006-config-applied.avsc");

    fn encoded_len(&self) -> usize {
        header::len(self.correlation_id, self.timestamp_ms, self.timeout_ms)
            + avro::str_len(self.app_version_name)
            + avro::str_len(self.endpoint_id)
            + avro::str_len(self.config_id)
            + avro::opt_str_len(self.originator_replica_id)
            + avro::int_len(self.status_code)
            + avro::opt_str_len(self.reason_phrase)
            + avro::opt_str_len(self.config_name)
    }

    fn encode<B: BufMut>(&self, out: &mut B) {
        header::put(out, self.correlation_id, self.timestamp_ms, self.timeout_ms);
        avro::put_str(out, self.app_version_name);
        avro::put_str(out, self.endpoint_id);
        avro::put_str(out, self.config_id);
        avro::put_opt_str(out, self.originator_replica_id, NullBranch::First);
        avro::put_int(out, self.status_code);
        avro::put_opt_str(out, self.reason_phrase, NullBranch::First);
        avro::put_opt_str(out, self.config_name, NullBranch::First);
    }

    fn decode(input: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        let (correlation_id, timestamp_ms, timeout_ms) = header::read(&mut r)?;
        let app_version_name = r.str("appVersionName")?;
        let endpoint_id = r.str("endpointId")?;
        let config_id = r.str("configId")?;
        // `statusCode` and `reasonPhrase` were appended to the RFC's schema later.
        let originator_replica_id = opt_str_or_null(&mut r, "originatorReplicaId")?;
        let status_code = if r.is_at_end() { 200 } else { r.int("statusCode")? };
        Ok(ConfigApplied {
            correlation_id,
            timestamp_ms,
            timeout_ms,
            app_version_name,
            endpoint_id,
            config_id,
            originator_replica_id,
            status_code,
            reason_phrase: opt_str_or_null(&mut r, "reasonPhrase")?,
            config_name: opt_str_or_null(&mut r, "configName")?,
        })
    }
}

/// `ConfigRequest`: a consumer asks the provider on `kaa.v1.service.{provider}.cdtp.request`,
/// with a reply subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigRequest<'a> {
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
    /// `configId` (`["null","string"]`): what the consumer has; null: send the current one.
    pub config_id: Option<&'a str>,
    /// `configName` (`["null","string"]`, appended in 2026): null means `default`.
    pub config_name: Option<&'a str>,
}

impl<'a> Record<'a> for ConfigRequest<'a> {
    const SCHEMA: &'static str = include_str!("../schemas/0006-config-request.avsc");

    fn encoded_len(&self) -> usize {
        header::len(self.correlation_id, self.timestamp_ms, self.timeout_ms)
            + avro::str_len(self.app_version_name)
            + avro::str_len(self.endpoint_id)
            + avro::opt_str_len(self.config_id)
            + avro::opt_str_len(self.config_name)
    }

    fn encode<B: BufMut>(&self, out: &mut B) {
        header::put(out, self.correlation_id, self.timestamp_ms, self.timeout_ms);
        avro::put_str(out, self.app_version_name);
        avro::put_str(out, self.endpoint_id);
        avro::put_opt_str(out, self.config_id, NullBranch::First);
        avro::put_opt_str(out, self.config_name, NullBranch::First);
    }

    fn decode(input: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        let (correlation_id, timestamp_ms, timeout_ms) = header::read(&mut r)?;
        Ok(ConfigRequest {
            correlation_id,
            timestamp_ms,
            timeout_ms,
            app_version_name: r.str("appVersionName")?,
            endpoint_id: r.str("endpointId")?,
            config_id: opt_str_or_null(&mut r, "configId")?,
            config_name: opt_str_or_null(&mut r, "configName")?,
        })
    }
}

/// `ConfigResponse`: the provider's answer, sent to the request's reply subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigResponse<'a> {
    /// `correlationId`: echoes the request's.
    pub correlation_id: &'a str,
    /// `timestamp`, Unix milliseconds.
    pub timestamp_ms: i64,
    /// `timeout`, milliseconds; 0 = never.
    pub timeout_ms: i64,
    /// `appVersionName`.
    pub app_version_name: &'a str,
    /// `endpointId`.
    pub endpoint_id: &'a str,
    /// `configId` (`["null","string"]`): null on error or when unchanged.
    pub config_id: Option<&'a str>,
    /// `contentType` (default `application/json`).
    pub content_type: &'a str,
    /// `content` (`["null","bytes"]`): null on error or when unchanged.
    pub content: Option<&'a [u8]>,
    /// `statusCode`: HTTP status code of the processing.
    pub status_code: i32,
    /// `reasonPhrase` (`["null","string"]`).
    pub reason_phrase: Option<&'a str>,
}

impl<'a> Record<'a> for ConfigResponse<'a> {
    const SCHEMA: &'static str = include_str!("../schemas/0006-config-response.avsc");

    fn encoded_len(&self) -> usize {
        header::len(self.correlation_id, self.timestamp_ms, self.timeout_ms)
            + avro::str_len(self.app_version_name)
            + avro::str_len(self.endpoint_id)
            + avro::opt_str_len(self.config_id)
            + avro::str_len(self.content_type)
            + avro::opt_bytes_len(self.content)
            + avro::int_len(self.status_code)
            + avro::opt_str_len(self.reason_phrase)
    }

    fn encode<B: BufMut>(&self, out: &mut B) {
        header::put(out, self.correlation_id, self.timestamp_ms, self.timeout_ms);
        avro::put_str(out, self.app_version_name);
        avro::put_str(out, self.endpoint_id);
        avro::put_opt_str(out, self.config_id, NullBranch::First);
        avro::put_str(out, self.content_type);
        avro::put_opt_bytes(out, self.content, NullBranch::First);
        avro::put_int(out, self.status_code);
        avro::put_opt_str(out, self.reason_phrase, NullBranch::First);
    }

    fn decode(input: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        let (correlation_id, timestamp_ms, timeout_ms) = header::read(&mut r)?;
        Ok(ConfigResponse {
            correlation_id,
            timestamp_ms,
            timeout_ms,
            app_version_name: r.str("appVersionName")?,
            endpoint_id: r.str("endpointId")?,
            config_id: r.opt_str("configId", NullBranch::First)?,
            content_type: r.str("contentType")?,
            content: r.opt_bytes("content", NullBranch::First)?,
            status_code: r.int("statusCode")?,
            reason_phrase: opt_str_or_null(&mut r, "reasonPhrase")?,
        })
    }
}

/// A trailing `["null","string"]` field with default null: null when an older writer ended
/// the message before it.
fn opt_str_or_null<'a>(
    r: &mut Reader<'a>,
    field: &'static str,
) -> Result<Option<&'a str>, DecodeError> {
    if r.is_at_end() { Ok(None) } else { r.opt_str(field, NullBranch::First) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use apache_avro::types::Value;
    use proptest::prelude::*;

    // Hand-assembled from the shared values of the Kaa protocol summary's §20 (correlationId
    // "c1", timestamp 1700000000000, timeout 0, appVersionName "app-v1") and the wire rules:
    // `04 6331` "c1", `80a0abfef962` the timestamp, `00` timeout, `0c` + "app-v1",
    // `08` + "ep-1", then the record's own fields.
    const COMMON: &str = "04633180a0abfef962000c6170702d76310865702d31";

    #[test]
    fn config_request_vectors() {
        let rec = ConfigRequest {
            correlation_id: "c1",
            timestamp_ms: 1_700_000_000_000,
            timeout_ms: 0,
            app_version_name: "app-v1",
            endpoint_id: "ep-1",
            config_id: None,
            config_name: None,
        };
        let bytes = hex(&format!("{COMMON}0000"));
        assert_eq!(&rec.to_bytes()[..], &bytes[..]);
        assert_eq!(ConfigRequest::decode(&bytes), Ok(rec));
        // An older writer without configName.
        assert_eq!(ConfigRequest::decode(&bytes[..bytes.len() - 1]), Ok(rec));
        // configId "c2" (branch 1), configName "network" (branch 1).
        let named = ConfigRequest { config_id: Some("c2"), config_name: Some("network"), ..rec };
        let bytes = hex(&format!("{COMMON}0204633202{}", "0e6e6574776f726b"));
        assert_eq!(&named.to_bytes()[..], &bytes[..]);
        assert_eq!(ConfigRequest::decode(&bytes), Ok(named));
    }

    #[test]
    fn config_response_vector() {
        let rec = ConfigResponse {
            correlation_id: "c1",
            timestamp_ms: 1_700_000_000_000,
            timeout_ms: 0,
            app_version_name: "app-v1",
            endpoint_id: "ep-1",
            config_id: Some("c2"),
            content_type: "application/json",
            content: Some(b"{}"),
            status_code: 200,
            reason_phrase: None,
        };
        // configId branch 1 "c2"; contentType; content branch 1, 2 bytes "{}"; 200 = zig-zag
        // 400 = 90 03; reasonPhrase null.
        let bytes =
            hex(&format!("{COMMON}02046332206170706c69636174696f6e2f6a736f6e02047b7d900300"));
        assert_eq!(&rec.to_bytes()[..], &bytes[..]);
        assert_eq!(ConfigResponse::decode(&bytes), Ok(rec));
    }

    #[test]
    fn config_applied_from_older_writers_takes_the_defaults() {
        let rec = ConfigApplied {
            correlation_id: "c1",
            timestamp_ms: 1_700_000_000_000,
            timeout_ms: 0,
            app_version_name: "app-v1",
            endpoint_id: "ep-1",
            config_id: "c2",
            originator_replica_id: None,
            status_code: 200,
            reason_phrase: None,
            config_name: None,
        };
        // The 2017 schema ended after originatorReplicaId; before that, after configId.
        let full = rec.to_bytes();
        assert_eq!(&full[..], &hex(&format!("{COMMON}0463320090030000"))[..]);
        for cut in [full.len() - 4, full.len() - 5] {
            assert_eq!(ConfigApplied::decode(&full[..cut]), Ok(rec), "cut {cut}");
        }
        let kaa = ConfigApplied { config_name: Some("network"), ..rec };
        let bytes = kaa.to_bytes();
        assert_eq!(ConfigApplied::decode(&bytes[..bytes.len() - 9]), Ok(rec));
    }

    proptest! {
        #[test]
        fn config_updated_matches_apache_avro(
            correlation_id in text(), timestamp_ms in long(), timeout_ms in long(),
            app in text(), endpoint in text(), config_id in text(), content_type in text(),
            content in blob(), replica in opt_text(), name in opt_text(),
        ) {
            let rec = ConfigUpdated {
                correlation_id: &correlation_id,
                timestamp_ms,
                timeout_ms,
                app_version_name: &app,
                endpoint_id: &endpoint,
                config_id: &config_id,
                content_type: &content_type,
                content: &content,
                originator_replica_id: replica.as_deref(),
                config_name: name.as_deref(),
            };
            let value = record(&correlation_id, timestamp_ms, timeout_ms, vec![
                ("appVersionName", s(&app)),
                ("endpointId", s(&endpoint)),
                ("configId", s(&config_id)),
                ("contentType", s(&content_type)),
                ("content", Value::Bytes(content.clone())),
                ("originatorReplicaId", opt_s(rec.originator_replica_id, NullBranch::First)),
                ("configName", opt_s(rec.config_name, NullBranch::First)),
            ]);
            check_against_apache!(ConfigUpdated, rec, value);
            let bytes = rec.to_bytes();
            let kaa_len = bytes.len() - avro::opt_str_len(rec.config_name);
            let rfc_len = kaa_len - avro::opt_str_len(rec.originator_replica_id);
            for n in 0..bytes.len() {
                let got = ConfigUpdated::decode(&bytes[..n]);
                if n == kaa_len {
                    prop_assert_eq!(got, Ok(ConfigUpdated { config_name: None, ..rec }));
                } else if n == rfc_len {
                    let older = ConfigUpdated { config_name: None, originator_replica_id: None, ..rec };
                    prop_assert_eq!(got, Ok(older));
                } else {
                    prop_assert!(got.is_err(), "prefix of {} bytes decoded", n);
                }
            }
        }

        #[test]
        fn config_applied_matches_apache_avro(
            correlation_id in text(), timestamp_ms in long(), timeout_ms in long(),
            app in text(), endpoint in text(), config_id in text(), replica in opt_text(),
            status_code in int(), reason in opt_text(), name in opt_text(),
        ) {
            let rec = ConfigApplied {
                correlation_id: &correlation_id,
                timestamp_ms,
                timeout_ms,
                app_version_name: &app,
                endpoint_id: &endpoint,
                config_id: &config_id,
                originator_replica_id: replica.as_deref(),
                status_code,
                reason_phrase: reason.as_deref(),
                config_name: name.as_deref(),
            };
            let value = record(&correlation_id, timestamp_ms, timeout_ms, vec![
                ("appVersionName", s(&app)),
                ("endpointId", s(&endpoint)),
                ("configId", s(&config_id)),
                ("originatorReplicaId", opt_s(rec.originator_replica_id, NullBranch::First)),
                ("statusCode", Value::Int(status_code)),
                ("reasonPhrase", opt_s(rec.reason_phrase, NullBranch::First)),
                ("configName", opt_s(rec.config_name, NullBranch::First)),
            ]);
            check_against_apache!(ConfigApplied, rec, value);
            let bytes = rec.to_bytes();
            let kaa_len = bytes.len() - avro::opt_str_len(rec.config_name);
            let before_reason = kaa_len - avro::opt_str_len(rec.reason_phrase);
            let before_status = before_reason - avro::int_len(status_code);
            let before_replica = before_status - avro::opt_str_len(rec.originator_replica_id);
            for n in 0..bytes.len() {
                let got = ConfigApplied::decode(&bytes[..n]);
                let expected = if n == kaa_len {
                    Some(ConfigApplied { config_name: None, ..rec })
                } else if n == before_reason {
                    Some(ConfigApplied { config_name: None, reason_phrase: None, ..rec })
                } else if n == before_status {
                    Some(ConfigApplied { config_name: None, reason_phrase: None, status_code: 200, ..rec })
                } else if n == before_replica {
                    Some(ConfigApplied {
                        config_name: None, reason_phrase: None, status_code: 200,
                        originator_replica_id: None, ..rec
                    })
                } else {
                    None
                };
                match expected {
                    Some(e) => prop_assert_eq!(got, Ok(e), "prefix of {} bytes", n),
                    None => prop_assert!(got.is_err(), "prefix of {} bytes decoded", n),
                }
            }
        }

        #[test]
        fn config_request_matches_apache_avro(
            correlation_id in text(), timestamp_ms in long(), timeout_ms in long(),
            app in text(), endpoint in text(), config_id in opt_text(), name in opt_text(),
        ) {
            let rec = ConfigRequest {
                correlation_id: &correlation_id,
                timestamp_ms,
                timeout_ms,
                app_version_name: &app,
                endpoint_id: &endpoint,
                config_id: config_id.as_deref(),
                config_name: name.as_deref(),
            };
            let value = record(&correlation_id, timestamp_ms, timeout_ms, vec![
                ("appVersionName", s(&app)),
                ("endpointId", s(&endpoint)),
                ("configId", opt_s(rec.config_id, NullBranch::First)),
                ("configName", opt_s(rec.config_name, NullBranch::First)),
            ]);
            check_against_apache!(ConfigRequest, rec, value);
            let bytes = rec.to_bytes();
            let older_len = bytes.len() - avro::opt_str_len(rec.config_name);
            let before_id = older_len - avro::opt_str_len(rec.config_id);
            for n in 0..bytes.len() {
                let got = ConfigRequest::decode(&bytes[..n]);
                if n == older_len {
                    prop_assert_eq!(got, Ok(ConfigRequest { config_name: None, ..rec }));
                } else if n == before_id {
                    prop_assert_eq!(got, Ok(ConfigRequest { config_name: None, config_id: None, ..rec }));
                } else {
                    prop_assert!(got.is_err(), "prefix of {} bytes decoded", n);
                }
            }
        }

        #[test]
        fn config_response_matches_apache_avro(
            correlation_id in text(), timestamp_ms in long(), timeout_ms in long(),
            app in text(), endpoint in text(), config_id in opt_text(), content_type in text(),
            content in proptest::option::of(blob()), status_code in int(), reason in opt_text(),
        ) {
            let rec = ConfigResponse {
                correlation_id: &correlation_id,
                timestamp_ms,
                timeout_ms,
                app_version_name: &app,
                endpoint_id: &endpoint,
                config_id: config_id.as_deref(),
                content_type: &content_type,
                content: content.as_deref(),
                status_code,
                reason_phrase: reason.as_deref(),
            };
            let value = record(&correlation_id, timestamp_ms, timeout_ms, vec![
                ("appVersionName", s(&app)),
                ("endpointId", s(&endpoint)),
                ("configId", opt_s(rec.config_id, NullBranch::First)),
                ("contentType", s(&content_type)),
                ("content", opt_b(rec.content, NullBranch::First)),
                ("statusCode", Value::Int(status_code)),
                ("reasonPhrase", opt_s(rec.reason_phrase, NullBranch::First)),
            ]);
            check_against_apache!(ConfigResponse, rec, value);
            let bytes = rec.to_bytes();
            let older_len = bytes.len() - avro::opt_str_len(rec.reason_phrase);
            check_prefixes!(
                ConfigResponse,
                bytes,
                Some((older_len, ConfigResponse { reason_phrase: None, ..rec }))
            );
        }
    }
}
