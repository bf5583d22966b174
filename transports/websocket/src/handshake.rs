//! The opening handshake (RFC 6455 §4.2), sans-IO: the client's upgrade request in, the
//! server's answer out.

use base64::Engine;

/// The GUID every `Sec-WebSocket-Accept` is computed with (RFC 6455 §1.3).
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Largest upgrade request accepted; a request that does not end within it is refused.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// What the upgrade asks for, once accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// Bytes of the input the request took (what follows is already WebSocket frames).
    pub consumed: usize,
    /// The server's `101 Switching Protocols` answer.
    pub response: Vec<u8>,
    /// The subprotocol chosen, when the client offered one we speak.
    pub protocol: Option<String>,
}

/// Why an upgrade request is refused: the device's fault, answered with an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Not an HTTP request, or one over [`MAX_REQUEST_BYTES`].
    #[error("malformed upgrade request: {0}")]
    Malformed(&'static str),
    /// Another path than the one served.
    #[error("no WebSocket endpoint at this path")]
    NotFound,
    /// Not a GET.
    #[error("the upgrade must be a GET")]
    Method,
    /// A request without the WebSocket upgrade headers.
    #[error("not a WebSocket upgrade: {0}")]
    NotUpgrade(&'static str),
    /// A WebSocket version other than 13.
    #[error("unsupported WebSocket version")]
    Version,
    /// The client offered subprotocols, none of which is served.
    #[error("none of the offered subprotocols is served")]
    Subprotocol,
}

impl HandshakeError {
    /// The HTTP answer to send before closing.
    pub fn response(&self) -> Vec<u8> {
        let (status, extra) = match self {
            Self::Malformed(_) | Self::NotUpgrade(_) | Self::Subprotocol => ("400 Bad Request", ""),
            Self::NotFound => ("404 Not Found", ""),
            Self::Method => ("405 Method Not Allowed", "Allow: GET\r\n"),
            Self::Version => ("426 Upgrade Required", "Sec-WebSocket-Version: 13\r\n"),
        };
        let body = self.to_string();
        format!(
            "HTTP/1.1 {status}\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

/// Parses the upgrade request at the start of `input`. `Ok(None)`: the request is not
/// complete yet. `path` is the one path served; `protocols` the subprotocols served, in order
/// of preference. A client that offers no subprotocol is accepted without one.
pub fn accept(
    input: &[u8],
    path: &str,
    protocols: &[&str],
) -> Result<Option<Upgrade>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let consumed = match request.parse(input) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if input.len() < MAX_REQUEST_BYTES => return Ok(None),
        Ok(httparse::Status::Partial) => {
            return Err(HandshakeError::Malformed("request too large"));
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HandshakeError::Malformed("too many headers"));
        }
        Err(_) => return Err(HandshakeError::Malformed("not an HTTP/1.1 request")),
    };
    let target = request.path.unwrap_or_default();
    // The query string does not select the endpoint.
    if target.split('?').next() != Some(path) {
        return Err(HandshakeError::NotFound);
    }
    if request.method != Some("GET") {
        return Err(HandshakeError::Method);
    }
    let headers: &[httparse::Header<'_>] = request.headers;
    let header = |name: &'static str| {
        headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| std::str::from_utf8(h.value).unwrap_or_default())
    };
    let has_token = |name: &'static str, token: &str| {
        header(name).flat_map(|v| v.split(',')).any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token("upgrade", "websocket") {
        return Err(HandshakeError::NotUpgrade("no Upgrade: websocket"));
    }
    if !has_token("connection", "upgrade") {
        return Err(HandshakeError::NotUpgrade("no Connection: Upgrade"));
    }
    if header("sec-websocket-version").next().map(str::trim) != Some("13") {
        return Err(HandshakeError::Version);
    }
    let key = header("sec-websocket-key").next().map(str::trim).unwrap_or_default();
    let decoded = base64::engine::general_purpose::STANDARD.decode(key);
    if !matches!(decoded, Ok(k) if k.len() == 16) {
        return Err(HandshakeError::NotUpgrade("bad Sec-WebSocket-Key"));
    }
    let offered: Vec<&str> = header("sec-websocket-protocol")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let protocol = if offered.is_empty() {
        None
    } else {
        let chosen = protocols.iter().find(|p| offered.contains(p));
        Some(chosen.ok_or(HandshakeError::Subprotocol)?.to_string())
    };
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if let Some(p) = &protocol {
        response.push_str("Sec-WebSocket-Protocol: ");
        response.push_str(p);
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    Ok(Some(Upgrade { consumed, response: response.into_bytes(), protocol }))
}

/// `Sec-WebSocket-Accept` for a client's key.
pub fn accept_key(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const REQUEST: &str = "GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqttv3.1, mqtt\r\n\r\n";

    #[test]
    fn the_rfc_example_key() {
        // RFC 6455 §1.3.
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn an_upgrade_is_answered_with_the_preferred_protocol() {
        let mut input = REQUEST.as_bytes().to_vec();
        input.extend_from_slice(&[0x82, 0x80]);
        for cut in 0..REQUEST.len() {
            assert_eq!(accept(&input[..cut], "/mqtt", &["mqtt"]), Ok(None), "{cut}");
        }
        let upgrade = accept(&input, "/mqtt", &["mqtt", "mqttv3.1"]).unwrap().unwrap();
        assert_eq!(upgrade.consumed, REQUEST.len());
        assert_eq!(upgrade.protocol.as_deref(), Some("mqtt"));
        let response = String::from_utf8(upgrade.response).unwrap();
        assert!(response.starts_with("HTTP/1.1 101 "), "{response}");
        assert!(response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(response.contains("Sec-WebSocket-Protocol: mqtt\r\n"));
    }

    #[test]
    fn bad_upgrades_are_refused_precisely() {
        let with = |from: &str, to: &str| REQUEST.replace(from, to);
        let cases = [
            (with("/mqtt", "/other"), HandshakeError::NotFound),
            (with("GET", "POST"), HandshakeError::Method),
            (
                with("Upgrade: websocket", "Upgrade: h2c"),
                HandshakeError::NotUpgrade("no Upgrade: websocket"),
            ),
            (with("Version: 13", "Version: 8"), HandshakeError::Version),
            (with("mqttv3.1, mqtt", "wamp"), HandshakeError::Subprotocol),
            (
                with("dGhlIHNhbXBsZSBub25jZQ==", "short"),
                HandshakeError::NotUpgrade("bad Sec-WebSocket-Key"),
            ),
        ];
        for (request, error) in cases {
            assert_eq!(accept(request.as_bytes(), "/mqtt", &["mqtt"]), Err(error.clone()));
            assert!(!error.response().starts_with(b"HTTP/1.1 101"));
        }
        assert!(accept(&[b'x'; MAX_REQUEST_BYTES + 1], "/mqtt", &["mqtt"]).is_err());
        let big = format!("GET /mqtt HTTP/1.1\r\n{}", "A: b\r\n".repeat(2000));
        assert!(matches!(
            accept(big.as_bytes(), "/mqtt", &["mqtt"]),
            Err(HandshakeError::Malformed(_))
        ));
    }

    #[test]
    fn no_subprotocol_offered_is_accepted_without_one() {
        let request = REQUEST.replace("Sec-WebSocket-Protocol: mqttv3.1, mqtt\r\n", "");
        let upgrade = accept(request.as_bytes(), "/mqtt", &["mqtt"]).unwrap().unwrap();
        assert_eq!(upgrade.protocol, None);
        assert!(!String::from_utf8(upgrade.response).unwrap().contains("Sec-WebSocket-Protocol"));
    }
}
