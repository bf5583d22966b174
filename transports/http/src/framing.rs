//! An early look at HTTP/1.1 message framing, so that a chunk size over the body limit is
//! refused the moment its size line arrives, before any of it is buffered.
//!
//! hyper decodes chunked bodies but never tells its caller a chunk's declared size: a chunk of
//! `FFFFFFFFFFFF` bytes would be read, and held, up to `max_body_bytes` before the refusal.
//! [`ChunkScanner`] follows the bytes of a connection beside hyper (request heads, then each
//! body as `Content-Length` bytes or chunks and trailers) and trips when one chunk, or the chunks
//! of one body together, declare more than the limit. It decides nothing else: hyper still
//! parses and validates everything, and rejects what the scanner merely skips. A request the
//! scanner tripped on is answered 413 and its connection closed.
//!
//! [`Guarded`] is the stream wrapper that feeds the scanner what hyper reads, and [`Tripwire`]
//! what the connection's request handler waits on.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Bytes of a head line kept to recognise `Content-Length` and `Transfer-Encoding`; the rest of
/// a longer line is skipped (hyper limits heads itself).
const LINE_KEPT: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In a request head; `lines` counts the lines so far.
    Head { lines: u32, chunked: bool, length: u64 },
    /// A `Content-Length` body: bytes left.
    Length(u64),
    /// A chunk-size line: the size so far; `ext` once past the size (extensions, spaces).
    Size { size: u64, ext: bool },
    /// Chunk data: bytes left.
    Data(u64),
    /// The line end after chunk data.
    DataEnd,
    /// Trailer lines after the last chunk; `empty` while the current line has no bytes.
    Trailers { empty: bool },
    /// A declared size passed the limit: nothing more is looked at.
    Tripped,
}

/// Follows HTTP/1.1 request framing and trips on chunk sizes over a limit (see the module doc).
#[derive(Debug, Clone)]
pub struct ChunkScanner {
    state: State,
    limit: u64,
    /// The chunk sizes of the current body so far.
    declared: u64,
    line: [u8; LINE_KEPT],
    line_len: usize,
}

impl ChunkScanner {
    /// A scanner for a new connection, tripping on bodies declared over `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self {
            state: State::Head { lines: 0, chunked: false, length: 0 },
            limit,
            declared: 0,
            line: [0; LINE_KEPT],
            line_len: 0,
        }
    }

    /// Whether a declared size passed the limit.
    pub fn tripped(&self) -> bool {
        self.state == State::Tripped
    }

    /// Follows `bytes`, the next ones read from the connection; true once tripped.
    pub fn feed(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            match self.state {
                State::Tripped => return true,
                State::Length(left) | State::Data(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
                    bytes = &bytes[n..];
                    let left = left - n as u64;
                    self.state = match (self.state, left) {
                        (State::Length(_), 0) => self.new_head(),
                        (State::Length(_), _) => State::Length(left),
                        (_, 0) => State::DataEnd,
                        _ => State::Data(left),
                    };
                }
                State::Head { .. } => {
                    // A head line at a time: copied (up to `LINE_KEPT`) and looked at whole.
                    let end = bytes.iter().position(|&b| b == b'\n');
                    let (part, rest) = match end {
                        Some(i) => (&bytes[..i], &bytes[i + 1..]),
                        None => (bytes, &[][..]),
                    };
                    let room = LINE_KEPT - self.line_len;
                    let kept = &part[..part.len().min(room)];
                    self.line[self.line_len..self.line_len + kept.len()].copy_from_slice(kept);
                    self.line_len += kept.len();
                    bytes = rest;
                    if end.is_some() {
                        if self.line[..self.line_len].last() == Some(&b'\r') {
                            self.line_len -= 1;
                        }
                        self.head_line();
                        self.line_len = 0;
                    }
                }
                _ => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    self.byte(b);
                }
            }
        }
        self.tripped()
    }

    fn new_head(&mut self) -> State {
        self.declared = 0;
        self.line_len = 0;
        State::Head { lines: 0, chunked: false, length: 0 }
    }

    fn byte(&mut self, b: u8) {
        match self.state {
            State::Size { size, ext } => match b {
                b'\n' => self.end_size(size),
                b'\r' => {}
                _ if ext => {}
                _ => match (b as char).to_digit(16) {
                    Some(d) => {
                        // Over the limit already while its digits arrive: trip at once.
                        let size = size.checked_mul(16).and_then(|s| s.checked_add(d.into()));
                        match size {
                            Some(s) if self.declared.saturating_add(s) <= self.limit => {
                                self.state = State::Size { size: s, ext: false };
                            }
                            _ => self.state = State::Tripped,
                        }
                    }
                    None => self.state = State::Size { size, ext: true },
                },
            },
            State::DataEnd => {
                if b == b'\n' {
                    self.state = State::Size { size: 0, ext: false };
                }
            }
            State::Trailers { empty } => match b {
                b'\n' if empty => self.state = self.new_head(),
                b'\n' => self.state = State::Trailers { empty: true },
                b'\r' => {}
                _ => self.state = State::Trailers { empty: false },
            },
            State::Head { .. } | State::Length(_) | State::Data(_) | State::Tripped => {}
        }
    }

    fn end_size(&mut self, size: u64) {
        self.declared = self.declared.saturating_add(size);
        self.state = if size == 0 { State::Trailers { empty: true } } else { State::Data(size) };
    }

    /// A complete head line (without its line end) is in `line`.
    fn head_line(&mut self) {
        let State::Head { lines, chunked, length } = self.state else { return };
        let line = &self.line[..self.line_len];
        if line.is_empty() {
            // Empty lines before a request line are ignored (RFC 9112 §2.2); after the
            // headers, the body starts.
            if lines > 0 {
                self.declared = 0;
                self.state = match (chunked, length) {
                    (true, _) => State::Size { size: 0, ext: false },
                    (false, 0) => self.new_head(),
                    (false, n) => State::Length(n),
                };
            }
            return;
        }
        let (mut chunked, mut length) = (chunked, length);
        if let Some(colon) = line.iter().position(|&c| c == b':') {
            let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                chunked = value.to_ascii_lowercase().windows(7).any(|w| w == b"chunked");
            } else if name.eq_ignore_ascii_case(b"content-length") {
                length = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()).unwrap_or(0);
            }
        }
        self.state = State::Head { lines: lines.saturating_add(1), chunked, length };
    }
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Raised by a [`Guarded`] stream whose scanner tripped; awaited by the request that reads the
/// body.
#[derive(Debug, Default)]
pub(crate) struct Tripwire {
    tripped: AtomicBool,
    notify: Notify,
    /// A request head has arrived on the connection: it is no longer a slow head that the
    /// accept loop may cut when every connection is taken.
    headed: AtomicBool,
}

impl Tripwire {
    /// Marks that a request head arrived.
    pub(crate) fn headed(&self) {
        self.headed.store(true, Ordering::Relaxed);
    }

    /// Whether a request head has arrived.
    pub(crate) fn has_headed(&self) -> bool {
        self.headed.load(Ordering::Relaxed)
    }

    fn trip(&self) {
        self.tripped.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Whether it has tripped.
    pub(crate) fn is_tripped(&self) -> bool {
        self.tripped.load(Ordering::Acquire)
    }

    /// Returns once tripped.
    pub(crate) async fn tripped(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_tripped() {
                return;
            }
            notified.await;
        }
    }
}

/// A stream whose reads pass through a [`ChunkScanner`]; it raises its [`Tripwire`] when the
/// scanner trips. Bytes pass unchanged.
pub(crate) struct Guarded<S> {
    inner: S,
    scanner: ChunkScanner,
    wire: Arc<Tripwire>,
}

impl<S> Guarded<S> {
    pub(crate) fn new(inner: S, limit: u64, wire: Arc<Tripwire>) -> Self {
        Self { inner, scanner: ChunkScanner::new(limit), wire }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && !this.scanner.tripped()
            && this.scanner.feed(&buf.filled()[before..])
        {
            this.wire.trip();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trips(limit: u64, input: &[u8]) -> bool {
        let mut whole = ChunkScanner::new(limit);
        let at_once = whole.feed(input);
        // Byte by byte gives the same verdict.
        let mut split = ChunkScanner::new(limit);
        let mut bytewise = false;
        for b in input {
            bytewise = split.feed(std::slice::from_ref(b));
        }
        assert_eq!(at_once, bytewise, "{}", String::from_utf8_lossy(input));
        at_once
    }

    const CHUNKED: &[u8] =
        b"POST /kp1/a/b/c/json HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";

    #[test]
    fn a_huge_chunk_size_trips_before_its_data() {
        let input = [CHUNKED, b"FFFFFFFFFFFF\r\n"].concat();
        assert!(trips(1 << 20, &input));
        // Even before the line ends, and on sizes that overflow 64 bits.
        assert!(trips(1 << 20, &[CHUNKED, b"FFFFFF"].concat()));
        assert!(trips(1 << 20, &[CHUNKED, b"FFFFFFFFFFFFFFFFFFFFFFFF"].concat()));
    }

    #[test]
    fn chunks_within_the_limit_pass_and_their_sum_counts() {
        let ok = [CHUNKED, b"4;ext=1\r\nabcd\r\n3\r\nefg\r\n0\r\nTrailer: t\r\n\r\n"].concat();
        assert!(!trips(7, &ok));
        assert!(trips(6, &ok));
        // The next request on the connection starts afresh.
        let two = [&ok[..], &ok[..]].concat();
        assert!(!trips(7, &two));
    }

    #[test]
    fn content_length_bodies_are_skipped_whatever_they_hold() {
        let body = b"FFFFFFFFFFFF\r\n";
        let head = format!("POST /x HTTP/1.1\r\ncontent-length: {}\r\n\r\n", body.len());
        let input = [head.as_bytes(), body, CHUNKED, b"10\r\n"].concat();
        assert!(!trips(1024, &input));
        assert!(trips(15, &input));
    }

    #[test]
    fn heads_without_a_body_and_leading_empty_lines() {
        let input = [&b"\r\nGET /x HTTP/1.1\r\nHost: y\r\n\r\n"[..], CHUNKED, b"5\r\n"].concat();
        assert!(!trips(5, &input));
        assert!(trips(4, &input));
    }
}
