//! One simulated CoAP device: its own UDP socket, bound to a chosen source address and
//! `connect()`ed to the gateway, sending each data sample as a POST to
//! `kp1/<app version>/dcx/<token>/json` (Content-Format application/json) with a fresh message
//! id and a fresh 4-byte token, encoded with fleetgate's own CoAP codec.
//!
//! Sending never waits: [`CoapDevice::publish`] encodes and hands the datagram to the socket
//! with `try_send`; a full socket buffer is backpressure. QoS 1 sends confirmable (CON)
//! requests, at most `window` outstanding per device; QoS 0 sends non-confirmable (NON) ones.
//! The reader task ([`CoapDevice::read_loop`]) counts each response whose token matches an
//! outstanding request as acknowledged (an error when its class is 4 or 5), whether it came
//! piggybacked on the ACK, as a separate response (answered with an empty ACK) or as a NON
//! response, and times it from the request's send (the device's round trip); error responses
//! and Resets are counted as failures by code. An empty ACK alone (answer to follow) counts
//! nothing yet.
//!
//! What it does not do: retransmit (a lost request or response shows up as a missing delivery
//! or acknowledgement, and a CON whose answer never comes holds its window slot until the
//! run ends), block-wise transfers (the payload must fit one datagram), Observe, DTLS, or
//! request ids in the path.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use fleetgate_transport_coap::codec::{
    Code, EncodeError, Message, MessageType, MessageWriter, option, write_empty,
};
use fleetgate_transport_mqtt::codec::QoS;
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::device::{ConnectError, Liveness, SendOutcome};
use crate::stats::{Failure, RunCounters, mono_nanos};

/// Content-Format application/json (RFC 7252 §12.3).
pub const CONTENT_FORMAT_JSON: u32 = 50;
/// Receive buffer per datagram: larger than any response the gateway sends to a data sample.
const RECV_CHUNK: usize = 2048;
/// NON requests remembered for matching their responses; beyond this a NON request is sent
/// untracked (its response is then not counted), so that lost responses cannot grow the map
/// without bound.
const MAX_TRACKED_NON: usize = 4096;

/// How every CoAP device of a run reaches the gateway.
#[derive(Debug, Clone)]
pub struct CoapOptions {
    /// The gateway's CoAP address.
    pub target: SocketAddr,
    /// The 1/KP application version in the path.
    pub app_version: String,
    /// CON requests a device may have outstanding.
    pub window: u32,
    /// The reachability check (a CoAP ping) must be answered within this.
    pub connect_timeout: Duration,
}

/// A request's header fields and payload, for [`encode_request`].
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// CON or NON.
    pub mtype: MessageType,
    /// The method.
    pub code: Code,
    /// The message id.
    pub message_id: u16,
    /// The token (at most 8 bytes).
    pub token: &'a [u8],
    /// Content-Format, if any.
    pub content_format: Option<u32>,
    /// The payload (may be empty).
    pub payload: &'a [u8],
}

/// Writes a request into `out`: header, token, one Uri-Path option per segment of `path`,
/// Content-Format, payload (RFC 7252 §3).
pub fn encode_request<'p>(
    out: &mut BytesMut,
    req: &Request<'_>,
    path: impl IntoIterator<Item = &'p [u8]>,
) -> Result<(), EncodeError> {
    let mut w = MessageWriter::new(out, req.mtype, req.code, req.message_id, req.token)?;
    for segment in path {
        w.option(option::URI_PATH, segment)?;
    }
    if let Some(cf) = req.content_format {
        w.uint_option(option::CONTENT_FORMAT, cf)?;
    }
    w.payload(req.payload);
    Ok(())
}

struct State {
    next_message_id: u16,
    next_token: u32,
    /// Outstanding requests by token: their message id, whether they were CON, and their send
    /// time ([`mono_nanos`]).
    outstanding: HashMap<u32, (u16, bool, u64)>,
    tracked_non: usize,
    scratch: BytesMut,
}

/// A CoAP device with its socket ready.
pub struct CoapDevice {
    socket: UdpSocket,
    path: Vec<Vec<u8>>,
    state: Mutex<State>,
    inflight: AtomicU32,
    window: u32,
    live: Liveness,
}

impl std::fmt::Debug for CoapDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoapDevice")
            .field(
                "path",
                &self.path.iter().map(|s| String::from_utf8_lossy(s)).collect::<Vec<_>>(),
            )
            .field("open", &self.live.is_open())
            .finish_non_exhaustive()
    }
}

/// A starting value for message ids and tokens that differs per device and per run, so that a
/// reused source port within the gateway's EXCHANGE_LIFETIME is not taken for retransmissions.
fn seed(token: &str) -> u32 {
    let now = crate::stats::unix_nanos();
    let mut h = now as u32 ^ (now >> 32) as u32;
    for b in token.bytes() {
        h = h.rotate_left(5) ^ u32::from(b);
        h = h.wrapping_mul(0x9E37_79B1);
    }
    h
}

/// Opens the device's socket from `source` to `opts.target` and checks the gateway answers a
/// CoAP ping (an Empty CON, answered with RST).
pub async fn connect(
    opts: &CoapOptions,
    source: Option<IpAddr>,
    token: &str,
    counters: Arc<RunCounters>,
) -> Result<Arc<CoapDevice>, ConnectError> {
    let bind = SocketAddr::new(
        source.unwrap_or(if opts.target.is_ipv4() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([0u16; 8])
        }),
        0,
    );
    let socket = UdpSocket::bind(bind).await.map_err(|e| ConnectError::Bind(bind, e))?;
    socket.connect(opts.target).await.map_err(ConnectError::Socket)?;
    let s = seed(token);
    let ping_id = s as u16;
    let ping = async {
        let mut out = BytesMut::new();
        write_empty(&mut out, MessageType::Confirmable, ping_id);
        socket.send(&out).await.map_err(ConnectError::Socket)?;
        let mut buf = [0u8; 64];
        loop {
            let n = socket.recv(&mut buf).await.map_err(ConnectError::Socket)?;
            let Some(h) = fleetgate_transport_coap::codec::Header::peek(&buf[..n]) else {
                continue;
            };
            if h.message_id == ping_id
                && matches!(h.mtype, MessageType::Reset | MessageType::Acknowledgement)
            {
                return Ok(());
            }
        }
    };
    tokio::time::timeout(opts.connect_timeout, ping)
        .await
        .map_err(|_| ConnectError::Unanswered("answer to a CoAP ping"))??;
    let path = crate::device::data_topic(&opts.app_version, token)
        .split('/')
        .map(|s| s.as_bytes().to_vec())
        .collect();
    Ok(Arc::new(CoapDevice {
        socket,
        path,
        state: Mutex::new(State {
            next_message_id: ping_id.wrapping_add(1),
            next_token: s.rotate_left(16),
            outstanding: HashMap::new(),
            tracked_non: 0,
            scratch: BytesMut::with_capacity(256),
        }),
        inflight: AtomicU32::new(0),
        window: opts.window.max(1),
        live: Liveness::opened(counters),
    }))
}

impl CoapDevice {
    /// Whether the device still sends.
    pub fn is_open(&self) -> bool {
        self.live.is_open()
    }

    /// Sends one data sample now, without waiting: CON for QoS 1, NON for QoS 0.
    pub fn publish(&self, qos: QoS, payload: &[u8]) -> SendOutcome {
        if !self.is_open() {
            return SendOutcome::Closed;
        }
        let con = qos != QoS::AtMostOnce;
        if con && self.inflight.load(Ordering::Relaxed) >= self.window {
            return SendOutcome::WindowFull;
        }
        let Ok(mut guard) = self.state.lock() else {
            return SendOutcome::Closed;
        };
        let st = &mut *guard;
        let mid = st.next_message_id;
        st.next_message_id = mid.wrapping_add(1);
        let token = st.next_token;
        st.next_token = token.wrapping_add(1);
        st.scratch.clear();
        let req = Request {
            mtype: if con { MessageType::Confirmable } else { MessageType::NonConfirmable },
            code: Code::POST,
            message_id: mid,
            token: &token.to_be_bytes(),
            content_format: Some(CONTENT_FORMAT_JSON),
            payload,
        };
        if encode_request(&mut st.scratch, &req, self.path.iter().map(Vec::as_slice)).is_err() {
            return SendOutcome::BufferFull;
        }
        match self.socket.try_send(&st.scratch) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return SendOutcome::BufferFull,
            Err(_) => {
                drop(guard);
                self.mark_closed();
                return SendOutcome::Closed;
            }
        }
        if con {
            st.outstanding.insert(token, (mid, true, mono_nanos()));
            self.inflight.fetch_add(1, Ordering::Relaxed);
        } else if st.tracked_non < MAX_TRACKED_NON {
            st.outstanding.insert(token, (mid, false, mono_nanos()));
            st.tracked_non += 1;
        }
        SendOutcome::Sent { pending: false }
    }

    /// Nothing is ever left to write: datagrams go out whole or not at all.
    pub fn flush(&self) -> bool {
        false
    }

    fn mark_closed(&self) {
        self.live.mark_closed();
    }

    /// Forgets the request `token` answers; whether it was outstanding (then its round trip is
    /// recorded).
    fn settle(&self, token: Option<u32>, reset_mid: Option<u16>) -> bool {
        let Ok(mut st) = self.state.lock() else { return false };
        let found = match (token, reset_mid) {
            (Some(t), _) => st.outstanding.remove(&t),
            (None, Some(mid)) => {
                let t = st.outstanding.iter().find(|(_, (m, _, _))| *m == mid).map(|(t, _)| *t);
                t.and_then(|t| st.outstanding.remove(&t))
            }
            (None, None) => None,
        };
        let Some((_, con, sent)) = found else { return false };
        if con {
            let _ = self
                .inflight
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
        } else {
            st.tracked_non = st.tracked_non.saturating_sub(1);
        }
        drop(st);
        self.live.counters().round_trip(sent);
        true
    }

    /// Handles one datagram from the gateway.
    fn handle(&self, msg: &Message) {
        let code = msg.code();
        if msg.mtype() == MessageType::Confirmable {
            // A separate response (or anything confirmable): acknowledge it, so that the
            // gateway stops retransmitting. A full socket buffer loses the ACK; the gateway
            // then retransmits and the duplicate is not counted again (its token is settled).
            let mut ack = BytesMut::with_capacity(4);
            write_empty(&mut ack, MessageType::Acknowledgement, msg.message_id());
            let _ = self.socket.try_send(&ack);
        }
        let counters = self.live.counters();
        let step = counters.current();
        if msg.mtype() == MessageType::Reset {
            // The gateway rejected a request outright.
            if self.settle(None, Some(msg.message_id())) {
                step.acked.fetch_add(1, Ordering::Relaxed);
                step.ack_errors.fetch_add(1, Ordering::Relaxed);
                counters.fail(Failure::CoapReset, || None);
            }
            return;
        }
        if code.is_empty() || !code.is_response() {
            // An empty ACK: accepted, the answer follows separately.
            return;
        }
        let token = <[u8; 4]>::try_from(msg.token().as_slice()).ok().map(u32::from_be_bytes);
        if token.is_some() && self.settle(token, None) {
            step.acked.fetch_add(1, Ordering::Relaxed);
            if matches!(code.class(), 4 | 5) {
                step.ack_errors.fetch_add(1, Ordering::Relaxed);
                counters.fail(Failure::Coap(code.0), || {
                    let body = msg.payload();
                    (!body.is_empty()).then(|| crate::device::parse_error_body(body).1)?
                });
            }
        }
    }

    /// The reader: runs until `stop` turns true or the socket fails.
    pub async fn read_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut buf = BytesMut::with_capacity(RECV_CHUNK);
        while self.is_open() && !*stop.borrow() {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                r = self.socket.readable() => {
                    if r.is_err() {
                        self.mark_closed();
                        return;
                    }
                    loop {
                        buf.clear();
                        buf.reserve(RECV_CHUNK);
                        match self.socket.try_recv_buf(&mut buf) {
                            Ok(_) => {
                                if let Ok(msg) = Message::decode(buf.split().freeze()) {
                                    self.handle(&msg);
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            // ICMP port unreachable and the like: the gateway is gone.
                            Err(_) => {
                                self.mark_closed();
                                return;
                            }
                        }
                    }
                }
            }
        }
        self.shutdown();
    }

    /// Stops sending, without counting the device as lost.
    pub fn shutdown(&self) {
        self.live.stop();
        self.mark_closed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn request_decodes_back_with_the_codec() {
        let mut out = BytesMut::new();
        let path: Vec<&[u8]> = vec![b"kp1", b"demo-v1", b"dcx", b"dev-000001", b"json"];
        let payload = br#"{"t":123,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
        let req = Request {
            mtype: MessageType::Confirmable,
            code: Code::POST,
            message_id: 0xBEEF,
            token: &[1, 2, 3, 4],
            content_format: Some(CONTENT_FORMAT_JSON),
            payload,
        };
        encode_request(&mut out, &req, path.iter().copied()).expect("encodes");
        let msg = Message::decode(out.freeze()).expect("decodes");
        assert_eq!(msg.mtype(), MessageType::Confirmable);
        assert_eq!(msg.code(), Code::POST);
        assert_eq!(msg.message_id(), 0xBEEF);
        assert_eq!(msg.token().as_slice(), &[1, 2, 3, 4]);
        let segments: Vec<&[u8]> = msg.uri_path().collect();
        assert_eq!(segments, path);
        assert_eq!(msg.known().content_format, Some(50));
        assert_eq!(msg.payload(), &Bytes::from_static(payload));
    }

    #[test]
    fn non_request_without_payload_or_format() {
        let mut out = BytesMut::new();
        let path: Vec<&[u8]> = vec![b"kp1"];
        let req = Request {
            mtype: MessageType::NonConfirmable,
            code: Code::POST,
            message_id: 7,
            token: &[9, 9, 9, 9],
            content_format: None,
            payload: b"",
        };
        encode_request(&mut out, &req, path.iter().copied()).expect("encodes");
        let msg = Message::decode(out.freeze()).expect("decodes");
        assert_eq!(msg.mtype(), MessageType::NonConfirmable);
        assert_eq!(msg.known().content_format, None);
        assert!(msg.payload().is_empty());
        assert_eq!(msg.uri_path().count(), 1);
    }

    #[test]
    fn long_segments_use_extended_lengths() {
        // A 300-byte segment needs the 2-byte length extension (RFC 7252 §3.1).
        let long = vec![b'a'; 300];
        let path: Vec<&[u8]> = vec![b"kp1", &long];
        let mut out = BytesMut::new();
        let req = Request {
            mtype: MessageType::Confirmable,
            code: Code::POST,
            message_id: 1,
            token: &[0; 4],
            content_format: Some(CONTENT_FORMAT_JSON),
            payload: b"{}",
        };
        encode_request(&mut out, &req, path.iter().copied()).expect("encodes");
        let msg = Message::decode(out.freeze()).expect("decodes");
        let segments: Vec<&[u8]> = msg.uri_path().collect();
        assert_eq!(segments, path);
        assert_eq!(msg.known().content_format, Some(50));
    }
}
