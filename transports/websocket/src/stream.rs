//! [`WsStream`]: the binary messages of an upgraded connection as one byte stream, so that a
//! byte-stream protocol (MQTT) runs over it unchanged. Reads yield the payloads of binary
//! frames in order, whatever their fragmentation; each write goes out as one binary frame.
//! Pings are answered; a close frame ends the stream (and is answered); a text frame or a
//! protocol violation closes the connection with the matching status code and reads end with
//! an `InvalidData` error.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::frame::{self, Opcode};

/// Write buffer size over which a write waits for the socket instead of queuing more.
const WRITE_HIGH_WATER: usize = 64 * 1024;

/// A WebSocket connection, server side, seen as a byte stream.
pub struct WsStream<S> {
    inner: S,
    /// Bytes read and not yet decoded.
    read: BytesMut,
    /// Payload of the current data frame not yet handed to the reader.
    payload: Bytes,
    /// Frames to write (data, pongs, close).
    write: BytesMut,
    max_payload: u64,
    /// The frame limit until that many bytes of data have come (MQTT's CONNECT, from a peer
    /// that has proven nothing yet, fragmented or not); then `max_payload`.
    first_max_payload: u64,
    /// Data bytes received so far (counted up to `first_max_payload`).
    data_seen: u64,
    /// Whether a close frame has been queued (nothing more is sent).
    close_sent: bool,
    /// The reading side has ended (close frame, error or EOF).
    read_done: bool,
    /// Inside a fragmented binary message (continuations are data).
    in_binary: bool,
}

impl<S> WsStream<S> {
    /// The stream over an upgraded connection. `already_read` are bytes read past the
    /// upgrade request (the first frames); frames over `max_payload` bytes close it (1009).
    pub fn new(inner: S, already_read: &[u8], max_payload: u64) -> Self {
        Self {
            inner,
            read: BytesMut::from(already_read),
            payload: Bytes::new(),
            write: BytesMut::new(),
            max_payload,
            first_max_payload: max_payload,
            data_seen: 0,
            close_sent: false,
            read_done: false,
            in_binary: false,
        }
    }

    /// Until `max` bytes of data have come, no frame may carry more than `max` (one over it
    /// closes the stream with 1009): what a peer that has sent nothing else yet (MQTT: before
    /// CONNECT is through) can make the server buffer.
    pub fn with_first_frame_limit(mut self, max: u64) -> Self {
        self.first_max_payload = max.min(self.max_payload);
        self
    }

    fn close(&mut self, code: u16) {
        if !self.close_sent {
            frame::encode_close(code, &mut self.write);
            self.close_sent = true;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Writes what is queued; `Ready(Ok)` once all of it is out.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.write.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.write))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.write.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Decodes frames until there is payload for the reader; `Ok(false)` at the end.
    fn poll_payload(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            if !self.payload.is_empty() {
                return Poll::Ready(Ok(true));
            }
            if self.read_done {
                return Poll::Ready(Ok(false));
            }
            let limit = if self.data_seen < self.first_max_payload {
                self.first_max_payload
            } else {
                self.max_payload
            };
            match frame::decode(&mut self.read, limit) {
                Ok(Some(f)) => match f.opcode {
                    Opcode::Binary | Opcode::Continuation
                        if f.opcode == Opcode::Binary || self.in_binary =>
                    {
                        self.data_seen = self.data_seen.saturating_add(f.payload.len() as u64);
                        self.in_binary = !f.fin;
                        self.payload = f.payload;
                    }
                    Opcode::Ping => frame::encode(Opcode::Pong, &f.payload, &mut self.write),
                    Opcode::Pong => {}
                    Opcode::Close => {
                        // Answer with the same code (or none), and end reading.
                        let code =
                            f.payload.get(..2).map_or(1000, |c| u16::from_be_bytes([c[0], c[1]]));
                        self.close(code);
                        self.read_done = true;
                    }
                    // MQTT over WebSocket is binary only (MQTT 5 §6.0): 1003; a continuation
                    // outside a message: 1002.
                    Opcode::Text => return Poll::Ready(Err(self.fail(1003, "text frame"))),
                    _ => return Poll::Ready(Err(self.fail(1002, "unexpected continuation"))),
                },
                Ok(None) => {
                    // Pongs go out before waiting for more.
                    let _ = self.poll_drain(cx)?;
                    let n = ready!(poll_read_buf(&mut self.inner, cx, &mut self.read))?;
                    if n == 0 {
                        self.read_done = true;
                    }
                }
                Err(e) => {
                    let code = e.close_code();
                    return Poll::Ready(Err(self.fail(code, &e.to_string())));
                }
            }
        }
    }

    fn fail(&mut self, code: u16, what: &str) -> io::Error {
        self.close(code);
        self.read_done = true;
        self.payload = Bytes::new();
        io::Error::new(io::ErrorKind::InvalidData, format!("WebSocket: {what}"))
    }
}

/// One read of the socket, appended to `buf` (through a stack buffer: the crate has no
/// unsafe code to read into spare capacity).
fn poll_read_buf<S: AsyncRead + Unpin>(
    inner: &mut S,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    let mut scratch = [0u8; 4096];
    let mut read = ReadBuf::new(&mut scratch);
    ready!(Pin::new(inner).poll_read(cx, &mut read))?;
    buf.extend_from_slice(read.filled());
    Poll::Ready(Ok(read.filled().len()))
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !ready!(this.poll_payload(cx))? {
            // The close answer goes out if it can; the writer's shutdown finishes it.
            let _ = this.poll_drain(cx);
            return Poll::Ready(Ok(()));
        }
        let n = this.payload.len().min(buf.remaining());
        buf.put_slice(&this.payload[..n]);
        this.payload.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write.len() >= WRITE_HIGH_WATER {
            ready!(this.poll_drain(cx))?;
        }
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        frame::encode(Opcode::Binary, data, &mut this.write);
        // Out now if the socket takes it; what it does not take waits for the next write or
        // flush.
        let _ = this.poll_drain(cx)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.close(1000);
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [9, 8, 7, 6];
        let mut out = vec![b0, 0x80 | payload.len() as u8];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    #[tokio::test]
    async fn binary_fragments_read_as_one_stream_and_pings_are_answered() {
        let (client, server) = duplex(4096);
        let mut ws = WsStream::new(server, &masked(0x02, b"ab"), 1024);
        let (mut crd, mut cwr) = tokio::io::split(client);
        let mut frames = masked(0x89, b"hi");
        frames.extend(masked(0x00, b"cd"));
        frames.extend(masked(0x80, b"ef"));
        frames.extend(masked(0x82, b"g"));
        frames.extend(masked(0x88, &1000u16.to_be_bytes()));
        cwr.write_all(&frames).await.unwrap();
        let mut got = Vec::new();
        ws.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"abcdefg");
        // After the close handshake nothing more is sent.
        assert_eq!(ws.write_all(b"xyz").await.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        ws.shutdown().await.unwrap();
        let mut out = Vec::new();
        crd.read_to_end(&mut out).await.unwrap();
        // Pong "hi", then the close answer, and nothing else.
        assert_eq!(out, [0x8A, 2, b'h', b'i', 0x88, 2, 0x03, 0xE8]);
    }

    /// Issue 15: before CONNECT a peer may make the server buffer only a small frame.
    #[tokio::test]
    async fn the_first_data_frame_has_its_own_smaller_limit() {
        let (_client, server) = duplex(4096);
        let mut first = masked(0x82, &[b'c'; 100]);
        first.extend(masked(0x82, &[b'p'; 120]));
        let mut ws = WsStream::new(server, &first, 125).with_first_frame_limit(100);
        let mut got = vec![0u8; 220];
        ws.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[100..], &[b'p'; 120], "later frames may be larger");

        // Over the limit at once, or after a small first fragment.
        let mut fragmented = masked(0x02, b"c");
        fragmented.extend(masked(0x80, &[b'c'; 101]));
        for first in [masked(0x82, &[b'c'; 101]), fragmented] {
            let (_client, server) = duplex(4096);
            let mut ws = WsStream::new(server, &first, 125).with_first_frame_limit(100);
            let mut buf = [0u8; 8];
            // The first byte of the fragmented one is read; then the error.
            for _ in 0..2 {
                if ws.read(&mut buf).await.is_err() {
                    break;
                }
            }
            assert_eq!(&ws.write[..4], [0x88, 2, 0x03, 0xF1], "closed with 1009");
        }
    }

    #[tokio::test]
    async fn text_frames_close_with_1003() {
        let (client, server) = duplex(4096);
        let mut ws = WsStream::new(server, &masked(0x81, b"{}"), 1024);
        let mut buf = [0u8; 8];
        let err = ws.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        ws.shutdown().await.unwrap();
        drop(ws);
        let mut out = Vec::new();
        let (mut crd, _) = tokio::io::split(client);
        crd.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, [0x88, 2, 0x03, 0xEB]);
    }

    #[tokio::test]
    async fn writes_are_binary_frames() {
        let (client, server) = duplex(1 << 20);
        let mut ws = WsStream::new(server, &[], 1024);
        ws.write_all(&[5; 300]).await.unwrap();
        ws.flush().await.unwrap();
        drop(ws);
        let mut out = Vec::new();
        let (mut crd, _) = tokio::io::split(client);
        crd.read_to_end(&mut out).await.unwrap();
        assert_eq!(&out[..4], &[0x82, 126, 1, 44]);
        assert_eq!(out.len(), 304);
    }
}
