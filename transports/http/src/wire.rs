//! The small pieces of HTTP the transport reads itself, without I/O: the `Authorization`
//! header, the long poll query, the HTTP/2 preface and the response content type.

use base64::Engine;

use crate::HttpError;

/// What a client presented in its `Authorization` header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Credentials {
    /// `Basic`: the user name.
    pub username: Option<String>,
    /// `Basic`: the password; `Bearer`: the token.
    pub password: Option<Vec<u8>>,
}

/// Reads an `Authorization` header: `Basic base64(user:password)` (RFC 7617) gives a user name
/// and a password; `Bearer <token>` (RFC 6750) gives no user name and the token as the
/// password; no header gives neither.
pub(crate) fn parse_authorization(value: Option<&[u8]>) -> Result<Credentials, HttpError> {
    let Some(value) = value else {
        return Ok(Credentials::default());
    };
    let text =
        std::str::from_utf8(value).map_err(|_| HttpError::BadAuthorization("not ASCII"))?.trim();
    let (scheme, rest) = text.split_once(' ').ok_or(HttpError::BadAuthorization("no scheme"))?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| HttpError::BadAuthorization("Basic credentials are not base64"))?;
        let colon = decoded
            .iter()
            .position(|&b| b == b':')
            .ok_or(HttpError::BadAuthorization("Basic credentials have no `:`"))?;
        let username = String::from_utf8(decoded[..colon].to_vec())
            .map_err(|_| HttpError::BadAuthorization("Basic user name is not UTF-8"))?;
        Ok(Credentials { username: Some(username), password: Some(decoded[colon + 1..].to_vec()) })
    } else if scheme.eq_ignore_ascii_case("bearer") {
        if rest.is_empty() {
            return Err(HttpError::BadAuthorization("empty Bearer token"));
        }
        Ok(Credentials { username: None, password: Some(rest.as_bytes().to_vec()) })
    } else {
        Err(HttpError::BadAuthorization("use Basic or Bearer"))
    }
}

/// A long poll's query: `observe=true` (or `1`, or bare `observe`) and an optional
/// `timeout_ms=N`. `Ok(None)` when the query does not ask to observe.
pub(crate) fn parse_observe(query: Option<&str>) -> Result<Option<Option<u64>>, HttpError> {
    let mut observe = false;
    let mut timeout_ms = None;
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "observe" => observe = matches!(value, "" | "true" | "1"),
            "timeout_ms" => {
                let ms =
                    value.parse().map_err(|_| HttpError::BadQuery("timeout_ms is not a number"))?;
                timeout_ms = Some(ms);
            }
            _ => {}
        }
    }
    Ok(observe.then_some(timeout_ms))
}

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
pub(crate) const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a connection say about its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Preface {
    /// Not the HTTP/2 preface: HTTP/1.
    Http1,
    /// The whole HTTP/2 preface.
    Http2,
    /// A prefix of the HTTP/2 preface so far.
    NeedMore,
}

/// Classifies the first bytes of a connection.
pub(crate) fn preface(first: &[u8]) -> Preface {
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] != H2_PREFACE[..n] {
        Preface::Http1
    } else if n == H2_PREFACE.len() {
        Preface::Http2
    } else {
        Preface::NeedMore
    }
}

/// `application/json` for a payload that is JSON, else `application/octet-stream`.
pub(crate) fn content_type(payload: &[u8]) -> &'static str {
    if serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok() {
        "application/json"
    } else {
        "application/octet-stream"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(s: &str) -> String {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s))
    }

    #[test]
    fn basic_credentials() {
        let c = parse_authorization(Some(basic("dev-1:s3cr:et").as_bytes())).expect("valid");
        assert_eq!(c.username.as_deref(), Some("dev-1"));
        assert_eq!(c.password.as_deref(), Some(&b"s3cr:et"[..]));
        let c = parse_authorization(Some(basic(":").as_bytes())).expect("empty parts");
        assert_eq!((c.username.as_deref(), c.password.as_deref()), (Some(""), Some(&b""[..])));
        let c = parse_authorization(Some(b"basic ZGV2OnB3")).expect("scheme is case-insensitive");
        assert_eq!(c.username.as_deref(), Some("dev"));
    }

    #[test]
    fn bearer_token_is_the_password() {
        let c = parse_authorization(Some(b"Bearer abc.def")).expect("valid");
        assert_eq!(c, Credentials { username: None, password: Some(b"abc.def".to_vec()) });
    }

    #[test]
    fn no_header_is_anonymous() {
        assert_eq!(parse_authorization(None).expect("anonymous"), Credentials::default());
    }

    #[test]
    fn malformed_authorization_is_401() {
        for bad in [&b"Basic"[..], b"Basic !!!", b"Basic ZGV2", b"Digest x", b"Bearer ", b"\xff"] {
            let e = parse_authorization(Some(bad)).expect_err("malformed");
            assert_eq!(e.status(), 401, "{bad:?}");
        }
    }

    #[test]
    fn observe_query() {
        assert_eq!(parse_observe(None).expect("ok"), None);
        assert_eq!(parse_observe(Some("x=1")).expect("ok"), None);
        assert_eq!(parse_observe(Some("observe=false")).expect("ok"), None);
        assert_eq!(parse_observe(Some("observe=true")).expect("ok"), Some(None));
        assert_eq!(parse_observe(Some("observe&timeout_ms=250")).expect("ok"), Some(Some(250)));
        assert_eq!(parse_observe(Some("timeout_ms=5&observe=1")).expect("ok"), Some(Some(5)));
        assert_eq!(
            parse_observe(Some("observe=true&timeout_ms=x")).map_err(|e| e.status()),
            Err(400)
        );
    }

    #[test]
    fn preface_detection() {
        assert_eq!(preface(b"POST /kp1"), Preface::Http1);
        assert_eq!(preface(b"P"), Preface::NeedMore);
        assert_eq!(preface(b"PRI * HTTP/2"), Preface::NeedMore);
        assert_eq!(preface(H2_PREFACE), Preface::Http2);
        assert_eq!(preface(b"PRI * HTTP/1.1\r\n"), Preface::Http1);
    }

    #[test]
    fn json_is_sniffed() {
        assert_eq!(content_type(br#"{"configId":"c2"}"#), "application/json");
        assert_eq!(content_type(b" [1, 2] "), "application/json");
        assert_eq!(content_type(b"42"), "application/json");
        assert_eq!(content_type(b"[1,"), "application/octet-stream");
        assert_eq!(content_type(b"\x00\x01"), "application/octet-stream");
    }
}
