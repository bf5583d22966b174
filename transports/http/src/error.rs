//! Why an HTTP request is answered by the transport itself rather than by an extension.

use fleetgate_transport_core::{KpError, KpTopicError};

/// A request the transport answers itself. Each variant says whose fault it is; all of them are
/// sent to the client as their [`HttpError::status`] with the 1/KP error body.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Device: the body is over `max_body_bytes`.
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge {
        /// The configured limit.
        limit: u64,
    },
    /// Device or network: the body could not be read (connection reset, bad chunk encoding).
    #[error("request body could not be read: {0}")]
    BodyRead(#[source] hyper::Error),
    /// Device: the body did not arrive within `request_timeout_ms`.
    #[error("request body not received within {0} ms")]
    BodyTimeout(u64),
    /// Device: the body arrived slower than `min_body_bytes_per_sec`.
    #[error("request body arrives slower than {0} bytes per second")]
    BodyTooSlow(u64),
    /// Device: the path is not a 1/KP resource path.
    #[error("not a 1/KP resource path: {0}")]
    NotKp(#[from] KpTopicError),
    /// Device: a method other than POST, PUT, or GET with `?observe=true`.
    #[error("use POST or PUT for requests, GET with ?observe=true for a long poll")]
    MethodNotAllowed,
    /// Device: an `Authorization` header that is neither valid `Basic` nor `Bearer`.
    #[error("malformed Authorization header: {0}")]
    BadAuthorization(&'static str),
    /// Device: a long poll query that cannot be read.
    #[error("malformed query: {0}")]
    BadQuery(&'static str),
    /// Device: too many requests waiting for answers on one connection.
    #[error("too many requests in flight on this connection")]
    TooManyInFlight,
    /// Device: too many different credentials used on one connection.
    #[error("too many different credentials on this connection")]
    TooManySessions,
    /// Backend: no answer within `request_timeout_ms`.
    #[error("no answer within {0} ms")]
    AnswerTimeout(u64),
    /// Backend or shutdown: the session or connection ended while the request waited.
    #[error("the gateway is shutting down or dropped the session")]
    Gone,
}

impl HttpError {
    /// The HTTP status code the client gets.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BodyTooLarge { .. } => 413,
            HttpError::BodyRead(_) | HttpError::BadQuery(_) => 400,
            HttpError::BodyTimeout(_) | HttpError::BodyTooSlow(_) => 408,
            HttpError::NotKp(_) => 404,
            HttpError::MethodNotAllowed => 405,
            HttpError::BadAuthorization(_) => 401,
            HttpError::TooManyInFlight | HttpError::TooManySessions => 429,
            HttpError::AnswerTimeout(_) => 504,
            HttpError::Gone => 503,
        }
    }
}

impl From<HttpError> for KpError {
    fn from(e: HttpError) -> Self {
        KpError::new(e.status(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_their_status_into_the_kp_body() {
        let e = KpError::from(HttpError::BodyTooLarge { limit: 10 });
        assert_eq!(e.status, 413);
        assert_eq!(
            &e.body()[..],
            br#"{"statusCode":413,"reasonPhrase":"request body is larger than 10 bytes"}"#
        );
        assert_eq!(KpError::from(HttpError::NotKp(KpTopicError::NotKp1)).status, 404);
    }
}
