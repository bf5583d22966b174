//! One simulated HTTP device: its own TCP connection (bound to a chosen source address), HTTP/1.1
//! with keep-alive, sending each data sample as `POST /kp1/<app version>/dcx/<token>/json` with
//! a `Content-Length` body, requests pipelined.
//!
//! Sending never waits: [`HttpDevice::publish`] writes the request into the connection's
//! outbox and writes what the socket takes right now; what it does not take stays in the outbox
//! (bounded) for the next attempt, as the MQTT device does. At most `window` requests await
//! their response. The reader task ([`HttpDevice::read_loop`]) parses the responses
//! ([`parse_response`]: `Content-Length` or chunked bodies) and counts each as acknowledged,
//! as an error (a failure by status, with the body's `reasonPhrase`) when its status is 400 or
//! more, and times it from its request's send (responses come in request order). The gateway
//! answers every request, whatever the QoS asked for.
//!
//! What it does not do: HTTP/2, TLS, authentication headers, request ids in the path, or
//! reconnect (a connection the server closes stays closed and is counted lost).

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::device::{
    ConnectError, Liveness, SendOutcome, Written, read_now, tcp_connect, write_now,
};
use crate::stats::{Failure, RunCounters, mono_nanos};

/// Read buffer growth step.
const READ_CHUNK: usize = 1024;
/// Largest response head accepted.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest response body accepted.
const MAX_BODY_BYTES: usize = 1 << 20;
/// Headers parsed per response, at most.
const MAX_HEADERS: usize = 32;

/// How every HTTP device of a run reaches the gateway.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// The gateway's HTTP address.
    pub target: SocketAddr,
    /// The 1/KP application version in the path.
    pub app_version: String,
    /// Requests a connection may have awaiting their response.
    pub window: u32,
    /// Unwritten bytes a connection may hold before sends are dropped as backpressure.
    pub max_buffer_bytes: usize,
    /// TCP connect must finish within this.
    pub connect_timeout: Duration,
}

/// Why the response stream could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResponseError {
    /// Not an HTTP/1.x response head.
    #[error("malformed response head: {0}")]
    Head(String),
    /// A header value that cannot be used.
    #[error("bad {0} header")]
    Header(&'static str),
    /// A response with a body but neither `Content-Length` nor chunked encoding (it would end
    /// only with the connection, which pipelining cannot use).
    #[error("response body without a length")]
    Unframed,
    /// A malformed chunked body.
    #[error("malformed chunked body")]
    Chunked,
    /// Head or body over the limit.
    #[error("response too large")]
    TooLarge,
}

/// One complete response taken off the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedResponse {
    /// The status code.
    pub status: u16,
    /// The server said `Connection: close`: nothing more will come.
    pub close: bool,
    /// The body of an error response (status 400 or more) with a `Content-Length`.
    pub error_body: Option<Bytes>,
}

/// Length of a complete chunked body at the start of `b` (chunks, last chunk, trailers, final
/// CRLF), or `None` when more bytes are needed.
fn chunked_len(b: &[u8]) -> Result<Option<usize>, ResponseError> {
    let mut pos = 0usize;
    loop {
        let (n, size) = match httparse::parse_chunk_size(&b[pos..]) {
            Ok(httparse::Status::Complete(v)) => v,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(ResponseError::Chunked),
        };
        pos += n;
        let size = usize::try_from(size).map_err(|_| ResponseError::TooLarge)?;
        if size > MAX_BODY_BYTES || pos > MAX_BODY_BYTES {
            return Err(ResponseError::TooLarge);
        }
        if size == 0 {
            // Trailers (usually none), then an empty line.
            let rest = &b[pos..];
            if rest.starts_with(b"\r\n") {
                return Ok(Some(pos + 2));
            }
            return Ok(rest.windows(4).position(|w| w == b"\r\n\r\n").map(|i| pos + i + 4));
        }
        if b.len() < pos + size + 2 {
            return Ok(None);
        }
        if &b[pos + size..pos + size + 2] != b"\r\n" {
            return Err(ResponseError::Chunked);
        }
        pos += size + 2;
    }
}

/// Takes one complete response off the front of `buf`; `Ok(None)` when more bytes are needed
/// (nothing is consumed then). Interim (1xx) responses are skipped.
pub fn parse_response(buf: &mut BytesMut) -> Result<Option<ParsedResponse>, ResponseError> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let head_len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                return Err(ResponseError::TooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(ResponseError::Head(e.to_string())),
        };
        let status = resp.code.unwrap_or(0);
        let mut content_length: Option<usize> = None;
        let mut chunked = false;
        let mut close = false;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let v = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|s| s.trim().parse::<usize>().ok())
                    .ok_or(ResponseError::Header("Content-Length"))?;
                if content_length.is_some_and(|c| c != v) {
                    return Err(ResponseError::Header("Content-Length"));
                }
                content_length = Some(v);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                // Chunked must be the last coding (RFC 9112 §6.1).
                let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
                chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
                if !chunked {
                    return Err(ResponseError::Header("Transfer-Encoding"));
                }
            } else if h.name.eq_ignore_ascii_case("connection") {
                close |= h
                    .value
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            }
        }
        let body_len = if (100..200).contains(&status) || status == 204 || status == 304 {
            0
        } else if chunked {
            match chunked_len(&buf[head_len..])? {
                Some(n) => n,
                None => return Ok(None),
            }
        } else {
            match content_length {
                Some(n) if n > MAX_BODY_BYTES => return Err(ResponseError::TooLarge),
                Some(n) => n,
                None => return Err(ResponseError::Unframed),
            }
        };
        if buf.len() < head_len + body_len {
            return Ok(None);
        }
        buf.advance(head_len);
        let body = buf.split_to(body_len);
        if (100..200).contains(&status) {
            continue;
        }
        let error_body = (status >= 400 && !chunked).then(|| body.freeze());
        return Ok(Some(ParsedResponse { status, close, error_body }));
    }
}

/// A connected HTTP device.
pub struct HttpDevice {
    stream: TcpStream,
    /// The request up to the `Content-Length` value.
    head: Bytes,
    out: Mutex<BytesMut>,
    /// Send times ([`mono_nanos`]) of the requests awaiting their response, in order.
    sent_at: Mutex<VecDeque<u64>>,
    inflight: AtomicU32,
    window: u32,
    max_buffer: usize,
    live: Liveness,
}

impl std::fmt::Debug for HttpDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpDevice")
            .field("head", &String::from_utf8_lossy(&self.head))
            .field("open", &self.live.is_open())
            .finish_non_exhaustive()
    }
}

/// Connects one device: TCP from `source` to `opts.target`, nothing sent yet.
pub async fn connect(
    opts: &HttpOptions,
    source: Option<IpAddr>,
    token: &str,
    counters: Arc<RunCounters>,
) -> Result<Arc<HttpDevice>, ConnectError> {
    let stream = tokio::time::timeout(opts.connect_timeout, tcp_connect(opts.target, source))
        .await
        .map_err(|_| ConnectError::Unanswered("TCP connect"))??;
    let head = format!(
        "POST /{} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: ",
        crate::device::data_topic(&opts.app_version, token),
        opts.target
    );
    Ok(Arc::new(HttpDevice {
        stream,
        head: Bytes::from(head),
        out: Mutex::new(BytesMut::new()),
        sent_at: Mutex::new(VecDeque::new()),
        inflight: AtomicU32::new(0),
        window: opts.window.max(1),
        max_buffer: opts.max_buffer_bytes,
        live: Liveness::opened(counters),
    }))
}

impl HttpDevice {
    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        self.live.is_open()
    }

    /// Sends one data sample with `payload`, now, without waiting for anything.
    pub fn publish(&self, payload: &[u8]) -> SendOutcome {
        use std::fmt::Write as _;
        if !self.is_open() {
            return SendOutcome::Closed;
        }
        if self.inflight.load(Ordering::Relaxed) >= self.window {
            return SendOutcome::WindowFull;
        }
        let Ok(mut buf) = self.out.lock() else {
            return SendOutcome::Closed;
        };
        if buf.len() >= self.max_buffer {
            return SendOutcome::BufferFull;
        }
        buf.extend_from_slice(&self.head);
        let _ = write!(buf, "{}\r\n\r\n", payload.len());
        buf.extend_from_slice(payload);
        self.inflight.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut q) = self.sent_at.lock() {
            q.push_back(mono_nanos());
        }
        let pending = self.write_out(&mut buf);
        SendOutcome::Sent { pending }
    }

    /// Writes what the socket takes of the outbox; `true` when bytes are left.
    pub fn flush(&self) -> bool {
        match self.out.lock() {
            Ok(mut out) => self.write_out(&mut out),
            Err(_) => false,
        }
    }

    fn write_out(&self, buf: &mut BytesMut) -> bool {
        match write_now(&self.stream, buf) {
            Written::All => false,
            Written::Pending => true,
            Written::Closed => {
                self.mark_closed();
                false
            }
        }
    }

    fn mark_closed(&self) {
        self.live.mark_closed();
    }

    fn handle(&self, r: ParsedResponse) {
        let _ = self
            .inflight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
        let counters = self.live.counters();
        if let Some(t) = self.sent_at.lock().ok().and_then(|mut q| q.pop_front()) {
            counters.round_trip(t);
        }
        let step = counters.current();
        step.acked.fetch_add(1, Ordering::Relaxed);
        if r.status >= 400 {
            step.ack_errors.fetch_add(1, Ordering::Relaxed);
            counters.fail(Failure::Http(r.status), || {
                r.error_body.as_deref().and_then(|b| crate::device::parse_error_body(b).1)
            });
        }
        if r.close {
            self.mark_closed();
        }
    }

    /// The reader: runs until `stop` turns true or the connection closes.
    pub async fn read_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut read = BytesMut::with_capacity(READ_CHUNK);
        let mut want_write = false;
        while self.is_open() && !*stop.borrow() {
            loop {
                match parse_response(&mut read) {
                    Ok(Some(r)) => self.handle(r),
                    Ok(None) => break,
                    Err(_) => {
                        self.mark_closed();
                        return;
                    }
                }
            }
            if !self.is_open() {
                return;
            }
            if read.capacity() - read.len() < READ_CHUNK / 4 {
                read.reserve(READ_CHUNK);
            }
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                r = self.stream.readable() => {
                    if r.is_err() || !read_now(&self.stream, &mut read) {
                        self.mark_closed();
                        return;
                    }
                }
                // The sender writes the outbox too; this picks up what it left when the
                // socket was full and no new message came to push it.
                r = self.stream.writable(), if want_write => {
                    if r.is_ok() {
                        self.flush();
                    }
                }
            }
            want_write = self.out.lock().is_ok_and(|b| !b.is_empty());
        }
        self.shutdown();
    }

    /// Marks the connection closed without counting it as lost.
    pub fn shutdown(&self) {
        self.live.stop();
        self.mark_closed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"status\":\"ok\"}";

    #[test]
    fn a_response_split_across_reads() {
        let mut buf = BytesMut::new();
        for (i, b) in OK.iter().enumerate() {
            assert_eq!(parse_response(&mut buf), Ok(None), "complete after {i} bytes?");
            assert_eq!(buf.len(), i, "nothing consumed while incomplete");
            buf.extend_from_slice(&[*b]);
        }
        assert_eq!(
            parse_response(&mut buf),
            Ok(Some(ParsedResponse { status: 200, close: false, error_body: None }))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn pipelined_responses_and_an_error_status() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(OK);
        buf.extend_from_slice(b"HTTP/1.1 204 No Content\r\ndate: x\r\n\r\n");
        buf.extend_from_slice(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 44\r\nConnection: close\r\n\r\n{\"statusCode\":400,\"reasonPhrase\":\"bad json\"}",
        );
        buf.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Len");
        let got: Vec<_> = std::iter::from_fn(|| parse_response(&mut buf).ok().flatten()).collect();
        assert_eq!(
            got,
            vec![
                ParsedResponse { status: 200, close: false, error_body: None },
                ParsedResponse { status: 204, close: false, error_body: None },
                ParsedResponse {
                    status: 400,
                    close: true,
                    error_body: Some(Bytes::from_static(
                        br#"{"statusCode":400,"reasonPhrase":"bad json"}"#
                    )),
                },
            ]
        );
        assert_eq!(&buf[..], b"HTTP/1.1 200 OK\r\nContent-Len", "the partial one is kept");
    }

    #[test]
    fn chunked_bodies_and_interim_responses() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        buf.extend_from_slice(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n",
        );
        assert_eq!(parse_response(&mut buf), Ok(None));
        buf.extend_from_slice(
            b"2;ext=1\r\nef\r\n0\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        );
        assert_eq!(
            parse_response(&mut buf),
            Ok(Some(ParsedResponse { status: 503, close: false, error_body: None }))
        );
        assert_eq!(
            parse_response(&mut buf),
            Ok(Some(ParsedResponse { status: 200, close: false, error_body: None }))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn malformed_streams_are_errors() {
        let mut b = BytesMut::from(&b"SSH-2.0-OpenSSH\r\n\r\n"[..]);
        assert!(matches!(parse_response(&mut b), Err(ResponseError::Head(_))));
        let mut b = BytesMut::from(&b"HTTP/1.1 200 OK\r\n\r\nbody"[..]);
        assert_eq!(parse_response(&mut b), Err(ResponseError::Unframed));
        let mut b = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n"[..]);
        assert_eq!(parse_response(&mut b), Err(ResponseError::Header("Content-Length")));
        let mut b = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabcd\r\n"[..],
        );
        assert_eq!(parse_response(&mut b), Err(ResponseError::Chunked));
    }
}
