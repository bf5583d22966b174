//! 4/ESP: Extension Service Protocol records (namespace `org.kaaproject.ipc.esp.gen.v1`).

use crate::avro::{self, NullBranch, Reader};
use crate::{DecodeError, Record, header};
use bytes::BufMut;

/// `ClientData`: a client request relayed by the communication service (the gateway) to an
/// extension service, on `kaa.v1.service.<extension>.esp.ClientData`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientData<'a> {
    /// `correlationId`: message id used to trace processing across services.
    pub correlation_id: &'a str,
    /// `timestamp`: creation time, Unix milliseconds.
    pub timestamp_ms: i64,
    /// `timeout`: milliseconds after `timestamp_ms` until the message expires; 0 = never.
    pub timeout_ms: i64,
    /// `appVersionName`: application version from the client's topic.
    pub app_version_name: &'a str,
    /// `endpointId` (`["string","null"]`): endpoint resolved from the token; `None` for
    /// endpoint-unaware extensions.
    pub endpoint_id: Option<&'a str>,
    /// `resourcePath`: extension-specific path with a leading slash, e.g. `/json`.
    pub resource_path: &'a str,
    /// `requestId` (`["int","null"]`): the 1/KP request id, if the client gave one.
    pub request_id: Option<i32>,
    /// `payload`: the client's payload as received.
    pub payload: &'a [u8],
    /// `configName` (`["null","string"]`, default null): named configuration (7/CMP);
    /// `None` means `default`. Older writers leave it out.
    pub config_name: Option<&'a str>,
}

impl<'a> Record<'a> for ClientData<'a> {
    const SCHEMA: &'static str = include_str!("../schemas/0004-client-data.avsc");

    #[inline]
    fn encoded_len(&self) -> usize {
        header::len(self.correlation_id, self.timestamp_ms, self.timeout_ms)
            + avro::str_len(self.app_version_name)
            + avro::opt_str_len(self.endpoint_id)
            + avro::str_len(self.resource_path)
            + avro::opt_int_len(self.request_id)
            + avro::bytes_len(self.payload)
            + avro::opt_str_len(self.config_name)
    }

    #[inline]
    fn encode<B: BufMut>(&self, out: &mut B) {
        header::put(out, self.correlation_id, self.timestamp_ms, self.timeout_ms);
        avro::put_str(out, self.app_version_name);
        avro::put_opt_str(out, self.endpoint_id, NullBranch::Second);
        avro::put_str(out, self.resource_path);
        avro::put_opt_int(out, self.request_id, NullBranch::Second);
        avro::put_bytes(out, self.payload);
        avro::put_opt_str(out, self.config_name, NullBranch::First);
    }

    fn decode(input: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        let (correlation_id, timestamp_ms, timeout_ms) = header::read(&mut r)?;
        Ok(ClientData {
            correlation_id,
            timestamp_ms,
            timeout_ms,
            app_version_name: r.str("appVersionName")?,
            endpoint_id: r.opt_str("endpointId", NullBranch::Second)?,
            resource_path: r.str("resourcePath")?,
            request_id: r.opt_int("requestId", NullBranch::Second)?,
            payload: r.bytes("payload")?,
            config_name: if r.is_at_end() {
                None
            } else {
                r.opt_str("configName", NullBranch::First)?
            },
        })
    }
}

/// `ExtensionData`: a response or push from an extension service to clients, on the reply
/// subject of a `ClientData` or `kaa.v1.service.<gateway>.esp.ExtensionData`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtensionData<'a> {
    /// `correlationId`: message id used to trace processing across services.
    pub correlation_id: &'a str,
    /// `timestamp`: creation time, Unix milliseconds.
    pub timestamp_ms: i64,
    /// `timeout`: milliseconds after `timestamp_ms` until the message expires; 0 = never.
    pub timeout_ms: i64,
    /// `appVersionName` (`["string","null"]`): application version, if the extension knows it.
    pub app_version_name: Option<&'a str>,
    /// `extensionInstanceName` (`["string","null"]`): extension instance that originated the
    /// message.
    pub extension_instance_name: Option<&'a str>,
    /// `endpointId` (`["string","null"]`): target endpoint; `None` for endpoint-unaware
    /// extensions.
    pub endpoint_id: Option<&'a str>,
    /// `resourcePath`: extension-specific path with a leading slash.
    pub resource_path: &'a str,
    /// `requestId` (`["int","null"]`): echo of the client's request id; `None` for pushes.
    pub request_id: Option<i32>,
    /// `payload` (`["bytes","null"]`): response body.
    pub payload: Option<&'a [u8]>,
    /// `statusCode`: HTTP status code of the processing.
    pub status_code: i32,
    /// `reasonPhrase` (`["null","string"]`, default null): human-readable status reason.
    pub reason_phrase: Option<&'a str>,
}

impl<'a> Record<'a> for ExtensionData<'a> {
    const SCHEMA: &'static str = include_str!("../schemas/0004-extension-data.avsc");

    #[inline]
    fn encoded_len(&self) -> usize {
        header::len(self.correlation_id, self.timestamp_ms, self.timeout_ms)
            + avro::opt_str_len(self.app_version_name)
            + avro::opt_str_len(self.extension_instance_name)
            + avro::opt_str_len(self.endpoint_id)
            + avro::str_len(self.resource_path)
            + avro::opt_int_len(self.request_id)
            + avro::opt_bytes_len(self.payload)
            + avro::int_len(self.status_code)
            + avro::opt_str_len(self.reason_phrase)
    }

    #[inline]
    fn encode<B: BufMut>(&self, out: &mut B) {
        header::put(out, self.correlation_id, self.timestamp_ms, self.timeout_ms);
        avro::put_opt_str(out, self.app_version_name, NullBranch::Second);
        avro::put_opt_str(out, self.extension_instance_name, NullBranch::Second);
        avro::put_opt_str(out, self.endpoint_id, NullBranch::Second);
        avro::put_str(out, self.resource_path);
        avro::put_opt_int(out, self.request_id, NullBranch::Second);
        avro::put_opt_bytes(out, self.payload, NullBranch::Second);
        avro::put_int(out, self.status_code);
        avro::put_opt_str(out, self.reason_phrase, NullBranch::First);
    }

    fn decode(input: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        let (correlation_id, timestamp_ms, timeout_ms) = header::read(&mut r)?;
        Ok(ExtensionData {
            correlation_id,
            timestamp_ms,
            timeout_ms,
            app_version_name: r.opt_str("appVersionName", NullBranch::Second)?,
            extension_instance_name: r.opt_str("extensionInstanceName", NullBranch::Second)?,
            endpoint_id: r.opt_str("endpointId", NullBranch::Second)?,
            resource_path: r.str("resourcePath")?,
            request_id: r.opt_int("requestId", NullBranch::Second)?,
            payload: r.opt_bytes("payload", NullBranch::Second)?,
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

    const CLIENT_DATA_1: &str =
        "04633180a0abfef962000c6170702d7631000865702d310a2f6a736f6e0054125b7b2274223a317d5d00";
    const CLIENT_DATA_2: &str =
        "04633180a0abfef962000c6170702d7631020a2f6a736f6e02125b7b2274223a317d5d00";
    const EXTENSION_DATA: &str =
        "04633180a0abfef96200000c6170702d76310006646378000865702d310a2f6a736f6e005402900300";

    fn client_data_1() -> ClientData<'static> {
        ClientData {
            correlation_id: "c1",
            timestamp_ms: 1_700_000_000_000,
            timeout_ms: 0,
            app_version_name: "app-v1",
            endpoint_id: Some("ep-1"),
            resource_path: "/json",
            request_id: Some(42),
            payload: br#"[{"t":1}]"#,
            config_name: None,
        }
    }

    fn extension_data() -> ExtensionData<'static> {
        ExtensionData {
            correlation_id: "c1",
            timestamp_ms: 1_700_000_000_000,
            timeout_ms: 0,
            app_version_name: Some("app-v1"),
            extension_instance_name: Some("dcx"),
            endpoint_id: Some("ep-1"),
            resource_path: "/json",
            request_id: Some(42),
            payload: None,
            status_code: 200,
            reason_phrase: None,
        }
    }

    #[test]
    fn client_data_vector_1() {
        let rec = client_data_1();
        let bytes = hex(CLIENT_DATA_1);
        assert_eq!(&rec.to_bytes()[..], &bytes[..]);
        assert_eq!(rec.encoded_len(), bytes.len());
        assert_eq!(ClientData::decode(&bytes), Ok(rec));
    }

    #[test]
    fn client_data_vector_2() {
        let rec = ClientData { endpoint_id: None, request_id: None, ..client_data_1() };
        let bytes = hex(CLIENT_DATA_2);
        assert_eq!(&rec.to_bytes()[..], &bytes[..]);
        assert_eq!(ClientData::decode(&bytes), Ok(rec));
    }

    #[test]
    fn extension_data_vector() {
        let rec = extension_data();
        let bytes = hex(EXTENSION_DATA);
        assert_eq!(&rec.to_bytes()[..], &bytes[..]);
        assert_eq!(ExtensionData::decode(&bytes), Ok(rec));
    }

    #[test]
    fn client_data_without_config_name_from_older_writer() {
        let full = hex(CLIENT_DATA_1);
        let older = &full[..full.len() - 1];
        assert_eq!(ClientData::decode(older), Ok(client_data_1()));

        let named = ClientData { config_name: Some("network"), ..client_data_1() };
        let bytes = named.to_bytes();
        assert_eq!(
            ClientData::decode(&bytes[..bytes.len() - avro::opt_str_len(Some("network"))]),
            Ok(client_data_1())
        );
    }

    #[test]
    fn extension_data_without_reason_phrase_from_older_writer() {
        let full = hex(EXTENSION_DATA);
        assert_eq!(ExtensionData::decode(&full[..full.len() - 1]), Ok(extension_data()));
    }

    #[test]
    fn errors_name_the_field() {
        let mut bytes = hex(CLIENT_DATA_1);
        // requestId union index 0x54 is out of range: the byte after resourcePath.
        let pos = bytes.len() - 1 - 10 - 2;
        bytes[pos] = 0x06;
        assert_eq!(
            ClientData::decode(&bytes),
            Err(DecodeError::BadUnionIndex { field: "requestId", index: 3, branches: 2 })
        );
        let err = ClientData::decode(&hex(CLIENT_DATA_1)[..5]).unwrap_err();
        assert_eq!(err, DecodeError::Truncated { field: "timestamp" });
        assert!(err.to_string().contains("`timestamp`"), "{err}");
    }

    fn client_data_value(r: &ClientData<'_>) -> Value {
        record(
            r.correlation_id,
            r.timestamp_ms,
            r.timeout_ms,
            vec![
                ("appVersionName", s(r.app_version_name)),
                ("endpointId", opt_s(r.endpoint_id, NullBranch::Second)),
                ("resourcePath", s(r.resource_path)),
                ("requestId", opt_i(r.request_id, NullBranch::Second)),
                ("payload", Value::Bytes(r.payload.to_vec())),
                ("configName", opt_s(r.config_name, NullBranch::First)),
            ],
        )
    }

    fn extension_data_value(r: &ExtensionData<'_>) -> Value {
        record(
            r.correlation_id,
            r.timestamp_ms,
            r.timeout_ms,
            vec![
                ("appVersionName", opt_s(r.app_version_name, NullBranch::Second)),
                ("extensionInstanceName", opt_s(r.extension_instance_name, NullBranch::Second)),
                ("endpointId", opt_s(r.endpoint_id, NullBranch::Second)),
                ("resourcePath", s(r.resource_path)),
                ("requestId", opt_i(r.request_id, NullBranch::Second)),
                ("payload", opt_b(r.payload, NullBranch::Second)),
                ("statusCode", Value::Int(r.status_code)),
                ("reasonPhrase", opt_s(r.reason_phrase, NullBranch::First)),
            ],
        )
    }

    proptest! {
        #[test]
        fn client_data_matches_apache_avro(
            correlation_id in text(), timestamp_ms in long(), timeout_ms in long(),
            app_version_name in text(), endpoint_id in opt_text(), resource_path in text(),
            request_id in proptest::option::of(int()), payload in blob(), config_name in opt_text(),
        ) {
            let rec = ClientData {
                correlation_id: &correlation_id,
                timestamp_ms,
                timeout_ms,
                app_version_name: &app_version_name,
                endpoint_id: endpoint_id.as_deref(),
                resource_path: &resource_path,
                request_id,
                payload: &payload,
                config_name: config_name.as_deref(),
            };
            check_against_apache!(ClientData, rec, client_data_value(&rec));
            let bytes = rec.to_bytes();
            let older_len = bytes.len() - avro::opt_str_len(rec.config_name);
            check_prefixes!(
                ClientData,
                bytes,
                Some((older_len, ClientData { config_name: None, ..rec }))
            );
        }

        #[test]
        fn extension_data_matches_apache_avro(
            correlation_id in text(), timestamp_ms in long(), timeout_ms in long(),
            app_version_name in opt_text(), extension_instance_name in opt_text(),
            endpoint_id in opt_text(), resource_path in text(),
            request_id in proptest::option::of(int()), payload in proptest::option::of(blob()),
            status_code in int(), reason_phrase in opt_text(),
        ) {
            let rec = ExtensionData {
                correlation_id: &correlation_id,
                timestamp_ms,
                timeout_ms,
                app_version_name: app_version_name.as_deref(),
                extension_instance_name: extension_instance_name.as_deref(),
                endpoint_id: endpoint_id.as_deref(),
                resource_path: &resource_path,
                request_id,
                payload: payload.as_deref(),
                status_code,
                reason_phrase: reason_phrase.as_deref(),
            };
            check_against_apache!(ExtensionData, rec, extension_data_value(&rec));
            let bytes = rec.to_bytes();
            let older_len = bytes.len() - avro::opt_str_len(rec.reason_phrase);
            check_prefixes!(
                ExtensionData,
                bytes,
                Some((older_len, ExtensionData { reason_phrase: None, ..rec }))
            );
        }
    }
}
