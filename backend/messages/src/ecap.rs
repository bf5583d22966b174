//! 16/ECAP: Endpoint and Client Authentication Protocol records (namespace
//! `org.kaaproject.ipc.ecap.gen.v1`).

use crate::avro::{self, NullBranch, Reader};
use crate::{DecodeError, Record, header};
use bytes::BufMut;

/// `EndpointTokenValidationRequest`: the consumer (gateway) asks the provider to resolve an
/// endpoint token, on `kaa.v1.service.<provider>.ecap.ep-token-request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointTokenValidationRequest<'a> {
    /// `correlationId`: message id used to trace processing across services.
    pub correlation_id: &'a str,
    /// `timestamp`: creation time, Unix milliseconds.
    pub timestamp_ms: i64,
    /// `timeout`: milliseconds after `timestamp_ms` until the message expires; 0 = never.
    pub timeout_ms: i64,
    /// `appName`: application name (not application version) of the endpoint.
    pub app_name: &'a str,
    /// `token`: the endpoint token to validate.
    pub token: &'a str,
}

impl<'a> Record<'a> for EndpointTokenValidationRequest<'a> {
    const SCHEMA: &'static str =
        include_str!("../schemas/0016-endpoint-token-validation-request.avsc");

    fn encoded_len(&self) -> usize {
        header::len(self.correlation_id, self.timestamp_ms, self.timeout_ms)
            + avro::str_len(self.app_name)
            + avro::str_len(self.token)
    }

    fn encode<B: BufMut>(&self, out: &mut B) {
        header::put(out, self.correlation_id, self.timestamp_ms, self.timeout_ms);
        avro::put_str(out, self.app_name);
        avro::put_str(out, self.token);
    }

    fn decode(input: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        let (correlation_id, timestamp_ms, timeout_ms) = header::read(&mut r)?;
        Ok(EndpointTokenValidationRequest {
            correlation_id,
            timestamp_ms,
            timeout_ms,
            app_name: r.str("appName")?,
            token: r.str("token")?,
        })
    }
}

/// `EndpointTokenValidationResponse`: the provider's answer to an
/// [`EndpointTokenValidationRequest`], sent to the request's reply subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointTokenValidationResponse<'a> {
    /// `correlationId`: echoes the request's.
    pub correlation_id: &'a str,
    /// `timestamp`: creation time, Unix milliseconds.
    pub timestamp_ms: i64,
    /// `timeout`: milliseconds after `timestamp_ms` until the message expires; 0 = never.
    pub timeout_ms: i64,
    /// `tokenId` (`["string","null"]`): id of the resolved token; `None` if not found.
    pub token_id: Option<&'a str>,
    /// `endpointId` (`["string","null"]`): endpoint the token resolves to; `None` if not found.
    pub endpoint_id: Option<&'a str>,
    /// `statusCode`: HTTP status code of the validation.
    pub status_code: i32,
    /// `reasonPhrase` (`["null","string"]`, default null): human-readable status reason.
    pub reason_phrase: Option<&'a str>,
}

impl<'a> Record<'a> for EndpointTokenValidationResponse<'a> {
    const SCHEMA: &'static str =
        include_str!("../schemas/0016-endpoint-token-validation-response.avsc");

    fn encoded_len(&self) -> usize {
        header::len(self.correlation_id, self.timestamp_ms, self.timeout_ms)
            + avro::opt_str_len(self.token_id)
            + avro::opt_str_len(self.endpoint_id)
            + avro::int_len(self.status_code)
            + avro::opt_str_len(self.reason_phrase)
    }

    fn encode<B: BufMut>(&self, out: &mut B) {
        header::put(out, self.correlation_id, self.timestamp_ms, self.timeout_ms);
        avro::put_opt_str(out, self.token_id, NullBranch::Second);
        avro::put_opt_str(out, self.endpoint_id, NullBranch::Second);
        avro::put_int(out, self.status_code);
        avro::put_opt_str(out, self.reason_phrase, NullBranch::First);
    }

    fn decode(input: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        let (correlation_id, timestamp_ms, timeout_ms) = header::read(&mut r)?;
        Ok(EndpointTokenValidationResponse {
            correlation_id,
            timestamp_ms,
            timeout_ms,
            token_id: r.opt_str("tokenId", NullBranch::Second)?,
            endpoint_id: r.opt_str("endpointId", NullBranch::Second)?,
            status_code: r.int("statusCode")?,
            reason_phrase: if r.is_at_end() {
                None
            } else {
                r.opt_str("reasonPhrase", NullBranch::First)?
            },
        })
    }
}

/// `ClientUsernamePasswordValidationRequest`: the consumer asks the provider to check MQTT
/// client credentials, on `kaa.v1.service.<provider>.ecap.client-username-password-request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientUsernamePasswordValidationRequest<'a> {
    /// `correlationId`: message id used to trace processing across services.
    pub correlation_id: &'a str,
    /// `timestamp`: creation time, Unix milliseconds.
    pub timestamp_ms: i64,
    /// `timeout`: milliseconds after `timestamp_ms` until the message expires; 0 = never.
    pub timeout_ms: i64,
    /// `username` (`["string","null"]`).
    pub username: Option<&'a str>,
    /// `password` (`["string","null"]`).
    pub password: Option<&'a str>,
}

impl<'a> Record<'a> for ClientUsernamePasswordValidationRequest<'a> {
    const SCHEMA: &'static str =
        include_str!("../schemas/0016-client-username-password-validation-request.avsc");

    fn encoded_len(&self) -> usize {
        header::len(self.correlation_id, self.timestamp_ms, self.timeout_ms)
            + avro::opt_str_len(self.username)
            + avro::opt_str_len(self.password)
    }

    fn encode<B: BufMut>(&self, out: &mut B) {
        header::put(out, self.correlation_id, self.timestamp_ms, self.timeout_ms);
        avro::put_opt_str(out, self.username, NullBranch::Second);
        avro::put_opt_str(out, self.password, NullBranch::Second);
    }

    fn decode(input: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        let (correlation_id, timestamp_ms, timeout_ms) = header::read(&mut r)?;
        Ok(ClientUsernamePasswordValidationRequest {
            correlation_id,
            timestamp_ms,
            timeout_ms,
            username: r.opt_str("username", NullBranch::Second)?,
            password: r.opt_str("password", NullBranch::Second)?,
        })
    }
}

/// A client validation response: the username/password and the certificate responses have the
/// same fields, in the same order, under their own record names.
macro_rules! client_validation_response {
    ($(#[$doc:meta])* $name:ident, $schema:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $name<'a> {
            /// `correlationId`: echoes the request's.
            pub correlation_id: &'a str,
            /// `timestamp`: creation time, Unix milliseconds.
            pub timestamp_ms: i64,
            /// `timeout`: milliseconds after `timestamp_ms` until the message expires; 0 = never.
            pub timeout_ms: i64,
            /// `credentialId` (`["string","null"]`): id of the matched credential; `None` if
            /// not found.
            pub credential_id: Option<&'a str>,
            /// `clientId` (`["string","null"]`): id of the client; `None` if not found.
            pub client_id: Option<&'a str>,
            /// `statusCode`: HTTP status code of the validation.
            pub status_code: i32,
            /// `reasonPhrase` (`["null","string"]`, default null): human-readable status reason.
            pub reason_phrase: Option<&'a str>,
        }

        impl<'a> Record<'a> for $name<'a> {
            const SCHEMA: &'static str = include_str!($schema);

            fn encoded_len(&self) -> usize {
                header::len(self.correlation_id, self.timestamp_ms, self.timeout_ms)
                    + avro::opt_str_len(self.credential_id)
                    + avro::opt_str_len(self.client_id)
                    + avro::int_len(self.status_code)
                    + avro::opt_str_len(self.reason_phrase)
            }

            fn encode<B: BufMut>(&self, out: &mut B) {
                header::put(out, self.correlation_id, self.timestamp_ms, self.timeout_ms);
                avro::put_opt_str(out, self.credential_id, NullBranch::Second);
                avro::put_opt_str(out, self.client_id, NullBranch::Second);
                avro::put_int(out, self.status_code);
                avro::put_opt_str(out, self.reason_phrase, NullBranch::First);
            }

            fn decode(input: &'a [u8]) -> Result<Self, DecodeError> {
                let mut r = Reader::new(input);
                let (correlation_id, timestamp_ms, timeout_ms) = header::read(&mut r)?;
                Ok($name {
                    correlation_id,
                    timestamp_ms,
                    timeout_ms,
                    credential_id: r.opt_str("credentialId", NullBranch::Second)?,
                    client_id: r.opt_str("clientId", NullBranch::Second)?,
                    status_code: r.int("statusCode")?,
                    reason_phrase: if r.is_at_end() {
                        None
                    } else {
                        r.opt_str("reasonPhrase", NullBranch::First)?
                    },
                })
            }
        }
    };
}

client_validation_response!(
    /// `ClientUsernamePasswordValidationResponse`: the provider's answer to a
    /// [`ClientUsernamePasswordValidationRequest`], sent to the request's reply subject.
    ClientUsernamePasswordValidationResponse,
    "../schemas/0016-client-username-password-validation-response.avsc"
);

/// `ClientCertificateValidationRequest`: the consumer asks the provider whether a client
/// certificate it has already verified (chain, signature, validity) may connect, on
/// `kaa.v1.service.<provider>.ecap.client-certificate-request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCertificateValidationRequest<'a> {
    /// `correlationId`: message id used to trace processing across services.
    pub correlation_id: &'a str,
    /// `timestamp`: creation time, Unix milliseconds.
    pub timestamp_ms: i64,
    /// `timeout`: milliseconds after `timestamp_ms` until the message expires; 0 = never.
    pub timeout_ms: i64,
    /// `issuer`: the certificate's issuer field.
    pub issuer: &'a str,
    /// `serialNumber`: the certificate's serial number, base 10.
    pub serial_number: &'a str,
}

impl<'a> Record<'a> for ClientCertificateValidationRequest<'a> {
    const SCHEMA: &'static str =
        include_str!("../schemas/0016-client-certificate-validation-request.avsc");

    fn encoded_len(&self) -> usize {
        header::len(self.correlation_id, self.timestamp_ms, self.timeout_ms)
            + avro::str_len(self.issuer)
            + avro::str_len(self.serial_number)
    }

    fn encode<B: BufMut>(&self, out: &mut B) {
        header::put(out, self.correlation_id, self.timestamp_ms, self.timeout_ms);
        avro::put_str(out, self.issuer);
        avro::put_str(out, self.serial_number);
    }

    fn decode(input: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        let (correlation_id, timestamp_ms, timeout_ms) = header::read(&mut r)?;
        Ok(ClientCertificateValidationRequest {
            correlation_id,
            timestamp_ms,
            timeout_ms,
            issuer: r.str("issuer")?,
            serial_number: r.str("serialNumber")?,
        })
    }
}

client_validation_response!(
    /// `ClientCertificateValidationResponse`: the provider's answer to a
    /// [`ClientCertificateValidationRequest`], sent to the request's reply subject.
    ClientCertificateValidationResponse,
    "../schemas/0016-client-certificate-validation-response.avsc"
);

/// `ClientCredentialRevokedEvent`: broadcast by the provider on
/// `kaa.v1.events.<provider>.client.credential.revoked`; consumers must end the sessions of
/// clients that authenticated with that credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCredentialRevokedEvent<'a> {
    /// `correlationId`: message id used to trace processing across services.
    pub correlation_id: &'a str,
    /// `timestamp`: creation time, Unix milliseconds.
    pub timestamp_ms: i64,
    /// `timeout`: milliseconds after `timestamp_ms` until the message expires; 0 = never.
    pub timeout_ms: i64,
    /// `credentialId`: the revoked credential.
    pub credential_id: &'a str,
    /// `originatorReplicaId`: replica that emitted the event.
    pub originator_replica_id: &'a str,
}

impl<'a> Record<'a> for ClientCredentialRevokedEvent<'a> {
    const SCHEMA: &'static str = include_str!("../schemas/0016-client-credential-revoked.avsc");

    fn encoded_len(&self) -> usize {
        header::len(self.correlation_id, self.timestamp_ms, self.timeout_ms)
            + avro::str_len(self.credential_id)
            + avro::str_len(self.originator_replica_id)
    }

    fn encode<B: BufMut>(&self, out: &mut B) {
        header::put(out, self.correlation_id, self.timestamp_ms, self.timeout_ms);
        avro::put_str(out, self.credential_id);
        avro::put_str(out, self.originator_replica_id);
    }

    fn decode(input: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        let (correlation_id, timestamp_ms, timeout_ms) = header::read(&mut r)?;
        Ok(ClientCredentialRevokedEvent {
            correlation_id,
            timestamp_ms,
            timeout_ms,
            credential_id: r.str("credentialId")?,
            originator_replica_id: r.str("originatorReplicaId")?,
        })
    }
}

/// `EndpointTokenRevokedEvent`: broadcast by the provider on
/// `kaa.v1.events.<provider>.endpoint.token.revoked`; consumers must end sessions that use
/// the listed tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointTokenRevokedEvent<'a> {
    /// `correlationId`: message id used to trace processing across services.
    pub correlation_id: &'a str,
    /// `timestamp`: creation time, Unix milliseconds.
    pub timestamp_ms: i64,
    /// `timeout`: milliseconds after `timestamp_ms` until the message expires; 0 = never.
    pub timeout_ms: i64,
    /// `appName`: application name of the endpoint.
    pub app_name: &'a str,
    /// `endpointId`: endpoint whose tokens were revoked.
    pub endpoint_id: &'a str,
    /// `tokenIds`: ids of the revoked tokens.
    pub token_ids: Vec<&'a str>,
    /// `originatorReplicaId`: replica that emitted the event.
    pub originator_replica_id: &'a str,
}

impl<'a> Record<'a> for EndpointTokenRevokedEvent<'a> {
    const SCHEMA: &'static str = include_str!("../schemas/0016-endpoint-token-revoked.avsc");

    fn encoded_len(&self) -> usize {
        header::len(self.correlation_id, self.timestamp_ms, self.timeout_ms)
            + avro::str_len(self.app_name)
            + avro::str_len(self.endpoint_id)
            + avro::array_len(&self.token_ids, |t| avro::str_len(t))
            + avro::str_len(self.originator_replica_id)
    }

    fn encode<B: BufMut>(&self, out: &mut B) {
        header::put(out, self.correlation_id, self.timestamp_ms, self.timeout_ms);
        avro::put_str(out, self.app_name);
        avro::put_str(out, self.endpoint_id);
        avro::put_array(out, &self.token_ids, |o, t| avro::put_str(o, t));
        avro::put_str(out, self.originator_replica_id);
    }

    fn decode(input: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        let (correlation_id, timestamp_ms, timeout_ms) = header::read(&mut r)?;
        Ok(EndpointTokenRevokedEvent {
            correlation_id,
            timestamp_ms,
            timeout_ms,
            app_name: r.str("appName")?,
            endpoint_id: r.str("endpointId")?,
            token_ids: r.array("tokenIds", |r| r.str("tokenIds"))?,
            originator_replica_id: r.str("originatorReplicaId")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use apache_avro::types::Value;
    use proptest::prelude::*;

    #[test]
    fn responses_without_reason_phrase_from_older_writer() {
        let rec = EndpointTokenValidationResponse {
            correlation_id: "c1",
            timestamp_ms: 1_700_000_000_000,
            timeout_ms: 0,
            token_id: Some("t-1"),
            endpoint_id: Some("ep-1"),
            status_code: 200,
            reason_phrase: None,
        };
        let bytes = rec.to_bytes();
        assert_eq!(EndpointTokenValidationResponse::decode(&bytes[..bytes.len() - 1]), Ok(rec));

        let rec = ClientUsernamePasswordValidationResponse {
            correlation_id: "c1",
            timestamp_ms: 1_700_000_000_000,
            timeout_ms: 0,
            credential_id: None,
            client_id: None,
            status_code: 401,
            reason_phrase: Some("bad password"),
        };
        let bytes = rec.to_bytes();
        let older = &bytes[..bytes.len() - avro::opt_str_len(rec.reason_phrase)];
        assert_eq!(
            ClientUsernamePasswordValidationResponse::decode(older),
            Ok(ClientUsernamePasswordValidationResponse { reason_phrase: None, ..rec })
        );
    }

    proptest! {
        #[test]
        fn token_request_matches_apache_avro(
            correlation_id in text(), timestamp_ms in long(), timeout_ms in long(),
            app_name in text(), token in text(),
        ) {
            let rec = EndpointTokenValidationRequest {
                correlation_id: &correlation_id,
                timestamp_ms,
                timeout_ms,
                app_name: &app_name,
                token: &token,
            };
            let value = record(
                &correlation_id,
                timestamp_ms,
                timeout_ms,
                vec![("appName", s(&app_name)), ("token", s(&token))],
            );
            check_against_apache!(EndpointTokenValidationRequest, rec, value);
            check_prefixes!(
                EndpointTokenValidationRequest,
                rec.to_bytes(),
                None::<(usize, EndpointTokenValidationRequest<'_>)>
            );
        }

        #[test]
        fn token_response_matches_apache_avro(
            correlation_id in text(), timestamp_ms in long(), timeout_ms in long(),
            token_id in opt_text(), endpoint_id in opt_text(), status_code in int(),
            reason_phrase in opt_text(),
        ) {
            let rec = EndpointTokenValidationResponse {
                correlation_id: &correlation_id,
                timestamp_ms,
                timeout_ms,
                token_id: token_id.as_deref(),
                endpoint_id: endpoint_id.as_deref(),
                status_code,
                reason_phrase: reason_phrase.as_deref(),
            };
            let value = record(
                &correlation_id,
                timestamp_ms,
                timeout_ms,
                vec![
                    ("tokenId", opt_s(rec.token_id, NullBranch::Second)),
                    ("endpointId", opt_s(rec.endpoint_id, NullBranch::Second)),
                    ("statusCode", Value::Int(status_code)),
                    ("reasonPhrase", opt_s(rec.reason_phrase, NullBranch::First)),
                ],
            );
            check_against_apache!(EndpointTokenValidationResponse, rec, value);
            let bytes = rec.to_bytes();
            let older_len = bytes.len() - avro::opt_str_len(rec.reason_phrase);
            check_prefixes!(
                EndpointTokenValidationResponse,
                bytes,
                Some((older_len, EndpointTokenValidationResponse { reason_phrase: None, ..rec }))
            );
        }

        #[test]
        fn username_password_request_matches_apache_avro(
            correlation_id in text(), timestamp_ms in long(), timeout_ms in long(),
            username in opt_text(), password in opt_text(),
        ) {
            let rec = ClientUsernamePasswordValidationRequest {
                correlation_id: &correlation_id,
                timestamp_ms,
                timeout_ms,
                username: username.as_deref(),
                password: password.as_deref(),
            };
            let value = record(
                &correlation_id,
                timestamp_ms,
                timeout_ms,
                vec![
                    ("username", opt_s(rec.username, NullBranch::Second)),
                    ("password", opt_s(rec.password, NullBranch::Second)),
                ],
            );
            check_against_apache!(ClientUsernamePasswordValidationRequest, rec, value);
            check_prefixes!(
                ClientUsernamePasswordValidationRequest,
                rec.to_bytes(),
                None::<(usize, ClientUsernamePasswordValidationRequest<'_>)>
            );
        }

        #[test]
        fn username_password_response_matches_apache_avro(
            correlation_id in text(), timestamp_ms in long(), timeout_ms in long(),
            credential_id in opt_text(), client_id in opt_text(), status_code in int(),
            reason_phrase in opt_text(),
        ) {
            let rec = ClientUsernamePasswordValidationResponse {
                correlation_id: &correlation_id,
                timestamp_ms,
                timeout_ms,
                credential_id: credential_id.as_deref(),
                client_id: client_id.as_deref(),
                status_code,
                reason_phrase: reason_phrase.as_deref(),
            };
            let value = record(
                &correlation_id,
                timestamp_ms,
                timeout_ms,
                vec![
                    ("credentialId", opt_s(rec.credential_id, NullBranch::Second)),
                    ("clientId", opt_s(rec.client_id, NullBranch::Second)),
                    ("statusCode", Value::Int(status_code)),
                    ("reasonPhrase", opt_s(rec.reason_phrase, NullBranch::First)),
                ],
            );
            check_against_apache!(ClientUsernamePasswordValidationResponse, rec, value);
            let bytes = rec.to_bytes();
            let older_len = bytes.len() - avro::opt_str_len(rec.reason_phrase);
            check_prefixes!(
                ClientUsernamePasswordValidationResponse,
                bytes,
                Some((
                    older_len,
                    ClientUsernamePasswordValidationResponse { reason_phrase: None, ..rec }
                ))
            );
        }

        #[test]
        fn certificate_request_matches_apache_avro(
            correlation_id in text(), timestamp_ms in long(), timeout_ms in long(),
            issuer in text(), serial_number in text(),
        ) {
            let rec = ClientCertificateValidationRequest {
                correlation_id: &correlation_id,
                timestamp_ms,
                timeout_ms,
                issuer: &issuer,
                serial_number: &serial_number,
            };
            let value = record(
                &correlation_id,
                timestamp_ms,
                timeout_ms,
                vec![("issuer", s(&issuer)), ("serialNumber", s(&serial_number))],
            );
            check_against_apache!(ClientCertificateValidationRequest, rec, value);
            check_prefixes!(
                ClientCertificateValidationRequest,
                rec.to_bytes(),
                None::<(usize, ClientCertificateValidationRequest<'_>)>
            );
        }

        #[test]
        fn certificate_response_matches_apache_avro(
            correlation_id in text(), timestamp_ms in long(), timeout_ms in long(),
            credential_id in opt_text(), client_id in opt_text(), status_code in int(),
            reason_phrase in opt_text(),
        ) {
            let rec = ClientCertificateValidationResponse {
                correlation_id: &correlation_id,
                timestamp_ms,
                timeout_ms,
                credential_id: credential_id.as_deref(),
                client_id: client_id.as_deref(),
                status_code,
                reason_phrase: reason_phrase.as_deref(),
            };
            let value = record(
                &correlation_id,
                timestamp_ms,
                timeout_ms,
                vec![
                    ("credentialId", opt_s(rec.credential_id, NullBranch::Second)),
                    ("clientId", opt_s(rec.client_id, NullBranch::Second)),
                    ("statusCode", Value::Int(status_code)),
                    ("reasonPhrase", opt_s(rec.reason_phrase, NullBranch::First)),
                ],
            );
            check_against_apache!(ClientCertificateValidationResponse, rec, value);
            let bytes = rec.to_bytes();
            let older_len = bytes.len() - avro::opt_str_len(rec.reason_phrase);
            check_prefixes!(
                ClientCertificateValidationResponse,
                bytes,
                Some((
                    older_len,
                    ClientCertificateValidationResponse { reason_phrase: None, ..rec }
                ))
            );
        }

        #[test]
        fn credential_revoked_matches_apache_avro(
            correlation_id in text(), timestamp_ms in long(), timeout_ms in long(),
            credential_id in text(), originator in text(),
        ) {
            let rec = ClientCredentialRevokedEvent {
                correlation_id: &correlation_id,
                timestamp_ms,
                timeout_ms,
                credential_id: &credential_id,
                originator_replica_id: &originator,
            };
            let value = record(
                &correlation_id,
                timestamp_ms,
                timeout_ms,
                vec![("credentialId", s(&credential_id)), ("originatorReplicaId", s(&originator))],
            );
            check_against_apache!(ClientCredentialRevokedEvent, rec, value);
            check_prefixes!(
                ClientCredentialRevokedEvent,
                rec.to_bytes(),
                None::<(usize, ClientCredentialRevokedEvent<'_>)>
            );
        }

        #[test]
        fn token_revoked_matches_apache_avro(
            correlation_id in text(), timestamp_ms in long(), timeout_ms in long(),
            app_name in text(), endpoint_id in text(),
            token_ids in proptest::collection::vec(text(), 0..6), originator in text(),
        ) {
            let rec = EndpointTokenRevokedEvent {
                correlation_id: &correlation_id,
                timestamp_ms,
                timeout_ms,
                app_name: &app_name,
                endpoint_id: &endpoint_id,
                token_ids: token_ids.iter().map(String::as_str).collect(),
                originator_replica_id: &originator,
            };
            let value = record(
                &correlation_id,
                timestamp_ms,
                timeout_ms,
                vec![
                    ("appName", s(&app_name)),
                    ("endpointId", s(&endpoint_id)),
                    ("tokenIds", Value::Array(token_ids.iter().map(|t| s(t)).collect())),
                    ("originatorReplicaId", s(&originator)),
                ],
            );
            check_against_apache!(EndpointTokenRevokedEvent, rec.clone(), value);
            check_prefixes!(
                EndpointTokenRevokedEvent,
                rec.to_bytes(),
                None::<(usize, EndpointTokenRevokedEvent<'_>)>
            );
        }
    }
}
