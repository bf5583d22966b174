//! Status codes of DESIGN decision 3 and the 1/KP error body (`0001-error-response.schema.json`).

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};

/// A request that failed, with an HTTP status code (DESIGN decision 3) and a reason phrase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {reason}")]
pub struct KpError {
    /// HTTP status code: 400, 401, 403, 404, 413, 429, 503, 504 (or an extension's own code).
    pub status: u16,
    /// Human-readable reason, sent to the device.
    pub reason: Cow<'static, str>,
}

impl KpError {
    /// A failure with the given status and reason.
    pub fn new(status: u16, reason: impl Into<Cow<'static, str>>) -> Self {
        Self { status, reason: reason.into() }
    }

    /// 400: the payload is malformed.
    pub fn bad_request(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(400, reason)
    }

    /// 401: unknown, revoked or missing token or credentials.
    pub fn unauthorized(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(401, reason)
    }

    /// 403: token or topic not permitted to this client.
    pub fn forbidden(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(403, reason)
    }

    /// 404: unknown app version, extension instance or resource path.
    pub fn not_found(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(404, reason)
    }

    /// 413: payload too large.
    pub fn too_large(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(413, reason)
    }

    /// 503: no extension replica answered.
    pub fn unavailable(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(503, reason)
    }

    /// 504: the extension timed out.
    pub fn timeout(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(504, reason)
    }

    /// The 1/KP error body for this failure.
    pub fn body(&self) -> Bytes {
        error_body(self.status, &self.reason)
    }
}

/// The standard reason phrase of an HTTP status code used by fleetgate.
pub fn status_reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// The 1/KP error response body: `{"statusCode":<status>,"reasonPhrase":"<reason>"}`.
pub fn error_body(status: u16, reason: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(40 + reason.len());
    out.put_slice(b"{\"statusCode\":");
    out.put_slice(status.to_string().as_bytes());
    out.put_slice(b",\"reasonPhrase\":\"");
    for c in reason.chars() {
        match c {
            '"' => out.put_slice(b"\\\""),
            '\\' => out.put_slice(b"\\\\"),
            '\n' => out.put_slice(b"\\n"),
            '\r' => out.put_slice(b"\\r"),
            '\t' => out.put_slice(b"\\t"),
            c if u32::from(c) < 0x20 => {
                out.put_slice(format!("\\u{:04x}", u32::from(c)).as_bytes());
            }
            c => {
                let mut buf = [0u8; 4];
                out.put_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.put_slice(b"\"}");
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_is_the_kp_schema() {
        let body = error_body(401, "Unknown endpoint token");
        assert_eq!(&body[..], br#"{"statusCode":401,"reasonPhrase":"Unknown endpoint token"}"#);
    }

    proptest::proptest! {
        #[test]
        fn error_body_is_valid_json(status in 100u16..600, reason in "\\PC*|[\\x00-\\x1f\"\\\\]*") {
            let body = error_body(status, &reason);
            let v: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
            proptest::prop_assert_eq!(v["statusCode"].as_u64(), Some(u64::from(status)));
            proptest::prop_assert_eq!(v["reasonPhrase"].as_str(), Some(reason.as_str()));
            proptest::prop_assert_eq!(v.as_object().map(|o| o.len()), Some(2));
        }
    }
}
