//! NATS subjects of 3/ISM and the protocols built on it.
//!
//! ```text
//! targeted, every replica of a service instance:  kaa.v1.service.{instance}.{protocol}.{type}
//! targeted, one replica:                          kaa.v1.replica.{replica-id}.{protocol}.{type}
//! broadcast:                                      kaa.v1.events.{originator}.{entity}.{group}.{type}
//! ```
//!
//! Builders allocate only the returned `String`, sized exactly. They do not validate their
//! arguments: check configured instance names and replica ids once with [`is_valid_token`].

/// Prefix of targeted subjects addressed to every replica of a service instance.
pub const SERVICE_PREFIX: &str = "kaa.v1.service.";
/// Prefix of targeted subjects addressed to one replica.
pub const REPLICA_PREFIX: &str = "kaa.v1.replica.";
/// Prefix of broadcast (event) subjects.
pub const EVENTS_PREFIX: &str = "kaa.v1.events.";

/// 4/ESP protocol name.
pub const ESP: &str = "esp";
/// 4/ESP message type gateway → extension.
pub const CLIENT_DATA: &str = "ClientData";
/// 4/ESP message type extension → gateway.
pub const EXTENSION_DATA: &str = "ExtensionData";

/// 16/ECAP protocol name.
pub const ECAP: &str = "ecap";
/// 16/ECAP endpoint token validation request type.
pub const EP_TOKEN_REQUEST: &str = "ep-token-request";
/// 16/ECAP endpoint token validation response type.
pub const EP_TOKEN_RESPONSE: &str = "ep-token-response";
/// 16/ECAP client username/password validation request type.
pub const CLIENT_USERNAME_PASSWORD_REQUEST: &str = "client-username-password-request";
/// 16/ECAP client username/password validation response type.
pub const CLIENT_USERNAME_PASSWORD_RESPONSE: &str = "client-username-password-response";
/// 16/ECAP client certificate validation request type.
pub const CLIENT_CERTIFICATE_REQUEST: &str = "client-certificate-request";
/// 16/ECAP client certificate validation response type.
pub const CLIENT_CERTIFICATE_RESPONSE: &str = "client-certificate-response";

/// 13/DSTP protocol name (used in reply subjects).
pub const DSTP: &str = "dstp";
/// 13/DSTP reply message type.
pub const DATA_SAMPLES_PROCESSED: &str = "DataSamplesProcessed";

/// Target entity type `endpoint` of broadcast events.
pub const ENDPOINT: &str = "endpoint";
/// Event group of 13/DSTP data samples.
pub const DATA_COLLECTION: &str = "data-collection";
/// Event type of 13/DSTP data samples.
pub const DATA_SAMPLES_RECEIVED: &str = "data-samples-received";
/// Event type of 14/TSTP data points; the series name follows as one more token.
pub const DATA_POINTS_RECEIVED: &str = "data-points-received";
/// Event group of 9/ELCE connectivity events.
pub const CONNECTIVITY: &str = "connectivity";
/// 9/ELCE event type: endpoints connected.
pub const CONNECTED: &str = "connected";
/// 9/ELCE event type: endpoints disconnected.
pub const DISCONNECTED: &str = "disconnected";
/// Event group of 16/ECAP token events.
pub const TOKEN: &str = "token";
/// 16/ECAP event type: tokens (or a client credential) revoked.
pub const REVOKED: &str = "revoked";
/// Target entity type `client` of 16/ECAP credential events.
pub const CLIENT: &str = "client";
/// Event group of 16/ECAP client credential events.
pub const CREDENTIAL: &str = "credential";

/// Protocol name of 6/CDTP.
pub const CDTP: &str = "cdtp";
/// 6/CDTP message type of a configuration request.
pub const CDTP_REQUEST: &str = "request";
/// 6/CDTP message type of a configuration response.
pub const CDTP_RESPONSE: &str = "response";
/// Event group of 6/CDTP events.
pub const CONFIG: &str = "config";
/// 6/CDTP event type: a configuration changed.
pub const CONFIG_UPDATED: &str = "updated";
/// 6/CDTP event type: an endpoint reported on a configuration.
pub const CONFIG_APPLIED: &str = "applied";
/// Wildcard subscription to config-updated events from any provider.
pub const CONFIG_UPDATED_ANY: &str = "kaa.v1.events.*.endpoint.config.updated";
/// Wildcard subscription to config-applied events from any consumer.
pub const CONFIG_APPLIED_ANY: &str = "kaa.v1.events.*.endpoint.config.applied";
/// Wildcard subscription to connected events from any originator.
pub const CONNECTED_ANY: &str = "kaa.v1.events.*.endpoint.connectivity.connected";
/// Wildcard subscription to disconnected events from any originator.
pub const DISCONNECTED_ANY: &str = "kaa.v1.events.*.endpoint.connectivity.disconnected";

/// Wildcard subscription to token-revoked events from any provider.
pub const TOKEN_REVOKED_ANY: &str = "kaa.v1.events.*.endpoint.token.revoked";
/// Wildcard subscription to client-credential-revoked events from any provider.
pub const CREDENTIAL_REVOKED_ANY: &str = "kaa.v1.events.*.client.credential.revoked";
/// Wildcard subscription to data-samples events from any transmitter.
pub const DATA_SAMPLES_RECEIVED_ANY: &str =
    "kaa.v1.events.*.endpoint.data-collection.data-samples-received";

fn join(prefix: &str, parts: &[&str]) -> String {
    let len = prefix.len() + parts.iter().map(|p| p.len()).sum::<usize>() + parts.len() - 1;
    let mut s = String::with_capacity(len);
    s.push_str(prefix);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        s.push_str(p);
    }
    s
}

/// `kaa.v1.service.{instance}.{protocol}.{message_type}`: a targeted message for every replica
/// of a service instance (replicas share a queue group named after the instance).
pub fn service(instance: &str, protocol: &str, message_type: &str) -> String {
    join(SERVICE_PREFIX, &[instance, protocol, message_type])
}

/// `kaa.v1.replica.{replica_id}.{protocol}.{message_type}`: a targeted message for one replica,
/// typically a reply subject.
pub fn replica(replica_id: &str, protocol: &str, message_type: &str) -> String {
    join(REPLICA_PREFIX, &[replica_id, protocol, message_type])
}

/// `kaa.v1.events.{originator}.{entity}.{group}.{event_type}`: a broadcast event.
pub fn event(originator: &str, entity: &str, group: &str, event_type: &str) -> String {
    join(EVENTS_PREFIX, &[originator, entity, group, event_type])
}

/// `kaa.v1.events.{transmitter}.endpoint.data-collection.data-points-received.{series}`: the
/// 14/TSTP broadcast of one series' points.
pub fn tstp_data_points(transmitter_instance: &str, series: &str) -> String {
    join(
        EVENTS_PREFIX,
        &[transmitter_instance, ENDPOINT, DATA_COLLECTION, DATA_POINTS_RECEIVED, series],
    )
}

/// `kaa.v1.service.{extension}.esp.ClientData`: where the gateway sends client requests for an
/// extension instance.
pub fn esp_client_data(extension_instance: &str) -> String {
    service(extension_instance, ESP, CLIENT_DATA)
}

/// `kaa.v1.replica.{gateway_replica}.esp.ExtensionData`: the gateway replica's reply subject for
/// `ClientData`.
pub fn esp_extension_data_reply(gateway_replica_id: &str) -> String {
    replica(gateway_replica_id, ESP, EXTENSION_DATA)
}

/// `kaa.v1.service.{gateway}.esp.ExtensionData`: where extensions push to the gateway when they
/// have no reply subject for the endpoint.
pub fn esp_extension_data(gateway_instance: &str) -> String {
    service(gateway_instance, ESP, EXTENSION_DATA)
}

/// `kaa.v1.service.{provider}.ecap.ep-token-request`.
pub fn ecap_token_request(provider_instance: &str) -> String {
    service(provider_instance, ECAP, EP_TOKEN_REQUEST)
}

/// `kaa.v1.replica.{consumer_replica}.ecap.ep-token-response`: reply subject of a token
/// validation request.
pub fn ecap_token_response_reply(consumer_replica_id: &str) -> String {
    replica(consumer_replica_id, ECAP, EP_TOKEN_RESPONSE)
}

/// `kaa.v1.service.{provider}.ecap.client-username-password-request`.
pub fn ecap_username_password_request(provider_instance: &str) -> String {
    service(provider_instance, ECAP, CLIENT_USERNAME_PASSWORD_REQUEST)
}

/// `kaa.v1.replica.{consumer_replica}.ecap.client-username-password-response`: reply subject of
/// a username/password validation request.
pub fn ecap_username_password_response_reply(consumer_replica_id: &str) -> String {
    replica(consumer_replica_id, ECAP, CLIENT_USERNAME_PASSWORD_RESPONSE)
}

/// `kaa.v1.service.{provider}.ecap.client-certificate-request`.
pub fn ecap_certificate_request(provider_instance: &str) -> String {
    service(provider_instance, ECAP, CLIENT_CERTIFICATE_REQUEST)
}

/// `kaa.v1.replica.{consumer_replica}.ecap.client-certificate-response`: reply subject of a
/// client certificate validation request.
pub fn ecap_certificate_response_reply(consumer_replica_id: &str) -> String {
    replica(consumer_replica_id, ECAP, CLIENT_CERTIFICATE_RESPONSE)
}

/// `kaa.v1.events.{provider}.client.credential.revoked`.
pub fn credential_revoked(provider_instance: &str) -> String {
    event(provider_instance, CLIENT, CREDENTIAL, REVOKED)
}

/// `kaa.v1.events.{provider}.endpoint.token.revoked`.
pub fn token_revoked(provider_instance: &str) -> String {
    event(provider_instance, ENDPOINT, TOKEN, REVOKED)
}

/// `kaa.v1.events.{dcx}.endpoint.data-collection.data-samples-received`.
pub fn dstp_data_samples_received(transmitter_instance: &str) -> String {
    event(transmitter_instance, ENDPOINT, DATA_COLLECTION, DATA_SAMPLES_RECEIVED)
}

/// `kaa.v1.replica.{dcx_replica}.dstp.DataSamplesProcessed`: reply subject of a data-samples
/// event.
pub fn dstp_processed_reply(transmitter_replica_id: &str) -> String {
    replica(transmitter_replica_id, DSTP, DATA_SAMPLES_PROCESSED)
}

/// `kaa.v1.events.{originator}.endpoint.connectivity.connected`.
pub fn elce_connected(originator_instance: &str) -> String {
    event(originator_instance, ENDPOINT, CONNECTIVITY, CONNECTED)
}

/// `kaa.v1.events.{originator}.endpoint.connectivity.disconnected`.
pub fn elce_disconnected(originator_instance: &str) -> String {
    event(originator_instance, ENDPOINT, CONNECTIVITY, DISCONNECTED)
}

/// `kaa.v1.service.{provider}.cdtp.request`.
pub fn cdtp_request(provider_instance: &str) -> String {
    service(provider_instance, CDTP, CDTP_REQUEST)
}

/// `kaa.v1.replica.{consumer_replica}.cdtp.response`: reply subject of a config request.
pub fn cdtp_response_reply(consumer_replica_id: &str) -> String {
    replica(consumer_replica_id, CDTP, CDTP_RESPONSE)
}

/// `kaa.v1.events.{provider}.endpoint.config.updated`.
pub fn config_updated(provider_instance: &str) -> String {
    event(provider_instance, ENDPOINT, CONFIG, CONFIG_UPDATED)
}

/// `kaa.v1.events.{consumer}.endpoint.config.applied`.
pub fn config_applied(consumer_instance: &str) -> String {
    event(consumer_instance, ENDPOINT, CONFIG, CONFIG_APPLIED)
}

/// Whether `s` can be one token of a subject: non-empty, with no `.`, `*`, `>` or whitespace.
///
/// Use it to validate configured service instance names and replica ids before building
/// subjects from them.
pub fn is_valid_token(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c == '.' || c == '*' || c == '>' || c.is_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders() {
        assert_eq!(service("dcx", "esp", "ClientData"), "kaa.v1.service.dcx.esp.ClientData");
        assert_eq!(esp_client_data("dcx"), "kaa.v1.service.dcx.esp.ClientData");
        assert_eq!(esp_extension_data_reply("gw-1"), "kaa.v1.replica.gw-1.esp.ExtensionData");
        assert_eq!(esp_extension_data("kpc"), "kaa.v1.service.kpc.esp.ExtensionData");
        assert_eq!(ecap_token_request("auth"), "kaa.v1.service.auth.ecap.ep-token-request");
        assert_eq!(ecap_token_response_reply("gw-1"), "kaa.v1.replica.gw-1.ecap.ep-token-response");
        assert_eq!(
            ecap_username_password_request("auth"),
            "kaa.v1.service.auth.ecap.client-username-password-request"
        );
        assert_eq!(
            ecap_username_password_response_reply("gw-1"),
            "kaa.v1.replica.gw-1.ecap.client-username-password-response"
        );
        assert_eq!(token_revoked("auth"), "kaa.v1.events.auth.endpoint.token.revoked");
        assert_eq!(cdtp_request("ecr"), "kaa.v1.service.ecr.cdtp.request");
        assert_eq!(cdtp_response_reply("cmx-1"), "kaa.v1.replica.cmx-1.cdtp.response");
        assert_eq!(config_updated("ecr"), "kaa.v1.events.ecr.endpoint.config.updated");
        assert_eq!(config_applied("cmx"), "kaa.v1.events.cmx.endpoint.config.applied");
        assert_eq!(
            dstp_data_samples_received("dcx"),
            "kaa.v1.events.dcx.endpoint.data-collection.data-samples-received"
        );
        assert_eq!(
            tstp_data_points("epts", "auto~temperature"),
            "kaa.v1.events.epts.endpoint.data-collection.data-points-received.auto~temperature"
        );
        assert_eq!(dstp_processed_reply("dcx-0"), "kaa.v1.replica.dcx-0.dstp.DataSamplesProcessed");
        assert_eq!(elce_connected("kpc"), "kaa.v1.events.kpc.endpoint.connectivity.connected");
        assert_eq!(
            elce_disconnected("kpc"),
            "kaa.v1.events.kpc.endpoint.connectivity.disconnected"
        );
        assert_eq!(token_revoked("*"), TOKEN_REVOKED_ANY);
        assert_eq!(credential_revoked("*"), CREDENTIAL_REVOKED_ANY);
        assert_eq!(
            ecap_certificate_request("auth"),
            "kaa.v1.service.auth.ecap.client-certificate-request"
        );
        assert_eq!(
            ecap_certificate_response_reply("gw-1"),
            "kaa.v1.replica.gw-1.ecap.client-certificate-response"
        );
        assert_eq!(dstp_data_samples_received("*"), DATA_SAMPLES_RECEIVED_ANY);
    }

    #[test]
    fn capacity_is_exact() {
        let s = event("a", "bb", "ccc", "dddd");
        assert_eq!(s.len(), s.capacity());
        let s = replica("r", "p", "t");
        assert_eq!(s.len(), s.capacity());
    }

    #[test]
    fn tokens() {
        for ok in ["dcx", "gw-1", "a_b", "ü", "Replica01"] {
            assert!(is_valid_token(ok), "{ok}");
        }
        for bad in ["", "a.b", "*", ">", "a b", "a\tb", "a\nb", "x>"] {
            assert!(!is_valid_token(bad), "{bad:?}");
        }
    }
}
