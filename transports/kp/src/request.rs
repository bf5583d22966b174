//! Requests, responses and the session identities that carry them.

use std::net::SocketAddr;

use bytes::Bytes;

use crate::{KpError, KpTopic};

/// Identifies one device session (an MQTT connection, a CoAP peer, an HTTP client) within a
/// gateway process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// What a client presented when it connected.
#[derive(Debug, Clone, Copy)]
pub struct ClientCredentials<'a> {
    /// Transport name, e.g. `mqtt`.
    pub transport: &'static str,
    /// Transport-level client id (MQTT client identifier), possibly empty.
    pub client_id: &'a str,
    /// User name, if any.
    pub username: Option<&'a str>,
    /// Password, if any (MQTT passwords are binary).
    pub password: Option<&'a [u8]>,
    /// Address of the peer.
    pub peer: SocketAddr,
    /// The client certificate the transport verified at its TLS handshake (chain, validity,
    /// CRLs), when the client presented one.
    pub certificate: Option<&'a ClientCertificate>,
}

/// What a verified client certificate says: what 16/ECAP's certificate request carries and
/// the field the transport is configured to name the endpoint with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    /// The issuer's distinguished name.
    pub issuer: String,
    /// The serial number in base 10.
    pub serial: String,
    /// The configured endpoint field (common name, DNS name, ...), when the certificate has it.
    pub endpoint: Option<String>,
}

/// What the gateway knows of an authenticated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The session's id, for every later call about this session.
    pub session: SessionId,
    /// The client id the credential provider assigned, when it did.
    pub client_id: Option<String>,
}

/// One 1/KP request from a device.
#[derive(Debug, Clone)]
pub struct KpRequest {
    /// The parsed resource path.
    pub topic: KpTopic,
    /// The payload, a slice of the transport's read buffer.
    pub payload: Bytes,
    /// An opaque value the transport chooses; the response to this request carries it back (a
    /// CoAP transport keeps its exchange there; MQTT its response QoS).
    pub tag: u64,
    /// The transport must answer this request even when its path has no request id (an HTTP
    /// request, a confirmable CoAP request): the gateway then asks the extension for an answer
    /// as if the path had one, and responds with `request_id: None`. MQTT leaves it false:
    /// there, a request without id gets no success response (1/KP).
    pub wants_answer: bool,
}

/// What happened to a request, or what an extension pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KpOutcome {
    /// 2xx: the extension's payload (empty for none), for the `/status` topic.
    Success(Bytes),
    /// Anything else, for the `/error` topic with the 1/KP error body.
    Error(KpError),
    /// The bus could not take the request in time, so the gateway wrote it to its durable
    /// spool: it will be delivered, and the extension's answer (if the device gets one) follows
    /// later without tag. The transport acknowledges the request (MQTT PUBACK, HTTP 202, CoAP
    /// 2.xx without payload) and publishes nothing for it.
    Stored,
}

/// A response or push for a device, addressed by 1/KP path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KpResponse {
    /// The path without request id or status suffix: `kp1/<appver>/<ext>/<token><resource path>`.
    pub base: Bytes,
    /// The request id the response answers; `None` for pushes and id-less requests.
    pub request_id: Option<u32>,
    /// The request's [`KpRequest::tag`]; 0 for pushes.
    pub tag: u64,
    /// Success payload or error.
    pub outcome: KpOutcome,
}

/// The full MQTT topic a response goes to: `<base>[/<request id>]/status|error`.
pub fn response_topic(response: &KpResponse) -> String {
    let mut topic = String::from_utf8_lossy(&response.base).into_owned();
    if let Some(id) = response.request_id {
        topic.push('/');
        topic.push_str(&id.to_string());
    }
    topic.push_str(match response.outcome {
        KpOutcome::Success(_) | KpOutcome::Stored => "/status",
        KpOutcome::Error(_) => "/error",
    });
    topic
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_topics() {
        let mut r = KpResponse {
            base: Bytes::from_static(b"kp1/a/dcx/t/json"),
            request_id: Some(42),
            tag: 0,
            outcome: KpOutcome::Success(Bytes::new()),
        };
        assert_eq!(response_topic(&r), "kp1/a/dcx/t/json/42/status");
        r.request_id = None;
        r.outcome = KpOutcome::Error(KpError::bad_request("x"));
        assert_eq!(response_topic(&r), "kp1/a/dcx/t/json/error");
    }
}
